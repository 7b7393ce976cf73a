//! cloud-init NoCloud seed disks: an ISO labelled `cidata` holding `user-data`, `meta-data`
//! and, when given, `network-config` and `vendor-data`, with Joliet and Rock Ridge names so
//! every reader cloud-init uses finds them; written as a raw ISO or converted to qcow2.
//!
//! When no meta-data is given, the seed gets `instance-id: iid-<16 hex digits>`, a hash of the
//! other files' contents: the same configuration keeps its instance id, a changed one gets a
//! new id, so cloud-init runs its per-instance modules again.

use super::tree::{Meta, Tree};
use super::write::{IsoOptions, IsoReport, write_iso};
use crate::convert::{ConvertOptions, Target, TempTarget, convert_path};
use crate::detect::Format;
use crate::error::{Error, Result};
use crate::image::{Image, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The files of a seed (host paths).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seed {
    /// `user-data` (required; may be empty).
    pub user_data: PathBuf,
    /// `meta-data`; a generated instance id when absent.
    pub meta_data: Option<PathBuf>,
    /// `network-config` (network configuration v1 or v2).
    pub network_config: Option<PathBuf>,
    /// `vendor-data`.
    pub vendor_data: Option<PathBuf>,
}

/// 64-bit FNV-1a over the files' names and contents, read in pieces.
fn content_hash(files: &[(&str, &Path)]) -> Result<u64> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut mix = |b: &[u8]| {
        for &x in b {
            h ^= u64::from(x);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    let mut buf = vec![0u8; 64 << 10];
    for (name, path) in files {
        mix(name.as_bytes());
        mix(&[0]);
        let mut f =
            std::fs::File::open(path).map_err(|e| Error::io("cannot open", e).with_path(path))?;
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| Error::io("cannot read", e).with_path(path))?;
            if n == 0 {
                break;
            }
            mix(&buf[..n]);
        }
        mix(&[0xff]);
    }
    Ok(h)
}

impl Seed {
    /// The `meta-data` written when none is given.
    pub fn default_meta_data(&self) -> Result<String> {
        let mut files = vec![("user-data", self.user_data.as_path())];
        if let Some(p) = &self.network_config {
            files.push(("network-config", p));
        }
        if let Some(p) = &self.vendor_data {
            files.push(("vendor-data", p));
        }
        Ok(format!("instance-id: iid-{:016x}\n", content_hash(&files)?))
    }

    /// The tree of the seed: the files at the root, owned by root, read-only for all.
    pub fn tree(&self, date: i64) -> Result<Tree> {
        let mut t = Tree::new(Meta::made(libc::S_IFDIR | 0o555, date));
        for (name, path) in [
            ("user-data", Some(&self.user_data)),
            ("meta-data", self.meta_data.as_ref()),
            ("network-config", self.network_config.as_ref()),
            ("vendor-data", self.vendor_data.as_ref()),
        ] {
            let Some(path) = path else { continue };
            let m =
                std::fs::metadata(path).map_err(|e| Error::io("cannot read", e).with_path(path))?;
            if !m.is_file() {
                return Err(
                    Error::invalid(format!("{name} must be a regular file")).with_path(path)
                );
            }
            t.add_path(name, path)?;
        }
        if self.meta_data.is_none() {
            t.add_bytes(
                "meta-data",
                self.default_meta_data()?.into_bytes(),
                0o444,
                date,
            )?;
        }
        Ok(t)
    }
}

/// Write the seed `seed` to `dst` as `target` (raw: the ISO itself; qcow2: the ISO converted),
/// labelled `cidata`. `date` fixes every date in it (see [`IsoOptions::date`]).
pub fn write_seed(
    seed: &Seed,
    dst: &Path,
    target: &Target,
    date: Option<i64>,
) -> Result<IsoReport> {
    let now = date.unwrap_or_else(crate::civil::now_secs);
    let tree = seed.tree(now)?;
    let opts = IsoOptions {
        volume_id: "cidata".into(),
        date: Some(date.unwrap_or(now)),
        rational: true,
        ..IsoOptions::default()
    };
    match target {
        Target::Raw => write_iso(&tree, &opts, dst),
        Target::Qcow2 { .. } => {
            let iso = TempTarget::create(dst)?;
            let report = write_iso(&tree, &opts, iso.path())?;
            let img = Image::open(
                iso.path(),
                &OpenOptions {
                    format: Some(Format::Raw),
                    ..OpenOptions::default()
                },
            )?;
            convert_path(&img, dst, target, &mut ConvertOptions::default())?;
            Ok(report)
        }
    }
}
