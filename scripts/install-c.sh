#!/usr/bin/env bash
# Build and install the C library: PREFIX/lib/libvdisk.so.VERSION (soname libvdisk.so.0, with
# the libvdisk.so.0 and libvdisk.so links), PREFIX/lib/libvdisk.a, PREFIX/include/vdisk.h and
# PREFIX/lib/pkgconfig/vdisk.pc. Usage: scripts/install-c.sh PREFIX (e.g. /usr/local).
set -euo pipefail
prefix=${1:?usage: scripts/install-c.sh PREFIX}
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
# The soname lets programs load libvdisk.so.0 whatever the installed file is called.
cargo rustc -q --lib --release --crate-type cdylib --crate-type staticlib -- -C link-arg=-Wl,-soname,libvdisk.so.0
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
mkdir -p "$prefix/lib/pkgconfig" "$prefix/include"
prefix=$(cd "$prefix" && pwd)
install -m 0755 target/release/libvdisk.so "$prefix/lib/libvdisk.so.$version"
strip --strip-debug "$prefix/lib/libvdisk.so.$version"
ln -sf "libvdisk.so.$version" "$prefix/lib/libvdisk.so.0"
ln -sf libvdisk.so.0 "$prefix/lib/libvdisk.so"
install -m 0644 target/release/libvdisk.a "$prefix/lib/libvdisk.a"
install -m 0644 include/vdisk.h "$prefix/include/vdisk.h"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" vdisk.pc.in >"$prefix/lib/pkgconfig/vdisk.pc"
echo "installed vdisk $version C library under $prefix"
