"""The consumer thread's back-pressure against a real broker: stop taking records, pause late."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import services
from confluent_kafka import Message, Producer

from sidecar.kafka.consumer import Assigned, CommitOffset, ConsumerLoop
from tests.integration.helpers import unique

TP = tuple[str, int]


class Recorder:
    """A ConsumerHandler that keeps every record it is handed and never takes any in by itself."""

    def __init__(self) -> None:
        self.records: list[tuple[int, int]] = []
        self.assigned: list[TP] = []

    async def on_assigned(self, partitions: list[Assigned]) -> None:
        self.assigned += [(a.topic, a.partition) for a in partitions]

    async def on_revoked(self, partitions: list[TP], lost: bool) -> list[CommitOffset]:
        return []

    def on_records(self, records: list[Message]) -> None:
        self.records += [(m.partition() or 0, m.offset() or 0) for m in records]


async def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def test_a_stalled_loop_stops_the_fetch_without_pausing_then_pauses_after_the_grace(
    kafka: services.KafkaBroker,
) -> None:
    topic = unique("stall")
    kafka.create_topic(topic, 2)
    producer = Producer({"bootstrap.servers": kafka.bootstrap_servers})
    for i in range(4000):
        producer.produce(topic, b"v", partition=i % 2)
    assert producer.flush(30) == 0

    handler = Recorder()
    loop = ConsumerLoop(
        {"bootstrap.servers": kafka.bootstrap_servers, "group.id": unique("g")},
        [topic],
        handler,
        asyncio.get_running_loop(),
        fetch_batch=100,
        max_handover=500,
        stall_pause_after=1.5,
    )
    loop.start()
    try:
        await wait_for(lambda: loop.handover >= 500, 30, "records were never handed over")
        stalled_at, seen = time.monotonic(), len(handler.records)
        # Behind: no record is taken from librdkafka, and nothing is paused (pausing would purge
        # the prefetched records) until the grace has passed.
        await asyncio.sleep(0.5)
        assert len(handler.records) == seen == loop.handover
        assert loop.paused == frozenset()
        await wait_for(lambda: len(loop.paused) == 2, 10, "the partitions were never paused")
        assert time.monotonic() - stalled_at >= 1.4
        assert len(handler.records) == seen
        # The loop catches up: partitions resume and every record arrives exactly once.
        while len(handler.records) < 4000:
            loop.taken_in(loop.handover)
            await asyncio.sleep(0.02)
        await wait_for(lambda: loop.paused == frozenset(), 10, "the partitions never resumed")
        assert sorted(handler.records) == sorted((i % 2, i // 2) for i in range(4000))
    finally:
        await loop.stop()
