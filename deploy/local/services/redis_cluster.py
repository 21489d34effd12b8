"""A real Redis Cluster of masters with replicas."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from .install import redis_cli_binary
from .processes import free_port, wait_until
from .redis_node import RedisServer
from .tls import TlsFiles


@dataclass
class RedisCluster:
    """A real Redis Cluster on 127.0.0.1: ``masters`` masters, each with ``replicas`` replicas.

    Built with ``redis-server --cluster-enabled yes`` and ``redis-cli --cluster create``. A failed
    master's replica is promoted after ``node_timeout_ms``; a killed node that is started again
    rejoins (as a replica of whoever took its slots).
    """

    nodes: list[RedisServer]
    workdir: Path

    @property
    def url(self) -> str:
        """A start-up node; the store learns the rest of the cluster from it."""
        return self.nodes[0].url

    @classmethod
    def start(
        cls,
        workdir: Path,
        masters: int = 3,
        replicas: int = 1,
        appendonly: str = "everysec",
        node_timeout_ms: int = 2000,
        tls: TlsFiles | None = None,
    ) -> RedisCluster:
        nodes: list[RedisServer] = []
        cluster = cls(nodes, workdir)
        try:
            for i in range(masters * (1 + replicas)):
                # A replica may take over however far behind it is (validity factor 0): a test
                # cluster must fail over, and the writes that risks losing are what WAIT is for.
                extra = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                         "--cluster-port", str(free_port()), "--cluster-node-timeout", str(node_timeout_ms),
                         "--cluster-replica-validity-factor", "0"]  # fmt: skip
                node = RedisServer.start(workdir / f"node{i}", appendonly, tls=tls, extra_args=extra)
                nodes.append(node)
            create = [redis_cli_binary(), "--cluster", "create", *(n.address for n in nodes),
                      "--cluster-replicas", str(replicas), "--cluster-yes"]  # fmt: skip
            if tls is not None:
                create[1:1] = ["--tls", "--cacert", str(tls.ca)]
            out = subprocess.run(create, capture_output=True, text=True, timeout=60)
            if out.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{out.stdout}\n{out.stderr}")
            cluster.wait_ok()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def wait_ok(self, timeout: float = 60) -> None:
        """Until every live node says cluster_state:ok and every master has its replicas in sync."""

        def ok() -> bool:
            live = [n for n in self.nodes if n.alive()]
            if not all(n.info("cluster").get("cluster_enabled") == "1" for n in live):
                return False
            states = [n.cli("CLUSTER", "INFO") for n in live]
            if not all("cluster_state:ok" in s for s in states):
                return False
            masters = {n.address for n in self.masters()}
            others = [n.info("replication") for n in live if n.address not in masters]
            if not all(r.get("role") == "slave" and r.get("master_link_status") == "up" for r in others):
                return False
            # Every node's own view (gossip) agrees that the others are replicas.
            for n in live:
                view = [line.split()[2] for line in n.cli("CLUSTER", "NODES").splitlines()]
                if sum("slave" in flags and "fail" not in flags for flags in view) < len(others):
                    return False
            return True

        wait_until("Redis Cluster state ok", ok, timeout)

    def masters(self) -> list[RedisServer]:
        """The live nodes that are masters of some slots now (read from CLUSTER NODES)."""
        live = [n for n in self.nodes if n.alive()]
        by_address = {n.address: n for n in live}
        out = []
        for line in live[0].cli("CLUSTER", "NODES").splitlines():
            fields = line.split()
            address = fields[1].split("@")[0]
            serving = "master" in fields[2] and "fail" not in fields[2] and len(fields) > 8
            if serving and address in by_address:
                out.append(by_address[address])
        return out

    def replicas_of(self, master: RedisServer) -> list[RedisServer]:
        """The live nodes replicating ``master`` now."""
        lines = [line.split() for line in master.cli("CLUSTER", "NODES").splitlines()]
        master_id = next(f[0] for f in lines if "myself" in f[2])
        addresses = {f[1].split("@")[0] for f in lines if "slave" in f[2] and f[3] == master_id}
        return [n for n in self.nodes if n.address in addresses and n.alive()]

    def node_of_slot(self, slot: int) -> RedisServer:
        live = [n for n in self.nodes if n.alive()]
        for line in live[0].cli("CLUSTER", "NODES").splitlines():
            fields = line.split()
            flags = fields[2].split(",")
            if "master" not in flags or "fail" in flags:  # "fail?" is only a suspicion: still the owner
                continue
            for part in fields[8:]:
                lo, _, hi = part.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                    address = fields[1].split("@")[0]
                    return next(n for n in self.nodes if n.address == address)
        raise RuntimeError(f"no live master owns slot {slot}")

    def kill_master(self, master: RedisServer, timeout: float = 60) -> RedisServer:
        """kill -9 a master and wait until its replica has taken its slots; returns the killed
        node (start it again with ``restart``: it rejoins as a replica)."""
        before = {n.address for n in self.masters()}
        master.kill()
        wait_until(
            f"a replica promoted in place of {master.address}",
            lambda: len({n.address for n in self.masters()} - before) == 1 and self._state_ok(),
            timeout,
        )
        return master

    def _state_ok(self) -> bool:
        return all("cluster_state:ok" in n.cli("CLUSTER", "INFO") for n in self.nodes if n.alive())

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def __enter__(self) -> RedisCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
