"""Shared fixtures. Real services are started once per session by deploy/local/services."""

from __future__ import annotations

import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


# deploy/local/services is a package users run as a command; tests import it.
sys.path.insert(0, str(ROOT / "deploy" / "local"))
import certs  # noqa: E402
import services  # noqa: E402


def stale_compiled_modules() -> list[str]:
    """Compiled modules (setup.py) older than their source. Python imports a compiled module
    ahead of its source, so after an edit the tests would run the code as it was."""
    stale = []
    for so in (ROOT / "sidecar").rglob("*.so"):
        stem = so.name.split(".")[0]
        for source in (so.with_name(stem + ".py"), so.with_name(stem + ".c")):
            if source.exists() and source.stat().st_mtime > so.stat().st_mtime:
                stale.append(str(source.relative_to(ROOT)))
    return stale


def pytest_sessionstart(session: pytest.Session) -> None:
    stale = stale_compiled_modules()
    if stale:
        pytest.exit(
            f"changed since they were compiled: {', '.join(stale)}. Rebuild with scripts/bootstrap.sh",
            returncode=4,
        )


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM (a CI runner stopping the job) ends the run as Ctrl+C does, so the session's
    fixtures stop the brokers and redis-servers they started instead of leaving them behind."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


@pytest.fixture(scope="session")
def services_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="dedup-tests-") as d:
        yield Path(d)


@pytest.fixture(scope="session")
def redis_server(services_dir: Path) -> Iterator[services.RedisServer]:
    with services.RedisServer.start(services_dir / "redis", appendonly="everysec") as server:
        yield server


@pytest.fixture(scope="session")
def kafka(services_dir: Path) -> Iterator[services.KafkaBroker]:
    with services.KafkaBroker.start(services_dir / "kafka") as broker:
        yield broker


@pytest.fixture(scope="session")
def kafka_scram(services_dir: Path) -> services.ScramListener:
    """The SASL_SSL listener of ``kafka_cluster``: its CA, keystore and SCRAM user."""
    return services.ScramListener.make(services_dir / "kafka-tls", username="sidecar")


@pytest.fixture(scope="session")
def kafka_cluster(services_dir: Path, kafka_scram: services.ScramListener) -> Iterator[services.KafkaCluster]:
    """Three KRaft nodes, replication factor 3 and min.insync.replicas 2, every link through a
    fault proxy (``cut_off``), and a SASL_SSL listener with SCRAM-SHA-512 (``kafka_scram``)."""
    with services.KafkaCluster.start(
        services_dir / "kafka-cluster", partitionable=True, scram=kafka_scram
    ) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_cluster(services_dir: Path) -> Iterator[services.RedisCluster]:
    """Three masters, each with one replica: a real Redis Cluster."""
    with services.RedisCluster.start(services_dir / "redis-cluster") as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_sentinel(services_dir: Path) -> Iterator[services.RedisSentinelSet]:
    """A primary with two replicas, watched by three Sentinels."""
    with services.RedisSentinelSet.start(services_dir / "redis-sentinel") as sentinel_set:
        yield sentinel_set


#: The password the secured Sentinels ask for.
SENTINEL_PASSWORD = "s3ntinel-pass"


@pytest.fixture(scope="session")
def redis_sentinel_secured(services_dir: Path) -> Iterator[services.RedisSentinelSet]:
    """A primary and a replica, every node and Sentinel speaking TLS only, and Sentinels that ask
    for a password of their own (SENTINEL_PASSWORD)."""
    tls = services.TlsFiles.generate(services_dir / "tls-sentinel")
    with services.RedisSentinelSet.start(
        services_dir / "redis-sentinel-secured", replicas=1, sentinel_password=SENTINEL_PASSWORD, tls=tls
    ) as sentinel_set:
        yield sentinel_set


#: The store's ACL user in the tests: the documented command list, keys under the ``acl-`` prefix.
ACL_USER, ACL_PASSWORD, ACL_PREFIX = "dedup", "s3cret-acl", "acl-"


@pytest.fixture(scope="session")
def redis_tls(services_dir: Path) -> Iterator[services.RedisServer]:
    """A Redis that speaks TLS only, with the store's least-privilege ACL user created."""
    from sidecar.store.redis_connect import acl_setuser

    tls = services.TlsFiles.generate(services_dir / "tls")
    with services.RedisServer.start(services_dir / "redis-tls", appendonly="everysec", tls=tls) as server:
        server.cli(*acl_setuser(ACL_USER, ACL_PASSWORD, ACL_PREFIX + "*"))
        yield server


@pytest.fixture(scope="session")
def test_ca(services_dir: Path) -> certs.CertificateAuthority:
    """A throwaway CA (deploy/local/certs.py), with a server certificate for localhost and
    127.0.0.1 as ``server`` and client certificates issued by tests."""
    ca = certs.CertificateAuthority(services_dir / "app-tls")  # not "tls": the Redis files live there
    ca.server()
    return ca
