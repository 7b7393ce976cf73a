//! Criterion benches for the hot paths under every conversion, so a regression shows as a
//! number: cluster mapping (block status over a whole qcow2 image at 64 KiB and 512-byte
//! clusters), zero detection (a 1 MiB buffer, zero and not), a decompression batch (256 zlib
//! and zstd clusters) and the sparse write (a raw disk, half holes, to a file).
//!
//! The mapping images are made by qemu-img/qemu-io at bench time (`scripts/test.sh` installs
//! them).

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use vdisk::convert::{ConvertOptions, convert_to_raw_path};
use vdisk::io::{MemIo, is_zero, zero_runs};
use vdisk::qcow2::compressed::{decode, encode};
use vdisk::qcow2::header::CompressionType;
use vdisk::{Image, OpenOptions};

fn tool(name: &str, args: &[&str]) {
    let st = Command::new(name)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("{name} is required for this bench: {e}"));
    assert!(st.success(), "{name} {args:?} failed");
}

/// A qcow2 image of `size` with every other cluster of its first half written.
fn mapped_image(
    dir: &Path,
    name: &str,
    cluster: &str,
    size: &str,
    clusters: u64,
    cs: u64,
) -> String {
    let p = dir.join(name).to_string_lossy().into_owned();
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("cluster_size={cluster}"),
            &p,
            size,
        ],
    );
    let mut cmds = Vec::new();
    for i in (0..clusters).step_by(2) {
        cmds.push("-c".to_string());
        cmds.push(format!("write -q -P 0x5a {} {cs}", i * cs));
    }
    let mut args: Vec<&str> = vec!["-f", "qcow2"];
    args.extend(cmds.iter().map(String::as_str));
    args.push(&p);
    tool("qemu-io", &args);
    p
}

fn walk(img: &Image) -> u64 {
    let (mut off, size, mut n) = (0u64, img.virtual_size(), 0u64);
    while off < size {
        let e = img.extent(off, size - off).unwrap();
        off += e.len;
        n += 1;
    }
    n
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();

    let mut g = c.benchmark_group("cluster_mapping");
    let big = mapped_image(dir.path(), "64k.qcow2", "64k", "1G", 4096, 65536);
    let small = mapped_image(dir.path(), "512.qcow2", "512", "8M", 8192, 512);
    for (label, p) in [("64k_clusters_1g", &big), ("512b_clusters_8m", &small)] {
        let img = Image::open(p, &OpenOptions::default()).unwrap();
        g.bench_function(label, |b| b.iter(|| black_box(walk(&img))));
    }
    g.finish();

    let mut g = c.benchmark_group("zero_detection");
    let zeros = vec![0u8; 1 << 20];
    let mut tail = zeros.clone();
    tail[(1 << 20) - 1] = 1;
    g.throughput(Throughput::Bytes(1 << 20));
    g.bench_function("is_zero_1m", |b| {
        b.iter(|| black_box(is_zero(black_box(&zeros))))
    });
    g.bench_function("zero_runs_4k_1m", |b| {
        b.iter(|| black_box(zero_runs(black_box(&tail), 4096).count()))
    });
    g.finish();

    let mut g = c.benchmark_group("decompress_batch");
    let cluster = 65536usize;
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let plain: Vec<Vec<u8>> = (0..256)
        .map(|i| {
            (0..cluster)
                .map(|j| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // Text-like: few distinct bytes, some runs.
                    if (j / 512 + i) % 3 == 0 {
                        0
                    } else {
                        b"vdisk cluster "[(x % 14) as usize]
                    }
                })
                .collect()
        })
        .collect();
    g.throughput(Throughput::Bytes((256 * cluster) as u64));
    for (label, ct) in [
        ("zlib_256x64k", CompressionType::Zlib),
        ("zstd_256x64k", CompressionType::Zstd),
    ] {
        let packed: Vec<Vec<u8>> = plain
            .iter()
            .map(|p| {
                let mut out = vec![0u8; 2 * cluster];
                let n = encode(ct, p, &mut out).expect("compressible");
                out.truncate(n);
                out
            })
            .collect();
        let mut out = vec![0u8; cluster];
        g.bench_function(label, |b| {
            b.iter(|| {
                for p in &packed {
                    decode(ct, p, &mut out).unwrap();
                }
                black_box(out[0])
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("sparse_write");
    let size = 64usize << 20;
    let mut disk = vec![0u8; size];
    for (i, chunk) in disk.chunks_mut(65536).enumerate() {
        if i % 2 == 0 {
            chunk.fill((i % 251) as u8 | 1);
        }
    }
    let img = Image::from_io(Arc::new(MemIo::new(disk)), &OpenOptions::default()).unwrap();
    let out = dir.path().join("out.raw");
    g.throughput(Throughput::Bytes(size as u64));
    g.sample_size(20);
    g.bench_function("raw_64m_half_holes", |b| {
        b.iter_batched(
            || {
                let _ = std::fs::remove_file(&out);
            },
            |()| convert_to_raw_path(&img, &out, &mut ConvertOptions::default()).unwrap(),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
