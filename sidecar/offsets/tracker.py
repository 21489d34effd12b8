"""AckTracker: which offsets of one partition are settled, and what may be committed.

The tracker is offered offsets in fetch order and told, in any order, which of them are settled
(acked, skipped as duplicates, or dead-lettered). Kafka commits "the next offset to read", so the
committable offset is the lowest offered offset that is not settled yet, or one past the highest
offered offset when all are settled.

It also decides flow control: past ``max_unsettled`` unsettled records the partition should be
paused, and resumed once they fall to ``resume_at``. The tracker only reports; the consumer acts.

Example::

    t = AckTracker(max_unsettled=2, resume_at=1)
    t.offer(10); t.offer(11); t.offer(12)
    t.settle(11)
    t.committable()      # 10: offset 10 is still unsettled
    t.settle(10)
    t.committable()      # 12
"""

from __future__ import annotations

from collections import deque
from enum import Enum

from sidecar.offsets.metadata import DEFAULT_LIMIT, decode_settled, encode_settled


class OfferResult(Enum):
    """What the caller should do with an offered record."""

    PENDING = "pending"  # deliver it (or decide about it); settle it later
    ALREADY_SETTLED = "already_settled"  # the commit metadata says it was settled: skip it
    IGNORED = "ignored"  # at or below what is already committed, or re-offered: drop it


class AckTracker:
    """Settled-offset bookkeeping for one partition. Not thread-safe; no I/O.

    Parameters:
        max_unsettled: unsettled count above which :attr:`should_pause` becomes true.
        resume_at: unsettled count at or below which a paused partition should resume.
        committed: the offset committed in Kafka when the partition was assigned (-1 if none).
        metadata: that commit's metadata string; settled offsets recorded there are honoured.
    """

    __slots__ = (
        "_committed",
        "_entries",
        "_high",
        "_max_unsettled",
        "_paused",
        "_presettled",
        "_resume_at",
        "_settled",
        "_unsettled",
    )

    def __init__(
        self,
        max_unsettled: int = 10_000,
        resume_at: int | None = None,
        committed: int = -1,
        metadata: str | None = None,
    ) -> None:
        if max_unsettled < 1:
            raise ValueError("max_unsettled must be at least 1")
        self._max_unsettled = max_unsettled
        self._resume_at = max_unsettled // 2 if resume_at is None else min(resume_at, max_unsettled)
        self._entries: deque[int] = deque()  # offered, not yet below the committable offset
        self._settled: set[int] = set()  # settled offsets still in _entries
        self._unsettled = 0
        self._committed = committed  # last offset reported as committed
        self._high = committed - 1  # highest offered (or committed - 1)
        self._presettled = decode_settled(committed, metadata) if committed >= 0 else frozenset()
        self._paused = False

    # -- feeding ------------------------------------------------------------------------------

    def offer(self, offset: int) -> OfferResult:
        """Record that ``offset`` was fetched. Offsets must arrive in increasing order."""
        if offset <= self._high or (self._committed >= 0 and offset < self._committed):
            return OfferResult.IGNORED
        self._high = offset
        self._entries.append(offset)
        if offset in self._presettled:
            self._settled.add(offset)
            self._advance()
            return OfferResult.ALREADY_SETTLED
        self._unsettled += 1
        if self._unsettled > self._max_unsettled:
            self._paused = True
        return OfferResult.PENDING

    def settle(self, offset: int) -> bool:
        """Mark ``offset`` settled. Returns False if it was not pending (unknown or settled twice)."""
        if offset in self._settled or not self._entries or offset < self._entries[0] or offset > self._high:
            return False
        # Offsets are offered in order; membership is checked via the settled set and bounds, and
        # an offset that was never offered (a gap) must not count.
        if not self._is_offered(offset):
            return False
        self._settled.add(offset)
        self._unsettled -= 1
        self._advance()
        if self._paused and self._unsettled <= self._resume_at:
            self._paused = False
        return True

    def _is_offered(self, offset: int) -> bool:
        # Fast path: offered offsets are usually contiguous.
        entries = self._entries
        first = entries[0]
        idx = offset - first
        if idx < len(entries) and entries[idx] == offset:
            return True
        # Gaps (compaction, transaction markers): binary search in the deque.
        lo, hi = 0, len(entries) - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            v = entries[mid]
            if v == offset:
                return True
            if v < offset:
                lo = mid + 1
            else:
                hi = mid - 1
        return False

    def _advance(self) -> None:
        entries, settled = self._entries, self._settled
        while entries and entries[0] in settled:
            settled.discard(entries.popleft())

    # -- reading ------------------------------------------------------------------------------

    def committable(self) -> int:
        """The offset to commit: the lowest unsettled offered offset, else one past the highest.

        Returns -1 when nothing was ever offered or committed.
        """
        if self._entries:
            return self._entries[0]
        if self._high >= 0:
            return self._high + 1
        return self._committed

    def commit_metadata(self, limit: int = DEFAULT_LIMIT) -> str:
        """Metadata to commit with :meth:`committable`: the settled offsets above it."""
        return encode_settled(self.committable(), self._settled, limit)

    def mark_committed(self, offset: int) -> None:
        """Remember that ``offset`` was committed, so :meth:`needs_commit` can say when it moved."""
        self._committed = max(self._committed, offset)

    def needs_commit(self) -> bool:
        return self.committable() > self._committed

    @property
    def committed(self) -> int:
        return self._committed

    @property
    def unsettled(self) -> int:
        return self._unsettled

    @property
    def should_pause(self) -> bool:
        """True from the moment unsettled exceeds ``max_unsettled`` until it falls to ``resume_at``."""
        return self._paused

    def is_settled(self, offset: int) -> bool:
        """True if ``offset`` is known settled (below the committable point, or settled above it)."""
        if offset in self._settled:
            return True
        return offset < self.committable() and offset <= self._high
