//! Unpacking tar archives into a directory safely (CDI's `archive` content type): no absolute
//! paths, no `..`, no links that point outside the target, no device nodes or FIFOs, total size
//! bounded by the space available. GNU sparse entries stay sparse.

use crate::error::{Error, ErrorKind, Result};
use crate::stream::Stream;
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

/// Unpack the tar in `src` into `dir`, writing at most `limit` bytes of file data; `tick` is
/// called between entries (progress, cancellation). Returns the bytes of file data written.
pub fn unpack(
    src: Stream<'_>,
    dir: &Path,
    limit: u64,
    tick: &mut dyn FnMut() -> Result<()>,
) -> Result<u64> {
    let mut ar = tar::Archive::new(src);
    ar.set_preserve_permissions(true);
    ar.set_overwrite(true);
    let mut total = 0u64;
    for entry in ar.entries().map_err(|e| Error::io("cannot read tar", e))? {
        tick()?;
        let mut entry = entry.map_err(|e| Error::io("cannot read tar entry", e))?;
        let raw = entry
            .path()
            .map_err(|e| Error::io("bad tar entry name", e))?
            .into_owned();
        let rel = safe_relative(&raw)?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        let kind = entry.header().entry_type();
        if kind.is_symlink() || kind.is_hard_link() {
            let target = entry
                .link_name()
                .map_err(|e| Error::io("bad link name", e))?
                .ok_or_else(|| Error::corrupt(format!("link '{}' has no target", raw.display())))?;
            let ok = if kind.is_symlink() {
                link_stays_inside(&rel, &target)
            } else {
                safe_relative(&target).is_ok()
            };
            if !ok {
                return Err(Error::new(
                    ErrorKind::Denied,
                    format!(
                        "archive link '{}' -> '{}' points outside the target directory",
                        raw.display(),
                        target.display()
                    ),
                ));
            }
        } else if !(kind.is_file()
            || kind.is_dir()
            || kind.is_gnu_sparse()
            || kind == tar::EntryType::Continuous)
        {
            if kind.is_pax_global_extensions()
                || kind.is_pax_local_extensions()
                || kind.is_gnu_longname()
                || kind.is_gnu_longlink()
            {
                continue;
            }
            return Err(Error::new(
                ErrorKind::Denied,
                format!(
                    "archive entry '{}' is a device, FIFO or unknown type; refused",
                    raw.display()
                ),
            ));
        }
        let size = entry.header().size().unwrap_or(0);
        total = total.saturating_add(size);
        if total > limit {
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!("archive content is larger than the available storage {limit}"),
            ));
        }
        // Parent directories must not be links leading outside: unpack_in re-checks.
        let ok = entry
            .unpack_in(dir)
            .map_err(|e| Error::io(format!("cannot unpack '{}'", raw.display()), e))?;
        if !ok {
            return Err(Error::new(
                ErrorKind::Denied,
                format!(
                    "archive entry '{}' escapes the target directory",
                    raw.display()
                ),
            ));
        }
    }
    Ok(total)
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
