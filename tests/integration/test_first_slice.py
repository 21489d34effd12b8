"""Publish -> Subscribe -> out-of-order Ack -> commit of the exact prefix -> restart without redelivery."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import services
from dedup_client import AckResult, DedupClient

from tests.integration.helpers import Inbox, committed_offsets, running_sidecar, settings_dict, unique


async def test_out_of_order_acks_commit_the_prefix_and_restart_redelivers_only_unacked(
    kafka: services.KafkaBroker, tmp_path: Path
) -> None:
    topic, group = unique("slice"), unique("g")
    kafka.create_topic(topic, 2)
    cfg = settings_dict(kafka, [topic], group, {"backend": "sqlite", "sqlite_path": str(tmp_path / "s.db")})

    async with running_sidecar(**cfg) as sc, DedupClient(f"127.0.0.1:{sc.port}") as client:
        for i in range(20):
            r = await client.publish(topic, f"v{i}".encode(), idempotency_key=f"key-{i}", partition=i % 2)
            assert r.offset == i // 2
            assert r.partition == i % 2
            assert not r.duplicate
        async with Inbox(client) as inbox:
            msgs = await inbox.wait(20)
        assert sorted(m.idempotency_key for m in msgs) == sorted(f"key-{i}" for i in range(20))
        assert all(m.attempt == 1 for m in msgs)
        # Hold back p0@4 and p1@7, p1@8; ack the rest newest first (out of order).
        held = {(0, 4), (1, 7), (1, 8)}
        to_ack = sorted((m for m in msgs if (m.partition, m.offset) not in held), key=lambda m: -m.offset)
        results = await client.ack_many([m.delivery_id for m in to_ack])
        assert results == [AckResult.OK] * 17
        # Acking again is harmless and says so.
        assert await client.ack_many([to_ack[0].delivery_id]) == [AckResult.ALREADY_ACKED]

        deadline = time.monotonic() + 15
        while committed_offsets(kafka, group, topic, 2) != {0: 4, 1: 7}:
            assert time.monotonic() < deadline, committed_offsets(kafka, group, topic, 2)
            await asyncio.sleep(0.2)

    # A new sidecar process state, same durable store: only the three un-acked records come back.
    async with running_sidecar(**cfg) as sc, DedupClient(f"127.0.0.1:{sc.port}") as client:
        async with Inbox(client) as inbox:
            again = await inbox.wait(3)
            assert {(m.partition, m.offset) for m in again} == held
            assert all(m.attempt == 2 for m in again), [m.attempt for m in again]
            # Nothing else arrives: records above the commit point were skipped via commit metadata.
            await asyncio.sleep(2)
            assert len(inbox.messages) == 3
        assert await client.ack_many([m.delivery_id for m in again]) == [AckResult.OK] * 3
        deadline = time.monotonic() + 15
        while committed_offsets(kafka, group, topic, 2) != {0: 10, 1: 10}:
            assert time.monotonic() < deadline, committed_offsets(kafka, group, topic, 2)
            await asyncio.sleep(0.2)
        assert sc.metrics.skipped.labels("commit_metadata", topic)._value.get() == 6  # p0@5..9 and p1@9


async def test_per_ack_commit_mode_commits_before_ack_returns(kafka: services.KafkaBroker) -> None:
    topic, group = unique("perack"), unique("g")
    kafka.create_topic(topic, 1)
    cfg = settings_dict(kafka, [topic], group, commit={"mode": "per-ack", "interval_ms": 60_000})
    async with running_sidecar(**cfg) as sc, DedupClient(f"127.0.0.1:{sc.port}") as client:
        for i in range(3):
            await client.publish(topic, b"x", idempotency_key=f"pa-{i}")
        async with Inbox(client) as inbox:
            msgs = await inbox.wait(3)
            await client.ack_many([msgs[0].delivery_id])
            assert committed_offsets(kafka, group, topic, 1) == {0: 1}
            await client.ack_many([msgs[2].delivery_id])
            assert committed_offsets(kafka, group, topic, 1) == {0: 1}  # 1 is still open
            await client.ack_many([msgs[1].delivery_id])
            assert committed_offsets(kafka, group, topic, 1) == {0: 3}
