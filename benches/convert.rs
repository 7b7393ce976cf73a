//! Criterion benches on a generated image: qcow2 (plain, zlib, zstd) to raw, raw to qcow2
//! (plain, zlib, zstd), and streams (gz, multi-block xz, zstd, streamed qcow2) imported to raw.
//!
//! The source is a 256 MiB raw disk with a realistic mix (random, text-like and zero extents,
//! holes), turned into qcow2 by `qemu-img convert` once per run (qemu-img must be installed;
//! `scripts/test.sh` installs it). Compare against qemu-img with `scripts/bench-compare.sh`.

use criterion::{Criterion, criterion_group, criterion_main};
use std::path::{Path, PathBuf};
use std::process::Command;
use vdisk::convert::{ConvertOptions, Target, convert_path, convert_to_raw_path};
use vdisk::ingest::{ImportOptions, ImportTarget, import};
use vdisk::qcow2::writer::CreateOptions;
use vdisk::{Image, OpenOptions};

const SIZE: u64 = 256 << 20;

fn gen_raw(path: &Path) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(SIZE).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let words: [&[u8]; 8] = [
        b"kernel ",
        b"disk ",
        b"volume ",
        b"the ",
        b"import ",
        b"cluster ",
        b"data ",
        b"zero ",
    ];
    let mut pos = 0u64;
    while pos < SIZE {
        let len = ((next() % 1024) + 16) * 4096;
        let len = len.min(SIZE - pos);
        let kind = next() % 10;
        f.seek(SeekFrom::Start(pos)).unwrap();
        let mut buf = vec![0u8; len as usize];
        match kind {
            0..=1 => buf.iter_mut().for_each(|b| *b = next() as u8),
            2..=3 => {
                let mut i = 0;
                while i < buf.len() {
                    let w = words[(next() % 8) as usize];
                    let n = w.len().min(buf.len() - i);
                    buf[i..i + n].copy_from_slice(&w[..n]);
                    i += n;
                }
            }
            4 => {} // written zeros
            _ => {
                pos += len;
                continue; // hole
            }
        }
        f.write_all(&buf).unwrap();
        pos += len;
    }
}

fn qemu_img(args: &[&str]) {
    let st = Command::new("qemu-img")
        .args(args)
        .status()
        .expect("qemu-img is required for this bench");
    assert!(st.success(), "qemu-img {args:?} failed");
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(
        std::env::var_os("VDISK_BENCH_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir),
    )
    .unwrap();
    let raw = dir.path().join("src.raw");
    gen_raw(&raw);
    let mut g = c.benchmark_group("convert");
    g.sample_size(10);
    for (name, extra) in [
        ("qcow2_to_raw/plain", &[][..]),
        ("qcow2_to_raw/zlib", &["-c"][..]),
        (
            "qcow2_to_raw/zstd",
            &["-c", "-o", "compression_type=zstd"][..],
        ),
    ] {
        let q = dir.path().join(format!("{}.qcow2", name.replace('/', "_")));
        let mut args = vec!["convert", "-q", "-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(extra);
        args.push(raw.to_str().unwrap());
        args.push(q.to_str().unwrap());
        qemu_img(&args);
        let out = dir.path().join("out.raw");
        g.bench_function(name, |b| {
            b.iter(|| {
                let img = Image::open(&q, &OpenOptions::default()).unwrap();
                convert_to_raw_path(&img, &out, &mut ConvertOptions::default()).unwrap()
            })
        });
    }
    // raw -> qcow2: plain and compressed.
    let img = Image::open(&raw, &OpenOptions::default()).unwrap();
    for (name, compress, ctype) in [
        ("raw_to_qcow2/plain", false, "zlib"),
        ("raw_to_qcow2/zlib", true, "zlib"),
        ("raw_to_qcow2/zstd", true, "zstd"),
    ] {
        let mut options = CreateOptions::default();
        options.apply(&format!("compression_type={ctype}")).unwrap();
        let target = Target::Qcow2 { options, compress };
        let out = dir.path().join("out.qcow2");
        g.bench_function(name, |b| {
            b.iter(|| convert_path(&img, &out, &target, &mut ConvertOptions::default()).unwrap())
        });
    }
    g.finish();

    // Streams to a raw disk, through the importer (no seeking).
    let mut g = c.benchmark_group("ingest");
    g.sample_size(10);
    let plain = dir.path().join("qcow2_to_raw_plain.qcow2");
    let zlib = dir.path().join("qcow2_to_raw_zlib.qcow2");
    let zstd_q = dir.path().join("qcow2_to_raw_zstd.qcow2");
    let bytes = std::fs::read(&raw).unwrap();
    let gz = {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        e.write_all(&bytes).unwrap();
        e.finish().unwrap()
    };
    let zst = zstd::encode_all(&bytes[..], 3).unwrap();
    let xz = {
        use std::io::Write;
        let mut b = liblzma::stream::MtStreamBuilder::new();
        b.threads(2).preset(6).block_size(8 << 20);
        let mut e = liblzma::write::XzEncoder::new_stream(Vec::new(), b.encoder().unwrap());
        e.write_all(&bytes).unwrap();
        e.finish().unwrap()
    };
    drop(bytes);
    let inputs: Vec<(&str, Vec<u8>)> = vec![
        ("gz_to_raw", gz),
        ("xz_multiblock_to_raw", xz),
        ("zstd_to_raw", zst),
        ("qcow2_stream_to_raw/plain", std::fs::read(&plain).unwrap()),
        ("qcow2_stream_to_raw/zlib", std::fs::read(&zlib).unwrap()),
        ("qcow2_stream_to_raw/zstd", std::fs::read(&zstd_q).unwrap()),
    ];
    let out = dir.path().join("disk.img");
    for (name, data) in &inputs {
        g.bench_function(*name, |b| {
            b.iter(|| {
                let _ = std::fs::remove_file(&out);
                let mut o = ImportOptions::default();
                import(
                    Box::new(&data[..]),
                    &ImportTarget::File(out.clone()),
                    &mut o,
                )
                .unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
