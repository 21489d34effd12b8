"""The in-memory life of one fetched record, from intake until it is settled, and the books the
engine keeps per partition. Nothing here imports another engine module."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from sidecar.offsets import AckTracker

TP = tuple[str, int]


class State(Enum):
    CLAIMING = "claiming"  # waiting for the store's answer
    READY = "ready"  # claimed, queued for a stream
    HELD = "held"  # claimed, waiting for an earlier record of its ordering chain to settle
    IN_FLIGHT = "in_flight"  # sent to an app stream, waiting for Ack/Nack/deadline
    DELAYED = "delayed"  # nacked (or read from a retry topic early); claimed again when due
    BUSY = "busy"  # another sidecar holds the key's lease; claim again later
    SHADOWED = "shadowed"  # an earlier record with the same idempotency key is pending here
    REROUTING = "rerouting"  # being written to the dead-letter or a retry topic
    SETTLED = "settled"
    DROPPED = "dropped"  # partition revoked before it settled


class Holder(Protocol):
    """What a record knows of the stream it is in flight on (see streams.Stream)."""

    def remove(self, p: Pending) -> None: ...


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a record read from a retry topic was first consumed: the coordinates the app sees."""

    topic: str
    partition: int
    offset: int


@dataclass(eq=False, slots=True)
class Pending:
    tp: TP
    offset: int
    generation: int
    idem_key: str | None  # None: no key and key_fallback=dead-letter
    store_key: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes | None]]  # as consumed; a value may be None
    timestamp_ms: int
    topic: str  # the topic apps subscribe to: tp[0], or the source topic of a retry record
    origin: Origin | None = None  # set for a record read from a retry topic
    attempt: int = 0
    failures: int = 0  # deliveries that failed (Nack, ack deadline, stream closed): Claim.failures
    state: State = State.CLAIMING
    stream: Holder | None = None
    deadline: float = 0.0  # monotonic ack deadline while in flight
    sent_at: float = 0.0  # monotonic time of its last delivery (ack latency)
    lease_until: float = 0.0  # monotonic estimate of the store lease end
    due: float = 0.0  # monotonic time of the next claim (BUSY / DELAYED)
    delivery_ids: list[str] = field(default_factory=list)
    shadows: list[Pending] = field(default_factory=list)  # later records with the same key
    chain: deque[Pending] | None = None  # its ordering chain (see ordering.py), if any
    acking: int = 0  # Ack calls in progress for it
    unsent: bool = False  # claimed, and no app was sent it under that claim's attempt yet
    scheduled: bool = False  # read from a retry topic before its due time; not claimed yet
    reason: str = ""
    reason_code: str = ""
    # Queue mode (a share group) only:
    lock_until: float = 0.0  # monotonic estimate of the end of its acquisition lock; 0: no lock
    delivery_count: int = 0  # the broker's count of its deliveries, this one included
    last_delivery: bool = False  # the broker archives it if this delivery is not answered
    reject: bool = False  # settled by a dead letter: REJECT, not ACCEPT
    span: Any = None  # its dedup.deliver span while in flight, when traced (sidecar/observability/tracing.py)

    def log_fields(self) -> dict[str, object]:
        """``extra=`` for a log call about this record (JSON logs carry them as fields)."""
        topic, partition, offset = self.coordinates()
        return {"topic": topic, "partition": partition, "offset": offset, "idempotency_key": self.idem_key}

    def coordinates(self) -> tuple[str, int, int]:
        """Topic, partition and offset as the app sees them (a retry record's source)."""
        o = self.origin
        return (o.topic, o.partition, o.offset) if o is not None else (self.tp[0], self.tp[1], self.offset)


@dataclass(slots=True)
class Partition:
    tracker: AckTracker
    generation: int
    pending: dict[int, Pending]  # offset -> record, until settled
    paused: bool = False
    progress: tuple[int, float] = (-1, 0.0)  # committable offset, and since when (stall watch)
    stalled: bool = False
    #: Ordering chains (see ordering.py): chain key -> unsettled records in offset order.
    chains: dict[object, deque[Pending]] = field(default_factory=dict)
    last_commit: float = 0.0  # monotonic time of its last commit (or assignment)
    #: Records of a retry partition waiting for their due time; the partition stays paused
    #: while there are any, so nothing is fetched past a record that is not due.
    scheduled: int = 0
    #: Read through a share group: settling a record acknowledges it; nothing is committed.
    share: bool = False


class Recent:
    """Remembers at least the last ``size`` entries put (at most twice as many), in O(1).

    Two generations: entries go into the young one; when it is full it becomes the old one and
    the previous old one is dropped. Cheaper per entry than an ordered dict evicting one by one.
    """

    __slots__ = ("_old", "_size", "_young")

    def __init__(self, size: int) -> None:
        self._size = size
        self._young: dict[str, str] = {}
        self._old: dict[str, str] = {}

    def put(self, key: str, value: str) -> None:
        young = self._young
        young[key] = value
        if len(young) >= self._size:
            self._old, self._young = young, {}

    def get(self, key: str) -> str | None:
        v = self._young.get(key)
        return v if v is not None else self._old.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._young or key in self._old
