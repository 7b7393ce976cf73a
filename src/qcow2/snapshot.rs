//! The internal snapshot table: parsed with qemu's limits (count, extra data, total size) and
//! each snapshot's L1 table checked like the active one.

use super::header::{Header, MAX_L1_BYTES, MAX_SNAPSHOT_EXTRA, check_table};
use crate::error::{Error, ErrorKind, Result, corrupt};
use crate::io::BlockIo;
use byteorder::{BigEndian, ByteOrder};

/// Largest snapshot table qemu accepts: 1 KiB per snapshot for 65536 snapshots.
const MAX_TABLE_BYTES: u64 = 1024 * 65536;

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Host offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in that L1 table.
    pub l1_size: u32,
    /// Unique id string (qemu numbers them "1", "2", ...).
    pub id: String,
    /// Name (tag).
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Size of the saved VM state.
    pub vm_state_size: u64,
    /// Virtual disk size when the snapshot was taken, if recorded.
    pub disk_size: Option<u64>,
    /// Instruction count (`-1` disabled), if recorded.
    pub icount: Option<u64>,
}

/// Read and validate the snapshot table described by `h`.
pub fn read_table(io: &dyn BlockIo, h: &Header) -> Result<Vec<Snapshot>> {
    if h.nb_snapshots == 0 {
        return Ok(Vec::new());
    }
    let cs = h.cluster_size();
    let file_size = io.size().map_err(|e| Error::io("cannot stat image", e))?;
    // First pass: only the fixed part of each entry, so a table beyond the limits is refused
    // before its variable parts (up to 64 MiB of ids and names) are read into memory.
    let mut entries: Vec<(u64, [u8; 40])> = Vec::with_capacity(h.nb_snapshots as usize);
    let mut off = h.snapshots_offset;
    for i in 0..h.nb_snapshots {
        let used = off - h.snapshots_offset;
        if used + 40 > MAX_TABLE_BYTES {
            return Err(Error::new(ErrorKind::TooLarge, "snapshot table is too big"));
        }
        if off + 40 > file_size {
            return Err(corrupt!("snapshot table entry {i} lies past end of file"));
        }
        let mut fixed = [0u8; 40];
        io.read_exact_at(&mut fixed, off)
            .map_err(|e| Error::io("cannot read snapshot table", e))?;
        let extra_len = BigEndian::read_u32(&fixed[36..40]);
        if extra_len > MAX_SNAPSHOT_EXTRA {
            return Err(Error::new(
                ErrorKind::TooLarge,
                "too much extra metadata in snapshot table entry",
            ));
        }
        if h.version >= 3 && extra_len < 16 {
            return Err(corrupt!(
                "snapshot table entry {i} has too little extra data ({extra_len} bytes)"
            ));
        }
        let var_len = var_len(&fixed);
        let entry_len = (40 + var_len).div_ceil(8) * 8;
        if used + entry_len > MAX_TABLE_BYTES {
            return Err(Error::new(ErrorKind::TooLarge, "snapshot table is too big"));
        }
        if off + 40 + var_len > file_size {
            return Err(corrupt!("snapshot table entry {i} lies past end of file"));
        }
        entries.push((off, fixed));
        off += entry_len;
    }
    let mut out = Vec::with_capacity(entries.len());
    for (off, fixed) in entries {
        let l1_table_offset = BigEndian::read_u64(&fixed[0..8]);
        let l1_size = BigEndian::read_u32(&fixed[8..12]);
        let id_len = BigEndian::read_u16(&fixed[12..14]) as u64;
        let date_sec = BigEndian::read_u32(&fixed[16..20]);
        let date_nsec = BigEndian::read_u32(&fixed[20..24]);
        let vm_clock_nsec = BigEndian::read_u64(&fixed[24..32]);
        let mut vm_state_size = u64::from(BigEndian::read_u32(&fixed[32..36]));
        let extra_len = BigEndian::read_u32(&fixed[36..40]);
        let mut var = vec![0u8; var_len(&fixed) as usize];
        io.read_exact_at(&mut var, off + 40)
            .map_err(|e| Error::io("cannot read snapshot table", e))?;
        let extra = &var[..extra_len as usize];
        let mut disk_size = None;
        let mut icount = None;
        if extra.len() >= 8 {
            vm_state_size = BigEndian::read_u64(&extra[0..8]);
        }
        if extra.len() >= 16 {
            disk_size = Some(BigEndian::read_u64(&extra[8..16]));
        }
        if extra.len() >= 24 {
            icount = Some(BigEndian::read_u64(&extra[16..24]));
        }
        let id_start = extra_len as usize;
        let id = String::from_utf8_lossy(&var[id_start..id_start + id_len as usize]).into_owned();
        let name = String::from_utf8_lossy(&var[id_start + id_len as usize..]).into_owned();
        if u64::from(l1_size) * 8 > MAX_L1_BYTES {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!("snapshot '{name}' L1 table is too large"),
            ));
        }
        check_table(
            &format!("snapshot '{name}' L1 table"),
            l1_table_offset,
            u64::from(l1_size) * 8,
            cs,
        )?;
        out.push(Snapshot {
            l1_table_offset,
            l1_size,
            id,
            name,
            date_sec,
            date_nsec,
            vm_clock_nsec,
            vm_state_size,
            disk_size,
            icount,
        });
    }
    Ok(out)
}

/// Length of an entry's extra data, id and name (after its 40 fixed bytes).
fn var_len(fixed: &[u8; 40]) -> u64 {
    u64::from(BigEndian::read_u32(&fixed[36..40]))
        + u64::from(BigEndian::read_u16(&fixed[12..14]))
        + u64::from(BigEndian::read_u16(&fixed[14..16]))
}

/// Find a snapshot by id or by name, as `qemu-img convert -l` does (`snapshot.id=` and
/// `snapshot.name=` prefixes select one field; a bare string matches either, id first).
pub fn find<'a>(snaps: &'a [Snapshot], spec: &str) -> Option<&'a Snapshot> {
    if let Some(id) = spec.strip_prefix("snapshot.id=") {
        return snaps.iter().find(|s| s.id == id);
    }
    if let Some(name) = spec.strip_prefix("snapshot.name=") {
        return snaps.iter().find(|s| s.name == name);
    }
    snaps
        .iter()
        .find(|s| s.id == spec)
        .or_else(|| snaps.iter().find(|s| s.name == spec))
}
