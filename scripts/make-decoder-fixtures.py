#!/usr/bin/env python3
"""Tiny random decoder checkpoints and transformers' own answers for them: the fixtures
that handlers/src/models/decoder tests every family against (issue 30).

For each family below this writes handlers/tests/fixtures/decoders/<family>/:
  config.json      as transformers 5 saves it (rope_parameters, dtype, layer_types)
  config.t4.json   the same model in transformers 4's spelling (rope_theta and
                   rope_scaling at the top, torch_dtype, no layer_types)
  tensors.json     the weights as a recipe, not as numbers: each tensor's name, shape,
                   offset and scale. Its values are offset + scale * u, u uniform in
                   [-1, 1) from splitmix64 counters seeded by FNV-1a of "<family>/<name>"
                   (see weights() below), computed in f32; transformers answers from
                   the checkpoint written from it, and handlers' testing module
                   rebuilds the same model.safetensors bit for bit, so no weights are
                   committed
  reference.json   a prompt, then per greedy step transformers' logits (eager attention,
                   f32) and the token it picks

Regenerate (needs torch, numpy and transformers >= 5; not needed by the tests):
  python3 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install torch numpy 'transformers>=5' safetensors
  /tmp/tvenv/bin/python scripts/make-decoder-fixtures.py [FAMILY...]   # all, or those named
"""

import json
import sys
import pathlib

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file

OUT = pathlib.Path(__file__).resolve().parent.parent / "handlers/tests/fixtures/decoders"
PROMPT = [3, 17, 42, 99, 5, 64, 11, 120, 7, 30]
STEPS = 6

# A key of COMMON the family's config does not have (BLOOM states no intermediate size).
DROP = object()

COMMON = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
)

# family: (config class, model class, the keys that make it that family)
FAMILIES = {
    # Llama 3.1's banded RoPE scaling, theta 500,000, untied head.
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            tie_word_embeddings=False,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
    ),
    # A sliding window shorter than the prompt: an attention window, not a length limit.
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(tie_word_embeddings=False, sliding_window=4, head_dim=8),
    ),
    # Biases on q, k and v; tied head; theta 1,000,000.
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1e6)),
    ),
    # qk-norm per head, an explicit head_dim wider than hidden/heads, and sliding-window
    # layers from max_window_layers on.
    "qwen3": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(
            tie_word_embeddings=True,
            head_dim=16,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=1,
        ),
    ),
    # Embedding, residual, attention and logit multipliers.
    "granite": (
        "GraniteConfig",
        "GraniteForCausalLM",
        dict(
            tie_word_embeddings=True,
            embedding_multiplier=2.0,
            residual_multiplier=0.7,
            attention_multiplier=0.2,
            logits_scaling=4.0,
        ),
    ),
    # Norms after attention and MLP (no pre-norms) and qk-norm over the whole projection.
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(tie_word_embeddings=False)),
    # Fused qkv_proj and gate_up_proj, partial rotary, a sliding window.
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(
            tie_word_embeddings=False,
            sliding_window=5,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5),
        ),
    ),
    # 1 + w norms, embeddings times sqrt(hidden), tanh-GELU, head_dim wider than
    # hidden / heads, tied head.
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=16, tie_word_embeddings=True)),
    # Four norms a block, score scale from query_pre_attn_scalar, scores and logits
    # soft-capped (caps low enough to bite on these weights), even layers sliding.
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(
            head_dim=16,
            tie_word_embeddings=True,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=8.0,
            sliding_window=4,
        ),
    ),
    # Gemma 2's graph plus per-head qk-norm and a RoPE per layer type: full layers at
    # theta 1e6 with linear scaling, sliding ones at the local base 10,000 unscaled.
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            head_dim=16,
            tie_word_embeddings=True,
            query_pre_attn_scalar=24,
            sliding_window=4,
            sliding_window_pattern=2,
            rope_parameters={
                "full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1e6),
                "sliding_attention": dict(rope_type="default", rope_theta=10000.0),
            },
        ),
    ),
    # Four experts, two per token, weights renormalised over the chosen two.
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(tie_word_embeddings=False, num_local_experts=4, num_experts_per_tok=2),
    ),
    # Qwen 3's attention with experts of their own width; layer 1 keeps a dense MLP
    # (mlp_only_layers), norm_topk_prob renormalises as the released checkpoints do.
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            tie_word_embeddings=False,
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
        ),
    ),
    # LayerNorm, per-head fused query_key_value, half the head rotated, parallel
    # residual, an ungated erf-GELU MLP, untied embed_out.
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(
            num_key_value_heads=DROP,
            tie_word_embeddings=False,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5),
        ),
    ),
    # ALiBi over six heads (not a power of two: the extra slopes), LayerNorm after the
    # embeddings, an ungated tanh-GELU MLP four times as wide, tied head.
    "bloom": (
        "BloomConfig",
        "BloomForCausalLM",
        dict(
            hidden_size=48,
            num_attention_heads=6,
            num_key_value_heads=DROP,
            intermediate_size=DROP,
            max_position_embeddings=DROP,
        ),
    ),
    # Not a family of its own: Qwen 2 with YaRN scaling of an original context of 16
    # (its frequency ramp and its attention factor on cos and sin).
    "qwen2_yarn": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(
            tie_word_embeddings=True,
            rope_parameters=dict(
                rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16
            ),
        ),
    ),
    # Not a family of its own: Phi-3 with LongRoPE (Phi-3-mini-128k, Phi-3.5): short
    # factors while the sequence fits the original context of 12, long ones past it —
    # the 10-token prompt and two steps short, the last four steps long (their keys
    # before the switch stay as they were cached); the attention factor from 64 / 12.
    "phi3_longrope": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(
            tie_word_embeddings=False,
            original_max_position_embeddings=12,
            rope_parameters=dict(
                rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=12,
                short_factor=[1.0, 1.3, 2.1, 3.7], long_factor=[1.5, 4.0, 9.0, 20.0],
            ),
        ),
    ),
    # Not a family of its own: Llama with dynamic NTK scaling (factor 2) past its
    # max_position_embeddings of 12 — the 10-token prompt and two steps within it, the last
    # four steps each with the base grown for the sequence's length (as transformers'
    # forward recomputes it; the keys cached before keep theirs).
    "llama_dynamic": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            tie_word_embeddings=False,
            max_position_embeddings=12,
            rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0),
        ),
    ),
    # Learned positions, Conv1D weights stored [in, out], an ungated tanh-GELU MLP
    # (n_inner unset: four times the width), tied head.
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(num_key_value_heads=DROP, intermediate_size=DROP),
    ),
}


MASK64 = (1 << 64) - 1


def fnv1a64(text: str) -> int:
    h = 0xCBF29CE484222325
    for byte in text.encode():
        h = ((h ^ byte) * 0x100000001B3) & MASK64
    return h


def uniform(seed: int, count: int) -> np.ndarray:
    """count values in [-1, 1), exact in f32: splitmix64 of seed + (i + 1) * golden,
    its top 24 bits as k, then (k - 2^23) / 2^23."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + (np.arange(1, count + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    k = (z >> np.uint64(40)).astype(np.int64) - (1 << 23)
    return (k.astype(np.float32) / np.float32(1 << 23)).astype(np.float32)


def weights(family: str, name: str, shape, offset: float, scale: float) -> np.ndarray:
    """offset + scale * u in f32, one rounding per operation (as Rust computes it)."""
    u = uniform(fnv1a64(f"{family}/{name}"), int(np.prod(shape)))
    return (np.float32(offset) + np.float32(scale) * u).astype(np.float32).reshape(shape)


def recipe(name: str):
    """(offset, scale) per tensor. transformers' init (std 0.02) makes every logit nearly
    equal; wider weights make the comparison and the greedy tokens mean something. Norm
    weights away from 1. Uniform on [-1, 1) has std 1/sqrt(3): scales are std * sqrt(3)."""
    if "norm" in name:
        return 1.0, 0.35
    if name.endswith("bias"):
        return 0.0, 0.35
    return 0.0, 0.43


def t4_spelling(config: dict) -> dict:
    """transformers 4's config.json for the same model (as the Hub's Gemma 2 and 3
    checkpoints have it: no layer_types, Gemma 3's `sliding_window_pattern` and
    `rope_local_base_freq`, Gemma 1's legacy `hidden_act: gelu`)."""
    old = dict(config)
    rope = old.pop("rope_parameters", None) or {}
    types = old.pop("layer_types", None)
    if "full_attention" in rope:
        local = rope.get("sliding_attention") or {}
        old["rope_local_base_freq"] = local.get("rope_theta", 10000.0)
        rope = rope["full_attention"]
        # The pattern that gives these layer types: every p-th layer is full.
        full = [i for i, t in enumerate(types) if t == "full_attention"]
        old["sliding_window_pattern"] = full[0] + 1
    if old.get("model_type") == "gemma":
        old["hidden_act"] = "gelu"
    if old.get("model_type") == "qwen3_moe" and "num_local_experts" in old:
        old["num_experts"] = old.pop("num_local_experts")
    if "dtype" in old:
        old["torch_dtype"] = old.pop("dtype")
    rope = dict(rope)
    if "rope_theta" in rope:
        old["rope_theta"] = rope.pop("rope_theta")
    if "partial_rotary_factor" in rope:
        old["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    kind = rope.pop("rope_type", "default")
    if kind == "longrope":
        # Phi-3's hub configs: the original context at the top, `type` for the kind.
        old["original_max_position_embeddings"] = rope.pop("original_max_position_embeddings")
        old["rope_scaling"] = {"type": kind, **rope}
    else:
        old["rope_scaling"] = None if kind == "default" else {"rope_type": kind, **rope}
    old["transformers_version"] = "4.57.1"
    if old.get("model_type") == "gpt_neox":
        old["rotary_emb_base"] = old.pop("rope_theta")
        old["rotary_pct"] = old.pop("partial_rotary_factor")
    if old.get("model_type") == "bloom":
        old["n_embed"] = old.pop("hidden_size")
    return old


def recipe_checkpoint(out, family, model, model_type, recipe):
    """Writes `model`'s weights into `out` as a recipe (tensors.json) and returns the model
    transformers loads from the checkpoint that recipe makes (f32, eager, eval). The model
    is saved once to learn its tensors as checkpoints name them (MoE experts one by one,
    tied heads left out); then the file is written again from the recipe and loaded, every
    tensor read, and removed."""
    model.save_pretrained(out, safe_serialization=True)
    for extra in out.glob("generation_config.json"):
        extra.unlink()
    saved = load_file(out / "model.safetensors")
    manifest, tensors = [], {}
    for name in sorted(saved):
        shape = tuple(saved[name].shape)
        offset, scale = recipe(name)
        tensors[name] = torch.from_numpy(weights(family, name, shape, offset, scale))
        manifest.append({"name": name, "shape": list(shape), "offset": offset, "scale": scale})
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    loaded, info = model_type.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not any(info.values()), (family, info)
    (out / "model.safetensors").unlink()
    (out / "tensors.json").write_text(
        json.dumps({"generator": "splitmix64-fnv1a-v1", "dtype": "F32", "tensors": manifest},
                   indent=1) + "\n"
    )
    return loaded.eval()


def main(only):
    for family, (config_class, model_class, keys) in FAMILIES.items():
        if only and family not in only:
            continue
        merged = {k: v for k, v in {**COMMON, **keys}.items() if v is not DROP}
        config = getattr(transformers, config_class)(**merged)
        model_type = getattr(transformers, model_class)
        out = OUT / family
        out.mkdir(parents=True, exist_ok=True)
        model = recipe_checkpoint(out, family, model_type(config), model_type, recipe)
        saved = json.loads((out / "config.json").read_text())
        (out / "config.t4.json").write_text(json.dumps(t4_spelling(saved), indent=2) + "\n")

        steps = []
        ids = torch.tensor([PROMPT])
        with torch.no_grad():
            past = None
            for _ in range(STEPS):
                result = model(input_ids=ids, past_key_values=past, use_cache=True)
                past = result.past_key_values
                logits = result.logits[0, -1]
                token = int(logits.argmax())
                steps.append({"logits": [round(float(x), 6) for x in logits], "token": token})
                ids = torch.tensor([[token]])
        reference = {
            "transformers": transformers.__version__,
            "prompt": PROMPT,
            "steps": steps,
        }
        (out / "reference.json").write_text(json.dumps(reference) + "\n")
        size = sum(f.stat().st_size for f in out.iterdir())
        print(f"{family:8} {size / 1024:6.0f} KB  greedy {[s['token'] for s in steps]}")


if __name__ == "__main__":
    main(set(sys.argv[1:]))
