//! HTTP/1.1 client over TCP and rustls, for image downloads, the registry API and uploads.
//!
//! Owns: URL parsing, proxies from the environment (`http_proxy`, `https_proxy`, `no_proxy`,
//! CONNECT tunnels for HTTPS), TLS with the system roots plus extra CA bundles (or no
//! verification when asked) and an optional client certificate (mutual TLS), redirects,
//! response framing (Content-Length, chunked, until close), an idle timeout on every read,
//! and [`Download`], a body reader that resumes with a Range request (re-sending the
//! caller's headers, or asking [`Client::download_with`]'s callback for fresh ones: a new
//! signature, a renewed token) when the connection drops.
//!
//! Request bodies ([`Client::send_body`]) stream from a reader with `Content-Length` or
//! `Transfer-Encoding: chunked`. A server may answer before the body is complete (401, 409,
//! 503 while an upload is under way): the client looks for that between blocks and whenever
//! a write stalls, and stops sending; when a write fails because the server closed, it still
//! reads the answer the server left and reports that instead of the write error. Memory per
//! request is a few buffers, whatever the body size.

use crate::error::{Error, ErrorKind, Result};
use base64::Engine as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest response head accepted.
const MAX_HEAD: usize = 64 << 10;
/// Most headers in a response.
const MAX_HEADERS: usize = 128;

fn net_err(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Network, msg)
}

fn net_io(msg: impl std::fmt::Display, e: io::Error) -> Error {
    net_err(format!("{msg}: {e}"))
}

/// An `http` or `https` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// `http` or `https`.
    pub scheme: String,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// Port (the scheme's default when the URL has none).
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
    /// `user:password@` of the URL, if any.
    pub userinfo: Option<(String, String)>,
}

impl Url {
    /// Parse an absolute `http://` or `https://` URL (the fragment is dropped).
    pub fn parse(s: &str) -> Result<Url> {
        let bad = |why: &str| Error::invalid(format!("invalid URL '{s}': {why}"));
        let (scheme, rest) = s.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let scheme = scheme.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            _ => return Err(bad("only http and https are supported")),
        };
        let rest = rest.split('#').next().unwrap_or("");
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        let path = match path {
            "" => "/".to_string(),
            p if p.starts_with('?') => format!("/{p}"),
            p => p.to_string(),
        };
        if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(bad("spaces or control characters in the path"));
        }
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => {
                let (user, pass) = u.split_once(':').unwrap_or((u, ""));
                (
                    Some((
                        String::from_utf8_lossy(&percent_decode(user)).into_owned(),
                        String::from_utf8_lossy(&percent_decode(pass)).into_owned(),
                    )),
                    h.to_string(),
                )
            }
            None => (None, authority.to_string()),
        };
        let (host, port) = if let Some(r) = hostport.strip_prefix('[') {
            let (h, after) = r.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad("bad port"))?,
                None if after.is_empty() => default_port,
                None => return Err(bad("junk after ']'")),
            };
            (h.to_string(), port)
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_string(),
                    if p.is_empty() {
                        default_port
                    } else {
                        p.parse().map_err(|_| bad("bad port"))?
                    },
                ),
                None => (hostport.clone(), default_port),
            }
        };
        if host.is_empty() || host.bytes().any(|b| b <= b' ' || b"/?#@".contains(&b)) {
            return Err(bad("bad host"));
        }
        Ok(Url {
            scheme,
            host: host.to_ascii_lowercase(),
            port,
            path,
            userinfo,
        })
    }

    /// Resolve a `Location` (absolute, scheme-relative, absolute-path or relative) against
    /// this URL.
    pub fn join(&self, loc: &str) -> Result<Url> {
        if loc.contains("://") {
            return Url::parse(loc);
        }
        if let Some(r) = loc.strip_prefix("//") {
            return Url::parse(&format!("{}://{r}", self.scheme));
        }
        let path = if loc.starts_with('/') {
            loc.to_string()
        } else {
            let base = self.path.split('?').next().unwrap_or("/");
            let dir = &base[..base.rfind('/').map_or(0, |i| i + 1)];
            format!("{dir}{loc}")
        };
        let mut u = self.clone();
        u.userinfo = None;
        u.path = path;
        Ok(u)
    }

    /// `host:port`, with brackets around IPv6 addresses.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The value of a `Host` header: the port only when not the scheme's default.
    pub fn host_header(&self) -> String {
        let default = if self.scheme == "https" { 443 } else { 80 };
        if self.port == default {
            if self.host.contains(':') {
                format!("[{}]", self.host)
            } else {
                self.host.clone()
            }
        } else {
            self.authority()
        }
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Credentials are never printed.
        write!(f, "{}://{}{}", self.scheme, self.host_header(), self.path)
    }
}

/// Decode `%XX` escapes into bytes (anything else is kept as it is).
pub fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex_val(b[i + 1]), hex_val(b[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn hex_val(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// Proxy settings: `HTTP_PROXY`, `HTTPS_PROXY` and `NO_PROXY` (the upper-case name wins,
/// as in Go), matched by Go's rules (`golang.org/x/net/http/httpproxy`), so a drop-in importer
/// proxies exactly the requests CDI's would.
#[derive(Debug, Clone, Default)]
pub struct Proxy {
    /// Proxy for `http://` URLs.
    pub http: Option<Url>,
    /// Proxy for `https://` URLs (reached with CONNECT).
    pub https: Option<Url>,
    /// `NO_PROXY` entries: `*`; IP addresses and CIDR blocks (matched against IP-literal
    /// hosts only); domain names, matching the name and its subdomains, or with a leading
    /// `.` (or `*.`) only the subdomains; any of them with a `:port`, then only that port.
    pub no_proxy: Vec<String>,
}

/// One parsed `NO_PROXY` entry.
enum Bypass {
    All,
    Net(std::net::IpAddr, u8),
    Ip(std::net::IpAddr, Option<u16>),
    Domain {
        suffix: String,
        exact_too: bool,
        port: Option<u16>,
    },
    Invalid,
}

fn parse_bypass(entry: &str) -> Bypass {
    use std::net::IpAddr;
    let e = entry.trim().to_ascii_lowercase();
    if e.is_empty() {
        return Bypass::Invalid;
    }
    if e == "*" {
        return Bypass::All;
    }
    if let Some((ip, bits)) = e.split_once('/') {
        let (Ok(ip), Ok(bits)) = (ip.parse::<IpAddr>(), bits.parse::<u8>()) else {
            return Bypass::Invalid;
        };
        let max = if ip.is_ipv4() { 32 } else { 128 };
        if bits > max {
            return Bypass::Invalid;
        }
        return Bypass::Net(ip, bits);
    }
    // host, host:port, [v6], [v6]:port, or a bare IPv6 literal.
    let (host, port) = if let Ok(ip) = e.parse::<IpAddr>() {
        return Bypass::Ip(ip, None);
    } else if let Some(rest) = e.strip_prefix('[') {
        let Some((h, tail)) = rest.split_once(']') else {
            return Bypass::Invalid;
        };
        match tail.strip_prefix(':') {
            Some(p) => (h.to_string(), p.parse::<u16>().ok()),
            None if tail.is_empty() => (h.to_string(), None),
            None => return Bypass::Invalid,
        }
    } else {
        match e.rsplit_once(':') {
            Some((h, p)) => match p.parse::<u16>() {
                Ok(p) => (h.to_string(), Some(p)),
                Err(_) => return Bypass::Invalid,
            },
            None => (e.clone(), None),
        }
    };
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Bypass::Ip(ip, port);
    }
    let host = host.strip_prefix('*').unwrap_or(&host);
    if host.is_empty() || host == "." {
        return Bypass::Invalid;
    }
    match host.strip_prefix('.') {
        Some(_) => Bypass::Domain {
            suffix: host.to_string(),
            exact_too: false,
            port,
        },
        None => Bypass::Domain {
            suffix: format!(".{host}"),
            exact_too: true,
            port,
        },
    }
}

/// Whether `ip` lies in the block `net`/`bits` (of the same address family).
fn in_net(ip: std::net::IpAddr, net: std::net::IpAddr, bits: u8) -> bool {
    use std::net::IpAddr;
    let (a, n, width) = match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => (u32::from(a).into(), u32::from(n).into(), 32),
        (IpAddr::V6(a), IpAddr::V6(n)) => (u128::from(a), u128::from(n), 128),
        _ => return false,
    };
    // The bits past the prefix may differ; a shift by the whole width leaves nothing.
    (a ^ n).checked_shr(width - u32::from(bits)).unwrap_or(0) == 0
}

impl Proxy {
    /// Read the proxy variables of the environment (each name upper-case first, then
    /// lower-case, as Go does).
    pub fn from_env() -> Result<Proxy> {
        let var = |n: &str| {
            std::env::var(n.to_ascii_uppercase())
                .ok()
                .filter(|v| !v.is_empty())
                .or_else(|| std::env::var(n).ok())
                .filter(|v| !v.is_empty())
        };
        let parse = |v: Option<String>| -> Result<Option<Url>> {
            v.map(|v| {
                if v.contains("://") {
                    Url::parse(&v)
                } else {
                    Url::parse(&format!("http://{v}"))
                }
            })
            .transpose()
        };
        Ok(Proxy {
            http: parse(var("http_proxy"))?,
            https: parse(var("https_proxy"))?,
            no_proxy: var("no_proxy")
                .map(|v| {
                    v.split(',')
                        .map(|s| s.trim().to_ascii_lowercase())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// Whether a request to `host:port` goes direct: Go never proxies `localhost` or a
    /// loopback address, and `NO_PROXY` lists the rest.
    fn bypass(&self, host: &str, port: u16) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let ip = host.parse::<std::net::IpAddr>().ok();
        if host == "localhost" || ip.is_some_and(|i| i.is_loopback()) {
            return true;
        }
        let port_ok = |p: Option<u16>| p.is_none_or(|p| p == port);
        self.no_proxy.iter().any(|e| match parse_bypass(e) {
            Bypass::All => true,
            Bypass::Net(n, bits) => ip.is_some_and(|i| in_net(i, n, bits)),
            Bypass::Ip(a, p) => ip == Some(a) && port_ok(p),
            Bypass::Domain {
                suffix,
                exact_too,
                port: p,
            } => {
                ip.is_none()
                    && port_ok(p)
                    && (host.ends_with(&suffix) || (exact_too && host == suffix[1..]))
            }
            Bypass::Invalid => false,
        })
    }

    fn for_url(&self, u: &Url) -> Option<&Url> {
        if self.bypass(&u.host, u.port) {
            return None;
        }
        if u.scheme == "https" {
            self.https.as_ref()
        } else {
            self.http.as_ref()
        }
    }
}

/// How a [`Client`] connects.
#[derive(Clone)]
pub struct ClientConfig {
    /// `User-Agent` header.
    pub user_agent: String,
    /// Skip TLS certificate verification (CDI's `INSECURE_TLS`).
    pub insecure: bool,
    /// Extra trusted CA certificates, as PEM text (bundles allowed).
    pub ca_pem: Vec<Vec<u8>>,
    /// A client certificate for mutual TLS: (PEM certificate chain, leaf first; PEM private
    /// key, PKCS#8, PKCS#1 RSA or SEC1 EC). Presented when a server asks, in both verified
    /// and insecure mode.
    pub client_cert: Option<(Vec<u8>, Vec<u8>)>,
    /// Headers sent with every request (CDI's extra headers).
    pub headers: Vec<(String, String)>,
    /// Basic credentials sent with every request, also after redirects.
    pub basic_auth: Option<(String, String)>,
    /// A read that waits this long for a byte fails.
    pub idle_timeout: Duration,
    /// Time allowed to establish a TCP connection.
    pub connect_timeout: Duration,
    /// Proxies.
    pub proxy: Proxy,
    /// Redirects followed per request.
    pub max_redirects: u32,
    /// Times a [`Download`] reconnects after a dropped connection.
    pub max_resumes: u32,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            user_agent: concat!("vdisk/", env!("CARGO_PKG_VERSION")).into(),
            insecure: false,
            ca_pem: Vec::new(),
            client_cert: None,
            headers: Vec::new(),
            basic_auth: None,
            idle_timeout: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(30),
            proxy: Proxy::default(),
            max_redirects: 10,
            max_resumes: 20,
        }
    }
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets (the client key, passwords) are never printed.
        f.debug_struct("ClientConfig")
            .field("user_agent", &self.user_agent)
            .field("insecure", &self.insecure)
            .field("ca_pem", &self.ca_pem.len())
            .field("client_cert", &self.client_cert.is_some())
            .field("headers", &self.headers.len())
            .field("basic_auth", &self.basic_auth.as_ref().map(|(u, _)| u))
            .field("idle_timeout", &self.idle_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("proxy", &self.proxy)
            .field("max_redirects", &self.max_redirects)
            .field("max_resumes", &self.max_resumes)
            .finish()
    }
}

/// An HTTP client; cheap to clone and usable from several threads.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: ClientConfig,
    tls: Arc<rustls::ClientConfig>,
}

/// A verifier that accepts any server certificate (INSECURE_TLS), still checking that
/// handshake signatures are well-formed.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Parse PEM certificates, refusing text that holds none.
pub fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::invalid(format!("bad PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(Error::invalid("no PEM certificate found"));
    }
    Ok(certs)
}

impl Client {
    /// A client with `cfg`: trusted roots are the system's plus `cfg.ca_pem`.
    pub fn new(cfg: ClientConfig) -> Result<Client> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::invalid(format!("TLS setup: {e}")))?;
        let identity = cfg
            .client_cert
            .as_ref()
            .map(|(cert, key)| -> Result<_> {
                let key = PrivateKeyDer::from_pem_slice(key)
                    .map_err(|e| Error::invalid(format!("bad PEM client key: {e}")))?;
                Ok((parse_certs(cert)?, key))
            })
            .transpose()?;
        let client_auth =
            |b: rustls::ConfigBuilder<_, rustls::client::WantsClientCert>| match identity {
                Some((certs, key)) => b
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| Error::invalid(format!("unusable client certificate: {e}"))),
                None => Ok(b.with_no_client_auth()),
            };
        let tls = if cfg.insecure {
            client_auth(
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(NoVerify(provider))),
            )?
        } else {
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
            for pem in &cfg.ca_pem {
                for c in parse_certs(pem)? {
                    roots
                        .add(c)
                        .map_err(|e| Error::invalid(format!("bad CA certificate: {e}")))?;
                }
            }
            client_auth(builder.with_root_certificates(roots))?
        };
        Ok(Client {
            inner: Arc::new(Inner {
                cfg,
                tls: Arc::new(tls),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.cfg
    }

    /// Send `method url` with the configured headers plus `headers`, following redirects
    /// (a caller's `Authorization` is dropped when a redirect changes host). The body is not
    /// read; any status is returned.
    pub fn send(&self, method: &str, url: &str, headers: &[(&str, &str)]) -> Result<Response> {
        let mut u = Url::parse(url)?;
        let origin = u.authority();
        let mut hops = 0;
        loop {
            let same_origin = u.authority() == origin;
            let hs: Vec<(&str, &str)> = headers
                .iter()
                .filter(|(k, _)| same_origin || !k.eq_ignore_ascii_case("authorization"))
                .copied()
                .collect();
            let r = self.once(method, &u, &hs, None)?;
            if matches!(r.status, 301 | 302 | 303 | 307 | 308)
                && let Some(loc) = r.header("location")
            {
                hops += 1;
                if hops > self.inner.cfg.max_redirects {
                    return Err(net_err(format!("{url}: too many redirects")));
                }
                u = u.join(loc)?;
                continue;
            }
            return Ok(r);
        }
    }

    /// Send `method url` with `headers` and a body streamed from `body`: `len` bytes with
    /// `Content-Length` when known (a shorter body is an error), else
    /// `Transfer-Encoding: chunked` up to the reader's end. The body is sent in blocks and
    /// never held whole.
    ///
    /// Redirects are not followed: a streamed body cannot be replayed, so a 3xx comes back as
    /// the response. A server that answers before the body is complete (401, 409, 503, ...)
    /// is heard: sending stops and that response is returned, also when the server closed
    /// the connection under a write. Any status is returned; the response body is not read.
    pub fn send_body(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: &mut dyn Read,
        len: Option<u64>,
    ) -> Result<Response> {
        let u = Url::parse(url)?;
        let cfg_headers = self.inner.cfg.headers.iter().map(|(k, _)| k.as_str());
        if let Some(k) = headers
            .iter()
            .map(|(k, _)| *k)
            .chain(cfg_headers)
            .find(|k| {
                k.eq_ignore_ascii_case("content-length")
                    || k.eq_ignore_ascii_case("transfer-encoding")
            })
        {
            return Err(Error::invalid(format!(
                "header '{k}' is set by the client for a request body"
            )));
        }
        self.once(method, &u, headers, Some((body, len)))
    }

    /// GET `url`, which must answer 200, as a body that resumes after dropped connections
    /// (when the server accepts ranges).
    pub fn download(&self, url: &str) -> Result<Download> {
        self.download_with_headers(url, &[])
    }

    /// [`Client::download`] with headers made afresh for the first request and for every
    /// resume, for credentials that expire: a signature over a timestamp (S3's SigV4, valid
    /// for 15 minutes), a bearer token. `Range` and `If-Range` are added after `headers`.
    pub fn download_with(&self, url: &str, mut headers: HeaderSource) -> Result<Download> {
        let first = headers()?;
        let refs: Vec<(&str, &str)> = first
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut d = self.start_download(url, &refs, true)?;
        d.refresh = Some(headers);
        Ok(d)
    }

    /// [`Client::download`] with extra request headers (`Authorization: Bearer …`, ...),
    /// sent again with every resume. As with [`Client::send`], a caller's `Authorization` is
    /// not sent to another host a redirect leads to, neither then nor on resumes.
    pub fn download_with_headers(&self, url: &str, headers: &[(&str, &str)]) -> Result<Download> {
        self.start_download(url, headers, false)
    }

    /// Start a download; a status other than 200 is an error that, when `explain`, quotes
    /// the start of the answer's body (object stores say why they refused there).
    fn start_download(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        explain: bool,
    ) -> Result<Download> {
        let r = self.send("GET", url, headers)?;
        if r.status != 200 {
            let status = r.status;
            let why = if explain {
                r.read_to_vec(16 << 10)
                    .map(|b| error_summary(&b))
                    .unwrap_or_default()
            } else {
                String::new()
            };
            return Err(net_err(format!(
                "expected status code 200, got {status}{}",
                if why.is_empty() {
                    String::new()
                } else {
                    format!(": {why}")
                }
            )));
        }
        let total = r.content_length();
        let ranges = r
            .header("accept-ranges")
            .is_some_and(|v| v.eq_ignore_ascii_case("bytes"));
        let validator = r
            .header("etag")
            .filter(|e| !e.starts_with("W/"))
            .or(r.header("last-modified"))
            .map(str::to_string);
        let content_type = r.header("content-type").map(str::to_string);
        // Resumes go straight to the URL that answered: keep the caller's Authorization only
        // when that is still the host it was meant for.
        let same_origin = Url::parse(url)?.authority() == Url::parse(&r.url)?.authority();
        let headers = headers
            .iter()
            .filter(|(k, _)| same_origin || !k.eq_ignore_ascii_case("authorization"))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Ok(Download {
            client: self.clone(),
            url: r.url.clone(),
            headers,
            same_origin,
            refresh: None,
            total,
            pos: 0,
            ranges,
            validator,
            resumes: 0,
            body: r.body,
            content_type,
        })
    }

    fn connect(&self, u: &Url) -> Result<Conn> {
        let cfg = &self.inner.cfg;
        let proxy = cfg.proxy.for_url(u);
        let target = proxy.unwrap_or(u);
        let addrs: Vec<_> = (target.host.as_str(), target.port)
            .to_socket_addrs()
            .map_err(|e| net_io(format!("cannot resolve {}", target.host), e))?
            .collect();
        let mut last = None;
        let mut tcp = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, cfg.connect_timeout) {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let tcp = tcp.ok_or_else(|| match last {
            Some(e) => net_io(format!("cannot connect to {}", target.authority()), e),
            None => net_err(format!("{} has no address", target.host)),
        })?;
        tcp.set_read_timeout(Some(cfg.idle_timeout))
            .and_then(|_| tcp.set_write_timeout(Some(cfg.idle_timeout)))
            .and_then(|_| tcp.set_nodelay(true))
            .map_err(|e| net_io("socket setup", e))?;
        let mut tcp = tcp;
        if let (Some(p), "https") = (proxy, u.scheme.as_str()) {
            // Tunnel through the proxy.
            let mut req = format!(
                "CONNECT {a} HTTP/1.1\r\nHost: {a}\r\nUser-Agent: {}\r\n",
                cfg.user_agent,
                a = u.authority()
            );
            if let Some((user, pass)) = &p.userinfo {
                req += &format!("Proxy-Authorization: Basic {}\r\n", b64(user, pass));
            }
            req += "\r\n";
            tcp.write_all(req.as_bytes())
                .map_err(|e| net_io("proxy CONNECT", e))?;
            let mut r = BufReader::new(tcp.try_clone().map_err(|e| net_io("socket", e))?);
            let (status, _) = read_head(&mut r)?;
            if !r.buffer().is_empty() {
                return Err(net_err("proxy sent data before the tunnel opened"));
            }
            if status != 200 {
                return Err(net_err(format!(
                    "proxy {} refused CONNECT to {}: status {status}",
                    p.authority(),
                    u.authority()
                )));
            }
        }
        if u.scheme == "https" {
            let name = ServerName::try_from(u.host.clone())
                .map_err(|_| Error::invalid(format!("bad TLS server name '{}'", u.host)))?;
            let conn = rustls::ClientConnection::new(self.inner.tls.clone(), name)
                .map_err(|e| net_err(format!("TLS setup: {e}")))?;
            let mut s = rustls::StreamOwned::new(conn, tcp);
            // Handshake now, so certificate errors surface as connection errors.
            while s.conn.is_handshaking() {
                s.conn
                    .complete_io(&mut s.sock)
                    .map_err(|e| net_io(format!("TLS handshake with {}", u.authority()), e))?;
            }
            Ok(Conn::Tls(Box::new(s)))
        } else {
            Ok(Conn::Plain(tcp))
        }
    }

    /// One request on a new connection, with an optional streamed body and its length.
    fn once(
        &self,
        method: &str,
        u: &Url,
        headers: &[(&str, &str)],
        body: Option<(&mut dyn Read, Option<u64>)>,
    ) -> Result<Response> {
        let cfg = &self.inner.cfg;
        let via_proxy = u.scheme == "http" && cfg.proxy.for_url(u).is_some();
        let conn = self.connect(u)?;
        let target = if via_proxy {
            u.to_string()
        } else {
            u.path.clone()
        };
        let mut req = format!(
            "{method} {target} HTTP/1.1\r\nHost: {}\r\nUser-Agent: {}\r\nAccept-Encoding: identity\r\nConnection: close\r\n",
            u.host_header(),
            cfg.user_agent
        );
        let auth = cfg.basic_auth.clone().or_else(|| u.userinfo.clone());
        if let Some((user, pass)) = auth
            && !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        {
            req += &format!("Authorization: Basic {}\r\n", b64(&user, &pass));
        }
        if via_proxy
            && let Some((user, pass)) = cfg.proxy.http.as_ref().and_then(|p| p.userinfo.clone())
        {
            req += &format!("Proxy-Authorization: Basic {}\r\n", b64(&user, &pass));
        }
        for (k, v) in cfg
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(headers.iter().copied())
        {
            if k.bytes().any(|b| b <= b' ' || b == b':')
                || v.bytes().any(|b| b == b'\r' || b == b'\n')
            {
                return Err(Error::invalid(format!("bad header '{k}'")));
            }
            req += &format!("{k}: {v}\r\n");
        }
        match &body {
            Some((_, Some(n))) => req += &format!("Content-Length: {n}\r\n"),
            Some((_, None)) => req += "Transfer-Encoding: chunked\r\n",
            None => {}
        }
        req += "\r\n";
        let mut r = BufReader::with_capacity(256 << 10, conn);
        let early = match write_request(&mut r, req.as_bytes(), body, cfg.idle_timeout) {
            Ok(early) => early,
            Err(SendError::Body(e)) => return Err(e),
            Err(SendError::Write(e)) => answer_after_write_failure(&mut r, e)
                .map_err(|e| net_io(format!("cannot send request to {u}"), e))?,
        };
        let (status, headers) = match early {
            Some(head) => head,
            None => read_head(&mut r)?,
        };
        let find = |n: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.as_str())
        };
        let chunked =
            find("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let length = find("content-length")
            .map(|v| {
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| net_err(format!("bad Content-Length '{v}'")))
            })
            .transpose()?;
        let body: Box<dyn Read + Send> = if method == "HEAD" || matches!(status, 204 | 304) {
            Box::new(io::empty())
        } else if chunked {
            Box::new(Chunked {
                inner: r,
                left: 0,
                done: false,
            })
        } else if let Some(n) = length {
            Box::new(Exact { inner: r, left: n })
        } else {
            Box::new(r)
        };
        Ok(Response {
            status,
            url: u.to_string(),
            headers,
            body,
        })
    }
}

/// Bytes of a request body read and sent at a time; between blocks the client looks for an
/// early answer.
const BODY_BLOCK: usize = 256 << 10;
/// Longest a request-body write blocks before the client looks for an early answer.
const WRITE_POLL: Duration = Duration::from_secs(1);

/// A response's status and headers.
type Head = (u16, Vec<(String, String)>);

/// Why a request could not be sent.
enum SendError {
    /// Writing to the connection failed.
    Write(io::Error),
    /// The caller's body reader failed or ended short.
    Body(Error),
}

impl From<io::Error> for SendError {
    fn from(e: io::Error) -> Self {
        SendError::Write(e)
    }
}

/// Send a request head and its body. `Some(head)` when the server answered with a final
/// status before the body was complete; sending stopped there.
fn write_request(
    r: &mut BufReader<Conn>,
    head: &[u8],
    body: Option<(&mut dyn Read, Option<u64>)>,
    idle: Duration,
) -> std::result::Result<Option<Head>, SendError> {
    let Some((body, len)) = body else {
        r.get_mut().write_all(head)?;
        r.get_mut().flush()?;
        return Ok(None);
    };
    // Writes wait at most WRITE_POLL, so that a server that answered but stopped reading is
    // heard instead of waited on; `idle` still bounds a stall.
    r.get_mut()
        .sock()
        .set_write_timeout(Some(WRITE_POLL.min(idle)))?;
    if let Some(h) = send_all(r, head, idle)? {
        return Ok(Some(h));
    }
    // Room before the data for a chunk-size line and after it for its CRLF, so that each
    // block goes out in one write (one TLS record run, no tiny packets).
    const PRE: usize = 16;
    let mut buf = vec![0u8; PRE + BODY_BLOCK + 2];
    let mut sent = 0u64;
    loop {
        // A server refusing the upload (401, 409, 503, ...) usually answers right away and
        // stops reading: listen before each block instead of pushing the rest into a wall.
        if let Some(h) = early_answer(r)? {
            return Ok(Some(h));
        }
        let want = match len {
            Some(n) => (n - sent).min(BODY_BLOCK as u64) as usize,
            None => BODY_BLOCK,
        };
        if want == 0 {
            break;
        }
        let n = loop {
            match body.read(&mut buf[PRE..PRE + want]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => break r,
            }
        }
        .map_err(|e| SendError::Body(Error::io("cannot read the request body", e)))?;
        if n == 0 {
            match len {
                Some(len) => {
                    return Err(SendError::Body(Error::new(
                        ErrorKind::Io,
                        format!("the request body ended after {sent} of {len} bytes"),
                    )));
                }
                None => break,
            }
        }
        let block = if len.is_none() {
            let size = format!("{n:x}\r\n");
            buf[PRE - size.len()..PRE].copy_from_slice(size.as_bytes());
            buf[PRE + n..PRE + n + 2].copy_from_slice(b"\r\n");
            &buf[PRE - size.len()..PRE + n + 2]
        } else {
            &buf[PRE..PRE + n]
        };
        if let Some(h) = send_all(r, block, idle)? {
            return Ok(Some(h));
        }
        sent += n as u64;
    }
    if len.is_none()
        && let Some(h) = send_all(r, b"0\r\n\r\n", idle)?
    {
        return Ok(Some(h));
    }
    let mut since = Instant::now();
    loop {
        match r.get_mut().flush() {
            Ok(()) => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_stall(&e) => {
                if let Some(h) = stalled(r, &mut since, idle, e)? {
                    return Ok(Some(h));
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// A final answer the server has already started to send, if any (1xx answers are read and
/// passed over). Never blocks when the server has said nothing.
fn early_answer(r: &mut BufReader<Conn>) -> std::result::Result<Option<Head>, SendError> {
    while !r.buffer().is_empty() || r.get_mut().peer_spoke() {
        let head = read_head_once(r).map_err(SendError::Body)?;
        if !(100..200).contains(&head.0) {
            return Ok(Some(head));
        }
    }
    Ok(None)
}

/// A write that timed out (after WRITE_POLL) rather than failed.
fn is_stall(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// The server is not taking the request: has it answered? Fails once nothing moved for
/// `idle`.
fn stalled(
    r: &mut BufReader<Conn>,
    since: &mut Instant,
    idle: Duration,
    e: io::Error,
) -> std::result::Result<Option<Head>, SendError> {
    if let Some(h) = early_answer(r)? {
        return Ok(Some(h));
    }
    if since.elapsed() >= idle {
        return Err(SendError::Write(io::Error::new(
            e.kind(),
            format!("the server took nothing for {} s", idle.as_secs()),
        )));
    }
    Ok(None)
}

/// Write all of `data`, listening for an early answer whenever a write stalls.
fn send_all(
    r: &mut BufReader<Conn>,
    data: &[u8],
    idle: Duration,
) -> std::result::Result<Option<Head>, SendError> {
    let mut off = 0;
    let mut since = Instant::now();
    while off < data.len() {
        match r.get_mut().write(&data[off..]) {
            Ok(0) => return Err(SendError::Write(io::ErrorKind::WriteZero.into())),
            Ok(n) => {
                off += n;
                since = Instant::now();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_stall(&e) => {
                if let Some(h) = stalled(r, &mut since, idle, e)? {
                    return Ok(Some(h));
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(None)
}

/// After a write failed because the server closed or reset the connection, the answer it
/// sent first (a 409 for an upload it did not want, ...) is what the caller needs: read it
/// if it is there, else report the write error.
fn answer_after_write_failure(r: &mut BufReader<Conn>, e: io::Error) -> io::Result<Option<Head>> {
    if !matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
    ) {
        return Err(e);
    }
    read_head(r).map(Some).map_err(|_| e)
}

fn b64(user: &str, pass: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
}

/// Read a response head (status line and headers), skipping 1xx responses.
fn read_head<R: BufRead>(r: &mut R) -> Result<Head> {
    loop {
        let head = read_head_once(r)?;
        if !(100..200).contains(&head.0) {
            return Ok(head);
        }
    }
}

/// Read one response head, 1xx included.
fn read_head_once<R: BufRead>(r: &mut R) -> Result<Head> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = r
            .by_ref()
            .take((MAX_HEAD - head.len()) as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| net_io("cannot read response", e))?;
        if n == 0 {
            return Err(net_err(if head.is_empty() {
                "connection closed before a response".to_string()
            } else {
                "connection closed inside the response head".to_string()
            }));
        }
        head.extend_from_slice(&line);
        if head.len() > MAX_HEAD {
            return Err(net_err("response head too large"));
        }
        if line == b"\r\n" || line == b"\n" {
            break;
        }
    }
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut hs);
    match resp.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(net_err("incomplete response head")),
        Err(e) => return Err(net_err(format!("malformed response: {e}"))),
    }
    let status = resp.code.unwrap_or(0);
    let headers = resp
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).trim().to_string(),
            )
        })
        .collect();
    Ok((status, headers))
}

enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Conn {
    fn sock(&mut self) -> &mut TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => &mut s.sock,
        }
    }

    /// Whether the server has sent something (or closed) while we are still sending, found
    /// without blocking. On TLS, records that carry no data (session tickets) do not count.
    /// A failure counts as "spoke": reading the answer then reports it.
    fn peer_spoke(&mut self) -> bool {
        if self.sock().set_nonblocking(true).is_err() {
            return false;
        }
        let spoke = match self {
            Conn::Plain(s) => {
                !matches!(s.peek(&mut [0u8]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            Conn::Tls(s) => match s.conn.read_tls(&mut s.sock) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
                Ok(0) | Err(_) => true,
                Ok(_) => s.conn.process_new_packets().map_or(true, |st| {
                    st.plaintext_bytes_to_read() > 0 || st.peer_has_closed()
                }),
            },
        };
        self.sock().set_nonblocking(false).is_err() || spoke
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => loop {
                match s.conn.reader().read(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // A server closing without close_notify ends the body like a plain close;
                    // truncation is caught by the framing (length, chunks).
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                    r => return r,
                }
                // Records already received (by `peer_spoke`) first; a TLS error met there is
                // reported here instead of waiting for more.
                let state = s
                    .conn
                    .process_new_packets()
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                if state.plaintext_bytes_to_read() == 0 {
                    // Only read, unlike `StreamOwned::read`: after a failed upload the write
                    // side may hold records that can never go out, and flushing them first
                    // would hide the answer the server sent.
                    s.conn.read_tls(&mut s.sock)?;
                }
            },
        }
    }
}

/// Send the TLS records rustls has queued. Never reads, unlike `StreamOwned`'s writes,
/// whose `complete_io` goes on to a blocking read when a write times out.
fn write_tls(s: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>) -> io::Result<()> {
    while s.conn.wants_write() {
        if s.conn.write_tls(&mut s.sock)? == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
    }
    Ok(())
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => {
                // What is queued goes first (a timeout here leaves it queued for the retry);
                // then take what fits in rustls's buffer and try to send it. A failure after
                // taking the bytes shows on the next call.
                write_tls(s)?;
                let n = s.conn.writer().write(buf)?;
                let _ = write_tls(s);
                Ok(n)
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => {
                s.conn.writer().flush()?;
                write_tls(s)
            }
        }
    }
}

/// A body of known length: ending early is an error.
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let n = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let got = self.inner.read(&mut buf[..n])?;
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed with {} bytes of the body missing",
                    self.left
                ),
            ));
        }
        self.left -= got as u64;
        Ok(got)
    }
}

/// A chunked body.
struct Chunked<R> {
    inner: R,
    left: u64,
    done: bool,
}

impl<R: BufRead> Chunked<R> {
    fn line(&mut self) -> io::Result<String> {
        let mut l = Vec::new();
        self.inner.by_ref().take(4096).read_until(b'\n', &mut l)?;
        if !l.ends_with(b"\n") {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "chunked body cut off",
            ));
        }
        Ok(String::from_utf8_lossy(&l).trim().to_string())
    }
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let l = self.line()?;
            let size = l.split(';').next().unwrap_or("").trim();
            self.left = u64::from_str_radix(size, 16).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad chunk size '{size}'"),
                )
            })?;
            if self.left == 0 {
                // Trailers, up to the empty line.
                while !self.line()?.is_empty() {}
                self.done = true;
                return Ok(0);
            }
        }
        let n = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let got = self.inner.read(&mut buf[..n])?;
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "chunked body cut off",
            ));
        }
        self.left -= got as u64;
        if self.left == 0 {
            self.line()?;
        }
        Ok(got)
    }
}

/// A response whose body has not been read.
pub struct Response {
    /// Status code.
    pub status: u16,
    /// The URL that answered (after redirects).
    pub url: String,
    /// Headers in order.
    pub headers: Vec<(String, String)>,
    body: Box<dyn Read + Send>,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("status", &self.status)
            .field("url", &self.url)
            .finish()
    }
}

impl Response {
    /// The first header named `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `Content-Length`, when given.
    pub fn content_length(&self) -> Option<u64> {
        self.header("content-length")
            .and_then(|v| v.trim().parse().ok())
    }

    /// The body as a reader.
    pub fn into_reader(self) -> Box<dyn Read + Send> {
        self.body
    }

    /// The whole body, refusing more than `limit` bytes.
    pub fn read_to_vec(self, limit: usize) -> Result<Vec<u8>> {
        let url = self.url.clone();
        let mut v = Vec::new();
        self.body
            .take(limit as u64 + 1)
            .read_to_end(&mut v)
            .map_err(|e| net_io(format!("cannot read {url}"), e))?;
        if v.len() > limit {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!("{url}: response larger than {limit} bytes"),
            ));
        }
        Ok(v)
    }
}

/// A one-line summary of an error body, at most 200 characters: an S3-style XML `<Code>` and
/// `<Message>`, else the body's start, with whitespace and control characters collapsed.
fn error_summary(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let tag = |t: &str| {
        let open = format!("<{t}>");
        let start = text.find(&open)? + open.len();
        let end = text[start..].find(&format!("</{t}>"))?;
        Some(text[start..start + end].to_string())
    };
    let raw = match (tag("Code"), tag("Message")) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c,
        _ => text.to_string(),
    };
    let cleaned: String = raw
        .chars()
        .take(400)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let one_line = cleaned.split_whitespace().collect::<Vec<_>>().join(" ");
    one_line.chars().take(200).collect()
}

/// Makes the headers of each request of a [`Client::download_with`] download.
pub type HeaderSource = Box<dyn FnMut() -> Result<Vec<(String, String)>> + Send>;

/// The body of a GET that reconnects with `Range: bytes=N-` when the connection drops or
/// stalls, as long as the server advertised ranges and the file is unchanged.
pub struct Download {
    client: Client,
    url: String,
    headers: Vec<(String, String)>,
    /// Whether `url` has the origin the caller's headers were meant for.
    same_origin: bool,
    /// Fresh headers for each resume ([`Client::download_with`]).
    refresh: Option<HeaderSource>,
    total: Option<u64>,
    pos: u64,
    ranges: bool,
    validator: Option<String>,
    resumes: u32,
    body: Box<dyn Read + Send>,
    content_type: Option<String>,
}

impl Download {
    /// The body size from `Content-Length`.
    pub fn total(&self) -> Option<u64> {
        self.total
    }

    /// Bytes delivered so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Times the download reconnected.
    pub fn resumes(&self) -> u32 {
        self.resumes
    }

    /// The URL that answered.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `Content-Type`, when given.
    pub fn content_type(&self) -> Option<&str> {
        self.content_type.as_deref()
    }

    fn resume(&mut self, why: &io::Error) -> io::Result<()> {
        let fail = |msg: String| io::Error::other(msg);
        if !self.ranges || self.resumes >= self.client.inner.cfg.max_resumes {
            return Err(fail(format!(
                "download of {} failed after {} bytes: {why}",
                self.url, self.pos
            )));
        }
        self.resumes += 1;
        if let Some(refresh) = &mut self.refresh {
            let hs = refresh().map_err(|e| {
                fail(format!(
                    "cannot resume {} at byte {}: {e}",
                    self.url, self.pos
                ))
            })?;
            let same_origin = self.same_origin;
            self.headers = hs
                .into_iter()
                .filter(|(k, _)| same_origin || !k.eq_ignore_ascii_case("authorization"))
                .collect();
        }
        let range = format!("bytes={}-", self.pos);
        let mut hs: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        hs.push(("Range", range.as_str()));
        if let Some(v) = &self.validator {
            hs.push(("If-Range", v.as_str()));
        }
        let r = self.client.send("GET", &self.url, &hs).map_err(|e| {
            fail(format!(
                "cannot resume {} at byte {}: {e}",
                self.url, self.pos
            ))
        })?;
        let start = r
            .header("content-range")
            .and_then(|v| v.strip_prefix("bytes "))
            .and_then(|v| v.split('-').next())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if r.status != 206 || start != Some(self.pos) {
            return Err(fail(format!(
                "cannot resume {} at byte {}: the server answered {} (the file may have changed)",
                self.url, self.pos, r.status
            )));
        }
        self.body = r.body;
        Ok(())
    }
}

impl Read for Download {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.body.read(buf) {
                Ok(0) => {
                    if let Some(t) = self.total
                        && self.pos < t
                    {
                        let e = io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed");
                        self.resume(&e)?;
                        continue;
                    }
                    return Ok(0);
                }
                Ok(n) => {
                    self.pos += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => self.resume(&e)?,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn error_bodies_summarised() {
        let xml = b"<?xml version=\"1.0\"?>\n<Error><Code>SignatureDoesNotMatch</Code>\
            <Message>The request signature we calculated\n does not match</Message></Error>";
        assert_eq!(
            error_summary(xml),
            "SignatureDoesNotMatch: The request signature we calculated does not match"
        );
        assert_eq!(error_summary(b"not\r\nfound  "), "not found");
        assert_eq!(error_summary(&[b'x'; 500]).len(), 200);
    }

    #[test]
    fn urls() {
        let u = Url::parse("https://user:p%40ss@Example.com:8443/a/b.img?x=1#frag").unwrap();
        assert_eq!(
            (u.scheme.as_str(), u.host.as_str(), u.port, u.path.as_str()),
            ("https", "example.com", 8443, "/a/b.img?x=1")
        );
        assert_eq!(u.userinfo, Some(("user".into(), "p@ss".into())));
        assert_eq!(u.to_string(), "https://example.com:8443/a/b.img?x=1");
        let v = Url::parse("http://[::1]/x").unwrap();
        assert_eq!(
            (v.host.as_str(), v.port, v.authority()),
            ("::1", 80, "[::1]:80".into())
        );
        assert_eq!(u.join("c.img").unwrap().path, "/a/c.img");
        assert_eq!(u.join("/z").unwrap().path, "/z");
        assert_eq!(u.join("//other/q").unwrap().host, "other");
        assert_eq!(u.join("http://h2:1/").unwrap().port, 1);
        for bad in [
            "ftp://x/",
            "http://",
            "http://h:port/",
            "http://h/a b",
            "nourl",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn no_proxy_matching() {
        let p = Proxy {
            http: Some(Url::parse("http://proxy:3128").unwrap()),
            https: None,
            no_proxy: vec![".svc".into(), "localhost".into()],
        };
        assert!(
            p.for_url(&Url::parse("http://a.ns.svc/x").unwrap())
                .is_none()
        );
        assert!(
            p.for_url(&Url::parse("http://example.com/x").unwrap())
                .is_some()
        );
        assert!(
            p.for_url(&Url::parse("https://example.com/x").unwrap())
                .is_none()
        );
    }

    /// Go's rules, case by case (the list OpenShift's cluster proxy writes holds CIDRs,
    /// leading-dot domains and plain names).
    #[test]
    fn no_proxy_follows_go() {
        let p = |list: &str| Proxy {
            http: Some(Url::parse("http://proxy:3128").unwrap()),
            https: Some(Url::parse("http://proxy:3128").unwrap()),
            no_proxy: list
                .split(',')
                .map(|s| s.trim().to_ascii_lowercase())
                .collect(),
        };
        let direct = |list: &str, url: &str| p(list).for_url(&Url::parse(url).unwrap()).is_none();
        // Loopback and localhost never go through a proxy, listed or not.
        for u in [
            "http://localhost/x",
            "http://127.0.0.1/x",
            "http://127.8.9.1:81/x",
            "http://[::1]/x",
        ] {
            assert!(direct("", u), "{u}");
        }
        // `*` alone bypasses everything.
        assert!(direct("*", "http://example.com/x"));
        assert!(direct("a.b, *", "https://example.com/x"));
        // CIDR blocks match IP literals in them, not names, not other addresses.
        let cidr = "10.0.0.0/8,172.30.0.0/16,fd00::/8";
        assert!(direct(cidr, "http://10.1.2.3/x"));
        assert!(direct(cidr, "https://172.30.255.1:8443/x"));
        assert!(direct(cidr, "http://[fd12::1]/x"));
        assert!(!direct(cidr, "http://172.31.0.1/x"));
        assert!(!direct(cidr, "http://11.0.0.1/x"));
        assert!(!direct(cidr, "http://[fe80::1]/x"));
        assert!(!direct("0.0.0.0/33", "http://1.2.3.4/x"));
        assert!(direct("0.0.0.0/0", "http://1.2.3.4/x"));
        // IP literals, with or without a port; bracketed IPv6.
        assert!(direct("192.0.2.7", "http://192.0.2.7:8080/x"));
        assert!(direct("192.0.2.7:8080", "http://192.0.2.7:8080/x"));
        assert!(!direct("192.0.2.7:8080", "http://192.0.2.7:8081/x"));
        assert!(!direct("192.0.2.7", "http://192.0.2.8/x"));
        assert!(direct("[2001:db8::1]:443", "https://[2001:db8::1]/x"));
        assert!(direct("2001:db8::1", "http://[2001:db8::1]/x"));
        // A plain name matches itself and its subdomains, never a mere suffix.
        assert!(direct("example.com", "http://example.com/x"));
        assert!(direct("example.com", "http://a.b.example.com/x"));
        assert!(!direct("example.com", "http://badexample.com/x"));
        // A leading dot (or `*.`) matches subdomains only.
        assert!(direct(".example.com", "http://a.example.com/x"));
        assert!(!direct(".example.com", "http://example.com/x"));
        assert!(direct("*.example.com", "http://a.example.com/x"));
        assert!(!direct("*.example.com", "http://example.com/x"));
        // Ports restrict a name entry; case does not matter; a name never matches an IP.
        assert!(direct(
            "registry.local:5000",
            "https://registry.local:5000/v2/"
        ));
        assert!(!direct("registry.local:5000", "https://registry.local/v2/"));
        assert!(direct("EXAMPLE.com", "http://Example.COM/x"));
        assert!(!direct("example.com", "http://93.184.216.34/x"));
        // Junk entries match nothing.
        assert!(!direct("a.b:notaport, /8, [::1", "http://example.com/x"));
    }

    /// A one-shot server: answers each accepted connection with the next canned reply.
    fn serve(replies: Vec<Vec<u8>>) -> (String, std::thread::JoinHandle<Vec<String>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", l.local_addr().unwrap());
        let h = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for reply in replies {
                let (mut s, _) = l.accept().unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                        break;
                    }
                    head += &line;
                }
                seen.push(head);
                let _ = s.write_all(&reply);
            }
            seen
        });
        (addr, h)
    }

    #[test]
    fn chunked_redirect_and_resume() {
        let body: Vec<u8> = (0..100u8).collect();
        let mut first = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nAccept-Ranges: bytes\r\nETag: \"v1\"\r\n\r\n".to_vec();
        first.extend_from_slice(&body[..40]);
        let mut second =
            b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 40-99/100\r\nTransfer-Encoding: chunked\r\n\r\n"
                .to_vec();
        second.extend_from_slice(b"3c\r\n");
        second.extend_from_slice(&body[40..]);
        second.extend_from_slice(b"\r\n0\r\n\r\n");
        let (url, h) = serve(vec![
            b"HTTP/1.1 302 Found\r\nLocation: /real.img\r\nContent-Length: 0\r\n\r\n".to_vec(),
            first,
            second,
        ]);
        let c = Client::new(ClientConfig {
            basic_auth: Some(("u".into(), "p".into())),
            headers: vec![("X-Extra".into(), "1".into())],
            ..ClientConfig::default()
        })
        .unwrap();
        let mut d = c.download(&format!("{url}/start.img")).unwrap();
        assert_eq!(d.total(), Some(100));
        let mut got = Vec::new();
        d.read_to_end(&mut got).unwrap();
        assert_eq!(got, body);
        assert_eq!(d.resumes(), 1);
        let seen = h.join().unwrap();
        assert!(seen[1].starts_with("GET /real.img "), "{}", seen[1]);
        assert!(seen[2].contains("Range: bytes=40-"), "{}", seen[2]);
        assert!(seen[2].contains("If-Range: \"v1\""), "{}", seen[2]);
        assert!(seen.iter().all(|s| s.contains("Authorization: Basic dTpw")));
        assert!(seen.iter().all(|s| s.contains("X-Extra: 1")));
    }

    #[test]
    fn truncation_without_ranges_is_an_error() {
        let (url, h) = serve(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc".to_vec(),
        ]);
        let c = Client::new(ClientConfig::default()).unwrap();
        let mut d = c.download(&url).unwrap();
        let mut v = Vec::new();
        let e = d.read_to_end(&mut v).unwrap_err();
        assert!(e.to_string().contains("after 3 bytes"), "{e}");
        h.join().unwrap();
        let (url, h) = serve(vec![
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
        ]);
        let e = c.download(&url).map(|_| ()).unwrap_err();
        assert_eq!(e.to_string(), "expected status code 200, got 404");
        h.join().unwrap();
    }

    #[test]
    fn idle_timeout_fails_the_read() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/x", l.local_addr().unwrap());
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab");
            std::thread::sleep(Duration::from_millis(1500));
        });
        let c = Client::new(ClientConfig {
            idle_timeout: Duration::from_millis(300),
            ..ClientConfig::default()
        })
        .unwrap();
        let mut d = c.download(&url).unwrap();
        let mut v = Vec::new();
        assert!(d.read_to_end(&mut v).is_err());
        h.join().unwrap();
    }

    #[test]
    fn download_headers_survive_resumes_but_not_other_hosts() {
        let body: Vec<u8> = (0..100u8).collect();
        let mut first =
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nAccept-Ranges: bytes\r\n\r\n".to_vec();
        first.extend_from_slice(&body[..30]);
        let mut second =
            b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 30-99/100\r\nContent-Length: 70\r\n\r\n"
                .to_vec();
        second.extend_from_slice(&body[30..]);
        let c = Client::new(ClientConfig::default()).unwrap();
        let hs = [("Authorization", "Bearer t0k"), ("X-Trace", "7")];

        // Same host: everything is sent again with the Range request.
        let (url, h) = serve(vec![first.clone(), second.clone()]);
        let mut d = c.download_with_headers(&url, &hs).unwrap();
        let mut got = Vec::new();
        d.read_to_end(&mut got).unwrap();
        assert_eq!((got, d.resumes()), (body.clone(), 1));
        let seen = h.join().unwrap();
        assert!(seen[1].contains("Range: bytes=30-"), "{}", seen[1]);
        for s in &seen {
            assert!(s.contains("Authorization: Bearer t0k") && s.contains("X-Trace: 7"));
        }

        // Redirected to another host: Authorization is dropped there, resumes included.
        let (other, h2) = serve(vec![first, second]);
        let (url, h1) = serve(vec![
            format!("HTTP/1.1 302 Found\r\nLocation: {other}/blob\r\nContent-Length: 0\r\n\r\n")
                .into_bytes(),
        ]);
        let mut d = c.download_with_headers(&url, &hs).unwrap();
        let mut got = Vec::new();
        d.read_to_end(&mut got).unwrap();
        assert_eq!(got, body);
        assert!(h1.join().unwrap()[0].contains("Authorization: Bearer t0k"));
        let seen = h2.join().unwrap();
        assert_eq!(seen.len(), 2);
        for s in &seen {
            assert!(!s.to_ascii_lowercase().contains("authorization"), "{s}");
            assert!(s.contains("X-Trace: 7"), "{s}");
        }
    }

    #[test]
    fn download_with_makes_fresh_headers_for_each_request() {
        let body: Vec<u8> = (0..100u8).collect();
        let mut first =
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nAccept-Ranges: bytes\r\n\r\n".to_vec();
        first.extend_from_slice(&body[..30]);
        let mut second =
            b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 30-99/100\r\nContent-Length: 70\r\n\r\n"
                .to_vec();
        second.extend_from_slice(&body[30..]);
        let (url, h) = serve(vec![first, second]);
        let c = Client::new(ClientConfig::default()).unwrap();
        let mut n = 0;
        let mut d = c
            .download_with(
                &url,
                Box::new(move || {
                    n += 1;
                    Ok(vec![("X-Sig".into(), format!("sig{n}"))])
                }),
            )
            .unwrap();
        let mut got = Vec::new();
        d.read_to_end(&mut got).unwrap();
        assert_eq!((got, d.resumes()), (body, 1));
        let seen = h.join().unwrap();
        assert!(seen[0].contains("X-Sig: sig1\r\n"), "{}", seen[0]);
        assert!(
            seen[1].contains("X-Sig: sig2\r\n") && seen[1].contains("Range: bytes=30-"),
            "{}",
            seen[1]
        );

        // A refusal quotes the object store's reason.
        let (url, h) = serve(vec![
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 61\r\n\r\n<Error><Code>AccessDenied</Code><Message>no</Message></Error>".to_vec(),
        ]);
        let e = c
            .download_with(&url, Box::new(|| Ok(Vec::new())))
            .map(|_| ())
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "expected status code 200, got 403: AccessDenied: no"
        );
        h.join().unwrap();
    }

    /// A reader handing out at most 10007 bytes per call, so blocks and chunks are uneven.
    struct Uneven<'a>(&'a [u8]);

    impl Read for Uneven<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.0.len()).min(10007);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    fn sha256_hex(data: &[u8]) -> String {
        use sha2::Digest as _;
        sha2::Sha256::digest(data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn pattern(len: usize) -> Vec<u8> {
        let mut x = 0x2545_f491u32;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    /// What an upload test server does with a request.
    #[derive(Clone, Copy)]
    enum Upload {
        /// Read the whole body and answer 200 with its SHA-256 and the client's CN.
        Hash,
        /// Read 64 KiB, answer 409, then close at once or after a pause without reading.
        Refuse { pause: Duration },
    }

    /// Serve one request, plain or over TLS; returns the request head seen.
    fn upload_server(
        tls: Option<Arc<rustls::ServerConfig>>,
        mode: Upload,
    ) -> (String, std::thread::JoinHandle<String>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{}/v1beta1/upload", l.local_addr().unwrap());
        let h = std::thread::spawn(move || {
            let (mut tcp, _) = l.accept().unwrap();
            // The answer must leave before the close resets the connection (Nagle could
            // hold it back, and a reset discards what is still queued).
            tcp.set_nodelay(true).unwrap();
            match tls {
                None => handle_upload(tcp, String::new(), mode),
                Some(cfg) => {
                    let mut conn = rustls::ServerConnection::new(cfg).unwrap();
                    while conn.is_handshaking() {
                        if conn.complete_io(&mut tcp).is_err() {
                            return "handshake failed".to_string();
                        }
                    }
                    let cn = conn
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| crate::net::server::subject_common_name(c))
                        .unwrap_or_default();
                    handle_upload(rustls::StreamOwned::new(conn, tcp), cn, mode)
                }
            }
        });
        (url, h)
    }

    fn handle_upload<S: Read + Write>(s: S, cn: String, mode: Upload) -> String {
        let mut r = BufReader::new(s);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                break;
            }
            head += &line;
        }
        let lower = head.to_ascii_lowercase();
        let length = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map(|v| v.trim().parse::<u64>().unwrap());
        let mut body: Box<dyn Read + '_> = match length {
            Some(n) => Box::new(Exact {
                inner: &mut r,
                left: n,
            }),
            None => {
                assert!(lower.contains("transfer-encoding: chunked"), "{head}");
                Box::new(Chunked {
                    inner: &mut r,
                    left: 0,
                    done: false,
                })
            }
        };
        let reply = match mode {
            Upload::Hash => {
                let mut data = Vec::new();
                body.read_to_end(&mut data).unwrap();
                let text = format!("{} {cn}", sha256_hex(&data));
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{text}",
                    text.len()
                )
            }
            Upload::Refuse { .. } => {
                io::copy(&mut (&mut body).take(64 << 10), &mut io::sink()).unwrap();
                "HTTP/1.1 409 Conflict\r\nContent-Length: 21\r\n\r\nupload already done\r\n".into()
            }
        };
        drop(body);
        let s = r.get_mut();
        s.write_all(reply.as_bytes()).unwrap();
        s.flush().unwrap();
        if let Upload::Refuse { pause } = mode {
            std::thread::sleep(pause);
        }
        head
    }

    #[test]
    fn uploads_stream_sized_and_chunked() {
        let data = pattern(16 << 20);
        let want = sha256_hex(&data);
        let c = Client::new(ClientConfig::default()).unwrap();
        for len in [Some(data.len() as u64), None] {
            let (url, h) = upload_server(None, Upload::Hash);
            let r = c
                .send_body(
                    "POST",
                    &url,
                    &[("Content-Type", "application/octet-stream")],
                    &mut Uneven(&data),
                    len,
                )
                .unwrap();
            assert_eq!(r.status, 200);
            let got = String::from_utf8(r.read_to_vec(1000).unwrap()).unwrap();
            assert_eq!(got.trim(), want);
            let head = h.join().unwrap();
            assert!(
                head.starts_with("POST /v1beta1/upload HTTP/1.1\r\n"),
                "{head}"
            );
            assert!(head.contains("Content-Type: application/octet-stream"));
            match len {
                Some(n) => assert!(head.contains(&format!("Content-Length: {n}\r\n")), "{head}"),
                None => assert!(head.contains("Transfer-Encoding: chunked\r\n"), "{head}"),
            }
        }
        // A sized body that ends early is the caller's error, not a server answer.
        let (url, _h) = upload_server(None, Upload::Hash);
        let e = c
            .send_body("POST", &url, &[], &mut &data[..10], Some(11))
            .unwrap_err();
        assert!(e.to_string().contains("ended after 10 of 11 bytes"), "{e}");
        // The client owns the framing headers.
        let e = c
            .send_body(
                "POST",
                &url,
                &[("Content-Length", "5")],
                &mut &b"x"[..],
                Some(1),
            )
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn early_answer_during_upload_is_reported() {
        let data = pattern(16 << 20);
        let c = Client::new(ClientConfig::default()).unwrap();
        // The server closes straight after answering (the write fails under us), or keeps
        // the connection open without reading (the answer is heard when a write stalls,
        // long before the server gives up).
        for pause in [Duration::ZERO, Duration::from_secs(4)] {
            for len in [Some(data.len() as u64), None] {
                let (url, h) = upload_server(None, Upload::Refuse { pause });
                let t = std::time::Instant::now();
                let r = c
                    .send_body("POST", &url, &[], &mut Uneven(&data), len)
                    .unwrap();
                assert!(
                    t.elapsed() < Duration::from_millis(3500),
                    "{:?}",
                    t.elapsed()
                );
                assert_eq!(r.status, 409, "pause {pause:?} len {len:?}");
                assert_eq!(r.read_to_vec(100).unwrap(), b"upload already done\r\n");
                h.join().unwrap();
            }
        }
    }

    /// A CA, and a client certificate it signed: (ca_pem, cert_pem, key_pem).
    fn client_identity(cn: &str) -> (String, String, String) {
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "test upload CA");
        ca.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca =
            rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().unwrap()).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &*ca).unwrap();
        (ca.pem(), cert.pem(), key.serialize_pem())
    }

    /// A TLS server that requires a client certificate signed by `client_ca`.
    fn mtls_config(cert: &[u8], key: &[u8], client_ca: &str) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in parse_certs(client_ca.as_bytes()).unwrap() {
            roots.add(c).unwrap();
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .unwrap();
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                parse_certs(cert).unwrap(),
                PrivateKeyDer::from_pem_slice(key).unwrap(),
            )
            .unwrap();
        Arc::new(cfg)
    }

    #[test]
    fn mutual_tls_presents_the_client_certificate() {
        let (server_cert, server_key) = crate::net::server::self_signed("localhost").unwrap();
        let (ca, cert, key) = client_identity("client.upload-server.cdi.kubevirt.io");
        let tls = mtls_config(&server_cert, &server_key, &ca);
        let data = pattern(3 << 20);
        let want = format!("{} client.upload-server.cdi.kubevirt.io", sha256_hex(&data));
        let identity = Some((cert.into_bytes(), key.into_bytes()));
        let verified = ClientConfig {
            ca_pem: vec![server_cert.clone()],
            client_cert: identity.clone(),
            ..ClientConfig::default()
        };
        let insecure = ClientConfig {
            insecure: true,
            client_cert: identity,
            ..ClientConfig::default()
        };
        for (cfg, len) in [
            (verified, Some(data.len() as u64)),
            (insecure.clone(), None),
        ] {
            let c = Client::new(cfg).unwrap();
            let (url, h) = upload_server(Some(tls.clone()), Upload::Hash);
            let r = c
                .send_body("POST", &url, &[], &mut Uneven(&data), len)
                .unwrap();
            assert_eq!(r.status, 200);
            assert_eq!(
                String::from_utf8(r.read_to_vec(1000).unwrap()).unwrap(),
                want
            );
            h.join().unwrap();
        }
        // Without a certificate the server ends the handshake.
        let c = Client::new(ClientConfig {
            insecure: true,
            ..ClientConfig::default()
        })
        .unwrap();
        let (url, h) = upload_server(Some(tls.clone()), Upload::Hash);
        assert!(
            c.send_body("POST", &url, &[], &mut &b"x"[..], Some(1))
                .is_err()
        );
        assert_eq!(h.join().unwrap(), "handshake failed");
        // An early answer over TLS is heard too, whether the write fails or not.
        let c = Client::new(insecure).unwrap();
        let big = pattern(16 << 20);
        for pause in [Duration::ZERO, Duration::from_secs(4)] {
            let (url, h) = upload_server(Some(tls.clone()), Upload::Refuse { pause });
            let t = std::time::Instant::now();
            let r = c
                .send_body("POST", &url, &[], &mut Uneven(&big), Some(big.len() as u64))
                .unwrap();
            assert!(
                t.elapsed() < Duration::from_millis(3500),
                "{:?}",
                t.elapsed()
            );
            assert_eq!(r.status, 409, "pause {pause:?}");
            assert_eq!(r.read_to_vec(100).unwrap(), b"upload already done\r\n");
            h.join().unwrap();
        }
        // Unreadable client credentials are refused up front.
        assert!(
            Client::new(ClientConfig {
                client_cert: Some((b"junk".to_vec(), b"junk".to_vec())),
                ..ClientConfig::default()
            })
            .is_err()
        );
    }
}
