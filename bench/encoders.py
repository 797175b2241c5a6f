#!/usr/bin/env python3
"""Spillway's text_embedding handler against ONNX Runtime, the CPU engine embedding users
pick (fastembed, Optimum), on all-MiniLM-L6-v2, in one invocation (issue 31).

  ONNX Runtime float32: MiniLM exported with torch.onnx (opset 17), all graph
    optimizations, 2 intra-op threads
  ONNX Runtime int8: the same graph through `quantize_dynamic` (int8 weights)
  Spillway float32 (and, with --dtype, a reduced precision): the release example
    `embed_timing` built with MKL, the handler's own `run` on a prepared batch

Each engine embeds the same sentence (embed_timing's) repeated at batch 1, 8 and 32,
mean-pooled and normalised as the model's sentence-transformers files say; rounds take
turns so the machine's drift reaches all alike, and the table gives medians and
Spillway ÷ ONNX Runtime ratios (below 1.0 Spillway is faster), and writes them to
BENCHMARKS.md's section "Encoders against ONNX Runtime" (unless --no-write). Quality: the cosine of
each engine's embeddings of ../shared/refs/minilm_dev_refs.json's sentences to the
references (sentence-transformers, float32).

ONNX Runtime, torch and transformers come from PyPI into a venv
($SPILLWAY_BENCH_VENV, default ~/.cache/spillway/bench-venv, shared with
bench/cpu-vs-torch.py); the ONNX files are written once under the model's cache folder.

Usage: bench/encoders.py [--rounds 3] [--threads 2] [--dtype bf16] [--skip-build]
"""
import argparse, json, os, re, statistics, subprocess, sys

from common import ROOT, sh, venv_python, write_section

BATCHES = [1, 8, 32]
SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank today."
REFS = os.path.join(ROOT, "..", "shared", "refs", "minilm_dev_refs.json")

# Run in the venv: export once, then time ONNX Runtime and score its cosines.
ORT_SCRIPT = r'''
import json, os, statistics, sys, time
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

folder, onnx_dir, threads, runs, refs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
batches = [int(b) for b in sys.argv[6].split(",")]
sentence = sys.argv[7]
f32, int8 = os.path.join(onnx_dir, "minilm.onnx"), os.path.join(onnx_dir, "minilm.int8.onnx")
if not os.path.exists(f32):
    import torch
    from transformers import AutoModel
    bert = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()

    class Encoder(torch.nn.Module):
        """The three inputs by name (transformers 5's forward takes others between them)."""
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids, use_cache=False).last_hidden_state

    ids = torch.ones((2, 8), dtype=torch.int64)
    os.makedirs(onnx_dir, exist_ok=True)
    torch.onnx.export(Encoder().eval(), (ids, torch.ones_like(ids), torch.zeros_like(ids)), f32 + ".tmp",
                      input_names=["input_ids", "attention_mask", "token_type_ids"],
                      output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                      dynamic_axes={n: {0: "batch", 1: "tokens"} for n in
                                    ["input_ids", "attention_mask", "token_type_ids", "last_hidden_state"]})
    os.replace(f32 + ".tmp", f32)
if not os.path.exists(int8):
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(f32, int8 + ".tmp", weight_type=QuantType.QInt8)
    os.replace(int8 + ".tmp", int8)

tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
tokenizer.no_padding()
tokenizer.no_truncation()

def feeds(texts):
    enc = tokenizer.encode_batch(texts)
    width = max(len(e.ids) for e in enc)
    ids = np.zeros((len(enc), width), np.int64)
    mask = np.zeros_like(ids)
    for i, e in enumerate(enc):
        ids[i, :len(e.ids)] = e.ids
        mask[i, :len(e.ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}

def embed(session, f):
    hidden = session.run(None, f)[0]
    mask = f["attention_mask"][..., None].astype(np.float32)
    pooled = (hidden * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
options.intra_op_num_threads = threads
options.inter_op_num_threads = 1
result = {"onnxruntime": ort.__version__, "ms": {}, "cosine": {}}
with open(refs) as fh:
    ref = json.load(fh)
for name, path in [("ort_f32", f32), ("ort_int8", int8)]:
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    result["ms"][name] = {}
    for batch in batches:
        f = feeds([sentence] * batch)
        for _ in range(3):
            embed(session, f)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            embed(session, f)
            times.append((time.perf_counter() - t) * 1e3)
        result["ms"][name][batch] = statistics.median(times)
    got = embed(session, feeds(ref["sentences"]))
    want = np.array(ref["embeddings"], np.float32)
    want = want / np.linalg.norm(want, axis=1, keepdims=True)
    result["cosine"][name] = float((got * want).sum(1).min())
print(json.dumps(result))
'''


def build(skip):
    env = dict(os.environ, MKLROOT=sh(["scripts/fetch-mkl.sh"]))
    if not skip:
        cmd = ["cargo", "build", "--release", "-p", "spillway-handlers", "--example",
               "embed_timing", "--features", "mkl"]
        print("building:", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=sys.stderr)
    return os.path.join(ROOT, "target/release/examples/embed_timing")


def spillway_round(binary, minilm, threads, dtype):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               SPILLWAY_EMBED_REFS=REFS)
    args = [binary, minilm] + [str(b) for b in BATCHES]
    if dtype:
        env["SPILLWAY_EMBED_DTYPE"] = dtype
    out = sh(args, env)
    ms = {int(b): float(t) for b, t in re.findall(r"batch\s+(\d+): median ([\d.]+) ms", out)}
    cosine = re.search(r"cosine ([\d.]+)", out)
    return ms, float(cosine.group(1)) if cosine else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=15, help="timed runs per batch and round")
    ap.add_argument("--dtype", help="also time Spillway in this dtype (bf16, f16)")
    ap.add_argument("--skip-build", action="store_true",
                    help="use target/release/examples/embed_timing as it is")
    ap.add_argument("--no-write", action="store_true",
                    help="print only; do not write BENCHMARKS.md's section")
    a = ap.parse_args()

    minilm = sh(["scripts/fetch-model.sh", "minilm"])
    onnx_dir = os.path.join(os.path.dirname(minilm), "onnx")
    py = venv_python(["torch", "transformers", "onnx", "onnxruntime", "onnxscript", "tokenizers"])
    binary = build(a.skip_build)
    engines = {"ort_f32": [], "ort_int8": [], "spillway_f32": []}
    if a.dtype:
        engines[f"spillway_{a.dtype}"] = []
    cosines = {}
    for r in range(a.rounds):
        print(f"round {r + 1}/{a.rounds}", file=sys.stderr)
        out = sh([py, "-c", ORT_SCRIPT, minilm, onnx_dir, str(a.threads), str(a.runs), REFS,
                  ",".join(map(str, BATCHES)), SENTENCE])
        ort = json.loads(out.splitlines()[-1])
        for name in ("ort_f32", "ort_int8"):
            engines[name].append({int(b): t for b, t in ort["ms"][name].items()})
            cosines[name] = ort["cosine"][name]
        for dtype in [None] + ([a.dtype] if a.dtype else []):
            ms, cosine = spillway_round(binary, minilm, a.threads, dtype)
            engines[f"spillway_{dtype or 'f32'}"].append(ms)
            if cosine is not None:
                cosines[f"spillway_{dtype or 'f32'}"] = cosine

    median = {name: {b: statistics.median(run[b] for run in runs) for b in BATCHES}
              for name, runs in engines.items()}
    cpu = sh(["bash", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"]).strip()
    amx = "amx_bf16" in open("/proc/cpuinfo").read()
    lines = [f"MiniLM (all-MiniLM-L6-v2), {a.threads} threads, medians of {a.rounds} rounds × "
             f"{a.runs} runs; {cpu}{', AMX' if amx else ', no AMX'}; onnxruntime {ort['onnxruntime']}.",
             "Command: `bench/encoders.py " + " ".join(sys.argv[1:]) + "` ("
             + sh(["date", "+%Y-%m-%d"]) + "). Cosine: the smallest over the reference "
             "sentences to sentence-transformers' float32 embeddings.", "",
             "| engine | " + " | ".join(f"batch {b} ms" for b in BATCHES) + " | min cosine to refs |",
             "|---|" + "---|" * (len(BATCHES) + 1)]
    for name, ms in median.items():
        cos = cosines.get(name)
        cos = "–" if cos is None else f"{cos:.4f}"
        lines.append(f"| {name} | " + " | ".join(f"{ms[b]:.2f}" for b in BATCHES) + f" | {cos} |")
    lines.append("")
    for ours in [n for n in median if n.startswith("spillway")]:
        for peer in ("ort_f32", "ort_int8"):
            ratios = ", ".join(f"batch {b} {median[ours][b] / median[peer][b]:.2f}×" for b in BATCHES)
            lines.append(f"- {ours} ÷ {peer}: {ratios}")
    table = "\n".join(lines)
    print("\n" + table)
    if not a.no_write:
        write_section("Encoders against ONNX Runtime", table)


if __name__ == "__main__":
    main()
