"""The command line: ``python deploy/local/services install|up``."""

from __future__ import annotations

import argparse
import signal
import sys

from .install import (
    kafka_lib_dir,
    log,
    openssl_binary,
    promtool_binary,
    redis_cli_binary,
    redis_server_binary,
)
from .processes import run_watchdog
from .shapes import add_redis_shape_argument, running_shapes


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["_watchdog"]:  # started by _Watchdog, not by a person: not in the help
        return run_watchdog()
    parser = argparse.ArgumentParser(description="Start a real Apache Kafka and a real Redis on 127.0.0.1.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("install", help="fetch the broker jars and redis-server (cached)")
    up = sub.add_parser("up", help="start Kafka and Redis until interrupted")
    up.add_argument("--topic", action="append", default=[], help="NAME[:PARTITIONS] to create")
    up.add_argument(
        "--kafka",
        choices=("single", "cluster"),
        default="single",
        help="one broker, or a cluster of three KRaft nodes with replication factor 3 and "
        "min.insync.replicas 2",
    )
    add_redis_shape_argument(up)
    args = parser.parse_args(argv)
    if args.cmd == "install":
        log(f"kafka jars: {kafka_lib_dir()}")
        log(f"redis-server: {redis_server_binary()}, redis-cli: {redis_cli_binary()}")
        log(f"openssl: {openssl_binary()}")
        log(f"promtool: {promtool_binary()}")
        return 0
    stop_on_signals()
    try:
        with running_shapes(redis_shape=args.redis, kafka_shape=args.kafka) as (kafka, redis):
            for spec in args.topic:
                name, _, parts = spec.partition(":")
                kafka.create_topic(name, int(parts or 1))
            print(f"KAFKA_BOOTSTRAP={kafka.bootstrap_servers}\nREDIS_URL={redis.url}", flush=True)
            while True:
                signal.pause()
    except Stopped as stopped:
        log(f"signal {stopped.signum}: stopped every service")
    return 0


class Stopped(BaseException):
    """Raised in the main thread by SIGINT or SIGTERM, so every ``with`` stops what it started."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def stop_on_signals() -> None:
    """Make SIGINT and SIGTERM unwind the main thread (raising Stopped), however the process was
    started: a background job ignores SIGINT, and SIGTERM would end it at once, in both cases
    leaving its broker and redis-servers (each in its own session) running. Children get the
    default handlers back when they start (a caught signal is reset by exec)."""

    def stop(signum: int, frame: object) -> None:
        raise Stopped(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
