"""Helpers for integration tests: sidecars in-process and as real processes, raw Kafka reads."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import grpc
import services
from confluent_kafka import Consumer, Producer, TopicPartition
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar import config
from sidecar.process.app import Sidecar

ROOT = Path(__file__).resolve().parents[2]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def settings_dict(
    kafka: services.KafkaBroker,
    topics: list[str],
    group: str,
    store: dict[str, Any] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": kafka.bootstrap_servers,
            "topics": topics,
            "group_id": group,
            "session_timeout_ms": 6000,
        },
        "store": store or {"backend": "memory"},
        "server": {"listen": "127.0.0.1:0", "metrics_listen": "", "shutdown_grace_seconds": 1},
        "commit": {"interval_ms": 50},
    }
    for name, values in sections.items():
        out.setdefault(name, {}).update(values)
    return out


@asynccontextmanager
async def running_sidecar(**kwargs: Any) -> AsyncIterator[Sidecar]:
    sc = Sidecar(config.load(None, **kwargs))
    await sc.start()
    try:
        yield sc
    finally:
        await sc.stop()


async def wait_assigned(sc: Sidecar, count: int, timeout: float = 30) -> None:
    assert sc.engine is not None
    deadline = time.monotonic() + timeout
    while len(sc.engine.committable()) != count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"expected {count} partitions, have {sorted(sc.engine.committable())}")
        await asyncio.sleep(0.05)


def committed_offsets(kafka: services.KafkaBroker, group: str, topic: str, partitions: int) -> dict[int, int]:
    c = Consumer(
        {"bootstrap.servers": kafka.bootstrap_servers, "group.id": group, "enable.auto.commit": False}
    )
    try:
        got = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=15)
        return {tp.partition: tp.offset for tp in got}
    finally:
        c.close()


def read_topic(
    kafka: services.KafkaBroker, topic: str, expect: int | None = None, timeout: float = 20
) -> list[Any]:
    """Every record in ``topic`` (a plain consumer from the beginning, no group commits)."""
    c = Consumer(
        {
            "bootstrap.servers": kafka.bootstrap_servers,
            "group.id": unique("reader"),
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    md = c.list_topics(topic, timeout=10).topics[topic]
    c.assign([TopicPartition(topic, p, 0) for p in md.partitions])
    out: list[Any] = []
    eof: set[int] = set()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            m = c.poll(0.2)
            if m is None:
                if len(eof) == len(md.partitions) and (expect is None or len(out) >= expect):
                    break
                continue
            if m.error():
                if m.error().code() == -191:  # type: ignore[union-attr]  # _PARTITION_EOF
                    eof.add(m.partition() or 0)
                continue
            out.append(m)
        return out
    finally:
        c.close()


def raw_produce(
    kafka: services.KafkaBroker, topic: str, records: list[tuple[str | None, bytes, int | None]]
) -> None:
    """Write records with a plain producer: (idempotency key or None, value, partition or None)."""
    p = Producer({"bootstrap.servers": kafka.bootstrap_servers, "linger.ms": 5})
    for key, value, partition in records:
        headers: list[tuple[str, str | bytes | None]] = (
            [("idempotency-key", key.encode())] if key is not None else []
        )
        if partition is None:
            p.produce(topic, value=value, headers=headers)
        else:
            p.produce(topic, value=value, headers=headers, partition=partition)
    assert p.flush(30) == 0


def records_per_key(bootstrap: str, topic: str, skip_header: str | None = None) -> Counter[str]:
    """Read every partition of ``topic`` to its end and count the records per idempotency key;
    records carrying ``skip_header`` are left out."""
    c = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": unique("readback"), "enable.auto.commit": False}
    )
    try:
        parts = c.list_topics(topic, timeout=15).topics[topic].partitions
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=15)[1] for p in parts}
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        counts: Counter[str] = Counter()
        done = {p for p, end in ends.items() if end == 0}
        deadline = time.monotonic() + 120
        while len(done) < len(ends) and time.monotonic() < deadline:
            for m in c.consume(1000, 1.0):
                if m.error():
                    continue
                headers = dict(m.headers() or [])
                if skip_header is None or skip_header not in headers:
                    key = headers.get("idempotency-key") or b""
                    counts[key.decode() if isinstance(key, bytes) else key] += 1
                if (m.offset() or 0) + 1 >= ends[m.partition() or 0]:
                    done.add(m.partition() or 0)
        assert len(done) == len(ends), f"read {len(done)} of {len(ends)} partitions back in time"
    finally:
        c.close()
    return counts


class SidecarProcess:
    """A sidecar as its own OS process (for kill -9), configured through DEDUP_* variables."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.workers = int(env.get("DEDUP_SERVER__WORKERS", "1"))
        self.port = services.free_port() if self.workers == 1 else services.port_block(self.workers)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def health_target(self) -> str:
        """Where wait_serving asks: server.health_listen when the env sets it (a TLS or Unix
        socket API port), else the API port."""
        return self.env.get("DEDUP_SERVER__HEALTH_LISTEN") or self.target

    def start(self) -> None:
        env = {
            **os.environ,
            "DEDUP_SERVER__LISTEN": self.target,
            "DEDUP_SERVER__METRICS_LISTEN": "",
            **self.env,
        }
        with open(self.log_path, "ab") as log:
            hooks = ["--testonly-fault-hooks"] if "DEDUP_TESTONLY_KILL_AT" in env else []
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sidecar", *hooks],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )

    async def wait_serving(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        async with grpc.aio.insecure_channel(self.health_target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"sidecar exited: {self.log_path.read_text()[-3000:]}")
                try:
                    r = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.1)
        raise TimeoutError("sidecar not serving in time")

    def dump_state(self) -> None:
        """Ask the sidecar to log its engine state (SIGUSR1)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)

    def worker_pids(self) -> list[int]:
        """The worker processes under a server.workers supervisor (none without workers)."""
        if self.proc is None or self.proc.poll() is not None or self.workers == 1:
            return []
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True, check=False)
        return [int(p) for p in out.stdout.split()]

    def kill9(self) -> None:
        """SIGKILL the sidecar: with workers, every worker and the supervisor alike (a killed
        supervisor alone would let its workers stop gracefully)."""
        if self.proc is not None and self.proc.poll() is None:
            for pid in self.worker_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP the sidecar (the supervisor first, so it does not see its workers stop)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        for pid in self.worker_pids():
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        for pid in self.worker_pids():
            os.kill(pid, signal.SIGCONT)
        self.proc.send_signal(signal.SIGCONT)

    def terminate(self, timeout: float = 30) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def process_env(
    kafka: services.KafkaShape, topic: str, group: str, redis_url: str | None, **extra: str
) -> dict[str, str]:
    env = {
        "DEDUP_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "DEDUP_KAFKA__TOPICS": f'["{topic}"]',
        "DEDUP_KAFKA__GROUP_ID": group,
        "DEDUP_KAFKA__SESSION_TIMEOUT_MS": "6000",
        "DEDUP_COMMIT__INTERVAL_MS": "50",
        "DEDUP_SERVER__SHUTDOWN_GRACE_SECONDS": "1",
        "DEDUP_LOG_LEVEL": "INFO",
    }
    if redis_url:
        env.update({"DEDUP_STORE__BACKEND": "redis", "DEDUP_STORE__REDIS_URL": redis_url})
    env.update(extra)
    return env


class Inbox:
    """A Subscribe stream consumed in the background into ``messages``."""

    def __init__(self, client: Any, **subscribe: Any) -> None:
        self.messages: list[Any] = []
        self._client = client
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._run(subscribe))

    async def _run(self, subscribe: dict[str, Any]) -> None:
        gen = self._client.subscribe(**subscribe)
        try:
            async for m in gen:
                self.messages.append(m)
                self._changed.set()
        finally:
            await gen.aclose()

    async def wait(self, n: int, timeout: float = 30) -> list[Any]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < n:
            if self._task.done():
                self._task.result()
                raise AssertionError(f"stream ended after {len(self.messages)} of {n} messages")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"got {len(self.messages)} of {n} messages")
            self._changed.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))
        return self.messages[:n]

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task

    async def __aenter__(self) -> Inbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def wait_group_balanced(
    kafka: services.KafkaBroker, group: str, members: int, timeout: float = 60
) -> None:
    """Wait until ``members`` members of ``group`` each own at least one partition."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": kafka.bootstrap_servers})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            desc = admin.describe_consumer_groups([group], request_timeout=5)[group].result(10)
            owners = [m for m in desc.members if m.assignment and m.assignment.topic_partitions]
            if len(desc.members) == members and len(owners) == members:
                return
        except Exception:  # noqa: BLE001 - the group may not exist yet
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError(f"group {group} did not balance over {members} members")


async def stop_all(
    stop: asyncio.Event, apps: list[asyncio.Task[None]], sidecars: dict[str, SidecarProcess]
) -> None:
    """End a multi-sidecar test: tell the apps to stop, cancel them, then stop every sidecar."""
    stop.set()
    for t in apps:
        t.cancel()
    await asyncio.gather(*apps, return_exceptions=True)
    for sc in sidecars.values():
        sc.terminate()


def set_group_config(bootstrap: str, group: str, configs: dict[str, str]) -> None:
    """Set a group's configs through the admin API (queue mode: share.record.lock.duration.ms),
    as an operator would before the sidecars start."""
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.admin._config import AlterConfigOpType, ConfigEntry, ConfigResource
    from confluent_kafka.admin._resource import ResourceType

    entries = [ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in configs.items()]
    resource = ConfigResource(ResourceType.GROUP, group, incremental_configs=entries)
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.incremental_alter_configs([resource]).values():
        fut.result(20)
