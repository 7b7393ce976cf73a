//! `cdi-source-update-poller`: drop-in for CDI's DataImportCron poller in the importer image.
//! It resolves the registry digest of `-url` and records it on the DataImportCron `-ns`/`-cron`;
//! the logic is `vdisk::cdi::poller`.

use vdisk::cdi::klog::Logger;
use vdisk::cdi::{Paths, env, poller};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match poller::Options::parse(&args, &env) {
        Ok(o) => o,
        Err(e) => {
            Logger::from_args(&args).error(&e);
            std::process::exit(1);
        }
    };
    if let Err(e) = poller::run(&opts, &Paths::from_env()) {
        opts.logger.error(&e.to_string());
        std::process::exit(1);
    }
}
