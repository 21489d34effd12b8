"""The delivery engine: everything between the Kafka consumer and the app's gRPC calls.

Flow (see docs/ARCHITECTURE.md)::

    consumer batch -> intake: tracker.offer, idempotency key, ordering chain -> claims (batched)
        NEW  -> ready (or held behind its chain) -> dispatch -> Subscribe streams
        DONE -> settle (skipped duplicate)       BUSY -> claim again later
    Ack(ids)  -> settlement: store.complete(batch) -> settle -> commit (interval, revoke, shutdown)
    Nack(ids) -> store.release -> redeliver after backoff; a long delay -> retry topic (reroute);
                 past max attempts -> dead-letter topic (reroute) -> settle
    timer     -> ack deadline passed -> claim again (extends the lease) -> redeliver, attempt + 1;
                 claimed past max attempts -> dead-letter topic with reason "deadline"

One module per concern, imported in one direction only::

    records, streams, ordering  <- core <- reroute <- claims <- intake, dispatch, share
                                                                 <- settlement <- maintenance <- engine

Queue mode (kafka.group_type = "share") runs the same flow on records a share group lends this
member; share.py holds what differs: every record ends ACCEPTed, REJECTed or RELEASEd.

Everything here runs on the event loop; the only awaits are store round trips and Kafka writes.
This module holds the lifecycle, the consumer's partition events, and the operator's snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import Message

from sidecar.config import Settings
from sidecar.engine.claims import Claims
from sidecar.engine.core import SHARE_BUSY_RETRY_S, Core
from sidecar.engine.dispatch import Dispatch
from sidecar.engine.intake import Intake
from sidecar.engine.maintenance import Maintenance
from sidecar.engine.records import TP, Partition, Pending, State
from sidecar.engine.reroute import Reroute
from sidecar.engine.settlement import AckOutcome, Settlement
from sidecar.engine.share import Share
from sidecar.engine.streams import Stream
from sidecar.kafka.consumer import Assigned, CommitOffset, ConsumerLoop
from sidecar.kafka.producer import AsyncProducer
from sidecar.kafka.share_consumer import ShareConsumerLoop
from sidecar.observability.metrics import Metrics
from sidecar.offsets import AckTracker
from sidecar.store.base import DedupStore

log = logging.getLogger(__name__)

__all__ = ["AckOutcome", "Engine"]


class Engine:
    """The engine's one entry point; its parameters are Core's (see core.py)."""

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
        self.metrics = metrics
        self.owner = owner
        self.core = core = Core(settings, store, producer, metrics, owner, clock)
        self.reroute = Reroute(core)
        self.claims = Claims(core, self.reroute)
        self.intake = Intake(core, self.claims, self.reroute)
        self.dispatch = Dispatch(core, self.claims, clock())
        self.share = Share(core, self.claims, self.reroute)
        self.settlement = Settlement(core, self.dispatch, self.reroute, self.share)
        self.maintenance = Maintenance(core, self.claims, self.dispatch, self.settlement, self.share)
        self._generations = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        # The API, as the servicer calls it.
        self.attach = self.dispatch.attach
        self.detach = self.dispatch.detach
        self.next_frame = self.dispatch.next_frame
        self.deadline_epoch_ms = self.dispatch.deadline_epoch_ms
        self.ack = self.settlement.ack
        self.ack_nowait = self.settlement.ack_nowait
        self.nack = self.settlement.nack
        self.extend = self.settlement.extend
        self.commit_now = core.commit_now
        self.check_stalls = self.maintenance.check_stalls

    @property
    def store(self) -> DedupStore:
        return self.core.store

    @property
    def consumer(self) -> ConsumerLoop | ShareConsumerLoop | None:
        return self.core.consumer

    @property
    def stopping(self) -> bool:
        return self.core.stopping

    @property
    def missing_topics(self) -> set[str]:
        """Topics of kafka.topics the cluster does not have (Subscribe answers NOT_FOUND)."""
        return self.core.missing_topics

    @property
    def retry_topics(self) -> list[str]:
        """The retry topics the consumer subscribes to besides ``kafka.topics``."""
        return list(self.reroute.retry_sources)

    # ---------------------------------------------------------------------------------------------
    # lifecycle

    def start(
        self,
        consumer: ConsumerLoop | ShareConsumerLoop | None,
        share_lock_ms: int = 0,
        share_delivery_limit: int = 0,
    ) -> None:
        """Start the loops; ``consumer`` is None for a publish-only sidecar (no kafka.topics).
        A share consumer comes with its group's record lock and the broker's delivery count
        limit (sidecar/kafka/share_group.py)."""
        self.core.consumer = consumer
        if isinstance(consumer, ShareConsumerLoop):
            self.core.share = consumer
            self.core.share_lock_s = share_lock_ms / 1000
            self.core.share_delivery_limit = share_delivery_limit
            self.core.busy_retry_s = min(self.core.busy_retry_s, SHARE_BUSY_RETRY_S)
        m = self.maintenance
        loops = [
            self.intake.loop(),
            self.claims.loop(),
            m.timer_loop(),
            m.commit_loop(),
            m.purge_loop(),
            m.stall_loop(),
        ]
        self._tasks = [asyncio.create_task(c) for c in loops]

    async def stop(self, grace_s: float) -> None:
        """Stop dispatching new records, wait up to ``grace_s`` for in-flight acks, commit."""
        core = self.core
        core.accepting = False
        deadline = core.clock() + grace_s
        # Keep answering acks for what the app holds (in flight here, or delivered from a
        # partition a rebalance took meanwhile) until each is answered or the grace ends: a
        # delivery answered here is not delivered again by the next owner.
        await self._wait_while(self._unanswered, deadline, 0.02)
        core.stopping = True
        for s in list(core.streams.values()):
            s.closed = True
            s.wakeup.set()
        # No ack can arrive any more: hand our claims back so the next owner need not wait out
        # the leases. (An app still applying an effect is the stated window; attempt shows it.)
        # A retry record not yet due holds no claim of ours: its key stays parked to its due time.
        held = [
            p
            for part in core.partitions.values()
            for p in part.pending.values()
            if p.attempt > 0 and not p.scheduled
        ]
        await self.claims.release_claims(held)
        if core.share is not None:
            # Queue mode: what this member holds goes back to the group now, not at lock end.
            core.release(
                [p for part in core.partitions.values() if part.share for p in list(part.pending.values())]
            )
        await core.commit_now()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def _wait_while(self, busy: Callable[[], bool], deadline: float, step: float) -> None:
        """Look at ``busy`` every ``step`` seconds until it is false or the clock reaches
        ``deadline``. Polled, not awaited on an event: an answer, a Nack and a lease running out
        each end the wait, and not all of them set one."""
        while self.core.clock() < deadline and busy():  # noqa: ASYNC110
            await asyncio.sleep(step)

    def _unanswered(self) -> bool:
        """Whether the app holds deliveries it has not answered: in flight on a stream, or from a
        revoked partition whose lease still runs (an ack of those still marks the key done)."""
        core = self.core
        if any(s.in_flight for s in core.streams.values()):
            return True
        now = core.clock()
        return any(until > now for until in core.stale_leases.values())

    # ---------------------------------------------------------------------------------------------
    # consumer events (ConsumerHandler)

    async def on_assigned(self, partitions: list[Assigned]) -> None:
        core = self.core
        d = self.settings.delivery
        for a in partitions:
            tracker = AckTracker(d.max_unsettled_per_partition, d.resume_unsettled, a.committed, a.metadata)
            part = Partition(tracker, next(self._generations), {}, last_commit=core.clock())
            core.partitions[(a.topic, a.partition)] = part
        self.metrics.assigned_partitions.set(len(core.partitions))
        self.metrics.rebalances.labels("assigned").inc(len(partitions))

    async def on_revoked(self, tps: list[TP], lost: bool) -> list[CommitOffset]:
        core = self.core
        if not lost and not core.stopping:
            await self._hand_over(tps)
        commits: list[CommitOffset] = []
        undelivered: list[Pending] = []
        dropped: list[Pending] = []
        unsent = (State.READY, State.HELD, State.BUSY, State.DELAYED, State.CLAIMING)
        for tp in tps:
            part = core.partitions.pop(tp, None)
            if part is None:
                continue
            core.settled_some.set()  # its unsettled records no longer count
            tracker = part.tracker
            if not lost and tracker.committable() >= 0 and tracker.needs_commit():
                commits.append(CommitOffset(tp[0], tp[1], tracker.committable(), tracker.commit_metadata()))
            for p in part.pending.values():
                if p.state in unsent and p.attempt > 0 and not p.scheduled:
                    undelivered.append(p)
                self._drop(p)
                dropped.append(p)
        core.waiting = [p for p in core.waiting if p.state in (State.BUSY, State.DELAYED)]
        self.metrics.assigned_partitions.set(len(core.partitions))
        self.metrics.rebalances.labels("lost" if lost else "revoked").inc(len(tps))
        # Undelivered records: let the next owner claim them at once rather than after the lease,
        # unless a duplicate of the key in a partition we keep takes over the claim here.
        kept = {p.store_key for p in dropped for sh in p.shadows if sh.state is State.SHADOWED}
        await self.claims.release_claims([p for p in undelivered if p.store_key not in kept])
        # Only now (after the release) may shadows in kept partitions claim their keys again.
        for p in dropped:
            self.claims.release_shadows(p)
        return commits

    async def _hand_over(self, tps: list[TP]) -> None:
        """Partitions are taken away (a rebalance, not a loss): send nothing more of them, and
        wait up to ``delivery.revoke_grace_seconds`` for the app to answer what it holds of
        them. An answered delivery is settled here and covered by the commit on revoke, so the
        next owner neither waits out its lease nor delivers it again (which a naive app would
        apply twice)."""
        core = self.core
        parts = [part for tp in tps if (part := core.partitions.get(tp)) is not None]
        if not parts:
            return
        queue = core.ready_queue
        queue.revoking.update(tps)
        try:
            deadline = core.clock() + self.settings.delivery.revoke_grace_seconds
            await self._wait_while(
                lambda: any(p.state is State.IN_FLIGHT for part in parts for p in part.pending.values()),
                deadline,
                0.01,
            )
        finally:
            queue.revoking.difference_update(tps)

    def _drop(self, p: Pending) -> None:
        """Forget a record of a revoked partition. In-flight ids stay answerable as STALE."""
        core = self.core
        if p.stream is not None:
            p.stream.remove(p)
        for did in p.delivery_ids:
            core.by_id.pop(did, None)
            core.stale.put(did, p.store_key)
        if p.state is State.IN_FLIGHT and p.store_key:
            core.stale_leases[p.store_key] = p.lease_until
        if core.key_index.get(p.store_key) is p:
            del core.key_index[p.store_key]
        p.state = State.DROPPED
        p.chain = None  # its chain went with its partition
        if p.span is not None:
            p.span.end()
            p.span = None

    def on_records(self, records: list[Message]) -> None:
        self.intake.put(records)

    def on_share_records(self, records: list[Message], polled_at: float) -> None:
        self.core.share_polled(polled_at)
        self.intake.put(records)

    # ---------------------------------------------------------------------------------------------
    # introspection

    @property
    def in_flight(self) -> int:
        return sum(len(s.in_flight) for s in self.core.streams.values())

    @property
    def share_held(self) -> int | None:
        """Queue mode: records acquired from the share group and not acknowledged (None in a
        consumer group)."""
        share = self.core.share
        return None if share is None else share.held

    def share_state(self) -> dict[str, Any] | None:
        """Queue mode's state for operators (``dedup-sidecar status``); None in a consumer group."""
        core = self.core
        share = core.share
        if share is None:
            return None
        counts = share.counts
        held: dict[str, int] = {}
        delivery_counts: dict[str, int] = {}
        for part in core.partitions.values():
            for p in part.pending.values():
                held[p.state.value] = held.get(p.state.value, 0) + 1
                key = str(p.delivery_count)
                delivery_counts[key] = delivery_counts.get(key, 0) + 1
        return {
            "joined": share.subscribed,
            "held": share.held,
            "held_by_state": held,
            "delivery_counts": delivery_counts,
            "acquired": counts.acquired,
            "polls": counts.polls,
            "accepted": counts.acks["accept"],
            "released": counts.acks["release"],
            "rejected": counts.acks["reject"],
            "refused": counts.refused,
            "lock_seconds": core.share_lock_s,
            "delivery_count_limit": core.share_delivery_limit,
        }

    def topic_of(self, delivery_id: str) -> str | None:
        """The topic of an in-flight delivery (None for an id this process does not hold)."""
        p = self.core.by_id.get(delivery_id)
        return None if p is None else p.topic

    def partitions(self) -> list[tuple[TP, Partition, dict[str, int]]]:
        """Each assigned partition, its books, and its pending records counted by state."""
        out = []
        for tp, part in sorted(self.core.partitions.items()):
            states: dict[str, int] = {}
            for p in part.pending.values():
                states[p.state.value] = states.get(p.state.value, 0) + 1
            out.append((tp, part, states))
        return out

    def describe(self) -> dict[str, Any]:
        """A snapshot for operators (logged on SIGUSR1): per partition, records by state."""
        core = self.core
        parts: dict[str, Any] = {}
        for tp, part, states in self.partitions():
            oldest: dict[str, Any] = {}
            for p in part.pending.values():
                if p.state.value not in oldest or p.offset < oldest[p.state.value]["offset"]:
                    oldest[p.state.value] = {"offset": p.offset, "key": p.idem_key, "attempt": p.attempt}
            parts[f"{tp[0]}[{tp[1]}]"] = {
                "committable": part.tracker.committable(),
                "committed": part.tracker.committed,
                "unsettled": part.tracker.unsettled,
                "paused": part.paused,
                "ordering": core.ordering_of(tp[0]).label,
                "ordering_chains": len(part.chains),
                "states": states,
                "oldest": oldest,
            }
        return {
            "owner": self.owner,
            "partitions": parts,
            "ready": len(core.ready_queue),
            "waiting": len(core.waiting),
            "key_index": len(core.key_index),
            "streams": {
                s.id: {"in_flight": len(s.in_flight), "expired": len(s.expired), "ordering": s.ordering.label}
                for s in core.streams.values()
            },
            "intake_queue": self.intake.queue.qsize(),
            "share": self.share_state(),
        }

    def partition_gauges(self) -> list[tuple[str, int, int, float]]:
        """(topic, partition, unsettled records, monotonic time of the last commit) per
        partition; read by the metrics collector on another thread."""
        return [
            (tp[0], tp[1], part.tracker.unsettled, part.last_commit)
            for tp, part in list(self.core.partitions.items())
            if not part.share
        ]

    def committable(self) -> dict[TP, int]:
        return {tp: part.tracker.committable() for tp, part in self.core.partitions.items()}

    def streams(self) -> Sequence[Stream]:
        return list(self.core.streams.values())
