//! `vdisk upload` against an in-test HTTPS upload server (vdisk's own server with rustls,
//! verifying client certificates if given), checking what the server received.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use vdisk::net::server::{
    Handler, Request, Response, Server, ServerHandle, TlsSettings, self_signed, tls_config,
};

const CLIENT_CN: &str = "client.upload-server.cdi.kubevirt.io";

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    body: Vec<u8>,
    cn: Option<String>,
    auth: Option<String>,
}

struct Fixture {
    dir: tempfile::TempDir,
    server_cert: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    other_ca: PathBuf,
    tls: TlsSettings,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed("localhost").unwrap();
        let (ca, client_cert, client_key) = client_identity(CLIENT_CN);
        let (other, _) = self_signed("localhost").unwrap();
        let put = |name: &str, data: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, data).unwrap();
            p
        };
        Fixture {
            server_cert: put("server.pem", &cert),
            client_cert: put("client.pem", client_cert.as_bytes()),
            client_key: put("client.key", client_key.as_bytes()),
            other_ca: put("other.pem", &other),
            tls: TlsSettings {
                cert_pem: cert,
                key_pem: key,
                client_ca_pem: Some(ca.into_bytes()),
                ..TlsSettings::default()
            },
            dir,
        }
    }

    fn image(&self, len: usize) -> (PathBuf, Vec<u8>) {
        let mut x = 0x9e37_79b9u32;
        let data: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 7) as u8
            })
            .collect();
        let p = self.dir.path().join("disk.img");
        std::fs::write(&p, &data).unwrap();
        (p, data)
    }

    /// An upload server: `HEAD /v1beta1/upload-async` answers `head`; POSTs are read whole
    /// and answered 200, or answered 409 without reading when `refuse`.
    fn server(&self, head: u16, refuse: bool) -> (ServerHandle, Arc<Mutex<Vec<Seen>>>) {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let log = seen.clone();
        let handler: Handler = Arc::new(move |req: &mut Request<'_>| {
            let mut body = Vec::new();
            if req.method == "POST" && !refuse {
                std::io::Read::read_to_end(req.body(), &mut body).unwrap();
            }
            log.lock().unwrap().push(Seen {
                method: req.method.clone(),
                path: req.path.clone(),
                body,
                cn: req.peer_common_name.clone(),
                auth: req.header("authorization").map(str::to_string),
            });
            match (req.method.as_str(), req.path.as_str()) {
                ("HEAD", "/v1beta1/upload-async") => Response::empty(head),
                ("POST", _) if refuse => Response::text(409, "Upload already done"),
                ("POST", "/v1beta1/upload" | "/v1beta1/upload-async") => Response::empty(200),
                _ => Response::empty(404),
            }
        });
        let tls = tls_config(&self.tls).unwrap();
        let h = Server::bind("127.0.0.1:0", Some(tls))
            .unwrap()
            .spawn(handler);
        (h, seen)
    }
}

/// A CA and a client certificate it signed: (ca_pem, cert_pem, key_pem).
fn client_identity(cn: &str) -> (String, String, String) {
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "upload client CA");
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().unwrap()).unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &*ca).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// Run `vdisk upload ARGS...`: (exit code, stdout, stderr).
fn vdisk_upload(args: &[&dyn AsRef<std::ffi::OsStr>]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vdisk"))
        .arg("upload")
        .args(args.iter().map(|a| a.as_ref()))
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn p(path: &Path) -> &std::ffi::OsStr {
    path.as_os_str()
}

#[test]
fn async_after_probe_with_client_cert_token_and_ca() {
    let f = Fixture::new();
    let (img, data) = f.image(9 << 20);
    let (h, seen) = f.server(200, false);
    // No scheme: https:// is assumed, as virtctl does with --uploadproxy-url.
    let base = format!("127.0.0.1:{}", h.local_addr().port());
    let (code, out, err) = vdisk_upload(&[
        &base,
        &p(&img),
        &"--ca",
        &p(&f.server_cert),
        &"--cert",
        &p(&f.client_cert),
        &"--key",
        &p(&f.client_key),
        &"--token",
        &"t0ken",
    ]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    let endpoint = format!("https://{base}/v1beta1/upload-async");
    assert!(
        out.starts_with(&format!("Uploaded {} bytes to {endpoint} in ", data.len())),
        "{out}"
    );
    assert!(out.trim_end().ends_with("MiB/s): HTTP 200"), "{out}");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(
        (seen[0].method.as_str(), seen[0].path.as_str()),
        ("HEAD", "/v1beta1/upload-async")
    );
    assert_eq!(
        (seen[1].method.as_str(), seen[1].path.as_str()),
        ("POST", "/v1beta1/upload-async")
    );
    assert!(seen[1].body == data, "the uploaded bytes differ");
    for s in seen.iter() {
        assert_eq!(s.cn.as_deref(), Some(CLIENT_CN));
        assert_eq!(s.auth.as_deref(), Some("Bearer t0ken"));
    }
}

#[test]
fn sync_when_the_probe_gets_404() {
    let f = Fixture::new();
    let (img, data) = f.image(3 << 20);
    let (h, seen) = f.server(404, false);
    let base = format!("https://127.0.0.1:{}", h.local_addr().port());
    let (code, out, err) = vdisk_upload(&[&base, &p(&img), &"--insecure", &"-p"]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.contains("(100.00/100%)"), "{out}");
    assert!(
        out.contains(&format!("to {base}/v1beta1/upload in ")),
        "{out}"
    );
    let seen = seen.lock().unwrap();
    let posts: Vec<&Seen> = seen.iter().filter(|s| s.method == "POST").collect();
    assert_eq!(posts.len(), 1);
    assert_eq!(posts[0].path, "/v1beta1/upload");
    assert!(posts[0].body == data, "the uploaded bytes differ");
    assert_eq!(posts[0].cn, None, "no client certificate was given");
    assert_eq!(posts[0].auth, None);
}

#[test]
fn refusal_is_reported_with_the_servers_words() {
    let f = Fixture::new();
    let (img, _) = f.image(16 << 20);
    let (h, seen) = f.server(200, true);
    let base = format!("https://127.0.0.1:{}", h.local_addr().port());
    let (code, out, err) = vdisk_upload(&[&base, &p(&img), &"--ca", &p(&f.server_cert)]);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert!(
        err.contains("unexpected return value 409, Upload already done"),
        "{err}"
    );
    assert!(!out.contains("Uploaded"), "{out}");
    assert!(seen.lock().unwrap().iter().any(|s| s.method == "POST"));
}

#[test]
fn a_wrong_ca_fails_verification() {
    let f = Fixture::new();
    let (img, _) = f.image(1 << 20);
    let (h, seen) = f.server(200, false);
    let base = format!("https://127.0.0.1:{}", h.local_addr().port());
    let (code, out, err) = vdisk_upload(&[&base, &p(&img), &"--ca", &p(&f.other_ca)]);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert!(
        err.contains("TLS handshake") && err.contains("certificate"),
        "{err}"
    );
    assert!(
        seen.lock().unwrap().is_empty(),
        "nothing reached the handler"
    );
}
