//! The transfer half of `virtctl image-upload`: send a local image to CDI's upload proxy or
//! straight to an upload server pod.
//!
//! Owns: the base URL rule (`https://` prepended when there is no scheme, as virtctl's
//! `--uploadproxy-url`), the async discovery probe (`HEAD /v1beta1/upload-async`, 200 → async,
//! anything else → sync), the endpoint choice (`upload-async`, `upload`, or `upload-archive`
//! for a tar), and the POST itself: the file streamed as `application/octet-stream` with its
//! `Content-Length`, an optional `Authorization: Bearer` token and client certificate, and
//! virtctl's error wording `unexpected return value N, <body>` for any status but 200.
//!
//! Creating the DataVolume or PVC, requesting the upload token and waiting for the pod are
//! the Kubernetes half of virtctl and are not here. The file is never read whole; a server
//! that refuses the upload part-way (401, 409, 503) is reported with its own answer.

use crate::error::{Error, ErrorKind, Result};
use crate::net::http::{Client, ClientConfig, Proxy, Url};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, Instant};

/// The async upload route; a `HEAD` answering 200 there means the server has it.
const ASYNC_PATH: &str = "/v1beta1/upload-async";
/// The sync upload route.
const SYNC_PATH: &str = "/v1beta1/upload";
/// The route that unpacks a tar into the volume.
const ARCHIVE_PATH: &str = "/v1beta1/upload-archive";
/// Largest response body kept for the report or the error.
const MAX_BODY: usize = 64 << 10;
/// How long the connection may stay silent. A sync upload is answered only once the server
/// has converted the image, which for a large qcow2 can take long with no byte moving
/// (virtctl sets no limit at all).
const IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// How to reach the server.
#[derive(Clone, Default)]
pub struct UploadOptions {
    /// Skip verification of the server certificate (virtctl's `--insecure`).
    pub insecure: bool,
    /// Extra CA certificates (PEM) to trust for the server, besides the system's.
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate chain and private key (PEM) for mutual TLS.
    pub client_cert: Option<(Vec<u8>, Vec<u8>)>,
    /// Upload token, sent as `Authorization: Bearer <token>` (probe included).
    pub token: Option<String>,
    /// `Some(true)`: async endpoint, `Some(false)`: sync endpoint, `None`: probe the server.
    pub force_async: Option<bool>,
    /// Send to the upload-archive endpoint (a tar unpacked into the volume); no probe.
    pub archive: bool,
}

impl std::fmt::Debug for UploadOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token and the client key are never printed.
        f.debug_struct("UploadOptions")
            .field("insecure", &self.insecure)
            .field("ca_pem", &self.ca_pem.is_some())
            .field("client_cert", &self.client_cert.is_some())
            .field("token", &self.token.is_some())
            .field("force_async", &self.force_async)
            .field("archive", &self.archive)
            .finish()
    }
}

/// A finished upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadReport {
    /// The URL the file was posted to.
    pub endpoint: String,
    /// The server's status (200).
    pub status: u16,
    /// The server's response body (CDI sends an empty one on success).
    pub body: String,
    /// Bytes of the file sent.
    pub bytes: u64,
    /// Time from the start of the POST to the server's answer.
    pub elapsed: Duration,
}

/// `base` as virtctl takes `--uploadproxy-url`: `https://` prepended when it has no scheme;
/// no trailing `/`.
fn base_url(base: &str) -> Result<String> {
    let base = base.trim();
    let base = if base.contains("://") {
        base.to_string()
    } else {
        format!("https://{base}")
    };
    let base = base.trim_end_matches('/').to_string();
    Url::parse(&base)?;
    Ok(base)
}

/// Counts what the upload reads from the file and reports it.
struct Counted<'a, R> {
    inner: R,
    done: u64,
    total: u64,
    progress: &'a mut dyn FnMut(u64, u64),
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.done += n as u64;
            (self.progress)(self.done, self.total);
        }
        Ok(n)
    }
}

/// Upload `file` to the upload server or proxy at `base` (virtctl's `--uploadproxy-url`;
/// `https://` prepended when there is no scheme).
///
/// Unless `opts.force_async` says which, probes `HEAD {base}/v1beta1/upload-async` (200 →
/// async), then POSTs the file as `application/octet-stream` with `Content-Length` to
/// `/v1beta1/upload-async` or `/v1beta1/upload`, or to `/v1beta1/upload-archive` when
/// `opts.archive`. `progress` gets (bytes sent, total) as the file goes out. A status other
/// than 200 fails with `unexpected return value N, <body>` (kind
/// [`ErrorKind::InvalidArgument`] for 4xx, [`ErrorKind::Network`] otherwise).
pub fn upload(
    base: &str,
    file: &Path,
    opts: &UploadOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<UploadReport> {
    let base = base_url(base)?;
    let mut f = std::fs::File::open(file)
        .map_err(|e| Error::io("cannot open the image", e).with_path(file))?;
    // Seeking finds the size of block devices too, where the metadata says 0.
    let total = f
        .seek(SeekFrom::End(0))
        .and_then(|n| f.seek(SeekFrom::Start(0)).map(|_| n))
        .map_err(|e| Error::io("cannot find the image size", e).with_path(file))?;
    let client = Client::new(ClientConfig {
        insecure: opts.insecure,
        ca_pem: opts.ca_pem.iter().cloned().collect(),
        client_cert: opts.client_cert.clone(),
        proxy: Proxy::from_env()?,
        idle_timeout: IDLE_TIMEOUT,
        ..ClientConfig::default()
    })?;
    let bearer = opts.token.as_ref().map(|t| format!("Bearer {}", t.trim()));
    let auth: Vec<(&str, &str)> = bearer
        .iter()
        .map(|b| ("Authorization", b.as_str()))
        .collect();
    let path = if opts.archive {
        ARCHIVE_PATH
    } else {
        let use_async = match opts.force_async {
            Some(a) => a,
            None => {
                let url = format!("{base}{ASYNC_PATH}");
                let r = client.send("HEAD", &url, &auth).map_err(|e| {
                    Error::new(e.kind(), format!("cannot reach the upload server: {e}"))
                })?;
                r.status == 200
            }
        };
        if use_async { ASYNC_PATH } else { SYNC_PATH }
    };
    let endpoint = format!("{base}{path}");
    let mut headers = auth;
    headers.push(("Content-Type", "application/octet-stream"));
    progress(0, total);
    let mut body = Counted {
        inner: f,
        done: 0,
        total,
        progress,
    };
    let start = Instant::now();
    let r = client
        .send_body("POST", &endpoint, &headers, &mut body, Some(total))
        .map_err(|e| Error::new(e.kind(), format!("upload to {endpoint} failed: {e}")))?;
    let status = r.status;
    let text = r
        .read_to_vec(MAX_BODY)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let elapsed = start.elapsed();
    if status != 200 {
        let kind = if (400..500).contains(&status) {
            ErrorKind::InvalidArgument
        } else {
            ErrorKind::Network
        };
        return Err(Error::new(
            kind,
            format!("unexpected return value {status}, {}", text.trim_end()),
        ));
    }
    Ok(UploadReport {
        endpoint,
        status,
        body: text,
        bytes: body.done,
        elapsed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::server::{Handler, Request, Response, Server, ServerHandle};
    use std::sync::{Arc, Mutex};

    #[test]
    fn base_urls() {
        assert_eq!(
            base_url("cdi-uploadproxy:443").unwrap(),
            "https://cdi-uploadproxy:443"
        );
        assert_eq!(base_url(" http://h:8080/ ").unwrap(), "http://h:8080");
        assert_eq!(base_url("https://h/prefix/").unwrap(), "https://h/prefix");
        assert!(base_url("ftp://h").is_err());
        assert!(base_url("").is_err());
    }

    /// What the test server saw: (method, path, body, Authorization).
    type Seen = Arc<Mutex<Vec<(String, String, Vec<u8>, Option<String>)>>>;

    /// A plain-HTTP upload server: HEAD on the async route answers `head_status`, POSTs
    /// answer `post_status` with `post_body`.
    fn server(head_status: u16, post_status: u16, post_body: &str) -> (String, Seen, ServerHandle) {
        let seen: Seen = Arc::default();
        let log = seen.clone();
        let post_body = post_body.to_string();
        let handler: Handler = Arc::new(move |req: &mut Request<'_>| {
            let mut body = Vec::new();
            if req.method == "POST" {
                req.body().read_to_end(&mut body).unwrap();
            }
            let auth = req.header("authorization").map(str::to_string);
            log.lock()
                .unwrap()
                .push((req.method.clone(), req.path.clone(), body, auth));
            match req.method.as_str() {
                "HEAD" if req.path == ASYNC_PATH => Response::empty(head_status),
                "POST" => Response::text(post_status, post_body.clone()),
                _ => Response::empty(404),
            }
        });
        let h = Server::bind("127.0.0.1:0", None).unwrap().spawn(handler);
        (format!("http://{}", h.local_addr()), seen, h)
    }

    fn image(len: usize) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        std::io::Write::write_all(&mut f, &data).unwrap();
        f
    }

    #[test]
    fn probe_picks_the_endpoint() {
        let img = image(3 << 20);
        let want = std::fs::read(img.path()).unwrap();
        for (head, force, archive, path) in [
            (200, None, false, ASYNC_PATH),
            (404, None, false, SYNC_PATH),
            (200, Some(false), false, SYNC_PATH),
            (404, Some(true), false, ASYNC_PATH),
            (200, None, true, ARCHIVE_PATH),
        ] {
            let (base, seen, _h) = server(head, 200, "");
            let opts = UploadOptions {
                token: Some("s3cret".into()),
                force_async: force,
                archive,
                ..UploadOptions::default()
            };
            let mut last = (u64::MAX, 0);
            let r = upload(&base, img.path(), &opts, &mut |d, t| last = (d, t)).unwrap();
            assert_eq!(r.endpoint, format!("{base}{path}"));
            assert_eq!(
                (r.status, r.bytes, r.body.as_str()),
                (200, want.len() as u64, "")
            );
            assert_eq!(last, (want.len() as u64, want.len() as u64));
            let seen = seen.lock().unwrap();
            let probed = force.is_none() && !archive;
            assert_eq!(seen.len(), 1 + usize::from(probed), "{path}");
            if probed {
                assert_eq!(
                    (seen[0].0.as_str(), seen[0].1.as_str()),
                    ("HEAD", ASYNC_PATH)
                );
            }
            let post = seen.last().unwrap();
            assert_eq!((post.0.as_str(), post.1.as_str()), ("POST", path));
            assert!(post.2 == want, "bytes differ");
            assert!(seen.iter().all(|s| s.3.as_deref() == Some("Bearer s3cret")));
        }
    }

    #[test]
    fn refusals_use_virtctls_wording() {
        let img = image(1000);
        let (base, _seen, _h) = server(200, 409, "Upload already done\n");
        let e = upload(&base, img.path(), &UploadOptions::default(), &mut |_, _| {}).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert_eq!(
            e.to_string(),
            "unexpected return value 409, Upload already done"
        );
        let (base, _seen, _h) = server(200, 500, "Saving stream failed: boom");
        let e = upload(&base, img.path(), &UploadOptions::default(), &mut |_, _| {}).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Network);
        assert_eq!(
            e.to_string(),
            "unexpected return value 500, Saving stream failed: boom"
        );
        let e = upload(
            &base,
            Path::new("/nonexistent/x.img"),
            &UploadOptions::default(),
            &mut |_, _| {},
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
    }
}
