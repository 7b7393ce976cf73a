//! VMDK images, read-only: hosted sparse extents (`KDMV` files: monolithicSparse, and
//! streamOptimized with its zlib grains, markers and footer) and text descriptors
//! (monolithicFlat, vmfs, twoGbMaxExtentSparse, twoGbMaxExtentFlat) whose FLAT, VMFS, SPARSE
//! and ZERO extents are concatenated in line order.
//!
//! Extent files named by a descriptor are the attack surface of CVE-2022-47951 (a descriptor
//! naming `/etc/passwd` makes qemu-img copy it into the image), so:
//! - under [`Policy::Untrusted`] a descriptor naming any file is refused with
//!   [`ErrorKind::Denied`], unless the open is for metadata only (`info`), which opens nothing;
//! - under [`Policy::Trusted`] only plain relative names are opened, beneath the descriptor's
//!   directory: absolute names, `..`, protocol prefixes (`nbd:`, `json:`, `x://`), symbolic
//!   links, non-regular files, the descriptor itself and a file named twice are refused;
//! - the extent lines embedded in a sparse file are ignored, as qemu does;
//! - parent links (`parentCID` other than `ffffffff`, `parentFileNameHint`) are refused:
//!   delta disks are not read.
//!
//! Everything read from the file is checked before use: header fields against the limits
//! below, the grain directory and every grain table it names inside the file and clear of the
//! header, descriptor and directories; each grain table entry (when used) inside the file and
//! past the metadata; compressed grains 1 byte to zlib's worst case for one grain, their marker
//! naming the grain the table says, inflated with an output cap of one grain (Adler-32 checked),
//! only the disk's last grain allowed to be short.

use crate::detect::Format;
use crate::error::{Error, ErrorKind, Result, corrupt};
use crate::forward::{Forward, HeadIo, UNKNOWN_LEN};
use crate::image::{Driver, DriverContext, Extent, Policy};
use crate::io::{BlockIo, FileIo};
use crate::qcow2::stream::Target;
use serde_json::{Value, json};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

const SECTOR: u64 = 512;
/// `gdOffset` of a stream whose grain directory is found through the footer.
const GD_AT_END: u64 = u64::MAX;
const FLAG_NL_DETECT: u32 = 1;
const FLAG_ZERO_GRAIN: u32 = 1 << 2;
const FLAG_MARKER: u32 = 1 << 17;
/// The newline-detection bytes at offset 73 (`\n`, ` `, `\r`, `\n`).
const NL_CHECK: [u8; 4] = [0x0a, 0x20, 0x0d, 0x0a];
const MARKER_EOS: u32 = 0;
const MARKER_FOOTER: u32 = 3;
/// Grain table entries per grain table: the only value VMware defines.
const GTES: u64 = 512;
const GT_BYTES: u64 = GTES * 4;
/// A grain table entry meaning "reads as zeros" when the zeroed-grain flag is set.
const GTE_ZEROED: u32 = 1;
/// qemu's largest grain (1 GiB).
const MAX_GRAIN_SECTORS: u64 = 0x20_0000;
/// Largest grain of a compressed extent (1 MiB): each compressed read holds two buffers of
/// about this size, so a hostile header cannot make one cost gigabytes.
const MAX_COMPRESSED_GRAIN_SECTORS: u64 = 2048;
/// Grain directory entries held in memory (32 MiB, as qcow2's L1 limit); with 64 KiB grains
/// that is 256 TiB of virtual disk.
const MAX_GD_ENTRIES: u64 = 8 << 20;
/// Largest virtual disk, in sectors (512 TiB; VMware's own limit is 62 TiB).
const MAX_CAPACITY: u64 = 1 << 40;
/// Largest descriptor, embedded or in its own file (qemu reads at most 1 MiB).
const MAX_DESCRIPTOR: u64 = 1 << 20;
/// Most extents in one descriptor (a 2 GiB-split 8 TiB disk has 4096).
const MAX_EXTENTS: usize = 4096;
/// Grain tables cached per extent (2 KiB each).
const GT_CACHE: usize = 4096;
/// Grain tables read at once when they lie back to back (qemu writes them so).
const GT_READAHEAD: usize = 64;
/// Most bytes read at once for a run of compressed grains.
const MAX_SPAN: u64 = 4 << 20;
/// Most problems `check` lists.
const MAX_MESSAGES: usize = 1000;

fn le16(b: &[u8], o: usize) -> u16 {
    b.get(o..o + 2)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u16::from_le_bytes)
}

fn le32(b: &[u8], o: usize) -> u32 {
    b.get(o..o + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

fn le64(b: &[u8], o: usize) -> u64 {
    b.get(o..o + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

fn io_err(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(what, e)
}

fn too_large(msg: String) -> Error {
    Error::new(ErrorKind::TooLarge, msg)
}

fn unsupported(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::UnsupportedFeature, msg)
}

fn denied(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Denied, msg)
}

/// The hosted sparse extent header (512 bytes at 0; the streamOptimized footer repeats it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    version: u32,
    flags: u32,
    /// Sectors.
    capacity: u64,
    /// Sectors per grain.
    grain: u64,
    desc_offset: u64,
    desc_size: u64,
    gtes: u32,
    gd_offset: u64,
    /// Sectors before the first grain.
    overhead: u64,
    nl_check: [u8; 4],
    compress: u16,
}

impl Header {
    fn parse(b: &[u8]) -> Option<Header> {
        if b.get(..4) != Some(b"KDMV") {
            return None;
        }
        let mut nl_check = [0u8; 4];
        nl_check.copy_from_slice(b.get(73..77)?);
        Some(Header {
            version: le32(b, 4),
            flags: le32(b, 8),
            capacity: le64(b, 12),
            grain: le64(b, 20),
            desc_offset: le64(b, 28),
            desc_size: le64(b, 36),
            gtes: le32(b, 44),
            gd_offset: le64(b, 56),
            overhead: le64(b, 64),
            nl_check,
            compress: le16(b, 77),
        })
    }
}

/// What a grain table entry says about one grain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grain {
    Unallocated,
    Zero,
    /// Uncompressed data at this file offset.
    Data(u64),
    /// A compressed grain (its marker, when there are markers) at this file offset.
    Compressed(u64),
}

/// Why a grain table entry is unusable.
#[derive(Debug, Clone, Copy)]
enum Bad {
    PastEof(u64),
    IntoMetadata(u64),
}

impl Bad {
    /// The end of qemu-img check's "ERROR: cluster offset for sector N ..." line.
    fn qemu_words(self) -> &'static str {
        match self {
            Bad::PastEof(_) => "points after EOF",
            Bad::IntoMetadata(_) => "points into metadata",
        }
    }
}

/// One compressed grain to decode into a read buffer.
#[derive(Debug, Clone, Copy)]
struct Item {
    /// Index into the read buffer.
    at: usize,
    /// Grain number within the extent.
    grain: u64,
    host: u64,
    /// First requested byte within the grain.
    within: usize,
    len: usize,
}

thread_local! {
    static SPAN: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static GRAIN: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static LIBDEFLATE: RefCell<Option<libdeflater::Decompressor>> = const { RefCell::new(None) };
    static INFLATE: RefCell<Option<flate2::Decompress>> = const { RefCell::new(None) };
}

/// zlib's `deflateBound` for any window and memory settings (stored blocks plus the
/// two-byte header and the Adler-32): no deflater writes more for `n` input bytes.
fn deflate_bound(n: u64) -> u64 {
    n + n.div_ceil(8) + n.div_ceil(64) + 5 + 6
}

/// Inflate one zlib stream (RFC 1950) into `dst`, returning the bytes produced; a stream that
/// would produce more than `dst` holds, or that is cut short or corrupt, is an error.
fn inflate(src: &[u8], dst: &mut [u8]) -> Result<usize> {
    // libdeflate decodes whole buffers about twice as fast as a streaming inflater; whatever
    // it rejects is decoded again by flate2, which gives the verdict and the message.
    let fast = LIBDEFLATE.with_borrow_mut(|slot| {
        slot.get_or_insert_with(libdeflater::Decompressor::new)
            .zlib_decompress(src, dst)
    });
    if let Ok(n) = fast {
        return Ok(n);
    }
    INFLATE.with_borrow_mut(|slot| {
        let d = slot.get_or_insert_with(|| flate2::Decompress::new(true));
        d.reset(true);
        let r = d.decompress(src, dst, flate2::FlushDecompress::Finish);
        let out = d.total_out() as usize;
        match r {
            Ok(flate2::Status::StreamEnd) => Ok(out),
            Ok(_) if out == dst.len() => Err(corrupt!(
                "deflate stream inflates to more than one grain ({} bytes)",
                dst.len()
            )),
            Ok(_) => Err(corrupt!("deflate stream is cut short after {out} bytes")),
            Err(e) => Err(corrupt!("invalid deflate stream: {e}")),
        }
    })
}

/// Byte ranges `[start, end)` of a file.
type Ranges = Vec<(u64, u64)>;

/// One hosted sparse extent (`KDMV`), validated at open.
#[derive(Debug)]
struct Sparse {
    io: Arc<dyn BlockIo>,
    /// How errors name this extent: empty for the image itself, else " in extent 'name'".
    what: String,
    file_size: u64,
    /// The header in force (the footer's copy for a stream with GD_AT_END).
    h: Header,
    /// Virtual bytes.
    size: u64,
    grain_bytes: u64,
    grains: u64,
    compressed: bool,
    markers: bool,
    zero_grain: bool,
    /// Largest compressed grain (marker payload) accepted.
    max_compressed: u64,
    /// Bytes read for one compressed grain at most.
    max_read: u64,
    gd: Vec<u32>,
    /// Byte ranges grains and grain tables must stay out of: header, descriptor, directory.
    meta: Vec<(u64, u64)>,
    cache: Mutex<HashMap<usize, Arc<[u32]>>>,
}

impl Sparse {
    /// Validate the header (and footer) of the sparse extent in `io` and load its grain
    /// directory. `name` is empty for the image itself, else the extent's file name.
    fn open(io: Arc<dyn BlockIo>, name: &str) -> Result<Sparse> {
        let file_size = io.size().map_err(io_err("cannot stat VMDK extent"))?;
        Self::open_from(io.as_ref(), io.clone(), file_size, name)
    }

    /// [`Sparse::open`] reading through `src` (the file, or a stream's head with `file_size`
    /// [`UNKNOWN_LEN`]), keeping `io` for later reads.
    fn open_from(
        src: &dyn BlockIo,
        io: Arc<dyn BlockIo>,
        file_size: u64,
        name: &str,
    ) -> Result<Sparse> {
        let what = if name.is_empty() {
            String::new()
        } else {
            format!(" in extent '{name}'")
        };
        if file_size < SECTOR {
            return Err(corrupt!(
                "file of {file_size} bytes is too short for a VMDK sparse header{what}"
            ));
        }
        let mut sec = [0u8; SECTOR as usize];
        src.read_exact_at(&mut sec, 0)
            .map_err(io_err("cannot read VMDK header"))?;
        let head = Header::parse(&sec).ok_or_else(|| {
            if sec.starts_with(b"COWD") {
                unsupported(format!(
                    "ESX COWD (vmfsSparse) extents are not supported{what}"
                ))
            } else {
                corrupt!("not a VMDK sparse extent (no KDMV magic){what}")
            }
        })?;
        if head.flags & FLAG_NL_DETECT != 0 && head.nl_check != NL_CHECK {
            return Err(corrupt!(
                "header newline-detection bytes are {:02x?}, not {NL_CHECK:02x?}: the file \
                 was mangled by a text-mode transfer{what}",
                head.nl_check
            ));
        }
        let h = if head.gd_offset == GD_AT_END {
            Self::footer(src, file_size, &head, &what)?
        } else {
            head
        };
        let (meta, gd_start, gd_bytes) = Self::layout(&h, file_size, &what)?;
        // The redundant directory is neither used nor checked: qemu reads only the primary
        // one, and writers disagree on what its offset means without the flag.
        let mut raw = vec![0u8; gd_bytes as usize];
        src.read_exact_at(&mut raw, gd_start)
            .map_err(io_err("cannot read VMDK grain directory"))?;
        let gd: Vec<u32> = raw.chunks_exact(4).map(|c| le32(c, 0)).collect();
        Self::check_tables(&gd, file_size, &meta, &what)?;
        Ok(Self::assemble(io, what, file_size, h, gd, meta))
    }

    /// A sparse extent from its validated header, directory and metadata ranges.
    fn assemble(
        io: Arc<dyn BlockIo>,
        what: String,
        file_size: u64,
        h: Header,
        gd: Vec<u32>,
        meta: Ranges,
    ) -> Sparse {
        let compressed = h.compress == 1;
        let grain_bytes = h.grain * SECTOR;
        let max_compressed = deflate_bound(grain_bytes);
        let markers = compressed && h.flags & FLAG_MARKER != 0;
        Sparse {
            io,
            what,
            file_size,
            h,
            size: h.capacity * SECTOR,
            grain_bytes,
            grains: h.capacity.div_ceil(h.grain),
            compressed,
            markers,
            zero_grain: h.flags & FLAG_ZERO_GRAIN != 0,
            max_compressed,
            max_read: if markers {
                12 + max_compressed
            } else {
                2 * grain_bytes
            },
            gd,
            meta,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The header's checks (with the file's size): the byte ranges of the metadata, the
    /// grain directory's offset and length.
    fn layout(h: &Header, file_size: u64, what: &str) -> Result<(Ranges, u64, u64)> {
        if h.version == 0 || h.version > 3 {
            return Err(unsupported(format!(
                "VMDK version {} is not supported{what}",
                h.version
            )));
        }
        let compressed = match h.compress {
            0 => false,
            1 => true,
            c => {
                return Err(unsupported(format!(
                    "unknown VMDK compression algorithm {c}{what}"
                )));
            }
        };
        if u64::from(h.gtes) != GTES {
            return Err(corrupt!(
                "{} grain table entries per grain table (VMDK has {GTES}){what}",
                h.gtes
            ));
        }
        if h.grain == 0 || !h.grain.is_power_of_two() {
            return Err(corrupt!(
                "grain size of {} sectors is not a power of two{what}",
                h.grain
            ));
        }
        if h.grain > MAX_GRAIN_SECTORS {
            return Err(too_large(format!(
                "grain size of {} sectors exceeds the limit of {MAX_GRAIN_SECTORS}{what}",
                h.grain
            )));
        }
        if compressed && h.grain > MAX_COMPRESSED_GRAIN_SECTORS {
            return Err(too_large(format!(
                "compressed grains of {} sectors exceed the limit of \
                 {MAX_COMPRESSED_GRAIN_SECTORS}{what}",
                h.grain
            )));
        }
        if h.capacity == 0 {
            return Err(corrupt!("sparse extent has capacity 0{what}"));
        }
        if h.capacity > MAX_CAPACITY {
            return Err(too_large(format!(
                "capacity of {} sectors exceeds the limit of {MAX_CAPACITY}{what}",
                h.capacity
            )));
        }
        let grains = h.capacity.div_ceil(h.grain);
        let gd_entries = grains.div_ceil(GTES);
        if gd_entries > MAX_GD_ENTRIES {
            return Err(too_large(format!(
                "grain directory of {gd_entries} entries exceeds the limit of \
                 {MAX_GD_ENTRIES} (L1 size too big){what}"
            )));
        }
        // Sector counts from here on are bounded by the file size before being multiplied.
        let sectors_in_file = file_size.div_ceil(SECTOR);
        if h.overhead > sectors_in_file {
            return Err(corrupt!(
                "File truncated, expecting at least {} bytes{what}",
                u128::from(h.overhead) * u128::from(SECTOR)
            ));
        }
        let mut meta = vec![(0, SECTOR)];
        if h.desc_offset != 0 {
            if h.desc_size > MAX_DESCRIPTOR / SECTOR {
                return Err(too_large(format!(
                    "embedded descriptor of {} sectors exceeds the limit of {}{what}",
                    h.desc_size,
                    MAX_DESCRIPTOR / SECTOR
                )));
            }
            if h.desc_offset >= sectors_in_file || h.desc_offset + h.desc_size > sectors_in_file {
                return Err(corrupt!(
                    "embedded descriptor lies past the end of the file{what}"
                ));
            }
            meta.push((
                h.desc_offset * SECTOR,
                (h.desc_offset + h.desc_size) * SECTOR,
            ));
        }
        let gd_bytes = gd_entries * 4;
        if h.gd_offset == 0 || h.gd_offset >= sectors_in_file {
            return Err(corrupt!(
                "grain directory offset {} (sectors) lies outside the file{what}",
                h.gd_offset
            ));
        }
        let gd_start = h.gd_offset * SECTOR;
        let gd_end = gd_start + gd_bytes;
        if gd_end > file_size {
            return Err(corrupt!(
                "grain directory at {gd_start:#x} ({gd_bytes} bytes) lies past the end of \
                 the file{what}"
            ));
        }
        if meta.iter().any(|&(a, b)| gd_start < b && a < gd_end) {
            return Err(corrupt!(
                "grain directory at {gd_start:#x} overlaps the header or descriptor{what}"
            ));
        }
        meta.push((gd_start, gd_end.next_multiple_of(SECTOR)));
        Ok((meta, gd_start, gd_bytes))
    }

    /// Every grain table the directory names lies inside the file and clear of `meta`.
    fn check_tables(gd: &[u32], file_size: u64, meta: &[(u64, u64)], what: &str) -> Result<()> {
        for (i, &e) in gd.iter().enumerate() {
            if e == 0 {
                continue;
            }
            let a = u64::from(e) * SECTOR;
            if a + GT_BYTES > file_size {
                return Err(corrupt!(
                    "grain table {i} at {a:#x} lies past the end of the file{what}"
                ));
            }
            if meta.iter().any(|&(s, t)| a < t && s < a + GT_BYTES) {
                return Err(corrupt!(
                    "grain table {i} at {a:#x} overlaps the header, descriptor or grain \
                     directory{what}"
                ));
            }
        }
        Ok(())
    }

    /// The header copy of a stream whose header says GD_AT_END: footer marker, footer and
    /// end-of-stream marker in the last three sectors (qemu's checks).
    fn footer(io: &dyn BlockIo, file_size: u64, head: &Header, what: &str) -> Result<Header> {
        let end = file_size.div_ceil(SECTOR) * SECTOR;
        if end < 4 * SECTOR {
            return Err(corrupt!("file too short for a VMDK footer{what}"));
        }
        let mut b = vec![0u8; 3 * SECTOR as usize];
        io.read_at_zero_padded(&mut b, end - 3 * SECTOR)
            .map_err(io_err("cannot read VMDK footer"))?;
        Self::footer_in(&b, head, what)
    }

    /// The footer in `b`, the last three sectors of the file (zero-padded to a sector):
    /// footer marker, a header with the directory's offset that otherwise repeats `head`,
    /// end-of-stream marker.
    fn footer_in(b: &[u8], head: &Header, what: &str) -> Result<Header> {
        let foot = b.get(512..1024).and_then(Header::parse);
        let ok = le32(b, 8) == 0
            && le32(b, 12) == MARKER_FOOTER
            && le64(b, 1024) == 0
            && le32(b, 1032) == 0
            && le32(b, 1036) == MARKER_EOS;
        let Some(f) = foot.filter(|_| ok) else {
            return Err(corrupt!("Invalid footer{what}"));
        };
        if f.gd_offset == GD_AT_END {
            return Err(corrupt!("footer has no grain directory offset{what}"));
        }
        let rest_differs = Header {
            gd_offset: head.gd_offset,
            ..f
        } != *head;
        if f.capacity != head.capacity || f.grain != head.grain || rest_differs {
            return Err(corrupt!(
                "footer (capacity {}, grain {}) does not match the header (capacity {}, \
                 grain {}, and every field but the directory offset){what}",
                f.capacity,
                f.grain,
                head.capacity,
                head.grain
            ));
        }
        Ok(f)
    }

    /// The embedded descriptor's text (up to its first NUL), if it has one, read through
    /// `src`.
    fn embedded_descriptor_in(&self, src: &dyn BlockIo) -> Result<Option<String>> {
        embedded_descriptor(src, &self.h)
    }

    /// Grain table `i` of the directory (which must be allocated), from the cache or the file;
    /// tables lying back to back after it are read in the same request.
    fn gt(&self, i: usize) -> Result<Arc<[u32]>> {
        let lock = || self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = lock().get(&i) {
            return Ok(t.clone());
        }
        let first = u64::from(self.gd.get(i).copied().unwrap_or(0));
        let mut n = 1;
        while n < GT_READAHEAD
            && self
                .gd
                .get(i + n)
                .is_some_and(|&e| u64::from(e) == first + 4 * n as u64)
        {
            n += 1;
        }
        let mut raw = vec![0u8; n * GT_BYTES as usize];
        self.io
            .read_exact_at(&mut raw, first * SECTOR)
            .map_err(io_err("cannot read VMDK grain table"))?;
        let mut cache = lock();
        if cache.len() + n > GT_CACHE {
            cache.clear();
        }
        let mut out = None;
        for (k, t) in raw.chunks_exact(GT_BYTES as usize).enumerate() {
            let t: Arc<[u32]> = t.chunks_exact(4).map(|c| le32(c, 0)).collect();
            if k == 0 {
                out = Some(t.clone());
            }
            cache.insert(i + k, t);
        }
        out.ok_or_else(|| corrupt!("grain table {i} is empty"))
    }

    /// What grain table entry `e` of grain `g` means.
    fn classify(&self, e: u32, len: u64) -> std::result::Result<Grain, Bad> {
        match e {
            0 => Ok(Grain::Unallocated),
            GTE_ZEROED if self.zero_grain => Ok(Grain::Zero),
            _ => {
                let off = u64::from(e) * SECTOR;
                if off >= self.file_size {
                    return Err(Bad::PastEof(off));
                }
                let end = off + if self.compressed { 1 } else { len };
                if u64::from(e) < self.h.overhead
                    || self.meta.iter().any(|&(a, b)| off < b && a < end)
                {
                    return Err(Bad::IntoMetadata(off));
                }
                Ok(if self.compressed {
                    Grain::Compressed(off)
                } else {
                    Grain::Data(off)
                })
            }
        }
    }

    fn bad(&self, g: u64, b: Bad) -> Error {
        let sector = g * self.h.grain;
        match b {
            Bad::PastEof(off) => corrupt!(
                "grain table entry for sector {sector} points past the end of the file \
                 (offset {off:#x}){}",
                self.what
            ),
            Bad::IntoMetadata(off) => corrupt!(
                "grain table entry for sector {sector} points into metadata (offset \
                 {off:#x}){}",
                self.what
            ),
        }
    }

    /// Bytes of grain `g` inside the virtual disk (only the last grain may be short).
    fn grain_len(&self, g: u64) -> u64 {
        self.grain_bytes.min(self.size - g * self.grain_bytes)
    }

    fn grain(&self, g: u64) -> Result<Grain> {
        let gi = (g / GTES) as usize;
        match self.gd.get(gi) {
            None => Err(corrupt!("grain {g} lies outside the grain directory")),
            Some(0) => Ok(Grain::Unallocated),
            Some(_) => {
                let t = self.gt(gi)?;
                let e = t.get((g % GTES) as usize).copied().unwrap_or(0);
                self.classify(e, self.grain_len(g))
                    .map_err(|b| self.bad(g, b))
            }
        }
    }

    /// Block status at extent offset `off`, at most `max` bytes: a run of grains of one kind
    /// (for data, back to back in the file).
    fn status(&self, off: u64, max: u64) -> Result<Extent> {
        let gb = self.grain_bytes;
        let end = off.saturating_add(max).min(self.size);
        let mut g = off / gb;
        let kind = self.grain(g)?;
        let mut pos = ((g + 1) * gb).min(end);
        let mut next_host = match kind {
            Grain::Data(h) => h + gb,
            _ => 0,
        };
        // Extend over following grains; a grain that cannot be classified ends the run, so
        // its error is reported when it is asked about itself.
        'run: while pos < end {
            g += 1;
            let gi = (g / GTES) as usize;
            let table = match self.gd.get(gi) {
                // A whole unallocated grain table continues an unallocated run at once.
                Some(0) if kind == Grain::Unallocated => {
                    let next = (gi as u64 + 1) * GTES;
                    pos = (next * gb).min(end);
                    g = next - 1;
                    continue;
                }
                Some(0) => None,
                Some(_) => match self.gt(gi) {
                    Ok(t) => Some(t),
                    Err(_) => break,
                },
                None => break,
            };
            loop {
                let k = match &table {
                    None => Grain::Unallocated,
                    Some(t) => {
                        let e = t.get((g % GTES) as usize).copied().unwrap_or(0);
                        match self.classify(e, self.grain_len(g)) {
                            Ok(k) => k,
                            Err(_) => break 'run,
                        }
                    }
                };
                let same = match (kind, k) {
                    (Grain::Data(_), Grain::Data(h)) => h == next_host,
                    (Grain::Compressed(_), Grain::Compressed(_)) => true,
                    (a, b) => a == b,
                };
                if !same {
                    break 'run;
                }
                next_host += gb;
                pos = ((g + 1) * gb).min(end);
                if pos >= end || (g + 1) % GTES == 0 {
                    break;
                }
                g += 1;
            }
        }
        let len = pos - off;
        Ok(match kind {
            Grain::Unallocated => Extent {
                len,
                zero: true,
                ..Extent::default()
            },
            Grain::Zero => Extent {
                len,
                present: true,
                zero: true,
                ..Extent::default()
            },
            Grain::Data(h) => Extent {
                len,
                present: true,
                data: true,
                offset: Some(h + off % gb),
                ..Extent::default()
            },
            Grain::Compressed(_) => Extent {
                len,
                present: true,
                data: true,
                compressed: true,
                ..Extent::default()
            },
        })
    }

    /// Read extent bytes at `off`: back-to-back data grains in one request, neighbouring
    /// compressed grains in one span.
    fn read(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let gb = self.grain_bytes;
        let mut done = 0usize;
        let mut run: Option<(usize, u64, usize)> = None;
        let mut items: Vec<Item> = Vec::new();
        let flush_run = |run: &mut Option<(usize, u64, usize)>, buf: &mut [u8]| -> Result<()> {
            if let Some((at, host, len)) = run.take() {
                self.io
                    .read_at_zero_padded(&mut buf[at..at + len], host)
                    .map_err(io_err("cannot read VMDK grain"))?;
            }
            Ok(())
        };
        while done < buf.len() {
            let pos = off + done as u64;
            let g = pos / gb;
            let within = pos % gb;
            let n = (gb - within).min((buf.len() - done) as u64) as usize;
            match self.grain(g)? {
                Grain::Unallocated | Grain::Zero => buf[done..done + n].fill(0),
                Grain::Data(h) => {
                    let host = h + within;
                    match &mut run {
                        Some((at, rh, rl)) if *at + *rl == done && *rh + *rl as u64 == host => {
                            *rl += n
                        }
                        _ => {
                            flush_run(&mut run, buf)?;
                            run = Some((done, host, n));
                        }
                    }
                }
                Grain::Compressed(h) => items.push(Item {
                    at: done,
                    grain: g,
                    host: h,
                    within: within as usize,
                    len: n,
                }),
            }
            done += n;
        }
        flush_run(&mut run, buf)?;
        self.decode(&items, buf)
    }

    /// Decode compressed grains into `buf`, reading neighbouring grains in one span.
    fn decode(&self, items: &[Item], buf: &mut [u8]) -> Result<()> {
        let mut i = 0;
        while let Some(first) = items.get(i) {
            let start = first.host;
            let mut j = i + 1;
            while let (Some(prev), Some(it)) = (items.get(j - 1), items.get(j)) {
                if it.host < prev.host || it.host + self.max_read - start > MAX_SPAN {
                    break;
                }
                j += 1;
            }
            let last = items.get(j - 1).map_or(start, |l| l.host);
            let end = (last + self.max_read).min(self.file_size);
            SPAN.with_borrow_mut(|span| -> Result<()> {
                span.resize((end - start) as usize, 0);
                self.io
                    .read_exact_at(span, start)
                    .map_err(io_err("cannot read VMDK compressed grain"))?;
                for it in items.get(i..j).unwrap_or(&[]) {
                    let src = span.get((it.host - start) as usize..).unwrap_or(&[]);
                    self.decode_named(it, src, buf)?;
                }
                Ok(())
            })?;
            i = j;
        }
        Ok(())
    }

    /// Check a grain marker's fields: it names grain `grain`, and its `size` compressed bytes
    /// are possible for one grain and end inside the file.
    fn check_marker(&self, grain: u64, host: u64, lba: u64, size: u64) -> Result<()> {
        let want = grain * self.h.grain;
        if lba != want {
            return Err(corrupt!(
                "grain marker names sector {lba}, the grain table sector {want}"
            ));
        }
        if size == 0 {
            return Err(corrupt!("grain marker has size 0"));
        }
        if size > self.max_compressed {
            return Err(corrupt!(
                "compressed size {size} exceeds the most one grain can deflate to ({})",
                self.max_compressed
            ));
        }
        if host + 12 + size > self.file_size {
            return Err(corrupt!(
                "{size} compressed bytes run past the end of the file"
            ));
        }
        Ok(())
    }

    /// The compressed bytes of a grain whose marker (or data) starts `src`.
    fn payload<'a>(&self, grain: u64, host: u64, src: &'a [u8]) -> Result<&'a [u8]> {
        if !self.markers {
            let n = src.len().min((2 * self.grain_bytes) as usize);
            return Ok(src.get(..n).unwrap_or(src));
        }
        if src.len() < 12 {
            return Err(corrupt!("grain marker lies past the end of the file"));
        }
        let size = u64::from(le32(src, 8));
        self.check_marker(grain, host, le64(src, 0), size)?;
        Ok(src.get(12..12 + size as usize).unwrap_or(&[]))
    }

    /// [`Sparse::decode_one`], its error naming the grain.
    fn decode_named(&self, it: &Item, src: &[u8], buf: &mut [u8]) -> Result<()> {
        self.decode_one(it, src, buf).map_err(|e| {
            corrupt!(
                "compressed grain for sector {} at offset {:#x}{}: {}",
                it.grain * self.h.grain,
                it.host,
                self.what,
                e.message()
            )
        })
    }

    fn decode_one(&self, it: &Item, src: &[u8], buf: &mut [u8]) -> Result<()> {
        let data = self.payload(it.grain, it.host, src)?;
        let need = self.grain_len(it.grain) as usize;
        let short = |n: usize| corrupt!("grain inflates to {n} bytes, the disk needs {need}");
        let dst = &mut buf[it.at..it.at + it.len];
        if it.within == 0 && it.len as u64 == self.grain_bytes {
            let n = inflate(data, dst)?;
            if n < need {
                return Err(short(n));
            }
            return Ok(());
        }
        GRAIN.with_borrow_mut(|g| {
            g.resize(self.grain_bytes as usize, 0);
            let n = inflate(data, g)?;
            if n < need {
                return Err(short(n));
            }
            dst.copy_from_slice(&g[it.within..it.within + it.len]);
            Ok(())
        })
    }

    /// qemu-img check's walk: every grain table and entry, problems pushed to `out`.
    fn check(&self, base_sector: u64, out: &mut Vec<String>) {
        let mut marker = [0u8; 12];
        for (gi, &gte) in self.gd.iter().enumerate() {
            if gte == 0 {
                continue;
            }
            let t = match self.gt(gi) {
                Ok(t) => t,
                Err(e) => {
                    out.push(format!(
                        "ERROR: cannot read grain table {gi}{}: {e}",
                        self.what
                    ));
                    continue;
                }
            };
            for (k, &e) in t.iter().enumerate() {
                let g = gi as u64 * GTES + k as u64;
                if g >= self.grains {
                    break;
                }
                if out.len() >= MAX_MESSAGES {
                    out.push("ERROR: too many problems; the rest are not listed".into());
                    return;
                }
                let sector = base_sector + g * self.h.grain;
                match self.classify(e, self.grain_len(g)) {
                    Err(b) => out.push(format!(
                        "ERROR: cluster offset for sector {sector} {}{}",
                        b.qemu_words(),
                        self.what
                    )),
                    Ok(Grain::Compressed(h)) if self.markers => {
                        let r = self
                            .io
                            .read_at_zero_padded(&mut marker, h)
                            .map_err(io_err("cannot read grain marker"))
                            .and_then(|()| {
                                let size = u64::from(le32(&marker, 8));
                                self.check_marker(g, h, le64(&marker, 0), size)
                            });
                        if let Err(e) = r {
                            out.push(format!(
                                "ERROR: compressed grain for sector {sector} at offset \
                                 {h:#x}{}: {}",
                                self.what,
                                e.message()
                            ));
                        }
                    }
                    Ok(_) => {}
                }
            }
        }
    }
}

/// How one extent of the disk is stored.
#[derive(Debug)]
enum Kind {
    /// Raw bytes of `io` from `offset`.
    Flat {
        io: Arc<dyn BlockIo>,
        offset: u64,
    },
    Sparse(Box<Sparse>),
    /// Reads as zeros, no file.
    Zero,
    /// A file extent not opened (metadata-only open).
    NotOpened,
}

#[derive(Debug)]
struct Ext {
    /// Guest byte range.
    start: u64,
    len: u64,
    /// File name as reported (joined to the descriptor's directory).
    name: String,
    /// Extent type as qemu-img info reports it ("" for a sparse image opened directly).
    ty: &'static str,
    kind: Kind,
}

/// An open VMDK image.
#[derive(Debug)]
struct Vmdk {
    file: Arc<dyn BlockIo>,
    size: u64,
    extents: Vec<Ext>,
    cid: u32,
    parent_cid: u32,
    create_type: String,
}

/// The header keys and extent lines of a descriptor.
#[derive(Debug, Default)]
struct Descriptor {
    version: Option<String>,
    cid: Option<String>,
    parent_cid: Option<String>,
    create_type: Option<String>,
    parent_hint: Option<String>,
    extents: Vec<Line>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineType {
    Flat,
    Vmfs,
    Sparse,
    Zero,
}

/// One extent line: `ACCESS SECTORS TYPE ["FILE" [OFFSET]]`.
#[derive(Debug)]
struct Line {
    sectors: u64,
    ty: LineType,
    file: Option<String>,
    /// Start in the file, in sectors (FLAT).
    offset: u64,
}

fn short(line: &str) -> String {
    line.chars().take(100).collect()
}

fn word(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.find(char::is_whitespace) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, ""),
    }
}

impl Line {
    fn parse(line: &str) -> Result<Line> {
        let bad = |why: &str| corrupt!("invalid extent line '{}': {why}", short(line));
        let (access, rest) = word(line);
        let (sectors, rest) = word(rest);
        let (ty, rest) = word(rest);
        let sectors: u64 = sectors
            .parse()
            .map_err(|_| bad("the sector count is not a number"))?;
        let rest = rest.trim_start();
        let (file, rest) = match rest.strip_prefix('"') {
            Some(r) => {
                let end = r.find('"').ok_or_else(|| bad("unterminated file name"))?;
                (Some(r[..end].to_string()), &r[end + 1..])
            }
            None => (None, rest),
        };
        let (off, tail) = word(rest);
        if !tail.trim().is_empty() {
            return Err(bad("unexpected text after the offset"));
        }
        let offset = if off.is_empty() {
            None
        } else {
            Some(
                off.parse::<u64>()
                    .map_err(|_| bad("the offset is not a number"))?,
            )
        };
        match access {
            "RW" | "RDONLY" => {}
            "NOACCESS" => {
                return Err(unsupported(format!(
                    "NOACCESS extents are not supported: '{}'",
                    short(line)
                )));
            }
            _ => return Err(bad("unknown access mode")),
        }
        let ty = match ty {
            "FLAT" => LineType::Flat,
            "VMFS" => LineType::Vmfs,
            "SPARSE" => LineType::Sparse,
            "ZERO" => LineType::Zero,
            "VMFSSPARSE" | "SESPARSE" | "VMFSRDM" | "VMFSRAW" => {
                return Err(unsupported(format!(
                    "{ty} extents are not supported: '{}'",
                    short(line)
                )));
            }
            _ => return Err(bad("unknown extent type")),
        };
        if sectors == 0 {
            return Err(bad("the extent is empty"));
        }
        if file
            .as_deref()
            .is_some_and(|f| f.contains(char::REPLACEMENT_CHARACTER))
        {
            return Err(bad("the file name is not UTF-8"));
        }
        match (ty, &file, offset) {
            (LineType::Flat, Some(_), Some(_)) => {}
            (LineType::Flat, _, _) => return Err(bad("FLAT needs a file name and an offset")),
            (LineType::Vmfs | LineType::Sparse, Some(_), None) => {}
            (LineType::Vmfs | LineType::Sparse, _, _) => {
                return Err(bad("needs a file name and no offset"));
            }
            (LineType::Zero, None, None) => {}
            (LineType::Zero, _, _) => return Err(bad("ZERO takes no file name or offset")),
        }
        Ok(Line {
            sectors,
            ty,
            file,
            offset: offset.unwrap_or(0),
        })
    }
}

impl Descriptor {
    /// Parse descriptor text. `strict` (a descriptor file): every line must be a comment, a
    /// `key = value` pair or an extent line. Otherwise (embedded in a sparse extent) extent
    /// lines and anything unrecognised are ignored, as qemu does.
    fn parse(text: &str, strict: bool) -> Result<Descriptor> {
        let mut d = Descriptor::default();
        for raw in text.split('\n') {
            let line = raw.strip_suffix('\r').unwrap_or(raw).trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (first, _) = word(line);
            if matches!(first, "RW" | "RDONLY" | "NOACCESS") {
                if strict {
                    if d.extents.len() >= MAX_EXTENTS {
                        return Err(too_large(format!(
                            "descriptor has more than {MAX_EXTENTS} extents"
                        )));
                    }
                    d.extents.push(Line::parse(line)?);
                }
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                if strict {
                    return Err(corrupt!("invalid descriptor line '{}'", short(line)));
                }
                continue;
            };
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v)
                .to_string();
            let slot = match k.trim() {
                "version" => &mut d.version,
                "CID" => &mut d.cid,
                "parentCID" => &mut d.parent_cid,
                "createType" => &mut d.create_type,
                "parentFileNameHint" => &mut d.parent_hint,
                _ => continue,
            };
            if slot.is_none() {
                *slot = Some(v);
            }
        }
        Ok(d)
    }

    fn cid(v: &Option<String>, key: &str) -> Result<u32> {
        let v = v
            .as_deref()
            .ok_or_else(|| corrupt!("VMDK descriptor has no {key}"))?;
        let hex = v.strip_prefix("0x").unwrap_or(v);
        u32::from_str_radix(hex, 16).map_err(|_| corrupt!("VMDK descriptor {key} '{v}' is not hex"))
    }

    /// CID and parent CID; a parent of any kind is refused.
    fn ids(&self) -> Result<(u32, u32)> {
        let cid = Self::cid(&self.cid, "CID")?;
        let parent = Self::cid(&self.parent_cid, "parentCID")?;
        if parent != u32::MAX || self.parent_hint.is_some() {
            return Err(unsupported(format!(
                "VMDK image is a delta of a parent (parentCID={parent:08x}{}); images with \
                 parents are not supported",
                self.parent_hint
                    .as_deref()
                    .map(|h| format!(", parentFileNameHint=\"{h}\""))
                    .unwrap_or_default()
            )));
        }
        Ok((cid, parent))
    }
}

/// Whether qemu would take `name` for a protocol (`nbd:`, `file:`, `http://`): a colon before
/// any slash.
fn has_protocol(name: &str) -> bool {
    name.find([':', '/'])
        .is_some_and(|i| name[i..].starts_with(':'))
}

/// The rules for a file name stored in a descriptor: plain, relative, no `..`.
fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.contains('\0') {
        return Err(corrupt!("VMDK extent file name is empty or contains NUL"));
    }
    if has_protocol(name) {
        return Err(denied(format!(
            "VMDK extent file name '{name}' is a protocol name, not a plain local file name"
        )));
    }
    let p = Path::new(name);
    if p.is_absolute() {
        return Err(denied(format!(
            "VMDK extent file name '{name}' is absolute; only names relative to the \
             descriptor's directory are opened"
        )));
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(denied(format!(
            "VMDK extent file name '{name}' contains '..'; only names beneath the \
             descriptor's directory are opened"
        )));
    }
    Ok(())
}

/// Open extent file `name` beneath `dir`: no symbolic link on the way, a regular file, not
/// one already seen (`seen` holds device and inode numbers, the descriptor's first).
fn open_beneath(dir: &Path, name: &str, seen: &mut Vec<(u64, u64)>) -> Result<FileIo> {
    use std::os::unix::fs::MetadataExt;
    let mut p = dir.to_path_buf();
    for c in Path::new(name).components() {
        match c {
            Component::Normal(s) => p.push(s),
            Component::CurDir => continue,
            _ => {
                return Err(denied(format!(
                    "VMDK extent file name '{name}' is not plain"
                )));
            }
        }
        let m = std::fs::symlink_metadata(&p)
            .map_err(|e| Error::io("cannot open VMDK extent file", e).with_path(&p))?;
        if m.file_type().is_symlink() {
            return Err(denied(format!(
                "VMDK extent file '{name}' goes through the symbolic link '{}'",
                p.display()
            )));
        }
    }
    let io =
        FileIo::open(&p).map_err(|e| Error::io("cannot open VMDK extent file", e).with_path(&p))?;
    let m = io
        .file()
        .metadata()
        .map_err(|e| Error::io("cannot stat VMDK extent file", e).with_path(&p))?;
    if !m.is_file() {
        return Err(denied(format!(
            "VMDK extent file '{name}' is not a regular file"
        )));
    }
    let id = (m.dev(), m.ino());
    if let Some(i) = seen.iter().position(|&s| s == id) {
        return Err(denied(if i == 0 {
            format!("VMDK extent file '{name}' is the descriptor itself")
        } else {
            format!("VMDK extent file '{name}' is named twice")
        }));
    }
    seen.push(id);
    Ok(io)
}

/// Open a VMDK image held by `io`.
pub fn open(io: Arc<dyn BlockIo>, ctx: &DriverContext<'_>) -> Result<Box<dyn Driver>> {
    let size = io.size().map_err(io_err("cannot stat image"))?;
    let mut head = vec![0u8; 4096.min(size) as usize];
    io.read_exact_at(&mut head, 0)
        .map_err(io_err("cannot read image"))?;
    let v = if head.starts_with(b"KDMV") {
        open_kdmv(io, ctx)?
    } else if head.starts_with(b"COWD") {
        return Err(unsupported(
            "ESX COWD (vmfsSparse) sparse extents are not supported",
        ));
    } else if is_descriptor_text(&head) {
        if size > MAX_DESCRIPTOR {
            return Err(too_large(format!(
                "VMDK descriptor file of {size} bytes exceeds the limit of {MAX_DESCRIPTOR}"
            )));
        }
        let mut text = vec![0u8; size as usize];
        io.read_exact_at(&mut text, 0)
            .map_err(io_err("cannot read VMDK descriptor"))?;
        open_descriptor(io, &text, ctx)?
    } else {
        return Err(Error::new(
            ErrorKind::UnsupportedFormat,
            "not a VMDK image: no KDMV magic and no descriptor",
        ));
    };
    Ok(Box::new(v))
}

/// A descriptor: the banner qemu writes (what format detection looks for), or qemu's probe:
/// comment and blank lines, then `version=1|2|3`.
fn is_descriptor_text(head: &[u8]) -> bool {
    if head.starts_with(b"# Disk DescriptorFile") {
        return true;
    }
    for line in head.split(|&c| c == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() || line.starts_with(b"#") {
            continue;
        }
        return matches!(line, b"version=1" | b"version=2" | b"version=3");
    }
    false
}

fn display_name(ctx: &DriverContext<'_>) -> String {
    ctx.path
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn open_kdmv(io: Arc<dyn BlockIo>, ctx: &DriverContext<'_>) -> Result<Vmdk> {
    let mut sec = [0u8; SECTOR as usize];
    io.read_at_zero_padded(&mut sec, 0)
        .map_err(io_err("cannot read VMDK header"))?;
    if let Some(h) = Header::parse(&sec) {
        // Capacity 0 with a descriptor: qemu reads the embedded descriptor as a descriptor
        // file (extents and all), the CVE-2022-47951 vector; it gets the same rules here.
        if h.capacity == 0 && h.desc_offset != 0 {
            let size = io.size().map_err(io_err("cannot stat image"))?;
            let at = h.desc_offset.checked_mul(SECTOR).filter(|&a| a < size);
            let Some(at) = at else {
                return Err(corrupt!(
                    "embedded descriptor lies past the end of the file"
                ));
            };
            let n = (size - at).min(MAX_DESCRIPTOR) as usize;
            let mut text = vec![0u8; n];
            io.read_exact_at(&mut text, at)
                .map_err(io_err("cannot read VMDK descriptor"))?;
            let end = text.iter().position(|&c| c == 0).unwrap_or(n);
            text.truncate(end);
            return open_descriptor(io, &text, ctx);
        }
    }
    let s = Sparse::open(io.clone(), "")?;
    let (cid, parent_cid) = sparse_ids(&s, io.as_ref())?;
    let create_type = if s.compressed {
        "streamOptimized"
    } else {
        "monolithicSparse"
    };
    let size = s.size;
    Ok(Vmdk {
        file: io,
        size,
        extents: vec![Ext {
            start: 0,
            len: size,
            name: display_name(ctx),
            ty: "",
            kind: Kind::Sparse(Box::new(s)),
        }],
        cid,
        parent_cid,
        create_type: create_type.to_string(),
    })
}

/// The CID and parent CID of a sparse image's embedded descriptor, read through `src`
/// (images with a parent are refused).
fn sparse_ids(s: &Sparse, src: &dyn BlockIo) -> Result<(u32, u32)> {
    descriptor_ids(s.embedded_descriptor_in(src)?)
}

/// The CID and parent CID in an embedded descriptor's `text`.
fn descriptor_ids(text: Option<String>) -> Result<(u32, u32)> {
    let text =
        text.ok_or_else(|| corrupt!("VMDK sparse image has no embedded descriptor (no CID)"))?;
    Descriptor::parse(&text, false)?.ids()
}

/// The embedded descriptor of the sparse extent with header `h` (validated) in `src`.
fn embedded_descriptor(src: &dyn BlockIo, h: &Header) -> Result<Option<String>> {
    if h.desc_offset == 0 || h.desc_size == 0 {
        return Ok(None);
    }
    let mut b = vec![0u8; (h.desc_size * SECTOR) as usize];
    src.read_exact_at(&mut b, h.desc_offset * SECTOR)
        .map_err(io_err("cannot read VMDK descriptor"))?;
    let n = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    b.truncate(n);
    Ok(Some(String::from_utf8_lossy(&b).into_owned()))
}

fn open_descriptor(io: Arc<dyn BlockIo>, text: &[u8], ctx: &DriverContext<'_>) -> Result<Vmdk> {
    // qemu pads a descriptor it rewrites with NULs to a whole sector: the text ends at the
    // first NUL, and only NULs may follow.
    let end = text.iter().position(|&c| c == 0).unwrap_or(text.len());
    let (text, pad) = text.split_at(end);
    if pad.iter().any(|&c| c != 0) {
        return Err(corrupt!(
            "VMDK descriptor contains NUL bytes within its text"
        ));
    }
    // Descriptors may say `encoding="windows-1252"`: bytes that are not UTF-8 are replaced,
    // and an extent file name holding a replacement is refused.
    let text = String::from_utf8_lossy(text);
    let text = text.as_ref();
    let d = Descriptor::parse(text, true)?;
    if let Some(v) = &d.version {
        if !matches!(v.as_str(), "1" | "2" | "3") {
            return Err(unsupported(format!(
                "VMDK descriptor version {v} is not supported"
            )));
        }
    }
    let ct = d
        .create_type
        .clone()
        .ok_or_else(|| corrupt!("invalid VMDK image descriptor: no createType"))?;
    match ct.as_str() {
        "monolithicFlat" | "vmfs" | "twoGbMaxExtentSparse" | "twoGbMaxExtentFlat" => {}
        "vmfsSparse" | "seSparse" => {
            return Err(unsupported(format!(
                "VMDK create type '{ct}' (a snapshot delta) is not supported"
            )));
        }
        _ => return Err(unsupported(format!("unsupported VMDK create type '{ct}'"))),
    }
    let (cid, parent_cid) = d.ids()?;
    if d.extents.is_empty() {
        return Err(corrupt!("VMDK descriptor has no extents"));
    }
    let total = d
        .extents
        .iter()
        .try_fold(0u64, |t, l| t.checked_add(l.sectors))
        .filter(|&t| t <= MAX_CAPACITY)
        .ok_or_else(|| {
            too_large(format!(
                "VMDK descriptor's extents exceed the limit of {MAX_CAPACITY} sectors"
            ))
        })?;
    let files = || d.extents.iter().filter_map(|l| l.file.as_deref());
    let open_files = !ctx.metadata_only;
    if ctx.policy == Policy::Untrusted && open_files {
        if let Some(name) = files().next() {
            return Err(denied(format!(
                "VMDK descriptor names extent file '{name}', which untrusted input may not \
                 make us open"
            )));
        }
    }
    for name in files() {
        check_name(name)?;
    }
    let dir = ctx
        .path
        .map(|p| p.parent().unwrap_or(Path::new("")).to_path_buf());
    let shown = |name: &str| -> String {
        match &dir {
            Some(dir) => dir.join(name).display().to_string(),
            None => name.to_string(),
        }
    };
    let mut seen = Vec::new();
    if open_files && files().next().is_some() {
        use std::os::unix::fs::MetadataExt;
        let Some(p) = ctx.path else {
            return Err(denied(format!(
                "VMDK extent file '{}' cannot be resolved for an image without a path",
                files().next().unwrap_or_default()
            )));
        };
        let m = std::fs::metadata(p).map_err(|e| Error::io("cannot stat image", e))?;
        seen.push((m.dev(), m.ino()));
    }
    let mut extents = Vec::with_capacity(d.extents.len());
    let mut start = 0u64;
    for l in &d.extents {
        let len = l.sectors * SECTOR;
        let name = l.file.as_deref().unwrap_or("");
        let (ty, kind) = match l.ty {
            LineType::Zero => ("ZERO", Kind::Zero),
            t if !open_files => (type_name(t), Kind::NotOpened),
            t => {
                let dir: PathBuf = dir.clone().unwrap_or_default();
                let f = open_beneath(&dir, name, &mut seen)?;
                let f: Arc<dyn BlockIo> = Arc::new(f);
                let kind = if t == LineType::Sparse {
                    let s = Sparse::open(f, &shown(name))?;
                    if s.h.capacity != l.sectors {
                        return Err(corrupt!(
                            "VMDK sparse extent '{name}' holds {} sectors, the descriptor \
                             says {}",
                            s.h.capacity,
                            l.sectors
                        ));
                    }
                    Kind::Sparse(Box::new(s))
                } else {
                    let fsize = f.size().map_err(io_err("cannot stat VMDK extent file"))?;
                    let need = l
                        .offset
                        .checked_mul(SECTOR)
                        .and_then(|o| o.checked_add(len));
                    if need.is_none_or(|n| n > fsize) {
                        return Err(corrupt!(
                            "VMDK extent file '{name}' has {fsize} bytes, too few for \
                             {} sectors from sector {}",
                            l.sectors,
                            l.offset
                        ));
                    }
                    Kind::Flat {
                        io: f,
                        offset: l.offset * SECTOR,
                    }
                };
                (type_name(t), kind)
            }
        };
        extents.push(Ext {
            start,
            len,
            name: if l.file.is_some() {
                shown(name)
            } else {
                String::new()
            },
            ty,
            kind,
        });
        start += len;
    }
    Ok(Vmdk {
        file: io,
        size: total * SECTOR,
        extents,
        cid,
        parent_cid,
        create_type: ct,
    })
}

fn type_name(t: LineType) -> &'static str {
    match t {
        LineType::Flat => "FLAT",
        LineType::Vmfs => "VMFS",
        LineType::Sparse => "SPARSE",
        LineType::Zero => "ZERO",
    }
}

/// Block status of a flat extent: data everywhere, holes of the file read as zeros (qemu
/// asks the file, as it does for raw).
fn flat_status(io: &dyn BlockIo, at: u64, len: u64) -> Result<Extent> {
    let e = |len, zero| Extent {
        len,
        present: true,
        zero,
        data: true,
        offset: Some(at),
        ..Extent::default()
    };
    Ok(
        match io
            .next_data(at)
            .map_err(io_err("cannot find data extents"))?
        {
            Some(r) if r.start > at => e(len.min(r.start - at), true),
            Some(r) if r.end > at => e(len.min(r.end - at), false),
            Some(_) => e(len, false),
            None => e(len, true),
        },
    )
}

impl Vmdk {
    fn find(&self, off: u64) -> Result<&Ext> {
        let i = self.extents.partition_point(|e| e.start + e.len <= off);
        self.extents
            .get(i)
            .ok_or_else(|| Error::invalid(format!("offset {off} is past the end of the image")))
    }

    fn not_opened(e: &Ext) -> Error {
        Error::invalid(format!(
            "VMDK extent file '{}' is not open: the image was opened for metadata only",
            e.name
        ))
    }
}

impl Driver for Vmdk {
    fn format(&self) -> Format {
        Format::Vmdk
    }

    fn file(&self) -> &Arc<dyn BlockIo> {
        &self.file
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn extent(&self, offset: u64, max: u64) -> Result<Extent> {
        let e = self.find(offset)?;
        let rel = offset - e.start;
        let max = max.min(e.len - rel);
        if max == 0 {
            return Err(Error::invalid("empty block status request"));
        }
        match &e.kind {
            Kind::Flat { io, offset } => flat_status(io.as_ref(), offset + rel, max),
            Kind::Sparse(s) => s.status(rel, max),
            Kind::Zero => Ok(Extent {
                len: max,
                present: true,
                zero: true,
                ..Extent::default()
            }),
            Kind::NotOpened => Err(Self::not_opened(e)),
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let e = self.find(pos)?;
            let rel = pos - e.start;
            let n = (e.len - rel).min((buf.len() - done) as u64) as usize;
            let part = &mut buf[done..done + n];
            match &e.kind {
                Kind::Flat { io, offset } => io
                    .read_at_zero_padded(part, offset + rel)
                    .map_err(io_err("cannot read VMDK flat extent"))?,
                Kind::Sparse(s) => s.read(part, rel)?,
                Kind::Zero => part.fill(0),
                Kind::NotOpened => return Err(Self::not_opened(e)),
            }
            done += n;
        }
        Ok(())
    }

    fn cluster_size(&self) -> Option<u64> {
        let mut grain = None;
        for e in &self.extents {
            match (&e.kind, grain) {
                (Kind::Sparse(s), None) => grain = Some(s.grain_bytes),
                (Kind::Sparse(s), Some(g)) if s.grain_bytes == g => {}
                _ => return None,
            }
        }
        grain
    }

    fn format_specific(&self) -> Option<Value> {
        let extents: Vec<Value> = self
            .extents
            .iter()
            .map(|e| {
                let mut m = serde_json::Map::new();
                m.insert("virtual-size".into(), json!(e.len));
                if !matches!(e.kind, Kind::Zero) {
                    m.insert("filename".into(), json!(e.name));
                }
                if let Kind::Sparse(s) = &e.kind {
                    m.insert("cluster-size".into(), json!(s.grain_bytes));
                    if s.compressed {
                        m.insert("compressed".into(), json!(true));
                    }
                }
                m.insert("format".into(), json!(e.ty));
                Value::Object(m)
            })
            .collect();
        Some(json!({
            "type": "vmdk",
            "data": {
                "cid": self.cid,
                "parent-cid": self.parent_cid,
                "create-type": self.create_type,
                "extents": extents,
            }
        }))
    }

    fn check(&self) -> Option<Vec<String>> {
        let mut out = Vec::new();
        for e in &self.extents {
            match &e.kind {
                Kind::Sparse(s) => s.check(e.start / SECTOR, &mut out),
                Kind::Flat { io, offset } => match io.size() {
                    Ok(n) if n >= offset + e.len => {}
                    Ok(n) => out.push(format!(
                        "ERROR: extent file '{}' has {n} bytes, its extent ends at {}",
                        e.name,
                        offset + e.len
                    )),
                    Err(err) => out.push(format!(
                        "ERROR: cannot stat extent file '{}': {err}",
                        e.name
                    )),
                },
                Kind::Zero => {}
                Kind::NotOpened => out.push(format!(
                    "ERROR: extent file '{}' was not opened (metadata only)",
                    e.name
                )),
            }
            if out.len() >= MAX_MESSAGES {
                break;
            }
        }
        Some(out)
    }
}

/// The streaming strategy (see [`crate::forward`]) for a sparse image whose grain tables come
/// before its grains (what qemu writes, streamOptimized included), over the same parse and
/// checks as the file reader: every grain table is read from the stream's head, then grains
/// in file order. `Ok(None)` (spool and open as a file) for descriptors, a directory found
/// through the footer, compressed grains without markers and grains overlapping each other.
pub(crate) fn forward(head: &HeadIo<'_, '_>) -> Result<Option<Box<dyn Forward>>> {
    let mut sec = [0u8; SECTOR as usize];
    head.read_exact_at(&mut sec, 0)
        .map_err(io_err("cannot read VMDK header"))?;
    let Some(h) = Header::parse(&sec) else {
        return Ok(None);
    };
    if h.capacity == 0 {
        return Ok(None);
    }
    if h.gd_offset == GD_AT_END {
        return Ok(FooterForward::open(head, h)?.map(|f| Box::new(f) as Box<dyn Forward>));
    }
    let placeholder: Arc<dyn BlockIo> = Arc::new(crate::io::MemIo::default());
    let s = Sparse::open_from(head, placeholder, UNKNOWN_LEN, "")?;
    if s.compressed && !s.markers {
        return Ok(None);
    }
    // The tables must be in the stream before the descriptor is judged (the file reader
    // checks them against the file first); the head keeps them, so the second pass reads
    // them from memory one at a time.
    let mut raw = vec![0u8; GT_BYTES as usize];
    for &e in s.gd.iter().filter(|&&e| e != 0) {
        head.read_exact_at(&mut raw, u64::from(e) * SECTOR)
            .map_err(io_err("cannot read VMDK grain table"))?;
    }
    sparse_ids(&s, head)?;
    // Every allocated grain, (host, grain), by host.
    let mut units: Vec<(u64, u64)> = Vec::new();
    for (gi, &e) in s.gd.iter().enumerate() {
        if e == 0 {
            continue;
        }
        head.read_exact_at(&mut raw, u64::from(e) * SECTOR)
            .map_err(io_err("cannot read VMDK grain table"))?;
        for k in 0..GTES {
            let g = gi as u64 * GTES + k;
            if g >= s.grains {
                break;
            }
            match s.classify(le32(&raw, 4 * k as usize), s.grain_len(g)) {
                Ok(Grain::Data(host) | Grain::Compressed(host)) => units.push((host, g)),
                Ok(_) => {}
                Err(b) => return Err(s.bad(g, b)),
            }
        }
    }
    units.sort_unstable();
    if !s.compressed {
        // Data grains are read where they lie: two that overlap (without being the same)
        // cannot be read front to back.
        let clash = units
            .windows(2)
            .any(|w| w[0].0 != w[1].0 && w[1].0 < w[0].0 + s.grain_bytes);
        if clash {
            return Ok(None);
        }
    }
    let window = if s.compressed {
        (s.max_read as usize) + crate::forward::PIECE
    } else {
        0
    };
    Ok(Some(Box::new(SparseForward {
        s,
        units,
        next: 0,
        cur: 0..0,
        window: Vec::with_capacity(window),
        win_start: 0,
        grain: Vec::new(),
    })))
}

/// [`forward`]'s reader.
struct SparseForward {
    s: Sparse,
    units: Vec<(u64, u64)>,
    /// The first unit not yet wanted (data) or decoded (compressed).
    next: usize,
    /// Data grains: the units sharing the host range being read.
    cur: std::ops::Range<usize>,
    /// Compressed grains: the file's bytes from `win_start`, kept until every grain starting
    /// in them is decoded (each sees what the file reader reads: up to `max_read` bytes).
    window: Vec<u8>,
    win_start: u64,
    grain: Vec<u8>,
}

impl SparseForward {
    /// Decode the compressed grains whose bytes the window holds (all of them at the end).
    fn decode_ready(&mut self, at_end: bool, out: &dyn Target) -> Result<()> {
        let win_end = self.win_start + self.window.len() as u64;
        while let Some(&(host, g)) = self.units.get(self.next) {
            if host >= win_end && !at_end {
                break;
            }
            let want_end = host + self.s.max_read;
            if want_end > win_end && !at_end {
                break;
            }
            let from = host.saturating_sub(self.win_start) as usize;
            let to = (want_end.min(win_end).saturating_sub(self.win_start) as usize).max(from);
            let src = self.window.get(from..to).unwrap_or(&[]);
            let len = self.s.grain_len(g) as usize;
            self.grain.resize(len, 0);
            let it = Item {
                at: 0,
                grain: g,
                host,
                within: 0,
                len,
            };
            self.s.decode_named(&it, src, &mut self.grain)?;
            out.write(g * self.s.grain_bytes, &self.grain)?;
            self.next += 1;
        }
        // Keep only what later grains may need.
        let keep_from = self
            .units
            .get(self.next)
            .map_or(win_end, |&(h, _)| h.min(win_end));
        let cut = (keep_from - self.win_start) as usize;
        self.window.drain(..cut);
        self.win_start = keep_from;
        Ok(())
    }
}

impl Forward for SparseForward {
    fn virtual_size(&self) -> u64 {
        self.s.size
    }

    fn held(&self) -> u64 {
        (self.units.capacity() * 16 + self.window.capacity() + self.s.gd.len() * 4) as u64
    }

    fn want(&mut self) -> Result<Option<(u64, u64)>> {
        let Some(&(host, _)) = self.units.get(self.next) else {
            return Ok(None);
        };
        if self.s.compressed {
            let win_end = self.win_start + self.window.len() as u64;
            if self.window.is_empty() || host > win_end {
                self.window.clear();
                self.win_start = host;
            }
            let from = self.win_start + self.window.len() as u64;
            return Ok(Some((from, crate::forward::PIECE as u64)));
        }
        self.cur = crate::forward::same_key(&self.units, self.next);
        self.next = self.cur.end;
        Ok(Some((host, self.s.grain_bytes)))
    }

    fn take(&mut self, at: u64, bytes: &[u8], out: &dyn Target) -> Result<()> {
        if self.s.compressed {
            self.window.extend_from_slice(bytes);
            return self.decode_ready(false, out);
        }
        let host = self.units[self.cur.start].0;
        let rel = at - host;
        for &(_, g) in &self.units[self.cur.clone()] {
            let len = self.s.grain_len(g);
            if rel < len {
                let n = (bytes.len() as u64).min(len - rel) as usize;
                out.write(g * self.s.grain_bytes + rel, &bytes[..n])?;
            }
        }
        Ok(())
    }

    fn finish(&mut self, len: u64, _tail: &[u8], out: &dyn Target) -> Result<()> {
        // The file reader's checks, on the stream's length.
        let (meta, _, _) = Sparse::layout(&self.s.h, len, &self.s.what)?;
        Sparse::check_tables(&self.s.gd, len, &meta, &self.s.what)?;
        self.s.file_size = len;
        for &(host, g) in &self.units {
            let e = u32::try_from(host / SECTOR).unwrap_or(u32::MAX);
            self.s
                .classify(e, self.s.grain_len(g))
                .map_err(|b| self.s.bad(g, b))?;
        }
        if self.s.compressed {
            self.decode_ready(true, out)?;
        } else {
            let s = &self.s;
            crate::forward::zero_cut_short(
                &self.units[self.cur.start..],
                len,
                s.grain_bytes,
                |g| s.grain_len(g),
                out,
            )?;
        }
        let held = self.units.iter().map(|&(_, g)| g);
        crate::forward::zero_absent(held, self.s.grain_bytes, self.s.size, out)
    }
}

/// How a grain met in a stream with its directory at the end turned out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Met {
    /// Inflated to a whole grain and written at its marker's sector.
    Written,
    /// Not written: its marker names no grain of the disk.
    Outside,
    /// Not written: larger than one grain can deflate to.
    Oversized,
    /// Not written: the deflate stream is invalid or inflates to the wrong size.
    Undecodable,
}

/// A grain marker met in the stream.
#[derive(Debug, Clone, Copy)]
struct Rec {
    host: u64,
    lba: u64,
    size: u32,
    met: Met,
}

/// What the stream expects next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Marker,
    /// The rest of a compressed grain whose marker sector is in `buf`.
    Grain {
        size: u32,
    },
    /// The sectors of a grain table (1), directory (2) or footer (3) marker.
    Meta {
        ty: u32,
        sectors: u64,
    },
}

/// The streaming strategy for a streamOptimized image whose grain directory is found through
/// the footer (what VMware writes, OVA disks): grains are written at their markers' sectors as
/// they come, tables and directory are kept as met, and at the end the file reader's view
/// (footer, directory, tables, every entry's grain and marker) decides what the disk holds:
/// grains no table names become zeros, and a table naming anything but a grain the stream
/// met, or an earlier of two grains for one sector, is refused.
struct FooterForward {
    h: Header,
    grain_bytes: u64,
    size: u64,
    max_compressed: u64,
    /// Most bytes of records and tables kept (the memory budget).
    cap: u64,
    kept: u64,
    pos: u64,
    expect: Expect,
    buf: Vec<u8>,
    grain: Vec<u8>,
    recs: Vec<Rec>,
    /// For each sector, the last grain written there (index in `recs`).
    last: HashMap<u64, u32>,
    /// Grain tables and directories met, by the sector their data starts at.
    tables: HashMap<u64, Vec<u32>>,
    /// The embedded descriptor as read from the head, judged at the end (as the file reader
    /// judges it after the footer and tables).
    desc: Option<Result<Option<String>>>,
}

impl FooterForward {
    /// `None` (spool) when the header would not pass the file reader's checks: which error
    /// the file gives then depends on the footer, known only at the end.
    fn open(head: &HeadIo<'_, '_>, h: Header) -> Result<Option<FooterForward>> {
        let probe = Header {
            gd_offset: UNKNOWN_LEN / SECTOR / 2,
            ..h
        };
        if Sparse::layout(&probe, UNKNOWN_LEN, "").is_err()
            || h.compress != 1
            || h.flags & FLAG_MARKER == 0
            || h.overhead == 0
        {
            return Ok(None);
        }
        let grain_bytes = h.grain * SECTOR;
        let desc = Some(embedded_descriptor(head, &h));
        Ok(Some(FooterForward {
            desc,
            h,
            grain_bytes,
            size: h.capacity * SECTOR,
            max_compressed: deflate_bound(grain_bytes),
            cap: head.budget_left(),
            kept: 0,
            pos: h.overhead * SECTOR,
            expect: Expect::Marker,
            buf: Vec::new(),
            grain: vec![0u8; grain_bytes as usize],
            recs: Vec::new(),
            last: HashMap::new(),
            tables: HashMap::new(),
        }))
    }

    fn keep(&mut self, n: u64) -> Result<()> {
        self.kept += n;
        if self.kept > self.cap {
            return Err(too_large(format!(
                "the stream's grain records and tables exceed the memory budget of {} bytes",
                self.cap
            )));
        }
        Ok(())
    }

    /// A grain whose compressed bytes are `data`, marker at `host`.
    fn grain(&mut self, host: u64, lba: u64, size: u32, out: &dyn Target) -> Result<()> {
        let data = self.buf.get(12..12 + size as usize).unwrap_or(&[]);
        let met = if lba % self.h.grain != 0 || lba >= self.h.capacity {
            Met::Outside
        } else if u64::from(size) > self.max_compressed || data.len() < size as usize {
            Met::Oversized
        } else {
            let need = self.grain_bytes.min(self.size - lba * SECTOR) as usize;
            match inflate(data, &mut self.grain) {
                Ok(n) if n >= need => {
                    out.write(lba * SECTOR, &self.grain[..need])?;
                    Met::Written
                }
                _ => Met::Undecodable,
            }
        };
        if met == Met::Written {
            self.last.insert(lba, self.recs.len() as u32);
        }
        self.recs.push(Rec {
            host,
            lba,
            size,
            met,
        });
        self.keep(48)
    }

    /// The structure in `buf` (starting at `pos`) is complete.
    fn complete(&mut self, out: &dyn Target) -> Result<()> {
        match self.expect {
            Expect::Marker => {
                let (val, size, ty) = (le64(&self.buf, 0), le32(&self.buf, 8), le32(&self.buf, 12));
                if size != 0 {
                    let total = (12 + u64::from(size)).next_multiple_of(SECTOR);
                    if total == SECTOR {
                        self.grain(self.pos, val, size, out)?;
                        self.pos += SECTOR;
                        self.buf.clear();
                    } else {
                        self.expect = Expect::Grain { size };
                    }
                    return Ok(());
                }
                self.buf.clear();
                // A table, directory and footer are as long as the header makes them (what
                // the file reader reads), whatever the marker says; an end-of-stream marker
                // (or a zero sector of padding) is stepped over: the footer is found at the
                // stream's end, as in a file.
                let gd_sectors =
                    (self.h.capacity.div_ceil(self.h.grain).div_ceil(GTES) * 4).div_ceil(SECTOR);
                self.expect = match ty {
                    MARKER_EOS => {
                        self.pos += SECTOR;
                        Expect::Marker
                    }
                    1 => Expect::Meta {
                        ty,
                        sectors: GT_BYTES / SECTOR,
                    },
                    2 => Expect::Meta {
                        ty,
                        sectors: gd_sectors,
                    },
                    MARKER_FOOTER => Expect::Meta { ty, sectors: 1 },
                    t => {
                        return Err(corrupt!(
                            "marker of unknown type {t} at offset {:#x}: the stream cannot be \
                             read front to back",
                            self.pos
                        ));
                    }
                };
            }
            Expect::Grain { size } => {
                let host = self.pos;
                let lba = le64(&self.buf, 0);
                self.grain(host, lba, size, out)?;
                self.pos += (12 + u64::from(size)).next_multiple_of(SECTOR);
                self.buf.clear();
                self.expect = Expect::Marker;
            }
            Expect::Meta { ty, sectors } => {
                let data_at = self.pos / SECTOR + 1;
                if ty != MARKER_FOOTER && !self.buf.is_empty() {
                    let t: Vec<u32> = self.buf.chunks_exact(4).map(|c| le32(c, 0)).collect();
                    self.keep(self.buf.len() as u64 + 64)?;
                    self.tables.insert(data_at, t);
                }
                self.pos += (1 + sectors) * SECTOR;
                self.buf.clear();
                self.expect = Expect::Marker;
            }
        }
        Ok(())
    }

    /// Bytes of the structure being read that are kept (the rest of a long one is skipped).
    fn kept_len(&self) -> u64 {
        match self.expect {
            Expect::Marker => SECTOR,
            Expect::Grain { size } => (12 + u64::from(size)).min(12 + self.max_compressed),
            Expect::Meta {
                ty: MARKER_FOOTER, ..
            } => 0,
            Expect::Meta { sectors, .. } => sectors * SECTOR,
        }
    }

    fn bad_grain(&self, g: u64, r: &Rec, why: &str) -> Error {
        corrupt!(
            "compressed grain for sector {} at offset {:#x}: {why}",
            g * self.h.grain,
            r.host
        )
    }
}

impl Forward for FooterForward {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn want(&mut self) -> Result<Option<(u64, u64)>> {
        Ok(match self.expect {
            Expect::Marker => Some((self.pos, SECTOR)),
            Expect::Grain { size } => {
                let total = (12 + u64::from(size)).next_multiple_of(SECTOR);
                Some((self.pos + SECTOR, total - SECTOR))
            }
            Expect::Meta { sectors, .. } => Some((self.pos + SECTOR, sectors * SECTOR)),
        })
    }

    fn take(&mut self, at: u64, bytes: &[u8], out: &dyn Target) -> Result<()> {
        let start = match self.expect {
            Expect::Marker => self.pos,
            Expect::Grain { .. } => self.pos,
            _ => self.pos + SECTOR,
        };
        let keep = self.kept_len();
        let rel = at - start;
        if rel < keep {
            let n = ((keep - rel) as usize).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..n]);
        }
        let end = at + bytes.len() as u64;
        let done = match self.expect {
            Expect::Marker => end >= self.pos + SECTOR,
            Expect::Grain { size } => {
                end >= self.pos + (12 + u64::from(size)).next_multiple_of(SECTOR)
            }
            Expect::Meta { sectors, .. } => end >= self.pos + (1 + sectors) * SECTOR,
        };
        if done {
            self.complete(out)?;
        }
        Ok(())
    }

    fn finish(&mut self, len: u64, tail: &[u8], out: &dyn Target) -> Result<()> {
        // The footer as the file reader finds it: the last three sectors, zero-padded.
        let end = len.div_ceil(SECTOR) * SECTOR;
        if end < 4 * SECTOR {
            return Err(corrupt!("file too short for a VMDK footer"));
        }
        let pad = (end - len) as usize;
        let take = 3 * SECTOR as usize - pad;
        let mut b = tail[tail.len().saturating_sub(take)..].to_vec();
        b.resize(3 * SECTOR as usize, 0);
        let f = Sparse::footer_in(&b, &self.h, "")?;
        let (meta, _, gd_bytes) = Sparse::layout(&f, len, "")?;
        let gd_entries = (gd_bytes / 4) as usize;
        let gd = match self.tables.get(&f.gd_offset) {
            Some(t) if t.len() >= gd_entries => t[..gd_entries].to_vec(),
            _ => {
                return Err(corrupt!(
                    "the footer's grain directory (sector {}) is not one the stream introduced \
                     with a directory marker: the stream cannot be read front to back",
                    f.gd_offset
                ));
            }
        };
        Sparse::check_tables(&gd, len, &meta, "")?;
        let placeholder: Arc<dyn BlockIo> = Arc::new(crate::io::MemIo::default());
        let s = Sparse::assemble(placeholder, String::new(), len, f, gd, meta);
        let text = self.desc.take().unwrap_or(Ok(None))?;
        descriptor_ids(text)?;
        let gb = s.grain_bytes;
        let mut pos = 0u64;
        for g in 0..s.grains {
            let gi = (g / GTES) as usize;
            let e = match s.gd[gi] {
                0 => 0,
                t => match self.tables.get(&u64::from(t)) {
                    Some(t) if t.len() >= GTES as usize => t[(g % GTES) as usize],
                    _ => {
                        return Err(corrupt!(
                            "grain table {gi} (sector {t}) is not one the stream introduced \
                             with a table marker: the stream cannot be read front to back"
                        ));
                    }
                },
            };
            let host = match s.classify(e, s.grain_len(g)).map_err(|b| s.bad(g, b))? {
                Grain::Compressed(h) => h,
                _ => continue,
            };
            let i = self.recs.partition_point(|r| r.host < host);
            let Some(r) = self.recs.get(i).filter(|r| r.host == host) else {
                return Err(corrupt!(
                    "grain table entry for sector {} points at offset {host:#x}, where the \
                     stream has no grain marker: the stream cannot be read front to back",
                    g * s.h.grain
                ));
            };
            s.check_marker(g, host, r.lba, u64::from(r.size))
                .map_err(|e| self.bad_grain(g, r, e.message()))?;
            match r.met {
                Met::Written => {}
                Met::Outside => return Err(self.bad_grain(g, r, "marker names no grain")),
                Met::Oversized => return Err(self.bad_grain(g, r, "too large for one grain")),
                Met::Undecodable => {
                    return Err(self.bad_grain(
                        g,
                        r,
                        "invalid deflate stream or wrong inflated size",
                    ));
                }
            }
            if self.last.get(&r.lba) != Some(&(i as u32)) {
                return Err(self.bad_grain(
                    g,
                    r,
                    "a later grain for the same sector follows it: the stream cannot be read \
                     front to back",
                ));
            }
            if g * gb > pos {
                out.zero(pos, g * gb - pos)?;
            }
            pos = ((g + 1) * gb).min(s.size);
        }
        if s.size > pos {
            out.zero(pos, s.size - pos)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemIo;
    use std::io::Write;

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// A small monolithicSparse (or, `compressed`, marked streamOptimized) image: 8 grains of
    /// 4 KiB, grain `g` holding byte `g + 1` when `g` is in `present`, grain 5 zeroed.
    fn image(compressed: bool, present: &[u64]) -> (Vec<u8>, Vec<u8>) {
        let grain = 8u64;
        let capacity = 8 * grain - 3; // the last grain is short
        let mut f = vec![0u8; 512];
        f[..4].copy_from_slice(b"KDMV");
        f[4..8].copy_from_slice(&(if compressed { 3u32 } else { 2 }).to_le_bytes());
        let flags = FLAG_NL_DETECT | FLAG_ZERO_GRAIN | if compressed { 0x30000 } else { 0 };
        f[8..12].copy_from_slice(&flags.to_le_bytes());
        f[12..20].copy_from_slice(&capacity.to_le_bytes());
        f[20..28].copy_from_slice(&grain.to_le_bytes());
        f[28..36].copy_from_slice(&1u64.to_le_bytes());
        f[36..44].copy_from_slice(&1u64.to_le_bytes());
        f[44..48].copy_from_slice(&512u32.to_le_bytes());
        f[56..64].copy_from_slice(&2u64.to_le_bytes());
        f[64..72].copy_from_slice(&16u64.to_le_bytes());
        f[73..77].copy_from_slice(&NL_CHECK);
        f[77..79].copy_from_slice(&u16::from(compressed).to_le_bytes());
        let desc = b"# Disk DescriptorFile\nversion=1\nCID=abc\nparentCID=ffffffff\n\
            createType=\"monolithicSparse\"\nRW 61 SPARSE \"/etc/passwd\"\n";
        f.extend_from_slice(desc);
        f.resize(2 * 512, 0);
        // GD at sector 2 -> GT at sector 3.
        f.extend_from_slice(&3u32.to_le_bytes());
        f.resize(3 * 512, 0);
        let mut gt = [0u32; 512];
        let mut grains = Vec::new();
        let mut disk = vec![0u8; (capacity * 512) as usize];
        let mut next = 16u32;
        for g in 0..8u64 {
            let len = (grain * 512).min(capacity * 512 - g * grain * 512) as usize;
            if g == 5 {
                gt[5] = GTE_ZEROED;
            } else if present.contains(&g) {
                let data = vec![g as u8 + 1; len];
                disk[(g * 4096) as usize..(g * 4096) as usize + len].copy_from_slice(&data);
                gt[g as usize] = next;
                let mut blob = Vec::new();
                if compressed {
                    let z = zlib(&data);
                    blob.extend_from_slice(&(g * grain).to_le_bytes());
                    blob.extend_from_slice(&(z.len() as u32).to_le_bytes());
                    blob.extend_from_slice(&z);
                } else {
                    blob = vec![g as u8 + 1; 4096];
                }
                blob.resize(blob.len().next_multiple_of(512), 0);
                next += (blob.len() / 512) as u32;
                grains.extend_from_slice(&blob);
            }
        }
        for e in gt {
            f.extend_from_slice(&e.to_le_bytes());
        }
        f.resize(16 * 512, 0);
        f.extend_from_slice(&grains);
        (f, disk)
    }

    fn ctx() -> DriverContext<'static> {
        DriverContext {
            path: None,
            policy: Policy::Untrusted,
            metadata_only: false,
        }
    }

    #[test]
    fn sparse_and_compressed_read_back() {
        for compressed in [false, true] {
            let (f, disk) = image(compressed, &[0, 1, 3, 7]);
            let d = open(Arc::new(MemIo::new(f)), &ctx()).unwrap();
            assert_eq!(d.virtual_size(), disk.len() as u64);
            assert_eq!(d.cluster_size(), Some(4096));
            // Every start and length at 512-byte steps, and a few unaligned ones.
            for start in (0..disk.len()).step_by(1536).chain([1, 4095, 4097]) {
                for len in [1usize, 511, 4096, 9000, disk.len()] {
                    let len = len.min(disk.len() - start);
                    let mut b = vec![0xeeu8; len];
                    d.read_at(&mut b, start as u64).unwrap();
                    let diff = b
                        .iter()
                        .zip(&disk[start..start + len])
                        .position(|(x, y)| x != y);
                    assert!(diff.is_none(), "{compressed} {start} {len} at {diff:?}");
                }
            }
            let e = d.extent(0, u64::MAX).unwrap();
            assert_eq!((e.len, e.compressed, e.data), (8192, compressed, true));
            let e = d.extent(8192, u64::MAX).unwrap();
            assert!(!e.present && e.zero && e.len == 4096, "{e:?}");
            let e = d.extent(5 * 4096, u64::MAX).unwrap();
            assert!(e.present && e.zero && !e.data && e.len == 4096, "{e:?}");
            let e = d.extent(7 * 4096, u64::MAX).unwrap();
            assert_eq!(e.len, 4096 - 3 * 512);
            assert!(d.extent(disk.len() as u64, 1).is_err());
            assert_eq!(d.check(), Some(vec![]));
            // The embedded extent line naming /etc/passwd is ignored, as qemu does.
            let fs = d.format_specific().unwrap();
            assert_eq!(fs["data"]["cid"], 0xabc);
        }
    }

    #[test]
    fn descriptor_lines() {
        let l = Line::parse("RW 100 FLAT \"a b.img\" 7").unwrap();
        assert_eq!(
            (l.sectors, l.ty, l.file.as_deref(), l.offset),
            (100, LineType::Flat, Some("a b.img"), 7)
        );
        assert_eq!(Line::parse("RDONLY 5 ZERO").unwrap().ty, LineType::Zero);
        assert_eq!(Line::parse("RW 5 VMFS \"x\"").unwrap().ty, LineType::Vmfs);
        for bad in [
            "RW x FLAT \"a\" 0",
            "RW 5 FLAT \"a\"",
            "RW 5 FLAT \"a 0",
            "RW 5 SPARSE \"a\" 3",
            "RW 5 ZERO \"a\"",
            "RW 5 FLAT \"a\" 0 junk",
            "RW 5 BOGUS \"a\"",
            "RW 0 ZERO",
        ] {
            assert_eq!(
                Line::parse(bad).unwrap_err().kind(),
                ErrorKind::Corrupt,
                "{bad}"
            );
        }
        assert_eq!(
            Line::parse("NOACCESS 5 ZERO").unwrap_err().kind(),
            ErrorKind::UnsupportedFeature
        );
        let d =
            Descriptor::parse("CID=1\r\nparentCID = \"ffffffff\"\r\nRW 1 ZERO\r\n", true).unwrap();
        assert_eq!(d.ids().unwrap(), (1, u32::MAX));
        assert_eq!(d.extents.len(), 1);
        assert!(Descriptor::parse("what is this", true).is_err());
        assert!(Descriptor::parse("what is this\nRW x\n", false).is_ok());
    }

    #[test]
    fn names() {
        for ok in ["a.vmdk", "sub/a.vmdk", "./a", "..x", "dir/c:d"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for (bad, kind) in [
            ("/etc/passwd", ErrorKind::Denied),
            ("../x", ErrorKind::Denied),
            ("a/../../x", ErrorKind::Denied),
            ("nbd:host:1", ErrorKind::Denied),
            ("file:x", ErrorKind::Denied),
            ("http://h/x", ErrorKind::Denied),
            ("json:{}", ErrorKind::Denied),
            ("", ErrorKind::Corrupt),
            ("a\0b", ErrorKind::Corrupt),
        ] {
            assert_eq!(check_name(bad).unwrap_err().kind(), kind, "{bad:?}");
        }
        assert!(!has_protocol("dir/c:d"));
        assert!(is_descriptor_text(b"# x\n\nversion=1\r\n"));
        assert!(!is_descriptor_text(b"# x\nversion=4\n"));
    }

    #[test]
    fn inflate_is_bounded_to_one_grain() {
        let data = vec![9u8; 8192];
        let z = zlib(&data);
        let mut out = vec![0u8; 8192];
        assert_eq!(inflate(&z, &mut out).unwrap(), 8192);
        let mut small = vec![0u8; 4096];
        assert!(inflate(&z, &mut small).is_err());
        assert!(inflate(&z[..z.len() - 4], &mut out).is_err());
        let mut bad = z.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(inflate(&bad, &mut out).is_err());
        // Incompressible input stays under the bound.
        let mut x = 1u32;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        assert!(zlib(&noise).len() as u64 <= deflate_bound(65536));
    }
}
