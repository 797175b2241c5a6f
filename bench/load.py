#!/usr/bin/env python3
"""Load benchmark: the release server under a closed-loop load at 1, 8 and 32 connections.

Scenarios, each in its own server process so they do not share cores or queues:
  echo                 the built-in echo handler: the server's own overhead
  minilm batch 1       all-MiniLM-L6-v2, batchSize 1
  minilm batch 8       all-MiniLM-L6-v2, batchSize 8, maxBatchDelay 5 ms
  ... 2 workers        the same two MiniLM scenarios with 2 workers sharing the weights,
                       1 thread each (the default threadsPerWorker: cores / maxWorkers);
                       TorchServe's figures in the issue are 2 workers x 1 thread
  smollm2 batches      SmolLM2-135M-Instruct (GGUF), 32 new tokens per request
                       (ignore_eos), batchSize 8: a batch's requests run one by one
  smollm2 continuous   the same with continuousBatching: requests join and leave a
                       running batch of up to 8 between decode steps
  torchserve echo      the peer (with --torchserve): TorchServe 0.12 serving a Python echo
                       handler (the body back), --torchserve-workers workers (default 4,
                       its best here of 2, 4, 8) and batch size 1, in the same run; the echo
                       rows' ratio to it is printed
Load comes from server/examples/loadgen.rs (keep-alive HTTP/1.1, one request in flight
per connection). Also reports the server's idle RSS with MiniLM loaded after warm-up.
--torchserve needs java and installs torchserve into the bench venv (SPILLWAY_BENCH_VENV)
once.
Prints a Markdown table and writes it, with the machine and the command, to
BENCHMARKS.md's Load section (unless --no-write).

SmolLM2 rows run --generation-seconds (default 30): at ~5 requests/s a 10 s window
counts only a few groups of 8, so its requests/s moves by a whole group between runs.

Usage: bench/load.py [--seconds 10] [--generation-seconds 30] [--concurrency 1 8 32]
                     [--loadgen-threads 1] [--torchserve [--torchserve-workers 4]]
                     [--no-write]
"""
import argparse, json, os, platform, shutil, subprocess, sys, tempfile, time, urllib.request

from common import VENV, write_section

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target/release/spillway")
LOADGEN = os.path.join(ROOT, "target/release/examples/loadgen")
SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank today."
NEW_TOKENS = 32


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, **kw).stdout.strip()


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    def __init__(self, store, cache, port):
        self.port = port
        self.proc = subprocess.Popen(
            [BIN, "serve", "--model-store", store, "--cache-dir", cache,
             "--inference-address", f"127.0.0.1:{port}",
             "--management-address", f"127.0.0.1:{port + 1}",
             "--metrics-address", f"127.0.0.1:{port + 2}"],
            env=dict(os.environ, RUST_LOG="warn"), stdout=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1) as r:
                    if json.load(r)["status"] == "Healthy":
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server did not become healthy")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def archive(store, name, handler, config, model_dir=None):
    cfg = os.path.join(store, f"{name}.yaml")
    with open(cfg, "w") as f:
        f.write(config)
    cmd = [BIN, "archive", "--model-name", name, "--version", "1.0", "--handler", handler,
           "--config-file", cfg, "--export-path", store, "--force"]
    if model_dir:
        cmd += ["--model-dir", model_dir]
    sh(cmd)
    os.remove(cfg)


# TorchServe's handler for the peer's echo: each request's body back, as the built-in echo.
ECHO_HANDLER = """
def handle(data, context):
    if data is None:
        return None
    return [row.get("body") if row.get("body") is not None else row.get("data") for row in data]
"""


class TorchServe:
    """TorchServe 0.12 from the bench venv serving `echo` (ECHO_HANDLER) on PORT (inference),
    PORT+1 and PORT+2, with `workers` workers; returns once it answers."""

    def __init__(self, work, port, workers, body_file):
        py = os.path.join(VENV, "bin/python")
        if subprocess.run([py, "-c", "import ts, model_archiver"], capture_output=True).returncode:
            if not os.path.exists(py):
                subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
            subprocess.run([py, "-m", "pip", "install", "--quiet", "torchserve==0.12.0",
                            "torch-model-archiver==0.12.0", "nvgpu"], check=True)
        self.bin = os.path.dirname(py)
        self.env = dict(os.environ, PATH=f"{self.bin}:{os.environ['PATH']}",
                        TS_DISABLE_TOKEN_AUTHORIZATION="true")
        ts = os.path.join(work, "torchserve")
        store = os.path.join(ts, "store")
        os.makedirs(store)
        with open(os.path.join(ts, "echo_handler.py"), "w") as f:
            f.write(ECHO_HANDLER)
        subprocess.run([f"{self.bin}/torch-model-archiver", "--model-name", "echo", "--version", "1.0",
                        "--handler", "echo_handler.py", "--export-path", store, "--force"],
                       check=True, cwd=ts)
        config = os.path.join(ts, "config.properties")
        with open(config, "w") as f:
            f.write(f"inference_address=http://127.0.0.1:{port}\n"
                    f"management_address=http://127.0.0.1:{port + 1}\n"
                    f"metrics_address=http://127.0.0.1:{port + 2}\n"
                    f"default_workers_per_model={workers}\ndisable_token_authorization=true\n")
        subprocess.run([f"{self.bin}/torchserve", "--start", "--ncs", "--model-store", store,
                        "--models", "echo=echo.mar", "--ts-config", config, "--disable-token-auth"],
                       check=True, env=self.env, cwd=ts, stdout=subprocess.DEVNULL)
        with open(body_file, "rb") as f:
            body = f.read()
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/predictions/echo", data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=5) as r:
                    if json.loads(r.read()) == json.loads(body):
                        return
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError("TorchServe did not answer the echo")

    def stop(self):
        subprocess.run([f"{self.bin}/torchserve", "--stop"], env=self.env, stdout=subprocess.DEVNULL)
        time.sleep(3)


def load(port, model, body_file, concurrency, seconds, threads):
    out = sh([LOADGEN, f"http://127.0.0.1:{port}/predictions/{model}", body_file,
              str(concurrency), str(seconds), str(threads)])
    return json.loads(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--generation-seconds", type=float, default=30, help="seconds per SmolLM2 row")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--loadgen-threads", type=int, default=1)
    ap.add_argument("--only", nargs="+",
                    help="scenario names to run (echo, minilm1, minilm8, minilm1x2, minilm8x2, smollm2, smollm2cb)")
    ap.add_argument("--skip", nargs="+", help="scenario names not to run")
    ap.add_argument("--torchserve", action="store_true",
                    help="also run TorchServe's echo (the peer) and print the echo rows' ratio to it")
    ap.add_argument("--torchserve-workers", type=int, default=4,
                    help="the peer's workers (default 4: its best here; 2 and 8 served fewer)")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()

    sh(["scripts/build-release.sh"])
    sh(["cargo", "build", "--release", "-p", "spillway", "--example", "loadgen"])
    minilm = sh(["scripts/fetch-model.sh", "minilm"])
    smollm2 = sh(["scripts/fetch-model.sh", "smollm2"]) if not a.only or {"smollm2", "smollm2cb"} & set(a.only) else None
    work = tempfile.mkdtemp(prefix="spillway-load-")
    body = os.path.join(work, "body.json")
    with open(body, "w") as f:
        json.dump({"inputs": [SENTENCE]}, f)
    prompt = os.path.join(work, "prompt.json")
    with open(prompt, "w") as f:
        json.dump({"inputs": "Write a short story about a river.",
                   "parameters": {"max_new_tokens": NEW_TOKENS, "ignore_eos": True}}, f)
    one = "minWorkers: 1\nmaxWorkers: 1\nresponseTimeout: 120\n"
    two = "minWorkers: 2\nmaxWorkers: 2\nresponseTimeout: 120\n"
    scenarios = [
        ("echo", "echo", "echo", one + "batchSize: 1\nmaxBatchDelay: 0\n", None, body),
        ("minilm batch 1", "minilm1", "text_embedding", one + "batchSize: 1\nmaxBatchDelay: 0\n", minilm, body),
        ("minilm batch 8, 5 ms", "minilm8", "text_embedding", one + "batchSize: 8\nmaxBatchDelay: 5\n", minilm, body),
        ("minilm batch 1, 2 workers", "minilm1x2", "text_embedding", two + "batchSize: 1\nmaxBatchDelay: 0\n",
         minilm, body),
        ("minilm batch 8, 5 ms, 2 workers", "minilm8x2", "text_embedding", two + "batchSize: 8\nmaxBatchDelay: 5\n",
         minilm, body),
        ("smollm2 batches of 8", "smollm2", "text_generation", one + "batchSize: 8\nmaxBatchDelay: 5\n", smollm2, prompt),
        ("smollm2 continuous, 8", "smollm2cb", "text_generation",
         one + "batchSize: 8\nmaxBatchDelay: 5\ncontinuousBatching: true\n", smollm2, prompt),
    ]
    rows, idle_rss = [], None
    try:
        for label, name, handler, config, model_dir, request in scenarios:
            if a.only and name not in a.only:
                continue
            if a.skip and name in a.skip:
                continue
            store = os.path.join(work, name)
            os.makedirs(store)
            archive(store, name, handler, config, model_dir)
            server = Server(store, os.path.join(work, "cache"), 18080)
            try:
                load(18080, name, request, 4, 1, a.loadgen_threads)  # warm-up
                if name == "minilm8":
                    time.sleep(1)
                    idle_rss = rss_mib(server.proc.pid)
                for c in a.concurrency:
                    seconds = a.generation_seconds if name.startswith("smollm2") else a.seconds
                    r = load(18080, name, request, c, seconds, a.loadgen_threads)
                    rows.append((label, r))
                    print(f"{label:>31} c={c:<3} {r['requests_per_s']:>9.2f} req/s  p50 {r['p50_ms']:.3f}  "
                          f"p90 {r['p90_ms']:.3f}  p99 {r['p99_ms']:.3f} ms  {r['statuses']} errors {r['errors']}",
                          file=sys.stderr)
            finally:
                server.stop()
        if a.torchserve:
            peer = TorchServe(work, 18080, a.torchserve_workers, body)
            try:
                # Warm-up: the JVM's JIT takes seconds to settle (after a 1 s warm-up one
                # run here served less than half its usual 1-connection rate).
                load(18080, "echo", body, 32, 5, a.loadgen_threads)
                for c in a.concurrency:
                    r = load(18080, "echo", body, c, a.seconds, a.loadgen_threads)
                    rows.append((f"torchserve echo, {a.torchserve_workers} workers", r))
                    print(f"{'torchserve echo':>31} c={c:<3} {r['requests_per_s']:>9.2f} req/s  "
                          f"p50 {r['p50_ms']:.3f}  p99 {r['p99_ms']:.3f} ms  {r['statuses']}", file=sys.stderr)
            finally:
                peer.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    cpu = sh(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"]).strip()
    lines = [
        f"Machine: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
        f"server and load generator on the same cores.",
        f"Command: `bench/load.py --seconds {a.seconds:g} --generation-seconds {a.generation_seconds:g} "
        f"--concurrency {' '.join(map(str, a.concurrency))} "
        f"--loadgen-threads {a.loadgen_threads}"
        f"{f' --torchserve --torchserve-workers {a.torchserve_workers}' if a.torchserve else ''}` "
        f"({time.strftime('%Y-%m-%d')}; release build with MKL, "
        f"keep-alive connections, {a.seconds:g} s per row ({a.generation_seconds:g} s for SmolLM2) after a warm-up).",
        "",
        f"SmolLM2 rows: {NEW_TOKENS} new tokens per request, so tokens/s = {NEW_TOKENS} × requests/s.",
        "",
        "| scenario | connections | requests/s | p50 ms | p90 ms | p99 ms | statuses |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in rows:
        statuses = ", ".join(f"{k}: {v}" for k, v in r["statuses"].items())
        if r["errors"]:
            statuses += f", connection errors: {r['errors']}"
        rps = r["requests_per_s"]
        rps = f"{rps:.0f}" if rps >= 100 else f"{rps:.2f}"
        lines.append(f"| {label} | {r['concurrency']} | {rps} | {r['p50_ms']:.3f} | "
                     f"{r['p90_ms']:.3f} | {r['p99_ms']:.3f} | {statuses} |")
    echo = {r["concurrency"]: r for label, r in rows if label == "echo"}
    peer = {r["concurrency"]: r for label, r in rows if label.startswith("torchserve echo")}
    if echo and peer:
        lines += ["", "Echo against TorchServe's (same run): " + "; ".join(
            f"{c} connection{'s' if c > 1 else ''} {echo[c]['requests_per_s'] / peer[c]['requests_per_s']:.1f}x "
            f"its requests/s, "
            f"p50 {echo[c]['p50_ms']:.3f} vs {peer[c]['p50_ms']:.3f} ms"
            for c in a.concurrency if c in echo and c in peer) + "."]
    if idle_rss is not None:
        lines += ["", f"Idle RSS serving MiniLM (after warm-up): {idle_rss:.0f} MiB."]
    table = "\n".join(lines)
    print(table)
    if not a.no_write:
        write_section("Load", table)


if __name__ == "__main__":
    main()
