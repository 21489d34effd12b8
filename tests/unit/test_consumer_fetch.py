"""The poll thread's fetch: what it takes from librdkafka, and when it waits for more."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

from confluent_kafka import Consumer, Message

from sidecar.kafka.consumer import PACE_BELOW, ConsumerHandler, ConsumerLoop


class QueuedRecords:
    """Stands in for librdkafka's queue: ``consume(n, timeout)`` returns up to n queued records."""

    def __init__(self, queued: int) -> None:
        self.queued = [cast(Message, object()) for _ in range(queued)]
        self.calls: list[tuple[int, float]] = []

    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        self.calls.append((num_messages, timeout))
        out, self.queued = self.queued[:num_messages], self.queued[num_messages:]
        return out


def fetching(batch: int, interval: float, handed_over_ago: float) -> ConsumerLoop:
    loop = ConsumerLoop(
        {},
        ["t"],
        cast(ConsumerHandler, None),
        cast(asyncio.AbstractEventLoop, None),
        batch,
        handover_interval=interval,
    )
    loop._last_handover = time.monotonic() - handed_over_ago
    return loop


def fetch(loop: ConsumerLoop, queue: QueuedRecords) -> list[Any]:
    return loop._fetch(cast(Consumer, queue))


def test_a_record_after_a_quiet_spell_is_handed_over_at_once() -> None:
    queue = QueuedRecords(1)
    assert len(fetch(fetching(500, 0.002, handed_over_ago=1.0), queue)) == 1
    assert queue.calls == [(500, 0)]


def test_a_part_full_batch_soon_after_a_hand_over_waits_out_the_interval() -> None:
    queue = QueuedRecords(3)
    got = fetch(fetching(500, 0.002, handed_over_ago=0.0005), queue)
    assert len(got) == 3
    (first, second) = queue.calls
    assert first == (500, 0)
    n, wait = second
    assert n == 497
    assert 0 < wait <= 0.0015


def test_a_full_batch_never_waits() -> None:
    queue = QueuedRecords(800)
    assert len(fetch(fetching(500, 0.002, handed_over_ago=0.0), queue)) == 500
    assert queue.calls == [(500, 0)]


def test_a_part_full_batch_big_enough_to_share_the_costs_does_not_wait() -> None:
    queue = QueuedRecords(PACE_BELOW)
    assert len(fetch(fetching(500, 0.002, handed_over_ago=0.0), queue)) == PACE_BELOW
    assert queue.calls == [(500, 0)]


def test_interval_zero_hands_every_fetch_over_alone() -> None:
    queue = QueuedRecords(3)
    assert len(fetch(fetching(500, 0.0, handed_over_ago=0.0), queue)) == 3
    assert queue.calls == [(500, 0)]


def test_with_nothing_queued_it_waits_for_the_first_record_then_takes_what_came_with_it() -> None:
    queue = QueuedRecords(0)
    assert fetch(fetching(500, 0.002, handed_over_ago=1.0), queue) == []
    assert queue.calls == [(500, 0), (1, 0.1)]
