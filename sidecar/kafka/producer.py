"""An asyncio face for confluent-kafka's idempotent producer.

``produce()`` is non-blocking in librdkafka; delivery reports are served by a poll thread and
reach the event loop in one ``call_soon_threadsafe`` wake-up per poll, where they settle their
batch's ``Sent`` (one future per batch, not per record). A fatal producer error (for example a
fenced idempotent producer) replaces the producer instead of wedging the sidecar.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, NamedTuple

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from sidecar.errors import (
    KafkaUnavailable,
    NotFound,
    PublishIndeterminate,
    ResourceExhausted,
    SidecarError,
)
from sidecar.kafka import connect
from sidecar.observability.outage import Outage

log = logging.getLogger(__name__)

_ANY_PARTITION = -1  # librdkafka's RD_KAFKA_PARTITION_UA: the partitioner chooses

OWNED_PROPERTIES = frozenset({"enable.idempotence", "acks"})
#: linger.ms unless kafka.producer sets it (librdkafka's own default, written out).
DEFAULT_LINGER_MS = 5


class Outgoing(NamedTuple):
    """One record to produce."""

    topic: str
    value: bytes
    key: bytes | None = None
    headers: list[tuple[str, str | bytes | None]] | None = None
    partition: int | None = None


class Produced(NamedTuple):
    """Where Kafka wrote a record."""

    topic: str
    partition: int
    offset: int


class Sent:
    """The outcomes of one batch handed to librdkafka, in order: a Produced, the error that
    refused the record, or None while its delivery report has not come. ``done`` resolves once
    every record has its outcome (librdkafka reports each one, at the latest after
    ``delivery.timeout.ms``)."""

    __slots__ = ("done", "pending", "results")

    def __init__(self, n: int, done: asyncio.Future[None]) -> None:
        self.results: list[Produced | SidecarError | None] = [None] * n
        self.pending = n
        self.done = done

    def _settle(self, i: int, result: Produced | SidecarError) -> None:
        self.results[i] = result
        self.pending -= 1
        if self.pending == 0 and not self.done.done():
            self.done.set_result(None)


class AsyncProducer:
    """Parameters:
    config: librdkafka producer properties; idempotence and acks=all are always forced.
    timeout_s: how long a produce may wait for room in the queue and for its delivery report.
    outage: counts the failures the error callback reports and logs their changes of state
        (without it, each is logged).
    """

    def __init__(
        self,
        config: dict[str, Any],
        loop: asyncio.AbstractEventLoop,
        timeout_s: float = 30.0,
        outage: Outage | None = None,
    ) -> None:
        self._outage = outage
        self._config = {
            **config,
            "enable.idempotence": True,
            "acks": "all",
            "error_cb": self._on_error,
            "logger": connect.LIBRDKAFKA_LOG,
        }
        self._config.setdefault("delivery.timeout.ms", int(timeout_s * 1000))
        # Records produced within the linger share a request. A publish that is alone goes to a
        # second producer without linger instead (app.py, Publisher), so it does not wait; under
        # load the fuller requests cost librdkafka and the delivery reports far less CPU per
        # record (docs/ARCHITECTURE.md, "Per-call paths").
        self._config.setdefault("linger.ms", DEFAULT_LINGER_MS)
        self._loop = loop
        self._timeout_s = timeout_s
        self._producer = Producer(self._config)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._needs_reset = False
        # Delivery reports, appended by whichever thread serves librdkafka's callbacks.
        self._delivered: deque[tuple[Sent, int, str, KafkaError | None, Message]] = deque()
        self._thread = threading.Thread(target=self._run, name="dedup-producer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                producer = self._producer
            try:
                producer.poll(0.05)
            except KafkaException as exc:
                # confluent-kafka raises a fatal error from poll() (it does not always reach the
                # error callback): this thread must live on to replace the producer and to serve
                # every delivery report, or the callers wait for answers that never come.
                self._on_error(exc.args[0])
            except Exception:
                log.exception("serving the producer's callbacks failed; going on")
            if self._delivered:
                # One wake-up of the event loop for all the reports this poll served.
                self._loop.call_soon_threadsafe(self._resolve_delivered)
            if self._needs_reset:
                self._reset()
        if self._delivered:
            self._loop.call_soon_threadsafe(self._resolve_delivered)

    def _resolve_delivered(self) -> None:
        """On the event loop: settle the batches of the delivery reports gathered so far."""
        delivered = self._delivered
        while delivered:
            sent, i, topic, err, msg = delivered.popleft()
            if err is None:
                sent._settle(i, Produced(topic, msg.partition() or 0, msg.offset() or 0))
            else:
                sent._settle(i, _delivery_error(err, topic))

    def topics(self, timeout_s: float = 5.0) -> dict[str, int]:
        """Blocking: every topic of the cluster with its partition count (a metadata request)."""
        with self._lock:
            producer = self._producer
        meta = producer.list_topics(timeout=timeout_s)
        return {name: len(t.partitions) for name, t in meta.topics.items() if t.error is None}

    def _reset(self) -> None:
        log.error("re-creating the producer after a fatal error")
        with self._lock:
            old, self._producer = self._producer, Producer(self._config)
            self._needs_reset = False
        _drain(old, 5.0)

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            log.error("fatal producer error: %s", err)
            self._needs_reset = True
        elif self._outage is not None:
            self._outage.failed(f"producer: {err.str()}")
        else:
            log.warning("producer: %s", err)

    async def produce(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
        partition: int | None = None,
    ) -> Produced:
        """Produce one record and wait for Kafka's acknowledgement."""
        sent = await self.send([Outgoing(topic, value, key, [*headers], partition)])
        try:
            await asyncio.wait_for(asyncio.shield(sent.done), self._timeout_s + 5)
        except TimeoutError:
            raise indeterminate(self._timeout_s) from None
        [result] = sent.results
        if isinstance(result, SidecarError):
            raise result
        assert result is not None  # done: every record has its outcome
        return result

    @property
    def timeout_s(self) -> float:
        return self._timeout_s

    async def send(self, records: Sequence[Outgoing]) -> Sent:
        """Hand records to librdkafka in order; the returned Sent collects their outcomes.

        When librdkafka's queue is full the rest of the batch waits for room, up to
        ``timeout_s``, then is refused with RESOURCE_EXHAUSTED.
        """
        sent = Sent(len(records), self._loop.create_future())
        if not records:
            sent.done.set_result(None)
            return sent
        deadline = time.monotonic() + self._timeout_s
        delivered = self._delivered
        i = 0
        while i < len(records):
            try:
                with self._lock:
                    produce = self._producer.produce
                    for r in records[i:]:

                        def on_delivery(
                            err: KafkaError | None, msg: Message, i: int = i, topic: str = r.topic
                        ) -> None:
                            delivered.append((sent, i, topic, err, msg))

                        try:
                            partition = _ANY_PARTITION if r.partition is None else r.partition
                            produce(
                                r.topic, r.value, r.key, partition, headers=r.headers, on_delivery=on_delivery
                            )
                        except KafkaException as exc:
                            sent._settle(i, _delivery_error(exc.args[0], r.topic))
                        i += 1
            except BufferError:  # the record that raised was not taken: it starts the next round
                if time.monotonic() >= deadline:
                    full = ResourceExhausted(
                        "the producer queue stayed full; raise kafka.producer's queue.buffering.max.messages "
                        "or publish more slowly"
                    )
                    for j in range(i, len(records)):
                        sent._settle(j, full)
                    break
                await asyncio.sleep(0.005)
        return sent

    async def flush(self, timeout_s: float = 10.0) -> int:
        with self._lock:
            producer = self._producer
        return await asyncio.to_thread(producer.flush, timeout_s)

    async def close(self, timeout_s: float = 10.0) -> None:
        left = await self.flush(timeout_s)
        if left:
            log.warning("%d records were not delivered before shutdown", left)
        self._stop.set()
        await asyncio.to_thread(self._thread.join, 5)


def _drain(producer: Producer, timeout_s: float) -> None:
    """Serve the delivery reports a producer still owes (after a fatal error librdkafka fails
    every record it holds), however often flush() raises the fatal error again."""
    deadline = time.monotonic() + timeout_s
    while len(producer) and time.monotonic() < deadline:
        with contextlib.suppress(KafkaException):
            producer.flush(max(0.0, deadline - time.monotonic()))


def indeterminate(timeout_s: float) -> PublishIndeterminate:
    return PublishIndeterminate(
        f"Kafka did not acknowledge within {timeout_s}s (publish.timeout_seconds); the record may or may "
        "not be written: retry with the same idempotency key"
    )


def _delivery_error(err: KafkaError, topic: str) -> SidecarError:
    code = err.code()
    if code in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION):
        return NotFound(f"topic {topic!r} (or the partition) does not exist on the cluster")
    if code == KafkaError.MSG_SIZE_TOO_LARGE:
        return ResourceExhausted(
            f"the broker refused the record as too large for topic {topic!r} (broker/topic max.message.bytes)"
        )
    if code == KafkaError._MSG_TIMED_OUT:
        return PublishIndeterminate(
            "Kafka did not acknowledge in time; the record may or may not be written: retry with the same "
            "idempotency key"
        )
    return KafkaUnavailable(f"Kafka refused the record: {err.str()}")
