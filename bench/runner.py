"""The full benchmark: the sidecar against the raw confluent-kafka client, in one run, same data.

Usage (scripts/bench.sh wraps it)::

    python -m bench [--records 200000] [--quick] [--out docs/BENCHMARKS.md]

It starts a real Kafka broker and Redis (deploy/local/services), preloads topics with 1 KB
records that carry unique idempotency keys, and measures, on the same machine and data:

* consume: a raw consumer committing every 1,000 records (baseline, no dedup) vs the sidecar
  with the Redis store and the batched client (Python; and Go, when Go is installed), the
  per-message unary client, and the SQLite store;
* publish: PublishBatch and Publish vs a raw idempotent producer, and two bounds that leave the
  store, then Kafka, out (bench/ceiling.py);
* latency: produce-to-app p50/p99 at a fixed rate, sidecar vs raw consumer;
* memory: sidecar RSS at start and after every record was processed;
* scaling: 1, 6 and 48 partitions; one sidecar replica and three.

Results go to JSON (bench/results.json), a markdown table and a PNG plot in docs/. Absolute
numbers drift on shared machines; the ratios to the baseline of the same run are what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import ROOT, SERVICE_PIDS, UNARY_WINDOW, Result, log, machine, medians, preload, services
from bench.report import plot, write_markdown
from bench.scenarios.consume import go_consumer, raw_consume, sidecar_consume
from bench.scenarios.latency import latency
from bench.scenarios.publish import CEILINGS, raw_publish, sidecar_publish
from bench.scenarios.scaling import cluster_rows, pair_round, summarize_pairs, workers_rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=200_000, help="records per consume measurement")
    ap.add_argument("--memory-records", type=int, default=1_000_000, help="records for the RSS measurement")
    ap.add_argument("--quick", action="store_true", help="small sizes, to check the harness works")
    ap.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    ap.add_argument(
        "--render-only", action="store_true", help="redraw the markdown and plot from bench/results.json"
    )
    ap.add_argument(
        "--cluster",
        action="store_true",
        help="only the rows on a three-broker cluster (RF 3, acks=all): update bench/results.json and redraw",
    )
    args = ap.parse_args()
    if args.cluster:
        return cluster_main(args)
    if args.render_only:
        saved = json.loads((ROOT / "bench" / "results.json").read_text())
        png = Path(args.out).with_suffix(".png")
        write_markdown(saved, Path(args.out), png.name if plot(saved, png) else None)
        return 0
    n = 20_000 if args.quick else args.records
    n_mem = 40_000 if args.quick else args.memory_records
    n_unary = max(2_000, n // 20)
    n_pub = max(5_000, n // 2)  # several seconds for the sidecar: a steady rate, not a start-up
    results: dict[str, Any] = {
        "machine": machine(),
        "records": n,
        "command": " ".join(["scripts/bench.sh", *sys.argv[1:]]),
    }
    with (
        tempfile.TemporaryDirectory(prefix="dedup-bench-") as tmp,
        services.running(Path(tmp), quick_start=False) as (kafka, redis),
    ):
        work = Path(tmp)
        SERVICE_PIDS["broker"] = kafka.proc.pid
        if isinstance(redis, services.RedisServer):
            SERVICE_PIDS["redis"] = redis.proc.pid
        redis_store = {"DEDUP_STORE__BACKEND": "redis", "DEDUP_STORE__REDIS_URL": redis.url}
        sqlite_store = {
            "DEDUP_STORE__BACKEND": "sqlite",
            "DEDUP_STORE__SQLITE_PATH": str(work / "bench.db"),
            "DEDUP_STORE__SQLITE_SYNCHRONOUS": "NORMAL",
        }
        log(f"preloading {n} x 1 KB records into 6 partitions")
        preload(kafka, "bench6", 6, n, "b6")
        consume: list[Result] = []
        log("baseline: raw consumer")
        base = raw_consume(kafka, "bench6", n)
        consume.append(base)
        log("sidecar, redis store, batched client")
        consume.append(
            sidecar_consume(kafka, "bench6", n, redis_store, work, "sidecar, Redis store, batched acks")
        )
        log("sidecar, sqlite store, batched client")
        consume.append(
            sidecar_consume(kafka, "bench6", n, sqlite_store, work, "sidecar, SQLite store, batched acks")
        )
        go = go_consumer(work)
        if go is not None:
            log("sidecar, redis store, batched acks by the Go client")
            name = "sidecar, Redis store, batched acks, Go client"
            consume.append(sidecar_consume(kafka, "bench6", n, redis_store, work, name, go=go))
        log(f"sidecar, redis store, one Ack call per message, {UNARY_WINDOW} in flight")
        consume.append(
            sidecar_consume(
                kafka,
                "bench6",
                n_unary,
                redis_store,
                work,
                f"sidecar, Redis store, one Ack call per message, {UNARY_WINDOW} in flight",
                batched=False,
            )
        )
        log("scaling: 3 replicas")
        consume.append(
            sidecar_consume(
                kafka,
                "bench6",
                n,
                redis_store,
                work,
                "sidecar x3 replicas, Redis store, batched acks",
                replicas=3,
            )
        )
        for parts in (1, 48):
            log(f"scaling: {parts} partitions")
            preload(kafka, f"bench{parts}", parts, n, f"b{parts}")
            b = raw_consume(kafka, f"bench{parts}", n)
            b.name = f"raw consumer, {parts} partition(s)"
            s = sidecar_consume(
                kafka, f"bench{parts}", n, redis_store, work, f"sidecar, {parts} partition(s), Redis"
            )
            s.extra["baseline"] = b.rate
            consume += [b, s]

        # Ordering (delivery.ordering): 1,000 distinct Kafka keys over 6 partitions, each mode
        # against the raw consumer on the same topic. "partition" sends one record per partition
        # at a time: a round trip per record, so it gets the small count of the unary row.
        log("ordering: preloading 1,000 keys")
        preload(kafka, "benchkeys", 6, n, "bk", keys=1000)
        b = raw_consume(kafka, "benchkeys", n)
        b.name = "raw consumer, 1,000 Kafka keys"
        consume.append(b)
        for mode, count in (("unordered", n), ("key", n), ("partition", n_unary)):
            log(f"ordering: {mode}")
            env = {**redis_store, "DEDUP_DELIVERY__ORDERING": mode}
            s = sidecar_consume(
                kafka, "benchkeys", count, env, work, f'sidecar, ordering = "{mode}", 1,000 keys, Redis'
            )
            s.extra["baseline"] = b.rate
            consume.append(s)

        # Before the 1M-record memory run, which leaves the broker and Redis busier. Three runs;
        # each figure is the median of the three (a 2-core machine has noisy tails).
        runs = []
        for i in range(1 if args.quick else 3):
            log(f"latency at 2,000 msg/s, run {i + 1}")
            kafka.create_topic(f"benchlat{i}", 6)
            runs.append(latency(kafka, f"benchlat{i}", 2_000, 10 if args.quick else 15, redis_store, work))
        lat = medians(runs)
        # The same with a producer that sends every record on its own (linger.ms=0): reported
        # as measured; on two cores it saturates the machine (docs/BENCHMARKS.md says more).
        runs0 = []
        for i in range(1 if args.quick else 3):
            log(f"latency at 2,000 msg/s, producer linger.ms=0, run {i + 1}")
            kafka.create_topic(f"benchlat0ms{i}", 6)
            runs0.append(
                latency(kafka, f"benchlat0ms{i}", 2_000, 10 if args.quick else 15, redis_store, work, 0)
            )
        lat0 = medians(runs0)

        log(f"memory: {n_mem} records")
        preload(kafka, "benchmem", 6, n_mem, "bm")
        mem = sidecar_consume(kafka, "benchmem", n_mem, redis_store, work, "memory run", memory=True)

        log("publish")
        kafka.create_topic("benchpub", 6)
        pub_base = raw_publish(kafka, "benchpub", n_pub)
        publish = [
            pub_base,
            sidecar_publish(kafka, "benchpub", n_pub, redis_store, work, 500),
            sidecar_publish(kafka, "benchpub", n_pub, sqlite_store, work, 500, store_name="SQLite"),
            sidecar_publish(kafka, "benchpub", n_unary, redis_store, work, 1),
            sidecar_publish(kafka, "benchpub", n_pub, redis_store, work, 1, coalesce=True),
            # What bounds PublishBatch: the same calls with the store, then the producer, left out.
            *(sidecar_publish(kafka, "benchpub", n_pub, {}, work, 500, ceiling=mode) for mode in CEILINGS),
        ]

        # The two headline ratios once more, as alternating pairs: one run of each is at the
        # mercy of whatever else the shared machine does in those seconds.
        pairs: dict[str, list[tuple[float, float]]] = {  # (sidecar, raw)
            "consume": [],
            "publish": [],
            "publish_bound": [],
        }
        budgets: dict[str, list[dict[str, Any]]] = {"consume": [], "publish": []}
        for i in range(1 if args.quick else 3):
            log(f"repeated pairs, round {i + 1}")
            raw_rate = pair_round(
                kafka, ("bench6", "benchpub"), (n, n_pub), redis_store, work, pairs, budgets
            )
            bound = sidecar_publish(kafka, "benchpub", n_pub, {}, work, 500, ceiling="produce")
            pairs["publish_bound"].append((bound.rate, raw_rate))

        log("workers and cores")
        results["workers"] = workers_rows(kafka, ("bench6", "benchpub"), (n, n_pub), redis_store, work)

    def row(r: Result, baseline: float) -> dict[str, Any]:
        return {
            "name": r.name,
            "records": r.records,
            "seconds": round(r.seconds, 3),
            "rate": round(r.rate),
            "ratio": round(r.rate / baseline, 3),
            **r.extra,
        }

    results["consume"] = [row(r, r.extra.pop("baseline", base.rate)) for r in consume]
    results["publish"] = [row(r, pub_base.rate) for r in publish]
    results["latency"] = lat
    results["latency_linger0"] = lat0
    results["memory"] = {"records": n_mem, **mem.extra}
    results["pairs"] = summarize_pairs(pairs)
    results["budget"] = {**budgets, "cpus": os.cpu_count()}
    saved_path = ROOT / "bench" / "results.json"
    if saved_path.exists():
        saved = json.loads(saved_path.read_text())
        for own in ("cluster", "per_call"):  # from their own runs (--cluster, bench/percall.py)
            if own in saved:
                results[own] = saved[own]
    saved_path.write_text(json.dumps(results, indent=2) + "\n")
    png = Path(args.out).with_suffix(".png")
    have_plot = plot(results, png)
    write_markdown(results, Path(args.out), png.name if have_plot else None)
    log(f"wrote {args.out}")
    return 0


def cluster_main(args: argparse.Namespace) -> int:
    n = 20_000 if args.quick else args.records
    saved_path = ROOT / "bench" / "results.json"
    saved = json.loads(saved_path.read_text())
    saved["cluster"] = cluster_rows(n, max(5_000, n // 2), 1 if args.quick else 3)
    saved["cluster"]["command"] = " ".join(["scripts/bench.sh", *sys.argv[1:]])
    saved_path.write_text(json.dumps(saved, indent=2) + "\n")
    png = Path(args.out).with_suffix(".png")
    write_markdown(saved, Path(args.out), png.name if plot(saved, png) else None)
    log(f"wrote {args.out}")
    return 0
