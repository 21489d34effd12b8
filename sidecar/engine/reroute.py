"""Records that leave their partition through the producer: dead letters and retry topics.

Dead letters: a record nacked with ``dead_letter``, nacked past ``delivery.max_attempts``,
claimed past it with no Nack (``deadline``: the app crashed or timed out on it every time), or
with no idempotency key under ``key_fallback = "dead-letter"``. It is written to the dead-letter
topic with provenance headers, its key marked done, and then settled. Writes retry until Kafka
takes them: a record is never settled before its copy is safe.

Retry topics (``delivery.retry_tiers_seconds``): a Nack whose delay reaches the first tier is not
held in memory. Its claim is extended to the due time (so no sidecar delivers it before then,
from either topic), it is written to ``{topic}.retry.{tier}`` with its idempotency key, attempt
and due time in headers, and its offset settles, so the source partition commits past it. The
sidecar consumes its retry topics like any other; a retry record read before its due time waits
in memory with its partition paused, and is claimed again (the next attempt) when it is due.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time

from sidecar.engine.core import Core
from sidecar.engine.ordering import Ordering
from sidecar.engine.records import Origin, Pending, State
from sidecar.errors import StoreUnavailable
from sidecar.store.base import ClaimMode, ClaimStatus

log = logging.getLogger(__name__)

H_TOPIC = "dedup-original-topic"
H_PARTITION = "dedup-original-partition"
H_OFFSET = "dedup-original-offset"
H_ATTEMPTS = "dedup-attempts"
H_FAILURES = "dedup-failures"
H_REASON = "dedup-reason"
H_REASON_CODE = "dedup-reason-code"
H_DUE = "dedup-retry-due-ms"
H_KEY = "dedup-retry-idempotency-key"
H_TIER = "dedup-retry-tier"
#: Headers the sidecar adds to a retry record, taken off again before the app sees it.
RETRY_HEADERS = frozenset({H_TOPIC, H_PARTITION, H_OFFSET, H_ATTEMPTS, H_FAILURES, H_DUE, H_KEY, H_TIER})


def retry_topic(template: str, topic: str, tier: int) -> str:
    return template.replace("{topic}", topic).replace("{tier}", str(tier))


class RetryRecord:
    """What the headers of a record read from a retry topic say (see ``Reroute.to_retry``)."""

    __slots__ = ("attempts", "due_ms", "failures", "headers", "idem_key", "origin")

    def __init__(self, source_topic: str, headers: list[tuple[str, bytes | None]]) -> None:
        found: dict[str, str] = {}
        kept: list[tuple[str, bytes | None]] = []
        for k, v in headers:
            if k in RETRY_HEADERS:
                found[k] = (v or b"").decode("utf-8", "replace")
            else:
                kept.append((k, v))
        self.headers = kept
        self.idem_key: str | None = found.get(H_KEY) or None
        self.attempts = _int(found.get(H_ATTEMPTS), 0)
        self.failures = _int(found.get(H_FAILURES), 0)
        self.due_ms = _int(found.get(H_DUE), 0)
        partition, offset = _int(found.get(H_PARTITION), -1), _int(found.get(H_OFFSET), -1)
        topic = found.get(H_TOPIC, source_topic)
        # A record some other writer put in the retry topic has no provenance: it is delivered
        # with its own coordinates, under its source topic.
        self.origin = Origin(topic, partition, offset) if partition >= 0 and offset >= 0 else None


def _provenance(p: Pending) -> list[tuple[str, bytes]]:
    """The record's own headers, then where it was first consumed, its attempts so far and how
    many of them failed."""
    topic, partition, offset = p.coordinates()
    return [
        *((k, v or b"") for k, v in p.headers),
        (H_TOPIC, topic.encode()),
        (H_PARTITION, str(partition).encode()),
        (H_OFFSET, str(offset).encode()),
        (H_ATTEMPTS, str(p.attempt).encode()),
        (H_FAILURES, str(p.failures).encode()),
    ]


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


class Reroute:
    def __init__(self, core: Core) -> None:
        self.core = core
        d = core.settings.delivery
        self.tiers = list(d.retry_tiers_seconds)
        self.retry_template = d.retry_topic
        #: retry topic -> the topic it retries
        self.retry_sources = {
            retry_topic(d.retry_topic, t, i): t
            for t in core.settings.kafka.topics
            for i in range(len(self.tiers))
        }

    # ---------------------------------------------------------------------------------------------
    # retry topics

    def tier_for(self, p: Pending, delay_s: float) -> int | None:
        """The retry tier a Nack delay goes to, or None to keep the record in memory: no tiers,
        a delay below the first, or an ordered topic (moving a record to a retry topic would let
        later records of its key pass it)."""
        if (
            not self.tiers
            or delay_s < self.tiers[0]
            or self.core.ordering_of(p.topic) is not Ordering.UNORDERED
        ):
            return None
        return bisect.bisect_right(self.tiers, delay_s) - 1

    def to_retry(self, records: list[tuple[Pending, int, float]]) -> None:
        """Move records to their retry tier (record, tier, delay); each settles once written."""
        for p, _, _ in records:
            p.state = State.REROUTING
        self.core.spawn(self._to_retry(records))

    async def _to_retry(self, records: list[tuple[Pending, int, float]]) -> None:
        core = self.core
        for p, tier, delay_s in records:
            due_ms = int(time.time() * 1000 + delay_s * 1000)
            headers = [
                *_provenance(p),
                (H_DUE, str(due_ms).encode()),
                (H_KEY, (p.idem_key or "").encode()),
                (H_TIER, str(tier).encode()),
            ]
            target = retry_topic(self.retry_template, p.topic, tier)
            delay = 0.2
            while p.state is State.REROUTING:
                try:
                    # Hold the key until the due time: a sidecar that reads the source record
                    # again (its offset was not committed yet) sees BUSY until then.
                    park_ms = max(1, due_ms - int(time.time() * 1000))
                    claim = (await core.store.claim([p.store_key], core.owner, park_ms, ClaimMode.RENEW))[0]
                    if claim.status is not ClaimStatus.NEW:
                        # Acked elsewhere meanwhile (DONE), or our lease ran out and another
                        # sidecar delivers the key now (BUSY): it is that sidecar's to finish.
                        core.settle(p)
                        break
                    await core.producer.produce(target, p.value, p.key, headers)
                    core.metrics.retried.labels(str(tier)).inc()
                    core.settle(p)
                except Exception as exc:  # noqa: BLE001 - never lose the record: retry
                    if core.stopping:
                        return
                    if not isinstance(exc, StoreUnavailable):
                        log.warning(
                            "moving %s[%d]@%d to %s failed, retrying: %s",
                            *p.tp,
                            p.offset,
                            target,
                            exc,
                            extra=p.log_fields(),
                        )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10)

    # ---------------------------------------------------------------------------------------------
    # dead letters

    def dead_letter(self, records: list[Pending]) -> None:
        for p in records:
            p.state = State.REROUTING
            p.reject = True  # queue mode: REJECT once the copy is written (Core.settle)
        self.core.spawn(self._dead_letter(records))

    async def _dead_letter(self, records: list[Pending]) -> None:
        """Write records to the DLQ; settle each once Kafka acknowledged it. Retries until done."""
        core = self.core
        template = core.settings.delivery.dead_letter_topic
        for p in records:
            topic = p.topic
            headers = [
                *_provenance(p),
                (H_REASON, p.reason.encode()[:1000]),
                (H_REASON_CODE, p.reason_code.encode()),
            ]
            delay = 0.2
            while p.state is State.REROUTING:
                try:
                    await core.producer.produce(template.replace("{topic}", topic), p.value, p.key, headers)
                    if p.store_key:
                        await core.store.complete([p.store_key], core.owner, core.retention_ms)
                    core.metrics.dead_lettered.labels(topic, p.reason_code or "nack").inc()
                    core.settle(p)
                except Exception as exc:  # noqa: BLE001 - never lose the record: retry
                    if core.stopping:
                        return
                    log.warning(
                        "dead-lettering %s[%d]@%d failed, retrying: %s",
                        *p.tp,
                        p.offset,
                        exc,
                        extra=p.log_fields(),
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10)
