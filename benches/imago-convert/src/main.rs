//! `imago-convert [-j THREADS] [-f qcow2|raw] SRC DST`: SRC (backing files opened as the image
//! names them) to a sparse raw DST with the imago crate, the way a careful user of its async API
//! would write a converter: the mapping walked once, data ranges read in 1 MiB pieces with
//! THREADS (default 2) tokio workers and twice as many reads in flight, all-zero 4 KiB blocks
//! left as holes (as `qemu-img convert -S 4k` and vdisk do), written with `pwrite`.

use futures::stream::{self, StreamExt};
use imago::file::File;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{FormatAccess, FormatDriverBuilder, Mapping, PermissiveImplicitOpenGate};
use std::os::unix::fs::FileExt;

const PIECE: u64 = 1 << 20;
const BLOCK: usize = 4096;

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut threads = 2usize;
    let mut format = "qcow2".to_string();
    while args.len() > 2 {
        match args.remove(0).as_str() {
            "-j" => threads = args.remove(0).parse().expect("-j N"),
            "-f" => format = args.remove(0),
            other => panic!("unknown option {other}"),
        }
    }
    let [src, dst] =
        <[String; 2]>::try_from(args).expect("usage: imago-convert [-j N] [-f FMT] SRC DST");
    if let Err(e) = run(&src, &dst, &format, threads.max(1)) {
        eprintln!("imago-convert: {e}");
        std::process::exit(1);
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

async fn open(src: &str, format: &str) -> std::io::Result<FormatAccess<File>> {
    let mut img = match format {
        "qcow2" => FormatAccess::new(
            Qcow2::<File>::builder_path(src)
                .open(PermissiveImplicitOpenGate::default())
                .await?,
        ),
        "raw" => FormatAccess::new(
            Raw::<File>::builder_path(src)
                .open(PermissiveImplicitOpenGate::default())
                .await?,
        ),
        f => return Err(std::io::Error::other(format!("format {f} not handled"))),
    };
    img.set_async_read_parallelization(2);
    Ok(img)
}

/// imago's futures are not `Send`: each OS thread opens its own instance of the image (its own
/// metadata caches) on a current-thread runtime and converts every THREADS-th piece.
fn run(src: &str, dst: &str, format: &str, threads: usize) -> std::io::Result<()> {
    let rt = runtime()?;
    let pieces = rt.block_on(async {
        let img = open(src, format).await?;
        let size = img.size();
        let out = std::fs::File::create(dst)?;
        out.set_len(size)?;
        let mut pieces = Vec::new();
        let mut off = 0;
        while off < size {
            let (m, len) = img.get_mapping(off, size - off).await?;
            if len == 0 {
                break;
            }
            if !matches!(m, Mapping::Zero { .. } | Mapping::Eof { .. }) {
                let mut p = off;
                while p < off + len {
                    let n = PIECE.min(off + len - p);
                    pieces.push((p, n));
                    p += n;
                }
            }
            off += len;
        }
        Ok::<_, std::io::Error>(pieces)
    })?;
    let out = std::fs::OpenOptions::new().write(true).open(dst)?;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let mine: Vec<(u64, u64)> = pieces.iter().copied().skip(t).step_by(threads).collect();
                let out = &out;
                s.spawn(move || -> std::io::Result<()> {
                    let rt = runtime()?;
                    rt.block_on(async {
                        let img = open(src, format).await?;
                        let results: Vec<std::io::Result<()>> = stream::iter(mine)
                            .map(|(p, n)| {
                                let img = &img;
                                async move {
                                    let mut buf = vec![0u8; n as usize];
                                    img.read(&mut buf[..], p).await?;
                                    write_sparse(out, &buf, p)
                                }
                            })
                            .buffer_unordered(2)
                            .collect()
                            .await;
                        results.into_iter().collect()
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(std::io::Error::other("thread panicked"))))
            .collect::<std::io::Result<()>>()
    })
}

/// Write `buf` at `at`, skipping all-zero 4 KiB blocks.
fn write_sparse(out: &std::fs::File, buf: &[u8], at: u64) -> std::io::Result<()> {
    let mut i = 0;
    while i < buf.len() {
        let e = (i + BLOCK).min(buf.len());
        if buf[i..e].iter().all(|&b| b == 0) {
            i = e;
            continue;
        }
        let mut j = e;
        while j < buf.len() {
            let k = (j + BLOCK).min(buf.len());
            if buf[j..k].iter().all(|&b| b == 0) {
                break;
            }
            j = k;
        }
        out.write_all_at(&buf[i..j], at + i as u64)?;
        i = j;
    }
    Ok(())
}
