//! The checked-in C header must be exactly what cbindgen makes of `src/ffi/`.

use std::path::Path;

fn generate() -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config =
        cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("read cbindgen.toml");
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen could not generate the header")
        .write(&mut out);
    String::from_utf8(out).expect("header is UTF-8")
}

#[test]
fn header_is_current() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("include/vdisk.h");
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generate(),
        "include/vdisk.h is stale; regenerate it with: cargo test --test capi_header -- --ignored regenerate"
    );
}

/// Writes the header (run by hand after changing `src/ffi/`).
#[test]
#[ignore]
fn regenerate() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("include/vdisk.h");
    std::fs::write(path, generate()).unwrap();
}
