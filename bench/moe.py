#!/usr/bin/env python3
"""A mixture-of-experts model larger than its max_memory, with its routed experts on disk and
everything else in RAM (llama.cpp's `--cpu-moe` / `-ot exps=CPU`), against the whole model
streamed from disk and against it all in RAM (issue 30).

The model: a random Mixtral (transformers' MixtralForCausalLM, seeded) of 8 blocks, hidden 512,
8 experts of width 1024 per block, 2 per token, float32 (~412 MiB, of it 384 MiB experts), and a
byte-level BPE tokenizer of 1,024 tokens trained here with the `tokenizers` package. Each layout
is served by the release server (`spillway serve`) in a process of its own, with
setup_config.json's `max_memory` {"cpu": BUDGET} where the model does not fit:
  - experts-on-disk: device_map {"": "cpu", "model.layers.*.block_sparse_moe.experts": "disk"}
  - all-on-disk: device_map {"model.embed_tokens": "cpu", "model.layers": "disk", ...}: every
    block and its experts on disk (the experts still read on demand)
  - whole-blocks (with --before BINARY, a Spillway built before experts were units of their
    own, e.g. commit 5427c35): the same all-on-disk map, each block streamed whole, all its
    experts read ahead with it — what a layer streamer without routing reads
  - ram: device_map "cpu" (no budget; the reference speed)
For each: decode tok/s over 32 new tokens ((t(33 tokens) - t(1 token)) / 32, median of --runs),
bytes streamed from disk per decoded token (`spillway_streamed_bytes_total` over those 32
tokens), the largest RssAnon sampled every 5 ms against the budget, and the plan's bytes on
each device. The page cache is warm (the weights file fits this host's RAM): the bytes column is
what each layout reads from its mapping, which a cold disk would have to deliver.

Prints the table and writes BENCHMARKS.md's "Mixture of experts on disk" section (unless
--no-write).

Usage: bench/moe.py [--runs 5] [--skip-build] [--no-write] [--budget-mib 250] [--before BINARY]
"""
import argparse, json, os, re, shutil, statistics, subprocess, sys, tempfile, threading, time, urllib.request

from common import ROOT, Server, status, venv_python, write_section
from structured import cpu_name

BIN = os.path.join(ROOT, "target/release/spillway")
PROMPT = "The river valley changed slowly over the long years of its history. " * 4
NEW_TOKENS = 32

MAKE_MODEL = r"""
import json, sys, torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import MixtralConfig, MixtralForCausalLM
out = sys.argv[1]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|endoftext|>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
words = ["river", "valley", "history", "long", "years", "slowly", "changed", "the", "of", "its", "over"]
tok.train_from_iterator([" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(2000)],
                        trainer)
tok.save(f"{out}/tokenizer.json")
torch.manual_seed(0)
config = MixtralConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
                       num_experts_per_tok=2, max_position_embeddings=512, tie_word_embeddings=False,
                       bos_token_id=0, eos_token_id=0)
model = MixtralForCausalLM(config).to(torch.float32)
model.save_pretrained(out, safe_serialization=True)
"""


class Sampler:
    """The largest RssAnon of a process, sampled every 5 ms."""

    def __init__(self, pid):
        self.pid, self.peak, self.on = pid, 0, True
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while self.on:
            try:
                self.peak = max(self.peak, status(self.pid, "RssAnon:"))
            except OSError:
                return
            time.sleep(0.005)


def streamed_bytes(server):
    text = server.metrics()
    return sum(float(v) for v in re.findall(r'^spillway_streamed_bytes_total\{[^}]*\} (\S+)$', text, re.M))


def generate(server, new_tokens):
    seconds, answer = server.post("/predictions/moe", {"inputs": PROMPT, "parameters": {
        "max_new_tokens": new_tokens, "details": True, "do_sample": False}})
    return seconds, answer["details"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--budget-mib", type=int, default=250)
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--before", help="a spillway binary from before experts were units (whole blocks streamed)")
    args = ap.parse_args()
    if not args.skip_build:
        subprocess.run(["scripts/build-release.sh"], cwd=ROOT, check=True)
    python = venv_python(["torch", "transformers", "tokenizers", "safetensors"])
    work = tempfile.mkdtemp(prefix="spillway-moe-")
    budget = args.budget_mib * 2**20
    all_on_disk = {"device_map": {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu",
                                  "lm_head": "cpu"}, "max_memory": {"cpu": budget}}
    layouts = [
        ("experts-on-disk", {"device_map": {"": "cpu", "model.layers.*.block_sparse_moe.experts": "disk"},
                             "max_memory": {"cpu": budget}}, BIN),
        ("all-on-disk", all_on_disk, BIN),
        *([("whole-blocks", all_on_disk, args.before)] if args.before else []),
        ("ram", {"device_map": "cpu"}, BIN),
    ]
    rows = []
    try:
        model_dir = os.path.join(work, "model")
        os.makedirs(model_dir)
        subprocess.run([python, "-c", MAKE_MODEL, model_dir], check=True)
        weights = os.path.getsize(os.path.join(model_dir, "model.safetensors"))
        port = 29180
        for name, setup, binary in layouts:
            store = os.path.join(work, name)
            os.makedirs(store)
            setup_file = os.path.join(work, "setup_config.json")
            with open(setup_file, "w") as f:
                json.dump({"max_length": 256, "prefix_cache_bytes": 0, **setup}, f)
            subprocess.run([BIN, "archive", "--model-name", "moe", "--handler", "text_generation",
                            "--model-dir", model_dir, "--extra-files", setup_file, "--export-path", store],
                           check=True, capture_output=True)
            server = Server(binary, store, os.path.join(work, "cache"), port)
            try:
                placement = server.manage("GET", "/models/moe")[0]["placement"]
                sampler = Sampler(server.proc.pid)
                generate(server, 2)  # warm-up
                per_token, read = [], []
                for _ in range(args.runs):
                    t1, _ = generate(server, 1)
                    before = streamed_bytes(server)
                    t33, details = generate(server, NEW_TOKENS + 1)
                    after = streamed_bytes(server)
                    assert details["generated_tokens"] == NEW_TOKENS + 1, details
                    # The 33-token request's prompt pass streams too: take the 1-token request's off.
                    before_one = streamed_bytes(server)
                    generate(server, 1)
                    one = streamed_bytes(server) - before_one
                    per_token.append((t33 - t1) / NEW_TOKENS)
                    read.append((after - before - one) / NEW_TOKENS)
                sampler.on = False
                rows.append((name, statistics.median(per_token), statistics.median(read), sampler.peak,
                             placement, details["prompt_tokens"]))
            finally:
                server.stop()
            port += 10
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def on(placement, device):
        return sum(u["bytes"] for u in placement["units"] if u["device"] == device)

    ram_rate = 1 / [r for r in rows if r[0] == "ram"][0][1]
    lines = [f"A random Mixtral (8 blocks, hidden 512, 8 experts × width 1024, 2 per token, float32: "
             f"{weights / 2**20:.0f} MiB, of it experts {8 * 8 * 3 * 512 * 1024 * 4 / 2**20:.0f} MiB); "
             f"max_memory cpu {args.budget_mib} MiB for the disk layouts; prompt {rows[0][5]} tokens, "
             f"decode {NEW_TOKENS} new tokens, median of {args.runs}; page cache warm; {cpu_name()}, "
             f"{os.cpu_count()} cores. Command: `bench/moe.py --runs {args.runs}"
             f"{' --before ' + os.path.basename(args.before) if args.before else ''}` ({time.strftime('%Y-%m-%d')}; "
             f"release build).", "",
             "| layout | in RAM (plan) | on disk (plan) | decode tok/s | vs ram | MiB read from disk per token "
             "| max RssAnon MiB | budget MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for name, per_token, read, peak, placement, _ in rows:
        lines.append(f"| {name} | {on(placement, 'cpu') / 2**20:.1f} | {on(placement, 'disk') / 2**20:.1f} | "
                     f"{1 / per_token:.1f} | {1 / per_token / ram_rate:.2f} | {read / 2**20:.1f} | "
                     f"{peak / 2**20:.1f} | {args.budget_mib if name != 'ram' else '-'} |")
    experts = rows[0]
    lines.append("")
    for other in rows[1:]:
        if other[0] in ("all-on-disk", "whole-blocks"):
            lines.append(f"Experts on disk against {other[0]}: {other[1] / experts[1]:.2f}× the decode speed, "
                         f"{experts[2] / max(other[2], 1):.2f}× the bytes read per token.")
    if args.before:
        lines.append(f"whole-blocks ran `{os.path.basename(args.before)}`: Spillway built before experts were "
                     f"units of their own (commit 5427c35), each block streamed whole.")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_section("Mixture of experts on disk", text)


if __name__ == "__main__":
    sys.exit(main())
