"""The composition root: builds every part from Settings, starts them, and stops them in order.

Shutdown order (first signal): health NOT_SERVING; stop fetching and sending; answer acks until
the app has answered what it holds, or ``server.shutdown_grace_seconds``; final commit; leave the
group; flush the producer; stop the server. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from typing import Any

from grpc_health.v1 import health

from sidecar._proto import dedup_pb2 as pb
from sidecar.api import listeners
from sidecar.api.admin import AdminServicer
from sidecar.api.security import Certificates, Guard
from sidecar.api.server import build_health_server, build_server
from sidecar.api.servicer import DedupServicer
from sidecar.config import Settings, is_loopback_listen, is_unix_listen, split_listen, unix_socket_path
from sidecar.engine.engine import Engine
from sidecar.errors import ConfigError
from sidecar.kafka import connect
from sidecar.kafka import consumer as kconsumer
from sidecar.kafka import producer as kproducer
from sidecar.kafka import share_consumer as kshare
from sidecar.kafka.topics import TopicCatalog
from sidecar.observability import logs, tracing
from sidecar.observability.metrics import EngineCollector, Metrics
from sidecar.observability.outage import Outage
from sidecar.process import build
from sidecar.process.kafka_checks import ensure_retry_topics, prepare_share_group, watch_group
from sidecar.process.readiness import Readiness
from sidecar.process.stores import open_store
from sidecar.process.workers import WorkerAddresses
from sidecar.publish.publisher import Publisher
from sidecar.store.base import DedupStore
from sidecar.store.timed import TimedStore

log = logging.getLogger(__name__)


#: librdkafka properties that have a setting of their own.
_OWN_SETTINGS = {"group.protocol": "kafka.group_protocol", "session.timeout.ms": "kafka.session_timeout_ms"}


def _kafka_config(
    settings: Settings, extra: dict[str, Any], owned: frozenset[str], kind: str
) -> dict[str, Any]:
    for prop, setting in _OWN_SETTINGS.items():
        if prop in extra:
            raise ConfigError(f"kafka.{kind} sets {prop}: set {setting} instead")
    clash = owned & set(extra)
    if clash:
        raise ConfigError(
            f"kafka.{kind} sets {sorted(clash)}, which the sidecar owns to keep its guarantees; remove them"
        )
    return {**connect.client_config(settings.kafka), **extra}


def _warn_exposure(s: Settings, certs: Certificates | None) -> None:
    """Warn about remote listeners that start but leak: a token in clear text, or TLS that lets
    any client in (the settings validator refuses the worst case, neither TLS nor a token)."""
    srv = s.server
    if is_loopback_listen(srv.listen) or srv.allow_insecure_remote:
        return
    if certs is None:
        log.warning(
            "server.listen=%s is reachable from other hosts without TLS: bearer tokens cross the network "
            "in clear text; set server.tls_cert_file and server.tls_key_file",
            srv.listen,
        )
    elif not srv.asks_for_credentials:
        log.warning(
            "server.listen=%s is reachable from other hosts over TLS, but asks callers for no token and no "
            "client certificate: anyone who can connect may consume and publish; set server.auth_token or "
            "server.tls_client_ca_file",
            srv.listen,
        )


class Sidecar:
    """One sidecar process. ``await start()``, then ``await stop()``; or ``await run()``."""

    def __init__(self, settings: Settings, worker: tuple[int, list[WorkerAddresses]] | None = None) -> None:
        self.settings = settings
        #: (this worker's index, every worker's addresses) under a server.workers supervisor.
        self.worker = worker
        self.metrics = Metrics()
        self.owner = settings.owner_id or f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"
        logs.set_owner(self.owner)
        self.port = 0
        self.metrics_port = 0
        self.store: DedupStore | None = None
        self.engine: Engine | None = None
        self._consumer: kconsumer.ConsumerLoop | kshare.ShareConsumerLoop | None = None
        self._share_limits = (0, 0)  # queue mode: the group's record lock (ms), delivery count limit
        self._producer: kproducer.AsyncProducer | None = None
        self._fast_producer: kproducer.AsyncProducer | None = None
        self._server: Any = None
        self._metrics_server: Any = None
        self._health_server: Any = None
        self.guard: Guard
        self.health_port = 0
        self._reload: asyncio.Task[None] | None = None
        self._health = health.aio.HealthServicer()
        self._watch: asyncio.Task[None] | None = None
        self.readiness: Readiness | None = None
        self._lag: dict[tuple[str, int], int] = {}  # from librdkafka statistics
        self.topics: TopicCatalog
        self._stopped = asyncio.Event()
        # What the log says while Kafka or the store fails: changes of state, not each failure.
        self.kafka_outage = Outage("Kafka", self.metrics.dependency_failures)
        self.store_outage = Outage("store", self.metrics.dependency_failures)

    async def start(self) -> None:
        s = self.settings
        tracing.setup(s.tracing.exporter, s.tracing.otlp_endpoint, s.tracing.sample_ratio)
        loop = asyncio.get_running_loop()
        consumer_conf = _kafka_config(s, s.kafka.consumer, kconsumer.OWNED_PROPERTIES, "consumer")
        consumer_conf["group.id"] = s.kafka.group_id
        if s.kafka.group_protocol == "consumer":
            consumer_conf["group.protocol"] = "consumer"  # the session timeout is the broker's
        else:
            consumer_conf["session.timeout.ms"] = s.kafka.session_timeout_ms
        if s.kafka.statistics_interval_ms:
            consumer_conf.setdefault("statistics.interval.ms", s.kafka.statistics_interval_ms)
            consumer_conf["stats_cb"] = self._on_statistics
        producer_conf = _kafka_config(s, s.kafka.producer, kproducer.OWNED_PROPERTIES, "producer")
        # Credentials and certificates first: a bad file stops the start before anything connects.
        self.guard = Guard(s.server)
        certs = Certificates(s.server) if s.server.tls_cert_file is not None else None
        _warn_exposure(s, certs)
        if connect.secured(producer_conf):
            await asyncio.to_thread(connect.check_credentials, connect.security_only(producer_conf))
        self.store = TimedStore(await open_store(s), self.metrics.store_seconds, self.store_outage)
        self._producer = kproducer.AsyncProducer(
            producer_conf, loop, s.publish.timeout_seconds, self.kafka_outage
        )
        self.engine = Engine(s, self.store, self._producer, self.metrics, self.owner)
        self.metrics.registry.register(EngineCollector(self.engine, lambda: self._lag))
        self.topics = TopicCatalog(self._producer.topics)
        self.readiness = readiness = Readiness(
            s,
            self._health,
            self.store,
            self.topics,
            self.engine.missing_topics,
            self.kafka_outage,
            self.store_outage,
        )
        if s.kafka.topics:
            kafka_answered = await readiness.check_topics()
            if self.engine.retry_topics:
                await ensure_retry_topics(s, consumer_conf, self.engine.reroute.retry_sources)
            if s.kafka.group_type == "share":
                self._consumer = await self._share_consumer(consumer_conf, loop)
            else:
                self._consumer = kconsumer.ConsumerLoop(
                    consumer_conf,
                    [*s.kafka.topics, *self.engine.retry_topics],
                    self.engine,
                    loop,
                    s.kafka.fetch_batch,
                    max(5_000, 10 * s.kafka.fetch_batch),
                    handover_interval=s.kafka.handover_interval_ms / 1000,
                    outage=self.kafka_outage,
                )
        else:
            log.info("no kafka.topics: publish-only, no consumer and no group")
            kafka_answered = await readiness.kafka_answers()
        if float(producer_conf.get("linger.ms", kproducer.DEFAULT_LINGER_MS)) > 0:
            # For a publish that is alone: the same settings without linger (see Publisher).
            fast_conf = {**producer_conf, "linger.ms": 0}
            self._fast_producer = kproducer.AsyncProducer(
                fast_conf, loop, s.publish.timeout_seconds, self.kafka_outage
            )
        publisher = Publisher(
            s.publish,
            s.delivery.idempotency_header,
            self.store,
            self._producer,
            self.metrics,
            s.store.retention_seconds * 1000,
            self.owner,
            self.topics if s.publish.check_topics else None,
            fast=self._fast_producer,
        )
        servicer = DedupServicer(self.engine, publisher, s.publish.max_batch_entries, s.kafka.topics)
        admin = AdminServicer(self, self.engine, self.store, s.kafka.group_id, self._store_name)
        self._server = build_server(servicer, self._health, self.guard, s.publish.max_message_bytes, admin)
        srv = s.server
        self.port = listeners.bind(self._server, srv.listen, "server.listen", certs, srv.socket_mode)
        if srv.health_listen:
            self._health_server = build_health_server(self._health)
            self.health_port = listeners.bind(self._health_server, srv.health_listen, "server.health_listen")
        if s.server.metrics_listen:
            self._metrics_server, self.metrics_port = listeners.metrics(s.server, self.metrics.registry)
        servicer.workers = self._workers_answer()
        await self._server.start()
        if self._health_server is not None:
            await self._health_server.start()
        self._reload = asyncio.create_task(self._reload_files(certs))
        self.engine.start(self._consumer, *self._share_limits)
        if self._consumer is not None:
            self._consumer.start()
            group = self._consumer if isinstance(self._consumer, kconsumer.ConsumerLoop) else None
            if group is not None and not self.store.shared and self.worker is None:
                topics = [*s.kafka.topics, *self.engine.retry_topics]
                self._watch = asyncio.create_task(
                    watch_group(
                        s.kafka.group_id,
                        group,
                        self.store,
                        self.topics,
                        topics,
                        self.metrics.local_store_shared_group,
                    )
                )
        # Ready only once the store and a broker have answered: a sidecar started with neither
        # reachable must not take traffic in the meantime.
        await readiness.start(kafka_answered)
        where = srv.listen if not self.port else f"{srv.listen.rpartition(':')[0]}:{self.port}"
        log.info(
            "sidecar %s%s serving on %s%s (store=%s, group=%s, topics=%s; %s)",
            self.owner,
            f" (worker {self.worker[0]} of {len(self.worker[1])})" if self.worker else "",
            where,
            " with TLS" if certs is not None else "",
            self.store.name,
            s.kafka.group_id if s.kafka.topics else "none",
            ",".join(s.kafka.topics) or "none: publish-only",
            build.describe(),
        )

    async def _share_consumer(
        self, consumer_conf: dict[str, Any], loop: asyncio.AbstractEventLoop
    ) -> kshare.ShareConsumerLoop:
        """Queue mode: the share group's settings applied and checked, and its consumer."""
        s = self.settings
        assert self.engine is not None
        assert self.store is not None
        limits = await prepare_share_group(s, consumer_conf)
        self._share_limits = (limits.lock_ms, limits.delivery_count_limit)
        if not self.store.shared:
            log.warning(
                "store.backend = %r keeps what was processed in this process: other members of share "
                "group %s do not see it, so a record one of them gets again is applied again. Use "
                "store.backend = 'redis' for more than one member",
                s.store.backend,
                s.kafka.group_id,
            )
        conf = _kafka_config(s, s.kafka.consumer, kshare.OWNED_PROPERTIES, "consumer")
        conf["group.id"] = s.kafka.group_id
        return kshare.ShareConsumerLoop(
            conf,
            s.kafka.topics,
            self.engine,
            loop,
            s.kafka.share_max_poll_records,
            outage=self.kafka_outage,
            on_refused=self.metrics.share_refused.inc,
        )

    def _workers_answer(self) -> pb.ListWorkersResponse:
        """ListWorkers: every worker's port or socket (just this process without workers)."""
        if self.worker is None:
            index, listens = 0, [self.settings.server.listen]
        else:
            index, listens = self.worker[0], [a.listen for a in self.worker[1]]
        out = pb.ListWorkersResponse(this_worker=index)
        for i, listen in enumerate(listens):
            if is_unix_listen(listen):
                out.workers.add(index=i, unix_socket=unix_socket_path(listen))
            else:
                port = self.port if i == index else split_listen(listen, "server.listen")[1]
                out.workers.add(index=i, port=port)
        return out

    @property
    def ready(self) -> bool:
        """What the DedupService health entry says."""
        return self.readiness is not None and self.readiness.ready

    def lag(self) -> dict[tuple[str, int], int]:
        return self._lag

    def _store_name(self) -> str:
        inner = getattr(self.store, "inner", self.store)
        name = str(getattr(inner, "name", "?"))
        shape = getattr(inner, "shape", None)
        return f"{name} ({shape})" if shape else name

    def _on_statistics(self, raw: str) -> None:
        """librdkafka statistics (on the consumer's thread, every kafka.statistics_interval_ms):
        keep each partition's consumer lag, the log end offset minus the committed offset."""
        try:
            stats = json.loads(raw)
            lag: dict[tuple[str, int], int] = {}
            for topic, t in stats.get("topics", {}).items():
                for p, part in t.get("partitions", {}).items():
                    n = part.get("consumer_lag", -1)
                    if int(p) >= 0 and n >= 0:
                        lag[(topic, int(p))] = n
            self._lag = lag
        except (ValueError, AttributeError, TypeError) as exc:
            log.debug("unreadable librdkafka statistics: %s", exc)

    async def stop(self) -> None:
        s = self.settings
        await self._health.enter_graceful_shutdown()
        for task in (self._watch, self._reload):
            if task is not None:
                task.cancel()
        if self.readiness is not None:
            self.readiness.cancel()
        if self._consumer is not None:
            self._consumer.halted = True
        if self.engine is not None:
            await self.engine.stop(s.server.shutdown_grace_seconds)
        if self._consumer is not None:
            await self._consumer.stop()
        for producer in (self._producer, self._fast_producer):
            if producer is not None:
                await producer.close()
        if self._server is not None:
            await self._server.stop(1.0)
            listeners.remove_socket(s.server.listen)
        if self._health_server is not None:
            await self._health_server.stop(0)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        if self.store is not None:
            await self.store.close()
        self._stopped.set()
        log.info("sidecar stopped")

    async def _reload_files(self, certs: Certificates | None) -> None:
        """Re-read token and certificate files that changed, so secrets rotate without a restart."""
        while True:
            await asyncio.sleep(self.settings.server.reload_interval_seconds)
            try:
                await asyncio.to_thread(self.guard.reload)
                if certs is not None:
                    await asyncio.to_thread(certs.reload)
            except Exception:
                log.exception("re-reading token or certificate files failed; the ones read before stay")

    def _dump_state(self) -> None:
        if self.engine is not None:
            log.warning("state: %s", json.dumps(self.engine.describe(), sort_keys=True))

    async def run(self) -> None:
        """Start, serve until SIGINT/SIGTERM, then stop in order. A second signal exits at once."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        signals = 0

        def on_signal(signum: int) -> None:
            nonlocal signals
            signals += 1
            if signals > 1:
                log.error("second signal: exiting now")
                os._exit(130)
            log.info("signal %d: shutting down (send again to force)", signum)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        loop.add_signal_handler(signal.SIGUSR1, self._dump_state)
        await self.start()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            if self._consumer is not None and self._consumer.fatal is not None:
                log.error("consumer failed: %s; shutting down", self._consumer.fatal)
                break
        t0 = time.monotonic()
        await self.stop()
        log.info("shutdown took %.1fs", time.monotonic() - t0)
