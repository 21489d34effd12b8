"""server.workers: the settings, each worker's addresses and identities, and the supervisor's
refusal to keep going when a worker cannot start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, start_http_server
from pydantic import ValidationError

from sidecar import config
from sidecar.errors import ConfigError
from sidecar.observability import worker_metrics
from sidecar.process import workers

ROOT = Path(__file__).resolve().parents[2]


def test_workers_setting_takes_a_count_or_auto() -> None:
    assert config.load(store={"backend": "sqlite"}, server={"workers": 3}).server.workers == 3
    assert config.load(server={"workers": "auto"}, store={"backend": "redis"}).server.workers == "auto"
    for bad in (0, -1, 65, "many"):
        with pytest.raises(ValidationError, match=r"server\.workers|workers"):
            config.load(server={"workers": bad})


def test_more_than_one_worker_refuses_the_memory_store() -> None:
    with pytest.raises(ValidationError) as info:
        config.load(server={"workers": 2}, store={"backend": "memory"})
    assert "server.workers" in str(info.value)
    assert "store.backend" in str(info.value)
    config.load(server={"workers": 1}, store={"backend": "memory"})


def test_auto_is_the_cpus_this_process_may_use(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    monkeypatch.setattr(workers, "CPU_MAX", tmp_path / "missing")
    assert workers.resolve("auto") == 4
    quota = tmp_path / "cpu.max"
    quota.write_text("250000 100000\n")  # 2.5 CPUs: three workers, the last one partly idle
    monkeypatch.setattr(workers, "CPU_MAX", quota)
    assert workers.resolve("auto") == 3
    quota.write_text("max 100000\n")
    assert workers.resolve("auto") == 4
    assert workers.resolve(2) == 2


def test_each_worker_listens_on_the_next_port_or_socket() -> None:
    s = config.load(
        store={"backend": "redis"},
        server={"listen": "127.0.0.1:6000", "health_listen": "0.0.0.0:7000", "metrics_listen": ""},
    )
    plan = workers.plan(s, 3)
    assert [a.listen for a in plan] == ["127.0.0.1:6000", "127.0.0.1:6001", "127.0.0.1:6002"]
    assert [a.health_listen for a in plan] == ["0.0.0.0:7000", "0.0.0.0:7001", "0.0.0.0:7002"]
    assert [a.metrics_listen for a in plan] == ["", "", ""]
    unix = config.load(store={"backend": "redis"}, server={"listen": "unix:///run/dedup/sidecar.sock"})
    assert [a.listen for a in workers.plan(unix, 2)] == [
        "unix:///run/dedup/sidecar.sock",
        "unix:///run/dedup/sidecar-1.sock",
    ]
    # Port 0: a free port each, known before the workers start so ListWorkers can name them.
    ephemeral = config.load(store={"backend": "redis"}, server={"listen": "127.0.0.1:0"})
    ports = [int(a.listen.rpartition(":")[2]) for a in workers.plan(ephemeral, 2)]
    assert 0 not in ports
    assert len(set(ports)) == 2
    # The decoded plan is the plan.
    assert workers.decode_plan(workers.encode_plan(plan)) == plan


def test_workers_metrics_go_on_loopback_ports_the_supervisor_reads() -> None:
    s = config.load(
        store={"backend": "redis"},
        server={
            "metrics_listen": "0.0.0.0:9464",
            "metrics_tls_cert_file": "/etc/tls/tls.crt",
            "metrics_tls_key_file": "/etc/tls/tls.key",
        },
    )
    plan = workers.plan(s, 2)
    hosts = {a.metrics_listen.rpartition(":")[0] for a in plan}
    ports = {a.metrics_listen.rpartition(":")[2] for a in plan}
    assert hosts == {"127.0.0.1"}
    assert len(ports) == 2
    assert "9464" not in ports  # the supervisor's
    w1 = workers.worker_settings(s, 1, plan).server
    assert (w1.metrics_listen, w1.metrics_tls_cert_file, w1.metrics_tls_key_file) == (
        plan[1].metrics_listen,
        None,
        None,
    )
    assert [a.metrics_listen for a in workers.plan(s, 1)] == ["0.0.0.0:9464"]  # one worker: as set


def test_the_supervisors_metrics_are_every_workers_labelled_by_worker() -> None:
    regs = [CollectorRegistry(), CollectorRegistry()]
    for i, reg in enumerate(regs):
        Counter("dedup_acks", "acks", ["topic"], registry=reg).labels("orders").inc(10 + i)
        Gauge("dedup_streams", "streams", registry=reg).set(i + 1)
    servers = [start_http_server(0, "127.0.0.1", registry=reg)[0] for reg in regs]
    dead = f"127.0.0.1:{workers._free_port('127.0.0.1')}"  # a worker that is not up
    try:
        addresses = [f"127.0.0.1:{srv.server_port}" for srv in servers] + [dead]
        text = generate_latest(worker_metrics.registry(addresses, lambda: [0, 2, 1])).decode()
    finally:
        for srv in servers:
            srv.shutdown()
            srv.server_close()
    assert 'dedup_acks_total{topic="orders",worker="0"} 10.0' in text
    assert 'dedup_acks_total{topic="orders",worker="1"} 11.0' in text
    assert 'dedup_streams{worker="1"} 2.0' in text
    assert text.count("# TYPE dedup_acks_total counter") == 1
    assert 'dedup_worker_up{worker="0"} 1.0' in text
    assert 'dedup_worker_up{worker="2"} 0.0' in text
    assert 'dedup_worker_restarts_total{worker="1"} 2.0' in text
    assert 'worker="2"' not in text.replace('dedup_worker_up{worker="2"}', "").replace(
        'dedup_worker_restarts_total{worker="2"}', ""
    )


def test_a_port_beyond_the_range_names_the_setting() -> None:
    s = config.load(store={"backend": "redis"}, server={"listen": "127.0.0.1:65535"})
    with pytest.raises(ConfigError, match=r"server\.listen.*worker 1 would need port 65536"):
        workers.plan(s, 2)


def test_workers_get_identities_of_their_own() -> None:
    s = config.load(
        store={"backend": "redis"},
        owner_id="pod-7",
        kafka={"consumer": {"group.instance.id": "pod-7", "fetch.min.bytes": 1}},
    )
    plan = workers.plan(s, 2)
    w1 = workers.worker_settings(s, 1, plan)
    assert w1.owner_id == "pod-7-w1"  # claims of one worker are not another's
    assert w1.kafka.consumer == {"group.instance.id": "pod-7-1", "fetch.min.bytes": 1}
    assert w1.server.listen == plan[1].listen
    assert s.kafka.consumer["group.instance.id"] == "pod-7"  # the shared settings are untouched
    w0 = workers.worker_settings(config.load(store={"backend": "redis"}), 0, plan)
    assert w0.owner_id == ""  # unset: each process draws its own


def test_a_worker_that_cannot_start_stops_the_sidecar_with_its_message(tmp_path: Path) -> None:
    """A setting that fails at start (here a socket directory that does not exist) fails every
    worker alike: the supervisor stops them all and exits 2 instead of restarting them."""
    env = {
        **os.environ,
        "DEDUP_SERVER__WORKERS": "2",
        "DEDUP_STORE__BACKEND": "sqlite",
        "DEDUP_STORE__SQLITE_PATH": str(tmp_path / "dedup.sqlite3"),
        "DEDUP_SERVER__LISTEN": f"unix://{tmp_path}/missing/sidecar.sock",
        "DEDUP_SERVER__METRICS_LISTEN": "",
    }
    out = subprocess.run(
        [sys.executable, "-m", "sidecar"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2, out.stderr
    assert "could not start (exit 2): stopping the other workers" in out.stderr
    assert "does not exist; create it" in out.stderr
    assert "restarting" not in out.stderr
