//! `qemu-img bench`: a fixed number of equal requests against an image, `depth` of them in
//! flight, timed. Reads go through the image's format (any readable one); writes are for raw
//! images, written in place.

use crate::error::{Error, ErrorKind, Result};
use crate::image::Image;
use crate::io::BlockIo;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Largest request (each worker thread holds one buffer of it).
pub const MAX_BUFFER: u64 = 64 << 20;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Requests in all (qemu-img's default 75000).
    pub count: u64,
    /// Requests in flight at once (default 64).
    pub depth: u32,
    /// Bytes per request (default 4096).
    pub buffer_size: u64,
    /// First request's offset.
    pub offset: u64,
    /// Distance between the starts of consecutive requests (default: the buffer size).
    pub step: u64,
    /// Write instead of read.
    pub write: bool,
    /// Byte written (with `write`).
    pub pattern: u8,
    /// Flush after this many writes (0: never).
    pub flush_interval: u64,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            count: 75000,
            depth: 64,
            buffer_size: 4096,
            offset: 0,
            step: 4096,
            write: false,
            pattern: 0,
            flush_interval: 0,
        }
    }
}

/// The offset of request `i`: requests advance by `step` and start over at `offset` when one
/// would run past the end of a disk of `size` bytes.
fn request_offset(o: &BenchOptions, size: u64, i: u64) -> u64 {
    let room = size.saturating_sub(o.offset).saturating_sub(o.buffer_size);
    let per_lap = room.checked_div(o.step).map_or(u64::MAX, |n| n + 1);
    o.offset + (i % per_lap) * o.step
}

/// Run the benchmark on `img` (reads), or on `target` (writes; the raw image's file opened
/// for writing). Returns the wall time.
pub fn run(img: &Image, target: Option<&dyn BlockIo>, o: &BenchOptions) -> Result<Duration> {
    let size = img.virtual_size();
    if o.buffer_size == 0 || o.depth == 0 {
        return Err(Error::invalid("buffer size and depth must be at least 1"));
    }
    // Each thread holds one buffer.
    if o.buffer_size > MAX_BUFFER {
        return Err(Error::new(
            ErrorKind::TooLarge,
            format!(
                "buffer size {} exceeds the {MAX_BUFFER}-byte limit",
                o.buffer_size
            ),
        ));
    }
    if o.offset.checked_add(o.buffer_size).is_none_or(|e| e > size) {
        return Err(Error::invalid(format!(
            "requests of {} bytes from offset {} do not fit in the image ({size} bytes)",
            o.buffer_size, o.offset
        )));
    }
    if o.write && target.is_none() {
        return Err(Error::new(
            ErrorKind::UnsupportedFeature,
            "write benchmarks are supported for raw images only",
        ));
    }
    let threads = (o.depth as usize).min(
        std::thread::available_parallelism()
            .map(|n| n.get() * 4)
            .unwrap_or(4),
    );
    let next = AtomicU64::new(0);
    let written = AtomicU64::new(0);
    let t0 = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let mut buf = vec![o.pattern; o.buffer_size as usize];
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= o.count {
                            return Ok(());
                        }
                        let at = request_offset(o, size, i);
                        match target {
                            Some(t) if o.write => {
                                t.write_all_at(&buf, at)
                                    .map_err(|e| Error::io("write failed", e))?;
                                let n = written.fetch_add(1, Ordering::Relaxed) + 1;
                                if o.flush_interval > 0 && n % o.flush_interval == 0 {
                                    t.flush().map_err(|e| Error::io("flush failed", e))?;
                                }
                            }
                            _ => img.read_at(&mut buf, at)?,
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| Error::new(ErrorKind::Io, "a benchmark thread panicked"))??;
        }
        Ok(())
    })?;
    if let Some(t) = target.filter(|_| o.write) {
        t.flush().map_err(|e| Error::io("flush failed", e))?;
    }
    Ok(t0.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_wrap_at_the_end() {
        let o = BenchOptions {
            offset: 1024,
            buffer_size: 4096,
            step: 4096,
            ..BenchOptions::default()
        };
        // 1024 + 4096 * k + 4096 <= 16384: k = 0, 1, 2 fit; the fourth starts over.
        let at: Vec<u64> = (0..5).map(|i| request_offset(&o, 16384, i)).collect();
        assert_eq!(at, [1024, 5120, 9216, 1024, 5120]);
        let same = BenchOptions {
            step: 0,
            ..BenchOptions::default()
        };
        assert_eq!(request_offset(&same, 16384, 7), 0);
    }
}
