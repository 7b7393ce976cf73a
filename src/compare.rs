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
}

/// Compare `a` and `b`. With `strict`, images of different size differ.
pub fn compare(a: &Image, b: &Image, strict: bool) -> Result<Comparison> {
    let (sa, sb) = (a.virtual_size(), b.virtual_size());
    if strict && sa != sb {
        return Ok(Comparison::SizeMismatch);
    }
    let common = sa.min(sb);
    let mut ba = vec![0u8; CHUNK as usize];
    let mut bb = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    while pos < common {
        let ea = a.extent(pos, (common - pos).min(CHUNK))?;
        let eb = b.extent(pos, ea.len)?;
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
