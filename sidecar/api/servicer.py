"""DedupService: turns gRPC requests into engine and publisher calls. No logic of its own."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from sidecar import testing_hooks
from sidecar._proto import dedup_pb2 as pb
from sidecar.api.errors import status_for
from sidecar.api.frames import encode_frame, encode_publish_results
from sidecar.api.security import Principal
from sidecar.api.streaming import StreamingServicer, publish_input
from sidecar.engine.engine import Engine
from sidecar.engine.streams import Stream
from sidecar.errors import InvalidArgument, ShuttingDown, SidecarError, Unavailable
from sidecar.observability import tracing
from sidecar.publish.publisher import Publisher, PublishOutput

log = logging.getLogger(__name__)
Req = TypeVar("Req")
Resp = TypeVar("Resp")


class _Throttled:
    """Warn about failed calls at most once per ``every`` seconds per method, with a count of
    those not logged since. An Ack that fails (the store unreachable) means redeliveries: the
    operator should see it in the log, not only in dedup_store_errors_total."""

    def __init__(self, every: float = 10.0) -> None:
        self._every = every
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def warn(self, method: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last.get(method, -self._every) < self._every:
            self._quiet[method] = self._quiet.get(method, 0) + 1
            return
        self._last[method] = now
        more = self._quiet.pop(method, 0)
        log.warning("%s failed: %s%s", method, exc, f" ({more} more since the last warning)" if more else "")


_unavailable = _Throttled()


def _mapped(
    fn: Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]:
    """Abort with the mapped status on any error; never let one call crash the server."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext[Req, Resp]) -> Resp:
        try:
            return await fn(self, request, context)
        except SidecarError as exc:
            if isinstance(exc, Unavailable) and not isinstance(exc, ShuttingDown):
                _unavailable.warn(fn.__name__, exc)
            code, msg = status_for(exc)
        except Exception as exc:
            log.exception("%s failed", fn.__name__)
            code, msg = status_for(exc)
        await context.abort(code, msg)
        raise AssertionError("unreachable")  # abort raises

    return wrapper


def _publish_trace(
    context: grpc.aio.ServicerContext[Any, Any], name: str, **attributes: Any
) -> tuple[Sequence[tuple[str, bytes]], Any]:
    """The trace headers a publish writes, and its ``dedup.publish`` span (or None): the caller's
    context, continued by the span when spans are recorded."""
    caller = tracing.trace_headers(context.invocation_metadata())
    if not tracing.active():
        return caller, None
    span = tracing.start(name, tracing.context_of(caller), **attributes)
    return (tracing.inject(span) if span.get_span_context().is_valid else caller), span


def _response(out: PublishOutput) -> pb.PublishResponse:
    return pb.PublishResponse(
        idempotency_key=out.idempotency_key,
        topic=out.topic,
        partition=out.partition,
        offset=out.offset,
        duplicate=out.duplicate,
    )


#: SubscribeRequest.ordering -> the setting's name ("" for the sidecar's own).
_ORDERINGS = {
    pb.ORDERING_UNORDERED: "unordered",
    pb.ORDERING_KEY: "key",
    pb.ORDERING_PARTITION: "partition",
}


class DedupServicer:
    """The DedupService methods; server.py registers them (see _handlers there)."""

    def __init__(
        self, engine: Engine, publisher: Publisher, max_batch_entries: int, topics: Sequence[str] = ()
    ) -> None:
        self._engine = engine
        self._publisher = publisher
        self._max_batch_entries = max_batch_entries
        self._topics = list(topics)
        #: ListWorkers' answer; the Sidecar sets it once its ports are bound.
        self.workers = pb.ListWorkersResponse()
        self._streaming = StreamingServicer(
            engine, publisher, self.authorize, _unavailable.warn, self._attach
        )

    def authorize(self, method: str, caller: Principal, request: Any) -> None:
        """Raise PermissionDenied if ``caller`` may not make this call (sidecar.api.server calls it
        for callers with restricted rights, before the method runs, so a refused call changes
        nothing). A delivery id is checked against the topic of the record it names."""
        if method == "Subscribe":
            for topic in request.topics or self._topics:
                caller.check_subscribe(topic)
        elif method == "Publish":
            caller.check_publish(request.topic)
        elif method == "PublishBatch":
            for topic in dict.fromkeys(e.topic for e in request.entries):
                caller.check_publish(topic)
        elif method in ("Ack", "Nack", "ExtendDeadline"):
            if method == "Nack" and request.dead_letter:
                caller.check_dead_letter()
            topic_of = self._engine.topic_of
            for did in request.delivery_ids:
                topic = topic_of(did)
                if topic is not None:
                    caller.check_subscribe(topic, "settle records of")

    async def Subscribe(
        self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        """Yields serialized SubscribeResponse frames (see sidecar.api.frames and server.py)."""
        engine = self._engine
        try:
            stream = self._attach(request)
        except SidecarError as exc:
            await context.abort(*status_for(exc))
            return
        try:
            while True:
                batch = await engine.next_frame(stream)
                if not batch:
                    break
                yield encode_frame(batch, engine.deadline_epoch_ms(batch[0]))
                testing_hooks.reached("after_delivery")
        finally:
            engine.detach(stream)
        if engine.stopping:
            await context.abort(*status_for(ShuttingDown("the sidecar is shutting down; reconnect")))

    def _attach(self, request: pb.SubscribeRequest) -> Stream:
        return self._engine.attach(
            list(request.topics),
            request.max_in_flight,
            request.max_in_flight_bytes,
            request.max_batch,
            _ORDERINGS.get(request.ordering, ""),
        )

    def StreamingSubscribe(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any], caller: Principal
    ) -> AsyncIterator[bytes]:
        """Yields serialized StreamingSubscribeResponse messages (sidecar.api.streaming)."""
        return self._streaming.subscribe(requests, context, caller)

    def StreamingPublish(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any], caller: Principal
    ) -> AsyncIterator[bytes]:
        """Yields serialized StreamingPublishResponse messages (sidecar.api.streaming)."""
        return self._streaming.publish(requests, context, caller)

    @_mapped
    async def Ack(
        self, request: pb.AckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.AckResponse:
        results = await self._engine.ack(list(request.delivery_ids))
        return pb.AckResponse(results=results)  # type: ignore[arg-type]

    @_mapped
    async def Nack(
        self, request: pb.NackRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.NackResponse:
        delay = request.delay_seconds if request.HasField("delay_seconds") else None
        results = await self._engine.nack(
            list(request.delivery_ids), delay, request.dead_letter, request.reason
        )
        return pb.NackResponse(results=results)  # type: ignore[arg-type]

    @_mapped
    async def ExtendDeadline(
        self, request: pb.ExtendDeadlineRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ExtendDeadlineResponse:
        results = await self._engine.extend(list(request.delivery_ids), request.seconds)
        return pb.ExtendDeadlineResponse(results=results)  # type: ignore[arg-type]

    async def ListWorkers(
        self, request: pb.ListWorkersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListWorkersResponse:
        return self.workers

    @_mapped
    async def Publish(
        self, request: pb.PublishRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PublishResponse:
        trace, span = _publish_trace(context, "dedup.publish", topic=request.topic)
        try:
            return _response(await self._publisher.publish(publish_input(request, trace)))
        finally:
            if span is not None:
                span.end()

    @_mapped
    async def PublishBatch(
        self, request: pb.PublishBatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        """Returns a serialized PublishBatchResponse (sidecar.api.frames; see server.py)."""
        n = len(request.entries)
        if n == 0:
            raise InvalidArgument("no entries")
        if n > self._max_batch_entries:
            raise InvalidArgument(
                f"{n} entries; the limit is {self._max_batch_entries} (publish.max_batch_entries)"
            )
        trace, span = _publish_trace(context, "dedup.publish", entries=n)
        try:
            outcomes = await self._publisher.publish_batch([publish_input(e, trace) for e in request.entries])
        finally:
            if span is not None:
                span.end()
        results: list[tuple[str, str, int, int, bool] | tuple[int, str]] = []
        for out in outcomes:
            if isinstance(out, Exception):
                code, msg = status_for(out)
                results.append((code.value[0], msg))
            else:
                results.append(out)
        return encode_publish_results(results)
