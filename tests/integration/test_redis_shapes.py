"""The shared store in production shapes, each a real server: Redis Cluster, Sentinel, WAIT, TLS.

* a sidecar process whose ``--redis-url`` names one Cluster node consumes and publishes exactly as
  with one node, and its keys land on all three masters;
* ``store.redis_min_replicas_acked`` answers only once replicas hold the write, and says which
  setting to change when they do not;
* a Cluster master and a Sentinel primary are ``kill -9``'d while a store completes keys with
  WAIT on: every complete that returned is still done on the promoted replica, and the calls made
  during the failover fail with what happened, then succeed again by themselves.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import services
from dedup_client import DedupClient, PublishResult
from dedup_client.results import publish_request
from redis.crc import key_slot

from sidecar.errors import StoreUnavailable
from sidecar.store.base import ClaimStatus
from sidecar.store.redis import RedisStore
from sidecar.store.redis_connect import SentinelAuth
from sidecar.store.redis_shapes import ReplicaShortfall
from tests.conftest import ACL_PASSWORD, ACL_PREFIX, ACL_USER, SENTINEL_PASSWORD
from tests.integration.helpers import (
    Inbox,
    SidecarProcess,
    committed_offsets,
    process_env,
    raw_produce,
    read_topic,
    unique,
)

DAY = 86_400_000

MakeStore = Callable[..., RedisStore]


@pytest.fixture
async def make_store() -> AsyncIterator[MakeStore]:
    """RedisStore(...), closed after the test whatever happens (an unclosed one warns later)."""
    made: list[RedisStore] = []

    def make(*args: Any, **kwargs: Any) -> RedisStore:
        made.append(RedisStore(*args, **kwargs))
        return made[-1]

    yield make
    for store in made:
        await store.close()


def keys_per_master(cluster: services.RedisCluster, pattern: str) -> list[int]:
    """How many keys matching ``pattern`` each live master holds (SCAN on each)."""
    return [len(m.cli("--scan", "--pattern", pattern).split()) for m in cluster.masters()]


async def test_sidecar_on_a_redis_cluster_consumes_and_publishes_as_on_one_node(
    kafka: services.KafkaBroker, redis_cluster: services.RedisCluster, tmp_path: Path
) -> None:
    topic, group, prefix = unique("cluster"), unique("g"), unique("cl")
    kafka.create_topic(topic, 3)
    env = process_env(kafka, topic, group, redis_cluster.url, DEDUP_STORE__KEY_PREFIX=prefix)
    sidecar = SidecarProcess(env, tmp_path / "sidecar.log")
    sidecar.start()
    try:
        await sidecar.wait_serving(60)
        keys = [f"order-{i:04d}" for i in range(300)]
        async with DedupClient(sidecar.target) as client:
            out = await client.publish_batch(
                [publish_request(topic, k.encode(), idempotency_key=k) for k in keys]
            )
            assert all(isinstance(r, PublishResult) and not r.duplicate for r in out), out
            for k in keys[:50]:  # an app retrying: answered from the store, not produced again
                assert (await client.publish(topic, k.encode(), idempotency_key=k)).duplicate
            # A producer's retry that wrote records twice: the copies are in Kafka.
            raw_produce(kafka, topic, [(k, k.encode(), None) for k in keys[-30:]])
            async with Inbox(client) as inbox:
                got = await inbox.wait(300, timeout=60)
                await client.ack_many([m.delivery_id for m in got])
                await asyncio.sleep(2)  # the 30 copies are skipped, not delivered
                assert Counter(m.idempotency_key for m in inbox.messages) == Counter(keys)
        in_kafka = Counter(dict(m.headers())["idempotency-key"].decode() for m in read_topic(kafka, topic))
        assert sum(in_kafka.values()) == 330
        assert {k for k, n in in_kafka.items() if n > 1} == set(keys[-30:])
        deadline = time.monotonic() + 20
        # A partition the (sticky) partitioner gave no record has no commit (-1001): count none.
        while sum(max(o, 0) for o in committed_offsets(kafka, group, topic, 3).values()) != 330:
            assert time.monotonic() < deadline, committed_offsets(kafka, group, topic, 3)
            await asyncio.sleep(0.2)
    finally:
        assert sidecar.terminate() == 0, sidecar.log_path.read_text()[-3000:]
    log = sidecar.log_path.read_text()
    assert "Redis dedup store: cluster" in log
    assert "unreachable" not in log, log[-3000:]
    # 300 done marks and 300 publish records, on every master of the three.
    spread = keys_per_master(redis_cluster, f"{prefix}:*")
    assert sum(spread) == 600
    assert len(spread) == 3
    assert min(spread) > 100, spread


@pytest.mark.parametrize("shape", ["redis_cluster", "redis_sentinel"])
async def test_wait_for_replicas_answers_or_names_the_setting(
    request: pytest.FixtureRequest, shape: str, make_store: MakeStore
) -> None:
    url = request.getfixturevalue(shape).url
    prefix = unique("wait")
    ok = make_store(url, prefix=prefix, min_replicas=1, wait_ms=2000)
    ks = [f"k{i}" for i in range(50)]
    assert [c.status for c in await ok.claim(ks, "a", 5000)] == [ClaimStatus.NEW] * 50
    assert await ok.complete(ks, "a", DAY) == [False] * 50
    await ok.close()
    # More replicas than there are: the write waits its timeout, then fails naming the setting.
    too_many = make_store(url, prefix=prefix, min_replicas=3, wait_ms=200)
    t0 = time.monotonic()
    with pytest.raises(ReplicaShortfall, match=r"store\.redis_min_replicas_acked") as info:
        await too_many.claim(["other"], "a", 5000)
    assert time.monotonic() - t0 < 5
    assert "store.redis_wait_timeout_ms" in str(info.value)
    await too_many.close()


async def test_tls_needs_the_ca_and_acl_user_needs_its_password(
    redis_tls: services.RedisServer, make_store: MakeStore
) -> None:
    assert redis_tls.tls is not None
    url = f"rediss://{ACL_USER}:{ACL_PASSWORD}@{redis_tls.address}/0"
    good = make_store(url, prefix=f"{ACL_PREFIX}{uuid.uuid4().hex[:6]}", tls_ca_file=str(redis_tls.tls.ca))
    await good.ping()
    await good.close()
    untrusted = make_store(url, prefix=f"{ACL_PREFIX}x", timeout_s=2)  # the system CAs do not know it
    with pytest.raises(StoreUnavailable, match=r"certificate verify failed"):
        await untrusted.ping()
    await untrusted.close()
    wrong = make_store(
        url.replace(ACL_PASSWORD, "nope"), prefix=f"{ACL_PREFIX}x", tls_ca_file=str(redis_tls.tls.ca)
    )
    with pytest.raises(StoreUnavailable, match=r"refused the credentials.*store\.redis_url"):
        await wrong.ping()
    await wrong.close()
    # A Redis that requires client certificates: refused without one, served with one.
    tls = redis_tls.tls
    with services.RedisServer.start(
        redis_tls.workdir.parent / "redis-mtls", tls=tls, extra_args=["--tls-auth-clients", "yes"]
    ) as strict:
        bare = make_store(f"rediss://{strict.address}/0", tls_ca_file=str(tls.ca), timeout_s=2)
        with pytest.raises(StoreUnavailable, match=r"store\.redis_url"):
            await bare.ping()
        await bare.close()
        with_cert = make_store(
            f"rediss://{strict.address}/0",
            tls_ca_file=str(tls.ca),
            tls_cert_file=str(tls.client_cert),
            tls_key_file=str(tls.client_key),
        )
        await with_cert.ping()
        assert (await with_cert.claim(["k"], "a", 1000))[0].status is ClaimStatus.NEW
        await with_cert.close()
    # The ACL user may touch only its own prefix: another prefix is refused, by name.
    outside = make_store(url, prefix="dedup", tls_ca_file=str(redis_tls.tls.ca))
    with pytest.raises(StoreUnavailable, match=r"refused a command"):
        await outside.claim(["k"], "a", 1000)
    await outside.close()


async def _complete_through_a_failover(
    store: RedisStore, fail: asyncio.Future[str]
) -> tuple[list[str], list[str]]:
    """Complete keys in batches of 50 until the failover is over and 20 more batches went through.
    Returns the keys whose complete returned, and the errors seen on the way."""
    done: list[str] = []
    errors: list[str] = []
    after = 0
    deadline = time.monotonic() + 90
    i = 0
    while after < 20:
        assert time.monotonic() < deadline, f"the store did not recover: {errors[-3:]}"
        batch = [f"k{i}-{j}" for j in range(50)]
        i += 1
        try:
            await store.complete(batch, "a", DAY)
        except StoreUnavailable as exc:
            errors.append(str(exc))
            await asyncio.sleep(0.1)
            continue
        done += batch
        if fail.done():
            after += 1
    return done, errors


async def assert_all_done(url: str, prefix: str, done: list[str]) -> None:
    """Every key in ``done`` is still done (read by another owner, after the failover)."""
    async with RedisStore(url, prefix=prefix) as check:
        claims = await check.claim(done, "b", 5000)
    lost = [k for k, c in zip(done, claims, strict=True) if c.status is not ClaimStatus.DONE]
    assert not lost, f"{len(lost)} of {len(done)} acknowledged completes lost in the failover"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("shape", ["cluster", "sentinel"])
async def test_a_failover_under_load_with_wait_keeps_every_acknowledged_write(
    tmp_path: Path, shape: str, make_store: MakeStore
) -> None:
    redis = services.start_redis(tmp_path / shape, shape)
    try:
        store = make_store(redis.url, prefix="fo", min_replicas=1, wait_ms=1000, timeout_s=2)
        await store.ping()
        failed: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def fail_over() -> None:
            await asyncio.sleep(1.0)
            if isinstance(redis, services.RedisCluster):
                victim = redis.masters()[0]
                await asyncio.to_thread(redis.kill_master, victim)
                # The promoted replica has no replica of its own: with WAIT on, its slots take no
                # writes until the old master is back (as its replica).
                await asyncio.to_thread(victim.restart)
                await asyncio.to_thread(redis.wait_ok)
            else:
                assert isinstance(redis, services.RedisSentinelSet)
                victim = await asyncio.to_thread(redis.kill_master)
            failed.set_result(victim.address)

        task = asyncio.create_task(fail_over())
        done, errors = await _complete_through_a_failover(store, failed)
        await task
        masters = [m.address for m in redis.masters()] if isinstance(redis, services.RedisCluster) else []
        if isinstance(redis, services.RedisSentinelSet):
            masters = [redis.master_address()]
        assert failed.result() not in masters, "no failover happened"
        for e in errors:  # what the caller hears while the master moves: never a raw redirect
            assert "MOVED" not in e
            assert "ASK " not in e
            assert "store.redis" in e
        await store.close()
        await assert_all_done(redis.url, "fo", done)
    finally:
        redis.stop()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("wait", [False, True], ids=["no-wait", "wait"])
async def test_a_master_lost_before_its_replica_had_the_write(
    tmp_path: Path, wait: bool, make_store: MakeStore
) -> None:
    """The window, made to happen: a master answers, then dies before its replica got the write,
    and the replica is promoted. Without WAIT the done marks the dead master acknowledged are gone;
    with it, its answers never came (the calls failed naming the setting), so nothing acknowledged
    is lost, and the keys on the other masters went through."""
    with services.RedisCluster.start(tmp_path / "cluster") as cluster:
        victim = cluster.masters()[0]
        [replica] = cluster.replicas_of(victim)
        store = make_store(victim.url, prefix="w", min_replicas=int(wait), wait_ms=50)
        await store.ping()
        # The slot map, read before the victim is kept busy below (the other nodes may then
        # suspect it, "fail?", until it answers again).
        keys = [f"k{i}" for i in range(300)]
        on_victim = {k for k in keys if cluster.node_of_slot(key_slot(f"w:k:{k}".encode())) is victim}
        # Hold the replica back: stopped, behind 64 MB of replication stream that fills the
        # socket buffers, so what the victim writes next stays in the victim's memory only.
        replica.pause()
        tag = next(
            f"{{t{i}}}"
            for i in range(10_000)
            if cluster.node_of_slot(key_slot(f"{{t{i}}}".encode())) is victim
        )
        victim.cli("EVAL", "redis.call('SET', KEYS[1], string.rep('x', 67108864))", "1", f"ballast{tag}")
        acknowledged: list[str] = []
        refusals: list[str] = []
        for k in keys:  # one call each: a WAIT shortfall fails the call of a key on the victim only
            try:
                await store.complete([k], "a", DAY)
                acknowledged.append(k)
            except ReplicaShortfall as exc:
                refusals.append(str(exc))
        await store.close()
        assert all("store.redis_min_replicas_acked" in r for r in refusals)
        victim.kill()
        replica.resume()
        await asyncio.to_thread(cluster.wait_ok)  # the replica took over the victim's slots
        assert replica.address in {m.address for m in cluster.masters()}
        check = make_store(replica.url, prefix="w")
        claims = await check.claim(acknowledged, "b", 5000)
        await check.close()
        lost = {k for k, c in zip(acknowledged, claims, strict=True) if c.status is not ClaimStatus.DONE}
        assert 50 < len(on_victim) < 150
        if wait:
            assert set(acknowledged) == set(keys) - on_victim
            assert lost == set()
        else:
            assert acknowledged == keys
            assert lost == on_victim, f"{len(lost)} lost; {len(on_victim)} were on the dead master"


@pytest.mark.timeout(120)
async def test_a_slot_moving_under_the_store_keeps_every_answer_right(
    tmp_path: Path, make_store: MakeStore
) -> None:
    """Resharding, done by hand as redis-cli --cluster reshard does it: a slot MIGRATING on its
    master and IMPORTING on another, half its keys moved, then the slot handed over. Calls made
    meanwhile follow ASK (keys already moved, and new keys) and then MOVED, and every answer is
    the one a single node would give."""
    with services.RedisCluster.start(tmp_path / "cluster", replicas=0) as cluster:
        tag = "{slot-under-move}"
        slot = key_slot(tag[1:-1].encode())
        source = cluster.node_of_slot(slot)
        target = next(m for m in cluster.masters() if m is not source)
        ids = {n.address: n.cli("CLUSTER", "MYID").strip() for n in (source, target)}
        store = make_store(cluster.url, prefix="mv")
        done = [f"done-{i}{tag}" for i in range(40)]
        others = [f"other-{i}" for i in range(60)]  # keys in every other slot, in the same batches
        await store.claim(done + others, "a", 60_000)
        await store.complete(done + others, "a", DAY)

        target.cli("CLUSTER", "SETSLOT", str(slot), "IMPORTING", ids[source.address])
        source.cli("CLUSTER", "SETSLOT", str(slot), "MIGRATING", ids[target.address])
        moving = source.cli("CLUSTER", "GETKEYSINSLOT", str(slot), "20").split()
        assert len(moving) == 20
        source.cli("MIGRATE", "127.0.0.1", str(target.port), "", "0", "5000", "KEYS", *moving)

        fresh = [f"fresh-{i}{tag}" for i in range(10)]  # absent: created on the importing node (ASK)
        claims = await store.claim(done + fresh + others, "b", 60_000)
        assert [c.status for c in claims] == [ClaimStatus.DONE] * 40 + [ClaimStatus.NEW] * 10 + [
            ClaimStatus.DONE
        ] * 60
        assert await store.complete(fresh, "b", DAY) == [False] * 10
        target_keys = target.cli("CLUSTER", "GETKEYSINSLOT", str(slot), "100").split()
        assert f"mv:k:{fresh[0]}" in target_keys  # created on the importing node, after ASKING
        assert f"mv:k:{fresh[0]}" not in source.cli("CLUSTER", "GETKEYSINSLOT", str(slot), "100").split()

        rest = source.cli("CLUSTER", "GETKEYSINSLOT", str(slot), "100").split()
        source.cli("MIGRATE", "127.0.0.1", str(target.port), "", "0", "5000", "KEYS", *rest)
        for master in cluster.masters():
            master.cli("CLUSTER", "SETSLOT", str(slot), "NODE", ids[target.address])
        claims = await store.claim(done + fresh + others, "c", 60_000)  # the slot map is stale: MOVED
        assert [c.status for c in claims] == [ClaimStatus.DONE] * 110
        assert cluster.node_of_slot(slot) is target
        await store.close()


async def test_sentinels_with_their_own_password_and_tls(
    redis_sentinel_secured: services.RedisSentinelSet, make_store: MakeStore
) -> None:
    """Sentinels that ask for a password of their own and speak TLS only, like the nodes they
    watch: the store finds the primary with store.redis_sentinel_password, and without it the
    error names that setting."""
    s = redis_sentinel_secured
    assert s.url.startswith("rediss+sentinel://")
    ca = str(s.servers[0].tls.ca) if s.servers[0].tls else None
    store = make_store(
        s.url, prefix=unique("sent"), tls_ca_file=ca, sentinel_auth=SentinelAuth(password=SENTINEL_PASSWORD)
    )
    await store.ping()
    [claim] = await store.claim(["k"], "me", 10_000)
    assert claim.status is ClaimStatus.NEW
    assert store.shape == "sentinel"
    bare = make_store(s.url, prefix=unique("sent"), tls_ca_file=ca, timeout_s=2)
    with pytest.raises(StoreUnavailable, match=r"store\.redis_sentinel_password"):
        await bare.ping()
    plain = make_store(
        s.url,
        prefix=unique("sent"),
        tls_ca_file=ca,
        timeout_s=2,
        sentinel_auth=SentinelAuth(password=SENTINEL_PASSWORD, tls=False),
    )
    with pytest.raises(StoreUnavailable, match=r"Sentinel"):
        await plain.ping()  # the Sentinels speak TLS only


async def test_a_cluster_url_with_several_seeds_starts_from_any_that_answers(
    redis_cluster: services.RedisCluster, make_store: MakeStore
) -> None:
    dead = f"127.0.0.1:{services.free_port()}"
    live = ",".join(n.address for n in redis_cluster.nodes[:2])
    store = make_store(f"redis://{dead},{live}/0", prefix=unique("seeds"))
    await store.ping()
    assert store.shape == "cluster"
    keys = [f"k{i}" for i in range(50)]
    assert {c.status for c in await store.claim(keys, "me", 10_000)} == {ClaimStatus.NEW}
    nobody = make_store(f"redis://{dead},127.0.0.1:{services.free_port()}", timeout_s=1)
    with pytest.raises(StoreUnavailable, match=r"none of the nodes in store\.redis_url"):
        await nobody.ping()
