//! The importer pod (CDI's `cdi-importer`): reads its orders from the environment, streams the
//! source (HTTP(S), an S3 or Google Cloud Storage object, a registry containerDisk, or nothing
//! for a blank disk) straight onto the volume through [`crate::ingest::import`] with no
//! scratch space, and says how it went as CDI's termination message and exit code. The binary `vdisk-importer` only wires this to
//! the process (arguments, metrics endpoint, exit).

use super::{Paths, Termination, env, env_overhead, parse_go_bool};
use crate::error::{Error, ErrorKind, Result};
use crate::ingest::{ContentType, ImportOptions, ImportTarget};
use crate::net::digest::{Algorithm, Hasher};
use crate::net::http::{Client, ClientConfig, Proxy};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where the disk goes on a filesystem volume.
pub const DATA_DIR: &str = "/data";
/// The disk file on a filesystem volume.
pub const DISK_FILE: &str = "/data/disk.img";
/// The block volume's device node.
pub const BLOCK_DEVICE: &str = "/dev/cdi-block-volume";
/// The termination log.
pub const TERMINATION_LOG: &str = "/dev/termination-log";
/// Directory of secret-backed extra headers.
pub const EXTRA_HEADERS_DIR: &str = "/extraheaders";
/// The proxy CA directory, read even when `IMPORTER_PROXY_CERT_DIR` is unset.
pub const PROXY_CERTS_DIR: &str = "/proxycerts";
/// User agent of CDI's Go importer (servers may match it).
pub const USER_AGENT: &str = "cdi-golang-importer";

/// Where the data comes from (`IMPORTER_SOURCE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `http`: HTTP or HTTPS URL.
    Http,
    /// `s3`: an S3 object, `http(s)://host/bucket/key` (path-style).
    S3,
    /// `gcs`: a Google Cloud Storage object, `gs://bucket/object`.
    Gcs,
    /// `registry`: `docker://` or `oci-archive:` containerDisk.
    Registry,
    /// `none`: a blank disk.
    Blank,
    /// Any other value, reported as CDI does.
    Other(String),
}

/// A digest the downloaded bytes must have (`IMPORTER_CHECKSUM`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checksum {
    /// `md5`, `sha1`, `sha256` or `sha512`.
    pub algorithm: Algorithm,
    /// Expected digest, lowercase hex.
    pub hex: String,
}

impl Checksum {
    /// Parse `algo:hex`.
    pub fn parse(s: &str) -> Result<Checksum> {
        let bad = || {
            Error::invalid(format!(
                "invalid checksum '{s}': expected md5|sha1|sha256|sha512:<hex>"
            ))
        };
        let (a, h) = s.split_once(':').ok_or_else(bad)?;
        let algorithm = Algorithm::parse(&a.trim().to_ascii_lowercase()).ok_or_else(bad)?;
        let h = h.trim().to_ascii_lowercase();
        if h.len() != algorithm.hex_len() || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        Ok(Checksum { algorithm, hex: h })
    }
}

/// The importer's orders, from the environment.
#[derive(Debug, Clone)]
pub struct Config {
    /// `IMPORTER_SOURCE`.
    pub source: Source,
    /// `IMPORTER_ENDPOINT`.
    pub endpoint: String,
    /// `IMPORTER_CONTENTTYPE`.
    pub content: ContentType,
    /// `IMPORTER_IMAGE_SIZE` in bytes.
    pub image_size: Option<u64>,
    /// `OWNER_UID` (the progress metric's label).
    pub owner_uid: String,
    /// `FILESYSTEM_OVERHEAD`.
    pub overhead: f64,
    /// `PREALLOCATION`.
    pub preallocation: bool,
    /// `INSECURE_TLS`.
    pub insecure_tls: bool,
    /// `IMPORTER_ACCESS_KEY_ID` and `IMPORTER_SECRET_KEY`, when both are set.
    pub credentials: Option<(String, String)>,
    /// `GOOGLE_APPLICATION_CREDENTIALS`: a service-account key file (gcs).
    pub google_credentials: Option<PathBuf>,
    /// CA certificates (PEM) from `IMPORTER_CERT_DIR`.
    pub ca_pem: Vec<Vec<u8>>,
    /// Proxy CA certificates (PEM) from `IMPORTER_PROXY_CERT_DIR` and `/proxycerts`.
    pub proxy_ca_pem: Vec<Vec<u8>>,
    /// Extra request headers (env and secret files).
    pub extra_headers: Vec<(String, String)>,
    /// `IMPORTER_CHECKSUM`.
    pub checksum: Option<Checksum>,
    /// `IMPORTER_REGISTRY_IMAGE_ARCHITECTURE`.
    pub architecture: Option<String>,
    /// `CACHE_MODE=TRYNONE`: write with O_DIRECT where possible.
    pub direct_io: bool,
    /// `IMPORTER_READY_FILE` (node pull).
    pub ready_file: Option<PathBuf>,
    /// `IMPORTER_DONE_FILE` (node pull).
    pub done_file: Option<PathBuf>,
    /// `IMPORTER_PULL_METHOD=node`: the endpoint is a `cdi-containerimage-server`, whose
    /// `/info` gives the image's environment for the labels.
    pub node_pull: bool,
    /// How long to wait for the ready file.
    pub ready_timeout: Duration,
    /// A read that waits this long fails (and the download resumes): CDI's 10 minutes, or
    /// `VDISK_IDLE_TIMEOUT` seconds.
    pub idle_timeout: Duration,
}

/// How the importer ends: its exit code and termination message (none: write nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Process exit code.
    pub code: i32,
    /// Termination message text.
    pub message: Option<String>,
}

impl Outcome {
    fn fail(msg: impl Into<String>) -> Outcome {
        Outcome {
            code: 1,
            message: Some(msg.into()),
        }
    }
    fn json(t: &Termination) -> Outcome {
        Outcome {
            code: 0,
            message: Some(t.to_json()),
        }
    }
}

/// Read the PEM files of a certificate directory (dot files and subdirectories skipped;
/// files without certificates are ignored with a log line, as Go's cert pool does).
pub(crate) fn read_cert_dir(dir: &Path, log: &dyn Fn(&str)) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    let mut names: Vec<_> = rd.flatten().collect();
    names.sort_by_key(|e| e.file_name());
    for e in names {
        let name = e.file_name().to_string_lossy().into_owned();
        let is_file = std::fs::metadata(e.path()).is_ok_and(|m| m.is_file());
        if name.starts_with('.') || !is_file {
            continue;
        }
        match super::read_config_file(&e.path()) {
            Ok(b) if crate::net::http::parse_certs(&b).is_ok() => out.push(b),
            Ok(_) => log(&format!(
                "{}: no PEM certificate, ignored",
                e.path().display()
            )),
            Err(err) => log(&format!("{}: {err}", e.path().display())),
        }
    }
    out
}

fn parse_header_line(line: &str) -> Option<(String, String)> {
    let (k, v) = line.split_once(':')?;
    let k = k.trim();
    if k.is_empty() || k.bytes().any(|b| b <= b' ' || b >= 0x7f) {
        return None;
    }
    Some((k.to_string(), v.trim().to_string()))
}

impl Config {
    /// Read the contract's environment. `Err` carries the outcome of a refusal (an invalid
    /// `PREALLOCATION` exits 1 with no termination message, as CDI does).
    pub fn from_env(paths: &Paths, log: &dyn Fn(&str)) -> std::result::Result<Config, Outcome> {
        let source = match env("IMPORTER_SOURCE").as_deref() {
            Some("http") => Source::Http,
            Some("s3") => Source::S3,
            Some("gcs") => Source::Gcs,
            Some("registry") => Source::Registry,
            Some("none") => Source::Blank,
            Some(o) => Source::Other(o.to_string()),
            None => Source::Other(String::new()),
        };
        let content = match env("IMPORTER_CONTENTTYPE").as_deref() {
            Some("archive") => ContentType::Archive,
            _ => ContentType::Kubevirt,
        };
        let image_size = match env("IMPORTER_IMAGE_SIZE") {
            Some(v) => Some(crate::sizing::parse_quantity(&v).map_err(|e| {
                Outcome::fail(format!("Unable to process data: IMPORTER_IMAGE_SIZE: {e}"))
            })?),
            None => None,
        };
        let preallocation = match std::env::var("PREALLOCATION").ok().as_deref() {
            None | Some("") => false,
            Some(v) => parse_go_bool(v).ok_or_else(|| {
                log(&format!("invalid PREALLOCATION value '{v}'"));
                Outcome {
                    code: 1,
                    message: None,
                }
            })?,
        };
        let credentials = match (env("IMPORTER_ACCESS_KEY_ID"), env("IMPORTER_SECRET_KEY")) {
            (Some(a), Some(s)) => Some((a, s)),
            _ => None,
        };
        let ca_pem = env("IMPORTER_CERT_DIR")
            .map(|d| read_cert_dir(&paths.relocate(&d), log))
            .unwrap_or_default();
        let mut proxy_ca_pem = env("IMPORTER_PROXY_CERT_DIR")
            .map(|d| read_cert_dir(&paths.relocate(&d), log))
            .unwrap_or_default();
        let default_proxy_dir = paths.get(PROXY_CERTS_DIR);
        if env("IMPORTER_PROXY_CERT_DIR").is_none_or(|d| paths.relocate(&d) != default_proxy_dir) {
            proxy_ca_pem.extend(read_cert_dir(&default_proxy_dir, log));
        }
        let mut extra_headers = Vec::new();
        let mut env_headers: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k.starts_with("IMPORTER_EXTRA_HEADER_"))
            .collect();
        env_headers.sort();
        for (k, v) in env_headers {
            match parse_header_line(&v) {
                Some(h) => extra_headers.push(h),
                None => log(&format!("{k}: not a 'Name: value' header, ignored")),
            }
        }
        if let Ok(rd) = std::fs::read_dir(paths.get(EXTRA_HEADERS_DIR)) {
            let mut dirs: Vec<_> = rd.flatten().collect();
            dirs.sort_by_key(|e| e.file_name());
            for d in dirs {
                if d.file_name().to_string_lossy().starts_with('.') {
                    continue;
                }
                let Ok(files) = std::fs::read_dir(d.path()) else {
                    continue;
                };
                let mut files: Vec<_> = files.flatten().collect();
                files.sort_by_key(|e| e.file_name());
                for f in files {
                    let name = f.file_name().to_string_lossy().into_owned();
                    if name.starts_with('.')
                        || !std::fs::metadata(f.path()).is_ok_and(|m| m.is_file())
                    {
                        continue;
                    }
                    let text = super::read_config_file(&f.path())
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default();
                    match parse_header_line(text.lines().next().unwrap_or("")) {
                        Some(h) => extra_headers.push(h),
                        None => log(&format!(
                            "{}: not a 'Name: value' header, ignored",
                            f.path().display()
                        )),
                    }
                }
            }
        }
        let checksum = match env("IMPORTER_CHECKSUM") {
            Some(c) => Some(
                Checksum::parse(&c)
                    .map_err(|e| Outcome::fail(format!("Unable to process data: {e}")))?,
            ),
            None => None,
        };
        Ok(Config {
            source,
            endpoint: env("IMPORTER_ENDPOINT").unwrap_or_default(),
            content,
            image_size,
            owner_uid: env("OWNER_UID").unwrap_or_default(),
            overhead: env_overhead(),
            preallocation,
            insecure_tls: env("INSECURE_TLS")
                .and_then(|v| parse_go_bool(&v))
                .unwrap_or(false),
            credentials,
            google_credentials: env("GOOGLE_APPLICATION_CREDENTIALS").map(|p| paths.relocate(&p)),
            ca_pem,
            proxy_ca_pem,
            extra_headers,
            checksum,
            architecture: env("IMPORTER_REGISTRY_IMAGE_ARCHITECTURE"),
            direct_io: env("CACHE_MODE").is_some_and(|m| m == "TRYNONE"),
            ready_file: env("IMPORTER_READY_FILE").map(|p| paths.relocate(&p)),
            done_file: env("IMPORTER_DONE_FILE").map(|p| paths.relocate(&p)),
            node_pull: env("IMPORTER_PULL_METHOD").is_some_and(|m| m == "node"),
            ready_timeout: Duration::from_secs(
                env("VDISK_READY_TIMEOUT")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(600),
            ),
            idle_timeout: Duration::from_secs(
                env("VDISK_IDLE_TIMEOUT")
                    .and_then(|v| v.parse().ok())
                    .filter(|&s: &u64| s > 0)
                    .unwrap_or(600),
            ),
        })
    }
}

/// The source and its running digest, shared by the reader handed to the import and the
/// check run before the disk is committed.
struct Tee {
    inner: Box<dyn Read + Send>,
    hasher: Option<Hasher>,
    eof: bool,
}

struct TeeReader(Arc<Mutex<Tee>>);

impl Read for TeeReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = t.inner.read(buf)?;
        if n == 0 {
            t.eof = true;
        } else if let Some(h) = &mut t.hasher {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// Marker text the controller looks for.
const CHECKSUM_MISMATCH: &str = "checksum mismatch";

/// Read the rest of the source and compare its digest.
fn verify(tee: &Arc<Mutex<Tee>>, want: &Checksum) -> Result<()> {
    let mut t = tee.lock().unwrap_or_else(|p| p.into_inner());
    let mut buf = vec![0u8; 256 << 10];
    while !t.eof {
        let n = t
            .inner
            .read(&mut buf)
            .map_err(|e| Error::new(ErrorKind::Network, format!("cannot read the source: {e}")))?;
        if n == 0 {
            t.eof = true;
        } else if let Some(h) = &mut t.hasher {
            h.update(&buf[..n]);
        }
    }
    let mut h = t.hasher.take().expect("verify runs once");
    let algo = h.algorithm().name();
    let got = h.finish_hex();
    if got != want.hex {
        return Err(Error::new(
            ErrorKind::Corrupt,
            format!(
                "{CHECKSUM_MISMATCH}: expected {algo}:{}, calculated {algo}:{got}",
                want.hex
            ),
        ));
    }
    Ok(())
}

/// Progress as a percentage of `total` input bytes.
fn percent(done: u64, total: Option<u64>) -> Option<f64> {
    total
        .filter(|&t| t > 0)
        .map(|t| (done as f64 * 100.0 / t as f64).min(100.0))
}

/// The import's target: the block device when it exists, else `/data/disk.img`, or the data
/// directory for archives.
fn target(paths: &Paths, content: ContentType) -> std::result::Result<ImportTarget, Outcome> {
    let dev = paths.get(BLOCK_DEVICE);
    let block = dev.exists();
    match content {
        ContentType::Archive if block => Err(Outcome::fail(
            "Unable to process data: archive content needs a filesystem volume",
        )),
        ContentType::Archive => Ok(ImportTarget::Directory(paths.get(DATA_DIR))),
        ContentType::Kubevirt | ContentType::Raw if block => Ok(ImportTarget::Device(dev)),
        ContentType::Kubevirt | ContentType::Raw => Ok(ImportTarget::File(paths.get(DISK_FILE))),
    }
}

/// Run the import the configuration describes, reporting progress (a percentage, never
/// decreasing) to `progress` and log lines to `log`.
pub fn run(paths: &Paths, cfg: &Config, progress: &dyn Fn(f64), log: &dyn Fn(&str)) -> Outcome {
    let out = match &cfg.source {
        Source::Blank => blank(paths, cfg, log),
        Source::Http => match wait_ready(cfg) {
            Ok(endpoint) => http(paths, cfg, &endpoint, progress, log),
            Err(o) => o,
        },
        Source::S3 => s3(paths, cfg, progress, log),
        Source::Gcs => gcs(paths, cfg, progress, log),
        Source::Registry => registry(paths, cfg, progress, log),
        Source::Other(s) => other_source(s),
    };
    if let Some(done) = &cfg.done_file
        && let Err(e) = std::fs::write(done, b"")
    {
        log(&format!("cannot create {}: {e}", done.display()));
    }
    if out.code == 0 {
        progress(100.0);
    }
    out
}

/// Node pull: wait for the ready file; its content names the disk file served on localhost.
fn wait_ready(cfg: &Config) -> std::result::Result<String, Outcome> {
    let Some(ready) = &cfg.ready_file else {
        return Ok(cfg.endpoint.clone());
    };
    let t0 = Instant::now();
    while !ready.exists() {
        if t0.elapsed() > cfg.ready_timeout {
            return Err(Outcome::fail(format!(
                "Timeout waiting for file {}",
                ready.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let name = super::read_config_file(ready)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let name = name.trim();
    Ok(match cfg.endpoint.strip_suffix("disk.img") {
        Some(base) if !name.is_empty() => format!("{base}{name}"),
        _ => cfg.endpoint.clone(),
    })
}

fn import_options<'a>(cfg: &Config, total: Option<u64>) -> ImportOptions<'a> {
    ImportOptions {
        content: cfg.content,
        overhead: cfg.overhead,
        requested_size: cfg.image_size,
        preallocate: cfg.preallocation,
        input_size: total,
        direct_io: cfg.direct_io,
        ..ImportOptions::default()
    }
}

fn success(preallocated: bool, labels: BTreeMap<String, String>) -> Outcome {
    Outcome::json(&Termination {
        scratch_space_required: Some(false),
        preallocation_applied: Some(preallocated),
        labels,
        message: Some("Import Complete".into()),
        ..Termination::default()
    })
}

/// Stream `src` (of `total` bytes when known) into the target; checksum-verified when asked.
fn ingest(
    paths: &Paths,
    cfg: &Config,
    src: Box<dyn Read + Send>,
    total: Option<u64>,
    checksum: Option<&Checksum>,
    progress: &dyn Fn(f64),
    log: &dyn Fn(&str),
) -> std::result::Result<crate::ingest::ImportReport, Outcome> {
    let target = target(paths, cfg.content)?;
    let tee = Arc::new(Mutex::new(Tee {
        inner: src,
        hasher: checksum.map(|c| Hasher::new(c.algorithm)),
        eof: false,
    }));
    let mut on_progress = |done: u64, _: Option<u64>| {
        if let Some(p) = percent(done, total) {
            progress(p);
        }
        true
    };
    let mut check = || match checksum {
        Some(c) => verify(&tee, c),
        None => Ok(()),
    };
    let mut opts = import_options(cfg, total);
    opts.progress = Some(&mut on_progress);
    opts.log = Some(log);
    opts.before_commit = Some(&mut check);
    let reader = TeeReader(tee.clone());
    let r = crate::ingest::import(Box::new(reader), &target, &mut opts);
    r.map_err(|e| {
        let msg = format!("Unable to process data: {e}");
        if e.to_string().contains(CHECKSUM_MISMATCH) {
            // CDI reports a mismatch with exit 0 and a JSON message; the controller marks the
            // import as failed for good.
            Outcome::json(&Termination {
                message: Some(msg),
                ..Termination::default()
            })
        } else {
            Outcome::fail(msg)
        }
    })
}

/// An HTTP client with the importer's TLS settings (CA and proxy CA bundles, `INSECURE_TLS`),
/// proxies from the environment and CDI's user agent.
fn client(
    cfg: &Config,
    headers: Vec<(String, String)>,
    basic_auth: Option<(String, String)>,
) -> Result<Client> {
    Client::new(ClientConfig {
        user_agent: USER_AGENT.into(),
        insecure: cfg.insecure_tls,
        ca_pem: cfg
            .ca_pem
            .iter()
            .chain(&cfg.proxy_ca_pem)
            .cloned()
            .collect(),
        headers,
        basic_auth,
        proxy: Proxy::from_env()?,
        idle_timeout: cfg.idle_timeout,
        ..ClientConfig::default()
    })
}

fn http(
    paths: &Paths,
    cfg: &Config,
    endpoint: &str,
    progress: &dyn Fn(f64),
    log: &dyn Fn(&str),
) -> Outcome {
    let connect_fail =
        |e: Error| Outcome::fail(format!("Unable to connect to http data source: {e}"));
    let client = match client(cfg, cfg.extra_headers.clone(), cfg.credentials.clone()) {
        Ok(c) => c,
        Err(e) => return connect_fail(e),
    };
    let dl = match client.download(endpoint) {
        Ok(d) => d,
        Err(e) => return connect_fail(e),
    };
    let labels = || {
        if cfg.node_pull {
            node_labels(&client, endpoint, log)
        } else {
            BTreeMap::new()
        }
    };
    transfer(
        paths,
        cfg,
        dl,
        cfg.checksum.as_ref(),
        &labels,
        progress,
        log,
    )
}

/// Stream a download that has started into the target and say how it went; `labels` gives
/// the termination message's labels after a success.
fn transfer(
    paths: &Paths,
    cfg: &Config,
    dl: crate::net::http::Download,
    checksum: Option<&Checksum>,
    labels: &dyn Fn() -> BTreeMap<String, String>,
    progress: &dyn Fn(f64),
    log: &dyn Fn(&str),
) -> Outcome {
    let total = dl.total();
    log(&format!(
        "downloading {} ({})",
        dl.url(),
        total.map_or("size unknown".to_string(), |t| format!("{t} bytes"))
    ));
    if let Some(t) = dl.content_type()
        && t.starts_with("text/")
    {
        log(&format!("warning: the server says the content is {t}"));
    }
    match ingest(paths, cfg, Box::new(dl), total, checksum, progress, log) {
        Ok(r) => {
            log(&format!(
                "imported {} ({} bytes read, {} written, disk {} bytes)",
                r.format.map_or("?", |f| f.name()),
                r.bytes_read,
                r.bytes_written,
                r.disk_size
            ));
            success(r.preallocation_applied, labels())
        }
        Err(o) => o,
    }
}

/// Node pull: the labels from the containerDisk's environment, which the image server beside
/// the disk lists at `/info` (`{"env":["K=V",...]}`). A server that cannot say loses only the
/// labels, with a warning.
fn node_labels(client: &Client, endpoint: &str, log: &dyn Fn(&str)) -> BTreeMap<String, String> {
    let r = crate::net::http::Url::parse(endpoint)
        .and_then(|u| u.join("/info"))
        .and_then(|u| client.send("GET", &u.to_string(), &[]))
        .and_then(|r| {
            if r.status != 200 {
                return Err(Error::new(
                    ErrorKind::Network,
                    format!("/info: status {}", r.status),
                ));
            }
            r.read_to_vec(1 << 20)
        })
        .and_then(|b| {
            serde_json::from_slice::<serde_json::Value>(&b)
                .map_err(|e| Error::invalid(format!("/info is not JSON: {e}")))
        });
    match r {
        Ok(v) => crate::net::registry::env_to_labels(
            v["env"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e.as_str()),
        ),
        Err(e) => {
            log(&format!("warning: no image labels: {e}"));
            BTreeMap::new()
        }
    }
}

/// `s3`: a GET of the path-style object URL, signed with SigV4 when there are keys (afresh
/// for every resume), anonymous otherwise. Neither extra headers nor the checksum apply, as
/// in CDI.
fn s3(paths: &Paths, cfg: &Config, progress: &dyn Fn(f64), log: &dyn Fn(&str)) -> Outcome {
    let connect_fail =
        |e: Error| Outcome::fail(format!("Unable to connect to s3 data source: {e}"));
    let endpoint = match crate::net::s3::Endpoint::parse(&cfg.endpoint) {
        Ok(e) => e,
        Err(e) => return connect_fail(e),
    };
    log(&format!(
        "s3: bucket {}, key {}, region {}{}",
        endpoint.bucket,
        endpoint.key,
        endpoint.region,
        if cfg.credentials.is_some() {
            ""
        } else {
            ", no keys: anonymous"
        }
    ));
    let req = crate::net::s3::ObjectRequest {
        endpoint,
        credentials: cfg.credentials.clone().map(|(access_key, secret_key)| {
            crate::net::s3::Credentials {
                access_key,
                secret_key,
            }
        }),
    };
    let client = match client(cfg, Vec::new(), None) {
        Ok(c) => c,
        Err(e) => return connect_fail(e),
    };
    let url = req.url();
    let dl = match client.download_with(&url, req.header_source()) {
        Ok(d) => d,
        Err(e) => return connect_fail(e),
    };
    transfer(paths, cfg, dl, None, &BTreeMap::new, progress, log)
}

/// `gcs`: a GET of `{base}/bucket/object` (base from `STORAGE_EMULATOR_HOST`), with a
/// bearer token for the service-account key `GOOGLE_APPLICATION_CREDENTIALS` names, or
/// anonymous without one.
fn gcs(paths: &Paths, cfg: &Config, progress: &dyn Fn(f64), log: &dyn Fn(&str)) -> Outcome {
    use crate::net::gcs;
    let connect_fail =
        |e: Error| Outcome::fail(format!("Unable to connect to gcs data source: {e}"));
    let object = match gcs::Object::parse(&cfg.endpoint) {
        Ok(o) => o,
        Err(e) => return connect_fail(e),
    };
    let account = match &cfg.google_credentials {
        None => None,
        Some(p) => {
            let sa = super::read_config_file(p)
                .map_err(|e| Error::io("cannot read the credentials file", e).with_path(p))
                .and_then(|b| gcs::ServiceAccount::from_json(&b).map_err(|e| e.with_path(p)));
            match sa {
                Ok(sa) => Some(sa),
                Err(e) => return connect_fail(e),
            }
        }
    };
    let url = object.url(&gcs::base_from_env());
    log(&format!(
        "gcs: bucket {}, object {}, {}",
        object.bucket,
        object.name,
        match &account {
            Some(sa) => format!("as {}", sa.client_email),
            None => "anonymous".to_string(),
        }
    ));
    let client = match client(cfg, Vec::new(), None) {
        Ok(c) => c,
        Err(e) => return connect_fail(e),
    };
    let dl = match client.download_with(&url, gcs::header_source(client.clone(), account)) {
        Ok(d) => d,
        Err(e) => return connect_fail(e),
    };
    transfer(paths, cfg, dl, None, &BTreeMap::new, progress, log)
}

fn registry(paths: &Paths, cfg: &Config, progress: &dyn Fn(f64), log: &dyn Fn(&str)) -> Outcome {
    if cfg.content != ContentType::Kubevirt {
        return Outcome::fail(
            "Unable to process data: Registry source supports only content type kubevirt",
        );
    }
    let proxy = match Proxy::from_env() {
        Ok(p) => p,
        Err(e) => return Outcome::fail(format!("Unable to connect to registry data source: {e}")),
    };
    let opts = crate::net::registry::RegistryOptions {
        credentials: cfg.credentials.clone(),
        insecure: cfg.insecure_tls,
        ca_pem: cfg
            .ca_pem
            .iter()
            .chain(&cfg.proxy_ca_pem)
            .cloned()
            .collect(),
        architecture: cfg.architecture.clone(),
        proxy,
        headers: cfg.extra_headers.clone(),
        user_agent: USER_AGENT.into(),
    };
    let image = match crate::net::registry::open(&cfg.endpoint, &opts) {
        Ok(i) => i,
        Err(e) => {
            return Outcome::fail(format!("Unable to process data: failed to pull image: {e}"));
        }
    };
    let labels = image.labels.clone();
    let disk = match image.disk() {
        Ok(d) => d,
        Err(e) => {
            return Outcome::fail(format!("Unable to process data: failed to pull image: {e}"));
        }
    };
    log(&format!(
        "importing {} ({} bytes) from {}",
        disk.name, disk.size, cfg.endpoint
    ));
    let size = disk.size;
    match ingest(paths, cfg, Box::new(disk), Some(size), None, progress, log) {
        Ok(r) => success(r.preallocation_applied, labels),
        Err(o) => o,
    }
}

fn blank(paths: &Paths, cfg: &Config, log: &dyn Fn(&str)) -> Outcome {
    if cfg.content == ContentType::Archive {
        return Outcome::fail("Cannot create empty disk with content type archive");
    }
    let fail = |e: Error| Outcome::fail(format!("Unable to create blank image: {e}"));
    let dev = paths.get(BLOCK_DEVICE);
    if dev.exists() {
        if !cfg.preallocation {
            // CDI writes nothing at all here.
            return Outcome {
                code: 0,
                message: None,
            };
        }
        let r = (|| -> Result<()> {
            let io = crate::io::FileIo::open_rw(&dev, false)
                .map_err(|e| Error::io("cannot open the block device", e).with_path(&dev))?;
            let size = crate::io::BlockIo::size(&io)
                .map_err(|e| Error::io("cannot size the block device", e))?;
            crate::io::BlockIo::write_zeroes(&io, 0, size)
                .and_then(|_| crate::io::BlockIo::flush(&io))
                .map_err(|e| Error::io("cannot zero the block device", e).with_path(&dev))
        })();
        return match r {
            Ok(()) => Outcome::json(&Termination {
                preallocation_applied: Some(true),
                message: Some("Import Complete".into()),
                ..Termination::default()
            }),
            Err(e) => fail(e),
        };
    }
    let file = paths.get(DISK_FILE);
    let dir = paths.get(DATA_DIR);
    let r = (|| -> Result<bool> {
        let avail = crate::io::free_space(&dir)
            .map_err(|e| Error::io("cannot measure the volume", e).with_path(&dir))?;
        let requested = cfg.image_size.unwrap_or(avail);
        if avail < requested {
            log(&format!(
                "warning: available space {avail} is less than the requested size {requested}"
            ));
        }
        let size = crate::sizing::usable_space(cfg.overhead, avail.min(requested));
        let mut co = crate::qcow2::writer::CreateOptions::default();
        if cfg.preallocation {
            co.prealloc = crate::qcow2::writer::Prealloc::Falloc;
        }
        let _ = std::fs::remove_file(&file);
        let applied = crate::create::create(&file, crate::Format::Raw, size, &co)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o660))
            .map_err(|e| Error::io("cannot set the disk's mode", e).with_path(&file))?;
        log(&format!("created blank disk of {size} bytes"));
        Ok(applied != crate::qcow2::writer::Prealloc::Off)
    })();
    match r {
        Ok(pre) => Outcome::json(&Termination {
            preallocation_applied: Some(pre),
            message: Some("Import Complete".into()),
            ..Termination::default()
        }),
        Err(e) => fail(e),
    }
}

/// An `IMPORTER_SOURCE` this importer does not handle. imageio and vddk are CDI sources that
/// need what a pure-Rust importer cannot have (the oVirt engine's API, VMware's closed
/// library): they fail as CDI's connect errors do, saying so, instead of "Unknown data source".
fn other_source(s: &str) -> Outcome {
    let why = match s {
        "imageio" => "vdisk cannot import from oVirt imageio: it needs the oVirt engine's API",
        "vddk" => "vdisk cannot import from VMware VDDK: it needs VMware's closed VDDK library",
        _ => return Outcome::fail(format!("Unknown data source: {s}")),
    };
    Outcome::fail(format!(
        "Unable to connect to {s} data source: {why} (not supported by this importer; use CDI's own importer image for {s} imports)"
    ))
}

/// Write the outcome's termination message (when it has one) to the termination log.
pub fn write_outcome(paths: &Paths, out: &Outcome, log: &dyn Fn(&str)) {
    if let Some(m) = &out.message
        && let Err(e) = super::write_termination(&paths.get(TERMINATION_LOG), m)
    {
        log(&format!("{e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_parse() {
        let c = Checksum::parse(
            "sha256:ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789",
        )
        .unwrap();
        assert_eq!(c.algorithm, Algorithm::Sha256);
        assert!(c.hex.starts_with("abcdef"));
        assert!(Checksum::parse("sha256:abc").is_err());
        assert!(Checksum::parse("crc32:00000000").is_err());
        assert!(Checksum::parse("nocolon").is_err());
    }

    #[test]
    fn digest_tee_verifies_after_reading_everything() {
        let data = b"hello world".to_vec();
        let want = Checksum::parse("md5:5eb63bbbe01eeed093cb22bb8f5acdc3").unwrap();
        let tee = Arc::new(Mutex::new(Tee {
            inner: Box::new(std::io::Cursor::new(data.clone())),
            hasher: Some(Hasher::new(Algorithm::Md5)),
            eof: false,
        }));
        let mut first = [0u8; 5];
        TeeReader(tee.clone()).read_exact(&mut first).unwrap();
        verify(&tee, &want).unwrap();
        let tee = Arc::new(Mutex::new(Tee {
            inner: Box::new(std::io::Cursor::new(b"hello there".to_vec())),
            hasher: Some(Hasher::new(Algorithm::Md5)),
            eof: false,
        }));
        let e = verify(&tee, &want).unwrap_err().to_string();
        assert!(e.contains("checksum mismatch: expected md5:5eb63"), "{e}");
    }

    #[test]
    fn header_lines() {
        assert_eq!(
            parse_header_line("X-Auth: a: b"),
            Some(("X-Auth".into(), "a: b".into()))
        );
        assert_eq!(parse_header_line("bad header: x"), None);
        assert_eq!(parse_header_line("novalue"), None);
    }
}
