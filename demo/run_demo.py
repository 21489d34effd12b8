"""The README's demo: real Kafka and Redis, the sidecar as its own process, and a small app.

The app publishes messages through the sidecar, some of them deliberately twice:

* re-published through ``Publish`` with the same idempotency key (the sidecar produces once);
* written a second time by a plain Kafka producer that "retried" (the duplicate is in Kafka, and
  the sidecar skips it on the consuming side).

Then it consumes through ``Subscribe``, acks every delivery, and prints what was delivered and
what was skipped, with the sidecar's own counters read from its /metrics endpoint.

``--queue`` runs it in queue mode: three sidecars in one share group read a topic of ONE
partition, each with an app that takes 5 ms per record, and the work spreads over the three.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
from confluent_kafka import Consumer, Producer
from dedup_client import DedupClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "deploy" / "local"))  # the services package, as the tests import it
import services  # noqa: E402

TOPIC = "demo-orders"
QUEUE_TOPIC = "demo-jobs"  # one partition, read through a share group (--queue)


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def publish_half(
    client: DedupClient, unique: int, republish: int, topic: str = TOPIC
) -> dict[str, Any]:
    """Publish ``unique`` orders, then ``republish`` of them again (same key, same payload)."""
    keys = [f"order-{i:05d}" for i in range(unique)]
    first = {}
    for k in keys:
        first[k] = await client.publish(topic, f'{{"order": "{k}"}}'.encode(), idempotency_key=k)
    for k in keys[:republish]:  # an app retrying after a timeout: same key, same payload
        r = await client.publish(topic, f'{{"order": "{k}"}}'.encode(), idempotency_key=k)
        assert r.duplicate
        assert r.offset == first[k].offset
    return first


async def publish_only(target: str, bootstrap: str, unique: int, republish: int) -> bool:
    """The publish half against a publish-only sidecar (no kafka.topics): every key is in the
    topic once, read back with a plain consumer, and Subscribe says why it cannot work."""
    async with DedupClient(target) as client:
        await publish_half(client, unique, republish)
        gen = client.subscribe([TOPIC])
        try:
            await anext(gen)
        except grpc.aio.AioRpcError as exc:
            print(f"demo: Subscribe on a publish-only sidecar: {exc.code().name}: {exc.details()}")
        finally:
            await gen.aclose()
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "demo-reader", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([TOPIC])
    counts: dict[str, int] = {}
    deadline = time.monotonic() + 30
    while sum(counts.values()) < unique and time.monotonic() < deadline:
        for m in consumer.consume(500, 1.0):
            if m.error() is None:
                k = repr(dict(m.headers() or []).get("idempotency-key"))
                counts[k] = counts.get(k, 0) + 1
    consumer.close()
    print(
        f"demo: published {unique} orders, re-published {republish}; the topic holds {sum(counts.values())}"
    )
    return len(counts) == unique and all(n == 1 for n in counts.values())


async def app(target: str, bootstrap: str, unique: int, republish: int, kafka_dups: int) -> dict[str, int]:
    async with DedupClient(target) as client:
        keys = [f"order-{i:05d}" for i in range(unique)]
        first = await publish_half(client, unique, republish)
        repeated = republish
        producer = Producer({"bootstrap.servers": bootstrap})
        for k in keys[-kafka_dups:]:  # a plain producer whose retry wrote the record twice
            r = first[k]
            producer.produce(
                TOPIC,
                value=f'{{"order": "{k}"}}'.encode(),
                headers=[("idempotency-key", k.encode())],
                partition=r.partition,
            )
        producer.flush(30)
        print(
            f"demo: published {unique} orders; re-published {repeated} through Publish (not produced again); "
            f"wrote {kafka_dups} duplicates straight into Kafka",
            flush=True,
        )

        delivered: dict[str, int] = {}
        deadline = time.monotonic() + 60
        gen = client.subscribe([TOPIC])  # an async generator: close it explicitly
        try:
            async for msg in gen:
                delivered[msg.idempotency_key] = delivered.get(msg.idempotency_key, 0) + 1
                msg.ack()
                if len(delivered) == unique or time.monotonic() > deadline:
                    break
        finally:
            await gen.aclose()
        await client.flush_acks()
        await asyncio.sleep(1.0)  # let a trailing duplicate be skipped and the commit land
        return delivered


async def queue_apps(
    targets: list[str], bootstrap: str, unique: int, republish: int, kafka_dups: int
) -> dict[str, dict[str, int]]:
    """Queue mode: publish through the first sidecar, then one app per sidecar, 5 ms of work per
    record, 10 in flight each. Returns each app's deliveries per key."""
    async with DedupClient(targets[0]) as client:
        first = await publish_half(client, unique, republish, QUEUE_TOPIC)
    producer = Producer({"bootstrap.servers": bootstrap})
    for k in list(first)[-kafka_dups:]:  # a plain producer whose retry wrote the record twice
        producer.produce(
            QUEUE_TOPIC, value=f'{{"order": "{k}"}}'.encode(), headers=[("idempotency-key", k.encode())]
        )
        producer.poll(0)
    producer.flush(30)
    print(
        f"demo: published {unique} jobs to {QUEUE_TOPIC} (one partition); re-published {republish} "
        f"through Publish; wrote {kafka_dups} duplicates straight into Kafka",
        flush=True,
    )
    seen: dict[str, dict[str, int]] = {t: {} for t in targets}
    done = asyncio.Event()

    async def one(target: str) -> None:
        async with DedupClient(target) as client:
            gen = client.subscribe([QUEUE_TOPIC], max_in_flight=10)
            try:
                async for msg in gen:
                    await asyncio.sleep(0.005)  # the work
                    mine = seen[target]
                    mine[msg.idempotency_key] = mine.get(msg.idempotency_key, 0) + 1
                    msg.ack()
                    if len({k for d in seen.values() for k in d}) >= unique:
                        done.set()
            finally:
                await gen.aclose()

    apps = [asyncio.create_task(one(t)) for t in targets]
    try:
        await asyncio.wait_for(done.wait(), 120)
        await asyncio.sleep(1.0)  # let trailing duplicates be skipped
    except TimeoutError:
        pass
    finally:
        for t in apps:
            t.cancel()
        await asyncio.gather(*apps, return_exceptions=True)
    return seen


def run_queue(kafka: Any, redis: Any, tmp: Path, args: argparse.Namespace) -> int:
    """``--queue``: three sidecars in one share group on a topic of one partition."""
    kafka.create_topic(QUEUE_TOPIC, 1)
    procs: list[tuple[subprocess.Popen[bytes], int, int, Path]] = []
    for i in range(3):
        port, metrics_port = services.free_port(), services.free_port()
        env = {
            **os.environ,
            "DEDUP_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "DEDUP_KAFKA__TOPICS": f'["{QUEUE_TOPIC}"]',
            "DEDUP_KAFKA__GROUP_ID": "demo-workers",
            "DEDUP_KAFKA__GROUP_TYPE": "share",
            "DEDUP_STORE__BACKEND": "redis",
            "DEDUP_STORE__REDIS_URL": redis.url,
            "DEDUP_SERVER__LISTEN": f"127.0.0.1:{port}",
            "DEDUP_SERVER__METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        }
        log_path = tmp / f"sidecar-{i}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sidecar"], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        procs.append((proc, port, metrics_port, log_path))
    print(f"demo: queue mode: 3 sidecars in share group demo-workers on 127.0.0.1:{[p[1] for p in procs]}")
    try:
        time.sleep(2.0)
        seen = asyncio.run(
            queue_apps(
                [f"127.0.0.1:{p[1]}" for p in procs],
                kafka.bootstrap_servers,
                args.messages,
                args.republish,
                args.kafka_duplicates,
            )
        )
        skipped = sum(int(metric(p[2], "dedup_skipped_total")) for p in procs)
        accepted = sum(int(metric(p[2], 'dedup_share_acknowledgements_total{type="accept"}')) for p in procs)
    finally:
        for proc, *_ in procs:
            proc.terminate()
        for proc, *_ in procs:
            proc.wait(30)
    per_app = [sum(d.values()) for d in seen.values()]
    keys: dict[str, int] = {}
    for d in seen.values():
        for k, n in d.items():
            keys[k] = keys.get(k, 0) + n
    twice = sum(1 for n in keys.values() if n > 1)
    print(f"demo: records in Kafka:          {args.messages + args.kafka_duplicates}")
    print(f"demo: delivered per app:         {per_app} ({len(keys)} distinct keys)")
    print(f"demo: accepted by the group:     {accepted}")
    print(f"demo: skipped as duplicates:     {skipped}")
    print(f"demo: keys delivered twice:      {twice}")
    ok = len(keys) == args.messages and twice == 0 and skipped == args.kafka_duplicates
    ok = ok and all(n > 0 for n in per_app)
    print("demo: OK: every job delivered once, spread over 3 apps" if ok else "demo: MISMATCH")
    if not ok:
        for *_, log_path in procs:
            print(log_path.read_text()[-2000:])
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--republish", type=int, default=150)
    parser.add_argument("--kafka-duplicates", type=int, default=100)
    parser.add_argument(
        "--publish-only", action="store_true", help="a sidecar with no kafka.topics: the publish half alone"
    )
    parser.add_argument(
        "--queue",
        action="store_true",
        help="queue mode: three sidecars in one share group on a topic of one partition (Kafka 4.2+)",
    )
    services.add_redis_shape_argument(parser)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="dedup-demo-") as tmp,
        services.running(Path(tmp), redis_shape=args.redis) as (kafka, redis),
    ):
        if args.queue:
            return run_queue(kafka, redis, Path(tmp), args)
        kafka.create_topic(TOPIC, 3)
        port, metrics_port = services.free_port(), services.free_port()
        env = {
            **os.environ,
            "DEDUP_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "DEDUP_KAFKA__TOPICS": "[]" if args.publish_only else f'["{TOPIC}"]',
            "DEDUP_KAFKA__GROUP_ID": "demo-app",
            "DEDUP_STORE__BACKEND": "redis",
            "DEDUP_STORE__REDIS_URL": redis.url,
            "DEDUP_SERVER__LISTEN": f"127.0.0.1:{port}",
            "DEDUP_SERVER__METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        }
        log_path = Path(tmp) / "sidecar.log"
        print(
            f"demo: sidecar on 127.0.0.1:{port} (log: {log_path}), "
            f"Kafka {kafka.bootstrap_servers}, {redis.url}"
        )
        with open(log_path, "wb") as log:
            sidecar = subprocess.Popen(
                [sys.executable, "-m", "sidecar"], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            time.sleep(1.5)
            if args.publish_only:
                once = asyncio.run(
                    publish_only(f"127.0.0.1:{port}", kafka.bootstrap_servers, args.messages, args.republish)
                )
                print("demo: OK: every order in the topic once" if once else "demo: MISMATCH")
                return 0 if once else 1
            delivered = asyncio.run(
                app(
                    f"127.0.0.1:{port}",
                    kafka.bootstrap_servers,
                    args.messages,
                    args.republish,
                    args.kafka_duplicates,
                )
            )
            skipped = int(metric(metrics_port, "dedup_skipped_total"))
            acked = int(metric(metrics_port, "dedup_acked_total"))
        finally:
            sidecar.terminate()
            sidecar.wait(30)
        twice = sum(1 for n in delivered.values() if n > 1)
        if isinstance(redis, services.RedisCluster):
            spread = [int(m.cli("DBSIZE").strip()) for m in redis.masters()]
            print(f"demo: store keys per Cluster master: {spread}")
        print(f"demo: records in Kafka:          {args.messages + args.kafka_duplicates}")
        print(f"demo: delivered to the app:      {sum(delivered.values())} ({len(delivered)} distinct keys)")
        print(f"demo: acked:                     {acked}")
        print(f"demo: skipped as duplicates:     {skipped}")
        print(f"demo: keys delivered twice:      {twice}")
        ok = len(delivered) == args.messages and twice == 0 and skipped == args.kafka_duplicates
        print("demo: OK: every order delivered once" if ok else "demo: MISMATCH: see the sidecar log above")
        if not ok:
            print(log_path.read_text()[-4000:])
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
