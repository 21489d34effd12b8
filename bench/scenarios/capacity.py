"""Measure what the Redis store costs, to size it: bytes per key, Redis CPU and round trips per
record, and the consume and publish rates of the Cluster and WAIT paths next to one node.

Usage: python -m bench.scenarios.capacity [--keys 1000000] [--records 100000] [--quick]
(scripts/capacity.sh wraps it). It starts its own Kafka broker and Redis servers on 127.0.0.1
and writes bench/capacity.json; docs/CAPACITY.md quotes the figures.

What it measures, each against real servers:

* memory: ``MEMORY USAGE`` of a done mark and of a publish record written by the store, and
  ``INFO memory`` before and after ``--keys`` done marks (all a key costs: value, key, expiry);
* store work per consumed record (a claim and a complete, in the batches the sidecar uses) and
  per published record (a publish begin and finish): round trips, script calls, and the CPU the
  Redis processes spent (``INFO cpu``, masters and replicas apart), on one node, on a Cluster of
  three masters, and with WAIT for one replica;
* rates through a real sidecar process, as ratios to the raw client measured in the same run:
  consume with the batched client and PublishBatch, on one node, the Cluster, the Cluster with
  WAIT, and a Sentinel primary with WAIT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from bench.common import ROOT, machine, preload, services
from bench.scenarios.consume import raw_consume, sidecar_consume
from bench.scenarios.publish import raw_publish, sidecar_publish
from sidecar.store.base import PublishRecord
from sidecar.store.redis import RedisStore

GROUP, TOPIC = "orders-app", "orders"
BATCH = 500  # records per claim and complete: the consumer's fetch batch


def log(msg: str) -> None:
    print(f"[capacity] {msg}", file=sys.stderr, flush=True)


def idem(i: int) -> str:
    return str(uuid.UUID(int=i))  # 36 characters, like the UUIDs most producers use


def dedup_key(i: int) -> str:
    return f"{len(GROUP)}:{GROUP}:{TOPIC}:{idem(i)}"  # sidecar.engine.identity.store_key


def cpu_seconds(nodes: list[services.RedisServer]) -> float:
    total = 0.0
    for n in nodes:
        info = n.info("cpu")
        total += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    return total


def evalsha_calls(nodes: list[services.RedisServer]) -> int:
    calls = 0
    for n in nodes:
        stat = n.info("commandstats").get("cmdstat_evalsha", "calls=0,")
        calls += int(stat.split("calls=")[1].split(",")[0])
    return calls


async def store_work(
    url: str,
    masters: list[services.RedisServer],
    replicas: list[services.RedisServer],
    n: int,
    wait: int,
    batching: Literal["per-master", "per-key"] = "per-master",
) -> dict[str, Any]:
    """Per consumed and per published record: round trips, script calls, Redis CPU (µs)."""
    out: dict[str, Any] = {}
    prefix = f"cap{uuid.uuid4().hex[:6]}"
    store = RedisStore(url, prefix=prefix, min_replicas=wait, wait_ms=5000, cluster_batching=batching)
    await store.ping()
    for what in ("consume", "publish"):
        trips0 = store.round_trips
        calls0, cpu_m0, cpu_r0 = evalsha_calls(masters), cpu_seconds(masters), cpu_seconds(replicas)
        t0 = time.perf_counter()
        for start in range(0, n, BATCH):
            ids = range(start, min(n, start + BATCH))
            if what == "consume":
                keys = [dedup_key(i) for i in ids]
                await store.claim(keys, "owner-1", 35_000)
                await store.complete(keys, "owner-1", 7 * 86_400_000)
            else:
                keys = [idem(i) for i in ids]
                await store.publish_begin(keys, "owner-1", 35_000)
                records = [
                    (k, PublishRecord("0" * 32, TOPIC, i % 6, i)) for k, i in zip(keys, ids, strict=True)
                ]
                await store.publish_finish(records, "owner-1", 7 * 86_400_000)
        seconds = time.perf_counter() - t0
        out[what] = {
            "records": n,
            "round_trips_per_1000": round((store.round_trips - trips0) * 1000 / n, 2),
            "script_calls_per_record": round((evalsha_calls(masters) - calls0) / n, 3),
            "redis_cpu_us_per_record": round((cpu_seconds(masters) - cpu_m0) * 1e6 / n, 2),
            "replica_cpu_us_per_record": round((cpu_seconds(replicas) - cpu_r0) * 1e6 / n, 2),
            "store_only_records_per_s": round(n / seconds),
        }
    await store.close()
    return out


async def memory(redis: services.RedisServer, keys: int) -> dict[str, Any]:
    """Bytes per done mark and per publish record, sampled and over ``keys`` done marks."""
    store = RedisStore(redis.url, prefix="dedup")
    sample_done, sample_pub = dedup_key(10**12), idem(10**12)
    await store.claim([sample_done], "owner-1", 35_000)
    await store.complete([sample_done], "owner-1", 7 * 86_400_000)
    await store.publish_begin([sample_pub], "owner-1", 35_000)
    await store.publish_finish(
        [(sample_pub, PublishRecord("0" * 32, TOPIC, 3, 123_456_789))], "owner-1", 86_400_000
    )
    done_bytes = int(redis.cli("MEMORY", "USAGE", f"dedup:k:{sample_done}").strip())
    pub_bytes = int(redis.cli("MEMORY", "USAGE", f"dedup:p:{sample_pub}").strip())
    before = int(redis.info("memory")["used_memory"])
    t0 = time.monotonic()
    step = 10_000
    for start in range(0, keys, step):
        batch = [dedup_key(i) for i in range(start, min(keys, start + step))]
        await asyncio.gather(
            *(
                store.complete(batch[j : j + BATCH], "owner-1", 7 * 86_400_000)
                for j in range(0, len(batch), BATCH)
            )
        )
        if start and start % 200_000 == 0:
            log(f"memory: {start:,} done marks written ({time.monotonic() - t0:.0f}s)")
    after = int(redis.info("memory")["used_memory"])
    await store.close()
    return {
        "memory_usage_done_mark_bytes": done_bytes,
        "memory_usage_publish_record_bytes": pub_bytes,
        "keys": keys,
        "used_memory_per_done_mark_bytes": round((after - before) / keys, 1),
        "example_done_key": f"dedup:k:{sample_done}",
        "example_publish_key": f"dedup:p:{sample_pub}",
    }


def rates(
    kafka: services.KafkaBroker, shapes: dict[str, dict[str, str]], n: int, work: Path, rounds: int
) -> dict[str, Any]:
    """Consume and PublishBatch through a sidecar per store shape, each right after the raw client,
    ``rounds`` times over all shapes in turn, so the machine's drift hits every shape alike.
    Each figure is the median ratio of its rounds."""
    n_pub = max(5_000, n // 2)
    preload(kafka, "cap6", 6, n, "c6")
    kafka.create_topic("cappub", 6)
    runs: dict[str, dict[str, list[tuple[float, float]]]] = {"consume": {}, "publish": {}}
    for r in range(rounds):
        for name, store in shapes.items():
            log(f"rates, round {r + 1}: {name}")
            raw = raw_consume(kafka, "cap6", n)
            sc = sidecar_consume(kafka, "cap6", n, store, work, name)
            runs["consume"].setdefault(name, []).append((sc.rate, raw.rate))
            raw = raw_publish(kafka, "cappub", n_pub)
            sp = sidecar_publish(kafka, "cappub", n_pub, store, work, 500)
            runs["publish"].setdefault(name, []).append((sp.rate, raw.rate))
    out: dict[str, Any] = {}
    for what, per in runs.items():
        out[what] = {}
        for name, pairs in per.items():
            ratios = sorted(sc / raw for sc, raw in pairs)
            mid = sorted(pairs, key=lambda p: p[0] / p[1])[len(pairs) // 2]
            out[what][name] = {
                "rate": round(mid[0]),
                "raw": round(mid[1]),
                "ratio": round(ratios[len(ratios) // 2], 3),
                "ratios": [round(x, 3) for x in ratios],
            }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, default=1_000_000, help="done marks for the INFO memory figure")
    ap.add_argument("--records", type=int, default=100_000, help="records per rate and store-work figure")
    ap.add_argument("--quick", action="store_true", help="small sizes, to check the harness works")
    ap.add_argument("--out", default=str(ROOT / "bench" / "capacity.json"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "CAPACITY.md"))
    ap.add_argument("--render-only", action="store_true", help="rewrite the doc from --out")
    a = ap.parse_args()
    if a.render_only:
        write_doc(json.loads(Path(a.out).read_text()), Path(a.doc))
        return 0
    keys, n = (20_000, 10_000) if a.quick else (a.keys, a.records)
    result: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join(["scripts/capacity.sh", *sys.argv[1:]]),
    }
    with tempfile.TemporaryDirectory(prefix="dedup-capacity-") as tmp:
        work = Path(tmp)
        with services.RedisServer.start(work / "mem", appendonly="no") as redis:
            result["redis_version"] = redis.info("server")["redis_version"]
            log(f"memory: {keys:,} done marks")
            result["memory"] = asyncio.run(memory(redis, keys))
        with (
            services.RedisServer.start(work / "single", appendonly="everysec") as single,
            services.RedisCluster.start(work / "cluster") as cluster,
            services.RedisSentinelSet.start(work / "sentinel") as sentinel,
            services.KafkaBroker.start(work / "kafka", quick_start=False) as kafka,
        ):
            masters = cluster.masters()
            replicas = [x for x in cluster.nodes if x not in masters]
            primary = sentinel.master()
            sentinel_replicas = [x for x in sentinel.servers if x is not primary]
            Batching = Literal["per-master", "per-key"]
            work_rows: dict[
                str, tuple[str, list[services.RedisServer], list[services.RedisServer], int, Batching]
            ] = {
                "one node": (single.url, [single], [], 0, "per-master"),
                "Cluster, 3 masters": (cluster.url, masters, replicas, 0, "per-master"),
                "Cluster, one key per call": (cluster.url, masters, replicas, 0, "per-key"),
                "Cluster, WAIT 1": (cluster.url, masters, replicas, 1, "per-master"),
                "Sentinel primary, WAIT 1": (sentinel.url, [primary], sentinel_replicas, 1, "per-master"),
            }
            result["store_work"] = {}
            for name, (url, m, r, wait, batching) in work_rows.items():
                log(f"store work: {name}")
                result["store_work"][name] = asyncio.run(store_work(url, m, r, n, wait, batching))
            shapes = {
                "one node": {"DEDUP_STORE__BACKEND": "redis", "DEDUP_STORE__REDIS_URL": single.url},
                "Cluster, 3 masters": {
                    "DEDUP_STORE__BACKEND": "redis",
                    "DEDUP_STORE__REDIS_URL": cluster.url,
                },
                "Cluster, one key per call": {
                    "DEDUP_STORE__BACKEND": "redis",
                    "DEDUP_STORE__REDIS_URL": cluster.url,
                    "DEDUP_STORE__REDIS_CLUSTER_BATCHING": "per-key",
                },
                "Cluster, WAIT 1": {
                    "DEDUP_STORE__BACKEND": "redis",
                    "DEDUP_STORE__REDIS_URL": cluster.url,
                    "DEDUP_STORE__REDIS_MIN_REPLICAS_ACKED": "1",
                },
                "Sentinel primary, WAIT 1": {
                    "DEDUP_STORE__BACKEND": "redis",
                    "DEDUP_STORE__REDIS_URL": sentinel.url,
                    "DEDUP_STORE__REDIS_MIN_REPLICAS_ACKED": "1",
                },
            }
            result["rates"] = rates(kafka, shapes, n, work, 1 if a.quick else 3)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    write_doc(result, Path(a.doc))
    log(f"wrote {a.out} and {a.doc}")
    return 0


# ------------------------------------------------------------------------------------------------
# docs/CAPACITY.md: the measured section, between markers, under the hand-written guide.

START, END = "<!-- measured:start -->", "<!-- measured:end -->"
#: A Redis master runs commands on one thread: plan for this share of a core, leaving headroom
#: for replication, persistence rewrites and bursts.
CORE_BUDGET = 0.6
#: Redis memory per key at scale comes out above MEMORY USAGE (allocator, expiry dictionary);
#: the sizing uses the INFO figure, plus this margin for fragmentation and the growth of dicts.
MEMORY_MARGIN = 1.5


def _gb(n: float) -> str:
    if n >= 1e12:
        return f"{n / 1e12:,.1f} TB"
    return f"{n / 1e9:,.1f} GB" if n >= 1e9 else f"{n / 1e6:,.0f} MB"


def sizing_rows(result: dict[str, Any], records_s: float, windows: list[tuple[str, int]]) -> list[str]:
    per_key = result["memory"]["used_memory_per_done_mark_bytes"] * MEMORY_MARGIN
    work = result["store_work"]
    one = work["one node"]["consume"]["redis_cpu_us_per_record"]
    cl = work["Cluster, 3 masters"]["consume"]["redis_cpu_us_per_record"]
    rows = []
    for label, seconds in windows:
        memory = records_s * seconds * per_key
        cores_cluster = records_s * cl / 1e6
        masters = max(1, round(max(cores_cluster / CORE_BUDGET, memory / 25e9) + 0.499))
        rows.append(
            f"| {records_s:,.0f} | {label} | {records_s * seconds / 1e6:,.0f} M | {_gb(memory)} "
            f"| {records_s * one / 1e6:.2f} | {cores_cluster:.2f} | {masters} |"
        )
    return rows


def render(result: dict[str, Any]) -> str:
    mem, work, rates_ = result["memory"], result["store_work"], result["rates"]
    lines = [
        START,
        f"Measured by `{result['command']}` on {result['machine'].get('cpus', '?')} CPUs "
        f"({result['machine'].get('platform', '')}), Redis {result.get('redis_version', '?')}, "
        f"Kafka {result['machine'].get('kafka', '?')}. The sidecar, Kafka and every Redis process share "
        "the machine.",
        "",
        "### Bytes per key",
        "",
        "| what | bytes |",
        "| --- | ---: |",
        f"| a done mark, `MEMORY USAGE` (`{mem['example_done_key']}`) "
        f"| {mem['memory_usage_done_mark_bytes']} |",
        f"| a publish record, `MEMORY USAGE` (`{mem['example_publish_key']}`) "
        f"| {mem['memory_usage_publish_record_bytes']} |",
        f"| a done mark, `INFO memory` over {mem['keys']:,} of them (with expiry and dict overhead) "
        f"| {mem['used_memory_per_done_mark_bytes']} |",
        "",
        "### Store work per record",
        "",
        "Claims and completes in batches of 500 (a consumed record), publish begin and finish in",
        "batches of 500 (a published record), run straight against each shape. CPU is what the",
        "Redis processes spent (`INFO cpu`, user + system), masters and replicas apart.",
        "",
        "| shape | record | round trips per 1,000 | script calls per record | master CPU µs | replica CPU µs "
        "| store-only records/s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for shape, per in work.items():
        for what, w in per.items():
            lines.append(
                f"| {shape} | {what.replace('consume', 'consumed').replace('publish', 'published')} "
                f"| {w['round_trips_per_1000']} | {w['script_calls_per_record']} "
                f"| {w['redis_cpu_us_per_record']} | {w['replica_cpu_us_per_record']} "
                f"| {w['store_only_records_per_s']:,} |"
            )
    lines += [
        "",
        "### Rates through a sidecar, as ratios to the raw client in the same run",
        "",
        "Consume: 1 KB records, 6 partitions, the batched Python client, against a raw",
        "confluent-kafka consumer committing every 1,000. Publish: `PublishBatch` of 500, 4 calls in",
        "flight, against a raw idempotent producer. Each sidecar run came right after its raw run, and",
        "the shapes took turns, round after round; the ratio is the median of the rounds (all of them in",
        "brackets), and the rates are those of the median round.",
        "",
        "| store | consume records/s | raw | ratio | PublishBatch records/s | raw | ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for shape, c in rates_["consume"].items():
        p = rates_["publish"][shape]
        lines.append(
            f"| {shape} | {c['rate']:,} | {c['raw']:,} | {c['ratio']} ({', '.join(map(str, c['ratios']))}) "
            f"| {p['rate']:,} | {p['raw']:,} | {p['ratio']} ({', '.join(map(str, p['ratios']))}) |"
        )
    lines += [
        "",
        "### Sizing, from the figures above",
        "",
        f"Memory is records/s x window x the `INFO memory` bytes per done mark x {MEMORY_MARGIN} (margin for",
        "fragmentation and dict growth), per consumer group. Redis CPU is records/s x the master CPU per",
        f"consumed record. Masters: enough that each runs at most {CORE_BUDGET:.0%} of a core and holds at",
        "most 25 GB. Published records add their publish records on top, for `store.retention_seconds`.",
        "One node runs commands on one core: its column says what one node would need, and above about",
        f"{CORE_BUDGET} it is no longer an option.",
        "",
        "| consumed records/s | window | keys held | Redis memory | Redis cores, as one node | Redis cores, "
        "Cluster | Cluster masters |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    windows = [("7 days (default)", 7 * 86_400), ("1 day", 86_400), ("1 hour", 3_600), ("10 minutes", 600)]
    lines += sizing_rows(result, 10 * 1_000, windows)
    lines += sizing_rows(result, 1_000 * 5_000, windows)
    lines.append(END)
    return "\n".join(lines)


def write_doc(result: dict[str, Any], path: Path) -> None:
    text = path.read_text()
    start, end = text.index(START), text.index(END) + len(END)
    path.write_text(text[:start] + render(result) + text[end:])


if __name__ == "__main__":
    sys.exit(main())
