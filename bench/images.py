#!/usr/bin/env python3
"""TorchServe's quickstart against Spillway on the same archive (issue 35).

Builds the quickstart's DenseNet-161 archive with the real torch-model-archiver from
PyPI: random weights (torchvision's init, seed 0) saved with the legacy key names of the
published densenet161-8d451a50.pth, a model.py that renames them as TorchServe's example
does, index_to_name.json from torchvision's ImageNet categories, handler image_classifier.
Serves it with TorchServe 0.12 (PyPI; Java 17) and with Spillway's release binary, checks
both answers against torchvision's for the same image, and measures images/s and p50/p99
latency of `PUT /predictions/densenet161` (curl -T's request) at 1, 2 and 8 connections,
each engine in turn in one run, plus each one's cold start: process start to the first
answer (Spillway's first start converts the .pth once; its second start reuses that).

Run (downloads torch, torchvision, torchserve into the bench venv once; needs java):
  scripts/build-release.sh && python3 bench/images.py [--seconds 20] [--no-write]
"""
import argparse, http.client, json, os, shutil, statistics, subprocess, sys, tempfile, threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ROOT, VENV, in_threads, write_section  # noqa: E402

CONNECTIONS = (1, 2, 8)
MODEL = "densenet161"

MAKE = r'''
import json, re, sys, torch, torchvision
from torchvision import transforms
from PIL import Image
import numpy as np
work = sys.argv[1]
torch.manual_seed(0)
model = torchvision.models.densenet161(weights=None).eval()
# As the published file: legacy names, and no num_batches_tracked (it predates them).
legacy = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
          for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
torch.save(legacy, f"{work}/densenet161-8d451a50.pth")
categories = torchvision.models.DenseNet161_Weights.IMAGENET1K_V1.meta["categories"]
json.dump({str(i): [f"n{i:08d}", c] for i, c in enumerate(categories)},
          open(f"{work}/index_to_name.json", "w"))
# A photo-sized JPEG (TorchServe's kitten_small.jpg is not shipped here): smooth shapes.
y, x = np.mgrid[0:375, 0:500].astype(np.float64)
rgb = np.stack([127 + 100 * np.sin(x / 31) * np.cos(y / 17), 255 * x / 500,
                127 + 120 * np.cos(np.hypot(x - 300, y - 150) / 13)], -1)
Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(f"{work}/kitten_small.jpg", quality=90)
t = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
with torch.no_grad():
    p = torch.softmax(model(t(Image.open(f"{work}/kitten_small.jpg").convert("RGB")).unsqueeze(0)), 1)[0]
top = torch.topk(p, 5)
json.dump({categories[i]: float(v) for v, i in zip(top.values.tolist(), top.indices.tolist())},
          open(f"{work}/reference.json", "w"))
'''

MODEL_PY = '''from torchvision.models.densenet import DenseNet


class ImageClassifier(DenseNet):
    """DenseNet-161 taking the published checkpoint's legacy names (norm.1 -> norm1)."""

    def __init__(self):
        super().__init__(48, (6, 12, 36, 24), 96)

    def load_state_dict(self, state_dict, strict=True):
        import re
        pattern = re.compile(r"^(.*denselayer\\d+\\.(?:norm|relu|conv))\\.((?:[12])\\.(?:weight|bias|running_mean|running_var))$")
        state_dict = {(m.group(1) + m.group(2) if (m := pattern.match(k)) else k): v
                      for k, v in state_dict.items()}
        return super().load_state_dict(state_dict, strict)
'''


def venv():
    py = os.path.join(VENV, "bin/python")
    if not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    probe = "import torch, torchvision, PIL, ts, model_archiver, captum"
    if subprocess.run([py, "-c", probe], capture_output=True).returncode:
        subprocess.run([py, "-m", "pip", "install", "--quiet", "torch", "torchvision", "pillow",
                        "torchserve==0.12.0", "torch-model-archiver==0.12.0", "nvgpu", "captum"],
                       check=True)
    return py


def archive(py, work):
    """The quickstart's files and densenet161.mar in work/store; torchvision's answer."""
    subprocess.run([py, "-c", MAKE, work], check=True)
    with open(f"{work}/model.py", "w") as f:
        f.write(MODEL_PY)
    store = f"{work}/store"
    os.makedirs(store, exist_ok=True)
    archiver = os.path.join(os.path.dirname(py), "torch-model-archiver")
    subprocess.run([archiver, "--model-name", MODEL, "--version", "1.0", "--model-file", "model.py",
                    "--serialized-file", "densenet161-8d451a50.pth", "--handler", "image_classifier",
                    "--extra-files", "index_to_name.json", "--export-path", store, "--force"],
                   check=True, cwd=work)
    return store, json.load(open(f"{work}/reference.json"))


def put(port, image):
    """(seconds, status, body) of curl -T's request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t = time.perf_counter()
    conn.request("PUT", f"/predictions/{MODEL}", body=image)
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return time.perf_counter() - t, r.status, body


def first_answer(port, image, proc, timeout=600):
    """Seconds until the first 200 answer (the model loaded and warm)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("the server exited")
        try:
            _, status, body = put(port, image)
            if status == 200:
                return time.perf_counter() - start, json.loads(body)
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("no answer")


def load(port, image, connections, seconds):
    """images/s and latencies (s) with `connections` clients PUTting for `seconds`."""
    latencies, errors, lock = [], [], threading.Lock()
    deadline = time.perf_counter() + seconds

    def client():
        while time.perf_counter() < deadline:
            dt, status, body = put(port, image)
            with lock:
                (latencies if status == 200 else errors).append(dt if status == 200 else body)

    wall = in_threads(client, connections)
    if errors:
        raise RuntimeError(f"{len(errors)} errors, e.g. {errors[0][:200]}")
    latencies.sort()
    pct = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
    return {"images_per_s": len(latencies) / wall, "p50": statistics.median(latencies),
            "p99": pct(0.99), "n": len(latencies)}


def agreement(answer, reference):
    """The largest probability difference over the reference's top 5, and whether the
    labels come in the same order."""
    same = list(answer)[:5] == list(reference)
    worst = max(abs(answer.get(k, 0.0) - v) for k, v in reference.items())
    return same, worst


def run_torchserve(py, work, store, image, seconds, port):
    config = f"{work}/config.properties"
    with open(config, "w") as f:
        f.write(f"inference_address=http://127.0.0.1:{port}\nmanagement_address=http://127.0.0.1:{port + 1}\n"
                f"metrics_address=http://127.0.0.1:{port + 2}\ndisable_token_authorization=true\n"
                f"enable_envvars_config=true\n")
    bin_dir = os.path.dirname(py)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TS_DISABLE_TOKEN_AUTHORIZATION="true")
    started = time.perf_counter()
    subprocess.run([f"{bin_dir}/torchserve", "--start", "--ncs", "--model-store", store, "--models",
                    f"{MODEL}={MODEL}.mar", "--ts-config", config, "--disable-token-auth"],
                   check=True, env=env, cwd=work, stdout=subprocess.DEVNULL)
    try:
        _, answer = first_answer(port, image, None)
        cold = time.perf_counter() - started
        results = {c: load(port, image, c, seconds) for c in CONNECTIONS}
    finally:
        subprocess.run([f"{bin_dir}/torchserve", "--stop"], env=env, stdout=subprocess.DEVNULL)
        time.sleep(3)
    return cold, answer, results


def run_spillway(binary, work, store, image, seconds, port):
    cache = f"{work}/spillway-cache"
    colds = []
    for start in ("first start (converts the .pth)", "second start (conversion cached)"):
        t = time.perf_counter()
        proc = subprocess.Popen([binary, "serve", "--model-store", store, "--cache-dir", cache,
                                 "--models", f"{MODEL}={MODEL}.mar",
                                 "--inference-address", f"127.0.0.1:{port}",
                                 "--management-address", f"127.0.0.1:{port + 1}",
                                 "--metrics-address", f"127.0.0.1:{port + 2}"],
                                env=dict(os.environ, RUST_LOG="warn"))
        try:
            _, answer = first_answer(port, image, proc)
            colds.append((start, time.perf_counter() - t))
            if start.startswith("second"):
                results = {c: load(port, image, c, seconds) for c in CONNECTIONS}
        finally:
            proc.terminate()
            proc.wait()
    return colds, answer, results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0, help="per connection count and engine")
    ap.add_argument("--binary", default=os.path.join(ROOT, "target/release/spillway"))
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
    args = ap.parse_args()
    if not shutil.which("java"):
        sys.exit("TorchServe needs java (Debian: openjdk-17-jre-headless)")
    py = venv()
    work = tempfile.mkdtemp(prefix="spillway-images-")
    store, reference = archive(py, work)
    image = open(f"{work}/kitten_small.jpg", "rb").read()
    ts_cold, ts_answer, ts = run_torchserve(py, work, store, image, args.seconds, 18080)
    sw_colds, sw_answer, sw = run_spillway(args.binary, work, store, image, args.seconds, 18090)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    amx = "amx_bf16" in open("/proc/cpuinfo").read()
    lines = [f"Host: {os.cpu_count()} vCPU {cpu}{' with AMX' if amx else ', no AMX'}. "
             f"DenseNet-161 (random weights, legacy key names), `PUT /predictions/{MODEL}` of a "
             f"{len(image) // 1024} KiB 500x375 JPEG, float32, {args.seconds:.0f} s per row. "
             f"Command: `python3 bench/images.py`.", ""]
    for name, answer in (("TorchServe 0.12", ts_answer), ("Spillway", sw_answer)):
        same, worst = agreement(answer, reference)
        lines.append(f"- {name} against torchvision: top-5 labels {'in the same order' if same else 'DIFFER'}, "
                     f"largest probability difference {worst:.1e}")
    lines.append(f"- cold start to the first answer: TorchServe {ts_cold:.1f} s; Spillway " +
                 ", ".join(f"{s} {t:.2f} s" for s, t in sw_colds))
    lines += ["", "| connections | TorchServe images/s | p50 | p99 | Spillway images/s | p50 | p99 | images/s ratio |",
              "|---|---|---|---|---|---|---|---|"]
    for c in CONNECTIONS:
        a, b = ts[c], sw[c]
        lines.append(f"| {c} | {a['images_per_s']:.2f} | {a['p50'] * 1000:.0f} ms | {a['p99'] * 1000:.0f} ms "
                     f"| {b['images_per_s']:.2f} | {b['p50'] * 1000:.0f} ms | {b['p99'] * 1000:.0f} ms "
                     f"| {b['images_per_s'] / a['images_per_s']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_section("Images against TorchServe (DenseNet-161 quickstart)", table)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
