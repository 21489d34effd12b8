"""The in-memory life of one fetched record, from intake until it is settled."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidecar.engine.streams import Stream

TP = tuple[str, int]


class State(Enum):
    CLAIMING = "claiming"  # waiting for the store's answer
    READY = "ready"  # claimed, queued for a stream
    IN_FLIGHT = "in_flight"  # sent to an app stream, waiting for Ack/Nack/deadline
    DELAYED = "delayed"  # nacked; redelivered after a delay
    BUSY = "busy"  # another sidecar holds the key's lease; claim again later
    SHADOWED = "shadowed"  # an earlier record with the same key is pending here
    DEAD_LETTERING = "dead_lettering"  # being written to the DLQ
    SETTLED = "settled"
    DROPPED = "dropped"  # partition revoked before it settled


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
    attempt: int = 0
    state: State = State.CLAIMING
    stream: Stream | None = None
    deadline: float = 0.0  # monotonic ack deadline while in flight
    lease_until: float = 0.0  # monotonic estimate of the store lease end
    due: float = 0.0  # monotonic time of the next claim (BUSY / DELAYED)
    delivery_ids: list[str] = field(default_factory=list)
    shadows: list[Pending] = field(default_factory=list)  # later records with the same key
    acking: int = 0  # Ack calls in progress for it
    unsent: bool = False  # claimed, and no app was sent it under that claim's attempt yet
    reason: str = ""
