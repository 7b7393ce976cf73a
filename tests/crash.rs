//! Crash safety of in-place qcow2 edits and of new-image builds.
//!
//! Power loss is simulated with a storage wrapper that silently drops every write after the
//! first N (N = 0, 1, 2, ... up to the number of writes the operation makes). For every N the
//! image left behind must pass `qemu-img check` with no corruption (leaks are allowed) and
//! read as either the state before or the state after the operation. A killed `vdisk convert`
//! process must never leave a target that looks complete.

mod common;

use std::io;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use vdisk::io::{BlockIo, MemIo};
use vdisk::qcow2::model::Model;

/// Storage that stops persisting writes after `budget` of them (a crash at that instant).
#[derive(Debug)]
struct Crashing {
    inner: MemIo,
    budget: AtomicU64,
    writes: AtomicU64,
}

impl Crashing {
    fn new(data: Vec<u8>, budget: u64) -> Self {
        Crashing {
            inner: MemIo::new(data),
            budget: AtomicU64::new(budget),
            writes: AtomicU64::new(0),
        }
    }
    fn persist(&self) -> bool {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
            .is_ok()
    }
}

impl BlockIo for Crashing {
    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.persist() {
            self.inner.write_all_at(buf, offset)
        } else {
            Ok(())
        }
    }
    fn set_size(&self, size: u64) -> io::Result<()> {
        if self.persist() {
            self.inner.set_size(size)
        } else {
            Ok(())
        }
    }
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    common::require_tool("qemu-img", "--version");
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img")
}

fn qemu_io(img: &Path, cmds: &[&str]) {
    common::require_tool("qemu-io", "--version");
    let mut c = Command::new("qemu-io");
    c.arg("-f").arg("qcow2");
    for x in cmds {
        c.arg("-c").arg(x);
    }
    let out = c.arg(img).output().expect("run qemu-io");
    assert!(
        out.status.success(),
        "qemu-io {cmds:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn content(img: &Path, dir: &Path) -> Vec<u8> {
    let raw = dir.join("content.raw");
    let out = qemu_img(&[
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "qemu-img convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(raw).unwrap()
}

fn corruptions(img: &Path) -> (u64, u64) {
    let out = qemu_img(&["check", "--output=json", img.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "qemu-img check gave no JSON: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(
        v["check-errors"].as_u64(),
        Some(0),
        "qemu-img check could not check {}",
        img.display()
    );
    // qemu-img leaves out zero counts.
    (
        v["corruptions"].as_u64().unwrap_or(0),
        v["leaks"].as_u64().unwrap_or(0),
    )
}

/// Run `op` on the image at `base` with writes cut after every possible count.
fn every_crash_point(name: &str, base: &Path, op: &dyn Fn(&mut Model) -> vdisk::Result<()>) {
    let dir = base.parent().unwrap();
    let original = std::fs::read(base).unwrap();
    let before = content(base, dir);
    // Complete run: how many writes, and the state after.
    let full = Arc::new(Crashing::new(original.clone(), u64::MAX));
    let mut m = Model::load(full.clone()).unwrap();
    op(&mut m).unwrap();
    m.commit().unwrap();
    let total = full.writes.load(Ordering::SeqCst);
    let after_img = dir.join(format!("{name}-after.qcow2"));
    std::fs::write(&after_img, full.inner.to_vec()).unwrap();
    assert_eq!(
        corruptions(&after_img),
        (0, 0),
        "{name}: complete edit must be clean"
    );
    let after = content(&after_img, dir);
    assert!(total >= 3, "{name}: expected several writes, saw {total}");
    for n in 0..total {
        let io = Arc::new(Crashing::new(original.clone(), n));
        let mut m = Model::load(io.clone()).unwrap();
        op(&mut m).unwrap();
        let _ = m.commit();
        let img = dir.join(format!("{name}-crash{n}.qcow2"));
        std::fs::write(&img, io.inner.to_vec()).unwrap();
        let left = io.inner.to_vec();
        // (Byte 79 is the dirty bit only in a version 3 header.)
        if left[4..8] == [0, 0, 0, 3] && left[79] & 1 == 1 {
            // Still dirty: the header was not switched, so this is the old image, whose stale
            // refcounts qemu rebuilds on open anyway.
            assert_eq!(
                left[..104],
                original[..104],
                "{name}: dirty image with a changed header"
            );
        } else {
            let (corrupt, _leaks) = corruptions(&img);
            assert_eq!(
                corrupt, 0,
                "{name}: crash after {n} of {total} writes left corruption"
            );
        }
        let c = content(&img, dir);
        assert!(
            c == before || c == after,
            "{name}: crash after {n} writes: content is neither old nor new"
        );
        std::fs::remove_file(img).unwrap();
    }
}

fn make_base(dir: &Path, opts: &str, with_snapshot: bool) -> std::path::PathBuf {
    let p = dir.join("base.qcow2");
    let out = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        opts,
        p.to_str().unwrap(),
        "8M",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    qemu_io(
        &p,
        &[
            "write -P 0x11 0 300k",
            "write -P 0x22 3M 64k",
            "write -z 5M 64k",
        ],
    );
    if with_snapshot {
        let out = qemu_img(&["snapshot", "-c", "s1", p.to_str().unwrap()]);
        assert!(out.status.success());
        qemu_io(&p, &["write -P 0x33 64k 64k", "discard 3M 64k"]);
    }
    p
}

#[test]
fn snapshot_create_survives_any_crash() {
    let d = tempfile::tempdir().unwrap();
    let base = make_base(d.path(), "cluster_size=4k", true);
    every_crash_point("create", &base, &|m| m.snapshot_create("s2"));
}

#[test]
fn snapshot_apply_and_delete_survive_any_crash() {
    let d = tempfile::tempdir().unwrap();
    let base = make_base(d.path(), "cluster_size=16k,extended_l2=on", true);
    every_crash_point("apply", &base, &|m| m.snapshot_apply("s1"));
    every_crash_point("delete", &base, &|m| m.snapshot_delete("s1"));
}

#[test]
fn resize_survives_any_crash() {
    let d = tempfile::tempdir().unwrap();
    let base = make_base(d.path(), "cluster_size=4k,refcount_bits=1", false);
    every_crash_point("grow", &base, &|m| m.resize(40 << 20, false));
    every_crash_point("grow-prealloc", &base, &|m| m.resize(9 << 20, true));
    every_crash_point("shrink", &base, &|m| m.resize(1 << 20, false));
}

#[test]
fn refcount_rebuild_survives_any_crash_and_cleans_a_dirty_image() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("dirty.qcow2");
    let out = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        p.to_str().unwrap(),
        "8M",
    ]);
    assert!(out.status.success());
    // qemu-io killed mid-session leaves the dirty bit and stale refcounts.
    let _ = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 7 0 1M", "-c", "sigraise 9"])
        .arg(&p)
        .output();
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(
        bytes[79] & 1,
        1,
        "qemu-io should have left the dirty bit set"
    );
    every_crash_point("rebuild", &p, &|_| Ok(()));
    let after = std::fs::read(d.path().join("rebuild-after.qcow2")).unwrap();
    assert_eq!(after[79] & 1, 0, "a rebuilt image is clean");
}

/// `make_base`'s image as an overlay of a backing file `b1.qcow2` (4k clusters, its own
/// pattern), with a second candidate backing file `b2.qcow2` that shares part of it.
fn make_chain(dir: &Path, opts: &str) -> std::path::PathBuf {
    let b1 = dir.join("b1.qcow2");
    let b2 = dir.join("b2.qcow2");
    for (b, cmds) in [
        (&b1, &["write -P 0x41 0 2M", "write -P 0x42 6M 1M"][..]),
        (&b2, &["write -P 0x41 0 1M", "write -P 0x43 7M 512k"][..]),
    ] {
        let out = qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            b.to_str().unwrap(),
            "8M",
        ]);
        assert!(out.status.success());
        qemu_io(b, cmds);
    }
    let p = dir.join("top.qcow2");
    let out = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "b1.qcow2",
        "-F",
        "qcow2",
        "-o",
        opts,
        p.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    qemu_io(&p, &["write -P 0x11 100k 300k", "write -z 6M 64k"]);
    p
}

fn open(p: &Path) -> vdisk::Image {
    vdisk::Image::open(p, &vdisk::OpenOptions::default()).unwrap()
}

#[test]
fn rebase_survives_any_crash() {
    for opts in ["cluster_size=64k", "cluster_size=16k,extended_l2=on"] {
        let d = tempfile::tempdir().unwrap();
        let top = make_chain(d.path(), opts);
        let old = open(&top);
        let new = open(&d.path().join("b2.qcow2"));
        // Onto another backing file, and onto none: the guest content never changes.
        every_crash_point("rebase", &top, &|m| {
            vdisk::edit::copy_what_the_backing_changes(m, &old, Some(&new), &mut |_, _| {})?;
            m.set_backing(Some(("b2.qcow2".into(), Some("qcow2".into()))))
        });
        every_crash_point("flatten", &top, &|m| {
            vdisk::edit::copy_what_the_backing_changes(m, &old, None, &mut |_, _| {})?;
            m.set_backing(None)
        });
        let before = content(&top, d.path());
        for name in ["rebase", "flatten"] {
            let after = d.path().join(format!("{name}-after.qcow2"));
            assert!(
                content(&after, d.path()) == before,
                "{name} ({opts}) changed the guest's disk"
            );
        }
    }
}

#[test]
fn commit_survives_any_crash() {
    let d = tempfile::tempdir().unwrap();
    let top = make_chain(d.path(), "cluster_size=64k");
    let top_img = open(&top);
    // The base takes the overlay's data (old or new base at every instant) ...
    every_crash_point("commit", &d.path().join("b1.qcow2"), &|m| {
        vdisk::edit::commit_into(m, &top_img, 1, &mut |_, _| {})
    });
    drop(top_img);
    // ... and emptying the overlay afterwards is crash-safe too.
    std::fs::copy(
        d.path().join("commit-after.qcow2"),
        d.path().join("b1.qcow2"),
    )
    .unwrap();
    let whole = content(&top, d.path());
    every_crash_point("empty", &top, &|m| m.make_empty());
    assert!(content(&d.path().join("empty-after.qcow2"), d.path()) == whole);
}

#[test]
fn amend_survives_any_crash() {
    let d = tempfile::tempdir().unwrap();
    let base = make_base(d.path(), "cluster_size=4k", true);
    every_crash_point("downgrade", &base, &|m| m.set_version(2));
    every_crash_point("refcount-64", &base, &|m| m.set_refcount_order(6));
    every_crash_point("lazy", &base, &|m| m.set_lazy_refcounts(true));
    let v2 = d.path().join("v2.qcow2");
    std::fs::copy(d.path().join("downgrade-after.qcow2"), &v2).unwrap();
    every_crash_point("upgrade", &v2, &|m| m.set_version(3));
    // Zero clusters over a backing file become clusters of zeros.
    let top = make_chain(d.path(), "cluster_size=64k");
    every_crash_point("downgrade-backed", &top, &|m| m.set_version(2));
}

/// A `vdisk convert` killed at any moment leaves no file at the target name.
#[test]
fn killed_convert_leaves_no_complete_looking_target() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.raw");
    {
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(256 << 20).unwrap();
        let mut x: u64 = 7;
        let chunk: Vec<u8> = (0..(1 << 20))
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 7) as u8
            })
            .collect();
        use std::os::unix::fs::FileExt;
        for i in 0..64u64 {
            f.write_all_at(&chunk, i * (4 << 20)).unwrap();
        }
    }
    for (k, args) in [
        &["-O", "raw"][..],
        &["-O", "qcow2"][..],
        &["-O", "qcow2", "-c"][..],
    ]
    .iter()
    .enumerate()
    {
        for delay_ms in [0u64, 5, 20, 60] {
            let dst = d.path().join(format!("dst{k}-{delay_ms}"));
            let mut child = Command::new(env!("CARGO_BIN_EXE_vdisk"))
                .arg("convert")
                .args(*args)
                .arg(&src)
                .arg(&dst)
                .spawn()
                .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(delay_ms));
            let _ = child.kill();
            let status = child.wait().unwrap();
            if status.success() {
                // Finished before the kill: the target must then be complete and valid.
                let out = qemu_img(&[
                    "compare",
                    "-f",
                    "raw",
                    src.to_str().unwrap(),
                    dst.to_str().unwrap(),
                ]);
                assert!(out.status.success(), "finished conversion differs");
            } else {
                assert!(!dst.exists(), "killed conversion left {}", dst.display());
            }
        }
    }
}

/// `vdisk check -r all` repairs a dirty image's stale refcounts (qemu-img then finds it
/// clean); `-r leaks` leaves corruptions alone and says so.
#[test]
fn check_repair_rebuilds_refcounts() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("dirty.qcow2");
    let out = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        p.to_str().unwrap(),
        "8M",
    ]);
    assert!(out.status.success());
    let _ = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 7 0 1M", "-c", "sigraise 9"])
        .arg(&p)
        .output();
    let before = content(&p, d.path());
    let v = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_vdisk"))
            .args(args)
            .arg(&p)
            .output()
            .unwrap()
    };
    assert_eq!(
        v(&["check"]).status.code(),
        Some(2),
        "stale refcounts are corruptions"
    );
    let o = v(&["check", "-r", "leaks"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("-r all"));
    let o = v(&["check", "-r", "all"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("No errors were found"));
    assert_eq!(corruptions(&p), (0, 0));
    assert_eq!(
        content(&p, d.path()),
        before,
        "repair must not change the disk's content"
    );
}

#[test]
fn bitmap_changes_survive_any_crash() {
    let d = tempfile::tempdir().unwrap();
    let base = make_base(d.path(), "cluster_size=4k", true);
    let p = base.to_str().unwrap();
    for args in [
        &["bitmap", "--add", p, "b0"][..],
        &["bitmap", "--add", "-g", "64k", "--disable", p, "b1"],
    ] {
        assert!(qemu_img(args).status.success());
    }
    // qemu-io marks the enabled bitmap as it writes.
    qemu_io(&base, &["write -P 0x44 1M 256k"]);
    every_crash_point("bitmap-add", &base, &|m| m.bitmap_add("c", Some(512), true));
    every_crash_point("bitmap-merge", &base, &|m| {
        let (bits, g) = m.bitmap_bits("b0")?;
        m.bitmap_merge("b1", &bits, g)
    });
    every_crash_point("bitmap-remove", &base, &|m| m.bitmap_remove("b0"));
    // Edits that keep bitmaps count their clusters.
    every_crash_point("snapshot-with-bitmaps", &base, &|m| m.snapshot_create("s2"));
    every_crash_point("amend-with-bitmaps", &base, &|m| m.set_refcount_order(5));
}
