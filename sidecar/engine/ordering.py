"""Ordering chains: which claimed records may be delivered now.

``delivery.ordering`` (narrowed per topic by a Subscribe, never widened):

* ``unordered``: every claimed record may be in flight at once (the default, and the fastest).
* ``key``: a record waits while an earlier record of its partition with the same Kafka key is
  unsettled (claiming, queued, in flight, waiting out a Nack delay or a busy lease, or being
  dead-lettered). Records without a Kafka key are not ordered among themselves: Kafka's
  partitioner spreads them over partitions, so there is no entity to keep in order.
* ``partition``: one unsettled record per partition at a time, in offset order.

A chain is a deque of a partition's unsettled records that share a chain key, in offset order
(intake is in offset order). Only its head may be delivered. A record settled out of turn (a
duplicate the store answered DONE for, behind a head still in flight) is left in place and popped
when it reaches the head, so settling costs O(1) however long the chain.

Records are claimed in the store as soon as they are taken in, whatever their place in the
chain, so duplicates settle at once and never hold their key back; a record that waited long
for its turn has its lease renewed before it is sent (dispatch's lease check).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from enum import IntEnum

from sidecar.engine.records import Partition, Pending, State

_GONE = (State.SETTLED, State.DROPPED)


class Ordering(IntEnum):
    """Weakest first: a Subscribe may ask for a higher value than the setting, never a lower one."""

    UNORDERED = 0
    KEY = 1
    PARTITION = 2

    @classmethod
    def parse(cls, name: str) -> Ordering:
        return cls[name.upper()]

    @property
    def label(self) -> str:
        return self.name.lower()


_PARTITION_CHAIN = object()  # the chain key of ``partition`` ordering


def enter(part: Partition, p: Pending, mode: Ordering) -> None:
    """Put a record taken in at the tail of its chain (if ``mode`` orders it)."""
    if mode is Ordering.UNORDERED:
        return
    if mode is Ordering.KEY:
        if p.key is None:
            return
        chain_key: object = p.key
    else:
        chain_key = _PARTITION_CHAIN
    chain = part.chains.get(chain_key)
    if chain is None:
        chain = part.chains[chain_key] = deque()
    chain.append(p)
    p.chain = chain


def may_deliver(p: Pending) -> bool:
    """True when no earlier record of ``p``'s chain is unsettled."""
    chain = p.chain
    if chain is None:
        return True
    while chain[0].state in _GONE:  # settled out of turn earlier
        chain.popleft()
    return chain[0] is p


def leave(part: Partition | None, p: Pending) -> Pending | None:
    """``p`` settled or was dropped. Returns the chain's new head if it is waiting its turn."""
    chain = p.chain
    if chain is None:
        return None
    p.chain = None
    if chain[0] is not p:
        return None  # settled out of turn: popped when it reaches the head
    chain.popleft()
    while chain and chain[0].state in _GONE:
        chain.popleft()
    if not chain:
        if part is not None:
            for k in (p.key, _PARTITION_CHAIN):
                if k is not None and part.chains.get(k) is chain:
                    del part.chains[k]
        return None
    head = chain[0]
    return head if head.state is State.HELD else None


def rebuild(part: Partition, mode: Ordering) -> Iterable[Pending]:
    """The partition's ordering changed (a stream that narrows it attached, or detached): chain
    its unsettled records again under ``mode``. Returns the records held until now that may go.
    A record already in flight stays in flight; those behind it wait for it."""
    part.chains.clear()
    live = sorted((p for p in part.pending.values() if p.state not in _GONE), key=lambda p: p.offset)
    for p in live:
        p.chain = None
        enter(part, p, mode)
    freed: list[Pending] = []
    for p in live:
        if p.state is State.HELD and may_deliver(p):
            freed.append(p)
        elif p.state is State.READY and not may_deliver(p):
            p.state = State.HELD  # the ready queue drops it when it comes across it
    return freed
