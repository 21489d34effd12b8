"""The benchmark's CPU budget: what it reads from /proc, and the table it renders."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[2])
)  # the bench package, as `python -m bench` sees it
from bench import common, report


def test_budget_counts_this_process_and_a_named_service() -> None:
    common.SERVICE_PIDS.clear()
    common.SERVICE_PIDS["self"] = os.getpid()  # a "service" that is this very process
    try:
        budget = common.CpuBudget()
        deadline = time.process_time() + 0.2
        while time.process_time() < deadline:  # 0.2 s of CPU, on this thread
            pass
        got = budget.per_record(1000, sidecar_s=0.0)
    finally:
        common.SERVICE_PIDS.clear()
    # 0.2 s over 1,000 records is 200 µs each, seen as the client's and as the "service"'s.
    assert 180 <= got["client"] <= 400, got
    assert 180 <= got["self"] <= 400, got
    # The machine was busy at least while this process was, give or take a clock tick.
    assert got["machine"] >= got["client"] - 20, got
    assert got["other"] >= 0
    assert got["sidecar"] == 0


def test_budget_section_gives_the_machine_ceiling() -> None:
    def side(machine: float) -> dict[str, float]:
        return {"client": 5.0, "broker": 3.0, "machine": machine, "stolen": 0.0, "other": 1.0}

    run = {
        "sidecar": {**side(50.0), "sidecar": 26.0, "redis": 15.0},
        "raw": side(10.0),
        "rates": [30_000, 70_000],
    }
    text = "\n".join(report.budget_section({"budget": {"consume": [run], "publish": [run], "cpus": 2}}))
    # 2 cores / 50 µs per record = 40k records/s, 0.57x of the raw client's 70k.
    assert "Machine ceiling of the sidecar path: 40.0k records/s, 0.57x the raw client's median 70.0k" in text
    assert "| redis-server |  | 15.0 |" in text
    assert "| **the machine, every core** | **10.0** | **50.0** |" in text
    assert report.budget_section({}) == []


def test_the_per_call_section_gives_each_path_against_both_floors() -> None:
    per_call = {
        "command": "scripts/bench.sh --per-call",
        "window": 64,
        "rows": [
            {"name": "floor: bare unary echo", "rate": 5000.0, "rates": [5000.0], "server_cpu_us": 200.0},
            {
                "name": "floor: bare stream echo, a message each way",
                "rate": 6000.0,
                "rates": [6000.0],
                "server_cpu_us": 100.0,
            },
            {"name": "raw idempotent producer, 64 records in flight", "rate": 6000.0, "client_cpu_us": 10.0},
            {
                "name": "unary Publish, 64 in flight",
                "rate": 3000.0,
                "rates": [3000.0],
                "server_cpu_us": 300.0,
            },
        ],
        "latency": {"publish": {"p50_ms": 1.9, "p99_ms": 4.0}},
    }
    text = "\n".join(report.percall_section(per_call))
    assert "| unary Publish, 64 in flight | 3,000 | 3,000 | 300.0 | 1.50 | 3.00 |" in text
    assert "0.50x the raw producer's rate" in text
    assert "| a lone unary `Publish` | 1.9 | 4.0 |" in text
