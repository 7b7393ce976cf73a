//! In-place changes to existing qcow2 images (resize, internal snapshots, refcount repair),
//! done crash-safely by shadow rewriting.
//!
//! The image's whole mapping metadata (active L1, snapshot L1s, every L2 table, the snapshot
//! table) is loaded into a [`Model`] and changed in memory. [`Model::commit`] then writes the
//! changed metadata to fresh clusters past the end of the file, followed by a complete new set
//! of refcount structures computed from it (so `COPIED` flags and refcounts always agree), and
//! finally switches the header to the new tables with one small write. Data clusters never move
//! and old metadata is never overwritten: a crash at any instant leaves either the old image or
//! the new one, and at worst unreferenced clusters with refcount 0 (not even leaks).
//!
//! Memory is proportional to the metadata (1/8192 of the virtual size with 64 KiB clusters).

use super::bitmaps::{self, Bitmap, FLAG_AUTO, FLAG_IN_USE};
use super::header::{Header, incompat};
use super::refcount::{self, Geometry};
use super::snapshot::{self, Snapshot};
use crate::error::{Error, ErrorKind, Result, corrupt};
use crate::io::BlockIo;
use byteorder::{BigEndian, ByteOrder};
use std::collections::HashMap;
use std::sync::Arc;

const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Host clusters a model may track (bounds the refcount array: 2^28 clusters = 16 TiB at 64 KiB).
const MAX_HOST_CLUSTERS: u64 = 1 << 28;

/// Most bytes of bitmap tables a model holds (all bitmaps together).
const MAX_BITMAP_TABLE_BYTES: u64 = 64 << 20;

/// One L1 table: per index, the id of its L2 table in [`Model`]'s table list.
type L1 = Vec<Option<usize>>;

/// An image's mapping metadata, loaded for modification.
#[derive(Debug)]
pub struct Model {
    io: Arc<dyn BlockIo>,
    header: Header,
    geo: Geometry,
    file_clusters: u64,
    /// Distinct L2 tables, raw entries with `COPIED` cleared (kept for data-file images).
    tables: Vec<Vec<u64>>,
    active: L1,
    snapshots: Vec<(Snapshot, L1)>,
    size: u64,
    /// Newly allocated data clusters (guest cluster index) from metadata preallocation.
    new_data: Vec<u64>,
    /// Guest clusters from this index to the end read as zeros in the active state (a grown
    /// area that must hide the backing file).
    zero_from: Option<u64>,
    /// A guest cluster given a new data cluster with these contents in the active state.
    rewrite: Option<(u64, Vec<u8>)>,
    /// Users of each table (L1 entries naming it), kept while data is written before commit.
    refs: Option<Vec<u64>>,
    /// Header changes the commit's final write makes (`rebase`, `amend`).
    change: HeaderChange,
    /// Persistent bitmaps, kept in place unless changed.
    bitmaps: Vec<BitmapState>,
    /// The bitmap directory must be written anew (a bitmap added, removed or changed).
    bitmaps_changed: bool,
    /// The directory as loaded: (offset, size).
    bitmap_dir: Option<(u64, u64)>,
}

/// One persistent bitmap of a [`Model`].
#[derive(Debug, Clone)]
struct BitmapState {
    meta: Bitmap,
    table: Vec<u64>,
    /// New contents to write at commit (added, cleared or merged bitmaps).
    bits: Option<Vec<u8>>,
}

/// Changes to the header itself, written by [`Model::commit`]'s final write together with the
/// new table offsets.
#[derive(Debug, Clone, Default)]
struct HeaderChange {
    /// New backing file (None: no backing) and format.
    backing: Option<Option<(String, Option<String>)>>,
    /// New version (2 or 3).
    version: Option<u32>,
    /// New refcount order.
    refcount_order: Option<u32>,
    /// Lazy refcounts on or off.
    lazy_refcounts: Option<bool>,
}

impl HeaderChange {
    fn any(&self) -> bool {
        self.backing.is_some()
            || self.version.is_some()
            || self.refcount_order.is_some()
            || self.lazy_refcounts.is_some()
    }
}

impl Model {
    /// Load every mapping table of the qcow2 image in `io` (which must be writable for
    /// [`Model::commit`]). Images with bitmaps or marked corrupt are refused.
    pub fn load(io: Arc<dyn BlockIo>) -> Result<Model> {
        Self::load_with(io, false)
    }

    /// [`Model::load`], but for repair: an image marked corrupt is accepted, and committing
    /// clears the mark (its refcounts and flags are then rebuilt from the mapping tables).
    pub fn load_for_repair(io: Arc<dyn BlockIo>) -> Result<Model> {
        Self::load_with(io, true)
    }

    fn load_with(io: Arc<dyn BlockIo>, repair: bool) -> Result<Model> {
        let file_size = io.size().map_err(|e| Error::io("cannot stat image", e))?;
        let mut head = vec![0u8; file_size.min(2 << 20) as usize];
        io.read_exact_at(&mut head, 0)
            .map_err(|e| Error::io("cannot read header", e))?;
        let header = Header::parse(&head, file_size)?;
        if header.incompatible_features & incompat::CORRUPT != 0 && !repair {
            return Err(Error::new(
                ErrorKind::Corrupt,
                "image is marked corrupt; it can be opened read-only or repaired with check -r all",
            ));
        }
        let geo = Geometry::of(&header);
        let cs = geo.cluster_size();
        let file_clusters = file_size.div_ceil(cs);
        if file_clusters > MAX_HOST_CLUSTERS {
            return Err(Error::new(
                ErrorKind::TooLarge,
                "image file too large to modify",
            ));
        }
        let snaps = snapshot::read_table(io.as_ref(), &header, file_size)?;
        let mut m = Model {
            io,
            size: header.size,
            geo,
            file_clusters,
            tables: Vec::new(),
            active: Vec::new(),
            snapshots: Vec::new(),
            header,
            new_data: Vec::new(),
            zero_from: None,
            rewrite: None,
            refs: None,
            change: HeaderChange::default(),
            bitmaps: Vec::new(),
            bitmaps_changed: false,
            bitmap_dir: None,
        };
        let dir = bitmaps::read_directory(m.io.as_ref(), &m.header, file_size)?;
        if !dir.is_empty() {
            m.bitmap_dir = m.header.bitmaps_ext.map(|(_, size, off)| (off, size));
        }
        // Every table is held: bound them together, as the mapping tables are by the L1 size.
        let table_bytes: u64 = dir.iter().map(|b| b.table_entries * 8).sum();
        if table_bytes > MAX_BITMAP_TABLE_BYTES {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!(
                    "bitmap tables of {table_bytes} bytes exceed the {MAX_BITMAP_TABLE_BYTES}-byte limit"
                ),
            ));
        }
        for meta in dir {
            let table = bitmaps::read_table(m.io.as_ref(), cs, file_size, &meta)?;
            m.bitmaps.push(BitmapState {
                meta,
                table,
                bits: None,
            });
        }
        let mut by_offset = HashMap::new();
        m.active = m.load_l1(m.header.l1_table_offset, m.header.l1_size, &mut by_offset)?;
        for s in snaps {
            let l1 = m.load_l1(s.l1_table_offset, s.l1_size, &mut by_offset)?;
            m.snapshots.push((s, l1));
        }
        Ok(m)
    }

    fn load_l1(&mut self, offset: u64, entries: u32, seen: &mut HashMap<u64, usize>) -> Result<L1> {
        let cs = self.geo.cluster_size();
        let file_size = self.file_clusters * cs;
        let bytes = u64::from(entries) * 8;
        if offset.checked_add(bytes).is_none_or(|e| e > file_size) {
            return Err(corrupt!("L1 table at {offset:#x} runs past end of file"));
        }
        let mut raw = vec![0u8; bytes as usize];
        self.io
            .read_exact_at(&mut raw, offset)
            .map_err(|e| Error::io("cannot read L1 table", e))?;
        let has_data_file = self.header.data_file.is_some();
        let ext = self.header.extended_l2();
        let mut l1 = Vec::with_capacity(entries as usize);
        for (i, e) in raw.chunks_exact(8).map(BigEndian::read_u64).enumerate() {
            if e & 0x7f00_0000_0000_01ff != 0 {
                return Err(corrupt!("L1 entry {i} has reserved bits set ({e:#x})"));
            }
            let off = e & OFFSET_MASK;
            if off == 0 {
                l1.push(None);
                continue;
            }
            if off % cs != 0 || off >= file_size || off < cs {
                return Err(corrupt!("L2 table offset {off:#x} is invalid"));
            }
            if let Some(&id) = seen.get(&off) {
                l1.push(Some(id));
                continue;
            }
            let mut t = vec![0u8; cs as usize];
            self.io
                .read_at_zero_padded(&mut t, off)
                .map_err(|e| Error::io("cannot read L2 table", e))?;
            let mut entries: Vec<u64> = t.chunks_exact(8).map(BigEndian::read_u64).collect();
            let step = if ext { 2 } else { 1 };
            for k in (0..entries.len()).step_by(step) {
                let v = entries[k];
                if v & COMPRESSED == 0 {
                    let host = v & OFFSET_MASK;
                    if host % cs != 0 || (!has_data_file && host != 0 && host >= file_size) {
                        return Err(corrupt!("L2 entry {:#x} points outside the image", v));
                    }
                    if !has_data_file {
                        entries[k] = v & !COPIED;
                    }
                }
            }
            let id = self.tables.len();
            self.tables.push(entries);
            seen.insert(off, id);
            l1.push(Some(id));
        }
        Ok(l1)
    }

    /// Virtual size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Cluster size.
    pub fn cluster_size(&self) -> u64 {
        self.geo.cluster_size()
    }

    /// The image's version as it will be after the commit.
    pub fn version(&self) -> u32 {
        self.target_version()
    }

    /// Whether the image names a backing file.
    pub fn has_backing(&self) -> bool {
        self.header.backing_file.is_some()
    }

    /// The snapshots.
    pub fn snapshots(&self) -> impl Iterator<Item = &Snapshot> {
        self.snapshots.iter().map(|s| &s.0)
    }

    fn l2_coverage(&self) -> u64 {
        self.geo.cluster_size()
            * (self.geo.cluster_size() / if self.header.extended_l2() { 16 } else { 8 })
    }

    /// Change the virtual size. Growing adds unallocated space (or, with `map_new`, newly
    /// mapped clusters whose data reads as zeros, for metadata preallocation); shrinking drops
    /// the mappings past the new end from the active state.
    pub fn resize(&mut self, new_size: u64, map_new: bool) -> Result<()> {
        // Table users change: count them afresh when next needed.
        self.refs = None;
        if !self.bitmaps.is_empty() && new_size != self.size {
            return Err(Error::new(
                ErrorKind::UnsupportedFeature,
                "cannot resize an image with persistent bitmaps (remove them first)",
            ));
        }
        if new_size % 512 != 0 {
            return Err(Error::invalid("the new size must be a multiple of 512"));
        }
        let cov = self.l2_coverage();
        let cs = self.geo.cluster_size();
        let needed = new_size.div_ceil(cov);
        if needed * 8 > super::header::MAX_L1_BYTES {
            return Err(Error::new(
                ErrorKind::TooLarge,
                "new size is too big for this cluster size",
            ));
        }
        let old = self.size;
        // qemu refuses too: older readers take a v2 snapshot's size from the image's.
        if self.header.version < 3 && !self.snapshots.is_empty() && new_size != old {
            return Err(Error::new(
                ErrorKind::UnsupportedFeature,
                "cannot resize a version 2 image that has snapshots",
            ));
        }
        if new_size < old {
            self.active.truncate(needed as usize);
            // Clear the entries past the end in the last table (a private copy of it).
            if new_size % cov != 0 {
                if let Some(Some(id)) = self.active.last().copied() {
                    let mut t = self.tables[id].clone();
                    let per_entry = if self.header.extended_l2() { 2 } else { 1 };
                    let first = (new_size % cov).div_ceil(cs) as usize;
                    for v in &mut t[first * per_entry..] {
                        *v = 0;
                    }
                    self.tables.push(t);
                    let last = self.active.len() - 1;
                    self.active[last] = Some(self.tables.len() - 1);
                }
            }
        } else {
            self.active
                .resize(needed.max(self.active.len() as u64) as usize, None);
            if map_new {
                let first = old.div_ceil(cs);
                let last = new_size.div_ceil(cs);
                self.new_data.extend(first..last);
            }
        }
        self.size = new_size;
        Ok(())
    }

    /// After a grow from `old_size`, make the added area read as zeros where the backing file
    /// would otherwise show through (qemu does the same). Whole clusters become zero clusters;
    /// the cluster holding `old_size`, when it is not cluster aligned, gets a new data cluster
    /// holding `head` (the guest bytes from its start up to `old_size`) and then zeros.
    pub fn zero_grown(&mut self, old_size: u64, head: Vec<u8>) -> Result<()> {
        if self.header.version < 3 {
            return Err(Error::new(
                ErrorKind::UnsupportedFeature,
                "cannot zero the new area of a version 2 image: its backing file would show through",
            ));
        }
        let cs = self.geo.cluster_size();
        if old_size >= self.size || head.len() as u64 != old_size % cs {
            return Err(Error::invalid(
                "the grown area and its head do not match the image",
            ));
        }
        if !head.is_empty() {
            self.rewrite = Some((old_size / cs, head));
        }
        self.zero_from = Some(old_size.div_ceil(cs));
        Ok(())
    }

    /// The active L2 table for L1 index `l1i`, made private to the active state (copied when
    /// shared with a snapshot, created when missing); `table_refs` counts the users of each.
    fn private_table(&mut self, l1i: usize, table_refs: &mut Vec<u64>) -> usize {
        match self.active[l1i] {
            Some(id) if table_refs[id] == 1 => id,
            old => {
                let t = match old {
                    Some(id) => {
                        table_refs[id] -= 1;
                        self.tables[id].clone()
                    }
                    None => vec![0u64; (self.geo.cluster_size() / 8) as usize],
                };
                self.tables.push(t);
                table_refs.push(1);
                self.active[l1i] = Some(self.tables.len() - 1);
                self.tables.len() - 1
            }
        }
    }

    /// Users of each table, counted from the L1 tables.
    fn count_refs(&self) -> Vec<u64> {
        let mut refs = vec![0u64; self.tables.len()];
        for l1 in std::iter::once(&self.active).chain(self.snapshots.iter().map(|s| &s.1)) {
            for id in l1.iter().flatten() {
                refs[*id] += 1;
            }
        }
        refs
    }

    /// The active L2 slot of guest cluster `g`: (table id, entry index), the table made
    /// private to the active state.
    fn active_slot(&mut self, g: u64) -> Result<(usize, usize)> {
        let cs = self.geo.cluster_size();
        let step = if self.header.extended_l2() { 2 } else { 1 };
        let per_table = cs / (8 * step as u64);
        let l1i = (g / per_table) as usize;
        if g >= self.size.div_ceil(cs) || l1i >= self.active.len() {
            return Err(Error::invalid("write past the end of the image"));
        }
        let mut refs = self.refs.take().unwrap_or_else(|| self.count_refs());
        let id = self.private_table(l1i, &mut refs);
        self.refs = Some(refs);
        Ok((id, ((g % per_table) as usize) * step))
    }

    /// Changing guest data would have to mark enabled bitmaps dirty, which these edits do not
    /// do; they refuse instead of leaving a bitmap that misses changes (an incremental backup
    /// taken from it would lose them).
    fn refuse_enabled_bitmaps(&self) -> Result<()> {
        match self.bitmaps.iter().find(|b| b.meta.flags & FLAG_AUTO != 0) {
            Some(b) => Err(Error::new(
                ErrorKind::UnsupportedFeature,
                format!(
                    "the image has an enabled persistent bitmap ('{}') that this change would \
                     have to mark; disable it first (bitmap --disable)",
                    b.meta.name
                ),
            )),
            None => Ok(()),
        }
    }

    /// The persistent bitmaps: (name, granularity in bytes, enabled, in use).
    pub fn bitmaps(&self) -> impl Iterator<Item = (&str, u64, bool, bool)> {
        self.bitmaps.iter().map(|b| {
            (
                b.meta.name.as_str(),
                1u64 << b.meta.granularity_bits,
                b.meta.flags & FLAG_AUTO != 0,
                b.meta.flags & FLAG_IN_USE != 0,
            )
        })
    }

    fn bitmap_index(&self, name: &str) -> Result<usize> {
        self.bitmaps
            .iter()
            .position(|b| b.meta.name == name)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("Dirty bitmap '{name}' not found"),
                )
            })
    }

    fn usable_bitmap(&self, name: &str) -> Result<usize> {
        let i = self.bitmap_index(name)?;
        if self.bitmaps[i].meta.flags & FLAG_IN_USE != 0 {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("Bitmap '{name}' is inconsistent and cannot be used"),
            ));
        }
        Ok(i)
    }

    /// Add an empty bitmap `name` of `granularity` bytes (a power of two, 512 B to 2 GiB;
    /// default the cluster size), enabled or not.
    pub fn bitmap_add(
        &mut self,
        name: &str,
        granularity: Option<u64>,
        enabled: bool,
    ) -> Result<()> {
        if self.target_version() < 3 {
            return Err(Error::new(
                ErrorKind::UnsupportedFeature,
                "persistent bitmaps need compatibility level 1.1 (compat=1.1)",
            ));
        }
        if name.is_empty() || name.len() > 1023 {
            return Err(Error::invalid("bitmap name must be 1 to 1023 bytes"));
        }
        if self.bitmaps.iter().any(|b| b.meta.name == name) {
            return Err(Error::invalid(format!("Bitmap already exists: {name}")));
        }
        if self.bitmaps.len() >= 65535 {
            return Err(Error::new(ErrorKind::TooLarge, "too many bitmaps"));
        }
        let g = granularity.unwrap_or(self.geo.cluster_size());
        if !g.is_power_of_two() || !(512..=(1u64 << 31)).contains(&g) {
            return Err(Error::invalid(
                "Granularity must be power of 2 between 512 and 2147483648",
            ));
        }
        let bits = g.trailing_zeros();
        let entries = Bitmap::entries_for(self.size, bits, self.geo.cluster_size());
        if entries * self.geo.cluster_size() > bitmaps::MAX_BITS_BYTES {
            return Err(Error::new(
                ErrorKind::TooLarge,
                "bitmap too large for this disk",
            ));
        }
        self.bitmaps.push(BitmapState {
            meta: Bitmap {
                name: name.to_string(),
                granularity_bits: bits,
                flags: if enabled { FLAG_AUTO } else { 0 },
                table_offset: 0,
                table_entries: entries,
            },
            table: Vec::new(),
            bits: Some(vec![0u8; (entries * self.geo.cluster_size()) as usize]),
        });
        self.bitmaps_changed = true;
        Ok(())
    }

    /// Remove bitmap `name`.
    pub fn bitmap_remove(&mut self, name: &str) -> Result<()> {
        let i = self.bitmap_index(name)?;
        self.bitmaps.remove(i);
        self.bitmaps_changed = true;
        Ok(())
    }

    /// Clear every bit of bitmap `name`.
    pub fn bitmap_clear(&mut self, name: &str) -> Result<()> {
        let i = self.usable_bitmap(name)?;
        let n = self.bitmaps[i].meta.table_entries * self.geo.cluster_size();
        self.bitmaps[i].bits = Some(vec![0u8; n as usize]);
        self.bitmaps_changed = true;
        Ok(())
    }

    /// Enable (track writes) or disable bitmap `name`.
    pub fn bitmap_set_enabled(&mut self, name: &str, on: bool) -> Result<()> {
        let i = self.usable_bitmap(name)?;
        let f = &mut self.bitmaps[i].meta.flags;
        *f = if on { *f | FLAG_AUTO } else { *f & !FLAG_AUTO };
        self.bitmaps_changed = true;
        Ok(())
    }

    /// The bits of bitmap `name` (one per granule) and its granularity (log2).
    pub fn bitmap_bits(&self, name: &str) -> Result<(Vec<u8>, u32)> {
        let i = self.usable_bitmap(name)?;
        let b = &self.bitmaps[i];
        let bits = match &b.bits {
            Some(v) => v.clone(),
            None => {
                bitmaps::read_bits(self.io.as_ref(), self.geo.cluster_size(), &b.meta, &b.table)?
            }
        };
        Ok((bits, b.meta.granularity_bits))
    }

    /// Set in bitmap `name` every granule a set bit of `src` (granularity `src_bits`, over this
    /// disk's size) touches.
    pub fn bitmap_merge(&mut self, name: &str, src: &[u8], src_bits: u32) -> Result<()> {
        let (mut bits, g) = self.bitmap_bits(name)?;
        bitmaps::merge_bits(&mut bits, g, src, src_bits, self.size);
        let i = self.bitmap_index(name)?;
        self.bitmaps[i].bits = Some(bits);
        self.bitmaps_changed = true;
        Ok(())
    }

    fn refuse_data_file(&self, what: &str) -> Result<()> {
        if self.header.data_file.is_some() {
            return Err(Error::new(
                ErrorKind::UnsupportedFeature,
                format!("{what} is not supported for images with an external data file"),
            ));
        }
        Ok(())
    }

    /// Give guest cluster `g` of the active state a new data cluster holding `data` (at most
    /// one cluster; the rest reads as zeros). The data is written now, past the end of the
    /// file where nothing refers to it; the mapping takes effect at [`Model::commit`].
    pub fn write_cluster(&mut self, g: u64, data: &[u8]) -> Result<()> {
        self.refuse_data_file("writing guest data")?;
        self.refuse_enabled_bitmaps()?;
        let cs = self.geo.cluster_size();
        if data.len() as u64 > cs {
            return Err(Error::invalid("more than one cluster of data"));
        }
        let (id, k) = self.active_slot(g)?;
        if self.file_clusters >= MAX_HOST_CLUSTERS {
            return Err(Error::new(
                ErrorKind::TooLarge,
                "image file too large to modify",
            ));
        }
        let host = self.file_clusters * cs;
        let mut buf;
        let whole = if data.len() as u64 == cs {
            data
        } else {
            buf = data.to_vec();
            buf.resize(cs as usize, 0);
            &buf[..]
        };
        self.io
            .write_all_at(whole, host)
            .map_err(|e| Error::io("cannot write data", e))?;
        self.file_clusters += 1;
        self.tables[id][k] = host;
        if self.header.extended_l2() {
            // Every subcluster allocated, none zero.
            self.tables[id][k + 1] = 0xffff_ffff;
        }
        Ok(())
    }

    /// Make guest cluster `g` of the active state read as zeros whatever lies below it (a
    /// zero cluster; version 3 only).
    pub fn zero_cluster(&mut self, g: u64) -> Result<()> {
        self.refuse_data_file("writing guest data")?;
        self.refuse_enabled_bitmaps()?;
        if self.header.version < 3 {
            return Err(Error::new(
                ErrorKind::UnsupportedFeature,
                "version 2 images have no zero clusters",
            ));
        }
        let (id, k) = self.active_slot(g)?;
        if self.header.extended_l2() {
            self.tables[id][k] = 0;
            self.tables[id][k + 1] = 0xffff_ffff_0000_0000;
        } else {
            self.tables[id][k] = 1;
        }
        Ok(())
    }

    /// Drop every mapping of the active state: it then reads entirely from the backing file
    /// (or as zeros). Snapshots keep theirs. (`commit` empties the committed image so.)
    pub fn make_empty(&mut self) -> Result<()> {
        self.refuse_enabled_bitmaps()?;
        for e in &mut self.active {
            *e = None;
        }
        self.refs = None;
        Ok(())
    }

    /// Name a new backing file (and its format), or none. The header names it once the
    /// commit's final write lands.
    pub fn set_backing(&mut self, backing: Option<(String, Option<String>)>) -> Result<()> {
        if let Some((name, fmt)) = &backing {
            if name.is_empty() || name.len() > super::header::MAX_BACKING_NAME as usize {
                return Err(Error::invalid(format!(
                    "backing file name must be 1 to {} bytes",
                    super::header::MAX_BACKING_NAME
                )));
            }
            if fmt.as_ref().is_some_and(|f| f.is_empty() || f.len() > 16) {
                return Err(Error::invalid("invalid backing format name"));
            }
        }
        self.change.backing = Some(backing);
        Ok(())
    }

    /// Turn lazy refcounts on or off (version 3 only). The commit writes exact refcounts
    /// either way, so the image is clean afterwards.
    pub fn set_lazy_refcounts(&mut self, on: bool) -> Result<()> {
        if on && self.target_version() < 3 {
            return Err(Error::invalid(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
            ));
        }
        self.change.lazy_refcounts = Some(on);
        Ok(())
    }

    /// Store refcounts `1 << order` bits wide (the commit rebuilds them all at that width).
    pub fn set_refcount_order(&mut self, order: u32) -> Result<()> {
        if order > 6 {
            return Err(Error::invalid(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        if order != 4 && self.target_version() < 3 {
            return Err(Error::invalid(
                "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
            ));
        }
        self.change.refcount_order = Some(order);
        self.geo = Geometry {
            cluster_bits: self.geo.cluster_bits,
            refcount_order: order,
        };
        Ok(())
    }

    fn target_version(&self) -> u32 {
        self.change.version.unwrap_or(self.header.version)
    }

    /// Change the image's version: 3 (`compat=1.1`) or 2 (`compat=0.10`). Going down needs
    /// what version 2 can express: 16-bit refcounts, no lazy refcounts, extended L2 entries,
    /// external data file or zstd compression; zero clusters become unallocated clusters, or
    /// (when a backing file could show through) clusters of zeros.
    pub fn set_version(&mut self, version: u32) -> Result<()> {
        let cur = self.header.version;
        match version {
            3 => {}
            2 => {
                let refuse = |what: &str| {
                    Err(Error::new(
                        ErrorKind::UnsupportedFeature,
                        format!("Cannot downgrade an image with {what}"),
                    ))
                };
                let order = self
                    .change
                    .refcount_order
                    .unwrap_or(self.header.refcount_order);
                if order != 4 {
                    return refuse("a refcount width other than 16 bits");
                }
                let lazy = self.change.lazy_refcounts.unwrap_or(
                    self.header.compatible_features & super::header::COMPAT_LAZY_REFCOUNTS != 0,
                );
                if lazy {
                    return refuse("lazy refcounts (turn them off in the same command)");
                }
                if self.header.extended_l2() {
                    return refuse("extended L2 entries");
                }
                if self.header.data_file.is_some() {
                    return refuse("an external data file");
                }
                if !self.bitmaps.is_empty() {
                    return refuse("persistent bitmaps");
                }
                if self.header.compression_type != super::header::CompressionType::Zlib {
                    return refuse("zstd compression");
                }
                if cur >= 3 {
                    self.expand_zero_clusters()?;
                }
            }
            _ => return Err(Error::invalid(format!("unknown version {version}"))),
        }
        if version != cur {
            self.change.version = Some(version);
        }
        Ok(())
    }

    /// Replace zero clusters (which version 2 lacks) in every table: unallocated when nothing
    /// could show through, else a mapping to one shared cluster of zeros.
    fn expand_zero_clusters(&mut self) -> Result<()> {
        let backing =
            self.header.backing_file.is_some() || matches!(self.change.backing, Some(Some(_)));
        let mut zeros_at: Option<u64> = None;
        for t in 0..self.tables.len() {
            for k in 0..self.tables[t].len() {
                let v = self.tables[t][k];
                if v & COMPRESSED != 0 || v & 1 == 0 {
                    continue;
                }
                if !backing {
                    self.tables[t][k] = 0;
                    continue;
                }
                let host = match zeros_at {
                    Some(h) => h,
                    None => {
                        let cs = self.geo.cluster_size();
                        let h = self.file_clusters * cs;
                        self.io
                            .write_all_at(&vec![0u8; cs as usize], h)
                            .map_err(|e| Error::io("cannot write data", e))?;
                        self.file_clusters += 1;
                        zeros_at = Some(h);
                        h
                    }
                };
                self.tables[t][k] = host;
            }
        }
        Ok(())
    }

    /// Add a snapshot of the active state named `name` (ids are numbered like qemu's).
    pub fn snapshot_create(&mut self, name: &str) -> Result<()> {
        // Table users change: count them afresh when next needed.
        self.refs = None;
        if name.is_empty() || name.len() > 65535 {
            return Err(Error::invalid("snapshot name must be 1 to 65535 bytes"));
        }
        if self.snapshots.iter().any(|s| s.0.name == name) {
            return Err(Error::invalid(format!("snapshot '{name}' already exists")));
        }
        if self.snapshots.len() >= super::header::MAX_SNAPSHOTS as usize {
            return Err(Error::new(ErrorKind::TooLarge, "too many snapshots"));
        }
        if self.header.data_file.is_some() {
            return Err(Error::new(
                ErrorKind::UnsupportedFeature,
                "images with an external data file cannot have internal snapshots",
            ));
        }
        let id = self
            .snapshots
            .iter()
            .filter_map(|s| s.0.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let sn = Snapshot {
            l1_table_offset: 0,
            l1_size: self.active.len() as u32,
            id: id.to_string(),
            name: name.to_string(),
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(self.size),
            icount: Some(0),
        };
        self.snapshots.push((sn, self.active.clone()));
        Ok(())
    }

    fn find(&self, spec: &str) -> Result<usize> {
        self.snapshots
            .iter()
            .position(|s| s.0.id == spec)
            .or_else(|| self.snapshots.iter().position(|s| s.0.name == spec))
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("snapshot '{spec}' not found")))
    }

    /// Make snapshot `spec` (id or name) the active state.
    pub fn snapshot_apply(&mut self, spec: &str) -> Result<()> {
        // Table users change: count them afresh when next needed.
        self.refs = None;
        self.refuse_enabled_bitmaps()?;
        let i = self.find(spec)?;
        let (sn, l1) = &self.snapshots[i];
        self.active = l1.clone();
        self.size = sn.disk_size.unwrap_or(self.size);
        let needed = self.size.div_ceil(self.l2_coverage()) as usize;
        if self.active.len() < needed {
            self.active.resize(needed, None);
        }
        Ok(())
    }

    /// Remove snapshot `spec` (id or name).
    pub fn snapshot_delete(&mut self, spec: &str) -> Result<()> {
        // Table users change: count them afresh when next needed.
        self.refs = None;
        let i = self.find(spec)?;
        self.snapshots.remove(i);
        Ok(())
    }

    /// Write the changed metadata and fresh refcounts past the end of the file, then switch the
    /// header. Returns the host ranges of newly mapped data clusters (for falloc/full
    /// preallocation by the caller).
    pub fn commit(mut self) -> Result<Vec<(u64, u64)>> {
        let cs = self.geo.cluster_size();
        let ext = self.header.extended_l2();
        let has_data_file = self.header.data_file.is_some();
        let step = if ext { 2 } else { 1 };
        // Which tables are referenced, and how often (one per L1 that names them).
        let mut table_refs = vec![0u64; self.tables.len()];
        for l1 in std::iter::once(&self.active).chain(self.snapshots.iter().map(|s| &s.1)) {
            for id in l1.iter().flatten() {
                table_refs[*id] += 1;
            }
        }
        // Metadata preallocation: give each new guest cluster a slot in a private table.
        let per_table = cs / (8 * step as u64);
        let mut slots: Vec<(usize, usize)> = Vec::new();
        for g in std::mem::take(&mut self.new_data) {
            let id = self.private_table((g / per_table) as usize, &mut table_refs);
            slots.push((id, ((g % per_table) as usize) * step));
        }
        let rewrite = match self.rewrite.take() {
            Some((g, data)) => {
                let id = self.private_table((g / per_table) as usize, &mut table_refs);
                Some((id, ((g % per_table) as usize) * step, data))
            }
            None => None,
        };
        let mut zeroed: Vec<(usize, usize)> = Vec::new();
        if let Some(first) = self.zero_from.take() {
            for g in first..self.size.div_ceil(cs) {
                let id = self.private_table((g / per_table) as usize, &mut table_refs);
                zeroed.push((id, ((g % per_table) as usize) * step));
            }
        }
        // Place new metadata, then new data, from the current end of file on.
        let mut next = self.file_clusters;
        let mut alloc = |n: u64| {
            let at = next;
            next += n;
            at
        };
        let l1_clusters = |len: usize| ((len as u64) * 8).div_ceil(cs).max(1);
        let snap_l1_at: Vec<u64> = self
            .snapshots
            .iter()
            .map(|s| alloc(l1_clusters(s.1.len())))
            .collect();
        let active_l1_at = alloc(l1_clusters(self.active.len()));
        let table_at: Vec<u64> = table_refs
            .iter()
            .map(|&r| if r > 0 { alloc(1) } else { 0 })
            .collect();
        let mut new_ranges: Vec<(u64, u64)> = Vec::new();
        for (id, k) in slots {
            let host = alloc(1) * cs;
            self.tables[id][k] = host;
            if ext {
                // Allocated, subclusters unallocated: reads as zeros (as qemu preallocates).
                self.tables[id][k + 1] = 0;
            }
            match new_ranges.last_mut() {
                Some((s, l)) if *s + *l == host => *l += cs,
                _ => new_ranges.push((host, cs)),
            }
        }
        // Zero clusters keep any host cluster (preallocation) and read as zeros.
        for (id, k) in zeroed {
            if ext {
                self.tables[id][k + 1] = 0xffff_ffff_0000_0000;
            } else {
                self.tables[id][k] |= 1;
            }
        }
        if let Some((id, k, mut data)) = rewrite {
            let host = alloc(1) * cs;
            data.resize(cs as usize, 0);
            self.io
                .write_all_at(&data, host)
                .map_err(|e| Error::io("cannot write data", e))?;
            self.tables[id][k] = host;
            if ext {
                self.tables[id][k + 1] = 0xffff_ffff;
            }
        }
        let snap_table_bytes: u64 = self.snapshots.iter().map(|s| entry_len(&s.0)).sum();
        let snap_table_at = if self.snapshots.is_empty() {
            0
        } else {
            alloc(snap_table_bytes.div_ceil(cs))
        };
        // Bitmaps whose bits changed get new data clusters (only those with a bit set) and a
        // new table; a changed list gets a new directory. Unchanged ones stay where they are.
        if self.bitmaps_changed {
            for b in &mut self.bitmaps {
                let Some(bits) = b.bits.take() else { continue };
                let mut table = Vec::with_capacity(b.meta.table_entries as usize);
                for chunk in bits.chunks(cs as usize) {
                    if chunk.iter().all(|&x| x == 0) {
                        table.push(0);
                    } else {
                        let at = alloc(1) * cs;
                        self.io
                            .write_all_at(chunk, at)
                            .map_err(|e| Error::io("cannot write bitmap data", e))?;
                        table.push(at);
                    }
                }
                let at = alloc((table.len() as u64 * 8).div_ceil(cs).max(1)) * cs;
                let mut raw = vec![0u8; table.len() * 8];
                for (k, e) in table.iter().enumerate() {
                    BigEndian::write_u64(&mut raw[k * 8..], *e);
                }
                self.io
                    .write_all_at(&raw, at)
                    .map_err(|e| Error::io("cannot write a bitmap table", e))?;
                b.meta.table_offset = at;
                b.table = table;
            }
            self.bitmap_dir = None;
            if !self.bitmaps.is_empty() {
                let mut dir = Vec::new();
                for b in &self.bitmaps {
                    b.meta.encode(&mut dir);
                }
                let at = alloc((dir.len() as u64).div_ceil(cs)) * cs;
                self.io
                    .write_all_at(&dir, at)
                    .map_err(|e| Error::io("cannot write the bitmap directory", e))?;
                self.bitmap_dir = Some((at, dir.len() as u64));
            }
        }
        let used = next;
        // Data refcounts: one per (L1, L2 entry) path.
        let mut data_refs = vec![0u32; used as usize];
        for l1 in std::iter::once(&self.active).chain(self.snapshots.iter().map(|s| &s.1)) {
            for id in l1.iter().flatten() {
                let t = &self.tables[*id];
                for k in (0..t.len()).step_by(step) {
                    let v = t[k];
                    if has_data_file && v & COMPRESSED == 0 {
                        continue;
                    }
                    for c in host_clusters(v, self.geo.cluster_bits) {
                        let slot = data_refs
                            .get_mut(c as usize)
                            .ok_or_else(|| corrupt!("L2 entry {v:#x} points past end of file"))?;
                        *slot += 1;
                    }
                }
            }
        }
        // Write L2 tables with COPIED where the data's refcount is exactly 1.
        let mut buf = vec![0u8; cs as usize];
        for (id, t) in self.tables.iter().enumerate() {
            if table_refs[id] == 0 {
                continue;
            }
            for (k, &v) in t.iter().enumerate() {
                let mut v = v;
                if k % step == 0 && !has_data_file && v & COMPRESSED == 0 && v & OFFSET_MASK != 0 {
                    let c = (v & OFFSET_MASK) / cs;
                    if data_refs[c as usize] == 1 {
                        v |= COPIED;
                    }
                }
                BigEndian::write_u64(&mut buf[k * 8..], v);
            }
            self.io
                .write_all_at(&buf, table_at[id] * cs)
                .map_err(|e| Error::io("cannot write L2 table", e))?;
        }
        let write_l1 = |l1: &L1, at: u64, active: bool| -> Result<()> {
            let mut b = vec![0u8; l1.len() * 8];
            for (i, e) in l1.iter().enumerate() {
                if let Some(id) = e {
                    let mut v = table_at[*id] * cs;
                    if active && table_refs[*id] == 1 {
                        v |= COPIED;
                    }
                    BigEndian::write_u64(&mut b[i * 8..], v);
                }
            }
            self.io
                .write_all_at(&b, at * cs)
                .map_err(|e| Error::io("cannot write L1 table", e))
        };
        for (s, at) in self.snapshots.iter_mut().zip(&snap_l1_at) {
            write_l1(&s.1, *at, false)?;
            s.0.l1_table_offset = at * cs;
            s.0.l1_size = s.1.len() as u32;
        }
        write_l1(&self.active, active_l1_at, true)?;
        if !self.snapshots.is_empty() {
            let mut t = Vec::with_capacity(snap_table_bytes as usize);
            for (s, _) in &self.snapshots {
                encode_entry(s, &mut t);
            }
            self.io
                .write_all_at(&t, snap_table_at * cs)
                .map_err(|e| Error::io("cannot write snapshot table", e))?;
        }
        // Refcounts: header, metadata just written, data paths.
        // Metadata refcounts: the header, each L1 and the snapshot table once, each L2 table
        // once per L1 naming it.
        data_refs[0] += 1;
        let l1s = snap_l1_at
            .iter()
            .zip(self.snapshots.iter().map(|s| s.1.len()));
        for (at, len) in l1s.chain([(&active_l1_at, self.active.len())]) {
            for c in *at..*at + l1_clusters(len) {
                data_refs[c as usize] += 1;
            }
        }
        for (id, &r) in table_refs.iter().enumerate() {
            if r > 0 {
                data_refs[table_at[id] as usize] += r as u32;
            }
        }
        if !self.snapshots.is_empty() {
            for c in snap_table_at..snap_table_at + snap_table_bytes.div_ceil(cs) {
                data_refs[c as usize] += 1;
            }
        }
        // The bitmap directory, each bitmap's table and its data clusters.
        let mut bitmap_clusters: Vec<std::ops::Range<u64>> = Vec::new();
        if let Some((off, size)) = self.bitmap_dir {
            bitmap_clusters.push(off / cs..(off + size).div_ceil(cs));
        }
        for b in &self.bitmaps {
            let t = b.meta.table_offset;
            bitmap_clusters
                .push(t / cs..(t + b.meta.table_entries * 8).div_ceil(cs).max(t / cs + 1));
            for off in b.table.iter().filter_map(|&e| bitmaps::data_cluster(e)) {
                bitmap_clusters.push(off / cs..off / cs + 1);
            }
        }
        for r in bitmap_clusters {
            for c in r {
                let slot = data_refs.get_mut(c as usize).ok_or_else(|| {
                    corrupt!("bitmap metadata at cluster {c} lies past the end of the file")
                })?;
                *slot += 1;
            }
        }
        let placement = refcount::write_structures(self.io.as_ref(), self.geo, used, used, |c| {
            u64::from(data_refs[c as usize])
        })?;
        self.io
            .flush()
            .map_err(|e| Error::io("cannot flush image", e))?;
        // Commit: one write of the header fields that changed.
        let v3 = self.target_version() >= 3;
        let mut h = vec![0u8; if v3 { 72 } else { 48 }];
        BigEndian::write_u64(&mut h[0..], self.size);
        BigEndian::write_u32(&mut h[8..], self.header.crypt_method);
        BigEndian::write_u32(&mut h[12..], self.active.len() as u32);
        BigEndian::write_u64(&mut h[16..], active_l1_at * cs);
        BigEndian::write_u64(&mut h[24..], placement.table_offset);
        BigEndian::write_u32(&mut h[32..], placement.table_clusters);
        BigEndian::write_u32(&mut h[36..], self.snapshots.len() as u32);
        BigEndian::write_u64(
            &mut h[40..],
            if self.snapshots.is_empty() {
                0
            } else {
                snap_table_at * cs
            },
        );
        if v3 {
            let mut compat = self.header.compatible_features;
            match self.change.lazy_refcounts {
                Some(true) => compat |= super::header::COMPAT_LAZY_REFCOUNTS,
                Some(false) => compat &= !super::header::COMPAT_LAZY_REFCOUNTS,
                None => {}
            }
            // Refcounts are exact now: the image is clean. Unknown autoclear bits are dropped.
            BigEndian::write_u64(
                &mut h[48..],
                self.header.incompatible_features & !(incompat::DIRTY | incompat::CORRUPT),
            );
            BigEndian::write_u64(&mut h[56..], compat);
            // Bitmaps stay valid: this writer knows them.
            let bitmaps_bit = if self.bitmap_dir.is_some() {
                super::header::AUTOCLEAR_BITMAPS
            } else {
                0
            };
            BigEndian::write_u64(
                &mut h[64..],
                (self.header.autoclear_features & super::header::AUTOCLEAR_DATA_FILE_RAW)
                    | bitmaps_bit,
            );
        }
        if self.change.any() || self.bitmaps_changed {
            // The header, its extensions and the backing name in one write of cluster 0.
            let area = self.header_area(&h)?;
            self.io
                .write_all_at(&area, 0)
                .map_err(|e| Error::io("cannot write header", e))?;
        } else {
            self.io
                .write_all_at(&h, 24)
                .map_err(|e| Error::io("cannot write header", e))?;
        }
        self.io
            .flush()
            .map_err(|e| Error::io("cannot flush image", e))?;
        Ok(new_ranges)
    }
}

impl Model {
    /// Cluster 0 rewritten for [`HeaderChange`]: version, refcount order and the fields in
    /// `fields` (bytes 24.. of the header as the commit computed them), the original header
    /// extensions except the backing format (which follows the new backing), and the backing
    /// name after them. Fails when it does not fit in one cluster.
    fn header_area(&self, fields: &[u8]) -> Result<Vec<u8>> {
        use super::header::ext;
        let cs = self.geo.cluster_size() as usize;
        let old = &self.header;
        let mut orig = vec![0u8; cs];
        self.io
            .read_at_zero_padded(&mut orig, 0)
            .map_err(|e| Error::io("cannot read header", e))?;
        // The original extensions, in order.
        let ext_end = if old.backing_file_offset != 0 {
            (old.backing_file_offset as usize).min(cs)
        } else {
            cs
        };
        let mut exts: Vec<(u32, Vec<u8>)> = Vec::new();
        let mut off = old.header_length as usize;
        while off + 8 <= ext_end {
            let typ = BigEndian::read_u32(&orig[off..]);
            let len = BigEndian::read_u32(&orig[off + 4..]) as usize;
            if typ == ext::END || off + 8 + len > ext_end {
                break;
            }
            if typ != ext::BACKING_FORMAT && !(typ == ext::BITMAPS && self.bitmaps_changed) {
                exts.push((typ, orig[off + 8..off + 8 + len].to_vec()));
            }
            off += 8 + len.div_ceil(8) * 8;
        }
        let backing = match &self.change.backing {
            Some(b) => b.clone(),
            None => old
                .backing_file
                .clone()
                .map(|n| (n, old.backing_format.clone())),
        };
        if let Some((_, Some(f))) = &backing {
            exts.insert(0, (ext::BACKING_FORMAT, f.as_bytes().to_vec()));
        }
        if let (true, Some((off, size))) = (self.bitmaps_changed, self.bitmap_dir) {
            let mut d = vec![0u8; 24];
            BigEndian::write_u32(&mut d[0..], self.bitmaps.len() as u32);
            BigEndian::write_u64(&mut d[8..], size);
            BigEndian::write_u64(&mut d[16..], off);
            exts.push((ext::BITMAPS, d));
        }
        let version = self.target_version();
        let header_len: usize = if version >= 3 {
            (old.header_length as usize).max(104)
        } else {
            72
        };
        let mut a = vec![0u8; header_len];
        a[..4].copy_from_slice(&super::header::MAGIC.to_be_bytes());
        BigEndian::write_u32(&mut a[4..], version);
        BigEndian::write_u32(&mut a[20..], old.cluster_bits);
        a[24..24 + fields.len().min(header_len - 24)]
            .copy_from_slice(&fields[..fields.len().min(header_len - 24)]);
        if version >= 3 {
            if old.version < 3 {
                // Fresh version 3 fields: no features beyond what the fields carry.
                BigEndian::write_u64(&mut a[72..], 0);
                BigEndian::write_u64(&mut a[88..], 0);
            }
            BigEndian::write_u32(&mut a[96..], self.geo.refcount_order);
            BigEndian::write_u32(&mut a[100..], header_len as u32);
            if header_len > 104 {
                // The compression type byte and padding, as they were.
                let n = (old.header_length as usize).min(header_len);
                if old.version >= 3 && n > 104 {
                    a[104..n].copy_from_slice(&orig[104..n]);
                }
            }
        }
        for (typ, data) in &exts {
            let mut e = vec![0u8; 8];
            BigEndian::write_u32(&mut e[0..], *typ);
            BigEndian::write_u32(&mut e[4..], data.len() as u32);
            e.extend_from_slice(data);
            e.resize(8 + data.len().div_ceil(8) * 8, 0);
            a.extend_from_slice(&e);
        }
        a.extend_from_slice(&[0u8; 8]);
        if let Some((name, _)) = &backing {
            let at = a.len();
            a.extend_from_slice(name.as_bytes());
            BigEndian::write_u64(&mut a[8..], at as u64);
            BigEndian::write_u32(&mut a[16..], name.len() as u32);
        }
        if a.len() > cs {
            return Err(Error::new(
                ErrorKind::TooLarge,
                "the header, its extensions and the backing file name do not fit in one cluster",
            ));
        }
        Ok(a)
    }
}

/// Host clusters an L2 entry's data occupies (none for unallocated entries).
fn host_clusters(v: u64, cluster_bits: u32) -> std::ops::Range<u64> {
    if v & COMPRESSED != 0 {
        let x = 62 - (cluster_bits - 8);
        let off = v & ((1u64 << x) - 1);
        let nsect = (v >> x) & ((1u64 << (cluster_bits - 8)) - 1);
        let end = (off & !511) + (nsect + 1) * 512;
        return (off >> cluster_bits)..((end - 1) >> cluster_bits) + 1;
    }
    let host = v & OFFSET_MASK;
    if host == 0 {
        0..0
    } else {
        (host >> cluster_bits)..(host >> cluster_bits) + 1
    }
}

fn entry_len(s: &Snapshot) -> u64 {
    (40 + 24 + s.id.len() as u64 + s.name.len() as u64).div_ceil(8) * 8
}

fn encode_entry(s: &Snapshot, out: &mut Vec<u8>) {
    let start = out.len();
    let mut f = [0u8; 40];
    BigEndian::write_u64(&mut f[0..], s.l1_table_offset);
    BigEndian::write_u32(&mut f[8..], s.l1_size);
    BigEndian::write_u16(&mut f[12..], s.id.len() as u16);
    BigEndian::write_u16(&mut f[14..], s.name.len() as u16);
    BigEndian::write_u32(&mut f[16..], s.date_sec);
    BigEndian::write_u32(&mut f[20..], s.date_nsec);
    BigEndian::write_u64(&mut f[24..], s.vm_clock_nsec);
    BigEndian::write_u32(
        &mut f[32..],
        s.vm_state_size.min(u64::from(u32::MAX)) as u32,
    );
    BigEndian::write_u32(&mut f[36..], 24);
    out.extend_from_slice(&f);
    let mut extra = [0u8; 24];
    BigEndian::write_u64(&mut extra[0..], s.vm_state_size);
    BigEndian::write_u64(&mut extra[8..], s.disk_size.unwrap_or(0));
    BigEndian::write_u64(&mut extra[16..], s.icount.unwrap_or(u64::MAX));
    out.extend_from_slice(&extra);
    out.extend_from_slice(s.id.as_bytes());
    out.extend_from_slice(s.name.as_bytes());
    out.resize(start + entry_len(s) as usize, 0);
}
