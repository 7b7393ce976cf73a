//! Pulling the VM disk out of a KubeVirt containerDisk, as CDI's `registry` import source does,
//! without storing layers and with bounded memory.
//!
//! Owns: image references (`docker://REF`, `oci-archive:PATH[:REF]`), the distribution API
//! client (ping with the insecure plain-HTTP fallback, Bearer token and Basic auth, manifest
//! and blob fetches that resume after dropped connections), manifest and index parsing with
//! platform selection, the image config checks (architecture, bootc refusal) and CDI's labels
//! from `Env`, reading an OCI layout tar by offsets, the layer decoders picked by magic bytes,
//! and CDI's rule for the first `disk*` regular file of a layer (the tar itself is read by
//! [`crate::archive::tar`], the bounded reader every untrusted tar goes through).
//!
//! Every blob is checked against its descriptor: small ones (manifests, config) before use,
//! layers while they stream. The [`DiskStream`] drains the rest of the disk's layer when the
//! disk entry ends and fails instead of reporting end of file when the digest is wrong.
//! Decompressing the disk file itself (gz/xz/zstd inside the layer) and qcow2 conversion are
//! left to [`crate::ingest`].

use crate::archive::tar::{Entry, EntryKind, TarReader};
use crate::error::{Error, ErrorKind, Result};
use crate::net::digest::{Algorithm as Alg, Hasher};
use crate::net::http::{Client, ClientConfig, Proxy, Response, Url};
use base64::Engine as _;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Largest manifest or index accepted (c/image's limit).
const MAX_MANIFEST: usize = 4 << 20;
/// Largest image config accepted.
const MAX_CONFIG: usize = 4 << 20;
/// Largest token response accepted.
const MAX_TOKEN: usize = 1 << 20;
/// Bytes of an error body read for its message.
const MAX_ERROR_BODY: usize = 64 << 10;
/// Most entries in an index.
const MAX_INDEX_ENTRIES: usize = 1024;
/// Deepest nesting of indexes.
const MAX_INDEX_DEPTH: usize = 2;
/// Most layers in an image.
const MAX_LAYERS: usize = 256;
/// Largest layer blob accepted (4 TiB).
const MAX_BLOB: u64 = 1 << 42;
/// Most entries in an `oci-archive:` tar.
const MAX_ARCHIVE_ENTRIES: usize = 100_000;
/// Largest zstd window accepted (2^27 = 128 MiB, zstd's default limit).
const ZSTD_WINDOW_LOG_MAX: u32 = 27;
/// Memory the xz decoder of a layer may use.
const XZ_MEMLIMIT: u64 = 256 << 20;
/// Times a request answered 429 is retried.
const MAX_THROTTLE_RETRIES: u32 = 3;
/// Longest `Retry-After` honoured.
const MAX_RETRY_AFTER: u64 = 30;

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";
/// The `Accept` header of manifest requests: every v2/OCI manifest type, never schema 1.
const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// CDI's message when no layer holds a disk.
pub const NO_DISK_MESSAGE: &str = "Failed to find VM disk image file in the container image";

fn is_index_type(t: &str) -> bool {
    t == OCI_INDEX || t == DOCKER_LIST
}

fn is_image_type(t: &str) -> bool {
    t == OCI_MANIFEST || t == DOCKER_MANIFEST
}

fn is_schema1_type(t: &str) -> bool {
    t == DOCKER_SCHEMA1 || t == DOCKER_SCHEMA1_SIGNED
}

// ------------------------------------------------------------------------------------------
// Digests

/// A validated content digest (`sha256:` or `sha512:` with lower-case hex).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Digest {
    alg: Alg,
    hex: String,
}

impl Digest {
    fn parse(s: &str) -> Result<Digest> {
        let bad = || Error::corrupt(format!("invalid digest '{}'", s.escape_debug()));
        let (alg, enc) = s.split_once(':').ok_or_else(bad)?;
        let (alg, len) = match alg {
            "sha256" => (Alg::Sha256, 64),
            "sha512" => (Alg::Sha512, 128),
            _ => {
                return Err(Error::new(
                    ErrorKind::UnsupportedFormat,
                    format!("unsupported digest algorithm in '{}'", s.escape_debug()),
                ));
            }
        };
        if enc.len() != len || !enc.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad());
        }
        Ok(Digest {
            alg,
            hex: enc.to_string(),
        })
    }

    fn of(alg: Alg, data: &[u8]) -> Digest {
        let mut h = Hasher::new(alg);
        h.update(data);
        Digest::finish(&mut h)
    }

    /// The digest of what `h` has seen (and `h` starts over).
    fn finish(h: &mut Hasher) -> Digest {
        Digest {
            alg: h.algorithm(),
            hex: h.finish_hex(),
        }
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.alg.name(), self.hex)
    }
}

// ------------------------------------------------------------------------------------------
// References

/// A parsed `docker://` reference, normalised as docker does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Registry as named (`docker.io` for Docker Hub), `host[:port]`.
    pub registry: String,
    /// Repository path without the host (`library/fedora`).
    pub repository: String,
    /// Tag (`latest` when neither tag nor digest is given).
    pub tag: Option<String>,
    /// Digest (`sha256:…`), when pulled by digest.
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parse the part after `docker:` (it must start with `//`).
    pub fn parse(s: &str) -> Result<ImageRef> {
        let bad = |why: &str| Error::invalid(format!("Invalid image name '{s}': {why}"));
        let rest = s
            .strip_prefix("//")
            .ok_or_else(|| bad("a docker reference must start with '//'"))?;
        if rest.is_empty() {
            return Err(bad("empty reference"));
        }
        if rest.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(bad("spaces or control characters"));
        }
        let (registry, remainder) = match rest.split_once('/') {
            Some((first, after))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), after)
            }
            _ => ("docker.io".to_string(), rest),
        };
        let registry = if registry == "index.docker.io" {
            "docker.io".to_string()
        } else {
            registry
        };
        if registry.is_empty() || registry.bytes().any(|b| b"?#@/\\".contains(&b)) {
            return Err(bad("bad registry host"));
        }
        let (name_tag, digest) = match remainder.split_once('@') {
            Some((n, d)) => {
                Digest::parse(d).map_err(|e| bad(e.message()))?;
                (n, Some(d.to_string()))
            }
            None => (remainder, None),
        };
        let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_tag[last_slash..].rfind(':') {
            Some(i) => (
                &name_tag[..last_slash + i],
                Some(name_tag[last_slash + i + 1..].to_string()),
            ),
            None => (name_tag, None),
        };
        if !valid_repository(name) {
            return Err(bad("invalid repository name"));
        }
        if let Some(t) = &tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes().enumerate().all(|(i, b)| {
                    b.is_ascii_alphanumeric() || b == b'_' || (i > 0 && (b == b'.' || b == b'-'))
                });
            if !ok {
                return Err(bad("invalid tag"));
            }
        }
        if tag.is_some() && digest.is_some() {
            return Err(bad("a reference cannot have both a tag and a digest"));
        }
        let repository = if registry == "docker.io" && !name.contains('/') {
            format!("library/{name}")
        } else {
            name.to_string()
        };
        if registry.len() + 1 + repository.len() > 255 {
            return Err(bad("name longer than 255 characters"));
        }
        let tag = if digest.is_none() && tag.is_none() {
            Some("latest".to_string())
        } else {
            tag
        };
        Ok(ImageRef {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The host (and port) the API is reached at: `registry-1.docker.io` for Docker Hub.
    pub fn api_host(&self) -> &str {
        if self.registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }

    /// The tag or digest to ask the manifests endpoint for.
    pub fn reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        match (&self.digest, &self.tag) {
            (Some(d), _) => write!(f, "@{d}"),
            (None, Some(t)) => write!(f, ":{t}"),
            (None, None) => Ok(()),
        }
    }
}

/// The distribution spec's repository name grammar:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
fn valid_repository(name: &str) -> bool {
    !name.is_empty()
        && name.split('/').all(|comp| {
            let b = comp.as_bytes();
            let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
            if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
                return false;
            }
            let mut i = 0;
            while i < b.len() {
                if alnum(b[i]) {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < b.len() && !alnum(b[i]) {
                    i += 1;
                }
                let sep = &comp[start..i];
                if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|c| c == b'-')) {
                    return false;
                }
            }
            true
        })
}

// ------------------------------------------------------------------------------------------
// Options, labels, architecture

/// How to reach the registry and which image to pick.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Username and password (`IMPORTER_ACCESS_KEY_ID`/`IMPORTER_SECRET_KEY`, when both are
    /// set), for the token service or Basic auth.
    pub credentials: Option<(String, String)>,
    /// `INSECURE_TLS`: skip TLS verification and fall back to plain `http://` when the HTTPS
    /// ping fails.
    pub insecure: bool,
    /// Extra trusted CA certificates (PEM).
    pub ca_pem: Vec<Vec<u8>>,
    /// `IMPORTER_REGISTRY_IMAGE_ARCHITECTURE`; `None` picks the host's and skips the config
    /// architecture check.
    pub architecture: Option<String>,
    /// Proxies.
    pub proxy: Proxy,
    /// Extra headers for every request.
    pub headers: Vec<(String, String)>,
    /// `User-Agent`.
    pub user_agent: String,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            credentials: None,
            insecure: false,
            ca_pem: Vec::new(),
            architecture: None,
            proxy: Proxy::default(),
            headers: Vec::new(),
            user_agent: ClientConfig::default().user_agent,
        }
    }
}

impl RegistryOptions {
    /// The architecture wanted (GOARCH spelling) and whether it was asked for explicitly.
    pub fn wanted_architecture(&self) -> (String, bool) {
        match self.architecture.as_deref().map(str::trim) {
            Some(a) if !a.is_empty() => (a.to_string(), true),
            _ => (host_architecture().to_string(), false),
        }
    }
}

/// This host's architecture in Go's spelling (`amd64`, `arm64`, `s390x`, `ppc64le`, …).
pub fn host_architecture() -> &'static str {
    let little = cfg!(target_endian = "little");
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "x86" => "386",
        "aarch64" => "arm64",
        "arm" => "arm",
        "powerpc64" if little => "ppc64le",
        "powerpc64" => "ppc64",
        "powerpc" => "ppc",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        "mips" if little => "mipsle",
        "mips" => "mips",
        "mips64" if little => "mips64le",
        "mips64" => "mips64",
        "loongarch64" => "loong64",
        other => other,
    }
}

/// CDI's `envToLabel`: the label name for an `Env` key holding `KUBEVIRT_IO_`, e.g.
/// `INSTANCETYPE_KUBEVIRT_IO_DEFAULT_PREFERENCE` → `instancetype.kubevirt.io/default-preference`.
pub fn env_to_label(key: &str) -> Option<String> {
    const MARK: &str = "KUBEVIRT_IO_";
    let i = key.find(MARK)?;
    let prefix = key[..i].strip_suffix('_').unwrap_or(&key[..i]);
    let mut label = prefix.replace('_', ".");
    if !label.is_empty() {
        label.push('.');
    }
    label.push_str("kubevirt.io/");
    label.push_str(&key[i + MARK.len()..].replace('_', "-"));
    Some(label.to_lowercase())
}

/// The labels CDI reports for a config's `Env` (`NAME=VALUE` strings).
pub fn env_to_labels<'a>(env: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, String> {
    env.into_iter()
        .filter_map(|e| {
            let (k, v) = e.split_once('=')?;
            Some((env_to_label(k)?, v.to_string()))
        })
        .collect()
}

// ------------------------------------------------------------------------------------------
// Descriptors and manifests

#[derive(Debug, Clone)]
struct Platform {
    architecture: String,
    os: String,
    variant: String,
}

#[derive(Debug, Clone)]
struct Descriptor {
    media_type: String,
    digest: Digest,
    size: u64,
    platform: Option<Platform>,
    annotations: BTreeMap<String, String>,
    has_urls: bool,
}

impl Descriptor {
    fn parse(v: &Value) -> Result<Descriptor> {
        let o = v
            .as_object()
            .ok_or_else(|| Error::corrupt("a descriptor is not a JSON object"))?;
        let digest = o
            .get("digest")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::corrupt("a descriptor has no digest"))?;
        let digest = Digest::parse(digest)?;
        let size = o
            .get("size")
            .and_then(Value::as_u64)
            .ok_or_else(|| Error::corrupt(format!("descriptor {digest} has no valid size")))?;
        let text = |v: Option<&Value>, k: &str| {
            v.and_then(|v| v.get(k))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let platform = o
            .get("platform")
            .filter(|p| p.is_object())
            .map(|p| Platform {
                architecture: text(Some(p), "architecture"),
                os: text(Some(p), "os"),
                variant: text(Some(p), "variant"),
            });
        let annotations = o
            .get("annotations")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Descriptor {
            media_type: text(Some(v), "mediaType"),
            digest,
            size,
            platform,
            annotations,
            has_urls: o
                .get("urls")
                .and_then(Value::as_array)
                .is_some_and(|a| !a.is_empty()),
        })
    }

    fn is_foreign(&self) -> bool {
        self.has_urls
            || self.media_type.contains(".foreign.")
            || self.media_type.contains(".nondistributable.")
    }
}

enum Manifest {
    Index {
        entries: Vec<Descriptor>,
        oci: bool,
    },
    Image {
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
}

/// A fetched manifest: its bytes (already checked against any expected digest), the media
/// type its transport declared, and its digest.
struct Fetched {
    bytes: Vec<u8>,
    declared: Option<String>,
    digest: Digest,
}

fn parse_manifest(bytes: &[u8], declared: Option<&str>) -> Result<Manifest> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| Error::corrupt(format!("manifest is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(Error::corrupt("manifest is not a JSON object"));
    }
    let known = |t: &str| is_index_type(t) || is_image_type(t) || is_schema1_type(t);
    let body_type = v.get("mediaType").and_then(Value::as_str);
    let declared = declared.filter(|t| known(t));
    if let (Some(d), Some(b)) = (declared, body_type)
        && d != b
    {
        return Err(Error::corrupt(format!(
            "manifest says its media type is {b} but was served as {d}"
        )));
    }
    let schema = v.get("schemaVersion").and_then(Value::as_i64);
    let mt = match declared.or(body_type) {
        Some(t) => t.to_string(),
        None if schema == Some(1) => DOCKER_SCHEMA1.to_string(),
        None if v.get("manifests").is_some() => OCI_INDEX.to_string(),
        None if v.get("config").is_some() => OCI_MANIFEST.to_string(),
        None => return Err(Error::corrupt("cannot tell the manifest's media type")),
    };
    if is_schema1_type(&mt) || schema == Some(1) {
        return Err(Error::new(
            ErrorKind::UnsupportedFormat,
            "Docker schema 1 manifests are not supported; push the image with a v2 or OCI manifest",
        ));
    }
    if schema != Some(2) {
        return Err(Error::corrupt("manifest schemaVersion is not 2"));
    }
    if is_index_type(&mt) {
        let list = v
            .get("manifests")
            .and_then(Value::as_array)
            .ok_or_else(|| Error::corrupt("image index has no manifests array"))?;
        if list.len() > MAX_INDEX_ENTRIES {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!("image index has {} entries", list.len()),
            ));
        }
        let entries = list
            .iter()
            .map(Descriptor::parse)
            .collect::<Result<Vec<_>>>()?;
        Ok(Manifest::Index {
            entries,
            oci: mt == OCI_INDEX,
        })
    } else if is_image_type(&mt) {
        let config = Descriptor::parse(
            v.get("config")
                .ok_or_else(|| Error::corrupt("image manifest has no config"))?,
        )?;
        let list = v
            .get("layers")
            .and_then(Value::as_array)
            .ok_or_else(|| Error::corrupt("image manifest has no layers array"))?;
        if list.len() > MAX_LAYERS {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!("image has {} layers (at most {MAX_LAYERS})", list.len()),
            ));
        }
        let layers = list
            .iter()
            .map(Descriptor::parse)
            .collect::<Result<Vec<_>>>()?;
        Ok(Manifest::Image { config, layers })
    } else {
        Err(Error::new(
            ErrorKind::UnsupportedFormat,
            format!("unsupported manifest media type '{mt}'"),
        ))
    }
}

/// Variants acceptable for `arch`, best first (containers/image's compatibility lists).
fn variants(arch: &str, explicit: bool) -> &'static [&'static str] {
    match (arch, explicit) {
        ("arm64", true) => &["", "v8"],
        ("arm64", false) => &["v8", ""],
        ("arm", _) => &["", "v8", "v7", "v6", "v5"],
        _ => &[""],
    }
}

/// The index entry for linux/`arch`: exact platform matches in variant preference order, then
/// (OCI only) the first manifest entry without a platform.
fn select_platform<'a>(
    entries: &'a [Descriptor],
    arch: &str,
    explicit: bool,
    oci: bool,
) -> Option<&'a Descriptor> {
    let usable = |d: &&Descriptor| {
        d.media_type.is_empty() || is_image_type(&d.media_type) || is_index_type(&d.media_type)
    };
    for v in variants(arch, explicit) {
        let hit = entries.iter().filter(usable).find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == arch && p.variant == *v)
        });
        if hit.is_some() {
            return hit;
        }
    }
    if oci {
        return entries.iter().filter(usable).find(|d| d.platform.is_none());
    }
    None
}

struct ImageConfig {
    architecture: String,
    env: Vec<String>,
    labels: BTreeMap<String, String>,
}

fn parse_config(bytes: &[u8]) -> Result<ImageConfig> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| Error::corrupt(format!("image config is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(Error::corrupt("image config is not a JSON object"));
    }
    let c = v.get("config").filter(|c| c.is_object());
    let env = c
        .and_then(|c| c.get("Env"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|e| e.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let labels = c
        .and_then(|c| c.get("Labels"))
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    Ok(ImageConfig {
        architecture: v
            .get("architecture")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        env,
        labels,
    })
}

// ------------------------------------------------------------------------------------------
// Registry connection and auth

#[derive(Debug, Clone)]
struct Challenge {
    scheme: String,
    params: BTreeMap<String, String>,
}

/// Parse `WWW-Authenticate` values (several challenges, quoted or token parameters).
fn parse_challenges(value: &str) -> Vec<Challenge> {
    let b = value.as_bytes();
    let tchar = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
    let mut i = 0;
    let mut out = Vec::new();
    let skip = |i: &mut usize| {
        while *i < b.len() && (b[*i] == b' ' || b[*i] == b'\t' || b[*i] == b',') {
            *i += 1;
        }
    };
    let token = |i: &mut usize| {
        let s = *i;
        while *i < b.len() && tchar(b[*i]) {
            *i += 1;
        }
        value[s..*i].to_string()
    };
    loop {
        skip(&mut i);
        if i >= b.len() {
            break;
        }
        let scheme = token(&mut i);
        if scheme.is_empty() {
            i += 1;
            continue;
        }
        let mut params = BTreeMap::new();
        loop {
            skip(&mut i);
            let save = i;
            let key = token(&mut i);
            while i < b.len() && (b[i] == b' ' || b[i] == b'\t') {
                i += 1;
            }
            if key.is_empty() || i >= b.len() || b[i] != b'=' {
                i = save;
                break;
            }
            i += 1;
            while i < b.len() && (b[i] == b' ' || b[i] == b'\t') {
                i += 1;
            }
            let mut val = Vec::new();
            if i < b.len() && b[i] == b'"' {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' && i + 1 < b.len() {
                        i += 1;
                    }
                    val.push(b[i]);
                    i += 1;
                }
                i += 1;
            } else {
                while i < b.len() && b[i] != b',' && b[i] != b' ' && b[i] != b'\t' {
                    val.push(b[i]);
                    i += 1;
                }
            }
            params.insert(
                key.to_ascii_lowercase(),
                String::from_utf8_lossy(&val).into_owned(),
            );
        }
        out.push(Challenge {
            scheme: scheme.to_ascii_lowercase(),
            params,
        });
    }
    out
}

fn query_escape(s: &str) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

fn basic_header(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

/// The message of a registry error body (`{"errors":[{"code","message"}]}` or text).
fn error_message(r: Response) -> String {
    let status = r.status;
    let body = r.read_to_vec(MAX_ERROR_BODY).unwrap_or_default();
    let from_json = serde_json::from_slice::<Value>(&body).ok().and_then(|v| {
        let e = v.get("errors")?.as_array()?.first()?.clone();
        let code = e.get("code").and_then(Value::as_str).unwrap_or("");
        let msg = e.get("message").and_then(Value::as_str).unwrap_or("");
        Some(format!("{code} {msg}").trim().to_string())
    });
    let text = from_json.unwrap_or_else(|| {
        String::from_utf8_lossy(&body[..body.len().min(200)])
            .trim()
            .to_string()
    });
    if text.is_empty() {
        format!("status {status}")
    } else {
        format!("status {status}: {}", text.escape_debug())
    }
}

struct AuthState {
    /// The `Authorization` value for registry requests, once known.
    header: Option<String>,
    /// The ping's challenges, used when a 401 carries none.
    ping: Vec<Challenge>,
}

/// A connection to one repository of one registry.
struct RegistryConn {
    client: Client,
    /// `https://host[:port]` or `http://…` after the insecure fallback.
    base: String,
    host: String,
    repo: String,
    creds: Option<(String, String)>,
    auth: Mutex<AuthState>,
    /// The actions a token is asked for: `pull`, or `pull,push` for [`Pusher`].
    actions: &'static str,
}

/// A request body that can be sent again (after a 401 renewed the token): bytes in memory or
/// the first `len` bytes of a file, read by position.
pub(crate) enum Body<'a> {
    /// Bytes in memory.
    Bytes(&'a [u8]),
    /// The first `len` bytes of a file (its position is not used).
    File(&'a File, u64),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RegistryConn {
    fn connect(r: &ImageRef, opts: &RegistryOptions) -> Result<RegistryConn> {
        RegistryConn::connect_for(r, opts, "pull")
    }

    /// Connect (ping, with the insecure plain-HTTP fallback); tokens will be asked for
    /// `actions` on the repository.
    fn connect_for(
        r: &ImageRef,
        opts: &RegistryOptions,
        actions: &'static str,
    ) -> Result<RegistryConn> {
        let client = Client::new(ClientConfig {
            user_agent: opts.user_agent.clone(),
            insecure: opts.insecure,
            ca_pem: opts.ca_pem.clone(),
            headers: opts.headers.clone(),
            basic_auth: None,
            proxy: opts.proxy.clone(),
            ..ClientConfig::default()
        })?;
        let host = r.api_host().to_string();
        let ping = |scheme: &str| -> Result<(String, Response)> {
            let base = format!("{scheme}://{host}");
            let r = client.send("GET", &format!("{base}/v2/"), &[])?;
            Ok((base, r))
        };
        let reach = |e: Error, how: &str| {
            Error::new(e.kind(), format!("cannot reach registry {host}{how}: {e}"))
        };
        let https = ping("https");
        let (base, resp) = if !opts.insecure {
            https.map_err(|e| reach(e, ""))?
        } else {
            match https {
                Ok((b, r)) if matches!(r.status, 200 | 401) => (b, r),
                first => match ping("http") {
                    Ok((b, r)) if matches!(r.status, 200 | 401) => (b, r),
                    _ => first.map_err(|e| reach(e, " over https or http"))?,
                },
            }
        };
        let challenges = if resp.status == 401 {
            resp.headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case("www-authenticate"))
                .flat_map(|(_, v)| parse_challenges(v))
                .collect()
        } else {
            Vec::new()
        };
        Ok(RegistryConn {
            client,
            base,
            host,
            repo: r.repository.clone(),
            creds: opts.credentials.clone(),
            auth: Mutex::new(AuthState {
                header: None,
                ping: challenges,
            }),
            actions,
        })
    }

    /// GET `url` with `extra` headers and the cached authorization; on 401 authenticate with
    /// the challenge and retry once; on 429 wait (bounded) and retry.
    fn get(&self, url: &str, extra: &[(&str, &str)]) -> Result<Response> {
        self.request("GET", url, extra, None)
    }

    /// [`RegistryConn::get`] for any method, with an optional body that is sent again on
    /// the retries. The authorization goes only to the registry's own host and port (an
    /// upload `Location` elsewhere gets none).
    fn request(
        &self,
        method: &str,
        url: &str,
        extra: &[(&str, &str)],
        body: Option<&Body>,
    ) -> Result<Response> {
        let own_host = Url::parse(url)?.authority() == Url::parse(&self.base)?.authority();
        let mut reauthed = false;
        let mut throttled = 0;
        loop {
            let auth = lock(&self.auth).header.clone().filter(|_| own_host);
            let mut hs = extra.to_vec();
            if let Some(a) = &auth {
                hs.push(("Authorization", a.as_str()));
            }
            let r = match body {
                None => self.client.send(method, url, &hs)?,
                Some(Body::Bytes(b)) => {
                    let mut rd: &[u8] = b;
                    self.client
                        .send_body(method, url, &hs, &mut rd, Some(b.len() as u64))?
                }
                Some(Body::File(f, len)) => {
                    let mut rd = FileCursor {
                        file: Arc::new(
                            (*f).try_clone()
                                .map_err(|e| Error::io("cannot reopen the file to send", e))?,
                        ),
                        pos: 0,
                        end: *len,
                    };
                    self.client
                        .send_body(method, url, &hs, &mut rd, Some(*len))?
                }
            };
            match r.status {
                401 if !reauthed => {
                    let ch: Vec<Challenge> = r
                        .headers
                        .iter()
                        .filter(|(k, _)| k.eq_ignore_ascii_case("www-authenticate"))
                        .flat_map(|(_, v)| parse_challenges(v))
                        .collect();
                    self.authenticate(ch)?;
                    reauthed = true;
                }
                401 | 403 => {
                    return Err(Error::new(
                        ErrorKind::Denied,
                        format!(
                            "registry {} denied access to {}: {}",
                            self.host,
                            self.repo,
                            error_message(r)
                        ),
                    ));
                }
                429 if throttled < MAX_THROTTLE_RETRIES => {
                    throttled += 1;
                    let secs = r
                        .header("retry-after")
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .unwrap_or(2)
                        .min(MAX_RETRY_AFTER);
                    std::thread::sleep(Duration::from_secs(secs));
                }
                _ => return Ok(r),
            }
        }
    }

    fn authenticate(&self, mut challenges: Vec<Challenge>) -> Result<()> {
        if challenges.is_empty() {
            challenges = lock(&self.auth).ping.clone();
        }
        let bearer = challenges.iter().find(|c| c.scheme == "bearer");
        let header = if let Some(c) = bearer {
            format!("Bearer {}", self.token(c)?)
        } else if challenges.iter().any(|c| c.scheme == "basic") {
            let (u, p) = self.creds.as_ref().ok_or_else(|| {
                Error::new(
                    ErrorKind::Denied,
                    format!(
                        "registry {} requires credentials (Basic auth) and none were given",
                        self.host
                    ),
                )
            })?;
            basic_header(u, p)
        } else {
            return Err(Error::new(
                ErrorKind::Denied,
                format!(
                    "registry {} answered 401 without a supported authentication challenge",
                    self.host
                ),
            ));
        };
        lock(&self.auth).header = Some(header);
        Ok(())
    }

    /// Get a token for `self.actions` (pull, or pull and push) from the Bearer challenge's realm.
    fn token(&self, c: &Challenge) -> Result<String> {
        let realm = c.params.get("realm").ok_or_else(|| {
            Error::new(
                ErrorKind::Denied,
                format!(
                    "registry {} sent a Bearer challenge without realm",
                    self.host
                ),
            )
        })?;
        let realm_url = Url::parse(realm)
            .map_err(|e| Error::new(ErrorKind::Denied, format!("bad token realm: {e}")))?;
        let mut scopes = vec![format!("repository:{}:{}", self.repo, self.actions)];
        if let Some(s) = c.params.get("scope") {
            for s in s.split(' ').filter(|s| !s.is_empty()) {
                if !scopes.iter().any(|x| x == s) {
                    scopes.push(s.to_string());
                }
            }
        }
        let mut url = realm.clone();
        let mut sep = if url.contains('?') { '&' } else { '?' };
        let mut param = |k: &str, v: &str| {
            url.push(sep);
            url.push_str(k);
            url.push('=');
            url.push_str(&query_escape(v));
            sep = '&';
        };
        if let Some(s) = c.params.get("service") {
            param("service", s);
        }
        for s in &scopes {
            param("scope", s);
        }
        let mut auth = None;
        if let Some((u, p)) = &self.creds {
            let base_host = Url::parse(&self.base).map(|b| b.authority()).ok();
            if realm_url.scheme != "https" && base_host.as_deref() != Some(&realm_url.authority()) {
                return Err(Error::new(
                    ErrorKind::Denied,
                    format!(
                        "refusing to send credentials over plain HTTP to the token service {}",
                        realm_url.authority()
                    ),
                ));
            }
            param("account", u);
            auth = Some(basic_header(u, p));
        }
        let hs: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        let r = self.client.send("GET", &url, &hs)?;
        match r.status {
            200 => {}
            401 | 403 if self.creds.is_none() => {
                return Err(Error::new(
                    ErrorKind::Denied,
                    format!(
                        "registry {} requires authentication: its token service refused anonymous access to {} ({}); set credentials (accessKeyId/secretKey)",
                        self.host,
                        self.repo,
                        error_message(r)
                    ),
                ));
            }
            401 | 403 => {
                return Err(Error::new(
                    ErrorKind::Denied,
                    format!(
                        "the token service of registry {} rejected the credentials ({})",
                        self.host,
                        error_message(r)
                    ),
                ));
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::Network,
                    format!(
                        "token service {} failed: {}",
                        realm_url.authority(),
                        error_message(r)
                    ),
                ));
            }
        }
        let body = r.read_to_vec(MAX_TOKEN)?;
        let v: Value = serde_json::from_slice(&body).map_err(|e| {
            Error::new(
                ErrorKind::Network,
                format!("token response is not JSON: {e}"),
            )
        })?;
        ["token", "access_token"]
            .iter()
            .filter_map(|k| v.get(*k).and_then(Value::as_str))
            .find(|t| !t.is_empty())
            .filter(|t| t.bytes().all(|b| b > b' ' && b != 0x7f))
            .map(str::to_string)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Network,
                    "token response holds no usable token or access_token",
                )
            })
    }

    fn manifest_url(&self, reference: &str) -> String {
        format!("{}/v2/{}/manifests/{reference}", self.base, self.repo)
    }

    fn blob_url(&self, d: &Digest) -> String {
        format!("{}/v2/{}/blobs/{d}", self.base, self.repo)
    }

    /// GET a manifest by tag or digest; checks it against `expect` (digest, size) or the
    /// `Docker-Content-Digest` header.
    fn fetch_manifest(
        &self,
        reference: &str,
        expect: Option<(&Digest, Option<u64>)>,
    ) -> Result<Fetched> {
        let r = self.get(
            &self.manifest_url(reference),
            &[("Accept", ACCEPT_MANIFESTS)],
        )?;
        let what = format!("{}/{}:{reference}", self.host, self.repo);
        match r.status {
            200 => {}
            404 => {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("manifest {what} not found ({})", error_message(r)),
                ));
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::Network,
                    format!("cannot get manifest {what}: {}", error_message(r)),
                ));
            }
        }
        if r.content_length().is_some_and(|n| n > MAX_MANIFEST as u64) {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!("manifest {what} is larger than {MAX_MANIFEST} bytes"),
            ));
        }
        let declared = r.header("content-type").map(|t| {
            t.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
        let header_digest = r.header("docker-content-digest").map(str::to_string);
        let bytes = r.read_to_vec(MAX_MANIFEST)?;
        let digest = match expect {
            Some((want, size)) => {
                if size.is_some_and(|s| s != bytes.len() as u64) {
                    return Err(Error::corrupt(format!(
                        "manifest {what} is {} bytes, its descriptor says {}",
                        bytes.len(),
                        size.unwrap_or(0)
                    )));
                }
                let got = Digest::of(want.alg, &bytes);
                if &got != want {
                    return Err(Error::corrupt(format!(
                        "manifest {what} does not match its digest: got {got}"
                    )));
                }
                got
            }
            None => {
                if let Some(h) = header_digest
                    && let Ok(hd) = Digest::parse(&h)
                {
                    let got = Digest::of(hd.alg, &bytes);
                    if got != hd {
                        return Err(Error::corrupt(format!(
                            "manifest {what} does not match its Docker-Content-Digest {hd}: got {got}"
                        )));
                    }
                }
                Digest::of(Alg::Sha256, &bytes)
            }
        };
        Ok(Fetched {
            bytes,
            declared,
            digest,
        })
    }
}

// ------------------------------------------------------------------------------------------
// Pushing

/// Pushes blobs and an image manifest to one repository, through the same connection, auth
/// (tokens for `pull,push`, Basic) and TLS rules as pulls: blobs by a monolithic upload
/// (`POST …/blobs/uploads/`, then `PUT <Location>?digest=` with the whole body), skipped when
/// a `HEAD` finds them; the manifest by `PUT …/manifests/<tag or digest>`.
pub(crate) struct Pusher {
    conn: RegistryConn,
}

impl Pusher {
    /// Connect to the registry of `r` for pushing to its repository. Fails early on an
    /// unreachable registry and on refused credentials: the API root is fetched with the
    /// authorization a push will use (a token for `pull,push`, or Basic), which depends
    /// neither on the repository existing nor on permission to list it.
    pub(crate) fn connect(r: &ImageRef, opts: &RegistryOptions) -> Result<Pusher> {
        let conn = RegistryConn::connect_for(r, opts, "pull,push")?;
        let probe = conn.get(&format!("{}/v2/", conn.base), &[])?;
        if probe.status != 200 {
            return Err(Error::new(
                ErrorKind::Network,
                format!(
                    "registry {} answered its API root: {}",
                    conn.host,
                    error_message(probe)
                ),
            ));
        }
        Ok(Pusher { conn })
    }

    /// `host/repository`, for messages.
    pub(crate) fn name(&self) -> String {
        format!("{}/{}", self.conn.host, self.conn.repo)
    }

    fn fail(&self, what: &str, r: Response) -> Error {
        let kind = match r.status {
            401 | 403 => ErrorKind::Denied,
            _ => ErrorKind::Network,
        };
        Error::new(
            kind,
            format!("{what} at {}: {}", self.name(), error_message(r)),
        )
    }

    /// Whether the repository already holds the blob `digest` (`HEAD`).
    pub(crate) fn has_blob(&self, digest: &str) -> Result<bool> {
        let d = Digest::parse(digest)?;
        let r = self
            .conn
            .request("HEAD", &self.conn.blob_url(&d), &[], None)?;
        match r.status {
            200 => Ok(true),
            404 => Ok(false),
            _ => Err(self.fail(&format!("cannot check for blob {d}"), r)),
        }
    }

    /// Upload the blob `digest` of `size` bytes from `body` unless the repository has it;
    /// returns whether it was sent.
    pub(crate) fn push_blob(&self, digest: &str, body: &Body) -> Result<bool> {
        if self.has_blob(digest)? {
            return Ok(false);
        }
        let d = Digest::parse(digest)?;
        let start = format!("{}/v2/{}/blobs/uploads/", self.conn.base, self.conn.repo);
        let r = self
            .conn
            .request("POST", &start, &[], Some(&Body::Bytes(&[])))?;
        if r.status != 202 {
            return Err(self.fail(&format!("cannot start the upload of blob {d}"), r));
        }
        let loc = r.header("location").ok_or_else(|| {
            Error::new(
                ErrorKind::Network,
                format!(
                    "registry {} started an upload without a Location",
                    self.conn.host
                ),
            )
        })?;
        let mut url = Url::parse(&self.conn.base)?.join(loc)?.to_string();
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str("digest=");
        url.push_str(&query_escape(&d.to_string()));
        let r = self.conn.request(
            "PUT",
            &url,
            &[("Content-Type", "application/octet-stream")],
            Some(body),
        )?;
        // 201 Created per the spec; some registries answer 204 or 200.
        if !(200..300).contains(&r.status) {
            return Err(self.fail(&format!("cannot upload blob {d}"), r));
        }
        self.check_digest(&r, &d, "blob")?;
        Ok(true)
    }

    /// `PUT` the manifest `bytes` (of media type `media_type`, digest `digest`) under
    /// `reference`, a tag or that digest.
    pub(crate) fn put_manifest(
        &self,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
        digest: &str,
    ) -> Result<()> {
        let d = Digest::parse(digest)?;
        let r = self.conn.request(
            "PUT",
            &self.conn.manifest_url(reference),
            &[("Content-Type", media_type)],
            Some(&Body::Bytes(bytes)),
        )?;
        if !(200..300).contains(&r.status) {
            return Err(self.fail(&format!("cannot put manifest {reference}"), r));
        }
        self.check_digest(&r, &d, "manifest")
    }

    /// A `Docker-Content-Digest` in an answer must be the digest sent.
    fn check_digest(&self, r: &Response, d: &Digest, what: &str) -> Result<()> {
        match r.header("docker-content-digest").map(str::trim) {
            Some(h) if h != d.to_string() => Err(Error::new(
                ErrorKind::Network,
                format!(
                    "registry {} stored the {what} as {h}, not {d}",
                    self.conn.host
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// A registry blob body that resumes with `Range` after a dropped connection and
/// re-authenticates when a token expired meanwhile.
///
/// Deliberately not [`Client::download_with_headers`], whose resumes re-send fixed headers to
/// the URL that answered: here every resume goes back through [`RegistryConn::get`], so an
/// expired Bearer token is renewed on the 401 and a 429 is waited out; it starts again at the
/// registry's blob URL, not at a signed storage redirect that may have expired meanwhile; and
/// it needs no `Accept-Ranges`, skipping ahead when a registry answers the Range request with
/// a full 200 (blobs are content-addressed, so the bytes are the same).
struct BlobBody {
    conn: Arc<RegistryConn>,
    url: String,
    digest: String,
    size: u64,
    pos: u64,
    resumes: u32,
    body: Box<dyn Read + Send>,
}

impl BlobBody {
    fn open(conn: Arc<RegistryConn>, d: &Descriptor) -> Result<BlobBody> {
        let url = conn.blob_url(&d.digest);
        let r = conn.get(&url, &[])?;
        match r.status {
            200 => {}
            404 => {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("blob {} not found ({})", d.digest, error_message(r)),
                ));
            }
            _ => {
                return Err(Error::new(
                    ErrorKind::Network,
                    format!("cannot get blob {}: {}", d.digest, error_message(r)),
                ));
            }
        }
        if let Some(n) = r.content_length()
            && n != d.size
        {
            return Err(Error::corrupt(format!(
                "blob {} is served with {n} bytes, its descriptor says {}",
                d.digest, d.size
            )));
        }
        if let Some(h) = r.header("docker-content-digest")
            && Digest::parse(h).is_ok_and(|hd| hd.alg == d.digest.alg && hd != d.digest)
        {
            return Err(Error::corrupt(format!(
                "blob {} is served with Docker-Content-Digest {h}",
                d.digest
            )));
        }
        Ok(BlobBody {
            conn,
            url,
            digest: d.digest.to_string(),
            size: d.size,
            pos: 0,
            resumes: 0,
            body: r.into_reader(),
        })
    }

    fn resume(&mut self, why: io::Error) -> io::Result<()> {
        let max = self.conn.client.config().max_resumes;
        if self.resumes >= max {
            return Err(io::Error::other(format!(
                "download of blob {} failed after {} of {} bytes: {why}",
                self.digest, self.pos, self.size
            )));
        }
        self.resumes += 1;
        std::thread::sleep(Duration::from_millis(200 * u64::from(self.resumes.min(10))));
        let range = format!("bytes={}-", self.pos);
        let fail = |e: String| {
            io::Error::other(format!(
                "cannot resume blob {} at byte {}: {e}",
                self.digest, self.pos
            ))
        };
        let r = self
            .conn
            .get(&self.url, &[("Range", &range)])
            .map_err(|e| fail(e.to_string()))?;
        let start = r
            .header("content-range")
            .and_then(|v| v.strip_prefix("bytes "))
            .and_then(|v| v.split('-').next())
            .and_then(|v| v.trim().parse::<u64>().ok());
        match r.status {
            206 if start == Some(self.pos) => self.body = r.into_reader(),
            200 => {
                // No range support: the content is addressed by digest, so skip what we have.
                let mut body = r.into_reader();
                let skipped = io::copy(&mut (&mut body).take(self.pos), &mut io::sink())?;
                if skipped != self.pos {
                    return Err(fail("the new response is shorter".into()));
                }
                self.body = body;
            }
            s => return Err(fail(format!("the registry answered {s}"))),
        }
        Ok(())
    }
}

impl Read for BlobBody {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() || self.pos >= self.size {
            return Ok(0);
        }
        let n = buf.len().min((self.size - self.pos).min(1 << 30) as usize);
        loop {
            match self.body.read(&mut buf[..n]) {
                Ok(0) => self.resume(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ))?,
                Ok(got) => {
                    self.pos += got as u64;
                    return Ok(got);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.resume(e)?,
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// oci-archive

/// An OCI layout tar read in place: entry name → (data offset, size).
struct Archive {
    file: Arc<File>,
    path: PathBuf,
    entries: HashMap<String, (u64, u64)>,
}

/// A reader over a file by position, whose `skip` seeks.
struct FileCursor {
    file: Arc<File>,
    pos: u64,
    end: u64,
}

impl Read for FileCursor {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end.saturating_sub(self.pos);
        let n = buf.len().min(left.min(1 << 30) as usize);
        if n == 0 {
            return Ok(0);
        }
        let got = self.file.read_at(&mut buf[..n], self.pos)?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl Seek for FileCursor {
    /// Only forward moves inside the file: the tar reader skips entries this way.
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let SeekFrom::Current(n) = to else {
            return Err(io::Error::other("FileCursor only seeks forward"));
        };
        let n = u64::try_from(n).map_err(|_| io::Error::other("FileCursor only seeks forward"))?;
        if n > self.end.saturating_sub(self.pos) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "tar archive is cut off inside an entry",
            ));
        }
        self.pos += n;
        Ok(self.pos)
    }
}

fn normalize_name(name: &str) -> &str {
    let mut n = name;
    loop {
        if let Some(s) = n.strip_prefix("./") {
            n = s;
        } else if let Some(s) = n.strip_prefix('/') {
            n = s;
        } else {
            return n;
        }
    }
}

impl Archive {
    fn open(path: &Path) -> Result<Archive> {
        let file = File::open(path)
            .map_err(|e| Error::io("cannot open the OCI archive", e).with_path(path))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("cannot stat the OCI archive", e).with_path(path))?
            .len();
        let file = Arc::new(file);
        let mut magic = [0u8; 6];
        let got = file.read_at(&mut magic, 0).unwrap_or(0);
        if got >= 2 && compression_of(&magic).is_some() {
            return Err(Error::new(
                ErrorKind::UnsupportedFormat,
                "the OCI archive is compressed; oci-archive must be a plain tar",
            )
            .with_path(path));
        }
        let bad = |e: Error| {
            Error::new(e.kind(), format!("cannot read the OCI archive: {e}")).with_path(path)
        };
        let mut w = TarReader::seekable(FileCursor {
            file: file.clone(),
            pos: 0,
            end: len,
        });
        let mut entries = HashMap::new();
        while let Some(e) = w.next_entry().map_err(bad)? {
            let name = normalize_name(&e.path).trim_end_matches('/').to_string();
            match e.kind {
                EntryKind::Dir => continue,
                // Blobs are read in place: a sparse entry's stored bytes are not its content.
                EntryKind::File if e.sparse.is_none() => {}
                _ if name == "index.json" || name.starts_with("blobs/") => {
                    return Err(Error::corrupt(format!(
                        "OCI archive entry '{name}' is not a plain regular file"
                    ))
                    .with_path(path));
                }
                _ => continue,
            }
            if entries.len() >= MAX_ARCHIVE_ENTRIES {
                return Err(Error::new(
                    ErrorKind::TooLarge,
                    format!("OCI archive has more than {MAX_ARCHIVE_ENTRIES} files"),
                )
                .with_path(path));
            }
            if entries
                .insert(name.clone(), (e.data_offset, e.size))
                .is_some()
            {
                return Err(
                    Error::corrupt(format!("OCI archive holds '{name}' twice")).with_path(path)
                );
            }
        }
        Ok(Archive {
            file,
            path: path.to_path_buf(),
            entries,
        })
    }

    fn entry(&self, name: &str) -> Result<(u64, u64)> {
        self.entries.get(name).copied().ok_or_else(|| {
            Error::new(ErrorKind::NotFound, format!("OCI archive has no '{name}'"))
                .with_path(&self.path)
        })
    }

    fn reader(&self, off: u64, size: u64) -> FileCursor {
        FileCursor {
            file: self.file.clone(),
            pos: off,
            end: off + size,
        }
    }

    fn read_file(&self, name: &str, limit: usize) -> Result<Vec<u8>> {
        let (off, size) = self.entry(name)?;
        if size > limit as u64 {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!("'{name}' in the OCI archive is larger than {limit} bytes"),
            )
            .with_path(&self.path));
        }
        let mut v = Vec::with_capacity(size as usize);
        self.reader(off, size)
            .read_to_end(&mut v)
            .map_err(|e| Error::io(format!("cannot read '{name}'"), e).with_path(&self.path))?;
        if v.len() as u64 != size {
            return Err(Error::corrupt(format!("'{name}' is cut off")).with_path(&self.path));
        }
        Ok(v)
    }

    fn blob_name(d: &Digest) -> String {
        format!("blobs/{}/{}", d.alg.name(), d.hex)
    }
}

// ------------------------------------------------------------------------------------------
// Sources and verified blobs

enum Source {
    Registry(Arc<RegistryConn>),
    Archive(Arc<Archive>),
}

impl Source {
    /// The error kind of a transport failure.
    fn fail_kind(&self) -> ErrorKind {
        match self {
            Source::Registry(_) => ErrorKind::Network,
            Source::Archive(_) => ErrorKind::Io,
        }
    }

    /// The raw bytes of a blob (not yet verified).
    fn open_blob(&self, d: &Descriptor) -> Result<Box<dyn Read + Send>> {
        match self {
            Source::Registry(c) => Ok(Box::new(BlobBody::open(c.clone(), d)?)),
            Source::Archive(a) => {
                let (off, size) = a.entry(&Archive::blob_name(&d.digest))?;
                if size != d.size {
                    return Err(Error::corrupt(format!(
                        "blob {} is {size} bytes in the archive, its descriptor says {}",
                        d.digest, d.size
                    ))
                    .with_path(&a.path));
                }
                Ok(Box::new(a.reader(off, size)))
            }
        }
    }

    /// A small blob, checked against its descriptor.
    fn read_small(&self, d: &Descriptor, limit: usize, what: &str) -> Result<Vec<u8>> {
        if d.size > limit as u64 {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!("{what} {} is {} bytes (at most {limit})", d.digest, d.size),
            ));
        }
        let mut v = Vec::with_capacity(d.size as usize);
        Verified::new(self.open_blob(d)?, d)
            .read_to_end(&mut v)
            .map_err(|e| {
                map_io(
                    &format!("cannot read {what} {}", d.digest),
                    e,
                    self.fail_kind(),
                )
            })?;
        Ok(v)
    }

    /// A child manifest named by an index entry.
    fn fetch_child(&self, d: &Descriptor) -> Result<Fetched> {
        if d.size > MAX_MANIFEST as u64 {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!("manifest {} is {} bytes", d.digest, d.size),
            ));
        }
        match self {
            Source::Registry(c) => {
                let mut f =
                    c.fetch_manifest(&d.digest.to_string(), Some((&d.digest, Some(d.size))))?;
                if f.declared
                    .as_deref()
                    .is_none_or(|t| !is_index_type(t) && !is_image_type(t))
                {
                    f.declared = Some(d.media_type.clone());
                }
                Ok(f)
            }
            Source::Archive(_) => Ok(Fetched {
                bytes: self.read_small(d, MAX_MANIFEST, "manifest")?,
                declared: Some(d.media_type.clone()),
                digest: d.digest.clone(),
            }),
        }
    }
}

fn map_io(ctx: &str, e: io::Error, default: ErrorKind) -> Error {
    let kind = match e.kind() {
        io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof => ErrorKind::Corrupt,
        io::ErrorKind::Unsupported => ErrorKind::UnsupportedFormat,
        _ => default,
    };
    Error::new(kind, format!("{ctx}: {e}"))
}

enum VerifyState {
    Reading,
    Done,
    Failed(io::ErrorKind, String),
}

/// Passes exactly `size` bytes of a blob through, hashing them; at the last byte the digest
/// must match, else the read fails (and every later one).
struct Verified<R> {
    inner: R,
    hasher: Hasher,
    want: Digest,
    size: u64,
    pos: u64,
    state: VerifyState,
}

impl<R: Read> Verified<R> {
    fn new(inner: R, d: &Descriptor) -> Verified<R> {
        Verified {
            inner,
            hasher: Hasher::new(d.digest.alg),
            want: d.digest.clone(),
            size: d.size,
            pos: 0,
            state: VerifyState::Reading,
        }
    }

    fn fail(&mut self, kind: io::ErrorKind, msg: String) -> io::Error {
        self.state = VerifyState::Failed(kind, msg.clone());
        io::Error::new(kind, msg)
    }

    fn finish(&mut self) -> io::Result<()> {
        let got = Digest::finish(&mut self.hasher);
        if got != self.want {
            return Err(self.fail(
                io::ErrorKind::InvalidData,
                format!(
                    "blob does not match its digest {} (got {got}): the download is corrupt",
                    self.want
                ),
            ));
        }
        self.state = VerifyState::Done;
        Ok(())
    }

    fn failed(&self) -> Option<(io::ErrorKind, &str)> {
        match &self.state {
            VerifyState::Failed(k, m) => Some((*k, m)),
            _ => None,
        }
    }
}

impl<R: Read> Read for Verified<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.state {
            VerifyState::Done => return Ok(0),
            VerifyState::Failed(k, m) => return Err(io::Error::new(*k, m.clone())),
            VerifyState::Reading => {}
        }
        if self.pos == self.size {
            self.finish()?;
            return Ok(0);
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let n = buf.len().min((self.size - self.pos).min(1 << 30) as usize);
        let got = loop {
            match self.inner.read(&mut buf[..n]) {
                Ok(0) => {
                    let msg = format!(
                        "blob {} ends after {} of {} bytes",
                        self.want, self.pos, self.size
                    );
                    return Err(self.fail(io::ErrorKind::UnexpectedEof, msg));
                }
                Ok(g) => break g,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.fail(e.kind(), e.to_string())),
            }
        };
        self.hasher.update(&buf[..got]);
        self.pos += got as u64;
        if self.pos == self.size {
            self.finish()?;
        }
        Ok(got)
    }
}

/// A layer's verified raw bytes, shared between its decoder and the code that drains it.
#[derive(Clone)]
struct SharedRaw(Arc<Mutex<Verified<Box<dyn Read + Send>>>>);

impl Read for SharedRaw {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        lock(&self.0).read(buf)
    }
}

impl SharedRaw {
    /// Read the rest of the blob, which checks its digest.
    fn drain(&self) -> io::Result<()> {
        io::copy(&mut self.clone(), &mut io::sink()).map(|_| ())
    }

    /// The error to report for a failure `e` while decoding the layer: when the raw bytes
    /// were fine so far, read the rest, since a wrong digest explains a decoding error best.
    fn explain(&self, e: io::Error) -> io::Error {
        if let Some((k, m)) = lock(&self.0).failed() {
            return io::Error::new(k, m.to_string());
        }
        if e.kind() == io::ErrorKind::Unsupported {
            // A content decision (say, a symlink named disk), not damage.
            return e;
        }
        match self.drain() {
            Err(d) if d.kind() == io::ErrorKind::InvalidData => d,
            _ => e,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    Gzip,
    Zstd,
    Xz,
}

fn compression_of(head: &[u8]) -> Option<Compression> {
    if head.starts_with(&[0x1f, 0x8b]) {
        Some(Compression::Gzip)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some(Compression::Zstd)
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Some(Compression::Xz)
    } else {
        None
    }
}

/// The uncompressed tar stream of a layer, picked by magic bytes (like CDI, whatever the
/// media type says).
fn layer_tar(raw: SharedRaw) -> io::Result<Box<dyn Read + Send>> {
    let mut head = Vec::with_capacity(6);
    (&mut raw.clone()).take(6).read_to_end(&mut head)?;
    let stream = io::Cursor::new(head.clone()).chain(raw);
    Ok(match compression_of(&head) {
        Some(Compression::Gzip) => Box::new(flate2::read::MultiGzDecoder::new(stream)),
        Some(Compression::Zstd) => {
            let mut d = zstd::stream::read::Decoder::new(stream)?;
            d.window_log_max(ZSTD_WINDOW_LOG_MAX)?;
            Box::new(d)
        }
        Some(Compression::Xz) => {
            let s = liblzma::stream::Stream::new_stream_decoder(
                XZ_MEMLIMIT,
                liblzma::stream::CONCATENATED,
            )
            .map_err(io::Error::other)?;
            Box::new(liblzma::read::XzDecoder::new_stream(stream, s))
        }
        None => Box::new(BufReader::with_capacity(128 << 10, stream)),
    })
}

// ------------------------------------------------------------------------------------------
// Tar walker

/// A tar reader's error as the `io::Error` the layer plumbing works with (damage becomes
/// `InvalidData`, a content decision `Unsupported`).
fn tar_io(e: Error) -> io::Error {
    use std::error::Error as _;
    let kind = match e.kind() {
        ErrorKind::Corrupt | ErrorKind::TooLarge => io::ErrorKind::InvalidData,
        ErrorKind::UnsupportedFormat | ErrorKind::UnsupportedFeature => io::ErrorKind::Unsupported,
        _ => e
            .source()
            .and_then(|s| s.downcast_ref::<io::Error>())
            .map_or(io::ErrorKind::Other, io::Error::kind),
    };
    io::Error::new(kind, e.to_string())
}

/// CDI's rule: the first entry whose name (without a leading `./` or `/`) starts with `disk`,
/// is not a whiteout and not a directory. Anything but a regular file (sparse or not) there is
/// an error.
fn find_disk<R: Read>(w: &mut TarReader<R>) -> io::Result<Option<Entry>> {
    while let Some(mut e) = w.next_entry().map_err(tar_io)? {
        let name = normalize_name(&e.path);
        if !name.starts_with("disk") {
            continue;
        }
        let base = name.trim_end_matches('/').rsplit('/').next().unwrap_or("");
        if base.starts_with(".wh.") || e.kind == EntryKind::Dir {
            continue;
        }
        if name.split('/').any(|c| c == "..") || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "disk entry name '{}' leaves the image (content filepath is tainted)",
                    name.escape_debug()
                ),
            ));
        }
        if e.kind != EntryKind::File {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "'{}' is a {}; only a regular file can be the VM disk",
                    name.escape_debug(),
                    e.kind.describe()
                ),
            ));
        }
        e.path = name.to_string();
        return Ok(Some(e));
    }
    Ok(None)
}

// ------------------------------------------------------------------------------------------
// Opening images

/// An opened containerDisk: manifest and config fetched and checked, layers not yet read.
pub struct ContainerDisk {
    /// CDI's labels from the config's `Env` (`…KUBEVIRT_IO_…` entries).
    pub labels: BTreeMap<String, String>,
    /// Digest of the image manifest whose layers are read.
    pub digest: String,
    /// Digest of the index (manifest list) the image was chosen from, if any.
    pub index_digest: Option<String>,
    /// The config's `architecture`.
    pub architecture: String,
    /// The config's `Env`.
    pub env: Vec<String>,
    /// The config's `Labels`.
    pub config_labels: BTreeMap<String, String>,
    layers: Vec<Descriptor>,
    source: Source,
}

impl std::fmt::Debug for ContainerDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerDisk")
            .field("digest", &self.digest)
            .field("index_digest", &self.index_digest)
            .field("architecture", &self.architecture)
            .field("labels", &self.labels)
            .field("layers", &self.layers.len())
            .finish()
    }
}

/// Open a containerDisk: `docker://REF` or `oci-archive:PATH[:REF]` (CDI's
/// `IMPORTER_ENDPOINT`). Fetches and verifies the manifest (choosing the platform from an
/// index) and the config; refuses bootc images and a wrong architecture.
pub fn open(endpoint: &str, opts: &RegistryOptions) -> Result<ContainerDisk> {
    let invalid = || Error::invalid(format!("Invalid image name: '{endpoint}'"));
    let (scheme, rest) = endpoint.split_once(':').ok_or_else(invalid)?;
    match scheme {
        "docker" => {
            let r = ImageRef::parse(rest)?;
            let conn = Arc::new(RegistryConn::connect(&r, opts)?);
            let expect = r.digest.as_deref().map(Digest::parse).transpose()?;
            let first = conn.fetch_manifest(r.reference(), expect.as_ref().map(|d| (d, None)))?;
            resolve(Source::Registry(conn), first, opts)
        }
        "oci-archive" => {
            let (path, want) = match rest.split_once(':') {
                Some((p, r)) => (p, Some(r).filter(|r| !r.is_empty())),
                None => (rest, None),
            };
            if path.is_empty() {
                return Err(invalid());
            }
            open_archive(Path::new(path), want, opts)
        }
        _ => Err(invalid()),
    }
}

/// The digest of the manifest a `docker://REF` endpoint names, as the registry serves it for
/// the manifest media types this client accepts: for a multi-platform image the index's, not
/// a platform's. This is the digest CDI's DataImportCron poller records (`skopeo inspect`'s
/// `Digest`). The manifest is fetched whole (bounded), hashed, and checked against the
/// registry's `Docker-Content-Digest` header and a digest in the reference.
pub fn manifest_digest(endpoint: &str, opts: &RegistryOptions) -> Result<String> {
    let rest = endpoint.strip_prefix("docker:").ok_or_else(|| {
        Error::invalid(format!("Invalid image name: '{endpoint}': not docker://"))
    })?;
    let r = ImageRef::parse(rest)?;
    let conn = RegistryConn::connect(&r, opts)?;
    let expect = r.digest.as_deref().map(Digest::parse).transpose()?;
    let f = conn.fetch_manifest(r.reference(), expect.as_ref().map(|d| (d, None)))?;
    Ok(f.digest.to_string())
}

fn open_archive(path: &Path, want: Option<&str>, opts: &RegistryOptions) -> Result<ContainerDisk> {
    let a = Arc::new(Archive::open(path)?);
    if let Ok(layout) = a.read_file("oci-layout", 64 << 10) {
        let v: Value = serde_json::from_slice(&layout).map_err(|e| {
            Error::corrupt(format!("oci-layout is not valid JSON: {e}")).with_path(path)
        })?;
        if v.get("imageLayoutVersion")
            .and_then(Value::as_str)
            .is_none()
        {
            return Err(Error::corrupt("oci-layout has no imageLayoutVersion").with_path(path));
        }
    }
    let index = a.read_file("index.json", MAX_MANIFEST)?;
    let Manifest::Index { entries, .. } =
        parse_manifest(&index, Some(OCI_INDEX)).map_err(|e| e.with_path(path))?
    else {
        return Err(Error::corrupt("index.json is not an image index").with_path(path));
    };
    let usable = |d: &&Descriptor| {
        d.media_type.is_empty() || is_image_type(&d.media_type) || is_index_type(&d.media_type)
    };
    let source = Source::Archive(a);
    let chosen = match want {
        Some(name) => entries
            .iter()
            .find(|d| d.annotations.get(REF_NAME_ANNOTATION).map(String::as_str) == Some(name))
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("no image named '{name}' in the OCI archive"),
                )
                .with_path(path)
            })?,
        None if entries.len() > 1 && entries.iter().any(|d| d.platform.is_some()) => {
            // index.json listing one manifest per platform: choose like in an index.
            let first = Fetched {
                bytes: index,
                declared: Some(OCI_INDEX.into()),
                digest: Digest::of(Alg::Sha256, b""),
            };
            let mut disk = resolve(source, first, opts)?;
            disk.index_digest = None;
            return Ok(disk);
        }
        None => entries.iter().find(usable).ok_or_else(|| {
            Error::new(ErrorKind::NotFound, "the OCI archive holds no image").with_path(path)
        })?,
    };
    if !usable(&chosen) {
        return Err(Error::new(
            ErrorKind::UnsupportedFormat,
            format!("'{}' in the OCI archive is not an image", chosen.media_type),
        )
        .with_path(path));
    }
    let first = source.fetch_child(chosen)?;
    resolve(source, first, opts)
}

/// From the first manifest to an opened image: platform choice, config checks, labels.
fn resolve(source: Source, mut cur: Fetched, opts: &RegistryOptions) -> Result<ContainerDisk> {
    let (arch, explicit) = opts.wanted_architecture();
    let mut index_digest = None;
    let mut depth = 0;
    let (config, layers) = loop {
        match parse_manifest(&cur.bytes, cur.declared.as_deref())? {
            Manifest::Index { entries, oci } => {
                depth += 1;
                if depth > MAX_INDEX_DEPTH {
                    return Err(Error::corrupt("image indexes are nested too deeply"));
                }
                index_digest.get_or_insert_with(|| cur.digest.to_string());
                let d = select_platform(&entries, &arch, explicit, oci).ok_or_else(|| {
                    Error::new(
                        ErrorKind::NotFound,
                        format!(
                            "Error validating architecture: no image found in {} for architecture \"{arch}\", variant \"\", OS \"linux\"",
                            if oci { "image index" } else { "manifest list" }
                        ),
                    )
                })?;
                cur = source.fetch_child(d)?;
            }
            Manifest::Image { config, layers } => break (config, layers),
        }
    };
    if !(config.media_type.is_empty()
        || config.media_type == OCI_CONFIG
        || config.media_type == DOCKER_CONFIG)
    {
        return Err(Error::new(
            ErrorKind::UnsupportedFormat,
            format!(
                "not a container image: config media type '{}'",
                config.media_type
            ),
        ));
    }
    for l in &layers {
        if l.size > MAX_BLOB {
            return Err(Error::new(
                ErrorKind::TooLarge,
                format!("layer {} claims {} bytes", l.digest, l.size),
            ));
        }
    }
    let cfg = parse_config(&source.read_small(&config, MAX_CONFIG, "image config")?)?;
    if explicit && cfg.architecture != arch {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "Error validating architecture: manifest image architecture: \"{}\" doesn't match requested architecture: \"{arch}\"",
                cfg.architecture
            ),
        ));
    }
    let bootc = |k: &str| {
        cfg.labels
            .get(k)
            .is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
    };
    if bootc("containers.bootc") || bootc("ostree.bootable") {
        return Err(Error::new(
            ErrorKind::UnsupportedFormat,
            "bootc image detected: importing bootc/ostree images (containers.bootc=1 or ostree.bootable=1) is not yet implemented",
        ));
    }
    Ok(ContainerDisk {
        labels: env_to_labels(cfg.env.iter().map(String::as_str)),
        digest: cur.digest.to_string(),
        index_digest,
        architecture: cfg.architecture,
        env: cfg.env,
        config_labels: cfg.labels,
        layers,
        source,
    })
}

impl ContainerDisk {
    /// Stream the layers base first and return the first `disk*` regular file (CDI's rule:
    /// name prefix `disk` after a leading `./` or `/`, not a directory, not a whiteout) as a
    /// reader of exactly its bytes. Layers before it are read whole and verified; the
    /// disk's own layer is verified when the disk ends.
    pub fn disk(self) -> Result<DiskStream> {
        let kind = self.source.fail_kind();
        for l in &self.layers {
            if l.is_foreign() {
                continue;
            }
            let ctx = format!("cannot read layer {}", l.digest);
            let raw = SharedRaw(Arc::new(Mutex::new(Verified::new(
                self.source.open_blob(l)?,
                l,
            ))));
            let tar = layer_tar(raw.clone()).map_err(|e| map_io(&ctx, raw.explain(e), kind))?;
            let mut walker = TarReader::new(tar);
            match find_disk(&mut walker) {
                Ok(Some(e)) => {
                    return Ok(DiskStream {
                        name: e.path,
                        size: e.size,
                        layer_digest: l.digest.to_string(),
                        walker,
                        raw,
                        kind,
                        finished: false,
                    });
                }
                Ok(None) => raw.drain().map_err(|e| map_io(&ctx, e, kind))?,
                Err(e) => return Err(map_io(&ctx, raw.explain(e), kind)),
            }
        }
        Err(Error::new(ErrorKind::NotFound, NO_DISK_MESSAGE))
    }
}

/// The disk file of a containerDisk, streamed out of its layer. The layer's digest is checked
/// when the last byte of the disk is read: a mismatch fails that read instead of ending the
/// stream.
pub struct DiskStream {
    /// Entry name, without a leading `./` (normally `disk/<file>`).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Digest of the layer holding it.
    pub layer_digest: String,
    walker: TarReader<Box<dyn Read + Send>>,
    raw: SharedRaw,
    kind: ErrorKind,
    finished: bool,
}

impl std::fmt::Debug for DiskStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskStream")
            .field("name", &self.name)
            .field("size", &self.size)
            .field("layer_digest", &self.layer_digest)
            .finish()
    }
}

impl DiskStream {
    fn error(&self, e: io::Error) -> io::Error {
        let e = self.raw.explain(e);
        let kind = e.kind();
        let err = map_io(&format!("layer {}", self.layer_digest), e, self.kind);
        io::Error::new(kind, err)
    }
}

impl Read for DiskStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.finished || buf.is_empty() {
            return Ok(0);
        }
        let n = if self.walker.remaining() > 0 {
            self.walker.read(buf).map_err(|e| self.error(e))?
        } else {
            0
        };
        if self.walker.remaining() == 0 {
            // The disk ended: read the rest of its layer so its digest is checked before the
            // caller sees the end.
            self.raw.drain().map_err(|e| self.error(e))?;
            self.finished = true;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::tar::parse_number;
    use std::io::{BufRead, Write};
    use std::net::{TcpListener, TcpStream};

    // ---------------------------------------------------------------- tar crafting

    fn checksum(h: &mut [u8; 512]) {
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    }

    fn header(name: &str, size: u64, typeflag: u8) -> [u8; 512] {
        let mut h = [0u8; 512];
        let n = &name.as_bytes()[..name.len().min(100)];
        h[..n.len()].copy_from_slice(n);
        h[100..108].copy_from_slice(b"0000644\0");
        h[108..116].copy_from_slice(b"0000153\0");
        h[116..124].copy_from_slice(b"0000153\0");
        if size < 1 << 33 {
            h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        } else {
            h[124] = 0x80;
            h[128..136].copy_from_slice(&size.to_be_bytes());
        }
        h[136..148].copy_from_slice(b"00000000000\0");
        h[156] = typeflag;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        checksum(&mut h);
        h
    }

    fn pad(out: &mut Vec<u8>) {
        while out.len() % 512 != 0 {
            out.push(0);
        }
    }

    fn entry(out: &mut Vec<u8>, name: &str, data: &[u8], typeflag: u8) {
        out.extend_from_slice(&header(name, data.len() as u64, typeflag));
        out.extend_from_slice(data);
        pad(out);
    }

    fn pax(out: &mut Vec<u8>, records: &[(&str, &str)]) {
        let mut data = Vec::new();
        for (k, v) in records {
            let body = k.len() + v.len() + 3;
            let mut len = body + 1;
            while len != body + len.to_string().len() {
                len = body + len.to_string().len();
            }
            data.extend_from_slice(format!("{len} {k}={v}\n").as_bytes());
        }
        entry(out, "PaxHeaders/x", &data, b'x');
    }

    fn end(out: &mut Vec<u8>) {
        out.extend_from_slice(&[0u8; 1024]);
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
            .collect()
    }

    fn scan(tar: &[u8]) -> io::Result<Option<(Entry, Vec<u8>)>> {
        let mut w = TarReader::new(tar);
        let Some(e) = find_disk(&mut w)? else {
            return Ok(None);
        };
        let mut data = Vec::new();
        let mut buf = [0u8; 700];
        loop {
            let n = w.read(&mut buf)?;
            if n == 0 {
                break;
            }
            data.extend_from_slice(&buf[..n]);
        }
        Ok(Some((e, data)))
    }

    fn gzip(b: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    fn sha(b: &[u8]) -> String {
        Digest::of(Alg::Sha256, b).to_string()
    }

    // ---------------------------------------------------------------- pure parts

    #[test]
    fn references() {
        let r = ImageRef::parse("//fedora").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("docker.io", "library/fedora", Some("latest"))
        );
        assert_eq!(r.api_host(), "registry-1.docker.io");
        let r = ImageRef::parse("//quay.io/containerdisks/fedora:41").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.reference()),
            ("quay.io", "containerdisks/fedora", "41")
        );
        let r = ImageRef::parse("//host:5000/a/b:tag").unwrap();
        assert_eq!(
            (r.api_host(), r.repository.as_str(), r.reference()),
            ("host:5000", "a/b", "tag")
        );
        let r = ImageRef::parse("//localhost/x").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("localhost", "x")
        );
        let r = ImageRef::parse("//user/repo-a__b.c").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("docker.io", "user/repo-a__b.c")
        );
        let d = format!("sha256:{}", "ab".repeat(32));
        let r = ImageRef::parse(&format!("//index.docker.io/alpine@{d}")).unwrap();
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "library/alpine");
        assert_eq!((r.tag.as_deref(), r.reference()), (None, d.as_str()));
        assert_eq!(r.to_string(), format!("docker.io/library/alpine@{d}"));
        for bad in [
            "fedora".to_string(),
            "//".into(),
            "//Fedora".into(),
            "//a/b//c".into(),
            "//a-/b".into(),
            "//x:-tag".into(),
            "//x@sha256:abc".into(),
            format!("//x@sha256:{}", "AB".repeat(32)),
            format!("//x:tag@{d}"),
            "//x y".into(),
        ] {
            assert!(ImageRef::parse(&bad).is_err(), "{bad}");
        }
        for bad in [
            "http://x/y",
            "docker-archive:/x.tar",
            "nothing",
            "oci-archive:",
        ] {
            let e = open(bad, &RegistryOptions::default()).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}");
            assert!(e.to_string().contains("Invalid image name"), "{e}");
        }
    }

    #[test]
    fn labels_from_env() {
        let l = env_to_labels([
            "INSTANCETYPE_KUBEVIRT_IO_DEFAULT_PREFERENCE=fedora",
            "KUBEVIRT_IO_FOO=x",
            "PATH=/usr/bin",
            "NOVALUE_KUBEVIRT_IO_X",
            "A_B_KUBEVIRT_IO_C_D=v=w",
        ]);
        let want: BTreeMap<String, String> = [
            ("instancetype.kubevirt.io/default-preference", "fedora"),
            ("kubevirt.io/foo", "x"),
            ("a.b.kubevirt.io/c-d", "v=w"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(l, want);
        assert!(!host_architecture().is_empty());
    }

    #[test]
    fn auth_challenges() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(c[0].params["realm"], "https://auth.docker.io/token");
        assert_eq!(c[0].params["scope"], "repository:library/alpine:pull");
        let c = parse_challenges(r#"Basic realm="a \"b\"", Bearer realm=https://x/t,service=s"#);
        assert_eq!(c.len(), 2);
        assert_eq!(
            (c[0].scheme.as_str(), c[0].params["realm"].as_str()),
            ("basic", "a \"b\"")
        );
        assert_eq!(c[1].params["realm"], "https://x/t");
        assert_eq!(c[1].params["service"], "s");
        assert!(
            parse_challenges("\"\",,= =")
                .iter()
                .all(|c| c.params.is_empty())
        );
    }

    #[test]
    fn platform_choice() {
        let d = |arch: &str, variant: &str, mt: &str| {
            Descriptor::parse(&serde_json::json!({
                "mediaType": mt, "digest": sha(arch.as_bytes()), "size": 1,
                "platform": {"architecture": arch, "os": "linux", "variant": variant}
            }))
            .unwrap()
        };
        let list = vec![
            d("amd64", "v2", OCI_MANIFEST),
            d("arm64", "v8", "application/vnd.example.unknown"),
            d("arm64", "v8", OCI_MANIFEST),
            d("amd64", "", OCI_MANIFEST),
        ];
        let pick = |a: &str| select_platform(&list, a, true, true).map(|x| x.digest.to_string());
        assert_eq!(pick("amd64"), Some(sha(b"amd64")));
        assert_eq!(pick("arm64"), Some(sha(b"arm64")));
        assert_eq!(
            select_platform(&list[..1], "amd64", true, true).map(|_| ()),
            None
        );
        assert_eq!(pick("s390x"), None);
    }

    // ---------------------------------------------------------------- tar walker

    #[test]
    fn tar_finds_the_first_disk_file() {
        let disk = pattern(5, 1500);
        let mut t = Vec::new();
        entry(&mut t, "etc/hostname", b"host\n", b'0');
        entry(&mut t, "disk/", b"", b'5');
        entry(&mut t, "./disk/.wh.old.img", b"", b'0');
        entry(&mut t, "diskdir/", b"", b'0'); // old-style directory: trailing slash
        entry(&mut t, "./disk/x.img", &disk, b'0');
        entry(&mut t, "disk/second.img", b"no", b'0');
        end(&mut t);
        let (e, data) = scan(&t).unwrap().unwrap();
        assert_eq!((e.path.as_str(), e.size), ("disk/x.img", 1500));
        assert_eq!(data, disk);

        // A plain `disk` prefix is enough (CDI), and a leading '/' is stripped.
        let mut t = Vec::new();
        entry(&mut t, "/disk.qcow2", b"abc", b'0');
        end(&mut t);
        assert_eq!(scan(&t).unwrap().unwrap().0.path, "disk.qcow2");

        // No disk at all.
        let mut t = Vec::new();
        entry(&mut t, "etc/readme", b"hello", b'0');
        end(&mut t);
        assert!(scan(&t).unwrap().is_none());
        // A single zero block followed by the end of the stream also ends the archive.
        let mut t = Vec::new();
        entry(&mut t, "etc/readme", b"hello", b'0');
        t.extend_from_slice(&[0; 512]);
        assert!(scan(&t).unwrap().is_none());
    }

    #[test]
    fn tar_long_names_pax_and_base256() {
        let long = format!("disk/{}.qcow2", "a".repeat(150));
        let mut t = Vec::new();
        let mut l = long.as_bytes().to_vec();
        l.push(0);
        entry(&mut t, "././@LongLink", &l, b'L');
        entry(&mut t, &long[..100], b"long", b'0');
        end(&mut t);
        let (e, data) = scan(&t).unwrap().unwrap();
        assert_eq!(
            (e.path.as_str(), data.as_slice()),
            (long.as_str(), &b"long"[..])
        );

        // PAX path and size override the header's (size field 0 here).
        let mut t = Vec::new();
        pax(
            &mut t,
            &[("path", "disk/pax.img"), ("size", "5"), ("mtime", "1.5")],
        );
        let mut h = header("placeholder", 0, b'0');
        t.extend_from_slice(&h);
        t.extend_from_slice(b"12345");
        pad(&mut t);
        end(&mut t);
        let (e, data) = scan(&t).unwrap().unwrap();
        assert_eq!(
            (e.path.as_str(), data.as_slice()),
            ("disk/pax.img", &b"12345"[..])
        );

        // A base-256 size field.
        h = header("disk/b256.img", 0, b'0');
        h[124..136].copy_from_slice(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3]);
        checksum(&mut h);
        let mut t = h.to_vec();
        t.extend_from_slice(b"xyz");
        pad(&mut t);
        end(&mut t);
        assert_eq!(scan(&t).unwrap().unwrap().1, b"xyz");
        assert_eq!(
            parse_number(&[0x80, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0], "size").unwrap(),
            1 << 49
        );
        assert_eq!(parse_number(b"  0000017 \0", "size").unwrap(), 15);
        assert!(parse_number(&[0xff; 12], "size").is_err());
        assert!(
            parse_number(
                &[
                    0x80, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0
                ],
                "size"
            )
            .is_err()
        );
        assert!(parse_number(b"0000008\0", "size").is_err());

        // Links and other non-regular files named disk are refused.
        let mut t = Vec::new();
        entry(&mut t, "disk/link.img", b"", b'2');
        end(&mut t);
        let e = scan(&t).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
        assert!(e.to_string().contains("symbolic link"), "{e}");
        let mut t = Vec::new();
        entry(&mut t, "disk/../../etc/x", b"", b'0');
        end(&mut t);
        assert!(scan(&t).unwrap_err().to_string().contains("tainted"));
    }

    #[test]
    fn tar_hostile_headers_fail_cleanly() {
        let fails = |t: &[u8], what: &str| {
            let e = scan(t).expect_err(what);
            assert!(
                matches!(
                    e.kind(),
                    io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
                ),
                "{what}: {e}"
            );
        };
        // Garbage instead of a header.
        let garbage: Vec<u8> = (0..2048u32).map(|i| (i * 7 + 3) as u8).collect();
        fails(&garbage, "garbage");
        // A header cut off.
        let mut t = Vec::new();
        entry(&mut t, "etc/a", b"x", b'0');
        t.extend_from_slice(&header("disk/x", 10, b'0')[..300]);
        fails(&t, "cut header");
        // Data cut off while skipping an entry, and inside the disk.
        let mut t = header("etc/big", 10_000, b'0').to_vec();
        t.extend_from_slice(&[1; 100]);
        fails(&t, "cut data");
        let mut t = header("disk/x.img", 10_000, b'0').to_vec();
        t.extend_from_slice(&[1; 100]);
        fails(&t, "cut disk");
        // No end marker.
        let mut t = Vec::new();
        entry(&mut t, "etc/a", b"x", b'0');
        fails(&t, "no end");
        // Data after a single zero block.
        let mut t = vec![0u8; 512];
        t.extend_from_slice(&header("disk/x", 0, b'0'));
        fails(&t, "zero then header");
        // Huge metadata headers are refused before any allocation.
        fails(&header("x", 1 << 40, b'x'), "huge pax");
        fails(&header("x", 1 << 33, b'L'), "huge long name");
        // Malformed PAX records.
        for rec in [
            &b"99 path=x\n"[..],
            b"abc path=x\n",
            b"5 p\n",
            b"11 pathx=y\nzz",
        ] {
            let mut t = Vec::new();
            entry(&mut t, "PaxHeaders/x", rec, b'x');
            entry(&mut t, "disk/x", b"", b'0');
            end(&mut t);
            fails(&t, "bad pax");
        }
        // A metadata header with no entry after it.
        let mut t = Vec::new();
        pax(&mut t, &[("path", "disk/x")]);
        end(&mut t);
        fails(&t, "dangling pax");
        // An endless chain of metadata headers.
        let mut t = Vec::new();
        for _ in 0..40 {
            entry(&mut t, "././@LongLink", b"disk/x\0", b'L');
        }
        fails(&t, "metadata chain");
        // A bad checksum.
        let mut h = header("disk/x", 0, b'0');
        h[0] = b'D';
        fails(&h, "checksum");
    }

    // ---------------------------------------------------------------- fake registry

    /// Images for the fake registry and the archive test.
    struct Images {
        a: Vec<u8>,
        b: Vec<u8>,
        long_name: String,
        index: String,
        arm: String,
        amd: String,
        /// digest → bytes of every blob and manifest.
        blobs: BTreeMap<String, Vec<u8>>,
        /// digest → media type of manifests.
        manifests: BTreeMap<String, String>,
        /// tag → digest.
        tags: BTreeMap<String, String>,
        /// A layer served with one byte changed.
        corrupt_layer: String,
        /// A layer served through a redirect to another host.
        redirected_layer: String,
        /// A layer whose first download breaks off halfway.
        flaky_layer: String,
    }

    impl Images {
        fn put(&mut self, bytes: Vec<u8>) -> serde_json::Value {
            let d = sha(&bytes);
            let n = bytes.len();
            self.blobs.insert(d.clone(), bytes);
            serde_json::json!({"digest": d, "size": n})
        }

        fn desc(&mut self, mt: &str, bytes: Vec<u8>) -> serde_json::Value {
            let mut v = self.put(bytes);
            v["mediaType"] = mt.into();
            v
        }

        fn manifest(&mut self, v: serde_json::Value) -> serde_json::Value {
            let mt = v["mediaType"].as_str().unwrap().to_string();
            let d = self.desc(&mt, serde_json::to_vec_pretty(&v).unwrap());
            self.manifests
                .insert(d["digest"].as_str().unwrap().into(), mt);
            d
        }

        fn build() -> Images {
            let mut im = Images {
                a: pattern(1, 3000),
                b: pattern(7, 70_000),
                long_name: format!("disk/{}.qcow2", "a".repeat(120)),
                index: String::new(),
                arm: String::new(),
                amd: String::new(),
                blobs: BTreeMap::new(),
                manifests: BTreeMap::new(),
                tags: BTreeMap::new(),
                corrupt_layer: String::new(),
                redirected_layer: String::new(),
                flaky_layer: String::new(),
            };
            let gz = "application/vnd.oci.image.layer.v1.tar+gzip";
            // amd64: one gzip layer, Docker media types.
            let mut t = Vec::new();
            entry(&mut t, "disk/", b"", b'5');
            entry(&mut t, "disk/disk.img", &im.a.clone(), b'0');
            end(&mut t);
            let amd_layer = im.desc(
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
                gzip(&t),
            );
            let amd_cfg = serde_json::json!({"architecture": "amd64", "os": "linux",
                "config": {"Env": ["KUBEVIRT_IO_FOO=x"], "Labels": null},
                "rootfs": {"type": "layers", "diff_ids": []}});
            let amd_cfg = im.desc(DOCKER_CONFIG, serde_json::to_vec(&amd_cfg).unwrap());
            let amd = im.manifest(
                serde_json::json!({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
                "config": amd_cfg, "layers": [amd_layer.clone()]}),
            );
            // arm64: a gzip base layer without the disk, then a zstd layer with it.
            let mut t = Vec::new();
            entry(&mut t, "etc/hostname", b"fake\n", b'0');
            entry(&mut t, "./disk/", b"", b'5');
            entry(&mut t, "disk/.wh.old.img", b"", b'0');
            end(&mut t);
            let l1 = im.desc(gz, gzip(&t));
            im.flaky_layer = l1["digest"].as_str().unwrap().into();
            let mut t = Vec::new();
            let mut l = im.long_name.as_bytes().to_vec();
            l.push(0);
            entry(&mut t, "././@LongLink", &l, b'L');
            entry(&mut t, &im.long_name.clone()[..100], &im.b.clone(), b'0');
            entry(&mut t, "zzz/after", &pattern(3, 3000), b'0');
            end(&mut t);
            let l2 = im.desc(
                "application/vnd.oci.image.layer.v1.tar+zstd",
                zstd::encode_all(&t[..], 3).unwrap(),
            );
            im.redirected_layer = l2["digest"].as_str().unwrap().into();
            let arm_cfg = serde_json::json!({"architecture": "arm64", "os": "linux", "variant": "v8",
                "config": {"Env": ["PATH=/bin", "INSTANCETYPE_KUBEVIRT_IO_DEFAULT_PREFERENCE=fedora"],
                           "Labels": {"shasum": "x"}},
                "rootfs": {"type": "layers", "diff_ids": []}});
            let arm_cfg = im.desc(OCI_CONFIG, serde_json::to_vec(&arm_cfg).unwrap());
            let arm = im.manifest(
                serde_json::json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": arm_cfg, "layers": [l1, l2]}),
            );
            // The multi-arch index, with an attestation-like entry.
            let mut e_amd = amd.clone();
            e_amd["platform"] = serde_json::json!({"architecture": "amd64", "os": "linux"});
            let mut e_arm = arm.clone();
            e_arm["platform"] =
                serde_json::json!({"architecture": "arm64", "os": "linux", "variant": "v8"});
            let mut e_att = amd.clone();
            e_att["platform"] = serde_json::json!({"architecture": "unknown", "os": "unknown"});
            let index = im.manifest(
                serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX,
                "manifests": [e_att, e_amd, e_arm]}),
            );
            // A bootc image.
            let bootc_cfg = serde_json::json!({"architecture": "amd64", "os": "linux",
                "config": {"Labels": {"containers.bootc": "1"}},
                "rootfs": {"type": "layers", "diff_ids": []}});
            let bootc_cfg = im.desc(OCI_CONFIG, serde_json::to_vec(&bootc_cfg).unwrap());
            let bootc = im.manifest(
                serde_json::json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": bootc_cfg, "layers": [amd_layer]}),
            );
            // An image whose layer is served corrupted.
            let mut t = Vec::new();
            entry(&mut t, "disk/c.img", &pattern(9, 20_000), b'0');
            end(&mut t);
            let bad = im.desc(gz, gzip(&t));
            im.corrupt_layer = bad["digest"].as_str().unwrap().into();
            let corrupt = im.manifest(
                serde_json::json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": amd_cfg, "layers": [bad]}),
            );
            let name = |v: &serde_json::Value| v["digest"].as_str().unwrap().to_string();
            im.tags.insert("latest".into(), name(&index));
            im.tags.insert("single".into(), name(&amd));
            im.tags.insert("bootc".into(), name(&bootc));
            im.tags.insert("corrupt".into(), name(&corrupt));
            im.index = name(&index);
            im.arm = name(&arm);
            im.amd = name(&amd);
            im
        }
    }

    type Reply = (u16, Vec<(String, String)>, Vec<u8>);
    type Handler = Arc<dyn Fn(&str, &[(String, String)]) -> Reply + Send + Sync>;

    /// Serve HTTP/1.1 on 127.0.0.1, one request per connection (`Connection: close`);
    /// connections that do not start with a method (a TLS hello) are dropped.
    fn serve(l: TcpListener, h: Handler) {
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                let h = h.clone();
                std::thread::spawn(move || answer(s, &h));
            }
        });
    }

    fn answer(mut s: TcpStream, h: &Handler) {
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let mut first = [0u8; 1];
        if !matches!(s.peek(&mut first), Ok(1)) || !first[0].is_ascii_uppercase() {
            return;
        }
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        if r.read_line(&mut line).is_err() {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut headers = Vec::new();
        loop {
            let mut l = String::new();
            if r.read_line(&mut l).unwrap_or(0) == 0 || l == "\r\n" {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let (status, hs, body) = h(&path, &headers);
        let mut out = format!("HTTP/1.1 {status} X\r\nConnection: close\r\n");
        if header_of(&hs, "content-length").is_none() {
            out += &format!("Content-Length: {}\r\n", body.len());
        }
        for (k, v) in hs {
            out += &format!("{k}: {v}\r\n");
        }
        out += "\r\n";
        let _ = s.write_all(out.as_bytes());
        let _ = s.write_all(&body);
    }

    fn header_of<'a>(hs: &'a [(String, String)], name: &str) -> Option<&'a str> {
        hs.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    struct Fake {
        port: u16,
        im: Arc<Images>,
        tokens: Arc<Mutex<u32>>,
        resumed: Arc<Mutex<u32>>,
    }

    /// A registry that requires a Bearer token from its own token endpoint (credentials
    /// `u:p` for `private/…`), serving `disks/x` and `private/y`; one layer's blob redirects
    /// to a second server that refuses requests carrying `Authorization`.
    fn fake_registry() -> Fake {
        let im = Arc::new(Images::build());
        let storage = TcpListener::bind("127.0.0.1:0").unwrap();
        let sport = storage.local_addr().unwrap().port();
        let im2 = im.clone();
        serve(
            storage,
            Arc::new(move |path, hs| {
                if header_of(hs, "authorization").is_some() {
                    return (400, vec![], b"Authorization leaked to storage".to_vec());
                }
                let d = path.trim_start_matches("/storage/");
                match im2.blobs.get(d) {
                    Some(b) => (200, vec![], b.clone()),
                    None => (404, vec![], vec![]),
                }
            }),
        );
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let tokens = Arc::new(Mutex::new(0));
        let resumed = Arc::new(Mutex::new(0));
        let (im3, tokens2, resumed2) = (im.clone(), tokens.clone(), resumed.clone());
        let dropped = Arc::new(Mutex::new(false));
        serve(
            l,
            Arc::new(move |path, hs| {
                let im = &im3;
                let json = |s: u16, v: serde_json::Value| {
                    (
                        s,
                        vec![("Content-Type".into(), "application/json".into())],
                        serde_json::to_vec(&v).unwrap(),
                    )
                };
                if let Some(q) = path.strip_prefix("/token?") {
                    *lock(&tokens2) += 1;
                    assert!(q.contains("service=fake-registry"), "{q}");
                    if q.contains("private%2Fy") {
                        if header_of(hs, "authorization") != Some("Basic dTpw") {
                            return json(401, serde_json::json!({"details": "bad credentials"}));
                        }
                        return json(200, serde_json::json!({"access_token": "good"}));
                    }
                    return json(200, serde_json::json!({"token": "good", "expires_in": 300}));
                }
                let Some(rest) = path.strip_prefix("/v2/") else {
                    return (404, vec![], vec![]);
                };
                let (repo, kind, reference) = if let Some((r, x)) = rest.rsplit_once("/manifests/")
                {
                    (r, "m", x)
                } else if let Some((r, x)) = rest.rsplit_once("/blobs/") {
                    (r, "b", x)
                } else {
                    ("", "", "")
                };
                if header_of(hs, "authorization") != Some("Bearer good") {
                    let mut c = format!(
                        "Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"fake-registry\""
                    );
                    if !repo.is_empty() {
                        c += &format!(",scope=\"repository:{repo}:pull\"");
                    }
                    let mut r = json(
                        401,
                        serde_json::json!({"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}),
                    );
                    r.1.push(("WWW-Authenticate".into(), c));
                    return r;
                }
                if rest.is_empty() {
                    return json(200, serde_json::json!({}));
                }
                if repo != "disks/x" && repo != "private/y" {
                    return json(
                        404,
                        serde_json::json!({"errors": [{"code": "NAME_UNKNOWN", "message": "no such repository"}]}),
                    );
                }
                let digest = im.tags.get(reference).map_or(reference, String::as_str);
                let not_found = json(
                    404,
                    serde_json::json!({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}),
                );
                match kind {
                    "m" => match (im.manifests.get(digest), im.blobs.get(digest)) {
                        (Some(mt), Some(b)) => {
                            assert!(header_of(hs, "accept").unwrap().contains(OCI_INDEX));
                            (
                                200,
                                vec![
                                    ("Content-Type".into(), mt.clone()),
                                    ("Docker-Content-Digest".into(), digest.into()),
                                ],
                                b.clone(),
                            )
                        }
                        _ => not_found,
                    },
                    "b" if digest == im.redirected_layer => (
                        307,
                        vec![(
                            "Location".into(),
                            format!("http://127.0.0.1:{sport}/storage/{digest}"),
                        )],
                        vec![],
                    ),
                    "b" => match im.blobs.get(digest) {
                        Some(b) if digest == im.flaky_layer => {
                            let n = b.len();
                            if let Some(r) = header_of(hs, "range") {
                                *lock(&resumed2) += 1;
                                let start: usize = r
                                    .trim_start_matches("bytes=")
                                    .trim_end_matches('-')
                                    .parse()
                                    .unwrap();
                                let cr = format!("bytes {start}-{}/{n}", n - 1);
                                (206, vec![("Content-Range".into(), cr)], b[start..].to_vec())
                            } else if !std::mem::replace(&mut *lock(&dropped), true) {
                                let hs = vec![
                                    ("Content-Length".into(), n.to_string()),
                                    ("Accept-Ranges".into(), "bytes".into()),
                                ];
                                (200, hs, b[..n / 2].to_vec())
                            } else {
                                (200, vec![], b.clone())
                            }
                        }
                        Some(b) => {
                            let mut b = b.clone();
                            if digest == im.corrupt_layer {
                                let i = b.len() / 2;
                                b[i] ^= 0x40;
                            }
                            (200, vec![], b)
                        }
                        None => not_found,
                    },
                    _ => not_found,
                }
            }),
        );
        Fake {
            port,
            im,
            tokens,
            resumed,
        }
    }

    fn opts(arch: &str) -> RegistryOptions {
        RegistryOptions {
            insecure: true,
            architecture: (!arch.is_empty()).then(|| arch.to_string()),
            ..RegistryOptions::default()
        }
    }

    /// What a pull gave: the opened image's fields, the disk's name and bytes.
    struct Pulled {
        digest: String,
        index_digest: Option<String>,
        architecture: String,
        labels: BTreeMap<String, String>,
        name: String,
        data: Vec<u8>,
    }

    fn pull(endpoint: &str, o: &RegistryOptions) -> Result<Pulled> {
        let c = open(endpoint, o)?;
        let (digest, index_digest) = (c.digest.clone(), c.index_digest.clone());
        let (architecture, labels) = (c.architecture.clone(), c.labels.clone());
        let mut d = c.disk()?;
        let mut data = Vec::new();
        d.read_to_end(&mut data).map_err(|e| Error::io("read", e))?;
        assert_eq!(data.len() as u64, d.size);
        Ok(Pulled {
            digest,
            index_digest,
            architecture,
            labels,
            name: d.name.clone(),
            data,
        })
    }

    #[test]
    fn registry_pull_multi_arch() {
        let f = fake_registry();
        let url = format!("docker://127.0.0.1:{}/disks/x:latest", f.port);
        let c = pull(&url, &opts("arm64")).unwrap();
        assert_eq!(c.name, f.im.long_name);
        assert!(c.data == f.im.b, "arm64 disk bytes differ");
        assert_eq!(c.digest, f.im.arm);
        assert_eq!(c.index_digest.as_deref(), Some(f.im.index.as_str()));
        assert_eq!(c.architecture, "arm64");
        assert_eq!(
            c.labels
                .get("instancetype.kubevirt.io/default-preference")
                .map(String::as_str),
            Some("fedora")
        );
        assert_eq!(c.labels.len(), 1);
        assert_eq!(*lock(&f.tokens), 1, "the token is cached");
        assert_eq!(*lock(&f.resumed), 1, "the broken download resumed");

        let c = pull(&url, &opts("amd64")).unwrap();
        assert_eq!(
            (c.name.as_str(), c.digest.as_str()),
            ("disk/disk.img", f.im.amd.as_str())
        );
        assert!(c.data == f.im.a);
        assert_eq!(
            c.labels.get("kubevirt.io/foo").map(String::as_str),
            Some("x")
        );

        // By digest: the index, and a platform manifest directly.
        let by = format!("docker://127.0.0.1:{}/disks/x@{}", f.port, f.im.index);
        assert!(pull(&by, &opts("arm64")).unwrap().data == f.im.b);
        let by = format!("docker://127.0.0.1:{}/disks/x@{}", f.port, f.im.amd);
        assert_eq!(pull(&by, &opts("")).unwrap().name, "disk/disk.img");
        let missing = format!("docker://127.0.0.1:{}/disks/x@{}", f.port, sha(b"none"));
        assert_eq!(
            open(&missing, &opts("")).unwrap_err().kind(),
            ErrorKind::NotFound
        );
        let missing = format!("docker://127.0.0.1:{}/disks/x:nope", f.port);
        let e = open(&missing, &opts("")).unwrap_err();
        assert!(e.to_string().contains("MANIFEST_UNKNOWN"), "{e}");

        // Wrong architecture: not in the index, and a single-arch image.
        for (tag, arch) in [("latest", "s390x"), ("single", "arm64")] {
            let u = format!("docker://127.0.0.1:{}/disks/x:{tag}", f.port);
            let e = open(&u, &opts(arch)).unwrap_err();
            assert!(
                e.to_string().contains("Error validating architecture"),
                "{e}"
            );
        }
        // Without an explicit architecture a single-arch image is taken as it is.
        let u = format!("docker://127.0.0.1:{}/disks/x:single", f.port);
        assert!(pull(&u, &opts("")).unwrap().data == f.im.a);

        // Without INSECURE_TLS there is no plain-HTTP fallback.
        let e = open(&u, &RegistryOptions::default()).unwrap_err();
        assert!(e.to_string().contains("cannot reach registry"), "{e}");
    }

    #[test]
    fn registry_refusals_and_corruption() {
        let f = fake_registry();
        let u = format!("docker://127.0.0.1:{}/disks/x:bootc", f.port);
        let e = open(&u, &opts("amd64")).unwrap_err();
        assert!(e.to_string().contains("bootc"), "{e}");

        let u = format!("docker://127.0.0.1:{}/disks/x:corrupt", f.port);
        let e = pull(&u, &opts("amd64")).map(|_| ()).unwrap_err();
        assert!(e.to_string().contains("does not match its digest"), "{e}");

        // Credentials: the token service refuses anonymous pulls of private/y.
        let u = format!("docker://127.0.0.1:{}/private/y:single", f.port);
        let e = open(&u, &opts("")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Denied);
        assert!(e.to_string().contains("requires authentication"), "{e}");
        let mut o = opts("");
        o.credentials = Some(("u".into(), "wrong".into()));
        assert!(
            open(&u, &o)
                .unwrap_err()
                .to_string()
                .contains("rejected the credentials")
        );
        o.credentials = Some(("u".into(), "p".into()));
        assert!(pull(&u, &o).unwrap().data == f.im.a);
    }

    #[test]
    fn oci_archive_pull() {
        let im = Images::build();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.tar");
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [
            {"mediaType": OCI_INDEX, "digest": im.index, "size": im.blobs[&im.index].len(),
             "annotations": {REF_NAME_ANNOTATION: "latest"}},
            {"mediaType": DOCKER_MANIFEST, "digest": im.amd, "size": im.blobs[&im.amd].len(),
             "annotations": {REF_NAME_ANNOTATION: "amd"}}]});
        let mut t = Vec::new();
        entry(&mut t, "./", b"", b'5');
        entry(
            &mut t,
            "./oci-layout",
            br#"{"imageLayoutVersion":"1.0.0"}"#,
            b'0',
        );
        entry(
            &mut t,
            "./index.json",
            &serde_json::to_vec(&index).unwrap(),
            b'0',
        );
        entry(&mut t, "./blobs/", b"", b'5');
        entry(&mut t, "./blobs/sha256/", b"", b'5');
        let mut layer_at = 0;
        for (d, b) in &im.blobs {
            entry(&mut t, &format!("./blobs/sha256/{}", &d[7..]), b, b'0');
            if *d == im.redirected_layer {
                layer_at = t.len() - 512;
            }
        }
        end(&mut t);
        std::fs::write(&path, &t).unwrap();
        let ep = |r: &str| format!("oci-archive:{}{r}", path.display());

        let c = pull(&ep(":latest"), &opts("arm64")).unwrap();
        assert_eq!(
            (c.name.as_str(), c.digest.as_str()),
            (im.long_name.as_str(), im.arm.as_str())
        );
        assert!(c.data == im.b);
        assert_eq!(c.index_digest.as_deref(), Some(im.index.as_str()));
        assert!(pull(&ep(":latest"), &opts("amd64")).unwrap().data == im.a);
        assert!(pull(&ep(":amd"), &opts("")).unwrap().data == im.a);
        let e = open(&ep(":latest"), &opts("ppc64le")).unwrap_err();
        assert!(
            e.to_string().contains("Error validating architecture"),
            "{e}"
        );
        assert_eq!(
            open(&ep(":nope"), &opts("")).unwrap_err().kind(),
            ErrorKind::NotFound
        );
        // Without a name: the first image.
        assert!(pull(&ep(""), &opts("arm64")).unwrap().data == im.b);

        // A changed byte inside a layer is caught by its digest.
        t[layer_at - 100] ^= 1;
        std::fs::write(&path, &t).unwrap();
        let e = pull(&ep(":latest"), &opts("arm64"))
            .map(|_| ())
            .unwrap_err();
        assert!(e.to_string().contains("does not match its digest"), "{e}");

        // Not a tar, and a missing file.
        std::fs::write(&path, b"definitely not a tar archive").unwrap();
        assert!(open(&ep(""), &opts("")).is_err());
        let e = open(
            &format!("oci-archive:{}/missing.tar", dir.path().display()),
            &opts(""),
        );
        assert_eq!(e.unwrap_err().kind(), ErrorKind::NotFound);
    }
}
