#!/usr/bin/env bash
# Fill the services started by `scripts/services.sh start STATE_DIR` with test data:
# source disks in STATE_DIR/disks, containerDisks pushed to the registries, files in WWW.
# Appends DISK_QCOW2, DISK_RAW, DISK_ARM, DISK_BACKING, OCI_ARCHIVE to STATE_DIR/env.
# Usage: scripts/push-containerdisks.sh STATE_DIR
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
[ $# -eq 1 ] || { echo "usage: $0 STATE_DIR" >&2; exit 2; }
S=$(cd "$1" && pwd)
# shellcheck disable=SC1091
source "$S/env"
D=$S/disks
O=$S/oci
rm -rf "$D" "$O"
mkdir -p "$D" "$O"

# The 2 GiB xz bomb takes longest: make it in the background, collect it at the end.
(head -c 2G /dev/zero | xz -T0 -1 >"$WWW/bomb.raw.xz.part" && mv "$WWW/bomb.raw.xz.part" "$WWW/bomb.raw.xz") &
bomb=$!

# --- Source disks: patterned data at a few offsets, so a wrong byte shows in qemu-img compare.
qemu-img create -q -f qcow2 "$D/disk.qcow2" 64M
qemu-io -f qcow2 -c 'write -q -P 0xa5 0 1M' -c 'write -q -P 0x5a 5M 2M' \
  -c 'write -q -P 0x11 33M 512k' -c 'write -q -P 0xee 63M 1M' "$D/disk.qcow2" >/dev/null
qemu-img create -q -f raw "$D/disk.raw" 32M
qemu-io -f raw -c 'write -q -P 0x3c 0 1M' -c 'write -q -P 0xc3 17M 3M' "$D/disk.raw" >/dev/null
qemu-img create -q -f qcow2 "$D/arm.qcow2" 64M
qemu-io -f qcow2 -c 'write -q -P 0x64 0 2M' -c 'write -q -P 0x46 40M 1M' "$D/arm.qcow2" >/dev/null
# The other formats CDI accepts, made from the same qcow2: a streamOptimized VMDK (what OVA
# exports hold), dynamic VHD, VHDX, VDI.
qemu-img convert -q -O vmdk -o subformat=streamOptimized "$D/disk.qcow2" "$D/disk.vmdk"
qemu-img convert -q -O vpc -o subformat=dynamic "$D/disk.qcow2" "$D/disk.vhd"
qemu-img convert -q -O vhdx "$D/disk.qcow2" "$D/disk.vhdx"
qemu-img convert -q -O vdi "$D/disk.qcow2" "$D/disk.vdi"
# Hostile: a qcow2 whose backing file is a host path (-u: don't open it now).
qemu-img create -q -f qcow2 -u -b /etc/passwd -F raw "$D/backing.qcow2" 64M
echo "not a disk" >"$D/readme.txt"

# --- containerDisks (OCI layouts), then pushes in parallel.
mk() { python3 "$here/make-containerdisk.py" "$@"; }
mk --disk "$D/disk.qcow2" --out "$O/qcow2-gzip" --tag gzip --archive "$D/qcow2.oci.tar"
mk --disk "$D/disk.qcow2" --out "$O/qcow2-zstd" --tag zstd --compression zstd
mk --disk "$D/disk.raw" --out "$O/raw"
mk --disk "$D/disk.qcow2" --out "$O/multi" --also-arch "arm64:$D/arm.qcow2"
mk --disk "$D/disk.qcow2" --out "$O/labels" \
  --env INSTANCETYPE_KUBEVIRT_IO_DEFAULT_PREFERENCE=fedora --env PREFERENCE_KUBEVIRT_IO_X=y
mk --disk "$D/disk.qcow2" --out "$O/bootc" --label containers.bootc=1
mk --out "$O/nodisk" --extra-layer-file "etc/readme.txt:$D/readme.txt"
mk --disk "$D/backing.qcow2" --out "$O/backing"
mk --disk "$D/disk.vmdk" --out "$O/vmdk"

skopeo_copy() { skopeo --insecure-policy copy -q --all "$@" >/dev/null; }
pids=()
push() {  # LAYOUT_DIR:TAG DEST [skopeo options]
  local src=$1 dest=$2; shift 2
  skopeo_copy "$@" "oci:$O/$src" "docker://$dest" &
  pids+=($!)
}
push qcow2-gzip:gzip "$REGISTRY/disks/qcow2:gzip" --dest-tls-verify=false
push qcow2-zstd:zstd "$REGISTRY/disks/qcow2:zstd" --dest-tls-verify=false
push raw:latest "$REGISTRY/disks/raw:latest" --dest-tls-verify=false
push multi:latest "$REGISTRY/disks/multi:latest" --dest-tls-verify=false
push labels:latest "$REGISTRY/disks/labels:latest" --dest-tls-verify=false
push bootc:latest "$REGISTRY/disks/bootc:latest" --dest-tls-verify=false
push nodisk:latest "$REGISTRY/disks/nodisk:latest" --dest-tls-verify=false
push backing:latest "$REGISTRY/disks/backing:latest" --dest-tls-verify=false
push vmdk:latest "$REGISTRY/disks/vmdk:latest" --dest-tls-verify=false
# The TLS + basic-auth registry: verify its certificate with the test CA.
push qcow2-gzip:gzip "$REGISTRY_AUTH/disks/qcow2:gzip" --dest-creds user:pass --dest-cert-dir "$CERT_DIR"

# --- Files for the HTTP servers (nginx and flaky-http share WWW).
cp "$D/disk.qcow2" "$D/disk.raw" "$D/backing.qcow2" "$D/disk.vmdk" "$D/disk.vhd" \
  "$D/disk.vhdx" "$D/disk.vdi" "$WWW/"
gzip -c -1 "$D/disk.raw" >"$WWW/disk.raw.gz"
xz -c -T0 -1 "$D/disk.raw" >"$WWW/disk.raw.xz"
zstd -q -c "$D/disk.raw" >"$WWW/disk.raw.zst"
xz -c -T0 -1 "$D/disk.qcow2" >"$WWW/disk.qcow2.xz"
gzip -c -1 "$D/disk.vhdx" >"$WWW/disk.vhdx.gz"
for sub in auth drop slow; do  # hard links: same bytes, no extra space
  mkdir -p "$WWW/$sub"
  for f in disk.qcow2 disk.raw disk.raw.gz disk.raw.xz disk.raw.zst disk.qcow2.xz; do
    ln -f "$WWW/$f" "$WWW/$sub/$f"
  done
done
python3 - "$WWW" <<'EOF'
import io, sys, tarfile
def add(tar, name, data):
    info = tarfile.TarInfo(name); info.size = len(data); info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))
with tarfile.open(sys.argv[1] + "/escape.tar", "w") as t:  # path traversal attempt
    add(t, "../evil", b"escaped\n")
with tarfile.open(sys.argv[1] + "/archive.tar", "w") as t:
    add(t, "a.txt", b"first file\n")
    add(t, "b.txt", b"second file\n")
EOF

for p in "${pids[@]}"; do wait "$p" || { echo "push-containerdisks: a skopeo push failed" >&2; exit 1; }; done
wait "$bomb" || { echo "push-containerdisks: making bomb.raw.xz failed" >&2; exit 1; }

# Re-runs replace the previous entries.
sed -i '/^\(DISK_QCOW2\|DISK_RAW\|DISK_ARM\|DISK_BACKING\|OCI_ARCHIVE\)=/d' "$S/env"
cat >>"$S/env" <<EOF
DISK_QCOW2=$D/disk.qcow2
DISK_RAW=$D/disk.raw
DISK_ARM=$D/arm.qcow2
DISK_BACKING=$D/backing.qcow2
OCI_ARCHIVE=$D/qcow2.oci.tar
EOF
echo "push-containerdisks: done"
