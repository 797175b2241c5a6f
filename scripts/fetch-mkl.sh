#!/usr/bin/env bash
# Fetches Intel MKL from PyPI (the mkl-static, mkl-include and intel-openmp wheels) into
# a cache folder and prints the MKLROOT to build `--features mkl` against. Idempotent.
#
# Only the static libraries that candle's MKL configuration (mkl-static-lp64-iomp) links
# are kept, and Intel OpenMP only as libiomp5.a, so the linker takes it statically too:
# the binary needs no MKL or OpenMP library at run time.
#
#   MKLROOT=$(scripts/fetch-mkl.sh) cargo build --release --features mkl
#
# Cache: $SPILLWAY_MKL_CACHE, default ~/.cache/spillway/mkl. Needs python3 with pip.
set -euo pipefail

version=2026.2.0
cache=${SPILLWAY_MKL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/spillway/mkl}
root="$cache/$version"
libs=(libmkl_intel_lp64.a libmkl_intel_thread.a libmkl_core.a libiomp5.a)

if [ -f "$root/.complete" ]; then
  echo "$root"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$work/wheels" \
  "mkl-static==$version" "mkl-include==$version" "intel-openmp==$version" >&2
for wheel in "$work"/wheels/*.whl; do
  python3 -m zipfile -e "$wheel" "$work/unpacked" >&2
done

staging="$root.partial"
rm -rf "$staging"
mkdir -p "$staging/lib"
for lib in "${libs[@]}"; do
  found=$(find "$work/unpacked" -name "$lib" -print -quit)
  [ -n "$found" ] || { echo "fetch-mkl: $lib is not in the wheels" >&2; exit 1; }
  cp "$found" "$staging/lib/"
done
cp -r "$(find "$work/unpacked" -type d -path '*/data/include' -print -quit)" "$staging/include"
touch "$staging/.complete"
rm -rf "$root"
mv "$staging" "$root"
echo "$root"
