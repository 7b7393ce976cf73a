#!/usr/bin/env bash
# Object-storage servers for the importer's s3 and gcs tests (tests/sources.rs), on 127.0.0.1:
#   moto (S3, server mode, signatures checked: IAM auth is switched on once the test user
#   exists), a second moto without authentication (anonymous reads, which the first cannot
#   serve) and gcp-storage-emulator (in memory). Both come from PyPI into a venv,
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

stop() {
  [ -d "$PIDS" ] || return 0
  local f pid
  for f in "$PIDS"/*.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$f"
  done
}

install_venv() {
  if [ -x "$PY" ] && "$PY" -c 'import moto, boto3, gcp_storage_emulator, cryptography, flask' 2>/dev/null; then
    return 0
  fi
  command -v python3 >/dev/null || die "python3 is missing (apt-get install python3 python3-venv)"
  echo "pyservices: installing moto[server], gcp-storage-emulator and cryptography into $VENV" >&2
  python3 -m venv "$VENV" || die "cannot create the venv $VENV (apt-get install python3-venv)"
  "$VENV/bin/pip" install -q --disable-pip-version-check \
    'moto[server]>=5.1,<6' 'gcp-storage-emulator>=2024' 'cryptography>=42' \
    || die "pip install failed"
}

free_ports() {
  python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}

wait_for() {  # NAME URL
  local got=
  for _ in $(seq 150); do
    got=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$2" || true)
    [ "$got" = 200 ] && return 0
    sleep 0.1
  done
  die "$1 does not answer ($2: got HTTP '${got}'); logs in $S"
}

start() {
  stop
  trap 'rc=$?; [ $rc = 0 ] || { echo "pyservices: start failed, stopping" >&2; stop; }; exit $rc' EXIT
  install_venv
  mkdir -p "$PIDS"
  read -r P_S3 P_S3_OPEN P_GCS <<<"$(free_ports 3)"
  setsid "$VENV/bin/moto_server" -H 127.0.0.1 -p "$P_S3" >"$S/moto.log" 2>&1 </dev/null &
  echo $! >"$PIDS/moto.pid"
  setsid "$VENV/bin/moto_server" -H 127.0.0.1 -p "$P_S3_OPEN" >"$S/moto-open.log" 2>&1 </dev/null &
  echo $! >"$PIDS/moto-open.pid"
  setsid "$VENV/bin/gcp-storage-emulator" start --host=127.0.0.1 --port="$P_GCS" --in-memory \
    >"$S/gcs.log" 2>&1 </dev/null &
  echo $! >"$PIDS/gcs.pid"
  wait_for moto "http://127.0.0.1:$P_S3/moto-api/"
  wait_for moto-open "http://127.0.0.1:$P_S3_OPEN/moto-api/"
  wait_for gcp-storage-emulator "http://127.0.0.1:$P_GCS/"
  # An IAM user allowed s3:*, its keys, then authentication on: from here moto checks every
  # request's SigV4 signature against the keys it issued.
  "$PY" "$here/moto-setup.py" "http://127.0.0.1:$P_S3" >"$S/s3-keys" || die "moto setup failed"
  read -r KEY_ID SECRET <"$S/s3-keys"
  cat >"$S/env" <<EOF2
PYTHON=$PY
S3_URL=http://127.0.0.1:$P_S3
S3_ACCESS_KEY=$KEY_ID
S3_SECRET_KEY=$SECRET
S3_OPEN_URL=http://127.0.0.1:$P_S3_OPEN
GCS_URL=http://127.0.0.1:$P_GCS
EOF2
  echo "pyservices: up; environment in $S/env"
}

case $cmd in
  start) start ;;
  stop) stop; echo "pyservices: stopped" ;;
  *) die "unknown command '$cmd' (start|stop)" ;;
esac
