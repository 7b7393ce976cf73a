//! Opening images: format detection or an explicit format, the trust policy for backing and
//! external data files, backing chains (depth and loop checks), and the [`Image`] type every
//! reader is used through: virtual size, block status ([`Extent`]) and positional reads.

use crate::detect::{self, Format};
use crate::error::{Error, ErrorKind, Result};
use crate::io::{BlockIo, FileIo};
use crate::iso::{self, IsoInfo};
use crate::qcow2::Qcow2;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Longest backing chain followed (qemu has no fixed limit; 16 is far beyond real use).
pub const MAX_CHAIN_DEPTH: usize = 16;

/// Whether an image may make us open other files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Follow backing and external data files named by the image, as plain local paths
    /// (qemu-img's behaviour since CVE-2024-4467: no `json:` or protocol names).
    #[default]
    Trusted,
    /// Refuse any image that names a backing or external data file. For input from users.
    Untrusted,
}

/// How to open an image.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// The format; `None` detects it from the content.
    pub format: Option<Format>,
    /// Backing/data file policy.
    pub policy: Policy,
    /// Read this internal snapshot (by id or name) instead of the active state.
    pub snapshot: Option<String>,
    /// Only inspect metadata (as `info` does): never open backing or data files, under any
    /// policy. Reads of ranges that would need them fail.
    pub metadata_only: bool,
    /// The QEMU-compatible locks taken on every file opened (the image, its backing chain,
    /// data and extent files): by default a reader's, which refuse a running writer.
    pub lock: crate::io::LockMode,
}

/// Block status of a guest range, with the fields of `qemu-img map --output=json`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (at least 1).
    pub len: u64,
    /// How deep in the backing chain the status was found (0: this image).
    pub depth: u32,
    /// Allocated somewhere in the chain.
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Backed by data in a file (possibly a hole that reads as zeros).
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset in the image or data file, where there is one.
    pub offset: Option<u64>,
}

/// A read-only reader of one more disk format (VMDK, VHD, VHDX, VDI): everything [`Image`]
/// needs from it. Each format's module validates its own metadata once at open, with limits,
/// and answers block status and reads from that model.
pub trait Driver: std::fmt::Debug + Send + Sync {
    /// The format read ([`Format::Vmdk`], [`Format::Vhd`], ...).
    fn format(&self) -> Format;
    /// The image file.
    fn file(&self) -> &Arc<dyn BlockIo>;
    /// Size of the virtual disk in bytes, as `qemu-img info` reports it.
    fn virtual_size(&self) -> u64;
    /// Status of the guest range at `offset`, at most `max` bytes (at least 1 when in range).
    fn extent(&self, offset: u64, max: u64) -> Result<Extent>;
    /// Read guest bytes at `offset`; the range lies within the virtual size.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// The allocation unit (grain, block), reported by `info` as `cluster-size`.
    fn cluster_size(&self) -> Option<u64> {
        None
    }
    /// `qemu-img info`'s `format-specific` object (`{"type": ..., "data": {...}}`), if any.
    fn format_specific(&self) -> Option<serde_json::Value> {
        None
    }
    /// False when QEMU's driver for the format answers no block status (VHDX): qemu-img then
    /// reports every byte as data with no host offset, and [`Image::reported_extent`] does too.
    fn qemu_reports_status(&self) -> bool {
        true
    }
    /// Metadata problems found by `check` (empty: clean). `None`: the format has no
    /// metadata to check (as qemu-img says for raw).
    fn check(&self) -> Option<Vec<String>> {
        None
    }
}

/// A range of another image (see [`Image::window`]).
#[derive(Debug)]
struct Window {
    img: Image,
    start: u64,
    /// Where the source's bytes stop (zeros follow).
    end: u64,
    len: u64,
}

impl Driver for Window {
    fn format(&self) -> Format {
        self.img.format()
    }
    fn file(&self) -> &Arc<dyn BlockIo> {
        self.img.file()
    }
    fn virtual_size(&self) -> u64 {
        self.len
    }
    fn extent(&self, offset: u64, max: u64) -> Result<Extent> {
        let max = max.min(self.len.saturating_sub(offset)).max(1);
        let at = self.start.saturating_add(offset);
        let size = self.end;
        if at >= size {
            return Ok(Extent {
                len: max,
                depth: 0,
                present: false,
                zero: true,
                data: false,
                compressed: false,
                offset: None,
            });
        }
        let mut e = self.img.extent(at, max.min(size - at))?;
        e.len = e.len.min(max);
        Ok(e)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let at = self.start.saturating_add(offset);
        let n = (self.end.saturating_sub(at) as usize).min(buf.len());
        if n > 0 {
            self.img.read_at(&mut buf[..n], at)?;
        }
        buf[n..].fill(0);
        Ok(())
    }
}

#[derive(Debug)]
enum Kind {
    Raw {
        io: Arc<dyn BlockIo>,
        size: u64,
        iso: Option<IsoInfo>,
    },
    Qcow2(Box<Qcow2>),
    Driver(Box<dyn Driver>),
}

/// An open image of any readable format.
#[derive(Debug)]
pub struct Image {
    path: Option<PathBuf>,
    kind: Kind,
}

impl Image {
    /// Open the image file at `path`.
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Image> {
        let path = path.as_ref();
        let mut visited = Vec::new();
        open_path(path, opts, opts.format, 0, &mut visited).map_err(|e| e.with_path(path))
    }

    /// Open an image held by `io` (memory, a pipe spooled elsewhere, ...). Such an image has no
    /// directory to resolve names against, so backing and data files are refused.
    pub fn from_io(io: Arc<dyn BlockIo>, opts: &OpenOptions) -> Result<Image> {
        let mut visited = Vec::new();
        open_io(io, None, opts, opts.format, 0, &mut visited)
    }

    /// The driver reading the image: [`Format::Raw`] (also for ISO), [`Format::Qcow2`], or
    /// the format of a [`Driver`].
    pub fn format(&self) -> Format {
        match &self.kind {
            Kind::Raw { .. } => Format::Raw,
            Kind::Qcow2(_) => Format::Qcow2,
            Kind::Driver(d) => d.format(),
        }
    }

    /// The reader of a VMDK, VHD, VHDX or VDI image.
    pub fn driver(&self) -> Option<&dyn Driver> {
        match &self.kind {
            Kind::Driver(d) => Some(d.as_ref()),
            _ => None,
        }
    }

    /// The file name given when opening, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The qcow2 details, for a qcow2 image.
    pub fn qcow2(&self) -> Option<&Qcow2> {
        match &self.kind {
            Kind::Qcow2(q) => Some(q),
            _ => None,
        }
    }

    /// The ISO 9660 volume, when the raw content is one.
    pub fn iso(&self) -> Option<&IsoInfo> {
        match &self.kind {
            Kind::Raw { iso, .. } => iso.as_ref(),
            _ => None,
        }
    }

    /// The image file itself.
    pub fn file(&self) -> &Arc<dyn BlockIo> {
        match &self.kind {
            Kind::Raw { io, .. } => io,
            Kind::Qcow2(q) => q.file(),
            Kind::Driver(d) => d.file(),
        }
    }

    /// Size of the virtual disk in bytes.
    pub fn virtual_size(&self) -> u64 {
        match &self.kind {
            Kind::Raw { size, .. } => *size,
            Kind::Qcow2(q) => q.virtual_size(),
            Kind::Driver(d) => d.virtual_size(),
        }
    }

    /// Status of the guest range starting at `offset`, at most `max` bytes long.
    pub fn extent(&self, offset: u64, max: u64) -> Result<Extent> {
        match &self.kind {
            Kind::Raw { io, size, .. } => raw_extent(io.as_ref(), *size, offset, max),
            Kind::Qcow2(q) => q.extent(offset, max),
            Kind::Driver(d) => d.extent(offset, max),
        }
        .map_err(|e| self.name_in(e))
    }

    /// The guest bytes `start..start + len` of `img` as an image of their own (`dd`'s
    /// `skip`/`count`), `size` bytes long (at least `len`): reads and block status are the
    /// source's, shifted; past `len` (or the source's end) it reads as zeros.
    pub fn window(img: Image, start: u64, len: u64, size: u64) -> Image {
        let end = start.saturating_add(len).min(img.virtual_size()).max(start);
        Image {
            path: None,
            kind: Kind::Driver(Box::new(Window {
                img,
                start,
                end,
                len: size.max(len),
            })),
        }
    }

    /// The status qemu-img reports for the range at `offset` (what `map`, `measure` and
    /// `compare -s` show): [`Image::extent`], except that a format whose QEMU driver answers
    /// no block status (VHDX) is all data with no host offset, as qemu-img shows it. Copying
    /// uses [`Image::extent`], which knows the holes.
    pub fn reported_extent(&self, offset: u64, max: u64) -> Result<Extent> {
        match &self.kind {
            Kind::Driver(d) if !d.qemu_reports_status() => {
                let len = self.virtual_size().saturating_sub(offset).min(max);
                Ok(Extent {
                    len: len.max(1),
                    depth: 0,
                    present: true,
                    zero: false,
                    data: true,
                    compressed: false,
                    offset: None,
                })
            }
            _ => self.extent(offset, max),
        }
    }

    /// Read guest bytes at `offset`; the range must lie within the virtual size.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_at_inner(buf, offset).map_err(|e| self.name_in(e))
    }

    /// Errors found while reading name the image they were found in (a backing file's own
    /// errors keep its name), so callers such as convert never have to guess which file of a
    /// chain is broken.
    fn name_in(&self, e: Error) -> Error {
        match &self.path {
            Some(p) => e.with_path(p),
            None => e,
        }
    }

    fn read_at_inner(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if !matches!(self.kind, Kind::Qcow2(_))
            && offset
                .checked_add(buf.len() as u64)
                .is_none_or(|e| e > self.virtual_size())
        {
            return Err(Error::invalid("read past the end of the image"));
        }
        match &self.kind {
            Kind::Raw { io, .. } => io
                .read_at_zero_padded(buf, offset)
                .map_err(|e| Error::io("read failed", e)),
            Kind::Qcow2(q) => q.read_at(buf, offset),
            Kind::Driver(d) => d.read_at(buf, offset),
        }
    }
}

fn raw_extent(io: &dyn BlockIo, size: u64, off: u64, max: u64) -> Result<Extent> {
    let max = max.min(size.saturating_sub(off));
    if max == 0 {
        return Err(Error::invalid(format!(
            "offset {off} is past the end of the image"
        )));
    }
    let hole = |len| Extent {
        len,
        present: true,
        zero: true,
        offset: Some(off),
        ..Extent::default()
    };
    Ok(
        match io
            .next_data(off)
            .map_err(|e| Error::io("cannot find data extents", e))?
        {
            Some(r) if r.start > off => hole(max.min(r.start - off)),
            Some(r) => Extent {
                len: max.min(r.end - off),
                present: true,
                data: true,
                offset: Some(off),
                ..Extent::default()
            },
            None => hole(max),
        },
    )
}

fn open_path(
    path: &Path,
    opts: &OpenOptions,
    format: Option<Format>,
    depth: usize,
    visited: &mut Vec<PathBuf>,
) -> Result<Image> {
    let io = FileIo::open(path).map_err(|e| Error::io("cannot open image", e))?;
    io.lock(opts.lock)?;
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if visited.contains(&canonical) {
        return Err(Error::corrupt(format!(
            "backing file '{}' creates an infinite loop",
            path.display()
        )));
    }
    visited.push(canonical);
    let mut img = open_io(Arc::new(io), Some(path), opts, format, depth, visited)?;
    img.path = Some(path.to_path_buf());
    Ok(img)
}

fn open_io(
    io: Arc<dyn BlockIo>,
    path: Option<&Path>,
    opts: &OpenOptions,
    format: Option<Format>,
    depth: usize,
    visited: &mut Vec<PathBuf>,
) -> Result<Image> {
    let size = io.size().map_err(|e| Error::io("cannot stat image", e))?;
    let mut head = vec![0u8; (detect::PROBE_LEN as u64).min(size) as usize];
    io.read_exact_at(&mut head, 0)
        .map_err(|e| Error::io("cannot read image", e))?;
    let mut tail = [0u8; 512];
    let tail = if size >= 1024 && io.read_exact_at(&mut tail, size - 512).is_ok() {
        Some(&tail[..])
    } else {
        None
    };
    let probed = detect::probe(&head, tail);
    let format = format.unwrap_or(probed);
    match format {
        Format::Raw | Format::Iso => {
            // A raw disk that merely looks like an ISO (broken descriptor) is still a raw
            // disk, as qemu sees it: the ISO details are extra information only.
            let iso = if probed == Format::Iso {
                iso::read_info(|off, buf| io.read_exact_at(buf, off)).ok()
            } else {
                None
            };
            if opts.snapshot.is_some() {
                return Err(Error::new(
                    ErrorKind::UnsupportedFeature,
                    "raw images have no snapshots",
                ));
            }
            // qemu's block layer counts whole 512-byte sectors; the tail reads as zeros.
            let size = size.div_ceil(512) * 512;
            Ok(Image {
                path: None,
                kind: Kind::Raw { io, size, iso },
            })
        }
        Format::Qcow2 => {
            // Untrusted input is refused right after its header, as the streaming reader does.
            let refuse = opts.policy == Policy::Untrusted && !opts.metadata_only;
            let mut q = Qcow2::open_with(io, opts.snapshot.as_deref(), refuse)?;
            attach_files(&mut q, path, opts, depth, visited)?;
            Ok(Image {
                path: None,
                kind: Kind::Qcow2(Box::new(q)),
            })
        }
        Format::Vmdk | Format::Vhd | Format::VhdFixed | Format::Vhdx | Format::Vdi => {
            if opts.snapshot.is_some() {
                return Err(Error::new(
                    ErrorKind::UnsupportedFeature,
                    format!("{} images have no internal snapshots", format.name()),
                ));
            }
            let ctx = DriverContext {
                path,
                policy: opts.policy,
                metadata_only: opts.metadata_only,
            };
            let d: Box<dyn Driver> = match format {
                Format::Vmdk => crate::vmdk::open(io, &ctx)?,
                Format::Vhd | Format::VhdFixed => crate::vhd::open(io, &ctx)?,
                Format::Vhdx => crate::vhdx::open(io, &ctx)?,
                _ => crate::vdi::open(io, &ctx)?,
            };
            Ok(Image {
                path: None,
                kind: Kind::Driver(d),
            })
        }
        other if other.is_stream() => Err(Error::new(
            ErrorKind::UnsupportedFormat,
            format!(
                "recognised as {} data; compressed and archived input is not supported yet",
                other.name()
            ),
        )),
        other => Err(Error::new(
            ErrorKind::UnsupportedFormat,
            format!(
                "recognised as {} image; this format is not supported yet",
                other.name()
            ),
        )),
    }
}

/// What a [`Driver`]'s `open` is told besides the file: where the image is (to resolve names
/// it stores, under [`Policy::Trusted`] only) and the policy. Under [`Policy::Untrusted`] an
/// image naming any other file (a VMDK descriptor's extents, a differencing disk's parent) is
/// refused with [`ErrorKind::Denied`], never opened; with `metadata_only` such names are
/// reported, not opened.
#[derive(Debug, Clone, Copy)]
pub struct DriverContext<'a> {
    /// The image's own path, when opened from one.
    pub path: Option<&'a Path>,
    /// Whether other files named by the image may be opened.
    pub policy: Policy,
    /// Metadata only (`info`): never open other files.
    pub metadata_only: bool,
}

/// Refuse names that are not plain local file names (qemu's rule since CVE-2024-4467).
fn check_stored_name(what: &str, name: &str) -> Result<()> {
    let scheme = name.split_once("://").map(|(s, _)| s);
    let is_protocol = scheme.is_some_and(|s| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
    });
    if name.starts_with("json:") || is_protocol {
        return Err(Error::new(
            ErrorKind::Denied,
            format!("{what} name '{name}' is not a plain local file name"),
        ));
    }
    if name.is_empty() || name.contains('\0') {
        return Err(Error::corrupt(format!(
            "{what} name is empty or contains NUL"
        )));
    }
    Ok(())
}

fn resolve(base: Option<&Path>, name: &str, what: &str) -> Result<PathBuf> {
    let p = Path::new(name);
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    let base = base.ok_or_else(|| {
        Error::new(
            ErrorKind::Denied,
            format!("{what} '{name}' cannot be resolved for an image without a path"),
        )
    })?;
    Ok(base.parent().unwrap_or(Path::new("")).join(p))
}

fn attach_files(
    q: &mut Qcow2,
    path: Option<&Path>,
    opts: &OpenOptions,
    depth: usize,
    visited: &mut Vec<PathBuf>,
) -> Result<()> {
    let h = q.header().clone();
    // Metadata-only opens (info) report the names but never open them, whatever the policy.
    let refuse = opts.policy == Policy::Untrusted && !opts.metadata_only;
    if let Some(name) = &h.data_file {
        if refuse {
            return Err(Error::new(
                ErrorKind::Denied,
                format!("image uses external data file '{name}', which untrusted input may not"),
            ));
        }
        check_stored_name("data file", name)?;
        if !opts.metadata_only {
            let p = resolve(path, name, "data file")?;
            let io = FileIo::open(&p)
                .map_err(|e| Error::io("cannot open data file", e).with_path(&p))?;
            io.lock(opts.lock).map_err(|e| e.with_path(&p))?;
            q.set_data_file(Arc::new(io));
        }
    }
    if let Some(name) = &h.backing_file {
        if refuse {
            return Err(Error::new(
                ErrorKind::Denied,
                format!("image has backing file '{name}', which untrusted input may not"),
            ));
        }
        check_stored_name("backing file", name)?;
        if opts.metadata_only {
            return Ok(());
        }
        if depth + 1 >= MAX_CHAIN_DEPTH {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!("backing chain deeper than {MAX_CHAIN_DEPTH}"),
            ));
        }
        let fmt = match &h.backing_format {
            Some(f) => Some(Format::from_name(f).ok_or_else(|| {
                Error::new(
                    ErrorKind::UnsupportedFormat,
                    format!("unknown backing file format '{f}'"),
                )
            })?),
            None => None,
        };
        let p = resolve(path, name, "backing file")?;
        let bopts = OpenOptions {
            snapshot: None,
            ..opts.clone()
        };
        let backing = open_path(&p, &bopts, fmt, depth + 1, visited).map_err(|e| {
            if e.path().is_some() {
                e
            } else {
                e.with_path(&p)
            }
        })?;
        q.set_backing(backing);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_names() {
        assert!(check_stored_name("b", "base.qcow2").is_ok());
        assert!(check_stored_name("b", "/abs/a:b.img").is_ok());
        assert_eq!(
            check_stored_name("b", "json:{}").unwrap_err().kind(),
            ErrorKind::Denied
        );
        assert_eq!(
            check_stored_name("b", "nbd://h/x").unwrap_err().kind(),
            ErrorKind::Denied
        );
        assert_eq!(
            check_stored_name("b", "http://h/x").unwrap_err().kind(),
            ErrorKind::Denied
        );
        assert!(check_stored_name("b", "").is_err());
    }

    #[test]
    fn raw_in_memory() {
        let io: Arc<dyn BlockIo> = Arc::new(crate::io::MemIo::new(vec![5u8; 4096]));
        let img = Image::from_io(io, &OpenOptions::default()).unwrap();
        assert_eq!(img.format(), Format::Raw);
        assert_eq!(img.virtual_size(), 4096);
        let odd: Arc<dyn BlockIo> = Arc::new(crate::io::MemIo::new(vec![5u8; 1000]));
        let odd = Image::from_io(odd, &OpenOptions::default()).unwrap();
        assert_eq!(odd.virtual_size(), 1024);
        let mut t = [9u8; 48];
        odd.read_at(&mut t, 976).unwrap();
        assert_eq!(&t[..24], &[5u8; 24]);
        assert_eq!(&t[24..], &[0u8; 24]);
        let mut b = [0u8; 8];
        img.read_at(&mut b, 4088).unwrap();
        assert_eq!(b, [5u8; 8]);
        assert!(img.read_at(&mut b, 4090).is_err());
        let e = img.extent(0, u64::MAX).unwrap();
        assert!(e.data && e.len == 4096);
    }

    #[test]
    fn broken_iso_descriptor_is_still_a_raw_disk() {
        let mut d = vec![0u8; 0x9000];
        d[0x8001..0x8006].copy_from_slice(b"CD001");
        d[0x8000] = 1; // primary, but every field is zero: invalid block size
        let img =
            Image::from_io(Arc::new(crate::io::MemIo::new(d)), &OpenOptions::default()).unwrap();
        assert_eq!(img.format(), Format::Raw);
        assert!(img.iso().is_none());
    }
}
