//! Open arbitrary bytes as qcow2 (untrusted policy, in memory) and read what they describe:
//! block status, guest data, `info` and `map` output, internal snapshots. Any panic, hang or
//! huge allocation is a bug. The work per input is capped so one input stays fast.
#![no_main]

#[path = "shared/exercise.rs"]
mod shared;

use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use vdisk::io::MemIo;
use vdisk::{Format, Image, OpenOptions, Policy};

/// Internal snapshots opened per input at most.
const MAX_SNAPSHOTS: usize = 4;

fuzz_target!(|data: &[u8]| {
    let opts = OpenOptions {
        format: Some(Format::Qcow2),
        policy: Policy::Untrusted,
        ..OpenOptions::default()
    };
    let io = Arc::new(MemIo::new(data.to_vec()));
    let Ok(img) = Image::from_io(io.clone(), &opts) else {
        return;
    };
    shared::exercise(&img, "fuzz.qcow2", 4 << 20);
    let snaps: Vec<String> = img
        .qcow2()
        .map(|q| q.snapshots().iter().map(|s| s.id.clone()).collect())
        .unwrap_or_default();
    for id in snaps.into_iter().take(MAX_SNAPSHOTS) {
        let o = OpenOptions {
            snapshot: Some(format!("snapshot.id={id}")),
            ..opts.clone()
        };
        if let Ok(s) = Image::from_io(io.clone(), &o) {
            shared::exercise(&s, "fuzz.qcow2", 4 << 20);
        }
    }
});
