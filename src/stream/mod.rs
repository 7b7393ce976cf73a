//! Byte streams around disk images: sniffing a non-seekable stream's format without losing the
//! bytes looked at, and unwrapping gzip (multi-member), xz (multi-stream, multi-block files
//! decoded on several threads) and zstd, one layer of each at most, as CDI does.
//!
//! Decoders run within a memory budget given in bytes ([`unwrap_layers_with_budget`]): xz
//! counts dictionaries, compressed blocks in flight and buffered output against it (module
//! `xz`), zstd's window is capped at the largest power of two within it (and at 2^27), gzip
//! needs only its 32 KiB window.

mod xz;

use crate::detect::{self, Format};
use crate::error::{Error, ErrorKind, Result};
use std::io::{self, BufReader, Read};

/// A boxed byte stream.
pub type Stream<'a> = Box<dyn Read + Send + 'a>;

/// Memory budget of [`decoder`] and [`unwrap_layers`]: enough for xz `-9` (64 MiB dictionary)
/// and zstd's default window limit (128 MiB), as before budgets were given. Callers that must
/// stay small pass their own budget to [`unwrap_layers_with_budget`].
pub const DEFAULT_DECODER_BUDGET: u64 = 128 << 20;
/// Largest zstd window accepted (2^27 = 128 MiB, zstd's default limit).
pub const ZSTD_WINDOW_LOG_MAX: u32 = 27;

/// Read up to `n` bytes (fewer only at end of stream).
fn read_up_to(r: &mut dyn Read, n: usize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(n);
    r.take(n as u64).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Peek at the first bytes of `r` and classify them; returns the format and a stream that
/// still yields every byte.
pub fn sniff<'a>(mut r: Stream<'a>) -> Result<(Format, Stream<'a>)> {
    let head =
        read_up_to(&mut r, detect::PROBE_LEN).map_err(|e| Error::io("cannot read input", e))?;
    let fmt = detect::probe(&head, None);
    Ok((fmt, Box::new(io::Cursor::new(head).chain(r))))
}

/// Wrap `r` in the decoder for `fmt` (gzip, xz or zstd), within [`DEFAULT_DECODER_BUDGET`].
pub fn decoder<'a>(fmt: Format, r: Stream<'a>, threads: u32) -> Result<Stream<'a>> {
    decoder_with_budget(fmt, r, threads, DEFAULT_DECODER_BUDGET)
}

/// Wrap `r` in the decoder for `fmt` (gzip, xz or zstd) using at most `threads` decoder threads
/// and about `mem_limit` bytes of decoder memory (dictionaries, windows, buffers). An xz
/// dictionary or zstd window that does not fit is refused with [`ErrorKind::TooLarge`] (xz:
/// when the first block's does not fit; later blocks fail the read).
pub fn decoder_with_budget<'a>(
    fmt: Format,
    r: Stream<'a>,
    threads: u32,
    mem_limit: u64,
) -> Result<Stream<'a>> {
    Ok(match fmt {
        Format::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(
            BufReader::with_capacity(1 << 20, r),
        )),
        Format::Zstd => {
            let mut d = zstd::stream::read::Decoder::new(r)
                .map_err(|e| Error::io("cannot start zstd decoder", e))?;
            let log = mem_limit.max(2).ilog2().min(ZSTD_WINDOW_LOG_MAX);
            d.window_log_max(log)
                .map_err(|e| Error::io("cannot limit zstd window", e))?;
            Box::new(d)
        }
        Format::Xz => Box::new(xz::XzReader::new(
            BufReader::with_capacity(xz::INPUT_BUF, r),
            threads,
            mem_limit,
        )?),
        other => {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("{} is not a compression format", other.name()),
            ));
        }
    })
}

/// Unwrap compression layers (each kind at most once) and return the formats found, outermost
/// first, the inner format and its stream; decoders within [`DEFAULT_DECODER_BUDGET`].
pub fn unwrap_layers<'a>(r: Stream<'a>, threads: u32) -> Result<(Vec<Format>, Format, Stream<'a>)> {
    unwrap_layers_with_budget(r, threads, DEFAULT_DECODER_BUDGET)
}

/// [`unwrap_layers`] with each decoder held to `mem_limit` bytes (see [`decoder_with_budget`]).
pub fn unwrap_layers_with_budget<'a>(
    r: Stream<'a>,
    threads: u32,
    mem_limit: u64,
) -> Result<(Vec<Format>, Format, Stream<'a>)> {
    let mut layers = Vec::new();
    let (mut fmt, mut s) = sniff(r)?;
    while matches!(fmt, Format::Gzip | Format::Xz | Format::Zstd) && !layers.contains(&fmt) {
        layers.push(fmt);
        let d = decoder_with_budget(fmt, s, threads, mem_limit)?;
        (fmt, s) = sniff(d)?;
    }
    Ok((layers, fmt, s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn data() -> Vec<u8> {
        (0..300_000u32)
            .map(|i| (i % 251) as u8 ^ (i / 7000) as u8)
            .collect()
    }

    fn roundtrip(compressed: Vec<u8>, layers: &[Format]) {
        let (found, inner, mut s) =
            unwrap_layers(Box::new(io::Cursor::new(compressed)), 2).unwrap();
        assert_eq!(found, layers);
        assert_eq!(inner, Format::Raw);
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        assert_eq!(out, [data(), data()].concat());
    }

    #[test]
    fn gzip_members_and_xz_streams_and_zstd_frames_concatenate() {
        let d = data();
        let gz = |x: &[u8]| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(x).unwrap();
            e.finish().unwrap()
        };
        roundtrip([gz(&d), gz(&d)].concat(), &[Format::Gzip]);
        let xz = |x: &[u8]| {
            let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
            e.write_all(x).unwrap();
            e.finish().unwrap()
        };
        roundtrip([xz(&d), vec![0; 8], xz(&d)].concat(), &[Format::Xz]);
        // One thread: the plain decoder, same result.
        let (_, _, mut s) =
            unwrap_layers(Box::new(io::Cursor::new([xz(&d), xz(&d)].concat())), 1).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        assert_eq!(out, [data(), data()].concat());
        let zs = |x: &[u8]| zstd::encode_all(x, 3).unwrap();
        roundtrip([zs(&d), zs(&d)].concat(), &[Format::Zstd]);
        // One layer of each kind at most: gzip inside zstd is unwrapped, gzip inside gzip not.
        roundtrip(
            zs(&[gz(&d), gz(&d)].concat()),
            &[Format::Zstd, Format::Gzip],
        );
        let (found, inner, _) = unwrap_layers(Box::new(io::Cursor::new(gz(&gz(&d)))), 1).unwrap();
        assert_eq!(found, [Format::Gzip]);
        assert_eq!(inner, Format::Gzip);
    }

    #[test]
    fn corrupt_streams_fail() {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&data()).unwrap();
        let mut gz = e.finish().unwrap();
        let n = gz.len();
        gz.truncate(n / 2);
        let (_, _, mut s) = unwrap_layers(Box::new(io::Cursor::new(gz)), 1).unwrap();
        assert!(io::copy(&mut s, &mut io::sink()).is_err());
        let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 1);
        xz.write_all(&data()).unwrap();
        let mut xz = xz.finish().unwrap();
        let m = xz.len() / 2;
        xz[m] ^= 0xff;
        let (_, _, mut s) = unwrap_layers(Box::new(io::Cursor::new(xz)), 2).unwrap();
        assert!(io::copy(&mut s, &mut io::sink()).is_err());
    }

    /// About 2.5 MiB of mixed data: text-like runs, noise and zeros.
    fn mixed() -> Vec<u8> {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut out = Vec::new();
        for i in 0..40u32 {
            for j in 0..65_536u32 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                out.push(match i % 4 {
                    0 => b"the quick brown fox "[(j % 20) as usize],
                    1 => x as u8,
                    2 => 0,
                    _ => (x % 7) as u8 + b'a',
                });
            }
        }
        out
    }

    /// Multi-block xz from liblzma's threaded encoder (sizes in every block header).
    fn xz_blocks(d: &[u8], block: u64) -> Vec<u8> {
        let mut b = liblzma::stream::MtStreamBuilder::new();
        b.threads(2).preset(1).block_size(block);
        let mut e = liblzma::write::XzEncoder::new_stream(Vec::new(), b.encoder().unwrap());
        e.write_all(d).unwrap();
        e.finish().unwrap()
    }

    /// Compress with the `xz` program, if installed.
    fn xz_tool(d: &[u8], args: &[&str]) -> Option<Vec<u8>> {
        let mut c = std::process::Command::new("xz")
            .args(args)
            .arg("-c")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .ok()?;
        let mut stdin = c.stdin.take()?;
        let d = d.to_vec();
        let w = std::thread::spawn(move || stdin.write_all(&d));
        let out = c.wait_with_output().ok()?;
        w.join().ok()?.ok()?;
        out.status.success().then_some(out.stdout)
    }

    fn decode(x: &[u8], threads: u32, budget: u64) -> Result<Vec<u8>> {
        let mut s = decoder_with_budget(
            Format::Xz,
            Box::new(io::Cursor::new(x.to_vec())),
            threads,
            budget,
        )?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)
            .map_err(|e| Error::io("decode", e))?;
        Ok(out)
    }

    #[test]
    fn xz_multiblock_decodes_on_any_thread_count_and_budget() {
        let d = mixed();
        let mut inputs = vec![xz_blocks(&d, 256 << 10)];
        // The xz program's own multi-block output, and its single-block output (no sizes in
        // the block header: the sequential decoder).
        inputs.extend(xz_tool(&d, &["-T2", "--block-size=1MiB", "-1"]));
        inputs.extend(xz_tool(&d, &["-T1", "-1", "--check=sha256"]));
        inputs.extend(xz_tool(
            &d,
            &[
                "-T2",
                "--block-size=300KiB",
                "--check=crc32",
                "--x86",
                "--lzma2=preset=1",
            ],
        ));
        inputs.extend(xz_tool(
            &d,
            &["-T2", "--block-size=200KiB", "--check=none", "-0"],
        ));
        inputs.extend(xz_tool(
            &d,
            &["-T2", "--block-size=200KiB", "--check=sha256", "-0"],
        ));
        for x in &inputs {
            for threads in [1, 2, 3, 8] {
                for budget in [DEFAULT_DECODER_BUDGET, 8 << 20, 4 << 20] {
                    let out = decode(x, threads, budget).unwrap();
                    assert!(out == d, "threads {threads} budget {budget}");
                }
            }
        }
    }

    #[test]
    fn xz_concatenated_multiblock_streams_with_padding() {
        let d = mixed();
        let a = xz_blocks(&d, 256 << 10);
        let b = xz_tool(&d[..100_000], &["-T2", "--block-size=16KiB", "-0"])
            .unwrap_or_else(|| xz_blocks(&d[..100_000], 16 << 10));
        let empty = xz_blocks(&[], 1 << 20);
        let x = [a.clone(), vec![0; 4], empty, b.clone(), vec![0; 8], a].concat();
        let want = [&d[..], &d[..100_000], &d[..]].concat();
        for threads in [1, 2, 4] {
            assert!(decode(&x, threads, DEFAULT_DECODER_BUDGET).unwrap() == want);
        }
        // Garbage after the last stream is an error.
        let bad = [b, vec![0; 4], b"junk".to_vec()].concat();
        assert!(decode(&bad, 2, DEFAULT_DECODER_BUDGET).is_err());
    }

    #[test]
    fn xz_corrupt_or_truncated_multiblock_fails() {
        let d = mixed();
        let x = xz_blocks(&d, 256 << 10);
        // A flipped byte anywhere (headers, block data, checks, index, footer) is an error.
        for at in (0..x.len()).step_by(x.len() / 97).chain([
            12,
            13,
            20,
            x.len() - 30,
            x.len() - 13,
            x.len() - 3,
        ]) {
            let mut bad = x.clone();
            bad[at] ^= 0x55;
            for threads in [1, 2] {
                assert!(
                    decode(&bad, threads, DEFAULT_DECODER_BUDGET).is_err(),
                    "flip at {at}"
                );
            }
        }
        for cut in [13, 40, x.len() / 3, x.len() - 20, x.len() - 1] {
            for threads in [1, 2] {
                assert!(
                    decode(&x[..cut], threads, DEFAULT_DECODER_BUDGET).is_err(),
                    "cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn xz_later_stream_over_budget_is_too_large() {
        // The first stream fits (256 KiB dictionary); a concatenated second one needs 8 MiB.
        // Its refusal surfaces mid-read and must keep its kind through every relay.
        let d = mixed();
        let enc = |level| {
            let mut e = liblzma::write::XzEncoder::new(Vec::new(), level);
            e.write_all(&d).unwrap();
            e.finish().unwrap()
        };
        let first = enc(0);
        assert_eq!(decode(&first, 1, 3 << 20).unwrap(), d);
        let mut x = first;
        x.extend(enc(6));
        for threads in [1, 2] {
            let e = decode(&x, threads, 3 << 20).expect_err("decoded over budget");
            assert_eq!(e.kind(), ErrorKind::TooLarge, "{e}");
        }
    }

    #[test]
    fn xz_dictionary_over_budget_is_too_large() {
        let d = mixed();
        // 1 MiB blocks, 1 MiB dictionary (preset 1): a 1.5 MiB budget leaves too little.
        let x = xz_blocks(&d, 1 << 20);
        for threads in [1, 2] {
            let e = match decode(&x, threads, 3 << 19) {
                Err(e) => e,
                Ok(_) => panic!("decoded over budget"),
            };
            assert_eq!(e.kind(), ErrorKind::TooLarge, "{e}");
            assert!(e.message().contains("exceeds the memory budget"), "{e}");
        }
    }
}
