//! `vdisk-importer`'s object-storage sources end to end, against real servers on loopback:
//! moto in server mode for `s3` (with IAM authentication on, so moto recomputes every
//! request's SigV4 signature with the secret it issued and refuses a wrong one; over plain
//! HTTP and HTTPS with a test CA, plus one without authentication for anonymous reads) and
//! gcp-storage-emulator for `gcs` (anonymous, and with a service-account key whose JWT
//! `scripts/gcs-token.py` verifies before issuing a token that it then demands in front of
//! the emulator). Each case runs the binary as CDI's pod would (env vars, paths moved under
//! `VDISK_ROOT`) and checks the disk with `qemu-img compare`, the termination message, the
//! exit code, and that a failed import leaves nothing on the volume.
//!
//! The servers come from `scripts/pyservices.sh` (which installs them into a venv): the
//! test script starts them and names their state directory in `VDISK_PYSERVICES`; without
//! it this file starts its own set and stops it when the tests end. A missing server or
//! tool fails the tests, never skips them.

mod common;

use common::{free_port, same_disk};

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::services::object_store_var as var;

fn run_ok(cmd: &mut Command) -> Output {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// A 16 MiB qcow2 with a few MiB of patterned data, in `dir`.
fn make_qcow2(dir: &Path) -> PathBuf {
    let p = dir.join("src.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&p)
            .arg("16M"),
    );
    run_ok(
        Command::new("qemu-io")
            .args(["-c", "write -P 0x5a 1M 2M", "-c", "write -P 0xa5 9M 1M"])
            .arg(&p),
    );
    p
}

/// Upload `file` to moto as `bucket/key` with boto3 and the test user's keys.
fn s3_put(bucket: &str, key: &str, file: &Path) {
    s3_put_to(&var("S3_URL"), "", bucket, key, file, &[])
}

/// Upload to the moto at `url`, with the keys of `S3{keys}_ACCESS_KEY` (`""` or `"_TLS"`).
fn s3_put_to(url: &str, keys: &str, bucket: &str, key: &str, file: &Path, acl: &[&str]) {
    run_ok(
        Command::new(var("PYTHON"))
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/s3-put.py"))
            .arg(url)
            .args([bucket, key])
            .arg(file)
            .args(acl)
            .env("AWS_ACCESS_KEY_ID", var(&format!("S3{keys}_ACCESS_KEY")))
            .env(
                "AWS_SECRET_ACCESS_KEY",
                var(&format!("S3{keys}_SECRET_KEY")),
            )
            .env("AWS_CA_BUNDLE", var("S3_CA_CERT")),
    );
}

/// Create `bucket` in the GCS emulator and upload `file` as `name` (JSON API).
fn gcs_put(bucket: &str, name: &str, file: &Path) {
    let c = vdisk::net::http::Client::new(Default::default()).unwrap();
    let base = var("GCS_URL");
    let body = format!(r#"{{"name":"{bucket}"}}"#);
    let r = c
        .send_body(
            "POST",
            &format!("{base}/storage/v1/b?project=test"),
            &[("Content-Type", "application/json")],
            &mut body.as_bytes(),
            Some(body.len() as u64),
        )
        .unwrap();
    assert!(matches!(r.status, 200 | 409), "create bucket: {}", r.status);
    let data = std::fs::read(file).unwrap();
    let r = c
        .send_body(
            "POST",
            &format!("{base}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={name}"),
            &[("Content-Type", "application/octet-stream")],
            &mut data.as_slice(),
            Some(data.len() as u64),
        )
        .unwrap();
    assert_eq!(r.status, 200, "upload {name}");
}

/// A pod's file system: `VDISK_ROOT` with `/data` and the termination log's directory.
struct Pod {
    _dir: tempfile::TempDir,
    root: PathBuf,
    env: Vec<(String, String)>,
}

struct Run {
    code: i32,
    term: String,
    stderr: String,
}

impl Pod {
    fn new(source: &str, endpoint: impl Into<String>) -> Pod {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        std::fs::create_dir_all(root.join("data")).unwrap();
        std::fs::create_dir_all(root.join("dev")).unwrap();
        Pod {
            _dir: dir,
            root,
            env: vec![
                ("IMPORTER_SOURCE".into(), source.into()),
                ("IMPORTER_ENDPOINT".into(), endpoint.into()),
            ],
        }
    }
    fn set(mut self, k: &str, v: impl Into<String>) -> Pod {
        self.env.push((k.to_string(), v.into()));
        self
    }
    fn s3_keys(self, secret: &str) -> Pod {
        self.set("IMPORTER_ACCESS_KEY_ID", var("S3_ACCESS_KEY"))
            .set("IMPORTER_SECRET_KEY", secret)
    }
    fn run(&self) -> Run {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vdisk-importer"));
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("VDISK_ROOT", &self.root)
            .env("VDISK_METRICS_PORT", free_port().to_string())
            .env("IMPORTER_CONTENTTYPE", "kubevirt")
            .env("OWNER_UID", "uid-1")
            .env("FILESYSTEM_OVERHEAD", "0")
            .env("PREALLOCATION", "false")
            .args(["-v=3", "-alsologtostderr"]);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            term: std::fs::read_to_string(self.root.join("dev/termination-log"))
                .unwrap_or_default(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
    fn disk(&self) -> PathBuf {
        self.root.join("data/disk.img")
    }
    /// The volume holds nothing (no disk, no temporary file).
    fn assert_empty(&self) {
        let left: Vec<_> = std::fs::read_dir(self.root.join("data"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "left on the volume: {left:?}");
    }
}

impl Run {
    fn ok(&self) {
        assert_eq!(
            self.code, 0,
            "importer failed: {}\n{}",
            self.term, self.stderr
        );
        assert_eq!(
            self.term,
            r#"{"scratchSpaceRequired":false,"preallocationApplied":false,"message":"Import Complete"}"#,
            "{}",
            self.stderr
        );
    }
    fn failed(&self, prefix: &str, text: &str) {
        assert_eq!(self.code, 1, "{}\n{}", self.term, self.stderr);
        assert!(
            self.term.starts_with(prefix) && self.term.contains(text),
            "termination message {:?} should start with {prefix:?} and contain {text:?}",
            self.term
        );
    }
}

const S3_FAIL: &str = "Unable to connect to s3 data source: ";
const GCS_FAIL: &str = "Unable to connect to gcs data source: ";

#[test]
fn s3_signed_import_writes_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let src = make_qcow2(dir.path());
    s3_put("signed", "images/disk one.qcow2", &src);
    let url = format!("{}/signed/images/disk%20one.qcow2", var("S3_URL"));
    let pod = Pod::new("s3", url).s3_keys(&var("S3_SECRET_KEY"));
    pod.run().ok();
    same_disk(pod.disk(), &src);

    // content type archive: a tar unpacked into /data.
    let tar_path = dir.path().join("a.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&tar_path).unwrap());
    let mut h = tar::Header::new_gnu();
    h.set_size(5);
    h.set_mode(0o644);
    b.append_data(&mut h, "hello.txt", &b"hello"[..]).unwrap();
    b.into_inner().unwrap();
    s3_put("signed", "a.tar", &tar_path);
    let pod = Pod::new("s3", format!("{}/signed/a.tar", var("S3_URL")))
        .s3_keys(&var("S3_SECRET_KEY"))
        .set("IMPORTER_CONTENTTYPE", "archive");
    let r = pod.run();
    assert_eq!(r.code, 0, "{}\n{}", r.term, r.stderr);
    assert_eq!(
        std::fs::read(pod.root.join("data/hello.txt")).unwrap(),
        b"hello"
    );
}

/// A TCP relay to `upstream` whose first connection delivers `cut` bytes of the answer,
/// stalls for a little over a second (so a fresh signature has a new `x-amz-date`), then
/// drops; later connections go through whole. Records each request head.
fn cutting_relay(upstream: String, cut: usize) -> (u16, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    std::thread::spawn(move || {
        for (i, client) in l.incoming().enumerate() {
            let Ok(mut client) = client else { return };
            let upstream = upstream.clone();
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut server = TcpStream::connect(&upstream).unwrap();
                // The request (a GET, no body): read its head, record it, pass it on.
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && client.read(&mut b).unwrap_or(0) == 1 {
                    head.push(b[0]);
                }
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&head).into_owned());
                server.write_all(&head).unwrap();
                let mut buf = vec![0u8; 64 << 10];
                let mut sent = 0;
                loop {
                    let n = server.read(&mut buf).unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    let n = if i == 0 { n.min(cut - sent) } else { n };
                    if client.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    sent += n;
                    if i == 0 && sent >= cut {
                        std::thread::sleep(Duration::from_millis(1100));
                        break;
                    }
                }
                let _ = client.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (port, heads)
}

#[test]
fn s3_resume_is_signed_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let src = make_qcow2(dir.path());
    s3_put("resume", "disk.qcow2", &src);
    let upstream = var("S3_URL").trim_start_matches("http://").to_string();
    let (port, heads) = cutting_relay(upstream, 1 << 20);
    let url = format!("http://127.0.0.1:{port}/resume/disk.qcow2");
    let pod = Pod::new("s3", url).s3_keys(&var("S3_SECRET_KEY"));
    pod.run().ok();
    same_disk(pod.disk(), &src);
    let heads = heads.lock().unwrap();
    assert_eq!(heads.len(), 2, "one resume expected: {heads:?}");
    let auth = |h: &str| {
        h.lines()
            .find(|l| l.to_ascii_lowercase().starts_with("authorization:"))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no Authorization in {h}"))
    };
    assert!(heads[1].contains("Range: bytes="), "{}", heads[1]);
    // A new signature (later x-amz-date), which moto checked before answering 206.
    assert_ne!(auth(&heads[0]), auth(&heads[1]));
}

#[test]
fn s3_without_keys_reads_anonymously() {
    // The moto that checks signatures cannot serve anonymous reads (it fails on the missing
    // Authorization header), so this reads from the one without authentication, through a
    // relay that shows the request carries no credentials.
    let dir = tempfile::tempdir().unwrap();
    let src = make_qcow2(dir.path());
    s3_put_to(
        &var("S3_OPEN_URL"),
        "",
        "public",
        "disk.qcow2",
        &src,
        &["public-read"],
    );
    let upstream = var("S3_OPEN_URL").trim_start_matches("http://").to_string();
    let (port, heads) = cutting_relay(upstream, usize::MAX / 2);
    let pod = Pod::new("s3", format!("http://127.0.0.1:{port}/public/disk.qcow2"));
    pod.run().ok();
    same_disk(pod.disk(), &src);
    let heads = heads.lock().unwrap();
    assert_eq!(heads.len(), 1);
    let h = heads[0].to_ascii_lowercase();
    assert!(!h.contains("authorization") && !h.contains("x-amz-"), "{h}");
}

#[test]
fn s3_over_https_with_the_cert_dir_ca() {
    let dir = tempfile::tempdir().unwrap();
    let src = make_qcow2(dir.path());
    s3_put_to(&var("S3_TLS_URL"), "_TLS", "tls", "disk.qcow2", &src, &[]);
    let url = format!("{}/tls/disk.qcow2", var("S3_TLS_URL"));
    let pod = Pod::new("s3", &url)
        .set("IMPORTER_ACCESS_KEY_ID", var("S3_TLS_ACCESS_KEY"))
        .set("IMPORTER_SECRET_KEY", var("S3_TLS_SECRET_KEY"))
        .set("IMPORTER_CERT_DIR", "/certs");
    std::fs::create_dir_all(pod.root.join("certs")).unwrap();
    std::fs::copy(var("S3_CA_CERT"), pod.root.join("certs/ca.crt")).unwrap();
    pod.run().ok();
    same_disk(pod.disk(), &src);
    // Without the CA the server is not trusted.
    let pod = Pod::new("s3", &url)
        .set("IMPORTER_ACCESS_KEY_ID", var("S3_TLS_ACCESS_KEY"))
        .set("IMPORTER_SECRET_KEY", var("S3_TLS_SECRET_KEY"));
    pod.run().failed(S3_FAIL, "TLS");
    pod.assert_empty();
}

#[test]
fn s3_wrong_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = make_qcow2(dir.path());
    s3_put("wrongkeys", "disk.qcow2", &src);
    let url = format!("{}/wrongkeys/disk.qcow2", var("S3_URL"));
    // moto recomputes the signature with the secret it issued: a wrong secret must fail.
    let mut wrong = var("S3_SECRET_KEY");
    wrong.replace_range(..1, if wrong.starts_with('x') { "y" } else { "x" });
    let pod = Pod::new("s3", &url).s3_keys(&wrong);
    pod.run().failed(S3_FAIL, "SignatureDoesNotMatch");
    pod.assert_empty();
    // An access key moto never issued.
    let pod = Pod::new("s3", &url)
        .set("IMPORTER_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
        .set("IMPORTER_SECRET_KEY", var("S3_SECRET_KEY"));
    pod.run().failed(S3_FAIL, "InvalidAccessKeyId");
    pod.assert_empty();
}

#[test]
fn s3_missing_bucket_or_key_fails() {
    let dir = tempfile::tempdir().unwrap();
    let src = make_qcow2(dir.path());
    s3_put("present", "disk.qcow2", &src);
    for (path, code) in [
        ("absent-bucket/disk.qcow2", "NoSuchBucket"),
        ("present/absent.qcow2", "NoSuchKey"),
    ] {
        let pod =
            Pod::new("s3", format!("{}/{path}", var("S3_URL"))).s3_keys(&var("S3_SECRET_KEY"));
        pod.run().failed(S3_FAIL, code);
        pod.assert_empty();
    }
    // An endpoint without a key is refused before any request.
    let pod = Pod::new("s3", format!("{}/present", var("S3_URL"))).s3_keys("x");
    pod.run().failed(S3_FAIL, "bucket/key");
    pod.assert_empty();
}

#[test]
fn gcs_anonymous_import_writes_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let src = make_qcow2(dir.path());
    gcs_put("anon", "dir/disk.qcow2", &src);
    for ep in [
        "gs://anon/dir/disk.qcow2",
        "https://storage.cloud.google.com/anon/dir/disk.qcow2",
    ] {
        let pod = Pod::new("gcs", ep).set("STORAGE_EMULATOR_HOST", var("GCS_URL"));
        pod.run().ok();
        same_disk(pod.disk(), &src);
    }
    let pod =
        Pod::new("gcs", "gs://anon/dir/absent.qcow2").set("STORAGE_EMULATOR_HOST", var("GCS_URL"));
    pod.run().failed(GCS_FAIL, "404");
    pod.assert_empty();
}

/// `scripts/gcs-token.py` in front of the emulator, trusting `public_key`.
struct Gate {
    child: Child,
    port: u16,
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_gate(dir: &Path, public_key: &Path, email: &str) -> Gate {
    let port_file = dir.join("gate.port");
    let child = Command::new(var("PYTHON"))
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gcs-token.py"))
        .arg("--public-key")
        .arg(public_key)
        .args([
            "--email",
            email,
            "--upstream",
            &var("GCS_URL"),
            "--port-file",
        ])
        .arg(&port_file)
        .spawn()
        .expect("run scripts/gcs-token.py with the venv's python");
    let mut gate = Gate { child, port: 0 };
    let t0 = Instant::now();
    while gate.port == 0 {
        if let Ok(p) = std::fs::read_to_string(&port_file) {
            gate.port = p.trim().parse().unwrap();
        } else if let Some(st) = gate.child.try_wait().unwrap() {
            panic!("scripts/gcs-token.py exited: {st}");
        } else {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "gcs-token.py did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    gate
}

fn rsa_key(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}.pem"));
    let public = dir.join(format!("{name}.pub"));
    run_ok(
        Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&key),
    );
    run_ok(
        Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&key)
            .arg("-out")
            .arg(&public),
    );
    (key, public)
}

/// A pod whose `/google/credentials.json` is a service-account key file.
fn pod_with_key(endpoint: &str, key: &Path, email: &str, token_uri: &str) -> Pod {
    let pod =
        Pod::new("gcs", endpoint).set("GOOGLE_APPLICATION_CREDENTIALS", "/google/credentials.json");
    let json = serde_json::json!({
        "type": "service_account",
        "project_id": "test",
        "client_email": email,
        "private_key": std::fs::read_to_string(key).unwrap(),
        "token_uri": token_uri,
    });
    std::fs::create_dir_all(pod.root.join("google")).unwrap();
    std::fs::write(pod.root.join("google/credentials.json"), json.to_string()).unwrap();
    pod
}

#[test]
fn gcs_service_account_token_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let src = make_qcow2(dir.path());
    gcs_put("keyed", "disk.qcow2", &src);
    let email = "importer@test.iam.gserviceaccount.com";
    let (key, public) = rsa_key(dir.path(), "sa");
    let gate = start_gate(dir.path(), &public, email);
    let gate_url = format!("http://127.0.0.1:{}", gate.port);
    let token_uri = format!("{gate_url}/token");

    // The token endpoint checks the JWT's signature and claims; the gate then wants the
    // token it issued.
    let pod = pod_with_key("gs://keyed/disk.qcow2", &key, email, &token_uri)
        .set("STORAGE_EMULATOR_HOST", &gate_url);
    pod.run().ok();
    same_disk(pod.disk(), &src);

    // Without the key the gate refuses.
    let pod = Pod::new("gcs", "gs://keyed/disk.qcow2").set("STORAGE_EMULATOR_HOST", &gate_url);
    pod.run().failed(GCS_FAIL, "401");
    pod.assert_empty();

    // A key the endpoint does not know: the signature check fails, no token.
    let (other, _) = rsa_key(dir.path(), "other");
    let pod = pod_with_key("gs://keyed/disk.qcow2", &other, email, &token_uri)
        .set("STORAGE_EMULATOR_HOST", &gate_url);
    pod.run().failed(GCS_FAIL, "bad signature");
    pod.assert_empty();

    // The right key for another account: the claims check fails.
    let pod = pod_with_key("gs://keyed/disk.qcow2", &key, "someone@else", &token_uri)
        .set("STORAGE_EMULATOR_HOST", &gate_url);
    pod.run().failed(GCS_FAIL, "claim iss");
    pod.assert_empty();

    // A key file that is not one.
    let pod = Pod::new("gcs", "gs://keyed/disk.qcow2")
        .set("GOOGLE_APPLICATION_CREDENTIALS", "/google/credentials.json")
        .set("STORAGE_EMULATOR_HOST", &gate_url);
    std::fs::create_dir_all(pod.root.join("google")).unwrap();
    std::fs::write(pod.root.join("google/credentials.json"), "{}").unwrap();
    pod.run().failed(GCS_FAIL, "client_email");
    pod.assert_empty();
}
