#!/usr/bin/env python3
"""Candle (as Spillway builds it) against PyTorch on this machine's CPU, same weights,
same inputs, interleaved rounds in one invocation, reported as medians and ratios.

  MiniLM (all-MiniLM-L6-v2) forward, one sentence repeated, batch 1 / 8 / 32
  SmolLM2-135M float32: 128-token prefill; greedy decode ms/token over 32 tokens

Candle runs the release examples `embed_timing` and `generate_timing` built with
`--features mkl` (and, with --portable, also without it); PyTorch runs
bench/torch_reference.py in a venv this script makes (torch + transformers from PyPI,
$SPILLWAY_BENCH_VENV, default ~/.cache/spillway/bench-venv). Both use 2 threads unless
--threads says otherwise. A ratio is candle ÷ torch time: below 1.0 candle is faster.

Usage: bench/cpu-vs-torch.py [--rounds 3] [--threads 2] [--portable]
"""
import argparse, json, os, re, statistics, subprocess, sys

from common import ROOT, sh, venv_python

BATCHES = [1, 8, 32]


def build(target_dir, mkl):
    env = dict(os.environ)
    cmd = ["cargo", "build", "--release", "-p", "spillway-handlers", "--examples",
           "--target-dir", target_dir]
    if mkl:
        env["MKLROOT"] = sh(["scripts/fetch-mkl.sh"])
        cmd += ["--features", "mkl"]
    print("building:", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=sys.stderr)
    return os.path.join(target_dir, "release/examples")


def candle_round(examples, minilm, gguf, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out = sh([os.path.join(examples, "embed_timing"), minilm] + [str(b) for b in BATCHES], env)
    ms = {int(b): float(t) for b, t in re.findall(r"batch\s+(\d+): median ([\d.]+) ms", out)}
    out = sh([os.path.join(examples, "generate_timing"), gguf, "3"], env)
    fields = dict(line.split(" ", 1) for line in out.splitlines())
    return ms, fields["folder"], float(fields["prefill_ms"]), float(fields["decode_ms_per_token"])


def torch_round(py, minilm, folder, threads):
    out = sh([py, "bench/torch_reference.py", "--threads", str(threads), "--minilm", minilm,
              "--smollm2", folder, "--runs", "15"])
    r = json.loads(out.splitlines()[-1])
    return ({int(b): t for b, t in r["minilm_ms"].items()}, r["smollm2"]["prefill_ms"],
            r["smollm2"]["decode_ms_per_token"], r["torch"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--portable", action="store_true",
                    help="also time candle without MKL (the default cargo build)")
    a = ap.parse_args()

    minilm = sh(["scripts/fetch-model.sh", "minilm"])
    gguf = os.path.join(sh(["scripts/fetch-model.sh", "smollm2"]), "SmolLM2-135M-Instruct.Q4_1.gguf")
    py = venv_python(["torch", "transformers"])
    variants = {"candle+mkl": build(os.path.join(ROOT, "target"), mkl=True)}
    if a.portable:
        variants["candle"] = build(os.path.join(ROOT, "target/portable"), mkl=False)

    rows = {}  # name -> list of per-round measurements (dict of metric -> value)
    torch_version = "?"
    folder = None
    for r in range(a.rounds):
        for name, examples in variants.items():
            ms, folder, prefill, decode = candle_round(examples, minilm, gguf, a.threads)
            rows.setdefault(name, []).append({**{f"minilm b{b}": ms[b] for b in BATCHES},
                                              "smollm2 prefill": prefill, "smollm2 decode": decode})
        ms, prefill, decode, torch_version = torch_round(py, minilm, folder, a.threads)
        rows.setdefault("torch", []).append({**{f"minilm b{b}": ms[b] for b in BATCHES},
                                             "smollm2 prefill": prefill, "smollm2 decode": decode})
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)

    metrics = [f"minilm b{b}" for b in BATCHES] + ["smollm2 prefill", "smollm2 decode"]
    units = {m: "ms" for m in metrics}
    units["smollm2 decode"] = "ms/token"
    med = {n: {m: statistics.median(x[m] for x in runs) for m in metrics} for n, runs in rows.items()}
    names = list(variants) + ["torch"]
    cpu = sh(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"]).strip()
    print(f"CPU: {cpu}, {a.threads} threads, torch {torch_version}, median of {a.rounds} rounds")
    header = "| " + " | ".join(["measure"] + names + [f"{n} ÷ torch" for n in variants]) + " |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for m in metrics:
        cells = [f"{m} ({units[m]})"] + [f"{med[n][m]:.2f}" for n in names]
        cells += [f"{med[n][m] / med['torch'][m]:.2f}" for n in variants]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
