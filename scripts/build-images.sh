#!/usr/bin/env bash
# Build the CDI drop-in images with podman, offline:
#   localhost/vdisk-base:bookworm      Debian minbase rootfs (debootstrap from this machine's
#                                      configured archive), made once and kept
#   localhost/vdisk-importer:latest    Containerfile target importer
#   localhost/vdisk-uploader:latest    Containerfile target uploader
# The binaries are built statically (glibc, crt-static) in one release build: the node-pull
# server must run inside containerDisk images that have no libc, and the others run on the base.
# Usage: scripts/build-images.sh [--rebuild-base]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
export CONTAINERS_CONF=${CONTAINERS_CONF:-$here/containers.conf}
BASE=localhost/vdisk-base:bookworm
TARGET=x86_64-unknown-linux-gnu
BINS=(vdisk-importer vdisk-uploader cdi-containerimage-server cdi-image-size-detection cdi-source-update-poller)

need=()
for c in podman buildah runc debootstrap; do command -v $c >/dev/null || need+=($c); done
if [ ${#need[@]} -gt 0 ]; then
  echo "build-images: installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
fi

# The machine's Debian archive: deb822 'URIs:' or a one-line 'deb URI suite'.
mirror() {
  local u
  u=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -1)
  [ -n "$u" ] || u=$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}' | grep -v security | head -1)
  echo "${u:-http://deb.debian.org/debian}"
}

if [ "${1:-}" = --rebuild-base ]; then podman rmi -f "$BASE" >/dev/null 2>&1 || true; fi
if ! podman image exists "$BASE"; then
  suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
  rootfs=$(mktemp -d /var/tmp/vdisk-base.XXXXXX)
  trap 'rm -rf "$rootfs"' EXIT
  echo "build-images: debootstrap $suite from $(mirror)"
  t0=$SECONDS
  debootstrap --variant=minbase --include=ca-certificates "$suite" "$rootfs" "$(mirror)" >/dev/null
  rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/locale/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/var/log/*
  tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/sh"]' - "$BASE" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
  echo "build-images: base made in $((SECONDS - t0)) s"
fi

t0=$SECONDS
args=()
for b in "${BINS[@]}"; do args+=(--bin "$b"); done
(cd "$root" && RUSTFLAGS="-C target-feature=+crt-static" cargo build -q --release --locked --target $TARGET "${args[@]}")
echo "build-images: static binaries built in $((SECONDS - t0)) s"

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir "$ctx/bin"
for b in "${BINS[@]}"; do
  f=$root/target/$TARGET/release/$b
  if readelf -d "$f" | grep -q NEEDED; then echo "build-images: $b is not static" >&2; exit 1; fi
  strip -o "$ctx/bin/$b" "$f"
done
cp "$root/Containerfile" "$ctx/"
t0=$SECONDS
for t in importer uploader; do
  podman build -q --build-arg BASE="$BASE" --target $t -t localhost/vdisk-$t:latest -f "$ctx/Containerfile" "$ctx" >/dev/null
done
echo "build-images: images built in $((SECONDS - t0)) s"
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E 'localhost/vdisk-(base|importer|uploader)'
