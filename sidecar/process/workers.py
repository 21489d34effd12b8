"""``server.workers``: one sidecar as N worker processes, and the supervisor that runs them.

Each worker is a whole sidecar (consumer-group member, idempotent producer, event loop, gRPC
server) on its own address; the workers share the dedup store, so a Publish through any of them
dedups against the same keys and a partition moving between them keeps its claims. Worker 0
listens on ``server.listen`` itself and worker i on the next addresses (see :func:`plan`); every
worker answers ListWorkers with all of them, and the clients in clients/ connect to each one.

The supervisor is this process when ``server.workers`` is more than 1. It starts the workers
(``python -m sidecar`` with the same flags and two hidden ones naming the worker), passes
SIGINT, SIGTERM and SIGUSR1 on, restarts a worker that dies after it started, and stops them
all and exits when one fails at its start (a bad setting fails every worker alike) or keeps
dying.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sidecar.config import ServerSettings, Settings, is_unix_listen, split_listen, unix_socket_path
from sidecar.errors import ConfigError

log = logging.getLogger(__name__)

#: The exit code of a sidecar refused by its settings or unable to start (sidecar.process.cli): at the
#: first start every worker would fail alike, so the supervisor stops them all. A restarted
#: worker that cannot start (its port still held, say) is restarted like any other death.
EXIT_START_FAILED = 2
#: A worker that died otherwise is restarted after this wait, unless it died this often within
#: the window: then it crash-loops, and the supervisor stops them all.
RESTART_DELAY_S = 1.0
MAX_RESTARTS, RESTART_WINDOW_S = 5, 60.0
_PR_SET_PDEATHSIG = 1
#: The cgroup v2 CPU limit of this container ("QUOTA PERIOD", or "max PERIOD" for none).
CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


@dataclass(frozen=True, slots=True)
class WorkerAddresses:
    """Where one worker listens: the three listen settings of ``[server]`` for it."""

    listen: str
    health_listen: str
    metrics_listen: str


def cpu_count() -> int:
    """The CPUs this process may use: its CPU affinity, capped by a cgroup v2 CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        quota, period = CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    return max(1, cpus)


def resolve(setting: int | str) -> int:
    """The number of workers ``server.workers`` asks for."""
    return cpu_count() if setting == "auto" else int(setting)


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _nth(listen: str, i: int, setting: str) -> str:
    """The ``i``-th worker's address for one listen setting: port + i (a free port each when the
    port is 0), or the socket ``NAME-i.EXT`` beside ``NAME.EXT``; worker 0 keeps the setting."""
    if not listen or (i == 0 and not listen.endswith(":0")):
        return listen
    if is_unix_listen(listen):
        path = Path(unix_socket_path(listen))
        return f"unix://{path.with_name(f'{path.stem}-{i}{path.suffix}')}"
    host, port = split_listen(listen, setting)
    bracketed = f"[{host}]" if ":" in host else host
    if port == 0:
        return f"{bracketed}:{_free_port(host)}"
    if port + i > 65535:
        raise ConfigError(f"{setting}={listen!r}: worker {i} would need port {port + i}, beyond 65535")
    return f"{bracketed}:{port + i}"


def plan(settings: Settings, n: int) -> list[WorkerAddresses]:
    """The addresses of ``n`` workers, from ``[server]``'s listen settings. With more than one
    worker, ``server.metrics_listen`` is the supervisor's (sidecar.observability.worker_metrics) and each
    worker's metrics go on a free loopback port, read only by the supervisor."""
    srv = settings.server
    own_metrics = n > 1 and bool(srv.metrics_listen)
    return [
        WorkerAddresses(
            _nth(srv.listen, i, "server.listen"),
            _nth(srv.health_listen, i, "server.health_listen"),
            f"127.0.0.1:{_free_port('127.0.0.1')}" if own_metrics else srv.metrics_listen,
        )
        for i in range(n)
    ]


def encode_plan(addresses: list[WorkerAddresses]) -> str:
    return json.dumps([asdict(a) for a in addresses])


def decode_plan(raw: str) -> list[WorkerAddresses]:
    try:
        return [WorkerAddresses(**entry) for entry in json.loads(raw)]
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"unreadable worker plan {raw[:80]!r}: {exc}") from None


def worker_settings(settings: Settings, index: int, addresses: list[WorkerAddresses]) -> Settings:
    """Settings of worker ``index``: its own addresses, and identities no other worker shares (the
    store owner that fences claims, and a static group membership id)."""
    mine = addresses[index]
    server = settings.server.model_copy(
        update={
            "listen": mine.listen,
            "health_listen": mine.health_listen,
            "metrics_listen": mine.metrics_listen,
            # On loopback, read by the supervisor, which serves HTTPS when it is configured.
            "metrics_tls_cert_file": None,
            "metrics_tls_key_file": None,
        }
    )
    consumer = dict(settings.kafka.consumer)
    if "group.instance.id" in consumer:
        consumer["group.instance.id"] = f"{consumer['group.instance.id']}-{index}"
    kafka = settings.kafka.model_copy(update={"consumer": consumer})
    update: dict[str, Any] = {"server": server, "kafka": kafka}
    if settings.owner_id:
        update["owner_id"] = f"{settings.owner_id}-w{index}"
    return settings.model_copy(update=update)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the supervisor dies, however it dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisor:
    """Runs the workers until a signal or a failed start. :meth:`run` returns the exit code."""

    def __init__(
        self, argv: list[str], addresses: list[WorkerAddresses], server: ServerSettings | None = None
    ) -> None:
        self._argv = argv
        self._addresses = addresses
        self._server = server  # serves server.metrics_listen for all the workers, when set
        self._plan = encode_plan(addresses)
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * len(addresses)
        self._deaths: list[list[float]] = [[] for _ in addresses]
        self._spawned = [0] * len(addresses)  # how often each worker was started
        self._signals: list[int] = []

    def _spawn(self, i: int) -> None:
        command = [
            sys.executable,
            "-m",
            "sidecar",
            *self._argv,
            "--worker",
            str(i),
            "--worker-plan",
            self._plan,
        ]
        # Its own process group: a terminal's Ctrl-C reaches the supervisor alone, which passes it on
        # once (twice would be the "second signal" that skips the graceful stop).
        proc = subprocess.Popen(command, preexec_fn=_die_with_parent, process_group=0)
        self._procs[i] = proc
        self._spawned[i] += 1
        log.info("worker %d started (pid %d) on %s", i, proc.pid, self._addresses[i].listen)

    def _forward(self, signum: int) -> None:
        for p in self._procs:
            if p is not None and p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signum)

    def _serve_metrics(self) -> Any:
        """Serve ``server.metrics_listen`` with every worker's metrics (sidecar.observability.worker_metrics);
        None when metrics are off. A ConfigError when the address or the TLS files are unusable,
        before any worker starts."""
        if self._server is None or not self._server.metrics_listen:
            return None
        from sidecar.api import listeners
        from sidecar.observability import worker_metrics

        reg = worker_metrics.registry(
            [a.metrics_listen for a in self._addresses], lambda: [max(n - 1, 0) for n in self._spawned]
        )
        server, port = listeners.metrics(self._server, reg)
        log.info("metrics of all %d workers on port %d (server.metrics_listen)", len(self._addresses), port)
        return server

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)

    def run(self) -> int:
        metrics = self._serve_metrics()
        try:
            return self._supervise()
        finally:
            if metrics is not None:
                metrics.shutdown()
                metrics.server_close()

    def _supervise(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        log.info(
            "supervising %d workers (server.workers): %s",
            len(self._addresses),
            ", ".join(f"{i}={a.listen}" for i, a in enumerate(self._addresses)),
        )
        for i in range(len(self._addresses)):
            self._spawn(i)
        stopping = False
        code = 0
        while True:
            while self._signals:
                signum = self._signals.pop(0)
                if signum != signal.SIGUSR1:
                    stopping = True
                self._forward(signum)
            running = 0
            for i, p in enumerate(self._procs):
                if p is None:
                    continue
                rc = p.poll()
                if rc is None:
                    running += 1
                    continue
                self._procs[i] = None
                if stopping:
                    code = code or (rc if rc > 0 else 0)
                    continue
                now = time.monotonic()
                deaths = self._deaths[i] = [t for t in self._deaths[i] if now - t < RESTART_WINDOW_S] + [now]
                first_start = self._spawned[i] == 1
                if (rc == EXIT_START_FAILED and first_start) or len(deaths) > MAX_RESTARTS:
                    why = (
                        "could not start"
                        if rc == EXIT_START_FAILED and first_start
                        else f"died {len(deaths)} times in a minute"
                    )
                    log.error("worker %d %s (exit %d): stopping the other workers", i, why, rc)
                    stopping = True
                    code = rc if rc > 0 else 1
                    self._forward(signal.SIGTERM)
                    continue
                log.error("worker %d exited with %d: restarting it in %.0f s", i, rc, RESTART_DELAY_S)
                time.sleep(RESTART_DELAY_S)
                self._spawn(i)
                running += 1
            if stopping and running == 0:
                log.info("all workers stopped")
                return code
            time.sleep(0.1)
