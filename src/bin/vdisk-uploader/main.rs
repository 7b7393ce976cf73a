//! `vdisk-uploader`: drop-in for CDI's upload server entrypoint (`/usr/bin/cdi-uploadserver`).
//! Everything but process wiring lives in `vdisk::cdi::uploader`: this binary reads klog's
//! `-v` (other klog flags and an optional `serve` are accepted and ignored), logs in klog's
//! format, serves until an upload completes or the deadline passes, writes the termination
//! message and exits with the contract's code. The upload client is `vdisk upload`.

use vdisk::cdi::klog::Logger;
use vdisk::cdi::{Paths, uploader};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--version" || a == "-version") {
        println!("vdisk-uploader {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    let klog = Logger::from_args(&args);
    let paths = Paths::from_env();
    let cfg = match uploader::Config::from_env(&paths) {
        Ok(c) => c,
        Err(e) => {
            klog.error(&e);
            std::process::exit(1);
        }
    };
    klog.v(1, &format!("config: listen on {}", cfg.listen));
    let running = match uploader::start(cfg, Box::new(move |m: &str| klog.relay(m))) {
        Ok(r) => r,
        Err(e) => {
            klog.error(&format!("cannot start the server: {e}"));
            std::process::exit(1);
        }
    };
    klog.info(&format!("listening on {}", running.local_addr()));
    let (term, code) = running.wait();
    if code == 0 {
        klog.info(&term.to_json());
    } else {
        klog.error(&term.to_json());
    }
    if let Err(e) = uploader::write_termination(&paths, &term) {
        klog.error(&e.to_string());
        std::process::exit(1);
    }
    if let Some(peak) = vdisk::cdi::peak_rss() {
        klog.v(1, &format!("peak memory: {peak} bytes"));
    }
    klog.v(1, &format!("upload server exits with code {code}"));
    std::process::exit(code);
}
