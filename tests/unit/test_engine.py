"""The delivery engine against an in-memory store and a fake consumer: no Kafka, no network."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import pytest
from confluent_kafka import Message

from sidecar import config
from sidecar.engine import dispatch as engine_module
from sidecar.engine.engine import AckOutcome, Engine
from sidecar.engine.identity import store_key
from sidecar.errors import StoreUnavailable
from sidecar.kafka.consumer import Assigned, CommitOffset, ConsumerLoop
from sidecar.kafka.producer import AsyncProducer, Produced
from sidecar.observability.metrics import Metrics
from sidecar.store.base import ClaimMode
from sidecar.store.memory import MemoryStore

T = "orders"


class FakeConsumer:
    def __init__(self) -> None:
        self.paused: dict[tuple[str, int], bool] = {}
        self.commits: list[CommitOffset] = []

    def set_paused(self, tp: tuple[str, int], paused: bool) -> None:
        self.paused[tp] = paused

    async def commit(self, offsets: Sequence[CommitOffset]) -> list[CommitOffset]:
        self.commits.extend(offsets)
        return list(offsets)

    def taken_in(self, n: int) -> None:
        pass

    def join_group(self) -> None:
        pass

    def leave_group(self) -> None:
        pass


class FakeProducer:
    def __init__(self) -> None:
        self.records: list[tuple[str, bytes, list[tuple[str, bytes]]]] = []

    async def produce(
        self, topic: str, value: bytes, key: bytes | None = None, headers: Any = (), partition: Any = None
    ) -> Produced:
        self.records.append((topic, value, list(headers)))
        return Produced(topic, 0, len(self.records) - 1)


def msg(partition: int, offset: int, key: str | None) -> Message:
    headers: list[tuple[str, str | bytes | None]] = [("idempotency-key", key.encode())] if key else []
    return Message(
        topic=T, partition=partition, offset=offset, value=b"v%d" % offset, headers=headers, timestamp=(1, 1)
    )


@pytest.fixture
async def engine() -> AsyncIterator[tuple[Engine, FakeConsumer]]:
    settings = config.load(
        None,
        kafka={"topics": [T]},
        delivery={
            "ack_deadline_seconds": 30,
            "busy_retry_seconds": 0.05,
            "max_unsettled_per_partition": 4,
            "resume_unsettled": 1,
            "revoke_grace_seconds": 0.3,
        },
    )
    eng = Engine(settings, MemoryStore(), cast(AsyncProducer, FakeProducer()), Metrics(), owner="me")
    consumer = FakeConsumer()
    eng.start(cast(ConsumerLoop, consumer))
    await eng.on_assigned([Assigned(T, 0, -1, None), Assigned(T, 1, -1, None)])
    yield eng, consumer
    await eng.stop(0)


async def take(eng: Engine, stream: Any, n: int) -> list[Any]:
    got: list[Any] = []
    while len(got) < n:
        got += await asyncio.wait_for(eng.next_frame(stream), 2)
    return got


async def intake(eng: Engine, *records: Message) -> None:
    eng.on_records(list(records))
    for _ in range(50):
        await asyncio.sleep(0.01)


async def test_duplicate_in_another_partition_waits_for_the_first(
    engine: tuple[Engine, FakeConsumer],
) -> None:
    eng, _ = engine
    s = eng.attach([], 100, 0, 100)
    await intake(eng, msg(0, 0, "k"), msg(1, 0, "k"))
    [first] = await take(eng, s, 1)
    assert eng.describe()["partitions"][f"{T}[1]"]["states"] == {"shadowed": 1}
    assert await eng.ack([first.delivery_ids[-1]]) == [AckOutcome.OK]
    assert eng.committable() == {(T, 0): 1, (T, 1): 1}  # the shadow settled as a duplicate


async def test_a_revoke_waits_for_the_apps_answer_and_commits_it(
    engine: tuple[Engine, FakeConsumer],
) -> None:
    """A rebalance takes partition 0 while the app holds a delivery of it and has another
    record of it ready: the ready one is not sent any more, the held one is answered within the
    revoke grace, settled OK (not STALE), and covered by the commit on revoke."""
    eng, consumer = engine
    s = eng.attach([], 1, 0, 1)  # room for one record: the second waits in the ready queue
    await intake(eng, msg(0, 0, "a"), msg(0, 1, "b"))
    [first] = await take(eng, s, 1)
    revoke = asyncio.create_task(eng.on_revoked([(T, 0)], lost=False))
    await asyncio.sleep(0.05)
    assert not revoke.done()  # waiting for the app
    assert await eng.ack([first.delivery_ids[-1]]) == [AckOutcome.OK]
    nothing = asyncio.create_task(eng.next_frame(s))
    commits = [*consumer.commits, *await revoke]  # committed by the loop meanwhile, or on revoke
    assert [(c.partition, c.offset) for c in commits] == [(0, 1)]  # "a" settled, "b" never sent
    await asyncio.sleep(0.05)
    assert not nothing.done()
    nothing.cancel()


async def test_a_graceful_stop_waits_for_the_answer_to_a_delivery_of_a_revoked_partition(
    engine: tuple[Engine, FakeConsumer],
) -> None:
    """The app holds a delivery of a partition that a rebalance took (past the revoke grace);
    then the sidecar is told to stop. The stop keeps answering acks until that one is answered
    (it marks the key done for the next owner), instead of stopping at once."""
    eng, _ = engine
    s = eng.attach([], 10, 0, 10)
    await intake(eng, msg(0, 0, "held"))
    [p] = await take(eng, s, 1)
    await eng.on_revoked([(T, 0)], lost=False)  # the app did not answer within the grace
    assert eng.in_flight == 0
    stop = asyncio.create_task(eng.stop(5))
    await asyncio.sleep(0.2)
    assert not stop.done()  # still waiting for the app
    assert await eng.ack([p.delivery_ids[-1]]) == [AckOutcome.STALE]
    await asyncio.wait_for(stop, 1)
    [claim] = await eng.store.claim([p.store_key], "next-owner", 30_000)
    assert claim.status.name == "DONE"


async def test_revoked_in_flight_key_blocks_its_duplicate_until_acked(
    engine: tuple[Engine, FakeConsumer],
) -> None:
    eng, _ = engine
    s = eng.attach([], 100, 0, 100)
    await intake(eng, msg(0, 0, "k"), msg(1, 0, "k"))
    [first] = await take(eng, s, 1)
    # Partition 0 moves away while its delivery is still at the app.
    await eng.on_revoked([(T, 0)], lost=False)
    await asyncio.sleep(0.3)
    assert eng.describe()["partitions"][f"{T}[1]"]["states"] == {"busy": 1}, (
        "duplicate delivered concurrently"
    )
    # The late ack is STALE but marks the key done, so the duplicate is skipped.
    assert await eng.ack([first.delivery_ids[-1]]) == [AckOutcome.STALE]
    await asyncio.sleep(0.3)
    assert eng.committable() == {(T, 1): 1}
    assert eng.in_flight == 0


async def test_intake_waits_at_the_global_bound_without_pausing() -> None:
    """delivery.max_unsettled holds intake back across partitions, with no partition paused
    (a pause would drop what librdkafka prefetched); settling records lets intake go on."""
    settings = config.load(None, kafka={"topics": [T]}, delivery={"max_unsettled": 3})
    eng = Engine(settings, MemoryStore(), cast(AsyncProducer, FakeProducer()), Metrics(), owner="me")
    consumer = FakeConsumer()
    eng.start(cast(ConsumerLoop, consumer))
    await eng.on_assigned([Assigned(T, 0, -1, None), Assigned(T, 1, -1, None)])
    try:
        s = eng.attach([], 100, 0, 100)
        await intake(eng, msg(0, 0, "a"), msg(1, 0, "b"), msg(0, 1, "c"))  # 3 held: the bound
        await intake(eng, msg(1, 1, "d"), msg(0, 2, "e"))
        got = await take(eng, s, 3)
        await asyncio.sleep(0.2)
        assert sorted(m.idem_key for m in got) == ["a", "b", "c"]
        held = eng.describe()["partitions"][f"{T}[1]"]["states"]
        assert held == {"in_flight": 1}, "taken in past the bound"
        assert not any(consumer.paused.values())
        await eng.ack([got[0].delivery_ids[-1], got[1].delivery_ids[-1]])
        rest = await take(eng, s, 2)
        assert sorted(m.idem_key for m in rest) == ["d", "e"]
        assert not any(consumer.paused.values())
    finally:
        await eng.stop(0)


async def test_bounded_unsettled_pauses_and_resumes(engine: tuple[Engine, FakeConsumer]) -> None:
    eng, consumer = engine
    s = eng.attach([], 100, 0, 100)
    await intake(eng, *(msg(0, o, f"p{o}") for o in range(6)))
    assert consumer.paused[(T, 0)] is True
    got = await take(eng, s, 6)
    await eng.ack([m.delivery_ids[-1] for m in got[:5]])
    assert consumer.paused[(T, 0)] is False


async def test_credit_limits_deliveries_per_stream(engine: tuple[Engine, FakeConsumer]) -> None:
    eng, _ = engine
    s = eng.attach([], 2, 0, 100)
    await intake(eng, *(msg(1, o, f"c{o}") for o in range(4)))
    got = await take(eng, s, 2)
    assert len(got) == 2
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(eng.next_frame(s), 0.2)
    await eng.ack([got[0].delivery_ids[-1]])
    assert len(await take(eng, s, 1)) == 1


async def test_credit_bound_frames_wait_briefly_for_a_fuller_window(
    engine: tuple[Engine, FakeConsumer], monkeypatch: pytest.MonkeyPatch
) -> None:
    eng, _ = engine
    monkeypatch.setattr(engine_module, "FRAME_HOLD_S", 30.0)
    s = eng.attach([], 8, 0, 8)  # frames of at least 8 // 4 = 2 while more is waiting than fits
    await intake(eng, *(msg(p, o, f"w{p}-{o}") for p in (0, 1) for o in range(8)))
    first = await take(eng, s, 8)
    await eng.ack([first[0].delivery_ids[-1]])
    pending = asyncio.create_task(eng.next_frame(s))
    await asyncio.sleep(0.2)
    assert not pending.done(), "a frame of one record went out while eight were waiting"
    await eng.ack([m.delivery_ids[-1] for m in first[1:4]])
    assert len(await asyncio.wait_for(pending, 2)) == 4


async def test_a_held_frame_still_goes_out_after_the_hold(
    engine: tuple[Engine, FakeConsumer], monkeypatch: pytest.MonkeyPatch
) -> None:
    eng, _ = engine
    monkeypatch.setattr(engine_module, "FRAME_HOLD_S", 0.1)
    s = eng.attach([], 8, 0, 8)
    await intake(eng, *(msg(p, o, f"h{p}-{o}") for p in (0, 1) for o in range(8)))
    first = await take(eng, s, 8)
    await eng.ack([first[0].delivery_ids[-1]])
    # An app that waits for more records before it acks the rest is not starved.
    assert len(await asyncio.wait_for(eng.next_frame(s), 2)) == 1


async def test_a_claim_won_for_a_revoked_partition_is_handed_back(
    engine: tuple[Engine, FakeConsumer],
) -> None:
    # The partition is revoked while its claim round trip is in flight: the store answers NEW
    # for a record nobody here will deliver. The claim must be released, or the partition's
    # next owner waits out the whole lease (BUSY) for that key.
    eng, _ = engine
    store = eng.store
    gate = asyncio.Event()
    real_claim = store.claim

    async def slow_claim(
        keys: Sequence[str], owner: str, lease_ms: int, mode: ClaimMode = ClaimMode.CLAIM
    ) -> Any:
        await gate.wait()
        return await real_claim(keys, owner, lease_ms, mode)

    eng.core.store.claim = slow_claim  # type: ignore[method-assign]
    eng.on_records([msg(0, 0, "orphan")])
    await asyncio.sleep(0.05)
    await eng.on_revoked([(T, 0)], lost=False)
    gate.set()
    await asyncio.sleep(0.05)
    key = store_key(eng.settings.kafka.group_id, T, "orphan")
    [other] = await real_claim([key], "another-sidecar", 30_000)
    assert (other.status.name, other.attempt) == ("NEW", 1)  # never delivered: still attempt 1


async def test_records_claimed_ahead_keep_their_attempt_when_the_partition_moves(
    engine: tuple[Engine, FakeConsumer],
) -> None:
    # Claimed at intake, waiting for an app (no stream yet), then the partition is revoked: the
    # claims are handed back, and the next owner's first delivery is attempt 1, not 2. A record
    # that did reach an app counts: its next delivery is attempt 2.
    eng, _ = engine
    await intake(eng, msg(0, 0, "k0"), msg(0, 1, "k1"), msg(1, 0, "k2"))
    s = eng.attach([T], 1, 0, 1)
    [sent] = await take(eng, s, 1)
    eng.detach(s)  # the stream closes: that record goes back to the ready queue, delivered once
    await eng.on_revoked([(T, 0), (T, 1)], lost=False)
    group = eng.settings.kafka.group_id
    names = ["k0", "k1", "k2"]
    claims = await eng.store.claim([store_key(group, T, k) for k in names], "next-owner", 30_000)
    assert {k: (c.status.name, c.attempt) for k, c in zip(names, claims, strict=True)} == {
        k: ("NEW", 2 if k == sent.idem_key else 1) for k in names
    }


async def test_a_record_that_waited_past_its_lease_is_still_its_first_attempt(
    engine: tuple[Engine, FakeConsumer],
) -> None:
    # The app is slower than the sidecar claims ahead: a record waits in the ready queue until
    # its lease ran out. Handing it out renews the claim; nobody was sent it, so attempt stays 1.
    eng, _ = engine
    eng.core.lease_ms = 100  # leases far shorter than the queueing below
    await intake(eng, msg(0, 0, "slow-0"), msg(0, 1, "slow-1"))
    await asyncio.sleep(0.2)  # both leases have expired while the records wait
    s = eng.attach([T], 10, 0, 10)
    got = await take(eng, s, 2)
    assert [(p.idem_key, p.attempt) for p in got] == [("slow-0", 1), ("slow-1", 1)]


async def test_claims_gather_while_one_is_in_flight(engine: tuple[Engine, FakeConsumer]) -> None:
    # A group commit: the first record is claimed at once; records that arrive while that round
    # trip is in flight go to the store together in the next one.
    eng, _ = engine
    gate = asyncio.Event()
    calls: list[int] = []
    real_claim = eng.store.claim

    async def gated_claim(
        keys: Sequence[str], owner: str, lease_ms: int, mode: ClaimMode = ClaimMode.CLAIM
    ) -> Any:
        calls.append(len(keys))
        await gate.wait()
        return await real_claim(keys, owner, lease_ms, mode)

    eng.core.store.claim = gated_claim  # type: ignore[method-assign]
    eng.on_records([msg(0, 0, "g0")])
    await asyncio.sleep(0.05)
    for o in range(1, 4):
        eng.on_records([msg(0, o, f"g{o}")])
        await asyncio.sleep(0.01)
    assert calls == [1]
    gate.set()
    await asyncio.sleep(0.05)
    assert calls == [1, 3]


async def test_keyless_record_uses_offset_fallback(engine: tuple[Engine, FakeConsumer]) -> None:
    eng, _ = engine
    s = eng.attach([], 10, 0, 10)
    await intake(eng, msg(1, 7, None))
    [got] = await take(eng, s, 1)
    assert got.idem_key == f"@{T}/1/7"


async def test_commit_metadata_skips_settled_after_reassign(engine: tuple[Engine, FakeConsumer]) -> None:
    eng, consumer = engine
    s = eng.attach([], 10, 0, 10)
    await intake(eng, msg(0, 0, "a"), msg(0, 1, "b"), msg(0, 2, "c"))
    got = await take(eng, s, 3)
    await eng.ack([got[1].delivery_ids[-1], got[2].delivery_ids[-1]])
    # The settled offsets went out in the commit loop's commit or go in the revoke's.
    commits = [*consumer.commits, *await eng.on_revoked([(T, 0)], lost=False)]
    c = commits[-1]
    assert c.offset == 0
    await eng.on_assigned([Assigned(T, 0, c.offset, c.metadata)])
    await intake(eng, msg(0, 0, "a"), msg(0, 1, "b"), msg(0, 2, "c"))
    assert eng.metrics.skipped.labels("commit_metadata", T)._value.get() == 2
    # "a" is still out at the app from before the revoke: held back, not delivered twice.
    assert eng.describe()["partitions"][f"{T}[0]"]["states"] == {"busy": 1}


async def waiting_past_their_leases(eng: Engine, *keys: str) -> asyncio.Event:
    """Take in records with ``keys`` (partition 0) and let their leases run out while they wait,
    so handing them out renews the claims; the renewals then wait for the returned event."""
    eng.core.lease_ms = 100
    await intake(eng, *(msg(0, o, k) for o, k in enumerate(keys)))
    await asyncio.sleep(0.2)
    gate = asyncio.Event()
    real_claim = eng.store.claim

    async def gated_claim(
        keys: Sequence[str], owner: str, lease_ms: int, mode: ClaimMode = ClaimMode.CLAIM
    ) -> Any:
        if mode is ClaimMode.RENEW:
            await gate.wait()
        return await real_claim(keys, owner, lease_ms, mode)

    eng.core.store.claim = gated_claim  # type: ignore[method-assign]
    return gate


async def test_a_stream_cancelled_while_its_frame_renews_leases_loses_no_record(
    engine: tuple[Engine, FakeConsumer],
) -> None:
    # Found in a 10k-message fault run (F3, app kill -9): the app died while next_frame waited
    # for the store to renew the leases of its batch. gRPC cancels the handler there; the batch,
    # already taken from the ready queue, belonged to no queue and no stream and was never
    # delivered, while its partition could not commit past it.
    eng, _ = engine
    gate = await waiting_past_their_leases(eng, "c0", "c1")
    dying = eng.attach([T], 10, 0, 10)
    frame = asyncio.create_task(eng.next_frame(dying))
    await asyncio.sleep(0.05)
    frame.cancel()  # the app was killed: gRPC cancels the Subscribe handler
    with pytest.raises(asyncio.CancelledError):
        await frame
    eng.detach(dying)
    gate.set()
    s = eng.attach([T], 10, 0, 10)
    got = await take(eng, s, 2)
    assert [p.idem_key for p in got] == ["c0", "c1"]


async def test_a_stream_closed_while_its_frame_renews_leases_hands_nothing_to_it(
    engine: tuple[Engine, FakeConsumer],
) -> None:
    # Same race without a cancel: the stream was detached meanwhile. The batch goes back to the
    # ready queue, not into the closed stream's in-flight set, where no timer would find it.
    eng, _ = engine
    gate = await waiting_past_their_leases(eng, "d0")
    closing = eng.attach([T], 10, 0, 10)
    frame = asyncio.create_task(eng.next_frame(closing))
    await asyncio.sleep(0.05)
    eng.detach(closing)
    gate.set()
    assert await asyncio.wait_for(frame, 2) == []
    assert not closing.in_flight
    s = eng.attach([T], 10, 0, 10)
    assert [p.idem_key for p in await take(eng, s, 1)] == ["d0"]


async def test_an_unexpected_claim_failure_retries_the_records_later(
    engine: tuple[Engine, FakeConsumer],
) -> None:
    # A claim that fails with something other than StoreUnavailable (a bug, a decoding error)
    # must not strand its records in CLAIMING, where nothing would look at them again.
    eng, _ = engine
    real_claim = eng.store.claim
    failures = [RuntimeError("unexpected reply")]

    async def flaky_claim(
        keys: Sequence[str], owner: str, lease_ms: int, mode: ClaimMode = ClaimMode.CLAIM
    ) -> Any:
        if failures:
            raise failures.pop()
        return await real_claim(keys, owner, lease_ms, mode)

    eng.core.store.claim = flaky_claim  # type: ignore[method-assign]
    await intake(eng, msg(0, 0, "u0"))
    s = eng.attach([T], 10, 0, 10)
    assert [(p.idem_key, p.attempt) for p in await take(eng, s, 1)] == [("u0", 1)]


async def test_a_partition_that_stops_committing_is_reported_once(
    engine: tuple[Engine, FakeConsumer], caplog: pytest.LogCaptureFixture
) -> None:
    # One record held back (here: delivered and never acked, the app gone quiet) stops its
    # partition's commits however many records after it settle. Operators get one warning per
    # stall naming that record, and a gauge; progress clears both.
    eng, _ = engine
    now = [1000.0]
    eng.core.clock = lambda: now[0]
    await intake(eng, msg(0, 0, "held"), msg(0, 1, "next"))
    s = eng.attach([T], 10, 0, 10)
    got = await take(eng, s, 2)
    await eng.ack([p.delivery_ids[-1] for p in got if p.idem_key == "next"])
    eng.check_stalls()  # starts watching
    now[0] += 30
    eng.check_stalls()
    assert eng.metrics.stalled_partitions._value.get() == 0  # 30 s: not yet (threshold 70 s)
    now[0] += 60
    with caplog.at_level("WARNING"):
        eng.check_stalls()
        eng.check_stalls()
    warnings = [r.getMessage() for r in caplog.records if "has not moved" in r.getMessage()]
    assert len(warnings) == 1
    assert "orders[0] has not moved past offset 0" in warnings[0]
    assert "in_flight (attempt 1, key 'held')" in warnings[0]
    assert eng.metrics.stalled_partitions._value.get() == 1
    await eng.ack([p.delivery_ids[-1] for p in got if p.idem_key == "held"])
    eng.check_stalls()
    assert eng.metrics.stalled_partitions._value.get() == 0


async def test_a_stall_on_a_ready_record_says_what_each_stream_could_take(
    engine: tuple[Engine, FakeConsumer], caplog: pytest.LogCaptureFixture
) -> None:
    # A READY record that holds its partition back: the warning says where it is in the ready
    # queue and each stream's credit, so "no stream takes it" reads apart from "it waits".
    eng, _ = engine
    now = [1000.0]
    eng.core.clock = lambda: now[0]
    s = eng.attach([T], 1, 0, 1)  # room for one record
    await intake(eng, msg(0, 0, "first"), msg(0, 1, "second"))
    [first] = await take(eng, s, 1)
    await eng.ack([first.delivery_ids[-1]])  # "second" now holds the commit, READY, not yet taken
    eng.check_stalls()  # starts watching
    now[0] += 90
    with caplog.at_level("WARNING"):
        eng.check_stalls()
    [warning] = [r.getMessage() for r in caplog.records if "has not moved" in r.getMessage()]
    assert "record @1 is ready (attempt 1, key 'second')" in warning, warning
    assert "#0 of 1 in topic orders's ready queue" in warning, warning
    assert f"stream {s.id}: 0/1 outstanding (0 expired), wants it;" in warning, warning


async def expired_at(eng: Engine, s: Any, *keys: str) -> list[Any]:
    """Deliver records with ``keys`` (partition 0) on ``s`` and let their ack deadlines pass, so
    ``s`` holds their expired copies (for up to one more deadline, set long here). Returns the
    records in key order."""
    eng.core.deadline_s = 0.1
    await intake(eng, *(msg(0, o, k) for o, k in enumerate(keys)))
    got = await take(eng, s, len(keys))
    eng.core.deadline_s = 30
    await asyncio.sleep(0.3)
    return sorted(got, key=lambda p: p.idem_key)


async def test_an_expired_delivery_keeps_its_credit_until_the_app_answers_it(
    engine: tuple[Engine, FakeConsumer],
) -> None:
    # A stalled app still holds the copies whose deadline passed. Their redeliveries must not
    # be piled on the same stream (max_in_flight counts what the app holds): they go to a stream
    # with credit, and the stalled one gets credit back when it acks or nacks the old copies.
    eng, _ = engine
    slow = eng.attach([T], 2, 0, 2)
    first = await expired_at(eng, slow, "e0", "e1")
    assert slow.outstanding == 2
    assert not slow.in_flight
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(eng.next_frame(slow), 0.3)
    other = eng.attach([T], 10, 0, 10)
    again = await take(eng, other, 2)
    assert sorted((p.idem_key, p.attempt) for p in again) == [("e0", 2), ("e1", 2)]
    # The stalled app catches up: the old copy of e0 is acked (settling it: the effect
    # happened), e1's is nacked, which changes nothing for its delivery on the other stream.
    e0, e1 = first
    assert await eng.ack([e0.delivery_ids[0]]) == [AckOutcome.OK]
    assert await eng.nack([e1.delivery_ids[0]], None, False, "") == [AckOutcome.OK]
    assert slow.outstanding == 0
    assert e1.state.value == "in_flight"
    assert e1.stream is other
    assert await eng.extend([e1.delivery_ids[0]], 10) == [AckOutcome.STALE]  # not that copy's
    assert await eng.ack([e1.delivery_ids[-1]]) == [AckOutcome.OK]


async def test_a_stream_is_not_sent_a_record_whose_expired_copy_it_still_holds(
    engine: tuple[Engine, FakeConsumer],
) -> None:
    # One app, slower than its deadline. With credit to spare it gets new records, but not the
    # redeliveries of copies it still holds: it answers those copies, and its ack settles them.
    eng, _ = engine
    s = eng.attach([T], 3, 0, 3)
    old = await expired_at(eng, s, "h0", "h1")
    await intake(eng, msg(0, 2, "h2"))
    assert [p.idem_key for p in await take(eng, s, 1)] == ["h2"]  # the one credit left
    assert await eng.ack([old[0].delivery_ids[0]]) == [AckOutcome.OK]  # h0: settled by its old copy
    assert await eng.nack([old[1].delivery_ids[0]], 0, False, "") == [AckOutcome.OK]
    [again] = await take(eng, s, 1)  # h1 given back by its holder: now it may come here again
    assert (again.idem_key, again.attempt) == ("h1", 2)


async def test_a_redelivery_goes_ahead_of_the_backlog(engine: tuple[Engine, FakeConsumer]) -> None:
    # Records claimed at intake can queue by the thousand. A record whose deadline passed holds
    # its partition's commits back until it settles, so it goes to the front, not the back.
    eng, _ = engine
    eng.core.deadline_s = 0.1
    await intake(eng, *(msg(0, o, f"b{o}") for o in range(4)))
    first = eng.attach([T], 1, 0, 1)
    assert [p.idem_key for p in await take(eng, first, 1)] == ["b0"]
    await asyncio.sleep(0.3)  # b0's deadline passes; b1..b3 still wait in the ready queue
    second = eng.attach([T], 1, 0, 1)
    assert [(p.idem_key, p.attempt) for p in await take(eng, second, 1)] == [("b0", 2)]


async def test_an_expired_copy_gives_its_credit_back_after_one_more_deadline(
    engine: tuple[Engine, FakeConsumer],
) -> None:
    # An app that lost a copy (or never answers it) must not starve: the copy holds its credit
    # for one more ack deadline at most, then the record may come to that stream again.
    eng, _ = engine
    eng.core.deadline_s = 0.2
    await intake(eng, msg(0, 0, "lost"))
    s = eng.attach([T], 1, 0, 1)
    await take(eng, s, 1)
    await asyncio.sleep(0.3)  # the deadline passed: the copy holds the only credit
    assert s.outstanding == 1
    [again] = await take(eng, s, 1)  # within about one more deadline
    assert (again.idem_key, again.attempt) == ("lost", 2)


async def test_a_copy_whose_ack_failed_does_not_hold_credit_past_its_deadline(
    engine: tuple[Engine, FakeConsumer],
) -> None:
    # Seen in the Redis fault runs: the app acked while the store was down (UNAVAILABLE), and it
    # will not answer that copy again. Held as an expired copy, it would hold the stream's credit
    # and keep its own redelivery away from the stream (records never delivered).
    eng, _ = engine
    eng.core.deadline_s = 0.2
    await intake(eng, msg(0, 0, "down"))
    s = eng.attach([T], 1, 0, 1)
    [p] = await take(eng, s, 1)
    real_complete = eng.store.complete

    async def failing_complete(*args: Any) -> Any:
        raise StoreUnavailable("Redis dedup store unreachable (test)")

    eng.core.store.complete = failing_complete  # type: ignore[method-assign,assignment]
    with pytest.raises(StoreUnavailable):
        await eng.ack([p.delivery_ids[-1]])
    eng.core.store.complete = real_complete  # type: ignore[method-assign]
    await asyncio.sleep(0.25)  # past the deadline
    assert s.outstanding <= 1
    [again] = await asyncio.wait_for(eng.next_frame(s), 0.15)  # at once, not a deadline later
    assert (again.idem_key, again.attempt) == ("down", 2)


def fake_clocks(eng: Engine) -> tuple[list[float], list[int]]:
    """The engine's clock (s) and a fresh memory store's clock (ms), moved by hand; ack deadline
    5 s, lease 6 s."""
    now, store_now = [1000.0], [1_000_000]
    eng.core.clock = lambda: now[0]
    eng.core.store = MemoryStore(clock=lambda: store_now[0])
    eng.core.deadline_s, eng.core.lease_ms = 5, 6000
    return now, store_now


async def taken_over_and_acked(eng: Engine, claim: Any, key: str) -> None:
    """Another sidecar claims ``key`` (this one's lease having run out) and its app acks it."""
    [other] = await claim([key], "other-sidecar", 6000)
    assert other.status.name == "NEW"
    await eng.store.complete([key], "other-sidecar", 60_000)


async def test_a_lease_runs_from_when_the_store_was_asked(engine: tuple[Engine, FakeConsumer]) -> None:
    # Suspected cause of an F4 failure in CI (zombie sidecar, SIGSTOP past its session and
    # leases): the sidecar stopped between the store granting a claim and reading that answer.
    # It dated the lease from the read, 10 s late, trusted a lease the store had already let
    # another sidecar take over, and delivered a key after that sidecar's Ack had returned OK.
    eng, _ = engine
    now, store_now = fake_clocks(eng)
    real_claim = eng.store.claim
    gate = asyncio.Event()

    async def paused_before_reading(
        keys: Sequence[str], owner: str, lease_ms: int, mode: ClaimMode = ClaimMode.CLAIM
    ) -> Any:
        answer = await real_claim(keys, owner, lease_ms, mode)
        if mode is not ClaimMode.RENEW:
            await gate.wait()  # SIGSTOP: the store has answered, the sidecar has not read it
        return answer

    eng.core.store.claim = paused_before_reading  # type: ignore[method-assign]
    eng.on_records([msg(0, 0, "z")])
    await asyncio.sleep(0.05)
    now[0] += 10
    store_now[0] += 10_000  # the lease ran out; another sidecar claims, delivers and acks
    await taken_over_and_acked(eng, real_claim, store_key(eng.settings.kafka.group_id, T, "z"))
    gate.set()  # SIGCONT
    await asyncio.sleep(0.05)
    s = eng.attach([T], 10, 0, 10)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(eng.next_frame(s), 0.3)  # renewing the lease finds it done
    assert not eng.core.partitions[(T, 0)].pending  # settled as a duplicate, never delivered


async def test_a_renewal_read_after_a_pause_is_renewed_again_before_sending(
    engine: tuple[Engine, FakeConsumer],
) -> None:
    # The third F4 failure in CI (zombie sidecar): the sidecar renewed a queued record's lease
    # before sending it, and was stopped after the store answered NEW but before the record was
    # handed out. By SIGCONT the lease had run out and another sidecar had delivered the key and
    # had its Ack answered OK; the resumed sidecar sent the key anyway, on the stale renewal.
    eng, _ = engine
    now, store_now = fake_clocks(eng)
    real_claim = eng.store.claim
    key = store_key(eng.settings.kafka.group_id, T, "z")
    renewals: list[int] = []

    async def paused_after_the_renewal(
        keys: Sequence[str], owner: str, lease_ms: int, mode: ClaimMode = ClaimMode.CLAIM
    ) -> Any:
        answer = await real_claim(keys, owner, lease_ms, mode)
        if mode is ClaimMode.RENEW:
            renewals.append(len(keys))
            if len(renewals) == 1:  # SIGSTOP once the store has renewed; the lease runs out
                now[0] += 10
                store_now[0] += 10_000
                await taken_over_and_acked(eng, real_claim, key)
        return answer

    eng.core.store.claim = paused_after_the_renewal  # type: ignore[method-assign]
    eng.on_records([msg(0, 0, "z")])
    await asyncio.sleep(0.05)  # claimed NEW, waiting in the ready queue
    now[0] += 2
    store_now[0] += 2_000  # queued long enough that its lease no longer covers a deadline
    s = eng.attach([T], 10, 0, 10)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(eng.next_frame(s), 0.3)
    assert renewals == [1, 1]  # the stale renewal was renewed again, and found the key done
    assert not eng.core.partitions[(T, 0)].pending  # settled as a duplicate, never delivered


async def delivered_then_paused(eng: Engine, key: str) -> Any:
    """Deliver a record with ``key``, then move the store's clock a minute on (this sidecar was
    paused past its lease). Returns the record."""
    store_now = [1_000_000]
    eng.core.store = MemoryStore(clock=lambda: store_now[0])
    s = eng.attach([T], 10, 0, 10)
    await intake(eng, msg(0, 0, key))
    [p] = await take(eng, s, 1)
    store_now[0] += 60_000
    return p


async def test_a_late_ack_answers_once_the_next_owners_claim_has_ended(
    engine: tuple[Engine, FakeConsumer],
) -> None:
    # The second F4 failure in CI (zombie sidecar): this sidecar was paused past its lease with
    # the app's Ack queued. Another sidecar claimed the key and held it in its ready queue; the
    # Ack then marked it done and answered OK, and the other sidecar sent the key after that OK
    # (it asks the store again only when its lease nears its end). The answer must wait until
    # that claim has ended: a delivery before the OK keeps the promise, one after it breaks it.
    eng, _ = engine
    p = await delivered_then_paused(eng, "z")  # the lease lapsed, and the next owner claimed the key
    key = store_key(eng.settings.kafka.group_id, T, "z")
    [other] = await eng.store.claim([key], "next-owner", 600)
    assert other.status.name == "NEW"
    t0 = asyncio.get_running_loop().time()
    assert await eng.ack([p.delivery_ids[-1]]) == [AckOutcome.OK]
    waited = asyncio.get_running_loop().time() - t0
    assert 0.6 <= waited < 2.0, waited
    assert eng.metrics.ack_fence_waits._value.get() == 1
    assert eng.metrics.late_acks._value.get() == 1
    [after] = await eng.store.claim([key], "next-owner", 600, ClaimMode.RENEW)
    assert after.status.name == "DONE"  # its renewal before sending finds the key done


async def test_a_late_ack_with_no_other_claim_answers_at_once(engine: tuple[Engine, FakeConsumer]) -> None:
    eng, _ = engine
    p = await delivered_then_paused(eng, "y")
    assert await asyncio.wait_for(eng.ack([p.delivery_ids[-1]]), 0.3) == [AckOutcome.OK]
    assert eng.metrics.late_acks._value.get() == 1
    assert eng.metrics.ack_fence_waits._value.get() == 0


async def claimed_by_the_next_owner(eng: Engine, key: str) -> tuple[str, int]:
    """What another sidecar gets when it claims ``key`` (this one having gone away)."""
    [c] = await eng.store.claim([store_key(eng.settings.kafka.group_id, T, key)], "next-owner", 30_000)
    return c.status.name, c.attempt


@pytest.mark.parametrize("ended_by", ["deadline", "stream closed"])
async def test_a_redelivery_is_counted_in_the_store(
    engine: tuple[Engine, FakeConsumer], ended_by: str
) -> None:
    # The app saw attempts 1 and 2 from this sidecar (the first copy's deadline passed, or its
    # stream broke after the app may have applied it). If this sidecar then dies, the sidecar
    # that takes the key over must say 3: the store counts the redelivery, not only this engine.
    eng, _ = engine
    eng.core.lease_ms = 300
    first = eng.attach([T], 1, 0, 1)
    if ended_by == "deadline":
        await expired_at(eng, first, "r")
    else:
        await intake(eng, msg(0, 0, "r"))
        await take(eng, first, 1)
        eng.detach(first)
    second = eng.attach([T], 1, 0, 1)
    [again] = await take(eng, second, 1)
    assert (again.idem_key, again.attempt) == ("r", 2)
    await asyncio.sleep(0.4)  # this sidecar stops renewing: its lease runs out
    assert await claimed_by_the_next_owner(eng, "r") == ("NEW", 3)


async def test_a_redelivery_claimed_but_not_sent_gives_its_attempt_back_when_the_partition_moves(
    engine: tuple[Engine, FakeConsumer],
) -> None:
    # The deadline passed and the redelivery (attempt 2) was claimed, but no app was sent it
    # before the partition moved: the app saw attempt 1 only, so the next owner's is attempt 2.
    eng, _ = engine
    s = eng.attach([T], 1, 0, 1)
    [old] = await expired_at(eng, s, "u")  # the only stream holds the expired copy: not resent
    assert (old.state.value, old.attempt) == ("ready", 2)
    await eng.on_revoked([(T, 0)], lost=False)
    assert await claimed_by_the_next_owner(eng, "u") == ("NEW", 2)


class LateClaimAnswers(MemoryStore):
    """Claims take effect at once, but their answers arrive late (a store call that waits in a
    thread pool or on the network while a later call is answered first)."""

    async def claim(self, *args: Any, **kwargs: Any) -> Any:
        answer = await super().claim(*args, **kwargs)
        await asyncio.sleep(0.05)
        return answer


@pytest.mark.parametrize("when", ["claiming", "in flight again"])
async def test_an_ack_of_an_earlier_delivery_id_settles_and_ends_redelivery(when: str) -> None:
    """The app acks a delivery after its stream broke: the record settles and is not delivered
    again, whether its redelivery's claim was still unanswered or it was already in flight on
    another stream. (Before the fix, a claim answered after the Ack had settled the record sent
    it once more: a delivery after an OK ack.)"""
    settings = config.load(None, kafka={"topics": [T]}, delivery={"ack_deadline_seconds": 30})
    eng = Engine(settings, LateClaimAnswers(), cast(AsyncProducer, FakeProducer()), Metrics(), owner="me")
    eng.start(cast(ConsumerLoop, FakeConsumer()))
    await eng.on_assigned([Assigned(T, 0, -1, None)])
    try:
        first = eng.attach([T], 10, 0, 10)
        await intake(eng, msg(0, 0, "r"))
        [d1] = await take(eng, first, 1)
        old_id = d1.delivery_ids[-1]
        eng.detach(first)  # the redelivery's claim starts now; its answer comes 50 ms later
        await asyncio.sleep(0.01)  # the claim has taken effect in the store; its answer has not come
        second = eng.attach([T], 10, 0, 10)
        if when == "in flight again":
            [d2] = await take(eng, second, 1)
            assert d2.delivery_ids[-1] != old_id
        assert await eng.ack([old_id]) == [AckOutcome.OK]
        with pytest.raises(TimeoutError):  # nothing is sent after the OK answer
            await asyncio.wait_for(eng.next_frame(second), 0.3)
        eng.detach(second)
        third = eng.attach([T], 10, 0, 10)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(eng.next_frame(third), 0.3)
        assert eng.committable()[(T, 0)] == 1
    finally:
        await eng.stop(0)
