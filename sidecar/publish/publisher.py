"""Idempotent Publish on top of the idempotent producer.

The producer's own idempotence removes duplicates from its internal retries only. An app that
retries Publish after a timeout, or a sidecar restart, starts over; so Publish looks the key up in
the dedup store first, produces only when it is new, and records (partition, offset, digest) after
Kafka acknowledged. Concurrent calls with one key in this process share one produce.

Everything is done a batch at a time: a PublishBatch call costs one store round trip per step
(lookup, claim, lookup again, record, release) and one pass through librdkafka, whatever its size.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sidecar import testing_hooks
from sidecar.config import PublishSettings, valid_topic
from sidecar.engine.identity import MAX_KEY_BYTES
from sidecar.errors import (
    AlreadyExists,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    SidecarError,
    StoreUnavailable,
    Unavailable,
)
from sidecar.kafka.producer import AsyncProducer, Outgoing, Produced, indeterminate
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


@dataclass(slots=True)
class _Entry:
    """A request this call publishes (the first one in flight with its key)."""

    req: PublishInput
    digest: str
    fut: asyncio.Future[PublishOutput]

    @property
    def key(self) -> str:
        return self.req.idempotency_key

    @property
    def claim_key(self) -> str:
        return f"pub:{self.req.idempotency_key}"


@dataclass(frozen=True, slots=True)
class _Slot:
    """Where one request of a batch gets its outcome: its own publish, or the one it joined."""

    entry: _Entry
    digest: str
    lead: bool


def _fail(entries: Sequence[_Entry], exc: BaseException) -> None:
    for e in entries:
        if not e.fut.done():
            e.fut.set_exception(exc)


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
        self._inflight: dict[str, _Entry] = {}
        self._owner = owner
        self._background: set[asyncio.Task[None]] = set()
        # The claim that serialises publishes of one key across sidecars lasts until Kafka must
        # have answered (librdkafka's delivery.timeout.ms is publish.timeout_seconds).
        self._claim_ms = int((settings.timeout_seconds + 10) * 1000)
        # How long past librdkafka's delivery timeout to wait for its report before answering
        # "indeterminate" (the report still comes, and is recorded then).
        self._report_grace_s = 5.0

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
        [out] = await self.publish_batch([req])
        if isinstance(out, Exception):
            raise out
        return out

    async def publish_batch(self, reqs: Sequence[PublishInput]) -> list[PublishOutput | Exception]:
        """Publish each request at most once per idempotency key; one outcome per request, in order.

        The batch moves through the store and the producer together: one lookup, one claim, one
        produce loop, one record and one release for all of its entries. An entry whose key is
        already being published (by a concurrent call, or earlier in this batch) waits for that
        publish and reports it as a duplicate, or AlreadyExists if its payload differs.
        """
        loop = asyncio.get_running_loop()
        slots: list[_Slot | Exception] = []
        leaders: list[_Entry] = []
        for req in reqs:
            try:
                self.validate(req)
            except SidecarError as exc:
                slots.append(exc)
                continue
            if not req.idempotency_key:
                req = replace(req, idempotency_key=new_key())
            dig = digest(req)
            running = self._inflight.get(req.idempotency_key)
            if running is None:
                entry = _Entry(req, dig, loop.create_future())
                self._inflight[entry.key] = entry
                leaders.append(entry)
                slots.append(_Slot(entry, dig, True))
            else:
                slots.append(_Slot(running, dig, False))
        if leaders:
            try:
                await self._publish_new(leaders)
            except BaseException as exc:
                for e in leaders:
                    if not e.fut.done():
                        e.fut.set_exception(exc)
                        e.fut.exception()  # mark retrieved: waiters re-raise it themselves
                raise
            finally:
                for e in leaders:
                    del self._inflight[e.key]
        return [await self._outcome(slot) for slot in slots]

    async def _outcome(self, slot: _Slot | Exception) -> PublishOutput | Exception:
        if isinstance(slot, Exception):
            return slot
        try:
            first = await asyncio.shield(slot.entry.fut)
            if slot.lead:
                return first
            return self._repeat(
                first.idempotency_key,
                slot.digest,
                PublishRecord(slot.entry.digest, first.topic, first.partition, first.offset),
            )
        except Exception as exc:  # noqa: BLE001 - this entry's failure, reported for it alone
            return exc

    async def _publish_new(self, entries: list[_Entry]) -> None:
        """Publish entries whose keys no call here is publishing; resolves every entry's future."""
        try:
            found = await self._store.publish_lookup([e.key for e in entries])
        except Exception as exc:  # noqa: BLE001 - every entry reports it
            _fail(entries, exc)
            return
        fresh = [e for e, record in zip(entries, found, strict=True) if not self._settle_found(e, record)]
        if not fresh:
            return
        try:
            claims = await self._store.claim([e.claim_key for e in fresh], self._owner, self._claim_ms)
        except Exception as exc:  # noqa: BLE001
            _fail(fresh, exc)
            return
        won = [e for e, c in zip(fresh, claims, strict=True) if c.status is ClaimStatus.NEW]
        contended = [e for e, c in zip(fresh, claims, strict=True) if c.status is not ClaimStatus.NEW]
        await asyncio.gather(self._produce_claimed(won), *(self._publish_contended(e) for e in contended))

    async def _publish_contended(self, entry: _Entry) -> None:
        """Another publisher holds the key's claim: wait for its record, or for the claim."""
        try:
            found = await self._claim(entry)
        except Exception as exc:  # noqa: BLE001
            _fail([entry], exc)
            return
        if not self._settle_found(entry, found):
            await self._produce_claimed([entry])

    async def _produce_claimed(self, entries: list[_Entry]) -> None:
        """Produce the entries whose publish claims we hold, record the results, release the claims.

        A record whose delivery report does not come in time (or whose call is cancelled while
        waiting) keeps its claim, and its outcome is recorded when librdkafka reports it, so a
        retry with that key waits for it instead of producing a second record.
        """
        if not entries:
            return
        kept: set[str] = set()
        try:
            # Published by another sidecar while we waited for the claim?
            found = await self._store.publish_lookup([e.key for e in entries])
            todo = [e for e, record in zip(entries, found, strict=True) if not self._settle_found(e, record)]
            futures = await self._producer.enqueue_many([self._outgoing(e.req) for e in todo])
            waiting = [f for f in futures if isinstance(f, asyncio.Future)]
            try:
                if waiting:
                    await asyncio.wait(waiting, timeout=self._producer.timeout_s + self._report_grace_s)
            finally:
                # Timed out or cancelled: whatever is still in flight is recorded when it lands.
                for e, f in zip(todo, futures, strict=True):
                    if isinstance(f, asyncio.Future) and not f.done():
                        kept.add(e.key)
                        self._spawn(self._record_late(e, f))
            produced: list[tuple[_Entry, PublishRecord]] = []
            for e, f in zip(todo, futures, strict=True):
                if isinstance(f, Exception):
                    _fail([e], f)
                elif e.key in kept:
                    _fail([e], indeterminate(self._producer.timeout_s))
                elif (err := f.exception()) is not None:
                    _fail([e], err)
                else:
                    p = f.result()
                    produced.append((e, PublishRecord(e.digest, p.topic, p.partition, p.offset)))
                    testing_hooks.reached("produce_before_record")
            if not produced:
                return
            stored = await self._store.publish_record(
                [(e.key, record) for e, record in produced], self._retention_ms
            )
            for (e, record), got in zip(produced, stored, strict=True):
                if got != record:  # another writer recorded first (its claim expired meanwhile)
                    self._metrics.published.labels("raced").inc()
                    self._settle_found(e, got)
                else:
                    self._metrics.published.labels("produced").inc()
                    e.fut.set_result(
                        PublishOutput(e.key, record.topic, record.partition, record.offset, False)
                    )
        except Exception as exc:  # noqa: BLE001 - entries not settled yet report it
            _fail([e for e in entries if not e.fut.done()], exc)
        finally:
            release = [e.claim_key for e in entries if e.key not in kept]
            with contextlib.suppress(StoreUnavailable):
                await self._store.release(release, self._owner)

    def _outgoing(self, req: PublishInput) -> Outgoing:
        headers: list[tuple[str, str | bytes | None]] = [
            *req.headers,
            (self._header, req.idempotency_key.encode()),
        ]
        return Outgoing(req.topic, req.value, req.key, headers, req.partition)

    def _settle_found(self, entry: _Entry, found: PublishRecord | None) -> bool:
        """Resolve ``entry`` from a record already stored for its key; False when there is none."""
        if found is None:
            return False
        try:
            entry.fut.set_result(self._repeat(entry.key, entry.digest, found))
        except SidecarError as exc:
            entry.fut.set_exception(exc)
        return True

    async def _claim(self, entry: _Entry) -> PublishRecord | None:
        """Win the right to produce the entry's key, or return the record another publisher stored."""
        key, claim_key = entry.key, entry.claim_key
        deadline = time.monotonic() + self._producer.timeout_s + 10
        while True:
            [claim] = await self._store.claim([claim_key], self._owner, self._claim_ms)
            if claim.status is ClaimStatus.NEW:
                return None
            [found] = await self._store.publish_lookup([key])
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"another sidecar has been publishing idempotency key {key!r} for too long; retry later"
                )
            await asyncio.sleep(0.02)

    async def _record_late(self, entry: _Entry, fut: asyncio.Future[Produced]) -> None:
        try:
            produced = await fut
            record = PublishRecord(entry.digest, produced.topic, produced.partition, produced.offset)
            await self._store.publish_record([(entry.key, record)], self._retention_ms)
            self._metrics.published.labels("late").inc()
        except Exception:  # noqa: BLE001 - not written, or the store is down: the claim expires
            return
        with contextlib.suppress(StoreUnavailable):
            await self._store.release([entry.claim_key], self._owner)

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
