//! What one L1 or L2 entry means and whether it is valid, and which host ranges guest data may
//! not alias: the single place where the mapping rules of qcow2 are decided. The random-access
//! reader ([`super::Qcow2`]) and the streaming reader ([`super::stream`]) both decode every
//! entry through [`Rules`] and check every data reference against [`Metadata`], so a file and
//! a stream of the same bytes get the same verdict.
//!
//! The rules follow qemu's reader (`qcow2_get_cluster_type`, `qcow2_get_subcluster_type`):
//! reserved bits, alignment, the zero flag only from version 3 on, whole-bitmap validity of
//! extended L2 entries. Two rules go further than qemu, deliberately (the README lists them):
//! a compressed cluster with a non-zero subcluster bitmap is refused, and guest data (plain or
//! compressed) may not alias the mapping metadata it is read through (the L1 table and the L2
//! tables), which qemu never writes and which a stream could not read back.

use super::header::Header;
use crate::error::{Result, corrupt};

/// L1 entry: offset bits.
pub const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1 entry: bits that must be zero.
pub const L1_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// L2 entry: offset bits.
pub const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L2 entry: bits that must be zero in a standard uncompressed entry (bit 0, the zero flag, is
/// not among them; with extended L2 it is unused and ignored, as qemu does).
pub const L2_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// L1/L2 entry: refcount is exactly one.
pub const COPIED: u64 = 1 << 63;
/// L2 entry: compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// Standard L2 entry: reads as zeros.
pub const ZERO: u64 = 1;
/// Extended L2 bitmap: the "allocated" half.
const ALL_ALLOC: u64 = 0xffff_ffff;

/// How one cluster (or subcluster, with extended L2) is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Not allocated here: read the backing file (or zeros). `host` is set for an unallocated
    /// subcluster of an allocated cluster (extended L2), whose space qemu still reports.
    Unallocated {
        /// Host offset kept by the cluster, if any.
        host: Option<u64>,
    },
    /// Reads as zeros; `host` is set when space stays allocated (preallocated zero cluster).
    Zero {
        /// Host offset kept by the cluster, if any.
        host: Option<u64>,
    },
    /// Guest data at `host` in the data file.
    Data {
        /// Host offset of the unit's data.
        host: u64,
    },
    /// A compressed cluster: its data starts at byte `offset` and spans at most `size` bytes.
    Compressed {
        /// Host byte offset of the compressed data.
        offset: u64,
        /// Upper bound of its length (sector-rounded, as stored).
        size: u64,
    },
}

/// One decoded, validated L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// A compressed cluster.
    Compressed {
        /// Host byte offset of the compressed data.
        offset: u64,
        /// Upper bound of its length.
        size: u64,
    },
    /// A standard entry: the whole cluster in one state.
    Cluster {
        /// Host cluster, when allocated (data, or a zero cluster keeping its space).
        host: Option<u64>,
        /// Reads as zeros.
        zero: bool,
    },
    /// An extended entry: 32 subclusters, each unallocated, zero or data (bitmap validated).
    Subclusters {
        /// Host cluster, when allocated.
        host: Option<u64>,
        /// Bits 0..32 allocated, 32..64 zero.
        bitmap: u64,
    },
}

impl Mapping {
    /// True when no unit of the cluster is stored or zeroed here (the whole cluster reads
    /// from the backing file, or as zeros without one).
    pub fn is_unallocated(&self) -> bool {
        matches!(
            self,
            Mapping::Cluster {
                host: None,
                zero: false
            } | Mapping::Subclusters {
                host: None,
                bitmap: 0
            }
        )
    }
}

/// The mapping rules of one image (its cluster size, entry width, version and data file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// 128-bit L2 entries with subcluster bitmaps.
    pub extended: bool,
    /// Version 3 or later (zero clusters allowed).
    pub v3: bool,
    /// Guest data lives in an external data file.
    pub data_file: bool,
}

impl Rules {
    /// The rules of the image whose header is `h`.
    pub fn of(h: &Header) -> Rules {
        Rules {
            cluster_bits: h.cluster_bits,
            extended: h.extended_l2(),
            v3: h.version >= 3,
            data_file: h.data_file.is_some(),
        }
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// log2 of the unit size (subcluster with extended L2, else cluster).
    pub fn unit_bits(&self) -> u32 {
        self.cluster_bits - if self.extended { 5 } else { 0 }
    }

    /// Units per cluster: 32 with extended L2, else 1.
    pub fn units(&self) -> u32 {
        if self.extended { 32 } else { 1 }
    }

    /// L1 entry `index`: the host offset of its L2 table, or `None` when unallocated.
    pub fn l1_entry(&self, index: u64, e: u64) -> Result<Option<u64>> {
        if e & L1_RESERVED_MASK != 0 {
            return Err(corrupt!("L1 entry {index} has reserved bits set ({e:#x})"));
        }
        let off = e & L1_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        let cs = self.cluster_size();
        if off % cs != 0 {
            return Err(corrupt!("L2 table offset {off:#x} is not cluster aligned"));
        }
        if off < cs {
            return Err(corrupt!("L2 table at {off:#x} overlaps the header"));
        }
        Ok(Some(off))
    }

    /// The L2 entry for guest cluster `cluster`: `entry`, and `bitmap` (extended L2 only;
    /// ignored otherwise).
    pub fn l2_entry(&self, cluster: u64, entry: u64, bitmap: u64) -> Result<Mapping> {
        let cb = self.cluster_bits;
        if entry & COMPRESSED != 0 {
            if self.data_file {
                return Err(corrupt!(
                    "compressed cluster entry found in image with external data file"
                ));
            }
            let x = 62 - (cb - 8);
            let offset = entry & ((1u64 << x) - 1);
            let nsect = (entry >> x) & ((1u64 << (cb - 8)) - 1);
            if offset >> 56 != 0 {
                return Err(corrupt!(
                    "compressed cluster offset {offset:#x} out of range"
                ));
            }
            // Compressed clusters have no subclusters: their bitmap is reserved.
            if self.extended && bitmap != 0 {
                return Err(corrupt!(
                    "compressed guest cluster {cluster} has a non-zero subcluster bitmap"
                ));
            }
            let size = (nsect + 1) * 512 - (offset & 511);
            return Ok(Mapping::Compressed { offset, size });
        }
        if entry & L2_RESERVED_MASK != 0 {
            return Err(corrupt!(
                "L2 entry for guest cluster {cluster} has reserved bits set ({entry:#x})"
            ));
        }
        let host = entry & L2_OFFSET_MASK;
        if host % self.cluster_size() != 0 {
            return Err(corrupt!(
                "data cluster offset {host:#x} is not cluster aligned"
            ));
        }
        let allocated = host != 0 || (self.data_file && entry & COPIED != 0);
        let host = allocated.then_some(host);
        if !self.extended {
            let zero = entry & ZERO != 0;
            if zero && !self.v3 {
                return Err(corrupt!("zero cluster entry found in pre-v3 image"));
            }
            return Ok(Mapping::Cluster { host, zero });
        }
        if (bitmap >> 32) & bitmap & ALL_ALLOC != 0 {
            return Err(corrupt!(
                "guest cluster {cluster} has subclusters that are both allocated and zero"
            ));
        }
        if host.is_none() && bitmap & ALL_ALLOC != 0 {
            return Err(corrupt!(
                "unallocated guest cluster {cluster} has subclusters marked allocated"
            ));
        }
        Ok(Mapping::Subclusters { host, bitmap })
    }

    /// The state of unit `sub` (0 for standard entries) of a decoded entry.
    pub fn unit(&self, m: Mapping, sub: u32) -> Unit {
        match m {
            Mapping::Compressed { offset, size } => Unit::Compressed { offset, size },
            Mapping::Cluster { host, zero: true } => Unit::Zero { host },
            Mapping::Cluster {
                host: Some(host),
                zero: false,
            } => Unit::Data { host },
            Mapping::Cluster {
                host: None,
                zero: false,
            } => Unit::Unallocated { host: None },
            Mapping::Subclusters { host, bitmap } => {
                let sub_host = host.map(|h| h + (u64::from(sub) << self.unit_bits()));
                let alloc = (bitmap >> sub) & 1 != 0;
                let zero = (bitmap >> (32 + sub)) & 1 != 0;
                match (alloc, sub_host) {
                    (true, Some(h)) => Unit::Data { host: h },
                    _ if zero => Unit::Zero { host: sub_host },
                    _ => Unit::Unallocated { host: sub_host },
                }
            }
        }
    }
}

/// Guest data mapped at or past the end of the image file: refused by both readers
/// (deliberately: qemu reads it as zeros, which hides a truncated download or upload). Data
/// starting before the end and running past it reads as zeros past the end, as in qemu.
pub fn data_past_end(host: u64) -> crate::error::Error {
    corrupt!("data cluster at host offset {host:#x} lies past end of file (truncated image?)")
}

/// The mapping metadata that guest data is read through: the active L1 table's clusters and
/// the L2 tables it names. Data and compressed clusters aliasing them, and L2 tables inside
/// the L1 table, are refused (deliberately, in both readers).
#[derive(Debug, Clone, Default)]
pub struct Metadata {
    /// Host clusters of the L1 table (byte range, cluster aligned).
    l1: std::ops::Range<u64>,
    /// Host offsets of the L2 tables, sorted, without duplicates.
    l2: Vec<u64>,
    /// No aliasing is possible: data lives in an external data file.
    external: bool,
}

impl Metadata {
    /// The metadata of an image with rules `r` whose L1 table of `l1_bytes` bytes lies at
    /// `l1_offset` and names the L2 tables `l2` (any order, duplicates allowed).
    pub fn new(r: &Rules, l1_offset: u64, l1_bytes: u64, mut l2: Vec<u64>) -> Metadata {
        let cs = r.cluster_size();
        l2.sort_unstable();
        l2.dedup();
        let end = l1_offset.saturating_add(l1_bytes).div_ceil(cs) * cs;
        Metadata {
            l1: l1_offset..end.max(l1_offset),
            l2,
            external: r.data_file,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.l2.capacity() as u64 * 8
    }

    /// An L2 table at `off` must not lie inside the L1 table.
    pub fn check_l2(&self, off: u64) -> Result<()> {
        if self.l1.contains(&off) {
            return Err(corrupt!(
                "L2 table at {off:#x} lies inside the L1 table (metadata aliasing)"
            ));
        }
        Ok(())
    }

    /// Guest data at host bytes `off..off+len` (in the image file) must not alias metadata.
    pub fn check_data(&self, off: u64, len: u64, cluster_bits: u32) -> Result<()> {
        if self.external || len == 0 {
            return Ok(());
        }
        let end = off.saturating_add(len);
        if off < self.l1.end && self.l1.start < end {
            return Err(corrupt!(
                "guest data at host offset {off:#x} overlaps the L1 table (metadata aliasing)"
            ));
        }
        let first = (off >> cluster_bits) << cluster_bits;
        let i = self.l2.partition_point(|&t| t < first);
        if let Some(&t) = self.l2.get(i)
            && t < end
        {
            return Err(corrupt!(
                "guest data at host offset {off:#x} overlaps the L2 table at {t:#x} (metadata aliasing)"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(ext: bool, v3: bool) -> Rules {
        Rules {
            cluster_bits: 16,
            extended: ext,
            v3,
            data_file: false,
        }
    }

    #[test]
    fn standard_entries() {
        let r = rules(false, true);
        assert_eq!(
            r.l2_entry(0, COPIED | 0x50000, 0).unwrap(),
            Mapping::Cluster {
                host: Some(0x50000),
                zero: false
            }
        );
        assert!(r.l2_entry(0, 0x50200, 0).is_err());
        assert!(r.l2_entry(0, 1 << 57, 0).is_err());
        assert!(rules(false, false).l2_entry(0, ZERO, 0).is_err());
        let z = r.l2_entry(0, ZERO, 0).unwrap();
        assert_eq!(r.unit(z, 0), Unit::Zero { host: None });
        assert_eq!(
            r.l1_entry(0, 0x200).unwrap_err().kind(),
            crate::ErrorKind::Corrupt
        );
        assert!(r.l1_entry(0, 0x8000).is_err());
        assert!(r.l1_entry(0, 0x1000).is_err());
        assert_eq!(r.l1_entry(0, COPIED | 0x20000).unwrap(), Some(0x20000));
    }

    #[test]
    fn extended_bitmaps_are_validated_whole() {
        let r = rules(true, true);
        // Subcluster 31 both allocated and zero: invalid even if only subcluster 0 is read.
        assert!(r.l2_entry(0, 0x50000, (1 << 63) | (1 << 31)).is_err());
        assert!(r.l2_entry(0, 0, 1).is_err());
        let m = r.l2_entry(0, 0x50000, 1 | (1 << 33)).unwrap();
        assert_eq!(r.unit(m, 0), Unit::Data { host: 0x50000 });
        assert_eq!(
            r.unit(m, 1),
            Unit::Zero {
                host: Some(0x50800)
            }
        );
        assert_eq!(
            r.unit(m, 2),
            Unit::Unallocated {
                host: Some(0x51000)
            }
        );
        assert!(r.l2_entry(0, COMPRESSED | 0x1000, 1).is_err());
    }

    #[test]
    fn aliasing() {
        let r = rules(false, true);
        let m = Metadata::new(&r, 0x30000, 8, vec![0x60000, 0x40000, 0x40000]);
        assert!(m.check_data(0x30000, 0x10000, 16).is_err());
        assert!(m.check_data(0x40000, 0x10000, 16).is_err());
        assert!(m.check_data(0x50000, 0x10000, 16).is_ok());
        assert!(m.check_data(0x5ff00, 0x200, 16).is_err());
        assert!(m.check_l2(0x30000).is_err());
        assert!(m.check_l2(0x40000).is_ok());
    }
}
