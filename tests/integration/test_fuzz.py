"""Fuzzing the API of a real sidecar process on a real broker.

Hypothesis drives random, interleaved sequences of every RPC with random and malformed fields:
unknown, duplicate, stale and forged delivery ids, acks of another stream's deliveries, huge and
empty fields, unknown enum values, invalid UTF-8 in string fields (sent as raw bytes, the only way
the wire carries it), and arbitrary bytes as any method's request. The stream RPCs take the same
settle requests as stream messages (StreamingSubscribe), interleaved with the unary calls, plus
protocol breaks (a second subscribe, an empty request), streams that never read, and half-closes;
StreamingPublish takes the same records as Publish. Invariants:

- every call is answered with a precise status: never UNKNOWN, INTERNAL or UNAVAILABLE, and the
  process never exits;
- a record whose Ack was answered OK is never sent again: no delivery of its key leaves the sidecar
  after the answer (the send time is the delivery's deadline_ms less the ack deadline, on this
  machine's clock; a frame sent before the Ack took effect may reach a slow reader later, which is
  not a redelivery);
- nothing is committed that was not settled: every offset below a committed offset was acked OK or
  dead-lettered by these calls.

``FUZZ_EXAMPLES`` sets the number of sequences (a quick profile by default; the
reliability script runs a long one and reports the counts it prints).
"""

from __future__ import annotations

import os
import queue
import random
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import services
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from sidecar._proto import dedup_pb2 as pb
from sidecar._proto import dedup_pb2_grpc as pb_grpc
from tests.integration.helpers import (
    SidecarProcess,
    committed_offsets,
    process_env,
    raw_produce,
    read_topic,
    unique,
)

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "12"))
PARTITIONS = 2
MAX_MESSAGE = 50_000  # publish.max_message_bytes of the fuzzed sidecar
ACK_DEADLINE_S = 30  # delivery.ack_deadline_seconds (the default) of the fuzzed sidecar
CLOCK_SLACK_S = 0.005  # deadline_ms is rounded to the millisecond
#: The codes a precise answer may carry. UNKNOWN, INTERNAL and UNAVAILABLE mean a bug or a crash.
PRECISE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.OUT_OF_RANGE,
}
METHODS = [
    f"/dedup.v1.DedupService/{m}" for m in pb.DESCRIPTOR.services_by_name["DedupService"].methods_by_name
]
METHODS += [
    f"/dedup.v1.AdminService/{m}" for m in pb.DESCRIPTOR.services_by_name["AdminService"].methods_by_name
]


@dataclass
class Seen:
    """What the fuzzer's calls did, shared with the stream readers."""

    topics: list[str]
    lock: threading.Lock = field(default_factory=threading.Lock)
    delivered: dict[str, pb.Delivery] = field(default_factory=dict)  # by delivery id
    #: idempotency key -> (wall-clock time its Ack was answered OK, the delivery id acked)
    acked_at: dict[str, tuple[float, str]] = field(default_factory=dict)
    settled: set[tuple[str, int, int]] = field(default_factory=set)
    redelivered_after_ack: list[str] = field(default_factory=list)
    imprecise: list[str] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    deliveries: int = 0
    errors: list[str] = field(default_factory=list)
    #: (method, ids, results, when answered) of the settling calls
    journal: list[tuple[str, list[str], Any, float]] = field(default_factory=list)
    received: dict[str, float] = field(default_factory=dict)  # delivery id -> when the reader got it
    started: float = field(default_factory=time.monotonic)

    def ids(self) -> list[str]:
        with self.lock:
            return list(self.delivered)[-200:]


@dataclass
class Fuzzed:
    proc: SidecarProcess
    topics: list[str]
    group: str
    seen: Seen
    channel: grpc.Channel


@pytest.fixture(scope="module")
def fuzzed(kafka: services.KafkaBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    topics = [unique("fz-a"), unique("fz-b")]
    for t in topics:
        kafka.create_topic(t, PARTITIONS)
    tmp = tmp_path_factory.mktemp("fuzz")
    group = unique("g")
    env = process_env(kafka, topics[0], group, None)
    env.update(
        {
            "DEDUP_KAFKA__TOPICS": f'["{topics[0]}", "{topics[1]}"]',
            "DEDUP_STORE__SQLITE_PATH": str(tmp / "dedup.sqlite3"),
            "DEDUP_PUBLISH__MAX_MESSAGE_BYTES": str(MAX_MESSAGE),
            "DEDUP_PUBLISH__MAX_BATCH_ENTRIES": "50",
            "DEDUP_SERVER__MAX_IDS_PER_CALL": "100",
            "DEDUP_SERVER__MAX_STREAMS": "6",
            "DEDUP_DELIVERY__DEAD_LETTER_TOPIC": topics[0] + ".dlq",
        }
    )
    kafka.create_topic(topics[0] + ".dlq", 1)
    proc = SidecarProcess(env, Path(tmp) / "sidecar.log")
    proc.start()
    import asyncio

    asyncio.run(proc.wait_serving())
    channel = grpc.insecure_channel(proc.target)
    try:
        yield Fuzzed(proc, topics, group, Seen(topics), channel)
    finally:
        channel.close()
        assert proc.proc is not None
        assert proc.proc.poll() is None, f"the sidecar exited: {proc.log_path.read_text()[-3000:]}"
        assert proc.terminate() == 0, proc.log_path.read_text()[-3000:]


# -- raw protobuf, for what the generated classes refuse to write (invalid UTF-8) ----------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def raw_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


INVALID_UTF8 = st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"ok\xf0\x28\x8c\x28", b"\x80" * 10])


# -- strategies --------------------------------------------------------------------------------


def topic_strategy(topics: list[str]) -> st.SearchStrategy[str]:
    odd = ["", "no-such-topic-zz", "bad topic!", "x" * 300, "..", "\u00e9t\u00e9"]
    return st.one_of(st.sampled_from(topics), st.sampled_from(odd), st.text(max_size=12))


def publish_request(topics: list[str]) -> st.SearchStrategy[pb.PublishRequest]:
    return st.builds(
        lambda topic, value, key, headers, ikey, partition: pb.PublishRequest(
            topic=topic,
            value=value,
            key=key,
            headers=[pb.Header(key=k, value=v) for k, v in headers],
            idempotency_key=ikey,
            partition=partition,
        ),
        topic=st.one_of(st.sampled_from(topics), topic_strategy(topics)),
        value=st.one_of(st.binary(max_size=64), st.just(b""), st.just(b"v" * (MAX_MESSAGE + 1))),
        key=st.one_of(st.none(), st.binary(max_size=16)),
        headers=st.lists(st.tuples(st.text(max_size=10), st.binary(max_size=10)), max_size=3),
        ikey=st.one_of(st.uuids().map(str), st.just(""), st.text(max_size=8), st.just("k" * 5000)),
        partition=st.one_of(st.none(), st.integers(-3, PARTITIONS + 2)),
    )


ID = st.one_of(
    st.just("known"),  # replaced by a delivered id
    st.just("known"),
    st.text(max_size=20),
    st.builds(lambda h, n: f"{h:08x}.{n}", st.integers(0, 2**32 - 1), st.integers(0, 10**6)),
    st.just(""),
    st.just("z" * 3000),
)
UNARY_OPS = ["publish", "batch", "subscribe", "ack", "ack", "ack", "nack", "extend", "raw", "utf8", "admin"]
STREAM_OPS = ["stream", "stream_settle", "stream_settle", "stream_settle", "stream_publish", "deaf"]
OPS = st.sampled_from([*UNARY_OPS, *STREAM_OPS])
#: Stream methods: raw bytes to them open a stream, which is then half-closed.
STREAMING = ("/StreamingSubscribe", "/StreamingPublish")


class BidiStream:
    """A StreamingSubscribe call of the fuzzer: requests go in through a queue (None half-closes),
    and a thread reads the deliveries and the answers."""

    def __init__(self, driver: Driver, first: pb.StreamingSubscribeRequest, read: bool = True) -> None:
        self.driver = driver
        self.requests: queue.Queue[pb.StreamingSubscribeRequest | None] = queue.Queue()
        self.requests.put(first)
        self.asked: dict[int, tuple[str, list[str]]] = {}
        self.ids = iter(range(1, 10**9))
        self.call = driver.stub.StreamingSubscribe(self._feed(), timeout=120)
        self.thread = threading.Thread(target=self._read, daemon=True)
        if read:
            self.thread.start()

    def _feed(self) -> Iterator[pb.StreamingSubscribeRequest]:
        while (item := self.requests.get()) is not None:
            yield item

    def settle(self, kind: str, ids: list[str], **fields: Any) -> None:
        rid = next(self.ids)
        self.asked[rid] = (kind, ids)
        self.driver.seen.calls[f"stream {kind}"] = self.driver.seen.calls.get(f"stream {kind}", 0) + 1
        if kind == "ack":
            self.requests.put(
                pb.StreamingSubscribeRequest(ack=pb.StreamAck(request_id=rid, delivery_ids=ids))
            )
        elif kind in ("nack", "dead-letter"):
            nack = pb.StreamNack(
                request_id=rid, delivery_ids=ids, dead_letter=kind == "dead-letter", **fields
            )
            self.requests.put(pb.StreamingSubscribeRequest(nack=nack))
        else:
            extend = pb.StreamExtendDeadline(request_id=rid, delivery_ids=ids, **fields)
            self.requests.put(pb.StreamingSubscribeRequest(extend=extend))

    def _read(self) -> None:
        seen = self.driver.seen
        try:
            for resp in self.call:
                self.driver.record(resp.deliveries)
                for r in resp.results:
                    kind, ids = self.asked.pop(r.request_id, ("?", []))
                    if kind == "?":
                        seen.imprecise.append(
                            f"StreamingSubscribe: an answer to unknown request {r.request_id}"
                        )
                    elif r.code == 0:
                        if len(r.results) != len(ids):
                            seen.imprecise.append(
                                f"stream {kind}: {len(r.results)} results for {len(ids)} ids"
                            )
                        elif kind == "extend":
                            seen.journal.append(("stream extend", ids, list(r.results), time.monotonic()))
                        else:
                            self.driver.settle(kind, ids, r.results)
                    elif grpc.StatusCode(_STATUS[r.code]) not in PRECISE:
                        seen.imprecise.append(f"stream {kind}: {_STATUS[r.code].name}: {r.message}")
        except grpc.RpcError as exc:
            if exc.code() not in PRECISE | {grpc.StatusCode.CANCELLED}:
                seen.imprecise.append(f"StreamingSubscribe: {exc.code().name}: {exc.details()}")

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()
        if self.thread.is_alive():
            self.thread.join(10)


_STATUS = {c.value[0]: c for c in grpc.StatusCode}


# -- the driver --------------------------------------------------------------------------------


class Driver:
    def __init__(self, fz: Fuzzed) -> None:
        self.fz = fz
        self.seen = fz.seen
        self.stub = pb_grpc.DedupServiceStub(fz.channel)
        self.admin = pb_grpc.AdminServiceStub(fz.channel)
        self.streams: list[tuple[Any, threading.Thread]] = []
        self.bidi: list[BidiStream] = []
        self.rng = random.Random(len(fz.seen.journal))

    def call(self, name: str, fn: Callable[[], Any]) -> Any:
        self.seen.calls[name] = self.seen.calls.get(name, 0) + 1
        try:
            return fn()
        except grpc.RpcError as exc:
            code = exc.code()
            if code not in PRECISE:
                self.seen.imprecise.append(f"{name}: {code.name}: {exc.details()}")
            return None

    def pick_ids(self, picks: list[str]) -> list[str]:
        known = self.seen.ids()
        out = []
        for p in picks:
            out.append(known[self.rng.randrange(len(known))] if p == "known" and known else p)
        return out

    def warm_up(self) -> None:
        """Every sequence starts with data to work on: a stream, and fresh records published."""
        req = pb.SubscribeRequest(topics=self.fz.topics, max_in_flight=200)
        self.open_stream(req)
        entries = [
            pb.PublishRequest(topic=self.fz.topics[i % 2], value=os.urandom(8), idempotency_key=unique("w"))
            for i in range(20)
        ]
        self.call("PublishBatch", lambda: self.stub.PublishBatch(pb.PublishBatchRequest(entries=entries)))
        time.sleep(0.3)

    def open_stream(self, req: pb.SubscribeRequest) -> None:
        self.seen.calls["Subscribe"] = self.seen.calls.get("Subscribe", 0) + 1
        call = self.stub.Subscribe(req, timeout=120)
        t = threading.Thread(target=self.read, args=(call,), daemon=True)
        t.start()
        self.streams.append((call, t))

    def settle(self, method: str, ids: list[str], results: Any) -> None:
        """Record an Ack's or a Nack's answers. Only an OK Ack settles a record for these checks:
        a Nack's OK means "given back", also for an earlier delivery id whose record is already
        on its way again, and dead letters are read back from the dead-letter topic instead."""
        now, wall = time.monotonic(), time.time()
        self.seen.journal.append((method, ids, list(results), now))
        if method != "ack":
            return
        with self.seen.lock:
            for did, result in zip(ids, results, strict=True):
                d = self.seen.delivered.get(did)
                if d is None or result != pb.ACK_RESULT_OK:
                    continue
                self.seen.settled.add((d.topic, d.partition, d.offset))
                self.seen.acked_at.setdefault(d.idempotency_key, (wall, did))

    def story(self, d: pb.Delivery, late: float) -> str:
        """What the calls did to a record's deliveries: for a failure message."""
        ids = {i for i, x in self.seen.delivered.items() if x.idempotency_key == d.idempotency_key}
        ids.add(d.delivery_id)
        calls = []
        for method, called, results, at in self.seen.journal:
            mine = [(i, r) for i, r in zip(called, results or [None] * len(called), strict=True) if i in ids]
            if mine:
                calls.append((method, round(at - self.seen.started, 2), mine))
        got = sorted(
            (round(self.seen.received[i] - self.seen.started, 2), i) for i in ids if i in self.seen.received
        )
        return (
            f"{d.topic}[{d.partition}]@{d.offset} key {d.idempotency_key!r} delivered as {d.delivery_id} "
            f"(attempt {d.attempt}), sent {late:.3f}s after an OK ack; received {got}; calls {calls}"
        )

    def record(self, deliveries: Any) -> None:
        """Deliveries that reached a stream (Subscribe or StreamingSubscribe)."""
        now = time.monotonic()
        with self.seen.lock:
            for d in deliveries:
                self.seen.deliveries += 1
                acked = self.seen.acked_at.get(d.idempotency_key)
                # When the sidecar sent it: its deadline less the ack deadline (the
                # sidecar's clock is this machine's). A frame sent before the Ack took
                # effect may reach this thread late; one sent after it is a redelivery.
                sent = d.deadline_ms / 1000 - ACK_DEADLINE_S
                if acked is not None and sent > acked[0] + CLOCK_SLACK_S:
                    self.seen.redelivered_after_ack.append(self.story(d, sent - acked[0]))
                self.seen.delivered[d.delivery_id] = d
                self.seen.received[d.delivery_id] = now

    def read(self, call: Any) -> None:
        try:
            for frame in call:
                self.record(frame.deliveries)
        except grpc.RpcError as exc:
            if exc.code() not in PRECISE | {grpc.StatusCode.CANCELLED}:
                self.seen.imprecise.append(f"Subscribe: {exc.code().name}: {exc.details()}")

    def run(self, op: str, data: st.DataObject) -> None:
        topics = self.fz.topics
        if op == "publish":
            self.call("Publish", lambda: self.stub.Publish(data.draw(publish_request(topics)), timeout=30))
        elif op == "batch":
            entries = data.draw(st.lists(publish_request(topics), max_size=60))
            self.call("PublishBatch", lambda: self.stub.PublishBatch(pb.PublishBatchRequest(entries=entries)))
        elif op == "subscribe":
            sub = pb.SubscribeRequest(
                topics=data.draw(
                    st.lists(st.one_of(st.sampled_from(topics), topic_strategy(topics)), max_size=3)
                ),
                max_in_flight=data.draw(st.integers(-5, 3000)),
                max_in_flight_bytes=data.draw(st.integers(-5, 10**7)),
                max_batch=data.draw(st.integers(-5, 700)),
                ordering=data.draw(st.integers(0, 6)),  # type: ignore[arg-type]  # 4..6: not in the enum
            )
            self.open_stream(sub)
            time.sleep(0.2)
        elif op in ("ack", "nack", "extend"):
            mode = data.draw(st.sampled_from(["known", "known", "known", "mixed"]))
            if mode == "known":  # a well-formed call on delivered ids (some acked, some stale)
                ids = self.pick_ids(["known"] * data.draw(st.integers(1, 40)))
            else:  # one malformed id makes the whole call INVALID_ARGUMENT
                ids = self.pick_ids(data.draw(st.lists(ID, max_size=120)))
            if op == "ack":
                r = self.call("Ack", lambda: self.stub.Ack(pb.AckRequest(delivery_ids=ids)))
                if r is not None:
                    self.settle("ack", ids, r.results)
            elif op == "nack":
                dead = data.draw(st.booleans())
                delay = data.draw(st.one_of(st.none(), st.floats(), st.floats(-10, 5)))
                nack = pb.NackRequest(
                    delivery_ids=ids,
                    delay_seconds=delay,
                    dead_letter=dead,
                    reason=data.draw(st.text(max_size=30)),
                )
                r = self.call("Nack", lambda: self.stub.Nack(nack))
                if r is not None:
                    self.settle("dead-letter" if dead else "nack", ids, r.results)
            else:
                seconds = data.draw(st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(5, 60)))
                extend = pb.ExtendDeadlineRequest(delivery_ids=ids, seconds=seconds)
                r = self.call("ExtendDeadline", lambda: self.stub.ExtendDeadline(extend))
                answer = list(r.results) if r else None
                self.seen.journal.append((f"extend {seconds}", ids, answer, time.monotonic()))
        elif op in ("stream", "deaf"):
            first = pb.StreamingSubscribeRequest(
                subscribe=pb.SubscribeRequest(
                    topics=data.draw(st.lists(st.sampled_from(topics), max_size=2)),
                    max_in_flight=data.draw(st.integers(-2, 300)),
                    max_batch=data.draw(st.integers(0, 50)),
                )
            )
            self.seen.calls[f"StreamingSubscribe ({op})"] = (
                self.seen.calls.get(f"StreamingSubscribe ({op})", 0) + 1
            )
            self.bidi.append(BidiStream(self, first, read=op == "stream"))
            time.sleep(0.2)
        elif op == "stream_settle":
            live = [b for b in self.bidi if b.thread.is_alive()]
            if not live:  # settle requests need a stream that reads: open one
                first = pb.StreamingSubscribeRequest(subscribe=pb.SubscribeRequest(max_in_flight=100))
                live = [BidiStream(self, first)]
                self.bidi += live
                time.sleep(0.2)
            stream = live[self.rng.randrange(len(live))]
            what = data.draw(
                st.sampled_from(["ack", "ack", "ack", "nack", "dead-letter", "extend", "break", "close"])
            )
            mode = data.draw(st.sampled_from(["known", "known", "mixed"]))
            count = data.draw(st.integers(0, 30))
            ids = self.pick_ids(
                ["known"] * count if mode == "known" else data.draw(st.lists(ID, max_size=60))
            )
            if what == "ack":
                stream.settle("ack", ids)
            elif what in ("nack", "dead-letter"):
                delay = data.draw(st.one_of(st.none(), st.floats(-10, 5)))
                stream.settle(what, ids, **({} if delay is None else {"delay_seconds": delay}))
            elif what == "extend":
                stream.settle("extend", ids, seconds=data.draw(st.integers(-5, 100)))
            elif what == "break":  # a second subscribe, or an empty request: INVALID_ARGUMENT
                stream.requests.put(
                    data.draw(
                        st.sampled_from(
                            [
                                pb.StreamingSubscribeRequest(),
                                pb.StreamingSubscribeRequest(subscribe=pb.SubscribeRequest()),
                            ]
                        )
                    )
                )
            else:  # half-close: answered, then ended
                stream.requests.put(None)
            time.sleep(0.05)
        elif op == "stream_publish":
            records = data.draw(st.lists(publish_request(topics), max_size=12))
            requests = [
                pb.StreamingPublishRequest(request_id=i + 1, publish=r) for i, r in enumerate(records)
            ]
            if data.draw(st.booleans()):
                requests.append(pb.StreamingPublishRequest(request_id=999))  # no record
            self.seen.calls["StreamingPublish"] = self.seen.calls.get("StreamingPublish", 0) + 1
            answered = 0
            try:
                for resp in self.stub.StreamingPublish(iter(requests), timeout=60):
                    for r in resp.results:
                        answered += 1
                        if r.code and _STATUS[r.code] not in PRECISE:
                            self.seen.imprecise.append(
                                f"StreamingPublish: {_STATUS[r.code].name}: {r.message}"
                            )
            except grpc.RpcError as exc:
                self.seen.imprecise.append(f"StreamingPublish: {exc.code().name}: {exc.details()}")
            if answered != len(requests):
                self.seen.imprecise.append(f"StreamingPublish: {answered} answers to {len(requests)} records")
        elif op == "raw":
            method = data.draw(st.sampled_from(METHODS))
            body = data.draw(st.binary(max_size=300))
            self.raw(method, body)
        elif op == "utf8":
            bad = data.draw(INVALID_UTF8)
            method, body = data.draw(
                st.sampled_from(
                    [
                        ("/dedup.v1.DedupService/Publish", raw_field(1, bad) + raw_field(3, b"v")),
                        (
                            "/dedup.v1.DedupService/Publish",
                            raw_field(1, topics[0].encode()) + raw_field(5, bad),
                        ),
                        ("/dedup.v1.DedupService/Ack", raw_field(1, bad)),
                        ("/dedup.v1.DedupService/Subscribe", raw_field(1, bad)),
                        ("/dedup.v1.AdminService/GetKey", raw_field(1, bad) + raw_field(2, b"k")),
                    ]
                )
            )
            code = self.raw(method, body)
            if code is not grpc.StatusCode.INVALID_ARGUMENT:
                self.seen.imprecise.append(f"invalid UTF-8 to {method}: {code}")
        else:
            req = pb.GetKeyRequest(
                topic=data.draw(topic_strategy(topics)), idempotency_key=data.draw(st.text())
            )
            self.call("GetKey", lambda: self.admin.GetKey(req))
            self.call("Status", lambda: self.admin.Status(pb.StatusRequest()))

    def raw(self, method: str, body: bytes) -> grpc.StatusCode:
        """Arbitrary bytes as the request of ``method``: the answer's code."""
        self.seen.calls["raw"] = self.seen.calls.get("raw", 0) + 1
        if method.endswith(STREAMING):
            bidi: Any = self.fz.channel.stream_stream(method)(iter([body]), timeout=2)  # type: ignore[arg-type]
            try:
                for _ in bidi:
                    pass
            except grpc.RpcError as exc:
                if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                    return grpc.StatusCode.OK  # a valid first request: the stream was open
                if exc.code() not in PRECISE:
                    self.seen.imprecise.append(f"raw {method}: {exc.code().name}: {exc.details()}")
                return exc.code()
            return grpc.StatusCode.OK
        if method.endswith("/Subscribe"):
            call: Any = self.fz.channel.unary_stream(method)(body, timeout=2)  # type: ignore[arg-type]
            try:
                for _ in call:
                    break
            except grpc.RpcError as exc:
                if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                    return grpc.StatusCode.OK  # a valid request: the stream was open
                if exc.code() not in PRECISE:
                    self.seen.imprecise.append(f"raw {method}: {exc.code().name}: {exc.details()}")
                return exc.code()
            call.cancel()
            return grpc.StatusCode.OK
        try:
            self.fz.channel.unary_unary(method)(body, timeout=30)  # type: ignore[arg-type]
        except grpc.RpcError as exc:
            if exc.code() not in PRECISE:
                self.seen.imprecise.append(f"raw {method}: {exc.code().name}: {exc.details()}")
            return exc.code()
        return grpc.StatusCode.OK

    def close(self) -> None:
        for call, t in self.streams:
            call.cancel()
            t.join(10)
        for b in self.bidi:
            b.close()


def assert_serving(fz: Fuzzed) -> None:
    assert fz.proc.proc is not None
    assert fz.proc.proc.poll() is None, f"the sidecar exited: {fz.proc.log_path.read_text()[-3000:]}"
    r = health_pb2_grpc.HealthStub(fz.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert r.status == health_pb2.HealthCheckResponse.SERVING


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    # The sidecar's state carries over between sequences, so a failing sequence cannot be replayed
    # to shrink it: report it as found (the assertion lists what was seen).
    phases=[Phase.generate],
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
    derandomize=os.environ.get("FUZZ_SEED") is None and EXAMPLES <= 50,
)
@given(ops=st.lists(OPS, min_size=8, max_size=30), data=st.data())
def test_random_call_sequences(fuzzed: Fuzzed, ops: list[str], data: st.DataObject) -> None:
    """Only drives and records: the sidecar's state carries over between sequences, so hypothesis
    could not replay a failing one. test_the_contract_held_under_fuzzing checks what was seen."""
    driver = Driver(fuzzed)
    try:
        driver.warm_up()
        for op in ops:
            driver.run(op, data)
    except Exception:  # noqa: BLE001  # a failure of the driver itself: reported by the check below
        fuzzed.seen.errors.append(traceback.format_exc())
    finally:
        driver.close()
    try:
        assert_serving(fuzzed)
    except Exception:  # noqa: BLE001
        fuzzed.seen.errors.append(traceback.format_exc())


def test_the_contract_held_under_fuzzing(fuzzed: Fuzzed, kafka: services.KafkaBroker) -> None:
    """Runs after the sequences (same module): precise answers, no redelivery after an OK ack,
    and every committed offset covers settled records only."""
    seen = fuzzed.seen
    assert not seen.errors, seen.errors[0]
    assert seen.calls, "test_random_call_sequences did not run first"
    assert not seen.imprecise, seen.imprecise[:10]
    assert_serving(fuzzed)
    time.sleep(1.0)  # past commit.interval_ms for the last acks
    # Dead letters settle records: the app's (Nack with dead_letter) and the sidecar's own (past
    # delivery.max_attempts). The dead-letter topic says which (its provenance headers).
    sidecar_dead_letters = 0
    for m in read_topic(kafka, fuzzed.topics[0] + ".dlq", timeout=5):
        h = {k: v for k, v in m.headers() or []}
        source = (
            h["dedup-original-topic"].decode(),
            int(h["dedup-original-partition"]),
            int(h["dedup-original-offset"]),
        )
        if source not in seen.settled:
            sidecar_dead_letters += 1
            seen.settled.add(source)
    covered = 0
    for topic in fuzzed.topics:
        for partition, committed in committed_offsets(kafka, fuzzed.group, topic, PARTITIONS).items():
            for offset in range(max(committed, 0)):
                if (topic, partition, offset) not in seen.settled:
                    ids = [
                        i
                        for i, d in seen.delivered.items()
                        if (d.topic, d.partition, d.offset) == (topic, partition, offset)
                    ]
                    calls = [c for c in seen.journal if set(c[1]) & set(ids)]
                    raise AssertionError(
                        (topic, partition, offset, committed, ids, calls, [seen.delivered[i] for i in ids])
                    )
            covered += max(committed, 0)
    found = seen.redelivered_after_ack
    print(
        f"\nfuzz: {EXAMPLES} sequences, {sum(seen.calls.values())} calls {dict(sorted(seen.calls.items()))}, "
        f"{seen.deliveries} deliveries, {len(seen.settled)} settled ({sidecar_dead_letters} "
        f"dead-lettered, by the app or after delivery.max_attempts), {covered} committed; "
        "0 imprecise answers; "
        f"{len(found)} deliveries sent after an OK ack"
    )
    if found:
        (fuzzed.proc.log_path.parent / "redelivered-after-ack.txt").write_text("\n".join(found))
    assert not found, found[:3]


def test_malformed_http2_frames_do_not_hurt_the_server(fuzzed: Fuzzed) -> None:
    """Raw bytes on the port: no preface, a bad preface, truncated and oversized frames, garbage
    HPACK. Each connection is dropped by the server; the server keeps serving."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    settings_frame = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    cases = [
        os.urandom(512),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        preface,
        preface + settings_frame[:5],  # a truncated frame header
        preface + settings_frame + b"\xff\xff\xff\x00\x00\x00\x00\x00\x01" + os.urandom(64),  # 16 MiB DATA
        preface + settings_frame + b"\x00\x00\x10\x01\x04\x00\x00\x00\x01" + os.urandom(16),  # bad HPACK
        preface + settings_frame + b"\x00\x00\x04\x08\x00\x00\x00\x00\x00\x7f\xff\xff\xff",  # huge window
        preface + os.urandom(4096),
    ]
    host, port = fuzzed.proc.target.rsplit(":", 1)
    for payload in cases:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            try:
                s.sendall(payload)
                s.settimeout(2)
                while s.recv(65536):
                    pass
            except OSError:
                pass  # reset by the server, or it waited for more: either is fine
        assert_serving(fuzzed)
    # And a real call still works on a fresh connection.
    with grpc.insecure_channel(fuzzed.proc.target) as ch:
        r = pb_grpc.DedupServiceStub(ch).Publish(
            pb.PublishRequest(topic=fuzzed.topics[0], value=b"after", idempotency_key=unique("after")),
            timeout=30,
        )
        assert r.topic == fuzzed.topics[0]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def test_clients_that_never_read_do_not_grow_memory_or_starve_others(
    kafka: services.KafkaBroker, tmp_path: Path
) -> None:
    """Ten streams that never read hold what they were sent, and three more read one record every
    quarter second; the sidecar's RSS stays flat as more data flows past them, and a reading client
    still gets every record (the held ones once their ack deadline passes) while Publish answers
    promptly."""
    import asyncio
    import contextlib

    from dedup_client import DedupClient

    topic = unique("slow")
    kafka.create_topic(topic, 4)
    env = process_env(kafka, topic, unique("g"), None)
    env.update(
        {
            "DEDUP_STORE__BACKEND": "memory",
            "DEDUP_DELIVERY__ACK_DEADLINE_SECONDS": "3",
            "DEDUP_DELIVERY__LEASE_MARGIN_SECONDS": "0",
            "DEDUP_DELIVERY__DEFAULT_MAX_IN_FLIGHT": "200",
        }
    )
    proc = SidecarProcess(env, tmp_path / "sidecar.log")
    proc.start()
    await proc.wait_serving()
    assert proc.proc is not None
    pid = proc.proc.pid
    value = os.urandom(8192)
    slow: list[grpc.Channel] = []
    try:
        for _ in range(10):  # each on its own connection, never iterated
            ch = grpc.insecure_channel(proc.target)
            pb_grpc.DedupServiceStub(ch).Subscribe(pb.SubscribeRequest(topics=[topic]))
            slow.append(ch)
        await asyncio.sleep(1)
        seen: set[str] = set()
        rss: list[float] = []

        async def read_slowly(client: DedupClient) -> None:
            async for m in client.subscribe(topics=[topic], max_in_flight=50):
                seen.add(m.idempotency_key)
                m.ack()
                await asyncio.sleep(0.25)

        async with contextlib.AsyncExitStack() as clients:
            slow_readers = [await clients.enter_async_context(DedupClient(proc.target)) for _ in range(3)]
            readers = [asyncio.create_task(read_slowly(c)) for c in slow_readers]
            good = await clients.enter_async_context(DedupClient(proc.target))
            stream = good.subscribe(topics=[topic], max_in_flight=500)

            async def read() -> None:
                async for m in stream:
                    seen.add(m.idempotency_key)
                    m.ack()

            readers.append(asyncio.create_task(read()))

            async def receive(until: int) -> None:
                async with asyncio.timeout(60):
                    while len(seen) < until:
                        await asyncio.sleep(0.05)

            for phase in range(3):
                keys = [f"{phase}-{i}" for i in range(3000)]
                target = len(seen) + len(keys) + 1  # + the probe; the slow readers take some too
                await asyncio.to_thread(raw_produce, kafka, topic, [(k, value, None) for k in keys])
                started = time.monotonic()
                await good.publish(topic, b"probe", idempotency_key=unique("probe"))
                assert time.monotonic() - started < 3, "Publish stalled behind the slow streams"
                await receive(target)
                rss.append(rss_mb(pid))
            for r in readers:
                assert not r.done(), r  # still being served, slowly
                r.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
        print(
            f"\nRSS after each 3,000 x 8 KiB phase with 10 streams never reading, 3 reading slowly: {rss} MB"
        )
        # Flat once warm: the third phase costs no more memory than the second.
        assert rss[2] - rss[1] < 40, rss
    finally:
        for ch in slow:
            ch.close()
        assert proc.terminate() == 0, proc.log_path.read_text()[-3000:]
