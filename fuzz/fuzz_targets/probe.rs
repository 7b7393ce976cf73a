//! Format detection on arbitrary bytes: never panics, and is consistent with itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdisk::detect::{PROBE_LEN, probe};

fuzz_target!(|data: &[u8]| {
    let head = &data[..data.len().min(PROBE_LEN)];
    let tail = (data.len() >= 1024).then(|| &data[data.len() - 512..]);
    let f = probe(head, tail);
    // Detection only looks at the first PROBE_LEN bytes and the tail: extra bytes change nothing.
    assert_eq!(probe(data, tail), f);
    // Every detected format has a name that parses back to a format.
    assert!(vdisk::Format::from_name(f.name()).is_some());
    // Without a tail only the fixed-VHD footer can disappear.
    let g = probe(head, None);
    assert!(g == f || f == vdisk::Format::VhdFixed);
});
