"""One Kafka node in KRaft mode (broker and controller in one process): its JVM, its
formatting, its start and restart, and topic creation."""

from __future__ import annotations

import base64
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .install import LOG4J2, java_binary, kafka_lib_dir, log
from .processes import Service, free_port, spawn, wait_port

#: produce request over 512 KB is a humongous allocation, and a broker taking 500-record batches
#: from one client spent 3-4x the CPU per record it spends with this tuning.
PRODUCTION_JVM = [
    "-Xmx6g",
    "-Xms6g",
    "-XX:MetaspaceSize=96m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:G1HeapRegionSize=16M",
    "-XX:MinMetaspaceFreeRatio=50",
    "-XX:MaxMetaspaceFreeRatio=80",
    "-XX:+ExplicitGCInvokesConcurrent",
]
QUICK_JVM = ["-Xms256m", "-Xmx768m", "-XX:+UseG1GC", "-XX:TieredStopAtLevel=1"]


def new_cluster_id() -> str:
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def broker_jvm(workdir: Path, quick_start: bool, heap: str | None = None) -> list[str]:
    """The broker's java command line up to its main class. ``heap`` replaces the production
    heap size (three nodes of 6 GB do not fit next to everything else on a test machine)."""
    flags = QUICK_JVM if quick_start else PRODUCTION_JVM
    if heap is not None and not quick_start:
        flags = [f"-Xmx{heap}", f"-Xms{heap}", *(f for f in flags if not f.startswith(("-Xmx", "-Xms")))]
    return [
        java_binary(),
        *flags,
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={LOG4J2}",
        f"-Dkafka.logs.dir={workdir}",
        "-cp",
        f"{kafka_lib_dir()}/*",
    ]


def format_node(jvm: list[str], workdir: Path, props: dict[str, str], cluster_id: str) -> Path:
    """Write a node's server.properties and format its log directory for ``cluster_id``."""
    config = workdir / "server.properties"
    config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    fmt = subprocess.run(
        [*jvm, "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}", "--config", str(config)],
        capture_output=True,
        text=True,
    )
    if fmt.returncode != 0:
        raise RuntimeError(f"kafka StorageTool format failed:\n{fmt.stdout}\n{fmt.stderr}")
    return config


def spawn_node(jvm: list[str], workdir: Path, config: Path) -> subprocess.Popen[bytes]:
    with open(workdir / "stdout.log", "ab") as out:
        return spawn([*jvm, "kafka.Kafka", str(config)], stdout=out, stderr=subprocess.STDOUT)


def wait_brokers(bootstrap: str, brokers: int, deadline: float, node: Service | None = None) -> None:
    try:
        from confluent_kafka.admin import AdminClient
    except ImportError:  # the services can run before the venv exists
        return
    admin = AdminClient({"bootstrap.servers": bootstrap})
    last: object = None
    while time.monotonic() < deadline:
        if node is not None and not node.alive():
            raise RuntimeError(f"Kafka broker exited with code {node.proc.returncode}")
        try:
            md = admin.list_topics(timeout=2)
            if len(md.brokers) >= brokers:
                return
            last = f"{len(md.brokers)} of {brokers} brokers registered"
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"Kafka not ready in time: {last}")


def create_topic_on(
    bootstrap: str, name: str, partitions: int, replication_factor: int, config: dict[str, str] | None
) -> None:
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    fut = admin.create_topics([NewTopic(name, partitions, replication_factor, config=config or {})])[name]
    fut.result(30)
    # Metadata propagates asynchronously; wait until every partition has a leader.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        md = admin.list_topics(name, timeout=5).topics.get(name)
        if md is None or md.error or len(md.partitions) != partitions:
            time.sleep(0.1)
            continue
        if all(p.leader >= 0 for p in md.partitions.values()):
            return
        time.sleep(0.1)
    raise TimeoutError(f"topic {name} has no leaders after 30s")


@dataclass
class KafkaBroker(Service):
    port: int = 0
    controller_port: int = 0
    node_id: int = 1
    #: Brokers a metadata request must list before a restarted broker counts as ready.
    cluster_size: int = 1

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @classmethod
    def start(
        cls,
        workdir: Path,
        timeout: float = 90.0,
        extra_properties: dict[str, str] | None = None,
        advertised_port: int | None = None,
        quick_start: bool = True,
    ) -> KafkaBroker:
        """Start a broker. ``advertised_port`` makes it advertise another port (a fault proxy's).

        ``quick_start`` stops the JIT at its first tier and keeps the heap small: the broker is up
        sooner and tests start many brokers, but it then needs more CPU per request. Benchmarks
        pass False and get PRODUCTION_JVM.
        """
        workdir.mkdir(parents=True, exist_ok=True)
        port, cport = free_port(), free_port()
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{cport}",
            "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{advertised_port or port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(workdir / "data"),
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "3",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # Share groups: let tests lower a group's record lock below the 15 s floor.
            "group.share.min.record.lock.duration.ms": "1000",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            "log.flush.interval.messages": "9223372036854775807",
        }
        props.update(extra_properties or {})
        jvm = broker_jvm(workdir, quick_start)
        config = format_node(jvm, workdir, props, new_cluster_id())
        proc = spawn_node(jvm, workdir, config)
        log_path = workdir / "server.log"
        broker = cls(proc=proc, workdir=workdir, log_path=log_path, port=port, controller_port=cport)
        try:
            deadline = time.monotonic() + timeout
            wait_port(port, deadline, proc, "Kafka broker")
            broker.wait_ready(deadline)
        except BaseException:
            log(broker.log_tail())
            broker.stop()
            raise
        return broker

    def restart(self, timeout: float = 90.0) -> None:
        """Start the broker again on the same ports and data (after kill or stop)."""
        self.stop()
        config = self.workdir / "server.properties"
        jvm_cmd = [str(a) for a in self.proc.args]  # type: ignore[union-attr]
        jvm_cmd[-1] = str(config)
        with open(self.workdir / "stdout.log", "ab") as out:
            self.proc = spawn(jvm_cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        wait_port(self.port, deadline, self.proc, "Kafka broker")
        self.wait_ready(deadline, self.cluster_size)

    def wait_ready(self, deadline: float, brokers: int = 1) -> None:
        """Wait until a real metadata request lists ``brokers`` brokers."""
        wait_brokers(self.bootstrap_servers, brokers, deadline, self)

    def create_topic(
        self,
        name: str,
        partitions: int = 1,
        config: dict[str, str] | None = None,
        replication_factor: int = 1,
    ) -> None:
        create_topic_on(self.bootstrap_servers, name, partitions, replication_factor, config)

    def __enter__(self) -> KafkaBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
