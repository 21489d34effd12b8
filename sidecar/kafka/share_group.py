"""A share group's settings, through the admin API: the one the sidecar applies
(``share.auto.offset.reset``) and the two it must live within (the record lock and the delivery
count limit). Blocking calls; run them in a thread."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._config import AlterConfigOpType, ConfigEntry, ConfigResource
from confluent_kafka.admin._resource import ResourceType

from sidecar.errors import ConfigError

#: The broker's default when its configuration cannot be read (KIP-932).
DEFAULT_DELIVERY_COUNT_LIMIT = 5


@dataclass(frozen=True, slots=True)
class ShareGroupLimits:
    #: share.record.lock.duration.ms of the group: how long a member holds a record it acquired.
    lock_ms: int
    #: group.share.delivery.count.limit of the broker: deliveries before the broker archives a
    #: record it was never given an answer for.
    delivery_count_limit: int
    #: Where the limit was read (a broker id), or why the default is assumed.
    limit_source: str


def prepare(
    conf: dict[str, Any], group: str, auto_offset_reset: str, timeout: float = 15.0
) -> ShareGroupLimits:
    """Set the group's ``share.auto.offset.reset`` and read its limits. Raises ConfigError with
    what to change when the cluster has no share groups or the principal may not do this."""
    admin = AdminClient(conf)
    entry = ConfigEntry(
        "share.auto.offset.reset", auto_offset_reset, incremental_operation=AlterConfigOpType.SET
    )
    resource = ConfigResource(ResourceType.GROUP, group, incremental_configs=[entry])
    try:
        for fut in admin.incremental_alter_configs([resource], request_timeout=timeout).values():
            fut.result(timeout + 5)
    except Exception as exc:
        raise ConfigError(
            f"cannot set share.auto.offset.reset on group {group!r} (kafka.share_auto_offset_reset): "
            f"{exc}. kafka.group_type = 'share' needs brokers with share groups (Apache Kafka 4.2 or "
            "later, feature share.version=1) and, with ACLs, ALTER_CONFIGS and DESCRIBE_CONFIGS on the "
            "group for the sidecar's principal"
        ) from exc
    try:
        resource = ConfigResource(ResourceType.GROUP, group)
        described = admin.describe_configs([resource], request_timeout=timeout)
        entries = next(iter(described.values())).result(timeout + 5)
        lock_ms = int(entries["share.record.lock.duration.ms"].value)
    except Exception as exc:
        raise ConfigError(
            f"cannot read share.record.lock.duration.ms of group {group!r}: {exc}. The sidecar bounds "
            "its ack deadline by it; give the sidecar's principal DESCRIBE_CONFIGS on the group"
        ) from exc
    limit, source = DEFAULT_DELIVERY_COUNT_LIMIT, "the broker's default (its configuration was not readable)"
    try:
        brokers = admin.list_topics(timeout=timeout).brokers
        broker = str(min(brokers))
        described = admin.describe_configs(
            [ConfigResource(ResourceType.BROKER, broker)], request_timeout=timeout
        )
        entries = next(iter(described.values())).result(timeout + 5)
        limit, source = int(entries["group.share.delivery.count.limit"].value), f"broker {broker}"
    except Exception:  # noqa: BLE001 - the default is what KIP-932 specifies; said in the log
        pass
    return ShareGroupLimits(lock_ms, limit, source)
