#!/usr/bin/env bash
# Times vdisk-importer (HTTP import) against a plain `curl` download of the same file, and
# vdisk-uploader (HTTPS upload with vdisk upload / curl) against a plain `curl` PUT of the same
# file to nginx, on loopback, with peak RSS. Usage: scripts/bench-network.sh FILE... (e.g. the
# corpus of ../shared/bench: raw.img img.qcow2 raw.img.xz).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: $0 FILE..." >&2; exit 2; }
cargo build -q --release --bin vdisk-importer --bin vdisk-uploader --bin vdisk
bin=$PWD/target/release
S=$(mktemp -d /tmp/vdisk-bench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; bash scripts/services.sh stop "$S/svc" >/dev/null 2>&1 || true; rm -rf "$S"' EXIT
bash scripts/services.sh start "$S/svc" >/dev/null
# shellcheck disable=SC1091
source "$S/svc/env"
T=/usr/bin/time
row() { printf '%-14s %-34s %8s s %8s MiB\n' "$1" "$2" "$3" "$4"; }
timed() { # timed LABEL FILE CMD...: runs CMD, prints wall time and peak RSS
  local label=$1 file=$2; shift 2
  $T -f '%e %M' -o "$S/t" "$@" >/dev/null 2>"$S/err" || { cat "$S/err" >&2; echo "failed: $label" >&2; exit 1; }
  read -r secs kib <"$S/t"
  row "$(basename "$file")" "$label" "$secs" "$((kib / 1024))"
}
for f in "$@"; do
  f=$(readlink -f "$f")
  ln -sf "$f" "$WWW/$(basename "$f")"
  url=$HTTP_URL/$(basename "$f")
  timed "curl download to a file" "$f" curl -sf -o "$S/curl.out" "$url"
  rm -f "$S/curl.out"
  rm -rf "$S/pod" && mkdir -p "$S/pod/data" "$S/pod/dev"
  timed "vdisk-importer http" "$f" env -i PATH="$PATH" VDISK_ROOT="$S/pod" VDISK_METRICS_PORT=0 \
    IMPORTER_SOURCE=http IMPORTER_ENDPOINT="$url" IMPORTER_CONTENTTYPE=kubevirt OWNER_UID=bench \
    FILESYSTEM_OVERHEAD=0 PREALLOCATION=false "$bin/vdisk-importer"
  timed "curl PUT to nginx (https)" "$f" curl -sf --cacert "$CA_CERT" -T "$f" "$HTTPS_URL/put/x"
  rm -f "$S/svc/put/x"
  rm -rf "$S/pod" && mkdir -p "$S/pod/data" "$S/pod/dev" "$S/pod/etc/tls"
  # The upload server uses the services' test certificate (localhost, 127.0.0.1).
  cp "$S/svc/certs/server.crt" "$S/pod/etc/tls/tls.crt"
  cp "$S/svc/certs/server.key" "$S/pod/etc/tls/tls.key"
  env -i PATH="$PATH" VDISK_ROOT="$S/pod" LISTEN_ADDRESS=127.0.0.1 LISTEN_PORT=18555 \
    TLS_CERT_FILE=/etc/tls/tls.crt TLS_KEY_FILE=/etc/tls/tls.key \
    $T -f '%M' -o "$S/srv" "$bin/vdisk-uploader" 2>"$S/srv.log" &
  for _ in $(seq 50); do curl -sk https://127.0.0.1:18555/healthz >/dev/null 2>&1 && break; sleep 0.1; done
  timed "vdisk upload -> vdisk-uploader" "$f" "$bin/vdisk" upload https://127.0.0.1:18555 "$f" --ca "$CA_CERT"
  wait
  row "" "  (vdisk-uploader peak RSS)" "" "$(($(cat "$S/srv") / 1024))"
done
rm -rf "$S/pod"
