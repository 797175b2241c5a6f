#!/usr/bin/env python3
"""Spillway's image_classifier networks against PyTorch eager on the same weights, in one
invocation (issue 35): the architectures recognized beside DenseNet (bench/images.py
serves that one against TorchServe) at their real sizes, random weights.

  torchvision: mobilenet_v3_large, efficientnet_b0, resnet50 (state dicts saved as
    safetensors; Spillway recognizes them from the names and shapes)
  Hugging Face: ResNetForImageClassification (microsoft/resnet-50's config) and
    ConvNextForImageClassification (convnext-tiny's), saved with save_pretrained

Spillway: the release example `image_timing` built with MKL (the handler's own `run` on a
prepared batch: decoding and preprocessing excluded, as the server does them before
queueing). PyTorch: the same weights, eval, `inference_mode`, the same thread count.
Rounds take turns so the machine's drift reaches both alike; the table gives medians of
milliseconds an image at batch 1 and 4 and Spillway ÷ PyTorch (below 1.0 Spillway is
faster), and writes them to BENCHMARKS.md's section "Vision networks against PyTorch"
(unless --no-write).

torch, torchvision and transformers come from PyPI into the bench venv
($SPILLWAY_BENCH_VENV, default ~/.cache/spillway/bench-venv); the models are written once
under ~/.cache/spillway/vision-bench.

Usage: bench/vision.py [--rounds 3] [--threads 2] [--skip-build] [--no-write]
"""
import argparse, os, re, statistics, sys

from common import ROOT, sh, venv_python, write_section

MODELS = ["mobilenet_v3_large", "efficientnet_b0", "resnet50", "hf_resnet50", "hf_convnext_tiny"]
BATCHES = [1, 4]
IMAGE = os.path.join(ROOT, "handlers/tests/fixtures/images/inputs/scene.jpg")
FOLDER = os.path.join(os.path.expanduser("~"), ".cache/spillway/vision-bench")

# Run in the venv: write the models once; then time PyTorch on each.
TORCH_SCRIPT = r'''
import os, statistics, sys, time
import torch, torchvision, transformers
from safetensors.torch import load_file, save_file

folder, threads, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
models, batches = sys.argv[4].split(","), [int(b) for b in sys.argv[5].split(",")]
torch.set_num_threads(threads)
HF = {
    "hf_resnet50": (transformers.ResNetForImageClassification,
                    lambda: transformers.ResNetConfig(num_labels=1000)),
    "hf_convnext_tiny": (transformers.ConvNextForImageClassification,
                         lambda: transformers.ConvNextConfig(num_labels=1000)),
}

def load(name):
    path = os.path.join(folder, name)
    if name in HF:
        cls, config = HF[name]
        if not os.path.exists(os.path.join(path, "model.safetensors")):
            torch.manual_seed(0)
            cls(config()).save_pretrained(path)
            transformers.ConvNextImageProcessorPil(
                size={"shortest_edge": 224}, crop_pct=0.875).save_pretrained(path)
        return cls.from_pretrained(path, dtype=torch.float32).eval(), True
    model = torchvision.models.get_model(name).eval()
    weights = os.path.join(path, "model.safetensors")
    if not os.path.exists(weights):
        torch.manual_seed(0)
        os.makedirs(path, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights + ".tmp")
        os.replace(weights + ".tmp", weights)
    model.load_state_dict(load_file(weights))
    return model, False

for name in models:
    model, hf = load(name)
    for batch in batches:
        x = torch.randn(batch, 3, 224, 224)
        run = (lambda: model(pixel_values=x)) if hf else (lambda: model(x))
        with torch.inference_mode():
            for _ in range(2):
                run()
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                run()
                times.append((time.perf_counter() - t) * 1e3)
        print(f"{name} {batch} {statistics.median(times) / batch:.2f}")
'''


def build(skip):
    env = dict(os.environ, MKLROOT=sh(["scripts/fetch-mkl.sh"]))
    if not skip:
        cmd = ["cargo", "build", "--release", "-p", "spillway-handlers", "--features", "mkl",
               "--example", "image_timing"]
        print("building:", " ".join(cmd), file=sys.stderr)
        sh(cmd, env)
    return os.path.join(ROOT, "target/release/examples/image_timing"), env


def spillway(binary, env, name, threads):
    """{batch: ms an image} from image_timing's lines."""
    env = dict(env, OMP_NUM_THREADS=str(threads), RAYON_NUM_THREADS=str(threads))
    out = sh([binary, os.path.join(FOLDER, name), IMAGE, *map(str, BATCHES)], env)
    return {int(b): float(ms) for b, ms in
            re.findall(r"batch\s+(\d+): median [\d.]+ ms \(([\d.]+) ms an image\)", out)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7, help="PyTorch runs per batch and round")
    ap.add_argument("--skip-build", action="store_true", help="use the built image_timing")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
    a = ap.parse_args()
    py = venv_python(["torch", "torchvision", "transformers", "safetensors"])
    os.makedirs(FOLDER, exist_ok=True)
    binary, env = build(a.skip_build)
    ours = {(m, b): [] for m in MODELS for b in BATCHES}
    theirs = {(m, b): [] for m in MODELS for b in BATCHES}
    versions = sh([py, "-c", "import torch, torchvision, transformers; "
                   "print(torch.__version__, torchvision.__version__, transformers.__version__)"])
    for r in range(a.rounds):
        for name in MODELS:
            out = sh([py, "-c", TORCH_SCRIPT, FOLDER, str(a.threads), str(a.runs), name,
                      ",".join(map(str, BATCHES))])
            for line in out.splitlines():
                m, b, ms = line.split()
                theirs[(m, int(b))].append(float(ms))
            for b, ms in spillway(binary, env, name, a.threads).items():
                ours[(name, b)].append(ms)
        print(f"round {r + 1} of {a.rounds} done", file=sys.stderr)
    rows = ["| network | batch | Spillway ms an image | PyTorch eager ms an image | Spillway ÷ PyTorch |",
            "|---|---|---|---|---|"]
    for name in MODELS:
        for b in BATCHES:
            s, t = statistics.median(ours[(name, b)]), statistics.median(theirs[(name, b)])
            rows.append(f"| {name} | {b} | {s:.1f} | {t:.1f} | {s / t:.2f}× |")
    cpu = sh(["bash", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"]).strip()
    amx = "with AMX" if "amx_bf16" in open("/proc/cpuinfo").read() else "no AMX"
    body = ("`python3 bench/vision.py " + " ".join(sys.argv[1:]) + "` (" + sh(["date", "+%Y-%m-%d"])
            + f"; {cpu}, {amx}; {a.threads} threads each; torch, torchvision, transformers "
            + versions + "; medians of " + str(a.rounds) + " rounds, random weights, float32):\n\n"
            + "\n".join(rows) + "\n")
    print(body)
    if not a.no_write:
        write_section("Vision networks against PyTorch", body)


if __name__ == "__main__":
    main()
