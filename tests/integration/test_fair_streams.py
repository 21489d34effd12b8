"""No mix of topics and streams starves a stream: each topic has its own ready queue, taken in
turns (the ready queue used to be one, and a take scanned at most 10,000 of its entries, so a
stream of a topic queued behind another topic's backlog received nothing)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

import pytest
import services
from dedup_client import DedupClient

from sidecar.process.app import Sidecar
from tests.integration.helpers import raw_produce, running_sidecar, settings_dict, unique

N = 30_000


class App:
    """An app stream on one topic that acks what it gets, at its own pace."""

    def __init__(self, sc: Sidecar, topic: str, slow: bool) -> None:
        self.topic = topic
        self.slow = slow
        self.keys: Counter[str] = Counter()
        self.others = 0  # deliveries of another topic
        self.done = asyncio.Event()
        self.task = asyncio.create_task(self._run(sc))

    async def _run(self, sc: Sidecar) -> None:
        async with DedupClient(f"127.0.0.1:{sc.port}") as client:
            async for m in client.subscribe(topics=[self.topic], max_in_flight=100 if self.slow else 2000):
                if m.topic != self.topic:
                    self.others += 1
                self.keys[m.idempotency_key] += 1
                if self.slow:
                    await asyncio.sleep(0.01)
                m.ack()
                if len(self.keys) == N:
                    self.done.set()

    async def finish(self, timeout: float) -> None:
        self.slow = False
        async with asyncio.timeout(timeout):
            await self.done.wait()
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        assert self.others == 0
        assert set(self.keys) == {f"{self.topic}-{i}" for i in range(N)}
        assert max(self.keys.values()) == 1


@pytest.mark.parametrize("first", ["backlog", "other"])
async def test_a_stream_of_one_topic_is_served_behind_another_topics_backlog(
    kafka: services.KafkaBroker, first: str
) -> None:
    """Topics A and B hold 30,000 records each and the sidecar reads both. A stream of one
    topic attaches while the other topic has no stream yet (absent), then a slow stream of the
    other: the fast stream receives all of its topic while the slow one still crawls, then the
    slow one speeds up and receives all of its own."""
    a, b = unique("fair-a"), unique("fair-b")
    for t in (a, b):
        kafka.create_topic(t, 2)
    raw_produce(kafka, b, [(f"{b}-{i}", b"v", None) for i in range(N)])
    raw_produce(kafka, a, [(f"{a}-{i}", b"v", None) for i in range(N)])
    fast_topic, slow_topic = (a, b) if first == "other" else (b, a)
    cfg = settings_dict(kafka, [a, b], unique("g"), delivery={"ack_deadline_seconds": 120})
    async with running_sidecar(**cfg) as sc:
        fast = App(sc, fast_topic, slow=False)
        await asyncio.sleep(2)  # the other topic's records queue with no stream for them
        slow = App(sc, slow_topic, slow=True)
        await fast.finish(90)
        assert len(slow.keys) < N  # still crawling while the fast stream got everything
        await slow.finish(90)
