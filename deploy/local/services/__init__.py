"""Real Apache Kafka (KRaft: one broker, or a cluster of three) and real Redis (one node, a
Cluster, or a primary behind Sentinels) on 127.0.0.1.

This is the project's own way to get real services for the demo, the integration tests, the
fault runs and the benchmarks. It needs nothing beyond the standard library, so it runs before
the virtual environment exists; the Kafka readiness probe and topic creation use confluent-kafka
when it is importable.

Usage::

    python deploy/local/services install        # fetch the broker jars and redis-server, once
    python deploy/local/services up             # start both, print their addresses, wait for Ctrl+C
    python deploy/local/services up --kafka cluster   # three brokers, replication factor 3

From Python (with ``deploy/local`` on ``sys.path``)::

    with KafkaBroker.start(workdir) as kafka, RedisServer.start(workdir) as redis:
        print(kafka.bootstrap_servers, redis.url)

The broker's jars come from Maven Central through ``deploy/local/kafka/pom.xml`` and are cached in
``$DEDUP_CACHE_DIR`` (default ``~/.cache/kafka-dedup-sidecar``); Redis comes from Debian's
``redis-server`` package. Every process binds to 127.0.0.1 on ports chosen free at start.

The modules, each one server shape or one concern, import only downward:
``install`` (what to run) <- ``processes`` (ports, spawning, the watchdog) <- ``kafka_broker``,
``kafka_cluster``, ``tls``, ``redis_node``, ``redis_cluster``, ``redis_sentinel`` <- ``shapes``
(by name, and ``running``) <- ``cli``. Nothing here imports the sidecar.
"""

from __future__ import annotations

from .install import kafka_version, promtool_binary
from .kafka_broker import KafkaBroker
from .kafka_cluster import KafkaCluster, KafkaShape, ScramListener
from .processes import free_port, port_block
from .redis_cluster import RedisCluster
from .redis_node import RedisServer
from .redis_sentinel import RedisSentinelSet
from .shapes import RedisShape, add_redis_shape_argument, running, running_shapes, start_redis
from .tls import TlsFiles

__all__ = [
    "KafkaBroker",
    "KafkaCluster",
    "KafkaShape",
    "RedisCluster",
    "RedisSentinelSet",
    "RedisServer",
    "RedisShape",
    "ScramListener",
    "TlsFiles",
    "add_redis_shape_argument",
    "free_port",
    "kafka_version",
    "port_block",
    "promtool_binary",
    "running",
    "running_shapes",
    "start_redis",
]
