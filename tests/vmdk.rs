//! VMDK reading held to qemu-img: every subformat qemu-img writes (monolithicSparse,
//! streamOptimized, monolithicFlat, twoGbMaxExtentSparse, twoGbMaxExtentFlat; compat6,
//! zeroed_grain, odd sizes, data and zero writes by qemu-io at odd offsets), a VMware-style
//! stream with its grain directory at the end, the trust policy for descriptors and the
//! files they name (CVE-2022-47951), parents, and malformed headers, tables and grains.

mod common;

use common::*;
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use vdisk::{ErrorKind, Format, Image, OpenOptions, Policy};

const SIZES: &[(&str, u64)] = &[
    ("odd100m", (100 << 20) + 512),
    ("big3g", (3 << 30) + (1 << 20)),
];

fn opts(policy: Policy, metadata_only: bool) -> OpenOptions {
    OpenOptions {
        format: None,
        policy,
        metadata_only,
        ..OpenOptions::default()
    }
}

fn open(env: &Env, name: &str, policy: Policy) -> vdisk::Result<Image> {
    Image::open(env.path(name), &opts(policy, false))
}

/// The error kind opening `name` fails with (as vmdk, whatever the content looks like).
fn open_err(env: &Env, name: &str, policy: Policy) -> (ErrorKind, String) {
    let o = OpenOptions {
        format: Some(Format::Vmdk),
        ..opts(policy, false)
    };
    match Image::open(env.path(name), &o) {
        Ok(_) => panic!("{name}: opened, but should have been refused"),
        Err(e) => (e.kind(), e.to_string()),
    }
}

/// Read the whole disk through the library; the first error, if any.
fn read_all(img: &Image) -> vdisk::Result<()> {
    let size = img.virtual_size();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(buf.len() as u64) as usize;
        img.read_at(&mut buf[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

fn rd32(p: &Path, off: u64) -> u32 {
    let mut b = [0u8; 4];
    fs::File::open(p)
        .unwrap()
        .read_exact_at(&mut b, off)
        .unwrap();
    u32::from_le_bytes(b)
}

fn rd64(p: &Path, off: u64) -> u64 {
    let mut b = [0u8; 8];
    fs::File::open(p)
        .unwrap()
        .read_exact_at(&mut b, off)
        .unwrap();
    u64::from_le_bytes(b)
}

fn patch(p: &Path, off: u64, bytes: &[u8]) {
    let f = fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

/// File offset of grain table entry `g` of the sparse extent at `p` (its GT must exist).
fn gte_offset(p: &Path, g: u64) -> u64 {
    let gd = rd64(p, 56) * 512;
    let gt = u64::from(rd32(p, gd + 4 * (g / 512))) * 512;
    assert_ne!(gt, 0, "grain table for grain {g} is not allocated");
    gt + 4 * (g % 512)
}

/// File offset of the marker of compressed grain `g`.
fn marker(p: &Path, g: u64) -> u64 {
    u64::from(rd32(p, gte_offset(p, g))) * 512
}

/// Hold `file` to qemu-img: info (JSON), map, conversion to raw, compare, and check.
fn hold_to_qemu(env: &Env, file: &str) {
    env.sync();
    let q = json(&env.qemu_img(&["info", "--output=json", file]));
    let v = json(&env.vdisk_ok(&["info", "--output=json", file]));
    for k in ["virtual-size", "format", "filename", "dirty-flag"] {
        assert_eq!(v[k], q[k], "{file}: info {k} (left vdisk, right qemu-img)");
    }
    let (qd, vd) = (&q["format-specific"]["data"], &v["format-specific"]["data"]);
    assert_eq!(v["format-specific"]["type"], "vmdk", "{file}");
    let ct = qd["create-type"].as_str().unwrap();
    if matches!(ct, "monolithicSparse" | "streamOptimized") {
        assert_eq!(v["cluster-size"], q["cluster-size"], "{file}: cluster-size");
        assert_eq!(
            v["format-specific"], q["format-specific"],
            "{file}: format-specific (left vdisk, right qemu-img)"
        );
    } else {
        // A descriptor: info opens no extent file, so it knows neither their grains nor
        // (for the split sparse form) the cluster size qemu takes from them.
        for k in ["cid", "parent-cid", "create-type"] {
            assert_eq!(vd[k], qd[k], "{file}: format-specific {k}");
        }
        let (qe, ve) = (
            qd["extents"].as_array().unwrap(),
            vd["extents"].as_array().unwrap(),
        );
        assert_eq!(ve.len(), qe.len(), "{file}: extent count");
        for (a, b) in ve.iter().zip(qe) {
            for k in ["virtual-size", "filename", "format"] {
                assert_eq!(a[k], b[k], "{file}: extent {k}");
            }
        }
    }
    // map, retried while the file system may still be settling holes of flat extents.
    let mut tries = 0;
    loop {
        let qm = stdout(&env.qemu_img(&["map", "--output=json", file]));
        let vm = stdout(&env.vdisk_ok(&["map", "--output=json", file]));
        if qm == vm {
            break;
        }
        tries += 1;
        assert!(
            tries < 5,
            "{file}: map differs\n--- qemu-img\n{qm}--- vdisk\n{vm}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let qraw = format!("{file}.qemu.raw");
    check_convert(env, file, None, None, &qraw);
    let o = env.vdisk(&["compare", file, &qraw]);
    assert_eq!(
        (o.status.code(), stdout(&o).as_str()),
        (Some(0), "Images are identical.\n"),
        "{file}: vdisk compare with qemu's raw: {}",
        stderr(&o)
    );
    fs::remove_file(env.path(&qraw)).unwrap();
    let img = open(env, file, Policy::Trusted).unwrap();
    assert_eq!(
        img.driver().unwrap().check(),
        Some(vec![]),
        "{file}: check of a clean image"
    );
}

/// qemu-io writes at odd offsets: unaligned data across grains, zero writes aligned and not,
/// data later zeroed, the last bytes of the disk, and (for disks over 2 GiB) a write across
/// the 2 GiB extent split.
fn scribble(env: &Env, file: &str, size: u64) {
    let tail = format!("write -P 0xa5 {} 2500", size - 3000);
    let mut cmds = vec![
        "write -P 0x5a 1000 70000".to_string(),
        "write -z 1M 128k".into(),
        "write -z 3146240 1000".into(),
        "write -P 1 8M 64k".into(),
        "write -z 8M 64k".into(),
        "write -P 0x77 9437696 300000".into(),
        tail,
    ];
    if size > 2 << 30 {
        cmds.push("write -P 0x33 2047M 2M".into());
    }
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    env.qemu_io(file, "vmdk", &cmds);
}

#[test]
fn qemu_subformats_read_as_qemu_reads_them() {
    let env = Env::new();
    let mut cases: Vec<(String, String, u64)> = Vec::new();
    for sf in [
        "monolithicSparse",
        "monolithicFlat",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
    ] {
        for (tag, size) in SIZES {
            cases.push((format!("{sf}-{tag}.vmdk"), format!("subformat={sf}"), *size));
        }
    }
    cases.push((
        "compat6.vmdk".into(),
        "subformat=monolithicSparse,compat6=on".into(),
        SIZES[0].1,
    ));
    for (tag, size) in SIZES {
        cases.push((
            format!("zeroed-{tag}.vmdk"),
            "subformat=monolithicSparse,zeroed_grain=on".into(),
            *size,
        ));
    }
    cases.push((
        "zeroed-split.vmdk".into(),
        "subformat=twoGbMaxExtentSparse,zeroed_grain=on".into(),
        SIZES[1].1,
    ));
    for (name, o, size) in &cases {
        env.create(name, "vmdk", o, &size.to_string());
        // Empty first, then with data.
        let img = open(&env, name, Policy::Trusted).unwrap();
        assert_eq!(img.virtual_size(), *size, "{name}");
        drop(img);
        scribble(&env, name, *size);
        hold_to_qemu(&env, name);
    }
    // Zero writes of whole grains became zeroed-grain entries, not data.
    let img = open(&env, "zeroed-odd100m.vmdk", Policy::Trusted).unwrap();
    let e = img.extent(8 << 20, 64 << 10).unwrap();
    assert!(
        e.present && e.zero && !e.data && e.offset.is_none(),
        "{e:?}"
    );
    assert_eq!(img.driver().unwrap().cluster_size(), Some(65536));
}

#[test]
fn stream_optimized_from_qemu_convert() {
    let env = Env::new();
    let sizes: &[(&str, u64)] = &[("tiny", (1 << 20) + 512), SIZES[0], SIZES[1]];
    for (tag, size) in sizes {
        let raw = format!("so-{tag}.raw");
        env.set_len(&raw, *size);
        env.write_random(&raw, 1000, 200_000, 7);
        env.write_fill(&raw, 700_000, 300_000, 0x41);
        env.write_random(&raw, size - 70_000, 70_000, 9);
        if *size > 2 << 30 {
            env.write_random(&raw, (2 << 30) - 5000, 1 << 20, 11);
        }
        let img = format!("so-{tag}.vmdk");
        env.qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            &raw,
            &img,
        ]);
        hold_to_qemu(&env, &img);
        env.assert_same(&img, "vmdk", &raw, "raw");
        let i = open(&env, &img, Policy::Untrusted).unwrap();
        let e = i.extent(0, i.virtual_size()).unwrap();
        assert!(e.compressed && e.data && e.offset.is_none(), "{e:?}");
        // The streaming import spools and reads it the same way.
        let out = format!("so-{tag}.imported");
        env.vdisk_ok(&["import", &img, &out]);
        env.assert_same(&out, "raw", &raw, "raw");
        fs::remove_file(env.path(&out)).unwrap();
    }
}

/// A streamOptimized image laid out as VMware writes it: header with GD_AT_END, marked
/// grains, a GT marker before each grain table, the GD marker and GD, then footer marker,
/// footer (the header with the real gdOffset) and end-of-stream marker.
struct Stream {
    /// Compress these bytes as grain 0 instead of its real content.
    grain0: Option<Vec<u8>>,
    /// Footer capacity (default: the header's).
    footer_capacity: Option<u64>,
    /// Break the footer marker's type.
    bad_footer: bool,
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn pad(v: &mut Vec<u8>) {
    v.resize(v.len().next_multiple_of(512), 0);
}

fn header(capacity: u64, gd_offset: u64) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[..4].copy_from_slice(b"KDMV");
    h[4..8].copy_from_slice(&3u32.to_le_bytes());
    h[8..12].copy_from_slice(&0x30001u32.to_le_bytes());
    h[12..20].copy_from_slice(&capacity.to_le_bytes());
    h[20..28].copy_from_slice(&128u64.to_le_bytes());
    h[28..36].copy_from_slice(&1u64.to_le_bytes());
    h[36..44].copy_from_slice(&2u64.to_le_bytes());
    h[44..48].copy_from_slice(&512u32.to_le_bytes());
    h[56..64].copy_from_slice(&gd_offset.to_le_bytes());
    h[64..72].copy_from_slice(&128u64.to_le_bytes());
    h[73..77].copy_from_slice(&[0x0a, 0x20, 0x0d, 0x0a]);
    h[77..79].copy_from_slice(&1u16.to_le_bytes());
    h
}

fn meta_marker(val: u64, ty: u32) -> Vec<u8> {
    let mut m = vec![0u8; 512];
    m[..8].copy_from_slice(&val.to_le_bytes());
    m[12..16].copy_from_slice(&ty.to_le_bytes());
    m
}

impl Stream {
    fn plain() -> Stream {
        Stream {
            grain0: None,
            footer_capacity: None,
            bad_footer: false,
        }
    }

    fn build(&self, disk: &[u8]) -> Vec<u8> {
        assert_eq!(disk.len() % 512, 0);
        let capacity = disk.len() as u64 / 512;
        let gb = 65536usize;
        let grains = disk.len().div_ceil(gb);
        let mut out = header(capacity, u64::MAX);
        let desc = format!(
            "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
             createType=\"streamOptimized\"\n\n# Extent description\n\
             RW {capacity} SPARSE \"generated.vmdk\"\n\n# The Disk Data Base\n#DDB\n\n\
             ddb.virtualHWVersion = \"4\"\n"
        );
        out.extend_from_slice(desc.as_bytes());
        out.resize(128 * 512, 0);
        let mut gt = vec![0u32; grains.div_ceil(512) * 512];
        for g in 0..grains {
            let chunk = &disk[g * gb..((g + 1) * gb).min(disk.len())];
            let custom = if g == 0 { self.grain0.as_deref() } else { None };
            if custom.is_none() && chunk.iter().all(|&b| b == 0) {
                continue;
            }
            gt[g] = (out.len() / 512) as u32;
            let z = zlib(custom.unwrap_or(chunk));
            out.extend_from_slice(&((g * 128) as u64).to_le_bytes());
            out.extend_from_slice(&(z.len() as u32).to_le_bytes());
            out.extend_from_slice(&z);
            pad(&mut out);
        }
        let mut gd = Vec::new();
        for t in gt.chunks(512) {
            if t.iter().all(|&e| e == 0) {
                gd.push(0u32);
                continue;
            }
            out.extend_from_slice(&meta_marker(4, 1));
            gd.push((out.len() / 512) as u32);
            for e in t {
                out.extend_from_slice(&e.to_le_bytes());
            }
        }
        let gd_sectors = (gd.len() * 4).div_ceil(512) as u64;
        out.extend_from_slice(&meta_marker(gd_sectors, 2));
        let gd_offset = (out.len() / 512) as u64;
        for e in &gd {
            out.extend_from_slice(&e.to_le_bytes());
        }
        pad(&mut out);
        out.extend_from_slice(&meta_marker(1, if self.bad_footer { 1 } else { 3 }));
        out.extend_from_slice(&header(self.footer_capacity.unwrap_or(capacity), gd_offset));
        out.extend_from_slice(&[0u8; 512]);
        out
    }
}

static SPOOLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The file reader (open, read everything) and the stream (`import_into`) on `bytes`.
fn verdicts(bytes: &[u8]) -> (vdisk::Result<Vec<u8>>, vdisk::Result<Vec<u8>>) {
    use std::sync::Arc;
    use vdisk::io::MemIo;
    let file = Image::from_io(
        Arc::new(MemIo::new(bytes.to_vec())),
        &OpenOptions::default(),
    )
    .and_then(|img| {
        let mut d = vec![0u8; img.virtual_size().min(64 << 20) as usize];
        img.read_at(&mut d, 0)?;
        Ok(d)
    });
    let io = MemIo::default();
    let mut o = vdisk::ingest::ImportOptions {
        log: Some(&|l: &str| {
            if l.contains("spooling") {
                SPOOLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }),
        ..Default::default()
    };
    let stream = vdisk::ingest::import_into(
        Box::new(std::io::Cursor::new(bytes.to_vec())),
        &io,
        true,
        64 << 20,
        &mut o,
    )
    .map(|r| {
        let mut d = io.to_vec();
        d.resize(r.virtual_size as usize, 0);
        d
    });
    (file, stream)
}

/// The one-verdict rule on a footer-layout stream and on mutations of it: both readers give
/// the same content or the same kind of error.
fn footer_stream_one_verdict(img: &[u8]) {
    let mut rng = Rng::new(7);
    let (mut ok, mut refused, mut unchained) = (0, 0, 0);
    for k in 0..300 {
        let mut b = img.to_vec();
        if k > 0 {
            for _ in 0..rng.range(1, 4) {
                // Mostly where the structures are: the header, the markers and tables at
                // the end, then anywhere.
                let at = match k % 3 {
                    0 => rng.below(1024),
                    1 => b.len() as u64 - 1 - rng.below(6144),
                    _ => rng.below(b.len() as u64),
                } as usize;
                b[at] = rng.below(256) as u8;
            }
        }
        match verdicts(&b) {
            // A disk larger than the test's target is refused for space before anything
            // else: that says nothing about the image.
            (_, Err(s)) if s.kind() == ErrorKind::NoSpace => {}
            (Ok(a), Ok(s)) => {
                assert!(a == s, "mutation {k}: the readers disagree on the content");
                ok += 1;
            }
            (Err(a), Err(s)) => {
                assert_eq!(a.kind(), s.kind(), "mutation {k}: file {a}; stream {s}");
                refused += 1;
            }
            // The stream's one deliberate refusal (README): markers that do not chain, so
            // grains the tables name were never met front to back.
            (Ok(_), Err(s)) if s.to_string().contains("cannot be read front to back") => {
                unchained += 1;
            }
            (f, s) => panic!("mutation {k}: file {:?}; stream {:?}", f.err(), s.err()),
        }
    }
    assert!(unchained < 15, "{unchained} of 300 refused as unchained");
    assert!(ok > 30 && refused > 30, "{ok} accepted, {refused} refused");
    // Only a mutated header sends the stream to the spool file; the rest is compared with
    // the front-to-back reader.
    let spools = SPOOLS.load(std::sync::atomic::Ordering::Relaxed);
    assert!(spools < 60, "{spools} of 300 spooled");
}

#[test]
fn stream_with_footer_as_vmware_writes_it() {
    let env = Env::new();
    let size = (5 << 20) + 512;
    let mut disk = vec![0u8; size];
    disk[1000..201_000].copy_from_slice(&random_bytes(200_000, 3));
    disk[3 << 20..(3 << 20) + 65536].fill(0x42);
    disk[size - 700..].copy_from_slice(&random_bytes(700, 4));
    fs::write(env.path("disk.raw"), &disk).unwrap();
    fs::write(env.path("foot.vmdk"), Stream::plain().build(&disk)).unwrap();
    hold_to_qemu(&env, "foot.vmdk");
    env.assert_same("foot.vmdk", "vmdk", "disk.raw", "raw");

    // Streamed, it is read front to back (no spool file) into the same disk.
    let o = env.import_pipe("foot.vmdk", "foot.out");
    assert!(o.status.success(), "import: {}", stderr(&o));
    assert!(!stderr(&o).contains("spooling"), "{}", stderr(&o));
    env.assert_same("foot.out", "raw", "disk.raw", "raw");
    footer_stream_one_verdict(&Stream::plain().build(&disk));

    // The footer must be one, and agree with the header.
    let bad = Stream {
        bad_footer: true,
        ..Stream::plain()
    };
    fs::write(env.path("badfoot.vmdk"), bad.build(&disk)).unwrap();
    let (k, m) = open_err(&env, "badfoot.vmdk", Policy::Untrusted);
    assert_eq!(k, ErrorKind::Corrupt, "{m}");
    assert!(m.contains("Invalid footer"), "{m}");
    let bad = Stream {
        footer_capacity: Some(1 << 30),
        ..Stream::plain()
    };
    fs::write(env.path("mismatch.vmdk"), bad.build(&disk)).unwrap();
    let (k, m) = open_err(&env, "mismatch.vmdk", Policy::Untrusted);
    assert_eq!(k, ErrorKind::Corrupt, "{m}");
    assert!(m.contains("does not match the header"), "{m}");

    // A grain inflating to more than one grain, or short of one (not the last grain).
    for (name, data) in [
        ("long.vmdk", vec![7u8; 2 * 65536]),
        ("short.vmdk", vec![7u8; 4096]),
    ] {
        let s = Stream {
            grain0: Some(data),
            ..Stream::plain()
        };
        fs::write(env.path(name), s.build(&disk)).unwrap();
        let img = open(&env, name, Policy::Untrusted).unwrap();
        let e = read_all(&img).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{name}: {e}");
        assert!(e.to_string().contains("sector 0"), "{name}: {e}");
    }
}

/// A descriptor file with these lines after the header.
fn descriptor(create_type: &str, extents: &str) -> String {
    format!(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
         createType=\"{create_type}\"\n\n# Extent description\n{extents}\n\
         # The Disk Data Base\n#DDB\n\nddb.adapterType = \"ide\"\n"
    )
}

#[test]
fn descriptors_name_files_only_under_trust() {
    let env = Env::new();
    env.create("flat.vmdk", "vmdk", "subformat=monolithicFlat", "10M");
    env.qemu_io("flat.vmdk", "vmdk", &["write -P 0x61 4097 8000"]);
    env.create("split.vmdk", "vmdk", "subformat=twoGbMaxExtentSparse", "3G");
    env.qemu_io("split.vmdk", "vmdk", &["write -P 0x62 2047M 2M"]);
    env.create("sparse.vmdk", "vmdk", "", "10M");
    env.qemu_io("sparse.vmdk", "vmdk", &["write -P 0x63 0 1M"]);

    for (name, extent) in [
        ("flat.vmdk", "flat-flat.vmdk"),
        ("split.vmdk", "split-s001.vmdk"),
    ] {
        // Library: untrusted is refused, naming the file; metadata only opens nothing.
        let e = open(&env, name, Policy::Untrusted).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Denied, "{name}: {e}");
        assert!(e.to_string().contains(extent), "{name}: {e}");
        let img = Image::open(env.path(name), &opts(Policy::Untrusted, true)).unwrap();
        assert!(img.virtual_size() > 0);
        assert!(img.read_at(&mut [0u8; 512], 0).is_err());
        assert!(open(&env, name, Policy::Trusted).is_ok());
        // CLI: refused with --untrusted, read without.
        for args in [
            vec!["convert", "--untrusted", "-O", "raw", name, "x.raw"],
            vec!["map", "--untrusted", name],
        ] {
            let o = env.vdisk(&args);
            assert_eq!(o.status.code(), Some(1), "{args:?}");
            assert!(stderr(&o).contains(extent), "{args:?}: {}", stderr(&o));
        }
        env.vdisk_ok(&["info", "--untrusted", name]);
        env.vdisk_ok(&["convert", "-O", "raw", name, "x.raw"]);
        env.assert_same(name, "vmdk", "x.raw", "raw");
        // Streams are untrusted: import refuses the descriptor.
        let o = env.vdisk(&["import", name, "imported.img"]);
        assert_eq!(o.status.code(), Some(1));
        assert!(stderr(&o).contains(extent), "import: {}", stderr(&o));
        assert!(stderr(&o).contains("untrusted"), "import: {}", stderr(&o));
    }
    // A single-file sparse image names nothing and is imported.
    env.vdisk_ok(&["import", "sparse.vmdk", "imported-sparse.img"]);
    env.assert_same("sparse.vmdk", "vmdk", "imported-sparse.img", "raw");

    // The CVE-2022-47951 shapes: a descriptor or a capacity-0 sparse header naming host files.
    let passwd = descriptor("monolithicFlat", "RW 8 FLAT \"/etc/passwd\" 0\n");
    fs::write(env.path("passwd.vmdk"), &passwd).unwrap();
    let mut kdmv = header(0, 0);
    kdmv[8..12].copy_from_slice(&3u32.to_le_bytes());
    kdmv[77..79].copy_from_slice(&0u16.to_le_bytes());
    kdmv.extend_from_slice(passwd.as_bytes());
    kdmv.resize(64 * 512, 0);
    fs::write(env.path("embedded.vmdk"), &kdmv).unwrap();
    for name in ["passwd.vmdk", "embedded.vmdk"] {
        let (k, m) = open_err(&env, name, Policy::Untrusted);
        assert_eq!(k, ErrorKind::Denied, "{name}: {m}");
        assert!(m.contains("/etc/passwd"), "{m}");
        let (k, m) = open_err(&env, name, Policy::Trusted);
        assert_eq!(k, ErrorKind::Denied, "{name}: {m}");
        assert!(m.contains("absolute"), "{m}");
        let o = env.vdisk(&["convert", "-O", "raw", name, "leak.raw"]);
        assert_eq!(o.status.code(), Some(1), "{name}");
        assert!(!env.path("leak.raw").exists());
    }
    fs::create_dir(env.path("sub")).unwrap();
    fs::write(env.path("secret"), vec![0x5e; 4096]).unwrap();
    std::os::unix::fs::symlink("../secret", env.path("sub/link")).unwrap();
    std::os::unix::fs::symlink("../flat-flat.vmdk", env.path("sub/link2")).unwrap();
    fs::copy(env.path("flat-flat.vmdk"), env.path("sub/data.img")).unwrap();
    let refused = [
        ("RW 8 FLAT \"../secret\" 0", "'..'"),
        ("RW 8 FLAT \"./../secret\" 0", "'..'"),
        ("RW 8 FLAT \"link\" 0", "symbolic link"),
        ("RW 8 FLAT \"link2\" 0", "symbolic link"),
        ("RW 8 FLAT \"nbd:localhost:10809\" 0", "protocol"),
        ("RW 8 FLAT \"json:{}\" 0", "protocol"),
        ("RW 8 FLAT \"http://example.com/x\" 0", "protocol"),
        ("RW 8 FLAT \"d.vmdk\" 0", "descriptor itself"),
        (
            "RW 8 FLAT \"data.img\" 0\nRW 8 FLAT \"data.img\" 8",
            "named twice",
        ),
        ("RW 8 FLAT \".\" 0", "regular file"),
    ];
    for (lines, why) in refused {
        fs::write(env.path("sub/d.vmdk"), descriptor("monolithicFlat", lines)).unwrap();
        let (k, m) = open_err(&env, "sub/d.vmdk", Policy::Trusted);
        assert_eq!(k, ErrorKind::Denied, "{lines}: {m}");
        assert!(m.contains(why), "{lines}: {m}");
        let (k, _) = open_err(&env, "sub/d.vmdk", Policy::Untrusted);
        assert_eq!(k, ErrorKind::Denied, "{lines}");
    }
    // A range past the end of its file.
    fs::write(
        env.path("sub/d.vmdk"),
        descriptor("monolithicFlat", "RW 20480 FLAT \"data.img\" 1"),
    )
    .unwrap();
    let (k, m) = open_err(&env, "sub/d.vmdk", Policy::Trusted);
    assert_eq!(k, ErrorKind::Corrupt, "{m}");
    // Beneath the directory, plain names work: FLAT with an offset, RDONLY, ZERO, VMFS.
    fs::write(
        env.path("sub/d.vmdk"),
        descriptor(
            "monolithicFlat",
            "RW 16 FLAT \"data.img\" 8\nRDONLY 24 ZERO\nRW 100 FLAT \"./data.img\" 0",
        ),
    )
    .ok();
    let (k, m) = open_err(&env, "sub/d.vmdk", Policy::Trusted);
    assert_eq!(k, ErrorKind::Denied, "same file twice: {m}");
    fs::copy(env.path("flat-flat.vmdk"), env.path("sub/data2.img")).unwrap();
    fs::write(
        env.path("sub/d.vmdk"),
        descriptor(
            "monolithicFlat",
            "RW 16 FLAT \"data.img\" 8\nRDONLY 24 ZERO\nRW 100 VMFS \"data2.img\"",
        ),
    )
    .unwrap();
    let img = open(&env, "sub/d.vmdk", Policy::Trusted).unwrap();
    assert_eq!(img.virtual_size(), 140 * 512);
    let mut got = vec![0xffu8; 140 * 512];
    img.read_at(&mut got, 0).unwrap();
    let flat = fs::read(env.path("flat-flat.vmdk")).unwrap();
    let mut want = flat[8 * 512..24 * 512].to_vec();
    want.extend_from_slice(&[0u8; 24 * 512]);
    want.extend_from_slice(&flat[..100 * 512]);
    assert!(got == want, "descriptor content differs");
    assert_eq!(img.driver().unwrap().check(), Some(vec![]));
    let fs_json = img.driver().unwrap().format_specific().unwrap();
    assert_eq!(fs_json["data"]["extents"][1]["format"], "ZERO");
    let shown = fs_json["data"]["extents"][2]["filename"].as_str().unwrap();
    assert!(shown.ends_with("sub/data2.img"), "{shown}");
    // ZERO extents name no file: fine even untrusted.
    fs::write(
        env.path("zero.vmdk"),
        descriptor("monolithicFlat", "RW 2048 ZERO"),
    )
    .unwrap();
    let img = open(&env, "zero.vmdk", Policy::Untrusted).unwrap();
    assert_eq!(img.virtual_size(), 1 << 20);
    let e = img.extent(0, 1 << 20).unwrap();
    assert!(e.zero && !e.data && e.len == 1 << 20, "{e:?}");
}

#[test]
fn descriptors_are_parsed_strictly() {
    let env = Env::new();
    env.set_len("data.img", 1 << 20);
    let cases: &[(&str, String, ErrorKind)] = &[
        (
            "noaccess",
            descriptor("monolithicFlat", "NOACCESS 8 FLAT \"data.img\" 0"),
            ErrorKind::UnsupportedFeature,
        ),
        (
            "vmfssparse",
            descriptor("monolithicFlat", "RW 8 VMFSSPARSE \"data.img\""),
            ErrorKind::UnsupportedFeature,
        ),
        (
            "sesparse",
            descriptor("seSparse", "RW 8 SESPARSE \"data.img\""),
            ErrorKind::UnsupportedFeature,
        ),
        (
            "custom",
            descriptor("custom", "RW 8 FLAT \"data.img\" 0"),
            ErrorKind::UnsupportedFeature,
        ),
        (
            "flat-no-offset",
            descriptor("monolithicFlat", "RW 8 FLAT \"data.img\""),
            ErrorKind::Corrupt,
        ),
        (
            "empty-extent",
            descriptor("monolithicFlat", "RW 0 FLAT \"data.img\" 0"),
            ErrorKind::Corrupt,
        ),
        (
            "junk-line",
            descriptor("monolithicFlat", "RW 8 FLAT \"data.img\" 0\nrm -rf /"),
            ErrorKind::Corrupt,
        ),
        (
            "no-extents",
            descriptor("monolithicFlat", ""),
            ErrorKind::Corrupt,
        ),
        (
            "huge",
            descriptor("monolithicFlat", "RW 1099511627777 FLAT \"data.img\" 0"),
            ErrorKind::TooLarge,
        ),
        (
            "parent",
            descriptor("monolithicFlat", "RW 8 FLAT \"data.img\" 0").replace(
                "parentCID=ffffffff",
                "parentCID=1234abcd\nparentFileNameHint=\"/srv/base.vmdk\"",
            ),
            ErrorKind::UnsupportedFeature,
        ),
        (
            "no-cid",
            descriptor("monolithicFlat", "RW 8 FLAT \"data.img\" 0").replace("CID=fffffffe\n", ""),
            ErrorKind::Corrupt,
        ),
    ];
    for (name, text, kind) in cases {
        let f = format!("{name}.vmdk");
        fs::write(env.path(&f), text).unwrap();
        let (k, m) = open_err(&env, &f, Policy::Trusted);
        assert_eq!(k, *kind, "{name}: {m}");
    }
    // Too large: over 1 MiB of (valid) comment lines.
    let mut big = descriptor("monolithicFlat", "RW 8 FLAT \"data.img\" 0");
    while big.len() <= 1 << 20 {
        big.push_str("# padding padding padding padding padding padding padding\n");
    }
    fs::write(env.path("big.vmdk"), &big).unwrap();
    let (k, m) = open_err(&env, "big.vmdk", Policy::Trusted);
    assert_eq!(k, ErrorKind::TooLarge, "{m}");
    // More extents than the limit.
    let many = "RW 1 ZERO\n".repeat(5000);
    fs::write(
        env.path("many.vmdk"),
        descriptor("twoGbMaxExtentFlat", &many),
    )
    .unwrap();
    let (k, m) = open_err(&env, "many.vmdk", Policy::Trusted);
    assert_eq!(k, ErrorKind::TooLarge, "{m}");
}

#[test]
fn parents_are_refused() {
    let env = Env::new();
    env.create("base.vmdk", "vmdk", "", "10M");
    env.qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        "child.vmdk",
    ]);
    for policy in [Policy::Trusted, Policy::Untrusted] {
        let (k, m) = open_err(&env, "child.vmdk", policy);
        assert_eq!(k, ErrorKind::UnsupportedFeature, "{m}");
        assert!(m.contains("parent"), "{m}");
    }
    let o = env.vdisk(&["info", "child.vmdk"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("base.vmdk"), "{}", stderr(&o));
}

/// A qemu-made monolithicSparse image with data in its first grains, to break.
fn sparse_with_data(env: &Env, name: &str) {
    env.create(name, "vmdk", "", "16M");
    env.qemu_io(
        name,
        "vmdk",
        &["write -P 0x11 0 256k", "write -P 0x22 15M 64k"],
    );
}

#[test]
fn malformed_sparse_headers_are_refused() {
    let env = Env::new();
    // (name, offset, bytes, expected kind)
    let u32b = |v: u32| v.to_le_bytes().to_vec();
    let u64b = |v: u64| v.to_le_bytes().to_vec();
    let cases: Vec<(&str, u64, Vec<u8>, ErrorKind)> = vec![
        ("magic", 0, b"KDMX".to_vec(), ErrorKind::UnsupportedFormat),
        ("version0", 4, u32b(0), ErrorKind::UnsupportedFeature),
        ("version4", 4, u32b(4), ErrorKind::UnsupportedFeature),
        ("grain0", 20, u64b(0), ErrorKind::Corrupt),
        ("grain100", 20, u64b(100), ErrorKind::Corrupt),
        ("grainhuge", 20, u64b(1 << 22), ErrorKind::TooLarge),
        ("gtes256", 44, u32b(256), ErrorKind::Corrupt),
        ("gtes0", 44, u32b(0), ErrorKind::Corrupt),
        ("gdpast", 56, u64b(1 << 30), ErrorKind::Corrupt),
        ("gdzero", 56, u64b(0), ErrorKind::Corrupt),
        ("gdheader", 56, u64b(1), ErrorKind::Corrupt),
        ("capacity0", 12, u64b(0), ErrorKind::UnsupportedFeature),
        ("capacityhuge", 12, u64b(1 << 41), ErrorKind::TooLarge),
        ("gdtoobig", 12, u64b(1 << 40), ErrorKind::TooLarge),
        ("overhead", 64, u64b(1 << 20), ErrorKind::Corrupt),
        (
            "newlines",
            73,
            vec![0x0a, 0x20, 0x0a, 0x0a],
            ErrorKind::Corrupt,
        ),
        ("compress2", 77, vec![2, 0], ErrorKind::UnsupportedFeature),
        ("descpast", 28, u64b(1 << 30), ErrorKind::Corrupt),
        ("deschuge", 36, u64b(1 << 20), ErrorKind::TooLarge),
    ];
    for (name, off, bytes, kind) in &cases {
        let f = format!("{name}.vmdk");
        sparse_with_data(&env, &f);
        patch(&env.path(&f), *off, bytes);
        let (k, m) = open_err(&env, &f, Policy::Untrusted);
        assert_eq!(k, *kind, "{name}: {m}");
        let (k, _) = open_err(&env, &f, Policy::Trusted);
        assert_eq!(k, *kind, "{name}");
    }
    // A grain directory entry past the end of the file or into the directory itself.
    for (name, v) in [("gdentry-past", 1u32 << 30), ("gdentry-meta", 2)] {
        let f = format!("{name}.vmdk");
        sparse_with_data(&env, &f);
        let p = env.path(&f);
        patch(&p, rd64(&p, 56) * 512, &v.to_le_bytes());
        let (k, m) = open_err(&env, &f, Policy::Untrusted);
        assert_eq!(k, ErrorKind::Corrupt, "{name}: {m}");
    }
    // Truncated: shorter than its overhead.
    sparse_with_data(&env, "trunc.vmdk");
    let p = env.path("trunc.vmdk");
    let overhead = rd64(&p, 64) * 512;
    fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(overhead - 512)
        .unwrap();
    let (k, m) = open_err(&env, "trunc.vmdk", Policy::Untrusted);
    assert_eq!(k, ErrorKind::Corrupt, "{m}");
    assert!(m.contains("truncated"), "{m}");
    // No embedded descriptor (qemu needs its CID too).
    sparse_with_data(&env, "nodesc.vmdk");
    patch(&env.path("nodesc.vmdk"), 512, &[0u8; 512]);
    let (k, m) = open_err(&env, "nodesc.vmdk", Policy::Untrusted);
    assert_eq!(k, ErrorKind::Corrupt, "{m}");
    assert!(qemu_refuses(&env, "nodesc.vmdk"));
    // Tiny files of every length up to two sectors never panic.
    let full = fs::read(env.path("trunc.vmdk")).unwrap();
    for n in [0usize, 3, 4, 100, 511, 512, 513, 1024] {
        fs::write(env.path("tiny.vmdk"), &full[..n.min(full.len())]).unwrap();
        let _ = open_err(&env, "tiny.vmdk", Policy::Untrusted);
    }
}

fn qemu_refuses(env: &Env, name: &str) -> bool {
    !env.qemu_img_any(&["info", "-f", "vmdk", name])
        .status
        .success()
}

#[test]
fn bad_grain_table_entries_fail_reads_and_show_in_check() {
    let env = Env::new();
    for (name, entry, words) in [
        ("past", 1u32 << 28, "points after EOF"),
        ("header", 2, "points into metadata"),
        ("gd", 0, "points into metadata"),
    ] {
        let f = format!("gte-{name}.vmdk");
        sparse_with_data(&env, &f);
        let p = env.path(&f);
        // Grain 1 (sector 128) of the first grain table; "gd" points it at the directory.
        let entry = if entry == 0 {
            rd64(&p, 56) as u32
        } else {
            entry
        };
        patch(&p, gte_offset(&p, 1), &entry.to_le_bytes());
        let img = open(&env, &f, Policy::Untrusted).unwrap();
        let e = read_all(&img).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{name}: {e}");
        assert!(e.to_string().contains("sector 128"), "{name}: {e}");
        // Block status stops before the bad grain and fails on it.
        let x = img.extent(0, 16 << 20).unwrap();
        assert_eq!(x.len, 65536, "{name}");
        assert!(img.extent(65536, 1).is_err(), "{name}");
        let problems = img.driver().unwrap().check().unwrap();
        assert_eq!(
            problems,
            vec![format!("ERROR: cluster offset for sector 128 {words}")],
            "{name}"
        );
        let o = env.vdisk(&["convert", "-O", "raw", &f, "out.raw"]);
        assert_eq!(o.status.code(), Some(1), "{name}");
        if name == "past" {
            // qemu-img check words it the same way.
            let q = env.qemu_img_any(&["check", &f]);
            assert!(
                stderr(&q).contains("ERROR: cluster offset for sector 128 points after EOF"),
                "{}",
                stderr(&q)
            );
        }
    }
}

#[test]
fn malformed_compressed_grains() {
    let env = Env::new();
    let raw = "c.raw";
    env.set_len(raw, 4 << 20);
    env.write_random(raw, 0, 4 << 20, 5);
    let make = |name: &str| {
        env.qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            raw,
            name,
        ]);
        env.path(name)
    };
    type Break = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Break, &str)> = vec![
        (
            "toolarge",
            Box::new(|p: &Path| {
                let m = marker(p, 2);
                patch(p, m + 8, &(3u32 * 65536).to_le_bytes());
            }),
            "exceeds",
        ),
        (
            "zero",
            Box::new(|p: &Path| {
                let m = marker(p, 2);
                patch(p, m + 8, &0u32.to_le_bytes());
            }),
            "size 0",
        ),
        (
            "lba",
            Box::new(|p: &Path| {
                let m = marker(p, 2);
                patch(p, m, &999u64.to_le_bytes());
            }),
            "names sector 999",
        ),
        (
            "deflate",
            Box::new(|p: &Path| {
                let m = marker(p, 2);
                // The first block header after the zlib header: block type 3 is invalid.
                patch(p, m + 12 + 2, &[0xff]);
            }),
            "deflate",
        ),
        (
            "adler",
            Box::new(|p: &Path| {
                let m = marker(p, 2);
                let size = u64::from(rd32(p, m + 8));
                let mut b = [0u8; 1];
                fs::File::open(p)
                    .unwrap()
                    .read_exact_at(&mut b, m + 12 + size - 1)
                    .unwrap();
                patch(p, m + 12 + size - 1, &[!b[0]]);
            }),
            "deflate",
        ),
        (
            "pasteof",
            Box::new(|p: &Path| {
                let m = marker(p, 63);
                fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .unwrap()
                    .set_len(m + 512)
                    .unwrap();
            }),
            "past the end",
        ),
    ];
    for (name, break_it, why) in &cases {
        let f = format!("c-{name}.vmdk");
        let p = make(&f);
        break_it(&p);
        let img = open(&env, &f, Policy::Untrusted).unwrap();
        let e = read_all(&img).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{name}: {e}");
        assert!(e.to_string().contains(why), "{name}: {e}");
        let problems = img.driver().unwrap().check().unwrap();
        let marker_case = matches!(*name, "toolarge" | "zero" | "lba" | "pasteof");
        assert_eq!(problems.is_empty(), !marker_case, "{name}: {problems:?}");
        let o = env.vdisk(&["convert", "-O", "raw", &f, "out.raw"]);
        assert_eq!(o.status.code(), Some(1), "{name}: {}", stderr(&o));
    }
}

#[test]
fn ova_first_entry_is_the_descriptor_xml() {
    // An OVA is a tar holding the .ovf (XML) first, then the streamOptimized disk. The
    // import takes the first file entry of a tar, so the disk is never reached.
    let env = Env::new();
    env.set_len("o.raw", 2 << 20);
    env.write_random("o.raw", 4096, 100_000, 1);
    env.qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        "o.raw",
        "disk1.vmdk",
    ]);
    fs::write(
        env.path("vm.ovf"),
        "<?xml version=\"1.0\"?>\n<Envelope><References><File ovf:href=\"disk1.vmdk\"/>\
         </References></Envelope>\n",
    )
    .unwrap();
    let mut b = tar::Builder::new(fs::File::create(env.path("vm.ova")).unwrap());
    b.append_path_with_name(env.path("vm.ovf"), "vm.ovf")
        .unwrap();
    b.append_path_with_name(env.path("disk1.vmdk"), "disk1.vmdk")
        .unwrap();
    b.finish().unwrap();
    drop(b);
    let o = env.vdisk(&["import", "vm.ova", "ova.img"]);
    // Whatever the outcome, the disk's data did not arrive.
    if o.status.success() {
        let cmp = env.qemu_img_any(&["compare", "-f", "raw", "-F", "raw", "o.raw", "ova.img"]);
        assert_ne!(
            cmp.status.code(),
            Some(0),
            "the OVA's disk was imported after all"
        );
    }
}

#[test]
fn random_reads_match_the_raw_content() {
    let env = Env::new();
    let size = (12 << 20) + 1536;
    env.set_len("r.raw", size);
    let mut rng = Rng::new(42);
    for _ in 0..40 {
        let off = rng.below(size);
        let len = rng.range(1, 300_000).min(size - off) as usize;
        if rng.chance(50) {
            env.write_random("r.raw", off, len, rng.next_u64());
        } else {
            env.write_fill("r.raw", off, len, rng.below(256) as u8);
        }
    }
    env.qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        "r.raw",
        "r-so.vmdk",
    ]);
    env.qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "r.raw",
        "r-sparse.vmdk",
    ]);
    let raw = fs::read(env.path("r.raw")).unwrap();
    for name in ["r-so.vmdk", "r-sparse.vmdk"] {
        let img = open(&env, name, Policy::Untrusted).unwrap();
        for _ in 0..400 {
            let off = rng.below(size);
            let len = rng.range(1, 3 << 20).min(size - off) as usize;
            let mut b = vec![0xeeu8; len];
            img.read_at(&mut b, off).unwrap();
            assert!(
                b == raw[off as usize..off as usize + len],
                "{name}: {off}+{len}"
            );
        }
    }
}
