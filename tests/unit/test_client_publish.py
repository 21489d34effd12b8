"""The Python client's coalesced publish path, against a fake stub: no sidecar."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from dedup_client import DedupClient, PublishError, PublishResult
from dedup_client._proto import dedup_pb2 as pb


class FakeStub:
    """Answers PublishBatch per entry: a bad topic fails, anything else lands at offset = index."""

    def __init__(self, delay: float = 0.0, fail_call: bool = False) -> None:
        self.calls: list[int] = []
        self.delay = delay
        self.fail_call = fail_call

    async def PublishBatch(self, request: pb.PublishBatchRequest, metadata: Any, timeout: float) -> Any:
        self.calls.append(len(request.entries))
        await asyncio.sleep(self.delay)
        if self.fail_call:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "sidecar gone"
            )
        resp = pb.PublishBatchResponse()
        for i, e in enumerate(request.entries):
            if e.topic == "bad":
                resp.results.add(
                    code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="invalid topic name 'bad'"
                )
            else:
                resp.results.add(
                    response=pb.PublishResponse(idempotency_key=e.idempotency_key, topic=e.topic, offset=i)
                )
        return resp


async def coalescing(stub: FakeStub, **kw: Any) -> DedupClient:
    client = DedupClient("127.0.0.1:1", coalesce_publishes=True, **kw)
    assert client._publishes is not None
    client._publishes._stub = lambda: stub  # type: ignore[assignment,return-value]
    return client


async def test_concurrent_publishes_share_batches_and_each_gets_its_own_result() -> None:
    stub = FakeStub()
    client = await coalescing(stub, publish_max_entries=120)
    out = await asyncio.gather(*(client.publish("t", b"v", idempotency_key=f"k{i}") for i in range(300)))
    assert stub.calls == [120, 120, 60]
    assert [r.idempotency_key for r in out] == [f"k{i}" for i in range(300)]
    assert [r.offset for r in out] == [i % 120 for i in range(300)]
    await client.close()


async def test_a_failed_entry_raises_its_own_error_and_the_others_land() -> None:
    stub = FakeStub()
    client = await coalescing(stub)
    good, bad = await asyncio.gather(
        client.publish("t", b"v", idempotency_key="a"),
        client.publish("bad", b"v", idempotency_key="b"),
        return_exceptions=True,
    )
    assert isinstance(good, PublishResult)
    assert isinstance(bad, PublishError)
    assert bad.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "invalid topic name" in bad.message
    assert stub.calls == [2]
    await client.close()


async def test_a_failed_call_fails_every_publish_in_it() -> None:
    client = await coalescing(FakeStub(fail_call=True))
    out = await asyncio.gather(*(client.publish("t", b"v") for _ in range(3)), return_exceptions=True)
    assert all(isinstance(o, grpc.aio.AioRpcError) and o.code() is grpc.StatusCode.UNAVAILABLE for o in out)
    await client.close()


async def test_no_answer_in_time_is_deadline_exceeded_and_says_to_retry_with_the_key() -> None:
    client = await coalescing(FakeStub(delay=0.5))
    with pytest.raises(PublishError) as info:
        await client.publish("t", b"v", idempotency_key="slow", timeout=0.05)
    assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "same idempotency key" in info.value.message
    await client.close()  # waits for the batch: its late answer goes nowhere, quietly


async def test_a_lone_publish_waits_only_the_linger() -> None:
    stub = FakeStub()
    client = await coalescing(stub, publish_linger=0.002)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await client.publish("t", b"v")
    assert loop.time() - t0 < 0.5
    assert stub.calls == [1]
    await client.close()
