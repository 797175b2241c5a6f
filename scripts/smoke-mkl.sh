#!/usr/bin/env bash
# Serves the real all-MiniLM-L6-v2 with the given spillway binary (CI passes the MKL build
# docker/build.sh staged) on spare loopback ports, embeds the reference sentences of
# ../shared/refs/minilm_dev_refs.json through /predictions, and fails unless every
# embedding's cosine to sentence-transformers' is at least 0.9999.
#
#   scripts/smoke-mkl.sh target/release/spillway
set -euo pipefail
binary=$(realpath "${1:?usage: smoke-mkl.sh SPILLWAY_BINARY}")
cd "$(dirname "$0")/.."
refs=$(realpath ../shared/refs/minilm_dev_refs.json)
model_dir=$(scripts/fetch-model.sh minilm)
work=$(mktemp -d)
trap 'kill "${server:-}" 2>/dev/null || true; rm -rf "$work"' EXIT
"$binary" archive --model-name minilm --version 1.0 --handler text_embedding \
  --model-dir "$model_dir" --export-path "$work" >/dev/null
port=$((20000 + RANDOM % 20000))
"$binary" serve --model-store "$work" --models all \
  --inference-address "127.0.0.1:$port" --management-address "127.0.0.1:$((port + 1))" \
  --metrics-address "127.0.0.1:$((port + 2))" >"$work/log" 2>&1 &
server=$!
for _ in $(seq 300); do
  curl -sf "127.0.0.1:$port/ping" >/dev/null && break
  sleep 0.1
done
python3 - "$port" "$refs" <<'PY' || { cat "$work/log" >&2; exit 1; }
import json, math, sys, urllib.request
port, refs = sys.argv[1], json.load(open(sys.argv[2]))
request = urllib.request.Request(
    f"http://127.0.0.1:{port}/predictions/minilm",
    data=json.dumps({"inputs": refs["sentences"]}).encode(),
    headers={"content-type": "application/json"})
got = json.load(urllib.request.urlopen(request, timeout=120))
def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
worst = min(cosine(g, w) for g, w in zip(got, refs["embeddings"]))
assert len(got) == len(refs["embeddings"]) and worst >= 0.9999, worst
print(f"smoke-mkl: {len(got)} MiniLM embeddings, smallest cosine to the references {worst:.6f}")
PY
