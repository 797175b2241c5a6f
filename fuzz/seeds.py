#!/usr/bin/env python3
"""Writes the seed inputs of each fuzz target into fuzz/corpus/TARGET/seed-*: small valid
files of each kind (a .mar stored and deflated, a .tar.gz, safetensors, a llama GGUF with
Q8_0 blocks, the configs in configs/, prediction bodies of every API), from which the
fuzzer mutates. Standard library only; run from anywhere: python3 fuzz/seeds.py"""

import io
import json
import struct
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
CORPUS = ROOT / "corpus"


def seed(target: str, name: str, data: bytes) -> None:
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"seed-{name}").write_bytes(data)


def safetensors(tensors: dict, metadata: dict | None = None) -> bytes:
    """tensors: name -> (dtype, shape, bytes)."""
    header, offset, data = {}, 0, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data += raw
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def floats(n: int) -> bytes:
    return struct.pack(f"<{n}f", *[(i % 7 - 3) / 8 for i in range(n)])


BERT_CONFIG = {
    "model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
    "intermediate_size": 16, "vocab_size": 8, "max_position_embeddings": 16,
    "type_vocab_size": 1, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
}
WEIGHTS = safetensors({
    "embeddings.word_embeddings.weight": ("F32", [8, 8], floats(64)),
    "embeddings.LayerNorm.weight": ("F32", [8], floats(8)),
})
MANIFEST = {
    "createdOn": "02/12/2026 00:00:00", "runtime": "python", "archiverVersion": "0.1.0",
    "model": {"modelName": "m", "modelVersion": "1.0", "handler": "text_embedding",
              "serializedFile": "model.safetensors"},
}
FILES = {
    "MAR-INF/MANIFEST.json": json.dumps(MANIFEST).encode(),
    "config.json": json.dumps(BERT_CONFIG).encode(),
    "setup_config.json": b'{"device_map": "auto", "max_memory": {"cpu": "1GiB"}}',
    "model-config.yaml": b"minWorkers: 1\nbatchSize: 4\n",
    "model.safetensors": WEIGHTS,
}


def zip_archive(compression: int) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as z:
        for name, data in FILES.items():
            z.writestr(name, data)
    return out.getvalue()


def tgz_archive() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as t:
        for name, data in FILES.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return out.getvalue()


# ---- GGUF (v3): a one-block llama, its matrices in Q8_0 ----

def gguf_string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def gguf_value(value) -> bytes:
    if isinstance(value, str):
        return struct.pack("<I", 8) + gguf_string(value)
    if isinstance(value, float):
        return struct.pack("<If", 6, value)
    if isinstance(value, int):
        return struct.pack("<II", 4, value)
    if isinstance(value, list):  # arrays of strings
        return struct.pack("<IIQ", 9, 8, len(value)) + b"".join(gguf_string(v) for v in value)
    raise TypeError(value)


def q8_0(rows: int, cols: int) -> bytes:
    block = struct.pack("<e", 0.01) + bytes((i * 7) % 256 for i in range(32))
    return block * (rows * cols // 32)


def gguf() -> bytes:
    hidden, ffn, vocab = 32, 64, 4
    metadata = {
        "general.architecture": "llama",
        "llama.attention.head_count": 2,
        "llama.attention.head_count_kv": 2,
        "llama.embedding_length": hidden,
        "llama.feed_forward_length": ffn,
        "llama.block_count": 1,
        "llama.context_length": 64,
        "llama.rope.freq_base": 10000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["a", "b", "ab", "c"],
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }
    # name, dims (ggml order: columns first), type (0 f32, 8 q8_0), data
    tensors = [
        ("token_embd.weight", [hidden, vocab], 0, floats(hidden * vocab)),
        ("output_norm.weight", [hidden], 0, floats(hidden)),
        ("blk.0.attn_norm.weight", [hidden], 0, floats(hidden)),
        ("blk.0.ffn_norm.weight", [hidden], 0, floats(hidden)),
    ]
    for name in ["attn_q", "attn_k", "attn_v", "attn_output"]:
        tensors.append((f"blk.0.{name}.weight", [hidden, hidden], 8, q8_0(hidden, hidden)))
    for name in ["ffn_gate", "ffn_up"]:
        tensors.append((f"blk.0.{name}.weight", [hidden, ffn], 8, q8_0(ffn, hidden)))
    tensors.append(("blk.0.ffn_down.weight", [ffn, hidden], 8, q8_0(hidden, ffn)))
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for key, value in metadata.items():
        out += gguf_string(key) + gguf_value(value)
    data, offsets = b"", []
    for _, _, _, raw in tensors:
        data += b"\0" * (-len(data) % 32)
        offsets.append(len(data))
        data += raw
    for (name, dims, kind, _), offset in zip(tensors, offsets):
        out += gguf_string(name) + struct.pack("<I", len(dims))
        out += b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", kind, offset)
    out += b"\0" * (-len(out) % 32)
    return out + data


def main() -> None:
    seed("archive", "zip-store", b"\0" + zip_archive(zipfile.ZIP_STORED))
    seed("archive", "zip-deflated", b"\0" + zip_archive(zipfile.ZIP_DEFLATED))
    seed("archive", "tgz", b"\1" + tgz_archive())

    seed("safetensors", "f32", WEIGHTS)
    seed("safetensors", "ggml-q8_0", safetensors(
        {"w": ("U8", [2, 34], q8_0(2, 32)), "ids": ("I64", [2], struct.pack("<2q", 1, 2))},
        {"ggml.w": "Q8_0"},
    ))
    seed("safetensors", "bf16-f16", safetensors({
        "a": ("BF16", [2, 2], b"\x80\x3f" * 4), "b": ("F16", [3], b"\x00\x3c" * 3),
    }))

    seed("gguf", "llama-q8_0", gguf())

    seed("config_properties", "configs", (REPO / "configs/config.properties").read_bytes())
    seed("config_properties", "addresses", b"inference_address=http://0.0.0.0:8080\n"
         b"management_address=https://127.0.0.1:8081\nmax_request_size=6553500\n"
         b"default_workers_per_model=2\nload_models=all\nmodel_store=/tmp/store\n")
    seed("model_config_yaml", "configs", (REPO / "configs/model-config.yaml").read_bytes())
    seed("model_config_yaml", "devices", b"minWorkers: 1\nmaxWorkers: 2\nbatchSize: 8\n"
         b"maxBatchDelay: 50\nresponseTimeout: 120\ndeviceType: gpu\ndeviceIds: [0, 1]\n"
         b"continuousBatching: true\n")
    seed("setup_config", "configs", (REPO / "configs/setup_config.json").read_bytes())
    seed("setup_config", "map", json.dumps({
        "device_map": {"model.embed_tokens": "cpu", "model.layers.0": 0, "model.layers": "disk",
                       "lm_head": "cuda:1"},
        "max_memory": {"0": "10GiB", "1": 2000000, "cpu": "500MB"},
        "offload_folder": "/tmp/offload", "offload_state_dict": True, "low_cpu_mem_usage": True,
        "torch_dtype": "bfloat16", "max_length": 128, "device": "cuda:0,1",
    }).encode())

    bodies = [
        (0, 1, b'{"inputs": ["hello world", "the quick brown fox"]}'),
        (1, 2, b"hello world"),
        (2, 1, b'{"inputs": "hi", "parameters": {"max_new_tokens": 3, "temperature": 0.5, '
               b'"top_p": 0.9, "stop": ["x"], "details": true, "stream": true}}'),
        (3, 3, b"\x00\x01raw bytes"),
        (4, 1, b'{"model": "gen", "prompt": "hi", "max_tokens": 3, "stop": "x", "logprobs": 2}'),
        (5, 1, b'{"model": "gen", "messages": [{"role": "user", "content": "hi"}], '
               b'"max_tokens": 3, "stream": true, "top_logprobs": 1, "logprobs": true}'),
        (6, 1, b'{"model": "emb", "input": ["hello", [1, 2, 3]], "encoding_format": "base64"}'),
        (7, 1, b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", '
               b'"data": ["hello world"]}], "outputs": [{"name": "embedding"}]}'),
        (19, 3, b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", '
                b'"parameters": {"binary_data_size": 9}}]}\x00\x05\x00\x00\x00hello'),
    ]
    for i, (pick, content_type, body) in enumerate(bodies):
        seed("prediction_body", f"{i}", bytes([pick, content_type]) + body)


if __name__ == "__main__":
    main()
