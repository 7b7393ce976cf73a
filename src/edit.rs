//! In-place edits of existing images: resize (raw and qcow2), internal snapshots (create,
//! apply, delete) and refcount repair. qcow2 edits go through [`crate::qcow2::model::Model`],
//! which never overwrites live metadata, so a crash leaves the old image or the new one.

use crate::detect::{self, Format};
use crate::error::{Error, ErrorKind, Result};
use crate::image::{Image, OpenOptions};
use crate::io::{BlockIo, FileIo};
use crate::qcow2::model::Model;
use crate::qcow2::writer::Prealloc;
use std::path::Path;
use std::sync::Arc;

/// A size change as `qemu-img resize` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeChange {
    /// Set the size.
    To(u64),
    /// Grow by this much.
    Grow(u64),
    /// Shrink by this much.
    Shrink(u64),
}

impl SizeChange {
    /// Parse `SIZE`, `+SIZE` or `-SIZE` (qemu-img suffixes).
    pub fn parse(s: &str) -> Result<SizeChange> {
        use crate::qcow2::writer::parse_qemu_size as p;
        Ok(match s.as_bytes().first() {
            Some(b'+') => SizeChange::Grow(p(&s[1..])?),
            Some(b'-') => SizeChange::Shrink(p(&s[1..])?),
            _ => SizeChange::To(p(s)?),
        })
    }

    fn apply(self, old: u64) -> Result<u64> {
        match self {
            SizeChange::To(n) => Ok(n),
            SizeChange::Grow(n) => old
                .checked_add(n)
                .ok_or_else(|| Error::invalid("size overflows")),
            SizeChange::Shrink(n) => old
                .checked_sub(n)
                .ok_or_else(|| Error::invalid("image size cannot be negative")),
        }
    }
}

fn open_rw(path: &Path, format: Option<Format>) -> Result<(Arc<FileIo>, Format)> {
    let io = FileIo::open_rw(path, false)
        .map_err(|e| Error::io("cannot open image for writing", e).with_path(path))?;
    // A running VM (or any other QEMU or vdisk user) keeps its metadata from being rewritten.
    io.lock(crate::io::LockMode::Write)
        .map_err(|e| e.with_path(path))?;
    let fmt = match format {
        Some(f) => f,
        None => {
            let size = io
                .size()
                .map_err(|e| Error::io("cannot stat image", e).with_path(path))?;
            let mut head = vec![0u8; (detect::PROBE_LEN as u64).min(size) as usize];
            io.read_exact_at(&mut head, 0)
                .map_err(|e| Error::io("cannot read image", e).with_path(path))?;
            match detect::probe(&head, None) {
                Format::Iso => Format::Raw,
                f => f,
            }
        }
    };
    Ok((Arc::new(io), fmt))
}

/// Resize the image at `path`. Shrinking needs `allow_shrink`. The new area is preallocated as
/// `prealloc` asks (raw: off, falloc, full; qcow2 also metadata); returns the mode applied.
pub fn resize(
    path: &Path,
    format: Option<Format>,
    change: SizeChange,
    allow_shrink: bool,
    prealloc: Prealloc,
) -> Result<Prealloc> {
    let (io, fmt) = open_rw(path, format)?;
    let r = match fmt {
        Format::Raw => {
            let old = io.size().map_err(|e| Error::io("cannot stat image", e))?;
            let new = change.apply(old)?;
            check_shrink(old, new, allow_shrink, prealloc).map_err(|e| e.with_path(path))?;
            if prealloc == Prealloc::Metadata {
                return Err(Error::invalid(
                    "raw images support preallocation off, falloc and full only",
                )
                .with_path(path));
            }
            io.set_size(new)
                .map_err(|e| Error::io("cannot resize", e))?;
            prealloc_range(io.as_ref(), old, new.saturating_sub(old), prealloc)
        }
        Format::Qcow2 => {
            let mut m = Model::load(io.clone())?;
            let old = m.size();
            let new = change.apply(old)?;
            check_shrink(old, new, allow_shrink, prealloc).map_err(|e| e.with_path(path))?;
            m.resize(new, prealloc != Prealloc::Off && new > old)?;
            if new > old && m.has_backing() {
                // As qemu does: where the backing file reaches into the new area it must not
                // show through, so that area reads as zeros.
                // This process already holds the image's writer locks (on `io`).
                let o = OpenOptions {
                    lock: crate::io::LockMode::Off,
                    ..OpenOptions::default()
                };
                let img = Image::open(path, &o)?;
                let backing = img.qcow2().and_then(|q| q.backing());
                if backing.is_some_and(|b| b.virtual_size() > old) {
                    let start = old / m.cluster_size() * m.cluster_size();
                    let mut head = vec![0u8; (old - start) as usize];
                    img.read_at(&mut head, start)?;
                    m.zero_grown(old, head)?;
                }
            }
            let ranges = m.commit()?;
            let mut applied = prealloc;
            for (s, l) in ranges {
                applied = prealloc_range(io.as_ref(), s, l, prealloc)?;
            }
            Ok(applied)
        }
        other => Err(Error::new(
            ErrorKind::UnsupportedFormat,
            format!("cannot resize {} images", other.name()),
        )),
    };
    r.map_err(|e| e.with_path(path))
}

/// qemu-img's checks of a size change, in its order.
fn check_shrink(old: u64, new: u64, allow_shrink: bool, prealloc: Prealloc) -> Result<()> {
    if new <= old && prealloc != Prealloc::Off {
        return Err(Error::invalid(
            "preallocation can only be used for growing images",
        ));
    }
    if new < old && !allow_shrink {
        return Err(Error::invalid(
            "use the --shrink option to perform a shrink operation",
        ));
    }
    Ok(())
}

fn prealloc_range(io: &dyn BlockIo, off: u64, len: u64, mode: Prealloc) -> Result<Prealloc> {
    if len == 0 {
        return Ok(mode);
    }
    match mode {
        Prealloc::Off | Prealloc::Metadata => Ok(mode),
        Prealloc::Falloc => match io.allocate(off, len) {
            Ok(()) => Ok(Prealloc::Falloc),
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                prealloc_range(io, off, len, Prealloc::Full)
            }
            Err(e) => Err(Error::io("cannot preallocate", e)),
        },
        Prealloc::Full => {
            crate::io::write_zeroes_by_writing(io, off, len)
                .map_err(|e| Error::io("cannot preallocate", e))?;
            Ok(Prealloc::Full)
        }
    }
}

/// What `snapshot` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotOp {
    /// Create a snapshot of the current state with this name.
    Create(String),
    /// Revert the disk to this snapshot (id or name).
    Apply(String),
    /// Delete this snapshot (id or name).
    Delete(String),
}

/// Create, apply or delete an internal snapshot of the qcow2 image at `path`.
pub fn snapshot(path: &Path, op: &SnapshotOp) -> Result<()> {
    let (io, fmt) = open_rw(path, None)?;
    if fmt != Format::Qcow2 {
        return Err(Error::new(
            ErrorKind::UnsupportedFeature,
            "only qcow2 images have internal snapshots",
        )
        .with_path(path));
    }
    let r = (|| {
        let mut m = Model::load(io)?;
        match op {
            SnapshotOp::Create(n) => m.snapshot_create(n)?,
            SnapshotOp::Apply(n) => m.snapshot_apply(n)?,
            SnapshotOp::Delete(n) => m.snapshot_delete(n)?,
        }
        m.commit().map(|_| ())
    })();
    r.map_err(|e| e.with_path(path))
}

/// Rewrite the refcount structures of the qcow2 image at `path` from its mapping metadata
/// (the repair `check -r leaks|all` performs; also clears the dirty bit).
pub fn rebuild_refcounts(path: &Path) -> Result<()> {
    let (io, fmt) = open_rw(path, Some(Format::Qcow2))?;
    debug_assert_eq!(fmt, Format::Qcow2);
    Model::load_for_repair(io)
        .and_then(|m| m.commit().map(|_| ()))
        .map_err(|e| e.with_path(path))
}

/// What `check -r` may repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Repair {
    /// Only check.
    #[default]
    None,
    /// Repair leaked clusters, only when there are no corruptions (qemu-img `-r leaks`).
    Leaks,
    /// Repair leaks and refcount corruptions (qemu-img `-r all`).
    All,
}

/// The outcome of [`check_and_repair`].
#[derive(Debug)]
pub struct CheckOutcome {
    /// The final check (after a repair, the re-check of the repaired image).
    pub checked: crate::qcow2::check::Checked,
    /// `(leaks, corruptions)` repaired, when a repair ran.
    pub repaired: Option<(u64, u64)>,
}

/// Check the image at `path` as `qemu-img check [-r leaks|all]` does: when asked and the
/// damage is repairable (no check errors; with [`Repair::Leaks`] no corruptions either), the
/// refcounts are rebuilt crash-safely and the image is checked again. Messages go to
/// `on_message`.
pub fn check_and_repair(
    path: &Path,
    format: Option<Format>,
    repair: Repair,
    on_message: &mut dyn FnMut(&str),
) -> Result<CheckOutcome> {
    check_and_repair_locked(path, format, repair, crate::io::LockMode::Read, on_message)
}

/// [`check_and_repair`] reading with the image locks of `lock` (`ForceShare` for
/// `check -U`; a repair always takes a writer's locks).
pub fn check_and_repair_locked(
    path: &Path,
    format: Option<Format>,
    repair: Repair,
    lock: crate::io::LockMode,
    on_message: &mut dyn FnMut(&str),
) -> Result<CheckOutcome> {
    use crate::qcow2::check::{Checked, check_path_locked};
    if repair != Repair::None && lock == crate::io::LockMode::ForceShare {
        return Err(Error::invalid(
            "--force-share (-U) reads only; it cannot be combined with a repair (-r)",
        ));
    }
    let checked = check_path_locked(path, format, lock, on_message)?;
    if let Checked::Other(f, r) = &checked
        && repair != Repair::None
        && r.corruptions > 0
    {
        return Err(Error::new(
            ErrorKind::UnsupportedFeature,
            format!("repairing {} images is not supported", f.name()),
        )
        .with_path(path));
    }
    let Checked::Qcow2(r) = &checked else {
        return Ok(CheckOutcome {
            checked,
            repaired: None,
        });
    };
    let all = repair == Repair::All;
    let wanted = repair != Repair::None && (r.leaks > 0 || (all && r.corruptions > 0));
    if !wanted || r.check_errors > 0 || (!all && r.corruptions > 0) {
        return Ok(CheckOutcome {
            checked,
            repaired: None,
        });
    }
    let fixed = (r.leaks, if all { r.corruptions } else { 0 });
    rebuild_refcounts(path)?;
    Ok(CheckOutcome {
        checked: check_path_locked(path, format, lock, on_message)?,
        repaired: Some(fixed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_changes() {
        assert_eq!(SizeChange::parse("+1G").unwrap(), SizeChange::Grow(1 << 30));
        assert_eq!(SizeChange::parse("-512").unwrap(), SizeChange::Shrink(512));
        assert_eq!(SizeChange::parse("10M").unwrap(), SizeChange::To(10 << 20));
        assert_eq!(
            SizeChange::Shrink(10).apply(5).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        assert!(SizeChange::parse("+x").is_err());
    }
}
