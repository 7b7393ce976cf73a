#!/usr/bin/env bash
# Regenerate the seed corpus in fuzz/seeds/<target>/ (committed; run this only to refresh it).
# Needs qemu-img, qemu-io, xorriso, gzip, xz, zstd and python3. Every seed stays under 64 KiB:
# small virtual sizes and small clusters.
set -euo pipefail
cd "$(dirname "$0")"
t=$(mktemp -d)
trap 'rm -rf "$t"' EXIT
q=seeds/qcow2_read
p=seeds/probe
i=seeds/iso_info
mkdir -p "$q" "$p" "$i"

io() { qemu-io -f qcow2 "$@" >/dev/null; }

# v3, 512 B clusters: data, a zeroed range, a discarded range.
qemu-img create -q -f qcow2 -o cluster_size=512 "$t/v3.qcow2" 64k
io -c 'write -P 0xab 0 4k' -c 'write -P 0x11 8k 1536' -c 'write -z 16k 2k' \
   -c 'write -P 0x22 20k 1k' -c 'discard 20k 512' "$t/v3.qcow2"
cp "$t/v3.qcow2" "$q/v3-512.qcow2"

# v2 (compat=0.10), 1 KiB clusters, odd virtual size.
qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=1024 "$t/v2.qcow2" 40000
io -c 'write -P 0x5a 1k 3k' -c 'write -P 0x01 30k 2k' "$t/v2.qcow2"
cp "$t/v2.qcow2" "$q/v2-1k.qcow2"

# Compressed clusters, deflate and zstd, 4 KiB clusters (half compressible data).
python3 - "$t/src.raw" <<'PY'
import sys
b = bytearray(48 * 1024)
for k in range(0, 24 * 1024):
    b[k] = (k * 7 // 13) & 0xff
b[30000:30100] = bytes(range(100))
open(sys.argv[1], "wb").write(bytes(b))
PY
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4096 "$t/src.raw" "$q/zlib-4k.qcow2"
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4096,compression_type=zstd \
  "$t/src.raw" "$q/zstd-4k.qcow2"

# Internal snapshot, refcount_bits=2, lazy refcounts.
qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=2,lazy_refcounts=on "$t/snap.qcow2" 16k
io -c 'write -P 0x33 0 2k' "$t/snap.qcow2"
qemu-img snapshot -c first "$t/snap.qcow2"
io -c 'write -P 0x44 1k 2k' "$t/snap.qcow2"
cp "$t/snap.qcow2" "$q/snapshot-512.qcow2"

# Backing file and external data file (refused under the untrusted policy: header parsing).
qemu-img create -q -f qcow2 -o cluster_size=512 "$t/base.qcow2" 8k
qemu-img create -q -f qcow2 -o cluster_size=512 -b base.qcow2 -F qcow2 "$t/overlay.qcow2"
cp "$t/overlay.qcow2" "$q/backing-512.qcow2"
# (qemu-img creates the data file relative to the current directory: make it in $t.)
(cd "$t" && qemu-img create -q -f qcow2 -o cluster_size=512,data_file=data.raw df.qcow2 8k)
cp "$t/df.qcow2" "$q/datafile-512.qcow2"

# Extended L2 (needs 16 KiB clusters): made by qemu, then repacked into 4 clusters
# (header, L1, L2, data) so the seed stays small; the refcount table is never read.
qemu-img create -q -f qcow2 -o cluster_size=16k,extended_l2=on "$t/ext.qcow2" 1M
io -c 'write -P 0x77 0 4k' -c 'write -z 16k 16k' -c 'write -z 36k 1k' -c 'write -P 0x78 8k 512' \
  "$t/ext.qcow2"
python3 - "$t/ext.qcow2" "$q/extl2-16k.qcow2" <<'PY'
import struct, sys
src = open(sys.argv[1], "rb").read()
C = 16384
l1_off = struct.unpack(">Q", src[40:48])[0]
l1 = struct.unpack(">Q", src[l1_off:l1_off + 8])[0]
l2_off = l1 & 0x00ffffffffffff00 & ~0x1ff
l2 = bytearray(src[l2_off:l2_off + C])
out = bytearray(src[:C])
# Data clusters move to 3*C, 4*C, ...; the L2 entries are rewritten to match.
data = bytearray()
for k in range(C // 16):
    e = struct.unpack(">Q", l2[16 * k:16 * k + 8])[0]
    host = e & 0x00fffffffffffe00
    if host:
        new = 3 * C + len(data)
        data += src[host:host + C].ljust(C, b"\0")
        struct.pack_into(">Q", l2, 16 * k, (e & ~0x00fffffffffffe00) | new)
struct.pack_into(">Q", out, 40, C)      # L1 at cluster 1
struct.pack_into(">Q", out, 48, C)      # refcount table offset (valid, never read)
l1c = bytearray(C)
struct.pack_into(">Q", l1c, 0, (1 << 63) | 2 * C)
img = out + l1c + l2 + data.rstrip(b"\0")
open(sys.argv[2], "wb").write(img)
PY

# probe: the first bytes of each recognised format.
head -c 512 "$q/v3-512.qcow2" >"$p/qcow2"
printf 'QFI\xfb\0\0\0\x01' >"$p/qcow1"
printf 'hello' | gzip -c >"$p/gzip"
printf 'hello' | xz -c >"$p/xz"
printf 'hello' | zstd -q -c >"$p/zstd"
printf 'KDMV\1\0\0\0' >"$p/vmdk"
printf '# Disk DescriptorFile\n' >"$p/vmdk-desc"
python3 - "$p" <<'PY'
import sys
d = sys.argv[1]
b = bytearray(0x48); b[0x40:0x44] = b"\x7f\x10\xda\xbe"; open(d + "/vdi", "wb").write(b)
open(d + "/vhd", "wb").write(b"conectix" + bytes(504))
open(d + "/vhdx", "wb").write(b"vhdxfile" + bytes(8))
b = bytearray(1536); b[1024:1032] = b"conectix"; open(d + "/vhd-fixed", "wb").write(b)
b = bytearray(512); b[0x101:0x106] = b"ustar"; open(d + "/tar", "wb").write(b)
b = bytearray(0x8006); b[0x8001:0x8006] = b"CD001"; open(d + "/iso", "wb").write(b)
PY

# iso_info: the descriptors of a real cidata ISO from sector 16 on (the fuzz target puts its
# input at sector 16), cut before the file data.
mkdir -p "$t/iso"
printf 'instance-id: x\n' >"$t/iso/meta-data"
printf '#cloud-config\n' >"$t/iso/user-data"
xorriso -as mkisofs -quiet -V cidata -J -R -o "$t/seed.iso" "$t/iso" 2>/dev/null
dd if="$t/seed.iso" of="$i/cidata" bs=2048 skip=16 count=8 status=none
dd if="$t/seed.iso" of="$i/pvd-only" bs=2048 skip=16 count=1 status=none

# vmdk_read: the target puts 16 KiB pieces of its input at 0, 64, 128 and 192 KiB (qemu's
# header, descriptor, grain directories and tables; then the start of its first three 64 KiB
# grains), so the sparse seeds are qemu images cut into those pieces: cut after the last
# non-zero sector, only zeros outside the pieces. Descriptor files are seeds as they are.
v=seeds/vmdk_read
mkdir -p "$v"
# monolithicSparse with the zeroed-grain flag and a short last grain (1000 KiB): data at odd
# offsets in grains 0 and 1 (back to back in the file) and in the last grain, then a zeroed
# grain (written last: it takes no space).
qemu-img create -q -f vmdk -o zeroed_grain=on "$t/sparse.vmdk" 1000k
qemu-io -f vmdk -c 'write -P 0xab 4660 1500' -c 'write -P 0x5c 66313 700' \
  -c 'write -P 0x17 983373 999' -c 'write -z 128k 64k' "$t/sparse.vmdk" >/dev/null
# streamOptimized (zlib grains with markers, directory in front as qemu writes it), and the
# same stream with its grain table and directory moved behind the grains and found through a
# footer (GT, GD, footer and end-of-stream markers), as VMware writes streams.
qemu-img convert -q -c -f vmdk -O vmdk -o subformat=streamOptimized "$t/sparse.vmdk" "$t/stream.vmdk"
python3 - "$t/stream.vmdk" "$t/footer.vmdk" <<'PY2'
import struct, sys
S = 512
b = bytearray(open(sys.argv[1], "rb").read())
rgd_sec, gd_sec = struct.unpack_from("<QQ", b, 48)
gd = struct.unpack_from("<I", b, gd_sec * S)[0]    # one directory entry (a 1000 KiB disk)
gt = bytes(b[gd * S:gd * S + 4 * S])
b[rgd_sec * S:gd * S + 4 * S] = bytes(gd * S + 4 * S - rgd_sec * S)   # old directories, tables
flags = struct.unpack_from("<I", b, 8)[0] & ~2      # no redundant directory
struct.pack_into("<I", b, 8, flags)
end = len(b.rstrip(b"\0"))
out = b[:(end + S - 1) // S * S]
def marker(val, typ):
    m = bytearray(S); struct.pack_into("<QII", m, 0, val, 0, typ); return m
out += marker(4, 1)                                 # grain table marker
gt_sec = len(out) // S
out += gt
out += marker(1, 2)                                 # grain directory marker
new_gd = len(out) // S
d = bytearray(S); struct.pack_into("<I", d, 0, gt_sec); out += d
foot = bytearray(b[:S])
struct.pack_into("<QQ", foot, 48, 0, new_gd)        # the directory, found through the footer
out += marker(1, 3) + foot                          # footer marker, footer
out += bytes(S)                                     # end of stream
struct.pack_into("<QQ", out, 48, 0, 0xffffffffffffffff)   # header: directory at the end
open(sys.argv[2], "wb").write(out)
PY2
qemu-img compare -q -f vmdk -F vmdk "$t/footer.vmdk" "$t/sparse.vmdk"
python3 - "$v" "$t/sparse.vmdk" sparse "$t/stream.vmdk" stream "$t/footer.vmdk" stream-footer <<'PY2'
import sys
P, SLOTS = 16384, (0, 65536, 131072, 196608)
out = sys.argv[1]
for src, name in zip(sys.argv[2::2], sys.argv[3::2]):
    b = open(src, "rb").read()
    end = (len(b.rstrip(b"\0")) + 511) // 512 * 512
    if name.endswith("footer"):
        end = len(b)                      # the footer must stay the file's last sectors
    b = b[:end]
    used = [s for s in SLOTS if s < len(b)]
    assert len(b) <= used[-1] + P, f"{name}: data past the last piece"
    for a, z in zip([s + P for s in used], used[1:]):
        assert not any(b[a:z]), f"{name}: non-zero bytes between pieces ({a:#x}..{z:#x})"
    seed = b"".join(b[s:s + P].ljust(P, b"\0") for s in used[:-1]) + b[used[-1]:]
    open(f"{out}/{name}.seed", "wb").write(seed)
PY2
# monolithicFlat: the descriptor alone (it names its extent file: refused as untrusted), and
# the same with the extent made a ZERO extent (opened).
qemu-img create -q -f vmdk -o subformat=monolithicFlat "$t/flat.vmdk" 2M
cp "$t/flat.vmdk" "$v/flat.vmdk"
sed 's/^RW \([0-9]*\) FLAT .*/RW \1 ZERO/' "$t/flat.vmdk" >"$v/flat-zero.vmdk"
grep -q ' ZERO$' "$v/flat-zero.vmdk"

# check: the qcow2_read seeds (valid images of every kind).
mkdir -p seeds/check seeds/stream_import seeds/tar_unpack
cp seeds/qcow2_read/*.qcow2 seeds/check/
mkdir -p seeds/qcow2_differential
cp seeds/qcow2_read/*.qcow2 seeds/qcow2_differential/
# forward_differential: the VHD, VDI and VMDK reader seeds under 64 KiB (fuzz-check's
# -max_len); the vhd_read and vdi_read ones are committed, not made here.
mkdir -p seeds/forward_differential
find seeds/vhd_read seeds/vdi_read seeds/vmdk_read -type f -size -65536c \
  -exec cp {} seeds/forward_differential/ \;

# stream_import: qcow2 images (plain and compressed) and compressed raw streams, and a tar
# holding a gzipped disk.
cp seeds/qcow2_read/v3-512.qcow2 seeds/qcow2_read/zlib-4k.qcow2 seeds/qcow2_read/zstd-4k.qcow2 \
   seeds/qcow2_read/extl2-16k.qcow2 seeds/stream_import/
head -c 20000 "$t/src.raw" >"$t/small.raw"
gzip -c "$t/small.raw" >seeds/stream_import/raw.gz
xz -c "$t/small.raw" >seeds/stream_import/raw.xz
zstd -q -c "$t/small.raw" >seeds/stream_import/raw.zst
mkdir -p "$t/tar/disk" "$t/arch/sub"
gzip -c seeds/qcow2_read/v3-512.qcow2 >"$t/tar/disk/disk.qcow2.gz"
tar -C "$t/tar" -cf seeds/stream_import/disk.tar disk

# tar_unpack: files, directories, an inside symlink and a hard link.
printf 'hello\n' >"$t/arch/sub/f"
ln -s f "$t/arch/sub/link"
ln "$t/arch/sub/f" "$t/arch/hard"
tar -C "$t/arch" -cf seeds/tar_unpack/plain.tar .
tar -C "$t/arch" --format=gnu -cf seeds/tar_unpack/gnu.tar .

# tar_read: the tar_unpack seeds, plus a sparse file (data at 20000 and at the end) and a
# 120-character name in old GNU sparse and PAX sparse 0.0, 0.1 and 1.0 form.
mkdir -p seeds/tar_read "$t/sp"
cp seeds/tar_unpack/*.tar seeds/tar_read/
truncate -s 64k "$t/sp/sp"
printf abc | dd of="$t/sp/sp" bs=1 seek=20000 conv=notrunc 2>/dev/null
printf xy | dd of="$t/sp/sp" bs=1 seek=65000 conv=notrunc 2>/dev/null
long=$(printf 'l%.0s' $(seq 120))
echo hi >"$t/sp/$long"
tar --format=gnu -S -C "$t/sp" -cf seeds/tar_read/gnu-sparse.tar sp "$long"
for v in 0.0 0.1 1.0; do
  tar --format=pax -S --sparse-version=$v -C "$t/sp" -cf seeds/tar_read/pax-sparse-$v.tar sp "$long"
done

# multipart: the first byte picks read sizes, the rest is a form body with boundary "bnd".
mkdir -p seeds/multipart
printf '\x07--bnd\r\nContent-Disposition: form-data; name="other"\r\n\r\ny\r\n--bnd\r\nContent-Disposition: form-data; name="file"; filename="disk.img"\r\nContent-Type: application/octet-stream\r\n\r\nab\r\n--bn\r\n--bndx\r\n--bnd--\r\n' >seeds/multipart/curl
printf '\x99preamble\r\n--bnd \t\r\n\r\nno headers\r\n--bnd\r\nX-A: "b"\r\n\r\n\r\n--bnd--epilogue' >seeds/multipart/padding
printf '\x02--bnd\r\nContent-Disposition: form-data; name=file\r\n\r\ncut before the close' >seeds/multipart/truncated

# qcow2_edit: the qcow2 seeds (and one with bitmaps), each after a byte that picks the edits.
e=seeds/qcow2_edit
mkdir -p "$e"
qemu-img create -q -f qcow2 -o cluster_size=512 "$t/bm.qcow2" 64k
qemu-img bitmap --add -g 4k "$t/bm.qcow2" b0
io -c 'write -P 0x33 0 8k' "$t/bm.qcow2"
cp "$t/bm.qcow2" "$q/bitmaps-512.qcow2"
k=0
for f in "$q"/*.qcow2; do
  for pick in 31 9 6; do
    { printf "\\$(printf %03o $(( (pick + k) % 256 )))"; cat "$f"; } > "$e/$(basename "$f" .qcow2)-$pick"
  done
  k=$((k + 32))
done

# iso_write: trees as the target reads them (flags byte, then NUL-separated entries of an op
# byte, a path, 0x01 and a payload: even ops are files, odd ones links).
w=seeds/iso_write
mkdir -p "$w"
printf '\x01\x00user-data\x01#cloud-config\n\x00\x00meta-data\x01instance-id: x\n\x00\x01sub/link\x01../user-data' >"$w/cidata"
printf '\x0b\x40a/b/c/d/e/f/g/file\x010123456789abcdef\x00\x31long-link\x01%0300d/x/../y\x00\xfe%0250d\x01z' 0 0 >"$w/deep-long"
printf '\x02\x02dup\x01one\x00\x02dup\x01two\x00\x03dup/x\x01t\x00\x02./bad\x01x\x00\x02a/../b\x01x\x00\x07/abs\x01/etc//passwd/' >"$w/refusals"

ls -l seeds/*/ | awk '$5 > 65536 { print "seed too large: " $0; bad=1 } END { exit bad }'
