//! `cdi-containerimage-server`: CDI's node-pull server, run as the command of a containerDisk
//! image (built static: that image has no libc). Everything but process wiring lives in
//! `vdisk::cdi::imageserver`.

use vdisk::cdi::klog::Logger;
use vdisk::cdi::{Paths, imageserver};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let klog = Logger::new(0);
    let log = |m: &str| klog.relay(m);
    let opts = match imageserver::parse_args(&args) {
        Ok(o) => o,
        Err(e) => {
            klog.error(&e.to_string());
            eprintln!(
                "usage: cdi-containerimage-server [-p PORT] [-image-dir DIR] [-ready-file F] [-done-file F]"
            );
            std::process::exit(2);
        }
    };
    if let Err(e) = imageserver::run(&Paths::from_env(), &opts, &log) {
        klog.error(&e.to_string());
        std::process::exit(1);
    }
}
