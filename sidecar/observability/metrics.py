"""Prometheus metrics, on a registry per sidecar instance (no import-time globals).

Counters and histograms are updated where things happen; gauges of the engine's state (unsettled
records, in-flight deliveries, time since a partition's last commit, consumer lag) are read when
Prometheus scrapes, by ``EngineCollector``. docs/OPERATIONS.md has the table of every name.

Per-record latencies go to ``FastHistogram``: plain bucket counts updated on the event loop and
turned into a histogram at scrape time. prometheus-client's Histogram takes a lock and searches
its buckets on every ``observe``; at tens of thousands of records a second that was measurable.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

#: Seconds: from a millisecond to ten minutes (ack deadlines reach 600 s).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 600)
#: Seconds: store round trips and commits.
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class FastHistogram(Collector):
    """A histogram fed in batches on one thread (the event loop), read at scrape time."""

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        labelnames: Sequence[str] = (),
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = list(buckets)
        self.labelnames = list(labelnames)
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}  # counts, [sum]
        if registry is not None:
            registry.register(self)

    def _get(self, labels: tuple[str, ...]) -> tuple[list[int], list[float]]:
        s = self._series.get(labels)
        if s is None:
            s = self._series[labels] = ([0] * (len(self.bounds) + 1), [0.0])
        return s

    def observe(self, value: float, n: int = 1, labels: tuple[str, ...] = ()) -> None:
        counts, total = self._get(labels)
        counts[bisect.bisect_left(self.bounds, value)] += n
        total[0] += value * n

    def observe_many(self, values: Iterable[float], labels: tuple[str, ...] = ()) -> None:
        counts, total = self._get(labels)
        bounds, find, s = self.bounds, bisect.bisect_left, 0.0
        for v in values:
            counts[find(bounds, v)] += 1
            s += v
        total[0] += s

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, (counts, total) in list(self._series.items()):
            running, buckets = 0, []
            for bound, c in zip([*map(str, self.bounds), "+Inf"], list(counts), strict=True):
                running += c
                buckets.append((bound, running))
            family.add_metric(list(labels), buckets, total[0])
        yield family


def count_by_topic(counter: Counter, records: Sequence[Any], *labels: str) -> None:
    """``counter.labels(*labels, topic).inc()`` for each record (one call per topic)."""
    if not records:
        return
    first = records[0].topic
    if all(p.topic == first for p in records):
        counter.labels(*labels, first).inc(len(records))
        return
    counts: dict[str, int] = {}
    for p in records:
        counts[p.topic] = counts.get(p.topic, 0) + 1
    for topic, n in counts.items():
        counter.labels(*labels, topic).inc(n)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.delivered = Counter(
            "dedup_delivered_total", "Deliveries sent to app streams", ["topic"], registry=r
        )
        self.skipped = Counter(
            "dedup_skipped_total", "Records settled without delivery", ["reason", "topic"], registry=r
        )
        self.acked = Counter("dedup_acked_total", "Deliveries settled by Ack", ["topic"], registry=r)
        self.nacked = Counter("dedup_nacked_total", "Deliveries given back by Nack", ["topic"], registry=r)
        self.redelivered = Counter("dedup_redelivered_total", "Redeliveries", ["reason", "topic"], registry=r)
        self.dead_lettered = Counter(
            "dedup_dead_lettered_total", "Records written to the DLQ", ["topic", "reason"], registry=r
        )
        self.retried = Counter(
            "dedup_retry_topic_writes_total", "Nacked records moved to a retry topic", ["tier"], registry=r
        )
        self.late_acks = Counter(
            "dedup_late_acks_total", "Completes after the claim was lost (effect happened anyway)", registry=r
        )
        self.ack_fence_waits = Counter(
            "dedup_ack_fence_waits_total",
            "Late Acks answered only once another sidecar's live claim on one of their keys ended",
            registry=r,
        )
        self.stale_acks = Counter("dedup_stale_acks_total", "Acks for partitions revoked since", registry=r)
        self.busy = Counter("dedup_busy_claims_total", "Claims held back: another owner's lease", registry=r)
        self.store_errors = Counter("dedup_store_errors_total", "Failed store round trips", registry=r)
        self.dependency_failures = Counter(
            "dedup_dependency_failures_total",
            "Failures reaching a dependency: Kafka (connections, as librdkafka reports them) or the store",
            ["dependency"],
            registry=r,
        )
        self.commits = Counter("dedup_commits_total", "Offset commits", registry=r)
        self.rebalances = Counter(
            "dedup_rebalances_total", "Partitions assigned, revoked or lost", ["event"], registry=r
        )
        self.published = Counter("dedup_published_total", "Publish results", ["outcome"], registry=r)
        self.group_runs = Counter(
            "dedup_group_commit_runs_total",
            "Group commits run for concurrent unary and stream calls (ack: settlements; publish: batches)",
            ["path"],
            registry=r,
        )
        self.group_items = Counter(
            "dedup_group_commit_items_total",
            "Ids (ack) or records (publish) carried by group commits; over runs: the mean group size",
            ["path"],
            registry=r,
        )
        self.streams = Gauge("dedup_streams", "Open Subscribe and StreamingSubscribe streams", registry=r)
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
        self.share_acks = Counter(
            "dedup_share_acknowledgements_total",
            "Queue mode: acknowledgements handed to the share group (accept, release, reject)",
            ["type"],
            registry=r,
        )
        self.share_delivery_count = Histogram(
            "dedup_share_delivery_count",
            "Queue mode: the broker's delivery count of each record taken in (1: first delivery)",
            buckets=(1, 2, 3, 4, 5, 7, 10),
            registry=r,
        )
        self.share_refused = Counter(
            "dedup_share_refused_acknowledgements_total",
            "Queue mode: acknowledgements the broker refused (the record's lock had run out)",
            registry=r,
        )
        self.ack_latency = FastHistogram(
            "dedup_ack_latency_seconds",
            "From a delivery sent to its Ack received",
            LATENCY_BUCKETS,
            registry=r,
        )
        self.end_to_end_latency = FastHistogram(
            "dedup_end_to_end_latency_seconds",
            "From the record's Kafka timestamp to its Ack received",
            LATENCY_BUCKETS,
            registry=r,
        )
        self.publish_seconds = FastHistogram(
            "dedup_publish_seconds",
            "Publish and PublishBatch entries: from the call to its answer",
            LATENCY_BUCKETS,
            ["outcome"],
            registry=r,
        )
        self.store_seconds = Histogram(
            "dedup_store_request_seconds",
            "Dedup store round trips",
            ["op"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.commit_seconds = Histogram(
            "dedup_commit_seconds",
            "Offset commits, call to broker answer",
            buckets=REQUEST_BUCKETS,
            registry=r,
        )


class EngineView(Protocol):
    """What EngineCollector reads (sidecar.engine.engine.Engine)."""

    def partition_gauges(self) -> list[tuple[str, int, int, float]]: ...

    @property
    def in_flight(self) -> int: ...

    @property
    def share_held(self) -> int | None: ...


class EngineCollector(Collector):
    """Gauges read from the engine when Prometheus scrapes (on the HTTP server's thread; the
    engine's dicts are copied with one C-level call each, so a scrape never sees them change)."""

    def __init__(self, engine: EngineView, lag: Callable[[], dict[tuple[str, int], int]]) -> None:
        self._engine = engine
        self._lag = lag

    def collect(self) -> Iterator[GaugeMetricFamily]:
        unsettled = GaugeMetricFamily(
            "dedup_unsettled_records", "Records taken in and not settled yet", labels=["topic", "partition"]
        )
        since = GaugeMetricFamily(
            "dedup_seconds_since_commit",
            "Seconds since the partition's last successful commit (or its assignment)",
            labels=["topic", "partition"],
        )
        lag = GaugeMetricFamily(
            "dedup_consumer_lag_records",
            "Log end offset minus the committed offset (librdkafka statistics, every "
            "kafka.statistics_interval_ms)",
            labels=["topic", "partition"],
        )
        now = time.monotonic()
        assigned: set[tuple[str, int]] = set()
        for topic, partition, n, last_commit in self._engine.partition_gauges():
            labels = [topic, str(partition)]
            assigned.add((topic, partition))
            unsettled.add_metric(labels, n)
            since.add_metric(labels, now - last_commit)
        for (topic, partition), n in self._lag().items():
            if (topic, partition) in assigned:
                lag.add_metric([topic, str(partition)], n)
        yield unsettled
        yield since
        yield lag
        yield GaugeMetricFamily(
            "dedup_in_flight_deliveries",
            "Deliveries sent to apps and not answered",
            value=self._engine.in_flight,
        )
        held = self._engine.share_held
        if held is not None:
            yield GaugeMetricFamily(
                "dedup_share_held_records",
                "Queue mode: records this member acquired from the share group and has not "
                "acknowledged (at most kafka.share_max_poll_records)",
                value=held,
            )


def group_counter(metrics: Metrics, path: str) -> Callable[[int], None]:
    """``GroupCommit``'s ``on_run`` for ``path``: counts the run and the items it carries."""
    runs, items = metrics.group_runs.labels(path), metrics.group_items.labels(path)

    def on_run(n: int) -> None:
        runs.inc()
        items.inc(n)

    return on_run
