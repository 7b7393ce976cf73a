//! VHDX reading held to qemu-img: images made by `qemu-img create/convert -O vhdx` with the
//! subformat, block size, log size and block-state options, data written by qemu-io at odd
//! offsets (also write -z and discard), then info, convert to raw and map compared; malformed
//! images (every structure the reader validates) must fail with the right error kind, naming
//! the structure, never panic; differencing disks are refused.

mod common;

use common::*;
use serde_json::Value;
use std::fs;
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use vdisk::{ErrorKind, Format, Image, OpenOptions, Policy};

const MIB: u64 = 1 << 20;

fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// Recompute the CRC-32C at `off + 4` over `len` bytes at `off`.
fn fix_crc(env: &Env, name: &str, off: u64, len: usize) {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(env.path(name))
        .unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, off).unwrap();
    buf[4..8].fill(0);
    let c = crc32c(&buf);
    f.write_all_at(&c.to_le_bytes(), off + 4).unwrap();
}

fn read_u64(env: &Env, name: &str, off: u64) -> u64 {
    let f = fs::File::open(env.path(name)).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, off).unwrap();
    u64::from_le_bytes(b)
}

/// (BAT offset, metadata offset) from region table 1.
fn regions(env: &Env, name: &str) -> (u64, u64) {
    let (mut bat, mut meta) = (0, 0);
    for i in 0..2u64 {
        let e = 192 * 1024 + 16 + 32 * i;
        let g = read_u64(env, name, e);
        let off = read_u64(env, name, e + 16);
        if g == 0x4200_f623_2dc2_7766 {
            bat = off;
        } else {
            meta = off;
        }
    }
    assert!(bat >= MIB && meta >= MIB, "{name}: regions not found");
    (bat, meta)
}

/// Hold `file` to qemu-img: info (format, virtual size, cluster size, text), conversion to
/// raw (identical, no more allocated), map (vdisk's zero ranges read as zeros in qemu's raw,
/// and the ranges cover the disk).
fn oracle(env: &Env, file: &str) {
    env.sync();
    let q = env.info(file, "vhdx");
    let v = json(&env.vdisk_ok(&["info", "--output=json", file]));
    for k in ["format", "virtual-size", "cluster-size", "actual-size"] {
        assert_eq!(v.get(k), q.get(k), "{file}: info key {k}");
    }
    assert_eq!(
        stdout(&env.vdisk_ok(&["info", file])),
        stdout(&env.qemu_img(&["info", file])),
        "{file}: human info"
    );
    let qraw = format!("{file}.qemu.raw");
    check_convert(env, file, None, None, &qraw);
    check_convert(env, file, Some("vhdx"), None, &qraw);
    let raw = fs::File::open(env.path(&qraw)).unwrap();
    let raw_len = raw.metadata().unwrap().len();
    let map: Value = json(&env.vdisk_ok(&["map", "--output=json", file]));
    let mut pos = 0u64;
    let mut buf = vec![0u8; MIB as usize];
    for e in map.as_array().unwrap() {
        let start = e["start"].as_u64().unwrap();
        let len = e["length"].as_u64().unwrap();
        assert_eq!(start, pos, "{file}: map not contiguous");
        let (zero, data) = (e["zero"].as_bool().unwrap(), e["data"].as_bool().unwrap());
        // A hole of the file inside an allocated block is both (as qemu maps VDI holes).
        assert!(zero || data, "{file}: extent {e} is neither data nor zero");
        let mut at = start;
        while zero && at < start + len {
            let n = (start + len - at).min(MIB) as usize;
            raw.read_exact_at(&mut buf[..n], at).unwrap();
            assert!(
                buf[..n].iter().all(|&b| b == 0),
                "{file}: vdisk maps {start}+{len} as zero but it holds data near {at}"
            );
            at += n as u64;
        }
        pos += len;
    }
    assert_eq!(pos, raw_len, "{file}: map does not cover the disk");
    fs::remove_file(env.path(&qraw)).unwrap();
}

/// Data at odd offsets, a zero write and a discard.
fn scribble(env: &Env, file: &str, size: u64) {
    let last = size - 3000;
    env.qemu_io(
        file,
        "vhdx",
        &[
            "write -P 0x5a 1000 5000",
            &format!("write -P 0xa5 {} 70000", 9 * MIB - 777),
            "write -P 0x33 40M 3M",
            "write -z 41M 512K",
            "discard 42M 1M",
            &format!("write -P 0x77 {last} 3000"),
            &format!("write -P 0x99 {} 5000", size / 8 * 7 + 77),
        ],
    );
}

#[test]
fn dynamic_and_fixed_matrix() {
    let env = Env::new();
    let cases: &[(&str, &str, u64)] = &[
        ("subformat=dynamic", "d-default", 64 * MIB),
        ("subformat=dynamic,block_size=1M", "d-1m", 100 * MIB + 512),
        (
            "subformat=dynamic,block_size=8M,log_size=8M",
            "d-8m",
            64 * MIB,
        ),
        (
            "subformat=dynamic,block_size=32M,block_state_zero=off",
            "d-32m-nz",
            100 * MIB + 512,
        ),
        (
            "subformat=dynamic,block_state_zero=on",
            "d-z",
            3 * 1024 * MIB + MIB,
        ),
        ("subformat=fixed,block_size=1M", "f-1m", 50 * MIB),
        (
            "subformat=fixed,block_state_zero=off",
            "f-nz",
            50 * MIB + 512,
        ),
        (
            "subformat=fixed,log_size=8M,block_size=8M",
            "f-8m",
            48 * MIB,
        ),
    ];
    for (opts, name, size) in cases {
        let file = format!("{name}.vhdx");
        env.create(&file, "vhdx", opts, &size.to_string());
        oracle(&env, &file);
        scribble(&env, &file, *size);
        oracle(&env, &file);
    }
}

#[test]
fn convert_from_raw_with_holes() {
    let env = Env::new();
    env.set_len("src.raw", 77 * MIB + 512);
    env.write_random("src.raw", 12345, 100_000, 1);
    env.write_random("src.raw", 30 * MIB + 1, 3 << 20, 2);
    env.write_fill("src.raw", 60 * MIB, MIB as usize, 0);
    env.write_random("src.raw", 77 * MIB - 100, 612, 3);
    for opts in ["subformat=dynamic", "subformat=fixed,block_size=1M"] {
        let file = format!("{}.vhdx", opts.replace([',', '='], "-"));
        env.qemu_img(&[
            "convert", "-f", "raw", "-O", "vhdx", "-o", opts, "src.raw", &file,
        ]);
        oracle(&env, &file);
        env.assert_same(&file, "vhdx", "src.raw", "raw");
    }
}

#[test]
fn import_through_a_pipe() {
    let env = Env::new();
    env.create("p.vhdx", "vhdx", "", "64M");
    scribble(&env, "p.vhdx", 64 * MIB);
    let out = env.path("out.img");
    let mut cat = Command::new("cat")
        .arg(env.path("p.vhdx"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_vdisk"))
        .current_dir(env.dir())
        .args(["import", "-"])
        .arg(&out)
        .stdin(cat.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(cat.wait().unwrap().success());
    assert!(o.status.success(), "import: {}", stderr(&o));
    // Read front to back: no spool file.
    assert!(!stderr(&o).contains("spooling"), "{}", stderr(&o));
    same_disk(env.path("p.vhdx"), &out);
}

fn open(env: &Env, name: &str, policy: Policy) -> vdisk::Result<Image> {
    let opts = OpenOptions {
        format: Some(Format::Vhdx),
        policy,
        ..OpenOptions::default()
    };
    Image::open(env.path(name), &opts)
}

/// Opening (and reading all of) `name` must fail with `kind`, the message containing `what`.
fn refused(env: &Env, name: &str, policy: Policy, kind: ErrorKind, what: &str) {
    let r = open(env, name, policy).and_then(|img| {
        let mut buf = vec![0u8; MIB as usize];
        let mut pos = 0;
        while pos < img.virtual_size() {
            let n = (img.virtual_size() - pos).min(MIB);
            img.read_at(&mut buf[..n as usize], pos)?;
            pos += n;
        }
        Ok(())
    });
    let e = r.err().unwrap_or_else(|| panic!("{name}: accepted"));
    assert_eq!(e.kind(), kind, "{name}: {e}");
    assert!(
        e.to_string().contains(what),
        "{name}: {e} does not name {what}"
    );
    // The CLI says it too, without panicking.
    let o = env.vdisk(&["convert", "-f", "vhdx", "-O", "raw", name, "cli.raw"]);
    assert!(!o.status.success(), "{name}: CLI convert accepted");
    let err = stderr(&o);
    assert!(
        err.contains(what) && !err.contains("panicked"),
        "{name}: {err}"
    );
}

/// A fresh image `name` (8 MiB blocks, one data block at 0) to damage.
fn base(env: &Env, name: &str) -> (u64, u64) {
    env.create(name, "vhdx", "", "20M");
    env.qemu_io(name, "vhdx", &["write -P 0x42 0 4096"]);
    regions(env, name)
}

#[test]
fn malformed_headers_and_regions() {
    let env = Env::new();

    base(&env, "ident.vhdx");
    env.write_bytes("ident.vhdx", 0, b"vhdxfilX");
    refused(
        &env,
        "ident.vhdx",
        Policy::Untrusted,
        ErrorKind::Corrupt,
        "file identifier",
    );

    base(&env, "h2.vhdx");
    env.write_bytes("h2.vhdx", 64 * 1024 + 200, b"x");
    env.write_bytes("h2.vhdx", 128 * 1024 + 200, b"x");
    refused(
        &env,
        "h2.vhdx",
        Policy::Untrusted,
        ErrorKind::Corrupt,
        "no valid header",
    );

    // One bad header: the other one is used.
    for (i, off) in [(1, 64 * 1024u64), (2, 128 * 1024)] {
        let name = format!("h1-{i}.vhdx");
        base(&env, &name);
        env.write_bytes(&name, off + 200, b"x");
        let img = open(&env, &name, Policy::Untrusted).unwrap();
        let mut b = [0u8; 4096];
        img.read_at(&mut b, 0).unwrap();
        assert!(b.iter().all(|&x| x == 0x42), "{name}");
    }

    // A bad region table 1 falls back to table 2; both bad is corrupt.
    base(&env, "r1.vhdx");
    env.write_bytes("r1.vhdx", 192 * 1024 + 100, b"x");
    open(&env, "r1.vhdx", Policy::Untrusted).unwrap();
    env.write_bytes("r1.vhdx", 256 * 1024 + 100, b"x");
    refused(
        &env,
        "r1.vhdx",
        Policy::Untrusted,
        ErrorKind::Corrupt,
        "region table",
    );

    // Region entry past the end of the file (CRC fixed).
    base(&env, "rpast.vhdx");
    for t in [192 * 1024u64, 256 * 1024] {
        env.write_bytes("rpast.vhdx", t + 16 + 16, &(1u64 << 40).to_le_bytes());
        fix_crc(&env, "rpast.vhdx", t, 64 * 1024);
    }
    refused(
        &env,
        "rpast.vhdx",
        Policy::Untrusted,
        ErrorKind::Corrupt,
        "past the end of the file",
    );

    // Truncated files: inside the metadata, and inside the payload.
    let (_, meta) = base(&env, "trunc.vhdx");
    env.set_len("trunc.vhdx", meta + 4096);
    refused(
        &env,
        "trunc.vhdx",
        Policy::Untrusted,
        ErrorKind::Corrupt,
        "region table",
    );
    base(&env, "trunc2.vhdx");
    env.qemu_io("trunc2.vhdx", "vhdx", &["write -P 1 16M 4096"]);
    let len = fs::metadata(env.path("trunc2.vhdx")).unwrap().len();
    env.set_len("trunc2.vhdx", len - 8 * MIB);
    refused(
        &env,
        "trunc2.vhdx",
        Policy::Untrusted,
        ErrorKind::Corrupt,
        "past the end of the file",
    );
    env.set_len("trunc2.vhdx", 200 * 1024);
    refused(
        &env,
        "trunc2.vhdx",
        Policy::Untrusted,
        ErrorKind::Corrupt,
        "truncated",
    );
}

/// Log entries of `name` as (file offset, sectors, GUID), in log order.
fn log_entries(env: &Env, name: &str) -> Vec<(u64, u64, [u8; 16])> {
    let d = fs::read(env.path(name)).unwrap();
    let (mut out, mut at) = (Vec::new(), MIB as usize);
    while &d[at..at + 4] == b"loge" {
        let len = u32::from_le_bytes(d[at + 8..at + 12].try_into().unwrap()) as usize;
        out.push((
            at as u64,
            len as u64 / 4096,
            d[at + 32..at + 48].try_into().unwrap(),
        ));
        at += len;
    }
    out
}

/// Make the log of `name` need replay: the headers name `guid`.
fn set_log_guid(env: &Env, name: &str, guid: &[u8; 16]) {
    for h in [64 * 1024u64, 128 * 1024] {
        env.write_bytes(name, h + 48, guid);
        fix_crc(env, name, h, 4096);
    }
}

/// A dirty log, replayed in memory: vdisk reads what qemu-img reads after its own replay
/// (`qemu-img check -r all` on a copy), and leaves the file untouched.
#[test]
fn log_replay() {
    let env = Env::new();
    for (opts, size) in [
        ("block_size=1M", 64 * MIB),
        ("log_size=8M", 100 * MIB + 512),
    ] {
        let name = format!("log-{}.vhdx", opts.replace('=', "-"));
        env.create(&name, "vhdx", opts, &size.to_string());
        // One session: qemu leaves one entry per metadata update, each with a fresh GUID.
        env.qemu_io(
            &name,
            "vhdx",
            &[
                "write -P 0x11 1000 4k",
                "write -P 0x22 5M 1M",
                "write -P 0x33 20M 3M",
                "write -z 21M 4k",
                "discard 22M 1M",
            ],
        );
        let entries = log_entries(&env, &name);
        assert!(entries.len() >= 2, "{name}: qemu left no log entries");
        let (_, _, last_guid) = *entries.last().unwrap();
        let (bat, _) = regions(&env, &name);
        fs::copy(env.path(&name), env.path("orig.vhdx")).unwrap();
        set_log_guid(&env, &name, &last_guid);
        // The BAT on disk is stale: only the log has its current first sector.
        env.write_bytes(&name, bat, &[0u8; 4096]);
        let before = fs::read(env.path(&name)).unwrap();
        fs::copy(env.path(&name), env.path("fixed.vhdx")).unwrap();
        env.qemu_img(&["check", "-q", "-r", "all", "fixed.vhdx"]);
        env.assert_same("fixed.vhdx", "vhdx", "orig.vhdx", "vhdx");
        env.vdisk_ok(&["convert", "-O", "raw", &name, "v.raw"]);
        env.assert_same("v.raw", "raw", "fixed.vhdx", "vhdx");
        let cmp = env.vdisk(&["compare", &name, "orig.vhdx"]);
        assert_eq!(
            stdout(&cmp),
            "Images are identical.\n",
            "{name}: {}",
            stderr(&cmp)
        );
        assert!(
            fs::read(env.path(&name)).unwrap() == before,
            "{name}: file modified"
        );
        // Streamed, a log that needs replay sends the image through the spool file, and the
        // disk is the replayed one.
        let o = env.import_pipe(&name, "piped.raw");
        assert!(o.status.success(), "import {name}: {}", stderr(&o));
        let said = stderr(&o);
        assert!(said.contains("spooling"), "{said}");
        env.assert_same("piped.raw", "raw", "fixed.vhdx", "vhdx");
        // qemu-img refuses to read it read-only; vdisk's map still marks data and zeros.
        let map = json(&env.vdisk_ok(&["map", "--output=json", &name]));
        assert!(map.as_array().unwrap().iter().any(|e| e["data"] == true));

        // The log GUID of an earlier entry: only that entry is replayed, as qemu does.
        let (first_off, first_sectors, first_guid) = entries[0];
        let old = format!("old-{name}");
        fs::copy(env.path("orig.vhdx"), env.path(&old)).unwrap();
        set_log_guid(&env, &old, &first_guid);
        fs::copy(env.path(&old), env.path("fixed.vhdx")).unwrap();
        env.qemu_img(&["check", "-q", "-r", "all", "fixed.vhdx"]);
        env.vdisk_ok(&["convert", "-O", "raw", &old, "v.raw"]);
        env.assert_same("v.raw", "raw", "fixed.vhdx", "vhdx");

        // A log GUID no entry carries: nothing to replay (qemu agrees).
        let none = format!("none-{name}");
        fs::copy(env.path("orig.vhdx"), env.path(&none)).unwrap();
        set_log_guid(&env, &none, &[0x11; 16]);
        env.assert_same(&none, "vhdx", "orig.vhdx", "vhdx");
        let cmp = env.vdisk(&["compare", &none, "orig.vhdx"]);
        assert_eq!(
            stdout(&cmp),
            "Images are identical.\n",
            "{none}: {}",
            stderr(&cmp)
        );

        // An entry with a bad checksum is not part of the log: nothing to replay.
        let bad = format!("bad-{name}");
        fs::copy(env.path("orig.vhdx"), env.path(&bad)).unwrap();
        set_log_guid(&env, &bad, &first_guid);
        env.write_bytes(&bad, first_off + 4096 * first_sectors - 100, b"x");
        let cmp = env.vdisk(&["compare", &bad, "orig.vhdx"]);
        assert!(
            cmp.status.code().is_some_and(|c| c <= 1),
            "{bad}: {}",
            stderr(&cmp)
        );

        // An entry recording a flush past the end of the (truncated) file.
        let trunc = format!("flushed-{name}");
        fs::copy(env.path("orig.vhdx"), env.path(&trunc)).unwrap();
        set_log_guid(&env, &trunc, &first_guid);
        env.write_bytes(&trunc, first_off + 48, &(1u64 << 40).to_le_bytes());
        fix_crc(&env, &trunc, first_off, 4096 * first_sectors as usize);
        refused(
            &env,
            &trunc,
            Policy::Untrusted,
            ErrorKind::Corrupt,
            "flushed",
        );
    }

    // A log too large to replay in memory.
    env.create("big.vhdx", "vhdx", "log_size=32M", "64M");
    env.qemu_io("big.vhdx", "vhdx", &["write -P 1 0 4k"]);
    let (_, _, g) = *log_entries(&env, "big.vhdx").last().unwrap();
    set_log_guid(&env, "big.vhdx", &g);
    refused(
        &env,
        "big.vhdx",
        Policy::Trusted,
        ErrorKind::UnsupportedFeature,
        "log needs replay",
    );
}

#[test]
fn malformed_metadata_and_bat() {
    let env = Env::new();
    let item =
        |name: &str, meta: u64, n: u64| read_u64(&env, name, meta + 32 + 32 * n + 16) & 0xFFFF_FFFF;

    let (_, meta) = base(&env, "mdoff.vhdx");
    env.write_bytes("mdoff.vhdx", meta + 32 + 16, &0xFFFF_FF00u32.to_le_bytes());
    refused(
        &env,
        "mdoff.vhdx",
        Policy::Untrusted,
        ErrorKind::Corrupt,
        "metadata item",
    );

    let (_, meta) = base(&env, "mdsig.vhdx");
    env.write_bytes("mdsig.vhdx", meta, b"metadatX");
    refused(
        &env,
        "mdsig.vhdx",
        Policy::Untrusted,
        ErrorKind::Corrupt,
        "metadata table",
    );

    for (name, bs) in [
        ("bs3.vhdx", 3 * MIB as u32),
        ("bs512.vhdx", 512 << 20),
        ("bs0.vhdx", 0),
    ] {
        let (_, meta) = base(&env, name);
        let fp = item(name, meta, 0); // file parameters come first in qemu's table
        env.write_bytes(name, meta + fp, &bs.to_le_bytes());
        refused(
            &env,
            name,
            Policy::Untrusted,
            ErrorKind::Corrupt,
            "block size",
        );
    }

    let (_, meta) = base(&env, "vs.vhdx");
    let vs = item("vs.vhdx", meta, 1);
    env.write_bytes("vs.vhdx", meta + vs, &(1u64 << 60).to_le_bytes());
    refused(
        &env,
        "vs.vhdx",
        Policy::Untrusted,
        ErrorKind::TooLarge,
        "virtual disk size",
    );

    let (_, meta) = base(&env, "ls.vhdx");
    let ls = item("ls.vhdx", meta, 3);
    env.write_bytes("ls.vhdx", meta + ls, &1000u32.to_le_bytes());
    refused(
        &env,
        "ls.vhdx",
        Policy::Untrusted,
        ErrorKind::Corrupt,
        "logical sector size",
    );

    let bat_cases: &[(&str, u64, &str)] = &[
        ("bpast.vhdx", (1 << 40) | 6, "past the end of the file"),
        ("bhead.vhdx", 6, "header section"),
        ("bbat.vhdx", (2 * MIB) | 6, "BAT region"),
        ("bpart.vhdx", (8 * MIB) | 7, "PARTIALLY_PRESENT"),
        ("bstate.vhdx", (8 * MIB) | 4, "state 4"),
    ];
    for (name, entry, what) in bat_cases {
        let (bat, _) = base(&env, name);
        env.write_bytes(name, bat + 8, &entry.to_le_bytes());
        refused(&env, name, Policy::Untrusted, ErrorKind::Corrupt, what);
    }

    // Two blocks sharing a file offset: readable, but `check` of the driver lists it.
    let (bat, _) = base(&env, "dup.vhdx");
    let e0 = read_u64(&env, "dup.vhdx", bat);
    env.write_bytes("dup.vhdx", bat + 8, &e0.to_le_bytes());
    let img = open(&env, "dup.vhdx", Policy::Untrusted).unwrap();
    let problems = img.driver().unwrap().check().unwrap();
    assert!(
        problems.iter().any(|p| p.contains("overlap")),
        "{problems:?}"
    );
}

#[test]
fn differencing_is_refused() {
    let env = Env::new();
    let (_, meta) = base(&env, "diff.vhdx");
    // Has-parent flag in the file parameters, and a parent locator item appended.
    let fp = read_u64(&env, "diff.vhdx", meta + 32 + 16) & 0xFFFF_FFFF;
    env.write_bytes("diff.vhdx", meta + fp + 4, &2u32.to_le_bytes());
    let count = {
        let f = fs::File::open(env.path("diff.vhdx")).unwrap();
        let mut b = [0u8; 2];
        f.read_exact_at(&mut b, meta + 10).unwrap();
        u16::from_le_bytes(b)
    };
    let e = meta + 32 + 32 * u64::from(count);
    let locator: [u8; 16] = [
        0x2D, 0x5F, 0xD3, 0xA8, 0x0B, 0xB3, 0x4D, 0x45, 0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB,
        0x0C,
    ];
    env.write_bytes("diff.vhdx", e, &locator);
    env.write_bytes("diff.vhdx", e + 16, &0x2_0000u32.to_le_bytes());
    env.write_bytes("diff.vhdx", e + 20, &0x100u32.to_le_bytes());
    env.write_bytes("diff.vhdx", e + 24, &4u32.to_le_bytes());
    env.write_bytes("diff.vhdx", meta + 10, &(count + 1).to_le_bytes());

    let err = open(&env, "diff.vhdx", Policy::Untrusted).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Denied, "{err}");
    assert!(err.to_string().contains("parent locator"), "{err}");
    let err = open(&env, "diff.vhdx", Policy::Trusted).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnsupportedFeature, "{err}");
    assert!(err.to_string().contains("parent"), "{err}");

    let o = env.vdisk(&["info", "--untrusted", "diff.vhdx"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("parent locator"), "{}", stderr(&o));
    let o = env.vdisk(&["import", "diff.vhdx", "out.img"]);
    assert!(!o.status.success(), "import accepted a differencing disk");
    assert!(stderr(&o).contains("parent locator"), "{}", stderr(&o));
}
