#!/usr/bin/env bash
# Measures what the foundation issue asks for, on the real all-MiniLM-L6-v2:
#   - cold start: process start to the first 200 from /ping (the model loaded), N runs
#   - idle RSS of the server process after warm-up (VmRSS from /proc)
#   - single-request latency: sequential POSTs of one sentence, client-side (curl)
# Prints medians. Usage: bench/serve-basics.sh [runs=5] [requests=200]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
requests=${2:-200}

model_dir=$(scripts/fetch-model.sh minilm)
scripts/build-release.sh >&2
bin=./target/release/spillway
work=$(mktemp -d)
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir -p "$work/store"
$bin archive --model-name all-MiniLM-L6-v2 --handler text_embedding --model-dir "$model_dir" \
  --export-path "$work/store" >/dev/null
port=18080
args=(serve --model-store "$work/store" --cache-dir "$work/cache"
      --inference-address 127.0.0.1:$port --management-address 127.0.0.1:18081
      --metrics-address 127.0.0.1:18082)

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

starts=()
for _ in $(seq "$runs"); do
  t0=$(date +%s%N)
  RUST_LOG=warn $bin "${args[@]}" & pid=$!
  until [ "$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$port/ping)" = 200 ]; do sleep 0.005; done
  t1=$(date +%s%N)
  starts+=($(( (t1 - t0) / 1000000 )))
  kill -TERM $pid; wait $pid || true
done
echo "cold start to healthy /ping (ms, $runs runs): ${starts[*]} -> median $(printf '%s\n' "${starts[@]}" | median)"

RUST_LOG=warn $bin "${args[@]}" & pid=$!
until [ "$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$port/ping)" = 200 ]; do sleep 0.01; done
body='{"inputs": "The quick brown fox jumps over the lazy dog near the river bank today."}'
for _ in $(seq 20); do curl -s -o /dev/null -d "$body" http://127.0.0.1:$port/predictions/all-MiniLM-L6-v2; done
sleep 1
echo "idle RSS after warm-up: $(awk '/VmRSS/ {print $2/1024 " MiB"}' /proc/$pid/status)"
for _ in $(seq "$requests"); do
  curl -s -o /dev/null -w '%{time_total}\n' -d "$body" http://127.0.0.1:$port/predictions/all-MiniLM-L6-v2
done | awk '{print $1*1000}' > "$work/lat"
echo "single-request latency (ms, $requests sequential requests, curl): median $(median < "$work/lat"), p90 $(sort -n "$work/lat" | awk '{a[NR]=$1} END {print a[int(NR*0.9)]}')"
