#!/usr/bin/env bash
# Test services for the importer's network tests, all on 127.0.0.1, no Docker needed:
#   nginx (HTTP + HTTPS with a test CA, /auth/ basic auth, /redirect/ 302), flaky-http.py,
#   docker-registry (plain), docker-registry (TLS + htpasswd), token-registry.py (token auth),
#   squid (forward proxy resolving disk.proxied.test to loopback).
# Usage: scripts/services.sh start STATE_DIR   (writes STATE_DIR/env, shell assignments)
#        scripts/services.sh stop STATE_DIR
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
[ $# -eq 2 ] || { echo "usage: $0 start|stop STATE_DIR" >&2; exit 2; }
cmd=$1
mkdir -p "$2"
S=$(cd "$2" && pwd)
PIDS=$S/pids

die() { echo "services: ERROR: $*" >&2; exit 1; }

# shellcheck source=pids.sh
source "$here/pids.sh"

install_deps() {
  local need=()
  [ -x /usr/sbin/nginx ] || need+=(nginx)
  [ -x /usr/bin/docker-registry ] || need+=(docker-registry)
  command -v skopeo >/dev/null || need+=(skopeo)
  command -v openssl >/dev/null || need+=(openssl)
  command -v python3 >/dev/null || need+=(python3)
  command -v zstd >/dev/null || need+=(zstd)
  command -v gzip >/dev/null || need+=(gzip)
  command -v xz >/dev/null || need+=(xz-utils)
  command -v curl >/dev/null || need+=(curl ca-certificates)
  command -v htpasswd >/dev/null || need+=(apache2-utils)  # bcrypt for docker-registry
  command -v qemu-img >/dev/null || need+=(qemu-utils)     # push-containerdisks.sh
  [ -x /usr/sbin/squid ] || need+=(squid)                  # the forward proxy
  [ ${#need[@]} -eq 0 ] && return 0
  echo "services: installing ${need[*]}" >&2
  local SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  # Keep the packages' own system services (nginx on :80, registry on :5000) from starting.
  local policy=/usr/sbin/policy-rc.d made_policy=
  if [ ! -e $policy ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee $policy >/dev/null
    $SUDO chmod 755 $policy
    made_policy=1
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${need[@]}" >/dev/null || { [ -z "$made_policy" ] || $SUDO rm -f $policy; die "apt-get install failed"; }
  [ -z "$made_policy" ] || $SUDO rm -f $policy
}

# N distinct free TCP ports on 127.0.0.1.
free_ports() {
  python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}

make_certs() {
  local d=$S/certs
  mkdir -p "$d/ca-only"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
    -subj /CN=vdisk-test-ca -keyout "$d/ca.key" -out "$d/ca.crt" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=localhost \
    -keyout "$d/server.key" -out "$d/server.csr" 2>/dev/null
  printf '%s\n' 'subjectAltName=DNS:localhost,DNS:disk.proxied.test,IP:127.0.0.1' 'basicConstraints=CA:FALSE' \
    'keyUsage=critical,digitalSignature' 'extendedKeyUsage=serverAuth' >"$d/server.ext"
  openssl x509 -req -in "$d/server.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -set_serial 0x$RANDOM$RANDOM \
    -days 30 -extfile "$d/server.ext" -out "$d/server.crt" 2>/dev/null
  # A directory with only the CA: what `skopeo --cert-dir` and CDI's /certs expect
  # (a *.key without a matching *.cert there is read as a broken client key pair).
  cp "$d/ca.crt" "$d/ca-only/ca.crt"
  chmod 644 "$d"/*.crt "$d"/*.key
}

start_nginx() {  # HTTP_PORT HTTPS_PORT
  local n=$S/nginx user=
  mkdir -p "$n/tmp" "$S/www/auth" "$S/www/drop" "$S/www/slow" "$S/put"
  printf 'user:%s\n' "$(openssl passwd -apr1 pass)" >"$n/htpasswd"
  # As root, run the workers as root too, so they can read a STATE_DIR under /root.
  [ "$(id -u)" != 0 ] || user="user root;"
  cat >"$n/nginx.conf" <<EOF
$user
daemon on;
worker_processes 2;
pid $n/nginx.pid;
error_log $n/error.log warn;
events { worker_connections 256; }
http {
  access_log $n/access.log;
  client_body_temp_path $n/tmp/body;
  proxy_temp_path $n/tmp/proxy;
  fastcgi_temp_path $n/tmp/fastcgi;
  uwsgi_temp_path $n/tmp/uwsgi;
  scgi_temp_path $n/tmp/scgi;
  default_type application/octet-stream;
  sendfile on;
  server {
    listen 127.0.0.1:$1;
    listen 127.0.0.1:$2 ssl;
    server_name localhost;
    ssl_certificate $S/certs/server.crt;
    ssl_certificate_key $S/certs/server.key;
    root $S/www;
    location /auth/ { auth_basic "test"; auth_basic_user_file $n/htpasswd; }
    location /redirect/ { rewrite ^/redirect/(.*)\$ /\$1 redirect; }
    # Paced downloads, so a test can watch the progress metric move.
    location /paced/ { alias $S/www/; limit_rate 12m; }
    # PUT target for timing a plain upload next to vdisk-uploader (scripts/bench-upload.sh).
    location /put/ { alias $S/put/; dav_methods PUT; client_max_body_size 0; create_full_put_path on; }
  }
}
EOF
  /usr/sbin/nginx -p "$n" -c "$n/nginx.conf" -e "$n/error.log" || die "nginx failed: $(tail -5 "$n/error.log")"
  for _ in $(seq 50); do [ -s "$n/nginx.pid" ] && break; sleep 0.1; done
  cp "$n/nginx.pid" "$PIDS/nginx.pid"
}

start_registry() {  # NAME PORT [tls+auth]
  local r=$S/registry-$1
  mkdir -p "$r/data"
  cat >"$r/config.yml" <<EOF
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage:
  filesystem: {rootdirectory: $r/data}
  delete: {enabled: true}
  maintenance: {uploadpurging: {enabled: false}}
http:
  addr: 127.0.0.1:$2
  secret: vdisk-test-secret
EOF
  if [ "${3:-}" = tls+auth ]; then
    htpasswd -Bbn user pass >"$r/htpasswd" 2>/dev/null
    cat >>"$r/config.yml" <<EOF
  tls: {certificate: $S/certs/server.crt, key: $S/certs/server.key}
auth:
  htpasswd: {realm: test-registry, path: $r/htpasswd}
EOF
  fi
  setsid /usr/bin/docker-registry serve "$r/config.yml" >"$r/log" 2>&1 </dev/null &
  echo $! >"$PIDS/registry-$1.pid"
}

# A real forward proxy (absolute-form GETs and CONNECT tunnels) that resolves
# disk.proxied.test to loopback from its own hosts file: a request for that name can only
# succeed through the proxy (the client cannot resolve it, and Go's rules never proxy
# loopback names). Its access log shows what went through it.
start_squid() {  # PORT
  local q=$S/squid
  mkdir -p "$q"
  # squid drops root for its 'proxy' user: it must reach its files (mktemp dirs are 0700).
  chmod 711 "$S"
  chmod 777 "$q"
  echo "127.0.0.1 disk.proxied.test" >"$q/hosts"
  cat >"$q/squid.conf" <<EOF
http_port 127.0.0.1:$1
pid_filename $q/squid.pid
cache_log $q/cache.log
access_log stdio:$q/access.log
cache deny all
cache_mem 8 MB
hosts_file $q/hosts
http_access allow all
coredump_dir $q
shutdown_lifetime 0 seconds
EOF
  setsid /usr/sbin/squid -N -f "$q/squid.conf" >"$q/out" 2>&1 </dev/null &
  echo $! >"$PIDS/squid.pid"
}

start_py() {  # NAME ARGS...
  local name=$1; shift
  setsid python3 "$here/$name.py" "$@" --pid-file "$PIDS/$name.pid" >"$S/$name.log" 2>&1 </dev/null &
  echo $! >"$PIDS/$name.pid"  # replaced by the script's own pid file; same pid
}

# wait_for NAME EXPECTED_STATUS CURL_ARGS... : poll until curl sees that HTTP status.
wait_for() {
  local name=$1 want=$2 got=; shift 2
  for _ in $(seq 100); do
    got=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$@" || true)
    [ "$got" = "$want" ] && return 0
    sleep 0.1
  done
  die "$name does not answer ($*: got HTTP '${got}', want $want); logs in $S"
}

start() {
  stop  # a previous run in the same STATE_DIR
  # On any failure, stop what was already started before exiting non-zero.
  trap 'rc=$?; [ $rc = 0 ] || { echo "services: start failed, stopping" >&2; stop; }; exit $rc' EXIT
  install_deps
  mkdir -p "$PIDS"
  make_certs
  read -r P_HTTP P_HTTPS P_FLAKY P_REG P_REG_AUTH P_TOKEN P_PROXY <<<"$(free_ports 7)"
  start_nginx "$P_HTTP" "$P_HTTPS"
  start_py flaky-http --root "$S/www" --port "$P_FLAKY"
  start_registry plain "$P_REG"
  start_registry auth "$P_REG_AUTH" tls+auth
  start_py token-registry --port "$P_TOKEN" --upstream "127.0.0.1:$P_REG"
  start_squid "$P_PROXY"
  cat >"$S/env" <<EOF
HTTP_URL=http://127.0.0.1:$P_HTTP
HTTPS_URL=https://localhost:$P_HTTPS
CA_CERT=$S/certs/ca.crt
CERT_DIR=$S/certs/ca-only
WWW=$S/www
FLAKY_URL=http://127.0.0.1:$P_FLAKY
REGISTRY=127.0.0.1:$P_REG
REGISTRY_AUTH=localhost:$P_REG_AUTH
REGISTRY_TOKEN=127.0.0.1:$P_TOKEN
REGISTRY_USER=user
REGISTRY_PASSWORD=pass
PROXY_URL=http://127.0.0.1:$P_PROXY
PROXY_LOG=$S/squid/access.log
PROXIED_HTTP=http://disk.proxied.test:$P_HTTP
PROXIED_HTTPS=https://disk.proxied.test:$P_HTTPS
EOF
  echo ok >"$S/www/ping"
  wait_for nginx-http 200 "http://127.0.0.1:$P_HTTP/ping"
  wait_for nginx-https 200 --cacert "$S/certs/ca.crt" "https://localhost:$P_HTTPS/ping"
  wait_for flaky-http 200 "http://127.0.0.1:$P_FLAKY/ping"
  wait_for registry 200 "http://127.0.0.1:$P_REG/v2/"
  wait_for registry-auth 401 --cacert "$S/certs/ca.crt" "https://localhost:$P_REG_AUTH/v2/"
  wait_for token-registry 401 "http://127.0.0.1:$P_TOKEN/v2/"
  wait_for squid 200 -x "http://127.0.0.1:$P_PROXY" "http://disk.proxied.test:$P_HTTP/ping"
  echo "services: up; environment in $S/env"
}

case $cmd in
  start) start ;;
  stop) stop; echo "services: stopped" ;;
  *) die "unknown command '$cmd' (start|stop)" ;;
esac
