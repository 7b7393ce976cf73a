//! The conversion engine: any readable [`Image`] to a raw target, sparse.
//!
//! The virtual disk is cut into fixed chunks that worker threads (one per core) take in turn.
//! Each worker asks the source for block status, never reads ranges that are unallocated or
//! known zero, reads data ranges in large requests (compressed clusters are decoded in the
//! worker, so decompression runs on every core), scans them for zero runs of at least
//! `min_sparse` bytes and writes only the rest. A fresh target reads as zeros, so holes cost
//! nothing; other targets get explicit zeroing. Memory is a few chunk buffers per worker,
//! whatever the image size. Progress is reported on the caller's thread.

use crate::error::{Error, ErrorKind, Result};
use crate::image::Image;
use crate::io::{BlockIo, FileIo, is_zero};
use crate::qcow2::writer::{Builder, CreateOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// Work unit handed to a worker, and its buffer size.
const CHUNK: u64 = 4 << 20;
/// In-order chunk size, and the qcow2 writer's read piece.
const PIECE: u64 = 1 << 20;
/// Largest single read of a raw conversion (see `copy_range`): 256 KiB stays in the CPU cache
/// between the read, the zero scan and the write, and keeps the two workers' buffers and
/// compressed spans within 8 MiB of peak RSS (1 MiB pieces took 1-1.5 MiB more at the same
/// speed on the benchmark corpus; 4 MiB pieces fall out of the cache).
const READ_PIECE: u64 = 256 << 10;
/// Zero detection granularity (a sector).
const SECTOR: usize = 512;
/// Largest `min_sparse` qemu-img accepts.
pub const MAX_MIN_SPARSE: u64 = 16 << 20;

/// A flag another thread can set to stop a running operation.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A new, unset token.
    pub fn new() -> Self {
        Self::default()
    }
    /// Ask the operation to stop; it returns [`ErrorKind::Cancelled`] soon after.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
    /// True once [`CancelToken::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Progress callback: `(bytes done, bytes total)`; return `false` to cancel.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64) -> bool;

/// How to convert.
pub struct ConvertOptions<'a> {
    /// Zero runs at least this long (bytes, multiple of 512) become holes; 0 writes every byte.
    pub min_sparse: u64,
    /// Worker threads; 0 means one per available core.
    pub threads: usize,
    /// Called on the caller's thread about ten times a second and once at the end.
    pub progress: Option<Progress<'a>>,
    /// Cancellation from another thread.
    pub cancel: Option<CancelToken>,
    /// Read at most this many source bytes per second (qemu-img's `-r`); 0: no limit.
    pub rate_limit: u64,
    /// On a read error, retry the range sector by sector and write zeros for the sectors
    /// that cannot be read, reporting each to `warn` (qemu-img's `--salvage`).
    pub salvage: bool,
    /// Where `salvage` reports what it could not read.
    pub warn: Option<&'a (dyn Fn(&str) + Sync)>,
    /// Copy data that lies as is in the image file (raw images, plain qcow2 clusters) inside
    /// the kernel (`copy_file_range`, qemu-img's `-C`); no zero detection for such data.
    pub copy_offload: bool,
    /// Raw targets: write in increasing offset order (qemu-img's default; its `-W` allows any
    /// order). Reads and zero detection still run on every worker, each chunk held until the
    /// chunks before it are written. Off (any order) by default for the library.
    pub in_order: bool,
}

impl Default for ConvertOptions<'_> {
    fn default() -> Self {
        ConvertOptions {
            min_sparse: 4096,
            threads: 0,
            progress: None,
            cancel: None,
            rate_limit: 0,
            salvage: false,
            warn: None,
            copy_offload: false,
            in_order: false,
        }
    }
}

impl std::fmt::Debug for ConvertOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConvertOptions")
            .field("min_sparse", &self.min_sparse)
            .field("threads", &self.threads)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

/// What a conversion did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Virtual size of the disk written.
    pub virtual_size: u64,
    /// Guest bytes read from the source (allocated, non-zero ranges).
    pub bytes_read: u64,
    /// Bytes written to the target as data.
    pub bytes_written: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// Work sharing between the caller's thread (progress, cancellation) and the workers.
struct Pool<'w> {
    threads: usize,
    total: u64,
    next: AtomicU64,
    end: AtomicU64,
    done: AtomicU64,
    read: AtomicU64,
    written: AtomicU64,
    stop: AtomicBool,
    cancelled: AtomicBool,
    cancel: Option<CancelToken>,
    error: Mutex<Option<Error>>,
    /// Bytes per second to read at most (0: no limit), and when reading started.
    rate: u64,
    started: Instant,
    salvage: bool,
    warn: Option<&'w (dyn Fn(&str) + Sync)>,
    /// Guest bytes a worker takes at a time.
    chunk: u64,
    /// In-order writes: where the next chunk to write starts.
    turn: Mutex<u64>,
    turned: std::sync::Condvar,
}

/// A task run on chunks: `(worker buffer, chunk start, chunk end)`.
type Task<'t> = dyn Fn(&mut Vec<u8>, u64, u64) -> Result<()> + Sync + 't;

impl<'w> Pool<'w> {
    fn new(total: u64, opts: &ConvertOptions<'w>) -> Result<Pool<'w>> {
        if opts.min_sparse % SECTOR as u64 != 0 || opts.min_sparse > MAX_MIN_SPARSE {
            return Err(Error::invalid(format!(
                "invalid sparse size {}: must be a multiple of 512 up to 16 MiB",
                opts.min_sparse
            )));
        }
        let threads = match opts.threads {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            n => n,
        }
        .clamp(1, 64)
        .min(total.div_ceil(CHUNK).max(1) as usize);
        Ok(Pool {
            threads,
            total,
            next: AtomicU64::new(0),
            end: AtomicU64::new(0),
            done: AtomicU64::new(0),
            read: AtomicU64::new(0),
            written: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            cancelled: AtomicBool::new(false),
            cancel: opts.cancel.clone(),
            error: Mutex::new(None),
            rate: opts.rate_limit,
            started: Instant::now(),
            salvage: opts.salvage,
            warn: opts.warn,
            // In order, each worker holds its chunk until its turn: keep them small.
            chunk: if opts.in_order { PIECE } else { CHUNK },
            turn: Mutex::new(0),
            turned: std::sync::Condvar::new(),
        })
    }

    /// Wait until every chunk before `start` is written (or the run stops).
    fn wait_turn(&self, start: u64) -> Result<()> {
        let mut t = self.turn.lock().unwrap_or_else(|p| p.into_inner());
        while *t != start {
            if self.stop.load(Ordering::Relaxed) {
                return Err(Error::new(ErrorKind::Cancelled, "conversion stopped"));
            }
            t = self
                .turned
                .wait_timeout(t, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// The chunk ending at `end` is written: the next may go.
    fn pass_turn(&self, end: u64) {
        *self.turn.lock().unwrap_or_else(|p| p.into_inner()) = end;
        self.turned.notify_all();
    }

    /// Count `n` bytes read from the source and, under a rate limit, wait until the total
    /// read is no more than the limit allows for the time spent.
    fn count_read(&self, n: u64) {
        let total = self.read.fetch_add(n, Ordering::Relaxed) + n;
        if self.rate > 0 {
            let due = Duration::from_secs_f64(total as f64 / self.rate as f64);
            if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }

    /// Read `buf` at guest `pos` of `src`; with salvage, a failed read is retried sector by
    /// sector and sectors that still fail read as zeros (each reported).
    fn read(&self, src: &Image, buf: &mut [u8], pos: u64) -> Result<()> {
        match src.read_at(buf, pos) {
            Err(_) if self.salvage => {
                for (k, sector) in buf.chunks_mut(SECTOR).enumerate() {
                    let at = pos + (k * SECTOR) as u64;
                    if let Err(e2) = src.read_at(sector, at) {
                        sector.fill(0);
                        if let Some(w) = self.warn {
                            w(&format!("error while reading offset {at}: {e2}"));
                        }
                    }
                }
                Ok(())
            }
            r => r,
        }
    }

    /// Run `task` over `start..end` in [`CHUNK`]s on the worker threads, reporting progress
    /// from this thread. Returns the first error, or `Cancelled`.
    fn run(
        &self,
        start: u64,
        end: u64,
        progress: &mut Option<Progress<'_>>,
        task: &Task<'_>,
    ) -> Result<()> {
        self.next.store(start, Ordering::Relaxed);
        self.end.store(end, Ordering::Relaxed);
        std::thread::scope(|s| {
            let (tx, rx) = mpsc::channel::<()>();
            for _ in 0..self.threads {
                let tx = tx.clone();
                s.spawn(move || {
                    self.worker(task);
                    let _ = tx.send(());
                });
            }
            drop(tx);
            let mut finished = 0;
            while finished < self.threads {
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(()) => finished += 1,
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
                if progress
                    .as_mut()
                    .is_some_and(|p| !p(self.done.load(Ordering::Relaxed), self.total))
                {
                    self.cancelled.store(true, Ordering::Relaxed);
                    self.stop.store(true, Ordering::Relaxed);
                }
            }
        });
        if let Some(e) = self.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(e);
        }
        if self.cancelled.load(Ordering::Relaxed) {
            return Err(Error::new(ErrorKind::Cancelled, "conversion cancelled"));
        }
        Ok(())
    }

    fn worker(&self, task: &Task<'_>) {
        let mut buf = Vec::new();
        let end = self.end.load(Ordering::Relaxed);
        while !self.stop.load(Ordering::Relaxed) {
            if self.cancel.as_ref().is_some_and(CancelToken::is_cancelled) {
                self.cancelled.store(true, Ordering::Relaxed);
                self.stop.store(true, Ordering::Relaxed);
                break;
            }
            let start = self.next.fetch_add(self.chunk, Ordering::Relaxed);
            if start >= end {
                break;
            }
            let stop = (start + self.chunk).min(end);
            if let Err(e) = task(&mut buf, start, stop) {
                let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
                if slot.is_none() {
                    *slot = Some(e);
                }
                self.stop.store(true, Ordering::Relaxed);
                break;
            }
            self.done.fetch_add(stop - start, Ordering::Relaxed);
        }
    }

    fn report(&self, t0: Instant, progress: &mut Option<Progress<'_>>) -> Report {
        if let Some(p) = progress.as_mut() {
            p(self.total, self.total);
        }
        Report {
            virtual_size: self.total,
            bytes_read: self.read.load(Ordering::Relaxed),
            bytes_written: self.written.load(Ordering::Relaxed),
            elapsed: t0.elapsed(),
        }
    }
}

struct Shared<'s> {
    src: &'s Image,
    dst: &'s dyn BlockIo,
    min_sparse: u64,
    target_is_zero: bool,
    pool: &'s Pool<'s>,
    /// In-kernel copies from this file (the source's own), when offloading.
    offload: Option<&'s dyn BlockIo>,
}

/// Copy the whole virtual disk of `src` into `dst` as raw bytes. `target_is_zero` says `dst`
/// already reads as zeros (a new file), so zero ranges need no write at all. `dst` must be at
/// least the source's virtual size.
pub fn convert_to_raw(
    src: &Image,
    dst: &dyn BlockIo,
    target_is_zero: bool,
    opts: &mut ConvertOptions<'_>,
) -> Result<Report> {
    let t0 = Instant::now();
    let size = src.virtual_size();
    let pool = Pool::new(size, opts)?;
    let sh = Shared {
        src,
        dst,
        min_sparse: opts.min_sparse,
        target_is_zero,
        pool: &pool,
        // Host offsets name the image's own file for raw images and for qcow2 images that
        // keep their data in it (other formats may name other files).
        offload: (opts.copy_offload
            && match src.qcow2() {
                Some(q) => q.header().data_file.is_none(),
                None => src.format() == crate::Format::Raw,
            })
        .then(|| src.file().as_ref()),
    };
    let in_order = opts.in_order && sh.offload.is_none();
    pool.run(0, size, &mut opts.progress, &|buf, start, end| {
        buf.resize(READ_PIECE as usize, 0);
        if !in_order {
            return copy_range(&sh, buf, start, end);
        }
        // Read and scan now, write when the chunks before this one are written.
        let held = Held::new(size);
        let mine = Shared {
            dst: &held,
            offload: None,
            ..sh
        };
        copy_range(&mine, buf, start, end)?;
        pool.wait_turn(start)?;
        held.replay(dst)?;
        pool.pass_turn(end);
        Ok(())
    })?;
    Ok(pool.report(t0, &mut opts.progress))
}

/// One held write: offset, data (None: zero `len` bytes), length.
type HeldOp = (u64, Option<Vec<u8>>, u64);

/// A chunk's writes and zeroings, held in memory until its turn (in-order writes).
#[derive(Debug)]
struct Held {
    size: u64,
    ops: Mutex<Vec<HeldOp>>,
}

impl Held {
    fn new(size: u64) -> Held {
        Held {
            size,
            ops: Mutex::new(Vec::new()),
        }
    }

    fn replay(&self, dst: &dyn BlockIo) -> Result<()> {
        let ops = std::mem::take(&mut *self.ops.lock().unwrap_or_else(|p| p.into_inner()));
        for (off, data, len) in ops {
            match data {
                Some(d) => dst.write_all_at(&d, off),
                None => dst.write_zeroes(off, len),
            }
            .map_err(|e| Error::io("write failed", e))?;
        }
        Ok(())
    }
}

impl BlockIo for Held {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.size)
    }
    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> std::io::Result<usize> {
        Err(std::io::Error::other("a held chunk is not read"))
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        ops.push((offset, Some(buf.to_vec()), buf.len() as u64));
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        ops.push((offset, None, len));
        Ok(())
    }
}

fn copy_range(sh: &Shared<'_>, buf: &mut [u8], start: u64, end: u64) -> Result<()> {
    let mut pos = start;
    while pos < end {
        let e = sh.src.extent(pos, end - pos)?;
        if e.zero {
            zero_range(sh, pos, e.len)?;
            pos += e.len;
            continue;
        }
        if let (Some(f), Some(host), false, 0) = (sh.offload, e.offset, e.compressed, e.depth) {
            if f.copy_to(sh.dst, host, pos, e.len)
                .map_err(|e| Error::io("in-kernel copy failed", e))?
            {
                sh.pool.count_read(e.len);
                sh.pool.written.fetch_add(e.len, Ordering::Relaxed);
                pos += e.len;
                continue;
            }
        }
        // Merge following non-zero extents so one read covers them (keeps compressed
        // clusters batched and plain data in large requests).
        let mut len = e.len;
        while pos + len < end {
            let n = sh.src.extent(pos + len, end - pos - len)?;
            if n.zero {
                break;
            }
            len += n.len;
        }
        // Read in pieces small enough to stay in the CPU cache between the read, the zero
        // scan and the write.
        let stop = pos + len;
        while pos < stop {
            let n = (stop - pos).min(READ_PIECE);
            let data = &mut buf[..n as usize];
            sh.pool.read(sh.src, data, pos)?;
            sh.pool.count_read(n);
            write_sparse(sh, data, pos)?;
            pos += n;
        }
    }
    Ok(())
}

fn zero_range(sh: &Shared<'_>, pos: u64, len: u64) -> Result<()> {
    if sh.min_sparse == 0 {
        // Fully allocate: write the zeros as data.
        crate::io::write_zeroes_by_writing(sh.dst, pos, len)
            .map_err(|e| Error::io("write failed", e))?;
        sh.pool.written.fetch_add(len, Ordering::Relaxed);
    } else if !sh.target_is_zero {
        sh.dst
            .write_zeroes(pos, len)
            .map_err(|e| Error::io("cannot zero target range", e))?;
    }
    Ok(())
}

/// Write `data` (guest offset `pos`), leaving zero runs of at least `min_sparse` as holes.
fn write_sparse(sh: &Shared<'_>, data: &[u8], pos: u64) -> Result<()> {
    let write = |a: usize, b: usize| -> Result<()> {
        if a < b {
            sh.dst
                .write_all_at(&data[a..b], pos + a as u64)
                .map_err(|e| Error::io("write failed", e))?;
            sh.pool.written.fetch_add((b - a) as u64, Ordering::Relaxed);
        }
        Ok(())
    };
    if sh.min_sparse == 0 {
        return write(0, data.len());
    }
    let min = sh.min_sparse as usize;
    let mut data_start = 0;
    let mut i = 0;
    while i < data.len() {
        let e = (i + SECTOR).min(data.len());
        if !is_zero(&data[i..e]) {
            i = e;
            continue;
        }
        let mut j = e;
        while j < data.len() {
            let k = (j + SECTOR).min(data.len());
            if !is_zero(&data[j..k]) {
                break;
            }
            j = k;
        }
        if j - i >= min {
            write(data_start, i)?;
            zero_range(sh, pos + i as u64, (j - i) as u64)?;
            data_start = j;
        } else if sh.target_is_zero && i == 0 && j == data.len() {
            // Short, and all there is: the target already reads as zeros.
            return Ok(());
        } else if sh.target_is_zero && i == 0 {
            // A short zero run opening the range: the file-system blocks it alone fills
            // already read as zeros, so they are not written (the range's neighbour is a
            // hole or its own writes allocate them).
            let cut = ((pos + j as u64) / FS_BLOCK * FS_BLOCK).saturating_sub(pos) as usize;
            data_start = cut.min(j);
        } else if sh.target_is_zero && j == data.len() {
            // Likewise a short zero run closing it.
            let keep = ((pos + i as u64).div_ceil(FS_BLOCK) * FS_BLOCK - pos) as usize;
            write(data_start, keep.min(data.len()).max(data_start))?;
            return Ok(());
        }
        i = j;
    }
    write(data_start, data.len())
}

/// The file-system block size zero edges are trimmed to.
const FS_BLOCK: u64 = 4096;

/// Write the whole virtual disk of `src` as a new qcow2 image into the empty `dst`.
///
/// Clusters that read as zeros are left unallocated (all clusters are allocated with
/// `min_sparse == 0`); with `compress`, each non-zero cluster is compressed on the worker
/// threads and stored uncompressed when that does not make it smaller. The disk is built in
/// stretches of at least 64 MiB whose L2 tables are placed before their data, so memory holds
/// one stretch's tables whatever the image size.
pub fn convert_to_qcow2(
    src: &Image,
    dst: &dyn BlockIo,
    target: &CreateOptions,
    compress: bool,
    opts: &mut ConvertOptions<'_>,
) -> Result<Report> {
    let t0 = Instant::now();
    if target.prealloc != crate::qcow2::writer::Prealloc::Off && compress {
        return Err(Error::invalid(
            "compression and preallocation cannot be combined",
        ));
    }
    let b = Builder::new(dst, src.virtual_size(), target)?;
    if target.backing.is_some() {
        return overlay_chunks(src, b, compress, opts, t0);
    }
    let size = src.virtual_size();
    let cov = b.l2_coverage();
    let stretch = (64u64 << 20).div_ceil(cov).max(1) * cov;
    let pool = Pool::new(size, opts)?;
    let min_sparse = opts.min_sparse;
    let mut s = 0;
    while s < size {
        let e = (s + stretch).min(size);
        let mut tables: Vec<u64> = Vec::new();
        let mut pos = s;
        while pos < e {
            let x = src.extent(pos, e - pos)?;
            if !x.zero || min_sparse == 0 || target.prealloc != crate::qcow2::writer::Prealloc::Off
            {
                for i in pos / cov..=(pos + x.len - 1) / cov {
                    if tables.last() != Some(&i) {
                        tables.push(i);
                    }
                }
            }
            pos += x.len;
        }
        b.begin_tables(&tables)?;
        if tables.is_empty() {
            pool.done.fetch_add(e - s, Ordering::Relaxed);
        } else {
            pool.run(s, e, &mut opts.progress, &|buf, start, end| {
                qcow2_chunk(src, &b, &pool, compress, min_sparse, buf, start, end)
            })?;
        }
        s = e;
    }
    b.finish()?;
    let r = pool.report(t0, &mut opts.progress);
    Ok(r)
}

/// `convert -B`: the output names a backing file, assumed to hold what the source's own
/// backing chain holds. What the source image holds itself is written (zeros as zero
/// clusters, so the backing file cannot show through); what it takes from its backing chain is
/// left unallocated. A source without a backing file holds every byte itself.
fn overlay_chunks(
    src: &Image,
    b: Builder<'_>,
    compress: bool,
    opts: &mut ConvertOptions<'_>,
    t0: Instant,
) -> Result<Report> {
    let size = src.virtual_size();
    let cs = b.cluster_size();
    let cov = b.l2_coverage();
    let src_backed = src.qcow2().is_some_and(|q| q.backing().is_some());
    let pool = Pool::new(size, opts)?;
    // Whether the source holds part of `start..end` itself, and whether all of that reads as
    // zeros; also how far a run the source does not hold extends (to skip it at once).
    let own = |start: u64, end: u64| -> Result<(bool, bool, u64)> {
        let (mut pos, mut any, mut zero) = (start, false, true);
        while pos < end {
            let x = src.extent(pos, size - pos)?;
            let mine = !src_backed || (x.depth == 0 && x.present);
            if !mine && pos == start && x.len >= cs {
                return Ok((false, true, start + x.len / cs * cs));
            }
            any |= mine;
            zero &= x.zero;
            pos += x.len.min(end - pos);
        }
        Ok((any, zero, end))
    };
    let stretch = (64u64 << 20).div_ceil(cov).max(1) * cov;
    let mut s = 0;
    while s < size {
        let e = (s + stretch).min(size);
        let mut tables: Vec<u64> = Vec::new();
        let mut pos = s;
        while pos < e {
            let end = (pos + cs).min(size);
            let (any, _, next) = own(pos, end)?;
            if any && tables.last() != Some(&(pos / cov)) {
                tables.push(pos / cov);
            }
            pos = next.min(e).max(end.min(next));
        }
        b.begin_tables(&tables)?;
        if tables.is_empty() {
            pool.done.fetch_add(e - s, Ordering::Relaxed);
            s = e;
            continue;
        }
        pool.run(s, e, &mut opts.progress, &|buf, start, end| {
            buf.resize(cs as usize, 0);
            let mut g = start;
            while g < end {
                let stop = (g + cs).min(size);
                let (any, zero, next) = own(g, stop)?;
                if !any {
                    g = next.min(end).max(g + cs);
                    continue;
                }
                let v3 = b.options().version >= 3;
                if zero && v3 {
                    b.zero_clusters(g, 1)?;
                } else {
                    let data = &mut buf[..(stop - g) as usize];
                    pool.read(src, data, g)?;
                    pool.count_read(stop - g);
                    let mut whole = data.to_vec();
                    whole.resize(cs as usize, 0);
                    if v3 && is_zero_block(&whole) {
                        b.zero_clusters(g, 1)?;
                    } else {
                        // Zeros here must be stored: they hide the backing file.
                        store_clusters(&b, &pool, compress, 0, false, &whole, g)?;
                    }
                }
                g += cs;
            }
            Ok(())
        })?;
        s = e;
    }
    b.finish()?;
    Ok(pool.report(t0, &mut opts.progress))
}

/// `convert -n`: write `src` into the existing image at `dst` (raw file or block device, or
/// qcow2), which must be at least as large; what lies past the source's end is kept. Zero
/// ranges are written as zeros (raw) or zero clusters (qcow2) unless `target_is_zero` says the
/// target already reads as zeros there. A qcow2 target takes the data crash-safely (new
/// clusters, then one header write).
pub fn convert_into_existing(
    src: &Image,
    dst: &Path,
    format: crate::Format,
    target_is_zero: bool,
    opts: &mut ConvertOptions<'_>,
) -> Result<Report> {
    let t0 = Instant::now();
    let io = FileIo::open_rw(dst, false)
        .map_err(|e| Error::io(format!("Could not open '{}'", dst.display()), e).with_path(dst))?;
    io.lock(crate::io::LockMode::Write)
        .map_err(|e| e.with_path(dst))?;
    let size = src.virtual_size();
    let smaller = || Error::new(ErrorKind::NoSpace, "output file is smaller than input file");
    match format {
        crate::Format::Raw => {
            let len = io
                .size()
                .map_err(|e| Error::io("cannot size target", e).with_path(dst))?;
            if len < size {
                return Err(smaller().with_path(dst));
            }
            let r = convert_to_raw(src, &io, target_is_zero, opts).map_err(|e| e.with_path(dst))?;
            io.flush()
                .map_err(|e| Error::io("flush failed", e).with_path(dst))?;
            Ok(r)
        }
        crate::Format::Qcow2 => {
            let r = (|| {
                let mut m = crate::qcow2::model::Model::load(Arc::new(io))?;
                if m.size() < size {
                    return Err(smaller());
                }
                let cs = m.cluster_size();
                let v3 = m.version() >= 3;
                let mut buf = vec![0u8; cs as usize];
                let zeros = vec![0u8; cs as usize];
                let (mut read, mut written) = (0u64, 0u64);
                let mut g = 0u64;
                while g * cs < size {
                    let (start, end) = (g * cs, ((g + 1) * cs).min(size));
                    let x = src.extent(start, size - start)?;
                    if x.zero && x.len >= end - start {
                        // Whole zero clusters at once.
                        let n = ((start + x.len).min(size) - start) / cs;
                        let n = n.max(u64::from(end == size));
                        if !target_is_zero {
                            for k in 0..n {
                                if v3 {
                                    m.zero_cluster(g + k)?;
                                } else {
                                    // Version 2 has no zero clusters: store zeros.
                                    m.write_cluster(g + k, &zeros)?;
                                }
                            }
                        }
                        g += n.max(1);
                    } else {
                        let data = &mut buf[..(end - start) as usize];
                        src.read_at(data, start)?;
                        read += end - start;
                        m.write_cluster(g, data)?;
                        written += end - start;
                        g += 1;
                    }
                    if let Some(p) = opts.progress.as_mut() {
                        if !p((g * cs).min(size), size) {
                            return Err(Error::new(ErrorKind::Cancelled, "conversion cancelled"));
                        }
                    }
                }
                m.commit()?;
                Ok(Report {
                    virtual_size: size,
                    bytes_read: read,
                    bytes_written: written,
                    elapsed: t0.elapsed(),
                })
            })();
            r.map_err(|e| e.with_path(dst))
        }
        other => Err(Error::new(
            ErrorKind::UnsupportedFormat,
            format!("cannot convert into an existing {} image", other.name()),
        )
        .with_path(dst)),
    }
}

/// Convert one chunk (cluster aligned start) into the qcow2 builder.
#[allow(clippy::too_many_arguments)]
fn qcow2_chunk(
    src: &Image,
    b: &Builder<'_>,
    pool: &Pool,
    compress: bool,
    min_sparse: u64,
    buf: &mut Vec<u8>,
    start: u64,
    end: u64,
) -> Result<()> {
    let cs = b.cluster_size();
    let size = src.virtual_size();
    let piece = PIECE.max(cs);
    let map_all = b.options().prealloc != crate::qcow2::writer::Prealloc::Off;
    let mut pos = start;
    let mut done_until = start;
    while pos < end {
        let x = src.extent(pos, end - pos)?;
        if x.zero && min_sparse != 0 && !map_all {
            pos += x.len;
            continue;
        }
        // Whole clusters around this extent and the non-zero ones right after it.
        let mut stop = pos + x.len;
        while stop < end && stop - pos < piece {
            let n = src.extent(stop, end - stop)?;
            if n.zero && min_sparse != 0 && !map_all {
                break;
            }
            stop += n.len;
        }
        let first = (pos / cs * cs).max(done_until);
        let last = stop.div_ceil(cs) * cs;
        let mut p = first;
        while p < last {
            let n = (last - p).min(piece);
            buf.resize(n as usize, 0);
            let readable = (size.min(p + n) - p) as usize;
            pool.read(src, &mut buf[..readable], p)?;
            buf[readable..].fill(0);
            pool.count_read(readable as u64);
            store_clusters(b, pool, compress, min_sparse, map_all, buf, p)?;
            p += n;
        }
        done_until = last;
        pos = stop.max(pos + 1);
    }
    Ok(())
}

thread_local! {
    static PACKED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Hand whole clusters `data` (guest offset `guest`) to the builder: zero clusters skipped,
/// runs of plain clusters written together, compressed ones packed in one batch.
#[allow(clippy::too_many_arguments)]
fn store_clusters(
    b: &Builder<'_>,
    pool: &Pool,
    compress: bool,
    min_sparse: u64,
    map_all: bool,
    data: &[u8],
    guest: u64,
) -> Result<()> {
    let cs = b.cluster_size() as usize;
    let ctype = b.options().compression;
    let keep = |c: &[u8]| min_sparse == 0 || !is_zero_block(c);
    if !compress {
        // Class of each cluster: 2 write, 1 map without writing (preallocated zeros), 0 skip.
        let class = |c: &[u8]| {
            if keep(c) {
                2
            } else if map_all {
                1
            } else {
                0
            }
        };
        let mut run: Option<(usize, u8)> = None;
        for k in 0..=data.len() / cs {
            let c = data.get(k * cs..(k + 1) * cs).map_or(3, class);
            if let Some((r, rc)) = run {
                if rc == c {
                    continue;
                }
                let g = guest + (r * cs) as u64;
                if rc == 2 {
                    b.write_clusters(g, &data[r * cs..k * cs])?;
                    pool.written
                        .fetch_add(((k - r) * cs) as u64, Ordering::Relaxed);
                } else if rc == 1 {
                    b.map_clusters(g, (k - r) as u64)?;
                }
            }
            run = (c != 0 && c != 3).then_some((k, c));
        }
        return Ok(());
    }
    PACKED.with_borrow_mut(|packed| {
        packed.clear();
        let mut spans: Vec<(u64, usize, usize)> = Vec::new();
        let mut scratch = vec![0u8; 2 * cs];
        for (k, c) in data.chunks(cs).enumerate() {
            if !keep(c) {
                continue;
            }
            let g = guest + (k * cs) as u64;
            match crate::qcow2::compressed::encode(ctype, c, &mut scratch) {
                Some(n) => {
                    spans.push((g, packed.len(), n));
                    packed.extend_from_slice(&scratch[..n]);
                }
                None => b.write_clusters(g, c)?,
            }
            pool.written.fetch_add(cs as u64, Ordering::Relaxed);
        }
        let items: Vec<(u64, &[u8])> = spans
            .iter()
            .map(|&(g, a, n)| (g, &packed[a..a + n]))
            .collect();
        b.write_compressed(&items)
    })
}

fn is_zero_block(b: &[u8]) -> bool {
    b.chunks(SECTOR).all(is_zero)
}

/// The format of a conversion's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Raw bytes.
    Raw,
    /// A new qcow2 image with these options, compressed or not.
    Qcow2 {
        /// Creation options.
        options: CreateOptions,
        /// Compress clusters (`-c`).
        compress: bool,
    },
}

/// Convert `src` to a new image of format `target` at `dst` (raw also onto a block device).
/// A file target is written under a temporary name and renamed into place when complete.
pub fn convert_path(
    src: &Image,
    dst: &Path,
    target: &Target,
    opts: &mut ConvertOptions<'_>,
) -> Result<Report> {
    match target {
        Target::Raw => convert_to_raw_path(src, dst, opts),
        Target::Qcow2 { options, compress } => {
            let tmp = TempTarget::create(dst)?;
            let r = convert_to_qcow2(src, &tmp.io, options, *compress, opts)
                .map_err(|e| e.with_path(dst))?;
            crate::qcow2::writer::preallocate_data(&tmp.io, options.prealloc)
                .map_err(|e| e.with_path(dst))?;
            tmp.commit()?;
            Ok(r)
        }
    }
}

/// Convert `src` to a raw file or block device at `dst`.
///
/// A regular-file target is written under a temporary name in the same directory and renamed
/// into place only when complete, so a failed or killed conversion never leaves a file that
/// looks finished. A block device is written in place (zeroing ranges the source has as zero).
pub fn convert_to_raw_path(
    src: &Image,
    dst: &Path,
    opts: &mut ConvertOptions<'_>,
) -> Result<Report> {
    let is_block = std::fs::metadata(dst).map(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_block_device()
    });
    if let Ok(true) = is_block {
        let io = FileIo::open_rw(dst, false)
            .map_err(|e| Error::io("cannot open target", e).with_path(dst))?;
        io.lock(crate::io::LockMode::Write)
            .map_err(|e| e.with_path(dst))?;
        let dev = io
            .size()
            .map_err(|e| Error::io("cannot size target", e).with_path(dst))?;
        if dev < src.virtual_size() {
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!(
                    "block device holds {dev} bytes, the image needs {}",
                    src.virtual_size()
                ),
            )
            .with_path(dst));
        }
        let r = convert_to_raw(src, &io, false, opts).map_err(|e| e.with_path(dst))?;
        io.flush()
            .map_err(|e| Error::io("flush failed", e).with_path(dst))?;
        return Ok(r);
    }
    let tmp = TempTarget::create(dst)?;
    tmp.io
        .set_size(src.virtual_size())
        .map_err(|e| Error::io("cannot size target", e).with_path(dst))?;
    let r = convert_to_raw(src, &tmp.io, true, opts).map_err(|e| e.with_path(dst))?;
    tmp.commit()?;
    Ok(r)
}

/// A target file written under a hidden temporary name and renamed into place on success;
/// removed if dropped before [`TempTarget::commit`].
#[derive(Debug)]
pub struct TempTarget {
    /// The open temporary file.
    pub io: FileIo,
    tmp: PathBuf,
    dst: PathBuf,
    done: bool,
}

impl TempTarget {
    /// Where the temporary file is.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Create the temporary file beside `dst`.
    pub fn create(dst: &Path) -> Result<TempTarget> {
        let dir = match dst.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = dst
            .file_name()
            .ok_or_else(|| Error::invalid("target has no file name").with_path(dst))?;
        let mut last = None;
        for n in 0..100u32 {
            let tmp = dir.join(format!(
                ".{}.vdisk-{}-{n}.part",
                name.to_string_lossy(),
                std::process::id()
            ));
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&tmp);
            match f {
                Ok(f) => {
                    let io = FileIo::from_file(f)
                        .map_err(|e| Error::io("cannot open target", e).with_path(&tmp))?;
                    return Ok(TempTarget {
                        io,
                        tmp,
                        dst: dst.to_path_buf(),
                        done: false,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(Error::io("cannot create target", e).with_path(dst)),
            }
        }
        Err(Error::io(
            "cannot create a temporary target",
            last.unwrap_or_else(|| std::io::Error::other("exhausted")),
        )
        .with_path(dst))
    }

    /// Rename the finished file into place.
    pub fn commit(mut self) -> Result<()> {
        std::fs::rename(&self.tmp, &self.dst)
            .map_err(|e| Error::io("cannot rename target into place", e).with_path(&self.dst))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for TempTarget {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::OpenOptions;
    use crate::io::MemIo;

    fn mem_image(data: Vec<u8>) -> Image {
        Image::from_io(Arc::new(MemIo::new(data)), &OpenOptions::default()).unwrap()
    }

    #[test]
    fn zero_runs_become_holes_only_when_long_enough() {
        let mut d = vec![0u8; 64 * 1024];
        d[0] = 1; // sector 0 data
        d[8192] = 2; // sectors 1..15 zero (7.5 KiB) -> hole
        d[8192 + 1024] = 3; // 512 B zero run between -> written
        let src = mem_image(d.clone());
        let dst = MemIo::new(vec![0u8; d.len()]);
        let mut o = ConvertOptions {
            threads: 1,
            ..Default::default()
        };
        let r = convert_to_raw(&src, &dst, true, &mut o).unwrap();
        assert_eq!(dst.to_vec(), d);
        assert_eq!(r.bytes_written, 512 + 1024 + 512);
        // -S 0 writes everything.
        let dst = MemIo::new(Vec::new());
        let mut o = ConvertOptions {
            min_sparse: 0,
            threads: 2,
            ..Default::default()
        };
        let r = convert_to_raw(&src, &dst, true, &mut o).unwrap();
        assert_eq!(r.bytes_written, d.len() as u64);
        assert_eq!(dst.to_vec(), d);
    }

    /// A target that records the offset of every write and zeroing, in order.
    #[derive(Debug)]
    struct Recorder(MemIo, Mutex<Vec<u64>>);

    impl BlockIo for Recorder {
        fn size(&self) -> std::io::Result<u64> {
            self.0.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
            self.0.read_at(buf, offset)
        }
        fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            self.1.lock().unwrap().push(offset);
            self.0.write_all_at(buf, offset)
        }
        fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
            self.1.lock().unwrap().push(offset);
            self.0.write_zeroes(offset, len)
        }
    }

    #[test]
    fn in_order_writes_ascend_and_copy_the_same() {
        // Data in every other piece, zeros between, over many chunks, on four workers.
        let mut d = vec![0u8; 24 << 20];
        for (i, piece) in d.chunks_mut(PIECE as usize).enumerate() {
            if i % 2 == 0 {
                piece.fill(i as u8 + 1);
            }
        }
        let src = mem_image(d.clone());
        let dst = Recorder(MemIo::new(vec![0xaa; d.len()]), Mutex::new(Vec::new()));
        let mut o = ConvertOptions {
            threads: 4,
            in_order: true,
            ..ConvertOptions::default()
        };
        convert_to_raw(&src, &dst, false, &mut o).unwrap();
        assert_eq!(dst.0.to_vec(), d);
        let at = dst.1.lock().unwrap().clone();
        assert!(at.len() >= 24, "{at:?}");
        assert!(
            at.windows(2).all(|w| w[0] < w[1]),
            "writes out of order: {at:?}"
        );
    }

    #[test]
    fn target_not_zero_gets_zeroed() {
        let d = vec![0u8; 16384];
        let src = mem_image(d.clone());
        let dst = MemIo::new(vec![0xffu8; d.len()]);
        convert_to_raw(&src, &dst, false, &mut ConvertOptions::default()).unwrap();
        assert_eq!(dst.to_vec(), d);
    }

    #[test]
    fn progress_can_cancel_and_bad_sparse_size_is_refused() {
        let src = mem_image(vec![1u8; 3 * CHUNK as usize]);
        let dst = MemIo::new(Vec::new());
        let mut calls = 0;
        let mut cb = |_d: u64, _t: u64| {
            calls += 1;
            false
        };
        let mut o = ConvertOptions {
            progress: Some(&mut cb),
            threads: 1,
            ..Default::default()
        };
        // A fast copy may finish before the first progress tick; then it is not cancelled.
        match convert_to_raw(&src, &dst, true, &mut o) {
            Err(e) => assert_eq!(e.kind(), ErrorKind::Cancelled),
            Ok(r) => assert_eq!(r.virtual_size, 3 * CHUNK),
        }
        let tok = CancelToken::new();
        tok.cancel();
        let mut o = ConvertOptions {
            cancel: Some(tok),
            threads: 1,
            ..Default::default()
        };
        let big = mem_image(vec![1u8; 4 * CHUNK as usize]);
        assert_eq!(
            convert_to_raw(&big, &dst, true, &mut o).unwrap_err().kind(),
            ErrorKind::Cancelled
        );
        let mut o = ConvertOptions {
            min_sparse: 1000,
            ..Default::default()
        };
        assert_eq!(
            convert_to_raw(&src, &dst, true, &mut o).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
    }
}
