//! The upload server pod (CDI's `cdi-uploadserver`): mutual-TLS HTTPS endpoints that stream
//! an uploaded image (raw, gz/xz/zstd, qcow2, archives, multipart forms) or a host-assisted
//! clone stream (snappy-framed raw device or tar) straight onto the volume through
//! [`crate::ingest::import`], with CDI's status codes, deadline and termination message. No
//! scratch space: qcow2 is converted while it arrives. The binary `vdisk-uploader` wires this
//! to the process.

use super::{Paths, Termination, env, env_overhead, parse_go_bool};
use crate::error::{Error, ErrorKind, Result};
use crate::ingest::{ContentType, ImportOptions, ImportTarget};
use crate::net::server::{Handler, Request, Response, Server, ServerHandle, TlsSettings};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Default destination on a filesystem volume.
pub const DEFAULT_DESTINATION: &str = "/data/disk.img";
/// The termination log.
pub const TERMINATION_LOG: &str = "/dev/termination-log";
/// The header that marks a host-assisted clone.
pub const CONTENT_TYPE_HEADER: &str = "x-cdi-content-type";

/// The server's orders, from the environment.
#[derive(Debug, Clone)]
pub struct Config {
    /// `LISTEN_ADDRESS:LISTEN_PORT`.
    pub listen: String,
    /// Server TLS (certificate, key, client CA, ciphers, minimum version).
    pub tls: TlsSettings,
    /// `CLIENT_NAME`: the client certificate's required common name.
    pub client_name: Option<String>,
    /// `UPLOAD_IMAGE_SIZE` in bytes.
    pub image_size: Option<u64>,
    /// `FILESYSTEM_OVERHEAD`.
    pub overhead: f64,
    /// `PREALLOCATION` (invalid values mean false here).
    pub preallocation: bool,
    /// `DEADLINE`, as seconds since the epoch.
    pub deadline: Option<i64>,
    /// `DESTINATION`, relocated.
    pub destination: PathBuf,
    /// The destination is CDI's block volume path (or any block device).
    pub block: bool,
    /// Seconds to keep serving after completion (`VDISK_LINGER_SECONDS`, tests).
    pub linger: Duration,
}

/// Parse an RFC 3339 timestamp (`2026-11-26T01:02:03Z`, fractional seconds and `+hh:mm`
/// offsets allowed) into seconds since the epoch.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    if b.get(i) == Some(&b'.') {
        i += 1;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
    }
    let offset = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-')) if i + 6 == b.len() && b[i + 3] == b':' => {
            let o = num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60;
            if sign == b'+' { o } else { -o }
        }
        _ => return None,
    };
    // Days from the civil date (proleptic Gregorian).
    let (yy, mm) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * mm + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + sec - offset)
}

fn read_file(paths: &Paths, var: &str) -> std::result::Result<Option<Vec<u8>>, String> {
    match env(var) {
        None => Ok(None),
        Some(p) => {
            let path = paths.relocate(&p);
            super::read_config_file(&path)
                .map(Some)
                .map_err(|e| format!("{var}: cannot read {}: {e}", path.display()))
        }
    }
}

impl Config {
    /// Read the contract's environment. `Err` is the reason to exit 1 (`invalid TLS config`).
    pub fn from_env(paths: &Paths) -> std::result::Result<Config, String> {
        let addr = env("LISTEN_ADDRESS").unwrap_or_else(|| "0.0.0.0".into());
        let port = env("LISTEN_PORT").unwrap_or_else(|| "8443".into());
        let listen = if addr.contains(':') && !addr.starts_with('[') {
            format!("[{addr}]:{port}")
        } else {
            format!("{addr}:{port}")
        };
        let cert = read_file(paths, "TLS_CERT_FILE")?;
        let key = read_file(paths, "TLS_KEY_FILE")?;
        let (Some(cert_pem), Some(key_pem)) = (cert, key) else {
            return Err("invalid TLS config: TLS_CERT_FILE and TLS_KEY_FILE are required".into());
        };
        let tls = TlsSettings {
            cert_pem,
            key_pem,
            client_ca_pem: read_file(paths, "CLIENT_CERT_FILE")?,
            min_version: env("TLS_MIN_VERSION"),
            ciphers: env("TLS_CIPHERS"),
        };
        let image_size = env("UPLOAD_IMAGE_SIZE")
            .map(|v| crate::sizing::parse_quantity(&v))
            .transpose()
            .map_err(|e| format!("UPLOAD_IMAGE_SIZE: {e}"))?;
        let destination =
            paths.relocate(&env("DESTINATION").unwrap_or_else(|| DEFAULT_DESTINATION.into()));
        let deadline = match env("DEADLINE") {
            Some(d) => Some(parse_rfc3339(&d).ok_or_else(|| format!("invalid DEADLINE '{d}'"))?),
            None => None,
        };
        Ok(Config {
            listen,
            tls,
            client_name: env("CLIENT_NAME"),
            image_size,
            overhead: env_overhead(),
            preallocation: env("PREALLOCATION")
                .and_then(|v| parse_go_bool(&v))
                .unwrap_or(false),
            deadline,
            block: destination == paths.get(super::importer::BLOCK_DEVICE)
                || is_block_device(&destination),
            destination,
            linger: Duration::from_secs(
                env("VDISK_LINGER_SECONDS")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            ),
        })
    }
}

/// What an upload asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A disk image (any format the library reads, possibly compressed).
    Image,
    /// A tar to unpack into the data directory.
    Archive,
    /// A raw device clone (snappy framed).
    BlockClone,
    /// A filesystem clone: a tar (snappy framed).
    FsClone,
}

/// The endpoint table: path → (async, form, archive).
fn route(path: &str) -> Option<(bool, bool, bool)> {
    let rest = path
        .strip_prefix("/v1beta1/")
        .or_else(|| path.strip_prefix("/v1alpha1/"))?;
    Some(match rest {
        "upload" => (false, false, false),
        "upload-async" => (true, false, false),
        "upload-archive" => (false, false, true),
        "upload-form" => (false, true, false),
        "upload-form-async" => (true, true, false),
        _ => return None,
    })
}

#[derive(Default)]
struct State {
    busy: bool,
    done: bool,
}

/// How the server finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// `Upload Complete` or `Clone Complete`.
    pub message: &'static str,
    /// Preallocation was applied.
    pub preallocated: bool,
}

struct App {
    cfg: Config,
    state: Mutex<State>,
    done: Mutex<Option<mpsc::Sender<Finished>>>,
    log: Box<dyn Fn(&str) + Send + Sync>,
}

/// A running upload server.
pub struct Running {
    handle: ServerHandle,
    app: Arc<App>,
    done: mpsc::Receiver<Finished>,
}

/// Bind and start serving. `log` receives one line per request outcome.
pub fn start(cfg: Config, log: Box<dyn Fn(&str) + Send + Sync>) -> Result<Running> {
    let tls = crate::net::server::tls_config(&cfg.tls)?;
    let server = Server::bind(&cfg.listen, Some(tls))?;
    let (tx, rx) = mpsc::channel();
    let app = Arc::new(App {
        cfg,
        state: Mutex::new(State::default()),
        done: Mutex::new(Some(tx)),
        log,
    });
    let a = app.clone();
    let handler: Handler = Arc::new(move |req: &mut Request<'_>| a.handle(req));
    let handle = server.try_spawn(handler)?;
    Ok(Running {
        handle,
        app,
        done: rx,
    })
}

impl Running {
    /// The address the server listens on.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.handle.local_addr()
    }

    /// Serve until an upload completes or the deadline passes with nothing in progress;
    /// returns the termination message and the exit code.
    pub fn wait(self) -> (Termination, i32) {
        let now = || {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64)
        };
        let outcome = loop {
            let wait = match self.app.cfg.deadline {
                Some(d) => Duration::from_secs((d - now()).clamp(0, 3600) as u64)
                    .max(Duration::from_millis(200)),
                None => Duration::from_secs(3600),
            };
            match self.done.recv_timeout(wait) {
                Ok(f) => break Some(f),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let passed = self.app.cfg.deadline.is_some_and(|d| now() >= d);
                    let mut st = self.app.state.lock().unwrap_or_else(|p| p.into_inner());
                    if passed && !st.busy && !st.done {
                        // Refuse new uploads from here on.
                        st.done = true;
                        break None;
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break None,
            }
        };
        if !self.app.cfg.linger.is_zero() {
            std::thread::sleep(self.app.cfg.linger);
        }
        self.handle.shutdown();
        match outcome {
            Some(f) => (
                Termination {
                    preallocation_applied: Some(f.preallocated),
                    message: Some(f.message.into()),
                    ..Termination::default()
                },
                0,
            ),
            None => (
                Termination {
                    deadline_passed: Some(true),
                    message: Some("Deadline Passed".into()),
                    ..Termination::default()
                },
                0,
            ),
        }
    }
}

/// Write the termination message.
pub fn write_termination(paths: &Paths, t: &Termination) -> Result<()> {
    super::write_termination(&paths.get(TERMINATION_LOG), &t.to_json())
}

impl App {
    fn handle(&self, req: &mut Request<'_>) -> Response {
        let path = req.path.clone();
        if path == "/healthz" {
            return Response::text(200, "OK");
        }
        let Some((is_async, form, archive)) = route(&path) else {
            return Response::empty(404);
        };
        if req.method == "HEAD" && is_async && !form {
            // virtctl probes for async support before any authentication.
            return Response::empty(200);
        }
        if req.method != "POST" {
            return Response::empty(404);
        }
        if self.cfg.tls.client_ca_pem.is_some() {
            let name_ok = match &self.cfg.client_name {
                Some(n) => req.peer_common_name.as_deref() == Some(n.as_str()),
                None => true,
            };
            if !req.peer_verified || !name_ok {
                (self.log)(&format!(
                    "{path}: refused client {} (certificate CN {:?})",
                    req.peer_addr, req.peer_common_name
                ));
                return Response::empty(401);
            }
        }
        let kind = match req.header(CONTENT_TYPE_HEADER) {
            Some("blockdevice-clone") => Kind::BlockClone,
            Some("filesystem-clone") => Kind::FsClone,
            _ if archive => Kind::Archive,
            _ => Kind::Image,
        };
        if matches!(kind, Kind::BlockClone | Kind::FsClone) && is_async {
            return Response::text(500, "Saving stream failed: async clone not supported");
        }
        {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if st.done {
                return Response::empty(409);
            }
            if st.busy {
                return Response::empty(503);
            }
            st.busy = true;
        }
        let r = self.receive(req, kind, form);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.busy = false;
        match r {
            Ok(preallocated) => {
                st.done = true;
                let message = if matches!(kind, Kind::BlockClone | Kind::FsClone) {
                    "Clone Complete"
                } else {
                    "Upload Complete"
                };
                (self.log)(&format!("{path}: {message}"));
                if let Some(tx) = self.done.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    let _ = tx.send(Finished {
                        message,
                        preallocated,
                    });
                }
                Response::empty(200)
            }
            Err(e) => {
                (self.log)(&format!("{path}: {e}"));
                if e.kind() == ErrorKind::NoSpace {
                    Response::text(
                        400,
                        format!(
                            "Saving stream failed: effective image size is larger than the reported available storage: {e}"
                        ),
                    )
                } else if e.kind() == ErrorKind::InvalidArgument && form {
                    Response::text(400, format!("Saving stream failed: {e}"))
                } else {
                    Response::text(500, format!("Saving stream failed: {e}"))
                }
            }
        }
    }

    /// Stream the request body to the destination; returns whether it was preallocated.
    fn receive(&self, req: &mut Request<'_>, kind: Kind, form: bool) -> Result<bool> {
        let content_type = req.header("content-type").unwrap_or("").to_string();
        let total = req.content_length();
        let body = req.body();
        if form {
            let boundary = crate::net::multipart::boundary(&content_type)
                .ok_or_else(|| Error::invalid("the request is not multipart/form-data"))?;
            let mut mp = crate::net::multipart::Multipart::new(body, &boundary);
            let log = &self.log;
            let part = crate::net::multipart::find_field(&mut mp, "file", &mut |p| {
                log(&format!("ignoring form part {:?}", p.name))
            })?;
            return self.store(Box::new(part), kind, None);
        }
        match kind {
            Kind::BlockClone | Kind::FsClone => {
                let snappy = snap::read::FrameDecoder::new(body);
                self.store(Box::new(snappy), kind, None)
            }
            _ => self.store(Box::new(body), kind, total),
        }
    }

    fn store(
        &self,
        src: Box<dyn Read + Send + '_>,
        kind: Kind,
        total: Option<u64>,
    ) -> Result<bool> {
        let dest = &self.cfg.destination;
        let block = self.cfg.block;
        let data_dir = dest
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let mut opts = ImportOptions {
            overhead: self.cfg.overhead,
            requested_size: self.cfg.image_size,
            preallocate: self.cfg.preallocation,
            input_size: total,
            log: Some(&*self.log),
            ..ImportOptions::default()
        };
        let device_or_file = || {
            if block {
                ImportTarget::Device(dest.clone())
            } else {
                ImportTarget::File(dest.clone())
            }
        };
        let report = match kind {
            Kind::Image => {
                opts.content = ContentType::Kubevirt;
                crate::ingest::import(src, &device_or_file(), &mut opts)?
            }
            Kind::Archive => {
                if block {
                    return Err(Error::invalid("archive uploads need a filesystem volume"));
                }
                opts.content = ContentType::Archive;
                crate::ingest::import(src, &ImportTarget::Directory(data_dir), &mut opts)?
            }
            Kind::BlockClone => {
                opts.content = ContentType::Raw;
                crate::ingest::import(src, &device_or_file(), &mut opts)?
            }
            Kind::FsClone if !block => {
                opts.content = ContentType::Archive;
                crate::ingest::import(src, &ImportTarget::Directory(data_dir), &mut opts)?;
                // CDI reports a filesystem-to-filesystem clone as preallocated.
                return Ok(true);
            }
            Kind::FsClone => {
                opts.content = ContentType::Raw;
                let target = device_or_file();
                with_tar_disk_entry(src, |disk| crate::ingest::import(disk, &target, &mut opts))?
            }
        };
        Ok(report.preallocation_applied)
    }
}

fn is_block_device(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device())
}

/// Call `f` with the first regular entry of a tar stream whose name contains `disk.img`, as a
/// reader of its whole content (GNU sparse entries expanded, holes read as zeros): a
/// filesystem clone onto a block volume.
fn with_tar_disk_entry<'a, T>(
    src: Box<dyn Read + Send + 'a>,
    f: impl FnOnce(Box<dyn Read + Send + '_>) -> Result<T>,
) -> Result<T> {
    let mut ar = crate::archive::tar::TarReader::new(src);
    while let Some(entry) = ar.next_entry()? {
        if entry.is_file() && entry.path.contains("disk.img") {
            return f(Box::new(ar.into_entry_reader()));
        }
    }
    Err(Error::new(
        ErrorKind::NotFound,
        "no disk image found in tar",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2026-11-26T01:02:03Z"), Some(1_795_654_923));
        assert_eq!(
            parse_rfc3339("2026-11-26T03:02:03.5+02:00"),
            parse_rfc3339("2026-11-26T01:02:03Z")
        );
        assert_eq!(
            parse_rfc3339("2000-02-29T12:00:00-01:30"),
            Some(951_831_000)
        );
        for bad in [
            "",
            "2026-13-01T00:00:00Z",
            "2026-11-26 01:02:03",
            "2026-11-26T01:02:03+0200",
            "x",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn routes() {
        assert_eq!(route("/v1beta1/upload"), Some((false, false, false)));
        assert_eq!(
            route("/v1alpha1/upload-form-async"),
            Some((true, true, false))
        );
        assert_eq!(route("/v1beta1/upload-archive"), Some((false, false, true)));
        assert_eq!(route("/v1beta1/other"), None);
        assert_eq!(route("/upload"), None);
    }

    #[test]
    fn tar_disk_entry_is_found_and_bounded() {
        let mut ar = tar::Builder::new(Vec::new());
        for (name, data) in [
            ("etc/x", b"abc".to_vec()),
            ("./disk.img", vec![7u8; 1000]),
            ("z", b"zz".to_vec()),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            ar.append_data(&mut h, name, &data[..]).unwrap();
        }
        let bytes = ar.into_inner().unwrap();
        let read_all = |b: Vec<u8>| {
            with_tar_disk_entry(Box::new(std::io::Cursor::new(b)), |mut r| {
                let mut got = Vec::new();
                r.read_to_end(&mut got).map_err(|e| Error::io("read", e))?;
                Ok(got)
            })
        };
        assert_eq!(read_all(bytes.clone()).unwrap(), vec![7u8; 1000]);
        assert!(read_all(bytes[..700].to_vec()).is_err());
        let mut other = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_cksum();
        other.append_data(&mut h, "other", &b"x"[..]).unwrap();
        let e = read_all(other.into_inner().unwrap()).unwrap_err();
        assert!(e.to_string().contains("no disk image found in tar"), "{e}");
    }
}
