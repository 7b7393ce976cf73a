//! [`BlockIo`] over a regular file or a block device: `pread`/`pwrite`, hole discovery with
//! `SEEK_DATA`/`SEEK_HOLE`, `fallocate` for punching, zeroing and reserving, and the block-device
//! ioctls for size and zeroing. This file holds the crate's OS-level `unsafe`.

use super::{BlockIo, write_zeroes_by_writing};
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Mutex;

/// `BLKGETSIZE64` = `_IOR(0x12, 114, u64)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `BLKZEROOUT` = `_IO(0x12, 127)`: takes `u64[2]` = {start, length}.
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// A regular file or a block device.
#[derive(Debug)]
pub struct FileIo {
    file: File,
    block_device: bool,
    /// Fixed size of a block device or of a file opened read-only (asked each time otherwise).
    fixed_size: Option<u64>,
    /// For read-only files, the last hole/data answer `(query, data_start, data_end)`: bytes
    /// `query..data_start` are a hole and `data_start..data_end` data. Saves the two `lseek`s
    /// per extent that dominate block-status queries on large files.
    last_extent: Option<Mutex<(u64, u64, u64)>>,
}

impl FileIo {
    /// Open `path` read-only.
    pub fn open(path: &Path) -> io::Result<Self> {
        let mut io = Self::from_file(File::open(path)?)?;
        if !io.block_device {
            io.fixed_size = Some(io.file.metadata()?.len());
            io.last_extent = Some(Mutex::new((0, 0, 0)));
        }
        Ok(io)
    }

    /// Open `path` for reading and writing; `create` makes a missing regular file (mode 0644
    /// before the umask). Never truncates.
    pub fn open_rw(path: &Path, create: bool) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .mode(0o644)
            .open(path)?;
        Self::from_file(file)
    }

    /// Wrap an open file.
    pub fn from_file(file: File) -> io::Result<Self> {
        let block_device = file.metadata()?.file_type().is_block_device();
        let fixed_size = if block_device {
            Some(block_device_size(&file)?)
        } else {
            None
        };
        Ok(FileIo {
            file,
            block_device,
            fixed_size,
            last_extent: None,
        })
    }

    /// Take QEMU-compatible image locks for `mode` ([`super::lock`]); a conflict with another
    /// holder is an [`crate::ErrorKind::Locked`] error in QEMU's words.
    pub fn lock(&self, mode: super::LockMode) -> crate::Result<()> {
        use crate::error::{Error, ErrorKind};
        match super::lock::acquire(&self.file, mode) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(c)) => Err(Error::new(
                ErrorKind::Locked,
                format!("{}: is another process using the image?", c.message),
            )),
            Err(e) => Err(Error::io("cannot lock the image", e)),
        }
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: lseek on a file descriptor we own; it touches no memory of ours.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(r as u64))
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let len =
            libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: fallocate on a file descriptor we own; no memory is passed.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
        if r < 0 {
            Err(unsupported_if_not_supported(io::Error::last_os_error()))
        } else {
            Ok(())
        }
    }
}

/// Map "the kernel or filesystem cannot do this" errnos to `Unsupported`, so callers fall back.
fn unsupported_if_not_supported(e: io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::ENOTTY | libc::ENODEV | libc::EINVAL) => {
            io::Error::new(io::ErrorKind::Unsupported, e)
        }
        _ => e,
    }
}

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at a live local.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(size)
    }
}

impl BlockIo for FileIo {
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.file.as_raw_fd())
    }

    fn release_cache(&self) {
        let fd = self.file.as_raw_fd();
        // SAFETY: `fd` is the open descriptor owned by `self.file` for the whole call; these
        // calls only give the kernel advice about its cached pages and cannot touch memory.
        unsafe {
            libc::sync_file_range(fd, 0, 0, libc::SYNC_FILE_RANGE_WAIT_BEFORE);
            libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED);
            libc::sync_file_range(fd, 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
    }

    fn size(&self) -> io::Result<u64> {
        match self.fixed_size {
            Some(s) => Ok(s),
            None => Ok(self.file.metadata()?.len()),
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn set_size(&self, size: u64) -> io::Result<()> {
        if self.fixed_size.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a block device cannot be resized",
            ));
        }
        self.file.set_len(size)
    }

    fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// `st_blocks * 512`, qemu-img's "disk size".
    fn allocated_bytes(&self) -> io::Result<Option<u64>> {
        use std::os::unix::fs::MetadataExt;
        Ok(Some(self.file.metadata()?.blocks() * 512))
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<Range<u64>>> {
        let size = self.size()?;
        if offset >= size {
            return Ok(None);
        }
        if self.block_device {
            return Ok(Some(offset..size));
        }
        if let Some(cache) = &self.last_extent {
            let (q, s, e) = *cache.lock().unwrap_or_else(|p| p.into_inner());
            if q <= offset && offset < e {
                return Ok(Some(s.max(offset)..e));
            }
        }
        let start = match self.seek(offset, libc::SEEK_DATA) {
            Ok(Some(s)) => s,
            Ok(None) => return Ok(None),
            // Filesystems without SEEK_DATA: everything is data.
            Err(_) => return Ok(Some(offset..size)),
        };
        let end = self.seek(start, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        if let Some(cache) = &self.last_extent {
            *cache.lock().unwrap_or_else(|p| p.into_inner()) = (offset, start, end);
        }
        Ok((start < end).then_some(start..end))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if self.block_device {
            let range = [offset, len];
            // SAFETY: BLKZEROOUT reads a `u64[2]` through the pointer, which points at a live
            // local array of exactly that layout.
            let r = unsafe { libc::ioctl(self.file.as_raw_fd(), BLKZEROOUT, range.as_ptr()) };
            if r == 0 {
                return Ok(());
            }
            return write_zeroes_by_writing(self, offset, len);
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match self.fallocate(mode, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                match self.fallocate(
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                ) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                        write_zeroes_by_writing(self, offset, len)
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.block_device {
            return Ok(());
        }
        self.fallocate(0, offset, len)
    }
}

/// Bytes available to an unprivileged user on the filesystem holding `path` (`statvfs`:
/// `f_bavail * f_frsize`), as CDI measures a filesystem volume.
pub fn free_space(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path that outlives the call; `st` is a live, writable
    // statvfs the kernel fills in.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::useless_conversion)] // the field types differ between targets
    let (avail, frsize) = (u64::from(st.f_bavail), u64::from(st.f_frsize));
    Ok(avail.saturating_mul(frsize))
}

/// Grow the kernel buffer of the pipe on `fd` (when it is one) to `bytes`, so a producer and a
/// consumer switch less often: 64 KiB pipes cost more in context switches than in copying.
/// Errors (not a pipe, over the system limit) are ignored: this is only an optimisation.
pub fn enlarge_pipe(fd: &impl AsRawFd, bytes: usize) {
    let Ok(n) = libc::c_int::try_from(bytes) else {
        return;
    };
    // SAFETY: F_SETPIPE_SZ takes an int and touches no memory of ours; a bad fd just fails.
    let _ = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, n) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_are_found_and_punched() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = FileIo::open_rw(&p, true).unwrap();
        f.set_size(8 << 20).unwrap();
        f.write_all_at(&[1u8; 65536], 4 << 20).unwrap();
        let r = f.next_data(0).unwrap().unwrap();
        assert!(r.start <= 4 << 20 && r.end >= (4 << 20) + 65536, "{r:?}");
        f.write_zeroes(4 << 20, 65536).unwrap();
        let mut b = [9u8; 16];
        f.read_at_zero_padded(&mut b, 4 << 20).unwrap();
        assert_eq!(b, [0u8; 16]);
        assert_eq!(f.size().unwrap(), 8 << 20);
        assert!(!f.is_block_device());
    }
}
