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

/// Resolve `name` (stored in the image at `image`) as QEMU does: relative to the image's
/// directory.
fn beside(image: &Path, name: &str) -> std::path::PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new("")).join(p)
    }
}

/// The image at `path` as the reader sees it, for an edit that holds its writer's locks
/// already (on another descriptor of the same file).
fn view(path: &Path, format: Format) -> Result<Image> {
    Image::open(
        path,
        &OpenOptions {
            format: Some(format),
            lock: crate::io::LockMode::Off,
            ..OpenOptions::default()
        },
    )
}

/// Progress callback of the edits: `(done, total)` guest bytes.
pub type EditProgress<'a> = &'a mut dyn FnMut(u64, u64);

/// `qemu-img rebase`: make the qcow2 image at `path` use `backing` (format `backing_format`;
/// None: no backing file) instead of its current one. Unless `unsafe_names_only`, every cluster
/// the image does not hold itself and whose content would change with the new backing file is
/// first copied into the image from the old chain, so the guest sees the same disk. The new
/// name is stored as given; it is opened relative to the image's directory.
pub fn rebase(
    path: &Path,
    format: Option<Format>,
    backing: Option<(&str, Option<Format>)>,
    unsafe_names_only: bool,
    progress: EditProgress<'_>,
) -> Result<()> {
    let (io, fmt) = open_rw(path, format)?;
    if fmt != Format::Qcow2 {
        return Err(Error::new(
            ErrorKind::UnsupportedFeature,
            format!(
                "Could not change the backing file: {} images have no backing file",
                fmt.name()
            ),
        )
        .with_path(path));
    }
    let stored = backing.map(|(name, f)| (name.to_string(), f.map(|f| f.name().to_string())));
    if let Some((name, None)) = &stored {
        return Err(Error::invalid(format!(
            "Could not change the backing file to '{name}': backing format must be specified"
        ))
        .with_path(path));
    }
    let r = (|| {
        let mut m = Model::load(io.clone())?;
        if !unsafe_names_only {
            let old = view(path, Format::Qcow2)?;
            let new = match backing {
                Some((name, f)) => {
                    let p = beside(path, name);
                    let o = OpenOptions {
                        format: f,
                        ..OpenOptions::default()
                    };
                    Some(Image::open(&p, &o).map_err(|e| {
                        Error::new(
                            e.kind(),
                            format!("Could not open new backing file '{name}': {e}"),
                        )
                    })?)
                }
                None => None,
            };
            copy_what_the_backing_changes(&mut m, &old, new.as_ref(), progress)?;
        }
        m.set_backing(stored)?;
        m.commit().map(|_| ())
    })();
    r.map_err(|e| e.with_path(path))
}

/// For `rebase`: write into `m` (the image `old` shows, with its chain) every cluster whose
/// guest content would change when the parts the image does not hold itself came from `new`
/// (or zeros) instead of `old`'s chain. The data lands at [`Model::commit`].
pub fn copy_what_the_backing_changes(
    m: &mut Model,
    old: &Image,
    new: Option<&Image>,
    progress: EditProgress<'_>,
) -> Result<()> {
    let cs = m.cluster_size();
    let size = m.size();
    let new_size = new.map_or(0, |n| n.virtual_size());
    let mut have = vec![0u8; cs as usize];
    let mut other = vec![0u8; cs as usize];
    let mut g = 0u64;
    while g * cs < size {
        let start = g * cs;
        let end = (start + cs).min(size);
        // The parts of this cluster the image does not hold itself, and whether the old
        // chain and the new backing file are known to read as zeros there.
        let mut below = Vec::new();
        let mut pos = start;
        let mut all_own = true;
        while pos < end {
            // From a cluster's start, look as far as the status runs (whole clusters the
            // image holds itself are skipped in one step).
            let mut e = old.extent(pos, if pos == start { size - pos } else { end - pos })?;
            if e.depth == 0 && e.present {
                if pos == start && e.len >= cs {
                    pos = start + e.len / cs * cs;
                    break;
                }
            } else {
                all_own = false;
            }
            e.len = e.len.min(end - pos);
            if !(e.depth == 0 && e.present) {
                below.push((pos, e.len, e.zero));
            }
            pos += e.len;
        }
        if all_own {
            g = pos.div_ceil(cs).max(g + 1);
            progress(g * cs, size);
            continue;
        }
        let mut differs = false;
        for &(off, len, old_zero) in &below {
            let new_zero = match new {
                None => true,
                Some(_) if off >= new_size => true,
                Some(n) => {
                    let e = n.extent(off, (len).min(new_size - off))?;
                    e.zero && e.len >= len
                }
            };
            if old_zero && new_zero {
                continue;
            }
            let a = &mut have[..len as usize];
            old.read_at(a, off)?;
            let b = &mut other[..len as usize];
            b.fill(0);
            if let Some(n) = new {
                let upto = new_size.min(off + len);
                if upto > off {
                    n.read_at(&mut b[..(upto - off) as usize], off)?;
                }
            }
            if a != b {
                differs = true;
                break;
            }
        }
        if differs {
            let buf = &mut have[..(end - start) as usize];
            old.read_at(buf, start)?;
            m.write_cluster(g, buf)?;
        }
        g += 1;
        progress(g * cs, size);
    }
    progress(size, size);
    Ok(())
}

/// `qemu-img commit`: write what the image at `path` holds above `base` (default: its
/// backing file) into `base`, growing `base` when smaller, then (unless `keep`, and only when
/// `base` is the immediate backing file) empty the image so it reads everything from below.
/// A qcow2 base takes the data crash-safely (new clusters, then one header write); a raw base
/// is written in place. Returns the base's path.
pub fn commit(
    path: &Path,
    format: Option<Format>,
    base: Option<&Path>,
    keep: bool,
    progress: EditProgress<'_>,
) -> Result<std::path::PathBuf> {
    let (io, fmt) = open_rw(path, format)?;
    if fmt != Format::Qcow2 {
        return Err(Error::new(
            ErrorKind::UnsupportedFeature,
            format!("Image '{}' has no backing file", path.display()),
        ));
    }
    let top = view(path, Format::Qcow2)?;
    // The chain below the image: (depth, path, image).
    let mut chain: Vec<(u32, std::path::PathBuf, &Image)> = Vec::new();
    let mut cur = top.qcow2().and_then(|q| q.backing());
    let mut depth = 1;
    while let Some(i) = cur {
        let p = i.path().map(Path::to_path_buf).unwrap_or_default();
        chain.push((depth, p, i));
        cur = i.qcow2().and_then(|q| q.backing());
        depth += 1;
    }
    let Some(first) = chain.first() else {
        return Err(Error::invalid("Image does not have a backing file").with_path(path));
    };
    let (base_depth, base_path, base_img) = match base {
        None => first.clone(),
        Some(b) => chain
            .iter()
            .find(|(_, p, _)| same_file(p, b))
            .cloned()
            .ok_or_else(|| {
                Error::invalid(format!(
                    "Did not find '{}' in the backing chain of '{}'",
                    b.display(),
                    path.display()
                ))
            })?,
    };
    let base_fmt = base_img.format();
    let size = top.virtual_size();
    let (bio, _) = open_rw(&base_path, Some(base_fmt))?;
    let r = (|| -> Result<()> {
        match base_fmt {
            Format::Raw => {
                let len = bio.size().map_err(|e| Error::io("cannot stat base", e))?;
                if len < size {
                    bio.set_size(size)
                        .map_err(|e| Error::io("cannot grow base", e))?;
                }
                let mut buf = vec![0u8; 1 << 20];
                let mut pos = 0;
                while pos < size {
                    let e = top.extent(pos, (size - pos).min(1 << 20))?;
                    if e.present && e.depth < base_depth {
                        if e.zero {
                            bio.write_zeroes(pos, e.len)
                                .map_err(|e| Error::io("cannot write base", e))?;
                        } else {
                            let b = &mut buf[..e.len as usize];
                            top.read_at(b, pos)?;
                            bio.write_all_at(b, pos)
                                .map_err(|e| Error::io("cannot write base", e))?;
                        }
                    }
                    pos += e.len;
                    progress(pos, size);
                }
                bio.flush().map_err(|e| Error::io("cannot flush base", e))?;
                Ok(())
            }
            Format::Qcow2 => {
                let mut m = Model::load(bio.clone())?;
                commit_into(&mut m, &top, base_depth, progress)?;
                m.commit().map(|_| ())
            }
            other => Err(Error::new(
                ErrorKind::UnsupportedFormat,
                format!("cannot commit into {} images", other.name()),
            )),
        }
    })();
    r.map_err(|e| e.with_path(&base_path))?;
    progress(size, size);
    // Emptying the image is only safe when the base is right below it.
    if !keep && base_depth == 1 {
        drop(top);
        let mut m = Model::load(io).map_err(|e| e.with_path(path))?;
        m.make_empty().map_err(|e| e.with_path(path))?;
        m.commit().map_err(|e| e.with_path(path))?;
    }
    Ok(base_path)
}

/// For `commit` into a qcow2 base: write into `m` (the base, `base_depth` levels below `top`)
/// every base cluster that anything above the base holds part of, as `top` reads it (zeros as
/// zero clusters), growing the base to `top`'s size. The data lands at [`Model::commit`].
pub fn commit_into(
    m: &mut Model,
    top: &Image,
    base_depth: u32,
    progress: EditProgress<'_>,
) -> Result<()> {
    let size = top.virtual_size();
    if m.size() < size {
        m.resize(size.next_multiple_of(512), false)?;
    }
    let cs = m.cluster_size();
    let mut buf = vec![0u8; cs as usize];
    let mut g = 0u64;
    while g * cs < size {
        let (start, end) = (g * cs, ((g + 1) * cs).min(size));
        // Does anything above the base hold part of this base cluster?
        let (mut pos, mut above, mut all_zero) = (start, false, true);
        while pos < end {
            // From a cluster's start, look as far as the status runs (whole clusters with
            // nothing above the base are skipped in one step).
            let mut e = top.extent(pos, if pos == start { size - pos } else { end - pos })?;
            let mine = e.present && e.depth < base_depth;
            if pos == start && e.len >= cs && !mine {
                pos = start + e.len / cs * cs;
                break;
            }
            e.len = e.len.min(end - pos);
            above |= mine;
            all_zero &= e.zero;
            pos += e.len;
        }
        if !above {
            g = pos.div_ceil(cs).max(g + 1);
            progress((g * cs).min(size), size);
            continue;
        }
        if all_zero && m.version() >= 3 {
            m.zero_cluster(g)?;
        } else {
            let b = &mut buf[..(end - start) as usize];
            top.read_at(b, start)?;
            m.write_cluster(g, b)?;
        }
        g += 1;
        progress((g * cs).min(size), size);
    }
    Ok(())
}

/// One change `bitmap` makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BitmapOp {
    /// Add an empty bitmap (granularity in bytes; default the cluster size), enabled or not.
    Add {
        /// Granularity.
        granularity: Option<u64>,
        /// Tracks writes.
        enabled: bool,
    },
    /// Remove it.
    Remove,
    /// Clear its bits.
    Clear,
    /// Enable it.
    Enable,
    /// Disable it.
    Disable,
    /// Set every bit that bitmap `source` has set (of this image, or of `file` with its
    /// format).
    Merge {
        /// The other bitmap's name.
        source: String,
        /// The image holding it, when not this one.
        file: Option<(std::path::PathBuf, Option<Format>)>,
    },
}

/// `qemu-img bitmap`: apply `ops`, in order, to bitmap `name` of the qcow2 image at `path`,
/// crash-safely (new tables and directory, then one header write).
pub fn bitmap(path: &Path, format: Option<Format>, name: &str, ops: &[BitmapOp]) -> Result<()> {
    let (io, fmt) = open_rw(path, format)?;
    if fmt != Format::Qcow2 {
        return Err(Error::new(
            ErrorKind::UnsupportedFeature,
            format!("{} images have no persistent bitmaps", fmt.name()),
        )
        .with_path(path));
    }
    let r = (|| {
        let mut m = Model::load(io)?;
        for op in ops {
            match op {
                BitmapOp::Add {
                    granularity,
                    enabled,
                } => m.bitmap_add(name, *granularity, *enabled)?,
                BitmapOp::Remove => m.bitmap_remove(name)?,
                BitmapOp::Clear => m.bitmap_clear(name)?,
                BitmapOp::Enable => m.bitmap_set_enabled(name, true)?,
                BitmapOp::Disable => m.bitmap_set_enabled(name, false)?,
                BitmapOp::Merge { source, file: None } => {
                    let (bits, g) = m.bitmap_bits(source)?;
                    m.bitmap_merge(name, &bits, g)?;
                }
                BitmapOp::Merge {
                    source,
                    file: Some((other, f)),
                } => {
                    let p = beside(path, &other.to_string_lossy());
                    let o = OpenOptions {
                        format: *f,
                        ..OpenOptions::default()
                    };
                    let img = Image::open(&p, &o)?;
                    let q = img.qcow2().ok_or_else(|| {
                        Error::new(
                            ErrorKind::UnsupportedFeature,
                            format!("'{}' has no persistent bitmaps", other.display()),
                        )
                    })?;
                    let list = crate::qcow2::bitmaps::list(q)?;
                    let b = list.iter().find(|b| b.name == *source).ok_or_else(|| {
                        Error::new(
                            ErrorKind::NotFound,
                            format!("Dirty bitmap '{source}' not found"),
                        )
                    })?;
                    let cs = q.header().cluster_size();
                    let table =
                        crate::qcow2::bitmaps::read_table(q.file().as_ref(), cs, q.file_size(), b)?;
                    let bits = crate::qcow2::bitmaps::read_bits(q.file().as_ref(), cs, b, &table)?;
                    m.bitmap_merge(name, &bits, b.granularity_bits)?;
                }
            }
        }
        m.commit().map(|_| ())
    })();
    r.map_err(|e| e.with_path(path))
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// What `amend` changes (qemu-img's `-o` names).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Amend {
    /// `compat`: 2 (0.10) or 3 (1.1).
    pub version: Option<u32>,
    /// `refcount_bits`, as log2.
    pub refcount_order: Option<u32>,
    /// `lazy_refcounts`.
    pub lazy_refcounts: Option<bool>,
}

impl Amend {
    /// Apply one `-o` string (`compat=0.10,refcount_bits=64,...`). Options `amend` cannot
    /// change are refused by name.
    pub fn apply(&mut self, spec: &str) -> Result<()> {
        for item in spec.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = item.split_once('=').unwrap_or((item, "on"));
            use crate::qcow2::writer::{parse_compat, parse_flag, parse_refcount_bits};
            let bad = || Error::invalid(format!("Invalid value '{v}' for option '{k}'"));
            match k {
                "compat" => self.version = Some(parse_compat(v).ok_or_else(bad)?),
                "refcount_bits" => {
                    self.refcount_order = Some(parse_refcount_bits(v).ok_or_else(bad)??)
                }
                "lazy_refcounts" => self.lazy_refcounts = Some(parse_flag(v).ok_or_else(bad)?),
                _ => {
                    return Err(Error::new(
                        ErrorKind::UnsupportedFeature,
                        format!("Changing the option '{k}' is not supported"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// `qemu-img amend`: change the qcow2 image at `path` as `a` says, crash-safely (new tables and
/// refcounts, then one header write).
pub fn amend(path: &Path, format: Option<Format>, a: &Amend) -> Result<()> {
    let (io, fmt) = open_rw(path, format)?;
    if fmt != Format::Qcow2 {
        return Err(Error::new(
            ErrorKind::UnsupportedFeature,
            format!(
                "Format driver '{}' does not support option amendment",
                fmt.name()
            ),
        )
        .with_path(path));
    }
    let r = (|| {
        let mut m = Model::load(io)?;
        // Version first (its checks see the other changes), then what depends on it.
        if a.version == Some(3) {
            m.set_version(3)?;
        }
        if let Some(l) = a.lazy_refcounts {
            m.set_lazy_refcounts(l)?;
        }
        if let Some(o) = a.refcount_order {
            m.set_refcount_order(o)?;
        }
        if a.version == Some(2) {
            m.set_version(2)?;
        }
        m.commit().map(|_| ())
    })();
    r.map_err(|e| e.with_path(path))
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
