"""`python deploy/local/services up` stops every service it started when it is told to stop:
by SIGTERM, and by SIGINT even when started in the background (where SIGINT starts out ignored)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.integration.helpers import ROOT


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


@pytest.mark.timeout(180)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT-in-background"])
def test_up_stops_its_broker_and_redis_on_a_signal(signum: int) -> None:
    # `trap "" INT` is what a shell does for a background job: SIGINT starts out ignored.
    script = f'trap "" INT; exec "{sys.executable}" "{ROOT / "deploy" / "local" / "services"}" up'
    proc = subprocess.Popen(
        ["sh", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        lines = dict(proc.stdout.readline().strip().split("=", 1) for _ in range(2))
        kafka_port = int(lines["KAFKA_BOOTSTRAP"].rsplit(":", 1)[1])
        redis_port = int(lines["REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
        assert port_open(kafka_port)
        assert port_open(redis_port)
        proc.send_signal(signum)
        assert proc.wait(60) == 0
        deadline = time.monotonic() + 10
        while port_open(kafka_port) or port_open(redis_port):
            assert time.monotonic() < deadline, "the services exited but left its broker or Redis running"
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.timeout(120)
def test_services_end_when_their_starter_dies_without_stopping_them(tmp_path: os.PathLike[str]) -> None:
    # SIGKILL (or an abort) runs no `finally` and no fixture teardown: the watchdog ends them.
    script = (
        "import os, pathlib, signal, sys\n"
        f"sys.path.insert(0, {str(ROOT / 'deploy' / 'local')!r})\n"
        "import services\n"
        f"r = services.RedisServer.start(pathlib.Path({str(tmp_path)!r}) / 'redis')\n"
        "print(r.proc.pid, r.port, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pid, port = (int(x) for x in proc.stdout.split())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (os.path.exists(f"/proc/{pid}") or port_open(port)):
        time.sleep(0.1)
    assert not port_open(port), "redis-server outlived the process that started it"
