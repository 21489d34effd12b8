"""Per-call paths: what an app with no client library pays for one Publish per event and one Ack
per message, against the floors of a Python gRPC call and the raw client, in one run.

Usage (scripts/bench.sh --per-call wraps it)::

    python -m bench.scenarios.percall [--calls 20000] [--rounds 3] [--quick]

It starts a real Kafka broker and Redis (deploy/local/services) and, in each round, measures
with the generated stubs only (``dedup_client._proto``, no client library), 1 KB records and
``WINDOW`` calls in flight:

* unary ``Publish`` and ``StreamingPublish`` against a raw idempotent producer that keeps the
  same number of records in flight (each waits for its delivery report);
* one unary ``Ack`` per delivery, one stream ack message per delivery (``StreamingSubscribe``),
  and the batched path (each frame acked in one call), each on its own topic and sidecar;
* the floors, on the sidecar's own runtime (bench/ceiling.py echo): a bare unary call and a
  message each way on a bidirectional stream;
* the latency of a lone call (one in flight): ``Publish`` and a stream publish against the raw
  producer's produce-and-flush; ``Ack`` and a stream ack.

Each row gives the rate, the sidecar's CPU per call (or per record: the consume rows include the
consume path), and the client's. Results go into bench/results.json (key ``per_call``) and the
"Per-call paths" section of docs/BENCHMARKS.md. Read the ratios to the floors of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from confluent_kafka import Producer
from dedup_client._proto import dedup_pb2 as pb
from dedup_client._proto import dedup_pb2_grpc as rpc

from bench.common import (
    ROOT,
    VALUES,
    SidecarProc,
    log,
    machine,
    preload,
    process_cpu_seconds,
    quiesce,
    services,
    wait_serving,
)
from bench.report import save_section

log = log
WINDOW = 64
VALUE = VALUES[0]


class Meter:
    """CPU of the sidecar process (or the echo server) and of this process over one measurement."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.server0 = process_cpu_seconds(pid)
        self.client0 = time.process_time()
        self.t0 = time.perf_counter()

    def row(self, name: str, calls: int, seconds: float | None = None, **extra: Any) -> dict[str, Any]:
        wall = seconds if seconds is not None else time.perf_counter() - self.t0
        server = process_cpu_seconds(self.pid) - self.server0
        client = time.process_time() - self.client0
        row = {
            "name": name,
            "calls": calls,
            "rate": round(calls / wall, 1),
            "server_cpu_us": round(server / calls * 1e6, 1),
            "client_cpu_us": round(client / calls * 1e6, 1),
            **extra,
        }
        log(json.dumps(row))
        return row


async def windowed(n: int, window: int, call: Callable[[int], Awaitable[None]]) -> float:
    """Make ``n`` calls with ``window`` in flight; the wall time taken."""
    counter = iter(range(n))
    t0 = time.perf_counter()

    async def worker() -> None:
        for i in counter:
            await call(i)

    await asyncio.gather(*(worker() for _ in range(window)))
    return time.perf_counter() - t0


def _publish(topic: str, i: int, tag: str) -> pb.PublishRequest:
    return pb.PublishRequest(topic=topic, value=VALUE, idempotency_key=f"{tag}-{i}")


# ---------------------------------------------------------------------------------------------
# publish side


async def unary_publish(target: str, pid: int, topic: str, n: int, tag: str, name: str) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = rpc.DedupServiceStub(ch)
        await stub.Publish(_publish(topic, -1, tag))  # warm: topic metadata, connections
        meter = Meter(pid)

        async def one(i: int) -> None:
            await stub.Publish(_publish(topic, i, tag))

        seconds = await windowed(n, WINDOW, one)
        return meter.row(name, n, seconds)


async def echo_unary(target: str, pid: int, topic: str, n: int) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(target) as ch:
        call: Any = ch.unary_unary("/dedup.v1.DedupService/Publish")
        raw = _publish(topic, 0, "echo").SerializeToString()
        await call(raw)
        meter = Meter(pid)

        async def one(i: int) -> None:
            await call(raw)

        seconds = await windowed(n, WINDOW, one)
        return meter.row("floor: bare unary echo", n, seconds)


async def through_stream(
    call: Any, n: int, request: Callable[[int], Any], answers: Callable[[Any], int]
) -> float:
    """Write ``n`` requests on a bidirectional ``call`` with at most WINDOW unanswered, reading
    the answers as they come (``answers`` counts those in a response); the wall time taken."""
    room = asyncio.Semaphore(WINDOW)

    async def reader() -> None:
        answered = 0
        async for resp in call:
            got = answers(resp)
            for _ in range(got):
                room.release()
            answered += got
            if answered >= n:
                return

    t0 = time.perf_counter()
    task = asyncio.create_task(reader())
    for i in range(n):
        await room.acquire()
        await call.write(request(i))
    await task
    seconds = time.perf_counter() - t0
    await call.done_writing()
    return seconds


async def stream_publish(target: str, pid: int, topic: str, n: int, tag: str) -> dict[str, Any]:
    """One StreamingPublish stream with WINDOW records unanswered at most."""
    async with grpc.aio.insecure_channel(target) as ch:
        stub = rpc.DedupServiceStub(ch)
        await stub.Publish(_publish(topic, -1, tag))
        meter = Meter(pid)
        failed = 0

        def answers(resp: pb.StreamingPublishResponse) -> int:
            nonlocal failed
            failed += sum(r.code != 0 for r in resp.results)
            return len(resp.results)

        def request(i: int) -> pb.StreamingPublishRequest:
            return pb.StreamingPublishRequest(request_id=i + 1, publish=_publish(topic, i, tag))

        seconds = await through_stream(stub.StreamingPublish(), n, request, answers)
        return meter.row("StreamingPublish, one record per message", n, seconds, failed=failed)


async def echo_stream(target: str, pid: int, topic: str, n: int) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(target) as ch:
        call: Any = ch.stream_stream("/dedup.v1.DedupService/StreamingPublish")()
        raw = pb.StreamingPublishRequest(request_id=1, publish=_publish(topic, 0, "echo")).SerializeToString()
        meter = Meter(pid)
        seconds = await through_stream(call, n, lambda i: raw, lambda resp: 1)
        return meter.row("floor: bare stream echo, a message each way", n, seconds)


def raw_window(bootstrap: str, topic: str, n: int) -> dict[str, Any]:
    """A raw idempotent producer keeping WINDOW records in flight, each waiting for its report."""
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})
    p.produce(topic, VALUE)
    p.flush(10)
    outstanding = 0

    def done(err: Any, msg: Any) -> None:
        nonlocal outstanding
        outstanding -= 1

    client0 = time.process_time()
    t0 = time.perf_counter()
    sent = 0
    while sent < n or outstanding:
        while sent < n and outstanding < WINDOW:
            p.produce(topic, VALUE, headers=[("idempotency-key", f"raw-{sent}".encode())], on_delivery=done)
            outstanding += 1
            sent += 1
        p.poll(0.01)
    seconds = time.perf_counter() - t0
    client = time.process_time() - client0
    row = {
        "name": f"raw idempotent producer, {WINDOW} records in flight",
        "calls": n,
        "rate": round(n / seconds, 1),
        "client_cpu_us": round(client / n * 1e6, 1),
    }
    log(json.dumps(row))
    return row


def percentiles(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "p50_ms": round(statistics.median(s) * 1000, 3),
        "p99_ms": round(s[min(len(s) - 1, int(len(s) * 0.99))] * 1000, 3),
    }


async def lone_publish(target: str, topic: str, n: int, tag: str) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = rpc.DedupServiceStub(ch)
        await stub.Publish(_publish(topic, -1, tag))
        unary: list[float] = []
        for i in range(n):
            t0 = time.perf_counter()
            await stub.Publish(_publish(topic, i, tag))
            unary.append(time.perf_counter() - t0)
        call = stub.StreamingPublish()
        streamed: list[float] = []
        it = call.__aiter__()
        for i in range(n):
            t0 = time.perf_counter()
            await call.write(
                pb.StreamingPublishRequest(request_id=i + 1, publish=_publish(topic, i, tag + "s"))
            )
            await it.__anext__()
            streamed.append(time.perf_counter() - t0)
        await call.done_writing()
        return {"publish": percentiles(unary), "stream_publish": percentiles(streamed)}


def lone_raw(bootstrap: str, topic: str, n: int) -> dict[str, float]:
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})
    p.produce(topic, VALUE)
    p.flush(10)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        p.produce(topic, VALUE, headers=[("idempotency-key", f"lone-{i}".encode())])
        p.flush(10)
        times.append(time.perf_counter() - t0)
    return percentiles(times)


# ---------------------------------------------------------------------------------------------
# consume side: each row on its own topic and sidecar


async def unary_acks(target: str, pid: int, topic: str, n: int) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = rpc.DedupServiceStub(ch)
        meter = Meter(pid)
        acked = 0
        t0: float | None = None
        tasks: set[asyncio.Task[None]] = set()
        finished = asyncio.Event()

        async def ack(did: str) -> None:
            nonlocal acked
            await stub.Ack(pb.AckRequest(delivery_ids=[did]))
            acked += 1
            if acked >= n:
                finished.set()

        stream = stub.Subscribe(pb.SubscribeRequest(topics=[topic], max_in_flight=WINDOW))

        async def read() -> None:
            nonlocal t0
            async for frame in stream:
                if t0 is None:
                    t0 = time.perf_counter()
                for d in frame.deliveries:
                    task = asyncio.create_task(ack(d.delivery_id))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)

        reading = asyncio.create_task(read())
        await finished.wait()
        seconds = time.perf_counter() - (t0 or 0)
        stream.cancel()
        reading.cancel()
        return meter.row(f"unary Ack per delivery, {WINDOW} in flight", n, seconds)


async def frame_acks(target: str, pid: int, topic: str, n: int) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = rpc.DedupServiceStub(ch)
        meter = Meter(pid)
        acked = 0
        t0: float | None = None
        stream = stub.Subscribe(pb.SubscribeRequest(topics=[topic]))
        async for frame in stream:
            if t0 is None:
                t0 = time.perf_counter()
            ids = [d.delivery_id for d in frame.deliveries]
            await stub.Ack(pb.AckRequest(delivery_ids=ids))
            acked += len(ids)
            if acked >= n:
                break
        seconds = time.perf_counter() - (t0 or 0)
        stream.cancel()
        return meter.row("batched: each frame acked in one call", acked, seconds)


async def stream_acks(target: str, pid: int, topic: str, n: int) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = rpc.DedupServiceStub(ch)
        meter = Meter(pid)
        call = stub.StreamingSubscribe()
        await call.write(
            pb.StreamingSubscribeRequest(subscribe=pb.SubscribeRequest(topics=[topic], max_in_flight=WINDOW))
        )
        answered = rid = 0
        failed = 0
        t0: float | None = None
        async for resp in call:
            if t0 is None:
                t0 = time.perf_counter()
            for r in resp.results:
                failed += r.code != 0 or r.results[0] != pb.ACK_RESULT_OK
            answered += len(resp.results)
            if answered >= n:
                break
            for d in resp.deliveries:
                rid += 1
                await call.write(
                    pb.StreamingSubscribeRequest(
                        ack=pb.StreamAck(request_id=rid, delivery_ids=[d.delivery_id])
                    )
                )
        seconds = time.perf_counter() - (t0 or 0)
        call.cancel()
        return meter.row("StreamingSubscribe, one ack message per delivery", n, seconds, failed=failed)


async def lone_acks(target: str, topic: str, n: int) -> dict[str, Any]:
    """One delivery in flight at a time: the latency of its Ack, then of a stream ack."""
    async with grpc.aio.insecure_channel(target) as ch:
        stub = rpc.DedupServiceStub(ch)
        unary: list[float] = []
        stream = stub.Subscribe(pb.SubscribeRequest(topics=[topic], max_in_flight=1))
        async for frame in stream:
            for d in frame.deliveries:
                t0 = time.perf_counter()
                await stub.Ack(pb.AckRequest(delivery_ids=[d.delivery_id]))
                unary.append(time.perf_counter() - t0)
            if len(unary) >= n:
                break
        stream.cancel()
        call = stub.StreamingSubscribe()
        await call.write(
            pb.StreamingSubscribeRequest(subscribe=pb.SubscribeRequest(topics=[topic], max_in_flight=1))
        )
        streamed: list[float] = []
        sent_at = 0.0
        rid = 0
        async for resp in call:
            if resp.results:
                streamed.append(time.perf_counter() - sent_at)
                if len(streamed) >= n:
                    break
            for d in resp.deliveries:
                rid += 1
                sent_at = time.perf_counter()
                await call.write(
                    pb.StreamingSubscribeRequest(
                        ack=pb.StreamAck(request_id=rid, delivery_ids=[d.delivery_id])
                    )
                )
        call.cancel()
        return {"ack": percentiles(unary), "stream_ack": percentiles(streamed)}


# ---------------------------------------------------------------------------------------------


def sidecar(kafka: Any, redis_url: str, topic: str, workdir: Path, ceiling: str | None = None) -> Any:
    proc = SidecarProc(
        kafka,
        topic,
        f"percall-{topic}",
        {"DEDUP_STORE__BACKEND": "redis", "DEDUP_STORE__REDIS_URL": redis_url},
        workdir,
        ceiling=ceiling,
    )
    asyncio.run(wait_serving(proc.target))
    return proc


def one_round(kafka: Any, redis_url: str, n: int, r: int, workdir: Path, lone: int) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    pub = f"percall-pub-{r}"
    kafka.create_topic(pub, 6)
    boot = kafka.bootstrap_servers
    echo = sidecar(kafka, redis_url, pub, workdir, ceiling="echo")
    try:
        rows.append(asyncio.run(echo_unary(echo.target, echo.proc.pid, pub, n)))
        rows.append(asyncio.run(echo_stream(echo.target, echo.proc.pid, pub, n)))
    finally:
        echo.stop()
    idle = f"percall-idle-{r}"
    kafka.create_topic(idle, 1)
    sc = sidecar(kafka, redis_url, idle, workdir)
    try:
        quiesce()
        rows.append(raw_window(boot, pub, n))
        rows.append(
            asyncio.run(
                unary_publish(sc.target, sc.proc.pid, pub, n, f"u{r}", f"unary Publish, {WINDOW} in flight")
            )
        )
        rows.append(asyncio.run(stream_publish(sc.target, sc.proc.pid, pub, n, f"s{r}")))
        latency = asyncio.run(lone_publish(sc.target, pub, lone, f"lone{r}"))
        latency["raw_produce_flush"] = lone_raw(boot, pub, lone)
    finally:
        sc.stop()
    for name, fn in (("unary", unary_acks), ("stream", stream_acks), ("frame", frame_acks)):
        topic = f"percall-{name}-{r}"
        preload(kafka, topic, 6, n, f"{topic}-k")
        quiesce()
        sc = sidecar(kafka, redis_url, topic, workdir)
        try:
            rows.append(asyncio.run(fn(sc.target, sc.proc.pid, topic, n)))
        finally:
            sc.stop()
    topic = f"percall-lone-{r}"
    preload(kafka, topic, 1, 2 * lone + 10, f"{topic}-k")
    sc = sidecar(kafka, redis_url, topic, workdir)
    try:
        latency.update(asyncio.run(lone_acks(sc.target, topic, lone)))
    finally:
        sc.stop()
    log(json.dumps(latency))
    return {"rows": rows, "latency": latency}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per row, the median of each figure over the rounds (and every round's rate)."""
    names = [row["name"] for row in rounds[0]["rows"]]
    rows = []
    for name in names:
        same = [row for rnd in rounds for row in rnd["rows"] if row["name"] == name]
        merged: dict[str, Any] = {"name": name, "rates": [row["rate"] for row in same]}
        for key in ("rate", "server_cpu_us", "client_cpu_us"):
            if key in same[0]:
                merged[key] = round(statistics.median(row[key] for row in same), 1)
        rows.append(merged)
    latency: dict[str, Any] = {}
    for what in rounds[0]["latency"]:
        latency[what] = {
            k: round(statistics.median(rnd["latency"][what][k] for rnd in rounds), 3)
            for k in ("p50_ms", "p99_ms")
        }
    return {"rows": rows, "latency": latency}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20_000, help="calls (or records) per row")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lone", type=int, default=500, help="calls one at a time per latency figure")
    ap.add_argument("--quick", action="store_true", help="small sizes, one round: checks the harness")
    ap.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    args = ap.parse_args()
    n, rounds, lone = (2_000, 1, 100) if args.quick else (args.calls, args.rounds, args.lone)
    results: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="percall-") as tmp,
        services.running(Path(tmp), quick_start=False) as (kafka, redis),
    ):
        for r in range(rounds):
            log(f"round {r + 1} of {rounds}")
            results.append(one_round(kafka, redis.url, n, r, Path(tmp), lone))
    summary = summarize(results)
    summary["command"] = " ".join(["scripts/bench.sh --per-call", *sys.argv[1:]])
    summary["window"] = WINDOW
    summary["machine"] = machine()
    save_section("per_call", summary, Path(args.out), args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
