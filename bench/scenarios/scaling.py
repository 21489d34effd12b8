"""Scaling: the raw client and the sidecar in alternating pairs on a three-node cluster, and the
sidecar with one and two worker processes, pinned to one core and free on all."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from bench.common import Result, log, preload, services
from bench.scenarios.consume import raw_consume, sidecar_consume
from bench.scenarios.publish import raw_publish, sidecar_publish


def cluster_rows(n: int, n_pub: int, rounds: int) -> dict[str, Any]:
    """Consume and PublishBatch on a three-broker cluster (replication factor 3, min.insync.replicas
    2, acks=all), each against the raw client on the same cluster, as alternating pairs."""
    pairs: dict[str, list[tuple[float, float]]] = {"consume": [], "publish": []}
    with (
        tempfile.TemporaryDirectory(prefix="dedup-bench-cluster-") as tmp,
        services.KafkaCluster.start(Path(tmp) / "kafka", quick_start=False) as cluster,
        services.RedisServer.start(Path(tmp) / "redis", appendonly="no") as redis,
    ):
        work = Path(tmp)
        redis_store = {"DEDUP_STORE__BACKEND": "redis", "DEDUP_STORE__REDIS_URL": redis.url}
        log(f"cluster: preloading {n} x 1 KB records into 6 partitions, RF 3")
        preload(cluster, "cbench6", 6, n, "c6")
        cluster.create_topic("cbenchpub", 6)
        # Three fresh JVMs compile their hot paths during the first minute: the first pair ran at
        # half the later raw rate, and the raw consumer still sped up in the third. Two untimed
        # rounds of each client first.
        for i in range(2):
            log(f"cluster: warm-up round {i + 1} of 2 (not counted)")
            raw_consume(cluster, "cbench6", n)
            raw_publish(cluster, "cbenchpub", n_pub)
        for i in range(rounds):
            log(f"cluster: round {i + 1} of {rounds}")
            pair_round(cluster, ("cbench6", "cbenchpub"), (n, n_pub), redis_store, work, pairs)
    return {"records": n, "publish_records": n_pub, **summarize_pairs(pairs)}


def pair_round(
    kafka: services.KafkaShape,
    topics: tuple[str, str],
    counts: tuple[int, int],
    store: dict[str, str],
    work: Path,
    pairs: dict[str, list[tuple[float, float]]],
    budgets: dict[str, list[dict[str, Any]]] | None = None,
) -> float:
    """One raw-then-sidecar pair each for consume (topics[0], counts[0] records) and for
    PublishBatch of 500 (topics[1], counts[1]); appends (sidecar, raw) rates to ``pairs`` and
    returns the raw producer's rate. The CPU µs per record of each side go to ``consume_cpu`` and
    ``publish_cpu`` as (sidecar, raw); with ``budgets``, each side's CPU by process too."""
    raw = raw_consume(kafka, topics[0], counts[0])
    sc = sidecar_consume(kafka, topics[0], counts[0], store, work, "pair")
    pairs["consume"].append((sc.rate, raw.rate))
    pairs.setdefault("consume_cpu", []).append((sc.extra["cpu_us"], raw.extra["cpu_us"]))
    if budgets is not None:
        budgets["consume"].append(budget_pair(sc, raw))
    raw = raw_publish(kafka, topics[1], counts[1])
    sc = sidecar_publish(kafka, topics[1], counts[1], store, work, 500)
    pairs["publish"].append((sc.rate, raw.rate))
    pairs.setdefault("publish_cpu", []).append((sc.extra["cpu_us"], raw.extra["cpu_us"]))
    if budgets is not None:
        budgets["publish"].append(budget_pair(sc, raw))
    return raw.rate


def budget_pair(sc: Result, raw: Result) -> dict[str, Any]:
    return {
        "sidecar": sc.extra["cpu_by_process"],
        "raw": raw.extra["cpu_by_process"],
        "rates": [round(sc.rate), round(raw.rate)],
    }


#: (workers, taskset cores; "" = any): each worker shape pinned to one core, then free on all.
WORKER_SHAPES = [(1, "0"), (2, "0"), (1, ""), (2, "")]


def workers_rows(
    kafka: services.KafkaShape,
    topics: tuple[str, str],
    counts: tuple[int, int],
    store: dict[str, str],
    work: Path,
) -> dict[str, Any]:
    """server.workers against the cores the sidecar may use: consume with each shape of
    WORKER_SHAPES after a raw consumer run of its own, then PublishBatch with 1 and 2 workers
    after a raw producer run. The broker, Redis and the client are never pinned."""
    consume, publish = [], []
    for workers, cores in WORKER_SHAPES:
        raw = raw_consume(kafka, topics[0], counts[0])
        wrap = ["taskset", "-c", cores] if cores else []
        where = f"core {cores}" if cores else f"all {os.cpu_count()} cores"
        name = f"{workers} worker(s), {where}"
        sc = sidecar_consume(kafka, topics[0], counts[0], store, work, name, wrap=wrap, workers=workers)
        consume.append(
            {"name": name, "rate": round(sc.rate), "ratio": round(sc.rate / raw.rate, 3), **sc.extra}
        )
        log(json.dumps(consume[-1]))
    for workers in (1, 2):
        raw = raw_publish(kafka, topics[1], counts[1])
        sc = sidecar_publish(kafka, topics[1], counts[1], store, work, 500, workers=workers)
        publish.append(
            {"name": sc.name, "rate": round(sc.rate), "ratio": round(sc.rate / raw.rate, 3), **sc.extra}
        )
        log(json.dumps(publish[-1]))
    return {"consume": consume, "publish": publish, "cpus": os.cpu_count()}


def summarize_pairs(pairs: dict[str, list[tuple[float, float]]]) -> dict[str, Any]:
    """Per comparison: each pair's ratio and rates, and the median ratio."""
    return {
        k: {
            "ratios": [round(sc / raw, 3) for sc, raw in v],
            "rates": [[round(sc), round(raw)] for sc, raw in v] if not k.endswith("_cpu") else [],
            "values": [[sc, raw] for sc, raw in v] if k.endswith("_cpu") else [],
            "median": round(sorted(sc / raw for sc, raw in v)[len(v) // 2], 3),
        }
        for k, v in pairs.items()
    }
