//! [`BlockIo`] over a file or device opened with `O_DIRECT` (no page cache), for targets where
//! cached writes would count against a small memory limit. Requests of any offset and length
//! are served through an aligned bounce buffer, reading the partial blocks at either end first.

use super::{BlockIo, FileIo};
use std::fs::OpenOptions;
use std::io;
use std::ops::Range;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

/// Alignment for offsets, lengths and buffer addresses (covers 512 B and 4 KiB sectors).
const ALIGN: usize = 4096;
/// Largest single request.
const PIECE: usize = 1 << 20;

/// An `O_DIRECT` file or device.
#[derive(Debug)]
pub struct DirectIo {
    inner: FileIo,
    bounce: Mutex<Vec<u8>>,
}

/// The aligned part of `v` (which has `ALIGN` spare bytes), `len` bytes long.
fn aligned(v: &mut [u8], len: usize) -> &mut [u8] {
    let skip = (ALIGN - v.as_ptr() as usize % ALIGN) % ALIGN;
    &mut v[skip..skip + len]
}

impl DirectIo {
    /// Open `path` for reading and writing with `O_DIRECT`. Fails where the filesystem does
    /// not support it (tmpfs), so callers can fall back to cached I/O.
    pub fn open(path: &Path) -> io::Result<Self> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)?;
        Ok(DirectIo {
            inner: FileIo::from_file(f)?,
            bounce: Mutex::new(vec![0u8; PIECE + 2 * ALIGN]),
        })
    }

    fn io_piece(
        &self,
        off: u64,
        len: usize,
        write: Option<&[u8]>,
        read: Option<&mut [u8]>,
    ) -> io::Result<()> {
        let a = off / ALIGN as u64 * ALIGN as u64;
        let end = off + len as u64;
        let b = end.div_ceil(ALIGN as u64) * ALIGN as u64;
        let n = (b - a) as usize;
        let mut g = self.bounce.lock().unwrap_or_else(|p| p.into_inner());
        let buf = aligned(&mut g, n);
        let head = (off - a) as usize;
        match write {
            Some(data) => {
                // Keep the bytes around the request in partial blocks at either end.
                if head != 0 || end != b {
                    if head != 0 {
                        self.inner.read_at_zero_padded(&mut buf[..ALIGN], a)?;
                    }
                    if end != b && (n > ALIGN || head == 0) {
                        self.inner
                            .read_at_zero_padded(&mut buf[n - ALIGN..], b - ALIGN as u64)?;
                    }
                }
                buf[head..head + len].copy_from_slice(data);
                self.inner.write_all_at(buf, a)
            }
            None => {
                self.inner.read_at_zero_padded(buf, a)?;
                if let Some(out) = read {
                    out.copy_from_slice(&buf[head..head + len]);
                }
                Ok(())
            }
        }
    }
}

impl BlockIo for DirectIo {
    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let size = self.size()?;
        let n = (size.saturating_sub(offset)).min(buf.len() as u64) as usize;
        let mut done = 0;
        while done < n {
            let k = (n - done).min(PIECE);
            self.io_piece(
                offset + done as u64,
                k,
                None,
                Some(&mut buf[done..done + k]),
            )?;
            done += k;
        }
        Ok(n)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let k = (buf.len() - done).min(PIECE);
            self.io_piece(offset + done as u64, k, Some(&buf[done..done + k]), None)?;
            done += k;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    fn set_size(&self, size: u64) -> io::Result<()> {
        self.inner.set_size(size)
    }

    fn is_block_device(&self) -> bool {
        self.inner.is_block_device()
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<Range<u64>>> {
        self.inner.next_data(offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.inner.is_block_device() {
            // BLKZEROOUT bypasses the page cache anyway; its fallback writes come back here.
            return self.inner.write_zeroes(offset, len);
        }
        super::write_zeroes_by_writing(self, offset, len)
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.allocate(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unaligned_requests_keep_neighbouring_bytes() {
        // Beside the sources: /tmp may be a tmpfs, which refuses O_DIRECT.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let p = dir.path().join("d");
        std::fs::write(&p, vec![7u8; 3 * ALIGN + 100]).unwrap();
        let io = match DirectIo::open(&p) {
            Ok(io) => io,
            Err(e) => {
                eprintln!("SKIP: O_DIRECT not supported on this filesystem: {e}");
                return;
            }
        };
        io.write_all_at(&[1u8; 10], 4090).unwrap();
        io.write_all_at(&[2u8; 5000], 100).unwrap();
        let got = std::fs::read(&p).unwrap();
        let mut want = vec![7u8; 3 * ALIGN + 100];
        want[4090..4100].fill(1);
        want[100..5100].fill(2);
        assert_eq!(got.len(), want.len());
        assert_eq!(got, want);
        let mut b = [0u8; 20];
        assert_eq!(io.read_at(&mut b, 5090).unwrap(), 20);
        assert_eq!(&b[..10], &[2u8; 10]);
        assert_eq!(&b[10..], &[7u8; 10]);
    }
}
