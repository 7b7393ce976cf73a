//! `vdisk-importer` end to end, against real servers on loopback: nginx (HTTP, HTTPS with a
//! test CA, basic auth, redirects, Range, paced), a flaky server that drops or stalls a body,
//! Debian's docker-registry (plain, TLS + htpasswd, and behind a token-auth proxy) holding
//! containerDisks pushed with skopeo. Each case runs the binary as CDI's pod would (env vars,
//! paths moved under `VDISK_ROOT`) and checks the disk with `qemu-img compare`, the
//! termination message and the exit code; one case watches the progress metric.
//!
//! The services come from `scripts/services.sh` and `scripts/push-containerdisks.sh`: the
//! test script starts them and names their state directory in `VDISK_SERVICES`; without it
//! this file starts its own set and stops it when the tests end.

mod common;

use common::services::var;
use common::{free_port, same_disk};

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A pod's file system: `VDISK_ROOT` with `/data` (or the block device) and the
/// termination log's directory.
struct Pod {
    _dir: tempfile::TempDir,
    root: PathBuf,
    env: Vec<(String, String)>,
}

impl Pod {
    fn new() -> Pod {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        std::fs::create_dir_all(root.join("data")).unwrap();
        std::fs::create_dir_all(root.join("dev")).unwrap();
        Pod {
            _dir: dir,
            root,
            env: Vec::new(),
        }
    }
    fn set(mut self, k: &str, v: impl Into<String>) -> Pod {
        self.env.push((k.to_string(), v.into()));
        self
    }
    fn http(self, url: String) -> Pod {
        self.set("IMPORTER_SOURCE", "http")
            .set("IMPORTER_ENDPOINT", url)
    }
    fn run(&self) -> Run {
        let port = free_port();
        let out = self.command(port).output().unwrap();
        self.finish(out)
    }
    fn command(&self, metrics_port: u16) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vdisk-importer"));
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("VDISK_ROOT", &self.root)
            .env("VDISK_METRICS_PORT", metrics_port.to_string())
            .env("IMPORTER_CONTENTTYPE", "kubevirt")
            .env("OWNER_UID", "uid-1")
            .env("FILESYSTEM_OVERHEAD", "0")
            .env("PREALLOCATION", "false")
            .args(["-v=3", "-alsologtostderr"]);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }
    fn finish(&self, out: Output) -> Run {
        let term = std::fs::read_to_string(self.root.join("dev/termination-log")).ok();
        Run {
            code: out.status.code().unwrap_or(-1),
            term,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
    fn disk(&self) -> PathBuf {
        self.root.join("data/disk.img")
    }
}

struct Run {
    code: i32,
    term: Option<String>,
    stderr: String,
}

impl Run {
    fn ok(&self) -> &Run {
        assert_eq!(
            self.code, 0,
            "importer failed: {:?}\n{}",
            self.term, self.stderr
        );
        assert_eq!(
            self.term.as_deref(),
            Some(
                r#"{"scratchSpaceRequired":false,"preallocationApplied":false,"message":"Import Complete"}"#
            ),
            "{}",
            self.stderr
        );
        self
    }
    fn failed(&self, text: &str) -> &Run {
        assert_eq!(self.code, 1, "{:?}\n{}", self.term, self.stderr);
        let t = self.term.as_deref().unwrap_or("");
        assert!(t.contains(text), "termination message {t:?} lacks {text:?}");
        self
    }
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn http_formats_stream_to_the_volume() {
    for (file, src) in [
        ("disk.qcow2", "DISK_QCOW2"),
        ("disk.raw", "DISK_RAW"),
        ("disk.raw.gz", "DISK_RAW"),
        ("disk.raw.xz", "DISK_RAW"),
        ("disk.raw.zst", "DISK_RAW"),
        ("disk.qcow2.xz", "DISK_QCOW2"),
    ] {
        let pod = Pod::new().http(format!("{}/{file}", var("HTTP_URL")));
        pod.run().ok();
        same_disk(pod.disk(), var(src));
        assert_eq!(mode(&pod.disk()), 0o660, "{file}");
        assert!(!pod.root.join("scratch").exists());
    }
}

#[test]
fn https_with_ca_dir_basic_auth_and_redirect() {
    // The CA comes from IMPORTER_CERT_DIR (a ConfigMap mounted at /certs).
    let with_ca = |pod: Pod| {
        std::fs::create_dir_all(pod.root.join("certs")).unwrap();
        std::fs::copy(var("CA_CERT"), pod.root.join("certs/ca.crt")).unwrap();
        std::fs::write(pod.root.join("certs/.hidden"), b"junk").unwrap();
        pod.set("IMPORTER_CERT_DIR", "/certs")
    };
    let pod = with_ca(Pod::new().http(format!("{}/disk.qcow2", var("HTTPS_URL"))));
    pod.run().ok();
    same_disk(pod.disk(), var("DISK_QCOW2"));

    // Without the CA the TLS handshake fails; INSECURE_TLS skips verification.
    let pod = Pod::new().http(format!("{}/disk.qcow2", var("HTTPS_URL")));
    pod.run().failed("Unable to connect to http data source:");
    assert!(!pod.disk().exists());
    let pod = Pod::new()
        .http(format!("{}/disk.qcow2", var("HTTPS_URL")))
        .set("INSECURE_TLS", "true");
    pod.run().ok();

    // Basic auth only when both keys are set.
    let url = format!("{}/auth/disk.raw.gz", var("HTTP_URL"));
    Pod::new()
        .http(url.clone())
        .set("IMPORTER_ACCESS_KEY_ID", "user")
        .run()
        .failed("Unable to connect to http data source: expected status code 200, got 401");
    let pod = Pod::new()
        .http(url)
        .set("IMPORTER_ACCESS_KEY_ID", "user")
        .set("IMPORTER_SECRET_KEY", "pass");
    pod.run().ok();
    same_disk(pod.disk(), var("DISK_RAW"));

    // A redirect from HTTP to HTTPS, followed with the CA.
    let pod = with_ca(Pod::new().http(format!("{}/redirect/disk.raw.xz", var("HTTP_URL"))));
    pod.run().ok();
    same_disk(pod.disk(), var("DISK_RAW"));
}

#[test]
fn dropped_connection_resumes_with_range() {
    for file in ["disk.qcow2", "disk.raw"] {
        let pod = Pod::new().http(format!(
            "{}/drop/{file}?run={}",
            var("FLAKY_URL"),
            std::process::id()
        ));
        let r = pod.run();
        r.ok();
        same_disk(
            pod.disk(),
            var(if file == "disk.raw" {
                "DISK_RAW"
            } else {
                "DISK_QCOW2"
            }),
        );
    }
}

#[test]
fn checksums_are_verified_before_the_disk_is_kept() {
    let file = Path::new(&var("WWW")).join("disk.raw.gz");
    let o = Command::new("sha256sum").arg(&file).output().unwrap();
    let sum = String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let url = format!("{}/disk.raw.gz", var("HTTP_URL"));
    let pod = Pod::new()
        .http(url.clone())
        .set("IMPORTER_CHECKSUM", format!("sha256:{sum}"));
    pod.run().ok();
    same_disk(pod.disk(), var("DISK_RAW"));

    let wrong = format!("sha256:{}", "0".repeat(64));
    let pod = Pod::new().http(url).set("IMPORTER_CHECKSUM", wrong);
    let r = pod.run();
    assert_eq!(
        r.code, 0,
        "a checksum mismatch exits 0 as CDI does: {}",
        r.stderr
    );
    let t = r.term.as_deref().unwrap();
    assert!(
        t.starts_with(r#"{"message":"Unable to process data: "#)
            && t.contains(&format!(
                "checksum mismatch: expected sha256:{}, calculated sha256:{sum}",
                "0".repeat(64)
            )),
        "{t}"
    );
    assert!(
        !pod.disk().exists(),
        "a disk with the wrong checksum was left"
    );
}

#[test]
fn hostile_and_failing_sources() {
    let http = var("HTTP_URL");
    // 404.
    Pod::new()
        .http(format!("{http}/missing.img"))
        .run()
        .failed("Unable to connect to http data source: expected status code 200, got 404");
    // A qcow2 naming a backing file (/etc/passwd) is refused and nothing is written.
    let pod = Pod::new().http(format!("{http}/backing.qcow2"));
    pod.run()
        .failed("Unable to process data:")
        .failed("backing");
    assert!(!pod.disk().exists());
    // A qcow2 whose data lives in an external data file on the host is refused too.
    let www = PathBuf::from(var("WWW"));
    let name = format!("datafile-{}.qcow2", std::process::id());
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o"])
        .arg(format!(
            "data_file={},data_file_raw=on",
            www.join(format!("{name}.data")).display()
        ))
        .arg(www.join(&name))
        .arg("16M")
        .status()
        .unwrap();
    assert!(st.success());
    let pod = Pod::new().http(format!("{http}/{name}"));
    pod.run()
        .failed("Unable to process data:")
        .failed("data file");
    assert!(!pod.disk().exists());
    // An image larger than the volume: CDI's text, before writing anything.
    let pod = Pod::new()
        .http(format!("{http}/disk.qcow2"))
        .set("IMPORTER_IMAGE_SIZE", "16Mi");
    pod.run()
        .failed("is larger than the reported available storage");
    assert!(!pod.disk().exists());
    // A 2 GiB zero bomb in 380 KiB of xz, for a 64 MiB volume.
    let pod = Pod::new()
        .http(format!("{http}/bomb.raw.xz"))
        .set("IMPORTER_IMAGE_SIZE", "64Mi");
    pod.run()
        .failed("is larger than the reported available storage");
    assert!(!pod.disk().exists());
    // A tar escaping its target.
    let pod = Pod::new()
        .http(format!("{http}/escape.tar"))
        .set("IMPORTER_CONTENTTYPE", "archive");
    pod.run().failed("Unable to process data:");
    assert!(!pod.root.join("evil").exists());
    // Nonsense (imageio and vddk: imageio_and_vddk_are_refused_as_connect_errors).
    // s3 and gcs exist (tests/sources.rs); without an endpoint they cannot connect.
    for src in ["s3", "gcs"] {
        Pod::new()
            .set("IMPORTER_SOURCE", src)
            .run()
            .failed(&format!("Unable to connect to {src} data source: "));
    }
    Pod::new()
        .set("IMPORTER_SOURCE", "glance")
        .run()
        .failed("Unknown data source: glance");
    // An invalid PREALLOCATION exits 1 with no termination message.
    let r = Pod::new()
        .http(format!("{http}/disk.raw"))
        .set("PREALLOCATION", "maybe")
        .run();
    assert_eq!((r.code, r.term.as_deref()), (1, None), "{}", r.stderr);
    // A body that stalls: the idle timeout ends the read and the download resumes.
    let pod = Pod::new()
        .http(format!(
            "{}/slow/disk.raw?run={}",
            var("FLAKY_URL"),
            std::process::id()
        ))
        .set("VDISK_IDLE_TIMEOUT", "1");
    pod.run().ok();
    same_disk(pod.disk(), var("DISK_RAW"));
}

/// A forward proxy on loopback: plain requests in absolute form are sent on to the origin,
/// CONNECT opens a tunnel. Returns its URL and the request lines it saw.
fn start_proxy() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Write};
    use std::net::{TcpListener, TcpStream};
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for client in l.incoming().flatten() {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(client.try_clone().unwrap());
                let mut head = Vec::new();
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let end = line == "\r\n";
                    head.push(line);
                    if end {
                        break;
                    }
                }
                let first = head[0].trim().to_string();
                log.lock().unwrap().push(head.concat());
                let mut parts = first.split(' ');
                let (method, target) = (parts.next().unwrap(), parts.next().unwrap());
                let mut client = client;
                let (authority, rest) = if method == "CONNECT" {
                    (target.to_string(), None)
                } else {
                    let t = target.strip_prefix("http://").unwrap();
                    let (a, p) = t.split_at(t.find('/').unwrap_or(t.len()));
                    (a.to_string(), Some(p.to_string()))
                };
                // Names under .proxied.test resolve only here, so a download that
                // succeeds through one proves it went through the proxy.
                let authority = match authority.split_once(".proxied.test:") {
                    Some((_, port)) => format!("127.0.0.1:{port}"),
                    None => authority,
                };
                let mut origin = TcpStream::connect(&authority).unwrap();
                match rest {
                    None => client
                        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .unwrap(),
                    Some(path) => {
                        head[0] = format!("{method} {path} HTTP/1.1\r\n");
                        origin.write_all(head.concat().as_bytes()).unwrap();
                    }
                }
                let buffered = r.buffer().to_vec();
                origin.write_all(&buffered).unwrap();
                let mut o2 = origin.try_clone().unwrap();
                let mut c2 = client.try_clone().unwrap();
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut r.into_inner(), &mut o2);
                    let _ = o2.shutdown(std::net::Shutdown::Write);
                });
                let _ = std::io::copy(&mut origin, &mut c2);
                let _ = c2.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (url, seen)
}

#[test]
fn proxies_from_the_environment() {
    let (proxy, seen) = start_proxy();
    let port = |v: &str| var(v).rsplit(':').next().unwrap().to_string();
    let http = format!("http://disk.proxied.test:{}", port("HTTP_URL"));
    let https = format!("https://disk.proxied.test:{}", port("HTTPS_URL"));
    // HTTP through the proxy (absolute-form request).
    let pod = Pod::new()
        .http(format!("{http}/disk.raw.gz"))
        .set("http_proxy", proxy.clone());
    pod.run().ok();
    same_disk(pod.disk(), var("DISK_RAW"));
    // HTTPS through a CONNECT tunnel, the CA from the proxy CA directory; the
    // upper-case name wins over the lower-case one, as in Go.
    let pod = Pod::new()
        .http(format!("{https}/disk.qcow2"))
        .set("HTTPS_PROXY", proxy.clone())
        .set("https_proxy", "http://127.0.0.1:9")
        .set("IMPORTER_PROXY_CERT_DIR", "/proxycerts/");
    std::fs::create_dir_all(pod.root.join("proxycerts")).unwrap();
    std::fs::copy(var("CA_CERT"), pod.root.join("proxycerts/ca.pem")).unwrap();
    pod.run().ok();
    same_disk(pod.disk(), var("DISK_QCOW2"));
    // no_proxy with a leading dot bypasses the proxy for subdomains: the name
    // then cannot be resolved, and the proxy never sees the request.
    let pod = Pod::new()
        .http(format!("{http}/disk.raw.zst"))
        .set("http_proxy", proxy.clone())
        .set("no_proxy", "example.org, .proxied.test");
    let r = pod.run();
    assert_ne!(r.code, 0, "{}", r.stderr);
    // Loopback is never proxied (Go's rule), whatever no_proxy says.
    let pod = Pod::new()
        .http(format!("{}/disk.raw.bz2-not-there", var("HTTP_URL")))
        .set("http_proxy", proxy.clone());
    let _ = pod.run();
    let seen_url = proxy.clone();
    // Extra headers from the environment and from secret files under /extraheaders.
    let pod = Pod::new()
        .http(format!("{http}/disk.raw.xz"))
        .set("http_proxy", seen_url)
        .set("IMPORTER_EXTRA_HEADER_0", "X-From-Env: one")
        .set("IMPORTER_EXTRA_HEADER_1", "not a header");
    std::fs::create_dir_all(pod.root.join("extraheaders/secret1")).unwrap();
    std::fs::write(
        pod.root.join("extraheaders/secret1/h"),
        "X-From-Secret: two\n",
    )
    .unwrap();
    std::fs::write(
        pod.root.join("extraheaders/secret1/.hidden"),
        "X-Hidden: no",
    )
    .unwrap();
    pod.run().ok();
    let seen = seen.lock().unwrap().clone();
    let xz = seen
        .iter()
        .find(|h| h.contains("/disk.raw.xz"))
        .expect("the xz request went through the proxy");
    assert!(
        xz.contains("X-From-Env: one\r\n") && xz.contains("X-From-Secret: two\r\n"),
        "{xz}"
    );
    assert!(
        !xz.contains("X-Hidden") && !xz.contains("not a header"),
        "{xz}"
    );
    assert!(
        seen.iter()
            .any(|l| l.starts_with("GET http://") && l.contains("/disk.raw.gz")),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|l| l.starts_with("CONNECT disk.proxied.test:")),
        "{seen:?}"
    );
    assert!(
        !seen.iter().any(|l| l.contains("disk.raw.zst")),
        "no_proxy ignored: {seen:?}"
    );
    assert!(
        !seen.iter().any(|l| l.contains("bz2-not-there")),
        "loopback went through the proxy: {seen:?}"
    );
}

#[test]
fn archives_unpack_into_the_data_directory() {
    let pod = Pod::new()
        .http(format!("{}/archive.tar", var("HTTP_URL")))
        .set("IMPORTER_CONTENTTYPE", "archive");
    let r = pod.run();
    assert_eq!(r.code, 0, "{}", r.stderr);
    let names: Vec<_> = std::fs::read_dir(pod.root.join("data"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    // Blank disks refuse archive content.
    Pod::new()
        .set("IMPORTER_SOURCE", "none")
        .set("IMPORTER_CONTENTTYPE", "archive")
        .run()
        .failed("Cannot create empty disk with content type archive");
}

#[test]
fn sizing_expands_to_the_usable_space() {
    // 100Mi requested with 6% overhead: usable = RoundDown(ceil(100Mi / 1.06), 1 MiB).
    let usable = vdisk::sizing::usable_space(0.06, 100 << 20);
    let pod = Pod::new()
        .http(format!("{}/disk.qcow2", var("HTTP_URL")))
        .set("IMPORTER_IMAGE_SIZE", "100Mi")
        .set("FILESYSTEM_OVERHEAD", "0.06");
    pod.run().ok();
    assert_eq!(std::fs::metadata(pod.disk()).unwrap().len(), usable);
    same_disk(pod.disk(), var("DISK_QCOW2"));
    // Preallocation: reported, and the whole disk allocated.
    let pod = Pod::new()
        .http(format!("{}/disk.raw.zst", var("HTTP_URL")))
        .set("IMPORTER_IMAGE_SIZE", "40Mi")
        .set("PREALLOCATION", "true");
    let r = pod.run();
    assert_eq!(
        r.term.as_deref(),
        Some(
            r#"{"scratchSpaceRequired":false,"preallocationApplied":true,"message":"Import Complete"}"#
        ),
        "{}",
        r.stderr
    );
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(pod.disk()).unwrap();
    assert!(m.blocks() * 512 >= m.len(), "not preallocated");
}

#[test]
fn blank_disks() {
    let pod = Pod::new()
        .set("IMPORTER_SOURCE", "none")
        .set("IMPORTER_IMAGE_SIZE", "100Mi")
        .set("FILESYSTEM_OVERHEAD", "0.06");
    let r = pod.run();
    assert_eq!(
        r.term.as_deref(),
        Some(r#"{"preallocationApplied":false,"message":"Import Complete"}"#),
        "{}",
        r.stderr
    );
    let m = std::fs::metadata(pod.disk()).unwrap();
    assert_eq!(m.len(), vdisk::sizing::usable_space(0.06, 100 << 20));
    assert_eq!(mode(&pod.disk()), 0o660);
    let pod = Pod::new()
        .set("IMPORTER_SOURCE", "none")
        .set("IMPORTER_IMAGE_SIZE", "8Mi")
        .set("PREALLOCATION", "true");
    let r = pod.run();
    assert!(
        r.term
            .as_deref()
            .unwrap()
            .contains(r#""preallocationApplied":true"#)
    );
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(pod.disk()).unwrap();
    assert!(m.blocks() * 512 >= m.len());
    // A block volume without preallocation: nothing written, no message; with it, zeroed.
    let pod = Pod::new().set("IMPORTER_SOURCE", "none");
    std::fs::write(pod.root.join("dev/cdi-block-volume"), vec![0xffu8; 1 << 20]).unwrap();
    let r = pod.run();
    assert_eq!((r.code, r.term.as_deref()), (0, None), "{}", r.stderr);
    let pod = pod.set("PREALLOCATION", "true");
    let r = pod.run();
    assert_eq!(r.code, 0, "{}", r.stderr);
    let dev = std::fs::read(pod.root.join("dev/cdi-block-volume")).unwrap();
    assert!(dev.iter().all(|&b| b == 0), "block volume not zeroed");
}

#[test]
fn block_volume_target() {
    let pod = Pod::new().http(format!("{}/disk.qcow2", var("HTTP_URL")));
    // A file standing in for /dev/cdi-block-volume, larger than the disk and not zero.
    let dev = pod.root.join("dev/cdi-block-volume");
    std::fs::write(&dev, vec![0x77u8; 80 << 20]).unwrap();
    pod.run().ok();
    assert!(!pod.disk().exists());
    // The image occupies the device's leading bytes (holes zeroed); the rest is untouched.
    let flat = pod.root.join("flat.raw");
    let st = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(var("DISK_QCOW2"))
        .arg(&flat)
        .status()
        .unwrap();
    assert!(st.success());
    let want = std::fs::read(&flat).unwrap();
    let got = std::fs::read(&dev).unwrap();
    assert_eq!(got.len(), 80 << 20);
    assert!(
        got[..want.len()] == want[..],
        "device content differs from the image"
    );
    assert!(
        got[want.len()..].iter().all(|&b| b == 0x77),
        "device tail was touched"
    );
}

#[test]
fn registry_container_disks() {
    let reg = var("REGISTRY");
    let pod_for = |image: &str| {
        Pod::new()
            .set("IMPORTER_SOURCE", "registry")
            .set("IMPORTER_ENDPOINT", format!("docker://{image}"))
            .set("INSECURE_TLS", "true")
    };
    for (tag, src) in [
        ("disks/qcow2:gzip", "DISK_QCOW2"),
        ("disks/qcow2:zstd", "DISK_QCOW2"),
        ("disks/raw:latest", "DISK_RAW"),
    ] {
        let pod = pod_for(&format!("{reg}/{tag}"));
        pod.run().ok();
        same_disk(pod.disk(), var(src));
        assert_eq!(mode(&pod.disk()), 0o660);
    }
    // Multi-arch: the requested architecture's disk.
    let pod = pod_for(&format!("{reg}/disks/multi:latest"))
        .set("IMPORTER_REGISTRY_IMAGE_ARCHITECTURE", "arm64");
    pod.run().ok();
    same_disk(pod.disk(), var("DISK_ARM"));
    pod_for(&format!("{reg}/disks/multi:latest"))
        .set("IMPORTER_REGISTRY_IMAGE_ARCHITECTURE", "s390x")
        .run()
        .failed("Error validating architecture");
    // Labels from the image env.
    let pod = pod_for(&format!("{reg}/disks/labels:latest"));
    let r = pod.run();
    assert_eq!(r.code, 0, "{}", r.stderr);
    let t = r.term.unwrap();
    assert!(
        t.contains(r#""labels":{"instancetype.kubevirt.io/default-preference":"fedora","preference.kubevirt.io/x":"y"}"#),
        "{t}"
    );
    // Refusals.
    pod_for(&format!("{reg}/disks/bootc:latest"))
        .run()
        .failed("bootc");
    pod_for(&format!("{reg}/disks/nodisk:latest"))
        .run()
        .failed("Failed to find VM disk image file in the container image");
    let pod = pod_for(&format!("{reg}/disks/backing:latest"));
    pod.run().failed("backing");
    assert!(!pod.disk().exists());
    pod_for(&format!("{reg}/disks/missing:latest"))
        .run()
        .failed("Unable to process data:");
    pod_for("not-a-reference")
        .set("IMPORTER_ENDPOINT", "http://x/y")
        .run()
        .failed("Invalid image name");
    // Archive content is not accepted from a registry.
    pod_for(&format!("{reg}/disks/raw:latest"))
        .set("IMPORTER_CONTENTTYPE", "archive")
        .run()
        .failed("kubevirt");
}

#[test]
fn registry_auth_tls_token_and_oci_archive() {
    // TLS registry with htpasswd: credentials and the test CA, verified.
    let pod = Pod::new()
        .set("IMPORTER_SOURCE", "registry")
        .set(
            "IMPORTER_ENDPOINT",
            format!("docker://{}/disks/qcow2:gzip", var("REGISTRY_AUTH")),
        )
        .set("IMPORTER_ACCESS_KEY_ID", "user")
        .set("IMPORTER_SECRET_KEY", "pass")
        .set("IMPORTER_CERT_DIR", "/certs");
    std::fs::create_dir_all(pod.root.join("certs")).unwrap();
    std::fs::copy(var("CA_CERT"), pod.root.join("certs/ca.crt")).unwrap();
    pod.run().ok();
    same_disk(pod.disk(), var("DISK_QCOW2"));
    // Without credentials: refused.
    let anon = Pod::new()
        .set("IMPORTER_SOURCE", "registry")
        .set(
            "IMPORTER_ENDPOINT",
            format!("docker://{}/disks/qcow2:gzip", var("REGISTRY_AUTH")),
        )
        .set("INSECURE_TLS", "true");
    anon.run().failed("Unable to process data:");
    // Token auth (Bearer from a token endpoint with basic credentials), plain HTTP.
    let pod = Pod::new()
        .set("IMPORTER_SOURCE", "registry")
        .set(
            "IMPORTER_ENDPOINT",
            format!("docker://{}/disks/qcow2:zstd", var("REGISTRY_TOKEN")),
        )
        .set("IMPORTER_ACCESS_KEY_ID", "user")
        .set("IMPORTER_SECRET_KEY", "pass")
        .set("INSECURE_TLS", "true");
    pod.run().ok();
    same_disk(pod.disk(), var("DISK_QCOW2"));
    // oci-archive: a local tar of an OCI layout.
    let pod = Pod::new().set("IMPORTER_SOURCE", "registry").set(
        "IMPORTER_ENDPOINT",
        format!("oci-archive:{}", var("OCI_ARCHIVE")),
    );
    pod.run().ok();
    same_disk(pod.disk(), var("DISK_QCOW2"));
}

#[test]
fn progress_metric_moves_and_never_goes_back() {
    let pod = Pod::new().http(format!("{}/paced/disk.raw", var("HTTP_URL")));
    let port = free_port();
    let child = pod
        .command(port)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen: Vec<f64> = Vec::new();
    let t0 = std::time::Instant::now();
    let mut child = child;
    while child.try_wait().unwrap().is_none() && t0.elapsed().as_secs() < 60 {
        let o = Command::new("curl")
            .args(["-sk", "--max-time", "2"])
            .arg(format!("https://127.0.0.1:{port}/metrics"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        for line in text.lines() {
            if let Some(v) =
                line.strip_prefix(r#"kubevirt_cdi_import_progress_total{ownerUID="uid-1"} "#)
            {
                seen.push(v.parse().unwrap());
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(150));
    }
    let out = child.wait_with_output().unwrap();
    pod.finish(out).ok();
    same_disk(pod.disk(), var("DISK_RAW"));
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "went backwards: {seen:?}"
    );
    assert!(seen.iter().all(|v| (0.0..=100.0).contains(v)), "{seen:?}");
    let distinct = {
        let mut d = seen.clone();
        d.dedup();
        d.len()
    };
    assert!(
        distinct >= 3,
        "the metric did not move during the import: {seen:?}"
    );
}

#[test]
fn imageio_and_vddk_are_refused_as_connect_errors() {
    for (source, why) in [
        ("imageio", "it needs the oVirt engine's API"),
        ("vddk", "it needs VMware's closed VDDK library"),
    ] {
        let pod = Pod::new().set("IMPORTER_SOURCE", source).set(
            "IMPORTER_ENDPOINT",
            "https://engine.example/ovirt-engine/api",
        );
        let r = pod.run();
        r.failed(&format!(
            "Unable to connect to {source} data source: vdisk cannot import from"
        ));
        let t = r.term.as_deref().unwrap();
        assert!(t.starts_with("Unable to connect to"), "{t}");
        assert!(t.contains(why), "{t}");
        assert!(
            t.ends_with(&format!(
                "(not supported by this importer; use CDI's own importer image for {source} imports)"
            )),
            "{t}"
        );
        assert!(!pod.disk().exists());
    }
}

#[test]
fn logs_are_klog_lines_and_follow_the_verbosity() {
    let pod = Pod::new().set("IMPORTER_SOURCE", "imageio");
    // The harness passes -v=3; a later -v wins, as with Go's flag package.
    let quiet = pod.finish(pod.command(free_port()).arg("-v=0").output().unwrap());
    let verbose = pod.finish(pod.command(free_port()).output().unwrap());
    for r in [&quiet, &verbose] {
        assert_eq!(r.code, 1, "{}", r.stderr);
        assert!(!r.stderr.is_empty());
        for l in r.stderr.lines() {
            assert!(common::is_klog_line(l), "not a klog line: {l:?}");
        }
        // The failure is an E line naming the binary's source file.
        assert!(
            r.stderr.lines().any(|l| l.starts_with('E')
                && l.contains(" main.rs:")
                && l.contains("] Unable to connect to imageio data source:")),
            "{}",
            r.stderr
        );
    }
    // V(1) lines (the effective configuration) only at -v ≥ 1.
    assert!(!quiet.stderr.contains("] config: "), "{}", quiet.stderr);
    assert!(
        verbose
            .stderr
            .contains("] config: source=Other(\"imageio\")"),
        "{}",
        verbose.stderr
    );
}

#[test]
fn other_formats_cdi_accepts() {
    // VMware, Hyper-V/Azure and VirtualBox disks, as CDI users import them: over HTTP
    // (VHDX also gzip-compressed) and a streamOptimized VMDK inside a containerDisk.
    let http = var("HTTP_URL");
    for file in [
        "disk.vmdk",
        "disk.vhd",
        "disk.vhdx",
        "disk.vdi",
        "disk.vhdx.gz",
    ] {
        let pod = Pod::new().http(format!("{http}/{file}"));
        let run = pod.run();
        run.ok();
        // Read front to back as it downloads: no spool file.
        assert!(!run.stderr.contains("spooling"), "{file}: {}", run.stderr);
        same_disk(pod.disk(), var("DISK_QCOW2"));
    }
    let pod = Pod::new()
        .set("IMPORTER_SOURCE", "registry")
        .set(
            "IMPORTER_ENDPOINT",
            format!("docker://{}/disks/vmdk:latest", var("REGISTRY")),
        )
        .set("INSECURE_TLS", "true");
    let run = pod.run();
    run.ok();
    assert!(!run.stderr.contains("spooling"), "{}", run.stderr);
    same_disk(pod.disk(), var("DISK_QCOW2"));
}
