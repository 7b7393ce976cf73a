//! Streaming ingest: a byte stream in (a pipe, an HTTP body, an upload), a finished disk out on
//! a volume, with no scratch space and bounded memory. This is the one call the importer, the
//! uploader and the C ABI share: [`import`].
//!
//! The stream is unwrapped (gzip, xz, zstd: one layer of each), sniffed, and then:
//! - raw (and ISO) bytes are written as they come, zero runs left as holes;
//! - qcow2 is read by the streaming strategy of the one qcow2 engine ([`crate::qcow2::stream`]),
//!   which owns every rule and limit, with one memory budget for all it holds;
//! - a tar holding a disk image yields its first file entry (sparse included), read by the
//!   bounded [`crate::archive::tar`] reader; with content type `archive` a tar is
//!   unpacked safely into a directory ([`crate::archive`]).
//!
//! Writes never go past the target's capacity (so decompression bombs stop with a clear error),
//! and a file target is written under a temporary name and renamed only when complete.

use crate::convert::{CancelToken, TempTarget};
use crate::detect::Format;
use crate::error::{Error, ErrorKind, Result};
use crate::io::{BlockIo, FileIo};
use crate::sizing;
use crate::stream::{self, Stream};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What the stream holds (CDI's `IMPORTER_CONTENTTYPE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ContentType {
    /// A disk image (any readable format, possibly compressed).
    #[default]
    Kubevirt,
    /// A tar archive to unpack into the target directory.
    Archive,
    /// Bytes written as they come: no decompression, no format detection, no sizing (the
    /// raw device stream of a host-assisted clone, which may well start like a qcow2).
    Raw,
}

/// Where the result goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportTarget {
    /// A disk image file on a filesystem volume (CDI: `/data/disk.img`, mode 0660).
    File(PathBuf),
    /// A raw block device (CDI: `/dev/cdi-block-volume`).
    Device(PathBuf),
    /// A directory to unpack an archive into (CDI: `/data`).
    Directory(PathBuf),
}

/// Progress callback: `(input bytes read, input size if known)`; return `false` to cancel.
pub type ImportProgress<'a> = &'a mut dyn FnMut(u64, Option<u64>) -> bool;

/// How to import.
pub struct ImportOptions<'a> {
    /// Disk image or archive.
    pub content: ContentType,
    /// Filesystem overhead fraction (CDI's `FILESYSTEM_OVERHEAD`).
    pub overhead: f64,
    /// The volume size requested (CDI's `IMPORTER_IMAGE_SIZE`). With it, a disk file is
    /// expanded to the usable space of `min(free space, requested)`; without it the disk keeps
    /// its virtual size.
    pub requested_size: Option<u64>,
    /// Preallocate the disk (falloc, falling back to writing zeros).
    pub preallocate: bool,
    /// Memory for qcow2 data that arrives before its mapping (beyond it: spill or refuse);
    /// the stream reader's budget is this plus its working buffers and mapping state.
    pub memory_budget: u64,
    /// Spill past the budget to a temporary file on the target's volume.
    pub allow_spill: bool,
    /// Decoder threads (xz).
    pub threads: u32,
    /// Input size, when known (Content-Length), for progress.
    pub input_size: Option<u64>,
    /// Progress, called on the caller's thread.
    pub progress: Option<ImportProgress<'a>>,
    /// Cancellation from another thread.
    pub cancel: Option<CancelToken>,
    /// Log lines (spilling, resizing), if wanted.
    pub log: Option<&'a dyn Fn(&str)>,
    /// Write the target with `O_DIRECT` (bypassing the page cache) where it supports it.
    pub direct_io: bool,
    /// Called when everything is written, just before a file target is renamed into place
    /// (for a device or directory: at the end). An error here fails the import and, for a
    /// file, leaves nothing behind: the hook for checks on the whole input (checksums).
    pub before_commit: Option<&'a mut dyn FnMut() -> Result<()>>,
}

impl Default for ImportOptions<'_> {
    fn default() -> Self {
        ImportOptions {
            content: ContentType::Kubevirt,
            overhead: sizing::DEFAULT_OVERHEAD,
            requested_size: None,
            preallocate: false,
            memory_budget: 32 << 20,
            allow_spill: true,
            threads: std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1),
            input_size: None,
            progress: None,
            cancel: None,
            log: None,
            direct_io: false,
            before_commit: None,
        }
    }
}

impl std::fmt::Debug for ImportOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImportOptions")
            .field("content", &self.content)
            .field("overhead", &self.overhead)
            .field("requested_size", &self.requested_size)
            .field("preallocate", &self.preallocate)
            .field("memory_budget", &self.memory_budget)
            .finish()
    }
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Compression layers found, outermost first.
    pub layers: Vec<Format>,
    /// The image format inside (raw, qcow2, tar for archives).
    pub format: Option<Format>,
    /// Input bytes read.
    pub bytes_read: u64,
    /// Bytes of data written to the target.
    pub bytes_written: u64,
    /// Virtual size of the imported disk (before expansion).
    pub virtual_size: u64,
    /// Final size of the disk file (after expansion).
    pub disk_size: u64,
    /// Preallocation was applied.
    pub preallocation_applied: bool,
    /// Bytes of qcow2 data spilled to a temporary file.
    pub spilled_bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// Input wrapper: counts bytes and honours cancellation.
struct Counting<'a> {
    inner: Stream<'a>,
    count: Arc<AtomicU64>,
    cancel: Option<CancelToken>,
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.cancel.as_ref().is_some_and(CancelToken::is_cancelled) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                CANCELLED,
            ));
        }
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Calls the progress callback (on the caller's thread) at most ten times a second.
struct Ticker<'p, 'a> {
    count: Arc<AtomicU64>,
    total: Option<u64>,
    last: Instant,
    progress: Option<&'p mut (dyn FnMut(u64, Option<u64>) -> bool + 'a)>,
}

impl Ticker<'_, '_> {
    fn tick(&mut self) -> Result<()> {
        if self.last.elapsed() < Duration::from_millis(100) {
            return Ok(());
        }
        self.last = Instant::now();
        let n = self.count.load(Ordering::Relaxed);
        let total = self.total;
        match self.progress.as_mut() {
            Some(p) => {
                if p(n, total) {
                    Ok(())
                } else {
                    Err(Error::new(ErrorKind::Cancelled, CANCELLED))
                }
            }
            None => Ok(()),
        }
    }

    fn finish(&mut self) {
        let n = self.count.load(Ordering::Relaxed);
        if let Some(p) = self.progress.as_mut() {
            p(n, self.total);
        }
    }
}

const CANCELLED: &str = "import cancelled";

/// Memory the qcow2 stream reader may hold besides the caller's budget for held-back data:
/// its working buffers and a share for mapping state (tables still awaited, mappings waiting
/// for their data), together at least this.
const STREAM_BASE: u64 = 16 << 20;
/// Memory for the decompression layers (xz dictionaries and blocks decoded ahead, zstd's
/// window): with the stream reader's budget, an importer stays within 64 MiB of RSS.
const DECODER_BUDGET: u64 = 32 << 20;
/// The share of [`STREAM_BASE`] for mapping state.
const MAPPING_ALLOWANCE: u64 = 8 << 20;

fn stream_err(what: &str, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::Interrupted && e.to_string() == CANCELLED {
        return Error::new(ErrorKind::Cancelled, CANCELLED);
    }
    Error::io(what, e)
}

/// Read until `buf` is full or the stream ends; returns the bytes read.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted && e.to_string() != CANCELLED => {
            }
            Err(e) => return Err(stream_err("cannot read input", e)),
        }
    }
    Ok(n)
}

/// CDI's message for an image that does not fit (the controller looks for its wording).
fn too_large(virtual_size: Option<u64>, available: u64) -> Error {
    let v = virtual_size.map_or_else(|| "(streamed)".to_string(), |v| v.to_string());
    Error::new(
        ErrorKind::NoSpace,
        format!(
            "virtual image size {v} is larger than the reported available storage {available}. A larger PVC is required"
        ),
    )
}

/// Writes guest data to the target, leaving zero runs as holes on a zero-initialised target
/// and never writing past its capacity. Shared by the threads that write (raw writer, qcow2
/// decoders).
struct Sink<'a> {
    io: &'a dyn BlockIo,
    zero_init: bool,
    capacity: u64,
    written: AtomicU64,
    /// Bytes written since the page cache was last released.
    dirty: AtomicU64,
}

/// Written bytes between two releases of the target's page cache: dirty and cached pages of
/// the target stay near twice this, whatever the image size (CDI pods have a 600M limit that
/// page cache counts against).
const RELEASE_EVERY: u64 = 32 << 20;

impl<'a> Sink<'a> {
    fn new(io: &'a dyn BlockIo, zero_init: bool, capacity: u64) -> Sink<'a> {
        Sink {
            io,
            zero_init,
            capacity,
            written: AtomicU64::new(0),
            dirty: AtomicU64::new(0),
        }
    }

    /// `len` bytes at `off` read as zeros afterwards.
    fn zero(&self, off: u64, len: u64) -> Result<()> {
        self.check(off, len)?;
        if !self.zero_init {
            self.io
                .write_zeroes(off, len)
                .map_err(|e| Error::io("cannot zero target", e))?;
        }
        Ok(())
    }

    fn check(&self, off: u64, len: u64) -> Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.capacity => Ok(()),
            _ => Err(too_large(None, self.capacity)),
        }
    }

    fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

impl crate::qcow2::stream::Target for Sink<'_> {
    fn write(&self, off: u64, data: &[u8]) -> Result<()> {
        self.check(off, data.len() as u64)?;
        for (r, z) in crate::io::zero_runs(data, 4096) {
            let (i, j) = (r.start, r.end);
            if z {
                if !self.zero_init {
                    self.io
                        .write_zeroes(off + i as u64, (j - i) as u64)
                        .map_err(|e| Error::io("cannot zero target", e))?;
                }
            } else {
                self.io
                    .write_all_at(&data[i..j], off + i as u64)
                    .map_err(|e| Error::io("cannot write target", e))?;
                let n = (j - i) as u64;
                self.written.fetch_add(n, Ordering::Relaxed);
                if self.dirty.fetch_add(n, Ordering::Relaxed) + n >= RELEASE_EVERY {
                    self.dirty.store(0, Ordering::Relaxed);
                    self.io.release_cache();
                }
            }
        }
        Ok(())
    }

    fn zero(&self, off: u64, len: u64) -> Result<()> {
        self.check(off, len)?;
        if !self.zero_init && len > 0 {
            self.io
                .write_zeroes(off, len)
                .map_err(|e| Error::io("cannot zero target", e))?;
        }
        Ok(())
    }

    fn read_back(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        // Zero blocks may have been left as holes past the end written so far.
        self.io
            .read_at_zero_padded(buf, off)
            .map_err(|e| Error::io("cannot read back target", e))
    }
}

/// Import the image or archive in `src` into `target`.
pub fn import(
    src: Stream,
    target: &ImportTarget,
    opts: &mut ImportOptions<'_>,
) -> Result<ImportReport> {
    let t0 = Instant::now();
    let path = match target {
        ImportTarget::File(p) | ImportTarget::Device(p) | ImportTarget::Directory(p) => p.clone(),
    };
    let mut report = import_inner(src, target, opts).map_err(|e| e.with_path(&path))?;
    report.elapsed = t0.elapsed();
    Ok(report)
}

/// The caller's log function, or one that drops the lines.
fn logger<'a>(log: Option<&'a dyn Fn(&str)>) -> impl Fn(&str) + 'a {
    move |m| {
        if let Some(l) = log {
            l(m);
        }
    }
}

/// The common start of an import: count and watch the input, unwrap its compression layers.
#[allow(clippy::type_complexity)]
fn begin<'s, 'p, 'a>(
    src: Stream<'s>,
    cancel: Option<CancelToken>,
    total: Option<u64>,
    threads: u32,
    raw: bool,
    progress: &'p mut Option<ImportProgress<'a>>,
) -> Result<(
    Arc<AtomicU64>,
    Ticker<'p, 'a>,
    ImportReport,
    Format,
    Stream<'s>,
)> {
    let count = Arc::new(AtomicU64::new(0));
    let input: Stream<'_> = Box::new(Counting {
        inner: src,
        count: count.clone(),
        cancel,
    });
    let ticker = Ticker {
        count: count.clone(),
        total,
        // The first tick reports at once (a caller sees progress start, and can cancel).
        last: Instant::now()
            .checked_sub(Duration::from_millis(100))
            .unwrap_or_else(Instant::now),
        progress: progress.as_deref_mut(),
    };
    let (layers, fmt, inner) = if raw {
        (Vec::new(), Format::Raw, input)
    } else {
        stream::unwrap_layers_with_budget(input, threads, DECODER_BUDGET)?
    };
    let report = ImportReport {
        layers,
        ..ImportReport::default()
    };
    Ok((count, ticker, report, fmt, inner))
}

fn import_inner(
    src: Stream<'_>,
    target: &ImportTarget,
    opts: &mut ImportOptions<'_>,
) -> Result<ImportReport> {
    let say = logger(opts.log);
    let (count, mut ticker, mut report, fmt, inner) = begin(
        src,
        opts.cancel.clone(),
        opts.input_size,
        opts.threads,
        opts.content == ContentType::Raw,
        &mut opts.progress,
    )?;
    // Raw (clone) streams are written as they come, with no sizing or validation.
    let requested = match opts.content {
        ContentType::Raw => None,
        _ => opts.requested_size,
    };
    if opts.content == ContentType::Archive {
        let ImportTarget::Directory(dir) = target else {
            return Err(Error::invalid("archive content needs a directory target"));
        };
        if fmt != Format::Tar {
            return Err(Error::new(
                ErrorKind::UnsupportedFormat,
                format!("archive content must be a tar, found {}", fmt.name()),
            ));
        }
        report.format = Some(Format::Tar);
        let limit =
            crate::io::free_space(dir).map_err(|e| Error::io("cannot measure target volume", e))?;
        report.bytes_written = crate::archive::unpack(inner, dir, limit, &mut || ticker.tick())?;
        if let Some(hook) = opts.before_commit.as_mut() {
            hook()?;
        }
        report.bytes_read = count.load(Ordering::Relaxed);
        ticker.finish();
        return Ok(report);
    }
    // A disk image: where it goes and how much fits.
    let (io, tmp, available, zero_init, is_file): (
        Box<dyn BlockIo>,
        Option<TempTarget>,
        u64,
        bool,
        bool,
    ) = match target {
        ImportTarget::Directory(_) => {
            return Err(Error::invalid("disk content needs a file or device target"));
        }
        ImportTarget::Device(p) => {
            let io = open_target(p, opts.direct_io, &say, || {
                FileIo::open_rw(p, false).map_err(|e| Error::io("cannot open target device", e))
            })?;
            let size = io
                .size()
                .map_err(|e| Error::io("cannot size target device", e))?;
            (io, None, size, false, false)
        }
        ImportTarget::File(p) => {
            let dir = match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let free = crate::io::free_space(&dir)
                .map_err(|e| Error::io("cannot measure target volume", e))?;
            let available = requested.map_or(free, |r| r.min(free));
            let tmp = TempTarget::create(p)?;
            let io = open_target(tmp.path(), opts.direct_io, &say, || {
                let f = tmp
                    .io
                    .file()
                    .try_clone()
                    .map_err(|e| Error::io("cannot open target", e))?;
                FileIo::from_file(f).map_err(|e| Error::io("cannot open target", e))
            })?;
            (io, Some(tmp), available, true, true)
        }
    };
    let sink = Sink::new(io.as_ref(), zero_init, available);
    let spill_dir = match (target, opts.allow_spill) {
        (ImportTarget::File(p), true) => p.parent().map(Path::to_path_buf),
        _ => None,
    };
    let virtual_size = ingest_image(
        fmt,
        inner,
        &sink,
        &mut ticker,
        opts.memory_budget,
        spill_dir.as_deref(),
        opts.threads,
        &say,
        &mut report,
    )?;
    report.virtual_size = virtual_size;
    report.bytes_written = sink.written();
    report.bytes_read = count.load(Ordering::Relaxed);
    if is_file {
        // With a requested volume size (as CDI always gives), expand to the usable space
        // (never shrink); then preallocate if asked.
        let target_size = match requested {
            Some(r) => sizing::usable_space(opts.overhead, available).min(r),
            None => virtual_size,
        };
        let size = virtual_size.max(target_size);
        if target_size > virtual_size {
            say(&format!(
                "expanding disk from {virtual_size} to {target_size} bytes"
            ));
        }
        io.set_size(size)
            .map_err(|e| Error::io("cannot size target", e))?;
        report.disk_size = size;
        if opts.preallocate {
            crate::qcow2::writer::preallocate_data(
                io.as_ref(),
                crate::qcow2::writer::Prealloc::Falloc,
            )?;
            report.preallocation_applied = true;
        }
        io.flush()
            .map_err(|e| Error::io("cannot flush target", e))?;
        if let Some(hook) = opts.before_commit.as_mut() {
            hook()?;
        }
        if let Some(t) = tmp {
            use std::os::unix::fs::PermissionsExt;
            t.io.file()
                .set_permissions(std::fs::Permissions::from_mode(0o660))
                .map_err(|e| Error::io("cannot set target mode", e))?;
            t.commit()?;
        }
    } else {
        // A device has every hole zeroed explicitly, so it is fully written either way.
        report.preallocation_applied = opts.preallocate;
        report.disk_size = available;
        io.flush()
            .map_err(|e| Error::io("cannot flush target", e))?;
        if let Some(hook) = opts.before_commit.as_mut() {
            hook()?;
        }
    }
    ticker.finish();
    Ok(report)
}

/// Import the disk image in `src` into `io` (no sizing, expansion or preallocation): the
/// lower half of [`import`], for callers with their own target (tests, fuzzing, memory).
/// `zero_init` says `io` already reads as zeros; nothing is written past `capacity`. Spilling
/// is not available here: data beyond the memory budget that arrives before its mapping is
/// refused.
pub fn import_into(
    src: Stream<'_>,
    io: &dyn BlockIo,
    zero_init: bool,
    capacity: u64,
    opts: &mut ImportOptions<'_>,
) -> Result<ImportReport> {
    let say = logger(opts.log);
    let (count, mut ticker, mut report, fmt, inner) = begin(
        src,
        opts.cancel.clone(),
        opts.input_size,
        opts.threads,
        opts.content == ContentType::Raw,
        &mut opts.progress,
    )?;
    let sink = Sink::new(io, zero_init, capacity);
    report.virtual_size = ingest_image(
        fmt,
        inner,
        &sink,
        &mut ticker,
        opts.memory_budget,
        None,
        opts.threads,
        &say,
        &mut report,
    )?;
    report.bytes_written = sink.written();
    report.bytes_read = count.load(Ordering::Relaxed);
    report.disk_size = report.virtual_size;
    ticker.finish();
    Ok(report)
}

/// Open a target with `O_DIRECT` when asked and possible (CDI's "try none" cache mode), else
/// with the page cache.
fn open_target(
    path: &Path,
    direct: bool,
    say: &dyn Fn(&str),
    cached: impl FnOnce() -> Result<FileIo>,
) -> Result<Box<dyn BlockIo>> {
    if direct {
        match crate::io::DirectIo::open(path) {
            Ok(d) => return Ok(Box::new(d)),
            Err(e) => say(&format!(
                "O_DIRECT not available on {} ({e}); using the page cache",
                path.display()
            )),
        }
    }
    Ok(Box::new(cached()?))
}

/// Write the image in `inner` (format `fmt`) through `sink`; returns its virtual size.
#[allow(clippy::too_many_arguments)]
fn ingest_image(
    fmt: Format,
    inner: Stream<'_>,
    sink: &Sink<'_>,
    ticker: &mut Ticker<'_, '_>,
    budget: u64,
    spill_dir: Option<&Path>,
    threads: u32,
    say: &dyn Fn(&str),
    report: &mut ImportReport,
) -> Result<u64> {
    report.format = Some(if fmt == Format::Iso { Format::Raw } else { fmt });
    match fmt {
        Format::Raw | Format::Iso => {
            let (size, vhd) = ingest_raw(inner, sink, ticker)?;
            if vhd {
                report.format = Some(Format::VhdFixed);
            }
            Ok(size)
        }
        Format::Qcow2 => {
            use crate::qcow2::stream;
            let mut inner = inner;
            let mut fill = |b: &mut [u8]| read_full(&mut inner, b);
            let opened = stream::open(&mut fill)?;
            let h = opened.header();
            if h.size > sink.capacity {
                return Err(too_large(Some(h.size), sink.capacity));
            }
            // One budget for all the reader holds: the caller's share for held-back data
            // and mapping state, on top of the reader's fixed working buffers.
            let cs = h.cluster_size();
            let base = stream::working_set(cs, threads).max(STREAM_BASE - MAPPING_ALLOWANCE);
            let limit = budget
                .saturating_add(base)
                .saturating_add(MAPPING_ALLOWANCE);
            let mem = crate::budget::Budget::new(limit);
            let sopts = stream::Options {
                memory: budget,
                budget: &mem,
                spill_dir,
                threads,
                say,
            };
            let r = stream::run(opened, &mut fill, sink, &sopts, &mut || ticker.tick())?;
            report.spilled_bytes = r.spilled_bytes;
            Ok(r.virtual_size)
        }
        Format::Tar => {
            // A tar holding a disk: the first file entry is the image, sparse or not (CDI's
            // rule), read through the bounded tar reader; a sparse entry's holes read as
            // zeros, which the sink leaves as holes.
            let mut ar = crate::archive::tar::TarReader::new(inner);
            while let Some(entry) = ar.next_entry()? {
                if entry.is_file() {
                    let (layers, f, s) = stream::unwrap_layers_with_budget(
                        Box::new(ar.into_entry_reader()),
                        threads,
                        DECODER_BUDGET,
                    )?;
                    report.layers.extend(layers);
                    if matches!(f, Format::Tar) {
                        return Err(Error::new(
                            ErrorKind::UnsupportedFormat,
                            "tar inside a tar is not a disk image",
                        ));
                    }
                    return ingest_image(
                        f, s, sink, ticker, budget, spill_dir, threads, say, report,
                    );
                }
            }
            Err(Error::new(
                ErrorKind::UnsupportedFormat,
                "tar archive holds no disk image file",
            ))
        }
        Format::Vmdk | Format::Vhd | Format::Vdi | Format::Vhdx => {
            // Front to back through the format's streaming strategy; a layout that needs
            // random access goes through the spool file.
            let mut inner = inner;
            let mem = crate::budget::Budget::new(budget.saturating_add(STREAM_BASE));
            let head_limit =
                usize::try_from(budget.saturating_add(MAPPING_ALLOWANCE)).unwrap_or(usize::MAX);
            let outcome = {
                let mut fill = |b: &mut [u8]| read_full(&mut inner, b);
                crate::forward::run(
                    fmt,
                    &mut fill,
                    sink,
                    sink.capacity,
                    head_limit,
                    &mem,
                    &mut || ticker.tick(),
                    &|size| too_large(Some(size), sink.capacity),
                )?
            };
            match outcome {
                crate::forward::Outcome::Done(size) => Ok(size),
                crate::forward::Outcome::Spool(held) => {
                    let rest: Stream<'_> = Box::new(std::io::Cursor::new(held).chain(inner));
                    spool_and_copy(fmt, rest, sink, ticker, spill_dir, say)
                }
            }
        }
        Format::VhdFixed => spool_and_copy(fmt, inner, sink, ticker, spill_dir, say),
        other => Err(Error::new(
            ErrorKind::UnsupportedFormat,
            format!(
                "recognised as {} image; this format cannot be imported yet",
                other.name()
            ),
        )),
    }
}

/// A format read through its random-access reader: the stream is first copied to an unlinked
/// file beside the target (or in the temporary directory for a device), in 1 MiB pieces, then
/// opened as an untrusted image of format `fmt` and copied extent by extent; memory stays at
/// the buffer and the reader's bounded tables, whatever the image size.
fn spool_and_copy(
    fmt: Format,
    mut inner: Stream<'_>,
    sink: &Sink<'_>,
    ticker: &mut Ticker<'_, '_>,
    spill_dir: Option<&Path>,
    say: &dyn Fn(&str),
) -> Result<u64> {
    use crate::qcow2::stream::Target;
    use std::os::unix::fs::FileExt;
    const BUF: usize = 1 << 20;
    let dir = match spill_dir {
        Some(d) if d.as_os_str().is_empty() => PathBuf::from("."),
        Some(d) => d.to_path_buf(),
        None => std::env::temp_dir(),
    };
    let p = dir.join(format!(".vdisk-spool-{}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&p)
        .map_err(|e| Error::io("cannot create spool file", e).with_path(&p))?;
    let _ = std::fs::remove_file(&p);
    say(&format!(
        "{} images are read with random access: spooling the stream to a temporary file in {}",
        fmt.name(),
        dir.display()
    ));
    let mut buf = vec![0u8; BUF];
    let mut pos = 0u64;
    loop {
        let n = read_full(&mut inner, &mut buf)?;
        if n == 0 {
            break;
        }
        f.write_all_at(&buf[..n], pos)
            .map_err(|e| Error::io("cannot write spool file", e).with_path(&dir))?;
        pos += n as u64;
        ticker.tick()?;
        if n < buf.len() {
            break;
        }
    }
    let io = FileIo::from_file(f).map_err(|e| Error::io("cannot open spool file", e))?;
    let opts = crate::image::OpenOptions {
        format: Some(fmt),
        policy: crate::image::Policy::Untrusted,
        ..Default::default()
    };
    let img = crate::image::Image::from_io(Arc::new(io), &opts)?;
    let size = img.virtual_size();
    if size > sink.capacity {
        return Err(too_large(Some(size), sink.capacity));
    }
    let mut off = 0u64;
    while off < size {
        let e = img.extent(off, size - off)?;
        if e.zero || !e.data {
            sink.zero(off, e.len)?;
        } else {
            let mut o = off;
            while o < off + e.len {
                let n = (off + e.len - o).min(BUF as u64) as usize;
                img.read_at(&mut buf[..n], o)?;
                sink.write(o, &buf[..n])?;
                o += n as u64;
            }
        }
        off += e.len;
    }
    Ok(size)
}

/// A raw stream (what follows is known only at its end): written as it comes, except that the
/// last 512 bytes are held back; when they are a fixed-VHD footer (a fixed VHD looks raw from
/// its head) they are dropped and the disk takes the footer's size, as qemu sees such a file.
/// Returns the virtual size and whether it was a fixed VHD.
fn ingest_raw(
    mut inner: Stream<'_>,
    sink: &Sink<'_>,
    ticker: &mut Ticker<'_, '_>,
) -> Result<(u64, bool)> {
    // Decoding (this thread) and zero-scanning + writing (a helper thread) overlap; a few
    // 1 MiB buffers circulate between them, so memory stays bounded. Each buffer is sent one
    // read late, so the stream's last one is known as such.
    const BUF: usize = 1 << 20;
    const IN_FLIGHT: usize = 3;
    const FOOTER: usize = 512;
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<(u64, Vec<u8>, usize)>(IN_FLIGHT);
    let (free_tx, free_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(IN_FLIGHT + 2);
    for _ in 0..IN_FLIGHT + 2 {
        let _ = free_tx.send(vec![0u8; BUF]);
    }
    let capacity = sink.capacity;
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> Result<()> {
            use crate::qcow2::stream::Target;
            for (pos, buf, n) in full_rx {
                sink.write(pos, &buf[..n])?;
                let _ = free_tx.send(buf);
            }
            Ok(())
        });
        let read = (|| -> Result<(u64, bool)> {
            let mut pos = 0u64;
            let mut held: Option<(Vec<u8>, usize)> = None;
            loop {
                let Ok(mut buf) = free_rx.recv() else {
                    // The writer stopped (its error is reported below).
                    return Ok((pos, false));
                };
                let n = read_full(&mut inner, &mut buf)?;
                if n == 0 {
                    break;
                }
                if pos + n as u64 > capacity.saturating_add(FOOTER as u64) {
                    return Err(too_large(None, capacity));
                }
                if let Some((b, m)) = held.replace((buf, n)) {
                    if full_tx.send((pos, b, m)).is_err() {
                        return Ok((pos, false));
                    }
                    pos += m as u64;
                }
                ticker.tick()?;
            }
            let Some((b, m)) = held else {
                return Ok((pos, false));
            };
            let end = pos + m as u64;
            let vhd = (m >= FOOTER)
                .then(|| crate::vhd::fixed_footer_size(&b[m - FOOTER..m], end - FOOTER as u64))
                .flatten();
            let keep = if vhd.is_some() { m - FOOTER } else { m };
            if pos + keep as u64 > capacity {
                return Err(too_large(None, capacity));
            }
            if keep > 0 && full_tx.send((pos, b, keep)).is_err() {
                return Ok((pos, false));
            }
            Ok(match vhd {
                Some(size) => (size, true),
                None => (end, false),
            })
        })();
        drop(full_tx);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(Error::new(ErrorKind::Io, "writer thread panicked")));
        let (size, vhd) = read?;
        written?;
        // qemu sees raw images in whole sectors.
        Ok((if vhd { size } else { size.div_ceil(512) * 512 }, vhd))
    })
}
