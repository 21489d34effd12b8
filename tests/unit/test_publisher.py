"""The batch-native publisher against an in-memory store and a fake producer: no Kafka."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import cast

import pytest

from sidecar.config import PublishSettings
from sidecar.errors import AlreadyExists, InvalidArgument, NotFound, PublishIndeterminate, StoreUnavailable
from sidecar.kafka.producer import AsyncProducer, Outgoing, Produced, Sent
from sidecar.observability.metrics import Metrics
from sidecar.publish.publisher import Publisher, PublishInput, PublishOutput
from sidecar.store.base import Claim, PublishRecord
from sidecar.store.memory import MemoryStore

DAY = 86_400_000


class FakeProducer:
    """Answers at once, or holds every record until ``release()`` when ``hold`` is set."""

    def __init__(self) -> None:
        self.timeout_s = 0.2
        self.sent: list[Outgoing] = []
        self.calls = 0
        self.hold = False
        self.held: list[tuple[Sent, int, Outgoing]] = []
        self.refuse_topic = ""
        self.hold_values: set[bytes] = set()  # hold only the records with these values

    async def send(self, records: Sequence[Outgoing]) -> Sent:
        self.calls += 1
        sent = Sent(len(records), asyncio.get_running_loop().create_future())
        for i, r in enumerate(records):
            if r.topic == self.refuse_topic:
                sent._settle(i, NotFound(f"topic {r.topic!r} does not exist"))
                continue
            self.sent.append(r)
            if self.hold or r.value in self.hold_values:
                self.held.append((sent, i, r))
            else:
                sent._settle(i, Produced(r.topic, 0, len(self.sent) - 1))
        return sent

    def release(self) -> None:
        for n, (sent, i, r) in enumerate(self.held):
            sent._settle(i, Produced(r.topic, 1, n))
        self.held.clear()


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.fail = False

    async def publish_begin(
        self, keys: Sequence[str], owner: str, lease_ms: int
    ) -> list[PublishRecord | Claim]:
        self.calls.append("begin")
        if self.fail:
            raise StoreUnavailable("store down (setting: store.redis_url)")
        return await super().publish_begin(keys, owner, lease_ms)

    async def publish_finish(
        self, entries: Sequence[tuple[str, PublishRecord | None]], owner: str, retention_ms: int
    ) -> list[PublishRecord | None]:
        self.calls.append("finish")
        return await super().publish_finish(entries, owner, retention_ms)

    async def recorded(self, keys: list[str]) -> list[PublishRecord | None]:
        """The records of ``keys``, looked up by a publisher that claims nothing it finds missing."""
        got = await self.publish_begin(keys, "observer", 1)
        return [None if isinstance(g, Claim) else g for g in got]


def make(store: MemoryStore | None = None, producer: FakeProducer | None = None) -> Publisher:
    return Publisher(
        PublishSettings(),
        "idempotency-key",
        store or MemoryStore(),
        cast(AsyncProducer, producer or FakeProducer()),
        Metrics(),
        retention_ms=DAY,
    )


def req(key: str, value: bytes = b"v", topic: str = "orders") -> PublishInput:
    return PublishInput(topic, value, None, [], key, None)


async def test_a_batch_costs_one_produce_loop_and_one_round_trip_per_store_step() -> None:
    store, producer = CountingStore(), FakeProducer()
    pub = make(store, producer)
    out = await pub.publish_batch([req(f"k{i}") for i in range(300)])
    assert all(isinstance(o, PublishOutput) and not o.duplicate for o in out)
    assert producer.calls == 1
    assert len(producer.sent) == 300
    assert store.calls == ["begin", "finish"]  # record or claim in one step; record and release in one
    assert [dict(r.headers or [])["idempotency-key"] for r in producer.sent] == [
        f"k{i}".encode() for i in range(300)
    ]
    # Claims were released: another owner may claim the publish keys at once.
    claims = await store.claim([f"pub:k{i}" for i in range(300)], "other", 1000)
    assert all(c.status.name == "NEW" for c in claims)


async def test_each_entry_gets_its_own_outcome_in_order() -> None:
    producer = FakeProducer()
    producer.refuse_topic = "missing"
    pub = make(producer=producer)
    [first] = await pub.publish_batch([req("old")])
    out = await pub.publish_batch(
        [
            req("a"),
            req("bad", topic="no spaces allowed"),
            req("old"),  # published before: a duplicate with the first result
            req("a"),  # same key and payload earlier in this batch: a duplicate of it
            req("a", value=b"other"),  # same key, other payload
            req("m", topic="missing"),
        ]
    )
    a, bad, old, a2, conflict, missing = out
    assert isinstance(a, PublishOutput)
    assert not a.duplicate
    assert isinstance(bad, InvalidArgument)
    assert isinstance(old, PublishOutput)
    assert old.duplicate
    assert old.offset == cast(PublishOutput, first).offset
    assert isinstance(a2, PublishOutput)
    assert a2.duplicate
    assert a2.offset == a.offset
    assert isinstance(conflict, AlreadyExists)
    assert isinstance(missing, NotFound)
    assert [r.value for r in producer.sent] == [b"v", b"v"]  # "old" once, "a" once


async def test_concurrent_calls_with_one_key_share_one_produce() -> None:
    producer = FakeProducer()
    pub = make(producer=producer)
    outs = await asyncio.gather(pub.publish(req("hot")), pub.publish_batch([req("hot"), req("cold")]))
    single, (joined, cold) = outs
    assert isinstance(joined, PublishOutput)
    assert isinstance(cold, PublishOutput)
    assert {single.duplicate, joined.duplicate} == {False, True}
    assert single.offset == joined.offset
    assert len(producer.sent) == 2


async def test_unanswered_records_keep_their_claims_and_are_recorded_when_they_land() -> None:
    store, producer = CountingStore(), FakeProducer()
    producer.hold = True
    pub = make(store, producer)
    pub._report_grace_s = 0.0  # give up on the delivery reports after timeout_s (0.2 s)
    out = await pub.publish_batch([req("slow-1"), req("slow-2")])
    assert all(isinstance(o, PublishIndeterminate) for o in out)
    # The claims are kept: a retry through another sidecar must not produce a second record.
    assert [c.status.name for c in await store.claim(["pub:slow-1", "pub:slow-2"], "other", 1000)] == [
        "BUSY",
        "BUSY",
    ]
    producer.release()
    for _ in range(50):
        if await store.recorded(["slow-1", "slow-2"]) != [None, None]:
            break
        await asyncio.sleep(0.01)
    retry = await pub.publish_batch([req("slow-1"), req("slow-2")])
    assert all(isinstance(o, PublishOutput) and o.duplicate for o in retry)
    assert len(producer.sent) == 2


async def test_a_store_failure_fails_every_entry_and_writes_nothing() -> None:
    store, producer = CountingStore(), FakeProducer()
    store.fail = True
    pub = make(store, producer)
    out = await pub.publish_batch([req("x"), req("y"), req("x")])
    assert all(isinstance(o, StoreUnavailable) for o in out)
    assert producer.sent == []
    store.fail = False
    assert all(isinstance(o, PublishOutput) for o in await pub.publish_batch([req("x"), req("y")]))


async def test_single_publish_raises_the_entry_error() -> None:
    pub = make()
    with pytest.raises(InvalidArgument, match="topic is empty"):
        await pub.publish(req("k", topic=""))


async def test_a_cancelled_call_keeps_the_claims_of_records_in_flight() -> None:
    store, producer = CountingStore(), FakeProducer()
    producer.hold = True
    pub = make(store, producer)
    call = asyncio.create_task(pub.publish_batch([req("c-1"), req("c-2")]))
    while len(producer.held) < 2:
        await asyncio.sleep(0.001)
    call.cancel()  # the client's deadline passed while Kafka had not answered yet
    with pytest.raises(asyncio.CancelledError):
        await call
    claims = await store.claim(["pub:c-1", "pub:c-2"], "other", 1000)
    assert [c.status.name for c in claims] == ["BUSY", "BUSY"]
    producer.release()
    for _ in range(50):
        if None not in await store.recorded(["c-1", "c-2"]):
            break
        await asyncio.sleep(0.01)
    retry = await pub.publish_batch([req("c-1"), req("c-2")])
    assert [(o.duplicate, o.partition) for o in retry if isinstance(o, PublishOutput)] == [(True, 1)] * 2
    assert len(producer.sent) == 2


def test_the_payload_digest_never_changes() -> None:
    # Stored digests outlive a release (store.retention_seconds): a retry after an upgrade must
    # still match its first publish. These values come from the first implementation.
    from sidecar.publish.publisher import digest

    assert digest(PublishInput("orders", b"v", None, [], "k", None)) == "058302487dc9ab6ea8aad1998d721c72"
    rich = PublishInput("orders", b"value", b"key", [("trace", b"abc"), ("h2", b"")], "k", 3)
    assert digest(rich) == "b6c571a1b2d6757ae533c0cc9ec2eb5f"


async def test_a_bad_topic_is_refused_every_time_it_comes() -> None:
    pub = make()
    for _ in range(3):  # the check is cached by topic name; each refusal is its own error
        out = await pub.publish_batch([req("k1", topic="bad topic"), req("k2", topic="")])
        assert [type(o) for o in out] == [InvalidArgument, InvalidArgument]
        assert "invalid topic name" in str(out[0])
        assert "topic is empty" in str(out[1])
    assert out[0] is not (await pub.publish_batch([req("k1", topic="bad topic")]))[0]


async def test_a_batch_answered_in_part_records_what_landed_and_keeps_the_rest_for_later() -> None:
    store, producer = CountingStore(), FakeProducer()
    producer.hold_values = {b"slow"}
    pub = make(store, producer)
    pub._report_grace_s = 0.0
    fast, slow = await pub.publish_batch([req("fast"), req("slow", value=b"slow")])
    assert isinstance(fast, PublishOutput)
    assert not fast.duplicate
    assert isinstance(slow, PublishIndeterminate)
    # The record that landed is stored at once; the other keeps its claim until it lands.
    fast_record, slow_record = await store.recorded(["fast", "slow"])
    assert fast_record is not None
    assert (fast_record.topic, fast_record.partition, fast_record.offset) == ("orders", 0, 0)
    assert slow_record is None
    assert [c.status.name for c in await store.claim(["pub:slow"], "other", 1000)] == ["BUSY"]
    producer.release()
    for _ in range(50):
        if None not in await store.recorded(["slow"]):
            break
        await asyncio.sleep(0.01)
    again = await pub.publish_batch([req("fast"), req("slow", value=b"slow")])
    assert [(o.duplicate, o.partition) for o in again if isinstance(o, PublishOutput)] == [
        (True, 0),
        (True, 1),
    ]
    assert len(producer.sent) == 2
