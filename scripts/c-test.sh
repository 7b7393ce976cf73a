#!/usr/bin/env bash
# Build the static library, compile the C tests in tests/c/ against include/vdisk.h as strict
# C11 (and the header as C++) under AddressSanitizer and UBSan, and run them.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
cargo rustc -q --lib --release --crate-type staticlib
lib=target/release/libvdisk.a
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
qemu-img create -q -f qcow2 "$work/img.qcow2" 8M
qemu-io -f qcow2 -c 'write -P 0x5a 0 64k' -c 'write -P 0x33 4M 2M' "$work/img.qcow2" >/dev/null
echo '#include "vdisk.h"' | g++ -x c++ -std=c++17 -Wall -Wextra -Werror -Iinclude -fsyntax-only -
for c in tests/c/*.c; do
  exe=$work/$(basename "$c" .c)
  cc -std=c11 -Wall -Wextra -Werror -Iinclude -g -fsanitize=address,undefined -fno-omit-frame-pointer \
     "$c" "$lib" -lpthread -ldl -lm -o "$exe"
  mkdir -p "$work/out"
  ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1 "$exe" "$work/img.qcow2" "$work/out"
done
