//! Unpacking tar archives into a directory safely (CDI's `archive` content type): no absolute
//! paths, no `..`, no links that point outside the target, no writes through links that lead
//! outside it, no device nodes or FIFOs, total size bounded by the space available. Sparse
//! entries stay sparse: only their data segments are written.
//!
//! Owns the unpacking policy; the tar format itself is read by [`tar::TarReader`], the one
//! bounded reader every untrusted tar goes through.

pub mod tar;

use self::tar::{Entry, EntryKind, TarReader};
use crate::error::{Error, ErrorKind, Result};
use crate::stream::Stream;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{FileExt as _, PermissionsExt as _};
use std::path::{Component, Path, PathBuf};

/// A path inside the archive, as a relative path with only normal components.
fn safe_relative(p: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(Error::new(
                    ErrorKind::Denied,
                    format!(
                        "archive entry '{}' escapes the target directory",
                        p.display()
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// True when `target`, seen from the directory of `entry` (both relative to the root), stays
/// inside the root.
fn link_stays_inside(entry: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth: i64 = entry.parent().map_or(0, |p| p.components().count() as i64);
    for c in target.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => return false,
        }
    }
    true
}

/// Directories whose permissions are set at the end (so a read-only directory can still be
/// filled first); past this many, they are set at once.
const MAX_DEFERRED_DIRS: usize = 65_536;

fn denied(msg: String) -> Error {
    Error::new(ErrorKind::Denied, msg)
}

fn escapes(raw: &Path) -> Error {
    denied(format!(
        "archive entry '{}' escapes the target directory",
        raw.display()
    ))
}

/// Make sure the directories of `rel` exist under `root` (canonical), never passing through a
/// link that leads outside it; returns the real path of the innermost one.
fn ensure_dirs(root: &Path, rel: &Path, raw: &Path) -> Result<PathBuf> {
    let mut cur = root.to_path_buf();
    for c in rel.components() {
        let next = cur.join(c);
        match fs::symlink_metadata(&next) {
            Ok(m) if m.is_dir() => cur = next,
            Ok(m) if m.file_type().is_symlink() => {
                let real = fs::canonicalize(&next)
                    .map_err(|e| Error::io(format!("cannot resolve '{}'", next.display()), e))?;
                if !real.starts_with(root) || !real.is_dir() {
                    return Err(escapes(raw));
                }
                cur = real;
            }
            Ok(_) => {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!(
                        "archive entry '{}' needs '{}' to be a directory",
                        raw.display(),
                        next.display()
                    ),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(&next).map_err(|e| {
                    Error::io(format!("cannot create directory '{}'", next.display()), e)
                })?;
                cur = next;
            }
            Err(e) => return Err(Error::io(format!("cannot stat '{}'", next.display()), e)),
        }
    }
    Ok(cur)
}

/// Remove whatever non-directory is at `p` (overwriting an earlier entry).
fn clear(p: &Path) -> Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => Err(Error::new(
            ErrorKind::Corrupt,
            format!("archive entry '{}' would replace a directory", p.display()),
        )),
        Ok(_) => fs::remove_file(p)
            .map_err(|e| Error::io(format!("cannot replace '{}'", p.display()), e)),
        Err(_) => Ok(()),
    }
}

/// Write the current entry of `ar` (a regular file) to a new file at `dest`.
fn write_file<R: Read>(ar: &mut TarReader<R>, e: &Entry, dest: &Path) -> Result<()> {
    clear(dest)?;
    let f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .map_err(|err| Error::io(format!("cannot create '{}'", dest.display()), err))?;
    let werr = |err| Error::io(format!("cannot write '{}'", dest.display()), err);
    let rerr = |err: io::Error| {
        let kind = if err.kind() == io::ErrorKind::UnexpectedEof {
            ErrorKind::Corrupt
        } else {
            ErrorKind::Io
        };
        Error::new(
            kind,
            format!("cannot read archive entry '{}': {err}", e.path),
        )
    };
    let mut buf = vec![0u8; 128 << 10];
    loop {
        // Holes of a sparse entry are skipped, not written.
        let pos = ar.skip_hole();
        let n = match ar.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(rerr(err)),
        };
        f.write_all_at(&buf[..n], pos).map_err(werr)?;
    }
    f.set_len(e.size).map_err(werr)?;
    f.set_permissions(fs::Permissions::from_mode(e.mode))
        .map_err(|err| Error::io(format!("cannot set the mode of '{}'", dest.display()), err))?;
    let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_secs(e.mtime.min(1 << 40));
    // Times are cosmetic: a filesystem that refuses them is no reason to fail.
    let _ = f.set_modified(mtime);
    Ok(())
}

/// Unpack the tar in `src` into `dir`, writing at most `limit` bytes of file data; `tick` is
/// called between entries (progress, cancellation). Returns the bytes of file data written.
pub fn unpack(
    src: Stream<'_>,
    dir: &Path,
    limit: u64,
    tick: &mut dyn FnMut() -> Result<()>,
) -> Result<u64> {
    let root = fs::canonicalize(dir)
        .map_err(|e| Error::io("cannot open the target directory", e).with_path(dir))?;
    let mut ar = TarReader::new(src);
    let mut total = 0u64;
    let mut dirs: Vec<(PathBuf, u32)> = Vec::new();
    while let Some(e) = ar.next_entry()? {
        tick()?;
        let raw = PathBuf::from(OsStr::from_bytes(e.raw_path()));
        let rel = safe_relative(&raw)?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let link = e.raw_link().map(|l| PathBuf::from(OsStr::from_bytes(l)));
        match e.kind {
            EntryKind::File | EntryKind::Dir => {}
            EntryKind::Symlink | EntryKind::HardLink => {
                let target = link.as_deref().ok_or_else(|| {
                    Error::corrupt(format!("link '{}' has no target", raw.display()))
                })?;
                let ok = if e.kind == EntryKind::Symlink {
                    link_stays_inside(&rel, target)
                } else {
                    safe_relative(target).is_ok_and(|t| !t.as_os_str().is_empty())
                };
                if !ok {
                    return Err(denied(format!(
                        "archive link '{}' -> '{}' points outside the target directory",
                        raw.display(),
                        target.display()
                    )));
                }
            }
            _ => {
                return Err(denied(format!(
                    "archive entry '{}' is a {}; refused",
                    raw.display(),
                    e.kind.describe()
                )));
            }
        }
        if e.kind == EntryKind::File {
            total = total.saturating_add(e.data_size);
            if total > limit {
                return Err(Error::new(
                    ErrorKind::NoSpace,
                    format!("archive content is larger than the available storage {limit}"),
                ));
            }
        }
        let parent = ensure_dirs(&root, rel.parent().unwrap_or(Path::new("")), &raw)?;
        let Some(base) = rel.file_name() else {
            return Err(escapes(&raw));
        };
        let dest = parent.join(base);
        match e.kind {
            EntryKind::File => write_file(&mut ar, &e, &dest)?,
            EntryKind::Dir => {
                let real = ensure_dirs(&root, &rel, &raw)?;
                if dirs.len() < MAX_DEFERRED_DIRS {
                    dirs.push((real, e.mode));
                } else {
                    set_dir_mode(&real, e.mode)?;
                }
            }
            EntryKind::Symlink => {
                clear(&dest)?;
                let target = link.as_deref().unwrap_or(Path::new(""));
                std::os::unix::fs::symlink(target, &dest).map_err(|err| {
                    Error::io(format!("cannot create link '{}'", raw.display()), err)
                })?;
            }
            _ => {
                // A hard link: its target must be an earlier entry, reached without leaving.
                let target = safe_relative(link.as_deref().unwrap_or(Path::new("")))?;
                let tparent = target.parent().unwrap_or(Path::new(""));
                let treal = fs::canonicalize(root.join(tparent)).map_err(|err| {
                    Error::io(format!("cannot resolve link '{}'", raw.display()), err)
                })?;
                if !treal.starts_with(&root) {
                    return Err(escapes(&raw));
                }
                let src = treal.join(target.file_name().unwrap_or_default());
                clear(&dest)?;
                fs::hard_link(&src, &dest).map_err(|err| {
                    Error::io(format!("cannot create hard link '{}'", raw.display()), err)
                })?;
            }
        }
    }
    // Innermost first, so a read-only parent is set after its children.
    for (d, mode) in dirs.iter().rev() {
        set_dir_mode(d, *mode)?;
    }
    Ok(total)
}

fn set_dir_mode(d: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(d, fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io(format!("cannot set the mode of '{}'", d.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_rules() {
        assert!(safe_relative(Path::new("a/b/c")).is_ok());
        assert!(safe_relative(Path::new("./a")).is_ok());
        assert!(safe_relative(Path::new("/etc/passwd")).is_err());
        assert!(safe_relative(Path::new("a/../../x")).is_err());
        assert!(link_stays_inside(Path::new("a/b/link"), Path::new("../c")));
        assert!(link_stays_inside(Path::new("a/link"), Path::new("../c")));
        assert!(!link_stays_inside(Path::new("link"), Path::new("../c")));
        assert!(!link_stays_inside(Path::new("a/link"), Path::new("/etc")));
        assert!(!link_stays_inside(
            Path::new("a/link"),
            Path::new("../../c")
        ));
    }
}
