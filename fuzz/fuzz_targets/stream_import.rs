//! Feed arbitrary bytes as a non-seekable stream to the importer (decompression layers, raw,
//! streaming qcow2, tar-wrapped disks) with a small in-memory target, a 1 MiB budget and no
//! spilling. Any panic, hang or unbounded allocation is a bug; output never passes capacity.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdisk::ingest::{ImportOptions, import_into};
use vdisk::io::{BlockIo, MemIo};

const CAPACITY: u64 = 16 << 20;

fuzz_target!(|data: &[u8]| {
    let io = MemIo::default();
    let mut opts = ImportOptions { memory_budget: 1 << 20, allow_spill: false, threads: 1, ..ImportOptions::default() };
    let _ = import_into(Box::new(data), &io, true, CAPACITY, &mut opts);
    assert!(io.size().unwrap() <= CAPACITY, "wrote past the target's capacity");
});
