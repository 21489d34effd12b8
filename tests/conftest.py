"""Shared fixtures. Real services are started once per session by deploy/local/services.py."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


# deploy/local/services.py is a script users run; tests import it as a module.
sys.path.insert(0, str(ROOT / "deploy" / "local"))
import services  # noqa: E402


@pytest.fixture(scope="session")
def services_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="dedup-tests-") as d:
        yield Path(d)


@pytest.fixture(scope="session")
def redis_server(services_dir: Path) -> Iterator[services.RedisServer]:
    with services.RedisServer.start(services_dir / "redis", appendonly="everysec") as server:
        yield server


@pytest.fixture(scope="session")
def kafka(services_dir: Path) -> Iterator[services.KafkaBroker]:
    with services.KafkaBroker.start(services_dir / "kafka") as broker:
        yield broker
