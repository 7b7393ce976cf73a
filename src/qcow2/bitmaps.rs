//! The persistent dirty bitmaps of a qcow2 v3 image, as its bitmap directory lists them
//! (name, granularity, flags, table), read with qemu's limits, and their tables and bits.
//! `info` shows them, `measure` sizes them, the `bitmap` verb changes them (through
//! [`crate::qcow2::model::Model`]); `check` validates the same directory with its own
//! accounting.

use super::Qcow2;
use super::header::{AUTOCLEAR_BITMAPS, Header};
use crate::error::{Error, ErrorKind, Result};
use crate::io::BlockIo;
use byteorder::{BigEndian, ByteOrder};

/// Largest in-memory copy of one bitmap's bits (a merge holds two).
pub const MAX_BITS_BYTES: u64 = 64 << 20;
/// Table entry: the offset of a data cluster (bits 9..55).
const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Longest bitmap name qemu accepts.
const MAX_NAME: usize = 1023;
/// Most entries a bitmap table may have (qemu's limit).
const MAX_TABLE_ENTRIES: u64 = 0x800_0000;
/// Most bytes of bits one bitmap may have (qemu's limit): its table then holds at most
/// 512 MiB / cluster size entries (8 MiB of table at 512-byte clusters).
const MAX_DATA_BYTES: u64 = 0x2000_0000;

/// Flag: the bitmap was in use (not saved cleanly); its contents are not to be trusted.
pub const FLAG_IN_USE: u32 = 1;
/// Flag: the bitmap tracks every write automatically.
pub const FLAG_AUTO: u32 = 2;

/// One persistent bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    /// Its name.
    pub name: String,
    /// log2 of the bytes one bit covers.
    pub granularity_bits: u32,
    /// [`FLAG_IN_USE`], [`FLAG_AUTO`].
    pub flags: u32,
    /// Host offset of its table.
    pub table_offset: u64,
    /// Entries in its table.
    pub table_entries: u64,
}

fn bad(what: String) -> Error {
    Error::new(
        ErrorKind::Corrupt,
        format!("invalid bitmap directory: {what}"),
    )
}

/// The bitmaps of `q`, in directory order. None when the image has no bitmaps extension, or
/// when its "bitmaps consistent" autoclear bit is clear (a program that does not know bitmaps
/// wrote the image since, so qemu ignores them).
pub fn list(q: &Qcow2) -> Result<Vec<Bitmap>> {
    read_directory(q.file().as_ref(), q.header(), q.file_size())
}

/// The bitmap directory of the image in `io` (header `h`, file `file_len` bytes long); empty
/// when the image has none or they are not marked consistent.
pub fn read_directory(io: &dyn BlockIo, h: &Header, file_len: u64) -> Result<Vec<Bitmap>> {
    let Some((count, dir_size, dir_offset)) = h.bitmaps_ext else {
        return Ok(Vec::new());
    };
    if h.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
        return Ok(Vec::new());
    }
    if dir_offset
        .checked_add(dir_size)
        .is_none_or(|end| end > file_len)
    {
        return Err(bad("it lies past the end of the file".into()));
    }
    // The header check bounds dir_size to 64 MiB.
    let mut dir = vec![0u8; dir_size as usize];
    io.read_exact_at(&mut dir, dir_offset)
        .map_err(|e| Error::io("cannot read the bitmap directory", e))?;
    parse_directory(&dir, count, h.size, h.cluster_size()).map_err(bad)
}

/// The entries of bitmap directory `dir` (`count` bitmaps, per the header) of an image of
/// `disk_size` bytes with `cluster_size`-byte clusters, with qemu's limits: each entry names a
/// dirty-tracking bitmap of 512 B to 2 GiB granules whose cluster-aligned table has exactly
/// one entry per cluster of bits the disk needs. Errors say what is wrong (`check` reports
/// them as they are).
pub fn parse_directory(
    dir: &[u8],
    count: u32,
    disk_size: u64,
    cluster_size: u64,
) -> std::result::Result<Vec<Bitmap>, String> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < dir.len() {
        let n = out.len();
        let e = dir.get(pos..pos + 24).ok_or("truncated directory entry")?;
        let table_offset = BigEndian::read_u64(&e[0..8]);
        let table_entries = u64::from(BigEndian::read_u32(&e[8..12]));
        let flags = BigEndian::read_u32(&e[12..16]);
        let typ = e[16];
        let granularity_bits = u32::from(e[17]);
        let name_size = usize::from(BigEndian::read_u16(&e[18..20]));
        let extra = BigEndian::read_u32(&e[20..24]) as usize;
        let len = (24 + extra + name_size).div_ceil(8) * 8;
        if len > dir.len() - pos {
            return Err(format!("entry {n} runs past the directory"));
        }
        let needed = (9..=31)
            .contains(&granularity_bits)
            .then(|| Bitmap::entries_for(disk_size, granularity_bits, cluster_size));
        if table_offset == 0
            || table_offset % cluster_size != 0
            || table_entries > MAX_TABLE_ENTRIES
            || table_entries * cluster_size > MAX_DATA_BYTES
            || needed != Some(table_entries)
            || flags & !(FLAG_IN_USE | FLAG_AUTO) != 0
            || typ != 1
            || name_size == 0
            || name_size > MAX_NAME
        {
            return Err(format!("entry {n} is malformed"));
        }
        let name = &dir[pos + 24 + extra..pos + 24 + extra + name_size];
        out.push(Bitmap {
            name: String::from_utf8_lossy(name).into_owned(),
            granularity_bits,
            flags,
            table_offset,
            table_entries,
        });
        pos += len;
    }
    if out.len() != count as usize {
        return Err(format!(
            "it has {} entries, the header says {count}",
            out.len()
        ));
    }
    Ok(out)
}

/// Whether bitmap table entry `e` is valid: no reserved bits, and a data cluster offset (if
/// any) cluster aligned and without the "all ones" flag.
pub fn entry_is_valid(e: u64, cluster_size: u64) -> bool {
    let off = e & TABLE_OFFSET_MASK;
    e & !(TABLE_OFFSET_MASK | 1) == 0 && (off == 0 || (e & 1 == 0 && off % cluster_size == 0))
}

impl Bitmap {
    /// Table entries a bitmap of this granularity needs for a disk of `size` bytes with
    /// `cluster_size`-byte clusters.
    pub fn entries_for(size: u64, granularity_bits: u32, cluster_size: u64) -> u64 {
        size.div_ceil(1u64 << granularity_bits)
            .div_ceil(8)
            .div_ceil(cluster_size)
    }

    /// Its directory entry.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let mut e = [0u8; 24];
        BigEndian::write_u64(&mut e[0..], self.table_offset);
        BigEndian::write_u32(&mut e[8..], self.table_entries as u32);
        BigEndian::write_u32(&mut e[12..], self.flags);
        e[16] = 1;
        e[17] = self.granularity_bits as u8;
        BigEndian::write_u16(&mut e[18..], self.name.len() as u16);
        out.extend_from_slice(&e);
        out.extend_from_slice(self.name.as_bytes());
        out.resize(start + (24 + self.name.len()).div_ceil(8) * 8, 0);
    }
}

/// The table of bitmap `b` (its data cluster offsets, 0 for a cluster of clear bits, 1 for one
/// of set bits), checked: offsets cluster aligned and inside the file of `file_len` bytes.
pub fn read_table(
    io: &dyn BlockIo,
    cluster_size: u64,
    file_len: u64,
    b: &Bitmap,
) -> Result<Vec<u64>> {
    let bytes = b.table_entries * 8;
    if b.table_offset
        .checked_add(bytes)
        .is_none_or(|e| e > file_len)
    {
        return Err(bad(format!(
            "the table of bitmap '{}' lies past the end of the file",
            b.name
        )));
    }
    let mut raw = vec![0u8; bytes as usize];
    io.read_exact_at(&mut raw, b.table_offset)
        .map_err(|e| Error::io("cannot read a bitmap table", e))?;
    let table: Vec<u64> = raw.chunks_exact(8).map(BigEndian::read_u64).collect();
    for &e in &table {
        if !entry_is_valid(e, cluster_size) || e & TABLE_OFFSET_MASK >= file_len {
            return Err(bad(format!(
                "bitmap '{}' has an invalid table entry {e:#x}",
                b.name
            )));
        }
    }
    Ok(table)
}

/// Host clusters a table entry names (none for all-clear or all-set clusters).
pub fn data_cluster(entry: u64) -> Option<u64> {
    let off = entry & TABLE_OFFSET_MASK;
    (off != 0).then_some(off)
}

/// All bits of bitmap `b` (table `table`) in memory, one per granule, bit 0 of byte 0 the
/// first granule. Refused beyond [`MAX_BITS_BYTES`].
pub fn read_bits(
    io: &dyn BlockIo,
    cluster_size: u64,
    b: &Bitmap,
    table: &[u64],
) -> Result<Vec<u8>> {
    let len = table.len() as u64 * cluster_size;
    if len > MAX_BITS_BYTES {
        return Err(Error::new(
            ErrorKind::TooLarge,
            format!("bitmap '{}' is too large to load ({len} bytes)", b.name),
        ));
    }
    let mut bits = vec![0u8; len as usize];
    for (i, &e) in table.iter().enumerate() {
        let chunk = &mut bits[i * cluster_size as usize..(i + 1) * cluster_size as usize];
        match data_cluster(e) {
            Some(off) => io
                .read_exact_at(chunk, off)
                .map_err(|e| Error::io("cannot read bitmap data", e))?,
            None if e & 1 == 1 => chunk.fill(0xff),
            None => {}
        }
    }
    Ok(bits)
}

/// Set in `dst` (granularity `dst_bits`) every granule that overlaps a set granule of `src`
/// (granularity `src_bits`), for a disk of `size` bytes: a merge across granularities.
pub fn merge_bits(dst: &mut [u8], dst_bits: u32, src: &[u8], src_bits: u32, size: u64) {
    let n = size.div_ceil(1u64 << src_bits);
    for i in 0..n {
        if src
            .get((i / 8) as usize)
            .is_some_and(|b| b & (1 << (i % 8)) != 0)
        {
            let start = i << src_bits;
            let end = ((i + 1) << src_bits).min(size);
            for j in (start >> dst_bits)..=((end - 1) >> dst_bits) {
                if let Some(b) = dst.get_mut((j / 8) as usize) {
                    *b |= 1 << (j % 8);
                }
            }
        }
    }
}
