"""In-memory dedup store: for tests and demos. State is lost when the process exits."""

from __future__ import annotations

from collections.abc import Sequence

from sidecar.store import rules
from sidecar.store.base import (
    Claim,
    ClaimMode,
    Clock,
    KeyInfo,
    PublishRecord,
    publish_claim_key,
    wall_clock_ms,
)


class MemoryStore:
    """A dict behind the DedupStore protocol.

    Parameters:
        clock: epoch-milliseconds source (tests pass a fake one).
        retention_ms: how long a claimed key is remembered (done keys use the complete's retention).
    """

    name = "memory"
    shared = False

    def __init__(self, clock: Clock = wall_clock_ms, retention_ms: int = 7 * 86_400_000) -> None:
        self._clock = clock
        self._retention_ms = retention_ms
        self._keys: dict[str, rules.Entry] = {}
        self._published: dict[str, tuple[PublishRecord, int]] = {}

    async def claim(
        self, keys: Sequence[str], owner: str, lease_ms: int, mode: ClaimMode = ClaimMode.CLAIM
    ) -> list[Claim]:
        now = self._clock()
        out = []
        for key in keys:
            result, self._keys[key] = rules.claim(
                self._keys.get(key), owner, now, lease_ms, self._retention_ms, mode
            )
            out.append(result)
        return out

    async def complete(self, keys: Sequence[str], owner: str, retention_ms: int) -> list[int]:
        now = self._clock()
        out = []
        for key in keys:
            late, self._keys[key] = rules.complete(self._keys.get(key), owner, now, retention_ms)
            out.append(late)
        return out

    async def release(
        self, keys: Sequence[str], owner: str, delivered: bool = True, failed: bool = False
    ) -> list[bool]:
        now = self._clock()
        out = []
        for key in keys:
            released, _ = rules.release(self._keys.get(key), owner, now, delivered, failed)
            out.append(released)
        return out

    async def inspect(self, key: str, publish_key: str) -> KeyInfo:
        now = self._clock()
        return rules.describe(self._keys.get(key), now, self._live_record(publish_key, now))

    def _live_record(self, key: str, now: int) -> PublishRecord | None:
        got = self._published.get(key)
        if got is None or got[1] <= now:
            return None
        return got[0]

    async def publish_begin(
        self, keys: Sequence[str], owner: str, lease_ms: int
    ) -> list[PublishRecord | Claim]:
        now = self._clock()
        out: list[PublishRecord | Claim] = []
        for key in keys:
            found = self._live_record(key, now)
            if found is not None:
                out.append(found)
                continue
            claim_key = publish_claim_key(key)
            claim, self._keys[claim_key] = rules.claim(
                self._keys.get(claim_key), owner, now, lease_ms, self._retention_ms
            )
            out.append(claim)
        return out

    async def publish_finish(
        self, entries: Sequence[tuple[str, PublishRecord | None]], owner: str, retention_ms: int
    ) -> list[PublishRecord | None]:
        now = self._clock()
        out = []
        for key, record in entries:
            existing = self._live_record(key, now)
            if existing is None and record is not None:
                self._published[key] = (record, now + retention_ms)
            out.append(existing or record)
            rules.release(self._keys.get(publish_claim_key(key)), owner, now)
        return out

    async def purge(self) -> int:
        now = self._clock()
        dead = [k for k, e in self._keys.items() if e.expires <= now]
        for k in dead:
            del self._keys[k]
        dead_pub = [k for k, (_, exp) in self._published.items() if exp <= now]
        for k in dead_pub:
            del self._published[k]
        return len(dead) + len(dead_pub)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
