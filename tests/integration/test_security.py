"""The app-facing surface, secured, against real sidecar processes on a real broker: TLS and mTLS
(with certificates replaced while running), a Unix socket, the refusal of an unauthenticated remote
listen, token files that rotate, per-credential topic rights, and secrets kept out of every output.
Certificates come from deploy/local/certs.py."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import certs
import grpc
import pytest
import services
from dedup_client import DedupClient

from sidecar._proto import dedup_pb2 as pb
from sidecar._proto import dedup_pb2_grpc as pb_grpc
from tests.integration.helpers import ROOT, SidecarProcess, process_env, unique

pytestmark = pytest.mark.integration


async def status_of(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


@asynccontextmanager
async def sidecar_process(
    kafka: services.KafkaBroker, tmp_path: Path, topics: list[str], **env: str
) -> AsyncIterator[SidecarProcess]:
    """A sidecar process whose health checks answer on a plain loopback port (server.health_listen),
    so it can be waited for whatever its API port asks of callers."""
    health = f"127.0.0.1:{services.free_port()}"
    base = process_env(kafka, topics[0], unique("g"), None, DEDUP_SERVER__HEALTH_LISTEN=health)
    base["DEDUP_STORE__SQLITE_PATH"] = str(tmp_path / "dedup.sqlite3")
    base["DEDUP_KAFKA__TOPICS"] = json.dumps(topics)
    proc = SidecarProcess({**base, **env}, tmp_path / f"sidecar-{unique('p')}.log")
    proc.start()
    try:
        await proc.wait_serving()
        yield proc
    finally:
        killed = proc.proc is not None and proc.proc.returncode == -9  # by the test
        assert proc.terminate() == (-9 if killed else 0), proc.log_path.read_text()[-3000:]


def tls_env(ca: certs.CertificateAuthority, mtls: bool) -> dict[str, str]:
    env = {
        "DEDUP_SERVER__TLS_CERT_FILE": str(ca.dir / "server.pem"),
        "DEDUP_SERVER__TLS_KEY_FILE": str(ca.dir / "server.key"),
    }
    if mtls:
        env["DEDUP_SERVER__TLS_CLIENT_CA_FILE"] = str(ca.cert)
    return env


async def test_mtls_identities_get_their_own_topic_rights(
    kafka: services.KafkaBroker, test_ca: certs.CertificateAuthority, tmp_path: Path
) -> None:
    orders, payments = unique("orders"), unique("payments")
    kafka.create_topic(orders, 1)
    kafka.create_topic(payments, 1)
    app = test_ca.issue("orders-app", ["URI:spiffe://test/ns/shop/sa/orders"])
    stranger = test_ca.issue("stranger", ["URI:spiffe://test/ns/other/sa/x"])
    other_ca = certs.CertificateAuthority(tmp_path / "other-ca", name="another-ca")
    forged = other_ca.issue("orders-app", ["URI:spiffe://test/ns/shop/sa/orders"])
    credentials = [
        {
            "name": "orders",
            "identities": ["spiffe://test/ns/shop/sa/orders"],
            "subscribe": [orders],
            "publish": [f"{orders[:6]}*"],
        },
        {"name": "ops", "token": "ops-token-77", "admin": True, "identities": ["stranger-is-not-this"]},
    ]
    env = {**tls_env(test_ca, mtls=True), "DEDUP_SERVER__CREDENTIALS": json.dumps(credentials)}
    async with sidecar_process(kafka, tmp_path, [orders, payments], **env) as sc:

        def client(cert: certs.Issued | None, token: str | None = None) -> DedupClient:
            return DedupClient(
                sc.target,
                token,
                tls_ca_file=str(test_ca.cert),
                tls_server_name="localhost",
                tls_cert_file=str(cert.cert) if cert else None,
                tls_key_file=str(cert.key) if cert else None,
            )

        # A plaintext dial, TLS without a client certificate, and a certificate from another CA
        # never get past the handshake.
        async with DedupClient(sc.target) as plain:
            assert (await status_of(plain.publish(orders, b"x")))[0] is grpc.StatusCode.UNAVAILABLE
        for c in (client(None), client(forged)):
            async with c:
                assert (await status_of(c.publish(orders, b"x")))[0] is grpc.StatusCode.UNAVAILABLE

        async with client(app) as c:
            assert (await c.publish(orders, b"ok", idempotency_key="k1")).offset == 0
            code, msg = await status_of(c.publish(payments, b"no", idempotency_key="k2"))
            assert code is grpc.StatusCode.PERMISSION_DENIED
            assert repr(payments) in msg
            assert "server.credentials[0].publish" in msg, msg
            # Subscribing to a topic outside its rights, or to all topics, is refused whole.
            for topics in ([payments], []):
                code, msg = await status_of(anext(c.subscribe(topics=topics)))
                assert code is grpc.StatusCode.PERMISSION_DENIED, (topics, code, msg)
                assert repr(payments) in msg
                assert "server.credentials[0].subscribe" in msg
            messages = c.subscribe(topics=[orders])
            m = await asyncio.wait_for(anext(messages), 30)
            # Nack with dead_letter is a right of its own, and this credential lacks it.
            code, msg = await status_of(c.nack([m.delivery_id], dead_letter=True))
            assert code is grpc.StatusCode.PERMISSION_DENIED
            assert "server.credentials[0].dead_letter" in msg
            assert (await c.ack_many([m.delivery_id]))[0].name == "OK"
            await messages.aclose()

            admin = pb_grpc.AdminServiceStub(c._channel)
            code, msg = await status_of(admin.Status(pb.StatusRequest()))
            assert code is grpc.StatusCode.PERMISSION_DENIED
            assert "server.credentials[0].admin" in msg

        # A valid certificate that no credential names is refused by name, not let in.
        async with client(stranger) as c:
            code, msg = await status_of(c.publish(orders, b"x"))
            assert code is grpc.StatusCode.PERMISSION_DENIED
            assert "spiffe://test/ns/other/sa/x" in msg
            assert "server.credentials" in msg
        # A token names its credential even over a connection with another certificate.
        async with client(stranger, token="ops-token-77") as c:
            assert (
                await pb_grpc.AdminServiceStub(c._channel).Status(pb.StatusRequest(), metadata=c._metadata)
            ).owner
            code, msg = await status_of(c.publish(orders, b"x"))
            assert code is grpc.StatusCode.PERMISSION_DENIED
            assert "'ops'" in msg
    log = sc.log_path.read_text()
    assert "ops-token-77" not in log


async def test_certificates_are_read_again_when_their_files_change(
    kafka: services.KafkaBroker, test_ca: certs.CertificateAuthority, tmp_path: Path
) -> None:
    """The sidecar starts with a certificate from one CA; the files are replaced by one from
    another CA (what a Kubernetes secret rotation does). New connections get the new one."""
    topic = unique("rotate")
    kafka.create_topic(topic, 1)
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(test_ca.dir / "server.pem", live / "tls.crt")
    shutil.copy(test_ca.dir / "server.key", live / "tls.key")
    new_ca = certs.CertificateAuthority(tmp_path / "new-ca", name="rotated-ca")
    new = new_ca.server()
    env = {
        "DEDUP_SERVER__TLS_CERT_FILE": str(live / "tls.crt"),
        "DEDUP_SERVER__TLS_KEY_FILE": str(live / "tls.key"),
        "DEDUP_SERVER__AUTH_TOKEN": "rotation-token",
        "DEDUP_SERVER__RELOAD_INTERVAL_SECONDS": "0.3",
    }
    async with sidecar_process(kafka, tmp_path, [topic], **env) as sc:

        async def publish_trusting(ca: Path) -> grpc.StatusCode:
            async with DedupClient(
                sc.target, "rotation-token", tls_ca_file=str(ca), tls_server_name="localhost"
            ) as c:
                return (await status_of(c.publish(topic, b"x", idempotency_key=unique("k"))))[0]

        assert await publish_trusting(test_ca.cert) is grpc.StatusCode.OK
        assert await publish_trusting(new_ca.cert) is grpc.StatusCode.UNAVAILABLE
        # Write the key first, then the certificate: a pair that does not match yet is skipped.
        shutil.copy(new.key, live / "tls.key")
        await asyncio.sleep(1)
        shutil.copy(new.cert, live / "tls.crt")
        deadline = time.monotonic() + 15
        while await publish_trusting(new_ca.cert) is not grpc.StatusCode.OK:
            assert time.monotonic() < deadline, "the new certificate was not picked up"
            await asyncio.sleep(0.3)
        assert await publish_trusting(test_ca.cert) is grpc.StatusCode.UNAVAILABLE
    assert "re-read the TLS certificate files" in sc.log_path.read_text()


async def test_unix_socket_listener(kafka: services.KafkaBroker, tmp_path: Path) -> None:
    topic = unique("uds")
    kafka.create_topic(topic, 1)
    sock = tmp_path / "run" / "sidecar.sock"
    sock.parent.mkdir()
    env = {"DEDUP_SERVER__LISTEN": f"unix://{sock}", "DEDUP_SERVER__SOCKET_MODE": "0660"}
    async with sidecar_process(kafka, tmp_path, [topic], **env) as sc:
        st = sock.stat()
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        async with DedupClient(f"unix://{sock}") as c:
            assert (await c.publish(topic, b"v", idempotency_key="u1")).offset == 0
            messages = c.subscribe()
            m = await asyncio.wait_for(anext(messages), 30)
            assert m.value == b"v"
            assert (await c.ack_many([m.delivery_id]))[0].name == "OK"
            await messages.aclose()
        sc.kill9()  # leaves the socket file behind
    assert sock.exists()
    # A restart replaces the stale socket file; a file that is not a socket is refused by name.
    async with sidecar_process(kafka, tmp_path, [topic], **env) as sc:
        async with DedupClient(f"unix://{sock}") as c:
            assert (await c.publish(topic, b"v", idempotency_key="u1")).duplicate
        # The admin commands find the socket from the same settings.
        status = await asyncio.to_thread(run_sidecar, sc.env, "status")
        assert status.returncode == 0, status.stderr
        assert ": ready;" in status.stdout
    assert not sock.exists()  # removed at shutdown
    sock.write_text("not a socket")
    out = start_and_fail({**env, "DEDUP_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers})
    assert "server.listen" in out
    assert "is not a socket" in out
    assert sock.read_text() == "not a socket"


def run_sidecar(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "DEDUP_SERVER__METRICS_LISTEN": "", **env}
    command = [sys.executable, "-m", "sidecar", *args]
    return subprocess.run(command, env=full, cwd=ROOT, capture_output=True, text=True, timeout=60)


def start_and_fail(env: dict[str, str], *args: str) -> str:
    """Run the sidecar expecting it to refuse to start; its stderr."""
    r = run_sidecar(env, *args)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    return r.stderr


async def test_remote_listen_needs_tls_or_a_token(kafka: services.KafkaBroker, tmp_path: Path) -> None:
    topic = unique("remote")
    kafka.create_topic(topic, 1)
    port = services.free_port()
    remote = {
        "DEDUP_SERVER__LISTEN": f"0.0.0.0:{port}",
        "DEDUP_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
    }
    err = start_and_fail(remote)
    assert "server.allow_insecure_remote = true" in err
    assert "server.tls_cert_file" in err
    assert "server.auth_token" in err
    # Said explicitly, it starts (with a warning); with a token it starts too.
    for extra in ({"DEDUP_SERVER__ALLOW_INSECURE_REMOTE": "true"}, {"DEDUP_SERVER__AUTH_TOKEN": "tok"}):
        async with sidecar_process(kafka, tmp_path, [topic], **remote, **extra) as sc:
            sc_target = f"127.0.0.1:{port}"
            async with DedupClient(sc_target, extra.get("DEDUP_SERVER__AUTH_TOKEN")) as c:
                assert (await status_of(c.publish(topic, b"x")))[0] is grpc.StatusCode.OK
        if "DEDUP_SERVER__AUTH_TOKEN" in extra:
            assert "bearer tokens cross the network in clear text" in sc.log_path.read_text()


async def test_token_file_rotation_and_no_secret_in_any_output(
    kafka: services.KafkaBroker, tmp_path: Path
) -> None:
    """Two tokens valid at once while an app moves from one to the other, with no restart. The
    tokens, a Redis password and a Kafka password never reach the log, --print-config or an
    error message."""
    topic = unique("tokens")
    kafka.create_topic(topic, 1)
    tokens = tmp_path / "tokens"
    tokens.write_text("old-token-1f2e\n")
    secrets = ["old-token-1f2e", "new-token-9a8b", "redis-pass-5c4d", "kafka-pass-7e6f"]
    env = {
        "DEDUP_SERVER__AUTH_TOKEN_FILE": str(tokens),
        "DEDUP_SERVER__RELOAD_INTERVAL_SECONDS": "0.2",
        # Set, never used: the memory store, and a property librdkafka ignores on PLAINTEXT.
        "DEDUP_STORE__REDIS_URL": "redis://app:redis-pass-5c4d@127.0.0.1:1/0",
        "DEDUP_KAFKA__PRODUCER": json.dumps({"ssl.key.password": "kafka-pass-7e6f"}),
        "DEDUP_LOG_LEVEL": "DEBUG",
    }
    async with sidecar_process(kafka, tmp_path, [topic], **env) as sc:

        async def code(token: str) -> tuple[grpc.StatusCode, str]:
            async with DedupClient(sc.target, token) as c:
                return await status_of(c.publish(topic, b"x", idempotency_key=unique("k")))

        async def until(token: str, want: grpc.StatusCode) -> None:
            deadline = time.monotonic() + 10
            while (got := await code(token))[0] is not want:
                assert time.monotonic() < deadline, (token, got)
                await asyncio.sleep(0.1)

        assert (await code("old-token-1f2e"))[0] is grpc.StatusCode.OK
        denied = await code("new-token-9a8b")
        assert denied[0] is grpc.StatusCode.UNAUTHENTICATED
        assert "server.auth_token_file" in denied[1]
        tokens.write_text("# rotating\nold-token-1f2e\nnew-token-9a8b\n")
        await until("new-token-9a8b", grpc.StatusCode.OK)
        assert (await code("old-token-1f2e"))[0] is grpc.StatusCode.OK
        tokens.write_text("new-token-9a8b\n")
        await until("old-token-1f2e", grpc.StatusCode.UNAUTHENTICATED)
        assert (await code("new-token-9a8b"))[0] is grpc.StatusCode.OK
        # An emptied file keeps the last tokens (a half-written secret must not lock the app out).
        tokens.write_text("")
        await asyncio.sleep(0.6)
        assert (await code("new-token-9a8b"))[0] is grpc.StatusCode.OK
        errors = [denied[1], (await code("old-token-1f2e"))[1]]
    printed = run_sidecar(sc.env, "--print-config").stdout
    assert json.loads(printed)["kafka"]["producer"]["ssl.key.password"] == "**********"
    # A bad value next to a secret: the error names the setting, not the value.
    bad_producer = json.dumps({"ssl.key.password": ["kafka-pass-7e6f"]})
    bad = start_and_fail({**sc.env, "DEDUP_KAFKA__PRODUCER": bad_producer})
    assert "kafka.producer.ssl.key.password" in bad
    outputs = {"log": sc.log_path.read_text(), "print-config": printed, "bad": bad}
    outputs["errors"] = " ".join(errors)
    for where, text in outputs.items():
        for secret in secrets:
            assert secret not in text, (where, secret)
    assert "re-read server.auth_token_file" in outputs["log"]


async def test_metrics_over_https(kafka: services.KafkaBroker, test_ca: certs.CertificateAuthority) -> None:
    import ssl
    import urllib.request

    from tests.integration.helpers import running_sidecar, settings_dict

    topic = unique("metrics-tls")
    kafka.create_topic(topic, 1)
    server = {
        "metrics_listen": "127.0.0.1:0",
        "metrics_tls_cert_file": str(test_ca.dir / "server.pem"),
        "metrics_tls_key_file": str(test_ca.dir / "server.key"),
    }
    async with running_sidecar(**settings_dict(kafka, [topic], unique("g"), server=server)) as sc:
        url = f"https://localhost:{sc.metrics_port}/metrics"
        trust = ssl.create_default_context(cafile=str(test_ca.cert))

        def fetch(u: str, ctx: ssl.SSLContext | None) -> str:
            with urllib.request.urlopen(u, context=ctx, timeout=10) as r:
                return str(r.read().decode())

        assert "dedup_" in await asyncio.to_thread(fetch, url, trust)
        with pytest.raises(ConnectionError):  # plain HTTP on the HTTPS port gets no metrics
            await asyncio.to_thread(fetch, url.replace("https:", "http:"), None)
