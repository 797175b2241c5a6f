#!/usr/bin/env bash
# GPU checks and figures (issue 16), in two halves:
#
#   bench/gpu.sh pack   here, no GPU needed: builds the CUDA `spillway` binary and the handlers'
#                       test binary (scripts/build-cuda.sh), and puts them, stripped and
#                       xz-compressed, with the two models' config.json into .gpu/ (git-ignored;
#                       about 20 MB, inside the 64 MiB a device run may carry).
#   bench/gpu.sh run    on the GPU host, from the repository root with .gpu/ carried: runs the
#                       handlers' tests, the GPU layouts among them (in a CUDA build they run;
#                       on a host without a GPU they fail with the driver's reason), then
#                       bench/gpu.py: Spillway and PyTorch eager side by side. Writes
#                       tests.log and gpu.txt under $OUT (or the current folder).
#
# The host needs the NVIDIA driver (CUDA 13.0+), the CUDA 13 libraries (libcudart.so.13,
# libcublas.so.13, libcublasLt.so.13, libcurand.so.10), xz, and python3 with numpy; for the
# PyTorch side torch, transformers and accelerate. With the lent H200 (see the device tool):
#   run(command="bash bench/gpu.sh run", carry=[".gpu"], timeout_s=540)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"

pack() {
  local binary tests
  binary=$(scripts/build-cuda.sh | tail -1)
  tests=$(
    export CUDA_ENV_ONLY=1
    # shellcheck source=../scripts/build-cuda.sh
    source scripts/build-cuda.sh
    unset CUDA_ENV_ONLY
    cargo test --release --locked -p spillway-handlers --features cuda --no-run \
      --message-format=json 2>/dev/null |
      python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["lib"]:
        print(m["executable"])'
  )
  rm -rf .gpu
  mkdir -p .gpu
  strip -o .gpu/spillway "$binary"
  strip -o .gpu/handlers-tests "$tests"
  xz -T0 -6 .gpu/spillway .gpu/handlers-tests
  cp ../shared/refs/smollm2_config.json ../shared/refs/minilm_config.json .gpu/
  du -ch .gpu/* >&2
  echo "$repo/.gpu"
}

run() {
  local out=${OUT:-.} bin=/tmp/spillway-gpu
  mkdir -p "$bin"
  xz -dc .gpu/spillway.xz >"$bin/spillway"
  xz -dc .gpu/handlers-tests.xz >"$bin/handlers-tests"
  chmod +x "$bin/spillway" "$bin/handlers-tests"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  # The tests read nothing outside their temporary folders; all of them, GPU layouts included.
  "$bin/handlers-tests" --test-threads 8 2>&1 | tee "$out/tests.log" | grep -E "gpu|test result|FAILED|panicked" || true
  PYTHONUNBUFFERED=1 python3 bench/gpu.py --bin "$bin/spillway" --configs .gpu --runs "${RUNS:-5}" 2>&1 |
    tee "$out/gpu.txt"
}

case "${1:-}" in
  pack) pack ;;
  run) run ;;
  *) echo "usage: bench/gpu.sh pack|run" >&2; exit 2 ;;
esac
