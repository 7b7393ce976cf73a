#!/usr/bin/env bash
# The one test command (README, CI): installs what the tests need, then runs formatting,
# lints (clippy --all-targets also compiles the benches), every test (unit, qemu-img oracle,
# malformed images, CLI, importer and uploader against loopback servers, the drop-ins' container
# images under podman, C API) and builds
# and runs the fuzz targets.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
export CARGO_TERM_COLOR=never
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings
echo "== loopback services for the importer tests (nginx, registries, containerDisks)"
svc=$(mktemp -d /tmp/vdisk-svc.XXXXXX)
pysvc=$(mktemp -d /tmp/vdisk-pysvc.XXXXXX)
trap 'bash scripts/services.sh stop "$svc" >/dev/null 2>&1 || true; bash scripts/pyservices.sh stop "$pysvc" >/dev/null 2>&1 || true; rm -rf "$svc" "$pysvc"' EXIT
bash scripts/services.sh start "$svc"
bash scripts/push-containerdisks.sh "$svc"
export VDISK_SERVICES=$svc
echo "== object storage for the s3/gcs importer tests (moto, gcp-storage-emulator)"
bash scripts/pyservices.sh start "$pysvc"
export VDISK_PYSERVICES=$pysvc
echo "== container images (podman: debootstrap base, importer, uploader)"
bash scripts/build-images.sh
echo "== cargo test"
cargo test
echo "== C API tests (ASan, UBSan)"
bash scripts/c-test.sh
echo "== fuzz targets (build and replay seeds)"
bash scripts/fuzz-check.sh
echo "== all checks passed"
