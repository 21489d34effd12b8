"""server.workers: one sidecar as several worker processes, against a real broker and Redis.

The sidecar runs as its own OS process (the supervisor), as users start it; the Python client
finds the workers with ListWorkers and connects to each one."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import services
from dedup_client import AckResult, DedupClient
from dedup_client._proto import dedup_pb2 as pb
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.helpers import (
    ROOT,
    SidecarProcess,
    committed_offsets,
    process_env,
    raw_produce,
    unique,
    wait_group_balanced,
)

PARTITIONS = 6


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def _samples(text: str, name: str) -> dict[str, float]:
    """Worker label -> the sum of ``name``'s samples of that worker."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[s.labels["worker"]] = out.get(s.labels["worker"], 0.0) + s.value
    return out


async def _wait_offsets(kafka: services.KafkaBroker, group: str, topic: str, ends: dict[int, int]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        got = await asyncio.to_thread(committed_offsets, kafka, group, topic, PARTITIONS)
        if got == ends:
            return
        await asyncio.sleep(0.3)
    raise AssertionError(f"committed {got}, expected {ends}")


async def test_two_workers_deliver_every_partition_once_and_commit_on_ack(
    kafka: services.KafkaBroker, redis_server: services.RedisServer, tmp_path: Path
) -> None:
    topic, group = unique("workers"), unique("g-workers")
    kafka.create_topic(topic, partitions=PARTITIONS)
    metrics = f"127.0.0.1:{services.free_port()}"
    env = process_env(
        kafka, topic, group, redis_server.url, DEDUP_SERVER__WORKERS="2", DEDUP_SERVER__METRICS_LISTEN=metrics
    )
    sc = SidecarProcess(env, tmp_path / "log")
    sc.start()
    try:
        await sc.wait_serving()
        await wait_group_balanced(kafka, group, 2)
        # 300 keys, 60 of them written twice (a producer retry): 300 deliveries expected.
        records: list[tuple[str | None, bytes, int | None]] = [
            (f"k{i}", f"v{i}".encode(), i % PARTITIONS) for i in range(300)
        ]
        records += [(f"k{i}", f"v{i}".encode(), (i + 1) % PARTITIONS) for i in range(0, 300, 5)]
        await asyncio.to_thread(raw_produce, kafka, topic, records)
        async with DedupClient(sc.target) as client:
            assert await client.workers() == 2
            got: list[object] = []
            gen = client.subscribe(max_in_flight=400)  # 200 a worker
            async with asyncio.timeout(60):
                async for m in gen:
                    got.append(m)
                    if len(got) == 300:
                        break
            await gen.aclose()
            keys = Counter(m.idempotency_key for m in got)  # type: ignore[attr-defined]
            assert len(keys) == 300
            assert max(keys.values()) == 1, keys.most_common(3)
            assert {m.partition for m in got} == set(range(PARTITIONS))  # type: ignore[attr-defined]
            prefixes = {m.delivery_id.partition(".")[0] for m in got}  # type: ignore[attr-defined]
            assert len(prefixes) == 2, "both workers delivered"
            results = await asyncio.gather(*(m.ack() for m in got))  # type: ignore[attr-defined]
            assert Counter(results) == {AckResult.OK: 300}
            ends = Counter(p or 0 for _, _, p in records)
            await _wait_offsets(kafka, group, topic, dict(ends))
            # One /metrics for the sidecar: every worker's samples, labelled by worker.
            text = await asyncio.to_thread(_scrape, metrics)
            acked = _samples(text, "dedup_acked_total")
            assert set(acked) == {"0", "1"}, text[:2000]
            assert sum(acked.values()) == 300
            assert sum(_samples(text, "dedup_assigned_partitions").values()) == PARTITIONS
            assert _samples(text, "dedup_worker_up") == {"0": 1.0, "1": 1.0}
            # Publishes go round the workers; a repeated key is a duplicate whichever worker sees it.
            first = [await client.publish(topic, b"x", idempotency_key=f"pub-{i}") for i in range(4)]
            again = [await client.publish(topic, b"x", idempotency_key=f"pub-{i}") for i in range(4)]
            assert not any(r.duplicate for r in first)
            assert all(r.duplicate for r in again)
            assert [(r.partition, r.offset) for r in again] == [(r.partition, r.offset) for r in first]
        # The operator's view: `dedup-sidecar status` asks every worker.
        status = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "sidecar", "status", "--target", sc.target, "--json"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert status.returncode == 0, status.stderr
        answers = json.loads(status.stdout)["workers"]
        assert len(answers) == 2
        held = sorted(p.get("partition", 0) for w in answers for p in w.get("partitions", []))
        assert held == list(range(PARTITIONS))
        assert answers[0]["owner"] != answers[1]["owner"]
        # SIGTERM to the supervisor stops both workers gracefully.
        assert sc.proc is not None
        workers = _children(sc.proc.pid)
        assert len(workers) == 2
        assert sc.terminate() == 0
        assert not any(_alive(pid) for pid in workers)
        log = sc.log_path.read_text()
        assert "second signal" not in log
        assert log.count("sidecar stopped") == 2
    finally:
        sc.terminate()


async def test_a_worker_killed_under_a_stream_is_restarted_and_the_stream_goes_on(
    kafka: services.KafkaBroker, redis_server: services.RedisServer, tmp_path: Path
) -> None:
    """A worker SIGKILLed while the app reads: its supervisor starts it again, the app's merged
    stream does not fail (the other worker's records keep coming, and are not handed back and
    counted as attempts), and once the group has rebalanced every record is delivered and
    committed."""
    topic, group = unique("workers-kill"), unique("g-workers-kill")
    kafka.create_topic(topic, partitions=PARTITIONS)
    metrics = f"127.0.0.1:{services.free_port()}"
    env = process_env(
        kafka, topic, group, redis_server.url, DEDUP_SERVER__WORKERS="2", DEDUP_SERVER__METRICS_LISTEN=metrics
    )
    sc = SidecarProcess(env, tmp_path / "log")
    sc.start()
    attempts: dict[str, int] = {}
    try:
        await sc.wait_serving()
        await wait_group_balanced(kafka, group, 2)
        assert sc.proc is not None

        async def read(client: DedupClient) -> None:
            async for m in client.subscribe():
                attempts[m.idempotency_key] = max(m.attempt, attempts.get(m.idempotency_key, 0))
                m.ack()

        async def received(n: int) -> None:
            deadline = time.monotonic() + 60
            while len(attempts) < n:
                assert not reader.done(), reader.exception()
                assert time.monotonic() < deadline, f"{len(attempts)} of {n} keys"
                await asyncio.sleep(0.1)

        def batch(start: int) -> list[tuple[str | None, bytes, int | None]]:
            return [(f"k{i}", f"v{i}".encode(), i % PARTITIONS) for i in range(start, start + 120)]

        async with DedupClient(sc.target) as client:
            reader = asyncio.create_task(read(client))
            await asyncio.to_thread(raw_produce, kafka, topic, batch(0))
            await received(120)
            victim = max(_children(sc.proc.pid))
            os.kill(victim, signal.SIGKILL)
            await asyncio.to_thread(raw_produce, kafka, topic, batch(120))
            await received(240)
            assert not reader.done()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        assert "restarting it" in sc.log_path.read_text()
        assert len([p for p in _children(sc.proc.pid) if p != victim]) == 2
        text = await asyncio.to_thread(_scrape, metrics)
        assert sorted(_samples(text, "dedup_worker_restarts_total").values()) == [0.0, 1.0]
        # Only records the killed worker had in flight may come twice.
        assert max(attempts.values()) <= 2
        await _wait_offsets(kafka, group, topic, {p: 40 for p in range(PARTITIONS)})
    finally:
        assert sc.terminate() == 0


def test_workers_refuse_the_memory_store_and_name_the_settings(tmp_path: Path) -> None:
    env = {**os.environ, "DEDUP_SERVER__WORKERS": "2", "DEDUP_STORE__BACKEND": "memory"}
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", "--topic", "t"], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 2
    assert "server.workers" in out.stderr
    assert "store.backend" in out.stderr


async def test_workers_share_a_sqlite_store_on_unix_sockets(
    kafka: services.KafkaBroker, tmp_path: Path
) -> None:
    """Two workers on Unix sockets, one SQLite file: each answers ListWorkers with both sockets,
    a key published through one is a duplicate through the other, and no worker takes its
    sibling for another replica (the local-store warning)."""
    topic, group = unique("workers-sqlite"), unique("g-workers-sqlite")
    kafka.create_topic(topic, partitions=PARTITIONS)
    sock = tmp_path / "sidecar.sock"
    env = process_env(
        kafka,
        topic,
        group,
        None,
        DEDUP_SERVER__WORKERS="2",
        DEDUP_STORE__BACKEND="sqlite",
        DEDUP_STORE__SQLITE_PATH=str(tmp_path / "dedup.sqlite3"),
        DEDUP_SERVER__LISTEN=f"unix://{sock}",
        DEDUP_SERVER__HEALTH_LISTEN=f"127.0.0.1:{services.port_block(2)}",
    )
    sc = SidecarProcess(env, tmp_path / "log")
    sc.start()
    try:
        await sc.wait_serving()
        await wait_group_balanced(kafka, group, 2)
        assert (tmp_path / "sidecar-1.sock").exists()
        async with (
            DedupClient(f"unix://{sock}", all_workers=False) as w0,
            DedupClient(f"unix://{tmp_path / 'sidecar-1.sock'}", all_workers=False) as w1,
        ):
            listed = await w1.stub.ListWorkers(pb.ListWorkersRequest())
            assert listed.this_worker == 1
            assert [w.unix_socket for w in listed.workers] == [str(sock), str(tmp_path / "sidecar-1.sock")]
            first = await w0.publish(topic, b"x", idempotency_key="shared")
            again = await w1.publish(topic, b"x", idempotency_key="shared")
            assert again.duplicate
            assert (again.partition, again.offset) == (first.partition, first.offset)
        async with DedupClient(f"unix://{sock}") as client:
            assert await client.workers() == 2
        await asyncio.sleep(10)  # the local-store check looks three times, 3 s apart
        assert "CORRECTNESS HOLE" not in sc.log_path.read_text()
    finally:
        assert sc.terminate() == 0
    assert not sock.exists()
    assert not (tmp_path / "sidecar-1.sock").exists()
