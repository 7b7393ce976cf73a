#!/usr/bin/env bash
# The C API's tests: install the shared and static libraries with pkg-config into a scratch
# prefix (scripts/install-c.sh), check the shared library's soname and that it exports exactly
# the header's vdisk_ functions, compile the header as C++, run the C tests in tests/c/ (strict
# C11, AddressSanitizer and UBSan) against the static library, and build the README's C example
# with pkg-config against the shared library and run it.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
prefix=$work/prefix
scripts/install-c.sh "$prefix" >/dev/null
export PKG_CONFIG_PATH=$prefix/lib/pkgconfig
fail() { echo "c-test: $*" >&2; exit 1; }

so=$prefix/lib/libvdisk.so
readelf -d "$so" | grep -q 'Library soname: \[libvdisk.so.0\]' || fail "libvdisk.so has no soname libvdisk.so.0"
nm -D --defined-only "$so" | awk '{print $3}' | sort >"$work/exported"
grep -v '^vdisk_' "$work/exported" | head -5 >"$work/stray" || true
[ ! -s "$work/stray" ] || fail "libvdisk.so exports non-vdisk_ symbols: $(tr '\n' ' ' <"$work/stray")"
grep -o '\bvdisk_[a-z_0-9]*(' include/vdisk.h | tr -d '(' | sort -u >"$work/declared"
diff -u "$work/declared" "$work/exported" || fail "header functions and exported symbols differ"
echo "c-test: libvdisk.so (soname libvdisk.so.0) exports the header's $(wc -l <"$work/declared") functions and nothing else"

echo '#include "vdisk.h"' | g++ -x c++ -std=c++17 -Wall -Wextra -Werror -Iinclude -fsyntax-only -

qemu-img create -q -f qcow2 "$work/img.qcow2" 8M
qemu-io -f qcow2 -c 'write -P 0x5a 0 64k' -c 'write -P 0x33 4M 2M' "$work/img.qcow2" >/dev/null
mkdir "$work/tar"
head -c 1M /dev/urandom >"$work/tar/disk.img"
tar -C "$work/tar" -cf "$work/disk.tar" disk.img
for c in tests/c/*.c; do
  exe=$work/$(basename "$c" .c)
  cc -std=c11 -Wall -Wextra -Werror -g -fsanitize=address,undefined -fno-omit-frame-pointer \
     "$c" $(pkg-config --cflags vdisk) "$prefix/lib/libvdisk.a" $(pkg-config --static --libs-only-l vdisk | sed 's/-lvdisk//') \
     -o "$exe"
  mkdir -p "$work/out-${exe##*/}"
  ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=halt_on_error=1 "$exe" "$work/img.qcow2" "$work/out-${exe##*/}" "$work/disk.tar"
done

# The README's example, compiled as a user would, against the shared library.
awk '/^```c$/{on=1; next} /^```$/{if (on) exit} on' README.md >"$work/example.c"
[ -s "$work/example.c" ] || fail "no C example in README.md"
[ "$(wc -l <"$work/example.c")" -le 14 ] || fail "the README's C example grew past 14 lines"
cc -std=c11 -Wall -Wextra -Werror "$work/example.c" $(pkg-config --cflags --libs vdisk) -Wl,-rpath,"$prefix/lib" \
   -o "$work/example"
"$work/example" "$work/img.qcow2" "$work/example.raw"
qemu-img compare -q "$work/img.qcow2" "$work/example.raw" || fail "README example's output differs from its source"
if "$work/example" /nonexistent.qcow2 "$work/x.raw" 2>"$work/example.err"; then fail "README example succeeded on a missing file"; fi
grep -q nonexistent "$work/example.err" || fail "README example's error does not name the file: $(cat "$work/example.err")"
echo "c-test: README example builds with pkg-config, converts, and reports errors"

# Python through ctypes, loading the installed library by its soname link.
python3 tests/c/ctypes_smoke.py "$prefix/lib/libvdisk.so.0" "$work/img.qcow2" "$work"
qemu-img compare -q "$work/img.qcow2" "$work/py.raw" || fail "ctypes conversion differs from its source"
