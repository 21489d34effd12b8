"""Idempotent Publish on top of the idempotent producer.

The producer's own idempotence removes duplicates from its internal retries only. An app that
retries Publish after a timeout, or a sidecar restart, starts over; so Publish asks the dedup store
first, produces only when the key is new, and records (partition, offset, digest) after Kafka
acknowledged. Concurrent calls with one key in this process share one produce.

Everything is done a batch at a time. A PublishBatch call costs two store round trips whatever its
size: ``publish_begin`` (the key's record if it has one, else a claim on its publish, in one
atomic step) and ``publish_finish`` (store the records, drop the claims), with one pass through
librdkafka between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from sidecar import testing_hooks
from sidecar.config import PublishSettings, valid_topic
from sidecar.engine.identity import MAX_KEY_BYTES
from sidecar.errors import (
    AlreadyExists,
    InvalidArgument,
    KafkaUnavailable,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SidecarError,
    Unavailable,
)
from sidecar.groupcommit import GroupCommit
from sidecar.kafka.producer import AsyncProducer, Outgoing, Produced, Sent, indeterminate
from sidecar.kafka.topics import TopicCatalog
from sidecar.observability.metrics import Metrics, group_counter
from sidecar.store.base import Claim, ClaimStatus, DedupStore, PublishRecord


@dataclass(slots=True)
class PublishInput:
    topic: str
    value: bytes
    key: bytes | None
    headers: Sequence[tuple[str, bytes]]
    idempotency_key: str
    partition: int | None
    #: The caller's W3C trace headers (sidecar/observability/tracing.py): written with the record, not part of
    #: its payload (a retry with a new span id is the same record).
    trace: Sequence[tuple[str, bytes]] = ()


class PublishOutput(NamedTuple):
    idempotency_key: str
    topic: str
    partition: int
    offset: int
    duplicate: bool


Outcome = PublishOutput | Exception


class _Entry:
    """A request this process publishes: the first one in flight with its idempotency key.

    Later requests with the key (in this call or a concurrent one) join it: they wait on
    ``joined``, made only when someone joins, and report its outcome as a duplicate.
    """

    __slots__ = ("digest", "joined", "key", "outcome", "req")

    def __init__(self, req: PublishInput, digest: str) -> None:
        self.req = req
        self.key = req.idempotency_key
        self.digest = digest
        self.outcome: Outcome | None = None
        self.joined: asyncio.Event | None = None

    def settle(self, outcome: Outcome) -> None:
        if self.outcome is None:
            self.outcome = outcome
            if self.joined is not None:
                self.joined.set()


_UNCHECKED = InvalidArgument("unchecked")


def _fail(entries: Sequence[_Entry], exc: Exception) -> None:
    for e in entries:
        e.settle(exc)


def new_key() -> str:
    """A time-ordered unique key (UUIDv7 layout: 48-bit ms timestamp, then random bits)."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(uuid.uuid4().bytes[6:], "big") & ((1 << 80) - 1)
    value = (ms << 80) | (0x7 << 76) | (rand & ((1 << 76) - 1))
    value = (value & ~(0x3 << 62)) | (0x2 << 62)
    return str(uuid.UUID(int=value))


def digest(req: PublishInput) -> str:
    """A 128-bit BLAKE2b of everything that makes up the record, each part length-prefixed.

    The stored digest tells a retry (same payload: a duplicate) from a reuse of the key (another
    payload: AlreadyExists), so its layout must never change: records live for the retention.
    """
    topic = req.topic.encode()
    key = req.key if req.key is not None else b"\x00none"
    value = req.value
    parts = [
        len(topic).to_bytes(8, "big"),
        topic,
        len(key).to_bytes(8, "big"),
        key,
        len(value).to_bytes(8, "big"),
    ]
    parts.append(value)
    for k, v in req.headers:
        kb = k.encode()
        parts += (len(kb).to_bytes(4, "big"), kb, len(v).to_bytes(8, "big"), v)
    if req.partition is not None:
        parts.append(b"p" + req.partition.to_bytes(4, "big", signed=True))
    return hashlib.blake2b(b"".join(parts), digest_size=16).hexdigest()


#: A produce of at most this many records, with no other in flight, goes to the producer
#: without linger.
ALONE_MAX = 4


class Publisher:
    """Parameters (besides the settings and the parts): ``producer`` lingers (``linger.ms``, 5 by
    default) so that records produced close together share requests; ``fast``, when given, is
    the same producer without linger, for a produce that is alone."""

    def __init__(
        self,
        settings: PublishSettings,
        idempotency_header: str,
        store: DedupStore,
        producer: AsyncProducer,
        metrics: Metrics,
        retention_ms: int,
        owner: str = "publisher",
        topics: TopicCatalog | None = None,
        fast: AsyncProducer | None = None,
    ) -> None:
        self._settings = settings
        self._topics = topics  # None: no existence check (publish.check_topics = false)
        self._header = idempotency_header
        self._store = store
        self._producer = producer
        self._fast = fast  # the same producer settings without linger (see _produce_claimed)
        self._producing = 0  # produce passes in flight
        self._metrics = metrics
        self._retention_ms = retention_ms
        self._inflight: dict[str, _Entry] = {}
        # Topic name checks, by name: a batch names the same topic hundreds of times.
        self._topic_errors: dict[str, SidecarError | None] = {}
        self._owner = owner
        self._background: set[asyncio.Task[None]] = set()
        # The claim that serialises publishes of one key across sidecars lasts until Kafka must
        # have answered (librdkafka's delivery.timeout.ms is publish.timeout_seconds).
        self._claim_ms = int((settings.timeout_seconds + 10) * 1000)
        # How long past librdkafka's delivery timeout to wait for its report before answering
        # "indeterminate" (the report still comes, and is recorded then).
        self._report_grace_s = 5.0
        # Concurrent Publish calls go through the store and the producer together, as the
        # entries of one PublishBatch do (group commit; a lone call does not wait).
        self._singles: GroupCommit[PublishInput, Outcome] = GroupCommit(
            self.publish_batch,
            max_in_flight=2,
            max_items=settings.max_batch_entries,
            on_run=group_counter(metrics, "publish"),
        )

    def validate(self, req: PublishInput) -> None:
        s = self._settings
        topic_error = self._topic_errors.get(req.topic, _UNCHECKED)
        if topic_error is _UNCHECKED:
            topic_error = self._check_topic(req.topic)
            if len(self._topic_errors) < 1024:
                self._topic_errors[req.topic] = topic_error
        if topic_error is not None:
            raise type(topic_error)(*topic_error.args)  # a fresh one: a raise grows its traceback
        key = req.idempotency_key
        if len(key) * 4 > MAX_KEY_BYTES and len(kb := key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
            raise InvalidArgument(f"idempotency_key is {len(kb)} bytes; the limit is {MAX_KEY_BYTES}")
        size = len(req.value) + len(req.key or b"")
        for k, v in req.headers:
            if k == self._header:
                raise InvalidArgument(
                    f"header {k!r} is the idempotency header; pass the key in idempotency_key instead"
                )
            size += len(k) + len(v)
        if size > s.max_message_bytes:
            raise ResourceExhausted(
                f"record is {size} bytes; the limit is {s.max_message_bytes} (publish.max_message_bytes)"
            )
        if req.partition is not None and req.partition < 0:
            raise InvalidArgument("partition must not be negative")

    def _check_topic(self, topic: str) -> SidecarError | None:
        if not topic:
            return InvalidArgument("topic is empty")
        if not valid_topic(topic):
            return InvalidArgument(f"invalid topic name {topic[:300]!r}: use 1-249 of [A-Za-z0-9._-]")
        if self._settings.allowed_topics and topic not in self._settings.allowed_topics:
            return PermissionDenied(f"topic {topic!r} is not in publish.allowed_topics")
        return None

    async def publish(self, req: PublishInput) -> PublishOutput:
        """Publish one record; concurrent calls share store round trips and a producer pass."""
        [out] = await self._singles([req])
        if isinstance(out, Exception):
            raise out
        return out

    def publish_nowait(
        self, req: PublishInput, done: Callable[[list[Outcome] | BaseException], None]
    ) -> None:
        """``publish`` for a caller that must not wait (a stream reader): ``done`` gets a list
        with the one outcome, or the exception that failed the whole group."""
        self._singles.submit([req], done)

    async def publish_batch(self, reqs: Sequence[PublishInput]) -> list[Outcome]:
        """Publish each request at most once per idempotency key; one outcome per request, in order.

        The batch moves through the store and the producer together. An entry whose key is
        already being published (by a concurrent call, or earlier in this batch) waits for that
        publish and reports it as a duplicate, or AlreadyExists if its payload differs.
        """
        t0 = time.perf_counter()
        slots: list[_Entry | tuple[_Entry, str] | Exception] = []
        leaders: list[_Entry] = []
        inflight = self._inflight
        checked: list[PublishInput | SidecarError] = []
        for req in reqs:
            try:
                self.validate(req)
                checked.append(req)
            except SidecarError as exc:
                checked.append(exc)
        if self._topics is not None:
            await self._check_exists(checked, self._topics)
        for item in checked:
            if isinstance(item, SidecarError):
                slots.append(item)
                continue
            req = item
            if not req.idempotency_key:
                req = replace(req, idempotency_key=new_key())
            dig = digest(req)
            running = inflight.get(req.idempotency_key)
            if running is None:
                entry = inflight[req.idempotency_key] = _Entry(req, dig)
                leaders.append(entry)
                slots.append(entry)
            else:
                slots.append((running, dig))
        if leaders:
            try:
                await self._publish_new(leaders)
            finally:
                for e in leaders:
                    del inflight[e.key]
                    # Cancelled, or a bug: whoever joined these must not wait forever.
                    e.settle(Unavailable("the publish was interrupted; retry with the same idempotency key"))
        out: list[Outcome] = []
        for slot in slots:
            if isinstance(slot, _Entry):
                assert slot.outcome is not None  # settled above
                out.append(slot.outcome)
            elif isinstance(slot, tuple):
                out.append(await self._joined(*slot))
            else:
                out.append(slot)
        self._observe(out, time.perf_counter() - t0)
        return out

    def _observe(self, outcomes: list[Outcome], seconds: float) -> None:
        """Every entry of the call took ``seconds``; counted per outcome (ok, duplicate, error)."""
        ok = dup = 0
        for o in outcomes:
            if isinstance(o, PublishOutput):
                if o.duplicate:
                    dup += 1
                else:
                    ok += 1
        hist = self._metrics.publish_seconds
        for label, n in (("ok", ok), ("duplicate", dup), ("error", len(outcomes) - ok - dup)):
            if n:
                hist.observe(seconds, n, (label,))

    @staticmethod
    async def _check_exists(checked: list[PublishInput | SidecarError], topics: TopicCatalog) -> None:
        """Replace each request for a topic (or partition) the cluster does not have with
        NotFound, before anything is claimed in the store or sent to Kafka."""
        known = topics.known
        unseen = {r.topic for r in checked if not isinstance(r, SidecarError) and known(r.topic) is None}
        failed: SidecarError | None = None
        if unseen:
            try:
                await topics.partitions(unseen)
            except KafkaUnavailable as exc:
                failed = exc
        for i, r in enumerate(checked):
            if isinstance(r, SidecarError):
                continue
            n = known(r.topic)
            if n is None:
                checked[i] = failed or NotFound(
                    f"topic {r.topic!r} does not exist on the cluster: create it, or set "
                    "publish.check_topics = false if the cluster creates topics on first write"
                )
            elif r.partition is not None and r.partition >= n:
                checked[i] = NotFound(
                    f"partition {r.partition} of topic {r.topic!r} does not exist: it has {n}"
                )

    async def _joined(self, first: _Entry, dig: str) -> Outcome:
        """The outcome of a request that joined ``first``, a publish of the same key."""
        if first.outcome is None:
            if first.joined is None:
                first.joined = asyncio.Event()
            await first.joined.wait()
        outcome = first.outcome
        assert outcome is not None  # settle() sets it before it wakes the joined
        if isinstance(outcome, Exception):
            return outcome
        record = PublishRecord(first.digest, outcome.topic, outcome.partition, outcome.offset)
        try:
            return self._repeat(outcome.idempotency_key, dig, record)
        except SidecarError as exc:
            return exc

    async def _publish_new(self, entries: list[_Entry]) -> None:
        """Publish entries whose keys no call here is publishing; settles every entry."""
        try:
            begun = await self._store.publish_begin([e.key for e in entries], self._owner, self._claim_ms)
        except Exception as exc:  # noqa: BLE001 - every entry reports it
            _fail(entries, exc)
            return
        won: list[_Entry] = []
        contended: list[_Entry] = []
        for e, got in zip(entries, begun, strict=True):
            if not isinstance(got, Claim):
                self._settle_found(e, got)
            elif got.status is ClaimStatus.NEW:
                won.append(e)
            else:
                contended.append(e)
        await asyncio.gather(self._produce_claimed(won), *(self._publish_contended(e) for e in contended))

    async def _publish_contended(self, entry: _Entry) -> None:
        """Another publisher holds the key's claim: wait for its record, or for the claim."""
        deadline = time.monotonic() + self._producer.timeout_s + 10
        while True:
            await asyncio.sleep(0.02)
            try:
                [got] = await self._store.publish_begin([entry.key], self._owner, self._claim_ms)
            except Exception as exc:  # noqa: BLE001
                entry.settle(exc)
                return
            if not isinstance(got, Claim):
                self._settle_found(entry, got)
                return
            if got.status is ClaimStatus.NEW:
                await self._produce_claimed([entry])
                return
            if time.monotonic() > deadline:
                entry.settle(
                    Unavailable(
                        f"another sidecar has been publishing idempotency key {entry.key!r} for too long; "
                        "retry later"
                    )
                )
                return

    async def _produce_claimed(self, entries: list[_Entry]) -> None:
        """Produce the entries whose publish claims we hold, then record the results and drop the claims.

        A record whose delivery report does not come in time keeps its claim, and its outcome is
        recorded when librdkafka reports it, so a retry with that key waits for it instead of
        producing a second record. If the call is cancelled meanwhile, the whole batch is
        finished that way.
        """
        if not entries:
            return
        # A few records while nothing else is being produced: the producer without linger, so a
        # call that is alone does not wait for company. Otherwise the lingering producer, whose
        # fuller requests cost librdkafka and the delivery reports far less per record.
        alone = self._producing == 0 and len(entries) <= ALONE_MAX
        producer = self._fast if alone and self._fast is not None else self._producer
        self._producing += 1
        try:
            await self._produce_on(producer, entries)
        finally:
            self._producing -= 1

    async def _produce_on(self, producer: AsyncProducer, entries: list[_Entry]) -> None:
        sending = asyncio.ensure_future(producer.send([self._outgoing(e.req) for e in entries]))
        try:
            sent = await asyncio.shield(sending)
            await asyncio.wait_for(asyncio.shield(sent.done), self._producer.timeout_s + self._report_grace_s)
        except TimeoutError:
            sent = sending.result()
            late = [i for i, r in enumerate(sent.results) if r is None]
            _fail([entries[i] for i in late], indeterminate(self._producer.timeout_s))
            self._spawn(self._finish_late(entries, late, sending))
        except BaseException:
            self._spawn(self._finish_late(entries, range(len(entries)), sending))
            raise
        await self._finish(entries, sent.results, late=False)

    async def _finish_late(
        self, entries: list[_Entry], indexes: Sequence[int], sending: asyncio.Future[Sent]
    ) -> None:
        """Finish the entries at ``indexes``, whose callers stopped waiting, once librdkafka
        reports their records."""
        with contextlib.suppress(Exception):  # the store is down: the claims expire
            sent = await sending
            await sent.done
            await self._finish([entries[i] for i in indexes], [sent.results[i] for i in indexes], late=True)

    async def _finish(
        self, entries: list[_Entry], results: Sequence[Produced | SidecarError | None], late: bool
    ) -> None:
        """Store the produced records, give up the claims of refused ones; settle the entries.

        A record still in flight (result None) keeps its claim: it is finished late.
        """
        finish: list[tuple[_Entry, PublishRecord | None]] = []
        for e, r in zip(entries, results, strict=True):
            if r is None:
                continue
            if isinstance(r, SidecarError):
                e.settle(r)
                finish.append((e, None))
            else:
                finish.append((e, PublishRecord(e.digest, r.topic, r.partition, r.offset)))
                testing_hooks.reached("produce_before_record")
        if not finish:
            return
        try:
            stored = await self._store.publish_finish(
                [(e.key, record) for e, record in finish], self._owner, self._retention_ms
            )
        except Exception as exc:  # noqa: BLE001 - not recorded: report it; the claims expire
            _fail([e for e, _ in finish], exc)
            return
        produced = raced = 0
        for (e, record), got in zip(finish, stored, strict=True):
            if record is None:
                continue
            if got == record:
                produced += 1
                e.settle(PublishOutput(e.key, record.topic, record.partition, record.offset, False))
            else:  # another writer recorded first (its claim expired meanwhile)
                assert got is not None  # a record was given, so one is stored
                raced += 1
                self._settle_found(e, got)
        published = self._metrics.published
        if produced:
            published.labels("late" if late else "produced").inc(produced)
        if raced:
            published.labels("raced").inc(raced)

    def _outgoing(self, req: PublishInput) -> Outgoing:
        headers: list[tuple[str, str | bytes | None]] = [
            *req.headers,
            (self._header, req.idempotency_key.encode()),
        ]
        if req.trace and not any(k == "traceparent" for k, _ in req.headers):
            headers += req.trace
        return Outgoing(req.topic, req.value, req.key, headers, req.partition)

    def _settle_found(self, entry: _Entry, found: PublishRecord) -> None:
        """Settle ``entry`` from the record already stored for its key."""
        try:
            entry.settle(self._repeat(entry.key, entry.digest, found))
        except SidecarError as exc:
            entry.settle(exc)

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
