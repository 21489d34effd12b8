"""Idempotent Publish on top of the idempotent producer.

The producer's own idempotence removes duplicates from its internal retries only. An app that
retries Publish after a timeout, or a sidecar restart, starts over; so Publish looks the key up in
the dedup store first, produces only when it is new, and records (partition, offset, digest) after
Kafka acknowledged. Concurrent calls with one key in this process share one produce.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from sidecar import testing_hooks
from sidecar.config import PublishSettings, valid_topic
from sidecar.engine.identity import MAX_KEY_BYTES
from sidecar.errors import (
    AlreadyExists,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    StoreUnavailable,
    Unavailable,
)
from sidecar.kafka.producer import AsyncProducer, Produced, indeterminate
from sidecar.metrics import Metrics
from sidecar.store.base import ClaimStatus, DedupStore, PublishRecord


@dataclass(frozen=True, slots=True)
class PublishInput:
    topic: str
    value: bytes
    key: bytes | None
    headers: Sequence[tuple[str, bytes]]
    idempotency_key: str
    partition: int | None


@dataclass(frozen=True, slots=True)
class PublishOutput:
    idempotency_key: str
    topic: str
    partition: int
    offset: int
    duplicate: bool


def new_key() -> str:
    """A time-ordered unique key (UUIDv7 layout: 48-bit ms timestamp, then random bits)."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(uuid.uuid4().bytes[6:], "big") & ((1 << 80) - 1)
    value = (ms << 80) | (0x7 << 76) | (rand & ((1 << 76) - 1))
    value = (value & ~(0x3 << 62)) | (0x2 << 62)
    return str(uuid.UUID(int=value))


def digest(req: PublishInput) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in (req.topic.encode(), req.key if req.key is not None else b"\x00none", req.value):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    for k, v in req.headers:
        h.update(len(k).to_bytes(4, "big") + k.encode() + len(v).to_bytes(8, "big") + v)
    if req.partition is not None:
        h.update(b"p" + req.partition.to_bytes(4, "big", signed=True))
    return h.hexdigest()


class Publisher:
    def __init__(
        self,
        settings: PublishSettings,
        idempotency_header: str,
        store: DedupStore,
        producer: AsyncProducer,
        metrics: Metrics,
        retention_ms: int,
        owner: str = "publisher",
    ) -> None:
        self._settings = settings
        self._header = idempotency_header
        self._store = store
        self._producer = producer
        self._metrics = metrics
        self._retention_ms = retention_ms
        self._inflight: dict[str, tuple[str, asyncio.Future[PublishOutput]]] = {}
        self._owner = owner
        self._background: set[asyncio.Task[None]] = set()
        # The claim that serialises publishes of one key across sidecars lasts until Kafka must
        # have answered (librdkafka's delivery.timeout.ms is publish.timeout_seconds).
        self._claim_ms = int((settings.timeout_seconds + 10) * 1000)

    def validate(self, req: PublishInput) -> None:
        s = self._settings
        if not req.topic:
            raise InvalidArgument("topic is empty")
        if not valid_topic(req.topic):
            raise InvalidArgument(f"invalid topic name {req.topic[:300]!r}: use 1-249 of [A-Za-z0-9._-]")
        if s.allowed_topics and req.topic not in s.allowed_topics:
            raise PermissionDenied(f"topic {req.topic!r} is not in publish.allowed_topics")
        kb = req.idempotency_key.encode("utf-8", "surrogatepass")
        if len(kb) > MAX_KEY_BYTES:
            raise InvalidArgument(f"idempotency_key is {len(kb)} bytes; the limit is {MAX_KEY_BYTES}")
        for k, _ in req.headers:
            if k == self._header:
                raise InvalidArgument(
                    f"header {k!r} is the idempotency header; pass the key in idempotency_key instead"
                )
        size = len(req.value) + len(req.key or b"") + sum(len(k) + len(v) for k, v in req.headers)
        if size > s.max_message_bytes:
            raise ResourceExhausted(
                f"record is {size} bytes; the limit is {s.max_message_bytes} (publish.max_message_bytes)"
            )
        if req.partition is not None and req.partition < 0:
            raise InvalidArgument("partition must not be negative")

    async def publish(self, req: PublishInput) -> PublishOutput:
        self.validate(req)
        if not req.idempotency_key:
            req = PublishInput(req.topic, req.value, req.key, req.headers, new_key(), req.partition)
        key = req.idempotency_key
        dig = digest(req)
        running = self._inflight.get(key)
        if running is not None:
            first = await asyncio.shield(running[1])
            return self._repeat(
                key, dig, PublishRecord(running[0], first.topic, first.partition, first.offset)
            )
        fut: asyncio.Future[PublishOutput] = asyncio.get_running_loop().create_future()
        self._inflight[key] = (dig, fut)
        try:
            out = await self._publish_once(req, dig)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        else:
            fut.set_result(out)
            return out
        finally:
            del self._inflight[key]

    async def _publish_once(self, req: PublishInput, dig: str) -> PublishOutput:
        key = req.idempotency_key
        found = await self._store.publish_lookup(key)
        if found is not None:
            return self._repeat(key, dig, found)
        claim_key = f"pub:{key}"
        found = await self._claim(key, claim_key)
        if found is not None:
            return self._repeat(key, dig, found)
        release = True
        try:
            found = await self._store.publish_lookup(key)  # published while we waited for the claim
            if found is not None:
                return self._repeat(key, dig, found)
            fut = await self._producer.enqueue(
                req.topic, req.value, req.key, [*req.headers, (self._header, key.encode())], req.partition
            )
            try:
                async with asyncio.timeout(self._producer.timeout_s + 5):
                    produced = await asyncio.shield(fut)
            except TimeoutError:
                # Indeterminate. Keep the claim and record the outcome when librdkafka reports it,
                # so a retry with this key waits for it instead of producing a second record.
                release = False
                self._spawn(self._record_late(key, claim_key, dig, fut))
                raise indeterminate(self._producer.timeout_s) from None
            record = PublishRecord(dig, produced.topic, produced.partition, produced.offset)
            testing_hooks.reached("produce_before_record")
            stored = await self._store.publish_record(key, record, self._retention_ms)
        finally:
            if release:
                with contextlib.suppress(StoreUnavailable):
                    await self._store.release([claim_key], self._owner)
        if stored != record:  # another writer recorded first (its claim expired meanwhile)
            self._metrics.published.labels("raced").inc()
            return self._repeat(key, dig, stored)
        self._metrics.published.labels("produced").inc()
        return PublishOutput(key, produced.topic, produced.partition, produced.offset, False)

    async def _claim(self, key: str, claim_key: str) -> PublishRecord | None:
        """Win the right to produce ``key``, or return the record another publisher stored."""
        deadline = time.monotonic() + self._producer.timeout_s + 10
        while True:
            [claim] = await self._store.claim([claim_key], self._owner, self._claim_ms)
            if claim.status is ClaimStatus.NEW:
                return None
            found = await self._store.publish_lookup(key)
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"another sidecar has been publishing idempotency key {key!r} for too long; retry later"
                )
            await asyncio.sleep(0.02)

    async def _record_late(self, key: str, claim_key: str, dig: str, fut: asyncio.Future[Produced]) -> None:
        try:
            produced = await fut
            record = PublishRecord(dig, produced.topic, produced.partition, produced.offset)
            await self._store.publish_record(key, record, self._retention_ms)
            self._metrics.published.labels("late").inc()
        except Exception:  # noqa: BLE001 - not written, or the store is down: the claim expires
            return
        with contextlib.suppress(StoreUnavailable):
            await self._store.release([claim_key], self._owner)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _repeat(self, key: str, dig: str, found: PublishRecord) -> PublishOutput:
        if found.digest != dig:
            self._metrics.published.labels("conflict").inc()
            raise AlreadyExists(
                f"idempotency key {key!r} was already published with a different payload "
                "(topic, key, value or headers differ); use a new key for a new message"
            )
        self._metrics.published.labels("duplicate").inc()
        return PublishOutput(key, found.topic, found.partition, found.offset, True)
