//! Run the qcow2 consistency check over arbitrary bytes held in memory. It must report or
//! refuse, never panic, hang or allocate without bound; a report's counts must be coherent:
//! every corruption, leak and check error has its message, the allocation figures are
//! consistent with each other, and the streaming and collecting entry points agree.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vdisk::io::MemIo;
use vdisk::qcow2::check::{check, check_with};

fuzz_target!(|data: &[u8]| {
    let io = MemIo::new(data.to_vec());
    let Ok(r) = check(&io) else {
        return;
    };
    let shown = r.messages.len() as u64 + r.messages_dropped;
    assert_eq!(shown, r.corruptions + r.leaks + r.check_errors, "{r:?}");
    assert!(r.fragmented_clusters <= r.allocated_clusters, "{r:?}");
    assert!(r.compressed_clusters <= r.allocated_clusters, "{r:?}");
    assert!(r.image_end_offset > 0);
    let code = r.exit_code();
    assert_eq!(code == 0, shown == 0);
    let _ = r.to_human();
    let json = r.to_json("fuzz.qcow2", vdisk::Format::Qcow2, None);
    assert!(json.contains(&format!("\"check-errors\": {},", r.check_errors)));
    // The streaming form sees the same messages and counts.
    let mut n = 0u64;
    let s = check_with(&io, &mut |_| n += 1).unwrap();
    assert_eq!(n, shown);
    assert_eq!(
        (s.corruptions, s.leaks, s.image_end_offset),
        (r.corruptions, r.leaks, r.image_end_offset)
    );
});
