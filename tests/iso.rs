//! The ISO 9660 writer and the cloud-init seed, read back by the readers users run: xorriso's
//! osirrox (extract and compare the whole tree: bytes, names, modes, owners, times, links),
//! isoinfo (descriptors, Joliet and primary names), blkid (label and type), cloud-init's own
//! NoCloud datasource (Debian's package), the kernel when it can mount iso9660 here, and
//! qemu-img for seeds written as qcow2. Hostile trees get clear errors and leave no file.

mod common;

use common::{require_tool, run, run_ok, stderr, stdout};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

fn vdisk() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vdisk"))
}

fn tools() {
    require_tool("xorriso", "-version");
    require_tool("osirrox", "-version");
    require_tool("isoinfo", "--version");
    require_tool("blkid", "-V");
    require_tool("qemu-img", "--version");
}

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vdisk-iso-")
        .tempdir()
        .unwrap()
}

fn write(p: &Path, data: &[u8]) {
    if let Some(d) = p.parent() {
        fs::create_dir_all(d).unwrap();
    }
    fs::write(p, data).unwrap();
}

fn set_mtime(p: &Path, t: i64) {
    run_ok(
        Command::new("touch")
            .arg("-h")
            .arg("-d")
            .arg(format!("@{t}"))
            .arg(p),
    );
}

/// Everything under `root` as (relative path, description): type, permissions, owner, size
/// and content hash or link target, and the mtime where `times` (not for links: osirrox does
/// not restore them).
fn describe(root: &Path, times: bool) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, times: bool, out: &mut BTreeMap<String, String>) {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        for p in names {
            let m = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().to_string();
            let own = format!("{:o} {}:{}", m.mode() & 0o7777, m.uid(), m.gid());
            let d = if m.file_type().is_symlink() {
                format!("link -> {}", fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                walk(root, &p, times, out);
                format!(
                    "dir {own}{}",
                    if times {
                        format!(" {}", m.mtime())
                    } else {
                        String::new()
                    }
                )
            } else {
                let data = fs::read(&p).unwrap();
                format!(
                    "file {own} {} {:016x}{}",
                    data.len(),
                    fnv(&data),
                    if times {
                        format!(" {}", m.mtime())
                    } else {
                        String::new()
                    }
                )
            };
            out.insert(rel, d);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, times, &mut out);
    out
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Extract `iso` with osirrox into `dest` and return the description of what came out.
fn osirrox_extract(iso: &Path, dest: &Path) -> BTreeMap<String, String> {
    let _ = fs::remove_dir_all(dest);
    run_ok(
        Command::new("osirrox")
            .arg("-indev")
            .arg(iso)
            .args(["-extract", "/"])
            .arg(dest),
    );
    describe(dest, true)
}

fn blkid(iso: &Path) -> String {
    stdout(&run_ok(
        Command::new("blkid").args(["-p", "-o", "export"]).arg(iso),
    ))
}

fn isoinfo(args: &[&str], iso: &Path) -> String {
    stdout(&run_ok(
        Command::new("isoinfo").args(args).arg("-i").arg(iso),
    ))
}

/// A tree with what trips writers: long, Unicode, colliding and dotted names, empty and
/// sector-edge files, random data, a sparse file, hard links, every kind of link, odd modes
/// and owners, old and new times, seven directory levels.
fn hostile_but_valid_tree(root: &Path) {
    write(&root.join("user-data"), b"#cloud-config\n");
    write(&root.join("empty"), b"");
    fs::create_dir_all(root.join("empty-dir")).unwrap();
    for (i, n) in [1usize, 2047, 2048, 2049, 65536, 1 << 20]
        .iter()
        .enumerate()
    {
        write(
            &root.join(format!("sizes/f{i}.bin")),
            &common::random_bytes(*n, i as u64),
        );
    }
    write(&root.join("L".repeat(255)), b"longest name");
    write(
        &root.join(format!("d/{}", "x".repeat(200))),
        b"long in a dir",
    );
    write(
        &root.join("Unicode \u{e9}\u{2603} \u{1F600} name.txt"),
        b"utf8",
    );
    write(
        &root.join("a:b*c?d\\e;f.txt"),
        b"joliet-forbidden characters",
    );
    for n in ["README", "readme", "ReadMe", "read.me", "READ_ME"] {
        write(&root.join("case").join(n), n.as_bytes());
    }
    for i in 0..40 {
        write(
            &root.join(format!("many/long_file_name_{i:02}.configuration")),
            format!("{i}").as_bytes(),
        );
    }
    write(&root.join("dots/a.b.c.d"), b"dots");
    write(&root.join("dots/.hidden"), b"hidden");
    write(&root.join("dots/trailing."), b"trailing dot");
    let deep = root.join("1/2/3/4/5/6/7");
    write(&deep.join("deepest.txt"), b"seven levels below the root");
    // A sparse file: 32 MiB with data at three places.
    let sparse = root.join("sparse.img");
    let f = fs::File::create(&sparse).unwrap();
    f.set_len(32 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    for off in [0u64, 5 << 20, (32 << 20) - 4096] {
        f.write_all_at(&common::random_bytes(4096, off), off)
            .unwrap();
    }
    drop(f);
    fs::hard_link(root.join("sizes/f5.bin"), root.join("hardlink.bin")).unwrap();
    symlink("user-data", root.join("rel-link")).unwrap();
    symlink("../../user-data", root.join("d/up-link")).unwrap();
    symlink("/etc/hostname", root.join("abs-link")).unwrap();
    symlink("does/not/exist", root.join("dangling")).unwrap();
    symlink("loop-b", root.join("loop-a")).unwrap();
    symlink("loop-a", root.join("loop-b")).unwrap();
    symlink("1/2/3", root.join("dir-link")).unwrap();
    symlink(
        format!("{}/{}", "y".repeat(250), "z".repeat(250)),
        root.join("long-target"),
    )
    .unwrap();
    symlink("./a/../b/./c", root.join("dotted-target")).unwrap();
    for (p, mode) in [
        ("user-data", 0o600),
        ("sizes/f0.bin", 0o755),
        ("sizes/f1.bin", 0o444),
        ("empty", 0o4755),
    ] {
        fs::set_permissions(root.join(p), fs::Permissions::from_mode(mode)).unwrap();
    }
    fs::set_permissions(root.join("case"), fs::Permissions::from_mode(0o700)).unwrap();
    run_ok(
        Command::new("chown")
            .arg("1234:5678")
            .arg(root.join("sizes/f2.bin")),
    );
    run_ok(
        Command::new("chown")
            .arg("-h")
            .arg("42:43")
            .arg(root.join("rel-link")),
    );
    // Times: some old, one before 1970, the rest whatever now is.
    for (p, t) in [
        ("user-data", 1_000_000_000i64),
        ("sizes/f3.bin", -86_400 * 365),
        ("d", 1_234_567_890),
    ] {
        set_mtime(&root.join(p), t);
    }
}

#[test]
fn tree_read_back_by_osirrox_isoinfo_blkid() {
    tools();
    let t = tmp();
    let src = t.path().join("src");
    hostile_but_valid_tree(&src);
    let iso = t.path().join("out.iso");
    let o = run_ok(
        vdisk()
            .args(["create", "-f", "iso", "-o", "volid=TESTVOL"])
            .arg(&src)
            .arg(&iso),
    );
    assert!(
        stdout(&o).contains("fmt=iso volid=TESTVOL"),
        "{}",
        stdout(&o)
    );

    // osirrox: the whole tree, byte for byte, with names, modes, owners, times and links.
    let want = describe(&src, true);
    let got = osirrox_extract(&iso, &t.path().join("ex"));
    for (k, v) in &want {
        assert_eq!(got.get(k), Some(v), "{k} after osirrox extraction");
    }
    assert_eq!(got.len(), want.len(), "no extra entries");

    // The sparse file stays sparse in the image: far less allocated than its 32 MiB.
    let alloc = fs::metadata(&iso).unwrap().blocks() * 512;
    assert!(
        alloc < fs::metadata(&iso).unwrap().len() - (24 << 20),
        "allocated {alloc}"
    );

    // isoinfo: descriptors, both extensions, and names in all three trees.
    let d = isoinfo(&["-d"], &iso);
    assert!(d.contains("Volume id: TESTVOL"), "{d}");
    assert!(d.contains("Joliet with UCS level 3 found"), "{d}");
    assert!(d.contains("Rock Ridge signatures version 1 found"), "{d}");
    let size_line = d
        .lines()
        .find(|l| l.starts_with("Volume size is:"))
        .unwrap();
    let sectors: u64 = size_line.rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(sectors * 2048, fs::metadata(&iso).unwrap().len());
    let rr = isoinfo(&["-R", "-f"], &iso);
    assert!(
        rr.lines().any(|l| l == format!("/{}", "L".repeat(255))),
        "Rock Ridge long name"
    );
    assert!(rr.lines().any(|l| l == "/1/2/3/4/5/6/7/deepest.txt"));
    let joliet = isoinfo(&["-J", "-f"], &iso);
    let jnames: Vec<&str> = joliet.lines().collect();
    assert!(jnames.contains(&"/user-data"), "{joliet}");
    assert!(jnames.contains(&"/case/ReadMe"), "{joliet}");
    assert!(
        jnames
            .iter()
            .all(|l| l.rsplit('/').next().unwrap().chars().count() <= 64)
    );
    let plain = isoinfo(&["-f"], &iso);
    let mut seen = std::collections::HashSet::new();
    for l in plain.lines() {
        assert!(seen.insert(l.to_string()), "primary names unique: {l}");
        let leaf = l.rsplit('/').next().unwrap();
        assert!(
            leaf.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b"_.;".contains(&b)),
            "d-characters only: {l}"
        );
    }
    assert!(plain.lines().any(|l| l == "/USER_DAT.;1"), "{plain}");

    // blkid probes the filesystem itself.
    let b = blkid(&iso);
    assert!(
        b.contains("LABEL=TESTVOL") && b.contains("TYPE=iso9660"),
        "{b}"
    );

    // And vdisk's own reader agrees with qemu-img that it is a raw disk of that size.
    let info = stdout(&run_ok(vdisk().args(["info", "--output=json"]).arg(&iso)));
    assert!(
        info.contains("\"format\": \"iso\"") || info.contains("\"format\": \"raw\""),
        "{info}"
    );
    let q = stdout(&run_ok(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&iso),
    ));
    assert!(
        q.contains(&format!("\"virtual-size\": {}", sectors * 2048)),
        "{q}"
    );

    // Sizes against xorriso -as mkisofs -R -J for the same tree (it pads 300 KiB and copies
    // hard links twice).
    let x = t.path().join("x.iso");
    run_ok(
        Command::new("xorriso")
            .args(["-as", "mkisofs", "-R", "-J", "-V", "TESTVOL", "-o"])
            .arg(&x)
            .arg(&src),
    );
    let (ours, theirs) = (
        fs::metadata(&iso).unwrap().len(),
        fs::metadata(&x).unwrap().len(),
    );
    eprintln!("size: vdisk {ours} bytes, xorriso -as mkisofs -R -J {theirs} bytes");
    assert!(ours <= theirs, "vdisk {ours} > xorriso {theirs}");

    // The kernel, where it can mount iso9660 (a kernel feature; not available everywhere).
    try_mount(&iso, &src, t.path());
}

/// Mount `iso` read-only through a loop device and compare with `src`; says SKIP when the
/// kernel has no iso9660 or loop support here.
fn try_mount(iso: &Path, src: &Path, work: &Path) {
    let fs_ok = fs::read_to_string("/proc/filesystems").is_ok_and(|s| s.contains("iso9660"));
    let mnt = work.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let o = run(Command::new("mount")
        .args(["-o", "loop,ro", "-t", "iso9660"])
        .arg(iso)
        .arg(&mnt));
    if !o.status.success() {
        let e = stderr(&o);
        assert!(
            !fs_ok || e.contains("loop") || e.contains("permission") || e.contains("not permitted"),
            "mount failed although the kernel has iso9660: {e}"
        );
        eprintln!(
            "SKIP kernel mount: this kernel cannot mount iso9660 here ({})",
            e.trim()
        );
        return;
    }
    let got = describe(&mnt, false);
    let _ = Command::new("umount").arg(&mnt).status();
    let want = describe(src, false);
    for (k, v) in &want {
        assert_eq!(got.get(k), Some(v), "{k} through the kernel");
    }
}

#[test]
fn deterministic_under_source_date_epoch_and_streamable() {
    tools();
    let t = tmp();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    for root in [&a, &b] {
        write(&root.join("x/y.txt"), b"same content");
        write(&root.join("z"), &common::random_bytes(5000, 1));
        symlink("x/y.txt", root.join("l")).unwrap();
    }
    // b's files are touched later: with SOURCE_DATE_EPOCH in the past both clamp to it.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    for p in ["x/y.txt", "z", "x"] {
        set_mtime(&b.join(p), 2_000_000_000);
    }
    let mk = |src: &Path, out: &str, epoch: Option<&str>| -> Vec<u8> {
        let dst = t.path().join(out);
        let mut c = vdisk();
        c.args(["create", "-q", "-f", "iso", "-o", "volid=REPRO"])
            .arg(src)
            .arg(&dst);
        match epoch {
            Some(e) => c.env("SOURCE_DATE_EPOCH", e),
            None => c.env_remove("SOURCE_DATE_EPOCH"),
        };
        run_ok(&mut c);
        fs::read(dst).unwrap()
    };
    let e = Some("1700000000");
    let one = mk(&a, "1.iso", e);
    let two = mk(&a, "2.iso", e);
    let other = mk(&b, "3.iso", e);
    assert_eq!(one, two, "same tree, same bytes");
    assert_eq!(
        one, other,
        "times after SOURCE_DATE_EPOCH are clamped to it"
    );
    assert!(isoinfo(&["-d"], &t.path().join("1.iso")).contains("Volume id: REPRO"));
    // Volume dates say the epoch (2023-11-14 22:13:20 UTC).
    assert!(one.windows(16).any(|w| w == b"2023111422132000"));
    // A different epoch gives different bytes.
    assert_ne!(one, mk(&a, "4.iso", Some("1600000000")));
    // Streamed to standard output: the same bytes as the file.
    let o = run_ok(
        vdisk()
            .args(["create", "-f", "iso", "-o", "volid=REPRO"])
            .arg(&a)
            .arg("-")
            .env("SOURCE_DATE_EPOCH", "1700000000"),
    );
    assert_eq!(o.stdout, one, "stdout stream equals the file");
    // Options: no Joliet, no Rock Ridge, level 2 names.
    let dst = t.path().join("plain.iso");
    run_ok(
        vdisk()
            .args([
                "create",
                "-q",
                "-f",
                "iso",
                "-o",
                "volid=P,joliet=off,rockridge=off,iso_level=2",
            ])
            .arg(&a)
            .arg(&dst),
    );
    let d = isoinfo(&["-d"], &dst);
    assert!(
        d.contains("NO Joliet present") && d.contains("NO Rock Ridge present"),
        "{d}"
    );
    assert!(isoinfo(&["-f"], &dst).lines().any(|l| l == "/X/Y.TXT;1"));
    let help = stdout(&run_ok(
        vdisk().args(["create", "-f", "iso", "-o", "help", "x", "y"]),
    ));
    assert!(help.contains("volid=<str>"), "{help}");
}

#[test]
fn big_file_is_multi_extent() {
    tools();
    let t = tmp();
    let src = t.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let big = src.join("big.raw");
    let f = fs::File::create(&big).unwrap();
    let size: u64 = (5 << 30) + 12345;
    f.set_len(size).unwrap();
    use std::os::unix::fs::FileExt;
    let marks = [0u64, (4 << 30) - 2048 - 100, 4 << 30, size - 4096];
    for &m in &marks {
        f.write_all_at(&common::random_bytes(4096.min((size - m) as usize), m), m)
            .unwrap();
    }
    drop(f);
    write(&src.join("small"), b"after the big one");
    let iso = t.path().join("big.iso");
    // Memory is bounded whatever the file size: peak RSS measured by time(1).
    let rss = t.path().join("rss");
    run_ok(
        Command::new("/usr/bin/time")
            .args(["-f", "%M", "-o"])
            .arg(&rss)
            .arg(env!("CARGO_BIN_EXE_vdisk"))
            .args(["create", "-q", "-f", "iso", "-o", "volid=BIG"])
            .arg(&src)
            .arg(&iso),
    );
    let kib: u64 = fs::read_to_string(&rss).unwrap().trim().parse().unwrap();
    assert!(kib < 32 << 10, "peak RSS {kib} KiB writing a 5 GiB file");
    let ls = stdout(&run_ok(
        Command::new("xorriso")
            .arg("-indev")
            .arg(&iso)
            .args(["-find", "/", "-exec", "lsdl"]),
    ));
    assert!(ls.contains(&format!(" {size} ")), "{ls}");
    // Windows around each mark and across the extent boundaries, cut out by xorriso's
    // reader, equal the source bytes there.
    let src_bytes = fs::File::open(&big).unwrap();
    let boundary = 0xFFFF_F800u64;
    let mut starts: Vec<u64> = marks.iter().map(|&m| m.saturating_sub(3000)).collect();
    starts.extend([boundary - 5000, size - 9000]);
    for (i, &start) in starts.iter().enumerate() {
        let len = 9000.min(size - start);
        let piece = t.path().join(format!("piece{i}"));
        run_ok(
            Command::new("xorriso")
                .arg("-indev")
                .arg(&iso)
                .args([
                    "-extract_cut",
                    "/big.raw",
                    &start.to_string(),
                    &len.to_string(),
                ])
                .arg(&piece),
        );
        let mut want = vec![0u8; len as usize];
        src_bytes.read_exact_at(&mut want, start).unwrap();
        assert_eq!(fs::read(&piece).unwrap(), want, "bytes at {start}");
    }
    let small = t.path().join("small.out");
    run_ok(
        Command::new("osirrox")
            .arg("-indev")
            .arg(&iso)
            .args(["-extract", "/small"])
            .arg(&small),
    );
    assert_eq!(fs::read(&small).unwrap(), b"after the big one");
}

fn nocloud(args: &[&str]) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/nocloud-read.py");
    let o = run_ok(
        Command::new("/usr/bin/python3")
            .arg(script)
            .args(args)
            .env("BLKID_FILE", "/dev/null"),
    );
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(&o)))
}

#[test]
fn cidata_read_by_cloud_init() {
    tools();
    assert!(
        Path::new("/usr/lib/python3/dist-packages/cloudinit/__init__.py").exists(),
        "cloud-init is required (Debian package cloud-init; run scripts/deps.sh)"
    );
    let t = tmp();
    let p = |n: &str| t.path().join(n);
    let ud = "#cloud-config\nusers:\n  - name: kubevirt\n    ssh_authorized_keys: [\"ssh-ed25519 AAAAC3 test\"]\nruncmd: [\"echo hi\"]\n";
    let md = "instance-id: vm-42\nlocal-hostname: fedora-vm\n";
    let net = "version: 2\nethernets:\n  enp1s0:\n    dhcp4: true\n";
    let vd = "#cloud-config\npackages: [htop]\n";
    write(&p("ud"), ud.as_bytes());
    write(&p("md"), md.as_bytes());
    write(&p("net"), net.as_bytes());
    write(&p("vd"), vd.as_bytes());
    let seed = p("seed.iso");
    let o = run_ok(
        vdisk()
            .args(["cidata", "--user-data"])
            .arg(p("ud"))
            .arg("--meta-data")
            .arg(p("md"))
            .arg("--network-config")
            .arg(p("net"))
            .arg("--vendor-data")
            .arg(p("vd"))
            .arg(&seed),
    );
    assert!(stdout(&o).contains("label cidata"), "{}", stdout(&o));
    let b = blkid(&seed);
    assert!(
        b.contains("LABEL=cidata") && b.contains("TYPE=iso9660"),
        "{b}"
    );
    let ex = osirrox_extract(&seed, &p("ex"));
    assert_eq!(ex.len(), 4, "{ex:?}");
    let v = nocloud(&["dir", p("ex").to_str().unwrap(), p("w").to_str().unwrap()]);
    assert_eq!(v["userdata_raw"], ud, "{v}");
    assert_eq!(v["metadata"]["instance-id"], "vm-42", "{v}");
    assert_eq!(v["metadata"]["local-hostname"], "fedora-vm", "{v}");
    assert_eq!(v["vendordata_raw"], vd, "{v}");
    assert_eq!(
        v["network_config"]["ethernets"]["enp1s0"]["dhcp4"], true,
        "{v}"
    );

    // Without meta-data: an instance id from the content, stable, changing with it.
    let id_of = |name: &str, ud_file: &str| -> String {
        let s = p(name);
        run_ok(
            vdisk()
                .args(["cidata", "-q", "--user-data"])
                .arg(p(ud_file))
                .arg(&s),
        );
        let v = nocloud(&[
            "dir",
            osirrox_dir(&s, &p(&format!("{name}.ex"))).to_str().unwrap(),
            p(&format!("{name}.w")).to_str().unwrap(),
        ]);
        assert_eq!(
            v["userdata_raw"].as_str().unwrap(),
            fs::read_to_string(p(ud_file)).unwrap()
        );
        v["instance_id"].as_str().unwrap().to_string()
    };
    let i1 = id_of("s1.iso", "ud");
    let i2 = id_of("s2.iso", "ud");
    let i3 = id_of("s3.iso", "vd");
    assert!(i1.starts_with("iid-"), "{i1}");
    assert_eq!(i1, i2);
    assert_ne!(i1, i3);

    // As qcow2: clean by qemu-img check, and the same disk as the raw seed.
    let q = p("seed.qcow2");
    run_ok(
        vdisk()
            .args(["cidata", "-q", "-O", "qcow2", "--user-data"])
            .arg(p("ud"))
            .arg("--meta-data")
            .arg(p("md"))
            .arg(&q)
            .env("SOURCE_DATE_EPOCH", "1700000000"),
    );
    let raw = p("seed2.iso");
    run_ok(
        vdisk()
            .args(["cidata", "-q", "--user-data"])
            .arg(p("ud"))
            .arg("--meta-data")
            .arg(p("md"))
            .arg(&raw)
            .env("SOURCE_DATE_EPOCH", "1700000000"),
    );
    run_ok(
        Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(&q),
    );
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(&q)
            .arg(&raw),
    );

    // cloud-init's own device search (blkid for LABEL=cidata), and its mount where the
    // kernel can mount iso9660.
    let o = Command::new("losetup")
        .args(["-f", "--show", "-r"])
        .arg(&seed)
        .output();
    let dev = match o {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        other => {
            eprintln!("SKIP cloud-init device search: no loop device here ({other:?})");
            return;
        }
    };
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }
    let _g = Detach(dev.clone());
    let v = nocloud(&["devices", p("wd").to_str().unwrap()]);
    let devs: Vec<&str> = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d.as_str())
        .collect();
    assert!(
        devs.contains(&dev.as_str()),
        "cloud-init did not find {dev}: {v}"
    );
    if fs::read_to_string("/proc/filesystems").is_ok_and(|s| s.contains("iso9660")) {
        assert_eq!(v["userdata_raw"], ud, "{v}");
        assert_eq!(v["metadata"]["instance-id"], "vm-42", "{v}");
    } else {
        eprintln!("SKIP cloud-init mount of {dev}: this kernel has no iso9660 filesystem");
    }
}

fn osirrox_dir(iso: &Path, dest: &Path) -> PathBuf {
    osirrox_extract(iso, dest);
    dest.to_path_buf()
}

fn no_output(dir: &Path, name: &str) {
    let left: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(name))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

fn fails(c: &mut Command, why: &str) -> String {
    let o = run(c);
    assert_eq!(o.status.code(), Some(1), "{why}: {}", stderr(&o));
    stderr(&o)
}

#[test]
fn hostile_trees_are_refused_cleanly() {
    tools();
    let t = tmp();
    let out = t.path().join("out");
    fs::create_dir_all(&out).unwrap();
    let iso = out.join("x.iso");

    // Too deep: eight directory levels below the root.
    let deep = t.path().join("deep");
    write(&deep.join("1/2/3/4/5/6/7/8/f"), b"x");
    let e = fails(
        vdisk()
            .args(["create", "-f", "iso", "-q"])
            .arg(&deep)
            .arg(&iso),
        "too deep",
    );
    assert!(
        e.contains("too deep") && e.contains("1/2/3/4/5/6/7/8"),
        "{e}"
    );
    no_output(&out, "x.iso");

    // A FIFO cannot be represented (and is never opened).
    let fifo = t.path().join("fifo");
    fs::create_dir_all(&fifo).unwrap();
    run_ok(Command::new("mkfifo").arg(fifo.join("pipe")));
    let e = fails(
        vdisk()
            .args(["create", "-f", "iso", "-q"])
            .arg(&fifo)
            .arg(&iso),
        "fifo",
    );
    assert!(e.contains("FIFO") && e.contains("pipe"), "{e}");
    no_output(&out, "x.iso");

    // ISO paths with '..' or '.' components, or empty ones.
    for bad in ["a/../b", "../x", "./x", "a/./b"] {
        let e = fails(
            vdisk()
                .args(["create", "-f", "iso", "-q"])
                .arg(format!("{bad}=/etc/hostname"))
                .arg(&iso),
            bad,
        );
        assert!(e.contains("'.' or '..'"), "{bad}: {e}");
    }
    // An overlong component given as an ISO path.
    let e = fails(
        vdisk()
            .args(["create", "-f", "iso", "-q"])
            .arg(format!("{}=/etc/hostname", "n".repeat(256)))
            .arg(&iso),
        "overlong",
    );
    assert!(e.contains("longer than 255"), "{e}");
    no_output(&out, "x.iso");

    // A file whose size changes while it is read (procfs files list as 0 bytes).
    let e = fails(
        vdisk()
            .args(["create", "-f", "iso", "-q", "stat=/proc/self/stat"])
            .arg(&iso),
        "changing file",
    );
    assert!(
        e.contains("changed while being read") && e.contains("/proc/self/stat"),
        "{e}"
    );
    no_output(&out, "x.iso");

    // A file that grows while the image is written.
    let grow = t.path().join("grow");
    write(&grow.join("a-big"), &vec![1u8; 64 << 20]);
    write(&grow.join("z-growing"), b"start");
    let g = grow.join("z-growing");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stop.clone();
    let appender = std::thread::spawn(move || {
        use std::io::Write;
        let mut f = fs::OpenOptions::new().append(true).open(g).unwrap();
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            f.write_all(b"more").unwrap();
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    });
    // The appender is running before the tree is listed.
    while fs::metadata(grow.join("z-growing")).unwrap().len() <= 5 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let o = run(vdisk()
        .args(["create", "-f", "iso", "-q"])
        .arg(&grow)
        .arg(&iso));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    appender.join().unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "a growing file must fail: {}",
        stderr(&o)
    );
    assert!(
        stderr(&o).contains("changed while being read"),
        "{}",
        stderr(&o)
    );
    no_output(&out, "x.iso");

    // Links are recorded, never followed: a link to a secret outside the tree and a loop.
    let secret = t.path().join("secret.txt");
    fs::write(&secret, b"TOP-SECRET-MARKER-7f3a").unwrap();
    let tree = t.path().join("links");
    fs::create_dir_all(&tree).unwrap();
    symlink(&secret, tree.join("s")).unwrap();
    symlink("../links", tree.join("self")).unwrap();
    symlink("b", tree.join("a")).unwrap();
    symlink("a", tree.join("b")).unwrap();
    run_ok(
        vdisk()
            .args(["create", "-f", "iso", "-q"])
            .arg(&tree)
            .arg(&iso),
    );
    let bytes = fs::read(&iso).unwrap();
    assert!(
        !bytes.windows(22).any(|w| w == b"TOP-SECRET-MARKER-7f3a"),
        "read through a link"
    );
    let got = osirrox_extract(&iso, &t.path().join("lx"));
    assert_eq!(got["s"], format!("link -> {}", secret.display()));
    assert_eq!(got["self"], "link -> ../links");
    assert_eq!(got["a"], "link -> b");
    fs::remove_file(&iso).unwrap();

    // A bad volume id, a missing source, an unknown option.
    let e = fails(
        vdisk()
            .args([
                "create",
                "-f",
                "iso",
                "-o",
                &format!("volid={}", "V".repeat(33)),
            ])
            .arg(&tree)
            .arg(&iso),
        "volid",
    );
    assert!(e.contains("volume id"), "{e}");
    let e = fails(
        vdisk()
            .args(["create", "-f", "iso"])
            .arg(t.path().join("missing"))
            .arg(&iso),
        "missing",
    );
    assert!(e.contains("missing"), "{e}");
    let e = fails(
        vdisk()
            .args(["create", "-f", "iso", "-o", "bogus=1"])
            .arg(&tree)
            .arg(&iso),
        "option",
    );
    assert!(e.contains("bogus"), "{e}");
    let e = fails(
        vdisk()
            .args(["cidata", "--user-data"])
            .arg(t.path().join("nope"))
            .arg(&iso),
        "cidata",
    );
    assert!(e.contains("nope"), "{e}");
    no_output(&out, "x.iso");

    // Killed mid-write (once its temporary file exists): nothing at the target name. A run
    // that completes before the kill lands is retried with a bigger tree.
    let slow = t.path().join("slow");
    let mut interrupted = 0;
    for attempt in 0..4u64 {
        for i in 0..(4 << attempt) {
            let f = slow.join(format!("f{i}"));
            if !f.exists() {
                write(&f, &common::random_bytes(64 << 20, i));
            }
        }
        let mut child = vdisk()
            .args(["create", "-f", "iso", "-q"])
            .arg(&slow)
            .arg(&iso)
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        while started.elapsed().as_secs() < 60
            && !fs::read_dir(&out)
                .unwrap()
                .any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".part"))
        {
            std::thread::sleep(std::time::Duration::from_micros(500));
        }
        child.kill().unwrap();
        if child.wait().unwrap().success() {
            fs::remove_file(&iso).unwrap();
            continue;
        }
        assert!(!iso.exists(), "a killed write left {}", iso.display());
        interrupted += 1;
        break;
    }
    assert_eq!(
        interrupted, 1,
        "every write finished before it could be interrupted"
    );
}
