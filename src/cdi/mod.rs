//! KubeVirt CDI's pod contracts, shared by the importer and the upload server: the fixed
//! paths (movable under `VDISK_ROOT` for tests), Go-compatible parsing of environment values,
//! and the termination message the controller reads.

pub mod imageserver;
pub mod importer;
pub mod klog;
pub mod poller;
pub mod sizedetect;
pub mod uploader;

use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// CDI's fixed paths, relocated under the directory named by `VDISK_ROOT` when it is set.
#[derive(Debug, Clone, Default)]
pub struct Paths {
    root: Option<PathBuf>,
}

impl Paths {
    /// The real paths (`root` None) or the same paths under `root`.
    pub fn new(root: Option<PathBuf>) -> Paths {
        Paths { root }
    }

    /// From `VDISK_ROOT` (unset or empty: the real paths).
    pub fn from_env() -> Paths {
        Paths::new(
            std::env::var_os("VDISK_ROOT")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
        )
    }

    /// The path for CDI's absolute path `abs` (e.g. `/data/disk.img`).
    pub fn get(&self, abs: &str) -> PathBuf {
        match &self.root {
            Some(r) => r.join(abs.trim_start_matches('/')),
            None => PathBuf::from(abs),
        }
    }

    /// The path for `p`, which may already be relative to the root (an env value such as
    /// `IMPORTER_CERT_DIR=/certs` names a CDI path).
    pub fn relocate(&self, p: &str) -> PathBuf {
        if p.starts_with('/') {
            self.get(p)
        } else {
            PathBuf::from(p)
        }
    }
}

/// Largest configuration file read (certificates, header secrets, ready files): Kubernetes
/// caps ConfigMaps and Secrets at 1 MiB.
pub const MAX_CONFIG_FILE: u64 = 1 << 20;

/// Read a small configuration file, refusing one larger than [`MAX_CONFIG_FILE`].
pub fn read_config_file(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut v = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_CONFIG_FILE + 1)
        .read_to_end(&mut v)?;
    if v.len() as u64 > MAX_CONFIG_FILE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {MAX_CONFIG_FILE} bytes"),
        ));
    }
    Ok(v)
}

/// Go's `strconv.ParseBool`.
pub fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// An environment variable, `None` when unset or empty.
pub fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The filesystem overhead as CDI's pods read `FILESYSTEM_OVERHEAD`: a float, and 0 when it
/// does not parse (or is unset).
pub fn env_overhead() -> f64 {
    env("FILESYSTEM_OVERHEAD")
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|o| o.is_finite() && (0.0..=1.0).contains(o))
        .unwrap_or(0.0)
}

/// The JSON termination message (`common.TerminationMessage`): keys in Go's field order,
/// absent fields omitted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Termination {
    /// `scratchSpaceRequired`.
    pub scratch_space_required: Option<bool>,
    /// `preallocationApplied`.
    pub preallocation_applied: Option<bool>,
    /// `deadlinePassed`.
    pub deadline_passed: Option<bool>,
    /// `labels`.
    pub labels: BTreeMap<String, String>,
    /// `message`.
    pub message: Option<String>,
}

/// Longest JSON termination message CDI accepts.
pub const MAX_TERMINATION: usize = 4096;

impl Termination {
    /// The message as one line of JSON, dropping the labels if it would exceed
    /// [`MAX_TERMINATION`] bytes (the controller rejects longer ones).
    pub fn to_json(&self) -> String {
        let mut s = self.render(true);
        if s.len() > MAX_TERMINATION {
            s = self.render(false);
        }
        s
    }

    fn render(&self, labels: bool) -> String {
        // serde_json's map sorts its keys; Go marshals in field order, so build by hand.
        let q = |v: &str| serde_json::Value::from(v).to_string();
        let mut parts = Vec::new();
        if let Some(v) = self.scratch_space_required {
            parts.push(format!("\"scratchSpaceRequired\":{v}"));
        }
        if let Some(v) = self.preallocation_applied {
            parts.push(format!("\"preallocationApplied\":{v}"));
        }
        if let Some(v) = self.deadline_passed {
            parts.push(format!("\"deadlinePassed\":{v}"));
        }
        if labels && !self.labels.is_empty() {
            let l: Vec<String> = self
                .labels
                .iter()
                .map(|(k, v)| format!("{}:{}", q(k), q(v)))
                .collect();
            parts.push(format!("\"labels\":{{{}}}", l.join(",")));
        }
        if let Some(v) = &self.message {
            parts.push(format!("\"message\":{}", q(v)));
        }
        format!("{{{}}}", parts.join(","))
    }
}

/// Write `text` as the termination message at `path`: mode 0600, newlines turned into spaces.
pub fn write_termination(path: &std::path::Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let line = text.replace(['\n', '\r'], " ");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io("cannot open the termination log", e).with_path(path))?;
    f.write_all(line.as_bytes())
        .map_err(|e| Error::io("cannot write the termination log", e).with_path(path))
}

/// This process's peak resident memory in bytes (`VmHWM` of `/proc/self/status`), which the
/// drop-ins log at exit so a memory limit can be checked against what was really used.
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn termination_json_in_go_order() {
        let mut t = Termination {
            scratch_space_required: Some(false),
            preallocation_applied: Some(true),
            message: Some("Import Complete".into()),
            ..Termination::default()
        };
        assert_eq!(
            t.to_json(),
            r#"{"scratchSpaceRequired":false,"preallocationApplied":true,"message":"Import Complete"}"#
        );
        t.labels.insert("a.kubevirt.io/b".into(), "c".into());
        assert!(
            t.to_json()
                .contains(r#""labels":{"a.kubevirt.io/b":"c"},"message""#)
        );
        t.labels.insert("big".into(), "x".repeat(5000));
        assert!(!t.to_json().contains("labels") && t.to_json().len() < MAX_TERMINATION);
    }

    #[test]
    fn config_files_are_bounded() {
        let d = tempfile::tempdir().unwrap();
        let small = d.path().join("ca.crt");
        std::fs::write(&small, b"pem").unwrap();
        assert_eq!(read_config_file(&small).unwrap(), b"pem");
        let big = d.path().join("big");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_CONFIG_FILE + 1)
            .unwrap();
        assert!(read_config_file(&big).is_err());
    }

    #[test]
    fn go_bools_and_paths() {
        assert_eq!(parse_go_bool("True"), Some(true));
        assert_eq!(parse_go_bool("0"), Some(false));
        assert_eq!(parse_go_bool("yes"), None);
        let p = Paths::new(Some("/tmp/r".into()));
        assert_eq!(
            p.get("/data/disk.img"),
            PathBuf::from("/tmp/r/data/disk.img")
        );
        assert_eq!(Paths::new(None).get("/data"), PathBuf::from("/data"));
    }
}
