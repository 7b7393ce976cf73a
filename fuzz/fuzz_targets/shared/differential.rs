//! The one-verdict rule: the same bytes opened as a file (random access, untrusted policy)
//! and streamed through the importer must give the same verdict. Both accept with the same
//! guest content, or both refuse with the same kind of error; the stream may refuse only for
//! its budget (`TooLarge`), which the README lists. Any disagreement panics. Included by the
//! differential targets with `#[path]` (each target is its own crate).

use std::sync::Arc;
use vdisk::ingest::{ImportOptions, import_into};
use vdisk::io::{BlockIo, MemIo};
use vdisk::{ErrorKind, Format, Image, OpenOptions, Policy};

/// Images larger than this are only checked for not panicking (reading them whole is slow).
const MAX_SIZE: u64 = 8 << 20;

/// The file reader's verdict: the whole guest content, opened as `format` (`None`: detected).
fn random_access(data: &[u8], format: Option<Format>) -> vdisk::Result<Vec<u8>> {
    let opts = OpenOptions {
        format,
        policy: Policy::Untrusted,
        ..OpenOptions::default()
    };
    let img = Image::from_io(Arc::new(MemIo::new(data.to_vec())), &opts)?;
    let size = img.virtual_size();
    if size > MAX_SIZE {
        return Err(vdisk::Error::new(ErrorKind::TooLarge, "skipped: large"));
    }
    let mut out = vec![0u8; size as usize];
    img.read_at(&mut out, 0)?;
    Ok(out)
}

/// The streaming importer's verdict (it always detects the format), into a small target.
fn streamed(data: &[u8], threads: u32) -> vdisk::Result<Vec<u8>> {
    let io = MemIo::default();
    let mut opts = ImportOptions {
        threads,
        allow_spill: false,
        ..ImportOptions::default()
    };
    let r = import_into(Box::new(data), &io, true, MAX_SIZE, &mut opts)?;
    assert!(io.size().unwrap() <= MAX_SIZE, "wrote past the capacity");
    let mut d = io.to_vec();
    d.resize(r.virtual_size as usize, 0);
    Ok(d)
}

/// Hold `data`, read as `format` by the file reader, and streamed with 1 and 2 threads, to
/// one verdict.
pub fn differential(data: &[u8], format: Option<Format>) {
    let file = random_access(data, format);
    if let Err(e) = &file
        && e.kind() == ErrorKind::TooLarge
    {
        // Too large to read whole here (or refused as too large): the stream need only not
        // panic.
        let _ = streamed(data, 1);
        return;
    }
    for threads in [1, 2] {
        let stream = streamed(data, threads);
        // The target is small: a disk bigger than it is refused for space before anything
        // else, which says nothing about the image.
        if stream.as_ref().is_err_and(|e| e.kind() == ErrorKind::NoSpace) {
            continue;
        }
        match (&file, &stream) {
            (Ok(a), Ok(b)) => assert!(a == b, "stream and file readers disagree on the content"),
            (Err(e), Err(s)) => assert_eq!(e.kind(), s.kind(), "file: {e}; stream: {s}"),
            (Err(e), Ok(_)) => panic!("stream accepts what the file reader refuses: {e}"),
            // The stream's own budget (listed in the README) is not a disagreement.
            (Ok(_), Err(s)) if s.kind() == ErrorKind::TooLarge => {}
            (Ok(_), Err(s)) => panic!("stream refuses what the file reader accepts: {s}"),
        }
    }
}
