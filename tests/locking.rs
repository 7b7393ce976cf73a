//! QEMU-compatible image locking against real QEMU processes: a `qemu-io` holding an image
//! (it keeps it open while it reads commands from a pipe) keeps vdisk's writers and plain
//! readers off it, `-U` reads beside it, and an image vdisk holds keeps QEMU's writers off.

mod common;

use common::*;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vdisk::{ErrorKind, Image, OpenOptions};

/// A `qemu-io` holding `file` open (read-write, or read-only with `-r`) until dropped.
struct Holder(Child);

impl Holder {
    fn new(env: &Env, file: &str, read_only: bool) -> Holder {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "qcow2"]);
        if read_only {
            c.arg("-r");
        }
        let child = c
            .arg(env.path(file))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-io");
        let mut h = Holder(child);
        // Held once /proc/locks shows QEMU's "no one else may write" and "no one else may
        // resize" bytes (201 and 203) on the file. Watching takes no lock: a probe that did
        // (a qemu-img writer, say) could hold its own while qemu-io opens, and qemu-io would
        // then fail to open and exit.
        let t = Instant::now();
        loop {
            let path = env.path(file);
            if ofd_lock_held(&path, 201) && ofd_lock_held(&path, 203) {
                break;
            }
            if let Some(st) = h.0.try_wait().unwrap() {
                panic!("qemu-io exited ({st}) before it held {file}");
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "qemu-io never took its locks"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        h
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if let Some(mut i) = self.0.stdin.take() {
            let _ = i.write_all(b"quit\n");
        }
        let _ = self.0.wait();
    }
}

fn refused(o: &std::process::Output, what: &str) {
    assert_eq!(o.status.code(), Some(1), "{}", stderr(o));
    assert!(stderr(o).contains(what), "{}", stderr(o));
}

#[test]
fn a_running_writer_keeps_vdisk_off() {
    let env = Env::new();
    env.create("vm.qcow2", "qcow2", "", "64M");
    env.qemu_io("vm.qcow2", "qcow2", &["write -P 0x5a 1M 1M"]);
    let before = std::fs::read(env.path("vm.qcow2")).unwrap();
    let held = Holder::new(&env, "vm.qcow2", false);
    let shared = "Failed to get shared \"write\" lock";
    let write = "Failed to get \"write\" lock";
    // Readers refuse a writer, as qemu-img's do; -U reads beside it.
    for args in [
        vec!["info", "vm.qcow2"],
        vec!["map", "vm.qcow2"],
        vec!["check", "vm.qcow2"],
        vec!["compare", "vm.qcow2", "vm.qcow2"],
        vec!["convert", "-O", "raw", "vm.qcow2", "out.raw"],
        vec!["snapshot", "-l", "vm.qcow2"],
    ] {
        let code = if args[0] == "compare" { 2 } else { 1 };
        let o = env.vdisk(&args);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(shared), "{args:?}: {}", stderr(&o));
        let mut u = args.clone();
        u.insert(1, "-U");
        let o = env.vdisk(&u);
        assert!(o.status.success(), "{u:?}: {}", stderr(&o));
    }
    // Writers are refused and change nothing.
    refused(&env.vdisk(&["resize", "vm.qcow2", "+1M"]), write);
    refused(&env.vdisk(&["snapshot", "-c", "s1", "vm.qcow2"]), write);
    refused(&env.vdisk(&["snapshot", "-d", "s1", "vm.qcow2"]), write);
    refused(&env.vdisk(&["check", "-r", "all", "vm.qcow2"]), shared);
    refused(
        &env.vdisk(&["check", "-U", "-r", "all", "vm.qcow2"]),
        "cannot be combined",
    );
    // The library says which kind.
    let e = Image::open(env.path("vm.qcow2"), &OpenOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Locked, "{e}");
    drop(held);
    assert!(std::fs::read(env.path("vm.qcow2")).unwrap() == before);
    // Once QEMU is gone, the writers work.
    env.vdisk_ok(&["resize", "vm.qcow2", "+1M"]);
    env.vdisk_ok(&["snapshot", "-c", "s1", "vm.qcow2"]);
    env.check_clean("vm.qcow2");
}

#[test]
fn a_read_only_holder_shares_with_readers_only() {
    let env = Env::new();
    env.create("ro.qcow2", "qcow2", "", "64M");
    let held = Holder::new(&env, "ro.qcow2", true);
    env.vdisk_ok(&["info", "ro.qcow2"]);
    env.vdisk_ok(&["convert", "-O", "raw", "ro.qcow2", "out.raw"]);
    refused(
        &env.vdisk(&["resize", "ro.qcow2", "+1M"]),
        "Failed to get \"write\" lock",
    );
    drop(held);
    env.vdisk_ok(&["resize", "ro.qcow2", "+1M"]);
}

#[test]
fn an_image_vdisk_holds_keeps_qemu_writers_off() {
    let env = Env::new();
    env.create("held.qcow2", "qcow2", "", "64M");
    let img = Image::open(env.path("held.qcow2"), &OpenOptions::default()).unwrap();
    // A reader refuses writers: qemu-io cannot open it for writing, qemu-img can read it.
    let o = env
        .cmd("qemu-io")
        .args(["-f", "qcow2", "-c", "write 0 512"])
        .arg(env.path("held.qcow2"))
        .output()
        .unwrap();
    let said = format!("{}{}", stdout(&o), stderr(&o));
    assert!(said.contains("Failed to get \"write\" lock"), "{said}");
    env.qemu_img(&["info", "held.qcow2"]);
    let o = env.qemu_img_any(&["resize", "held.qcow2", "+1M"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("lock"), "{}", stderr(&o));
    // Shared with everyone (-U): QEMU may write beside it.
    drop(img);
    let o_u = OpenOptions {
        lock: vdisk::io::LockMode::ForceShare,
        ..OpenOptions::default()
    };
    let img = Image::open(env.path("held.qcow2"), &o_u).unwrap();
    env.qemu_io("held.qcow2", "qcow2", &["write -P 1 0 512"]);
    drop(img);
}
