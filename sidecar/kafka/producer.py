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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from sidecar.errors import (
    KafkaUnavailable,
    NotFound,
    PublishIndeterminate,
    ResourceExhausted,
)

log = logging.getLogger(__name__)

OWNED_PROPERTIES = frozenset({"enable.idempotence", "acks"})


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
        self._thread = threading.Thread(target=self._run, name="dedup-producer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                producer = self._producer
            producer.poll(0.05)
            if self._needs_reset:
                self._reset()

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
        """Hand one record to librdkafka; the future resolves with Kafka's delivery report.

        librdkafka reports every message exactly once (success, failure, or after
        ``delivery.timeout.ms``), so the future always resolves.
        """
        fut: asyncio.Future[Produced] = self._loop.create_future()
        loop = self._loop

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if err is None:
                result: Produced | BaseException = Produced(
                    msg.topic() or topic, msg.partition() or 0, msg.offset() or 0
                )
            else:
                result = _delivery_error(err, topic)
            loop.call_soon_threadsafe(_resolve, fut, result)

        kwargs: dict[str, Any] = {
            "value": value,
            "key": key,
            "headers": list(headers),
            "on_delivery": on_delivery,
        }
        if partition is not None:
            kwargs["partition"] = partition
        deadline = time.monotonic() + self._timeout_s
        while True:
            try:
                with self._lock:
                    self._producer.produce(topic, **kwargs)
                break
            except BufferError:
                if time.monotonic() >= deadline:
                    raise ResourceExhausted(
                        "the producer queue stayed full; raise kafka.producer's queue.buffering.max.messages "
                        "or publish more slowly"
                    ) from None
                await asyncio.sleep(0.005)
            except KafkaException as exc:
                raise _delivery_error(exc.args[0], topic) from exc
        return fut

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


def _resolve(fut: asyncio.Future[Produced], result: Produced | BaseException) -> None:
    if fut.done():
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)


def _delivery_error(err: KafkaError, topic: str) -> Exception:
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
