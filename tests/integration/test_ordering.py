"""Ordering modes with real processes: three sidecars sharing a real Redis on a real broker, a
rebalance (a member joins) and a kill -9 while records are in flight.

The app is an inbox app: its effect for an idempotency key is applied once, at the first
delivery (an effect whose Ack was lost to the kill stays applied; its redelivery is a no-op).
Per Kafka key, the order in which effects were applied must be the offset order, and no two
deliveries of one Kafka key may be at apps at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import services
from confluent_kafka import Producer
from dedup_client import AckError, DedupClient

from tests.integration.helpers import (
    SidecarProcess,
    committed_offsets,
    process_env,
    stop_all,
    unique,
    wait_group_balanced,
)

PARTITIONS = 4
KEYS = 24


@dataclass
class Book:
    applied: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))  # key -> seqs
    inbox: set[str] = field(default_factory=set)
    # key -> (start, end, app, seq, attempt) of every delivery
    spans: dict[str, list[tuple[float, float, str, int, int]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    offsets: dict[str, list[tuple[int, int]]] = field(default_factory=lambda: defaultdict(list))


async def app(name: str, sc: SidecarProcess, book: Book, stop: asyncio.Event, rng: random.Random) -> None:
    """Works on every delivery of a frame at once, each taking a random time: only the sidecar's
    ordering keeps two records of one key apart (unordered, this app applies them out of order)."""

    async def work(client: DedupClient, m: Any) -> None:
        body = json.loads(m.value)
        t0 = time.monotonic()
        await asyncio.sleep(rng.random() * 0.02)
        if m.idempotency_key not in book.inbox:  # the inbox: apply once
            book.inbox.add(m.idempotency_key)
            book.applied[body["key"]].append(body["seq"])
        # The effect is done when the Ack is sent; the next record of the key may be on its way
        # before the Ack's answer is back.
        book.spans[body["key"]].append((t0, time.monotonic(), name, body["seq"], m.attempt))
        await client.ack_many([m.delivery_id])

    while not stop.is_set():
        tasks: set[asyncio.Task[None]] = set()
        try:
            async with DedupClient(sc.target) as client:
                gen = client.subscribe(max_in_flight=64)
                try:
                    async for m in gen:
                        task = asyncio.create_task(work(client, m))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                        if stop.is_set():
                            break
                finally:
                    await gen.aclose()
                    await asyncio.gather(*tasks, return_exceptions=True)
        except (grpc.aio.AioRpcError, AckError):
            pass
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)


def produce(kafka: services.KafkaBroker, topic: str, seqs: range, book: Book) -> None:
    p = Producer({"bootstrap.servers": kafka.bootstrap_servers, "linger.ms": 5, "enable.idempotence": True})

    def sent(err: object, msg: object) -> None:
        assert err is None, err

    for seq in seqs:
        for k in range(KEYS):
            key = f"acct-{k:02d}"
            body = json.dumps({"key": key, "seq": seq}).encode()
            p.produce(
                topic, body, key.encode(), headers=[("idempotency-key", f"{key}:{seq}")], on_delivery=sent
            )
    assert p.flush(30) == 0


@pytest.mark.parametrize("mode", ["key", "partition"])
async def test_ordering_holds_across_a_rebalance_and_a_kill9(
    mode: str, kafka: services.KafkaBroker, redis_server: services.RedisServer, tmp_path: Path
) -> None:
    topic, group = unique(f"order-{mode}"), unique("g")
    kafka.create_topic(topic, PARTITIONS)
    env = process_env(
        kafka,
        topic,
        group,
        redis_server.url,
        DEDUP_DELIVERY__ORDERING=mode,
        DEDUP_DELIVERY__ACK_DEADLINE_SECONDS="4",
        DEDUP_DELIVERY__LEASE_MARGIN_SECONDS="1",
        DEDUP_STORE__KEY_PREFIX=unique("p"),
    )
    sidecars = {n: SidecarProcess(env, tmp_path / f"{n}.log") for n in "abc"}
    book, stop = Book(), asyncio.Event()
    per_key = 30
    apps: list[asyncio.Task[None]] = []
    try:
        for n in "ab":
            sidecars[n].start()
        await asyncio.gather(*(sidecars[n].wait_serving() for n in "ab"))
        await wait_group_balanced(kafka, group, 2)
        apps += [asyncio.create_task(app(n, sidecars[n], book, stop, random.Random(n))) for n in "abc"]
        produce(kafka, topic, range(0, 10), book)
        deadline = time.monotonic() + 30
        while len(book.inbox) < 60 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        sidecars["a"].kill9()  # with deliveries in flight
        produce(kafka, topic, range(10, 20), book)
        sidecars["c"].start()  # a member joins: a rebalance while b delivers
        await sidecars["c"].wait_serving()
        sidecars["a"].start()
        await sidecars["a"].wait_serving()
        produce(kafka, topic, range(20, per_key), book)
        total = KEYS * per_key
        deadline = time.monotonic() + 120
        while len(book.inbox) < total and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert len(book.inbox) == total, (
            f"{total - len(book.inbox)} records never applied; logs in {tmp_path}"
        )
        ends = {p: -1 for p in range(PARTITIONS)}
        while time.monotonic() < deadline:
            got = committed_offsets(kafka, group, topic, PARTITIONS)
            if sum(got.values()) == total:
                break
            ends = got
            await asyncio.sleep(0.5)
        else:
            raise AssertionError(f"commits stopped at {ends}")
    finally:
        await stop_all(stop, apps, sidecars)

    # Within each key, effects were applied in offset (= sequence) order, each once.
    wrong = {k: seqs for k, seqs in book.applied.items() if seqs != list(range(per_key))}
    assert not wrong, f"out of order: {dict(itertools.islice(wrong.items(), 3))}; logs in {tmp_path}"
    # And no two deliveries of a key were at apps at once.
    overlaps = []
    for k, spans in book.spans.items():
        for first, second in itertools.pairwise(sorted(spans)):
            if second[0] < first[1]:
                overlaps.append((k, first[2:], second[2:]))
    assert not overlaps, f"a key at two apps at once: {overlaps[:5]}; logs in {tmp_path}"
    redelivered = sum(len(s) for s in book.spans.values()) - KEYS * per_key
    print(f"\n{mode}: {KEYS * per_key} records in order per key; {redelivered} redeliveries after the kill")
