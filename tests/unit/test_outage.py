"""An outage is logged as it begins, at most once a minute while it lasts, and as it ends."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter

from sidecar.observability.outage import Outage


def outage(now: list[float]) -> tuple[Outage, Counter]:
    failures = Counter("f_total", "failures", ["dependency"], registry=CollectorRegistry())
    return Outage("Kafka", failures, remind_s=60, quiet_s=15, clock=lambda: now[0]), failures


def said(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sidecar.observability.outage"]


def test_a_thousand_failures_are_two_lines_and_a_count(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    o, failures = outage(now)
    caplog.set_level("INFO")
    for _ in range(1000):
        o.failed("connection refused")
        now[0] += 0.1  # 100 s of failures
    lines = said(caplog)
    assert lines[0] == "Kafka: failing: connection refused (logged again at most every 60s while it lasts)"
    assert len(lines) == 2
    assert lines[1].startswith("Kafka: still failing after 60s, ")
    assert failures.labels("Kafka")._value.get() == 1000
    assert o.down


def test_it_is_back_once_answers_came_and_failures_stayed_away(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    o, _ = outage(now)
    caplog.set_level("INFO")
    o.answered()  # no outage: nothing to say
    o.failed("refused")
    now[0] = 20.0
    o.answered()  # 20 s after the last failure, and the first answer: back
    assert not o.down
    assert said(caplog)[-1] == "Kafka: answering again after 20s (1 failures)"


def test_answers_between_failures_do_not_end_it(caplog: pytest.LogCaptureFixture) -> None:
    """One broker of three stays down: the others answer, its connections keep failing."""
    now = [0.0]
    o, _ = outage(now)
    caplog.set_level("INFO")
    for _ in range(10):
        o.failed("broker 2 refused")
        now[0] += 5
        o.answered()
        now[0] += 5
    assert o.down
    assert len(said(caplog)) == 2  # the start, and one reminder at 60 s
    now[0] += 15
    o.answered()
    assert not o.down
    # Out from the first failure until the first answer after the last one.
    assert said(caplog)[-1] == "Kafka: answering again after 95s (10 failures)"
    o.failed("again")  # a new outage is logged as such
    assert said(caplog)[-1].startswith("Kafka: failing: again")
