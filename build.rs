//! Gives the shared C library (`cargo rustc --crate-type cdylib`, see scripts/install-c.sh)
//! its soname, so programs linked against it load `libvdisk.so.0` whatever the file's name.

fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libvdisk.so.0");
    println!("cargo:rerun-if-changed=build.rs");
}
