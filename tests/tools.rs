//! The CDI tools beside the importer, end to end: `cdi-image-size-detection` on images made by
//! qemu-img (sizes compared with `qemu-img info`), and `cdi-source-update-poller` against the
//! registries of `scripts/services.sh` (digests compared with `skopeo inspect`) and a fake
//! Kubernetes API server on loopback that records the PATCH it gets.
//!
//! The poller test needs the services started by `scripts/test.sh`, named by
//! `VDISK_SERVICES` (started here when unset, see `common::services`).

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::mpsc;

/// A pod's file system under `VDISK_ROOT`.
struct Root {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Root {
    fn new() -> Root {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        std::fs::create_dir_all(root.join("data")).unwrap();
        std::fs::create_dir_all(root.join("dev")).unwrap();
        Root { _dir: dir, root }
    }
    fn path(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }
    fn term(&self) -> Option<String> {
        std::fs::read_to_string(self.path("/dev/termination-log")).ok()
    }
    fn cmd(&self, bin: &str) -> Command {
        let mut c = Command::new(bin);
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("VDISK_ROOT", &self.root);
        c
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn qemu_img(args: &[&str]) -> Output {
    let o = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    assert!(o.status.success(), "qemu-img {args:?}: {}", stderr(&o));
    o
}

fn qemu_virtual_size(p: &Path) -> u64 {
    let o = qemu_img(&["info", "--output=json", p.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

// ---------------------------------------------------------------------------------------------
// cdi-image-size-detection
// ---------------------------------------------------------------------------------------------

fn size_detection(r: &Root, args: &[&str]) -> (i32, String) {
    let o = r
        .cmd(env!("CARGO_BIN_EXE_cdi-image-size-detection"))
        .args(args)
        .output()
        .unwrap();
    let log = stderr(&o);
    for l in log.lines() {
        assert!(common::is_klog_line(l), "not a klog line: {l:?}");
    }
    (o.status.code().unwrap_or(-1), log)
}

#[test]
fn size_detection_writes_qemu_img_virtual_size() {
    for (fmt, size) in [("qcow2", "1000000001"), ("raw", "12345"), ("qcow2", "3G")] {
        let r = Root::new();
        let disk = r.path("/data/disk.img");
        qemu_img(&["create", "-q", "-f", fmt, disk.to_str().unwrap(), size]);
        let want = qemu_virtual_size(&disk);
        let (code, log) = size_detection(
            &r,
            &["-image-path", "/data/disk.img", "-v=1", "-alsologtostderr"],
        );
        assert_eq!(code, 0, "{fmt} {size}: {log}");
        assert_eq!(r.term(), Some(want.to_string()), "{fmt} {size}: {log}");
        assert!(log.contains("Size-detection binary has completed"), "{log}");
    }
    // A raw file of an odd length, named with its scheme, `--flag=value` syntax.
    let r = Root::new();
    std::fs::write(r.path("/data/disk.img"), vec![7u8; 12_345]).unwrap();
    let want = qemu_virtual_size(&r.path("/data/disk.img")).to_string();
    let (code, log) = size_detection(&r, &["--image-path=/data/disk.img", "-scheme", "file://"]);
    assert_eq!((code, r.term()), (0, Some(want)), "{log}");
}

#[test]
fn size_detection_exit_codes() {
    // 2: a qcow2 whose header is corrupt (cluster_bits 255).
    let r = Root::new();
    let disk = r.path("/data/disk.img");
    qemu_img(&["create", "-q", "-f", "qcow2", disk.to_str().unwrap(), "64M"]);
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0, 0, 0, 0xff], 20).unwrap();
    let (code, log) = size_detection(&r, &["-image-path", "/data/disk.img"]);
    assert_eq!(code, 2, "{log}");
    assert_eq!(r.term(), None);
    assert!(
        log.lines()
            .any(|l| l.starts_with('E') && l.contains("Unable to extract information")),
        "{log}"
    );
    // 2: a hostile qcow2 naming a backing file on the host: refused, never opened.
    let r = Root::new();
    let disk = r.path("/data/disk.img");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "/etc/passwd",
        "-F",
        "raw",
        disk.to_str().unwrap(),
        "64M",
    ]);
    let (code, log) = size_detection(&r, &["-image-path", "/data/disk.img"]);
    assert_eq!((code, r.term()), (2, None), "{log}");
    assert!(log.contains("names a backing file (/etc/passwd)"), "{log}");
    // 3: nothing at the path.
    let r = Root::new();
    let (code, log) = size_detection(&r, &["-image-path", "/data/disk.img"]);
    assert_eq!((code, r.term()), (3, None), "{log}");
    let (code, log) = size_detection(&r, &["-image-path", "/data/no/such/dir/disk.img"]);
    assert_eq!(code, 3, "{log}");
    // 1: no arguments, an unknown flag, a scheme other than file://.
    for args in [
        &[][..],
        &["-image-path"][..],
        &["-image-path", "/data/disk.img", "-bogus"][..],
        &["-image-path", "/data/disk.img", "-scheme", "http://"][..],
    ] {
        let (code, log) = size_detection(&r, args);
        assert_eq!(code, 1, "{args:?}: {log}");
        assert!(log.starts_with('E'), "{log}");
    }
    // 4: the termination log cannot be written (a directory stands in its place).
    let r = Root::new();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "raw",
        r.path("/data/disk.img").to_str().unwrap(),
        "1M",
    ]);
    std::fs::create_dir(r.path("/dev/termination-log")).unwrap();
    let (code, log) = size_detection(&r, &["-image-path", "/data/disk.img"]);
    assert_eq!(code, 4, "{log}");
}

// ---------------------------------------------------------------------------------------------
// cdi-source-update-poller
// ---------------------------------------------------------------------------------------------

/// One request as the fake API server saw it.
#[derive(Debug)]
struct Seen {
    method: String,
    path: String,
    headers: HashMap<String, String>,
    body: String,
}

/// A fake Kubernetes API server on loopback: answers one request with `status` and `reply`,
/// and reports what it got.
fn fake_api(status: u16, reply: &'static str) -> (String, mpsc::Receiver<Seen>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            r.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        r.read_exact(&mut body).unwrap();
        let mut s = s;
        write!(
            s,
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
            reply.len()
        )
        .unwrap();
        tx.send(Seen {
            method,
            path,
            headers,
            body: String::from_utf8(body).unwrap(),
        })
        .unwrap();
    });
    (url, rx)
}

fn poller(r: &Root, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut c = r.cmd(env!("CARGO_BIN_EXE_cdi-source-update-poller"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().unwrap();
    let log = stderr(&o);
    for l in log.lines() {
        assert!(common::is_klog_line(l), "not a klog line: {l:?}");
    }
    (o.status.code().unwrap_or(-1), log)
}

fn skopeo_digest(image: &str) -> String {
    let o = Command::new("skopeo")
        .args([
            "inspect",
            "--tls-verify=false",
            &format!("docker://{image}"),
        ])
        .output()
        .expect("skopeo");
    assert!(o.status.success(), "skopeo inspect {image}: {}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["Digest"].as_str().unwrap().to_string()
}

fn assert_patch(seen: &Seen, cron: &str, token: &str, digest: &str) {
    assert_eq!(seen.method, "PATCH");
    assert_eq!(
        seen.path,
        format!("/apis/cdi.kubevirt.io/v1beta1/namespaces/golden/dataimportcrons/{cron}")
    );
    assert_eq!(
        seen.headers.get("content-type").map(String::as_str),
        Some("application/merge-patch+json")
    );
    assert_eq!(
        seen.headers.get("authorization"),
        Some(&format!("Bearer {token}"))
    );
    let v: serde_json::Value = serde_json::from_str(&seen.body).unwrap();
    let ann = v["metadata"]["annotations"].as_object().unwrap();
    assert_eq!(
        ann["cdi.kubevirt.io/storage.import.sourceDesiredDigest"], digest,
        "{}",
        seen.body
    );
    let t = ann["cdi.kubevirt.io/storage.import.lastCronTime"]
        .as_str()
        .unwrap();
    assert!(
        t.len() == 20 && t.ends_with('Z') && &t[10..11] == "T",
        "{t}"
    );
    assert_eq!(ann.len(), 2, "{}", seen.body);
    assert_eq!(v.as_object().unwrap().len(), 1, "{}", seen.body);
}

#[test]
fn poller_records_the_registry_digest_on_the_cron() {
    let registry = &common::services::var("REGISTRY");
    let r = Root::new();
    let sa = r.path("/var/run/secrets/kubernetes.io/serviceaccount");
    std::fs::create_dir_all(&sa).unwrap();
    std::fs::write(sa.join("token"), "sa-token\n").unwrap();

    // A multi-platform image: the index's digest, as skopeo reports it; in-cluster token,
    // -server naming the API server, INSECURE_TLS for the plain-HTTP registry.
    let image = format!("{registry}/disks/multi:latest");
    let want = skopeo_digest(&image);
    assert!(want.starts_with("sha256:"), "{want}");
    let (api, seen) = fake_api(200, "{}");
    let url = format!("docker://{image}");
    let (code, log) = poller(
        &r,
        &[
            "-v=1", "-server", &api, "-ns", "golden", "-cron", "fedora", "-url", &url,
        ],
        &[("INSECURE_TLS", "true")],
    );
    assert_eq!(code, 0, "{log}");
    assert!(log.contains(&format!("] Digest is {want}")), "{log}");
    assert_patch(&seen.recv().unwrap(), "fedora", "sa-token", &want);

    // A single-platform image through a kubeconfig (its token, its server) and -insecure.
    let image = format!("{registry}/disks/raw:latest");
    let want = skopeo_digest(&image);
    let (api, seen) = fake_api(200, "{}");
    let kc = r.path("/kubeconfig");
    std::fs::write(
        &kc,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n    server: {api}\n  name: c\n\
             contexts:\n- context:\n    cluster: c\n    user: u\n  name: x\ncurrent-context: x\n\
             users:\n- name: u\n  user:\n    token: kc-token\n"
        ),
    )
    .unwrap();
    let url = format!("docker://{image}");
    let (code, log) = poller(
        &r,
        &[
            "-kubeconfig",
            "/kubeconfig",
            "-insecure",
            "-ns=golden",
            "-cron=raw",
            "-url",
            &url,
        ],
        &[],
    );
    assert_eq!(code, 0, "{log}");
    assert_patch(&seen.recv().unwrap(), "raw", "kc-token", &want);

    // The API server refuses: exit 1 with an E line carrying its message.
    let (api, seen) = fake_api(
        404,
        r#"{"kind":"Status","message":"dataimportcrons.cdi.kubevirt.io \"gone\" not found"}"#,
    );
    let (code, log) = poller(
        &r,
        &[
            "-server", &api, "-ns", "golden", "-cron", "gone", "-url", &url,
        ],
        &[("INSECURE_TLS", "true")],
    );
    assert_eq!(code, 1, "{log}");
    assert!(
        log.lines().any(|l| l.starts_with('E')
            && l.contains("Failed patching DataImportCron golden/gone: HTTP 404")
            && l.contains("not found")),
        "{log}"
    );
    seen.recv().unwrap();

    // A tag that does not exist: exit 1 before any API call.
    let (code, log) = poller(
        &r,
        &[
            "-server",
            "http://127.0.0.1:1",
            "-ns",
            "golden",
            "-cron",
            "x",
            "-url",
            &format!("docker://{registry}/disks/raw:no-such-tag"),
        ],
        &[("INSECURE_TLS", "true")],
    );
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("Failed to get image digest"), "{log}");

    // Mandatory flags missing.
    let (code, log) = poller(&r, &["-ns", "golden", "-cron", "x"], &[]);
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("mandatory"), "{log}");
}
