//! CDI's `cdi-source-update-poller` (in the importer image): the DataImportCron's CronJob runs
//! it to look up the digest a registry tag points at now, and records it on the DataImportCron
//! so the controller imports the new image when it changed. The binary of the same name only
//! wires this to the process.
//!
//! Command line (Go `flag` syntax, klog flags accepted), as CDI's:
//! - `-url docker://registry/repo:tag`, `-ns NAMESPACE`, `-cron NAME` (all mandatory);
//! - `-kubeconfig FILE` (default `$KUBECONFIG`'s first file; kubeconfigs are not merged),
//!   `-server URL` (the API server; without a
//!   kubeconfig the in-cluster one, `KUBERNETES_SERVICE_HOST`/`_PORT`);
//! - `-certdir DIR`: CA certificates for the registry (with the proxy CAs of `/proxycerts`).
//!
//! Registry credentials and TLS come from the environment as for CDI's poller and importer:
//! `IMPORTER_ACCESS_KEY_ID` / `IMPORTER_SECRET_KEY` (used when both are set) and
//! `INSECURE_TLS`. `-accessKey`, `-secretKey` (values) and `-insecure` are accepted as well
//! and take precedence.
//!
//! The digest is the registry's for the manifest the tag names (for a multi-platform image,
//! the index's: `skopeo inspect`'s `Digest`). The DataImportCron
//! (`/apis/cdi.kubevirt.io/v1beta1/namespaces/NS/dataimportcrons/NAME`) gets a JSON merge patch
//! setting the annotations `cdi.kubevirt.io/storage.import.sourceDesiredDigest` and
//! `cdi.kubevirt.io/storage.import.lastCronTime` (RFC 3339, UTC), as CDI's poller sets them;
//! a merge patch also works when the object has no annotations yet and needs no prior GET.
//!
//! The API server is reached with the service-account token and CA
//! (`/var/run/secrets/kubernetes.io/serviceaccount/{token,ca.crt}`, under `VDISK_ROOT` for
//! tests), or what a kubeconfig names: `server`, `certificate-authority(-data)`,
//! `insecure-skip-tls-verify`, `token`/`tokenFile`, `client-certificate(-data)` and
//! `client-key(-data)` of the current context. Never through a proxy, as CDI's.

use super::Paths;
use super::klog::{GoFlags, Logger};
use crate::error::{Error, ErrorKind, Result};
use crate::net::http::{Client, ClientConfig, Proxy};
use crate::net::registry::RegistryOptions;
use base64::Engine as _;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The service account's directory in a pod.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The annotation holding the digest the cron wants imported.
pub const ANN_SOURCE_DESIRED_DIGEST: &str = "cdi.kubevirt.io/storage.import.sourceDesiredDigest";
/// The annotation holding the poller's last run.
pub const ANN_LAST_CRON_TIME: &str = "cdi.kubevirt.io/storage.import.lastCronTime";
/// User agent for the registry and the API server.
pub const USER_AGENT: &str = "cdi-source-update-poller";
/// Largest API-server answer read (for its error message).
const MAX_API_BODY: usize = 1 << 20;

/// The parsed command line and environment.
#[derive(Debug, Clone)]
pub struct Options {
    /// `-kubeconfig` or `$KUBECONFIG`.
    pub kubeconfig: Option<String>,
    /// `-server`.
    pub server: Option<String>,
    /// `-ns`.
    pub namespace: String,
    /// `-cron`.
    pub cron: String,
    /// `-url`.
    pub url: String,
    /// `-certdir`.
    pub cert_dir: Option<String>,
    /// Registry username and password.
    pub credentials: Option<(String, String)>,
    /// Skip TLS verification for the registry.
    pub insecure: bool,
    /// A logger at the `-v` verbosity.
    pub logger: Logger,
}

const VALUE_FLAGS: &[&str] = &[
    "kubeconfig",
    "server",
    "ns",
    "cron",
    "url",
    "certdir",
    "accessKey",
    "secretKey",
];

/// A Kubernetes object name or namespace: DNS-1123 characters only, so it is safe in a path.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

impl Options {
    /// Parse the arguments (the program name excluded), reading the rest from the environment
    /// through `env` (`None` for unset or empty).
    pub fn parse<S: AsRef<str>>(
        args: &[S],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> std::result::Result<Options, String> {
        let f = GoFlags::parse(args, VALUE_FLAGS, &["insecure"])?;
        let get = |n: &str| f.get(n).filter(|v| !v.is_empty()).map(str::to_string);
        let (Some(url), Some(namespace), Some(cron)) = (get("url"), get("ns"), get("cron")) else {
            return Err("One or more mandatory parameters are missing (-url, -ns, -cron)".into());
        };
        for (what, v) in [("namespace", &namespace), ("DataImportCron name", &cron)] {
            if !valid_name(v) {
                return Err(format!("invalid {what} '{}'", v.escape_debug()));
            }
        }
        let user = get("accessKey").or_else(|| env("IMPORTER_ACCESS_KEY_ID"));
        let pass = get("secretKey").or_else(|| env("IMPORTER_SECRET_KEY"));
        let insecure = if f.get("insecure").is_some() {
            f.bool("insecure")
        } else {
            env("INSECURE_TLS")
                .and_then(|v| super::parse_go_bool(&v))
                .unwrap_or(false)
        };
        Ok(Options {
            // $KUBECONFIG may list several files; the first one names the context here.
            kubeconfig: get("kubeconfig").or_else(|| {
                env("KUBECONFIG")
                    .and_then(|k| k.split(':').find(|p| !p.is_empty()).map(str::to_string))
            }),
            server: get("server"),
            namespace,
            cron,
            url,
            cert_dir: get("certdir"),
            credentials: user.zip(pass),
            insecure,
            logger: f.logger(),
        })
    }
}

/// How to reach the API server.
#[derive(Clone, Default)]
pub struct ApiServer {
    /// Base URL (`https://host:port`).
    pub server: String,
    /// Bearer token.
    pub token: Option<String>,
    /// CA certificates (PEM).
    pub ca_pem: Vec<Vec<u8>>,
    /// Client certificate and key (PEM).
    pub client_cert: Option<(Vec<u8>, Vec<u8>)>,
    /// Skip TLS verification.
    pub insecure: bool,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("server", &self.server)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("ca_pem", &self.ca_pem.len())
            .field("client_cert", &self.client_cert.is_some())
            .field("insecure", &self.insecure)
            .finish()
    }
}

fn read_small(path: &Path, what: &str) -> Result<Vec<u8>> {
    super::read_config_file(path)
        .map_err(|e| Error::io(format!("cannot read the {what}"), e).with_path(path))
}

fn token_from(bytes: &[u8]) -> Option<String> {
    let t = String::from_utf8_lossy(bytes).trim().to_string();
    (!t.is_empty() && t.bytes().all(|b| b > b' ' && b != 0x7f)).then_some(t)
}

impl ApiServer {
    /// The API server of `opts`: a kubeconfig's current context when one is named, else the
    /// in-cluster service account; `-server` replaces the server URL in both cases.
    pub fn resolve(opts: &Options, paths: &Paths) -> Result<ApiServer> {
        let mut api = match &opts.kubeconfig {
            Some(k) => from_kubeconfig(&paths.relocate(k))?,
            None => in_cluster(paths, opts.server.is_some())?,
        };
        if let Some(s) = &opts.server {
            api.server = s.trim_end_matches('/').to_string();
        }
        if api.server.is_empty() {
            return Err(Error::invalid(
                "no API server: give -server or -kubeconfig, or run in a pod (KUBERNETES_SERVICE_HOST)",
            ));
        }
        Ok(api)
    }
}

/// The pod's service account. Without `KUBERNETES_SERVICE_HOST` the server is left empty
/// (then `-server` must name it); a missing token is an error only when nothing else says
/// where the server is.
fn in_cluster(paths: &Paths, have_server: bool) -> Result<ApiServer> {
    let dir = paths.get(SERVICE_ACCOUNT_DIR);
    let mut api = ApiServer::default();
    match read_small(&dir.join("token"), "service-account token") {
        Ok(t) => api.token = token_from(&t),
        Err(e) if !have_server => return Err(e),
        Err(_) => {}
    }
    if let Ok(ca) = super::read_config_file(&dir.join("ca.crt")) {
        api.ca_pem.push(ca);
    }
    if let (Some(h), Some(p)) = (
        super::env("KUBERNETES_SERVICE_HOST"),
        super::env("KUBERNETES_SERVICE_PORT"),
    ) {
        api.server = if h.contains(':') {
            format!("https://[{h}]:{p}")
        } else {
            format!("https://{h}:{p}")
        };
    }
    Ok(api)
}

/// The entry named `name` of the kubeconfig list `list` (`clusters`, `users`, `contexts`),
/// its inner object under `field`.
fn named<'a>(cfg: &'a Value, list: &str, name: &str, field: &str) -> Option<&'a Value> {
    cfg.get(list)?
        .as_array()?
        .iter()
        .find(|e| e.get("name").and_then(Value::as_str) == Some(name))?
        .get(field)
}

fn from_kubeconfig(path: &Path) -> Result<ApiServer> {
    let text = String::from_utf8(read_small(path, "kubeconfig")?)
        .map_err(|_| Error::invalid("the kubeconfig is not UTF-8").with_path(path))?;
    let cfg = parse_yaml(&text).map_err(|e| e.with_path(path))?;
    let bad = |why: String| Error::invalid(format!("kubeconfig: {why}")).with_path(path);
    let s = |v: Option<&Value>, k: &str| {
        v.and_then(|v| v.get(k))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let ctx_name = match cfg.get("current-context").and_then(Value::as_str) {
        Some(c) if !c.is_empty() => c.to_string(),
        _ => match cfg
            .get("contexts")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
        {
            Some([one]) => one
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            _ => return Err(bad("no current-context".into())),
        },
    };
    let ctx = named(&cfg, "contexts", &ctx_name, "context")
        .ok_or_else(|| bad(format!("context '{ctx_name}' not found")))?;
    let cluster_name = s(Some(ctx), "cluster").unwrap_or_default();
    let cluster = named(&cfg, "clusters", &cluster_name, "cluster")
        .ok_or_else(|| bad(format!("cluster '{cluster_name}' not found")))?;
    let user = s(Some(ctx), "user").and_then(|u| named(&cfg, "users", &u, "user"));
    let dir = path.parent().unwrap_or(Path::new("."));
    let file = |p: String| -> PathBuf { dir.join(p) };
    let b64 = |v: String, what: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(v.trim())
            .map_err(|e| bad(format!("{what} is not base64: {e}")))
    };
    let mut api = ApiServer {
        server: s(Some(cluster), "server")
            .unwrap_or_default()
            .trim_end_matches('/')
            .to_string(),
        insecure: cluster
            .get("insecure-skip-tls-verify")
            .is_some_and(|v| v.as_bool() == Some(true) || v.as_str() == Some("true")),
        ..ApiServer::default()
    };
    if let Some(d) = s(Some(cluster), "certificate-authority-data") {
        api.ca_pem.push(b64(d, "certificate-authority-data")?);
    } else if let Some(f) = s(Some(cluster), "certificate-authority") {
        api.ca_pem.push(read_small(&file(f), "kubeconfig CA")?);
    }
    if let Some(t) = s(user, "token") {
        api.token = Some(t);
    } else if let Some(f) = s(user, "tokenFile") {
        api.token = token_from(&read_small(&file(f), "kubeconfig token file")?);
    }
    let cert = match (
        s(user, "client-certificate-data"),
        s(user, "client-certificate"),
    ) {
        (Some(d), _) => Some(b64(d, "client-certificate-data")?),
        (None, Some(f)) => Some(read_small(&file(f), "client certificate")?),
        _ => None,
    };
    let key = match (s(user, "client-key-data"), s(user, "client-key")) {
        (Some(d), _) => Some(b64(d, "client-key-data")?),
        (None, Some(f)) => Some(read_small(&file(f), "client key")?),
        _ => None,
    };
    api.client_cert = cert.zip(key);
    Ok(api)
}

/// A kubeconfig: JSON, or the block-style YAML subset kubeconfigs are written in (mappings,
/// sequences of mappings, plain and quoted scalars, comments). Scalars stay strings.
pub fn parse_yaml(text: &str) -> Result<Value> {
    if text.trim_start().starts_with('{') {
        return serde_json::from_str(text)
            .map_err(|e| Error::invalid(format!("kubeconfig is not valid JSON: {e}")));
    }
    let mut lines: Vec<(usize, String)> = text
        .lines()
        .filter_map(|l| {
            let body = l.trim_end();
            let t = body.trim_start();
            if t.is_empty() || t.starts_with('#') || t == "---" {
                return None;
            }
            Some((body.len() - t.len(), t.to_string()))
        })
        .collect();
    if lines.is_empty() {
        return Ok(Value::Object(Map::new()));
    }
    let mut i = 0;
    let indent = lines[0].0;
    let v = yaml_block(&mut lines, &mut i, indent)?;
    if i < lines.len() {
        return Err(Error::invalid(format!(
            "kubeconfig: cannot read line '{}'",
            lines[i].1
        )));
    }
    Ok(v)
}

fn is_item(t: &str) -> bool {
    t == "-" || t.starts_with("- ")
}

fn yaml_scalar(s: &str) -> Value {
    let s = s.trim();
    let unquoted = if s.len() >= 2 && s.starts_with('"') && s.ends_with('"') {
        serde_json::from_str::<String>(s).unwrap_or_else(|_| s[1..s.len() - 1].to_string())
    } else if s.len() >= 2 && s.starts_with('\'') && s.ends_with('\'') {
        s[1..s.len() - 1].replace("''", "'")
    } else {
        match s {
            "[]" => return Value::Array(Vec::new()),
            "{}" => return Value::Object(Map::new()),
            "null" | "~" => return Value::Null,
            "true" => return Value::Bool(true),
            "false" => return Value::Bool(false),
            _ => {}
        }
        // A comment after a plain scalar.
        s.split_once(" #")
            .map_or(s, |(v, _)| v.trim_end())
            .to_string()
    };
    Value::String(unquoted)
}

fn yaml_block(lines: &mut [(usize, String)], i: &mut usize, indent: usize) -> Result<Value> {
    if *i < lines.len() && is_item(&lines[*i].1) {
        let mut seq = Vec::new();
        while *i < lines.len() && lines[*i].0 == indent && is_item(&lines[*i].1) {
            let rest = lines[*i].1[1..].trim_start().to_string();
            if rest.is_empty() {
                *i += 1;
                if *i < lines.len() && lines[*i].0 > indent {
                    let child = lines[*i].0;
                    seq.push(yaml_block(lines, i, child)?);
                } else {
                    seq.push(Value::Null);
                }
                continue;
            }
            // "- key: v": the item is a block starting at the column after the dash.
            let col = indent + (lines[*i].1.len() - rest.len());
            if rest.contains(": ") || rest.ends_with(':') || is_item(&rest) {
                lines[*i] = (col, rest);
                seq.push(yaml_block(lines, i, col)?);
            } else {
                seq.push(yaml_scalar(&rest));
                *i += 1;
            }
        }
        return Ok(Value::Array(seq));
    }
    let mut map = Map::new();
    while *i < lines.len() && lines[*i].0 == indent && !is_item(&lines[*i].1) {
        let line = lines[*i].1.clone();
        let (k, v) = match line.split_once(": ") {
            Some((k, v)) => (k, v.trim()),
            None => match line.strip_suffix(':') {
                Some(k) => (k, ""),
                None => {
                    return Err(Error::invalid(format!(
                        "kubeconfig: expected 'key: value', got '{line}'"
                    )));
                }
            },
        };
        let key = match yaml_scalar(k) {
            Value::String(s) => s,
            other => other.to_string(),
        };
        *i += 1;
        let value = if !v.is_empty() && !v.starts_with('#') {
            yaml_scalar(v)
        } else if *i < lines.len()
            && (lines[*i].0 > indent || (lines[*i].0 == indent && is_item(&lines[*i].1)))
        {
            let child = lines[*i].0;
            yaml_block(lines, i, child)?
        } else {
            Value::Null
        };
        map.insert(key, value);
    }
    if *i < lines.len() && lines[*i].0 > indent {
        return Err(Error::invalid(format!(
            "kubeconfig: unexpected indentation at '{}'",
            lines[*i].1
        )));
    }
    Ok(Value::Object(map))
}

/// `t` in RFC 3339, UTC, to the second (Go's `time.RFC3339` of a UTC time).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let (y, m, d, hh, mm, ss) = crate::civil::from_secs(secs as i64);
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
}

/// The merge patch recording a poll at `now` that found `digest`.
pub fn patch_body(digest: &str, now: SystemTime) -> String {
    let mut ann = Map::new();
    ann.insert(ANN_LAST_CRON_TIME.into(), Value::from(rfc3339(now)));
    if !digest.is_empty() {
        ann.insert(ANN_SOURCE_DESIRED_DIGEST.into(), Value::from(digest));
    }
    serde_json::json!({ "metadata": { "annotations": ann } }).to_string()
}

/// The registry digest `opts.url` names now.
pub fn image_digest(opts: &Options, paths: &Paths) -> Result<String> {
    let log = |m: &str| opts.logger.relay(m);
    let mut ca_pem = Vec::new();
    if let Some(d) = &opts.cert_dir {
        ca_pem.extend(super::importer::read_cert_dir(&paths.relocate(d), &log));
    }
    ca_pem.extend(super::importer::read_cert_dir(
        &paths.get(super::importer::PROXY_CERTS_DIR),
        &log,
    ));
    let ropts = RegistryOptions {
        credentials: opts.credentials.clone(),
        insecure: opts.insecure,
        ca_pem,
        proxy: Proxy::from_env()?,
        user_agent: USER_AGENT.into(),
        ..RegistryOptions::default()
    };
    crate::net::registry::manifest_digest(&opts.url, &ropts)
}

/// PATCH the DataImportCron with `body` (a merge patch).
pub fn patch_cron(api: &ApiServer, opts: &Options, body: &str) -> Result<()> {
    let client = Client::new(ClientConfig {
        user_agent: USER_AGENT.into(),
        insecure: api.insecure,
        ca_pem: api.ca_pem.clone(),
        client_cert: api.client_cert.clone(),
        proxy: Proxy::default(),
        ..ClientConfig::default()
    })?;
    let url = format!(
        "{}/apis/cdi.kubevirt.io/v1beta1/namespaces/{}/dataimportcrons/{}",
        api.server, opts.namespace, opts.cron
    );
    let bearer = api.token.as_ref().map(|t| format!("Bearer {t}"));
    let mut headers = vec![
        ("Content-Type", "application/merge-patch+json"),
        ("Accept", "application/json"),
    ];
    if let Some(b) = &bearer {
        headers.push(("Authorization", b.as_str()));
    }
    let r = client.send_body(
        "PATCH",
        &url,
        &headers,
        &mut body.as_bytes(),
        Some(body.len() as u64),
    )?;
    if r.status == 200 {
        return Ok(());
    }
    let status = r.status;
    let text = r.read_to_vec(MAX_API_BODY).unwrap_or_default();
    // A Kubernetes Status object says why; otherwise show the start of the body.
    let why = serde_json::from_slice::<Value>(&text)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&text[..text.len().min(512)]).into_owned());
    let kind = match status {
        401 | 403 => ErrorKind::Denied,
        404 => ErrorKind::NotFound,
        _ => ErrorKind::Network,
    };
    Err(Error::new(
        kind,
        format!(
            "Failed patching DataImportCron {}/{}: HTTP {status}: {why}",
            opts.namespace, opts.cron
        ),
    ))
}

/// Poll once: resolve the digest and record it on the DataImportCron. The digest on success.
pub fn run(opts: &Options, paths: &Paths) -> Result<String> {
    let digest = image_digest(opts, paths)
        .map_err(|e| Error::new(e.kind(), format!("Failed to get image digest: {e}")))?;
    opts.logger.info(&format!("Digest is {digest}"));
    let api = ApiServer::resolve(opts, paths)
        .map_err(|e| Error::new(e.kind(), format!("Failed to build config: {e}")))?;
    opts.logger.v(1, &format!("API server: {api:?}"));
    patch_cron(&api, opts, &patch_body(&digest, SystemTime::now()))?;
    opts.logger.info(&format!(
        "Updated DataImportCron {}/{}",
        opts.namespace, opts.cron
    ));
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn options() {
        let env = |n: &str| match n {
            "IMPORTER_ACCESS_KEY_ID" => Some("u".to_string()),
            "IMPORTER_SECRET_KEY" => Some("p".to_string()),
            "INSECURE_TLS" => Some("true".to_string()),
            _ => None,
        };
        let o = Options::parse(
            &[
                "-url",
                "docker://r/x:1",
                "-ns",
                "default",
                "--cron=c1",
                "-v=2",
            ],
            &env,
        )
        .unwrap();
        assert_eq!(o.credentials, Some(("u".into(), "p".into())));
        assert!(o.insecure && o.kubeconfig.is_none());
        assert_eq!(o.logger.verbosity(), 2);
        let o = Options::parse(
            &["-url=docker://r/x", "-ns=a", "-cron=b", "-insecure=false"],
            &env,
        )
        .unwrap();
        assert!(!o.insecure);
        assert!(Options::parse(&["-url", "docker://r/x", "-ns", "a"], &env).is_err());
        assert!(
            Options::parse(&["-url", "docker://r/x", "-ns", "a/..", "-cron", "b"], &env).is_err()
        );
        assert!(Options::parse(&["-bogus"], &env).is_err());
        let kenv = |n: &str| (n == "KUBECONFIG").then(|| ":/a/config:/b/config".to_string());
        let o = Options::parse(&["-url=docker://r/x", "-ns=a", "-cron=b"], &kenv).unwrap();
        assert_eq!(o.kubeconfig.as_deref(), Some("/a/config"));
        assert!(o.credentials.is_none() && !o.insecure);
    }

    #[test]
    fn patch() {
        let t = UNIX_EPOCH + Duration::from_secs(1_796_193_144);
        assert_eq!(rfc3339(t), "2026-12-02T06:32:24Z");
        let v: Value = serde_json::from_str(&patch_body("sha256:ab", t)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"metadata": {"annotations": {
                ANN_SOURCE_DESIRED_DIGEST: "sha256:ab",
                ANN_LAST_CRON_TIME: "2026-12-02T06:32:24Z",
            }}})
        );
    }

    #[test]
    fn kubeconfig_yaml() {
        let text = r#"
apiVersion: v1
kind: Config
clusters:
- cluster:
    certificate-authority-data: cGVt
    server: https://api.example:6443/
  name: c1
- name: other
  cluster:
    server: "https://wrong"
contexts:
- context:
    cluster: c1
    user: admin   # a comment
  name: ctx
current-context: 'ctx'
preferences: {}
users:
- name: admin
  user:
    token: abc.def
"#;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("config");
        std::fs::write(&p, text).unwrap();
        let api = from_kubeconfig(&p).unwrap();
        assert_eq!(api.server, "https://api.example:6443");
        assert_eq!(api.ca_pem, vec![b"pem".to_vec()]);
        assert_eq!(api.token.as_deref(), Some("abc.def"));
        assert!(api.client_cert.is_none() && !api.insecure);
        let v = parse_yaml(text).unwrap();
        assert_eq!(v["clusters"][1]["cluster"]["server"], "https://wrong");
        assert_eq!(v["contexts"][0]["context"]["user"], "admin");
        // JSON works too.
        std::fs::write(
            &p,
            r#"{"current-context":"x","contexts":[{"name":"x","context":{"cluster":"k","user":"u"}}],
               "clusters":[{"name":"k","cluster":{"server":"http://127.0.0.1:1","insecure-skip-tls-verify":true}}],
               "users":[{"name":"u","user":{}}]}"#,
        )
        .unwrap();
        let api = from_kubeconfig(&p).unwrap();
        assert!(api.insecure && api.token.is_none());
        assert!(parse_yaml("a: 1\n   b: 2\n").is_err());
    }
}
