"""Test-only crash points for the fault suite. Inert unless deliberately armed.

Arming takes both the hidden ``--testonly-fault-hooks`` flag *and* the environment variable
``DEDUP_TESTONLY_KILL_AT=<point>:<n>``: the process SIGKILLs itself the n-th time it reaches
``<point>``. Neither is a setting (no TOML key, no DEDUP_<section>__ variable), so no production
configuration can turn a hook on; an armed sidecar says so in its log at start.

Points: ``before_delivery``, ``after_delivery``, ``ack_before_mark``, ``mark_before_commit``,
``produce_before_record``.
"""

from __future__ import annotations

import logging
import os
import signal

POINTS = frozenset(
    {"before_delivery", "after_delivery", "ack_before_mark", "mark_before_commit", "produce_before_record"}
)
ENV = "DEDUP_TESTONLY_KILL_AT"

_armed: str | None = None
_left = 0


def arm_from_environment() -> None:
    """Called by the CLI only when --testonly-fault-hooks is given."""
    global _armed, _left
    spec = os.environ.get(ENV, "")
    if not spec:
        return
    point, _, n = spec.partition(":")
    if point not in POINTS:
        raise SystemExit(f"{ENV}={spec!r}: unknown point; one of {sorted(POINTS)}")
    _armed, _left = point, int(n or "1")
    logging.getLogger(__name__).warning("TEST-ONLY fault hook armed: SIGKILL at %s hit %d", point, _left)


def reached(point: str) -> None:
    """Mark a crash point. Does nothing unless this point is armed."""
    global _left
    if _armed != point:
        return
    _left -= 1
    if _left <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
