//! VHDX log replay, in memory and read-only: the log's valid entries (CRC-32C checked, one
//! sequence of consecutive numbers ending at the highest one) are applied, in order, to an
//! overlay of 4 KiB pages and zeroed ranges that every later read of the file goes through.
//! The file itself is never written. The log is bounded ([`MAX_LOG`]), and so is the work.

use super::{Guid, MIB, crc32c_update, guid_at, le32, le64, read};
use crate::error::{Error, ErrorKind, Result};
use crate::io::BlockIo;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::Arc;

/// Largest log replayed (qemu writes 1 MiB logs); the overlay never exceeds it.
pub(super) const MAX_LOG: u64 = 16 * MIB;
const SECTOR: usize = 4096;
/// Descriptors in an entry's first sector (after the 64-byte header), and in later ones.
const FIRST_DESCS: usize = 126;
const DESCS_PER_SECTOR: usize = 128;

/// A write recorded by a log entry.
enum Write {
    /// A 4 KiB page at a file offset: the entry's data sector `sector` plus the descriptor's
    /// leading 8 and trailing 4 bytes.
    Page {
        offset: u64,
        sector: usize,
        leading: u64,
        trailing: u32,
    },
    /// `len` zero bytes at a file offset.
    Zero { offset: u64, len: u64 },
}

struct Entry {
    slot: usize,
    sectors: usize,
    seq: u64,
    tail_slot: usize,
    flushed: u64,
    last: u64,
    writes: Vec<Write>,
}

/// The replayed log: pages and zero ranges over the file, and the size it grows to.
#[derive(Debug)]
pub(super) struct Replayed {
    inner: Arc<dyn BlockIo>,
    pages: BTreeMap<u64, Box<[u8]>>,
    /// Non-overlapping zeroed ranges, start → end.
    zeros: BTreeMap<u64, u64>,
    size: u64,
}

struct Log<'a> {
    buf: &'a [u8],
    n: usize,
    guid: Guid,
    /// CRC-32C bytes left to compute (bounds hostile overlapping entries).
    budget: u64,
}

impl<'a> Log<'a> {
    fn sector(&self, i: usize) -> &'a [u8] {
        let s = i % self.n;
        &self.buf[s * SECTOR..(s + 1) * SECTOR]
    }

    /// The entry starting at `slot`, if it is valid.
    fn entry(&mut self, slot: usize) -> Result<Option<Entry>> {
        let h = self.sector(slot);
        if &h[0..4] != b"loge" {
            return Ok(None);
        }
        let len = le32(h, 8) as usize;
        let tail = le32(h, 12) as usize;
        let seq = le64(h, 16);
        let count = le32(h, 24) as usize;
        let log_len = self.n * SECTOR;
        if len == 0
            || len % SECTOR != 0
            || len > log_len
            || tail % SECTOR != 0
            || tail >= log_len
            || seq == 0
            || guid_at(h, 32) != self.guid
        {
            return Ok(None);
        }
        let sectors = len / SECTOR;
        let desc_sectors = if count <= FIRST_DESCS {
            1
        } else {
            1 + (count - FIRST_DESCS).div_ceil(DESCS_PER_SECTOR)
        };
        if desc_sectors > sectors {
            return Ok(None);
        }
        let (flushed, last) = (le64(h, 48), le64(h, 56));
        // The checksum covers the whole entry, its own field taken as zero.
        if self.budget < len as u64 {
            return Err(Error::new(
                ErrorKind::TooLarge,
                "vhdx log: too many overlapping entries to check",
            ));
        }
        self.budget -= len as u64;
        let stored = le32(h, 4);
        let mut first = h.to_vec();
        first[4..8].fill(0);
        let mut c = crc32c_update(!0, &first);
        for i in 1..sectors {
            c = crc32c_update(c, self.sector(slot + i));
        }
        if !c != stored {
            return Ok(None);
        }
        let mut writes = Vec::with_capacity(count.min(sectors * DESCS_PER_SECTOR));
        let mut data = 0usize;
        for i in 0..count {
            let (sec, at) = if i < FIRST_DESCS {
                (0, 64 + 32 * i)
            } else {
                let k = i - FIRST_DESCS;
                (1 + k / DESCS_PER_SECTOR, 32 * (k % DESCS_PER_SECTOR))
            };
            let d = &self.sector(slot + sec)[at..at + 32];
            if le64(d, 24) != seq {
                return Ok(None);
            }
            let offset = le64(d, 16);
            if offset % SECTOR as u64 != 0 {
                return Ok(None);
            }
            match &d[0..4] {
                b"zero" => {
                    let len = le64(d, 8);
                    if len == 0 || len % SECTOR as u64 != 0 {
                        return Ok(None);
                    }
                    writes.push(Write::Zero { offset, len });
                }
                b"desc" => {
                    let sector = desc_sectors + data;
                    data += 1;
                    if sector >= sectors {
                        return Ok(None);
                    }
                    let s = self.sector(slot + sector);
                    let sseq = (u64::from(le32(s, 4)) << 32) | u64::from(le32(s, 4092));
                    if &s[0..4] != b"data" || sseq != seq {
                        return Ok(None);
                    }
                    writes.push(Write::Page {
                        offset,
                        sector: slot + sector,
                        leading: le64(d, 8),
                        trailing: le32(d, 4),
                    });
                }
                _ => return Ok(None),
            }
        }
        Ok(Some(Entry {
            slot,
            sectors,
            seq,
            tail_slot: tail / SECTOR,
            flushed,
            last,
            writes,
        }))
    }
}

/// Replay the log of `log_len` bytes at `log_offset` (already checked to lie in the file,
/// past the header section) whose entries carry `guid`. `None`: the log has no valid entry,
/// so there is nothing to replay.
pub(super) fn replay(
    io: &Arc<dyn BlockIo>,
    file_size: u64,
    log_offset: u64,
    log_len: u64,
    guid: Guid,
) -> Result<Option<Replayed>> {
    if log_len > MAX_LOG {
        return Err(Error::new(
            ErrorKind::UnsupportedFeature,
            format!(
                "vhdx log needs replay, but it is {log_len} bytes (replayed in memory up to {MAX_LOG})"
            ),
        ));
    }
    let mut buf = vec![0u8; log_len as usize];
    read(io.as_ref(), &mut buf, log_offset, "log")?;
    let mut log = Log {
        buf: &buf,
        n: buf.len() / SECTOR,
        guid,
        budget: 8 * log_len,
    };
    let mut valid: HashMap<usize, Entry> = HashMap::new();
    let mut slot = 0;
    while slot < log.n {
        match log.entry(slot)? {
            Some(e) => {
                let next = slot + e.sectors;
                valid.insert(slot, e);
                slot = next;
            }
            None => slot += 1,
        }
    }
    let Some(head) = valid.values().max_by_key(|e| e.seq).map(|e| e.slot) else {
        return Ok(None);
    };
    // Walk back from the head through consecutive sequence numbers, stopping at its tail.
    let tail = valid[&head].tail_slot;
    let mut chain = vec![head];
    while let Some(&cur) = chain.last() {
        if cur == tail || chain.len() > valid.len() {
            break;
        }
        let seq = valid[&cur].seq;
        let prev = valid
            .values()
            .find(|e| e.seq.checked_add(1) == Some(seq) && (e.slot + e.sectors) % log.n == cur);
        match prev {
            Some(p) => chain.push(p.slot),
            None => break,
        }
    }
    chain.reverse();
    let mut r = Replayed {
        inner: io.clone(),
        pages: BTreeMap::new(),
        zeros: BTreeMap::new(),
        size: file_size,
    };
    let log_end = log_offset + log_len;
    for slot in chain {
        let e = &valid[&slot];
        if e.flushed > file_size {
            return Err(Error::corrupt(format!(
                "vhdx log entry {}: the file was flushed to {} bytes but is {file_size} (truncated image)",
                e.seq, e.flushed
            )));
        }
        let grown = e
            .last
            .checked_next_multiple_of(MIB)
            .ok_or_else(|| Error::corrupt("vhdx log entry: last file offset overflows"))?;
        r.size = r.size.max(grown);
        for w in &e.writes {
            let (offset, len) = match w {
                Write::Page { offset, .. } => (*offset, SECTOR as u64),
                Write::Zero { offset, len } => (*offset, *len),
            };
            let end = offset.checked_add(len).ok_or_else(|| {
                Error::corrupt(format!("vhdx log entry {}: a write overflows", e.seq))
            })?;
            if offset < MIB || (offset < log_end && log_offset < end) {
                return Err(Error::corrupt(format!(
                    "vhdx log entry {}: a write at {offset} lands in the header section or the log",
                    e.seq
                )));
            }
            match w {
                Write::Page {
                    sector,
                    leading,
                    trailing,
                    ..
                } => {
                    let s = log.sector(*sector);
                    let mut page = vec![0u8; SECTOR].into_boxed_slice();
                    page[0..8].copy_from_slice(&leading.to_le_bytes());
                    page[8..4092].copy_from_slice(&s[8..4092]);
                    page[4092..].copy_from_slice(&trailing.to_le_bytes());
                    r.unzero(offset, end);
                    r.pages.insert(offset, page);
                }
                Write::Zero { .. } => {
                    let gone: Vec<u64> = r.pages.range(offset..end).map(|(&k, _)| k).collect();
                    for k in gone {
                        r.pages.remove(&k);
                    }
                    r.unzero(offset, end);
                    r.zeros.insert(offset, end);
                }
            }
        }
    }
    // Writes past the grown size would be lost by a real replay's truncation: refuse them.
    let past = r.pages.keys().next_back().map(|&k| k + SECTOR as u64);
    let zpast = r.zeros.values().next_back().copied();
    if past.max(zpast).is_some_and(|e| e > r.size) {
        return Err(Error::corrupt(
            "vhdx log writes past the file size its entries record",
        ));
    }
    Ok(Some(r))
}

impl Replayed {
    /// Remove `start..end` from the zeroed ranges.
    fn unzero(&mut self, start: u64, end: u64) {
        let hit: Vec<(u64, u64)> = self
            .zeros
            .range(..end)
            .rev()
            .take_while(|&(_, &e)| e > start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in hit {
            self.zeros.remove(&s);
            if s < start {
                self.zeros.insert(s, start);
            }
            if e > end {
                self.zeros.insert(end, e);
            }
        }
    }

    /// Pages held in memory.
    pub(super) fn pages(&self) -> usize {
        self.pages.len()
    }
}

impl BlockIo for Replayed {
    fn size(&self) -> io::Result<u64> {
        Ok(self.size)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.size - offset) as usize;
        let buf = &mut buf[..n];
        self.inner.read_at_zero_padded(buf, offset)?;
        let end = offset + n as u64;
        for (&s, &e) in self.zeros.range(..end).rev() {
            if e <= offset {
                break;
            }
            let (a, b) = (s.max(offset), e.min(end));
            buf[(a - offset) as usize..(b - offset) as usize].fill(0);
        }
        let first = offset - offset % SECTOR as u64;
        for (&p, page) in self.pages.range(first..end) {
            let (a, b) = (p.max(offset), (p + SECTOR as u64).min(end));
            buf[(a - offset) as usize..(b - offset) as usize]
                .copy_from_slice(&page[(a - p) as usize..(b - p) as usize]);
        }
        Ok(n)
    }

    fn write_all_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "a vhdx log replayed in memory is read-only",
        ))
    }
}
