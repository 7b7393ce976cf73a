#!/usr/bin/env bash
# The dedicated run of the differential fuzz target (file reader against stream reader on the
# same bytes): a few minutes instead of the 20 s the test command gives it.
#   scripts/fuzz-differential.sh [SECONDS]   (default 300)
set -euo pipefail
cd "$(dirname "$0")/.."
FUZZ_TARGETS=qcow2_differential FUZZ_SECONDS=${1:-300} FUZZ_RUNS=${FUZZ_RUNS:-1000000000} \
  exec scripts/fuzz-check.sh
