"""An asyncio face for confluent-kafka's idempotent producer.

``produce()`` is non-blocking in librdkafka; delivery reports are served by a poll thread and
resolve asyncio futures through ``call_soon_threadsafe``. A fatal producer error (for example a
fenced idempotent producer) replaces the producer instead of wedging the sidecar.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from sidecar.errors import (
    KafkaUnavailable,
    NotFound,
    PublishIndeterminate,
    ResourceExhausted,
    SidecarError,
)

log = logging.getLogger(__name__)

_ANY_PARTITION = -1  # librdkafka's RD_KAFKA_PARTITION_UA: the partitioner chooses

OWNED_PROPERTIES = frozenset({"enable.idempotence", "acks"})


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One record to produce."""

    topic: str
    value: bytes
    key: bytes | None = None
    headers: list[tuple[str, str | bytes | None]] = field(default_factory=list)
    partition: int | None = None


@dataclass(frozen=True, slots=True)
class Produced:
    topic: str
    partition: int
    offset: int


class AsyncProducer:
    """Parameters:
    config: librdkafka producer properties; idempotence and acks=all are always forced.
    timeout_s: how long a produce may wait for room in the queue and for its delivery report.
    """

    def __init__(
        self, config: dict[str, Any], loop: asyncio.AbstractEventLoop, timeout_s: float = 30.0
    ) -> None:
        self._config = {
            **config,
            "enable.idempotence": True,
            "acks": "all",
            "error_cb": self._on_error,
            "logger": logging.getLogger("librdkafka"),
        }
        self._config.setdefault("delivery.timeout.ms", int(timeout_s * 1000))
        self._config.setdefault("linger.ms", 2)
        self._loop = loop
        self._timeout_s = timeout_s
        self._producer = Producer(self._config)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._needs_reset = False
        # Delivery reports, appended by whichever thread serves librdkafka's callbacks.
        self._delivered: deque[tuple[asyncio.Future[Produced], str, KafkaError | None, Message]] = deque()
        self._thread = threading.Thread(target=self._run, name="dedup-producer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                producer = self._producer
            producer.poll(0.05)
            if self._delivered:
                # One wake-up of the event loop for all the reports this poll served.
                self._loop.call_soon_threadsafe(self._resolve_delivered)
            if self._needs_reset:
                self._reset()
        if self._delivered:
            self._loop.call_soon_threadsafe(self._resolve_delivered)

    def _resolve_delivered(self) -> None:
        """On the event loop: resolve the futures of the delivery reports gathered so far."""
        delivered = self._delivered
        while delivered:
            fut, topic, err, msg = delivered.popleft()
            if fut.done():
                continue
            if err is None:
                fut.set_result(Produced(topic, msg.partition() or 0, msg.offset() or 0))
            else:
                fut.set_exception(_delivery_error(err, topic))

    def _reset(self) -> None:
        log.error("re-creating the producer after a fatal error")
        with self._lock:
            old, self._producer = self._producer, Producer(self._config)
            self._needs_reset = False
        old.flush(5)

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            log.error("fatal producer error: %s", err)
            self._needs_reset = True
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
        fut = await self.enqueue(topic, value, key, headers, partition)
        try:
            return await asyncio.wait_for(fut, self._timeout_s + 5)
        except TimeoutError:
            raise indeterminate(self._timeout_s) from None

    @property
    def timeout_s(self) -> float:
        return self._timeout_s

    async def enqueue(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
        partition: int | None = None,
    ) -> asyncio.Future[Produced]:
        """Hand one record to librdkafka; the future resolves with Kafka's delivery report."""
        [fut] = await self.enqueue_many([Outgoing(topic, value, key, [*headers], partition)])
        if isinstance(fut, BaseException):
            raise fut
        return fut

    async def enqueue_many(
        self, records: Sequence[Outgoing]
    ) -> list[asyncio.Future[Produced] | SidecarError]:
        """Hand records to librdkafka in order; one future (or the refusal) per record.

        librdkafka reports every message exactly once (success, failure, or after
        ``delivery.timeout.ms``), so every future resolves. When librdkafka's queue is full the
        rest of the batch waits for room, up to ``timeout_s``.
        """
        out: list[asyncio.Future[Produced] | SidecarError] = []
        deadline = time.monotonic() + self._timeout_s
        create_future = self._loop.create_future
        delivered = self._delivered
        while len(out) < len(records):
            try:
                with self._lock:
                    produce = self._producer.produce
                    for r in records[len(out) :]:
                        fut: asyncio.Future[Produced] = create_future()

                        def on_delivery(
                            err: KafkaError | None,
                            msg: Message,
                            fut: asyncio.Future[Produced] = fut,
                            topic: str = r.topic,
                        ) -> None:
                            delivered.append((fut, topic, err, msg))

                        try:
                            partition = _ANY_PARTITION if r.partition is None else r.partition
                            produce(
                                r.topic, r.value, r.key, partition, headers=r.headers, on_delivery=on_delivery
                            )
                        except KafkaException as exc:
                            fut.cancel()
                            out.append(_delivery_error(exc.args[0], r.topic))
                            continue
                        out.append(fut)
            except BufferError:  # the record that raised was not taken: it starts the next round
                if time.monotonic() >= deadline:
                    full = ResourceExhausted(
                        "the producer queue stayed full; raise kafka.producer's queue.buffering.max.messages "
                        "or publish more slowly"
                    )
                    out += [full] * (len(records) - len(out))
                    break
                await asyncio.sleep(0.005)
        return out

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
