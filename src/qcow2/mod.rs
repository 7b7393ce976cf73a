//! QCOW2 reading: header and tables ([`header`], [`snapshot`]), cluster mapping through L1/L2
//! (standard and extended L2), zero and compressed clusters (deflate and zstd), backing files
//! and external data files (opened by [`crate::image`] under the caller's policy).
//!
//! One model, two access strategies: this random-access reader ([`Qcow2`]) and the streaming
//! reader ([`stream`]) decode every entry through [`entry`] and parse the header and snapshot
//! table with the same code, so "is this image valid" is decided in one place. Every table
//! entry is checked before use (reserved bits, alignment, bounds). The L1 table is held in
//! memory (at most 32 MiB, qemu's limit); L2 tables go through a bounded cache.

pub mod bitmaps;
pub mod check;
pub mod header;
pub mod model;
pub mod refcount;
pub mod snapshot;
pub mod writer;

mod cache;
pub mod compressed;
pub mod entry;
pub mod stream;

use crate::error::{Error, ErrorKind, Result, corrupt};
use crate::image::{Extent, Image};
use crate::io::BlockIo;
use byteorder::{BigEndian, ByteOrder};
use cache::L2Cache;
#[allow(unused_imports)]
use entry::{COMPRESSED, COPIED, L1_OFFSET_MASK, L1_RESERVED_MASK, L2_OFFSET_MASK, ZERO};
use entry::{Metadata, Rules, Unit};
pub use header::{CompressionType, Header};
pub use snapshot::Snapshot;
use std::sync::{Arc, OnceLock};

/// Upper bound on the L2 cache, whatever the cluster size.
const L2_CACHE_BYTES: usize = 8 << 20;
/// Most L2 tables cached, whatever their size: with 512-byte clusters 8 MiB would be 16 384
/// tables, each covering only 32 KiB of guest, and a convert reads each once (the cache then
/// costs memory and evictions, not reads saved).
const MAX_L2_TABLES: usize = 256;
/// The L1 table is read in pieces of this size.
const L1_READ_PIECE: u64 = 64 << 10;
/// Refcount table entry: offset bits of the refcount block.
const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Most refcount block bytes read to guess whether an image is preallocated (hostile images
/// could otherwise make the guess read without end; real images need far less).
const PREALLOC_SCAN_BYTES: u64 = 256 << 20;

/// An open qcow2 image.
#[derive(Debug)]
pub struct Qcow2 {
    io: Arc<dyn BlockIo>,
    data: Option<Arc<dyn BlockIo>>,
    header: Header,
    size: u64,
    l1: Vec<u64>,
    l2_cache: L2Cache,
    backing: Option<Box<Image>>,
    snapshots: Vec<Snapshot>,
    file_size: u64,
    /// The entry rules of this image.
    rules: Rules,
    /// The L1 and L2 clusters, which data may not alias.
    metadata: Metadata,
    /// qemu's guess whether the image has preallocated metadata, made on first use.
    prealloc: OnceLock<bool>,
}

impl Qcow2 {
    /// Open the qcow2 image in `io`, reading the active L1 table, or snapshot `snapshot`'s.
    /// Backing and data files are attached afterwards by the caller ([`Qcow2::set_backing`],
    /// [`Qcow2::set_data_file`]).
    pub fn open(io: Arc<dyn BlockIo>, snapshot: Option<&str>) -> Result<Qcow2> {
        Self::open_with(io, snapshot, false)
    }

    /// [`Qcow2::open`]; with `refuse_external`, an image naming a backing file or an
    /// external data file is refused right after its header (as the streaming reader does,
    /// so both give the same verdict on untrusted input).
    pub fn open_with(
        io: Arc<dyn BlockIo>,
        snapshot: Option<&str>,
        refuse_external: bool,
    ) -> Result<Qcow2> {
        let file_size = io.size().map_err(|e| Error::io("cannot stat image", e))?;
        let head = header::read_cluster0(io.as_ref(), file_size)?;
        if refuse_external {
            // Named files are refused before anything that needs the file's length, as the
            // streaming reader (which learns the length last) does.
            Header::parse(&head, u64::MAX)?.refuse_external_files()?;
        }
        let header = Header::parse(&head, file_size)?;
        let snapshots = snapshot::read_table(io.as_ref(), &header, file_size)?;
        // A snapshot is read with the image's current virtual size, as qemu-img convert -l
        // does (qcow2_snapshot_load_tmp swaps only the L1 table): clusters past the snapshot's
        // own size read as zeros.
        let size = header.size;
        let (l1_offset, l1_size) = match snapshot {
            None => (header.l1_table_offset, header.l1_size),
            Some(spec) => {
                let s = snapshot::find(&snapshots, spec).ok_or_else(|| {
                    Error::new(ErrorKind::NotFound, format!("snapshot '{spec}' not found"))
                })?;
                (s.l1_table_offset, s.l1_size)
            }
        };
        let l1_bytes = u64::from(l1_size) * 8;
        if l1_bytes > 0
            && l1_offset
                .checked_add(l1_bytes)
                .is_none_or(|end| end > file_size)
        {
            return Err(corrupt!(
                "L1 table at {l1_offset:#x} ({l1_size} entries) runs past end of file"
            ));
        }
        // Read in pieces into the decoded table, so a 32 MiB L1 costs 32 MiB and not twice that.
        let mut l1: Vec<u64> = Vec::with_capacity(l1_size as usize);
        let mut piece = vec![0u8; l1_bytes.min(L1_READ_PIECE) as usize];
        let mut done = 0;
        while done < l1_bytes {
            let raw = &mut piece[..(l1_bytes - done).min(L1_READ_PIECE) as usize];
            io.read_exact_at(raw, l1_offset + done)
                .map_err(|e| Error::io("cannot read L1 table", e))?;
            l1.extend(raw.chunks_exact(8).map(BigEndian::read_u64));
            done += raw.len() as u64;
        }
        drop(piece);
        let rules = Rules::of(&header);
        let needed = header.l1_entries_for(size).unwrap_or(0) as usize;
        let tables: Vec<u64> = l1
            .iter()
            .take(needed)
            .map(|e| e & L1_OFFSET_MASK)
            .filter(|&o| o != 0)
            .collect();
        let metadata = Metadata::new(&rules, l1_offset, l1_bytes, tables);
        let table_bytes = header.cluster_size() as usize;
        let l2_cache = L2Cache::new((L2_CACHE_BYTES / table_bytes).clamp(2, MAX_L2_TABLES));
        let has_data_file = header.data_file.is_some();
        Ok(Qcow2 {
            data: if has_data_file {
                None
            } else {
                Some(io.clone())
            },
            io,
            header,
            size,
            l1,
            l2_cache,
            backing: None,
            snapshots,
            file_size,
            rules,
            metadata,
            prealloc: OnceLock::new(),
        })
    }

    /// Attach the opened backing image.
    pub fn set_backing(&mut self, backing: Image) {
        self.backing = Some(Box::new(backing));
    }

    /// Attach the opened external data file.
    pub fn set_data_file(&mut self, data: Arc<dyn BlockIo>) {
        self.data = Some(data);
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The internal snapshots.
    pub fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }

    /// The attached backing image, if any.
    pub fn backing(&self) -> Option<&Image> {
        self.backing.as_deref()
    }

    /// Virtual size of the image (also when reading a snapshot, as qemu does).
    pub fn virtual_size(&self) -> u64 {
        self.size
    }

    /// The image file.
    pub fn file(&self) -> &Arc<dyn BlockIo> {
        &self.io
    }

    fn cluster_bits(&self) -> u32 {
        self.header.cluster_bits
    }

    fn unit_size(&self) -> u64 {
        1 << self.rules.unit_bits()
    }

    /// Load the L2 table for guest cluster index `cluster` (None: L1 says unallocated).
    fn l2_for(&self, cluster: u64) -> Result<Option<Arc<[u64]>>> {
        let l1_index = cluster / self.header.l2_entries();
        let Some(&entry) = self.l1.get(l1_index as usize) else {
            return Ok(None);
        };
        let Some(off) = self.rules.l1_entry(l1_index, entry)? else {
            return Ok(None);
        };
        self.metadata.check_l2(off)?;
        if off >= self.file_size {
            return Err(corrupt!("L2 table offset {off:#x} lies past end of file"));
        }
        let cs = self.header.cluster_size();
        self.l2_cache.get_or_load(off, || {
            let mut raw = vec![0u8; cs as usize];
            self.io
                .read_at_zero_padded(&mut raw, off)
                .map_err(|e| Error::io("cannot read L2 table", e))?;
            Ok(raw.chunks_exact(8).map(BigEndian::read_u64).collect())
        })
    }

    /// Classify unit `sub` of guest cluster `cluster` through its L2 table.
    fn classify(&self, table: Option<&[u64]>, cluster: u64, sub: u64) -> Result<Unit> {
        let Some(table) = table else {
            return Ok(Unit::Unallocated { host: None });
        };
        let idx = (cluster % self.header.l2_entries()) as usize;
        let ext = self.rules.extended;
        let (entry, bitmap) = if ext {
            (table[idx * 2], table[idx * 2 + 1])
        } else {
            (table[idx], 0)
        };
        let m = self.rules.l2_entry(cluster, entry, bitmap)?;
        let unit = self.rules.unit(m, sub as u32);
        match unit {
            Unit::Data { host } => {
                self.metadata
                    .check_data(host, self.unit_size(), self.cluster_bits())?;
                if !self.rules.data_file && host >= self.file_size {
                    return Err(entry::data_past_end(host));
                }
            }
            Unit::Compressed { offset, size } => {
                self.metadata
                    .check_data(offset, size, self.cluster_bits())?
            }
            _ => {}
        }
        Ok(unit)
    }

    /// The longest run starting at `off` (at most `max` bytes, within one L2 table) whose
    /// units are stored alike: same kind, and contiguous on the host for data.
    fn run(&self, off: u64, max: u64) -> Result<(Unit, u64)> {
        let unit_bits = self.cluster_bits() - self.rules.unit_bits();
        let ubits = self.rules.unit_bits();
        let usize_ = self.unit_size();
        let first_unit = off >> ubits;
        let cluster = off >> self.cluster_bits();
        let table = self.l2_for(cluster)?;
        let per_table_units = self.header.l2_entries() << unit_bits;
        let table_end_unit = (first_unit / per_table_units + 1) * per_table_units;
        let sub_mask = (1u64 << unit_bits) - 1;
        if table.is_none() {
            return Ok((
                Unit::Unallocated { host: None },
                (table_end_unit * usize_ - off).min(max),
            ));
        }
        let first = self.classify(table.as_deref(), cluster, first_unit & sub_mask)?;
        let within = off & (usize_ - 1);
        let in_first = usize_ - within;
        // Host offsets are those of `off` itself, not of the start of its unit.
        let first = match first {
            Unit::Data { host } => Unit::Data {
                host: host + within,
            },
            Unit::Zero { host: Some(h) } => Unit::Zero {
                host: Some(h + within),
            },
            Unit::Unallocated { host: Some(h) } => Unit::Unallocated {
                host: Some(h + within),
            },
            other => other,
        };
        let mut len = in_first.min(max);
        if let Unit::Compressed { .. } = first {
            // One cluster at a time; compressed units are handled individually.
            let cs = self.header.cluster_size();
            return Ok((first, (cs - (off & (cs - 1))).min(max)));
        }
        let mut u = first_unit + 1;
        while len < max && u < table_end_unit {
            let next = self.classify(table.as_deref(), u >> unit_bits, u & sub_mask)?;
            let same = match (first, next) {
                (Unit::Unallocated { host: None }, Unit::Unallocated { host: None }) => true,
                (Unit::Zero { host: None }, Unit::Zero { host: None }) => true,
                (Unit::Unallocated { host: Some(a) }, Unit::Unallocated { host: Some(b) })
                | (Unit::Zero { host: Some(a) }, Unit::Zero { host: Some(b) })
                | (Unit::Data { host: a }, Unit::Data { host: b }) => b == a + len,
                _ => false,
            };
            if !same {
                break;
            }
            len = (len + usize_).min(max);
            u += 1;
        }
        Ok((first, len))
    }

    /// qemu's `qcow2_detect_metadata_preallocation`: true when clearly more clusters of the
    /// image file have a non-zero refcount than the file has allocated space for (at least
    /// max(n * 10 / 9, n + 2) for n allocated clusters). Only for such images does qemu look
    /// for holes of the file under data clusters when reporting block status. Errors count as
    /// "no", as in qemu.
    fn metadata_preallocated(&self) -> bool {
        *self
            .prealloc
            .get_or_init(|| self.detect_metadata_preallocation().unwrap_or(false))
    }

    fn detect_metadata_preallocation(&self) -> Result<bool> {
        let h = &self.header;
        let cs = h.cluster_size();
        let Some(real) = self.io.allocated_bytes().ok().flatten() else {
            return Ok(false);
        };
        let real_clusters = real / cs;
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        // qemu measures the file in whole sectors.
        let end_cluster = (self.file_size.div_ceil(512) * 512).div_ceil(cs);
        let geo = refcount::Geometry::of(h);
        let per_block = geo.entries_per_block();
        let table_entries = u64::from(h.refcount_table_clusters) * cs / 8;
        let needed = end_cluster.div_ceil(per_block).min(table_entries);
        let mut table = vec![0u8; (needed * 8) as usize];
        self.io
            .read_at_zero_padded(&mut table, h.refcount_table_offset)
            .map_err(|e| Error::io("cannot read refcount table", e))?;
        let mut block = vec![0u8; cs as usize];
        let mut budget = PREALLOC_SCAN_BYTES;
        let mut count = 0u64;
        for (t, entry) in table.chunks_exact(8).enumerate() {
            let off = BigEndian::read_u64(entry) & REFT_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if off % cs != 0 {
                return Err(corrupt!("refcount block offset {off:#x} is not aligned"));
            }
            if budget < cs {
                return Ok(false);
            }
            budget -= cs;
            self.io
                .read_at_zero_padded(&mut block, off)
                .map_err(|e| Error::io("cannot read refcount block", e))?;
            let first = t as u64 * per_block;
            let n = per_block.min(end_cluster - first) as usize;
            count += (0..n).filter(|&j| geo.get(&block, j as u64) != 0).count() as u64;
            if count >= threshold {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn data_io(&self) -> Result<&Arc<dyn BlockIo>> {
        self.data
            .as_ref()
            .ok_or_else(|| Error::new(ErrorKind::Denied, "external data file was not opened"))
    }

    /// What backs guest range `off..off+max` from `off` on, as qemu-img map reports it.
    pub fn extent(&self, off: u64, max: u64) -> Result<Extent> {
        let max = max.min(self.size.saturating_sub(off));
        if max == 0 {
            return Err(Error::invalid(format!(
                "offset {off} is past the end of the image"
            )));
        }
        let (unit, len) = self.run(off, max)?;
        Ok(match unit {
            // Beyond the end of the backing file (or without one) qemu reports zeros at this
            // level, depth 0.
            Unit::Unallocated { host } => match &self.backing {
                Some(b) if off < b.virtual_size() => {
                    let mut e = b.extent(off, len.min(b.virtual_size() - off))?;
                    e.depth += 1;
                    e
                }
                _ => Extent {
                    len,
                    zero: true,
                    offset: host,
                    ..Extent::default()
                },
            },
            // qemu reports a zero cluster that keeps its allocation with its host offset,
            // but not as data.
            Unit::Zero { host } => Extent {
                len,
                present: true,
                zero: true,
                offset: host,
                ..Extent::default()
            },
            Unit::Compressed { .. } => Extent {
                len,
                present: true,
                data: true,
                compressed: true,
                ..Extent::default()
            },
            Unit::Data { host } => {
                let data = self.data_io()?;
                let mut e = Extent {
                    len,
                    present: true,
                    data: true,
                    offset: Some(host),
                    ..Extent::default()
                };
                // A data cluster over a hole of the file reads as zeros. Like qemu, only look
                // for such holes in images that seem to be preallocated (many more clusters
                // referenced than the file has space for); elsewhere they are reported as data.
                if !self.metadata_preallocated() {
                    return Ok(e);
                }
                match data.next_data(host) {
                    Ok(Some(r)) if r.start > host => {
                        e.zero = true;
                        e.len = len.min(r.start - host);
                    }
                    Ok(Some(r)) => e.len = len.min(r.end - host),
                    Ok(None) => e.zero = true,
                    Err(_) => {}
                }
                e
            }
        })
    }

    /// Read guest bytes `off..off+buf.len()`; the range must lie within the virtual size.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let end = off
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| Error::invalid("read past the end of the image"))?;
        let mut pos = off;
        let mut batch = compressed::Batch::default();
        while pos < end {
            let (unit, len) = self.run(pos, end - pos)?;
            let at = (pos - off) as usize;
            let dst = &mut buf[at..at + len as usize];
            if let Unit::Compressed { offset, size } = unit {
                if !batch.push(pos, offset, size, len) {
                    self.flush_compressed(&mut batch, buf, off)?;
                    batch.push(pos, offset, size, len);
                }
                pos += len;
                continue;
            }
            match unit {
                Unit::Unallocated { .. } => self.read_backing(dst, pos)?,
                Unit::Zero { .. } => dst.fill(0),
                Unit::Data { host } => self
                    .data_io()?
                    .read_at_zero_padded(dst, host)
                    .map_err(|e| Error::io(format!("cannot read data cluster at {host:#x}"), e))?,
                Unit::Compressed { .. } => unreachable!("handled above"),
            }
            pos += len;
        }
        self.flush_compressed(&mut batch, buf, off)
    }

    fn flush_compressed(
        &self,
        batch: &mut compressed::Batch,
        buf: &mut [u8],
        buf_off: u64,
    ) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let r = compressed::decode_batch(
            self.io.as_ref(),
            self.file_size,
            self.header.compression_type,
            self.header.cluster_size(),
            batch,
            buf,
            buf_off,
        );
        batch.clear();
        r
    }

    fn read_backing(&self, dst: &mut [u8], pos: u64) -> Result<()> {
        let Some(b) = &self.backing else {
            if self.header.backing_file.is_some() {
                return Err(Error::new(ErrorKind::Denied, "backing file was not opened"));
            }
            dst.fill(0);
            return Ok(());
        };
        let bsize = b.virtual_size();
        let n = if pos >= bsize {
            0
        } else {
            (bsize - pos).min(dst.len() as u64) as usize
        };
        if n > 0 {
            b.read_at(&mut dst[..n], pos)?;
        }
        dst[n..].fill(0);
        Ok(())
    }

    /// File length of the image file.
    pub fn file_size(&self) -> u64 {
        self.file_size
    }
}
