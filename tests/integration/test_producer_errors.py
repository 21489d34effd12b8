"""The idempotent producer's hard errors, made to happen on the three-node cluster rather than
simulated: an unclean leader election gives a partition a leader that lacks the producer's last
acknowledged batches, so the producer's next sequence numbers leave a gap the broker refuses
(OUT_OF_ORDER_SEQUENCE_NUMBER, or UNKNOWN_PRODUCER_ID when the leader has no state for it).

The sidecar must come through it: every waiting caller answered, the producer usable again (a new
one when librdkafka calls the error fatal), and no key with two records in the topic.

The unclean election loses the batches only the old leader had: that is Kafka's documented price
of ``unclean.leader.election.enable`` with ``min.insync.replicas=1``, set here on the test topic
only, and it is what breaks the producer's sequence."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import services
from confluent_kafka import ElectionType, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from dedup_client import DedupClient, PublishResult
from dedup_client.results import publish_request

from tests.integration.helpers import SidecarProcess, process_env, records_per_key, unique

pytestmark = pytest.mark.integration


def wait_for(what: str, check: object, timeout: float = 60) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as exc:  # noqa: BLE001 - metadata while nodes come and go; ask again
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"{what} not reached in {timeout:.0f} s (last error: {last})")


def partition_state(
    cluster: services.KafkaCluster, topic: str, via: int | None = None
) -> tuple[int, list[int]]:
    """The partition's leader and ISR, asked of node ``via`` alone when given (the cut-off node's
    address would only time out)."""
    admin = cluster.admin() if via is None else AdminClient({"bootstrap.servers": address(cluster, via)})
    md = admin.list_topics(topic, timeout=5).topics[topic].partitions[0]
    return md.leader, list(md.isrs)


def address(cluster: services.KafkaCluster, node_id: int) -> str:
    return f"127.0.0.1:{cluster.client_ports[node_id]}"


def shrunk_to_leader(cluster: services.KafkaCluster, topic: str, leader: int) -> Callable[[], bool]:
    """A check for "the ISR is the leader alone" that also makes it happen. A follower that stops
    fetching while it has every record stays in the ISR (Kafka drops a replica for lag only once
    the leader has records it lacks), and the KRaft fencing that would drop it anyway is slower when
    the cut-off node was the active controller. So each check first writes one record to the leader
    with acks=1: the leader's log moves on and the lag rule applies within replica.lag.time.max.ms.
    Those records are lost in the unclean election, and are not counted."""
    nudger = Producer({"bootstrap.servers": address(cluster, leader), "acks": "1"})
    sent = itertools.count()

    def check() -> bool:
        nudger.produce(topic, b"", key=f"nudge-{next(sent)}".encode(), partition=0)
        nudger.flush(5)
        return partition_state(cluster, topic, via=leader)[1] == [leader]

    return check


async def publish(target: str, topic: str, keys: list[str]) -> tuple[set[str], list[str]]:
    """PublishBatch ``keys`` once; returns (acknowledged keys, error messages)."""
    async with DedupClient(target) as c:
        out = await c.publish_batch(
            [publish_request(topic, k.encode(), None, idempotency_key=k) for k in keys], 90
        )
    ok = {r.idempotency_key for r in out if isinstance(r, PublishResult)}
    return ok, [str(r) for r in out if not isinstance(r, PublishResult)]


@pytest.mark.timeout(300)
async def test_a_sequence_gap_after_an_unclean_election(
    kafka_cluster: services.KafkaCluster, tmp_path: Path
) -> None:
    cluster = kafka_cluster
    topic = unique("unclean")
    leader, follower = cluster.nodes[0].node_id, cluster.nodes[1].node_id
    admin = cluster.admin()
    config = {"unclean.leader.election.enable": "true", "min.insync.replicas": "1"}
    admin.create_topics([NewTopic(topic, 1, replica_assignment=[[leader, follower]], config=config)])[
        topic
    ].result(30)
    await asyncio.to_thread(wait_for, "a leader", lambda: partition_state(cluster, topic)[0] == leader)

    env = process_env(cluster, topic, unique("g"), None, DEDUP_PUBLISH__TIMEOUT_SECONDS="20")
    env.pop("DEDUP_KAFKA__TOPICS")  # publish-only
    env["DEDUP_STORE__SQLITE_PATH"] = str(tmp_path / "dedup.sqlite3")
    side = SidecarProcess(env, tmp_path / "sidecar.log")
    side.start()
    healed = False
    try:
        await side.wait_serving(60)
        first = [f"a-{i:03d}" for i in range(200)]
        ok, errors = await publish(side.target, topic, first)
        assert ok == set(first), errors

        # Only the leader gets the next batches: the follower is cut off and leaves the ISR.
        cluster.cut_off(follower)
        await asyncio.to_thread(wait_for, "ISR of one", shrunk_to_leader(cluster, topic, leader))
        only_leader = [f"b-{i:03d}" for i in range(200)]
        ok, errors = await publish(side.target, topic, only_leader)
        assert ok == set(only_leader), errors

        # The leader dies; the stale follower is elected uncleanly and lacks the b- batches.
        cluster.node(leader).kill()
        cluster.heal(follower)
        healed = True
        await asyncio.to_thread(
            wait_for,
            "the follower registered",
            lambda: follower in cluster.admin().list_topics(timeout=5).brokers,
        )

        def elect() -> bool:
            if partition_state(cluster, topic)[0] == follower:
                return True
            fresh = cluster.admin()  # held until answered, as every admin call here
            fresh.elect_leaders(ElectionType.UNCLEAN, [TopicPartition(topic, 0)]).result(10)
            return partition_state(cluster, topic)[0] == follower

        await asyncio.to_thread(wait_for, "an unclean election", elect, 120)

        # The producer's next sequence numbers now leave a gap at the new leader.
        after = [f"c-{i:03d}" for i in range(200)]
        ok, errors = await publish(side.target, topic, after)
        deadline = time.monotonic() + 120
        while ok != set(after) and time.monotonic() < deadline:  # what an app does: retry the rest
            await asyncio.sleep(1)
            more, errors = await publish(side.target, topic, sorted(set(after) - ok))
            ok |= more
        assert ok == set(after), errors[:3]
    finally:
        if not healed:
            cluster.heal(follower)
        log = side.log_path.read_text()
        assert side.terminate() == 0, log[-3000:]
        await asyncio.to_thread(cluster.node(leader).restart)
        await asyncio.to_thread(cluster.wait_in_sync)

    print("sidecar log, producer errors:")
    print("\n".join(line for line in log.splitlines() if "producer" in line.lower())[-3000:])
    assert "OUT_OF_ORDER_SEQUENCE_NUMBER" in log or "UNKNOWN_PRODUCER_ID" in log, "no producer error happened"
    assert "re-creating the producer after a fatal error" in log
    counts = records_per_key(cluster.bootstrap_servers, topic)
    assert [k for k, n in counts.items() if n > 1] == []
    assert all(counts[k] == 1 for k in first + after)
