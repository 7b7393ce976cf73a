//! Open arbitrary bytes as vhd (untrusted policy, in memory) and read what they describe
//! (block status, guest data, `info`, `map`, `check`: see `shared/exercise.rs`). Any
//! panic, hang or huge allocation is a bug.
#![no_main]

#[path = "shared/exercise.rs"]
mod shared;

use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use vdisk::io::MemIo;
use vdisk::{Format, Image, OpenOptions, Policy};

fuzz_target!(|data: &[u8]| {
    let opts = OpenOptions {
        format: Some(Format::Vhd),
        policy: Policy::Untrusted,
        ..OpenOptions::default()
    };
    let io = Arc::new(MemIo::new(data.to_vec()));
    if let Ok(img) = Image::from_io(io, &opts) {
        shared::exercise(&img, "fuzz.vhd", 4 << 20);
    }
});
