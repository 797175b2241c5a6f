#!/usr/bin/env python3
"""Runs TorchServe's management API postman suite against Spillway, as TorchServe's own
regression tests run it (`ts_scripts/api_utils.py`): `newman run` with the collection, its
data file and an environment, against a server started with an empty model store listing.

    bench/postman.py TS_POSTMAN_DIR [--binary target/debug/spillway] [--keep] [-- SERVE_ARGS...]

TS_POSTMAN_DIR is a folder holding TorchServe's `test/postman/` files (at least
`management_api_test_collection.json` and `management_data.json`; `environment.json` is read
when present). They are TorchServe's files and are not part of this repository.

The data file registers TorchServe's example archives by name (`squeezenet1_1.mar`,
`mnist.mar`, ...). Spillway cannot serve those image models, and the management suite never
predicts, so each `{{mar_path_X}}` the data names is built here as an `echo`-handler archive
called `X.mar`, version 1.0 (the version TorchServe's archives carry): a stand-in that
registers, scales and unregisters like the real one.

SERVE_ARGS go to `spillway serve`. TorchServe registers a model with
`default_workers_per_model` workers, 0 unless configured, and several rows expect the
answers of a model registered with none; Spillway's default is 1. `-- --default-workers-per-model 0`
serves with TorchServe's default.

Prints each failing row (iteration, test, method, path, the status expected and the one
received, and the answer's message), then the passed/failed counts. Exits 0 when every row
passes. Needs `newman` on the PATH (`npm install -g newman`).
"""
import argparse, json, os, re, shutil, socket, subprocess, sys, tempfile, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def archive_names(data):
    """The `mar_path_X` variables the rows name, X for each."""
    names = set()
    for row in data:
        names.update(re.findall(r"\{\{mar_path_([^}]+)\}\}", json.dumps(row)))
    return sorted(names)


def environment(folder, names, ports):
    """TorchServe's environment.json (or one like it) pointed at this server's ports."""
    path = os.path.join(folder, "environment.json")
    if os.path.exists(path):
        env = json.load(open(path))
    else:
        env = {"name": "spillway", "values": []}
    values = {v["key"]: v for v in env.get("values", [])}
    settings = {"hostname": "127.0.0.1", "protocol": "http", **ports}
    settings.update({f"mar_path_{n}": f"{n}.mar" for n in names})
    for key, value in settings.items():
        values[key] = {"key": key, "value": str(value), "enabled": True}
    env["values"] = list(values.values())
    return env


def body_message(execution):
    """The answer's `message` or `status`, else its first 160 characters."""
    stream = execution.get("response", {}).get("stream", {})
    data = stream.get("data") if isinstance(stream, dict) else None
    text = bytes(data).decode(errors="replace") if data else ""
    try:
        answer = json.loads(text)
        return answer.get("message") or answer.get("status") or text[:160]
    except (ValueError, AttributeError):
        return text[:160].replace("\n", " ")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="TorchServe's test/postman folder (not committed here)")
    parser.add_argument("--binary", default=os.path.join(ROOT, "target/debug/spillway"))
    parser.add_argument("--collection", default="management_api_test_collection.json")
    parser.add_argument("--data", default="management_data.json")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (server log, report)")
    argv = sys.argv[1:]
    serve_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:len(argv) - len(serve_args)][:-1] if serve_args else argv)

    newman = shutil.which("newman")
    if not newman:
        sys.exit("newman is not on the PATH: npm install -g newman")
    collection = os.path.join(args.folder, args.collection)
    data_path = os.path.join(args.folder, args.data)
    data = json.load(open(data_path))
    names = archive_names(data)

    work = tempfile.mkdtemp(prefix="spillway-postman-")
    store = os.path.join(work, "model-store")
    os.makedirs(store)
    for name in names:
        subprocess.run([args.binary, "archive", "--model-name", name, "--version", "1.0",
                        "--handler", "echo", "--export-path", store],
                       check=True, stdout=subprocess.DEVNULL)

    ports = {"pred-port": free_port(), "mgmt-port": free_port(), "metric-port": free_port()}
    env_path = os.path.join(work, "environment.json")
    json.dump(environment(args.folder, names, ports), open(env_path, "w"), indent=2)

    log = open(os.path.join(work, "server.log"), "w")
    server = subprocess.Popen(
        [args.binary, "serve", "--model-store", store, "--cache-dir", os.path.join(work, "cache"),
         "--models", "",
         "--inference-address", f"127.0.0.1:{ports['pred-port']}",
         "--management-address", f"127.0.0.1:{ports['mgmt-port']}",
         "--metrics-address", f"127.0.0.1:{ports['metric-port']}",
         *serve_args],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, RUST_LOG="info"))
    try:
        deadline = time.time() + 120
        while True:
            if server.poll() is not None:
                sys.exit(f"spillway exited with {server.returncode}; see {log.name}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{ports['pred-port']}/ping", timeout=2)
                break
            except Exception:
                if time.time() > deadline:
                    sys.exit("spillway never answered /ping")
                time.sleep(0.1)
        report = os.path.join(work, "report.json")
        subprocess.run([newman, "run", collection, "-d", data_path, "-e", env_path,
                        "--reporters", "cli,json", "--reporter-json-export", report],
                       stdout=open(os.path.join(work, "newman.log"), "w"), stderr=subprocess.STDOUT)
    finally:
        server.terminate()
        server.wait()

    executions = json.load(open(report))["run"]["executions"]
    passed, failed = 0, []
    for execution in executions:
        i = execution["cursor"]["iteration"]
        row = data[i]
        assertions = execution.get("assertions", [])
        if assertions and all("error" not in a for a in assertions):
            passed += 1
        else:
            failed.append((i + 1, row, execution))
    for number, row, execution in failed:
        got = execution.get("response", {}).get("code", "no answer")
        print(f"FAIL {number:2} {row['test']}\n     {row['METHOD']} /{row['path']}: "
              f"expected {row.get('status_code', 200)}, got {got}: {body_message(execution)}")
    command = " ".join([args.binary, "serve", *serve_args])
    print(f"{passed} passed, {len(failed)} failed of {len(executions)} "
          f"({os.path.basename(collection)}; {command})")
    if args.keep:
        print(f"work folder: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if not failed else 1)


if __name__ == "__main__":
    main()
