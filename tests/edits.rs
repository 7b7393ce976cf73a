//! `rebase`, `commit` and `amend` against qemu-img: the same operation on two copies of the
//! same qemu-made images, one by each tool. vdisk's result must pass `qemu-img check` with no
//! errors or leaks, read the same as qemu-img's (`qemu-img compare`), name the same backing
//! file, and report the same options; refusals must agree on the exit code.

mod common;

use common::*;

/// A chain base.qcow2 <- mid.qcow2 <- top.qcow2 (with `opts` on mid and top), plus other.qcow2
/// (a possible new backing file sharing part of base) and base.raw (base's content as raw).
fn chain(env: &Env, opts: &str) {
    env.create("base.qcow2", "qcow2", "cluster_size=4k", "12M");
    env.qemu_io(
        "base.qcow2",
        "qcow2",
        &["write -P 0x41 0 3M", "write -P 0x42 8M 1M"],
    );
    env.create("other.qcow2", "qcow2", "", "10M");
    env.qemu_io(
        "other.qcow2",
        "qcow2",
        &["write -P 0x41 0 1M", "write -P 0x43 5M 512k"],
    );
    env.qemu_img(&["convert", "-O", "raw", "base.qcow2", "base.raw"]);
    env.overlay("mid.qcow2", "base.qcow2", "qcow2", opts, "");
    env.qemu_io(
        "mid.qcow2",
        "qcow2",
        &[
            "write -P 0x51 512k 1M",
            "write -z 2M 128k",
            "write -P 0x52 9M 4k",
        ],
    );
    env.overlay("top.qcow2", "mid.qcow2", "qcow2", opts, "");
    env.qemu_io(
        "top.qcow2",
        "qcow2",
        &[
            "write -P 0x61 1M 64k",
            "write -z 8M 64k",
            "write -P 0x62 11M 100k",
        ],
    );
}

/// Copy every file of the chain to `prefix`-named copies, with backing names rewritten
/// (qemu-img rebase -u) so each copy is a chain of its own.
fn copy_chain(env: &Env, prefix: &str) {
    for f in ["base.qcow2", "other.qcow2", "base.raw"] {
        std::fs::copy(env.path(f), env.path(&format!("{prefix}{f}"))).unwrap();
    }
    for (f, b) in [("mid.qcow2", "base.qcow2"), ("top.qcow2", "mid.qcow2")] {
        let to = format!("{prefix}{f}");
        std::fs::copy(env.path(f), env.path(&to)).unwrap();
        env.qemu_img(&[
            "rebase",
            "-u",
            "-b",
            &format!("{prefix}{b}"),
            "-F",
            "qcow2",
            &to,
        ]);
    }
}

/// Backing lines and format-specific options of `info`, with the copy's prefix removed.
fn facts(env: &Env, file: &str, prefix: &str) -> Vec<String> {
    let o = env.qemu_img(&["info", "-U", file]);
    stdout(&o)
        .lines()
        .filter(|l| {
            l.starts_with("backing file")
                || l.starts_with("    compat")
                || l.starts_with("    lazy")
                || l.starts_with("    refcount bits")
                || l.starts_with("virtual size")
        })
        .map(|l| l.replace(prefix, ""))
        .collect()
}

/// What `file` holds itself (depth 0 of `map --output=json`), as merged runs of (start,
/// length, data): data clusters or zero clusters. Host offsets, and whether parts of a data
/// cluster are holes in the file, are each writer's own.
fn layout(env: &Env, file: &str) -> Vec<(u64, u64, bool)> {
    let o = env.qemu_img(&["map", "-U", "--output=json", file]);
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for e in json(&o).as_array().unwrap() {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        if e["depth"].as_u64() != Some(0) || e["present"].as_bool() != Some(true) {
            continue;
        }
        let data = e["data"].as_bool().unwrap();
        match out.last_mut() {
            Some(l) if l.0 + l.1 == start && l.2 == data => l.1 += len,
            _ => out.push((start, len, data)),
        }
    }
    out
}

/// `v` holds what `q` holds (see [`layout`]). With extended L2 entries qemu allocates single
/// subclusters while vdisk's writes are whole clusters, so there vdisk must hold at least what
/// qemu-img holds (contents are compared separately).
fn same_layout(env: &Env, q: &str, v: &str, what: &str) {
    let (ql, vl) = (layout(env, q), layout(env, v));
    let info = env.qemu_img(&["info", "-U", q]);
    if stdout(&info).contains("extended l2: true") {
        for &(s, l, _) in &ql {
            // Every byte of the run lies in one of vdisk's runs (data or zero).
            let mut at = s;
            while at < s + l {
                match vl.iter().find(|&&(vs, vlen, _)| vs <= at && at < vs + vlen) {
                    Some(&(vs, vlen, _)) => at = vs + vlen,
                    None => {
                        panic!("{what}: qemu-img holds {at} (of {s}+{l}), vdisk does not: {vl:?}")
                    }
                }
            }
        }
    } else {
        assert_eq!(ql, vl, "{what}");
    }
}

fn clean(env: &Env, file: &str) {
    let v = env.check_clean(file);
    assert!(v.get("leaks").is_none(), "{file}: {v}");
}

/// Run `args` (with `{}` standing for the prefix) with qemu-img on the q- chain and vdisk on
/// the v- chain; then compare `files` of both.
fn same_edit(env: &Env, args: &[&str], files: &[&str]) {
    let with = |p: &str| -> Vec<String> { args.iter().map(|a| a.replace("{}", p)).collect() };
    let qa = with("q-");
    let va = with("v-");
    let q = env.qemu_img_any(&qa.iter().map(String::as_str).collect::<Vec<_>>());
    let v = env.vdisk(&va.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(
        q.status.code(),
        v.status.code(),
        "{args:?}: qemu-img said {}; vdisk said {}",
        stderr(&q),
        stderr(&v)
    );
    assert_eq!(stdout(&q), stdout(&v), "{args:?}");
    for f in files {
        let (qf, vf) = (format!("q-{f}"), format!("v-{f}"));
        if f.ends_with(".qcow2") {
            clean(env, &vf);
            assert_eq!(
                facts(env, &qf, "q-"),
                facts(env, &vf, "v-"),
                "{args:?}: {f}"
            );
            // The same allocation too: what each layer holds, data or zeros (host offsets
            // are each writer's own).
            same_layout(env, &qf, &vf, &format!("{args:?}: {f}"));
        }
        let o = env.qemu_img_any(&["compare", "-U", &qf, &vf]);
        assert!(
            o.status.success(),
            "{args:?}: {f} differs from qemu-img's: {}{}",
            stdout(&o),
            stderr(&o)
        );
    }
}

const LAYOUTS: [&str; 4] = [
    "cluster_size=64k",
    "cluster_size=4k",
    "cluster_size=16k,extended_l2=on",
    "compat=0.10",
];

#[test]
fn rebase_as_qemu_img_rebases() {
    for opts in LAYOUTS {
        let env = Env::new();
        chain(&env, opts);
        let cases: [&[&str]; 5] = [
            &[
                "rebase",
                "-b",
                "{}other.qcow2",
                "-F",
                "qcow2",
                "{}top.qcow2",
            ],
            &["rebase", "-b", "", "{}top.qcow2"],
            &["rebase", "-b", "{}base.qcow2", "-F", "qcow2", "{}top.qcow2"],
            &[
                "rebase",
                "-u",
                "-b",
                "{}base.raw",
                "-F",
                "raw",
                "{}top.qcow2",
            ],
            &["rebase", "-b", "{}base.raw", "-F", "raw", "{}mid.qcow2"],
        ];
        for args in cases {
            for p in ["q-", "v-"] {
                copy_chain(&env, p);
            }
            // The guest's disk before the safe rebases: they must not change it.
            let before = env.path("before.raw");
            env.qemu_img(&[
                "convert",
                "-O",
                "raw",
                "q-top.qcow2",
                before.to_str().unwrap(),
            ]);
            same_edit(&env, args, &["top.qcow2", "mid.qcow2"]);
            if !args.contains(&"-u") {
                let o = env.qemu_img_any(&["compare", "-U", "v-top.qcow2", "before.raw"]);
                assert!(o.status.success(), "{opts} {args:?} changed the disk");
            }
        }
        // Refusals agree on the exit code: no format for the new file, a new file that is
        // missing. vdisk refuses before it writes anything (qemu-img copies the data first
        // when only the format is missing, then fails to change the name).
        copy_chain(&env, "v-");
        for args in [
            &["rebase", "-b", "v-other.qcow2", "v-top.qcow2"][..],
            &["rebase", "-b", "v-gone.qcow2", "-F", "qcow2", "v-top.qcow2"],
        ] {
            let before = std::fs::read(env.path("v-top.qcow2")).unwrap();
            assert_eq!(env.qemu_img_any(args).status.code(), Some(1), "{args:?}");
            std::fs::write(env.path("v-top.qcow2"), &before).unwrap();
            let o = env.vdisk(args);
            assert_eq!(o.status.code(), Some(1), "{args:?}");
            assert!(
                std::fs::read(env.path("v-top.qcow2")).unwrap() == before,
                "{args:?} changed the image"
            );
        }
    }
}

#[test]
fn commit_as_qemu_img_commits() {
    for opts in LAYOUTS {
        let env = Env::new();
        chain(&env, opts);
        let cases: [(&[&str], &[&str]); 4] = [
            (
                &["commit", "{}top.qcow2"],
                &["top.qcow2", "mid.qcow2", "base.qcow2"],
            ),
            (
                &["commit", "-d", "{}top.qcow2"],
                &["top.qcow2", "mid.qcow2"],
            ),
            (
                &["commit", "-b", "{}base.qcow2", "{}top.qcow2"],
                &["top.qcow2", "mid.qcow2", "base.qcow2"],
            ),
            (&["commit", "-q", "{}base.qcow2"], &["base.qcow2"]),
        ];
        for (args, files) in cases {
            for p in ["q-", "v-"] {
                copy_chain(&env, p);
            }
            let before = env.path("before.raw");
            env.qemu_img(&[
                "convert",
                "-O",
                "raw",
                "q-top.qcow2",
                before.to_str().unwrap(),
            ]);
            same_edit(&env, args, files);
            let o = env.qemu_img_any(&["compare", "-U", "v-top.qcow2", "before.raw"]);
            assert!(o.status.success(), "{opts} {args:?} changed the disk");
        }
        // Into a raw base (written in place).
        for p in ["q-", "v-"] {
            copy_chain(&env, p);
            env.qemu_img(&[
                "rebase",
                "-u",
                "-b",
                &format!("{p}base.raw"),
                "-F",
                "raw",
                &format!("{p}mid.qcow2"),
            ]);
        }
        same_edit(
            &env,
            &["commit", "{}mid.qcow2"],
            &["base.raw", "mid.qcow2", "top.qcow2"],
        );
    }
}

#[test]
fn amend_as_qemu_img_amends() {
    for opts in LAYOUTS {
        let env = Env::new();
        chain(&env, opts);
        env.qemu_img(&["snapshot", "-c", "s1", "top.qcow2"]);
        env.qemu_io("top.qcow2", "qcow2", &["write -z 0 64k"]);
        for o in [
            "compat=0.10",
            "compat=1.1",
            "refcount_bits=64",
            "refcount_bits=1",
            "refcount_bits=2,lazy_refcounts=on",
            "lazy_refcounts=off,compat=0.10",
            "cluster_size=4k",
        ] {
            for p in ["q-", "v-"] {
                copy_chain(&env, p);
            }
            same_edit(&env, &["amend", "-o", o, "{}top.qcow2"], &["top.qcow2"]);
        }
    }
}

#[test]
fn edits_keep_off_an_image_qemu_holds() {
    let env = Env::new();
    chain(&env, "");
    // qemu-io holding the base (as a running VM's backing file would be held read-only does
    // not stop a commit into it; a writer does).
    let mut c = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(env.path("base.qcow2"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Held once /proc/locks shows its "no one else may write" byte on this very file.
    let t = std::time::Instant::now();
    while !ofd_lock_held(&env.path("base.qcow2"), 201) {
        if let Some(st) = c.try_wait().unwrap() {
            panic!("qemu-io exited ({st}) before it held base.qcow2");
        }
        assert!(t.elapsed().as_secs() < 20, "qemu-io never took its locks");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let before = std::fs::read(env.path("mid.qcow2")).unwrap();
    let o = env.vdisk(&["commit", "mid.qcow2"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("lock"), "{}", stderr(&o));
    assert!(std::fs::read(env.path("mid.qcow2")).unwrap() == before);
    use std::io::Write;
    let _ = c.stdin.take().unwrap().write_all(b"quit\n");
    let _ = c.wait();
    env.vdisk_ok(&["commit", "mid.qcow2"]);
}

#[test]
fn convert_with_a_backing_file_as_qemu_img() {
    for opts in LAYOUTS {
        let env = Env::new();
        chain(&env, "");
        // A source overlay of base.qcow2, and a source with no backing file at all.
        env.qemu_img(&["convert", "-O", "qcow2", "mid.qcow2", "flat.qcow2"]);
        for src in ["top.qcow2", "flat.qcow2"] {
            for extra in [&[][..], &["-c"]] {
                let mut args = vec!["convert", "-O", "qcow2", "-o", opts];
                args.extend(extra);
                args.extend(["-B", "mid.qcow2", "-F", "qcow2", src]);
                let (q, v) = (format!("q-{src}"), format!("v-{src}"));
                let mut qa = args.clone();
                qa.push(&q);
                let mut va = args.clone();
                va.push(&v);
                env.qemu_img(&qa);
                env.vdisk_ok(&va);
                clean(&env, &v);
                let what = format!("{opts} {extra:?} {src}");
                for other in [q.as_str(), src] {
                    let o = env.qemu_img_any(&["compare", &v, other]);
                    assert!(o.status.success(), "{what}: differs from {other}");
                }
                assert_eq!(facts(&env, &q, "q-"), facts(&env, &v, "v-"), "{what}");
                same_layout(&env, &q, &v, &what);
            }
        }
    }
}

#[test]
fn convert_into_an_existing_image_as_qemu_img() {
    let env = Env::new();
    chain(&env, "");
    for (fmt, opts) in [("raw", ""), ("qcow2", ""), ("qcow2", "compat=0.10")] {
        for target_is_zero in [false, true] {
            for p in ["q-", "v-"] {
                let t = format!("{p}t.img");
                env.create(&t, fmt, opts, "16M");
                if !target_is_zero {
                    env.qemu_io(&t, fmt, &["write -P 0x99 0 16M"]);
                }
            }
            let mut args = vec!["convert", "-n", "-O", fmt];
            if target_is_zero {
                args.push("--target-is-zero");
            }
            args.push("top.qcow2");
            let mut qa = args.clone();
            qa.push("q-t.img");
            let mut va = args.clone();
            va.push("v-t.img");
            env.qemu_img(&qa);
            env.vdisk_ok(&va);
            if fmt == "qcow2" {
                clean(&env, "v-t.img");
            }
            // Same bytes, the tail past the source included.
            let o = env.qemu_img_any(&["compare", "-f", fmt, "-F", fmt, "q-t.img", "v-t.img"]);
            assert!(
                o.status.success(),
                "{fmt} {opts} {target_is_zero}: {}",
                stdout(&o)
            );
        }
    }
    // Refusals: too small a target, a missing one, --target-is-zero without -n; nothing is
    // created or changed.
    env.create("small.img", "raw", "", "1M");
    let small = std::fs::read(env.path("small.img")).unwrap();
    for args in [
        &["convert", "-n", "-O", "raw", "top.qcow2", "small.img"][..],
        &["convert", "-n", "-O", "raw", "top.qcow2", "missing.img"],
        &[
            "convert",
            "--target-is-zero",
            "-O",
            "raw",
            "top.qcow2",
            "new.img",
        ],
    ] {
        assert_eq!(env.qemu_img_any(args).status.code(), Some(1), "{args:?}");
        let o = env.vdisk(args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
    }
    assert!(std::fs::read(env.path("small.img")).unwrap() == small);
    assert!(!env.path("missing.img").exists() && !env.path("new.img").exists());
}

/// `convert -n` onto a real block device (a loop device, where the kernel lets the test make
/// one): written in place, stale bytes past the data overwritten with zeros.
#[test]
fn convert_into_a_block_device() {
    let env = Env::new();
    chain(&env, "");
    std::fs::write(env.path("dev.img"), vec![0x5au8; 16 << 20]).unwrap();
    let o = std::process::Command::new("losetup")
        .args(["-f", "--show"])
        .arg(env.path("dev.img"))
        .output();
    let dev = match o {
        Ok(o) if o.status.success() => stdout(&o).trim().to_string(),
        other => {
            eprintln!("SKIP convert_into_a_block_device: no loop device here ({other:?})");
            return;
        }
    };
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .arg("-d")
                .arg(&self.0)
                .status();
        }
    }
    let _d = Detach(dev.clone());
    env.vdisk_ok(&["convert", "-n", "-O", "raw", "top.qcow2", &dev]);
    env.qemu_img(&["convert", "-O", "raw", "top.qcow2", "want.raw"]);
    let want = std::fs::read(env.path("want.raw")).unwrap();
    let got = std::fs::read(&dev).unwrap();
    assert!(got[..want.len()] == want[..], "device content differs");
    // Past the source's end the device keeps what it held, as with qemu-img.
    assert!(got[want.len()..].iter().all(|&b| b == 0x5a));
}

#[test]
fn dd_as_qemu_img() {
    let env = Env::new();
    chain(&env, "");
    env.set_len("odd.raw", 10000);
    env.write_random("odd.raw", 0, 10000, 5);
    for src in ["top.qcow2", "odd.raw"] {
        for ops in [
            &[][..],
            &["bs=4k", "count=2", "skip=1"],
            &["bs=1M"],
            &["bs=3000", "count=2"],
            &["bs=1000", "skip=4"],
            &["bs=4k", "count=1000000"],
        ] {
            for fmt in ["raw", "qcow2"] {
                let run = |tool: &str, out: &str| {
                    let mut a = vec!["dd".to_string(), "-O".into(), fmt.into()];
                    a.push(format!("if={src}"));
                    a.push(format!("of={out}"));
                    a.extend(ops.iter().map(|s| s.to_string()));
                    let a: Vec<&str> = a.iter().map(String::as_str).collect();
                    if tool == "q" {
                        env.qemu_img(&a)
                    } else {
                        env.vdisk_ok(&a)
                    }
                };
                run("q", "q.out");
                run("v", "v.out");
                let what = format!("{src} {ops:?} -O {fmt}");
                let o =
                    env.qemu_img_any(&["compare", "-s", "-f", fmt, "-F", fmt, "q.out", "v.out"]);
                let o2 = env.qemu_img_any(&["compare", "-f", fmt, "-F", fmt, "q.out", "v.out"]);
                assert!(o2.status.success(), "{what}: {}", stdout(&o2));
                // Same virtual size too (strict compare also looks at allocation, which
                // qemu-img's dd does not keep sparse).
                assert!(!stdout(&o).contains("size mismatch"), "{what}");
                if fmt == "qcow2" {
                    clean(&env, "v.out");
                }
            }
        }
    }
    // Skipping past the input's end: qemu-img says "cannot skip to specified offset" yet
    // exits 0 with an empty output; vdisk exits 1 and leaves no output.
    let o = env.vdisk(&["dd", "if=odd.raw", "of=past.out", "bs=64k", "skip=2"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("cannot skip to specified offset"));
    assert!(!env.path("past.out").exists());
    // Operand errors exit 1 as qemu-img's do.
    for ops in [&["bs=0"][..], &["foo=1"], &["bs=x"]] {
        let mut a = vec!["dd", "if=odd.raw", "of=e.out"];
        a.extend(ops);
        assert_eq!(env.qemu_img_any(&a).status.code(), Some(1), "{a:?}");
        assert_eq!(env.vdisk(&a).status.code(), Some(1), "{a:?}");
    }
}

#[test]
fn bench_reads_and_writes() {
    let env = Env::new();
    chain(&env, "");
    let o = env.vdisk_ok(&["bench", "-c", "2000", "-d", "8", "-s", "64k", "top.qcow2"]);
    let text = stdout(&o);
    let q = env.qemu_img(&["bench", "-c", "2000", "-d", "8", "-s", "64k", "top.qcow2"]);
    // The same first line as qemu-img; a time on the second.
    assert_eq!(text.lines().next(), stdout(&q).lines().next());
    assert!(
        text.lines()
            .nth(1)
            .is_some_and(|l| l.starts_with("Run completed in ") && l.ends_with(" seconds.")),
        "{text}"
    );
    // Writes land where the requests say, with the pattern; qcow2 writes are refused.
    env.set_len("w.raw", 4 << 20);
    env.vdisk_ok(&[
        "bench",
        "-w",
        "-c",
        "3",
        "-s",
        "4k",
        "-o",
        "1M",
        "-S",
        "8k",
        "--pattern",
        "7",
        "w.raw",
    ]);
    let d = std::fs::read(env.path("w.raw")).unwrap();
    for (i, b) in d.iter().enumerate() {
        let rel = i as i64 - (1 << 20);
        let inside = (0..3 * 8192).contains(&rel) && rel % 8192 < 4096;
        assert_eq!(*b, if inside { 7 } else { 0 }, "byte {i}");
    }
    let o = env.vdisk(&["bench", "-w", "-c", "3", "top.qcow2"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
}

/// `convert --salvage` on a qcow2 whose one compressed cluster is damaged: without it both
/// tools fail; with it both write zeros for the unreadable sectors (one warning each) and the
/// outputs are the same bytes. `-r` limits the rate and changes nothing else.
#[test]
fn convert_salvage_and_rate_limit_as_qemu_img() {
    let env = Env::new();
    env.set_len("s.raw", 3 << 20);
    env.write_random("s.raw", 0, 2 << 20, 9);
    env.write_fill("s.raw", (2 << 20) + 4096, 150_000, b'a');
    env.qemu_img(&[
        "convert", "-c", "-f", "raw", "-O", "qcow2", "s.raw", "s.qcow2",
    ]);
    // Damage the first compressed cluster the map lists.
    let map = json(&env.qemu_img(&["map", "--output=json", "s.qcow2"]));
    let start = map
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["compressed"].as_bool() == Some(true))
        .expect("a compressed cluster")["start"]
        .as_u64()
        .unwrap();
    let bytes = std::fs::read(env.path("s.qcow2")).unwrap();
    let be = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
    let l2 = (be(be(40) as usize) & 0x00ff_ffff_ffff_fe00) as usize;
    let entry = be(l2 + 8 * (start >> 16) as usize);
    assert!(entry & (1 << 62) != 0, "not a compressed entry");
    let host = entry & ((1 << 54) - 1);
    env.write_fill("s.qcow2", host, 64, 0xff);
    for tool in ["qemu-img", "vdisk"] {
        let o = if tool == "vdisk" {
            env.vdisk(&["convert", "-O", "raw", "s.qcow2", "bad.raw"])
        } else {
            env.qemu_img_any(&["convert", "-O", "raw", "s.qcow2", "bad.raw"])
        };
        assert_eq!(o.status.code(), Some(1), "{tool} read a damaged cluster");
    }
    let q = env.qemu_img(&["convert", "--salvage", "-O", "raw", "s.qcow2", "q.raw"]);
    let v = env.vdisk_ok(&["convert", "--salvage", "-O", "raw", "s.qcow2", "v.raw"]);
    same_disk(env.path("q.raw"), env.path("v.raw"));
    let warnings = |o: &std::process::Output| {
        stderr(o)
            .matches("warning: error while reading offset")
            .count()
    };
    assert_eq!(warnings(&q), warnings(&v), "{}", stderr(&v));
    assert!(warnings(&v) >= 128, "{}", stderr(&v));
    // A rate limit: the same output.
    env.vdisk_ok(&["convert", "-r", "64M", "-O", "raw", "s.raw", "r.raw"]);
    same_disk(env.path("s.raw"), env.path("r.raw"));
    assert_eq!(
        env.vdisk(&["convert", "-r", "x", "-O", "raw", "s.raw", "r2.raw"])
            .status
            .code(),
        Some(1)
    );
}

/// `convert -C` (in-kernel copies of data stored as is) gives the same disk as a plain
/// convert, whatever the layout: clusters stored out of order, subclusters, zeros, data from a
/// backing file (copied the ordinary way), compressed clusters.
#[test]
fn convert_with_copy_offloading() {
    let env = Env::new();
    chain(&env, "cluster_size=16k,extended_l2=on");
    env.create("frag.qcow2", "qcow2", "cluster_size=4k", "8M");
    let writes: Vec<String> = [7u64, 5, 3, 1, 6, 0, 2, 4]
        .iter()
        .map(|i| format!("write -P {} {}M 1M", i + 1, i))
        .chain(["write -z 2M 64k".to_string()])
        .collect();
    let w: Vec<&str> = writes.iter().map(String::as_str).collect();
    env.qemu_io("frag.qcow2", "qcow2", &w);
    env.qemu_img(&["convert", "-c", "-O", "qcow2", "frag.qcow2", "comp.qcow2"]);
    env.qemu_img(&["convert", "-O", "raw", "top.qcow2", "top.raw"]);
    for src in [
        "frag.qcow2",
        "top.qcow2",
        "mid.qcow2",
        "comp.qcow2",
        "top.raw",
    ] {
        env.vdisk_ok(&["convert", "-C", "-O", "raw", src, "c.raw"]);
        let o = env.qemu_img_any(&["compare", src, "c.raw"]);
        assert!(o.status.success(), "{src}: {}", stdout(&o));
    }
    let o = env.vdisk(&["convert", "-C", "-c", "-O", "qcow2", "top.raw", "x.qcow2"]);
    assert_eq!(o.status.code(), Some(1));
}

/// The bits of every bitmap of `file`, read by vdisk's own reader (for comparing two files).
fn bitmap_bits(env: &Env, file: &str) -> Vec<(String, u64, bool, Vec<u8>)> {
    let io = vdisk::io::FileIo::open(&env.path(file)).unwrap();
    let m = vdisk::qcow2::model::Model::load(std::sync::Arc::new(io)).unwrap();
    let list: Vec<(String, u64, bool)> = m
        .bitmaps()
        .map(|(n, g, on, _)| (n.to_string(), g, on))
        .collect();
    list.into_iter()
        .map(|(n, g, on)| {
            let bits = m.bitmap_bits(&n).unwrap().0;
            (n, g, on, bits)
        })
        .collect()
}

#[test]
fn bitmap_as_qemu_img() {
    let env = Env::new();
    env.create("b.qcow2", "qcow2", "", "64M");
    env.qemu_img(&["bitmap", "--add", "b.qcow2", "b0"]);
    // qemu-io marks enabled bitmaps as it writes.
    env.qemu_io("b.qcow2", "qcow2", &["write 0 1M", "write 10M 64k"]);
    env.qemu_img(&["bitmap", "--add", "-g", "1M", "--disable", "b.qcow2", "b1"]);
    env.qemu_io("b.qcow2", "qcow2", &["write 30M 8k"]);
    env.qemu_img(&["bitmap", "--enable", "b.qcow2", "b1"]);
    env.qemu_io("b.qcow2", "qcow2", &["write 40M 4k"]);
    env.create("other.qcow2", "qcow2", "", "64M");
    env.qemu_img(&["bitmap", "--add", "-g", "128k", "other.qcow2", "o"]);
    env.qemu_io("other.qcow2", "qcow2", &["write 50M 1M"]);
    let cases: [(&[&str], &str); 8] = [
        (&["--add"], "c"),
        (&["--add", "-g", "512", "--merge", "b0"], "d"),
        (&["--add", "-g", "4M", "--disable", "--merge", "b1"], "e"),
        (&["--merge", "o", "-b", "other.qcow2", "-F", "qcow2"], "b1"),
        (&["--clear"], "b0"),
        (&["--disable"], "b1"),
        (&["--remove"], "b0"),
        (&["--clear", "--merge", "b1"], "b0"),
    ];
    for (ops, name) in cases {
        std::fs::copy(env.path("b.qcow2"), env.path("q.qcow2")).unwrap();
        std::fs::copy(env.path("b.qcow2"), env.path("v.qcow2")).unwrap();
        let run = |file: &str| -> Vec<String> {
            let mut a = vec!["bitmap".to_string()];
            a.extend(ops.iter().map(|s| s.to_string()));
            a.push(file.into());
            a.push(name.into());
            a
        };
        let qa = run("q.qcow2");
        let va = run("v.qcow2");
        let q = env.qemu_img_any(&qa.iter().map(String::as_str).collect::<Vec<_>>());
        let v = env.vdisk(&va.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(
            q.status.code(),
            v.status.code(),
            "{ops:?} {name}: {}",
            stderr(&v)
        );
        if !q.status.success() {
            continue;
        }
        clean(&env, "v.qcow2");
        let info = |f: &str| {
            let o = env.qemu_img(&["info", f]);
            let t = stdout(&o);
            t[t.find("Format specific").unwrap()..t.find("Child node").unwrap()].to_string()
        };
        assert_eq!(info("q.qcow2"), info("v.qcow2"), "{ops:?} {name}");
        assert!(
            bitmap_bits(&env, "q.qcow2") == bitmap_bits(&env, "v.qcow2"),
            "{ops:?} {name}: the bits differ from qemu-img's"
        );
        env.qemu_img(&["compare", "q.qcow2", "v.qcow2"]);
    }
    // Refusals agree: a missing bitmap, one that exists, a bad granularity.
    for (ops, name) in [
        (&["--remove"][..], "nope"),
        (&["--add"], "b0"),
        (&["--add", "-g", "100"], "x"),
    ] {
        let mut a = vec!["bitmap"];
        a.extend(ops);
        a.extend(["b.qcow2", name]);
        assert_eq!(env.qemu_img_any(&a).status.code(), Some(1), "{a:?}");
        let before = std::fs::read(env.path("b.qcow2")).unwrap();
        assert_eq!(env.vdisk(&a).status.code(), Some(1), "{a:?}");
        assert!(
            std::fs::read(env.path("b.qcow2")).unwrap() == before,
            "{a:?} changed the image"
        );
    }
    // Edits that write guest data refuse an image with an enabled bitmap (it would miss the
    // change); with the bitmaps disabled they run and keep them.
    env.create("base.qcow2", "qcow2", "", "64M");
    env.qemu_io("base.qcow2", "qcow2", &["write -P 7 0 2M"]);
    env.overlay("top.qcow2", "base.qcow2", "qcow2", "", "");
    env.qemu_io("top.qcow2", "qcow2", &["write -P 8 1M 64k"]);
    env.qemu_img(&["bitmap", "--add", "top.qcow2", "t"]);
    let o = env.vdisk(&["rebase", "-b", "", "top.qcow2"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("enabled persistent bitmap"),
        "{}",
        stderr(&o)
    );
    env.vdisk_ok(&["bitmap", "--disable", "top.qcow2", "t"]);
    env.qemu_img(&["convert", "-O", "raw", "top.qcow2", "want.raw"]);
    env.vdisk_ok(&["rebase", "-b", "", "top.qcow2"]);
    clean(&env, "top.qcow2");
    let o = env.qemu_img(&["compare", "top.qcow2", "want.raw"]);
    assert!(o.status.success());
    assert_eq!(bitmap_bits(&env, "top.qcow2").len(), 1);
}
