//! Unpack arbitrary bytes as a tar archive into a fresh directory. Nothing may be created
//! outside it, and the byte limit must hold.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(root) = tempfile_dir() else { return };
    let inner = root.join("t");
    let _ = std::fs::create_dir(&inner);
    let _ = vdisk::archive::unpack(Box::new(data), &inner, 1 << 20, &mut || Ok(()));
    // Only `t` may exist in the root.
    let names: Vec<_> = std::fs::read_dir(&root).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("t")], "archive escaped its directory");
    let _ = std::fs::remove_dir_all(&root);
});

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let p = std::env::temp_dir().join(format!("vdisk-fuzz-tar-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir(&p)?;
    Ok(p)
}
