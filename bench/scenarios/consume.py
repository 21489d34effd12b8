"""Consume: the raw confluent-kafka consumer (the baseline) against the sidecar, through the
batched Python client, the Go client, and one unary Ack per delivery."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer
from dedup_client import DedupClient

from bench.common import (
    ROOT,
    UNARY_WINDOW,
    CpuBudget,
    Result,
    SidecarProc,
    cpu_per_record,
    log,
    quiesce,
    services,
    wait_serving,
)


def raw_consume(kafka: services.KafkaShape, topic: str, n: int) -> Result:
    quiesce()
    budget = CpuBudget()
    cpu0 = time.process_time()  # this process is the raw client: every librdkafka thread counts
    c = Consumer(
        {
            "bootstrap.servers": kafka.bootstrap_servers,
            "group.id": f"raw-{time.time_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
        }
    )
    c.subscribe([topic])
    got = 0
    t0: float | None = None
    since_commit = 0
    while got < n:
        msgs = c.consume(500, 1.0)
        if not msgs:
            continue
        if t0 is None:
            t0 = time.perf_counter()
        for m in msgs:
            if m.error() is None:
                got += 1
                since_commit += 1
                c.store_offsets(m)
        if since_commit >= 1000:
            c.commit(asynchronous=False)
            since_commit = 0
    if since_commit:
        c.commit(asynchronous=False)
    dt = time.perf_counter() - (t0 or time.perf_counter())
    c.close()
    extra = {**cpu_per_record(time.process_time() - cpu0, n), "cpu_by_process": budget.per_record(n)}
    return Result("raw consumer (commit every 1,000)", n, dt, extra)


async def consume_via(
    targets: list[str], n: int, batched: bool, sample: Callable[[int], None] | None = None
) -> float:
    """Consume n records through the sidecars at ``targets``; returns seconds from first record."""
    done = asyncio.Event()
    count = 0
    t0: float | None = None

    async def one(target: str) -> None:
        nonlocal count, t0
        # Unbatched: one Ack call per record with up to UNARY_WINDOW in flight, as an app with
        # that many handlers makes them (one at a time hid the concurrency the sidecar groups).
        window = asyncio.Semaphore(UNARY_WINDOW)
        calls: set[asyncio.Task[None]] = set()

        async def ack_one(c: DedupClient, did: str) -> None:
            try:
                await c.ack_many([did])
            finally:
                window.release()

        async with DedupClient(target, coalesce_acks=batched, ack_max_ids=2000, ack_linger=0.002) as c:
            gen = c.frames(max_in_flight=5000 if batched else 500)
            try:
                async for frame in gen:
                    if t0 is None:
                        t0 = time.perf_counter()
                    if batched:
                        for m in frame:
                            m.ack()  # coalesced by the client: no round trip on the read path
                    else:
                        for m in frame:
                            await window.acquire()
                            call = asyncio.create_task(ack_one(c, m.delivery_id))
                            calls.add(call)
                            call.add_done_callback(calls.discard)
                    count += len(frame)
                    if sample is not None:
                        sample(count)
                    if count >= n:
                        await asyncio.gather(*calls)
                        await c.flush_acks()
                        done.set()
                        return
            finally:
                await gen.aclose()

    tasks = [asyncio.create_task(one(t)) for t in targets]
    await done.wait()
    dt = time.perf_counter() - (t0 or time.perf_counter())
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return dt


def go_consumer(workdir: Path) -> Path | None:
    """clients/go/examples/consume, built once per run; None without Go."""
    binary = workdir / "go-consume"
    if not binary.exists():
        if shutil.which("go") is None:
            log("Go not installed: no Go client row")
            return None
        build = ["go", "build", "-o", str(binary), "./examples/consume"]
        subprocess.run(build, cwd=ROOT / "clients" / "go", check=True, timeout=600)
    return binary


async def consume_via_go(binary: Path, target: str, n: int) -> float:
    """The same reads and gathered acks as consume_via, by the Go client in its own process."""
    proc = await asyncio.create_subprocess_exec(
        str(binary), "-target", target, "-n", str(n), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the Go consumer failed: {err.decode().strip()}")
    return float(json.loads(out)["seconds"])


def sidecar_consume(
    kafka: services.KafkaShape,
    topic: str,
    n: int,
    store: dict[str, str],
    workdir: Path,
    name: str,
    batched: bool = True,
    replicas: int = 1,
    memory: bool = False,
    go: Path | None = None,
    wrap: Sequence[str] = (),
    workers: int = 1,
) -> Result:
    """``go``: read with that build of the Go client's consume example instead of the Python client.
    ``wrap``: a command each sidecar runs under (``taskset -c 0``). ``workers``: server.workers
    of each sidecar (the client subscribes on every worker)."""
    quiesce()
    group = f"sc-{time.time_ns()}"
    procs = [
        SidecarProc(kafka, topic, group, store, workdir, wrap=wrap, workers=workers) for _ in range(replicas)
    ]
    extra: dict[str, Any] = {}
    try:

        async def run() -> float:
            await asyncio.gather(*(wait_serving(p.target) for p in procs))
            if workers > 1:  # every worker a member with its partitions, before the clock starts
                await asyncio.sleep(8.0)
            # From here: a sidecar fetches and claims ahead of its first stream.
            cpu0 = sum(p.cpu_seconds() for p in procs)
            budget = CpuBudget()
            await asyncio.sleep(1.0)
            extra["rss_start_mb"] = procs[0].rss_mb()
            marks: dict[str, float] = {}

            def sample(count: int) -> None:
                if memory and count >= n // 10 and "rss_10pct_mb" not in marks:
                    marks["rss_10pct_mb"] = procs[0].rss_mb()

            if go is not None:
                dt = await consume_via_go(go, procs[0].target, n)
            else:
                dt = await consume_via([p.target for p in procs], n, batched, sample)
            cpu_s = sum(p.cpu_seconds() for p in procs) - cpu0
            extra.update(cpu_per_record(cpu_s, n))
            if go is None:  # the Go client is a process of its own, not counted as the client
                extra["cpu_by_process"] = budget.per_record(n, cpu_s)
            extra.update(marks)
            extra["rss_end_mb"] = procs[0].rss_mb()
            return dt

        dt = asyncio.run(run())
    finally:
        for p in procs:
            p.stop()
    return Result(name, n, dt, extra)
