"""Store safety at start-up and in a group: persistence checks, auth, local stores in groups."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import services

from sidecar import config
from sidecar.errors import ConfigError, StoreUnavailable
from sidecar.process.app import Sidecar
from sidecar.process.stores import open_store
from sidecar.store.base import ClaimStatus
from sidecar.store.redis import RedisStore
from tests.integration.helpers import running_sidecar, settings_dict, unique


@pytest.fixture(scope="module")
def volatile_redis(tmp_path_factory: pytest.TempPathFactory) -> object:
    with services.RedisServer.start(tmp_path_factory.mktemp("volatile"), appendonly="no") as r:
        yield r


async def test_redis_without_persistence_warns_or_refuses(
    volatile_redis: services.RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    warn = config.load(store={"backend": "redis", "redis_url": volatile_redis.url})
    store = await open_store(warn)
    await store.close()
    assert "neither AOF nor RDB" in caplog.text
    strict = config.load(
        store={"backend": "redis", "redis_url": volatile_redis.url, "require_durable_store": True}
    )
    with pytest.raises(ConfigError, match="appendonly yes") as info:
        await open_store(strict)
    assert "store.require_durable_store" in str(info.value)


async def test_redis_with_aof_is_accepted(redis_server: services.RedisServer) -> None:
    s = config.load(store={"backend": "redis", "redis_url": redis_server.url, "require_durable_store": True})
    store = await open_store(s)
    await store.close()


async def test_redis_auth(tmp_path: Path) -> None:
    with services.RedisServer.start(tmp_path / "auth", password="pa55") as r:
        good = RedisStore(f"redis://:pa55@127.0.0.1:{r.port}/0")
        assert (await good.claim(["k"], "o", 1000))[0].status is ClaimStatus.NEW
        await good.close()
        bad = RedisStore(f"redis://:wrong@127.0.0.1:{r.port}/0")
        with pytest.raises(StoreUnavailable, match=r"store\.redis_url"):
            await bad.ping()
        await bad.close()


async def test_unreachable_redis_fails_start_with_the_setting_named() -> None:
    s = config.load(store={"backend": "redis", "redis_url": f"redis://127.0.0.1:{services.free_port()}/0"})
    with pytest.raises(StoreUnavailable, match=r"store\.redis_url"):
        await open_store(s)


async def test_local_store_in_a_shared_group_is_flagged(
    kafka: services.KafkaBroker, caplog: pytest.LogCaptureFixture
) -> None:
    topic, group = unique("local"), unique("g")
    kafka.create_topic(topic, 2)
    cfg = settings_dict(kafka, [topic], group, {"backend": "memory"})
    async with running_sidecar(**cfg) as first, running_sidecar(**cfg):
        deadline = time.monotonic() + 30
        while first.metrics.local_store_shared_group._value.get() != 1:
            assert time.monotonic() < deadline, "a local store in a two-member group went unnoticed"
            await asyncio.sleep(0.2)
    assert "CORRECTNESS HOLE" in caplog.text


async def test_no_app_stream_leaves_the_group(kafka: services.KafkaBroker) -> None:
    topic, group = unique("detach"), unique("g")
    kafka.create_topic(topic, 2)
    idle_cfg = settings_dict(kafka, [topic], group, delivery={"detach_grace_seconds": 1})
    busy_cfg = settings_dict(kafka, [topic], group)
    async with running_sidecar(**idle_cfg) as idle, running_sidecar(**busy_cfg) as busy:
        assert busy.engine is not None
        assert idle.engine is not None
        busy.engine.attach([], 10, 0, 10)  # an app is attached to this one only
        deadline = time.monotonic() + 30
        while len(busy.engine.committable()) != 2:
            assert time.monotonic() < deadline, "partitions did not move to the replica with an app"
            await asyncio.sleep(0.2)
        assert idle.engine.committable() == {}


def test_no_topics_is_a_publish_only_sidecar_not_an_error() -> None:
    # It used to refuse to start; tests/integration/test_operations.py runs one.
    assert Sidecar(config.load()).settings.kafka.topics == []


async def test_a_burst_beyond_the_connection_pool_waits_instead_of_failing(
    redis_server: services.RedisServer,
) -> None:
    """More concurrent round trips than the pool has connections (a burst of Acks after a
    broker outage) must queue for a connection, not fail: a failed Ack is redelivered."""
    store = RedisStore(f"{redis_server.url}?max_connections=4", prefix=unique("burst"))
    try:
        # Distinct owners: calls with different arguments are not joined into one round trip.
        results = await asyncio.gather(*(store.claim([f"k{i}"], f"owner-{i}", 5000) for i in range(40)))
        assert all(r[0].status is ClaimStatus.NEW for r in results)
    finally:
        await store.close()
