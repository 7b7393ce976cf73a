//! The qcow2 header (cluster 0): fields, feature bits, header extensions and the backing file
//! name, parsed and checked against the limits qemu enforces before anything else is read.

use crate::error::{Error, ErrorKind, Result, corrupt};
use byteorder::{BigEndian, ByteOrder};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Smallest cluster: 512 B.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster: 2 MiB.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// qemu's QCOW_MAX_L1_SIZE: 32 MiB of L1 entries.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// qemu's QCOW_MAX_REFTABLE_SIZE: 8 MiB of refcount table.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// qemu's QCOW_MAX_SNAPSHOTS.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// qemu's QCOW_MAX_SNAPSHOT_EXTRA_DATA.
pub const MAX_SNAPSHOT_EXTRA: u32 = 1024;
/// Longest backing file name the spec allows.
pub const MAX_BACKING_NAME: u32 = 1023;

/// Incompatible feature bits.
pub mod incompat {
    /// Refcounts may be stale.
    pub const DIRTY: u64 = 1 << 0;
    /// Metadata is known to be corrupt.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// A non-default compression type is in use.
    pub const COMPRESSION: u64 = 1 << 3;
    /// 128-bit L2 entries with 32 subclusters.
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// Every bit this reader understands.
    pub const KNOWN: u64 = 0x1f;
}

/// Compatible feature bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1;
/// Autoclear bit 0: bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1;
/// Autoclear bit 1: the external data file is a valid raw image.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 2;

/// Header extension types.
pub(crate) mod ext {
    pub const END: u32 = 0;
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    pub const FEATURE_TABLE: u32 = 0x6803_f857;
    pub const BITMAPS: u32 = 0x2385_2875;
    pub const CRYPTO: u32 = 0x0537_be77;
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// How compressed clusters are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (RFC 1951), qemu's "zlib".
    Zlib,
    /// One zstd frame per cluster.
    Zstd,
}

impl CompressionType {
    /// qemu's name.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// One entry of the feature name table extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number.
    pub bit: u8,
    /// Name, NUL padding removed.
    pub name: String,
}

/// A parsed and validated qcow2 header.
#[derive(Debug, Clone)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name in cluster 0 (0: none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Host offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Length of the refcount table in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Header length in bytes (72 for v2).
    pub header_length: u32,
    /// Compression type of compressed clusters.
    pub compression_type: CompressionType,
    /// Backing file format from the extension, if present.
    pub backing_format: Option<String>,
    /// Backing file name, if any (raw bytes decoded lossily).
    pub backing_file: Option<String>,
    /// External data file name from the extension, if present.
    pub data_file: Option<String>,
    /// The feature name table, if present.
    pub feature_names: Vec<FeatureName>,
    /// True when a bitmaps extension is present.
    pub has_bitmaps: bool,
    /// The bitmaps extension: bitmap count, directory size and directory offset (validated
    /// for shape only; the directory is read by [`crate::qcow2::bitmaps`]).
    pub bitmaps_ext: Option<(u32, u64, u64)>,
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// True when L2 entries are 128-bit with subcluster bitmaps.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & incompat::EXTENDED_L2 != 0
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Entries in an L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / if self.extended_l2() { 16 } else { 8 }
    }

    /// Minimum L1 entries needed to map `size` bytes, with overflow checks.
    pub fn l1_entries_for(&self, size: u64) -> Option<u64> {
        let per_l1 = self.cluster_size().checked_mul(self.l2_entries())?;
        Some(size.div_ceil(per_l1))
    }

    /// Parse and validate cluster 0. `head` is the first cluster of the file (or the whole file,
    /// if it is shorter); `file_size` is the image file's length.
    pub fn parse(head: &[u8], file_size: u64) -> Result<Header> {
        Self::parse_mode(head, file_size, false)
    }

    /// Like [`Header::parse`], but with qemu's leniency for images opened to be checked: a
    /// refcount table of zero clusters and an active L1 table past the end of the file are
    /// accepted (the check reports them).
    pub fn parse_for_check(head: &[u8], file_size: u64) -> Result<Header> {
        Self::parse_mode(head, file_size, true)
    }

    fn parse_mode(head: &[u8], file_size: u64, check: bool) -> Result<Header> {
        if head.len() < 72 {
            return Err(corrupt!(
                "file too short for a qcow2 header ({} bytes)",
                head.len()
            ));
        }
        let be32 = |o: usize| BigEndian::read_u32(&head[o..o + 4]);
        let be64 = |o: usize| BigEndian::read_u64(&head[o..o + 8]);
        if be32(0) != MAGIC {
            return Err(Error::new(
                ErrorKind::UnsupportedFormat,
                "not a qcow2 image (bad magic)",
            ));
        }
        let version = be32(4);
        if version == 1 {
            return Err(Error::new(
                ErrorKind::UnsupportedFormat,
                "qcow version 1 images are not supported",
            ));
        }
        if version != 2 && version != 3 {
            return Err(Error::new(
                ErrorKind::UnsupportedFeature,
                format!("unsupported qcow2 version {version}"),
            ));
        }
        let cluster_bits = be32(20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(corrupt!(
                "unsupported cluster size: 2^{cluster_bits} (must be 512 B to 2 MiB)"
            ));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(8),
            backing_file_size: be32(16),
            cluster_bits,
            size: be64(24),
            crypt_method: be32(32),
            l1_size: be32(36),
            l1_table_offset: be64(40),
            refcount_table_offset: be64(48),
            refcount_table_clusters: be32(56),
            nb_snapshots: be32(60),
            snapshots_offset: be64(64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 72,
            compression_type: CompressionType::Zlib,
            backing_format: None,
            backing_file: None,
            data_file: None,
            feature_names: Vec::new(),
            has_bitmaps: false,
            bitmaps_ext: None,
        };
        if version >= 3 {
            if head.len() < 104 {
                return Err(corrupt!("qcow2 v3 header truncated"));
            }
            h.incompatible_features = be64(72);
            h.compatible_features = be64(80);
            h.autoclear_features = be64(88);
            h.refcount_order = be32(96);
            h.header_length = be32(100);
            if h.header_length < 104 {
                return Err(corrupt!(
                    "qcow2 header too short ({} bytes)",
                    h.header_length
                ));
            }
            if u64::from(h.header_length) > cluster_size {
                return Err(corrupt!(
                    "qcow2 header length {} exceeds the cluster size",
                    h.header_length
                ));
            }
            // qemu itself does not insist (the spec does); its check accepts such images.
            if h.header_length % 8 != 0 && !check {
                return Err(corrupt!(
                    "qcow2 header length {} is not a multiple of 8",
                    h.header_length
                ));
            }
            if h.header_length as usize > head.len() {
                return Err(corrupt!(
                    "qcow2 header length {} runs past end of file",
                    h.header_length
                ));
            }
            let ctype = if h.header_length > 104 { head[104] } else { 0 };
            let has_bit = h.incompatible_features & incompat::COMPRESSION != 0;
            h.compression_type = match (ctype, has_bit) {
                (0, false) => CompressionType::Zlib,
                (1, true) => CompressionType::Zstd,
                (0, true) => {
                    return Err(corrupt!(
                        "compression type bit set but compression type is zlib"
                    ));
                }
                (t, false) => {
                    return Err(corrupt!(
                        "compression type {t} set without the compression type feature bit"
                    ));
                }
                (t, true) => {
                    return Err(Error::new(
                        ErrorKind::UnsupportedFeature,
                        format!("unknown compression type {t}"),
                    ));
                }
            };
        }
        if h.refcount_order > 6 {
            return Err(corrupt!(
                "refcount width 2^{} bits is invalid (max 64)",
                h.refcount_order
            ));
        }
        if h.extended_l2() && cluster_bits < 14 {
            return Err(corrupt!("extended L2 needs clusters of at least 16 KiB"));
        }
        // Header extensions live between header_length and the backing name (or cluster end).
        let area_end = if h.backing_file_offset != 0 {
            if h.backing_file_offset > cluster_size {
                return Err(corrupt!(
                    "invalid backing file offset {:#x}",
                    h.backing_file_offset
                ));
            }
            h.backing_file_offset
        } else {
            cluster_size
        } as usize;
        // Bytes past the end of a short file read as zeros (as qemu's reads do): a zero
        // type ends the list.
        let padded;
        let area: &[u8] = if head.len() < area_end {
            let mut v = head.to_vec();
            v.resize(area_end, 0);
            padded = v;
            &padded
        } else {
            head
        };
        h.parse_extensions(area, area_end, cluster_size)?;
        if h.backing_file_offset != 0 {
            let len = h.backing_file_size;
            if len > MAX_BACKING_NAME || u64::from(len) > cluster_size - h.backing_file_offset {
                return Err(corrupt!("backing file name too long ({len} bytes)"));
            }
            let start = h.backing_file_offset as usize;
            let name = head
                .get(start..start + len as usize)
                .ok_or_else(|| corrupt!("backing file name runs past end of file"))?;
            h.backing_file = Some(String::from_utf8_lossy(name).into_owned());
        }
        let unknown = h.incompatible_features & !incompat::KNOWN;
        if unknown != 0 {
            let names: Vec<String> = (0..64)
                .filter(|b| unknown & (1u64 << b) != 0)
                .map(|b| {
                    h.feature_names
                        .iter()
                        .find(|f| f.kind == 0 && u32::from(f.bit) == b)
                        .map(|f| f.name.clone())
                        .unwrap_or_else(|| format!("unknown incompatible feature bit {b}"))
                })
                .collect();
            return Err(Error::new(
                ErrorKind::UnsupportedFeature,
                format!("unsupported qcow2 feature(s): {}", names.join(", ")),
            ));
        }
        if h.crypt_method != 0 {
            let what = if h.crypt_method == 2 { "LUKS" } else { "AES" };
            return Err(Error::new(
                ErrorKind::UnsupportedFeature,
                format!("encrypted qcow2 images ({what}) are not supported"),
            ));
        }
        let has_data_file = h.incompatible_features & incompat::DATA_FILE != 0;
        if has_data_file && h.data_file.is_none() {
            return Err(corrupt!(
                "external data file feature set but no data file name stored"
            ));
        }
        if h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0 && !has_data_file {
            return Err(corrupt!(
                "data-file-raw flag set without an external data file"
            ));
        }
        if h.version == 2 && h.incompatible_features != 0 {
            return Err(corrupt!("feature bits in a version 2 header"));
        }
        h.validate_tables(cluster_size, file_size, check)?;
        Ok(h)
    }

    fn parse_extensions(&mut self, head: &[u8], end: usize, cluster_size: u64) -> Result<()> {
        let mut off = self.header_length as usize;
        let mut seen: Vec<u32> = Vec::new();
        while off < end {
            // qemu reads each extension header whole; one that straddles the end of the
            // extension area (the backing file name, or the cluster end) is too large.
            if off + 8 > end {
                return Err(corrupt!("header extension at {off:#x} too large"));
            }
            let typ = BigEndian::read_u32(&head[off..off + 4]);
            let len = BigEndian::read_u32(&head[off + 4..off + 8]) as usize;
            off += 8;
            // qemu checks the length of every extension, the end marker's too.
            if len > end - off {
                return Err(corrupt!("header extension {typ:#x} too large"));
            }
            if typ == ext::END {
                return Ok(());
            }
            if seen.contains(&typ) && typ != ext::END {
                return Err(corrupt!("duplicate header extension {typ:#x}"));
            }
            seen.push(typ);
            let data = &head[off..off + len];
            match typ {
                ext::BACKING_FORMAT => {
                    if len >= 16 {
                        return Err(corrupt!("backing format name too long ({len} bytes)"));
                    }
                    self.backing_format = Some(String::from_utf8_lossy(data).into_owned());
                }
                ext::FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        let name = &e[2..];
                        let n = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                        self.feature_names.push(FeatureName {
                            kind: e[0],
                            bit: e[1],
                            name: String::from_utf8_lossy(&name[..n]).into_owned(),
                        });
                    }
                }
                ext::DATA_FILE => {
                    self.data_file = Some(String::from_utf8_lossy(data).into_owned());
                }
                ext::CRYPTO if len != 16 => {
                    return Err(corrupt!(
                        "encryption header extension has length {len} (expected 16)"
                    ));
                }
                ext::BITMAPS => {
                    if len != 24 {
                        return Err(corrupt!("bitmaps extension has length {len} (expected 24)"));
                    }
                    let nb = BigEndian::read_u32(&data[0..4]);
                    let reserved = BigEndian::read_u32(&data[4..8]);
                    let dir_size = BigEndian::read_u64(&data[8..16]);
                    let dir_off = BigEndian::read_u64(&data[16..24]);
                    if nb == 0
                        || nb > 65535
                        || reserved != 0
                        || dir_size > (64 << 20)
                        || dir_off % cluster_size != 0
                    {
                        return Err(corrupt!("invalid bitmaps extension"));
                    }
                    self.has_bitmaps = true;
                    self.bitmaps_ext = Some((nb, dir_size, dir_off));
                }
                _ => {} // unknown extensions are tolerated
            }
            off += len.div_ceil(8) * 8;
        }
        Ok(())
    }

    fn validate_tables(&self, cluster_size: u64, file_size: u64, check: bool) -> Result<()> {
        // Refcount table: not needed to read, but a bad one marks a hostile image.
        if self.refcount_table_clusters == 0 && !check {
            return Err(corrupt!("image does not contain a reference count table"));
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cluster_size;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(Error::new(
                ErrorKind::TooLarge,
                "reference count table too large",
            ));
        }
        check_table(
            "reference count table",
            self.refcount_table_offset,
            rt_bytes,
            cluster_size,
        )?;
        // L1 table.
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(Error::new(
                ErrorKind::TooLarge,
                "active L1 table too large (L1 size too big)",
            ));
        }
        let needed = self
            .l1_entries_for(self.size)
            .ok_or_else(|| corrupt!("image size overflows"))?;
        if needed > i32::MAX as u64 || needed * 8 > MAX_L1_BYTES {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!("image size {} is too big", self.size),
            ));
        }
        if u64::from(self.l1_size) < needed {
            return Err(corrupt!(
                "L1 table is too small ({} entries for {} needed)",
                self.l1_size,
                needed
            ));
        }
        check_table(
            "active L1 table",
            self.l1_table_offset,
            l1_bytes,
            cluster_size,
        )?;
        if self.l1_size > 0 && self.l1_table_offset >= file_size && !check {
            return Err(corrupt!(
                "active L1 table at {:#x} lies past end of file",
                self.l1_table_offset
            ));
        }
        // Snapshot table.
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(Error::new(ErrorKind::TooLarge, "too many snapshots"));
        }
        // qemu validates the snapshot table's offset even when there are no snapshots.
        check_table(
            "snapshot table",
            self.snapshots_offset,
            u64::from(self.nb_snapshots) * 40,
            cluster_size,
        )?;
        Ok(())
    }

    /// Refuse an image that names a backing file or an external data file (for input that
    /// may not make us open other files). Both readers call this right after the header.
    pub fn refuse_external_files(&self) -> Result<()> {
        if let Some(d) = &self.data_file {
            return Err(Error::new(
                ErrorKind::Denied,
                format!("image uses external data file '{d}', which untrusted input may not"),
            ));
        }
        if let Some(b) = &self.backing_file {
            return Err(Error::new(
                ErrorKind::Denied,
                format!("image has backing file '{b}', which untrusted input may not"),
            ));
        }
        Ok(())
    }
}

/// Read cluster 0 of a qcow2 file (the whole file when it is shorter): first the fixed part to
/// learn the cluster size, then exactly that cluster.
pub fn read_cluster0(io: &dyn crate::io::BlockIo, file_size: u64) -> Result<Vec<u8>> {
    let mut fixed = vec![0u8; file_size.min(112) as usize];
    io.read_exact_at(&mut fixed, 0)
        .map_err(|e| Error::io("cannot read qcow2 header", e))?;
    if fixed.len() < 24 {
        return Err(corrupt!(
            "file too short for a qcow2 header ({file_size} bytes)"
        ));
    }
    let bits = BigEndian::read_u32(&fixed[20..24]);
    let len = if (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
        1u64 << bits
    } else {
        fixed.len() as u64
    };
    let mut head = vec![0u8; len.min(file_size) as usize];
    io.read_exact_at(&mut head, 0)
        .map_err(|e| Error::io("cannot read qcow2 header", e))?;
    Ok(head)
}

/// qemu's `qcow2_validate_table`: aligned, no overflow, below `i64::MAX`.
pub fn check_table(what: &str, offset: u64, bytes: u64, cluster_size: u64) -> Result<()> {
    if offset % cluster_size != 0 {
        return Err(corrupt!("{what} offset {offset:#x} is not cluster aligned"));
    }
    match offset.checked_add(bytes) {
        Some(end) if end <= i64::MAX as u64 => Ok(()),
        _ => Err(corrupt!(
            "{what} at {offset:#x} with {bytes} bytes overflows"
        )),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use byteorder::WriteBytesExt;

    /// A minimal valid v3 header in a 64 KiB cluster, for tests that break one field.
    pub(crate) fn minimal_v3(size: u64) -> Vec<u8> {
        let mut h = vec![0u8; 65536];
        let mut w = &mut h[..];
        w.write_u32::<BigEndian>(MAGIC).unwrap();
        w.write_u32::<BigEndian>(3).unwrap();
        w.write_u64::<BigEndian>(0).unwrap();
        w.write_u32::<BigEndian>(0).unwrap();
        w.write_u32::<BigEndian>(16).unwrap();
        w.write_u64::<BigEndian>(size).unwrap();
        w.write_u32::<BigEndian>(0).unwrap();
        w.write_u32::<BigEndian>(1).unwrap(); // l1_size
        w.write_u64::<BigEndian>(3 << 16).unwrap(); // l1 offset
        w.write_u64::<BigEndian>(1 << 16).unwrap(); // reftable
        w.write_u32::<BigEndian>(1).unwrap();
        w.write_u32::<BigEndian>(0).unwrap();
        w.write_u64::<BigEndian>(0).unwrap();
        w.write_u64::<BigEndian>(0).unwrap();
        w.write_u64::<BigEndian>(0).unwrap();
        w.write_u64::<BigEndian>(0).unwrap();
        w.write_u32::<BigEndian>(4).unwrap();
        w.write_u32::<BigEndian>(112).unwrap();
        h
    }

    #[test]
    fn parses_minimal_and_rejects_broken_fields() {
        let h = minimal_v3(1 << 20);
        let p = Header::parse(&h, 4 << 16).unwrap();
        assert_eq!(p.cluster_size(), 65536);
        assert_eq!(p.l2_entries(), 8192);

        let mut b = h.clone();
        b[23] = 22; // cluster_bits
        assert_eq!(
            Header::parse(&b, 1 << 20).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        let mut b = h.clone();
        b[72 + 7] = 0x20; // unknown incompat bit 5
        let e = Header::parse(&b, 1 << 20).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnsupportedFeature);
        assert!(e.to_string().contains("bit 5"), "{e}");
        let mut b = h.clone();
        b[36..40].copy_from_slice(&0x0100_0000u32.to_be_bytes()); // 16M entries = 128 MiB
        assert_eq!(
            Header::parse(&b, 1 << 20).unwrap_err().kind(),
            ErrorKind::TooLarge
        );
        let mut b = h.clone();
        b[35] = 2; // LUKS
        assert_eq!(
            Header::parse(&b, 1 << 20).unwrap_err().kind(),
            ErrorKind::UnsupportedFeature
        );
        let mut b = h.clone();
        b[100..104].copy_from_slice(&(1u32 << 20).to_be_bytes());
        assert_eq!(
            Header::parse(&b, 1 << 20).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        let mut b = h.clone();
        b[40..48].copy_from_slice(&0x1_0001u64.to_be_bytes()); // unaligned L1
        assert_eq!(
            Header::parse(&b, 1 << 20).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        let mut b = h;
        b[112..120].copy_from_slice(&[0xe2, 0x79, 0x2a, 0xca, 0xff, 0, 0, 0]); // ext past cluster
        assert_eq!(
            Header::parse(&b, 1 << 20).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
    }
}
