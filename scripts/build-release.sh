#!/usr/bin/env bash
# Builds the release `spillway` binary the fast way: with Intel MKL (fetched from PyPI by
# scripts/fetch-mkl.sh and linked statically) for matmuls. Extra arguments go to cargo.
# SPILLWAY_NO_MKL=1 builds the portable default instead (pure-Rust gemm; about half as
# fast on large batches, see docs/cpu-performance.md).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${SPILLWAY_NO_MKL:-0}" = 1 ]; then
  exec cargo build --release --bin spillway "$@"
fi
MKLROOT=$(scripts/fetch-mkl.sh)
export MKLROOT
exec cargo build --release --bin spillway --features mkl "$@"
