"""Queue mode: one partition, apps that take 5 ms per record, one sidecar in a consumer group
against one and three sidecars in a share group (kafka.group_type = "share").

Usage (scripts/bench.sh --queue wraps it)::

    python -m bench.scenarios.queue [--records 2000] [--rounds 2] [--quick]

A consumer group cannot give a partition to a second member, so with one partition its rate is
one app's: the point of queue mode is the second and third member. Each app is a process of its
own and handles one record at a time (5 ms of sleep standing for its work, then one ``Ack``
call), through the Python client.
All three configurations read the same topic (a fresh group each), written in producer batches of
10 records: the broker lends whole batches to share-group members (docs/ARCHITECTURE.md, "Queue
mode"). The Redis store, one broker. Results go into bench/results.json (key ``queue``) and the
"Queue mode" section of docs/BENCHMARKS.md; read the ratios to the consumer-group row of the same
run.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from dedup_client import DedupClient

from bench.common import ROOT, SidecarProc, log, machine, quiesce, services, wait_serving
from bench.report import save_section

WORK_S = 0.005
BATCH = 10
CONFIGS: list[tuple[str, str, int]] = [
    ("consumer group, 1 sidecar", "consumer", 1),
    ("share group, 1 sidecar", "share", 1),
    ("share group, 3 sidecars", "share", 3),
]


def write_topic(kafka: services.KafkaShape, topic: str, n: int) -> None:
    kafka.create_topic(topic, 1)
    p = Producer({"bootstrap.servers": kafka.bootstrap_servers, "linger.ms": 0, "enable.idempotence": True})
    for i in range(n):
        p.produce(topic, b"x" * 1024, headers=[("idempotency-key", f"{topic}-{i}".encode())])
        if i % BATCH == BATCH - 1:
            p.flush(30)  # one producer batch per BATCH records
    assert p.flush(30) == 0


def app_process(target: str, acked: Any, stop: Any) -> None:
    """One app in its own process (as in production: each next to its sidecar), one record at a
    time: 5 ms of work, then one Ack call. Counts its OK acks in ``acked``."""

    async def run() -> None:
        async with DedupClient(target) as client:
            gen = client.subscribe(max_in_flight=1)
            try:
                async for msg in gen:
                    await asyncio.sleep(WORK_S)
                    await client.ack_many([msg.delivery_id])
                    with acked.get_lock():
                        acked.value += 1
                    if stop.is_set():
                        break
            finally:
                await gen.aclose()

    asyncio.run(run())


def one_config(
    kafka: services.KafkaShape,
    topic: str,
    n: int,
    group_type: str,
    members: int,
    store: dict[str, str],
    work: Path,
) -> dict[str, float]:
    quiesce()
    group = f"q-{group_type}-{time.time_ns()}"
    env = {**store, "DEDUP_KAFKA__GROUP_TYPE": group_type}
    procs = [SidecarProc(kafka, topic, group, env, work) for _ in range(members)]
    ctx = multiprocessing.get_context("spawn")
    counters = [ctx.Value("l", 0) for _ in procs]
    stop = ctx.Event()
    apps: list[Any] = []
    try:

        async def ready() -> None:
            await asyncio.gather(*(wait_serving(p.target) for p in procs))

        asyncio.run(ready())
        apps = [
            ctx.Process(target=app_process, args=(p.target, c, stop))
            for p, c in zip(procs, counters, strict=True)
        ]
        for a in apps:
            a.start()
        # The clock starts once every app has acked a record: not the apps' start-up, nor a
        # member's join (a share-group member joins when its first stream attaches, and is
        # given its partitions at a heartbeat, every 5 s by default).
        deadline = time.monotonic() + 600
        while min(c.value for c in counters) < 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        t0, cpu0 = time.monotonic(), sum(p.cpu_seconds() for p in procs)
        before = sum(c.value for c in counters)
        while sum(c.value for c in counters) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        dt = time.monotonic() - t0
        cpu = sum(p.cpu_seconds() for p in procs) - cpu0
        done = sum(c.value for c in counters)
        assert done >= n, f"{done} of {n} records acked in 600 s"
        timed = n - before
        return {
            "rate": timed / dt,
            "seconds": dt,
            "cpu_us": round(cpu / timed * 1e6, 1),
            "per_app": [c.value for c in counters],
            "before_clock": before,
        }
    finally:
        stop.set()
        for a in apps:
            a.terminate()
            a.join(10)
        for p in procs:
            p.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=4_000, help="records per configuration and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="small sizes, one round: checks the harness")
    ap.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    args = ap.parse_args()
    n, rounds = (300, 1) if args.quick else (args.records, args.rounds)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in CONFIGS}
    with (
        tempfile.TemporaryDirectory(prefix="queue-bench-") as tmp,
        services.running(Path(tmp), quick_start=False) as (kafka, redis),
    ):
        store = {"DEDUP_STORE__BACKEND": "redis", "DEDUP_STORE__REDIS_URL": redis.url}
        for r in range(rounds):
            topic = f"queue-bench-{r}"
            log(f"round {r + 1} of {rounds}: {n} records into {topic} (one partition)")
            write_topic(kafka, topic, n)
            for name, group_type, members in CONFIGS:
                res = one_config(kafka, topic, n, group_type, members, store, Path(tmp))
                log(
                    f"  {name}: {res['rate']:,.0f} records/s, {res['cpu_us']} µs sidecar CPU per record, "
                    f"per app {res['per_app']} ({res['before_clock']} before the clock started)"
                )
                runs[name].append(res)
    base = statistics.median(x["rate"] for x in runs[CONFIGS[0][0]])
    rows = []
    for name, group_type, members in CONFIGS:
        rate = statistics.median(x["rate"] for x in runs[name])
        rows.append(
            {
                "name": name,
                "group_type": group_type,
                "members": members,
                "rate": rate,
                "rates": [x["rate"] for x in runs[name]],
                "x_consumer_group": rate / base,
                "cpu_us": statistics.median(x["cpu_us"] for x in runs[name]),
            }
        )
    summary: dict[str, Any] = {
        "command": " ".join(["scripts/bench.sh --queue", *sys.argv[1:]]),
        "records": n,
        "work_ms": WORK_S * 1000,
        "producer_batch": BATCH,
        "rows": rows,
        "machine": machine(),
    }
    save_section("queue", summary, Path(args.out), args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
