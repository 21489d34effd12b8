"""Queue mode: sidecar processes in one share group (KIP-932) on ONE partition, sharing the real
Redis, against the real Kafka 4.2 broker.

Every key must be applied once by an inbox app, nothing may be delivered after its OK ack, the
work must spread over the members, a member killed with -9 mid-stream loses nothing, a Nack
releases the record to the group (delivered again, attempt 2), a dead-letter Nack writes the
record to the dead-letter topic and rejects it, and a member that joins afterwards is handed
nothing. Refusals (ordering, a deadline past the lock) are checked from outside too.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import services
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._config import ConfigResource
from confluent_kafka.admin._resource import ResourceType
from dedup_client import AckError, AckResult, DedupClient

from tests.integration.helpers import (
    ROOT,
    Inbox,
    SidecarProcess,
    process_env,
    raw_produce,
    records_per_key,
    running_sidecar,
    set_group_config,
    settings_dict,
    stop_all,
    unique,
)

LOCK_MS = 6000


@dataclass
class Ledger:
    #: key -> (member, received, answered) per delivery
    deliveries: dict[str, list[tuple[str, float, float]]] = field(default_factory=lambda: defaultdict(list))
    acked_ok: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    attempts: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    #: The inbox: the effect of each key, applied once (a key found here is acked, not applied).
    inbox: dict[str, str] = field(default_factory=dict)
    inbox_hits: Counter[str] = field(default_factory=Counter)
    by_member: Counter[str] = field(default_factory=Counter)


async def inbox_app(
    name: str,
    sidecar: SidecarProcess,
    ledger: Ledger,
    stop: asyncio.Event,
    nack_once: set[str],
    poison: set[str],
) -> None:
    """Apply through an inbox, 5 ms per record, 10 in flight; Nack the keys in ``nack_once`` on
    their first delivery and dead-letter the ``poison`` ones. Reconnects when the sidecar goes."""
    rng = random.Random(name)

    async def handle(client: DedupClient, m: object) -> None:
        key, did, attempt = m.idempotency_key, m.delivery_id, m.attempt  # type: ignore[attr-defined]
        t0 = time.monotonic()
        ledger.attempts[key].append(attempt)
        try:
            if key in poison:
                await client.nack([did], dead_letter=True, reason="poison")
            elif key in nack_once and attempt == 1:
                await client.nack([did], delay_seconds=0)
            else:
                await asyncio.sleep(0.004 + rng.random() * 0.002)
                if key in ledger.inbox:
                    ledger.inbox_hits[key] += 1
                else:
                    ledger.inbox[key] = name
                [res] = await client.ack_many([did])
                if res in (AckResult.OK, AckResult.STALE):
                    ledger.acked_ok[key].append(time.monotonic())
                    ledger.by_member[name] += 1
        finally:
            ledger.deliveries[key].append((name, t0, time.monotonic()))

    while not stop.is_set():
        try:
            async with DedupClient(sidecar.target) as client:
                tasks: set[asyncio.Task[None]] = set()
                async for m in client.subscribe(max_in_flight=10):
                    t = asyncio.create_task(handle(client, m))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                    if stop.is_set():
                        break
        except (grpc.aio.AioRpcError, AckError):
            pass
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)


async def all_acked(ledger: Ledger, keys: set[str], sidecars: dict[str, SidecarProcess], logs: Path) -> None:
    deadline = time.monotonic() + 120
    while not keys <= set(ledger.acked_ok) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    missing = sorted(keys - set(ledger.acked_ok))
    if missing:
        for sc in sidecars.values():
            sc.dump_state()
        await asyncio.sleep(1)
    assert not missing, f"{len(missing)} keys never acked, e.g. {missing[:5]}; logs in {logs}"


def share_env(
    kafka: services.KafkaBroker, topic: str, group: str, redis_url: str, **extra: str
) -> dict[str, str]:
    return process_env(
        kafka,
        topic,
        group,
        redis_url,
        DEDUP_KAFKA__GROUP_TYPE="share",
        DEDUP_KAFKA__SHARE_MAX_POLL_RECORDS="40",
        DEDUP_DELIVERY__ACK_DEADLINE_SECONDS="4",
        DEDUP_DELIVERY__LEASE_MARGIN_SECONDS="2",
        DEDUP_STORE__KEY_PREFIX=unique("p"),
        **extra,
    )


async def test_three_members_on_one_partition_apply_each_key_once(
    kafka: services.KafkaBroker, redis_server: services.RedisServer, tmp_path: Path
) -> None:
    rng = random.Random(11)
    topic, group = unique("queue"), unique("sg")
    kafka.create_topic(topic, 1)
    kafka.create_topic(f"{topic}.dlq", 1)
    set_group_config(kafka.bootstrap_servers, group, {"share.record.lock.duration.ms": str(LOCK_MS)})
    env = share_env(kafka, topic, group, redis_server.url)
    sidecars = {n: SidecarProcess(env, tmp_path / f"{n}.log") for n in ("a", "b", "c")}
    keys = [f"k{i:04d}" for i in range(900)]
    nack_once = set(keys[5::50])
    poison = set(keys[7::97])
    ledger, stop = Ledger(), asyncio.Event()

    def wave(ks: list[str]) -> None:
        # Each key once, and a third of them again (a producer's retries).
        records: list[tuple[str | None, bytes, int | None]] = [(k, k.encode(), 0) for k in ks]
        records += [(k, k.encode(), 0) for k in ks[::3]]
        rng.shuffle(records)
        # In small producer batches: the broker lends a whole record batch to one member, so
        # one batch of hundreds would go to one member (see docs/ARCHITECTURE.md, "Queue mode").
        for i in range(0, len(records), 10):
            raw_produce(kafka, topic, records[i : i + 10])

    apps: list[asyncio.Task[None]] = []
    try:
        for sc in sidecars.values():
            sc.start()
        await asyncio.gather(*(sc.wait_serving() for sc in sidecars.values()))
        apps = [
            asyncio.create_task(inbox_app(n, sc, ledger, stop, nack_once, poison))
            for n, sc in sidecars.items()
        ]
        wave(keys[:450])
        good = set(keys) - poison
        await all_acked(ledger, good & set(keys[:450]), sidecars, tmp_path)
        # The work spread over the members on one partition (before the kill).
        first = dict(ledger.by_member)
        for n in ("a", "b", "c"):
            assert first.get(n, 0) >= 450 // 10, first
        second = time.monotonic()
        wave(keys[450:])
        deadline = time.monotonic() + 60
        while sum(1 for ds in ledger.deliveries.values() for d in ds if d[0] == "a" and d[1] > second) < 5:
            assert time.monotonic() < deadline, f"the second wave went nowhere; logs in {tmp_path}"
            await asyncio.sleep(0.01)
        sidecars["a"].kill9()  # mid-stream: it holds a poll's records, some at its app
        killed_at = time.monotonic()
        await all_acked(ledger, good, sidecars, tmp_path)

        # A member that joins afterwards is handed nothing: every record was answered.
        fresh = SidecarProcess(env, tmp_path / "d.log")
        sidecars["d"] = fresh
        fresh.start()
        await fresh.wait_serving()
        async with DedupClient(fresh.target) as client, Inbox(client) as late:
            await asyncio.sleep(LOCK_MS / 1000 + 3)
            assert late.messages == [], [m.idempotency_key for m in late.messages][:5]
    finally:
        await stop_all(stop, apps, sidecars)

    # Applied once: the inbox holds every good key, none of the poison ones.
    assert set(ledger.inbox) == good
    # Nothing delivered after an OK ack, and no key acked OK twice.
    twice = {k: v for k, v in ledger.acked_ok.items() if len(v) > 1}
    assert not twice, f"acked OK twice: {list(twice)[:5]}"
    after = [
        k
        for k, ds in ledger.deliveries.items()
        if k in ledger.acked_ok
        for (_, t0, _) in ds
        if t0 > ledger.acked_ok[k][0]
    ]
    assert not after, f"delivered after an OK ack: {after[:5]}"
    # Inbox hits only for keys whose delivery the kill cut off (the stated window).
    cut = {
        k for k, ds in ledger.deliveries.items() for (n, _, end) in ds if n == "a" and end >= killed_at - 1
    }
    assert set(ledger.inbox_hits) <= cut, sorted(set(ledger.inbox_hits) - cut)[:5]
    # A Nack released the record to the group: it came back as attempt 2 (or later).
    for k in nack_once - poison:
        assert max(ledger.attempts[k]) >= 2, (k, ledger.attempts[k])
    # A dead-letter Nack: written to the dead-letter topic once, rejected, never applied.
    dlq = records_per_key(kafka.bootstrap_servers, f"{topic}.dlq")
    assert set(dlq) == poison, (sorted(dlq), sorted(poison))
    assert all(n == 1 for n in dlq.values()), dlq
    print(
        f"\n{len(good)} keys applied once by {dict(ledger.by_member)}; {len(ledger.inbox_hits)} inbox hits "
        f"after the kill; {len(poison)} dead-lettered"
    )


async def test_share_mode_refuses_what_it_cannot_keep(kafka: services.KafkaBroker, tmp_path: Path) -> None:
    topic, group = unique("queue"), unique("sg")
    kafka.create_topic(topic, 1)
    set_group_config(kafka.bootstrap_servers, group, {"share.record.lock.duration.ms": str(LOCK_MS)})

    def start(**extra: str) -> str:
        env = {
            **process_env(kafka, topic, group, None, DEDUP_KAFKA__GROUP_TYPE="share", **extra),
            "DEDUP_SERVER__LISTEN": f"127.0.0.1:{services.free_port()}",
            "DEDUP_SERVER__METRICS_LISTEN": "",
        }
        done = subprocess.run(
            [sys.executable, "-m", "sidecar"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=90
        )
        out = done.stdout + done.stderr
        assert done.returncode == 2, out[-3000:]
        return out

    out = start(DEDUP_DELIVERY__ORDERING="key")
    assert "delivery.ordering" in out
    assert "kafka.group_type" in out
    out = start(DEDUP_DELIVERY__ACK_DEADLINE_SECONDS="30")
    assert "delivery.ack_deadline_seconds" in out
    assert "share.record.lock.duration.ms = 6000" in out


async def test_extend_deadline_and_ordering_are_answered_within_the_lock(kafka: services.KafkaBroker) -> None:
    topic, group = unique("queue"), unique("sg")
    kafka.create_topic(topic, 1)
    set_group_config(kafka.bootstrap_servers, group, {"share.record.lock.duration.ms": str(LOCK_MS)})
    raw_produce(kafka, topic, [("only", b"v", 0)])
    s = settings_dict(kafka, [topic], group, delivery={"ack_deadline_seconds": 4})
    s["kafka"]["group_type"] = "share"
    async with running_sidecar(**s) as sc, DedupClient(f"127.0.0.1:{sc.port}") as client:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in client.subscribe(ordering="key"):
                pass
        assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "kafka.group_type" in (refused.value.details() or "")
        async with Inbox(client) as inbox:
            [m] = await inbox.wait(1)
            with pytest.raises(grpc.aio.AioRpcError) as past:
                await client.extend_deadline([m.delivery_id], 60)
            assert past.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert "share.record.lock.duration.ms" in (past.value.details() or "")
            assert await client.extend_deadline([m.delivery_id], 2) == [AckResult.OK]
            assert await client.ack_many([m.delivery_id]) == [AckResult.OK]
        # The sidecar applied kafka.share_auto_offset_reset to the group: the record written
        # before the first member joined was read (a new share group starts at "latest").
        admin = AdminClient({"bootstrap.servers": kafka.bootstrap_servers})
        [described] = admin.describe_configs([ConfigResource(ResourceType.GROUP, group)]).values()
        assert described.result(20)["share.auto.offset.reset"].value == "earliest"
        engine = sc.engine
        assert engine is not None
        state = engine.share_state()
        assert state is not None
        deadline = time.monotonic() + 10
        while state["accepted"] < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            state = engine.share_state() or state
        assert state["accepted"] == 1, state
        assert state["held"] == 0, state
        # dedup-sidecar status shows the share state instead of partitions and commits.
        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "sidecar", "status", "--target", f"127.0.0.1:{sc.port}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert "queue mode (share group): joined" in out.stdout, out.stdout
        assert "accepted 1, released 0, rejected 0" in out.stdout, out.stdout
        assert "no partitions assigned" not in out.stdout


async def test_a_member_with_no_app_stream_takes_nothing_from_the_group(kafka: services.KafkaBroker) -> None:
    """An app that goes away must not leave its sidecar acquiring records only to release them:
    each release counts a delivery, and past group.share.delivery.count.limit the broker would
    archive them."""
    topic, group = unique("queue"), unique("sg")
    kafka.create_topic(topic, 1)
    set_group_config(kafka.bootstrap_servers, group, {"share.record.lock.duration.ms": str(LOCK_MS)})
    raw_produce(kafka, topic, [(f"k{i}", b"v", 0) for i in range(5)])
    s = settings_dict(kafka, [topic], group, delivery={"ack_deadline_seconds": 4})
    s["kafka"]["group_type"] = "share"
    async with running_sidecar(**s) as sc, DedupClient(f"127.0.0.1:{sc.port}") as client:
        async with Inbox(client, max_in_flight=5) as first:
            await first.wait(5)  # delivered, never answered: the stream closes with all five
        engine = sc.engine
        assert engine is not None
        await asyncio.sleep(6)  # the app is gone for a while (shorter than detach_grace_seconds)
        state = engine.share_state()
        assert state is not None
        assert state["acquired"] <= 10, state  # the first poll, and at most one more
        async with Inbox(client) as back:
            again = await back.wait(5, timeout=30)
            assert sorted(m.idempotency_key for m in again) == [f"k{i}" for i in range(5)]
            assert max(m.attempt for m in again) <= 3, [m.attempt for m in again]
            assert await client.ack_many([m.delivery_id for m in again]) == [AckResult.OK] * 5
