"""The per-call paths on a real broker and Redis: StreamingSubscribe (acks on the stream that
brings the deliveries), StreamingPublish (records with correlation ids), and unary calls that
arrive concurrently and are settled or published together (group commit)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import services
from dedup_client import AckResult, DedupClient, PublishError

from sidecar._proto import dedup_pb2 as pb
from sidecar._proto import dedup_pb2_grpc as pb_grpc
from sidecar.process.app import Sidecar
from tests.integration.helpers import (
    committed_offsets,
    raw_produce,
    read_topic,
    running_sidecar,
    settings_dict,
    unique,
)

OK = pb.ACK_RESULT_OK


@pytest.fixture
async def sidecar(
    kafka: services.KafkaBroker, redis_server: services.RedisServer
) -> AsyncIterator[tuple[Sidecar, str, str]]:
    """A sidecar on a Redis store consuming a fresh two-partition topic; (sidecar, topic, group).
    Publishes go to ``{topic}-out`` (three partitions), made before the sidecar starts."""
    topic, group = unique("streams"), unique("g")
    kafka.create_topic(topic, 2)
    kafka.create_topic(f"{topic}-out", 3)
    store = {"backend": "redis", "redis_url": redis_server.url, "key_prefix": unique("p")}
    cfg = settings_dict(kafka, [topic], group, store, server={"max_stream_settles_in_flight": 16})
    async with running_sidecar(**cfg) as sc:
        yield sc, topic, group


@contextlib.asynccontextmanager
async def stub_of(sc: Sidecar) -> AsyncIterator[pb_grpc.DedupServiceAsyncStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sc.port}") as ch:
        yield pb_grpc.DedupServiceStub(ch)


def opening(topic: str, **limits: Any) -> pb.StreamingSubscribeRequest:
    return pb.StreamingSubscribeRequest(subscribe=pb.SubscribeRequest(topics=[topic], **limits))


def ack(rid: int, *ids: str) -> pb.StreamingSubscribeRequest:
    return pb.StreamingSubscribeRequest(ack=pb.StreamAck(request_id=rid, delivery_ids=list(ids)))


class StreamApp:
    """A StreamingSubscribe stream read in the background: deliveries and answers by request id."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.deliveries: list[pb.Delivery] = []
        self.answers: dict[int, pb.SettleResult] = {}
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for resp in self.call:
            self.deliveries += resp.deliveries
            for r in resp.results:
                assert r.request_id not in self.answers, f"request {r.request_id} answered twice"
                self.answers[r.request_id] = r
            self.changed.set()

    async def until(self, check: Any, timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                if self.task.done():
                    self.task.result()
                    raise AssertionError("the stream ended")
                self.changed.clear()
                await self.changed.wait()


async def test_acks_on_the_stream_settle_every_record_once_and_commit(
    sidecar: tuple[Sidecar, str, str], kafka: services.KafkaBroker
) -> None:
    sc, topic, group = sidecar
    n = 300
    raw_produce(kafka, topic, [(f"k{i}", b"v", i % 2) for i in range(n)])
    raw_produce(kafka, topic, [(f"k{i}", b"dup", i % 2) for i in range(0, n, 10)])  # duplicates
    async with stub_of(sc) as stub:
        app = StreamApp(stub.StreamingSubscribe())
        await app.call.write(opening(topic, max_in_flight=16))
        acked = 0
        while acked < n:
            await app.until(lambda done=acked: len(app.deliveries) > done)
            for d in app.deliveries[acked:]:
                acked += 1
                await app.call.write(ack(acked, d.delivery_id))  # one message per delivery
        await app.until(lambda: len(app.answers) == n)
        assert {tuple(r.results) for r in app.answers.values()} == {(OK,)}
        assert all(r.code == 0 for r in app.answers.values())
        keys = Counter(d.idempotency_key for d in app.deliveries)
        assert len(keys) == n
        assert max(keys.values()) == 1
        # Half-close: the stream ends with OK once everything is answered.
        await app.call.done_writing()
        await asyncio.wait_for(app.task, 10)
        assert await app.call.code() == grpc.StatusCode.OK
    deadline = asyncio.get_running_loop().time() + 20
    while sum(committed_offsets(kafka, group, topic, 2).values()) != n + n // 10:
        assert asyncio.get_running_loop().time() < deadline, committed_offsets(kafka, group, topic, 2)
        await asyncio.sleep(0.2)


async def test_each_settle_request_is_answered_on_its_own(
    sidecar: tuple[Sidecar, str, str], kafka: services.KafkaBroker
) -> None:
    sc, topic, _ = sidecar
    raw_produce(kafka, topic, [(f"a{i}", b"v", 0) for i in range(4)])
    async with stub_of(sc) as stub:
        app = StreamApp(stub.StreamingSubscribe())
        await app.call.write(opening(topic, max_in_flight=4))
        await app.until(lambda: len(app.deliveries) == 4)
        d0, d1, d2, d3 = (d.delivery_id for d in app.deliveries)
        await app.call.write(ack(1, d0))
        await app.until(lambda: 1 in app.answers)  # (acks in one group would both be OK)
        await app.call.write(ack(2, d0, "deadbeef.99"))  # repeated, and one this sidecar never issued
        await app.call.write(ack(3, "not-an-id"))  # malformed: this request fails, the stream goes on
        await app.call.write(ack(4))  # no ids
        await app.call.write(
            pb.StreamingSubscribeRequest(
                extend=pb.StreamExtendDeadline(request_id=5, delivery_ids=[d1], seconds=60)
            )
        )
        await app.call.write(
            pb.StreamingSubscribeRequest(
                extend=pb.StreamExtendDeadline(request_id=6, delivery_ids=[d1], seconds=0)
            )
        )
        await app.call.write(
            pb.StreamingSubscribeRequest(nack=pb.StreamNack(request_id=7, delivery_ids=[d2], delay_seconds=0))
        )
        await app.until(lambda: len(app.answers) == 7)
        a = app.answers
        assert list(a[1].results) == [OK]
        assert list(a[2].results) == [pb.ACK_RESULT_ALREADY_ACKED, pb.ACK_RESULT_UNKNOWN]
        assert a[3].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "malformed delivery id" in a[3].message
        assert a[4].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert not a[4].results
        assert list(a[5].results) == [OK]
        assert a[6].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "delivery.max_ack_deadline_seconds" in a[6].message
        assert list(a[7].results) == [OK]
        # The nacked record comes back on the stream, attempt 2.
        await app.until(lambda: len(app.deliveries) == 5)
        again = app.deliveries[4]
        assert again.idempotency_key == app.deliveries[2].idempotency_key
        assert again.attempt == 2
        await app.call.write(ack(8, d1, d3, again.delivery_id))
        await app.until(lambda: 8 in app.answers)
        assert list(app.answers[8].results) == [OK, OK, OK]
        app.call.cancel()


async def test_a_half_closed_stream_hands_its_unacked_deliveries_to_the_next(
    sidecar: tuple[Sidecar, str, str], kafka: services.KafkaBroker
) -> None:
    sc, topic, _ = sidecar
    raw_produce(kafka, topic, [(f"h{i}", b"v", i % 2) for i in range(10)])
    async with stub_of(sc) as stub:
        first = StreamApp(stub.StreamingSubscribe())
        await first.call.write(opening(topic, max_in_flight=10))
        await first.until(lambda: len(first.deliveries) == 10)
        for i, d in enumerate(first.deliveries[:4]):
            await first.call.write(ack(i + 1, d.delivery_id))
        await first.call.done_writing()
        await asyncio.wait_for(first.task, 10)
        assert len(first.answers) == 4
        assert await first.call.code() == grpc.StatusCode.OK
        second = StreamApp(stub.StreamingSubscribe())
        await second.call.write(opening(topic, max_in_flight=10))
        await second.until(lambda: len(second.deliveries) == 6)
        assert {d.idempotency_key for d in second.deliveries} == {
            d.idempotency_key for d in first.deliveries[4:]
        }
        assert {d.attempt for d in second.deliveries} == {2}
        second.call.cancel()


async def test_a_stream_that_breaks_the_protocol_gets_invalid_argument(
    sidecar: tuple[Sidecar, str, str],
) -> None:
    sc, topic, _ = sidecar
    async with stub_of(sc) as stub:
        call = stub.StreamingSubscribe()
        await call.write(ack(1, "deadbeef.1"))  # no subscribe first
        assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "must carry `subscribe`" in (await call.details() or "")
        call = stub.StreamingSubscribe()
        await call.write(opening(topic))
        await call.write(opening(topic))
        assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
        call = stub.StreamingSubscribe()
        await call.write(opening("no-such-topic"))
        assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "kafka.topics" in (await call.details() or "")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sc.port}") as ch:
        raw: Any = ch.stream_stream("/dedup.v1.DedupService/StreamingSubscribe")
        call = raw()
        await call.write(b"\xff\xff\xff")  # not a message
        assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
        publish: Any = ch.stream_stream("/dedup.v1.DedupService/StreamingPublish")()
        await publish.write(b"\x0a\xff")
        assert await publish.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_stream_that_never_reads_is_held_back_and_the_sidecar_serves_on(
    sidecar: tuple[Sidecar, str, str], kafka: services.KafkaBroker
) -> None:
    sc, topic, _ = sidecar
    raw_produce(kafka, topic, [(f"n{i}", b"v", 0) for i in range(3)])
    async with stub_of(sc) as stub:
        call = stub.StreamingSubscribe()
        await call.write(opening(topic, max_in_flight=1))
        big = [f"deadbeef.{i}" for i in range(2000)]
        written = 0

        async def flood() -> None:
            nonlocal written
            for i in range(100_000):
                await call.write(ack(i + 1, *big))
                written += 1

        task = asyncio.create_task(flood())
        # The sidecar stops reading past server.max_stream_settles_in_flight, and its answers
        # stop once the unread ones fill the caller's receive window (which gRPC's BDP probe
        # grows to a few MB): then flow control holds the writer, far short of what it tried to
        # send. Wait until it has stalled for a whole second.
        seen, deadline = -1, asyncio.get_running_loop().time() + 20
        while written != seen and asyncio.get_running_loop().time() < deadline:
            seen = written
            await asyncio.sleep(1)
        assert not task.done()
        assert written == seen, f"the writer was never held back ({written} requests written)"
        assert written < 10_000
        # Everything else is served meanwhile.
        async with stub_of(sc) as other:
            got = await other.Ack(pb.AckRequest(delivery_ids=["deadbeef.1"]), timeout=5)
            assert list(got.results) == [pb.ACK_RESULT_UNKNOWN]
        task.cancel()
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await task


async def test_streaming_publish_answers_each_record_by_its_request_id(
    sidecar: tuple[Sidecar, str, str], kafka: services.KafkaBroker
) -> None:
    sc, topic, _ = sidecar
    out = f"{topic}-out"
    n = 200
    async with stub_of(sc) as stub:
        call = stub.StreamingPublish()
        for i in range(n):
            rec = pb.PublishRequest(topic=out, value=b"v%d" % i, idempotency_key=f"e{i}")
            await call.write(pb.StreamingPublishRequest(request_id=i + 1, publish=rec))
        for i in range(0, n, 20):  # repeats: answered as duplicates
            rec = pb.PublishRequest(topic=out, value=b"v%d" % i, idempotency_key=f"e{i}")
            await call.write(pb.StreamingPublishRequest(request_id=1000 + i, publish=rec))
        other = pb.PublishRequest(topic=out, value=b"different", idempotency_key="e1")
        await call.write(pb.StreamingPublishRequest(request_id=5000, publish=other))
        await call.write(pb.StreamingPublishRequest(request_id=5001))
        bad = pb.PublishRequest(topic="bad topic", value=b"v")
        await call.write(pb.StreamingPublishRequest(request_id=5002, publish=bad))
        await call.done_writing()
        answers: dict[int, pb.StreamingPublishResult] = {}
        async for resp in call:
            for r in resp.results:
                assert r.request_id not in answers
                answers[r.request_id] = r
        assert await call.code() == grpc.StatusCode.OK
    assert len(answers) == n + n // 20 + 3
    firsts = {i: answers[i + 1] for i in range(n)}
    assert [(i, r.code, r.message) for i, r in firsts.items() if r.code or r.response.duplicate] == []
    for i in range(0, n, 20):
        again = answers[1000 + i]
        assert again.code == 0
        assert again.response.duplicate
        assert (again.response.partition, again.response.offset) == (
            firsts[i].response.partition,
            firsts[i].response.offset,
        )
    assert answers[5000].code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    assert answers[5001].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert answers[5002].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    keys = Counter(dict(m.headers())["idempotency-key"].decode() for m in read_topic(kafka, out, expect=n))
    assert len(keys) == n
    assert set(keys.values()) == {1}


async def test_concurrent_unary_calls_are_grouped_and_a_bad_one_fails_alone(
    sidecar: tuple[Sidecar, str, str], kafka: services.KafkaBroker
) -> None:
    sc, topic, group = sidecar
    n = 128
    raw_produce(kafka, topic, [(f"u{i}", b"v", i % 2) for i in range(n)])
    out = f"{topic}-out"
    async with stub_of(sc) as stub:
        deliveries: list[pb.Delivery] = []
        stream = stub.Subscribe(pb.SubscribeRequest(topics=[topic], max_in_flight=n))
        async for frame in stream:
            deliveries += frame.deliveries
            if len(deliveries) >= n:
                break
        stream.cancel()
        assert sc.engine is not None
        acks = sc.engine.settlement._acks
        runs_before = acks.runs
        calls = [stub.Ack(pb.AckRequest(delivery_ids=[d.delivery_id])) for d in deliveries]
        bad = stub.Ack(pb.AckRequest(delivery_ids=["bogus"]))
        results = await asyncio.gather(*calls, bad, return_exceptions=True)
        assert all(isinstance(r, pb.AckResponse) and list(r.results) == [OK] for r in results[:-1])
        assert isinstance(results[-1], grpc.aio.AioRpcError)
        assert results[-1].code() == grpc.StatusCode.INVALID_ARGUMENT
        # 128 calls at once were settled in fewer runs than calls (one each without the group
        # commit; how many share a run depends on how fast the calls arrive).
        assert acks.runs - runs_before <= n * 3 // 4
        # Publish: concurrent calls, some with one key, some refused; each its own answer.
        reqs = [pb.PublishRequest(topic=out, value=b"p", idempotency_key=f"q{i % 50}") for i in range(100)]
        reqs.append(pb.PublishRequest(topic=out, value=b"other", idempotency_key="q0"))
        published = await asyncio.gather(*(stub.Publish(r) for r in reqs), return_exceptions=True)
        firsts = [r for r in published[:100] if isinstance(r, pb.PublishResponse) and not r.duplicate]
        assert len(firsts) == 50
        assert all(isinstance(r, pb.PublishResponse) for r in published[:100])
        assert isinstance(published[100], grpc.aio.AioRpcError)
        assert published[100].code() == grpc.StatusCode.ALREADY_EXISTS
    keys = Counter(dict(m.headers())["idempotency-key"].decode() for m in read_topic(kafka, out, expect=50))
    assert len(keys) == 50
    assert set(keys.values()) == {1}
    deadline = asyncio.get_running_loop().time() + 20
    while sum(committed_offsets(kafka, group, topic, 2).values()) != n:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "streaming"])
async def test_the_python_client_retries_an_ack_the_store_could_not_take(
    streaming: bool, kafka: services.KafkaBroker, tmp_path: Any
) -> None:
    """Redis goes away between a delivery and its ack: the ack fails with UNAVAILABLE, the
    client sends it again until Redis is back, and the record is not delivered again."""
    topic, group = unique("retry"), unique("g")
    kafka.create_topic(topic, 1)
    raw_produce(kafka, topic, [(f"r{i}", b"v", 0) for i in range(5)])
    with services.RedisServer.start(tmp_path / "redis", appendonly="everysec") as redis:
        store = {"backend": "redis", "redis_url": redis.url, "key_prefix": unique("p")}
        cfg = settings_dict(kafka, [topic], group, store, delivery={"ack_deadline_seconds": 60})
        async with (
            running_sidecar(**cfg) as sc,
            DedupClient(f"127.0.0.1:{sc.port}", streaming=streaming, ack_retry_seconds=30) as client,
        ):
            got: list[Any] = []
            async with contextlib.aclosing(client.subscribe([topic], max_in_flight=5)) as messages:
                async for m in messages:
                    got.append(m)
                    if len(got) == 5:
                        break
                await asyncio.sleep(1.2)  # the claims reach the append-only file
                redis.kill()
                acks = [m.ack() for m in got]
                await asyncio.sleep(2)
                assert not any(a.done() for a in acks)  # failing, and being retried
                redis.restart()
                results = await asyncio.wait_for(asyncio.gather(*acks), 30)
                assert set(results) == {AckResult.OK}
                assert sc.engine is not None
                await asyncio.sleep(1)
                assert sc.engine.in_flight == 0


async def test_the_python_client_on_the_stream_paths(
    sidecar: tuple[Sidecar, str, str], kafka: services.KafkaBroker
) -> None:
    sc, topic, _ = sidecar
    out = f"{topic}-out"
    raw_produce(kafka, topic, [(f"c{i}", b"v", i % 2) for i in range(20)])
    async with DedupClient(f"127.0.0.1:{sc.port}", streaming=True) as client:
        first = await client.publish(out, b"x", idempotency_key="s1")
        again = await client.publish(out, b"x", idempotency_key="s1")
        assert not first.duplicate
        assert again.duplicate
        assert (again.partition, again.offset) == (first.partition, first.offset)
        with pytest.raises(PublishError) as refused:
            await client.publish(out, b"other", idempotency_key="s1")
        assert refused.value.code == grpc.StatusCode.ALREADY_EXISTS
        many = await asyncio.gather(*(client.publish(out, b"m", idempotency_key=f"m{i}") for i in range(50)))
        assert len({(r.partition, r.offset) for r in many}) == 50
        seen: Counter[str] = Counter()
        nacked = False
        async with contextlib.aclosing(client.subscribe([topic], max_in_flight=8)) as messages:
            async for m in messages:
                seen[m.idempotency_key] += 1
                if m.idempotency_key == "c3" and not nacked:
                    nacked = True
                    await m.nack(delay_seconds=0)
                    continue
                assert await m.ack() == AckResult.OK
                if sum(seen.values()) == 21:
                    break
        assert seen["c3"] == 2
        assert len(seen) == 20


async def test_a_credential_s_rights_hold_on_the_streams(kafka: services.KafkaBroker) -> None:
    """A caller that may subscribe to and publish to one topic only: the streams check the
    subscription when they open and each settle request and record as it comes."""
    mine, other = unique("mine"), unique("other")
    kafka.create_topic(mine, 1)
    kafka.create_topic(other, 1)
    raw_produce(kafka, other, [("o1", b"v", 0)])
    credentials = [
        {"name": "narrow", "token": "narrow-token", "subscribe": [mine], "publish": [mine]},
        {"name": "wide", "token": "wide-token", "subscribe": ["*"], "publish": ["*"]},
    ]
    cfg = settings_dict(kafka, [mine, other], unique("g"), server={"credentials": credentials})
    narrow = (("authorization", "Bearer narrow-token"),)
    wide = (("authorization", "Bearer wide-token"),)
    async with running_sidecar(**cfg) as sc, stub_of(sc) as stub:
        refused = stub.StreamingSubscribe(metadata=narrow)
        await refused.write(opening(other))
        assert await refused.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "server.credentials[0].subscribe" in (await refused.details() or "")
        nobody = stub.StreamingSubscribe()
        await nobody.write(opening(mine))
        assert await nobody.code() == grpc.StatusCode.UNAUTHENTICATED
        # The wide credential receives the other topic's record; the narrow one may not ack it.
        app = StreamApp(stub.StreamingSubscribe(metadata=wide))
        await app.call.write(opening(other))
        await app.until(lambda: len(app.deliveries) == 1)
        narrow_app = StreamApp(stub.StreamingSubscribe(metadata=narrow))
        await narrow_app.call.write(opening(mine))
        await narrow_app.call.write(ack(1, app.deliveries[0].delivery_id))
        await narrow_app.until(lambda: 1 in narrow_app.answers)
        assert narrow_app.answers[1].code == grpc.StatusCode.PERMISSION_DENIED.value[0]
        await app.call.write(ack(1, app.deliveries[0].delivery_id))
        await app.until(lambda: 1 in app.answers)
        assert list(app.answers[1].results) == [OK]
        publishing = stub.StreamingPublish(metadata=narrow)
        for rid, topic in ((1, mine), (2, other)):
            rec = pb.PublishRequest(topic=topic, value=b"v", idempotency_key=f"cred-{rid}")
            await publishing.write(pb.StreamingPublishRequest(request_id=rid, publish=rec))
        await publishing.done_writing()
        answers = {r.request_id: r for resp in [m async for m in publishing] for r in resp.results}
        assert answers[1].code == 0
        assert answers[2].code == grpc.StatusCode.PERMISSION_DENIED.value[0]
        assert "server.credentials[0].publish" in answers[2].message
        app.call.cancel()
        narrow_app.call.cancel()
