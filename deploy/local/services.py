"""Start a real Apache Kafka (KRaft: one broker, or a cluster of three) and a real Redis on 127.0.0.1.

This is the project's own way to get real services for the demo, the integration tests and the
benchmarks. It has no dependency beyond the standard library, so it can run before the virtual
environment exists; the Kafka readiness probe uses confluent-kafka when it is importable.

Usage::

    python deploy/local/services.py install        # fetch the broker jars and redis-server, once
    python deploy/local/services.py up             # start both, print their addresses, wait for Ctrl+C
    python deploy/local/services.py up --kafka cluster   # three brokers, replication factor 3

From Python::

    with KafkaBroker.start(workdir) as kafka, RedisServer.start(workdir) as redis:
        print(kafka.bootstrap_servers, redis.url)

The broker's jars come from Maven Central through ``deploy/local/kafka/pom.xml`` and are cached in
``$DEDUP_CACHE_DIR`` (default ``~/.cache/kafka-dedup-sidecar``); Redis comes from Debian's
``redis-server`` package. Both processes bind to 127.0.0.1 on ports chosen free at start.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
POM = HERE / "kafka" / "pom.xml"
LOG4J2 = HERE / "kafka" / "log4j2.properties"


def _log(msg: str) -> None:
    print(f"[services] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return Path(os.environ.get("DEDUP_CACHE_DIR", Path.home() / ".cache" / "kafka-dedup-sidecar"))


def kafka_version() -> str:
    text = POM.read_text()
    start = text.index("<kafka.version>") + len("<kafka.version>")
    return text[start : text.index("</kafka.version>", start)]


_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port free on 127.0.0.1 now, never the same one twice in this process, and below the
    kernel's ephemeral range when that has room: a client that keeps reconnecting to a port of
    that range while nothing listens (a sidecar worker restarting) may be given the same port as
    its own source port, connect to itself, and so hold the port the restarted server needs."""
    low, _ = _ephemeral_range()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10_000, low) if low > 12_000 else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port on 127.0.0.1")


def port_block(n: int) -> int:
    """A free port P with P + 1 .. P + n - 1 free too (none of them handed out before): where a
    sidecar of n workers (server.workers) listens."""
    for _ in range(100):
        port = free_port()
        with contextlib.ExitStack() as held:
            try:
                for i in range(1, n):
                    if port + i in _handed_out:
                        raise OSError(f"port {port + i} was handed out")
                    s = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    s.bind(("127.0.0.1", port + i))
            except OSError:
                continue
        _handed_out.update(range(port, port + n))
        return port
    raise RuntimeError(f"no {n} consecutive free ports on 127.0.0.1")


def _wait_port(port: int, deadline: float, proc: subprocess.Popen[bytes], what: str) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} during start-up")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not open 127.0.0.1:{port} in time")


# --------------------------------------------------------------------------------------------
# installation


def kafka_lib_dir() -> Path:
    """Return the cached directory of broker jars, resolving them with Maven on first use."""
    lib = cache_dir() / f"kafka-{kafka_version()}" / "lib"
    marker = lib / ".complete"
    if marker.exists():
        return lib
    if shutil.which("mvn") is None:
        raise RuntimeError("Maven (mvn) is needed to fetch the Kafka broker jars; install it first")
    _log(f"fetching Apache Kafka {kafka_version()} jars with Maven into {lib} (first run only)")
    tmp = lib.with_name("lib.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(
        [
            "mvn",
            "-B",
            "-q",
            "-f",
            str(POM),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={tmp}",
        ],
        check=True,
    )
    shutil.rmtree(lib, ignore_errors=True)
    tmp.rename(lib)
    marker.touch()
    return lib


def redis_server_binary() -> str:
    """Return the path of redis-server, installing Debian's package when it is missing."""
    found = shutil.which("redis-server")
    if found:
        return found
    found = debian_tool("redis-server", "redis-server")
    # Debian may start a system instance on 6379; we never use it, and leave nothing running.
    subprocess.run(["service", "redis-server", "stop"], check=False, capture_output=True)
    return found


def _apt_install(package: str) -> None:
    if os.geteuid() != 0:
        raise RuntimeError(f"{package} is missing; install Debian's package: apt-get install {package}")
    _log(f"installing Debian's {package} package (first run only)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package], check=True, env=env
    )


def debian_tool(command: str, package: str) -> str:
    """Return the path of ``command``, installing Debian's ``package`` when it is missing."""
    found = shutil.which(command)
    if not found:
        _apt_install(package)
        found = shutil.which(command)
    if not found:
        raise RuntimeError(f"apt-get installed {package} but {command} is not on PATH")
    return found


def promtool_binary() -> str:
    """Return the path of promtool (to check deploy/monitoring's alert rules): one on PATH, or
    the one in Debian's prometheus package, unpacked into the cache. The package is downloaded and
    unpacked, not installed, so no Prometheus server is set up on the machine."""
    found = shutil.which("promtool")
    if found:
        return found
    target = cache_dir() / "promtool"
    binary = target / "usr" / "bin" / "promtool"
    if binary.exists():
        return str(binary)
    target.mkdir(parents=True, exist_ok=True)
    _log("fetching promtool from Debian's prometheus package (first run only)")
    download = target / "download"
    download.mkdir(exist_ok=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    got = subprocess.run(["apt-get", "download", "-qq", "prometheus"], cwd=download, env=env, check=False)
    if got.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "download", "-qq", "prometheus"], cwd=download, env=env, check=True)
    [deb] = sorted(download.glob("prometheus_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
    deb.unlink()
    (binary.parent / "prometheus").unlink(missing_ok=True)  # the server itself is not needed
    if not binary.exists():
        raise RuntimeError(f"Debian's prometheus package has no usr/bin/promtool ({deb.name})")
    return str(binary)


def openssl_binary() -> str:
    """Return the path of openssl (for test certificates)."""
    return debian_tool("openssl", "openssl")


def java_binary() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").exists():
        return str(Path(home) / "bin" / "java")
    found = shutil.which("java")
    if not found:
        raise RuntimeError("java is needed to run the Kafka broker (Java 17 or newer); set JAVA_HOME")
    return found


# --------------------------------------------------------------------------------------------
# processes


def _start_time(pid: int) -> str | None:
    """When a process started (/proc/PID/stat), or None when it has ended: a pid with another
    start time is another process that reuses the number."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[19]
    except OSError:
        return None


def _watchdog() -> int:
    """The watchdog process (``services.py _watchdog``): read "PID STARTTIME" lines until end of
    file (the process that started the services is gone, however it ended), then SIGKILL the
    process group of every service that still runs as the same process."""
    for line in sys.stdin.read().splitlines():
        pid, start = line.split()
        if _start_time(int(pid)) == start:
            with contextlib.suppress(OSError):
                os.killpg(int(pid), signal.SIGKILL)
    return 0


class _Watchdog:
    """Ends the services this process started when it dies without stopping them.

    A test process that aborts (SIGABRT, SIGKILL, an interpreter crash) runs no ``finally`` and
    no fixture teardown, and its brokers and redis-servers, each in a session of its own, kept
    running beside the next runs. One watchdog process per starter holds the read end of a pipe;
    the end of file it sees when the starter is gone, for whatever reason, is its signal.
    """

    proc: subprocess.Popen[bytes] | None = None
    owner = 0  # the pid that started it: a forked child must not write into its parent's pipe

    @classmethod
    def watch(cls, pid: int) -> None:
        start = _start_time(pid)
        if start is None:
            return  # already gone
        if cls.proc is None or cls.proc.poll() is not None or cls.owner != os.getpid():
            cls.proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "_watchdog"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C of the starter's group must not end it first
            )
            cls.owner = os.getpid()
        assert cls.proc.stdin is not None
        cls.proc.stdin.write(f"{pid} {start}\n".encode())
        cls.proc.stdin.flush()


def spawn(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start a service in a session (and process group) of its own, watched by ``_Watchdog``."""
    proc: subprocess.Popen[bytes] = subprocess.Popen(args, start_new_session=True, **kwargs)
    _Watchdog.watch(proc.pid)
    return proc


@dataclass
class _Service:
    proc: subprocess.Popen[bytes]
    workdir: Path
    log_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the process (used by fault tests)."""
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self, timeout: float = 20.0) -> None:
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


#: The broker JVM tuning Kafka's operations documentation gives (LinkedIn's, "Java Version").
#: Its 16 MB G1 regions matter to a benchmark: with the 1 MB regions of a small heap, every
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


def _new_cluster_id() -> str:
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def _broker_jvm(workdir: Path, quick_start: bool, heap: str | None = None) -> list[str]:
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


def _format_node(jvm: list[str], workdir: Path, props: dict[str, str], cluster_id: str) -> Path:
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


def _spawn_node(jvm: list[str], workdir: Path, config: Path) -> subprocess.Popen[bytes]:
    with open(workdir / "stdout.log", "ab") as out:
        return spawn([*jvm, "kafka.Kafka", str(config)], stdout=out, stderr=subprocess.STDOUT)


def _wait_brokers(bootstrap: str, brokers: int, deadline: float, node: _Service | None = None) -> None:
    try:
        from confluent_kafka.admin import AdminClient
    except ImportError:  # services.py can run before the venv exists
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


def _create_topic(
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
class KafkaBroker(_Service):
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
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            "log.flush.interval.messages": "9223372036854775807",
        }
        props.update(extra_properties or {})
        jvm = _broker_jvm(workdir, quick_start)
        config = _format_node(
            jvm, workdir, props, base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        )
        proc = _spawn_node(jvm, workdir, config)
        log_path = workdir / "server.log"
        broker = cls(proc=proc, workdir=workdir, log_path=log_path, port=port, controller_port=cport)
        try:
            deadline = time.monotonic() + timeout
            _wait_port(port, deadline, proc, "Kafka broker")
            broker.wait_ready(deadline)
        except BaseException:
            _log(broker.log_tail())
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
        _wait_port(self.port, deadline, self.proc, "Kafka broker")
        self.wait_ready(deadline, self.cluster_size)

    def wait_ready(self, deadline: float, brokers: int = 1) -> None:
        """Wait until a real metadata request lists ``brokers`` brokers."""
        _wait_brokers(self.bootstrap_servers, brokers, deadline, self)

    def create_topic(
        self,
        name: str,
        partitions: int = 1,
        config: dict[str, str] | None = None,
        replication_factor: int = 1,
    ) -> None:
        _create_topic(self.bootstrap_servers, name, partitions, replication_factor, config)

    def __enter__(self) -> KafkaBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: Partitions of a KafkaCluster's __consumer_offsets (few: every one has three replicas to sync).
OFFSETS_PARTITIONS = 3


@dataclass(frozen=True)
class ScramListener:
    """A SASL_SSL listener with SCRAM-SHA-512 on every node of a KafkaCluster: the nodes' PEM
    key and certificate (one file, as Kafka's PEM keystore wants it) and the user to create."""

    ca_file: Path
    keystore: Path
    username: str
    password: str

    @classmethod
    def make(cls, directory: Path, username: str = "sidecar", password: str | None = None) -> ScramListener:
        """A test CA and a certificate for 127.0.0.1 and localhost (openssl), and a random password."""
        from certs import CertificateAuthority

        ca = CertificateAuthority(directory)
        issued = ca.server("kafka")
        keystore = directory / "kafka-keystore.pem"
        keystore.write_text(issued.key.read_text() + issued.cert.read_text())
        keystore.chmod(0o600)
        return cls(ca.cert, keystore, username, password or uuid.uuid4().hex)


class KafkaCluster:
    """Three (``size``) KRaft nodes on 127.0.0.1, each a combined broker and controller, with
    replication factor 3 and ``min.insync.replicas`` 2 for new topics and the internal ones.

    ``partitionable``: every link between two nodes (broker replication and the controller
    quorum, one link per direction) and every node's client port go through a FaultProxy, so
    ``cut_off(node)`` isolates one node from the others and from clients at once. Each node uses
    a replication listener of its own (``inter.broker.listener.name`` = FROM<id>) that the other
    nodes advertise through the proxy for that direction.

    ``scram``: also a SASL_SSL listener (SCRAM-SHA-512) on each node; ``secure_bootstrap_servers``.
    """

    def __init__(self, workdir: Path, nodes: list[KafkaBroker], client_ports: dict[int, int]) -> None:
        self.workdir = workdir
        self.nodes = nodes
        self.client_ports = client_ports  # node id -> the port clients are told (a proxy's, or its own)
        self.secure_ports: dict[int, int] = {}
        self.proxies: Any = None  # faultproxy.ProxyThread when partitionable
        self.links: dict[tuple[str, int, int], Any] = {}  # (kind, from id or 0 for clients, to id)

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(f"127.0.0.1:{self.client_ports[n.node_id]}" for n in self.nodes)

    @property
    def secure_bootstrap_servers(self) -> str:
        return ",".join(f"127.0.0.1:{self.secure_ports[n.node_id]}" for n in self.nodes)

    @classmethod
    def start(
        cls,
        workdir: Path,
        size: int = 3,
        partitionable: bool = False,
        scram: ScramListener | None = None,
        extra_properties: dict[str, str] | None = None,
        quick_start: bool = True,
        timeout: float = 120.0,
    ) -> KafkaCluster:
        workdir.mkdir(parents=True, exist_ok=True)
        ids = list(range(1, size + 1))
        client = {i: free_port() for i in ids}
        controller = {i: free_port() for i in ids}
        secure = {i: free_port() for i in ids} if scram else {}
        # from_port[(src, dst)]: dst's listener for replication fetches from src.
        from_port = {(a, b): free_port() for a in ids for b in ids}
        hub = None
        advertised_client = dict(client)
        # What src dials to reach dst: through a proxy per direction, or directly.
        reach_replica = {(a, b): from_port[(a, b)] for a in ids for b in ids}
        reach_controller = {(a, b): controller[b] for a in ids for b in ids}
        links: dict[tuple[str, int, int], Any] = {}
        if partitionable:
            from faultproxy import ProxyThread

            hub = ProxyThread()
            for i in ids:
                advertised_client[i] = free_port()
                links[("client", 0, i)] = hub.add(advertised_client[i], client[i])
            for a in ids:
                for b in ids:
                    if a == b:
                        continue
                    reach_replica[(a, b)] = free_port()
                    links[("replica", a, b)] = hub.add(reach_replica[(a, b)], from_port[(a, b)])
                    reach_controller[(a, b)] = free_port()
                    links[("controller", a, b)] = hub.add(reach_controller[(a, b)], controller[b])
        rf = str(min(size, 3))
        isr = str(min(size - 1, 2)) if size > 1 else "1"
        cluster_id = _new_cluster_id()
        nodes: list[KafkaBroker] = []
        try:
            for i in ids:
                names = [f"FROM{a}" for a in ids]
                listeners = [f"CLIENT://127.0.0.1:{client[i]}", f"CONTROLLER://127.0.0.1:{controller[i]}"]
                listeners += [f"FROM{a}://127.0.0.1:{from_port[(a, i)]}" for a in ids]
                advertised = [f"CLIENT://127.0.0.1:{advertised_client[i]}"]
                advertised += [f"FROM{a}://127.0.0.1:{reach_replica[(a, i)]}" for a in ids]
                protocols = ["CLIENT:PLAINTEXT", "CONTROLLER:PLAINTEXT", *(f"{n}:PLAINTEXT" for n in names)]
                props = {
                    "process.roles": "broker,controller",
                    "node.id": str(i),
                    "controller.quorum.voters": ",".join(
                        f"{b}@127.0.0.1:{reach_controller[(i, b)]}" for b in ids
                    ),
                    "controller.listener.names": "CONTROLLER",
                    "inter.broker.listener.name": f"FROM{i}",
                    "log.dirs": str(workdir / f"node{i}" / "data"),
                    "num.partitions": "1",
                    "default.replication.factor": rf,
                    "min.insync.replicas": isr,
                    "offsets.topic.replication.factor": rf,
                    "offsets.topic.num.partitions": str(OFFSETS_PARTITIONS),
                    "transaction.state.log.replication.factor": rf,
                    "transaction.state.log.min.isr": isr,
                    "share.coordinator.state.topic.replication.factor": rf,
                    "share.coordinator.state.topic.min.isr": isr,
                    "group.initial.rebalance.delay.ms": "0",
                    "auto.create.topics.enable": "false",
                    "unclean.leader.election.enable": "false",
                    # Faults end sooner: a cut-off follower leaves the ISR after 8 s, a silent
                    # broker is fenced by the controller after 6 s.
                    "replica.lag.time.max.ms": "8000",
                    "broker.session.timeout.ms": "6000",
                    "broker.heartbeat.interval.ms": "1000",
                    "log.flush.interval.messages": "9223372036854775807",
                }
                if scram:
                    listeners.append(f"SECURE://127.0.0.1:{secure[i]}")
                    advertised.append(f"SECURE://127.0.0.1:{secure[i]}")
                    protocols.append("SECURE:SASL_SSL")
                    props.update(
                        {
                            "sasl.enabled.mechanisms": "SCRAM-SHA-512",
                            "listener.name.secure.sasl.enabled.mechanisms": "SCRAM-SHA-512",
                            "listener.name.secure.scram-sha-512.sasl.jaas.config": (
                                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
                            ),
                            "listener.name.secure.ssl.keystore.type": "PEM",
                            "listener.name.secure.ssl.keystore.location": str(scram.keystore),
                        }
                    )
                props["listeners"] = ",".join(listeners)
                props["advertised.listeners"] = ",".join(advertised)
                props["listener.security.protocol.map"] = ",".join(protocols)
                props.update(extra_properties or {})
                nodedir = workdir / f"node{i}"
                nodedir.mkdir(parents=True, exist_ok=True)
                jvm = _broker_jvm(nodedir, quick_start, heap="2g")
                config = _format_node(jvm, nodedir, props, cluster_id)
                nodes.append(
                    KafkaBroker(
                        proc=_spawn_node(jvm, nodedir, config),
                        workdir=nodedir,
                        log_path=nodedir / "server.log",
                        port=client[i],
                        controller_port=controller[i],
                        node_id=i,
                        cluster_size=size,
                    )
                )
            deadline = time.monotonic() + timeout
            for n in nodes:
                _wait_port(n.port, deadline, n.proc, f"Kafka node {n.node_id}")
            cluster = cls(workdir, nodes, advertised_client)
            cluster.secure_ports = secure
            cluster.proxies, cluster.links = hub, links
            _wait_brokers(cluster.bootstrap_servers, size, deadline)
            if scram:
                cluster.add_scram_user(scram.username, scram.password)
        except BaseException:
            for n in nodes:
                _log(f"node {n.node_id}:\n{n.log_tail(15)}")
                n.stop()
            if hub is not None:
                hub.stop()
            raise
        _log(f"Kafka cluster of {size} nodes at {cluster.bootstrap_servers}")
        return cluster

    def add_scram_user(self, username: str, password: str) -> None:
        """Create (or update) a SCRAM-SHA-512 user with Kafka's own admin tool (kafka-configs)."""
        jvm = _broker_jvm(self.workdir, True)
        done = subprocess.run(
            [
                *jvm,
                "kafka.admin.ConfigCommand",
                "--bootstrap-server",
                f"127.0.0.1:{self.nodes[0].port}",
                "--alter",
                "--add-config",
                f"SCRAM-SHA-512=[iterations=8192,password={password}]",
                "--entity-type",
                "users",
                "--entity-name",
                username,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"kafka-configs could not create SCRAM user {username}:\n{done.stderr}")

    def node(self, node_id: int) -> KafkaBroker:
        return next(n for n in self.nodes if n.node_id == node_id)

    def admin(self) -> Any:
        from confluent_kafka.admin import AdminClient

        return AdminClient({"bootstrap.servers": self.bootstrap_servers})

    def create_topic(
        self,
        name: str,
        partitions: int = 1,
        config: dict[str, str] | None = None,
        replication_factor: int = 3,
    ) -> None:
        _create_topic(
            self.bootstrap_servers, name, partitions, min(replication_factor, len(self.nodes)), config
        )

    def leaders(self, topic: str) -> dict[int, int]:
        """Partition -> the node id leading it (-1: none now)."""
        md = self.admin().list_topics(topic, timeout=10).topics[topic]
        return {p: m.leader for p, m in md.partitions.items()}

    def coordinator_of(self, group: str) -> int:
        """The node id of ``group``'s coordinator (-1: none now): the leader of the
        __consumer_offsets partition the group hashes to, as Kafka places it. Read from metadata,
        not with DescribeGroups: librdkafka aborts the process when a DescribeGroups request to a
        dead coordinator times out (librdkafka issue 4605, an assertion on eonce->refcnt)."""
        h = 0
        for unit in group.encode("utf-16-be").hex(" ", 2).split():  # Java's String.hashCode
            h = (31 * h + int(unit, 16)) & 0xFFFFFFFF
        signed = h - (1 << 32) if h & 0x80000000 else h
        partition = (0 if signed == -(1 << 31) else abs(signed)) % OFFSETS_PARTITIONS  # Kafka's Utils.abs
        return self.leaders("__consumer_offsets").get(partition, -1)

    def under_replicated(self, topics: list[str] | None = None) -> int:
        """Partitions (of ``topics``, default all, internal ones included) whose ISR is short of
        their replicas, or that have no leader."""
        md = self.admin().list_topics(timeout=10)
        short = 0
        for name, t in md.topics.items():
            if topics is not None and name not in topics:
                continue
            short += sum(1 for p in t.partitions.values() if p.leader < 0 or len(p.isrs) < len(p.replicas))
        return short

    def wait_in_sync(self, topics: list[str] | None = None, timeout: float = 120.0) -> float:
        """Wait until every replica of ``topics`` is in sync again; returns the seconds it took."""
        t0 = time.monotonic()
        _wait_until(
            "the cluster's replicas to be in sync", lambda: self.under_replicated(topics) == 0, timeout
        )
        return time.monotonic() - t0

    def cut_off(self, node_id: int, mode: str = "blackhole") -> None:
        """Isolate a node (partitionable clusters): nothing reaches it, nothing from it arrives."""
        self._set_links(node_id, mode)

    def heal(self, node_id: int) -> None:
        self._set_links(node_id, "pass")

    def _set_links(self, node_id: int, mode: str) -> None:
        if self.proxies is None:
            raise RuntimeError("this cluster was started without partitionable=True")
        for (_, src, dst), proxy in self.links.items():
            if node_id in (src, dst):
                self.proxies.set_mode(proxy, mode)

    def stop(self) -> None:
        """Stop every node at once (one by one, each would wait on the others' controlled shutdown)."""
        for n in self.nodes:
            if n.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(n.proc.pid, signal.SIGCONT)
                n.proc.terminate()
        deadline = time.monotonic() + 15
        for n in self.nodes:
            try:
                n.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                n.kill()
        if self.proxies is not None:
            self.proxies.stop()
            self.proxies = None

    def __enter__(self) -> KafkaCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


KafkaShape = KafkaBroker | KafkaCluster


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def generate(cls, directory: Path) -> TlsFiles:
        """Make the files with openssl (valid one day; the server's SAN is IP 127.0.0.1 and localhost)."""
        openssl = openssl_binary()
        directory.mkdir(parents=True, exist_ok=True)
        d = directory

        def run(*args: str) -> None:
            subprocess.run([openssl, *args], check=True, capture_output=True)

        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=dedup-test-ca",
            "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"))  # fmt: skip
        for name, ext in (
            ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
            ("client", "extendedKeyUsage=clientAuth"),
        ):
            (d / f"{name}.ext").write_text(ext + "\n")
            run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=dedup-test-{name}",
                "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))  # fmt: skip
            run("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.crt"),
                "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "1",
                "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.crt"))  # fmt: skip
        return cls(d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key")


def redis_cli_binary() -> str:
    """Return the path of redis-cli (Debian's redis-tools, which redis-server brings)."""
    if not shutil.which("redis-cli"):
        redis_server_binary()
    return debian_tool("redis-cli", "redis-tools")


@dataclass
class RedisServer(_Service):
    port: int = 0
    tls: TlsFiles | None = None
    password: str | None = None  # what redis-cli authenticates with (a Sentinel's requirepass)

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @classmethod
    def start(
        cls,
        workdir: Path,
        appendonly: str = "no",
        timeout: float = 30.0,
        port: int = 0,
        password: str | None = None,
        extra_args: list[str] | None = None,
        tls: TlsFiles | None = None,
    ) -> RedisServer:
        """Start redis-server on 127.0.0.1. ``tls``: serve TLS only (on ``port``), asking clients for
        a certificate signed by its CA but not requiring one. ``extra_args``: more config flags."""
        binary = redis_server_binary()
        workdir.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        log_path = workdir / "redis.log"
        args = [binary, "--bind", "127.0.0.1"]
        if tls is None:
            args += ["--port", str(port)]
        else:
            args += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tls.server_cert),
                     "--tls-key-file", str(tls.server_key), "--tls-ca-cert-file", str(tls.ca),
                     "--tls-auth-clients", "optional"]  # fmt: skip
        args += ["--dir", str(workdir), "--save", "", "--daemonize", "no", "--logfile", str(log_path)]
        args += ["--repl-diskless-sync-delay", "0"]  # a replica syncs at once, not 5 s later
        if password:
            args += ["--requirepass", password]
        if appendonly in ("always", "everysec"):
            args += ["--appendonly", "yes", "--appendfsync", appendonly]
        else:
            args += ["--appendonly", "no"]
        args += extra_args or []
        proc = spawn(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server = cls(proc=proc, workdir=workdir, log_path=log_path, port=port, tls=tls)
        try:
            _wait_port(port, time.monotonic() + timeout, proc, "redis-server")
        except BaseException:
            _log(server.log_tail())
            server.stop()
            raise
        return server

    def restart(self) -> None:
        self.stop()
        args = [str(a) for a in self.proc.args]  # type: ignore[union-attr]
        self.proc = spawn(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, time.monotonic() + 30, self.proc, "redis-server")

    def cli(self, *command: str, timeout: float = 10) -> str:
        """Run one command with redis-cli against this server; return its raw output."""
        args = [redis_cli_binary(), "-h", "127.0.0.1", "-p", str(self.port)]
        if self.tls is not None:
            args += ["--tls", "--cacert", str(self.tls.ca)]
        if self.password:
            args += ["--no-auth-warning", "-a", self.password]
        out = subprocess.run([*args, *command], capture_output=True, text=True, timeout=timeout)
        # redis-cli exits 0 on an error reply too: it prints it (ERR, NOPERM, ...) on stdout.
        first = out.stdout.split(" ", 1)[0]
        if out.returncode != 0 or (first.isupper() and first.isalpha() and first not in ("OK", "PONG")):
            said = (out.stderr or out.stdout).strip()
            raise RuntimeError(f"redis-cli {command[0]} on {self.address}: {said}")
        return out.stdout

    def info(self, section: str) -> dict[str, str]:
        fields = (line.partition(":") for line in self.cli("INFO", section).splitlines())
        return {k: v.strip() for k, sep, v in fields if sep and not k.startswith("#")}

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait_until(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            if check():
                return
        time.sleep(0.2)
    raise TimeoutError(f"{what} not within {timeout:.0f}s")


@dataclass
class RedisCluster:
    """A real Redis Cluster on 127.0.0.1: ``masters`` masters, each with ``replicas`` replicas.

    Built with ``redis-server --cluster-enabled yes`` and ``redis-cli --cluster create``. A failed
    master's replica is promoted after ``node_timeout_ms``; a killed node that is started again
    rejoins (as a replica of whoever took its slots).
    """

    nodes: list[RedisServer]
    workdir: Path

    @property
    def url(self) -> str:
        """A start-up node; the store learns the rest of the cluster from it."""
        return self.nodes[0].url

    @classmethod
    def start(
        cls,
        workdir: Path,
        masters: int = 3,
        replicas: int = 1,
        appendonly: str = "everysec",
        node_timeout_ms: int = 2000,
        tls: TlsFiles | None = None,
    ) -> RedisCluster:
        nodes: list[RedisServer] = []
        cluster = cls(nodes, workdir)
        try:
            for i in range(masters * (1 + replicas)):
                # A replica may take over however far behind it is (validity factor 0): a test
                # cluster must fail over, and the writes that risks losing are what WAIT is for.
                extra = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                         "--cluster-port", str(free_port()), "--cluster-node-timeout", str(node_timeout_ms),
                         "--cluster-replica-validity-factor", "0"]  # fmt: skip
                node = RedisServer.start(workdir / f"node{i}", appendonly, tls=tls, extra_args=extra)
                nodes.append(node)
            create = [redis_cli_binary(), "--cluster", "create", *(n.address for n in nodes),
                      "--cluster-replicas", str(replicas), "--cluster-yes"]  # fmt: skip
            if tls is not None:
                create[1:1] = ["--tls", "--cacert", str(tls.ca)]
            out = subprocess.run(create, capture_output=True, text=True, timeout=60)
            if out.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{out.stdout}\n{out.stderr}")
            cluster.wait_ok()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def wait_ok(self, timeout: float = 60) -> None:
        """Until every live node says cluster_state:ok and every master has its replicas in sync."""

        def ok() -> bool:
            live = [n for n in self.nodes if n.alive()]
            if not all(n.info("cluster").get("cluster_enabled") == "1" for n in live):
                return False
            states = [n.cli("CLUSTER", "INFO") for n in live]
            if not all("cluster_state:ok" in s for s in states):
                return False
            masters = {n.address for n in self.masters()}
            others = [n.info("replication") for n in live if n.address not in masters]
            if not all(r.get("role") == "slave" and r.get("master_link_status") == "up" for r in others):
                return False
            # Every node's own view (gossip) agrees that the others are replicas.
            for n in live:
                view = [line.split()[2] for line in n.cli("CLUSTER", "NODES").splitlines()]
                if sum("slave" in flags and "fail" not in flags for flags in view) < len(others):
                    return False
            return True

        _wait_until("Redis Cluster state ok", ok, timeout)

    def masters(self) -> list[RedisServer]:
        """The live nodes that are masters of some slots now (read from CLUSTER NODES)."""
        live = [n for n in self.nodes if n.alive()]
        by_address = {n.address: n for n in live}
        out = []
        for line in live[0].cli("CLUSTER", "NODES").splitlines():
            fields = line.split()
            address = fields[1].split("@")[0]
            serving = "master" in fields[2] and "fail" not in fields[2] and len(fields) > 8
            if serving and address in by_address:
                out.append(by_address[address])
        return out

    def replicas_of(self, master: RedisServer) -> list[RedisServer]:
        """The live nodes replicating ``master`` now."""
        lines = [line.split() for line in master.cli("CLUSTER", "NODES").splitlines()]
        master_id = next(f[0] for f in lines if "myself" in f[2])
        addresses = {f[1].split("@")[0] for f in lines if "slave" in f[2] and f[3] == master_id}
        return [n for n in self.nodes if n.address in addresses and n.alive()]

    def node_of_slot(self, slot: int) -> RedisServer:
        live = [n for n in self.nodes if n.alive()]
        for line in live[0].cli("CLUSTER", "NODES").splitlines():
            fields = line.split()
            flags = fields[2].split(",")
            if "master" not in flags or "fail" in flags:  # "fail?" is only a suspicion: still the owner
                continue
            for part in fields[8:]:
                lo, _, hi = part.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                    address = fields[1].split("@")[0]
                    return next(n for n in self.nodes if n.address == address)
        raise RuntimeError(f"no live master owns slot {slot}")

    def kill_master(self, master: RedisServer, timeout: float = 60) -> RedisServer:
        """kill -9 a master and wait until its replica has taken its slots; returns the killed
        node (start it again with ``restart``: it rejoins as a replica)."""
        before = {n.address for n in self.masters()}
        master.kill()
        _wait_until(
            f"a replica promoted in place of {master.address}",
            lambda: len({n.address for n in self.masters()} - before) == 1 and self._state_ok(),
            timeout,
        )
        return master

    def _state_ok(self) -> bool:
        return all("cluster_state:ok" in n.cli("CLUSTER", "INFO") for n in self.nodes if n.alive())

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()

    def __enter__(self) -> RedisCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
                _wait_port(port, time.monotonic() + 30, proc, "redis-sentinel")
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

        _wait_until("Sentinel set ready", ready, timeout)

    def kill_master(self, timeout: float = 60) -> RedisServer:
        """kill -9 the primary and wait until the Sentinels have promoted a replica; returns the
        killed server (start it again with ``restart``: Sentinel turns it into a replica)."""
        old = self.master()
        old.kill()
        _wait_until(
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
            _log(f"kafka {kafka.bootstrap_servers} and {redis.url} ready in {time.monotonic() - t0:.1f}s")
            yield kafka, redis
    finally:
        if redis is not None:
            redis.stop()
        if workdir is None:
            shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["_watchdog"]:  # started by _Watchdog, not by a person: not in the help
        return _watchdog()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
        _log(f"kafka jars: {kafka_lib_dir()}")
        _log(f"redis-server: {redis_server_binary()}, redis-cli: {redis_cli_binary()}")
        _log(f"openssl: {openssl_binary()}")
        _log(f"promtool: {promtool_binary()}")
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
        _log(f"signal {stopped.signum}: stopped every service")
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


if __name__ == "__main__":
    sys.exit(main())
