"""What can be checked here without Docker: the deploy files parse and name real settings."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import services
import yaml

from sidecar import config
from sidecar.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def setting_exists(env_name: str) -> bool:
    parts = env_name.removeprefix("DEDUP_").lower().split("__")
    model: Any = Settings
    for part in parts:
        fields = model.model_fields
        if part not in fields:
            return False
        model = fields[part].annotation
    return True


def env_names(doc: Any) -> list[str]:
    found: list[str] = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            if isinstance(k, str) and k.startswith("DEDUP_"):
                found.append(k)
            if k == "name" and isinstance(v, str) and v.startswith("DEDUP_"):
                found.append(v)
            found += env_names(v)
    elif isinstance(doc, list):
        for v in doc:
            found += env_names(v)
    return found


@pytest.mark.parametrize("path", ["deploy/compose.yaml", "deploy/kubernetes/deployment.yaml"])
def test_yaml_parses_and_names_real_settings(path: str) -> None:
    docs = list(yaml.safe_load_all((ROOT / path).read_text()))
    assert docs
    names = [n for n in env_names(docs) if n not in ("DEDUP_SIDECAR", "DEDUP_TOKEN")]  # the app's own
    assert names
    unknown = [n for n in names if not setting_exists(n)]
    assert not unknown, f"{path} sets unknown settings {unknown}"


def test_the_kustomize_base_renders_manifests_that_match_the_kubernetes_schemas() -> None:
    """kustomize (installed by scripts/bootstrap.sh where Go is) renders deploy/kubernetes; every
    built-in kind it renders passes Kubernetes 1.33's schemas, strictly (no unknown fields)."""
    kustomize = ROOT / ".tools" / "bin" / "kustomize"
    if not kustomize.exists():
        if shutil.which("go"):
            pytest.fail("kustomize is missing although Go is installed: run scripts/bootstrap.sh")
        pytest.skip("no Go on this machine to install kustomize with")
    out = subprocess.run(
        [str(kustomize), "build", str(ROOT / "deploy" / "kubernetes")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    docs = list(yaml.safe_load_all(out.stdout))
    assert {d["kind"] for d in docs} == {"Deployment", "PodMonitor"}
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a Prometheus Operator CRD: not in the built-in schemas
        kubernetes_validate.validate(doc, "1.33.0", strict=True)


def test_alert_rules_pass_promtool() -> None:
    """promtool checks deploy/monitoring/alerts.yaml and runs its unit test case."""
    promtool = services.promtool_binary()
    folder = ROOT / "deploy" / "monitoring"
    for args in (["check", "rules", "alerts.yaml"], ["test", "rules", "alerts.test.yaml"]):
        done = subprocess.run([promtool, *args], cwd=folder, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}{done.stderr}"


def test_the_dashboard_is_grafana_json_with_prometheus_queries() -> None:
    dash = json.loads((ROOT / "deploy" / "monitoring" / "dashboard.json").read_text())
    assert dash["panels"]
    for panel in dash["panels"]:
        assert panel["targets"], panel["title"]
        assert all("dedup_" in t["expr"] for t in panel["targets"]), panel["title"]


def test_dockerfile_env_names_real_settings() -> None:
    text = (ROOT / "Dockerfile").read_text()
    names = re.findall(r"\b(DEDUP_[A-Z_]+)=", text)
    assert names
    assert all(setting_exists(n) for n in names), names
    assert 'ENTRYPOINT ["dedup-sidecar"]' in text


def test_kubernetes_runs_a_native_sidecar_that_is_ready_when_it_can_work() -> None:
    doc = yaml.safe_load((ROOT / "deploy/kubernetes/deployment.yaml").read_text())
    pod = doc["spec"]["template"]["spec"]
    [sidecar] = [c for c in pod["initContainers"] if c["name"] == "dedup-sidecar"]
    # Started before the app and stopped after it: an init container that keeps running.
    assert sidecar["restartPolicy"] == "Always"
    assert all(c["name"] != "dedup-sidecar" for c in pod["containers"])
    # Readiness asks for the DedupService entry (store, brokers, topics), liveness the overall one.
    assert sidecar["readinessProbe"]["grpc"]["service"] == "dedup.v1.DedupService"
    assert "service" not in sidecar["livenessProbe"]["grpc"]
    assert "grpc" in sidecar["startupProbe"]


def test_kubernetes_app_reaches_the_socket_and_probes_the_health_port() -> None:
    doc = yaml.safe_load((ROOT / "deploy/kubernetes/deployment.yaml").read_text())
    pod = doc["spec"]["template"]["spec"]
    sidecar = next(c for c in pod["initContainers"] if c["name"] == "dedup-sidecar")
    [app] = pod["containers"]
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    settings = config.load(
        server={
            "listen": env["DEDUP_SERVER__LISTEN"],
            "socket_mode": env["DEDUP_SERVER__SOCKET_MODE"],
            "health_listen": env["DEDUP_SERVER__HEALTH_LISTEN"],
        }
    )
    # The API is a Unix socket in a volume both containers mount, at the path the app dials.
    socket_dir = config.unix_socket_path(settings.server.listen).rsplit("/", 1)[0]
    mounts = {
        c["name"]: {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])} for c in (sidecar, app)
    }
    assert mounts["dedup-sidecar"][socket_dir] == mounts["app"][socket_dir]
    assert {e["name"]: e.get("value") for e in app["env"]}["DEDUP_SIDECAR"] == env["DEDUP_SERVER__LISTEN"]
    # The socket's group is the pod's fsGroup, which the app's container gets as well.
    assert settings.server.socket_mode == "0660"
    assert pod["securityContext"]["fsGroup"] == sidecar["securityContext"]["runAsGroup"]
    # The kubelet's gRPC probes dial the pod IP: the health-only port, bound beyond loopback.
    health_port = int(env["DEDUP_SERVER__HEALTH_LISTEN"].rsplit(":", 1)[1])
    assert env["DEDUP_SERVER__HEALTH_LISTEN"].startswith("0.0.0.0:")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert sidecar[probe]["grpc"]["port"] == health_port
    # Non-root on a read-only root filesystem, as the Dockerfile's user.
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    assert sidecar["securityContext"]["runAsUser"] == 10001


def test_the_image_installs_the_locked_dependencies_by_hash_and_runs_as_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "--require-hashes -r /tmp/requirements.lock" in text
    assert "COPY deploy/requirements.lock" in text
    assert "--no-deps /wheels/" in text  # the sidecar's wheel resolves nothing
    # The build stage can compile the sidecar's modules (setup.py), and the image fails to build
    # without them (they are optional for installs without a compiler, not for the image).
    build_stage = text.split("\nFROM ")[1]
    assert "gcc" in build_stage
    assert "COPY pyproject.toml setup.py " in build_stage
    assert '== "frame encoder c, engine compiled"' in text
    [user] = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert user.split(":")[0] == "10001"


def test_the_lock_pins_every_runtime_dependency_with_hashes() -> None:
    """deploy/requirements.lock (scripts/lock.sh) satisfies pyproject.toml: every runtime
    requirement, and the uvloop extra, pinned to a version its specifier allows, with hashes."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["uvloop"]]]
    text = (ROOT / "deploy/requirements.lock").read_text()
    pins: dict[str, str] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        m = re.match(r"([A-Za-z0-9_.\-]+)==([^\s;\\]+)", block)
        if m:
            pins[canonicalize_name(m.group(1))] = m.group(2)
            assert "--hash=sha256:" in block, m.group(1)
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in deploy/requirements.lock: run scripts/lock.sh"
        assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])
