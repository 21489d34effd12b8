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

from grpc_health.v1 import health, health_pb2

from sidecar import build, logs, tracing
from sidecar._proto import dedup_pb2 as pb
from sidecar.api import listeners
from sidecar.api.admin import AdminServicer
from sidecar.api.security import Certificates, Guard
from sidecar.api.server import SERVICE_NAME, build_health_server, build_server
from sidecar.api.servicer import DedupServicer
from sidecar.config import Settings, is_loopback_listen, is_unix_listen, split_listen, unix_socket_path
from sidecar.engine.engine import Engine
from sidecar.errors import ConfigError, KafkaUnavailable, StoreUnavailable
from sidecar.kafka import connect
from sidecar.kafka import consumer as kconsumer
from sidecar.kafka import producer as kproducer
from sidecar.kafka.topics import TopicCatalog
from sidecar.metrics import EngineCollector, Metrics
from sidecar.outage import Outage
from sidecar.publish.publisher import Publisher
from sidecar.store.base import DedupStore
from sidecar.store.timed import TimedStore
from sidecar.stores import open_store
from sidecar.workers import WorkerAddresses

log = logging.getLogger(__name__)
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
READINESS_INTERVAL_S = 3.0  # how often readiness checks the store, the brokers and the topics
NOT_READY_INTERVAL_S = 1.0  # how often while not ready


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
        self._consumer: kconsumer.ConsumerLoop | None = None
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
        self._readiness: asyncio.Task[None] | None = None
        self._lag: dict[tuple[str, int], int] = {}  # from librdkafka statistics
        self.ready = False  # what the DedupService health entry says
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
        if s.kafka.topics:
            kafka_answered = await self._check_topics()
            if self.engine.retry_topics:
                await self._ensure_retry_topics(consumer_conf)
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
            kafka_answered = await self._kafka_answers()
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
        self.engine.start(self._consumer)
        if self._consumer is not None:
            self._consumer.start()
            if not self.store.shared and self.worker is None:
                self._watch = asyncio.create_task(self._watch_group())
        # Ready only once the store and a broker have answered: a sidecar started with neither
        # reachable must not take traffic in the meantime.
        problems = await self._readiness_problems(kafka_answered)
        ready = self.ready = not problems
        await self._health.set(SERVICE_NAME, _SERVING if ready else _NOT_SERVING)
        await self._health.set("", _SERVING)
        if not ready:
            log.error("not ready (%s health entry NOT_SERVING): %s", SERVICE_NAME, "; ".join(problems))
        self._readiness = asyncio.create_task(self._watch_readiness(ready))
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

    async def _check_topics(self) -> bool:
        """Say at start-up which of kafka.topics the cluster does not have: Subscribe answers
        NOT_FOUND for them and the DedupService health entry is NOT_SERVING until they exist.
        Returns whether a broker answered."""
        assert self.engine is not None
        try:
            counts = await self.topics.partitions(self.settings.kafka.topics)
        except KafkaUnavailable as exc:
            log.warning("cannot check that kafka.topics exist: %s", exc)
            return False
        missing = {t for t, n in counts.items() if n is None}
        self.engine.missing_topics.update(missing)
        if missing:
            log.error(
                "topics %s in kafka.topics do not exist on the cluster: create them (Subscribe answers "
                "NOT_FOUND and the %s health entry is NOT_SERVING until they exist)",
                sorted(missing),
                SERVICE_NAME,
            )
        return True

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

    async def _watch_readiness(self, ready: bool) -> None:
        """Keep the DedupService health entry (readiness) true to what the sidecar can do: it is
        NOT_SERVING while the store or every broker is unreachable, or a topic of kafka.topics does
        not exist, and SERVING again by itself once they are back. The overall entry (liveness)
        stays SERVING: restarting the sidecar would not bring a broker back."""
        ever_ready = ready
        while True:
            # Not ready yet: look again sooner, so a sidecar that starts before its broker or
            # store takes traffic soon after they answer.
            await asyncio.sleep(READINESS_INTERVAL_S if ready else NOT_READY_INTERVAL_S)
            problems = await self._readiness_problems()
            if (not problems) != ready:
                ready = self.ready = not problems
                await self._health.set(SERVICE_NAME, _SERVING if ready else _NOT_SERVING)
                if ready:
                    log.info("ready%s: %s health entry SERVING", " again" if ever_ready else "", SERVICE_NAME)
                    ever_ready = True
                else:
                    log.error(
                        "not ready (%s health entry NOT_SERVING): %s", SERVICE_NAME, "; ".join(problems)
                    )

    async def _kafka_answers(self) -> bool:
        try:
            await self.topics.refresh()
        except KafkaUnavailable as exc:
            log.warning("no broker answers: %s", exc)
            return False
        return True

    async def _readiness_problems(self, kafka_answered: bool | None = None) -> list[str]:
        """What keeps the sidecar from being ready: an unreachable store, no broker answering,
        or topics of kafka.topics the cluster does not have. ``kafka_answered``: whether a
        broker answered a moment ago (at start-up), so its metadata need not be read again;
        None to read it."""
        assert self.store is not None
        assert self.engine is not None
        missing = self.engine.missing_topics
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
                for t in [t for t in missing if self.topics.known(t) is not None]:
                    log.info("topic %s exists now", t)
                    missing.discard(t)
            except KafkaUnavailable as exc:
                problems.append(f"Kafka unreachable ({exc})")
        if missing:
            problems.append(f"topics {sorted(missing)} in kafka.topics do not exist")
        return problems

    async def _ensure_retry_topics(self, consumer_conf: dict[str, Any]) -> None:
        """Create the retry topics that are missing (``delivery.retry_create_topics``), each like
        its source topic: the same partition count and replication factor."""
        from confluent_kafka.admin import AdminClient
        from confluent_kafka.cimpl import NewTopic

        s = self.settings
        assert self.engine is not None
        skip = ("group.id", "session.timeout.ms", "stats_cb", "statistics.interval.ms")
        conf = {k: v for k, v in consumer_conf.items() if k not in skip}
        admin = AdminClient(conf)
        meta = await asyncio.to_thread(admin.list_topics, timeout=15)
        sources = self.engine.reroute.retry_sources
        missing = [t for t in sources if t not in meta.topics]
        if not missing:
            return
        if not s.delivery.retry_create_topics:
            raise ConfigError(
                f"retry topics {missing} do not exist: create them, or set "
                "delivery.retry_create_topics = true so the sidecar does"
            )
        new = []
        for name in missing:
            src = meta.topics.get(sources[name])
            if src is None or not src.partitions:
                raise ConfigError(
                    f"cannot create retry topic {name!r}: its source topic {sources[name]!r} "
                    "(kafka.topics) does not exist"
                )
            rf = len(next(iter(src.partitions.values())).replicas)
            new.append(NewTopic(name, len(src.partitions), rf))
        for name, fut in admin.create_topics(new, request_timeout=15).items():
            try:
                await asyncio.to_thread(fut.result, 20)
                log.info("created retry topic %s", name)
            except Exception as exc:
                if "TOPIC_ALREADY_EXISTS" in str(exc):
                    continue
                raise ConfigError(
                    f"cannot create retry topic {name!r} ({exc}); create it, or give the sidecar's "
                    "principal CREATE on it (delivery.retry_create_topics)"
                ) from exc
        # Metadata spreads to the brokers asynchronously: subscribe once every partition has a leader.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            meta = await asyncio.to_thread(admin.list_topics, timeout=5)
            if all(meta.topics.get(t) is not None and not meta.topics[t].error for t in missing):
                break
            await asyncio.sleep(0.1)

    async def _watch_group(self) -> None:
        """A local store cannot fence other members: detect a shared group and say so loudly.

        The sign is this member's assignment: while it holds fewer partitions of its topics than
        they have, another member holds the rest. Three looks in a row, 3 s apart, so a
        rebalance in progress is not taken for one. (This asked DescribeGroups before; librdkafka
        aborts the whole process when such a request to a dead coordinator times out, its issue
        4605, and a check that only advises must not be able to do that.)"""
        assert self.engine is not None
        assert self._consumer is not None
        assert self.store is not None
        consumer, store = self._consumer, self.store
        topics = [*self.settings.kafka.topics, *self.engine.retry_topics]
        group = self.settings.kafka.group_id
        warned = False
        looks = 0
        while True:
            await asyncio.sleep(3.0)
            try:
                counts = await self.topics.partitions(topics)
            except KafkaUnavailable:
                continue
            total = sum(n or 0 for n in counts.values())
            held = consumer.assigned_count
            looks = looks + 1 if consumer.subscribed and held < total else 0
            shared = looks >= 3
            self.metrics.local_store_shared_group.set(1 if shared else 0)
            if shared and not warned:
                log.error(
                    "CORRECTNESS HOLE: another member of group %r holds %d of the %d partitions of %s, but "
                    "store.backend=%s is local to this process; after a rebalance another member cannot "
                    "see which keys were processed here. Use store.backend=redis for more than one replica",
                    group,
                    total - held,
                    total,
                    ", ".join(topics),
                    store.name,
                )
                warned = True
            elif not shared and looks == 0:
                warned = False

    async def stop(self) -> None:
        s = self.settings
        await self._health.enter_graceful_shutdown()
        for task in (self._watch, self._readiness, self._reload):
            if task is not None:
                task.cancel()
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
