"""Ordering modes, retry topics and poison records, in the engine against an in-memory store and a
fake consumer (the real-broker proofs are in tests/integration/test_ordering.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest
from confluent_kafka import Message

from sidecar import config
from sidecar.engine.engine import AckOutcome, Engine
from sidecar.engine.identity import store_key
from sidecar.engine.records import Pending
from sidecar.errors import InvalidArgument
from sidecar.kafka.consumer import Assigned, ConsumerLoop
from sidecar.kafka.producer import AsyncProducer
from sidecar.observability.metrics import Metrics
from sidecar.store.memory import MemoryStore
from tests.unit.test_engine import FakeConsumer, FakeProducer

T = "orders"
Factory = Callable[..., AsyncIterator[tuple[Engine, FakeConsumer, FakeProducer]]]


def rec(offset: int, key: str | None, idem: str | None = None, partition: int = 0, topic: str = T) -> Message:
    headers: list[tuple[str, str | bytes | None]] = [("idempotency-key", (idem or f"i{offset}").encode())]
    return Message(
        topic=topic,
        partition=partition,
        offset=offset,
        key=key.encode() if key is not None else None,
        value=b"v%d" % offset,
        headers=headers,
        timestamp=(1, 1),
    )


async def start(**delivery: Any) -> tuple[Engine, FakeConsumer, FakeProducer]:
    settings = config.load(
        None,
        kafka={"topics": [T]},
        delivery={"ack_deadline_seconds": 30, "busy_retry_seconds": 0.05, **delivery},
    )
    producer = FakeProducer()
    eng = Engine(settings, MemoryStore(), cast(AsyncProducer, producer), Metrics(), owner="me")
    consumer = FakeConsumer()
    eng.start(cast(ConsumerLoop, consumer))
    await eng.on_assigned([Assigned(T, 0, -1, None)])
    return eng, consumer, producer


@pytest.fixture
async def engines() -> AsyncIterator[Callable[..., Any]]:
    made: list[Engine] = []

    async def make(**delivery: Any) -> tuple[Engine, FakeConsumer, FakeProducer]:
        e = await start(**delivery)
        made.append(e[0])
        return e

    yield make
    for e in made:
        await e.stop(0)


async def settle_down() -> None:
    for _ in range(30):
        await asyncio.sleep(0.01)


async def frame(eng: Engine, s: Any, timeout: float = 1.0) -> list[Pending]:
    try:
        return await asyncio.wait_for(eng.next_frame(s), timeout)
    except TimeoutError:
        return []


def offsets(batch: list[Pending]) -> list[int]:
    return [p.offset for p in batch]


async def test_key_ordering_holds_a_key_behind_its_unsettled_record(engines: Any) -> None:
    eng, _, _ = await engines(ordering="key")
    s = eng.attach([], 100, 0, 100)
    eng.on_records([rec(0, "a"), rec(1, "b"), rec(2, "a"), rec(3, "a"), rec(4, None), rec(5, None)])
    await settle_down()
    first = await frame(eng, s)
    # One record per key at a time; records without a key are not ordered.
    assert offsets(first) == [0, 1, 4, 5]
    assert eng.describe()["partitions"][f"{T}[0]"]["states"]["held"] == 2
    assert await frame(eng, s, 0.2) == []
    await eng.ack([first[0].delivery_ids[-1]])
    [second] = await frame(eng, s)
    assert second.offset == 2
    # A Nack with a delay keeps the key held: record 3 waits for the redelivery of 2.
    await eng.nack([second.delivery_ids[-1]], 0.3, False, "")
    assert await frame(eng, s, 0.15) == []
    [again] = await frame(eng, s)
    assert (again.offset, again.attempt) == (2, 2)
    await eng.ack([again.delivery_ids[-1]])
    [third] = await frame(eng, s)
    assert third.offset == 3


async def test_partition_ordering_sends_one_record_at_a_time(engines: Any) -> None:
    eng, _, _ = await engines(ordering="partition")
    s = eng.attach([], 100, 0, 100)
    eng.on_records([rec(i, f"k{i}") for i in range(4)])
    await settle_down()
    seen = []
    for _ in range(4):
        batch = await frame(eng, s)
        assert len(batch) == 1
        seen.append(batch[0].offset)
        await eng.ack([batch[0].delivery_ids[-1]])
    assert seen == [0, 1, 2, 3]
    await settle_down()
    assert eng.committable() == {(T, 0): 4}


async def test_a_duplicate_does_not_hold_its_key_back(engines: Any) -> None:
    eng, _, _ = await engines(ordering="key")
    done = store_key(eng.settings.kafka.group_id, T, "already")
    await eng.store.complete([done], "someone", 60_000)
    s = eng.attach([], 100, 0, 100)
    eng.on_records([rec(0, "a"), rec(1, "a", idem="already"), rec(2, "a")])
    await settle_down()
    [first] = await frame(eng, s)
    await eng.ack([first.delivery_ids[-1]])
    # Record 1 was settled as a duplicate as soon as its claim came back: 2 goes next.
    [nxt] = await frame(eng, s)
    assert nxt.offset == 2
    assert eng.metrics.skipped.labels("duplicate", T)._value.get() == 1


async def test_a_subscribe_may_narrow_the_ordering_but_not_widen_it(engines: Any) -> None:
    eng, _, _ = await engines()
    eng.on_records([rec(0, "a"), rec(1, "a"), rec(2, "b")])
    await settle_down()
    # Records taken in before the narrowing stream attached are chained again.
    s = eng.attach([T], 100, 0, 100, "key")
    first = await frame(eng, s)
    assert offsets(first) == [0, 2]
    await eng.ack([first[0].delivery_ids[-1]])
    assert offsets(await frame(eng, s)) == [1]  # once: it left the ready queue when it was held
    assert await frame(eng, s, 0.2) == []
    eng.detach(s)
    # Back to unordered: everything goes (the closed stream's records are redelivered).
    s2 = eng.attach([T], 100, 0, 100)
    got: list[Pending] = []
    for _ in range(3):
        got += await frame(eng, s2, 0.5)
    assert sorted(offsets(got)) == [1, 2]

    strict, _, _ = await engines(ordering="key")
    with pytest.raises(InvalidArgument, match=r"delivery.ordering = 'key'.*never widen"):
        strict.attach([T], 100, 0, 100, "unordered")


async def time_out(eng: Engine, s: Any, n: int) -> list[tuple[int, int]]:
    """Take ``n`` deliveries of one record on ``s``, each left to pass its ack deadline as by an
    app that lost it; returns each delivery's (attempt, failures)."""
    seen = []
    for _ in range(n):
        [p] = await frame(eng, s)
        seen.append((p.attempt, p.failures))
        eng.dispatch.expired.clear()  # the app lost these copies: no credit held for them
        s.expired.clear()
        s.in_flight_bytes = 0
    return seen


async def dead_letter_headers(producer: FakeProducer) -> dict[str, bytes]:
    """The headers of the one record written, which must be a dead letter."""
    for _ in range(100):
        if producer.records:
            break
        await asyncio.sleep(0.02)
    [(topic, _, headers)] = producer.records
    assert topic == f"{T}.dlq"
    return dict(headers)


async def test_a_record_that_times_out_every_time_goes_to_the_dead_letter_topic(engines: Any) -> None:
    eng, _, producer = await engines(max_attempts=2, ack_deadline_seconds=0.1, lease_margin_seconds=0)
    s = eng.attach([], 100, 0, 100)
    eng.on_records([rec(0, "a")])
    assert [attempt for attempt, _ in await time_out(eng, s, 2)] == [1, 2]
    h = await dead_letter_headers(producer)
    assert h["dedup-reason-code"] == b"deadline"
    assert h["dedup-reason"].startswith(b"deadline")
    assert h["dedup-attempts"] == b"2"
    await settle_down()
    assert eng.committable() == {(T, 0): 1}


async def test_takeovers_count_attempts_and_only_failures_count_toward_max_attempts(engines: Any) -> None:
    # Three sidecars claimed the key before and died (their leases ran out): a rebalance churn's
    # hand-backs. That is three attempts the app may have seen, and no failure: the record is
    # delivered (attempt 4), not dead-lettered. Its two ack deadlines then are failures.
    eng, _, producer = await engines(max_attempts=2, ack_deadline_seconds=0.1, lease_margin_seconds=0)
    key = store_key(eng.settings.kafka.group_id, T, "i0")
    for owner in ("dead-1", "dead-2", "dead-3"):
        await eng.store.claim([key], owner, 1)
        await asyncio.sleep(0.005)
    s = eng.attach([], 100, 0, 100)
    eng.on_records([rec(0, "a")])
    assert await time_out(eng, s, 2) == [(4, 0), (5, 1)]
    h = await dead_letter_headers(producer)
    assert (h["dedup-reason-code"], h["dedup-attempts"], h["dedup-failures"]) == (b"deadline", b"5", b"2")


async def test_a_long_nack_moves_to_a_retry_topic_and_comes_back_when_due(engines: Any) -> None:
    eng, consumer, producer = await engines(retry_tiers_seconds=[0.2, 60])
    retry_topic = f"{T}.retry.0"
    assert eng.retry_topics == [f"{T}.retry.0", f"{T}.retry.1"]
    await eng.on_assigned([Assigned(retry_topic, 0, -1, None)])
    s = eng.attach([T], 100, 0, 100)
    eng.on_records([rec(7, "a")])
    [p] = await frame(eng, s)
    t0 = time.time()
    await eng.nack([p.delivery_ids[-1]], 1.5, False, "")
    for _ in range(100):
        if producer.records:
            break
        await asyncio.sleep(0.01)
    [(topic, value, headers)] = producer.records
    assert topic == retry_topic  # 1.5 s: the largest tier not above it
    await settle_down()
    assert eng.committable()[(T, 0)] == 8  # the source partition commits past it
    # The sidecar reads its retry topic: the record waits for its due time, its partition paused.
    back = Message(
        topic=retry_topic, partition=0, offset=0, key=b"a", value=value, headers=headers, timestamp=(1, 1)
    )
    eng.on_records([back])
    await settle_down()
    assert consumer.paused[(retry_topic, 0)] is True
    [again] = await frame(eng, s, 3)
    assert time.time() - t0 >= 1.45
    assert again.coordinates() == (T, 0, 7)
    assert again.attempt == 2
    assert [k for k, _ in again.headers] == ["idempotency-key"]
    assert consumer.paused[(retry_topic, 0)] is False
    assert await eng.ack([again.delivery_ids[-1]]) == [AckOutcome.OK]
    # Read from the source topic again (its commit was lost with the partition): a duplicate.
    await eng.on_revoked([(T, 0)], lost=True)
    await eng.on_assigned([Assigned(T, 0, 7, None)])
    eng.on_records([rec(7, "a")])
    await settle_down()
    assert await frame(eng, s, 0.2) == []
    assert eng.metrics.skipped.labels("duplicate", T)._value.get() == 1


def test_retry_topics_are_refused_with_an_ordering() -> None:
    with pytest.raises(Exception, match=r"retry_tiers_seconds cannot be used with delivery\.ordering"):
        config.load(None, kafka={"topics": [T]}, delivery={"ordering": "key", "retry_tiers_seconds": [60]})
