//! The images of `scripts/build-images.sh`, run by podman as CDI's controller runs them: UID
//! 107, every capability dropped, no new privileges, a 64 MiB memory limit (swap included),
//! the host network (standing in for the pod's), CDI's environment, `/data` a mounted
//! directory or `/dev/cdi-block-volume` a loop device, and `/dev/termination-log` a host file
//! read from outside with the exit code.
//!
//! * the importer from nginx (xz-compressed qcow2) into `/data`, from the plain registry
//!   (containerDisk, labels) onto a loop device, and from an unreachable source;
//! * node pull end to end: a containerDisk image built by podman (`FROM scratch`, the disk in
//!   `/disk`), the importer image's `cdi-containerimage-server` copied into a shared volume by
//!   an init container and run as the containerDisk's command, the importer pulling from it
//!   over loopback; and an importer whose server never starts;
//! * the uploader over mutual TLS, from `vdisk upload` and from curl.
//!
//! Memory: a container past its limit is OOM-killed (checked in `podman inspect`), and each
//! drop-in logs its peak RSS at `-v=1`, which must be ≤ 64 MiB.
//!
//! The images are built by `scripts/build-images.sh` (the test command runs it first); when
//! they are missing this file runs it, and fails if it fails.

mod common;

use common::services::var;
use common::{free_port, same_disk};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const IMPORTER: &str = "localhost/vdisk-importer:latest";
const UPLOADER: &str = "localhost/vdisk-uploader:latest";
const LIMIT: u64 = 64 << 20;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .env("CONTAINERS_CONF", root().join("scripts/containers.conf"))
        .args(args)
        .output()
        .expect("podman (scripts/build-images.sh installs it)")
}

fn podman_ok(args: &[&str]) -> String {
    let o = podman(args);
    assert!(
        o.status.success(),
        "podman {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Both images exist (built now when missing).
fn images() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let have = |i: &str| {
            Command::new("podman")
                .env("CONTAINERS_CONF", root().join("scripts/containers.conf"))
                .args(["image", "exists", i])
                .status()
                .is_ok_and(|s| s.success())
        };
        if !(have(IMPORTER) && have(UPLOADER)) {
            let st = Command::new(root().join("scripts/build-images.sh"))
                .current_dir(root())
                .status()
                .expect("run scripts/build-images.sh");
            assert!(st.success(), "scripts/build-images.sh failed");
        }
    });
}

/// A directory owned by UID/GID 107 (the pods' user), as a volume is.
fn owned_dir(p: &Path) {
    std::fs::create_dir_all(p).unwrap();
    chown107(p);
}

fn chown107(p: &Path) {
    std::os::unix::fs::chown(p, Some(107), Some(107)).unwrap();
}

/// A pod's volumes on the host: `data/`, the termination log, `shared/`.
struct Pod {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    mounts: Vec<String>,
    devices: Vec<String>,
}

/// How a container ended.
struct Exit {
    code: i32,
    oom: bool,
    term: String,
    log: String,
}

impl Exit {
    fn peak(&self) -> u64 {
        let line = self
            .log
            .lines()
            .find(|l| l.contains("] peak memory: "))
            .unwrap_or_else(|| panic!("no peak memory line in the log:\n{}", self.log));
        line.rsplit("peak memory: ")
            .next()
            .and_then(|s| s.trim_end_matches(" bytes").parse().ok())
            .unwrap_or_else(|| panic!("bad peak memory line {line}"))
    }

    /// Exit 0, not OOM-killed, within the memory limit.
    fn ok(&self) -> &Exit {
        assert_eq!(self.code, 0, "term {:?}\n{}", self.term, self.log);
        eprintln!("peak RSS {} bytes", self.peak());
        assert!(!self.oom, "OOM-killed:\n{}", self.log);
        assert!(
            self.peak() <= LIMIT,
            "peak {} > {LIMIT}:\n{}",
            self.peak(),
            self.log
        );
        self
    }

    fn failed(&self, message: &str) -> &Exit {
        assert_eq!(self.code, 1, "term {:?}\n{}", self.term, self.log);
        assert!(!self.oom);
        assert!(
            self.term.starts_with(message),
            "termination message {:?} does not start with {message:?}\n{}",
            self.term,
            self.log
        );
        self
    }
}

impl Pod {
    fn new() -> Pod {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        owned_dir(&dir.path().join("data"));
        owned_dir(&dir.path().join("shared"));
        let term = dir.path().join("termination-log");
        std::fs::write(&term, b"").unwrap();
        chown107(&term);
        let mounts = vec![format!("{}:/dev/termination-log", term.display())];
        Pod {
            dir,
            env: Vec::new(),
            mounts,
            devices: Vec::new(),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn set(mut self, k: &str, v: impl Into<String>) -> Pod {
        self.env.push((k.into(), v.into()));
        self
    }

    fn mount(mut self, host: &Path, at: &str) -> Pod {
        self.mounts.push(format!("{}:{at}", host.display()));
        self
    }

    fn importer(self) -> Pod {
        let data = self.path("data");
        self.mount(&data, "/data")
            .set("IMPORTER_CONTENTTYPE", "kubevirt")
            .set("OWNER_UID", "0b1c2d3e-uid")
            .set("FILESYSTEM_OVERHEAD", "0.055")
            .set("PREALLOCATION", "false")
            .set("IMPORTER_IMAGE_SIZE", "100Mi")
    }

    /// `podman run` arguments for `image` as CDI runs its pods, detached.
    fn run_args(&self, name: &str, image: &str) -> Vec<String> {
        let mut a: Vec<String> = [
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "host",
            "--user",
            "107:107",
            "--cap-drop",
            "all",
            "--security-opt",
            "no-new-privileges",
            "--memory",
            "64m",
            "--memory-swap",
            "64m",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for m in &self.mounts {
            a.extend(["-v".into(), m.clone()]);
        }
        for d in &self.devices {
            a.extend(["--device".into(), d.clone()]);
        }
        for (k, v) in &self.env {
            a.extend(["-e".into(), format!("{k}={v}")]);
        }
        a.push(image.into());
        a
    }

    /// Start `image` (extra arguments after the image) and return its container.
    fn start(&self, image: &str, args: &[&str]) -> Container {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "vdisk-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let mut a = self.run_args(&name, image);
        a.extend(args.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
        podman_ok(&refs);
        Container { name }
    }

    fn run(&self, image: &str, args: &[&str]) -> Exit {
        let c = self.start(image, args);
        c.wait(self, Duration::from_secs(300))
    }
}

/// A started container, removed when dropped.
struct Container {
    name: String,
}

impl Container {
    fn wait(&self, pod: &Pod, timeout: Duration) -> Exit {
        let t0 = Instant::now();
        loop {
            let state = podman_ok(&["inspect", "--format", "{{.State.Status}}", &self.name]);
            if state == "exited" || state == "stopped" {
                break;
            }
            assert!(
                t0.elapsed() < timeout,
                "{} still {state} after {timeout:?}:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let f = podman_ok(&[
            "inspect",
            "--format",
            "{{.State.ExitCode}} {{.State.OOMKilled}}",
            &self.name,
        ]);
        let (code, oom) = f.split_once(' ').unwrap();
        Exit {
            code: code.parse().unwrap(),
            oom: oom == "true",
            term: std::fs::read_to_string(pod.path("termination-log")).unwrap_or_default(),
            log: self.log(),
        }
    }

    fn log(&self) -> String {
        let o = podman(&["logs", &self.name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", "-t", "0", &self.name]);
    }
}

/// A loop device over a sparse file of `len` bytes, detached when dropped; `None` when this
/// kernel has no loop devices (the block-volume case is then skipped, saying so).
struct Loop {
    dev: PathBuf,
    _file: tempfile::NamedTempFile,
}

impl Loop {
    fn new(len: u64) -> Option<Loop> {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(len).unwrap();
        let o = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file.path())
            .output()
            .ok()?;
        if !o.status.success() {
            eprintln!(
                "SKIP block volume: no loop device (kernel feature): {}",
                String::from_utf8_lossy(&o.stderr)
            );
            return None;
        }
        let dev = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        chown107(&dev);
        Some(Loop { dev, _file: file })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("termination message {s:?}: {e}"))
}

#[test]
fn importer_http_into_a_filesystem_volume() {
    images();
    let pod = Pod::new().importer().set("IMPORTER_SOURCE", "http").set(
        "IMPORTER_ENDPOINT",
        format!("{}/disk.qcow2.xz", var("HTTP_URL")),
    );
    let e = pod.run(IMPORTER, &["-v=1"]);
    e.ok();
    let t = json(&e.term);
    assert_eq!(t["message"], "Import Complete", "{}", e.term);
    assert_eq!(t["scratchSpaceRequired"], false);
    let disk = pod.path("data/disk.img");
    same_disk(&disk, var("DISK_QCOW2"));
    let m = std::fs::metadata(&disk).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (107, 0o660));
    // klog lines, as CDI's pods write them.
    assert!(
        e.log
            .lines()
            .any(|l| l.starts_with('I') && l.contains("main.rs:")),
        "{}",
        e.log
    );
}

#[test]
fn importer_registry_onto_a_block_volume() {
    images();
    let Some(lo) = Loop::new(100 << 20) else {
        return;
    };
    let pod = Pod::new()
        .importer()
        .set("IMPORTER_SOURCE", "registry")
        .set(
            "IMPORTER_ENDPOINT",
            format!("docker://{}/disks/labels:latest", var("REGISTRY")),
        )
        .set("INSECURE_TLS", "true");
    let mut pod = pod;
    pod.devices
        .push(format!("{}:/dev/cdi-block-volume", lo.dev.display()));
    let e = pod.run(IMPORTER, &["-v=1"]);
    e.ok();
    let t = json(&e.term);
    assert_eq!(t["message"], "Import Complete", "{}", e.term);
    assert_eq!(
        t["labels"]["instancetype.kubevirt.io/default-preference"], "fedora",
        "{}",
        e.term
    );
    // The device holds the disk, then zeros to its end.
    let o = Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "qcow2"])
        .arg(&lo.dev)
        .arg(var("DISK_QCOW2"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        std::fs::read_dir(pod.path("data"))
            .unwrap()
            .next()
            .is_none(),
        "a block import wrote into /data"
    );
}

#[test]
fn importer_unreachable_source_fails_cleanly() {
    images();
    let port = free_port();
    let pod = Pod::new().importer().set("IMPORTER_SOURCE", "http").set(
        "IMPORTER_ENDPOINT",
        format!("http://127.0.0.1:{port}/disk.img"),
    );
    let e = pod.run(IMPORTER, &[]);
    e.failed("Unable to connect to http data source");
    assert!(!pod.path("data/disk.img").exists());
    assert!(
        e.log.lines().any(|l| l.starts_with('E')),
        "no klog error line:\n{}",
        e.log
    );
}

/// A containerDisk as users build them: `FROM scratch`, the disk in `/disk`, an env label.
fn container_disk() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        let ctx = tempfile::tempdir().unwrap();
        std::fs::copy(var("DISK_QCOW2"), ctx.path().join("fedora.qcow2")).unwrap();
        std::fs::write(
            ctx.path().join("Containerfile"),
            "FROM scratch\nADD --chown=107:107 fedora.qcow2 /disk/\n\
             ENV INSTANCETYPE_KUBEVIRT_IO_DEFAULT_PREFERENCE=fedora\n",
        )
        .unwrap();
        // One fixed tag, replaced by each run, so runs do not pile up images.
        let tag = "localhost/vdisk-test-containerdisk:latest".to_string();
        podman_ok(&["build", "-q", "-t", &tag, &ctx.path().display().to_string()]);
        tag
    })
}

#[test]
fn node_pull_from_a_containerdisk() {
    images();
    let cd = container_disk();
    let pod = Pod::new();
    let shared = pod.path("shared");
    let pod = pod.mount(&shared, "/shared");
    // Init container: the importer image copies its server into the shared volume.
    let out = podman_ok(&[
        "run",
        "--rm",
        "--user",
        "107:107",
        "--cap-drop",
        "all",
        "-v",
        &format!("{}:/shared", shared.display()),
        "--entrypoint",
        "/bin/cp",
        IMPORTER,
        "/usr/bin/cdi-containerimage-server",
        "/shared/server",
    ]);
    assert!(out.is_empty(), "{out}");
    // The containerDisk's own image runs the copied server (it has no libc, no shell).
    let port = free_port().to_string();
    let server = pod.start(
        cd,
        &[
            "/shared/server",
            "-p",
            &port,
            "-image-dir",
            "/disk",
            "-ready-file",
            "/shared/ready",
            "-done-file",
            "/shared/done",
        ],
    );
    let pod = pod
        .importer()
        .set("IMPORTER_SOURCE", "http")
        .set(
            "IMPORTER_ENDPOINT",
            format!("http://localhost:{port}/disk.img"),
        )
        .set("IMPORTER_PULL_METHOD", "node")
        .set("IMPORTER_READY_FILE", "/shared/ready")
        .set("IMPORTER_DONE_FILE", "/shared/done");
    let e = pod.run(IMPORTER, &["-v=1"]);
    e.ok();
    let t = json(&e.term);
    assert_eq!(t["message"], "Import Complete", "{}", e.term);
    assert_eq!(
        t["labels"]["instancetype.kubevirt.io/default-preference"], "fedora",
        "labels from the server's /info: {}",
        e.term
    );
    same_disk(pod.path("data/disk.img"), var("DISK_QCOW2"));
    assert_eq!(
        std::fs::read_to_string(shared.join("ready")).unwrap(),
        "fedora.qcow2"
    );
    // The importer's done file ends the server.
    let s = server.wait(&pod, Duration::from_secs(30));
    assert_eq!(s.code, 0, "{}", s.log);
}

#[test]
fn node_pull_server_that_never_starts() {
    images();
    let pod = Pod::new();
    let shared = pod.path("shared");
    let port = free_port();
    let pod = pod
        .mount(&shared, "/shared")
        .importer()
        .set("IMPORTER_SOURCE", "http")
        .set(
            "IMPORTER_ENDPOINT",
            format!("http://localhost:{port}/disk.img"),
        )
        .set("IMPORTER_PULL_METHOD", "node")
        .set("IMPORTER_READY_FILE", "/shared/ready")
        .set("IMPORTER_DONE_FILE", "/shared/done")
        .set("VDISK_READY_TIMEOUT", "2");
    let e = pod.run(IMPORTER, &[]);
    e.failed("Timeout waiting for file");
    assert!(!pod.path("data/disk.img").exists());
    // The done file is still created, so a late server does not hang the pod.
    assert!(shared.join("done").exists());
}

/// Certificates for the upload server and its client (CDI's upload proxy), made by openssl.
struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    fn new() -> Certs {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let sh = r#"set -e
            cd "$1"
            for ca in server-ca client-ca; do
              openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
                -subj "/CN=$ca" -keyout $ca.key -out $ca.crt 2>/dev/null
            done
            openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
              -keyout tls.key -out tls.csr 2>/dev/null
            printf 'basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n' > san.ext
            printf 'basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n' > client.ext
            openssl x509 -req -in tls.csr -CA server-ca.crt -CAkey server-ca.key -CAcreateserial \
              -days 2 -extfile san.ext -out tls.crt 2>/dev/null
            openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
              -subj /CN=client.upload-server.cdi.kubevirt.io -keyout proxy.key -out proxy.csr 2>/dev/null
            openssl x509 -req -in proxy.csr -CA client-ca.crt -CAkey client-ca.key -CAcreateserial \
              -days 2 -extfile client.ext -out proxy.crt 2>/dev/null
            chmod 0644 ./*.key"#;
        let st = Command::new("bash")
            .args(["-c", sh, "certs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(st.success(), "openssl");
        Certs { dir }
    }
    fn p(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// `curl -sS` trusting the server CA, presenting the upload proxy's certificate when
    /// `as_proxy`.
    fn curl(&self, as_proxy: bool) -> Command {
        let mut c = Command::new("curl");
        c.args(["-sS", "--cacert", &self.p("server-ca.crt")]);
        if as_proxy {
            c.args([
                "--cert",
                &self.p("proxy.crt"),
                "--key",
                &self.p("proxy.key"),
            ]);
        }
        c
    }
}

/// An upload server pod with CDI's environment and the certificates at `/etc/tls`, started
/// on a free port and answering `/healthz`: the pod, its container, its base URL.
fn start_uploader(certs: &Certs, args: &[&str]) -> (Pod, Container, String) {
    let port = free_port().to_string();
    let pod = Pod::new();
    let d = pod.path("data");
    let pod = pod
        .mount(&d, "/data")
        .mount(certs.dir.path(), "/etc/tls")
        .set("LISTEN_ADDRESS", "127.0.0.1")
        .set("LISTEN_PORT", &port)
        .set("TLS_CERT_FILE", "/etc/tls/tls.crt")
        .set("TLS_KEY_FILE", "/etc/tls/tls.key")
        .set("CLIENT_CERT_FILE", "/etc/tls/client-ca.crt")
        .set("CLIENT_NAME", "client.upload-server.cdi.kubevirt.io")
        .set("UPLOAD_IMAGE_SIZE", "100Mi")
        .set("FILESYSTEM_OVERHEAD", "0.055")
        .set("PREALLOCATION", "false");
    let c = pod.start(UPLOADER, args);
    let url = format!("https://127.0.0.1:{port}");
    let t0 = Instant::now();
    loop {
        let o = certs
            .curl(true)
            .args(["-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("{url}/healthz"))
            .output()
            .unwrap();
        if String::from_utf8_lossy(&o.stdout) == "200" {
            return (pod, c, url);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "upload server not healthy:\n{}",
            c.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn uploader_over_mutual_tls() {
    images();
    let certs = Certs::new();
    // From `vdisk upload`, a qcow2.
    let (pod, c, url) = start_uploader(&certs, &["-v=1"]);
    let o = Command::new(env!("CARGO_BIN_EXE_vdisk"))
        .args(["upload", "--ca", &certs.p("server-ca.crt")])
        .args(["--cert", &certs.p("proxy.crt")])
        .args(["--key", &certs.p("proxy.key")])
        .arg(&url)
        .arg(var("DISK_QCOW2"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "vdisk upload: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        c.log()
    );
    let e = c.wait(&pod, Duration::from_secs(60));
    e.ok();
    assert_eq!(json(&e.term)["message"], "Upload Complete", "{}", e.term);
    same_disk(pod.path("data/disk.img"), var("DISK_QCOW2"));

    // From curl, an xz-compressed raw, as virtctl posts it.
    let (pod, c, url) = start_uploader(&certs, &["-v=1"]);
    let o = certs
        .curl(true)
        .args(["-f", "-H", "Content-Type: application/octet-stream"])
        .arg("--data-binary")
        .arg(format!("@{}/disk.raw.xz", var("WWW")))
        .arg(format!("{url}/v1beta1/upload"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "curl: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        c.log()
    );
    let e = c.wait(&pod, Duration::from_secs(60));
    e.ok();
    same_disk(pod.path("data/disk.img"), var("DISK_RAW"));

    // A client without the proxy's certificate is refused, and nothing is written.
    let (pod, _c, url) = start_uploader(&certs, &[]);
    let o = certs
        .curl(false)
        .args(["-o", "/dev/null", "-w", "%{http_code}"])
        .args(["--data-binary", "@/etc/hostname"])
        .arg(format!("{url}/v1beta1/upload"))
        .output()
        .unwrap();
    let code = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        code == "000" || code.starts_with('4'),
        "no-cert upload got {code}"
    );
    assert!(!pod.path("data/disk.img").exists());
}

#[test]
fn importer_through_a_forward_proxy() {
    images();
    // squid resolves disk.proxied.test to loopback; nothing else can, so every success here
    // went through it. HTTPS: a CONNECT tunnel, the origin's CA from the proxy CA directory.
    let log_has = |what: &str| {
        std::fs::read_to_string(var("PROXY_LOG"))
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains(what))
    };
    let pod = Pod::new();
    let certs = pod.path("proxycerts");
    std::fs::create_dir(&certs).unwrap();
    std::fs::copy(var("CA_CERT"), certs.join("ca.pem")).unwrap();
    let url = format!("{}/disk.raw.xz", var("PROXIED_HTTPS"));
    let pod = pod
        .mount(&certs, "/proxycerts")
        .importer()
        .set("IMPORTER_SOURCE", "http")
        .set("IMPORTER_ENDPOINT", url)
        .set("IMPORTER_PROXY_CERT_DIR", "/proxycerts")
        .set("HTTPS_PROXY", var("PROXY_URL"))
        .set("NO_PROXY", "10.0.0.0/8,.cluster.local,192.168.0.1");
    pod.run(IMPORTER, &["-v=1"]).ok();
    same_disk(pod.path("data/disk.img"), var("DISK_RAW"));
    let authority = var("PROXIED_HTTPS").replace("https://", "");
    assert!(
        log_has(&format!("CONNECT {authority}")),
        "no CONNECT in the proxy log"
    );

    // Plain HTTP: an absolute-form GET through the proxy.
    let url = format!("{}/disk.qcow2", var("PROXIED_HTTP"));
    let pod = Pod::new()
        .importer()
        .set("IMPORTER_SOURCE", "http")
        .set("IMPORTER_ENDPOINT", url.clone())
        .set("HTTP_PROXY", var("PROXY_URL"));
    pod.run(IMPORTER, &["-v=1"]).ok();
    same_disk(pod.path("data/disk.img"), var("DISK_QCOW2"));
    assert!(
        log_has(&format!("GET {url}")),
        "no GET {url} in the proxy log"
    );

    // NO_PROXY naming the domain (leading dot): the importer goes direct, cannot resolve the
    // name, and fails cleanly.
    let pod = Pod::new()
        .importer()
        .set("IMPORTER_SOURCE", "http")
        .set(
            "IMPORTER_ENDPOINT",
            format!("{}/disk.raw", var("PROXIED_HTTP")),
        )
        .set("HTTP_PROXY", var("PROXY_URL"))
        .set("NO_PROXY", ".proxied.test");
    pod.run(IMPORTER, &[])
        .failed("Unable to connect to http data source");
    assert!(!pod.path("data/disk.img").exists());
    assert!(
        !log_has(&format!("{}/disk.raw ", var("PROXIED_HTTP"))),
        "NO_PROXY was not honoured"
    );
}
