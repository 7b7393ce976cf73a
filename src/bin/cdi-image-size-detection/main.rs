//! `cdi-image-size-detection`: drop-in for CDI's tool of that name in the importer image. It
//! writes the virtual size of `-image-path` to the termination log and exits with CDI's codes;
//! the logic is `vdisk::cdi::sizedetect`.

use vdisk::cdi::Paths;
use vdisk::cdi::klog::Logger;
use vdisk::cdi::sizedetect::{Options, run};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match Options::parse(&args) {
        Ok(o) => o,
        Err(f) => {
            Logger::from_args(&args).error(&f.message);
            std::process::exit(f.code);
        }
    };
    let klog = opts.logger;
    klog.info("Initializing size-detection pod");
    match run(&opts, &Paths::from_env()) {
        Ok(_) => klog.info("Size-detection binary has completed"),
        Err(f) => {
            klog.error(&f.message);
            std::process::exit(f.code);
        }
    }
}
