//! Comparing the guest contents of two images, as `qemu-img compare` does: ranges both sides
//! know to be zero are skipped, and when sizes differ the longer image's tail must read as zeros
//! (unless `strict`).

use crate::error::Result;
use crate::image::Image;

const CHUNK: u64 = 4 << 20;

/// The outcome of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    /// Same content.
    Identical,
    /// Content differs at this guest offset (the first differing 512-byte sector).
    Differ(u64),
    /// Strict mode only: the virtual sizes differ.
    SizeMismatch,
    /// Strict mode only: the two images report a different block status (allocation, zero,
    /// data, host offset or compression, as qemu-img map shows them) from this guest offset.
    StatusMismatch(u64),
}

/// What strict mode compares of a range's status (qemu-img's block status flags). QEMU also
/// flags data in a raw external data file as "look further down" (`raw_data_file`: its status
/// has one more bit), so such ranges differ from the same data anywhere else.
fn status(raw_data_file: bool, e: &crate::image::Extent) -> (bool, bool, bool, bool, bool, bool) {
    let recurse = raw_data_file && e.depth == 0 && e.data && e.offset.is_some();
    (
        e.present,
        e.zero,
        e.data,
        e.offset.is_some(),
        e.compressed,
        recurse,
    )
}

/// Whether `img` keeps its data in a raw external data file.
fn raw_data_file(img: &Image) -> bool {
    use crate::qcow2::header::AUTOCLEAR_DATA_FILE_RAW;
    img.qcow2().is_some_and(|q| {
        let h = q.header();
        h.data_file.is_some() && h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0
    })
}

/// Compare `a` and `b`. With `strict`, images of different size differ.
pub fn compare(a: &Image, b: &Image, strict: bool) -> Result<Comparison> {
    compare_with_progress(a, b, strict, &mut |_, _| {})
}

/// [`compare`], calling `progress(done, total)` (guest bytes) as it goes.
pub fn compare_with_progress(
    a: &Image,
    b: &Image,
    strict: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Comparison> {
    let (sa, sb) = (a.virtual_size(), b.virtual_size());
    if strict && sa != sb {
        return Ok(Comparison::SizeMismatch);
    }
    let common = sa.min(sb);
    let (raw_a, raw_b) = (raw_data_file(a), raw_data_file(b));
    let mut ba = vec![0u8; CHUNK as usize];
    let mut bb = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    while pos < common {
        let mut ea = a.extent(pos, (common - pos).min(CHUNK))?;
        let mut eb = b.extent(pos, ea.len)?;
        if strict {
            // Status as qemu-img reports it, checked before the contents.
            let ra = a.reported_extent(pos, ea.len)?;
            let rb = b.reported_extent(pos, eb.len)?;
            if status(raw_a, &ra) != status(raw_b, &rb) {
                return Ok(Comparison::StatusMismatch(pos));
            }
            ea.len = ea.len.min(ra.len);
            eb.len = eb.len.min(rb.len);
        }
        let len = ea.len.min(eb.len);
        if !(ea.zero && eb.zero) {
            let (x, y) = (&mut ba[..len as usize], &mut bb[..len as usize]);
            a.read_at(x, pos)?;
            b.read_at(y, pos)?;
            if x != y {
                let i = x
                    .iter()
                    .zip(y.iter())
                    .position(|(p, q)| p != q)
                    .unwrap_or(0) as u64;
                return Ok(Comparison::Differ(pos + i / 512 * 512));
            }
        }
        pos += len;
        progress(pos, sa.max(sb));
    }
    let longer = if sa > sb { a } else { b };
    let end = sa.max(sb);
    while pos < end {
        let e = longer.extent(pos, (end - pos).min(CHUNK))?;
        if !e.zero {
            let x = &mut ba[..e.len as usize];
            longer.read_at(x, pos)?;
            if let Some(i) = x.iter().position(|&v| v != 0) {
                return Ok(Comparison::Differ(pos + i as u64 / 512 * 512));
            }
        }
        pos += e.len;
        progress(pos, end);
    }
    Ok(Comparison::Identical)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::OpenOptions;
    use crate::io::MemIo;
    use std::sync::Arc;

    fn img(d: Vec<u8>) -> Image {
        Image::from_io(Arc::new(MemIo::new(d)), &OpenOptions::default()).unwrap()
    }

    #[test]
    fn compares_content_and_zero_tails() {
        let a = img(vec![1u8; 4096]);
        let mut d = vec![1u8; 4096];
        assert_eq!(
            compare(&a, &img(d.clone()), false).unwrap(),
            Comparison::Identical
        );
        d[1500] = 2;
        assert_eq!(
            compare(&a, &img(d.clone()), false).unwrap(),
            Comparison::Differ(1024)
        );
        let mut longer = vec![1u8; 4096];
        longer.extend_from_slice(&[0u8; 4096]);
        assert_eq!(
            compare(&a, &img(longer.clone()), false).unwrap(),
            Comparison::Identical
        );
        assert_eq!(
            compare(&a, &img(longer.clone()), true).unwrap(),
            Comparison::SizeMismatch
        );
        longer[6000] = 9;
        assert_eq!(
            compare(&img(longer), &a, false).unwrap(),
            Comparison::Differ(5632)
        );
    }
}
