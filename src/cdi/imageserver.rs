//! CDI's `cdi-containerimage-server`, the node-pull half of a containerDisk import: run as the
//! command of the containerDisk's own image (which has no shell and no libc, hence a static
//! binary), it serves the image's single disk file over plain HTTP on loopback to the importer
//! in the same pod, says which file it is through the ready file, answers `GET /info` with the
//! image's environment (the importer turns `…KUBEVIRT_IO_…` entries into labels), and exits
//! when the importer creates the done file.
//!
//! This module owns the flags (Go `flag` syntax, as CDI's controller passes them), the checks
//! on the image (one non-directory file in the image directory, no bootc image), the request
//! handling (`GET`/`HEAD` with single byte ranges) and the wait for the done file.

use super::Paths;
use crate::error::{Error, Result};
use crate::net::server::{FileRange, Handler, Request, Response, Server};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// What the server was told on its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// `-p`: the TCP port on loopback (CDI: 8100).
    pub port: u16,
    /// `-image-dir`: the directory holding the disk (CDI: `/disk`).
    pub image_dir: String,
    /// `-ready-file`: written with the disk's file name once serving.
    pub ready_file: Option<String>,
    /// `-done-file`: the server exits when this file appears.
    pub done_file: Option<String>,
}

/// Parse the flags (`-flag value`, `-flag=value`, `--flag` forms). `Err` is a usage error.
pub fn parse_args(args: &[String]) -> Result<Options> {
    let mut o = Options {
        port: 8100,
        image_dir: "/disk".into(),
        ready_file: None,
        done_file: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let Some(flag) = a.strip_prefix("--").or_else(|| a.strip_prefix('-')) else {
            return Err(Error::invalid(format!("unexpected argument '{a}'")));
        };
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (flag, None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| Error::invalid(format!("flag needs an argument: -{name}")))
        };
        match name {
            "p" => {
                let v = value()?;
                o.port = v
                    .parse()
                    .map_err(|_| Error::invalid(format!("invalid value \"{v}\" for flag -p")))?;
            }
            "image-dir" => o.image_dir = value()?,
            "ready-file" => o.ready_file = Some(value()?),
            "done-file" => o.done_file = Some(value()?),
            _ => {
                return Err(Error::invalid(format!(
                    "flag provided but not defined: -{name}"
                )));
            }
        }
    }
    Ok(o)
}

/// The disk file of the image: the one entry of `dir`, which must not be a directory. Refuses
/// bootc images (`/sysroot` or `/ostree` present), which are not containerDisks.
pub fn find_disk(paths: &Paths, dir: &Path) -> Result<PathBuf> {
    for marker in ["/sysroot", "/ostree"] {
        if paths.get(marker).exists() {
            return Err(Error::new(
                crate::error::ErrorKind::UnsupportedFormat,
                format!("{marker} exists: this is a bootc image, not a containerDisk"),
            ));
        }
    }
    let rd = std::fs::read_dir(dir)
        .map_err(|e| Error::io("cannot read the image directory", e).with_path(dir))?;
    let mut found = Vec::new();
    for e in rd {
        let e = e.map_err(|e| Error::io("cannot read the image directory", e).with_path(dir))?;
        found.push(e.path());
        if found.len() > 1 {
            break;
        }
    }
    match found.as_slice() {
        [one] if one.is_dir() => Err(Error::invalid(format!(
            "{} is a directory, not a disk image",
            one.display()
        ))),
        [one] => Ok(one.clone()),
        [] => Err(Error::invalid(format!(
            "{}: no disk image file in the image directory",
            dir.display()
        ))),
        _ => Err(Error::invalid(format!(
            "{}: more than one file in the image directory, expected exactly one disk",
            dir.display()
        ))),
    }
}

/// One `Range: bytes=…` of a file of `size` bytes: `Ok(None)` without a usable range (the
/// whole file is sent), `Err(())` when unsatisfiable.
fn parse_range(h: &str, size: u64) -> std::result::Result<Option<(u64, u64)>, ()> {
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        // Several ranges: answered with the whole file, which HTTP allows.
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| ())?;
        if n == 0 {
            return Err(());
        }
        (size.saturating_sub(n), size.checked_sub(1).ok_or(())?)
    } else {
        let s: u64 = a.parse().map_err(|_| ())?;
        let e = if b.is_empty() {
            size.saturating_sub(1)
        } else {
            b.parse::<u64>()
                .map_err(|_| ())?
                .min(size.saturating_sub(1))
        };
        (s, e)
    };
    if start >= size || start > end {
        return Err(());
    }
    Ok(Some((start, end)))
}

/// The `/info` document: `{"env":["K=V",...]}` of this process's environment, which is the
/// containerDisk image's `Env` since the server runs as the image's command.
pub fn info_json(env: impl IntoIterator<Item = (String, String)>) -> String {
    let env: Vec<String> = env.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    serde_json::json!({ "env": env }).to_string()
}

fn handle(req: &Request<'_>, disk: &Path, name: &str, info: &str) -> Response {
    if req.method != "GET" && req.method != "HEAD" {
        return Response::text(405, "method not allowed").with_header("Allow", "GET, HEAD");
    }
    if req.path == "/info" {
        return Response::text(200, info).with_header("Content-Type", "application/json");
    }
    if req.path.strip_prefix('/') != Some(name) {
        return Response::text(404, "not found");
    }
    let size = match std::fs::metadata(disk) {
        Ok(m) => m.len(),
        Err(e) => return Response::text(500, format!("cannot stat the disk: {e}")),
    };
    let range = match req.header("Range").map(|h| parse_range(h, size)) {
        None | Some(Ok(None)) => None,
        Some(Ok(Some(r))) => Some(r),
        Some(Err(())) => {
            return Response::text(416, "range not satisfiable")
                .with_header("Content-Range", format!("bytes */{size}"));
        }
    };
    let (status, offset, len) = match range {
        Some((s, e)) => (206, s, e - s + 1),
        None => (200, 0, size),
    };
    let mut r = Response::file(
        status,
        FileRange {
            path: disk.to_path_buf(),
            offset,
            len,
        },
    )
    .with_header("Accept-Ranges", "bytes")
    .with_header("Content-Type", "application/octet-stream");
    if status == 206 {
        r = r.with_header(
            "Content-Range",
            format!("bytes {offset}-{}/{size}", offset + len - 1),
        );
    }
    r
}

/// Serve until the done file appears. `log` receives progress lines.
pub fn run(paths: &Paths, opts: &Options, log: &dyn Fn(&str)) -> Result<()> {
    let dir = paths.relocate(&opts.image_dir);
    let disk = find_disk(paths, &dir)?;
    let name = disk
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::invalid(format!("{}: file name is not UTF-8", disk.display())))?
        .to_string();
    let info = Arc::new(info_json(std::env::vars()));
    let mut handles = Vec::new();
    for addr in [
        format!("127.0.0.1:{}", opts.port),
        format!("[::1]:{}", opts.port),
    ] {
        match Server::bind(&addr, None) {
            Ok(s) => {
                log(&format!(
                    "serving {} on http://{addr}/{name}",
                    disk.display()
                ));
                let (disk, name, info) = (disk.clone(), name.clone(), info.clone());
                let h: Handler =
                    Arc::new(move |req: &mut Request<'_>| handle(req, &disk, &name, &info));
                handles.push(s.try_spawn(h)?);
            }
            // IPv4 loopback must work; IPv6 is a bonus (pods may have it disabled).
            Err(e) if addr.starts_with('[') => log(&format!("not serving on {addr}: {e}")),
            Err(e) => return Err(e),
        }
    }
    if let Some(ready) = &opts.ready_file {
        let p = paths.relocate(ready);
        std::fs::write(&p, &name)
            .map_err(|e| Error::io("cannot write the ready file", e).with_path(&p))?;
    }
    match &opts.done_file {
        Some(done) => {
            let p = paths.relocate(done);
            while !p.exists() {
                std::thread::sleep(Duration::from_millis(200));
            }
            log(&format!("{} appeared, exiting", p.display()));
        }
        None => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
    }
    for h in handles {
        h.shutdown();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn flags_as_the_controller_passes_them() {
        let o = parse_args(&args(
            "-p 8100 -image-dir /disk -ready-file /shared/ready -done-file /shared/done",
        ))
        .unwrap();
        assert_eq!(o.port, 8100);
        assert_eq!(o.image_dir, "/disk");
        assert_eq!(o.ready_file.as_deref(), Some("/shared/ready"));
        assert_eq!(o.done_file.as_deref(), Some("/shared/done"));
        let o = parse_args(&args("--p=9 -image-dir=/x")).unwrap();
        assert_eq!((o.port, o.image_dir.as_str()), (9, "/x"));
        assert!(parse_args(&args("-p")).is_err());
        assert!(parse_args(&args("-p x")).is_err());
        assert!(parse_args(&args("-bogus 1")).is_err());
        assert!(parse_args(&args("stray")).is_err());
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Ok(Some((0, 9))));
        assert_eq!(parse_range("bytes=90-", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=-200", 100), Ok(Some((0, 99))));
        assert_eq!(parse_range("bytes=50-500", 100), Ok(Some((50, 99))));
        assert_eq!(parse_range("bytes=100-", 100), Err(()));
        assert_eq!(parse_range("bytes=5-4", 100), Err(()));
        assert_eq!(parse_range("bytes=-0", 100), Err(()));
        assert_eq!(parse_range("bytes=0-", 0), Err(()));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Ok(None));
        assert_eq!(parse_range("items=0-1", 100), Ok(None));
        assert_eq!(parse_range("bytes=a-b", 100), Err(()));
    }

    #[test]
    fn the_disk_is_the_one_file() {
        let t = tempfile::tempdir().unwrap();
        let paths = Paths::new(Some(t.path().to_path_buf()));
        let dir = paths.get("/disk");
        std::fs::create_dir(&dir).unwrap();
        assert!(find_disk(&paths, &dir).is_err());
        std::fs::write(dir.join("fedora.qcow2"), b"x").unwrap();
        assert_eq!(find_disk(&paths, &dir).unwrap(), dir.join("fedora.qcow2"));
        std::fs::write(dir.join("second"), b"y").unwrap();
        assert!(find_disk(&paths, &dir).is_err());
        std::fs::remove_file(dir.join("second")).unwrap();
        std::fs::create_dir(paths.get("/ostree")).unwrap();
        let e = find_disk(&paths, &dir).unwrap_err();
        assert!(e.to_string().contains("bootc"), "{e}");
        std::fs::remove_dir(paths.get("/ostree")).unwrap();
        std::fs::remove_file(dir.join("fedora.qcow2")).unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
        assert!(find_disk(&paths, &dir).is_err());
    }

    #[test]
    fn info_lists_the_environment() {
        let j = info_json([("A_KUBEVIRT_IO_B".to_string(), "c=d".to_string())]);
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["env"][0], "A_KUBEVIRT_IO_B=c=d");
    }
}
