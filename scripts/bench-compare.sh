#!/usr/bin/env bash
# Side-by-side timing of `vdisk convert -O raw` against `qemu-img convert -O raw` and the imago
# crate (benches/imago-convert, 2 threads; qcow2 and raw sources) on the same images,
# alternating the tools (A B C A B C ...) so machine noise hits all alike, and reporting
# medians, the speed ratios, peak RSS and the blocks each output allocates.
#
#   scripts/bench-compare.sh CORPUS_DIR [RUNS]
#   SCALE=1 scripts/bench-compare.sh CORPUS_DIR [RUNS]   # also the scale rows (below)
#
# CORPUS_DIR is made by ../shared/bench/make-corpus.sh (img.qcow2, img-deflate.qcow2,
# img-zstd.qcow2, raw.img, raw.img.zst, overlay.qcow2); files that are missing are skipped.
# Made on first use: img-512.qcow2 (raw.img at 512-byte clusters) and the other formats from raw.img with qemu-img (img-sparse.vmdk, img-stream.vmdk
# (streamOptimized), img.vhd (dynamic vpc), img-fixed.vhd, img.vhdx, img.vdi). Outputs are
# written next to the corpus (same filesystem) and removed after each run. The first output of
# each tool is checked against qemu-img's with `qemu-img compare`. Further tables: `vdisk
# import` of raw.img.zst against `zstd -dc > file`; the streaming import (from a pipe) against
# convert of the same file (the one-engine ratio); with SCALE=1, a 4 TiB qcow2 holding 64 MiB
# against a 64 MiB one with the same data, and a qcow2 of about 8 GiB of data (copies of
# raw.img side by side, built at bench time) against img.qcow2 in MB/s of data.
set -euo pipefail
CORPUS=${1:?usage: bench-compare.sh CORPUS_DIR [RUNS]}
RUNS=${2:-5}
HERE=$(cd "$(dirname "$0")/.." && pwd)
bash "$HERE/scripts/deps.sh"
(cd "$HERE" && cargo build --release -q --bin vdisk)
(cd "$HERE/benches/imago-convert" && cargo build --release -q)
VDISK="$HERE/target/release/vdisk"
IMAGO="$HERE/benches/imago-convert/target/release/imago-convert"
OUT="$CORPUS/.bench-out"
mkdir -p "$OUT"
trap 'rm -rf "$OUT"' EXIT

# run TOOL SRC DST -> prints "seconds peak_kib" (wall time to the microsecond from bash's
# EPOCHREALTIME; time(1) only for the peak RSS, its own clock has 10 ms steps)
run() {
  local tool=$1 src=$2 dst=$3 fmt=() t0 t1
  rm -f "$dst"
  # qemu probes a fixed VHD as raw (footer and all); both tools are told it is one.
  case $src in *-fixed.vhd) fmt=(-f vpc) ;; esac
  t0=$EPOCHREALTIME
  case $tool in
    qemu) /usr/bin/time -f "%M" -o "$OUT/t" qemu-img convert "${fmt[@]}" -O raw "$src" "$dst" ;;
    vdisk) /usr/bin/time -f "%M" -o "$OUT/t" "$VDISK" convert "${fmt[@]}" -O raw "$src" "$dst" ;;
    imago)
      local f=qcow2
      case $src in *.qcow2) ;; *) f=raw ;; esac
      /usr/bin/time -f "%M" -o "$OUT/t" "$IMAGO" -j 2 -f "$f" "$src" "$dst" ;;
  esac
  t1=$EPOCHREALTIME
  echo "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", b - a }') $(cat "$OUT/t")"
}

# imago reads qcow2 (not zstd-compressed) and raw.
imago_reads() {
  case $1 in
    *zstd*.qcow2) return 1 ;;
    *.qcow2 | raw.img) return 0 ;;
    *) return 1 ;;
  esac
}

median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "") print "-"; else if (b > 0) printf "%.2fx", a / b; else print "inf" }'; }

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
  mk img-512.qcow2 qcow2 cluster_size=512
fi

printf '%-18s %9s %9s %9s %9s %9s %30s %32s\n' image qemu-img imago vdisk "q/vdisk" "i/vdisk" \
  "peak RSS KiB (q/i/v)" "allocated KiB (q/i/v)"
for img in img.qcow2 img-512.qcow2 img-deflate.qcow2 img-zstd.qcow2 overlay.qcow2 raw.img \
  img-sparse.vmdk img-stream.vmdk img.vhd img-fixed.vhd img.vhdx img.vdi; do
  src="$CORPUS/$img"
  [ -e "$src" ] || continue
  tools=(qemu vdisk)
  imago_reads "$img" && tools=(qemu imago vdisk)
  # correctness first: every output equals qemu-img's
  run qemu "$src" "$OUT/qemu.raw" >/dev/null
  declare -A alloc=()
  for t in "${tools[@]}"; do
    [ "$t" = qemu ] || run "$t" "$src" "$OUT/$t.raw" >/dev/null
    qemu-img compare -q -f raw -F raw "$OUT/qemu.raw" "$OUT/$t.raw" || { echo "MISMATCH: $t on $img" >&2; exit 1; }
    alloc[$t]=$(( $(stat -c %b "$OUT/$t.raw") / 2 ))
  done
  rm -f "$OUT"/*.raw
  for t in "${tools[@]}"; do : > "$OUT/$t.t"; : > "$OUT/$t.m"; done
  for _ in $(seq "$RUNS"); do
    for t in "${tools[@]}"; do
      read -r s m < <(run "$t" "$src" "$OUT/$t.raw"); echo "$s" >> "$OUT/$t.t"; echo "$m" >> "$OUT/$t.m"
      rm -f "$OUT/$t.raw"
    done
  done
  declare -A tm=() rss=()
  for t in "${tools[@]}"; do tm[$t]=$(median < "$OUT/$t.t"); rss[$t]=$(sort -n "$OUT/$t.m" | tail -1); done
  printf '%-18s %8.3fs %9s %8.3fs %9s %9s %30s %32s\n' "$img" "${tm[qemu]}" "${tm[imago]:+$(printf %.3fs "${tm[imago]}")}" "${tm[vdisk]}" \
    "$(ratio "${tm[qemu]}" "${tm[vdisk]}")" "$(ratio "${tm[imago]:-}" "${tm[vdisk]}")" \
    "${rss[qemu]}/${rss[imago]:--}/${rss[vdisk]}" "${alloc[qemu]}/${alloc[imago]:--}/${alloc[vdisk]}"
  unset tm rss alloc
done

if [ -e "$CORPUS/raw.img.zst" ]; then
  echo
  : > "$OUT/zt"; : > "$OUT/it"; : > "$OUT/im"
  for _ in $(seq "$RUNS"); do
    rm -f "$OUT/z.raw"
    /usr/bin/time -f "%e %M" -o "$OUT/t" sh -c "zstd -q -dc '$CORPUS/raw.img.zst' > '$OUT/z.raw' && sync -d '$OUT/z.raw'"
    read -r s m < "$OUT/t"; echo "$s" >> "$OUT/zt"
    rm -f "$OUT/i.img"
    /usr/bin/time -f "%e %M" -o "$OUT/t" "$VDISK" import "$CORPUS/raw.img.zst" "$OUT/i.img" 2>/dev/null
    read -r s m < "$OUT/t"; echo "$s" >> "$OUT/it"; echo "$m" >> "$OUT/im"
  done
  cmp -s "$OUT/z.raw" "$OUT/i.img" || { echo "MISMATCH on raw.img.zst import" >&2; exit 1; }
  rm -f "$OUT/z.raw" "$OUT/i.img"
  zt=$(median < "$OUT/zt"); it=$(median < "$OUT/it")
  printf '%-30s %9ss   vdisk import %9ss   zstd/vdisk %s   (vdisk peak RSS %s KiB; both sync the output)\n' \
    "raw.img.zst: zstd -dc > file" "$zt" "$it" "$(ratio "$zt" "$it")" "$(sort -n "$OUT/im" | tail -1)"
fi

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

if [ "${SCALE:-0}" = 1 ]; then
  echo
  echo "scale: cost follows the data, not the virtual size"
  big=$OUT/4t.qcow2 small=$OUT/64m.qcow2
  qemu-img create -q -f qcow2 "$big" 4T
  qemu-img create -q -f qcow2 "$small" 64M
  wb=() ws=()
  for i in $(seq 0 63); do
    wb+=(-c "write -q -P $((i + 1)) $((i * 64))G 1M"); ws+=(-c "write -q -P $((i + 1)) ${i}M 1M")
  done
  qemu-io -f qcow2 "${wb[@]}" "$big" >/dev/null
  qemu-io -f qcow2 "${ws[@]}" "$small" >/dev/null
  : > "$OUT/bt"; : > "$OUT/st"
  for _ in $(seq "$RUNS"); do
    read -r s m < <(run vdisk "$big" "$OUT/b.raw"); echo "$s" >> "$OUT/bt"; rm -f "$OUT/b.raw"
    read -r s m < <(run vdisk "$small" "$OUT/s.raw"); echo "$s" >> "$OUT/st"; rm -f "$OUT/s.raw"
  done
  printf '  4 TiB qcow2 holding 64 MiB: %ss   64 MiB qcow2, same data: %ss   ratio %s\n' \
    "$(median < "$OUT/bt")" "$(median < "$OUT/st")" "$(ratio "$(median < "$OUT/bt")" "$(median < "$OUT/st")")"
  rm -f "$big" "$small"
  if [ -e "$CORPUS/raw.img" ] && [ -e "$CORPUS/img.qcow2" ]; then
    # Copies of raw.img side by side until about 8 GiB of data.
    per=$(( $(stat -c %b "$CORPUS/raw.img") * 512 ))
    n=$(( (8 << 30) / per + 1 ))
    vsize=$(stat -c %s "$CORPUS/raw.img")
    truncate -s $(( n * vsize )) "$OUT/big.raw"
    for i in $(seq 0 $((n - 1))); do
      dd if="$CORPUS/raw.img" of="$OUT/big.raw" bs=1M seek=$(( i * vsize >> 20 )) conv=sparse,notrunc status=none
    done
    qemu-img convert -f raw -O qcow2 "$OUT/big.raw" "$OUT/big.qcow2"
    rm -f "$OUT/big.raw"
    : > "$OUT/gt"; : > "$OUT/nt"
    for _ in $(seq "$RUNS"); do
      read -r s m < <(run vdisk "$OUT/big.qcow2" "$OUT/g.raw"); echo "$s" >> "$OUT/gt"; rm -f "$OUT/g.raw"
      read -r s m < <(run vdisk "$CORPUS/img.qcow2" "$OUT/n.raw"); echo "$s" >> "$OUT/nt"; rm -f "$OUT/n.raw"
    done
    gt=$(median < "$OUT/gt"); nt=$(median < "$OUT/nt")
    printf '  %d copies (%d MiB of data): %ss = %s MB/s   img.qcow2 (%d MiB): %ss = %s MB/s\n' \
      "$n" $(( n * per >> 20 )) "$gt" "$(awk -v b=$(( n * per )) -v t="$gt" 'BEGIN{printf "%.0f", b/1e6/t}')" \
      $(( per >> 20 )) "$nt" "$(awk -v b="$per" -v t="$nt" 'BEGIN{printf "%.0f", b/1e6/t}')"
    rm -f "$OUT/big.qcow2"
  fi
fi
