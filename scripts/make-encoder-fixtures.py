#!/usr/bin/env python3
"""Tiny random encoder checkpoints and transformers' own answers for them: the fixtures
that handlers/src/models/encoder tests every family against (issue 31).

For each fixture below this writes handlers/tests/fixtures/encoders/<name>/:
  config.json     as transformers 5 saves the *ForSequenceClassification model
  tensors.json    the weights as a recipe (see make-decoder-fixtures.py: each tensor's
                  name, shape, offset and scale; values offset + scale * u, u from
                  splitmix64 counters seeded by FNV-1a of "<name>/<tensor>"), so no
                  weights are committed; handlers' testing module rebuilds the same
                  model.safetensors bit for bit
  reference.json  a padded batch of two inputs (ids, token types, attention mask; the
                  second row a pair), the encoder's last hidden states for it (eager
                  attention, f32) and the classifier's logits (per token for the
                  token classifiers, `token_logits`)

Regenerate (needs torch, numpy and transformers >= 5; not needed by the tests):
  python3 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install torch numpy 'transformers>=5' safetensors
  /tmp/tvenv/bin/python scripts/make-encoder-fixtures.py
"""

import importlib.util
import json
import pathlib

import torch
import transformers

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE.parent / "handlers/tests/fixtures/encoders"

# The recipe's generator is the decoder fixtures' own.
_spec = importlib.util.spec_from_file_location("decoders", HERE / "make-decoder-fixtures.py")
decoders = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(decoders)

COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    hidden_act="gelu",
)
LABELS = {0: "NEGATIVE", 1: "NEUTRAL", 2: "POSITIVE"}

# name: (config class, model class, the keys that make it that family, special ids
# (cls, sep, pad), whether the second input's separator is doubled as RoBERTa's is)
FIXTURES = {
    # Two token types (the pair's second segment is type 1), a pooler before the classifier.
    "bert": ("BertConfig", "BertForSequenceClassification",
             dict(type_vocab_size=2, pad_token_id=0), (2, 3, 0), False),
    # Positions offset past the padding index (pad 1: positions from 2), one token type,
    # a dense + tanh + out_proj head on <s> and no pooler.
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification",
                dict(type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                     max_position_embeddings=66), (0, 2, 1), True),
    # XLM-RoBERTa's graph with one logit: a cross-encoder reranker, as bge-reranker is.
    "xlm_roberta_reranker": ("XLMRobertaConfig", "XLMRobertaForSequenceClassification",
                             dict(type_vocab_size=1, pad_token_id=1, bos_token_id=0,
                                  eos_token_id=2, max_position_embeddings=66, num_labels=1),
                             (0, 2, 1), True),
    # dim / n_layers / n_heads / hidden_dim, no token types, its own tensor names, a
    # pre_classifier + ReLU head.
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification",
                   dict(vocab_size=128, dim=32, n_layers=3, n_heads=4, hidden_dim=64,
                        max_position_embeddings=64, activation="gelu", pad_token_id=0),
                   (2, 3, 0), False),
    # Pre-norm blocks with RoPE (global layers at one base, local ones at another and
    # within a window of 2 each side, shorter than the inputs), a GeGLU MLP, no biases,
    # a final norm; the classifier pools the mean and has a dense + GELU + norm head.
    "modernbert": ("ModernBertConfig", "ModernBertForSequenceClassification",
                   dict(vocab_size=128, hidden_size=32, intermediate_size=48,
                        num_hidden_layers=3, num_attention_heads=4,
                        max_position_embeddings=64, pad_token_id=0, bos_token_id=2,
                        eos_token_id=3, cls_token_id=2, sep_token_id=3,
                        global_attn_every_n_layers=3, local_attention=4,
                        global_rope_theta=160000.0, local_rope_theta=10000.0,
                        classifier_pooling="mean"),
                   (2, 3, 0), False),
    # Token classifiers (NER): BERT's classifier on every token, and ModernBERT's head
    # before it.
    "bert_ner": ("BertConfig", "BertForTokenClassification",
                 dict(type_vocab_size=2, pad_token_id=0), (2, 3, 0), False),
    "modernbert_ner": ("ModernBertConfig", "ModernBertForTokenClassification",
                       dict(vocab_size=128, hidden_size=32, intermediate_size=48,
                            num_hidden_layers=3, num_attention_heads=4,
                            max_position_embeddings=64, pad_token_id=0, bos_token_id=2,
                            eos_token_id=3, cls_token_id=2, sep_token_id=3,
                            global_attn_every_n_layers=3, local_attention=4),
                       (2, 3, 0), False),
}
NER_LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}


def inputs(cls: int, sep: int, pad: int, double_sep: bool):
    """A single text and a padded pair, as the families' tokenizers lay them out."""
    single = [cls, 10, 11, 12, 13, 14, 15, 16, 17, sep]
    first, second = [20, 21, 22], [30, 31]
    pair = [cls, *first, sep] + ([sep] if double_sep else []) + [*second, sep]
    pair_types = [0] * (len(first) + 2) + [1] * (len(pair) - len(first) - 2)
    width = len(single)
    ids = [single, pair + [pad] * (width - len(pair))]
    types = [[0] * width, pair_types + [0] * (width - len(pair))]
    mask = [[1] * width, [1] * len(pair) + [0] * (width - len(pair))]
    return ids, types, mask


def recipe(name: str):
    """Norm weights near 1, everything else wide enough for the answers to differ."""
    if "norm" in name.lower() and name.endswith("weight"):
        return 1.0, 0.35
    if name.endswith("bias"):
        return 0.0, 0.35
    return 0.0, 0.43


def main():
    for name, (config_class, model_class, keys, specials, double_sep) in FIXTURES.items():
        merged = dict(COMMON) if config_class not in ("DistilBertConfig", "ModernBertConfig") else {}
        merged.update(keys)
        labels = NER_LABELS if name.endswith("_ner") else LABELS
        if merged.get("num_labels") != 1:
            merged.update(id2label=labels, label2id={v: k for k, v in labels.items()})
        config = getattr(transformers, config_class)(**merged)
        model_type = getattr(transformers, model_class)
        out = OUT / name
        out.mkdir(parents=True, exist_ok=True)
        model = decoders.recipe_checkpoint(out, name, model_type(config), model_type, recipe)

        ids, types, mask = inputs(*specials, double_sep)
        kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
        if config_class == "BertConfig":
            kwargs["token_type_ids"] = torch.tensor(types)
        else:
            # RoBERTa's tokenizers give a pair one token type; DistilBERT has none.
            types = [[0] * len(row) for row in types]
        with torch.no_grad():
            base = getattr(model, model.base_model_prefix)
            hidden = base(**kwargs).last_hidden_state
            logits = model(**kwargs).logits
        reference = {
            "transformers": transformers.__version__,
            "ids": ids,
            "type_ids": types,
            "mask": mask,
            "hidden": [round(float(x), 6) for x in hidden.flatten()],
            "hidden_shape": list(hidden.shape),
            "logits": [[round(float(x), 6) for x in row] for row in logits]
            if logits.dim() == 2 else [],
            "token_logits": [[[round(float(x), 6) for x in token] for token in row]
                             for row in logits] if logits.dim() == 3 else [],
        }
        (out / "reference.json").write_text(json.dumps(reference) + "\n")
        size = sum(f.stat().st_size for f in out.iterdir())
        print(f"{name:22} {size / 1024:6.0f} KB  logits {reference['logits']}")


if __name__ == "__main__":
    main()
