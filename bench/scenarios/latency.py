"""Latency: produce-to-app p50/p99 at a fixed rate, the sidecar against the raw consumer, with
records produced by a process of their own (bench/producer.py)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

from confluent_kafka import Consumer
from dedup_client import DedupClient

from bench.common import ROOT, SidecarProc, quiesce, services, wait_serving


def latency(
    kafka: services.KafkaShape,
    topic: str,
    rate: int,
    seconds: float,
    store: dict[str, str],
    workdir: Path,
    linger_ms: int = 5,
) -> dict[str, dict[str, float]]:
    """Produce at ``rate``/s with the send time in the value; measure the arrival delay at the app.

    The producer is its own process (bench/producer.py), with ``linger.ms`` = ``linger_ms``. The
    first ``warmup`` seconds of records are dropped for both paths: connection set-up and offset
    lookups, not steady state.
    """
    warmup = 8.0
    out: dict[str, dict[str, float]] = {}

    def start_producer(tag: str) -> subprocess.Popen[bytes]:
        script = str(ROOT / "bench" / "producer.py")
        args = [kafka.bootstrap_servers, topic, str(rate), str(warmup + seconds), tag, str(linger_ms)]
        return subprocess.Popen([sys.executable, script, *args])

    def summarize(timed: list[tuple[float, float]]) -> dict[str, float]:
        start = min(sent for sent, _ in timed) + warmup if timed else 0.0
        samples = sorted(lat for sent, lat in timed if sent >= start)
        return {
            "p50_ms": 1000 * samples[len(samples) // 2],
            "p99_ms": 1000 * samples[int(len(samples) * 0.99)],
            "samples": len(samples),
        }

    # raw consumer
    quiesce()
    c = Consumer(
        {
            "bootstrap.servers": kafka.bootstrap_servers,
            "group.id": f"lat-raw-{time.time_ns()}",
            "auto.offset.reset": "latest",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
        }
    )
    c.subscribe([topic])
    while not c.assignment():
        c.poll(0.1)
    c.poll(0.5)
    producer = start_producer(f"lr{time.time_ns()}")
    samples: list[tuple[float, float]] = []
    while producer.poll() is None:
        # One record per poll: consume(n, timeout) would wait for n records and add that wait.
        m = c.poll(0.1)
        if m is not None and m.error() is None:
            sent = float((m.value() or b"0").strip())
            samples.append((sent, time.time() - sent))
    c.close()
    out["raw consumer"] = summarize(samples)

    # sidecar
    quiesce()
    proc = SidecarProc(
        kafka,
        topic,
        f"lat-sc-{time.time_ns()}",
        {
            **store,
            "DEDUP_KAFKA__CONSUMER": json.dumps({"auto.offset.reset": "latest", "fetch.wait.max.ms": 10}),
        },
        workdir,
    )
    try:

        async def run() -> list[tuple[float, float]]:
            await wait_serving(proc.target)
            got: list[tuple[float, float]] = []
            async with DedupClient(proc.target) as cl:

                async def pump() -> None:
                    gen = cl.frames()
                    try:
                        async for frame in gen:
                            now = time.time()
                            for m in frame:
                                sent = float(m.value.strip())
                                got.append((sent, now - sent))
                                m.ack()  # coalesced by the client, as in the throughput runs
                    finally:
                        await gen.aclose()

                task = asyncio.create_task(pump())
                await asyncio.sleep(3)  # joined and assigned
                producer = start_producer(f"ls{time.time_ns()}")
                await asyncio.to_thread(producer.wait)
                await asyncio.sleep(0.5)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            return got

        out["sidecar (redis)"] = summarize(asyncio.run(run()))
    finally:
        proc.stop()
    return out
