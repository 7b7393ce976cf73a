//! qemu-img is the oracle: images are made at test time with qemu-img, qemu-io and xorriso,
//! and `vdisk` must agree with qemu-img on `convert -O raw` (same bytes, no more allocation),
//! `info` (JSON and text), `map --output=json` (same text) and `compare` (same verdict and
//! offset). See [`common::check_image`] for every check made on each image.
//!
//! Needs qemu-img, qemu-io and xorriso (`scripts/deps.sh` installs them); without them the
//! tests fail rather than skip.

mod common;

use common::{Check, Env, check_convert, check_image, stderr, stdout};
use serde_json::Value;

fn is(e: &Value, key: &str) -> bool {
    e[key].as_bool().unwrap()
}

/// qemu-io commands shared by the cluster-size matrix: unaligned pattern writes, zero writes
/// over allocated and unallocated clusters, a discard, a single byte and the last bytes of a
/// disk that ends mid-cluster (9000 KiB).
const MATRIX_SIZE: &str = "9000k";
const MATRIX_WRITES: &[&str] = &[
    "write -P 0x11 1000 70000",
    "write -P 0x22 300000 1500000",
    "write -z 400000 300000",
    "write -z 3000000 600000",
    "write -P 0x33 5000000 777777",
    "discard 5100000 300000",
    "write -P 0x55 2000001 1",
    "write -P 0x44 9215000 1000",
];

/// Every (compat, refcount_bits) pair for one cluster size.
fn matrix(cluster: &str) {
    let env = Env::new();
    for (compat, refcount) in [("0.10", 16), ("1.1", 1), ("1.1", 16), ("1.1", 64)] {
        let name = format!("m-{cluster}-{compat}-{refcount}.qcow2");
        env.create(
            &name,
            "qcow2",
            &format!("cluster_size={cluster},compat={compat},refcount_bits={refcount}"),
            MATRIX_SIZE,
        );
        env.qemu_io(&name, "qcow2", MATRIX_WRITES);
        let o = check_image(&env, &Check::new(&name));
        let fs = &o.info["format-specific"]["data"];
        assert_eq!(fs["compat"], compat, "{name}");
        assert_eq!(fs["refcount-bits"], refcount, "{name}");
        assert!(o.map_has(|e| is(e, "data")), "{name}: no data written");
        if compat == "1.1" {
            assert!(
                o.map_has(|e| is(e, "present") && is(e, "zero") && !is(e, "data")),
                "{name}: no zero clusters"
            );
        }
    }
}

#[test]
fn matrix_cluster_512() {
    matrix("512");
}

#[test]
fn matrix_cluster_4k() {
    matrix("4k");
}

#[test]
fn matrix_cluster_64k() {
    matrix("64k");
}

#[test]
fn matrix_cluster_2m() {
    matrix("2M");
}

/// A raw file of `size` (at least 6 MiB) bytes mixing random (incompressible) data, repeated
/// bytes, clusters half random and half repeated, and holes. The random tail is long enough
/// to leave whole 2 MiB clusters incompressible.
fn mixed_raw(env: &Env, name: &str, size: u64, seed: u64) {
    env.set_len(name, size);
    env.write_random(name, 3 * 65536 + 100, 300_000, seed);
    env.write_fill(name, (1 << 20) + 33, 500_000, 0x5a);
    for i in 0..8u64 {
        let at = (2 << 20) + i * 131_072;
        env.write_random(name, at, 4096, seed + i + 1);
        env.write_fill(name, at + 4096, 40_000, 0x30 + i as u8);
    }
    env.write_random(name, 4_000_000, (size - 4_000_100) as usize, seed + 100);
    env.write_fill(name, size - 100, 100, 0xee);
}

fn compressed(cases: &[(&str, &str, &str)]) {
    let env = Env::new();
    for (i, (ctype, cluster, extra)) in cases.iter().enumerate() {
        let src = format!("c{i}.src.raw");
        mixed_raw(&env, &src, 8 << 20, 1000 + i as u64);
        let name = format!("c-{ctype}-{cluster}.qcow2");
        let mut opts = format!("compression_type={ctype},cluster_size={cluster}");
        if !extra.is_empty() {
            opts = format!("{opts},{extra}");
        }
        env.qemu_img(&[
            "convert", "-f", "raw", "-O", "qcow2", "-c", "-o", &opts, &src, &name,
        ]);
        let o = check_image(&env, &Check::new(&name));
        assert_eq!(
            o.info["format-specific"]["data"]["compression-type"],
            *ctype
        );
        assert!(
            o.map_has(|e| is(e, "compressed")),
            "{name}: nothing compressed"
        );
        assert!(
            o.map_has(|e| is(e, "data") && !is(e, "compressed")),
            "{name}: no cluster left uncompressed (random data should be)"
        );
        // Then overwrite parts of compressed clusters, zero and discard some.
        let name2 = format!("c-{ctype}-{cluster}.w.qcow2");
        std::fs::copy(env.path(&name), env.path(&name2)).unwrap();
        env.qemu_io(
            &name2,
            "qcow2",
            &[
                "write -P 0x77 1048676 1000",
                "write -z 2097152 65536",
                "discard 3145728 131072",
                "write -P 0x78 4000000 3",
            ],
        );
        let o = check_image(&env, &Check::new(&name2));
        // (With 2 MiB clusters the writes rewrite every compressed cluster.)
        assert_eq!(
            o.map_has(|e| is(e, "compressed")),
            *cluster != "2M",
            "{name2}: compressed clusters left"
        );
    }
}

#[test]
fn compressed_zlib() {
    compressed(&[("zlib", "64k", ""), ("zlib", "512", ""), ("zlib", "2M", "")]);
}

#[test]
fn compressed_zstd() {
    compressed(&[
        ("zstd", "64k", ""),
        ("zstd", "4k", ""),
        ("zstd", "16k", "extended_l2=on"),
    ]);
}

#[test]
fn extended_l2_subclusters() {
    let env = Env::new();
    for cluster in ["16k", "64k", "2M"] {
        let name = format!("x-{cluster}.qcow2");
        env.create(
            &name,
            "qcow2",
            &format!("cluster_size={cluster},extended_l2=on"),
            "16M",
        );
        env.qemu_io(
            &name,
            "qcow2",
            &[
                "write -P 0x11 1000 3000",
                "write -P 0x22 100000 700",
                "write -P 0x33 1048576 307200",
                // Part of an allocated cluster, then of an unallocated one.
                "write -z 1053576 9000",
                "write -z 1179648 131072",
                "write -z 4195328 4096",
                "write -z 8388608 2097152",
                "discard 12582912 2097152",
                "write -P 0x44 16776516 700",
            ],
        );
        let o = check_image(&env, &Check::new(&name));
        assert_eq!(o.info["format-specific"]["data"]["extended-l2"], true);
        // Unallocated subclusters of allocated clusters keep a host offset.
        assert!(
            o.map_has(|e| !is(e, "present") && e.get("offset").is_some()),
            "{name}: no unallocated subcluster in an allocated cluster"
        );
        assert!(
            o.map_has(|e| is(e, "present") && is(e, "zero") && e.get("offset").is_some()),
            "{name}: no zero subcluster in an allocated cluster"
        );
        assert!(
            o.map_has(|e| is(e, "present") && is(e, "zero") && e.get("offset").is_none()),
            "{name}: no zero subcluster in an unallocated cluster"
        );
    }
}

#[test]
fn odd_sizes() {
    let env = Env::new();
    // qemu rounds sizes up to whole sectors: 1000 becomes 1024.
    env.create("tiny.qcow2", "qcow2", "size=1000", "");
    env.qemu_io(
        "tiny.qcow2",
        "qcow2",
        &["write -P 5 100 300", "write -P 6 1000 24"],
    );
    let o = check_image(&env, &Check::new("tiny.qcow2"));
    assert_eq!(o.size, 1024);

    // 3000000 bytes (not a sector multiple) with 2 MiB clusters: ends mid-cluster.
    env.create("mid.qcow2", "qcow2", "cluster_size=2M", "3000000");
    env.qemu_io(
        "mid.qcow2",
        "qcow2",
        &["write -P 7 2999808 512", "write -P 8 2097000 300"],
    );
    let o = check_image(&env, &Check::new("mid.qcow2"));
    assert_eq!(o.size, 3_000_320);

    // A v2 image of 5 MiB and 1 sector with 64 KiB clusters.
    env.create("v2odd.qcow2", "qcow2", "compat=0.10", "5243392");
    env.qemu_io("v2odd.qcow2", "qcow2", &["write -P 9 5242000 1392"]);
    check_image(&env, &Check::new("v2odd.qcow2"));
}

#[test]
fn raw_with_holes() {
    let env = Env::new();
    let name = "holes.raw";
    // Not a whole number of sectors: qemu (and vdisk) read a zero-padded last sector.
    env.set_len(name, (10 << 20) + 1234);
    env.write_random(name, 1 << 20, 512 << 10, 7);
    env.write_fill(name, (5 << 20) + 7, 3000, 0x61);
    env.write_fill(name, (10 << 20) + 1000, 234, 0x62);
    let o = check_image(
        &env,
        &Check {
            format: Some("raw"),
            ..Check::new(name)
        },
    );
    assert_eq!(o.size, (10 << 20) + 1536);
    assert!(o.map_has(|e| is(e, "zero") && !is(e, "data")), "no holes");
    // Detected rather than named.
    check_image(&env, &Check::new(name));
}

#[test]
fn iso_volume() {
    common::require_tool("xorriso", "-version");
    let env = Env::new();
    std::fs::create_dir(env.path("isodir")).unwrap();
    std::fs::write(env.path("isodir/readme.txt"), b"vdisk oracle\n").unwrap();
    env.write_random("isodir/blob.bin", 0, 300_000, 11);
    common::run_ok(env.cmd("xorriso").args([
        "-as",
        "mkisofs",
        "-V",
        "VDISK_ORACLE",
        "-o",
        "t.iso",
        "isodir",
    ]));
    check_image(
        &env,
        &Check {
            iso_volume: Some("VDISK_ORACLE"),
            ..Check::new("t.iso")
        },
    );
}

#[test]
fn backing_chains() {
    let env = Env::new();
    // raw <- qcow2 (4k clusters, larger) <- qcow2 (larger still).
    env.set_len("base.raw", 4 << 20);
    env.write_random("base.raw", 100_000, 300_000, 21);
    env.write_fill("base.raw", 2 << 20, 1 << 20, 0x42);
    env.overlay("mid.qcow2", "base.raw", "raw", "cluster_size=4k", "6M");
    env.qemu_io(
        "mid.qcow2",
        "qcow2",
        &[
            "write -P 2 524365 1048576",
            "write -z 102400 51200",
            "write -P 3 5242880 102400",
            "discard 2162688 65536",
        ],
    );
    env.overlay("top.qcow2", "mid.qcow2", "qcow2", "", "8M");
    env.qemu_io(
        "top.qcow2",
        "qcow2",
        &[
            "write -P 4 3072000 10240",
            "write -z 5222400 4096",
            "write -P 5 7340033 7168",
        ],
    );
    let o = check_image(&env, &Check::new("top.qcow2"));
    assert_eq!(o.info["backing-filename"], "mid.qcow2");
    assert!(o.map_has(|e| e["depth"] == 2), "top: nothing from base.raw");
    assert!(
        o.map_has(|e| e["depth"] == 0 && !is(e, "present") && is(e, "zero")),
        "top: no range beyond its backing file"
    );
    check_image(&env, &Check::new("mid.qcow2"));

    // An overlay in a subdirectory, naming its backing file relatively.
    std::fs::create_dir(env.path("sub")).unwrap();
    env.overlay("sub/o.qcow2", "../mid.qcow2", "qcow2", "", "");
    env.qemu_io("sub/o.qcow2", "qcow2", &["write -P 6 1000000 5000"]);
    let o = check_image(&env, &Check::new("sub/o.qcow2"));
    assert_eq!(o.info["full-backing-filename"], "sub/../mid.qcow2");

    // A compressed zstd base under an extended-L2 overlay written in subclusters: the
    // overlay's unallocated subclusters must read through to the compressed clusters.
    mixed_raw(&env, "cbase.src", 6 << 20, 31);
    env.qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-c",
        "-o",
        "compression_type=zstd",
        "cbase.src",
        "cbase.qcow2",
    ]);
    env.overlay("xover.qcow2", "cbase.qcow2", "qcow2", "extended_l2=on", "");
    env.qemu_io(
        "xover.qcow2",
        "qcow2",
        &[
            "write -P 6 1000 3000",
            "write -z 70000 5000",
            "write -P 7 205312 2048",
            "write -P 8 2097252 100",
        ],
    );
    let o = check_image(&env, &Check::new("xover.qcow2"));
    assert!(
        o.map_has(|e| e["depth"] == 1 && is(e, "compressed")),
        "xover: no compressed cluster seen through the overlay"
    );
}

#[test]
fn internal_snapshots() {
    let env = Env::new();
    for (name, opts) in [
        ("s3.qcow2", "compat=1.1"),
        ("s2.qcow2", "compat=0.10,cluster_size=4k"),
    ] {
        env.create(name, "qcow2", opts, "8M");
        env.qemu_io(
            name,
            "qcow2",
            &["write -P 1 0 1048576", "write -P 2 3145851 204800"],
        );
        env.qemu_img(&["snapshot", "-c", "first", name]);
        env.qemu_io(
            name,
            "qcow2",
            &[
                "write -P 3 524288 1048576",
                "discard 3145728 65536",
                "write -z 6291456 102400",
            ],
        );
        env.qemu_img(&["snapshot", "-c", "second", name]);
        if name == "s3.qcow2" {
            // Grow after the snapshots (qemu refuses for v2): qemu reads them with the
            // current size.
            env.qemu_img(&["resize", "-q", name, "12M"]);
            env.qemu_io(name, "qcow2", &["write -P 4 11534336 4096"]);
        }

        let o = check_image(&env, &Check::new(name));
        let snaps = o.info["snapshots"].as_array().unwrap();
        assert_eq!(snaps.len(), 2, "{name}");
        assert_eq!(snaps[0]["name"], "first");

        let q = env.qemu_img(&["snapshot", "-l", name]);
        let v = env.vdisk_ok(&["snapshot", "-l", name]);
        assert_eq!(stdout(&v), stdout(&q), "{name}: snapshot -l");

        for (i, spec) in ["first", "snapshot.id=1", "snapshot.name=second", "2"]
            .iter()
            .enumerate()
        {
            check_convert(&env, name, None, Some(spec), &format!("{name}.snap{i}.raw"));
        }
        // The snapshots really differ from the active state.
        let active = std::fs::read(env.path(&format!("{name}.qemu.raw"))).unwrap();
        let first = std::fs::read(env.path(&format!("{name}.snap0.raw"))).unwrap();
        let second = std::fs::read(env.path(&format!("{name}.snap2.raw"))).unwrap();
        assert!(first != second, "{name}: the snapshots are alike");
        assert!(
            active != first,
            "{name}: active state like the first snapshot"
        );
        // Only the v3 image changed after the second snapshot.
        assert_eq!(
            active == second,
            name == "s2.qcow2",
            "{name}: active vs second"
        );
        assert_eq!(
            first,
            std::fs::read(env.path(&format!("{name}.snap1.raw"))).unwrap()
        );

        let q = env.qemu_img_any(&["convert", "-O", "raw", "-l", "nosuch", name, "x.raw"]);
        let v = env.vdisk(&["convert", "-O", "raw", "-l", "nosuch", name, "y.raw"]);
        assert_ne!(q.status.code(), Some(0));
        assert_eq!(v.status.code(), Some(1), "{}", stderr(&v));
        assert!(stderr(&v).contains("nosuch"), "{}", stderr(&v));
        assert!(!env.path("y.raw").exists());
    }
}

#[test]
fn preallocation() {
    let env = Env::new();
    for (prealloc, cluster) in [
        ("metadata", "64k"),
        ("metadata", "4k"),
        ("falloc", "64k"),
        ("full", "64k"),
    ] {
        let name = format!("p-{prealloc}-{cluster}.qcow2");
        env.create(
            &name,
            "qcow2",
            &format!("preallocation={prealloc},cluster_size={cluster}"),
            "8M",
        );
        env.qemu_io(
            &name,
            "qcow2",
            &[
                "write -P 1 1000 5000",
                "write -z 1048576 65536",
                "write -P 3 5242880 3072",
                "discard 6291456 131072",
            ],
        );
        let o = check_image(&env, &Check::new(&name));
        if prealloc == "metadata" {
            // qemu spots the preallocation and reports the file's holes as zeros.
            assert!(
                o.map_has(|e| is(e, "data") && is(e, "zero")),
                "{name}: no preallocated zero data"
            );
        }
    }
}

#[test]
fn lazy_refcounts_dirty() {
    let env = Env::new();
    let name = "dirty.qcow2";
    env.create(name, "qcow2", "lazy_refcounts=on,cluster_size=4k", "8M");
    // Killed with SIGKILL after the writes: the dirty bit stays set.
    let o = common::run(env.cmd("qemu-io").args([
        "-c",
        "write -P 1 0 1048576",
        "-c",
        "flush",
        "-c",
        "write -P 2 2097157 10240",
        "-c",
        "flush",
        "-c",
        "sigraise 9",
        name,
    ]));
    assert!(!o.status.success(), "qemu-io was not killed");
    let o = check_image(&env, &Check::new(name));
    assert_eq!(o.info["dirty-flag"], true, "the image is not dirty");
    assert_eq!(o.info["format-specific"]["data"]["lazy-refcounts"], true);
    assert!(o.map_has(|e| is(e, "data")), "writes before the kill lost");
}

#[test]
fn external_data_file() {
    let env = Env::new();
    for (name, opts) in [
        ("df.qcow2", "data_file=df.data"),
        ("dfr.qcow2", "data_file=dfr.data,data_file_raw=on"),
    ] {
        env.create(name, "qcow2", opts, "4M");
        env.qemu_io(
            name,
            "qcow2",
            &["write -P 9 1000 102400", "write -z 2097152 65536"],
        );
        let o = check_image(
            &env,
            &Check {
                // A copy would share (and modify) the data file.
                flip_copy: false,
                ..Check::new(name)
            },
        );
        assert!(
            o.info["format-specific"]["data"]["data-file"].is_string(),
            "{name}: no data file"
        );
    }
}

#[test]
fn untrusted_refuses_backing_and_data_files() {
    let env = Env::new();
    env.create("base.qcow2", "qcow2", "", "4M");
    env.qemu_io("base.qcow2", "qcow2", &["write -P 1 0 65536"]);
    env.overlay("over.qcow2", "base.qcow2", "qcow2", "", "");
    env.create("ext.qcow2", "qcow2", "data_file=ext.data.raw", "4M");
    env.qemu_io("ext.qcow2", "qcow2", &["write -P 2 0 65536"]);

    for (img, named) in [("over.qcow2", "base.qcow2"), ("ext.qcow2", "ext.data.raw")] {
        let runs: [(&[&str], i32); 3] = [
            (&["convert", "--untrusted", "-O", "raw", img, "out.raw"], 1),
            (&["map", "--untrusted", "--output=json", img], 1),
            (&["compare", "--untrusted", img, "base.qcow2"], 2),
        ];
        for (args, code) in runs {
            let o = env.vdisk(args);
            let err = stderr(&o);
            assert_eq!(o.status.code(), Some(code), "{args:?}: {err}");
            assert!(
                err.contains(img) && err.contains(named),
                "{args:?}: the message should name {img} and {named}: {err}"
            );
            assert!(stdout(&o).is_empty(), "{args:?} printed {}", stdout(&o));
            assert!(!env.path("out.raw").exists(), "{args:?} wrote output");
        }
        // info opens nothing but the image, so it may report the names of untrusted input.
        let v = common::json(&env.vdisk_ok(&["info", "--untrusted", "--output=json", img]));
        let q = common::json(&env.qemu_img(&["info", "--output=json", img]));
        for k in ["backing-filename", "format-specific"] {
            assert_eq!(v.get(k), q.get(k), "{img}: info --untrusted {k}");
        }
    }
    // Even when the named file does not exist: info never opens it.
    env.qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "ghost.qcow2",
        "-F",
        "qcow2",
        "haunted.qcow2",
        "1M",
    ]);
    let v = common::json(&env.vdisk_ok(&["info", "--untrusted", "--output=json", "haunted.qcow2"]));
    assert_eq!(v["backing-filename"], "ghost.qcow2");
    let o = env.vdisk(&["convert", "-O", "raw", "haunted.qcow2", "out.raw"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("ghost.qcow2"), "{}", stderr(&o));

    // Trusted, both convert as qemu-img does; untrusted input without references is fine.
    check_convert(&env, "over.qcow2", None, None, "over.raw");
    check_convert(&env, "ext.qcow2", None, None, "ext.raw");
    env.vdisk_ok(&["convert", "--untrusted", "-O", "raw", "base.qcow2", "b.raw"]);
    assert!(common::first_difference(&env.path("b.raw"), &env.path("over.raw")).is_none());
}

#[test]
fn convert_progress() {
    let env = Env::new();
    env.create("p.qcow2", "qcow2", "", "16M");
    env.qemu_io("p.qcow2", "qcow2", &["write -P 1 1000 5000000"]);
    let q = env.qemu_img(&["convert", "-p", "-O", "raw", "p.qcow2", "q.raw"]);
    let v = env.vdisk_ok(&["convert", "-p", "-O", "raw", "p.qcow2", "v.raw"]);
    for out in [stdout(&q), stdout(&v)] {
        assert!(out.ends_with("    (100.00/100%)\r\n"), "{out:?}");
    }
    assert!(common::first_difference(&env.path("q.raw"), &env.path("v.raw")).is_none());
}
