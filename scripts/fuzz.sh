#!/usr/bin/env bash
# The mutation fuzzer of crates/gemma4/tests/fuzz.rs at length: N cases (default 20000)
# from seed S (default 1), each in a child process with 4 GiB of address space; prints
# the outcome counts by kind and the cases that failed (rerun one with
# GEMMA4_FUZZ_CASE=kind:seed and the test binary's `fuzz_child`).
#
#   scripts/fuzz.sh [N] [S]
set -euo pipefail
cd "$(dirname "$0")/.."
GEMMA4_FUZZ_RUNS="${1:-20000}" GEMMA4_FUZZ_SEED="${2:-1}" \
  cargo test --release --locked -p gemma4 --test fuzz fuzz_briefly -- --nocapture
