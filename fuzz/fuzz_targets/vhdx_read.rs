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

use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use vdisk::info::{ImageInfo, map_extents, write_map_json};
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
/// Guest bytes read per image at most.
const MAX_READ: u64 = 16 << 20;
/// Largest single read request.
const STEP: u64 = 256 << 10;
/// Extents walked per image at most.
const MAX_EXTENTS: usize = 4096;
/// `map_extents` walks the whole disk: only for small disks.
const MAX_MAP_SIZE: u64 = 64 << 20;

/// A writer that fails once its byte budget is spent.
struct FailAfter(usize);

impl std::io::Write for FailAfter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() > self.0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        self.0 -= buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn exercise(img: &Image) {
    let size = img.virtual_size();
    let mut pos = 0u64;
    let mut n = 0;
    while pos < size && n < MAX_EXTENTS {
        match img.extent(pos, size - pos) {
            Ok(e) => {
                assert!(
                    e.len >= 1 && e.len <= size - pos,
                    "bad extent {e:?} at {pos}"
                );
                pos += e.len;
            }
            Err(_) => break,
        }
        n += 1;
    }
    let end = size.min(MAX_READ);
    let mut buf = vec![0u8; STEP.min(end) as usize];
    let mut pos = 0u64;
    while pos < end {
        let len = STEP.min(end - pos) as usize;
        let _ = img.read_at(&mut buf[..len], pos);
        pos += len as u64;
    }
    if size > 0 {
        let mut one = [0u8; 1];
        let _ = img.read_at(&mut one, size - 1);
        assert!(img.read_at(&mut one, size).is_err());
    }
    if size <= MAX_MAP_SIZE
        && let Ok(list) = map_extents(img)
    {
        let total: u64 = list.iter().map(|e| e.len).sum();
        assert_eq!(total, size, "map does not cover the disk");
        let _ = write_map_json(img, &mut FailAfter(200));
    }
    if let Some(d) = img.driver() {
        let _ = d.check();
    }
    if let Ok(info) = ImageInfo::new(img, "fuzz.vhdx") {
        let _ = info.to_json().to_string();
        let _ = info.to_human();
    }
}

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
        exercise(&img);
    }
});
