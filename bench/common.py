"""What the benchmarks share: `spillway serve` as a child process on its three ports, the
kernel's page cache, and a process's memory figures."""
import json, os, subprocess, sys, time, urllib.error, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The Python peers' venv (torch, transformers, onnxruntime from PyPI), shared by the
# benchmarks that run them.
VENV = os.environ.get("SPILLWAY_BENCH_VENV",
                      os.path.join(os.path.expanduser("~"), ".cache/spillway/bench-venv"))


def sh(cmd, env=None):
    """A command's stdout, run from the repository root; fails on a non-zero exit."""
    return subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT,
                          env=env).stdout.strip()


def venv_python(packages):
    """The bench venv's python, made once, with `packages` (import names = PyPI names)
    installed where missing."""
    py = os.path.join(VENV, "bin/python")
    if not os.path.exists(py):
        print(f"making {VENV} ({', '.join(packages)} from PyPI; minutes, once)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    if subprocess.run([py, "-c", "import " + ", ".join(packages)], capture_output=True).returncode:
        subprocess.run([py, "-m", "pip", "install", "--quiet", *packages], check=True)
    return py


def in_threads(target, count):
    """Runs `target` in `count` threads at once; the wall seconds until all return."""
    import threading
    started = time.perf_counter()
    threads = [threading.Thread(target=target) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started


def drop_caches():
    """Empties the page cache (needs root); whether it could."""
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def status(pid, key):
    """A /proc/PID/status figure in bytes (VmHWM:, RssAnon:, ...); 0 when absent."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


class Server:
    """`binary serve` on PORT (inference), PORT+1 (management), PORT+2 (metrics); `args` are
    added to its command line. Returns once /ping answers."""

    def __init__(self, binary, store, cache, port, args=(), timeout=300):
        self.port = port
        self.proc = subprocess.Popen([binary, "serve", "--model-store", store, "--cache-dir", cache,
                                      "--inference-address", f"127.0.0.1:{port}",
                                      "--management-address", f"127.0.0.1:{port + 1}",
                                      "--metrics-address", f"127.0.0.1:{port + 2}", *args],
                                     env=dict(os.environ, RUST_LOG="warn"))
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"spillway exited with {self.proc.returncode}")
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/ping").status == 200:
                    return
            except Exception:
                time.sleep(0.05)
        raise RuntimeError("the server never became healthy")

    def post(self, path, body):
        """(seconds, answer) of a JSON POST to the inference API."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        t = time.perf_counter()
        answer = json.load(urllib.request.urlopen(req, timeout=600))
        return time.perf_counter() - t, answer

    def manage(self, method, path):
        """The management API's JSON answer; an HTTP error raises with its body."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.port + 1}{path}", method=method)
        try:
            return json.load(urllib.request.urlopen(req, timeout=600))
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{method} {path}: {e.code} {e.read().decode()}") from None

    def metrics(self):
        return urllib.request.urlopen(f"http://127.0.0.1:{self.port + 2}/metrics").read().decode()

    def stop(self):
        """Stops the server; its peak RSS (VmHWM) in bytes."""
        hwm = status(self.proc.pid, "VmHWM:")
        self.proc.terminate()
        self.proc.wait()
        return hwm


def write_section(title, body):
    """Replaces section `## title` of BENCHMARKS.md with `body` (appended when absent);
    the other sections, each written by its own benchmark, are kept."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "BENCHMARKS.md")
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    heading = f"## {title}\n"
    start = text.find(heading)
    section = heading + "\n" + body.rstrip("\n") + "\n"
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("" if end < 0 else text[end:])
    with open(path, "w") as f:
        f.write(text)
