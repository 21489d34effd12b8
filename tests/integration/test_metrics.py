"""/metrics of a running sidecar under load: every documented name is there with values that
follow what happened (lag rises while acks are held back and falls to zero once the app catches
up; histograms have counts; counters carry the topic)."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request

import services
from dedup_client import DedupClient
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.helpers import ROOT, Inbox, raw_produce, running_sidecar, settings_dict, unique


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def names(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> set[str]:
    return {n for n, _ in samples}


def exposed(port: int) -> set[str]:
    """Every series name /metrics can show, also for families with no sample yet."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: set[str] = set()
    for family in text_string_to_metric_families(text):
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum", "")}.get(
            family.type, ("",)
        )
        out.update(family.name + s for s in suffixes)
    return out


def used_in_deploy_monitoring() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "deploy" / "monitoring").iterdir():
        if path.suffix in (".yaml", ".json") and ".test." not in path.name:
            found.update(re.findall(r"\bdedup_[a-z_]+", path.read_text()))
    return found


async def test_metrics_follow_a_run(kafka: services.KafkaBroker) -> None:
    topic, out = unique("metrics"), unique("out")
    kafka.create_topic(topic, 2)
    kafka.create_topic(out, 1)
    raw_produce(kafka, topic, [(f"k{i}", b"x" * 100, i % 2) for i in range(1000)])
    cfg = settings_dict(kafka, [topic], unique("g"))
    cfg["server"]["metrics_listen"] = f"127.0.0.1:{services.free_port()}"
    cfg["kafka"]["statistics_interval_ms"] = 300
    async with running_sidecar(**cfg) as sc, DedupClient(f"127.0.0.1:{sc.port}") as c:
        port = sc.metrics_port
        async with Inbox(c) as inbox:
            got = await inbox.wait(1000)
            m = scrape(port)
            assert total(m, "dedup_in_flight_deliveries") == 1000
            assert total(m, "dedup_unsettled_records", topic=topic) == 1000
            first, rest = got[:100], got[100:]
            await c.ack_many([x.delivery_id for x in first])

            async def lag_becomes(want: float) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
                deadline = time.monotonic() + 20
                while True:
                    m = scrape(port)
                    if (
                        "dedup_consumer_lag_records" in names(m)
                        and total(m, "dedup_consumer_lag_records", topic=topic) == want
                    ):
                        return m
                    assert time.monotonic() < deadline, {k: v for k, v in m.items() if "lag" in k[0]}
                    await asyncio.sleep(0.2)

            # 100 acked, each partition's prefix committed: the rest is lag.
            acked_per_partition = {p: sum(1 for x in first if x.partition == p) for p in (0, 1)}
            await lag_becomes(1000 - sum(acked_per_partition.values()))
            await c.ack_many([x.delivery_id for x in rest])
            m = await lag_becomes(0)
        await c.publish(out, b"out", idempotency_key=unique("pub"))
        m = scrape(port)
        available = exposed(port)
    assert total(m, "dedup_delivered_total", topic=topic) == 1000
    assert total(m, "dedup_acked_total", topic=topic) == 1000
    assert total(m, "dedup_unsettled_records", topic=topic) == 0
    assert total(m, "dedup_in_flight_deliveries") == 0
    assert total(m, "dedup_ack_latency_seconds_count") == 1000
    assert total(m, "dedup_end_to_end_latency_seconds_count") == 1000
    assert total(m, "dedup_ack_latency_seconds_bucket", le="+Inf") == 1000
    assert total(m, "dedup_store_request_seconds_count", op="claim") >= 1
    assert total(m, "dedup_store_request_seconds_count", op="complete") >= 2
    assert total(m, "dedup_commit_seconds_count") >= 1
    assert total(m, "dedup_publish_seconds_count", outcome="ok") == 1
    assert total(m, "dedup_rebalances_total", event="assigned") == 2
    assert 0 <= total(m, "dedup_seconds_since_commit", topic=topic, partition="0") < 30
    documented = {
        "dedup_consumer_lag_records",
        "dedup_unsettled_records",
        "dedup_in_flight_deliveries",
        "dedup_ack_latency_seconds_count",
        "dedup_end_to_end_latency_seconds_count",
        "dedup_store_request_seconds_count",
        "dedup_commit_seconds_count",
        "dedup_publish_seconds_count",
        "dedup_delivered_total",
        "dedup_acked_total",
        "dedup_rebalances_total",
        "dedup_seconds_since_commit",
    }
    assert documented <= names(m), documented - names(m)
    # The dashboard and the alert rules only use names a sidecar exposes.
    used = used_in_deploy_monitoring()
    assert len(used) > 10
    assert used <= available, f"deploy/monitoring uses names no sidecar exposes: {sorted(used - available)}"
