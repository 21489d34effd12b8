"""Retry topics and poison records on a real broker and Redis.

A Nack with a long delay leaves the source partition (which commits past it), survives a sidecar
restart in a retry topic the sidecar created, and is delivered once when due, under its source
coordinates, as the next attempt. A record the app never answers is dead-lettered after
delivery.max_attempts with the reason code "deadline"."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import services
from confluent_kafka import Producer
from dedup_client import AckResult, DedupClient

from tests.integration.helpers import (
    Inbox,
    SidecarProcess,
    committed_offsets,
    process_env,
    read_topic,
    unique,
)

DELAY_S = 20.0


async def test_a_long_nack_waits_in_a_retry_topic_across_a_restart(
    kafka: services.KafkaBroker, redis_server: services.RedisServer, tmp_path: Path
) -> None:
    topic, group = unique("retry"), unique("g")
    kafka.create_topic(topic, 2)
    env = process_env(
        kafka,
        topic,
        group,
        redis_server.url,
        DEDUP_DELIVERY__RETRY_TIERS_SECONDS="[5, 3600]",
        DEDUP_STORE__KEY_PREFIX=unique("p"),
    )
    p = Producer({"bootstrap.servers": kafka.bootstrap_servers})
    p.produce(topic, b"payload", b"acct-1", headers=[("idempotency-key", b"r-1")], partition=1)
    p.produce(topic, b"other", b"acct-2", headers=[("idempotency-key", b"r-2")], partition=1)
    assert p.flush(10) == 0

    first = SidecarProcess(env, tmp_path / "first.log")
    first.start()
    try:
        await first.wait_serving()
        async with DedupClient(first.target) as client, Inbox(client) as inbox:
            got = await inbox.wait(2)
            by_key = {m.idempotency_key: m for m in got}
            nacked_at = time.time()
            await client.nack([by_key["r-1"].delivery_id], delay_seconds=DELAY_S)
            await client.ack_many([by_key["r-2"].delivery_id])
            # The source partition commits past the nacked record: it waits in the retry topic.
            deadline = time.monotonic() + 15
            while committed_offsets(kafka, group, topic, 2)[1] != 2:
                assert time.monotonic() < deadline, committed_offsets(kafka, group, topic, 2)
                await asyncio.sleep(0.2)
        [parked] = read_topic(kafka, f"{topic}.retry.0", expect=1)
        headers = dict(parked.headers())
        assert headers["dedup-original-offset"] == b"0"
        assert abs(int(headers["dedup-retry-due-ms"]) / 1000 - (nacked_at + DELAY_S)) < 2
    finally:
        first.terminate()

    # Restart in the middle of the delay: a new process (a new owner id) reads the retry topic.
    await asyncio.sleep(3)
    second = SidecarProcess(env, tmp_path / "second.log")
    second.start()
    try:
        await second.wait_serving()
        async with DedupClient(second.target) as client, Inbox(client) as inbox:
            [again] = await inbox.wait(1, timeout=DELAY_S + 15)
            waited = time.time() - nacked_at
            assert waited >= DELAY_S - 0.5, f"delivered {waited:.1f}s after the Nack, before its due time"
            assert (again.idempotency_key, again.topic, again.partition, again.offset) == ("r-1", topic, 1, 0)
            assert again.attempt == 2
            assert again.value == b"payload"
            assert again.key == b"acct-1"
            assert [h for h, _ in again.headers] == ["idempotency-key"]
            assert await client.ack_many([again.delivery_id]) == [AckResult.OK]
            await asyncio.sleep(3)
            assert len(inbox.messages) == 1, "delivered more than once"
    finally:
        second.terminate()
    print(f"\ndelivered {waited:.1f}s after a Nack of {DELAY_S:.0f}s, across a restart")


async def test_a_record_that_times_out_every_time_is_dead_lettered_with_reason_deadline(
    kafka: services.KafkaBroker, redis_server: services.RedisServer, tmp_path: Path
) -> None:
    """A poison record: the app takes it and never answers (it crashes or hangs on it). After
    delivery.max_attempts deliveries it goes to the dead-letter topic, and the partition moves on."""
    topic, group = unique("poison"), unique("g")
    kafka.create_topic(topic, 1)
    kafka.create_topic(f"{topic}.dlq", 1)
    env = process_env(
        kafka,
        topic,
        group,
        redis_server.url,
        DEDUP_DELIVERY__ACK_DEADLINE_SECONDS="1",
        DEDUP_DELIVERY__LEASE_MARGIN_SECONDS="0",
        DEDUP_DELIVERY__MAX_ATTEMPTS="3",
        DEDUP_STORE__KEY_PREFIX=unique("p"),
    )
    p = Producer({"bootstrap.servers": kafka.bootstrap_servers})
    p.produce(topic, b"poison", b"acct-9", headers=[("idempotency-key", b"bad-1")])
    assert p.flush(10) == 0
    sc = SidecarProcess(env, tmp_path / "sidecar.log")
    sc.start()
    try:
        await sc.wait_serving()
        async with DedupClient(sc.target) as client, Inbox(client) as inbox:
            got = await inbox.wait(3, timeout=20)  # never acked
            assert [m.attempt for m in got] == [1, 2, 3]
            [dead] = read_topic(kafka, f"{topic}.dlq", expect=1, timeout=20)
            headers = dict(dead.headers())
            assert headers["dedup-reason-code"] == b"deadline"
            assert headers["dedup-attempts"] == b"3"
            assert headers["dedup-original-topic"] == topic.encode()
            assert dead.value() == b"poison"
            deadline = time.monotonic() + 10
            while committed_offsets(kafka, group, topic, 1)[0] != 1:
                assert time.monotonic() < deadline, "the partition did not move past the poison record"
                await asyncio.sleep(0.2)
            await asyncio.sleep(2)
            assert len(inbox.messages) == 3, "delivered again after it was dead-lettered"
    finally:
        sc.terminate()
