#!/usr/bin/env bash
# Install the system tools the tests, demo and benchmarks use, when missing (Debian/apt).
# qemu-utils is the oracle (qemu-img, qemu-io); xorriso makes ISO images and reads ours back
# (osirrox), as do isoinfo (genisoimage) and cloud-init's own NoCloud code (Debian's cloud-init,
# run with Debian's python3); zstd/xz/gzip make compressed fixtures; time measures peak memory.
set -euo pipefail
need=()
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v qemu-io >/dev/null || need+=(qemu-utils)
command -v xorriso >/dev/null || need+=(xorriso)
command -v isoinfo >/dev/null || need+=(genisoimage)
[ -f /usr/lib/python3/dist-packages/cloudinit/__init__.py ] || need+=(cloud-init)
command -v blkid >/dev/null || need+=(util-linux)
command -v zstd >/dev/null || need+=(zstd)
command -v xz >/dev/null || need+=(xz-utils)
[ -x /usr/bin/time ] || need+=(time)
command -v pkg-config >/dev/null || need+=(pkgconf)
command -v readelf >/dev/null || need+=(binutils)
if [ ${#need[@]} -gt 0 ]; then
  echo "deps: installing ${need[*]}" >&2
  SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
for c in rustfmt clippy; do
  rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c" >/dev/null 2>&1 || true
done
