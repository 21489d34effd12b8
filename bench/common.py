"""What every benchmark shares: the preloaded data, a sidecar in its own process, and the CPU
accounting (per process, from /proc) that every row's figures come from.

It puts ``deploy/local`` on ``sys.path`` so that the services package imports as ``services``."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "deploy" / "local"))
import services as services  # noqa: E402  (re-exported: the benchmarks import it from here)

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
        # bench/tools/ab.py points PYTHONPATH at another build.
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
