"""Benchmark harness: the sidecar against the raw confluent-kafka client, in one run, same data.

Usage (scripts/bench.sh wraps it)::

    python bench/run.py [--records 200000] [--quick] [--out docs/BENCHMARKS.md]

It starts a real Kafka broker and Redis (deploy/local/services), preloads topics with 1 KB
records that carry unique idempotency keys, and measures, on the same machine and data:

* consume: a raw consumer committing every 1,000 records (baseline, no dedup) vs the sidecar
  with the Redis store and the batched client (Python; and Go, when Go is installed), the
  per-message unary client, and the SQLite store;
* publish: PublishBatch and Publish vs a raw idempotent producer, and two bounds that leave the
  store, then Kafka, out (bench/ceiling.py);
* latency: produce-to-app p50/p99 at a fixed rate, sidecar vs raw consumer;
* memory: sidecar RSS at start and after every record was processed;
* scaling: 1, 6 and 48 partitions; one sidecar replica and three.

Results go to JSON (bench/results.json), a markdown table and a PNG plot in docs/. Absolute
numbers drift on shared machines; the ratios to the baseline of the same run are what to read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "deploy" / "local"))
sys.path.insert(0, str(ROOT / "bench"))  # percall_report, when this file is loaded by path
import percall_report  # noqa: E402  (bench/, this file's folder)
import services  # noqa: E402
from dedup_client import DedupClient  # noqa: E402
from dedup_client.client import publish_request  # noqa: E402

VALUE = b"x" * 1024
UNARY_WINDOW = 64  # unary Ack calls in flight in the per-message consume row
# Preloaded records: 1 KB of hex text, 1,024 different ones in turn, so lz4 finds no repeat within
# its 64 KB window and a batch compresses about 2:1, like typical payloads. (A constant value
# compressed 200:1; librdkafka's prefetch then decompressed into hundreds of megabytes, and the
# sidecar's RSS swung by a couple of hundred MB with whatever happened to be prefetched.)
VALUES = [random.Random(i).randbytes(512).hex().encode() for i in range(1024)]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_per_record(cpu_s: float, n: int) -> dict[str, float]:
    """The ``cpu_us`` figure of a Result: a process's user + system CPU per record, in µs."""
    return {"cpu_us": round(cpu_s / n * 1e6, 2)} if n else {}


@dataclass
class Result:
    name: str
    records: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds else 0.0


def preload(
    kafka: services.KafkaShape, topic: str, partitions: int, n: int, prefix: str, keys: int = 0
) -> None:
    """n records of 1 KB round-robin over the partitions; with ``keys``, record i has Kafka key
    ``k{i % keys}`` and goes where the default partitioner puts it."""
    kafka.create_topic(topic, partitions)
    p = Producer(
        {
            "bootstrap.servers": kafka.bootstrap_servers,
            "linger.ms": 20,
            "batch.size": 1_000_000,
            "enable.idempotence": True,
            "compression.type": "lz4",
        }
    )
    for i in range(n):
        while True:
            try:
                headers: list[tuple[str, str | bytes | None]] = [
                    ("idempotency-key", f"{prefix}-{i}".encode())
                ]
                if keys:
                    p.produce(topic, VALUES[i % len(VALUES)], f"k{i % keys}".encode(), headers=headers)
                else:
                    p.produce(topic, VALUES[i % len(VALUES)], headers=headers, partition=i % partitions)
                break
            except BufferError:
                p.poll(0.05)
        if i % 10_000 == 0:
            p.poll(0)
    assert p.flush(120) == 0


def quiesce() -> None:
    """Write dirty pages out before a timed run, for the baseline and the sidecar alike.

    The kernel writes a preload's pages back about 30 s after they were written (1 GB before the
    memory run), inside whichever run comes then. This keeps the runs independent of each other;
    it is cheap when there is nothing to write, and it says so when the wait was long.
    """
    t0 = time.perf_counter()
    os.sync()
    if time.perf_counter() - t0 > 0.5:
        log(f"waited {time.perf_counter() - t0:.1f}s for dirty pages to be written out")


def raw_consume(kafka: services.KafkaShape, topic: str, n: int) -> Result:
    quiesce()
    budget = CpuBudget()
    cpu0 = time.process_time()  # this process is the raw client: every librdkafka thread counts
    c = Consumer(
        {
            "bootstrap.servers": kafka.bootstrap_servers,
            "group.id": f"raw-{time.time_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
        }
    )
    c.subscribe([topic])
    got = 0
    t0: float | None = None
    since_commit = 0
    while got < n:
        msgs = c.consume(500, 1.0)
        if not msgs:
            continue
        if t0 is None:
            t0 = time.perf_counter()
        for m in msgs:
            if m.error() is None:
                got += 1
                since_commit += 1
                c.store_offsets(m)
        if since_commit >= 1000:
            c.commit(asynchronous=False)
            since_commit = 0
    if since_commit:
        c.commit(asynchronous=False)
    dt = time.perf_counter() - (t0 or time.perf_counter())
    c.close()
    extra = {**cpu_per_record(time.process_time() - cpu0, n), "cpu_by_process": budget.per_record(n)}
    return Result("raw consumer (commit every 1,000)", n, dt, extra)


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def stat_cpu_seconds(stat: Path) -> float:
    """User + system CPU so far from a /proc stat file: a process's (every thread included) or,
    under /proc/PID/task/TID, one thread's. Raises FileNotFoundError once it has ended."""
    fields = stat.read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def process_cpu_seconds(pid: int) -> float:
    return stat_cpu_seconds(Path(f"/proc/{pid}/stat"))


#: The services whose CPU a measurement accounts for beside the client's and the sidecar's, by
#: name ("broker", "redis"): set by main() once they run. Empty: only the machine's total.
SERVICE_PIDS: dict[str, int] = {}


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine so far, every core, from /proc/stat's
    first line: busy is user + nice + system + irq + softirq; stolen is the hypervisor's."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq) / CLOCK_TICKS, steal / CLOCK_TICKS


class CpuBudget:
    """Where the machine's CPU went between construction and ``per_record``: the client (this
    process), each service of SERVICE_PIDS, the sidecar (given by the caller), and the whole
    machine; in µs per record. "other" is the machine's busy time nobody here is named for (the
    kernel's loopback work outside these processes, the benchmark's own bookkeeping, the rest of
    the VM)."""

    def __init__(self) -> None:
        self._client = time.process_time()
        self._services = {name: process_cpu_seconds(pid) for name, pid in SERVICE_PIDS.items()}
        self._busy, self._steal = machine_busy_seconds()

    def per_record(self, n: int, sidecar_s: float | None = None) -> dict[str, float]:
        busy, steal = machine_busy_seconds()
        spent = {"client": time.process_time() - self._client}
        for name, pid in SERVICE_PIDS.items():
            try:
                spent[name] = process_cpu_seconds(pid) - self._services[name]
            except (FileNotFoundError, KeyError):
                continue  # restarted meanwhile: not counted
        if sidecar_s is not None:
            spent["sidecar"] = sidecar_s
        machine = busy - self._busy
        spent["other"] = max(0.0, machine - sum(spent.values()))
        spent["machine"] = machine
        spent["stolen"] = steal - self._steal
        return {k: round(v / n * 1e6, 2) for k, v in spent.items()} if n else {}


class SidecarProc:
    """A sidecar in its own process; with ``ceiling``, bench/ceiling.py in that mode instead."""

    def __init__(
        self,
        kafka: services.KafkaShape,
        topic: str,
        group: str,
        store: dict[str, str],
        workdir: Path,
        ceiling: str | None = None,
        wrap: Sequence[str] = (),
        workers: int = 1,
    ):
        """``wrap``: a command to run the sidecar under (a profiler), given its argv after it.
        ``workers``: server.workers; the CPU and RSS figures are then the supervisor's and its
        workers' together."""
        self.port = services.free_port() if workers == 1 else services.port_block(workers)
        env = {
            **os.environ,
            "DEDUP_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "DEDUP_KAFKA__TOPICS": json.dumps([topic]),
            "DEDUP_KAFKA__GROUP_ID": group,
            "DEDUP_SERVER__LISTEN": f"127.0.0.1:{self.port}",
            "DEDUP_SERVER__METRICS_LISTEN": "127.0.0.1:0",
            "DEDUP_SERVER__WORKERS": str(workers),
            "DEDUP_LOG_LEVEL": "WARNING",
            **store,
        }
        self.log = open(workdir / f"sidecar-{self.port}.log", "wb")  # noqa: SIM115
        argv = [sys.executable, "-m", "sidecar"]
        if ceiling:
            script = str(ROOT / "bench" / "ceiling.py")
            argv = [sys.executable, script, ceiling, self.target, kafka.bootstrap_servers]
        # Run in ``workdir``: ``python -m`` puts its working directory first on sys.path, ahead of
        # PYTHONPATH, so from the repository's root it would run the repository's sidecar even when
        # bench/ab.py points PYTHONPATH at another build.
        self.proc = subprocess.Popen(
            [*wrap, *argv], env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=workdir
        )

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        """The sidecar's processes: itself, and its workers under a server.workers supervisor."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [self.proc.pid, *(int(p) for p in children.read_text().split())]
        except FileNotFoundError:
            return [self.proc.pid]

    def rss_mb(self) -> float:
        total = 0.0
        for pid in self.pids():
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) / 1024
        return total

    def cpu_seconds(self) -> float:
        return sum(process_cpu_seconds(pid) for pid in self.pids())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def wait_serving(target: str) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for _ in range(300):
            try:
                r = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(target)


async def consume_via(
    targets: list[str], n: int, batched: bool, sample: Callable[[int], None] | None = None
) -> float:
    """Consume n records through the sidecars at ``targets``; returns seconds from first record."""
    done = asyncio.Event()
    count = 0
    t0: float | None = None

    async def one(target: str) -> None:
        nonlocal count, t0
        # Unbatched: one Ack call per record with up to UNARY_WINDOW in flight, as an app with
        # that many handlers makes them (one at a time hid the concurrency the sidecar groups).
        window = asyncio.Semaphore(UNARY_WINDOW)
        calls: set[asyncio.Task[None]] = set()

        async def ack_one(c: DedupClient, did: str) -> None:
            try:
                await c.ack_many([did])
            finally:
                window.release()

        async with DedupClient(target, coalesce_acks=batched, ack_max_ids=2000, ack_linger=0.002) as c:
            gen = c.frames(max_in_flight=5000 if batched else 500)
            try:
                async for frame in gen:
                    if t0 is None:
                        t0 = time.perf_counter()
                    if batched:
                        for m in frame:
                            m.ack()  # coalesced by the client: no round trip on the read path
                    else:
                        for m in frame:
                            await window.acquire()
                            call = asyncio.create_task(ack_one(c, m.delivery_id))
                            calls.add(call)
                            call.add_done_callback(calls.discard)
                    count += len(frame)
                    if sample is not None:
                        sample(count)
                    if count >= n:
                        await asyncio.gather(*calls)
                        await c.flush_acks()
                        done.set()
                        return
            finally:
                await gen.aclose()

    tasks = [asyncio.create_task(one(t)) for t in targets]
    await done.wait()
    dt = time.perf_counter() - (t0 or time.perf_counter())
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return dt


def go_consumer(workdir: Path) -> Path | None:
    """clients/go/examples/consume, built once per run; None without Go."""
    binary = workdir / "go-consume"
    if not binary.exists():
        if shutil.which("go") is None:
            log("Go not installed: no Go client row")
            return None
        build = ["go", "build", "-o", str(binary), "./examples/consume"]
        subprocess.run(build, cwd=ROOT / "clients" / "go", check=True, timeout=600)
    return binary


async def consume_via_go(binary: Path, target: str, n: int) -> float:
    """The same reads and gathered acks as consume_via, by the Go client in its own process."""
    proc = await asyncio.create_subprocess_exec(
        str(binary), "-target", target, "-n", str(n), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the Go consumer failed: {err.decode().strip()}")
    return float(json.loads(out)["seconds"])


def sidecar_consume(
    kafka: services.KafkaShape,
    topic: str,
    n: int,
    store: dict[str, str],
    workdir: Path,
    name: str,
    batched: bool = True,
    replicas: int = 1,
    memory: bool = False,
    go: Path | None = None,
    wrap: Sequence[str] = (),
    workers: int = 1,
) -> Result:
    """``go``: read with that build of the Go client's consume example instead of the Python client.
    ``wrap``: a command each sidecar runs under (``taskset -c 0``). ``workers``: server.workers
    of each sidecar (the client subscribes on every worker)."""
    quiesce()
    group = f"sc-{time.time_ns()}"
    procs = [
        SidecarProc(kafka, topic, group, store, workdir, wrap=wrap, workers=workers) for _ in range(replicas)
    ]
    extra: dict[str, Any] = {}
    try:

        async def run() -> float:
            await asyncio.gather(*(wait_serving(p.target) for p in procs))
            if workers > 1:  # every worker a member with its partitions, before the clock starts
                await asyncio.sleep(8.0)
            # From here: a sidecar fetches and claims ahead of its first stream.
            cpu0 = sum(p.cpu_seconds() for p in procs)
            budget = CpuBudget()
            await asyncio.sleep(1.0)
            extra["rss_start_mb"] = procs[0].rss_mb()
            marks: dict[str, float] = {}

            def sample(count: int) -> None:
                if memory and count >= n // 10 and "rss_10pct_mb" not in marks:
                    marks["rss_10pct_mb"] = procs[0].rss_mb()

            if go is not None:
                dt = await consume_via_go(go, procs[0].target, n)
            else:
                dt = await consume_via([p.target for p in procs], n, batched, sample)
            cpu_s = sum(p.cpu_seconds() for p in procs) - cpu0
            extra.update(cpu_per_record(cpu_s, n))
            if go is None:  # the Go client is a process of its own, not counted as the client
                extra["cpu_by_process"] = budget.per_record(n, cpu_s)
            extra.update(marks)
            extra["rss_end_mb"] = procs[0].rss_mb()
            return dt

        dt = asyncio.run(run())
    finally:
        for p in procs:
            p.stop()
    return Result(name, n, dt, extra)


def raw_publish(kafka: services.KafkaShape, topic: str, n: int) -> Result:
    p = Producer(
        {
            "bootstrap.servers": kafka.bootstrap_servers,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
        }
    )
    done = 0

    def cb(err: Any, msg: Any) -> None:
        nonlocal done
        done += 1

    # Warm up outside the clock, as the sidecar's producer is when its run starts: connections,
    # the topic's metadata and the idempotent producer id. Timed from a cold start, a short run
    # measured mostly this set-up (0.1-1 s), and the baseline moved 10x between runs.
    p.produce(topic, VALUE, headers=[("idempotency-key", b"raw-warm-up")])
    p.flush(30)
    quiesce()
    budget = CpuBudget()
    t0, cpu0 = time.perf_counter(), time.process_time()
    for i in range(n):
        while True:
            try:
                p.produce(topic, VALUE, headers=[("idempotency-key", f"raw-{i}".encode())], on_delivery=cb)
                break
            except BufferError:
                p.poll(0.01)
    p.flush(120)
    dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return Result(
        "raw idempotent producer", n, dt, {**cpu_per_record(cpu, n), "cpu_by_process": budget.per_record(n)}
    )


CEILINGS = {
    "grpc": "bound: PublishBatch answered without Kafka or a store (bench/ceiling.py grpc)",
    "produce": "bound: PublishBatch through the sidecar's producer, no store (bench/ceiling.py produce)",
}


def sidecar_publish(
    kafka: services.KafkaShape,
    topic: str,
    n: int,
    store: dict[str, str],
    workdir: Path,
    batch: int,
    coalesce: bool = False,
    ceiling: str | None = None,
    store_name: str = "",
    workers: int = 1,
    wrap: Sequence[str] = (),
) -> Result:
    """``batch`` > 1: PublishBatch calls of that many, 4 in flight. Otherwise one ``publish()`` per
    record: 64 unary calls in flight, or with ``coalesce`` 2,000 calls gathered by the client.
    ``ceiling``: the same PublishBatch calls, answered by bench/ceiling.py in that mode.
    ``store_name``: said in the row's name (the Redis store's rows say none)."""
    # The sidecar consumes another (empty) topic: only the publish path is measured.
    quiesce()
    idle = f"benchidle-{time.time_ns()}"
    kafka.create_topic(idle, 1)
    proc = SidecarProc(kafka, idle, f"pub-{time.time_ns()}", store, workdir, ceiling, wrap, workers)
    cpu: list[float] = []
    budgets: list[CpuBudget] = []
    by_process: dict[str, float] = {}
    try:

        async def run() -> float:
            await wait_serving(proc.target)
            async with DedupClient(proc.target, coalesce_publishes=coalesce) as c:
                await c.workers()  # publishes then go round the workers
                prefix = f"p{batch}-{time.time_ns()}"
                # Warms the producer up, as the raw one is; a batch, which every mode serves.
                await c.publish_batch([publish_request(topic, VALUE, idempotency_key=f"{prefix}-warm-up")])
                t0 = time.perf_counter()
                cpu.append(proc.cpu_seconds())
                budgets.append(CpuBudget())
                if batch > 1:
                    sem = asyncio.Semaphore(4)

                    async def send(start: int) -> None:
                        async with sem:
                            entries = [
                                publish_request(topic, VALUE, idempotency_key=f"{prefix}-{i}")
                                for i in range(start, min(n, start + batch))
                            ]
                            await c.publish_batch(entries)

                    await asyncio.gather(*(send(s) for s in range(0, n, batch)))
                else:
                    sem = asyncio.Semaphore(2000 if coalesce else 64)

                    async def one(i: int) -> None:
                        async with sem:
                            await c.publish(topic, VALUE, idempotency_key=f"{prefix}-{i}")

                    await asyncio.gather(*(one(i) for i in range(n)))
                cpu.append(proc.cpu_seconds())
                by_process.update(budgets[0].per_record(n, cpu[1] - cpu[0]))
                return time.perf_counter() - t0

        dt = asyncio.run(run())
    finally:
        proc.stop()
    if ceiling:
        name = CEILINGS[ceiling]
    elif batch > 1:
        name = f"PublishBatch ({batch} per call, 4 calls in flight)"
    elif coalesce:
        name = "publish() coalesced by the client (2,000 in flight)"
    else:
        name = "Publish (64 calls in flight)"
    if store_name:
        name += f", {store_name} store"
    if workers > 1:
        name += f", {workers} workers"
    return Result(name, n, dt, {**cpu_per_record(cpu[1] - cpu[0], n), "cpu_by_process": by_process})


def latency(
    kafka: services.KafkaShape,
    topic: str,
    rate: int,
    seconds: float,
    store: dict[str, str],
    workdir: Path,
    linger_ms: int = 5,
) -> dict[str, dict[str, float]]:
    """Produce at ``rate``/s with the send time in the value; measure the arrival delay at the app.

    The producer is its own process (bench/producer.py), with ``linger.ms`` = ``linger_ms``. The
    first ``warmup`` seconds of records are dropped for both paths: connection set-up and offset
    lookups, not steady state.
    """
    warmup = 8.0
    out: dict[str, dict[str, float]] = {}

    def start_producer(tag: str) -> subprocess.Popen[bytes]:
        script = str(ROOT / "bench" / "producer.py")
        args = [kafka.bootstrap_servers, topic, str(rate), str(warmup + seconds), tag, str(linger_ms)]
        return subprocess.Popen([sys.executable, script, *args])

    def summarize(timed: list[tuple[float, float]]) -> dict[str, float]:
        start = min(sent for sent, _ in timed) + warmup if timed else 0.0
        samples = sorted(lat for sent, lat in timed if sent >= start)
        return {
            "p50_ms": 1000 * samples[len(samples) // 2],
            "p99_ms": 1000 * samples[int(len(samples) * 0.99)],
            "samples": len(samples),
        }

    # raw consumer
    quiesce()
    c = Consumer(
        {
            "bootstrap.servers": kafka.bootstrap_servers,
            "group.id": f"lat-raw-{time.time_ns()}",
            "auto.offset.reset": "latest",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
        }
    )
    c.subscribe([topic])
    while not c.assignment():
        c.poll(0.1)
    c.poll(0.5)
    producer = start_producer(f"lr{time.time_ns()}")
    samples: list[tuple[float, float]] = []
    while producer.poll() is None:
        # One record per poll: consume(n, timeout) would wait for n records and add that wait.
        m = c.poll(0.1)
        if m is not None and m.error() is None:
            sent = float((m.value() or b"0").strip())
            samples.append((sent, time.time() - sent))
    c.close()
    out["raw consumer"] = summarize(samples)

    # sidecar
    quiesce()
    proc = SidecarProc(
        kafka,
        topic,
        f"lat-sc-{time.time_ns()}",
        {
            **store,
            "DEDUP_KAFKA__CONSUMER": json.dumps({"auto.offset.reset": "latest", "fetch.wait.max.ms": 10}),
        },
        workdir,
    )
    try:

        async def run() -> list[tuple[float, float]]:
            await wait_serving(proc.target)
            got: list[tuple[float, float]] = []
            async with DedupClient(proc.target) as cl:

                async def pump() -> None:
                    gen = cl.frames()
                    try:
                        async for frame in gen:
                            now = time.time()
                            for m in frame:
                                sent = float(m.value.strip())
                                got.append((sent, now - sent))
                                m.ack()  # coalesced by the client, as in the throughput runs
                    finally:
                        await gen.aclose()

                task = asyncio.create_task(pump())
                await asyncio.sleep(3)  # joined and assigned
                producer = start_producer(f"ls{time.time_ns()}")
                await asyncio.to_thread(producer.wait)
                await asyncio.sleep(0.5)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            return got

        out["sidecar (redis)"] = summarize(asyncio.run(run()))
    finally:
        proc.stop()
    return out


def medians(runs: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Per path, the median of each latency figure over ``runs``, and every run's figures."""
    return {
        path: {
            stat: sorted(run[path][stat] for run in runs)[len(runs) // 2]
            for stat in ("p50_ms", "p99_ms", "samples")
        }
        | {"runs": [run[path] for run in runs]}
        for path in runs[0]
    }


def machine() -> dict[str, Any]:
    import confluent_kafka
    import grpc

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "grpcio": grpc.__version__,
        "confluent_kafka": confluent_kafka.version(),
        "librdkafka": confluent_kafka.libversion()[0],
        "kafka": services.kafka_version(),
    }


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed; skipping the plot (pip install matplotlib)")
        return False
    rows = results["consume"] + results["publish"]
    names = [r["name"].split(" (bench/")[0] for r in rows]  # the table names the bound's script
    ratios = [r["ratio"] for r in rows]
    colours = [
        "#b0b0b0" if name.startswith("bound") else "#4c72b0" if x >= 0.5 else "#dd8452"
        for name, x in zip(names, ratios, strict=True)
    ]
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(rows) + 1.2))
    ax.barh(names[::-1], ratios[::-1], color=colours[::-1])
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("throughput / baseline of the same run")
    ax.set_title("throughput relative to the raw confluent-kafka client (same run); grey: bounds")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=200_000, help="records per consume measurement")
    ap.add_argument("--memory-records", type=int, default=1_000_000, help="records for the RSS measurement")
    ap.add_argument("--quick", action="store_true", help="small sizes, to check the harness works")
    ap.add_argument("--out", default=str(ROOT / "docs" / "BENCHMARKS.md"))
    ap.add_argument(
        "--render-only", action="store_true", help="redraw the markdown and plot from bench/results.json"
    )
    ap.add_argument(
        "--cluster",
        action="store_true",
        help="only the rows on a three-broker cluster (RF 3, acks=all): update bench/results.json and redraw",
    )
    args = ap.parse_args()
    if args.cluster:
        return cluster_main(args)
    if args.render_only:
        saved = json.loads((ROOT / "bench" / "results.json").read_text())
        png = Path(args.out).with_suffix(".png")
        write_markdown(saved, Path(args.out), png.name if plot(saved, png) else None)
        return 0
    n = 20_000 if args.quick else args.records
    n_mem = 40_000 if args.quick else args.memory_records
    n_unary = max(2_000, n // 20)
    n_pub = max(5_000, n // 2)  # several seconds for the sidecar: a steady rate, not a start-up
    results: dict[str, Any] = {
        "machine": machine(),
        "records": n,
        "command": " ".join(["scripts/bench.sh", *sys.argv[1:]]),
    }
    with (
        tempfile.TemporaryDirectory(prefix="dedup-bench-") as tmp,
        services.running(Path(tmp), quick_start=False) as (kafka, redis),
    ):
        work = Path(tmp)
        SERVICE_PIDS["broker"] = kafka.proc.pid
        if isinstance(redis, services.RedisServer):
            SERVICE_PIDS["redis"] = redis.proc.pid
        redis_store = {"DEDUP_STORE__BACKEND": "redis", "DEDUP_STORE__REDIS_URL": redis.url}
        sqlite_store = {
            "DEDUP_STORE__BACKEND": "sqlite",
            "DEDUP_STORE__SQLITE_PATH": str(work / "bench.db"),
            "DEDUP_STORE__SQLITE_SYNCHRONOUS": "NORMAL",
        }
        log(f"preloading {n} x 1 KB records into 6 partitions")
        preload(kafka, "bench6", 6, n, "b6")
        consume: list[Result] = []
        log("baseline: raw consumer")
        base = raw_consume(kafka, "bench6", n)
        consume.append(base)
        log("sidecar, redis store, batched client")
        consume.append(
            sidecar_consume(kafka, "bench6", n, redis_store, work, "sidecar, Redis store, batched acks")
        )
        log("sidecar, sqlite store, batched client")
        consume.append(
            sidecar_consume(kafka, "bench6", n, sqlite_store, work, "sidecar, SQLite store, batched acks")
        )
        go = go_consumer(work)
        if go is not None:
            log("sidecar, redis store, batched acks by the Go client")
            name = "sidecar, Redis store, batched acks, Go client"
            consume.append(sidecar_consume(kafka, "bench6", n, redis_store, work, name, go=go))
        log(f"sidecar, redis store, one Ack call per message, {UNARY_WINDOW} in flight")
        consume.append(
            sidecar_consume(
                kafka,
                "bench6",
                n_unary,
                redis_store,
                work,
                f"sidecar, Redis store, one Ack call per message, {UNARY_WINDOW} in flight",
                batched=False,
            )
        )
        log("scaling: 3 replicas")
        consume.append(
            sidecar_consume(
                kafka,
                "bench6",
                n,
                redis_store,
                work,
                "sidecar x3 replicas, Redis store, batched acks",
                replicas=3,
            )
        )
        for parts in (1, 48):
            log(f"scaling: {parts} partitions")
            preload(kafka, f"bench{parts}", parts, n, f"b{parts}")
            b = raw_consume(kafka, f"bench{parts}", n)
            b.name = f"raw consumer, {parts} partition(s)"
            s = sidecar_consume(
                kafka, f"bench{parts}", n, redis_store, work, f"sidecar, {parts} partition(s), Redis"
            )
            s.extra["baseline"] = b.rate
            consume += [b, s]

        # Ordering (delivery.ordering): 1,000 distinct Kafka keys over 6 partitions, each mode
        # against the raw consumer on the same topic. "partition" sends one record per partition
        # at a time: a round trip per record, so it gets the small count of the unary row.
        log("ordering: preloading 1,000 keys")
        preload(kafka, "benchkeys", 6, n, "bk", keys=1000)
        b = raw_consume(kafka, "benchkeys", n)
        b.name = "raw consumer, 1,000 Kafka keys"
        consume.append(b)
        for mode, count in (("unordered", n), ("key", n), ("partition", n_unary)):
            log(f"ordering: {mode}")
            env = {**redis_store, "DEDUP_DELIVERY__ORDERING": mode}
            s = sidecar_consume(
                kafka, "benchkeys", count, env, work, f'sidecar, ordering = "{mode}", 1,000 keys, Redis'
            )
            s.extra["baseline"] = b.rate
            consume.append(s)

        # Before the 1M-record memory run, which leaves the broker and Redis busier. Three runs;
        # each figure is the median of the three (a 2-core machine has noisy tails).
        runs = []
        for i in range(1 if args.quick else 3):
            log(f"latency at 2,000 msg/s, run {i + 1}")
            kafka.create_topic(f"benchlat{i}", 6)
            runs.append(latency(kafka, f"benchlat{i}", 2_000, 10 if args.quick else 15, redis_store, work))
        lat = medians(runs)
        # The same with a producer that sends every record on its own (linger.ms=0): reported
        # as measured; on two cores it saturates the machine (docs/BENCHMARKS.md says more).
        runs0 = []
        for i in range(1 if args.quick else 3):
            log(f"latency at 2,000 msg/s, producer linger.ms=0, run {i + 1}")
            kafka.create_topic(f"benchlat0ms{i}", 6)
            runs0.append(
                latency(kafka, f"benchlat0ms{i}", 2_000, 10 if args.quick else 15, redis_store, work, 0)
            )
        lat0 = medians(runs0)

        log(f"memory: {n_mem} records")
        preload(kafka, "benchmem", 6, n_mem, "bm")
        mem = sidecar_consume(kafka, "benchmem", n_mem, redis_store, work, "memory run", memory=True)

        log("publish")
        kafka.create_topic("benchpub", 6)
        pub_base = raw_publish(kafka, "benchpub", n_pub)
        publish = [
            pub_base,
            sidecar_publish(kafka, "benchpub", n_pub, redis_store, work, 500),
            sidecar_publish(kafka, "benchpub", n_pub, sqlite_store, work, 500, store_name="SQLite"),
            sidecar_publish(kafka, "benchpub", n_unary, redis_store, work, 1),
            sidecar_publish(kafka, "benchpub", n_pub, redis_store, work, 1, coalesce=True),
            # What bounds PublishBatch: the same calls with the store, then the producer, left out.
            *(sidecar_publish(kafka, "benchpub", n_pub, {}, work, 500, ceiling=mode) for mode in CEILINGS),
        ]

        # The two headline ratios once more, as alternating pairs: one run of each is at the
        # mercy of whatever else the shared machine does in those seconds.
        pairs: dict[str, list[tuple[float, float]]] = {  # (sidecar, raw)
            "consume": [],
            "publish": [],
            "publish_bound": [],
        }
        budgets: dict[str, list[dict[str, Any]]] = {"consume": [], "publish": []}
        for i in range(1 if args.quick else 3):
            log(f"repeated pairs, round {i + 1}")
            raw_rate = pair_round(
                kafka, ("bench6", "benchpub"), (n, n_pub), redis_store, work, pairs, budgets
            )
            bound = sidecar_publish(kafka, "benchpub", n_pub, {}, work, 500, ceiling="produce")
            pairs["publish_bound"].append((bound.rate, raw_rate))

        log("workers and cores")
        results["workers"] = workers_rows(kafka, ("bench6", "benchpub"), (n, n_pub), redis_store, work)

    def row(r: Result, baseline: float) -> dict[str, Any]:
        return {
            "name": r.name,
            "records": r.records,
            "seconds": round(r.seconds, 3),
            "rate": round(r.rate),
            "ratio": round(r.rate / baseline, 3),
            **r.extra,
        }

    results["consume"] = [row(r, r.extra.pop("baseline", base.rate)) for r in consume]
    results["publish"] = [row(r, pub_base.rate) for r in publish]
    results["latency"] = lat
    results["latency_linger0"] = lat0
    results["memory"] = {"records": n_mem, **mem.extra}
    results["pairs"] = summarize_pairs(pairs)
    results["budget"] = {**budgets, "cpus": os.cpu_count()}
    saved_path = ROOT / "bench" / "results.json"
    if saved_path.exists():
        saved = json.loads(saved_path.read_text())
        for own in ("cluster", "per_call"):  # from their own runs (--cluster, bench/percall.py)
            if own in saved:
                results[own] = saved[own]
    saved_path.write_text(json.dumps(results, indent=2) + "\n")
    png = Path(args.out).with_suffix(".png")
    have_plot = plot(results, png)
    write_markdown(results, Path(args.out), png.name if have_plot else None)
    log(f"wrote {args.out}")
    return 0


def cluster_rows(n: int, n_pub: int, rounds: int) -> dict[str, Any]:
    """Consume and PublishBatch on a three-broker cluster (replication factor 3, min.insync.replicas
    2, acks=all), each against the raw client on the same cluster, as alternating pairs."""
    pairs: dict[str, list[tuple[float, float]]] = {"consume": [], "publish": []}
    with (
        tempfile.TemporaryDirectory(prefix="dedup-bench-cluster-") as tmp,
        services.KafkaCluster.start(Path(tmp) / "kafka", quick_start=False) as cluster,
        services.RedisServer.start(Path(tmp) / "redis", appendonly="no") as redis,
    ):
        work = Path(tmp)
        redis_store = {"DEDUP_STORE__BACKEND": "redis", "DEDUP_STORE__REDIS_URL": redis.url}
        log(f"cluster: preloading {n} x 1 KB records into 6 partitions, RF 3")
        preload(cluster, "cbench6", 6, n, "c6")
        cluster.create_topic("cbenchpub", 6)
        # Three fresh JVMs compile their hot paths during the first minute: the first pair ran at
        # half the later raw rate, and the raw consumer still sped up in the third. Two untimed
        # rounds of each client first.
        for i in range(2):
            log(f"cluster: warm-up round {i + 1} of 2 (not counted)")
            raw_consume(cluster, "cbench6", n)
            raw_publish(cluster, "cbenchpub", n_pub)
        for i in range(rounds):
            log(f"cluster: round {i + 1} of {rounds}")
            pair_round(cluster, ("cbench6", "cbenchpub"), (n, n_pub), redis_store, work, pairs)
    return {"records": n, "publish_records": n_pub, **summarize_pairs(pairs)}


def pair_round(
    kafka: services.KafkaShape,
    topics: tuple[str, str],
    counts: tuple[int, int],
    store: dict[str, str],
    work: Path,
    pairs: dict[str, list[tuple[float, float]]],
    budgets: dict[str, list[dict[str, Any]]] | None = None,
) -> float:
    """One raw-then-sidecar pair each for consume (topics[0], counts[0] records) and for
    PublishBatch of 500 (topics[1], counts[1]); appends (sidecar, raw) rates to ``pairs`` and
    returns the raw producer's rate. The CPU µs per record of each side go to ``consume_cpu`` and
    ``publish_cpu`` as (sidecar, raw); with ``budgets``, each side's CPU by process too."""
    raw = raw_consume(kafka, topics[0], counts[0])
    sc = sidecar_consume(kafka, topics[0], counts[0], store, work, "pair")
    pairs["consume"].append((sc.rate, raw.rate))
    pairs.setdefault("consume_cpu", []).append((sc.extra["cpu_us"], raw.extra["cpu_us"]))
    if budgets is not None:
        budgets["consume"].append(budget_pair(sc, raw))
    raw = raw_publish(kafka, topics[1], counts[1])
    sc = sidecar_publish(kafka, topics[1], counts[1], store, work, 500)
    pairs["publish"].append((sc.rate, raw.rate))
    pairs.setdefault("publish_cpu", []).append((sc.extra["cpu_us"], raw.extra["cpu_us"]))
    if budgets is not None:
        budgets["publish"].append(budget_pair(sc, raw))
    return raw.rate


def budget_pair(sc: Result, raw: Result) -> dict[str, Any]:
    return {
        "sidecar": sc.extra["cpu_by_process"],
        "raw": raw.extra["cpu_by_process"],
        "rates": [round(sc.rate), round(raw.rate)],
    }


#: (workers, taskset cores; "" = any): each worker shape pinned to one core, then free on all.
WORKER_SHAPES = [(1, "0"), (2, "0"), (1, ""), (2, "")]


def workers_rows(
    kafka: services.KafkaShape,
    topics: tuple[str, str],
    counts: tuple[int, int],
    store: dict[str, str],
    work: Path,
) -> dict[str, Any]:
    """server.workers against the cores the sidecar may use: consume with each shape of
    WORKER_SHAPES after a raw consumer run of its own, then PublishBatch with 1 and 2 workers
    after a raw producer run. The broker, Redis and the client are never pinned."""
    consume, publish = [], []
    for workers, cores in WORKER_SHAPES:
        raw = raw_consume(kafka, topics[0], counts[0])
        wrap = ["taskset", "-c", cores] if cores else []
        where = f"core {cores}" if cores else f"all {os.cpu_count()} cores"
        name = f"{workers} worker(s), {where}"
        sc = sidecar_consume(kafka, topics[0], counts[0], store, work, name, wrap=wrap, workers=workers)
        consume.append(
            {"name": name, "rate": round(sc.rate), "ratio": round(sc.rate / raw.rate, 3), **sc.extra}
        )
        log(json.dumps(consume[-1]))
    for workers in (1, 2):
        raw = raw_publish(kafka, topics[1], counts[1])
        sc = sidecar_publish(kafka, topics[1], counts[1], store, work, 500, workers=workers)
        publish.append(
            {"name": sc.name, "rate": round(sc.rate), "ratio": round(sc.rate / raw.rate, 3), **sc.extra}
        )
        log(json.dumps(publish[-1]))
    return {"consume": consume, "publish": publish, "cpus": os.cpu_count()}


def workers_section(w: dict[str, Any]) -> list[str]:
    out = [
        "",
        "## Workers and cores (`server.workers`)",
        "",
        "The sidecar as 1 or 2 worker processes, under `taskset` on one core or free on all; the "
        "broker, Redis and the benchmark's client share the machine and are never pinned. Each row "
        "is compared with a raw run of its own just before it. CPU is the supervisor's and the "
        "workers' together, per record.",
        "",
        "| consume (Redis store, batched acks) | msg/s | ratio to raw | CPU µs per record |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {x['name']} | {x['rate']} | {x['ratio']} | {x.get('cpu_us', '')} |" for x in w["consume"]),
        "",
        "| PublishBatch of 500, Redis store | msg/s | ratio to raw | CPU µs per record |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {x['name']} | {x['rate']} | {x['ratio']} | {x.get('cpu_us', '')} |" for x in w["publish"]),
    ]
    return out


def summarize_pairs(pairs: dict[str, list[tuple[float, float]]]) -> dict[str, Any]:
    """Per comparison: each pair's ratio and rates, and the median ratio."""
    return {
        k: {
            "ratios": [round(sc / raw, 3) for sc, raw in v],
            "rates": [[round(sc), round(raw)] for sc, raw in v] if not k.endswith("_cpu") else [],
            "values": [[sc, raw] for sc, raw in v] if k.endswith("_cpu") else [],
            "median": round(sorted(sc / raw for sc, raw in v)[len(v) // 2], 3),
        }
        for k, v in pairs.items()
    }


def cluster_main(args: argparse.Namespace) -> int:
    n = 20_000 if args.quick else args.records
    saved_path = ROOT / "bench" / "results.json"
    saved = json.loads(saved_path.read_text())
    saved["cluster"] = cluster_rows(n, max(5_000, n // 2), 1 if args.quick else 3)
    saved["cluster"]["command"] = " ".join(["scripts/bench.sh", *sys.argv[1:]])
    saved_path.write_text(json.dumps(saved, indent=2) + "\n")
    png = Path(args.out).with_suffix(".png")
    write_markdown(saved, Path(args.out), png.name if plot(saved, png) else None)
    log(f"wrote {args.out}")
    return 0


def cluster_section(c: dict[str, Any]) -> list[str]:
    rows = [
        ("consume: sidecar (Redis store, batched acks) / raw consumer", c["consume"]),
        ("PublishBatch of 500 (Redis store) / raw idempotent producer, acks=all", c["publish"]),
    ]
    return [
        "",
        "## On a replicated three-broker cluster",
        "",
        f"Generated by `{c['command']}`: three KRaft nodes (each a broker and a controller) on the same "
        "machine, replication factor 3, `min.insync.replicas` 2, every produce with `acks=all`; "
        f"{c['records']} records consumed and {c['publish_records']} published per run, the raw client "
        "and the sidecar alternating on the same cluster after two untimed warm-up rounds. Each pair: "
        "ratio (sidecar / raw msg/s). The three broker JVMs share the machine's cores with Redis, the "
        "sidecar and the client, so the rates are lower than on one broker, and noisier.",
        "",
        "| comparison | median ratio | each pair |",
        "| --- | ---: | --- |",
        *(f"| {name} | {v['median']} | {pair_cells(v)} |" for name, v in rows),
    ]


def pair_cells(pairs: dict[str, Any]) -> str:
    """Each pair's ratio, with its two rates (sidecar / raw) when the run recorded them."""
    rates = pairs.get("rates") or [None] * len(pairs["ratios"])
    return ", ".join(
        f"{ratio} ({r[0] / 1000:.1f}k / {r[1] / 1000:.1f}k)" if r else str(ratio)
        for ratio, r in zip(pairs["ratios"], rates, strict=True)
    )


def rate_table(rows: list[dict[str, Any]]) -> list[str]:
    out = [
        "| path | records | seconds | msg/s | ratio | CPU µs per record |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for x in rows:
        cpu = x.get("cpu_us", "")
        out.append(f"| {x['name']} | {x['records']} | {x['seconds']} | {x['rate']} | {x['ratio']} | {cpu} |")
    return out


def cpu_section(r: dict[str, Any]) -> list[str]:
    """The headline: CPU per record of the sidecar process next to the raw client's, from the
    repeated pairs (medians), and from the single runs of the SQLite rows."""
    pairs = r.get("pairs", {})
    if "consume_cpu" not in pairs:
        return []

    def each(v: dict[str, Any]) -> str:
        return ", ".join(f"{sc:.1f} / {raw:.1f}" for sc, raw in v["values"])

    def median(v: dict[str, Any], side: int) -> float:
        xs = sorted(x[side] for x in v["values"])
        return float(xs[len(xs) // 2])

    rows = [
        ("consume, Redis store, batched acks / raw consumer", pairs["consume_cpu"]),
        ("PublishBatch of 500, Redis store / raw idempotent producer", pairs["publish_cpu"]),
    ]
    out = [
        "",
        "## CPU per record (headline)",
        "",
        "User + system CPU of the sidecar process per record (from /proc/PID/stat, every thread), next "
        "to the raw client process's for the same records; the rate depends on what else the two cores "
        "are doing, this much less. From the repeated pairs below: the medians, and each pair as "
        "sidecar / raw µs.",
        "",
        "| comparison | sidecar µs | raw µs | multiple (median) | each pair |",
        "| --- | ---: | ---: | ---: | --- |",
        *(
            f"| {name} | {median(v, 0):.1f} | {median(v, 1):.1f} | {v['median']:.1f}x | {each(v)} |"
            for name, v in rows
        ),
    ]
    singles = [x for x in r["consume"] + r["publish"] if "SQLite" in x["name"] and "cpu_us" in x]
    if singles:
        out += ["", "Single runs with the SQLite store (the raw clients' are in the tables below):", ""]
        out += [f"- {x['name']}: {x['cpu_us']} µs per record" for x in singles]
    return out


#: The processes of a budget table, in its order, with what each is on either path.
BUDGET_ROWS = [
    ("sidecar", "the sidecar process (every thread)"),
    ("client", "the client: the raw client, or the app's side (the Python client reading and acking)"),
    ("broker", "the Kafka broker's JVM"),
    ("redis", "redis-server"),
    ("other", "the rest of the machine's busy time (the kernel's loopback work outside these, the VM)"),
]


def budget_section(r: dict[str, Any]) -> list[str]:
    """Where the machine's cores went per record on each side of the repeated pairs (medians),
    and the rate the machine could give the sidecar path if every core did nothing else."""
    b = r.get("budget")
    if not b or not b.get("consume"):
        return []
    cpus = b["cpus"]

    def med(runs: list[dict[str, Any]], side: str, key: str) -> float | None:
        xs = sorted(x[side][key] for x in runs if key in x[side])
        return xs[len(xs) // 2] if xs else None

    def cell(v: float | None) -> str:
        return "" if v is None else f"{v:.1f}"

    out = [
        "",
        "## Where the cores go, per record",
        "",
        "CPU µs per record of every process on the machine during each side of the repeated pairs "
        "(medians of the pairs), from /proc: the raw client's path against the sidecar's, consume "
        "and PublishBatch. Everything shares the machine's "
        f"{cpus} cores, so a path cannot go faster than {cpus} million µs/s divided by its machine "
        "total, whatever each process does alone; *machine ceiling* is that rate as a ratio to the "
        "raw client's measured rate.",
        "",
    ]
    for path, runs, raw_name in (
        ("consume", b["consume"], "raw consumer"),
        ("PublishBatch of 500", b["publish"], "raw idempotent producer"),
    ):
        out += [f"| {path}: process | {raw_name} µs | sidecar path µs |", "| --- | ---: | ---: |"]
        for key, label in BUDGET_ROWS:
            raw_v, sc_v = med(runs, "raw", key), med(runs, "sidecar", key)
            if raw_v is None and sc_v is None:
                continue
            out.append(f"| {label} | {cell(raw_v)} | {cell(sc_v)} |")
        raw_m, sc_m = med(runs, "raw", "machine"), med(runs, "sidecar", "machine")
        out.append(f"| **the machine, every core** | **{cell(raw_m)}** | **{cell(sc_m)}** |")
        raw_rate = sorted(x["rates"][1] for x in runs)[len(runs) // 2]
        if sc_m:
            ceiling = cpus * 1e6 / sc_m
            measured = ", ".join(f"{x['rates'][0] / 1000:.1f}k" for x in runs)
            out += [
                "",
                f"Machine ceiling of the sidecar path: {ceiling / 1000:.1f}k records/s, "
                f"{ceiling / raw_rate:.2f}x the raw client's median {raw_rate / 1000:.1f}k; measured "
                f"{measured}. Stolen by the hypervisor "
                f"meanwhile: {cell(med(runs, 'sidecar', 'stolen'))} µs per record.",
                "",
            ]
    return out


def latency_table(lat: dict[str, Any]) -> list[str]:
    out = ["| path | p50 ms | p99 ms | samples | runs (p50/p99 ms) |", "| --- | ---: | ---: | ---: | --- |"]
    for name, v in lat.items():
        each = ", ".join(f"{x['p50_ms']:.1f}/{x['p99_ms']:.1f}" for x in v.get("runs", []))
        out.append(f"| {name} | {v['p50_ms']:.1f} | {v['p99_ms']:.1f} | {v['samples']} | {each} |")
    return out


def write_markdown(r: dict[str, Any], path: Path, png: str | None) -> None:
    m = r["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `" + r["command"] + "` (bench/run.py). Do not edit by hand; rerun it.",
        "",
        f"Machine: {m['cpus']} CPUs, {m['platform']}, Python {m['python']}, grpcio {m['grpcio']}, "
        f"confluent-kafka {m['confluent_kafka']} (librdkafka {m['librdkafka']}), Apache Kafka {m['kafka']} "
        "(single broker on loopback, with the broker JVM tuning of Kafka's operations docs), "
        "Redis from Debian. Everything — broker, Redis, sidecar, client "
        "and baseline — shares the same cores, so read the ratios, not the absolute rates.",
        "",
        "The Redis store's other shapes (a three-master Redis Cluster, WAIT for a replica, a "
        "Sentinel primary) are measured next to one node, as ratios to the raw client in the same run, "
        "by `scripts/capacity.sh` (bench/capacity.py): see [CAPACITY.md](CAPACITY.md).",
        *cpu_section(r),
        "",
        "## Consume: end to end, 1 KB records",
        "",
        "Ratio is throughput divided by the raw consumer's in the same run (same topic data). "
        "Rows with a partition count compare against a raw consumer on that topic.",
        "",
        *rate_table(r["consume"]),
        "",
        "## Publish, 1 KB records",
        "",
        "Rows marked *bound* are not the product: bench/ceiling.py answers the same PublishBatch calls "
        "with parts of the work left out (the store and the digest; then Kafka too), to show what "
        "each layer costs.",
        "",
        *rate_table(r["publish"]),
    ]
    if "pairs" in r:
        c, p = r["pairs"]["consume"], r["pairs"]["publish"]
        lines += [
            "",
            "## Headline ratios, repeated",
            "",
            "The same two comparisons again, as alternating pairs (raw, then sidecar) later in the run.",
            "",
            "| comparison | median ratio | each pair |",
            "| --- | ---: | --- |",
            f"| sidecar (Redis, batched acks) / raw consumer | {c['median']} | {pair_cells(c)} |",
            f"| PublishBatch / raw idempotent producer | {p['median']} | {pair_cells(p)} |",
        ]
        if "publish_bound" in r["pairs"]:
            b = r["pairs"]["publish_bound"]
            lines.append(
                f"| bound: gRPC and the sidecar's producer, no store / the same raw producer | {b['median']} "
                f"| {pair_cells(b)} |"
            )
    lines += budget_section(r)
    lines += [
        "",
        "## Produce-to-app latency at 2,000 msg/s",
        "",
        "In each run a producer process sends 2,000 records/s with `linger.ms=5` (librdkafka's "
        "default) and the first 8 s are dropped (warm-up). The table gives the median of each figure "
        "over the runs, and every run's p50/p99.",
        "",
        *latency_table(r["latency"]),
        "",
        "The same with `linger.ms=0`: every record is its own produce request, 2,000 requests/s, "
        "and records reach the sidecar one or two per fetch. The two cores are then nearly "
        "saturated (see What limits latency below).",
        "",
        *latency_table(r.get("latency_linger0", {})),
    ]
    mem = r["memory"]
    lines += [
        "",
        "## Memory",
        "",
        f"Sidecar RSS: {mem.get('rss_start_mb', 0):.0f} MB at start, {mem.get('rss_10pct_mb', 0):.0f} MB "
        f"after {mem['records'] // 10} records, {mem.get('rss_end_mb', 0):.0f} MB after {mem['records']}.",
    ]
    if "per_call" in r:
        lines += percall_report.section(r["per_call"])
    if "workers" in r:
        lines += workers_section(r["workers"])
    if "cluster" in r:
        lines += cluster_section(r["cluster"])
    if png:
        lines += ["", f"![throughput ratios]({png})"]
    analysis = ROOT / "bench" / "ANALYSIS.md"
    if analysis.exists():
        lines += ["", analysis.read_text().rstrip()]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
