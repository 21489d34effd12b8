"""Shared fixtures. Real services are started once per session by deploy/local/services.py."""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_services() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "dedup_local_services", ROOT / "deploy" / "local" / "services.py"
    )
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


services = _load_services()


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
