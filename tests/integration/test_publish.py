"""Idempotent Publish: one record per key across retries, restarts, concurrency and replays."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import services
from dedup_client import DedupClient, PublishError, PublishResult

from tests.integration.helpers import (
    ROOT,
    SidecarProcess,
    committed_offsets,
    process_env,
    raw_produce,
    read_topic,
    running_sidecar,
    settings_dict,
    unique,
)


def keys_in(kafka: services.KafkaBroker, topic: str) -> Counter[str]:
    return Counter(dict(m.headers())["idempotency-key"].decode() for m in read_topic(kafka, topic))


@contextlib.asynccontextmanager
async def two_sidecars(
    kafka: services.KafkaBroker, redis_server: services.RedisServer, topic: str
) -> AsyncIterator[tuple[DedupClient, DedupClient]]:
    """Two sidecar processes sharing one Redis store, and a client of each."""
    kafka.create_topic(topic, 3)
    cfg = settings_dict(
        kafka,
        [topic],
        unique("g"),
        {"backend": "redis", "redis_url": redis_server.url, "key_prefix": unique("p")},
    )
    async with (
        running_sidecar(**cfg) as a,
        running_sidecar(**cfg) as b,
        DedupClient(f"127.0.0.1:{a.port}") as ca,
        DedupClient(f"127.0.0.1:{b.port}") as cb,
    ):
        yield ca, cb


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_retry_across_kill9_and_restart_writes_once(
    backend: str, kafka: services.KafkaBroker, redis_server: services.RedisServer, tmp_path: Path
) -> None:
    topic = unique("pubkill")
    kafka.create_topic(topic, 3)
    extra = {"DEDUP_STORE__KEY_PREFIX": unique("p")}
    if backend == "sqlite":
        extra |= {"DEDUP_STORE__BACKEND": "sqlite", "DEDUP_STORE__SQLITE_PATH": str(tmp_path / "s.db")}
    env = process_env(kafka, topic, unique("g"), redis_server.url if backend == "redis" else None, **extra)
    sc = SidecarProcess(env, tmp_path / "sidecar.log")
    sc.start()
    try:
        await sc.wait_serving()
        async with DedupClient(sc.target) as c:
            first = [await c.publish(topic, b"v%d" % i, idempotency_key=f"order-{i}") for i in range(20)]
            again = await c.publish(topic, b"v0", idempotency_key="order-0")  # an app retry
            assert again.duplicate
            assert (again.partition, again.offset) == (first[0].partition, first[0].offset)
        sc.kill9()
        sc.start()
        await sc.wait_serving()
        async with DedupClient(sc.target) as c:
            for i in range(20):  # every retry after the restart is answered from the store
                r = await c.publish(topic, b"v%d" % i, idempotency_key=f"order-{i}")
                assert r.duplicate
                assert (r.partition, r.offset) == (first[i].partition, first[i].offset)
    finally:
        sc.terminate()
    counts = keys_in(kafka, topic)
    assert len(counts) == 20
    assert set(counts.values()) == {1}


async def test_other_payload_is_refused_and_writes_nothing(kafka: services.KafkaBroker) -> None:
    topic = unique("conflict")
    kafka.create_topic(topic, 1)
    async with (
        running_sidecar(**settings_dict(kafka, [topic], unique("g"))) as sc,
        DedupClient(f"127.0.0.1:{sc.port}") as c,
    ):
        await c.publish(topic, b"one", idempotency_key="k")
        for other in (
            dict(value=b"two"),
            dict(value=b"one", key=b"x"),
            dict(value=b"one", headers=[("h", b"1")]),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await c.publish(topic, idempotency_key="k", **other)
            assert info.value.code() is grpc.StatusCode.ALREADY_EXISTS
    assert keys_in(kafka, topic) == {"k": 1}


async def test_concurrent_publishes_of_one_key_write_once(
    kafka: services.KafkaBroker, redis_server: services.RedisServer
) -> None:
    topic = unique("conc")
    async with two_sidecars(kafka, redis_server, topic) as (ca, cb):
        calls = [(ca if i % 2 else cb).publish(topic, b"same", idempotency_key="hot") for i in range(50)]
        results = await asyncio.gather(*calls)
    assert len({(r.partition, r.offset) for r in results}) == 1
    assert sum(not r.duplicate for r in results) == 1
    assert keys_in(kafka, topic) == {"hot": 1}


async def test_two_sidecars_publishing_the_same_batches_write_each_key_once(
    kafka: services.KafkaBroker, redis_server: services.RedisServer
) -> None:
    from dedup_client.results import publish_request

    topic = unique("batches")
    keys = [f"k{i}" for i in range(300)]
    async with two_sidecars(kafka, redis_server, topic) as (ca, cb):
        # Each sidecar gets every key, in batches of 100, in opposite orders: they contend on
        # every key, so publish claims are taken, found busy, waited for and settled both ways.
        calls = [
            c.publish_batch([publish_request(topic, k.encode(), idempotency_key=k) for k in ks[i : i + 100]])
            for c, ks in ((ca, keys), (cb, keys[::-1]))
            for i in range(0, 300, 100)
        ]
        outcomes = [r for batch in await asyncio.gather(*calls) for r in batch]
    assert all(isinstance(r, PublishResult) for r in outcomes)
    by_key: dict[str, set[tuple[int, int]]] = {}
    for r in outcomes:
        assert isinstance(r, PublishResult)
        by_key.setdefault(r.idempotency_key, set()).add((r.partition, r.offset))
    assert all(len(places) == 1 for places in by_key.values())  # both answers name one record
    assert sum(not r.duplicate for r in outcomes if isinstance(r, PublishResult)) == 300
    assert keys_in(kafka, topic) == dict.fromkeys(keys, 1)


async def test_publish_batch_generates_keys_and_dedups_entries(kafka: services.KafkaBroker) -> None:
    from dedup_client.results import publish_request

    topic = unique("batch")
    kafka.create_topic(topic, 2)
    async with (
        running_sidecar(**settings_dict(kafka, [topic], unique("g"))) as sc,
        DedupClient(f"127.0.0.1:{sc.port}") as c,
    ):
        entries = [
            publish_request(topic, b"a", idempotency_key="x"),
            publish_request(topic, b"b"),
            publish_request(topic, b"a", idempotency_key="x"),
            publish_request(topic, b"c"),
            publish_request(topic, b"other", idempotency_key="x"),  # the key again, another payload
            publish_request("no such topic!", b"d"),
        ]
        out = await c.publish_batch(entries)
    *out, reused, bad_topic = out
    assert isinstance(reused, PublishError)
    assert reused.code is grpc.StatusCode.ALREADY_EXISTS
    assert "already published with a different payload" in reused.message
    assert isinstance(bad_topic, PublishError)
    assert bad_topic.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid topic name" in bad_topic.message
    keys = [getattr(r, "idempotency_key", None) for r in out]
    assert keys[0] == keys[2] == "x"
    assert keys[1]
    assert keys[3]
    assert keys[1] != keys[3]
    assert sorted(keys_in(kafka, topic).values()) == [1, 1, 1]


async def test_consume_transform_produce_survives_app_kill9(
    kafka: services.KafkaBroker, redis_server: services.RedisServer, tmp_path: Path
) -> None:
    src, dst, group = unique("in"), unique("out"), unique("g")
    kafka.create_topic(src, 2)
    kafka.create_topic(dst, 2)
    n = 200
    raw_produce(kafka, src, [(f"in-{i}", b"payload-%d" % i, i % 2) for i in range(n)])
    env = process_env(
        kafka,
        src,
        group,
        redis_server.url,
        DEDUP_STORE__KEY_PREFIX=unique("p"),
        DEDUP_DELIVERY__DETACH_GRACE_SECONDS="60",
    )
    sc = SidecarProcess(env, tmp_path / "sidecar.log")
    sc.start()
    app_log = tmp_path / "app.log"

    def start_app(crash_after: int = 0) -> subprocess.Popen[bytes]:
        with open(app_log, "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "tests.integration.apps.transform_app", sc.target, dst],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "CRASH_AFTER": str(crash_after)},
            )

    try:
        await sc.wait_serving()
        app = start_app(crash_after=n // 3)  # dies between publishing outputs and acking the input
        assert app.wait(60) == -9
        app = start_app()
        deadline = time.monotonic() + 60
        while committed_offsets(kafka, group, src, 2) != {0: n // 2, 1: n // 2}:
            assert time.monotonic() < deadline, app_log.read_text()[-2000:]
            await asyncio.sleep(0.2)
        app.kill()
        app.wait()
    finally:
        sc.terminate()
    # The replayed input republished its outputs: Publish answered duplicate and wrote nothing.
    assert "duplicate" in app_log.read_text()
    counts = keys_in(kafka, dst)
    assert len(counts) == 2 * n
    assert set(counts.values()) == {1}, [k for k, v in counts.items() if v > 1][:5]
