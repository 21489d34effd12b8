"""The faults, each injected on this machine by the harness itself."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import Callable

import services

from tests.chaos.harness import VARIANTS, Fault, Member, Scenario
from tests.integration.helpers import SidecarProcess


async def settle_in(s: Scenario, seconds: float = 1.5) -> None:
    """Let consumption start before the fault hits."""
    await asyncio.sleep(seconds)


async def f2_kill_sidecar(s: Scenario) -> str:
    for _ in range(3):
        await asyncio.sleep(s.rng.uniform(0.5, 2.0))
        for v in VARIANTS:
            s.member(v, 0).sidecar.kill9()
        await asyncio.sleep(0.5)
        await asyncio.gather(*(s.restart_sidecar(s.member(v, 0)) for v in VARIANTS))
    return "sidecar 0 of each group kill -9'd 3 times at random moments, restarted at once"


async def f3_kill_app(s: Scenario) -> str:
    for _ in range(3):
        await asyncio.sleep(s.rng.uniform(0.5, 2.0))
        for v in VARIANTS:
            s.member(v, 0).kill_app()
        await asyncio.sleep(0.3)
        for v in VARIANTS:
            s.member(v, 0).start_app()
    return "app 0 of each group kill -9'd 3 times while processing, restarted"


async def f3_kill_app_after_join(s: Scenario) -> str:
    """F3 once every member holds records: a share-group member joins when its app's stream
    attaches and is given the partition at a heartbeat (5 s), so F3's first kills would hit an
    app that holds nothing yet."""
    await asyncio.sleep(6)
    return await f3_kill_app(s) + ", after 6 s (every share-group member joined)"


async def f4_zombie_sidecar(s: Scenario) -> str:
    await settle_in(s)
    zombies = [s.member(v, 0).sidecar for v in VARIANTS]
    for sidecar in zombies:
        sidecar.pause()
    await asyncio.sleep(10)  # past session.timeout.ms (6 s) and the lease (5 s + 1 s)
    for sidecar in zombies:
        sidecar.resume()
    return "sidecar 0 of each group SIGSTOPped 10 s (past session timeout and lease), then SIGCONT"


async def f5_app_stall(s: Scenario) -> str:
    return "every app stalls 7 s after each 500th delivery (ack deadline 5 s + lease margin 1 s)"


async def f6_churn(s: Scenario) -> str:
    for v in VARIANTS:
        await s.add_member(v)  # three replicas per group
    for i in range(5):
        await asyncio.sleep(2.5)
        for v in VARIANTS:
            m = s.member(v, i % 3)
            m.sidecar.kill9()
        await asyncio.sleep(0.5)
        await asyncio.gather(*(s.restart_sidecar(s.member(v, i % 3)) for v in VARIANTS))
    return "three replicas per group; one kill -9'd and restarted every ~3 s, 5 times"


async def f18_rolling_restart_sidecars(s: Scenario) -> str:
    """A rolling restart of the sidecars, as a Deployment's rollout does it: three replicas per
    group, each in turn sent SIGTERM, waited for until it exits, started again on its port, and
    the next one only once it serves. The apps ack within milliseconds, so a graceful stop that
    hands nothing over applies no key twice, even in the naive app."""
    for v in VARIANTS:
        await s.add_member(v)  # three replicas per group
    await settle_in(s)
    took: list[float] = []

    async def roll(m: Member) -> None:
        t0 = time.monotonic()
        code = await asyncio.to_thread(m.sidecar.terminate, 60)
        took.append(time.monotonic() - t0)
        assert code == 0, f"a sidecar exited with {code} on SIGTERM: {m.sidecar.log_path}"
        await s.restart_sidecar(m)

    arriving = asyncio.create_task(s.trickle(s.messages))  # records keep arriving
    began = time.time()
    try:
        for i in range(3):
            await asyncio.gather(*(roll(s.member(v, i)) for v in VARIANTS))
            await asyncio.sleep(2.0)
    finally:
        arriving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await arriving
    ended = time.time()
    failed = sum(
        "commit on revoke of" in line
        for v in VARIANTS
        for m in s.groups[v]
        for line in m.sidecar.log_path.read_text(errors="replace").splitlines()
    )
    return (
        "three replicas per group, each in turn SIGTERM'd and restarted once the last serves; stops took "
        f"{min(took):.1f}-{max(took):.1f} s; longest pause in effects during the rollout "
        f"{max(s.longest_pause(v, began, ended) for v in VARIANTS):.1f} s; {failed} failed commits on revoke"
    )


async def f17_kill_worker(s: Scenario) -> str:
    """With server.workers > 1: one worker process of sidecar 0 of each group is SIGKILLed; its
    supervisor starts it again, and the group rebalances around it."""
    for _ in range(3):
        await asyncio.sleep(s.rng.uniform(1.0, 3.0))
        for v in VARIANTS:
            workers = sorted(s.member(v, 0).sidecar.worker_pids())
            assert len(workers) > 1, "F17 needs server.workers > 1"
            os.kill(s.rng.choice(workers), signal.SIGKILL)
    return "one worker process of sidecar 0 of each group kill -9'd 3 times; its supervisor restarted it"


def one_redis(s: Scenario) -> services.RedisServer:
    assert isinstance(s.redis, services.RedisServer), "this fault needs a single Redis node"
    return s.redis


async def f7_kill_redis(s: Scenario) -> str:
    redis = one_redis(s)
    await settle_in(s)
    for _ in range(2):
        redis.kill()
        await asyncio.sleep(1.0)
        redis.restart()
        await asyncio.sleep(s.rng.uniform(1.0, 2.0))
    return "redis-server kill -9'd twice and restarted on its data"


async def f8_pause_redis(s: Scenario) -> str:
    redis = one_redis(s)
    await settle_in(s)
    redis.pause()
    t0 = time.time()
    await asyncio.sleep(4)
    t1 = time.time()
    redis.resume()
    early = [t for v in VARIANTS for t in s.ack_times(v) if t0 + 0.3 < t < t1]
    assert not early, f"{len(early)} acks confirmed while Redis was paused"
    return "redis-server SIGSTOPped 4 s; no Ack was confirmed while it was paused"


async def redis_failover(
    s: Scenario, kill: Callable[[], services.RedisServer], healed: Callable[[], None]
) -> float:
    """Kill the master under load, wait for the promotion, start the old master again (it comes
    back as a replica) and wait until the set is whole. Returns the seconds the promotion took."""
    await settle_in(s)
    t0 = time.monotonic()
    old = await asyncio.to_thread(kill)
    promoted = time.monotonic() - t0
    await asyncio.sleep(1.0)
    await asyncio.to_thread(old.restart)
    await asyncio.to_thread(healed)
    return promoted


async def f15_cluster_master_kill(s: Scenario) -> str:
    """Needs ``s.redis`` to be a RedisCluster."""
    cluster = s.redis
    assert isinstance(cluster, services.RedisCluster)
    victim = s.rng.choice(cluster.masters()[1:])  # not the start-up node the sidecars were given
    promoted = await redis_failover(s, lambda: cluster.kill_master(victim), cluster.wait_ok)
    return (
        f"a Redis Cluster master kill -9'd under load; its replica took its slots in {promoted:.1f} s; "
        "the old master restarted as a replica"
    )


async def f16_sentinel_failover(s: Scenario) -> str:
    """Needs ``s.redis`` to be a RedisSentinelSet."""
    sentinel_set = s.redis
    assert isinstance(sentinel_set, services.RedisSentinelSet)
    promoted = await redis_failover(s, sentinel_set.kill_master, sentinel_set.wait_ready)
    return (
        f"the Sentinel-watched primary kill -9'd under load; a replica was promoted in {promoted:.1f} s; "
        "the old primary restarted and was made a replica"
    )


def one_broker(s: Scenario) -> services.KafkaBroker:
    assert isinstance(s.kafka, services.KafkaBroker), "this fault needs a single broker"
    return s.kafka


async def f9_kill_broker(s: Scenario) -> str:
    broker = one_broker(s)
    await settle_in(s)
    broker.kill()
    await asyncio.sleep(2)
    await asyncio.to_thread(broker.restart)
    return "Kafka broker kill -9'd and restarted on its data"


async def f10_pause_broker(s: Scenario) -> str:
    broker = one_broker(s)
    await settle_in(s)
    broker.pause()
    await asyncio.sleep(5)
    broker.resume()
    return "Kafka broker SIGSTOPped 5 s, then SIGCONT"


async def f1_network(s: Scenario) -> str:
    """Needs ``s.proxy``: the broker advertises the proxy, so the sidecars' Kafka traffic crosses it."""
    proxy = s.proxy
    assert proxy is not None
    await settle_in(s, 0.5)
    for _ in range(3):
        proxy.set_mode("blackhole")
        await asyncio.sleep(3)
        proxy.set_mode("pass")
        await asyncio.sleep(1.5)
        proxy.set_mode("reset")
        await asyncio.sleep(0.3)
        proxy.set_mode("pass")
        await asyncio.sleep(1.5)
    return "sidecar-broker traffic blackholed 3 s and reset, 3 times, while publishing"


async def start_armed(s: Scenario, m: Member) -> None:
    """Restart a sidecar whose hook is armed. The hook may fire before the health check has seen
    it serving (a busy group reaches a point within milliseconds): that SIGKILL is the fault, and
    the loop that waits for it restarts the sidecar; any other exit is a real start-up failure."""
    try:
        await s.restart_sidecar(m)
    except RuntimeError:
        assert m.sidecar.proc is not None
        if m.sidecar.proc.returncode != -signal.SIGKILL:
            raise


def kill_point(point: str, hit: int) -> Fault:
    """F2 at a precise point: sidecar 0 of each group SIGKILLs itself the ``hit``-th time it reaches
    ``point`` (a test-only hook, sidecar/testing_hooks.py); it is restarted without the hook."""

    async def fault(s: Scenario) -> str:
        if point == "produce_before_record":
            # Armed from the start (publisher_env): the publisher's first sidecar.
            armed = [s.member("naive", 0)]
        else:
            armed = [s.member(v, 0) for v in VARIANTS]
            for m in armed:
                m.sidecar.kill9()
                m.sidecar.env = {**m.sidecar.env, "DEDUP_TESTONLY_KILL_AT": f"{point}:{hit}"}
            await asyncio.gather(*(start_armed(s, m) for m in armed))
        died = 0
        deadline = time.monotonic() + 60
        feed_at, fed = time.monotonic() + 10, 0
        pending = list(armed)
        while pending and time.monotonic() < deadline:
            if point != "produce_before_record" and time.monotonic() > feed_at:
                # A restarted sidecar may rejoin after the others took every record of the run
                # (the scenario publishes all of it at once): publish more until it reaches the point.
                await s.publish(100, start=s.messages + fed)
                feed_at, fed = time.monotonic() + 5, fed + 100
            for m in list(pending):
                assert m.sidecar.proc is not None
                if m.sidecar.proc.poll() is not None:
                    pending.remove(m)
                    died += 1
                    m.sidecar.env = {k: v for k, v in m.sidecar.env.items() if k != "DEDUP_TESTONLY_KILL_AT"}
                    await s.restart_sidecar(m)
            await asyncio.sleep(0.05)
        assert died == len(armed), f"the {point} hook fired in {died} of {len(armed)} sidecars"
        return f"sidecar SIGKILLed itself at {point} (hit {hit}), restarted"

    return fault


# --------------------------------------------------------------------------------------------
# A replicated three-node cluster (services.KafkaCluster): F11-F14.


def kafka_cluster(s: Scenario) -> services.KafkaCluster:
    assert isinstance(s.kafka, services.KafkaCluster), "this fault needs a three-node KafkaCluster"
    return s.kafka


async def busiest_leader(s: Scenario) -> tuple[int, int]:
    """The node leading the most partitions of the scenario's topic, and how many it leads."""
    leaders = await asyncio.to_thread(kafka_cluster(s).leaders, s.topic)
    node, count = Counter(leaders.values()).most_common(1)[0]
    return node, count


async def leaders_moved_off(s: Scenario, node: int, timeout: float = 60) -> float:
    """Seconds until every partition of the topic has a leader other than ``node``."""
    cluster = kafka_cluster(s)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            leaders = await asyncio.to_thread(cluster.leaders, s.topic)
            if all(n not in (-1, node) for n in leaders.values()):
                return time.monotonic() - t0
        except Exception:  # noqa: BLE001 - metadata from a node that is going away; ask again
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError(f"partitions of {s.topic} still led by node {node} after {timeout:.0f} s")


async def restart_in_sync(cluster: services.KafkaCluster, node: int) -> float:
    """Start a killed node again after 2 s; returns the seconds until every replica was in sync."""
    await asyncio.sleep(2)
    await asyncio.to_thread(cluster.node(node).restart)
    return await asyncio.to_thread(cluster.wait_in_sync)


async def f11_leader_kill(s: Scenario) -> str:
    cluster = kafka_cluster(s)
    await settle_in(s)
    victim, led = await busiest_leader(s)
    cluster.node(victim).kill()
    moved = await leaders_moved_off(s, victim)
    synced = await restart_in_sync(cluster, victim)
    return (
        f"node {victim}, leader of {led} of the 6 partitions, kill -9'd under load: every partition had "
        f"a new leader in {moved:.1f} s; restarted, all replicas in sync {synced:.1f} s later"
    )


async def f12_rolling_restart(s: Scenario) -> str:
    cluster = kafka_cluster(s)
    await settle_in(s)
    took = []
    for node in cluster.nodes:
        t0 = time.monotonic()
        await asyncio.to_thread(node.stop)  # SIGTERM: a controlled shutdown moves its leaders first
        await asyncio.to_thread(node.restart)
        await asyncio.to_thread(cluster.wait_in_sync)
        took.append(time.monotonic() - t0)
    return (
        "rolling restart under load: each node stopped (controlled shutdown), restarted, and the next "
        f"one only once every replica was in sync ({', '.join(f'{t:.0f}' for t in took)} s per node)"
    )


async def f13_cut_off_broker(s: Scenario, seconds: float = 15) -> str:
    cluster = kafka_cluster(s)
    await settle_in(s)
    victim, led = await busiest_leader(s)
    cluster.cut_off(victim)
    moved = await leaders_moved_off(s, victim)
    await asyncio.sleep(max(0.0, seconds - moved))
    cluster.heal(victim)
    synced = await asyncio.to_thread(cluster.wait_in_sync)
    return (
        f"node {victim}, leader of {led} of the 6 partitions, cut off from the other nodes and the "
        f"sidecars for {max(seconds, moved):.0f} s (past the 6 s broker session and 8 s replica lag): new "
        f"leaders in {moved:.1f} s; healed, all replicas in sync {synced:.1f} s later"
    )


async def f14_coordinator_kill(s: Scenario) -> str:
    cluster = kafka_cluster(s)
    await settle_in(s)
    group = f"{s.topic}-naive"
    victim = await asyncio.to_thread(cluster.coordinator_of, group)
    joining = []
    for v in VARIANTS:  # a third member in each group: both rebalance
        first = s.member(v, 0)
        m = Member(
            SidecarProcess(first.sidecar.env, s.workdir / f"{s.name}-{v}-{len(s.groups[v])}.sidecar.log"),
            first.ledger,
            v,
            first.app_args,
        )
        s.groups[v].append(m)
        m.sidecar.start()
        joining.append(m)
    await asyncio.sleep(2.0)  # the new members join: the groups are rebalancing
    cluster.node(victim).kill()
    t0 = time.monotonic()
    await asyncio.gather(*(m.sidecar.wait_serving(90) for m in joining))
    for m in joining:
        m.start_app()
    after = -1
    while after in (-1, victim) and time.monotonic() - t0 < 60:
        try:
            after = await asyncio.to_thread(cluster.coordinator_of, group)
        except Exception:  # noqa: BLE001 - no coordinator yet; ask again
            await asyncio.sleep(0.2)
    found = time.monotonic() - t0
    synced = await restart_in_sync(cluster, victim)
    return (
        f"node {victim}, coordinator of the naive group, kill -9'd while a third member joined each group: "
        f"the group was coordinated by node {after} {found:.1f} s later; restarted, replicas in sync "
        f"{synced:.1f} s later"
    )
