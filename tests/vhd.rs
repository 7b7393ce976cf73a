//! VHD ("vpc") reading held to qemu-img: fixed and dynamic images made by qemu-img with and
//! without `force_size`, odd sizes, data written by qemu-io at odd offsets; malformed images
//! (bytes patched in qemu-made ones) refused with the right error kind; differencing disks
//! refused (Denied under the untrusted policy and by `vdisk import`).

mod common;

use common::*;
use std::sync::Arc;
use vdisk::io::MemIo;
use vdisk::{ErrorKind, Format, Image, OpenOptions, Policy};

/// Sizes: round, one sector more, and one that CHS geometry cannot express.
const SIZES: &[&str] = &["100M", "104858112", "3079M"];

fn fill(env: &Env, img: &str, size: u64) {
    let end = format!("write -P 0xe1 {} 6000", size - 7000);
    let mut cmds = vec![
        "write -P 0xab 1000 5000",
        "write -P 0x5c 2096000 3000",
        "write -z 2098000 700",
    ];
    if size > 8 << 20 {
        cmds.extend(["write -P 0x17 7340032 65536", "write -z 7340032 4096"]);
    }
    cmds.push(&end);
    env.qemu_io(img, "vpc", &cmds);
}

#[test]
fn dynamic_and_fixed_match_qemu() {
    let env = Env::new();
    for sub in ["dynamic", "fixed"] {
        for force in ["off", "on"] {
            for size in SIZES {
                if sub == "fixed" && *size == "3079M" {
                    continue; // a 3 GiB sparse file; the CHS cases are covered above
                }
                let name = format!("{sub}-{force}-{size}.vhd");
                env.create(
                    &name,
                    "vpc",
                    &format!("subformat={sub},force_size={force}"),
                    size,
                );
                let vsize = env.info(&name, "vpc")["virtual-size"].as_u64().unwrap();
                fill(&env, &name, vsize);
                let mut c = Check::new(&name);
                // qemu-img only reads fixed VHDs when told the format.
                c.format = Some("vpc");
                let o = check_image(&env, &c);
                assert!(o.map_has(|e| e["data"] == true));
                // Detected without -f too, with the same size.
                let v = json(&env.vdisk_ok(&["info", "--output=json", &name]));
                assert_eq!(v["format"], "vpc", "{name}");
                assert_eq!(v["virtual-size"], o.size, "{name}");
                if sub == "dynamic" {
                    assert_eq!(v["cluster-size"], 2 << 20, "{name}");
                    assert!(o.map_has(|e| e["zero"] == true && e["data"] == false));
                }
            }
        }
    }
}

#[test]
fn import_through_a_pipe() {
    let env = Env::new();
    env.create("b.vhd", "vpc", "", "5M");
    let vsize = env.info("b.vhd", "vpc")["virtual-size"].as_u64().unwrap();
    fill(&env, "b.vhd", vsize);
    env.create("f.vhd", "vpc", "subformat=fixed", "5M");
    fill(&env, "f.vhd", vsize);
    for img in ["b.vhd", "f.vhd"] {
        let out = format!("{img}.imported");
        let o = env.import_pipe(img, &out);
        assert!(o.status.success(), "import: {}", stderr(&o));
        // Read front to back: no spool file.
        assert!(!stderr(&o).contains("spooling"), "{}", stderr(&o));
        // A fixed VHD has no header: the stream recognises its footer at the end and drops
        // it, so the disk is what `convert -f vpc` gives (CDI and a probing qemu-img keep
        // the footer as a last raw sector).
        env.assert_same(img, "vpc", &out, "raw");
        let got = std::fs::metadata(env.path(&out)).unwrap().len();
        assert_eq!(got, vsize, "{img}: imported size");
    }
}

// ---- malformed images ----

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}

fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_be_bytes());
}

/// Recompute the checksum of the footer starting at `at`.
fn fix_footer(b: &mut [u8], at: usize) {
    let f = &mut b[at..at + 512];
    f[64..68].fill(0);
    let sum = f.iter().fold(0u32, |s, &v| s.wrapping_add(u32::from(v)));
    f[64..68].copy_from_slice(&(!sum).to_be_bytes());
}

fn open_mem(bytes: Vec<u8>, policy: Policy) -> vdisk::Result<Image> {
    let opts = OpenOptions {
        format: Some(Format::Vhd),
        policy,
        ..OpenOptions::default()
    };
    Image::from_io(Arc::new(MemIo::new(bytes)), &opts)
}

fn fails(bytes: Vec<u8>, kind: ErrorKind, needle: &str) {
    match open_mem(bytes, Policy::Trusted) {
        Ok(_) => panic!("opened; expected {kind:?} ({needle})"),
        Err(e) => {
            assert_eq!(e.kind(), kind, "wrong kind: {e}");
            assert!(e.to_string().contains(needle), "{e} lacks {needle:?}");
        }
    }
}

/// A small qemu-made dynamic VHD with two allocated blocks.
fn dynamic_image(env: &Env) -> Vec<u8> {
    env.create("m.vhd", "vpc", "", "6M");
    env.qemu_io(
        "m.vhd",
        "vpc",
        &["write -P 0x11 0 4096", "write -P 0x22 4194304 4096"],
    );
    std::fs::read(env.path("m.vhd")).unwrap()
}

#[test]
fn malformed_dynamic() {
    let env = Env::new();
    let good = dynamic_image(&env);
    let len = good.len();
    assert!(open_mem(good.clone(), Policy::Untrusted).is_ok());
    let hdr = 512;
    let bat_off = 1536;
    let patched = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        b
    };
    // Cookie: the head copy is gone, the end footer says dynamic.
    fails(patched(&|b| b[0] = b'x'), ErrorKind::Corrupt, "copy");
    // Checksum.
    fails(patched(&|b| b[24] ^= 1), ErrorKind::Corrupt, "checksum");
    // Dynamic header offset past EOF, or on the footer copy.
    for off in [len as u64, u64::MAX - 100, 0] {
        fails(
            patched(&|b| {
                put64(b, 16, off);
                fix_footer(b, 0)
            }),
            ErrorKind::Corrupt,
            "dynamic header offset",
        );
    }
    // Dynamic header cookie.
    fails(patched(&|b| b[hdr] = b'X'), ErrorKind::Corrupt, "cxsparse");
    // BAT offset past EOF / onto the header.
    fails(
        patched(&|b| put64(b, hdr + 16, len as u64)),
        ErrorKind::Corrupt,
        "BAT at offset",
    );
    fails(
        patched(&|b| put64(b, hdr + 16, 600)),
        ErrorKind::Corrupt,
        "overlaps",
    );
    // Table sizes.
    fails(
        patched(&|b| put32(b, hdr + 28, u32::MAX)),
        ErrorKind::TooLarge,
        "BAT",
    );
    fails(
        patched(&|b| put32(b, hdr + 28, 1)),
        ErrorKind::Corrupt,
        "too small",
    );
    // Block sizes.
    fails(
        patched(&|b| put32(b, hdr + 32, 0)),
        ErrorKind::Corrupt,
        "block size",
    );
    fails(
        patched(&|b| put32(b, hdr + 32, 3 << 20)),
        ErrorKind::Corrupt,
        "power of two",
    );
    fails(
        patched(&|b| put32(b, hdr + 32, 1 << 31)),
        ErrorKind::TooLarge,
        "block size",
    );
    // BAT entries into the trailing footer, the header, the BAT, past EOF, each other.
    let first = be32(&good, bat_off);
    assert_ne!(first, u32::MAX);
    for (e, needle) in [
        (((len - 512) / 512) as u32, "past the end"),
        (1, "overlaps"),
        (3, "overlaps"),
        (u32::MAX - 1, "past the end"),
        (first + 1, "overlap"),
    ] {
        fails(
            patched(&|b| put32(b, bat_off + 8, e)),
            ErrorKind::Corrupt,
            needle,
        );
    }
    // Truncated: the last block and the footer are gone.
    fails(
        good[..len - 512 - 4096].to_vec(),
        ErrorKind::Corrupt,
        "past the end",
    );
    fails(good[..300].to_vec(), ErrorKind::Corrupt, "too short");
    // Huge disk size (current_size is used for creator qem2).
    fails(
        patched(&|b| {
            b[28..32].copy_from_slice(b"qem2");
            put64(b, 48, 1 << 50);
            fix_footer(b, 0)
        }),
        ErrorKind::TooLarge,
        "2040 GiB",
    );
    // Other disk types.
    for t in [0, 1, 5, 6, 77] {
        fails(
            patched(&|b| {
                put32(b, 60, t);
                fix_footer(b, 0)
            }),
            ErrorKind::UnsupportedFeature,
            "disk type",
        );
    }
}

#[test]
fn malformed_fixed() {
    let env = Env::new();
    env.create("f.vhd", "vpc", "subformat=fixed", "3M");
    let good = std::fs::read(env.path("f.vhd")).unwrap();
    let len = good.len();
    assert!(open_mem(good.clone(), Policy::Untrusted).is_ok());
    let mut b = good.clone();
    b[len - 512 + 20] ^= 1;
    fails(b, ErrorKind::Corrupt, "checksum");
    let mut b = good[..len - 4096].to_vec();
    b.extend_from_slice(&good[len - 512..]);
    fails(b, ErrorKind::Corrupt, "truncated");
    fails(good[..len - 512].to_vec(), ErrorKind::Corrupt, "conectix");
}

#[test]
fn differencing_is_refused() {
    let env = Env::new();
    let mut b = dynamic_image(&env);
    let len = b.len();
    put32(&mut b, 60, 4);
    fix_footer(&mut b, 0);
    fix_footer(&mut b, len - 512);
    let parent: Vec<u8> = "parent-disk.vhd"
        .encode_utf16()
        .flat_map(|u| u.to_be_bytes())
        .collect();
    b[512 + 64..512 + 64 + parent.len()].copy_from_slice(&parent);
    let e = open_mem(b.clone(), Policy::Untrusted).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Denied, "{e}");
    assert!(e.to_string().contains("parent-disk.vhd"), "{e}");
    let e = open_mem(b.clone(), Policy::Trusted).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::UnsupportedFeature, "{e}");
    assert!(e.to_string().contains("parent-disk.vhd"), "{e}");
    std::fs::write(env.path("diff.vhd"), &b).unwrap();
    let o = env.vdisk(&["info", "--untrusted", "diff.vhd"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("parent-disk.vhd"), "{}", stderr(&o));
    let o = env.import_pipe("diff.vhd", "diff.out");
    assert!(
        !o.status.success(),
        "import of a differencing VHD succeeded"
    );
    assert!(stderr(&o).contains("parent-disk.vhd"), "{}", stderr(&o));
}

#[test]
fn clear_bitmap_bits_read_as_zeros() {
    let env = Env::new();
    let mut b = dynamic_image(&env);
    // Block 0's bitmap sits at the sector its BAT entry names; clear sector 1's bit.
    let bm = be32(&b, 1536) as usize * 512;
    b[bm] = 0b1011_1111;
    let img = open_mem(b, Policy::Untrusted).unwrap();
    let mut buf = vec![0u8; 2048];
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf[..512].iter().all(|&v| v == 0x11));
    assert!(buf[512..1024].iter().all(|&v| v == 0));
    assert!(buf[1024..].iter().all(|&v| v == 0x11));
    let e = img.extent(512, 4096).unwrap();
    assert_eq!((e.len, e.zero, e.data), (512, true, false));
    let e = img.extent(0, 4096).unwrap();
    assert_eq!((e.len, e.zero, e.data), (512, false, true));
}

/// qemu's virtual-size rule by creator app and geometry, on qemu-made images whose footers
/// are patched (creator, geometry) and re-checksummed: vdisk agrees with `qemu-img info`.
#[test]
fn size_rules_follow_the_creator_app() {
    let env = Env::new();
    env.create("s.vhd", "vpc", "", "100M");
    env.create("sf.vhd", "vpc", "subformat=fixed", "10M");
    let base = std::fs::read(env.path("s.vhd")).unwrap();
    let fixed_len = std::fs::metadata(env.path("sf.vhd")).unwrap().len() as usize;
    let fixed_tail = {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(env.path("sf.vhd")).unwrap();
        let mut t = vec![0u8; 512];
        f.read_exact_at(&mut t, (fixed_len - 512) as u64).unwrap();
        t
    };
    let mut n = 0;
    for creator in [
        *b"vpc ", *b"win ", *b"qemu", *b"qem2", *b"wa\0\0", *b"d2v\0", *b"CTXS",
    ] {
        for max_geometry in [false, true] {
            // current_size a little below the CHS size, so the two rules differ.
            let patch = |f: &mut [u8], at: usize| {
                f[at + 28..at + 32].copy_from_slice(&creator);
                let cur = u64::from_be_bytes(f[at + 48..at + 56].try_into().unwrap());
                put64(f, at + 48, cur - 3 * 512 - 100);
                if max_geometry {
                    f[at + 56..at + 60].copy_from_slice(&[0xff, 0xff, 16, 255]);
                }
                fix_footer(f, at);
            };
            n += 1;
            let name = format!("c{n}.vhd");
            let mut b = base.clone();
            let len = b.len();
            patch(&mut b, 0);
            patch(&mut b, len - 512);
            std::fs::write(env.path(&name), &b).unwrap();
            let q = env.info(&name, "vpc")["virtual-size"].clone();
            let v = json(&env.vdisk_ok(&["info", "--output=json", &name]))["virtual-size"].clone();
            assert_eq!(
                v, q,
                "{name}: creator {creator:?}, max geometry {max_geometry}"
            );
            // The fixed image: only its footer at the end changes.
            let fname = format!("f{n}.vhd");
            std::fs::copy(env.path("sf.vhd"), env.path(&fname)).unwrap();
            let mut t = fixed_tail.clone();
            patch(&mut t, 0);
            env.write_bytes(&fname, (fixed_len - 512) as u64, &t);
            let q = env.info(&fname, "vpc")["virtual-size"].clone();
            let v = json(&env.vdisk_ok(&["info", "--output=json", "-f", "vpc", &fname]))
                ["virtual-size"]
                .clone();
            assert_eq!(
                v, q,
                "{fname}: creator {creator:?}, max geometry {max_geometry}"
            );
        }
    }
}
