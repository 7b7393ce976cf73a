//! Compressed clusters: batching neighbouring compressed clusters into one host read, and
//! decoding raw deflate or zstd into exactly one cluster.
//!
//! qemu packs compressed clusters back to back, so a run of guest clusters is usually one
//! contiguous host byte range: reading it with one `pread` instead of one per cluster matters.
//! Each decoder must produce exactly `cluster_size` bytes and ignores bytes after its stream
//! (the sector-rounded size may include the start of the next cluster's data).

use super::header::CompressionType;
use crate::error::{Error, Result, corrupt};
use crate::io::BlockIo;
use std::cell::RefCell;

/// Most host bytes one batch reads at once.
const MAX_SPAN: u64 = 4 << 20;
/// Largest gap between neighbouring compressed clusters still read together.
const MAX_GAP: u64 = 64 << 10;

#[derive(Debug, Clone, Copy)]
struct Item {
    /// Guest offset of the first requested byte.
    guest: u64,
    /// Host offset and size of the compressed bytes.
    host: u64,
    size: u64,
    /// Requested bytes of this cluster.
    len: u64,
}

/// Compressed clusters waiting to be read together.
#[derive(Debug, Default)]
pub(super) struct Batch {
    items: Vec<Item>,
    start: u64,
    end: u64,
}

impl Batch {
    pub(super) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub(super) fn clear(&mut self) {
        self.items.clear();
    }

    /// Add a cluster; false when it does not fit this batch (flush, then push again).
    pub(super) fn push(&mut self, guest: u64, host: u64, size: u64, len: u64) -> bool {
        let end = host.saturating_add(size);
        if let Some(last) = self.items.last() {
            let close = host >= last.host && host <= self.end.saturating_add(MAX_GAP);
            if !close || end.max(self.end) - self.start > MAX_SPAN {
                return false;
            }
            self.end = self.end.max(end);
        } else {
            self.start = host;
            self.end = end;
        }
        self.items.push(Item {
            guest,
            host,
            size,
            len,
        });
        true
    }
}

thread_local! {
    static SPAN: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static CLUSTER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static INFLATE: RefCell<Option<flate2::Decompress>> = const { RefCell::new(None) };
    static LIBDEFLATE: RefCell<Option<libdeflater::Decompressor>> = const { RefCell::new(None) };
    static ZSTD: RefCell<Option<zstd::zstd_safe::DCtx<'static>>> = const { RefCell::new(None) };
    static DEFLATE: RefCell<Option<flate2::Compress>> = const { RefCell::new(None) };
    static ZSTD_C: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
}

/// Read the batch's host span once and decode every cluster into `buf` (whose first byte is
/// guest offset `buf_off`).
pub(super) fn decode_batch(
    io: &dyn BlockIo,
    file_size: u64,
    ctype: CompressionType,
    cluster_size: u64,
    batch: &Batch,
    buf: &mut [u8],
    buf_off: u64,
) -> Result<()> {
    let start = batch.start;
    if start >= file_size {
        return Err(corrupt!(
            "compressed cluster at {start:#x} lies past end of file"
        ));
    }
    let end = batch.end.min(file_size);
    SPAN.with_borrow_mut(|span| {
        span.resize((end - start) as usize, 0);
        io.read_at_zero_padded(span, start)
            .map_err(|e| Error::io("cannot read compressed cluster", e))?;
        for it in &batch.items {
            let a = (it.host - start) as usize;
            let b = (it.host + it.size).min(end).saturating_sub(start) as usize;
            let src = span.get(a..b.max(a)).unwrap_or(&[]);
            let at = (it.guest - buf_off) as usize;
            let within = (it.guest & (cluster_size - 1)) as usize;
            let dst = &mut buf[at..at + it.len as usize];
            let res = if within == 0 && it.len == cluster_size {
                decode(ctype, src, dst)
            } else {
                CLUSTER.with_borrow_mut(|c| {
                    c.resize(cluster_size as usize, 0);
                    decode(ctype, src, c)?;
                    dst.copy_from_slice(&c[within..within + it.len as usize]);
                    Ok(())
                })
            };
            res.map_err(|e: Error| {
                corrupt!(
                    "cannot decompress cluster at guest offset {:#x} (host {:#x}): {}",
                    it.guest - within as u64,
                    it.host,
                    e.message()
                )
            })?;
        }
        Ok(())
    })
}

/// Compress one cluster for storage: raw deflate with a 4 KiB window at zlib's default level
/// (qemu inflates with a 4 KiB window, so a larger one would be unreadable there), or one zstd
/// frame at level 3. Returns the compressed length, or `None` when the result would not be
/// smaller than the cluster (qemu then stores the cluster uncompressed). `dst` must hold at
/// least twice `src.len()` bytes: compressors are given room for their worst case, because
/// some fail badly when cut short.
pub fn encode(ctype: CompressionType, src: &[u8], dst: &mut [u8]) -> Option<usize> {
    if dst.len() < src.len() * 2 {
        return None;
    }
    let n = match ctype {
        CompressionType::Zlib => DEFLATE.with_borrow_mut(|slot| {
            let c = slot.get_or_insert_with(|| {
                flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12)
            });
            c.reset();
            match c.compress(src, dst, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) => Some(c.total_out() as usize),
                _ => None,
            }
        }),
        CompressionType::Zstd => ZSTD_C.with_borrow_mut(|slot| {
            if slot.is_none() {
                *slot = zstd::bulk::Compressor::new(3).ok();
            }
            slot.as_mut()?.compress_to_buffer(src, dst).ok()
        }),
    }?;
    (n < src.len()).then_some(n)
}

/// Decode one compressed cluster from `src` into all of `dst`.
pub fn decode(ctype: CompressionType, src: &[u8], dst: &mut [u8]) -> Result<()> {
    match ctype {
        CompressionType::Zlib => inflate(src, dst),
        CompressionType::Zstd => unzstd(src, dst),
    }
}

fn inflate(src: &[u8], dst: &mut [u8]) -> Result<()> {
    // libdeflate decodes whole buffers about twice as fast as a streaming inflater; it needs a
    // properly terminated stream, so anything it rejects gets a second chance below (qemu also
    // accepts a stream that fills the cluster without its end marker).
    let fast = LIBDEFLATE.with_borrow_mut(|slot| {
        slot.get_or_insert_with(libdeflater::Decompressor::new)
            .deflate_decompress(src, dst)
    });
    if fast.is_ok_and(|n| n == dst.len()) {
        return Ok(());
    }
    INFLATE.with_borrow_mut(|slot| {
        let d = slot.get_or_insert_with(|| flate2::Decompress::new(false));
        d.reset(false);
        let r = d.decompress(src, dst, flate2::FlushDecompress::Finish);
        let out = d.total_out() as usize;
        match r {
            Ok(_) if out == dst.len() => Ok(()),
            Ok(_) => Err(corrupt!(
                "deflate data ends after {out} of {} bytes",
                dst.len()
            )),
            Err(e) => Err(corrupt!("invalid deflate data: {e}")),
        }
    })
}

fn unzstd(src: &[u8], dst: &mut [u8]) -> Result<()> {
    use zstd::zstd_safe;
    ZSTD.with_borrow_mut(|slot| {
        let ctx = slot.get_or_insert_with(zstd_safe::DCtx::create);
        let mut out = 0;
        let mut input = src;
        // Usually one frame; qemu's reader accepts several until the cluster is full.
        while out < dst.len() {
            let frame = zstd_safe::find_frame_compressed_size(input)
                .map_err(|c| corrupt!("invalid zstd frame: {}", zstd_safe::get_error_name(c)))?;
            let n = ctx
                .decompress(&mut dst[out..], &input[..frame])
                .map_err(|c| corrupt!("invalid zstd data: {}", zstd_safe::get_error_name(c)))?;
            if n == 0 && frame == 0 {
                break;
            }
            out += n;
            input = &input[frame..];
            if input.is_empty() {
                break;
            }
        }
        if out != dst.len() {
            return Err(corrupt!(
                "zstd data ends after {out} of {} bytes",
                dst.len()
            ));
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn deflate_and_zstd_round_trip_with_trailing_garbage() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&data).unwrap();
        let mut z = enc.finish().unwrap();
        z.extend_from_slice(&[0xAB; 300]);
        let mut out = vec![0u8; 65536];
        decode(CompressionType::Zlib, &z, &mut out).unwrap();
        assert_eq!(out, data);
        let mut zs = zstd::bulk::compress(&data, 3).unwrap();
        zs.extend_from_slice(&[0x11; 100]);
        out.fill(0);
        decode(CompressionType::Zstd, &zs, &mut out).unwrap();
        assert_eq!(out, data);
        // Too little output is an error, not silent zeros.
        let short = zstd::bulk::compress(&data[..1000], 3).unwrap();
        assert!(decode(CompressionType::Zstd, &short, &mut out).is_err());
        assert!(decode(CompressionType::Zlib, &[1, 2, 3], &mut out).is_err());
    }

    #[test]
    fn encode_round_trips_and_refuses_incompressible() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 13) as u8).collect();
        let mut c = vec![0u8; 2 * 65536];
        let mut out = vec![0u8; 65536];
        for t in [CompressionType::Zlib, CompressionType::Zstd] {
            let n = encode(t, &data, &mut c).unwrap();
            assert!(n < 65535);
            decode(t, &c[..n], &mut out).unwrap();
            assert_eq!(out, data);
        }
        let mut x: u64 = 1;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert_eq!(encode(CompressionType::Zlib, &noise, &mut c), None);
        assert_eq!(encode(CompressionType::Zstd, &noise, &mut c), None);
    }
}
