//! A small threaded HTTP/1.1 server over `std::net::TcpListener`, with optional TLS (rustls,
//! `ring` provider) and optional verification of client certificates.
//!
//! This module owns everything server-side the importer and the upload server need:
//!
//! * TLS set-up from PEM material and Go-style knobs ([`TlsSettings`], [`tls_config`]), a
//!   self-signed certificate generator ([`self_signed`]) and a bounds-checked DER walker for
//!   the subject common name of a verified client certificate ([`subject_common_name`]);
//! * request-head parsing with hard limits (64 KiB, 100 headers, 10 s to arrive), streaming
//!   request bodies (`Content-Length` or `Transfer-Encoding: chunked`, `Expect: 100-continue`)
//!   that are never buffered whole, so uploads of many GiB work; keep-alive; panicking
//!   handlers turned into `500` responses;
//! * the accept loop, one thread per connection, and an orderly [`ServerHandle::shutdown`];
//! * the Prometheus progress metric CDI's controller scrapes from importer pods
//!   ([`Progress`], [`start_metrics`]).
//!
//! Responses are small and fully built by the handler ([`Response`]); they always carry
//! `Content-Length` (except `1xx`/`204`/`304`, which must not have a body).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{CipherSuite, RootCertStore, ServerConfig, ServerConnection, StreamOwned};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{Error, ErrorKind, Result};

/// Largest request head (request line plus headers) accepted.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header fields accepted in one request.
pub const MAX_HEADERS: usize = 100;
/// Time a client has to deliver a complete request head (and, on TLS, the handshake);
/// CDI's `ReadHeaderTimeout`.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest silence tolerated while a request body streams in or a response goes out.
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Unread request body the server discards after the handler to keep a connection alive;
/// more than this and the connection is closed instead.
const DRAIN_LIMIT: u64 = 64 * 1024;
/// Connections served at once; further ones are closed straight after accept.
const MAX_CONNECTIONS: usize = 1024;
/// Longest chunk-size line (with extensions) of a chunked body.
const MAX_CHUNK_LINE: usize = 4096;
/// Largest trailer section of a chunked body.
const MAX_TRAILERS: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// TLS configuration
// ---------------------------------------------------------------------------------------------

/// TLS settings for a server.
#[derive(Debug, Clone, Default)]
pub struct TlsSettings {
    /// Server certificate chain, PEM, leaf first.
    pub cert_pem: Vec<u8>,
    /// Private key of the leaf, PEM (PKCS#8, PKCS#1 RSA or SEC1 EC).
    pub key_pem: Vec<u8>,
    /// When set, client certificates are requested and, if a client presents one, verified
    /// against these CAs (Go's `VerifyClientCertIfGiven`); clients without one still connect.
    pub client_ca_pem: Option<Vec<u8>>,
    /// Lowest protocol version, by Go name: `VersionTLS10` .. `VersionTLS13`. rustls speaks
    /// only TLS 1.2 and 1.3, so 1.0 and 1.1 mean 1.2. `None` or empty: 1.2.
    pub min_version: Option<String>,
    /// Comma-separated TLS 1.2 cipher suites by Go (IANA) or OpenSSL name. Names rustls does
    /// not implement are ignored; if none is usable the defaults stay. TLS 1.3 suites are
    /// always enabled, as in Go.
    pub ciphers: Option<String>,
}

/// A self-signed certificate for `common_name`: `(cert_pem, key_pem)`, ECDSA P-256, PKCS#8.
///
/// Besides the subject CN, the certificate names `common_name`, `localhost`, `127.0.0.1` and
/// `::1` as subject alternative names, so local clients can verify it by name.
pub fn self_signed(common_name: &str) -> Result<(Vec<u8>, Vec<u8>)> {
    let fail = |e: rcgen::Error| {
        Error::new(
            ErrorKind::InvalidArgument,
            format!("cannot create a self-signed certificate for {common_name:?}: {e}"),
        )
    };
    let mut sans = vec!["localhost".to_string()];
    if !common_name.is_empty() && common_name != "localhost" {
        sans.insert(0, common_name.to_string());
    }
    let mut params = rcgen::CertificateParams::new(sans).map_err(fail)?;
    for ip in [
        std::net::IpAddr::from([127, 0, 0, 1]),
        std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
    ] {
        params.subject_alt_names.push(rcgen::SanType::IpAddress(ip));
    }
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    let key = rcgen::KeyPair::generate().map_err(fail)?;
    let cert = params.self_signed(&key).map_err(fail)?;
    Ok((cert.pem().into_bytes(), key.serialize_pem().into_bytes()))
}

/// The TLS 1.2 suite a Go (IANA) or OpenSSL cipher-suite name stands for, if rustls has it.
fn cipher_suite_by_name(name: &str) -> Option<CipherSuite> {
    use CipherSuite as C;
    Some(match name {
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256" | "ECDHE-ECDSA-AES128-GCM-SHA256" => {
            C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        }
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384" | "ECDHE-ECDSA-AES256-GCM-SHA384" => {
            C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        }
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"
        | "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305"
        | "ECDHE-ECDSA-CHACHA20-POLY1305" => C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256" | "ECDHE-RSA-AES128-GCM-SHA256" => {
            C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        }
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384" | "ECDHE-RSA-AES256-GCM-SHA384" => {
            C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
        }
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256"
        | "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305"
        | "ECDHE-RSA-CHACHA20-POLY1305" => C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        _ => return None,
    })
}

/// The `ring` provider restricted to the TLS 1.2 suites named in `ciphers` (all TLS 1.3
/// suites kept); unchanged when no name maps to a suite rustls implements.
fn provider_for(ciphers: Option<&str>) -> CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    let wanted: Vec<CipherSuite> = ciphers
        .unwrap_or("")
        .split(',')
        .filter_map(|n| cipher_suite_by_name(n.trim()))
        .collect();
    let usable = provider
        .cipher_suites
        .iter()
        .any(|s| wanted.contains(&s.suite()));
    if usable {
        provider.cipher_suites.retain(|s| {
            matches!(s, rustls::SupportedCipherSuite::Tls13(_)) || wanted.contains(&s.suite())
        });
    }
    provider
}

/// Protocol versions for a Go `MinVersion` name.
fn versions_for(
    min_version: Option<&str>,
) -> Result<&'static [&'static rustls::SupportedProtocolVersion]> {
    static BOTH: [&rustls::SupportedProtocolVersion; 2] =
        [&rustls::version::TLS13, &rustls::version::TLS12];
    static ONLY13: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
    match min_version.map(str::trim).unwrap_or("") {
        "" | "VersionTLS10" | "VersionTLS11" | "VersionTLS12" => Ok(&BOTH),
        "VersionTLS13" => Ok(&ONLY13),
        other => Err(Error::invalid(format!(
            "unknown minimum TLS version {other:?} (expected VersionTLS10 .. VersionTLS13)"
        ))),
    }
}

/// A rustls server configuration from `s`, using the `ring` provider explicitly (no
/// process-wide provider needs installing).
pub fn tls_config(s: &TlsSettings) -> Result<Arc<ServerConfig>> {
    let certs = CertificateDer::pem_slice_iter(&s.cert_pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::invalid(format!("cannot read the server certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(Error::invalid(
            "the server certificate PEM holds no certificate",
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&s.key_pem)
        .map_err(|e| Error::invalid(format!("cannot read the server private key PEM: {e}")))?;
    let provider = Arc::new(provider_for(s.ciphers.as_deref()));
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions_for(s.min_version.as_deref())?)
        .map_err(|e| Error::invalid(format!("unusable TLS versions/cipher suites: {e}")))?;
    let builder = match &s.client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(ca_pem) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca_pem) {
                let cert = cert
                    .map_err(|e| Error::invalid(format!("cannot read the client CA PEM: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| Error::invalid(format!("unusable client CA certificate: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| Error::invalid(format!("cannot verify client certificates: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| Error::invalid(format!("unusable server certificate or key: {e}")))?;
    Ok(Arc::new(config))
}

// ---------------------------------------------------------------------------------------------
// DER: subject common name
// ---------------------------------------------------------------------------------------------

/// One DER element: `(tag, contents, rest)`. Only low tag numbers and definite lengths of up
/// to four length octets; anything else (or truncation) is `None`.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 {
            return None;
        }
        let octets = rest.get(..count)?;
        let len = octets
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, rest.get(count..)?)
    };
    Some((tag, rest.get(..len)?, rest.get(len..)?))
}

/// The contents of a DER element that must carry `tag`, and what follows it.
fn der_expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    match der_element(input)? {
        (t, contents, rest) if t == tag => Some((contents, rest)),
        _ => None,
    }
}

/// A directory string's text (UTF8String, PrintableString, IA5String, TeletexString as
/// Latin-1, BMPString, UniversalString).
fn der_string(tag: u8, bytes: &[u8]) -> Option<String> {
    match tag {
        0x0c => String::from_utf8(bytes.to_vec()).ok(),
        0x13 | 0x16 => bytes
            .is_ascii()
            .then(|| String::from_utf8_lossy(bytes).into_owned()),
        0x14 => Some(bytes.iter().map(|&b| char::from(b)).collect()),
        0x1e => {
            if bytes.len() % 2 != 0 {
                return None;
            }
            let units = bytes
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]));
            char::decode_utf16(units)
                .collect::<std::result::Result<String, _>>()
                .ok()
        }
        0x1c => {
            if bytes.len() % 4 != 0 {
                return None;
            }
            bytes
                .chunks_exact(4)
                .map(|c| char::from_u32(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
                .collect()
        }
        _ => None,
    }
}

/// The subject common name (OID 2.5.4.3) of a DER X.509 certificate; when there are several,
/// the last (as Go's `pkix.Name.CommonName`). `None` for malformed input or no CN; never
/// panics, whatever the bytes.
pub fn subject_common_name(cert_der: &[u8]) -> Option<String> {
    const CN_OID: [u8; 3] = [0x55, 0x04, 0x03];
    let (cert, _) = der_expect(cert_der, 0x30)?;
    let (tbs, _) = der_expect(cert, 0x30)?;
    let mut rest = tbs;
    if rest.first() == Some(&0xa0) {
        rest = der_element(rest)?.2; // [0] EXPLICIT version
    }
    rest = der_expect(rest, 0x02)?.1; // serialNumber
    rest = der_expect(rest, 0x30)?.1; // signature AlgorithmIdentifier
    rest = der_expect(rest, 0x30)?.1; // issuer Name
    rest = der_expect(rest, 0x30)?.1; // validity
    let (mut name, _) = der_expect(rest, 0x30)?; // subject Name
    let mut found = None;
    while !name.is_empty() {
        let (mut rdn, after) = der_expect(name, 0x31)?;
        name = after;
        while !rdn.is_empty() {
            let (attribute, after) = der_expect(rdn, 0x30)?;
            rdn = after;
            let (oid, value) = der_expect(attribute, 0x06)?;
            if oid == CN_OID {
                let (tag, text, _) = der_element(value)?;
                found = Some(der_string(tag, text)?);
            }
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// Requests and responses
// ---------------------------------------------------------------------------------------------

/// One request, handed to the [`Handler`]. The body streams from the connection.
pub struct Request<'a> {
    /// Method as sent (`GET`, `POST`, ...).
    pub method: String,
    /// Request path without the query, not percent-decoded (`/v1beta1/upload`).
    pub path: String,
    /// Raw query string without `?`, `""` if none.
    pub query: String,
    /// Header fields in arrival order; values decoded lossily as UTF-8.
    pub headers: Vec<(String, String)>,
    /// Subject CN of the client certificate, only when one was presented and verified.
    pub peer_common_name: Option<String>,
    /// Whether the client presented a certificate chain that verified against the client CA.
    pub peer_verified: bool,
    /// The client's address.
    pub peer_addr: SocketAddr,
    body: Body<'a>,
}

impl std::fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("query", &self.query)
            .field("headers", &self.headers)
            .field("peer_common_name", &self.peer_common_name)
            .field("peer_verified", &self.peer_verified)
            .field("peer_addr", &self.peer_addr)
            .finish_non_exhaustive()
    }
}

impl Request<'_> {
    /// The first header field named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The declared body length; `None` for a chunked body.
    pub fn content_length(&self) -> Option<u64> {
        match self.body.kind {
            BodyKind::Length { total, .. } => Some(total),
            BodyKind::Chunked(_) => None,
        }
    }

    /// The body as a stream, limited to `Content-Length` or decoding `chunked`. Reads go
    /// straight to the connection (through a 64 KiB buffer); nothing is accumulated. A client
    /// that sent `Expect: 100-continue` gets its `100 Continue` on the first read.
    pub fn body(&mut self) -> &mut (dyn Read + Send) {
        &mut self.body
    }
}

/// A complete response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code, 200..=999 (anything else is sent as 500).
    pub status: u16,
    /// Extra header fields. `Content-Length`, `Transfer-Encoding` and `Connection` are set
    /// by the server (`Connection: close` here is honoured); fields containing control
    /// characters are dropped.
    pub headers: Vec<(String, String)>,
    /// The body, sent with `Content-Length` (omitted for `HEAD`).
    pub body: Vec<u8>,
    /// Instead of `body`, a byte range of a file, read in chunks as it is sent (a disk of
    /// many GiB is never held in memory).
    pub file: Option<FileRange>,
}

/// A byte range of a file sent as a response body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRange {
    /// The file, opened when the response is written.
    pub path: std::path::PathBuf,
    /// First byte sent.
    pub offset: u64,
    /// Number of bytes sent; a file found shorter closes the connection mid-body.
    pub len: u64,
}

impl Response {
    /// A `text/plain; charset=utf-8` response.
    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            headers: vec![(
                "Content-Type".to_string(),
                "text/plain; charset=utf-8".to_string(),
            )],
            body: body.into().into_bytes(),
            file: None,
        }
    }

    /// A response without body.
    pub fn empty(status: u16) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            file: None,
        }
    }

    /// A `200` response sending `range` of a file.
    pub fn file(status: u16, range: FileRange) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            file: Some(range),
        }
    }

    /// This response with one more header field.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Response {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// The reason phrase for common status codes (`""` for others).
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Request Entity Too Large",
        415 => "Unsupported Media Type",
        417 => "Expectation Failed",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        507 => "Insufficient Storage",
        _ => "",
    }
}

/// Serves every request; runs on the connection's thread and may block (e.g. streaming a
/// body to disk). A panic becomes a `500` response.
pub type Handler = Arc<dyn Fn(&mut Request<'_>) -> Response + Send + Sync>;

// ---------------------------------------------------------------------------------------------
// Connection plumbing
// ---------------------------------------------------------------------------------------------

/// The TCP socket with the read timeout policy: a hard deadline while a head (or handshake)
/// is awaited, an idle timeout otherwise.
struct Sock {
    tcp: TcpStream,
    deadline: Option<Instant>,
}

impl Sock {
    fn set_deadline(&mut self, deadline: Instant) {
        self.deadline = Some(deadline);
    }

    fn set_idle(&mut self, idle: Duration) -> io::Result<()> {
        self.deadline = None;
        self.tcp.set_read_timeout(Some(idle))
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.tcp.set_read_timeout(Some(left))?;
        }
        self.tcp.read(buf)
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tcp.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

enum Conn {
    Plain(Sock),
    Tls(Box<StreamOwned<ServerConnection, Sock>>),
}

impl Conn {
    fn sock(&mut self) -> &mut Sock {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(t) => &mut t.sock,
        }
    }

    /// Close politely: TLS close_notify, TCP half-close, then a short linger reading what
    /// the client still sends so unread data does not turn into a reset that destroys the
    /// response before the client reads it.
    fn close(mut self) {
        let _ = self
            .sock()
            .tcp
            .set_write_timeout(Some(Duration::from_secs(5)));
        if let Conn::Tls(t) = &mut self {
            t.conn.send_close_notify();
            let _ = t.flush();
        }
        let sock = match self {
            Conn::Plain(s) => s,
            Conn::Tls(t) => t.sock,
        };
        let mut tcp = sock.tcp;
        let _ = tcp.shutdown(Shutdown::Write);
        // Long enough for a client still sending a large body to read an early answer
        // (401, 409, 503, a 400 for an image that does not fit).
        let until = Instant::now() + Duration::from_secs(2);
        let mut budget = 64usize << 20;
        let mut scratch = [0u8; 8192];
        while budget > 0 {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() || tcp.set_read_timeout(Some(left)).is_err() {
                break;
            }
            match tcp.read(&mut scratch) {
                Ok(0) | Err(_) => break,
                Ok(n) => budget = budget.saturating_sub(n),
            }
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(t) => t.flush(),
        }
    }
}

/// A connection with a read buffer that holds at most one request head.
struct BufConn {
    conn: Conn,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl BufConn {
    fn new(conn: Conn) -> BufConn {
        BufConn {
            conn,
            buf: vec![0u8; MAX_HEAD_BYTES].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Move buffered bytes to the front and read more after them; `Ok(0)` at end of stream
    /// or when the buffer is full.
    fn fill_more(&mut self) -> io::Result<usize> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            return Ok(0);
        }
        let n = self.conn.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }

    /// Refill an empty buffer; error at end of stream.
    fn refill(&mut self) -> io::Result<()> {
        self.start = 0;
        self.end = 0;
        let n = self.conn.read(&mut self.buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed inside the request body",
            ));
        }
        self.end = n;
        Ok(())
    }

    /// One CRLF-terminated line without the CRLF; at most `limit` bytes in all.
    fn read_line(&mut self, limit: usize) -> io::Result<Vec<u8>> {
        let mut line = Vec::new();
        loop {
            if self.start == self.end {
                self.refill()?;
            }
            let avail = &self.buf[self.start..self.end];
            let (take, done) = match avail.iter().position(|&b| b == b'\n') {
                Some(i) => (i + 1, true),
                None => (avail.len(), false),
            };
            line.extend_from_slice(&avail[..take]);
            self.start += take;
            if line.len() > limit {
                return Err(invalid_data("chunked body: line too long"));
            }
            if done {
                break;
            }
        }
        if !line.ends_with(b"\r\n") {
            return Err(invalid_data("chunked body: line not terminated by CRLF"));
        }
        line.truncate(line.len() - 2);
        Ok(line)
    }
}

impl Read for BufConn {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.start == self.end {
            if out.len() >= self.buf.len() {
                return self.conn.read(out);
            }
            self.start = 0;
            self.end = self.conn.read(&mut self.buf)?;
        }
        let n = out.len().min(self.end - self.start);
        out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        Ok(n)
    }
}

fn invalid_data(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

#[derive(Debug, Clone, Copy)]
enum BodyKind {
    Length { total: u64, left: u64 },
    Chunked(ChunkState),
}

/// A request body reading from the connection.
struct Body<'a> {
    conn: &'a mut BufConn,
    kind: BodyKind,
    /// The client awaits `100 Continue` before sending the body, and has not had it yet.
    continue_pending: bool,
    failed: bool,
}

impl Body<'_> {
    fn is_done(&self) -> bool {
        matches!(
            self.kind,
            BodyKind::Length { left: 0, .. } | BodyKind::Chunked(ChunkState::Done)
        )
    }

    fn read_inner(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            match &mut self.kind {
                BodyKind::Length { left, .. } => {
                    let want = usize::try_from(*left).unwrap_or(usize::MAX).min(out.len());
                    let n = self.conn.read(&mut out[..want])?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed inside the request body",
                        ));
                    }
                    *left -= n as u64;
                    return Ok(n);
                }
                BodyKind::Chunked(state) => match *state {
                    ChunkState::Done => return Ok(0),
                    ChunkState::Size => {
                        let line = self.conn.read_line(MAX_CHUNK_LINE)?;
                        let size = parse_chunk_size(&line)?;
                        *state = if size == 0 {
                            ChunkState::Trailers
                        } else {
                            ChunkState::Data(size)
                        };
                    }
                    ChunkState::Data(left) => {
                        let want = usize::try_from(left).unwrap_or(usize::MAX).min(out.len());
                        let n = self.conn.read(&mut out[..want])?;
                        if n == 0 {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "connection closed inside a body chunk",
                            ));
                        }
                        let left = left - n as u64;
                        *state = if left == 0 {
                            ChunkState::DataEnd
                        } else {
                            ChunkState::Data(left)
                        };
                        return Ok(n);
                    }
                    ChunkState::DataEnd => {
                        if !self.conn.read_line(2)?.is_empty() {
                            return Err(invalid_data("chunked body: chunk longer than its size"));
                        }
                        *state = ChunkState::Size;
                    }
                    ChunkState::Trailers => {
                        let mut total = 0usize;
                        loop {
                            let line = self.conn.read_line(MAX_TRAILERS)?;
                            if line.is_empty() {
                                break;
                            }
                            total += line.len() + 2;
                            if total > MAX_TRAILERS {
                                return Err(invalid_data("chunked body: trailers too large"));
                            }
                        }
                        *state = ChunkState::Done;
                    }
                },
            }
        }
    }

    /// Discard what remains of the body if it is small; whether the connection can carry
    /// another request.
    fn drain(&mut self) -> bool {
        if self.failed {
            return false;
        }
        if self.continue_pending {
            // The client may or may not send the body it announced: the stream position is
            // unknowable, so the connection cannot be reused.
            return self.is_done();
        }
        if matches!(self.kind, BodyKind::Length { left, .. } if left > DRAIN_LIMIT) {
            return false;
        }
        self.conn
            .conn
            .sock()
            .set_deadline(Instant::now() + HEADER_TIMEOUT);
        let mut budget = DRAIN_LIMIT as usize;
        let mut scratch = [0u8; 8192];
        while !self.is_done() {
            if budget == 0 {
                return false;
            }
            let take = budget.min(scratch.len());
            match self.read(&mut scratch[..take]) {
                Ok(0) => break,
                Ok(n) => budget = budget.saturating_sub(n),
                Err(_) => return false,
            }
        }
        self.is_done()
    }
}

impl Read for Body<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() || self.is_done() {
            return Ok(0);
        }
        if self.failed {
            return Err(io::Error::other("the request body already failed"));
        }
        if self.continue_pending {
            self.continue_pending = false;
            let sent = self
                .conn
                .conn
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .and_then(|()| self.conn.conn.flush());
            if let Err(e) = sent {
                self.failed = true;
                return Err(e);
            }
        }
        let result = self.read_inner(out);
        if result.is_err() {
            self.failed = true;
        }
        result
    }
}

/// The size of a chunk from its size line (`1a2b;ext=1`).
fn parse_chunk_size(line: &[u8]) -> io::Result<u64> {
    let end = line.iter().position(|&b| b == b';').unwrap_or(line.len());
    let mut digits = &line[..end];
    while let Some((&last, rest)) = digits.split_last() {
        if last == b' ' || last == b'\t' {
            digits = rest;
        } else {
            break;
        }
    }
    if digits.is_empty() || digits.len() > 16 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(invalid_data("chunked body: bad chunk size"));
    }
    digits
        .iter()
        .try_fold(0u64, |acc, &d| {
            let v = (d as char).to_digit(16)?;
            acc.checked_mul(16)?.checked_add(u64::from(v))
        })
        .ok_or_else(|| invalid_data("chunked body: bad chunk size"))
}

/// A parsed request head.
struct Head {
    method: String,
    target: String,
    minor_version: u8,
    headers: Vec<(String, String)>,
}

impl Head {
    fn values<'h>(&'h self, name: &'h str) -> impl Iterator<Item = &'h str> + 'h {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.values(name)
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// Whether the client wants the connection kept after this exchange.
    fn keep_alive(&self) -> bool {
        if self.minor_version >= 1 {
            !self.has_token("Connection", "close")
        } else {
            self.has_token("Connection", "keep-alive")
        }
    }

    /// How the body is framed, or the status to reject the request with.
    fn body_kind(&self) -> std::result::Result<BodyKind, u16> {
        let encodings: Vec<String> = self
            .values("Transfer-Encoding")
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect();
        let lengths: Vec<&str> = self
            .values("Content-Length")
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        if !encodings.is_empty() {
            if encodings != ["chunked"] {
                return Err(501);
            }
            if !lengths.is_empty() {
                return Err(400); // ambiguous framing: a request-smuggling vector
            }
            return Ok(BodyKind::Chunked(ChunkState::Size));
        }
        let mut length = None;
        for text in lengths {
            if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                return Err(400);
            }
            let value: u64 = text.parse().map_err(|_| 400u16)?;
            if length.is_some_and(|l| l != value) {
                return Err(400);
            }
            length = Some(value);
        }
        let total = length.unwrap_or(0);
        Ok(BodyKind::Length { total, left: total })
    }
}

/// Why no request head could be read.
enum HeadError {
    /// The connection ended (or timed out) between requests or mid-head: just close.
    Closed,
    /// Answer with this status, then close.
    Reject(u16),
}

fn read_head(bc: &mut BufConn) -> std::result::Result<Head, HeadError> {
    bc.conn.sock().set_deadline(Instant::now() + HEADER_TIMEOUT);
    loop {
        if bc.start < bc.end {
            let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut fields);
            match req.parse(&bc.buf[bc.start..bc.end]) {
                Ok(httparse::Status::Complete(len)) => {
                    let head = Head {
                        method: req.method.unwrap_or("").to_string(),
                        target: req.path.unwrap_or("").to_string(),
                        minor_version: req.version.unwrap_or(1),
                        headers: req
                            .headers
                            .iter()
                            .map(|h| {
                                (
                                    h.name.to_string(),
                                    String::from_utf8_lossy(h.value).into_owned(),
                                )
                            })
                            .collect(),
                    };
                    bc.start += len;
                    return Ok(head);
                }
                Ok(httparse::Status::Partial) => {}
                Err(httparse::Error::TooManyHeaders) => return Err(HeadError::Reject(431)),
                Err(_) => return Err(HeadError::Reject(400)),
            }
            if bc.end - bc.start >= MAX_HEAD_BYTES {
                return Err(HeadError::Reject(431));
            }
        }
        match bc.fill_more() {
            Ok(0) if bc.end - bc.start >= MAX_HEAD_BYTES => return Err(HeadError::Reject(431)),
            Ok(0) | Err(_) => return Err(HeadError::Closed),
            Ok(_) => {}
        }
    }
}

/// Split a request target into path and query (absolute-form targets lose scheme and host).
fn split_target(target: &str) -> (String, String) {
    let mut t = target;
    for scheme in ["http://", "https://"] {
        if t.get(..scheme.len())
            .is_some_and(|s| s.eq_ignore_ascii_case(scheme))
        {
            let after = t.get(scheme.len()..).unwrap_or("");
            t = after.find('/').map_or("/", |i| &after[i..]);
            break;
        }
    }
    let t = t.split('#').next().unwrap_or("");
    match t.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (t.to_string(), String::new()),
    }
}

fn header_ok(s: &str) -> bool {
    !s.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f)
}

/// Write `resp`; `keep` says whether the connection stays open (else `Connection: close`).
/// Returns whether the handler asked to close.
fn write_response(
    conn: &mut Conn,
    resp: &Response,
    head_only: bool,
    keep: bool,
) -> io::Result<bool> {
    let status = if (200..=999).contains(&resp.status) {
        resp.status
    } else {
        500
    };
    let mut out = Vec::with_capacity(256 + resp.body.len());
    out.extend_from_slice(format!("HTTP/1.1 {status} {}\r\n", reason_phrase(status)).as_bytes());
    let mut handler_close = false;
    for (name, value) in &resp.headers {
        if name.is_empty() || !header_ok(name) || !header_ok(value) || name.contains(':') {
            continue;
        }
        if name.eq_ignore_ascii_case("Connection") {
            handler_close |= value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("close"));
            continue;
        }
        if name.eq_ignore_ascii_case("Content-Length")
            || name.eq_ignore_ascii_case("Transfer-Encoding")
        {
            continue;
        }
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    let bodyless = status == 204 || status == 304;
    let body_len = match &resp.file {
        Some(f) => f.len,
        None => resp.body.len() as u64,
    };
    if !bodyless {
        out.extend_from_slice(format!("Content-Length: {body_len}\r\n").as_bytes());
    }
    if !keep || handler_close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head_only && !bodyless {
        out.extend_from_slice(&resp.body);
    }
    conn.write_all(&out)?;
    if let (Some(f), false, false) = (&resp.file, head_only, bodyless) {
        send_file(conn, f)?;
    }
    conn.flush()?;
    Ok(handler_close)
}

/// Copy `f`'s range to the connection in 256 KiB pieces.
fn send_file(conn: &mut Conn, f: &FileRange) -> io::Result<()> {
    use std::io::{Seek, SeekFrom};
    let mut file = std::fs::File::open(&f.path)?;
    file.seek(SeekFrom::Start(f.offset))?;
    let mut buf = vec![0u8; 256 << 10];
    let mut left = f.len;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = file.read(&mut buf[..want])?;
        if n == 0 {
            // The peer sees a body cut short of Content-Length when the connection closes.
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} ended before its announced length", f.path.display()),
            ));
        }
        conn.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// What is known about the TLS peer after the handshake.
#[derive(Default, Clone)]
struct PeerInfo {
    common_name: Option<String>,
    verified: bool,
}

fn handshake(sock: Sock, config: Arc<ServerConfig>) -> io::Result<(Conn, PeerInfo)> {
    let mut tls = ServerConnection::new(config).map_err(io::Error::other)?;
    let mut sock = sock;
    sock.set_deadline(Instant::now() + HEADER_TIMEOUT);
    while tls.is_handshaking() {
        let (read, written) = tls.complete_io(&mut sock)?;
        if read == 0 && written == 0 && tls.is_handshaking() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    let mut peer = PeerInfo::default();
    if let Some(leaf) = tls.peer_certificates().and_then(|chain| chain.first()) {
        peer.verified = true;
        peer.common_name = subject_common_name(leaf);
    }
    Ok((Conn::Tls(Box::new(StreamOwned::new(tls, sock))), peer))
}

struct Shared {
    handler: Handler,
    tls: Option<Arc<ServerConfig>>,
    stopping: AtomicBool,
    active: AtomicUsize,
    /// Requests between their head being read and their response being written.
    busy: AtomicUsize,
}

/// Counts a request in progress until its response is written.
struct BusyGuard<'a>(&'a AtomicUsize);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts a live connection for its lifetime.
struct ActiveGuard(Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

fn serve_connection(tcp: TcpStream, peer_addr: SocketAddr, shared: &Shared) {
    let _ = tcp.set_nodelay(true);
    let _ = tcp.set_write_timeout(Some(BODY_IDLE_TIMEOUT));
    let sock = Sock {
        tcp,
        deadline: None,
    };
    let (conn, peer) = match &shared.tls {
        None => (Conn::Plain(sock), PeerInfo::default()),
        Some(config) => match handshake(sock, config.clone()) {
            Ok(pair) => pair,
            Err(_) => return,
        },
    };
    let mut bc = BufConn::new(conn);
    loop {
        let head = match read_head(&mut bc) {
            Ok(head) => head,
            Err(HeadError::Closed) => break,
            Err(HeadError::Reject(status)) => {
                let resp = Response::text(status, reason_phrase(status));
                let _ = write_response(&mut bc.conn, &resp, false, false);
                break;
            }
        };
        shared.busy.fetch_add(1, Ordering::AcqRel);
        let _busy = BusyGuard(&shared.busy);
        let head_only = head.method.eq_ignore_ascii_case("HEAD");
        let kind = match head.body_kind() {
            Ok(kind) => kind,
            Err(status) => {
                let resp = Response::text(status, reason_phrase(status));
                let _ = write_response(&mut bc.conn, &resp, head_only, false);
                break;
            }
        };
        let mut continue_pending = false;
        if let Some(expect) = head.values("Expect").next() {
            if expect.trim().eq_ignore_ascii_case("100-continue") {
                continue_pending = head.minor_version >= 1;
            } else {
                let resp = Response::text(417, reason_phrase(417));
                let _ = write_response(&mut bc.conn, &resp, head_only, false);
                break;
            }
        }
        let client_keep = head.keep_alive();
        if bc.conn.sock().set_idle(BODY_IDLE_TIMEOUT).is_err() {
            break;
        }
        let (path, query) = split_target(&head.target);
        let mut req = Request {
            method: head.method,
            path,
            query,
            headers: head.headers,
            peer_common_name: peer.common_name.clone(),
            peer_verified: peer.verified,
            peer_addr,
            body: Body {
                conn: &mut bc,
                kind,
                continue_pending,
                failed: false,
            },
        };
        let handler = &shared.handler;
        let resp = catch_unwind(AssertUnwindSafe(|| handler(&mut req)))
            .unwrap_or_else(|_| Response::text(500, "internal server error"));
        let clean = req.body.drain();
        drop(req);
        let keep = client_keep && clean && !shared.stopping.load(Ordering::Acquire);
        match write_response(&mut bc.conn, &resp, head_only, keep) {
            Ok(false) if keep => {}
            _ => break,
        }
    }
    bc.conn.close();
}

// ---------------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------------

/// A bound, not yet serving, listener.
pub struct Server {
    listener: TcpListener,
    addr: SocketAddr,
    tls: Option<Arc<ServerConfig>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.addr)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Server {
    /// Listen on `addr` (`"0.0.0.0:8443"`, `"[::]:8443"`, `"127.0.0.1:0"`, ...), speaking TLS
    /// with `tls` when given.
    pub fn bind(addr: &str, tls: Option<Arc<ServerConfig>>) -> Result<Server> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| Error::io(format!("cannot listen on {addr}"), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io(format!("cannot read the address bound for {addr}"), e))?;
        Ok(Server {
            listener,
            addr,
            tls,
        })
    }

    /// The address actually bound (with the real port when `:0` was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Accept in a background thread; one thread per connection; HTTP/1.1 keep-alive.
    ///
    /// # Panics
    /// If the operating system refuses to start the accept thread; see [`Server::try_spawn`].
    pub fn spawn(self, handler: Handler) -> ServerHandle {
        self.try_spawn(handler)
            .expect("cannot start the HTTP accept thread")
    }

    /// [`Server::spawn`], reporting a failure to start the accept thread.
    pub fn try_spawn(self, handler: Handler) -> Result<ServerHandle> {
        let shared = Arc::new(Shared {
            handler,
            tls: self.tls,
            stopping: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
        });
        let listener = self.listener;
        let accept_shared = shared.clone();
        let thread = thread::Builder::new()
            .name(format!("http-accept-{}", self.addr.port()))
            .spawn(move || accept_loop(listener, accept_shared))
            .map_err(|e| Error::io("cannot start the HTTP accept thread", e))?;
        Ok(ServerHandle {
            addr: self.addr,
            shared,
            thread: Some(thread),
        })
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::Acquire) {
            break;
        }
        let (tcp, peer) = match accepted {
            Ok(pair) => {
                backoff = Duration::from_millis(5);
                pair
            }
            Err(_) => {
                // Out of descriptors or a connection reset before accept: wait a little.
                thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        if shared.active.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            shared.active.fetch_sub(1, Ordering::AcqRel);
            continue; // dropping `tcp` closes it
        }
        let guard = ActiveGuard(shared.clone());
        let spawned = thread::Builder::new()
            .name("http-conn".to_string())
            .spawn(move || {
                let guard = guard;
                serve_connection(tcp, peer, &guard.0);
            });
        // On failure the closure, its guard and the stream are dropped: connection closed.
        drop(spawned);
    }
}

/// A running server. Dropping it shuts the server down, like [`ServerHandle::shutdown`].
#[must_use = "dropping the handle shuts the server down"]
pub struct ServerHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("addr", &self.addr)
            .field("running", &self.thread.is_some())
            .finish()
    }
}

impl ServerHandle {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting, close the listener and join the accept thread, then wait (up to 30 s)
    /// until every request in progress has its response written, as Go's `Shutdown` does:
    /// a process may exit right after this without cutting a response off. Idle keep-alive
    /// connections are not waited for.
    pub fn shutdown(mut self) {
        self.stop();
        let until = Instant::now() + Duration::from_secs(30);
        while self.shared.busy.load(Ordering::Acquire) > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.shared.stopping.store(true, Ordering::Release);
        // Wake the blocking accept() with a connection of our own.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        if TcpStream::connect_timeout(&wake, Duration::from_secs(2)).is_ok() {
            let _ = thread.join();
        }
        // Otherwise the thread cannot be woken; it exits at its next accept.
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------------
// Progress metric
// ---------------------------------------------------------------------------------------------

/// An import's progress in percent, 0..=100, never going backwards. Clones share the value.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    bits: Arc<AtomicU64>, // f64 bits; 0 is 0.0
}

impl Progress {
    /// Progress at 0 %.
    pub fn new() -> Progress {
        Progress::default()
    }

    /// Raise the progress to `percent`, clamped to 0..=100; lower values and NaN are ignored.
    pub fn set(&self, percent: f64) {
        if percent.is_nan() {
            return;
        }
        let new = percent.clamp(0.0, 100.0) + 0.0; // `+ 0.0` turns -0 into 0
        let _ = self
            .bits
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
                (new > f64::from_bits(old)).then_some(new.to_bits())
            });
    }

    /// The current progress in percent.
    pub fn get(&self) -> f64 {
        f64::from_bits(self.bits.load(Ordering::Acquire))
    }
}

/// A metric value as Prometheus clients print it (`0`, `45.5`, `100`), never in exponent
/// notation (CDI's scraper matches `\d{1,3}\.?\d*`).
fn format_metric_value(v: f64) -> String {
    // Rust's `Display` for f64 is the shortest round-trip form without an exponent.
    format!("{}", v + 0.0)
}

/// Escape a Prometheus label value.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// The metric exposition CDI's importer serves.
fn metric_text(name: &str, owner_uid: &str, value: f64) -> String {
    format!(
        "# HELP {name} The import progress in percentage\n# TYPE {name} counter\n\
         {name}{{ownerUID=\"{}\"}} {}\n",
        escape_label(owner_uid),
        format_metric_value(value)
    )
}

/// Serve the progress counter as CDI does: HTTPS with a fresh `self_signed("cloner_target")`
/// certificate, every path answering `# HELP`/`# TYPE` lines and exactly one sample
/// `<name>{ownerUID="<uid>"} <percent>`.
pub fn start_metrics(
    addr: &str,
    metric_name: &str,
    owner_uid: &str,
    progress: Progress,
) -> Result<ServerHandle> {
    let (cert_pem, key_pem) = self_signed("cloner_target")?;
    let config = tls_config(&TlsSettings {
        cert_pem,
        key_pem,
        ..TlsSettings::default()
    })?;
    let server = Server::bind(addr, Some(config))?;
    let name = metric_name.to_string();
    let uid = owner_uid.to_string();
    let handler: Handler = Arc::new(move |_req: &mut Request<'_>| Response {
        status: 200,
        headers: vec![(
            "Content-Type".to_string(),
            "text/plain; version=0.0.4; charset=utf-8".to_string(),
        )],
        body: metric_text(&name, &uid, progress.get()).into_bytes(),
        file: None,
    });
    server.try_spawn(handler)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{ServerName, UnixTime};
    use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};
    use std::io::{BufRead, BufReader};
    use std::sync::Mutex;
    use std::sync::mpsc;

    const CLIENT_CN: &str = "client.upload-server.cdi.kubevirt.io";

    /// A parsed response: (status, headers, body).
    type Reply = (u16, Vec<(String, String)>, Vec<u8>);

    fn ring() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// Read one response: (status, headers, body).
    fn read_response(r: &mut impl BufRead) -> Reply {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let status: u16 = line
            .split(' ')
            .nth(1)
            .unwrap_or_else(|| panic!("bad status line {line:?}"))
            .parse()
            .unwrap();
        let mut headers = Vec::new();
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (n, v) = l.split_once(':').unwrap();
            headers.push((n.to_string(), v.trim().to_string()));
        }
        let len: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map_or(0, |(_, v)| v.parse().unwrap());
        let mut body = vec![0; len];
        r.read_exact(&mut body).unwrap();
        (status, headers, body)
    }

    fn exchange<S: Read + Write>(r: &mut BufReader<S>, request: &[u8]) -> Reply {
        r.get_mut().write_all(request).unwrap();
        r.get_mut().flush().unwrap();
        read_response(r)
    }

    fn plain(addr: SocketAddr) -> BufReader<TcpStream> {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        BufReader::new(s)
    }

    fn echo_server() -> ServerHandle {
        let handler: Handler = Arc::new(|req: &mut Request<'_>| {
            if req.path == "/panic" {
                panic!("handler panic (expected by the test)");
            }
            let mut body = Vec::new();
            if let Err(e) = req.body().read_to_end(&mut body) {
                return Response::text(400, format!("body: {e}"));
            }
            Response::text(
                200,
                format!(
                    "{} {} q={} len={:?} body={}",
                    req.method,
                    req.path,
                    req.query,
                    req.content_length(),
                    String::from_utf8_lossy(&body)
                ),
            )
        });
        Server::bind("127.0.0.1:0", None).unwrap().spawn(handler)
    }

    #[test]
    fn keep_alive_two_requests_on_one_connection() {
        let server = echo_server();
        let mut c = plain(server.local_addr());
        let (s, h, b) = exchange(&mut c, b"GET /a?x=1 HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!(s, 200);
        assert_eq!(b, b"GET /a q=x=1 len=Some(0) body=");
        assert!(!h.iter().any(|(n, _)| n == "Connection"));
        let (s, _, b) = exchange(
            &mut c,
            b"POST /b HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
        );
        assert_eq!(s, 200);
        assert_eq!(b, b"POST /b q= len=Some(5) body=hello");
        // Connection: close is honoured.
        let (_, h, _) = exchange(&mut c, b"GET /c HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(h.contains(&("Connection".into(), "close".into())));
        let mut rest = Vec::new();
        assert_eq!(c.read_to_end(&mut rest).unwrap(), 0);
        server.shutdown();
    }

    #[test]
    fn chunked_body_is_decoded_while_streaming() {
        let server = echo_server();
        let mut c = plain(server.local_addr());
        let s = c.get_mut();
        s.write_all(b"PUT /up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n")
            .unwrap();
        s.flush().unwrap();
        thread::sleep(Duration::from_millis(50));
        s.write_all(b"1\r\n \r\n9\r\n, chunked\r\n0\r\nX-Trailer: 1\r\n\r\n")
            .unwrap();
        let (st, _, b) = read_response(&mut c);
        assert_eq!(st, 200);
        assert_eq!(b, b"PUT /up q= len=None body=hello , chunked");
        // Still keep-alive after a chunked request; a malformed chunk size is rejected.
        let (st, _, b) = exchange(&mut c, b"GET /next HTTP/1.1\r\n\r\n");
        assert_eq!((st, &b[..8]), (200, &b"GET /nex"[..]));
        let bad = b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhi\r\n0\r\n\r\n";
        let (st, h, b) = exchange(&mut c, bad);
        assert_eq!(st, 400, "{}", String::from_utf8_lossy(&b));
        assert!(h.contains(&("Connection".into(), "close".into())));
        server.shutdown();
    }

    #[test]
    fn big_body_streams_through_handler() {
        const SIZE: u64 = 64 << 20;
        let (first_tx, first_rx) = mpsc::channel::<()>();
        let first_tx = Mutex::new(Some(first_tx));
        let handler: Handler = Arc::new(move |req: &mut Request<'_>| {
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            let mut sum = 0u64;
            loop {
                let n = req.body().read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                if let Some(tx) = first_tx.lock().unwrap().take() {
                    tx.send(()).unwrap();
                }
                sum = buf[..n]
                    .iter()
                    .fold(sum, |s, &b| s.wrapping_add(u64::from(b)));
                total += n as u64;
            }
            Response::text(200, format!("{total} {sum}"))
        });
        let server = Server::bind("127.0.0.1:0", None).unwrap().spawn(handler);
        let mut c = plain(server.local_addr());
        let head = format!("PUT /disk HTTP/1.1\r\nContent-Length: {SIZE}\r\n\r\n");
        c.get_mut().write_all(head.as_bytes()).unwrap();
        let block: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        let block_sum = block.iter().map(|&b| u64::from(b)).sum::<u64>();
        c.get_mut().write_all(&block).unwrap();
        // The handler sees data while 63 MiB are still unsent: nothing buffers the body.
        first_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("handler did not start reading before the body was complete");
        for _ in 1..(SIZE >> 20) {
            c.get_mut().write_all(&block).unwrap();
        }
        let (st, _, b) = read_response(&mut c);
        assert_eq!(st, 200);
        assert_eq!(
            String::from_utf8(b).unwrap(),
            format!("{SIZE} {}", block_sum * (SIZE >> 20))
        );
        server.shutdown();
    }

    #[test]
    fn unread_large_body_closes_connection_small_one_is_drained() {
        let handler: Handler = Arc::new(|_req: &mut Request<'_>| Response::empty(401));
        let server = Server::bind("127.0.0.1:0", None).unwrap().spawn(handler);
        let mut c = plain(server.local_addr());
        let (st, h, _) = exchange(&mut c, b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc");
        assert_eq!(st, 401);
        assert!(!h.iter().any(|(n, _)| n == "Connection"));
        let (st, h, _) = exchange(
            &mut c,
            b"POST / HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n",
        );
        assert_eq!(st, 401);
        assert!(h.contains(&("Connection".into(), "close".into())));
        server.shutdown();
    }

    #[test]
    fn expect_continue_gets_100_on_first_body_read() {
        let server = echo_server();
        let mut c = plain(server.local_addr());
        c.get_mut()
            .write_all(b"PUT / HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
            .unwrap();
        let mut line = String::new();
        c.read_line(&mut line).unwrap();
        assert_eq!(line, "HTTP/1.1 100 Continue\r\n");
        c.read_line(&mut line).unwrap();
        let (st, _, b) = exchange(&mut c, b"ok");
        assert_eq!((st, b), (200, b"PUT / q= len=Some(2) body=ok".to_vec()));
        server.shutdown();
    }

    #[test]
    fn oversize_head_and_too_many_headers_are_rejected() {
        let server = echo_server();
        let mut c = plain(server.local_addr());
        let mut req = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        req.resize(req.len() + 70 * 1024, b'a');
        req.extend_from_slice(b"\r\n\r\n");
        let (st, h, _) = exchange(&mut c, &req);
        assert_eq!(st, 431);
        assert!(h.contains(&("Connection".into(), "close".into())));

        let mut c = plain(server.local_addr());
        let mut req = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..150 {
            req.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        req.extend_from_slice(b"\r\n");
        assert_eq!(exchange(&mut c, &req).0, 431);

        let mut c = plain(server.local_addr());
        assert_eq!(exchange(&mut c, b"GARBAGE\0\r\n\r\n").0, 400);
        let mut c = plain(server.local_addr());
        let smuggle = b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(exchange(&mut c, smuggle).0, 400);
        server.shutdown();
    }

    #[test]
    fn handler_panic_is_500_and_server_keeps_serving() {
        let server = echo_server();
        let mut c = plain(server.local_addr());
        assert_eq!(exchange(&mut c, b"GET /panic HTTP/1.1\r\n\r\n").0, 500);
        assert_eq!(exchange(&mut c, b"GET /same HTTP/1.1\r\n\r\n").0, 200);
        let mut c = plain(server.local_addr());
        assert_eq!(exchange(&mut c, b"GET /new HTTP/1.1\r\n\r\n").0, 200);
        server.shutdown();
    }

    #[test]
    fn shutdown_returns_and_stops_accepting() {
        let server = echo_server();
        let addr = server.local_addr();
        let start = Instant::now();
        server.shutdown();
        assert!(start.elapsed() < Duration::from_secs(5));
        match TcpStream::connect(addr) {
            Err(_) => {}
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n");
                let mut buf = [0u8; 16];
                assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)));
            }
        }
    }

    // ----- TLS -----

    fn roots(pem: &[u8]) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(pem) {
            roots.add(c.unwrap()).unwrap();
        }
        roots
    }

    fn client_config(server_cert_pem: &[u8], client: Option<(&str, &str)>) -> Arc<ClientConfig> {
        let b = ClientConfig::builder_with_provider(ring())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots(server_cert_pem));
        Arc::new(match client {
            None => b.with_no_client_auth(),
            Some((cert, key)) => b
                .with_client_auth_cert(
                    CertificateDer::pem_slice_iter(cert.as_bytes())
                        .map(|c| c.unwrap())
                        .collect(),
                    PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
                )
                .unwrap(),
        })
    }

    fn tls_connect(
        addr: SocketAddr,
        config: Arc<ClientConfig>,
    ) -> BufReader<StreamOwned<ClientConnection, TcpStream>> {
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let conn = ClientConnection::new(config, name).unwrap();
        BufReader::new(StreamOwned::new(conn, tcp))
    }

    /// Try one request; `None` when the TLS session fails.
    fn try_tls_get(addr: SocketAddr, config: Arc<ClientConfig>) -> Option<Reply> {
        let mut c = tls_connect(addr, config);
        c.get_mut()
            .write_all(b"GET /who HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .ok()?;
        c.get_mut().flush().ok()?;
        let mut line = String::new();
        c.read_line(&mut line).ok().filter(|&n| n > 0)?;
        let mut rest = BufReader::new(line.as_bytes().chain(c));
        Some(read_response(&mut rest))
    }

    fn who_server(tls: Arc<ServerConfig>) -> ServerHandle {
        let handler: Handler = Arc::new(|req: &mut Request<'_>| {
            Response::text(
                200,
                format!(
                    "verified={} cn={:?}",
                    req.peer_verified, req.peer_common_name
                ),
            )
        });
        Server::bind("127.0.0.1:0", Some(tls))
            .unwrap()
            .spawn(handler)
    }

    /// A CA and a client certificate signed by it: (ca_pem, client_cert_pem, client_key_pem).
    fn ca_and_client(client_cn: &str) -> (String, String, String) {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test client CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca =
            rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "kubevirt");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, client_cn);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &*ca).unwrap();
        (ca.pem(), cert.pem(), key.serialize_pem())
    }

    #[test]
    fn https_with_self_signed_certificate() {
        let (cert, key) = self_signed("localhost").unwrap();
        let tls = tls_config(&TlsSettings {
            cert_pem: cert.clone(),
            key_pem: key,
            ..Default::default()
        })
        .unwrap();
        let server = who_server(tls);
        let mut c = tls_connect(server.local_addr(), client_config(&cert, None));
        let (st, _, b) = exchange(&mut c, b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!((st, b), (200, b"verified=false cn=None".to_vec()));
        let (st, _, _) = exchange(&mut c, b"GET /again HTTP/1.1\r\n\r\n");
        assert_eq!(st, 200);
        server.shutdown();
    }

    #[test]
    fn mutual_tls_verified_foreign_and_anonymous_clients() {
        let (server_cert, server_key) = self_signed("localhost").unwrap();
        let (ca, client_cert, client_key) = ca_and_client(CLIENT_CN);
        let tls = tls_config(&TlsSettings {
            cert_pem: server_cert.clone(),
            key_pem: server_key,
            client_ca_pem: Some(ca.into_bytes()),
            ..Default::default()
        })
        .unwrap();
        let server = who_server(tls);
        let addr = server.local_addr();

        let good = client_config(&server_cert, Some((&client_cert, &client_key)));
        let (st, _, b) = try_tls_get(addr, good).expect("verified client rejected");
        assert_eq!(st, 200);
        assert_eq!(
            String::from_utf8(b).unwrap(),
            format!("verified=true cn=Some({CLIENT_CN:?})")
        );

        let (_, foreign_cert, foreign_key) = ca_and_client(CLIENT_CN);
        let foreign = client_config(&server_cert, Some((&foreign_cert, &foreign_key)));
        if let Some((_, _, b)) = try_tls_get(addr, foreign) {
            assert!(b.starts_with(b"verified=false"), "{b:?}");
        }

        let anonymous = client_config(&server_cert, None);
        let (st, _, b) = try_tls_get(addr, anonymous).expect("anonymous client rejected");
        assert_eq!((st, b), (200, b"verified=false cn=None".to_vec()));
        server.shutdown();
    }

    #[test]
    fn min_version_and_cipher_names() {
        let (cert, key) = self_signed("localhost").unwrap();
        let settings = |min: Option<&str>, ciphers: Option<&str>| TlsSettings {
            cert_pem: cert.clone(),
            key_pem: key.clone(),
            client_ca_pem: None,
            min_version: min.map(str::to_string),
            ciphers: ciphers.map(str::to_string),
        };
        let suites = |cfg: &ServerConfig| -> Vec<CipherSuite> {
            cfg.crypto_provider()
                .cipher_suites
                .iter()
                .map(|s| s.suite())
                .collect()
        };
        let cfg = tls_config(&settings(
            Some("VersionTLS12"),
            Some("TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, TLS_RSA_WITH_RC4_128_SHA,bogus"),
        ))
        .unwrap();
        let s = suites(&cfg);
        assert!(s.contains(&CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384));
        assert!(s.contains(&CipherSuite::TLS13_AES_128_GCM_SHA256));
        assert!(!s.contains(&CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256));
        let all = suites(&tls_config(&settings(None, Some("nothing,known"))).unwrap());
        assert_eq!(
            all.len(),
            rustls::crypto::ring::default_provider().cipher_suites.len()
        );
        assert!(tls_config(&settings(Some("VersionTLS99"), None)).is_err());

        // TLS 1.3 only: a TLS 1.2-only client cannot connect.
        let server = who_server(tls_config(&settings(Some("VersionTLS13"), None)).unwrap());
        let tls12 = ClientConfig::builder_with_provider(ring())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots(&cert))
            .with_no_client_auth();
        assert!(try_tls_get(server.local_addr(), Arc::new(tls12)).is_none());
        assert!(try_tls_get(server.local_addr(), client_config(&cert, None)).is_some());
        server.shutdown();
    }

    // ----- DER walker -----

    #[test]
    fn subject_common_name_parses_and_survives_garbage() {
        let (_, client_cert, _) = ca_and_client(CLIENT_CN);
        let der = CertificateDer::from_pem_slice(client_cert.as_bytes()).unwrap();
        assert_eq!(subject_common_name(&der).as_deref(), Some(CLIENT_CN));
        let (ss, _) = self_signed("cloner_target").unwrap();
        let der2 = CertificateDer::from_pem_slice(&ss).unwrap();
        assert_eq!(subject_common_name(&der2).as_deref(), Some("cloner_target"));
        // Every truncation and many corruptions: no panic.
        for len in 0..der.len() {
            let _ = subject_common_name(&der[..len]);
        }
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let mut bytes = der.to_vec();
            for _ in 0..4 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let i = (seed as usize) % bytes.len();
                bytes[i] = (seed >> 32) as u8;
            }
            let _ = subject_common_name(&bytes);
        }
        assert_eq!(
            subject_common_name(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]),
            None
        );
        assert_eq!(subject_common_name(&[0x30, 0x80, 0, 0]), None);
        assert_eq!(subject_common_name(&[]), None);
        // BMPString and UTF8String values.
        assert_eq!(der_string(0x1e, &[0, b'h', 0, b'i']).as_deref(), Some("hi"));
        assert_eq!(der_string(0x0c, "é".as_bytes()).as_deref(), Some("é"));
        assert_eq!(der_string(0x13, &[0xff]), None);
    }

    // ----- metrics -----

    /// Accepts any server certificate (remembering it), still checking handshake signatures.
    #[derive(Debug)]
    struct AnyServerCert(Arc<CryptoProvider>, Mutex<Option<Vec<u8>>>);

    impl ServerCertVerifier for AnyServerCert {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp: &[u8],
            _now: UnixTime,
        ) -> std::result::Result<ServerCertVerified, rustls::Error> {
            *self.1.lock().unwrap() = Some(end_entity.to_vec());
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
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
            dss: &DigitallySignedStruct,
        ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    #[test]
    fn progress_clamps_and_never_goes_back() {
        let p = Progress::new();
        assert_eq!(p.get(), 0.0);
        p.set(12.5);
        p.clone().set(10.0);
        assert_eq!(p.get(), 12.5);
        p.set(f64::NAN);
        p.set(150.0);
        assert_eq!(p.get(), 100.0);
        assert_eq!(format_metric_value(0.0), "0");
        assert_eq!(format_metric_value(-0.0), "0");
        assert_eq!(format_metric_value(45.5), "45.5");
        assert_eq!(format_metric_value(100.0), "100");
        assert_eq!(format_metric_value(0.00001), "0.00001");
        assert_eq!(format_metric_value(99.99999999), "99.99999999");
    }

    #[test]
    fn metrics_over_https() {
        let p = Progress::new();
        let server = start_metrics(
            "127.0.0.1:0",
            "kubevirt_cdi_import_progress_total",
            "abc",
            p.clone(),
        )
        .unwrap();
        p.set(12.5);
        p.set(10.0);
        p.set(50.0);
        let verifier = Arc::new(AnyServerCert(ring(), Mutex::new(None)));
        let config = ClientConfig::builder_with_provider(ring())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_no_client_auth();
        let mut c = tls_connect(server.local_addr(), Arc::new(config));
        let (st, _, b) = exchange(&mut c, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(st, 200);
        let text = String::from_utf8(b).unwrap();
        assert_eq!(
            text,
            "# HELP kubevirt_cdi_import_progress_total The import progress in percentage\n\
             # TYPE kubevirt_cdi_import_progress_total counter\n\
             kubevirt_cdi_import_progress_total{ownerUID=\"abc\"} 50\n"
        );
        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            samples,
            ["kubevirt_cdi_import_progress_total{ownerUID=\"abc\"} 50"]
        );
        let cert = verifier.1.lock().unwrap().clone().unwrap();
        assert_eq!(subject_common_name(&cert).as_deref(), Some("cloner_target"));
        // Any path answers the same.
        let (st, _, b) = exchange(&mut c, b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(st, 200);
        assert!(String::from_utf8(b).unwrap().contains("} 50\n"));
        server.shutdown();
    }
}
