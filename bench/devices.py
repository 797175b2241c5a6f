#!/usr/bin/env python3
"""Device manager benchmark: what evicting a model costs, by strategy.

For each real model (all-MiniLM-L6-v2; SmolLM2-135M-Instruct served in float32 from its
GGUF), three copies are registered under a host budget that holds two of them
(max_host_memory = 2.5 x what one copy holds, as GET /devices reports it). Each strategy
runs in its own server: restart (the evicted model is unloaded and loaded again) and disk
(its units are streamed from disk, and promoted back beside its next request); an
unconstrained server (all three resident) is the peer, in the same invocation.

- first answer: with the server settled (nothing loading or promoting), one request to
  the model that is evicted; repeated --rounds times (each request evicts the next).
- round robin: requests cycle over the three with no pause, so every request goes to
  the model evicted last while the previous one's reload or promotion may still run:
  the steady-state cost of serving three models in room for two.

Reported per model: medians (ms), disk / restart for the first answer, and peak RssAnon
of the budgeted servers against the budget. Target: a disk-evicted model answers its
first request in <= 10 % of its restart time.

Usage: bench/devices.py [--rounds 12] [--models minilm smollm2] [--no-build]
"""
import argparse, json, os, statistics, subprocess, tempfile, threading, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target/release/spillway")
SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank today."
PROMPT = "The capital of France is"
MODELS = {
    "minilm": ("text_embedding", {"inputs": SENTENCE}),
    "smollm2": ("text_generation", {"inputs": PROMPT, "parameters": {"max_new_tokens": 1}}),
}


def run(cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout.strip()


def rss_anon_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


class Server:
    def __init__(self, store, cache, port, extra=()):
        self.port = port
        self.proc = subprocess.Popen(
            [BIN, "serve", "--model-store", store, "--cache-dir", cache, "--models", "",
             "--inference-address", f"127.0.0.1:{port}", "--management-address", f"127.0.0.1:{port + 1}",
             "--metrics-address", f"127.0.0.1:{port + 2}", *extra],
            env=dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "warn")), stdout=subprocess.DEVNULL)
        for _ in range(600):
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1).status == 200:
                    break
            except Exception:
                time.sleep(0.05)
        else:
            raise RuntimeError("server never became healthy")
        self.peak_kib = 0
        self.sampling = True
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while self.sampling:
            try:
                self.peak_kib = max(self.peak_kib, rss_anon_kib(self.proc.pid))
            except OSError:
                return
            time.sleep(0.005)

    def manage(self, method, path):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port + 1}{path}", method=method)
        return json.load(urllib.request.urlopen(req, timeout=600))

    def predict(self, model, body):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/predictions/{model}",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        t = time.perf_counter()
        answer = urllib.request.urlopen(req, timeout=600).read()
        return time.perf_counter() - t, answer

    def host_used(self):
        pools = self.manage("GET", "/devices")["pools"]
        return next(p for p in pools if p["device"] == "cpu")["used"]

    def stop(self):
        self.sampling = False
        self.proc.terminate()
        self.proc.wait()


def round_robin(server, names, body, rounds):
    """Median seconds per request over `rounds` passes of the round robin (after one warm-up
    pass), and the answers, which must not change from pass to pass."""
    times, answers = [], {}
    for i in range(rounds + 1):
        for name in names:
            took, answer = server.predict(name, body)
            if i > 0:
                times.append(took)
            if name in answers and answers[name] != answer and "generated_text" not in answer.decode():
                raise RuntimeError(f"{name} answered differently after an eviction")
            answers.setdefault(name, answer)
    return statistics.median(times)


def settle(server, names):
    """Waits until no model is loading or promoting."""
    for _ in range(2000):
        pools = server.manage("GET", "/devices")["pools"]
        busy = any(m["loading"] for p in pools for m in p["models"])
        states = [server.manage("GET", f"/models/{n}")[0]["status"] for n in names]
        if not busy and "LOADING" not in states:
            return
        time.sleep(0.01)
    raise RuntimeError("the server never settled")


def first_answers(server, names, body, rounds, state):
    """Median seconds of the first request to a model evicted to `state` ("unloaded" or
    "disk"), the server settled before each; None when no model was ever in that state."""
    times = []
    for _ in range(rounds * 3):
        settle(server, names)
        evicted = [n for n in names if server.manage("GET", f"/models/{n}")[0].get("deviceState") == state]
        if not evicted:
            # Bring every model in turn so that the next eviction happens.
            for name in names:
                server.predict(name, body)
            continue
        took, _ = server.predict(evicted[0], body)
        times.append(took)
        if len(times) == rounds:
            break
    return statistics.median(times) if times else None


def bench(model, rounds, work, port):
    handler, body = MODELS[model]
    model_dir = run([os.path.join(ROOT, "scripts/fetch-model.sh"), model])
    store = os.path.join(work, model)
    os.makedirs(store)
    names = [f"{model}-{i}" for i in (1, 2, 3)]
    for name in names:
        run([BIN, "archive", "--model-name", name, "--handler", handler, "--model-dir", model_dir,
             "--export-path", store])
    cache = os.path.join(work, "cache")
    register = lambda s, name: s.manage("POST", f"/models?url={name}.mar&synchronous=true")

    peer = Server(store, cache, port)
    register(peer, names[0])
    one = peer.host_used()
    for name in names[1:]:
        register(peer, name)
    resident = round_robin(peer, names, body, rounds)
    peer.stop()

    budget = one * 5 // 2
    row = {"model": model, "one_mib": one / 2**20, "budget_mib": budget / 2**20, "resident_ms": resident * 1e3}
    for strategy in ("restart", "disk"):
        server = Server(store, cache, port + 10,
                        ["--max-host-memory", str(budget), "--offload-strategy", strategy])
        for name in names:
            register(server, name)
        first = first_answers(server, names, body, rounds, "unloaded" if strategy == "restart" else "disk")
        row[f"{strategy}_first_ms"] = first * 1e3 if first else float("nan")
        row[f"{strategy}_rr_ms"] = round_robin(server, names, body, rounds) * 1e3
        row[f"{strategy}_peak_mib"] = server.peak_kib / 1024
        server.stop()
    row["disk_over_restart"] = row["disk_first_ms"] / row["restart_first_ms"]
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if not args.no_build:
        subprocess.run(["scripts/build-release.sh"], cwd=ROOT, check=True)
    # Its store and cache (2 GB with SmolLM2's converted weights) go when it ends.
    with tempfile.TemporaryDirectory(prefix="spillway-devices-") as work:
        rows = [bench(model, args.rounds, work, 29080 + 100 * i) for i, model in enumerate(args.models)]
    print("| model | one copy MiB | budget MiB | all resident ms | first answer restart / disk ms "
          "| disk / restart | round robin restart / disk ms | peak RssAnon restart / disk MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['one_mib']:.1f} | {r['budget_mib']:.1f} | {r['resident_ms']:.1f} "
              f"| {r['restart_first_ms']:.1f} / {r['disk_first_ms']:.1f} | {r['disk_over_restart']:.3f} "
              f"| {r['restart_rr_ms']:.1f} / {r['disk_rr_ms']:.1f} "
              f"| {r['restart_peak_mib']:.0f} / {r['disk_peak_mib']:.0f} |")
    print(f"\nMedians of {args.rounds} requests each. Target: disk / restart <= 0.10 (first answer).")


if __name__ == "__main__":
    main()
