"""Log output: plain lines for a terminal, or one JSON object per line for a log pipeline.

``log_format = "json"`` (or ``--log-format json``) writes, per record: ``time`` (RFC 3339, UTC),
``level``, ``logger``, ``message``, ``owner`` (this sidecar's id in store claims), and, when the
call passed them with ``extra=``, ``topic``, ``partition``, ``offset`` and ``idempotency_key``;
``exception`` holds a traceback. Secrets never reach a log call: settings hold them as
``SecretStr``, which prints as asterisks.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

#: Fields a log call may attach with ``extra=`` that the JSON output carries.
FIELDS = ("topic", "partition", "offset", "idempotency_key")


class JsonFormatter(logging.Formatter):
    def __init__(self, owner: str = "") -> None:
        super().__init__()
        self.owner = owner

    def format(self, record: logging.LogRecord) -> str:
        ms = int(record.msecs)
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{ms:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.owner:
            out["owner"] = self.owner
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(level: str, fmt: str) -> logging.Handler:
    """Send every log record to stderr in ``fmt`` ("text" or "json")."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def set_owner(owner: str) -> None:
    """Stamp JSON lines with this sidecar's owner id once it is known."""
    for h in logging.getLogger().handlers:
        if isinstance(h.formatter, JsonFormatter):
            h.formatter.owner = owner
