//! Load arbitrary bytes as a qcow2 image for an in-place edit (the `Model` every edit verb goes
//! through: mapping tables, snapshot table, bitmap directory and tables) and run edits on it
//! in memory: snapshots, bitmaps, a refcount width change, data writes, emptying. Loading must
//! refuse or succeed, never panic or allocate without bound; a commit that succeeds on an
//! image the checker finds free of corruption must leave one the checker finds free of
//! corruption too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use vdisk::io::{BlockIo, MemIo};
use vdisk::qcow2::model::Model;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the edits; the rest is the image.
    let Some((&pick, image)) = data.split_first() else {
        return;
    };
    let clean_before = vdisk::qcow2::check::check(&MemIo::new(image.to_vec()))
        .is_ok_and(|r| r.corruptions == 0 && r.check_errors == 0);
    let io = Arc::new(MemIo::new(image.to_vec()));
    let Ok(mut m) = Model::load(io.clone()) else {
        return;
    };
    let _ = m.bitmaps().count();
    let mut ok = true;
    if pick & 1 != 0 {
        ok &= m.snapshot_create("fuzz").is_ok();
    }
    if pick & 2 != 0 {
        ok &= m.bitmap_add("fuzz", Some(65536), false).is_ok();
    }
    if pick & 4 != 0 {
        ok &= m.set_refcount_order(u32::from(pick >> 5)).is_ok();
    }
    if pick & 8 != 0 && m.size() > 0 {
        let cs = m.cluster_size() as usize;
        ok &= m.write_cluster(0, &vec![0x5a; cs.min(4096)]).is_ok();
    }
    if pick & 16 != 0 {
        ok &= m.make_empty().is_ok();
    }
    if !ok {
        return;
    }
    if m.commit().is_err() || !clean_before {
        return;
    }
    let after = io.size().unwrap_or(0);
    let mut bytes = vec![0u8; after as usize];
    if io.read_exact_at(&mut bytes, 0).is_err() {
        return;
    }
    let again = MemIo::new(bytes);
    let r = vdisk::qcow2::check::check(&again).expect("an edited image can be checked");
    assert_eq!(r.corruptions, 0, "an edit left corruption: {:?}", r.messages);
});
