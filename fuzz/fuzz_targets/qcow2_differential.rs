//! The one-verdict rule, fuzzed for qcow2: the same bytes opened as a qcow2 file (random
//! access, untrusted policy) and streamed through the importer must give the same verdict
//! (see `shared/differential.rs`). Any disagreement panics.
#![no_main]

#[path = "shared/differential.rs"]
mod shared;

use libfuzzer_sys::fuzz_target;
use vdisk::Format;

fuzz_target!(|data: &[u8]| {
    // Only qcow2 (version 2 or 3) goes down both paths alike.
    if data.len() < 8 || data[..4] != *b"QFI\xfb" || !matches!(data[7], 2 | 3) || data[4..7] != [0; 3]
    {
        return;
    }
    shared::differential(data, Some(Format::Qcow2));
});
