//! Streaming ingest: a byte stream in (a pipe, an HTTP body, an upload), a finished disk out on
//! a volume, with no scratch space and bounded memory. This is the one call the importer, the
//! uploader and the C ABI share: [`import`].
//!
//! The stream is unwrapped (gzip, xz, zstd: one layer of each), sniffed, and then:
//! - raw (and ISO) bytes are written as they come, zero runs left as holes;
//! - qcow2 is read front to back without seeking ([`QcowStream`]): header and L1 first, L2
//!   tables recognised as they pass, data written at its guest offsets. Data that arrives
//!   before the L2 table that maps it (compressed images, other producers) is held within a
//!   memory budget and past it spilled to a temporary file on the target's volume, or refused;
//! - a tar holding a disk image yields that image; with content type `archive` a tar is
//!   unpacked safely into a directory ([`crate::archive`]).
//!
//! Writes never go past the target's capacity (so decompression bombs stop with a clear error),
//! and a file target is written under a temporary name and renamed only when complete.

use crate::convert::{CancelToken, TempTarget};
use crate::detect::Format;
use crate::error::{Error, ErrorKind, Result, corrupt};
use crate::io::{BlockIo, FileIo};
use crate::qcow2::compressed;
use crate::qcow2::header::Header;
use crate::sizing;
use crate::stream::{self, Stream};
use byteorder::{BigEndian, ByteOrder};
use std::collections::{BTreeMap, HashMap};
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
    /// Memory for qcow2 data that arrives before its mapping.
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
/// and never writing past its capacity.
struct Sink<'a> {
    io: &'a dyn BlockIo,
    zero_init: bool,
    capacity: u64,
    written: u64,
    /// Small writes at consecutive guest offsets, gathered into one request.
    pending: Vec<u8>,
    pending_off: u64,
    /// Bytes written since the page cache was last released.
    dirty: u64,
}

/// Written bytes between two releases of the target's page cache: dirty and cached pages of
/// the target stay near twice this, whatever the image size (CDI pods have a 600M limit that
/// page cache counts against).
const RELEASE_EVERY: u64 = 32 << 20;

/// Writes smaller than this are gathered (qcow2 data arrives a cluster at a time).
const GATHER: usize = 1 << 20;

impl Sink<'_> {
    fn check(&self, off: u64, len: u64) -> Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.capacity => Ok(()),
            _ => Err(too_large(None, self.capacity)),
        }
    }

    fn write(&mut self, off: u64, data: &[u8]) -> Result<()> {
        self.check(off, data.len() as u64)?;
        let end = self.pending_off + self.pending.len() as u64;
        if !self.pending.is_empty() && (off != end || self.pending.len() + data.len() > GATHER) {
            self.flush_pending()?;
        }
        if data.len() < GATHER {
            if self.pending.is_empty() {
                self.pending_off = off;
            }
            self.pending.extend_from_slice(data);
            return Ok(());
        }
        self.write_now(off, data)
    }

    fn flush_pending(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let data = std::mem::take(&mut self.pending);
        let r = self.write_now(self.pending_off, &data);
        self.pending = data;
        self.pending.clear();
        r
    }

    fn write_now(&mut self, off: u64, data: &[u8]) -> Result<()> {
        const BLOCK: usize = 4096;
        let mut i = 0;
        while i < data.len() {
            let mut j = i;
            let zero = |k: usize| {
                data[k..(k + BLOCK).min(data.len())]
                    .iter()
                    .fold(0u8, |a, &b| a | b)
                    == 0
            };
            let z = zero(i);
            while j < data.len() && zero(j) == z {
                j = (j + BLOCK).min(data.len());
            }
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
                self.written += (j - i) as u64;
                self.dirty += (j - i) as u64;
                if self.dirty >= RELEASE_EVERY {
                    self.io.release_cache();
                    self.dirty = 0;
                }
            }
            i = j;
        }
        Ok(())
    }

    fn zero(&mut self, off: u64, len: u64) -> Result<()> {
        self.check(off, len)?;
        self.flush_pending()?;
        if !self.zero_init && len > 0 {
            self.io
                .write_zeroes(off, len)
                .map_err(|e| Error::io("cannot zero target", e))?;
        }
        Ok(())
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
        stream::unwrap_layers(input, threads)?
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
    let mut sink = Sink {
        io: io.as_ref(),
        zero_init,
        capacity: available,
        written: 0,
        pending: Vec::new(),
        pending_off: 0,
        dirty: 0,
    };
    let spill_dir = match (target, opts.allow_spill) {
        (ImportTarget::File(p), true) => p.parent().map(Path::to_path_buf),
        _ => None,
    };
    let virtual_size = ingest_image(
        fmt,
        inner,
        &mut sink,
        &mut ticker,
        opts.memory_budget,
        spill_dir.as_deref(),
        opts.threads,
        &say,
        &mut report,
    )?;
    sink.flush_pending()?;
    report.virtual_size = virtual_size;
    report.bytes_written = sink.written;
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
    let mut sink = Sink {
        io,
        zero_init,
        capacity,
        written: 0,
        pending: Vec::new(),
        pending_off: 0,
        dirty: 0,
    };
    report.virtual_size = ingest_image(
        fmt,
        inner,
        &mut sink,
        &mut ticker,
        opts.memory_budget,
        None,
        opts.threads,
        &say,
        &mut report,
    )?;
    sink.flush_pending()?;
    report.bytes_written = sink.written;
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
    sink: &mut Sink<'_>,
    ticker: &mut Ticker<'_, '_>,
    budget: u64,
    spill_dir: Option<&Path>,
    threads: u32,
    say: &dyn Fn(&str),
    report: &mut ImportReport,
) -> Result<u64> {
    report.format = Some(if fmt == Format::Iso { Format::Raw } else { fmt });
    match fmt {
        Format::Raw | Format::Iso => ingest_raw(inner, sink, ticker),
        Format::Qcow2 => {
            let mut q = QcowStream::new(inner, budget, spill_dir, say)?;
            if q.header.size > sink.capacity {
                return Err(too_large(Some(q.header.size), sink.capacity));
            }
            let size = q.run(sink, ticker)?;
            report.spilled_bytes = q.spill.spilled;
            Ok(size)
        }
        Format::Tar => {
            // A tar holding a disk: the first regular file is the image.
            let mut ar = tar::Archive::new(inner);
            let entries = ar.entries().map_err(|e| Error::io("cannot read tar", e))?;
            for entry in entries {
                let entry = entry.map_err(|e| Error::io("cannot read tar", e))?;
                if entry.header().entry_type().is_file() {
                    let (layers, f, s) = stream::unwrap_layers(Box::new(entry), threads)?;
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
        other => Err(Error::new(
            ErrorKind::UnsupportedFormat,
            format!(
                "recognised as {} image; this format cannot be imported yet",
                other.name()
            ),
        )),
    }
}

fn ingest_raw(
    mut inner: Stream<'_>,
    sink: &mut Sink<'_>,
    ticker: &mut Ticker<'_, '_>,
) -> Result<u64> {
    // Decoding (this thread) and zero-scanning + writing (a helper thread) overlap; a few
    // 1 MiB buffers circulate between them, so memory stays bounded.
    const BUF: usize = 1 << 20;
    const IN_FLIGHT: usize = 3;
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<(u64, Vec<u8>, usize)>(IN_FLIGHT);
    let (free_tx, free_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(IN_FLIGHT + 1);
    for _ in 0..IN_FLIGHT + 1 {
        let _ = free_tx.send(vec![0u8; BUF]);
    }
    let capacity = sink.capacity;
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> Result<()> {
            for (pos, buf, n) in full_rx {
                sink.write(pos, &buf[..n])?;
                let _ = free_tx.send(buf);
            }
            Ok(())
        });
        let read = (|| -> Result<u64> {
            let mut pos = 0u64;
            loop {
                let Ok(mut buf) = free_rx.recv() else {
                    // The writer stopped (its error is reported below).
                    return Ok(pos);
                };
                let n = read_full(&mut inner, &mut buf)?;
                if n == 0 {
                    return Ok(pos);
                }
                if pos + n as u64 > capacity {
                    return Err(too_large(None, capacity));
                }
                if full_tx.send((pos, buf, n)).is_err() {
                    return Ok(pos);
                }
                pos += n as u64;
                ticker.tick()?;
            }
        })();
        drop(full_tx);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(Error::new(ErrorKind::Io, "writer thread panicked")));
        let pos = read?;
        written?;
        // qemu sees raw images in whole sectors.
        Ok(pos.div_ceil(512) * 512)
    })
}

/// Where qcow2 clusters whose role is not known yet are kept: memory up to a budget, then an
/// unlinked temporary file on the target's volume.
struct Spill<'s> {
    budget: u64,
    used: u64,
    mem: HashMap<u64, Vec<u8>>,
    dir: Option<&'s Path>,
    file: Option<std::fs::File>,
    file_end: u64,
    on_file: HashMap<u64, (u64, usize)>,
    spilled: u64,
    say: &'s dyn Fn(&str),
}

impl Spill<'_> {
    fn put(&mut self, host: u64, data: &[u8]) -> Result<()> {
        if self.used + data.len() as u64 <= self.budget {
            self.used += data.len() as u64;
            self.mem.insert(host, data.to_vec());
            return Ok(());
        }
        let Some(dir) = self.dir else {
            return Err(Error::new(
                ErrorKind::TooLarge,
                "qcow2 data arrives before the tables that map it and exceeds the memory budget; \
                 spilling is not allowed (use seekable input, a larger budget, or allow spilling)",
            ));
        };
        if self.file.is_none() {
            let p = dir.join(format!(".vdisk-spill-{}", std::process::id()));
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&p)
                .map_err(|e| Error::io("cannot create spill file", e).with_path(&p))?;
            let _ = std::fs::remove_file(&p);
            (self.say)(&format!(
                "qcow2 data arrives before its mapping; spilling past {} MiB of memory to a temporary file in {}",
                self.budget >> 20,
                dir.display()
            ));
            self.file = Some(f);
        }
        use std::os::unix::fs::FileExt;
        let f = self
            .file
            .as_ref()
            .ok_or_else(|| Error::invalid("spill file"))?;
        f.write_all_at(data, self.file_end)
            .map_err(|e| Error::io("cannot write spill file", e))?;
        self.on_file.insert(host, (self.file_end, data.len()));
        self.file_end += data.len() as u64;
        self.spilled += data.len() as u64;
        Ok(())
    }

    fn take(&mut self, host: u64) -> Result<Option<Vec<u8>>> {
        if let Some(v) = self.mem.remove(&host) {
            self.used -= v.len() as u64;
            return Ok(Some(v));
        }
        self.get_file(host, true)
    }

    fn get(&mut self, host: u64) -> Result<Option<Vec<u8>>> {
        if let Some(v) = self.mem.get(&host) {
            return Ok(Some(v.clone()));
        }
        self.get_file(host, false)
    }

    fn get_file(&mut self, host: u64, remove: bool) -> Result<Option<Vec<u8>>> {
        let found = if remove {
            self.on_file.remove(&host)
        } else {
            self.on_file.get(&host).copied()
        };
        let Some((off, len)) = found else {
            return Ok(None);
        };
        use std::os::unix::fs::FileExt;
        let f = self
            .file
            .as_ref()
            .ok_or_else(|| Error::invalid("spill file"))?;
        let mut v = vec![0u8; len];
        f.read_exact_at(&mut v, off)
            .map_err(|e| Error::io("cannot read spill file", e))?;
        Ok(Some(v))
    }

    fn clear(&mut self) {
        self.mem.clear();
        self.used = 0;
        self.on_file.clear();
    }
}

const COPIED: u64 = 1 << 63;
const COMPRESSED_FLAG: u64 = 1 << 62;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Mapping entries waiting for their data, at most (bounds memory on hostile streams).
const MAX_PENDING: usize = 4 << 20;

/// A qcow2 image read front to back from a non-seekable stream.
struct QcowStream<'a, 's> {
    input: Stream<'a>,
    header: Header,
    cs: u64,
    /// Bytes consumed from the stream.
    pos: u64,
    l1: Option<Vec<u64>>,
    l1_raw: Vec<u8>,
    /// L2 tables not seen yet: host offset -> L1 index.
    l2_pending: HashMap<u64, u64>,
    /// Plain data clusters not seen yet: host cluster offset -> (guest offset, bytes, within).
    data: BTreeMap<u64, Vec<(u64, u64, u64)>>,
    /// Compressed clusters not decoded yet: host byte offset -> (guest, compressed size).
    compressed: BTreeMap<u64, Vec<(u64, u64)>>,
    pending: usize,
    spill: Spill<'s>,
    /// The previous cluster's bytes (compressed data may span two clusters).
    prev: Vec<u8>,
    /// Decompression buffer.
    out: Vec<u8>,
    /// Refcount blocks still ahead in the stream.
    refblocks: std::collections::HashSet<u64>,
}

impl<'a, 's> QcowStream<'a, 's> {
    fn new(
        mut input: Stream<'a>,
        budget: u64,
        dir: Option<&'s Path>,
        say: &'s dyn Fn(&str),
    ) -> Result<Self> {
        let mut fixed = [0u8; 24];
        let n = read_full(&mut input, &mut fixed)?;
        if n < 24 {
            return Err(corrupt!("qcow2 stream too short for a header"));
        }
        let bits = BigEndian::read_u32(&fixed[20..24]);
        if !(9..=21).contains(&bits) {
            return Err(corrupt!("unsupported cluster size: 2^{bits}"));
        }
        let cs = 1u64 << bits;
        let mut head = vec![0u8; cs as usize];
        head[..24].copy_from_slice(&fixed);
        let n = read_full(&mut input, &mut head[24..])?;
        head.truncate(24 + n);
        let header = Header::parse(&head, u64::MAX)?;
        if let Some(b) = &header.backing_file {
            return Err(Error::new(
                ErrorKind::Denied,
                format!("image has backing file '{b}', which untrusted input may not"),
            ));
        }
        if let Some(d) = &header.data_file {
            return Err(Error::new(
                ErrorKind::Denied,
                format!("image uses external data file '{d}', which untrusted input may not"),
            ));
        }
        head.resize(cs as usize, 0);
        let l1_bytes = u64::from(header.l1_size) * 8;
        let spill = Spill {
            budget,
            used: 0,
            mem: HashMap::new(),
            dir,
            file: None,
            file_end: 0,
            on_file: HashMap::new(),
            spilled: 0,
            say,
        };
        let mut q = QcowStream {
            input,
            cs,
            pos: cs,
            l1: None,
            l1_raw: Vec::with_capacity(l1_bytes as usize),
            l2_pending: HashMap::new(),
            data: BTreeMap::new(),
            compressed: BTreeMap::new(),
            pending: 0,
            spill,
            prev: Vec::new(),
            out: Vec::new(),
            refblocks: std::collections::HashSet::new(),
            header,
        };
        if q.header.l1_table_offset < cs && l1_bytes > 0 {
            return Err(corrupt!("L1 table overlaps the header"));
        }
        if l1_bytes == 0 {
            q.l1 = Some(Vec::new());
        }
        Ok(q)
    }

    fn mapping_known(&self) -> bool {
        self.l1.is_some() && self.l2_pending.is_empty()
    }

    fn done(&self) -> bool {
        self.mapping_known() && self.data.is_empty() && self.compressed.is_empty()
    }

    fn run(&mut self, sink: &mut Sink<'_>, ticker: &mut Ticker<'_, '_>) -> Result<u64> {
        let cs = self.cs as usize;
        let mut buf = vec![0u8; cs];
        loop {
            let n = read_full(&mut self.input, &mut buf)?;
            if n == 0 {
                break;
            }
            buf[n..].fill(0);
            if !self.done() {
                self.cluster(&buf, sink)?;
            }
            self.prev.clear();
            self.prev.extend_from_slice(&buf);
            self.pos += self.cs;
            ticker.tick()?;
        }
        if self.l1.is_none() {
            return Err(corrupt!(
                "stream ended before the L1 table (truncated image?)"
            ));
        }
        if !self.l2_pending.is_empty() || !self.data.is_empty() || !self.compressed.is_empty() {
            return Err(corrupt!(
                "stream ended at {} bytes before all of the image's data arrived (truncated image?)",
                self.pos
            ));
        }
        Ok(self.header.size)
    }

    /// Handle the cluster at `self.pos`.
    fn cluster(&mut self, c: &[u8], sink: &mut Sink<'_>) -> Result<()> {
        let pos = self.pos;
        let mut claimed = false;
        let l1_off = self.header.l1_table_offset;
        let l1_bytes = u64::from(self.header.l1_size) * 8;
        if self.l1.is_none() && pos + self.cs > l1_off && pos < l1_off + l1_bytes {
            let a = l1_off.saturating_sub(pos) as usize;
            let b = ((l1_off + l1_bytes - pos) as usize).min(c.len());
            self.l1_raw.extend_from_slice(&c[a..b]);
            claimed = true;
            if self.l1_raw.len() as u64 == l1_bytes {
                self.parse_l1(sink)?;
            }
        }
        // Refcount structures are not needed to read the image: recognise them so they are
        // never held back as possible data (the refcount table lists every refcount block).
        let rt = self.header.refcount_table_offset;
        let rt_end =
            rt + (u64::from(self.header.refcount_table_clusters) << self.header.cluster_bits);
        if pos >= rt && pos < rt_end {
            for e in c.chunks_exact(8).map(BigEndian::read_u64) {
                let off = e & 0xffff_ffff_ffff_fe00;
                if off > pos && off % self.cs == 0 && self.refblocks.len() < MAX_PENDING {
                    self.refblocks.insert(off);
                }
            }
            claimed = true;
        }
        if self.refblocks.remove(&pos) {
            claimed = true;
        }
        if let Some(l1i) = self.l2_pending.remove(&pos) {
            self.parse_l2(c, l1i, sink)?;
            claimed = true;
        }
        if let Some(users) = self.data.remove(&pos) {
            self.pending -= users.len();
            for (guest, len, within) in users {
                sink.write(guest, &c[within as usize..(within + len) as usize])?;
            }
            claimed = true;
        }
        self.decode_ready(Some(c), sink)?;
        if !claimed && !self.mapping_known() {
            self.spill.put(pos, c)?;
        }
        if self.mapping_known()
            && (!self.spill.mem.is_empty() || !self.spill.on_file.is_empty())
            && self.data.is_empty()
            && self.compressed.is_empty()
        {
            self.spill.clear();
        }
        Ok(())
    }

    fn parse_l1(&mut self, sink: &mut Sink<'_>) -> Result<()> {
        let cs = self.cs;
        let per_l2 = cs * self.header.l2_entries();
        let size = self.header.size;
        let mut l1 = Vec::with_capacity(self.l1_raw.len() / 8);
        let raw = std::mem::take(&mut self.l1_raw);
        for (i, e) in raw.chunks_exact(8).map(BigEndian::read_u64).enumerate() {
            let i = i as u64;
            if i * per_l2 >= size {
                break;
            }
            if e & 0x7f00_0000_0000_01ff != 0 {
                return Err(corrupt!("L1 entry {i} has reserved bits set ({e:#x})"));
            }
            let off = e & OFFSET_MASK;
            l1.push(off);
            if off == 0 {
                sink.zero(i * per_l2, per_l2.min(size - i * per_l2))?;
                continue;
            }
            if off % cs != 0 || off < cs {
                return Err(corrupt!("L2 table offset {off:#x} is invalid"));
            }
            if off < self.pos {
                // Passed before the L1 arrived: it was kept.
                let t = self.spill.take(off)?.ok_or_else(|| {
                    corrupt!("L2 table at {off:#x} precedes the L1 table and was not kept")
                })?;
                self.parse_l2(&t, i, sink)?;
            } else if self.l2_pending.insert(off, i).is_some() {
                return Err(corrupt!("two L1 entries name the L2 table at {off:#x}"));
            }
        }
        self.l1 = Some(l1);
        Ok(())
    }

    fn parse_l2(&mut self, t: &[u8], l1i: u64, sink: &mut Sink<'_>) -> Result<()> {
        let cs = self.cs;
        let bits = self.header.cluster_bits;
        let ext = self.header.extended_l2();
        let step = if ext { 16 } else { 8 };
        let size = self.header.size;
        let base = l1i * self.header.l2_entries() * cs;
        let sub = cs / 32;
        for (k, e) in t.chunks_exact(step).enumerate() {
            let guest = base + k as u64 * cs;
            if guest >= size {
                break;
            }
            let len = cs.min(size - guest);
            let v = BigEndian::read_u64(&e[..8]);
            if v & COMPRESSED_FLAG != 0 {
                let x = 62 - (bits - 8);
                let off = v & ((1u64 << x) - 1);
                let nsect = (v >> x) & ((1u64 << (bits - 8)) - 1);
                let csize = (nsect + 1) * 512 - (off & 511);
                self.compressed.entry(off).or_default().push((guest, csize));
                self.pending += 1;
                continue;
            }
            let host = v & OFFSET_MASK;
            // Bit 0: the zero flag, or unused with extended L2 (ignored, as qemu does).
            if v & 0x3f00_0000_0000_01fe != 0 {
                return Err(corrupt!(
                    "L2 entry for guest offset {guest:#x} has reserved bits set ({v:#x})"
                ));
            }
            if host % cs != 0 {
                return Err(corrupt!(
                    "data cluster offset {host:#x} is not cluster aligned"
                ));
            }
            let _ = COPIED;
            // Runs of (allocated?, zero?) per unit: one unit, or 32 subclusters.
            // (offset in cluster, state) per unit: 0 reads zero, 1 data, 2 invalid. Without a
            // backing file, unallocated and zero both read as zeros.
            let units: Vec<(u64, u8)> = if ext {
                let bm = BigEndian::read_u64(&e[8..16]);
                (0..32u64)
                    .map(|s| {
                        let (a, z) = ((bm >> s) & 1 == 1, (bm >> (32 + s)) & 1 == 1);
                        (
                            s * sub,
                            if a && (z || host == 0) {
                                2
                            } else {
                                u8::from(a)
                            },
                        )
                    })
                    .collect()
            } else if host != 0 && v & 1 == 0 {
                vec![(0, 1)]
            } else {
                vec![(0, 0)]
            };
            let unit = if ext { sub } else { cs };
            for (o, alloc) in units {
                if o >= len {
                    break;
                }
                let ulen = unit.min(len - o);
                match alloc {
                    2 => {
                        return Err(corrupt!(
                            "invalid subcluster bitmap for guest offset {guest:#x}"
                        ));
                    }
                    1 => {
                        let h = host;
                        if h < self.pos + cs {
                            let bytes = if h == self.pos {
                                None
                            } else {
                                self.spill.get(h)?
                            };
                            match bytes {
                                Some(b) => {
                                    sink.write(guest + o, &b[o as usize..(o + ulen) as usize])?
                                }
                                None if h == self.pos => {
                                    self.data.entry(h).or_default().push((guest + o, ulen, o));
                                    self.pending += 1;
                                }
                                None => {
                                    return Err(corrupt!(
                                        "data at {h:#x} for guest offset {guest:#x} was passed and not kept"
                                    ));
                                }
                            }
                        } else {
                            self.data.entry(h).or_default().push((guest + o, ulen, o));
                            self.pending += 1;
                        }
                    }
                    _ => sink.zero(guest + o, ulen)?,
                }
            }
            if self.pending > MAX_PENDING {
                return Err(Error::new(
                    ErrorKind::TooLarge,
                    "too many mappings waiting for their data",
                ));
            }
        }
        Ok(())
    }

    /// Decode every compressed cluster whose bytes are all available (spill, previous and
    /// current cluster).
    fn decode_ready(&mut self, cur: Option<&[u8]>, sink: &mut Sink<'_>) -> Result<()> {
        let cs = self.cs;
        let window_end = self.pos + cs;
        let ready: Vec<u64> = self
            .compressed
            .range(..window_end)
            .map(|(k, _)| *k)
            .collect();
        let mut out = std::mem::take(&mut self.out);
        out.resize(cs as usize, 0);
        for off in ready {
            let Some(users) = self.compressed.get(&off) else {
                continue;
            };
            let csize = users.iter().map(|u| u.1).max().unwrap_or(0);
            let end = off + csize;
            if end > window_end {
                // Wait for the next cluster, unless the tail is already known to be spilled.
                continue;
            }
            let mut bytes: Vec<u8> = Vec::with_capacity(csize as usize);
            let mut p = off;
            while p < end {
                let c = p / cs * cs;
                let owned;
                let piece: &[u8] = if c == self.pos {
                    cur.unwrap_or(&[])
                } else if c + cs == self.pos && !self.prev.is_empty() {
                    &self.prev
                } else {
                    owned = self.spill.get(c)?.ok_or_else(|| {
                        corrupt!("compressed data at {p:#x} was passed and not kept")
                    })?;
                    &owned
                };
                let a = (p - c) as usize;
                let b = ((end - c) as usize).min(piece.len());
                if a >= b {
                    return Err(corrupt!("compressed data at {off:#x} is incomplete"));
                }
                bytes.extend_from_slice(&piece[a..b]);
                p = c + b as u64;
            }
            let users = self.compressed.remove(&off).unwrap_or_default();
            self.pending -= users.len();
            compressed::decode(self.header.compression_type, &bytes, &mut out).map_err(|e| {
                corrupt!(
                    "cannot decompress cluster at host {off:#x}: {}",
                    e.message()
                )
            })?;
            for (guest, _) in users {
                let len = cs.min(self.header.size - guest);
                sink.write(guest, &out[..len as usize])?;
            }
        }
        self.out = out;
        Ok(())
    }
}
