//! VDI reading held to qemu-img: static and dynamic images made by qemu-img, odd sizes,
//! data written by qemu-io at odd offsets (plain, zero writes, discards); malformed images
//! (bytes patched in qemu-made ones) refused with the right error kind; `check` findings.

mod common;

use common::*;
use std::sync::Arc;
use vdisk::io::MemIo;
use vdisk::{ErrorKind, Format, Image, OpenOptions, Policy};

fn fill(env: &Env, img: &str, size: u64) {
    let end = format!("write -P 0xe1 {} 6000", size - 7000);
    let mut cmds = vec![
        "write -P 0xab 1000 5000",
        "write -P 0x5c 1047000 3000",
        "write -z 1049000 700",
        "discard 2097152 1048576",
    ];
    if size > 8 << 20 {
        cmds.extend([
            "write -P 0x17 7340032 65536",
            "write -z 7340032 4096",
            "write -z 8388608 1048576",
        ]);
    }
    cmds.push(&end);
    env.qemu_io(img, "vdi", &cmds);
}

#[test]
fn static_and_dynamic_match_qemu() {
    let env = Env::new();
    for stat in ["off", "on"] {
        for size in ["10M", "10486272", "5000000", "3079M"] {
            if stat == "on" && size == "3079M" {
                continue; // a 3 GiB file; the layout is the same as the small ones
            }
            let name = format!("static-{stat}-{size}.vdi");
            env.create(&name, "vdi", &format!("static={stat}"), size);
            let vsize = env.info(&name, "vdi")["virtual-size"].as_u64().unwrap();
            if stat == "on" {
                // Fully written, so the file has no holes (see sparse_static_matches_qemu).
                env.qemu_io(&name, "vdi", &[&format!("write -P 0x3c 0 {vsize}")]);
            }
            fill(&env, &name, vsize);
            let o = check_image(&env, &Check::new(&name));
            assert!(o.map_has(|e| e["data"] == true), "{name}");
            let v = json(&env.vdisk_ok(&["info", "--output=json", &name]));
            assert_eq!(v["cluster-size"], 1 << 20, "{name}");
            let img = Image::open(env.path(&name), &OpenOptions::default()).unwrap();
            assert_eq!(img.driver().unwrap().check(), Some(vec![]), "{name}");
            env.qemu_img(&["check", "-f", "vdi", &name]);
        }
    }
}

/// A static VDI whose file has holes: its data starts 1 KiB into the file, so holes of the
/// file are not 4 KiB-aligned in the guest. Map, info and content match qemu-img exactly;
/// `vdisk convert` leaves the file-system blocks that only the zero edges of data extents
/// would fill unwritten, so its output allocates no more than qemu-img's.
#[test]
fn sparse_static_matches_qemu() {
    let env = Env::new();
    for size in ["10M", "5000000"] {
        let name = format!("sparse-static-{size}.vdi");
        env.create(&name, "vdi", "static=on", size);
        let vsize = env.info(&name, "vdi")["virtual-size"].as_u64().unwrap();
        fill(&env, &name, vsize);
        env.sync();
        for args in [["info", "--output=json"], ["map", "--output=json"]] {
            let args = [args[0], args[1], name.as_str()];
            assert_eq!(
                json(&env.vdisk_ok(&args)),
                json(&env.qemu_img(&args)),
                "{args:?}"
            );
        }
        assert_eq!(
            stdout(&env.vdisk_ok(&["info", &name])),
            stdout(&env.qemu_img(&["info", &name]))
        );
        let map = env.map(&name, "vdi");
        let q = format!("{name}.q.raw");
        let v = format!("{name}.v.raw");
        env.qemu_img(&["convert", "-O", "raw", &name, &q]);
        env.vdisk_ok(&["convert", "-O", "raw", &name, &v]);
        env.assert_same(&q, "raw", &v, "raw");
        env.assert_same(&name, "vdi", &v, "raw");
        env.sync();
        let data_extents = map.iter().filter(|e| e["zero"] == false).count() as u64;
        let (qa, va) = (allocated(&env.path(&q)), allocated(&env.path(&v)));
        eprintln!("{name}: allocated vdisk {va} qemu-img {qa} ({data_extents} data extents)");
        assert!(
            va <= qa,
            "{name}: vdisk's raw allocates {va}, qemu-img's {qa}"
        );
    }
}

#[test]
fn import_through_a_pipe() {
    let env = Env::new();
    env.create("i.vdi", "vdi", "", "5M");
    fill(&env, "i.vdi", 5 << 20);
    let o = env.import_pipe("i.vdi", "i.out");
    assert!(o.status.success(), "import: {}", stderr(&o));
    // Read front to back: no spool file.
    assert!(!stderr(&o).contains("spooling"), "{}", stderr(&o));
    same_disk(env.path("i.vdi"), env.path("i.out"));
}

// ---- malformed images ----

fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

fn open_mem(bytes: Vec<u8>) -> vdisk::Result<Image> {
    let opts = OpenOptions {
        format: Some(Format::Vdi),
        policy: Policy::Untrusted,
        ..OpenOptions::default()
    };
    Image::from_io(Arc::new(MemIo::new(bytes)), &opts)
}

fn fails(bytes: Vec<u8>, kind: ErrorKind, needle: &str) {
    match open_mem(bytes) {
        Ok(_) => panic!("opened; expected {kind:?} ({needle})"),
        Err(e) => {
            assert_eq!(e.kind(), kind, "wrong kind: {e}");
            assert!(e.to_string().contains(needle), "{e} lacks {needle:?}");
        }
    }
}

/// A qemu-made dynamic 6 MiB VDI with blocks 0 and 4 allocated (map entries 0 and 1).
fn dynamic_image(env: &Env) -> Vec<u8> {
    env.create("m.vdi", "vdi", "", "6M");
    env.qemu_io(
        "m.vdi",
        "vdi",
        &["write -P 0x11 0 4096", "write -P 0x22 4194304 4096"],
    );
    std::fs::read(env.path("m.vdi")).unwrap()
}

const MAP: usize = 0x200;

#[test]
fn malformed() {
    let env = Env::new();
    let good = dynamic_image(&env);
    let len = good.len();
    assert_eq!(good[MAP..MAP + 4], [0, 0, 0, 0]);
    assert!(open_mem(good.clone()).is_ok());
    let patched = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        b
    };
    let cases: Vec<(Vec<u8>, ErrorKind, &str)> = vec![
        (patched(&|b| b[0x40] = 0), ErrorKind::Corrupt, "signature"),
        (
            patched(&|b| put32(b, 0x44, 0x0002_0000)),
            ErrorKind::UnsupportedFeature,
            "version 2.0",
        ),
        (
            patched(&|b| put32(b, 0x48, 0x10)),
            ErrorKind::Corrupt,
            "header size",
        ),
        (
            patched(&|b| put32(b, 0x48, 0xffff_ffff)),
            ErrorKind::Corrupt,
            "header size",
        ),
        (
            patched(&|b| put32(b, 0x4c, 4)),
            ErrorKind::UnsupportedFeature,
            "image type",
        ),
        (
            patched(&|b| put32(b, 0x154, 0x201)),
            ErrorKind::Corrupt,
            "multiple of 512",
        ),
        (
            patched(&|b| put32(b, 0x154, len as u32)),
            ErrorKind::Corrupt,
            "block map",
        ),
        (
            patched(&|b| put32(b, 0x154, 0)),
            ErrorKind::Corrupt,
            "overlaps the header",
        ),
        (
            patched(&|b| put32(b, 0x158, 0x200)),
            ErrorKind::Corrupt,
            "data offset",
        ),
        (
            patched(&|b| put32(b, 0x158, u32::MAX - 511)),
            ErrorKind::Corrupt,
            "past the end",
        ),
        (
            patched(&|b| put32(b, 0x168, 4096)),
            ErrorKind::UnsupportedFeature,
            "sector size",
        ),
        (
            patched(&|b| put64(b, 0x170, 1 << 60)),
            ErrorKind::TooLarge,
            "disk size",
        ),
        (
            patched(&|b| put64(b, 0x170, 7 << 20)),
            ErrorKind::Corrupt,
            "too small",
        ),
        (
            patched(&|b| put32(b, 0x178, 0)),
            ErrorKind::Corrupt,
            "block size",
        ),
        (
            patched(&|b| put32(b, 0x178, 3000)),
            ErrorKind::Corrupt,
            "block size",
        ),
        (
            patched(&|b| put32(b, 0x178, 2 << 20)),
            ErrorKind::UnsupportedFeature,
            "block size",
        ),
        (
            patched(&|b| put32(b, 0x17c, 512)),
            ErrorKind::UnsupportedFeature,
            "extra",
        ),
        (
            patched(&|b| put32(b, 0x180, u32::MAX)),
            ErrorKind::TooLarge,
            "blocks",
        ),
        (
            patched(&|b| put32(b, 0x180, 1 << 25)),
            ErrorKind::Corrupt,
            "past the end of the file",
        ),
        (
            patched(&|b| b[0x1b8] = 1),
            ErrorKind::UnsupportedFeature,
            "parent UUID",
        ),
        (
            patched(&|b| b[0x1a8] = 1),
            ErrorKind::UnsupportedFeature,
            "link",
        ),
        // Block map entries: past EOF, past the blocks in the image.
        (
            patched(&|b| put32(b, MAP + 4, 5)),
            ErrorKind::Corrupt,
            "entry 1",
        ),
        (
            patched(&|b| put32(b, MAP + 4, 6)),
            ErrorKind::Corrupt,
            "not below",
        ),
        // Truncated: the second block is cut short, or the header itself.
        (
            good[..len - 4096].to_vec(),
            ErrorKind::Corrupt,
            "past the end",
        ),
        (good[..100].to_vec(), ErrorKind::Corrupt, "too short"),
    ];
    for (bytes, kind, needle) in cases {
        fails(bytes, kind, needle);
    }
}

#[test]
fn check_finds_shared_and_stray_blocks() {
    let env = Env::new();
    let good = dynamic_image(&env);
    // Two guest blocks sharing data block 0: readable (as qemu reads it), but check says so.
    let mut dup = good.clone();
    put32(&mut dup, MAP + 4, 0);
    std::fs::write(env.path("dup.vdi"), &dup).unwrap();
    let img = open_mem(dup).unwrap();
    let found = img.driver().unwrap().check().unwrap();
    assert!(
        found
            .iter()
            .any(|p| p.contains("already used by an earlier entry")),
        "{found:?}"
    );
    let q = env.qemu_img_any(&["check", "-f", "vdi", "dup.vdi"]);
    assert_ne!(q.status.code(), Some(0), "qemu-img check finds it too");
    // An entry past the allocated count.
    let mut stray = good.clone();
    put32(&mut stray, 0x184, 1);
    let img = open_mem(stray).unwrap();
    let found = img.driver().unwrap().check().unwrap();
    assert!(
        found
            .iter()
            .any(|p| p.contains("not below the 1 blocks allocated")),
        "{found:?}"
    );
    // A map entry "zero" (0xfffffffe) reads as zeros.
    let mut z = good.clone();
    put32(&mut z, MAP + 16, 0xffff_fffe);
    let img = open_mem(z).unwrap();
    let mut buf = vec![1u8; 4096];
    img.read_at(&mut buf, 4 << 20).unwrap();
    assert!(buf.iter().all(|&v| v == 0));
    let e = img.extent(4 << 20, 1 << 20).unwrap();
    assert!(e.zero && !e.data);
}
