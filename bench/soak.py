#!/usr/bin/env python3
"""Soak: mixed load on three real models for --minutes (default 10), and the server must
come out of it whole.

Models: all-MiniLM-L6-v2 resident (`minilm`), the same with every block streamed from disk
(`minilm_disk`), SmolLM2-135M-Instruct from its Q4_1 GGUF (`smollm2`, continuous
batching). Load:
- clients at concurrencies 1, 4 and 8 (embeddings) and 2 (generation), 10 % of their
  requests bad (malformed JSON, wrong types, empty inputs, unknown models, huge
  max_new_tokens, NaN temperature, wrong content type);
- clients that send a whole request and hang up before the answer (5 % of requests);
- churn every few seconds: a fourth model registered and unregistered, `minilm` scaled
  between 1 and 2 workers.

Checked (the run fails otherwise): every request a client completed got exactly one
well-formed answer (good ones 200 with the right shape, bad ones a JSON 4xx), no
connection was lost on a client that waited, the server's own count of prediction
answers is at least the answers the clients read, RSS and open file descriptors end
where they started after warm-up (within 15 % / 8 fds), and the log holds no error but
those expected. Writes the figures to BENCHMARKS.md ("Soak").

    python3 bench/soak.py [--minutes 10] [--port 18400]
Needs target/release/spillway (scripts/build-release.sh) and the models
(scripts/fetch-model.sh minilm, scripts/fetch-model.sh smollm2)."""
import argparse, http.client, json, os, random, re, shutil, socket, subprocess, sys, tempfile, threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import status, write_section  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target/release/spillway")

GOOD = {
    "minilm": b'{"inputs": ["the quick brown fox", "a soak test of the server"]}',
    "minilm_disk": b'{"inputs": ["hello world"]}',
    "smollm2": b'{"inputs": "The capital of France is", "parameters": {"max_new_tokens": 8}}',
}
BAD = [
    (b'{"inputs": ["unterminated', "application/json"),
    (b'{"inputs": 42}', "application/json"),
    (b'{"inputs": []}', "application/json"),
    (b'\xff\xfe\xfd', "application/json"),
    (b'{"inputs": "x", "parameters": {"max_new_tokens": 100000000}}', "application/json"),
    (b'{"inputs": "x", "parameters": {"temperature": NaN}}', "application/json"),
    (b'<xml/>', "application/xml"),
]


def fetch(name):
    return subprocess.run([os.path.join(ROOT, "scripts/fetch-model.sh"), name], check=True,
                          capture_output=True, text=True).stdout.strip().splitlines()[-1]


def archive(store, name, handler, model_dir, setup=None, yaml=None):
    extra = []
    work = tempfile.mkdtemp()
    if setup:
        path = os.path.join(work, "setup_config.json")
        with open(path, "w") as f:
            json.dump(setup, f)
        extra += ["--extra-files", path]
    if yaml:
        path = os.path.join(work, "model-config.yaml")
        with open(path, "w") as f:
            f.write(yaml)
        extra += ["--config-file", path]
    subprocess.run([BIN, "archive", "--model-name", name, "--version", "1.0", "--handler", handler,
                    "--model-dir", model_dir, "--export-path", store, "--force", *extra],
                   check=True, capture_output=True)


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}
        self.failures = []

    def add(self, key, failure=None):
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + 1
            if failure and len(self.failures) < 20:
                self.failures.append(failure)


def request(port, method, path, body=None, content_type="application/json", timeout=120):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": content_type} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def client(port, model, stop, tally, seed):
    rng = random.Random(seed)
    while not stop.is_set():
        roll = rng.random()
        if roll < 0.05:
            # Hangs up as soon as the request is sent.
            s = socket.create_connection(("127.0.0.1", port))
            body = GOOD[model]
            s.sendall(f"POST /predictions/{model} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            s.close()
            tally.add("disconnected")
            continue
        bad = roll < 0.15
        body, content_type = rng.choice(BAD) if bad else (GOOD[model], "application/json")
        target = model if rng.random() > 0.02 else "no_such_model"
        try:
            code, answer = request(port, "POST", f"/predictions/{target}", body, content_type)
        except Exception as e:  # a lost answer
            tally.add("lost", f"{model}: {e!r}")
            continue
        try:
            value = json.loads(answer)
        except ValueError:
            tally.add("malformed", f"{model} {code}: {answer[:200]!r}")
            continue
        if target != model:
            ok = code == 404 and isinstance(value, dict) and "message" in value
            tally.add("unknown model answered 404" if ok else "wrong answer",
                      None if ok else f"unknown model: {code} {answer[:200]!r}")
        elif bad:
            if 400 <= code < 500 and isinstance(value, dict) and "message" in value:
                tally.add("bad answered 4xx")
            elif code == 200:
                # Lenient where the API is (one string where a list is usual, a limit
                # clamped): still one well-formed answer.
                tally.add("bad answered 200")
            else:
                tally.add("wrong answer", f"bad {body[:40]!r} to {target}: {code} {answer[:200]!r}")
        elif code == 200:
            ok = (isinstance(value, list) and len(value) > 0) or "generated_text" in value
            tally.add("good answered 200" if ok else "wrong answer", None if ok else f"{model}: {answer[:200]!r}")
        elif code == 503:
            tally.add("good answered 503 (busy)")
        else:
            tally.add("wrong answer", f"good to {model}: {code} {answer[:200]!r}")


def churn(port, stop, tally):
    n = 0
    while not stop.wait(3):
        n += 1
        name = f"churn{n}"
        code, body = request(port + 1, "POST", f"/models?url=minilm.mar&model_name={name}&synchronous=true")
        tally.add(f"churn register {code}", None if code == 200 else body[:200])
        code, body = request(port, "POST", f"/predictions/{name}", GOOD["minilm"])
        tally.add(f"churn predict {code}", None if code == 200 else body[:200])
        code, body = request(port + 1, "DELETE", f"/models/{name}")
        tally.add(f"churn unregister {code}", None if code == 200 else body[:200])
        workers = 1 + n % 2
        code, body = request(port + 1, "PUT", f"/models/minilm?min_worker={workers}&max_worker={workers}")
        tally.add(f"churn scale {code}", None if code in (200, 202) else body[:200])


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def prediction_answers(port):
    _, text = request(port + 2, "GET", "/metrics")
    total = 0
    for line in text.decode().splitlines():
        if line.startswith("ts_inference_requests_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--port", type=int, default=18400)
    ap.add_argument("--clients", default="minilm:1,minilm:4,minilm:8,minilm_disk:2,smollm2:2",
                    help="MODEL:CONCURRENCY,... (to narrow a problem down)")
    ap.add_argument("--no-churn", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md alone")
    args = ap.parse_args()
    minilm, smollm2 = fetch("minilm"), fetch("smollm2")
    work = tempfile.mkdtemp(prefix="spillway-soak-")
    store, cache = os.path.join(work, "store"), os.path.join(work, "cache")
    os.makedirs(store)
    archive(store, "minilm", "text_embedding", minilm, yaml="batchSize: 8\nmaxBatchDelay: 5\n")
    archive(store, "minilm_disk", "text_embedding", minilm, setup={"device_map": "disk"})
    archive(store, "smollm2", "text_generation", smollm2,
            yaml="batchSize: 4\ncontinuousBatching: true\nmaxBatchDelay: 5\n")
    log_path = os.path.join(work, "server.log")
    log = open(log_path, "w")
    port = args.port
    server = subprocess.Popen([BIN, "serve", "--model-store", store, "--cache-dir", cache,
                               "--inference-address", f"127.0.0.1:{port}",
                               "--management-address", f"127.0.0.1:{port + 1}",
                               "--metrics-address", f"127.0.0.1:{port + 2}"],
                              stdout=log, stderr=log, env=dict(os.environ, RUST_LOG="info"))
    deadline = time.time() + 300
    while True:
        try:
            if request(port, "GET", "/ping")[0] == 200 and all(
                    request(port, "POST", f"/predictions/{m}", GOOD[m])[0] == 200 for m in GOOD):
                break
        except OSError:
            pass
        if time.time() > deadline or server.poll() is not None:
            sys.exit(f"the server did not come up; log: {log_path}")
        time.sleep(0.5)

    tally, stop = Tally(), threading.Event()
    threads = []
    for spec in args.clients.split(","):
        model, concurrency = spec.split(":")
        for i in range(int(concurrency)):
            threads.append(threading.Thread(target=client, args=(port, model, stop, tally, len(threads))))
    if not args.no_churn:
        threads.append(threading.Thread(target=churn, args=(port, stop, tally)))
    for t in threads:
        t.start()
    samples = []  # (seconds, rss bytes, fds)
    started = time.time()
    warm = 30
    while time.time() - started < args.minutes * 60:
        time.sleep(5)
        if server.poll() is not None:
            stop.set()
            sys.exit(f"the server died (exit {server.returncode}); log: {log_path}")
        samples.append((time.time() - started, status(server.pid, "VmRSS:"), fds(server.pid)))
        if len(samples) % 6 == 0:
            print(f"{samples[-1][0]:5.0f} s: RSS {samples[-1][1] / 2**20:.0f} MiB "
                  f"(anonymous {status(server.pid, 'RssAnon:') / 2**20:.0f}, "
                  f"file {status(server.pid, 'RssFile:') / 2**20:.0f}), {samples[-1][2]} fds",
                  flush=True)
    stop.set()
    for t in threads:
        t.join()
    time.sleep(1)
    served = prediction_answers(port)
    end_rss, end_fds = status(server.pid, "VmRSS:"), fds(server.pid)
    server.terminate()
    server.wait(timeout=60)
    log.close()

    steady = [s for s in samples if s[0] >= warm] or samples
    start_rss, start_fds = steady[0][1], steady[0][2]
    max_rss, max_fds = max(s[1] for s in steady), max(s[2] for s in steady)
    with open(log_path) as f:
        lines = f.read().splitlines()
    errors = [l for l in lines if " ERROR " in l]
    panics = [l for l in lines if "panicked" in l]
    # The server counts answers per model: those to an unknown model have none.
    answered = sum(v for k, v in tally.counts.items() if k.startswith(("good", "bad")))
    mib = lambda b: f"{b / 2**20:.0f} MiB"
    churned = "" if args.no_churn else " + churn"
    clients = len(threads) - (0 if args.no_churn else 1)
    rows = [("duration", f"{args.minutes:g} min ({clients} clients{churned})"),
            *[(k, str(v)) for k, v in sorted(tally.counts.items())],
            ("prediction answers counted by the server", f"{served:.0f}"),
            ("RSS start / max / end", f"{mib(start_rss)} / {mib(max_rss)} / {mib(end_rss)}"),
            ("open fds start / max / end", f"{start_fds} / {max_fds} / {end_fds}"),
            ("ERROR lines in the log", str(len(errors))),
            ("panics", str(len(panics)))]
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    print(table)
    for failure in tally.failures:
        print("failure:", failure)
    for line in sorted(set(re.sub(r"^\S+\s+", "", l) for l in errors))[:20]:
        print("log:", line)
    problems = []
    if tally.counts.get("lost") or tally.counts.get("malformed") or tally.counts.get("wrong answer"):
        problems.append("requests lost or answered wrongly")
    if served < answered:
        problems.append(f"the server counted {served:.0f} answers, the clients read {answered} from its models")
    if end_rss > start_rss * 1.15 or end_fds > start_fds + 8:
        problems.append("RSS or fds grew")
    if panics:
        problems.append("panics in the log")
    if not args.no_write:
        write_section("Soak", f"`python3 bench/soak.py --minutes {args.minutes:g}` on {os.cpu_count()} cores: "
                      "MiniLM resident and streamed from disk, SmolLM2 Q4_1 with continuous batching; "
                      "10 % bad requests, 5 % clients hanging up, a model registered, used and "
                      "unregistered and MiniLM rescaled every 3 s.\n\n" + table + "\n\n"
                      + ("All checks passed." if not problems else "FAILED: " + "; ".join(problems)))
    if problems:
        sys.exit(f"{'; '.join(problems)} (the store, cache and server log are kept in {work})")
    # The store and cache hold copies of the models (~360 MB): gone after a clean run.
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
