//! Front-to-back reading of the formats behind [`crate::image::Driver`] (VHD, VDI, VMDK): the
//! streaming strategy over each format's one model, so the importer and uploader take them
//! from a pipe with no spool file.
//!
//! A format module parses its metadata with the same code and limits as its file reader,
//! reading through [`HeadIo`] (the stream's first bytes, kept in memory and charged to the
//! budget), and returns a [`Forward`]: a reader that asks for byte ranges of the file in
//! increasing order, decodes what it is handed and writes guest data. [`run`] reads the stream
//! once, front to back, hands the ranges over and finally gives the reader the stream's length
//! and last bytes, so every check the file reader makes against the file's size is made again
//! on the same numbers. A layout that puts data before its metadata, or metadata beyond the
//! memory kept for it, makes [`run`] give the stream back for spooling.

use crate::budget::Budget;
use crate::detect::Format;
use crate::error::{Error, ErrorKind, Result};
use crate::io::BlockIo;
use crate::qcow2::stream::{Fill, Target};
use std::io;
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

/// Largest piece handed to [`Forward::take`] at once.
pub const PIECE: usize = 1 << 20;
/// Bytes of the stream's end kept for [`Forward::finish`] (a VMDK footer's three sectors).
pub const TAIL: usize = 1536;
/// A file size that passes every "inside the file" check at open; the stream's real length
/// is checked by [`Forward::finish`] with the same rules.
pub const UNKNOWN_LEN: u64 = 1 << 62;

/// A format's front-to-back reader.
pub trait Forward: Send {
    /// Size of the virtual disk.
    fn virtual_size(&self) -> u64;
    /// Bytes of memory the reader holds (its tables), charged to the budget.
    fn held(&self) -> u64 {
        0
    }
    /// The next range of the file wanted, `(offset, len)`, starting at or after the end of the
    /// previous one; `None` when nothing more is needed (the rest is read only for its length
    /// and its last bytes).
    fn want(&mut self) -> Result<Option<(u64, u64)>>;
    /// Bytes of the range last wanted, in order: `at` is their file offset. Pieces are
    /// [`PIECE`] bytes long but for the last of a range (or one cut short by the end).
    fn take(&mut self, at: u64, bytes: &[u8], out: &dyn Target) -> Result<()>;
    /// The stream ended after `len` bytes; `tail` holds its last bytes (up to [`TAIL`]).
    /// Checks against the length and writes whatever is left (zeros where nothing was).
    fn finish(&mut self, len: u64, tail: &[u8], out: &dyn Target) -> Result<()>;
}

/// The units from `next` on that share its key (units sorted by key): a block of the file read
/// once for every guest range it holds.
pub fn same_key<K: PartialEq + Copy, V>(units: &[(K, V)], next: usize) -> std::ops::Range<usize> {
    let key = units[next].0;
    let mut end = next + 1;
    while units.get(end).is_some_and(|&(k, _)| k == key) {
        end += 1;
    }
    next..end
}

/// Make every `unit`-byte unit of a `size`-byte disk that no index in `present` names read as
/// zeros (what the file reader reads where the tables map nothing), in runs.
pub fn zero_absent(
    present: impl Iterator<Item = u64>,
    unit: u64,
    size: u64,
    out: &dyn Target,
) -> Result<()> {
    let mut held: Vec<u64> = present.collect();
    held.sort_unstable();
    held.dedup();
    let mut pos = 0u64;
    for i in held.into_iter().chain(std::iter::once(size.div_ceil(unit))) {
        let start = i.saturating_mul(unit).min(size);
        if start > pos {
            out.zero(pos, start - pos)?;
        }
        pos = pos.max(i.saturating_add(1).saturating_mul(unit).min(size));
    }
    Ok(())
}

/// Zero the part of each `(host, index)` unit past the stream's end `len`: a unit of
/// `unit_len(index)` bytes at guest `index * unit` that the end cut short reads as zeros past
/// it, as from a file.
pub fn zero_cut_short(
    units: &[(u64, u64)],
    len: u64,
    unit: u64,
    unit_len: impl Fn(u64) -> u64,
    out: &dyn Target,
) -> Result<()> {
    for &(host, i) in units {
        let full = unit_len(i);
        let got = len.saturating_sub(host).min(full);
        if got < full {
            out.zero(i * unit + got, full - got)?;
        }
    }
    Ok(())
}

/// The head of a stream as random-access bytes for a format's open: reads pull the stream
/// forward and every byte read stays in memory (charged to the budget) until [`run`] takes
/// them back. Reads past what the stream holds end short, as at a file's end; reads past
/// `limit` fail and mark the head as overflowing (the stream is then spooled instead).
pub struct HeadIo<'f, 'a> {
    state: Mutex<Head<'f, 'a>>,
    limit: usize,
    budget: &'f Budget,
}

struct Head<'f, 'a> {
    fill: &'f mut Fill<'a>,
    buf: Vec<u8>,
    charged: u64,
    eof: bool,
    overflow: bool,
}

impl std::fmt::Debug for HeadIo<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadIo")
            .field("limit", &self.limit)
            .finish()
    }
}

impl<'f, 'a> HeadIo<'f, 'a> {
    /// Wrap the stream `fill` whose first bytes `start` were already read (the sniffed
    /// magic), keeping at most `limit` bytes.
    pub fn new(fill: &'f mut Fill<'a>, limit: usize, budget: &'f Budget) -> HeadIo<'f, 'a> {
        HeadIo {
            state: Mutex::new(Head {
                fill,
                buf: Vec::new(),
                charged: 0,
                eof: false,
                overflow: false,
            }),
            limit,
            budget,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Head<'f, 'a>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Most bytes of the stream the head keeps.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes of the budget not yet used (for what a reader keeps as it goes).
    pub fn budget_left(&self) -> u64 {
        self.budget.limit().saturating_sub(self.budget.used())
    }

    /// Whether a read went past the bytes that may be kept.
    pub fn overflowed(&self) -> bool {
        self.lock().overflow
    }

    /// The bytes read so far and whether the stream ended among them.
    fn into_parts(self) -> (Vec<u8>, bool, u64) {
        let h = self.state.into_inner().unwrap_or_else(|e| e.into_inner());
        (h.buf, h.eof, h.charged)
    }

    /// Make the first `end` bytes (or all the stream has) present.
    fn extend(&self, h: &mut Head<'f, 'a>, end: usize) -> io::Result<()> {
        if end > self.limit {
            h.overflow = true;
            return Err(io::Error::other(Error::new(
                ErrorKind::TooLarge,
                format!(
                    "the image's metadata reaches past the first {} bytes of the stream",
                    self.limit
                ),
            )));
        }
        while !h.eof && h.buf.len() < end {
            let have = h.buf.len();
            let want = (end - have).max(64 << 10).min(self.limit - have);
            let grow = (have + want) as u64;
            if grow > h.charged {
                if !self.budget.try_charge(grow - h.charged) {
                    h.overflow = true;
                    return Err(io::Error::other(Error::new(
                        ErrorKind::TooLarge,
                        format!(
                            "the image's metadata in the stream exceeds the memory budget of {} bytes",
                            self.budget.limit()
                        ),
                    )));
                }
                h.charged = grow;
            }
            h.buf.resize(have + want, 0);
            let n = (h.fill)(&mut h.buf[have..]).map_err(io::Error::other)?;
            h.buf.truncate(have + n);
            if n < want {
                h.eof = true;
            }
        }
        Ok(())
    }
}

impl BlockIo for HeadIo<'_, '_> {
    fn size(&self) -> io::Result<u64> {
        Ok(UNKNOWN_LEN)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut h = self.lock();
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(buf.len());
        self.extend(&mut h, end)?;
        if start >= h.buf.len() {
            return Ok(0);
        }
        let n = (h.buf.len() - start).min(buf.len());
        buf[..n].copy_from_slice(&h.buf[start..start + n]);
        Ok(n)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let n = self.read_at(buf, offset)?;
        if n < buf.len() {
            // A file this short fails the format's "inside the file" checks: the same verdict.
            return Err(io::Error::other(Error::corrupt(format!(
                "the stream ends at {} bytes, before the {} bytes at offset {offset}",
                offset + n as u64,
                buf.len()
            ))));
        }
        Ok(())
    }

    fn write_all_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "a stream's head is read-only",
        ))
    }
}

/// The end of a [`run`].
pub enum Outcome {
    /// The image was written; its virtual size.
    Done(u64),
    /// The layout cannot be read front to back: the bytes read so far, to be followed by the
    /// rest of the stream.
    Spool(Vec<u8>),
}

/// Opens a format's [`Forward`] reader over the stream's head; `Ok(None)`: this image's
/// layout is not read front to back (spool it).
pub type Opener<'h> = dyn FnOnce(&HeadIo<'_, '_>) -> Result<Option<Box<dyn Forward>>> + 'h;

/// Read the image of format `fmt` in the stream `fill` front to back into `out` (at most
/// `capacity` bytes of disk); metadata held at open stays under `head_limit` bytes and the
/// budget.
#[allow(clippy::too_many_arguments)]
pub fn run(
    fmt: Format,
    fill: &mut Fill<'_>,
    out: &dyn Target,
    capacity: u64,
    head_limit: usize,
    budget: &Budget,
    ticker: &mut dyn FnMut() -> Result<()>,
    too_large: &dyn Fn(u64) -> Error,
) -> Result<Outcome> {
    let opener: Box<Opener<'_>> = match fmt {
        Format::Vhd => Box::new(crate::vhd::forward),
        Format::Vdi => Box::new(crate::vdi::forward),
        Format::Vmdk => Box::new(crate::vmdk::forward),
        Format::Vhdx => Box::new(crate::vhdx::forward),
        _ => return Ok(Outcome::Spool(Vec::new())),
    };
    let head = HeadIo::new(fill, head_limit, budget);
    let opened = opener(&head);
    let overflow = head.overflowed();
    let (held, eof, charged) = head.into_parts();
    let mut fwd = match opened {
        Ok(Some(f)) => f,
        Ok(None) => {
            budget.release(charged);
            return Ok(Outcome::Spool(held));
        }
        Err(_) if overflow => {
            budget.release(charged);
            return Ok(Outcome::Spool(held));
        }
        Err(e) => {
            budget.release(charged);
            return Err(file_verdict(fmt, held, eof, fill, ticker, e));
        }
    };
    let size = fwd.virtual_size();
    if size > capacity {
        budget.release(charged);
        return Err(too_large(size));
    }
    // The head stays charged while it is replayed; the reader's tables for the whole run.
    let tables = fwd.held();
    if let Err(e) = budget.charge(tables, "the image's tables") {
        budget.release(charged);
        return Err(e);
    }
    let r = pump(fwd.as_mut(), fill, held, eof, out, ticker);
    budget.release(charged);
    budget.release(tables);
    r.map(|()| Outcome::Done(size))
}

/// The verdict on a stream whose head the format's streaming open refused with `e`. That open
/// ran with the file's length unknown, so a check the file reader makes earlier against the
/// length may decide otherwise: the rest of the stream is read (not kept) for its length and
/// the file reader opens the head with it. Its error is the verdict; where it would need
/// bytes that were not kept, or accepts, the streaming open's error stands.
fn file_verdict(
    fmt: Format,
    held: Vec<u8>,
    eof: bool,
    fill: &mut Fill<'_>,
    ticker: &mut dyn FnMut() -> Result<()>,
    e: Error,
) -> Error {
    let mut len = held.len() as u64;
    if !eof {
        let mut buf = vec![0u8; PIECE];
        loop {
            let n = match fill(&mut buf) {
                Ok(n) => n,
                Err(read) => return read,
            };
            len += n as u64;
            if let Err(t) = ticker() {
                return t;
            }
            if n < buf.len() {
                break;
            }
        }
    }
    let io = std::sync::Arc::new(Known { bytes: held, len });
    let opts = crate::image::OpenOptions {
        format: Some(fmt),
        policy: crate::image::Policy::Untrusted,
        ..Default::default()
    };
    match crate::image::Image::from_io(io, &opts) {
        Err(f) if !f.to_string().contains(NOT_KEPT) => f,
        _ => e,
    }
}

const NOT_KEPT: &str = "bytes of the stream that were not kept";

/// A stream's first bytes and its length: what a file reader may open when all it reads lies
/// in those bytes.
#[derive(Debug)]
struct Known {
    bytes: Vec<u8>,
    len: u64,
}

impl BlockIo for Known {
    fn size(&self) -> io::Result<u64> {
        Ok(self.len)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.len {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.len - offset) as usize;
        let end = offset + n as u64;
        if end > self.bytes.len() as u64 {
            return Err(io::Error::other(NOT_KEPT));
        }
        buf[..n].copy_from_slice(&self.bytes[offset as usize..end as usize]);
        Ok(n)
    }

    fn write_all_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "read-only"))
    }
}

/// A filled buffer of the stream and how many bytes it holds (or the read's error).
type Piece = Result<(Vec<u8>, usize)>;

/// Buffers of the stream in flight between the reading thread and the decoder.
const IN_FLIGHT: usize = 3;

/// The stream from its first byte: the held head, then the pieces a reading thread pulls from
/// the input (so a pipe or socket is read while the previous piece is decoded and written);
/// keeps the last [`TAIL`] bytes.
struct Reader {
    held: Vec<u8>,
    /// Filled pieces `(buffer, length)`; a short one is the last.
    full: Option<Receiver<Piece>>,
    /// Emptied buffers back to the reading thread.
    free: Option<SyncSender<Vec<u8>>>,
    /// The piece being consumed and how far.
    cur: Option<(Vec<u8>, usize, usize)>,
    eof: bool,
    pos: u64,
    tail: Vec<u8>,
}

impl Reader {
    /// The next bytes of the current piece (a new piece when it is used up); empty at the end.
    fn next_piece(&mut self) -> Result<()> {
        if self.cur.as_ref().is_some_and(|&(_, n, at)| at < n) || self.eof {
            return Ok(());
        }
        if let Some((b, n, _)) = self.cur.take() {
            if n < b.len() {
                self.eof = true;
                return Ok(());
            }
            if let Some(f) = &self.free {
                let _ = f.send(b);
            }
        }
        match self.full.as_ref().map(|r| r.recv()) {
            Some(Ok(Ok((b, n)))) => {
                self.eof = n == 0;
                self.cur = Some((b, n, 0));
                Ok(())
            }
            Some(Ok(Err(e))) => Err(e),
            _ => {
                self.eof = true;
                Ok(())
            }
        }
    }

    /// Read up to `buf.len()` bytes (fewer only at the end).
    fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        let mut n = 0;
        let p = usize::try_from(self.pos).unwrap_or(usize::MAX);
        if p < self.held.len() {
            n = (self.held.len() - p).min(buf.len());
            buf[..n].copy_from_slice(&self.held[p..p + n]);
            if p + n == self.held.len() {
                self.held = Vec::new();
            }
        }
        while n < buf.len() && self.held.is_empty() {
            self.next_piece()?;
            let Some((b, len, at)) = self.cur.as_mut() else {
                break;
            };
            if *at >= *len {
                break;
            }
            let k = (*len - *at).min(buf.len() - n);
            buf[n..n + k].copy_from_slice(&b[*at..*at + k]);
            *at += k;
            n += k;
        }
        self.pos += n as u64;
        let got = &buf[..n];
        if got.len() >= TAIL {
            self.tail.clear();
            self.tail.extend_from_slice(&got[got.len() - TAIL..]);
        } else {
            self.tail.extend_from_slice(got);
            let cut = self.tail.len().saturating_sub(TAIL);
            self.tail.drain(..cut);
        }
        Ok(n)
    }
}

fn pump(
    fwd: &mut dyn Forward,
    fill: &mut Fill<'_>,
    held: Vec<u8>,
    eof: bool,
    out: &dyn Target,
    ticker: &mut dyn FnMut() -> Result<()>,
) -> Result<()> {
    std::thread::scope(|scope| {
        let (full_tx, full_rx) = sync_channel::<Piece>(IN_FLIGHT);
        let (free_tx, free_rx) = sync_channel::<Vec<u8>>(IN_FLIGHT + 2);
        for _ in 0..IN_FLIGHT + 1 {
            let _ = free_tx.send(vec![0u8; PIECE]);
        }
        if !eof {
            scope.spawn(move || {
                while let Ok(mut b) = free_rx.recv() {
                    match fill(&mut b) {
                        Ok(n) => {
                            let last = n < b.len();
                            if full_tx.send(Ok((b, n))).is_err() || last {
                                break;
                            }
                        }
                        Err(e) => {
                            let _ = full_tx.send(Err(e));
                            break;
                        }
                    }
                }
            });
        }
        let mut r = Reader {
            held,
            full: (!eof).then_some(full_rx),
            free: Some(free_tx),
            cur: None,
            eof,
            pos: 0,
            tail: Vec::with_capacity(2 * TAIL),
        };
        let res = drive(fwd, &mut r, out, ticker);
        // Stop the reading thread: it sees both channels closed.
        r.full = None;
        r.free = None;
        res
    })
}

fn drive(
    fwd: &mut dyn Forward,
    r: &mut Reader,
    out: &dyn Target,
    ticker: &mut dyn FnMut() -> Result<()>,
) -> Result<()> {
    let mut buf = vec![0u8; PIECE];
    let mut prev_end = 0u64;
    'ranges: while let Some((off, len)) = fwd.want()? {
        if off < prev_end || off < r.pos {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "the image needs bytes at offset {off} after those at {}: its layout cannot be read front to back",
                    prev_end.max(r.pos)
                ),
            ));
        }
        prev_end = off.saturating_add(len);
        while r.pos < off {
            let n = (off - r.pos).min(PIECE as u64) as usize;
            if r.read(&mut buf[..n])? < n {
                break 'ranges;
            }
            ticker()?;
        }
        let mut got = 0u64;
        while got < len {
            let n = (len - got).min(PIECE as u64) as usize;
            let k = r.read(&mut buf[..n])?;
            if k > 0 {
                fwd.take(off + got, &buf[..k], out)?;
            }
            ticker()?;
            if k < n {
                break 'ranges;
            }
            got += k as u64;
        }
    }
    while r.read(&mut buf)? > 0 {
        ticker()?;
    }
    let tail = std::mem::take(&mut r.tail);
    fwd.finish(r.pos, &tail, out)
}
