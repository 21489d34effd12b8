"""``dedup-sidecar status`` and ``dedup-sidecar key`` against a running sidecar process, as an
operator would type them: same port, same token, text or JSON."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import services
from dedup_client import DedupClient

from tests.integration.helpers import ROOT, Inbox, SidecarProcess, process_env, raw_produce, unique

TOKEN = "admin-test-token"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


async def test_status_and_key_describe_a_running_sidecar(
    kafka: services.KafkaBroker, redis_server: services.RedisServer, tmp_path: Path
) -> None:
    topic, out_topic, group = unique("admin"), unique("admin-out"), unique("g")
    kafka.create_topic(topic, 2)
    kafka.create_topic(out_topic, 1)
    env = process_env(
        kafka,
        topic,
        group,
        redis_server.url,
        DEDUP_SERVER__AUTH_TOKEN=TOKEN,
        DEDUP_STORE__KEY_PREFIX=unique("p"),
        DEDUP_DELIVERY__ORDERING="key",
    )
    sc = SidecarProcess(env, tmp_path / "sidecar.log")
    sc.start()
    try:
        await sc.wait_serving()
        raw_produce(kafka, topic, [("done-1", b"a", 0), ("held-1", b"b", 1)])
        async with DedupClient(sc.target, token=TOKEN) as c, Inbox(c) as inbox:
            got = {m.idempotency_key: m for m in await inbox.wait(2)}
            await c.ack_many([got["done-1"].delivery_id])
            await c.publish(out_topic, b"p", idempotency_key="pub-1")  # not a consumed topic
            await asyncio.sleep(0.5)  # the commit of partition 0
            auth = ["--target", sc.target, "--token", TOKEN]

            out = await asyncio.to_thread(cli, "status", *auth)
            assert out.returncode == 0, out.stderr
            assert "ready" in out.stdout
            assert group in out.stdout
            assert "redis" in out.stdout
            lines = [line.split() for line in out.stdout.splitlines() if line.startswith(topic)]
            by_partition = {int(cells[1]): cells for cells in lines}
            assert set(by_partition) == {0, 1}
            assert by_partition[1][5] == "1"  # partition 1: one record in flight
            assert by_partition[0][8] == "key"
            assert "1 stream(s)" in out.stdout

            data = json.loads((await asyncio.to_thread(cli, "status", "--json", *auth)).stdout)
            assert data["ready"] is True
            assert len(data["partitions"]) == 2

            done = await asyncio.to_thread(cli, "key", topic, "done-1", *auth)
            assert done.returncode == 0, done.stderr
            assert done.stdout.startswith(f"{topic} / done-1: done")
            held = await asyncio.to_thread(cli, "key", topic, "held-1", *auth)
            assert "claimed by" in held.stdout
            assert "attempt 1" in held.stdout
            assert "failed" not in held.stdout
            await c.nack([got["held-1"].delivery_id], delay_seconds=60)  # one failed delivery
            nacked = await asyncio.to_thread(cli, "key", topic, "held-1", *auth)
            assert f"{topic} / held-1: released" in nacked.stdout, nacked.stdout
            assert "attempt 1 (1 failed)" in nacked.stdout, nacked.stdout
            published = json.loads(
                (await asyncio.to_thread(cli, "key", topic, "pub-1", "--json", *auth)).stdout
            )
            assert published["published"]["topic"] == out_topic
            absent = await asyncio.to_thread(cli, "key", topic, "never", *auth)
            assert "never: absent" in absent.stdout

            denied = await asyncio.to_thread(cli, "status", "--target", sc.target, "--token", "wrong")
            assert denied.returncode == 1
            assert "UNAUTHENTICATED" in denied.stderr
            assert "server.auth_token" in denied.stderr
    finally:
        sc.terminate()
