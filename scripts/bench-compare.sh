#!/usr/bin/env bash
# Side-by-side timing of `vdisk convert -O raw` against `qemu-img convert -O raw` on the same
# images, alternating the two tools (A B A B ...) so machine noise hits both alike, and
# reporting medians, the speed ratio and peak RSS.
#
#   scripts/bench-compare.sh CORPUS_DIR [RUNS]
#
# CORPUS_DIR is made by ../shared/bench/make-corpus.sh (img.qcow2, img-deflate.qcow2,
# img-zstd.qcow2, raw.img, overlay.qcow2); files that are missing are skipped. The other
# formats are made from raw.img with qemu-img on first use (img-sparse.vmdk, img-stream.vmdk
# (streamOptimized), img.vhd (dynamic vpc), img-fixed.vhd, img.vhdx, img.vdi). Outputs are
# written next to the corpus (same filesystem) and removed after each run. The first output of
# each tool is checked against the other with `qemu-img compare`. A second table times the
# streaming import (from a pipe) against convert of the same file (the one-engine ratio).
set -euo pipefail
CORPUS=${1:?usage: bench-compare.sh CORPUS_DIR [RUNS]}
RUNS=${2:-5}
HERE=$(cd "$(dirname "$0")/.." && pwd)
bash "$HERE/scripts/deps.sh"
(cd "$HERE" && cargo build --release -q --bin vdisk)
VDISK="$HERE/target/release/vdisk"
OUT="$CORPUS/.bench-out"
mkdir -p "$OUT"
trap 'rm -rf "$OUT"' EXIT

# run TOOL SRC DST -> prints "seconds peak_kib"
run() {
  local tool=$1 src=$2 dst=$3 fmt=()
  rm -f "$dst"
  # qemu probes a fixed VHD as raw (footer and all); both tools are told it is one.
  case $src in *-fixed.vhd) fmt=(-f vpc) ;; esac
  if [ "$tool" = qemu ]; then
    /usr/bin/time -f "%e %M" -o "$OUT/t" qemu-img convert "${fmt[@]}" -O raw "$src" "$dst"
  else
    /usr/bin/time -f "%e %M" -o "$OUT/t" "$VDISK" convert "${fmt[@]}" -O raw "$src" "$dst"
  fi
  cat "$OUT/t"
}

median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2}'; }

if [ -e "$CORPUS/raw.img" ]; then
  mk() {  # NAME FORMAT OPTIONS
    [ -e "$CORPUS/$1" ] || qemu-img convert -f raw -O "$2" ${3:+-o "$3"} "$CORPUS/raw.img" "$CORPUS/$1"
  }
  mk img-sparse.vmdk vmdk subformat=monolithicSparse
  mk img-stream.vmdk vmdk subformat=streamOptimized
  mk img.vhd vpc subformat=dynamic
  mk img-fixed.vhd vpc subformat=fixed
  mk img.vhdx vhdx ""
  mk img.vdi vdi ""
fi

printf '%-20s %10s %10s %8s %12s %12s\n' image qemu-img vdisk speedup qemu-RSS vdisk-RSS
for img in img.qcow2 img-deflate.qcow2 img-zstd.qcow2 raw.img overlay.qcow2 \
  img-sparse.vmdk img-stream.vmdk img.vhd img-fixed.vhd img.vhdx img.vdi; do
  src="$CORPUS/$img"
  [ -e "$src" ] || continue
  # correctness first
  run qemu "$src" "$OUT/q.raw" >/dev/null
  run vdisk "$src" "$OUT/v.raw" >/dev/null
  qemu-img compare -q -f raw -F raw "$OUT/q.raw" "$OUT/v.raw" || { echo "MISMATCH on $img" >&2; exit 1; }
  qa=$(stat -c %b "$OUT/q.raw"); va=$(stat -c %b "$OUT/v.raw")
  rm -f "$OUT/q.raw" "$OUT/v.raw"
  : > "$OUT/qt"; : > "$OUT/vt"; : > "$OUT/qm"; : > "$OUT/vm"
  for _ in $(seq "$RUNS"); do
    read -r s m < <(run qemu "$src" "$OUT/q.raw"); echo "$s" >> "$OUT/qt"; echo "$m" >> "$OUT/qm"
    read -r s m < <(run vdisk "$src" "$OUT/v.raw"); echo "$s" >> "$OUT/vt"; echo "$m" >> "$OUT/vm"
    rm -f "$OUT/q.raw" "$OUT/v.raw"
  done
  qt=$(median < "$OUT/qt"); vt=$(median < "$OUT/vt")
  qm=$(sort -n "$OUT/qm" | tail -1); vm=$(sort -n "$OUT/vm" | tail -1)
  ratio=$(awk -v q="$qt" -v v="$vt" 'BEGIN { if (v > 0) printf "%.2fx", q / v; else print "inf" }')
  printf '%-20s %9ss %9ss %8s %9s KiB %9s KiB   (allocated blocks: qemu %s, vdisk %s)\n' \
    "$img" "$qt" "$vt" "$ratio" "$qm" "$vm" "$qa" "$va"
done

# The streaming path against the file path on the same images: `vdisk import` from a pipe
# (what the importer and uploader run; `cat` shares the cores), `vdisk import FILE` (the same
# stream reader, no `cat`) and `vdisk convert` of the file, alternating.
echo
printf '%-20s %10s %10s %8s %10s %8s %12s %12s\n' image convert import ratio import-f ratio-f convert-RSS import-RSS
for img in img.qcow2 img-deflate.qcow2 img-zstd.qcow2 img-sparse.vmdk img-stream.vmdk img.vhd img.vhdx img.vdi; do
  src="$CORPUS/$img"
  [ -e "$src" ] || continue
  : > "$OUT/ct"; : > "$OUT/it"; : > "$OUT/ft"; : > "$OUT/cm"; : > "$OUT/im"
  for _ in $(seq "$RUNS"); do
    # `import` syncs the disk before it reports success (the importer must); convert does
    # not, so its time here includes a `sync -d` of its output, else the ratio measures the
    # flush, not the reader.
    rm -f "$OUT/c.raw"
    /usr/bin/time -f "%e %M" -o "$OUT/t" sh -c "'$VDISK' convert -O raw '$src' '$OUT/c.raw' && sync -d '$OUT/c.raw'"
    read -r s m < "$OUT/t"; echo "$s" >> "$OUT/ct"; echo "$m" >> "$OUT/cm"
    rm -f "$OUT/i.img"
    /usr/bin/time -f "%e %M" -o "$OUT/t" sh -c "cat '$src' | '$VDISK' import - '$OUT/i.img' 2>/dev/null"
    read -r s m < "$OUT/t"; echo "$s" >> "$OUT/it"; echo "$m" >> "$OUT/im"
    qemu-img compare -q -f raw -F raw "$OUT/c.raw" "$OUT/i.img" || { echo "MISMATCH on import of $img" >&2; exit 1; }
    rm -f "$OUT/i.img"
    /usr/bin/time -f "%e %M" -o "$OUT/t" "$VDISK" import "$src" "$OUT/i.img" 2>/dev/null
    read -r s m < "$OUT/t"; echo "$s" >> "$OUT/ft"; echo "$m" >> "$OUT/im"
    rm -f "$OUT/c.raw" "$OUT/i.img"
  done
  ct=$(median < "$OUT/ct"); it=$(median < "$OUT/it"); ft=$(median < "$OUT/ft")
  cm=$(sort -n "$OUT/cm" | tail -1); im=$(sort -n "$OUT/im" | tail -1)
  ratio=$(awk -v c="$ct" -v i="$it" 'BEGIN { if (c > 0) printf "%.2fx", i / c; else print "inf" }')
  ratio_f=$(awk -v c="$ct" -v i="$ft" 'BEGIN { if (c > 0) printf "%.2fx", i / c; else print "inf" }')
  printf '%-20s %9ss %9ss %8s %9ss %8s %9s KiB %9s KiB\n' "$img" "$ct" "$it" "$ratio" "$ft" "$ratio_f" "$cm" "$im"
done
