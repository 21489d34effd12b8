"""The periodic loops: timers (ack deadlines, delays, due retry records, the detach grace), the
commit loop, the stall watch and the store purge."""

from __future__ import annotations

import asyncio
import logging

from sidecar.engine.claims import Claims
from sidecar.engine.core import Core
from sidecar.engine.dispatch import Dispatch
from sidecar.engine.records import Pending, State
from sidecar.engine.settlement import Settlement
from sidecar.engine.share import Share
from sidecar.errors import StoreUnavailable
from sidecar.observability.outage import Outage
from sidecar.store.base import ClaimMode

log = logging.getLogger(__name__)

STALL_CHECK_S = 5.0  # how often partitions are checked for a committable offset that stopped
TICK_S = 0.05


class Maintenance:
    def __init__(
        self, core: Core, claims: Claims, dispatch: Dispatch, settlement: Settlement, share: Share
    ) -> None:
        self.core = core
        self.share = share
        self.claims = claims
        self.dispatch = dispatch
        self.settlement = settlement
        # A commit that fails is retried every commit interval: log the changes of state only.
        self.commits = Outage("Kafka offset commits", core.metrics.dependency_failures)

    async def timer_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                await self.tick()
            except Exception:
                log.exception("timer tick failed")

    async def tick(self) -> None:
        core, dispatch = self.core, self.dispatch
        now = core.clock()
        # Ack deadlines: redeliver with attempt + 1 (claim again to extend the lease).
        late = [
            (s, p)
            for s in core.streams.values()
            for p in s.in_flight.values()
            if p.deadline <= now and p.acking == 0 and p.state is State.IN_FLIGHT
        ]
        failed = self.settlement.answered_failed
        share = self.share.active
        for s, p in late:
            if p.delivery_ids[-1] in failed:
                s.remove(p)
            else:
                dispatch.expired[s.expire(p, now + core.deadline_s)] = s
            if not share:
                p.state = State.CLAIMING
            core.metrics.redelivered.labels("deadline", p.topic).inc()
        expired = [p for _, p in late]
        if share and expired:
            await self.share.expired(expired)  # released to the group, or dead-lettered
            expired = []
        # BUSY and DELAYED records whose time has come.
        due = [p for p in core.waiting if p.due <= now and p.state in (State.BUSY, State.DELAYED)]
        scheduled: list[Pending] = []
        if due:
            ids = {id(p) for p in due}
            core.waiting = [
                p for p in core.waiting if id(p) not in ids and p.state in (State.BUSY, State.DELAYED)
            ]
            if share:
                # Queue mode: a Nack's delay is over; the broker delivers it again.
                core.release([p for p in due if p.state is State.DELAYED])
                due = [p for p in due if p.state is State.BUSY]
            for p in due:
                p.state = State.CLAIMING
            scheduled = [p for p in due if p.scheduled]
            if scheduled:
                due = [p for p in due if not p.scheduled]
                scheduled = self._due_retry_records(scheduled)
        # Expired copies held for one more deadline without an answer give their credit back.
        if dispatch.expired:
            self.settlement.answered(
                [did for s in core.streams.values() for did, (_, until) in s.expired.items() if until <= now]
            )
        claim = self.claims.claim_or_retry_later
        if expired:
            await claim(expired, retry=False, front=True, mode=ClaimMode.REDELIVER)
        if due:
            await claim(due, retry=False, front=True)
        if scheduled:
            # The claim the retry record's Nack extended to its due time: the next attempt.
            await claim(scheduled, retry=False, mode=ClaimMode.REDELIVER)
        if share:
            await self.share.watch(now)
        self._detach_grace(now)

    def _due_retry_records(self, records: list[Pending]) -> list[Pending]:
        """Retry-topic records whose due time came: their partitions may fetch again, and each
        takes its key's claim unless a record with the key is pending here already."""
        core = self.core
        out: list[Pending] = []
        for p in records:
            p.scheduled = False
            part = core.partitions.get(p.tp)
            if part is not None and part.generation == p.generation:
                part.scheduled -= 1
                core.update_pause(p.tp)
            holder = core.key_index.get(p.store_key)
            if holder is not None and holder is not p:
                p.state = State.SHADOWED
                holder.shadows.append(p)
                continue
            core.key_index[p.store_key] = p
            out.append(p)
        return out

    def _detach_grace(self, now: float) -> None:
        """No stream for the grace period: leave the group so partitions move to healthy replicas."""
        core, dispatch = self.core, self.dispatch
        grace = core.settings.delivery.detach_grace_seconds
        since = dispatch.no_stream_since
        if (
            since is not None
            and not dispatch.left_group
            and now - since > grace
            and core.consumer is not None
            and not core.stopping
        ):
            log.warning(
                "no app stream attached for %.0fs (delivery.detach_grace_seconds): leaving the group", grace
            )
            core.consumer.leave_group()
            dispatch.left_group = True

    async def commit_loop(self) -> None:
        core = self.core
        interval = core.settings.commit.interval_ms / 1000
        while True:
            await core.commit_wakeup.wait()
            core.commit_wakeup.clear()
            try:
                whole = await core.commit_now()
            except Exception as exc:  # noqa: BLE001 - retried after the interval
                self.commits.failed(f"{exc} (retried every commit.interval_ms)")
                core.commit_wakeup.set()
            else:
                self.commits.answered()
                if not whole:
                    core.commit_wakeup.set()  # some were refused (a rebalance): again after the interval
            await asyncio.sleep(interval)

    async def stall_loop(self) -> None:
        while True:
            await asyncio.sleep(STALL_CHECK_S)
            self.check_stalls()

    def check_stalls(self) -> None:
        """Warn (once per stall) about partitions whose committable offset has not moved for
        ``stall_s`` while records are unsettled, naming the record that holds them back and its
        state. Commits wait for every record below them, so one stuck record stops a partition's
        progress however many records after it settle; this makes it visible."""
        core = self.core
        now = core.clock()
        d = core.settings.delivery
        stall_s = max(60.0, 2 * (d.ack_deadline_seconds + d.lease_margin_seconds))
        stalled = 0
        for tp, part in core.partitions.items():
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
            if p is not None and p.state is State.READY:
                what += "; " + self._why_not_sent(p)
            log.warning(
                "%s[%d] has not moved past offset %d for %.0fs: %s; %d streams attached, "
                "%d records unsettled",
                *tp,
                at,
                now - part.progress[1],
                what,
                len(core.streams),
                part.tracker.unsettled,
                extra=p.log_fields() if p is not None else {"topic": tp[0], "partition": tp[1], "offset": at},
            )
        core.metrics.stalled_partitions.set(stalled)

    def _why_not_sent(self, p: Pending) -> str:
        """For a stall warning about a READY record: where it is in the ready queue and what
        each stream could take, so a record that no stream takes can be told from one that
        waits its turn."""
        core = self.core
        at = core.ready_queue.position(p)
        queued = core.ready_queue.waiting(p.topic)
        parts = [f"{'not in' if at is None else f'#{at} of {queued} in'} topic {p.topic}'s ready queue"]
        last = p.delivery_ids[-1] if p.delivery_ids else None
        for s in core.streams.values():
            parts.append(
                f"stream {s.id}: {s.outstanding}/{s.max_in_flight} outstanding ({len(s.expired)} expired), "
                f"{'wants it' if s.wants(p) else 'not its topic'}"
                f"{', holds its expired copy' if last is not None and last in s.expired else ''}"
                f"{', closed' if s.closed else ''}"
            )
        return "; ".join(parts)

    async def purge_loop(self) -> None:
        core = self.core
        while True:
            await asyncio.sleep(core.settings.store.purge_interval_seconds)
            try:
                n = await core.store.purge()
                if n:
                    log.info("purged %d expired keys from the store", n)
            except StoreUnavailable as exc:
                log.warning("purge failed: %s", exc)
