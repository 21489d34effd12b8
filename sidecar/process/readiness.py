"""Readiness: the ``dedup.v1.DedupService`` health entry, true to what the sidecar can do.

It is NOT_SERVING from the start until the store and a broker have answered, while the store or
every broker is unreachable, and while a topic of kafka.topics does not exist; SERVING again by
itself once they are back. The overall entry ("", liveness) stays SERVING: restarting the
sidecar would not bring a broker back.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from grpc_health.v1 import health, health_pb2

from sidecar.api.server import SERVICE_NAME
from sidecar.config import Settings
from sidecar.errors import KafkaUnavailable, StoreUnavailable
from sidecar.kafka.topics import TopicCatalog
from sidecar.observability.outage import Outage
from sidecar.store.base import DedupStore

log = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
READINESS_INTERVAL_S = 3.0  # how often readiness checks the store, the brokers and the topics
NOT_READY_INTERVAL_S = 1.0  # how often while not ready


@dataclass
class Readiness:
    """Sets the health entries and keeps the DedupService one current.

    ``missing_topics`` is the engine's own set (Subscribe answers NOT_FOUND for its topics):
    readiness adds what start-up finds missing and removes a topic once it exists.
    """

    settings: Settings
    health_servicer: health.aio.HealthServicer
    store: DedupStore
    topics: TopicCatalog
    missing_topics: set[str]
    kafka_outage: Outage
    store_outage: Outage
    ready: bool = field(default=False, init=False)  # what the DedupService health entry says
    _task: asyncio.Task[None] | None = field(default=None, init=False)

    async def check_topics(self) -> bool:
        """Say at start-up which of kafka.topics the cluster does not have: Subscribe answers
        NOT_FOUND for them and the DedupService health entry is NOT_SERVING until they exist.
        Returns whether a broker answered."""
        try:
            counts = await self.topics.partitions(self.settings.kafka.topics)
        except KafkaUnavailable as exc:
            log.warning("cannot check that kafka.topics exist: %s", exc)
            return False
        missing = {t for t, n in counts.items() if n is None}
        self.missing_topics.update(missing)
        if missing:
            log.error(
                "topics %s in kafka.topics do not exist on the cluster: create them (Subscribe answers "
                "NOT_FOUND and the %s health entry is NOT_SERVING until they exist)",
                sorted(missing),
                SERVICE_NAME,
            )
        return True

    async def kafka_answers(self) -> bool:
        """Whether a broker answers a metadata request now (a publish-only sidecar's start-up)."""
        try:
            await self.topics.refresh()
        except KafkaUnavailable as exc:
            log.warning("no broker answers: %s", exc)
            return False
        return True

    async def start(self, kafka_answered: bool) -> None:
        """Set both entries, and watch from now on. ``kafka_answered``: whether a broker answered
        a moment ago, so its metadata need not be read again."""
        problems = await self.problems(kafka_answered)
        ready = self.ready = not problems
        await self.health_servicer.set(SERVICE_NAME, _SERVING if ready else _NOT_SERVING)
        await self.health_servicer.set("", _SERVING)
        if not ready:
            log.error("not ready (%s health entry NOT_SERVING): %s", SERVICE_NAME, "; ".join(problems))
        self._task = asyncio.create_task(self._watch(ready))

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _watch(self, ready: bool) -> None:
        ever_ready = ready
        while True:
            # Not ready yet: look again sooner, so a sidecar that starts before its broker or
            # store takes traffic soon after they answer.
            await asyncio.sleep(READINESS_INTERVAL_S if ready else NOT_READY_INTERVAL_S)
            problems = await self.problems()
            if (not problems) != ready:
                ready = self.ready = not problems
                await self.health_servicer.set(SERVICE_NAME, _SERVING if ready else _NOT_SERVING)
                if ready:
                    log.info("ready%s: %s health entry SERVING", " again" if ever_ready else "", SERVICE_NAME)
                    ever_ready = True
                else:
                    log.error(
                        "not ready (%s health entry NOT_SERVING): %s", SERVICE_NAME, "; ".join(problems)
                    )

    async def problems(self, kafka_answered: bool | None = None) -> list[str]:
        """What keeps the sidecar from being ready: an unreachable store, no broker answering,
        or topics of kafka.topics the cluster does not have. ``kafka_answered``: whether a
        broker answered a moment ago (at start-up); None to read its metadata now."""
        problems: list[str] = []
        try:
            async with asyncio.timeout(READINESS_INTERVAL_S):
                await self.store.ping()
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
            reason = str(exc) or f"no answer in {READINESS_INTERVAL_S:.0f}s"
            if not isinstance(exc, StoreUnavailable):  # TimedStore told the outage of those
                self.store_outage.failed(reason)
            problems.append(f"store unreachable ({reason})")
        if kafka_answered is False:
            problems.append(
                f"Kafka unreachable (no broker of {self.settings.kafka.bootstrap_servers} answered)"
            )
        elif kafka_answered is None:
            try:
                await self.topics.refresh()
                self.kafka_outage.answered()
                for t in [t for t in self.missing_topics if self.topics.known(t) is not None]:
                    log.info("topic %s exists now", t)
                    self.missing_topics.discard(t)
            except KafkaUnavailable as exc:
                problems.append(f"Kafka unreachable ({exc})")
        if self.missing_topics:
            problems.append(f"topics {sorted(self.missing_topics)} in kafka.topics do not exist")
        return problems
