"""A Jepsen-style fault harness: real Kafka, real Redis, sidecar and app processes, injected faults.

A scenario publishes N uniquely keyed messages (some re-published through ``Publish``, some
duplicated by a plain producer), runs two consumer groups side by side — one with the naive app,
one with the inbox app (tests/chaos/ledger_app.py) — injects a fault, heals, drains, and then
checks the effect ledgers:

* lost: published (acknowledged by Publish) but no effect;
* duplicated: more than one effect for a key;
* unexpected: an effect for a key no Publish was ever tried for (a key whose Publish failed or
  timed out may or may not take effect: indeterminate, as in Jepsen);
* redelivered: how many keys reached the app more than once, and the highest attempt;
* recovery: seconds from heal until every key had its effect.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import services
from confluent_kafka import Producer
from dedup_client import DedupClient, PublishError, PublishResult
from dedup_client.results import publish_request
from faultproxy import FaultProxy

from tests.integration.helpers import ROOT, SidecarProcess, process_env, records_per_key, set_group_config

VARIANTS = ("naive", "inbox")
#: The drain after a fault gives up after this long with no new effect, or this long in all.
DRAIN_STALL_S = 90
#: Queue-mode scenarios: the share groups' record lock.
SHARE_LOCK_MS = 8000
DRAIN_CAP_S = 600
#: Marks the copies a plain producer writes on purpose (a retry's duplicate), so reading the topic
#: back can tell them from a record Publish wrote twice.
COPY_HEADER = "chaos-copy"


@dataclass
class Figures:
    fault: str
    variant: str
    sent: int
    lost: int
    duplicated: int
    unexpected: int
    redelivered: int
    max_attempt: int
    recovery_s: float
    delivered_after_ack: int = 0
    #: With Kafka keys (``entities``): effects applied before an effect of a lower offset with the
    #: same Kafka key (first effect per idempotency key); None when the scenario has no keys.
    order_violations: int | None = None
    notes: str = ""
    attempts: str = ""  # distribution: "attempt:keys" for each highest attempt seen
    #: Read back from the topic (scenarios with ``readback``): keys that Publish/PublishBatch
    #: wrote more than once, and acknowledged keys with no record at all.
    topic_duplicates: int | None = None
    topic_missing: int | None = None

    def row(self) -> list[str]:
        return [
            self.fault,
            self.variant,
            str(self.sent),
            str(self.lost),
            str(self.duplicated),
            str(self.unexpected),
            str(self.delivered_after_ack),
            str(self.redelivered),
            str(self.max_attempt),
            f"{self.recovery_s:.1f}",
        ]


@dataclass
class Member:
    """One sidecar process and the app process next to it."""

    sidecar: SidecarProcess
    ledger: Path
    variant: str
    app_args: list[str] = field(default_factory=list)
    app: subprocess.Popen[bytes] | None = None

    def start_app(self) -> None:
        with open(self.sidecar.log_path.with_suffix(".app.log"), "ab") as log:
            self.app = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.chaos.ledger_app",
                    self.sidecar.target,
                    str(self.ledger),
                    self.variant,
                    *self.app_args,
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill_app(self) -> None:
        if self.app is not None and self.app.poll() is None:
            self.app.kill()
            self.app.wait(10)

    def stop(self) -> None:
        if self.app is not None and self.app.poll() is None:
            self.app.terminate()
            try:
                self.app.wait(10)
            except subprocess.TimeoutExpired:
                self.app.kill()
        self.sidecar.terminate()


class Scenario:
    """Parameters:
    kafka, redis: the real services (the scenario may kill, pause and restart them).
    workdir: where ledgers and logs go.
    messages: how many unique keys to publish.
    members: sidecar+app pairs per variant.
    env: extra DEDUP_* settings for every sidecar.
    entities: when set, every record gets one of this many Kafka keys (for the ordering check).
    publish_path: how the scenario publishes: ``batched`` (PublishBatch calls), ``unary`` (one
        Publish call per record, 64 at once: the sidecar groups them) or ``stream`` (one record
        per message on the client's StreamingPublish call, 64 at once).
    """

    def __init__(
        self,
        name: str,
        kafka: services.KafkaShape,
        redis: services.RedisShape,
        workdir: Path,
        messages: int,
        members: int = 2,
        env: dict[str, str] | None = None,
        app_args: list[str] | None = None,
        seed: int = 1,
        publisher_env: dict[str, str] | None = None,
        entities: int = 0,
        readback: bool = False,
        publish_path: str = "batched",
        partitions: int = 6,
    ) -> None:
        self.name = name
        self.partitions = partitions
        self.publish_path = publish_path
        self.readback = readback
        self.entities = entities
        self.kafka = kafka
        self.redis = redis
        self.workdir = workdir
        self.messages = messages
        self.rng = random.Random(seed)
        self.topic = f"chaos-{name.lower()}-{uuid.uuid4().hex[:6]}"
        self.prefix = uuid.uuid4().hex[:6]
        self.attempted: set[str] = set()  # every key a Publish was tried for
        self.sent: set[str] = set()  # keys whose Publish was acknowledged
        self.heal_at = 0.0
        self.proxy: FaultProxy | None = None
        self.groups: dict[str, list[Member]] = {}
        base_env = {
            "DEDUP_DELIVERY__ACK_DEADLINE_SECONDS": "5",
            "DEDUP_DELIVERY__LEASE_MARGIN_SECONDS": "1",
            "DEDUP_STORE__KEY_PREFIX": f"chaos-{self.prefix}",
            "DEDUP_DELIVERY__DETACH_GRACE_SECONDS": "60",
            **(env or {}),
        }
        for variant in VARIANTS:
            group = f"{self.topic}-{variant}"
            self.groups[variant] = [
                Member(
                    SidecarProcess(
                        process_env(kafka, self.topic, group, redis.url, **base_env),
                        workdir / f"{name}-{variant}-{i}.sidecar.log",
                    ),
                    workdir / f"{name}-{variant}.db",
                    variant,
                    list(app_args or []),
                )
                for i in range(members)
            ]

        if publisher_env:  # extra settings for the first sidecar, which takes the publishes first
            first = self.groups["naive"][0].sidecar
            first.env = {**first.env, **publisher_env}

    @property
    def members(self) -> list[Member]:
        return [m for ms in self.groups.values() for m in ms]

    def member(self, variant: str, i: int) -> Member:
        return self.groups[variant][i]

    async def start(self) -> None:
        # Blocking Kafka calls run off the loop: the fault proxy (F1) forwards on this loop.
        await asyncio.to_thread(self.kafka.create_topic, self.topic, self.partitions)
        if any(m.sidecar.env.get("DEDUP_KAFKA__GROUP_TYPE") == "share" for m in self.members):
            # Queue mode: a record lock the harness's 5 s ack deadline fits in (the default 30 s
            # would hold a killed member's records for half a minute).
            for variant in VARIANTS:
                await asyncio.to_thread(
                    set_group_config,
                    self.kafka.bootstrap_servers,
                    f"{self.topic}-{variant}",
                    {"share.record.lock.duration.ms": str(SHARE_LOCK_MS)},
                )
        for m in self.members:
            m.sidecar.start()
        await asyncio.gather(*(m.sidecar.wait_serving(60) for m in self.members))
        for m in self.members:
            m.start_app()

    async def add_member(self, variant: str) -> Member:
        first = self.groups[variant][0]
        i = len(self.groups[variant])
        m = Member(
            SidecarProcess(first.sidecar.env, self.workdir / f"{self.name}-{variant}-{i}.sidecar.log"),
            first.ledger,
            variant,
            first.app_args,
        )
        self.groups[variant].append(m)
        m.sidecar.start()
        await m.sidecar.wait_serving(60)
        m.start_app()
        return m

    async def restart_sidecar(self, m: Member) -> None:
        m.sidecar.start()
        await m.sidecar.wait_serving(60)

    async def publish(self, count: int, start: int = 0) -> None:
        """Publish keys start..start+count with PublishBatch until each one is acknowledged
        (retrying through whichever sidecar is alive), re-publish some through Publish, and write
        plain-producer duplicates of others."""
        keys = [f"{self.prefix}-{i:06d}" for i in range(start, start + count)]
        self.attempted.update(keys)
        pending = list(keys)
        deadline = time.monotonic() + 180
        turn = 0
        while pending and time.monotonic() < deadline:
            target = self.alive_sidecar(turn)
            turn += 1
            try:
                async with DedupClient(target.target, streaming=self.publish_path == "stream") as c:
                    while pending:
                        chunk = pending[:200]
                        if self.publish_path == "batched":
                            entries = [
                                publish_request(self.topic, k.encode(), self.kafka_key(k), idempotency_key=k)
                                for k in chunk
                            ]
                            out: list[Any] = await c.publish_batch(entries, timeout=30)
                        else:
                            out = await self._publish_each(c, chunk)
                        done = {r.idempotency_key for r in out if isinstance(r, PublishResult)}
                        self.sent.update(done)
                        pending = [k for k in chunk if k not in done] + pending[200:]
                        if len(done) < len(chunk):
                            await asyncio.sleep(0.3)
                        if not done:
                            break  # no progress on this sidecar: try the next alive one (and the deadline)
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.3)
        for k in self.rng.sample(keys, max(1, count // 20)):  # an app retrying Publish after a timeout
            for attempt in range(20):
                try:
                    streaming = self.publish_path == "stream"
                    async with DedupClient(self.alive_sidecar(attempt).target, streaming=streaming) as c:
                        r = await c.publish(
                            self.topic, k.encode(), self.kafka_key(k), idempotency_key=k, timeout=10
                        )
                        self.sent.add(r.idempotency_key)
                    break
                except (grpc.aio.AioRpcError, PublishError):
                    await asyncio.sleep(0.3)
        dups = self.rng.sample(sorted(self.sent), max(1, count // 20))
        await asyncio.to_thread(self._write_duplicates, dups)

    async def _publish_each(self, c: DedupClient, keys: list[str]) -> list[Any]:
        """One publish() per key, 64 in flight; each key's result or its error."""
        room = asyncio.Semaphore(64)

        async def one(k: str) -> Any:
            async with room:
                value, kkey = k.encode(), self.kafka_key(k)
                return await c.publish(self.topic, value, kkey, idempotency_key=k, timeout=30)

        return await asyncio.gather(*(one(k) for k in keys), return_exceptions=True)

    def _write_duplicates(self, keys: list[str]) -> None:
        """A producer whose retry wrote the record twice: the copy is in Kafka, same key."""
        p = Producer({"bootstrap.servers": self.kafka.bootstrap_servers})
        for k in keys:
            headers: list[tuple[str, str | bytes | None]] = [
                ("idempotency-key", k.encode()),
                (COPY_HEADER, b"1"),
            ]
            p.produce(self.topic, k.encode(), self.kafka_key(k), headers=headers)
        p.flush(60)

    def kafka_key(self, idempotency_key: str) -> bytes | None:
        """The entity a record belongs to (its Kafka key), when the scenario has entities."""
        if not self.entities:
            return None
        return f"e{int(idempotency_key.rsplit('-', 1)[1]) % self.entities}".encode()

    def order_violations(self, variant: str) -> int | None:
        """Effects applied after an effect of a higher offset with the same Kafka key. The first
        effect of each idempotency key counts (a naive app's repeat is the dedup window)."""
        if not self.entities:
            return None
        firsts: dict[str, tuple[float, bytes, int, int]] = {}
        for ledger in {m.ledger for m in self.groups[variant]}:
            if not ledger.exists():
                continue
            db = sqlite3.connect(ledger, timeout=30)
            for key, at, kkey, part, off in db.execute("SELECT key, at, kkey, part, off FROM effects"):
                if kkey is not None and (key not in firsts or at < firsts[key][0]):
                    firsts[key] = (at, kkey, part, off)
            db.close()
        violations = 0
        highest: dict[tuple[bytes, int], int] = {}
        for _, kkey, part, off in sorted(firsts.values()):
            top = highest.get((kkey, part), -1)
            if off < top:
                violations += 1
            highest[(kkey, part)] = max(top, off)
        return violations

    async def trickle(self, start: int, per_second: int = 500) -> None:
        """Records keep arriving: keys from ``start`` on, ``per_second`` a second in batches of
        50 through PublishBatch on whichever sidecar is alive, until cancelled."""
        n, turn = start, 0
        while True:
            keys = [f"{self.prefix}-{i:06d}" for i in range(n, n + 50)]
            self.attempted.update(keys)
            entries = [
                publish_request(self.topic, k.encode(), self.kafka_key(k), idempotency_key=k) for k in keys
            ]
            while keys:
                turn += 1
                try:
                    async with DedupClient(self.alive_sidecar(turn).target) as c:
                        out: list[Any] = await c.publish_batch(entries, timeout=10)
                    self.sent.update(r.idempotency_key for r in out if isinstance(r, PublishResult))
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.1)
            n += 50
            await asyncio.sleep(50 / per_second)

    def alive_sidecar(self, turn: int) -> SidecarProcess:
        alive = [m.sidecar for m in self.members if m.sidecar.proc and m.sidecar.proc.poll() is None]
        return alive[turn % len(alive)] if alive else self.members[0].sidecar

    def longest_pause(self, variant: str, since: float, until: float) -> float:
        """The longest time between two effects of ``variant``'s apps in [since, until]: how
        long the group as a whole applied nothing (records were arriving all along)."""
        times: list[float] = []
        for ledger in {m.ledger for m in self.groups[variant]}:
            db = sqlite3.connect(ledger, timeout=30)
            times += [
                at for (at,) in db.execute("SELECT at FROM effects WHERE at BETWEEN ? AND ?", (since, until))
            ]
            db.close()
        times = sorted([since, *times, until])
        return max(b - a for a, b in itertools.pairwise(times))

    def effects(self, variant: str) -> tuple[Counter[str], dict[str, int], list[float]]:
        counts: Counter[str] = Counter()
        attempts: dict[str, int] = {}
        firsts: dict[str, float] = {}
        # Every app of a group shares one ledger, as apps share their database in production.
        for ledger in {m.ledger for m in self.groups[variant]}:
            if not ledger.exists():
                continue
            db = sqlite3.connect(ledger, timeout=30)
            for key, at in db.execute("SELECT key, at FROM effects"):
                counts[key] += 1
                firsts[key] = min(at, firsts.get(key, at))
            for key, attempt in db.execute("SELECT key, MAX(attempt) FROM deliveries GROUP BY key"):
                attempts[key] = max(attempt, attempts.get(key, 0))
            db.close()
        return counts, attempts, list(firsts.values())

    def delivered_after_ack(self, variant: str, ack_deadline_s: float = 5.0) -> int:
        """Keys sent again by a sidecar after an Ack for them had returned OK (contract point 2).

        A delivery's send time is its deadline minus the ack deadline; a redelivery sent before the
        ack returned (and read from the stream later) is not counted."""
        bad = 0
        for ledger in {m.ledger for m in self.groups[variant]}:
            if not ledger.exists():
                continue
            db = sqlite3.connect(ledger, timeout=30)
            first_ok = dict(db.execute("SELECT key, MIN(at) FROM acks WHERE result = 'OK' GROUP BY key"))
            for key, deadline in db.execute("SELECT key, deadline FROM deliveries"):
                ok = first_ok.get(key)
                if ok is not None and deadline - ack_deadline_s > ok + 0.05:
                    bad += 1
            db.close()
        return bad

    def ack_times(self, variant: str) -> list[float]:
        out: list[float] = []
        for ledger in {m.ledger for m in self.groups[variant]}:
            if ledger.exists():
                db = sqlite3.connect(ledger, timeout=30)
                out += [at for (at,) in db.execute("SELECT at FROM acks WHERE result = 'OK'")]
                db.close()
        return out

    async def drain(self, stall: float = DRAIN_STALL_S, timeout: float = DRAIN_CAP_S) -> str:
        """Wait until both variants have an effect for every sent key.

        The rows measure loss, not the apps' speed, so the wait goes on while effects keep
        arriving: it gives up after ``stall`` seconds with no new effect in either ledger (longer
        than an ack deadline, a lease and a rebalance together), or after ``timeout`` in all.
        Returns why it gave up ("" when every key arrived), for the row's notes."""
        start = time.monotonic()
        last_progress = start
        seen = -1
        while True:
            have = [set(self.effects(v)[0]) for v in VARIANTS]
            if all(self.sent <= h for h in have):
                await asyncio.sleep(1.0)  # let late duplicates, if any, show up
                return ""
            now = time.monotonic()
            count = sum(len(h) for h in have)
            if count > seen:
                seen, last_progress = count, now
            if now - last_progress > stall:
                return f"drain gave up: no new effect for {stall:g} s"
            if now - start > timeout:
                return f"drain gave up after {timeout:g} s, effects still arriving"
            await asyncio.sleep(0.5)

    def read_topic(self) -> tuple[int, int]:
        """Read the whole topic back: (keys Publish wrote more than once, acknowledged keys with
        no record). Copies the scenario wrote on purpose (COPY_HEADER) are not counted."""
        counts = records_per_key(self.kafka.bootstrap_servers, self.topic, skip_header=COPY_HEADER)
        return sum(1 for n in counts.values() if n > 1), len(self.sent - set(counts))

    def check(self) -> list[Figures]:
        topic = self.read_topic() if self.readback else (None, None)
        out = []
        for v in VARIANTS:
            counts, attempts, firsts = self.effects(v)
            keys = set(counts)
            last_first = max(firsts) if firsts else self.heal_at
            out.append(
                Figures(
                    fault=self.name,
                    variant=v,
                    sent=len(self.sent),
                    lost=len(self.sent - keys),
                    duplicated=sum(1 for n in counts.values() if n > 1),
                    unexpected=len(keys - self.attempted),
                    redelivered=sum(1 for a in attempts.values() if a > 1),
                    max_attempt=max(attempts.values(), default=0),
                    recovery_s=max(0.0, last_first - self.heal_at),
                    delivered_after_ack=self.delivered_after_ack(v),
                    order_violations=self.order_violations(v),
                    attempts=" ".join(f"{a}:{n}" for a, n in sorted(Counter(attempts.values()).items())),
                    topic_duplicates=topic[0],
                    topic_missing=topic[1],
                )
            )
        return out

    def stop(self) -> None:
        for m in self.members:
            m.stop()


Fault = Callable[[Scenario], Awaitable[str]]


async def run_scenario(
    name: str,
    fault: Fault,
    kafka: services.KafkaShape,
    redis: services.RedisShape,
    workdir: Path,
    messages: int,
    proxy: FaultProxy | None = None,
    **kwargs: Any,
) -> list[Figures]:
    s = Scenario(name, kafka, redis, workdir, messages, **kwargs)
    s.proxy = proxy
    try:
        await s.start()
        pub = asyncio.create_task(s.publish(messages))
        notes = await fault(s)
        await pub
        s.heal_at = time.time()
        gave_up = await s.drain()
        figures = s.check()
        for f in figures:
            f.notes = f"{notes}; {gave_up}" if gave_up else notes
        return figures
    finally:
        s.stop()
