"""A delivery as the app sees it: its record's fields, and ``ack`` and ``nack``, which go back on
the stream it came on (StreamingSubscribe) or through its client's gathered calls."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from dedup_client._proto import dedup_pb2 as pb
from dedup_client.results import AckError, AckResult
from dedup_client.streams import SettleError, StreamClosed, SubscribeStream

if TYPE_CHECKING:
    from dedup_client.client import DedupClient


class Message:
    """One delivery. Call :meth:`ack` once its side effects are done, or :meth:`nack`."""

    __slots__ = ("_client", "_d", "_stream")

    def __init__(self, client: DedupClient, d: pb.Delivery, stream: SubscribeStream | None = None) -> None:
        self._client = client
        self._d = d
        self._stream = stream  # the StreamingSubscribe call it came on, which takes its acks

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
        """Queue an ack (coalesced, or written on the message's stream); await the returned
        future to learn its result. It raises AckError when the ack could not be carried out."""
        if self._stream is not None:
            return self._client._stream_ack(self._stream, self._d.delivery_id)
        return self._client.ack(self._d.delivery_id, self._d.deadline_ms)

    async def nack(
        self, delay_seconds: float | None = None, dead_letter: bool = False, reason: str = ""
    ) -> None:
        if self._stream is not None:
            fields: dict[str, Any] = {"dead_letter": dead_letter, "reason": reason}
            if delay_seconds is not None:
                fields["delay_seconds"] = delay_seconds
            try:
                await self._stream.settle("nack", [self._d.delivery_id], **fields)
            except (SettleError, StreamClosed) as exc:
                raise AckError(str(exc)) from exc
            return
        await self._client.nack([self.delivery_id], delay_seconds, dead_letter, reason)
