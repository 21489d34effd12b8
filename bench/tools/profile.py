"""Profile the sidecar's consume and publish paths with py-spy, on a real broker and Redis.

Usage::

    python -m bench.tools.profile [--records 300000] [--path consume|publish|both|unary-publish|unary-ack]
                            [--native] [--out DIR]

It starts the same services as bench/runner.py, runs one sidecar process under ``py-spy record``
(sampling without pausing it) while the batched Python client consumes ``--records`` preloaded
1 KB records (or PublishBatch sends half as many), and writes, per path:

* ``DIR/<path>.collapsed``: the whole profile as collapsed stacks (flamegraph.pl, speedscope);
* ``DIR/<path>.txt``: the functions with the most samples of their own (self time) and with the
  most samples under them (total time), and the CPU µs per record of the sidecar process, in
  all and per thread (the event loop, the other Python threads, librdkafka's, gRPC's).

The ``unary-publish`` and ``unary-ack`` paths profile the per-call paths instead: one unary
``Publish`` per record, 64 in flight, and one unary ``Ack`` per delivery, 64 in flight, through the
generated stubs (bench/scenarios/percall.py's load). Their summary adds the event loop's samples by stage of
a call (``STAGES``): what the gRPC runtime spends around the handler, the sidecar's own wrappers
(credential, decoding, validation), tracing, the group commit, the publisher or the settlement,
the store, the producer hand-off, metrics and the response.

It prints the text summary too. py-spy is a dev dependency. ``--native`` makes py-spy unwind C
frames as well: the compiled record path (mypyc's modules, the C frame encoder) then shows by
function (``CPyDef_...``) instead of as time spent in whichever Python frame called it. py-spy
can unwind C frames only by pausing the process for each sample, so the rates and CPU figures
of a ``--native`` run are lower than a plain run's; read its shares, not its rates.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from dedup_client import DedupClient
from dedup_client.results import publish_request

from bench.common import VALUE, SidecarProc, log, preload, services, stat_cpu_seconds, wait_serving
from bench.scenarios import percall
from bench.scenarios.consume import consume_via


def _function(frame: str) -> str:
    """'name (file.py:123)' -> 'name (file.py)': one row per function, not per line."""
    head, sep, where = frame.rpartition(" (")
    return f"{head} ({where[:-1].rsplit(':', 1)[0]})" if sep and where.endswith(")") else frame


def summarize(raw: Path, records: int, cpu_s: float, top: int = 30) -> str:
    """Self and total samples per function from py-spy's collapsed stacks ("a;b;c count")."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        samples += n
        frames = [_function(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            total[f] += n
    lines = [f"{records} records, sidecar CPU {cpu_s:.2f} s = {cpu_s / records * 1e6:.1f} µs per record"]
    lines.append(f"{samples} samples (all threads)\n\nself:")
    lines += [f"{n / samples:6.1%}  {f}" for f, n in own.most_common(top)]
    lines.append("\ntotal:")
    lines += [f"{n / samples:6.1%}  {f}" for f, n in total.most_common(top)]
    return "\n".join(lines)


#: Stages of a unary call on the event loop, by the first frame (from the innermost) that names
#: one: (stage, substrings of a py-spy frame). Samples with none of them are the gRPC runtime
#: and the loop itself ("grpc.aio and the loop").
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("metrics", ("prometheus_client", "_observe", "count_by_topic", "observe_many")),
    ("tracing", ("tracing.py", "opentelemetry")),
    ("store (Redis client and scripts)", ("redis", "timed.py", "RedisStore", "Standalone")),
    ("producer hand-off", ("producer.py",)),
    ("publisher (validate, digest, claims)", ("publisher.py",)),
    ("settlement (ids, books, commit wake-up)", ("settlement.py", "core.py", "tracker")),
    ("group commit", ("groupcommit.py",)),
    ("response", ("_response", "SerializeToString")),
    ("servicer wrappers (credential, decoding)", ("server.py", "servicer.py", "security.py")),
]


def stages(raw: Path) -> str:
    """The event loop's samples by stage of a call (STAGES)."""
    counts: collections.Counter[str] = collections.Counter()
    loop = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not stack or not frames[0].startswith("_run_module_as_main"):
            continue  # not the main thread
        n = int(count)
        loop += n
        stage = "grpc.aio and the loop"
        for frame in reversed(frames):
            hit = next((name for name, keys in STAGES if any(k in frame for k in keys)), None)
            if hit is not None:
                stage = hit
                break
        counts[stage] += n
    if not loop:
        return "no event-loop samples"
    return "event loop by stage:\n" + "\n".join(f"{n / loop:6.1%}  {k}" for k, n in counts.most_common())


def profiled(
    kafka: services.KafkaShape,
    topic: str,
    store: dict[str, str],
    work_dir: Path,
    out: Path,
    name: str,
    work: Callable[[str], Coroutine[Any, Any, float]],
    native: bool = False,
) -> tuple[float, dict[str, float]]:
    """Start a sidecar under ``py-spy record`` and run ``work`` (given its target) against it.

    py-spy starts the sidecar itself: attaching to a running process needs rights over other
    processes' memory that a container often lacks. Returns the seconds ``work`` took and the sidecar's CPU
    seconds in that time per thread group (see ``thread_cpu``)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    wrap = [
        spy,
        "record",
        # py-spy unwinds native stacks only from a paused process: --native samples block.
        *([] if native else ["--nonblocking"]),
        "--rate",
        "100",
        "--format",
        "raw",
        "--output",
        str(out / f"{name}.collapsed"),
        *(["--native"] if native else []),
    ]
    proc = SidecarProc(kafka, topic, f"prof-{time.time_ns()}", store, work_dir, wrap=[*wrap, "--"])
    try:
        try:
            asyncio.run(wait_serving(proc.target))
        except TimeoutError:
            tail = (work_dir / f"sidecar-{proc.port}.log").read_text(errors="replace")[-2000:]
            raise SystemExit(f"the sidecar under py-spy never served; its log ends:\n{tail}") from None
        sidecar = int(Path(f"/proc/{proc.proc.pid}/task/{proc.proc.pid}/children").read_text().split()[0])
        cpu0 = thread_cpu(sidecar)
        time.sleep(1.0)
        dt = asyncio.run(work(proc.target))
        cpu = {k: v - cpu0.get(k, 0.0) for k, v in thread_cpu(sidecar).items()}
        os.kill(sidecar, signal.SIGTERM)  # py-spy writes its output when its child exits
        proc.proc.wait(60)
    finally:
        proc.stop()
    return dt, cpu


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far per group of threads: the event loop (the main thread), the other
    Python threads (the consumer's and the producer's poll threads, to_thread workers), and
    librdkafka's and gRPC's own threads by their names (rdk:broker1 -> rdk:broker)."""
    out: collections.defaultdict[str, float] = collections.defaultdict(float)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            cpu = stat_cpu_seconds(task / "stat")
        except FileNotFoundError:
            continue  # the thread ended
        if task.name == str(pid):
            name = "event loop (main thread)"
        elif name == "python":
            name = "other Python threads"
        out[name.rstrip("-0123456789")] += cpu
    return dict(out)


def report(out: Path, name: str, n: int, dt: float, threads: dict[str, float]) -> None:
    cpu = sum(threads.values())
    text = f"{name}: {n / dt:.0f} records/s\n" + summarize(out / f"{name}.collapsed", n, cpu)
    if name.startswith("unary"):
        text += "\n\n" + stages(out / f"{name}.collapsed")
    per_thread = sorted(threads.items(), key=lambda kv: -kv[1])
    text += "\n\nCPU per record by thread:\n" + "\n".join(
        f"{v / n * 1e6:7.2f} µs  {k}" for k, v in per_thread if v > 0
    )
    (out / f"{name}.txt").write_text(text + "\n")
    print(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=300_000)
    ap.add_argument(
        "--path", choices=["consume", "publish", "both", "unary-publish", "unary-ack"], default="both"
    )
    ap.add_argument("--native", action="store_true", help="unwind C frames too (the compiled modules)")
    ap.add_argument("--out", default="profile-out")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = args.records
    with (
        tempfile.TemporaryDirectory(prefix="dedup-profile-") as tmp,
        services.running(Path(tmp), quick_start=False) as (kafka, redis),
    ):
        work = Path(tmp)
        store = {"DEDUP_STORE__BACKEND": "redis", "DEDUP_STORE__REDIS_URL": redis.url}
        if args.path in ("consume", "both"):
            log(f"preloading {n} records")
            preload(kafka, "prof6", 6, n, "pr")

            async def consume(target: str) -> float:
                return await consume_via([target], n, batched=True)

            log("consume, profiled")
            dt, cpu = profiled(kafka, "prof6", store, work, out, "consume", consume, args.native)
            report(out, "consume", n, dt, cpu)
        if args.path in ("publish", "both"):
            m = n // 2
            kafka.create_topic("profpub", 6)
            idle = f"profidle-{time.time_ns()}"
            kafka.create_topic(idle, 1)

            async def publish(target: str) -> float:
                async with DedupClient(target) as c:
                    await c.publish_batch([publish_request("profpub", VALUE, idempotency_key="warm")])
                    sem = asyncio.Semaphore(4)
                    t0 = time.perf_counter()

                    async def send(start: int) -> None:
                        async with sem:
                            batch = [
                                publish_request("profpub", VALUE, idempotency_key=f"pp-{i}")
                                for i in range(start, min(m, start + 500))
                            ]
                            await c.publish_batch(batch)

                    await asyncio.gather(*(send(s) for s in range(0, m, 500)))
                    return time.perf_counter() - t0

            log("PublishBatch, profiled")
            dt, cpu = profiled(kafka, idle, store, work, out, "publish", publish, args.native)
            report(out, "publish", m, dt, cpu)
        if args.path == "unary-publish":
            m = n // 10
            kafka.create_topic("profunary", 6)
            idle = f"profidle-{time.time_ns()}"
            kafka.create_topic(idle, 1)

            async def unary_publish(target: str) -> float:
                row = await percall.unary_publish(target, os.getpid(), "profunary", m, "pu", "unary Publish")
                return float(m / row["rate"])

            log("unary Publish, 64 in flight, profiled")
            dt, cpu = profiled(kafka, idle, store, work, out, "unary-publish", unary_publish, args.native)
            report(out, "unary-publish", m, dt, cpu)
        if args.path == "unary-ack":
            m = n // 10
            log(f"preloading {m} records")
            preload(kafka, "profack", 6, m, "pa")

            async def unary_ack(target: str) -> float:
                row = await percall.unary_acks(target, os.getpid(), "profack", m)
                return float(m / row["rate"])

            log("unary Ack per delivery, 64 in flight, profiled")
            dt, cpu = profiled(kafka, "profack", store, work, out, "unary-ack", unary_ack, args.native)
            report(out, "unary-ack", m, dt, cpu)
    print(json.dumps({"out": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
