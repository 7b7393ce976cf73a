//! Malformed and hostile images: every limit qemu enforces when opening a qcow2 (and a few of
//! our own), each violated on its own, through the library (in memory) and through the CLI
//! (files). Each case must fail cleanly with the right [`ErrorKind`] or a nonzero exit that
//! names the file and the problem, without looping, without allocating much (the CLI's peak
//! RSS is measured with `/usr/bin/time`) and without leaving a target file behind.
//!
//! The images are built in code by [`Q`], a small qcow2 writer that lays out a valid image
//! (header, refcount table and block, L1, L2, data) and lets each test break one thing.
//! Backing chains and truncation cases start from images made by qemu-img.

use byteorder::{BigEndian, ByteOrder};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use vdisk::io::MemIo;
use vdisk::{Error, ErrorKind, Format, Image, OpenOptions, Policy};

// ---------------------------------------------------------------------------------------------
// The image builder.

const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_DATA_FILE: u32 = 0x4441_5441;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
/// The pattern of the default image's one data cluster.
fn pattern(i: usize) -> u8 {
    (i * 7 + 3) as u8
}

/// One internal snapshot table entry.
#[derive(Clone)]
struct Snap {
    l1_offset: u64,
    l1_size: u32,
    id: Vec<u8>,
    name: Vec<u8>,
    extra: Vec<u8>,
    /// Overrides the stored extra data length.
    extra_len: Option<u32>,
}

impl Snap {
    /// A snapshot sharing the active L1 table (`l1_offset`), qemu's 24 bytes of extra data.
    fn new(l1_offset: u64, size: u64) -> Snap {
        let mut extra = vec![0u8; 24];
        BigEndian::write_u64(&mut extra[8..16], size);
        Snap {
            l1_offset,
            l1_size: 1,
            id: b"1".to_vec(),
            name: b"snap".to_vec(),
            extra,
            extra_len: None,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut e = vec![0u8; 40];
        BigEndian::write_u64(&mut e[0..8], self.l1_offset);
        BigEndian::write_u32(&mut e[8..12], self.l1_size);
        BigEndian::write_u16(&mut e[12..14], self.id.len() as u16);
        BigEndian::write_u16(&mut e[14..16], self.name.len() as u16);
        BigEndian::write_u32(
            &mut e[36..40],
            self.extra_len.unwrap_or(self.extra.len() as u32),
        );
        e.extend_from_slice(&self.extra);
        e.extend_from_slice(&self.id);
        e.extend_from_slice(&self.name);
        e.resize(e.len().div_ceil(8) * 8, 0);
        e
    }
}

/// A qcow2 image under construction. `Q::new()` is valid (qemu-img check passes): cluster 0
/// header, 1 refcount table, 2 refcount block, 3 L1, 4 L2, 5 one data cluster at guest 0,
/// guest cluster 1 a zero cluster, the rest unallocated. Tests change fields, then `build()`.
#[derive(Clone)]
struct Q {
    version: u32,
    cluster_bits: u32,
    size: u64,
    crypt: u32,
    l1_size: u32,
    l1_offset: u64,
    rt_offset: u64,
    rt_clusters: u32,
    nb_snapshots: Option<u32>,
    snapshots_offset: u64,
    incompat: u64,
    compat: u64,
    autoclear: u64,
    refcount_order: u32,
    header_length: u32,
    compression_type: u8,
    /// Header extensions, written in order after the header, then an end marker.
    exts: Vec<(u32, Vec<u8>)>,
    backing: Option<Vec<u8>>,
    /// Overrides the computed backing file offset / size fields.
    backing_offset: Option<u64>,
    backing_size: Option<u32>,
    /// L1 entries (at `l1_offset`).
    l1: Vec<u64>,
    /// L2 table words at cluster 4 (pairs with extended L2).
    l2: Vec<u64>,
    /// Snapshot entries, written at `snapshots_offset`.
    snaps: Vec<Snap>,
    /// Extra bytes at host offsets, written after everything else.
    patches: Vec<(u64, Vec<u8>)>,
    /// Final file length (default: end of the last thing written).
    len: Option<u64>,
}

impl Q {
    fn new() -> Q {
        Q::with_bits(16)
    }

    fn with_bits(cluster_bits: u32) -> Q {
        let c = 1u64 << cluster_bits;
        let data: Vec<u8> = (0..c as usize).map(pattern).collect();
        // Refcount block: 16-bit refcounts of 1 for clusters 0..=5.
        let mut rb = vec![0u8; 12];
        for k in 0..6 {
            BigEndian::write_u16(&mut rb[2 * k..], 1);
        }
        let mut rt = vec![0u8; 8];
        BigEndian::write_u64(&mut rt, 2 * c);
        Q {
            version: 3,
            cluster_bits,
            // 1 MiB, or what one L2 table maps with small clusters.
            size: (1 << 20).min(c * c / 8),
            crypt: 0,
            l1_size: 1,
            l1_offset: 3 * c,
            rt_offset: c,
            rt_clusters: 1,
            nb_snapshots: None,
            snapshots_offset: 0,
            incompat: 0,
            compat: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: 112,
            compression_type: 0,
            exts: Vec::new(),
            backing: None,
            backing_offset: None,
            backing_size: None,
            l1: vec![COPIED | (4 * c)],
            l2: vec![COPIED | (5 * c), ZERO],
            snaps: Vec::new(),
            patches: vec![(c, rt), (2 * c, rb), (5 * c, data)],
            len: None,
        }
    }

    fn c(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn v2(mut self) -> Q {
        self.version = 2;
        self.header_length = 72;
        self
    }

    fn ext(mut self, typ: u32, data: &[u8]) -> Q {
        self.exts.push((typ, data.to_vec()));
        self
    }

    fn patch(mut self, off: u64, data: &[u8]) -> Q {
        self.patches.push((off, data.to_vec()));
        self
    }

    fn build(&self) -> Vec<u8> {
        let c = self.c();
        let mut f = vec![0u8; (6 * c) as usize];
        // Tables placed beyond 4 GiB are not written: those tests are about the offsets alone.
        let put = |f: &mut Vec<u8>, off: u64, data: &[u8]| {
            if off > 1 << 32 {
                return;
            }
            let end = off as usize + data.len();
            if f.len() < end {
                f.resize(end, 0);
            }
            f[off as usize..end].copy_from_slice(data);
        };
        let mut h = [0u8; 112];
        BigEndian::write_u32(&mut h[0..], 0x5146_49fb);
        BigEndian::write_u32(&mut h[4..], self.version);
        BigEndian::write_u32(&mut h[20..], self.cluster_bits);
        BigEndian::write_u64(&mut h[24..], self.size);
        BigEndian::write_u32(&mut h[32..], self.crypt);
        BigEndian::write_u32(&mut h[36..], self.l1_size);
        BigEndian::write_u64(&mut h[40..], self.l1_offset);
        BigEndian::write_u64(&mut h[48..], self.rt_offset);
        BigEndian::write_u32(&mut h[56..], self.rt_clusters);
        BigEndian::write_u32(
            &mut h[60..],
            self.nb_snapshots.unwrap_or(self.snaps.len() as u32),
        );
        BigEndian::write_u64(&mut h[64..], self.snapshots_offset);
        if self.version >= 3 {
            BigEndian::write_u64(&mut h[72..], self.incompat);
            BigEndian::write_u64(&mut h[80..], self.compat);
            BigEndian::write_u64(&mut h[88..], self.autoclear);
            BigEndian::write_u32(&mut h[96..], self.refcount_order);
            BigEndian::write_u32(&mut h[100..], self.header_length);
            h[104] = self.compression_type;
        }
        put(&mut f, 0, &h[..if self.version >= 3 { 112 } else { 72 }]);
        // Extensions from the header length on (wherever that is), then the end marker.
        let mut pos = u64::from(self.header_length);
        for (typ, data) in &self.exts {
            let mut e = vec![0u8; 8];
            BigEndian::write_u32(&mut e[0..], *typ);
            BigEndian::write_u32(&mut e[4..], data.len() as u32);
            e.extend_from_slice(data);
            e.resize(e.len().div_ceil(8) * 8, 0);
            put(&mut f, pos, &e);
            pos += e.len() as u64;
        }
        // The end marker, where extensions can be (a shorter header length is refused before).
        if pos >= if self.version >= 3 { 104 } else { 72 } {
            put(&mut f, pos, &[0u8; 8]);
        }
        pos += 8;
        if let Some(name) = &self.backing {
            let off = self.backing_offset.unwrap_or(pos);
            put(&mut f, off, name);
            let mut b = [0u8; 12];
            BigEndian::write_u64(&mut b[0..], off);
            BigEndian::write_u32(&mut b[8..], name.len() as u32);
            put(&mut f, 8, &b);
        }
        if let Some(off) = self.backing_offset {
            put(&mut f, 8, &off.to_be_bytes());
        }
        if let Some(n) = self.backing_size {
            put(&mut f, 16, &n.to_be_bytes());
        }
        let mut l1 = vec![0u8; self.l1.len() * 8];
        for (k, e) in self.l1.iter().enumerate() {
            BigEndian::write_u64(&mut l1[8 * k..], *e);
        }
        put(&mut f, self.l1_offset, &l1);
        let mut l2 = vec![0u8; c as usize];
        for (k, e) in self.l2.iter().enumerate() {
            BigEndian::write_u64(&mut l2[8 * k..], *e);
        }
        put(&mut f, 4 * c, &l2);
        let mut off = self.snapshots_offset;
        for s in &self.snaps {
            let b = s.bytes();
            put(&mut f, off, &b);
            off += b.len() as u64;
        }
        for (off, data) in &self.patches {
            put(&mut f, *off, data);
        }
        if let Some(n) = self.len {
            f.resize(n as usize, 0);
        }
        f
    }
}

// ---------------------------------------------------------------------------------------------
// Running cases: in memory with a deadline, and through the CLI with a watchdog and peak RSS.

/// Guard against loops: anything still running after this is reported as a hang. This is a
/// watchdog, not a performance assertion (every case takes milliseconds).
const HANG: Duration = Duration::from_secs(120);
/// Peak RSS allowed for one CLI run on a hostile image.
const MAX_RSS_KIB: u64 = 64 * 1024;

/// How far an image got before failing.
enum Outcome {
    /// Opening failed.
    Open(Error),
    /// Opening worked; block status or reading the guest data failed.
    Read(Error),
    /// Everything worked; the whole guest content.
    Ok(Vec<u8>),
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Open(e) => write!(f, "Open({e:?})"),
            Outcome::Read(e) => write!(f, "Read({e:?})"),
            Outcome::Ok(d) => write!(f, "Ok({} bytes read back)", d.len()),
        }
    }
}

impl Outcome {
    fn data(self) -> Vec<u8> {
        match self {
            Outcome::Ok(d) => d,
            other => panic!("expected the image to read back, got {other:?}"),
        }
    }
}

/// Run `f` on another thread; panic if it has not finished within [`HANG`].
fn deadline<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(HANG) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: still running after {HANG:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: panicked"),
    }
}

/// Read the whole disk of `img` (block status of every extent, then the data in 1 MiB reads).
fn read_everything(img: &Image) -> vdisk::Result<Vec<u8>> {
    let size = img.virtual_size();
    assert!(size <= 256 << 20, "test image too large to read: {size}");
    let mut pos = 0;
    while pos < size {
        let e = img.extent(pos, size - pos)?;
        assert!(
            e.len > 0 && e.len <= size - pos,
            "bad extent {e:?} at {pos}"
        );
        pos += e.len;
    }
    let mut out = vec![0u8; size as usize];
    for (k, chunk) in out.chunks_mut(1 << 20).enumerate() {
        img.read_at(chunk, (k as u64) << 20)?;
    }
    Ok(out)
}

fn outcome_with(bytes: Vec<u8>, opts: OpenOptions) -> Outcome {
    let qcow2 = bytes.len() >= 8 && bytes[..4] == *b"QFI\xfb" && bytes[4..8] != [0, 0, 0, 1];
    let copy = qcow2.then(|| bytes.clone());
    let trusted = opts.policy == Policy::Trusted;
    // A stream reads the active state only.
    let copy = copy.filter(|_| opts.snapshot.is_none());
    let random = deadline(
        "opening and reading an image in memory",
        move || match Image::from_io(Arc::new(MemIo::new(bytes)), &opts) {
            Err(e) => Outcome::Open(e),
            Ok(img) => match read_everything(&img) {
                Err(e) => Outcome::Read(e),
                Ok(d) => Outcome::Ok(d),
            },
        },
    );
    if let Some(b) = copy {
        agree(&random, &streamed(b), trusted);
    }
    random
}

/// Streams that went through the spool file instead of a front-to-back reader.
static SPOOLED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The same bytes through the streaming import (as the importer, the uploader and the C
/// API read them): the guest content, or the error.
fn streamed(bytes: Vec<u8>) -> vdisk::Result<Vec<u8>> {
    deadline("streaming an image from memory", move || {
        let io = MemIo::new(Vec::new());
        let log = |line: &str| {
            if line.contains("spooling") {
                SPOOLED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        };
        let mut opts = vdisk::ingest::ImportOptions {
            threads: 2,
            log: Some(&log),
            ..Default::default()
        };
        let r = vdisk::ingest::import_into(
            Box::new(std::io::Cursor::new(bytes)),
            &io,
            true,
            1 << 40,
            &mut opts,
        )?;
        let mut d = io.to_vec();
        d.resize(r.virtual_size as usize, 0);
        Ok(d)
    })
}

/// The one-verdict rule: the streaming reader accepts exactly what the random-access reader
/// accepts, with the same content, and refuses the rest with the same kind of error. Only
/// the policy may differ (streams are untrusted: names of other files are refused).
fn agree(random: &Outcome, stream: &vdisk::Result<Vec<u8>>, trusted: bool) {
    match (random, stream) {
        (Outcome::Ok(a), Ok(b)) => {
            if a != b {
                let i = a.iter().zip(b.iter()).position(|(x, y)| x != y);
                panic!(
                    "stream and file readers disagree on the content (sizes {} and {}, first difference at {i:?})",
                    a.len(),
                    b.len()
                );
            }
        }
        (Outcome::Open(e) | Outcome::Read(e), Err(s)) => {
            assert_eq!(e.kind(), s.kind(), "file reader says {e}; stream says {s}")
        }
        (Outcome::Open(e) | Outcome::Read(e), Ok(_)) => {
            panic!("the stream accepts an image the file reader refuses ({e})")
        }
        (Outcome::Ok(_), Err(s)) if trusted && s.kind() == ErrorKind::Denied => {}
        (Outcome::Ok(_), Err(s)) => {
            panic!("the stream refuses an image the file reader accepts ({s})")
        }
    }
}

fn qcow2_opts() -> OpenOptions {
    OpenOptions {
        format: Some(Format::Qcow2),
        ..OpenOptions::default()
    }
}

/// Open `bytes` as qcow2 in memory and read all of it.
fn outcome(bytes: Vec<u8>) -> Outcome {
    outcome_with(bytes, qcow2_opts())
}

/// Also through the default path (format detection), which must agree.
fn detected(bytes: Vec<u8>) -> Outcome {
    outcome_with(bytes, OpenOptions::default())
}

fn check_error(e: &Error, kind: ErrorKind, needle: &str) {
    assert_eq!(e.kind(), kind, "wrong kind for error: {e}");
    assert!(
        e.to_string()
            .to_lowercase()
            .contains(&needle.to_lowercase()),
        "error {e:?} does not mention {needle:?}"
    );
}

/// Opening must fail with `kind` and a message containing `needle`.
fn open_fails(bytes: Vec<u8>, kind: ErrorKind, needle: &str) {
    match outcome(bytes.clone()) {
        Outcome::Open(e) => check_error(&e, kind, needle),
        other => panic!("expected opening to fail with {kind:?} ({needle}), got {other:?}"),
    }
    // Detection sees the qcow2 magic too and must give the same answer.
    if bytes.len() >= 8 && bytes[..4] == *b"QFI\xfb" && bytes[4..8] != [0, 0, 0, 1] {
        match detected(bytes) {
            Outcome::Open(e) => check_error(&e, kind, needle),
            other => panic!("detected open should fail like the forced one, got {other:?}"),
        }
    }
}

/// Opening must work, and reading the disk fail with `kind` and `needle`.
fn read_fails(bytes: Vec<u8>, kind: ErrorKind, needle: &str) {
    match outcome(bytes) {
        Outcome::Read(e) => check_error(&e, kind, needle),
        other => panic!("expected reading to fail with {kind:?} ({needle}), got {other:?}"),
    }
}

/// The CLI binary under test.
fn vdisk() -> &'static str {
    env!("CARGO_BIN_EXE_vdisk")
}

/// `/usr/bin/time`, needed to measure peak RSS. Missing is a setup error, not a skip.
fn time_bin() -> &'static Path {
    let p = Path::new("/usr/bin/time");
    assert!(
        p.exists(),
        "/usr/bin/time is missing: install the 'time' package (scripts/deps.sh does)"
    );
    p
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    peak_kib: u64,
}

/// Run the CLI with `args` under `/usr/bin/time -f %M`, killing it if it hangs; asserts the
/// peak RSS stays under [`MAX_RSS_KIB`].
fn cli(args: &[&OsStr]) -> Run {
    cli_with(args, true)
}

/// [`cli`], with standard output kept (`keep_stdout`) or discarded.
fn cli_with(args: &[&OsStr], keep_stdout: bool) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let rss = dir.path().join("rss");
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let stdout = if keep_stdout {
        Stdio::from(std::fs::File::create(&out).unwrap())
    } else {
        Stdio::null()
    };
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(time_bin())
        // Its own process group, so a hung CLI (time's child) can be ended with it.
        .process_group(0)
        .arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(&rss)
        .arg(vdisk())
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("cannot run the CLI");
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > HANG {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
            panic!("vdisk {args:?} still running after {HANG:?} (a loop, or a blocking open)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = std::fs::read_to_string(&out).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err).unwrap();
    let rss_text = std::fs::read_to_string(&rss).unwrap();
    // time writes "Command exited with non-zero status N" before the value on failure.
    let peak_kib: u64 = rss_text
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("cannot parse /usr/bin/time output {rss_text:?}"));
    assert!(
        peak_kib < MAX_RSS_KIB,
        "vdisk {args:?} peaked at {peak_kib} KiB (limit {MAX_RSS_KIB} KiB); stderr: {stderr}"
    );
    Run {
        code: status.code(),
        stdout,
        stderr,
        peak_kib,
    }
}

fn os<S: AsRef<OsStr> + ?Sized>(s: &S) -> &OsStr {
    s.as_ref()
}

/// Which stage of the CLI must fail.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stage {
    /// `info` and `convert` both refuse the image.
    Open,
    /// `info` (metadata only) works; `convert` fails while reading.
    Read,
}

/// Assert a CLI failure: nonzero exit, one `vdisk: FILE: ...` line naming `file` and `needle`.
fn assert_cli_error(r: &Run, file: &Path, needle: &str, what: &str) {
    assert_eq!(r.code, Some(1), "{what}: exit code; stderr: {}", r.stderr);
    let err = r.stderr.to_lowercase();
    assert!(
        r.stderr.contains(&file.display().to_string()),
        "{what}: message does not name {}: {}",
        file.display(),
        r.stderr
    );
    assert!(
        err.contains(&needle.to_lowercase()),
        "{what}: message does not mention {needle:?}: {}",
        r.stderr
    );
    assert!(r.stderr.starts_with("vdisk: "), "{what}: {}", r.stderr);
    assert!(!err.contains("panicked"), "{what}: {}", r.stderr);
}

/// Convert `src` with the CLI (extra `flags` first); must fail naming `src` and `needle`, and
/// leave nothing in the target directory.
fn cli_convert_fails(src: &Path, flags: &[&str], needle: &str) -> Run {
    cli_convert_fails_naming(src, flags, needle, src)
}

/// Like [`cli_convert_fails`], for errors found in another file of a chain: the message must
/// name `named` (a file or the directory of the chain).
fn cli_convert_fails_naming(src: &Path, flags: &[&str], needle: &str, named: &Path) -> Run {
    let out = tempfile::tempdir().unwrap();
    let dst = out.path().join("out.raw");
    let mut args: Vec<&OsStr> = vec![os("convert")];
    args.extend(flags.iter().map(os));
    args.extend([os("-O"), os("raw"), src.as_os_str(), dst.as_os_str()]);
    let r = cli(&args);
    assert_cli_error(&r, named, needle, "convert");
    assert!(!dst.exists(), "a failed convert left {}", dst.display());
    let left: Vec<_> = std::fs::read_dir(out.path()).unwrap().collect();
    assert!(left.is_empty(), "a failed convert left files: {left:?}");
    r
}

/// Write `bytes` to a file and check the CLI refuses it at `stage`.
fn cli_fails(bytes: &[u8], stage: Stage, needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("bad.qcow2");
    std::fs::write(&src, bytes).unwrap();
    let r = cli(&[os("info"), os("-f"), os("qcow2"), src.as_os_str()]);
    match stage {
        Stage::Open => assert_cli_error(&r, &src, needle, "info"),
        Stage::Read => assert_eq!(r.code, Some(0), "info should work: {}", r.stderr),
    }
    cli_convert_fails(&src, &["-f", "qcow2"], needle);
}

/// Both library (in memory) and CLI (file) refuse the image when opening.
fn rejected(q: &Q, kind: ErrorKind, needle: &str) {
    let b = q.build();
    open_fails(b.clone(), kind, needle);
    cli_fails(&b, Stage::Open, needle);
}

/// Both library and CLI open the image and fail while reading it.
fn rejected_on_read(q: &Q, kind: ErrorKind, needle: &str) {
    let b = q.build();
    read_fails(b.clone(), kind, needle);
    cli_fails(&b, Stage::Read, needle);
}

fn qemu_img(args: &[&OsStr]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is needed (scripts/deps.sh installs qemu-utils)");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu_io(file: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.arg("-f").arg("qcow2");
    for k in cmds {
        c.arg("-c").arg(k);
    }
    let out = c.arg(file).output().expect("qemu-io is needed");
    assert!(
        out.status.success(),
        "qemu-io {cmds:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// The builder itself.

#[test]
fn builder_makes_a_valid_image() {
    let b = Q::new().build();
    // qemu-img agrees the base image is consistent, so each test breaks exactly one thing.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ok.qcow2");
    std::fs::write(&p, &b).unwrap();
    qemu_img(&[os("check"), os("-f"), os("qcow2"), p.as_os_str()]);
    let data = outcome(b.clone()).data();
    assert_eq!(data.len(), 1 << 20);
    let c = 1usize << 16;
    assert!((0..c).all(|i| data[i] == pattern(i)), "data cluster");
    assert!(data[c..].iter().all(|&x| x == 0));
    // The CLI converts it to what qemu-img converts it to.
    let q = dir.path().join("q.raw");
    qemu_to_raw(&p, &q);
    let v = dir.path().join("v.raw");
    let r = cli(&[
        os("convert"),
        os("-O"),
        os("raw"),
        p.as_os_str(),
        v.as_os_str(),
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(std::fs::read(&v).unwrap(), std::fs::read(&q).unwrap());
    assert_eq!(std::fs::read(&v).unwrap(), data);
    // A v2 image (no zero clusters there), a 512-byte-cluster image and one with a snapshot
    // are valid too.
    let mut v2 = Q::new().v2();
    v2.l2.truncate(1);
    assert_eq!(outcome(v2.build()).data(), data);
    let small = outcome(Q::with_bits(9).build()).data();
    assert!((0..512).all(|i| small[i] == pattern(i)));
    let mut s = Q::new();
    s.snapshots_offset = 6 << 16;
    s.snaps = vec![Snap::new(3 << 16, 1 << 20)];
    let snap = OpenOptions {
        snapshot: Some("snap".into()),
        ..qcow2_opts()
    };
    assert_eq!(outcome_with(s.build(), snap).data(), data);
}

// ---------------------------------------------------------------------------------------------
// Header fields.

#[test]
fn bad_magic() {
    let b = Q::new().patch(0, b"QFI\xfa").build();
    open_fails(b.clone(), ErrorKind::UnsupportedFormat, "magic");
    cli_fails(&b, Stage::Open, "magic");
    // Without a format, the same bytes are (correctly) just a raw disk.
    let data = detected(b.clone()).data();
    assert_eq!(data.len(), b.len().div_ceil(512) * 512);
}

#[test]
fn bad_versions() {
    let mut q = Q::new();
    q.version = 1;
    rejected(&q, ErrorKind::UnsupportedFormat, "version 1");
    // Detection recognises qcow1 and refuses it as a format of its own.
    match detected(q.build()) {
        Outcome::Open(e) => check_error(&e, ErrorKind::UnsupportedFormat, "qcow"),
        other => panic!("{other:?}"),
    }
    for v in [0, 4, u32::MAX] {
        q.version = v;
        rejected(&q, ErrorKind::UnsupportedFeature, &format!("version {v}"));
    }
}

#[test]
fn cluster_bits_8_and_22() {
    for bits in [0, 8, 22, 63, u32::MAX] {
        let q = Q::new().patch(20, &u32::to_be_bytes(bits));
        rejected(&q, ErrorKind::Corrupt, "cluster size");
    }
}

#[test]
fn header_length_below_104() {
    for len in [0, 72, 96, 100] {
        let mut q = Q::new();
        q.header_length = len;
        q.exts.clear();
        rejected(&q, ErrorKind::Corrupt, "header too short");
    }
}

#[test]
fn header_length_above_cluster() {
    let q = Q::new().patch(100, &u32::to_be_bytes(65536 + 8));
    rejected(&q, ErrorKind::Corrupt, "exceeds the cluster size");
    let q = Q::with_bits(9).patch(100, &u32::to_be_bytes(520));
    rejected(&q, ErrorKind::Corrupt, "exceeds the cluster size");
    let q = Q::new().patch(100, &u32::MAX.to_be_bytes());
    rejected(&q, ErrorKind::Corrupt, "exceeds the cluster size");
}

#[test]
fn header_length_not_multiple_of_8() {
    let q = Q::new().patch(100, &u32::to_be_bytes(108));
    rejected(&q, ErrorKind::Corrupt, "multiple of 8");
}

#[test]
fn extension_past_the_area() {
    // Runs past the end of cluster 0.
    let q = Q::new().patch(112, &[0xe2, 0x79, 0x2a, 0xca, 0, 1, 0, 0]);
    rejected(&q, ErrorKind::Corrupt, "too large");
    // Longer than u32 arithmetic likes.
    let q = Q::new().patch(112, &[0x12, 0x34, 0x56, 0x78, 0xff, 0xff, 0xff, 0xff]);
    rejected(&q, ErrorKind::Corrupt, "too large");
    // Runs into the backing file name (the area ends at backing_file_offset).
    let mut q = Q::new().ext(EXT_BACKING_FORMAT, b"qcow2");
    q.backing = Some(b"base.qcow2".to_vec());
    q.backing_offset = Some(120);
    rejected(&q, ErrorKind::Corrupt, "too large");
}

#[test]
fn duplicate_extensions() {
    let q = Q::new()
        .ext(EXT_BACKING_FORMAT, b"raw")
        .ext(EXT_BACKING_FORMAT, b"qcow2");
    rejected(&q, ErrorKind::Corrupt, "duplicate");
    let q = Q::new()
        .ext(0x1234_5678, b"unknown but tolerated")
        .ext(0x1234_5678, b"twice is not");
    rejected(&q, ErrorKind::Corrupt, "duplicate");
}

#[test]
fn backing_format_name_too_long() {
    let q = Q::new().ext(EXT_BACKING_FORMAT, b"qcow2qcow2qcow2q");
    rejected(&q, ErrorKind::Corrupt, "backing format");
}

#[test]
fn backing_file_offset_past_cluster() {
    let mut q = Q::new();
    q.backing = Some(b"base.qcow2".to_vec());
    q.backing_offset = Some(65537);
    rejected(&q, ErrorKind::Corrupt, "backing file offset");
    q.backing_offset = Some(u64::MAX);
    rejected(&q, ErrorKind::Corrupt, "backing file offset");
}

#[test]
fn backing_file_name_too_long() {
    let mut q = Q::new();
    q.backing = Some(vec![b'a'; 1024]);
    rejected(&q, ErrorKind::Corrupt, "too long");
    // Fits the spec's 1023 bytes but not the rest of the cluster.
    let mut q = Q::with_bits(9);
    q.backing = Some(vec![b'a'; 100]);
    q.backing_offset = Some(480);
    rejected(&q, ErrorKind::Corrupt, "too long");
    let mut q = Q::new();
    q.backing = Some(b"x".to_vec());
    q.backing_size = Some(u32::MAX);
    rejected(&q, ErrorKind::Corrupt, "too long");
}

#[test]
fn unknown_incompatible_bit_is_named() {
    let mut q = Q::new();
    q.incompat = 1 << 5;
    rejected(&q, ErrorKind::UnsupportedFeature, "bit 5");
    q.incompat = 1 << 63 | 1 << 40;
    rejected(&q, ErrorKind::UnsupportedFeature, "bit 40");
    rejected(&q, ErrorKind::UnsupportedFeature, "bit 63");
    // With a feature name table, the name from the table.
    let mut table = vec![0u8; 96];
    table[1] = 5;
    table[2..2 + 13].copy_from_slice(b"shiny feature");
    table[48] = 1; // a compatible bit 5: must not be the name used
    table[49] = 5;
    table[50..50 + 5].copy_from_slice(b"wrong");
    let mut q = Q::new().ext(EXT_FEATURE_TABLE, &table);
    q.incompat = 1 << 5;
    rejected(&q, ErrorKind::UnsupportedFeature, "shiny feature");
    let e = match outcome(q.build()) {
        Outcome::Open(e) => e,
        other => panic!("{other:?}"),
    };
    assert!(!e.to_string().contains("wrong"), "{e}");
}

#[test]
fn compression_type_inconsistent() {
    // Bit set, type zlib.
    let mut q = Q::new();
    q.incompat = INCOMPAT_COMPRESSION;
    rejected(&q, ErrorKind::Corrupt, "compression type");
    // Type zstd, bit clear.
    let mut q = Q::new();
    q.compression_type = 1;
    rejected(&q, ErrorKind::Corrupt, "compression type");
    // Unknown type 2 with the bit.
    let mut q = Q::new();
    q.compression_type = 2;
    q.incompat = INCOMPAT_COMPRESSION;
    rejected(&q, ErrorKind::UnsupportedFeature, "compression type 2");
    // Unknown type without the bit.
    let mut q = Q::new();
    q.compression_type = 0xff;
    rejected(&q, ErrorKind::Corrupt, "compression type 255");
    // Bit set but the header is too short to hold the type.
    let mut q = Q::new();
    q.header_length = 104;
    q.incompat = INCOMPAT_COMPRESSION;
    rejected(&q, ErrorKind::Corrupt, "compression type");
}

#[test]
fn refcount_order_7() {
    for order in [7, 64, u32::MAX] {
        let mut q = Q::new();
        q.refcount_order = order;
        rejected(&q, ErrorKind::Corrupt, "refcount width");
    }
}

#[test]
fn encrypted_images_refused() {
    for (m, name) in [(1, "AES"), (2, "LUKS")] {
        let mut q = Q::new();
        q.crypt = m;
        rejected(&q, ErrorKind::UnsupportedFeature, name);
    }
}

// ---------------------------------------------------------------------------------------------
// Refcount table.

#[test]
fn refcount_table_zero_clusters() {
    let mut q = Q::new();
    q.rt_clusters = 0;
    rejected(&q, ErrorKind::Corrupt, "reference count table");
}

#[test]
fn refcount_table_too_large() {
    let mut q = Q::new();
    q.rt_clusters = 129; // 129 * 64 KiB > 8 MiB
    rejected(&q, ErrorKind::TooLarge, "reference count table");
    q.rt_clusters = u32::MAX;
    rejected(&q, ErrorKind::TooLarge, "reference count table");
    let mut q = Q::with_bits(21);
    q.rt_clusters = 5; // 10 MiB
    open_fails(q.build(), ErrorKind::TooLarge, "reference count table");
}

#[test]
fn refcount_table_unaligned() {
    let mut q = Q::new();
    q.rt_offset = 65536 + 512;
    rejected(&q, ErrorKind::Corrupt, "not cluster aligned");
}

#[test]
fn refcount_table_overflowing() {
    let mut q = Q::new();
    q.rt_offset = !0xffff_u64;
    rejected(&q, ErrorKind::Corrupt, "overflows");
    q.rt_offset = 1 << 63;
    rejected(&q, ErrorKind::Corrupt, "overflows");
}

// ---------------------------------------------------------------------------------------------
// L1 table (header fields).

#[test]
fn l1_size_too_big() {
    let mut q = Q::new();
    q.l1_size = (32 << 20) / 8 + 1;
    rejected(&q, ErrorKind::TooLarge, "L1 table too large");
    q.l1_size = u32::MAX;
    rejected(&q, ErrorKind::TooLarge, "L1 table too large");
}

#[test]
fn l1_too_small_for_virtual_size() {
    let mut q = Q::new();
    q.size = (512 << 20) + 512; // needs two L1 entries with 64 KiB clusters
    rejected(&q, ErrorKind::Corrupt, "L1 table is too small");
    let mut q = Q::new();
    q.l1_size = 0;
    q.l1.clear();
    rejected(&q, ErrorKind::Corrupt, "L1 table is too small");
}

#[test]
fn huge_virtual_size() {
    for size in [u64::MAX, 1 << 63, 1 << 62] {
        let mut q = Q::new();
        q.size = size;
        rejected(&q, ErrorKind::TooLarge, "too big");
    }
    // With 512-byte clusters 32 MiB of L1 maps 128 GiB; one byte more is too much.
    let mut q = Q::with_bits(9);
    q.size = (128 << 30) + 512;
    q.l1_size = 4 << 20;
    rejected(&q, ErrorKind::TooLarge, "too big");
}

#[test]
fn l1_offset_unaligned() {
    let mut q = Q::new();
    q.l1_offset = 3 * 65536 + 8;
    rejected(&q, ErrorKind::Corrupt, "not cluster aligned");
}

#[test]
fn l1_offset_past_eof() {
    let mut q = Q::new();
    q.l1_offset = 64 * 65536;
    q.len = Some(6 * 65536);
    rejected(&q, ErrorKind::Corrupt, "past end of file");
    // Starts inside the file, ends past it.
    let mut q = Q::new();
    q.l1_offset = 5 * 65536;
    q.l1_size = 8192 + 1;
    q.size = 4 << 30;
    q.len = Some(6 * 65536);
    rejected(&q, ErrorKind::Corrupt, "past end of file");
}

#[test]
fn l1_offset_overflow() {
    let mut q = Q::new();
    q.l1_offset = !0xffff_u64;
    q.len = Some(6 * 65536);
    rejected(&q, ErrorKind::Corrupt, "overflows");
    q.l1_offset = (i64::MAX as u64 + 1) - 65536;
    q.l1_size = 8193;
    rejected(&q, ErrorKind::Corrupt, "overflows");
}

// ---------------------------------------------------------------------------------------------
// Table entries (found while reading).

#[test]
fn l1_entry_reserved_bits() {
    for bits in [1u64 << 56, 1 << 62, 0x1ff, 1] {
        let mut q = Q::new();
        q.l1[0] |= bits;
        rejected_on_read(&q, ErrorKind::Corrupt, "reserved bits");
    }
}

#[test]
fn l2_offset_unaligned() {
    let mut q = Q::new();
    q.l1[0] = COPIED | (4 * 65536 + 512);
    rejected_on_read(&q, ErrorKind::Corrupt, "not cluster aligned");
}

#[test]
fn l2_offset_past_eof() {
    let mut q = Q::new();
    q.l1[0] = COPIED | (100 * 65536);
    rejected_on_read(&q, ErrorKind::Corrupt, "past end of file");
    q.l1[0] = COPIED | 0x00ff_ffff_ffff_0000;
    rejected_on_read(&q, ErrorKind::Corrupt, "past end of file");
}

#[test]
fn l2_offset_into_the_header() {
    // A pointer into cluster 0: the header is never an L2 table.
    let mut q = Q::new();
    q.l1[0] = COPIED | 0x200;
    rejected_on_read(&q, ErrorKind::Corrupt, "L2 table offset 0x200");
    // Offset 0 means unallocated, even with flags set: reads as zeros (as in qemu).
    let mut q = Q::new();
    q.l1[0] = COPIED;
    let d = outcome(q.build()).data();
    assert!(d.iter().all(|&x| x == 0));
}

#[test]
fn l2_entry_reserved_bits() {
    for bits in [1u64 << 56, 1 << 61, 0x2, 0x100] {
        let mut q = Q::new();
        q.l2[0] |= bits;
        rejected_on_read(&q, ErrorKind::Corrupt, "reserved bits");
    }
    // On a zero cluster too.
    let mut q = Q::new();
    q.l2[1] |= 1 << 60;
    rejected_on_read(&q, ErrorKind::Corrupt, "reserved bits");
}

#[test]
fn data_offset_unaligned() {
    let mut q = Q::new();
    q.l2[0] = COPIED | (5 * 65536 + 512);
    rejected_on_read(&q, ErrorKind::Corrupt, "not cluster aligned");
    // Pointing into the header cluster.
    let mut q = Q::new();
    q.l2[0] = COPIED | 0x200;
    rejected_on_read(&q, ErrorKind::Corrupt, "not cluster aligned");
}

#[test]
fn data_past_eof_reads_as_zeros() {
    // qemu reads past the end of the file as zeros (short last clusters are normal).
    let mut q = Q::new();
    q.len = Some(5 * 65536 + 100);
    let d = outcome(q.build()).data();
    assert!((0..100).all(|i| d[i] == pattern(i)));
    assert!(d[100..].iter().all(|&x| x == 0));
}

/// A compressed L2 entry for 64 KiB clusters: host byte offset and extra sectors.
fn compressed_entry(host: u64, nsect: u64) -> u64 {
    COMPRESSED | nsect << 54 | host
}

#[test]
fn compressed_cluster_garbage() {
    let mut q = Q::new().patch(5 * 65536 + 7, &[0xffu8; 1000]);
    q.l2[0] = compressed_entry(5 * 65536 + 7, 1);
    rejected_on_read(&q, ErrorKind::Corrupt, "decompress");
    // zstd: not a frame.
    q.incompat = INCOMPAT_COMPRESSION;
    q.compression_type = 1;
    rejected_on_read(&q, ErrorKind::Corrupt, "decompress");
    // Valid deflate of too little data: not silently zero-filled.
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut enc, &[1u8; 1000]).unwrap();
    let z = enc.finish().unwrap();
    let mut q = Q::new().patch(5 * 65536, &z);
    q.l2[0] = compressed_entry(5 * 65536, (z.len() as u64).div_ceil(512) - 1);
    rejected_on_read(&q, ErrorKind::Corrupt, "decompress");
}

#[test]
fn compressed_cluster_good_one_reads() {
    // The control for the cases above: a valid deflate cluster at an odd offset reads back.
    let data: Vec<u8> = (0..65536).map(pattern).collect();
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut enc, &data).unwrap();
    let z = enc.finish().unwrap();
    let host = 5 * 65536 + 13;
    let mut q = Q::new().patch(host, &z);
    q.l2[0] = compressed_entry(host, ((host + z.len() as u64 - 1) >> 9) - (host >> 9));
    let d = outcome(q.build()).data();
    assert_eq!(&d[..65536], &data[..]);
}

#[test]
fn compressed_cluster_past_eof() {
    let mut q = Q::new();
    q.l2[0] = compressed_entry(1 << 40, 0);
    rejected_on_read(&q, ErrorKind::Corrupt, "past end of file");
    // The largest offset the descriptor can hold.
    q.l2[0] = compressed_entry((1 << 54) - 1, 255);
    rejected_on_read(&q, ErrorKind::Corrupt, "past end of file");
    // Starting inside the file, running past its end: the stream is cut short.
    let mut q = Q::new();
    q.l2[0] = compressed_entry(6 * 65536 - 100, 255);
    rejected_on_read(&q, ErrorKind::Corrupt, "decompress");
}

#[test]
fn compressed_entry_with_external_data_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("data.raw"), vec![0u8; 1 << 20]).unwrap();
    let mut q = Q::new().ext(EXT_DATA_FILE, b"data.raw");
    q.incompat = 1 << 2;
    q.l2[0] = compressed_entry(5 * 65536, 0);
    let p = dir.path().join("df.qcow2");
    std::fs::write(&p, q.build()).unwrap();
    let e = deadline("data file image", {
        let p = p.clone();
        move || {
            let img = Image::open(&p, &OpenOptions::default())?;
            read_everything(&img).map(|_| ())
        }
    })
    .unwrap_err();
    check_error(&e, ErrorKind::Corrupt, "external data file");
    assert_eq!(e.path(), Some(p.as_path()), "{e}");
    cli_convert_fails(&p, &[], "external data file");
}

#[test]
fn zero_flag_in_v2_image() {
    let q = Q::new().v2();
    // The base image's cluster 1 has the zero flag.
    rejected_on_read(&q, ErrorKind::Corrupt, "pre-v3");
}

/// An extended-L2 image (16 KiB clusters): cluster 0 fully allocated at cluster 5.
fn ext_l2() -> Q {
    let mut q = Q::with_bits(14);
    q.incompat = INCOMPAT_EXTENDED_L2;
    q.l2 = vec![COPIED | (5 << 14), 0xffff_ffff];
    q
}

#[test]
fn extended_l2_valid_control() {
    let d = outcome(ext_l2().build()).data();
    assert!((0..16384).all(|i| d[i] == pattern(i)));
    // Half allocated, half zero: valid.
    let mut q = ext_l2();
    q.l2[1] = 0xffff_0000_0000_ffff;
    let d = outcome(q.build()).data();
    assert!((0..8192).all(|i| d[i] == pattern(i)));
    assert!(d[8192..].iter().all(|&x| x == 0));
}

#[test]
fn extended_l2_invalid_bitmaps() {
    // Allocated and zero at once.
    let mut q = ext_l2();
    q.l2[1] = 0x0000_0001_0000_0001;
    rejected_on_read(&q, ErrorKind::Corrupt, "both allocated and zero");
    // Allocated subclusters without a host cluster.
    let mut q = ext_l2();
    q.l2 = vec![0, 0x0000_0000_0000_0100];
    rejected_on_read(&q, ErrorKind::Corrupt, "unallocated");
    // Extended L2 with clusters under 16 KiB (subclusters under 512 bytes).
    let mut q = Q::with_bits(13);
    q.incompat = INCOMPAT_EXTENDED_L2;
    rejected(&q, ErrorKind::Corrupt, "extended L2");
    // Bit 0 of an extended entry's descriptor is unused: qemu ignores it, and so do we (the
    // cluster still reads as its data, not as zeros).
    let plain = ext_l2();
    let mut q = ext_l2();
    q.l2[0] |= ZERO;
    let read = |q: &Q| {
        let img = Image::from_io(Arc::new(MemIo::new(q.build())), &OpenOptions::default()).unwrap();
        let mut b = vec![0u8; 16384];
        img.read_at(&mut b, 0).unwrap();
        b
    };
    assert_eq!(read(&q), read(&plain));
}

#[test]
fn extended_l2_compressed_entry_with_bitmap() {
    // Compressed entries have no subclusters: their bitmap is reserved and must be 0.
    let mut q = ext_l2();
    q.l2 = vec![COMPRESSED | (5 << 14), 1];
    rejected_on_read(&q, ErrorKind::Corrupt, "bitmap");
}

// ---------------------------------------------------------------------------------------------
// Snapshots.

fn with_snapshot(s: Snap) -> Q {
    let mut q = Q::new();
    q.snapshots_offset = 6 << 16;
    q.snaps = vec![s];
    q
}

#[test]
fn too_many_snapshots() {
    let mut q = with_snapshot(Snap::new(3 << 16, 1 << 20));
    q.nb_snapshots = Some(65537);
    rejected(&q, ErrorKind::TooLarge, "too many snapshots");
    q.nb_snapshots = Some(u32::MAX);
    rejected(&q, ErrorKind::TooLarge, "too many snapshots");
    // 65536 is allowed by the limit; the table must then really be there.
    q.nb_snapshots = Some(65536);
    rejected(&q, ErrorKind::Corrupt, "past end of file");
}

#[test]
fn snapshot_extra_data_too_large() {
    let mut s = Snap::new(3 << 16, 1 << 20);
    s.extra = vec![0u8; 1025];
    rejected(&with_snapshot(s.clone()), ErrorKind::TooLarge, "extra");
    s.extra = vec![0u8; 24];
    s.extra_len = Some(u32::MAX);
    rejected(&with_snapshot(s), ErrorKind::TooLarge, "extra");
}

#[test]
fn snapshot_extra_data_too_small_in_v3() {
    let mut s = Snap::new(3 << 16, 1 << 20);
    s.extra = vec![0u8; 8];
    rejected(
        &with_snapshot(s),
        ErrorKind::Corrupt,
        "too little extra data",
    );
}

#[test]
fn snapshot_table_past_eof() {
    let mut s = Snap::new(3 << 16, 1 << 20);
    s.name = vec![b'n'; 60000];
    let mut q = with_snapshot(s);
    q.len = Some((6 << 16) + 1000);
    rejected(&q, ErrorKind::Corrupt, "past end of file");
    let mut q = with_snapshot(Snap::new(3 << 16, 1 << 20));
    q.snapshots_offset = !0xffff_u64;
    rejected(&q, ErrorKind::Corrupt, "overflows");
    q.snapshots_offset = (6 << 16) + 8;
    rejected(&q, ErrorKind::Corrupt, "not cluster aligned");
}

/// An image whose snapshot table holds entries of 1024 + 2 * 65535 bytes of variable data
/// each, enough of them to pass qemu's 64 MiB table limit. Returns the image bytes; most of
/// them are zeros (the file written from them is sparse).
fn huge_snapshot_table() -> Vec<u8> {
    let mut q = Q::new();
    let base = 6u64 << 16;
    q.snapshots_offset = base;
    let mut s = Snap::new(3 << 16, 1 << 20);
    s.extra = vec![0u8; 1024];
    s.id = vec![b'i'; 65535];
    s.name = vec![b'n'; 65535];
    let entry = s.bytes();
    let n = (64u64 << 20) / entry.len() as u64 + 2;
    q.nb_snapshots = Some(n as u32);
    let mut b = q.build();
    let end = base + n * entry.len() as u64;
    b.resize(end as usize, 0);
    for k in 0..n {
        let off = (base + k * entry.len() as u64) as usize;
        // Only the fixed part needs writing: the rest is zeros, which is valid data.
        b[off..off + 40].copy_from_slice(&entry[..40]);
    }
    b
}

#[test]
fn snapshot_table_too_big() {
    let b = huge_snapshot_table();
    open_fails(b.clone(), ErrorKind::TooLarge, "snapshot table is too big");
    // As a sparse file for the CLI: only the entry headers are written.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("snaps.qcow2");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(b.len() as u64).unwrap();
    drop(f);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        for (k, block) in b.chunks(4096).enumerate() {
            if block.iter().any(|&x| x != 0) {
                f.write_all_at(block, k as u64 * 4096).unwrap();
            }
        }
    }
    let r = cli(&[os("info"), p.as_os_str()]);
    assert_cli_error(&r, &p, "snapshot table is too big", "info");
    cli_convert_fails(&p, &[], "snapshot table is too big");
}

#[test]
fn snapshot_l1_too_big() {
    let mut s = Snap::new(3 << 16, 1 << 20);
    s.l1_size = (32 << 20) / 8 + 1;
    rejected(
        &with_snapshot(s.clone()),
        ErrorKind::TooLarge,
        "L1 table is too large",
    );
    s.l1_size = u32::MAX;
    rejected(
        &with_snapshot(s),
        ErrorKind::TooLarge,
        "L1 table is too large",
    );
}

#[test]
fn snapshot_l1_unaligned_or_past_eof() {
    let mut s = Snap::new(3 << 16, 1 << 20);
    s.l1_offset = (3 << 16) + 8;
    rejected(
        &with_snapshot(s.clone()),
        ErrorKind::Corrupt,
        "not cluster aligned",
    );
    s.l1_offset = !0xffff_u64;
    rejected(&with_snapshot(s.clone()), ErrorKind::Corrupt, "overflows");
    // Checked only when the snapshot is used: opening it fails.
    s.l1_offset = 1 << 40;
    let q = with_snapshot(s);
    let opts = OpenOptions {
        snapshot: Some("snap".into()),
        ..qcow2_opts()
    };
    match outcome_with(q.build(), opts) {
        Outcome::Open(e) => check_error(&e, ErrorKind::Corrupt, "past end of file"),
        other => panic!("{other:?}"),
    }
    // The active state still reads.
    assert_eq!(outcome(q.build()).data(), outcome(Q::new().build()).data());
}

#[test]
fn snapshot_with_absurd_disk_size() {
    // A snapshot is read with the image's own virtual size (as qemu-img convert -l does), so
    // whatever disk size its extra data records changes nothing: no loop, no overflow.
    let want = outcome(Q::new().build()).data();
    for size in [u64::MAX, 1 << 62, (1 << 55) + 1, 0] {
        let q = with_snapshot(Snap::new(3 << 16, size));
        let opts = OpenOptions {
            snapshot: Some("1".into()),
            ..qcow2_opts()
        };
        assert_eq!(
            outcome_with(q.build(), opts).data(),
            want,
            "disk size {size}"
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("snap.qcow2");
        std::fs::write(&p, q.build()).unwrap();
        let r = cli(&[os("info"), os("--output=json"), p.as_os_str()]);
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        assert!(
            r.stdout.contains("\"virtual-size\": 1048576"),
            "{}",
            r.stdout
        );
    }
}

#[test]
fn missing_snapshot_is_not_found() {
    let q = with_snapshot(Snap::new(3 << 16, 1 << 20));
    let opts = OpenOptions {
        snapshot: Some("nope".into()),
        ..qcow2_opts()
    };
    match outcome_with(q.build(), opts) {
        Outcome::Open(e) => check_error(&e, ErrorKind::NotFound, "nope"),
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Reference loops and aliasing: must terminate, with the bytes qemu would read.

#[test]
fn l2_table_pointing_at_itself() {
    let mut q = Q::new();
    q.l2[0] = COPIED | (4 << 16); // the L2 table's own cluster as data
    q.l2.push(COPIED | (4 << 16));
    let b = q.build();
    // qemu reads the table's bytes as data; we refuse data aliasing the tables that map it
    // (deliberately: no writer makes it, and a stream could not read it back).
    read_fails(b.clone(), ErrorKind::Corrupt, "metadata aliasing");
    cli_fails(&b, Stage::Read, "metadata aliasing");
    qemu_accepts(&b);
}

#[test]
fn l2_table_is_the_l1_table() {
    // L1[0] points at the L1 itself: its entries are read as L2 entries, so guest cluster 0 is
    // the L1 table (entry COPIED | (3 << 16)).
    let mut q = Q::new();
    q.l1 = vec![COPIED | (3 << 16)];
    let b = q.build();
    read_fails(b.clone(), ErrorKind::Corrupt, "metadata aliasing");
    cli_fails(&b, Stage::Read, "metadata aliasing");
    qemu_accepts(&b);
}

#[test]
fn many_l1_entries_sharing_one_l2_table() {
    // 4096 L1 entries all pointing at one L2 table: 2 TiB of guest that maps one cluster
    // over and over. Block status and a bounded read work and stay quick.
    let mut q = Q::new();
    q.size = 2 << 40;
    q.l1_size = 4096;
    q.l1 = vec![COPIED | (4 << 16); 4096];
    let b = q.build();
    let r = deadline("aliased L2", move || {
        let img = Image::from_io(Arc::new(MemIo::new(b)), &qcow2_opts()).unwrap();
        let last = (2u64 << 40) - (512 << 20);
        let e = img.extent(last, 1 << 20).unwrap();
        let mut buf = vec![0u8; 100];
        img.read_at(&mut buf, last).unwrap();
        let list = vdisk::info::map_extents(&img).unwrap();
        (e.offset, buf, list.len())
    });
    assert_eq!(r.0, Some(5 << 16));
    assert!(r.1.iter().enumerate().all(|(i, &x)| x == pattern(i)));
    assert_eq!(r.2, 3 * 4096);
}

/// 512-byte clusters, `n` L1 entries all pointing at one L2 table whose entries alternate
/// between data and unallocated: `64 * n` extents from a file of a few KiB plus `8 * n`.
fn many_extents(n: u32) -> Q {
    let mut q = Q::with_bits(9);
    q.size = u64::from(n) * 64 * 512;
    q.l1_size = n;
    q.l1_offset = 8 * 512;
    q.l1 = vec![COPIED | (4 * 512); n as usize];
    q.l2 = (0..64)
        .map(|k| if k % 2 == 0 { COPIED | (5 * 512) } else { 0 })
        .collect();
    q
}

#[test]
fn map_streams_millions_of_extents() {
    let dir = tempfile::tempdir().unwrap();
    // Small: byte for byte what qemu-img map prints.
    let p = dir.path().join("few.qcow2");
    std::fs::write(&p, many_extents(4).build()).unwrap();
    for fmt in ["json", "human"] {
        let out = Command::new("qemu-img")
            .args(["map", "-f", "qcow2", "--output", fmt])
            .arg(&p)
            .output()
            .unwrap();
        assert!(out.status.success());
        let r = cli(&[os("map"), os("--output"), os(fmt), p.as_os_str()]);
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        assert_eq!(
            r.stdout,
            String::from_utf8_lossy(&out.stdout),
            "map --output {fmt}"
        );
    }
    // A million extents from a 136 KiB file: the output is streamed, memory stays flat.
    let p = dir.path().join("many.qcow2");
    std::fs::write(&p, many_extents(16384).build()).unwrap();
    for fmt in ["json", "human"] {
        let r = cli_with(&[os("map"), os("--output"), os(fmt), p.as_os_str()], false);
        assert_eq!(r.code, Some(0), "{}", r.stderr);
    }
    // The library's streaming walk sees them all, in order.
    let b = many_extents(16384).build();
    let (n, end) = deadline("walking a million extents", move || {
        let img = Image::from_io(Arc::new(MemIo::new(b)), &qcow2_opts()).unwrap();
        let (mut n, mut end) = (0u64, 0u64);
        vdisk::info::for_each_map_extent(&img, |start, e| {
            assert_eq!(start, end);
            n += 1;
            end += e.len;
            Ok(())
        })
        .unwrap();
        (n, end)
    });
    assert_eq!((n, end), (64 * 16384, 16384 * 64 * 512));
}

/// The CLI converts `bytes` to the same raw image qemu-img does.
fn cli_matches_qemu(bytes: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("img.qcow2");
    std::fs::write(&p, bytes).unwrap();
    let (q, v) = (dir.path().join("q.raw"), dir.path().join("v.raw"));
    qemu_to_raw(&p, &q);
    let r = cli(&[
        os("convert"),
        os("-f"),
        os("qcow2"),
        os("-O"),
        os("raw"),
        p.as_os_str(),
        v.as_os_str(),
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        std::fs::read(&q).unwrap() == std::fs::read(&v).unwrap(),
        "vdisk and qemu-img disagree"
    );
}

// ---------------------------------------------------------------------------------------------
// Truncated qemu-made images.

/// A qemu-img image (64 KiB clusters, 4 MiB): header, reftable at 0x10000, refblock at
/// 0x20000, L1 at 0x30000, L2 at 0x40000, data at 0x50000 (guest 0) and 0x60000 (guest 1 MiB),
/// and a zero cluster at guest 2 MiB.
fn qemu_image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let p = dir.join("full.qcow2");
    qemu_img(&[
        os("create"),
        os("-q"),
        os("-f"),
        os("qcow2"),
        p.as_os_str(),
        os("4M"),
    ]);
    qemu_io(
        &p,
        &[
            "write -P 0xab 0 64k",
            "write -P 0xcd 1M 8k",
            "write -z 2M 64k",
        ],
    );
    let b = std::fs::read(&p).unwrap();
    assert_eq!(
        BigEndian::read_u64(&b[40..48]),
        0x30000,
        "qemu layout changed"
    );
    assert_eq!(BigEndian::read_u64(&b[0x30000..]), COPIED | 0x40000);
    assert_eq!(b.len(), 0x70000);
    (p, b)
}

#[test]
fn truncated_qemu_image() {
    let dir = tempfile::tempdir().unwrap();
    let (_, full) = qemu_image(dir.path());
    let c = 65536;
    // Metadata cut off: refused when opening.
    let open_cases: &[(usize, ErrorKind, &str)] = &[
        (0, ErrorKind::Corrupt, "too short"),
        (7, ErrorKind::Corrupt, "too short"),
        (71, ErrorKind::Corrupt, "too short"),
        (72, ErrorKind::Corrupt, "v3 header truncated"),
        (103, ErrorKind::Corrupt, "v3 header truncated"),
        (111, ErrorKind::Corrupt, "past end of file"),
        (511, ErrorKind::Corrupt, "past end of file"),
        (c - 1, ErrorKind::Corrupt, "past end of file"),
        (c + 8, ErrorKind::Corrupt, "past end of file"), // past the reftable's entry
        (2 * c + 16, ErrorKind::Corrupt, "past end of file"), // past the refblock's entries
        (3 * c, ErrorKind::Corrupt, "past end of file"),
        (3 * c + 4, ErrorKind::Corrupt, "past end of file"), // inside the L1 table
    ];
    for &(n, kind, needle) in open_cases {
        let b = full[..n].to_vec();
        match outcome(b.clone()) {
            Outcome::Open(e) => check_error(&e, kind, needle),
            other => panic!("cut at {n}: {other:?}"),
        }
        if n > 0 {
            cli_fails(&b, Stage::Open, needle);
        }
    }
    // An empty file is an empty raw disk when the format is not given (as for qemu-img).
    assert_eq!(detected(Vec::new()).data(), Vec::<u8>::new());
    let dir2 = tempfile::tempdir().unwrap();
    let p = dir2.path().join("empty.qcow2");
    std::fs::write(&p, b"").unwrap();
    let r = cli(&[os("info"), os("-f"), os("qcow2"), p.as_os_str()]);
    assert_cli_error(&r, &p, "too short", "info of an empty file");
    // L1 complete, L2 table missing: refused when reading.
    for n in [3 * c + 8, 4 * c - 1, 4 * c] {
        let b = full[..n].to_vec();
        read_fails(b.clone(), ErrorKind::Corrupt, "past end of file");
        cli_fails(&b, Stage::Read, "past end of file");
    }
    // Data clusters at 5c and 6c. One that starts past the end is refused (deliberately:
    // qemu-img reads it as zeros, which would turn a truncated download into a disk of
    // zeros); one cut short reads as zeros past the end, as qemu reads it.
    for n in [
        4 * c + 8,
        4 * c + 136,
        5 * c - 1,
        5 * c,
        5 * c + 1000,
        6 * c - 1,
        6 * c,
    ] {
        let b = full[..n].to_vec();
        read_fails(b.clone(), ErrorKind::Corrupt, "lies past end of file");
        cli_fails(&b, Stage::Read, "lies past end of file");
        qemu_accepts(&b);
    }
    for n in [6 * c + 10, 7 * c - 1] {
        let b = full[..n].to_vec();
        let d = outcome(b.clone()).data();
        assert_eq!(d.len(), 4 << 20);
        cli_matches_qemu(&b);
    }
}

/// qemu-img converts the image (where we refuse it deliberately; the README lists these).
fn qemu_accepts(bytes: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("img.qcow2");
    std::fs::write(&p, bytes).unwrap();
    qemu_to_raw(&p, &dir.path().join("q.raw"));
}

/// `qemu-img convert -f qcow2 -O raw`, which must succeed.
fn qemu_to_raw(src: &Path, dst: &Path) {
    qemu_img(&[
        os("convert"),
        os("-f"),
        os("qcow2"),
        os("-O"),
        os("raw"),
        src.as_os_str(),
        dst.as_os_str(),
    ]);
}

// ---------------------------------------------------------------------------------------------
// Backing chains and names, and the untrusted policy.

fn create(dir: &Path, name: &str, backing: Option<&str>) -> PathBuf {
    let p = dir.join(name);
    let mut args = vec![os("create"), os("-q"), os("-f"), os("qcow2")];
    if let Some(b) = backing {
        args.extend([os("-u"), os("-b"), os(b), os("-F"), os("qcow2")]);
    }
    args.extend([p.as_os_str(), os("1M")]);
    qemu_img(&args);
    p
}

fn rebase_unsafe(img: &Path, backing: &str) {
    qemu_img(&[
        os("rebase"),
        os("-u"),
        os("-f"),
        os("qcow2"),
        os("-b"),
        os(backing),
        os("-F"),
        os("qcow2"),
        img.as_os_str(),
    ]);
}

fn open_file(p: &Path, policy: Policy) -> vdisk::Result<usize> {
    let p = p.to_path_buf();
    deadline("opening an image file", move || {
        let img = Image::open(
            &p,
            &OpenOptions {
                policy,
                ..OpenOptions::default()
            },
        )?;
        read_everything(&img)?;
        let mut depth = 0;
        let mut cur = img.qcow2().and_then(|q| q.backing());
        while let Some(b) = cur {
            depth += 1;
            cur = b.qcow2().and_then(|q| q.backing());
        }
        Ok(depth)
    })
}

#[test]
fn backing_loop_two_images() {
    let dir = tempfile::tempdir().unwrap();
    let a = create(dir.path(), "a.qcow2", None);
    let _b = create(dir.path(), "b.qcow2", Some("a.qcow2"));
    rebase_unsafe(&a, "b.qcow2");
    let e = open_file(&a, Policy::Trusted).unwrap_err();
    check_error(&e, ErrorKind::Corrupt, "infinite loop");
    cli_convert_fails(&a, &[], "infinite loop");
    // Untrusted: refused before anything else is opened.
    let e = open_file(&a, Policy::Untrusted).unwrap_err();
    check_error(&e, ErrorKind::Denied, "backing file");
    cli_convert_fails(&a, &["--untrusted"], "backing file");
}

#[test]
fn backing_loop_self() {
    let dir = tempfile::tempdir().unwrap();
    let a = create(dir.path(), "a.qcow2", None);
    rebase_unsafe(&a, "a.qcow2");
    let e = open_file(&a, Policy::Trusted).unwrap_err();
    check_error(&e, ErrorKind::Corrupt, "infinite loop");
    // Through a different spelling of the same file.
    rebase_unsafe(
        &a,
        &format!(
            "../{}/a.qcow2",
            dir.path().file_name().unwrap().to_str().unwrap()
        ),
    );
    let e = open_file(&a, Policy::Trusted).unwrap_err();
    check_error(&e, ErrorKind::Corrupt, "infinite loop");
    cli_convert_fails_naming(&a, &[], "infinite loop", dir.path());
}

#[test]
fn backing_chain_depth_limit() {
    let dir = tempfile::tempdir().unwrap();
    // 16 images (depth 0..15) are allowed ...
    create(dir.path(), "c0.qcow2", None);
    qemu_io(&dir.path().join("c0.qcow2"), &["write -P 0x5e 0 4k"]);
    for k in 1..17 {
        let prev = format!("c{}.qcow2", k - 1);
        create(dir.path(), &format!("c{k}.qcow2"), Some(&prev));
    }
    let top = dir.path().join("c15.qcow2");
    assert_eq!(open_file(&top, Policy::Trusted).unwrap(), 15);
    let img = Image::open(&top, &OpenOptions::default()).unwrap();
    let mut b = [0u8; 16];
    img.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [0x5e; 16]);
    // ... 17 are not.
    let deep = dir.path().join("c16.qcow2");
    let e = open_file(&deep, Policy::Trusted).unwrap_err();
    check_error(&e, ErrorKind::TooLarge, "deeper than 16");
    // The message names the image whose backing file would be one too many.
    assert!(e.path().is_some_and(|p| p.starts_with(dir.path())), "{e}");
    cli_convert_fails_naming(&deep, &[], "deeper than 16", dir.path());
}

/// Names an image may store that must never be followed as given.
const HOSTILE_NAMES: [&str; 4] = [
    r#"json:{"file":{"driver":"file","filename":"/etc/passwd"}}"#,
    "nbd://127.0.0.1:1/export",
    "http://127.0.0.1:1/disk.img",
    "/etc/passwd",
];

fn backed_by(name: &str, fmt: &[u8]) -> Q {
    let mut q = Q::new().ext(EXT_BACKING_FORMAT, fmt);
    q.backing = Some(name.as_bytes().to_vec());
    q
}

fn data_file_named(name: &str) -> Q {
    let mut q = Q::new().ext(EXT_DATA_FILE, name.as_bytes());
    q.incompat = 1 << 2;
    q.l2 = vec![COPIED | (5 << 16)];
    q
}

/// Check the untrusted policy refuses `q`, which names `name` as its `what` ("backing file" or
/// "data file"): opening for data fails with kind Denied everywhere. Metadata-only opens
/// (`info`) report a plain name without opening it, and refuse protocol and `json:` names.
fn untrusted_refuses(q: &Q, what: &str, name: &str) {
    let plain = name.starts_with('/');
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("hostile.qcow2");
    std::fs::write(&p, q.build()).unwrap();
    let e = open_file(&p, Policy::Untrusted).unwrap_err();
    check_error(&e, ErrorKind::Denied, what);
    let opts = OpenOptions {
        policy: Policy::Untrusted,
        ..OpenOptions::default()
    };
    match outcome_with(q.build(), opts.clone()) {
        Outcome::Open(e) => check_error(&e, ErrorKind::Denied, what),
        other => panic!("{other:?}"),
    }
    let info = OpenOptions {
        metadata_only: true,
        ..opts
    };
    match outcome_with(q.build(), info) {
        // The name is known, the file was never opened: reading guest data needs it.
        Outcome::Read(e) if plain => check_error(&e, ErrorKind::Denied, "not opened"),
        Outcome::Open(e) if !plain => check_error(&e, ErrorKind::Denied, "not a plain local"),
        other => panic!("metadata only, {name}: {other:?}"),
    }
    let r = cli(&[os("info"), os("--untrusted"), p.as_os_str()]);
    if plain {
        assert_eq!(r.code, Some(0), "info --untrusted: {}", r.stderr);
        assert!(r.stdout.contains(name), "{}", r.stdout);
    } else {
        assert_cli_error(&r, &p, "not a plain local file name", "info --untrusted");
    }
    let r = cli(&[os("map"), os("--untrusted"), p.as_os_str()]);
    assert_cli_error(&r, &p, what, "map --untrusted");
    cli_convert_fails(&p, &["--untrusted"], what);
}

#[test]
fn hostile_backing_names_untrusted() {
    for name in HOSTILE_NAMES {
        untrusted_refuses(&backed_by(name, b"raw"), "backing file", name);
    }
}

#[test]
fn hostile_data_file_names_untrusted() {
    for name in HOSTILE_NAMES {
        untrusted_refuses(&data_file_named(name), "data file", name);
    }
}

#[test]
fn protocol_names_refused_even_when_trusted() {
    for name in &HOSTILE_NAMES[..3] {
        for (q, what) in [
            (backed_by(name, b"raw"), "backing file"),
            (data_file_named(name), "data file"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("hostile.qcow2");
            std::fs::write(&p, q.build()).unwrap();
            let e = open_file(&p, Policy::Trusted).unwrap_err();
            check_error(&e, ErrorKind::Denied, "not a plain local file name");
            assert!(e.to_string().contains(what), "{e}");
            let r = cli(&[os("info"), p.as_os_str()]);
            assert_cli_error(&r, &p, "not a plain local file name", "info");
            cli_convert_fails(&p, &[], "not a plain local file name");
        }
    }
}

#[test]
fn relative_backing_in_memory_is_denied() {
    // An in-memory image has no directory: a backing name cannot be resolved, whatever policy.
    match outcome_with(
        backed_by("base.qcow2", b"qcow2").build(),
        OpenOptions::default(),
    ) {
        Outcome::Open(e) => check_error(&e, ErrorKind::Denied, "cannot be resolved"),
        other => panic!("{other:?}"),
    }
}

/// Make a FIFO: opening it for reading blocks until a writer appears, so any attempt to open it
/// shows up as a hang (caught by the watchdogs) instead of passing unnoticed.
fn fifo(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let st = Command::new("mkfifo").arg(&p).status().expect("mkfifo");
    assert!(st.success());
    p
}

#[test]
fn untrusted_never_opens_named_files() {
    let dir = tempfile::tempdir().unwrap();
    let trap = fifo(dir.path(), "trap");
    let trap_name = trap.to_str().unwrap();
    for (q, what) in [
        (backed_by(trap_name, b"raw"), "backing file"),
        (backed_by("trap", b"qcow2"), "backing file"),
        (data_file_named(trap_name), "data file"),
        (data_file_named("trap"), "data file"),
    ] {
        let p = dir.path().join("img.qcow2");
        std::fs::write(&p, q.build()).unwrap();
        // Each of these would block forever in open(2) if the FIFO were touched.
        let e = open_file(&p, Policy::Untrusted).unwrap_err();
        check_error(&e, ErrorKind::Denied, what);
        // info reports the name without opening the file.
        let r = cli(&[os("info"), os("--untrusted"), p.as_os_str()]);
        assert_eq!(r.code, Some(0), "info --untrusted: {}", r.stderr);
        assert!(r.stdout.contains("trap"), "{}", r.stdout);
        cli_convert_fails(&p, &["--untrusted"], what);
        let r = cli(&[
            os("compare"),
            os("--untrusted"),
            p.as_os_str(),
            p.as_os_str(),
        ]);
        assert_eq!(r.code, Some(2), "compare: {}", r.stderr);
        assert!(r.stderr.contains(what), "{}", r.stderr);
    }
    // info (trusted) reports backing and data files without opening them, as qemu-img does.
    for q in [backed_by(trap_name, b"raw"), data_file_named(trap_name)] {
        let p = dir.path().join("img.qcow2");
        std::fs::write(&p, q.build()).unwrap();
        let r = cli(&[os("info"), os("--output=json"), p.as_os_str()]);
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        assert!(r.stdout.contains(trap_name), "{}", r.stdout);
    }
}

// ---------------------------------------------------------------------------------------------
// Fixtures from CDI and peak memory on the nastiest inputs.

#[test]
fn cdi_large_memory_fixture() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/invalid-qcow-large-memory.img");
    let bytes = std::fs::read(&p).unwrap();
    // Despite its name the fixture is a VMDK sparse extent ("KDMV") whose grain directory
    // (vmdk's L1) would need ~600 MiB: qemu-img says "L1 size too big". The VMDK reader
    // refuses its header (grain of 3456 sectors, capacity near 2^48 sectors) before
    // anything is allocated.
    assert_eq!(&bytes[..4], b"KDMV");
    let e = open_file(&p, Policy::Trusted).unwrap_err();
    check_error(&e, ErrorKind::Corrupt, "grain size");
    let r = cli(&[os("info"), p.as_os_str()]);
    assert_cli_error(&r, &p, "grain size", "info");
    cli_convert_fails(&p, &[], "grain size");
    // Forced to qcow2 it is not one.
    let r = cli(&[os("info"), os("-f"), os("qcow2"), p.as_os_str()]);
    assert_cli_error(&r, &p, "bad magic", "info -f qcow2");
}

#[test]
fn peak_memory_on_oversized_tables() {
    // Every limit near its maximum, in a small sparse file: each refused without allocating.
    let dir = tempfile::tempdir().unwrap();
    let mut cases: Vec<(&str, Q, &str)> = Vec::new();
    let mut q = Q::new();
    q.l1_size = u32::MAX;
    cases.push(("l1", q, "L1 table too large"));
    let mut q = Q::new();
    q.size = u64::MAX;
    cases.push(("size", q, "too big"));
    let mut q = Q::new();
    q.rt_clusters = u32::MAX;
    cases.push(("reftable", q, "reference count table"));
    let mut q = with_snapshot(Snap::new(3 << 16, 1 << 20));
    q.nb_snapshots = Some(u32::MAX);
    cases.push(("nb_snapshots", q, "too many snapshots"));
    let mut s = Snap::new(3 << 16, 1 << 20);
    s.l1_size = u32::MAX;
    cases.push(("snapshot_l1", with_snapshot(s), "L1 table is too large"));
    for (name, q, needle) in &cases {
        let p = dir.path().join(format!("{name}.qcow2"));
        std::fs::write(&p, q.build()).unwrap();
        let r = cli(&[os("info"), p.as_os_str()]);
        assert_cli_error(&r, &p, needle, name);
        let r = cli_convert_fails(&p, &[], needle);
        assert!(r.peak_kib < MAX_RSS_KIB);
    }
}

#[test]
fn peak_memory_on_largest_valid_l1() {
    // 32 MiB of L1 (the limit) over 2 MiB clusters maps 2 PiB; all entries zero. The file is
    // sparse. `info` must not hold more than the table itself.
    let mut q = Q::with_bits(21);
    q.l1_size = (32 << 20) / 8;
    q.l1.clear();
    q.size = 1 << 50;
    let b = q.build();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big-l1.qcow2");
    let f = std::fs::File::create(&p).unwrap();
    let end = (3u64 << 21) + (32 << 20);
    f.set_len(end).unwrap();
    {
        use std::os::unix::fs::FileExt;
        f.write_all_at(&b[..1 << 21], 0).unwrap();
        f.write_all_at(&b[1 << 21..3 << 21], 1 << 21).unwrap();
    }
    drop(f);
    let r = cli(&[os("info"), os("--output=json"), p.as_os_str()]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stdout.contains("\"virtual-size\": 1125899906842624"),
        "{}",
        r.stdout
    );
    // 32 MiB of table read into memory: allow it plus the binary, not twice the table.
    assert!(r.peak_kib < 48 * 1024, "info peaked at {} KiB", r.peak_kib);
}

// ---------------------------------------------------------------------------------------------
// The one-verdict rule for VHD, VDI and VMDK: their streaming strategy (src/forward.rs) against
// their file readers, on qemu-made images and on mutations of them.

/// A small qemu-made image of `fmt` (`-o opts`) with data at odd offsets and a zeroed range.
fn qemu_made(dir: &Path, name: &str, fmt: &str, opts: &str) -> Vec<u8> {
    let raw = dir.join(format!("{name}.raw"));
    let out = dir.join(name);
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&raw)
        .arg("6M")
        .status()
        .unwrap();
    assert!(st.success());
    let st = Command::new("qemu-io")
        .args(["-f", "raw"])
        .args(["-c", "write -P 0x5a 1000 70000"])
        .args(["-c", "write -P 0x11 2097152 1048576"])
        .args(["-c", "write -P 0x77 5242369 777"])
        .args(["-c", "write -z 2200000 8192"])
        .arg(&raw)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let mut c = Command::new("qemu-img");
    c.args(["convert", "-f", "raw", "-O", fmt]);
    if !opts.is_empty() {
        c.args(["-o", opts]);
    }
    assert!(c.arg(&raw).arg(&out).status().unwrap().success());
    std::fs::read(&out).unwrap()
}

/// File reader and stream on the same bytes: same content or same kind of error. Cases whose
/// disk is too large to read whole here are skipped (the stream is only run for panics).
fn one_verdict(bytes: Vec<u8>, what: &str) {
    let b = bytes.clone();
    let random = deadline(
        "opening and reading an image in memory",
        move || match Image::from_io(Arc::new(MemIo::new(b)), &OpenOptions::default()) {
            Err(e) => Outcome::Open(e),
            Ok(img) if img.virtual_size() > 64 << 20 => {
                Outcome::Open(Error::new(ErrorKind::TooLarge, "too large to compare here"))
            }
            Ok(img) => match read_everything(&img) {
                Err(e) => Outcome::Read(e),
                Ok(d) => Outcome::Ok(d),
            },
        },
    );
    let stream = streamed(bytes);
    let mut t = TALLY.lock().unwrap();
    let key = match (&random, &stream) {
        (Outcome::Ok(_), _) => "ok".to_string(),
        (Outcome::Open(e) | Outcome::Read(e), _) => format!("{:?}", e.kind()),
    };
    *t.entry(key).or_insert(0) += 1;
    drop(t);
    if let Outcome::Open(e) = &random
        && e.kind() == ErrorKind::TooLarge
    {
        return;
    }
    let agreed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        agree(&random, &stream, false)
    }));
    if agreed.is_err() {
        panic!("{what}: file reader {random:?}, stream {stream:?}");
    }
}

static TALLY: std::sync::Mutex<std::collections::BTreeMap<String, usize>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

#[test]
fn forward_formats_one_verdict() {
    let dir = tempfile::tempdir().unwrap();
    let images = [
        ("d.vhd", "vpc", ""),
        ("d.vdi", "vdi", ""),
        ("s.vdi", "vdi", "static=on"),
        ("s.vmdk", "vmdk", ""),
        ("z.vmdk", "vmdk", "zeroed_grain=on"),
        ("o.vmdk", "vmdk", "subformat=streamOptimized"),
        ("d.vhdx", "vhdx", "block_size=1M,log_size=1M"),
        (
            "f.vhdx",
            "vhdx",
            "subformat=fixed,block_size=1M,log_size=1M",
        ),
    ];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut cases = 0;
    for (name, fmt, opts) in images {
        let img = qemu_made(dir.path(), name, fmt, opts);
        // As made, the stream reads what the file reader reads, front to back.
        let before = SPOOLED.load(std::sync::atomic::Ordering::Relaxed);
        one_verdict(img.clone(), name);
        assert_eq!(
            SPOOLED.load(std::sync::atomic::Ordering::Relaxed),
            before,
            "{name} was spooled, not read front to back"
        );
        // Where the metadata lies (the first 64 KiB and the last 2 KiB) and anywhere.
        for k in 0..120 {
            let mut b = img.clone();
            let n = 1 + (next() % 4) as usize;
            for _ in 0..n {
                let at = match k % 4 {
                    0 => (next() % 65536) as usize,
                    // VHDX keeps its headers and region tables at 64-320 KiB, its metadata
                    // and BAT from 1 MiB on.
                    3 => (65536 + next() % (4 << 20)) as usize,
                    1 => b.len() - 1 - (next() % 2048) as usize,
                    _ => (next() % b.len() as u64) as usize,
                } % b.len();
                b[at] = next() as u8;
            }
            one_verdict(b, &format!("{name} mutation {k}"));
            cases += 1;
        }
        // Cut short anywhere.
        for k in 0..24 {
            let cut = (next() % img.len() as u64) as usize;
            one_verdict(img[..cut].to_vec(), &format!("{name} cut at {cut} ({k})"));
            cases += 1;
        }
    }
    assert!(cases >= 1000, "{cases} cases");
    let spooled = SPOOLED.load(std::sync::atomic::Ordering::Relaxed);
    let tally = TALLY.lock().unwrap().clone();
    eprintln!("{cases} cases, {spooled} spooled; file verdicts {tally:?}");
    // Most mutations keep the layout streamable: the front-to-back readers are what is
    // compared, not the spool file.
    assert!(
        spooled * 5 < cases,
        "{spooled} of {cases} cases were spooled"
    );
    // The mutations reach both verdicts.
    assert!(tally.get("ok").is_some_and(|&n| n > 100), "{tally:?}");
    assert!(tally.get("Corrupt").is_some_and(|&n| n > 100), "{tally:?}");
}
