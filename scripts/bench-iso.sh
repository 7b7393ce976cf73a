#!/usr/bin/env bash
# Time `vdisk create -f iso` against `xorriso -as mkisofs -R -J` on the same tree: a 1 GiB
# tree (64 random 15 MiB files, 4096 small files in 64 directories, one 64 MiB sparse file)
# built under DIR (default /tmp), written to the same filesystem. Prints seconds, MB/s of file
# data, peak RSS and image size per tool, median of RUNS (default 3), tools alternating.
#   scripts/bench-iso.sh [DIR] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
base=${1:-/tmp}; runs=${2:-3}
cargo build --release --quiet --bin vdisk
work=$(mktemp -d "$base/vdisk-isobench.XXXXXX")
trap 'rm -rf "$work"' EXIT
src=$work/tree
mkdir -p "$src"
for i in $(seq 0 63); do head -c $((15 << 20)) /dev/urandom >"$src/big$i.bin"; done
for d in $(seq 0 63); do
  mkdir -p "$src/dir$d"
  for f in $(seq 0 63); do printf 'file %d in %d\n' "$f" "$d" >"$src/dir$d/small-file-$f.txt"; done
done
truncate -s 64M "$src/sparse.img"; printf data | dd of="$src/sparse.img" bs=1 seek=$((32 << 20)) conv=notrunc status=none
data=$(du -sb --apparent-size "$src" | cut -f1)
sync
run() {  # NAME OUT CMD...
  local name=$1 out=$2; shift 2
  rm -f "$out"; sync
  /usr/bin/time -f "%e %M" -o "$work/t" "$@" >/dev/null 2>&1
  read -r secs rss <"$work/t"
  echo "$name $secs $rss $(stat -c %s "$out") $(( $(stat -c %b "$out") * 512 ))" >>"$work/results"
}
for r in $(seq 1 "$runs"); do
  run vdisk "$work/v.iso" target/release/vdisk create -q -f iso -o volid=BENCH "$src" "$work/v.iso"
  run xorriso "$work/x.iso" xorriso -as mkisofs -quiet -R -J -V BENCH -o "$work/x.iso" "$src"
done
echo "tree: $(find "$src" -type f | wc -l) files, $data bytes apparent"
printf '%-8s %8s %9s %10s %14s %14s\n' tool seconds MB/s peakRSS image allocated
for t in vdisk xorriso; do
  grep "^$t " "$work/results" | sort -k2 -n | awk -v n="$runs" -v d="$data" '
    NR == int((n + 1) / 2) { printf "%-8s %8.2f %9.0f %8.1fMiB %14d %14d\n", $1, $2, d / 1e6 / ($2 > 0 ? $2 : 0.01), $3 / 1024, $4, $5 }'
done
