//! `vdisk-uploader` end to end: the binary runs as CDI's upload pod would (env vars, paths
//! moved under `VDISK_ROOT`, certificates at `/etc/tls`), and real clients talk to it over
//! mutual TLS: curl (raw bodies, forms, archives, clones), a hand-written rustls client for
//! uploads that pause or break off midway, and `vdisk upload`. Every successful case checks
//! the disk against its source (`qemu-img compare`, or byte for byte for clones), the
//! termination message exactly, and exit 0.
//!
//! Certificates are made here with rcgen: a server CA signing the server's certificate
//! (`localhost`, 127.0.0.1), a client CA signing the proxy's client certificate
//! (`client.upload-server.cdi.kubevirt.io`), a clone source's certificate and one with a wrong
//! CN, and a second client CA signing a certificate with the right CN. Images come from
//! qemu-img, gzip, xz, zstd and tar at test time.

mod common;

use common::{free_port, same_disk};

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The CN the upload proxy's client certificate carries.
const PROXY_CN: &str = "client.upload-server.cdi.kubevirt.io";
/// The CN of a clone source (`<srcNs>/<srcName>-<ns>/<name>`).
const CLONE_CN: &str = "src-ns/src-pvc-dst-ns/dst-pvc";

const UPLOAD_COMPLETE: &str = r#"{"preallocationApplied":false,"message":"Upload Complete"}"#;
const CLONE_COMPLETE: &str = r#"{"preallocationApplied":false,"message":"Clone Complete"}"#;
/// A filesystem clone into `/data` is unpacked with tar, which CDI reports as preallocated.
const FS_CLONE_COMPLETE: &str = r#"{"preallocationApplied":true,"message":"Clone Complete"}"#;
const DEADLINE_PASSED: &str = r#"{"deadlinePassed":true,"message":"Deadline Passed"}"#;
const SAVE_FAILED: &str = "Saving stream failed: ";
const TOO_LARGE: &str =
    "Saving stream failed: effective image size is larger than the reported available storage: ";

const MIB: u64 = 1 << 20;
const DISK_SIZE: u64 = 64 * MIB;

// ---------------------------------------------------------------------------------------------
// Fixtures: certificates and images, made once per test process
// ---------------------------------------------------------------------------------------------

/// A certificate and its key, as PEM files (for curl) and DER (for rustls).
struct Identity {
    cert: PathBuf,
    key: PathBuf,
    cert_der: rustls::pki_types::CertificateDer<'static>,
    key_der: Vec<u8>,
}

struct Fixtures {
    server_ca: PathBuf,
    server_ca_der: rustls::pki_types::CertificateDer<'static>,
    server_cert_pem: String,
    server_key_pem: String,
    client_ca_pem: String,
    /// Right CA, CN `client.upload-server.cdi.kubevirt.io`.
    proxy: Identity,
    /// Right CA, the clone source's CN.
    clone: Identity,
    /// Right CA, wrong CN.
    wrong_cn: Identity,
    /// Right CN from another CA.
    other_ca: Identity,
    /// 64 MiB raw, sparse, a few MiB of data (compressible and not) at several offsets.
    raw: PathBuf,
    qcow2: PathBuf,
    /// zlib-compressed clusters (`qemu-img convert -c`).
    compressed: PathBuf,
    raw_gz: PathBuf,
    raw_xz: PathBuf,
    raw_zst: PathBuf,
    /// A qcow2 whose backing file is `/etc/passwd`.
    backing: PathBuf,
    /// The tree the archives hold: `a.txt`, `sub/b.bin`.
    tree: PathBuf,
    archive_tar: PathBuf,
    archive_tar_zst: PathBuf,
    /// The tree a filesystem clone sends: `other.txt`, then `disk.img` (a copy of `raw`).
    fs_tree: PathBuf,
    /// `tar -cS other.txt disk.img` (what cdi-cloner sends), snappy framed.
    fs_clone: PathBuf,
    /// `raw`, snappy framed (a block device clone's body).
    block_clone: PathBuf,
}

static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
static FIXTURE_DIR: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_fixtures() {
    if let Some(d) = FIXTURE_DIR.get() {
        let _ = std::fs::remove_dir_all(d);
    }
}

fn fx() -> &'static Fixtures {
    FIXTURES.get_or_init(make_fixtures)
}

fn run_ok(cmd: &mut Command) {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", cmd.get_program()));
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `tool args... < input > output`, for the compressors.
fn compress(tool: &str, args: &[&str], input: &Path, output: &Path) {
    let o = Command::new(tool)
        .args(args)
        .stdin(std::fs::File::open(input).unwrap())
        .stdout(std::fs::File::create(output).unwrap())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    assert!(
        o.status.success(),
        "{tool} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Deterministic bytes: a xorshift stream (incompressible) or a ramp (compressible).
fn pattern(len: usize, seed: u64, random: bool) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|i| {
            if random {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            } else {
                ((i / 512) as u8).wrapping_mul(31) ^ (i % 251) as u8 ^ seed as u8
            }
        })
        .collect()
}

fn snappy(input: &Path, output: &Path) {
    let mut enc = snap::write::FrameEncoder::new(std::fs::File::create(output).unwrap());
    std::io::copy(&mut std::fs::File::open(input).unwrap(), &mut enc).unwrap();
    enc.into_inner().unwrap().sync_all().unwrap();
}

fn ca(cn: &str) -> (rcgen::Issuer<'static, rcgen::KeyPair>, String, Vec<u8>) {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    let der = cert.der().to_vec();
    (rcgen::Issuer::new(p, key), cert.pem(), der)
}

/// A leaf signed by `issuer`: `(cert_pem, key_pem, cert_der, pkcs8_der)`.
fn leaf(
    issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
    cn: &str,
    server: bool,
) -> (
    String,
    String,
    rustls::pki_types::CertificateDer<'static>,
    Vec<u8>,
) {
    let sans = if server {
        vec!["localhost".to_string()]
    } else {
        Vec::new()
    };
    let mut p = rcgen::CertificateParams::new(sans).unwrap();
    if server {
        p.subject_alt_names
            .push(rcgen::SanType::IpAddress(std::net::IpAddr::from([
                127, 0, 0, 1,
            ])));
    }
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![if server {
        rcgen::ExtendedKeyUsagePurpose::ServerAuth
    } else {
        rcgen::ExtendedKeyUsagePurpose::ClientAuth
    }];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, issuer).unwrap();
    (
        cert.pem(),
        key.serialize_pem(),
        cert.der().clone(),
        key.serialize_der(),
    )
}

fn identity(
    dir: &Path,
    name: &str,
    issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
    cn: &str,
) -> Identity {
    let (cert_pem, key_pem, cert_der, key_der) = leaf(issuer, cn, false);
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, cert_pem).unwrap();
    std::fs::write(&key, key_pem).unwrap();
    Identity {
        cert,
        key,
        cert_der,
        key_der,
    }
}

fn make_fixtures() -> Fixtures {
    let dir = tempfile::Builder::new()
        .prefix("vdisk-uploader-fx")
        .tempdir()
        .unwrap()
        .keep();
    FIXTURE_DIR.set(dir.clone()).unwrap();
    // SAFETY: registering a plain extern "C" function with no captured state.
    unsafe { libc::atexit(remove_fixtures) };

    // Certificates.
    let (server_issuer, server_ca_pem, server_ca_der) = ca("upload-server CA");
    let (client_issuer, client_ca_pem, _) = ca("upload-client CA");
    let (stranger_issuer, _, _) = ca("some other CA");
    let server_ca = dir.join("server-ca.crt");
    std::fs::write(&server_ca, &server_ca_pem).unwrap();
    let (server_cert_pem, server_key_pem, _, _) = leaf(&server_issuer, "cdi-upload-dv", true);
    let proxy = identity(&dir, "proxy", &client_issuer, PROXY_CN);
    let clone = identity(&dir, "clone", &client_issuer, CLONE_CN);
    let wrong_cn = identity(&dir, "wrong-cn", &client_issuer, "someone.else.example");
    let other_ca = identity(&dir, "other-ca", &stranger_issuer, PROXY_CN);

    // The raw source: sparse, data at several offsets, compressible and not.
    let raw = dir.join("disk.raw");
    {
        let f = std::fs::File::create(&raw).unwrap();
        f.set_len(DISK_SIZE).unwrap();
        for (off, len, seed, random) in [
            (0, 2 * MIB as usize, 3, false),
            (5 * MIB + 4096, MIB as usize, 7, true),
            (20 * MIB, 512 << 10, 11, false),
            (33 * MIB + 512, 300 << 10, 13, true),
            (DISK_SIZE - (64 << 10), 64 << 10, 17, false),
        ] {
            f.write_all_at(&pattern(len, seed, random), off).unwrap();
        }
        f.sync_all().unwrap();
    }
    let qcow2 = dir.join("disk.qcow2");
    let compressed = dir.join("compressed.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&qcow2),
    );
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-c", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&compressed),
    );
    let raw_gz = dir.join("disk.raw.gz");
    let raw_xz = dir.join("disk.raw.xz");
    let raw_zst = dir.join("disk.raw.zst");
    compress("gzip", &["-c"], &raw, &raw_gz);
    compress("xz", &["-c", "-T2"], &raw, &raw_xz);
    compress("zstd", &["-q", "-c"], &raw, &raw_zst);
    let backing = dir.join("backing.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args([
                "create",
                "-f",
                "qcow2",
                "-u",
                "-b",
                "/etc/passwd",
                "-F",
                "raw",
            ])
            .arg(&backing)
            .arg("64M"),
    );

    // Archives.
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("a.txt"), b"hello from the archive\n").unwrap();
    std::fs::write(tree.join("sub/b.bin"), pattern(100 << 10, 5, true)).unwrap();
    let archive_tar = dir.join("archive.tar");
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&tree)
            .arg("-cf")
            .arg(&archive_tar)
            .args(["a.txt", "sub"]),
    );
    let archive_tar_zst = dir.join("archive.tar.zst");
    compress("zstd", &["-q", "-c"], &archive_tar, &archive_tar_zst);

    // Clone bodies.
    let fs_tree = dir.join("fs-tree");
    std::fs::create_dir_all(&fs_tree).unwrap();
    std::fs::write(fs_tree.join("other.txt"), b"not the disk\n").unwrap();
    run_ok(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(&raw)
            .arg(fs_tree.join("disk.img")),
    );
    let fs_tar = dir.join("fs-clone.tar");
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&fs_tree)
            .arg("-cS")
            .arg("-f")
            .arg(&fs_tar)
            .args(["other.txt", "disk.img"]),
    );
    let fs_clone = dir.join("fs-clone.tar.sz");
    snappy(&fs_tar, &fs_clone);
    let block_clone = dir.join("block-clone.sz");
    snappy(&raw, &block_clone);

    Fixtures {
        server_ca,
        server_ca_der: rustls::pki_types::CertificateDer::from(server_ca_der),
        server_cert_pem,
        server_key_pem,
        client_ca_pem,
        proxy,
        clone,
        wrong_cn,
        other_ca,
        raw,
        qcow2,
        compressed,
        raw_gz,
        raw_xz,
        raw_zst,
        backing,
        tree,
        archive_tar,
        archive_tar_zst,
        fs_tree,
        fs_clone,
        block_clone,
    }
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

// ---------------------------------------------------------------------------------------------
// The pod and the running server
// ---------------------------------------------------------------------------------------------

/// A pod's file system under `VDISK_ROOT`: `/data`, `/dev`, `/etc/tls/{tls.crt,tls.key,ca.crt}`.
struct Pod {
    _dir: tempfile::TempDir,
    root: PathBuf,
    env: Vec<(String, String)>,
    args: Vec<String>,
}

impl Pod {
    fn new() -> Pod {
        let f = fx();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        for d in ["data", "dev", "etc/tls"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("etc/tls/tls.crt"), &f.server_cert_pem).unwrap();
        std::fs::write(root.join("etc/tls/tls.key"), &f.server_key_pem).unwrap();
        std::fs::write(root.join("etc/tls/ca.crt"), &f.client_ca_pem).unwrap();
        let pod = Pod {
            _dir: dir,
            root,
            env: Vec::new(),
            args: vec!["-v=3".into(), "-alsologtostderr".into()],
        };
        pod.set("LISTEN_ADDRESS", "127.0.0.1")
            .set("TLS_CERT_FILE", "/etc/tls/tls.crt")
            .set("TLS_KEY_FILE", "/etc/tls/tls.key")
            .set("CLIENT_CERT_FILE", "/etc/tls/ca.crt")
            .set("CLIENT_NAME", PROXY_CN)
            .set("UPLOAD_IMAGE_SIZE", "100Mi")
            .set("FILESYSTEM_OVERHEAD", "0")
            .set("PREALLOCATION", "false")
    }

    fn set(mut self, k: &str, v: impl Into<String>) -> Pod {
        self.env.retain(|(n, _)| n != k);
        self.env.push((k.to_string(), v.into()));
        self
    }

    fn unset(mut self, k: &str) -> Pod {
        self.env.retain(|(n, _)| n != k);
        self
    }

    /// A regular file of `len` zero bytes standing in for the block volume, and
    /// `DESTINATION=/dev/cdi-block-volume`.
    fn block(self, len: u64) -> Pod {
        let f = std::fs::File::create(self.device()).unwrap();
        f.set_len(len).unwrap();
        self.set("DESTINATION", "/dev/cdi-block-volume")
    }

    fn disk(&self) -> PathBuf {
        self.root.join("data/disk.img")
    }

    fn device(&self) -> PathBuf {
        self.root.join("dev/cdi-block-volume")
    }

    fn term(&self) -> Option<String> {
        std::fs::read_to_string(self.root.join("dev/termination-log")).ok()
    }

    fn command(&self, port: u16) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vdisk-uploader"));
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("VDISK_ROOT", &self.root)
            .env("LISTEN_PORT", port.to_string())
            .args(&self.args);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("server.log"))
            .unwrap();
        c.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        c
    }

    /// Start the server and wait until `/healthz` answers.
    fn start(&self) -> Server {
        for _attempt in 0..3 {
            let port = free_port();
            let child = self.command(port).spawn().unwrap();
            let mut s = Server {
                child: Some(child),
                port,
                root: self.root.clone(),
            };
            let t0 = Instant::now();
            loop {
                if let Some(st) = s.child.as_mut().unwrap().try_wait().unwrap() {
                    s.child = None;
                    let log = s.log();
                    if log.contains("in use") {
                        break; // lost a race for the port: another one
                    }
                    panic!("vdisk-uploader exited ({st}) before serving:\n{log}");
                }
                if s.get("/healthz", Who::Nobody).code == 200 {
                    return s;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "the server did not become healthy:\n{}",
                    s.log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("no free port for the server");
    }

    /// Run the server expecting it to stop by itself (no health check).
    fn run_to_exit(&self, timeout: Duration) -> Exit {
        let mut s = Server {
            child: Some(self.command(free_port()).spawn().unwrap()),
            port: 0,
            root: self.root.clone(),
        };
        s.wait_for(timeout)
    }
}

/// Who the client says it is.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Who {
    Nobody,
    Proxy,
    Clone,
    WrongCn,
    OtherCa,
}

impl Who {
    fn identity(self) -> Option<&'static Identity> {
        let f = fx();
        match self {
            Who::Nobody => None,
            Who::Proxy => Some(&f.proxy),
            Who::Clone => Some(&f.clone),
            Who::WrongCn => Some(&f.wrong_cn),
            Who::OtherCa => Some(&f.other_ca),
        }
    }
}

struct Reply {
    /// 0 when no HTTP response came (e.g. the TLS handshake was refused).
    code: u16,
    body: String,
    stderr: String,
}

struct Exit {
    code: i32,
    term: Option<String>,
    log: String,
}

impl Exit {
    /// Exit 0 with exactly `message` in the termination log.
    fn ok(&self, message: &str) -> &Exit {
        assert_eq!(
            self.code, 0,
            "uploader failed: {:?}\n{}",
            self.term, self.log
        );
        assert_eq!(self.term.as_deref(), Some(message), "{}", self.log);
        self
    }
}

struct Server {
    child: Option<Child>,
    port: u16,
    root: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    fn base(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("server.log")).unwrap_or_default()
    }

    /// Still running?
    fn alive(&mut self) -> bool {
        match &mut self.child {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// `curl [args] URL` as `who`: the status (0 without a response) and the body.
    fn curl(&self, who: Who, path: &str, args: &[&str]) -> Reply {
        let f = fx();
        let mut c = Command::new("curl");
        c.args(["-sS", "--max-time", "300", "--cacert"])
            .arg(&f.server_ca)
            .args(["-w", "\n%{http_code}"]);
        if let Some(id) = who.identity() {
            c.arg("--cert").arg(&id.cert).arg("--key").arg(&id.key);
        }
        c.args(args).arg(self.url(path));
        let o = c.output().expect("curl");
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
        Reply {
            code: code.trim().parse().unwrap_or(0),
            body: body.to_string(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    fn get(&self, path: &str, who: Who) -> Reply {
        self.curl(who, path, &[])
    }

    /// POST a file as the raw body, as virtctl does.
    fn post_file(&self, path: &str, who: Who, file: &Path, headers: &[&str]) -> Reply {
        let data = format!("@{}", p(file));
        let mut args = vec![
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            &data,
        ];
        for h in headers {
            args.extend(["-H", h]);
        }
        self.curl(who, path, &args)
    }

    /// POST a small body: for the answers given before any data is read.
    fn post_small(&self, path: &str, who: Who) -> Reply {
        self.curl(
            who,
            path,
            &[
                "-H",
                "Content-Type: application/octet-stream",
                "--data-binary",
                "small body",
            ],
        )
    }

    fn wait_for(&mut self, timeout: Duration) -> Exit {
        let mut child = self.child.take().expect("already waited");
        let t0 = Instant::now();
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if t0.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "vdisk-uploader still running after {timeout:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Exit {
            code: status.code().unwrap_or(-1),
            term: std::fs::read_to_string(self.root.join("dev/termination-log")).ok(),
            log: self.log(),
        }
    }

    /// The server stops by itself after a completed upload.
    fn wait(mut self) -> Exit {
        self.wait_for(Duration::from_secs(60))
    }
}

fn assert_reply(r: &Reply, code: u16, what: &str, s: &Server) {
    assert_eq!(
        r.code,
        code,
        "{what}: body {:?}, curl: {}\nserver log:\n{}",
        r.body,
        r.stderr,
        s.log()
    );
}

/// A 200 with an empty body.
fn assert_ok(r: &Reply, what: &str, s: &Server) {
    assert_reply(r, 200, what, s);
    assert_eq!(r.body, "", "{what}: a success has an empty body");
}

fn same_bytes(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(
        x.len(),
        y.len(),
        "{} vs {}: sizes",
        a.display(),
        b.display()
    );
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        panic!("{} differs from {} at byte {i}", a.display(), b.display());
    }
}

/// Names under `dir`, recursively, relative and sorted (directories end in `/`).
fn listing(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            let rel = e
                .path()
                .strip_prefix(base)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if e.file_type().unwrap().is_dir() {
                out.push(format!("{rel}/"));
                walk(base, &e.path(), out);
            } else {
                out.push(rel);
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    v.sort();
    v
}

/// Poll until `/data` is empty: a failed upload leaves nothing behind.
fn data_left_empty(pod: &Pod, s: &Server, what: &str) {
    let t0 = Instant::now();
    loop {
        let left = listing(&pod.root.join("data"));
        if left.is_empty() {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{what}: /data still holds {left:?}\n{}",
            s.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// After a failed upload: still serving, nothing written, no termination message.
fn still_serving_clean(pod: &Pod, s: &mut Server, what: &str) {
    data_left_empty(pod, s, what);
    assert!(s.alive(), "{what}: the server stopped\n{}", s.log());
    assert_eq!(
        s.get("/healthz", Who::Nobody).code,
        200,
        "{what}: not healthy"
    );
    assert_eq!(
        pod.term(),
        None,
        "{what}: a termination message was written"
    );
}

// ---------------------------------------------------------------------------------------------
// A raw HTTP/1.1 client over rustls, for uploads that pause or break off
// ---------------------------------------------------------------------------------------------

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn connect(port: u16, who: Who) -> Tls {
    let f = fx();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(f.server_ca_der.clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match who.identity() {
        None => builder.with_no_client_auth(),
        Some(id) => builder
            .with_client_auth_cert(
                vec![id.cert_der.clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(id.key_der.clone().into()),
            )
            .unwrap(),
    };
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(300)))
        .unwrap();
    rustls::StreamOwned::new(conn, sock)
}

/// An upload in progress: headers announcing `total` bytes and part of the body sent.
struct Held {
    tls: Tls,
}

impl Held {
    fn begin(s: &Server, path: &str, who: Who, total: u64, first: &[u8]) -> Held {
        let mut tls = connect(s.port, who);
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/octet-stream\r\n\
             Content-Length: {total}\r\nConnection: close\r\n\r\n",
            s.port
        );
        tls.write_all(head.as_bytes()).unwrap();
        tls.write_all(first).unwrap();
        tls.flush().unwrap();
        Held { tls }
    }

    fn send(&mut self, data: &[u8]) {
        self.tls.write_all(data).unwrap();
        self.tls.flush().unwrap();
    }

    /// Read the response: `(status, body)`.
    fn finish(mut self) -> (u16, String) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 << 10];
        loop {
            match self.tls.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) if !buf.is_empty() && e.kind() == std::io::ErrorKind::ConnectionReset => {
                    break;
                }
                Err(e) => panic!("reading the response: {e}"),
            }
            if let Some(done) = response_complete(&buf) {
                buf.truncate(done);
                break;
            }
        }
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no HTTP response: {text:?}"));
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("bad status line: {head:?}"));
        (code, body.to_string())
    }

    /// Break the upload off: with a TLS close_notify, or by just dropping the TCP connection.
    fn cut(mut self, graceful: bool) {
        if graceful {
            self.tls.conn.send_close_notify();
            let _ = self.tls.flush();
        }
        let _ = self.tls.sock.shutdown(Shutdown::Both);
    }
}

/// The length of a complete response in `buf`, when it is (Content-Length framing).
fn response_complete(buf: &[u8]) -> Option<usize> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))?
        .trim()
        .parse()
        .ok()?;
    (buf.len() >= end + len).then_some(end + len)
}

/// RFC 3339 in UTC, whole seconds.
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a proleptic Gregorian date, in 400-year eras from 0000-03-01.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

// ---------------------------------------------------------------------------------------------
// Uploads that succeed
// ---------------------------------------------------------------------------------------------

/// POST `file` to `path` on a fresh pod; 200, exit 0, "Upload Complete", same disk.
fn upload_ok(pod: Pod, path: &str, file: &Path) -> Pod {
    let s = pod.start();
    let r = s.post_file(path, Who::Proxy, file, &[]);
    assert_ok(&r, &format!("{path} {}", file.display()), &s);
    s.wait().ok(UPLOAD_COMPLETE);
    same_disk(pod.disk(), &fx().qcow2);
    pod
}

#[test]
fn raw_sync_converts_and_resizes_before_answering() {
    let f = fx();
    let pod = Pod::new()
        .set("UPLOAD_IMAGE_SIZE", "100Mi")
        .set("FILESYSTEM_OVERHEAD", "0.06");
    let pod = upload_ok(pod, "/v1beta1/upload", &f.raw);
    assert_eq!(
        std::fs::metadata(pod.disk()).unwrap().len(),
        vdisk::sizing::usable_space(0.06, 100 << 20),
        "the disk is resized to the usable space of the volume"
    );
    same_disk(pod.disk(), &f.raw);
}

#[test]
fn qcow2_async() {
    let f = fx();
    upload_ok(Pod::new(), "/v1beta1/upload-async", &f.qcow2);
    upload_ok(Pod::new(), "/v1alpha1/upload-async", &f.qcow2);
}

#[test]
fn compressed_qcow2_sync() {
    upload_ok(Pod::new(), "/v1beta1/upload", &fx().compressed);
}

#[test]
fn compressed_raw_streams() {
    let f = fx();
    upload_ok(Pod::new(), "/v1beta1/upload", &f.raw_gz);
    upload_ok(Pod::new(), "/v1beta1/upload", &f.raw_xz);
    upload_ok(Pod::new(), "/v1alpha1/upload", &f.raw_zst);
    upload_ok(Pod::new(), "/v1beta1/upload-async", &f.raw_xz);
}

#[test]
fn multipart_forms_sync_and_async() {
    let f = fx();
    // Sync, with a field before the file (logged and ignored); started with `serve`.
    let mut pod = Pod::new();
    pod.args = vec!["serve".into()];
    let s = pod.start();
    let file = format!("file=@{}", p(&f.qcow2));
    let r = s.curl(
        Who::Proxy,
        "/v1beta1/upload-form",
        &["-F", "note=ignored", "-F", &file],
    );
    assert_ok(&r, "upload-form", &s);
    s.wait().ok(UPLOAD_COMPLETE);
    same_disk(pod.disk(), &f.qcow2);

    let pod = Pod::new();
    let s = pod.start();
    let file = format!("file=@{}", p(&f.raw_zst));
    let r = s.curl(Who::Proxy, "/v1beta1/upload-form-async", &["-F", &file]);
    assert_ok(&r, "upload-form-async", &s);
    s.wait().ok(UPLOAD_COMPLETE);
    same_disk(pod.disk(), &f.qcow2);
}

#[test]
fn archives_unpack_into_data() {
    let f = fx();
    for (path, file) in [
        ("/v1beta1/upload-archive", &f.archive_tar),
        ("/v1alpha1/upload-archive", &f.archive_tar_zst),
    ] {
        let pod = Pod::new();
        let s = pod.start();
        let r = s.post_file(path, Who::Proxy, file, &[]);
        assert_ok(&r, path, &s);
        s.wait().ok(UPLOAD_COMPLETE);
        let data = pod.root.join("data");
        assert_eq!(listing(&data), ["a.txt", "sub/", "sub/b.bin"], "{path}");
        for name in ["a.txt", "sub/b.bin"] {
            same_bytes(&data.join(name), &f.tree.join(name));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Routes, methods and client authentication
// ---------------------------------------------------------------------------------------------

#[test]
fn routes_methods_and_client_certificates() {
    let f = fx();
    let pod = Pod::new();
    let mut s = pod.start();
    // Health: any method, no certificate needed.
    for method in ["GET", "POST", "PUT"] {
        let r = s.curl(Who::Nobody, "/healthz", &["-X", method]);
        assert_reply(&r, 200, &format!("{method} /healthz"), &s);
        assert_eq!(r.body, "OK", "{method} /healthz body");
    }
    // virtctl's async probe: HEAD answered before any authentication.
    for path in ["/v1beta1/upload-async", "/v1alpha1/upload-async"] {
        let r = s.curl(Who::Nobody, path, &["--head"]);
        assert_reply(&r, 200, &format!("HEAD {path} without a certificate"), &s);
    }
    // Non-POST methods and unknown paths: 404, whoever asks.
    for who in [Who::Nobody, Who::Proxy] {
        for (method, path) in [
            ("GET", "/v1beta1/upload"),
            ("PUT", "/v1beta1/upload"),
            ("GET", "/v1alpha1/upload"),
            ("GET", "/v1beta1/upload-async"),
            ("GET", "/v1beta1/upload-archive"),
            ("GET", "/v1beta1/upload-form"),
        ] {
            let r = s.curl(who, path, &["-X", method]);
            assert_reply(&r, 404, &format!("{method} {path} as {who:?}"), &s);
        }
        let r = s.post_small("/v1beta1/no-such-route", who);
        assert_reply(&r, 404, &format!("POST to an unknown path as {who:?}"), &s);
        let r = s.get("/", who);
        assert_reply(&r, 404, &format!("GET / as {who:?}"), &s);
    }
    // POST without a certificate or with the wrong CN: 401.
    for who in [Who::Nobody, Who::WrongCn] {
        for path in [
            "/v1beta1/upload",
            "/v1alpha1/upload",
            "/v1beta1/upload-async",
            "/v1beta1/upload-archive",
            "/v1beta1/upload-form",
            "/v1beta1/upload-form-async",
        ] {
            let r = s.post_small(path, who);
            assert_reply(&r, 401, &format!("POST {path} as {who:?}"), &s);
        }
    }
    // A real image without a certificate is refused the same way and nothing is written.
    let r = s.post_file("/v1beta1/upload", Who::Nobody, &f.raw_gz, &[]);
    assert_reply(&r, 401, "an image without a client certificate", &s);
    // The right CN from another CA: Go's VerifyClientCertIfGiven rejects an unverifiable
    // certificate in the handshake; a 401 is the other acceptable refusal. Never accepted.
    for path in ["/v1beta1/upload", "/v1beta1/upload-async"] {
        let r = s.post_file(path, Who::OtherCa, &f.raw_gz, &[]);
        assert!(
            r.code == 401 || r.code == 0,
            "POST {path} with a certificate from another CA: got {} {:?} ({})",
            r.code,
            r.body,
            r.stderr
        );
    }
    still_serving_clean(&pod, &mut s, "after refused requests");
    // The rightful client still gets through.
    let r = s.post_file("/v1beta1/upload", Who::Proxy, &f.raw_gz, &[]);
    assert_ok(&r, "upload after the refusals", &s);
    s.wait().ok(UPLOAD_COMPLETE);
    same_disk(pod.disk(), &f.raw);
}

#[test]
fn tls_profile_from_env() {
    // TLS 1.3 only: a TLS 1.2 client cannot connect.
    let pod = Pod::new().set("TLS_MIN_VERSION", "VersionTLS13");
    let s = pod.start();
    let r = s.curl(Who::Nobody, "/healthz", &["--tls-max", "1.2"]);
    assert_eq!(
        r.code, 0,
        "TLS 1.2 accepted with TLS_MIN_VERSION=VersionTLS13"
    );
    assert_eq!(s.get("/healthz", Who::Nobody).code, 200);
    drop(s);
    // TLS 1.2 with one cipher suite (Go name): a TLS 1.2 client offering another fails.
    let pod = Pod::new()
        .set("TLS_MIN_VERSION", "VersionTLS12")
        .set("TLS_CIPHERS", "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384");
    let s = pod.start();
    let tls12 = |cipher: &str| {
        s.curl(
            Who::Nobody,
            "/healthz",
            &["--tls-max", "1.2", "--ciphers", cipher],
        )
        .code
    };
    assert_eq!(
        tls12("ECDHE-ECDSA-AES128-GCM-SHA256"),
        0,
        "a suite not in TLS_CIPHERS"
    );
    assert_eq!(
        tls12("ECDHE-ECDSA-AES256-GCM-SHA384"),
        200,
        "the suite in TLS_CIPHERS"
    );
}

#[test]
fn missing_tls_config_exits_1() {
    let pod = Pod::new().unset("TLS_CERT_FILE").unset("TLS_KEY_FILE");
    let e = pod.run_to_exit(Duration::from_secs(30));
    assert_eq!(e.code, 1, "{}", e.log);
    // Logged in klog's format, the failure as an E line.
    assert!(
        e.log
            .lines()
            .any(|l| common::is_klog_line(l) && l.starts_with('E')),
        "{}",
        e.log
    );
}

// ---------------------------------------------------------------------------------------------
// Concurrency, completion, failures
// ---------------------------------------------------------------------------------------------

#[test]
fn concurrent_upload_gets_503_and_the_first_completes() {
    let f = fx();
    let raw = std::fs::read(&f.raw).unwrap();
    let pod = Pod::new();
    let mut s = pod.start();
    // The first upload sends 40 of its 64 MiB and pauses: more than the socket buffers
    // hold, so the server is reading it.
    let split = 40 * MIB as usize;
    let mut first = Held::begin(&s, "/v1beta1/upload", Who::Proxy, DISK_SIZE, &raw[..split]);
    let r = s.post_file("/v1beta1/upload", Who::Proxy, &f.raw_gz, &[]);
    assert_reply(&r, 503, "a second upload while the first is in flight", &s);
    let r = s.post_small("/v1beta1/upload-async", Who::Proxy);
    assert_reply(&r, 503, "an async upload while the first is in flight", &s);
    assert_eq!(s.get("/healthz", Who::Nobody).code, 200);
    assert!(s.alive());
    first.send(&raw[split..]);
    let (code, body) = first.finish();
    assert_eq!(
        (code, body.as_str()),
        (200, ""),
        "the first upload\n{}",
        s.log()
    );
    s.wait().ok(UPLOAD_COMPLETE);
    same_disk(pod.disk(), &f.raw);
}

#[test]
fn after_completion_409_while_lingering() {
    let f = fx();
    let pod = Pod::new().set("VDISK_LINGER_SECONDS", "4");
    let mut s = pod.start();
    let r = s.post_file("/v1beta1/upload", Who::Proxy, &f.raw_gz, &[]);
    assert_ok(&r, "the upload", &s);
    for path in [
        "/v1beta1/upload",
        "/v1beta1/upload-async",
        "/v1beta1/upload-form",
    ] {
        let r = s.post_small(path, Who::Proxy);
        assert_reply(&r, 409, &format!("POST {path} after completion"), &s);
    }
    assert!(s.alive(), "exited although VDISK_LINGER_SECONDS=4");
    s.wait().ok(UPLOAD_COMPLETE);
    same_disk(pod.disk(), &f.raw);
}

#[test]
fn cut_off_upload_leaves_nothing_and_a_new_one_succeeds() {
    let f = fx();
    let raw = std::fs::read(&f.raw).unwrap();
    let qcow2 = std::fs::read(&f.qcow2).unwrap();
    let pod = Pod::new();
    let mut s = pod.start();
    // Half a raw body on the sync route, then a clean TLS close.
    let half = raw.len() / 2;
    Held::begin(
        &s,
        "/v1beta1/upload",
        Who::Proxy,
        raw.len() as u64,
        &raw[..half],
    )
    .cut(true);
    still_serving_clean(&pod, &mut s, "raw upload cut off");
    // Half a qcow2 on the async route, then the TCP connection just drops.
    let half = qcow2.len() / 2;
    Held::begin(
        &s,
        "/v1beta1/upload-async",
        Who::Proxy,
        qcow2.len() as u64,
        &qcow2[..half],
    )
    .cut(false);
    still_serving_clean(&pod, &mut s, "qcow2 upload cut off");
    // A new upload succeeds (once the server has finished cleaning up: 503 until then).
    let t0 = Instant::now();
    let r = loop {
        let r = s.post_file("/v1beta1/upload", Who::Proxy, &f.qcow2, &[]);
        if r.code != 503 || t0.elapsed() > Duration::from_secs(20) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_ok(&r, "the upload after the cut-off ones", &s);
    s.wait().ok(UPLOAD_COMPLETE);
    same_disk(pod.disk(), &f.qcow2);
}

#[test]
fn image_larger_than_the_volume_is_400() {
    let f = fx();
    for (path, file) in [
        ("/v1beta1/upload", &f.qcow2),
        ("/v1beta1/upload-async", &f.qcow2),
        ("/v1beta1/upload", &f.raw_xz),
    ] {
        let pod = Pod::new().set("UPLOAD_IMAGE_SIZE", "16Mi");
        let mut s = pod.start();
        let r = s.post_file(path, Who::Proxy, file, &[]);
        let what = format!("{path} {} into 16Mi", file.display());
        assert_reply(&r, 400, &what, &s);
        assert!(r.body.starts_with(TOO_LARGE), "{what}: body {:?}", r.body);
        still_serving_clean(&pod, &mut s, &what);
    }
}

#[test]
fn backing_file_is_refused_with_500_and_the_server_recovers() {
    let f = fx();
    let pod = Pod::new();
    let mut s = pod.start();
    for path in ["/v1beta1/upload", "/v1beta1/upload-async"] {
        let r = s.post_file(path, Who::Proxy, &f.backing, &[]);
        assert_reply(&r, 500, &format!("{path}: a qcow2 with a backing file"), &s);
        assert!(r.body.starts_with(SAVE_FAILED), "{path}: body {:?}", r.body);
        still_serving_clean(&pod, &mut s, "backing file refused");
    }
    let r = s.post_file("/v1beta1/upload", Who::Proxy, &f.compressed, &[]);
    assert_ok(&r, "an upload after the refusal", &s);
    s.wait().ok(UPLOAD_COMPLETE);
    same_disk(pod.disk(), &f.qcow2);
}

// ---------------------------------------------------------------------------------------------
// Host-assisted clone targets
// ---------------------------------------------------------------------------------------------

const BLOCK_CLONE: &str = "x-cdi-content-type: blockdevice-clone";
const FS_CLONE: &str = "x-cdi-content-type: filesystem-clone";

fn clone_pod() -> Pod {
    Pod::new().set("CLIENT_NAME", CLONE_CN)
}

#[test]
fn blockdevice_clone_into_the_filesystem_volume_stays_sparse() {
    let f = fx();
    let pod = clone_pod();
    let mut s = pod.start();
    // The proxy's certificate is not the clone source's.
    let r = s.post_file(
        "/v1beta1/upload",
        Who::Proxy,
        &f.block_clone,
        &[BLOCK_CLONE],
    );
    assert_reply(&r, 401, "a clone with the wrong CN", &s);
    // Async clones are not supported.
    let r = s.post_file(
        "/v1beta1/upload-async",
        Who::Clone,
        &f.block_clone,
        &[BLOCK_CLONE],
    );
    assert_reply(&r, 500, "an async clone", &s);
    assert!(
        r.body.starts_with(SAVE_FAILED) && r.body.contains("async clone not supported"),
        "async clone: body {:?}",
        r.body
    );
    still_serving_clean(&pod, &mut s, "async clone refused");
    let r = s.post_file(
        "/v1beta1/upload",
        Who::Clone,
        &f.block_clone,
        &[BLOCK_CLONE],
    );
    assert_ok(&r, "blockdevice-clone", &s);
    s.wait().ok(CLONE_COMPLETE);
    same_bytes(&pod.disk(), &f.raw);
    let m = std::fs::metadata(pod.disk()).unwrap();
    assert!(
        m.blocks() * 512 < m.len() / 4,
        "the cloned disk is not sparse: {} of {} bytes allocated",
        m.blocks() * 512,
        m.len()
    );
}

#[test]
fn blockdevice_clone_onto_a_block_volume() {
    let f = fx();
    let pod = clone_pod().block(DISK_SIZE);
    let s = pod.start();
    let r = s.post_file(
        "/v1beta1/upload",
        Who::Clone,
        &f.block_clone,
        &[BLOCK_CLONE],
    );
    assert_ok(&r, "blockdevice-clone to a block volume", &s);
    s.wait().ok(CLONE_COMPLETE);
    same_bytes(&pod.device(), &f.raw);
    assert!(!pod.disk().exists(), "a disk.img beside the block volume");
}

#[test]
fn filesystem_clone_unpacks_into_data() {
    let f = fx();
    let pod = clone_pod();
    let s = pod.start();
    let r = s.post_file("/v1beta1/upload", Who::Clone, &f.fs_clone, &[FS_CLONE]);
    assert_ok(&r, "filesystem-clone", &s);
    s.wait().ok(FS_CLONE_COMPLETE);
    let data = pod.root.join("data");
    assert_eq!(listing(&data), ["disk.img", "other.txt"]);
    same_bytes(&data.join("other.txt"), &f.fs_tree.join("other.txt"));
    same_bytes(&data.join("disk.img"), &f.raw);
}

#[test]
fn filesystem_clone_onto_a_block_volume_streams_disk_img() {
    let f = fx();
    let pod = clone_pod().block(DISK_SIZE);
    let s = pod.start();
    let r = s.post_file("/v1beta1/upload", Who::Clone, &f.fs_clone, &[FS_CLONE]);
    assert_ok(&r, "filesystem-clone to a block volume", &s);
    s.wait().ok(CLONE_COMPLETE);
    same_bytes(&pod.device(), &f.raw);
    assert_eq!(listing(&pod.root.join("data")), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------------
// Deadline
// ---------------------------------------------------------------------------------------------

/// `secs` to `secs + 1` seconds from now, on a whole second: `(RFC 3339 text, instant)`.
fn deadline_in(secs: u64) -> (String, SystemTime) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let at = UNIX_EPOCH + Duration::from_secs(now + 1 + secs);
    (rfc3339(at), at)
}

#[test]
fn deadline_passes_with_nothing_done() {
    let (deadline, at) = deadline_in(2);
    let pod = Pod::new().set("DEADLINE", deadline.clone());
    let mut s = pod.start();
    let e = s.wait_for(Duration::from_secs(60));
    e.ok(DEADLINE_PASSED);
    assert!(
        SystemTime::now() >= at,
        "exited before the deadline {deadline}"
    );
    assert_eq!(listing(&pod.root.join("data")), Vec::<String>::new());
}

#[test]
fn deadline_waits_for_the_upload_in_flight() {
    let f = fx();
    let raw = std::fs::read(&f.raw).unwrap();
    let (deadline, at) = deadline_in(3);
    let pod = Pod::new().set("DEADLINE", deadline);
    let mut s = pod.start();
    let split = 40 * MIB as usize;
    let mut held = Held::begin(&s, "/v1beta1/upload", Who::Proxy, DISK_SIZE, &raw[..split]);
    // Let the deadline pass while the upload is paused.
    if let Ok(left) = at.duration_since(SystemTime::now()) {
        std::thread::sleep(left + Duration::from_millis(1500));
    }
    assert!(
        s.alive(),
        "the server stopped during an upload\n{}",
        s.log()
    );
    held.send(&raw[split..]);
    let (code, body) = held.finish();
    assert_eq!((code, body.as_str()), (200, ""), "{}", s.log());
    s.wait().ok(UPLOAD_COMPLETE);
    same_disk(pod.disk(), &f.raw);
}

// ---------------------------------------------------------------------------------------------
// `vdisk upload`
// ---------------------------------------------------------------------------------------------

fn vdisk_upload(url: &str, image: &Path, opts: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vdisk"))
        .arg("upload")
        .arg(url)
        .arg(image)
        .args(opts)
        .output()
        .unwrap()
}

fn assert_success(o: &Output, what: &str, s: &Server) {
    assert!(
        o.status.success(),
        "vdisk upload {what}: {}\n{}\nserver log:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr),
        s.log()
    );
}

#[test]
fn vdisk_upload_client() {
    let f = fx();
    let (ca, cert, key) = (p(&f.server_ca), p(&f.proxy.cert), p(&f.proxy.key));
    let mtls = ["--ca", ca, "--cert", cert, "--key", key];

    // Default: the HEAD probe finds async; a token is sent along and ignored here.
    let pod = Pod::new();
    let s = pod.start();
    let mut opts = mtls.to_vec();
    opts.extend(["--token", "t0k3n"]);
    let o = vdisk_upload(&s.base(), &f.qcow2, &opts);
    assert_success(&o, "qcow2", &s);
    s.wait().ok(UPLOAD_COMPLETE);
    same_disk(pod.disk(), &f.qcow2);

    // --sync, a compressed raw.
    let pod = Pod::new();
    let s = pod.start();
    let mut opts = mtls.to_vec();
    opts.push("--sync");
    let o = vdisk_upload(&s.base(), &f.raw_xz, &opts);
    assert_success(&o, "--sync raw.xz", &s);
    s.wait().ok(UPLOAD_COMPLETE);
    same_disk(pod.disk(), &f.raw);

    // --archive.
    let pod = Pod::new();
    let s = pod.start();
    let mut opts = mtls.to_vec();
    opts.push("--archive");
    let o = vdisk_upload(&s.base(), &f.archive_tar_zst, &opts);
    assert_success(&o, "--archive", &s);
    s.wait().ok(UPLOAD_COMPLETE);
    assert_eq!(
        listing(&pod.root.join("data")),
        ["a.txt", "sub/", "sub/b.bin"]
    );

    // Without a client certificate: refused, exit non-zero, the server keeps waiting.
    let pod = Pod::new();
    let mut s = pod.start();
    let o = vdisk_upload(&s.base(), &f.qcow2, &["--ca", ca]);
    assert!(
        !o.status.success(),
        "an upload without a client certificate succeeded"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("unexpected return value 401"),
        "the refusal does not say 401 as virtctl does: {err}"
    );
    // Without the server CA: the server is not trusted...
    let o = vdisk_upload(&s.base(), &f.qcow2, &["--cert", cert, "--key", key]);
    assert!(!o.status.success(), "an untrusted server was accepted");
    still_serving_clean(&pod, &mut s, "vdisk upload refused");
    // ...unless --insecure.
    let o = vdisk_upload(
        &s.base(),
        &f.compressed,
        &["--insecure", "--cert", cert, "--key", key],
    );
    assert_success(&o, "--insecure", &s);
    s.wait().ok(UPLOAD_COMPLETE);
    same_disk(pod.disk(), &f.qcow2);
}
