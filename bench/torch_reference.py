#!/usr/bin/env python3
"""PyTorch's side of bench/cpu-vs-torch.py: the same measurements as the candle examples
`embed_timing` and `generate_timing`, on the same weights, printed as one JSON object.

Usage (inside a venv with torch + transformers):
  torch_reference.py --threads 2 --minilm DIR --smollm2 DIR --runs 15 --batches 1 8 32
"""
import argparse, json, statistics, time

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank today."
PROMPT = "The history of the river valley is long and full of change. " * 12


def median_ms(fn, runs, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def minilm(folder, batches, runs):
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    out = {}
    for b in batches:
        enc = tok([SENTENCE] * b, return_tensors="pt", padding=True)
        out[str(b)] = median_ms(lambda: model(**enc), runs)
    return out


def smollm2(folder, runs, prompt_tokens=128, new_tokens=32):
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids[:, :prompt_tokens]
    assert ids.shape[1] == prompt_tokens, ids.shape

    def prefill():
        return model(ids, use_cache=True)

    def decode():
        out = prefill()
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for _ in range(new_tokens):
            out = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return (time.perf_counter() - t) * 1e3 / new_tokens

    prefill_ms = median_ms(prefill, runs)
    decode()
    per_token = statistics.median(decode() for _ in range(runs))
    return {"prefill_ms": prefill_ms, "decode_ms_per_token": per_token,
            "decode_tokens_per_s": 1e3 / per_token}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--minilm")
    ap.add_argument("--smollm2")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    result = {"torch": torch.__version__}
    with torch.inference_mode():
        if a.minilm:
            result["minilm_ms"] = minilm(a.minilm, a.batches, a.runs)
        if a.smollm2:
            result["smollm2"] = smollm2(a.smollm2, max(3, a.runs // 3))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
