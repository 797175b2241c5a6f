#!/usr/bin/env python3
"""A tiny SentencePiece BPE vocabulary and SentencePiece's own answers for it: the fixture
that handlers/src/models/gguf.rs holds its GGUF `llama` (SentencePiece) tokenizer to.

Writes handlers/tests/fixtures/spm/<name>.json for two models, one with a dummy prefix
(Llama 2 / Phi-3 style, add_dummy_prefix) and one without (Gemma style):
  tokens, scores, token_type  as llama.cpp's converter writes them into a GGUF
                              (tokenizer.ggml.tokens / scores / token_type: 1 normal,
                              2 unknown, 3 control, 4 user-defined, 6 byte)
  add_space_prefix            tokenizer.ggml.add_space_prefix
  cases                       texts, SentencePiece's ids for each (no BOS), llama.cpp's
                              (which differ after a user-defined piece), and the decode

Regenerate (needs sentencepiece; not needed by the tests):
  /tmp/tvenv/bin/pip install sentencepiece && /tmp/tvenv/bin/python scripts/make-spm-fixture.py
"""

import io
import json
import pathlib

import sentencepiece as spm

OUT = pathlib.Path(__file__).resolve().parent.parent / "handlers/tests/fixtures/spm"

CORPUS = """The quick brown fox jumps over the lazy dog.
A model server answers predictions for the models in its store.
Spillway plans where every layer lives: on the GPU, in memory, or on disk.
Hello world! Hello there, world. The world says hello back.
Tokenizers split text into pieces; pieces become ids; ids become logits.
Streaming layers from disk keeps a large model within its memory budget.
""" * 20

CASES = [
    "Hello world",
    "The quick brown fox",
    "  two leading spaces and trailing  ",
    "layers, ids; logits!",
    "unseen: Zürich ñandú 東京 🙂",
    "newline\nand\ttab",
    "hello<ctrl>world",
]

USER_DEFINED = ["<ctrl>"]


def piece_type(sp, i: int) -> int:
    """llama.cpp's token_type of piece i (the trained model's own piece types)."""
    if sp.is_unknown(i):
        return 2
    if sp.is_control(i):
        return 3
    if sp.id_to_piece(i) in USER_DEFINED:
        return 4
    if sp.is_unused(i):
        return 5
    if sp.is_byte(i):
        return 6
    return 1


def llama_cpp_ids(sp, text: str):
    """llama.cpp's ids for `text`: split on the user-defined pieces, each stretch of text
    encoded on its own (so each gets the dummy prefix, where SentencePiece gives it to
    the whole text only)."""
    ids, rest = [], text
    while rest:
        at = min((rest.find(u), u) for u in USER_DEFINED if u in rest) if any(u in rest for u in USER_DEFINED) else (-1, None)
        if at[0] < 0:
            ids += sp.encode(rest)
            break
        if at[0] > 0:
            ids += sp.encode(rest[: at[0]])
        ids.append(sp.piece_to_id(at[1]))
        rest = rest[at[0] + len(at[1]):]
    return ids


def build(name: str, dummy_prefix: bool):
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=420,
        byte_fallback=True,
        add_dummy_prefix=dummy_prefix,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        user_defined_symbols=USER_DEFINED,
        split_digits=True,
        character_coverage=1.0,
    )
    sp = spm.SentencePieceProcessor(model_proto=buffer.getvalue())
    pieces = range(sp.get_piece_size())
    fixture = {
        "sentencepiece": spm.__version__,
        "add_space_prefix": dummy_prefix,
        "tokens": [sp.id_to_piece(i) for i in pieces],
        "scores": [sp.get_score(i) for i in pieces],
        "token_type": [piece_type(sp, i) for i in pieces],
        "cases": [
            {
                "text": text,
                "ids": sp.encode(text),
                "llama_cpp_ids": llama_cpp_ids(sp, text),
                "decoded": sp.decode(sp.encode(text)),
            }
            for text in CASES
        ],
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(fixture, ensure_ascii=False) + "\n")
    print(name, len(fixture["tokens"]), "pieces")


if __name__ == "__main__":
    build("dummy_prefix", True)
    build("no_prefix", False)
