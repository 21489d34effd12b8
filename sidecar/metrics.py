"""Prometheus metrics, on a registry per sidecar instance (no import-time globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.delivered = Counter("dedup_delivered_total", "Deliveries sent to app streams", registry=r)
        self.skipped = Counter(
            "dedup_skipped_total", "Records settled without delivery", ["reason"], registry=r
        )
        self.acked = Counter("dedup_acked_total", "Deliveries settled by Ack", registry=r)
        self.nacked = Counter("dedup_nacked_total", "Deliveries given back by Nack", registry=r)
        self.redelivered = Counter("dedup_redelivered_total", "Redeliveries", ["reason"], registry=r)
        self.dead_lettered = Counter("dedup_dead_lettered_total", "Records written to the DLQ", registry=r)
        self.retried = Counter(
            "dedup_retry_topic_writes_total", "Nacked records moved to a retry topic", ["tier"], registry=r
        )
        self.late_acks = Counter(
            "dedup_late_acks_total", "Completes after the claim was lost (effect happened anyway)", registry=r
        )
        self.stale_acks = Counter("dedup_stale_acks_total", "Acks for partitions revoked since", registry=r)
        self.busy = Counter("dedup_busy_claims_total", "Claims held back: another owner's lease", registry=r)
        self.store_errors = Counter("dedup_store_errors_total", "Failed store round trips", registry=r)
        self.commits = Counter("dedup_commits_total", "Offset commits", registry=r)
        self.published = Counter("dedup_published_total", "Publish results", ["outcome"], registry=r)
        self.streams = Gauge("dedup_streams", "Open Subscribe streams", registry=r)
        self.assigned_partitions = Gauge("dedup_assigned_partitions", "Partitions assigned", registry=r)
        self.paused_partitions = Gauge("dedup_paused_partitions", "Partitions paused by bounds", registry=r)
        self.stalled_partitions = Gauge(
            "dedup_stalled_partitions",
            "Partitions whose committable offset has not moved for 2x (ack deadline + lease margin), "
            "at least 60 s, with records unsettled",
            registry=r,
        )
        self.local_store_shared_group = Gauge(
            "dedup_local_store_shared_group",
            "1 when a local (memory/sqlite) store is used in a group with other members: a correctness hole",
            registry=r,
        )
