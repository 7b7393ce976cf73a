//! `vdisk`: a qemu-img-compatible command line over the vdisk library.
//!
//! Only argument parsing, output and exit codes live here; every operation is one library call.

mod containerdisk;

use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use vdisk::compare::{Comparison, compare_with_progress};
use vdisk::convert::{ConvertOptions, Target, convert_path};
use vdisk::edit::SnapshotOp;
use vdisk::info::{ImageInfo, snapshot_table, write_map_human_in, write_map_json_in};
use vdisk::io::LockMode;
use vdisk::qcow2::writer::{CreateOptions, Prealloc, is_options_help, options_help};
use vdisk::{Error, Format, Image, OpenOptions, Policy};

#[derive(Parser)]
#[command(
    name = "vdisk",
    version,
    about = "Inspect and convert disk images (qemu-img compatible)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show an image's format, sizes, backing file and snapshots.
    Info {
        #[command(flatten)]
        common: Common,
        /// Output format: human or json.
        #[arg(long = "output", default_value = "human")]
        output: String,
        /// Show every image of the backing chain, the image first.
        #[arg(long = "backing-chain")]
        backing_chain: bool,
        file: PathBuf,
    },
    /// Show how the image's guest ranges are stored.
    Map {
        #[command(flatten)]
        common: Common,
        #[arg(long = "output", default_value = "human")]
        output: String,
        /// First guest byte to map.
        #[arg(
            long = "start-offset",
            value_name = "OFFSET",
            allow_hyphen_values = true
        )]
        start_offset: Option<String>,
        /// Map at most this many bytes.
        #[arg(long = "max-length", value_name = "LEN", allow_hyphen_values = true)]
        max_length: Option<String>,
        file: PathBuf,
    },
    /// Convert an image to a new raw or qcow2 image (or, with -n, into an existing one).
    Convert {
        /// Source format (detected when omitted).
        #[arg(short = 'f')]
        src_format: Option<String>,
        /// Output format.
        #[arg(short = 'O', default_value = "raw")]
        out_format: String,
        /// Zero runs of at least SIZE bytes become holes (default 4k; 0 writes everything).
        #[arg(short = 'S', default_value = "4k")]
        sparse: String,
        /// Show progress.
        #[arg(short = 'p')]
        progress: bool,
        /// Quiet: no progress (wins over -p).
        #[arg(short = 'q')]
        quiet: bool,
        /// Compress the output (qcow2): zlib or zstd, as -o compression_type says.
        #[arg(short = 'c')]
        compress: bool,
        /// Output options, qemu-img style (cluster_size=64k,compat=1.1,refcount_bits=16,
        /// compression_type=zstd,extended_l2=on,lazy_refcounts=on,preallocation=metadata).
        #[arg(short = 'o', action = clap::ArgAction::Append)]
        options: Vec<String>,
        /// Convert internal snapshot (id, name, snapshot.id=ID or snapshot.name=NAME).
        #[arg(short = 'l')]
        snapshot: Option<String>,
        /// Parallel workers (qemu-img's -m; default: one per core).
        #[arg(short = 'm')]
        workers: Option<usize>,
        /// Allow out-of-order writes to an existing raw target (block device, -n); without
        /// it they go in increasing offset order, as qemu-img's do (reads and decompression
        /// stay parallel). A new file is written in any order: it appears only when complete.
        #[arg(short = 'W')]
        oob: bool,
        /// Skip creating the target: write into the existing image (raw, block device or
        /// qcow2), which must be at least as large.
        #[arg(short = 'n')]
        no_create: bool,
        /// The existing target reads as zeros already (with -n): zero ranges are not written.
        #[arg(long = "target-is-zero")]
        target_is_zero: bool,
        /// Give the qcow2 output this backing file: what the source takes from its own
        /// backing chain is left to it.
        #[arg(short = 'B')]
        backing: Option<String>,
        /// Format of the -B backing file.
        #[arg(short = 'F')]
        backing_format: Option<String>,
        /// Target cache mode (accepted; vdisk writes through the page cache and flushes).
        #[arg(short = 't')]
        cache: Option<String>,
        /// Source cache mode (accepted; vdisk reads through the page cache).
        #[arg(short = 'T')]
        src_cache: Option<String>,
        /// Read at most RATE bytes per second (size suffixes as qemu-img's).
        #[arg(short = 'r')]
        rate: Option<String>,
        /// Write zeros for source sectors that cannot be read, with a warning each, and go on.
        #[arg(long)]
        salvage: bool,
        /// Copy offloading: data stored as is in the source file is copied inside the kernel
        /// (copy_file_range), without zero detection.
        #[arg(short = 'C')]
        copy_offload: bool,
        /// Share the image with writers (a running VM): read without QEMU's reader locks.
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Refuse backing files, data files and non-local names.
        #[arg(long)]
        untrusted: bool,
        src: PathBuf,
        dst: PathBuf,
    },
    /// Change the virtual size of an image.
    Resize(ResizeArgs),
    /// Import a disk image or archive from a file or standard input onto a volume target,
    /// streaming (no scratch space), with CDI's sizing rules.
    Import(ImportArgs),
    /// Print the file size an image needs when converted to OUTPUT_FMT (as qemu-img measure).
    Measure(MeasureArgs),
    /// Print the volume size CDI requests for an image (filesystem overhead included), and the
    /// usable size of a volume.
    PvcSize(PvcSizeArgs),
    /// Send an image to a CDI upload proxy or upload server, as virtctl image-upload does
    /// once the volume is ready.
    Upload(UploadArgs),
    /// Make a cloud-init NoCloud seed disk: an ISO labelled cidata holding user-data,
    /// meta-data and optionally network-config and vendor-data.
    Cidata(CidataArgs),
    /// Build a KubeVirt containerDisk (an OCI image holding the disk under /disk, owned by
    /// 107:107) as an OCI archive or layout, or push it to a registry.
    Containerdisk(containerdisk::ContainerdiskArgs),
    /// Create a new, empty image.
    Create {
        /// Format: raw or qcow2.
        #[arg(short = 'f', default_value = "raw")]
        format: String,
        /// Options, qemu-img style (see convert -o; raw: preallocation=off|falloc|full).
        #[arg(short = 'o', action = clap::ArgAction::Append)]
        options: Vec<String>,
        /// Backing file (qcow2).
        #[arg(short = 'b')]
        backing: Option<String>,
        /// Backing file format.
        #[arg(short = 'F')]
        backing_format: Option<String>,
        /// Do not open the backing file (its size must then be given).
        #[arg(short = 'u')]
        unsafe_backing: bool,
        #[arg(short = 'q')]
        quiet: bool,
        /// The image to create; with -f iso, the first source (see below).
        file: PathBuf,
        /// Size with an optional k/M/G/T suffix (default: the backing file's size).
        size: Option<String>,
        /// With -f iso: `vdisk create -f iso [-o volid=NAME,...] SOURCE... OUT.iso`. A
        /// directory source puts its contents at the root, a file its own name; `ISO/PATH=SRC`
        /// puts SRC at ISO/PATH. OUT `-` writes the image to standard output.
        #[arg(hide = true)]
        more: Vec<PathBuf>,
    },
    /// Compare the guest contents of two images (exit 0 same, 1 different, 2 error).
    Compare {
        #[arg(short = 'f')]
        fmt_a: Option<String>,
        #[arg(short = 'F')]
        fmt_b: Option<String>,
        /// Strict: images of different size differ.
        #[arg(short = 's')]
        strict: bool,
        #[arg(short = 'q')]
        quiet: bool,
        #[arg(short = 'p')]
        progress: bool,
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        #[arg(long)]
        untrusted: bool,
        a: PathBuf,
        b: PathBuf,
    },
    /// List (-l), create (-c), apply (-a) or delete (-d) internal snapshots of a qcow2 image.
    Snapshot {
        /// List snapshots.
        #[arg(short = 'l')]
        list: bool,
        /// Create a snapshot named NAME.
        #[arg(short = 'c', value_name = "NAME")]
        create: Option<String>,
        /// Revert the disk to snapshot NAME (id or name).
        #[arg(short = 'a', value_name = "NAME")]
        apply: Option<String>,
        /// Delete snapshot NAME (id or name).
        #[arg(short = 'd', value_name = "NAME")]
        delete: Option<String>,
        #[arg(short = 'q')]
        quiet: bool,
        #[arg(short = 'f')]
        format: Option<String>,
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        file: PathBuf,
    },
    /// Change the backing file of a qcow2 image; without -u, first copy into it whatever the
    /// change would alter, so the guest sees the same disk.
    Rebase {
        /// Image format (detected when omitted).
        #[arg(short = 'f')]
        format: Option<String>,
        /// New backing file ("" for none), stored as given, opened beside the image.
        #[arg(short = 'b', allow_hyphen_values = true)]
        backing: String,
        /// New backing file's format.
        #[arg(short = 'F')]
        backing_format: Option<String>,
        /// Unsafe: only change the name (the new file is not opened).
        #[arg(short = 'u')]
        unsafe_mode: bool,
        /// Show progress.
        #[arg(short = 'p')]
        progress: bool,
        #[arg(short = 'q')]
        quiet: bool,
        /// Cache mode (accepted; vdisk uses the page cache).
        #[arg(short = 't')]
        cache: Option<String>,
        /// Source cache mode (accepted; vdisk uses the page cache).
        #[arg(short = 'T')]
        src_cache: Option<String>,
        file: PathBuf,
    },
    /// Write an overlay's data into its backing file (or -b BASE further down), then empty it.
    Commit {
        #[arg(short = 'f')]
        format: Option<String>,
        /// Commit into this image of the chain (implies -d unless it is the backing file).
        #[arg(short = 'b')]
        base: Option<PathBuf>,
        /// Keep the committed data in the image (do not empty it).
        #[arg(short = 'd')]
        keep: bool,
        #[arg(short = 'p')]
        progress: bool,
        #[arg(short = 'q')]
        quiet: bool,
        /// Cache mode (accepted; vdisk uses the page cache).
        #[arg(short = 't')]
        cache: Option<String>,
        file: PathBuf,
    },
    /// Change a qcow2 image's options: compat, refcount_bits, lazy_refcounts.
    Amend {
        #[arg(short = 'f')]
        format: Option<String>,
        #[arg(short = 'o', action = clap::ArgAction::Append, required = true)]
        options: Vec<String>,
        #[arg(short = 'p')]
        progress: bool,
        #[arg(short = 'q')]
        quiet: bool,
        /// Cache mode (accepted; vdisk uses the page cache).
        #[arg(short = 't')]
        cache: Option<String>,
        /// Accepted for qemu-img compatibility.
        #[arg(long)]
        force: bool,
        file: PathBuf,
    },
    /// Copy an image, or a range of it, to a new image: if=IN of=OUT [bs=SIZE] [count=N]
    /// [skip=N] (count and skip in blocks of bs, default 512; count counts from the start).
    Dd {
        #[arg(short = 'f')]
        format: Option<String>,
        /// Output format: raw (default) or qcow2.
        #[arg(short = 'O', default_value = "raw")]
        out_format: String,
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Operands: if=, of=, bs=, count=, skip=.
        #[arg(required = true)]
        operands: Vec<String>,
    },
    /// Time COUNT equal requests against an image (reads; -w writes, raw images).
    Bench {
        /// Requests in all.
        #[arg(short = 'c', default_value = "75000")]
        count: u64,
        /// Requests in flight.
        #[arg(short = 'd', default_value = "64")]
        depth: u32,
        #[arg(short = 'f')]
        format: Option<String>,
        /// First request's offset.
        #[arg(short = 'o', default_value = "0")]
        offset: String,
        /// Bytes per request.
        #[arg(short = 's', default_value = "4096")]
        buffer_size: String,
        /// Distance between requests (default: the buffer size).
        #[arg(short = 'S')]
        step: Option<String>,
        /// Cache mode (accepted; vdisk uses the page cache).
        #[arg(short = 't')]
        cache: Option<String>,
        /// AIO engine (threads, native, io_uring: accepted; vdisk uses threads).
        #[arg(short = 'i')]
        aio: Option<String>,
        /// Native AIO (accepted; vdisk uses threads).
        #[arg(short = 'n')]
        native: bool,
        /// Write instead of read (raw images).
        #[arg(short = 'w')]
        write: bool,
        /// Byte to write.
        #[arg(long, default_value = "0")]
        pattern: u8,
        /// Flush after this many writes.
        #[arg(long = "flush-interval", default_value = "0")]
        flush_interval: u64,
        /// Accepted for qemu-img compatibility.
        #[arg(long = "no-drain")]
        no_drain: bool,
        #[arg(short = 'q')]
        quiet: bool,
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        file: PathBuf,
    },
    /// Change a persistent dirty bitmap of a qcow2 image (--add, --remove, --clear, --enable,
    /// --disable, --merge SOURCE), in that order when several are given.
    Bitmap {
        /// Add an empty bitmap.
        #[arg(long)]
        add: bool,
        /// Remove it.
        #[arg(long)]
        remove: bool,
        /// Clear its bits.
        #[arg(long)]
        clear: bool,
        /// Enable it (track writes).
        #[arg(long)]
        enable: bool,
        /// Disable it.
        #[arg(long)]
        disable: bool,
        /// Set every bit bitmap SOURCE has set.
        #[arg(long, value_name = "SOURCE")]
        merge: Option<String>,
        /// The image holding the --merge source (default: this one).
        #[arg(short = 'b')]
        source_file: Option<PathBuf>,
        /// Its format.
        #[arg(short = 'F')]
        source_format: Option<String>,
        /// Granularity of an added bitmap (default: the cluster size).
        #[arg(short = 'g')]
        granularity: Option<String>,
        #[arg(short = 'f')]
        format: Option<String>,
        file: PathBuf,
        bitmap: String,
    },
    /// Check a qcow2 image's consistency (exit 0 clean, 1 check failed, 2 corrupt, 3 leaks).
    Check {
        #[arg(short = 'f')]
        format: Option<String>,
        /// Output format: human or json.
        #[arg(long = "output", default_value = "human")]
        output: String,
        /// Quiet: no summary on stdout (problems are still listed on stderr).
        #[arg(short = 'q')]
        quiet: bool,
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        /// Repair: leaks (refcounts above their use) or all (every refcount and flag
        /// problem), by rebuilding the refcount structures crash-safely.
        #[arg(short = 'r')]
        repair: Option<String>,
        file: PathBuf,
    },
}

#[derive(Args)]
struct ImportArgs {
    /// kubevirt (a disk image) or archive (a tar unpacked into TARGET).
    #[arg(long, default_value = "kubevirt")]
    content_type: String,
    /// Requested volume size (Kubernetes quantity, e.g. 10Gi): caps the disk and its expansion.
    #[arg(long)]
    size: Option<String>,
    /// Filesystem overhead fraction (0, 1 or 0.NNN).
    #[arg(long, default_value = "0.06")]
    filesystem_overhead: String,
    /// Preallocate the disk.
    #[arg(long)]
    preallocation: bool,
    /// Accepted for clarity: streams are always untrusted (no backing or data files).
    #[arg(long)]
    untrusted: bool,
    /// Memory for qcow2 data that arrives before its tables and for mapping state, in MiB (the
    /// reader's fixed buffers come on top; everything is counted in one budget).
    #[arg(long, default_value = "32")]
    memory_budget: u64,
    /// Refuse such images instead of spilling to a temporary file on the target volume.
    #[arg(long)]
    no_spill: bool,
    /// Write the target with O_DIRECT (no page cache) where it supports it.
    #[arg(long)]
    direct: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Source file, or - for standard input.
    src: PathBuf,
    /// Disk file, block device, or directory (archives).
    target: PathBuf,
}

#[derive(Args)]
struct UploadArgs {
    /// Do not verify the server certificate.
    #[arg(long)]
    insecure: bool,
    /// CA certificates (PEM) to trust for the server, besides the system's.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS.
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// Upload token, sent as Authorization: Bearer.
    #[arg(long)]
    token: Option<String>,
    /// Use the async endpoint without asking the server.
    #[arg(long = "async", conflicts_with = "sync")]
    use_async: bool,
    /// Use the sync endpoint without asking the server.
    #[arg(long)]
    sync: bool,
    /// The file is a tar archive for the upload-archive endpoint.
    #[arg(long, conflicts_with_all = ["use_async", "sync"])]
    archive: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Upload proxy or server URL (https:// when no scheme is given).
    url: String,
    /// Image file to send.
    image: PathBuf,
}

#[derive(Args)]
struct MeasureArgs {
    /// Output format: raw (default) or qcow2.
    #[arg(short = 'O', default_value = "raw")]
    out_format: String,
    /// Output options, as for convert -o.
    #[arg(short = 'o', action = clap::ArgAction::Append)]
    options: Vec<String>,
    /// Measure an empty disk of this size instead of an image.
    #[arg(long)]
    size: Option<String>,
    /// Image format (detected when omitted).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Measure internal snapshot (id, name, snapshot.id=ID or snapshot.name=NAME).
    #[arg(short = 'l')]
    snapshot: Option<String>,
    /// Share the image with writers (a running VM): read without QEMU's reader locks.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// human or json.
    #[arg(long = "output", default_value = "human")]
    output: String,
    image: Option<PathBuf>,
}

#[derive(Args)]
struct CidataArgs {
    /// The user-data file (#cloud-config, a script, MIME multipart, ...).
    #[arg(long)]
    user_data: PathBuf,
    /// The meta-data file (default: an instance-id hashed from the other files).
    #[arg(long)]
    meta_data: Option<PathBuf>,
    /// A network-config file (network configuration version 1 or 2).
    #[arg(long)]
    network_config: Option<PathBuf>,
    /// A vendor-data file.
    #[arg(long)]
    vendor_data: Option<PathBuf>,
    /// Output format: raw (the ISO itself) or qcow2.
    #[arg(short = 'O', default_value = "raw")]
    out_format: String,
    /// qcow2 creation options (as for create -o).
    #[arg(short = 'o', action = clap::ArgAction::Append)]
    options: Vec<String>,
    #[arg(short = 'q')]
    quiet: bool,
    /// The seed disk to write.
    output: PathBuf,
}

#[derive(Args)]
struct PvcSizeArgs {
    /// Filesystem overhead fraction.
    #[arg(long, default_value = "0.06")]
    filesystem_overhead: String,
    /// A volume size (Kubernetes quantity): also print the usable size it gives.
    #[arg(long)]
    size: Option<String>,
    /// human or json.
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// Image to measure (its virtual size is the requested size).
    image: Option<PathBuf>,
}

#[derive(Args)]
struct ResizeArgs {
    /// Allow shrinking (data past the new end is lost).
    #[arg(long)]
    shrink: bool,
    /// Preallocate the new area: off, metadata (qcow2), falloc or full.
    #[arg(long, default_value = "off")]
    preallocation: String,
    /// Image format (detected when omitted).
    #[arg(short = 'f')]
    format: Option<String>,
    #[arg(short = 'q')]
    quiet: bool,
    file: PathBuf,
    /// New size, or +SIZE / -SIZE relative to the current one.
    #[arg(allow_hyphen_values = true)]
    size: String,
}

#[derive(Args)]
struct Common {
    /// Image format (detected when omitted).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Refuse backing files, data files and non-local names.
    #[arg(long)]
    untrusted: bool,
    /// Share the image with writers (a running VM): read without QEMU's reader locks.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
}

fn parse_format(f: Option<&str>) -> Result<Option<Format>, Error> {
    f.map(|n| {
        Format::from_name(n).ok_or_else(|| Error::invalid(format!("unknown file format '{n}'")))
    })
    .transpose()
}

fn opts(format: Option<&str>, untrusted: bool, force_share: bool) -> Result<OpenOptions, Error> {
    Ok(OpenOptions {
        format: parse_format(format)?,
        lock: if force_share {
            LockMode::ForceShare
        } else {
            LockMode::Read
        },
        policy: if untrusted {
            Policy::Untrusted
        } else {
            Policy::Trusted
        },
        ..OpenOptions::default()
    })
}

/// qemu-img size syntax: bytes, or a k/M/G/T/P/E suffix (powers of 1024).
fn parse_size(s: &str) -> Result<u64, Error> {
    vdisk::qcow2::writer::parse_qemu_size(s)
}

fn name_chain(img: &Image) -> Vec<String> {
    let mut names = Vec::new();
    let mut cur = Some(img);
    while let Some(i) = cur {
        let path = i.path().unwrap_or(std::path::Path::new(""));
        // Data of an image with an external data file lives in that file.
        let name = match i.qcow2().and_then(|q| q.header().data_file.as_deref()) {
            Some(d) if !std::path::Path::new(d).is_absolute() => {
                path.parent().unwrap_or(path).join(d).display().to_string()
            }
            Some(d) => d.to_string(),
            None => path.display().to_string(),
        };
        names.push(name);
        cur = i.qcow2().and_then(|q| q.backing());
    }
    names
}

fn run(cli: Cli) -> Result<u8, Error> {
    let mut out = std::io::stdout().lock();
    let w = |out: &mut std::io::StdoutLock, s: &str| {
        out.write_all(s.as_bytes())
            .map_err(|e| Error::io("cannot write output", e))
    };
    match cli.cmd {
        Cmd::Info {
            common,
            output,
            backing_chain,
            file,
        } => {
            let mut o = opts(
                common.format.as_deref(),
                common.untrusted,
                common.force_share,
            )?;
            o.metadata_only = !backing_chain;
            let img = Image::open(&file, &o)?;
            // Each image named as qemu names it: the next one by its resolved backing name.
            let mut infos = vec![ImageInfo::new(&img, &file.display().to_string())?];
            let mut cur = img.qcow2().and_then(|q| q.backing());
            while let (true, Some(b)) = (backing_chain, cur) {
                let name = infos
                    .last()
                    .and_then(|i| i.full_backing_filename.clone())
                    .unwrap_or_default();
                infos.push(ImageInfo::new(b, &name)?);
                cur = b.qcow2().and_then(|q| q.backing());
            }
            let text = match output.as_str() {
                "json" if backing_chain => vdisk::qjson::pretty(&vdisk::qjson::QValue::List(
                    infos.iter().map(ImageInfo::to_qobject).collect(),
                )),
                "json" => infos[0].to_json_text(),
                "human" => infos
                    .iter()
                    .map(ImageInfo::to_human)
                    .collect::<Vec<_>>()
                    .join("\n"),
                o => {
                    return Err(Error::invalid(format!(
                        "--output must be human or json, not '{o}'"
                    )));
                }
            };
            w(&mut out, &text)?;
        }
        Cmd::Map {
            common,
            output,
            start_offset,
            max_length,
            file,
        } => {
            use vdisk::qcow2::writer::parse_qemu_number;
            let start = start_offset
                .as_deref()
                .map(|s| parse_qemu_number("start offset", s))
                .transpose()?
                .unwrap_or(0);
            let end = match max_length.as_deref() {
                Some(s) => start.saturating_add(parse_qemu_number("max length", s)?),
                None => u64::MAX,
            };
            let img = Image::open(
                &file,
                &opts(
                    common.format.as_deref(),
                    common.untrusted,
                    common.force_share,
                )?,
            )?;
            // Streamed as found: a hostile image can describe hundreds of millions of extents.
            let mut bw = std::io::BufWriter::new(&mut out);
            match output.as_str() {
                "json" => write_map_json_in(&img, start..end, &mut bw),
                "human" => write_map_human_in(&img, &name_chain(&img), start..end, &mut bw),
                o => {
                    return Err(Error::invalid(format!(
                        "--output must be human or json, not '{o}'"
                    )));
                }
            }
            .map_err(|e| e.with_path(&file))?;
            bw.flush()
                .map_err(|e| Error::io("cannot write output", e))?;
        }
        Cmd::Convert {
            src_format,
            out_format,
            sparse,
            progress,
            compress,
            options,
            snapshot,
            workers,
            untrusted,
            force_share,
            quiet,
            no_create,
            target_is_zero,
            backing,
            backing_format,
            cache,
            src_cache,
            rate,
            salvage,
            copy_offload,
            oob,
            src,
            dst,
            ..
        } => {
            if copy_offload && (compress || out_format != "raw") {
                return Err(Error::invalid(
                    "copy offloading (-C) writes raw output only and cannot compress",
                ));
            }
            let progress = progress && !quiet;
            check_cache(cache.as_deref())?;
            check_cache(src_cache.as_deref())?;
            if no_create && compress {
                return Err(Error::invalid(
                    "-c cannot be combined with -n (an existing target is written uncompressed)",
                ));
            }
            if target_is_zero && !no_create {
                return Err(Error::invalid("--target-is-zero requires use of -n flag"));
            }
            if options.iter().any(|o| is_options_help(o)) {
                return print_options_help(&mut out, &out_format);
            }
            let mut raw_prealloc = Prealloc::Off;
            let target = match Format::from_name(&out_format) {
                Some(Format::Raw) => {
                    if compress {
                        return Err(Error::invalid(
                            "compression is only supported for qcow2 output",
                        ));
                    }
                    if backing.is_some() {
                        return Err(Error::invalid(
                            "Backing file not supported for file format 'raw'",
                        ));
                    }
                    let mut co = CreateOptions::default();
                    for o in &options {
                        co.apply(o)?;
                    }
                    raw_prealloc = co.prealloc;
                    Target::Raw
                }
                Some(Format::Qcow2) => {
                    let mut co = CreateOptions::default();
                    for o in &options {
                        co.apply(o)?;
                    }
                    if let Some(b) = &backing {
                        let f = backing_format
                            .clone()
                            .or_else(|| co.backing.take().map(|x| x.1));
                        co.backing = Some((b.clone(), f.unwrap_or_default()));
                    }
                    Target::Qcow2 {
                        options: co,
                        compress,
                    }
                }
                _ => {
                    return Err(Error::new(
                        vdisk::ErrorKind::UnsupportedFormat,
                        format!("output format '{out_format}' is not supported (raw and qcow2)"),
                    ));
                }
            };
            let mut o = opts(src_format.as_deref(), untrusted, force_share)?;
            o.snapshot = snapshot;
            let img = Image::open(&src, &o)?;
            let min_sparse = parse_size(&sparse)?;
            let mut last = -1i64;
            let mut show = |done: u64, total: u64| {
                let pct = if total == 0 {
                    10000
                } else {
                    (done as u128 * 10000 / total as u128) as i64
                };
                if pct != last {
                    last = pct;
                    let mut so = std::io::stdout().lock();
                    let _ = write!(so, "    ({}.{:02}/100%)\r", pct / 100, pct % 100);
                    let _ = so.flush();
                }
                true
            };
            let warn = |m: &str| eprintln!("vdisk: warning: {m}");
            let mut co = ConvertOptions {
                min_sparse,
                threads: workers.unwrap_or(0),
                rate_limit: rate
                    .as_deref()
                    .map(|r| vdisk::qcow2::writer::parse_qemu_number("rate limit", r))
                    .transpose()?
                    .unwrap_or(0),
                salvage,
                warn: Some(&warn),
                copy_offload,
                // An existing target (a block device, or -n) shows every write as it happens:
                // in increasing order unless -W, as qemu-img. A new file appears only when
                // complete, so its writes go in any order.
                in_order: !oob
                    && (no_create
                        || std::fs::metadata(&dst).is_ok_and(|m| {
                            use std::os::unix::fs::FileTypeExt;
                            m.file_type().is_block_device()
                        })),
                ..Default::default()
            };
            if progress {
                co.progress = Some(&mut show);
            }
            if no_create {
                let fmt = match &target {
                    Target::Raw => Format::Raw,
                    Target::Qcow2 { .. } => Format::Qcow2,
                };
                vdisk::convert::convert_into_existing(&img, &dst, fmt, target_is_zero, &mut co)
                    .map_err(|e| e.with_path(&src))?;
            } else {
                convert_path(&img, &dst, &target, &mut co).map_err(|e| e.with_path(&src))?;
                vdisk::create::preallocate_file(&dst, raw_prealloc)?;
            }
            if progress {
                w(&mut out, "\n")?;
            }
        }
        Cmd::Create {
            format,
            options,
            backing,
            backing_format,
            unsafe_backing,
            file,
            size,
            more,
            quiet,
        } => {
            if options.iter().any(|o| is_options_help(o)) {
                return print_options_help(&mut out, &format);
            }
            let fmt = parse_format(Some(&format))?.unwrap_or(Format::Raw);
            if fmt == Format::Iso {
                let mut args = vec![file];
                args.extend(size.map(PathBuf::from));
                args.extend(more);
                return create_iso(&mut out, &options, args, quiet);
            }
            if !more.is_empty() {
                return Err(Error::invalid("too many arguments (FILE [SIZE])"));
            }
            let mut co = CreateOptions::default();
            for o in &options {
                co.apply(o)?;
            }
            if let Some(b) = backing {
                let bf = backing_format
                    .or_else(|| co.backing.as_ref().map(|x| x.1.clone()))
                    .unwrap_or_default();
                co.backing = Some((b, bf));
            }
            if fmt != Format::Qcow2 && co.backing.is_some() {
                return Err(Error::invalid("backing files are only supported for qcow2"));
            }
            let bytes = match size {
                Some(s) => parse_size(&s)?,
                None => match &co.backing {
                    Some((b, bf)) if !unsafe_backing => {
                        let p = std::path::Path::new(b);
                        let p = if p.is_absolute() {
                            p.to_path_buf()
                        } else {
                            file.parent().unwrap_or(std::path::Path::new("")).join(p)
                        };
                        let o = OpenOptions {
                            format: parse_format(Some(bf))?,
                            metadata_only: true,
                            ..OpenOptions::default()
                        };
                        Image::open(&p, &o)?.virtual_size()
                    }
                    _ => return Err(Error::invalid("image creation requires a size parameter")),
                },
            };
            vdisk::create::create(&file, fmt, bytes, &co)?;
        }
        Cmd::Compare {
            fmt_a,
            fmt_b,
            strict,
            quiet,
            progress,
            a,
            b,
            untrusted,
            force_share,
            ..
        } => {
            let ia = Image::open(&a, &opts(fmt_a.as_deref(), untrusted, force_share)?)?;
            let ib = Image::open(&b, &opts(fmt_b.as_deref(), untrusted, force_share)?)?;
            let say =
                |out: &mut std::io::StdoutLock, s: &str| if quiet { Ok(()) } else { w(out, s) };
            // qemu-img's progress for compare: redrawn in steps of at least 2%; -q wins.
            let show = progress && !quiet;
            let mut last = -1f64;
            let mut draw = |done: u64, total: u64| {
                let pct = if total == 0 {
                    100.0
                } else {
                    done as f64 * 100.0 / total as f64
                };
                if show && (last < 0.0 || pct - last >= 2.0 || (pct >= 100.0 && last < 100.0)) {
                    last = pct;
                    let mut so = std::io::stdout().lock();
                    let _ = write!(so, "    ({pct:.2}/100%)\r");
                    let _ = so.flush();
                }
            };
            draw(0, 1);
            let r = compare_with_progress(&ia, &ib, strict, &mut draw)?;
            // qemu-img warns of different sizes once the common part matched, before it
            // looks at the longer image's tail.
            let common = ia.virtual_size().min(ib.virtual_size());
            let tail_reached = match r {
                Comparison::Identical => true,
                Comparison::Differ(off) => off >= common,
                _ => false,
            };
            if ia.virtual_size() != ib.virtual_size() && !strict && tail_reached {
                say(&mut out, "Warning: Image size mismatch!\n")?;
            }
            let (text, code) = match r {
                Comparison::Identical => ("Images are identical.\n".to_string(), 0),
                Comparison::Differ(off) => (format!("Content mismatch at offset {off}!\n"), 1),
                Comparison::SizeMismatch => ("Strict mode: Image size mismatch!\n".to_string(), 1),
                Comparison::StatusMismatch(off) => (
                    format!("Strict mode: Offset {off} block status mismatch!\n"),
                    1,
                ),
            };
            say(&mut out, &text)?;
            if show {
                w(&mut out, "\n")?;
            }
            return Ok(code);
        }
        Cmd::Import(a) => {
            use vdisk::ingest::{ContentType, ImportOptions, ImportTarget, import};
            let content = match a.content_type.as_str() {
                "kubevirt" => ContentType::Kubevirt,
                "archive" => ContentType::Archive,
                o => return Err(Error::invalid(format!("unknown content type '{o}'"))),
            };
            let target = if content == ContentType::Archive {
                ImportTarget::Directory(a.target.clone())
            } else if std::fs::metadata(&a.target).is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_block_device()
            }) {
                ImportTarget::Device(a.target.clone())
            } else {
                ImportTarget::File(a.target.clone())
            };
            let (src, input_size): (vdisk::stream::Stream<'_>, Option<u64>) =
                if a.src.as_os_str() == "-" {
                    vdisk::io::enlarge_pipe(&std::io::stdin(), 1 << 20);
                    // The descriptor itself, not `Stdin`'s buffered lock: reads go straight
                    // into the reader's chunks, and the reader may run on another thread.
                    use std::os::fd::AsFd;
                    let fd = std::io::stdin()
                        .as_fd()
                        .try_clone_to_owned()
                        .map_err(|e| Error::io("cannot read standard input", e))?;
                    (Box::new(std::fs::File::from(fd)), None)
                } else {
                    let f = std::fs::File::open(&a.src)
                        .map_err(|e| Error::io("cannot open source", e).with_path(&a.src))?;
                    let len = f.metadata().ok().map(|m| m.len());
                    (Box::new(f), len)
                };
            let log = |m: &str| eprintln!("vdisk: {m}");
            let mut show = |read: u64, total: Option<u64>| {
                if let Some(t) = total.filter(|&t| t > 0) {
                    let pct = (read as u128 * 10000 / t as u128).min(10000) as u64;
                    print!("    ({}.{:02}/100%)\r", pct / 100, pct % 100);
                } else {
                    print!("    {} MiB\r", read >> 20);
                }
                let _ = std::io::stdout().flush();
                true
            };
            let mut o = ImportOptions {
                content,
                overhead: vdisk::sizing::parse_overhead(&a.filesystem_overhead)?,
                requested_size: a
                    .size
                    .as_deref()
                    .map(vdisk::sizing::parse_quantity)
                    .transpose()?,
                preallocate: a.preallocation,
                memory_budget: a.memory_budget << 20,
                allow_spill: !a.no_spill,
                input_size,
                log: Some(&log),
                direct_io: a.direct,
                ..ImportOptions::default()
            };
            if a.progress {
                o.progress = Some(&mut show);
            }
            let r = import(src, &target, &mut o)?;
            if a.progress {
                w(&mut out, "\n")?;
            }
            let layers: Vec<&str> = r.layers.iter().map(|f| f.name()).collect();
            eprintln!(
                "vdisk: imported {} ({}{}) : {} bytes read, {} written, virtual size {}, disk size {}{}",
                a.src.display(),
                if layers.is_empty() {
                    String::new()
                } else {
                    format!("{} > ", layers.join(" > "))
                },
                r.format.map(|f| f.name()).unwrap_or("?"),
                r.bytes_read,
                r.bytes_written,
                r.virtual_size,
                r.disk_size,
                if r.preallocation_applied {
                    ", preallocated"
                } else {
                    ""
                }
            );
        }
        Cmd::Measure(a) => {
            use vdisk::measure::{Source, measure};
            let mut co = CreateOptions::default();
            let target = parse_format(Some(&a.out_format))?.unwrap_or(Format::Raw);
            for o in &a.options {
                if target == Format::Qcow2 {
                    co.apply(o)?;
                } else {
                    // raw takes preallocation (and size) only.
                    for item in o.split(',').filter(|i| !i.is_empty()) {
                        let k = item.split_once('=').map_or(item, |kv| kv.0);
                        if k != "preallocation" && k != "size" {
                            return Err(Error::invalid(format!("Invalid parameter '{k}'")));
                        }
                    }
                    co.apply(o)?;
                }
            }
            let img;
            let src = match (&a.size, &a.image) {
                (Some(_), Some(_)) => {
                    return Err(Error::invalid(
                        "--size N cannot be used together with a filename.",
                    ));
                }
                (None, None) => {
                    return Err(Error::invalid(
                        "Either --size N or one filename must be specified.",
                    ));
                }
                (Some(n), None) => Source::Size(parse_size(n)?),
                (None, Some(p)) => {
                    let mut o = opts(a.format.as_deref(), false, a.force_share)?;
                    o.snapshot = a.snapshot.clone();
                    img = Image::open(p, &o)?;
                    Source::Image(&img)
                }
            };
            let m = measure(&src, target, &co)?;
            match a.output.as_str() {
                "json" => w(&mut out, &m.to_json_text())?,
                "human" => w(&mut out, &m.to_human())?,
                o => {
                    return Err(Error::invalid(format!(
                        "--output must be human or json, not '{o}'"
                    )));
                }
            }
        }
        Cmd::Cidata(a) => {
            let target = match parse_format(Some(&a.out_format))? {
                Some(Format::Raw) => Target::Raw,
                Some(Format::Qcow2) => {
                    let mut co = CreateOptions::default();
                    for o in &a.options {
                        co.apply(o)?;
                    }
                    Target::Qcow2 {
                        options: co,
                        compress: false,
                    }
                }
                _ => return Err(Error::invalid("cidata writes raw or qcow2 (-O)")),
            };
            if matches!(target, Target::Raw) && !a.options.is_empty() {
                return Err(Error::invalid("-o options apply to -O qcow2 only"));
            }
            let seed = vdisk::iso::Seed {
                user_data: a.user_data,
                meta_data: a.meta_data,
                network_config: a.network_config,
                vendor_data: a.vendor_data,
            };
            let date = vdisk::civil::source_date_epoch()?;
            let r = vdisk::iso::write_seed(&seed, &a.output, &target, date)?;
            if !a.quiet {
                w(
                    &mut out,
                    &format!(
                        "Wrote seed '{}' (label cidata, {} files, ISO {} bytes, fmt={})\n",
                        a.output.display(),
                        r.files,
                        r.bytes,
                        a.out_format
                    ),
                )?;
            }
        }
        Cmd::PvcSize(a) => {
            let o = vdisk::sizing::parse_overhead(&a.filesystem_overhead)?;
            let virtual_size = match &a.image {
                Some(p) => {
                    let op = OpenOptions {
                        metadata_only: true,
                        ..OpenOptions::default()
                    };
                    Some(Image::open(p, &op)?.virtual_size())
                }
                None => None,
            };
            let pvc = a
                .size
                .as_deref()
                .map(vdisk::sizing::parse_quantity)
                .transpose()?;
            if virtual_size.is_none() && pvc.is_none() {
                return Err(Error::invalid("give an image, --size, or both"));
            }
            let required = virtual_size.map(|v| vdisk::sizing::required_space(o, v));
            let usable = pvc.map(|p| vdisk::sizing::usable_space(o, p));
            match a.output.as_str() {
                "json" => {
                    let mut m = serde_json::Map::new();
                    m.insert("filesystem-overhead".into(), serde_json::json!(o));
                    if let Some(v) = virtual_size {
                        m.insert("virtual-size".into(), serde_json::json!(v));
                    }
                    if let Some(r) = required {
                        m.insert("required-pvc-size".into(), serde_json::json!(r));
                    }
                    if let Some(p) = pvc {
                        m.insert("pvc-size".into(), serde_json::json!(p));
                    }
                    if let Some(u) = usable {
                        m.insert("usable-size".into(), serde_json::json!(u));
                    }
                    let s = serde_json::to_string_pretty(&serde_json::Value::Object(m))
                        .unwrap_or_default();
                    w(&mut out, &format!("{s}\n"))?;
                }
                "human" => {
                    let mut s = String::new();
                    if let Some(v) = virtual_size {
                        s += &format!("virtual size: {v}\n");
                    }
                    if let Some(r) = required {
                        s += &format!("required pvc size: {r}\n");
                    }
                    if let Some(u) = usable {
                        s += &format!("usable size: {u}\n");
                    }
                    w(&mut out, &s)?;
                }
                o => {
                    return Err(Error::invalid(format!(
                        "--output must be human or json, not '{o}'"
                    )));
                }
            }
        }
        Cmd::Containerdisk(a) => containerdisk::run(a, &mut out)?,
        Cmd::Upload(a) => {
            let read = |p: &PathBuf| {
                std::fs::read(p).map_err(|e| Error::io("cannot read", e).with_path(p))
            };
            let opts = vdisk::net::upload::UploadOptions {
                insecure: a.insecure,
                ca_pem: a.ca.as_ref().map(read).transpose()?,
                client_cert: match (&a.cert, &a.key) {
                    (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
                    _ => None,
                },
                token: a.token.clone(),
                force_async: match (a.use_async, a.sync) {
                    (true, _) => Some(true),
                    (_, true) => Some(false),
                    _ => None,
                },
                archive: a.archive,
            };
            // Drawn as convert -p draws it.
            let mut last = -1i64;
            let mut show = |done: u64, total: u64| {
                if !a.progress {
                    return;
                }
                let pct = if total == 0 {
                    10000
                } else {
                    (done as u128 * 10000 / total as u128) as i64
                };
                if pct != last {
                    last = pct;
                    let mut so = std::io::stdout().lock();
                    let _ = write!(so, "    ({}.{:02}/100%)\r", pct / 100, pct % 100);
                    let _ = so.flush();
                }
            };
            let r = vdisk::net::upload::upload(&a.url, &a.image, &opts, &mut show);
            if a.progress {
                w(&mut out, "\n")?;
            }
            let r = r?;
            let secs = r.elapsed.as_secs_f64();
            let rate = r.bytes as f64 / (1u64 << 20) as f64 / secs.max(1e-3);
            w(
                &mut out,
                &format!(
                    "Uploaded {} bytes to {} in {secs:.1} s ({rate:.1} MiB/s): HTTP {}\n",
                    r.bytes, r.endpoint, r.status
                ),
            )?;
        }
        Cmd::Resize(a) => {
            let mode = Prealloc::from_name(&a.preallocation).ok_or_else(|| {
                Error::invalid(format!("invalid preallocation mode '{}'", a.preallocation))
            })?;
            let change = vdisk::edit::SizeChange::parse(&a.size)?;
            vdisk::edit::resize(
                &a.file,
                parse_format(a.format.as_deref())?,
                change,
                a.shrink,
                mode,
            )?;
            if !a.quiet {
                w(&mut out, "Image resized.\n")?;
            }
        }
        Cmd::Snapshot {
            list,
            create,
            apply,
            delete,
            format,
            force_share,
            file,
            ..
        } => {
            let op = match (create, apply, delete) {
                (Some(n), None, None) => Some(SnapshotOp::Create(n)),
                (None, Some(n), None) => Some(SnapshotOp::Apply(n)),
                (None, None, Some(n)) => Some(SnapshotOp::Delete(n)),
                (None, None, None) => None,
                _ => return Err(Error::invalid("give only one of -l, -c, -a, -d")),
            };
            if let Some(op) = op {
                if list {
                    return Err(Error::invalid("give only one of -l, -c, -a, -d"));
                }
                vdisk::edit::snapshot(&file, &op)?;
                return Ok(0);
            }
            let mut o = opts(format.as_deref(), false, force_share)?;
            o.metadata_only = true;
            let img = Image::open(&file, &o)?;
            let snaps = img
                .qcow2()
                .map(|q| q.snapshots().to_vec())
                .unwrap_or_default();
            if !snaps.is_empty() {
                w(
                    &mut out,
                    &format!("Snapshot list:\n{}", snapshot_table(&snaps)),
                )?;
            }
        }
        Cmd::Bitmap {
            add,
            remove,
            clear,
            enable,
            disable,
            merge,
            source_file,
            source_format,
            granularity,
            format,
            file,
            bitmap,
        } => {
            use vdisk::edit::BitmapOp;
            let mut ops = Vec::new();
            if add {
                ops.push(BitmapOp::Add {
                    granularity: granularity
                        .as_deref()
                        .map(|g| vdisk::qcow2::writer::parse_qemu_number("granularity", g))
                        .transpose()?,
                    // --add --disable makes a disabled bitmap.
                    enabled: !disable,
                });
            } else if granularity.is_some() {
                return Err(Error::invalid("granularity only supported with --add"));
            }
            if clear {
                ops.push(BitmapOp::Clear);
            }
            if let Some(source) = merge {
                ops.push(BitmapOp::Merge {
                    source,
                    file: source_file
                        .map(|f| Ok::<_, Error>((f, parse_format(source_format.as_deref())?)))
                        .transpose()?,
                });
            } else if source_file.is_some() {
                return Err(Error::invalid("-b only supported with --merge"));
            }
            if enable {
                ops.push(BitmapOp::Enable);
            }
            if disable && !add {
                ops.push(BitmapOp::Disable);
            }
            if remove {
                ops.push(BitmapOp::Remove);
            }
            if ops.is_empty() {
                return Err(Error::invalid(
                    "Need at least one of --add, --delete, --clear, --enable, --disable, or --merge",
                ));
            }
            vdisk::edit::bitmap(&file, parse_format(format.as_deref())?, &bitmap, &ops)?;
        }
        Cmd::Bench {
            count,
            depth,
            format,
            offset,
            buffer_size,
            step,
            cache,
            aio,
            write,
            pattern,
            flush_interval,
            force_share,
            file,
            ..
        } => {
            use vdisk::qcow2::writer::parse_qemu_number;
            check_cache(cache.as_deref())?;
            if let Some(a) = aio
                .as_deref()
                .filter(|a| !matches!(*a, "threads" | "native" | "io_uring"))
            {
                return Err(Error::invalid(format!("Invalid aio option: {a}")));
            }
            let buffer_size = parse_qemu_number("buffer size", &buffer_size)?;
            let o = vdisk::bench::BenchOptions {
                count,
                depth,
                buffer_size,
                offset: parse_qemu_number("offset", &offset)?,
                step: match step.as_deref() {
                    Some(s) => parse_qemu_number("step_size", s)?,
                    None => buffer_size,
                },
                write,
                pattern,
                flush_interval,
            };
            let img = Image::open(
                &file,
                &opts(format.as_deref(), false, force_share || write)?,
            )?;
            let rw;
            let target: Option<&dyn vdisk::io::BlockIo> = if write {
                if img.format() != Format::Raw {
                    return Err(Error::new(
                        vdisk::ErrorKind::UnsupportedFeature,
                        "write benchmarks are supported for raw images only",
                    ));
                }
                rw = vdisk::io::FileIo::open_rw(&file, false)
                    .map_err(|e| Error::io("cannot open image for writing", e).with_path(&file))?;
                rw.lock(LockMode::Write).map_err(|e| e.with_path(&file))?;
                Some(&rw)
            } else {
                None
            };
            w(
                &mut out,
                &format!(
                    "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})\n",
                    o.count,
                    if write { "write" } else { "read" },
                    o.buffer_size,
                    o.depth,
                    o.offset,
                    o.step
                ),
            )?;
            let t = vdisk::bench::run(&img, target, &o).map_err(|e| e.with_path(&file))?;
            w(
                &mut out,
                &format!("Run completed in {:.3} seconds.\n", t.as_secs_f64()),
            )?;
        }
        Cmd::Dd {
            format,
            out_format,
            force_share,
            operands,
        } => {
            use vdisk::qcow2::writer::parse_qemu_number;
            let (mut input, mut output) = (None, None);
            let (mut bs, mut count, mut skip) = (512u64, None, 0u64);
            for op in &operands {
                let (k, v) = op
                    .split_once('=')
                    .ok_or_else(|| Error::invalid(format!("unrecognized operand {op}")))?;
                match k {
                    "if" => input = Some(PathBuf::from(v)),
                    "of" => output = Some(PathBuf::from(v)),
                    "bs" => {
                        bs = parse_qemu_number("bs", v)?;
                        if bs == 0 || bs > i32::MAX as u64 {
                            return Err(Error::invalid(
                                "Invalid bs specified. Must be between 1 and 2147483647.",
                            ));
                        }
                    }
                    "count" => count = Some(parse_qemu_number("count", v)?),
                    "skip" => skip = parse_qemu_number("skip", v)?,
                    _ => return Err(Error::invalid(format!("unrecognized operand {op}"))),
                }
            }
            let (Some(input), Some(output)) = (input, output) else {
                return Err(Error::invalid("Must specify both input and output files"));
            };
            let target = match parse_format(Some(&out_format))? {
                Some(Format::Raw) => Target::Raw,
                Some(Format::Qcow2) => Target::Qcow2 {
                    options: CreateOptions::default(),
                    compress: false,
                },
                _ => {
                    return Err(Error::new(
                        vdisk::ErrorKind::UnsupportedFormat,
                        format!("output format '{out_format}' is not supported (raw and qcow2)"),
                    ));
                }
            };
            let img = Image::open(&input, &opts(format.as_deref(), false, force_share)?)?;
            // As qemu-img: count counts blocks from the start of the input, skipped ones
            // included; the output holds what lies between skip and that end.
            let end = count
                .map_or(u64::MAX, |c| c.saturating_mul(bs))
                .min(img.virtual_size());
            let start = skip.saturating_mul(bs);
            if start > img.virtual_size() {
                return Err(Error::invalid("cannot skip to specified offset").with_path(&input));
            }
            let start = start.min(end);
            // The output is whole sectors, as qemu-img creates it.
            let len = end - start;
            let window = Image::window(img, start, len, len.next_multiple_of(512));
            let mut co = ConvertOptions::default();
            convert_path(&window, &output, &target, &mut co).map_err(|e| e.with_path(&input))?;
        }
        Cmd::Rebase {
            format,
            backing,
            backing_format,
            unsafe_mode,
            progress,
            quiet,
            cache,
            src_cache,
            file,
        } => {
            check_cache(cache.as_deref())?;
            check_cache(src_cache.as_deref())?;
            let bf = parse_format(backing_format.as_deref())?;
            let b = (!backing.is_empty()).then_some((backing.as_str(), bf));
            let mut bar = Bar::new(progress && !quiet, 1.0);
            vdisk::edit::rebase(
                &file,
                parse_format(format.as_deref())?,
                b,
                unsafe_mode,
                &mut |d, t| bar.show(d, t),
            )?;
            bar.end(&mut out)?;
        }
        Cmd::Commit {
            format,
            base,
            keep,
            progress,
            quiet,
            cache,
            file,
        } => {
            check_cache(cache.as_deref())?;
            let mut bar = Bar::new(progress && !quiet, 1.0);
            vdisk::edit::commit(
                &file,
                parse_format(format.as_deref())?,
                base.as_deref(),
                keep,
                &mut |d, t| bar.show(d, t),
            )?;
            bar.end(&mut out)?;
            if !quiet {
                w(&mut out, "Image committed.\n")?;
            }
        }
        Cmd::Amend {
            format,
            options,
            cache,
            file,
            ..
        } => {
            check_cache(cache.as_deref())?;
            if options.iter().any(|o| is_options_help(o)) {
                w(
                    &mut out,
                    "Amendable options:\n  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])\n  lazy_refcounts=<bool (on/off)> - Postpone refcount updates\n  refcount_bits=<num>    - Width of a reference count entry in bits\n",
                )?;
                return Ok(0);
            }
            let mut a = vdisk::edit::Amend::default();
            for o in &options {
                a.apply(o)?;
            }
            vdisk::edit::amend(&file, parse_format(format.as_deref())?, &a)?;
        }
        Cmd::Check {
            format,
            output,
            quiet,
            repair,
            force_share,
            file,
            ..
        } => {
            use vdisk::edit::{Repair, check_and_repair_locked};
            use vdisk::qcow2::check::Checked;
            if output != "human" && output != "json" {
                return Err(Error::invalid(format!(
                    "--output must be human or json, not '{output}'"
                )));
            }
            let mode = match repair.as_deref() {
                None => Repair::None,
                Some("leaks") => Repair::Leaks,
                Some("all") => Repair::All,
                Some(o) => return Err(Error::invalid(format!("-r takes leaks or all, not '{o}'"))),
            };
            let fmt = parse_format(format.as_deref())?;
            let lock = if force_share {
                LockMode::ForceShare
            } else {
                LockMode::Read
            };
            let outcome =
                check_and_repair_locked(&file, fmt, mode, lock, &mut |m: &str| eprintln!("{m}"))?;
            let (r, checked_format) = match outcome.checked {
                Checked::Qcow2(r) => (r, vdisk::Format::Qcow2),
                Checked::Other(f, r) => (r, f),
                Checked::NoCheck(_) => {
                    eprintln!("vdisk: This image format does not support checks");
                    return Ok(63);
                }
            };
            match outcome.repaired {
                Some((leaks, corruptions)) if !quiet && output == "human" => w(
                    &mut out,
                    &format!(
                        "The following inconsistencies were found and repaired:\n\n    {leaks} leaked clusters\n    {corruptions} corruptions\n\nDouble checking the fixed image now...\n"
                    ),
                )?,
                None if mode == Repair::Leaks && r.corruptions > 0 => {
                    eprintln!("vdisk: corruptions remain; repair them with -r all")
                }
                _ => {}
            }
            if !quiet {
                let s = match output.as_str() {
                    "json" => r.to_json(
                        &file.display().to_string(),
                        checked_format,
                        outcome.repaired,
                    ),
                    _ => r.to_human(),
                };
                w(&mut out, &s)?;
            }
            if r.check_errors > 0 {
                eprintln!("vdisk: Check failed");
            }
            return Ok(r.exit_code());
        }
    }
    Ok(0)
}

/// qemu-img's cache modes (`-t`, `-T`): accepted and checked; vdisk reads and writes through
/// the page cache (and flushes before it reports success) whatever the mode.
fn check_cache(mode: Option<&str>) -> Result<(), Error> {
    match mode {
        None | Some("none" | "writeback" | "unsafe" | "directsync" | "writethrough") => Ok(()),
        Some(m) => Err(Error::invalid(format!("Invalid cache option: {m}"))),
    }
}

/// qemu-img's progress line, redrawn when it moved by at least `step` percent.
struct Bar {
    on: bool,
    step: f64,
    last: f64,
}

impl Bar {
    fn new(on: bool, step: f64) -> Bar {
        let b = Bar {
            on,
            step,
            last: -1.0,
        };
        b.draw(0.0);
        b
    }

    fn draw(&self, pct: f64) {
        if self.on {
            let mut so = std::io::stdout().lock();
            let _ = write!(so, "    ({pct:.2}/100%)\r");
            let _ = so.flush();
        }
    }

    fn show(&mut self, done: u64, total: u64) {
        let pct = if total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / total as f64
        };
        if pct - self.last >= self.step || (pct >= 100.0 && self.last < 100.0) {
            self.last = pct;
            self.draw(pct);
        }
    }

    fn end(&self, out: &mut std::io::StdoutLock) -> Result<(), Error> {
        if self.on {
            out.write_all(b"\n")
                .map_err(|e| Error::io("cannot write output", e))?;
        }
        Ok(())
    }
}

/// `-o help`: the options vdisk takes for `format`.
/// `create -f iso`: gather the sources into one tree and write it (the last argument).
fn create_iso(
    out: &mut std::io::StdoutLock,
    options: &[String],
    mut args: Vec<PathBuf>,
    quiet: bool,
) -> Result<u8, Error> {
    use vdisk::iso::{IsoOptions, Tree, write_iso, write_iso_to};
    let mut o = IsoOptions::from_env()?;
    for spec in options {
        o.apply(spec)?;
    }
    let dst = match args.pop() {
        Some(d) if !args.is_empty() => d,
        _ => {
            return Err(Error::invalid(
                "usage: create -f iso [-o OPTIONS] SOURCE... OUT.iso",
            ));
        }
    };
    let mut tree = Tree::new(vdisk::iso::Meta::made(
        libc::S_IFDIR | 0o755,
        o.date.unwrap_or_else(vdisk::civil::now_secs),
    ));
    for a in &args {
        tree.add_source(a)?;
    }
    let r = if dst.as_os_str() == "-" {
        write_iso_to(&tree, &o, out)?
    } else {
        write_iso(&tree, &o, &dst)?
    };
    if !quiet && dst.as_os_str() != "-" {
        out.write_all(
            format!(
                "Formatting '{}', fmt=iso volid={} size={} files={} dirs={} symlinks={}\n",
                dst.display(),
                o.volume_id,
                r.bytes,
                r.files,
                r.dirs,
                r.symlinks
            )
            .as_bytes(),
        )
        .map_err(|e| Error::io("cannot write output", e))?;
    }
    Ok(0)
}

fn print_options_help(out: &mut std::io::StdoutLock, format: &str) -> Result<u8, Error> {
    let text = options_help(format).ok_or_else(|| {
        Error::new(
            vdisk::ErrorKind::UnsupportedFormat,
            format!("Format driver '{format}' does not support image creation"),
        )
    })?;
    out.write_all(text.as_bytes())
        .map_err(|e| Error::io("cannot write output", e))?;
    Ok(0)
}

/// Output cut short by the reader (`vdisk map ... | head`) is not an error.
fn is_broken_pipe(e: &Error) -> bool {
    use std::error::Error as _;
    e.source()
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind as K;
            let _ = e.print();
            // qemu-img exits 1 on a usage error, a missing verb included (clap's own code is
            // 2); asking for help or the version is not an error.
            return match e.kind() {
                K::DisplayHelp | K::DisplayVersion => ExitCode::SUCCESS,
                _ => ExitCode::from(1),
            };
        }
    };
    let is_compare = matches!(cli.cmd, Cmd::Compare { .. });
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vdisk: {e}");
            // qemu-img exits 1 on errors; compare uses 2 because 1 means "different".
            ExitCode::from(if is_compare { 2 } else { 1 })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("1.5M").unwrap(), 3 << 19);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("x").is_err());
        assert!(parse_size("-1").is_err());
    }
}
