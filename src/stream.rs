//! Byte streams around disk images: sniffing a non-seekable stream's format without losing the
//! bytes looked at, and unwrapping gzip (multi-member), xz (multi-stream, multi-block files
//! decoded on several threads) and zstd, one layer of each at most, as CDI does.
//!
//! Decoders run with bounded memory: zstd's window is capped, xz's threaded decoder falls back
//! to one thread past its memory budget, gzip needs only its 32 KiB window.

use crate::detect::{self, Format};
use crate::error::{Error, ErrorKind, Result};
use std::io::{self, BufRead, BufReader, Read};

/// A boxed byte stream.
pub type Stream<'a> = Box<dyn Read + 'a>;

/// Memory the threaded xz decoder may use before it falls back to a single thread. Measured on
/// a 512 MiB `xz -6 -T0` file (24 MiB blocks): 2 threads need about 125 MiB RSS in all and decode
/// in 1.6 s; held to 64 MiB it runs single-threaded in 2.6 s (`xz -dc`: 2.8 s). One decoder
/// thread (`threads: 1`) uses the plain, dictionary-sized decoder instead.
pub const XZ_THREADED_MEMLIMIT: u64 = 128 << 20;
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

/// Wrap `r` in the decoder for `fmt` (gzip, xz or zstd).
pub fn decoder<'a>(fmt: Format, r: Stream<'a>, threads: u32) -> Result<Stream<'a>> {
    Ok(match fmt {
        Format::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(
            BufReader::with_capacity(1 << 20, r),
        )),
        Format::Zstd => {
            let mut d = zstd::stream::read::Decoder::new(r)
                .map_err(|e| Error::io("cannot start zstd decoder", e))?;
            d.window_log_max(ZSTD_WINDOW_LOG_MAX)
                .map_err(|e| Error::io("cannot limit zstd window", e))?;
            Box::new(d)
        }
        Format::Xz => Box::new(MultiXz::new(BufReader::with_capacity(1 << 20, r), threads)?),
        other => {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("{} is not a compression format", other.name()),
            ));
        }
    })
}

/// Unwrap compression layers (each kind at most once) and return the formats found, outermost
/// first, the inner format and its stream.
pub fn unwrap_layers<'a>(r: Stream<'a>, threads: u32) -> Result<(Vec<Format>, Format, Stream<'a>)> {
    let mut layers = Vec::new();
    let (mut fmt, mut s) = sniff(r)?;
    while matches!(fmt, Format::Gzip | Format::Xz | Format::Zstd) && !layers.contains(&fmt) {
        layers.push(fmt);
        let d = decoder(fmt, s, threads)?;
        (fmt, s) = sniff(d)?;
    }
    Ok((layers, fmt, s))
}

/// xz decoder for concatenated streams, each decoded by liblzma's threaded decoder (blocks of
/// multi-block files in parallel), with stream padding skipped between streams.
struct MultiXz<R: BufRead> {
    inner: Option<liblzma::bufread::XzDecoder<R>>,
    threads: u32,
}

fn xz_stream(threads: u32) -> Result<liblzma::stream::Stream> {
    let err = |e: liblzma::stream::Error| {
        Error::new(ErrorKind::Io, format!("cannot start xz decoder: {e}"))
    };
    if threads <= 1 {
        // The plain decoder needs only the dictionary: the low-memory choice.
        return liblzma::stream::Stream::new_stream_decoder(u64::MAX, 0).map_err(err);
    }
    let mut b = liblzma::stream::MtStreamBuilder::new();
    b.threads(threads)
        .memlimit_threading(XZ_THREADED_MEMLIMIT)
        .memlimit_stop(u64::MAX);
    b.decoder().map_err(err)
}

impl<R: BufRead> MultiXz<R> {
    fn new(r: R, threads: u32) -> Result<Self> {
        Ok(MultiXz {
            inner: Some(liblzma::bufread::XzDecoder::new_stream(
                r,
                xz_stream(threads)?,
            )),
            threads,
        })
    }
}

impl<R: BufRead> Read for MultiXz<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some(d) = self.inner.as_mut() else {
                return Ok(0);
            };
            let n = d.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            // End of one stream: skip padding (zero bytes), then start the next, if any.
            let mut r = self
                .inner
                .take()
                .map(|d| d.into_inner())
                .ok_or_else(|| io::Error::other("xz state"))?;
            loop {
                let avail = r.fill_buf()?;
                if avail.is_empty() {
                    return Ok(0);
                }
                let zeros = avail.iter().take_while(|&&b| b == 0).count();
                if zeros == 0 {
                    break;
                }
                r.consume(zeros);
            }
            let s = xz_stream(self.threads).map_err(io::Error::other)?;
            self.inner = Some(liblzma::bufread::XzDecoder::new_stream(r, s));
        }
    }
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
}
