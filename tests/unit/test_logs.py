"""JSON log lines: one object per line, with the record's fields when a call attaches them."""

from __future__ import annotations

import json
import logging

from sidecar.observability.logs import JsonFormatter


def test_a_json_line_has_the_fields_and_a_traceback() -> None:
    fmt = JsonFormatter(owner="host-1-abc")
    rec = logging.LogRecord("sidecar.engine", logging.WARNING, __file__, 1, "moving %s failed", ("x",), None)
    rec.__dict__.update({"topic": "orders", "partition": 3, "offset": 42, "idempotency_key": "k-1"})
    out = json.loads(fmt.format(rec))
    assert out["message"] == "moving x failed"
    assert (out["level"], out["logger"], out["owner"]) == ("WARNING", "sidecar.engine", "host-1-abc")
    assert (out["topic"], out["partition"], out["offset"], out["idempotency_key"]) == ("orders", 3, 42, "k-1")
    assert out["time"].endswith("Z")
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec2 = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = fmt.format(rec2)
    assert "\n" not in line
    assert "ValueError: boom" in json.loads(line)["exception"]
