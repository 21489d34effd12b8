"""App streams: credit-bounded consumers of the ready queue."""

from __future__ import annotations

import asyncio
import itertools
from collections import deque

from sidecar.engine.ordering import Ordering
from sidecar.engine.records import Pending, State

_ids = itertools.count(1)


class Stream:
    """One Subscribe call. Holds credit (messages and bytes) and its in-flight deliveries.

    Parameters:
        topics: topics this stream wants; empty for all.
        max_in_flight: most un-acked deliveries outstanding.
        max_bytes: most un-acked value bytes outstanding (0: no limit).
        max_batch: most deliveries per frame.
        ordering: the ordering it asked for (at least the sidecar's; see ordering.py).
    """

    def __init__(
        self,
        topics: frozenset[str],
        max_in_flight: int,
        max_bytes: int,
        max_batch: int,
        ordering: Ordering = Ordering.UNORDERED,
    ) -> None:
        self.id = next(_ids)
        self.topics = topics
        self.ordering = ordering
        self.max_in_flight = max_in_flight
        self.max_bytes = max_bytes
        self.max_batch = max_batch
        # Credit-bound, a frame waits (briefly) until at least this many records fit: otherwise
        # each ack of a few records returns a little credit, which is spent at once on a frame
        # of a few records, and frames stay tiny for as long as the backlog lasts.
        self.min_frame = max(1, min(max_batch, max_in_flight // 4))
        self.in_flight: dict[int, Pending] = {}  # id(pending) -> pending
        # Deliveries whose ack deadline passed: the record went back for redelivery, but the app
        # still holds this copy, so it keeps its credit until the app acks or nacks it, the
        # stream closes, or one more ack deadline passes (an app that lost the copy must not
        # starve). Otherwise a stalled app would be sent the redeliveries on top.
        self.expired: dict[str, tuple[int, float]] = {}  # delivery id -> (value bytes, held until)
        self.in_flight_bytes = 0  # of in_flight and expired
        self.wakeup = asyncio.Event()
        self.closed = False

    def wants(self, p: Pending) -> bool:
        return not self.topics or p.topic in self.topics

    @property
    def outstanding(self) -> int:
        """Deliveries the app holds un-acked: in flight, and expired copies."""
        return len(self.in_flight) + len(self.expired)

    def has_credit(self) -> bool:
        if self.outstanding >= self.max_in_flight:
            return False
        return not self.max_bytes or self.in_flight_bytes < self.max_bytes or not self.in_flight

    def add(self, p: Pending) -> None:
        self.in_flight[id(p)] = p
        self.in_flight_bytes += len(p.value)
        p.stream = self

    def remove(self, p: Pending) -> None:
        if self.in_flight.pop(id(p), None) is not None:
            self.in_flight_bytes -= len(p.value)
            self.wakeup.set()
        p.stream = None

    def expire(self, p: Pending, until: float) -> str:
        """The ack deadline of ``p``'s delivery passed: it leaves the in-flight set but keeps its
        credit until ``until`` at the latest (see ``expired``). Returns the delivery id."""
        did = p.delivery_ids[-1]
        if self.in_flight.pop(id(p), None) is not None:
            self.expired[did] = (len(p.value), until)
        p.stream = None
        return did

    def answered(self, did: str) -> None:
        """The app acked or nacked an expired delivery (or it was held long enough): its credit
        comes back."""
        held = self.expired.pop(did, None)
        if held is not None:
            self.in_flight_bytes -= held[0]
            self.wakeup.set()


class ReadyQueue:
    """Records waiting for a stream, oldest first."""

    def __init__(self) -> None:
        self._q: deque[Pending] = deque()

    def __len__(self) -> int:
        return len(self._q)

    def push(self, p: Pending, front: bool = False) -> None:
        p.state = State.READY
        if front:
            self._q.appendleft(p)
        else:
            self._q.append(p)

    def position(self, p: Pending) -> int | None:
        """Where ``p`` is in the queue (0: next), or None; a scan, for diagnostics only."""
        for i, q in enumerate(self._q):
            if q is p:
                return i
        return None

    def drop_held(self) -> None:
        """Forget records that are no longer READY (an ordering change held them back), so that
        pushing one again later cannot queue it twice."""
        self._q = deque(p for p in self._q if p.state is State.READY)

    def take(self, stream: Stream) -> list[Pending]:
        """Take what ``stream`` may receive now: within its credit, its batch size and its topics."""
        out: list[Pending] = []
        skipped: list[Pending] = []
        budget = stream.max_in_flight - stream.outstanding
        room = stream.max_bytes - stream.in_flight_bytes if stream.max_bytes else None
        scanned = 0
        held = stream.expired
        while self._q and len(out) < min(budget, stream.max_batch) and scanned < 10_000:
            p = self._q.popleft()
            scanned += 1
            if p.state is not State.READY:
                continue  # dropped or settled while queued
            if not stream.wants(p) or (held and p.delivery_ids and p.delivery_ids[-1] in held):
                # Not its topic; or the app behind this stream still holds the expired copy of
                # this record: it will answer that copy (an ack settles the record), so sending
                # it again there only queues a duplicate behind its backlog.
                skipped.append(p)
                continue
            if room is not None and len(p.value) > room and (out or stream.in_flight):
                self._q.appendleft(p)
                break
            out.append(p)
            if room is not None:
                room -= len(p.value)
        self._q.extendleft(reversed(skipped))
        return out
