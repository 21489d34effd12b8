"""The sidecar against a SASL_SSL listener with SCRAM-SHA-512 on the three-node cluster, set up
the way a user would: a TOML file with the kafka.* security settings and the password in a
mounted file. The user is created with Kafka's own kafka-configs tool (services.KafkaCluster)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest
import services
from confluent_kafka import Consumer, TopicPartition
from dedup_client import DedupClient

from tests.integration.helpers import ROOT, SidecarProcess, unique

pytestmark = pytest.mark.integration


def write_config(
    path: Path, cluster: services.KafkaCluster, scram: services.ScramListener, topic: str, password_file: Path
) -> Path:
    path.write_text(
        f"""
[kafka]
bootstrap_servers = "{cluster.secure_bootstrap_servers}"
topics = ["{topic}"]
group_id = "{unique("g")}"
security_protocol = "SASL_SSL"
sasl_mechanism = "SCRAM-SHA-512"
sasl_username = "{scram.username}"
sasl_password_file = "{password_file}"
ssl_ca_file = "{scram.ca_file}"

[store]
backend = "sqlite"
sqlite_path = "{path.parent / "dedup.sqlite3"}"
"""
    )
    return path


def read_back(cluster: services.KafkaCluster, scram: services.ScramListener, topic: str) -> list[bytes]:
    """Every record of ``topic``'s partition 0, read over the SASL_SSL listener."""
    c = Consumer(
        {
            "bootstrap.servers": cluster.secure_bootstrap_servers,
            "group.id": unique("reader"),
            "security.protocol": "SASL_SSL",
            "sasl.mechanisms": "SCRAM-SHA-512",
            "sasl.username": scram.username,
            "sasl.password": scram.password,
            "ssl.ca.location": str(scram.ca_file),
            "enable.auto.commit": False,
        }
    )
    try:
        _, high = c.get_watermark_offsets(TopicPartition(topic, 0), timeout=15)
        c.assign([TopicPartition(topic, 0, 0)])
        out: list[bytes] = []
        deadline = time.monotonic() + 30
        while len(out) < high and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is not None and not m.error():
                out.append(m.value() or b"")
        return out
    finally:
        c.close()


async def test_consume_and_publish_over_sasl_ssl(
    kafka_cluster: services.KafkaCluster, kafka_scram: services.ScramListener, tmp_path: Path
) -> None:
    topic = unique("secure")
    kafka_cluster.create_topic(topic, 1)
    secret = tmp_path / "kafka-password"
    secret.write_text(kafka_scram.password + "\n")  # as a mounted secret often ends
    conf = write_config(tmp_path / "sidecar.toml", kafka_cluster, kafka_scram, topic, secret)
    side = SidecarProcess({"DEDUP_CONFIG": str(conf)}, tmp_path / "sidecar.log")
    side.start()
    try:
        await side.wait_serving(60)
        async with DedupClient(side.target) as client:
            first = await client.publish(topic, b"one", idempotency_key="k1", timeout=30)
            again = await client.publish(topic, b"one", idempotency_key="k1", timeout=30)
            assert again.offset == first.offset  # recorded once: the repeat is answered, not produced
            await client.publish(topic, b"two", idempotency_key="k2", timeout=30)
            got = []
            async with asyncio.timeout(60):
                async for m in client.subscribe(topics=[topic], max_in_flight=10):
                    got.append(m.value)
                    assert (await m.ack()).name == "OK"
                    if len(got) == 2:
                        break
        assert got == [b"one", b"two"]
        assert read_back(kafka_cluster, kafka_scram, topic) == [b"one", b"two"]
    finally:
        assert side.terminate() == 0, side.log_path.read_text()[-3000:]
    assert kafka_scram.password not in side.log_path.read_text()


def test_a_wrong_password_stops_the_start_naming_the_setting(
    kafka_cluster: services.KafkaCluster, kafka_scram: services.ScramListener, tmp_path: Path
) -> None:
    topic = unique("secure")
    kafka_cluster.create_topic(topic, 1)
    secret = tmp_path / "kafka-password"
    secret.write_text("not-" + kafka_scram.password)
    conf = write_config(tmp_path / "sidecar.toml", kafka_cluster, kafka_scram, topic, secret)
    t0 = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar",
            "--config",
            str(conf),
            "--listen",
            f"127.0.0.1:{services.free_port()}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )
    took = time.monotonic() - t0
    out = done.stdout + done.stderr
    assert done.returncode == 2, out[-3000:]
    assert "refused the sidecar's credentials" in out
    assert "kafka.sasl_password" in out
    assert "not-" + kafka_scram.password not in out
    assert took < 60


def test_a_missing_password_file_is_named(
    kafka_cluster: services.KafkaCluster, kafka_scram: services.ScramListener, tmp_path: Path
) -> None:
    conf = write_config(
        tmp_path / "sidecar.toml", kafka_cluster, kafka_scram, unique("t"), tmp_path / "no-such-file"
    )
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "--config", str(conf)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "kafka.sasl_password_file" in done.stderr
