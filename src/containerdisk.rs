//! Building a KubeVirt containerDisk: an OCI image, `FROM scratch`, whose one layer holds the
//! VM disk as `disk/<name>` (the directory 0555, the file 0440, both owned by 107:107, the
//! `qemu` user of virt-launcher), written in-process without podman, buildah or a daemon.
//!
//! Owns: the destinations (`oci-archive:PATH[:TAG]`, `oci:DIR[:TAG]`, `docker://REF`), the
//! disk check (raw or qcow2 without backing or data file, unless converted on the way with
//! [`crate::convert`]), the layer (two tar headers written here, ustar with a PAX `size`
//! record and a base-256 size field from 8 GiB up) streamed in one pass through sha256 (the
//! `diff_id`), the compressor (gzip or zstd at pinned settings) and sha256 plus a byte count
//! (the layer digest and size), the image config and manifest, the OCI layout and its tar,
//! and pushing through the registry client of [`crate::net::registry`] (same auth and TLS
//! as pulls).
//!
//! Memory is a few 1 MiB buffers per thread whatever the disk size: the disk is read by
//! position on one thread (tar framing, `diff_id`), gzip deflates 1 MiB pieces on one thread
//! per core (pigz's scheme: each piece primed with the 32 KiB before it and ended with a sync
//! flush, so the pieces form one deflate stream whose bytes do not depend on the thread
//! count), zstd compresses on the caller's thread; nothing is held whole. The compressed
//! layer goes to a file (the layout's blob, or an unlinked spool file for `oci-archive:` and
//! `docker://`, which need its size and digest before they can use it).
//!
//! Reproducible: the same disk and options give the same digests, run after run. Times are
//! `SOURCE_DATE_EPOCH` (or 0), JSON keys are sorted and compact, `Env` is sorted, gzip
//! writes MTIME 0, no name and OS 255, and both compressors run at fixed levels and frame
//! options on the pinned crate versions (zlib-rs for deflate, libzstd): a change of those
//! versions may change the layer digest, never its content.
//!
//! Failure leaves nothing at the target name: archives are written under a temporary name
//! and renamed; a new layout directory is built beside its name and renamed; an existing one
//! gets its blobs first and `index.json` last; temporary files are removed or never named.

use crate::convert::{ConvertOptions, Target};
use crate::error::{Error, ErrorKind, Result};
use crate::image::{Image, OpenOptions, Policy};
use crate::io::{BlockIo, FileIo};
use crate::net::digest::{Algorithm, Hasher};
use crate::net::registry::{Body, ImageRef, Pusher, RegistryOptions, host_architecture};
use crate::{CancelToken, Format};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The disk's file name inside `disk/` unless [`BuildOptions::disk_name`] says otherwise:
/// what quay.io/containerdisks ships, whatever the format (KubeVirt and CDI take the one
/// file under `disk/` and probe its format from its content, not its name).
pub const DEFAULT_DISK_NAME: &str = "disk.img";
/// The tag of `oci:` and `oci-archive:` destinations given without one.
pub const DEFAULT_TAG: &str = "latest";
/// Owner (uid and gid) of the layer's entries: `qemu` in virt-launcher.
const DISK_OWNER: u64 = 107;
/// Pinned gzip level (gzip's and Go's default).
const GZIP_LEVEL: u32 = 6;
/// Pinned zstd level (zstd's default).
const ZSTD_LEVEL: i32 = 3;
/// Bytes read, hashed and compressed at a time.
const BLOCK: usize = 1 << 20;
/// Blocks queued between the reading and the compressing thread.
const QUEUE: usize = 4;
/// Largest value of an 11-digit octal tar field (8 GiB - 1).
const MAX_OCTAL_11: u64 = 0o777_7777_7777;
/// Longest `--disk-name`: `disk/` + name must fit ustar's 100-byte name field.
const MAX_DISK_NAME: usize = 95;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const REF_NAME: &str = "org.opencontainers.image.ref.name";

// ------------------------------------------------------------------------------------------
// Destinations and options

/// Where the image goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// `oci-archive:PATH[:TAG]`: a tar of an OCI image layout (what CDI's `oci-archive:`
    /// endpoint and `skopeo` read).
    OciArchive {
        /// The archive file.
        path: PathBuf,
        /// The `org.opencontainers.image.ref.name` of the image in `index.json`.
        tag: String,
    },
    /// `oci:DIR[:TAG]`: an OCI image layout directory, created or added to (an image of the
    /// same tag is replaced in `index.json`).
    OciLayout {
        /// The layout directory.
        dir: PathBuf,
        /// The image's `org.opencontainers.image.ref.name`.
        tag: String,
    },
    /// `docker://REF`: pushed to a registry (tag `latest` when REF names none; a REF with a
    /// digest must name the digest of the image built).
    Registry(ImageRef),
}

impl Destination {
    /// Parse `oci-archive:PATH[:TAG]`, `oci:DIR[:TAG]` or `docker://REF`. As in
    /// containers/image, the path ends at its first `:`.
    pub fn parse(s: &str) -> Result<Destination> {
        let bad = |why: &str| Error::invalid(format!("invalid destination '{s}': {why}"));
        let (scheme, rest) = s
            .split_once(':')
            .ok_or_else(|| bad("expected oci-archive:PATH[:TAG], oci:DIR[:TAG] or docker://REF"))?;
        let path_tag = |rest: &str| -> Result<(PathBuf, String)> {
            let (p, t) = match rest.split_once(':') {
                Some((p, t)) => (p, t),
                None => (rest, DEFAULT_TAG),
            };
            if p.is_empty() {
                return Err(bad("empty path"));
            }
            if !valid_ref_name(t) {
                return Err(bad(
                    "the tag must be 1 to 128 characters of A-Z a-z 0-9 . _ - (not starting with . or -)",
                ));
            }
            Ok((PathBuf::from(p), t.to_string()))
        };
        match scheme {
            "oci-archive" => {
                let (path, tag) = path_tag(rest)?;
                Ok(Destination::OciArchive { path, tag })
            }
            "oci" => {
                let (dir, tag) = path_tag(rest)?;
                Ok(Destination::OciLayout { dir, tag })
            }
            "docker" => Ok(Destination::Registry(ImageRef::parse(rest)?)),
            _ => Err(bad(
                "unknown transport (oci-archive:PATH[:TAG], oci:DIR[:TAG], docker://REF)",
            )),
        }
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::OciArchive { path, tag } => {
                write!(f, "oci-archive:{}:{tag}", path.display())
            }
            Destination::OciLayout { dir, tag } => write!(f, "oci:{}:{tag}", dir.display()),
            Destination::Registry(r) => write!(f, "docker://{r}"),
        }
    }
}

/// An `index.json` reference name: the docker tag grammar.
fn valid_ref_name(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && t.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_alphanumeric() || b == b'_' || (i > 0 && (b == b'.' || b == b'-'))
        })
}

/// How the layer is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LayerCompression {
    /// gzip, level 6 (`application/vnd.oci.image.layer.v1.tar+gzip`); every reader has it.
    #[default]
    Gzip,
    /// zstd, level 3 with a content checksum (`…tar+zstd`): faster, smaller; read by
    /// containers/image (CDI, podman, CRI-O) and containerd, not by old Docker.
    Zstd,
}

impl LayerCompression {
    /// `gzip` or `zstd`.
    pub fn name(self) -> &'static str {
        match self {
            LayerCompression::Gzip => "gzip",
            LayerCompression::Zstd => "zstd",
        }
    }

    /// Parse `gzip` or `zstd`.
    pub fn from_name(s: &str) -> Option<LayerCompression> {
        match s {
            "gzip" => Some(LayerCompression::Gzip),
            "zstd" => Some(LayerCompression::Zstd),
            _ => None,
        }
    }

    /// The OCI layer media type.
    pub fn media_type(self) -> &'static str {
        match self {
            LayerCompression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            LayerCompression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// How to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The disk's name under `disk/` ([`DEFAULT_DISK_NAME`]); one plain file name of at most
    /// 95 bytes.
    pub disk_name: String,
    /// The source's format; `None` detects it.
    pub source_format: Option<Format>,
    /// Convert the disk on the way (into a temporary file beside the output); `None` ships
    /// it as it is, which needs a raw (or ISO) or qcow2 image with no backing or data file.
    pub convert: Option<Target>,
    /// The layer's compression.
    pub compression: LayerCompression,
    /// The config's `architecture`, GOARCH spelling (default: this host's).
    pub architecture: String,
    /// The config's `variant` (`v8` for arm64, ...), if any.
    pub variant: Option<String>,
    /// The config's `Labels`.
    pub labels: BTreeMap<String, String>,
    /// The config's `Env`, `NAME=VALUE` strings (written sorted by name; of several entries
    /// for one name the last counts).
    pub env: Vec<String>,
    /// Time stamp of the tar entries and the config's `created` (seconds since 1970):
    /// `SOURCE_DATE_EPOCH` (see [`source_date_epoch`]). `None`: mtime 0 and no `created`.
    pub source_date_epoch: Option<u64>,
    /// Registry access for `docker://` (credentials, `insecure`, CA certificates, proxy).
    pub registry: RegistryOptions,
    /// Where `docker://` builds spool the compressed layer and conversions (default: the
    /// system's temporary directory, `TMPDIR`). Other destinations use their own directory.
    pub temp_dir: Option<PathBuf>,
    /// Whether a converted source may open the backing and data files it names.
    pub policy: Policy,
    /// Cancellation from another thread.
    pub cancel: Option<CancelToken>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            disk_name: DEFAULT_DISK_NAME.to_string(),
            source_format: None,
            convert: None,
            compression: LayerCompression::Gzip,
            architecture: host_architecture().to_string(),
            variant: None,
            labels: BTreeMap::new(),
            env: Vec::new(),
            source_date_epoch: None,
            registry: RegistryOptions::default(),
            temp_dir: None,
            policy: Policy::Trusted,
            cancel: None,
        }
    }
}

/// What a build made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildReport {
    /// Where the image went.
    pub destination: String,
    /// Digest of the image manifest (the image's identity: `docker://REF@<this>`).
    pub manifest_digest: String,
    /// Size of the manifest in bytes.
    pub manifest_size: u64,
    /// Digest of the image config.
    pub config_digest: String,
    /// Size of the config in bytes.
    pub config_size: u64,
    /// Digest of the compressed layer.
    pub layer_digest: String,
    /// Size of the compressed layer in bytes.
    pub layer_size: u64,
    /// The layer's `diff_id`: digest of its uncompressed tar.
    pub diff_id: String,
    /// Size of the uncompressed tar in bytes.
    pub tar_size: u64,
    /// Format of the disk in the layer (`raw` or `qcow2`).
    pub disk_format: Format,
    /// Size of the disk file in the layer.
    pub disk_size: u64,
    /// Path of the disk in the layer (`disk/<name>`).
    pub disk_path: String,
    /// Blobs sent to a registry (0 to 2; the others were there already).
    pub blobs_uploaded: u32,
    /// Wall time.
    pub elapsed: Duration,
}

/// `SOURCE_DATE_EPOCH` from the environment: `None` when unset or empty, an error when it is
/// not a number of seconds that fits a tar header (up to 8^11 - 1).
pub fn source_date_epoch() -> Result<Option<u64>> {
    crate::civil::source_date_epoch()?
        .map(|n| {
            u64::try_from(n)
                .ok()
                .filter(|&n| n <= MAX_OCTAL_11)
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "SOURCE_DATE_EPOCH '{n}' does not fit a tar header (0 to {MAX_OCTAL_11})"
                    ))
                })
        })
        .transpose()
}

fn check_options(o: &BuildOptions) -> Result<()> {
    let n = &o.disk_name;
    if n.is_empty()
        || n.len() > MAX_DISK_NAME
        || n == "."
        || n == ".."
        || n.starts_with(".wh.")
        || n.chars().any(|c| c == '/' || c == '\\' || c.is_control())
    {
        return Err(Error::invalid(format!(
            "disk name '{}' must be one file name of 1 to {MAX_DISK_NAME} bytes, without '/', control characters or a '.wh.' prefix",
            n.escape_debug()
        )));
    }
    let arch_ok = |a: &str| {
        !a.is_empty()
            && a.len() <= 32
            && a.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    if !arch_ok(&o.architecture) {
        return Err(Error::invalid(format!(
            "architecture '{}' is not a GOARCH name (amd64, arm64, s390x, ppc64le, ...)",
            o.architecture.escape_debug()
        )));
    }
    if let Some(v) = &o.variant
        && !arch_ok(v)
    {
        return Err(Error::invalid(format!(
            "variant '{}' is not a platform variant (v7, v8, ...)",
            v.escape_debug()
        )));
    }
    for (k, v) in &o.labels {
        if k.is_empty() || k.contains('\0') || v.contains('\0') {
            return Err(Error::invalid(format!(
                "label '{}' needs a name and no NUL characters",
                k.escape_debug()
            )));
        }
    }
    for e in &o.env {
        match e.split_once('=') {
            Some((k, _)) if !k.is_empty() && !e.contains('\0') => {}
            _ => {
                return Err(Error::invalid(format!(
                    "environment entry '{}' is not NAME=VALUE",
                    e.escape_debug()
                )));
            }
        }
    }
    if let Some(t) = o.source_date_epoch
        && t > MAX_OCTAL_11
    {
        return Err(Error::invalid(format!(
            "time stamp {t} does not fit a tar header"
        )));
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Temporary files

/// A file in `dir` that never has a name once created (unlinked at once): nothing is left
/// behind whatever ends the process.
fn unnamed_file(dir: &Path, what: &str) -> Result<File> {
    let (f, path) = create_temp(dir, what)?;
    std::fs::remove_file(&path)
        .map_err(|e| Error::io("cannot remove a temporary file", e).with_path(&path))?;
    Ok(f)
}

/// A new file `dir/.vdisk-<what>-<pid>-<n>.part`, readable and writable.
fn create_temp(dir: &Path, what: &str) -> Result<(File, PathBuf)> {
    let mut last = None;
    for n in 0..100u32 {
        let p = dir.join(format!(".vdisk-{what}-{}-{n}.part", std::process::id()));
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p)
        {
            Ok(f) => return Ok((f, p)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => {
                return Err(Error::io("cannot create a temporary file in", e).with_path(dir));
            }
        }
    }
    Err(Error::io(
        "cannot create a temporary file in",
        last.unwrap_or_else(|| io::Error::other("too many temporary files")),
    )
    .with_path(dir))
}

/// A path removed (file or directory tree) when dropped, unless kept.
struct Cleanup {
    path: Option<PathBuf>,
}

impl Cleanup {
    fn new(path: PathBuf) -> Cleanup {
        Cleanup { path: Some(path) }
    }
    fn keep(mut self) {
        self.path = None;
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            if p.is_dir() {
                let _ = std::fs::remove_dir_all(&p);
            } else {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
}

/// Write `bytes` to `path` under a temporary name in its directory, then rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = parent_dir(path);
    let (mut f, tmp) = create_temp(&dir, "file")?;
    let guard = Cleanup::new(tmp.clone());
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io("cannot write", e).with_path(&tmp))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| Error::io("cannot rename into place", e).with_path(path))?;
    guard.keep();
    Ok(())
}

/// The directory holding `path` (`.` for a bare name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

// ------------------------------------------------------------------------------------------
// The disk

/// The disk file that goes into the layer, open for positional reads.
struct DiskSource {
    file: File,
    size: u64,
    format: Format,
    /// The source image, held open (with its reader lock) while it is read as it is.
    _image: Option<Image>,
}

/// Check the disk (or convert it into an unnamed file in `work`) and open what the layer
/// will hold.
fn prepare_disk(disk: &Path, o: &BuildOptions, work: &Path) -> Result<DiskSource> {
    let Some(target) = &o.convert else {
        let img = Image::open(
            disk,
            &OpenOptions {
                format: o.source_format,
                metadata_only: true,
                ..OpenOptions::default()
            },
        )?;
        let format = match img.format() {
            Format::Raw => Format::Raw,
            Format::Qcow2 => {
                let h = img.qcow2().map(|q| q.header());
                if let Some(b) = h.and_then(|h| h.backing_file.as_deref()) {
                    return Err(Error::new(
                        ErrorKind::Denied,
                        format!(
                            "the qcow2 image names the backing file '{}', which would not be in the containerDisk: flatten it on the way with -O qcow2",
                            b.escape_debug()
                        ),
                    )
                    .with_path(disk));
                }
                if let Some(d) = h.and_then(|h| h.data_file.as_deref()) {
                    return Err(Error::new(
                        ErrorKind::Denied,
                        format!(
                            "the qcow2 image keeps its data in the external file '{}': convert it on the way with -O qcow2",
                            d.escape_debug()
                        ),
                    )
                    .with_path(disk));
                }
                Format::Qcow2
            }
            other => {
                return Err(Error::new(
                    ErrorKind::UnsupportedFormat,
                    format!(
                        "a {} image: KubeVirt boots containerDisks holding raw or qcow2 only; convert it on the way with -O qcow2 (or -O raw)",
                        other.name()
                    ),
                )
                .with_path(disk));
            }
        };
        let mut file = File::open(disk).map_err(|e| Error::io("cannot open", e).with_path(disk))?;
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|e| Error::io("cannot size", e).with_path(disk))?;
        if size == 0 {
            return Err(Error::invalid("the disk is empty").with_path(disk));
        }
        return Ok(DiskSource {
            file,
            size,
            format,
            _image: Some(img),
        });
    };
    let img = Image::open(
        disk,
        &OpenOptions {
            format: o.source_format,
            policy: o.policy,
            ..OpenOptions::default()
        },
    )?;
    let io = FileIo::from_file(unnamed_file(work, "convert")?)
        .map_err(|e| Error::io("cannot open a temporary file", e).with_path(work))?;
    let mut co = ConvertOptions {
        cancel: o.cancel.clone(),
        ..ConvertOptions::default()
    };
    let format = match target {
        Target::Raw => {
            io.set_size(img.virtual_size())
                .map_err(|e| Error::io("cannot size a temporary file", e).with_path(work))?;
            crate::convert::convert_to_raw(&img, &io, true, &mut co)?;
            Format::Raw
        }
        Target::Qcow2 { options, compress } => {
            crate::convert::convert_to_qcow2(&img, &io, options, *compress, &mut co)?;
            Format::Qcow2
        }
    };
    let size = io
        .size()
        .map_err(|e| Error::io("cannot size the converted disk", e).with_path(work))?;
    let file = io
        .file()
        .try_clone()
        .map_err(|e| Error::io("cannot reopen the converted disk", e).with_path(work))?;
    Ok(DiskSource {
        file,
        size,
        format,
        _image: None,
    })
}

// ------------------------------------------------------------------------------------------
// Tar

/// What a tar entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryKind {
    File,
    Dir,
}

/// Write `v` as zero-padded octal filling `field` but its last byte (NUL).
fn octal(field: &mut [u8], v: u64) {
    let digits = field.len() - 1;
    let s = format!("{v:0digits$o}");
    field[..digits].copy_from_slice(s.as_bytes());
    field[digits] = 0;
}

/// The header block(s) of one tar entry: ustar, owner `owner`:`owner` with empty user and
/// group names, `mtime`. Sizes from 8 GiB up get a PAX extended header with a `size` record
/// before the entry, and GNU base-256 in the entry's own size field (readers that ignore
/// PAX still get the size right). `name` must fit ustar's 100 bytes.
fn tar_header(
    name: &str,
    kind: EntryKind,
    mode: u32,
    owner: u64,
    size: u64,
    mtime: u64,
) -> Result<Vec<u8>> {
    if name.is_empty() || name.len() > 100 {
        return Err(Error::invalid(format!(
            "tar entry name '{}' does not fit 100 bytes",
            name.escape_debug()
        )));
    }
    if mtime > MAX_OCTAL_11 {
        return Err(Error::invalid(format!(
            "time stamp {mtime} does not fit a tar header"
        )));
    }
    let mut out = Vec::with_capacity(1536);
    if size > MAX_OCTAL_11 {
        // `<dir>/PaxHeaders/<base>`, the name GNU tar gives extended headers.
        let (dir, base) = match name.trim_end_matches('/').rsplit_once('/') {
            Some((d, b)) => (format!("{d}/"), b),
            None => (String::new(), name.trim_end_matches('/')),
        };
        let mut pax_name = format!("{dir}PaxHeaders/{base}");
        pax_name.truncate(100);
        let record = pax_record("size", &size.to_string());
        out.extend_from_slice(&ustar_block(
            &pax_name,
            b'x',
            0o644,
            0,
            record.len() as u64,
            mtime,
        ));
        out.extend_from_slice(&record);
        out.resize(out.len().next_multiple_of(512), 0);
    }
    let flag = match kind {
        EntryKind::File => b'0',
        EntryKind::Dir => b'5',
    };
    out.extend_from_slice(&ustar_block(name, flag, mode, owner, size, mtime));
    Ok(out)
}

/// One PAX record, `"<len> <key>=<value>\n"`, where `<len>` counts the whole record.
fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    format!("{len} {key}={value}\n").into_bytes()
}

/// A ustar header block; a size beyond 11 octal digits is written in base-256.
fn ustar_block(name: &str, flag: u8, mode: u32, owner: u64, size: u64, mtime: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut h[100..108], u64::from(mode));
    octal(&mut h[108..116], owner);
    octal(&mut h[116..124], owner);
    if size > MAX_OCTAL_11 {
        h[124] = 0x80;
        h[128..136].copy_from_slice(&size.to_be_bytes());
    } else {
        octal(&mut h[124..136], size);
    }
    octal(&mut h[136..148], mtime);
    h[156] = flag;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    octal(&mut h[329..337], 0);
    octal(&mut h[337..345], 0);
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    h
}

/// Zeros that pad `size` bytes of data to a whole block.
fn padding(size: u64) -> usize {
    (size.next_multiple_of(512) - size) as usize
}

// ------------------------------------------------------------------------------------------
// The layer

/// Hashes and counts what passes through to `inner`.
struct Counted<W> {
    inner: W,
    hash: Hasher,
    bytes: u64,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What the layer came to.
#[derive(Debug, Clone)]
struct Layer {
    digest: String,
    size: u64,
    diff_id: String,
    tar_size: u64,
}

/// The layer tar of `src` as `disk/<name>`, in blocks handed to `emit` in order (the
/// headers, the disk in [`BLOCK`] pieces read by position, the padding and the end blocks).
/// Returns the tar's sha256 (the diff_id) and size; stops early, with `Ok`, when `emit`
/// returns `false` (its consumer failed and says why).
fn produce_tar(
    src: &DiskSource,
    name: &str,
    mtime: u64,
    cancel: Option<&CancelToken>,
    recycled: &mpsc::Receiver<Vec<u8>>,
    emit: &mut dyn FnMut(Vec<u8>) -> bool,
) -> Result<(String, u64)> {
    let mut head = tar_header("disk/", EntryKind::Dir, 0o555, DISK_OWNER, 0, mtime)?;
    head.extend(tar_header(
        &format!("disk/{name}"),
        EntryKind::File,
        0o440,
        DISK_OWNER,
        src.size,
        mtime,
    )?);
    let tail = vec![0u8; padding(src.size) + 1024];
    let mut hash = Hasher::new(Algorithm::Sha256);
    let mut total = 0u64;
    let mut send = |b: Vec<u8>| -> bool {
        hash.update(&b);
        total += b.len() as u64;
        emit(b)
    };
    if !send(head) {
        return Ok((String::new(), 0));
    }
    let mut off = 0u64;
    while off < src.size {
        if cancel.is_some_and(CancelToken::is_cancelled) {
            return Err(Error::new(ErrorKind::Cancelled, "build cancelled"));
        }
        let n = (src.size - off).min(BLOCK as u64) as usize;
        // A returned buffer keeps its length (every byte is read over): no memset.
        let mut b = recycled.try_recv().unwrap_or_default();
        if b.len() != n {
            b.resize(n, 0);
        }
        src.file.read_exact_at(&mut b, off).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                Error::new(
                    ErrorKind::Io,
                    format!("the disk shrank below {} bytes while being read", src.size),
                )
            } else {
                Error::io(format!("cannot read the disk at offset {off}"), e)
            }
        })?;
        off += n as u64;
        if !send(b) {
            return Ok((String::new(), 0));
        }
    }
    send(tail);
    Ok((hash.finish_hex(), total))
}

/// Stream the layer tar of `src` (as `disk/<name>`) through sha256, the compressor and
/// sha256 + count into `out`, from its current position. The disk is read on a thread of
/// its own; gzip compresses on one thread per core, zstd on the caller's.
fn write_layer(
    src: &DiskSource,
    name: &str,
    mtime: u64,
    c: LayerCompression,
    cancel: Option<&CancelToken>,
    out: &File,
) -> Result<Layer> {
    let mut counted = Counted {
        inner: BufWriter::with_capacity(BLOCK, out),
        hash: Hasher::new(Algorithm::Sha256),
        bytes: 0,
    };
    let (diff_hex, tar_size) = match c {
        LayerCompression::Gzip => {
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
            gzip_parallel(src, name, mtime, cancel, threads, &mut counted)?
        }
        LayerCompression::Zstd => zstd_stream(src, name, mtime, cancel, &mut counted)?,
    };
    counted
        .flush()
        .map_err(|e| Error::io("cannot write the layer", e))?;
    Ok(Layer {
        digest: format!("sha256:{}", counted.hash.finish_hex()),
        size: counted.bytes,
        diff_id: format!("sha256:{diff_hex}"),
        tar_size,
    })
}

/// The result of the reading thread, or its panic as an error.
fn joined<T>(r: std::thread::Result<Result<T>>) -> Result<T> {
    r.unwrap_or_else(|_| Err(Error::new(ErrorKind::Io, "a layer thread panicked")))
}

/// zstd, level 3, a content checksum, no content size or dictionary id, one thread: the
/// frame depends only on the bytes.
fn zstd_stream<W: Write>(
    src: &DiskSource,
    name: &str,
    mtime: u64,
    cancel: Option<&CancelToken>,
    out: &mut W,
) -> Result<(String, u64)> {
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(QUEUE);
    let (back_tx, back_rx) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|s| {
        let reader = s.spawn(move || {
            produce_tar(src, name, mtime, cancel, &back_rx, &mut |b| {
                tx.send(b).is_ok()
            })
        });
        let written = (move || -> io::Result<()> {
            let mut e = zstd::stream::write::Encoder::new(out, ZSTD_LEVEL)?;
            e.include_checksum(true)?;
            e.include_contentsize(false)?;
            e.include_dictid(false)?;
            e.long_distance_matching(false)?;
            for b in rx.iter() {
                e.write_all(&b)?;
                let _ = back_tx.send(b);
            }
            e.finish()?;
            Ok(())
        })();
        let read = joined(reader.join())?;
        written.map_err(|e| Error::io("cannot write the layer", e))?;
        Ok(read)
    })
}

/// The window deflate may look back into: the dictionary a piece is primed with.
const DEFLATE_WINDOW: usize = 32 << 10;

/// One piece of the gzip layer: raw deflate of `data` at the pinned level, primed with
/// `dict`, ending in a sync flush (byte-aligned, not final), so pieces concatenate into one
/// deflate stream. The bytes depend only on `data` and `dict`, never on which thread or how
/// many threads made them: each piece gets a new compressor, whose window starts zeroed (a
/// reset one keeps its old window, and the match search may peek at those stale bytes past
/// the input's end, so the output would depend on what the thread deflated before).
fn deflate_piece(data: &[u8], dict: &[u8]) -> io::Result<Vec<u8>> {
    let z = &mut flate2::Compress::new(flate2::Compression::new(GZIP_LEVEL), false);
    if !dict.is_empty() {
        z.set_dictionary(dict).map_err(io::Error::other)?;
    }
    let mut out = Vec::with_capacity(data.len() / 2 + 4096);
    let mut used = 0;
    loop {
        if out.capacity() - out.len() < 4096 {
            out.reserve(out.capacity().max(64 << 10));
        }
        let before = z.total_in();
        z.compress_vec(&data[used..], &mut out, flate2::FlushCompress::Sync)
            .map_err(io::Error::other)?;
        used += (z.total_in() - before) as usize;
        // The flush is complete when deflate stopped with output space to spare.
        if used == data.len() && out.len() < out.capacity() {
            return Ok(out);
        }
    }
}

/// All bytes zero.
fn all_zero(b: &[u8]) -> bool {
    b.chunks(4096)
        .all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

/// A piece handed to the deflate threads: its place, its bytes, and the piece before it
/// (whose last 32 KiB prime the dictionary).
struct Piece {
    seq: u64,
    data: std::sync::Arc<Vec<u8>>,
    prev: Option<std::sync::Arc<Vec<u8>>>,
}

/// gzip as pigz makes it, deterministically: the tar in its blocks, each deflated at level 6
/// on one of several threads with the 32 KiB before it as dictionary and a sync flush, the
/// pieces written in order after a header with MTIME 0, no name and OS 255, then an empty
/// final block, the CRC-32 and the length. One deflate stream in one gzip member, which
/// every gzip reader takes; its bytes do not depend on the thread count. A full block of
/// zeros after zeros always deflates to the same bytes, made once.
fn gzip_parallel<W: Write>(
    src: &DiskSource,
    name: &str,
    mtime: u64,
    cancel: Option<&CancelToken>,
    threads: usize,
    out: &mut W,
) -> Result<(String, u64)> {
    use std::sync::{Arc, Mutex, OnceLock};
    let lock = |m: &Mutex<mpsc::Receiver<Piece>>| {
        m.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .recv()
    };
    let threads = threads.max(1);
    // Pieces in flight (queued, deflating, or waiting for an earlier one to be written).
    let window = 2 * threads + 2;
    let (slot_tx, slot_rx) = mpsc::sync_channel::<()>(window);
    for _ in 0..window {
        let _ = slot_tx.send(());
    }
    let (job_tx, job_rx) = mpsc::sync_channel::<Piece>(threads);
    // Owned by the deflate threads: when they have all ended, the reader's sends fail.
    let job_rx = Arc::new(Mutex::new(job_rx));
    type Deflated = (u64, io::Result<(Vec<u8>, flate2::Crc)>);
    let (done_tx, done_rx) = mpsc::sync_channel::<Deflated>(window);
    let (back_tx, back_rx) = mpsc::channel::<Vec<u8>>();
    let zeros: OnceLock<Vec<u8>> = OnceLock::new();
    std::thread::scope(|s| {
        let zeros = &zeros;
        let reader = s.spawn(move || {
            let mut seq = 0u64;
            let mut prev: Option<Arc<Vec<u8>>> = None;
            let r = produce_tar(src, name, mtime, cancel, &back_rx, &mut |b| {
                if slot_rx.recv().is_err() {
                    return false;
                }
                let data = Arc::new(b);
                let piece = Piece {
                    seq,
                    data: data.clone(),
                    prev: prev.replace(data),
                };
                seq += 1;
                job_tx.send(piece).is_ok()
            });
            drop(job_tx);
            r
        });
        for _ in 0..threads {
            let done_tx = done_tx.clone();
            let job_rx = job_rx.clone();
            let back_tx = back_tx.clone();
            s.spawn(move || {
                loop {
                    let job = lock(&job_rx);
                    let Ok(p) = job else { return };
                    let dict: &[u8] = match &p.prev {
                        Some(v) => &v[v.len().saturating_sub(DEFLATE_WINDOW)..],
                        None => &[],
                    };
                    let cacheable = p.data.len() == BLOCK
                        && dict.len() == DEFLATE_WINDOW
                        && all_zero(dict)
                        && all_zero(&p.data);
                    let r = if cacheable {
                        match zeros.get() {
                            Some(c) => Ok(c.clone()),
                            None => deflate_piece(&p.data, dict).inspect(|c| {
                                let _ = zeros.set(c.clone());
                            }),
                        }
                    } else {
                        deflate_piece(&p.data, dict)
                    };
                    // The CRC-32 of each piece here, combined in order by the writer.
                    let mut crc = flate2::Crc::new();
                    crc.update(&p.data);
                    if done_tx.send((p.seq, r.map(|b| (b, crc)))).is_err() {
                        return;
                    }
                    // The piece before is no longer needed once this one is deflated (and
                    // its own thread let go of it): its buffer goes back to the reader.
                    if let Some(v) = p.prev.and_then(|a| Arc::try_unwrap(a).ok()) {
                        let _ = back_tx.send(v);
                    }
                }
            });
        }
        drop(done_tx);
        drop(job_rx);
        drop(back_tx);
        // Moved in (with the channel ends) so that they are dropped when writing stops:
        // the reader and the deflate threads then see it and end.
        let w: &mut W = &mut *out;
        let written = (move || -> io::Result<flate2::Crc> {
            let out = w;
            let mut crc = flate2::Crc::new();
            // ID1 ID2 CM=8 FLG=0 MTIME=0 XFL=0 (level 6) OS=255.
            out.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255])?;
            let mut next = 0u64;
            let mut waiting = BTreeMap::new();
            for (seq, r) in done_rx.iter() {
                waiting.insert(seq, r?);
                while let Some((b, c)) = waiting.remove(&next) {
                    out.write_all(&b)?;
                    crc.combine(&c);
                    next += 1;
                    let _ = slot_tx.send(());
                }
            }
            Ok(crc)
        })();
        let (diff, tar_size) = joined(reader.join())?;
        let crc = written
            .map_err(|e| Error::io("cannot write the layer", e))?
            .sum();
        // An empty final block (fixed Huffman, end of block), then CRC-32 and ISIZE.
        let mut trailer = vec![0x03, 0x00];
        trailer.extend_from_slice(&crc.to_le_bytes());
        trailer.extend_from_slice(&(tar_size as u32).to_le_bytes());
        out.write_all(&trailer)
            .map_err(|e| Error::io("cannot write the layer", e))?;
        Ok((diff, tar_size))
    })
}

// ------------------------------------------------------------------------------------------
// Config and manifest

fn sha256(b: &[u8]) -> String {
    let mut h = Hasher::new(Algorithm::Sha256);
    h.update(b);
    format!("sha256:{}", h.finish_hex())
}

/// RFC 3339 in UTC.
fn rfc3339(secs: u64) -> String {
    let (y, mo, d, h, mi, s) = crate::civil::from_secs(secs as i64);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// The image config: compact JSON with sorted keys (serde_json's map is sorted).
fn config_json(o: &BuildOptions, diff_id: &str) -> Result<Vec<u8>> {
    let mut inner = serde_json::Map::new();
    if !o.env.is_empty() {
        // One entry per name, the last given winning (as repeated ENV lines do), sorted.
        let mut by_name = BTreeMap::new();
        for e in &o.env {
            if let Some((k, _)) = e.split_once('=') {
                by_name.insert(k, e.as_str());
            }
        }
        let env: Vec<&str> = by_name.into_values().collect();
        inner.insert("Env".into(), json!(env));
    }
    if !o.labels.is_empty() {
        inner.insert("Labels".into(), json!(o.labels));
    }
    let mut c = serde_json::Map::new();
    c.insert("architecture".into(), json!(o.architecture));
    c.insert("config".into(), Value::Object(inner));
    if let Some(t) = o.source_date_epoch {
        c.insert("created".into(), json!(rfc3339(t)));
    }
    c.insert("os".into(), json!("linux"));
    c.insert(
        "rootfs".into(),
        json!({"diff_ids": [diff_id], "type": "layers"}),
    );
    if let Some(v) = &o.variant {
        c.insert("variant".into(), json!(v));
    }
    to_json(&Value::Object(c))
}

fn to_json(v: &Value) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| Error::invalid(format!("cannot write JSON: {e}")))
}

fn descriptor(media_type: &str, digest: &str, size: u64) -> Value {
    json!({"digest": digest, "mediaType": media_type, "size": size})
}

fn manifest_json(config: &[u8], layer: &Layer, c: LayerCompression) -> Result<Vec<u8>> {
    to_json(&json!({
        "config": descriptor(OCI_CONFIG, &sha256(config), config.len() as u64),
        "layers": [descriptor(c.media_type(), &layer.digest, layer.size)],
        "mediaType": OCI_MANIFEST,
        "schemaVersion": 2,
    }))
}

/// The `index.json` entry of the image.
fn index_entry(o: &BuildOptions, manifest: &[u8], tag: &str) -> Value {
    let mut d = descriptor(OCI_MANIFEST, &sha256(manifest), manifest.len() as u64);
    let mut platform = json!({"architecture": o.architecture, "os": "linux"});
    if let Some(v) = &o.variant {
        platform["variant"] = json!(v);
    }
    d["annotations"] = json!({ REF_NAME: tag });
    d["platform"] = platform;
    d
}

fn index_json(manifests: Vec<Value>) -> Result<Vec<u8>> {
    to_json(&json!({
        "manifests": manifests,
        "mediaType": OCI_INDEX,
        "schemaVersion": 2,
    }))
}

const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

// ------------------------------------------------------------------------------------------
// Building

/// Build the containerDisk of `disk` at `dest`. See the module documentation.
pub fn build(disk: &Path, dest: &Destination, opts: &BuildOptions) -> Result<BuildReport> {
    let t0 = Instant::now();
    check_options(opts)?;
    let mtime = opts.source_date_epoch.unwrap_or(0);
    // Reach and authenticate to a registry before the long part.
    let pusher = match dest {
        Destination::Registry(r) => Some(Pusher::connect(r, &opts.registry)?),
        _ => None,
    };
    // Where the temporary files go: beside the output.
    let work = match dest {
        Destination::OciArchive { path, .. } => parent_dir(path),
        Destination::OciLayout { dir, .. } if dir.is_dir() => dir.clone(),
        Destination::OciLayout { dir, .. } => parent_dir(dir),
        Destination::Registry(_) => opts.temp_dir.clone().unwrap_or_else(std::env::temp_dir),
    };
    if !work.is_dir() {
        return Err(Error::new(ErrorKind::NotFound, "no such directory").with_path(&work));
    }
    let src = prepare_disk(disk, opts, &work)?;
    let mut report = BuildReport {
        destination: dest.to_string(),
        manifest_digest: String::new(),
        manifest_size: 0,
        config_digest: String::new(),
        config_size: 0,
        layer_digest: String::new(),
        layer_size: 0,
        diff_id: String::new(),
        tar_size: 0,
        disk_format: src.format,
        disk_size: src.size,
        disk_path: format!("disk/{}", opts.disk_name),
        blobs_uploaded: 0,
        elapsed: Duration::ZERO,
    };
    let layer_of = |out: &File| {
        write_layer(
            &src,
            &opts.disk_name,
            mtime,
            opts.compression,
            opts.cancel.as_ref(),
            out,
        )
        .map_err(|e| {
            if e.path().is_none() && e.kind() == ErrorKind::Io {
                e.with_path(disk)
            } else {
                e
            }
        })
    };
    let finish = |report: &mut BuildReport, layer: &Layer, config: &[u8], manifest: &[u8]| {
        report.manifest_digest = sha256(manifest);
        report.manifest_size = manifest.len() as u64;
        report.config_digest = sha256(config);
        report.config_size = config.len() as u64;
        report.layer_digest = layer.digest.clone();
        report.layer_size = layer.size;
        report.diff_id = layer.diff_id.clone();
        report.tar_size = layer.tar_size;
    };
    match dest {
        Destination::Registry(r) => {
            let pusher = pusher.ok_or_else(|| Error::invalid("no registry connection"))?;
            let spool = unnamed_file(&work, "layer")?;
            let layer = layer_of(&spool)?;
            let config = config_json(opts, &layer.diff_id)?;
            let manifest = manifest_json(&config, &layer, opts.compression)?;
            finish(&mut report, &layer, &config, &manifest);
            let reference = match (&r.digest, &r.tag) {
                (Some(d), _) if *d != report.manifest_digest => {
                    return Err(Error::invalid(format!(
                        "the destination names digest {d}, but the image built is {}",
                        report.manifest_digest
                    )));
                }
                (Some(d), _) => d.clone(),
                (None, Some(t)) => t.clone(),
                (None, None) => DEFAULT_TAG.to_string(),
            };
            for (digest, body) in [
                (&layer.digest, Body::File(&spool, layer.size)),
                (&report.config_digest, Body::Bytes(&config)),
            ] {
                if pusher.push_blob(digest, &body)? {
                    report.blobs_uploaded += 1;
                }
            }
            pusher.put_manifest(&reference, OCI_MANIFEST, &manifest, &report.manifest_digest)?;
        }
        Destination::OciArchive { path, tag } => {
            let spool = unnamed_file(&work, "layer")?;
            let layer = layer_of(&spool)?;
            let config = config_json(opts, &layer.diff_id)?;
            let manifest = manifest_json(&config, &layer, opts.compression)?;
            finish(&mut report, &layer, &config, &manifest);
            let index = index_json(vec![index_entry(opts, &manifest, tag)])?;
            write_archive(
                path, &work, mtime, &index, &config, &manifest, &layer, &spool,
            )?;
        }
        Destination::OciLayout { dir, tag } => {
            let existing = dir.is_dir();
            let (root, guard) = if existing {
                check_layout(dir)?;
                (dir.clone(), None)
            } else {
                let name = dir.file_name().ok_or_else(|| {
                    Error::invalid("the layout directory has no name").with_path(dir)
                })?;
                let tmp = work.join(format!(
                    ".{}.vdisk-{}.part",
                    name.to_string_lossy(),
                    std::process::id()
                ));
                std::fs::create_dir(&tmp)
                    .map_err(|e| Error::io("cannot create a directory", e).with_path(&tmp))?;
                (tmp.clone(), Some(Cleanup::new(tmp)))
            };
            let blobs = root.join("blobs/sha256");
            std::fs::create_dir_all(&blobs)
                .map_err(|e| Error::io("cannot create a directory", e).with_path(&blobs))?;
            let (f, tmp) = create_temp(&blobs, "layer")?;
            let tmp_guard = Cleanup::new(tmp.clone());
            let layer = layer_of(&f)?;
            f.sync_all()
                .map_err(|e| Error::io("cannot write", e).with_path(&tmp))?;
            drop(f);
            let layer_path = blobs.join(hex_of(&layer.digest));
            std::fs::rename(&tmp, &layer_path)
                .map_err(|e| Error::io("cannot rename into place", e).with_path(&layer_path))?;
            tmp_guard.keep();
            let config = config_json(opts, &layer.diff_id)?;
            let manifest = manifest_json(&config, &layer, opts.compression)?;
            finish(&mut report, &layer, &config, &manifest);
            for b in [&config, &manifest] {
                let p = blobs.join(hex_of(&sha256(b)));
                if !p.exists() {
                    write_atomic(&p, b)?;
                }
            }
            let layout = root.join("oci-layout");
            if !layout.exists() {
                write_atomic(&layout, OCI_LAYOUT)?;
            }
            let mut entries = if existing {
                existing_entries(&root, tag)?
            } else {
                Vec::new()
            };
            entries.push(index_entry(opts, &manifest, tag));
            write_atomic(&root.join("index.json"), &index_json(entries)?)?;
            if let Some(g) = guard {
                std::fs::rename(&root, dir).map_err(|e| {
                    Error::io("cannot rename the layout into place", e).with_path(dir)
                })?;
                g.keep();
            }
        }
    }
    report.elapsed = t0.elapsed();
    Ok(report)
}

/// The hex part of `sha256:<hex>`.
fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

/// An existing directory must be empty or an OCI layout.
fn check_layout(dir: &Path) -> Result<()> {
    let layout = dir.join("oci-layout");
    match std::fs::read(&layout) {
        Ok(b) => {
            let v: Value = serde_json::from_slice(&b).map_err(|e| {
                Error::invalid(format!("oci-layout is not JSON: {e}")).with_path(&layout)
            })?;
            if v.get("imageLayoutVersion")
                .and_then(Value::as_str)
                .is_none()
            {
                return Err(
                    Error::invalid("oci-layout has no imageLayoutVersion").with_path(&layout)
                );
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut it = std::fs::read_dir(dir)
                .map_err(|e| Error::io("cannot read the directory", e).with_path(dir))?;
            if it.next().is_some() {
                return Err(Error::invalid(
                    "the directory exists and is not an OCI image layout (no oci-layout file)",
                )
                .with_path(dir));
            }
            Ok(())
        }
        Err(e) => Err(Error::io("cannot read", e).with_path(&layout)),
    }
}

/// The `index.json` entries of an existing layout but those tagged `tag`.
fn existing_entries(root: &Path, tag: &str) -> Result<Vec<Value>> {
    let p = root.join("index.json");
    let b = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("cannot read", e).with_path(&p)),
    };
    let v: Value = serde_json::from_slice(&b)
        .map_err(|e| Error::invalid(format!("index.json is not JSON: {e}")).with_path(&p))?;
    let list = v
        .get("manifests")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::invalid("index.json has no manifests list").with_path(&p))?;
    Ok(list
        .iter()
        .filter(|m| {
            m.pointer(&format!("/annotations/{}", REF_NAME.replace('/', "~1"))) != Some(&json!(tag))
        })
        .cloned()
        .collect())
}

/// Write the OCI layout tar to `path` (under a temporary name, renamed when complete):
/// `oci-layout`, `index.json`, `blobs/`, `blobs/sha256/`, then the blobs in name order, the
/// layer copied from `spool`. Files 0644, directories 0755, owner 0, time `mtime`.
#[allow(clippy::too_many_arguments)]
fn write_archive(
    path: &Path,
    work: &Path,
    mtime: u64,
    index: &[u8],
    config: &[u8],
    manifest: &[u8],
    layer: &Layer,
    spool: &File,
) -> Result<()> {
    let (out, tmp) = create_temp(work, "archive")?;
    let guard = Cleanup::new(tmp.clone());
    let werr = |e: io::Error| Error::io("cannot write", e).with_path(&tmp);
    let mut w = BufWriter::with_capacity(BLOCK, &out);
    let small = |w: &mut BufWriter<&File>, name: &str, data: &[u8]| -> Result<()> {
        w.write_all(&tar_header(
            name,
            EntryKind::File,
            0o644,
            0,
            data.len() as u64,
            mtime,
        )?)
        .and_then(|()| w.write_all(data))
        .and_then(|()| w.write_all(&vec![0u8; padding(data.len() as u64)]))
        .map_err(werr)
    };
    small(&mut w, "oci-layout", OCI_LAYOUT)?;
    small(&mut w, "index.json", index)?;
    for d in ["blobs/", "blobs/sha256/"] {
        w.write_all(&tar_header(d, EntryKind::Dir, 0o755, 0, 0, mtime)?)
            .map_err(werr)?;
    }
    enum Blob<'a> {
        Bytes(&'a [u8]),
        Layer,
    }
    let mut blobs = vec![
        (sha256(config), Blob::Bytes(config)),
        (sha256(manifest), Blob::Bytes(manifest)),
        (layer.digest.clone(), Blob::Layer),
    ];
    blobs.sort_by(|a, b| a.0.cmp(&b.0));
    blobs.dedup_by(|a, b| a.0 == b.0);
    for (digest, blob) in blobs {
        let name = format!("blobs/sha256/{}", hex_of(&digest));
        match blob {
            Blob::Bytes(b) => small(&mut w, &name, b)?,
            Blob::Layer => {
                w.write_all(&tar_header(
                    &name,
                    EntryKind::File,
                    0o644,
                    0,
                    layer.size,
                    mtime,
                )?)
                .and_then(|()| w.flush())
                .map_err(werr)?;
                // File to file: copy_file_range, inside the kernel.
                let mut from = spool
                    .try_clone()
                    .map_err(|e| Error::io("cannot reopen the spooled layer", e))?;
                from.seek(SeekFrom::Start(0))
                    .map_err(|e| Error::io("cannot read the spooled layer", e))?;
                let mut to: &File = &out;
                let n = io::copy(&mut from, &mut to).map_err(werr)?;
                if n != layer.size {
                    return Err(Error::new(
                        ErrorKind::Io,
                        format!("the spooled layer holds {n} bytes, not {}", layer.size),
                    ));
                }
                w.write_all(&vec![0u8; padding(layer.size)]).map_err(werr)?;
            }
        }
    }
    w.write_all(&[0u8; 1024])
        .and_then(|()| w.flush())
        .map_err(werr)?;
    drop(w);
    out.sync_all().map_err(werr)?;
    std::fs::rename(&tmp, path)
        .map_err(|e| Error::io("cannot rename the archive into place", e).with_path(path))?;
    guard.keep();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn destinations() {
        let d = Destination::parse("oci-archive:/tmp/x.tar").unwrap();
        assert_eq!(
            d,
            Destination::OciArchive {
                path: "/tmp/x.tar".into(),
                tag: "latest".into()
            }
        );
        assert_eq!(d.to_string(), "oci-archive:/tmp/x.tar:latest");
        let d = Destination::parse("oci:dir:v1.2").unwrap();
        assert_eq!(
            d,
            Destination::OciLayout {
                dir: "dir".into(),
                tag: "v1.2".into()
            }
        );
        let d = Destination::parse("docker://localhost:5000/disks/fedora").unwrap();
        assert_eq!(d.to_string(), "docker://localhost:5000/disks/fedora:latest");
        for bad in [
            "x.tar",
            "oci-archive:",
            "oci-archive:x.tar:bad tag",
            "oci:d:-x",
            "docker:/x",
            "docker://UPPER/case",
            "tar:x",
        ] {
            let e = Destination::parse(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn config_is_compact_sorted_json() {
        let o = BuildOptions {
            architecture: "arm64".into(),
            variant: Some("v8".into()),
            env: vec!["B=1".into(), "A=x=y".into(), "B=2".into()],
            labels: [
                ("z".to_string(), "1".to_string()),
                ("a".to_string(), "2".to_string()),
            ]
            .into_iter()
            .collect(),
            source_date_epoch: Some(86_400),
            ..BuildOptions::default()
        };
        let c = config_json(&o, "sha256:00").unwrap();
        assert_eq!(
            String::from_utf8(c).unwrap(),
            r#"{"architecture":"arm64","config":{"Env":["A=x=y","B=2"],"Labels":{"a":"2","z":"1"}},"created":"1970-01-02T00:00:00Z","os":"linux","rootfs":{"diff_ids":["sha256:00"],"type":"layers"},"variant":"v8"}"#
        );
        let plain = config_json(&BuildOptions::default(), "sha256:00").unwrap();
        assert!(!String::from_utf8(plain).unwrap().contains("created"));
    }

    #[test]
    fn option_checks() {
        let ok = BuildOptions::default();
        check_options(&ok).unwrap();
        for name in ["", "a/b", ".", "..", ".wh.x", "a\nb", &"n".repeat(96)] {
            let o = BuildOptions {
                disk_name: name.into(),
                ..BuildOptions::default()
            };
            assert!(check_options(&o).is_err(), "{name:?}");
        }
        let o = BuildOptions {
            env: vec!["NOEQUALS".into()],
            ..BuildOptions::default()
        };
        assert!(check_options(&o).is_err());
        let o = BuildOptions {
            architecture: "x86_64 ".into(),
            ..BuildOptions::default()
        };
        assert!(check_options(&o).is_err());
    }

    #[test]
    fn pax_records_count_their_own_length() {
        for v in [0u64, 9, 99, 8 << 30, u64::MAX] {
            let r = pax_record("size", &v.to_string());
            let s = String::from_utf8(r.clone()).unwrap();
            let (len, rest) = s.split_once(' ').unwrap();
            assert_eq!(len.parse::<usize>().unwrap(), r.len(), "{s:?}");
            assert_eq!(rest, format!("size={v}\n"));
        }
        // Where the length's own digits tip it from one to two digits.
        assert_eq!(pax_record("k", "1234"), b"9 k=1234\n");
        assert_eq!(pax_record("k", "12345"), b"11 k=12345\n");
    }

    /// Headers as the `tar` crate (and our own bounded reader) read them, big sizes included.
    #[test]
    fn tar_headers_read_back() {
        for size in [0u64, 1, 511, 512, MAX_OCTAL_11, MAX_OCTAL_11 + 1, 16 << 30] {
            let mut tar =
                tar_header("disk/", EntryKind::Dir, 0o555, 107, 0, 1_700_000_000).unwrap();
            tar.extend(
                tar_header(
                    "disk/disk.img",
                    EntryKind::File,
                    0o440,
                    107,
                    size,
                    1_700_000_000,
                )
                .unwrap(),
            );
            // Only the headers: check them with the reader's header parsing.
            let mut a = tar::Archive::new(&tar[..]);
            let mut it = a.entries().unwrap();
            let d = it.next().unwrap().unwrap();
            assert_eq!(d.path().unwrap().to_str(), Some("disk/"));
            assert_eq!(d.header().entry_type(), tar::EntryType::Directory);
            assert_eq!(d.header().mode().unwrap(), 0o555);
            assert_eq!(d.header().uid().unwrap(), 107);
            assert_eq!(d.header().gid().unwrap(), 107);
            assert_eq!(d.header().mtime().unwrap(), 1_700_000_000);
            drop(d);
            let f = it.next().unwrap().unwrap();
            assert_eq!(f.path().unwrap().to_str(), Some("disk/disk.img"));
            assert_eq!(f.header().entry_type(), tar::EntryType::Regular);
            assert_eq!(f.header().mode().unwrap(), 0o440);
            assert_eq!(f.header().uid().unwrap(), 107);
            // Through PAX when present, else the header's own field (octal or base-256).
            assert_eq!(f.size(), size, "size {size}");
            assert_eq!(f.header().size().unwrap(), size, "header size {size}");
            let pax = tar.len() > 1024;
            assert_eq!(pax, size > MAX_OCTAL_11);
        }
        assert!(tar_header(&"x".repeat(101), EntryKind::File, 0o644, 0, 0, 0).is_err());
        assert!(tar_header("x", EntryKind::File, 0o644, 0, 0, MAX_OCTAL_11 + 1).is_err());
    }

    /// The parallel gzip's bytes do not depend on the thread count or on what a thread
    /// deflated before; zero runs (the cached piece) decode too.
    #[test]
    fn gzip_is_independent_of_threads() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.raw");
        let mut data = vec![0u8; 9 * BLOCK + 12345];
        let mut x = 1u32;
        for (i, b) in data.iter_mut().enumerate() {
            // Text-like, random-like and zero stretches.
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            *b = match (i / BLOCK) % 3 {
                0 => b"the quick brown fox "[i % 20],
                1 => (x >> 16) as u8 & 0x3f,
                _ => 0,
            };
        }
        std::fs::write(&disk, &data).unwrap();
        let src = prepare_disk(&disk, &BuildOptions::default(), dir.path()).unwrap();
        let mut outs = Vec::new();
        for threads in [1, 3, 2, 5] {
            let mut out = Vec::new();
            let r = gzip_parallel(&src, "disk.img", 0, None, threads, &mut out).unwrap();
            outs.push((out, r));
        }
        for o in &outs[1..] {
            assert!(o.0 == outs[0].0, "output differs with the thread count");
            assert_eq!(o.1, outs[0].1);
        }
        let mut tarb = Vec::new();
        flate2::read::GzDecoder::new(&outs[0].0[..])
            .read_to_end(&mut tarb)
            .unwrap();
        assert_eq!(tarb.len() as u64, outs[0].1.1);
        assert_eq!(&tarb[1024..1024 + data.len()], &data[..]);
        // The same piece after other work, and fresh: the same bytes.
        let a = deflate_piece(&data[BLOCK..2 * BLOCK], &data[BLOCK - 32768..BLOCK]).unwrap();
        deflate_piece(&data[..BLOCK], &[]).unwrap();
        let b = deflate_piece(&data[BLOCK..2 * BLOCK], &data[BLOCK - 32768..BLOCK]).unwrap();
        assert_eq!(a, b);
    }

    /// A whole layer read back with the crate's bounded tar reader and gzip/zstd decoders.
    #[test]
    fn layer_round_trip_and_reproducible() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.raw");
        let data: Vec<u8> = (0..3_000_001u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&disk, &data).unwrap();
        for c in [LayerCompression::Gzip, LayerCompression::Zstd] {
            let o = BuildOptions {
                compression: c,
                ..BuildOptions::default()
            };
            let mut digests = Vec::new();
            for _ in 0..2 {
                let src = prepare_disk(&disk, &o, dir.path()).unwrap();
                let out = unnamed_file(dir.path(), "t").unwrap();
                let l = write_layer(&src, "disk.img", 0, c, None, &out).unwrap();
                let mut comp = Vec::new();
                (&out).seek(SeekFrom::Start(0)).unwrap();
                (&out).read_to_end(&mut comp).unwrap();
                assert_eq!(comp.len() as u64, l.size);
                assert_eq!(sha256(&comp), l.digest);
                let tarb = match c {
                    LayerCompression::Gzip => {
                        assert_eq!(&comp[..10], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255]);
                        let mut v = Vec::new();
                        flate2::read::GzDecoder::new(&comp[..])
                            .read_to_end(&mut v)
                            .unwrap();
                        v
                    }
                    LayerCompression::Zstd => zstd::decode_all(&comp[..]).unwrap(),
                };
                assert_eq!(tarb.len() as u64, l.tar_size);
                assert_eq!(sha256(&tarb), l.diff_id);
                assert_eq!(tarb.len() % 512, 0);
                let mut r = crate::archive::tar::TarReader::new(&tarb[..]);
                let e = r.next_entry().unwrap().unwrap();
                assert_eq!(e.path, "disk/");
                assert_eq!(e.mode, 0o555);
                let e = r.next_entry().unwrap().unwrap();
                assert_eq!(e.path, "disk/disk.img");
                assert_eq!(e.mode, 0o440);
                assert_eq!(e.size, data.len() as u64);
                let mut got = Vec::new();
                r.read_to_end(&mut got).unwrap();
                assert_eq!(got, data);
                digests.push((l.digest, l.diff_id));
            }
            assert_eq!(digests[0], digests[1]);
        }
    }
}
