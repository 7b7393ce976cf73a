//! The one reader of untrusted tar streams: every archive the crate is handed (CDI's `archive`
//! content, a disk inside a tar, a filesystem clone's stream, container image layers and OCI
//! archives) goes through [`TarReader`].
//!
//! Owns: the 512-byte header walk (checksums, octal and base-256 numbers, ustar prefixes), GNU
//! long names and links (`L`, `K`), PAX extended and global headers (`x`, `g`), and GNU sparse
//! files in all their forms: old GNU `S` entries (four map slots in the header plus extension
//! blocks) and PAX sparse 0.0 (`GNU.sparse.offset`/`numbytes` pairs), 0.1 (`GNU.sparse.map`)
//! and 1.0 (the map in decimal lines at the start of the data). An entry reads as its logical
//! content: holes come out as zeros.
//!
//! Every piece of metadata is bounded before it is allocated ([`MAX_LONG_NAME`], [`MAX_PAX`],
//! [`MAX_SPARSE_SEGMENTS`], [`MAX_META_HEADERS`]); sparse maps must be sorted, disjoint, inside
//! the file's size and account for exactly the data stored. A stream that ends early is an
//! error, never a short file.

use crate::error::{Error, ErrorKind, Result};
use std::io::{self, Read, Seek, SeekFrom};

/// Largest GNU long name or long link, in bytes.
pub const MAX_LONG_NAME: u64 = 64 << 10;
/// Largest PAX extended (or global) header, in bytes.
pub const MAX_PAX: u64 = 1 << 20;
/// Most consecutive metadata headers (`L`, `K`, `x`) before an entry.
pub const MAX_META_HEADERS: usize = 32;
/// Most data segments in one sparse map (16 bytes each in memory: 16 MiB at most).
pub const MAX_SPARSE_SEGMENTS: usize = 1 << 20;
/// Largest entry size accepted (keeps offset arithmetic far from overflow).
pub const MAX_ENTRY_SIZE: u64 = 1 << 62;

const BLOCK: u64 = 512;

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file (`0`, NUL, `7`, and GNU sparse `S`).
    File,
    /// A directory (`5`, or a regular-file type whose name ends in `/`).
    Dir,
    /// A symbolic link (`2`).
    Symlink,
    /// A hard link (`1`) to an earlier entry.
    HardLink,
    /// A character device (`3`).
    Char,
    /// A block device (`4`).
    Block,
    /// A FIFO (`6`).
    Fifo,
    /// Any other type flag (GNU dumpdirs, volume labels, ...).
    Other(u8),
}

impl EntryKind {
    /// A human name for messages ("regular file", "symbolic link", ...).
    pub fn describe(self) -> String {
        match self {
            EntryKind::File => "regular file".into(),
            EntryKind::Dir => "directory".into(),
            EntryKind::Symlink => "symbolic link".into(),
            EntryKind::HardLink => "hard link".into(),
            EntryKind::Char => "character device".into(),
            EntryKind::Block => "block device".into(),
            EntryKind::Fifo => "FIFO".into(),
            EntryKind::Other(t) => format!("special file (type '{}')", t.escape_ascii()),
        }
    }
}

/// One archive member, its metadata resolved (long names, PAX records, sparse maps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The name: PAX `path` (or `GNU.sparse.name`), else the GNU long name, else ustar
    /// prefix + name. Not checked or normalised (see `crate::archive::unpack` for that);
    /// invalid UTF-8 is replaced (the exact bytes are [`Entry::raw_path`]).
    pub path: String,
    /// What it is.
    pub kind: EntryKind,
    /// Logical size in bytes: what reading the entry yields (a sparse file's full size).
    pub size: u64,
    /// Bytes of content stored in the archive (for a sparse file, its data segments).
    pub data_size: u64,
    /// Link target (PAX `linkpath`, GNU long link or the header's), for links.
    pub link: Option<String>,
    /// Permission bits (`mode & 0o7777`).
    pub mode: u32,
    /// Modification time, seconds since the epoch (PAX `mtime` without its fraction).
    pub mtime: u64,
    /// For a sparse file, its data segments as (logical offset, length), sorted and disjoint;
    /// everything else reads as zeros.
    pub sparse: Option<Vec<(u64, u64)>>,
    /// Where the stored content starts in the stream (after a PAX 1.0 sparse map).
    pub data_offset: u64,
    raw_path: Vec<u8>,
    raw_link: Option<Vec<u8>>,
}

impl Entry {
    /// True for a regular file, sparse or not.
    pub fn is_file(&self) -> bool {
        self.kind == EntryKind::File
    }

    /// The name's exact bytes.
    pub fn raw_path(&self) -> &[u8] {
        &self.raw_path
    }

    /// The link target's exact bytes.
    pub fn raw_link(&self) -> Option<&[u8]> {
        self.raw_link.as_deref()
    }
}

/// Reading position inside the current entry.
struct Current {
    name: String,
    /// Logical size.
    size: u64,
    /// Logical position.
    pos: u64,
    /// Stored bytes not yet consumed.
    data_left: u64,
    /// Padding after the stored bytes.
    pad: u64,
    /// Data segments of a sparse entry, and the index of the first one not yet passed.
    segments: Option<Vec<(u64, u64)>>,
    seg: usize,
}

/// A streaming, bounded reader of tar archives.
///
/// [`TarReader::next_entry`] yields each entry's metadata; reading the reader (it is
/// [`Read`]) yields the current entry's logical content, holes as zeros. A stream that seeks
/// can skip entries without reading them ([`TarReader::seekable`]).
pub struct TarReader<R: Read> {
    r: R,
    skip_fn: Option<fn(&mut R, u64) -> io::Result<()>>,
    /// Bytes of the stream consumed.
    pos: u64,
    cur: Option<Current>,
    done: bool,
    failed: bool,
}

fn corrupt(msg: impl Into<String>) -> Error {
    Error::corrupt(msg)
}

fn too_large(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::TooLarge, msg)
}

fn entry_err(name: &str, msg: impl std::fmt::Display) -> Error {
    corrupt(format!("tar entry '{}': {msg}", name.escape_debug()))
}

fn stream_err(e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        corrupt(format!("tar stream is cut off: {e}"))
    } else {
        Error::io("cannot read the tar stream", e)
    }
}

fn seek_forward<R: Seek>(r: &mut R, n: u64) -> io::Result<()> {
    let n = i64::try_from(n).map_err(|_| io::Error::other("seek too far"))?;
    r.seek(SeekFrom::Current(n)).map(|_| ())
}

/// A NUL-terminated header field's bytes.
fn field(f: &[u8]) -> &[u8] {
    let end = f.iter().position(|&b| b == 0).unwrap_or(f.len());
    &f[..end]
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// An octal or base-256 numeric header field.
pub(crate) fn parse_number(f: &[u8], what: &str) -> Result<u64> {
    if let Some(&first) = f.first().filter(|&&b| b & 0x80 != 0) {
        if first == 0xff {
            return Err(corrupt(format!("negative {what} in a tar header")));
        }
        let mut v: u64 = u64::from(first & 0x7f);
        for &b in &f[1..] {
            v = v
                .checked_mul(256)
                .and_then(|v| v.checked_add(u64::from(b)))
                .ok_or_else(|| corrupt(format!("{what} in a tar header overflows")))?;
        }
        return Ok(v);
    }
    let start = f
        .iter()
        .position(|&b| b != b' ' && b != 0)
        .unwrap_or(f.len());
    // The number ends at the first space or NUL after it.
    let end = f[start..]
        .iter()
        .position(|&b| b == b' ' || b == 0)
        .map_or(f.len(), |e| start + e);
    if f[end..].iter().any(|&b| b != b' ' && b != 0) {
        return Err(corrupt(format!("bad {what} field in a tar header")));
    }
    let mut v: u64 = 0;
    for &b in &f[start..end] {
        if !(b'0'..=b'7').contains(&b) {
            return Err(corrupt(format!("bad {what} field in a tar header")));
        }
        v = v
            .checked_mul(8)
            .and_then(|v| v.checked_add(u64::from(b - b'0')))
            .ok_or_else(|| corrupt(format!("{what} in a tar header overflows")))?;
    }
    Ok(v)
}

/// A decimal number (PAX values, sparse maps).
fn decimal(b: &[u8], what: &str) -> Result<u64> {
    if b.is_empty() || b.len() > 20 || !b.iter().all(u8::is_ascii_digit) {
        return Err(corrupt(format!(
            "bad {what} '{}' in a tar header",
            b.escape_ascii()
        )));
    }
    b.iter()
        .try_fold(0u64, |v, &d| {
            v.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
        .ok_or_else(|| corrupt(format!("{what} in a tar header overflows")))
}

fn push_segment(map: &mut Vec<(u64, u64)>, seg: (u64, u64)) -> Result<()> {
    if map.len() >= MAX_SPARSE_SEGMENTS {
        return Err(too_large(format!(
            "tar sparse map has more than {MAX_SPARSE_SEGMENTS} segments"
        )));
    }
    map.push(seg);
    Ok(())
}

/// What the PAX records of an entry say.
#[derive(Default)]
struct Pax {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    size: Option<u64>,
    mtime: Option<u64>,
    sparse_major: Option<u64>,
    sparse_minor: Option<u64>,
    sparse_name: Option<Vec<u8>>,
    /// `GNU.sparse.realsize` (1.0) or `GNU.sparse.size` (0.x).
    sparse_size: Option<u64>,
    numblocks: Option<u64>,
    /// The 0.0 pairs or the 0.1 map.
    map: Option<Vec<(u64, u64)>>,
    pending_offset: Option<u64>,
    any_sparse: bool,
}

fn parse_pax(data: &[u8], into: &mut Pax) -> Result<()> {
    let mut rest = data;
    while !rest.is_empty() {
        // GNU tar pads some PAX headers with NULs.
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let sp = rest
            .iter()
            .take(21)
            .position(|&b| b == b' ')
            .ok_or_else(|| corrupt("malformed PAX record in a tar header"))?;
        let len = usize::try_from(decimal(&rest[..sp], "PAX record length")?)
            .map_err(|_| corrupt("malformed PAX record length"))?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(corrupt("malformed PAX record in a tar header"));
        }
        let rec = &rest[sp + 1..len - 1];
        rest = &rest[len..];
        let eq = rec
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| corrupt("PAX record without '=' in a tar header"))?;
        let (key, val) = (&rec[..eq], &rec[eq + 1..]);
        let nul_free = |what: &str| {
            if val.contains(&0) {
                Err(corrupt(format!("PAX {what} holds a NUL byte")))
            } else {
                Ok((!val.is_empty()).then(|| val.to_vec()))
            }
        };
        let num = |what: &str| -> Result<Option<u64>> {
            if val.is_empty() {
                Ok(None)
            } else {
                decimal(val, what).map(Some)
            }
        };
        match key {
            b"path" => into.path = nul_free("path")?,
            b"linkpath" => into.linkpath = nul_free("linkpath")?,
            b"size" => into.size = num("PAX size")?,
            b"mtime" => {
                // Seconds, maybe with a fraction; a negative time counts as 0.
                let whole = val.split(|&b| b == b'.').next().unwrap_or(b"");
                into.mtime = if whole.first() == Some(&b'-') {
                    Some(0)
                } else if whole.is_empty() {
                    None
                } else {
                    Some(decimal(whole, "PAX mtime")?)
                };
            }
            k if k.starts_with(b"GNU.sparse.") => {
                into.any_sparse = true;
                match &k[11..] {
                    b"major" => into.sparse_major = num("GNU.sparse.major")?,
                    b"minor" => into.sparse_minor = num("GNU.sparse.minor")?,
                    b"name" => into.sparse_name = nul_free("GNU.sparse.name")?,
                    b"realsize" | b"size" => into.sparse_size = num("GNU.sparse size")?,
                    b"numblocks" => into.numblocks = num("GNU.sparse.numblocks")?,
                    b"offset" => {
                        if into.pending_offset.is_some() {
                            return Err(corrupt("GNU.sparse.offset without its numbytes"));
                        }
                        into.pending_offset = Some(decimal(val, "GNU.sparse.offset")?);
                    }
                    b"numbytes" => {
                        let off = into
                            .pending_offset
                            .take()
                            .ok_or_else(|| corrupt("GNU.sparse.numbytes without an offset"))?;
                        let len = decimal(val, "GNU.sparse.numbytes")?;
                        push_segment(into.map.get_or_insert_with(Vec::new), (off, len))?;
                    }
                    b"map" => {
                        let mut map = Vec::new();
                        if !val.is_empty() {
                            let mut nums = val.split(|&b| b == b',');
                            while let Some(o) = nums.next() {
                                let l = nums.next().ok_or_else(|| {
                                    corrupt("GNU.sparse.map has an odd number of values")
                                })?;
                                let seg = (
                                    decimal(o, "GNU.sparse.map offset")?,
                                    decimal(l, "GNU.sparse.map length")?,
                                );
                                push_segment(&mut map, seg)?;
                            }
                        }
                        into.map = Some(map);
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Check a sparse map against the logical size and the bytes stored.
fn check_map(name: &str, map: &[(u64, u64)], size: u64, data_size: u64) -> Result<()> {
    let mut end = 0u64;
    let mut total = 0u64;
    for &(off, len) in map {
        let e = off
            .checked_add(len)
            .ok_or_else(|| entry_err(name, "sparse map segment overflows"))?;
        if off < end {
            return Err(entry_err(
                name,
                format!("sparse map is unsorted or overlapping at offset {off}"),
            ));
        }
        if e > size {
            return Err(entry_err(
                name,
                format!("sparse map segment {off}+{len} lies past the file size {size}"),
            ));
        }
        end = e;
        total += len; // no overflow: every segment lies inside `size`, disjoint
    }
    if total != data_size {
        return Err(entry_err(
            name,
            format!("sparse map holds {total} bytes of data but the archive stores {data_size}"),
        ));
    }
    Ok(())
}

fn checksum_ok(b: &[u8; 512]) -> Result<bool> {
    let want = parse_number(&b[148..156], "checksum")?;
    let mut unsigned: u64 = 0;
    let mut signed: i64 = 0;
    for (i, &x) in b.iter().enumerate() {
        let x = if (148..156).contains(&i) { b' ' } else { x };
        unsigned += u64::from(x);
        signed += i64::from(x as i8);
    }
    Ok(want == unsigned || i64::try_from(want).ok() == Some(signed))
}

/// Old GNU sparse map slots (24 bytes each: offset and length, octal); a slot starting with
/// NUL ends the list. Returns false when a slot was empty (no more slots anywhere).
fn old_gnu_slots(slots: &[u8], map: &mut Vec<(u64, u64)>) -> Result<bool> {
    for s in slots.chunks_exact(24) {
        if s[0] == 0 {
            return Ok(false);
        }
        let off = parse_number(&s[..12], "sparse offset")?;
        let len = parse_number(&s[12..], "sparse length")?;
        push_segment(map, (off, len))?;
    }
    Ok(true)
}

impl<R: Read> TarReader<R> {
    /// A reader of the tar stream `r`, which it reads through (skipped entries too).
    pub fn new(r: R) -> TarReader<R> {
        TarReader {
            r,
            skip_fn: None,
            pos: 0,
            cur: None,
            done: false,
            failed: false,
        }
    }

    /// A reader of the tar stream `r` that seeks over the entries it skips.
    pub fn seekable(r: R) -> TarReader<R>
    where
        R: Seek,
    {
        let mut t = TarReader::new(r);
        t.skip_fn = Some(seek_forward::<R>);
        t
    }

    /// Bytes of the stream consumed so far.
    pub fn stream_position(&self) -> u64 {
        self.pos
    }

    /// Logical bytes of the current entry not yet read (0 without one).
    pub fn remaining(&self) -> u64 {
        self.cur.as_ref().map_or(0, |c| c.size - c.pos)
    }

    /// An owned reader of the current entry's logical content (for the one entry wanted out
    /// of a stream, such as the disk in a tar).
    pub fn into_entry_reader(self) -> EntryReader<R> {
        EntryReader(self)
    }

    /// Read a 512-byte block; `Ok(false)` at a clean end of stream.
    fn block(&mut self, b: &mut [u8; 512]) -> Result<bool> {
        let mut got = 0;
        while got < 512 {
            match self.r.read(&mut b[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => return Err(corrupt("tar stream is cut off inside a header")),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(stream_err(e)),
            }
        }
        self.pos += BLOCK;
        Ok(true)
    }

    fn skip(&mut self, n: u64) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        if let Some(f) = self.skip_fn {
            f(&mut self.r, n).map_err(stream_err)?;
        } else {
            let got = io::copy(&mut (&mut self.r).take(n), &mut io::sink());
            let got = got.map_err(stream_err)?;
            if got != n {
                return Err(corrupt("tar stream is cut off inside an entry"));
            }
        }
        self.pos += n;
        Ok(())
    }

    /// A metadata entry's content (at most `cap` bytes) and its padding.
    fn meta(&mut self, size: u64, cap: u64, what: &str) -> Result<Vec<u8>> {
        if size > cap {
            return Err(too_large(format!(
                "tar {what} header of {size} bytes (at most {cap})"
            )));
        }
        let mut v = vec![0; size as usize];
        if let Err(e) = self.r.read_exact(&mut v) {
            return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
                corrupt(format!("tar stream is cut off inside a {what} header"))
            } else {
                stream_err(e)
            });
        }
        self.pos += size;
        self.skip(size.next_multiple_of(BLOCK) - size)?;
        Ok(v)
    }

    /// The next entry, skipping whatever is left of the current one; `None` at the end of
    /// the archive. After an error the reader stays failed.
    pub fn next_entry(&mut self) -> Result<Option<Entry>> {
        if self.failed {
            return Err(corrupt("tar stream already failed"));
        }
        let r = self.next_inner();
        if r.is_err() {
            self.failed = true;
            self.cur = None;
        }
        r
    }

    fn next_inner(&mut self) -> Result<Option<Entry>> {
        if self.done {
            return Ok(None);
        }
        if let Some(c) = self.cur.take() {
            self.skip(c.data_left + c.pad)?;
        }
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax = Pax::default();
        let mut meta = 0;
        let mut b = [0u8; 512];
        loop {
            if !self.block(&mut b)? {
                return Err(corrupt("tar stream ends without its end-of-archive marker"));
            }
            if b.iter().all(|&x| x == 0) {
                if meta > 0 {
                    return Err(corrupt("tar metadata header without an entry"));
                }
                // A second zero block (or nothing) ends the archive.
                if self.block(&mut b)? && b.iter().any(|&x| x != 0) {
                    return Err(corrupt("data after a zero block in a tar stream"));
                }
                self.done = true;
                return Ok(None);
            }
            if !checksum_ok(&b)? {
                return Err(corrupt(
                    "bad tar header checksum (not a tar stream, or corrupt)",
                ));
            }
            let typeflag = b[156];
            let size = parse_number(&b[124..136], "size")?;
            if size > MAX_ENTRY_SIZE {
                return Err(too_large(format!("tar entry size {size} is absurd")));
            }
            match typeflag {
                b'L' | b'K' | b'x' => {
                    meta += 1;
                    if meta > MAX_META_HEADERS {
                        return Err(too_large("too many tar metadata headers in a row"));
                    }
                    match typeflag {
                        b'L' => {
                            let v = self.meta(size, MAX_LONG_NAME, "GNU long name")?;
                            long_name = Some(field(&v).to_vec());
                        }
                        b'K' => {
                            let v = self.meta(size, MAX_LONG_NAME, "GNU long link")?;
                            long_link = Some(field(&v).to_vec());
                        }
                        _ => {
                            let v = self.meta(size, MAX_PAX, "PAX")?;
                            parse_pax(&v, &mut pax)?;
                        }
                    }
                    continue;
                }
                b'g' => {
                    // Global PAX headers: checked, but nothing in them matters here.
                    let v = self.meta(size, MAX_PAX, "PAX global")?;
                    parse_pax(&v, &mut Pax::default())?;
                    continue;
                }
                _ => {}
            }
            return self.entry(&b, size, long_name, long_link, pax).map(Some);
        }
    }

    /// Resolve the entry whose header is `b`, positioned just after it.
    fn entry(
        &mut self,
        b: &[u8; 512],
        mut size: u64,
        long_name: Option<Vec<u8>>,
        long_link: Option<Vec<u8>>,
        pax: Pax,
    ) -> Result<Entry> {
        let typeflag = b[156];
        let posix = &b[257..263] == b"ustar\0";
        let raw_path = if let Some(p) = pax.sparse_name.or(pax.path) {
            p
        } else if let Some(l) = long_name {
            l
        } else {
            let n = field(&b[0..100]);
            let prefix = if posix { field(&b[345..500]) } else { &[] };
            if prefix.is_empty() {
                n.to_vec()
            } else {
                let mut p = prefix.to_vec();
                p.push(b'/');
                p.extend_from_slice(n);
                p
            }
        };
        let name = text(&raw_path);
        let raw_link = pax
            .linkpath
            .or(long_link)
            .or_else(|| Some(field(&b[157..257]).to_vec()).filter(|l| !l.is_empty()));
        if let Some(s) = pax.size {
            if s > MAX_ENTRY_SIZE {
                return Err(entry_err(&name, format!("size {s} is absurd")));
            }
            size = s;
        }
        let mode = (parse_number(&b[100..108], "mode")? & 0o7777) as u32;
        let mtime = match pax.mtime {
            Some(t) => t,
            // A bad or negative header mtime is no reason to refuse the entry.
            None => parse_number(&b[136..148], "mtime").unwrap_or(0),
        };
        let kind = match typeflag {
            b'0' | 0 | b'7' if raw_path.ends_with(b"/") => EntryKind::Dir,
            b'0' | 0 | b'7' | b'S' => EntryKind::File,
            b'1' => EntryKind::HardLink,
            b'2' => EntryKind::Symlink,
            b'3' => EntryKind::Char,
            b'4' => EntryKind::Block,
            b'5' => EntryKind::Dir,
            b'6' => EntryKind::Fifo,
            t => EntryKind::Other(t),
        };
        // Header-only types carry no data whatever their size field says.
        if matches!(typeflag, b'1'..=b'6') {
            size = 0;
        }
        let mut data_size = size;
        let mut logical = size;
        let mut sparse = None;
        if typeflag == b'S' {
            // Old GNU sparse: four slots in the header, then extension blocks while the
            // "is extended" byte is set.
            let mut map = Vec::new();
            let mut more = old_gnu_slots(&b[386..482], &mut map)?;
            let mut extended = b[482] != 0;
            logical = parse_number(&b[483..495], "sparse real size")?;
            let mut ext = [0u8; 512];
            while extended {
                if !self.block(&mut ext)? {
                    return Err(entry_err(&name, "stream is cut off inside its sparse map"));
                }
                if more {
                    more = old_gnu_slots(&ext[..504], &mut map)?;
                }
                extended = ext[504] != 0;
            }
            sparse = Some(map);
        } else if pax.any_sparse && kind == EntryKind::File {
            let major = pax.sparse_major;
            let minor = pax.sparse_minor.unwrap_or(0);
            logical = pax.sparse_size.ok_or_else(|| {
                entry_err(
                    &name,
                    "PAX sparse file without GNU.sparse.realsize or .size",
                )
            })?;
            if logical > MAX_ENTRY_SIZE {
                return Err(entry_err(&name, format!("sparse size {logical} is absurd")));
            }
            match (major, minor) {
                (Some(1), 0) => {
                    let (map, used) = self.sparse_map_in_data(&name, size)?;
                    data_size = size - used;
                    sparse = Some(map);
                }
                (None | Some(0), _) => {
                    if pax.pending_offset.is_some() {
                        return Err(entry_err(&name, "GNU.sparse.offset without its numbytes"));
                    }
                    let map = pax
                        .map
                        .ok_or_else(|| entry_err(&name, "PAX sparse file without a sparse map"))?;
                    if pax.numblocks.is_some_and(|n| n != map.len() as u64) {
                        return Err(entry_err(
                            &name,
                            "GNU.sparse.numblocks does not match the sparse map",
                        ));
                    }
                    sparse = Some(map);
                }
                (Some(ma), mi) => {
                    return Err(Error::new(
                        ErrorKind::UnsupportedFeature,
                        format!(
                            "tar entry '{}': GNU sparse format {ma}.{mi} is not supported",
                            name.escape_debug()
                        ),
                    ));
                }
            }
        }
        if let Some(map) = &sparse {
            check_map(&name, map, logical, data_size)?;
        }
        let pad = size.next_multiple_of(BLOCK) - size;
        let data_offset = self.pos;
        self.cur = Some(Current {
            name: name.clone(),
            size: logical,
            pos: 0,
            data_left: data_size,
            pad,
            segments: sparse.clone(),
            seg: 0,
        });
        Ok(Entry {
            path: name,
            kind,
            size: logical,
            data_size,
            link: raw_link.as_deref().map(text),
            mode,
            mtime,
            sparse,
            data_offset,
            raw_path,
            raw_link,
        })
    }

    /// A PAX 1.0 sparse map at the start of an entry's `size` stored bytes: decimal lines
    /// (count, then offset and length per segment) padded to a block. Returns the map and
    /// the bytes it took.
    fn sparse_map_in_data(&mut self, name: &str, size: u64) -> Result<(Vec<(u64, u64)>, u64)> {
        let mut used = 0u64;
        let mut b = [0u8; 512];
        let mut at = 512usize;
        let mut next_number = |this: &mut Self, used: &mut u64| -> Result<u64> {
            let mut digits = [0u8; 20];
            let mut n = 0;
            loop {
                if at == 512 {
                    if *used + BLOCK > size {
                        return Err(entry_err(name, "sparse map runs past the entry's data"));
                    }
                    if !this.block(&mut b)? {
                        return Err(entry_err(name, "stream is cut off inside its sparse map"));
                    }
                    *used += BLOCK;
                    at = 0;
                }
                let c = b[at];
                at += 1;
                if c == b'\n' {
                    return decimal(&digits[..n], "sparse map number")
                        .map_err(|_| entry_err(name, "bad number in its sparse map"));
                }
                if n == digits.len() {
                    return Err(entry_err(name, "number too long in its sparse map"));
                }
                digits[n] = c;
                n += 1;
            }
        };
        let count = next_number(self, &mut used)?;
        if count > MAX_SPARSE_SEGMENTS as u64 {
            return Err(too_large(format!(
                "tar entry '{}': sparse map of {count} segments (at most {MAX_SPARSE_SEGMENTS})",
                name.escape_debug()
            )));
        }
        let mut map = Vec::with_capacity((count as usize).min(4096));
        for _ in 0..count {
            let off = next_number(self, &mut used)?;
            let len = next_number(self, &mut used)?;
            map.push((off, len));
        }
        Ok((map, used))
    }

    /// If the current entry is in a hole, move to the next data segment (or its end) without
    /// reading zeros; returns the logical position. Lets a writer keep holes as holes.
    pub fn skip_hole(&mut self) -> u64 {
        let Some(c) = self.cur.as_mut() else {
            return 0;
        };
        if let Some(segs) = &c.segments {
            while c.seg < segs.len() && segs[c.seg].0 + segs[c.seg].1 <= c.pos {
                c.seg += 1;
            }
            c.pos = match segs.get(c.seg) {
                Some(&(off, _)) => off.max(c.pos),
                None => c.size,
            };
        }
        c.pos
    }

    /// Read stored bytes of the current entry.
    fn read_stored(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(c) = self.cur.as_mut() else {
            return Ok(0);
        };
        let n = buf.len().min(c.data_left.min(1 << 30) as usize);
        if n == 0 {
            return Ok(0);
        }
        let got = loop {
            match self.r.read(&mut buf[..n]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => break r?,
            }
        };
        if got == 0 {
            self.failed = true;
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "tar stream is cut off inside entry '{}' ({} bytes missing)",
                    c.name.escape_debug(),
                    c.data_left
                ),
            ));
        }
        c.data_left -= got as u64;
        self.pos += got as u64;
        Ok(got)
    }
}

enum Step {
    Stored(usize),
    Zeros(usize),
}

fn cap(buf: usize, left: u64) -> usize {
    buf.min(left.min(1 << 30) as usize)
}

impl<R: Read> Read for TarReader<R> {
    /// The current entry's logical content; a single read never spans a hole and data.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.failed {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "tar stream already failed",
            ));
        }
        let step = {
            let Some(c) = self.cur.as_mut() else {
                return Ok(0);
            };
            if buf.is_empty() || c.pos >= c.size {
                return Ok(0);
            }
            match &c.segments {
                None => Step::Stored(cap(buf.len(), c.size - c.pos)),
                Some(segs) => {
                    while c.seg < segs.len() && segs[c.seg].0 + segs[c.seg].1 <= c.pos {
                        c.seg += 1;
                    }
                    match segs.get(c.seg).copied() {
                        Some((off, len)) if off <= c.pos => {
                            Step::Stored(cap(buf.len(), off + len - c.pos))
                        }
                        next => {
                            let hole_end = next.map_or(c.size, |(off, _)| off);
                            Step::Zeros(cap(buf.len(), hole_end - c.pos))
                        }
                    }
                }
            }
        };
        let n = match step {
            Step::Stored(n) => self.read_stored(&mut buf[..n])?,
            Step::Zeros(n) => {
                buf[..n].fill(0);
                n
            }
        };
        if let Some(c) = self.cur.as_mut() {
            c.pos += n as u64;
        }
        Ok(n)
    }
}

/// The content of one entry, owning the stream it comes from ([`TarReader::into_entry_reader`]).
pub struct EntryReader<R: Read>(TarReader<R>);

impl<R: Read> EntryReader<R> {
    /// Logical bytes not yet read.
    pub fn remaining(&self) -> u64 {
        self.0.remaining()
    }
}

impl<R: Read> Read for EntryReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(parse_number(b"0000644\0", "mode").unwrap(), 0o644);
        assert_eq!(parse_number(b"  17 \0\0", "size").unwrap(), 0o17);
        assert_eq!(parse_number(b"\0\0\0\0", "size").unwrap(), 0);
        assert!(parse_number(b"12 34\0", "size").is_err());
        assert!(parse_number(b"0000009\0", "size").is_err());
        assert!(parse_number(&[0xff; 8], "size").is_err());
        assert!(parse_number(&[0x80, 1, 0, 0, 0, 0, 0, 0, 0, 0], "size").is_err());
        assert_eq!(decimal(b"18446744073709551615", "x").unwrap(), u64::MAX);
        assert!(decimal(b"18446744073709551616", "x").is_err());
        assert!(decimal(b"", "x").is_err());
        assert!(decimal(b"-1", "x").is_err());
    }

    #[test]
    fn maps() {
        assert!(check_map("f", &[(0, 2), (2, 3), (9, 1), (10, 0)], 10, 6).is_ok());
        assert!(check_map("f", &[(0, 2), (1, 3)], 10, 5).is_err());
        assert!(check_map("f", &[(5, 2), (0, 1)], 10, 3).is_err());
        assert!(check_map("f", &[(9, 2)], 10, 2).is_err());
        assert!(check_map("f", &[(0, 2)], 10, 3).is_err());
        assert!(check_map("f", &[(u64::MAX, 2)], 10, 2).is_err());
        let mut p = Pax::default();
        parse_pax(
            b"30 GNU.sparse.map=0,1,5,2,9,0\n21 GNU.sparse.size=9\n",
            &mut p,
        )
        .unwrap();
        assert_eq!(p.map, Some(vec![(0, 1), (5, 2), (9, 0)]));
        assert_eq!(p.sparse_size, Some(9));
        let mut p = Pax::default();
        assert!(parse_pax(b"25 GNU.sparse.numbytes=1\n", &mut p).is_err());
    }

    #[test]
    fn holes_are_skipped_or_read_as_zeros() {
        let mut t = TarReader::new(&b""[..]);
        t.cur = Some(Current {
            name: "f".into(),
            size: 10,
            pos: 0,
            data_left: 0,
            pad: 0,
            segments: Some(vec![(10, 0)]),
            seg: 0,
        });
        let mut v = Vec::new();
        t.read_to_end(&mut v).unwrap();
        assert_eq!(v, [0; 10]);
        let mut t = TarReader::new(&b"abcd"[..]);
        t.cur = Some(Current {
            name: "f".into(),
            size: 8,
            pos: 0,
            data_left: 4,
            pad: 0,
            segments: Some(vec![(2, 2), (6, 2)]),
            seg: 0,
        });
        assert_eq!(t.skip_hole(), 2);
        let mut b = [9u8; 8];
        assert_eq!(t.read(&mut b).unwrap(), 2);
        assert_eq!(&b[..2], b"ab");
        assert_eq!(t.skip_hole(), 6);
        assert_eq!(t.read(&mut b).unwrap(), 2);
        assert_eq!(&b[..2], b"cd");
        assert_eq!(t.skip_hole(), 8);
        assert_eq!(t.read(&mut b).unwrap(), 0);
        assert_eq!(t.remaining(), 0);
    }
}
