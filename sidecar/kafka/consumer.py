"""The Kafka consumer, owned by one poll thread that never blocks on the application.

librdkafka calls are blocking, and rebalance callbacks run inside ``consume()``. So one thread owns
the ``confluent_kafka.Consumer``: it polls in batches, runs rebalance callbacks, and executes the
commands (pause, resume, commit, leave, join) that the asyncio side queues for it. Records and
rebalance events cross to the event loop through a :class:`ConsumerHandler`.

Back-pressure never blocks the poll loop. When the event loop falls behind (too many records
handed over and not yet taken in), the thread stops taking records out of librdkafka's queue and
librdkafka stops fetching once ``queued.max.messages.kbytes`` is queued. It does not pause the
partitions for that: pausing purges everything librdkafka has prefetched, and fetching it again
costs a round trip plus, for compressed batches, decompressing them again (a single fetch of well
compressed records can be tens of megabytes once decompressed). Only when the loop stays behind
for ``stall_pause_after`` seconds are the partitions paused, and polling continues, so rebalance
callbacks run and the consumer stays in the group (``max.poll.interval.ms`` is never tripped).

Commits are asynchronous: librdkafka sends them and reports each one through its ``on_commit``
callback, which runs inside a later ``consume()`` on this thread. A synchronous commit would stop
fetching for a broker round trip (several milliseconds, far more when the CPU is contended) every
commit interval, and that shows directly in the latency tail. Only the commit in the revoke
callback is synchronous: the partitions must be committed before they are handed over.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from sidecar.kafka import connect
from sidecar.kafka.poll_thread import PollThread
from sidecar.observability.outage import Outage

#: Hand-overs of fewer records than this are paced (see ConsumerLoop._fetch).
PACE_BELOW = 64
#: Tries of a commit on revoke that the group refused because it was rebalancing.
REVOKE_COMMIT_TRIES = 4

log = logging.getLogger(__name__)
T = TypeVar("T")
TP = tuple[str, int]

# librdkafka properties the sidecar sets itself; user overrides of these would break the guarantee.
OWNED_PROPERTIES = frozenset(
    {
        "enable.auto.commit",
        "enable.auto.offset.store",
        "group.id",
        "group.protocol",
        "partition.assignment.strategy",
    }
)


@dataclass(frozen=True, slots=True)
class Assigned:
    topic: str
    partition: int
    committed: int  # -1 when nothing committed
    metadata: str | None


@dataclass(frozen=True, slots=True)
class CommitOffset:
    topic: str
    partition: int
    offset: int
    metadata: str


class ConsumerHandler(Protocol):
    """Coroutines run on the event loop, called from the poll thread."""

    async def on_assigned(self, partitions: list[Assigned]) -> None: ...

    async def on_revoked(self, partitions: list[TP], lost: bool) -> list[CommitOffset]: ...

    def on_records(self, records: list[Message]) -> None:
        """Called on the event loop (via call_soon_threadsafe) with a fetched batch."""
        ...


class ConsumerLoop(PollThread[Consumer]):
    """Runs a consumer on its own thread. All public methods are safe from the event loop.

    Parameters:
        config: librdkafka consumer properties (bootstrap, group, security...).
        topics: topics to subscribe to.
        handler: receives records and rebalance events on ``loop``.
        fetch_batch: records per ``consume()`` call.
        handover_interval: least seconds between two hand-overs of a part-full batch.
        max_handover: records handed to the loop and not yet taken in before fetching stops.
        stall_pause_after: seconds the loop may stay behind before every partition is paused.
        outage: counts the failures the error callback reports and logs their changes of state
            (without it, each is logged).
    """

    def __init__(
        self,
        config: dict[str, Any],
        topics: Sequence[str],
        handler: ConsumerHandler,
        loop: asyncio.AbstractEventLoop,
        fetch_batch: int = 500,
        max_handover: int = 5_000,
        stall_pause_after: float = 2.0,
        handover_interval: float = 0.0,
        outage: Outage | None = None,
    ) -> None:
        super().__init__("consumer", outage)
        self._config = {
            **config,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "error_cb": self._on_error,
            "on_commit": self._on_commit,
            "logger": connect.LIBRDKAFKA_LOG,
        }
        if self._config.get("group.protocol") != "consumer":
            # Incremental rebalances: only the partitions that move are revoked. (Under the
            # consumer protocol the broker assigns, incrementally too.)
            self._config["partition.assignment.strategy"] = "cooperative-sticky"
        self._config.setdefault("auto.offset.reset", "earliest")
        # librdkafka prefetches up to 64 MB per partition by default; the tracker bounds what is
        # unsettled, and this bounds what is fetched but not yet taken in.
        self._config.setdefault("queued.max.messages.kbytes", 8192)
        # librdkafka waits this long before fetching again once its queue was full (1 s by
        # default), which stalls a consumer that drains in bursts, as this one does.
        self._config.setdefault("fetch.queue.backoff.ms", 20)
        self._topics = list(topics)
        self._handler = handler
        self._loop = loop
        self._fetch_batch = fetch_batch
        self._handover_interval = handover_interval
        self._last_handover = 0.0  # time.monotonic() of the last hand-over (poll thread only)
        self._max_handover = max_handover
        self._stall_pause_after = stall_pause_after
        self._consumer: Consumer | None = None
        self._assigned: set[TP] = set()
        self._want_paused: set[TP] = set()  # paused by the loop (tracker bounds)
        self._stalled = False  # hand-over back-pressure: not taking records from librdkafka
        self._stalled_since = 0.0
        self._stall_paused = False  # stalled for too long: every partition paused
        self._paused: set[TP] = set()  # what is paused in librdkafka now
        self._subscribed = False
        self.handover = 0  # records handed to the loop, not yet taken in (loop decrements)
        self.handover_lock = threading.Lock()
        self.halted = False  # set on shutdown: stop fetching, stay in the group until stop()
        # Asynchronous commits waiting for librdkafka's report, oldest first (poll thread only).
        self._commits: deque[_InFlightCommit] = deque()
        self.commit_timeout_s = 60.0

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._consumer = Consumer(self._config)
        self._start_thread("dedup-consumer")
        self.join_group()

    @property
    def subscribed(self) -> bool:
        """In the group (not left for want of an app stream)."""
        return self._subscribed

    @property
    def assigned_count(self) -> int:
        """How many partitions this member holds now."""
        return len(self._assigned)

    def join_group(self) -> None:
        self._command(self._do_subscribe)

    def leave_group(self) -> None:
        self._command(self._do_unsubscribe)

    # -- commands from the loop --------------------------------------------------------------------

    def set_paused(self, tp: TP, paused: bool) -> None:
        def apply(_: Consumer) -> None:
            if paused:
                self._want_paused.add(tp)
            else:
                self._want_paused.discard(tp)
            self._sync_pause()

        self._command(apply)

    async def commit(self, offsets: Sequence[CommitOffset]) -> list[CommitOffset]:
        """Commit asynchronously from the poll thread. Returns the offsets Kafka accepted."""
        fut: asyncio.Future[list[CommitOffset]] = self._loop.create_future()

        def apply(consumer: Consumer) -> None:
            mine = [o for o in offsets if (o.topic, o.partition) in self._assigned]
            if not mine:
                self._loop.call_soon_threadsafe(_set_result, fut, [])
                return
            try:
                consumer.commit(offsets=[_tp(o) for o in mine], asynchronous=True)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                self._loop.call_soon_threadsafe(_set_exc, fut, exc)
            else:
                self._commits.append(_InFlightCommit(mine, fut))

        self._command(apply)
        try:
            async with asyncio.timeout(self.commit_timeout_s):
                return await asyncio.shield(fut)
        except TimeoutError:
            log.warning(
                "no commit report from librdkafka in %.0fs; committing again later", self.commit_timeout_s
            )
            return []

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition] | None) -> None:
        """librdkafka's report of an asynchronous commit (on the poll thread, inside consume())."""
        partitions = partitions or []
        reported = {(tp.topic, tp.partition, tp.offset) for tp in partitions}
        for i, pending in enumerate(self._commits):
            if pending.key == reported:
                del self._commits[i]
                break
        else:
            if err is None or not self._commits:
                return  # not one of ours (librdkafka reports only the asynchronous commits we made)
            # A failure reported without its offsets: it answers the oldest commit in flight.
            log.warning("commit failed: %s", err)
            self._loop.call_soon_threadsafe(_set_result, self._commits.popleft().fut, [])
            return
        accepted = []
        by_tp = {(o.topic, o.partition): o for o in pending.offsets}
        for tp in partitions:
            failure = tp.error or err
            if failure is None:
                accepted.append(by_tp[(tp.topic, tp.partition)])
            elif _rebalancing(failure):
                # Expected while the group rebalances; the next commit after it covers this one.
                log.info(
                    "commit of %s[%d] deferred, the group is rebalancing: %s", tp.topic, tp.partition, failure
                )
            else:
                log.warning("commit of %s[%d] failed: %s", tp.topic, tp.partition, failure)
        self._loop.call_soon_threadsafe(_set_result, pending.fut, accepted)

    def _abandon_commits(self) -> None:
        """The consumer is closed: no report will come for commits still in flight."""
        while self._commits:
            self._loop.call_soon_threadsafe(_set_result, self._commits.popleft().fut, [])

    @property
    def paused(self) -> frozenset[TP]:
        """Partitions paused in librdkafka now (for metrics and tests; read from any thread)."""
        return frozenset(self._paused)

    def taken_in(self, n: int) -> None:
        with self.handover_lock:
            self.handover -= n
        if self._stalled:
            self._wake.set()

    # -- poll thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        try:
            while not self._stop.is_set():
                self._wake.clear()
                self._drain_commands(consumer)
                if not self._back_pressure():
                    continue
                if not self._subscribed:
                    if self._commits:
                        consumer.consume(1, 0.05)  # serves the reports of commits still in flight
                    else:
                        self._stop.wait(0.05)
                    continue
                msgs = self._fetch(consumer)
                if not msgs:
                    continue
                records = []
                for m in msgs:
                    err = m.error()
                    if err is None:
                        records.append(m)
                    elif err.code() != KafkaError._PARTITION_EOF:
                        log.warning("consumer error: %s", err)
                if records:
                    with self.handover_lock:
                        self.handover += len(records)
                    self._loop.call_soon_threadsafe(self._handler.on_records, records)
                    self._last_handover = time.monotonic()
            self._drain_commands(consumer)
            if self._subscribed:
                self._do_unsubscribe(consumer)
        except BaseException as exc:
            log.exception("consumer thread failed")
            self.fatal = exc
        finally:
            try:
                consumer.close()
            except Exception:
                log.exception("closing the consumer failed")
            self._abandon_commits()

    def _fetch(self, consumer: Consumer) -> list[Message]:
        """Take what librdkafka has queued, up to a batch, without waiting for a full batch.

        ``consume(n, timeout)`` waits until it has ``n`` records or the timeout passed, which at
        a low rate adds up to the whole timeout to every record's latency. So take what is there;
        if nothing is, wait for the first record only, then take what came with it.

        Each hand-over costs the same whatever its size: a wake-up of the event loop, a claim
        round trip, a frame, an ``Ack``. A producer that sends every record on its own makes
        nearly every fetch one record long, and those fixed costs per record saturated two cores
        at 2,000 records/s. So a part-full batch handed over less than ``handover_interval``
        after the previous one waits out the rest of that interval for more records: at most
        one small hand-over per interval, while a record after a quiet spell goes at once.
        Batches of PACE_BELOW records or more never wait: their fixed costs are shared already,
        and under load a wait would only leave the event loop idle.
        """
        batch = self._fetch_batch
        msgs = consumer.consume(batch, 0)
        if not msgs:
            msgs = consumer.consume(1, 0.1)
            if msgs and batch > 1:
                msgs += consumer.consume(batch - 1, 0)
        if msgs and len(msgs) < min(batch, PACE_BELOW) and self._handover_interval:
            wait = self._last_handover + self._handover_interval - time.monotonic()
            if wait > 0:
                msgs += consumer.consume(batch - len(msgs), wait)
        return msgs

    def _back_pressure(self) -> bool:
        """Decide whether to take records now. Returns False after waiting a little instead."""
        with self.handover_lock:
            backlog = self.handover
        # Hysteresis: stop above the limit, go on once the loop has caught up to a quarter of it.
        if self._stalled:
            stalled = self.halted or backlog > self._max_handover // 4
        else:
            stalled = self.halted or backlog >= self._max_handover
        now = time.monotonic()
        if stalled != self._stalled:
            self._stalled, self._stalled_since = stalled, now
        paused = stalled and (self.halted or now - self._stalled_since >= self._stall_pause_after)
        if paused != self._stall_paused:
            self._stall_paused = paused
            self._sync_pause()
        if stalled and not paused:
            # Leave the records in librdkafka's queue (it stops fetching when that is full).
            self._wake.wait(0.05)
            return False
        return True

    def _do_subscribe(self, consumer: Consumer) -> None:
        if self._subscribed:
            return
        consumer.subscribe(
            self._topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        self._subscribed = True
        log.info("joined group for topics %s", ", ".join(self._topics))

    def _do_unsubscribe(self, consumer: Consumer) -> None:
        if not self._subscribed:
            return
        # Revoke everything first so the settled prefix is committed while we are still a member.
        if self._assigned:
            self._on_revoke(consumer, [TopicPartition(t, p) for t, p in sorted(self._assigned)])
            consumer.incremental_unassign([TopicPartition(t, p) for t, p in sorted(self._assigned)])
            self._assigned.clear()
        consumer.unsubscribe()
        self._subscribed = False
        self._paused.clear()
        log.info("left the consumer group")

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if not partitions:
            return
        committed = consumer.committed(partitions, timeout=30)
        infos = [
            Assigned(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else -1, tp.metadata)
            for tp in committed
        ]
        self._call(self._handler.on_assigned(infos))
        self._assigned.update((tp.topic, tp.partition) for tp in partitions)
        consumer.incremental_assign(partitions)
        # librdkafka keeps a partition's pause flag across a revoke and a later re-assignment to
        # this member, while our books dropped the partition at the revoke. A partition paused
        # when it was taken away (tracker bound, stall) would come back paused and never resume:
        # after a lost session it stalled half a group until the end of a fault run.
        try:
            consumer.resume(partitions)
        except KafkaException as exc:
            log.warning("resume of newly assigned partitions failed: %s", exc)
        if self._stall_paused:
            self._sync_pause()
        log.info("assigned %s", _fmt(partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._revoke(consumer, partitions, lost=False)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._revoke(consumer, partitions, lost=True)

    def _revoke(self, consumer: Consumer, partitions: list[TopicPartition], lost: bool) -> None:
        tps = [(tp.topic, tp.partition) for tp in partitions if (tp.topic, tp.partition) in self._assigned]
        if not tps:
            return
        offsets = self._call(self._handler.on_revoked(tps, lost))
        if offsets and not lost:
            self._commit_on_revoke(consumer, offsets)
        for tp in tps:
            self._assigned.discard(tp)
            self._want_paused.discard(tp)
            self._paused.discard(tp)
        log.info("%s %s", "lost" if lost else "revoked", _fmt(partitions))

    def _commit_on_revoke(self, consumer: Consumer, offsets: Sequence[CommitOffset]) -> None:
        """Commit what was settled of partitions that go, before they go. A commit refused
        because the group's generation moved on (another member joined or left meanwhile) is
        tried again a few times: what it does not cover, the next owner reads again and skips
        as duplicates through the store, at the cost of a claim round trip per record."""
        left = list(offsets)
        failures: Mapping[TP, KafkaError | KafkaException] = {}
        for attempt in range(REVOKE_COMMIT_TRIES):
            if attempt:
                time.sleep(0.1 * attempt)
            try:
                failures = self._commit_sync(consumer, left)
            except KafkaException as exc:
                failures = {(o.topic, o.partition): exc for o in left}
            left = [o for o in left if (o.topic, o.partition) in failures]
            if not left or not all(_rebalancing(f) for f in failures.values()):
                break
        for (topic, partition), failure in sorted(failures.items()):
            log.warning(
                "commit on revoke of %s[%d] failed (the next owner reads its settled records again and "
                "skips them through the store): %s",
                topic,
                partition,
                failure,
            )

    def _commit_sync(self, consumer: Consumer, offsets: Sequence[CommitOffset]) -> dict[TP, KafkaError]:
        """Commit and wait for the answer; returns the partitions that failed, with the error."""
        if not offsets:
            return {}
        result = consumer.commit(offsets=[_tp(o) for o in offsets], asynchronous=False)
        return {(tp.topic, tp.partition): tp.error for tp in result or [] if tp.error is not None}

    def _sync_pause(self) -> None:
        consumer = self._consumer
        if consumer is None or not self._subscribed:
            return
        want = set(self._assigned) if self._stall_paused else (self._want_paused & self._assigned)
        to_pause, to_resume = want - self._paused, self._paused - want
        try:
            if to_pause:
                consumer.pause([TopicPartition(t, p) for t, p in to_pause])
            if to_resume:
                consumer.resume([TopicPartition(t, p) for t, p in to_resume])
        except KafkaException as exc:
            log.warning("pause/resume failed: %s", exc)
            return
        self._paused = want
        if to_pause or to_resume:
            log.debug("paused %s resumed %s", sorted(to_pause), sorted(to_resume))


class _InFlightCommit:
    __slots__ = ("fut", "key", "offsets")

    def __init__(self, offsets: list[CommitOffset], fut: asyncio.Future[list[CommitOffset]]) -> None:
        self.offsets = offsets
        self.fut = fut
        self.key = {(o.topic, o.partition, o.offset) for o in offsets}


def _set_result(fut: asyncio.Future[T], value: T) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exc(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


#: Errors of a commit made while the group's generation (or member epoch) moved on.
_REBALANCE_ERRORS = frozenset(
    {
        KafkaError.ILLEGAL_GENERATION,
        KafkaError.REBALANCE_IN_PROGRESS,
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError.STALE_MEMBER_EPOCH,
    }
)


def _rebalancing(failure: KafkaError | KafkaException) -> bool:
    err = failure.args[0] if isinstance(failure, KafkaException) and failure.args else failure
    return isinstance(err, KafkaError) and err.code() in _REBALANCE_ERRORS


def _fmt(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions)


def _tp(o: CommitOffset) -> TopicPartition:
    if o.metadata:
        return TopicPartition(o.topic, o.partition, o.offset, o.metadata)
    return TopicPartition(o.topic, o.partition, o.offset)
