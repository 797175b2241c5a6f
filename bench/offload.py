#!/usr/bin/env python3
"""Memory and speed of disk offload, on the real SmolLM2-135M (GGUF -> float32).

For each placement — all in RAM, half the blocks on disk, all blocks on disk, and
`device_map: auto` under max_memory {"cpu": X} with X a third of the weight bytes — it
starts the release server on that one model and measures, with the page cache warm and
cold (echo 3 > /proc/sys/vm/drop_caches, needs root):
  - forward time of a 128-token prompt (a request with max_new_tokens=1; median),
  - decode tokens/s over 32 new tokens ((t(33 tokens) - t(1 token)) / 32; median),
  - the server's RssAnon sampled every 5 ms through the run (max) and VmHWM,
and the read bandwidth of the weights file (dd, warm and cold), so each disk figure can
be set against its floor: streamed bytes / bandwidth.

Usage: bench/offload.py [--runs 5] [--no-cold]
"""
import argparse, json, os, re, shutil, statistics, subprocess, sys, tempfile, threading, time, urllib.request

from common import drop_caches, status

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target/release/spillway")
PROMPT = ("The history of the river valley is long and full of change. " * 10).strip()  # 130 tokens


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout.strip()


def dd_gbps(path):
    out = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M"], capture_output=True, text=True).stderr
    m = re.search(r"copied, ([\d.]+) s", out)
    return os.path.getsize(path) / float(m.group(1)) / 1e9


class Server:
    def __init__(self, store, cache, port):
        self.port = port
        env = dict(os.environ, RUST_LOG="warn")
        self.proc = subprocess.Popen([BIN, "serve", "--model-store", store, "--cache-dir", cache,
                                      "--inference-address", f"127.0.0.1:{port}",
                                      "--management-address", f"127.0.0.1:{port + 1}",
                                      "--metrics-address", f"127.0.0.1:{port + 2}"], env=env)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/ping").status == 200:
                    break
            except Exception:
                time.sleep(0.05)
        else:
            raise RuntimeError("server never became healthy")
        self.peak_anon = 0
        self.sampling = True
        self.sampler = threading.Thread(target=self._sample, daemon=True)
        self.sampler.start()

    def _sample(self):
        while self.sampling:
            try:
                self.peak_anon = max(self.peak_anon, status(self.proc.pid, "RssAnon:"))
            except OSError:
                return
            time.sleep(0.005)

    def generate(self, model, new_tokens):
        body = json.dumps({"inputs": PROMPT, "parameters": {"max_new_tokens": new_tokens, "details": True}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/predictions/{model}", data=body,
                                     headers={"Content-Type": "application/json"})
        t = time.perf_counter()
        answer = json.load(urllib.request.urlopen(req, timeout=600))
        return time.perf_counter() - t, answer["details"]

    def describe(self, model):
        return json.load(urllib.request.urlopen(f"http://127.0.0.1:{self.port + 1}/models/{model}"))[0]

    def stop(self):
        self.sampling = False
        hwm = status(self.proc.pid, "VmHWM:")
        self.proc.terminate()
        self.proc.wait()
        return hwm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-cold", action="store_true")
    args = ap.parse_args()
    model_dir = run([os.path.join(ROOT, "scripts/fetch-model.sh"), "smollm2"])
    subprocess.run(["scripts/build-release.sh"], cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="spillway-offload-")
    weights_mib = 513.1  # float32 SmolLM2-135M, as `spillway plan` reports it
    third = int(weights_mib / 3 * 2**20)
    layouts = {
        "ram": {"device_map": "cpu"},
        "half-disk": {"device_map": {"model.embed_tokens": "cpu", "model.layers": "cpu",
                                     **{f"model.layers.{i}": "disk" for i in range(15, 30)}, "model.norm": "cpu"}},
        "all-disk": {"device_map": {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu"}},
        "budget": {"device_map": "auto", "max_memory": {"cpu": third}, "max_length": 256},
    }
    port = 28080
    rows = []
    cold_ok = not args.no_cold and drop_caches()
    for name, setup in layouts.items():
        store = os.path.join(work, name)
        os.makedirs(store)
        with open(os.path.join(work, "setup_config.json"), "w") as f:
            # The prefix cache off: every request sends the same prompt, whose prefill is measured.
            json.dump({"prefix_cache_bytes": 0, **setup}, f)
        run([BIN, "archive", "--model-name", "smollm2", "--handler", "text_generation", "--model-dir", model_dir,
             "--extra-files", os.path.join(work, "setup_config.json"), "--export-path", store])
        server = Server(store, os.path.join(work, "cache"), port)
        d = server.describe("smollm2")
        streamed = d["placement"]["streamed_bytes_per_forward"]
        server.generate("smollm2", 2)  # warm-up
        results = {}
        for cache in (["warm", "cold"] if cold_ok else ["warm"]):
            prefill, per_token = [], []
            for _ in range(args.runs):
                if cache == "cold":
                    drop_caches()
                t1, det = server.generate("smollm2", 1)
                if cache == "cold":
                    drop_caches()
                t33, det33 = server.generate("smollm2", 33)
                assert det33["generated_tokens"] == 33, det33
                prefill.append(t1)
                per_token.append((t33 - t1) / 32)
            results[cache] = (statistics.median(prefill), statistics.median(per_token), det["prompt_tokens"])
        hwm = server.stop()
        rows.append((name, streamed, results, server.peak_anon, hwm, d["placement"]["devices"]))
        port += 10
    weights_file = [os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(work, "cache", "offload"))
                    for f in fs if f == "model.safetensors"][0]
    dd_gbps(weights_file)  # the cold runs dropped the cache: read once to warm it
    warm_bw = dd_gbps(weights_file)
    cold_bw = None
    if cold_ok:
        drop_caches()
        cold_bw = dd_gbps(weights_file)
    print(f"machine: {os.cpu_count()} cores; weights file {os.path.getsize(weights_file) / 2**20:.1f} MiB; "
          f"dd read bandwidth warm {warm_bw:.2f} GB/s" + (f", cold {cold_bw:.2f} GB/s" if cold_bw else ""))
    print(f"prompt: {rows[0][2]['warm'][2]} tokens; decode: 32 new tokens; median of {args.runs}")
    print(f"{'layout':<10} {'streamed/pass':>13} {'cache':>5} {'forward ms':>11} {'ms/token':>9} {'tok/s':>6} "
          f"{'floor ms/tok':>12} {'max RssAnon':>11} {'VmHWM':>8}")
    for name, streamed, results, anon, hwm, devices in rows:
        for cache, (prefill, per_token, _) in results.items():
            bw = warm_bw if cache == "warm" else cold_bw
            floor = rows[0][2]["warm"][1] + streamed / (bw * 1e9) if bw else float("nan")
            print(f"{name:<10} {streamed / 2**20:>10.1f}MiB {cache:>5} {prefill * 1000:>11.1f} {per_token * 1000:>9.1f} "
                  f"{1 / per_token:>6.1f} {floor * 1000:>12.1f} {anon / 2**20:>9.1f}Mi {hwm / 2**20:>6.0f}Mi")
    budget = [r for r in rows if r[0] == "budget"][0]
    cpu = [d for d in budget[5] if d["device"] == "cpu"][0]
    print(f"budget run: max_memory cpu = {third / 2**20:.1f} MiB (a third of the weights); plan: weights "
          f"{cpu['weights'] / 2**20:.1f} MiB + reserve {cpu['reserve'] / 2**20:.1f} MiB on cpu; "
          f"max RssAnon {budget[3] / 2**20:.1f} MiB")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
