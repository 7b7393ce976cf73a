//! Google Cloud Storage objects for the importer's `gcs` source: CDI's endpoint forms
//! (`gs://bucket/object`, `https://storage.cloud.google.com/bucket/object`,
//! `https://storage.googleapis.com/bucket/object`), the download URL (path-style
//! `{base}/bucket/object`, which Google serves to anonymous and OAuth callers alike, with
//! `base` from `STORAGE_EMULATOR_HOST` as Google's client libraries do), and OAuth 2.0
//! access tokens for a service-account key file (a JWT signed with RS256, exchanged at the
//! key's `token_uri`). Without a key the download is anonymous.

use crate::error::{Error, ErrorKind, Result};
use crate::net::http::percent_decode;
use crate::net::http::{Client, HeaderSource};
use crate::net::s3::uri_encode;
use base64::Engine as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where objects are read from unless `STORAGE_EMULATOR_HOST` says otherwise.
pub const DEFAULT_BASE: &str = "https://storage.googleapis.com";
/// The OAuth scope asked for: read-only access to objects.
pub const SCOPE: &str = "https://www.googleapis.com/auth/devstorage.read_only";
/// The token endpoint when the key file names none.
pub const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// Largest token response read.
const MAX_TOKEN_RESPONSE: usize = 64 << 10;

fn net_err(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Network, msg)
}

/// An object named by a CDI gcs endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    /// Bucket.
    pub bucket: String,
    /// Object name (decoded).
    pub name: String,
}

impl Object {
    /// Parse `gs://bucket/object` or `https://storage.cloud.google.com/bucket/object` (any
    /// http(s) host: bucket and object come from the path).
    pub fn parse(s: &str) -> Result<Object> {
        let bad = |why: &str| {
            Error::invalid(format!(
                "gcs endpoint '{s}': {why} (expected gs://bucket/object or \
                 https://storage.cloud.google.com/bucket/object)"
            ))
        };
        let (scheme, rest) = s.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let rest = rest.split(['?', '#']).next().unwrap_or("");
        let path = match scheme.to_ascii_lowercase().as_str() {
            "gs" => rest.to_string(),
            "http" | "https" => rest.split_once('/').map_or("", |(_, p)| p).to_string(),
            _ => return Err(bad("unsupported scheme")),
        };
        let path = String::from_utf8(percent_decode(&path)).map_err(|_| bad("not UTF-8"))?;
        let path = path.trim_matches('/');
        match path.split_once('/') {
            Some((b, o)) if !b.is_empty() && !o.is_empty() => Ok(Object {
                bucket: b.to_string(),
                name: o.to_string(),
            }),
            _ => Err(bad("no bucket and object")),
        }
    }

    /// The object's URL under `base` (e.g. [`DEFAULT_BASE`]).
    pub fn url(&self, base: &str) -> String {
        format!(
            "{}/{}/{}",
            base.trim_end_matches('/'),
            uri_encode(self.bucket.as_bytes(), false),
            uri_encode(self.name.as_bytes(), true)
        )
    }
}

/// The storage base URL: `STORAGE_EMULATOR_HOST` (with `http://` added when it has no
/// scheme), else [`DEFAULT_BASE`].
pub fn base_from_env() -> String {
    match std::env::var("STORAGE_EMULATOR_HOST") {
        Ok(h) if !h.trim().is_empty() => {
            let h = h.trim();
            if h.contains("://") {
                h.to_string()
            } else {
                format!("http://{h}")
            }
        }
        _ => DEFAULT_BASE.to_string(),
    }
}

/// A service-account key (`GOOGLE_APPLICATION_CREDENTIALS`).
pub struct ServiceAccount {
    /// `client_email`: the JWT's issuer.
    pub client_email: String,
    /// `token_uri`: where the JWT is exchanged for a token, and its audience.
    pub token_uri: String,
    key: ring::signature::RsaKeyPair,
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is never printed.
        f.debug_struct("ServiceAccount")
            .field("client_email", &self.client_email)
            .field("token_uri", &self.token_uri)
            .finish_non_exhaustive()
    }
}

/// An access token and how long it lives.
#[derive(Clone)]
pub struct Token {
    /// `access_token`.
    pub access_token: String,
    /// `expires_in`.
    pub expires_in: Duration,
}

fn b64url(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

impl ServiceAccount {
    /// Parse a service-account JSON key (`type` `service_account`, `client_email`,
    /// `private_key` as PKCS#8 PEM, `token_uri`).
    pub fn from_json(json: &[u8]) -> Result<ServiceAccount> {
        let v: serde_json::Value = serde_json::from_slice(json)
            .map_err(|e| Error::invalid(format!("credentials file is not JSON: {e}")))?;
        let field = |k: &str| v.get(k).and_then(|x| x.as_str());
        if let Some(t) = field("type")
            && t != "service_account"
        {
            return Err(Error::invalid(format!(
                "credentials of type '{t}' are not supported (a service_account key is)"
            )));
        }
        let need = |k: &str| {
            field(k)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| Error::invalid(format!("credentials file has no '{k}'")))
        };
        let client_email = need("client_email")?.to_string();
        let pem = need("private_key")?;
        use rustls::pki_types::{PrivatePkcs8KeyDer, pem::PemObject};
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| {
            Error::invalid(format!(
                "credentials 'private_key' is not a PKCS#8 PEM key: {e}"
            ))
        })?;
        let key = ring::signature::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
            .map_err(|e| Error::invalid(format!("credentials 'private_key': {e}")))?;
        Ok(ServiceAccount {
            client_email,
            token_uri: field("token_uri")
                .filter(|s| !s.is_empty())
                .unwrap_or(DEFAULT_TOKEN_URI)
                .to_string(),
            key,
        })
    }

    /// The signed JWT asking for [`SCOPE`], issued at `iat` (Unix seconds), valid one hour.
    pub fn assertion(&self, iat: u64) -> Result<String> {
        let header = b64url(br#"{"alg":"RS256","typ":"JWT"}"#);
        let claims = serde_json::json!({
            "iss": self.client_email,
            "scope": SCOPE,
            "aud": self.token_uri,
            "iat": iat,
            "exp": iat + 3600,
        });
        let claims = b64url(claims.to_string().as_bytes());
        let input = format!("{header}.{claims}");
        let mut sig = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(
                &ring::signature::RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                input.as_bytes(),
                &mut sig,
            )
            .map_err(|_| Error::invalid("cannot sign the token request with the key"))?;
        Ok(format!("{input}.{}", b64url(&sig)))
    }

    /// Exchange a fresh assertion for an access token at `token_uri`.
    pub fn token(&self, client: &Client) -> Result<Token> {
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let body = format!(
            "grant_type={}&assertion={}",
            uri_encode(b"urn:ietf:params:oauth:grant-type:jwt-bearer", false),
            uri_encode(self.assertion(iat)?.as_bytes(), false)
        );
        let r = client.send_body(
            "POST",
            &self.token_uri,
            &[
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("Accept", "application/json"),
            ],
            &mut body.as_bytes(),
            Some(body.len() as u64),
        )?;
        let status = r.status;
        let text = r.read_to_vec(MAX_TOKEN_RESPONSE)?;
        if status != 200 {
            let snippet: String = String::from_utf8_lossy(&text)
                .chars()
                .take(200)
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            return Err(net_err(format!(
                "token endpoint {} answered {status}: {}",
                self.token_uri,
                snippet.trim()
            )));
        }
        let v: serde_json::Value = serde_json::from_slice(&text).map_err(|e| {
            net_err(format!(
                "token endpoint {} sent no JSON: {e}",
                self.token_uri
            ))
        })?;
        let access_token = v
            .get("access_token")
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                net_err(format!(
                    "token endpoint {} sent no access_token",
                    self.token_uri
                ))
            })?
            .to_string();
        let expires_in = v.get("expires_in").and_then(|t| t.as_u64()).unwrap_or(3600);
        Ok(Token {
            access_token,
            expires_in: Duration::from_secs(expires_in),
        })
    }
}

/// The headers of each request of an object download: none (anonymous), or
/// `Authorization: Bearer` with a token fetched through `client`, fetched again when it is
/// within a minute of expiring (a resume late in a long download).
pub fn header_source(client: Client, account: Option<ServiceAccount>) -> HeaderSource {
    let mut cached: Option<(Token, Instant)> = None;
    Box::new(move || {
        let Some(sa) = &account else {
            return Ok(Vec::new());
        };
        let fresh = cached
            .as_ref()
            .is_some_and(|(t, at)| at.elapsed() + Duration::from_secs(60) < t.expires_in);
        if !fresh {
            cached = Some((sa.token(&client)?, Instant::now()));
        }
        let (t, _) = cached.as_ref().expect("token fetched");
        Ok(vec![(
            "Authorization".into(),
            format!("Bearer {}", t.access_token),
        )])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        for ep in [
            "gs://bkt/dir/disk.qcow2",
            "https://storage.cloud.google.com/bkt/dir/disk.qcow2",
            "https://storage.googleapis.com/bkt/dir%2Fdisk.qcow2?x=1",
        ] {
            let o = Object::parse(ep).unwrap();
            assert_eq!(
                (o.bucket.as_str(), o.name.as_str()),
                ("bkt", "dir/disk.qcow2"),
                "{ep}"
            );
            assert_eq!(
                o.url(DEFAULT_BASE),
                "https://storage.googleapis.com/bkt/dir/disk.qcow2"
            );
        }
        let o = Object::parse("gs://b/a b+c").unwrap();
        assert_eq!(
            o.url("http://127.0.0.1:9/"),
            "http://127.0.0.1:9/b/a%20b%2Bc"
        );
        for bad in ["gs://bkt", "gs://bkt/", "gs:///obj", "s3://b/o", "nourl"] {
            assert!(Object::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn key_files() {
        assert!(ServiceAccount::from_json(b"{").is_err());
        let e = ServiceAccount::from_json(br#"{"type":"authorized_user"}"#).unwrap_err();
        assert!(e.to_string().contains("not supported"), "{e}");
        let e = ServiceAccount::from_json(
            br#"{"type":"service_account","client_email":"a@b","private_key":"nope"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("PKCS#8"), "{e}");
    }
}
