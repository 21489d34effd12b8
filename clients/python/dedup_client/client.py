"""An asyncio client: a Subscribe stream of Messages, coalesced Acks, and Publish."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import math
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

import grpc

from dedup_client._proto import dedup_pb2 as pb
from dedup_client._proto import dedup_pb2_grpc as pb_grpc
from dedup_client.gather import AckBatcher, PublishBatcher, retry_unavailable, retry_until
from dedup_client.messages import Message
from dedup_client.results import (
    STATUS_BY_VALUE,
    AckError,
    AckResult,
    PublishError,
    PublishResult,
    no_answer,
    publish_request,
    publish_result,
)
from dedup_client.streams import PublishStream, StreamClosed, SubscribeStream
from dedup_client.workers import merged_frames, same, with_port

_ORDERINGS = {
    "unordered": pb.ORDERING_UNORDERED,
    "key": pb.ORDERING_KEY,
    "partition": pb.ORDERING_PARTITION,
}


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


class DedupClient:
    """Parameters:
    target: the sidecar's address: ``host:port``, or ``unix:///run/dedup/sidecar.sock`` for a
        sidecar listening on a Unix socket (``server.listen = "unix:///..."``).
    token: bearer token when the sidecar asks for one (``server.auth_token``, ``auth_token_file``
        or ``credentials``).
    tls_ca_file: dial with TLS, trusting this CA (PEM) for the sidecar's certificate
        (``server.tls_cert_file``). ``True`` trusts the system's CAs.
    tls_cert_file, tls_key_file: the client certificate and key (PEM) for mTLS
        (``server.tls_client_ca_file``).
    tls_server_name: the name to check the sidecar's certificate against, when it is not the
        target's host (for example a certificate for ``sidecar.local`` dialled at 127.0.0.1).
    ack_linger: seconds acks are gathered before one Ack call (0.005 by default).
    ack_max_ids: most ids per Ack call.
    coalesce_acks: False sends one Ack call per ack (the plain path any client does first).
    coalesce_publishes: True gathers concurrent :meth:`publish` calls for ``publish_linger``
        seconds or ``publish_max_entries`` entries into one PublishBatch call. A failed entry
        then raises PublishError (its status code and the sidecar's message) instead of
        grpc.aio.AioRpcError; a call that fails as a whole still raises AioRpcError.
    streaming: use the sidecar's stream paths. :meth:`subscribe` and :meth:`frames` open a
        StreamingSubscribe call and each message's ack and nack travel on it (acks of one
        event-loop turn in one request, no linger), and :meth:`publish` (without
        ``coalesce_publishes``) writes on one shared StreamingPublish call. Each costs the
        sidecar a stream message rather than a call. A failed publish then raises PublishError.
    ack_retry_seconds: an Ack that fails with UNAVAILABLE is sent again, with a growing pause,
        until the delivery's ack deadline, at most this long (a repeat answers ALREADY_ACKED).
    all_workers: with a sidecar of several worker processes (``server.workers``), subscribe on
        every worker (listed by ListWorkers when the first stream opens), send each ack to the
        worker that delivered it, and spread publishes over the workers. False uses the target
        alone, which then sees only its worker's partitions.
    """

    def __init__(
        self,
        target: str,
        token: str | None = None,
        *,
        tls_ca_file: str | bool | None = None,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
        tls_server_name: str | None = None,
        ack_linger: float = 0.005,
        ack_max_ids: int = 1000,
        coalesce_acks: bool = True,
        coalesce_publishes: bool = False,
        publish_linger: float = 0.002,
        publish_max_entries: int = 500,
        streaming: bool = False,
        ack_retry_seconds: float = 10.0,
        all_workers: bool = True,
    ) -> None:
        self._target = target
        self._options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        self._creds: grpc.ChannelCredentials | None = None
        if tls_ca_file is not None or tls_cert_file is not None:
            if (tls_cert_file is None) != (tls_key_file is None):
                raise ValueError("tls_cert_file and tls_key_file go together (mTLS)")
            if tls_server_name:
                self._options.append(("grpc.ssl_target_name_override", tls_server_name))
            self._creds = grpc.ssl_channel_credentials(
                _read(tls_ca_file) if isinstance(tls_ca_file, str) else None,
                _read(tls_key_file),
                _read(tls_cert_file),
            )
        self._channel = self._dial(target)
        self.stub = pb_grpc.DedupServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._coalesce = coalesce_acks
        self._streaming = streaming
        self._ack_retry_seconds = ack_retry_seconds
        self._ack_linger, self._ack_max_ids = ack_linger, ack_max_ids
        # One entry per worker once ListWorkers answered; the target's alone until then.
        self._all_workers = all_workers
        self._discovered = False
        self._discovery = asyncio.Lock()
        self._channels: list[grpc.aio.Channel] = [self._channel]
        self._stubs = [self.stub]
        self._acks = [self._ack_batcher(lambda: self.stub)]
        self._publish_streams: dict[int, PublishStream] = {}  # by the stub's worker index
        self._stream_retries: dict[int, tuple[float, float]] = {}  # a retried stream ack: first try, pause
        self._routes: dict[str, int] = {}  # delivery id prefix (a worker process) -> worker's entry
        self._turn = itertools.count()
        self._publishes = (
            PublishBatcher(self._next_stub, publish_linger, publish_max_entries, self._metadata)
            if coalesce_publishes
            else None
        )

    def _ack_batcher(self, stub: Callable[[], pb_grpc.DedupServiceAsyncStub]) -> AckBatcher:
        batcher = AckBatcher(stub, self._ack_linger, self._ack_max_ids, self._metadata)
        batcher.retry_seconds = self._ack_retry_seconds
        return batcher

    def _dial(self, target: str) -> grpc.aio.Channel:
        if self._creds is None:
            return grpc.aio.insecure_channel(target, options=self._options)
        return grpc.aio.secure_channel(target, self._creds, options=self._options)

    def _next_stub(self) -> pb_grpc.DedupServiceAsyncStub:
        """The stub of the next worker in turn, for publishes."""
        stubs = self._stubs
        return stubs[next(self._turn) % len(stubs)] if len(stubs) > 1 else stubs[0]

    async def workers(self) -> int:
        """List the sidecar's workers (ListWorkers) and connect to each one, once; returns how
        many there are. A sidecar without ListWorkers counts as one worker."""
        async with self._discovery:
            if self._discovered or not self._all_workers:
                return len(self._stubs)
            try:
                resp: pb.ListWorkersResponse = await self.stub.ListWorkers(
                    pb.ListWorkersRequest(), metadata=self._metadata
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                resp = pb.ListWorkersResponse()
            self._discovered = True
            if len(resp.workers) <= 1:
                return 1
            channels: list[grpc.aio.Channel] = []
            for w in resp.workers:
                if w.index == resp.this_worker:
                    channels.append(self._channel)
                elif w.unix_socket:
                    channels.append(self._dial(f"unix://{w.unix_socket}"))
                else:
                    channels.append(self._dial(with_port(self._target, w.port)))
            self._channels = channels
            self._stubs = [pb_grpc.DedupServiceStub(c) for c in channels]
            # The target's batcher stays: acks gathered before the list came are not dropped.
            self._acks = [
                self._acks[0]
                if w.index == resp.this_worker
                else self._ack_batcher(functools.partial(same, stub))
                for w, stub in zip(resp.workers, self._stubs, strict=True)
            ]
            return len(channels)

    def _worker_of(self, delivery_id: str) -> int:
        return self._routes.get(delivery_id.partition(".")[0], 0) if len(self._stubs) > 1 else 0

    def _by_worker(self, delivery_ids: Sequence[str]) -> dict[int, list[int]]:
        """Positions of ``delivery_ids`` grouped by the worker that delivered each."""
        groups: dict[int, list[int]] = {}
        for i, did in enumerate(delivery_ids):
            groups.setdefault(self._worker_of(did), []).append(i)
        return groups

    async def _per_worker(
        self, delivery_ids: Sequence[str], call: Callable[[pb_grpc.DedupServiceAsyncStub, list[str]], Any]
    ) -> list[AckResult]:
        """Call ``call`` once per worker with its ids; the results in the order of the ids."""
        groups = self._by_worker(delivery_ids)
        if len(groups) == 1:
            ((w, _),) = groups.items()
            resp = await call(self._stubs[w], list(delivery_ids))
            return [AckResult(r) for r in resp.results]
        out: list[AckResult] = [AckResult.UNKNOWN] * len(delivery_ids)
        answers = await asyncio.gather(
            *(call(self._stubs[w], [delivery_ids[i] for i in pos]) for w, pos in groups.items())
        )
        for pos, resp in zip(groups.values(), answers, strict=True):
            for i, r in zip(pos, resp.results, strict=True):
                out[i] = AckResult(r)
        return out

    async def __aenter__(self) -> DedupClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.flush_acks()
        if self._publishes is not None:
            await self._publishes.drain()
        for stream in self._publish_streams.values():
            await stream.close()
        for channel in self._channels:
            await channel.close()

    async def subscribe(
        self,
        topics: Sequence[str] = (),
        max_in_flight: int = 0,
        max_in_flight_bytes: int = 0,
        max_batch: int = 0,
        ordering: str = "",
    ) -> AsyncGenerator[Message, None]:
        """Yield messages until the stream ends. Un-acked messages are redelivered if it closes.

        ``ordering``: "unordered", "key" or "partition" to narrow the sidecar's
        ``delivery.ordering`` for these topics; "" keeps the sidecar's."""
        frames = self.frames(topics, max_in_flight, max_in_flight_bytes, max_batch, ordering)
        try:
            async for frame in frames:
                for msg in frame:
                    yield msg
        finally:
            await frames.aclose()

    async def frames(
        self,
        topics: Sequence[str] = (),
        max_in_flight: int = 0,
        max_in_flight_bytes: int = 0,
        max_batch: int = 0,
        ordering: str = "",
    ) -> AsyncGenerator[list[Message], None]:
        """Like :meth:`subscribe`, a whole frame at a time (for batch processing).

        With several workers there is one stream per worker, merged; ``max_in_flight`` and
        ``max_in_flight_bytes`` are shared out among them (each gets its share, rounded up).
        A stream that fails ends them all with its error."""
        if ordering and ordering not in _ORDERINGS:
            raise ValueError(f"ordering must be one of {sorted(_ORDERINGS)}, not {ordering!r}")
        n = await self.workers()
        request = pb.SubscribeRequest(
            topics=list(topics),
            max_in_flight=math.ceil(max_in_flight / n),
            max_in_flight_bytes=math.ceil(max_in_flight_bytes / n),
            max_batch=max_batch,
            ordering=_ORDERINGS.get(ordering, pb.ORDERING_UNSPECIFIED),
        )
        if n == 1:
            async with contextlib.aclosing(self._frames_of(self.stub, request)) as one:
                async for batch in one:
                    yield batch
            return
        async for batch in merged_frames(self._stubs, self._frames_of, request, self._routes):
            yield batch

    async def _frames_of(
        self, stub: pb_grpc.DedupServiceAsyncStub, request: pb.SubscribeRequest
    ) -> AsyncGenerator[list[Message], None]:
        """One worker's frames: a Subscribe call, or with ``streaming`` a StreamingSubscribe
        call whose messages take their acks and nacks. Raises grpc.aio.AioRpcError as the call
        ends with an error."""
        if not self._streaming:
            call = stub.Subscribe(request, metadata=self._metadata)
            try:
                async for frame in call:
                    yield [Message(self, d) for d in frame.deliveries]
            finally:
                call.cancel()
            return
        stream = SubscribeStream(stub, request, self._metadata, self._retry_stream_ack, AckResult)
        async with contextlib.aclosing(stream.frames()) as deliveries:
            async for batch in deliveries:
                yield [Message(self, d, stream) for d in batch]

    def _stream_ack(self, stream: SubscribeStream, delivery_id: str) -> asyncio.Future[AckResult]:
        """An ack on ``stream``; its future raises AckError when the ack was not carried out."""
        inner = stream.ack(delivery_id)
        outer: asyncio.Future[AckResult] = asyncio.get_running_loop().create_future()

        def done(f: asyncio.Future[Any]) -> None:
            if outer.done():
                return
            if f.cancelled():
                outer.cancel()
            elif (exc := f.exception()) is not None:
                outer.set_exception(AckError(str(exc)))
                outer.exception()  # the app may not await it
            else:
                outer.set_result(f.result())

        inner.add_done_callback(done)
        return outer

    def _retry_stream_ack(
        self,
        stream: SubscribeStream,
        ids: list[str],
        futs: list[asyncio.Future[Any]],
        code: grpc.StatusCode,
        message: str,
    ) -> bool:
        """An ack written on a stream failed as a whole: write it again after a growing pause
        while the failure is UNAVAILABLE, for up to ``ack_retry_seconds``."""
        if code != grpc.StatusCode.UNAVAILABLE or stream.closed:
            return False
        key = id(futs[0]) if futs else 0
        loop = asyncio.get_running_loop()
        first, pause = self._stream_retries.get(key, (loop.time(), 0.025))
        pause = min(2 * pause, 1.0)
        if loop.time() + pause - first > self._ack_retry_seconds:
            self._stream_retries.pop(key, None)
            return False
        self._stream_retries[key] = (first, pause)
        futs[0].add_done_callback(lambda _: self._stream_retries.pop(key, None))
        loop.call_later(pause, stream.resend, ids, futs)
        return True

    def ack(self, delivery_id: str, deadline_ms: int = 0) -> asyncio.Future[AckResult]:
        """Queue an ack of ``delivery_id`` (a Delivery's ``deadline_ms`` bounds its retries)."""
        if self._coalesce:
            return self._acks[self._worker_of(delivery_id)].add((delivery_id, deadline_ms))
        return asyncio.ensure_future(self._ack_one(delivery_id, deadline_ms))

    async def _ack_one(self, delivery_id: str, deadline_ms: int) -> AckResult:
        resp = await self.ack_many([delivery_id], deadline_ms)
        return resp[0]

    async def ack_many(self, delivery_ids: Sequence[str], deadline_ms: int = 0) -> list[AckResult]:
        """One Ack call for many ids (one per worker that delivered them), made again while it
        fails with UNAVAILABLE until ``deadline_ms`` (the earliest ack deadline among them; 0:
        unknown), at most ``ack_retry_seconds``. Raises AckError when a call fails."""
        until = retry_until([deadline_ms], self._ack_retry_seconds)

        def call(stub: pb_grpc.DedupServiceAsyncStub, ids: list[str]) -> Any:
            return retry_unavailable(
                lambda: stub.Ack(pb.AckRequest(delivery_ids=ids), metadata=self._metadata), until
            )

        try:
            return await self._per_worker(delivery_ids, call)
        except grpc.aio.AioRpcError as exc:
            raise AckError(f"{exc.code().name}: {exc.details()}") from exc

    async def flush_acks(self) -> None:
        for acks in self._acks:
            await acks.drain()

    async def nack(
        self,
        delivery_ids: Sequence[str],
        delay_seconds: float | None = None,
        dead_letter: bool = False,
        reason: str = "",
    ) -> list[AckResult]:
        def call(stub: pb_grpc.DedupServiceAsyncStub, ids: list[str]) -> Any:
            req = pb.NackRequest(delivery_ids=ids, dead_letter=dead_letter, reason=reason)
            if delay_seconds is not None:
                req.delay_seconds = delay_seconds
            return stub.Nack(req, metadata=self._metadata)

        return await self._per_worker(delivery_ids, call)

    async def extend_deadline(self, delivery_ids: Sequence[str], seconds: int) -> list[AckResult]:
        return await self._per_worker(
            delivery_ids,
            lambda stub, ids: stub.ExtendDeadline(
                pb.ExtendDeadlineRequest(delivery_ids=ids, seconds=seconds), metadata=self._metadata
            ),
        )

    async def publish(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
        idempotency_key: str = "",
        partition: int | None = None,
        timeout: float | None = 60.0,
    ) -> PublishResult:
        """Publish one record; raises grpc.aio.AioRpcError with the sidecar's status on failure
        (PublishError when publishes are coalesced or streamed, see the class docstring)."""
        request = publish_request(topic, value, key, headers, idempotency_key, partition)
        if self._publishes is not None:
            fut = self._publishes.add(request)  # this caller's alone: cancelling it drops its answer
            try:
                async with asyncio.timeout(timeout):
                    return await fut
            except TimeoutError:
                raise no_answer(timeout) from None
        if self._streaming:
            return await self._publish_on_stream(request, timeout)
        resp = await self._next_stub().Publish(request, metadata=self._metadata, timeout=timeout)
        return publish_result(resp)

    async def _publish_on_stream(self, request: pb.PublishRequest, timeout: float | None) -> PublishResult:
        stubs = self._stubs
        w = next(self._turn) % len(stubs) if len(stubs) > 1 else 0
        stream = self._publish_streams.get(w)
        if stream is None:
            stream = self._publish_streams[w] = PublishStream(stubs[w], self._metadata)
        try:
            async with asyncio.timeout(timeout):
                r = await stream.publish(request)
        except TimeoutError:
            raise no_answer(timeout) from None
        except (grpc.aio.AioRpcError, StreamClosed) as exc:
            code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else grpc.StatusCode.UNAVAILABLE
            raise PublishError(
                code, f"the publish stream ended ({exc}); retry with the same idempotency key"
            ) from exc
        if r.code:
            raise PublishError(STATUS_BY_VALUE.get(r.code, grpc.StatusCode.UNKNOWN), r.message)
        return publish_result(r.response)

    async def flush_publishes(self) -> None:
        """Send the publishes gathered so far and wait for their answers (when coalescing)."""
        if self._publishes is not None:
            await self._publishes.drain()

    async def publish_batch(
        self, entries: Sequence[pb.PublishRequest], timeout: float | None = 60.0
    ) -> list[PublishResult | PublishError]:
        """Publish many records; each entry gets a PublishResult or a PublishError (its status
        code and message). Raises grpc.aio.AioRpcError when the call fails as a whole."""
        resp = await self._next_stub().PublishBatch(
            pb.PublishBatchRequest(entries=list(entries)), metadata=self._metadata, timeout=timeout
        )
        out: list[PublishResult | PublishError] = []
        for r in resp.results:
            if r.code == 0:
                out.append(publish_result(r.response))
            else:
                out.append(PublishError(STATUS_BY_VALUE.get(r.code, grpc.StatusCode.UNKNOWN), r.message))
        return out
