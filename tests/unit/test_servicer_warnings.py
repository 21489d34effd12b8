"""A call that fails because the store or Kafka is unreachable is logged, at a bounded rate."""

from __future__ import annotations

import logging

import pytest

from sidecar.api.servicer import _Throttled
from sidecar.errors import StoreUnavailable


def test_failed_calls_are_warned_about_once_per_interval_with_a_count(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [100.0]
    monkeypatch.setattr("sidecar.api.servicer.time.monotonic", lambda: clock[0])
    warn = _Throttled(every=10.0)
    err = StoreUnavailable("dedup store: Redis unreachable: Too many connections")
    with caplog.at_level(logging.WARNING, logger="sidecar.api.servicer"):
        warn.warn("Ack", err)
        warn.warn("Ack", err)
        warn.warn("Ack", err)
        warn.warn("Nack", err)  # another method has its own interval
        clock[0] += 10.5
        warn.warn("Ack", err)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "Ack failed: dedup store: Redis unreachable: Too many connections",
        "Nack failed: dedup store: Redis unreachable: Too many connections",
        "Ack failed: dedup store: Redis unreachable: Too many connections (2 more since the last warning)",
    ]
