//! Open arbitrary bytes as VMDK (untrusted policy, in memory) and read what they describe
//! (block status, guest data, `info`, `map`, `check`: see `shared/exercise.rs`). Any
//! panic, hang or huge allocation is a bug.
//!
//! qemu-img puts a sparse VMDK's header, descriptor, grain directories and tables in its first
//! 16 KiB and its grains (64 KiB each) from 64 KiB on, so the input is scattered: its 16 KiB
//! pieces land at the offsets in [`SLOTS`] (the metadata, then the start of the first three
//! grains), zeros between them. The file ends where the last piece does, so a stream's footer
//! (in the file's last sectors) and truncation stay within reach; an input under 16 KiB (a
//! descriptor file) is the file as is. The seeds in `fuzz/seeds/vmdk_read/` are qemu-img
//! images cut into these pieces.
#![no_main]

#[path = "shared/exercise.rs"]
mod shared;

use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use vdisk::io::MemIo;
use vdisk::{Format, Image, OpenOptions, Policy};

const KIB: usize = 1024;
/// Bytes of input per slot.
const PIECE: usize = 16 * KIB;
/// Where each piece of the input goes.
const SLOTS: [usize; 4] = [0, 64 * KIB, 128 * KIB, 192 * KIB];

fuzz_target!(|data: &[u8]| {
    let mut file = Vec::with_capacity(SLOTS[SLOTS.len() - 1] + PIECE);
    for (piece, &at) in data.chunks(PIECE).zip(SLOTS.iter()) {
        file.resize(at, 0);
        file.extend_from_slice(piece);
    }
    let opts = OpenOptions {
        format: Some(Format::Vmdk),
        policy: Policy::Untrusted,
        ..OpenOptions::default()
    };
    let io = Arc::new(MemIo::new(file));
    if let Ok(img) = Image::from_io(io, &opts) {
        shared::exercise(&img, "fuzz.vmdk", 64 << 20);
    }
});
