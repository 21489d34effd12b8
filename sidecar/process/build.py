"""Which of its optional compiled modules this install of the sidecar has (setup.py builds them
when a C compiler is there): the C frame encoder, and the record path compiled with mypyc."""

from __future__ import annotations

from sidecar.api import frames
from sidecar.engine import core


def engine_compiled() -> bool:
    """The engine and the ack tracker run as mypyc-compiled modules, not as Python source."""
    return not (core.__file__ or "").endswith(".py")


def describe() -> str:
    """For the start-up log and ``--version``: "frame encoder c, engine compiled"."""
    return f"frame encoder {frames.ENCODER}, engine {'compiled' if engine_compiled() else 'interpreted'}"
