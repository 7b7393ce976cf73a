//! The bounded tar reader (`vdisk::archive::tar`) against archives GNU tar makes at test time
//! (old GNU sparse, PAX sparse 0.0/0.1/1.0, long names, ustar prefixes), and against hostile
//! archives crafted by hand: each must fail with a clear error, never panic or allocate
//! without bound.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use vdisk::ErrorKind;
use vdisk::archive::tar::{EntryKind, TarReader};

fn tar(args: &[&str]) {
    let o = Command::new("tar").args(args).output().expect("GNU tar");
    assert!(
        o.status.success(),
        "tar {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A file with holes: 8 MiB logical, data at the start, in the middle (unaligned) and
/// `tail_data` decides whether it ends in data or in a hole.
fn sparse_file(p: &Path, tail_data: bool) {
    let f = fs::File::create(p).unwrap();
    f.set_len(8 << 20).unwrap();
    let pat = |seed: u8, n: usize| -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    };
    f.write_all_at(&pat(1, 5000), 0).unwrap();
    f.write_all_at(&pat(2, 70_000), 3_000_000).unwrap();
    f.write_all_at(&pat(3, 4096), 5 << 20).unwrap();
    if tail_data {
        f.write_all_at(&pat(4, 100), (8 << 20) - 100).unwrap();
    }
}

struct Tree {
    _dir: tempfile::TempDir,
    root: PathBuf,
    src: PathBuf,
    /// Names (relative to `src`) of the files to archive.
    files: Vec<String>,
}

fn tree() -> Tree {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let src = root.join("src");
    fs::create_dir(&src).unwrap();
    sparse_file(&src.join("hole-end.img"), false);
    sparse_file(&src.join("data-end.img"), true);
    // All holes.
    fs::File::create(src.join("empty-sparse.img"))
        .unwrap()
        .set_len(3 << 20)
        .unwrap();
    fs::write(src.join("small.txt"), b"hello tar\n").unwrap();
    let long = format!("{}.txt", "n".repeat(150));
    fs::write(src.join(&long), b"a long name").unwrap();
    // A deep path with a short last component: ustar stores it in the prefix field.
    let deep = format!("{}/{}", "d".repeat(60), "e".repeat(60));
    fs::create_dir_all(src.join(&deep)).unwrap();
    let deep_file = format!("{deep}/f.txt");
    fs::write(src.join(&deep_file), b"prefixed").unwrap();
    Tree {
        _dir: dir,
        root,
        src,
        files: vec![
            "hole-end.img".into(),
            "data-end.img".into(),
            "empty-sparse.img".into(),
            "small.txt".into(),
            long,
            deep_file,
        ],
    }
}

/// Every regular file of the archive at `t`, read through `TarReader`, equals its source.
/// Returns how many entries were sparse.
fn check_archive(t: &Path, src: &Path, files: &[String]) -> usize {
    let mut ar = TarReader::new(fs::File::open(t).unwrap());
    let mut seen = Vec::new();
    let mut sparse = 0;
    while let Some(e) = ar.next_entry().unwrap() {
        if e.kind == EntryKind::Dir {
            continue;
        }
        assert!(e.is_file(), "{}: {:?}", e.path, e.kind);
        let want = fs::read(src.join(&e.path)).unwrap();
        assert_eq!(e.size, want.len() as u64, "{}", e.path);
        if let Some(map) = &e.sparse {
            sparse += 1;
            let data: u64 = map.iter().map(|s| s.1).sum();
            assert_eq!(data, e.data_size, "{}", e.path);
        }
        let mut got = Vec::new();
        ar.read_to_end(&mut got).unwrap();
        assert!(got == want, "{}: content differs ({})", e.path, t.display());
        seen.push(e.path);
    }
    seen.sort();
    let mut want = files.to_vec();
    want.sort();
    assert_eq!(seen, want, "{}", t.display());
    sparse
}

#[test]
fn gnu_tar_archives_read_back_exactly() {
    assert!(
        Command::new("tar")
            .arg("--version")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("GNU tar")),
        "GNU tar is needed"
    );
    let t = tree();
    let src = t.src.to_str().unwrap();
    let names: Vec<&str> = t.files.iter().map(String::as_str).collect();
    let variants: &[(&str, &[&str], usize)] = &[
        ("gnu-sparse", &["--format=gnu", "-S"], 3),
        ("gnu-plain", &["--format=gnu"], 0),
        (
            "pax-0.0",
            &["--format=pax", "--sparse", "--sparse-version=0.0"],
            3,
        ),
        (
            "pax-0.1",
            &["--format=pax", "--sparse", "--sparse-version=0.1"],
            3,
        ),
        (
            "pax-1.0",
            &["--format=pax", "--sparse", "--sparse-version=1.0"],
            3,
        ),
        ("pax-plain", &["--format=pax"], 0),
    ];
    for (name, flags, want_sparse) in variants {
        let out = t.root.join(format!("{name}.tar"));
        let mut args: Vec<&str> = flags.to_vec();
        args.extend(["-C", src, "-cf", out.to_str().unwrap()]);
        args.extend(&names);
        tar(&args);
        let sparse = check_archive(&out, &t.src, &t.files);
        assert_eq!(sparse, *want_sparse, "{name}: sparse entries");
    }
    // ustar: the deep path goes into the prefix field (no long names, no sparse files).
    let out = t.root.join("ustar.tar");
    let deep = t.files[5].as_str();
    tar(&[
        "--format=ustar",
        "-C",
        src,
        "-cf",
        out.to_str().unwrap(),
        "small.txt",
        deep,
    ]);
    let raw = fs::read(&out).unwrap();
    let second = &raw[1024..1536];
    assert_ne!(second[345], 0, "ustar prefix field is used");
    check_archive(&out, &t.src, &["small.txt".into(), deep.into()]);
}

#[test]
fn unpacked_sparse_files_stay_sparse() {
    let t = tree();
    let src = t.src.to_str().unwrap();
    for (name, flags) in [
        ("gnu", &["--format=gnu", "-S"][..]),
        ("pax-0.0", &["--format=pax", "-S", "--sparse-version=0.0"]),
        ("pax-0.1", &["--format=pax", "-S", "--sparse-version=0.1"]),
        ("pax-1.0", &["--format=pax", "-S", "--sparse-version=1.0"]),
    ] {
        let out = t.root.join(format!("{name}.tar"));
        let mut args = flags.to_vec();
        args.extend(["-C", src, "-cf", out.to_str().unwrap(), "."]);
        tar(&args);
        let dest = t.root.join(format!("out-{name}"));
        fs::create_dir(&dest).unwrap();
        let written = vdisk::archive::unpack(
            Box::new(fs::File::open(&out).unwrap()),
            &dest,
            1 << 30,
            &mut || Ok(()),
        )
        .unwrap();
        assert!(written < 1 << 20, "{name}: {written} bytes of data written");
        for f in &t.files {
            let a = fs::read(t.src.join(f)).unwrap();
            let b = fs::read(dest.join(f)).unwrap_or_else(|e| panic!("{name}: {f}: {e}"));
            assert!(a == b, "{name}: {f} differs");
        }
        for f in ["hole-end.img", "data-end.img", "empty-sparse.img"] {
            let m = fs::metadata(dest.join(f)).unwrap();
            assert!(
                m.blocks() * 512 < m.len() / 8,
                "{name}: {f} was filled in ({} of {} bytes allocated)",
                m.blocks() * 512,
                m.len()
            );
        }
        // The byte limit counts stored data, and holds.
        let dest2 = t.root.join(format!("small-{name}"));
        fs::create_dir(&dest2).unwrap();
        let e = vdisk::archive::unpack(
            Box::new(fs::File::open(&out).unwrap()),
            &dest2,
            1000,
            &mut || Ok(()),
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoSpace, "{name}: {e}");
    }
}

// ------------------------------------------------------------------------------ crafting

fn checksum(h: &mut [u8; 512]) {
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

fn octal(f: &mut [u8], v: u64) {
    let w = f.len() - 1;
    f[..w].copy_from_slice(format!("{v:0w$o}").as_bytes());
    f[w] = 0;
}

fn header(name: &str, size: u64, typeflag: u8) -> [u8; 512] {
    let mut h = [0u8; 512];
    let n = &name.as_bytes()[..name.len().min(100)];
    h[..n.len()].copy_from_slice(n);
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    if size < 1 << 33 {
        octal(&mut h[124..136], size);
    } else {
        h[124] = 0x80;
        h[128..136].copy_from_slice(&size.to_be_bytes());
    }
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = typeflag;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    checksum(&mut h);
    h
}

fn pad(out: &mut Vec<u8>) {
    while out.len() % 512 != 0 {
        out.push(0);
    }
}

fn entry(out: &mut Vec<u8>, name: &str, data: &[u8], typeflag: u8) {
    out.extend_from_slice(&header(name, data.len() as u64, typeflag));
    out.extend_from_slice(data);
    pad(out);
}

fn pax_records(records: &[(&str, &str)]) -> Vec<u8> {
    let mut data = Vec::new();
    for (k, v) in records {
        let body = k.len() + v.len() + 3;
        let mut len = body + 1;
        while len != body + len.to_string().len() {
            len = body + len.to_string().len();
        }
        data.extend_from_slice(format!("{len} {k}={v}\n").as_bytes());
    }
    data
}

fn end(out: &mut Vec<u8>) {
    out.extend_from_slice(&[0u8; 1024]);
}

/// Read every entry and its content; the first error.
fn read_all(t: &[u8]) -> vdisk::Result<Vec<(String, Vec<u8>)>> {
    let mut ar = TarReader::new(t);
    let mut out = Vec::new();
    while let Some(e) = ar.next_entry()? {
        let mut v = Vec::new();
        ar.read_to_end(&mut v)
            .map_err(|err| vdisk::Error::io("read", err))?;
        out.push((e.path, v));
    }
    Ok(out)
}

fn fails(t: &[u8], what: &str, kinds: &[ErrorKind], needle: &str) {
    let e = read_all(t).expect_err(what);
    assert!(kinds.contains(&e.kind()), "{what}: {:?}: {e}", e.kind());
    assert!(e.to_string().contains(needle), "{what}: {e}");
}

/// A PAX 0.1 sparse entry: `map` as the GNU.sparse.map value.
fn pax01(name: &str, realsize: u64, map: &str, data: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    let recs = pax_records(&[
        ("GNU.sparse.size", &realsize.to_string()),
        ("GNU.sparse.map", map),
        ("path", name),
    ]);
    entry(&mut t, "PaxHeaders/x", &recs, b'x');
    entry(&mut t, "placeholder", data, b'0');
    end(&mut t);
    t
}

/// A PAX 1.0 sparse entry whose data area starts with `map_text`.
fn pax10(name: &str, realsize: u64, map_text: &str, data: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    let recs = pax_records(&[
        ("GNU.sparse.major", "1"),
        ("GNU.sparse.minor", "0"),
        ("GNU.sparse.name", name),
        ("GNU.sparse.realsize", &realsize.to_string()),
    ]);
    entry(&mut t, "PaxHeaders/x", &recs, b'x');
    let mut body = map_text.as_bytes().to_vec();
    pad(&mut body);
    body.extend_from_slice(data);
    entry(&mut t, "GNUSparseFile.0/x", &body, b'0');
    end(&mut t);
    t
}

#[test]
fn crafted_sparse_entries_read_as_their_logical_content() {
    let got = read_all(&pax01("a", 10, "2,3,8,2", b"xyzAB")).unwrap();
    assert_eq!(got, vec![("a".to_string(), b"\0\0xyz\0\0\0AB".to_vec())]);
    let got = read_all(&pax10("b", 9, "2\n0\n1\n5\n2\n", b"pqr")).unwrap();
    assert_eq!(got, vec![("b".to_string(), b"p\0\0\0\0qr\0\0".to_vec())]);
    // A map may end with an empty segment at the end of the file (GNU tar writes one).
    let got = read_all(&pax01("c", 4, "0,1,4,0", b"z")).unwrap();
    assert_eq!(got[0].1, b"z\0\0\0");
    // Old GNU 'S': two slots in the header.
    let mut h = header("s", 3, b'S');
    octal(&mut h[386..398], 1);
    octal(&mut h[398..410], 2);
    octal(&mut h[410..422], 6);
    octal(&mut h[422..434], 1);
    octal(&mut h[483..495], 8);
    checksum(&mut h);
    let mut t = h.to_vec();
    t.extend_from_slice(b"abc");
    pad(&mut t);
    end(&mut t);
    assert_eq!(read_all(&t).unwrap()[0].1, b"\0ab\0\0\0c\0");
}

#[test]
fn hostile_archives_fail_cleanly() {
    let corrupt = &[ErrorKind::Corrupt][..];
    let bounded = &[ErrorKind::TooLarge][..];
    // A GNU long name header claiming 1 TiB (or 2^62): refused before any allocation.
    fails(
        &header("x", 1 << 40, b'L'),
        "huge long name",
        bounded,
        "GNU long name",
    );
    fails(
        &header("x", 1 << 62, b'K'),
        "huge long link",
        bounded,
        "GNU long link",
    );
    fails(&header("x", 1 << 40, b'x'), "huge PAX", bounded, "PAX");
    fails(
        &header("x", 1 << 40, b'g'),
        "huge global PAX",
        bounded,
        "PAX",
    );
    // A PAX record whose length runs far past its header.
    let mut t = Vec::new();
    entry(&mut t, "PaxHeaders/x", b"99999999999999999 path=x\n", b'x');
    entry(&mut t, "f", b"", b'0');
    end(&mut t);
    fails(&t, "huge PAX record", corrupt, "PAX record");
    let mut t = Vec::new();
    entry(
        &mut t,
        "PaxHeaders/x",
        b"999999999999999999999999 path=x\n",
        b'x',
    );
    entry(&mut t, "f", b"", b'0');
    end(&mut t);
    fails(&t, "PAX record length overflow", corrupt, "PAX record");
    // Sparse maps: overlapping, unsorted, past the real size, data size mismatch.
    fails(
        &pax01("o", 10, "0,4,2,2", b"abcdef"),
        "overlap",
        corrupt,
        "overlapping",
    );
    fails(
        &pax01("u", 10, "5,1,0,1", b"ab"),
        "unsorted",
        corrupt,
        "unsorted",
    );
    fails(
        &pax01("p", 10, "8,4", b"abcd"),
        "past size",
        corrupt,
        "past the file size",
    );
    fails(
        &pax01("m", 10, "0,4", b"ab"),
        "data mismatch",
        corrupt,
        "archive stores 2",
    );
    fails(
        &pax01("v", 10, "18446744073709551615,2", b"ab"),
        "overflow",
        corrupt,
        "tar entry 'v'",
    );
    fails(
        &pax01("q", 10, "0,1,2", b"a"),
        "odd map",
        corrupt,
        "odd number",
    );
    fails(
        &pax10("w", 10, "1\n8\n4\n", b"abcd"),
        "1.0 past size",
        corrupt,
        "past",
    );
    // Too many segments: the count is refused, not allocated.
    fails(
        &pax10("n", 10, "99999999999\n", b""),
        "1.0 count",
        bounded,
        "segments",
    );
    // The 1.0 map running past the entry's data, and a garbage number in it.
    fails(
        &pax10("r", 10, "3\n0\n1\n", b""),
        "1.0 short map",
        corrupt,
        "tar entry 'r'",
    );
    fails(
        &pax10("g", 10, "1\nzz\n1\n", b"a"),
        "1.0 garbage",
        corrupt,
        "tar entry 'g'",
    );
    fails(
        &pax10("l", 10, &format!("{}\n", "1".repeat(40)), b""),
        "1.0 long number",
        corrupt,
        "too long",
    );
    // Old GNU sparse: endless extension blocks of segments hit the segment cap.
    let mut h = header("s", 0, b'S');
    h[482] = 1;
    checksum(&mut h);
    let mut t = h.to_vec();
    let mut ext = [0u8; 512];
    for i in 0..21 {
        octal(&mut ext[i * 24..i * 24 + 12], 0);
        octal(&mut ext[i * 24 + 12..i * 24 + 24], 0);
    }
    // Header slots empty: extension slots are ignored; make the header's first slot real.
    let mut h2 = header("s", 0, b'S');
    octal(&mut h2[386..398], 0);
    octal(&mut h2[398..410], 0);
    octal(&mut h2[410..422], 0);
    octal(&mut h2[422..434], 0);
    octal(&mut h2[434..446], 0);
    octal(&mut h2[446..458], 0);
    octal(&mut h2[458..470], 0);
    octal(&mut h2[470..482], 0);
    h2[482] = 1;
    checksum(&mut h2);
    t.clear();
    t.extend_from_slice(&h2);
    ext[504] = 1;
    let blocks = vdisk::archive::tar::MAX_SPARSE_SEGMENTS / 21 + 2;
    for _ in 0..blocks {
        t.extend_from_slice(&ext);
    }
    fails(&t, "old GNU segment cap", bounded, "segments");
    // Truncated: inside a header, inside data, inside a sparse map, before the end marker.
    let mut t = Vec::new();
    entry(&mut t, "a", &[7u8; 3000], b'0');
    end(&mut t);
    fails(
        &t[..3584 + 300],
        "cut header",
        corrupt,
        "cut off inside a header",
    );
    // (Inside the content, the reader's `io::Error` says so; callers wrap it.)
    fails(
        &t[..2048],
        "cut data",
        &[ErrorKind::Io],
        "cut off inside entry 'a'",
    );
    fails(&t[..3584], "no end marker", corrupt, "end-of-archive");
    let t = pax10("c", 10, "1\n0\n4\n", b"abcd");
    fails(&t[..1536 + 100], "cut map", corrupt, "cut off");
    let mut t = h2.to_vec();
    t.extend_from_slice(&ext[..100]);
    fails(&t, "cut extension", corrupt, "cut off");
    // An unknown sparse format version is refused, not misread.
    let mut t = Vec::new();
    let recs = pax_records(&[("GNU.sparse.major", "2"), ("GNU.sparse.realsize", "4")]);
    entry(&mut t, "PaxHeaders/x", &recs, b'x');
    entry(&mut t, "f", b"", b'0');
    end(&mut t);
    fails(
        &t,
        "sparse 2.0",
        &[ErrorKind::UnsupportedFeature],
        "not supported",
    );
}

/// Unpacking refuses what would escape, including writes through a symlink chain that only
/// looks inside, and a hard link reached through such a chain.
#[test]
fn unpack_refuses_escapes_through_links() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut t = Vec::new();
    entry(&mut t, "c/", b"", b'5');
    let mut l = header("a/b", 0, b'2');
    l[157..162].copy_from_slice(b"../c\0");
    checksum(&mut l);
    entry(&mut t, "a/", b"", b'5');
    t.extend_from_slice(&l);
    // x -> a/b/../.. looks like it stays inside, but a/b is ../c: x is out/.. really.
    let mut x = header("x", 0, b'2');
    x[157..167].copy_from_slice(b"a/b/../..\0");
    checksum(&mut x);
    t.extend_from_slice(&x);
    entry(&mut t, "x/escaped.txt", b"evil", b'0');
    end(&mut t);
    fs::create_dir(&out).unwrap();
    let e = vdisk::archive::unpack(Box::new(&t[..]), &out, 1 << 20, &mut || Ok(())).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Denied, "{e}");
    assert!(!dir.path().join("escaped.txt").exists());
    // Devices and FIFOs are refused.
    for typeflag in [b'3', b'4', b'6'] {
        let mut t = Vec::new();
        entry(&mut t, "dev", b"", typeflag);
        end(&mut t);
        let out = dir.path().join(format!("dev-{typeflag}"));
        fs::create_dir(&out).unwrap();
        let e =
            vdisk::archive::unpack(Box::new(&t[..]), &out, 1 << 20, &mut || Ok(())).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Denied, "{e}");
    }
    // Files, links inside, a read-only directory filled after its entry, and an overwrite.
    let mut t = Vec::new();
    let mut h = header("ro/", 0, b'5');
    h[100..108].copy_from_slice(b"0000555\0");
    checksum(&mut h);
    t.extend_from_slice(&h);
    entry(&mut t, "ro/f", b"one", b'0');
    entry(&mut t, "ro/f", b"two", b'0');
    let mut hl = header("hard", 0, b'1');
    hl[157..161].copy_from_slice(b"ro/f");
    checksum(&mut hl);
    t.extend_from_slice(&hl);
    end(&mut t);
    let out = dir.path().join("ok");
    fs::create_dir(&out).unwrap();
    vdisk::archive::unpack(Box::new(&t[..]), &out, 1 << 20, &mut || Ok(())).unwrap();
    assert_eq!(fs::read(out.join("ro/f")).unwrap(), b"two");
    assert_eq!(fs::read(out.join("hard")).unwrap(), b"two");
    assert_eq!(fs::metadata(out.join("ro")).unwrap().mode() & 0o777, 0o555);
    // Let the temporary directory be removed.
    let mut p = fs::metadata(out.join("ro")).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut p, 0o755);
    fs::set_permissions(out.join("ro"), p).unwrap();
}
