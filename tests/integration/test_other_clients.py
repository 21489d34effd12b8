"""The Go and Node.js clients against a real sidecar, Kafka and Redis: publish, duplicates,
subscribe, gathered acks and the bearer token, through the code a user links. Each client's
``examples/roundtrip`` does the calls and prints its counts; this test checks them, and Kafka."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path

import certs
import pytest
import services

from tests.integration.helpers import (
    ROOT,
    SidecarProcess,
    committed_offsets,
    process_env,
    read_topic,
    running_sidecar,
    settings_dict,
    unique,
    wait_group_balanced,
)

CLIENTS = ROOT / "clients"


@pytest.fixture(scope="module", params=["go", "node"])
def roundtrip(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, list[str]]:
    """(the keys' prefix, the command that runs the client's roundtrip example)."""
    if request.param == "go":
        if shutil.which("go") is None:
            pytest.skip("Go is not installed: the Go client is not tested")
        binary = tmp_path_factory.mktemp("go") / "roundtrip"
        build = ["go", "build", "-o", str(binary), "./examples/roundtrip"]
        subprocess.run(build, cwd=CLIENTS / "go", check=True, timeout=600)
        return "go", [str(binary)]
    node = shutil.which("node")
    if node is None or not (CLIENTS / "node" / "node_modules").is_dir():
        pytest.skip("Node.js or the Node client's packages (scripts/bootstrap.sh) are missing")
    return "node", [node, str(CLIENTS / "node" / "examples" / "roundtrip.js")]


async def run(command: list[str], timeout: float) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out, err


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "streaming"])
async def test_client_publishes_once_and_acks_everything_it_receives(
    kafka: services.KafkaBroker,
    redis_server: services.RedisServer,
    roundtrip: tuple[str, list[str]],
    streaming: bool,
) -> None:
    """Publish (in one PublishBatch, or one record per publish on the client's StreamingPublish
    call), again for some keys, then consume and ack everything."""
    prefix, command = roundtrip
    topic, group = unique(prefix), unique("g")
    kafka.create_topic(topic, 3)
    n, again = 300, 25
    cfg = settings_dict(
        kafka,
        [topic],
        group,
        {"backend": "redis", "redis_url": redis_server.url, "key_prefix": unique(prefix)},
        server={"auth_token": "client-token"},
    )
    async with running_sidecar(**cfg) as sc:
        args = ["--target", f"127.0.0.1:{sc.port}", "--topic", topic, "--n", str(n), "--again", str(again)]
        if streaming:
            args.append("--streaming")
        code, out, err = await run([*command, *args, "--token", "client-token"], 120)
        assert code == 0, err.decode()
        summary = json.loads(out)
        # Every key written once; the second publish of `again` keys is answered as duplicates.
        assert summary == {"published": n, "duplicates": again, "received": n, "acked": n}, summary

        # Kafka holds each record once, and the group's commits cover all of them once acked.
        records = read_topic(kafka, topic, expect=n)
        keys = sorted(dict(m.headers() or [])["idempotency-key"].decode() for m in records)
        assert keys == sorted(f"{prefix}-{i}" for i in range(n))
        ends: dict[int, int] = {}  # per partition that got records: the offset after its last
        for m in records:
            ends[m.partition()] = max(ends.get(m.partition(), 0), m.offset() + 1)
        deadline = time.monotonic() + 15
        while (committed := committed_offsets(kafka, group, topic, 3)) and any(
            committed[p] != end for p, end in ends.items()
        ):
            assert time.monotonic() < deadline, (committed, ends)
            await asyncio.sleep(0.2)

        # Without the token the sidecar refuses; the client says so and exits non-zero.
        code, _, err = await run([*command, *args], 60)
        assert code == 1
        assert b"unauthenticated" in err.lower(), err
        assert b"server.auth_token" in err, err


@pytest.mark.parametrize("shape", ["mtls", "unix"])
async def test_client_over_mtls_and_a_unix_socket(
    kafka: services.KafkaBroker,
    roundtrip: tuple[str, list[str]],
    test_ca: certs.CertificateAuthority,
    tmp_path: Path,
    shape: str,
) -> None:
    """The same round trip through the client's TLS options against a sidecar that asks for a
    client certificate, and through a Unix socket target."""
    prefix, command = roundtrip
    topic, group = unique(f"{prefix}-{shape}"), unique("g")
    kafka.create_topic(topic, 2)
    n, again = 60, 5
    if shape == "mtls":
        client = test_ca.issue(f"{prefix}-app", [f"URI:spiffe://test/{prefix}-app"])
        server = {
            "tls_cert_file": str(test_ca.dir / "server.pem"),
            "tls_key_file": str(test_ca.dir / "server.key"),
            "tls_client_ca_file": str(test_ca.cert),
        }
    else:
        server = {"listen": f"unix://{tmp_path}/sidecar.sock", "socket_mode": "0600"}
    cfg = settings_dict(kafka, [topic], group, server=server)
    async with running_sidecar(**cfg) as sc:
        if shape == "mtls":
            target = f"127.0.0.1:{sc.port}"
            tls = ["--tls-ca", str(test_ca.cert), "--tls-server-name", "localhost"]
            tls += ["--tls-cert", str(client.cert), "--tls-key", str(client.key)]
        else:
            target, tls = f"unix://{tmp_path}/sidecar.sock", []
        args = ["--target", target, "--topic", topic, "--n", str(n), "--again", str(again), *tls]
        code, out, err = await run([*command, *args], 120)
        assert code == 0, err.decode()
        assert json.loads(out) == {"published": n, "duplicates": again, "received": n, "acked": n}
        assert len(read_topic(kafka, topic, expect=n)) == n
        if shape == "mtls":  # without the client certificate the handshake fails
            code, _, err = await run([*command, *args[:12]], 60)
            assert code == 1, err


async def test_client_subscribes_on_every_worker(
    kafka: services.KafkaBroker,
    redis_server: services.RedisServer,
    roundtrip: tuple[str, list[str]],
    tmp_path: Path,
) -> None:
    """Against a sidecar of two worker processes (server.workers), each holding half of the
    partitions: the client lists the workers, receives every record from both, and its acks
    reach the worker that delivered each one, so every partition's offset commits."""
    prefix, command = roundtrip
    topic, group = unique(f"{prefix}-workers"), unique("g")
    partitions, n, again = 6, 120, 10
    kafka.create_topic(topic, partitions)
    sc = SidecarProcess(
        process_env(
            kafka,
            topic,
            group,
            redis_server.url,
            DEDUP_SERVER__WORKERS="2",
            # Keyless records to a random partition each, so both workers' partitions get some.
            DEDUP_KAFKA__PRODUCER='{"sticky.partitioning.linger.ms": 0}',
        ),
        tmp_path / "log",
    )
    sc.start()
    try:
        await sc.wait_serving()
        await wait_group_balanced(kafka, group, 2)
        args = ["--target", sc.target, "--topic", topic, "--n", str(n), "--again", str(again)]
        code, out, err = await run([*command, *args], 120)
        assert code == 0, err.decode()
        assert json.loads(out) == {"published": n, "duplicates": again, "received": n, "acked": n}
        ends: dict[int, int] = {}
        for m in read_topic(kafka, topic, expect=n):
            ends[m.partition()] = max(ends.get(m.partition(), 0), m.offset() + 1)
        assert len(ends) == partitions
        deadline = time.monotonic() + 15
        while (committed := committed_offsets(kafka, group, topic, partitions)) != ends:
            assert time.monotonic() < deadline, (committed, ends)
            await asyncio.sleep(0.2)
    finally:
        assert sc.terminate() == 0
