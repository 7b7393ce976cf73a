//! VHD images (qemu's "vpc"): the footer (checksum, disk type, CHS vs current-size virtual
//! size with qemu's creator-app rules), fixed disks (raw data followed by the footer) and
//! dynamic disks (footer copy at 0, dynamic header, BAT, per-block sector bitmaps). The BAT
//! is read and validated once at open (every block inside the file, clear of the metadata
//! and of each other). Differencing disks are refused: their parent is never opened.

use crate::detect::Format;
use crate::error::{Error, ErrorKind, Result};
use crate::forward::{Forward, HeadIo, UNKNOWN_LEN};
use crate::image::{Driver, DriverContext, Extent, Policy};
use crate::io::BlockIo;
use crate::qcow2::stream::Target;
use std::sync::Arc;

const SECTOR: u64 = 512;
const FOOTER_LEN: u64 = 512;
const HEADER_LEN: u64 = 1024;
/// qemu's largest virtual size, in sectors (2040 GiB).
const MAX_SECTORS: u64 = 0xff00_0000;
/// The geometry meaning "use current_size" (65535 × 16 × 255).
const MAX_GEOMETRY: u64 = 65535 * 16 * 255;
/// Largest block size accepted (qemu takes any power of two; real images use 512 KiB–2 MiB).
const MAX_BLOCK_SIZE: u64 = 256 << 20;
/// Largest BAT read (entries): 64 MiB of table.
const MAX_BAT_ENTRIES: u64 = 1 << 24;
/// An unallocated BAT entry.
const UNALLOCATED: u32 = 0xffff_ffff;

const TYPE_FIXED: u32 = 2;
const TYPE_DYNAMIC: u32 = 3;
const TYPE_DIFFERENCING: u32 = 4;

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().unwrap())
}

fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}

/// Ones' complement of the byte sum, the checksum field (at `field`) taken as zero.
fn checksum(b: &[u8], field: usize) -> u32 {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field..field + 4).contains(i))
        .fold(0u32, |s, (_, &v)| s.wrapping_add(u32::from(v)));
    !sum
}

/// The fields of the 512-byte footer that reading needs.
#[derive(Debug, Clone)]
struct Footer {
    data_offset: u64,
    disk_type: u32,
    /// Virtual size in bytes, by qemu's rules.
    size: u64,
}

fn parse_footer(b: &[u8], where_: &str) -> Result<Footer> {
    if &b[0..8] != b"conectix" {
        return Err(Error::corrupt(format!(
            "VHD footer {where_}: no \"conectix\" cookie"
        )));
    }
    let stored = be32(b, 64);
    let computed = checksum(b, 64);
    if stored != computed {
        return Err(Error::corrupt(format!(
            "VHD footer {where_}: incorrect checksum (stored {stored:#010x}, computed {computed:#010x})"
        )));
    }
    let creator = &b[28..32];
    let current_size = be64(b, 48);
    let cyls = u64::from(u16::from_be_bytes([b[56], b[57]]));
    let heads = u64::from(b[58]);
    let secs = u64::from(b[59]);
    let chs = cyls * heads * secs;
    // qemu 10: the geometry gives the size for images made by Virtual PC or (old) qemu,
    // current_size for everyone else, and always when the geometry is the maximum.
    let use_chs = creator == b"vpc " || creator == b"qemu";
    let sectors = if !use_chs || chs == MAX_GEOMETRY {
        current_size / SECTOR
    } else {
        chs
    };
    if sectors > MAX_SECTORS {
        return Err(Error::new(
            ErrorKind::TooLarge,
            format!(
                "VHD footer {where_}: disk size of {sectors} sectors exceeds the VHD maximum of {MAX_SECTORS} (2040 GiB)"
            ),
        ));
    }
    Ok(Footer {
        data_offset: be64(b, 16),
        disk_type: be32(b, 60),
        size: sectors * SECTOR,
    })
}

/// For a stream read front to back (no tail to probe first): when the last 512 bytes `tail`,
/// after `data_len` bytes, are a valid fixed-disk footer, the disk's virtual size by the
/// same rules as [`open`]. A file whose tail is such a footer is a fixed VHD to qemu, so the
/// streaming import must not write the footer as guest data.
pub fn fixed_footer_size(tail: &[u8], data_len: u64) -> Option<u64> {
    if tail.len() != FOOTER_LEN as usize || &tail[0..8] != b"conectix" {
        return None;
    }
    let f = parse_footer(tail, "at the end of the stream").ok()?;
    (f.disk_type == TYPE_FIXED && f.size <= data_len).then_some(f.size)
}

fn read(io: &dyn BlockIo, buf: &mut [u8], off: u64, what: &str) -> Result<()> {
    io.read_exact_at(buf, off)
        .map_err(|e| Error::io(format!("cannot read the {what} at offset {off}"), e))
}

/// Open a VHD image held by `io`: dynamic when a footer copy starts the file, else fixed
/// (footer at the end only).
pub fn open(io: Arc<dyn BlockIo>, ctx: &DriverContext<'_>) -> Result<Box<dyn Driver>> {
    let file_len = io
        .size()
        .map_err(|e| Error::io("cannot get the VHD file size", e))?;
    if file_len < FOOTER_LEN {
        return Err(Error::corrupt(format!(
            "VHD file of {file_len} bytes is too short for a footer"
        )));
    }
    let mut head = [0u8; 512];
    read(io.as_ref(), &mut head, 0, "VHD footer copy")?;
    if &head[0..8] == b"conectix" {
        let f = parse_footer(&head, "copy at offset 0")?;
        match f.disk_type {
            TYPE_DYNAMIC => {
                let d = Dynamic::parse(io.as_ref(), io.clone(), file_len, f)?;
                d.check_ends(data_limit(io.as_ref(), file_len))?;
                return Ok(Box::new(d));
            }
            TYPE_DIFFERENCING => return Err(refuse_differencing(io.as_ref(), file_len, &f, ctx)),
            // A fixed disk whose guest data starts with a footer: the real footer is at EOF.
            TYPE_FIXED => {}
            t => return Err(bad_type(t)),
        }
    }
    let mut tail = [0u8; 512];
    read(io.as_ref(), &mut tail, file_len - FOOTER_LEN, "VHD footer")?;
    let f = parse_footer(&tail, "at the end of the file")?;
    match f.disk_type {
        TYPE_FIXED => {}
        TYPE_DYNAMIC | TYPE_DIFFERENCING => {
            return Err(Error::corrupt(
                "VHD footer at the end of the file describes a dynamic disk but the file does not start with its copy",
            ));
        }
        t => return Err(bad_type(t)),
    }
    let data_len = file_len - FOOTER_LEN;
    if f.size > data_len {
        return Err(Error::corrupt(format!(
            "fixed VHD: the footer gives a disk size of {} bytes but the file holds only {data_len} bytes of data (truncated?)",
            f.size
        )));
    }
    Ok(Box::new(Fixed { io, size: f.size }))
}

fn bad_type(t: u32) -> Error {
    Error::new(
        ErrorKind::UnsupportedFeature,
        format!("VHD footer: disk type {t} is not supported (only 2 fixed and 3 dynamic)"),
    )
}

/// The error for a differencing disk: its parent is never opened (Denied under the untrusted
/// policy, unsupported otherwise), and it is never read as a plain dynamic disk.
fn refuse_differencing(
    io: &dyn BlockIo,
    file_len: u64,
    f: &Footer,
    ctx: &DriverContext<'_>,
) -> Error {
    let parent = parent_name(io, file_len, f).unwrap_or_else(|| "(unreadable)".to_string());
    match ctx.policy {
        Policy::Untrusted => Error::new(
            ErrorKind::Denied,
            format!(
                "differencing VHD names parent image {parent:?}; parent images are not opened under the untrusted policy"
            ),
        ),
        Policy::Trusted => Error::new(
            ErrorKind::UnsupportedFeature,
            format!(
                "differencing VHD (parent image {parent:?}) is not supported: its data depends on the parent"
            ),
        ),
    }
}

/// The parent's name from the dynamic header (UTF-16 BE, up to the first NUL), if readable.
fn parent_name(io: &dyn BlockIo, file_len: u64, f: &Footer) -> Option<String> {
    let end = f.data_offset.checked_add(HEADER_LEN)?;
    if end > file_len {
        return None;
    }
    let mut h = vec![0u8; HEADER_LEN as usize];
    io.read_exact_at(&mut h, f.data_offset).ok()?;
    if &h[0..8] != b"cxsparse" {
        return None;
    }
    let units: Vec<u16> = h[64..576]
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    Some(String::from_utf16_lossy(&units))
}

/// A fixed VHD: the guest disk is the file's first `size` bytes.
#[derive(Debug)]
struct Fixed {
    io: Arc<dyn BlockIo>,
    size: u64,
}

impl Driver for Fixed {
    fn format(&self) -> Format {
        Format::VhdFixed
    }

    fn file(&self) -> &Arc<dyn BlockIo> {
        &self.io
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn extent(&self, off: u64, max: u64) -> Result<Extent> {
        let max = max.min(self.size.saturating_sub(off));
        if max == 0 {
            return Err(Error::invalid(format!(
                "offset {off} is past the end of the image"
            )));
        }
        // Like qemu, the block status is the file's: holes read as zeros.
        let next = self
            .io
            .next_data(off)
            .map_err(|e| Error::io("cannot find data extents", e))?;
        let (len, zero) = match next {
            Some(r) if r.start > off => (max.min(r.start - off), true),
            Some(r) => (max.min(r.end.saturating_sub(off)).max(1), false),
            None => (max, true),
        };
        Ok(Extent {
            len,
            present: true,
            zero,
            data: true,
            offset: Some(off),
            ..Extent::default()
        })
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.io
            .read_at_zero_padded(buf, off)
            .map_err(|e| Error::io("cannot read fixed VHD data", e))
    }
}

/// A dynamic VHD with its validated BAT.
#[derive(Debug)]
struct Dynamic {
    io: Arc<dyn BlockIo>,
    size: u64,
    block_size: u64,
    /// Bytes of the sector bitmap before each block's data.
    bitmap_len: u64,
    /// One entry per block of the virtual disk: the sector of the block's bitmap.
    bat: Vec<u32>,
    /// Where the BAT the header declares ends (all its entries, used or not).
    bat_end: u64,
    entries: u64,
}

fn bat_outside(bat_off: u64, entries: u64, file_len: u64) -> Error {
    Error::corrupt(format!(
        "VHD dynamic header: BAT at offset {bat_off} ({entries} entries) is outside the file ({file_len} bytes)"
    ))
}

/// Where a dynamic disk's blocks must end: before the trailing footer when the last 512 of
/// the file's `len` bytes are one (`tail` reads them).
fn limit_for(len: u64, tail: &[u8]) -> u64 {
    if len >= 2 * FOOTER_LEN && tail.starts_with(b"conectix") {
        len - FOOTER_LEN
    } else {
        len
    }
}

fn data_limit(io: &dyn BlockIo, file_len: u64) -> u64 {
    let mut tail = [0u8; 8];
    match io.read_exact_at(&mut tail, file_len - FOOTER_LEN) {
        Ok(()) => limit_for(file_len, &tail),
        Err(_) => file_len,
    }
}

impl Dynamic {
    /// Parse and validate the dynamic header and BAT of a disk whose footer is `f`, reading
    /// through `src` (the file, or a stream's head with `file_len` [`UNKNOWN_LEN`]); `io` is
    /// kept for later reads. Blocks are checked against the file's end by
    /// [`Dynamic::check_ends`].
    fn parse(src: &dyn BlockIo, io: Arc<dyn BlockIo>, file_len: u64, f: Footer) -> Result<Dynamic> {
        let hdr_off = f.data_offset;
        if hdr_off < FOOTER_LEN || hdr_off.checked_add(HEADER_LEN).is_none_or(|e| e > file_len) {
            return Err(Error::corrupt(format!(
                "VHD footer: dynamic header offset {hdr_off} is outside the file ({file_len} bytes)"
            )));
        }
        let mut h = vec![0u8; HEADER_LEN as usize];
        read(src, &mut h, hdr_off, "VHD dynamic header")?;
        if &h[0..8] != b"cxsparse" {
            return Err(Error::corrupt(format!(
                "VHD dynamic header at offset {hdr_off}: no \"cxsparse\" cookie"
            )));
        }
        // The header checksum is not verified: qemu ignores it too.
        let bat_off = be64(&h, 16);
        let entries = u64::from(be32(&h, 28));
        let block_size = u64::from(be32(&h, 32));
        if block_size < SECTOR || !block_size.is_power_of_two() {
            return Err(Error::corrupt(format!(
                "VHD dynamic header: block size {block_size} is not a power of two of at least 512"
            )));
        }
        if block_size > MAX_BLOCK_SIZE {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!(
                    "VHD dynamic header: block size {block_size} exceeds the supported maximum of {MAX_BLOCK_SIZE}"
                ),
            ));
        }
        let size = f.size;
        let needed = size.div_ceil(block_size);
        if entries < needed {
            return Err(Error::corrupt(format!(
                "VHD dynamic header: BAT of {entries} entries is too small for {size} bytes in blocks of {block_size}"
            )));
        }
        if entries > MAX_BAT_ENTRIES {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!(
                    "VHD dynamic header: BAT of {entries} entries exceeds the supported maximum of {MAX_BAT_ENTRIES}"
                ),
            ));
        }
        let bat_len = entries * 4;
        let bat_end = bat_off
            .checked_add(bat_len)
            .ok_or_else(|| bat_outside(bat_off, entries, file_len))?;
        if bat_end > file_len {
            return Err(bat_outside(bat_off, entries, file_len));
        }
        let overlaps = |a: u64, b: u64, c: u64, d: u64| a < d && c < b;
        if overlaps(bat_off, bat_end, 0, FOOTER_LEN)
            || overlaps(bat_off, bat_end, hdr_off, hdr_off + HEADER_LEN)
        {
            return Err(Error::corrupt(format!(
                "VHD dynamic header: BAT at offset {bat_off} overlaps the footer copy or the dynamic header"
            )));
        }
        // Only the entries covering the virtual disk are used.
        let mut raw = vec![0u8; (needed * 4) as usize];
        read(src, &mut raw, bat_off, "VHD BAT")?;
        let bat: Vec<u32> = raw
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
            .collect();
        drop(raw);
        let bitmap_len = (block_size / SECTOR).div_ceil(8).next_multiple_of(SECTOR);
        let stride = bitmap_len + block_size;
        let mut blocks: Vec<(u32, u32)> = Vec::new();
        for (i, &e) in bat.iter().enumerate() {
            if e == UNALLOCATED {
                continue;
            }
            let start = u64::from(e) * SECTOR;
            let end = start + stride;
            if overlaps(start, end, 0, FOOTER_LEN)
                || overlaps(start, end, hdr_off, hdr_off + HEADER_LEN)
                || overlaps(start, end, bat_off, bat_end)
            {
                return Err(Error::corrupt(format!(
                    "VHD BAT entry {i}: block at offset {start} overlaps the footer copy, dynamic header or BAT"
                )));
            }
            blocks.push((e, i as u32));
        }
        blocks.sort_unstable();
        for w in blocks.windows(2) {
            let (a, b) = (u64::from(w[0].0) * SECTOR, u64::from(w[1].0) * SECTOR);
            if b < a + stride {
                return Err(Error::corrupt(format!(
                    "VHD BAT entries {} and {}: blocks at offsets {a} and {b} overlap",
                    w[0].1, w[1].1
                )));
            }
        }
        Ok(Dynamic {
            io,
            size,
            block_size,
            bitmap_len,
            bat,
            bat_end,
            entries,
        })
    }

    fn stride(&self) -> u64 {
        self.bitmap_len + self.block_size
    }

    /// Every allocated block ends by `limit` (the file's end, or its trailing footer).
    fn check_ends(&self, limit: u64) -> Result<()> {
        for (i, &e) in self.bat.iter().enumerate() {
            let start = u64::from(e) * SECTOR;
            if e != UNALLOCATED && start + self.stride() > limit {
                return Err(Error::corrupt(format!(
                    "VHD BAT entry {i}: block at offset {start} ends past the end of the data ({limit} bytes; image truncated?)"
                )));
            }
        }
        Ok(())
    }

    /// The bitmap bytes covering sectors `s0..s1` of block `b` (allocated), starting at the
    /// byte holding `s0`.
    fn bitmap(&self, b: usize, s0: u64, s1: u64) -> Result<Vec<u8>> {
        let first = s0 / 8;
        let last = (s1 - 1) / 8;
        let mut bits = vec![0u8; (last - first + 1) as usize];
        let at = u64::from(self.bat[b]) * SECTOR + first;
        read(
            self.io.as_ref(),
            &mut bits,
            at,
            &format!("VHD sector bitmap of block {b}"),
        )?;
        Ok(bits)
    }

    /// Within block `b` (allocated) from byte `in_blk`, at most `len` bytes: whether the
    /// first sector is present in the bitmap and how many bytes share that state.
    fn run(&self, b: usize, in_blk: u64, len: u64) -> Result<(bool, u64)> {
        let s0 = in_blk / SECTOR;
        let bits = self.bitmap(b, s0, (in_blk + len).div_ceil(SECTOR))?;
        Ok(run_in(&bits, s0 / 8, in_blk, len))
    }

    fn host(&self, b: usize, in_blk: u64) -> u64 {
        u64::from(self.bat[b]) * SECTOR + self.bitmap_len + in_blk
    }
}

/// [`Dynamic::run`] over bitmap bytes `bits` whose first byte is bitmap byte `base`.
fn run_in(bits: &[u8], base: u64, in_blk: u64, len: u64) -> (bool, u64) {
    let s0 = in_blk / SECTOR;
    let s1 = (in_blk + len).div_ceil(SECTOR);
    let bit = |s: u64| bits[(s / 8 - base) as usize] & (0x80 >> (s % 8)) != 0;
    let set = bit(s0);
    let mut s = s0 + 1;
    while s < s1 && bit(s) == set {
        s += 1;
    }
    (set, (s * SECTOR).min(in_blk + len) - in_blk)
}

impl Driver for Dynamic {
    fn format(&self) -> Format {
        Format::Vhd
    }

    fn file(&self) -> &Arc<dyn BlockIo> {
        &self.io
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.block_size)
    }

    fn extent(&self, off: u64, max: u64) -> Result<Extent> {
        let max = max.min(self.size.saturating_sub(off));
        if max == 0 {
            return Err(Error::invalid(format!(
                "offset {off} is past the end of the image"
            )));
        }
        let unallocated = |len| Extent {
            len,
            present: true,
            zero: true,
            ..Extent::default()
        };
        let b = (off / self.block_size) as usize;
        let in_blk = off % self.block_size;
        let first = max.min(self.block_size - in_blk);
        if self.bat[b] == UNALLOCATED {
            // Extend over the following unallocated blocks.
            let mut len = first;
            let mut nb = b + 1;
            while len < max && nb < self.bat.len() && self.bat[nb] == UNALLOCATED {
                len = (len + self.block_size).min(max);
                nb += 1;
            }
            return Ok(unallocated(len));
        }
        let (set, len) = self.run(b, in_blk, first)?;
        if !set {
            return Ok(unallocated(len));
        }
        Ok(Extent {
            len,
            present: true,
            data: true,
            offset: Some(self.host(b, in_blk)),
            ..Extent::default()
        })
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let b = (pos / self.block_size) as usize;
            let in_blk = pos % self.block_size;
            let chunk = ((buf.len() - done) as u64).min(self.block_size - in_blk);
            let part = &mut buf[done..done + chunk as usize];
            if self.bat[b] == UNALLOCATED {
                part.fill(0);
            } else {
                let s0 = in_blk / SECTOR;
                let bits = self.bitmap(b, s0, (in_blk + chunk).div_ceil(SECTOR))?;
                let mut p = 0u64;
                while p < chunk {
                    let (set, len) = run_in(&bits, s0 / 8, in_blk + p, chunk - p);
                    let dst = &mut part[p as usize..(p + len) as usize];
                    if set {
                        let at = self.host(b, in_blk + p);
                        read(self.io.as_ref(), dst, at, &format!("VHD block {b} data"))?;
                    } else {
                        dst.fill(0);
                    }
                    p += len;
                }
            }
            done += chunk as usize;
        }
        Ok(())
    }
}

/// The streaming strategy: a dynamic disk read front to back, over the same parse and checks
/// as [`open`]; `Ok(None)` for what is not a dynamic disk (spooled and opened as a file).
pub(crate) fn forward(head: &HeadIo<'_, '_>) -> Result<Option<Box<dyn Forward>>> {
    let mut first = [0u8; 512];
    read(head, &mut first, 0, "VHD footer copy")?;
    if &first[0..8] != b"conectix" {
        return Ok(None);
    }
    let f = parse_footer(&first, "copy at offset 0")?;
    match f.disk_type {
        TYPE_DYNAMIC => {}
        TYPE_DIFFERENCING => {
            let ctx = DriverContext {
                path: None,
                policy: Policy::Untrusted,
                metadata_only: true,
            };
            return Err(refuse_differencing(head, UNKNOWN_LEN, &f, &ctx));
        }
        TYPE_FIXED => return Ok(None),
        t => return Err(bad_type(t)),
    }
    let placeholder: Arc<dyn BlockIo> = Arc::new(crate::io::MemIo::default());
    let d = Dynamic::parse(head, placeholder, UNKNOWN_LEN, f)?;
    let mut order: Vec<(u32, u32)> = d
        .bat
        .iter()
        .enumerate()
        .filter(|&(_, &e)| e != UNALLOCATED)
        .map(|(i, &e)| (e, i as u32))
        .collect();
    order.sort_unstable();
    Ok(Some(Box::new(DynamicForward {
        bitmap: vec![0u8; d.bitmap_len as usize],
        d,
        order,
        next: 0,
    })))
}

/// [`forward`]'s reader: allocated blocks in file order, each bitmap then data.
struct DynamicForward {
    d: Dynamic,
    /// (sector, block) of every allocated block, by sector.
    order: Vec<(u32, u32)>,
    /// Index in `order` of the next block to want.
    next: usize,
    /// The sector bitmap of the block being read.
    bitmap: Vec<u8>,
}

impl Forward for DynamicForward {
    fn virtual_size(&self) -> u64 {
        self.d.size
    }

    fn held(&self) -> u64 {
        (self.d.bat.capacity() * 4 + self.order.capacity() * 8 + self.bitmap.capacity()) as u64
    }

    fn want(&mut self) -> Result<Option<(u64, u64)>> {
        let Some(&(s, _)) = self.order.get(self.next) else {
            return Ok(None);
        };
        self.next += 1;
        Ok(Some((u64::from(s) * SECTOR, self.d.stride())))
    }

    fn take(&mut self, at: u64, bytes: &[u8], out: &dyn Target) -> Result<()> {
        let (s, b) = self.order[self.next - 1];
        let mut rel = at - u64::from(s) * SECTOR;
        let mut bytes = bytes;
        let bl = self.d.bitmap_len;
        if rel < bl {
            let n = (bl - rel).min(bytes.len() as u64) as usize;
            self.bitmap[rel as usize..rel as usize + n].copy_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            rel += n as u64;
        }
        if bytes.is_empty() {
            return Ok(());
        }
        let in_blk = rel - bl;
        let base = u64::from(b) * self.d.block_size;
        // Only the part inside the virtual disk (the last block may reach past it).
        let len = (bytes.len() as u64).min(self.d.size.saturating_sub(base + in_blk));
        let mut p = 0u64;
        while p < len {
            let (set, n) = run_in(&self.bitmap, 0, in_blk + p, len - p);
            let at = base + in_blk + p;
            if set {
                out.write(at, &bytes[p as usize..(p + n) as usize])?;
            } else {
                out.zero(at, n)?;
            }
            p += n;
        }
        Ok(())
    }

    fn finish(&mut self, len: u64, tail: &[u8], out: &dyn Target) -> Result<()> {
        // The file reader's checks on the length: the whole declared BAT (the stream read
        // only the entries the disk uses), then every block.
        if self.d.bat_end > len {
            return Err(bat_outside(
                self.d.bat_end - self.d.entries * 4,
                self.d.entries,
                len,
            ));
        }
        let last = &tail[tail.len().saturating_sub(FOOTER_LEN as usize)..];
        self.d.check_ends(limit_for(len, last))?;
        let allocated = self.order.iter().map(|&(_, b)| u64::from(b));
        crate::forward::zero_absent(allocated, self.d.block_size, self.d.size, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_skips_its_field() {
        let mut b = [0u8; 512];
        b[0] = 1;
        b[64] = 0xff;
        assert_eq!(checksum(&b, 64), !1u32);
    }
}
