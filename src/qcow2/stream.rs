//! The streaming strategy of the qcow2 reader: an image read front to back, once, from input
//! that cannot seek (a pipe, an HTTP body, an upload), written to a [`Target`] at its guest
//! offsets. It owns no format rules: the header, extensions and limits come from
//! [`super::header`], the snapshot table from [`super::snapshot::TableParser`], every L1/L2
//! entry from [`super::entry::Rules`] and every data reference is checked against
//! [`super::entry::Metadata`], exactly as the random-access reader ([`super::Qcow2`]) does, so
//! both give the same verdict on the same bytes.
//!
//! What a stream adds is ordering. Bytes whose role is not known when they pass (before the
//! L1 table, or before the L2 table that maps them) are kept: in memory within the budget's
//! data share, then in an unlinked spill file on the target's volume, or (without spilling)
//! dropped, and an image that later needs dropped bytes is refused. Data already written to
//! the target is not kept twice: it is read back from there. Everything held (tables still
//! awaited, mappings waiting for their data, kept bytes, buffers) is charged to one
//! [`Budget`] in bytes, so hostile input ends in a clear error, never an allocation without
//! bound.
//!
//! Errors follow the random-access reader's order: those it finds when opening (the header,
//! the snapshot table, the L1 table's extent) beat those it finds while reading (entries,
//! data), which beat running out of budget. A reading error found early is held until the
//! open-time checks it could be outranked by are settled.
//!
//! `threads` workers share the work: one at a time reads the next chunk of input and parses
//! it (the parser's state sits behind a lock), then decodes the compressed clusters and writes
//! the data that chunk holds, straight from it, while the next worker reads.

use super::compressed;
use super::entry::{Mapping, Metadata, Rules, Unit};
use super::header::{CompressionType, Header, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};
use super::snapshot::TableParser;
use crate::budget::{Account, Budget};
use crate::error::{Error, ErrorKind, Result, corrupt};
use byteorder::{BigEndian, ByteOrder};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// Where a streamed image's guest data goes. Methods may be called from several threads
/// (compressed clusters are decoded and written by workers).
pub trait Target: Sync {
    /// Write guest bytes at `off` (runs of zeros may be left as holes on a target that reads
    /// as zeros).
    fn write(&self, off: u64, data: &[u8]) -> Result<()>;
    /// Make `len` guest bytes at `off` read as zeros.
    fn zero(&self, off: u64, len: u64) -> Result<()>;
    /// Read back guest bytes written before (data the image maps twice).
    fn read_back(&self, off: u64, buf: &mut [u8]) -> Result<()>;
}

/// Fills a buffer from the input: returns the bytes read, fewer than asked only at its end.
pub type Fill<'a> = dyn FnMut(&mut [u8]) -> Result<usize> + Send + 'a;

/// How to stream.
pub struct Options<'a> {
    /// Bytes of held-back image data that may stay in memory (beyond it: spill or refuse).
    pub memory: u64,
    /// The budget everything held is charged to (held-back data included).
    pub budget: &'a Budget,
    /// Where to spill held-back data past `memory`; `None` refuses such images.
    pub spill_dir: Option<&'a Path>,
    /// Worker threads that read, parse, decode and write in turn (at least one).
    pub threads: u32,
    /// Log lines (spilling).
    pub say: &'a dyn Fn(&str),
}

/// What streaming did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Virtual size of the image.
    pub virtual_size: u64,
    /// Image bytes read.
    pub bytes_in: u64,
    /// Bytes of held-back data written to the spill file.
    pub spilled_bytes: u64,
    /// The most bytes charged to the budget at once.
    pub peak_memory: u64,
}

/// Fixed working memory of the reader for an image with `cluster_size` clusters and
/// `threads` workers: each one's input chunk, decode batch and output, and the parser's
/// gathering and carried compressed bytes. The budget must hold at least this much besides
/// what the image needs.
pub fn working_set(cluster_size: u64, threads: u32) -> u64 {
    let chunk = cluster_size.max(CHUNK);
    let batch_in = cluster_size.saturating_mul(2).max(BATCH_IN);
    let out = cluster_size.max(BATCH_OUT);
    let t = u64::from(threads.max(1));
    t * (chunk + batch_in + out) + GATHER as u64 + 3 * cluster_size
}

/// Input is read and parsed in chunks of this size (or one cluster, if larger): a worker
/// reads a chunk, parses it, then decodes and writes what it maps while the chunk is still
/// in its core's cache.
const CHUNK: u64 = 1 << 20;
/// Guest writes smaller than this are gathered.
const GATHER: usize = 256 << 10;
/// A decode batch holds at most this many compressed bytes (or one cluster's worth)...
const BATCH_IN: u64 = 512 << 10;
/// ... and decodes into at most this many bytes (or one cluster).
const BATCH_OUT: u64 = 2 << 20;
/// Decoded clusters go to the target in runs of at most this many bytes (or one cluster),
/// written while they are still in the decoding core's cache.
const WRITE_RUN: usize = 256 << 10;
/// Bytes charged for one entry of a map of waiting mappings or held ranges (key, value,
/// tree overhead).
const NODE: u64 = 64;

/// The first cluster of a qcow2 stream, parsed.
#[derive(Debug)]
pub struct Opened {
    header: Header,
    head: Vec<u8>,
}

impl Opened {
    /// The image's header.
    pub fn header(&self) -> &Header {
        &self.header
    }
}

/// Read and check the header of a qcow2 stream (cluster 0, as the random-access reader reads
/// it), refusing backing and external data files (streams are untrusted).
pub fn open(fill: &mut Fill<'_>) -> Result<Opened> {
    let mut head = vec![0u8; 112];
    let n = fill(&mut head)?;
    head.truncate(n);
    if n < 24 {
        return Err(corrupt!("file too short for a qcow2 header ({n} bytes)"));
    }
    let bits = BigEndian::read_u32(&head[20..24]);
    if (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) && n == 112 {
        // The smallest cluster (512 bytes) is larger than the fixed fields read so far.
        let cs = 1usize << bits;
        head.resize(cs, 0);
        let more = fill(&mut head[112..])?;
        head.truncate(112 + more);
    }
    let header = Header::parse(&head, u64::MAX)?;
    header.refuse_external_files()?;
    Ok(Opened { header, head })
}

/// Stream the image opened as `opened` (the rest of its bytes come from `fill`) into
/// `target`; `tick` is called on this thread about every 100 ms while the workers run
/// (progress, cancellation), and log lines are relayed to `opts.say` here.
///
/// `threads` workers take turns with the input: one at a time reads the next chunk and
/// parses it (the parser's state is shared, behind a lock), then decodes and writes what the
/// chunk holds while the next worker reads. Reading, decoding and writing a chunk happen on
/// one core, so its bytes are copied once and stay in that core's cache.
pub fn run(
    opened: Opened,
    fill: &mut Fill<'_>,
    target: &dyn Target,
    opts: &Options<'_>,
    tick: &mut dyn FnMut() -> Result<()>,
) -> Result<Report> {
    let Opened { header, head } = opened;
    let cs = header.cluster_size();
    let threads = opts.threads.max(1);
    let mut fixed = Account::new(opts.budget);
    fixed.add(
        working_set(cs, threads),
        "the stream reader's working buffers",
    )?;
    let slot: Mutex<Option<Error>> = Mutex::new(None);
    let pool: Mutex<Vec<Batch>> = Mutex::new(Vec::new());
    let inflight = Inflight::default();
    let cancel = AtomicBool::new(false);
    let (msg_tx, msg_rx) = std::sync::mpsc::channel::<Msg>();
    let log_tx = Mutex::new(msg_tx.clone());
    let say = move |m: &str| {
        if let Ok(tx) = log_tx.lock() {
            let _ = tx.send(Msg::Log(m.to_string()));
        }
    };
    let ctx = Ctx {
        slot: &slot,
        pool: &pool,
        inflight: &inflight,
        cancel: &cancel,
        ctype: header.compression_type,
        cs,
        size: header.size,
        target,
        chunk_len: cs.max(CHUNK) as usize,
    };
    let reader = Reader::new(header, opts, &say, &ctx)?;
    let shared = Mutex::new(Shared {
        fill,
        reader,
        head: Some(head),
        pos: 0,
        outcome: None,
    });
    let mut ticked: Result<()> = Ok(());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            let tx = msg_tx.clone();
            let shared = &shared;
            let ctx = &ctx;
            scope.spawn(move || {
                // Tells the caller this worker is gone, also if it panicked.
                struct Done(std::sync::mpsc::Sender<Msg>);
                impl Drop for Done {
                    fn drop(&mut self) {
                        let _ = self.0.send(Msg::Done);
                    }
                }
                let _done = Done(tx);
                work(shared, ctx);
            });
        }
        let mut running = threads;
        while running > 0 {
            match msg_rx.recv_timeout(std::time::Duration::from_millis(100)) {
                Ok(Msg::Log(m)) => (opts.say)(&m),
                Ok(Msg::Done) => running -= 1,
                Err(_) => {}
            }
            if ticked.is_ok() {
                ticked = tick();
                if ticked.is_err() {
                    cancel.store(true, Ordering::Relaxed);
                }
            }
        }
    });
    while let Ok(Msg::Log(m)) = msg_rx.try_recv() {
        (opts.say)(&m);
    }
    ticked?;
    let outcome = shared
        .into_inner()
        .ok()
        .and_then(|s| s.outcome)
        .unwrap_or_else(|| Err(Error::new(ErrorKind::Io, "stream reader stopped")));
    let report = outcome?;
    // Errors of the last batches, decoded after the parser finished.
    if let Some(e) = slot.lock().ok().and_then(|mut s| s.take()) {
        return Err(e);
    }
    Ok(report)
}

/// What workers tell the calling thread.
enum Msg {
    Log(String),
    Done,
}

/// The input and the parser, used by one worker at a time.
struct Shared<'f, 'g, 'a> {
    fill: &'f mut Fill<'g>,
    reader: Reader<'a>,
    /// The bytes `open` read, the start of the first chunk.
    head: Option<Vec<u8>>,
    /// Input bytes read so far.
    pos: u64,
    /// Set when the input ended (the report) or reading stopped (the error).
    outcome: Option<Result<Report>>,
}

/// What the workers share besides the parser.
struct Ctx<'a> {
    slot: &'a Mutex<Option<Error>>,
    pool: &'a Mutex<Vec<Batch>>,
    inflight: &'a Inflight,
    cancel: &'a AtomicBool,
    ctype: CompressionType,
    cs: u64,
    size: u64,
    target: &'a dyn Target,
    chunk_len: usize,
}

/// A worker: read and parse the next chunk (holding the lock), then decode and write the
/// batches it produced; until the input ends or reading fails.
fn work(shared: &Mutex<Shared<'_, '_, '_>>, ctx: &Ctx<'_>) {
    let mut buf = vec![0u8; ctx.chunk_len];
    let mut out = Vec::new();
    loop {
        let chunk;
        let batches;
        {
            let Ok(mut g) = shared.lock() else {
                return;
            };
            if g.outcome.is_some() {
                return;
            }
            // Cancelled: the caller returns its tick's error.
            if ctx.cancel.load(Ordering::Relaxed) {
                return;
            }
            let mut n = 0;
            if let Some(head) = g.head.take() {
                n = head.len().min(buf.len());
                buf[..n].copy_from_slice(&head[..n]);
            }
            match (g.fill)(&mut buf[n..]) {
                Ok(k) => n += k,
                Err(e) => {
                    g.outcome = Some(Err(e));
                    return;
                }
            }
            let ended = n < buf.len();
            let start = g.pos;
            g.pos += n as u64;
            chunk = Arc::new(std::mem::take(&mut buf));
            let r = &mut g.reader;
            // Once everything is mapped and written, the rest is only read through.
            let mut res = Ok(());
            if n > 0 && !r.idle() {
                r.cur = Some(chunk.clone());
                res = r.chunk(start, &chunk[..n]);
                r.cur = None;
            }
            if res.is_ok() && ended {
                let len = g.pos;
                let done = g.reader.finish(len);
                g.outcome = Some(done);
            } else if let Err(e) = res {
                g.outcome = Some(Err(e));
            }
            batches = std::mem::take(&mut g.reader.ready_batches);
            ctx.inflight.add(batches.len());
        }
        for b in batches {
            // After the first error, batches are only dropped.
            let failed = ctx.slot.lock().map_or(true, |s| s.is_some());
            if !failed
                && let Err(e) = ctx.write_batch(b, &mut out)
                && let Ok(mut s) = ctx.slot.lock()
                && s.is_none()
            {
                *s = Some(e);
            }
            ctx.inflight.done();
        }
        // Nothing else holds the chunk now: its buffer is this worker's again.
        buf = Arc::try_unwrap(chunk).unwrap_or_else(|c| c.to_vec());
        buf.resize(ctx.chunk_len, 0);
    }
}

/// Emptied batches kept for reuse (their buffers are not allocated and faulted in afresh).
const POOL: usize = 4;

impl Ctx<'_> {
    /// Decode and write batch `b`, then keep it for reuse.
    fn write_batch(&self, mut b: Batch, out: &mut Vec<u8>) -> Result<()> {
        let r = decode(&b, out, self.ctype, self.cs, self.size, self.target);
        b.clear();
        if let Ok(mut p) = self.pool.lock()
            && p.len() < POOL
        {
            p.push(b);
        }
        r
    }
}

/// Counts batches handed to the workers and not yet written, so the parser can wait for
/// them before it reads written data back.
#[derive(Default)]
struct Inflight {
    count: Mutex<usize>,
    zero: Condvar,
}

impl Inflight {
    fn add(&self, k: usize) {
        if let Ok(mut n) = self.count.lock() {
            *n += k;
        }
    }

    fn done(&self) {
        if let Ok(mut n) = self.count.lock() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.zero.notify_all();
            }
        }
    }

    fn wait(&self) {
        let Ok(mut n) = self.count.lock() else {
            return;
        };
        while *n > 0 {
            match self.zero.wait(n) {
                Ok(g) => n = g,
                Err(_) => return,
            }
        }
    }
}

/// Compressed clusters and plain data decoded and written together: bytes that lie wholly in
/// one input chunk are taken from the shared chunk, the rest (clusters across a chunk
/// boundary) copied into `input`.
#[derive(Default)]
struct Batch {
    input: Vec<u8>,
    chunks: Vec<Arc<Vec<u8>>>,
    items: Vec<Item>,
    /// Input bytes the items name (copied or shared).
    load: u64,
}

impl Batch {
    /// Empty it for reuse, letting go of the chunks it shares.
    fn clear(&mut self) {
        self.input.clear();
        self.items.clear();
        self.chunks.clear();
        self.load = 0;
    }
}

/// `Item::src` for bytes in the batch's own `input`.
const OWN: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Item {
    guest: u64,
    host: u64,
    /// `OWN`, or the index of the chunk in `Batch::chunks` holding the bytes.
    src: u32,
    at: usize,
    len: usize,
    /// Guest data to write as it is (not a compressed cluster).
    plain: bool,
}

impl Item {
    /// What the item weighs in a batch: plain data costs a decoder a copy, not a decode.
    fn load(&self) -> u64 {
        if self.plain {
            self.len as u64 / 4
        } else {
            self.len as u64
        }
    }
}

/// Where an error ranks: a lower rank is what the random-access reader would report first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Rank {
    /// The header's L1 table offset lies past the end (known only at the end).
    L1Start = 1,
    /// The snapshot table.
    Snapshots = 2,
    /// The L1 table runs past the end.
    L1End = 3,
    /// A table entry or the data it maps.
    Mapping = 4,
    /// The budget ran out.
    Budget = 5,
}

/// A compressed cluster waiting for its bytes.
#[derive(Debug, Clone, Copy)]
struct Comp {
    size: u64,
    guest: u64,
}

/// Bytes passed while the mapping was incomplete: kept in memory, spilled, read back from
/// the target (data written there), or dropped.
struct Kept<'a> {
    acct: Account<'a>,
    memory: u64,
    mem_bytes: u64,
    mem: BTreeMap<u64, Vec<u8>>,
    dir: Option<&'a Path>,
    file: Option<std::fs::File>,
    file_end: u64,
    on_file: BTreeMap<u64, (u64, u64)>,
    /// (host, guest, len): data written to the target.
    readback: Vec<(u64, u64, u64)>,
    /// Host ranges passed and not kept.
    dropped: Vec<(u64, u64)>,
    spilled: u64,
    say: &'a (dyn Fn(&str) + Sync),
}

impl Kept<'_> {
    fn is_empty(&self) -> bool {
        self.mem.is_empty()
            && self.on_file.is_empty()
            && self.readback.is_empty()
            && self.dropped.is_empty()
    }

    fn store(&mut self, host: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        if self.mem_bytes + len <= self.memory && self.acct.try_add(len + NODE) {
            self.mem_bytes += len;
            self.mem.insert(host, data.to_vec());
            return Ok(());
        }
        let Some(dir) = self.dir else {
            return self.drop_range(host, host + len);
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
                self.memory >> 20,
                dir.display()
            ));
            self.file = Some(f);
        }
        use std::os::unix::fs::FileExt;
        let f = self
            .file
            .as_ref()
            .ok_or_else(|| Error::invalid("spill file"))?;
        if let Some((&k, v)) = self.on_file.iter_mut().next_back()
            && k + v.1 == host
            && v.0 + v.1 == self.file_end
        {
            v.1 += len;
        } else {
            self.acct
                .add(NODE, "the index of data spilled before its mapping")?;
            self.on_file.insert(host, (self.file_end, len));
        }
        f.write_all_at(data, self.file_end)
            .map_err(|e| Error::io("cannot write spill file", e))?;
        self.file_end += len;
        self.spilled += len;
        Ok(())
    }

    /// Mark host bytes `a..b` (ascending after all earlier ones) as passed and not kept.
    fn drop_range(&mut self, a: u64, b: u64) -> Result<()> {
        if let Some(last) = self.dropped.last_mut()
            && last.1 >= a
        {
            last.1 = last.1.max(b);
            return Ok(());
        }
        self.acct.add(16, "ranges of data passed and not kept")?;
        self.dropped.push((a, b));
        Ok(())
    }

    fn record_readback(&mut self, host: u64, guest: u64, len: u64) -> Result<()> {
        if let Some(last) = self.readback.last_mut()
            && last.0 + last.2 == host
            && last.1 + last.2 == guest
        {
            last.2 += len;
            return Ok(());
        }
        self.acct
            .add(24, "records of data written before its mapping")?;
        self.readback.push((host, guest, len));
        Ok(())
    }

    /// Fill `out` with the passed bytes at host offset `off`.
    fn fetch(&self, off: u64, out: &mut [u8], target: &dyn Target) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let mut done = 0usize;
        while done < out.len() {
            let cur = off + done as u64;
            let want = (out.len() - done) as u64;
            if let Some((&k, v)) = self.mem.range(..=cur).next_back()
                && k + v.len() as u64 > cur
            {
                let a = (cur - k) as usize;
                let n = (v.len() - a).min(want as usize);
                out[done..done + n].copy_from_slice(&v[a..a + n]);
                done += n;
                continue;
            }
            if let Some((&k, &(foff, len))) = self.on_file.range(..=cur).next_back()
                && k + len > cur
                && let Some(f) = &self.file
            {
                let n = (k + len - cur).min(want) as usize;
                f.read_exact_at(&mut out[done..done + n], foff + (cur - k))
                    .map_err(|e| Error::io("cannot read spill file", e))?;
                done += n;
                continue;
            }
            let i = self.readback.partition_point(|r| r.0 + r.2 <= cur);
            if let Some(&(h, g, len)) = self.readback.get(i)
                && h <= cur
            {
                let n = (h + len - cur).min(want) as usize;
                target.read_back(g + (cur - h), &mut out[done..done + n])?;
                done += n;
                continue;
            }
            let i = self.dropped.partition_point(|r| r.1 <= cur);
            if self.dropped.get(i).is_some_and(|r| r.0 <= cur) {
                return Err(Error::new(
                    ErrorKind::TooLarge,
                    format!(
                        "qcow2 data at {cur:#x} arrives before the tables that map it and was not kept: it exceeds the \
                         memory budget and spilling is not allowed (use seekable input, a larger budget, or allow spilling), \
                         or it is a compressed cluster mapped twice"
                    ),
                ));
            }
            return Err(corrupt!(
                "image data at {cur:#x} was passed before its mapping and not kept"
            ));
        }
        Ok(())
    }

    /// Whether any of the host bytes `off..off + len` are read back from the target.
    fn reads_back(&self, off: u64, len: u64) -> bool {
        let i = self.readback.partition_point(|r| r.0 + r.2 <= off);
        self.readback
            .get(i)
            .is_some_and(|r| r.0 < off.saturating_add(len))
    }

    fn clear(&mut self) {
        self.mem.clear();
        self.mem_bytes = 0;
        self.on_file.clear();
        self.readback = Vec::new();
        self.dropped = Vec::new();
        if let Some(f) = &self.file {
            let _ = f.set_len(0);
        }
        self.file_end = 0;
        let held = self.acct.bytes();
        self.acct.sub(held);
    }
}

/// The reading state of one stream.
struct Reader<'a> {
    h: Header,
    rules: Rules,
    cs: u64,
    cb: u32,
    size: u64,
    l2_entries: u64,
    needed: u64,
    target: &'a dyn Target,
    /// The workers' shared state (batch pool, first error, batches in flight).
    ctx: &'a Ctx<'a>,
    budget: &'a Budget,
    // The snapshot table (validated as it passes; nothing kept).
    snap: TableParser,
    snap_acct: Account<'a>,
    // The L1 table.
    l1_off: u64,
    l1_bytes: u64,
    l1_got: u64,
    l1_part: [u8; 8],
    l1_done: bool,
    /// (L2 host offset, L1 index), sorted by host once the L1 table is complete.
    tables: Vec<(u64, u32)>,
    tables_acct: Account<'a>,
    /// Tables before this index are done.
    cursor: usize,
    metadata: Metadata,
    // Mappings waiting for their data.
    data: BTreeMap<(u64, u64), (u64, u64)>,
    data_acct: Account<'a>,
    seq: u64,
    last: Option<(u64, u64)>,
    comp: BTreeMap<(u64, u64), Comp>,
    comp_acct: Account<'a>,
    kept: Kept<'a>,
    // Bytes of the previous chunks still needed by compressed clusters.
    carry_start: u64,
    carry: Vec<u8>,
    // Output.
    gather: Vec<u8>,
    gather_off: u64,
    zeros: (u64, u64),
    batch: Batch,
    max_items: usize,
    /// Batches parsed from the current chunk, for the worker that read it.
    ready_batches: Vec<Batch>,
    out: Vec<u8>,
    pad: Vec<u8>,
    /// The chunk being parsed, shared with the decoders for what they take from it.
    cur: Option<Arc<Vec<u8>>>,
    /// Ranges of the current chunk: claimed (tables, written data) while the mapping is
    /// incomplete.
    claimed: Vec<(u64, u64, bool)>,
    ready: Vec<(u64, u64)>,
    verdict: Option<(Rank, Error)>,
    /// The highest host offset any data unit or compressed cluster starts at (data mapped
    /// past the end is refused, also when the budget ran out before it could be queued).
    max_ref: Option<u64>,
}

impl<'a> Reader<'a> {
    fn new(
        h: Header,
        opts: &Options<'a>,
        say: &'a (dyn Fn(&str) + Sync),
        ctx: &'a Ctx<'a>,
    ) -> Result<Reader<'a>> {
        let rules = Rules::of(&h);
        let cs = h.cluster_size();
        let budget = opts.budget;
        let needed = h.l1_entries_for(h.size).unwrap_or(0);
        let l1_bytes = u64::from(h.l1_size) * 8;
        let r = Reader {
            rules,
            cs,
            cb: h.cluster_bits,
            size: h.size,
            l2_entries: h.l2_entries(),
            needed,
            target: ctx.target,
            ctx,
            budget,
            snap: TableParser::new(&h, false),
            snap_acct: Account::new(budget),
            l1_off: h.l1_table_offset,
            l1_bytes,
            l1_got: 0,
            l1_part: [0; 8],
            l1_done: l1_bytes == 0,
            tables: Vec::new(),
            tables_acct: Account::new(budget),
            cursor: 0,
            metadata: Metadata::new(&rules, h.l1_table_offset, l1_bytes, Vec::new()),
            data: BTreeMap::new(),
            data_acct: Account::new(budget),
            seq: 0,
            last: None,
            comp: BTreeMap::new(),
            comp_acct: Account::new(budget),
            kept: Kept {
                acct: Account::new(budget),
                memory: opts.memory,
                mem_bytes: 0,
                mem: BTreeMap::new(),
                dir: opts.spill_dir,
                file: None,
                file_end: 0,
                on_file: BTreeMap::new(),
                readback: Vec::new(),
                dropped: Vec::new(),
                spilled: 0,
                say,
            },
            carry_start: 0,
            carry: Vec::new(),
            gather: Vec::with_capacity(GATHER),
            gather_off: 0,
            zeros: (0, 0),
            batch: Batch::default(),
            max_items: (BATCH_OUT / cs).max(1) as usize,
            ready_batches: Vec::new(),
            out: Vec::new(),
            pad: Vec::new(),
            cur: None,
            claimed: Vec::new(),
            ready: Vec::new(),
            verdict: None,
            max_ref: None,
            h,
        };
        Ok(r)
    }

    fn mapping_known(&self) -> bool {
        self.l1_done && self.cursor == self.tables.len()
    }

    /// Nothing more is needed from the input.
    fn idle(&self) -> bool {
        self.mapping_known() && self.data.is_empty() && self.comp.is_empty() && self.snap.done()
    }

    /// Record an error found while reading; errors that are not about the image's contents
    /// (I/O, cancellation, space) stop at once.
    fn note(&mut self, rank: Rank, e: Error) -> Result<()> {
        match e.kind() {
            ErrorKind::Io | ErrorKind::Cancelled | ErrorKind::NoSpace | ErrorKind::Denied => {
                return Err(e);
            }
            _ => {}
        }
        let rank = if rank == Rank::Mapping && e.kind() == ErrorKind::TooLarge {
            Rank::Budget
        } else {
            rank
        };
        if self.verdict.as_ref().is_none_or(|(r, _)| rank < *r) {
            self.verdict = Some((rank, e));
        }
        Ok(())
    }

    /// The held error, once nothing the random-access reader would report first can still
    /// turn up.
    fn settled(&mut self, pos: u64) -> Result<()> {
        let Some((rank, _)) = &self.verdict else {
            return Ok(());
        };
        let rank = *rank;
        // Running out of budget is outranked by any corruption, wherever it is: read on.
        if rank == Rank::Budget {
            return Ok(());
        }
        let l1_start_known = self.l1_bytes == 0 || pos > self.l1_off;
        let open = [
            (Rank::L1Start, l1_start_known),
            (Rank::Snapshots, self.snap.done()),
            (Rank::L1End, self.l1_done),
        ];
        if open.iter().all(|(r, ok)| *r >= rank || *ok)
            && let Some((_, e)) = self.verdict.take()
        {
            return Err(e);
        }
        Ok(())
    }

    fn draining(&self) -> bool {
        self.verdict.is_some()
    }

    /// Handle the input bytes `bytes` at stream offset `start`.
    fn chunk(&mut self, start: u64, bytes: &[u8]) -> Result<()> {
        let end = start + bytes.len() as u64;
        self.claimed.clear();
        // The snapshot table.
        if !self.snap.done() {
            let next = self.h.snapshots_offset + self.snap.consumed();
            if next >= start && next < end {
                let r = self.snap.feed(&bytes[(next - start) as usize..]);
                let held = self.snap.bytes();
                let r = r.and_then(|_| self.snap_acct.set(held, "the snapshot table"));
                if let Err(e) = r {
                    self.note(Rank::Snapshots, e)?;
                    // Nothing more of the table will be read.
                    self.snap.abandon();
                }
            }
        }
        // The L1 table.
        if !self.l1_done {
            let a = self.l1_off + self.l1_got;
            if a >= start && a < end {
                let b = (self.l1_off + self.l1_bytes).min(end);
                self.claimed.push((a, b, false));
                let r = self.feed_l1(&bytes[(a - start) as usize..(b - start) as usize], start);
                if let Err(e) = r {
                    self.note(Rank::Mapping, e)?;
                }
            }
        } else if self.l1_off < end && self.l1_off + self.l1_bytes > start {
            self.claimed.push((
                self.l1_off.max(start),
                (self.l1_off + self.l1_bytes).min(end),
                false,
            ));
        }
        // L2 tables.
        if self.l1_done {
            while let Some(&(host, l1i)) = self.tables.get(self.cursor) {
                if host >= end {
                    break;
                }
                self.cursor += 1;
                if host < start {
                    // Named by a duplicate entry, handled when the L1 table completed.
                    continue;
                }
                let a = (host - start) as usize;
                let b = (a + self.cs as usize).min(bytes.len());
                self.claimed.push((host, host + self.cs, false));
                let mut pad = std::mem::take(&mut self.pad);
                let table: &[u8] = if b - a == self.cs as usize {
                    &bytes[a..b]
                } else {
                    pad.clear();
                    pad.extend_from_slice(&bytes[a..b]);
                    pad.resize(self.cs as usize, 0);
                    &pad
                };
                let r = self.l2(table, l1i, start);
                self.pad = pad;
                if let Err(e) = r {
                    self.note(Rank::Mapping, e)?;
                }
            }
        }
        // Each step stops once an error is held (the rest of the input is only validated).
        type Step<'r> = fn(&mut Reader<'r>, u64, &[u8]) -> Result<()>;
        let steps: [Step<'a>; 4] = [
            Self::data_in,
            |r, s, b| r.compressed_in(s, b, false),
            |r, s, b| {
                if r.mapping_known() {
                    Ok(())
                } else {
                    r.keep(s, b)
                }
            },
            Self::carry_over,
        ];
        for step in steps {
            if self.draining() {
                break;
            }
            if let Err(e) = step(self, start, bytes) {
                self.note(Rank::Mapping, e)?;
            }
        }
        if self.mapping_known() && !self.kept.is_empty() {
            self.kept.clear();
        }
        // The worker that read this chunk decodes what it holds.
        if let Err(e) = self.flush_batch() {
            self.note(Rank::Mapping, e)?;
        }
        self.worker_errors()?;
        self.settled(end)
    }

    fn feed_l1(&mut self, mut b: &[u8], start: u64) -> Result<()> {
        let per_l2 = self.l2_entries << self.cb;
        while !b.is_empty() {
            let have = (self.l1_got % 8) as usize;
            let n = (8 - have).min(b.len());
            self.l1_part[have..have + n].copy_from_slice(&b[..n]);
            b = &b[n..];
            self.l1_got += n as u64;
            if self.l1_got % 8 != 0 {
                continue;
            }
            let i = self.l1_got / 8 - 1;
            if i >= self.needed || self.draining() {
                continue;
            }
            let e = BigEndian::read_u64(&self.l1_part);
            let r = match self.rules.l1_entry(i, e) {
                Ok(Some(off)) => self
                    .tables_acct
                    .add(16, "the L1 table's entries")
                    .map(|_| self.tables.push((off, i as u32))),
                Ok(None) => {
                    let guest = i * per_l2;
                    self.zero(guest, per_l2.min(self.size - guest))
                }
                Err(e) => Err(e),
            };
            // The table is read to its end whatever its entries say.
            if let Err(e) = r {
                self.note(Rank::Mapping, e)?;
            }
        }
        if self.l1_got == self.l1_bytes {
            self.l1_done = true;
            if let Err(e) = self.l1_complete(start) {
                self.note(Rank::Mapping, e)?;
            }
        }
        Ok(())
    }

    fn l1_complete(&mut self, start: u64) -> Result<()> {
        self.tables.sort_unstable();
        let hosts: Vec<u64> = self.tables.iter().map(|t| t.0).collect();
        self.tables_acct.add(
            hosts.len() as u64 * 8,
            "the list of L2 tables the L1 table names",
        )?;
        self.metadata = Metadata::new(&self.rules, self.l1_off, self.l1_bytes, hosts);
        let passed = self.tables.partition_point(|t| t.0 < start);
        if self.draining() {
            // Only validating from here on: tables that passed were not kept.
            self.cursor = passed;
        }
        for i in 0..self.tables.len() {
            self.metadata.check_l2(self.tables[i].0)?;
        }
        // Tables passed before the L1 table was complete were kept.
        let mut t = vec![0u8; self.cs as usize];
        while self.cursor < passed {
            let (host, l1i) = self.tables[self.cursor];
            self.cursor += 1;
            self.sync_writes(host, self.cs)?;
            self.kept.fetch(host, &mut t, self.target)?;
            self.l2(&t, l1i, start)?;
        }
        Ok(())
    }

    /// Decode the L2 table `t` of L1 entry `l1i`; `start` is the current chunk's offset (data
    /// before it has passed).
    fn l2(&mut self, t: &[u8], l1i: u32, start: u64) -> Result<()> {
        let ext = self.rules.extended;
        let step = if ext { 16 } else { 8 };
        let ubits = self.rules.unit_bits();
        let usz = 1u64 << ubits;
        let base = u64::from(l1i) * self.l2_entries;
        let validate_only = self.draining();
        for k in 0..self.l2_entries {
            let cluster = base + k;
            let guest = cluster << self.cb;
            if guest >= self.size {
                break;
            }
            let e = &t[(k * step) as usize..];
            let entry = BigEndian::read_u64(&e[..8]);
            let bitmap = if ext {
                BigEndian::read_u64(&e[8..16])
            } else {
                0
            };
            let m = self.rules.l2_entry(cluster, entry, bitmap)?;
            let len = self.cs.min(self.size - guest);
            if let Mapping::Compressed { offset, size } = m {
                self.metadata.check_data(offset, size, self.cb)?;
                self.max_ref = self.max_ref.max(Some(offset));
                if !validate_only {
                    self.comp_acct
                        .add(NODE, "compressed clusters waiting for their data")?;
                    self.comp.insert((offset, self.seq), Comp { size, guest });
                    self.seq += 1;
                }
                continue;
            }
            for sub in 0..self.rules.units() {
                let o = u64::from(sub) << ubits;
                if o >= len {
                    break;
                }
                let ulen = usz.min(len - o);
                match self.rules.unit(m, sub) {
                    Unit::Data { host } => {
                        self.metadata.check_data(host, usz, self.cb)?;
                        self.max_ref = self.max_ref.max(Some(host));
                        if !validate_only {
                            self.add_data(host, guest + o, ulen, start)?;
                        }
                    }
                    _ if validate_only => {}
                    _ => self.zero(guest + o, ulen)?,
                }
            }
        }
        Ok(())
    }

    fn add_data(&mut self, host: u64, guest: u64, len: u64, start: u64) -> Result<()> {
        if host < start {
            let mut piece = std::mem::take(&mut self.pad);
            piece.resize(len as usize, 0);
            let r = self
                .sync_writes(host, len)
                .and_then(|_| self.kept.fetch(host, &mut piece, self.target));
            let r = r.and_then(|_| self.write(guest, &piece));
            self.pad = piece;
            return r;
        }
        if let Some(k) = self.last
            && let Some(v) = self.data.get_mut(&k)
            && k.0 + v.1 == host
            && v.0 + v.1 == guest
        {
            v.1 += len;
            return Ok(());
        }
        self.data_acct
            .add(NODE, "mappings waiting for their data")?;
        let key = (host, self.seq);
        self.seq += 1;
        self.data.insert(key, (guest, len));
        self.last = Some(key);
        Ok(())
    }

    /// Write the waiting data that lies in this chunk.
    fn data_in(&mut self, start: u64, bytes: &[u8]) -> Result<()> {
        let end = start + bytes.len() as u64;
        let incomplete = !self.mapping_known();
        while let Some((&(h, s), &(g, l))) = self.data.range(..(end, 0)).next() {
            self.data.remove(&(h, s));
            self.last = None;
            let a = h.max(start);
            let skip = a - h;
            let b = (h + l).min(end);
            if b > a {
                if self.cur.is_some() {
                    // A decoder writes it, straight from the shared chunk.
                    self.push(g + skip, a, (a - start) as usize, (b - a) as usize, true)?;
                } else {
                    self.write(g + skip, &bytes[(a - start) as usize..(b - start) as usize])?;
                }
                if incomplete {
                    self.claimed.push((a, b, false));
                    self.kept.record_readback(a, g + skip, b - a)?;
                }
            }
            if h + l > end {
                let done = b - h;
                self.data.insert((end, s), (g + done, l - done));
            } else {
                self.data_acct.sub(NODE);
            }
        }
        Ok(())
    }

    /// Fill `dst` with the image bytes at `off`: from this chunk (`bytes`, at `start`), the
    /// carried bytes, or what was kept.
    fn assemble(&mut self, off: u64, dst: &mut [u8], start: u64, bytes: &[u8]) -> Result<()> {
        let mut p = off;
        let mut i = 0usize;
        while i < dst.len() {
            let n;
            let cend = self.carry_start + self.carry.len() as u64;
            if p >= start {
                let a = (p - start) as usize;
                n = (dst.len() - i).min(bytes.len().saturating_sub(a));
                if n == 0 {
                    return Err(corrupt!("image data at {p:#x} has not arrived"));
                }
                dst[i..i + n].copy_from_slice(&bytes[a..a + n]);
            } else if p >= self.carry_start && p < cend {
                let a = (p - self.carry_start) as usize;
                n = (dst.len() - i).min(self.carry.len() - a);
                dst[i..i + n].copy_from_slice(&self.carry[a..a + n]);
            } else {
                let lim = if p < self.carry_start && self.carry_start < start {
                    self.carry_start
                } else {
                    start
                };
                n = (lim - p).min((dst.len() - i) as u64) as usize;
                self.flush_gather()?;
                self.kept.fetch(p, &mut dst[i..i + n], self.target)?;
            }
            i += n;
            p += n as u64;
        }
        Ok(())
    }

    /// Queue every waiting compressed cluster whose bytes have all arrived (at the end of
    /// the input: all of them, cut to what there is).
    fn compressed_in(&mut self, start: u64, bytes: &[u8], at_end: bool) -> Result<()> {
        let end = start + bytes.len() as u64;
        self.ready.clear();
        for (&(off, s), c) in self.comp.range(..(end, 0)) {
            if off + c.size <= end || at_end {
                self.ready.push((off, s));
            }
        }
        let ready = std::mem::take(&mut self.ready);
        for &(off, s) in &ready {
            let Some(c) = self.comp.remove(&(off, s)) else {
                continue;
            };
            self.comp_acct.sub(NODE);
            let len = (off + c.size).min(end) - off;
            if !self.mapping_known() {
                // Consumed: not kept again (a second mapping of it is refused).
                let a = off.max(start);
                let b = (off + len).min(end);
                if a < b {
                    self.claimed.push((a, b, true));
                }
            }
            if off >= start && self.cur.is_some() {
                // All in this chunk (the common case): the decoder reads it from there.
                self.push(c.guest, off, (off - start) as usize, len as usize, false)?;
                continue;
            }
            // Bytes from before those carried over may have to be read back from the target.
            if off < self.carry_start {
                self.sync_writes(off, len)?;
            }
            self.make_room(len)?;
            let at = self.batch.input.len();
            let mut input = std::mem::take(&mut self.batch.input);
            input.resize(at + len as usize, 0);
            let r = self.assemble(off, &mut input[at..], start, bytes);
            self.batch.input = input;
            r?;
            self.add_item(Item {
                guest: c.guest,
                host: off,
                src: OWN,
                at,
                len: len as usize,
                plain: false,
            });
        }
        self.ready = ready;
        Ok(())
    }

    /// Flush the batch first if `len` more input bytes would overfill it.
    fn make_room(&mut self, len: u64) -> Result<()> {
        let full = self.batch.items.len() >= self.max_items
            || (!self.batch.items.is_empty() && self.batch.load + len > BATCH_IN.max(2 * self.cs));
        if full {
            self.flush_batch()?;
        }
        Ok(())
    }

    /// Add an item to the batch (room was made for it).
    fn add_item(&mut self, it: Item) {
        self.batch.load += it.load();
        self.batch.items.push(it);
    }

    /// Queue `len` bytes at offset `at` of the current chunk (host offset `host`): a
    /// compressed cluster, or guest data (`plain`) to write at `guest`.
    fn push(&mut self, guest: u64, host: u64, at: usize, len: usize, plain: bool) -> Result<()> {
        let Some(cur) = self.cur.clone() else {
            return Err(Error::new(ErrorKind::Io, "no input chunk to share"));
        };
        let mut it = Item {
            guest,
            host,
            src: 0,
            at,
            len,
            plain,
        };
        self.make_room(it.load())?;
        if !self
            .batch
            .chunks
            .last()
            .is_some_and(|c| Arc::ptr_eq(c, &cur))
        {
            self.batch.chunks.push(cur);
        }
        it.src = (self.batch.chunks.len() - 1) as u32;
        self.add_item(it);
        Ok(())
    }

    /// Keep what passed and may still be needed (the mapping is incomplete).
    fn keep(&mut self, start: u64, bytes: &[u8]) -> Result<()> {
        let end = start + bytes.len() as u64;
        let mut claimed = std::mem::take(&mut self.claimed);
        claimed.sort_unstable();
        let mut p = start;
        let mut r = Ok(());
        for &(a, b, consumed) in claimed.iter().chain(std::iter::once(&(end, end, false))) {
            let a = a.clamp(start, end);
            let b = b.min(end);
            if a > p {
                r = self
                    .kept
                    .store(p, &bytes[(p - start) as usize..(a - start) as usize]);
                if r.is_err() {
                    break;
                }
            }
            if consumed && b > a.max(p) {
                r = self.kept.drop_range(a.max(p), b);
                if r.is_err() {
                    break;
                }
            }
            p = p.max(b);
        }
        self.claimed = claimed;
        r
    }

    /// Carry the bytes that waiting compressed clusters begun before the end of this chunk
    /// still need (at most two clusters: the largest compressed size).
    fn carry_over(&mut self, start: u64, bytes: &[u8]) -> Result<()> {
        let end = start + bytes.len() as u64;
        let first = self.comp.keys().next().map(|k| k.0).filter(|&o| o < end);
        let Some(first) = first else {
            self.carry.clear();
            self.carry_start = end;
            return Ok(());
        };
        if first < self.carry_start.min(start) {
            self.sync_writes(first, start - first)?;
        }
        let mut next = vec![0u8; (end - first) as usize];
        self.assemble(first, &mut next, start, bytes)?;
        self.carry = next;
        self.carry_start = first;
        Ok(())
    }

    fn write(&mut self, off: u64, data: &[u8]) -> Result<()> {
        if !self.gather.is_empty()
            && (off != self.gather_off + self.gather.len() as u64
                || self.gather.len() + data.len() > GATHER)
        {
            self.flush_gather()?;
        }
        if data.len() >= GATHER {
            return self.target.write(off, data);
        }
        if self.gather.is_empty() {
            self.gather_off = off;
        }
        self.gather.extend_from_slice(data);
        Ok(())
    }

    /// Before reading host bytes `off..off + len` back: if they were written to the target,
    /// make everything written so far readable there.
    fn sync_writes(&mut self, off: u64, len: u64) -> Result<()> {
        self.flush_gather()?;
        if !self.kept.reads_back(off, len) {
            return Ok(());
        }
        self.flush_batch()?;
        for b in std::mem::take(&mut self.ready_batches) {
            self.ctx.write_batch(b, &mut self.out)?;
        }
        self.ctx.inflight.wait();
        Ok(())
    }

    fn flush_gather(&mut self) -> Result<()> {
        if self.gather.is_empty() {
            return Ok(());
        }
        let r = self.target.write(self.gather_off, &self.gather);
        self.gather.clear();
        r
    }

    fn zero(&mut self, off: u64, len: u64) -> Result<()> {
        if self.zeros.1 > 0 && self.zeros.0 + self.zeros.1 == off {
            self.zeros.1 += len;
            return Ok(());
        }
        self.flush_zeros()?;
        self.zeros = (off, len);
        Ok(())
    }

    fn flush_zeros(&mut self) -> Result<()> {
        let (off, len) = std::mem::take(&mut self.zeros);
        if len > 0 {
            self.target.zero(off, len)?;
        }
        Ok(())
    }

    fn flush_batch(&mut self) -> Result<()> {
        if self.batch.items.is_empty() {
            return Ok(());
        }
        let fresh = self
            .ctx
            .pool
            .lock()
            .ok()
            .and_then(|mut p| p.pop())
            .unwrap_or_default();
        let b = std::mem::replace(&mut self.batch, fresh);
        self.ready_batches.push(b);
        Ok(())
    }

    fn worker_errors(&mut self) -> Result<()> {
        let e = self.ctx.slot.lock().ok().and_then(|mut s| s.take());
        if let Some(e) = e {
            self.note(Rank::Mapping, e)?;
        }
        Ok(())
    }

    /// The input ended after `len` bytes.
    fn finish(&mut self, len: u64) -> Result<Report> {
        if self.l1_bytes > 0 && self.l1_off >= len {
            let e = corrupt!(
                "active L1 table at {:#x} lies past end of file",
                self.l1_off
            );
            self.note(Rank::L1Start, e)?;
        }
        if !self.snap.done() {
            let e = corrupt!(
                "snapshot table entry {} lies past end of file",
                self.snap.index()
            );
            self.note(Rank::Snapshots, e)?;
        }
        if !self.l1_done {
            let e = corrupt!(
                "L1 table at {:#x} ({} entries) runs past end of file",
                self.l1_off,
                self.h.l1_size
            );
            self.note(Rank::L1End, e)?;
        }
        if let Some(m) = self.max_ref
            && m >= len
            && self.verdict.as_ref().is_some_and(|v| v.0 == Rank::Budget)
        {
            self.note(Rank::Mapping, super::entry::data_past_end(m))?;
        }
        if self.verdict.is_none()
            && let Some(&(host, _)) = self.tables.get(self.cursor)
        {
            let e = corrupt!("L2 table offset {host:#x} lies past end of file");
            self.note(Rank::Mapping, e)?;
        }
        if self.verdict.is_none()
            && let Some((&(off, _), _)) = self.comp.range((len, 0)..).next()
        {
            let e = corrupt!("compressed cluster at {off:#x} lies past end of file");
            self.note(Rank::Mapping, e)?;
        }
        if let Some((_, e)) = self.verdict.take() {
            return Err(e);
        }
        // Compressed clusters cut short by the end: decoded from what there is, as the
        // random-access reader does.
        let carry = std::mem::take(&mut self.carry);
        let cstart = self.carry_start;
        self.carry_start = len;
        let r = self.compressed_in(cstart, &carry, true);
        if let Err(e) = r {
            self.note(Rank::Mapping, e)?;
        }
        // Data of a unit begun before the end reads as zeros past it; data mapped wholly past
        // the end is refused (as the random-access reader does).
        let usz = 1u64 << self.rules.unit_bits();
        let rest: Vec<(u64, u64, u64)> = self.data.iter().map(|(k, v)| (k.0, v.0, v.1)).collect();
        self.data.clear();
        for (h, g, l) in rest {
            let tail = ((usz - h % usz) % usz).min(l);
            self.zero(g, tail)?;
            if l > tail {
                self.note(Rank::Mapping, super::entry::data_past_end(h + tail))?;
            }
        }
        if let Some((_, e)) = self.verdict.take() {
            return Err(e);
        }
        self.flush_gather()?;
        self.flush_zeros()?;
        self.flush_batch()?;
        self.worker_errors()?;
        if let Some((_, e)) = self.verdict.take() {
            return Err(e);
        }
        Ok(Report {
            virtual_size: self.size,
            bytes_in: len,
            spilled_bytes: self.kept.spilled,
            peak_memory: self.budget.peak(),
        })
    }
}

/// Decode a batch into `out` and write it: runs of consecutive guest clusters go out in one
/// write.
fn decode(
    b: &Batch,
    out: &mut Vec<u8>,
    ctype: CompressionType,
    cs: u64,
    size: u64,
    target: &dyn Target,
) -> Result<()> {
    let cap = WRITE_RUN.max(cs as usize);
    if out.len() < cap {
        out.resize(cap, 0);
    }
    let mut run_start = 0u64;
    let mut run_len = 0usize;
    for it in &b.items {
        let bytes = match b.chunks.get(it.src as usize) {
            Some(c) if it.src != OWN => &c[..],
            _ => &b.input[..],
        };
        let src = &bytes[it.at..it.at + it.len];
        if it.plain {
            if run_len > 0 {
                target.write(run_start, &out[..run_len])?;
                run_len = 0;
            }
            target.write(it.guest, src)?;
            continue;
        }
        let len = cs.min(size - it.guest) as usize;
        if run_len > 0 && (it.guest != run_start + run_len as u64 || run_len + len > cap) {
            target.write(run_start, &out[..run_len])?;
            run_len = 0;
        }
        if run_len == 0 {
            run_start = it.guest;
        }
        let dst = &mut out[run_len..run_len + cs as usize];
        compressed::decode(ctype, src, dst).map_err(|e| {
            corrupt!(
                "cannot decompress cluster at guest offset {:#x} (host {:#x}): {}",
                it.guest,
                it.host,
                e.message()
            )
        })?;
        run_len += len;
    }
    if run_len > 0 {
        target.write(run_start, &out[..run_len])?;
    }
    Ok(())
}
