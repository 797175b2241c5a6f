#!/usr/bin/env bash
# The nvcc that `scripts/build-cuda.sh --check` gives candle-kernels' build script. A check
# (cargo clippy) links nothing and never loads a kernel, so compiling candle's .cu files
# (about 4 minutes of CI, nearly all of the check's nvcc time) proves nothing about
# Spillway's code: this writes each output nvcc would write, empty, and forwards the
# queries (--version, --list-gpu-code) to the real nvcc in $SPILLWAY_REAL_NVCC. The build
# without --check (the GPU binary) runs the real nvcc on every kernel.
set -euo pipefail
real=${SPILLWAY_REAL_NVCC:?set SPILLWAY_REAL_NVCC to the real nvcc}

out_file=
out_dir=
mode=
sources=()
while (($#)); do
  case "$1" in
    --version | --list-gpu-code | --list-gpu-arch) exec "$real" "$@" ;;
    -o) out_file=$2; shift ;;
    --output-directory) out_dir=$2; shift ;;
    --ptx) mode=ptx ;;
    -c) mode=object ;;
    --lib) mode=lib ;;
    *.cu) sources+=("$1") ;;
  esac
  shift
done

case "$mode" in
  ptx) # one <stem>.ptx per source, in the output directory (cudaforge's layout)
    for src in "${sources[@]}"; do
      name=$(basename "$src" .cu)
      : >"${out_dir:-.}/$name.ptx"
    done
    ;;
  object) : >"${out_file:?-c needs -o}" ;;
  lib) printf '!<arch>\n' >"${out_file:?--lib needs -o}" ;; # an empty static archive
  *)
    echo "nvcc-for-check.sh: unexpected call: nvcc $*" >&2
    exit 1
    ;;
esac
