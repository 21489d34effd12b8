"""App streams: credit-bounded consumers of the ready queue."""

from __future__ import annotations

import asyncio
import itertools
import math
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
    """Records waiting for a stream: a queue per topic, each oldest first.

    A stream takes from the queues of the topics it wants, in turns that rotate from one take to
    the next, so what a take costs depends on the stream's own records only: one topic's backlog
    can neither starve a stream of another topic nor slow its takes down.
    """

    def __init__(self) -> None:
        self._queues: dict[str, deque[Pending]] = {}
        self._size = 0
        self._turn = 0
        #: Partitions being revoked: their records are no longer handed out (a take drops them
        #: from the queue; the revoke drops them from the books).
        self.revoking: set[tuple[str, int]] = set()

    def __len__(self) -> int:
        return self._size

    def push(self, p: Pending, front: bool = False) -> None:
        p.state = State.READY
        q = self._queues.get(p.topic)
        if q is None:
            q = self._queues[p.topic] = deque()
        if front:
            q.appendleft(p)
        else:
            q.append(p)
        self._size += 1

    def position(self, p: Pending) -> int | None:
        """Where ``p`` is in its topic's queue (0: next), or None; a scan, for diagnostics only."""
        for i, q in enumerate(self._queues.get(p.topic, ())):
            if q is p:
                return i
        return None

    def waiting(self, topic: str) -> int:
        """How many entries wait in ``topic``'s queue (including ones settled while queued)."""
        q = self._queues.get(topic)
        return len(q) if q is not None else 0

    def drop_held(self) -> None:
        """Forget records that are no longer READY (an ordering change held them back), so that
        pushing one again later cannot queue it twice."""
        for topic, q in self._queues.items():
            self._queues[topic] = deque(p for p in q if p.state is State.READY)
        self._size = sum(len(q) for q in self._queues.values())

    def take(self, stream: Stream) -> list[Pending]:
        """Take what ``stream`` may receive now: within its credit, its batch size and its
        topics; several topics share a frame in turns."""
        want = min(stream.max_in_flight - stream.outstanding, stream.max_batch)
        out: list[Pending] = []
        if want <= 0:
            return out
        if stream.topics:
            queues = [q for t in stream.topics if (q := self._queues.get(t))]
        else:
            queues = [q for q in self._queues.values() if q]
        if not queues:
            return out
        if len(queues) > 1:
            self._turn += 1
            k = self._turn % len(queues)
            queues = queues[k:] + queues[:k]
        room = float(stream.max_bytes - stream.in_flight_bytes) if stream.max_bytes else math.inf
        while queues and len(out) < want:
            # One turn: each queue in order gives its share of what is left to fill. One that
            # gives less has nothing more the stream may take now and is asked no further.
            share = max(1, (want - len(out)) // len(queues))
            for q in list(queues):
                upto = min(len(out) + share, want)
                left = self._take_from(q, stream, out, upto, room)
                if left is None:
                    return out  # the next record would pass the stream's byte credit
                room = left
                if len(out) < upto:
                    queues.remove(q)
                elif len(out) >= want:
                    break
        return out

    def _take_from(
        self, q: deque[Pending], stream: Stream, out: list[Pending], upto: int, room: float
    ) -> float | None:
        """Move records from ``q`` to ``out`` until it holds ``upto``. Returns the stream's byte
        credit left (inf: no byte limit), or None when the next record does not fit it."""
        skipped: list[Pending] = []
        revoking = self.revoking
        try:
            while q and len(out) < upto:
                p = q.popleft()
                self._size -= 1
                if p.state is not State.READY or (revoking and p.tp in revoking):
                    continue  # dropped or settled while queued, or its partition is going
                if _held(stream, p):
                    # The app behind this stream still holds the expired copy of this record:
                    # it will answer that copy (an ack settles the record), so sending it again
                    # there only queues a duplicate behind its backlog.
                    skipped.append(p)
                    continue
                if len(p.value) > room and (out or stream.in_flight):
                    q.appendleft(p)
                    self._size += 1
                    return None
                room -= len(p.value)
                out.append(p)
        finally:
            q.extendleft(reversed(skipped))
            self._size += len(skipped)
        return room


def _held(stream: Stream, p: Pending) -> bool:
    """Whether the app behind ``stream`` still holds an expired copy of ``p``."""
    return bool(stream.expired) and bool(p.delivery_ids) and p.delivery_ids[-1] in stream.expired
