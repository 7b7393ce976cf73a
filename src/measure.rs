//! `qemu-img measure`: how large a file an image (or a disk of a given size) needs when it is
//! converted to raw or qcow2, as the two numbers qemu-img prints (`required size`, `fully
//! allocated size`, and for qcow2 v3 from a qcow2 v3 source, `bitmaps size`).
//!
//! The qcow2 figures follow qemu's arithmetic: the virtual size rounded up to a cluster; one
//! header cluster, L2 tables for every cluster, an L1 table in whole clusters, and the refcount
//! table and blocks found as the fixed point of "every cluster, these included, is counted".
//! `required` is that minus the clusters no data lands in: a cluster counts when the source
//! has data (not zeros) allocated anywhere in its backing chain within it. CDI's volume sizing
//! (filesystem overhead) lives in [`crate::sizing`], not here.

use crate::error::{Error, ErrorKind, Result};
use crate::image::Image;
use crate::qcow2::writer::{CreateOptions, Prealloc};
use crate::qjson::{QDict, QValue};
use crate::{Format, qcow2};

/// What to measure.
pub enum Source<'a> {
    /// An empty disk of this many bytes (`--size`).
    Size(u64),
    /// An image's contents (its whole backing chain).
    Image(&'a Image),
}

/// qemu-img measure's answer, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// The file size the converted image needs.
    pub required: u64,
    /// The file size with every cluster allocated.
    pub fully_allocated: u64,
    /// Space for persistent bitmaps (qcow2 v3 from a qcow2 v3 source only).
    pub bitmaps: Option<u64>,
}

impl Measurement {
    /// qemu-img's text.
    pub fn to_human(&self) -> String {
        let mut s = format!(
            "required size: {}\nfully allocated size: {}\n",
            self.required, self.fully_allocated
        );
        if let Some(b) = self.bitmaps {
            s += &format!("bitmaps size: {b}\n");
        }
        s
    }

    /// qemu-img's `--output=json` text (`BlockMeasureInfo`).
    pub fn to_json_text(&self) -> String {
        let mut d = QDict::new();
        d.put("required", self.required);
        d.put("fully-allocated", self.fully_allocated);
        d.put_opt("bitmaps", self.bitmaps);
        crate::qjson::pretty(&QValue::Dict(d))
    }
}

/// Largest L1 table qemu accepts, in bytes.
const MAX_L1_BYTES: u64 = 32 << 20;

/// Refcount table and block bytes needed to count `clusters` clusters and themselves.
pub fn refcount_metadata_size(clusters: u64, cluster_size: u64, refcount_order: u32) -> u64 {
    let per_block = (cluster_size * 8) >> refcount_order;
    let per_table_cluster = cluster_size / 8;
    let (mut blocks, mut table, mut total) = (0u64, 0u64, 0u64);
    loop {
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        let now = clusters + blocks + table;
        if now == total {
            return (blocks + table) * cluster_size;
        }
        total = now;
    }
}

/// File size of a qcow2 image of `size` bytes (a multiple of the cluster size) with every
/// cluster allocated: header, L2 and L1 tables, refcounts and data.
fn fully_allocated(size: u64, o: &CreateOptions) -> u64 {
    let cs = 1u64 << o.cluster_bits;
    let entry = if o.extended_l2 { 16 } else { 8 };
    let mut meta = cs;
    let l2_entries = (size / cs).next_multiple_of(cs / entry);
    meta += l2_entries * entry;
    let l1_entries = (l2_entries * entry / cs).next_multiple_of(cs / 8);
    meta += l1_entries * 8;
    meta += refcount_metadata_size((meta + size) / cs, cs, o.refcount_order);
    meta + size
}

/// Bytes of clusters (of `cs` bytes) holding data somewhere in `img`'s chain.
fn data_clusters(img: &Image, cs: u64) -> Result<u64> {
    let size = img.virtual_size();
    let (mut off, mut bytes) = (0u64, 0u64);
    while off < size {
        let e = img.reported_extent(off, size - off)?;
        let mut len = e.len.max(1);
        if !e.zero && e.data && e.present {
            // The whole clusters this run touches; the next look starts past them.
            let start = off - off % cs;
            let end = (off + len).next_multiple_of(cs);
            bytes += end - start;
            len = end - off;
        }
        off = off.saturating_add(len);
    }
    Ok(bytes)
}

/// Bitmap directory entries and tables of `img` rewritten at cluster size `cs`.
fn bitmaps_size(img: &Image, cs: u64) -> Result<u64> {
    let Some(q) = img.qcow2() else { return Ok(0) };
    let list = qcow2::bitmaps::list(q)?;
    let (mut dir, mut total) = (0u64, 0u64);
    for b in &list {
        let bits = img.virtual_size().div_ceil(1u64 << b.granularity_bits);
        let clusters = bits.div_ceil(8).div_ceil(cs);
        total += (clusters * 8).next_multiple_of(cs) + clusters * cs;
        dir += (24 + b.name.len() as u64).next_multiple_of(8);
    }
    Ok(total + dir.next_multiple_of(cs))
}

/// Measure `src` converted to `target` with qemu-img's `-o` options `opts`.
pub fn measure(src: &Source<'_>, target: Format, opts: &CreateOptions) -> Result<Measurement> {
    match target {
        Format::Raw => {
            let size = match src {
                Source::Size(n) => *n,
                Source::Image(i) => i.virtual_size(),
            };
            let size = size
                .checked_next_multiple_of(512)
                .ok_or_else(|| Error::invalid("image size too large"))?;
            Ok(Measurement {
                required: size,
                fully_allocated: size,
                bitmaps: None,
            })
        }
        Format::Qcow2 => {
            let mut check = opts.clone();
            check.backing = None;
            check.validate()?;
            let cs = 1u64 << opts.cluster_bits;
            let size = match src {
                Source::Size(n) => *n,
                Source::Image(i) => i.virtual_size(),
            };
            let size = size
                .checked_next_multiple_of(cs)
                .filter(|&s| s <= i64::MAX as u64 / 2)
                .ok_or_else(|| Error::invalid("image size too large"))?;
            let l2_tables = (size / cs).div_ceil(cs / 8);
            if l2_tables * 8 > MAX_L1_BYTES {
                return Err(Error::new(
                    ErrorKind::TooLarge,
                    "The image size is too large (try using a larger cluster size)",
                ));
            }
            let mut data = match src {
                Source::Size(_) => 0,
                // Nothing is known of what a new backing file shares with the source.
                Source::Image(_) if opts.backing.is_some() => size,
                Source::Image(i) => data_clusters(i, cs)?,
            };
            if matches!(opts.prealloc, Prealloc::Falloc | Prealloc::Full) {
                data = size;
            }
            let full = fully_allocated(size, opts);
            let bitmaps = match src {
                Source::Image(i)
                    if opts.version >= 3 && i.qcow2().is_some_and(|q| q.header().version >= 3) =>
                {
                    Some(bitmaps_size(i, cs)?)
                }
                _ => None,
            };
            Ok(Measurement {
                required: full - size + data,
                fully_allocated: full,
                bitmaps,
            })
        }
        other => Err(Error::new(
            ErrorKind::UnsupportedFormat,
            format!(
                "Block driver '{}' does not support size measurement",
                other.name()
            ),
        )),
    }
}
