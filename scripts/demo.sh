#!/usr/bin/env bash
# The main job on a sample: build vdisk, make a zlib-compressed qcow2 from real binaries on
# this machine (with qemu-img), flatten it to a sparse raw disk with a progress bar, and check
# the result against qemu-img.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release -q --bin vdisk
V=target/release/vdisk
D=${DEMO_DIR:-target/demo}
mkdir -p "$D"
if [ ! -e "$D/sample.qcow2" ]; then
  echo "== making $D/sample.qcow2 (1 GiB virtual, ~128 MiB of system files, zlib-compressed)"
  rm -f "$D/sample.raw"
  truncate -s 1G "$D/sample.raw"
  { tar cf - /usr/lib /usr/share 2>/dev/null || true; } | head -c 128M | dd of="$D/sample.raw" bs=1M seek=16 conv=notrunc,sparse status=none
  qemu-img convert -q -c -f raw -O qcow2 "$D/sample.raw" "$D/sample.qcow2"
  rm -f "$D/sample.raw"
fi
echo "== vdisk info"
$V info "$D/sample.qcow2"
echo "== vdisk convert -p -O raw"
time $V convert -p -O raw "$D/sample.qcow2" "$D/sample.raw"
echo "== result"
$V info "$D/sample.raw" | head -4
qemu-img compare "$D/sample.qcow2" "$D/sample.raw"
