"""Publish: a raw idempotent producer against PublishBatch and Publish, and the bounds that
leave the store, then Kafka, out (bench/ceiling.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from dedup_client import DedupClient
from dedup_client.results import publish_request

from bench.common import (
    VALUE,
    CpuBudget,
    Result,
    SidecarProc,
    cpu_per_record,
    quiesce,
    services,
    wait_serving,
)


def raw_publish(kafka: services.KafkaShape, topic: str, n: int) -> Result:
    p = Producer(
        {
            "bootstrap.servers": kafka.bootstrap_servers,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
        }
    )
    done = 0

    def cb(err: Any, msg: Any) -> None:
        nonlocal done
        done += 1

    # Warm up outside the clock, as the sidecar's producer is when its run starts: connections,
    # the topic's metadata and the idempotent producer id. Timed from a cold start, a short run
    # measured mostly this set-up (0.1-1 s), and the baseline moved 10x between runs.
    p.produce(topic, VALUE, headers=[("idempotency-key", b"raw-warm-up")])
    p.flush(30)
    quiesce()
    budget = CpuBudget()
    t0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(n):
        while True:
            try:
                p.produce(topic, VALUE, headers=[("idempotency-key", f"raw-{i}".encode())], on_delivery=cb)
                break
            except BufferError:
                p.poll(0.01)
    p.flush(120)
    dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return Result(
        "raw idempotent producer", n, dt, {**cpu_per_record(cpu, n), "cpu_by_process": budget.per_record(n)}
    )


CEILINGS = {
    "grpc": "bound: PublishBatch answered without Kafka or a store (bench/ceiling.py grpc)",
    "produce": "bound: PublishBatch through the sidecar's producer, no store (bench/ceiling.py produce)",
}


def sidecar_publish(
    kafka: services.KafkaShape,
    topic: str,
    n: int,
    store: dict[str, str],
    workdir: Path,
    batch: int,
    coalesce: bool = False,
    ceiling: str | None = None,
    store_name: str = "",
    workers: int = 1,
    wrap: Sequence[str] = (),
) -> Result:
    """``batch`` > 1: PublishBatch calls of that many, 4 in flight. Otherwise one ``publish()`` per
    record: 64 unary calls in flight, or with ``coalesce`` 2,000 calls gathered by the client.
    ``ceiling``: the same PublishBatch calls, answered by bench/ceiling.py in that mode.
    ``store_name``: said in the row's name (the Redis store's rows say none)."""
    # The sidecar consumes another (empty) topic: only the publish path is measured.
    quiesce()
    idle = f"benchidle-{time.time_ns()}"
    kafka.create_topic(idle, 1)
    proc = SidecarProc(kafka, idle, f"pub-{time.time_ns()}", store, workdir, ceiling, wrap, workers)
    cpu: list[float] = []
    budgets: list[CpuBudget] = []
    by_process: dict[str, float] = {}
    try:

        async def run() -> float:
            await wait_serving(proc.target)
            async with DedupClient(proc.target, coalesce_publishes=coalesce) as c:
                await c.workers()  # publishes then go round the workers
                prefix = f"p{batch}-{time.time_ns()}"
                # Warms the producer up, as the raw one is; a batch, which every mode serves.
                await c.publish_batch([publish_request(topic, VALUE, idempotency_key=f"{prefix}-warm-up")])
                t0 = time.perf_counter()
                cpu.append(proc.cpu_seconds())
                budgets.append(CpuBudget())
                if batch > 1:
                    sem = asyncio.Semaphore(4)

                    async def send(start: int) -> None:
                        async with sem:
                            entries = [
                                publish_request(topic, VALUE, idempotency_key=f"{prefix}-{i}")
                                for i in range(start, min(n, start + batch))
                            ]
                            await c.publish_batch(entries)

                    await asyncio.gather(*(send(s) for s in range(0, n, batch)))
                else:
                    sem = asyncio.Semaphore(2000 if coalesce else 64)

                    async def one(i: int) -> None:
                        async with sem:
                            await c.publish(topic, VALUE, idempotency_key=f"{prefix}-{i}")

                    await asyncio.gather(*(one(i) for i in range(n)))
                cpu.append(proc.cpu_seconds())
                by_process.update(budgets[0].per_record(n, cpu[1] - cpu[0]))
                return time.perf_counter() - t0

        dt = asyncio.run(run())
    finally:
        proc.stop()
    if ceiling:
        name = CEILINGS[ceiling]
    elif batch > 1:
        name = f"PublishBatch ({batch} per call, 4 calls in flight)"
    elif coalesce:
        name = "publish() coalesced by the client (2,000 in flight)"
    else:
        name = "Publish (64 calls in flight)"
    if store_name:
        name += f", {store_name} store"
    if workers > 1:
        name += f", {workers} workers"
    return Result(name, n, dt, {**cpu_per_record(cpu[1] - cpu[0], n), "cpu_by_process": by_process})
