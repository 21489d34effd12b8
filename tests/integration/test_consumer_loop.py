"""The consumer thread against a real broker: back-pressure (stop taking records, pause late) and
asynchronous commits."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

import services
from confluent_kafka import Message, Producer

from sidecar.kafka.consumer import Assigned, CommitOffset, ConsumerLoop
from tests.integration.helpers import committed_offsets, unique

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


async def test_commits_are_asynchronous_and_each_call_gets_its_own_report(
    kafka: services.KafkaBroker,
) -> None:
    topic, group = unique("acommit"), unique("g")
    kafka.create_topic(topic, 3)
    handler = Recorder()
    loop = ConsumerLoop(
        {"bootstrap.servers": kafka.bootstrap_servers, "group.id": group},
        [topic],
        handler,
        asyncio.get_running_loop(),
    )
    loop.start()
    try:
        await wait_for(lambda: len(handler.assigned) == 3, 30, "the partitions were never assigned")
        # Several commits in flight at once: each call is answered from librdkafka's report of
        # its own commit (the reports come back through the poll thread's consume()).
        first, second, foreign = await asyncio.gather(
            loop.commit([CommitOffset(topic, 0, 5, "m0"), CommitOffset(topic, 1, 7, "")]),
            loop.commit([CommitOffset(topic, 2, 9, "")]),
            loop.commit([CommitOffset(topic + "-other", 0, 1, "")]),  # not assigned: not committed
        )
        assert first == [CommitOffset(topic, 0, 5, "m0"), CommitOffset(topic, 1, 7, "")]
        assert second == [CommitOffset(topic, 2, 9, "")]
        assert foreign == []
        assert await loop.commit([CommitOffset(topic, 0, 6, "")]) == [CommitOffset(topic, 0, 6, "")]
        assert loop._commits == deque()  # every report was matched to its call
    finally:
        await loop.stop()
    assert committed_offsets(kafka, group, topic, 3) == {0: 6, 1: 7, 2: 9}


async def test_a_partition_paused_when_taken_away_is_not_paused_when_it_comes_back(
    kafka: services.KafkaBroker,
) -> None:
    # librdkafka keeps the pause flag of a partition across a revoke and a later re-assignment
    # to the same member; the loop's books start afresh. Without a resume on assignment, the
    # partition came back paused and nothing was fetched from it again.
    topic, group = unique("repause"), unique("g")
    kafka.create_topic(topic, 2)
    config = {"bootstrap.servers": kafka.bootstrap_servers, "group.id": group}
    first, second = Recorder(), Recorder()
    a = ConsumerLoop(config, [topic], first, asyncio.get_running_loop())
    a.start()
    b: ConsumerLoop | None = None
    try:
        await wait_for(lambda: len(first.assigned) == 2, 30, "the first member was never assigned")
        for p in (0, 1):
            a.set_paused((topic, p), True)  # the tracker bound, say, holds both partitions back
        await wait_for(lambda: len(a.paused) == 2, 10, "the partitions were never paused")
        b = ConsumerLoop(config, [topic], second, asyncio.get_running_loop())
        b.start()
        await wait_for(lambda: len(second.assigned) == 1, 30, "the second member got no partition")
        moved = second.assigned[0][1]
        await b.stop()  # leaves the group: the partition comes back to the first member
        b = None
        await wait_for(lambda: first.assigned.count((topic, moved)) == 2, 30, "it never came back")
        producer = Producer({"bootstrap.servers": kafka.bootstrap_servers})
        for _ in range(20):
            producer.produce(topic, b"v", partition=moved)
        assert producer.flush(30) == 0
        await wait_for(
            lambda: sum(1 for p, _ in first.records if p == moved) >= 20, 20, "the partition stayed paused"
        )
    finally:
        if b is not None:
            await b.stop()
        await a.stop()
