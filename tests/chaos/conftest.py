"""The fault suite gets its own broker and Redis: its faults kill and pause them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import services


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/chaos/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="module")
def chaos_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.KafkaBroker]:
    with services.KafkaBroker.start(tmp_path_factory.mktemp("chaos-kafka")) as broker:
        yield broker


@pytest.fixture
def chaos_redis(tmp_path: Path) -> Iterator[services.RedisServer]:
    with services.RedisServer.start(tmp_path / "redis", appendonly="everysec") as r:
        yield r
