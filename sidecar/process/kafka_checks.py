"""Kafka-side checks at start-up and while running: retry topics that must exist, a share
group's limits the settings must fit in, and a local store in a group that turns out to be
shared."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from prometheus_client import Gauge

from sidecar.config import Settings
from sidecar.errors import ConfigError, KafkaUnavailable
from sidecar.kafka import share_group
from sidecar.kafka.consumer import ConsumerLoop
from sidecar.kafka.share_group import ShareGroupLimits
from sidecar.kafka.topics import TopicCatalog
from sidecar.store.base import DedupStore

log = logging.getLogger(__name__)


def admin_config(consumer_conf: dict[str, Any]) -> dict[str, Any]:
    """An admin client's configuration: the consumer's, less what only a consumer takes."""
    skip = ("group.id", "session.timeout.ms", "stats_cb", "statistics.interval.ms", "group.protocol")
    return {k: v for k, v in consumer_conf.items() if k not in skip}


async def prepare_share_group(s: Settings, consumer_conf: dict[str, Any]) -> ShareGroupLimits:
    """Queue mode: apply kafka.share_auto_offset_reset to the group and check that the ack
    deadline fits in the group's record lock. Raises ConfigError naming both settings."""
    k, d = s.kafka, s.delivery
    limits = await asyncio.to_thread(
        share_group.prepare, admin_config(consumer_conf), k.group_id, k.share_auto_offset_reset
    )
    if d.ack_deadline_seconds * 1000 > limits.lock_ms:
        raise ConfigError(
            f"delivery.ack_deadline_seconds = {d.ack_deadline_seconds:g} is longer than the record lock of "
            f"share group {k.group_id!r} (share.record.lock.duration.ms = {limits.lock_ms}): the broker "
            "would hand a record to another member while its app still works on it. Set "
            f"delivery.ack_deadline_seconds to at most {limits.lock_ms // 1000}, or raise the group's "
            "share.record.lock.duration.ms (kafka-configs.sh --alter --entity-type groups; the broker's "
            "group.share.max.record.lock.duration.ms caps it)"
        )
    if d.max_attempts > limits.delivery_count_limit:
        log.warning(
            "delivery.max_attempts = %d is above the share group's delivery count limit "
            "(group.share.delivery.count.limit = %d, from %s): a record is dead-lettered at its last "
            "delivery by the broker instead, with reason delivery-count",
            d.max_attempts,
            limits.delivery_count_limit,
            limits.limit_source,
        )
    log.info(
        "share group %s: share.auto.offset.reset=%s, record lock %d ms, delivery count limit %d (%s)",
        k.group_id,
        k.share_auto_offset_reset,
        limits.lock_ms,
        limits.delivery_count_limit,
        limits.limit_source,
    )
    return limits


async def ensure_retry_topics(s: Settings, consumer_conf: dict[str, Any], sources: dict[str, str]) -> None:
    """Create the retry topics that are missing (``delivery.retry_create_topics``), each like
    its source topic: the same partition count and replication factor. ``sources``: each retry
    topic's source topic."""
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    admin = AdminClient(admin_config(consumer_conf))
    meta = await asyncio.to_thread(admin.list_topics, timeout=15)
    missing = [t for t in sources if t not in meta.topics]
    if not missing:
        return
    if not s.delivery.retry_create_topics:
        raise ConfigError(
            f"retry topics {missing} do not exist: create them, or set "
            "delivery.retry_create_topics = true so the sidecar does"
        )
    new = []
    for name in missing:
        src = meta.topics.get(sources[name])
        if src is None or not src.partitions:
            raise ConfigError(
                f"cannot create retry topic {name!r}: its source topic {sources[name]!r} "
                "(kafka.topics) does not exist"
            )
        rf = len(next(iter(src.partitions.values())).replicas)
        new.append(NewTopic(name, len(src.partitions), rf))
    for name, fut in admin.create_topics(new, request_timeout=15).items():
        try:
            await asyncio.to_thread(fut.result, 20)
            log.info("created retry topic %s", name)
        except Exception as exc:
            if "TOPIC_ALREADY_EXISTS" in str(exc):
                continue
            raise ConfigError(
                f"cannot create retry topic {name!r} ({exc}); create it, or give the sidecar's "
                "principal CREATE on it (delivery.retry_create_topics)"
            ) from exc
    # Metadata spreads to the brokers asynchronously: subscribe once every partition has a leader.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        meta = await asyncio.to_thread(admin.list_topics, timeout=5)
        if all(meta.topics.get(t) is not None and not meta.topics[t].error for t in missing):
            break
        await asyncio.sleep(0.1)


async def watch_group(
    group: str,
    consumer: ConsumerLoop,
    store: DedupStore,
    catalog: TopicCatalog,
    topics: list[str],
    shared_gauge: Gauge,
) -> None:
    """A local store cannot fence other members: detect a shared group and say so loudly.

    The sign is this member's assignment: while it holds fewer partitions of its topics than
    they have, another member holds the rest. Three looks in a row, 3 s apart, so a
    rebalance in progress is not taken for one. (This asked DescribeGroups before; librdkafka
    aborts the whole process when such a request to a dead coordinator times out, its issue
    4605, and a check that only advises must not be able to do that.)"""
    warned = False
    looks = 0
    while True:
        await asyncio.sleep(3.0)
        try:
            counts = await catalog.partitions(topics)
        except KafkaUnavailable:
            continue
        total = sum(n or 0 for n in counts.values())
        held = consumer.assigned_count
        looks = looks + 1 if consumer.subscribed and held < total else 0
        shared = looks >= 3
        shared_gauge.set(1 if shared else 0)
        if shared and not warned:
            log.error(
                "CORRECTNESS HOLE: another member of group %r holds %d of the %d partitions of %s, but "
                "store.backend=%s is local to this process; after a rebalance another member cannot "
                "see which keys were processed here. Use store.backend=redis for more than one replica",
                group,
                total - held,
                total,
                ", ".join(topics),
                store.name,
            )
            warned = True
        elif not shared and looks == 0:
            warned = False
