"""The topic catalog: a miss refreshes the metadata (rate-limited), a hit never does."""

from __future__ import annotations

import pytest

from sidecar.errors import KafkaUnavailable
from sidecar.kafka.topics import TopicCatalog


class Cluster:
    def __init__(self) -> None:
        self.topics = {"orders": 6}
        self.fetches = 0
        self.down = False

    def fetch(self) -> dict[str, int]:
        self.fetches += 1
        if self.down:
            raise RuntimeError("all brokers down")
        return dict(self.topics)


async def test_a_miss_refreshes_at_most_once_per_interval_and_a_new_topic_is_found() -> None:
    now = [100.0]
    cluster = Cluster()
    cat = TopicCatalog(cluster.fetch, min_refresh_s=1.0, clock=lambda: now[0])
    assert await cat.partitions(["orders", "typo"]) == {"orders": 6, "typo": None}
    assert await cat.partitions(["typo"]) == {"typo": None}
    assert cluster.fetches == 1  # the second miss came within the interval
    assert await cat.partitions(["orders"]) == {"orders": 6}
    assert cluster.fetches == 1  # a known topic needs no metadata
    cluster.topics["typo"] = 3  # created meanwhile
    now[0] += 1.5
    assert await cat.partitions(["typo"]) == {"typo": 3}
    assert cluster.fetches == 2


async def test_no_broker_is_unavailable_for_an_unseen_topic_only() -> None:
    cluster = Cluster()
    cat = TopicCatalog(cluster.fetch, min_refresh_s=0)
    await cat.partitions(["orders"])
    cluster.down = True
    assert await cat.partitions(["orders"]) == {"orders": 6}
    with pytest.raises(KafkaUnavailable, match="topic metadata"):
        await cat.partitions(["new"])
