"""A KRaft cluster of three nodes, optionally partitionable through fault proxies and with a
SASL_SSL (SCRAM) listener."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .install import log
from .kafka_broker import (
    KafkaBroker,
    broker_jvm,
    create_topic_on,
    format_node,
    new_cluster_id,
    spawn_node,
    wait_brokers,
)
from .processes import free_port, wait_port, wait_until

#: Partitions of a KafkaCluster's __consumer_offsets (few: every one has three replicas to sync).
OFFSETS_PARTITIONS = 3


@dataclass(frozen=True)
class ScramListener:
    """A SASL_SSL listener with SCRAM-SHA-512 on every node of a KafkaCluster: the nodes' PEM
    key and certificate (one file, as Kafka's PEM keystore wants it) and the user to create."""

    ca_file: Path
    keystore: Path
    username: str
    password: str

    @classmethod
    def make(cls, directory: Path, username: str = "sidecar", password: str | None = None) -> ScramListener:
        """A test CA and a certificate for 127.0.0.1 and localhost (openssl), and a random password."""
        from certs import CertificateAuthority

        ca = CertificateAuthority(directory)
        issued = ca.server("kafka")
        keystore = directory / "kafka-keystore.pem"
        keystore.write_text(issued.key.read_text() + issued.cert.read_text())
        keystore.chmod(0o600)
        return cls(ca.cert, keystore, username, password or uuid.uuid4().hex)


class KafkaCluster:
    """Three (``size``) KRaft nodes on 127.0.0.1, each a combined broker and controller, with
    replication factor 3 and ``min.insync.replicas`` 2 for new topics and the internal ones.

    ``partitionable``: every link between two nodes (broker replication and the controller
    quorum, one link per direction) and every node's client port go through a FaultProxy, so
    ``cut_off(node)`` isolates one node from the others and from clients at once. Each node uses
    a replication listener of its own (``inter.broker.listener.name`` = FROM<id>) that the other
    nodes advertise through the proxy for that direction.

    ``scram``: also a SASL_SSL listener (SCRAM-SHA-512) on each node; ``secure_bootstrap_servers``.
    """

    def __init__(self, workdir: Path, nodes: list[KafkaBroker], client_ports: dict[int, int]) -> None:
        self.workdir = workdir
        self.nodes = nodes
        self.client_ports = client_ports  # node id -> the port clients are told (a proxy's, or its own)
        self.secure_ports: dict[int, int] = {}
        self.proxies: Any = None  # faultproxy.ProxyThread when partitionable
        self.links: dict[tuple[str, int, int], Any] = {}  # (kind, from id or 0 for clients, to id)

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(f"127.0.0.1:{self.client_ports[n.node_id]}" for n in self.nodes)

    @property
    def secure_bootstrap_servers(self) -> str:
        return ",".join(f"127.0.0.1:{self.secure_ports[n.node_id]}" for n in self.nodes)

    @classmethod
    def start(
        cls,
        workdir: Path,
        size: int = 3,
        partitionable: bool = False,
        scram: ScramListener | None = None,
        extra_properties: dict[str, str] | None = None,
        quick_start: bool = True,
        timeout: float = 120.0,
    ) -> KafkaCluster:
        workdir.mkdir(parents=True, exist_ok=True)
        ids = list(range(1, size + 1))
        client = {i: free_port() for i in ids}
        controller = {i: free_port() for i in ids}
        secure = {i: free_port() for i in ids} if scram else {}
        # from_port[(src, dst)]: dst's listener for replication fetches from src.
        from_port = {(a, b): free_port() for a in ids for b in ids}
        hub = None
        advertised_client = dict(client)
        # What src dials to reach dst: through a proxy per direction, or directly.
        reach_replica = {(a, b): from_port[(a, b)] for a in ids for b in ids}
        reach_controller = {(a, b): controller[b] for a in ids for b in ids}
        links: dict[tuple[str, int, int], Any] = {}
        if partitionable:
            from faultproxy import ProxyThread

            hub = ProxyThread()
            for i in ids:
                advertised_client[i] = free_port()
                links[("client", 0, i)] = hub.add(advertised_client[i], client[i])
            for a in ids:
                for b in ids:
                    if a == b:
                        continue
                    reach_replica[(a, b)] = free_port()
                    links[("replica", a, b)] = hub.add(reach_replica[(a, b)], from_port[(a, b)])
                    reach_controller[(a, b)] = free_port()
                    links[("controller", a, b)] = hub.add(reach_controller[(a, b)], controller[b])
        rf = str(min(size, 3))
        isr = str(min(size - 1, 2)) if size > 1 else "1"
        cluster_id = new_cluster_id()
        nodes: list[KafkaBroker] = []
        try:
            for i in ids:
                names = [f"FROM{a}" for a in ids]
                listeners = [f"CLIENT://127.0.0.1:{client[i]}", f"CONTROLLER://127.0.0.1:{controller[i]}"]
                listeners += [f"FROM{a}://127.0.0.1:{from_port[(a, i)]}" for a in ids]
                advertised = [f"CLIENT://127.0.0.1:{advertised_client[i]}"]
                advertised += [f"FROM{a}://127.0.0.1:{reach_replica[(a, i)]}" for a in ids]
                protocols = ["CLIENT:PLAINTEXT", "CONTROLLER:PLAINTEXT", *(f"{n}:PLAINTEXT" for n in names)]
                props = {
                    "process.roles": "broker,controller",
                    "node.id": str(i),
                    "controller.quorum.voters": ",".join(
                        f"{b}@127.0.0.1:{reach_controller[(i, b)]}" for b in ids
                    ),
                    "controller.listener.names": "CONTROLLER",
                    "inter.broker.listener.name": f"FROM{i}",
                    "log.dirs": str(workdir / f"node{i}" / "data"),
                    "num.partitions": "1",
                    "default.replication.factor": rf,
                    "min.insync.replicas": isr,
                    "offsets.topic.replication.factor": rf,
                    "offsets.topic.num.partitions": str(OFFSETS_PARTITIONS),
                    "transaction.state.log.replication.factor": rf,
                    "transaction.state.log.min.isr": isr,
                    "share.coordinator.state.topic.replication.factor": rf,
                    "share.coordinator.state.topic.min.isr": isr,
                    "group.initial.rebalance.delay.ms": "0",
                    "auto.create.topics.enable": "false",
                    "unclean.leader.election.enable": "false",
                    # Faults end sooner: a cut-off follower leaves the ISR after 8 s, a silent
                    # broker is fenced by the controller after 6 s.
                    "replica.lag.time.max.ms": "8000",
                    "broker.session.timeout.ms": "6000",
                    "broker.heartbeat.interval.ms": "1000",
                    "log.flush.interval.messages": "9223372036854775807",
                }
                if scram:
                    listeners.append(f"SECURE://127.0.0.1:{secure[i]}")
                    advertised.append(f"SECURE://127.0.0.1:{secure[i]}")
                    protocols.append("SECURE:SASL_SSL")
                    props.update(
                        {
                            "sasl.enabled.mechanisms": "SCRAM-SHA-512",
                            "listener.name.secure.sasl.enabled.mechanisms": "SCRAM-SHA-512",
                            "listener.name.secure.scram-sha-512.sasl.jaas.config": (
                                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
                            ),
                            "listener.name.secure.ssl.keystore.type": "PEM",
                            "listener.name.secure.ssl.keystore.location": str(scram.keystore),
                        }
                    )
                props["listeners"] = ",".join(listeners)
                props["advertised.listeners"] = ",".join(advertised)
                props["listener.security.protocol.map"] = ",".join(protocols)
                props.update(extra_properties or {})
                nodedir = workdir / f"node{i}"
                nodedir.mkdir(parents=True, exist_ok=True)
                jvm = broker_jvm(nodedir, quick_start, heap="2g")
                config = format_node(jvm, nodedir, props, cluster_id)
                nodes.append(
                    KafkaBroker(
                        proc=spawn_node(jvm, nodedir, config),
                        workdir=nodedir,
                        log_path=nodedir / "server.log",
                        port=client[i],
                        controller_port=controller[i],
                        node_id=i,
                        cluster_size=size,
                    )
                )
            deadline = time.monotonic() + timeout
            for n in nodes:
                wait_port(n.port, deadline, n.proc, f"Kafka node {n.node_id}")
            cluster = cls(workdir, nodes, advertised_client)
            cluster.secure_ports = secure
            cluster.proxies, cluster.links = hub, links
            wait_brokers(cluster.bootstrap_servers, size, deadline)
            if scram:
                cluster.add_scram_user(scram.username, scram.password)
        except BaseException:
            for n in nodes:
                log(f"node {n.node_id}:\n{n.log_tail(15)}")
                n.stop()
            if hub is not None:
                hub.stop()
            raise
        log(f"Kafka cluster of {size} nodes at {cluster.bootstrap_servers}")
        return cluster

    def add_scram_user(self, username: str, password: str) -> None:
        """Create (or update) a SCRAM-SHA-512 user with Kafka's own admin tool (kafka-configs)."""
        jvm = broker_jvm(self.workdir, True)
        done = subprocess.run(
            [
                *jvm,
                "kafka.admin.ConfigCommand",
                "--bootstrap-server",
                f"127.0.0.1:{self.nodes[0].port}",
                "--alter",
                "--add-config",
                f"SCRAM-SHA-512=[iterations=8192,password={password}]",
                "--entity-type",
                "users",
                "--entity-name",
                username,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"kafka-configs could not create SCRAM user {username}:\n{done.stderr}")

    def node(self, node_id: int) -> KafkaBroker:
        return next(n for n in self.nodes if n.node_id == node_id)

    def admin(self) -> Any:
        from confluent_kafka.admin import AdminClient

        return AdminClient({"bootstrap.servers": self.bootstrap_servers})

    def create_topic(
        self,
        name: str,
        partitions: int = 1,
        config: dict[str, str] | None = None,
        replication_factor: int = 3,
    ) -> None:
        create_topic_on(
            self.bootstrap_servers, name, partitions, min(replication_factor, len(self.nodes)), config
        )

    def leaders(self, topic: str) -> dict[int, int]:
        """Partition -> the node id leading it (-1: none now)."""
        md = self.admin().list_topics(topic, timeout=10).topics[topic]
        return {p: m.leader for p, m in md.partitions.items()}

    def coordinator_of(self, group: str) -> int:
        """The node id of ``group``'s coordinator (-1: none now): the leader of the
        __consumer_offsets partition the group hashes to, as Kafka places it. Read from metadata,
        not with DescribeGroups: librdkafka aborts the process when a DescribeGroups request to a
        dead coordinator times out (librdkafka issue 4605, an assertion on eonce->refcnt)."""
        h = 0
        for unit in group.encode("utf-16-be").hex(" ", 2).split():  # Java's String.hashCode
            h = (31 * h + int(unit, 16)) & 0xFFFFFFFF
        signed = h - (1 << 32) if h & 0x80000000 else h
        partition = (0 if signed == -(1 << 31) else abs(signed)) % OFFSETS_PARTITIONS  # Kafka's Utils.abs
        return self.leaders("__consumer_offsets").get(partition, -1)

    def under_replicated(self, topics: list[str] | None = None) -> int:
        """Partitions (of ``topics``, default all, internal ones included) whose ISR is short of
        their replicas, or that have no leader."""
        md = self.admin().list_topics(timeout=10)
        short = 0
        for name, t in md.topics.items():
            if topics is not None and name not in topics:
                continue
            short += sum(1 for p in t.partitions.values() if p.leader < 0 or len(p.isrs) < len(p.replicas))
        return short

    def wait_in_sync(self, topics: list[str] | None = None, timeout: float = 120.0) -> float:
        """Wait until every replica of ``topics`` is in sync again; returns the seconds it took."""
        t0 = time.monotonic()
        wait_until(
            "the cluster's replicas to be in sync", lambda: self.under_replicated(topics) == 0, timeout
        )
        return time.monotonic() - t0

    def cut_off(self, node_id: int, mode: str = "blackhole") -> None:
        """Isolate a node (partitionable clusters): nothing reaches it, nothing from it arrives."""
        self._set_links(node_id, mode)

    def heal(self, node_id: int) -> None:
        self._set_links(node_id, "pass")

    def _set_links(self, node_id: int, mode: str) -> None:
        if self.proxies is None:
            raise RuntimeError("this cluster was started without partitionable=True")
        for (_, src, dst), proxy in self.links.items():
            if node_id in (src, dst):
                self.proxies.set_mode(proxy, mode)

    def stop(self) -> None:
        """Stop every node at once (one by one, each would wait on the others' controlled shutdown)."""
        for n in self.nodes:
            if n.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(n.proc.pid, signal.SIGCONT)
                n.proc.terminate()
        deadline = time.monotonic() + 15
        for n in self.nodes:
            try:
                n.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                n.kill()
        if self.proxies is not None:
            self.proxies.stop()
            self.proxies = None

    def __enter__(self) -> KafkaCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


KafkaShape = KafkaBroker | KafkaCluster
