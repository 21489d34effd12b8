"""The bidirectional RPCs: StreamingSubscribe (deliveries down, settle requests up on the same
stream) and StreamingPublish (records up, results down, matched by the app's request ids).

An app that handles one message at a time pays a stream message per ack or per record here, not
a unary call. Each stream has one reader and one writer:

- the reader parses a request, hands it to the engine or the publisher without waiting (they
  group concurrent requests of every stream and unary call into shared store round trips and
  producer passes: sidecar/groupcommit.py), and reads on;
- the writer writes whatever is ready in one message: a frame of deliveries and any number of
  answers (protobuf concatenation merges their repeated fields, so no message is rebuilt).

Flow control: a stream holds at most ``limit`` requests read and not yet answered in writing.
Past that the reader stops reading, so an app that writes and never reads is slowed by gRPC's
own flow control instead of growing the sidecar's memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from sidecar import testing_hooks
from sidecar._proto import dedup_pb2 as pb
from sidecar.api.errors import status_for
from sidecar.api.frames import encode_frame, encode_settle_result, encode_stream_publish_result
from sidecar.api.security import Principal
from sidecar.engine.engine import Engine
from sidecar.errors import InvalidArgument, ShuttingDown, SidecarError, Unavailable
from sidecar.observability import tracing
from sidecar.publish.publisher import Outcome, Publisher, PublishInput, PublishOutput

log = logging.getLogger(__name__)

Authorize = Callable[[str, Principal, Any], None]
#: Called with a failure that makes a call UNAVAILABLE (logged, throttled, by the servicer).
OnUnavailable = Callable[[str, BaseException], None]

_OK = grpc.StatusCode.OK.value[0]


class Outbox:
    """What one stream has to write, and how many requests it read and has not answered yet."""

    __slots__ = ("_room", "ended", "frame", "limit", "parts", "unanswered", "wake")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.frame: bytes | None = None
        self.unanswered = 0
        self.ended = False
        self.wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    def answer(self, part: bytes) -> None:
        self.parts.append(part)
        self.wake.set()

    async def read_one(self) -> None:
        """Count a request read; wait while the stream holds ``limit`` unanswered ones."""
        self.unanswered += 1
        if self.unanswered >= self.limit:
            self._room.clear()
            await self._room.wait()

    def take(self, frames: bool) -> tuple[bytes, bool]:
        """The next message to write (b"" when nothing is ready), and whether it has a frame."""
        parts = self.parts
        frame = self.frame if frames else None
        if frame is not None:
            self.frame = None
            self.wake.set()  # the frame pump may fetch the next
        if not parts:
            return (frame or b""), frame is not None
        self.parts = []
        self.unanswered -= len(parts)
        if self.unanswered < self.limit:
            self._room.set()
        if frame is not None:
            parts.insert(0, frame)
        return b"".join(parts), frame is not None

    @property
    def answered_all(self) -> bool:
        return self.unanswered == 0


def _parse(cls: Any, raw: bytes) -> Any:
    try:
        return cls.FromString(raw)
    except DecodeError as exc:
        raise InvalidArgument(f"a stream message is not a valid {cls.__name__}: {exc}") from None


async def _first(requests: AsyncIterator[bytes]) -> bytes | None:
    async for raw in requests:
        return raw
    return None


class StreamingServicer:
    """The two streaming methods of DedupService; DedupServicer delegates to it."""

    def __init__(
        self,
        engine: Engine,
        publisher: Publisher,
        authorize: Authorize,
        on_unavailable: OnUnavailable,
        attach: Callable[[pb.SubscribeRequest], Any],
    ) -> None:
        self._engine = engine
        self._publisher = publisher
        self._authorize = authorize
        self._on_unavailable = on_unavailable
        self._attach = attach
        s = engine.settings
        self._settle_limit = s.server.max_stream_settles_in_flight
        self._publish_limit = s.publish.max_stream_in_flight

    # ---------------------------------------------------------------------------------------------
    # StreamingSubscribe

    async def subscribe(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any], caller: Principal
    ) -> AsyncIterator[bytes]:
        engine = self._engine
        try:
            raw = await _first(requests)
            if raw is None:
                return  # half-closed before asking for anything
            first = _parse(pb.StreamingSubscribeRequest, raw)
            if first.WhichOneof("request") != "subscribe":
                raise InvalidArgument(
                    "the first StreamingSubscribe request must carry `subscribe` (the topics and limits)"
                )
            if not caller.unrestricted:
                self._authorize("Subscribe", caller, first.subscribe)
            stream = self._attach(first.subscribe)
        except SidecarError as exc:
            await context.abort(*status_for(exc))
            return
        outbox = Outbox(self._settle_limit)
        tasks: set[asyncio.Task[Any]] = set()

        def spawn(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
            task = asyncio.create_task(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            task.add_done_callback(lambda _: outbox.wake.set())
            return task

        pump = spawn(self._pump(stream, outbox))
        reader = spawn(self._read_settles(requests, outbox, caller, spawn))
        failure: BaseException | None = None
        try:
            while True:
                # After the app half-closed, write answers only: new deliveries could not be
                # settled on this stream, and they go back to the queue when it is detached.
                message, framed = outbox.take(frames=not reader.done())
                if message:
                    yield message
                    if framed:
                        testing_hooks.reached("after_delivery")
                    continue
                if reader.done():
                    broke = reader.exception()
                    if broke is not None:
                        failure = _logged(broke)
                        break
                    if outbox.answered_all:
                        break  # half-closed, and every request it sent is answered
                elif pump.done():
                    broke = pump.exception()
                    if broke is not None:
                        failure = _logged(broke)
                        break
                    if outbox.answered_all:  # the stream was closed: the sidecar is stopping
                        failure = ShuttingDown("the sidecar is shutting down; reconnect")
                        break
                outbox.wake.clear()
                await outbox.wake.wait()
        finally:
            for t in (pump, reader):
                t.cancel()
            engine.detach(stream)
        if failure is not None:
            await context.abort(*status_for(failure))

    async def _pump(self, stream: Any, outbox: Outbox) -> None:
        """Move frames from the engine to the outbox, one at a time: the next is taken from the
        ready queue only once the writer took the last (as Subscribe's generator does)."""
        engine = self._engine
        while True:
            while outbox.frame is not None:
                outbox.wake.clear()
                await outbox.wake.wait()
            batch = await engine.next_frame(stream)
            if not batch:
                return
            outbox.frame = encode_frame(batch, engine.deadline_epoch_ms(batch[0]))
            outbox.wake.set()

    async def _read_settles(
        self,
        requests: AsyncIterator[bytes],
        outbox: Outbox,
        caller: Principal,
        spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
    ) -> None:
        engine = self._engine
        restricted = not caller.unrestricted
        async for raw in requests:
            req = _parse(pb.StreamingSubscribeRequest, raw)
            kind = req.WhichOneof("request")
            if kind == "ack":
                body: Any = req.ack
                method = "Ack"
            elif kind == "nack":
                body, method = req.nack, "Nack"
            elif kind == "extend":
                body, method = req.extend, "ExtendDeadline"
            elif kind == "subscribe":
                raise InvalidArgument("`subscribe` may only be in the first StreamingSubscribe request")
            else:
                raise InvalidArgument("a StreamingSubscribe request carries none of ack, nack and extend")
            rid = body.request_id
            try:
                if restricted:
                    self._authorize(method, caller, body)
                if kind == "ack":
                    engine.ack_nowait(body.delivery_ids, self._settled(rid, "Ack", outbox))
                else:
                    spawn(self._settle_later(kind, body, outbox))
            except SidecarError as exc:
                outbox.answer(encode_settle_result(rid, status_for(exc)[0].value[0], str(exc), ()))
            await outbox.read_one()

    def _settled(self, rid: int, method: str, outbox: Outbox) -> Callable[[list[int] | BaseException], None]:
        def done(outcome: list[int] | BaseException) -> None:
            if isinstance(outcome, BaseException):
                outbox.answer(self._failed_settle(rid, method, outcome))
            else:
                outbox.answer(encode_settle_result(rid, _OK, "", outcome))

        return done

    def _failed_settle(self, rid: int, method: str, exc: BaseException) -> bytes:
        code, message = self._status_of(method, exc, "nothing was settled, retry")
        return encode_settle_result(rid, code, message, ())

    def _status_of(self, method: str, exc: BaseException, stopping: str) -> tuple[int, str]:
        """The code and message a request that failed with ``exc`` is answered with, as its unary
        call would fail; logged as the servicer logs failed calls. A run cut short by the
        sidecar's stop (CancelledError) answers UNAVAILABLE with ``stopping``."""
        if isinstance(exc, asyncio.CancelledError):
            exc = ShuttingDown(f"the sidecar is shutting down; {stopping}")
        elif isinstance(exc, Unavailable) and not isinstance(exc, ShuttingDown):
            self._on_unavailable(method, exc)
        elif not isinstance(exc, SidecarError):
            log.error("%s on a stream failed", method, exc_info=exc)
        code, message = status_for(exc)
        return code.value[0], message

    async def _settle_later(self, kind: str, body: Any, outbox: Outbox) -> None:
        engine = self._engine
        method = "Nack" if kind == "nack" else "ExtendDeadline"
        ids = list(body.delivery_ids)
        try:
            if kind == "nack":
                delay = body.delay_seconds if body.HasField("delay_seconds") else None
                results = await engine.nack(ids, delay, body.dead_letter, body.reason)
            else:
                results = await engine.extend(ids, body.seconds)
        except Exception as exc:  # noqa: BLE001 - answered, as the unary call would fail
            outbox.answer(self._failed_settle(body.request_id, method, exc))
            return
        outbox.answer(encode_settle_result(body.request_id, _OK, "", results))

    # ---------------------------------------------------------------------------------------------
    # StreamingPublish

    async def publish(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any], caller: Principal
    ) -> AsyncIterator[bytes]:
        outbox = Outbox(self._publish_limit)
        trace = tracing.trace_headers(context.invocation_metadata())
        reader = asyncio.create_task(self._read_records(requests, outbox, caller, trace))
        reader.add_done_callback(lambda _: outbox.wake.set())
        failure: BaseException | None = None
        try:
            while True:
                message, _ = outbox.take(frames=False)
                if message:
                    yield message
                    continue
                if reader.done() and outbox.answered_all:
                    broke = reader.exception()
                    if broke is not None:
                        failure = _logged(broke)
                    break
                if self._engine.stopping and outbox.answered_all:
                    failure = ShuttingDown("the sidecar is shutting down; reconnect")
                    break
                outbox.wake.clear()
                await outbox.wake.wait()
        finally:
            reader.cancel()
        if failure is not None:
            await context.abort(*status_for(failure))

    async def _read_records(
        self, requests: AsyncIterator[bytes], outbox: Outbox, caller: Principal, trace: Any
    ) -> None:
        publisher = self._publisher
        restricted = not caller.unrestricted
        async for raw in requests:
            req = _parse(pb.StreamingPublishRequest, raw)
            rid = req.request_id
            try:
                if not req.HasField("publish"):
                    raise InvalidArgument("a StreamingPublish request without `publish` (the record)")
                record = req.publish
                if restricted:
                    self._authorize("Publish", caller, record)
                publisher.publish_nowait(publish_input(record, trace), self._published(rid, outbox))
            except SidecarError as exc:
                outbox.answer(encode_stream_publish_result(rid, (status_for(exc)[0].value[0], str(exc))))
            await outbox.read_one()

    def _published(self, rid: int, outbox: Outbox) -> Callable[[list[Outcome] | BaseException], None]:
        def done(outcome: list[Outcome] | BaseException) -> None:
            result: Outcome | BaseException = outcome if isinstance(outcome, BaseException) else outcome[0]
            if isinstance(result, PublishOutput):
                outbox.answer(encode_stream_publish_result(rid, tuple(result)))  # type: ignore[arg-type]
                return
            status = self._status_of("Publish", result, "retry with the same idempotency key")
            outbox.answer(encode_stream_publish_result(rid, status))

        return done


def publish_input(req: pb.PublishRequest, trace: Sequence[tuple[str, bytes]] = ()) -> PublishInput:
    """The publisher's input for a PublishRequest and the caller's trace headers."""
    return PublishInput(
        req.topic,
        req.value,
        req.key if req.HasField("key") else None,
        [(h.key, h.value) for h in req.headers] if req.headers else (),
        req.idempotency_key,
        req.partition if req.HasField("partition") else None,
        trace,
    )


def _logged(exc: BaseException) -> BaseException:
    """A failure that ends a stream; one the sidecar did not expect is logged (status_for makes
    it INTERNAL)."""
    if not isinstance(exc, SidecarError):
        log.error("a stream's reader failed", exc_info=exc)
    return exc
