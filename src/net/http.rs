//! HTTP/1.1 client over TCP and rustls, for image downloads and the registry API.
//!
//! Owns: URL parsing, proxies from the environment (`http_proxy`, `https_proxy`, `no_proxy`,
//! CONNECT tunnels for HTTPS), TLS with the system roots plus extra CA bundles (or no
//! verification when asked), redirects, response framing (Content-Length, chunked, until
//! close), an idle timeout on every read, and [`Download`], a body reader that resumes with
//! a Range request when the connection drops. Memory per request is a few buffers,
//! whatever the body size.

use crate::error::{Error, ErrorKind, Result};
use base64::Engine as _;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

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
                    Some((percent_decode(user), percent_decode(pass))),
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
    fn host_header(&self) -> String {
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

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("x"), 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Proxy settings: `http_proxy`, `https_proxy` and `no_proxy` (either case), as Go reads them.
#[derive(Debug, Clone, Default)]
pub struct Proxy {
    /// Proxy for `http://` URLs.
    pub http: Option<Url>,
    /// Proxy for `https://` URLs (reached with CONNECT).
    pub https: Option<Url>,
    /// Hosts reached directly: exact names, `.suffix` / `suffix` domain matches, `*`.
    pub no_proxy: Vec<String>,
}

impl Proxy {
    /// Read the proxy variables of the environment.
    pub fn from_env() -> Result<Proxy> {
        let var = |n: &str| {
            std::env::var(n)
                .ok()
                .or_else(|| std::env::var(n.to_ascii_uppercase()).ok())
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

    fn for_url(&self, u: &Url) -> Option<&Url> {
        let host = u.host.as_str();
        let bypass = self.no_proxy.iter().any(|n| {
            let n = n.split(':').next().unwrap_or(n);
            n == "*" || {
                let d = n.trim_start_matches('.');
                host == d || host.ends_with(&format!(".{d}"))
            }
        });
        if bypass {
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
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `User-Agent` header.
    pub user_agent: String,
    /// Skip TLS certificate verification (CDI's `INSECURE_TLS`).
    pub insecure: bool,
    /// Extra trusted CA certificates, as PEM text (bundles allowed).
    pub ca_pem: Vec<Vec<u8>>,
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
        let tls = if cfg.insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
                .with_no_client_auth()
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
            builder.with_root_certificates(roots).with_no_client_auth()
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
            let r = self.once(method, &u, &hs)?;
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

    /// GET `url`, which must answer 200, as a body that resumes after dropped connections
    /// (when the server accepts ranges).
    pub fn download(&self, url: &str) -> Result<Download> {
        let r = self.send("GET", url, &[])?;
        if r.status != 200 {
            return Err(net_err(format!(
                "expected status code 200, got {}",
                r.status
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
        Ok(Download {
            client: self.clone(),
            url: r.url.clone(),
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

    fn once(&self, method: &str, u: &Url, headers: &[(&str, &str)]) -> Result<Response> {
        let cfg = &self.inner.cfg;
        let via_proxy = u.scheme == "http" && cfg.proxy.for_url(u).is_some();
        let mut conn = self.connect(u)?;
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
        req += "\r\n";
        conn.write_all(req.as_bytes())
            .and_then(|_| conn.flush())
            .map_err(|e| net_io(format!("cannot send request to {u}"), e))?;
        let mut r = BufReader::with_capacity(256 << 10, conn);
        let (status, headers) = read_head(&mut r)?;
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

fn b64(user: &str, pass: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
}

/// Read a response head (status line and headers), skipping 1xx responses.
fn read_head<R: BufRead>(r: &mut R) -> Result<(u16, Vec<(String, String)>)> {
    loop {
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
        if (100..200).contains(&status) {
            continue;
        }
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
        return Ok((status, headers));
    }
}

enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => match s.read(buf) {
                // A server closing without close_notify ends the body like a plain close;
                // truncation is caught by the framing (length, chunks).
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
                r => r,
            },
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
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

/// The body of a GET that reconnects with `Range: bytes=N-` when the connection drops or
/// stalls, as long as the server advertised ranges and the file is unchanged.
pub struct Download {
    client: Client,
    url: String,
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
        let range = format!("bytes={}-", self.pos);
        let mut hs = vec![("Range", range.as_str())];
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
            p.for_url(&Url::parse("http://localhost/x").unwrap())
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
}
