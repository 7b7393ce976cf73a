//! Writing new qcow2 images: the creation options (qemu-img's `-o` names), the header and its
//! extensions, a monotonic host-cluster allocator that packs compressed clusters byte-wise,
//! and [`Builder`], which lays out a whole image front to back: header, L1, then for each
//! stretch of the disk its L2 tables followed by their data, and finally a fresh set of
//! refcount structures. The header is written last, so an interrupted build never looks like a
//! valid image.

use super::header::{AUTOCLEAR_DATA_FILE_RAW, CompressionType, MAGIC, incompat};
use super::refcount::{self, Geometry};
use crate::error::{Error, ErrorKind, Result};
use crate::io::BlockIo;
use byteorder::{BigEndian, ByteOrder};
use std::sync::Mutex;

const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;

/// How space for a new image is reserved (qemu-img's `preallocation=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prealloc {
    /// Nothing reserved; the file grows as data is written.
    #[default]
    Off,
    /// qcow2 only: all metadata and data clusters mapped, the file sparse.
    Metadata,
    /// Space reserved with `fallocate` (falls back to `Full` where unsupported).
    Falloc,
    /// Space reserved by writing zeros.
    Full,
}

impl Prealloc {
    /// Parse qemu's names.
    pub fn from_name(s: &str) -> Option<Prealloc> {
        Some(match s {
            "off" => Prealloc::Off,
            "metadata" => Prealloc::Metadata,
            "falloc" => Prealloc::Falloc,
            "full" => Prealloc::Full,
            _ => return None,
        })
    }

    /// qemu's name.
    pub fn name(self) -> &'static str {
        match self {
            Prealloc::Off => "off",
            Prealloc::Metadata => "metadata",
            Prealloc::Falloc => "falloc",
            Prealloc::Full => "full",
        }
    }
}

/// Options of a new qcow2 image, with qemu-img's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// log2 of the cluster size (default 16: 64 KiB).
    pub cluster_bits: u32,
    /// 2 (`compat=0.10`) or 3 (`compat=1.1`, default).
    pub version: u32,
    /// log2 of the refcount width (default 4: 16 bits).
    pub refcount_order: u32,
    /// Compression type for compressed clusters.
    pub compression: CompressionType,
    /// 128-bit L2 entries with subclusters.
    pub extended_l2: bool,
    /// Lazy refcounts compatible feature.
    pub lazy_refcounts: bool,
    /// Preallocation of the new image.
    pub prealloc: Prealloc,
    /// Backing file name and format, stored as given.
    pub backing: Option<(String, String)>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            cluster_bits: 16,
            version: 3,
            refcount_order: 4,
            compression: CompressionType::Zlib,
            extended_l2: false,
            lazy_refcounts: false,
            prealloc: Prealloc::Off,
            backing: None,
        }
    }
}

/// Why a size did not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SizeError {
    /// Not a size at all.
    Syntax,
    /// A size, but past what an image may have (2^63 - 1 bytes).
    Range,
}

/// qemu's size syntax, exactly (`qemu_strtosz` as `qemu-img` uses it), without floating-point
/// surprises: leading white space and `+` allowed, then decimal digits (leading zeros stay
/// decimal) with an optional `.fraction` and an optional one-letter suffix (b, k, M, G, T, P, E
/// in powers of 1024, any case), or `0x` hexadecimal with neither. A fraction needs a suffix
/// other than `b` and is truncated to whole bytes; exponents, octal, signs other than `+`,
/// trailing characters and values past 2^63 - 1 are refused.
fn parse_size_exact(s: &str) -> std::result::Result<u64, SizeError> {
    use SizeError::{Range, Syntax};
    let s = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let s = s.strip_prefix('+').unwrap_or(s);
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Syntax);
        }
        let v = u64::from_str_radix(hex, 16).map_err(|_| Range)?;
        return if v > i64::MAX as u64 {
            Err(Range)
        } else {
            Ok(v)
        };
    }
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (int, rest) = s.split_at(digits);
    let (frac, rest) = match rest.strip_prefix('.') {
        Some(r) => {
            let n = r.bytes().take_while(u8::is_ascii_digit).count();
            (Some(&r[..n]), &r[n..])
        }
        None => (None, rest),
    };
    if int.is_empty() && frac.is_none_or(str::is_empty) {
        return Err(Syntax);
    }
    let mult: u64 = match rest {
        "" => 1,
        r if r.len() == 1 => match r.as_bytes()[0].to_ascii_lowercase() {
            b'b' => 1,
            b'k' => 1 << 10,
            b'm' => 1 << 20,
            b'g' => 1 << 30,
            b't' => 1 << 40,
            b'p' => 1 << 50,
            b'e' => 1 << 60,
            _ => return Err(Syntax),
        },
        _ => return Err(Syntax),
    };
    if frac.is_some() && mult == 1 {
        return Err(Syntax);
    }
    let whole: u64 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| Range)?
    };
    let mut v = whole.checked_mul(mult).ok_or(Range)?;
    if let Some(f) = frac.filter(|f| !f.is_empty()) {
        // As qemu: the fraction as a double, scaled and truncated to bytes.
        let f: f64 = format!("0.{f}").parse().map_err(|_| Syntax)?;
        v = v.checked_add((f * mult as f64) as u64).ok_or(Range)?;
    }
    if v > i64::MAX as u64 {
        return Err(Range);
    }
    Ok(v)
}

fn parse_size(s: &str) -> Option<u64> {
    parse_size_exact(s).ok()
}

/// Parse a size as qemu-img does (`10G`, `512k`, `1.5M`, `0x1000`, plain bytes); errors in
/// qemu-img's words.
pub fn parse_qemu_size(s: &str) -> Result<u64> {
    parse_qemu_number("image size", s)
}

/// Parse a size-like number qemu-img takes (`--start-offset`, `--max-length`, ...) as
/// [`parse_qemu_size`] does, naming it `what` in errors as qemu-img does.
pub fn parse_qemu_number(what: &str, s: &str) -> Result<u64> {
    parse_size_exact(s).map_err(|e| match e {
        SizeError::Syntax => Error::invalid(format!("Invalid {what} specified: '{s}'.")),
        SizeError::Range => Error::invalid(format!(
            "Invalid {what} specified. Must be between 0 and 9223372036854775807."
        )),
    })
}

/// The `-o` options vdisk takes for `format` ("qcow2" or "raw"), listed as `qemu-img create
/// -f FORMAT -o help` lists them; None for other formats.
pub fn options_help(format: &str) -> Option<String> {
    let qcow2: &[(&str, &str)] = &[
        ("backing_file=<str>", "File name of a base image"),
        ("backing_fmt=<str>", "Image format of the base image"),
        ("cluster_size=<size>", "qcow2 cluster size"),
        (
            "compat=<str>",
            "Compatibility level (v2 [0.10] or v3 [1.1])",
        ),
        (
            "compression_type=<str>",
            "Compression method used for image cluster compression",
        ),
        ("extended_l2=<bool (on/off)>", "Extended L2 tables"),
        (
            "lazy_refcounts=<bool (on/off)>",
            "Postpone refcount updates",
        ),
        (
            "preallocation=<str>",
            "Preallocation mode (allowed values: off, metadata, falloc, full)",
        ),
        (
            "refcount_bits=<num>",
            "Width of a reference count entry in bits",
        ),
        ("size=<size>", "Virtual disk size"),
    ];
    let raw: &[(&str, &str)] = &[
        (
            "preallocation=<str>",
            "Preallocation mode (allowed values: off, falloc, full)",
        ),
        ("size=<size>", "Virtual disk size"),
    ];
    let iso: &[(&str, &str)] = &[
        ("volid=<str>", "Volume identifier (1-32 ASCII characters)"),
        ("joliet=<bool (on/off)>", "Joliet tree (default on)"),
        (
            "rockridge=<bool (on/off)>",
            "Rock Ridge entries (default on)",
        ),
        ("iso_level=<num>", "ISO 9660 name level 1, 2 or 3"),
        (
            "rational=<bool (on/off)>",
            "Owners root, read-only modes (mkisofs -r)",
        ),
        ("appid=<str>", "Application identifier"),
    ];
    let list = match format {
        "qcow2" => qcow2,
        "raw" => raw,
        "iso" => iso,
        _ => return None,
    };
    let mut s = String::from("Supported options:\n");
    for (k, d) in list {
        s += &format!("  {k:<22} - {d}\n");
    }
    Some(s)
}

/// True when a `-o` argument asks for the option list (`help` or `?`).
pub fn is_options_help(spec: &str) -> bool {
    spec.split(',').any(|i| i == "help" || i == "?")
}

/// `compat=`: 2 for "0.10"/"v2", 3 for "1.1"/"v3".
pub fn parse_compat(v: &str) -> Option<u32> {
    match v {
        "0.10" | "v2" => Some(2),
        "1.1" | "v3" => Some(3),
        _ => None,
    }
}

/// `refcount_bits=`: the width's log2 (a power of two up to 64); None when not a number.
pub fn parse_refcount_bits(v: &str) -> Option<Result<u32>> {
    let n: u64 = v.parse().ok()?;
    Some(if !n.is_power_of_two() || n > 64 {
        Err(Error::invalid(
            "refcount width must be a power of two and may not exceed 64 bits",
        ))
    } else {
        Ok(n.trailing_zeros())
    })
}

/// An on/off option's value.
pub fn parse_flag(v: &str) -> Option<bool> {
    match v {
        "on" | "true" | "yes" => Some(true),
        "off" | "false" | "no" => Some(false),
        _ => None,
    }
}

impl CreateOptions {
    /// Apply one qemu-img `-o` string (`key=value,key=value`). Unknown keys are errors.
    pub fn apply(&mut self, spec: &str) -> Result<()> {
        for item in spec.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = item.split_once('=').unwrap_or((item, "on"));
            let bad = || Error::invalid(format!("invalid value '{v}' for option '{k}'"));
            let flag = |v: &str| parse_flag(v).ok_or_else(bad);
            match k {
                "cluster_size" => {
                    let n = parse_size(v).ok_or_else(bad)?;
                    if !n.is_power_of_two() || !(512..=(2 << 20)).contains(&n) {
                        return Err(Error::invalid(
                            "cluster size must be a power of two between 512 and 2048k",
                        ));
                    }
                    self.cluster_bits = n.trailing_zeros();
                }
                "compat" => self.version = parse_compat(v).ok_or_else(bad)?,
                "refcount_bits" => {
                    self.refcount_order = parse_refcount_bits(v).ok_or_else(bad)??
                }
                "compression_type" => {
                    self.compression = match v {
                        "zlib" => CompressionType::Zlib,
                        "zstd" => CompressionType::Zstd,
                        _ => return Err(bad()),
                    }
                }
                "extended_l2" => self.extended_l2 = flag(v)?,
                "lazy_refcounts" => self.lazy_refcounts = flag(v)?,
                "preallocation" => self.prealloc = Prealloc::from_name(v).ok_or_else(bad)?,
                "backing_file" => {
                    let fmt = self.backing.take().map(|b| b.1).unwrap_or_default();
                    self.backing = Some((v.to_string(), fmt));
                }
                "backing_fmt" => {
                    let name = self.backing.take().map(|b| b.0).unwrap_or_default();
                    self.backing = Some((name, v.to_string()));
                }
                "size" => {}
                _ => return Err(Error::invalid(format!("invalid option '{k}' for qcow2"))),
            }
        }
        Ok(())
    }

    /// Check option combinations the way qemu-img does.
    pub fn validate(&self) -> Result<()> {
        if self.version == 2 {
            if self.refcount_order != 4 {
                return Err(Error::invalid(
                    "different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
                ));
            }
            if self.lazy_refcounts {
                return Err(Error::invalid(
                    "lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
                ));
            }
            if self.extended_l2 {
                return Err(Error::invalid(
                    "extended L2 entries are only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
                ));
            }
            if self.compression != CompressionType::Zlib {
                return Err(Error::invalid(
                    "compression_type requires compatibility level 1.1 or above (use compat=1.1 or greater)",
                ));
            }
        }
        if self.extended_l2 && self.cluster_bits < 14 {
            return Err(Error::invalid(
                "extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ));
        }
        if let Some((name, fmt)) = &self.backing {
            if name.is_empty() {
                return Err(Error::invalid(
                    "backing format given without a backing file",
                ));
            }
            if fmt.is_empty() {
                return Err(Error::invalid(
                    "use of backing file requires explicit backing format",
                ));
            }
            // Preallocated clusters would hide the backing file; only extended L2 entries can
            // leave them unallocated (qemu refuses the same).
            if self.prealloc != Prealloc::Off && !self.extended_l2 {
                return Err(Error::invalid(
                    "backing file and preallocation can only be used at the same time if extended_l2 is on",
                ));
            }
        }
        Ok(())
    }

    fn geometry(&self) -> Geometry {
        Geometry {
            cluster_bits: self.cluster_bits,
            refcount_order: self.refcount_order,
        }
    }

    fn l2_entries(&self) -> u64 {
        (1u64 << self.cluster_bits) / if self.extended_l2 { 16 } else { 8 }
    }
}

/// Where the header's tables are.
#[derive(Debug, Clone, Copy)]
pub struct HeaderLayout {
    /// Virtual size.
    pub size: u64,
    /// L1 entries.
    pub l1_size: u32,
    /// L1 host offset.
    pub l1_offset: u64,
    /// Refcount table host offset.
    pub refcount_table_offset: u64,
    /// Refcount table length in clusters.
    pub refcount_table_clusters: u32,
}

const FEATURES: &[(u8, u8, &str)] = &[
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// Serialise cluster 0: header, extensions (backing format, feature names) and backing name.
pub fn encode_header(o: &CreateOptions, l: &HeaderLayout) -> Result<Vec<u8>> {
    let cs = 1usize << o.cluster_bits;
    let mut h = vec![0u8; cs];
    BigEndian::write_u32(&mut h[0..], MAGIC);
    BigEndian::write_u32(&mut h[4..], o.version);
    BigEndian::write_u32(&mut h[20..], o.cluster_bits);
    BigEndian::write_u64(&mut h[24..], l.size);
    BigEndian::write_u32(&mut h[36..], l.l1_size);
    BigEndian::write_u64(&mut h[40..], l.l1_offset);
    BigEndian::write_u64(&mut h[48..], l.refcount_table_offset);
    BigEndian::write_u32(&mut h[56..], l.refcount_table_clusters);
    let mut off = 72;
    if o.version >= 3 {
        let mut inc = 0;
        if o.compression == CompressionType::Zstd {
            inc |= incompat::COMPRESSION;
        }
        if o.extended_l2 {
            inc |= incompat::EXTENDED_L2;
        }
        BigEndian::write_u64(&mut h[72..], inc);
        BigEndian::write_u64(&mut h[80..], u64::from(o.lazy_refcounts));
        BigEndian::write_u64(&mut h[88..], 0);
        BigEndian::write_u32(&mut h[96..], o.refcount_order);
        BigEndian::write_u32(&mut h[100..], 112);
        h[104] = u8::from(o.compression == CompressionType::Zstd);
        off = 112;
    }
    let _ = AUTOCLEAR_DATA_FILE_RAW;
    let mut ext = |typ: u32, data: &[u8], off: &mut usize| -> Result<()> {
        let padded = data.len().div_ceil(8) * 8;
        if *off + 8 + padded + 8 > cs {
            return Err(Error::invalid(
                "header extensions do not fit in the first cluster",
            ));
        }
        BigEndian::write_u32(&mut h[*off..], typ);
        BigEndian::write_u32(&mut h[*off + 4..], data.len() as u32);
        h[*off + 8..*off + 8 + data.len()].copy_from_slice(data);
        *off += 8 + padded;
        Ok(())
    };
    if let Some((_, fmt)) = &o.backing {
        ext(0xe279_2aca, fmt.as_bytes(), &mut off)?;
    }
    if o.version >= 3 {
        let mut names = vec![0u8; 48 * FEATURES.len()];
        for (i, (t, b, n)) in FEATURES.iter().enumerate() {
            names[i * 48] = *t;
            names[i * 48 + 1] = *b;
            names[i * 48 + 2..i * 48 + 2 + n.len()].copy_from_slice(n.as_bytes());
        }
        ext(0x6803_f857, &names, &mut off)?;
    }
    off += 8; // end-of-extensions marker (zeros)
    if let Some((name, _)) = &o.backing {
        if name.len() > 1023 || off + name.len() > cs {
            return Err(Error::invalid("backing file name too long"));
        }
        BigEndian::write_u64(&mut h[8..], off as u64);
        BigEndian::write_u32(&mut h[16..], name.len() as u32);
        h[off..off + name.len()].copy_from_slice(name.as_bytes());
    }
    Ok(h)
}

/// Runs of equal refcounts over consecutive host clusters, appended in order.
#[derive(Debug, Default)]
struct RefRuns {
    runs: Vec<(u64, u64, u64)>, // (first cluster, count of clusters, refcount)
}

impl RefRuns {
    fn push(&mut self, first: u64, n: u64, rc: u64) {
        if n == 0 {
            return;
        }
        if let Some(last) = self.runs.last_mut() {
            if last.0 + last.1 == first && last.2 == rc {
                last.1 += n;
                return;
            }
        }
        self.runs.push((first, n, rc));
    }
}

/// Monotonic host space allocator. Whole clusters for metadata and plain data; byte ranges,
/// packed, for compressed clusters (each host cluster's refcount counts its users).
#[derive(Debug)]
struct Alloc {
    cs: u64,
    max_ref: u64,
    /// Next free byte.
    next: u64,
    /// Users of the partly filled cluster holding `next - 1`, when `next` is mid-cluster.
    partial: u64,
    refs: RefRuns,
}

impl Alloc {
    fn close_partial(&mut self) {
        if self.next % self.cs != 0 {
            let c = self.next / self.cs;
            self.refs.push(c, 1, self.partial);
            self.next = (c + 1) * self.cs;
            self.partial = 0;
        }
    }

    fn clusters(&mut self, n: u64) -> u64 {
        self.close_partial();
        let off = self.next;
        self.refs.push(off / self.cs, n, 1);
        self.next += n * self.cs;
        off
    }

    fn bytes(&mut self, len: u64) -> u64 {
        debug_assert!(len > 0 && len < self.cs);
        if self.next % self.cs != 0 && self.partial >= self.max_ref {
            self.close_partial();
        }
        let off = self.next;
        let end = off + len;
        let first = off / self.cs;
        let last = (end - 1) / self.cs;
        if off % self.cs == 0 {
            self.partial = 0;
        }
        if last > first {
            // The current cluster is complete with this user; the item spills over.
            self.refs.push(first, 1, self.partial + 1);
            self.partial = 0;
        }
        self.partial += 1;
        self.next = end;
        if end % self.cs == 0 {
            self.refs.push(last, 1, self.partial);
            self.partial = 0;
        }
        off
    }

    fn used_clusters(&mut self) -> u64 {
        self.close_partial();
        self.next / self.cs
    }
}

struct State {
    alloc: Alloc,
    l1: Vec<u64>,
    /// L2 tables of the current stretch: (L1 index, host offset, entries).
    tables: Vec<(u64, u64, Vec<u64>)>,
}

/// Builds a new qcow2 image front to back. Guest ranges are added stretch by stretch: first
/// [`Builder::begin_tables`] places the L2 tables of a stretch, then data for guest clusters
/// they map is added (from any thread, in any order); [`Builder::finish`] writes the L1, the
/// refcount structures and finally the header. Memory holds only the current stretch's tables.
pub struct Builder<'a> {
    io: &'a dyn BlockIo,
    opts: CreateOptions,
    size: u64,
    l1_offset: u64,
    state: Mutex<State>,
}

impl std::fmt::Debug for Builder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("size", &self.size)
            .field("opts", &self.opts)
            .finish()
    }
}

impl<'a> Builder<'a> {
    /// Start an image of virtual `size` bytes (rounded up to 512) in the empty `io`.
    pub fn new(io: &'a dyn BlockIo, size: u64, opts: &CreateOptions) -> Result<Builder<'a>> {
        opts.validate()?;
        let size = size
            .checked_next_multiple_of(512)
            .ok_or_else(|| Error::invalid("image size too large"))?;
        let cs = 1u64 << opts.cluster_bits;
        let per_l2 = cs * opts.l2_entries();
        let l1_size = size.div_ceil(per_l2);
        if l1_size * 8 > super::header::MAX_L1_BYTES {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!("image size {size} is too big for cluster size {cs}"),
            ));
        }
        let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
        let geo = opts.geometry();
        let mut alloc = Alloc {
            cs,
            max_ref: geo.max_refcount(),
            next: 0,
            partial: 0,
            refs: RefRuns::default(),
        };
        alloc.clusters(1); // header
        let l1_offset = alloc.clusters(l1_clusters);
        let state = State {
            alloc,
            l1: vec![0; l1_size as usize],
            tables: Vec::new(),
        };
        Ok(Builder {
            io,
            opts: opts.clone(),
            size,
            l1_offset,
            state: Mutex::new(state),
        })
    }

    /// Virtual size (rounded to 512).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Cluster size.
    pub fn cluster_size(&self) -> u64 {
        1 << self.opts.cluster_bits
    }

    /// The options the image is built with.
    pub fn options(&self) -> &CreateOptions {
        &self.opts
    }

    /// Guest bytes one L2 table maps.
    pub fn l2_coverage(&self) -> u64 {
        self.cluster_size() * self.opts.l2_entries()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Write out the current stretch's L2 tables, then place new ones (before their data) for
    /// the given L1 indexes, in order.
    pub fn begin_tables(&self, l1_indexes: &[u64]) -> Result<()> {
        self.flush_tables()?;
        let entries = (self.opts.l2_entries() * if self.opts.extended_l2 { 2 } else { 1 }) as usize;
        let mut st = self.lock();
        for &i in l1_indexes {
            if i as usize >= st.l1.len() {
                return Err(Error::invalid(format!("L1 index {i} is beyond the image")));
            }
            let off = st.alloc.clusters(1);
            st.l1[i as usize] = off | COPIED;
            st.tables.push((i, off, vec![0u64; entries]));
        }
        Ok(())
    }

    fn flush_tables(&self) -> Result<()> {
        let tables = std::mem::take(&mut self.lock().tables);
        let mut buf = vec![0u8; self.cluster_size() as usize];
        for (_, off, entries) in tables {
            for (k, e) in entries.iter().enumerate() {
                BigEndian::write_u64(&mut buf[k * 8..], *e);
            }
            self.io
                .write_all_at(&buf, off)
                .map_err(|e| Error::io("cannot write L2 table", e))?;
        }
        Ok(())
    }

    fn set_entry(&self, st: &mut State, guest: u64, value: u64, bitmap: u64) -> Result<()> {
        let cov = self.l2_coverage();
        let idx = guest / cov;
        let k = ((guest % cov) >> self.opts.cluster_bits) as usize;
        let ext = self.opts.extended_l2;
        let t = st.tables.iter_mut().find(|t| t.0 == idx).ok_or_else(|| {
            Error::invalid(format!("guest offset {guest:#x} has no L2 table placed"))
        })?;
        if ext {
            t.2[k * 2] = value;
            t.2[k * 2 + 1] = bitmap;
        } else {
            t.2[k] = value;
        }
        Ok(())
    }

    /// Map `n` guest clusters from cluster-aligned `guest` to newly allocated, consecutive host
    /// clusters and return the first host offset, for preallocation: nothing is written and the
    /// clusters read as zeros. With extended L2 entries their subclusters stay unallocated, as
    /// qemu leaves them (they read as zeros, or from a backing file).
    pub fn map_clusters(&self, guest: u64, n: u64) -> Result<u64> {
        self.alloc_clusters(guest, n, 0)
    }

    fn alloc_clusters(&self, guest: u64, n: u64, bitmap: u64) -> Result<u64> {
        let cs = self.cluster_size();
        let mut st = self.lock();
        let off = st.alloc.clusters(n);
        for k in 0..n {
            self.set_entry(&mut st, guest + k * cs, (off + k * cs) | COPIED, bitmap)?;
        }
        Ok(off)
    }

    /// Make `n` guest clusters from cluster-aligned `guest` read as zeros whatever a backing
    /// file holds (zero clusters; version 3 images only).
    pub fn zero_clusters(&self, guest: u64, n: u64) -> Result<()> {
        if self.opts.version < 3 {
            return Err(Error::new(
                ErrorKind::UnsupportedFeature,
                "version 2 images have no zero clusters",
            ));
        }
        let cs = self.cluster_size();
        let mut st = self.lock();
        for k in 0..n {
            if self.opts.extended_l2 {
                self.set_entry(&mut st, guest + k * cs, 0, 0xffff_ffff_0000_0000)?;
            } else {
                self.set_entry(&mut st, guest + k * cs, 1, 0)?;
            }
        }
        Ok(())
    }

    /// Write plain data for the guest clusters starting at cluster-aligned `guest`; `data` is
    /// whole clusters (a short last cluster is padded with zeros on disk).
    pub fn write_clusters(&self, guest: u64, data: &[u8]) -> Result<()> {
        let cs = self.cluster_size();
        let n = (data.len() as u64).div_ceil(cs);
        let off = self.alloc_clusters(guest, n, 0xffff_ffff)?;
        self.io
            .write_all_at(data, off)
            .map_err(|e| Error::io("cannot write data", e))?;
        let tail = n * cs - data.len() as u64;
        if tail > 0 {
            self.io
                .write_all_at(&vec![0u8; tail as usize], off + data.len() as u64)
                .map_err(|e| Error::io("cannot write data", e))?;
        }
        Ok(())
    }

    /// Store compressed clusters `(guest offset, compressed bytes)`, packed byte-wise, with one
    /// write for the whole batch. Each item must be shorter than a cluster.
    pub fn write_compressed(&self, items: &[(u64, &[u8])]) -> Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let x = 62 - (self.opts.cluster_bits - 8);
        let mut places = Vec::with_capacity(items.len());
        {
            let mut st = self.lock();
            for (guest, bytes) in items {
                let off = st.alloc.bytes(bytes.len() as u64);
                if off >> x != 0 {
                    return Err(Error::new(
                        ErrorKind::TooLarge,
                        "compressed data offset out of range",
                    ));
                }
                let nsect = ((off + bytes.len() as u64 - 1) >> 9) - (off >> 9);
                self.set_entry(&mut st, *guest, off | COMPRESSED | (nsect << x), 0)?;
                places.push(off);
            }
        }
        // Offsets ascend; gaps (cluster alignment) are written as zeros.
        let start = places[0];
        let end = places[places.len() - 1] + items[items.len() - 1].1.len() as u64;
        let mut buf = vec![0u8; (end - start) as usize];
        for (p, (_, bytes)) in places.iter().zip(items) {
            let at = (p - start) as usize;
            buf[at..at + bytes.len()].copy_from_slice(bytes);
        }
        self.io
            .write_all_at(&buf, start)
            .map_err(|e| Error::io("cannot write compressed data", e))
    }

    /// Write the remaining L2 tables, the L1 table, the refcount structures and the header.
    pub fn finish(self) -> Result<()> {
        self.flush_tables()?;
        let cs = self.cluster_size();
        let mut st = self.state.into_inner().unwrap_or_else(|p| p.into_inner());
        let mut l1 = vec![0u8; st.l1.len() * 8];
        for (k, e) in st.l1.iter().enumerate() {
            BigEndian::write_u64(&mut l1[k * 8..], *e);
        }
        self.io
            .write_all_at(&l1, self.l1_offset)
            .map_err(|e| Error::io("cannot write L1 table", e))?;
        let used = st.alloc.used_clusters();
        let runs = std::mem::take(&mut st.alloc.refs.runs);
        let mut ri = 0;
        let placement =
            refcount::write_structures(self.io, self.opts.geometry(), used, used, |c| {
                while ri < runs.len() && runs[ri].0 + runs[ri].1 <= c {
                    ri += 1;
                }
                match runs.get(ri) {
                    Some(&(first, _, rc)) if first <= c => rc,
                    _ => 0,
                }
            })?;
        let layout = HeaderLayout {
            size: self.size,
            l1_size: st.l1.len() as u32,
            l1_offset: self.l1_offset,
            refcount_table_offset: placement.table_offset,
            refcount_table_clusters: placement.table_clusters,
        };
        let header = encode_header(&self.opts, &layout)?;
        self.io
            .write_all_at(&header, 0)
            .map_err(|e| Error::io("cannot write header", e))?;
        let _ = cs;
        Ok(())
    }
}

/// Apply `falloc` or `full` preallocation to every hole of the file `io` (for qcow2, the data
/// clusters that metadata preallocation mapped but never wrote). `falloc` falls back to
/// `full` where the filesystem cannot reserve space, as CDI does. Returns the mode applied.
pub fn preallocate_data(io: &dyn BlockIo, mode: Prealloc) -> Result<Prealloc> {
    match mode {
        Prealloc::Off | Prealloc::Metadata => Ok(mode),
        Prealloc::Falloc => {
            let len = io.size().map_err(|e| Error::io("cannot stat target", e))?;
            match io.allocate(0, len) {
                Ok(()) => Ok(Prealloc::Falloc),
                Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                    preallocate_data(io, Prealloc::Full)
                }
                Err(e) => Err(Error::io("cannot preallocate", e)),
            }
        }
        Prealloc::Full => {
            let len = io.size().map_err(|e| Error::io("cannot stat target", e))?;
            let mut pos = 0;
            while pos < len {
                let next = io
                    .next_data(pos)
                    .map_err(|e| Error::io("cannot find holes", e))?;
                let hole_end = next.as_ref().map_or(len, |r| r.start);
                if hole_end > pos {
                    crate::io::write_zeroes_by_writing(io, pos, hole_end - pos)
                        .map_err(|e| Error::io("cannot preallocate", e))?;
                }
                pos = next.map_or(len, |r| r.end.max(hole_end));
            }
            Ok(Prealloc::Full)
        }
    }
}

/// Lay out a new, empty qcow2 image of `size` bytes in `io`, with the preallocation the
/// options ask for. Returns the preallocation applied (see [`preallocate_data`]).
pub fn create(io: &dyn BlockIo, size: u64, opts: &CreateOptions) -> Result<Prealloc> {
    let b = Builder::new(io, size, opts)?;
    if opts.prealloc != Prealloc::Off {
        let cov = b.l2_coverage();
        let cs = b.cluster_size();
        let size = b.size();
        let tables = size.div_ceil(cov);
        for i in 0..tables {
            b.begin_tables(&[i])?;
            let start = i * cov;
            let n = (size.min(start + cov) - start).div_ceil(cs);
            b.map_clusters(start, n)?;
        }
    }
    b.finish()?;
    preallocate_data(io, opts.prealloc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_exactly_as_qemu_img_parses_them() {
        // Each case as qemu-img 10.0 `create -f raw F SIZE` took it (None: refused).
        let cases: &[(&str, Option<u64>)] = &[
            ("1e3", None),
            ("1.5", None),
            ("1.5k", Some(1536)),
            ("0x10", Some(16)),
            ("0X10", Some(16)),
            ("0x10k", None),
            ("0x1g", None),
            ("0x", None),
            ("00x10", None),
            ("0x1.8k", None),
            ("08", Some(8)),
            (" 512", Some(512)),
            ("\t12", Some(12)),
            ("512 ", None),
            ("1 k", None),
            ("1k5", None),
            ("1..5k", None),
            ("1.999999999999999999k", Some(2048)),
            ("1K", Some(1024)),
            ("1b", Some(1)),
            ("1B", Some(1)),
            ("1.5B", None),
            ("0.5b", None),
            ("1.5kB", None),
            ("1.k", Some(1024)),
            (".5k", Some(512)),
            ("+5", Some(5)),
            ("-0", None),
            ("1.5M", Some(1_572_864)),
            ("1.5e", Some(1_729_382_256_910_270_464)),
            ("7.99999E", Some(9_223_360_507_639_729_792)),
            ("9007199254740993", Some(9_007_199_254_740_993)),
            ("9223372036854775807", Some(i64::MAX as u64)),
            ("9223372036854775808", None),
            ("18446744073709551616", None),
            ("8E", None),
            ("16E", None),
        ];
        for &(s, want) in cases {
            assert_eq!(parse_size(s), want, "{s:?}");
        }
        let e = parse_qemu_size("8E").unwrap_err();
        assert!(
            e.to_string()
                .contains("Must be between 0 and 9223372036854775807"),
            "{e}"
        );
        let e = parse_qemu_size("1e3").unwrap_err();
        assert!(
            e.to_string()
                .contains("Invalid image size specified: '1e3'"),
            "{e}"
        );
    }
    use crate::image::{Image, OpenOptions};
    use crate::io::MemIo;
    use std::sync::Arc;

    #[test]
    fn allocator_packs_and_counts_users() {
        let mut a = Alloc {
            cs: 512,
            max_ref: 3,
            next: 0,
            partial: 0,
            refs: RefRuns::default(),
        };
        assert_eq!(a.clusters(1), 0);
        assert_eq!(a.bytes(100), 512);
        assert_eq!(a.bytes(100), 612);
        assert_eq!(a.bytes(400), 712); // spills into cluster 2
        assert_eq!(a.bytes(10), 1112);
        assert_eq!(a.bytes(10), 1122);
        assert_eq!(a.bytes(10), 1536); // cluster 2 full at 3 users
        assert_eq!(a.clusters(2), 2048);
        assert_eq!(a.used_clusters(), 6);
        // Cluster 1: three items; cluster 2: the spill-over and two more; then plain clusters.
        assert_eq!(a.refs.runs, vec![(0, 1, 1), (1, 2, 3), (3, 3, 1)]);
    }

    #[test]
    fn built_image_reads_back() {
        let io = Arc::new(MemIo::default());
        let mut o = CreateOptions::default();
        o.apply("cluster_size=4k,refcount_bits=8").unwrap();
        let b = Builder::new(io.as_ref(), 1 << 20, &o).unwrap();
        b.begin_tables(&[0]).unwrap();
        b.write_clusters(8192, &[7u8; 4096]).unwrap();
        let mut z =
            flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
        let mut out = vec![0u8; 4096];
        z.compress(&[3u8; 4096], &mut out, flate2::FlushCompress::Finish)
            .unwrap();
        let n = z.total_out() as usize;
        b.write_compressed(&[(0, &out[..n])]).unwrap();
        b.finish().unwrap();
        let img = Image::from_io(io, &OpenOptions::default()).unwrap();
        let mut buf = vec![0u8; 16384];
        img.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..4096], &[3u8; 4096][..]);
        assert_eq!(&buf[4096..8192], &[0u8; 4096][..]);
        assert_eq!(&buf[8192..12288], &[7u8; 4096][..]);
    }
}
