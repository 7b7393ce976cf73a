//! Consistency check of a qcow2 image, as `qemu-img check` does it without repair.
//!
//! From all metadata (header, active and snapshot L1 tables, every L2 table they reach, data and
//! compressed clusters, snapshot table, refcount table and blocks, bitmap directory and tables)
//! the check computes how often each host cluster is referenced, then compares that with the
//! refcounts stored on disk: a stored refcount below the number of references is a corruption
//! (the cluster could be freed while in use), one above it a leak. Structural problems
//! (unaligned offsets, reserved bits, references past the end of the file, bad subcluster
//! bitmaps, COPIED flags that disagree with the refcount) are corruptions too. Metadata that
//! overlaps other metadata or data shows up as a cluster referenced more often than its
//! refcount says.
//!
//! The counts follow qemu 10 so that `vdisk check` and `qemu-img check` agree on corruptions,
//! leaks, allocation and fragmentation figures and the image end offset. The one deliberate
//! difference: a zero flag in an L2 entry of a version 2 image counts as a corruption (qemu's
//! check ignores it although qemu's reader refuses such clusters).
//!
//! Dirty and corrupt-marked images are checked like any other; backing and external data files
//! are never opened. Memory is one byte per host cluster of the file (at most
//! [`MAX_CLUSTERS`]) plus one L2 table and a few refcount blocks; tables are read in bounded
//! pieces and only as far as the file reaches (past its end everything reads as zeros).

use super::header::{self, AUTOCLEAR_BITMAPS, Header};
use super::refcount::Geometry;
use super::{COMPRESSED, COPIED, L1_OFFSET_MASK, L1_RESERVED_MASK, L2_OFFSET_MASK, ZERO};
use crate::detect::{self, Format};
use crate::error::{Error, ErrorKind, Result, corrupt};
use crate::io::{BlockIo, FileIo};
use byteorder::{BigEndian, ByteOrder};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

/// Most host clusters a checked file may have (the expected-refcount array takes one byte per
/// cluster: 256 MiB at this limit).
pub const MAX_CLUSTERS: u64 = 1 << 28;
/// Most message lines [`check`] keeps; further ones are only counted.
pub const MAX_MESSAGES: usize = 10_000;

/// Reserved bits of a standard (uncompressed) L2 entry, as qemu's check tests them: bit 0 (the
/// zero flag) is not among them.
const L2_STD_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Refcount table entry: offset and reserved bits.
const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
const REFT_RESERVED_MASK: u64 = 0x1ff;
/// Subcluster bitmap: the "allocated" half.
const ALL_ALLOC: u64 = 0xffff_ffff;
/// qemu's limits on snapshot tables (bitmaps: see `super::bitmaps`).
const MAX_SNAPSHOT_TABLE: u64 = 1024 * 65536;
const MAX_SNAPSHOT_L1_ENTRIES: u64 = header::MAX_L1_BYTES / 8;
/// qemu's block layer refuses requests reaching past this offset (BDRV_MAX_LENGTH) with EIO.
const MAX_IO_END: u64 = 0x7fff_ffff_c000_0000;
/// Bytes of a table read at once.
const CHUNK: usize = 64 << 10;
/// Refcount blocks kept in memory for random lookups.
const REFBLOCK_CACHE: usize = 4;

/// What a check found. The counters have the meaning of `qemu-img check`'s.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Corruptions: refcounts below the number of references, and structural errors.
    pub corruptions: u64,
    /// Clusters whose refcount exceeds their number of references.
    pub leaks: u64,
    /// Problems that kept parts of the check from running (unreadable refcount blocks).
    pub check_errors: u64,
    /// Virtual size in clusters.
    pub total_clusters: u64,
    /// Guest clusters of the active state that have host space (data, preallocated zero or
    /// compressed).
    pub allocated_clusters: u64,
    /// Allocated guest clusters not stored right after the previous one of the same L2 table
    /// (every compressed cluster counts).
    pub fragmented_clusters: u64,
    /// Compressed guest clusters of the active state.
    pub compressed_clusters: u64,
    /// End of the highest host cluster that is referenced or has a refcount.
    pub image_end_offset: u64,
    /// The messages (`ERROR ...`, `Leaked cluster ...`), at most [`MAX_MESSAGES`] of them.
    pub messages: Vec<String>,
    /// Messages left out of `messages` because of the limit.
    pub messages_dropped: u64,
}

impl CheckReport {
    /// qemu-img check's exit status: 0 clean, 1 check errors, 2 corruptions, 3 leaks only.
    pub fn exit_code(&self) -> u8 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// qemu-img check's human summary (the messages themselves are not included).
    pub fn to_human(&self) -> String {
        let mut s = String::new();
        if self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0 {
            s.push_str("No errors were found on the image.\n");
        } else {
            if self.corruptions > 0 {
                let _ = write!(
                    s,
                    "\n{} errors were found on the image.\nData may be corrupted, or further \
                     writes to the image may corrupt it.\n",
                    self.corruptions
                );
            }
            if self.leaks > 0 {
                let _ = write!(
                    s,
                    "\n{} leaked clusters were found on the image.\nThis means waste of disk \
                     space, but no harm to data.\n",
                    self.leaks
                );
            }
            if self.check_errors > 0 {
                let _ = write!(
                    s,
                    "\n{} internal errors have occurred during the check.\n",
                    self.check_errors
                );
            }
        }
        if self.total_clusters != 0 && self.allocated_clusters != 0 {
            let a = self.allocated_clusters as f64;
            let _ = writeln!(
                s,
                "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
                self.allocated_clusters,
                self.total_clusters,
                a * 100.0 / self.total_clusters as f64,
                self.fragmented_clusters as f64 * 100.0 / a,
                self.compressed_clusters as f64 * 100.0 / a
            );
        }
        if self.image_end_offset != 0 {
            let _ = writeln!(s, "Image end offset: {}", self.image_end_offset);
        }
        s
    }

    /// `qemu-img check --output=json` for `filename` of format `format`, with qemu's key order
    /// and its habit of leaving out counters that are zero (except `check-errors`).
    pub fn to_json(&self, filename: &str, format: Format, fixed: Option<(u64, u64)>) -> String {
        use crate::qjson::{QDict, pretty};
        // Keys in the order of QEMU's schema (`ImageCheck`); counts that are zero are left
        // out, as qemu-img leaves them out.
        let mut d = QDict::new();
        d.put("filename", filename);
        d.put("format", format.name());
        d.put("check-errors", self.check_errors);
        let (leaks_fixed, corruptions_fixed) = fixed.unwrap_or((0, 0));
        for (k, v) in [
            ("image-end-offset", self.image_end_offset),
            ("corruptions", self.corruptions),
            ("leaks", self.leaks),
            ("corruptions-fixed", corruptions_fixed),
            ("leaks-fixed", leaks_fixed),
            ("total-clusters", self.total_clusters),
            ("allocated-clusters", self.allocated_clusters),
            ("fragmented-clusters", self.fragmented_clusters),
            ("compressed-clusters", self.compressed_clusters),
        ] {
            if v != 0 {
                d.put(k, v);
            }
        }
        pretty(&d.into())
    }
}

/// Check the qcow2 image in `io`, keeping up to [`MAX_MESSAGES`] messages in the report.
///
/// Errors mean the check could not be done at all (unreadable or invalid header, I/O error,
/// invalid snapshot table or bitmap directory, file too large); qemu-img reports those as
/// "Check failed" with exit status 1.
pub fn check(io: &dyn BlockIo) -> Result<CheckReport> {
    let mut messages = Vec::new();
    let mut dropped = 0u64;
    let mut report = check_with(io, &mut |m: &str| {
        if messages.len() < MAX_MESSAGES {
            messages.push(m.to_string());
        } else {
            dropped += 1;
        }
    })?;
    report.messages = messages;
    report.messages_dropped = dropped;
    Ok(report)
}

/// Check the qcow2 image in `io`, handing each message to `on_message` as it is found (the
/// report's `messages` stay empty). Memory stays bounded however many problems there are.
pub fn check_with(io: &dyn BlockIo, on_message: &mut dyn FnMut(&str)) -> Result<CheckReport> {
    let file_size = io.size().map_err(|e| Error::io("cannot stat image", e))?;
    let h = read_header(io, file_size)?;
    let mut c = Checker::new(io, h, file_size, on_message)?;
    c.run()?;
    Ok(c.report)
}

/// The outcome of [`check_path`].
#[derive(Debug)]
pub enum Checked {
    /// A qcow2 image was checked.
    Qcow2(CheckReport),
    /// A VMDK, VHDX or VDI image was checked by its reader (only `corruptions` and
    /// `messages` are filled; such images are never repaired).
    Other(Format, CheckReport),
    /// The format has no consistency check (raw, ISO, qcow version 1): qemu-img's exit 63.
    NoCheck(Format),
}

/// Check the image file at `path` of format `format` (detected when `None`), streaming the
/// messages to `on_message`. Only qcow2 images are checked.
pub fn check_path(
    path: &Path,
    format: Option<Format>,
    on_message: &mut dyn FnMut(&str),
) -> Result<Checked> {
    check_path_locked(path, format, crate::io::LockMode::Read, on_message)
}

/// [`check_path`] with the image locks of `lock` (`ForceShare` for `check -U`).
pub fn check_path_locked(
    path: &Path,
    format: Option<Format>,
    lock: crate::io::LockMode,
    on_message: &mut dyn FnMut(&str),
) -> Result<Checked> {
    let io = FileIo::open(path).map_err(|e| Error::io("cannot open image", e).with_path(path))?;
    io.lock(lock).map_err(|e| e.with_path(path))?;
    let format = match format {
        Some(f) => f,
        None => probe(&io).map_err(|e| e.with_path(path))?,
    };
    match format {
        Format::Qcow2 => check_with(&io, on_message)
            .map(Checked::Qcow2)
            .map_err(|e| e.with_path(path)),
        Format::Raw | Format::Iso | Format::Qcow1 => Ok(Checked::NoCheck(format)),
        Format::Vmdk | Format::Vhd | Format::VhdFixed | Format::Vhdx | Format::Vdi => {
            // These readers validate their metadata at open; `check` lists what else their
            // driver finds (tables pointing past the end or into metadata, duplicates).
            let opts = crate::image::OpenOptions {
                format: Some(format),
                lock,
                ..Default::default()
            };
            let img = crate::image::Image::open(path, &opts)?;
            let Some(d) = img.driver() else {
                return Ok(Checked::NoCheck(format));
            };
            match d.check() {
                None => Ok(Checked::NoCheck(format)),
                Some(problems) => {
                    for m in &problems {
                        on_message(m);
                    }
                    Ok(Checked::Other(
                        format,
                        CheckReport {
                            corruptions: problems.len() as u64,
                            messages: problems,
                            ..CheckReport::default()
                        },
                    ))
                }
            }
        }
        other => Err(Error::new(
            ErrorKind::UnsupportedFormat,
            format!("checking {} images is not supported", other.name()),
        )
        .with_path(path)),
    }
}

fn probe(io: &dyn BlockIo) -> Result<Format> {
    let size = io.size().map_err(|e| Error::io("cannot stat image", e))?;
    let mut head = vec![0u8; (detect::PROBE_LEN as u64).min(size) as usize];
    io.read_exact_at(&mut head, 0)
        .map_err(|e| Error::io("cannot read image", e))?;
    let mut tail = [0u8; 512];
    let tail = (size >= 1024 && io.read_exact_at(&mut tail, size - 512).is_ok()).then_some(&tail);
    Ok(match detect::probe(&head, tail.map(|t| &t[..])) {
        // qemu's qcow2 probe wants version 2 or later; version 0 is probed as raw.
        Format::Qcow2 if head.get(4..8) == Some(&[0, 0, 0, 0]) => Format::Raw,
        f => f,
    })
}

/// Read and parse cluster 0 (or the whole file, when shorter).
fn read_header(io: &dyn BlockIo, file_size: u64) -> Result<Header> {
    let head = header::read_cluster0(io, file_size)?;
    Header::parse_for_check(&head, file_size)
}

/// How qemu classifies an L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Compressed,
    ZeroPlain,
    ZeroAlloc,
    Normal,
    Unallocated,
}

/// Expected refcounts: one byte per cluster, larger values in a side table.
struct Expected {
    dense: Vec<u8>,
    big: HashMap<u64, u64>,
    /// Clusters compared (the file's, grown when a reference reaches just past its end).
    len: u64,
}

impl Expected {
    fn get(&self, i: u64) -> u64 {
        match self.dense.get(i as usize) {
            Some(&u8::MAX) => self.big.get(&i).copied().unwrap_or(u64::from(u8::MAX)),
            Some(&v) => u64::from(v),
            None => 0,
        }
    }

    fn set(&mut self, i: u64, v: u64) {
        let i_us = i as usize;
        if i_us >= self.dense.len() {
            self.dense.resize(i_us + 1, 0);
        }
        if v >= u64::from(u8::MAX) {
            self.dense[i_us] = u8::MAX;
            self.big.insert(i, v);
        } else {
            self.dense[i_us] = v as u8;
        }
    }
}

/// A snapshot's L1 table, as listed in the snapshot table.
struct SnapshotL1 {
    /// A version 3 entry without the extra data every snapshot must have.
    incomplete: bool,
    id: String,
    name: String,
    l1_offset: u64,
    l1_size: u32,
}

/// A bitmap's table, as listed in the bitmap directory.
struct BitmapTable {
    offset: u64,
    entries: u64,
}

/// Why an on-disk refcount could not be read.
enum RefError {
    /// The refcount block offset is not cluster aligned, or too large for any read (qemu:
    /// EIO).
    Unreadable,
    /// Reading failed.
    Io(Error),
}

/// The bitmaps extension.
struct BitmapsExt {
    count: u32,
    dir_size: u64,
    dir_offset: u64,
}

struct Checker<'a> {
    io: &'a dyn BlockIo,
    h: Header,
    /// The file's length in bytes.
    file_size: u64,
    /// The length qemu works with: whole 512-byte sectors.
    file_len: u64,
    cs: u64,
    cbits: u32,
    geo: Geometry,
    refcount_max: u64,
    data_file: bool,
    extended: bool,
    bitmaps: Option<BitmapsExt>,
    expected: Expected,
    /// The refcount table entries stored in the file (entries past its end are zero).
    reftable: Vec<u64>,
    refblocks: Vec<(u64, Vec<u8>)>,
    l2: Vec<u8>,
    report: CheckReport,
    sink: &'a mut dyn FnMut(&str),
}

impl<'a> Checker<'a> {
    fn new(
        io: &'a dyn BlockIo,
        h: Header,
        file_size: u64,
        sink: &'a mut dyn FnMut(&str),
    ) -> Result<Checker<'a>> {
        let cs = h.cluster_size();
        let cbits = h.cluster_bits;
        let file_len = file_size.div_ceil(512) * 512;
        let file_clusters = file_len.div_ceil(cs);
        if file_clusters > MAX_CLUSTERS {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!(
                    "image file has {file_clusters} clusters; checks are limited to {MAX_CLUSTERS}"
                ),
            ));
        }
        let geo = Geometry::of(&h);
        let bitmaps = h
            .bitmaps_ext
            .filter(|_| h.autoclear_features & AUTOCLEAR_BITMAPS != 0)
            .map(|(count, dir_size, dir_offset)| BitmapsExt {
                count,
                dir_size,
                dir_offset,
            });
        let mut c = Checker {
            io,
            file_size,
            file_len,
            cs,
            cbits,
            refcount_max: geo.max_refcount(),
            geo,
            data_file: h.data_file.is_some(),
            extended: h.extended_l2(),
            bitmaps,
            expected: Expected {
                dense: vec![0u8; file_clusters as usize + 1],
                big: HashMap::new(),
                len: file_clusters,
            },
            reftable: Vec::new(),
            refblocks: Vec::new(),
            l2: vec![0u8; cs as usize],
            report: CheckReport {
                total_clusters: (h.size / 512 * 512).div_ceil(cs),
                ..CheckReport::default()
            },
            h,
            sink,
        };
        c.reftable = c.read_u64_table(
            c.h.refcount_table_offset,
            u64::from(c.h.refcount_table_clusters) * cs / 8,
        )?;
        Ok(c)
    }

    fn run(&mut self) -> Result<()> {
        // The snapshot table first (qemu reads it before anything else), then the references
        // in qemu's order.
        let (snaps, snap_bytes) = self.read_snapshot_table()?;
        for (i, s) in snaps.iter().enumerate() {
            if s.incomplete {
                self.corruption(format!("ERROR snapshot table entry {i} is incomplete"));
            }
        }
        self.reference(0, self.cs);
        let (l1, n) = (self.h.l1_table_offset, self.h.l1_size);
        self.walk_l1(l1, n, true)?;
        self.snapshots(&snaps, snap_bytes)?;
        let rt_bytes = u64::from(self.h.refcount_table_clusters) * self.cs;
        self.reference(self.h.refcount_table_offset, rt_bytes);
        self.bitmaps()?;
        self.refblocks();
        // Comparison with the stored refcounts, then the COPIED flags.
        let highest = self.compare()?;
        self.report.image_end_offset = (highest + 1).saturating_mul(self.cs);
        self.copied_flags()
    }

    fn say(&mut self, msg: &str) {
        (self.sink)(msg);
    }

    fn corruption(&mut self, msg: String) {
        self.report.corruptions += 1;
        self.say(&msg);
    }

    /// Read `buf.len()` bytes at `off`; bytes past the end of the file read as zeros (as in
    /// qemu), and nothing is read there at all (offsets may be absurd).
    fn read_padded(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let avail = self.file_size.saturating_sub(off).min(buf.len() as u64) as usize;
        let (inside, outside) = buf.split_at_mut(avail);
        outside.fill(0);
        if !inside.is_empty() {
            self.io
                .read_at_zero_padded(inside, off)
                .map_err(|e| Error::io(format!("cannot read metadata at {off:#x}"), e))?;
        }
        Ok(())
    }

    /// [`Checker::read_padded`] of metadata the check cannot do without: a read qemu's block
    /// layer would refuse fails the check, as in qemu.
    fn read_meta(&self, buf: &mut [u8], off: u64) -> Result<()> {
        if !readable(off, buf.len() as u64) {
            return Err(Error::new(
                ErrorKind::Io,
                format!("cannot read metadata at {off:#x}: offset out of range"),
            ));
        }
        self.read_padded(buf, off)
    }

    /// Bytes of `off..off+len` that lie inside the file.
    fn in_file(&self, off: u64, len: u64) -> u64 {
        self.file_size.saturating_sub(off).min(len)
    }

    /// Read a table of `entries` big-endian u64s at `off`, only as far as the file reaches.
    fn read_u64_table(&self, off: u64, entries: u64) -> Result<Vec<u64>> {
        let bytes = self.in_file(off, entries.saturating_mul(8)).div_ceil(8) * 8;
        let mut raw = vec![0u8; bytes as usize];
        self.read_padded(&mut raw, off)?;
        Ok(raw.chunks_exact(8).map(BigEndian::read_u64).collect())
    }

    /// Call `f(index, entry)` for every non-zero u64 of the table of `entries` entries at `off`,
    /// reading it in pieces.
    fn for_each_entry(
        &mut self,
        off: u64,
        entries: u64,
        mut f: impl FnMut(&mut Self, u64, u64) -> Result<()>,
    ) -> Result<()> {
        let stored = self.in_file(off, entries.saturating_mul(8)).div_ceil(8);
        let mut buf = vec![0u8; CHUNK];
        let per_chunk = (CHUNK / 8) as u64;
        let mut first = 0u64;
        while first < stored {
            let n = (stored - first).min(per_chunk);
            let piece = &mut buf[..(n * 8) as usize];
            self.read_padded(piece, off + first * 8)?;
            for (k, e) in piece.chunks_exact(8).enumerate() {
                let e = BigEndian::read_u64(e);
                if e != 0 {
                    f(self, first + k as u64, e)?;
                }
            }
            first += n;
        }
        Ok(())
    }

    /// Count one reference to every cluster of `offset..offset+size`.
    fn reference(&mut self, offset: u64, size: u64) {
        if size == 0 {
            return;
        }
        // The last cluster may be partly past the end of the file, no more.
        let end = match offset.checked_add(size) {
            Some(end) if end <= self.file_len || end - self.file_len < self.cs => end,
            _ => {
                self.corruption(format!(
                    "ERROR: counting reference for region exceeding the end of the file by one \
                     cluster or more: offset {offset:#x} size {size:#x}"
                ));
                return;
            }
        };
        for c in (offset >> self.cbits)..=((end - 1) >> self.cbits) {
            if c >= self.expected.len {
                self.expected.len = c + 1;
            }
            let v = self.expected.get(c);
            if v >= self.refcount_max {
                self.corruption(format!(
                    "ERROR: overflow cluster offset={:#x}",
                    c << self.cbits
                ));
                continue;
            }
            self.expected.set(c, v + 1);
        }
    }

    fn kind(&self, e: u64) -> Kind {
        if e & COMPRESSED != 0 {
            Kind::Compressed
        } else if e & ZERO != 0 && !self.extended {
            if e & L2_OFFSET_MASK != 0 {
                Kind::ZeroAlloc
            } else {
                Kind::ZeroPlain
            }
        } else if e & L2_OFFSET_MASK == 0 {
            if self.data_file && e & COPIED != 0 {
                Kind::Normal
            } else {
                Kind::Unallocated
            }
        } else {
            Kind::Normal
        }
    }

    /// Host byte range of a compressed cluster descriptor.
    fn compressed_range(&self, e: u64) -> (u64, u64) {
        let shift = 62 - (self.cbits - 8);
        let offset = e & ((1u64 << shift) - 1);
        let sectors = ((e >> shift) & ((1u64 << (self.cbits - 8)) - 1)) + 1;
        (offset, sectors * 512 - (offset & 511))
    }

    /// Count the references of an L1 table and everything it reaches. `active` also gathers the
    /// allocation figures.
    fn walk_l1(&mut self, offset: u64, entries: u32, active: bool) -> Result<()> {
        if entries == 0 {
            return Ok(());
        }
        self.reference(offset, u64::from(entries) * 8);
        if !readable(offset, u64::from(entries) * 8) {
            self.report.check_errors += 1;
            return Err(Error::new(
                ErrorKind::Io,
                format!("cannot read L1 table at {offset:#x}: offset out of range"),
            ));
        }
        self.for_each_entry(offset, u64::from(entries), |c, _, e| {
            if e & L1_RESERVED_MASK != 0 {
                c.corruption(format!(
                    "ERROR found L1 entry with reserved bits set: {e:x}"
                ));
            }
            let l2 = e & L1_OFFSET_MASK;
            c.reference(l2, c.cs);
            if l2 % c.cs != 0 {
                c.corruption(format!(
                    "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
            }
            c.walk_l2(l2, active)
        })
    }

    /// Read the stored part of the L2 table at `offset` into `self.l2`; returns the number of
    /// entries stored in the file (the others are zero).
    fn load_l2(&mut self, offset: u64) -> Result<usize> {
        let esize = if self.extended { 16 } else { 8 };
        let stored = self.in_file(offset, self.cs).div_ceil(esize);
        let mut buf = std::mem::take(&mut self.l2);
        let r = self.read_padded(&mut buf[..(stored * esize) as usize], offset);
        self.l2 = buf;
        r.map(|()| stored as usize)
    }

    fn l2_entry(&self, i: usize) -> (u64, u64) {
        if self.extended {
            let at = i * 16;
            (
                BigEndian::read_u64(&self.l2[at..at + 8]),
                BigEndian::read_u64(&self.l2[at + 8..at + 16]),
            )
        } else {
            (BigEndian::read_u64(&self.l2[i * 8..i * 8 + 8]), 0)
        }
    }

    fn walk_l2(&mut self, offset: u64, active: bool) -> Result<()> {
        let stored = self.load_l2(offset)?;
        let mut next_contiguous = 0u64;
        for i in 0..stored {
            let (mut e, bitmap) = self.l2_entry(i);
            if e == 0 && bitmap == 0 {
                continue;
            }
            let kind = self.kind(e);
            if kind != Kind::Compressed {
                if e & L2_STD_RESERVED != 0 {
                    self.corruption(format!(
                        "ERROR found l2 entry with reserved bits set: {e:x}"
                    ));
                }
                if e & ZERO != 0 && self.h.version < 3 {
                    self.corruption(format!(
                        "ERROR zero cluster entry found in pre-v3 image: l2_entry={e:x}"
                    ));
                }
            }
            match kind {
                Kind::Compressed => {
                    if e & COPIED != 0 {
                        let (coffset, _) = self.compressed_range(e);
                        self.corruption(format!(
                            "ERROR: coffset={coffset:#x}: copied flag must never be set for \
                             compressed clusters"
                        ));
                        e &= !COPIED;
                    }
                    if self.data_file {
                        self.corruption(format!(
                            "ERROR compressed cluster {i} with data file, entry={e:#x}"
                        ));
                        continue;
                    }
                    if bitmap != 0 {
                        self.corruption(format!(
                            "ERROR compressed cluster {i} with non-zero subcluster allocation \
                             bitmap, entry={e:#x}"
                        ));
                        continue;
                    }
                    let (coffset, csize) = self.compressed_range(e);
                    self.reference(coffset, csize);
                    if active {
                        self.report.allocated_clusters += 1;
                        self.report.compressed_clusters += 1;
                        self.report.fragmented_clusters += 1;
                    }
                }
                Kind::Normal | Kind::ZeroAlloc => {
                    let host = e & L2_OFFSET_MASK;
                    if (bitmap >> 32) & bitmap != 0 {
                        self.corruption(format!(
                            "ERROR offset={host:x}: Allocated cluster has corrupted subcluster \
                             allocation bitmap"
                        ));
                    }
                    if host % self.cs != 0 {
                        let has_data = if self.extended {
                            bitmap & ALL_ALLOC != 0
                        } else {
                            e & ZERO == 0
                        };
                        self.corruption(if has_data {
                            format!(
                                "ERROR offset={host:x}: Data cluster is not properly aligned; \
                                 L2 entry corrupted."
                            )
                        } else {
                            format!(
                                "ERROR offset={host:x}: Preallocated cluster is not properly \
                                 aligned; L2 entry corrupted."
                            )
                        });
                    }
                    if active {
                        self.report.allocated_clusters += 1;
                        if next_contiguous != 0 && host != next_contiguous {
                            self.report.fragmented_clusters += 1;
                        }
                        next_contiguous = host.wrapping_add(self.cs);
                    }
                    if !self.data_file {
                        self.reference(host, self.cs);
                    }
                }
                Kind::ZeroPlain => {}
                Kind::Unallocated => {
                    if bitmap & ALL_ALLOC != 0 {
                        self.corruption(
                            "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                                .to_string(),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// The snapshot table (leniently: problems of single entries are corruptions) and every
    /// snapshot's L1 tree.
    fn snapshots(&mut self, snaps: &[SnapshotL1], table_bytes: u64) -> Result<()> {
        if self.data_file && !snaps.is_empty() {
            self.corruption(format!(
                "ERROR {} snapshots in image with data file",
                snaps.len()
            ));
        }
        for s in snaps {
            if s.l1_offset % self.cs != 0 {
                self.corruption(format!(
                    "ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; \
                     snapshot table entry corrupted",
                    s.id, s.name, s.l1_offset
                ));
                continue;
            }
            if u64::from(s.l1_size) > MAX_SNAPSHOT_L1_ENTRIES {
                self.corruption(format!(
                    "ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; snapshot \
                     table entry corrupted",
                    s.id, s.name, s.l1_size
                ));
                continue;
            }
            self.walk_l1(s.l1_offset, s.l1_size, false)?;
        }
        self.reference(self.h.snapshots_offset, table_bytes);
        Ok(())
    }

    /// The snapshot entries and the table's length in bytes. Limits as qemu's (count, extra
    /// data, table size); beyond them the check fails.
    fn read_snapshot_table(&self) -> Result<(Vec<SnapshotL1>, u64)> {
        let start = self.h.snapshots_offset;
        let mut snaps = Vec::new();
        let mut pos = 0u64; // relative to start
        for i in 0..self.h.nb_snapshots {
            pos = pos.div_ceil(8) * 8;
            if pos + 40 > MAX_SNAPSHOT_TABLE {
                return Err(Error::new(ErrorKind::TooLarge, "snapshot table is too big"));
            }
            let mut fixed = [0u8; 40];
            self.read_meta(&mut fixed, start.saturating_add(pos))?;
            let id_len = u64::from(BigEndian::read_u16(&fixed[12..14]));
            let name_len = u64::from(BigEndian::read_u16(&fixed[14..16]));
            let extra = BigEndian::read_u32(&fixed[36..40]);
            if extra > header::MAX_SNAPSHOT_EXTRA {
                return Err(Error::new(
                    ErrorKind::TooLarge,
                    format!("too much extra metadata in snapshot table entry {i}"),
                ));
            }
            let names_at = pos + 40 + u64::from(extra);
            let end = names_at + id_len + name_len;
            if end > MAX_SNAPSHOT_TABLE {
                return Err(Error::new(ErrorKind::TooLarge, "snapshot table is too big"));
            }
            let mut names = vec![0u8; (id_len + name_len) as usize];
            self.read_meta(&mut names, start.saturating_add(names_at))?;
            let (id, name) = names.split_at(id_len as usize);
            // Shown as C strings, as qemu does.
            let c_str = |b: &[u8]| b.split(|&c| c == 0).next().unwrap_or_default().to_vec();
            let (id, name) = (c_str(id), c_str(name));
            snaps.push(SnapshotL1 {
                incomplete: self.h.version >= 3 && extra < 16,
                id: String::from_utf8_lossy(&id).into_owned(),
                name: String::from_utf8_lossy(&name).into_owned(),
                l1_offset: BigEndian::read_u64(&fixed[0..8]),
                l1_size: BigEndian::read_u32(&fixed[8..12]),
            });
            pos = end;
        }
        Ok((snaps, pos))
    }

    /// The bitmap directory and every bitmap table and data cluster (only when the bitmaps
    /// extension is valid, as qemu ignores it otherwise).
    fn bitmaps(&mut self) -> Result<()> {
        let Some(ext) = self.bitmaps.take() else {
            return Ok(());
        };
        self.reference(ext.dir_offset, ext.dir_size);
        let tables = match self.read_bitmap_directory(&ext) {
            Ok(t) => t,
            Err(why) => {
                self.corruption(format!("ERROR bitmap directory is invalid: {why}"));
                return Err(corrupt!("bitmap directory is invalid: {why}"));
            }
        };
        for (n, t) in tables.iter().enumerate() {
            self.reference(t.offset, t.entries * 8);
            if !readable(t.offset, t.entries * 8) {
                self.corruption(format!("ERROR bitmap {n} table cannot be read"));
                return Err(corrupt!(
                    "bitmap {n} table at {:#x} cannot be read",
                    t.offset
                ));
            }
            // One invalid entry makes the whole table unusable (qemu cannot load it, and fails).
            self.for_each_entry(t.offset, t.entries, |c, i, e| {
                if !super::bitmaps::entry_is_valid(e, c.cs) {
                    c.corruption(format!(
                        "ERROR bitmap {n} table entry {i} is invalid: {e:#x}"
                    ));
                    return Err(corrupt!("bitmap {n} table entry {i} is invalid: {e:#x}"));
                }
                if let Some(off) = super::bitmaps::data_cluster(e) {
                    c.reference(off, c.cs);
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    fn read_bitmap_directory(
        &self,
        ext: &BitmapsExt,
    ) -> std::result::Result<Vec<BitmapTable>, String> {
        if ext
            .dir_offset
            .checked_add(ext.dir_size)
            .is_none_or(|end| end > self.file_len)
        {
            return Err("it lies past the end of the file".into());
        }
        let mut dir = vec![0u8; ext.dir_size as usize];
        self.read_padded(&mut dir, ext.dir_offset)
            .map_err(|e| e.to_string())?;
        let list = super::bitmaps::parse_directory(&dir, ext.count, self.h.size, self.cs)?;
        Ok(list
            .iter()
            .map(|b| BitmapTable {
                offset: b.table_offset,
                entries: b.table_entries,
            })
            .collect())
    }

    /// Refcount blocks: each referenced once, and checked for alignment and position.
    fn refblocks(&mut self) {
        for i in 0..self.reftable.len() {
            let e = self.reftable[i];
            if e == 0 {
                continue;
            }
            let off = e & REFT_OFFSET_MASK;
            let cluster = off >> self.cbits;
            if e & REFT_RESERVED_MASK != 0 {
                self.corruption(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                continue;
            }
            if off % self.cs != 0 {
                self.corruption(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry \
                     corrupted"
                ));
                continue;
            }
            if cluster >= self.expected.len {
                self.corruption(format!("ERROR refcount block {i} is outside image"));
                continue;
            }
            self.reference(off, self.cs);
            let n = self.expected.get(cluster);
            if n != 1 {
                self.corruption(format!("ERROR refcount block {i} refcount={n}"));
            }
        }
    }

    /// The stored refcount of cluster `c`.
    fn stored_refcount(&mut self, c: u64) -> std::result::Result<u64, RefError> {
        let per_block_bits = self.cbits + 3 - self.h.refcount_order;
        let Some(&e) = self.reftable.get((c >> per_block_bits) as usize) else {
            return Ok(0);
        };
        let off = e & REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(0);
        }
        if off % self.cs != 0 || !readable(off, self.cs) {
            return Err(RefError::Unreadable);
        }
        let idx = c & ((1u64 << per_block_bits) - 1);
        if let Some(pos) = self.refblocks.iter().position(|(o, _)| *o == off) {
            // Most recently used first.
            let hit = self.refblocks.remove(pos);
            self.refblocks.insert(0, hit);
        } else {
            let mut block = if self.refblocks.len() >= REFBLOCK_CACHE {
                self.refblocks.pop().map(|(_, b)| b).unwrap_or_default()
            } else {
                vec![0u8; self.cs as usize]
            };
            self.read_padded(&mut block, off).map_err(RefError::Io)?;
            self.refblocks.insert(0, (off, block));
        }
        Ok(self.geo.get(&self.refblocks[0].1, idx))
    }

    /// Compare expected and stored refcounts; returns the highest cluster index with either.
    fn compare(&mut self) -> Result<u64> {
        let mut highest = 0u64;
        for c in 0..self.expected.len {
            let stored = match self.stored_refcount(c) {
                Ok(v) => v,
                Err(RefError::Io(e)) => return Err(e),
                Err(RefError::Unreadable) => {
                    self.report.check_errors += 1;
                    self.say(&format!(
                        "Can't get refcount for cluster {c}: Input/output error"
                    ));
                    continue;
                }
            };
            let expected = self.expected.get(c);
            if stored > 0 || expected > 0 {
                highest = c;
            }
            if stored < expected {
                self.corruption(format!(
                    "ERROR cluster {c} refcount={stored} reference={expected}"
                ));
            } else if stored > expected {
                self.report.leaks += 1;
                self.say(&format!(
                    "Leaked cluster {c} refcount={stored} reference={expected}"
                ));
            }
        }
        Ok(highest)
    }

    /// COPIED must be set exactly on the active L1 and L2 entries whose cluster has refcount 1.
    fn copied_flags(&mut self) -> Result<()> {
        let (l1, n) = (self.h.l1_table_offset, u64::from(self.h.l1_size));
        self.for_each_entry(l1, n, |c, i, e| {
            let l2 = e & L1_OFFSET_MASK;
            if l2 == 0 {
                return Ok(());
            }
            match c.stored_refcount(l2 >> c.cbits) {
                Ok(rc) => {
                    if (rc == 1) != (e & COPIED != 0) {
                        c.corruption(format!(
                            "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} \
                             refcount={rc}"
                        ));
                    }
                }
                Err(RefError::Io(err)) => return Err(err),
                Err(RefError::Unreadable) => {}
            }
            let stored = c.load_l2(l2)?;
            for j in 0..stored {
                let (e, _) = c.l2_entry(j);
                if !matches!(c.kind(e), Kind::Normal | Kind::ZeroAlloc) {
                    continue;
                }
                let rc = if c.data_file {
                    1
                } else {
                    match c.stored_refcount((e & L2_OFFSET_MASK) >> c.cbits) {
                        Ok(rc) => rc,
                        Err(RefError::Io(err)) => return Err(err),
                        Err(RefError::Unreadable) => continue,
                    }
                };
                if (rc == 1) != (e & COPIED != 0) {
                    c.corruption(format!(
                        "ERROR OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}"
                    ));
                }
            }
            Ok(())
        })
    }
}

/// Whether qemu's block layer would perform a read of `len` bytes at `off`.
fn readable(off: u64, len: u64) -> bool {
    off.checked_add(len).is_some_and(|end| end <= MAX_IO_END)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemIo;
    use crate::qcow2::header::tests::minimal_v3;

    /// A clean 64 KiB-cluster image: header, reftable at 1, refblock at 2, L1 at 3, L2 at 4,
    /// one data cluster at 5 for guest cluster 0.
    fn clean() -> Vec<u8> {
        let cs = 65536usize;
        let mut img = minimal_v3(512 << 20);
        img.resize(6 * cs, 0);
        BigEndian::write_u64(&mut img[cs..], 2 * cs as u64);
        for c in 0..6 {
            BigEndian::write_u16(&mut img[2 * cs + 2 * c..], 1);
        }
        BigEndian::write_u64(&mut img[3 * cs..], COPIED | (4 * cs as u64));
        BigEndian::write_u64(&mut img[4 * cs..], COPIED | (5 * cs as u64));
        img
    }

    fn run(img: Vec<u8>) -> CheckReport {
        check(&MemIo::new(img)).unwrap()
    }

    #[test]
    fn clean_image() {
        let r = run(clean());
        assert_eq!(r.messages, Vec::<String>::new());
        assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0));
        assert_eq!(r.total_clusters, 8192);
        assert_eq!(r.allocated_clusters, 1);
        assert_eq!(r.image_end_offset, 6 * 65536);
        assert_eq!(r.exit_code(), 0);
        assert!(
            r.to_human()
                .starts_with("No errors were found on the image.\n1/8192 = ")
        );
    }

    #[test]
    fn leak_and_corruption() {
        let cs = 65536;
        let mut img = clean();
        BigEndian::write_u16(&mut img[2 * cs + 2 * 5..], 2); // data cluster: leak + COPIED
        BigEndian::write_u16(&mut img[2 * cs + 2 * 4..], 0); // L2 table: corruption + COPIED
        let r = run(img);
        assert_eq!(r.leaks, 1);
        assert_eq!(r.corruptions, 3, "{:?}", r.messages);
        assert!(
            r.messages
                .contains(&"Leaked cluster 5 refcount=2 reference=1".to_string())
        );
        assert!(
            r.messages
                .contains(&"ERROR cluster 4 refcount=0 reference=1".to_string())
        );
        assert_eq!(r.exit_code(), 2);
    }

    #[test]
    fn shared_data_cluster_and_bad_entries() {
        let cs = 65536;
        let mut img = clean();
        // Guest cluster 1 also maps host cluster 5; guest cluster 2 has a reserved bit.
        BigEndian::write_u64(&mut img[4 * cs + 8..], COPIED | (5 * cs as u64));
        BigEndian::write_u64(&mut img[4 * cs + 16..], 1 << 57);
        let r = run(img);
        // Refcount 1 < 2 references; the reserved bit. COPIED with refcount 1 is right.
        assert_eq!(r.corruptions, 2, "{:?}", r.messages);
        assert_eq!(r.fragmented_clusters, 1);
    }

    #[test]
    fn hostile_offsets_do_not_panic() {
        let cs = 65536;
        let mut img = clean();
        // A compressed entry with COPIED, reaching far past the end; a reftable entry with
        // reserved bits and an absurd offset.
        BigEndian::write_u64(&mut img[4 * cs + 24..], u64::MAX);
        BigEndian::write_u64(&mut img[cs + 8..], u64::MAX);
        let r = run(img);
        assert_eq!(r.corruptions, 3, "{:?}", r.messages);
        assert!(r.messages[1].starts_with("ERROR: counting reference for region exceeding"));
    }

    /// A file that claims to be larger than it is.
    #[derive(Debug)]
    struct Huge(Vec<u8>, u64);

    impl BlockIo for Huge {
        fn size(&self) -> std::io::Result<u64> {
            Ok(self.1)
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
            MemIo::new(self.0.clone()).read_at(buf, offset)
        }
        fn write_all_at(&self, _: &[u8], _: u64) -> std::io::Result<()> {
            Err(std::io::ErrorKind::Unsupported.into())
        }
    }

    #[test]
    fn too_many_clusters_is_refused() {
        let img = clean();
        // A larger file than the data reaches is fine (the rest reads as zeros).
        let r = check(&Huge(img.clone(), 1 << 30)).unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0));
        assert_eq!(r.image_end_offset, 6 * 65536);
        let huge = Huge(img, MAX_CLUSTERS * 65536 + 1);
        assert_eq!(check(&huge).unwrap_err().kind(), ErrorKind::TooLarge);
    }

    #[test]
    fn json_keys_in_qemu_order() {
        let r = CheckReport {
            corruptions: 1,
            image_end_offset: 512,
            total_clusters: 4,
            ..CheckReport::default()
        };
        assert_eq!(
            r.to_json("a\"b", Format::Qcow2, None),
            "{\n    \"image-end-offset\": 512,\n    \"total-clusters\": 4,\n    \
             \"corruptions\": 1,\n    \"check-errors\": 0,\n    \"filename\": \"a\\\"b\",\n    \
             \"format\": \"qcow2\"\n}\n"
        );
    }
}
