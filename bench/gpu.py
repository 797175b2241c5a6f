#!/usr/bin/env python3
"""GPU figures of issue 16, Spillway and PyTorch eager side by side in one run.

Runs on the GPU host (bench/gpu.sh run calls it) with the CUDA build of `spillway`. No
network there, so the models are random weights of the real shapes, written here with
numpy (speed depends on shapes, not values): SmolLM2-135M (Llama, 30 blocks) and
all-MiniLM-L6-v2 (BERT, 6 layers), from their config.json (../shared/refs/, copied into
.gpu/ by `bench/gpu.sh pack`). `eos_token_id` is null so every run decodes all its tokens.

Measured, medians of --runs:
  - SmolLM2 decode tok/s, 64 new tokens after a 128-token prompt ((t(65) - t(1)) / 64):
    all on the GPU in bf16 and f32; half the blocks on the CPU (f32); half on disk
    (f32 and bf16), disk units streamed to the GPU through the pinned staging buffers;
  - MiniLM sentences/s at batch 64 (one /v1/embeddings request of 64 sentences), f32;
  - the staging path's GB/s: bytes streamed / time spent materialising disk units, from the
    server's own counters (spillway_streamed_bytes_total, ..._materialize_microseconds_total);
and PyTorch eager on the same weights (transformers; accelerate's device_map for the
half layouts) unless --no-peer.

Usage: bench/gpu.py --bin .gpu/spillway --configs .gpu [--runs 5] [--no-peer] [--device cpu]
(--device cpu: a dry run of the Spillway side on a machine without a GPU, every unit on CPU.)
"""
import argparse, json, os, re, shutil, statistics, struct, subprocess, sys, tempfile, time

import numpy as np

from common import Server

PROMPT_TOKENS = 128
NEW_TOKENS = 64


# ---- random-weight models of the real shapes -------------------------------------------

def write_safetensors(path, tensors, dtype):
    """tensors: name -> float32 array; written as F32 or BF16 (truncated f32 bits)."""
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        array = np.ascontiguousarray(array, dtype=np.float32)
        if dtype == "bfloat16":
            data = (array.view(np.uint32) >> 16).astype(np.uint16).tobytes()
            code = "BF16"
        else:
            data = array.tobytes()
            code = "F32"
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


def word_tokenizer(path, vocab_size, wordpiece=False):
    """A whitespace tokenizer.json whose words w0..wN are the ids 0..N."""
    vocab = {f"w{i}": i for i in range(vocab_size)}
    model = ({"type": "WordPiece", "unk_token": "w0", "continuing_subword_prefix": "##",
              "max_input_chars_per_word": 100, "vocab": vocab} if wordpiece
             else {"type": "WordLevel", "unk_token": "w0", "vocab": vocab})
    tokenizer = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
                 "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None,
                 "decoder": None, "model": model}
    with open(path, "w") as f:
        json.dump(tokenizer, f)


def make_llama(folder, config, dtype, seed=0):
    rng = np.random.default_rng(seed)
    config = dict(config, eos_token_id=None, torch_dtype=dtype)
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    d = h // heads
    w = lambda *shape: rng.standard_normal(shape, dtype=np.float32) * 0.02
    tensors = {"model.embed_tokens.weight": w(v, h), "model.norm.weight": np.ones(h, np.float32)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        tensors.update({
            p + "self_attn.q_proj.weight": w(h, h), p + "self_attn.k_proj.weight": w(kv * d, h),
            p + "self_attn.v_proj.weight": w(kv * d, h), p + "self_attn.o_proj.weight": w(h, h),
            p + "mlp.gate_proj.weight": w(i, h), p + "mlp.up_proj.weight": w(i, h),
            p + "mlp.down_proj.weight": w(h, i),
            p + "input_layernorm.weight": np.ones(h, np.float32),
            p + "post_attention_layernorm.weight": np.ones(h, np.float32),
        })
    if not config.get("tie_word_embeddings", False):
        tensors["lm_head.weight"] = w(v, h)
    os.makedirs(folder, exist_ok=True)
    write_safetensors(os.path.join(folder, "model.safetensors"), tensors, dtype)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    word_tokenizer(os.path.join(folder, "tokenizer.json"), v)


def make_bert(folder, config, seed=0):
    rng = np.random.default_rng(seed)
    h, i = config["hidden_size"], config["intermediate_size"]
    w = lambda *shape: rng.standard_normal(shape, dtype=np.float32) * 0.02
    ones, zeros = (lambda n: np.ones(n, np.float32)), (lambda n: np.zeros(n, np.float32))
    tensors = {
        "embeddings.word_embeddings.weight": w(config["vocab_size"], h),
        "embeddings.position_embeddings.weight": w(config["max_position_embeddings"], h),
        "embeddings.token_type_embeddings.weight": w(config["type_vocab_size"], h),
        "embeddings.LayerNorm.weight": ones(h), "embeddings.LayerNorm.bias": zeros(h),
    }
    for layer in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{layer}."
        for name in ["attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense"]:
            tensors[p + name + ".weight"], tensors[p + name + ".bias"] = w(h, h), zeros(h)
        tensors[p + "intermediate.dense.weight"], tensors[p + "intermediate.dense.bias"] = w(i, h), zeros(i)
        tensors[p + "output.dense.weight"], tensors[p + "output.dense.bias"] = w(h, i), zeros(h)
        for norm in ["attention.output.LayerNorm", "output.LayerNorm"]:
            tensors[p + norm + ".weight"], tensors[p + norm + ".bias"] = ones(h), zeros(h)
    os.makedirs(folder, exist_ok=True)
    write_safetensors(os.path.join(folder, "model.safetensors"), tensors, "float32")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    word_tokenizer(os.path.join(folder, "tokenizer.json"), config["vocab_size"], wordpiece=True)


def prompt(words, seed=1):
    rng = np.random.default_rng(seed)
    return " ".join(f"w{n}" for n in rng.integers(10, 1000, words))


# ---- Spillway --------------------------------------------------------------------------

def register(server, url):
    server.manage("POST", f"/models?url={url}&synchronous=true")


def metric(server, name):
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", server.metrics(), re.M))


def archive(binary, name, handler, folder, setup, store, work):
    setup_path = os.path.join(work, "setup_config.json")
    with open(setup_path, "w") as f:
        # The prefix cache off: every request sends the same prompt, whose prefill is measured.
        json.dump({"prefix_cache_bytes": 0, **setup}, f)
    subprocess.run([binary, "archive", "--model-name", name, "--handler", handler, "--model-dir", folder,
                    "--extra-files", setup_path, "--export-path", store, "--force"], check=True,
                   capture_output=True)
    return f"{name}.mar"


def spillway_decode(server, model, runs, text):
    server.post(f"/predictions/{model}", {"inputs": text, "parameters": {"max_new_tokens": 2}})  # warm-up
    per_token, prefill = [], []
    for _ in range(runs):
        t1, _ = server.post(f"/predictions/{model}", {"inputs": text, "parameters": {"max_new_tokens": 1}})
        tn, a = server.post(f"/predictions/{model}",
                            {"inputs": text, "parameters": {"max_new_tokens": NEW_TOKENS + 1, "details": True}})
        assert a["details"]["generated_tokens"] == NEW_TOKENS + 1, a["details"]
        prefill.append(t1)
        per_token.append((tn - t1) / NEW_TOKENS)
    return statistics.median(prefill), 1 / statistics.median(per_token)


def spillway_embed(server, model, runs, sentences):
    server.post("/v1/embeddings", {"model": model, "input": sentences})
    times = [server.post("/v1/embeddings", {"model": model, "input": sentences})[0] for _ in range(runs)]
    return len(sentences) / statistics.median(times)


def half_map(blocks, first, second):
    """Embeddings, the first half of the blocks and the norm on `first`; the rest on `second`."""
    layers = {f"model.layers.{i}": (first if i < blocks // 2 else second) for i in range(blocks)}
    return {"model.embed_tokens": first, **layers, "model.norm": first}


# ---- PyTorch eager ---------------------------------------------------------------------

def torch_decode(folder, dtype, device_map, runs, text, offload):
    import torch
    from transformers import AutoModelForCausalLM
    kw = {"torch_dtype": getattr(torch, dtype), "device_map": device_map}
    if offload:
        kw["offload_folder"] = offload
    model = AutoModelForCausalLM.from_pretrained(folder, **kw).eval()
    ids = torch.tensor([[int(w[1:]) for w in text.split()]], device="cuda")

    def generate(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        torch.cuda.synchronize()
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - t

    generate(2)
    per_token = []
    for _ in range(runs):
        t1, tn = generate(1), generate(NEW_TOKENS + 1)
        per_token.append((tn - t1) / NEW_TOKENS)
    return 1 / statistics.median(per_token)


def torch_embed(folder, runs, sentences):
    import torch
    from transformers import BertModel
    model = BertModel.from_pretrained(folder).cuda().eval()
    rows = [[int(w[1:]) for w in s.split()] for s in sentences]
    ids = torch.tensor(rows, device="cuda")
    mask = torch.ones_like(ids)

    def run():
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            torch.nn.functional.normalize(pooled, dim=-1)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    for _ in range(3):
        run()
    return len(sentences) / statistics.median([run() for _ in range(runs)])


# ---- main ------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--configs", required=True, help="folder with smollm2_config.json and minilm_config.json")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--device", default="cuda:0", help="cuda:0, or cpu for a dry run without a GPU")
    args = ap.parse_args()
    gpu = args.device
    work = tempfile.mkdtemp(prefix="spillway-gpu-")
    try:
        llama_config = json.load(open(os.path.join(args.configs, "smollm2_config.json")))
        bert_config = json.load(open(os.path.join(args.configs, "minilm_config.json")))
        blocks = llama_config["num_hidden_layers"]
        models = {}
        for dtype in ["bfloat16", "float32"]:
            models[dtype] = os.path.join(work, f"smollm2-{dtype}")
            make_llama(models[dtype], llama_config, dtype)
        minilm = os.path.join(work, "minilm")
        make_bert(minilm, bert_config)
        text = prompt(PROMPT_TOKENS)
        offload = os.path.join(work, "offload")
        layouts = [  # name, weights, setup_config
            ("all on GPU, bf16", "bfloat16", {"device_map": gpu, "torch_dtype": "bfloat16"}),
            ("all on GPU, f32", "float32", {"device_map": gpu, "torch_dtype": "float32"}),
            ("half on CPU, f32", "float32", {"device_map": half_map(blocks, gpu, "cpu"), "torch_dtype": "float32"}),
            ("half on disk, f32", "float32", {"device_map": half_map(blocks, gpu, "disk"), "torch_dtype": "float32"}),
            ("half on disk, bf16", "bfloat16", {"device_map": half_map(blocks, gpu, "disk"),
                                                "torch_dtype": "bfloat16"}),
            ("all on disk, bf16", "bfloat16", {"device_map": {"model.embed_tokens": gpu, "model.layers": "disk",
                                                              "model.norm": gpu}, "torch_dtype": "bfloat16"}),
        ]
        store = os.path.join(work, "store")
        os.makedirs(store)
        server = Server(args.bin, store, os.path.join(work, "cache"), 29080)
        rows = []
        try:
            for n, (label, weights, setup) in enumerate(layouts):
                name = f"smol{n}"
                register(server, archive(args.bin, name, "text_generation", models[weights], setup, store, work))
                bytes0, us0 = metric(server, "spillway_streamed_bytes_total"), \
                    metric(server, "spillway_materialize_microseconds_total")
                prefill, tok_s = spillway_decode(server, name, args.runs, text)
                streamed = metric(server, "spillway_streamed_bytes_total") - bytes0
                us = metric(server, "spillway_materialize_microseconds_total") - us0
                staging = streamed / (us * 1e-6) / 1e9 if us > 0 else None
                rows.append((label, prefill, tok_s, staging))
                server.manage("DELETE", f"/models/{name}")
            name = "minilm"
            register(server, archive(args.bin, name, "text_embedding", minilm, {"device_map": gpu}, store, work))
            sentences = [prompt(24, seed=s) for s in range(64)]
            sentences_s = spillway_embed(server, name, args.runs, sentences)
        finally:
            server.stop()

        peer = {}
        if not args.no_peer:
            peer["all on GPU, bf16"] = torch_decode(models["bfloat16"], "bfloat16", "cuda:0", args.runs, text, None)
            peer["all on GPU, f32"] = torch_decode(models["float32"], "float32", "cuda:0", args.runs, text, None)
            # accelerate's device_map names every module; the tied head stays with the embeddings.
            hf = lambda second: dict(half_map(blocks, 0, second), **{"model.rotary_emb": 0, "lm_head": 0})
            peer["half on CPU, f32"] = torch_decode(models["float32"], "float32", hf("cpu"), args.runs, text, None)
            peer["half on disk, f32"] = torch_decode(models["float32"], "float32", hf("disk"), args.runs, text,
                                                     offload)
            peer["minilm"] = torch_embed(minilm, args.runs, sentences)

        print(f"SmolLM2-135M shape, random weights; prompt {PROMPT_TOKENS} tokens, decode {NEW_TOKENS}; "
              f"median of {args.runs}; device {gpu}")
        print(f"{'layout':<22} {'prefill ms':>10} {'tok/s':>8} {'PyTorch tok/s':>13} {'ratio':>6} "
              f"{'staging GB/s':>12}")
        for label, prefill, tok_s, staging in rows:
            theirs = peer.get(label)
            print(f"{label:<22} {prefill * 1e3:>10.1f} {tok_s:>8.1f} "
                  f"{(f'{theirs:.1f}' if theirs else '-'):>13} {(f'{tok_s / theirs:.2f}' if theirs else '-'):>6} "
                  f"{(f'{staging:.1f}' if staging else '-'):>12}")
        theirs = peer.get("minilm")
        print(f"MiniLM shape, batch 64 x 24 words, f32: {sentences_s:.0f} sentences/s"
              + (f"; PyTorch {theirs:.0f} ({sentences_s / theirs:.2f}x)" if theirs else ""))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
