#!/usr/bin/env bash
# Object-storage servers for the importer's s3 and gcs tests (tests/sources.rs), on 127.0.0.1:
#   moto (S3, server mode, signatures checked: IAM auth is switched on once the test user
#   exists), the same over HTTPS with a test CA, a moto without authentication (anonymous
#   reads, which the others cannot serve) and gcp-storage-emulator (in memory). Both come from PyPI into a venv,
#   $VDISK_VENV or ~/.cache/vdisk-venv, made here when missing.
# Usage: scripts/pyservices.sh start STATE_DIR   (writes STATE_DIR/env, shell assignments)
#        scripts/pyservices.sh stop STATE_DIR
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
[ $# -eq 2 ] || { echo "usage: $0 start|stop STATE_DIR" >&2; exit 2; }
cmd=$1
mkdir -p "$2"
S=$(cd "$2" && pwd)
PIDS=$S/pids
VENV=${VDISK_VENV:-$HOME/.cache/vdisk-venv}
PY=$VENV/bin/python

die() { echo "pyservices: ERROR: $*" >&2; exit 1; }

# shellcheck source=pids.sh
source "$here/pids.sh"

install_tools() {  # with apt, when missing: python3 and its venv module, curl, openssl
  local need=()
  command -v python3 >/dev/null || need+=(python3)
  python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
  command -v curl >/dev/null || need+=(curl ca-certificates)
  command -v openssl >/dev/null || need+=(openssl)
  [ ${#need[@]} -eq 0 ] && return 0
  echo "pyservices: installing ${need[*]}" >&2
  local SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${need[@]}" >/dev/null || die "apt-get install ${need[*]} failed"
}

install_venv() {
  install_tools
  if [ -x "$PY" ] && "$PY" -c 'import moto, boto3, gcp_storage_emulator, cryptography, flask' 2>/dev/null; then
    return 0
  fi
  echo "pyservices: installing moto[server], gcp-storage-emulator and cryptography into $VENV" >&2
  python3 -m venv "$VENV" || die "cannot create the venv $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check \
    'moto[server]>=5.1,<6' 'gcp-storage-emulator>=2024' 'cryptography>=42' \
    || die "pip install failed"
}

make_certs() {
  local d=$S/certs
  mkdir -p "$d"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
    -subj /CN=vdisk-s3-test-ca -keyout "$d/ca.key" -out "$d/ca.crt" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=localhost \
    -keyout "$d/server.key" -out "$d/server.csr" 2>/dev/null
  printf '%s\n' 'subjectAltName=DNS:localhost,IP:127.0.0.1' 'basicConstraints=CA:FALSE' \
    'keyUsage=critical,digitalSignature' 'extendedKeyUsage=serverAuth' >"$d/server.ext"
  openssl x509 -req -in "$d/server.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" \
    -set_serial 0x$RANDOM$RANDOM -days 30 -extfile "$d/server.ext" -out "$d/server.crt" 2>/dev/null
}

free_ports() {
  python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}

wait_for() {  # NAME URL [CURL_ARGS...]
  local name=$1 url=$2 got=
  shift 2
  for _ in $(seq 150); do
    got=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$@" "$url" || true)
    [ "$got" = 200 ] && return 0
    sleep 0.1
  done
  die "$name does not answer ($url: got HTTP '${got}'); logs in $S"
}

start() {
  stop
  trap 'rc=$?; [ $rc = 0 ] || { echo "pyservices: start failed, stopping" >&2; stop; }; exit $rc' EXIT
  install_venv
  mkdir -p "$PIDS"
  make_certs
  read -r P_S3 P_S3_TLS P_S3_OPEN P_GCS <<<"$(free_ports 4)"
  setsid "$VENV/bin/moto_server" -H 127.0.0.1 -p "$P_S3" >"$S/moto.log" 2>&1 </dev/null &
  echo $! >"$PIDS/moto.pid"
  setsid "$VENV/bin/moto_server" -H 127.0.0.1 -p "$P_S3_TLS" \
    -c "$S/certs/server.crt" -k "$S/certs/server.key" >"$S/moto-tls.log" 2>&1 </dev/null &
  echo $! >"$PIDS/moto-tls.pid"
  setsid "$VENV/bin/moto_server" -H 127.0.0.1 -p "$P_S3_OPEN" >"$S/moto-open.log" 2>&1 </dev/null &
  echo $! >"$PIDS/moto-open.pid"
  setsid "$VENV/bin/gcp-storage-emulator" start --host=127.0.0.1 --port="$P_GCS" --in-memory \
    >"$S/gcs.log" 2>&1 </dev/null &
  echo $! >"$PIDS/gcs.pid"
  wait_for moto "http://127.0.0.1:$P_S3/moto-api/"
  wait_for moto-tls "https://127.0.0.1:$P_S3_TLS/moto-api/" --cacert "$S/certs/ca.crt"
  wait_for moto-open "http://127.0.0.1:$P_S3_OPEN/moto-api/"
  wait_for gcp-storage-emulator "http://127.0.0.1:$P_GCS/"
  # An IAM user allowed s3:*, its keys, then authentication on: from here moto checks every
  # request's SigV4 signature against the keys it issued.
  "$PY" "$here/moto-setup.py" "http://127.0.0.1:$P_S3" >"$S/s3-keys" || die "moto setup failed"
  read -r KEY_ID SECRET <"$S/s3-keys"
  AWS_CA_BUNDLE=$S/certs/ca.crt "$PY" "$here/moto-setup.py" "https://127.0.0.1:$P_S3_TLS" \
    >"$S/s3-tls-keys" || die "moto (TLS) setup failed"
  read -r TLS_KEY_ID TLS_SECRET <"$S/s3-tls-keys"
  cat >"$S/env" <<EOF2
PYTHON=$PY
S3_URL=http://127.0.0.1:$P_S3
S3_ACCESS_KEY=$KEY_ID
S3_SECRET_KEY=$SECRET
S3_OPEN_URL=http://127.0.0.1:$P_S3_OPEN
S3_TLS_URL=https://127.0.0.1:$P_S3_TLS
S3_TLS_ACCESS_KEY=$TLS_KEY_ID
S3_TLS_SECRET_KEY=$TLS_SECRET
S3_CA_CERT=$S/certs/ca.crt
GCS_URL=http://127.0.0.1:$P_GCS
EOF2
  echo "pyservices: up; environment in $S/env"
}

case $cmd in
  start) start ;;
  stop) stop; echo "pyservices: stopped" ;;
  *) die "unknown command '$cmd' (start|stop)" ;;
esac
