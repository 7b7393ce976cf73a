//! Helpers for the qemu-img oracle tests: a scratch directory, the external tools (qemu-img,
//! qemu-io, xorriso), the built `vdisk` binary, and [`check_image`], which holds one image to
//! qemu-img on every command both implement.
//!
//! Every command runs inside the scratch directory with relative file names, so the names
//! both tools print (`filename`, backing names) are the same strings.

#![allow(dead_code)] // each test binary uses a different subset

pub mod services;

use serde_json::Value;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use tempfile::TempDir;

/// Panic (never skip) when a tool the oracle needs is missing.
pub fn require_tool(name: &str, version_arg: &str) {
    static CHECKED: OnceLock<std::sync::Mutex<Vec<String>>> = OnceLock::new();
    let checked = CHECKED.get_or_init(Default::default);
    if checked.lock().unwrap().iter().any(|n| n == name) {
        return;
    }
    match Command::new(name).arg(version_arg).output() {
        Ok(o) if o.status.success() => checked.lock().unwrap().push(name.to_string()),
        Ok(o) => panic!(
            "`{name} {version_arg}` failed ({}): {}\nrun scripts/deps.sh to install the test tools",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!(
            "{name} is required by the qemu-img oracle tests but cannot be run ({e}); \
             run scripts/deps.sh to install qemu-utils and xorriso"
        ),
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Run `cmd`, returning its output whatever the exit status.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", describe(cmd)))
}

/// Run `cmd` and panic with its output unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> Output {
    let o = run(cmd);
    assert!(
        o.status.success(),
        "`{}` failed ({}):\nstdout: {}\nstderr: {}",
        describe(cmd),
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// stdout as a string.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr as a string.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Whether /proc/locks shows an OFD lock on byte `byte` of the file at `path` (QEMU's lock
/// bytes: 100 + a permission it uses, 200 + one it denies others). Looking takes no lock.
pub fn ofd_lock_held(path: &Path, byte: u64) -> bool {
    let ino = fs::metadata(path).unwrap().ino().to_string();
    fs::read_to_string("/proc/locks").unwrap().lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8
            && f[1] == "OFDLCK"
            && f[5].rsplit(':').next() == Some(ino.as_str())
            && f[6] == byte.to_string()
    })
}

/// A scratch directory where images are made and both tools are run.
pub struct Env {
    dir: TempDir,
}

impl Env {
    /// A new scratch directory; checks that qemu-img and qemu-io are installed.
    pub fn new() -> Env {
        require_tool("qemu-img", "--version");
        require_tool("qemu-io", "--version");
        Env {
            dir: tempfile::Builder::new()
                .prefix("vdisk-oracle-")
                .tempdir()
                .expect("cannot create a temporary directory"),
        }
    }

    /// The scratch directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `name` inside the scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A command running in the scratch directory (times in UTC, for `snapshot -l`).
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.current_dir(self.dir.path()).env("TZ", "UTC");
        c
    }

    /// `cat NAME | vdisk import - OUT`: the image through a pipe, as the importer streams it.
    pub fn import_pipe(&self, name: &str, out: &str) -> Output {
        let o = self
            .cmd("sh")
            .arg("-c")
            .arg(format!(
                "cat '{}' | '{}' import - '{}'",
                self.path(name).display(),
                env!("CARGO_BIN_EXE_vdisk"),
                self.path(out).display()
            ))
            .output();
        o.expect("sh")
    }

    /// Run qemu-img; it must succeed.
    pub fn qemu_img(&self, args: &[&str]) -> Output {
        run_ok(self.cmd("qemu-img").args(args))
    }

    /// Run qemu-img whatever its exit status.
    pub fn qemu_img_any(&self, args: &[&str]) -> Output {
        run(self.cmd("qemu-img").args(args))
    }

    /// Run qemu-io commands on `img` (format `fmt`); every command must succeed.
    pub fn qemu_io(&self, img: &str, fmt: &str, cmds: &[&str]) {
        let mut c = self.cmd("qemu-io");
        c.args(["-f", fmt]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        c.arg(img);
        let o = run_ok(&mut c);
        let out = stdout(&o) + &stderr(&o);
        assert!(
            !out.contains("failed") && !out.contains("error"),
            "qemu-io {cmds:?} on {img} reported an error:\n{out}"
        );
    }

    /// Run the built `vdisk` binary whatever its exit status.
    pub fn vdisk(&self, args: &[&str]) -> Output {
        run(self.cmd(env!("CARGO_BIN_EXE_vdisk")).args(args))
    }

    /// Run `vdisk`; it must succeed.
    pub fn vdisk_ok(&self, args: &[&str]) -> Output {
        run_ok(self.cmd(env!("CARGO_BIN_EXE_vdisk")).args(args))
    }

    /// Create an image with qemu-img: `qemu-img create -f fmt [-o opts] name size`.
    pub fn create(&self, name: &str, fmt: &str, opts: &str, size: &str) {
        let mut args = vec!["create", "-q", "-f", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.push(name);
        if !size.is_empty() {
            args.push(size);
        }
        self.qemu_img(&args);
    }

    /// Create a qcow2 overlay of `backing` (format `bfmt`); an empty `size` takes the
    /// backing file's.
    pub fn overlay(&self, name: &str, backing: &str, bfmt: &str, opts: &str, size: &str) {
        let mut args = vec!["create", "-q", "-f", "qcow2", "-b", backing, "-F", bfmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.push(name);
        if !size.is_empty() {
            args.push(size);
        }
        self.qemu_img(&args);
    }

    /// Write `len` bytes of deterministic pseudo-random data at `off` of file `name`
    /// (created if needed; the rest stays a hole).
    pub fn write_random(&self, name: &str, off: u64, len: usize, seed: u64) {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.path(name))
            .unwrap();
        f.write_all_at(&random_bytes(len, seed), off).unwrap();
    }

    /// Write `len` copies of byte `v` at `off` of file `name` (created if needed).
    pub fn write_fill(&self, name: &str, off: u64, len: usize, v: u8) {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.path(name))
            .unwrap();
        f.write_all_at(&vec![v; len], off).unwrap();
    }

    /// Set the length of file `name` (created if needed), leaving a hole.
    pub fn set_len(&self, name: &str, len: u64) {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.path(name))
            .unwrap();
        f.set_len(len).unwrap();
    }

    /// Flush every file of the scratch directory, so delayed allocation cannot change
    /// allocated sizes or holes between the runs of the two tools.
    pub fn sync(&self) {
        fn walk(p: &Path) {
            for e in fs::read_dir(p).unwrap() {
                let e = e.unwrap();
                let t = e.file_type().unwrap();
                if t.is_dir() {
                    walk(&e.path());
                } else if t.is_file() {
                    File::open(e.path()).unwrap().sync_all().unwrap();
                }
            }
        }
        walk(self.dir.path());
    }
}

/// splitmix64: deterministic, incompressible bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// FNV-1a, to derive per-image offsets from names.
pub fn hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Allocated bytes of a file (st_blocks * 512).
pub fn allocated(p: &Path) -> u64 {
    fs::metadata(p).unwrap().blocks() * 512
}

/// Offset of the first byte where two files differ, or of the end of the shorter one when
/// one is a prefix of the other; `None` if identical.
pub fn first_difference(a: &Path, b: &Path) -> Option<u64> {
    let mut fa = File::open(a).unwrap();
    let mut fb = File::open(b).unwrap();
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba);
        let nb = read_full(&mut fb, &mut bb);
        let n = na.min(nb);
        if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
            return Some(pos + i as u64);
        }
        if na != nb {
            return Some(pos + n as u64);
        }
        if na == 0 {
            return None;
        }
        pos += n as u64;
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    n
}

/// One byte of a file.
pub fn byte_at(p: &Path, off: u64) -> u8 {
    let mut b = [0u8];
    File::open(p).unwrap().read_exact_at(&mut b, off).unwrap();
    b[0]
}

/// Parse JSON output.
pub fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "output is not JSON ({e}):\n{}\nstderr: {}",
            stdout(o),
            stderr(o)
        )
    })
}

/// One image to hold to qemu-img.
#[derive(Clone, Copy, Default)]
pub struct Check<'a> {
    /// The image, relative to the scratch directory.
    pub file: &'a str,
    /// Format given to both tools with -f (detected when `None`).
    pub format: Option<&'a str>,
    /// Also flip a byte in a copy of the image itself (off for images whose data lives in an
    /// external data file, which a copy would share).
    pub flip_copy: bool,
    /// The image is an ISO 9660 volume with this volume id (shown only by vdisk).
    pub iso_volume: Option<&'a str>,
}

impl<'a> Check<'a> {
    /// An image whose format both tools detect.
    pub fn new(file: &'a str) -> Self {
        Check {
            file,
            format: None,
            flip_copy: true,
            iso_volume: None,
        }
    }
}

/// What qemu-img reported for an image, for case-specific assertions.
pub struct Oracle {
    /// `qemu-img map --output=json` parsed.
    pub map: Vec<Value>,
    /// `qemu-img info --output=json` parsed.
    pub info: Value,
    /// Virtual size.
    pub size: u64,
}

impl Oracle {
    /// Whether some map extent satisfies `f`.
    pub fn map_has(&self, f: impl Fn(&Value) -> bool) -> bool {
        self.map.iter().any(f)
    }
}

/// Hold `c` to qemu-img: conversion to raw (bytes, length, allocation), info (JSON and text),
/// map and compare. Returns what qemu-img reported.
pub fn check_image(env: &Env, c: &Check) -> Oracle {
    env.sync();
    let info = check_info(env, c);
    let map = check_map(env, c);
    let size = info["virtual-size"].as_u64().unwrap();
    let qraw = format!("{}.qemu.raw", c.file);
    check_convert(env, c.file, c.format, None, &qraw);
    let format = info["format"].as_str().unwrap();
    check_compare(env, c, &qraw, size, format);
    Oracle { map, info, size }
}

fn with_format<'a>(args: &[&'a str], format: Option<&'a str>, file: &'a str) -> Vec<&'a str> {
    let mut v = args.to_vec();
    if let Some(f) = format {
        v.extend(["-f", f]);
    }
    v.push(file);
    v
}

/// Keys of `qemu-img info --output=json` that vdisk must reproduce exactly.
const SHARED_INFO_KEYS: &[&str] = &[
    "filename",
    "format",
    "virtual-size",
    "actual-size",
    "cluster-size",
    "backing-filename",
    "full-backing-filename",
    "backing-filename-format",
    "dirty-flag",
    "snapshots",
    "format-specific",
];

fn check_info(env: &Env, c: &Check) -> Value {
    let args = with_format(&["info", "--output=json"], c.format, c.file);
    let q = json(&env.qemu_img(&args));
    let v = json(&env.vdisk_ok(&args));
    for k in SHARED_INFO_KEYS {
        if *k == "format-specific" && c.iso_volume.is_some() {
            continue;
        }
        assert_eq!(
            v.get(*k),
            q.get(*k),
            "{}: info key {k:?} differs (left: vdisk, right: qemu-img)",
            c.file
        );
    }
    // vdisk prints nothing qemu-img does not (the ISO volume is its one addition).
    for k in v.as_object().unwrap().keys() {
        let extra_ok = k == "format-specific" && c.iso_volume.is_some();
        assert!(
            q.get(k).is_some() || extra_ok,
            "{}: vdisk info prints key {k:?} that qemu-img does not",
            c.file
        );
    }
    let (qc, vc) = (&q["children"][0], &v["children"][0]);
    assert_eq!(vc["name"], qc["name"], "{}: child name", c.file);
    for k in [
        "virtual-size",
        "actual-size",
        "filename",
        "format",
        "dirty-flag",
    ] {
        assert_eq!(
            vc["info"].get(k),
            qc["info"].get(k),
            "{}: children[0].info key {k:?} differs (left: vdisk, right: qemu-img)",
            c.file
        );
    }
    // The human-readable text too, line for line.
    let args = with_format(&["info"], c.format, c.file);
    let qh = stdout(&env.qemu_img(&args));
    let vh = stdout(&env.vdisk_ok(&args));
    if let Some(vol) = c.iso_volume {
        assert_eq!(
            v["format-specific"]["type"], "iso9660",
            "{}: ISO format-specific type",
            c.file
        );
        assert_eq!(
            v["format-specific"]["data"]["volume-id"], vol,
            "{}: ISO volume id",
            c.file
        );
        assert!(
            q.get("format-specific").is_none(),
            "qemu-img now reports ISO details for {}; compare them",
            c.file
        );
        assert!(
            vh.contains(&format!("    volume id: {vol}\n")),
            "{}: human info lacks the volume id:\n{vh}",
            c.file
        );
        // Apart from the ISO section, the text is qemu-img's.
        let without_iso: String = {
            let mut skip = false;
            vh.lines()
                .filter(|l| {
                    if *l == "Format specific information:" {
                        skip = true;
                    } else if !l.starts_with("    ") {
                        skip = false;
                    }
                    !skip
                })
                .map(|l| format!("{l}\n"))
                .collect()
        };
        assert_eq!(without_iso, qh, "{}: human info differs", c.file);
    } else {
        assert_eq!(vh, qh, "{}: human info differs", c.file);
    }
    q
}

fn check_map(env: &Env, c: &Check) -> Vec<Value> {
    let args = with_format(&["map", "--output=json"], c.format, c.file);
    // Holes of the image file are part of qemu's map; should the file system still be
    // settling them (delayed allocation), qemu-img's own answer changes and we ask again.
    let mut tries = 0;
    loop {
        let q = stdout(&env.qemu_img(&args));
        let v = stdout(&env.vdisk_ok(&args));
        if v == q {
            return serde_json::from_str::<Value>(&q)
                .unwrap()
                .as_array()
                .unwrap()
                .clone();
        }
        let again = stdout(&env.qemu_img(&args));
        tries += 1;
        if again == q || tries >= 5 {
            panic!("{}: map differs\n--- qemu-img\n{q}--- vdisk\n{v}", c.file);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Convert `file` (optionally snapshot `snapshot`) with both tools and compare the results.
pub fn check_convert(
    env: &Env,
    file: &str,
    format: Option<&str>,
    snapshot: Option<&str>,
    qraw: &str,
) {
    let vraw = format!("{qraw}.vdisk");
    let mut args = vec!["convert"];
    if let Some(f) = format {
        args.extend(["-f", f]);
    }
    args.extend(["-O", "raw"]);
    if let Some(s) = snapshot {
        args.extend(["-l", s]);
    }
    args.push(file);
    let mut q = args.clone();
    q.push(qraw);
    env.qemu_img(&q);
    let mut v = args.clone();
    v.push(&vraw);
    let out = env.vdisk_ok(&v);
    assert!(
        out.stdout.is_empty(),
        "vdisk convert without -p printed {:?}",
        stdout(&out)
    );
    let (qp, vp) = (env.path(qraw), env.path(&vraw));
    let (ql, vl) = (
        fs::metadata(&qp).unwrap().len(),
        fs::metadata(&vp).unwrap().len(),
    );
    assert_eq!(vl, ql, "{file} {snapshot:?}: raw output length differs");
    if let Some(off) = first_difference(&vp, &qp) {
        panic!("{file} {snapshot:?}: raw output differs from qemu-img's at byte {off}");
    }
    let cmp = env.qemu_img_any(&["compare", "-f", "raw", "-F", "raw", qraw, &vraw]);
    assert_eq!(
        cmp.status.code(),
        Some(0),
        "{file} {snapshot:?}: qemu-img compare of the two outputs: {}",
        stdout(&cmp)
    );
    env.sync();
    let (qa, va) = (allocated(&qp), allocated(&vp));
    assert!(
        va <= qa,
        "{file} {snapshot:?}: our raw output allocates {va} bytes, qemu-img's {qa}"
    );
    fs::remove_file(&vp).unwrap();
}

/// Run `compare` with both tools; they must agree on exit code and output. Returns the code.
fn compare_both(env: &Env, a: &str, fa: Option<&str>, b: &str, fb: &str) -> (i32, String) {
    let mut args = vec!["compare"];
    if let Some(f) = fa {
        args.extend(["-f", f]);
    }
    args.extend(["-F", fb, a, b]);
    let q = env.qemu_img_any(&args);
    let v = env.vdisk(&args);
    assert_eq!(
        (v.status.code(), stdout(&v)),
        (q.status.code(), stdout(&q)),
        "compare {a} {b}: vdisk (left) and qemu-img (right) disagree; vdisk stderr: {}",
        stderr(&v)
    );
    (v.status.code().unwrap(), stdout(&v))
}

fn check_compare(env: &Env, c: &Check, qraw: &str, size: u64, format: &str) {
    // Identical content.
    let (code, out) = compare_both(env, c.file, c.format, qraw, "raw");
    assert_eq!(
        (code, out.as_str()),
        (0, "Images are identical.\n"),
        "{}",
        c.file
    );

    // One byte changed in a copy of the raw content, somewhere derived from the name.
    let flipped = format!("{}.flip.raw", c.file);
    fs::copy(env.path(qraw), env.path(&flipped)).unwrap();
    let off = hash(c.file) % size;
    let old = byte_at(&env.path(qraw), off);
    let f = fs::OpenOptions::new()
        .write(true)
        .open(env.path(&flipped))
        .unwrap();
    f.write_all_at(&[!old], off).unwrap();
    drop(f);
    let (code, out) = compare_both(env, c.file, c.format, &flipped, "raw");
    assert_eq!(
        (code, out),
        (
            1,
            format!("Content mismatch at offset {}!\n", off / 512 * 512)
        ),
        "{}: byte {off} flipped in the raw copy",
        c.file
    );
    fs::remove_file(env.path(&flipped)).unwrap();

    // One byte changed in a copy of the image itself (next to it, so relative backing names
    // still resolve), in the last data the guest sees.
    if c.flip_copy {
        let copy = format!("{}.flip", c.file);
        fs::copy(env.path(c.file), env.path(&copy)).unwrap();
        let off = last_nonzero(&env.path(qraw)).unwrap_or(size / 3);
        let old = byte_at(&env.path(qraw), off);
        env.qemu_io(
            &copy,
            format,
            &[&format!("write -P {} {off} 1", u32::from(!old))],
        );
        let (code, out) = compare_both(env, c.file, c.format, &copy, format);
        assert_eq!(
            (code, out),
            (
                1,
                format!("Content mismatch at offset {}!\n", off / 512 * 512)
            ),
            "{}: byte {off} changed in a copy of the image",
            c.file
        );
        fs::remove_file(env.path(&copy)).unwrap();
    }
}

/// Offset of the last non-zero byte of a file.
fn last_nonzero(p: &Path) -> Option<u64> {
    let data = fs::read(p).unwrap();
    data.iter().rposition(|&b| b != 0).map(|i| i as u64)
}

/// A small seeded PRNG (splitmix64) for property tests: same seed, same sequence.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        self.next_u64() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// One of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

impl Env {
    /// `qemu-img check --output=json -f qcow2 file`: the image must be clean (exit 0, no
    /// corruptions, no leaks, no check errors). Returns the report.
    pub fn check_clean(&self, file: &str) -> Value {
        let o = self.qemu_img_any(&["check", "--output=json", "-f", "qcow2", file]);
        let r = json(&o);
        for k in [
            "corruptions",
            "leaks",
            "check-errors",
            "corruptions-fixed",
            "leaks-fixed",
        ] {
            assert_eq!(
                r.get(k).map_or(Some(0), Value::as_u64),
                Some(0),
                "{file}: qemu-img check reports {k}:\n{r:#}\nstderr: {}",
                stderr(&o)
            );
        }
        assert_eq!(
            o.status.code(),
            Some(0),
            "{file}: qemu-img check exit status\n{r:#}\nstderr: {}",
            stderr(&o)
        );
        r
    }

    /// `qemu-img info --output=json` of `file` in format `fmt`.
    pub fn info(&self, file: &str, fmt: &str) -> Value {
        json(&self.qemu_img(&["info", "--output=json", "-f", fmt, file]))
    }

    /// `qemu-img map --output=json` of `file` in format `fmt`.
    pub fn map(&self, file: &str, fmt: &str) -> Vec<Value> {
        json(&self.qemu_img(&["map", "--output=json", "-f", fmt, file]))
            .as_array()
            .unwrap()
            .clone()
    }

    /// `qemu-img compare` must find the guest contents of `a` and `b` identical.
    pub fn assert_same(&self, a: &str, fa: &str, b: &str, fb: &str) {
        let o = self.qemu_img_any(&["compare", "-f", fa, "-F", fb, a, b]);
        assert_eq!(
            o.status.code(),
            Some(0),
            "qemu-img compare {a} ({fa}) {b} ({fb}): {}{}",
            stdout(&o),
            stderr(&o)
        );
    }
}

impl Env {
    /// Write `data` at `off` of file `name` (created if needed; the rest stays a hole).
    pub fn write_bytes(&self, name: &str, off: u64, data: &[u8]) {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.path(name))
            .unwrap();
        f.write_all_at(data, off).unwrap();
    }
}

/// Assert that `qemu-img compare` finds the two images' content identical.
pub fn same_disk(a: impl AsRef<Path>, b: impl AsRef<Path>) {
    let (a, b) = (a.as_ref(), b.as_ref());
    let o = Command::new("qemu-img")
        .args(["compare", "-q"])
        .arg(a)
        .arg(b)
        .output()
        .expect("qemu-img");
    assert!(
        o.status.success(),
        "{} differs from {}: {}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether `line` starts as klog's text format does, the regex
/// `^[IWEF]\d{4} \d{2}:\d{2}:\d{2}\.\d{6} +\d+ [^ ]+:\d+\] `.
pub fn is_klog_line(line: &str) -> bool {
    let b = line.as_bytes();
    let digits = |s: &[u8]| !s.is_empty() && s.iter().all(u8::is_ascii_digit);
    // "I1202 06:32:24.123456": 21 bytes of fixed shape.
    if b.len() < 21
        || !b"IWEF".contains(&b[0])
        || !digits(&b[1..5])
        || b[5] != b' '
        || !digits(&b[6..8])
        || b[8] != b':'
        || !digits(&b[9..11])
        || b[11] != b':'
        || !digits(&b[12..14])
        || b[14] != b'.'
        || !digits(&b[15..21])
    {
        return false;
    }
    let rest = &line[21..];
    let Some(rest) = rest.strip_prefix(' ') else {
        return false;
    };
    let rest = rest.trim_start_matches(' ');
    let Some((pid, rest)) = rest.split_once(' ') else {
        return false;
    };
    if !digits(pid.as_bytes()) {
        return false;
    }
    let Some((loc, _)) = rest.split_once("] ") else {
        return false;
    };
    match loc.rsplit_once(':') {
        Some((file, line)) => !file.is_empty() && !file.contains(' ') && digits(line.as_bytes()),
        None => false,
    }
}
