"""Intake: consumed records become pending records, in offset order per partition.

Each record is offered to its partition's ack tracker (which drops what was settled before a
restart), given its idempotency key, entered in its ordering chain and queued for a claim. A
record whose key another pending record holds waits behind it (SHADOWED): it is decided when that
one settles. Records read from a retry topic before their due time wait for it here.
Back-pressure: intake waits while the claim backlog or the unsettled total is over its bound, so
the poll thread stops taking records out of librdkafka.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import cast

from confluent_kafka import Message

from sidecar.engine import ordering
from sidecar.engine.claims import CLAIM_BACKLOG, Claims
from sidecar.engine.core import Core
from sidecar.engine.identity import idempotency_key, store_key
from sidecar.engine.ordering import Ordering
from sidecar.engine.records import TP, Pending, State
from sidecar.engine.reroute import Reroute, RetryRecord
from sidecar.offsets import OfferResult

log = logging.getLogger(__name__)


class Intake:
    def __init__(self, core: Core, claims: Claims, reroute: Reroute) -> None:
        self.core = core
        self.claims = claims
        self.reroute = reroute
        self.queue: asyncio.Queue[list[Message]] = asyncio.Queue()

    def put(self, records: list[Message]) -> None:
        self.queue.put_nowait(records)

    async def loop(self) -> None:
        core = self.core
        limit = max(core.settings.kafka.fetch_batch, 500)
        while True:
            batch = await self.queue.get()
            # Hand-overs queued meanwhile join this batch: at a low rate the poll thread hands
            # records over one by one, and one claim round trip each would not keep up.
            while len(batch) < limit and not self.queue.empty():
                batch = batch + self.queue.get_nowait()
            try:
                await self.take_in(batch)
            except Exception:
                log.exception("intake failed for a batch of %d records", len(batch))
            finally:
                if core.consumer is not None:
                    core.consumer.taken_in(len(batch))

    async def take_in(self, batch: list[Message]) -> None:
        core = self.core
        d = core.settings.delivery
        header, fallback, group = d.idempotency_header, d.key_fallback, core.group
        partitions, key_index = core.partitions, core.key_index
        share = core.share is not None
        retry_sources = self.reroute.retry_sources
        to_claim: list[Pending] = []
        no_key: list[Pending] = []
        touched: set[TP] = set()
        modes: dict[TP, Ordering] = {}  # per partition, looked up once per batch
        for m in batch:
            topic, partition, offset = m.topic() or "", m.partition() or 0, m.offset() or 0
            tp = (topic, partition)
            part = partitions.get(tp)
            if share:
                # Queue mode: every record polled is this member's until it is acknowledged.
                part = core.share_partition(tp)
                old = part.pending.get(offset)
                if old is not None:  # the broker took it back (a leave) and handed it out again
                    core.release([old], acknowledge=False)
            elif part is None:
                continue  # revoked since the fetch; the next owner reads it again
            else:
                result = part.tracker.offer(offset)
                if result is OfferResult.IGNORED:
                    continue
                touched.add(tp)
                if result is OfferResult.ALREADY_SETTLED:
                    core.metrics.skipped.labels("commit_metadata", retry_sources.get(topic, topic)).inc()
                    continue
            # librdkafka hands consumed headers over as a list of (str, bytes | None).
            headers = cast(list[tuple[str, bytes | None]], m.headers() or [])
            value = m.value() or b""
            key = m.key()
            ts_type, ts = m.timestamp()
            source = retry_sources.get(topic) if retry_sources else None
            if source is None:
                ik = idempotency_key(headers, header, fallback, topic, partition, offset, key, value)
                p = Pending(
                    tp,
                    offset,
                    part.generation,
                    ik,
                    store_key(group, topic, ik) if ik is not None else "",
                    key,
                    value,
                    headers,
                    ts if ts_type else 0,
                    topic,
                )
            else:
                p = self._retry_record(part.generation, tp, offset, source, headers, key, value, ts)
            if share:
                p.lock_until = core.share_lock_until
                p.delivery_count = m.delivery_count() or 1
                p.last_delivery = p.delivery_count >= core.share_delivery_limit
                core.metrics.share_delivery_count.observe(p.delivery_count)
            part.pending[offset] = p
            mode = modes.get(tp)
            if mode is None:
                mode = modes[tp] = core.ordering_of(p.topic)
            if mode:  # unordered records join no chain
                ordering.enter(part, p, mode)
            if p.idem_key is None:
                no_key.append(p)
                continue
            if p.scheduled:
                part.scheduled += 1
                core.waiting.append(p)
                continue
            holder = key_index.get(p.store_key)
            if holder is not None:
                # An earlier record with this key is pending here: decide this one when that settles.
                p.state = State.SHADOWED
                holder.shadows.append(p)
                continue
            key_index[p.store_key] = p
            to_claim.append(p)
        for tp in touched:
            core.update_pause(tp)
        if no_key:
            for p in no_key:
                p.reason_code = "no-key"
                p.reason = f"no {d.idempotency_header!r} header and delivery.key_fallback=dead-letter"
            self.reroute.dead_letter(no_key)
        if to_claim:
            self.claims.enqueue(to_claim)
            # Back-pressure: stop taking records in while the claim backlog is long.
            while len(self.claims.queue) >= CLAIM_BACKLOG:
                self.claims.room.clear()
                await self.claims.room.wait()
        # And while too many records are held unsettled in all: the poll thread then stops taking
        # records out of librdkafka, which stops fetching, and nothing prefetched is dropped (as a
        # partition's pause would drop it).
        limit = d.max_unsettled
        while sum(part.tracker.unsettled for part in partitions.values()) >= limit:
            core.settled_some.clear()
            await core.settled_some.wait()

    def _retry_record(
        self,
        generation: int,
        tp: TP,
        offset: int,
        source: str,
        headers: list[tuple[str, bytes | None]],
        key: bytes | None,
        value: bytes,
        ts: int,
    ) -> Pending:
        """A record read from a retry topic: delivered under its source topic's coordinates and
        idempotency key, at its due time, as the attempt after the ones it had."""
        core = self.core
        d = core.settings.delivery
        r = RetryRecord(source, headers)
        ik = r.idem_key
        if ik is None:  # not written by a sidecar: identify it as any record of the source topic
            ik = idempotency_key(r.headers, d.idempotency_header, d.key_fallback, *tp, offset, key, value)
        p = Pending(
            tp,
            offset,
            generation,
            ik,
            store_key(core.group, source, ik) if ik is not None else "",
            key,
            value,
            r.headers,
            ts,
            source,
            origin=r.origin,
            attempt=r.attempts,
            failures=r.failures,
        )
        wait_s = (r.due_ms - time.time() * 1000) / 1000
        if ik is not None and wait_s > 0:
            p.state, p.due, p.scheduled = State.DELAYED, core.clock() + wait_s, True
        return p
