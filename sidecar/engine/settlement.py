"""Settlement: Ack, Nack and ExtendDeadline.

An Ack marks the keys done in the store, then settles the records (their offsets become
committable). A Nack gives records back: redelivered after a delay kept in memory, moved to a
retry topic when the delay reaches the first retry tier, or dead-lettered. Every call looks all of
its ids up before it changes anything, so a call with one malformed id changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Sequence
from typing import Final, TypeVar

from opentelemetry import trace

from sidecar import testing_hooks
from sidecar.engine.core import Core
from sidecar.engine.dispatch import Dispatch
from sidecar.engine.records import TP, Pending, Recent, State
from sidecar.engine.reroute import Reroute
from sidecar.engine.share import Share
from sidecar.errors import FailedPrecondition, InvalidArgument, StoreUnavailable
from sidecar.groupcommit import Done, GroupCommit
from sidecar.observability import tracing
from sidecar.observability.metrics import count_by_topic, group_counter
from sidecar.store.base import ClaimMode, ClaimStatus

log = logging.getLogger(__name__)
T = TypeVar("T")
_ID_RE = re.compile(r"^([0-9a-f]{8})\.([0-9]+)$")


class AckOutcome:
    OK: Final = 1
    STALE: Final = 2
    UNKNOWN: Final = 3
    ALREADY_ACKED: Final = 4


class Settlement:
    def __init__(self, core: Core, dispatch: Dispatch, reroute: Reroute, share: Share) -> None:
        self.core = core
        self.dispatch = dispatch
        self.reroute = reroute
        self.share = share
        # Ids whose Ack or Nack failed (store unreachable): the app answered those copies once
        # and may not again, so past their deadline they do not hold credit (see Stream.expired).
        self.answered_failed = Recent(10_000)
        # Concurrent Ack calls (an app acking one message per call from many handlers) settle
        # together: one store round trip and one pass over the books for all of them. One run
        # at a time: calls that arrive while it waits for the store go together in the next
        # (the store keeps a second round trip of its own in flight for other callers).
        self._acks: GroupCommit[str, int] = GroupCommit(
            self._ack_checked,
            max_in_flight=1,
            max_items=core.settings.server.max_ids_per_call,
            on_run=group_counter(core.metrics, "ack"),
        )

    async def _answer_failed_on_error(self, ids: Sequence[str], call: Awaitable[T]) -> T:
        """``Core.counted`` for an Ack or Nack: when it fails, remember its ids as answered once."""
        try:
            return await self.core.counted(call)
        except StoreUnavailable:
            for did in ids:
                self.answered_failed.put(did, "")
            raise

    def _check_ids(self, ids: Sequence[str]) -> None:
        if not ids:
            raise InvalidArgument("no delivery ids given")
        limit = self.core.settings.server.max_ids_per_call
        if len(ids) > limit:
            raise InvalidArgument(
                f"{len(ids)} ids in one call; the limit is {limit} (server.max_ids_per_call)"
            )

    def _lookup(self, did: str) -> tuple[int, Pending | None]:
        """What an id refers to. Raises InvalidArgument for a malformed id (callers look every id
        up before they change anything, so a call with one bad id changes nothing)."""
        core = self.core
        p = core.by_id.get(did)
        if p is not None:
            return AckOutcome.OK, p
        if not _ID_RE.match(did):
            raise InvalidArgument(
                f"malformed delivery id {did[:64]!r}: pass delivery_id from a Delivery as is"
            )
        if did in core.stale:
            return AckOutcome.STALE, None
        if did in core.acked:
            return AckOutcome.ALREADY_ACKED, None
        return AckOutcome.UNKNOWN, None

    def answered(self, ids: Sequence[str]) -> None:
        """Ack or Nack answered these ids (or they were held long enough): expired copies among
        them give their credit back."""
        expired = self.dispatch.expired
        if expired:
            for did in ids:
                s = expired.pop(did, None)
                if s is not None:
                    s.answered(did)

    def _check_well_formed(self, ids: Sequence[str]) -> None:
        """Raise InvalidArgument for a malformed id, as _lookup would, before a call joins others."""
        by_id = self.core.by_id
        for did in ids:
            if did not in by_id and not _ID_RE.match(did):
                self._lookup(did)  # raises, with the message

    async def ack(self, ids: Sequence[str]) -> list[int]:
        """Settle deliveries; one result per id. Raises InvalidArgument (nothing applied) for a
        bad call, StoreUnavailable (nothing applied) when the store is down.

        Concurrent calls are settled together (group commit); a call's bad id fails that call
        alone, before it joins the others. An id acked twice among them is OK for both.
        """
        self._check_ids(ids)
        self._check_well_formed(ids)
        return await self._acks(list(ids))

    def ack_nowait(self, ids: Sequence[str], done: Done[int]) -> None:
        """``ack`` for a caller that must not wait (a stream reader): raises InvalidArgument at
        once; ``done`` gets the results, or the exception that failed the settlement."""
        self._check_ids(ids)
        self._check_well_formed(ids)
        self._acks.submit(list(ids), done)

    async def _ack_checked(self, ids: Sequence[str]) -> list[int]:
        """Settle well-formed ids of one call or of several joined ones."""
        core = self.core
        results: list[int] = []
        records: dict[int, Pending] = {}
        stale_keys: dict[str, None] = {}
        for did in ids:
            outcome, p = self._lookup(did)
            results.append(outcome)
            if p is not None:
                records[id(p)] = p
            elif outcome == AckOutcome.STALE:
                stale_keys[core.stale.get(did) or ""] = None
        self.answered(ids)  # after the lookups: a malformed id fails the call before any change
        todo = list(records.values())
        for p in todo:
            p.acking += 1
        traced = (
            [tracing.start("dedup.ack", trace.set_span_in_context(p.span)) for p in todo if p.span]
            if tracing.active()
            else []
        )
        fenced_ms = 0
        try:
            keys = [p.store_key for p in todo] + list(stale_keys)
            if keys:
                testing_hooks.reached("ack_before_mark")
                late = await self._answer_failed_on_error(
                    ids, core.store.complete(keys, core.owner, core.retention_ms)
                )
                testing_hooks.reached("mark_before_commit")
                core.metrics.late_acks.inc(sum(1 for r in late if r))
                fenced_ms = max(late, default=0)
                for key in stale_keys:
                    core.stale_leases.pop(key, None)
        finally:
            for p in todo:
                p.acking -= 1
            for span in traced:
                span.end()
        touched: set[TP] = set()
        settled: list[Pending] = []
        for i, did in enumerate(ids):
            if results[i] != AckOutcome.OK:
                continue
            p = core.by_id.get(did)
            if p is None:  # settled or revoked while the store answered
                results[i] = AckOutcome.STALE if did in core.stale else AckOutcome.OK
                continue
            part = core.partitions.get(p.tp)
            if part is None or part.generation != p.generation:
                results[i] = AckOutcome.STALE
                continue
            core.settle(p, quiet=True)
            settled.append(p)
            touched.add(p.tp)
        for tp in touched:
            core.update_pause(tp)
        if touched:
            core.commit_wakeup.set()
        if settled:
            m = core.metrics
            count_by_topic(m.acked, settled)
            now, wall = core.clock(), time.time()
            m.ack_latency.observe_many([now - p.sent_at for p in settled])
            m.end_to_end_latency.observe_many(
                [wall - p.timestamp_ms / 1000 for p in settled if p.timestamp_ms]
            )
        core.metrics.stale_acks.inc(sum(1 for r in results if r == AckOutcome.STALE))
        if core.settings.commit.mode == "per-ack" and touched:
            await core.commit_now(touched)
        if fenced_ms > 0:
            await self._outlast_other_claims(fenced_ms)
        return results

    async def _outlast_other_claims(self, ms: int) -> None:
        """A late Ack found another sidecar's live claim on a key (this one was paused or cut off
        past its lease, and the partition moved). That sidecar may have claimed the key just
        before the done mark and still send it, without asking the store again, until its lease
        ends. The answer waits that long: OK (or STALE) promises the key is not delivered again,
        and a delivery before the answer keeps that promise."""
        self.core.metrics.ack_fence_waits.inc()
        log.info("a late Ack met another sidecar's live claim; answering in %d ms, when it ends", ms)
        await asyncio.sleep(ms / 1000 + 0.01)

    async def nack(
        self, ids: Sequence[str], delay_s: float | None, dead_letter: bool, reason: str
    ) -> list[int]:
        core = self.core
        self._check_ids(ids)
        if delay_s is not None and not (0 <= delay_s <= 86_400):
            raise InvalidArgument("delay_seconds must be between 0 and 86400")
        results: list[int] = []
        redeliver: dict[int, Pending] = {}
        dlq: dict[int, Pending] = {}
        d = core.settings.delivery
        for did in ids:
            outcome, p = self._lookup(did)
            results.append(outcome)
            if p is None or p.state is not State.IN_FLIGHT or p.delivery_ids[-1] != did:
                continue  # an expired copy: its record is already on its way again
            if dead_letter or p.failures + 1 >= d.max_attempts:
                dlq[id(p)] = p
            else:
                redeliver[id(p)] = p
        self.answered(ids)  # after the lookups: a malformed id fails the call before any change
        if self.share.active:
            # Queue mode: a record on the broker's last delivery is dead-lettered, not released.
            last = [p for p in redeliver.values() if p.last_delivery and p.state is State.IN_FLIGHT]
            for p in last:
                del redeliver[id(p)]
                p.failures += 1
            self.share.dead_letter_or_keep(last, "nacked")
        waits = {
            id(p): (
                delay_s
                if delay_s is not None
                else min(d.backoff_max_seconds, d.backoff_initial_seconds * 2 ** max(p.attempt - 1, 0))
            )
            for p in redeliver.values()
        }
        # Long delays go to a retry topic under the claim they hold; the rest give it back.
        tiers = {i: self.reroute.tier_for(p, waits[i]) for i, p in redeliver.items()}
        in_memory = [p for i, p in redeliver.items() if tiers[i] is None]
        if in_memory:
            await self._answer_failed_on_error(
                ids, core.store.release([p.store_key for p in in_memory], core.owner, failed=True)
            )
            for p in in_memory:
                p.failures += 1  # the retry-topic ones count theirs when claimed again (REDELIVER)
        now = core.clock()
        retry: list[tuple[Pending, int, float]] = []
        released: list[Pending] = []
        for i, p in redeliver.items():
            if p.state is not State.IN_FLIGHT:
                continue
            if p.stream is not None:
                p.stream.remove(p)
            tier = tiers[i]
            if tier is None and p.lock_until:
                # Queue mode: the broker redelivers it (and counts it), after the delay if that
                # ends within the record's lock, else when the lock is about to end.
                due = min(now + waits[i], p.lock_until)
                if due <= now:
                    released.append(p)
                else:
                    core.wait(p, State.DELAYED, due)
            elif tier is None:
                core.wait(p, State.DELAYED, now + waits[i])
            else:
                retry.append((p, tier, waits[i]))
            core.metrics.nacked.labels(p.topic).inc()
        if released:
            core.release(released)
        if retry:
            self.reroute.to_retry(retry)
        todo = [p for p in dlq.values() if p.state is State.IN_FLIGHT]
        for p in todo:
            if p.stream is not None:
                p.stream.remove(p)
            p.failures += 1
            p.reason_code = "nack" if dead_letter else "max-attempts"
            p.reason = reason or (
                f"nacked; {p.failures} of its {p.attempt} deliveries failed "
                f"(delivery.max_attempts={d.max_attempts})"
            )
        if todo:
            self.reroute.dead_letter(todo)
        return results

    async def extend(self, ids: Sequence[str], seconds: int) -> list[int]:
        core = self.core
        self._check_ids(ids)
        limit = core.settings.delivery.max_ack_deadline_seconds
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
        lease_ms = int((seconds + core.settings.delivery.lease_margin_seconds) * 1000)
        recs = list(todo.values())
        if self.share.active:
            self._within_locks(recs, seconds)
        if recs:
            # Renewals: the same delivery goes on, so the same attempt. Deadline and lease run
            # from when the store was asked (see Claims.claim).
            asked = core.clock()
            claims = await core.counted(
                core.store.claim([p.store_key for p in recs], core.owner, lease_ms, mode=ClaimMode.RENEW)
            )
            for p, c in zip(recs, claims, strict=True):
                if c.status is ClaimStatus.NEW and p.state is State.IN_FLIGHT:
                    p.deadline = asked + seconds
                    p.lease_until = asked + lease_ms / 1000
        return results

    def _within_locks(self, records: list[Pending], seconds: int) -> None:
        """Queue mode: a deadline cannot pass the record's share lock. librdkafka's share consumer
        (2.16) has no way to renew a lock (KIP-932 has no RENEW acknowledgement there), and past
        the lock the broker hands the record to another member."""
        core = self.core
        now = core.clock()
        for p in records:
            left = p.lock_until - now
            if seconds > left:
                raise FailedPrecondition(
                    f"ExtendDeadline by {seconds}s passes the end of the record's share-group lock "
                    f"(in {max(left, 0):.0f}s; the group's share.record.lock.duration.ms is "
                    f"{core.share_lock_s * 1000:.0f}): the share consumer cannot renew a lock, so the "
                    "broker would hand the record to another member. Ask for at most "
                    f"{max(int(left), 0)}s, Ack or Nack it before then, or raise the group's "
                    "share.record.lock.duration.ms (with delivery.ack_deadline_seconds at most that long)"
                )
