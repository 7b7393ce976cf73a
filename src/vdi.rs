//! VDI images (VirtualBox, header version 1.1): the header, checked as qemu does plus the
//! layout checks qemu omits (header size, image type, block map and data areas in order and
//! inside the file), the block map read once at open (entries 0xffffffff "free" and
//! 0xfffffffe "zero" read as zeros, every other entry's block inside the file), reads and
//! block status from it, and `check` (entries past the allocated count, blocks shared by
//! two entries, the allocated count). Static and dynamic images; differencing and undo
//! images (parent or link UUID) are refused.

use crate::detect::Format;
use crate::error::{Error, ErrorKind, Result};
use crate::forward::{Forward, HeadIo, UNKNOWN_LEN};
use crate::image::{Driver, DriverContext, Extent};
use crate::io::BlockIo;
use crate::qcow2::stream::Target;
use std::sync::Arc;

const SIGNATURE: u32 = 0xbeda_107f;
const VERSION_1_1: u32 = 0x0001_0001;
/// The pre-header (text and signature, version) before the counted header.
const PRE_HEADER: u64 = 0x48;
/// Smallest header v1.1 size (qemu writes it; VirtualBox writes 0x190).
const MIN_HEADER_SIZE: u32 = 0x180;
/// Largest header size accepted.
const MAX_HEADER_SIZE: u32 = 0x1000;
/// The only block size qemu reads.
const BLOCK_SIZE: u64 = 1 << 20;
/// qemu's limit on blocks in an image (and so on the disk size).
const MAX_BLOCKS_QEMU: u64 = 0x1fff_ff80;
/// Largest block map read: 64 Mi entries (256 MiB of map, a 64 TiB disk).
const MAX_BLOCKS: u64 = 1 << 26;
/// Entries from here on are not allocated: 0xfffffffe "zero", 0xffffffff "free".
const FIRST_UNALLOCATED: u32 = 0xffff_fffe;
const SECTOR: u64 = 512;
/// Problems listed by `check` at most (the rest are counted).
const MAX_PROBLEMS: usize = 1000;

fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// An open VDI image with its block map.
#[derive(Debug)]
struct Vdi {
    io: Arc<dyn BlockIo>,
    size: u64,
    data_offset: u64,
    blocks_allocated: u32,
    /// Every entry of the block map (`blocks_in_image` of them).
    map: Vec<u32>,
}

/// Open a VDI image held by `io`.
pub fn open(io: Arc<dyn BlockIo>, _ctx: &DriverContext<'_>) -> Result<Box<dyn Driver>> {
    let file_len = io
        .size()
        .map_err(|e| Error::io("cannot get the VDI file size", e))?;
    let v = parse(io.as_ref(), io.clone(), file_len)?;
    v.check_ends(file_len)?;
    Ok(Box::new(v))
}

/// Parse and validate the header and block map, reading through `src` (the file, or a
/// stream's head with `file_len` [`UNKNOWN_LEN`]); `io` is kept for later reads. Blocks are
/// checked against the file's end by [`Vdi::check_ends`].
fn parse(src: &dyn BlockIo, io: Arc<dyn BlockIo>, file_len: u64) -> Result<Vdi> {
    if file_len < 512 {
        return Err(Error::corrupt(format!(
            "VDI file of {file_len} bytes is too short for a header"
        )));
    }
    let mut h = [0u8; 512];
    src.read_exact_at(&mut h, 0)
        .map_err(|e| Error::io("cannot read the VDI header", e))?;
    let sig = le32(&h, 0x40);
    if sig != SIGNATURE {
        return Err(Error::corrupt(format!(
            "VDI header: signature {sig:#010x} is not {SIGNATURE:#010x}"
        )));
    }
    let version = le32(&h, 0x44);
    if version != VERSION_1_1 {
        return Err(Error::new(
            ErrorKind::UnsupportedFeature,
            format!(
                "VDI header: version {}.{} is not supported (only 1.1)",
                version >> 16,
                version & 0xffff
            ),
        ));
    }
    let header_size = le32(&h, 0x48);
    if !(MIN_HEADER_SIZE..=MAX_HEADER_SIZE).contains(&header_size) {
        return Err(Error::corrupt(format!(
            "VDI header: header size {header_size:#x} is outside {MIN_HEADER_SIZE:#x}..={MAX_HEADER_SIZE:#x}"
        )));
    }
    let image_type = le32(&h, 0x4c);
    if image_type != 1 && image_type != 2 {
        return Err(Error::new(
            ErrorKind::UnsupportedFeature,
            format!(
                "VDI header: image type {image_type} is not supported (only 1 dynamic and 2 static)"
            ),
        ));
    }
    let map_offset = u64::from(le32(&h, 0x154));
    let data_offset = u64::from(le32(&h, 0x158));
    if map_offset % SECTOR != 0 || data_offset % SECTOR != 0 {
        return Err(Error::corrupt(format!(
            "VDI header: block map offset {map_offset} or data offset {data_offset} is not a multiple of 512"
        )));
    }
    let sector_size = le32(&h, 0x168);
    if u64::from(sector_size) != SECTOR {
        return Err(Error::new(
            ErrorKind::UnsupportedFeature,
            format!("VDI header: sector size {sector_size} is not 512"),
        ));
    }
    let disk_size = le64(&h, 0x170);
    if disk_size > MAX_BLOCKS_QEMU * BLOCK_SIZE {
        return Err(Error::new(
            ErrorKind::TooLarge,
            format!(
                "VDI header: disk size {disk_size} exceeds the maximum of {}",
                MAX_BLOCKS_QEMU * BLOCK_SIZE
            ),
        ));
    }
    // VBoxManage convertfromraw writes odd sizes; qemu rounds them up to a sector.
    let size = disk_size.next_multiple_of(SECTOR);
    let block_size = u64::from(le32(&h, 0x178));
    if block_size != BLOCK_SIZE {
        let kind = if block_size == 0 || !block_size.is_power_of_two() {
            ErrorKind::Corrupt
        } else {
            ErrorKind::UnsupportedFeature
        };
        return Err(Error::new(
            kind,
            format!("VDI header: block size {block_size} is not 1 MiB"),
        ));
    }
    let extra = le32(&h, 0x17c);
    if extra != 0 {
        return Err(Error::new(
            ErrorKind::UnsupportedFeature,
            format!("VDI header: block extra data of {extra} bytes is not supported"),
        ));
    }
    let blocks = u64::from(le32(&h, 0x180));
    let blocks_allocated = le32(&h, 0x184);
    if blocks > MAX_BLOCKS_QEMU || blocks > MAX_BLOCKS {
        return Err(Error::new(
            ErrorKind::TooLarge,
            format!(
                "VDI header: {blocks} blocks in image exceed the supported maximum of {MAX_BLOCKS}"
            ),
        ));
    }
    if blocks * BLOCK_SIZE < size {
        return Err(Error::corrupt(format!(
            "VDI header: block map of {blocks} blocks is too small for a disk of {size} bytes"
        )));
    }
    if h[0x1a8..0x1b8].iter().any(|&b| b != 0) || h[0x1b8..0x1c8].iter().any(|&b| b != 0) {
        return Err(Error::new(
            ErrorKind::UnsupportedFeature,
            "VDI header: differencing images (non-zero link or parent UUID) are not supported",
        ));
    }
    let header_end = PRE_HEADER + u64::from(header_size);
    let map_end = map_offset + blocks * 4;
    if map_offset < header_end || map_end > file_len {
        return Err(Error::corrupt(format!(
            "VDI header: block map at offset {map_offset} ({blocks} entries) overlaps the header or lies past the end of the file ({file_len} bytes)"
        )));
    }
    if data_offset < map_end {
        return Err(Error::corrupt(format!(
            "VDI header: data offset {data_offset} lies inside the block map (which ends at {map_end})"
        )));
    }
    let mut raw = vec![0u8; (blocks * 4) as usize];
    src.read_exact_at(&mut raw, map_offset)
        .map_err(|e| Error::io("cannot read the VDI block map", e))?;
    let map: Vec<u32> = raw
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    drop(raw);
    Ok(Vdi {
        io,
        size,
        data_offset,
        blocks_allocated,
        map,
    })
}

impl Vdi {
    /// Every entry's block lies in the image and its guest bytes in the file's `file_len`.
    fn check_ends(&self, file_len: u64) -> Result<()> {
        let blocks = self.map.len() as u64;
        let used = self.size.div_ceil(BLOCK_SIZE) as usize;
        for (i, &e) in self.map.iter().enumerate().take(used) {
            if e >= FIRST_UNALLOCATED {
                continue;
            }
            if u64::from(e) >= blocks {
                return Err(Error::corrupt(format!(
                    "VDI block map entry {i}: block {e} is not below the {blocks} blocks in the image"
                )));
            }
            // The guest bytes of this block must be in the file.
            let need = BLOCK_SIZE.min(self.size - i as u64 * BLOCK_SIZE);
            let end = self.data_offset + u64::from(e) * BLOCK_SIZE + need;
            if end > file_len {
                return Err(Error::corrupt(format!(
                    "VDI block map entry {i}: block {e} ends at offset {end}, past the end of the file ({file_len} bytes)"
                )));
            }
        }
        Ok(())
    }

    /// Host offset of guest `off` when its block is allocated.
    fn host(&self, off: u64) -> Option<u64> {
        let e = self.map[(off / BLOCK_SIZE) as usize];
        (e < FIRST_UNALLOCATED)
            .then(|| self.data_offset + u64::from(e) * BLOCK_SIZE + off % BLOCK_SIZE)
    }
}

impl Driver for Vdi {
    fn format(&self) -> Format {
        Format::Vdi
    }

    fn file(&self) -> &Arc<dyn BlockIo> {
        &self.io
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(BLOCK_SIZE)
    }

    fn extent(&self, off: u64, max: u64) -> Result<Extent> {
        let max = max.min(self.size.saturating_sub(off));
        if max == 0 {
            return Err(Error::invalid(format!(
                "offset {off} is past the end of the image"
            )));
        }
        let first = max.min(BLOCK_SIZE - off % BLOCK_SIZE);
        let Some(host) = self.host(off) else {
            // Extend over the following unallocated blocks.
            let mut len = first;
            while len < max && self.host(off + len).is_none() {
                len = (len + BLOCK_SIZE).min(max);
            }
            return Ok(Extent {
                len,
                present: true,
                zero: true,
                ..Extent::default()
            });
        };
        // As qemu does, the file's holes make allocated ranges read as zeros.
        let next = self
            .io
            .next_data(host)
            .map_err(|e| Error::io("cannot find data extents in the VDI file", e))?;
        let (len, zero) = match next {
            Some(r) if r.start > host => (first.min(r.start - host), true),
            Some(r) => (first.min(r.end.saturating_sub(host)).max(1), false),
            None => (first, true),
        };
        Ok(Extent {
            len,
            present: true,
            zero,
            data: true,
            offset: Some(host),
            ..Extent::default()
        })
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let chunk = ((buf.len() - done) as u64).min(BLOCK_SIZE - pos % BLOCK_SIZE) as usize;
            let part = &mut buf[done..done + chunk];
            match self.host(pos) {
                None => part.fill(0),
                Some(host) => self
                    .io
                    .read_at_zero_padded(part, host)
                    .map_err(|e| Error::io(format!("cannot read VDI data at offset {host}"), e))?,
            }
            done += chunk;
        }
        Ok(())
    }

    fn check(&self) -> Option<Vec<String>> {
        let mut problems = Vec::new();
        let mut more = 0u64;
        let mut note = |p: String| {
            if problems.len() < MAX_PROBLEMS {
                problems.push(p);
            } else {
                more += 1;
            }
        };
        // One bit per allocated block: which are already used by an entry.
        let mut seen = vec![
            0u64;
            (self.blocks_allocated as usize)
                .div_ceil(64)
                .min(self.map.len().div_ceil(64))
        ];
        let mut counted = 0u64;
        for (i, &e) in self.map.iter().enumerate() {
            if e >= FIRST_UNALLOCATED {
                continue;
            }
            if e >= self.blocks_allocated {
                note(format!(
                    "block map entry {i} names block {e}, not below the {} blocks allocated",
                    self.blocks_allocated
                ));
                continue;
            }
            counted += 1;
            if e as usize >= self.map.len() {
                // Only possible in entries past the disk size, which open does not check.
                note(format!(
                    "block map entry {i} names block {e}, not below the {} blocks in the image",
                    self.map.len()
                ));
                continue;
            }
            let (w, bit) = ((e / 64) as usize, 1u64 << (e % 64));
            if seen[w] & bit != 0 {
                note(format!(
                    "block {e} named by block map entry {i} is already used by an earlier entry"
                ));
            }
            seen[w] |= bit;
        }
        if counted != u64::from(self.blocks_allocated) {
            note(format!(
                "allocated blocks mismatch: the block map uses {counted}, the header says {}",
                self.blocks_allocated
            ));
        }
        if more > 0 {
            problems.push(format!("... and {more} more problems"));
        }
        Some(problems)
    }
}

/// The streaming strategy: blocks read front to back in file order (a block two entries
/// share is read once), over the same parse and checks as [`open`].
pub(crate) fn forward(head: &HeadIo<'_, '_>) -> Result<Option<Box<dyn Forward>>> {
    let placeholder: Arc<dyn BlockIo> = Arc::new(crate::io::MemIo::default());
    let v = parse(head, placeholder, UNKNOWN_LEN)?;
    // The entries of the disk's blocks that are allocated, by block in the file.
    let used = v.size.div_ceil(BLOCK_SIZE) as usize;
    let mut order: Vec<(u32, u32)> = v
        .map
        .iter()
        .take(used)
        .enumerate()
        .filter(|&(_, &e)| e < FIRST_UNALLOCATED)
        .map(|(i, &e)| (e, i as u32))
        .collect();
    order.sort_unstable();
    // Blocks are checked against the map at open (below the blocks in the image).
    v.check_ends(UNKNOWN_LEN)?;
    Ok(Some(Box::new(VdiForward {
        v,
        order,
        next: 0,
        cur: 0..0,
    })))
}

/// [`forward`]'s reader.
struct VdiForward {
    v: Vdi,
    /// (block in the file, entry) of every allocated entry, by block.
    order: Vec<(u32, u32)>,
    next: usize,
    /// The entries sharing the block being read (a range of `order`).
    cur: std::ops::Range<usize>,
}

impl Forward for VdiForward {
    fn virtual_size(&self) -> u64 {
        self.v.size
    }

    fn held(&self) -> u64 {
        (self.v.map.capacity() * 4 + self.order.capacity() * 8) as u64
    }

    fn want(&mut self) -> Result<Option<(u64, u64)>> {
        let Some(&(blk, _)) = self.order.get(self.next) else {
            return Ok(None);
        };
        self.cur = crate::forward::same_key(&self.order, self.next);
        self.next = self.cur.end;
        Ok(Some((
            self.v.data_offset + u64::from(blk) * BLOCK_SIZE,
            BLOCK_SIZE,
        )))
    }

    fn take(&mut self, at: u64, bytes: &[u8], out: &dyn Target) -> Result<()> {
        let rel = (at - self.v.data_offset) % BLOCK_SIZE;
        for &(_, entry) in &self.order[self.cur.clone()] {
            let guest = u64::from(entry) * BLOCK_SIZE + rel;
            let n = (bytes.len() as u64).min(self.v.size.saturating_sub(guest));
            if n > 0 {
                out.write(guest, &bytes[..n as usize])?;
            }
        }
        Ok(())
    }

    fn finish(&mut self, len: u64, _tail: &[u8], out: &dyn Target) -> Result<()> {
        self.v.check_ends(len)?;
        let allocated = self.order.iter().map(|&(_, e)| u64::from(e));
        crate::forward::zero_absent(allocated, BLOCK_SIZE, self.v.size, out)
    }
}
