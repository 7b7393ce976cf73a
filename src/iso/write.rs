//! Writing a [`Tree`] as an ISO 9660 image: the primary volume descriptor, a Joliet
//! supplementary descriptor, little- and big-endian path tables for both trees, directory
//! extents with Rock Ridge (RRIP 1.10: `PX`, `TF`, `NM`, `SL`; `SP` and the `ER` in the root,
//! `CE` continuation areas for what does not fit in a record), and file extents (several, with
//! the multi-extent flag, for files over 4 GiB - 1).
//!
//! The layout is planned first from the tree alone, so the image is written front to back in
//! one pass: to a file (under a temporary name, renamed into place when complete; holes in
//! the sources and zero blocks stay holes) or to any `Write` (a pipe). Memory holds the tree's
//! metadata and one buffer, never a file. With a fixed date ([`IsoOptions::date`], set from
//! `SOURCE_DATE_EPOCH` by [`IsoOptions::from_env`]) the bytes depend only on the tree: the
//! volume dates are that date and every file time is clamped to it.

use super::names::{iso_names, joliet_names, sort_key};
use super::tree::{Kind, Meta, Source, Tree};
use crate::convert::TempTarget;
use crate::error::{Error, ErrorKind, Result};
use crate::io::{BlockIo, FileIo};
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

const SECTOR: u64 = 2048;
/// Largest extent of a multi-extent file: 4 GiB less one sector, so the next starts aligned.
const MAX_EXTENT: u64 = 0xFFFF_F800;
/// Largest volume: the volume space size is a 32-bit count of sectors.
const MAX_SECTORS: u64 = u32::MAX as u64;
/// First sector after the system area.
const FIRST_DESCRIPTOR: u32 = 16;
/// Size of a `CE` entry.
const CE_LEN: usize = 28;
/// Copy buffer.
const CHUNK: usize = 1 << 20;
/// Zero-detection granule when writing to a file.
const ZERO_BLOCK: usize = 4096;

const ER_ID: &[u8] = b"RRIP_1991A";
const ER_DESCRIPTOR: &[u8] =
    b"THE ROCK RIDGE INTERCHANGE PROTOCOL PROVIDES SUPPORT FOR POSIX FILE SYSTEM SEMANTICS";
const ER_SOURCE: &[u8] = b"PLEASE CONTACT DISC PUBLISHER FOR SPECIFICATION SOURCE.  SEE PUBLISHER IDENTIFIER IN PRIMARY VOLUME DESCRIPTOR FOR CONTACT INFORMATION.";

/// How to write the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsoOptions {
    /// Volume identifier: 1 to 32 printable ASCII characters (`cidata` for a NoCloud seed).
    pub volume_id: String,
    /// Write a Joliet tree (Windows' long names).
    pub joliet: bool,
    /// Write Rock Ridge entries (POSIX names, modes, owners, times, links).
    pub rock_ridge: bool,
    /// ISO 9660 name level: 1 (8.3 names) or 2/3 (up to 31 characters). Files over 4 GiB - 1
    /// are written as several extents (level 3) whatever this says.
    pub level: u8,
    /// Fixed date (Unix seconds) for the volume, and the latest any file time may show;
    /// `None` dates the volume now and keeps file times.
    pub date: Option<i64>,
    /// Owners root, read permission for all, no write permission, execute for all where any
    /// (as `mkisofs -r`).
    pub rational: bool,
    /// Application identifier (up to 128 ASCII characters).
    pub application: String,
}

impl Default for IsoOptions {
    fn default() -> Self {
        IsoOptions {
            volume_id: "ISOIMAGE".into(),
            joliet: true,
            rock_ridge: true,
            level: 1,
            date: None,
            rational: false,
            application: "VDISK".into(),
        }
    }
}

impl IsoOptions {
    /// Defaults with [`IsoOptions::date`] from `SOURCE_DATE_EPOCH` when it is set.
    pub fn from_env() -> Result<IsoOptions> {
        Ok(IsoOptions {
            date: crate::civil::source_date_epoch()?,
            ..IsoOptions::default()
        })
    }

    /// Apply one `-o` string (`volid=NAME,joliet=off,...`). Unknown keys are errors.
    pub fn apply(&mut self, spec: &str) -> Result<()> {
        use crate::qcow2::writer::parse_flag;
        for item in spec.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = item.split_once('=').unwrap_or((item, "on"));
            let bad = || Error::invalid(format!("invalid value '{v}' for option '{k}'"));
            match k {
                "volid" => self.volume_id = v.to_string(),
                "appid" => self.application = v.to_string(),
                "joliet" => self.joliet = parse_flag(v).ok_or_else(bad)?,
                "rockridge" => self.rock_ridge = parse_flag(v).ok_or_else(bad)?,
                "rational" => self.rational = parse_flag(v).ok_or_else(bad)?,
                "iso_level" => self.level = v.parse().map_err(|_| bad())?,
                _ => {
                    return Err(Error::invalid(format!(
                        "invalid parameter '{k}' for the iso format"
                    )));
                }
            }
        }
        self.check()
    }

    fn check(&self) -> Result<()> {
        let v = &self.volume_id;
        if v.is_empty() || v.len() > 32 || !v.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(Error::invalid(format!(
                "volume id '{}' must be 1 to 32 printable ASCII characters",
                v.escape_debug()
            )));
        }
        if self.application.len() > 128
            || !self.application.bytes().all(|b| (0x20..0x7f).contains(&b))
        {
            return Err(Error::invalid(
                "application id must be up to 128 printable ASCII characters",
            ));
        }
        if !(1..=3).contains(&self.level) {
            return Err(Error::invalid(format!(
                "ISO level {} is not 1, 2 or 3",
                self.level
            )));
        }
        Ok(())
    }
}

/// What was written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IsoReport {
    /// Image size in bytes.
    pub bytes: u64,
    /// Regular files (hard links counted once).
    pub files: u64,
    /// Directories, the root included.
    pub dirs: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Bytes of file data.
    pub data_bytes: u64,
}

// ------------------------------------------------------------------------------------------
// Encoding helpers

fn both16(v: u16) -> [u8; 4] {
    let (l, b) = (v.to_le_bytes(), v.to_be_bytes());
    [l[0], l[1], b[0], b[1]]
}

fn both32(v: u32) -> [u8; 8] {
    let (l, b) = (v.to_le_bytes(), v.to_be_bytes());
    [l[0], l[1], l[2], l[3], b[0], b[1], b[2], b[3]]
}

/// The 7-byte directory-record date (UTC), clamped to the years 1900–2155.
fn short_date(t: i64) -> [u8; 7] {
    let (y, mo, d, h, mi, s) = crate::civil::from_secs(t);
    if y < 1900 {
        [0, 1, 1, 0, 0, 0, 0]
    } else if y > 2155 {
        [255, 12, 31, 23, 59, 59, 0]
    } else {
        [
            (y - 1900) as u8,
            mo as u8,
            d as u8,
            h as u8,
            mi as u8,
            s as u8,
            0,
        ]
    }
}

/// The 17-byte volume-descriptor date (UTC).
fn long_date(t: i64) -> [u8; 17] {
    let (y, mo, d, h, mi, s) = crate::civil::from_secs(t);
    let y = y.clamp(0, 9999);
    let txt = format!("{y:04}{mo:02}{d:02}{h:02}{mi:02}{s:02}00");
    let mut out = [0u8; 17];
    out[..16].copy_from_slice(txt.as_bytes());
    out
}

const NO_DATE: [u8; 17] = *b"0000000000000000\0";

fn ucs2(s: &str, bytes: usize) -> Vec<u8> {
    let mut out: Vec<u8> = s
        .encode_utf16()
        .flat_map(u16::to_be_bytes)
        .take(bytes & !1)
        .collect();
    while out.len() < bytes {
        out.extend_from_slice(&[0, b' ']);
    }
    out.truncate(bytes);
    out
}

fn padded(s: &[u8], n: usize) -> Vec<u8> {
    let mut v: Vec<u8> = s.iter().copied().take(n).collect();
    v.resize(n, b' ');
    v
}

fn sectors(bytes: u64) -> u64 {
    bytes.div_ceil(SECTOR)
}

// ------------------------------------------------------------------------------------------
// Rock Ridge entries

fn su(sig: &[u8; 2], body: &[u8]) -> Vec<u8> {
    let mut e = Vec::with_capacity(4 + body.len());
    e.extend_from_slice(sig);
    e.push((4 + body.len()) as u8);
    e.push(1);
    e.extend_from_slice(body);
    e
}

fn px(meta: &Meta, nlink: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(32);
    b.extend_from_slice(&both32(meta.mode));
    b.extend_from_slice(&both32(nlink));
    b.extend_from_slice(&both32(meta.uid));
    b.extend_from_slice(&both32(meta.gid));
    su(b"PX", &b)
}

fn tf(meta: &Meta) -> Vec<u8> {
    let mut b = vec![0x0e];
    for t in [meta.mtime, meta.atime, meta.ctime] {
        b.extend_from_slice(&short_date(t));
    }
    su(b"TF", &b)
}

fn nm(name: &[u8]) -> Vec<Vec<u8>> {
    let chunks: Vec<&[u8]> = name.chunks(250).collect();
    let n = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let mut b = vec![u8::from(i + 1 < n)];
            b.extend_from_slice(c);
            su(b"NM", &b)
        })
        .collect()
}

fn sl(target: &[u8]) -> Vec<Vec<u8>> {
    // Component records: flags, length, content.
    let mut comps: Vec<Vec<u8>> = Vec::new();
    if target.first() == Some(&b'/') {
        comps.push(vec![0x08, 0]);
    }
    for part in target.split(|&b| b == b'/').filter(|p| !p.is_empty()) {
        match part {
            b"." => comps.push(vec![0x02, 0]),
            b".." => comps.push(vec![0x04, 0]),
            _ => {
                let pieces: Vec<&[u8]> = part.chunks(248).collect();
                let n = pieces.len();
                for (i, p) in pieces.into_iter().enumerate() {
                    let mut c = vec![u8::from(i + 1 < n), p.len() as u8];
                    c.extend_from_slice(p);
                    comps.push(c);
                }
            }
        }
    }
    let mut entries: Vec<Vec<u8>> = Vec::new();
    let mut cur: Vec<u8> = Vec::new();
    for c in comps {
        if cur.len() + c.len() > 250 {
            entries.push(std::mem::take(&mut cur));
        }
        cur.extend_from_slice(&c);
    }
    entries.push(cur);
    let n = entries.len();
    entries
        .into_iter()
        .enumerate()
        .map(|(i, body)| {
            let mut b = vec![u8::from(i + 1 < n)];
            b.extend_from_slice(&body);
            su(b"SL", &b)
        })
        .collect()
}

fn er() -> Vec<u8> {
    let mut b = vec![
        ER_ID.len() as u8,
        ER_DESCRIPTOR.len() as u8,
        ER_SOURCE.len() as u8,
        1,
    ];
    b.extend_from_slice(ER_ID);
    b.extend_from_slice(ER_DESCRIPTOR);
    b.extend_from_slice(ER_SOURCE);
    su(b"ER", &b)
}

fn ce(lba: u32, off: u32, len: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(24);
    b.extend_from_slice(&both32(lba));
    b.extend_from_slice(&both32(off));
    b.extend_from_slice(&both32(len));
    su(b"CE", &b)
}

/// System-use entries split between a record (`room` bytes) and continuation areas.
struct Packed {
    inline: Vec<Vec<u8>>,
    areas: Vec<Vec<Vec<u8>>>,
}

impl Packed {
    fn new(entries: Vec<Vec<u8>>, room: usize) -> Packed {
        let total: usize = entries.iter().map(Vec::len).sum();
        if total <= room {
            return Packed {
                inline: entries,
                areas: Vec::new(),
            };
        }
        let mut it = entries.into_iter().peekable();
        let mut inline = Vec::new();
        let mut used = 0;
        while let Some(e) = it.peek() {
            if used + e.len() + CE_LEN > room {
                break;
            }
            used += e.len();
            inline.push(it.next().unwrap_or_default());
        }
        let rest: Vec<Vec<u8>> = it.collect();
        let mut areas: Vec<Vec<Vec<u8>>> = vec![Vec::new()];
        let mut used = 0;
        let n = rest.len();
        for (i, e) in rest.into_iter().enumerate() {
            let more = if i + 1 < n { CE_LEN } else { 0 };
            if used + e.len() + more > SECTOR as usize && !areas.last().is_none_or(Vec::is_empty) {
                areas.push(Vec::new());
                used = 0;
            }
            used += e.len();
            if let Some(a) = areas.last_mut() {
                a.push(e);
            }
        }
        Packed { inline, areas }
    }

    fn inline_len(&self) -> usize {
        self.inline.iter().map(Vec::len).sum::<usize>()
            + if self.areas.is_empty() { 0 } else { CE_LEN }
    }

    /// Size of each area, its trailing `CE` included.
    fn area_lens(&self) -> Vec<usize> {
        let n = self.areas.len();
        self.areas
            .iter()
            .enumerate()
            .map(|(i, a)| {
                a.iter().map(Vec::len).sum::<usize>() + if i + 1 < n { CE_LEN } else { 0 }
            })
            .collect()
    }
}

/// Places continuation areas in a directory's CE sectors, never across a sector.
#[derive(Default)]
struct CeCursor {
    sector: u32,
    offset: u32,
}

impl CeCursor {
    /// (sector index, offset) for an area of `len` bytes.
    fn place(&mut self, len: usize) -> (u32, u32) {
        if self.offset as usize + len > SECTOR as usize {
            self.sector += 1;
            self.offset = 0;
        }
        let at = (self.sector, self.offset);
        self.offset += len as u32;
        at
    }

    fn sectors(&self) -> u32 {
        if self.sector == 0 && self.offset == 0 {
            0
        } else {
            self.sector + 1
        }
    }
}

// ------------------------------------------------------------------------------------------
// The plan

#[derive(Debug, Clone, Copy, Default)]
struct DirLoc {
    lba: u32,
    /// Bytes of records (whole sectors).
    size: u32,
    /// Continuation sectors after the records.
    ce_sectors: u32,
}

/// One record of a directory: which node, and what it says.
#[derive(Clone, Copy)]
enum Rec {
    Dot,
    DotDot,
    /// A child; for multi-extent files, which extent.
    Child(usize, u32),
}

/// One of the two directory trees over the same nodes: the ISO 9660 names or the Joliet ones.
#[derive(Default)]
struct View {
    /// Identifier per node (Joliet: UCS-2 BE bytes).
    id: Vec<Vec<u8>>,
    /// Children per directory, in record order.
    kids: Vec<Vec<usize>>,
    /// Directories breadth-first (path table order).
    dirs: Vec<usize>,
    /// Directory numbers (1-based) in the path table.
    num: Vec<u16>,
    /// Where each directory is.
    loc: Vec<DirLoc>,
    /// Path table: size in bytes, L and M sectors.
    pt: (u32, u32, u32),
}

impl View {
    fn new(n: usize) -> View {
        View {
            id: vec![Vec::new(); n],
            kids: vec![Vec::new(); n],
            loc: vec![DirLoc::default(); n],
            num: vec![0; n],
            ..View::default()
        }
    }

    /// Breadth-first directory order and path-table numbers from `kids`.
    fn number(&mut self, tree: &Tree) {
        self.dirs = breadth_first(&self.kids, tree);
        for (i, &d) in self.dirs.iter().enumerate() {
            self.num[d] = (i + 1) as u16;
        }
    }
}

struct Plan<'t> {
    tree: &'t Tree,
    opts: &'t IsoOptions,
    /// Metadata after clamping and rationalising, per node.
    meta: Vec<Meta>,
    nlink: Vec<u32>,
    /// The ISO 9660 tree and the Joliet tree (empty without Joliet).
    views: [View; 2],
    /// First sector of each file's data (shared by hard links).
    file_lba: Vec<u32>,
    /// Files whose data is written, in order (one per hard-link group).
    data_order: Vec<usize>,
    total: u64,
    volume_date: i64,
}

fn file_size(k: &Kind) -> u64 {
    match k {
        Kind::File { size, .. } => *size,
        _ => 0,
    }
}

fn extents(size: u64) -> u32 {
    if size <= u64::from(u32::MAX) {
        1
    } else {
        size.div_ceil(MAX_EXTENT) as u32
    }
}

fn breadth_first(kids: &[Vec<usize>], tree: &Tree) -> Vec<usize> {
    let mut order = vec![0];
    let mut i = 0;
    while i < order.len() {
        let d = order[i];
        order.extend(
            kids[d]
                .iter()
                .copied()
                .filter(|&c| matches!(tree.nodes[c].kind, Kind::Dir(_))),
        );
        i += 1;
    }
    order
}

impl<'t> Plan<'t> {
    fn new(tree: &'t Tree, opts: &'t IsoOptions) -> Result<Plan<'t>> {
        opts.check()?;
        let n = tree.nodes.len();
        let now = crate::civil::now_secs();
        let volume_date = opts.date.unwrap_or(now);
        let mut meta: Vec<Meta> = tree.nodes.iter().map(|n| n.meta).collect();
        for m in &mut meta {
            if let Some(d) = opts.date {
                m.mtime = m.mtime.min(d);
                m.atime = m.mtime;
                m.ctime = m.ctime.min(d);
            }
            if opts.rational {
                m.uid = 0;
                m.gid = 0;
                let ty = m.mode & libc::S_IFMT;
                let mut p = (m.mode & 0o777 | 0o444) & !0o222;
                if ty == libc::S_IFDIR || p & 0o111 != 0 {
                    p |= 0o111;
                }
                if ty == libc::S_IFLNK {
                    p = 0o777;
                }
                m.mode = ty | p;
            }
        }
        // Names and record order.
        let mut iso = View::new(n);
        let mut jol = View::new(if opts.joliet { n } else { 0 });
        let mut nlink = vec![1u32; n];
        for (d, node) in tree.nodes.iter().enumerate() {
            let Kind::Dir(children) = &node.kind else {
                continue;
            };
            let kids: Vec<usize> = children.values().copied().collect();
            let entries: Vec<(&[u8], bool)> = kids
                .iter()
                .map(|&c| {
                    (
                        &tree.nodes[c].name[..],
                        matches!(tree.nodes[c].kind, Kind::Dir(_)),
                    )
                })
                .collect();
            nlink[d] = 2 + entries.iter().filter(|e| e.1).count() as u32;
            for (&c, id) in kids.iter().zip(iso_names(&entries, opts.level)) {
                iso.id[c] = id;
            }
            let mut ik = kids.clone();
            ik.sort_by(|&a, &b| sort_key(&iso.id[a]).cmp(&sort_key(&iso.id[b])));
            iso.kids[d] = ik;
            if opts.joliet {
                for (&c, id) in kids.iter().zip(joliet_names(&entries)) {
                    jol.id[c] = id.iter().flat_map(|u| u.to_be_bytes()).collect();
                }
                let mut jk = kids;
                jk.sort_by(|&a, &b| jol.id[a].cmp(&jol.id[b]));
                jol.kids[d] = jk;
            }
        }
        // Hard links: one data extent per (device, inode).
        let mut first_of: HashMap<(u64, u64), usize> = HashMap::new();
        let mut link_of = vec![usize::MAX; n];
        iso.number(tree);
        if opts.joliet {
            jol.number(tree);
        }
        let mut data_order = Vec::new();
        for &d in &iso.dirs {
            for &c in &iso.kids[d] {
                if let Kind::File { source, .. } = &tree.nodes[c].kind {
                    match source {
                        Source::Host { id, .. } => match first_of.get(id) {
                            Some(&f) => {
                                link_of[c] = f;
                                nlink[f] += 1;
                            }
                            None => {
                                first_of.insert(*id, c);
                                link_of[c] = c;
                                data_order.push(c);
                            }
                        },
                        Source::Bytes(_) => {
                            link_of[c] = c;
                            data_order.push(c);
                        }
                    }
                }
            }
        }
        for c in 0..n {
            if link_of[c] != usize::MAX && link_of[c] != c {
                nlink[c] = nlink[link_of[c]];
            }
        }
        let mut plan = Plan {
            tree,
            opts,
            meta,
            nlink,
            views: [iso, jol],
            file_lba: vec![0; n],
            data_order,
            total: 0,
            volume_date,
        };
        plan.lay_out(&link_of)?;
        Ok(plan)
    }

    /// The ISO 9660 tree, or the Joliet one.
    fn view(&self, joliet: bool) -> &View {
        &self.views[usize::from(joliet)]
    }

    /// The trees written: ISO 9660, and Joliet when asked for.
    fn trees(&self) -> &'static [bool] {
        if self.opts.joliet {
            &[false, true]
        } else {
            &[false]
        }
    }

    fn path_table_size(&self, joliet: bool) -> u64 {
        let v = self.view(joliet);
        v.dirs
            .iter()
            .map(|&d| {
                let len = if d == 0 { 1 } else { v.id[d].len() };
                (8 + len + len % 2) as u64
            })
            .sum()
    }

    fn lay_out(&mut self, link_of: &[usize]) -> Result<()> {
        let mut next: u64 = u64::from(FIRST_DESCRIPTOR) + 2 + u64::from(self.opts.joliet);
        let table = |size: u64, next: &mut u64| -> (u32, u32, u32) {
            let l = *next as u32;
            *next += sectors(size);
            let m = *next as u32;
            *next += sectors(size);
            (size as u32, l, m)
        };
        for &joliet in self.trees() {
            let pt = table(self.path_table_size(joliet), &mut next);
            self.views[usize::from(joliet)].pt = pt;
        }
        for &joliet in self.trees() {
            for d in self.view(joliet).dirs.clone() {
                let (size, ce) = self.measure_dir(d, joliet);
                let loc = DirLoc {
                    lba: u32::try_from(next).map_err(|_| self.too_big())?,
                    size: size as u32,
                    ce_sectors: ce,
                };
                next += sectors(size) + u64::from(ce);
                self.views[usize::from(joliet)].loc[d] = loc;
            }
        }
        for &f in &self.data_order {
            self.file_lba[f] = u32::try_from(next).map_err(|_| self.too_big())?;
            next += sectors(file_size(&self.tree.nodes[f].kind));
            if next > MAX_SECTORS {
                return Err(self.too_big());
            }
        }
        for (c, &first) in link_of.iter().enumerate() {
            if first != usize::MAX && file_size(&self.tree.nodes[c].kind) > 0 {
                self.file_lba[c] = self.file_lba[first];
            }
        }
        if next > MAX_SECTORS {
            return Err(self.too_big());
        }
        self.total = next;
        Ok(())
    }

    fn too_big(&self) -> Error {
        Error::new(
            ErrorKind::TooLarge,
            "the image would exceed ISO 9660's 2^32 sectors (8 TiB)",
        )
    }

    fn records(&self, d: usize, joliet: bool) -> Vec<Rec> {
        let kids = &self.view(joliet).kids[d];
        let mut v = vec![Rec::Dot, Rec::DotDot];
        for &c in kids {
            for e in 0..extents(file_size(&self.tree.nodes[c].kind)) {
                v.push(Rec::Child(c, e));
            }
        }
        v
    }

    /// The node whose metadata a record of directory `d` carries.
    fn subject(&self, d: usize, r: Rec) -> usize {
        match r {
            Rec::Dot => d,
            Rec::DotDot => self.tree.nodes[d].parent,
            Rec::Child(c, _) => c,
        }
    }

    fn ident(&self, r: Rec, joliet: bool) -> &[u8] {
        match r {
            Rec::Dot => &[0],
            Rec::DotDot => &[1],
            Rec::Child(c, _) => &self.view(joliet).id[c],
        }
    }

    fn su_entries(&self, d: usize, r: Rec) -> Vec<Vec<u8>> {
        let s = self.subject(d, r);
        let mut v = Vec::new();
        if matches!(r, Rec::Dot) && d == 0 {
            v.push(su(b"SP", &[0xbe, 0xef, 0]));
        }
        v.push(px(&self.meta[s], self.nlink[s]));
        v.push(tf(&self.meta[s]));
        if let Rec::Child(c, _) = r {
            v.extend(nm(&self.tree.nodes[c].name));
            if let Kind::Symlink(t) = &self.tree.nodes[c].kind {
                v.extend(sl(t));
            }
        }
        if matches!(r, Rec::Dot) && d == 0 {
            v.push(er());
        }
        v
    }

    /// Record length without system use, and the room left for it.
    fn base_len(id: &[u8]) -> (usize, usize) {
        let base = 33 + id.len() + (1 - id.len() % 2);
        (base, 254 - base)
    }

    /// (record bytes in whole sectors, continuation sectors) of directory `d`.
    fn measure_dir(&self, d: usize, joliet: bool) -> (u64, u32) {
        let rr = self.opts.rock_ridge && !joliet;
        let mut pos: u64 = 0;
        let mut cur = CeCursor::default();
        for r in self.records(d, joliet) {
            let (base, room) = Self::base_len(self.ident(r, joliet));
            let mut len = base;
            if rr {
                let p = Packed::new(self.su_entries(d, r), room);
                len += p.inline_len();
                for a in p.area_lens() {
                    cur.place(a);
                }
            }
            len += len % 2;
            if pos % SECTOR + len as u64 > SECTOR {
                pos = pos.next_multiple_of(SECTOR);
            }
            pos += len as u64;
        }
        (pos.next_multiple_of(SECTOR), cur.sectors())
    }

    /// Extent (lba, length) and flags of a record.
    fn extent(&self, d: usize, r: Rec, joliet: bool) -> (u32, u32, u8) {
        let loc = |n: usize| self.view(joliet).loc[n];
        match r {
            Rec::Dot => (loc(d).lba, loc(d).size, 2),
            Rec::DotDot => {
                let p = self.tree.nodes[d].parent;
                (loc(p).lba, loc(p).size, 2)
            }
            Rec::Child(c, e) => match &self.tree.nodes[c].kind {
                Kind::Dir(_) => (loc(c).lba, loc(c).size, 2),
                Kind::File { size, .. } => {
                    let n = extents(*size);
                    if n == 1 {
                        let lba = if *size == 0 { 0 } else { self.file_lba[c] };
                        (lba, *size as u32, 0)
                    } else {
                        let start = u64::from(e) * MAX_EXTENT;
                        let len = (size - start).min(MAX_EXTENT);
                        let lba = self.file_lba[c] + (start / SECTOR) as u32;
                        (lba, len as u32, if e + 1 < n { 0x80 } else { 0 })
                    }
                }
                Kind::Symlink(_) => (0, 0, 0),
            },
        }
    }

    /// The records and continuation sectors of directory `d`.
    fn dir_bytes(&self, d: usize, joliet: bool) -> Vec<u8> {
        let loc = self.view(joliet).loc[d];
        let rr = self.opts.rock_ridge && !joliet;
        let mut out: Vec<u8> = Vec::with_capacity(loc.size as usize);
        let mut ce_bytes = vec![0u8; loc.ce_sectors as usize * SECTOR as usize];
        let ce_lba = loc.lba + loc.size / SECTOR as u32;
        let mut cur = CeCursor::default();
        for r in self.records(d, joliet) {
            let id = self.ident(r, joliet);
            let (base, room) = Self::base_len(id);
            let mut sys = Vec::new();
            if rr {
                let p = Packed::new(self.su_entries(d, r), room);
                let places: Vec<(u32, u32, usize)> = p
                    .area_lens()
                    .into_iter()
                    .map(|len| {
                        let (s, o) = cur.place(len);
                        (s, o, len)
                    })
                    .collect();
                for e in &p.inline {
                    sys.extend_from_slice(e);
                }
                if let Some(&(s, o, len)) = places.first() {
                    sys.extend(ce(ce_lba + s, o, len as u32));
                }
                for (i, area) in p.areas.iter().enumerate() {
                    let (s, o, _) = places[i];
                    let mut at = (s as usize) * SECTOR as usize + o as usize;
                    for e in area {
                        ce_bytes[at..at + e.len()].copy_from_slice(e);
                        at += e.len();
                    }
                    if let Some(&(ns, no, nlen)) = places.get(i + 1) {
                        let c = ce(ce_lba + ns, no, nlen as u32);
                        ce_bytes[at..at + c.len()].copy_from_slice(&c);
                    }
                }
            }
            let mut len = base + sys.len();
            len += len % 2;
            if out.len() as u64 % SECTOR + len as u64 > SECTOR {
                out.resize((out.len() as u64).next_multiple_of(SECTOR) as usize, 0);
            }
            let s = self.subject(d, r);
            let (lba, size, flags) = self.extent(d, r, joliet);
            let start = out.len();
            out.push(len as u8);
            out.push(0);
            out.extend_from_slice(&both32(lba));
            out.extend_from_slice(&both32(size));
            out.extend_from_slice(&short_date(self.meta[s].mtime));
            out.push(flags);
            out.push(0);
            out.push(0);
            out.extend_from_slice(&both16(1));
            out.push(id.len() as u8);
            out.extend_from_slice(id);
            if id.len() % 2 == 0 {
                out.push(0);
            }
            out.extend_from_slice(&sys);
            out.resize(start + len, 0);
        }
        out.resize(loc.size as usize, 0);
        out.extend_from_slice(&ce_bytes);
        out
    }

    fn root_record(&self, joliet: bool) -> Vec<u8> {
        let loc = self.view(joliet).loc[0];
        let mut r = vec![34, 0];
        r.extend_from_slice(&both32(loc.lba));
        r.extend_from_slice(&both32(loc.size));
        r.extend_from_slice(&short_date(self.meta[0].mtime));
        r.extend_from_slice(&[2, 0, 0]);
        r.extend_from_slice(&both16(1));
        r.extend_from_slice(&[1, 0]);
        r
    }

    fn descriptor(&self, joliet: bool) -> Vec<u8> {
        let mut s = vec![0u8; SECTOR as usize];
        s[0] = if joliet { 2 } else { 1 };
        s[1..6].copy_from_slice(b"CD001");
        s[6] = 1;
        let text = |v: &str, n: usize| {
            if joliet {
                ucs2(v, n)
            } else {
                padded(v.as_bytes(), n)
            }
        };
        s[8..40].copy_from_slice(&text("LINUX", 32));
        s[40..72].copy_from_slice(&text(&self.opts.volume_id, 32));
        s[80..88].copy_from_slice(&both32(self.total as u32));
        if joliet {
            s[88..91].copy_from_slice(b"%/E");
        }
        s[120..124].copy_from_slice(&both16(1));
        s[124..128].copy_from_slice(&both16(1));
        s[128..132].copy_from_slice(&both16(SECTOR as u16));
        let (size, l, m) = self.view(joliet).pt;
        s[132..140].copy_from_slice(&both32(size));
        s[140..144].copy_from_slice(&l.to_le_bytes());
        s[148..152].copy_from_slice(&m.to_be_bytes());
        s[156..190].copy_from_slice(&self.root_record(joliet));
        s[190..318].copy_from_slice(&text("", 128));
        s[318..446].copy_from_slice(&text("", 128));
        s[446..574].copy_from_slice(&text("", 128));
        s[574..702].copy_from_slice(&text(&self.opts.application, 128));
        s[702..739].copy_from_slice(&text("", 37));
        s[739..776].copy_from_slice(&text("", 37));
        s[776..813].copy_from_slice(&text("", 37));
        let date = long_date(self.volume_date);
        s[813..830].copy_from_slice(&date);
        s[830..847].copy_from_slice(&date);
        s[847..864].copy_from_slice(&NO_DATE);
        s[864..881].copy_from_slice(&date);
        s[881] = 1;
        s
    }

    fn path_table(&self, joliet: bool, big: bool) -> Vec<u8> {
        let View {
            dirs, id, num, loc, ..
        } = self.view(joliet);
        let mut t = Vec::new();
        for &d in dirs {
            let name: &[u8] = if d == 0 { &[0] } else { &id[d] };
            let parent = num[self.tree.nodes[d].parent];
            t.push(name.len() as u8);
            t.push(0);
            if big {
                t.extend_from_slice(&loc[d].lba.to_be_bytes());
                t.extend_from_slice(&parent.to_be_bytes());
            } else {
                t.extend_from_slice(&loc[d].lba.to_le_bytes());
                t.extend_from_slice(&parent.to_le_bytes());
            }
            t.extend_from_slice(name);
            if name.len() % 2 == 1 {
                t.push(0);
            }
        }
        t.resize(t.len().next_multiple_of(SECTOR as usize), 0);
        t
    }
}

// ------------------------------------------------------------------------------------------
// Output

enum Dest<'a> {
    File(&'a FileIo),
    Stream(&'a mut dyn Write),
}

/// The image being written, front to back.
struct Out<'a> {
    dest: Dest<'a>,
    /// Bytes accepted so far.
    pos: u64,
    buf: Vec<u8>,
}

fn werr(e: std::io::Error) -> Error {
    Error::io("cannot write the ISO image", e)
}

impl Out<'_> {
    fn flush_buf(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let at = self.pos - self.buf.len() as u64;
        match &mut self.dest {
            Dest::File(io) => io.write_all_at(&self.buf, at).map_err(werr)?,
            Dest::Stream(w) => w.write_all(&self.buf).map_err(werr)?,
        }
        self.buf.clear();
        Ok(())
    }

    fn write(&mut self, b: &[u8]) -> Result<()> {
        if self.buf.len() + b.len() > CHUNK {
            self.flush_buf()?;
        }
        if b.len() >= CHUNK {
            match &mut self.dest {
                Dest::File(io) => io.write_all_at(b, self.pos).map_err(werr)?,
                Dest::Stream(w) => w.write_all(b).map_err(werr)?,
            }
        } else {
            self.buf.extend_from_slice(b);
        }
        self.pos += b.len() as u64;
        Ok(())
    }

    /// `n` zero bytes: a hole in a file, written out to a stream.
    fn zeros(&mut self, mut n: u64) -> Result<()> {
        if let Dest::File(_) = self.dest {
            self.flush_buf()?;
            self.pos += n;
            return Ok(());
        }
        while n > 0 {
            let k = n.min((CHUNK - self.buf.len()) as u64) as usize;
            self.buf.resize(self.buf.len() + k, 0);
            self.pos += k as u64;
            n -= k as u64;
            if self.buf.len() >= CHUNK {
                self.flush_buf()?;
            }
        }
        Ok(())
    }

    /// File data: zero blocks become holes in a file.
    fn data(&mut self, b: &[u8]) -> Result<()> {
        if let Dest::Stream(_) = self.dest {
            return self.write(b);
        }
        for (r, zero) in crate::io::zero_runs(b, ZERO_BLOCK) {
            if zero {
                self.zeros(r.len() as u64)?;
            } else {
                self.write(&b[r])?;
            }
        }
        Ok(())
    }

    /// Zero padding up to the next sector.
    fn pad(&mut self) -> Result<()> {
        let n = self.pos.next_multiple_of(SECTOR) - self.pos;
        self.zeros(n)
    }

    fn at(&self, lba: u64) -> Result<()> {
        if self.pos != lba * SECTOR {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "internal error: ISO layout expected sector {lba}, writing at byte {}",
                    self.pos
                ),
            ));
        }
        Ok(())
    }

    fn finish(mut self) -> Result<u64> {
        self.flush_buf()?;
        match &mut self.dest {
            Dest::File(io) => io.set_size(self.pos).map_err(werr)?,
            Dest::Stream(w) => w.flush().map_err(werr)?,
        }
        Ok(self.pos)
    }
}

fn changed(path: &Path, size: u64) -> Error {
    Error::new(
        ErrorKind::Io,
        format!("file changed while being read (it had {size} bytes when listed)"),
    )
    .with_path(path)
}

/// Copy host file `path` (listed as `id`, `size` bytes) into the image.
fn copy_host(
    out: &mut Out<'_>,
    path: &Path,
    id: (u64, u64),
    size: u64,
    buf: &mut [u8],
) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::io("cannot open", e).with_path(path))?;
    let m = f
        .metadata()
        .map_err(|e| Error::io("cannot read", e).with_path(path))?;
    if !m.is_file() || (m.dev(), m.ino()) != id {
        return Err(
            Error::new(ErrorKind::Io, "file was replaced after it was listed").with_path(path),
        );
    }
    if m.len() != size {
        return Err(changed(path, size));
    }
    let src = FileIo::from_file(f).map_err(|e| Error::io("cannot open", e).with_path(path))?;
    let rerr = |e: std::io::Error| Error::io("cannot read", e).with_path(path);
    let mut pos = 0u64;
    while pos < size {
        let r = match src.next_data(pos).map_err(rerr)? {
            Some(r) => r.start.max(pos)..r.end.min(size),
            None => size..size,
        };
        out.zeros(r.start - pos)?;
        pos = r.start;
        if let Dest::File(dst) = out.dest {
            out.flush_buf()?;
            match src.copy_to(dst, r.start, out.pos, r.end - r.start) {
                Ok(true) => {
                    out.pos += r.end - r.start;
                    pos = r.end;
                    continue;
                }
                Ok(false) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(changed(path, size));
                }
                Err(e) => return Err(Error::io("cannot copy", e).with_path(path)),
            }
        }
        while pos < r.end {
            let n = ((r.end - pos) as usize).min(buf.len());
            let got = src.read_at(&mut buf[..n], pos).map_err(rerr)?;
            if got == 0 {
                return Err(changed(path, size));
            }
            out.data(&buf[..got])?;
            pos += got as u64;
        }
    }
    let mut probe = [0u8; 1];
    let now = src.size().map_err(rerr)?;
    if now != size || src.read_at(&mut probe, size).map_err(rerr)? != 0 {
        return Err(changed(path, size));
    }
    Ok(())
}

fn write_plan(plan: &Plan<'_>, mut out: Out<'_>) -> Result<IsoReport> {
    out.zeros(u64::from(FIRST_DESCRIPTOR) * SECTOR)?;
    out.write(&plan.descriptor(false))?;
    if plan.opts.joliet {
        out.write(&plan.descriptor(true))?;
    }
    let mut term = vec![0u8; SECTOR as usize];
    term[0] = 255;
    term[1..6].copy_from_slice(b"CD001");
    term[6] = 1;
    out.write(&term)?;
    for &joliet in plan.trees() {
        let (_, l, m) = plan.view(joliet).pt;
        out.at(u64::from(l))?;
        out.write(&plan.path_table(joliet, false))?;
        out.at(u64::from(m))?;
        out.write(&plan.path_table(joliet, true))?;
    }
    for &joliet in plan.trees() {
        let v = plan.view(joliet);
        for &d in &v.dirs {
            out.at(u64::from(v.loc[d].lba))?;
            out.write(&plan.dir_bytes(d, joliet))?;
        }
    }
    let mut buf = vec![0u8; CHUNK];
    let mut report = IsoReport {
        dirs: plan.view(false).dirs.len() as u64,
        ..IsoReport::default()
    };
    for &f in &plan.data_order {
        let Kind::File { source, size } = &plan.tree.nodes[f].kind else {
            continue;
        };
        out.at(u64::from(plan.file_lba[f]))?;
        match source {
            Source::Bytes(b) => out.data(b)?,
            Source::Host { path, id } => copy_host(&mut out, path, *id, *size, &mut buf)?,
        }
        out.pad()?;
        report.files += 1;
        report.data_bytes += size;
    }
    report.symlinks = plan
        .tree
        .nodes
        .iter()
        .filter(|n| matches!(n.kind, Kind::Symlink(_)))
        .count() as u64;
    out.at(plan.total)?;
    report.bytes = out.finish()?;
    Ok(report)
}

/// Write `tree` as an ISO image to `w` (a pipe or any stream), front to back.
pub fn write_iso_to(tree: &Tree, opts: &IsoOptions, w: &mut dyn Write) -> Result<IsoReport> {
    let plan = Plan::new(tree, opts)?;
    write_plan(
        &plan,
        Out {
            dest: Dest::Stream(w),
            pos: 0,
            buf: Vec::with_capacity(CHUNK),
        },
    )
}

/// Write `tree` as an ISO image file at `dst`: under a temporary name beside it, renamed into
/// place only when complete. Holes in the sources stay holes.
pub fn write_iso(tree: &Tree, opts: &IsoOptions, dst: &Path) -> Result<IsoReport> {
    let plan = Plan::new(tree, opts).map_err(|e| e.with_path(dst))?;
    let tmp = TempTarget::create(dst)?;
    let r = write_plan(
        &plan,
        Out {
            dest: Dest::File(&tmp.io),
            pos: 0,
            buf: Vec::with_capacity(CHUNK),
        },
    )?;
    tmp.commit()?;
    Ok(r)
}

/// The size in bytes `tree` would take as an ISO image.
pub fn iso_size(tree: &Tree, opts: &IsoOptions) -> Result<u64> {
    Ok(Plan::new(tree, opts)?.total * SECTOR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iso::parse_descriptor;

    fn opts() -> IsoOptions {
        IsoOptions {
            volume_id: "cidata".into(),
            date: Some(1_700_000_000),
            ..IsoOptions::default()
        }
    }

    #[test]
    fn small_tree_layout_and_determinism() {
        let mut t = Tree::new(Meta::made(libc::S_IFDIR | 0o755, 1_700_000_000));
        t.add_bytes(
            "user-data",
            b"#cloud-config\n".to_vec(),
            0o644,
            1_800_000_000,
        )
        .unwrap();
        t.add_bytes("meta-data", b"instance-id: x\n".to_vec(), 0o644, 1)
            .unwrap();
        let mut a = Vec::new();
        let r = write_iso_to(&t, &opts(), &mut a).unwrap();
        assert_eq!(r.bytes as usize, a.len());
        assert_eq!(a.len() as u64, iso_size(&t, &opts()).unwrap());
        let info = parse_descriptor(&a[16 * 2048..17 * 2048]).unwrap().unwrap();
        assert_eq!(info.volume_id, "cidata");
        assert_eq!(info.volume_bytes(), a.len() as u64);
        assert_eq!(a[17 * 2048], 2);
        assert_eq!(&a[17 * 2048 + 88..17 * 2048 + 91], b"%/E");
        assert_eq!(a[18 * 2048], 255);
        let mut b = Vec::new();
        write_iso_to(&t, &opts(), &mut b).unwrap();
        assert_eq!(a, b, "same tree and date, same bytes");
        assert!(a.windows(14).any(|w| w == b"#cloud-config\n"));
    }

    #[test]
    fn long_entries_continue() {
        let mut t = Tree::default();
        let long = "n".repeat(255);
        t.add_bytes(&long, b"x".to_vec(), 0o644, 0).unwrap();
        let mut a = Vec::new();
        write_iso_to(&t, &opts(), &mut a).unwrap();
        // The name is split over two NM entries, the second in a continuation area.
        assert!(a.windows(4).filter(|w| &w[..2] == b"NM").count() >= 2);
        assert!(a.windows(2).any(|w| w == b"CE"));
        let e = Packed::new(sl(&vec![b'a'; 4000]), 100);
        assert!(e.areas.len() >= 2, "a long link target needs chained areas");
        assert!(e.area_lens().iter().all(|&l| l <= 2048));
    }

    #[test]
    fn bad_options() {
        let t = Tree::default();
        for v in ["", "x".repeat(33).as_str(), "caf\u{e9}"] {
            let o = IsoOptions {
                volume_id: v.into(),
                ..opts()
            };
            assert!(write_iso_to(&t, &o, &mut Vec::new()).is_err());
        }
    }
}
