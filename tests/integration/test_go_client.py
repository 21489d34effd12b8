"""The Go client (clients/go) against a real sidecar, Kafka and Redis: publish, duplicates,
subscribe and coalesced acks, and the bearer token, all through the Go code a user links."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import services

from tests.integration.helpers import (
    ROOT,
    committed_offsets,
    read_topic,
    running_sidecar,
    settings_dict,
    unique,
)

GO_CLIENT = ROOT / "clients" / "go"


@pytest.fixture(scope="module")
def roundtrip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("go") is None:
        pytest.skip("Go is not installed: the Go client is not tested")
    binary = tmp_path_factory.mktemp("go") / "roundtrip"
    subprocess.run(
        ["go", "build", "-o", str(binary), "./examples/roundtrip"], cwd=GO_CLIENT, check=True, timeout=600
    )
    return binary


async def test_go_client_publishes_once_and_acks_everything_it_receives(
    kafka: services.KafkaBroker, redis_server: services.RedisServer, roundtrip: Path
) -> None:
    topic, group = unique("go"), unique("g")
    kafka.create_topic(topic, 3)
    n, again = 300, 25
    cfg = settings_dict(
        kafka,
        [topic],
        group,
        {"backend": "redis", "redis_url": redis_server.url, "key_prefix": unique("go")},
        server={"auth_token": "go-token"},
    )
    async with running_sidecar(**cfg) as sc:
        args = ["-target", f"127.0.0.1:{sc.port}", "-topic", topic, "-n", str(n), "-again", str(again)]
        proc = await asyncio.create_subprocess_exec(
            str(roundtrip), *args, "-token", "go-token", stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        summary = json.loads(out)
        # Every key written once; the second publish of `again` keys is answered as duplicates.
        assert summary == {"published": n, "duplicates": again, "received": n, "acked": n}, summary

        # Kafka holds each record once, and the group's commits cover all of them once acked.
        records = read_topic(kafka, topic, expect=n)
        keys = sorted(dict(m.headers() or [])["idempotency-key"].decode() for m in records)
        assert keys == sorted(f"go-{i}" for i in range(n))
        deadline = time.monotonic() + 15
        while sum(committed_offsets(kafka, group, topic, 3).values()) != n:
            assert time.monotonic() < deadline, committed_offsets(kafka, group, topic, 3)
            await asyncio.sleep(0.2)

        # Without the token the sidecar refuses, and the Go client reports it and exits non-zero.
        proc = await asyncio.create_subprocess_exec(
            str(roundtrip), *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 1
        assert b"Unauthenticated" in err, err
        assert b"server.auth_token" in err, err
