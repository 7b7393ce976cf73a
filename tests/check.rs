//! `vdisk check` held to `qemu-img check`: images are made with qemu-img and qemu-io at test
//! time (the tests fail when those tools are missing), checked by both tools, and the results
//! compared field by field (corruptions, leaks, check errors, allocation, fragmentation and
//! compression figures, image end offset), together with the exit status, the human and JSON
//! output and the list of problems reported on stderr. Damaged images are made by patching
//! metadata bytes.

use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use tempfile::TempDir;
use vdisk::io::{BlockIo, FileIo, MemIo};
use vdisk::qcow2::check::{CheckReport, Checked, check, check_path};

struct Env {
    dir: TempDir,
}

fn tool_ok(name: &str) {
    match Command::new(name).arg("--version").output() {
        Ok(o) if o.status.success() => {}
        r => panic!(
            "{name} is required by the check tests (qemu-utils): {:?}",
            r.map(|o| o.status)
        ),
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl Env {
    fn new() -> Env {
        tool_ok("qemu-img");
        tool_ok("qemu-io");
        Env {
            dir: tempfile::Builder::new()
                .prefix("vdisk-check-")
                .tempdir()
                .unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        Command::new(program)
            .current_dir(self.dir.path())
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
    }

    fn run_ok(&self, program: &str, args: &[&str]) -> Output {
        let o = self.run(program, args);
        assert!(
            o.status.success(),
            "{program} {args:?} failed: {}\n{}",
            text(&o.stdout),
            text(&o.stderr)
        );
        o
    }

    fn qemu_img(&self, args: &[&str]) {
        self.run_ok("qemu-img", args);
    }

    fn create(&self, name: &str, opts: &str, size: &str) {
        let mut a = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            a.extend(["-o", opts]);
        }
        a.extend([name, size]);
        self.qemu_img(&a);
    }

    /// Run qemu-io commands on a qcow2 image; each must succeed.
    fn io(&self, name: &str, cmds: &[&str]) {
        let mut a = vec!["-f", "qcow2"];
        for c in cmds {
            a.extend(["-c", c]);
        }
        a.push(name);
        let o = self.run_ok("qemu-io", &a);
        let out = text(&o.stdout) + &text(&o.stderr);
        assert!(
            !out.contains("failed") && !out.contains("error"),
            "qemu-io {cmds:?}: {out}"
        );
    }

    fn vdisk(&self, args: &[&str]) -> Output {
        self.run(env!("CARGO_BIN_EXE_vdisk"), args)
    }
}

/// The problem lines of a check run's stderr. qemu-img adds others ("Check failed", warnings),
/// some without a final newline, so a problem may start in the middle of a line.
fn problems(stderr: &[u8]) -> Vec<String> {
    text(stderr)
        .lines()
        .filter_map(|l| {
            ["ERROR", "Leaked cluster", "Can't get refcount"]
                .iter()
                .filter_map(|m| l.find(m))
                .min()
                .map(|at| l[at..].to_string())
        })
        .collect()
}

const FIELDS: &[&str] = &[
    "corruptions",
    "leaks",
    "check-errors",
    "total-clusters",
    "allocated-clusters",
    "fragmented-clusters",
    "compressed-clusters",
    "image-end-offset",
];

fn field(r: &CheckReport, k: &str) -> u64 {
    match k {
        "corruptions" => r.corruptions,
        "leaks" => r.leaks,
        "check-errors" => r.check_errors,
        "total-clusters" => r.total_clusters,
        "allocated-clusters" => r.allocated_clusters,
        "fragmented-clusters" => r.fragmented_clusters,
        "compressed-clusters" => r.compressed_clusters,
        "image-end-offset" => r.image_end_offset,
        _ => unreachable!(),
    }
}

/// What qemu-img check said about an image.
struct Qemu {
    json: Value,
    problems: Vec<String>,
}

impl Qemu {
    fn get(&self, k: &str) -> u64 {
        self.json.get(k).and_then(Value::as_u64).unwrap_or(0)
    }
}

/// Check `name` with both tools and require the same results in every respect; returns what
/// qemu-img reported. `expect_code` is qemu-img's exit status, asserted so that each case
/// really is the kind of image it claims to be.
fn same(env: &Env, name: &str, expect_code: i32) -> Qemu {
    let q = env.run("qemu-img", &["check", "--output=json", name]);
    let v = env.vdisk(&["check", "--output=json", name]);
    let code = q.status.code().unwrap();
    assert_eq!(
        code,
        expect_code,
        "qemu-img check {name}: {}",
        text(&q.stderr)
    );
    assert_eq!(v.status.code(), Some(code), "{name}: {}", text(&v.stderr));
    let qjson: Value = serde_json::from_slice(&q.stdout).unwrap();
    let vjson: Value = serde_json::from_slice(&v.stdout)
        .unwrap_or_else(|e| panic!("{name}: vdisk json: {e}: {}", text(&v.stdout)));
    // Field by field, then the whole output byte for byte (key order, omitted zeros).
    for k in FIELDS {
        assert_eq!(vjson.get(*k), qjson.get(*k), "{name}: field {k}");
    }
    assert_eq!(text(&v.stdout), text(&q.stdout), "{name}: json output");
    let qp = problems(&q.stderr);
    assert_eq!(problems(&v.stderr), qp, "{name}: problems on stderr");
    // Human output.
    let qh = env.run("qemu-img", &["check", name]);
    let vh = env.vdisk(&["check", name]);
    assert_eq!(text(&vh.stdout), text(&qh.stdout), "{name}: human output");
    assert_eq!(vh.status.code(), qh.status.code());
    // The library directly, over a file and over memory.
    let Checked::Qcow2(r) = check_path(&env.path(name), None, &mut |_| {}).unwrap() else {
        panic!("{name}: not checked as qcow2");
    };
    let qemu = Qemu {
        json: qjson,
        problems: qp,
    };
    for k in FIELDS {
        assert_eq!(field(&r, k), qemu.get(k), "{name}: library field {k}");
    }
    let mem = MemIo::new(fs::read(env.path(name)).unwrap());
    let m = check(&mem).unwrap();
    assert_eq!(m.messages, qemu.problems, "{name}: library messages");
    assert_eq!(i32::from(m.exit_code()), code);
    qemu
}

/// Byte offsets and values of a qcow2 file, for patching.
struct Q {
    path: PathBuf,
}

impl Q {
    fn new(env: &Env, name: &str) -> Q {
        Q {
            path: env.path(name),
        }
    }
    fn f(&self) -> File {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .unwrap()
    }
    fn get(&self, off: u64, n: usize) -> u64 {
        let mut b = [0u8; 8];
        self.f().read_exact_at(&mut b[8 - n..], off).unwrap();
        u64::from_be_bytes(b)
    }
    fn put(&self, off: u64, n: usize, v: u64) {
        self.f()
            .write_all_at(&v.to_be_bytes()[8 - n..], off)
            .unwrap();
    }
    fn cluster_bits(&self) -> u32 {
        self.get(20, 4) as u32
    }
    fn cs(&self) -> u64 {
        1 << self.cluster_bits()
    }
    fn l1_offset(&self) -> u64 {
        self.get(40, 8)
    }
    fn l1(&self, i: u64) -> u64 {
        self.get(self.l1_offset() + 8 * i, 8)
    }
    /// File offset of L2 entry `i` of the table L1[`l1`] points to (standard entries).
    fn l2_at(&self, l1: u64, i: u64) -> u64 {
        (self.l1(l1) & 0x00ff_ffff_ffff_fe00) + 8 * i
    }
    fn refcount_order(&self) -> u32 {
        if self.get(4, 4) >= 3 {
            self.get(96, 4) as u32
        } else {
            4
        }
    }
    /// File offset of cluster `c`'s refcount (byte-wide or wider refcounts only).
    fn refcount_at(&self, c: u64) -> (u64, usize) {
        let bytes = (1usize << self.refcount_order()) / 8;
        assert!(bytes >= 1);
        let per = self.cs() / bytes as u64;
        let rt = self.get(48, 8);
        let block = self.get(rt + 8 * (c / per), 8);
        assert_ne!(block, 0, "no refblock for cluster {c}");
        (block + (c % per) * bytes as u64, bytes)
    }
    fn refcount(&self, c: u64) -> u64 {
        let (o, n) = self.refcount_at(c);
        self.get(o, n)
    }
    fn set_refcount(&self, c: u64, v: u64) {
        let (o, n) = self.refcount_at(c);
        self.put(o, n, v);
    }
}

// ---------------------------------------------------------------------------------------------
// Clean images: every figure as qemu-img's.

/// Writes that leave allocated, zero, discarded and scattered clusters behind.
const WRITES: &[&str] = &[
    "write -P 1 0 1M",
    "write -P 2 3M 64k",
    "write -P 3 2M 4k",
    "write -z 512k 128k",
    "discard 768k 64k",
    "write -P 4 40M 192k",
    "write -P 5 20M 8k",
    "write -P 6 1536k 64k",
];

#[test]
fn clean_cluster_sizes_and_versions() {
    let env = Env::new();
    for (i, opts) in [
        "cluster_size=512",
        "cluster_size=4k",
        "cluster_size=64k",
        "cluster_size=2M",
        "compat=0.10",
        "compat=0.10,cluster_size=512",
        "compat=1.1,lazy_refcounts=on",
    ]
    .iter()
    .enumerate()
    {
        let name = format!("c{i}.qcow2");
        env.create(&name, opts, "64M");
        same(&env, &name, 0);
        let writes: Vec<&str> = if opts.contains("compat=0.10") {
            // Version 2 has no zero clusters: write zeros as data.
            WRITES
                .iter()
                .map(|w| {
                    if w.starts_with("write -z") {
                        "write -P 0 512k 128k"
                    } else {
                        w
                    }
                })
                .collect()
        } else {
            WRITES.to_vec()
        };
        env.io(&name, &writes);
        let q = same(&env, &name, 0);
        assert!(q.get("allocated-clusters") > 0, "{opts}");
    }
}

#[test]
fn clean_refcount_widths() {
    let env = Env::new();
    for bits in [1, 2, 4, 8, 16, 32, 64] {
        let name = format!("r{bits}.qcow2");
        env.create(
            &name,
            &format!("refcount_bits={bits},cluster_size=4k"),
            "64M",
        );
        env.io(&name, WRITES);
        same(&env, &name, 0);
    }
}

#[test]
fn clean_compressed() {
    let env = Env::new();
    for ct in ["zlib", "zstd"] {
        let name = format!("z-{ct}.qcow2");
        env.create(&name, &format!("compression_type={ct}"), "64M");
        env.io(
            &name,
            &[
                "write -c -P 7 0 256k",
                "write -c -P 8 4M 64k",
                "write -P 9 8M 128k",
                "write -c -P 10 16M 64k",
            ],
        );
        let q = same(&env, &name, 0);
        assert_eq!(q.get("compressed-clusters"), 6, "{ct}");
        // Whole-image conversion with compression packs clusters into shared host clusters.
        let src = format!("z-{ct}.src.qcow2");
        env.create(&src, "", "16M");
        env.io(
            &src,
            &["write -P 11 0 3M", "write -P 12 5M 1M", "write -P 0 9M 1M"],
        );
        let out = format!("zc-{ct}.qcow2");
        env.qemu_img(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &format!("compression_type={ct},cluster_size=4k"),
            &src,
            &out,
        ]);
        let q = same(&env, &out, 0);
        assert!(q.get("compressed-clusters") > 100, "{ct}");
    }
}

#[test]
fn clean_extended_l2() {
    let env = Env::new();
    for cs in ["64k", "2M", "16k"] {
        let name = format!("x{cs}.qcow2");
        env.create(&name, &format!("extended_l2=on,cluster_size={cs}"), "64M");
        env.io(
            &name,
            &[
                "write -P 1 0 4k",
                "write -P 2 100k 8k",
                "write -z 200k 64k",
                "write -z 4M 1k",
                "write -c -P 3 8M 2M",
                "write -P 4 30M 3M",
                "discard 31M 1M",
            ],
        );
        same(&env, &name, 0);
    }
}

#[test]
fn clean_snapshots() {
    let env = Env::new();
    for opts in ["", "cluster_size=4k,refcount_bits=8", "compat=0.10"] {
        let name = format!("s{}.qcow2", opts.len());
        env.create(&name, opts, "64M");
        env.io(&name, &["write -P 1 0 1M", "write -P 2 10M 512k"]);
        env.qemu_img(&["snapshot", "-c", "one", &name]);
        env.io(&name, &["write -P 3 512k 1M", "write -P 4 30M 64k"]);
        env.qemu_img(&["snapshot", "-c", "two", &name]);
        env.io(&name, &["write -P 5 0 128k"]);
        env.qemu_img(&["snapshot", "-c", "three", &name]);
        env.io(&name, &["write -P 6 10M 64k", "discard 20M 64k"]);
        same(&env, &name, 0);
        env.qemu_img(&["snapshot", "-d", "two", &name]);
        env.io(&name, &["write -P 7 2M 64k"]);
        let q = same(&env, &name, 0);
        assert!(q.get("allocated-clusters") > 0);
        env.qemu_img(&["snapshot", "-a", "one", &name]);
        same(&env, &name, 0);
    }
}

#[test]
fn clean_preallocation() {
    let env = Env::new();
    for p in ["metadata", "falloc", "full"] {
        let name = format!("p-{p}.qcow2");
        env.create(&name, &format!("preallocation={p}"), "32M");
        let q = same(&env, &name, 0);
        assert_eq!(q.get("allocated-clusters"), 512, "{p}");
        env.io(&name, &["write -P 1 1M 1M", "write -z 8M 64k"]);
        same(&env, &name, 0);
    }
    // Metadata preallocation with small clusters and extended L2.
    env.create("p-x.qcow2", "preallocation=metadata,extended_l2=on", "16M");
    same(&env, "p-x.qcow2", 0);
}

#[test]
fn clean_bitmaps_backing_and_data_file() {
    let env = Env::new();
    env.create("b.qcow2", "", "64M");
    env.qemu_img(&["bitmap", "--add", "b.qcow2", "first"]);
    env.qemu_img(&["bitmap", "--add", "-g", "512", "b.qcow2", "fine"]);
    env.io("b.qcow2", &["write -P 1 0 1M", "write -P 2 50M 4M"]);
    same(&env, "b.qcow2", 0);
    // Snapshot (bitmaps and snapshots together).
    env.qemu_img(&["snapshot", "-c", "s", "b.qcow2"]);
    env.io("b.qcow2", &["write -P 3 0 64k"]);
    same(&env, "b.qcow2", 0);
    // Without the autoclear bit the extension is ignored: its clusters are leaks.
    let q = Q::new(&env, "b.qcow2");
    q.put(88, 8, q.get(88, 8) & !1);
    let r = same(&env, "b.qcow2", 3);
    assert!(r.get("leaks") >= 3, "{:?}", r.problems);

    // An overlay: the backing file is not needed.
    env.create("base.qcow2", "", "64M");
    env.io("base.qcow2", &["write -P 1 0 4M"]);
    env.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    env.io("top.qcow2", &["write -P 2 1M 64k", "write -z 2M 64k"]);
    same(&env, "top.qcow2", 0);
    fs::rename(env.path("base.qcow2"), env.path("moved.qcow2")).unwrap();
    let Checked::Qcow2(r) = check_path(&env.path("top.qcow2"), None, &mut |_| {}).unwrap() else {
        panic!()
    };
    assert_eq!(r.exit_code(), 0);

    // External data file: data clusters are not refcounted.
    env.create("d.qcow2", "data_file=d.raw", "64M");
    env.io(
        "d.qcow2",
        &["write -P 1 0 1M", "write -z 4M 64k", "write -P 2 9M 64k"],
    );
    let q = same(&env, "d.qcow2", 0);
    assert_eq!(q.get("allocated-clusters"), 17);
    // Without its data file the image is still checked (vdisk never opens it).
    fs::remove_file(env.path("d.raw")).unwrap();
    let Checked::Qcow2(r) = check_path(&env.path("d.qcow2"), None, &mut |_| {}).unwrap() else {
        panic!()
    };
    assert_eq!(r.allocated_clusters, 17);
    assert_eq!(r.exit_code(), 0);
}

#[test]
fn dirty_image_of_a_killed_writer() {
    let env = Env::new();
    env.create("lazy.qcow2", "lazy_refcounts=on", "64M");
    env.io("lazy.qcow2", &["write -P 1 0 64k"]);
    let o = env.run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 2 1M 2M",
            "-c",
            "write -P 3 8M 64k",
            "-c",
            "sigraise 9",
            "lazy.qcow2",
        ],
    );
    assert!(!o.status.success(), "qemu-io was meant to be killed");
    let q = Q::new(&env, "lazy.qcow2");
    assert_eq!(q.get(72, 8) & 1, 1, "dirty bit not set");
    let qemu = same(&env, "lazy.qcow2", 2);
    assert!(qemu.get("corruptions") >= 33);
    // A persistent bitmap left "in use" by a killed writer.
    env.create("bm.qcow2", "", "64M");
    env.qemu_img(&["bitmap", "--add", "bm.qcow2", "b"]);
    let o = env.run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 2 1M 64k",
            "-c",
            "sigraise 9",
            "bm.qcow2",
        ],
    );
    assert!(!o.status.success());
    same(&env, "bm.qcow2", 0);
}

// ---------------------------------------------------------------------------------------------
// Damaged images.

/// A 64 KiB-cluster image with data in guest clusters 0..16 and 64.
fn base(env: &Env, name: &str, opts: &str) -> Q {
    env.create(name, opts, "64M");
    env.io(name, &["write -P 1 0 1M", "write -P 2 4M 64k"]);
    same(env, name, 0);
    Q::new(env, name)
}

#[test]
fn refcount_too_low_or_too_high() {
    let env = Env::new();
    // Too low: corruption (and the COPIED flag no longer matches refcount 1).
    let q = base(&env, "low.qcow2", "");
    let host = (q.get(q.l2_at(0, 3), 8) & 0x00ff_ffff_ffff_fe00) >> 16;
    assert_eq!(q.refcount(host), 1);
    q.set_refcount(host, 0);
    let r = same(&env, "low.qcow2", 2);
    assert_eq!((r.get("corruptions"), r.get("leaks")), (2, 0));
    assert!(
        r.problems
            .contains(&format!("ERROR cluster {host} refcount=0 reference=1"))
    );

    // Too high: a leak, plus the COPIED mismatch (a corruption).
    let q = base(&env, "high.qcow2", "refcount_bits=64");
    q.set_refcount(host, 2);
    let r = same(&env, "high.qcow2", 2);
    assert_eq!((r.get("corruptions"), r.get("leaks")), (1, 1));

    // A leak only: a cluster past the data with a refcount and nothing referencing it.
    let q = base(&env, "leak.qcow2", "refcount_bits=8");
    let len = fs::metadata(&q.path).unwrap().len();
    let end = len.div_ceil(q.cs());
    File::options()
        .write(true)
        .open(&q.path)
        .unwrap()
        .set_len((end + 2) * q.cs())
        .unwrap();
    q.set_refcount(end + 1, 3);
    let r = same(&env, "leak.qcow2", 3);
    assert_eq!((r.get("corruptions"), r.get("leaks")), (0, 1));
    assert_eq!(r.get("image-end-offset"), (end + 2) * q.cs());

    // The L2 table's refcount: too low and too high.
    let q = base(&env, "l2rc.qcow2", "");
    let l2 = (q.l1(0) & 0x00ff_ffff_ffff_fe00) >> 16;
    q.set_refcount(l2, 5);
    same(&env, "l2rc.qcow2", 2);
    q.set_refcount(l2, 0);
    same(&env, "l2rc.qcow2", 2);
    // A refcount block's own refcount.
    let q = base(&env, "rb.qcow2", "");
    let rb = q.get(q.get(48, 8), 8) >> 16;
    q.set_refcount(rb, 2);
    let r = same(&env, "rb.qcow2", 3);
    assert_eq!(r.get("leaks"), 1);
}

#[test]
fn copied_flags() {
    let env = Env::new();
    let q = base(&env, "cp.qcow2", "");
    let at = q.l2_at(0, 5);
    let e = q.get(at, 8) & !(1 << 63);
    q.put(at, 8, e);
    let r = same(&env, "cp.qcow2", 2);
    assert_eq!(r.get("corruptions"), 1);
    assert_eq!(
        r.problems,
        [format!(
            "ERROR OFLAG_COPIED data cluster: l2_entry={e:x} refcount=1"
        )]
    );
    // On the L1 entry.
    let l1 = q.l1_offset();
    q.put(l1, 8, q.get(l1, 8) & !(1 << 63));
    let r = same(&env, "cp.qcow2", 2);
    assert_eq!(r.get("corruptions"), 2);
    // COPIED on a compressed cluster.
    env.create("cc.qcow2", "", "64M");
    env.io("cc.qcow2", &["write -c -P 1 0 64k"]);
    let q = Q::new(&env, "cc.qcow2");
    let at = q.l2_at(0, 0);
    q.put(at, 8, q.get(at, 8) | 1 << 63);
    let r = same(&env, "cc.qcow2", 2);
    assert_eq!(r.get("corruptions"), 1);
}

#[test]
fn shared_and_overlapping_clusters() {
    let env = Env::new();
    // Two L2 entries pointing at one data cluster.
    let q = base(&env, "two.qcow2", "");
    q.put(q.l2_at(0, 7), 8, q.get(q.l2_at(0, 6), 8));
    let r = same(&env, "two.qcow2", 2);
    assert!(
        r.get("corruptions") >= 1 && r.get("leaks") == 1,
        "{:?}",
        r.json
    );
    // An L2 entry pointing at the L2 table itself, the refcount table, the L1 table.
    for (i, target) in ["l2", "reftable", "l1"].iter().enumerate() {
        let name = format!("ov{i}.qcow2");
        let q = base(&env, &name, "");
        let host = match *target {
            "l2" => q.l1(0) & 0x00ff_ffff_ffff_fe00,
            "reftable" => q.get(48, 8),
            _ => q.l1_offset(),
        };
        // Guest cluster 100 (unallocated) now claims the metadata cluster.
        q.put(q.l2_at(0, 100), 8, host);
        let r = same(&env, &name, 2);
        assert!(r.get("corruptions") >= 1, "{target}");
    }
    // Snapshot data shared with the active state, refcount dropped to 1.
    env.create("sn.qcow2", "", "64M");
    env.io("sn.qcow2", &["write -P 1 0 256k"]);
    env.qemu_img(&["snapshot", "-c", "s", "sn.qcow2"]);
    let q = Q::new(&env, "sn.qcow2");
    let host = (q.get(q.l2_at(0, 1), 8) & 0x00ff_ffff_ffff_fe00) >> 16;
    assert_eq!(q.refcount(host), 2);
    q.set_refcount(host, 1);
    let r = same(&env, "sn.qcow2", 2);
    assert_eq!(r.get("corruptions"), 2); // refcount below references; COPIED now wrong
}

#[test]
fn reserved_bits_and_bad_offsets() {
    let env = Env::new();
    type Case = (&'static str, fn(&Q));
    let cases: &[Case] = &[
        ("l2-reserved", |q| {
            let at = q.l2_at(0, 2);
            q.put(at, 8, q.get(at, 8) | 1 << 58);
        }),
        ("l1-reserved", |q| {
            let at = q.l1_offset();
            q.put(at, 8, q.get(at, 8) | 1 << 60);
        }),
        ("l2-unaligned", |q| {
            let at = q.l2_at(0, 2);
            q.put(at, 8, q.get(at, 8) + 0x200);
        }),
        ("l2-table-unaligned", |q| {
            let at = q.l1_offset();
            q.put(at, 8, q.get(at, 8) + 0x1000);
        }),
        ("data-past-eof", |q| {
            q.put(q.l2_at(0, 200), 8, 1 << 63 | 1 << 40);
        }),
        ("l2-table-past-eof", |q| {
            q.put(q.l1_offset(), 8, 1 << 63 | 1 << 40);
        }),
        ("l2-table-is-header", |q| {
            q.put(q.l1_offset(), 8, 1 << 63);
        }),
        ("compressed-past-eof", |q| {
            q.put(q.l2_at(0, 300), 8, 1 << 62 | 0x3_0000_0000);
        }),
        ("reftable-reserved", |q| {
            let rt = q.get(48, 8);
            q.put(rt, 8, q.get(rt, 8) | 0x10);
        }),
        ("refblock-outside", |q| {
            let rt = q.get(48, 8);
            q.put(rt + 8, 8, 1 << 40);
        }),
    ];
    for (name, patch) in cases {
        let file = format!("{name}.qcow2");
        let q = base(&env, &file, "");
        patch(&q);
        let r = same(&env, &file, 2);
        assert!(r.get("corruptions") >= 1, "{name}");
    }
    // Marked corrupt, with a cluster dropped from its L2 table: a leak.
    let q = base(&env, "marked-corrupt.qcow2", "");
    q.put(72, 8, q.get(72, 8) | 2);
    q.put(q.l2_at(0, 2), 8, 0);
    let r = same(&env, "marked-corrupt.qcow2", 3);
    assert_eq!((r.get("corruptions"), r.get("leaks")), (0, 1));
    // An unaligned refcount block cannot be read at all: check errors, exit 1.
    let q = base(&env, "rb-unaligned.qcow2", "");
    let rt = q.get(48, 8);
    q.put(rt, 8, q.get(rt, 8) + 0x200);
    let r = same(&env, "rb-unaligned.qcow2", 1);
    assert!(r.get("check-errors") > 0);
}

#[test]
fn extended_l2_bitmaps() {
    let env = Env::new();
    let q = base(&env, "xb.qcow2", "extended_l2=on");
    // Entry 1 of the (16-byte) table: a subcluster both allocated and zero.
    let at = (q.l1(0) & 0x00ff_ffff_ffff_fe00) + 16 + 8;
    q.put(at, 8, q.get(at, 8) | 1 << 33);
    let r = same(&env, "xb.qcow2", 2);
    assert_eq!(r.get("corruptions"), 1);
    // An unallocated cluster with allocated subclusters.
    let at = (q.l1(0) & 0x00ff_ffff_ffff_fe00) + 16 * 40 + 8;
    q.put(at, 8, 0xff);
    let r = same(&env, "xb.qcow2", 2);
    assert_eq!(r.get("corruptions"), 2);
    // A compressed cluster with a bitmap.
    env.create("xc.qcow2", "extended_l2=on", "64M");
    env.io("xc.qcow2", &["write -c -P 1 0 64k"]);
    let q = Q::new(&env, "xc.qcow2");
    let at = (q.l1(0) & 0x00ff_ffff_ffff_fe00) + 8;
    q.put(at, 8, 1);
    let r = same(&env, "xc.qcow2", 2);
    assert_eq!(r.get("corruptions"), 1);
}

#[test]
fn snapshot_l1_damage() {
    let env = Env::new();
    env.create("sd.qcow2", "", "64M");
    env.io("sd.qcow2", &["write -P 1 0 1M"]);
    env.qemu_img(&["snapshot", "-c", "s", "sd.qcow2"]);
    let q = Q::new(&env, "sd.qcow2");
    let st = q.get(64, 8);
    // The snapshot's L1 table moved off its cluster boundary.
    q.put(st, 8, q.get(st, 8) + 8);
    let r = same(&env, "sd.qcow2", 2);
    assert!(
        r.problems
            .iter()
            .any(|p| p.contains("L1 table is not cluster aligned"))
    );
}

/// Differences from qemu-img that are deliberate.
#[test]
fn zero_flag_in_version_2_image() {
    let env = Env::new();
    let q = base(&env, "v2z.qcow2", "compat=0.10");
    let at = q.l2_at(0, 3);
    q.put(at, 8, q.get(at, 8) | 1);
    q.put(q.l2_at(0, 500), 8, 1);
    // qemu-img check misses it (its reader refuses the cluster)...
    let qo = env.run("qemu-img", &["check", "--output=json", "v2z.qcow2"]);
    assert_eq!(qo.status.code(), Some(0));
    // ... vdisk counts each entry as a corruption and otherwise agrees.
    let v = env.vdisk(&["check", "--output=json", "v2z.qcow2"]);
    assert_eq!(v.status.code(), Some(2));
    let qj: Value = serde_json::from_slice(&qo.stdout).unwrap();
    let vj: Value = serde_json::from_slice(&v.stdout).unwrap();
    assert_eq!(vj["corruptions"], 2);
    for k in FIELDS.iter().filter(|k| **k != "corruptions") {
        assert_eq!(vj.get(*k), qj.get(*k), "{k}");
    }
}

// ---------------------------------------------------------------------------------------------
// Command line and robustness.

#[test]
fn command_line() {
    let env = Env::new();
    env.qemu_img(&["create", "-q", "-f", "raw", "r.img", "1M"]);
    for args in [
        &["check", "r.img"][..],
        &["check", "-f", "raw", "r.img"],
        &["check", "--output=json", "r.img"],
    ] {
        let q = env.run("qemu-img", args);
        let v = env.vdisk(args);
        assert_eq!(q.status.code(), Some(63));
        assert_eq!(v.status.code(), Some(63), "{args:?}");
        assert!(text(&v.stderr).contains("This image format does not support checks"));
        assert_eq!(text(&v.stdout), "");
    }
    // -q: nothing on stdout, problems still on stderr, same exit status.
    let q = base(&env, "quiet.qcow2", "");
    q.set_refcount(20, 0);
    for tool in ["qemu-img", env!("CARGO_BIN_EXE_vdisk")] {
        for args in [
            &["check", "-q", "quiet.qcow2"][..],
            &["check", "-q", "--output=json", "-U", "quiet.qcow2"],
        ] {
            let o = env.run(tool, args);
            assert_eq!(o.status.code(), Some(2), "{tool}");
            assert_eq!(text(&o.stdout), "", "{tool}");
            assert_eq!(problems(&o.stderr).len(), 2, "{tool}");
        }
    }
    // Unreadable or not qcow2 at all: check failed, exit 1.
    fs::write(env.path("junk.qcow2"), b"QFI\xfb\0\0\0\x03short").unwrap();
    assert_eq!(
        env.run("qemu-img", &["check", "junk.qcow2"]).status.code(),
        Some(1)
    );
    assert_eq!(env.vdisk(&["check", "junk.qcow2"]).status.code(), Some(1));
    assert_eq!(
        env.vdisk(&["check", "-f", "qcow2", "r.img"]).status.code(),
        Some(1)
    );
    assert_eq!(
        env.vdisk(&["check", "missing.qcow2"]).status.code(),
        Some(1)
    );
    assert_eq!(
        env.vdisk(&["check", "--output=xml", "quiet.qcow2"])
            .status
            .code(),
        Some(1)
    );
}

/// Every single-byte corruption of the metadata of a small image: no panic, and the check
/// either fails cleanly or reports; where qemu-img also produces a report, the figures agree.
#[test]
fn byte_flips_in_metadata() {
    let env = Env::new();
    env.create("f.qcow2", "cluster_size=512,refcount_bits=16", "1M");
    env.io(
        "f.qcow2",
        &[
            "write -P 1 0 4k",
            "write -c -P 2 64k 2k",
            "write -z 128k 1k",
        ],
    );
    env.qemu_img(&["snapshot", "-c", "s", "f.qcow2"]);
    env.io("f.qcow2", &["write -P 3 1k 1k"]);
    same(&env, "f.qcow2", 0);
    let orig = fs::read(env.path("f.qcow2")).unwrap();
    let mut agreed = 0;
    let mut bad = Vec::new();
    let mut tally: BTreeMap<i32, u32> = BTreeMap::new();
    let offsets: Vec<usize> = (0..orig.len()).step_by(5).collect();
    for (n, &off) in offsets.iter().enumerate() {
        let mut img = orig.clone();
        img[off] ^= 1 << (n % 8);
        let io: Arc<dyn BlockIo> = Arc::new(MemIo::new(img.clone()));
        let mine = check(io.as_ref());
        // Compare with qemu-img on a sample (it is slow to start).
        if n % 3 != 0 {
            continue;
        }
        fs::write(env.path("flip.qcow2"), &img).unwrap();
        let q = env.run("qemu-img", &["check", "--output=json", "flip.qcow2"]);
        let code = q.status.code().unwrap();
        *tally.entry(code).or_default() += 1;
        let what = format!(
            "flip at {off}: qemu {code}, vdisk {:?}",
            mine.as_ref().map(|r| &r.messages)
        );
        match (code, &mine) {
            // qemu-img could not check the image (header it refuses, bad snapshot table...).
            (1, Err(_)) => {}
            (1, Ok(r)) if r.exit_code() == 1 => {}
            // No longer qcow2 at all: qemu-img probes raw.
            (63, Err(e)) if e.kind() == vdisk::ErrorKind::UnsupportedFormat => {}
            (_, Err(e)) => bad.push(format!("{what}: {e}")),
            (_, Ok(r)) => {
                let j: Value = serde_json::from_slice(&q.stdout).unwrap_or_default();
                let differ: Vec<&str> = FIELDS
                    .iter()
                    .copied()
                    .filter(|k| field(r, k) != j.get(*k).and_then(Value::as_u64).unwrap_or(0))
                    .collect();
                if !differ.is_empty()
                    || i32::from(r.exit_code()) != code
                    || r.messages != problems(&q.stderr)
                {
                    bad.push(format!(
                        "{what}: fields {differ:?}, qemu said {}",
                        text(&q.stderr)
                    ));
                } else {
                    agreed += 1;
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "{} disagreements:\n{}",
        bad.len(),
        bad.join("\n")
    );
    eprintln!("byte flips: qemu-img exit codes {tally:?}, {agreed} reports agreed");
    assert!(agreed > 100, "only {agreed} comparable flips: {tally:?}");
    // The file-backed path gives the same as memory.
    let f = FileIo::open(&env.path("f.qcow2")).unwrap();
    assert_eq!(check(&f).unwrap(), check(&MemIo::new(orig)).unwrap());
}

#[test]
fn not_a_file_path() {
    let e = check_path(Path::new("/nonexistent/x.qcow2"), None, &mut |_| {}).unwrap_err();
    assert_eq!(e.kind(), vdisk::ErrorKind::NotFound);
}

/// Images qemu-img can or cannot check because of their header or tables, and vdisk alike.
#[test]
fn headers_and_tables_qemu_is_lenient_or_strict_about() {
    let env = Env::new();
    // A v3 snapshot entry without the required extra data: "incomplete".
    env.create("inc.qcow2", "", "64M");
    env.io("inc.qcow2", &["write -P 1 0 64k"]);
    env.qemu_img(&["snapshot", "-c", "s", "inc.qcow2"]);
    let q = Q::new(&env, "inc.qcow2");
    let st = q.get(64, 8);
    q.put(st + 36, 4, 0); // extra_data_size 0: id and name move into the extra data's place
    let r = same(&env, "inc.qcow2", 2);
    assert_eq!(r.problems[0], "ERROR snapshot table entry 0 is incomplete");

    // A header length that is not a multiple of 8 (the spec wants one, qemu does not).
    let q = base(&env, "hl.qcow2", "");
    let head = fs::read(&q.path).unwrap();
    let hl = (105..4096)
        .find(|&h| h % 8 != 0 && head[h..h + 8] == [0; 8])
        .unwrap();
    q.put(100, 4, hl as u64);
    same(&env, "hl.qcow2", 0);

    // Refcount block offsets beyond what qemu can read: check errors, exit 1.
    let q = base(&env, "rbhuge.qcow2", "");
    let rt = q.get(48, 8);
    q.put(rt, 8, 0x8000_0000_0000_0000 | q.get(rt, 8));
    let r = same(&env, "rbhuge.qcow2", 1);
    assert!(r.get("check-errors") > 0);

    // The check cannot run at all: no report from either tool.
    let fails = |name: &str, code: i32| {
        let q = env.run("qemu-img", &["check", "--output=json", name]);
        let v = env.vdisk(&["check", "--output=json", name]);
        assert_eq!(q.status.code(), Some(code), "{name}: {}", text(&q.stderr));
        assert_eq!(v.status.code(), Some(code), "{name}: {}", text(&v.stderr));
        assert_eq!(text(&v.stdout), text(&q.stdout), "{name}");
        assert_eq!(text(&v.stdout), "", "{name}");
    };
    // The end-of-extensions marker with a length running past the header cluster.
    let q = base(&env, "endext.qcow2", "compat=0.10");
    q.put(72, 8, 0x0000_0000_0100_0000);
    fails("endext.qcow2", 1);
    // A bitmap table entry with a reserved bit: qemu cannot load the bitmap.
    env.create("bmbad.qcow2", "", "64M");
    env.qemu_img(&["bitmap", "--add", "bmbad.qcow2", "b"]);
    env.io("bmbad.qcow2", &["write -P 1 0 64k"]);
    let raw = fs::read(env.path("bmbad.qcow2")).unwrap();
    // Find the bitmaps extension, its directory, the bitmap's table.
    let mut off = 112;
    let dir = loop {
        let typ = u32::from_be_bytes(raw[off..off + 4].try_into().unwrap());
        let len = u32::from_be_bytes(raw[off + 4..off + 8].try_into().unwrap()) as usize;
        assert_ne!(typ, 0, "no bitmaps extension");
        if typ == 0x2385_2875 {
            break u64::from_be_bytes(raw[off + 24..off + 32].try_into().unwrap());
        }
        off += 8 + len.div_ceil(8) * 8;
    };
    let q = Q::new(&env, "bmbad.qcow2");
    let table = q.get(dir, 8);
    q.put(table, 8, q.get(table, 8) | 1 << 57);
    fails("bmbad.qcow2", 1);
    // qcow2 magic with version 0 is raw to qemu-img: no check.
    let q = base(&env, "v0.qcow2", "");
    q.put(4, 4, 0);
    fails("v0.qcow2", 63);
}
