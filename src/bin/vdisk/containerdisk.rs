//! `vdisk containerdisk`: argument parsing and output for `vdisk::containerdisk::build`.

use clap::Args;
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use vdisk::containerdisk::{self, BuildOptions, Destination, LayerCompression};
use vdisk::convert::Target;
use vdisk::qcow2::writer::CreateOptions;
use vdisk::{Error, Format};

#[derive(Args)]
pub struct ContainerdiskArgs {
    /// Source format (detected when omitted).
    #[arg(short = 'f')]
    src_format: Option<String>,
    /// Convert the disk on the way: raw or qcow2 (default: ship it as it is, which needs a
    /// raw or qcow2 image without backing or data file).
    #[arg(short = 'O')]
    out_format: Option<String>,
    /// Compress the qcow2 clusters (with -O qcow2).
    #[arg(short = 'c')]
    compress: bool,
    /// qcow2 options for -O qcow2, as for convert -o.
    #[arg(short = 'o', action = clap::ArgAction::Append)]
    options: Vec<String>,
    /// The disk's file name under disk/ in the image.
    #[arg(long = "disk-name", default_value = containerdisk::DEFAULT_DISK_NAME)]
    disk_name: String,
    /// Layer compression: gzip (every reader) or zstd.
    #[arg(long, default_value = "gzip")]
    compression: String,
    /// Image architecture, GOARCH spelling (default: this host's).
    #[arg(long)]
    arch: Option<String>,
    /// Image platform variant (v8, v7, ...).
    #[arg(long)]
    variant: Option<String>,
    /// A config label KEY=VALUE (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE", action = clap::ArgAction::Append)]
    labels: Vec<String>,
    /// A config environment entry NAME=VALUE (repeatable); CDI turns NAME..._KUBEVIRT_IO_...
    /// entries into labels of the imported volume.
    #[arg(long = "env", value_name = "NAME=VALUE", action = clap::ArgAction::Append)]
    env: Vec<String>,
    /// docker://: registry credentials USER:PASSWORD, or USER with --password-stdin.
    #[arg(long, value_name = "USER[:PASSWORD]")]
    creds: Option<String>,
    /// docker://: read the password of --creds USER from the first line of standard input.
    #[arg(long = "password-stdin", requires = "creds")]
    password_stdin: bool,
    /// docker://: CA certificates (PEM) to trust for the registry, besides the system's.
    #[arg(long, value_name = "FILE")]
    ca: Vec<PathBuf>,
    /// docker://: skip TLS verification and fall back to plain http when https fails.
    #[arg(long)]
    insecure: bool,
    /// Directory for the spooled layer and conversions of a docker:// build (default TMPDIR).
    #[arg(long = "tmpdir", value_name = "DIR")]
    tmpdir: Option<PathBuf>,
    /// Refuse backing files, data files and non-local names in the source.
    #[arg(long)]
    untrusted: bool,
    /// Print only the manifest digest.
    #[arg(short = 'q')]
    quiet: bool,
    /// The disk image.
    disk: PathBuf,
    /// oci-archive:PATH[:TAG], oci:DIR[:TAG] or docker://REF.
    dest: String,
}

fn key_value(what: &str, s: &str) -> Result<(String, String), Error> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(Error::invalid(format!("{what} '{s}' is not KEY=VALUE"))),
    }
}

/// Parse, build, print the manifest digest (and a summary unless `-q`).
pub fn run(a: ContainerdiskArgs, out: &mut dyn Write) -> Result<(), Error> {
    let dest = Destination::parse(&a.dest)?;
    let compression = LayerCompression::from_name(&a.compression).ok_or_else(|| {
        Error::invalid(format!(
            "--compression must be gzip or zstd, not '{}'",
            a.compression
        ))
    })?;
    let convert = match a.out_format.as_deref() {
        None => {
            if a.compress || !a.options.is_empty() {
                return Err(Error::invalid("-c and -o need -O qcow2"));
            }
            None
        }
        Some(f) => match Format::from_name(f) {
            Some(Format::Raw) if !a.compress && a.options.is_empty() => Some(Target::Raw),
            Some(Format::Raw) => return Err(Error::invalid("-c and -o need -O qcow2")),
            Some(Format::Qcow2) => {
                let mut co = CreateOptions::default();
                for o in &a.options {
                    co.apply(o)?;
                }
                if co.backing.is_some() {
                    return Err(Error::invalid(
                        "a containerDisk cannot hold a qcow2 with a backing file",
                    ));
                }
                Some(Target::Qcow2 {
                    options: co,
                    compress: a.compress,
                })
            }
            _ => {
                return Err(Error::invalid(format!(
                    "-O must be raw or qcow2 (what KubeVirt boots), not '{f}'"
                )));
            }
        },
    };
    let mut labels = BTreeMap::new();
    for l in &a.labels {
        let (k, v) = key_value("label", l)?;
        labels.insert(k, v);
    }
    for e in &a.env {
        key_value("environment entry", e)?;
    }
    let mut o = BuildOptions {
        disk_name: a.disk_name.clone(),
        source_format: match &a.src_format {
            Some(n) => Some(
                Format::from_name(n)
                    .ok_or_else(|| Error::invalid(format!("unknown file format '{n}'")))?,
            ),
            None => None,
        },
        convert,
        compression,
        labels,
        env: a.env.clone(),
        variant: a.variant.clone(),
        source_date_epoch: containerdisk::source_date_epoch()?,
        temp_dir: a.tmpdir.clone(),
        policy: if a.untrusted {
            vdisk::Policy::Untrusted
        } else {
            vdisk::Policy::Trusted
        },
        ..BuildOptions::default()
    };
    if let Some(arch) = &a.arch {
        o.architecture = arch.clone();
    }
    o.registry.insecure = a.insecure;
    for ca in &a.ca {
        o.registry
            .ca_pem
            .push(std::fs::read(ca).map_err(|e| Error::io("cannot read", e).with_path(ca))?);
    }
    if let Some(c) = &a.creds {
        let (user, pass) = match (c.split_once(':'), a.password_stdin) {
            (None, true) => {
                let mut line = String::new();
                std::io::stdin()
                    .lock()
                    .read_line(&mut line)
                    .map_err(|e| Error::io("cannot read the password from stdin", e))?;
                (c.clone(), line.trim_end_matches(['\r', '\n']).to_string())
            }
            (Some((u, p)), false) => (u.to_string(), p.to_string()),
            _ => {
                return Err(Error::invalid(
                    "--creds takes USER:PASSWORD, or USER with --password-stdin",
                ));
            }
        };
        o.registry.credentials = Some((user, pass));
    }
    let r = containerdisk::build(&a.disk, &dest, &o)?;
    let wr = |out: &mut dyn Write, s: String| {
        out.write_all(s.as_bytes())
            .map_err(|e| Error::io("cannot write output", e))
    };
    wr(out, format!("{}\n", r.manifest_digest))?;
    if !a.quiet {
        let secs = r.elapsed.as_secs_f64();
        let rate = r.disk_size as f64 / (1u64 << 20) as f64 / secs.max(1e-3);
        let mut s = format!(
            "Built {} ({}/linux): {} ({}, {} bytes)\n",
            r.destination, o.architecture, r.disk_path, r.disk_format, r.disk_size
        );
        s += &format!(
            "  layer   {} ({}, {} bytes; diff_id {})\n",
            r.layer_digest,
            compression.name(),
            r.layer_size,
            r.diff_id
        );
        s += &format!("  config  {} ({} bytes)\n", r.config_digest, r.config_size);
        if matches!(dest, Destination::Registry(_)) {
            s += &format!("  blobs uploaded: {} of 2\n", r.blobs_uploaded);
        }
        s += &format!("  {secs:.1} s, {rate:.1} MiB/s of disk\n");
        wr(out, s)?;
    }
    Ok(())
}
