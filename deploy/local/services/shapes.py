"""The shapes the tests, the demo and the benchmarks ask for by name, and ``running``: Kafka and
Redis together for the length of a ``with``."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .install import log
from .kafka_broker import KafkaBroker
from .kafka_cluster import KafkaCluster, KafkaShape
from .redis_cluster import RedisCluster
from .redis_node import RedisServer
from .redis_sentinel import RedisSentinelSet

RedisShape = RedisServer | RedisCluster | RedisSentinelSet
REDIS_SHAPES = ("single", "cluster", "sentinel")


def add_redis_shape_argument(parser: argparse.ArgumentParser) -> None:
    """``--redis single|cluster|sentinel``, for the commands that start Redis."""
    parser.add_argument(
        "--redis",
        choices=REDIS_SHAPES,
        default="single",
        help="the Redis shape: one node; a Cluster of 3 masters with a replica each; or a primary "
        "with 2 replicas behind 3 Sentinels (its URL is a redis+sentinel:// URL)",
    )


def start_redis(workdir: Path, shape: str = "single", appendonly: str = "everysec") -> RedisShape:
    """Start Redis in ``shape``: ``single``, ``cluster`` (3 masters with a replica each) or
    ``sentinel`` (a primary with 2 replicas behind 3 Sentinels). Each has ``.url`` and ``.stop()``."""
    if shape == "cluster":
        return RedisCluster.start(workdir, appendonly=appendonly)
    if shape == "sentinel":
        return RedisSentinelSet.start(workdir, appendonly=appendonly)
    if shape == "single":
        return RedisServer.start(workdir, appendonly=appendonly)
    raise ValueError(f"unknown Redis shape {shape!r}: single, cluster or sentinel")


@contextlib.contextmanager
def running(
    workdir: Path | None = None, quick_start: bool = True, redis_shape: str = "single"
) -> Iterator[tuple[KafkaBroker, RedisShape]]:
    """Start Kafka and Redis in a temporary directory; stop both and remove it on exit.

    ``quick_start``: see KafkaBroker.start. ``redis_shape``: see start_redis."""
    with running_shapes(workdir, quick_start, redis_shape, "single") as (kafka, redis):
        assert isinstance(kafka, KafkaBroker)
        yield kafka, redis


@contextlib.contextmanager
def running_shapes(
    workdir: Path | None = None,
    quick_start: bool = True,
    redis_shape: str = "single",
    kafka_shape: str = "single",
) -> Iterator[tuple[KafkaShape, RedisShape]]:
    """As ``running``, with ``kafka_shape`` "single" (one broker) or "cluster" (KafkaCluster)."""
    base = Path(tempfile.mkdtemp(prefix="dedup-services-")) if workdir is None else workdir
    redis: RedisShape | None = None
    try:
        t0 = time.monotonic()
        appendonly = "no" if redis_shape == "single" else "everysec"
        redis = start_redis(base / "redis", redis_shape, appendonly)
        kafka: KafkaShape = (
            KafkaCluster.start(base / "kafka", quick_start=quick_start)
            if kafka_shape == "cluster"
            else KafkaBroker.start(base / "kafka", quick_start=quick_start)
        )
        with kafka:
            log(f"kafka {kafka.bootstrap_servers} and {redis.url} ready in {time.monotonic() - t0:.1f}s")
            yield kafka, redis
    finally:
        if redis is not None:
            redis.stop()
        if workdir is None:
            shutil.rmtree(base, ignore_errors=True)
