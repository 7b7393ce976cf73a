#!/usr/bin/env bash
# Build the fuzz targets (fuzz/, a separate cargo package) on the stable toolchain and run each
# one over its seed corpus plus up to 100000 mutated inputs (20 s at most per target). Fails on
# any crash, panic, timeout or out-of-memory. Under a minute once built (about 3 from cold).
#
# No nightly is needed: libfuzzer-sys builds libFuzzer with the system C++ compiler, and the
# coverage instrumentation libFuzzer steers by (SanitizerCoverage) is enabled through stable
# `-C passes`/`-C llvm-args` flags, as cargo-fuzz does minus the sanitizer. Set
# FUZZ_SECONDS (per target, default 20) and FUZZ_RUNS (default 100000) to fuzz longer.
# (-malloc_limit_mb only bites in sanitizer builds; -rss_limit_mb always does.)
#
# For long runs with AddressSanitizer, use cargo-fuzz (it needs RUSTC_BOOTSTRAP=1 on stable):
#   RUSTC_BOOTSTRAP=1 cargo fuzz run qcow2_read fuzz/corpus/qcow2_read fuzz/seeds/qcow2_read
set -euo pipefail
cd "$(dirname "$0")/.."

targets=(${FUZZ_TARGETS:-probe qcow2_read qcow2_differential forward_differential iso_info check stream_import tar_unpack tar_read multipart vhd_read vdi_read vhdx_read vmdk_read qcow2_edit iso_write})
seconds=${FUZZ_SECONDS:-20}
runs=${FUZZ_RUNS:-100000}
host=$(rustc -vV | sed -n 's/^host: //p')
# Build scripts and proc macros must not be instrumented: an explicit --target keeps RUSTFLAGS
# away from them. A separate target directory keeps cargo-fuzz's builds intact.
export CARGO_TARGET_DIR=fuzz/target/check
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"

echo "fuzz-check: building ${targets[*]} for $host"
# PIPESTATUS must be read right after the pipeline (an `|| true` would replace it): a failed
# build must never run the previous build's binaries and report them as passing.
set +e
cargo build --release --manifest-path fuzz/Cargo.toml --target "$host" 2>&1 |
  grep -v '^\s*Compiling'
built=${PIPESTATUS[0]}
set -e
[ "$built" = 0 ] || { echo "fuzz-check: build failed" >&2; exit 1; }
bin=$CARGO_TARGET_DIR/$host/release

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0
for t in "${targets[@]}"; do
  seeds=fuzz/seeds/$t
  [ -d "$seeds" ] && [ -n "$(ls -A "$seeds")" ] || { echo "fuzz-check: no seeds in $seeds" >&2; exit 1; }
  mkdir -p "$work/$t/corpus" "$work/$t/artifacts"
  echo "fuzz-check: $t: seeds, then up to $runs runs / ${seconds}s"
  # First corpus directory is scratch (libFuzzer writes new inputs there); seeds stay read-only.
  if ! "$bin/$t" -runs="$runs" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=1024 \
      -malloc_limit_mb=512 -max_len=65536 -print_final_stats=1 \
      -artifact_prefix="$work/$t/artifacts/" "$work/$t/corpus" "$seeds" >"$work/$t/log" 2>&1; then
    status=1
    echo "fuzz-check: $t FAILED; last lines of its log:" >&2
    tail -n 40 "$work/$t/log" >&2
    mkdir -p fuzz/artifacts/$t
    cp "$work/$t/artifacts/"* fuzz/artifacts/$t/ 2>/dev/null || true
    echo "fuzz-check: crashing inputs copied to fuzz/artifacts/$t/" >&2
    continue
  fi
  grep -E '^stat::number_of_executed_units|^stat::peak_rss_mb|^Done' "$work/$t/log" | tr '\n' ' '
  echo
done
[ "$status" = 0 ] && echo "fuzz-check: all targets passed"
exit "$status"
