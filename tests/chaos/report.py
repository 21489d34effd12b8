"""Run every fault with a large message count and write docs/RELIABILITY.md from the figures.

Usage: python -m tests.chaos.report [--messages 10000] [--seeds 1] [--out docs/RELIABILITY.md]
(scripts/reliability.sh wraps it). It starts its own Kafka broker and Redis on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "deploy" / "local"))  # deploy/local/services, as in tests/conftest.py

import services  # noqa: E402
from faultproxy import FaultProxy  # noqa: E402

from tests.chaos import faults, soak  # noqa: E402
from tests.chaos.harness import DRAIN_CAP_S, DRAIN_STALL_S, Fault, Figures, run_scenario  # noqa: E402
from tests.chaos.test_faults import (  # noqa: E402
    FAILOVERS,
    ORDERED,
    SHARE,
    STREAM,
    UNARY,
    WORKERS,
    failover_env,
    failover_fault,
)

#: The F11-F14 rows run on services.KafkaCluster (a single Redis node, appendfsync everysec).
KAFKA_CLUSTER = "kafka-cluster"

#: (name, title, fault, scenario arguments, Redis: an appendfsync policy for one node, or a shape;
#: or KAFKA_CLUSTER)
FAULTS: list[tuple[str, str, Fault, dict[str, Any], str]] = [
    (
        "F1",
        "network timeouts and resets between sidecar and broker",
        faults.f1_network,
        {"env": {"DEDUP_PUBLISH__TIMEOUT_SECONDS": "5"}},
        "everysec",
    ),
    ("F2", "kill -9 of a sidecar at random moments", faults.f2_kill_sidecar, {}, "everysec"),
    (
        "F2-before-delivery",
        "sidecar killed before a delivery is sent",
        faults.kill_point("before_delivery", 8),
        {},
        "everysec",
    ),
    (
        "F2-after-delivery",
        "sidecar killed right after a frame is sent (app processing)",
        faults.kill_point("after_delivery", 8),
        {},
        "everysec",
    ),
    (
        "F2-ack-before-mark",
        "sidecar killed after the app's ack, before the store is marked",
        faults.kill_point("ack_before_mark", 10),
        {},
        "everysec",
    ),
    (
        "F2-mark-before-commit",
        "sidecar killed after the store mark, before the commit",
        faults.kill_point("mark_before_commit", 10),
        {},
        "everysec",
    ),
    (
        "F2-produce-before-record",
        "sidecar killed after a produce, before the publish result is recorded",
        faults.kill_point("produce_before_record", 300),
        {
            "env": {"DEDUP_PUBLISH__TIMEOUT_SECONDS": "5"},
            "publisher_env": {"DEDUP_TESTONLY_KILL_AT": "produce_before_record:300"},
        },
        "everysec",
    ),
    ("F3", "kill -9 of the app while processing", faults.f3_kill_app, {}, "everysec"),
    (
        "F4",
        "zombie sidecar: SIGSTOP past session timeout and lease, then SIGCONT",
        faults.f4_zombie_sidecar,
        {},
        "everysec",
    ),
    (
        "F5",
        "the app stalls past its lease",
        faults.f5_app_stall,
        {"app_args": ["--stall-every", "500", "--stall", "7"]},
        "everysec",
    ),
    ("F6", "rebalance churn over three replicas", faults.f6_churn, {}, "everysec"),
    (
        "F18",
        "rolling restart of the sidecars (SIGTERM, restart, next)",
        faults.f18_rolling_restart_sidecars,
        {"app_args": ["--work-ms", "2"]},
        "everysec",
    ),
    (
        "F18-consumer-protocol",
        'rolling restart of the sidecars, kafka.group_protocol = "consumer" (KIP-848)',
        faults.f18_rolling_restart_sidecars,
        {"app_args": ["--work-ms", "2"], "env": {"DEDUP_KAFKA__GROUP_PROTOCOL": "consumer"}},
        "everysec",
    ),
    (
        "F6-consumer-protocol",
        'rebalance churn over three replicas, kafka.group_protocol = "consumer" (KIP-848)',
        faults.f6_churn,
        {"env": {"DEDUP_KAFKA__GROUP_PROTOCOL": "consumer"}},
        "everysec",
    ),
    (
        "F2-stream",
        "kill -9 of a sidecar; acks on StreamingSubscribe, publishes on StreamingPublish",
        faults.f2_kill_sidecar,
        STREAM,
        "everysec",
    ),
    (
        "F2-ack-before-mark-stream",
        "sidecar killed after a stream ack, before the store is marked",
        faults.kill_point("ack_before_mark", 10),
        STREAM,
        "everysec",
    ),
    (
        "F3-stream",
        "kill -9 of the app while processing; acks on StreamingSubscribe",
        faults.f3_kill_app,
        STREAM,
        "everysec",
    ),
    (
        "F2-unary",
        "kill -9 of a sidecar; one unary Ack per message, one unary Publish per record",
        faults.f2_kill_sidecar,
        UNARY,
        "everysec",
    ),
    (
        "F2-key",
        'kill -9 of a sidecar, delivery.ordering = "key", 100 Kafka keys',
        faults.f2_kill_sidecar,
        {"env": ORDERED, "entities": 100, "app_args": ["--concurrent"]},
        "everysec",
    ),
    (
        "F6-key",
        'rebalance churn, delivery.ordering = "key", 100 Kafka keys',
        faults.f6_churn,
        {"env": ORDERED, "entities": 100, "app_args": ["--concurrent"]},
        "everysec",
    ),
    # server.workers = 2: every sidecar is a supervisor and two worker processes; the apps'
    # client subscribes on both workers.
    (
        "F17",
        "kill -9 of one worker process, server.workers = 2",
        faults.f17_kill_worker,
        {"env": WORKERS},
        "everysec",
    ),
    (
        "F2-workers",
        "kill -9 of a whole sidecar (supervisor and both workers), server.workers = 2",
        faults.f2_kill_sidecar,
        {"env": WORKERS},
        "everysec",
    ),
    (
        "F4-workers",
        "zombie sidecar of two workers: SIGSTOP past session timeout and lease, then SIGCONT",
        faults.f4_zombie_sidecar,
        {"env": WORKERS},
        "everysec",
    ),
    (
        "F6-workers",
        "rebalance churn over three replicas of two workers each",
        faults.f6_churn,
        {"env": WORKERS},
        "everysec",
    ),
    ("F7-always", "Redis kill -9, appendfsync always", faults.f7_kill_redis, {}, "always"),
    ("F7-everysec", "Redis kill -9, appendfsync everysec", faults.f7_kill_redis, {}, "everysec"),
    ("F7-none", "Redis kill -9, no persistence", faults.f7_kill_redis, {}, "no"),
    ("F8", "Redis paused (SIGSTOP 4 s)", faults.f8_pause_redis, {}, "everysec"),
    (
        "F8-stream",
        "Redis paused (SIGSTOP 4 s); acks on StreamingSubscribe, publishes on StreamingPublish",
        faults.f8_pause_redis,
        STREAM,
        "everysec",
    ),
    ("F9", "broker kill -9 and restart", faults.f9_kill_broker, {}, "everysec"),
    (
        "F2-share",
        'queue mode (kafka.group_type = "share", one partition): kill -9 of a sidecar at random moments',
        faults.f2_kill_sidecar,
        SHARE,
        "everysec",
    ),
    (
        "F8-share",
        "queue mode, one partition: Redis paused (SIGSTOP 4 s)",
        faults.f8_pause_redis,
        SHARE,
        "everysec",
    ),
    (
        "F9-share",
        "queue mode, one partition: broker kill -9 and restart",
        faults.f9_kill_broker,
        SHARE,
        "everysec",
    ),
    ("F10", "broker paused (SIGSTOP 5 s)", faults.f10_pause_broker, {}, "everysec"),
    *(
        (
            name,
            f"{'Redis Cluster master' if shape == 'cluster' else 'Sentinel primary'} kill -9, "
            f"{'WAIT for 1 replica' if wait else 'no WAIT'}",
            failover_fault(shape),
            {"env": failover_env(wait)},
            shape,
        )
        for name, shape, wait in FAILOVERS
    ),
    # On the replicated three-node cluster (RF 3, min.insync.replicas 2), topic read back.
    ("F11", "cluster: the busiest leader kill -9'd, restarted", faults.f11_leader_kill, {}, KAFKA_CLUSTER),
    ("F12", "cluster: rolling restart of every node", faults.f12_rolling_restart, {}, KAFKA_CLUSTER),
    ("F13", "cluster: one node cut off (network partition)", faults.f13_cut_off_broker, {}, KAFKA_CLUSTER),
    ("F14", "cluster: coordinator kill -9'd in a rebalance", faults.f14_coordinator_kill, {}, KAFKA_CLUSTER),
]


async def run_all(
    messages: int, seeds: int, only: set[str], logs_dir: Path | None = None
) -> list[tuple[str, list[Figures]]]:
    """``logs_dir``: run in that directory and leave it (every process's log) behind."""
    out = []
    with (
        contextlib.nullcontext(str(logs_dir))
        if logs_dir
        else tempfile.TemporaryDirectory(prefix="dedup-chaos-") as tmp
    ):
        base = Path(tmp)
        kafka = services.KafkaBroker.start(base / "kafka")
        cluster: services.KafkaCluster | None = None
        try:
            for name, title, fault, kwargs, aof in FAULTS:
                if only and name not in only:
                    continue
                for seed in range(1, seeds + 1):
                    work = base / f"{name}-{seed}"
                    work.mkdir()
                    t0 = time.monotonic()
                    on: services.KafkaShape = kafka
                    if aof == KAFKA_CLUSTER:
                        if cluster is None:
                            cluster = services.KafkaCluster.start(base / "kafka-cluster", partitionable=True)
                        on, kwargs = cluster, {**kwargs, "readback": True}
                    if aof in ("cluster", "sentinel"):
                        redis: services.RedisShape = services.start_redis(work / "redis", aof)
                    else:
                        redis = services.RedisServer.start(
                            work / "redis", appendonly="everysec" if aof == KAFKA_CLUSTER else aof
                        )
                    try:
                        if name == "F1":
                            assert isinstance(redis, services.RedisServer)
                            figs = await run_f1(work, redis, messages, seed, kwargs)
                        else:
                            figs = await run_scenario(
                                name, fault, on, redis, work, messages, seed=seed, **kwargs
                            )
                    finally:
                        redis.stop()
                    took = time.monotonic() - t0
                    print(
                        f"[chaos] {name} seed {seed}: {[f.row() for f in figs]} in {took:.0f}s",
                        file=sys.stderr,
                        flush=True,
                    )
                    out.append((title, figs))
        finally:
            kafka.stop()
            if cluster is not None:
                cluster.stop()
    return out


async def run_f1(
    work: Path, redis: services.RedisServer, messages: int, seed: int, kwargs: dict[str, Any]
) -> list[Figures]:
    """F1 needs a broker that advertises a fault proxy in front of it."""
    proxy_port = services.free_port()
    with services.KafkaBroker.start(work / "kafka", advertised_port=proxy_port) as kafka:
        proxy = FaultProxy(proxy_port, kafka.port)
        await proxy.start()
        try:
            return await run_scenario(
                "F1", faults.f1_network, kafka, redis, work, messages, proxy=proxy, seed=seed, **kwargs
            )
        finally:
            await proxy.stop()


def code_line() -> str:
    """Which code the run measured: the commit (marked if the tree had changes) and the build."""
    from sidecar.process import build

    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "sidecar"], cwd=ROOT, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        rev, dirty = "unknown (not a git checkout)", ""
    changed = ", with uncommitted changes under sidecar/" if dirty.strip() else ""
    return f"Code: `{rev}`{changed}; {build.describe()}."


def existing_rows(path: Path) -> list[str]:
    """The fault rows of a report already written (``| F<n>...: title | ...``)."""
    if not path.exists():
        return []
    return [line for line in path.read_text().splitlines() if line.startswith("| F") and ": " in line]


def write(
    results: list[tuple[str, list[Figures]]],
    messages: int,
    seeds: int,
    command: str,
    path: Path,
    keep: list[str] | None,
    code: str,
) -> None:
    lines = [
        "# Reliability under faults",
        "",
        f"Generated by `{command}` from a real run: a real Apache Kafka broker "
        f"({services.kafka_version()}) and a real redis-server on 127.0.0.1, sidecars and apps as "
        "separate processes, faults injected by the "
        f"harness (tests/chaos/). {messages} uniquely keyed messages per fault and seed ({seeds} seed(s)), "
        "published through PublishBatch, 5% re-published through Publish and 5% duplicated by a plain "
        "producer.",
        "",
        code,
        "",
        "Two consumer groups consume each topic side by side: the **naive** app applies its effect and then "
        "acks; the **inbox** app records the key in the same SQLite transaction as its effect. The naive "
        "app's duplicates measure the window the contract admits (an effect applied, then the ack lost); "
        "the inbox app closes it.",
        "",
        "The F15 and F16 rows run on a real Redis Cluster (three masters, one replica each) and a real "
        "Sentinel-watched primary with two replicas, and kill the master under load, with and without "
        "`store.redis_min_replicas_acked = 1` (WAIT).",
        "",
        *(
            [
                f"This file was last updated by a partial run (`{command}`): the rows of the faults it ran "
                "are new; every other row is from the run before, on the same harness.",
                "",
            ]
            if keep is not None
            else []
        ),
        "| fault | app | sent | lost | duplicated | unexpected | delivered after OK ack | redelivered keys "
        "| max attempt | recovery s | keys by highest attempt | what happened |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    rows: dict[str, list[str]] = {}
    for title, figs in results:
        for f in figs:
            notes = f.notes
            if f.order_violations is not None:
                notes = f"{notes}; order violations: {f.order_violations}".lstrip("; ")
            if f.topic_duplicates is not None:
                notes = (
                    f"{notes}; topic read back: {f.topic_duplicates} keys written twice, "
                    f"{f.topic_missing} acknowledged keys missing"
                )
            row = "| " + " | ".join([f"{f.fault}: {title}", *f.row()[1:], f.attempts, notes]) + " |"
            rows.setdefault(f.fault, []).append(row)
    if keep is not None:  # a partial run: the other faults keep the rows of the last full run
        ran = set(rows)
        for line in keep:
            name = line[2:].split(":", 1)[0]
            if name not in ran:
                rows.setdefault(name, []).append(line)
    order = [name for name, *_ in FAULTS]
    for name in sorted(rows, key=lambda n: order.index(n) if n in order else len(order)):
        lines += rows[name]
    lines += [
        "",
        "Columns: *lost* — published (acknowledged by Publish) with no effect; *duplicated* — keys whose "
        "effect was applied more than once; *unexpected* — effects for keys no Publish was tried for; "
        "*delivered after OK ack* — deliveries a sidecar sent after an Ack for that key had returned OK "
        "(contract point 2; expected only when Redis loses acknowledged writes: killed with no persistence, "
        "or failed over without WAIT); *redelivered keys* — "
        "keys delivered more than once (attempt > 1); *recovery* — seconds from the end of the fault until "
        "every key had its effect. Recovery includes the apps' own pace: each app handles one delivery at "
        "a time, with 3 ms of work and its SQLite commits. After a fault the harness waits as long as "
        f"effects keep arriving; it gives up after {DRAIN_STALL_S} s without a new one ({DRAIN_CAP_S // 60} "
        "minutes at most), and a row that gave up says so.",
        "",
        "The F11-F14 rows run on a replicated cluster of three KRaft nodes (each a broker and a "
        "controller; replication factor 3, `min.insync.replicas` 2, the internal topics replicated too), "
        "started by deploy/local/services (KafkaCluster). Every link between two nodes, in each "
        "direction, and every node's client port cross a fault proxy, so F13 cuts one node off from the "
        "others and from the sidecars at once. After each run the topic is read back: every key "
        "published through Publish or PublishBatch must have exactly one record (the plain producer's "
        "deliberate copies carry a header and are not counted).",
        "",
        "The F17 and F*-workers rows run every sidecar as a supervisor and two worker processes "
        "(`server.workers = 2`), and the apps' client subscribes on both workers. F6-workers has six "
        "members over six partitions, with one replica of two workers killed and restarted every ~3 s. "
        "Every hand-back there (a killed member, a partition moved by a rebalance) is a delivery "
        "attempt, and some records are handed back more than `delivery.max_attempts` (5) times. Only "
        "failed deliveries (Nacks, ack deadlines, closed streams) count toward `max_attempts`, so "
        "churn alone dead-letters nothing; before failures were counted apart from attempts, such "
        "records went to dead-lettering and showed here as *lost* (27 inbox keys in the first run; "
        "the harness creates no dead-letter topic, so they stayed unsettled).",
        "",
        "The F2-<point> rows kill the sidecar at exact points through test-only hooks "
        "(sidecar/testing_hooks.py), armed only by a hidden flag plus an environment variable.",
        "",
        "The *-stream rows run the per-call paths on streams: the apps write one ack per message on "
        "the StreamingSubscribe call that brought it (the Python client's `streaming=True`), and the "
        "scenario publishes one record per message on a StreamingPublish call, 64 at once. F2-unary "
        "makes one unary Ack call per message and one unary Publish call per record instead, 64 at "
        "once, which the sidecar groups (group commit). The checks are the same as every row's.",
        "",
        'The F2-key and F6-key rows run with `delivery.ordering = "key"` and give every record one of 100 '
        "Kafka keys. *Order violations* counts effects applied after an effect of a higher offset with the "
        "same Kafka key (the first effect of each idempotency key; a naive app's repeat after a kill is the "
        "dedup window, not an ordering fault).",
    ]
    # The soak's section (tests/chaos/soak.py) is written by the soak: keep it.
    old = path.read_text() if path.exists() else ""
    kept = old[old.index(soak.MARKER) :] if soak.MARKER in old else ""
    path.write_text("\n".join(lines) + "\n" + (f"\n{kept}" if kept else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--only", action="append", default=[], help="fault name(s) to run, e.g. F2")
    ap.add_argument("--out", default=str(ROOT / "docs" / "RELIABILITY.md"))
    ap.add_argument("--keep", type=Path, help="run in this (new) directory and keep every process's log")
    a = ap.parse_args()
    if a.keep:
        a.keep.mkdir(parents=True)
    code = code_line()  # before the run: the commit it ran, whatever is committed meanwhile
    results = asyncio.run(run_all(a.messages, a.seeds, set(a.only), a.keep))
    # The report names how to regenerate it; where this run kept its logs is not part of that.
    shown = [x for i, x in enumerate(sys.argv[1:]) if not x.startswith("--keep") and sys.argv[i] != "--keep"]
    command = " ".join(["scripts/reliability.sh", *shown])
    out = Path(a.out)
    write(results, a.messages, a.seeds, command, out, existing_rows(out) if a.only else None, code)
    bad = [
        f
        for _, figs in results
        for f in figs
        if f.lost
        or f.unexpected
        or (f.variant == "inbox" and f.duplicated)
        or f.order_violations
        or f.topic_duplicates
        or f.topic_missing
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
