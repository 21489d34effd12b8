"""``dedup-sidecar``: the thin entry point. Parses flags, loads settings, runs the Sidecar."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import sys
from collections.abc import Coroutine
from typing import Any

from pydantic import ValidationError

from sidecar import __version__, config
from sidecar.errors import SidecarError
from sidecar.observability import logs
from sidecar.process import admin_cli, build, workers


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dedup-sidecar",
        description="Stream de-duplicated Kafka records to a local app over gRPC; commit only after Ack.",
        epilog="Settings come from defaults < --config FILE (or DEDUP_CONFIG) < DEDUP_* environment < flags. "
        "See deploy/sidecar.example.toml. Against a running sidecar: 'dedup-sidecar status' and "
        "'dedup-sidecar key TOPIC KEY' (each with --help).",
    )
    p.add_argument("--config", help="TOML settings file")
    p.add_argument("--bootstrap-servers", help="kafka.bootstrap_servers")
    p.add_argument("--group-id", help="kafka.group_id")
    p.add_argument("--topic", action="append", dest="topics", help="kafka.topics (repeatable)")
    p.add_argument("--store", choices=["memory", "sqlite", "redis"], help="store.backend")
    p.add_argument("--redis-url", help="store.redis_url")
    p.add_argument("--sqlite-path", help="store.sqlite_path")
    p.add_argument("--listen", help="server.listen (HOST:PORT)")
    p.add_argument("--metrics-listen", help="server.metrics_listen (HOST:PORT, empty to disable)")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--log-format", choices=["text", "json"], help="log_format: one JSON object per line")
    p.add_argument(
        "--print-config", action="store_true", help="print the effective settings as JSON and exit"
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__} ({build.describe()})")
    p.add_argument("--testonly-fault-hooks", action="store_true", help=argparse.SUPPRESS)
    # Set by the supervisor of server.workers on the processes it starts (sidecar/process/workers.py).
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-plan", help=argparse.SUPPRESS)
    return p


def _overrides(a: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, dict[str, Any]] = {"kafka": {}, "store": {}, "server": {}}
    pairs = [
        ("kafka", "bootstrap_servers", a.bootstrap_servers),
        ("kafka", "group_id", a.group_id),
        ("kafka", "topics", a.topics),
        ("store", "backend", a.store),
        ("store", "redis_url", a.redis_url),
        ("store", "sqlite_path", a.sqlite_path),
        ("server", "listen", a.listen),
        ("server", "metrics_listen", a.metrics_listen),
    ]
    for section, key, value in pairs:
        if value is not None:
            out[section][key] = value
    flat: dict[str, Any] = {k: v for k, v in out.items() if v}
    if a.log_level:
        flat["log_level"] = a.log_level
    if a.log_format:
        flat["log_format"] = a.log_format
    return flat


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when it is installed (the ``uvloop`` extra), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def tune_interpreter() -> None:
    """Make the cyclic garbage collector rare, and hand the GIL over sooner.

    Every in-flight record is a handful of container objects that live for a few hundred
    milliseconds: long enough to be promoted, so with the default thresholds full collections
    walk tens of thousands of live records over and over (a quarter of the CPU in a profile of
    the engine). The sidecar's records do not form cycles that outlive them; reference counting
    frees them. Objects created at start-up are frozen out of collections altogether.

    The Kafka poll thread needs the GIL to hand each fetched batch over. With the default 5 ms
    switch interval it waits for the event loop's busy stretches, which showed as milliseconds
    of produce-to-app latency at low rates; 0.5 ms cost no measurable throughput.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    sys.setswitchinterval(0.0005)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in admin_cli.COMMANDS:
        return admin_cli.admin_main(argv)
    args = _parser().parse_args(argv)
    try:
        settings = config.load(args.config, **_overrides(args))
    except ValidationError as exc:
        print(f"dedup-sidecar: invalid settings:\n{config.describe_errors(exc)}", file=sys.stderr)
        return 2
    except SidecarError as exc:
        print(f"dedup-sidecar: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config.redacted(settings), indent=2))
        return 0
    logs.configure(settings.log_level, settings.log_format)
    worker: tuple[int, list[workers.WorkerAddresses]] | None = None
    try:
        if args.worker is not None and args.worker_plan:
            addresses = workers.decode_plan(args.worker_plan)
            settings = workers.worker_settings(settings, args.worker, addresses)
            worker = (args.worker, addresses)
        elif (n := workers.resolve(settings.server.workers)) > 1:
            return workers.Supervisor(argv, workers.plan(settings, n), settings.server).run()
    except SidecarError as exc:
        print(f"dedup-sidecar: {exc}", file=sys.stderr)
        return 2
    if args.testonly_fault_hooks:
        from sidecar import testing_hooks

        testing_hooks.arm_from_environment()
    from sidecar.process.app import Sidecar

    tune_interpreter()
    try:
        run_loop(Sidecar(settings, worker).run())
    except SidecarError as exc:
        logging.getLogger("sidecar").error("%s", exc)
        return 2
    return 0
