"""Queue mode: how records read through a share group (KIP-932) leave this member.

In a consumer group a record that is not settled stays here: the partition is this member's,
and a Nack or a passed ack deadline delivers it again from memory. In a share group the broker
lends each record to one member under a lock, and every record of a poll must be answered
before the member may poll again. So every record ends in one of three answers:

- ACCEPT when it settles (acked after its done mark, a duplicate, moved away): ``Core.settle``;
- REJECT once its dead-letter copy is written: ``Core.settle`` of a record marked ``reject``;
- RELEASE when this member gives it up: a Nack (after the delay, if it fits in the lock), a
  passed ack deadline, a lock about to run out while the record waits (for a claim, a stream, a
  BUSY key), no app stream attached, a shutdown. The broker hands it out again, to any member,
  and counts the delivery; the claim in the store keeps two members from delivering it at once.

A record on its last delivery (the broker's ``group.share.delivery.count.limit``) is never
released on a failure: it is dead-lettered, because a release would make the broker archive it
with no copy anywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sidecar.engine.claims import Claims
from sidecar.engine.core import Core
from sidecar.engine.records import Pending, State
from sidecar.engine.reroute import Reroute
from sidecar.errors import StoreUnavailable

log = logging.getLogger(__name__)


class Share:
    def __init__(self, core: Core, claims: Claims, reroute: Reroute) -> None:
        self.core = core
        self.claims = claims
        self.reroute = reroute

    @property
    def active(self) -> bool:
        return self.core.share is not None

    def dead_letter_or_keep(self, records: Sequence[Pending], why: str) -> list[Pending]:
        """Dead-letter the records on their last delivery (a release would let the broker
        archive them); return the others."""
        core = self.core
        last = [p for p in records if p.last_delivery]
        for p in last:
            if p.stream is not None:
                p.stream.remove(p)
            p.reason_code = "delivery-count"
            p.reason = (
                f"{why} on the share group's last delivery of this record ({p.delivery_count} of "
                f"group.share.delivery.count.limit={core.share_delivery_limit}); released, the broker "
                "would archive it"
            )
        if last:
            self.reroute.dead_letter(last)
        return [p for p in records if not p.last_delivery]

    async def expired(self, records: list[Pending]) -> None:
        """Deliveries whose ack deadline passed: dead-letter the ones out of attempts, give the
        others back to the broker (failed in the store: the next claim counts the failure)."""
        core = self.core
        d = core.settings.delivery
        out = [p for p in records if p.failures + 1 >= d.max_attempts and not p.last_delivery]
        for p in out:
            if p.stream is not None:
                p.stream.remove(p)
            p.failures += 1
            p.reason_code = "deadline"
            p.reason = (
                f"deadline: {p.failures} of its deliveries failed, the last with no Ack or Nack before "
                f"the ack deadline (delivery.max_attempts={d.max_attempts})"
            )
        if out:
            self.reroute.dead_letter(out)
        gone = {id(p) for p in out}
        rest = self.dead_letter_or_keep([p for p in records if id(p) not in gone], "ack deadline passed")
        if not rest:
            return
        try:
            await core.store.release([p.store_key for p in rest], core.owner, failed=True)
        except StoreUnavailable:
            core.metrics.store_errors.inc()  # the lease runs out instead
        core.release([p for p in rest if p.state is State.IN_FLIGHT])

    async def watch(self, now: float) -> None:
        """Release the records that wait here (not in flight, not being rerouted) and would not
        be answered before their lock ends, or that no app stream can take."""
        core = self.core
        streams = bool(core.streams)
        due: list[Pending] = []
        for part in core.partitions.values():
            if not part.share:
                continue
            for p in part.pending.values():
                # In flight or being rerouted: answered elsewhere. SHADOWED: goes with the record
                # it waits behind.
                if p.state in _ANSWERED_ELSEWHERE:
                    continue
                if not streams or p.lock_until <= now:
                    due.append(p)
        if not due:
            return
        log.info(
            "releasing %d records to the share group (%s)",
            len(due),
            "no app stream attached" if not streams else "their locks end before they could be delivered",
        )
        # Claims held: READY and HELD. (DELAYED ones gave theirs back at their Nack; BUSY and
        # CLAIMING ones hold none.)
        await self.claims.release_claims([p for p in due if p.state in (State.READY, State.HELD)])
        core.release(due)


_ANSWERED_ELSEWHERE = frozenset(
    {State.IN_FLIGHT, State.REROUTING, State.SETTLED, State.DROPPED, State.SHADOWED}
)
