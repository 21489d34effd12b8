"""Which topics the cluster has, from its metadata, so a typo costs one metadata round trip
instead of a produce timeout.

A topic seen once is trusted (a deleted topic still fails at produce time, as before). A topic
not seen refreshes the metadata, at most once per ``min_refresh_s`` whoever asks, so a topic
created a moment ago is found on the next call. The whole topic list is read, never one topic by
name: a metadata request that names a topic can make a broker with ``auto.create.topics.enable``
create it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

from sidecar.errors import KafkaUnavailable

Fetch = Callable[[], dict[str, int]]  # blocking: topic -> partition count


class TopicCatalog:
    def __init__(
        self, fetch: Fetch, min_refresh_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._fetch = fetch
        self._min_refresh_s = min_refresh_s
        self._clock = clock
        self._known: dict[str, int] = {}
        self._refreshed = -1e9
        self._lock = asyncio.Lock()

    def known(self, topic: str) -> int | None:
        return self._known.get(topic)

    async def partitions(self, topics: Iterable[str]) -> dict[str, int | None]:
        """Partition count per topic; None for a topic the cluster does not have. Raises
        KafkaUnavailable when a topic not seen yet needs metadata and no broker answers."""
        wanted = set(topics)
        if not wanted <= self._known.keys():
            asked = self._clock()
            async with self._lock:
                # Refresh unless a refresh began after this caller asked (it already covers us),
                # and not more often than min_refresh_s.
                if self._refreshed < asked and self._clock() - self._refreshed >= self._min_refresh_s:
                    await self.refresh()
        return {t: self._known.get(t) for t in wanted}

    async def refresh(self) -> None:
        self._refreshed = self._clock()
        try:
            found = await asyncio.to_thread(self._fetch)
        except Exception as exc:
            raise KafkaUnavailable(f"cannot read the cluster's topic metadata: {exc}") from exc
        self._known.update(found)
