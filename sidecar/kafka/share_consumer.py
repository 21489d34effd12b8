"""The share consumer (queue mode, KIP-932), owned by one poll thread like the group consumer.

A share group hands each record to one member under an acquisition lock
(``share.record.lock.duration.ms``) and takes one acknowledgement per record: ACCEPT (done),
RELEASE (hand it out again; the broker counts the delivery) or REJECT (archive it). The sidecar
runs librdkafka's share consumer in explicit acknowledgement mode, and the engine decides every
record's acknowledgement; this thread only applies them.

Two properties of librdkafka's share consumer (2.16, marked "preview") shape this loop:

- ``poll`` refuses (IllegalStateException) while any record of the previous poll is not
  acknowledged. So the thread polls, hands the batch to the event loop, and polls again only
  once the engine acknowledged every record of it. ``kafka.share_max_poll_records`` bounds a
  batch; the engine releases whatever it cannot finish before the lock ends, so a batch is
  always answered within one lock duration (far inside ``max.poll.interval.ms``).
- Acknowledgements are sent with the next ``poll`` or ``commit_*``. While part of a poll is
  still held, the thread sends each round of them with ``commit_sync``, so an ACCEPT reaches the
  broker at once rather than when the whole batch is done (overlapping ``commit_async`` calls
  drew INVALID_REQUEST from Kafka 4.2.1 for whole rounds). The last round goes with the next
  poll. The broker's refusals come back through the acknowledgement commit callback, on this
  thread.
- The broker lends whole producer batches, so a poll can bring more than ``max.poll.records``.

The group-consumer interface the engine drives (join, leave, commit, pause, taken_in) is kept,
so the engine holds either loop the same way; commits and pauses mean nothing to a share group.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import (
    AcknowledgeType,
    IllegalStateException,
    KafkaError,
    KafkaException,
    Message,
    ShareConsumer,
    TopicPartition,
)

from sidecar.kafka import connect
from sidecar.kafka.consumer import CommitOffset
from sidecar.kafka.poll_thread import PollThread
from sidecar.observability.outage import Outage

log = logging.getLogger(__name__)

ACCEPT = int(AcknowledgeType.ACCEPT)
RELEASE = int(AcknowledgeType.RELEASE)
REJECT = int(AcknowledgeType.REJECT)
ACK_NAMES = {ACCEPT: "accept", RELEASE: "release", REJECT: "reject"}

#: librdkafka properties the sidecar sets itself in share mode.
OWNED_PROPERTIES = frozenset({"group.id", "share.acknowledgement.mode", "max.poll.records"})

#: (topic, partition, offset, acknowledgement type)
Ack = tuple[str, int, int, int]


class ShareHandler(Protocol):
    def on_share_records(self, records: list[Message], polled_at: float) -> None:
        """Called on the event loop with a polled batch; ``polled_at`` is time.monotonic()
        when the poll returned (the records' locks run from before it)."""
        ...


@dataclass
class ShareCounts:
    """What the thread did, for metrics and ``dedup-sidecar status`` (read from any thread)."""

    polls: int = 0
    acquired: int = 0
    acks: dict[str, int] = field(default_factory=lambda: {"accept": 0, "release": 0, "reject": 0})
    #: Acknowledgements the broker refused (the lock had run out: the record went to another
    #: member, whose claim in the store decides it).
    refused: int = 0


class ShareConsumerLoop(PollThread[ShareConsumer]):
    """Runs a share consumer on its own thread. All public methods are safe from the event loop.

    Parameters:
        config: librdkafka properties (bootstrap, group, security...).
        topics: topics to subscribe to.
        handler: receives each polled batch on ``loop``.
        max_poll_records: records per poll (librdkafka's max.poll.records): about what the member
            holds at once.
        outage: counts the failures the error callback reports (see ConsumerLoop).
        on_refused: told how many acknowledgements the broker refused (metrics).
    """

    def __init__(
        self,
        config: dict[str, Any],
        topics: Sequence[str],
        handler: ShareHandler,
        loop: asyncio.AbstractEventLoop,
        max_poll_records: int,
        outage: Outage | None = None,
        on_refused: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__("share consumer", outage)
        self._on_refused = on_refused
        self._config = {
            **config,
            "share.acknowledgement.mode": "explicit",
            "max.poll.records": max_poll_records,
            "error_cb": self._on_error,
            "logger": connect.LIBRDKAFKA_LOG,
        }
        self._topics = list(topics)
        self._handler = handler
        self._loop = loop
        self._acks: list[Ack] = []
        self._acks_lock = threading.Lock()
        self._consumer: ShareConsumer | None = None
        self._subscribed = False
        #: Records of the last poll not acknowledged yet (poll thread only; len() read anywhere).
        self._held: set[tuple[str, int, int]] = set()
        self.counts = ShareCounts()
        self.halted = False  # set on shutdown: poll no more, keep applying acknowledgements
        #: Set by the engine while no app stream is attached: poll no more, stay in the group.
        #: A record acquired then could only be released again, and each release counts a
        #: delivery toward the broker's limit, past which it archives the record.
        self.idle = False

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread. The member joins the group when an app stream attaches
        (:meth:`join_group`): records acquired with nobody to deliver them to would only wait
        out their locks and use up deliveries."""
        self._consumer = ShareConsumer(self._config)
        self._consumer.set_acknowledgement_commit_callback(self._on_ack_commit)
        self._start_thread("dedup-share-consumer")

    @property
    def subscribed(self) -> bool:
        return self._subscribed

    @property
    def held(self) -> int:
        """Records of the last poll the engine has not acknowledged yet."""
        return len(self._held)

    @property
    def assigned_count(self) -> int:
        return 0  # share groups assign nothing exclusively

    @property
    def paused(self) -> frozenset[tuple[str, int]]:
        return frozenset()

    def join_group(self) -> None:
        self._command(self._do_subscribe)

    def leave_group(self) -> None:
        self._command(self._do_unsubscribe)

    def set_paused(self, tp: tuple[str, int], paused: bool) -> None:
        """Nothing to pause: a member holds one poll's records at most."""

    async def commit(self, offsets: Sequence[CommitOffset]) -> list[CommitOffset]:
        """Share groups commit no offsets; acknowledgements take their place."""
        return []

    def taken_in(self, n: int) -> None:
        """Nothing to count: a member holds one poll at a time, so intake needs no back-pressure."""

    def acknowledge(self, acks: Sequence[Ack]) -> None:
        """Queue acknowledgements (topic, partition, offset, ACCEPT|RELEASE|REJECT) for the
        thread; they reach the broker with its next commit or poll."""
        with self._acks_lock:
            self._acks.extend(acks)
        self._wake.set()

    # -- poll thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        try:
            while not self._stop.is_set():
                self._wake.clear()
                self._drain_commands(consumer)
                self._apply_acks(consumer)
                if not self._subscribed or self.halted or self.idle or self._held:
                    # Wait for the engine's acknowledgements (or a command); nothing to fetch.
                    self._wake.wait(0.05)
                    continue
                self._poll(consumer)
            self._drain_commands(consumer)
            self._apply_acks(consumer)
            if self._subscribed:
                self._do_unsubscribe(consumer)
        except BaseException as exc:
            log.exception("share consumer thread failed")
            self.fatal = exc
        finally:
            try:
                consumer.close()
            except Exception:
                log.exception("closing the share consumer failed")

    def _poll(self, consumer: ShareConsumer) -> None:
        try:
            msgs = consumer.poll(0.1)
        except IllegalStateException as exc:  # a record of the last poll is not acknowledged
            log.error("share consumer refused to poll: %s", exc)
            self._wake.wait(0.05)
            return
        except KafkaException as exc:
            if self._outage is not None:
                self._outage.failed(f"share consumer: {exc}")
            else:
                log.warning("share consumer poll failed: %s", exc)
            self._wake.wait(0.2)
            return
        polled_at = time.monotonic()
        records = []
        for m in msgs:
            err = m.error()
            if err is None:
                records.append(m)
            elif err.code() != KafkaError._PARTITION_EOF:
                log.warning("share consumer error: %s", err)
        self.counts.polls += 1
        if not records:
            return
        self._held = {(m.topic() or "", m.partition() or 0, m.offset() or 0) for m in records}
        self.counts.acquired += len(records)
        self._loop.call_soon_threadsafe(self._handler.on_share_records, records, polled_at)

    def _apply_acks(self, consumer: ShareConsumer) -> None:
        with self._acks_lock:
            acks, self._acks = self._acks, []
        if not acks:
            return
        applied = 0
        for topic, partition, offset, kind in acks:
            coords = (topic, partition, offset)
            if coords not in self._held:
                continue  # released by a leave already, or acknowledged twice
            try:
                consumer.acknowledge_offset(topic, partition, offset, AcknowledgeType(kind))
            except (IllegalStateException, KafkaException, ValueError) as exc:
                log.warning("acknowledging %s[%d]@%d failed: %s", topic, partition, offset, exc)
            self._held.discard(coords)
            self.counts.acks[ACK_NAMES[kind]] += 1
            applied += 1
        if applied and self._held:
            # Send them now rather than with the poll after the batch: an ACCEPT that reached
            # the broker is not handed to another member if this one dies. Synchronously: the
            # thread has nothing else to do until the batch is answered, acknowledgements that
            # come meanwhile go together in the next round, and librdkafka's overlapping
            # asynchronous acknowledgement commits drew INVALID_REQUEST from Kafka 4.2.
            try:
                self._commit_results(consumer.commit_sync(10))
            except KafkaException as exc:
                log.warning("sending acknowledgements failed (they go with the next poll): %s", exc)

    def _commit_results(self, results: dict[TopicPartition, KafkaException | None]) -> None:
        refused = [f"{tp.topic}[{tp.partition}]: {err}" for tp, err in results.items() if err is not None]
        if refused:
            log.info("the broker refused acknowledgements: %s", "; ".join(refused))

    def _on_ack_commit(self, offsets: dict[TopicPartition, set[int]], exc: KafkaException | None) -> None:
        """The broker's answer to acknowledgements (on this thread, inside a consumer call)."""
        if exc is None:
            return
        n = sum(len(v) for v in offsets.values())
        self.counts.refused += n
        if self._on_refused is not None:
            self._on_refused(n)
        # A lock that ran out before the acknowledgement arrived: the record is another
        # member's now, and its claim in the store decides it (a done key is accepted there).
        log.info("the broker refused %d acknowledgements: %s", n, exc)

    def _do_subscribe(self, consumer: ShareConsumer) -> None:
        if self._subscribed:
            return
        consumer.subscribe(self._topics)
        self._subscribed = True
        log.info("joined share group for topics %s", ", ".join(self._topics))

    def _do_unsubscribe(self, consumer: ShareConsumer) -> None:
        if not self._subscribed:
            return
        # Whatever the engine still holds goes back to the group now, not when its lock ends.
        self._apply_acks(consumer)
        for topic, partition, offset in sorted(self._held):
            try:
                consumer.acknowledge_offset(topic, partition, offset, AcknowledgeType.RELEASE)
                self.counts.acks["release"] += 1
            except (IllegalStateException, KafkaException) as exc:
                log.warning("releasing %s[%d]@%d failed: %s", topic, partition, offset, exc)
        self._held.clear()
        try:
            consumer.commit_sync(10)
        except KafkaException as exc:
            log.warning("sending the last acknowledgements failed: %s", exc)
        consumer.unsubscribe()
        self._subscribed = False
        log.info("left the share group")
