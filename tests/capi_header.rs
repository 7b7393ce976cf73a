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
fn version_macros_are_the_crate_version() {
    let header = generate();
    for (name, want) in [
        ("VDISK_VERSION_MAJOR", env!("CARGO_PKG_VERSION_MAJOR")),
        ("VDISK_VERSION_MINOR", env!("CARGO_PKG_VERSION_MINOR")),
        ("VDISK_VERSION_PATCH", env!("CARGO_PKG_VERSION_PATCH")),
    ] {
        let line = format!("#define {name} {want}\n");
        assert!(
            header.contains(&line),
            "the header lacks {line:?} (update cbindgen.toml)"
        );
    }
}

#[test]
fn header_comments_read_as_c() {
    // Rustdoc links ([`name`]) mean nothing to a C reader.
    let header = generate();
    assert!(!header.contains("[`"), "rustdoc link syntax in the header");
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
