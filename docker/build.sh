#!/usr/bin/env bash
# The image's build steps, in one place: each Dockerfile's build stage runs this script, and
# CI runs it on the bare machine (`docker/build.sh cpu OUT`), so a step that breaks fails CI
# even though no Docker engine is at hand there. It installs what the build needs, builds
# the binary and lays out the runtime files under OUT, as the image's root:
#   OUT/usr/local/bin/spillway, OUT/etc/spillway/config.properties
#
#   docker/build.sh cpu  OUT   # MKL build (scripts/build-release.sh), CPU image
#   docker/build.sh cuda OUT   # CUDA build (scripts/build-cuda.sh), CUDA image
#
# SPILLWAY_BUILD_PROFILE (default release) picks the cargo profile of the cpu build: CI
# passes `dev`, the profile its tests already built, to check the steps without a second
# whole-workspace release build.
set -euo pipefail
variant=${1:?usage: docker/build.sh cpu|cuda OUT}
out=${2:?usage: docker/build.sh cpu|cuda OUT}
cd "$(dirname "$0")/.."

# What the build needs beyond the Rust toolchain: pip (MKL's and CUDA's wheels come from
# PyPI) and a C++ compiler (nvcc's host compiler; MKL's build script).
missing=()
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
command -v g++ >/dev/null || missing+=(g++)
if ((${#missing[@]})); then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

case "$variant" in
  cpu)
    profile=${SPILLWAY_BUILD_PROFILE:-release}
    MKLROOT=$(scripts/fetch-mkl.sh)
    export MKLROOT
    targets=(--bin spillway)
    # The dev profile is CI's check, run after the tests: naming the server's example too
    # turns on its dev-dependencies' features, so cargo resolves the graph as the tests
    # did and reuses their build (a bin-only build rebuilt tokio, hyper, the handlers and
    # everything between them: 5 minutes of CI).
    [[ "$profile" == dev ]] && targets+=(--example loadgen)
    cargo build --locked --profile "$profile" -p spillway "${targets[@]}" --features mkl
    binary=target/$([[ "$profile" == dev ]] && echo debug || echo "$profile")/spillway
    ;;
  cuda)
    binary=$(scripts/build-cuda.sh | tail -n 1)
    ;;
  *)
    echo "unknown variant $variant (cpu or cuda)" >&2
    exit 2
    ;;
esac

install -D -m 755 "$binary" "$out/usr/local/bin/spillway"
install -D -m 644 docker/config.properties "$out/etc/spillway/config.properties"
# The staged binary runs.
"$out/usr/local/bin/spillway" --version
echo "$out"
