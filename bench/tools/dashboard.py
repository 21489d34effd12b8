"""Draw the dashboard's main panels from a real run's scraped metrics: docs/DASHBOARD.png.

A Grafana server cannot run here, so this plays its part: a sidecar consumes 2,000 records/s
produced to a 6-partition topic, its app stalls for 15 s in the middle (acks stop, lag builds up)
and catches up, and /metrics is scraped every second. The panels use the same metric names and
the same arithmetic as deploy/monitoring/dashboard.json (rates over the scrape interval, p99 from
histogram buckets).

Usage: scripts/dashboard.sh [--seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from confluent_kafka import Producer
from dedup_client import DedupClient
from prometheus_client.parser import text_string_to_metric_families

from bench.common import ROOT, services

TOPIC = "dashboard"


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def total(snap: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for ls, v in snap.get(name, []) if all(ls.get(k) == v2 for k, v2 in labels.items()))


def p99(
    before: dict[str, list[tuple[dict[str, str], float]]],
    after: dict[str, list[tuple[dict[str, str], float]]],
    name: str,
) -> float:
    """histogram_quantile(0.99, increase over the interval) from two scrapes."""

    def buckets(snap: dict[str, list[tuple[dict[str, str], float]]]) -> dict[float, float]:
        b: dict[float, float] = {}
        for ls, v in snap.get(name + "_bucket", []):
            le = float(ls["le"])
            b[le] = b.get(le, 0) + v
        return b

    a, b = buckets(before), buckets(after)
    inc = sorted((le, b.get(le, 0) - a.get(le, 0)) for le in b)
    if not inc or inc[-1][1] <= 0:
        return float("nan")
    rank, prev_le, prev_n = 0.99 * inc[-1][1], 0.0, 0.0
    for le, n in inc:
        if n >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_n) / max(n - prev_n, 1e-9)
        prev_le, prev_n = le, n
    return prev_le


def produce(bootstrap: str, rate: int, seconds: float, stop: threading.Event) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    t0, i = time.monotonic(), 0
    while not stop.is_set() and time.monotonic() - t0 < seconds:
        due = int((time.monotonic() - t0) * rate)
        while i < due:
            p.produce(
                TOPIC, b"x" * 512, f"k{i % 500}".encode(), headers=[("idempotency-key", f"d-{i}".encode())]
            )
            i += 1
        p.poll(0)
        time.sleep(0.01)
    p.flush(30)


async def app(target: str, stall: tuple[float, float], t0: float, stop: asyncio.Event) -> None:
    async with DedupClient(target) as c:
        gen = c.subscribe(max_in_flight=2000)
        try:
            async for m in gen:
                now = time.monotonic() - t0
                if stall[0] <= now < stall[1]:
                    await asyncio.sleep(stall[1] - now)  # the app stalls: no acks
                m.ack()
                if stop.is_set():
                    break
        finally:
            await gen.aclose()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--out", default=str(ROOT / "docs" / "DASHBOARD.png"))
    a = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with tempfile.TemporaryDirectory() as tmp, services.running(Path(tmp)) as (kafka, redis):
        kafka.create_topic(TOPIC, 6)
        port, mport = services.free_port(), services.free_port()
        env = {
            **os.environ,
            "DEDUP_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "DEDUP_KAFKA__TOPICS": json.dumps([TOPIC]),
            "DEDUP_KAFKA__GROUP_ID": "dashboard",
            "DEDUP_KAFKA__STATISTICS_INTERVAL_MS": "1000",
            "DEDUP_STORE__BACKEND": "redis",
            "DEDUP_STORE__REDIS_URL": redis.url,
            "DEDUP_SERVER__LISTEN": f"127.0.0.1:{port}",
            "DEDUP_SERVER__METRICS_LISTEN": f"127.0.0.1:{mport}",
            "DEDUP_LOG_LEVEL": "WARNING",
        }
        sidecar = subprocess.Popen([sys.executable, "-m", "sidecar"], env=env)
        try:
            time.sleep(3)
            stop = threading.Event()
            third = a.seconds / 3
            producer = threading.Thread(target=produce, args=(kafka.bootstrap_servers, 2000, a.seconds, stop))
            t0 = time.monotonic()
            producer.start()
            rows: list[tuple[float, dict[str, list[tuple[dict[str, str], float]]]]] = []

            async def run() -> None:
                done = asyncio.Event()
                task = asyncio.create_task(app(f"127.0.0.1:{port}", (third, third + 15), t0, done))
                while time.monotonic() - t0 < a.seconds + 15:
                    rows.append((time.monotonic() - t0, await asyncio.to_thread(scrape, mport)))
                    await asyncio.sleep(1.0)
                done.set()
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

            asyncio.run(run())
            stop.set()
            producer.join()
        finally:
            sidecar.terminate()
            sidecar.wait(30)

    t = [r[0] for r in rows[1:]]
    pairs = list(itertools.pairwise(rows))

    def rate(name: str) -> list[float]:
        return [(total(b, name) - total(x, name)) / (tb - tx) for (tx, x), (tb, b) in pairs]

    fig, axes = plt.subplots(2, 2, figsize=(12, 7), sharex=True)
    axes[0][0].plot(t, [total(b, "dedup_consumer_lag_records") for _, b in rows[1:]], label="consumer lag")
    axes[0][0].plot(t, [total(b, "dedup_unsettled_records") for _, b in rows[1:]], label="unsettled")
    axes[0][0].plot(t, [total(b, "dedup_in_flight_deliveries") for _, b in rows[1:]], label="in flight")
    axes[0][0].set_title("Records (sum over partitions)")
    axes[0][1].plot(t, rate("dedup_delivered_total"), label="delivered/s")
    axes[0][1].plot(t, rate("dedup_acked_total"), label="acked/s")
    axes[0][1].set_title("Delivered and acked per second")
    axes[1][0].plot(t, [p99(x, b, "dedup_ack_latency_seconds") for (_, x), (_, b) in pairs], label="ack p99")
    axes[1][0].plot(
        t, [p99(x, b, "dedup_end_to_end_latency_seconds") for (_, x), (_, b) in pairs], label="end-to-end p99"
    )
    axes[1][0].set_yscale("log")
    axes[1][0].set_title("Latency p99, seconds")
    axes[1][1].plot(
        t, [p99(x, b, "dedup_store_request_seconds") for (_, x), (_, b) in pairs], label="store p99"
    )
    axes[1][1].plot(t, [p99(x, b, "dedup_commit_seconds") for (_, x), (_, b) in pairs], label="commit p99")
    axes[1][1].set_yscale("log")
    axes[1][1].set_title("Store round trip and commit p99, seconds")
    for ax in axes.flat:
        ax.axvspan(third, third + 15, color="grey", alpha=0.15)
        ax.legend(loc="upper left", fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("seconds (grey: the app stops acking)")
    fig.suptitle("dedup sidecar under 2,000 records/s, scraped from /metrics every second")
    fig.tight_layout()
    fig.savefig(a.out, dpi=90)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
