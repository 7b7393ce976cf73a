//! The internal snapshot table: parsed with qemu's limits (count, extra data, total size) and
//! each snapshot's L1 table checked like the active one.

use super::header::{Header, MAX_L1_BYTES, MAX_SNAPSHOT_EXTRA, check_table};
use crate::error::{Error, ErrorKind, Result, corrupt};
use crate::io::BlockIo;
use byteorder::{BigEndian, ByteOrder};

/// Largest snapshot table qemu accepts: 1 KiB per snapshot for 65536 snapshots.
pub const MAX_TABLE_BYTES: u64 = 1024 * 65536;

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

/// The snapshot table, parsed from its bytes fed in order from its start: the one definition
/// of a valid table. The file reader ([`read_table`]) reads the bytes for it; the streaming
/// reader feeds them as they pass. Limits are checked before the bytes they govern are
/// needed, so a table beyond them is refused without reading (or holding) its variable parts.
#[derive(Debug)]
pub struct TableParser {
    v3: bool,
    cluster_size: u64,
    count: u32,
    /// Entries completed.
    index: u32,
    /// Table bytes consumed (entries with their padding).
    used: u64,
    /// Padding bytes to pass before the current entry.
    skip: u64,
    /// The current entry's bytes so far.
    buf: Vec<u8>,
    /// Bytes of the current entry needed (40 until its fixed part is known).
    need: usize,
    keep: bool,
    entries: Vec<Snapshot>,
}

impl TableParser {
    /// A parser for the table described by `h`; `keep` collects the entries.
    pub fn new(h: &Header, keep: bool) -> TableParser {
        TableParser {
            v3: h.version >= 3,
            cluster_size: h.cluster_size(),
            count: h.nb_snapshots,
            index: 0,
            used: 0,
            skip: 0,
            buf: Vec::new(),
            need: 40,
            keep,
            entries: Vec::new(),
        }
    }

    /// True when every entry has been parsed.
    pub fn done(&self) -> bool {
        self.index >= self.count
    }

    /// Bytes still needed before the next entry is complete (0 when done).
    pub fn wanted(&self) -> u64 {
        if self.done() {
            0
        } else {
            self.skip + (self.need - self.buf.len()) as u64
        }
    }

    /// Table bytes consumed so far (the next byte wanted is at this offset in the table).
    pub fn consumed(&self) -> u64 {
        self.used + self.buf.len() as u64
    }

    /// Entries completed so far.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Stop parsing (after an error): the parser reports itself done.
    pub fn abandon(&mut self) {
        self.count = self.index;
        self.buf = Vec::new();
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.buf.capacity() as u64 + self.entries.capacity() as u64 * 128
    }

    /// Feed the next bytes of the table; returns how many were taken (fewer than given only
    /// when the table is complete).
    pub fn feed(&mut self, mut data: &[u8]) -> Result<usize> {
        let given = data.len();
        while !self.done() && !data.is_empty() {
            if self.skip > 0 {
                let n = (self.skip as usize).min(data.len());
                self.skip -= n as u64;
                self.used += n as u64;
                data = &data[n..];
                continue;
            }
            if self.buf.is_empty() && self.used + 40 > MAX_TABLE_BYTES {
                return Err(Error::new(ErrorKind::TooLarge, "snapshot table is too big"));
            }
            let n = (self.need - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() < self.need {
                continue;
            }
            if self.need == 40 {
                self.fixed_complete()?;
                if self.buf.len() < self.need {
                    continue;
                }
            }
            self.entry_complete()?;
        }
        Ok(given - data.len())
    }

    fn fixed_complete(&mut self) -> Result<()> {
        let i = self.index;
        let fixed: &[u8; 40] = self.buf[..40]
            .try_into()
            .map_err(|_| corrupt!("snapshot"))?;
        let extra_len = BigEndian::read_u32(&fixed[36..40]);
        if extra_len > MAX_SNAPSHOT_EXTRA {
            return Err(Error::new(
                ErrorKind::TooLarge,
                "too much extra metadata in snapshot table entry",
            ));
        }
        if self.v3 && extra_len < 16 {
            return Err(corrupt!(
                "snapshot table entry {i} has too little extra data ({extra_len} bytes)"
            ));
        }
        let var = var_len(fixed);
        let entry_len = (40 + var).div_ceil(8) * 8;
        if self.used + entry_len > MAX_TABLE_BYTES {
            return Err(Error::new(ErrorKind::TooLarge, "snapshot table is too big"));
        }
        self.need = 40 + var as usize;
        Ok(())
    }

    fn entry_complete(&mut self) -> Result<()> {
        let e = std::mem::take(&mut self.buf);
        let fixed: &[u8; 40] = e[..40].try_into().map_err(|_| corrupt!("snapshot"))?;
        let var = &e[40..];
        let l1_table_offset = BigEndian::read_u64(&fixed[0..8]);
        let l1_size = BigEndian::read_u32(&fixed[8..12]);
        let id_len = BigEndian::read_u16(&fixed[12..14]) as usize;
        let extra_len = BigEndian::read_u32(&fixed[36..40]) as usize;
        let extra = &var[..extra_len];
        let mut vm_state_size = u64::from(BigEndian::read_u32(&fixed[32..36]));
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
        let id = String::from_utf8_lossy(&var[extra_len..extra_len + id_len]).into_owned();
        let name = String::from_utf8_lossy(&var[extra_len + id_len..]).into_owned();
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
            self.cluster_size,
        )?;
        let entry_len = (e.len() as u64).div_ceil(8) * 8;
        self.used += e.len() as u64;
        self.skip = entry_len - e.len() as u64;
        self.index += 1;
        self.need = 40;
        if self.keep {
            self.entries.push(Snapshot {
                l1_table_offset,
                l1_size,
                id,
                name,
                date_sec: BigEndian::read_u32(&fixed[16..20]),
                date_nsec: BigEndian::read_u32(&fixed[20..24]),
                vm_clock_nsec: BigEndian::read_u64(&fixed[24..32]),
                vm_state_size,
                disk_size,
                icount,
            });
        }
        Ok(())
    }

    /// The input ended: an incomplete table is corrupt. Returns the entries (if kept).
    pub fn finish(self) -> Result<Vec<Snapshot>> {
        if !self.done() {
            return Err(corrupt!(
                "snapshot table entry {} lies past end of file",
                self.index
            ));
        }
        Ok(self.entries)
    }
}

/// Read and validate the snapshot table described by `h` from an image file of `file_size`
/// bytes.
pub fn read_table(io: &dyn BlockIo, h: &Header, file_size: u64) -> Result<Vec<Snapshot>> {
    if h.nb_snapshots == 0 {
        return Ok(Vec::new());
    }
    // Validated whole before anything is kept: names of a table past its limits are never
    // held (a table within them holds at most its 64 MiB).
    parse_table(io, h, file_size, false)?;
    parse_table(io, h, file_size, true)
}

fn parse_table(io: &dyn BlockIo, h: &Header, file_size: u64, keep: bool) -> Result<Vec<Snapshot>> {
    let mut p = TableParser::new(h, keep);
    let mut piece = Vec::new();
    let mut off = h.snapshots_offset;
    while !p.done() {
        let want = p.wanted().min(64 << 10);
        let n = want.min(file_size.saturating_sub(off));
        if n == 0 {
            break;
        }
        piece.resize(n as usize, 0);
        io.read_exact_at(&mut piece, off)
            .map_err(|e| Error::io("cannot read snapshot table", e))?;
        p.feed(&piece)?;
        off += n;
    }
    p.finish()
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
