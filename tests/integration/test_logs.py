"""A sidecar process with ``--log-format json``: every line of its output is one JSON object,
stamped with its owner id, and no secret appears in any of them."""

from __future__ import annotations

import json
from pathlib import Path

import services

from tests.integration.helpers import SidecarProcess, process_env, unique

SECRET = "s3cr3t-token-do-not-log"


async def test_json_logs_are_one_object_per_line_without_secrets(
    kafka: services.KafkaBroker, redis_server: services.RedisServer, tmp_path: Path
) -> None:
    topic = unique("logs")
    kafka.create_topic(topic, 1)
    env = process_env(
        kafka,
        topic,
        unique("g"),
        redis_server.url,
        DEDUP_LOG_FORMAT="json",
        DEDUP_SERVER__AUTH_TOKEN=SECRET,
        DEDUP_KAFKA__TOPICS=json.dumps([topic, unique("missing")]),  # an error line too
    )
    sc = SidecarProcess(env, tmp_path / "sidecar.log")
    sc.start()
    try:
        await sc.wait_serving()
    finally:
        assert sc.terminate() == 0
    lines = (tmp_path / "sidecar.log").read_text().splitlines()
    assert lines
    objects = [json.loads(line) for line in lines]  # every line parses
    assert all({"time", "level", "logger", "message"} <= o.keys() for o in objects)
    assert any("serving on" in o["message"] and o.get("owner") for o in objects)
    assert any(o["level"] == "ERROR" and "do not exist" in o["message"] for o in objects)
    assert SECRET not in "\n".join(lines)
