#!/usr/bin/env bash
# Runs one fuzz target for MINUTES minutes on one core, from its committed corpus
# (fuzz/corpus/TARGET), under libFuzzer's limits: 2 GiB of RSS, no single allocation
# over 512 MiB (an allocation sized from an unchecked count), 10 s per input.
# New coverage goes to a scratch corpus (not the committed one); crashes to
# fuzz/artifacts/TARGET. Then prints the figures: executions, coverage, crashes.
#   fuzz/run.sh TARGET MINUTES        e.g. fuzz/run.sh gguf 20
#   fuzz/run.sh --list                the targets
# Needs the nightly toolchain and cargo-fuzz (cargo install cargo-fuzz).
set -euo pipefail
cd "$(dirname "$0")"
if [[ "${1:-}" == "--list" ]]; then
    cargo +nightly fuzz list
    exit 0
fi
target=${1:?usage: fuzz/run.sh TARGET MINUTES}
minutes=${2:?usage: fuzz/run.sh TARGET MINUTES}
scratch=${FUZZ_SCRATCH:-/tmp/spillway-fuzz-corpus}/$target
mkdir -p "$scratch" "artifacts/$target"
log=${FUZZ_LOG:-/tmp/spillway-fuzz-$target.log}
set +e
# CPU time the fuzzer got (user + sys), not just the wall time it was given.
TIMEFORMAT="target $target: %U s user + %S s sys CPU in %R s"
time cargo +nightly fuzz run "$target" "$scratch" "corpus/$target" -- \
    -max_total_time=$(python3 -c "print(int(float($minutes) * 60))") -rss_limit_mb=2048 -malloc_limit_mb=512 -timeout=10 \
    -print_final_stats=1 -fork=1 -ignore_crashes=1 -ignore_ooms=1 -ignore_timeouts=1 > "$log" 2>&1
status=$?
grep -aE "^#[0-9]+ +DONE|ERROR|SUMMARY" "$log" | tail -n 6
set -e
echo "target $target: $(grep -c . <(ls "$scratch")) inputs in the scratch corpus; log $log"
grep -aE "stat::number_of_executed_units|stat::peak_rss_mb" "$log" || true
ls "artifacts/$target" | sed 's/^/crash: /' || true
exit "$status"
