//! `cdi-containerimage-server`: CDI's node-pull server, run as the command of a containerDisk
//! image (built static: that image has no libc). Everything but process wiring lives in
//! `vdisk::cdi::imageserver`.

use vdisk::cdi::{Paths, imageserver};

fn log(msg: &str) {
    eprintln!("cdi-containerimage-server: {msg}");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match imageserver::parse_args(&args) {
        Ok(o) => o,
        Err(e) => {
            log(&e.to_string());
            eprintln!(
                "usage: cdi-containerimage-server [-p PORT] [-image-dir DIR] [-ready-file F] [-done-file F]"
            );
            std::process::exit(2);
        }
    };
    if let Err(e) = imageserver::run(&Paths::from_env(), &opts, &log) {
        log(&e.to_string());
        std::process::exit(1);
    }
}
