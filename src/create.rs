//! Creating new, empty images (`vdisk create`): raw files and qcow2, with qemu-img's
//! preallocation modes. The image is written under a temporary name and renamed into place.

use crate::convert::TempTarget;
use crate::detect::Format;
use crate::error::{Error, ErrorKind, Result};
use crate::io::BlockIo;
use crate::qcow2::writer::{self, CreateOptions, Prealloc};
use std::path::Path;

/// Create an image of `size` bytes (rounded up to whole sectors, as qemu-img does) at `path`
/// (replacing any file there). For raw images only `opts.prealloc` is used (`metadata` is
/// refused, as by qemu-img). Returns the preallocation actually applied (`falloc` falls back
/// to `full` where the filesystem refuses).
pub fn create(path: &Path, format: Format, size: u64, opts: &CreateOptions) -> Result<Prealloc> {
    let tmp = TempTarget::create(path)?;
    let applied = match format {
        Format::Raw => {
            if opts.prealloc == Prealloc::Metadata {
                return Err(Error::invalid(
                    "raw images support preallocation off, falloc and full only",
                )
                .with_path(path));
            }
            // Whole sectors, as qemu-img creates them.
            let size = size
                .checked_next_multiple_of(512)
                .ok_or_else(|| Error::invalid("image size too large").with_path(path))?;
            tmp.io
                .set_size(size)
                .map_err(|e| Error::io("cannot size image", e).with_path(path))?;
            writer::preallocate_data(&tmp.io, opts.prealloc).map_err(|e| e.with_path(path))?
        }
        Format::Qcow2 => writer::create(&tmp.io, size, opts).map_err(|e| e.with_path(path))?,
        other => {
            return Err(Error::new(
                ErrorKind::UnsupportedFormat,
                format!("cannot create {} images (raw and qcow2 only)", other.name()),
            )
            .with_path(path));
        }
    };
    tmp.commit()?;
    Ok(applied)
}

/// Preallocate the holes of the existing file at `path` (`falloc` falling back to `full`),
/// e.g. after a raw conversion with `-o preallocation=`. Returns the mode applied.
pub fn preallocate_file(path: &Path, mode: Prealloc) -> Result<Prealloc> {
    if mode == Prealloc::Off {
        return Ok(mode);
    }
    if mode == Prealloc::Metadata {
        return Err(
            Error::invalid("raw images support preallocation off, falloc and full only")
                .with_path(path),
        );
    }
    let io = crate::io::FileIo::open_rw(path, false)
        .map_err(|e| Error::io("cannot open image", e).with_path(path))?;
    writer::preallocate_data(&io, mode).map_err(|e| e.with_path(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{Image, OpenOptions};

    #[test]
    fn raw_and_qcow2_with_preallocation() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.raw");
        let o = CreateOptions {
            prealloc: Prealloc::Full,
            ..Default::default()
        };
        assert_eq!(
            create(&p, Format::Raw, 1 << 20, &o).unwrap(),
            Prealloc::Full
        );
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
        let q = d.path().join("a.qcow2");
        let o = CreateOptions {
            prealloc: Prealloc::Metadata,
            ..Default::default()
        };
        assert_eq!(
            create(&q, Format::Qcow2, 3 << 20, &o).unwrap(),
            Prealloc::Metadata
        );
        let img = Image::open(&q, &OpenOptions::default()).unwrap();
        assert_eq!(img.virtual_size(), 3 << 20);
        let e = img.extent(0, 3 << 20).unwrap();
        assert!(e.data && e.zero, "{e:?}");
        let o = CreateOptions {
            prealloc: Prealloc::Metadata,
            ..Default::default()
        };
        assert!(create(&p, Format::Raw, 1 << 20, &o).is_err());
    }
}
