//! Positional I/O under images: the [`BlockIo`] trait and its file, block-device and memory
//! implementations.
//!
//! Everything is positional and takes `&self` (like `FileExt::read_at`), so conversion workers
//! can share one handle without locking. Capabilities a backend lacks (hole discovery, punching,
//! preallocation) have correct but slow defaults, or report [`std::io::ErrorKind::Unsupported`]
//! so callers can fall back.

mod direct;
mod file;
pub mod lock;
mod mem;

pub use direct::DirectIo;
pub use file::{FileIo, enlarge_pipe, free_space};
pub use lock::LockMode;
pub use mem::MemIo;

use std::fmt::Debug;
use std::io;
use std::ops::Range;

/// Random-access bytes: a file, a block device or memory.
pub trait BlockIo: Send + Sync + Debug {
    /// Current size in bytes.
    fn size(&self) -> io::Result<u64>;

    /// Read up to `buf.len()` bytes at `offset`; returns fewer only at end of file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;

    /// Write all of `buf` at `offset`.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Make written data durable.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    /// Change the size (truncate or extend with a hole). Block devices cannot.
    fn set_size(&self, _size: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "cannot resize this target",
        ))
    }

    /// Bytes the storage really uses (a sparse file's allocated blocks), where known.
    fn allocated_bytes(&self) -> io::Result<Option<u64>> {
        Ok(None)
    }

    /// The file descriptor behind this storage, when it is a file or device (for in-kernel
    /// copies between two of them).
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    /// Copy `len` bytes at `src_off` of `self` to `dst_off` of `dst` inside the kernel
    /// (`copy_file_range`), when both are files. `Ok(false)`: not possible here, nothing was
    /// copied; the caller reads and writes instead.
    fn copy_to(&self, dst: &dyn BlockIo, src_off: u64, dst_off: u64, len: u64) -> io::Result<bool> {
        let (Some(i), Some(o)) = (self.raw_fd(), dst.raw_fd()) else {
            return Ok(false);
        };
        let (mut a, mut b, mut left) = (src_off as i64, dst_off as i64, len);
        while left > 0 {
            let n = left.min(1 << 30) as usize;
            // SAFETY: both descriptors are open for the call (owned by `self` and `dst`); the
            // offsets are plain integers the kernel updates; no memory of ours is touched.
            let r = unsafe { libc::copy_file_range(i, &mut a, o, &mut b, n, 0) };
            if r < 0 {
                let e = io::Error::last_os_error();
                // Nothing copied yet and the kernel cannot do it for these files: fall back.
                if left == len
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
                    )
                {
                    return Ok(false);
                }
                return Err(e);
            }
            if r == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "source ended during an in-kernel copy",
                ));
            }
            left -= r as u64;
        }
        Ok(true)
    }

    /// True for block devices (fixed size, no holes to discover).
    fn is_block_device(&self) -> bool {
        false
    }

    /// The first data range starting at or after `offset`, or `None` when only holes follow.
    /// Ranges may over-report data (the default says everything is data) but never hide data.
    fn next_data(&self, offset: u64) -> io::Result<Option<Range<u64>>> {
        let size = self.size()?;
        Ok((offset < size).then_some(offset..size))
    }

    /// Make `offset..offset+len` read back as zeros, deallocating where the backend can.
    /// The default writes zeros.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zeroes_by_writing(self, offset, len)
    }

    /// Keep the page cache this file occupies small during long writes: wait for writeback
    /// started by the previous call, drop the now-clean cached pages, and start writeback of
    /// the pages dirtied since. Advisory; the default does nothing.
    fn release_cache(&self) {}

    /// Reserve space for `offset..offset+len` without changing what it reads back.
    fn allocate(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "preallocation not supported",
        ))
    }

    /// Read exactly `buf.len()` bytes at `offset`; bytes past the end of the file read as zeros
    /// (as qemu's file layer does), which keeps short final clusters readable.
    fn read_at_zero_padded(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.read_at(&mut buf[done..], offset + done as u64)?;
            if n == 0 {
                buf[done..].fill(0);
                break;
            }
            done += n;
        }
        Ok(())
    }

    /// Read exactly `buf.len()` bytes at `offset`, failing at end of file.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.read_at(&mut buf[done..], offset + done as u64)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "unexpected end of file",
                ));
            }
            done += n;
        }
        Ok(())
    }
}

/// True when every byte of `b` is zero. A branch-free OR-fold: the compiler vectorises it, and
/// the blocks it is asked about (512 bytes to 4 KiB) are too short for an early exit to pay.
pub fn is_zero(b: &[u8]) -> bool {
    b.iter().fold(0u8, |a, &x| a | x) == 0
}

/// The maximal runs of `data`, cut in `block`-byte pieces (the last may be shorter), that are
/// all zeros or all not: `(range, zero)` in order.
pub fn zero_runs(data: &[u8], block: usize) -> ZeroRuns<'_> {
    ZeroRuns {
        data,
        block: block.max(1),
        at: 0,
    }
}

/// Iterator of [`zero_runs`].
#[derive(Debug, Clone)]
pub struct ZeroRuns<'a> {
    data: &'a [u8],
    block: usize,
    at: usize,
}

impl Iterator for ZeroRuns<'_> {
    type Item = (std::ops::Range<usize>, bool);

    fn next(&mut self) -> Option<Self::Item> {
        let (d, b, i) = (self.data, self.block, self.at);
        if i >= d.len() {
            return None;
        }
        let piece = |k: usize| is_zero(&d[k..(k + b).min(d.len())]);
        let zero = piece(i);
        let mut j = (i + b).min(d.len());
        while j < d.len() && piece(j) == zero {
            j = (j + b).min(d.len());
        }
        self.at = j;
        Some((i..j, zero))
    }
}

/// Zero `offset..offset+len` by writing a zero buffer, in bounded pieces.
pub fn write_zeroes_by_writing<T: BlockIo + ?Sized>(
    io: &T,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    const PIECE: u64 = 1 << 20;
    let zeros = vec![0u8; PIECE.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = PIECE.min(len - done);
        io.write_all_at(&zeros[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_runs_cover_the_data_in_order() {
        let mut d = vec![0u8; 10 * 4096 + 100];
        d[4096 * 2 + 7] = 1; // block 2
        d[4096 * 3] = 1; // block 3
        d[10 * 4096 + 99] = 5; // the short tail
        let runs: Vec<_> = zero_runs(&d, 4096).collect();
        assert_eq!(
            runs,
            vec![
                (0..8192, true),
                (8192..16384, false),
                (16384..40960, true),
                (40960..41060, false)
            ]
        );
        assert_eq!(zero_runs(&[], 4096).count(), 0);
        assert_eq!(
            zero_runs(&[0; 10], 4096).collect::<Vec<_>>(),
            vec![(0..10, true)]
        );
        assert!(is_zero(&[0; 513]) && !is_zero(&[0, 0, 1]));
    }
}
