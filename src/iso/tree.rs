//! The file tree an ISO image is written from: directories, regular files and symbolic links
//! with their POSIX metadata, gathered from a host directory (never following a link inside
//! it), single host files, or bytes held by the caller.
//!
//! Owns the rules a tree must meet before anything is written: names that are one path
//! component of 1 to 255 bytes without NUL or `/` (not `.` or `..`), no file types an ISO
//! cannot hold (devices, sockets, FIFOs), at most [`MAX_DEPTH`] directory levels (ECMA-119's
//! limit), at most 65 535 directories (the path table's parent numbers are 16-bit), and a
//! bound on the metadata held ([`MAX_NODES`], [`MAX_META_BYTES`]). Every refusal names the
//! host path or ISO path at fault.

use crate::error::{Error, ErrorKind, Result};
use std::collections::BTreeMap;
use std::fs::Metadata;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Deepest directory level (the root is level 1), ECMA-119 6.8.2.1.
pub const MAX_DEPTH: usize = 8;
/// Longest name component in bytes (Linux's NAME_MAX).
pub const MAX_NAME: usize = 255;
/// Longest symbolic link target in bytes (Linux's PATH_MAX less the NUL).
pub const MAX_LINK: usize = 4095;
/// Most entries (files, directories and links) in one tree.
pub const MAX_NODES: usize = 1 << 20;
/// Most directories: path-table records name their parent with 16 bits.
pub const MAX_DIRS: usize = 65_535;
/// Bound on names and link targets held, in bytes.
pub const MAX_META_BYTES: usize = 256 << 20;

/// POSIX metadata carried by Rock Ridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// `st_mode`, file type bits included.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time (Unix seconds).
    pub mtime: i64,
    /// Access time.
    pub atime: i64,
    /// Attribute change time.
    pub ctime: i64,
}

impl Meta {
    fn of(m: &Metadata) -> Meta {
        Meta {
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
            mtime: m.mtime(),
            atime: m.atime(),
            ctime: m.ctime(),
        }
    }

    /// Metadata for an entry made by the caller: `mode` (with type bits), root's, times `t`.
    pub fn made(mode: u32, t: i64) -> Meta {
        Meta {
            mode,
            uid: 0,
            gid: 0,
            mtime: t,
            atime: t,
            ctime: t,
        }
    }
}

/// Where a regular file's bytes come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A host file, opened again (without following links) when written; `(dev, ino)` and the
    /// size seen when the tree was gathered are checked then.
    Host {
        /// The host path.
        path: PathBuf,
        /// Device and inode, to find hard links and to notice a replaced file.
        id: (u64, u64),
    },
    /// Bytes the caller holds.
    Bytes(Arc<[u8]>),
}

/// What a node is.
#[derive(Debug, Clone)]
pub enum Kind {
    /// A directory: children by name (byte order).
    Dir(BTreeMap<Vec<u8>, usize>),
    /// A regular file of `size` bytes.
    File {
        /// Its bytes.
        source: Source,
        /// Its size when gathered.
        size: u64,
    },
    /// A symbolic link, never followed.
    Symlink(Vec<u8>),
}

/// One entry of the tree.
#[derive(Debug, Clone)]
pub struct Node {
    /// The real name (empty for the root).
    pub name: Vec<u8>,
    /// Parent index (the root is its own parent).
    pub parent: usize,
    /// Directory level: 1 for the root.
    pub depth: usize,
    /// Metadata.
    pub meta: Meta,
    /// Type and content.
    pub kind: Kind,
}

/// A tree to write; node 0 is the root directory.
#[derive(Debug, Clone)]
pub struct Tree {
    pub(crate) nodes: Vec<Node>,
    dirs: usize,
    meta_bytes: usize,
}

fn too_large(what: &str) -> Error {
    Error::new(
        ErrorKind::TooLarge,
        format!("the tree is too large for one ISO: {what}"),
    )
}

/// Whether `name` can be one path component in an ISO.
fn check_component(name: &[u8]) -> std::result::Result<(), &'static str> {
    if name.is_empty() {
        return Err("an empty name");
    }
    if name == b"." || name == b".." {
        return Err("a '.' or '..' component");
    }
    if name.contains(&0) {
        return Err("a NUL byte in a name");
    }
    if name.contains(&b'/') {
        return Err("a '/' in a name");
    }
    if name.len() > MAX_NAME {
        return Err("a name longer than 255 bytes");
    }
    Ok(())
}

/// Split an ISO path (`a/b/c`, leading and repeated `/` ignored) into checked components.
fn components(iso_path: &str) -> Result<Vec<&[u8]>> {
    let mut out = Vec::new();
    for c in iso_path.split('/').filter(|c| !c.is_empty()) {
        check_component(c.as_bytes()).map_err(|why| {
            Error::invalid(format!("ISO path '{}' has {why}", iso_path.escape_debug()))
        })?;
        out.push(c.as_bytes());
    }
    Ok(out)
}

fn describe_type(m: &Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "of an unknown type"
    }
}

impl Default for Tree {
    fn default() -> Self {
        Self::new(Meta::made(libc::S_IFDIR | 0o755, 0))
    }
}

impl Tree {
    /// An empty tree whose root directory has `root` metadata.
    pub fn new(root: Meta) -> Tree {
        Tree {
            nodes: vec![Node {
                name: Vec::new(),
                parent: 0,
                depth: 1,
                meta: root,
                kind: Kind::Dir(BTreeMap::new()),
            }],
            dirs: 1,
            meta_bytes: 0,
        }
    }

    /// The nodes; index 0 is the root.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Number of directories, the root included.
    pub fn dir_count(&self) -> usize {
        self.dirs
    }

    /// Set the root directory's metadata (the type bits stay a directory's).
    pub fn set_root_meta(&mut self, meta: Meta) {
        self.nodes[0].meta = Meta {
            mode: libc::S_IFDIR | (meta.mode & 0o7777),
            ..meta
        };
    }

    fn child(&self, dir: usize, name: &[u8]) -> Option<usize> {
        match &self.nodes[dir].kind {
            Kind::Dir(c) => c.get(name).copied(),
            _ => None,
        }
    }

    /// Insert a node under `dir`; `shown` names it in errors.
    fn insert(
        &mut self,
        dir: usize,
        name: &[u8],
        meta: Meta,
        kind: Kind,
        shown: &str,
    ) -> Result<usize> {
        if self.child(dir, name).is_some() {
            return Err(Error::invalid(format!(
                "'{shown}' is given twice (ISO paths must be unique)"
            )));
        }
        let depth = self.nodes[dir].depth;
        let is_dir = matches!(kind, Kind::Dir(_));
        if is_dir && depth + 1 > MAX_DEPTH {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!("directory too deep for ISO 9660 (more than {MAX_DEPTH} levels): {shown}"),
            ));
        }
        if self.nodes.len() >= MAX_NODES {
            return Err(too_large(&format!("more than {MAX_NODES} entries")));
        }
        if is_dir && self.dirs >= MAX_DIRS {
            return Err(too_large(&format!("more than {MAX_DIRS} directories")));
        }
        let extra = name.len()
            + match &kind {
                Kind::Symlink(t) => t.len(),
                Kind::File {
                    source: Source::Host { path, .. },
                    ..
                } => path.as_os_str().len(),
                _ => 0,
            };
        if self.meta_bytes + extra > MAX_META_BYTES {
            return Err(too_large("names and link targets over 256 MiB"));
        }
        self.meta_bytes += extra;
        let idx = self.nodes.len();
        self.nodes.push(Node {
            name: name.to_vec(),
            parent: dir,
            depth: if is_dir { depth + 1 } else { depth },
            meta,
            kind,
        });
        if is_dir {
            self.dirs += 1;
        }
        if let Kind::Dir(c) = &mut self.nodes[dir].kind {
            c.insert(name.to_vec(), idx);
        }
        Ok(idx)
    }

    /// The directory at `parts` (made with `meta` where missing); errors name `shown`.
    fn ensure_dir(&mut self, parts: &[&[u8]], meta: Meta, shown: &str) -> Result<usize> {
        let mut dir = 0;
        for p in parts {
            dir = match self.child(dir, p) {
                Some(i) if matches!(self.nodes[i].kind, Kind::Dir(_)) => i,
                Some(_) => {
                    return Err(Error::invalid(format!(
                        "'{shown}': a component of it is already a file or link"
                    )));
                }
                None => self.insert(
                    dir,
                    p,
                    Meta {
                        mode: libc::S_IFDIR | 0o755,
                        ..meta
                    },
                    Kind::Dir(BTreeMap::new()),
                    shown,
                )?,
            };
        }
        Ok(dir)
    }

    /// Add `data` as a regular file at `iso_path` with permission bits `perm` (owner root,
    /// times `t`); missing directories are made (0755).
    pub fn add_bytes(
        &mut self,
        iso_path: &str,
        data: impl Into<Arc<[u8]>>,
        perm: u32,
        t: i64,
    ) -> Result<()> {
        let parts = components(iso_path)?;
        let (name, dirs) = parts
            .split_last()
            .ok_or_else(|| Error::invalid(format!("ISO path '{iso_path}' names the root")))?;
        let data = data.into();
        let meta = Meta::made(libc::S_IFREG | (perm & 0o7777), t);
        let dir = self.ensure_dir(dirs, meta, iso_path)?;
        let size = data.len() as u64;
        self.insert(
            dir,
            name,
            meta,
            Kind::File {
                source: Source::Bytes(data),
                size,
            },
            iso_path,
        )?;
        Ok(())
    }

    /// Add a symbolic link at `iso_path` pointing at `target` (1 to 4095 bytes, no NUL; never
    /// followed), owned by root, times `t`; missing directories are made (0755).
    pub fn add_symlink(&mut self, iso_path: &str, target: &[u8], t: i64) -> Result<()> {
        let parts = components(iso_path)?;
        let (name, dirs) = parts
            .split_last()
            .ok_or_else(|| Error::invalid(format!("ISO path '{iso_path}' names the root")))?;
        if target.is_empty() || target.len() > MAX_LINK || target.contains(&0) {
            return Err(Error::invalid(format!(
                "symbolic link target for '{iso_path}' must be 1 to {MAX_LINK} bytes without NUL"
            )));
        }
        let meta = Meta::made(libc::S_IFLNK | 0o777, t);
        let dir = self.ensure_dir(dirs, meta, iso_path)?;
        self.insert(dir, name, meta, Kind::Symlink(target.to_vec()), iso_path)?;
        Ok(())
    }

    /// Add the host entry `src` (a file, a link, or a directory with everything under it) at
    /// `iso_path`. `src` itself is followed if it is a link; links below it are not.
    pub fn add_path(&mut self, iso_path: &str, src: &Path) -> Result<()> {
        let parts = components(iso_path)?;
        let m = std::fs::metadata(src).map_err(|e| Error::io("cannot read", e).with_path(src))?;
        let (name, dirs) = match parts.split_last() {
            Some(x) => x,
            None if m.is_dir() => return self.add_dir_contents("", src),
            None => {
                return Err(Error::invalid(format!(
                    "ISO path '{iso_path}' names the root, but {} is not a directory",
                    src.display()
                )));
            }
        };
        let dir = self.ensure_dir(dirs, Meta::of(&m), iso_path)?;
        self.add_entry(dir, name, src, &m)
    }

    /// Add what the host directory `src` holds under the ISO directory `iso_dir` (`""` for
    /// the root, which then takes `src`'s metadata).
    pub fn add_dir_contents(&mut self, iso_dir: &str, src: &Path) -> Result<()> {
        let m = std::fs::metadata(src).map_err(|e| Error::io("cannot read", e).with_path(src))?;
        if !m.is_dir() {
            return Err(Error::invalid("not a directory").with_path(src));
        }
        let parts = components(iso_dir)?;
        let dir = self.ensure_dir(&parts, Meta::of(&m), iso_dir)?;
        if dir == 0 && self.child_count(0) == 0 {
            self.set_root_meta(Meta::of(&m));
        } else if dir != 0 {
            self.nodes[dir].meta = Meta::of(&m);
        }
        self.scan(dir, src)
    }

    /// Add one source as `mkisofs` takes them: `ISO/PATH=HOST` puts HOST (a file, link or a
    /// directory's contents) at ISO/PATH; otherwise a host directory's contents go to the root
    /// and anything else goes to the root under its own name. A host path that exists is never
    /// read as the `=` form.
    pub fn add_source(&mut self, arg: &Path) -> Result<()> {
        let text = arg.to_string_lossy();
        match text.split_once('=') {
            Some((iso, host)) if !arg.exists() => {
                let host = Path::new(host);
                if std::fs::metadata(host).is_ok_and(|m| m.is_dir()) {
                    self.add_dir_contents(iso, host)
                } else {
                    self.add_path(iso, host)
                }
            }
            _ if arg.is_dir() => self.add_dir_contents("", arg),
            _ => {
                let name = arg
                    .file_name()
                    .ok_or_else(|| Error::invalid("a source has no file name").with_path(arg))?;
                self.add_path(&name.to_string_lossy(), arg)
            }
        }
    }

    fn child_count(&self, dir: usize) -> usize {
        match &self.nodes[dir].kind {
            Kind::Dir(c) => c.len(),
            _ => 0,
        }
    }

    /// Add one host entry (already `lstat`ed or `stat`ed as `m`) named `name` under `dir`.
    fn add_entry(&mut self, dir: usize, name: &[u8], path: &Path, m: &Metadata) -> Result<()> {
        let shown = path.display().to_string();
        let meta = Meta::of(m);
        let t = m.file_type();
        if t.is_dir() {
            let idx = self.insert(dir, name, meta, Kind::Dir(BTreeMap::new()), &shown)?;
            self.scan(idx, path)
        } else if t.is_file() {
            let kind = Kind::File {
                source: Source::Host {
                    path: path.to_path_buf(),
                    id: (m.dev(), m.ino()),
                },
                size: m.len(),
            };
            self.insert(dir, name, meta, kind, &shown).map(|_| ())
        } else if t.is_symlink() {
            let target = std::fs::read_link(path)
                .map_err(|e| Error::io("cannot read link", e).with_path(path))?;
            let target = std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str()).to_vec();
            if target.is_empty() || target.len() > MAX_LINK {
                return Err(Error::invalid(format!(
                    "symbolic link target of {} bytes cannot be represented",
                    target.len()
                ))
                .with_path(path));
            }
            self.insert(dir, name, meta, Kind::Symlink(target), &shown)
                .map(|_| ())
        } else {
            Err(Error::new(
                ErrorKind::UnsupportedFeature,
                format!(
                    "{} cannot be put in an ISO image: it is {}",
                    path.display(),
                    describe_type(m)
                ),
            )
            .with_path(path))
        }
    }

    /// Add every entry of host directory `path` under node `dir`, in name order.
    fn scan(&mut self, dir: usize, path: &Path) -> Result<()> {
        let rd =
            std::fs::read_dir(path).map_err(|e| Error::io("cannot list", e).with_path(path))?;
        let mut names = Vec::new();
        for e in rd {
            let e = e.map_err(|e| Error::io("cannot list", e).with_path(path))?;
            names.push(e.file_name());
            if names.len() > MAX_NODES {
                return Err(too_large(&format!("more than {MAX_NODES} entries")).with_path(path));
            }
        }
        names.sort();
        for n in names {
            let child: PathBuf = path.join(&n);
            let bytes = std::os::unix::ffi::OsStrExt::as_bytes(n.as_os_str());
            check_component(bytes).map_err(|why| {
                Error::invalid(format!("cannot be put in an ISO image: {why}")).with_path(&child)
            })?;
            let m = std::fs::symlink_metadata(&child)
                .map_err(|e| Error::io("cannot read", e).with_path(&child))?;
            self.add_entry(dir, bytes, &child, &m)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked() {
        let mut t = Tree::default();
        t.add_bytes("a/b/c", b"x".to_vec(), 0o644, 0).unwrap();
        assert_eq!(t.nodes().len(), 4);
        for bad in ["", "/", "a/../b", "./x", "a/\0b", &"n".repeat(256)] {
            assert!(
                t.add_bytes(bad, b"x".to_vec(), 0o644, 0).is_err(),
                "{bad:?}"
            );
        }
        assert!(
            t.add_bytes("a/b/c", b"y".to_vec(), 0o644, 0).is_err(),
            "duplicate"
        );
        assert!(
            t.add_bytes("a/b/c/d", b"y".to_vec(), 0o644, 0).is_err(),
            "under a file"
        );
        t.add_bytes(&format!("a/{}", "n".repeat(255)), b"x".to_vec(), 0o644, 0)
            .unwrap();
    }

    #[test]
    fn depth_is_bounded() {
        let mut t = Tree::default();
        t.add_bytes("1/2/3/4/5/6/7/f", b"x".to_vec(), 0o644, 0)
            .unwrap();
        let e = t
            .add_bytes("1/2/3/4/5/6/7/8/f", b"x".to_vec(), 0o644, 0)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TooLarge);
        assert!(e.message().contains("too deep"), "{e}");
    }
}
