"""Operations against real servers: publish-only sidecars, topics that do not exist (answers come
at once, name what to change, and leave nothing claimed in the store), and readiness that follows
the store and the brokers and comes back by itself."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
import services
from confluent_kafka.admin import AdminClient
from dedup_client import DedupClient, PublishError, PublishResult
from dedup_client.results import publish_request
from faultproxy import FaultProxy
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.api.server import SERVICE_NAME
from tests.integration.helpers import (
    Inbox,
    committed_offsets,
    raw_produce,
    read_topic,
    running_sidecar,
    settings_dict,
    unique,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def settings_dict_for(bootstrap: str) -> dict[str, Any]:
    """Settings for a sidecar whose brokers are all unreachable (nothing listens there)."""
    return {
        "kafka": {"bootstrap_servers": bootstrap, "topics": ["nowhere"], "group_id": unique("g")},
        "store": {"backend": "memory"},
        "server": {"listen": "127.0.0.1:0", "metrics_listen": "", "shutdown_grace_seconds": 0},
    }


async def status_of(coro: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro  # type: ignore[misc]
    return info.value.code(), info.value.details() or ""


def groups(kafka: services.KafkaBroker) -> set[str]:
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap_servers})
    return {g.group_id for g in admin.list_consumer_groups(request_timeout=10).result(15).valid}


async def test_a_publish_only_sidecar_publishes_and_joins_no_group(kafka: services.KafkaBroker) -> None:
    topic, group = unique("out"), unique("g")
    kafka.create_topic(topic, 2)
    async with (
        running_sidecar(**settings_dict(kafka, [], group)) as sc,
        DedupClient(f"127.0.0.1:{sc.port}") as c,
    ):
        r = await c.publish(topic, b"event", idempotency_key="e-1")
        assert (r.topic, r.duplicate) == (topic, False)
        assert (await c.publish(topic, b"event", idempotency_key="e-1")).duplicate
        code, msg = await status_of(anext(c.subscribe()))
        assert code is grpc.StatusCode.FAILED_PRECONDITION
        assert "kafka.topics" in msg
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sc.port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            r2 = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            assert r2.status == health_pb2.HealthCheckResponse.SERVING
    assert group not in groups(kafka)
    assert len(read_topic(kafka, topic, expect=1)) == 1


async def test_a_missing_topic_is_not_found_at_once_and_leaves_no_claim(kafka: services.KafkaBroker) -> None:
    topic = unique("later")
    async with (
        running_sidecar(**settings_dict(kafka, [], unique("g"))) as sc,
        DedupClient(f"127.0.0.1:{sc.port}") as c,
    ):
        t0 = time.monotonic()
        code, msg = await status_of(c.publish(topic, b"x", idempotency_key="k-1"))
        assert code is grpc.StatusCode.NOT_FOUND
        assert topic in msg
        assert "publish.check_topics" in msg
        assert time.monotonic() - t0 < 3, "NOT_FOUND took as long as a produce timeout"
        # One entry of a batch: that entry alone fails.
        kafka.create_topic(topic, 2)
        await asyncio.sleep(1.1)  # a miss refreshes the metadata at most once a second
        out = await c.publish_batch(
            [
                publish_request(topic, b"x", idempotency_key="k-2"),
                publish_request(unique("nope"), b"y", idempotency_key="k-3"),
                publish_request(topic, b"z", idempotency_key="k-4", partition=7),
            ]
        )
        assert isinstance(out[0], PublishResult)
        assert isinstance(out[1], PublishError)
        assert out[1].code is grpc.StatusCode.NOT_FOUND
        assert isinstance(out[2], PublishError)
        assert out[2].code is grpc.StatusCode.NOT_FOUND
        assert "it has 2" in out[2].message
        # The key refused before the topic existed was never claimed: it publishes now.
        r = await c.publish(topic, b"x", idempotency_key="k-1")
        assert not r.duplicate


async def test_a_consumed_topic_that_does_not_exist_is_reported_until_it_does(
    kafka: services.KafkaBroker,
) -> None:
    topic = unique("soon")
    async with running_sidecar(**settings_dict(kafka, [topic], unique("g"))) as sc:
        target = f"127.0.0.1:{sc.port}"
        async with DedupClient(target) as c, grpc.aio.insecure_channel(target) as ch:
            health = health_pb2_grpc.HealthStub(ch)

            async def ready() -> int:
                r = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
                return int(r.status)

            assert await ready() == health_pb2.HealthCheckResponse.NOT_SERVING
            live = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert live.status == health_pb2.HealthCheckResponse.SERVING  # alive, not ready
            code, msg = await status_of(anext(c.subscribe()))
            assert code is grpc.StatusCode.NOT_FOUND
            assert topic in msg
            kafka.create_topic(topic, 1)
            deadline = time.monotonic() + 20
            while await ready() != health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline, "still NOT_SERVING after the topic was created"
                await asyncio.sleep(0.3)
            await c.publish(topic, b"hello", idempotency_key="h-1")
            async with Inbox(c) as inbox:
                [m] = await inbox.wait(1, timeout=30)
                assert m.value == b"hello"


async def readiness(target: str) -> tuple[int, int]:
    """(DedupService entry, overall entry) of the sidecar's health service."""
    async with grpc.aio.insecure_channel(target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        ready = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        live = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        return int(ready.status), int(live.status)


async def wait_readiness(target: str, want: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while (await readiness(target))[0] != want:
        assert time.monotonic() < deadline, f"readiness never became {want}"
        await asyncio.sleep(0.3)


async def test_readiness_follows_the_store_and_comes_back_by_itself(
    kafka: services.KafkaBroker, redis_server: services.RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    topic = unique("ready")
    kafka.create_topic(topic, 1)
    cfg = settings_dict(kafka, [topic], unique("g"), {"backend": "redis", "redis_url": redis_server.url})
    cfg["store"]["key_prefix"] = unique("p")
    async with running_sidecar(**cfg) as sc:
        target = f"127.0.0.1:{sc.port}"
        assert await readiness(target) == (SERVING, SERVING)
        caplog.set_level("INFO")
        redis_server.pause()
        try:
            await wait_readiness(target, NOT_SERVING)
            assert (await readiness(target))[1] == SERVING  # alive: a restart would not help
            await asyncio.sleep(7)  # readiness pings it every second meanwhile
        finally:
            redis_server.resume()
        await wait_readiness(target, SERVING)
        # The outage is logged as it began and as it ended, not at each failed round trip.
        deadline = time.monotonic() + 30
        while not any("store: answering again after" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the end of the store's outage was never logged"
            await asyncio.sleep(0.5)
        said = [r.getMessage() for r in caplog.records if r.name == "sidecar.observability.outage"]
        assert len(said) == 2, said
        assert said[0].startswith("store: failing: ")
        assert sc.metrics.dependency_failures.labels("store")._value.get() >= 2  # each ping waits 3 s


async def test_ready_only_once_a_broker_has_answered_and_the_outage_is_logged_not_each_failure(
    kafka: services.KafkaBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """Started while no broker answers (its bootstrap address refuses every connection), the
    sidecar is NOT_SERVING from the first moment, and SERVING by itself once a broker answers.
    Meanwhile the log says that Kafka fails once, not each refused connection (it wrote some 50
    lines a second, each failure twice), and counts the failures in a metric; and once Kafka is
    back, it says so and how long it was out."""
    topic = unique("late")
    kafka.create_topic(topic, 1)
    # Nothing listens at the bootstrap address until the proxy to the broker starts there.
    proxy = FaultProxy(services.free_port(), kafka.port)
    cfg = settings_dict(kafka, [topic], unique("g"))
    cfg["kafka"]["bootstrap_servers"] = f"127.0.0.1:{proxy.listen_port}"
    caplog.set_level("INFO")
    try:
        async with running_sidecar(**cfg) as sc:
            target = f"127.0.0.1:{sc.port}"
            assert await readiness(target) == (NOT_SERVING, SERVING)
            await asyncio.sleep(10)
            failures = sc.metrics.dependency_failures.labels("Kafka")._value.get()
            assert failures > 20  # librdkafka kept trying
            kafka_lines = [
                r
                for r in caplog.records
                if r.name.startswith(("librdkafka", "sidecar.kafka", "sidecar.observability.outage"))
            ]
            assert len(kafka_lines) <= 3, [r.getMessage() for r in kafka_lines]
            [down] = [r.getMessage() for r in kafka_lines if "failing:" in r.getMessage()]
            assert down.startswith("Kafka: failing: ")
            assert "Connection refused" in down or "brokers are down" in down, down
            await proxy.start()
            await wait_readiness(target, SERVING)
            deadline = time.monotonic() + 30
            while not any("Kafka: answering again after" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline, "the end of the outage was never logged"
                await asyncio.sleep(0.5)
    finally:
        await proxy.stop()


async def test_no_reachable_broker_is_not_ready() -> None:
    cfg = settings_dict_for(f"127.0.0.1:{services.free_port()}")
    async with running_sidecar(**cfg) as sc:
        target = f"127.0.0.1:{sc.port}"
        # Not ready from the first moment: no broker has answered yet (it used to say SERVING
        # until its first readiness check, seconds later).
        assert not sc.ready
        assert await readiness(target) == (NOT_SERVING, SERVING)


async def test_the_consumer_group_protocol_consumes_acks_and_commits(kafka: services.KafkaBroker) -> None:
    """kafka.group_protocol = "consumer" (KIP-848) on the real broker: the broker assigns every
    partition, each record is delivered once, and the acked offsets are committed."""
    topic, group = unique("kip848"), unique("g")
    kafka.create_topic(topic, 3)
    raw_produce(kafka, topic, [(f"k{i}", b"v", i % 3) for i in range(300)])  # every partition
    cfg = settings_dict(kafka, [topic], group)
    cfg["kafka"]["group_protocol"] = "consumer"
    del cfg["kafka"]["session_timeout_ms"]  # the broker's, under this protocol
    async with running_sidecar(**cfg) as sc, DedupClient(f"127.0.0.1:{sc.port}") as c:
        keys: list[str] = []
        async with asyncio.timeout(60):
            async for m in c.subscribe(max_in_flight=100):
                keys.append(m.idempotency_key)
                await m.ack()
                if len(keys) == 300:
                    break
        assert sorted(keys) == sorted(f"k{i}" for i in range(300))
        await asyncio.sleep(0.5)  # the commit interval
    assert committed_offsets(kafka, group, topic, 3) == {0: 100, 1: 100, 2: 100}
