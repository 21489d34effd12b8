"""Claims: records taken in are claimed in the dedup store in batches, and routed by the answer.

NEW records go to ``Core.ready`` (past their ordering chain), DONE ones settle as duplicates,
BUSY ones wait for another sidecar's lease. A record whose deliveries failed
``delivery.max_attempts`` times (the app's stream closed or its ack deadline passed, with no Nack
the last time) goes to the dead-letter topic. Claims handed back because a partition moved or a
sidecar died count as attempts, not as failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque

from sidecar.engine.core import Core
from sidecar.engine.records import Pending, State
from sidecar.engine.reroute import Reroute
from sidecar.errors import StoreUnavailable
from sidecar.observability import tracing
from sidecar.store.base import Claim, ClaimMode, ClaimStatus

log = logging.getLogger(__name__)

CLAIM_BATCH = 500  # keys per claim round trip
CLAIM_SLOTS = 4  # claim round trips in flight at most
CLAIM_BACKLOG = 2_000  # records waiting for a claim before intake waits


def _trace_claims(records: list[Pending], claims: list[Claim], asked_ns: int) -> None:
    """A dedup.claim span (the store round trip just made) for each record with a trace context."""
    for p, c in zip(records, claims, strict=True):
        ctx = tracing.context_of(p.headers)
        if ctx is not None:
            span = tracing.tracer.start_span(
                "dedup.claim", context=ctx, start_time=asked_ns, attributes={"dedup.claim": c.status.name}
            )
            span.end()


class Claims:
    def __init__(self, core: Core, reroute: Reroute) -> None:
        self.core = core
        self.reroute = reroute
        self.queue: deque[Pending] = deque()  # taken in, waiting for a claim round trip
        self._in_flight = 0
        self._kick = asyncio.Event()  # records queued, or a claim returned
        self.room = asyncio.Event()  # the claim backlog fell below CLAIM_BACKLOG

    def enqueue(self, records: list[Pending]) -> None:
        self.queue.extend(records)
        self._kick.set()

    async def loop(self) -> None:
        """Send queued records to the store, grouped like a group commit.

        With no claim in flight a record is claimed at once (lowest latency at a low rate).
        While one is in flight, records gather until it returns or a full batch is ready, so
        the number of round trips follows the store's speed, not the record rate. Up to
        CLAIM_SLOTS full batches overlap under load (offers already fixed the order).
        """
        queue = self.queue
        while True:
            await self._kick.wait()
            self._kick.clear()
            while queue and self._in_flight < CLAIM_SLOTS:
                if self._in_flight and len(queue) < CLAIM_BATCH:
                    break  # wait for the claim in flight, or for a full batch
                chunk = [queue.popleft() for _ in range(min(CLAIM_BATCH, len(queue)))]
                self._in_flight += 1
                self.core.spawn(self._chunk(chunk))
            if len(queue) < CLAIM_BACKLOG:
                self.room.set()

    async def _chunk(self, records: list[Pending]) -> None:
        try:
            await self.claim_or_retry_later(records, retry=True)
        finally:
            self._in_flight -= 1
            self._kick.set()

    async def claim_or_retry_later(
        self, records: list[Pending], retry: bool, front: bool = False, mode: ClaimMode = ClaimMode.CLAIM
    ) -> None:
        """Claim records; if that fails, the timer claims what is still unclaimed a second later.

        Nothing else looks at a record in CLAIMING: a failure that left it there (a store outage
        without ``retry``, or an unexpected error) would strand it, never delivered, while its
        partition could not commit past it.
        """
        try:
            await self.claim(records, retry=retry, front=front, mode=mode)
        except Exception as exc:
            if not isinstance(exc, StoreUnavailable):
                log.exception("claim failed for %d records; retrying in 1s", len(records))
            due = self.core.clock() + 1.0
            for p in records:
                if p.state is State.CLAIMING:
                    self.core.wait(p, State.BUSY, due)

    async def claim(
        self, records: list[Pending], retry: bool, front: bool = False, mode: ClaimMode = ClaimMode.CLAIM
    ) -> None:
        """Claim records in the store and route them by the answer. ``front``: records that
        waited already (redeliveries, BUSY keys) go ahead of the records claimed at intake, whose
        backlog can be thousands long; they hold their partition's commits back meanwhile.
        ``mode``: REDELIVER for records this sidecar delivered and sends again."""
        core = self.core
        d = core.settings.delivery
        delay = 0.05
        now = core.clock()
        if core.stale_leases:
            for key, until in list(core.stale_leases.items()):
                if until <= now:
                    del core.stale_leases[key]
            for p in records:
                held = core.stale_leases.get(p.store_key)
                if held is not None and p.state is not State.DROPPED:
                    core.wait(p, State.BUSY, min(held, now + core.busy_retry_s))
            records = [p for p in records if p.state is not State.BUSY]
        while True:
            # Only records still waiting for this claim: one may have been dropped (revoked) or
            # settled (an Ack of an earlier delivery id, after its stream broke) since.
            live = [p for p in records if p.state is State.CLAIMING]
            if not live:
                return
            # The lease runs from when the store was asked, not from when its answer was read: a
            # sidecar paused in between (SIGSTOP, a long GC, a starved VM) must not believe in a
            # lease the store already let another sidecar take over.
            asked, asked_ns = core.clock(), time.time_ns()
            try:
                claims = await core.store.claim([p.store_key for p in live], core.owner, core.lease_ms, mode)
                break
            except StoreUnavailable as exc:
                core.metrics.store_errors.inc()
                if not retry or core.stopping:
                    raise
                # The store's Outage logs the outage (sidecar/observability/outage.py), not each retry.
                log.debug("claim failed, retrying in %.1fs: %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        now = core.clock()
        if tracing.active():
            _trace_claims(live, claims, asked_ns)
        orphans: list[str] = []
        won: list[Pending] = []
        poison: list[Pending] = []
        failed = int(mode is ClaimMode.REDELIVER)  # this delivery's predecessor failed
        for p, c in zip(live, claims, strict=True):
            if p.state is not State.CLAIMING:
                # Dropped while the store answered: hand a won claim back. Settled meanwhile (the
                # app acked an earlier delivery of it): its key is done; delivering it again now
                # would be a redelivery after an OK ack.
                if p.state is State.DROPPED and c.status is ClaimStatus.NEW:
                    orphans.append(p.store_key)
                continue
            if c.status is ClaimStatus.NEW:
                p.attempt = max(p.attempt + 1, c.attempt)
                p.failures = max(p.failures + failed, c.failures)
                p.lease_until = asked + core.lease_ms / 1000
                p.unsent = True
                if p.failures >= d.max_attempts:
                    poison.append(p)
                else:
                    won.append(p)
            elif c.status is ClaimStatus.DONE:
                core.metrics.skipped.labels("duplicate", p.topic).inc()
                core.settle(p)
            else:
                core.wait(p, State.BUSY, now + core.busy_retry_s)
                core.metrics.busy.inc()
        core.ready(won, front=front)
        if poison:
            for p in poison:
                p.attempt -= 1  # the deliveries it had; this claim delivers nothing
                p.reason_code = "deadline"
                p.reason = (
                    f"deadline: delivered {p.attempt} times, {p.failures} of them failed, the last "
                    "with no Ack or Nack before the ack deadline or the app's stream closed "
                    f"(delivery.max_attempts={d.max_attempts})"
                )
            self.reroute.dead_letter(poison)
        await self.release_orphans(orphans)

    async def release_orphans(self, keys: list[str]) -> None:
        """Hand back claims won for records whose partition was revoked while the store answered.

        Nobody here will deliver them; holding them would make the partition's next owner wait
        out the lease (BUSY) for every such key. A key that another pending record of ours holds
        now (a shadow that took over) stays claimed.
        """
        keys = [k for k in keys if k not in self.core.key_index]
        if keys:
            with contextlib.suppress(StoreUnavailable):
                await self.core.store.release(keys, self.core.owner, delivered=False)

    async def release_claims(self, records: list[Pending]) -> None:
        """Hand back the claims of records nobody here will deliver (or redeliver) any more.

        A record that never reached an app under this claim gives its attempt back: claiming
        ahead of the app must not make the next owner's first delivery say "attempt 2".
        """
        sent = [p.store_key for p in records if not p.unsent]
        unsent = [p.store_key for p in records if p.unsent]
        store, owner = self.core.store, self.core.owner
        with contextlib.suppress(StoreUnavailable):
            if sent:
                await store.release(sent, owner)
            if unsent:
                await store.release(unsent, owner, delivered=False)

    def release_shadows(self, p: Pending) -> None:
        """A record left the key index without settling its key: the next shadow claims it."""
        shadows = [s for s in p.shadows if s.state is State.SHADOWED]
        p.shadows.clear()
        if not shadows:
            return
        first, rest = shadows[0], shadows[1:]
        first.shadows.extend(rest)
        first.state = State.CLAIMING
        self.core.key_index[first.store_key] = first
        self.core.spawn(self.claim_or_retry_later([first], retry=True))

    async def renew(self, batch: list[Pending]) -> list[Pending]:
        """Extend leases that would end before the new ack deadline (records that waited long).
        Returns the records of ``batch`` still to be sent.

        A renewal whose answer is read long after it was asked (the sidecar was paused between
        the two: SIGSTOP, a long GC, a starved VM) may describe a lease that has already run
        out, and the key may since have been delivered and acked by another sidecar. Such
        records are renewed again, so nothing is handed out on a lease older than half of one.
        """
        core = self.core
        lease_s = core.lease_ms / 1000
        floor = min(core.deadline_s, lease_s) / 2  # cover a fresh lease still has at hand-out
        now = core.clock()
        stale = [p for p in batch if p.lease_until < now + core.deadline_s]
        if not stale:
            return batch
        # A record that is not to be sent leaves READY below: dropped, settled as done, or BUSY.
        while stale:
            asked = core.clock()
            # Renewals: none of these was delivered since our last claim of it.
            claims = await core.store.claim(
                [p.store_key for p in stale], core.owner, core.lease_ms, mode=ClaimMode.RENEW
            )
            orphans: list[str] = []
            for p, c in zip(stale, claims, strict=True):
                if p.state is State.DROPPED:
                    if c.status is ClaimStatus.NEW:
                        orphans.append(p.store_key)
                elif c.status is ClaimStatus.NEW:
                    p.lease_until = asked + lease_s
                    p.attempt = max(p.attempt, c.attempt)
                elif c.status is ClaimStatus.DONE:
                    core.metrics.skipped.labels("duplicate", p.topic).inc()
                    core.settle(p)
                else:
                    core.wait(p, State.BUSY, asked + core.busy_retry_s)
            await self.release_orphans(orphans)
            now = core.clock()
            stale = [p for p in stale if p.state is State.READY and p.lease_until < now + floor]
            if stale:
                log.warning(
                    "a lease renewal was answered %.1fs after it was asked; renewing %d leases again "
                    "before sending",
                    now - asked,
                    len(stale),
                )
        return [p for p in batch if p.state is State.READY]
