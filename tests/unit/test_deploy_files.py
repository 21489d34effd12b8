"""What can be checked here without Docker: the deploy files parse and name real settings."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import services
import yaml

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
    assert sidecar["startupProbe"]["grpc"]["port"] == 50051


def test_kubernetes_probes_reach_the_listen_address() -> None:
    doc = yaml.safe_load((ROOT / "deploy/kubernetes/deployment.yaml").read_text())
    sidecar = next(
        c for c in doc["spec"]["template"]["spec"]["initContainers"] if c["name"] == "dedup-sidecar"
    )
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    # A gRPC probe dials the pod IP: a loopback-only listener would fail it.
    assert env["DEDUP_SERVER__LISTEN"].startswith("0.0.0.0:")
    assert "DEDUP_SERVER__AUTH_TOKEN" in env
    assert sidecar["readinessProbe"]["grpc"]["port"] == int(env["DEDUP_SERVER__LISTEN"].rsplit(":", 1)[1])
