//! `vdisk containerdisk` end to end, every output read by real tools: skopeo (inspect, copy
//! to `dir:` and into a registry), podman (pull, create, export), Python's tarfile and GNU
//! tar on the layer, Debian's docker-registry (plain, TLS + htpasswd, behind the token-auth
//! front) as the push target, and our importer pulling the result as CDI would, compared
//! with `qemu-img compare` against the source disk.
//!
//! The registries come from `scripts/services.sh` (`VDISK_SERVICES`, or a set of our own).
//! Every tool is required: a missing one fails the test, never skips it.

mod common;

use common::services::var;
use common::{free_port, require_tool, run, run_ok, same_disk, stderr, stdout};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn tools() {
    for (t, v) in [
        ("qemu-img", "--version"),
        ("qemu-io", "--version"),
        ("skopeo", "--version"),
        ("podman", "--version"),
        ("python3", "--version"),
        ("zstd", "--version"),
        ("tar", "--version"),
        ("/usr/bin/time", "--version"),
    ] {
        require_tool(t, v);
    }
}

/// A scratch directory with the two source disks every test uses: a 64 MiB qcow2 and a
/// 32 MiB raw with patterned data at a few offsets (a wrong byte shows in `qemu-img compare`).
struct Work {
    dir: tempfile::TempDir,
}

impl Work {
    fn new() -> Work {
        tools();
        let w = Work {
            dir: tempfile::Builder::new()
                .prefix("vdisk-cd-")
                .tempdir()
                .unwrap(),
        };
        let q = w.path("disk.qcow2");
        run_ok(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&q)
                .arg("64M"),
        );
        run_ok(
            Command::new("qemu-io")
                .args([
                    "-f",
                    "qcow2",
                    "-c",
                    "write -q -P 0xa5 0 1M",
                    "-c",
                    "write -q -P 0x5a 5M 2M",
                    "-c",
                    "write -q -P 0xee 63M 1M",
                ])
                .arg(&q),
        );
        let r = w.path("disk.raw");
        run_ok(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "raw"])
                .arg(&r)
                .arg("32M"),
        );
        run_ok(
            Command::new("qemu-io")
                .args([
                    "-f",
                    "raw",
                    "-c",
                    "write -q -P 0x3c 0 1M",
                    "-c",
                    "write -q -P 0xc3 17M 3M",
                ])
                .arg(&r),
        );
        w
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn s(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }
}

fn vdisk(args: &[&str]) -> Output {
    run(Command::new(env!("CARGO_BIN_EXE_vdisk")).args(args))
}

/// `vdisk containerdisk ARGS`, which must succeed; returns the manifest digest it printed.
fn build(args: &[&str]) -> String {
    let mut a = vec!["containerdisk"];
    a.extend_from_slice(args);
    let o = vdisk(&a);
    assert!(
        o.status.success(),
        "vdisk {a:?} failed:\n{}{}",
        stdout(&o),
        stderr(&o)
    );
    let d = stdout(&o).lines().next().unwrap_or("").to_string();
    assert!(d.starts_with("sha256:") && d.len() == 71, "{}", stdout(&o));
    d
}

/// `vdisk containerdisk ARGS`, which must fail with exit 1 and `text` in its message.
fn build_fails(args: &[&str], text: &str) -> String {
    let mut a = vec!["containerdisk"];
    a.extend_from_slice(args);
    let o = vdisk(&a);
    assert_eq!(o.status.code(), Some(1), "vdisk {a:?}: {}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains(text), "vdisk {a:?}: {e:?} lacks {text:?}");
    e
}

fn skopeo(args: &[&str]) -> Output {
    run_ok(Command::new("skopeo").arg("--insecure-policy").args(args))
}

fn skopeo_json(args: &[&str]) -> Value {
    serde_json::from_slice(&skopeo(args).stdout).unwrap()
}

fn podman(args: &[&str]) -> Output {
    run_ok(
        Command::new("podman")
            .env(
                "CONTAINERS_CONF",
                Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/containers.conf"),
            )
            .args(args),
    )
}

/// Python's tarfile over a layer (`zstd -dc` first for zstd) or a plain tar: the entries as
/// JSON, and the first regular file under `disk/` extracted to `out`.
const LIST_TAR: &str = r#"
import json, subprocess, sys, tarfile
path, kind, out = sys.argv[1], sys.argv[2], sys.argv[3]
if kind == "zstd":
    p = subprocess.Popen(["zstd", "-dc", path], stdout=subprocess.PIPE)
    f, mode = p.stdout, "r|"
else:
    f, mode = open(path, "rb"), ("r|gz" if kind == "gzip" else "r|")
entries, done = [], False
with tarfile.open(fileobj=f, mode=mode) as t:
    for e in t:
        if not e.name.startswith("disk"):
            continue
        entries.append(dict(name=e.name, type=e.type.decode(), mode=e.mode, uid=e.uid,
                            gid=e.gid, size=e.size, mtime=e.mtime, uname=e.uname))
        if e.isfile() and not done:
            src, done = t.extractfile(e), True
            with open(out, "wb") as o:
                while b := src.read(1 << 20):
                    o.write(b)
print(json.dumps(entries))
"#;

fn list_tar(path: &Path, kind: &str, out: &Path) -> Vec<Value> {
    let o = run_ok(
        Command::new("python3")
            .args(["-c", LIST_TAR])
            .arg(path)
            .arg(kind)
            .arg(out),
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The single layer blob of a `dir:` copy made by skopeo, and its compression.
fn layer_blob(dir: &Path) -> (PathBuf, String) {
    let m: Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let layers = m["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{m}");
    let mt = layers[0]["mediaType"].as_str().unwrap();
    let hex = layers[0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:");
    (dir.join(hex), mt.rsplit('+').next().unwrap().to_string())
}

/// The layer of a `dir:` copy as Python's tarfile reads it: `disk/` 0555 and `disk/<name>`
/// 0440, both 107:107; the disk extracted to `out`. Returns the entries.
fn check_layer(dir: &Path, name: &str, out: &Path) -> Vec<Value> {
    let (blob, kind) = layer_blob(dir);
    let entries = list_tar(&blob, &kind, out);
    assert_eq!(entries.len(), 2, "{entries:?}");
    let (d, f) = (&entries[0], &entries[1]);
    assert_eq!(d["name"], "disk");
    assert_eq!(d["type"], "5");
    assert_eq!(d["mode"], 0o555);
    assert_eq!(f["name"], format!("disk/{name}"));
    assert_eq!(f["type"], "0");
    assert_eq!(f["mode"], 0o440);
    for e in [d, f] {
        assert_eq!(e["uid"], 107, "{e}");
        assert_eq!(e["gid"], 107, "{e}");
    }
    entries
}

fn same_bytes(a: &Path, b: &Path) {
    run_ok(Command::new("cmp").arg(a).arg(b));
}

/// Run our importer as CDI's pod would, from `endpoint` (`docker://…` or `oci-archive:…`),
/// and return the imported disk (inside `dir`).
fn import(dir: &Path, endpoint: &str, env: &[(&str, &str)]) -> PathBuf {
    let root = dir.join(format!("pod-{}", free_port()));
    std::fs::create_dir_all(root.join("data")).unwrap();
    std::fs::create_dir_all(root.join("dev")).unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_vdisk-importer"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("VDISK_ROOT", &root)
        .env("VDISK_METRICS_PORT", free_port().to_string())
        .env("IMPORTER_SOURCE", "registry")
        .env("IMPORTER_ENDPOINT", endpoint)
        .env("IMPORTER_CONTENTTYPE", "kubevirt")
        .env("OWNER_UID", "uid-1")
        .env("FILESYSTEM_OVERHEAD", "0")
        .env("PREALLOCATION", "false");
    for (k, v) in env {
        c.env(k, v);
    }
    let o = run(&mut c);
    let term = std::fs::read_to_string(root.join("dev/termination-log")).unwrap_or_default();
    assert!(
        o.status.success() && term.contains("Import Complete"),
        "importer from {endpoint}: {term}\n{}",
        stderr(&o)
    );
    root.join("data/disk.img")
}

#[test]
fn archives_and_layouts_read_by_skopeo_tarfile_and_the_importer() {
    let w = Work::new();
    let reg = var("REGISTRY");
    // qcow2, gzip, labels and env, an oci-archive.
    let archive = w.s("qcow2.tar");
    let digest = build(&[
        "--label",
        "org.example.os=fedora",
        "--label",
        "shasum=abc",
        "--env",
        "PREFERENCE_KUBEVIRT_IO_DEFAULT=fedora",
        "--env",
        "INSTANCETYPE_KUBEVIRT_IO_DEFAULT_INSTANCETYPE=u1.small",
        &w.s("disk.qcow2"),
        &format!("oci-archive:{archive}"),
    ]);
    let i = skopeo_json(&["inspect", &format!("oci-archive:{archive}")]);
    assert_eq!(i["Digest"], digest.as_str());
    assert_eq!(i["Architecture"], vdisk::net::registry::host_architecture());
    assert_eq!(i["Os"], "linux");
    assert_eq!(i["Layers"].as_array().unwrap().len(), 1);
    assert_eq!(i["Labels"]["org.example.os"], "fedora");
    assert_eq!(i["Labels"]["shasum"], "abc");
    let raw = skopeo_json(&["inspect", "--raw", &format!("oci-archive:{archive}")]);
    assert_eq!(
        raw["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(raw["schemaVersion"], 2);
    assert_eq!(
        raw["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    assert_eq!(
        raw["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let cfg = skopeo_json(&["inspect", "--config", &format!("oci-archive:{archive}")]);
    assert_eq!(
        cfg["config"]["Env"],
        serde_json::json!([
            "INSTANCETYPE_KUBEVIRT_IO_DEFAULT_INSTANCETYPE=u1.small",
            "PREFERENCE_KUBEVIRT_IO_DEFAULT=fedora"
        ])
    );
    assert_eq!(cfg["rootfs"]["diff_ids"].as_array().unwrap().len(), 1);
    // The layer as Python's tarfile reads it: the disk's bytes are the source file's.
    let d = w.path("qcow2-dir");
    skopeo(&[
        "copy",
        "-q",
        &format!("oci-archive:{archive}"),
        &format!("dir:{}", d.display()),
    ]);
    let got = w.path("qcow2-from-layer");
    check_layer(&d, "disk.img", &got);
    same_bytes(&got, &w.path("disk.qcow2"));
    // Our importer straight from the archive, and from a registry skopeo copied it into.
    same_disk(
        import(w.dir.path(), &format!("oci-archive:{archive}"), &[]),
        w.path("disk.qcow2"),
    );
    let image = format!("{reg}/cd/copied:qcow2");
    skopeo(&[
        "copy",
        "-q",
        "--dest-tls-verify=false",
        &format!("oci-archive:{archive}"),
        &format!("docker://{image}"),
    ]);
    let pulled = import(
        w.dir.path(),
        &format!("docker://{image}"),
        &[("INSECURE_TLS", "true")],
    );
    same_disk(&pulled, w.path("disk.qcow2"));

    // raw, zstd, another disk name and architecture, an oci: layout with two tags.
    let layout = w.path("layout");
    let d1 = build(&[
        "--compression",
        "zstd",
        "--disk-name",
        "rhel.raw",
        "--arch",
        "arm64",
        &w.s("disk.raw"),
        &format!("oci:{}:raw", layout.display()),
    ]);
    let d2 = build(&[
        &w.s("disk.qcow2"),
        &format!("oci:{}:qcow2", layout.display()),
    ]);
    // Rebuilding a tag replaces its entry.
    assert_eq!(
        build(&[
            &w.s("disk.qcow2"),
            &format!("oci:{}:qcow2", layout.display())
        ]),
        d2
    );
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 2, "{index}");
    let i = skopeo_json(&["inspect", &format!("oci:{}:raw", layout.display())]);
    assert_eq!(i["Digest"], d1.as_str());
    assert_eq!(i["Architecture"], "arm64");
    let raw = skopeo_json(&["inspect", "--raw", &format!("oci:{}:raw", layout.display())]);
    assert_eq!(
        raw["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
    let d = w.path("raw-dir");
    skopeo(&[
        "copy",
        "-q",
        &format!("oci:{}:raw", layout.display()),
        &format!("dir:{}", d.display()),
    ]);
    let got = w.path("raw-from-layer");
    check_layer(&d, "rhel.raw", &got);
    same_bytes(&got, &w.path("disk.raw"));
    let image = format!("{reg}/cd/copied:raw");
    skopeo(&[
        "copy",
        "-q",
        "--dest-tls-verify=false",
        &format!("oci:{}:raw", layout.display()),
        &format!("docker://{image}"),
    ]);
    let pulled = import(
        w.dir.path(),
        &format!("docker://{image}"),
        &[
            ("INSECURE_TLS", "true"),
            ("IMPORTER_REGISTRY_IMAGE_ARCHITECTURE", "arm64"),
        ],
    );
    same_disk(&pulled, w.path("disk.raw"));
}

#[test]
fn pushes_to_plain_tls_and_token_registries() {
    let w = Work::new();
    let qcow2 = w.s("disk.qcow2");
    // Plain registry over http (--insecure), then podman pulls it and its container's file
    // system holds the disk as KubeVirt needs it.
    // A repository of this run's own: the registries outlive test runs, and a reproducible
    // build of the same disk would find its blobs there.
    let run_id = std::process::id();
    let image = format!("{}/cd/pushed-{run_id}:v1", var("REGISTRY"));
    let o = vdisk(&[
        "containerdisk",
        "--insecure",
        &qcow2,
        &format!("docker://{image}"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let digest = stdout(&o).lines().next().unwrap().to_string();
    assert!(
        stdout(&o).contains("blobs uploaded: 2 of 2"),
        "{}",
        stdout(&o)
    );
    let i = skopeo_json(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{image}"),
    ]);
    assert_eq!(i["Digest"], digest.as_str());
    let raw = skopeo_json(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{image}"),
    ]);
    assert_eq!(
        raw["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    // The same push again sends no blob (HEAD finds them), same digest.
    let o = vdisk(&[
        "containerdisk",
        "--insecure",
        &qcow2,
        &format!("docker://{image}"),
    ]);
    assert!(stdout(&o).starts_with(&digest) && stdout(&o).contains("blobs uploaded: 0 of 2"));
    // By digest: accepted when it is the image's, refused otherwise.
    let repo = format!("{}/cd/pushed-{run_id}", var("REGISTRY"));
    build(&["--insecure", &qcow2, &format!("docker://{repo}@{digest}")]);
    let other = format!("sha256:{}", "0".repeat(64));
    build_fails(
        &["--insecure", &qcow2, &format!("docker://{repo}@{other}")],
        "the image built is",
    );

    podman(&["pull", "-q", "--tls-verify=false", &image]);
    let cid = stdout(&podman(&["create", &image, "/no-command"]))
        .trim()
        .to_string();
    let export = w.path("export.tar");
    podman(&["export", "-o", &export.display().to_string(), &cid]);
    podman(&["rm", &cid]);
    podman(&["rmi", &image]);
    let got = w.path("from-podman");
    let entries = list_tar(&export, "tar", &got);
    let f = entries
        .iter()
        .find(|e| e["name"] == "disk/disk.img")
        .unwrap_or_else(|| panic!("{entries:?}"));
    // podman's export (Go's archive/tar) keeps the file type bits in the mode.
    assert_eq!(f["uid"], 107, "{f}");
    assert_eq!(f["gid"], 107, "{f}");
    assert_eq!(f["mode"].as_u64().unwrap() & 0o7777, 0o440, "{f}");
    same_bytes(&got, &w.path("disk.qcow2"));

    // TLS + htpasswd: the test CA and credentials; skopeo sees the same image.
    let auth = format!("{}/cd/auth:v1", var("REGISTRY_AUTH"));
    let ca = var("CA_CERT");
    let d = build(&[
        "--ca",
        &ca,
        "--creds",
        "user:pass",
        &qcow2,
        &format!("docker://{auth}"),
    ]);
    assert_eq!(d, digest);
    let i = skopeo_json(&[
        "inspect",
        "--cert-dir",
        &var("CERT_DIR"),
        "--creds",
        "user:pass",
        &format!("docker://{auth}"),
    ]);
    assert_eq!(i["Digest"], digest.as_str());
    // A wrong password, or none: refused (Denied), nothing pushed.
    let e = build_fails(
        &[
            "--ca",
            &ca,
            "--creds",
            "user:wrong",
            &qcow2,
            &format!("docker://{}/cd/denied:v1", var("REGISTRY_AUTH")),
        ],
        "denied",
    );
    assert!(e.contains("401"), "{e}");
    build_fails(
        &[
            "--ca",
            &ca,
            &qcow2,
            &format!("docker://{}/cd/denied:v1", var("REGISTRY_AUTH")),
        ],
        "requires credentials",
    );
    // The library reports it as Denied (the C API's VDISK_STATUS_DENIED).
    let mut o = vdisk::containerdisk::BuildOptions::default();
    o.registry.ca_pem = vec![std::fs::read(&ca).unwrap()];
    o.registry.credentials = Some(("user".into(), "wrong".into()));
    let dest = vdisk::containerdisk::Destination::parse(&format!(
        "docker://{}/cd/denied:v1",
        var("REGISTRY_AUTH")
    ))
    .unwrap();
    let e = vdisk::containerdisk::build(&w.path("disk.qcow2"), &dest, &o).unwrap_err();
    assert_eq!(e.kind(), vdisk::ErrorKind::Denied, "{e}");
    // Without the CA the certificate is not trusted.
    build_fails(
        &[&qcow2, &format!("docker://{auth}")],
        "cannot reach registry",
    );

    // Token auth (push scope from the token service; the password from stdin), then our
    // importer pulls it through the same front and gets the source disk.
    let tok = format!("{}/cd/token:v1", var("REGISTRY_TOKEN"));
    let mut c = Command::new(env!("CARGO_BIN_EXE_vdisk"));
    c.args([
        "containerdisk",
        "--insecure",
        "--creds",
        "user",
        "--password-stdin",
        "--compression",
        "zstd",
    ])
    .arg(&qcow2)
    .arg(format!("docker://{tok}"))
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"pass\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let pulled = import(
        w.dir.path(),
        &format!("docker://{tok}"),
        &[
            ("INSECURE_TLS", "true"),
            ("IMPORTER_ACCESS_KEY_ID", "user"),
            ("IMPORTER_SECRET_KEY", "pass"),
        ],
    );
    same_disk(&pulled, w.path("disk.qcow2"));
    build_fails(
        &[
            "--insecure",
            "--creds",
            "user:wrong",
            &qcow2,
            &format!("docker://{tok}"),
        ],
        "rejected the credentials",
    );
}

#[test]
fn reproducible_digests_and_conversions() {
    let w = Work::new();
    let qcow2 = w.s("disk.qcow2");
    for c in ["gzip", "zstd"] {
        let a = build(&[
            "--compression",
            c,
            &qcow2,
            &format!("oci-archive:{}", w.s(&format!("a-{c}.tar"))),
        ]);
        let b = build(&[
            "--compression",
            c,
            &qcow2,
            &format!("oci-archive:{}", w.s(&format!("b-{c}.tar"))),
        ]);
        assert_eq!(a, b, "{c}");
        // Byte-identical archives, too.
        same_bytes(
            &w.path(&format!("a-{c}.tar")),
            &w.path(&format!("b-{c}.tar")),
        );
        let l = build(&[
            "--compression",
            c,
            "--label",
            "x=y",
            &qcow2,
            &format!("oci-archive:{}", w.s("l.tar")),
        ]);
        assert_ne!(a, l, "a label must change the digest");
        eprintln!("{c}: {a} (twice), with a label {l}");
    }
    // SOURCE_DATE_EPOCH: the tar times and the config's created.
    let o = run_ok(
        Command::new(env!("CARGO_BIN_EXE_vdisk"))
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .args(["containerdisk", "-q", &qcow2])
            .arg(format!("oci-archive:{}", w.s("epoch.tar"))),
    );
    let i = skopeo_json(&["inspect", &format!("oci-archive:{}", w.s("epoch.tar"))]);
    assert_eq!(i["Digest"], stdout(&o).trim());
    assert_eq!(i["Created"], "2023-11-14T22:13:20Z");
    let d = w.path("epoch-dir");
    skopeo(&[
        "copy",
        "-q",
        &format!("oci-archive:{}", w.s("epoch.tar")),
        &format!("dir:{}", d.display()),
    ]);
    let entries = check_layer(&d, "disk.img", &w.path("epoch-disk"));
    assert!(
        entries.iter().all(|e| e["mtime"] == 1_700_000_000),
        "{entries:?}"
    );

    // Converted on the way: raw -> compressed qcow2, qcow2 -> raw. qemu-img checks the
    // qcow2 clean and both compare equal to their sources.
    for (src, args, want) in [
        ("disk.raw", vec!["-O", "qcow2", "-c"], "qcow2"),
        ("disk.qcow2", vec!["-O", "raw"], "raw"),
        ("disk.raw", vec!["-O", "qcow2"], "qcow2"),
    ] {
        let out = w.path(&format!("conv-{src}-{want}.tar"));
        let mut a = args.clone();
        let s = w.s(src);
        let dst = format!("oci-archive:{}", out.display());
        a.extend([s.as_str(), dst.as_str()]);
        build(&a);
        let d = w.path(&format!("conv-{src}-{want}"));
        skopeo(&["copy", "-q", &dst, &format!("dir:{}", d.display())]);
        let got = w.path(&format!("conv-{src}-{want}.disk"));
        check_layer(&d, "disk.img", &got);
        let info: Value = serde_json::from_slice(
            &run_ok(
                Command::new("qemu-img")
                    .args(["info", "--output=json"])
                    .arg(&got),
            )
            .stdout,
        )
        .unwrap();
        assert_eq!(info["format"], want, "{info}");
        if want == "qcow2" {
            run_ok(Command::new("qemu-img").args(["check", "-q"]).arg(&got));
        }
        if args.contains(&"-c") {
            let map = run_ok(
                Command::new("qemu-img")
                    .args(["map", "--output=json", "-f", "qcow2"])
                    .arg(&got),
            );
            assert!(
                stdout(&map).contains("\"compressed\": true"),
                "{}",
                stdout(&map)
            );
        }
        same_disk(&got, w.path(src));
    }
}

/// Peak RSS in KiB of a command run under `/usr/bin/time -v`, and its output.
fn peak_rss(args: &[&str]) -> (u64, Output) {
    let o = run(Command::new("/usr/bin/time")
        .arg("-v")
        .arg(env!("CARGO_BIN_EXE_vdisk"))
        .args(args));
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    let kb = e
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Maximum resident set size (kbytes): ")
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no peak RSS in {e}"));
    (kb, o)
}

#[test]
fn big_sparse_disk_with_bounded_memory() {
    let w = Work::new();
    // 10 GiB raw, a few MiB of data, some past 8 GiB: the tar entry's size needs PAX /
    // base-256, which GNU tar and our importer must read back.
    let big = w.path("big.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "raw"])
            .arg(&big)
            .arg("10G"),
    );
    run_ok(
        Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "write -q -P 0x11 0 2M",
                "-c",
                "write -q -P 0x22 4G 1M",
                "-c",
                "write -q -P 0x33 9G 3M",
                "-c",
                "write -q -P 0x44 10239M 1M",
            ])
            .arg(&big),
    );
    let archive = w.path("big.tar");
    let t0 = Instant::now();
    let (kb, o) = peak_rss(&[
        "containerdisk",
        &big.display().to_string(),
        &format!("oci-archive:{}", archive.display()),
    ]);
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "10 GiB sparse raw -> gzip containerDisk: {secs:.1} s ({:.0} MiB/s), peak RSS {kb} KiB\n{}",
        10240.0 / secs,
        stdout(&o)
    );
    assert!(kb < 64 * 1024, "peak RSS {kb} KiB");
    // GNU tar (through gzip) lists the disk with its full size, owner and mode.
    let d = w.path("big-dir");
    skopeo(&[
        "copy",
        "-q",
        &format!("oci-archive:{}", archive.display()),
        &format!("dir:{}", d.display()),
    ]);
    let (blob, kind) = layer_blob(&d);
    assert_eq!(kind, "gzip");
    let o = run_ok(Command::new("sh").arg("-c").arg(format!(
        "gzip -dc '{}' | tar --numeric-owner -tvf -",
        blob.display()
    )));
    let listing = stdout(&o);
    assert!(
        listing.contains("-r--r----- 107/107 10737418240 ") && listing.contains("disk/disk.img"),
        "{listing}"
    );
    assert!(listing.contains("dr-xr-xr-x 107/107"), "{listing}");
    assert!(!listing.contains("PaxHeaders"), "{listing}");
    // Our importer reads it back whole.
    same_disk(
        import(
            w.dir.path(),
            &format!("oci-archive:{}", archive.display()),
            &[],
        ),
        &big,
    );
}

#[test]
fn bad_input_fails_cleanly_and_leaves_nothing() {
    let w = Work::new();
    let qcow2 = w.s("disk.qcow2");
    let target = w.path("out.tar");
    let dest = format!("oci-archive:{}", target.display());
    let leftovers = || {
        std::fs::read_dir(w.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.') || n.starts_with("out"))
            .collect::<Vec<_>>()
    };
    // Missing disk: named in the message.
    build_fails(&[&w.s("missing.qcow2"), &dest], &w.s("missing.qcow2"));
    // Formats KubeVirt does not boot are refused unless converted; the converted one works.
    let vmdk = w.s("disk.vmdk");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-q", "-O", "vmdk"])
            .arg(&qcow2)
            .arg(&vmdk),
    );
    let e = build_fails(&[&vmdk, &dest], "vmdk");
    assert!(e.contains(&vmdk) && e.contains("-O qcow2"), "{e}");
    // A qcow2 with a backing file would not be whole in the image.
    let overlay = w.s("overlay.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&qcow2)
            .arg(&overlay),
    );
    build_fails(&[&overlay, &dest], "backing file");
    assert!(leftovers().is_empty(), "{:?}", leftovers());
    build(&["-O", "qcow2", &vmdk, &dest]);
    build(&[
        "-O",
        "qcow2",
        &overlay,
        &format!("oci-archive:{}", w.s("flat.tar")),
    ]);
    std::fs::remove_file(&target).unwrap();
    // Destinations that cannot be written or parsed.
    build_fails(
        &[
            &qcow2,
            &format!("oci-archive:{}/no/such/dir/x.tar", w.s("")),
        ],
        "no/such/dir",
    );
    build_fails(
        &[&qcow2, &format!("oci:{}/sub", w.s("disk.raw"))],
        "disk.raw",
    );
    std::fs::create_dir(w.path("notalayout")).unwrap();
    std::fs::write(w.path("notalayout/file"), b"x").unwrap();
    build_fails(
        &[&qcow2, &format!("oci:{}", w.s("notalayout"))],
        "not an OCI image layout",
    );
    build_fails(&[&qcow2, "tar:x"], "invalid destination");
    build_fails(&[&qcow2, "docker://UPPER/Case"], "Invalid image name");
    build_fails(&[&qcow2, &format!("{dest}:bad tag")], "tag");
    build_fails(&["--disk-name", "a/b", &qcow2, &dest], "disk name");
    build_fails(&["--label", "novalue", &qcow2, &dest], "KEY=VALUE");
    build_fails(&["-O", "vmdk", &qcow2, &dest], "-O must be raw or qcow2");
    // A registry that is down: a quick, clear network error.
    let t0 = Instant::now();
    build_fails(
        &[
            "--insecure",
            &qcow2,
            &format!("docker://127.0.0.1:{}/x/y:z", free_port()),
        ],
        "cannot reach registry",
    );
    assert!(t0.elapsed() < Duration::from_secs(30));
    assert!(leftovers().is_empty(), "{:?}", leftovers());

    // Killed half way: no archive, no layout directory.
    let slow = w.path("slow.raw");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "raw"])
            .arg(&slow)
            .arg("8G"),
    );
    for dest in [dest.clone(), format!("oci:{}", w.s("outdir"))] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vdisk"))
            .args(["containerdisk", &slow.display().to_string(), &dest])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(700));
        assert!(
            child.try_wait().unwrap().is_none(),
            "the build of 8 GiB ended too soon to be killed"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!target.exists() && !w.path("outdir").exists(), "{dest}");
    }
}
