//! Image locking compatible with QEMU's file-posix driver, so vdisk and a running
//! `qemu-system`, `qemu-io` or `qemu-img` keep each other off an image both ways.
//!
//! QEMU takes open-file-description (OFD) byte-range locks, all shared (read) locks, on one
//! byte per permission: byte `100 + i` while it holds permission `i`, byte `200 + i` while it
//! refuses to share permission `i` with others. Before using permission `i` an opener checks
//! that nobody holds byte `200 + i`; before refusing to share `i`, that nobody holds byte
//! `100 + i`. The permissions, by bit: 0 consistent read, 1 write, 2 write unchanged,
//! 3 resize. Locks are tied to the open file and go away when it is closed (or the process
//! dies), so nothing is left behind.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const CONSISTENT_READ: u32 = 1 << 0;
const WRITE: u32 = 1 << 1;
const WRITE_UNCHANGED: u32 = 1 << 2;
const RESIZE: u32 = 1 << 3;
/// Permission bits QEMU locks.
const PERMS: u32 = 4;
const ALL: u32 = (1 << PERMS) - 1;

/// How an image is opened, as QEMU would declare it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LockMode {
    /// Read only, refusing writers and resizers (qemu-img's default for info, map, convert
    /// sources, compare, check).
    #[default]
    Read,
    /// Read only, sharing everything (`-U` / `--force-share`): works beside a running VM,
    /// whose writes may make what is read inconsistent.
    ForceShare,
    /// Read and write, refusing other writers and resizers (resize, snapshot, check -r,
    /// convert and create targets).
    Write,
    /// No locks at all (pipes, devices the caller owns, memory).
    Off,
}

impl LockMode {
    /// (permissions held, permissions shared with others).
    fn perms(self) -> (u32, u32) {
        match self {
            LockMode::Read => (CONSISTENT_READ, CONSISTENT_READ | WRITE_UNCHANGED),
            LockMode::ForceShare => (CONSISTENT_READ, ALL),
            LockMode::Write => (
                CONSISTENT_READ | WRITE | RESIZE,
                CONSISTENT_READ | WRITE_UNCHANGED,
            ),
            LockMode::Off => (0, ALL),
        }
    }
}

/// QEMU's name for permission bit `i`.
fn perm_name(i: u32) -> &'static str {
    match i {
        0 => "consistent read",
        1 => "write",
        2 => "write unchanged",
        _ => "resize",
    }
}

/// A lock another process holds that this open cannot go along with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// QEMU's wording: `Failed to get "write" lock` or `Failed to get shared "write" lock`.
    pub message: String,
}

fn flock(kind: libc::c_short, at: i64) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero is a valid value, the fields set below
    // make it the one-byte request wanted.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = at;
    fl.l_len = 1;
    fl
}

/// Set (`F_RDLCK`) or drop (`F_UNLCK`) our shared lock on byte `at`.
fn set(file: &File, kind: libc::c_short, at: i64) -> io::Result<()> {
    let mut fl = flock(kind, at);
    // SAFETY: fcntl on a descriptor we own, with a pointer to a live flock.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether another open file holds a lock on byte `at`.
fn held_by_other(file: &File, at: i64) -> io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK as libc::c_short, at);
    // SAFETY: as in `set`; F_OFD_GETLK only fills in `fl`.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Whether an error means the file or filesystem takes no locks (QEMU's `locking=auto` then
/// goes on without them).
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOLCK | libc::EOPNOTSUPP | libc::EBADF)
    )
}

/// Take the locks of `mode` on `file` and check that no other process's locks forbid it.
/// `Ok(Err(conflict))` when another holder is in the way (our locks are dropped again);
/// `Err` for an unexpected system error. Files that cannot be locked are used unlocked.
pub fn acquire(file: &File, mode: LockMode) -> io::Result<Result<(), Conflict>> {
    if mode == LockMode::Off {
        return Ok(Ok(()));
    }
    let (perm, shared) = mode.perms();
    let unshared = ALL & !shared;
    let bytes = (0..PERMS)
        .filter(|i| perm & (1 << i) != 0)
        .map(|i| PERM_BASE + i64::from(i))
        .chain(
            (0..PERMS)
                .filter(|i| unshared & (1 << i) != 0)
                .map(|i| SHARED_BASE + i64::from(i)),
        );
    for at in bytes {
        if let Err(e) = set(file, libc::F_RDLCK as libc::c_short, at) {
            if unsupported(&e) {
                return Ok(Ok(()));
            }
            return Err(e);
        }
    }
    for i in 0..PERMS {
        let bit = 1 << i;
        let conflict = if perm & bit != 0 && held_by_other(file, SHARED_BASE + i64::from(i))? {
            Some(format!("Failed to get \"{}\" lock", perm_name(i)))
        } else if unshared & bit != 0 && held_by_other(file, PERM_BASE + i64::from(i))? {
            Some(format!("Failed to get shared \"{}\" lock", perm_name(i)))
        } else {
            None
        };
        if let Some(message) = conflict {
            release(file);
            return Ok(Err(Conflict { message }));
        }
    }
    Ok(Ok(()))
}

/// Drop every lock byte `file` may hold.
pub fn release(file: &File) {
    for i in 0..PERMS {
        let _ = set(
            file,
            libc::F_UNLCK as libc::c_short,
            PERM_BASE + i64::from(i),
        );
        let _ = set(
            file,
            libc::F_UNLCK as libc::c_short,
            SHARED_BASE + i64::from(i),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_opens_of_one_file_exclude_as_qemu_does() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, [0u8; 4096]).unwrap();
        let writer = File::options().read(true).write(true).open(&p).unwrap();
        acquire(&writer, LockMode::Write).unwrap().unwrap();
        // A reader refuses writers: it cannot share with one.
        let reader = File::open(&p).unwrap();
        let c = acquire(&reader, LockMode::Read).unwrap().unwrap_err();
        assert_eq!(c.message, "Failed to get shared \"write\" lock");
        // -U shares everything.
        acquire(&reader, LockMode::ForceShare).unwrap().unwrap();
        // A second writer wants what the first refuses to share.
        let other = File::options().read(true).write(true).open(&p).unwrap();
        let c = acquire(&other, LockMode::Write).unwrap().unwrap_err();
        assert_eq!(c.message, "Failed to get \"write\" lock");
        drop(writer);
        acquire(&other, LockMode::Write).unwrap().unwrap();
    }
}
