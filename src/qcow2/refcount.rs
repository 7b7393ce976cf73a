//! Refcount structures: reading the on-disk refcount table and blocks (every width from 1 to
//! 64 bits), and writing a complete new set of them for a file whose per-cluster refcounts the
//! caller computes.
//!
//! Writers in this crate never update refcounts in place: they place all new metadata, then a
//! fresh refcount table and blocks describing the whole file (themselves included) past the
//! current end of file, and commit by rewriting the header. A crash before that header write
//! leaves the old, consistent image.

use super::header::{Header, MAX_REFTABLE_BYTES};
use crate::error::{Error, ErrorKind, Result, corrupt};
use crate::io::BlockIo;
use byteorder::{BigEndian, ByteOrder};

/// Mask of the refblock offset in a refcount table entry.
const REFTABLE_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

/// Geometry of refcount structures for one image.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// log2 of the refcount width.
    pub refcount_order: u32,
}

impl Geometry {
    /// From a parsed header.
    pub fn of(h: &Header) -> Geometry {
        Geometry {
            cluster_bits: h.cluster_bits,
            refcount_order: h.refcount_order,
        }
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount entries per refcount block.
    pub fn entries_per_block(&self) -> u64 {
        1 << (self.cluster_bits + 3 - self.refcount_order)
    }

    /// Largest refcount the width can hold.
    pub fn max_refcount(&self) -> u64 {
        let bits = 1u32 << self.refcount_order;
        if bits == 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        }
    }

    /// Read entry `i` of a refcount block.
    pub fn get(&self, block: &[u8], i: u64) -> u64 {
        let bits = 1u64 << self.refcount_order;
        if bits < 8 {
            let bit = i * bits;
            let byte = block[(bit / 8) as usize];
            u64::from(byte >> (bit % 8)) & ((1 << bits) - 1)
        } else {
            let n = (bits / 8) as usize;
            let at = i as usize * n;
            BigEndian::read_uint(&block[at..at + n], n)
        }
    }

    /// Set entry `i` of a refcount block (`v` must fit the width).
    pub fn set(&self, block: &mut [u8], i: u64, v: u64) {
        let bits = 1u64 << self.refcount_order;
        if bits < 8 {
            let bit = i * bits;
            let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
            let b = &mut block[(bit / 8) as usize];
            *b = (*b & !mask) | (((v as u8) << (bit % 8)) & mask);
        } else {
            let n = (bits / 8) as usize;
            let at = i as usize * n;
            BigEndian::write_uint(&mut block[at..at + n], v, n);
        }
    }
}

/// The on-disk refcounts of an image, read lazily block by block.
#[derive(Debug)]
pub struct OnDisk {
    geo: Geometry,
    table: Vec<u64>,
}

impl OnDisk {
    /// Read the refcount table described by `h`.
    pub fn load(io: &dyn BlockIo, h: &Header) -> Result<OnDisk> {
        let bytes = u64::from(h.refcount_table_clusters) << h.cluster_bits;
        if bytes > MAX_REFTABLE_BYTES {
            return Err(Error::new(
                ErrorKind::TooLarge,
                "reference count table too large",
            ));
        }
        let mut raw = vec![0u8; bytes as usize];
        io.read_at_zero_padded(&mut raw, h.refcount_table_offset)
            .map_err(|e| Error::io("cannot read refcount table", e))?;
        Ok(OnDisk {
            geo: Geometry::of(h),
            table: raw.chunks_exact(8).map(BigEndian::read_u64).collect(),
        })
    }

    /// The refcount table entries (refblock offsets, 0 = none).
    pub fn table(&self) -> &[u64] {
        &self.table
    }

    /// Host offset of the refcount block for table index `i`, checked.
    pub fn block_offset(&self, i: usize) -> Result<u64> {
        let e = self.table.get(i).copied().unwrap_or(0);
        if e & !REFTABLE_OFFSET_MASK != 0 {
            return Err(corrupt!(
                "refcount table entry {i} has reserved bits set ({e:#x})"
            ));
        }
        if e % self.geo.cluster_size() != 0 {
            return Err(corrupt!(
                "refcount block offset {e:#x} is not cluster aligned"
            ));
        }
        Ok(e)
    }

    /// Call `f(cluster_index, refcount)` for every cluster covered by an allocated refblock,
    /// reading one block at a time.
    pub fn for_each(&self, io: &dyn BlockIo, mut f: impl FnMut(u64, u64)) -> Result<()> {
        let per = self.geo.entries_per_block();
        let mut block = vec![0u8; self.geo.cluster_size() as usize];
        for i in 0..self.table.len() {
            let off = self.block_offset(i)?;
            if off == 0 {
                continue;
            }
            io.read_at_zero_padded(&mut block, off)
                .map_err(|e| Error::io("cannot read refcount block", e))?;
            for j in 0..per {
                let v = self.geo.get(&block, j);
                if v != 0 {
                    f(i as u64 * per + j, v);
                }
            }
        }
        Ok(())
    }
}

/// Where [`write_structures`] put the new refcount table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Host offset of the refcount table.
    pub table_offset: u64,
    /// Its length in clusters.
    pub table_clusters: u32,
    /// First cluster index past the structures (the new end of the file, in clusters).
    pub end_cluster: u64,
}

/// Write a refcount table and blocks covering clusters `0..used_clusters` plus the structures
/// themselves, placed from cluster `start` on (`start >= used_clusters`). `refcount(c)` gives
/// the refcount of cluster `c < used_clusters`; clusters between `used_clusters` and `start`
/// are free. Every refblock is written, even one covering only free clusters: its own cluster
/// is counted, so leaving it out would leak that cluster.
pub fn write_structures(
    io: &dyn BlockIo,
    geo: Geometry,
    used_clusters: u64,
    start: u64,
    mut refcount: impl FnMut(u64) -> u64,
) -> Result<Placement> {
    let cs = geo.cluster_size();
    let per = geo.entries_per_block();
    // Fixpoint: the structures must also count themselves.
    let (mut blocks, mut table) = (0u64, 0u64);
    loop {
        let total = start + blocks + table;
        let nb = total.div_ceil(per);
        let nt = (nb * 8).div_ceil(cs);
        if nb == blocks && nt == table {
            break;
        }
        blocks = nb;
        table = nt;
    }
    if table * cs > MAX_REFTABLE_BYTES {
        return Err(Error::new(
            ErrorKind::TooLarge,
            "image too large for a refcount table",
        ));
    }
    let blocks_at = start;
    let table_at = start + blocks;
    let end = table_at + table;
    let mut entries = vec![0u8; (table * cs) as usize];
    let mut block = vec![0u8; cs as usize];
    for b in 0..blocks {
        block.fill(0);
        for j in 0..per {
            let c = b * per + j;
            let v = if c < used_clusters {
                refcount(c)
            } else if c >= start && c < end {
                1
            } else {
                0
            };
            if v > geo.max_refcount() {
                return Err(Error::new(
                    ErrorKind::TooLarge,
                    format!(
                        "refcount {v} of cluster {c} exceeds the {}-bit refcount width",
                        1 << geo.refcount_order
                    ),
                ));
            }
            if v != 0 {
                geo.set(&mut block, j, v);
            }
        }
        let off = (blocks_at + b) * cs;
        io.write_all_at(&block, off)
            .map_err(|e| Error::io("cannot write refcount block", e))?;
        BigEndian::write_u64(&mut entries[(b * 8) as usize..(b * 8 + 8) as usize], off);
    }
    io.write_all_at(&entries, table_at * cs)
        .map_err(|e| Error::io("cannot write refcount table", e))?;
    Ok(Placement {
        table_offset: table_at * cs,
        table_clusters: table as u32,
        end_cluster: end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemIo;

    #[test]
    fn every_width_round_trips() {
        for order in 0..=6 {
            let g = Geometry {
                cluster_bits: 9,
                refcount_order: order,
            };
            let mut b = vec![0u8; 512];
            let n = g.entries_per_block();
            for i in 0..n {
                g.set(&mut b, i, (i * 7 + 1) & g.max_refcount());
            }
            for i in 0..n {
                assert_eq!(
                    g.get(&b, i),
                    (i * 7 + 1) & g.max_refcount(),
                    "order {order} entry {i}"
                );
            }
        }
    }

    #[test]
    fn blocks_over_free_clusters_are_written() {
        // 256 clusters per block; clusters 256..512 are free, so their block holds only
        // zeros, but its own cluster is counted: it must be in the table, or it leaks.
        let g = Geometry {
            cluster_bits: 9,
            refcount_order: 4,
        };
        let io = MemIo::default();
        let p =
            write_structures(&io, g, 600, 600, |c| u64::from(!(256..512).contains(&c))).unwrap();
        assert_eq!(p.end_cluster, 604);
        let data = io.to_vec();
        let at = p.table_offset as usize;
        let table: Vec<u64> = data[at..at + 24]
            .chunks_exact(8)
            .map(BigEndian::read_u64)
            .collect();
        assert_eq!(table, [600 * 512, 601 * 512, 602 * 512]);
    }

    #[test]
    fn structures_count_themselves() {
        let g = Geometry {
            cluster_bits: 9,
            refcount_order: 4,
        };
        let io = MemIo::default();
        // 300 used clusters of refcount 1, structures at 300.
        let p = write_structures(&io, g, 300, 300, |_| 1).unwrap();
        let data = io.to_vec();
        let table: Vec<u64> = data[(p.table_offset as usize)..]
            .chunks_exact(8)
            .map(BigEndian::read_u64)
            .collect();
        let per = g.entries_per_block();
        let mut counted = 0;
        for (i, &off) in table.iter().enumerate() {
            if off == 0 {
                continue;
            }
            let blk = &data[off as usize..off as usize + 512];
            for j in 0..per {
                let c = i as u64 * per + j;
                let v = g.get(blk, j);
                assert_eq!(v, u64::from(c < p.end_cluster), "cluster {c}");
                counted += v;
            }
        }
        assert_eq!(counted, p.end_cluster);
        assert!(
            write_structures(
                &io,
                Geometry {
                    cluster_bits: 9,
                    refcount_order: 0
                },
                2,
                2,
                |_| 2
            )
            .is_err()
        );
    }
}
