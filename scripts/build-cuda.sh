#!/usr/bin/env bash
# Builds the release `spillway` binary with CUDA (cargo feature `cuda`) on a machine with no
# GPU, no CUDA install and only the package registries: the CUDA 13.0 toolkit pieces come
# from PyPI wheels (unzipped, never pip-installed), and a stub libcuda.so stands in for the
# driver at link time. Idempotent; the last line of output is the binary's path.
#
#   scripts/build-cuda.sh                 # -> target/cuda/release/spillway
#   scripts/build-cuda.sh --check         # cargo clippy --features cuda only (what CI runs):
#                                         # needs nvcc's version, not the libraries; candle's
#                                         # kernels are not compiled (nvcc-for-check.sh)
#   CUDA_ENV_ONLY=1 source scripts/build-cuda.sh   # set up, export the variables, build nothing
#
# What the binary needs on the GPU host: the NVIDIA driver (libcuda.so.1, CUDA 13.0 or newer:
# driver 580+) and the CUDA 13 libraries libcudart.so.13, libcublas.so.13, libcublasLt.so.13
# and libcurand.so.10 (a RUNPATH to /usr/local/cuda/lib64 is baked in; LD_LIBRARY_PATH
# overrides it). Without libcuda.so.1 the binary does not start (exit 127): candle links the
# driver library, it does not open it at run time. A host with the driver but no usable GPU
# starts and serves CPU plans. Kernels are built for CUDA_COMPUTE_CAP (default 90 = Hopper,
# H100/H200, compiled as sm_90a); other GPUs need a build with their own value.
#
# Pins: CUDA 13.0. nvcc must not be newer than the GPU host's driver: PTX from nvcc 13.1+ is
# refused by a 13.0 driver (CUDA_ERROR_UNSUPPORTED_PTX_VERSION).
#
# Not with MKL: the MKL build (52 MB) plus CUDA's kernels (about 40 MB) would pass the 64 MiB
# a binary may weigh to be carried to the lent GPU machines; CPU units of a CUDA build run on
# the portable gemm. Needs: python3 with pip, cc/g++, cargo. About 1.8 GB of disk
# (0.2 GB for --check) under $CUDA_TK_DIR.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

CUDA_TK_DIR="${CUDA_TK_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/spillway/cuda-13.0}"
CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
CUDA_RUNTIME_RPATH="${CUDA_RUNTIME_RPATH:-/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib}"
PYTHON="${PYTHON:-python3}"

mode=build
if [[ "${1:-}" == "--check" ]]; then
  mode=check
  shift
fi

# What compiling needs (nvcc, cicc, headers) and what linking adds (the libraries).
COMPILE_WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)
LINK_WHEELS=(
  nvidia-cuda-nvrtc==13.0.88
  nvidia-curand==10.4.0.35
  nvidia-cublas==13.0.2.14
)
ROOT="$CUDA_TK_DIR/nvidia/cu13"

# Unzips `wheels` into the toolkit tree once; a stamp per set says it is done.
unpack() {
  local set=$1
  shift
  local stamp
  stamp="$CUDA_TK_DIR/.ready-$set-$(printf '%s\n' "$@" | sha256sum | cut -c1-16)"
  [[ -f "$stamp" ]] && return 0
  local tool
  for tool in cc g++ "$PYTHON"; do # nvcc drives the host g++ for the .cu host code
    command -v "$tool" >/dev/null || {
      echo "build-cuda.sh: '$tool' not found (apt-get install build-essential python3-pip)" >&2
      return 1
    }
  done
  echo ">> CUDA 13.0 $set pieces from PyPI into $CUDA_TK_DIR" >&2
  mkdir -p "$CUDA_TK_DIR/wheels"
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --python-version 3.11 -d "$CUDA_TK_DIR/wheels" "$@" >&2
  local spec name ver whl
  for spec in "$@"; do
    name="${spec%%==*}"
    ver="${spec##*==}"
    whl=$(ls "$CUDA_TK_DIR/wheels/${name//-/_}-${ver}-"*.whl)
    "$PYTHON" -m zipfile -e "$whl" "$CUDA_TK_DIR" # nvidia/cu13/... (and the wheel's metadata)
    rm -f "$whl" # unpacked; the wheel is not needed again
  done
  chmod +x "$ROOT"/bin/* "$ROOT"/nvvm/bin/* 2>/dev/null || true
  ln -sfn lib "$ROOT/lib64" # cudaforge and cudarc look in lib64
  touch "$stamp"
}

# The unversioned names `-lcublas` looks for, and a stub libcuda.so (soname libcuda.so.1) with
# every cu* function of cuda.h, so the binary links here and binds to the real driver there.
# Every stub answers CUDA_ERROR_NO_DEVICE (100): a test run here behaves like a host whose
# driver sees no GPU. Never ship the stub.
link_names() {
  (cd "$ROOT/lib" &&
    for so in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
      ln -sfn "$so" "${so%%.so.*}.so"
    done)
  mkdir -p "$ROOT/lib/stubs"
  if [[ ! -f "$ROOT/lib/stubs/libcuda.so" ]]; then
    grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$ROOT/include/cuda.h" |
      sort -u | sed 's/.*/int &(void) { return 100; }/' >"$ROOT/lib/stubs/libcuda_stub.c"
    cc -shared -fPIC -o "$ROOT/lib/stubs/libcuda.so" -Wl,-soname,libcuda.so.1 \
      "$ROOT/lib/stubs/libcuda_stub.c"
    ln -sfn libcuda.so "$ROOT/lib/stubs/libcuda.so.1"
  fi
}

unpack compile "${COMPILE_WHEELS[@]}"
"$ROOT/bin/nvcc" --version | grep -q 'release 13.0' || {
  echo "build-cuda.sh: $ROOT/bin/nvcc is not CUDA 13.0" >&2
  exit 1
}
if [[ "$mode" == build ]]; then
  unpack link "${LINK_WHEELS[@]}"
  link_names
fi

export CUDA_HOME="$ROOT" # cudarc's link search and cudaforge's toolkit root
export NVCC="$ROOT/bin/nvcc"
if [[ "$mode" == check ]]; then
  # clippy links nothing: candle's kernels are not compiled (scripts/nvcc-for-check.sh).
  export SPILLWAY_REAL_NVCC="$NVCC"
  export NVCC="$repo/scripts/nvcc-for-check.sh"
fi
export PATH="$ROOT/bin:$PATH"
export CUDA_COMPUTE_CAP
export CUDARC_CUDA_VERSION=13000 # the driver API version cudarc binds (else `nvcc --version`)
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}" # parallel nvcc in candle-kernels
export LIBRARY_PATH="$ROOT/lib:$ROOT/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
if [[ "$mode" == build ]]; then
  # rpath-link: ld resolves libcublas -> libcublasLt here; rpath: where the GPU host keeps CUDA.
  # (RUSTFLAGS replaces build.rustflags of .cargo/config.toml; this repository sets none.)
  export RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C link-arg=-Wl,-rpath-link,$ROOT/lib -C link-arg=-Wl,-rpath,$CUDA_RUNTIME_RPATH"
  # A separate target folder: the CPU build's artifacts stay as they are.
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target/cuda}"
fi
# --check links nothing and keeps the default target folder and flags, so it reuses what
# `cargo clippy` of the CPU build checked (every crate the cuda feature does not change).

if [[ -n "${CUDA_ENV_ONLY:-}" ]]; then
  return 0 2>/dev/null || exit 0
fi

cd "$repo"
if [[ "$mode" == check ]]; then
  cargo clippy --workspace --all-targets --locked --features spillway/cuda "$@" -- -D warnings
  exit 0
fi
cargo build --release --locked --bin spillway --features spillway/cuda "$@" >&2
echo "$CARGO_TARGET_DIR/release/spillway"
