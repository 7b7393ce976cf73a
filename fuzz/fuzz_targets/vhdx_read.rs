//! Open arbitrary bytes as VHDX (untrusted policy, in memory) and read what they describe:
//! block status, guest data, `info` and `map` output, the driver's `check`. Any panic, hang or
//! huge allocation is a bug.
//!
//! A VHDX spreads its metadata over several MiB (headers at 64 and 128 KiB, region tables at
//! 192 and 256 KiB, log, BAT and metadata at 1 MiB multiples), so the input is scattered: its
//! 4 KiB pieces land at the offsets in [`SLOTS`] of a zero-filled 12 MiB file, where qemu-img
//! puts those structures and its first payload blocks. The seeds in `fuzz/seeds/vhdx_read/`
//! are qemu-img images cut into these pieces.
#![no_main]

#[path = "shared/exercise.rs"]
mod shared;

use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use vdisk::io::MemIo;
use vdisk::{Format, Image, OpenOptions, Policy};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
/// Where each 4 KiB piece of the input goes.
const SLOTS: [usize; 14] = [
    0,
    64 * KIB,
    128 * KIB,
    192 * KIB,
    256 * KIB,
    MIB,
    MIB + 4 * KIB,
    2 * MIB,
    3 * MIB,
    3 * MIB + 64 * KIB,
    4 * MIB,
    8 * MIB,
    9 * MIB,
    10 * MIB,
];
/// The file the pieces are scattered over.
const FILE_SIZE: usize = 12 * MIB;
fuzz_target!(|data: &[u8]| {
    let mut file = vec![0u8; FILE_SIZE];
    for (piece, &at) in data.chunks(4 * KIB).zip(SLOTS.iter()) {
        file[at..at + piece.len()].copy_from_slice(piece);
    }
    let opts = OpenOptions {
        format: Some(Format::Vhdx),
        policy: Policy::Untrusted,
        ..OpenOptions::default()
    };
    let io = Arc::new(MemIo::new(file));
    if let Ok(img) = Image::from_io(io, &opts) {
        shared::exercise(&img, "fuzz.vhdx", 64 << 20);
    }
});
