"""The stream paths: acks on the stream that brings the deliveries (StreamingSubscribe), and
publishes on one stream with correlation ids (StreamingPublish).

An ack then costs the sidecar a stream message instead of a call, and needs no linger: acks made
in one event-loop turn go in one StreamAck, the rest at once. The writer of each stream is one
task, since gRPC allows one write at a time per call.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncGenerator, Callable
from typing import Any

import grpc

from dedup_client._proto import dedup_pb2 as pb
from dedup_client._proto import dedup_pb2_grpc as pb_grpc

#: gRPC status codes by their number (SettleResult.code, StreamingPublishResult.code).
STATUS_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}


class StreamClosed(Exception):
    """The stream ended before the sidecar answered a request written on it."""


def _fail_all(waiters: dict[int, Any], exc: Exception) -> None:
    for fut in waiters.values():
        futs = fut if isinstance(fut, list) else [fut]
        for f in futs:
            if not f.done():
                f.set_exception(exc)
                f.exception()  # its caller may have stopped waiting
    waiters.clear()


class _Writer:
    """One task that writes a call's requests in order."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._task = asyncio.create_task(self._run())
        self.failed: BaseException | None = None

    def put(self, request: Any) -> None:
        self._queue.put_nowait(request)

    async def _run(self) -> None:
        try:
            while True:
                request = await self._queue.get()
                if request is None:
                    await self._call.done_writing()
                    return
                await self._call.write(request)
        except Exception as exc:  # noqa: BLE001 - the call ended (or was never usable): its reader reports why
            self.failed = exc

    def close(self) -> None:
        self._task.cancel()


#: (stream, ids, futures, code, message) -> True when the client took the failed ack over.
RetryAck = Callable[["SubscribeStream", list[str], list[asyncio.Future[Any]], grpc.StatusCode, str], bool]


class SubscribeStream:
    """One StreamingSubscribe call. ``frames`` yields each frame's deliveries; ``ack`` and
    ``settle`` write settle requests on the same call and resolve with its answers (``result``
    of each per-id code).

    ``retry_ack(stream, ids, futures, code, message)`` is called for an ack that failed as a
    whole, so the client may write it again later (an UNAVAILABLE store); it returns True when it
    took the futures over.
    """

    def __init__(
        self,
        stub: pb_grpc.DedupServiceAsyncStub,
        request: pb.SubscribeRequest,
        metadata: Any,
        retry_ack: Callable[
            [SubscribeStream, list[str], list[asyncio.Future[Any]], grpc.StatusCode, str], bool
        ],
        result: Callable[[int], Any] = int,
    ) -> None:
        self._stub = stub
        self._request = request
        self._metadata = metadata
        self._retry_ack = retry_ack
        self._result = result
        self._ids = itertools.count(1)
        self._acks: list[tuple[str, asyncio.Future[Any]]] = []
        self._flush_scheduled = False
        self._waiting: dict[int, tuple[str, list[str], list[asyncio.Future[Any]]]] = {}
        self._call: Any = None
        self._writer: _Writer | None = None
        self.closed = False

    async def frames(self) -> AsyncGenerator[list[pb.Delivery], None]:
        """Each frame's deliveries, until the call ends; raises grpc.aio.AioRpcError when it
        ends with an error. Answers are read by a task of their own, so an app may await an
        ack's answer before it asks for the next frame."""
        self._call = self._stub.StreamingSubscribe(metadata=self._metadata)
        self._writer = _Writer(self._call)
        self._writer.put(pb.StreamingSubscribeRequest(subscribe=self._request))
        frames: asyncio.Queue[list[pb.Delivery] | BaseException | None] = asyncio.Queue()
        reader = asyncio.create_task(self._read(frames))
        try:
            while True:
                item = await frames.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.closed = True
            reader.cancel()
            self._writer.close()
            self._call.cancel()
            closed = StreamClosed(
                "the stream closed before the ack was answered; its records are redelivered"
            )
            _fail_all({k: v[2] for k, v in self._waiting.items()}, closed)
            self._waiting.clear()
            pending, self._acks = self._acks, []
            _fail_all({0: [f for _, f in pending]}, closed)

    async def _read(self, frames: asyncio.Queue[list[pb.Delivery] | BaseException | None]) -> None:
        """Answer settle requests; hand deliveries (credit-bound) to ``frames``."""
        try:
            async for resp in self._call:
                for r in resp.results:
                    self._answered(r)
                if resp.deliveries:
                    frames.put_nowait(list(resp.deliveries))
        except grpc.aio.AioRpcError as exc:
            frames.put_nowait(exc)
            return
        frames.put_nowait(None)

    def ack(self, delivery_id: str) -> asyncio.Future[Any]:
        """Queue an ack; acks queued in one event-loop turn are written as one request."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.closed:
            fut.set_exception(StreamClosed("the stream is closed; its records are redelivered"))
            return fut
        self._acks.append((delivery_id, fut))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return fut

    def resend(self, ids: list[str], futs: list[asyncio.Future[Any]]) -> None:
        """Write an ack again (a retry of one the sidecar could not carry out)."""
        if self.closed or self._writer is None:
            _fail_all({0: futs}, StreamClosed("the stream closed; its records are redelivered"))
            return
        rid = next(self._ids)
        self._waiting[rid] = ("ack", ids, futs)
        self._writer.put(pb.StreamingSubscribeRequest(ack=pb.StreamAck(request_id=rid, delivery_ids=ids)))

    def _flush(self) -> None:
        self._flush_scheduled = False
        acks, self._acks = self._acks, []
        if acks:
            self.resend([d for d, _ in acks], [f for _, f in acks])

    async def settle(self, kind: str, delivery_ids: list[str], **fields: Any) -> list[Any]:
        """A nack or a deadline extension on the stream; the per-id results."""
        if self.closed or self._writer is None:
            raise StreamClosed("the stream is closed; its records are redelivered")
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[Any]] = [loop.create_future() for _ in delivery_ids]
        rid = next(self._ids)
        self._waiting[rid] = (kind, list(delivery_ids), futs)
        if kind == "nack":
            req = pb.StreamingSubscribeRequest(
                nack=pb.StreamNack(request_id=rid, delivery_ids=delivery_ids, **fields)
            )
        else:
            req = pb.StreamingSubscribeRequest(
                extend=pb.StreamExtendDeadline(request_id=rid, delivery_ids=delivery_ids, **fields)
            )
        self._writer.put(req)
        return list(await asyncio.gather(*futs))

    def _answered(self, r: pb.SettleResult) -> None:
        entry = self._waiting.pop(r.request_id, None)
        if entry is None:
            return
        kind, ids, futs = entry
        if r.code:
            code = STATUS_BY_VALUE.get(r.code, grpc.StatusCode.UNKNOWN)
            if kind == "ack" and self._retry_ack(self, ids, futs, code, r.message):
                return
            _fail_all({0: futs}, SettleError(code, r.message))
            return
        convert = self._result
        for f, result in zip(futs, r.results, strict=True):
            if not f.done():
                f.set_result(convert(result))

    def close(self) -> None:
        if self._call is not None:
            self._call.cancel()


class SettleError(Exception):
    """A settle request on a stream failed as a whole: its status code and the sidecar's message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class PublishStream:
    """One StreamingPublish call shared by concurrent publishes; opened when first used and
    again after it ended."""

    def __init__(self, stub: pb_grpc.DedupServiceAsyncStub, metadata: Any) -> None:
        self._stub = stub
        self._metadata = metadata
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[pb.StreamingPublishResult]] = {}
        self._call: Any = None
        self._writer: _Writer | None = None
        self._reader: asyncio.Task[None] | None = None

    def _open(self) -> _Writer:
        if self._writer is None or self._reader is None or self._reader.done():
            self._call = self._stub.StreamingPublish(metadata=self._metadata)
            self._writer = _Writer(self._call)
            self._reader = asyncio.create_task(self._read(self._call, self._writer, self._waiting))
        return self._writer

    async def _read(
        self, call: Any, writer: _Writer, waiting: dict[int, asyncio.Future[pb.StreamingPublishResult]]
    ) -> None:
        failure: Exception = StreamClosed("the publish stream ended")
        try:
            async for resp in call:
                for r in resp.results:
                    fut = waiting.pop(r.request_id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(r)
        except grpc.aio.AioRpcError as exc:
            failure = exc
        finally:
            writer.close()  # nothing more can be written on an ended call
            if self._call is call:
                self._writer = None
            _fail_all(dict(waiting), failure)
            waiting.clear()

    async def publish(self, request: pb.PublishRequest) -> pb.StreamingPublishResult:
        """The sidecar's answer for one record. Raises grpc.aio.AioRpcError or StreamClosed when
        the stream ended first: the record may or may not be published."""
        writer = self._open()
        rid = next(self._ids)
        fut: asyncio.Future[pb.StreamingPublishResult] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        writer.put(pb.StreamingPublishRequest(request_id=rid, publish=request))
        try:
            return await fut
        finally:
            self._waiting.pop(rid, None)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.put(None)  # half-close: the sidecar answers what it read, then ends
        if self._reader is not None:
            try:
                async with asyncio.timeout(10):
                    await self._reader
            except TimeoutError:
                self._call.cancel()
