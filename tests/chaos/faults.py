"""The faults F2 to F10, each injected on this machine by the harness itself."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable

import services

from tests.chaos.harness import VARIANTS, Fault, Member, Scenario


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


async def f4_zombie_sidecar(s: Scenario) -> str:
    await settle_in(s)
    pids = [s.member(v, 0).sidecar.proc.pid for v in VARIANTS]  # type: ignore[union-attr]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    await asyncio.sleep(10)  # past session.timeout.ms (6 s) and the lease (5 s + 1 s)
    for pid in pids:
        os.kill(pid, signal.SIGCONT)
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


async def f9_kill_broker(s: Scenario) -> str:
    await settle_in(s)
    s.kafka.kill()
    await asyncio.sleep(2)
    await asyncio.to_thread(s.kafka.restart)
    return "Kafka broker kill -9'd and restarted on its data"


async def f10_pause_broker(s: Scenario) -> str:
    await settle_in(s)
    s.kafka.pause()
    await asyncio.sleep(5)
    s.kafka.resume()
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
