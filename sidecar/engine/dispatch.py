"""Dispatch: app streams take credit-bounded frames from the ready queue.

A stream attaches with the topics it wants and, optionally, an ordering narrower than
``delivery.ordering`` for them (see ordering.py); the narrowest ordering any attached stream asks
for a topic applies to all of that topic's records while it is attached. A frame waits briefly
for credit to build up, renews the leases of records that queued long, and hands the records out
under fresh delivery ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import Sequence

from sidecar import testing_hooks
from sidecar.engine import ordering
from sidecar.engine.claims import Claims
from sidecar.engine.core import Core
from sidecar.engine.ordering import Ordering
from sidecar.engine.records import Pending, State
from sidecar.engine.streams import Stream
from sidecar.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ShuttingDown,
    StoreUnavailable,
)
from sidecar.observability import tracing
from sidecar.observability.metrics import count_by_topic
from sidecar.store.base import ClaimMode

log = logging.getLogger(__name__)

FRAME_HOLD_S = 0.005  # longest a credit-bound frame waits for more credit


class Dispatch:
    def __init__(self, core: Core, claims: Claims, clock_now: float) -> None:
        self.core = core
        self.claims = claims
        self.instance = os.urandom(4).hex()
        self._seq = itertools.count(1)
        self.expired: dict[str, Stream] = {}  # expired delivery id -> the stream holding its credit
        self.no_stream_since: float | None = clock_now
        # Queue mode joins the share group only when an app stream attaches: a member with no
        # app would acquire records only to wait out their locks, using up deliveries.
        self.left_group = core.settings.kafka.group_type == "share"

    def attach(
        self,
        topics: Sequence[str],
        max_in_flight: int,
        max_bytes: int,
        max_batch: int,
        ordering_name: str = "",
    ) -> Stream:
        core = self.core
        if core.stopping or not core.accepting:
            raise ShuttingDown("the sidecar is shutting down")
        configured = set(core.settings.kafka.topics)
        if not configured:
            raise FailedPrecondition(
                "this sidecar consumes no topics (publish-only): set kafka.topics to subscribe"
            )
        missing = sorted(core.missing_topics.intersection(topics or configured))
        if missing:
            raise NotFound(
                f"topics {missing} in kafka.topics do not exist on the cluster: create them; the "
                "sidecar consumes them as soon as they exist"
            )
        unknown = [t for t in topics if t not in configured]
        if unknown:
            raise InvalidArgument(
                f"topics {unknown} are not consumed by this sidecar; add them to kafka.topics "
                f"(consumed: {sorted(configured)})"
            )
        if max_in_flight < 0 or max_bytes < 0 or max_batch < 0:
            raise InvalidArgument("max_in_flight, max_in_flight_bytes and max_batch must not be negative")
        asked = Ordering.parse(ordering_name) if ordering_name else core.base_ordering
        if asked and core.settings.kafka.group_type == "share":
            raise FailedPrecondition(
                f"ordering {asked.label!r} cannot be kept in queue mode (kafka.group_type = 'share'): the "
                "share group hands one partition's records to many members at once. Subscribe without an "
                "ordering, or run the sidecar with kafka.group_type = 'consumer'"
            )
        if asked < core.base_ordering:
            raise InvalidArgument(
                f"ordering {asked.label!r} is weaker than delivery.ordering = {core.base_ordering.label!r}; "
                "a Subscribe may narrow the ordering (unordered < key < partition), never widen it"
            )
        if len(core.streams) >= core.settings.server.max_streams:
            raise ResourceExhausted(
                f"{len(core.streams)} streams are open; raise server.max_streams or close idle streams"
            )
        d = core.settings.delivery
        s = Stream(
            frozenset(topics),
            max_in_flight or d.default_max_in_flight,
            max_bytes,
            max_batch or d.default_max_batch,
            asked,
        )
        core.streams[s.id] = s
        self.no_stream_since = None
        core.metrics.streams.set(len(core.streams))
        if asked > core.base_ordering:
            self._reorder()
        if core.share is not None:
            core.share.idle = False
        if self.left_group and core.consumer is not None:
            log.info("an app stream attached: joining the %s group", core.settings.kafka.group_type)
            core.consumer.join_group()
            self.left_group = False
        return s

    def detach(self, s: Stream) -> None:
        """The stream closed: its un-acked deliveries are redelivered at once."""
        core = self.core
        s.closed = True
        core.streams.pop(s.id, None)
        core.metrics.streams.set(len(core.streams))
        if not core.streams:
            self.no_stream_since = core.clock()
            if core.share is not None:
                core.share.idle = True  # queue mode: take nothing more until an app is back
        for did in s.expired:
            self.expired.pop(did, None)
        s.expired.clear()
        again: list[Pending] = []
        for p in list(s.in_flight.values()):
            s.remove(p)
            if p.state is State.IN_FLIGHT and p.acking == 0:
                # The app may have applied it before the stream broke: say so with attempt + 1,
                # counted in the store too (a sidecar taking the key over later counts on).
                p.state = State.CLAIMING
                again.append(p)
                core.metrics.redelivered.labels("stream_closed", p.topic).inc()
        if s.ordering > core.base_ordering:
            self._reorder()
        if again:
            core.spawn(
                self.claims.claim_or_retry_later(again, retry=False, front=True, mode=ClaimMode.REDELIVER)
            )

    def _reorder(self) -> None:
        """Streams that narrow the ordering came or went: chain each topic's records again if
        its ordering changed."""
        core = self.core
        wanted: dict[str, Ordering] = {}
        for s in core.streams.values():
            for t in s.topics or core.settings.kafka.topics:
                if s.ordering > wanted.get(t, core.base_ordering):
                    wanted[t] = s.ordering
        changed = {
            t
            for t in set(wanted) | set(core.topic_ordering)
            if wanted.get(t, core.base_ordering) != core.ordering_of(t)
        }
        core.topic_ordering = wanted
        if not changed:
            return
        freed: list[Pending] = []
        for part in core.partitions.values():
            topics = {p.topic for p in part.pending.values()}
            if topics & changed:
                # A retry partition holds one source topic's records; a source partition its own.
                freed += ordering.rebuild(part, core.ordering_of(next(iter(topics))))
        core.ready_queue.drop_held()
        for p in reversed(freed):
            core.ready_queue.push(p, front=True)
        core.wake_streams()
        log.info("ordering now %s", {t: core.ordering_of(t).label for t in sorted(changed)})

    async def next_frame(self, s: Stream) -> list[Pending]:
        """Wait for deliveries for ``s``; returns [] when the stream must end."""
        core = self.core
        ready = core.ready_queue
        hold_until: float | None = None
        while not s.closed:
            if core.accepting and s.has_credit():
                room = s.max_in_flight - s.outstanding
                if room < s.min_frame and len(ready) > room:
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
                batch = ready.take(s)
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
        """``Claims.renew`` for a batch taken from the ready queue for ``s``. Whatever stops
        it (a store outage, or gRPC cancelling the handler because the app went away) puts the
        batch back: taken from the queue and not yet handed out, it is held nowhere else."""
        try:
            return await self.claims.renew(batch)
        except StoreUnavailable:
            self.core.metrics.store_errors.inc()
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
                self.core.ready_queue.push(p, front=True)
        self.core.wake_streams()

    def _hand_out(self, s: Stream, batch: list[Pending]) -> None:
        testing_hooks.reached("before_delivery")
        core = self.core
        now = core.clock()
        deadline = now + core.deadline_s
        by_id, instance, seq = core.by_id, self.instance, self._seq
        if tracing.active():
            for p in batch:
                self._trace_delivery(p)
        for p in batch:
            did = f"{instance}.{next(seq)}"
            p.delivery_ids.append(did)
            by_id[did] = p
            p.state = State.IN_FLIGHT
            p.unsent = False
            p.deadline = min(deadline, p.lock_until) if p.lock_until else deadline
            p.sent_at = now
            s.add(p)
        count_by_topic(core.metrics.delivered, batch)

    @staticmethod
    def _trace_delivery(p: Pending) -> None:
        """Start the record's dedup.deliver span, a child of the trace context in its headers."""
        if p.span is not None:
            p.span.end()  # the previous delivery's
            p.span = None
        ctx = tracing.context_of(p.headers)
        if ctx is not None:
            topic, partition, offset = p.coordinates()
            p.span = tracing.start(
                "dedup.deliver",
                ctx,
                **{"messaging.destination.name": topic, "dedup.partition": partition, "dedup.offset": offset},
                **{"dedup.attempt": p.attempt, "dedup.idempotency_key": p.idem_key or ""},
            )

    def deadline_epoch_ms(self, p: Pending) -> int:
        return int((time.time() + (p.deadline - self.core.clock())) * 1000)
