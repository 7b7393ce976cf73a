//! `vdisk-importer`: drop-in for CDI's importer container entrypoint (`/usr/bin/cdi-importer`).
//! Everything but process wiring lives in `vdisk::cdi::importer`: this binary ignores klog
//! flags, serves the progress metric over HTTPS, runs the import, writes the termination
//! message and exits with the contract's code.

use vdisk::cdi::{Paths, importer};
use vdisk::net::server::{Progress, start_metrics};

fn log(msg: &str) {
    eprintln!("vdisk-importer: {msg}");
}

fn main() {
    // klog flags (-v=N, -alsologtostderr, ...) are accepted and ignored, as are other
    // arguments: the orders come from the environment.
    for a in std::env::args().skip(1) {
        if a == "--version" || a == "-version" {
            println!("vdisk-importer {}", env!("CARGO_PKG_VERSION"));
            return;
        }
    }
    let paths = Paths::from_env();
    let cfg = match importer::Config::from_env(&paths, &log) {
        Ok(c) => c,
        Err(out) => {
            importer::write_outcome(&paths, &out, &log);
            std::process::exit(out.code);
        }
    };
    let progress = Progress::new();
    let port = std::env::var("VDISK_METRICS_PORT").unwrap_or_else(|_| "8443".into());
    let _metrics = {
        match start_metrics(
            &format!("[::]:{port}"),
            "kubevirt_cdi_import_progress_total",
            &cfg.owner_uid,
            progress.clone(),
        )
        .or_else(|_| {
            start_metrics(
                &format!("0.0.0.0:{port}"),
                "kubevirt_cdi_import_progress_total",
                &cfg.owner_uid,
                progress.clone(),
            )
        }) {
            Ok(h) => Some(h),
            Err(e) => {
                log(&format!("progress metric not served: {e}"));
                None
            }
        }
    };
    let out = importer::run(&paths, &cfg, &|p| progress.set(p), &log);
    match &out.message {
        Some(m) => log(m),
        None => log(&format!("exit {}", out.code)),
    }
    importer::write_outcome(&paths, &out, &log);
    std::process::exit(out.code);
}
