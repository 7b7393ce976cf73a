//! VHDX images (dynamic and fixed, read-only): the file identifier, the two checksummed
//! headers (CRC-32C, higher sequence wins), the region table, the metadata items, and the
//! block allocation table read on demand in bounded pages. Payload blocks in states
//! NOT_PRESENT, UNDEFINED, ZERO and UNMAPPED read as zeros, FULLY_PRESENT ones from the file.
//! A log that needs replay is replayed in memory ([`log`]), never written back.
//!
//! Refused: logs over 16 MiB that need replay, differencing disks (the parent locator is never
//! followed: `Denied` under the untrusted policy, `UnsupportedFeature` otherwise),
//! PARTIALLY_PRESENT blocks outside differencing disks, unknown required regions or metadata
//! items.

use crate::detect::Format;
use crate::error::{Error, ErrorKind, Result};
use crate::forward::{Forward, HeadIo, UNKNOWN_LEN};
use crate::image::{Driver, DriverContext, Extent, Policy};
use crate::io::BlockIo;
use crate::qcow2::stream::Target;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

mod log;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// The header section: file identifier, two headers, two region tables.
const HEADER_SECTION: u64 = MIB;
const HEADER_SIZE: usize = 4096;
const REGION_TABLE_SIZE: usize = 64 * 1024;
const METADATA_TABLE_SIZE: usize = 64 * 1024;
const MAX_ENTRIES: u32 = 2047;
/// Largest virtual disk (the format's own limit).
const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
/// Largest metadata item we read.
const MAX_ITEM_LEN: u32 = MIB as u32;
/// BAT entries per cached page (32 KiB).
const PAGE_ENTRIES: u64 = 4096;
/// Cached BAT pages at most (2 MiB).
const MAX_PAGES: usize = 64;
/// A BAT at most this large is validated entry by entry at open.
const SCAN_AT_OPEN: u64 = 32 * MIB;
/// Blocks walked by one `extent` call at most.
const MAX_EXTENT_BLOCKS: u64 = 1 << 16;
/// Problems `check` lists at most.
const MAX_PROBLEMS: usize = 100;

/// A GUID in its on-disk (Microsoft mixed-endian) byte order.
type Guid = [u8; 16];

const fn guid(a: u32, b: u16, c: u16, d: [u8; 8]) -> Guid {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

const BAT_GUID: Guid = guid(
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
);
const METADATA_GUID: Guid = guid(
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
);
const FILE_PARAMETERS: Guid = guid(
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
);
const VIRTUAL_DISK_SIZE: Guid = guid(
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
);
const PAGE83: Guid = guid(
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
);
const LOGICAL_SECTOR: Guid = guid(
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
);
const PHYSICAL_SECTOR: Guid = guid(
    0xCDA3_48C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
);
const PARENT_LOCATOR: Guid = guid(
    0xA8D3_5F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
);

// Payload block states (bits 0-2 of a BAT entry).
const NOT_PRESENT: u64 = 0;
const UNDEFINED: u64 = 1;
const ZERO: u64 = 2;
const UNMAPPED: u64 = 3;
/// UNMAPPED as written by pre-1.0 implementations.
const UNMAPPED_V095: u64 = 5;
const FULLY_PRESENT: u64 = 6;
const PARTIALLY_PRESENT: u64 = 7;

const CRC32C_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// CRC-32C (Castagnoli), as VHDX checksums use it.
fn crc32c(data: &[u8]) -> u32 {
    !crc32c_update(!0, data)
}

/// Feed `data` into a running CRC-32C register (start with `!0`, finish with `!`).
fn crc32c_update(mut c: u32, data: &[u8]) -> u32 {
    for &b in data {
        c = CRC32C_TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
    }
    c
}

/// Whether the CRC-32C stored at `at` matches `buf` with that field taken as zero.
fn checksum_ok(buf: &[u8], at: usize) -> bool {
    let stored = le32(buf, at);
    let mut copy = buf.to_vec();
    copy[at..at + 4].fill(0);
    crc32c(&copy) == stored
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn guid_at(b: &[u8], at: usize) -> Guid {
    let mut g = [0u8; 16];
    g.copy_from_slice(&b[at..at + 16]);
    g
}

fn read(io: &dyn BlockIo, buf: &mut [u8], off: u64, what: &str) -> Result<()> {
    io.read_exact_at(buf, off).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::corrupt(format!(
                "vhdx {what} at offset {off} lies past the end of the file (truncated image)"
            ))
        } else {
            Error::io(format!("cannot read the vhdx {what}"), e)
        }
    })
}

/// One of the two headers, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Header {
    sequence: u64,
    log_guid: Guid,
    log_length: u32,
    log_offset: u64,
    raw: Vec<u8>,
}

fn parse_header(buf: &[u8]) -> std::result::Result<Header, String> {
    if &buf[0..4] != b"head" {
        return Err("no 'head' signature".into());
    }
    if !checksum_ok(buf, 4) {
        return Err("bad CRC-32C checksum".into());
    }
    let log_version = le16(buf, 64);
    let version = le16(buf, 66);
    if version != 1 {
        return Err(format!("version {version} (only 1 exists)"));
    }
    if log_version != 0 {
        return Err(format!("log version {log_version} (only 0 exists)"));
    }
    Ok(Header {
        sequence: le64(buf, 8),
        log_guid: guid_at(buf, 48),
        log_length: le32(buf, 68),
        log_offset: le64(buf, 72),
        raw: buf.to_vec(),
    })
}

/// The valid header with the higher sequence number.
fn current_header(io: &dyn BlockIo) -> Result<Header> {
    let mut parsed = Vec::new();
    for (i, off) in [(1, 64 * KIB), (2, 128 * KIB)] {
        let mut buf = vec![0u8; HEADER_SIZE];
        read(io, &mut buf, off, &format!("header {i}"))?;
        parsed.push(parse_header(&buf).map_err(|e| format!("header {i}: {e}")));
    }
    let h2 = parsed.pop().expect("two headers");
    let h1 = parsed.pop().expect("two headers");
    match (h1, h2) {
        (Ok(a), Ok(b)) => {
            if a.sequence == b.sequence && a.raw != b.raw {
                Err(Error::corrupt(format!(
                    "vhdx headers 1 and 2 differ but have the same sequence number {}",
                    a.sequence
                )))
            } else if b.sequence > a.sequence {
                Ok(b)
            } else {
                Ok(a)
            }
        }
        (Ok(a), Err(_)) => Ok(a),
        (Err(_), Ok(b)) => Ok(b),
        (Err(a), Err(b)) => Err(Error::corrupt(format!(
            "vhdx has no valid header ({a}; {b})"
        ))),
    }
}

/// A file range, for overlap checks.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: u64,
    end: u64,
    name: &'static str,
}

impl Span {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        start < self.end && self.start < end
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Regions {
    bat: (u64, u64),
    metadata: (u64, u64),
}

fn parse_region_table(buf: &[u8], file_size: u64) -> std::result::Result<Regions, String> {
    if &buf[0..4] != b"regi" {
        return Err("no 'regi' signature".into());
    }
    if !checksum_ok(buf, 4) {
        return Err("bad CRC-32C checksum".into());
    }
    let count = le32(buf, 8);
    if count > MAX_ENTRIES {
        return Err(format!("{count} entries (at most {MAX_ENTRIES})"));
    }
    let (mut bat, mut meta) = (None, None);
    let mut seen: Vec<(u64, u64)> = Vec::new();
    for i in 0..count as usize {
        let e = 16 + 32 * i;
        let g = guid_at(buf, e);
        let off = le64(buf, e + 16);
        let len = u64::from(le32(buf, e + 24));
        let required = le32(buf, e + 28) & 1 != 0;
        if off % MIB != 0 || len % MIB != 0 || len == 0 {
            return Err(format!(
                "entry {i}: offset {off} or length {len} is not a non-zero multiple of 1 MiB"
            ));
        }
        if off < HEADER_SECTION {
            return Err(format!(
                "entry {i}: offset {off} lies in the header section"
            ));
        }
        let end = off
            .checked_add(len)
            .filter(|&e| e <= file_size)
            .ok_or_else(|| {
                format!(
                    "entry {i}: {len} bytes at {off} lie past the end of the file ({file_size})"
                )
            })?;
        if seen.iter().any(|&(s, t)| off < t && s < end) {
            return Err(format!("entry {i}: overlaps another region"));
        }
        seen.push((off, end));
        let slot = if g == BAT_GUID {
            &mut bat
        } else if g == METADATA_GUID {
            &mut meta
        } else if required {
            return Err(format!("entry {i}: unknown required region"));
        } else {
            continue;
        };
        if slot.replace((off, len)).is_some() {
            return Err(format!("entry {i}: duplicate region"));
        }
    }
    match (bat, meta) {
        (Some(bat), Some(metadata)) => Ok(Regions { bat, metadata }),
        (None, _) => Err("no BAT region".into()),
        (_, None) => Err("no metadata region".into()),
    }
}

fn region_table(io: &dyn BlockIo, file_size: u64) -> Result<Regions> {
    let mut errs = Vec::new();
    for (i, off) in [(1, 192 * KIB), (2, 256 * KIB)] {
        let mut buf = vec![0u8; REGION_TABLE_SIZE];
        read(io, &mut buf, off, &format!("region table {i}"))?;
        match parse_region_table(&buf, file_size) {
            Ok(r) => return Ok(r),
            Err(e) => errs.push(format!("region table {i}: {e}")),
        }
    }
    Err(Error::corrupt(format!(
        "vhdx has no valid region table ({})",
        errs.join("; ")
    )))
}

/// What the metadata region says.
struct Metadata {
    block_size: u64,
    has_parent: bool,
    virtual_size: u64,
    logical_sector: u64,
    physical_sector: u64,
    /// The parent locator item (offset, length within the region), for differencing disks.
    parent_locator: Option<(u32, u32)>,
}

fn metadata(io: &dyn BlockIo, (region, region_len): (u64, u64)) -> Result<Metadata> {
    let mut table = vec![0u8; METADATA_TABLE_SIZE];
    read(io, &mut table, region, "metadata table")?;
    if &table[0..8] != b"metadata" {
        return Err(Error::corrupt(
            "vhdx metadata table has no 'metadata' signature",
        ));
    }
    let count = le16(&table, 10);
    if u32::from(count) > MAX_ENTRIES {
        return Err(Error::corrupt(format!(
            "vhdx metadata table has {count} entries (at most {MAX_ENTRIES})"
        )));
    }
    let mut items: HashMap<Guid, (u32, u32)> = HashMap::new();
    for i in 0..usize::from(count) {
        let e = 32 + 32 * i;
        let g = guid_at(&table, e);
        let off = le32(&table, e + 16);
        let len = le32(&table, e + 20);
        let flags = le32(&table, e + 24);
        let known = [
            FILE_PARAMETERS,
            VIRTUAL_DISK_SIZE,
            PAGE83,
            LOGICAL_SECTOR,
            PHYSICAL_SECTOR,
            PARENT_LOCATOR,
        ]
        .contains(&g);
        if !known {
            if flags & 4 != 0 {
                return Err(Error::new(
                    ErrorKind::UnsupportedFeature,
                    format!("vhdx metadata item {i} is an unknown required item"),
                ));
            }
            continue;
        }
        if len > MAX_ITEM_LEN
            || u64::from(off) < METADATA_TABLE_SIZE as u64
            || u64::from(off) + u64::from(len) > region_len
        {
            return Err(Error::corrupt(format!(
                "vhdx metadata item {i}: {len} bytes at offset {off} lie outside the metadata region ({region_len} bytes, items from 64 KiB)"
            )));
        }
        if items.insert(g, (off, len)).is_some() {
            return Err(Error::corrupt(format!(
                "vhdx metadata item {i} appears twice"
            )));
        }
    }
    let item = |g: &Guid, name: &str, need: u32| -> Result<Vec<u8>> {
        let &(off, len) = items.get(g).ok_or_else(|| {
            Error::corrupt(format!("vhdx metadata lacks the required {name} item"))
        })?;
        if len < need {
            return Err(Error::corrupt(format!(
                "vhdx metadata item {name} is {len} bytes, needs {need}"
            )));
        }
        let mut buf = vec![0u8; need as usize];
        read(
            io,
            &mut buf,
            region + u64::from(off),
            &format!("metadata item {name}"),
        )?;
        Ok(buf)
    };
    let fp = item(&FILE_PARAMETERS, "file parameters", 8)?;
    let block_size = u64::from(le32(&fp, 0));
    let has_parent = le32(&fp, 4) & 2 != 0;
    if !block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&block_size) {
        return Err(Error::corrupt(format!(
            "vhdx file parameters: block size {block_size} is not a power of two from 1 MiB to 256 MiB"
        )));
    }
    let virtual_size = le64(&item(&VIRTUAL_DISK_SIZE, "virtual disk size", 8)?, 0);
    let logical_sector = u64::from(le32(&item(&LOGICAL_SECTOR, "logical sector size", 4)?, 0));
    let physical_sector = u64::from(le32(&item(&PHYSICAL_SECTOR, "physical sector size", 4)?, 0));
    item(&PAGE83, "virtual disk id (page 83)", 16)?;
    for (name, v) in [
        ("logical sector size", logical_sector),
        ("physical sector size", physical_sector),
    ] {
        if v != 512 && v != 4096 {
            return Err(Error::corrupt(format!(
                "vhdx metadata: {name} {v} is neither 512 nor 4096"
            )));
        }
    }
    if virtual_size > MAX_VIRTUAL_SIZE {
        return Err(Error::new(
            ErrorKind::TooLarge,
            format!("vhdx virtual disk size {virtual_size} exceeds the format's 64 TiB"),
        ));
    }
    if virtual_size % logical_sector != 0 {
        return Err(Error::corrupt(format!(
            "vhdx virtual disk size {virtual_size} is not a multiple of the logical sector size {logical_sector}"
        )));
    }
    Ok(Metadata {
        block_size,
        has_parent,
        virtual_size,
        logical_sector,
        physical_sector,
        parent_locator: items.get(&PARENT_LOCATOR).copied(),
    })
}

/// An open VHDX image.
#[derive(Debug)]
pub struct Vhdx {
    /// The image file.
    file: Arc<dyn BlockIo>,
    /// What is read: the file, or the file under its log replayed in memory.
    io: Arc<dyn BlockIo>,
    /// 4 KiB pages the log replay holds, when the log needed replay.
    replayed_pages: Option<usize>,
    file_size: u64,
    virtual_size: u64,
    block_size: u64,
    logical_sector: u64,
    physical_sector: u64,
    chunk_ratio: u64,
    data_blocks: u64,
    bat_offset: u64,
    bat_entries: u64,
    /// Ranges no payload block may overlap: header section, log, BAT, metadata.
    reserved: Vec<Span>,
    pages: Mutex<HashMap<u64, Arc<Vec<u64>>>>,
}

/// Where a payload block's data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Zero,
    Data(u64),
}

/// Open a VHDX image held by `io`.
pub fn open(io: Arc<dyn BlockIo>, ctx: &DriverContext<'_>) -> Result<Box<dyn Driver>> {
    Ok(Box::new(Vhdx::open(io, ctx)?))
}

impl Vhdx {
    /// Read and validate the headers, region table, metadata and (when small) the BAT.
    pub fn open(io: Arc<dyn BlockIo>, ctx: &DriverContext<'_>) -> Result<Vhdx> {
        let file_size = io
            .size()
            .map_err(|e| Error::io("cannot get the size of the vhdx file", e))?;
        let v = Self::open_from(io.as_ref(), Some(io.clone()), file_size, ctx)?;
        v.ok_or_else(|| Error::corrupt("vhdx log replay needs the file"))
    }

    /// [`Vhdx::open`] reading through `src` (the file, or a stream's head with `file_size`
    /// [`UNKNOWN_LEN`]); `io` is the file kept for later reads and for a log replay (`None`
    /// for a stream, which then gives `None` for a log that needs replay).
    fn open_from(
        src: &dyn BlockIo,
        io: Option<Arc<dyn BlockIo>>,
        file_size: u64,
        ctx: &DriverContext<'_>,
    ) -> Result<Option<Vhdx>> {
        let mut ident = [0u8; 8];
        read(src, &mut ident, 0, "file identifier")?;
        if &ident != b"vhdxfile" {
            return Err(Error::corrupt(
                "vhdx file identifier: no 'vhdxfile' signature at offset 0",
            ));
        }
        if file_size < HEADER_SECTION {
            return Err(Error::corrupt(format!(
                "vhdx file of {file_size} bytes is shorter than its 1 MiB header section (truncated image)"
            )));
        }
        let header = current_header(src)?;
        let log_len = u64::from(header.log_length);
        let mut reserved = vec![Span {
            start: 0,
            end: HEADER_SECTION,
            name: "header section",
        }];
        let mut replayed_pages = None;
        let mut replayed: Option<Arc<dyn BlockIo>> = None;
        let mut file_size = file_size;
        if log_len != 0 {
            let end = header
                .log_offset
                .checked_add(log_len)
                .filter(|_| header.log_offset % MIB == 0 && log_len % MIB == 0)
                .filter(|_| header.log_offset >= HEADER_SECTION)
                .ok_or_else(|| {
                    Error::corrupt(format!(
                        "vhdx header: log of {log_len} bytes at {} is not 1 MiB aligned past the header section",
                        header.log_offset
                    ))
                })?;
            reserved.push(Span {
                start: header.log_offset,
                end,
                name: "log",
            });
            if header.log_guid != [0u8; 16] {
                if end > file_size {
                    return Err(Error::corrupt(format!(
                        "vhdx header: the log ({log_len} bytes at {}) lies past the end of the file ({file_size})",
                        header.log_offset
                    )));
                }
                // The log needs replay: apply it in memory, never to the file.
                let Some(file) = &io else {
                    return Ok(None);
                };
                if let Some(r) =
                    log::replay(file, file_size, header.log_offset, log_len, header.log_guid)?
                {
                    replayed_pages = Some(r.pages());
                    file_size = r
                        .size()
                        .map_err(|e| Error::io("cannot size the replayed vhdx", e))?;
                    replayed = Some(Arc::new(r));
                }
            }
        }
        let view: &dyn BlockIo = replayed.as_deref().unwrap_or(src);
        let regions = region_table(view, file_size)?;
        for (name, (off, len)) in [("BAT", regions.bat), ("metadata", regions.metadata)] {
            if let Some(s) = reserved.iter().find(|s| s.overlaps(off, off + len)) {
                return Err(Error::corrupt(format!(
                    "vhdx region table: the {name} region overlaps the {}",
                    s.name
                )));
            }
        }
        reserved.push(Span {
            start: regions.bat.0,
            end: regions.bat.0 + regions.bat.1,
            name: "BAT region",
        });
        reserved.push(Span {
            start: regions.metadata.0,
            end: regions.metadata.0 + regions.metadata.1,
            name: "metadata region",
        });
        let md = metadata(view, regions.metadata)?;
        if md.has_parent {
            let Some(_) = md.parent_locator else {
                return Err(Error::corrupt(
                    "vhdx file parameters say the disk has a parent, but the metadata has no parent locator",
                ));
            };
            return Err(match ctx.policy {
                Policy::Untrusted => Error::new(
                    ErrorKind::Denied,
                    "vhdx differencing disk: its parent locator names a parent file, which the untrusted policy does not open",
                ),
                Policy::Trusted => Error::new(
                    ErrorKind::UnsupportedFeature,
                    "vhdx differencing disk (parent locator): reading parents is not supported",
                ),
            });
        }
        let chunk_ratio = (md.logical_sector << 23) / md.block_size;
        let data_blocks = md.virtual_size.div_ceil(md.block_size);
        let bat_entries = if data_blocks == 0 {
            0
        } else {
            data_blocks
                .checked_add((data_blocks - 1) / chunk_ratio)
                .ok_or_else(|| Error::corrupt("vhdx BAT size overflows"))?
        };
        let bat_bytes = bat_entries
            .checked_mul(8)
            .ok_or_else(|| Error::corrupt("vhdx BAT size overflows"))?;
        if bat_bytes > regions.bat.1 {
            return Err(Error::corrupt(format!(
                "vhdx BAT of {bat_entries} entries ({bat_bytes} bytes) does not fit its {}-byte region",
                regions.bat.1
            )));
        }
        let placeholder = || -> Arc<dyn BlockIo> { Arc::new(crate::io::MemIo::default()) };
        let file = io.unwrap_or_else(placeholder);
        let v = Vhdx {
            io: replayed.unwrap_or_else(|| file.clone()),
            file,
            replayed_pages,
            file_size,
            virtual_size: md.virtual_size,
            block_size: md.block_size,
            logical_sector: md.logical_sector,
            physical_sector: md.physical_sector,
            chunk_ratio,
            data_blocks,
            bat_offset: regions.bat.0,
            bat_entries,
            reserved,
            pages: Mutex::new(HashMap::new()),
        };
        if bat_bytes <= SCAN_AT_OPEN && !ctx.metadata_only {
            for b in 0..data_blocks {
                v.block(b)?;
            }
        }
        Ok(Some(v))
    }

    /// BAT entry `i` (payload or sector bitmap), through the page cache.
    fn bat_entry(&self, i: u64) -> Result<u64> {
        let page = i / PAGE_ENTRIES;
        {
            let pages = self.pages.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(p) = pages.get(&page) {
                return Ok(p[(i % PAGE_ENTRIES) as usize]);
            }
        }
        let first = page * PAGE_ENTRIES;
        let n = PAGE_ENTRIES.min(self.bat_entries - first);
        let mut buf = vec![0u8; (n * 8) as usize];
        read(
            self.io.as_ref(),
            &mut buf,
            self.bat_offset + first * 8,
            "BAT",
        )?;
        let entries: Arc<Vec<u64>> = Arc::new((0..n as usize).map(|k| le64(&buf, k * 8)).collect());
        let e = entries[(i % PAGE_ENTRIES) as usize];
        let mut pages = self.pages.lock().unwrap_or_else(|p| p.into_inner());
        if pages.len() >= MAX_PAGES {
            pages.clear();
        }
        pages.insert(page, entries);
        Ok(e)
    }

    /// Validate and decode the BAT entry of payload block `b`.
    fn block(&self, b: u64) -> Result<Block> {
        let entry = self.bat_entry(b + b / self.chunk_ratio)?;
        self.decode(b, entry)
    }

    /// What BAT entry `entry` says of payload block `b`.
    fn decode(&self, b: u64, entry: u64) -> Result<Block> {
        match entry & 7 {
            NOT_PRESENT | UNDEFINED | ZERO | UNMAPPED | UNMAPPED_V095 => Ok(Block::Zero),
            FULLY_PRESENT => {
                let off = entry & !0xF_FFFF;
                self.check_block(b, off).map_err(Error::corrupt)?;
                Ok(Block::Data(off))
            }
            PARTIALLY_PRESENT => Err(Error::corrupt(format!(
                "vhdx BAT entry of block {b} is PARTIALLY_PRESENT, which only differencing disks may use"
            ))),
            s => Err(Error::corrupt(format!(
                "vhdx BAT entry of block {b} has the undefined state {s}"
            ))),
        }
    }

    /// Problems with payload block `b` stored at file offset `off`.
    fn check_block(&self, b: u64, off: u64) -> std::result::Result<(), String> {
        if off >= self.file_size {
            return Err(format!(
                "vhdx BAT entry of block {b} points at offset {off}, past the end of the file ({})",
                self.file_size
            ));
        }
        let end = off.saturating_add(self.block_size);
        if let Some(s) = self.reserved.iter().find(|s| s.overlaps(off, end)) {
            return Err(format!(
                "vhdx BAT entry of block {b} (offset {off}) overlaps the {}",
                s.name
            ));
        }
        Ok(())
    }
}

impl Driver for Vhdx {
    fn format(&self) -> Format {
        Format::Vhdx
    }

    fn qemu_reports_status(&self) -> bool {
        false
    }

    fn file(&self) -> &Arc<dyn BlockIo> {
        &self.file
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn extent(&self, offset: u64, max: u64) -> Result<Extent> {
        if offset >= self.virtual_size || max == 0 {
            return Err(Error::invalid(format!(
                "offset {offset} is outside the {}-byte disk",
                self.virtual_size
            )));
        }
        let limit = offset.saturating_add(max).min(self.virtual_size);
        let bs = self.block_size;
        let first = self.block(offset / bs)?;
        let host = |blk: Block, at: u64| match blk {
            Block::Data(o) => Some(o + at % bs),
            Block::Zero => None,
        };
        let start_host = host(first, offset);
        let mut end = (offset / bs + 1).saturating_mul(bs).min(limit);
        let mut walked = 1;
        while end < limit && walked < MAX_EXTENT_BLOCKS {
            let next = self.block(end / bs)?;
            let same = match (first, next) {
                (Block::Zero, Block::Zero) => true,
                (Block::Data(_), Block::Data(_)) => {
                    host(next, end) == start_host.map(|h| h + (end - offset))
                }
                _ => false,
            };
            if !same {
                break;
            }
            end = end.saturating_add(bs).min(limit);
            walked += 1;
        }
        let data = matches!(first, Block::Data(_));
        let mut len = end - offset;
        let mut zero = !data;
        if let Some(h) = start_host {
            // As for VDI and fixed VHD, the file's holes inside a payload block read as zeros
            // and need not be read (a replayed log's view reports no holes).
            let next = self
                .io
                .next_data(h)
                .map_err(|e| Error::io("cannot find data extents in the vhdx file", e))?;
            (len, zero) = match next {
                Some(r) if r.start > h => (len.min(r.start - h), true),
                Some(r) => (len.min(r.end.saturating_sub(h)).max(1), false),
                None => (len, true),
            };
        }
        Ok(Extent {
            len,
            depth: 0,
            present: true,
            zero,
            data,
            compressed: false,
            offset: start_host,
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let bs = self.block_size;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let within = pos % bs;
            let n = ((bs - within) as usize).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match self.block(pos / bs)? {
                Block::Zero => out.fill(0),
                Block::Data(host) => self
                    .io
                    .read_at_zero_padded(out, host + within)
                    .map_err(|e| Error::io("cannot read a vhdx payload block", e))?,
            }
            done += n;
        }
        Ok(())
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.block_size)
    }

    fn check(&self) -> Option<Vec<String>> {
        let mut problems = Vec::new();
        let mut offsets = Vec::new();
        for b in 0..self.data_blocks {
            if problems.len() >= MAX_PROBLEMS {
                problems.push("(further problems not listed)".to_string());
                break;
            }
            match self.block(b) {
                Ok(Block::Data(o)) => {
                    if offsets.len() < (1 << 19) {
                        offsets.push((o, b));
                    }
                }
                Ok(Block::Zero) => {}
                Err(e) if e.kind() == ErrorKind::Corrupt => problems.push(e.message().to_string()),
                Err(e) => {
                    problems.push(format!("cannot read the vhdx BAT: {e}"));
                    break;
                }
            }
        }
        offsets.sort_unstable();
        for w in offsets.windows(2) {
            if problems.len() >= MAX_PROBLEMS {
                break;
            }
            if w[1].0 < w[0].0 + self.block_size {
                problems.push(format!(
                    "vhdx blocks {} and {} overlap in the file (offsets {} and {})",
                    w[0].1, w[1].1, w[0].0, w[1].0
                ));
            }
        }
        Some(problems)
    }
}

impl Vhdx {
    /// The logical and physical sector sizes.
    pub fn sector_sizes(&self) -> (u64, u64) {
        (self.logical_sector, self.physical_sector)
    }

    /// When the log needed replay: the 4 KiB pages it changed (held in memory).
    pub fn replayed_pages(&self) -> Option<usize> {
        self.replayed_pages
    }
}

/// Bytes at the start of the file holding both headers and both region tables.
const TABLES_END: u64 = 320 * KIB;

/// The streaming strategy (see [`crate::forward`]): headers, region table, metadata and BAT
/// from the stream's head with the file reader's code, then payload blocks in file order.
/// `Ok(None)` (spool and open as a file) for a log that needs replay, a BAT larger than the
/// head may hold, and blocks overlapping each other.
pub(crate) fn forward(head: &HeadIo<'_, '_>) -> Result<Option<Box<dyn Forward>>> {
    let ctx = DriverContext {
        path: None,
        policy: Policy::Untrusted,
        metadata_only: true,
    };
    let Some(v) = Vhdx::open_from(head, None, UNKNOWN_LEN, &ctx)? else {
        return Ok(None);
    };
    let bat_bytes = v.bat_entries * 8;
    if v.bat_offset.saturating_add(bat_bytes) > head.limit() as u64 {
        return Ok(None);
    }
    let regions = region_table(head, UNKNOWN_LEN)?;
    let mut raw = vec![0u8; bat_bytes as usize];
    read(head, &mut raw, v.bat_offset, "BAT")?;
    let mut units = Vec::new();
    for b in 0..v.data_blocks {
        let i = (b + b / v.chunk_ratio) as usize;
        if let Block::Data(off) = v.decode(b, le64(&raw, i * 8))? {
            units.push((off, b));
        }
    }
    drop(raw);
    units.sort_unstable();
    if units
        .windows(2)
        .any(|w| w[0].0 != w[1].0 && w[1].0 < w[0].0 + v.block_size)
    {
        return Ok(None);
    }
    let mut tables = vec![0u8; TABLES_END as usize];
    read(head, &mut tables, 0, "header section")?;
    Ok(Some(Box::new(VhdxForward {
        v,
        regions,
        units,
        next: 0,
        cur: 0..0,
        tables,
    })))
}

/// [`forward`]'s reader.
struct VhdxForward {
    v: Vhdx,
    /// The regions the head was read with.
    regions: Regions,
    /// (offset, block) of every present block, by offset.
    units: Vec<(u64, u64)>,
    next: usize,
    /// The units sharing the block being read.
    cur: std::ops::Range<usize>,
    /// The file's first bytes (headers and region tables), to check them on its length.
    tables: Vec<u8>,
}

impl Forward for VhdxForward {
    fn virtual_size(&self) -> u64 {
        self.v.virtual_size
    }

    fn held(&self) -> u64 {
        (self.units.capacity() * 16 + self.tables.len()) as u64
    }

    fn want(&mut self) -> Result<Option<(u64, u64)>> {
        let Some(&(off, _)) = self.units.get(self.next) else {
            return Ok(None);
        };
        self.cur = crate::forward::same_key(&self.units, self.next);
        self.next = self.cur.end;
        Ok(Some((off, self.v.block_size)))
    }

    fn take(&mut self, at: u64, bytes: &[u8], out: &dyn Target) -> Result<()> {
        let rel = at - self.units[self.cur.start].0;
        for &(_, b) in &self.units[self.cur.clone()] {
            let guest = b * self.v.block_size + rel;
            let n = (bytes.len() as u64).min(self.v.virtual_size.saturating_sub(guest));
            if n > 0 {
                out.write(guest, &bytes[..n as usize])?;
            }
        }
        Ok(())
    }

    fn finish(&mut self, len: u64, _tail: &[u8], out: &dyn Target) -> Result<()> {
        // The file reader's checks on the stream's length.
        if len < HEADER_SECTION {
            return Err(Error::corrupt(format!(
                "vhdx file of {len} bytes is shorter than its 1 MiB header section (truncated image)"
            )));
        }
        let mem = crate::io::MemIo::new(std::mem::take(&mut self.tables));
        if region_table(&mem, len)? != self.regions {
            return Err(Error::corrupt(
                "vhdx region tables: the first is valid only for a longer file: the stream cannot be read front to back",
            ));
        }
        self.v.file_size = len;
        for &(off, b) in &self.units {
            self.v.check_block(b, off).map_err(Error::corrupt)?;
        }
        let (bs, size) = (self.v.block_size, self.v.virtual_size);
        crate::forward::zero_cut_short(
            &self.units[self.cur.start..],
            len,
            bs,
            |b| bs.min(size - b * bs),
            out,
        )?;
        let present = self.units.iter().map(|&(_, b)| b);
        crate::forward::zero_absent(present, bs, size, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_vector() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn guid_layout() {
        assert_eq!(
            BAT_GUID,
            [
                0x66, 0x77, 0xC2, 0x2D, 0x23, 0xF6, 0x00, 0x42, 0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD,
                0x4A, 0x08
            ]
        );
    }
}
