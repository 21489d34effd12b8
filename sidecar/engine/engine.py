"""The delivery engine: everything between the Kafka consumer and the app's gRPC calls.

Flow (see docs/ARCHITECTURE.md)::

    consumer batch -> intake: tracker.offer, idempotency key, store.claim(batch)
        NEW  -> ready queue -> Subscribe streams (credit-bounded frames)
        DONE -> settle (skipped duplicate)       BUSY -> claim again later
    Ack(ids)  -> store.complete(batch) -> settle -> commit (interval, revoke, shutdown)
    Nack(ids) -> store.release -> redeliver after backoff; past max attempts -> DLQ -> settle
    timer     -> ack deadline passed -> claim again (extends the lease) -> redeliver, attempt + 1

Everything here runs on the event loop; the only awaits are store round trips and Kafka writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from confluent_kafka import Message

from sidecar import testing_hooks
from sidecar.config import Settings
from sidecar.engine.identity import idempotency_key, store_key
from sidecar.engine.records import TP, Pending, State
from sidecar.engine.streams import ReadyQueue, Stream
from sidecar.errors import InvalidArgument, ResourceExhausted, ShuttingDown, StoreUnavailable
from sidecar.kafka.consumer import Assigned, CommitOffset, ConsumerLoop
from sidecar.kafka.producer import AsyncProducer
from sidecar.metrics import Metrics
from sidecar.offsets import AckTracker, OfferResult
from sidecar.store.base import ClaimMode, ClaimStatus, DedupStore

log = logging.getLogger(__name__)
T = TypeVar("T")

FRAME_HOLD_S = 0.005  # longest a credit-bound frame waits for more credit
CLAIM_BATCH = 500  # keys per claim round trip
CLAIM_SLOTS = 4  # claim round trips in flight at most
CLAIM_BACKLOG = 2_000  # records waiting for a claim before intake waits
STALL_CHECK_S = 5.0  # how often partitions are checked for a committable offset that stopped
_ID_RE = re.compile(r"^([0-9a-f]{8})\.([0-9]+)$")


class AckOutcome:
    OK = 1
    STALE = 2
    UNKNOWN = 3
    ALREADY_ACKED = 4


@dataclass(slots=True)
class _Partition:
    tracker: AckTracker
    generation: int
    pending: dict[int, Pending]  # offset -> record, until settled
    paused: bool = False
    progress: tuple[int, float] = (-1, 0.0)  # committable offset, and since when (stall watch)
    stalled: bool = False


class _Recent:
    """Remembers at least the last ``size`` entries put (at most twice as many), in O(1).

    Two generations: entries go into the young one; when it is full it becomes the old one and
    the previous old one is dropped. Cheaper per entry than an ordered dict evicting one by one.
    """

    __slots__ = ("_old", "_size", "_young")

    def __init__(self, size: int) -> None:
        self._size = size
        self._young: dict[str, str] = {}
        self._old: dict[str, str] = {}

    def put(self, key: str, value: str) -> None:
        young = self._young
        young[key] = value
        if len(young) >= self._size:
            self._old, self._young = young, {}

    def get(self, key: str) -> str | None:
        v = self._young.get(key)
        return v if v is not None else self._old.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._young or key in self._old


class Engine:
    """Parameters:
    settings: the sidecar settings.
    store: the dedup store (claims, completes, releases).
    producer: used for dead letters.
    metrics: Prometheus metrics.
    owner: this sidecar's identity in store claims.
    """

    def __init__(
        self,
        settings: Settings,
        store: DedupStore,
        producer: AsyncProducer,
        metrics: Metrics,
        owner: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.store = store
        self.producer = producer
        self.metrics = metrics
        self.owner = owner
        self._clock = clock
        d = settings.delivery
        self._deadline_s = d.ack_deadline_seconds
        self._lease_ms = int((d.ack_deadline_seconds + d.lease_margin_seconds) * 1000)
        self._retention_ms = settings.store.retention_seconds * 1000
        self._group = settings.kafka.group_id
        self.consumer: ConsumerLoop | None = None
        self._partitions: dict[TP, _Partition] = {}
        self._generations = itertools.count(1)
        self._ready = ReadyQueue()
        self._streams: dict[int, Stream] = {}
        self._key_index: dict[str, Pending] = {}  # store key -> the pending record holding its claim
        self._by_id: dict[str, Pending] = {}
        self._stale = _Recent(100_000)  # delivery id -> store key, for late acks after revoke
        # Keys whose delivery is still out at an app although its partition was revoked: our own
        # claim covers them, so the store would say NEW to us. Hold other records with the key
        # back until that delivery is acked or its lease runs out.
        self._stale_leases: dict[str, float] = {}
        self._acked = _Recent(100_000)  # delivery id -> "" for ALREADY_ACKED answers
        self._expired: dict[str, Stream] = {}  # expired delivery id -> the stream holding its credit
        # Ids whose Ack or Nack failed (store unreachable): the app answered those copies once
        # and may not again, so past their deadline they do not hold credit (see Stream.expired).
        self._answered_failed = _Recent(10_000)
        self._waiting: list[Pending] = []  # BUSY and DELAYED records, checked by the timer
        self._instance = os.urandom(4).hex()
        self._seq = itertools.count(1)
        self._intake: asyncio.Queue[list[Message]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._commit_wakeup = asyncio.Event()
        self._claim_queue: deque[Pending] = deque()  # taken in, waiting for a claim round trip
        self._claims_in_flight = 0
        self._claim_kick = asyncio.Event()  # records queued, or a claim returned
        self._claim_room = asyncio.Event()  # the claim backlog fell below CLAIM_BACKLOG
        self._settled_some = asyncio.Event()  # records settled (or partitions left) since cleared
        self._no_stream_since: float | None = clock()
        self._left_group = False
        self.accepting = True
        self.stopping = False

    # ---------------------------------------------------------------------------------------------
    # lifecycle

    def start(self, consumer: ConsumerLoop) -> None:
        self.consumer = consumer
        loop_tasks = [
            self._intake_loop(),
            self._claim_loop(),
            self._timer_loop(),
            self._commit_loop(),
            self._purge_loop(),
            self._stall_loop(),
        ]
        self._tasks = [asyncio.create_task(c) for c in loop_tasks]

    async def stop(self, grace_s: float) -> None:
        """Stop dispatching new records, wait up to ``grace_s`` for in-flight acks, commit."""
        self.accepting = False
        deadline = self._clock() + grace_s
        while self._clock() < deadline and any(s.in_flight for s in self._streams.values()):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        self.stopping = True
        for s in list(self._streams.values()):
            s.closed = True
            s.wakeup.set()
        # No ack can arrive any more: hand our claims back so the next owner need not wait out
        # the leases. (An app still applying an effect is the stated window; attempt shows it.)
        held = [p for part in self._partitions.values() for p in part.pending.values() if p.attempt > 0]
        await self._release_claims(held)
        await self.commit_now()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def _answer_failed_on_error(self, ids: Sequence[str], call: Awaitable[T]) -> T:
        """``_counted`` for an Ack or Nack: when it fails, remember its ids as answered once."""
        try:
            return await self._counted(call)
        except StoreUnavailable:
            for did in ids:
                self._answered_failed.put(did, "")
            raise

    async def _counted(self, call: Awaitable[T]) -> T:
        """Await a store call; a failure is counted in the metrics and re-raised (nothing applied)."""
        try:
            return await call
        except StoreUnavailable:
            self.metrics.store_errors.inc()
            raise

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---------------------------------------------------------------------------------------------
    # consumer events (ConsumerHandler)

    async def on_assigned(self, partitions: list[Assigned]) -> None:
        d = self.settings.delivery
        for a in partitions:
            tracker = AckTracker(d.max_unsettled_per_partition, d.resume_unsettled, a.committed, a.metadata)
            self._partitions[(a.topic, a.partition)] = _Partition(tracker, next(self._generations), {})
        self.metrics.assigned_partitions.set(len(self._partitions))

    async def on_revoked(self, tps: list[TP], lost: bool) -> list[CommitOffset]:
        commits: list[CommitOffset] = []
        undelivered: list[Pending] = []
        dropped: list[Pending] = []
        for tp in tps:
            part = self._partitions.pop(tp, None)
            if part is None:
                continue
            self._settled_some.set()  # its unsettled records no longer count
            tracker = part.tracker
            if not lost and tracker.committable() >= 0 and tracker.needs_commit():
                commits.append(CommitOffset(tp[0], tp[1], tracker.committable(), tracker.commit_metadata()))
            for p in part.pending.values():
                if p.state in (State.READY, State.BUSY, State.DELAYED, State.CLAIMING) and p.attempt > 0:
                    undelivered.append(p)
                self._drop(p)
                dropped.append(p)
        self._waiting = [p for p in self._waiting if p.state in (State.BUSY, State.DELAYED)]
        self.metrics.assigned_partitions.set(len(self._partitions))
        # Undelivered records: let the next owner claim them at once rather than after the lease,
        # unless a duplicate of the key in a partition we keep takes over the claim here.
        kept = {p.store_key for p in dropped for sh in p.shadows if sh.state is State.SHADOWED}
        await self._release_claims([p for p in undelivered if p.store_key not in kept])
        # Only now (after the release) may shadows in kept partitions claim their keys again.
        for p in dropped:
            self._release_shadows(p)
        return commits

    def _drop(self, p: Pending) -> None:
        """Forget a record of a revoked partition. In-flight ids stay answerable as STALE."""
        if p.stream is not None:
            p.stream.remove(p)
        for did in p.delivery_ids:
            self._by_id.pop(did, None)
            self._stale.put(did, p.store_key)
        if p.state is State.IN_FLIGHT and p.store_key:
            self._stale_leases[p.store_key] = p.lease_until
        if self._key_index.get(p.store_key) is p:
            del self._key_index[p.store_key]
        p.state = State.DROPPED

    def on_records(self, records: list[Message]) -> None:
        self._intake.put_nowait(records)

    # ---------------------------------------------------------------------------------------------
    # intake

    async def _intake_loop(self) -> None:
        limit = max(self.settings.kafka.fetch_batch, 500)
        while True:
            batch = await self._intake.get()
            # Hand-overs queued meanwhile join this batch: at a low rate the poll thread hands
            # records over one by one, and one claim round trip each would not keep up.
            while len(batch) < limit and not self._intake.empty():
                batch = batch + self._intake.get_nowait()
            try:
                await self._take_in(batch)
            except Exception:
                log.exception("intake failed for a batch of %d records", len(batch))
            finally:
                if self.consumer is not None:
                    self.consumer.taken_in(len(batch))

    async def _take_in(self, batch: list[Message]) -> None:
        d = self.settings.delivery
        header, fallback, group = d.idempotency_header, d.key_fallback, self._group
        to_claim: list[Pending] = []
        no_key: list[Pending] = []
        touched: set[TP] = set()
        for m in batch:
            topic, partition, offset = m.topic() or "", m.partition() or 0, m.offset() or 0
            tp = (topic, partition)
            part = self._partitions.get(tp)
            if part is None:
                continue  # revoked since the fetch; the next owner reads it again
            result = part.tracker.offer(offset)
            if result is OfferResult.IGNORED:
                continue
            touched.add(tp)
            if result is OfferResult.ALREADY_SETTLED:
                self.metrics.skipped.labels("commit_metadata").inc()
                continue
            # librdkafka hands consumed headers over as a list of (str, bytes | None).
            headers = cast(list[tuple[str, bytes | None]], m.headers() or [])
            value = m.value() or b""
            key = m.key()
            ik = idempotency_key(headers, header, fallback, topic, partition, offset, key, value)
            ts_type, ts = m.timestamp()
            p = Pending(
                tp,
                offset,
                part.generation,
                ik,
                store_key(group, topic, ik) if ik is not None else "",
                key,
                value,
                headers,
                ts if ts_type else 0,
            )
            part.pending[offset] = p
            if ik is None:
                no_key.append(p)
                continue
            holder = self._key_index.get(p.store_key)
            if holder is not None:
                # An earlier record with this key is pending here: decide this one when that settles.
                p.state = State.SHADOWED
                holder.shadows.append(p)
                continue
            self._key_index[p.store_key] = p
            to_claim.append(p)
        for tp in touched:
            self._update_pause(tp)
        for p in no_key:
            p.reason = f"no {d.idempotency_header!r} header and delivery.key_fallback=dead-letter"
            self._spawn(self._dead_letter([p]))
        if to_claim:
            self._claim_queue.extend(to_claim)
            self._claim_kick.set()
            # Back-pressure: stop taking records in while the claim backlog is long.
            while len(self._claim_queue) >= CLAIM_BACKLOG:
                self._claim_room.clear()
                await self._claim_room.wait()
        # And while too many records are held unsettled in all: the poll thread then stops taking
        # records out of librdkafka, which stops fetching, and nothing prefetched is dropped (as a
        # partition's pause would drop it).
        limit = d.max_unsettled
        while sum(part.tracker.unsettled for part in self._partitions.values()) >= limit:
            self._settled_some.clear()
            await self._settled_some.wait()

    async def _claim_loop(self) -> None:
        """Send queued records to the store, grouped like a group commit.

        With no claim in flight a record is claimed at once (lowest latency at a low rate).
        While one is in flight, records gather until it returns or a full batch is ready, so
        the number of round trips follows the store's speed, not the record rate. Up to
        CLAIM_SLOTS full batches overlap under load (offers already fixed the order).
        """
        queue = self._claim_queue
        while True:
            await self._claim_kick.wait()
            self._claim_kick.clear()
            while queue and self._claims_in_flight < CLAIM_SLOTS:
                if self._claims_in_flight and len(queue) < CLAIM_BATCH:
                    break  # wait for the claim in flight, or for a full batch
                chunk = [queue.popleft() for _ in range(min(CLAIM_BATCH, len(queue)))]
                self._claims_in_flight += 1
                self._spawn(self._claim_chunk(chunk))
            if len(queue) < CLAIM_BACKLOG:
                self._claim_room.set()

    async def _claim_chunk(self, records: list[Pending]) -> None:
        try:
            await self._claim_or_retry_later(records, retry=True)
        finally:
            self._claims_in_flight -= 1
            self._claim_kick.set()

    async def _claim_or_retry_later(
        self, records: list[Pending], retry: bool, front: bool = False, mode: ClaimMode = ClaimMode.CLAIM
    ) -> None:
        """Claim records; if that fails, the timer claims what is still unclaimed a second later.

        Nothing else looks at a record in CLAIMING: a failure that left it there (a store outage
        without ``retry``, or an unexpected error) would strand it, never delivered, while its
        partition could not commit past it.
        """
        try:
            await self._claim(records, retry=retry, front=front, mode=mode)
        except Exception as exc:
            if not isinstance(exc, StoreUnavailable):
                log.exception("claim failed for %d records; retrying in 1s", len(records))
            due = self._clock() + 1.0
            for p in records:
                if p.state is State.CLAIMING:
                    p.state, p.due = State.BUSY, due
                    self._waiting.append(p)

    async def _claim(
        self, records: list[Pending], retry: bool, front: bool = False, mode: ClaimMode = ClaimMode.CLAIM
    ) -> None:
        """Claim records in the store and route them by the answer. ``front``: records that
        waited already (redeliveries, BUSY keys) go ahead of the records claimed at intake, whose
        backlog can be thousands long; they hold their partition's commits back meanwhile.
        ``mode``: REDELIVER for records this sidecar delivered and sends again."""
        delay = 0.05
        now = self._clock()
        if self._stale_leases:
            for key, until in list(self._stale_leases.items()):
                if until <= now:
                    del self._stale_leases[key]
            for p in records:
                held = self._stale_leases.get(p.store_key)
                if held is not None and p.state is not State.DROPPED:
                    p.state, p.due = State.BUSY, min(held, now + self.settings.delivery.busy_retry_seconds)
                    self._waiting.append(p)
            records = [p for p in records if p.state is not State.BUSY]
        while True:
            live = [p for p in records if p.state is not State.DROPPED]
            if not live:
                return
            # The lease runs from when the store was asked, not from when its answer was read: a
            # sidecar paused in between (SIGSTOP, a long GC, a starved VM) must not believe in a
            # lease the store already let another sidecar take over.
            asked = self._clock()
            try:
                claims = await self.store.claim([p.store_key for p in live], self.owner, self._lease_ms, mode)
                break
            except StoreUnavailable as exc:
                self.metrics.store_errors.inc()
                if not retry or self.stopping:
                    raise
                log.warning("claim failed, retrying in %.1fs: %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        now = self._clock()
        orphans: list[str] = []
        won: list[Pending] = []
        for p, c in zip(live, claims, strict=True):
            if p.state is State.DROPPED:
                if c.status is ClaimStatus.NEW:
                    orphans.append(p.store_key)
                continue
            if c.status is ClaimStatus.NEW:
                p.attempt = max(p.attempt + 1, c.attempt)
                p.lease_until = asked + self._lease_ms / 1000
                p.unsent = True
                won.append(p)
            elif c.status is ClaimStatus.DONE:
                self.metrics.skipped.labels("duplicate").inc()
                self._settle(p)
            else:
                p.state = State.BUSY
                p.due = now + self.settings.delivery.busy_retry_seconds
                self._waiting.append(p)
                self.metrics.busy.inc()
        for p in reversed(won) if front else won:
            self._ready.push(p, front=front)
        self._wake_streams()
        await self._release_orphans(orphans)

    async def _release_orphans(self, keys: list[str]) -> None:
        """Hand back claims won for records whose partition was revoked while the store answered.

        Nobody here will deliver them; holding them would make the partition's next owner wait
        out the lease (BUSY) for every such key. A key that another pending record of ours holds
        now (a shadow that took over) stays claimed.
        """
        keys = [k for k in keys if k not in self._key_index]
        if keys:
            with contextlib.suppress(StoreUnavailable):
                await self.store.release(keys, self.owner, delivered=False)

    async def _release_claims(self, records: list[Pending]) -> None:
        """Hand back the claims of records nobody here will deliver (or redeliver) any more.

        A record that never reached an app under this claim gives its attempt back: claiming
        ahead of the app must not make the next owner's first delivery say "attempt 2".
        """
        sent = [p.store_key for p in records if not p.unsent]
        unsent = [p.store_key for p in records if p.unsent]
        with contextlib.suppress(StoreUnavailable):
            if sent:
                await self.store.release(sent, self.owner)
            if unsent:
                await self.store.release(unsent, self.owner, delivered=False)

    # ---------------------------------------------------------------------------------------------
    # streams

    def attach(self, topics: Sequence[str], max_in_flight: int, max_bytes: int, max_batch: int) -> Stream:
        if self.stopping or not self.accepting:
            raise ShuttingDown("the sidecar is shutting down")
        configured = set(self.settings.kafka.topics)
        unknown = [t for t in topics if t not in configured]
        if unknown:
            raise InvalidArgument(
                f"topics {unknown} are not consumed by this sidecar; add them to kafka.topics "
                f"(consumed: {sorted(configured)})"
            )
        if max_in_flight < 0 or max_bytes < 0 or max_batch < 0:
            raise InvalidArgument("max_in_flight, max_in_flight_bytes and max_batch must not be negative")
        if len(self._streams) >= self.settings.server.max_streams:
            raise ResourceExhausted(
                f"{len(self._streams)} streams are open; raise server.max_streams or close idle streams"
            )
        d = self.settings.delivery
        s = Stream(
            frozenset(topics),
            max_in_flight or d.default_max_in_flight,
            max_bytes,
            max_batch or d.default_max_batch,
        )
        self._streams[s.id] = s
        self._no_stream_since = None
        self.metrics.streams.set(len(self._streams))
        if self._left_group and self.consumer is not None:
            log.info("an app stream attached: joining the consumer group again")
            self.consumer.join_group()
            self._left_group = False
        return s

    def detach(self, s: Stream) -> None:
        """The stream closed: its un-acked deliveries are redelivered at once."""
        s.closed = True
        self._streams.pop(s.id, None)
        self.metrics.streams.set(len(self._streams))
        if not self._streams:
            self._no_stream_since = self._clock()
        for did in s.expired:
            self._expired.pop(did, None)
        s.expired.clear()
        again: list[Pending] = []
        for p in list(s.in_flight.values()):
            s.remove(p)
            if p.state is State.IN_FLIGHT and p.acking == 0:
                # The app may have applied it before the stream broke: say so with attempt + 1,
                # counted in the store too (a sidecar taking the key over later counts on).
                p.state = State.CLAIMING
                again.append(p)
                self.metrics.redelivered.labels("stream_closed").inc()
        if again:
            self._spawn(self._claim_or_retry_later(again, retry=False, front=True, mode=ClaimMode.REDELIVER))

    async def next_frame(self, s: Stream) -> list[Pending]:
        """Wait for deliveries for ``s``; returns [] when the stream must end."""
        hold_until: float | None = None
        while not s.closed:
            if self.accepting and s.has_credit():
                room = s.max_in_flight - s.outstanding
                if room < s.min_frame and len(self._ready) > room:
                    # More is waiting than fits: let credit build up for a fuller frame, but
                    # only for FRAME_HOLD_S, so an app that waits for more records first still
                    # gets them.
                    now = time.monotonic()
                    if hold_until is None:
                        hold_until = now + FRAME_HOLD_S
                    if now < hold_until:
                        s.wakeup.clear()
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(hold_until - now):
                                await s.wakeup.wait()
                        continue
                batch = self._ready.take(s)
                if batch:
                    batch = await self._leases_for(s, batch)
                    if s.closed:
                        self._requeue(batch)  # detached while the leases were renewed
                        break
                    if batch:
                        self._hand_out(s, batch)
                        return batch
                    continue
            s.wakeup.clear()
            await s.wakeup.wait()
        return []

    async def _leases_for(self, s: Stream, batch: list[Pending]) -> list[Pending]:
        """``_ensure_leases`` for a batch taken from the ready queue for ``s``. Whatever stops
        it (a store outage, or gRPC cancelling the handler because the app went away) puts the
        batch back: taken from the queue and not yet handed out, it is held nowhere else."""
        try:
            return await self._ensure_leases(batch)
        except StoreUnavailable:
            self.metrics.store_errors.inc()
            self._requeue(batch)
            s.wakeup.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await s.wakeup.wait()  # a closing stream need not wait out the pause
            return []
        except BaseException:
            self._requeue(batch)
            raise

    def _requeue(self, batch: list[Pending]) -> None:
        """Put records taken for a frame back at the front of the ready queue, in order."""
        for p in reversed(batch):
            if p.state is State.READY:
                self._ready.push(p, front=True)
        self._wake_streams()

    async def _ensure_leases(self, batch: list[Pending]) -> list[Pending]:
        """Extend leases that would end before the new ack deadline (records that waited long)."""
        now = self._clock()
        stale = [p for p in batch if p.lease_until < now + self._deadline_s]
        if not stale:
            return batch
        # Renewals: none of these was delivered since our last claim of it.
        claims = await self.store.claim(
            [p.store_key for p in stale], self.owner, self._lease_ms, mode=ClaimMode.RENEW
        )
        keep = {id(p) for p in batch}
        orphans: list[str] = []
        for p, c in zip(stale, claims, strict=True):
            if p.state is State.DROPPED:
                keep.discard(id(p))
                if c.status is ClaimStatus.NEW:
                    orphans.append(p.store_key)
            elif c.status is ClaimStatus.NEW:
                p.lease_until = now + self._lease_ms / 1000
                p.attempt = max(p.attempt, c.attempt)
            elif c.status is ClaimStatus.DONE:
                keep.discard(id(p))
                self.metrics.skipped.labels("duplicate").inc()
                self._settle(p)
            else:
                keep.discard(id(p))
                p.state, p.due = State.BUSY, now + self.settings.delivery.busy_retry_seconds
                self._waiting.append(p)
        await self._release_orphans(orphans)
        return [p for p in batch if id(p) in keep and p.state is State.READY]

    def _hand_out(self, s: Stream, batch: list[Pending]) -> None:
        testing_hooks.reached("before_delivery")
        deadline = self._clock() + self._deadline_s
        for p in batch:
            did = f"{self._instance}.{next(self._seq)}"
            p.delivery_ids.append(did)
            self._by_id[did] = p
            p.state = State.IN_FLIGHT
            p.unsent = False
            p.deadline = deadline
            s.add(p)
        self.metrics.delivered.inc(len(batch))

    def deadline_epoch_ms(self, p: Pending) -> int:
        return int((time.time() + (p.deadline - self._clock())) * 1000)

    def _wake_streams(self) -> None:
        for s in self._streams.values():
            s.wakeup.set()

    # ---------------------------------------------------------------------------------------------
    # Ack / Nack / ExtendDeadline

    def _check_ids(self, ids: Sequence[str]) -> None:
        if not ids:
            raise InvalidArgument("no delivery ids given")
        limit = self.settings.server.max_ids_per_call
        if len(ids) > limit:
            raise InvalidArgument(
                f"{len(ids)} ids in one call; the limit is {limit} (server.max_ids_per_call)"
            )

    def _lookup(self, did: str) -> tuple[int, Pending | None]:
        """What an id refers to. Raises InvalidArgument for a malformed id (callers look every id
        up before they change anything, so a call with one bad id changes nothing)."""
        p = self._by_id.get(did)
        if p is not None:
            return AckOutcome.OK, p
        if not _ID_RE.match(did):
            raise InvalidArgument(
                f"malformed delivery id {did[:64]!r}: pass delivery_id from a Delivery as is"
            )
        if did in self._stale:
            return AckOutcome.STALE, None
        if did in self._acked:
            return AckOutcome.ALREADY_ACKED, None
        return AckOutcome.UNKNOWN, None

    def _answered(self, ids: Sequence[str]) -> None:
        """Ack or Nack answered these ids (or they were held long enough): expired copies among
        them give their credit back."""
        expired = self._expired
        if expired:
            for did in ids:
                s = expired.pop(did, None)
                if s is not None:
                    s.answered(did)

    async def ack(self, ids: Sequence[str]) -> list[int]:
        """Settle deliveries. Raises StoreUnavailable (nothing applied) when the store is down."""
        self._check_ids(ids)
        results: list[int] = []
        records: dict[int, Pending] = {}
        stale_keys: dict[str, None] = {}
        for did in ids:
            outcome, p = self._lookup(did)
            results.append(outcome)
            if p is not None:
                records[id(p)] = p
            elif outcome == AckOutcome.STALE:
                stale_keys[self._stale.get(did) or ""] = None
        self._answered(ids)  # after the lookups: a malformed id fails the call before any change
        todo = list(records.values())
        for p in todo:
            p.acking += 1
        try:
            keys = [p.store_key for p in todo] + list(stale_keys)
            if keys:
                testing_hooks.reached("ack_before_mark")
                late = await self._answer_failed_on_error(
                    ids, self.store.complete(keys, self.owner, self._retention_ms)
                )
                testing_hooks.reached("mark_before_commit")
                self.metrics.late_acks.inc(sum(late))
                for key in stale_keys:
                    self._stale_leases.pop(key, None)
        finally:
            for p in todo:
                p.acking -= 1
        touched: set[TP] = set()
        for i, did in enumerate(ids):
            if results[i] != AckOutcome.OK:
                continue
            p = self._by_id.get(did)
            if p is None:  # settled or revoked while the store answered
                results[i] = AckOutcome.STALE if did in self._stale else AckOutcome.OK
                continue
            part = self._partitions.get(p.tp)
            if part is None or part.generation != p.generation:
                results[i] = AckOutcome.STALE
                continue
            self._settle(p, quiet=True)
            touched.add(p.tp)
        for tp in touched:
            self._update_pause(tp)
        if touched:
            self._commit_wakeup.set()
        self.metrics.acked.inc(sum(1 for r in results if r == AckOutcome.OK))
        self.metrics.stale_acks.inc(sum(1 for r in results if r == AckOutcome.STALE))
        if self.settings.commit.mode == "per-ack" and touched:
            await self.commit_now(touched)
        return results

    async def nack(
        self, ids: Sequence[str], delay_s: float | None, dead_letter: bool, reason: str
    ) -> list[int]:
        self._check_ids(ids)
        if delay_s is not None and not (0 <= delay_s <= 86_400):
            raise InvalidArgument("delay_seconds must be between 0 and 86400")
        results: list[int] = []
        redeliver: dict[int, Pending] = {}
        dlq: dict[int, Pending] = {}
        d = self.settings.delivery
        for did in ids:
            outcome, p = self._lookup(did)
            results.append(outcome)
            if p is None or p.state is not State.IN_FLIGHT or p.delivery_ids[-1] != did:
                continue  # an expired copy: its record is already on its way again
            if dead_letter or p.attempt >= d.max_attempts:
                dlq[id(p)] = p
            else:
                redeliver[id(p)] = p
        self._answered(ids)  # after the lookups: a malformed id fails the call before any change
        if redeliver:
            await self._answer_failed_on_error(
                ids, self.store.release([p.store_key for p in redeliver.values()], self.owner)
            )
        now = self._clock()
        for p in redeliver.values():
            if p.state is not State.IN_FLIGHT:
                continue
            if p.stream is not None:
                p.stream.remove(p)
            wait = (
                delay_s
                if delay_s is not None
                else min(d.backoff_max_seconds, d.backoff_initial_seconds * 2 ** max(p.attempt - 1, 0))
            )
            p.state, p.due = State.DELAYED, now + wait
            self._waiting.append(p)
            self.metrics.nacked.inc()
        todo = [p for p in dlq.values() if p.state is State.IN_FLIGHT]
        for p in todo:
            if p.stream is not None:
                p.stream.remove(p)
            p.reason = reason or (f"nacked {p.attempt} times (delivery.max_attempts={d.max_attempts})")
            p.state = State.DEAD_LETTERING
        if todo:
            self._spawn(self._dead_letter(todo))
        return results

    async def extend(self, ids: Sequence[str], seconds: int) -> list[int]:
        self._check_ids(ids)
        limit = self.settings.delivery.max_ack_deadline_seconds
        if not 1 <= seconds <= limit:
            raise InvalidArgument(
                f"seconds must be between 1 and {limit} (delivery.max_ack_deadline_seconds)"
            )
        results: list[int] = []
        todo: dict[int, Pending] = {}
        for did in ids:
            outcome, p = self._lookup(did)
            if p is not None and (p.state is not State.IN_FLIGHT or p.delivery_ids[-1] != did):
                # An expired copy: the record went back for redelivery, there is nothing to extend.
                outcome = AckOutcome.STALE
            elif p is not None:
                todo[id(p)] = p
            results.append(outcome)
        lease_ms = int((seconds + self.settings.delivery.lease_margin_seconds) * 1000)
        recs = list(todo.values())
        if recs:
            # Renewals: the same delivery goes on, so the same attempt. Deadline and lease run
            # from when the store was asked (see _claim).
            asked = self._clock()
            claims = await self._counted(
                self.store.claim([p.store_key for p in recs], self.owner, lease_ms, mode=ClaimMode.RENEW)
            )
            for p, c in zip(recs, claims, strict=True):
                if c.status is ClaimStatus.NEW and p.state is State.IN_FLIGHT:
                    p.deadline = asked + seconds
                    p.lease_until = asked + lease_ms / 1000
        return results

    # ---------------------------------------------------------------------------------------------
    # settling

    def _settle(self, p: Pending, quiet: bool = False) -> None:
        """Settle a record (acked, duplicate or dead-lettered). ``quiet``: the caller updates
        pausing and wakes the committer once for a whole batch."""
        part = self._partitions.get(p.tp)
        if p.state in (State.SETTLED, State.DROPPED):
            return
        if p.stream is not None:
            p.stream.remove(p)
        for did in p.delivery_ids:
            self._by_id.pop(did, None)
            self._acked.put(did, "")
        p.state = State.SETTLED
        if self._key_index.get(p.store_key) is p:
            del self._key_index[p.store_key]
        if part is None or part.generation != p.generation:
            return
        part.pending.pop(p.offset, None)
        part.tracker.settle(p.offset)
        self._settled_some.set()
        # Later records with the same key are duplicates of a settled (done) key.
        for shadow in p.shadows:
            if shadow.state is State.SHADOWED:
                self.metrics.skipped.labels("duplicate").inc()
                self._settle(shadow)
        p.shadows.clear()
        if not quiet:
            self._update_pause(p.tp)
            self._commit_wakeup.set()

    def _release_shadows(self, p: Pending) -> None:
        """A record left the key index without settling its key: the next shadow claims it."""
        shadows = [s for s in p.shadows if s.state is State.SHADOWED]
        p.shadows.clear()
        if not shadows:
            return
        first, rest = shadows[0], shadows[1:]
        first.shadows.extend(rest)
        first.state = State.CLAIMING
        self._key_index[first.store_key] = first
        self._spawn(self._claim_or_retry_later([first], retry=True))

    def _update_pause(self, tp: TP) -> None:
        part = self._partitions.get(tp)
        if part is None or self.consumer is None:
            return
        want = part.tracker.should_pause
        if want != part.paused:
            part.paused = want
            self.consumer.set_paused(tp, want)
            self.metrics.paused_partitions.inc(1 if want else -1)

    async def _dead_letter(self, records: list[Pending]) -> None:
        """Write records to the DLQ; settle each once Kafka acknowledged it. Retries until done."""
        template = self.settings.delivery.dead_letter_topic
        for p in records:
            p.state = State.DEAD_LETTERING
            headers = [
                *((k, v or b"") for k, v in p.headers),
                ("dedup-original-topic", p.tp[0].encode()),
                ("dedup-original-partition", str(p.tp[1]).encode()),
                ("dedup-original-offset", str(p.offset).encode()),
                ("dedup-attempts", str(p.attempt).encode()),
                ("dedup-reason", p.reason.encode()[:1000]),
            ]
            delay = 0.2
            while p.state is State.DEAD_LETTERING:
                try:
                    await self.producer.produce(template.replace("{topic}", p.tp[0]), p.value, p.key, headers)
                    if p.store_key:
                        await self.store.complete([p.store_key], self.owner, self._retention_ms)
                    self.metrics.dead_lettered.inc()
                    self._settle(p)
                except Exception as exc:  # noqa: BLE001 - never lose the record: retry
                    if self.stopping:
                        return
                    log.warning("dead-lettering %s[%d]@%d failed, retrying: %s", *p.tp, p.offset, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10)

    # ---------------------------------------------------------------------------------------------
    # timers

    async def _timer_loop(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            try:
                await self._tick()
            except Exception:
                log.exception("timer tick failed")

    async def _tick(self) -> None:
        now = self._clock()
        # Ack deadlines: redeliver with attempt + 1 (claim again to extend the lease).
        expired = [
            p
            for s in self._streams.values()
            for p in s.in_flight.values()
            if p.deadline <= now and p.acking == 0 and p.state is State.IN_FLIGHT
        ]
        for p in expired:
            s = p.stream
            if s is not None:
                if p.delivery_ids[-1] in self._answered_failed:
                    s.remove(p)
                else:
                    self._expired[s.expire(p, now + self._deadline_s)] = s
            p.state = State.CLAIMING
            self.metrics.redelivered.labels("deadline").inc()
        # BUSY and DELAYED records whose time has come.
        due = [p for p in self._waiting if p.due <= now and p.state in (State.BUSY, State.DELAYED)]
        if due:
            ids = {id(p) for p in due}
            self._waiting = [
                p for p in self._waiting if id(p) not in ids and p.state in (State.BUSY, State.DELAYED)
            ]
            for p in due:
                p.state = State.CLAIMING
        # Expired copies held for one more deadline without an answer give their credit back.
        if self._expired:
            self._answered(
                [did for s in self._streams.values() for did, (_, until) in s.expired.items() if until <= now]
            )
        if expired:
            await self._claim_or_retry_later(expired, retry=False, front=True, mode=ClaimMode.REDELIVER)
        if due:
            await self._claim_or_retry_later(due, retry=False, front=True)
        # No stream for the grace period: leave the group so partitions move to healthy replicas.
        grace = self.settings.delivery.detach_grace_seconds
        if (
            self._no_stream_since is not None
            and not self._left_group
            and now - self._no_stream_since > grace
            and self.consumer is not None
            and not self.stopping
        ):
            log.warning(
                "no app stream attached for %.0fs (delivery.detach_grace_seconds): leaving the group", grace
            )
            self.consumer.leave_group()
            self._left_group = True

    async def _commit_loop(self) -> None:
        interval = self.settings.commit.interval_ms / 1000
        while True:
            await self._commit_wakeup.wait()
            self._commit_wakeup.clear()
            try:
                await self.commit_now()
            except Exception as exc:  # noqa: BLE001 - retried after the interval
                log.warning("commit failed, retrying: %s", exc)
                self._commit_wakeup.set()
            await asyncio.sleep(interval)

    async def commit_now(self, only: set[TP] | None = None) -> None:
        """Commit every partition's settled prefix (with settled-above metadata) that moved."""
        if self.consumer is None:
            return
        offsets = []
        for tp, part in self._partitions.items():
            if only is not None and tp not in only:
                continue
            t = part.tracker
            if t.committable() >= 0 and t.needs_commit():
                offsets.append(CommitOffset(tp[0], tp[1], t.committable(), t.commit_metadata()))
        if not offsets:
            return
        for o in await self.consumer.commit(offsets):
            done = self._partitions.get((o.topic, o.partition))
            if done is not None:
                done.tracker.mark_committed(o.offset)
        self.metrics.commits.inc()

    async def _stall_loop(self) -> None:
        while True:
            await asyncio.sleep(STALL_CHECK_S)
            self.check_stalls()

    def check_stalls(self) -> None:
        """Warn (once per stall) about partitions whose committable offset has not moved for
        ``stall_s`` while records are unsettled, naming the record that holds them back and its
        state. Commits wait for every record below them, so one stuck record stops a partition's
        progress however many records after it settle; this makes it visible."""
        now = self._clock()
        d = self.settings.delivery
        stall_s = max(60.0, 2 * (d.ack_deadline_seconds + d.lease_margin_seconds))
        stalled = 0
        for tp, part in self._partitions.items():
            at = part.tracker.committable()
            if part.tracker.unsettled == 0 or at != part.progress[0]:
                part.progress, part.stalled = (at, now), False
                continue
            if now - part.progress[1] < stall_s:
                continue
            stalled += 1
            if part.stalled:
                continue
            part.stalled = True
            p = part.pending.get(at)
            what = (
                f"record @{at} is {p.state.value} (attempt {p.attempt}, key {p.idem_key!r})"
                if p is not None
                else f"offset {at} is not pending here"
            )
            log.warning(
                "%s[%d] has not moved past offset %d for %.0fs: %s; %d streams attached, "
                "%d records unsettled",
                *tp,
                at,
                now - part.progress[1],
                what,
                len(self._streams),
                part.tracker.unsettled,
            )
        self.metrics.stalled_partitions.set(stalled)

    async def _purge_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.store.purge_interval_seconds)
            try:
                n = await self.store.purge()
                if n:
                    log.info("purged %d expired keys from the store", n)
            except StoreUnavailable as exc:
                log.warning("purge failed: %s", exc)

    # ---------------------------------------------------------------------------------------------
    # introspection

    @property
    def in_flight(self) -> int:
        return sum(len(s.in_flight) for s in self._streams.values())

    def describe(self) -> dict[str, Any]:
        """A snapshot for operators (logged on SIGUSR1): per partition, records by state."""
        parts: dict[str, Any] = {}
        for tp, part in sorted(self._partitions.items()):
            states: dict[str, int] = {}
            oldest: dict[str, Any] = {}
            for p in part.pending.values():
                states[p.state.value] = states.get(p.state.value, 0) + 1
                if p.state.value not in oldest or p.offset < oldest[p.state.value]["offset"]:
                    oldest[p.state.value] = {"offset": p.offset, "key": p.idem_key, "attempt": p.attempt}
            parts[f"{tp[0]}[{tp[1]}]"] = {
                "committable": part.tracker.committable(),
                "committed": part.tracker.committed,
                "unsettled": part.tracker.unsettled,
                "paused": part.paused,
                "states": states,
                "oldest": oldest,
            }
        return {
            "owner": self.owner,
            "partitions": parts,
            "ready": len(self._ready),
            "waiting": len(self._waiting),
            "key_index": len(self._key_index),
            "streams": {
                s.id: {"in_flight": len(s.in_flight), "expired": len(s.expired)}
                for s in self._streams.values()
            },
            "intake_queue": self._intake.qsize(),
        }

    def committable(self) -> dict[TP, int]:
        return {tp: part.tracker.committable() for tp, part in self._partitions.items()}
