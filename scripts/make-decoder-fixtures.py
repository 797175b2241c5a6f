#!/usr/bin/env python3
"""Tiny random decoder checkpoints and transformers' own answers for them: the fixtures
that handlers/src/models/decoder tests every family against (issue 30).

For each family below this writes handlers/tests/fixtures/decoders/<family>/:
  config.json      as transformers 5 saves it (rope_parameters, dtype, layer_types)
  config.t4.json   the same model in transformers 4's spelling (rope_theta and
                   rope_scaling at the top, torch_dtype, no layer_types)
  model.safetensors the random weights (f32, ~100 KB)
  reference.json   a prompt, then per greedy step transformers' logits (eager attention,
                   f32) and the token it picks

Regenerate (needs torch and transformers >= 5; not needed by the tests):
  python3 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install torch 'transformers>=5' safetensors
  /tmp/tvenv/bin/python scripts/make-decoder-fixtures.py
"""

import json
import pathlib

import torch
import transformers
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parent.parent / "handlers/tests/fixtures/decoders"
PROMPT = [3, 17, 42, 99, 5, 64, 11, 120, 7, 30]
STEPS = 6

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
}


def randomize(model, seed):
    """transformers' init (std 0.02) makes every logit nearly equal; wider weights make
    the comparison and the greedy tokens mean something. Norm weights away from 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.25 * torch.randn(p.shape, generator=g))


def t4_spelling(config: dict) -> dict:
    """transformers 4's config.json for the same model."""
    old = dict(config)
    rope = old.pop("rope_parameters", None) or {}
    old.pop("layer_types", None)
    if "dtype" in old:
        old["torch_dtype"] = old.pop("dtype")
    rope = dict(rope)
    if "rope_theta" in rope:
        old["rope_theta"] = rope.pop("rope_theta")
    if "partial_rotary_factor" in rope:
        old["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    kind = rope.pop("rope_type", "default")
    old["rope_scaling"] = None if kind == "default" else {"rope_type": kind, **rope}
    old["transformers_version"] = "4.57.1"
    return old


def main():
    for seed, (family, (config_class, model_class, keys)) in enumerate(FAMILIES.items(), 1):
        torch.manual_seed(seed)
        config = getattr(transformers, config_class)(**{**COMMON, **keys})
        config._attn_implementation = "eager"
        model = getattr(transformers, model_class)(config).eval().to(torch.float32)
        randomize(model, seed)
        out = OUT / family
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        # save_pretrained drops tied tensors already; keep only the safetensors file.
        for extra in out.glob("generation_config.json"):
            extra.unlink()
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
    main()
