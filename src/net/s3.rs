//! S3 objects for the importer's `s3` source: CDI's endpoint form (path-style
//! `http(s)://host[:port]/bucket/key`), its region rule, AWS Signature Version 4 for a GET
//! (HMAC-SHA256 over the canonical request, `UNSIGNED-PAYLOAD`), and the URI encoding and
//! timestamps SigV4 needs. The transfer itself is [`crate::net::http`]'s resumable download,
//! which asks [`ObjectRequest::headers`] for a fresh signature on every (re)connection.

use crate::error::{Error, Result};
use crate::net::http::{HeaderSource, Url};
use std::time::{SystemTime, UNIX_EPOCH};

/// The payload hash of a request whose body is not signed.
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";

/// An access key pair (CDI's `IMPORTER_ACCESS_KEY_ID` and `IMPORTER_SECRET_KEY`).
#[derive(Clone)]
pub struct Credentials {
    /// Access key id.
    pub access_key: String,
    /// Secret access key.
    pub secret_key: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret is never printed.
        f.debug_struct("Credentials")
            .field("access_key", &self.access_key)
            .finish_non_exhaustive()
    }
}

/// An object named by a CDI s3 endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Scheme, host and port of the service (`http` means no TLS).
    pub service: Url,
    /// Bucket: the first path element.
    pub bucket: String,
    /// Object key: the rest of the path (decoded).
    pub key: String,
    /// Signing region (see [`region`]).
    pub region: String,
}

/// CDI's region rule for the endpoint's `host[:port]`: the capture of
/// `s3\.(.+)\.amazonaws\.com` when the host matches it, else everything before the first
/// `.` (so `127.0.0.1:9000` gives `127` and `minio:9000` gives `minio:9000`).
pub fn region(host_port: &str) -> String {
    const PREFIX: &str = "s3.";
    const SUFFIX: &str = ".amazonaws.com";
    // The regex is unanchored and `.+` greedy: the first "s3." and the last
    // ".amazonaws.com" after it, with at least one character between.
    if let Some(i) = host_port.find(PREFIX) {
        let rest = &host_port[i + PREFIX.len()..];
        if let Some(j) = rest.rfind(SUFFIX)
            && j > 0
        {
            return rest[..j].to_string();
        }
    }
    host_port.split('.').next().unwrap_or("").to_string()
}

/// AWS URI encoding: the unreserved `A-Za-z0-9-._~` stay, every other byte becomes `%XX`
/// (uppercase), and `/` stays when `keep_slash` (a path).
pub fn uri_encode(s: &[u8], keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s {
        if c.is_ascii_alphanumeric() || b"-._~".contains(&c) || (keep_slash && c == b'/') {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

impl Endpoint {
    /// Parse `http(s)://host[:port]/bucket/key...` (the query is ignored, as CDI does).
    pub fn parse(s: &str) -> Result<Endpoint> {
        let u = Url::parse(s)?;
        let path = u.path.split('?').next().unwrap_or("");
        let path = String::from_utf8(crate::net::http::percent_decode(path))
            .map_err(|_| Error::invalid(format!("s3 endpoint '{s}': the path is not UTF-8")))?;
        let path = path.trim_matches('/');
        let (bucket, key) = path.split_once('/').unwrap_or((path, ""));
        if bucket.is_empty() || key.is_empty() {
            return Err(Error::invalid(format!(
                "s3 endpoint '{s}': expected http(s)://host/bucket/key"
            )));
        }
        // CDI's rule applies to Go's url.Host: host and port exactly as written.
        let authority = s
            .split_once("://")
            .map_or("", |(_, r)| r)
            .split(['/', '?', '#'])
            .next()
            .unwrap_or("");
        let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let mut service = u.clone();
        service.path = "/".into();
        service.userinfo = None;
        Ok(Endpoint {
            region: region(&authority.to_ascii_lowercase()),
            service,
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }

    /// The path-style request path, `/bucket/key` URI-encoded (the canonical URI).
    pub fn path(&self) -> String {
        format!(
            "/{}/{}",
            uri_encode(self.bucket.as_bytes(), false),
            uri_encode(self.key.as_bytes(), true)
        )
    }

    /// The object's URL.
    pub fn url(&self) -> String {
        let mut u = self.service.clone();
        u.path = self.path();
        u.to_string()
    }
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    ring::hmac::sign(&k, data).as_ref().to_vec()
}

/// Lowercase hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `YYYYMMDDTHHMMSSZ` (UTC) for `t`.
pub fn amz_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (y, m, d, hh, mm, ss) = crate::civil::from_secs(secs as i64);
    format!("{y:04}{m:02}{d:02}T{hh:02}{mm:02}{ss:02}Z")
}

/// One request to sign.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// `GET`, ...
    pub method: &'a str,
    /// The URI-encoded path.
    pub canonical_uri: &'a str,
    /// The canonical query string (empty for none).
    pub canonical_query: &'a str,
    /// Headers to sign (`host`, `x-amz-date`, `x-amz-content-sha256` among them).
    pub headers: &'a [(&'a str, &'a str)],
    /// Hex SHA-256 of the body, or [`UNSIGNED_PAYLOAD`].
    pub payload_hash: &'a str,
    /// `YYYYMMDDTHHMMSSZ`, the value of `x-amz-date`.
    pub amz_date: &'a str,
    /// Region of the credential scope.
    pub region: &'a str,
    /// Service of the credential scope (`s3`).
    pub service: &'a str,
}

/// The SigV4 `Authorization` header value for `req`.
pub fn authorization(creds: &Credentials, req: &Request<'_>) -> String {
    let mut hs: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|(k, v)| {
            let v = v.split_whitespace().collect::<Vec<_>>().join(" ");
            (k.to_ascii_lowercase(), v)
        })
        .collect();
    hs.sort();
    let signed: Vec<&str> = hs.iter().map(|(k, _)| k.as_str()).collect();
    let signed = signed.join(";");
    let canonical_headers: String = hs.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let canonical = format!(
        "{}\n{}\n{}\n{canonical_headers}\n{signed}\n{}",
        req.method, req.canonical_uri, req.canonical_query, req.payload_hash
    );
    let date = &req.amz_date[..req.amz_date.len().min(8)];
    let scope = format!("{date}/{}/{}/aws4_request", req.region, req.service);
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{}\n{scope}\n{}",
        req.amz_date,
        sha256_hex(canonical.as_bytes())
    );
    let k = hmac(
        format!("AWS4{}", creds.secret_key).as_bytes(),
        date.as_bytes(),
    );
    let k = hmac(&k, req.region.as_bytes());
    let k = hmac(&k, req.service.as_bytes());
    let k = hmac(&k, b"aws4_request");
    let sig = hex(&hmac(&k, to_sign.as_bytes()));
    format!(
        "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed}, Signature={sig}",
        creds.access_key
    )
}

/// A GET of one object, signed when there are credentials (else anonymous, for a public
/// bucket).
#[derive(Debug, Clone)]
pub struct ObjectRequest {
    /// The object.
    pub endpoint: Endpoint,
    /// The keys, if any.
    pub credentials: Option<Credentials>,
}

impl ObjectRequest {
    /// The object's URL.
    pub fn url(&self) -> String {
        self.endpoint.url()
    }

    /// The headers of a GET made at `now`: `x-amz-date`, `x-amz-content-sha256` and
    /// `Authorization` signing them with `host`. `Range` is not signed (AWS does not require
    /// it), so a resume adds it to a fresh signature.
    pub fn headers(&self, now: SystemTime) -> Vec<(String, String)> {
        let Some(creds) = &self.credentials else {
            return Vec::new();
        };
        let date = amz_date(now);
        let host = self.endpoint.service.host_header();
        let path = self.endpoint.path();
        let signed = [
            ("host", host.as_str()),
            ("x-amz-content-sha256", UNSIGNED_PAYLOAD),
            ("x-amz-date", date.as_str()),
        ];
        let auth = authorization(
            creds,
            &Request {
                method: "GET",
                canonical_uri: &path,
                canonical_query: "",
                headers: &signed,
                payload_hash: UNSIGNED_PAYLOAD,
                amz_date: &date,
                region: &self.endpoint.region,
                service: "s3",
            },
        );
        vec![
            ("x-amz-content-sha256".into(), UNSIGNED_PAYLOAD.into()),
            ("x-amz-date".into(), date),
            ("Authorization".into(), auth),
        ]
    }

    /// Headers signed afresh for each request of a download.
    pub fn header_source(self) -> HeaderSource {
        Box::new(move || Ok(self.headers(SystemTime::now())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn aws_get_object_example() {
        // "Example: GET Object" of AWS's S3 SigV4 header-authentication documentation.
        let creds = Credentials {
            access_key: "AKIAIOSFODNN7EXAMPLE".into(),
            secret_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
        };
        let empty = sha256_hex(b"");
        assert_eq!(
            empty,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let headers = [
            ("Host", "examplebucket.s3.amazonaws.com"),
            ("Range", "bytes=0-9"),
            ("x-amz-content-sha256", empty.as_str()),
            ("x-amz-date", "20130524T000000Z"),
        ];
        let auth = authorization(
            &creds,
            &Request {
                method: "GET",
                canonical_uri: "/test.txt",
                canonical_query: "",
                headers: &headers,
                payload_hash: &empty,
                amz_date: "20130524T000000Z",
                region: "us-east-1",
                service: "s3",
            },
        );
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    #[test]
    fn dates() {
        assert_eq!(amz_date(UNIX_EPOCH), "19700101T000000Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_369_353_600);
        assert_eq!(amz_date(t), "20130524T000000Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_825_599); // leap day
        assert_eq!(amz_date(t), "20000229T115959Z");
        let t = UNIX_EPOCH + Duration::from_secs(4_102_444_799);
        assert_eq!(amz_date(t), "20991231T235959Z");
    }

    #[test]
    fn regions() {
        assert_eq!(region("s3.us-west-2.amazonaws.com"), "us-west-2");
        assert_eq!(
            region("bucket.s3.eu-central-1.amazonaws.com"),
            "eu-central-1"
        );
        assert_eq!(region("s3.amazonaws.com"), "s3");
        assert_eq!(region("minio.example.com:9000"), "minio");
        assert_eq!(region("127.0.0.1:9000"), "127");
        assert_eq!(region("minio:9000"), "minio:9000");
    }

    #[test]
    fn encoding() {
        assert_eq!(uri_encode(b"a b/c~d+e", true), "a%20b/c~d%2Be");
        assert_eq!(uri_encode(b"a/b", false), "a%2Fb");
        assert_eq!(uri_encode("é".as_bytes(), true), "%C3%A9");
        assert_eq!(
            crate::net::http::percent_decode("a%20b%2fc%zz%4"),
            b"a b/c%zz%4"
        );
    }

    #[test]
    fn endpoints() {
        let e =
            Endpoint::parse("https://s3.us-west-2.amazonaws.com/bkt/dir/my%20disk.qcow2").unwrap();
        assert_eq!(
            (e.bucket.as_str(), e.key.as_str(), e.region.as_str()),
            ("bkt", "dir/my disk.qcow2", "us-west-2")
        );
        assert_eq!(
            e.url(),
            "https://s3.us-west-2.amazonaws.com/bkt/dir/my%20disk.qcow2"
        );
        let e = Endpoint::parse("http://127.0.0.1:9000//b/k?x=1").unwrap();
        assert_eq!(
            (e.bucket.as_str(), e.key.as_str(), e.region.as_str()),
            ("b", "k", "127")
        );
        assert_eq!(e.url(), "http://127.0.0.1:9000/b/k");
        assert_eq!(e.service.scheme, "http");
        for bad in [
            "http://h/",
            "http://h/bucket",
            "http://h/bucket/",
            "s3://b/k",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn signed_headers_and_anonymous() {
        let mut r = ObjectRequest {
            endpoint: Endpoint::parse("http://127.0.0.1:9000/b/k").unwrap(),
            credentials: None,
        };
        assert!(r.headers(SystemTime::now()).is_empty());
        r.credentials = Some(Credentials {
            access_key: "AK".into(),
            secret_key: "SK".into(),
        });
        let t = UNIX_EPOCH + Duration::from_secs(1_369_353_600);
        let h = r.headers(t);
        assert_eq!(h[1], ("x-amz-date".into(), "20130524T000000Z".into()));
        assert!(h[2].1.starts_with(
            "AWS4-HMAC-SHA256 Credential=AK/20130524/127/s3/aws4_request, \
             SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature="
        ));
        assert!(format!("{:?}", r.credentials).find("SK").is_none());
    }
}
