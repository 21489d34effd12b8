"""An asyncio client: a Subscribe stream of Messages, coalesced Acks, and Publish."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Generic, TypeVar

import grpc

from dedup_client._proto import dedup_pb2 as pb
from dedup_client._proto import dedup_pb2_grpc as pb_grpc

T = TypeVar("T")
R = TypeVar("R")


class AckResult(IntEnum):
    OK = 1
    STALE = 2
    UNKNOWN = 3
    ALREADY_ACKED = 4


class AckError(Exception):
    """The Ack call failed as a whole (for example the store was unavailable): nothing was acked."""


@dataclass(frozen=True, slots=True)
class PublishResult:
    idempotency_key: str
    topic: str
    partition: int
    offset: int
    duplicate: bool


class PublishError(Exception):
    """One entry of a PublishBatch failed: the status code and the sidecar's message for it."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def derive_key(input_key: str, index: int) -> str:
    """Idempotency key for the ``index``-th output produced while handling input ``input_key``.

    In consume-transform-produce, a redelivered input republishes its outputs with the same keys,
    and the sidecar's idempotent Publish turns those into duplicates that produce nothing.
    """
    return f"{input_key}/{index}"


class _Gatherer(Generic[T, R]):
    """Gathers items for ``linger`` seconds or ``max_items`` items, then sends them in one call
    (``_send``, by the subclass); each item's future gets its own result."""

    def __init__(self, stub: pb_grpc.DedupServiceStub, linger: float, max_items: int, metadata: Any) -> None:
        self._stub = stub
        self._linger = linger
        self._max_items = max_items
        self._metadata = metadata
        self._items: list[T] = []
        self._futures: list[asyncio.Future[R]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def add(self, item: T) -> asyncio.Future[R]:
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._items.append(item)
        self._futures.append(fut)
        if len(self._items) >= self._max_items:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._linger, self.flush)
        return fut

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._items:
            return
        items, futs = self._items, self._futures
        self._items, self._futures = [], []
        task = asyncio.create_task(self._send(items, futs))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, items: list[T], futs: list[asyncio.Future[R]]) -> None:
        raise NotImplementedError

    async def drain(self) -> None:
        self.flush()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class _AckBatcher(_Gatherer[str, AckResult]):
    """Acks: one Ack call per gathering."""

    async def _send(self, ids: list[str], futs: list[asyncio.Future[AckResult]]) -> None:
        try:
            resp: pb.AckResponse = await self._stub.Ack(  # type: ignore[misc]
                pb.AckRequest(delivery_ids=ids), metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            for f in futs:
                if not f.done():
                    f.set_exception(AckError(f"{exc.code().name}: {exc.details()}"))
            return
        for f, r in zip(futs, resp.results, strict=True):
            if not f.done():
                f.set_result(AckResult(r))


class _PublishBatcher(_Gatherer[pb.PublishRequest, PublishResult]):
    """Publishes: one PublishBatch call per gathering."""

    async def _send(
        self, entries: list[pb.PublishRequest], futs: list[asyncio.Future[PublishResult]]
    ) -> None:
        try:
            resp: pb.PublishBatchResponse = await self._stub.PublishBatch(  # type: ignore[misc]
                pb.PublishBatchRequest(entries=entries), metadata=self._metadata, timeout=_BATCH_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            for f in futs:
                if not f.done():
                    f.set_exception(exc)
                    f.exception()  # its caller may have stopped waiting: no "never retrieved" warning
            return
        for f, r in zip(futs, resp.results, strict=True):
            if f.done():
                continue
            if r.code == 0:
                f.set_result(_result(r.response))
            else:
                f.set_exception(
                    PublishError(_STATUS_BY_VALUE.get(r.code, grpc.StatusCode.UNKNOWN), r.message)
                )
                f.exception()


class Message:
    """One delivery. Call :meth:`ack` once its side effects are done, or :meth:`nack`."""

    __slots__ = ("_client", "_d")

    def __init__(self, client: DedupClient, d: pb.Delivery) -> None:
        self._client = client
        self._d = d

    delivery_id = property(lambda self: self._d.delivery_id)
    idempotency_key = property(lambda self: self._d.idempotency_key)
    topic = property(lambda self: self._d.topic)
    partition = property(lambda self: self._d.partition)
    offset = property(lambda self: self._d.offset)
    value = property(lambda self: self._d.value)
    attempt = property(lambda self: self._d.attempt)
    timestamp_ms = property(lambda self: self._d.timestamp_ms)
    deadline_ms = property(lambda self: self._d.deadline_ms)

    @property
    def key(self) -> bytes | None:
        return self._d.key if self._d.HasField("key") else None

    @property
    def headers(self) -> list[tuple[str, bytes]]:
        return [(h.key, h.value) for h in self._d.headers]

    def ack(self) -> asyncio.Future[AckResult]:
        """Queue an ack (coalesced); await the returned future to learn its result."""
        return self._client.ack(self.delivery_id)

    async def nack(
        self, delay_seconds: float | None = None, dead_letter: bool = False, reason: str = ""
    ) -> None:
        await self._client.nack([self.delivery_id], delay_seconds, dead_letter, reason)


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
    ) -> None:
        options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        if tls_ca_file is None and tls_cert_file is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            if (tls_cert_file is None) != (tls_key_file is None):
                raise ValueError("tls_cert_file and tls_key_file go together (mTLS)")
            if tls_server_name:
                options.append(("grpc.ssl_target_name_override", tls_server_name))
            creds = grpc.ssl_channel_credentials(
                _read(tls_ca_file) if isinstance(tls_ca_file, str) else None,
                _read(tls_key_file),
                _read(tls_cert_file),
            )
            self._channel = grpc.aio.secure_channel(target, creds, options=options)
        self.stub = pb_grpc.DedupServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self._coalesce = coalesce_acks
        self._acks = _AckBatcher(self.stub, ack_linger, ack_max_ids, self._metadata)
        self._publishes = (
            _PublishBatcher(self.stub, publish_linger, publish_max_entries, self._metadata)
            if coalesce_publishes
            else None
        )

    async def __aenter__(self) -> DedupClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._acks.drain()
        if self._publishes is not None:
            await self._publishes.drain()
        await self._channel.close()

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
        """Like :meth:`subscribe`, a whole frame at a time (for batch processing)."""
        if ordering and ordering not in _ORDERINGS:
            raise ValueError(f"ordering must be one of {sorted(_ORDERINGS)}, not {ordering!r}")
        request = pb.SubscribeRequest(
            topics=list(topics),
            max_in_flight=max_in_flight,
            max_in_flight_bytes=max_in_flight_bytes,
            max_batch=max_batch,
            ordering=_ORDERINGS.get(ordering, pb.ORDERING_UNSPECIFIED),
        )
        call = self.stub.Subscribe(request, metadata=self._metadata)
        try:
            async for frame in call:
                yield [Message(self, d) for d in frame.deliveries]
        finally:
            call.cancel()

    def ack(self, delivery_id: str) -> asyncio.Future[AckResult]:
        if self._coalesce:
            return self._acks.add(delivery_id)
        return asyncio.ensure_future(self._ack_one(delivery_id))

    async def _ack_one(self, delivery_id: str) -> AckResult:
        resp = await self.ack_many([delivery_id])
        return resp[0]

    async def ack_many(self, delivery_ids: Sequence[str]) -> list[AckResult]:
        """One Ack call for many ids; raises AckError when the call fails as a whole."""
        try:
            resp = await self.stub.Ack(
                pb.AckRequest(delivery_ids=list(delivery_ids)), metadata=self._metadata
            )
        except grpc.aio.AioRpcError as exc:
            raise AckError(f"{exc.code().name}: {exc.details()}") from exc
        return [AckResult(r) for r in resp.results]

    async def flush_acks(self) -> None:
        await self._acks.drain()

    async def nack(
        self,
        delivery_ids: Sequence[str],
        delay_seconds: float | None = None,
        dead_letter: bool = False,
        reason: str = "",
    ) -> list[AckResult]:
        req = pb.NackRequest(delivery_ids=list(delivery_ids), dead_letter=dead_letter, reason=reason)
        if delay_seconds is not None:
            req.delay_seconds = delay_seconds
        resp = await self.stub.Nack(req, metadata=self._metadata)
        return [AckResult(r) for r in resp.results]

    async def extend_deadline(self, delivery_ids: Sequence[str], seconds: int) -> list[AckResult]:
        resp = await self.stub.ExtendDeadline(
            pb.ExtendDeadlineRequest(delivery_ids=list(delivery_ids), seconds=seconds),
            metadata=self._metadata,
        )
        return [AckResult(r) for r in resp.results]

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
        (PublishError when publishes are coalesced, see the class docstring)."""
        request = _publish_request(topic, value, key, headers, idempotency_key, partition)
        if self._publishes is not None:
            fut = self._publishes.add(request)  # this caller's alone: cancelling it drops its answer
            try:
                async with asyncio.timeout(timeout):
                    return await fut
            except TimeoutError:
                raise PublishError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"no answer within {timeout}s; the record may or may not be published: retry with "
                    "the same idempotency key",
                ) from None
        resp = await self.stub.Publish(request, metadata=self._metadata, timeout=timeout)
        return _result(resp)

    async def flush_publishes(self) -> None:
        """Send the publishes gathered so far and wait for their answers (when coalescing)."""
        if self._publishes is not None:
            await self._publishes.drain()

    async def publish_batch(
        self, entries: Sequence[pb.PublishRequest], timeout: float | None = 60.0
    ) -> list[PublishResult | PublishError]:
        """Publish many records; each entry gets a PublishResult or a PublishError (its status
        code and message). Raises grpc.aio.AioRpcError when the call fails as a whole."""
        resp = await self.stub.PublishBatch(
            pb.PublishBatchRequest(entries=list(entries)), metadata=self._metadata, timeout=timeout
        )
        out: list[PublishResult | PublishError] = []
        for r in resp.results:
            if r.code == 0:
                out.append(_result(r.response))
            else:
                out.append(PublishError(_STATUS_BY_VALUE.get(r.code, grpc.StatusCode.UNKNOWN), r.message))
        return out


def _publish_request(
    topic: str,
    value: bytes,
    key: bytes | None = None,
    headers: Sequence[tuple[str, bytes]] = (),
    idempotency_key: str = "",
    partition: int | None = None,
) -> pb.PublishRequest:
    req = pb.PublishRequest(
        topic=topic,
        value=value,
        headers=[pb.Header(key=k, value=v) for k, v in headers],
        idempotency_key=idempotency_key,
    )
    if key is not None:
        req.key = key
    if partition is not None:
        req.partition = partition
    return req


publish_request = _publish_request

_STATUS_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}
_BATCH_TIMEOUT = 60.0  # seconds for a coalesced PublishBatch call; each caller waits its own timeout


def _result(resp: pb.PublishResponse) -> PublishResult:
    return PublishResult(resp.idempotency_key, resp.topic, resp.partition, resp.offset, resp.duplicate)
