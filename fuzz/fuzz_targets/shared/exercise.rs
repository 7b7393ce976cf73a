//! What every image-reader fuzz target does with an image it could open: walk its block
//! status, read its guest data, map it, render `info` and run the driver's `check`, each with
//! a cap so one input stays fast. Any panic, hang or huge allocation is a bug. Included by
//! the targets with `#[path]` (each target is its own crate).

use vdisk::Image;
use vdisk::info::{ImageInfo, map_extents, write_map_json};

/// Guest bytes read per image at most.
const MAX_READ: u64 = 16 << 20;
/// Largest single read request.
const STEP: u64 = 256 << 10;
/// Extents walked per image at most.
const MAX_EXTENTS: usize = 4096;

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

/// Exercise `img`, named `name` in `info`; `map_extents` (which walks the whole disk) only
/// when the disk is at most `max_map_size` bytes.
pub fn exercise(img: &Image, name: &str, max_map_size: u64) {
    let size = img.virtual_size();
    // Block status, in bounded steps; every extent must be non-empty and inside the disk.
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
    // Guest data, every cluster of the first MAX_READ bytes.
    let end = size.min(MAX_READ);
    let mut buf = vec![0u8; STEP.min(end) as usize];
    let mut pos = 0u64;
    while pos < end {
        let len = STEP.min(end - pos) as usize;
        // A failing step is skipped; later ones may still be readable.
        let _ = img.read_at(&mut buf[..len], pos);
        pos += len as u64;
    }
    // A read that ends at the last byte, and one just past it.
    if size > 0 {
        let mut one = [0u8; 1];
        let _ = img.read_at(&mut one, size - 1);
        assert!(img.read_at(&mut one, size).is_err());
    }
    if size <= max_map_size
        && let Ok(list) = map_extents(img)
    {
        let total: u64 = list.iter().map(|e| e.len).sum();
        assert_eq!(total, size, "map does not cover the disk");
        // The streamed JSON form stops cleanly when its writer fails.
        let _ = write_map_json(img, &mut FailAfter(200));
    }
    if let Some(d) = img.driver() {
        let _ = d.check();
    }
    if let Ok(info) = ImageInfo::new(img, name) {
        let _ = info.to_json().to_string();
        let _ = info.to_human();
    }
}
