"""Bad input to every RPC gets a precise gRPC status and a message naming what to change."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import services
from dedup_client import AckResult, DedupClient

from sidecar._proto import dedup_pb2 as pb
from sidecar._proto import dedup_pb2_grpc as pb_grpc
from sidecar.process.app import Sidecar
from tests.integration.helpers import Inbox, running_sidecar, settings_dict, unique


@pytest.fixture
async def sidecar(kafka: services.KafkaBroker) -> AsyncIterator[tuple[Sidecar, str]]:
    topic = unique("bad")
    kafka.create_topic(topic, 2)
    cfg = settings_dict(
        kafka,
        [topic],
        unique("g"),
        publish={"max_message_bytes": 10_000, "timeout_seconds": 5},
        server={"max_streams": 2},
    )
    cfg["kafka"]["producer"] = {"topic.metadata.propagation.max.ms": 1000}
    async with running_sidecar(**cfg) as sc:
        yield sc, topic


async def status_of(coro: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await coro  # type: ignore[misc]
    return info.value.code(), info.value.details() or ""


async def test_publish_rejects_bad_topics_keys_and_sizes(sidecar: tuple[Sidecar, str]) -> None:
    sc, topic = sidecar
    async with DedupClient(f"127.0.0.1:{sc.port}") as c:
        code, msg = await status_of(c.publish("", b"x"))
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert "topic is empty" in msg
        code, msg = await status_of(c.publish("bad topic!", b"x"))
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        code, msg = await status_of(c.publish(topic, b"x", idempotency_key="k" * 256))
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert "255" in msg
        code, msg = await status_of(c.publish(topic, b"x" * 10_001))
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "publish.max_message_bytes" in msg
        code, msg = await status_of(c.publish(topic, b"x", headers=[("idempotency-key", b"sneaky")]))
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        code, msg = await status_of(c.publish(unique("missing"), b"x"))
        assert code is grpc.StatusCode.NOT_FOUND, msg
        # Nothing above crashed the sidecar: a good publish still works.
        r = await c.publish(topic, b"fine", idempotency_key="good")
        assert not r.duplicate


async def test_same_key_other_payload_is_refused(sidecar: tuple[Sidecar, str]) -> None:
    sc, topic = sidecar
    async with DedupClient(f"127.0.0.1:{sc.port}") as c:
        first = await c.publish(topic, b"one", idempotency_key="conflict")
        code, msg = await status_of(c.publish(topic, b"two", idempotency_key="conflict"))
        assert code is grpc.StatusCode.ALREADY_EXISTS
        assert "different payload" in msg
        again = await c.publish(topic, b"one", idempotency_key="conflict")
        assert again.duplicate
        assert (again.partition, again.offset) == (first.partition, first.offset)


async def test_publish_batch_reports_per_entry(sidecar: tuple[Sidecar, str]) -> None:
    sc, topic = sidecar
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sc.port}") as ch:
        stub = pb_grpc.DedupServiceStub(ch)
        resp = await stub.PublishBatch(
            pb.PublishBatchRequest(
                entries=[
                    pb.PublishRequest(topic=topic, value=b"a", idempotency_key="b1"),
                    pb.PublishRequest(topic="", value=b"b"),
                    pb.PublishRequest(topic=topic, value=b"c" * 20_000),
                    pb.PublishRequest(topic=topic, value=b"d", idempotency_key="b1"),
                ]
            )
        )
        codes = [r.code for r in resp.results]
        assert codes == [
            0,
            grpc.StatusCode.INVALID_ARGUMENT.value[0],
            grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
            grpc.StatusCode.ALREADY_EXISTS.value[0],
        ]
        code, _ = await status_of(stub.PublishBatch(pb.PublishBatchRequest()))
        assert code is grpc.StatusCode.INVALID_ARGUMENT


async def test_ack_nack_extend_with_bad_ids(sidecar: tuple[Sidecar, str]) -> None:
    sc, _ = sidecar
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sc.port}") as ch:
        stub = pb_grpc.DedupServiceStub(ch)
        code, _ = await status_of(stub.Ack(pb.AckRequest()))
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        code, msg = await status_of(stub.Ack(pb.AckRequest(delivery_ids=["not-an-id"])))
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed" in msg
        resp = await stub.Ack(pb.AckRequest(delivery_ids=["0badc0de.12345"]))
        assert list(resp.results) == [pb.ACK_RESULT_UNKNOWN]
        resp2 = await stub.Nack(pb.NackRequest(delivery_ids=["0badc0de.1"]))
        assert list(resp2.results) == [pb.ACK_RESULT_UNKNOWN]
        code, msg = await status_of(
            stub.ExtendDeadline(pb.ExtendDeadlineRequest(delivery_ids=["0badc0de.1"]))
        )
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert "delivery.max_ack_deadline_seconds" in msg
        code, _ = await status_of(stub.Ack(pb.AckRequest(delivery_ids=["0badc0de.1"] * 10_001)))
        assert code is grpc.StatusCode.INVALID_ARGUMENT


async def test_subscribe_limits(sidecar: tuple[Sidecar, str]) -> None:
    sc, _ = sidecar
    async with DedupClient(f"127.0.0.1:{sc.port}") as c:
        gen = c.subscribe(["not-consumed"])
        code, msg = await status_of(gen.__anext__())
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert "kafka.topics" in msg
        async with Inbox(c), Inbox(c):
            await asyncio.sleep(0.3)
            gen = c.subscribe()
            code, msg = await status_of(gen.__anext__())
            assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "server.max_streams" in msg


async def test_ack_after_partition_moved_is_stale(kafka: services.KafkaBroker) -> None:
    topic, group = unique("stale"), unique("g")
    kafka.create_topic(topic, 2)
    cfg = settings_dict(kafka, [topic], group, {"backend": "memory"})
    async with running_sidecar(**cfg) as first, DedupClient(f"127.0.0.1:{first.port}") as c:
        await c.publish(topic, b"p0", idempotency_key="s0", partition=0)
        await c.publish(topic, b"p1", idempotency_key="s1", partition=1)
        async with Inbox(c) as inbox:
            msgs = await inbox.wait(2)
            # A second member joins: cooperative-sticky moves one partition to it.
            async with running_sidecar(**cfg) as second:
                assert second.engine is not None
                deadline = time.monotonic() + 30
                assert first.engine is not None
                while len(first.engine.committable()) != 1:
                    assert time.monotonic() < deadline, "no rebalance"
                    await asyncio.sleep(0.1)
                kept = next(iter(first.engine.committable()))[1]
                results = await c.ack_many([m.delivery_id for m in msgs])
                expected = [AckResult.OK if m.partition == kept else AckResult.STALE for m in msgs]
                assert results == expected


async def test_auth_token(kafka: services.KafkaBroker) -> None:
    topic = unique("auth")
    kafka.create_topic(topic, 1)
    cfg = settings_dict(kafka, [topic], unique("g"), server={"auth_token": "s3cret"})
    async with running_sidecar(**cfg) as sc:
        async with DedupClient(f"127.0.0.1:{sc.port}") as anon:
            code, msg = await status_of(anon.publish(topic, b"x"))
            assert code is grpc.StatusCode.UNAUTHENTICATED
            assert "server.auth_token" in msg
        async with DedupClient(f"127.0.0.1:{sc.port}", token="wrong") as bad:
            code, _ = await status_of(bad.publish(topic, b"x"))
            assert code is grpc.StatusCode.UNAUTHENTICATED
        async with DedupClient(f"127.0.0.1:{sc.port}", token="s3cret") as good:
            assert (await good.publish(topic, b"x")).offset == 0
