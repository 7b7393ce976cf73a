//! The persistent dirty bitmaps of a qcow2 v3 image, as its bitmap directory lists them
//! (name, granularity, flags, table), read with qemu's limits. `info` shows them, `measure`
//! sizes them; `check` validates the same directory with its own accounting.

use super::Qcow2;
use super::header::AUTOCLEAR_BITMAPS;
use crate::error::{Error, ErrorKind, Result};
use byteorder::{BigEndian, ByteOrder};

/// Longest bitmap name qemu accepts.
const MAX_NAME: usize = 1023;
/// Most entries a bitmap table may have (qemu's limit).
const MAX_TABLE_ENTRIES: u64 = 0x800_0000;

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
    let h = q.header();
    let Some((count, dir_size, dir_offset)) = h.bitmaps_ext else {
        return Ok(Vec::new());
    };
    if h.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
        return Ok(Vec::new());
    }
    let file_len = q.file_size();
    if dir_offset
        .checked_add(dir_size)
        .is_none_or(|end| end > file_len)
    {
        return Err(bad("it lies past the end of the file".into()));
    }
    // The header check bounds dir_size to 64 MiB.
    let mut dir = vec![0u8; dir_size as usize];
    q.file()
        .read_exact_at(&mut dir, dir_offset)
        .map_err(|e| Error::io("cannot read the bitmap directory", e))?;
    let cs = h.cluster_size();
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < dir.len() {
        let n = out.len();
        let e = dir
            .get(pos..pos + 24)
            .ok_or_else(|| bad(format!("entry {n} is truncated")))?;
        let table_offset = BigEndian::read_u64(&e[0..8]);
        let table_entries = u64::from(BigEndian::read_u32(&e[8..12]));
        let flags = BigEndian::read_u32(&e[12..16]);
        let typ = e[16];
        let granularity_bits = u32::from(e[17]);
        let name_size = usize::from(BigEndian::read_u16(&e[18..20]));
        let extra = BigEndian::read_u32(&e[20..24]) as usize;
        let len = (24 + extra + name_size).div_ceil(8) * 8;
        if len > dir.len() - pos {
            return Err(bad(format!("entry {n} runs past the directory")));
        }
        if typ != 1
            || !(9..=31).contains(&granularity_bits)
            || name_size == 0
            || name_size > MAX_NAME
            || flags & !(FLAG_IN_USE | FLAG_AUTO) != 0
            || table_entries > MAX_TABLE_ENTRIES
            || table_offset % cs != 0
        {
            return Err(bad(format!("entry {n} is malformed")));
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
        return Err(bad(format!(
            "it has {} entries, the header says {count}",
            out.len()
        )));
    }
    Ok(out)
}
