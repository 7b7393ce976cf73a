//! Streaming ingest (`vdisk import` and `vdisk::ingest::import`): every kind of stream goes
//! through a pipe (`cat | vdisk import -`), is checked against its source with `qemu-img
//! compare`, and bad streams must fail clearly without leaving a disk that looks complete.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tool(name: &str) {
    common::require_tool(name, "--version");
}

fn sh(script: &str) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()
        .expect("run sh")
}

fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn vdisk() -> &'static str {
    env!("CARGO_BIN_EXE_vdisk")
}

struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Dir {
        tool("qemu-img");
        tool("qemu-io");
        Dir(tempfile::tempdir().unwrap())
    }
    fn p(&self, n: &str) -> PathBuf {
        self.0.path().join(n)
    }
    fn s(&self, n: &str) -> String {
        self.p(n).display().to_string()
    }
}

/// A raw source with random, compressible, zero and hole extents, of `size` bytes.
fn make_raw(path: &Path, size: u64, seed: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut pos = 0u64;
    while pos < size {
        let len = ((next() % 96) + 1) * 4096;
        let len = len.min(size - pos);
        match next() % 4 {
            0 => {
                let b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                f.write_all_at(&b, pos).unwrap();
            }
            1 => {
                let b: Vec<u8> = (0..len)
                    .map(|i| b"stream ingest "[(i % 14) as usize])
                    .collect();
                f.write_all_at(&b, pos).unwrap();
            }
            2 => f.write_all_at(&vec![0u8; len as usize], pos).unwrap(),
            _ => {}
        }
        pos += len;
    }
}

fn compare(a: &str, b: &str) {
    let o = Command::new("qemu-img")
        .args(["compare", a, b])
        .output()
        .unwrap();
    ok(&o, &format!("qemu-img compare {a} {b}"));
}

fn import_pipe(src: &str, dst: &str, extra: &str) -> Output {
    sh(&format!(
        "cat '{src}' | '{}' import {extra} - '{dst}'",
        vdisk()
    ))
}

#[test]
fn every_qcow2_variant_streams_through_a_pipe() {
    let d = Dir::new();
    make_raw(&d.p("src.raw"), 24 << 20, 11);
    let variants: &[(&str, &[&str])] = &[
        ("plain", &[]),
        ("c512", &["-o", "cluster_size=512"]),
        ("c2m", &["-o", "cluster_size=2M"]),
        ("v2", &["-o", "compat=0.10"]),
        ("zlib", &["-c"]),
        ("zstd", &["-c", "-o", "compression_type=zstd"]),
        ("xl2", &["-o", "extended_l2=on,cluster_size=64k"]),
        (
            "xl2zstd",
            &["-c", "-o", "extended_l2=on,compression_type=zstd"],
        ),
        ("refbits1", &["-o", "refcount_bits=1"]),
    ];
    for (name, args) in variants {
        let img = d.s(&format!("{name}.qcow2"));
        let mut c = Command::new("qemu-img");
        c.args(["convert", "-f", "raw", "-O", "qcow2"])
            .args(*args)
            .arg(d.p("src.raw"))
            .arg(&img);
        ok(&c.output().unwrap(), "qemu-img convert");
        let dst = d.s(&format!("{name}.img"));
        ok(&import_pipe(&img, &dst, ""), &format!("import {name}"));
        compare(&img, &dst);
        // Stays sparse: never more allocated than the raw source.
        let (a, b) = (
            std::fs::metadata(&dst).unwrap(),
            std::fs::metadata(d.p("src.raw")).unwrap(),
        );
        use std::os::unix::fs::MetadataExt;
        assert!(
            a.blocks() <= b.blocks() + 8,
            "{name}: import allocates {} blocks, source {}",
            a.blocks(),
            b.blocks()
        );
    }
    // qemu-io-written images: zero clusters, discards, partial subclusters.
    let img = d.s("io.qcow2");
    ok(
        &Command::new("qemu-img")
            .args(["create", "-f", "qcow2", "-o", "extended_l2=on", &img, "20M"])
            .output()
            .unwrap(),
        "create",
    );
    ok(
        &Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-c",
                "write -P 1 0 3M",
                "-c",
                "write -z 1M 4k",
                "-c",
                "discard 2M 64k",
                "-c",
                "write -P 9 19M 1k",
            ])
            .arg(&img)
            .output()
            .unwrap(),
        "qemu-io",
    );
    ok(&import_pipe(&img, &d.s("io.img"), ""), "import io");
    compare(&img, &d.s("io.img"));
}

/// Move the first L2 table of the qcow2 at `p` to the end of the file (as producers that
/// write tables last do), so its data arrives before the table that maps it.
fn move_first_l2_to_end(p: &Path) {
    let mut f = std::fs::read(p).unwrap();
    let be64 = |b: &[u8]| u64::from_be_bytes(b[..8].try_into().unwrap());
    let cs = 1usize << u32::from_be_bytes(f[20..24].try_into().unwrap());
    let l1 = be64(&f[40..]) as usize;
    let e = be64(&f[l1..]);
    let old = (e & 0x00ff_ffff_ffff_fe00) as usize;
    assert_ne!(old, 0, "image has no first L2 table");
    let end = f.len().div_ceil(cs) * cs;
    f.resize(end, 0);
    let table = f[old..old + cs].to_vec();
    f.extend_from_slice(&table);
    f[old..old + cs].fill(0);
    f[l1..l1 + 8].copy_from_slice(&((e & !0x00ff_ffff_ffff_fe00) | end as u64).to_be_bytes());
    std::fs::write(p, f).unwrap();
}

#[test]
fn data_before_its_tables_is_spilled_or_refused() {
    let d = Dir::new();
    make_raw(&d.p("src.raw"), 8 << 20, 5);
    let img = d.s("late.qcow2");
    ok(
        &Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(d.p("src.raw"))
            .arg(&img)
            .output()
            .unwrap(),
        "convert",
    );
    move_first_l2_to_end(&d.p("late.qcow2"));
    // qemu reads it the same (only its refcounts are off).
    compare(&img, &d.s("src.raw"));
    // Budget 0 and no spill: the data that passed before its table is gone, and said so.
    let o = import_pipe(&img, &d.s("refused.img"), "--memory-budget 0 --no-spill");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("before the tables that map it"), "{err}");
    assert!(
        !d.p("refused.img").exists(),
        "a refused import must leave no disk"
    );
    // Budget 0 with spilling: a temporary file is used and said so.
    let o = import_pipe(&img, &d.s("spilled.img"), "--memory-budget 0");
    ok(&o, "spilled import");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("spilling"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    compare(&img, &d.s("spilled.img"));
    let leftovers: Vec<_> = std::fs::read_dir(d.0.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".vdisk-spill"))
        .collect();
    assert!(leftovers.is_empty(), "spill file left behind");
    // A budget that holds the 8 MiB: kept in memory, no spilling.
    let o = import_pipe(&img, &d.s("held.img"), "--memory-budget 16 --no-spill");
    ok(&o, "import held in memory");
    assert!(!String::from_utf8_lossy(&o.stderr).contains("spilling"));
    compare(&img, &d.s("held.img"));
    // qemu-img's own output, plain and compressed (tables before their data, or within
    // the same read), needs no budget at all.
    for (name, args) in [
        ("p.qcow2", &["-O", "qcow2"][..]),
        ("c.qcow2", &["-c", "-O", "qcow2"]),
    ] {
        let q = d.s(name);
        ok(
            &Command::new("qemu-img")
                .arg("convert")
                .args(args)
                .arg(d.p("src.raw"))
                .arg(&q)
                .output()
                .unwrap(),
            "convert",
        );
        let out = d.s(&format!("{name}.img"));
        ok(
            &import_pipe(&q, &out, "--memory-budget 0 --no-spill"),
            "qemu-img output with no budget",
        );
        compare(&q, &out);
    }
}

#[test]
fn compressed_streams_and_tar_wrapped_disks() {
    let d = Dir::new();
    tool("xz");
    tool("zstd");
    make_raw(&d.p("src.raw"), 16 << 20, 9);
    let raw = d.s("src.raw");
    ok(
        &sh(&format!(
            "gzip -c '{raw}' > '{raw}.gz' && xz -T2 --block-size=1MiB -c '{raw}' > '{raw}.xz' && zstd -q -c '{raw}' > '{raw}.zst'"
        )),
        "compress",
    );
    for ext in ["gz", "xz", "zst"] {
        let dst = d.s(&format!("out-{ext}.img"));
        ok(&import_pipe(&format!("{raw}.{ext}"), &dst, ""), ext);
        let o = Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw", &raw, &dst])
            .output()
            .unwrap();
        ok(&o, ext);
    }
    // qcow2 inside xz inside nothing else; and a tar holding a gzipped qcow2.
    let q = d.s("d.qcow2");
    ok(
        &Command::new("qemu-img")
            .args(["convert", "-O", "qcow2", &raw, &q])
            .output()
            .unwrap(),
        "convert",
    );
    ok(
        &sh(&format!(
            "xz -c '{q}' > '{q}.xz' && mkdir -p '{0}/t/disk' && gzip -c '{q}' > '{0}/t/disk/disk.qcow2.gz' && tar -C '{0}/t' -cf '{0}/disk.tar' disk",
            d.0.path().display()
        )),
        "pack",
    );
    ok(
        &import_pipe(&format!("{q}.xz"), &d.s("qx.img"), ""),
        "qcow2.xz",
    );
    compare(&q, &d.s("qx.img"));
    ok(&import_pipe(&d.s("disk.tar"), &d.s("tar.img"), ""), "tar");
    compare(&q, &d.s("tar.img"));
}

#[test]
fn sizing_expansion_and_preallocation_follow_cdi() {
    let d = Dir::new();
    make_raw(&d.p("src.raw"), 8 << 20, 3);
    let src = d.s("src.raw");
    // 100Mi requested, overhead 0.06: usable = RoundDown(ceil(100Mi / 1.06), 1Mi) = 94 MiB.
    let o = sh(&format!(
        "'{}' import --size 100Mi --filesystem-overhead 0.06 '{src}' '{}'",
        vdisk(),
        d.s("a.img")
    ));
    ok(&o, "import");
    let m = std::fs::metadata(d.p("a.img")).unwrap();
    assert_eq!(m.len(), 94 << 20);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(m.permissions().mode() & 0o777, 0o660);
    let o = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &src, &d.s("a.img")])
        .output()
        .unwrap();
    ok(&o, "compare expanded");
    // Preallocation: the whole disk is allocated.
    let o = sh(&format!(
        "'{}' import --preallocation --size 20Mi --filesystem-overhead 0 '{src}' '{}'",
        vdisk(),
        d.s("p.img")
    ));
    ok(&o, "import prealloc");
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(d.p("p.img")).unwrap();
    assert_eq!(m.len(), 20 << 20);
    assert!(
        m.blocks() * 512 >= 20 << 20,
        "preallocated disk has {} bytes allocated",
        m.blocks() * 512
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("preallocated"));
    // pvc-size agrees with CDI's worked numbers.
    let o = Command::new(vdisk())
        .args(["pvc-size", "--size", "11381663335", "--output=json"])
        .output()
        .unwrap();
    ok(&o, "pvc-size");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["usable-size"], 10737418240u64);
    let q = d.s("m.qcow2");
    ok(
        &Command::new("qemu-img")
            .args(["create", "-f", "qcow2", &q, "10G"])
            .output()
            .unwrap(),
        "create",
    );
    let o = Command::new(vdisk())
        .args(["pvc-size", "--output=json", &q])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["required-pvc-size"], 11381663335u64);
}

#[test]
fn bad_streams_fail_and_leave_nothing_complete() {
    let d = Dir::new();
    tool("zstd");
    // A decompression bomb: 1 GiB of zeros into a 10 MiB volume.
    ok(
        &sh(&format!(
            "head -c 1G /dev/zero | zstd -q -c > '{}'",
            d.s("bomb.zst")
        )),
        "bomb",
    );
    let o = import_pipe(&d.s("bomb.zst"), &d.s("bomb.img"), "--size 10Mi");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("is larger than the reported available storage"),
        "{err}"
    );
    assert!(!d.p("bomb.img").exists());
    // qcow2 claiming more than fits is refused before any write.
    let big = d.s("big.qcow2");
    ok(
        &Command::new("qemu-img")
            .args(["create", "-f", "qcow2", &big, "1T"])
            .output()
            .unwrap(),
        "create",
    );
    let o = import_pipe(&big, &d.s("big.img"), "--size 1Gi");
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("virtual image size 1099511627776 is larger")
    );
    // Truncated qcow2 and truncated gzip.
    make_raw(&d.p("src.raw"), 8 << 20, 21);
    let q = d.s("t.qcow2");
    ok(
        &Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(d.p("src.raw"))
            .arg(&q)
            .output()
            .unwrap(),
        "convert",
    );
    let len = std::fs::metadata(&q).unwrap().len();
    ok(
        &sh(&format!(
            "head -c {} '{q}' > '{q}.cut' && gzip -c '{}' | head -c 100000 > '{}'",
            len / 2,
            d.s("src.raw"),
            d.s("cut.gz")
        )),
        "cut",
    );
    for (src, name) in [(format!("{q}.cut"), "cut-qcow2"), (d.s("cut.gz"), "cut-gz")] {
        let o = import_pipe(&src, &d.s(&format!("{name}.img")), "");
        assert!(!o.status.success(), "{name} must fail");
        assert!(!d.p(&format!("{name}.img")).exists(), "{name} left a disk");
    }
    // A qcow2 with a backing file is refused for streams.
    let ov = d.s("ov.qcow2");
    ok(
        &Command::new("qemu-img")
            .args(["create", "-f", "qcow2", "-b", &q, "-F", "qcow2", &ov])
            .output()
            .unwrap(),
        "overlay",
    );
    let o = import_pipe(&ov, &d.s("ov.img"), "");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("backing file"));
    // Garbage after a qcow2 header (corrupt L1 entry) is a clear error.
    let mut b = std::fs::read(&q).unwrap();
    let l1 = u64::from_be_bytes(b[40..48].try_into().unwrap()) as usize;
    b[l1] |= 0x7f;
    std::fs::write(d.p("bad.qcow2"), &b).unwrap();
    let o = import_pipe(&d.s("bad.qcow2"), &d.s("bad.img"), "");
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("reserved bits"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn device_targets_are_zeroed_where_the_image_has_none() {
    // A regular file stands in for the block device: it is not zero-initialised, so every
    // range the image does not hold must be zeroed explicitly.
    let d = Dir::new();
    make_raw(&d.p("src.raw"), 6 << 20, 4);
    let q = d.s("s.qcow2");
    ok(
        &Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(d.p("src.raw"))
            .arg(&q)
            .output()
            .unwrap(),
        "convert",
    );
    std::fs::write(d.p("dev"), vec![0xa5u8; 8 << 20]).unwrap();
    let mut opts = vdisk::ingest::ImportOptions::default();
    let src = std::fs::File::open(&q).unwrap();
    let r = vdisk::ingest::import(
        Box::new(src),
        &vdisk::ingest::ImportTarget::Device(d.p("dev")),
        &mut opts,
    )
    .unwrap();
    assert_eq!(r.virtual_size, 6 << 20);
    let got = std::fs::read(d.p("dev")).unwrap();
    let want = std::fs::read(d.p("src.raw")).unwrap();
    assert_eq!(
        &got[..6 << 20],
        &want[..],
        "device content differs from the image"
    );
    assert!(
        got[6 << 20..].iter().all(|&b| b == 0xa5),
        "bytes past the image must be untouched"
    );
    // The same with O_DIRECT (file systems without it fall back to the page cache).
    std::fs::write(d.p("dev"), vec![0xa5u8; 8 << 20]).unwrap();
    let mut opts = vdisk::ingest::ImportOptions {
        direct_io: true,
        ..Default::default()
    };
    let src = std::fs::File::open(&q).unwrap();
    vdisk::ingest::import(
        Box::new(src),
        &vdisk::ingest::ImportTarget::Device(d.p("dev")),
        &mut opts,
    )
    .unwrap();
    let got = std::fs::read(d.p("dev")).unwrap();
    assert_eq!(&got[..6 << 20], &want[..], "O_DIRECT import differs");
    assert!(got[6 << 20..].iter().all(|&b| b == 0xa5));
    // And a disk file written with O_DIRECT.
    let o = sh(&format!(
        "'{}' import --direct --size 16Mi '{}' '{}'",
        vdisk(),
        q,
        d.s("direct.img")
    ));
    ok(&o, "import --direct");
    let o = Command::new("qemu-img")
        .args(["compare", &q, &d.s("direct.img")])
        .output()
        .unwrap();
    ok(&o, "compare direct");
}

#[test]
fn archives_unpack_safely() {
    let d = Dir::new();
    let root = d.p("a");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("sub/f.txt"), b"hello").unwrap();
    std::os::unix::fs::symlink("f.txt", root.join("sub/ok-link")).unwrap();
    ok(
        &sh(&format!(
            "tar -C '{}' -cf '{}' . && gzip -k '{}'",
            root.display(),
            d.s("good.tar"),
            d.s("good.tar")
        )),
        "tar",
    );
    std::fs::create_dir(d.p("out")).unwrap();
    let o = sh(&format!(
        "cat '{}' | '{}' import --content-type archive - '{}'",
        d.s("good.tar.gz"),
        vdisk(),
        d.s("out")
    ));
    ok(&o, "archive");
    assert_eq!(std::fs::read(d.p("out/sub/f.txt")).unwrap(), b"hello");
    assert_eq!(
        std::fs::read_link(d.p("out/sub/ok-link")).unwrap(),
        Path::new("f.txt")
    );
    // GNU sparse entries stay sparse.
    std::fs::create_dir(d.p("sp")).unwrap();
    ok(
        &sh(&format!(
            "truncate -s 40M '{0}/sp/big' && printf x | dd of='{0}/sp/big' bs=1 seek=30000000 conv=notrunc 2>/dev/null && tar --format=gnu -S -C '{0}/sp' -cf '{0}/sp.tar' big && mkdir '{0}/sp-out'",
            d.0.path().display()
        )),
        "sparse tar",
    );
    ok(
        &sh(&format!(
            "'{}' import --content-type archive '{}' '{}'",
            vdisk(),
            d.s("sp.tar"),
            d.s("sp-out")
        )),
        "sparse unpack",
    );
    assert_eq!(
        std::fs::read(d.p("sp-out/big")).unwrap(),
        std::fs::read(d.p("sp/big")).unwrap()
    );
    use std::os::unix::fs::MetadataExt;
    assert!(
        std::fs::metadata(d.p("sp-out/big")).unwrap().blocks() * 512 < 1 << 20,
        "sparse entry was filled in"
    );
    // Hostile archives, built by hand: each must be refused and write nothing outside.
    let cases: &[(&str, tar::EntryType, &str, Option<&str>)] = &[
        ("dotdot", tar::EntryType::Regular, "../escape.txt", None),
        (
            "abs",
            tar::EntryType::Regular,
            "/tmp/vdisk-abs-escape.txt",
            None,
        ),
        (
            "symlink",
            tar::EntryType::Symlink,
            "evil",
            Some("../../etc"),
        ),
        ("abs-symlink", tar::EntryType::Symlink, "evil", Some("/etc")),
        ("hardlink", tar::EntryType::Link, "evil", Some("../outside")),
        ("device", tar::EntryType::Char, "null", None),
    ];
    for (name, kind, path, link) in cases {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        h.set_size(if kind.is_file() { 4 } else { 0 });
        // Write the raw name so the tar builder's own checks do not stop us.
        let bytes = path.as_bytes();
        h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
        if let Some(l) = link {
            h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_cksum();
        let mut b = tar::Builder::new(Vec::new());
        b.append(
            &h,
            if kind.is_file() {
                &b"evil"[..]
            } else {
                &[][..]
            },
        )
        .unwrap();
        let data = b.into_inner().unwrap();
        let t = d.p(&format!("{name}.tar"));
        std::fs::write(&t, data).unwrap();
        let out = d.p(&format!("out-{name}"));
        std::fs::create_dir(&out).unwrap();
        let o = sh(&format!(
            "cat '{}' | '{}' import --content-type archive - '{}'",
            t.display(),
            vdisk(),
            out.display()
        ));
        assert!(!o.status.success(), "{name}: hostile archive accepted");
        assert!(
            !d.p("escape.txt").exists() && !Path::new("/tmp/vdisk-abs-escape.txt").exists(),
            "{name} escaped"
        );
    }
}

/// A real block device (a loop device), where the machine allows creating one: the import
/// overwrites stale data, reads back equal to the image, and a too-small device is refused.
#[test]
fn loop_device_target() {
    let d = Dir::new();
    let backing = d.p("dev.img");
    std::fs::write(&backing, vec![0x5au8; 32 << 20]).unwrap();
    let o = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&backing)
        .output();
    let dev = match o {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        other => {
            // Only a missing kernel feature or permission may skip this test.
            eprintln!(
                "SKIP loop_device_target: cannot create a loop device here ({other:?}); the file-backed device test covers the logic"
            );
            return;
        }
    };
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }
    let _guard = Detach(dev.clone());
    make_raw(&d.p("src.raw"), 24 << 20, 17);
    let q = d.s("s.qcow2");
    ok(
        &Command::new("qemu-img")
            .args(["convert", "-c", "-O", "qcow2"])
            .arg(d.p("src.raw"))
            .arg(&q)
            .output()
            .unwrap(),
        "convert",
    );
    ok(&import_pipe(&q, &dev, ""), "import to loop device");
    let got = std::fs::read(&dev).unwrap();
    let want = std::fs::read(d.p("src.raw")).unwrap();
    assert_eq!(&got[..24 << 20], &want[..], "device content differs");
    // 48 MiB image on a 32 MiB device: refused before writing.
    let big = d.s("big.qcow2");
    ok(
        &Command::new("qemu-img")
            .args(["create", "-f", "qcow2", &big, "48M"])
            .output()
            .unwrap(),
        "create",
    );
    let o = import_pipe(&big, &dev, "");
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("is larger than the reported available storage 33554432")
    );
}

#[test]
fn sparse_disks_in_tar_import_sparse() {
    // `tar -S` is how sparse disks are shipped: GNU sparse entries (old GNU and PAX forms) are
    // file entries, the first of which is the disk, and its holes stay holes.
    let d = Dir::new();
    tool("tar");
    let raw = d.p("disk.img");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&raw).unwrap();
        f.set_len(256 << 20).unwrap();
        for (k, off) in [0u64, 100 << 20, (256 << 20) - 4096]
            .into_iter()
            .enumerate()
        {
            f.write_all_at(&vec![0x5a + k as u8; 4096], off).unwrap();
        }
    }
    for (name, flags) in [
        ("gnu", "--format=gnu --sparse"),
        ("pax01", "--format=pax --sparse --sparse-version=0.1"),
        ("pax10", "--format=pax --sparse --sparse-version=1.0"),
    ] {
        let t = d.s(&format!("{name}.tar"));
        ok(
            &sh(&format!(
                "cd '{}' && tar {flags} -cf '{t}' disk.img",
                d.s("")
            )),
            "tar -S",
        );
        // The archive is small: only the data is stored.
        assert!(std::fs::metadata(&t).unwrap().len() < 1 << 20, "{name}");
        let out = d.s(&format!("{name}.out"));
        ok(&import_pipe(&t, &out, ""), name);
        compare(&raw.to_string_lossy(), &out);
        let used = std::fs::metadata(&out).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert!(
            used.blocks() * 512 < 8 << 20,
            "{name}: imported disk is not sparse ({} bytes allocated)",
            used.blocks() * 512
        );
    }
}

/// A hostile qcow2 (512-byte clusters) whose `tables` L2 tables name clusters far past the
/// end, none adjacent: millions of mappings that will never get their data.
fn hostile_far_mappings(tables: u64) -> Vec<u8> {
    let cs = 512u64;
    let per = cs / 8;
    let size = tables * per * cs;
    let l1_off = 3 * cs;
    let l1_clusters = (tables * 8).div_ceil(cs);
    let first_l2 = l1_off + l1_clusters * cs;
    let mut b = vec![0u8; (first_l2 + tables * cs) as usize];
    let put32 = |b: &mut [u8], o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_be_bytes());
    let put64 = |b: &mut [u8], o: usize, v: u64| b[o..o + 8].copy_from_slice(&v.to_be_bytes());
    put32(&mut b, 0, 0x5146_49fb);
    put32(&mut b, 4, 3);
    put32(&mut b, 20, 9);
    put64(&mut b, 24, size);
    put32(&mut b, 36, tables as u32);
    put64(&mut b, 40, l1_off);
    put64(&mut b, 48, cs);
    put32(&mut b, 56, 1);
    put32(&mut b, 96, 4);
    put32(&mut b, 100, 104);
    put64(&mut b, cs as usize, 2 * cs);
    for i in 0..tables {
        put64(
            &mut b,
            (l1_off + i * 8) as usize,
            (1 << 63) | (first_l2 + i * cs),
        );
        for k in 0..per {
            let far = (1u64 << 40) + (i * per + k) * 2 * cs;
            put64(
                &mut b,
                (first_l2 + i * cs + k * 8) as usize,
                (1 << 63) | far,
            );
        }
    }
    b
}

#[test]
fn hostile_mappings_stay_within_the_memory_budget() {
    // Before the stream reader shared the file reader's engine and budget, a 46 MB image like
    // this drove `vdisk import` to 763 MiB of RSS. Now every entry point refuses it as the
    // file reader does (data mapped past the end) and the import stays within 64 MiB.
    let d = Dir::new();
    let img = d.p("hostile.qcow2");
    std::fs::write(&img, hostile_far_mappings(90_000)).unwrap();
    let convert = Command::new(vdisk())
        .args(["convert", "-O", "raw"])
        .arg(&img)
        .arg(d.p("c.raw"))
        .output()
        .unwrap();
    assert!(!convert.status.success());
    for flags in [
        "",
        "--memory-budget 1",
        "--no-spill",
        "--memory-budget 1 --no-spill",
    ] {
        let out = d.s("out.img");
        let o = sh(&format!(
            "/usr/bin/time -f 'peak %M' {} import {flags} - '{out}' < '{}'",
            vdisk(),
            img.display()
        ));
        assert!(!o.status.success(), "{flags}: hostile image imported");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("lies past end of file"), "{flags}: {err}");
        let peak: u64 = err
            .lines()
            .find_map(|l| l.strip_prefix("peak "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no peak RSS in {err}"));
        println!("hostile stream, import {flags}: peak RSS {peak} KiB");
        assert!(peak <= 64 * 1024, "{flags}: peak RSS {peak} KiB");
        assert!(!d.p("out.img").exists(), "{flags}: left a disk");
    }
}

#[test]
fn fixed_vhd_streams_front_to_back() {
    // A fixed VHD looks raw from its head: the stream holds its last 512 bytes back and drops
    // them when they are the footer, so the disk has qemu's virtual size and no footer bytes;
    // a raw disk ending in anything else keeps every byte. Nothing is spooled.
    let d = Dir::new();
    make_raw(&d.p("src.raw"), (24 << 20) + 4096, 5);
    let img = d.s("f.vhd");
    let o = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed"])
        .arg(d.p("src.raw"))
        .arg(&img)
        .output()
        .unwrap();
    ok(&o, "qemu-img convert -O vpc");
    let dst = d.s("f.img");
    let out = import_pipe(&img, &dst, "");
    ok(&out, "import fixed vhd");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("(vpc)"), "{log}");
    assert!(!log.contains("spooling"), "{log}");
    // qemu probes a fixed VHD as raw (footer included); with -f vpc it reads the disk.
    let info = Command::new("qemu-img")
        .args(["info", "-f", "vpc", "--output=json", &img])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(
        std::fs::metadata(&dst).unwrap().len(),
        v["virtual-size"].as_u64().unwrap()
    );
    let o = Command::new("qemu-img")
        .args(["compare", "-f", "vpc", "-F", "raw", &img, &dst])
        .output()
        .unwrap();
    ok(&o, "qemu-img compare -f vpc");
    // A footer with a bad checksum is data: the raw disk keeps all its bytes.
    let mut bytes = std::fs::read(&img).unwrap();
    let n = bytes.len();
    bytes[n - 512 + 64] ^= 0xff;
    std::fs::write(d.p("bad.vhd"), &bytes).unwrap();
    let dst = d.s("bad.img");
    ok(&import_pipe(&d.s("bad.vhd"), &dst, ""), "import raw");
    assert_eq!(std::fs::read(&dst).unwrap(), bytes);
}
