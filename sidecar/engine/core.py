"""The state every engine part shares, and the few steps all of them take.

The parts (intake, claims, dispatch, settlement, reroute, maintenance) each hold the one ``Core``
and change records only through it or through each other in one direction (see engine.py). What
lives here: the per-partition books, the index of records by idempotency key and by delivery
id, the ready queue and the streams, the list of records waiting on a timer, and three steps:
``ready`` (a claimed record may go out, if its ordering chain lets it), ``settle`` (a record is
done with) and ``update_pause`` (a partition's fetch bound).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, TypeVar

from sidecar.config import Settings
from sidecar.engine import ordering
from sidecar.engine.ordering import Ordering
from sidecar.engine.records import TP, Partition, Pending, Recent, State
from sidecar.engine.streams import ReadyQueue, Stream
from sidecar.errors import StoreUnavailable
from sidecar.kafka.consumer import CommitOffset, ConsumerLoop
from sidecar.kafka.producer import AsyncProducer
from sidecar.kafka.share_consumer import ACCEPT, REJECT, RELEASE, Ack, ShareConsumerLoop
from sidecar.observability import tracing
from sidecar.observability.metrics import Metrics
from sidecar.offsets import AckTracker
from sidecar.store.base import DedupStore

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Queue mode: a record's lock is taken to end this long before the group's lock duration has
#: passed since its poll returned (the broker started the lock a little before), so what the
#: sidecar does at "the end of the lock" reaches the broker while the record is still its own.
LOCK_GUARD_S = 1.0
#: Queue mode: a duplicate of a record another member is delivering is common (the broker lends
#: a key's copies to whoever asks), and the BUSY copy holds this member's whole poll until it is
#: decided. So it is claimed again this often (or every delivery.busy_retry_seconds if shorter).
SHARE_BUSY_RETRY_S = 0.05


class Core:
    """Parameters:
    settings: the sidecar settings.
    store: the dedup store (claims, completes, releases).
    producer: used for dead letters and retry topics.
    metrics: Prometheus metrics.
    owner: this sidecar's identity in store claims.
    clock: monotonic seconds.
    """

    def __init__(
        self,
        settings: Settings,
        store: DedupStore,
        producer: AsyncProducer,
        metrics: Metrics,
        owner: str,
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.store = store
        self.producer = producer
        self.metrics = metrics
        self.owner = owner
        self.clock = clock
        d = settings.delivery
        self.deadline_s = d.ack_deadline_seconds
        self.lease_ms = int((d.ack_deadline_seconds + d.lease_margin_seconds) * 1000)
        self.retention_ms = settings.store.retention_seconds * 1000
        self.group = settings.kafka.group_id
        self.consumer: ConsumerLoop | ShareConsumerLoop | None = None
        # Queue mode (kafka.group_type = "share"): the share consumer, the group's record lock,
        # the broker's delivery count limit, and the lock end of the batch being taken in.
        self.share: ShareConsumerLoop | None = None
        self.share_lock_s = 0.0
        self.share_delivery_limit = 0
        self.share_lock_until = 0.0
        #: How soon a BUSY key is claimed again (delivery.busy_retry_seconds; shorter in queue
        #: mode, see SHARE_BUSY_RETRY_S).
        self.busy_retry_s = d.busy_retry_seconds
        self.partitions: dict[TP, Partition] = {}
        self.ready_queue = ReadyQueue()
        self.streams: dict[int, Stream] = {}
        self.key_index: dict[str, Pending] = {}  # store key -> the pending record holding its claim
        self.by_id: dict[str, Pending] = {}  # delivery id -> record, while it may be answered
        self.stale = Recent(100_000)  # delivery id -> store key, for late acks after revoke
        # Keys whose delivery is still out at an app although its partition was revoked: our own
        # claim covers them, so the store would say NEW to us. Hold other records with the key
        # back until that delivery is acked or its lease runs out.
        self.stale_leases: dict[str, float] = {}
        self.acked = Recent(100_000)  # delivery id -> "" for ALREADY_ACKED answers
        self.waiting: list[Pending] = []  # BUSY and DELAYED records, checked by the timer
        self.background: set[asyncio.Task[None]] = set()
        self.commit_wakeup = asyncio.Event()
        self.settled_some = asyncio.Event()  # records settled (or partitions left) since cleared
        self.base_ordering = Ordering.parse(d.ordering)
        self.topic_ordering: dict[str, Ordering] = {}  # narrowed by attached streams
        self.missing_topics: set[str] = set()  # in kafka.topics, not (yet) on the cluster
        self.traced_settled: list[Any] = []  # span contexts of traced records settled since a commit
        self.accepting = True
        self.stopping = False

    # ---------------------------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def counted(self, call: Awaitable[T]) -> T:
        """Await a store call; a failure is counted in the metrics and re-raised (nothing applied)."""
        try:
            return await call
        except StoreUnavailable:
            self.metrics.store_errors.inc()
            raise

    def ordering_of(self, topic: str) -> Ordering:
        return self.topic_ordering.get(topic, self.base_ordering)

    def wait(self, p: Pending, state: State, due: float) -> None:
        """Park a record until ``due``; the timer claims it again then."""
        p.state, p.due = state, due
        self.waiting.append(p)

    def ready(self, records: Iterable[Pending], front: bool = False) -> None:
        """Claimed records may be sent: queue each for the streams, or hold it while an earlier
        record of its ordering chain is unsettled. ``front``: records that waited already go
        ahead of the intake backlog (pass them in order; they keep it)."""
        queue = self.ready_queue
        go: list[Pending] = []
        for p in records:
            if p.chain is None or ordering.may_deliver(p):
                go.append(p)
            else:
                p.state = State.HELD
        for p in reversed(go) if front else go:
            queue.push(p, front=front)
        self.wake_streams()

    def wake_streams(self) -> None:
        for s in self.streams.values():
            s.wakeup.set()

    def unchain(self, p: Pending) -> None:
        """``p`` left its chain (settled or dropped): the record behind it may go now."""
        nxt = ordering.leave(self.partitions.get(p.tp), p)
        if nxt is not None:
            self.ready_queue.push(nxt, front=True)
            self.wake_streams()

    def settle(self, p: Pending, quiet: bool = False) -> None:
        """Settle a record (acked, duplicate, dead-lettered or moved to a retry topic).
        ``quiet``: the caller updates pausing and wakes the committer once for a whole batch."""
        if p.state in (State.SETTLED, State.DROPPED):
            return
        part = self.partitions.get(p.tp)
        if p.stream is not None:
            p.stream.remove(p)
        for did in p.delivery_ids:
            self.by_id.pop(did, None)
            self.acked.put(did, "")
        p.state = State.SETTLED
        if p.span is not None:
            if len(self.traced_settled) < 1000:  # the next commit span's links (bounded)
                self.traced_settled.append(p.span.get_span_context())
            p.span.end()
            p.span = None
        if self.key_index.get(p.store_key) is p:
            del self.key_index[p.store_key]
        if part is None or part.generation != p.generation:
            return
        if p.chain is not None:
            self.unchain(p)
        part.pending.pop(p.offset, None)
        if part.share:
            self.acknowledge([p], REJECT if p.reject else ACCEPT)
        else:
            part.tracker.settle(p.offset)
        self.settled_some.set()
        # Later records with the same key are duplicates of a settled (done) key.
        for shadow in p.shadows:
            if shadow.state is State.SHADOWED:
                self.metrics.skipped.labels("duplicate", shadow.topic).inc()
                self.settle(shadow)
        p.shadows.clear()
        if not quiet:
            self.update_pause(p.tp)
            self.commit_wakeup.set()

    def update_pause(self, tp: TP) -> None:
        part = self.partitions.get(tp)
        if part is None or self.consumer is None:
            return
        want = part.tracker.should_pause or part.scheduled > 0
        if want != part.paused:
            part.paused = want
            self.consumer.set_paused(tp, want)
            self.metrics.paused_partitions.inc(1 if want else -1)

    async def commit_now(self, only: set[TP] | None = None) -> bool:
        """Commit every partition's settled prefix (with settled-above metadata) that moved.
        Returns False when Kafka refused some (a rebalance under way): commit again later."""
        if self.consumer is None:
            return True
        offsets = []
        for tp, part in self.partitions.items():
            if (only is not None and tp not in only) or part.share:
                continue
            t = part.tracker
            if t.committable() >= 0 and t.needs_commit():
                offsets.append(CommitOffset(tp[0], tp[1], t.committable(), t.commit_metadata()))
        if not offsets:
            return True
        t0 = time.perf_counter()
        committed = await self.consumer.commit(offsets)
        self.metrics.commit_seconds.observe(time.perf_counter() - t0)
        now = self.clock()
        for o in committed:
            done = self.partitions.get((o.topic, o.partition))
            if done is not None:
                done.tracker.mark_committed(o.offset)
                done.last_commit = now
        self.metrics.commits.inc()
        if self.traced_settled:
            tracing.commit_span(self.traced_settled, len(committed))
            self.traced_settled = []
        return len(committed) == len(offsets)

    # ---------------------------------------------------------------------------------------------
    # queue mode (a share group)

    def share_polled(self, polled_at: float) -> None:
        """A share consumer's poll returned at ``polled_at`` (time.monotonic()): the records
        taken in next hold locks until then plus the group's lock duration, less a guard."""
        elapsed = time.monotonic() - polled_at  # the clock may be a test's; the age is real
        self.share_lock_until = self.clock() - elapsed + self.share_lock_s - LOCK_GUARD_S

    def share_partition(self, tp: TP) -> Partition:
        """The books of a partition a share group hands records of (created on first sight:
        every member reads every partition, nothing is assigned)."""
        part = self.partitions.get(tp)
        if part is None:
            part = Partition(AckTracker(), 0, {}, share=True)
            self.partitions[tp] = part
        return part

    def acknowledge(self, records: list[Pending], kind: int) -> None:
        """Hand the broker its answer for records of a share group."""
        share = self.share
        if share is None or not records:
            return
        acks: list[Ack] = [(p.tp[0], p.tp[1], p.offset, kind) for p in records]
        share.acknowledge(acks)
        self.metrics.share_acks.labels(_ACK_LABELS[kind]).inc(len(acks))

    def release(self, records: list[Pending], acknowledge: bool = True) -> None:
        """Give records of a share group back to the broker unsettled (RELEASE): it hands each
        out again, to any member, and counts the delivery. Their claims are the caller's to hand
        back. A delivery id of theirs the app still answers is STALE (an Ack still marks the key
        done). Records waiting behind one of them for its key go back too. ``acknowledge``
        False: the broker took them back already (forget them)."""
        out: list[Pending] = []
        todo = list(records)
        while todo:
            p = todo.pop()
            if p.state in (State.SETTLED, State.DROPPED):
                continue
            if p.stream is not None:
                p.stream.remove(p)
            for did in p.delivery_ids:
                self.by_id.pop(did, None)
                self.stale.put(did, p.store_key)
            if self.key_index.get(p.store_key) is p:
                del self.key_index[p.store_key]
            part = self.partitions.get(p.tp)
            if part is not None and part.pending.get(p.offset) is p:
                del part.pending[p.offset]
            p.state = State.DROPPED
            if p.span is not None:
                p.span.end()
                p.span = None
            todo.extend(sh for sh in p.shadows if sh.state is State.SHADOWED)
            p.shadows.clear()
            out.append(p)
        if acknowledge:
            self.acknowledge(out, RELEASE)
        if out:
            self.settled_some.set()


_ACK_LABELS = {ACCEPT: "accept", RELEASE: "release", REJECT: "reject"}
