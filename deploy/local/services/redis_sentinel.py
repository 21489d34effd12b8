"""A Redis primary with replicas behind three Sentinels."""

from __future__ import annotations

import contextlib
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .install import redis_server_binary
from .processes import free_port, spawn, wait_port, wait_until
from .redis_node import RedisServer
from .tls import TlsFiles


@dataclass
class RedisSentinelSet:
    """A primary with ``replicas`` replicas, watched by three Sentinels (quorum 2), on 127.0.0.1.

    Its URL, ``redis+sentinel://host:port,host:port,host:port/<master name>/0``, names the
    Sentinels; the store asks them where the primary is, and follows a failover.
    """

    servers: list[RedisServer]  # the primary first, as started; roles change on failover
    sentinels: list[RedisServer]
    master_name: str = "dedup"

    @property
    def url(self) -> str:
        hosts = ",".join(s.address for s in self.sentinels)
        scheme = "rediss+sentinel" if self.servers and self.servers[0].tls else "redis+sentinel"
        return f"{scheme}://{hosts}/{self.master_name}/0"

    @classmethod
    def start(
        cls,
        workdir: Path,
        replicas: int = 2,
        appendonly: str = "everysec",
        down_after_ms: int = 1000,
        sentinel_password: str | None = None,
        tls: TlsFiles | None = None,
    ) -> RedisSentinelSet:
        """``sentinel_password``: the Sentinels ask their clients (and each other) for it.
        ``tls``: every node and every Sentinel speaks TLS only, replication included."""
        s = cls([], [])
        # Nodes and Sentinels reach each other over TLS too; they present the server certificate
        # as a client one, which is not made for that: they do not ask their peers for one.
        tls_replication = ["--tls-replication", "yes", "--tls-auth-clients", "no"] if tls else []
        try:
            primary = RedisServer.start(
                workdir / "primary", appendonly=appendonly, tls=tls, extra_args=tls_replication
            )
            s.servers.append(primary)
            for i in range(replicas):
                s.servers.append(
                    RedisServer.start(
                        workdir / f"replica{i}",
                        appendonly=appendonly,
                        extra_args=["--replicaof", "127.0.0.1", str(primary.port), *tls_replication],
                        tls=tls,
                    )
                )
            for i in range(3):
                d = workdir / f"sentinel{i}"
                d.mkdir(parents=True, exist_ok=True)
                port = free_port()
                conf = d / "sentinel.conf"  # Sentinel rewrites its own file: one each, writable
                listen = f"port {port}\n"
                if tls:
                    listen = (
                        f"port 0\ntls-port {port}\ntls-cert-file {tls.server_cert}\n"
                        f"tls-key-file {tls.server_key}\ntls-ca-cert-file {tls.ca}\n"
                        "tls-auth-clients no\ntls-replication yes\n"
                    )
                auth = (
                    f"requirepass {sentinel_password}\nsentinel sentinel-pass {sentinel_password}\n"
                    if sentinel_password
                    else ""
                )
                conf.write_text(
                    f"{listen}bind 127.0.0.1\ndir {d}\nlogfile {d / 'redis.log'}\n{auth}"
                    f"sentinel monitor {s.master_name} 127.0.0.1 {primary.port} 2\n"
                    f"sentinel down-after-milliseconds {s.master_name} {down_after_ms}\n"
                    f"sentinel failover-timeout {s.master_name} 10000\n"
                    f"sentinel parallel-syncs {s.master_name} 1\n"
                )
                proc = spawn(
                    [redis_server_binary(), str(conf), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                sentinel = RedisServer(
                    proc=proc,
                    workdir=d,
                    log_path=d / "redis.log",
                    port=port,
                    tls=tls,
                    password=sentinel_password,
                )
                s.sentinels.append(sentinel)
                wait_port(port, time.monotonic() + 30, proc, "redis-sentinel")
            s.wait_ready()
        except BaseException:
            s.stop()
            raise
        return s

    def master_address(self) -> str:
        for sentinel in self.sentinels:
            if sentinel.alive():
                with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                    out = sentinel.cli("SENTINEL", "get-master-addr-by-name", self.master_name).split()
                    if len(out) == 2:
                        return f"{out[0]}:{out[1]}"
        raise RuntimeError("no Sentinel answered")

    def master(self) -> RedisServer:
        address = self.master_address()
        return next(n for n in self.servers if n.address == address)

    def wait_ready(self, timeout: float = 60) -> None:
        """Until the Sentinels agree on a live master that has all its live replicas attached."""

        def ready() -> bool:
            master = self.master()
            if not master.alive() or master.info("replication").get("role") != "master":
                return False
            others = sum(1 for n in self.servers if n.alive() and n is not master)
            attached = sum(
                "state=online" in v for k, v in master.info("replication").items() if k.startswith("slave")
            )
            seen = self.sentinels[0].cli("SENTINEL", "sentinels", self.master_name).count("name")
            return attached >= others and seen >= len(self.sentinels) - 1

        wait_until("Sentinel set ready", ready, timeout)

    def kill_master(self, timeout: float = 60) -> RedisServer:
        """kill -9 the primary and wait until the Sentinels have promoted a replica; returns the
        killed server (start it again with ``restart``: Sentinel turns it into a replica)."""
        old = self.master()
        old.kill()
        wait_until(
            f"Sentinel failover away from {old.address}",
            lambda: (
                self.master_address() != old.address and self.master().info("replication")["role"] == "master"
            ),
            timeout,
        )
        return old

    def stop(self) -> None:
        for n in [*self.sentinels, *self.servers]:
            n.stop()

    def __enter__(self) -> RedisSentinelSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
