//! Golden comparison with qemu-img: every read-only verb, in text and JSON, on a matrix of
//! images qemu-img and qemu-io make at test time. Both tools run in the same directory on the
//! same relative names; standard output must be the same bytes and the exit code the same.
//! (Standard error is not compared: messages start with the program's name.)

mod common;

use common::*;

/// The image matrix: (file name, how it is made). Each maker runs in the scratch directory.
fn build(env: &Env) -> Vec<String> {
    let mut names = Vec::new();
    let mut add = |n: &str| names.push(n.to_string());
    // A raw source with data, zeros and holes, and odd length.
    env.set_len("src.raw", (100 << 20) + 512);
    env.write_random("src.raw", 0, 300 << 10, 1);
    env.write_random("src.raw", 5 << 20, 1 << 20, 2);
    env.write_fill("src.raw", 9 << 20, 1 << 20, 0);
    env.write_random("src.raw", (100 << 20) - 4096, 4096 + 512, 3);
    add("src.raw");
    let conv = |name: &str, fmt: &str, opts: &str, extra: &[&str]| {
        let mut a = vec!["convert", "-q", "-f", "raw", "-O", fmt];
        if !opts.is_empty() {
            a.extend(["-o", opts]);
        }
        a.extend(extra);
        a.extend(["src.raw", name]);
        env.qemu_img(&a);
    };
    for (name, opts, extra) in [
        ("c512.qcow2", "cluster_size=512", &[][..]),
        ("c2m.qcow2", "cluster_size=2M", &[]),
        ("v2.qcow2", "compat=0.10", &[]),
        ("rc1.qcow2", "refcount_bits=1", &[]),
        ("rc64.qcow2", "refcount_bits=64", &[]),
        ("ext.qcow2", "extended_l2=on", &[]),
        ("lazy.qcow2", "lazy_refcounts=on", &[]),
        ("zlib.qcow2", "", &["-c"]),
        ("zstd.qcow2", "compression_type=zstd", &["-c"]),
        ("meta.qcow2", "preallocation=metadata", &[]),
        ("df.qcow2", "data_file=df.data,data_file_raw=on", &[]),
    ] {
        conv(name, "qcow2", opts, extra);
        add(name);
    }
    // Snapshots, bitmaps, zero clusters.
    env.qemu_img(&["convert", "-q", "-O", "qcow2", "src.raw", "snap.qcow2"]);
    env.qemu_img(&["snapshot", "-c", "first", "snap.qcow2"]);
    env.qemu_io(
        "snap.qcow2",
        "qcow2",
        &["write -P 0x11 1M 64k", "write -z 5M 64k"],
    );
    env.qemu_img(&["snapshot", "-c", "second one", "snap.qcow2"]);
    env.qemu_img(&["bitmap", "--add", "snap.qcow2", "b0"]);
    env.qemu_img(&[
        "bitmap",
        "--add",
        "-g",
        "1M",
        "--disable",
        "snap.qcow2",
        "b-1M",
    ]);
    add("snap.qcow2");
    // A backing chain across directories, with a raw base.
    std::fs::create_dir_all(env.path("sub")).unwrap();
    env.overlay("mid.qcow2", "src.raw", "raw", "", "");
    env.qemu_io(
        "mid.qcow2",
        "qcow2",
        &["write -P 0x22 2M 1M", "write -z 5M 512k"],
    );
    env.overlay(
        "sub/top.qcow2",
        "../mid.qcow2",
        "qcow2",
        "cluster_size=4k",
        "",
    );
    env.qemu_io("sub/top.qcow2", "qcow2", &["write -P 0x33 2560k 8k"]);
    add("mid.qcow2");
    add("sub/top.qcow2");
    // The other formats qemu writes.
    for (name, fmt, opts) in [
        ("sparse.vmdk", "vmdk", ""),
        ("stream.vmdk", "vmdk", "subformat=streamOptimized"),
        ("dyn.vhd", "vpc", ""),
        ("dyn.vhdx", "vhdx", ""),
        ("dyn.vdi", "vdi", ""),
        ("static.vdi", "vdi", "static=on"),
    ] {
        conv(name, fmt, opts, &[]);
        add(name);
    }
    // Edge cases: empty disks, one sector, a dirty image (qemu-io killed mid-session), a
    // version 2 image with a snapshot.
    env.create("zero.qcow2", "qcow2", "", "0");
    env.create("zero.raw", "raw", "", "0");
    env.create("tiny.qcow2", "qcow2", "cluster_size=512", "512");
    env.create("dirty.qcow2", "qcow2", "lazy_refcounts=on", "8M");
    let _ = env
        .cmd("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write 0 1M",
            "-c",
            "sigraise 9",
            "dirty.qcow2",
        ])
        .output();
    env.create("v2snap.qcow2", "qcow2", "compat=0.10", "8M");
    env.qemu_img(&["snapshot", "-c", "a", "v2snap.qcow2"]);
    for n in [
        "zero.qcow2",
        "zero.raw",
        "tiny.qcow2",
        "dirty.qcow2",
        "v2snap.qcow2",
    ] {
        add(n);
    }
    env.sync();
    names
}

#[test]
fn every_read_verb_prints_what_qemu_img_prints() {
    let env = Env::new();
    let names = build(&env);
    let mut runs: Vec<Vec<String>> = Vec::new();
    let mut push = |a: &[&str]| runs.push(a.iter().map(|s| s.to_string()).collect());
    for n in &names {
        let n = n.as_str();
        let chain = n.ends_with("top.qcow2") || n == "mid.qcow2";
        for o in ["--output=human", "--output=json"] {
            push(&["info", o, n]);
            if chain {
                push(&["info", "--backing-chain", o, n]);
            }
            push(&["map", o, n]);
            push(&[
                "map",
                "--start-offset",
                "1M",
                "--max-length",
                "0x500000",
                o,
                n,
            ]);
            push(&["map", "--start-offset", "200M", o, n]);
            push(&["check", o, n]);
            push(&["measure", o, "-O", "raw", n]);
            push(&["measure", o, "-O", "qcow2", n]);
            push(&[
                "measure",
                o,
                "-O",
                "qcow2",
                "-o",
                "cluster_size=2M,refcount_bits=64",
                n,
            ]);
        }
        push(&["compare", n, "src.raw"]);
        push(&["compare", "-s", n, "src.raw"]);
        push(&["compare", n, "snap.qcow2"]);
        push(&["snapshot", "-l", n]);
    }
    for size in ["1000", "64M", "1T", "0x10000"] {
        for t in ["raw", "qcow2"] {
            push(&["measure", "--size", size, "-O", t]);
        }
    }
    // Usage and input errors: the exit code must agree (stderr is not compared).
    push(&["measure"]);
    push(&["measure", "--size", "1G", "src.raw"]);
    push(&["info", "missing.qcow2"]);
    push(&["map", "--start-offset", "-1", "src.raw"]);
    push(&["compare", "src.raw"]);
    push(&["convert", "-O", "raw"]);
    push(&["info", "--bogus", "src.raw"]);

    let mut bad = Vec::new();
    let mut bytes = 0usize;
    for args in &runs {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let q = env.qemu_img_any(&a);
        let v = env.vdisk(&a);
        bytes += q.stdout.len();
        if q.stdout != v.stdout || q.status.code() != v.status.code() {
            bad.push(format!(
                "{}\n  qemu-img ({:?}):\n{}\n  vdisk ({:?}):\n{}{}",
                a.join(" "),
                q.status.code(),
                stdout(&q),
                v.status.code(),
                stdout(&v),
                stderr(&v)
            ));
        }
    }
    // -o help lists what vdisk takes: each line as qemu-img prints it, none qemu-img lacks.
    for fmt in ["qcow2", "raw"] {
        let a = ["create", "-f", fmt, "-o", "help", "x"];
        let (q, v) = (env.qemu_img_any(&a), env.vdisk(&a));
        assert_eq!(v.status.code(), Some(0), "{}", stderr(&v));
        let theirs: Vec<&str> = std::str::from_utf8(&q.stdout).unwrap().lines().collect();
        let ours = stdout(&v);
        assert!(ours.lines().count() >= 3, "{ours}");
        for l in ours.lines() {
            assert!(
                theirs.contains(&l),
                "-o help for {fmt}: qemu-img has no line {l:?}"
            );
        }
        assert!(!env.path("x").exists(), "-o help created a file");
    }
    eprintln!(
        "golden: {} commands on {} images, {bytes} bytes of qemu-img output compared",
        runs.len(),
        names.len()
    );
    assert!(
        bad.is_empty(),
        "{} of {} outputs differ:\n{}",
        bad.len(),
        runs.len(),
        bad.join("\n")
    );
}
