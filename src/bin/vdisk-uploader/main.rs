//! `vdisk-uploader`: drop-in for CDI's upload server entrypoint (`/usr/bin/cdi-uploadserver`).
//! Everything but process wiring lives in `vdisk::cdi::uploader`: this binary ignores klog
//! flags (and an optional `serve`), serves until an upload completes or the deadline passes,
//! writes the termination message and exits with the contract's code. The upload client is
//! `vdisk upload`.

use vdisk::cdi::{Paths, uploader};

fn log(msg: &str) {
    eprintln!("vdisk-uploader: {msg}");
}

fn main() {
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--version" | "-version" => {
                println!("vdisk-uploader {}", env!("CARGO_PKG_VERSION"));
                return;
            }
            // `serve` and klog flags (-v=N, -alsologtostderr, ...) change nothing.
            _ => {}
        }
    }
    let paths = Paths::from_env();
    let cfg = match uploader::Config::from_env(&paths) {
        Ok(c) => c,
        Err(e) => {
            log(&e);
            std::process::exit(1);
        }
    };
    let running = match uploader::start(cfg, Box::new(log)) {
        Ok(r) => r,
        Err(e) => {
            log(&format!("cannot start the server: {e}"));
            std::process::exit(1);
        }
    };
    log(&format!("listening on {}", running.local_addr()));
    let (term, code) = running.wait();
    log(&term.to_json());
    if let Err(e) = uploader::write_termination(&paths, &term) {
        log(&e.to_string());
        std::process::exit(1);
    }
    std::process::exit(code);
}
