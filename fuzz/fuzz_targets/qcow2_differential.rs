//! The one-verdict rule, fuzzed: the same bytes opened as a qcow2 file (random access,
//! untrusted policy) and streamed through the importer must give the same verdict. Both accept
//! with the same guest content, or both refuse with the same kind of error; the stream may
//! refuse only for its budget (`TooLarge`), which the README lists. Any disagreement panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use vdisk::ingest::{ImportOptions, import_into};
use vdisk::io::{BlockIo, MemIo};
use vdisk::{ErrorKind, Format, Image, OpenOptions, Policy};

/// Images larger than this are only checked for not panicking (reading them whole is slow).
const MAX_SIZE: u64 = 8 << 20;

fn random_access(data: &[u8]) -> vdisk::Result<Vec<u8>> {
    let opts = OpenOptions {
        format: Some(Format::Qcow2),
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

fuzz_target!(|data: &[u8]| {
    // Only qcow2 (version 2 or 3) goes down both paths alike.
    if data.len() < 8 || data[..4] != *b"QFI\xfb" || !matches!(data[7], 2 | 3) || data[4..7] != [0; 3]
    {
        return;
    }
    let file = random_access(data);
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
});
