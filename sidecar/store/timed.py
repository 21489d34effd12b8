"""A dedup store wrapper that times every round trip into ``dedup_store_request_seconds{op}``,
and tells the store's Outage (sidecar/observability/outage.py) of each failure and answer.

Every store call carries a batch, so one observation per call costs nothing per record."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Sequence
from typing import TypeVar

from prometheus_client import Histogram

from sidecar.errors import StoreUnavailable
from sidecar.observability.outage import Outage
from sidecar.store.base import Claim, ClaimMode, DedupStore, KeyInfo, PublishRecord

T = TypeVar("T")


class TimedStore:
    def __init__(self, inner: DedupStore, seconds: Histogram, outage: Outage | None = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.shared = inner.shared
        self._timers = {op: seconds.labels(op) for op in _OPS}
        self._outage = outage

    async def _timed(self, op: str, call: Awaitable[T]) -> T:
        t0 = time.perf_counter()
        try:
            result = await call
        except StoreUnavailable as exc:
            if self._outage is not None:
                self._outage.failed(str(exc))
            raise
        finally:
            self._timers[op].observe(time.perf_counter() - t0)
        if self._outage is not None:
            self._outage.answered()
        return result

    async def claim(
        self, keys: Sequence[str], owner: str, lease_ms: int, mode: ClaimMode = ClaimMode.CLAIM
    ) -> list[Claim]:
        return await self._timed("claim", self.inner.claim(keys, owner, lease_ms, mode))

    async def complete(self, keys: Sequence[str], owner: str, retention_ms: int) -> list[int]:
        return await self._timed("complete", self.inner.complete(keys, owner, retention_ms))

    async def release(
        self, keys: Sequence[str], owner: str, delivered: bool = True, failed: bool = False
    ) -> list[bool]:
        return await self._timed("release", self.inner.release(keys, owner, delivered, failed))

    async def publish_begin(
        self, keys: Sequence[str], owner: str, lease_ms: int
    ) -> list[PublishRecord | Claim]:
        return await self._timed("publish_begin", self.inner.publish_begin(keys, owner, lease_ms))

    async def publish_finish(
        self, entries: Sequence[tuple[str, PublishRecord | None]], owner: str, retention_ms: int
    ) -> list[PublishRecord | None]:
        return await self._timed("publish_finish", self.inner.publish_finish(entries, owner, retention_ms))

    async def purge(self) -> int:
        return await self._timed("purge", self.inner.purge())

    async def inspect(self, key: str, publish_key: str) -> KeyInfo:
        return await self.inner.inspect(key, publish_key)

    async def ping(self) -> None:
        await self._timed("ping", self.inner.ping())

    async def close(self) -> None:
        await self.inner.close()


_OPS = ("claim", "complete", "release", "publish_begin", "publish_finish", "purge", "ping")
