#!/usr/bin/env bash
# Build and install the C library: PREFIX/lib/libvdisk.so.VERSION (soname libvdisk.so.0, with
# the libvdisk.so.0 and libvdisk.so links), PREFIX/lib/libvdisk.a, PREFIX/include/vdisk.h and
# PREFIX/lib/pkgconfig/vdisk.pc. Usage: scripts/install-c.sh PREFIX (e.g. /usr/local).
set -euo pipefail
prefix=${1:?usage: scripts/install-c.sh PREFIX}
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
# The soname lets programs load libvdisk.so.0 whatever the installed file is called. rustc
# names the system libraries a static link needs (--print native-static-libs) only when it
# builds the library, so the list is kept beside the build for the runs that build nothing.
build() {
  cargo rustc --lib --release --crate-type cdylib --crate-type staticlib -- \
    -C link-arg=-Wl,-soname,libvdisk.so.0 --print native-static-libs 2>&1
}
libs_file=target/release/vdisk-native-static-libs
out=$(build) || { printf '%s\n' "$out" >&2; exit 1; }
libs=$(printf '%s\n' "$out" | sed -n 's/.*native-static-libs: //p' | tail -1)
if [ -z "$libs" ] && [ ! -s "$libs_file" ]; then
  touch src/lib.rs
  out=$(build) || { printf '%s\n' "$out" >&2; exit 1; }
  libs=$(printf '%s\n' "$out" | sed -n 's/.*native-static-libs: //p' | tail -1)
fi
if [ -n "$libs" ]; then
  printf '%s\n' "$libs" >"$libs_file"
fi
libs=$(cat "$libs_file")
[ -n "$libs" ] || { echo "install-c: rustc named no native static libraries" >&2; exit 1; }
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
mkdir -p "$prefix/lib/pkgconfig" "$prefix/include"
prefix=$(cd "$prefix" && pwd)
install -m 0755 target/release/libvdisk.so "$prefix/lib/libvdisk.so.$version"
strip --strip-debug "$prefix/lib/libvdisk.so.$version"
ln -sf "libvdisk.so.$version" "$prefix/lib/libvdisk.so.0"
ln -sf libvdisk.so.0 "$prefix/lib/libvdisk.so"
install -m 0644 target/release/libvdisk.a "$prefix/lib/libvdisk.a"
install -m 0644 include/vdisk.h "$prefix/include/vdisk.h"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" -e "s|@LIBS_PRIVATE@|$libs|" \
  vdisk.pc.in >"$prefix/lib/pkgconfig/vdisk.pc"
echo "installed vdisk $version C library under $prefix"
