"""Ack deadlines, ExtendDeadline, Nack with backoff, dead letters, and stream-close redelivery."""

from __future__ import annotations

import asyncio
import time

import services
from dedup_client import AckResult, DedupClient

from tests.integration.helpers import (
    Inbox,
    committed_offsets,
    raw_produce,
    read_topic,
    running_sidecar,
    settings_dict,
    unique,
)


def config(kafka: services.KafkaBroker, topic: str, group: str, **delivery: object) -> dict[str, object]:
    return settings_dict(
        kafka,
        [topic],
        group,
        delivery={"ack_deadline_seconds": 1.0, "lease_margin_seconds": 1.0, "max_attempts": 3, **delivery},
    )


async def test_ack_deadline_redelivers_with_next_attempt(kafka: services.KafkaBroker) -> None:
    topic = unique("deadline")
    kafka.create_topic(topic, 1)
    async with (
        running_sidecar(**config(kafka, topic, unique("g"))) as sc,
        DedupClient(f"127.0.0.1:{sc.port}") as c,
    ):
        await c.publish(topic, b"x", idempotency_key="slow")
        async with Inbox(c) as inbox:
            [first] = await inbox.wait(1)
            assert first.attempt == 1
            [_, second] = await inbox.wait(2, timeout=10)
            assert second.idempotency_key == "slow"
            assert second.attempt == 2
            # The first delivery's late ack still settles the record (the effect happened).
            assert await c.ack_many([first.delivery_id]) == [AckResult.OK]
            assert await c.ack_many([second.delivery_id]) == [AckResult.ALREADY_ACKED]
            await asyncio.sleep(1.5)
            assert len(inbox.messages) == 2


async def test_extend_deadline_holds_redelivery(kafka: services.KafkaBroker) -> None:
    topic = unique("extend")
    kafka.create_topic(topic, 1)
    async with (
        running_sidecar(**config(kafka, topic, unique("g"))) as sc,
        DedupClient(f"127.0.0.1:{sc.port}") as c,
    ):
        await c.publish(topic, b"x", idempotency_key="long-job")
        async with Inbox(c) as inbox:
            [m] = await inbox.wait(1)
            assert await c.extend_deadline([m.delivery_id], 4) == [AckResult.OK]
            await asyncio.sleep(2.5)
            assert len(inbox.messages) == 1
            assert await c.ack_many([m.delivery_id]) == [AckResult.OK]


async def test_nack_backoff_then_dead_letter_after_max_attempts(kafka: services.KafkaBroker) -> None:
    topic, group = unique("nack"), unique("g")
    kafka.create_topic(topic, 1)
    kafka.create_topic(f"{topic}.dlq", 1)
    cfg = config(kafka, topic, group, ack_deadline_seconds=30, backoff_initial_seconds=0.1)
    async with running_sidecar(**cfg) as sc, DedupClient(f"127.0.0.1:{sc.port}") as c:
        await c.publish(topic, b"poison", idempotency_key="poison", headers=[("trace", b"t1")])
        await c.publish(topic, b"fine", idempotency_key="fine")
        async with Inbox(c) as inbox:
            got = await inbox.wait(2)
            fine = next(m for m in got if m.idempotency_key == "fine")
            await c.ack_many([fine.delivery_id])
            attempts = []
            for n in range(3):
                m = (
                    (await inbox.wait(2 + n))[-1]
                    if n
                    else next(x for x in got if x.idempotency_key == "poison")
                )
                attempts.append(m.attempt)
                assert await c.nack([m.delivery_id], reason="cannot parse") == [AckResult.OK]
            assert attempts == [1, 2, 3]
            dlq = read_topic(kafka, f"{topic}.dlq", expect=1)
            assert len(dlq) == 1
            headers = dict(dlq[0].headers())
            assert dlq[0].value() == b"poison"
            assert headers["dedup-original-topic"] == topic.encode()
            assert headers["dedup-original-offset"] == b"0"
            assert headers["dedup-attempts"] == b"3"
            assert headers["dedup-reason"] == b"cannot parse"
            assert headers["trace"] == b"t1"
            assert headers["idempotency-key"] == b"poison"
            # Dead-lettered means settled: the commit moves past it.
            deadline = time.monotonic() + 10
            while committed_offsets(kafka, group, topic, 1) != {0: 2}:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.5)
            assert len(inbox.messages) == 4  # nothing redelivered after the DLQ write


async def test_nack_dead_letter_now_and_missing_key_fallback(kafka: services.KafkaBroker) -> None:
    topic, group = unique("dl"), unique("g")
    kafka.create_topic(topic, 1)
    kafka.create_topic(f"{topic}.dlq", 1)
    cfg = config(kafka, topic, group, key_fallback="dead-letter")
    async with running_sidecar(**cfg) as sc, DedupClient(f"127.0.0.1:{sc.port}") as c:
        raw_produce(kafka, topic, [(None, b"no-key", None), ("has-key", b"bad", None)])
        async with Inbox(c) as inbox:
            [m] = await inbox.wait(1)
            assert m.idempotency_key == "has-key"
            assert await c.nack([m.delivery_id], dead_letter=True, reason="invalid") == [AckResult.OK]
            dlq = read_topic(kafka, f"{topic}.dlq", expect=2)
            reasons = sorted(dict(r.headers())["dedup-reason"].decode() for r in dlq)
            assert reasons[0] == "invalid"
            assert "key_fallback=dead-letter" in reasons[1]
            deadline = time.monotonic() + 10
            while committed_offsets(kafka, group, topic, 1) != {0: 2}:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)


async def test_closed_stream_redelivers_at_once(kafka: services.KafkaBroker) -> None:
    topic = unique("close")
    kafka.create_topic(topic, 1)
    cfg = config(kafka, topic, unique("g"), ack_deadline_seconds=60)
    async with running_sidecar(**cfg) as sc, DedupClient(f"127.0.0.1:{sc.port}") as c:
        await c.publish(topic, b"x", idempotency_key="orphan")
        async with Inbox(c) as first:
            [m] = await first.wait(1)
        t0 = time.monotonic()
        async with Inbox(c) as second:
            [again] = await second.wait(1, timeout=5)
            assert time.monotonic() - t0 < 5  # not after the 60 s deadline
            assert again.idempotency_key == "orphan"
            assert again.attempt == 2
            assert await c.ack_many([again.delivery_id]) == [AckResult.OK]
            assert await c.ack_many([m.delivery_id]) == [AckResult.ALREADY_ACKED]


async def test_duplicates_in_one_partition_reach_the_app_once(kafka: services.KafkaBroker) -> None:
    topic = unique("dups")
    kafka.create_topic(topic, 1)
    async with (
        running_sidecar(**config(kafka, topic, unique("g"))) as sc,
        DedupClient(f"127.0.0.1:{sc.port}") as c,
    ):
        raw_produce(kafka, topic, [("a", b"1", 0), ("a", b"1", 0), ("b", b"2", 0), ("a", b"1", 0)])
        async with Inbox(c) as inbox:
            got = await inbox.wait(2)
            assert sorted(m.idempotency_key for m in got) == ["a", "b"]
            await c.ack_many([m.delivery_id for m in got])
            await asyncio.sleep(1.0)
            assert len(inbox.messages) == 2
        assert sc.metrics.skipped.labels("duplicate", topic)._value.get() == 2
