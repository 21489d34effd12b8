"""Gathering: acks and publishes of concurrent callers sent together in one call, each caller
answered with its own result; and the retry of a call that failed with UNAVAILABLE."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import grpc

from dedup_client._proto import dedup_pb2 as pb
from dedup_client._proto import dedup_pb2_grpc as pb_grpc
from dedup_client.results import (
    STATUS_BY_VALUE,
    AckError,
    AckResult,
    PublishError,
    PublishResult,
    publish_result,
)

T = TypeVar("T")
R = TypeVar("R")


class Gatherer(Generic[T, R]):
    """Gathers items for ``linger`` seconds or ``max_items`` items, then sends them in one call
    (``_send``, by the subclass); each item's future gets its own result."""

    def __init__(
        self, stub: Callable[[], pb_grpc.DedupServiceAsyncStub], linger: float, max_items: int, metadata: Any
    ) -> None:
        self._stub = stub  # the stub of each call's worker
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


async def retry_unavailable(call: Callable[[], Any], until: float) -> Any:
    """``await call()``, again after a growing pause while it fails with UNAVAILABLE (the store
    or Kafka unreachable, the sidecar restarting), until the wall clock reaches ``until``.

    For Ack: an ack is idempotent (a repeat answers ALREADY_ACKED), and one that lands before
    the delivery's deadline spares the app a redelivery."""
    pause = 0.05
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.time() + pause >= until:
                raise
        await asyncio.sleep(pause)
        pause = min(2 * pause, 1.0)


def retry_until(deadlines_ms: Sequence[int], retry_seconds: float) -> float:
    """Until when an ack of deliveries with these deadlines is retried: the earliest deadline
    (past it the record is redelivered anyway), at most ``retry_seconds`` from now."""
    cap = time.time() + retry_seconds
    known = [d / 1000 for d in deadlines_ms if d]
    return min(cap, min(known)) if known else cap


class AckBatcher(Gatherer[tuple[str, int], AckResult]):
    """Acks: one Ack call per gathering; items are (delivery id, its deadline in ms or 0).
    A call that fails with UNAVAILABLE is made again until the earliest deadline, at most
    ``retry_seconds``."""

    retry_seconds = 10.0

    async def _send(self, items: list[tuple[str, int]], futs: list[asyncio.Future[AckResult]]) -> None:
        ids = [did for did, _ in items]
        until = retry_until([d for _, d in items], self.retry_seconds)
        try:
            resp: pb.AckResponse = await retry_unavailable(
                lambda: self._stub().Ack(pb.AckRequest(delivery_ids=ids), metadata=self._metadata), until
            )
        except grpc.aio.AioRpcError as exc:
            for f in futs:
                if not f.done():
                    f.set_exception(AckError(f"{exc.code().name}: {exc.details()}"))
            return
        for f, r in zip(futs, resp.results, strict=True):
            if not f.done():
                f.set_result(AckResult(r))


class PublishBatcher(Gatherer[pb.PublishRequest, PublishResult]):
    """Publishes: one PublishBatch call per gathering."""

    async def _send(
        self, entries: list[pb.PublishRequest], futs: list[asyncio.Future[PublishResult]]
    ) -> None:
        try:
            resp: pb.PublishBatchResponse = await self._stub().PublishBatch(
                pb.PublishBatchRequest(entries=entries), metadata=self._metadata, timeout=BATCH_TIMEOUT
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
                f.set_result(publish_result(r.response))
            else:
                f.set_exception(PublishError(STATUS_BY_VALUE.get(r.code, grpc.StatusCode.UNKNOWN), r.message))
                f.exception()


BATCH_TIMEOUT = 60.0  # seconds for a coalesced PublishBatch call; each caller waits its own timeout
