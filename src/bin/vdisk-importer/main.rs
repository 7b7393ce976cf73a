//! `vdisk-importer`: drop-in for CDI's importer container entrypoint (`/usr/bin/cdi-importer`).
//! Everything but process wiring lives in `vdisk::cdi::importer`: this binary reads klog's
//! `-v` (other klog flags are accepted and ignored), logs in klog's format, serves the
//! progress metric over HTTPS, runs the import, writes the termination message and exits with
//! the contract's code.

use vdisk::cdi::klog::Logger;
use vdisk::cdi::{Paths, importer};
use vdisk::net::server::{Progress, start_metrics};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--version" || a == "-version") {
        println!("vdisk-importer {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    // The orders come from the environment; arguments only set the log verbosity.
    let klog = Logger::from_args(&args);
    let log = |m: &str| klog.relay(m);
    let paths = Paths::from_env();
    let cfg = match importer::Config::from_env(&paths, &log) {
        Ok(c) => c,
        Err(out) => {
            if let Some(m) = &out.message {
                klog.error(m);
            }
            importer::write_outcome(&paths, &out, &log);
            std::process::exit(out.code);
        }
    };
    klog.v(
        1,
        &format!(
            "config: source={:?} endpoint={:?} content={:?} image size={:?} overhead={} preallocation={} insecure TLS={} credentials={} CA files={} proxy CA files={} extra headers={} checksum={} architecture={:?}",
            cfg.source,
            cfg.endpoint,
            cfg.content,
            cfg.image_size,
            cfg.overhead,
            cfg.preallocation,
            cfg.insecure_tls,
            cfg.credentials.is_some(),
            cfg.ca_pem.len(),
            cfg.proxy_ca_pem.len(),
            cfg.extra_headers.len(),
            cfg.checksum.is_some(),
            cfg.architecture,
        ),
    );
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
                klog.warning(&format!("progress metric not served: {e}"));
                None
            }
        }
    };
    let out = importer::run(&paths, &cfg, &|p| progress.set(p), &log);
    match (&out.message, out.code) {
        (Some(m), 0) => klog.info(m),
        (Some(m), _) => klog.error(m),
        (None, _) => {}
    }
    if let Some(peak) = vdisk::cdi::peak_rss() {
        klog.v(1, &format!("peak memory: {peak} bytes"));
    }
    klog.v(1, &format!("importer exits with code {}", out.code));
    importer::write_outcome(&paths, &out, &log);
    std::process::exit(out.code);
}
