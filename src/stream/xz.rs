//! xz decoding held to a memory budget.
//!
//! A stream whose blocks record their compressed size in the block header (what `xz -T`
//! writes) is decoded block-parallel: this reader parses each block header, reads the block's
//! compressed bytes and hands them to a worker thread, which decodes the block and passes its
//! output back in chunks counted against the budget, so a worker running ahead pauses once
//! its share of output is buffered. Blocks are admitted only while their dictionary, their
//! compressed bytes and their output buffers fit in the budget; a block that cannot be buffered
//! is streamed on the reading thread instead, and one whose dictionary alone exceeds the budget
//! is refused ([`ErrorKind::TooLarge`]).
//!
//! Each worker decodes its block with liblzma's stream decoder, given a one-block stream made
//! of the real stream header, the block (header, data, padding and check, byte for byte) and an
//! index and footer built for it: liblzma verifies the block header, the sizes it declares and
//! the block's check (CRC32, CRC64 or SHA-256). This reader verifies the stream's own index and
//! footer against the blocks decoded (count, sizes, order) and the footer against the header.
//!
//! Streams without sizes in their first block header (single-threaded `xz`), and every stream
//! when one thread is asked for, go to liblzma's sequential stream decoder, whose memory limit
//! is the budget. Concatenated streams and stream padding are read as `xz` does.

use crate::error::{Error, ErrorKind};
use liblzma::stream::{Action, Status, Stream as Lzma};
use std::collections::VecDeque;
use std::io::{self, BufRead, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Condvar, Mutex};

const HEADER_MAGIC: [u8; 6] = [0xFD, b'7', b'z', b'X', b'Z', 0];
const FOOTER_MAGIC: [u8; 2] = *b"YZ";
/// Output is passed from a worker to the reader, and compressed input held, in chunks of this
/// size (at most).
const CHUNK: u64 = 512 << 10;
/// Memory a decoder needs besides its dictionary: LZMA2's probability tables (about 30 KiB),
/// filter buffers, liblzma's bookkeeping and the thread's stack in use; rounded up.
const DECODER_OVERHEAD: u64 = 256 << 10;
/// The input buffer in front of the xz reader; counted in the budget.
pub(super) const INPUT_BUF: usize = 1 << 20;
/// The largest value of an xz variable-length integer (2^63 - 1).
const VLI_MAX: u64 = u64::MAX / 2;

fn mib(n: u64) -> u64 {
    n.div_ceil(1 << 20)
}

fn corrupt(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, Error::corrupt(msg))
}

fn unsupported(msg: impl Into<String>) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        Error::new(ErrorKind::UnsupportedFeature, msg),
    )
}

fn too_large_dict(dict: u64, budget: u64) -> io::Error {
    io::Error::other(Error::new(
        ErrorKind::TooLarge,
        format!(
            "xz dictionary of {} MiB exceeds the memory budget of {} MiB",
            mib(dict),
            budget >> 20
        ),
    ))
}

fn truncated() -> io::Error {
    corrupt("xz stream is truncated")
}

/// Map a liblzma error; `budget` names the memory limit for [`liblzma::stream::Error::MemLimit`].
fn lzma_err(e: liblzma::stream::Error, budget: u64) -> io::Error {
    use liblzma::stream::Error as E;
    match e {
        E::MemLimit => io::Error::other(Error::new(
            ErrorKind::TooLarge,
            format!(
                "xz stream needs more memory than the budget of {} MiB",
                budget >> 20
            ),
        )),
        E::Mem => io::Error::other(Error::new(
            ErrorKind::TooLarge,
            "xz decoder cannot allocate memory",
        )),
        E::Data | E::Format | E::Program => corrupt(format!("xz data is corrupt: {e}")),
        E::Options | E::UnsupportedCheck | E::NoCheck => {
            unsupported(format!("xz stream uses unsupported options: {e}"))
        }
    }
}

/// The library error inside `e`, if it carries one; else an I/O error.
pub(super) fn to_error(e: io::Error) -> Error {
    if e.get_ref().is_some_and(|r| r.is::<Error>()) {
        if let Some(inner) = e.into_inner() {
            if let Ok(err) = inner.downcast::<Error>() {
                return *err;
            }
        }
        return Error::corrupt("xz decoder error");
    }
    Error::io("cannot read xz stream", e)
}

/// Bytes of the check field for check ID `id` (xz file format, section 3.4).
fn check_size(id: u8) -> u64 {
    match id {
        0 => 0,
        1..=3 => 4,
        4..=6 => 8,
        7..=9 => 16,
        10..=12 => 32,
        _ => 64,
    }
}

fn put_vli(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Decode a variable-length integer from `b` at `*pos`.
fn get_vli(b: &[u8], pos: &mut usize) -> io::Result<u64> {
    let mut v = 0u64;
    for i in 0..9 {
        let Some(&byte) = b.get(*pos) else {
            return Err(corrupt("xz header ends inside a number"));
        };
        *pos += 1;
        v |= u64::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            if byte == 0 && i > 0 {
                return Err(corrupt("xz number is not minimally encoded"));
            }
            return Ok(v);
        }
    }
    Err(corrupt("xz number is too long"))
}

/// Dictionary size from LZMA2's property byte.
fn lzma2_dict(p: u8) -> io::Result<u64> {
    match p {
        0..=39 => Ok((2 | u64::from(p & 1)) << (p / 2 + 11)),
        40 => Ok(u64::from(u32::MAX)),
        _ => Err(corrupt("xz LZMA2 dictionary size is invalid")),
    }
}

/// A parsed block header (xz file format, section 3.1).
struct BlockHeader {
    raw: Vec<u8>,
    compressed: Option<u64>,
    uncompressed: Option<u64>,
    dict: u64,
}

impl BlockHeader {
    fn parse(raw: Vec<u8>) -> io::Result<BlockHeader> {
        let n = raw.len();
        if n < 8 {
            return Err(corrupt("xz block header is too short"));
        }
        let (body, crc) = raw.split_at(n - 4);
        if libdeflater::crc32(body) != u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) {
            return Err(corrupt("xz block header checksum mismatch"));
        }
        let flags = body[1];
        if flags & 0x3C != 0 {
            return Err(unsupported("xz block header has reserved flags set"));
        }
        let mut pos = 2;
        let compressed = if flags & 0x40 != 0 {
            let v = get_vli(body, &mut pos)?;
            if v == 0 || v > VLI_MAX {
                return Err(corrupt("xz block's compressed size is invalid"));
            }
            Some(v)
        } else {
            None
        };
        let uncompressed = if flags & 0x80 != 0 {
            Some(get_vli(body, &mut pos)?)
        } else {
            None
        };
        let filters = usize::from(flags & 3) + 1;
        let mut dict = None;
        for i in 0..filters {
            let id = get_vli(body, &mut pos)?;
            let len = get_vli(body, &mut pos)?;
            let end = usize::try_from(len)
                .ok()
                .and_then(|l| pos.checked_add(l))
                .filter(|&e| e <= body.len())
                .ok_or_else(|| corrupt("xz filter properties overrun the block header"))?;
            let props = &body[pos..end];
            pos = end;
            let last = i + 1 == filters;
            if id == 0x21 {
                if !last || props.len() != 1 {
                    return Err(corrupt("xz LZMA2 filter is misplaced or malformed"));
                }
                dict = Some(lzma2_dict(props[0])?);
            } else if last {
                return Err(unsupported(format!(
                    "xz block's last filter is {id:#x}, not LZMA2"
                )));
            }
        }
        if body[pos..].iter().any(|&b| b != 0) {
            return Err(corrupt("xz block header padding is not zero"));
        }
        let dict = dict.ok_or_else(|| unsupported("xz block has no LZMA2 filter"))?;
        Ok(BlockHeader {
            raw,
            compressed,
            uncompressed,
            dict,
        })
    }

    /// The dictionary memory a decoder touches: the dictionary, but no more than the block's
    /// output (pages past it are never written).
    fn dict_in_use(&self) -> u64 {
        match self.uncompressed {
            Some(u) => self.dict.min(u.div_ceil(4096).max(1) * 4096),
            None => self.dict,
        }
    }
}

/// The reader's input: pushed-back bytes first, then the underlying reader. Interrupted reads
/// (EINTR) are retried; other errors (a caller's cancellation) are passed on.
struct Input<R> {
    r: R,
    front: Vec<u8>,
    front_pos: usize,
}

impl<R: BufRead> Input<R> {
    fn fill(&mut self) -> io::Result<&[u8]> {
        if self.front_pos < self.front.len() {
            return Ok(&self.front[self.front_pos..]);
        }
        loop {
            match self.r.fill_buf() {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
        self.r.fill_buf()
    }

    fn consume(&mut self, n: usize) {
        if self.front_pos < self.front.len() {
            self.front_pos += n;
            if self.front_pos >= self.front.len() {
                self.front.clear();
                self.front_pos = 0;
            }
        } else {
            self.r.consume(n);
        }
    }

    /// Push `bytes` back in front of what is left.
    fn unread(&mut self, mut bytes: Vec<u8>) {
        bytes.extend_from_slice(&self.front[self.front_pos..]);
        self.front = bytes;
        self.front_pos = 0;
    }

    /// Append input to `buf` until it holds `n` bytes; end of input is an error.
    fn fill_to(&mut self, buf: &mut Vec<u8>, n: usize) -> io::Result<()> {
        while buf.len() < n {
            let avail = self.fill()?;
            if avail.is_empty() {
                return Err(truncated());
            }
            let take = avail.len().min(n - buf.len());
            buf.extend_from_slice(&avail[..take]);
            self.consume(take);
        }
        Ok(())
    }

    fn byte(&mut self) -> io::Result<u8> {
        let b = *self.fill()?.first().ok_or_else(truncated)?;
        self.consume(1);
        Ok(b)
    }
}

/// Count, sizes and a checksum of the ordered (unpadded, uncompressed) size pairs of a
/// stream's blocks, as decoded or as listed in the index.
struct Records {
    count: u64,
    unpadded: u64,
    uncompressed: u64,
    crc: libdeflater::Crc,
}

impl Records {
    fn new() -> Self {
        Records {
            count: 0,
            unpadded: 0,
            uncompressed: 0,
            crc: libdeflater::Crc::new(),
        }
    }

    fn add(&mut self, unpadded: u64, uncompressed: u64) {
        self.count += 1;
        self.unpadded = self.unpadded.wrapping_add(unpadded);
        self.uncompressed = self.uncompressed.wrapping_add(uncompressed);
        self.crc.update(&unpadded.to_le_bytes());
        self.crc.update(&uncompressed.to_le_bytes());
    }

    fn same(&self, o: &Records) -> bool {
        self.count == o.count
            && self.unpadded == o.unpadded
            && self.uncompressed == o.uncompressed
            && self.crc.sum() == o.crc.sum()
    }
}

fn stream_header(flags: [u8; 2]) -> Vec<u8> {
    let mut h = HEADER_MAGIC.to_vec();
    h.extend_from_slice(&flags);
    h.extend_from_slice(&libdeflater::crc32(&flags).to_le_bytes());
    h
}

/// One block decoded by liblzma's stream decoder as a stream of its own: the stream header,
/// the block as it is in the file (the "body": header, data, padding, check), then an index and
/// footer made once the block's output size is known.
struct BlockDec {
    s: Lzma,
    head: Vec<u8>,
    head_pos: usize,
    body_left: u64,
    tail: Option<Vec<u8>>,
    tail_pos: usize,
    flags: [u8; 2],
    unpadded: u64,
}

impl BlockDec {
    /// `hdr`: the block header's bytes; `body`: bytes after it up to the end of the check.
    fn new(flags: [u8; 2], hdr: &[u8], body: u64, unpadded: u64) -> io::Result<BlockDec> {
        // The admission check counted this decoder's memory, so liblzma is not limited again.
        let s = Lzma::new_stream_decoder(u64::MAX, 0).map_err(|e| lzma_err(e, u64::MAX))?;
        let mut head = stream_header(flags);
        head.extend_from_slice(hdr);
        Ok(BlockDec {
            s,
            head,
            head_pos: 0,
            body_left: body,
            tail: None,
            tail_pos: 0,
            flags,
            unpadded,
        })
    }

    fn wants_input(&self) -> bool {
        self.head_pos == self.head.len() && self.body_left > 0
    }

    fn make_tail(&self) -> Vec<u8> {
        let mut t = vec![0u8];
        put_vli(&mut t, 1);
        put_vli(&mut t, self.unpadded);
        put_vli(&mut t, self.s.total_out());
        while t.len() % 4 != 0 {
            t.push(0);
        }
        let crc = libdeflater::crc32(&t);
        t.extend_from_slice(&crc.to_le_bytes());
        let backward = (t.len() as u32 / 4 - 1).to_le_bytes();
        let mut f = backward.to_vec();
        f.extend_from_slice(&self.flags);
        t.extend_from_slice(&libdeflater::crc32(&f).to_le_bytes());
        t.extend_from_slice(&f);
        t.extend_from_slice(&FOOTER_MAGIC);
        t
    }

    /// Decode into the spare capacity of `out`, taking body bytes from `inp` when
    /// [`Self::wants_input`]. Returns the body bytes used and whether the block is complete.
    fn step(&mut self, inp: &[u8], out: &mut Vec<u8>) -> io::Result<(usize, bool)> {
        let before_out = out.len();
        if self.head_pos == self.head.len() && self.body_left == 0 && self.tail.is_none() {
            // All of the block is in: let the decoder finish its output, then learn its size.
            let r = self.s.process_vec(&[], out, Action::Run);
            match r {
                Ok(Status::StreamEnd) => return Err(corrupt("xz block ended early")),
                Ok(_) if out.len() == before_out => {}
                Ok(_) => return Ok((0, false)),
                Err(e) => return Err(lzma_err(e, u64::MAX)),
            }
            if out.len() == out.capacity() {
                return Ok((0, false));
            }
            self.tail = Some(self.make_tail());
        }
        let before_in = self.s.total_in();
        let (src, body): (&[u8], bool) = if self.head_pos < self.head.len() {
            (&self.head[self.head_pos..], false)
        } else if self.body_left > 0 {
            if inp.is_empty() {
                return Err(truncated());
            }
            let n = inp
                .len()
                .min(usize::try_from(self.body_left).unwrap_or(usize::MAX));
            (&inp[..n], true)
        } else {
            match &self.tail {
                Some(t) => (&t[self.tail_pos..], false),
                None => (&[][..], false),
            }
        };
        let st = self
            .s
            .process_vec(src, out, Action::Run)
            .map_err(|e| lzma_err(e, u64::MAX))?;
        let used = (self.s.total_in() - before_in) as usize;
        let mut body_used = 0;
        if self.head_pos < self.head.len() {
            self.head_pos += used;
        } else if body {
            self.body_left -= used as u64;
            body_used = used;
        } else {
            self.tail_pos += used;
        }
        match st {
            Status::StreamEnd => {
                let tail_done = self.tail.as_ref().is_some_and(|t| self.tail_pos == t.len());
                if !tail_done {
                    return Err(corrupt("xz block ended early"));
                }
                Ok((body_used, true))
            }
            Status::MemNeeded if used == 0 && out.len() == before_out => {
                Err(corrupt("xz block is corrupt"))
            }
            _ => Ok((body_used, false)),
        }
    }
}

/// Memory shared by the blocks in flight. Each block holds a reservation (its dictionary, its
/// decoder, its compressed bytes not yet consumed and [`OWN_CHUNKS`] output chunks); output
/// chunks beyond those are borrowed from what is left of the budget, so a worker running ahead
/// of the reader buffers as much as fits and then waits for the reader.
struct Pool {
    m: Mutex<PoolState>,
    cv: Condvar,
}

struct PoolState {
    cap: u64,
    /// Sum of the reservations of the blocks in flight.
    reserved: u64,
    /// Output chunks borrowed beyond the reservations.
    borrowed: u64,
    /// Spare [`CHUNK`]-sized buffers for reuse (counted against the budget too): reusing
    /// them, rather than freeing and allocating, keeps the allocator's arenas from holding
    /// freed memory beyond the budget.
    idle: Vec<Vec<u8>>,
    /// The reader is gone: waiting workers stop.
    closed: bool,
}

impl PoolState {
    fn used(&self) -> u64 {
        self.reserved + self.borrowed + self.idle.len() as u64 * CHUNK
    }

    /// A buffer of capacity `n`: a spare one if it is [`CHUNK`] bytes.
    fn buffer(&mut self, n: usize) -> Vec<u8> {
        if n as u64 == CHUNK {
            if let Some(v) = self.idle.pop() {
                return v;
            }
        }
        Vec::with_capacity(n)
    }

    /// Keep `v` as a spare buffer if it fits in the budget.
    fn stash(&mut self, mut v: Vec<u8>) {
        if v.capacity() as u64 == CHUNK && self.used() + CHUNK <= self.cap {
            v.clear();
            self.idle.push(v);
        }
    }

    /// Drop spare buffers until the accounted memory fits in the budget.
    fn trim(&mut self) {
        while self.used() > self.cap && self.idle.pop().is_some() {}
    }
}

/// Output chunks each block may have outstanding (one being filled, one with the reader)
/// without borrowing: enough for the block being read to make progress on its own.
const OWN_CHUNKS: u64 = 2;

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.m.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A block's share of the pool, as seen by its worker and the reader.
struct Share {
    pool: Arc<Pool>,
    /// Chunks of this block outstanding without borrowing (changed under the pool's lock).
    own: AtomicU64,
    chunk: u64,
}

impl Share {
    /// Wait for room for one more output chunk; returns it and whether it is borrowed, or
    /// `None` once the reader is gone.
    fn take_chunk(&self) -> Option<(Vec<u8>, bool)> {
        let mut st = self.pool.lock();
        loop {
            if st.closed {
                return None;
            }
            if self.own.load(Ordering::Relaxed) < OWN_CHUNKS {
                self.own.fetch_add(1, Ordering::Relaxed);
                return Some((st.buffer(self.chunk as usize), false));
            }
            if self.chunk == CHUNK && !st.idle.is_empty() {
                st.borrowed += self.chunk;
                return Some((st.buffer(self.chunk as usize), true));
            }
            if st.used() + self.chunk <= st.cap {
                st.borrowed += self.chunk;
                return Some((Vec::with_capacity(self.chunk as usize), true));
            }
            st = self.pool.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The reader is done with a chunk.
    fn give_chunk(&self, v: Vec<u8>, borrowed: bool) {
        let mut st = self.pool.lock();
        if borrowed {
            st.borrowed -= self.chunk;
        } else {
            self.own.fetch_sub(1, Ordering::Relaxed);
        }
        st.stash(v);
        drop(st);
        self.pool.cv.notify_all();
    }

    /// Return `n` bytes of the reservation (compressed input consumed, or the block's end),
    /// and the buffer that held them, if any.
    fn release(&self, n: u64, v: Option<Vec<u8>>) {
        let mut st = self.pool.lock();
        st.reserved -= n;
        if let Some(v) = v {
            st.stash(v);
        }
        drop(st);
        self.pool.cv.notify_all();
    }
}

enum Msg {
    /// Output, and whether its chunk is borrowed.
    Data(Vec<u8>, bool),
    /// The block is complete and verified; its decoded size.
    Done(u64),
    Failed(io::Error),
}

/// A block handed to a worker.
struct Job {
    rx: Receiver<Msg>,
    share: Arc<Share>,
    /// The reservation left once the compressed bytes are consumed: dictionary, decoder,
    /// own output chunks.
    fixed: u64,
    unpadded: u64,
}

fn work(mut d: BlockDec, chunks: Vec<Vec<u8>>, share: Arc<Share>, tx: Sender<Msg>) {
    let r = (|| -> io::Result<u64> {
        let gone = || io::Error::other("xz reader is gone");
        let (mut out, mut borrowed) = share.take_chunk().ok_or_else(gone)?;
        let mut chunks = chunks.into_iter();
        let mut cur = chunks.next().unwrap_or_default();
        let mut pos = 0;
        loop {
            let inp: &[u8] = if d.wants_input() { &cur[pos..] } else { &[] };
            let (used, fin) = d.step(inp, &mut out)?;
            pos += used;
            if pos == cur.len() && !cur.is_empty() {
                let used = std::mem::replace(&mut cur, chunks.next().unwrap_or_default());
                share.release(used.len() as u64, Some(used));
                pos = 0;
            }
            if fin {
                if !out.is_empty() {
                    tx.send(Msg::Data(out, borrowed)).map_err(|_| gone())?;
                } else {
                    share.give_chunk(out, borrowed);
                }
                return Ok(d.s.total_out());
            }
            if out.len() == out.capacity() {
                tx.send(Msg::Data(out, borrowed)).map_err(|_| gone())?;
                (out, borrowed) = share.take_chunk().ok_or_else(gone)?;
            }
        }
    })();
    let _ = tx.send(match r {
        Ok(n) => Msg::Done(n),
        Err(e) => Msg::Failed(e),
    });
}

/// The blocks of one block-parallel stream.
struct Blocks {
    flags: [u8; 2],
    next: Option<BlockHeader>,
    /// The index indicator has been read: no more blocks.
    at_index: bool,
    inflight: VecDeque<Job>,
    /// A block streamed on the reading thread (nothing in flight meanwhile).
    inline: Option<BlockDec>,
    done: Records,
    pool: Arc<Pool>,
    /// The chunk the reader is serving, to give back once served.
    held: Option<(Arc<Share>, bool)>,
    /// Blocks for the worker threads, which live as long as this stream's decoding (one
    /// per block in flight: their allocator arenas are reused, not multiplied).
    tasks: Sender<Task>,
    task_rx: Arc<Mutex<Receiver<Task>>>,
    workers: usize,
}

type Task = Box<dyn FnOnce() + Send>;

fn worker_loop(rx: Arc<Mutex<Receiver<Task>>>) {
    loop {
        let t = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
        match t {
            Ok(f) => f(),
            Err(_) => return,
        }
    }
}

impl Blocks {
    fn new(flags: [u8; 2], next: Option<BlockHeader>, budget: u64) -> Box<Blocks> {
        let (tasks, task_rx) = channel();
        Box::new(Blocks {
            tasks,
            task_rx: Arc::new(Mutex::new(task_rx)),
            workers: 0,
            flags,
            at_index: next.is_none(),
            next,
            inflight: VecDeque::new(),
            inline: None,
            done: Records::new(),
            pool: Arc::new(Pool {
                m: Mutex::new(PoolState {
                    cap: budget,
                    reserved: 0,
                    borrowed: 0,
                    idle: Vec::new(),
                    closed: false,
                }),
                cv: Condvar::new(),
            }),
            held: None,
        })
    }
}

impl Drop for Blocks {
    fn drop(&mut self) {
        self.pool.lock().closed = true;
        self.pool.cv.notify_all();
    }
}

enum State {
    /// Before a stream header: the first one, or padding / another stream / the end.
    NextStream {
        first: bool,
    },
    /// A stream liblzma decodes sequentially.
    Whole(Box<Lzma>),
    Blocks(Box<Blocks>),
    Done,
}

/// Decoder for xz files (concatenated streams, stream padding) within a memory budget.
pub(super) struct XzReader<R: BufRead> {
    input: Input<R>,
    threads: usize,
    /// The caller's budget (for messages) and what is left of it for decoders and buffers.
    limit: u64,
    budget: u64,
    state: State,
    out: Vec<u8>,
    out_pos: usize,
    failed: Option<String>,
}

impl<R: BufRead> XzReader<R> {
    /// Read the first stream's header (and first block header) now, so that a dictionary
    /// over budget is refused before any output.
    pub(super) fn new(r: R, threads: u32, limit: u64) -> crate::error::Result<Self> {
        let mut x = XzReader {
            input: Input {
                r,
                front: Vec::new(),
                front_pos: 0,
            },
            threads: threads.max(1) as usize,
            limit,
            budget: limit.saturating_sub(INPUT_BUF as u64),
            state: State::NextStream { first: true },
            out: Vec::new(),
            out_pos: 0,
            failed: None,
        };
        x.next_stream(true).map_err(to_error)?;
        Ok(x)
    }

    fn next_stream(&mut self, first: bool) -> io::Result<()> {
        if !first {
            // Stream padding (zero bytes) between streams and at the end.
            loop {
                let avail = self.input.fill()?;
                if avail.is_empty() {
                    self.state = State::Done;
                    return Ok(());
                }
                let zeros = avail.iter().take_while(|&&b| b == 0).count();
                if zeros == 0 {
                    break;
                }
                self.input.consume(zeros);
            }
        }
        let mut h = Vec::with_capacity(12);
        self.input.fill_to(&mut h, 12)?;
        if h[..6] != HEADER_MAGIC {
            return Err(corrupt("data after an xz stream is not an xz stream"));
        }
        let flags = [h[6], h[7]];
        if libdeflater::crc32(&flags).to_le_bytes() != h[8..12] {
            return Err(corrupt("xz stream header checksum mismatch"));
        }
        if flags[0] != 0 || flags[1] > 0x0F {
            return Err(unsupported("xz stream header has reserved flags set"));
        }
        let mut b = Vec::new();
        self.input.fill_to(&mut b, 1)?;
        if b[0] == 0 {
            // No blocks: the index follows.
            self.state = State::Blocks(Blocks::new(flags, None, self.budget));
            return Ok(());
        }
        let n = (usize::from(b[0]) + 1) * 4;
        self.input.fill_to(&mut b, n)?;
        let hdr = BlockHeader::parse(b)?;
        if self.threads > 1 && hdr.compressed.is_some() {
            // The least a block needs: streamed on this thread.
            let chunk = hdr.uncompressed.unwrap_or(CHUNK).clamp(1, CHUNK);
            if hdr.dict_in_use() + DECODER_OVERHEAD + chunk > self.budget {
                return Err(too_large_dict(hdr.dict_in_use(), self.limit));
            }
            self.state = State::Blocks(Blocks::new(flags, Some(hdr), self.budget));
            return Ok(());
        }
        // liblzma counts the whole dictionary against its limit.
        if hdr.dict + DECODER_OVERHEAD > self.budget {
            return Err(too_large_dict(hdr.dict, self.limit));
        }
        let s = Lzma::new_stream_decoder(self.budget, 0).map_err(|e| lzma_err(e, self.limit))?;
        h.extend_from_slice(&hdr.raw);
        self.input.unread(h);
        self.state = State::Whole(Box::new(s));
        Ok(())
    }

    fn read_inner(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.out_pos < self.out.len() {
                let n = buf.len().min(self.out.len() - self.out_pos);
                buf[..n].copy_from_slice(&self.out[self.out_pos..self.out_pos + n]);
                self.out_pos += n;
                return Ok(n);
            }
            let ended = match &mut self.state {
                State::Done => return Ok(0),
                State::NextStream { first } => {
                    let first = *first;
                    self.next_stream(first)?;
                    continue;
                }
                State::Whole(s) => {
                    let (n, end) = whole_step(s, &mut self.input, buf, self.limit)?;
                    if end {
                        self.state = State::NextStream { first: false };
                    }
                    if n > 0 {
                        return Ok(n);
                    }
                    continue;
                }
                State::Blocks(b) => {
                    self.out_pos = 0;
                    b.step(
                        &mut self.input,
                        &mut self.out,
                        self.budget,
                        self.limit,
                        self.threads,
                    )?
                }
            };
            if ended {
                self.state = State::NextStream { first: false };
            }
        }
    }
}

/// Decode some of a sequential stream into `buf`; returns the bytes written and whether the
/// stream ended.
fn whole_step<R: BufRead>(
    s: &mut Lzma,
    input: &mut Input<R>,
    buf: &mut [u8],
    limit: u64,
) -> io::Result<(usize, bool)> {
    loop {
        let inp = input.fill()?;
        let eof = inp.is_empty();
        let (in0, out0) = (s.total_in(), s.total_out());
        let st = s
            .process(inp, buf, Action::Run)
            .map_err(|e| lzma_err(e, limit))?;
        let used = (s.total_in() - in0) as usize;
        let made = (s.total_out() - out0) as usize;
        input.consume(used);
        if matches!(st, Status::StreamEnd) {
            return Ok((made, true));
        }
        if made > 0 {
            return Ok((made, false));
        }
        if eof || (used == 0 && matches!(st, Status::MemNeeded)) {
            return Err(truncated());
        }
    }
}

impl Blocks {
    /// Refill `out` with the next output, or return true at the end of the stream (index and
    /// footer verified).
    fn step<R: BufRead>(
        &mut self,
        input: &mut Input<R>,
        out: &mut Vec<u8>,
        budget: u64,
        limit: u64,
        threads: usize,
    ) -> io::Result<bool> {
        out.clear();
        if let Some((share, borrowed)) = self.held.take() {
            share.give_chunk(std::mem::take(out), borrowed);
        }
        loop {
            if let Some(d) = &mut self.inline {
                if out.capacity() == 0 {
                    out.reserve_exact(CHUNK as usize);
                }
                loop {
                    let inp: &[u8] = if d.wants_input() { input.fill()? } else { &[] };
                    let (used, fin) = d.step(inp, out)?;
                    input.consume(used);
                    if fin {
                        let n = d.s.total_out();
                        self.done.add(d.unpadded, n);
                        self.inline = None;
                        break;
                    }
                    if out.len() == out.capacity() {
                        return Ok(false);
                    }
                }
                if !out.is_empty() {
                    return Ok(false);
                }
                continue;
            }
            self.admit(input, budget, limit, threads)?;
            if self.inline.is_some() {
                continue;
            }
            if let Some(front) = self.inflight.front() {
                match front.rx.recv() {
                    Ok(Msg::Data(v, borrowed)) => {
                        *out = v;
                        self.held = Some((front.share.clone(), borrowed));
                        return Ok(false);
                    }
                    Ok(Msg::Done(n)) => {
                        front.share.release(front.fixed, None);
                        let unpadded = front.unpadded;
                        self.inflight.pop_front();
                        self.done.add(unpadded, n);
                        continue;
                    }
                    Ok(Msg::Failed(e)) => return Err(e),
                    Err(_) => return Err(io::Error::other("xz block worker stopped")),
                }
            }
            if self.at_index {
                self.finish(input)?;
                return Ok(true);
            }
            return Err(io::Error::other("xz decoder has nothing to do"));
        }
    }

    /// Start blocks while threads and the budget allow.
    fn admit<R: BufRead>(
        &mut self,
        input: &mut Input<R>,
        budget: u64,
        limit: u64,
        threads: usize,
    ) -> io::Result<()> {
        while self.inline.is_none() && !self.at_index && self.inflight.len() < threads {
            let hdr = match self.next.take() {
                Some(h) => h,
                None => {
                    let mut b = Vec::new();
                    input.fill_to(&mut b, 1)?;
                    if b[0] == 0 {
                        self.at_index = true;
                        break;
                    }
                    let n = (usize::from(b[0]) + 1) * 4;
                    input.fill_to(&mut b, n)?;
                    BlockHeader::parse(b)?
                }
            };
            let Some(csize) = hdr.compressed else {
                return Err(unsupported(
                    "xz block without its compressed size after blocks with sizes",
                ));
            };
            let check = check_size(self.flags[1] & 0x0F);
            let body = csize + (4 - csize % 4) % 4 + check;
            let unpadded = (hdr.raw.len() as u64)
                .checked_add(csize)
                .and_then(|v| v.checked_add(check))
                .filter(|&v| v <= VLI_MAX)
                .ok_or_else(|| corrupt("xz block is too large"))?;
            let dict = hdr.dict_in_use();
            let chunk = hdr.uncompressed.unwrap_or(CHUNK).clamp(1, CHUNK);
            let fixed = dict + DECODER_OVERHEAD + OWN_CHUNKS * chunk;
            let admitted = {
                let mut st = self.pool.lock();
                let fits = st.reserved + st.borrowed + fixed.saturating_add(body) <= st.cap;
                if fits {
                    st.reserved += fixed + body;
                    st.trim();
                }
                fits
            };
            if admitted {
                let share = Arc::new(Share {
                    pool: self.pool.clone(),
                    own: AtomicU64::new(0),
                    chunk,
                });
                let mut chunks = Vec::new();
                let mut left = body;
                while left > 0 {
                    let n = left.min(CHUNK) as usize;
                    let mut c = self.pool.lock().buffer(n);
                    if let Err(e) = input.fill_to(&mut c, n) {
                        share.release(fixed + body, Some(c));
                        return Err(e);
                    }
                    chunks.push(c);
                    left -= n as u64;
                }
                let d = BlockDec::new(self.flags, &hdr.raw, body, unpadded)?;
                let (tx, rx) = channel();
                let sh = share.clone();
                if self.workers <= self.inflight.len() {
                    let rx = self.task_rx.clone();
                    std::thread::Builder::new()
                        .name("vdisk-xz".into())
                        .spawn(move || worker_loop(rx))?;
                    self.workers += 1;
                }
                self.tasks
                    .send(Box::new(move || work(d, chunks, sh, tx)))
                    .map_err(|_| io::Error::other("xz workers are gone"))?;
                self.inflight.push_back(Job {
                    rx,
                    share,
                    fixed,
                    unpadded,
                });
            } else if self.inflight.is_empty() {
                // Too big to buffer: stream it on this thread.
                if dict + DECODER_OVERHEAD + chunk > budget {
                    return Err(too_large_dict(dict, limit));
                }
                self.inline = Some(BlockDec::new(self.flags, &hdr.raw, body, unpadded)?);
            } else {
                self.next = Some(hdr);
                break;
            }
        }
        Ok(())
    }

    /// Read and verify the index (its indicator already read) and the stream footer.
    fn finish<R: BufRead>(&mut self, input: &mut Input<R>) -> io::Result<()> {
        let mut crc = libdeflater::Crc::new();
        crc.update(&[0]);
        let mut size = 1u64;
        let mut vli = |input: &mut Input<R>| -> io::Result<u64> {
            let mut b = Vec::with_capacity(9);
            loop {
                let x = input.byte()?;
                b.push(x);
                if x & 0x80 == 0 || b.len() == 9 {
                    break;
                }
            }
            crc.update(&b);
            size += b.len() as u64;
            get_vli(&b, &mut 0)
        };
        let count = vli(input)?;
        if count != self.done.count {
            return Err(corrupt(format!(
                "xz index lists {count} blocks, the stream has {}",
                self.done.count
            )));
        }
        let mut listed = Records::new();
        for _ in 0..count {
            let unpadded = vli(input)?;
            let uncompressed = vli(input)?;
            listed.add(unpadded, uncompressed);
        }
        if !listed.same(&self.done) {
            return Err(corrupt("xz index does not match the stream's blocks"));
        }
        while size % 4 != 0 {
            let b = input.byte()?;
            if b != 0 {
                return Err(corrupt("xz index padding is not zero"));
            }
            crc.update(&[b]);
            size += 1;
        }
        let mut t = Vec::with_capacity(16);
        input.fill_to(&mut t, 16)?;
        if crc.sum().to_le_bytes() != t[..4] {
            return Err(corrupt("xz index checksum mismatch"));
        }
        let f = &t[4..];
        if libdeflater::crc32(&f[4..10]).to_le_bytes() != f[..4] {
            return Err(corrupt("xz stream footer checksum mismatch"));
        }
        let backward = u32::from_le_bytes([f[4], f[5], f[6], f[7]]);
        if (u64::from(backward) + 1) * 4 != size + 4 {
            return Err(corrupt("xz stream footer does not match the index size"));
        }
        if f[8..10] != self.flags || f[10..12] != FOOTER_MAGIC {
            return Err(corrupt("xz stream footer does not match its header"));
        }
        Ok(())
    }
}

impl<R: BufRead> Read for XzReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if let Some(m) = &self.failed {
            return Err(io::Error::other(format!("xz decoding failed earlier: {m}")));
        }
        let r = self.read_inner(buf);
        if let Err(e) = &r {
            self.failed = Some(e.to_string());
        }
        r
    }
}
