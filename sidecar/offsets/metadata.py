"""Encode the settled offsets above a commit point into Kafka's offset-commit metadata string.

A commit says "everything below N is done". Records above N that were already settled would be
re-fetched after a restart or a rebalance; writing them into the commit's metadata lets the next
owner skip them without asking the dedup store (kafka-pixy and Confluent's Parallel Consumer do the
same).

Format (``v1``): ``dd1:`` followed by comma-separated ranges of offsets relative to the committed
offset, each ``start`` or ``start-end`` (inclusive) in base 36, e.g. ``dd1:1,3-a``. The string is
cut to ``limit`` bytes by dropping the highest ranges: losing a range is always safe, because the
store still knows those keys are done.

Metadata that this module did not write (another tool's, or garbage) decodes to nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

PREFIX = "dd1:"
# Brokers reject metadata above offset.metadata.max.bytes, 4096 by default.
DEFAULT_LIMIT = 4000
_MAX_DECODED = 1_000_000


def _ranges(offsets: Iterable[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off in sorted(set(offsets)):
        if out and off == out[-1][1] + 1:
            out[-1] = (out[-1][0], off)
        else:
            out.append((off, off))
    return out


def _b36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    if n == 0:
        return "0"
    s = []
    while n:
        n, r = divmod(n, 36)
        s.append(digits[r])
    return "".join(reversed(s))


def encode_settled(committed: int, settled: Iterable[int], limit: int = DEFAULT_LIMIT) -> str:
    """Return the metadata for a commit at ``committed`` that remembers ``settled`` offsets above it.

    Offsets at or below ``committed`` are ignored (the commit already covers them... except
    ``committed`` itself, which by definition is unsettled). Returns ``""`` when there is nothing
    to remember.
    """
    parts: list[str] = []
    size = len(PREFIX)
    for start, end in _ranges(o - committed for o in settled if o > committed):
        part = _b36(start) if start == end else f"{_b36(start)}-{_b36(end)}"
        extra = len(part) + (1 if parts else 0)
        if size + extra > limit:
            break
        parts.append(part)
        size += extra
    return PREFIX + ",".join(parts) if parts else ""


def decode_settled(committed: int, metadata: str | None) -> frozenset[int]:
    """Return the absolute settled offsets recorded in ``metadata`` for a commit at ``committed``.

    Anything not written by :func:`encode_settled` yields an empty set, never an error.
    """
    if not metadata or not metadata.startswith(PREFIX) or committed < 0:
        return frozenset()
    out: set[int] = set()
    try:
        for part in metadata[len(PREFIX) :].split(","):
            lo_s, sep, hi_s = part.partition("-")
            lo = int(lo_s, 36)
            hi = int(hi_s, 36) if sep else lo
            if lo <= 0 or hi < lo or len(out) + (hi - lo + 1) > _MAX_DECODED:
                return frozenset()
            out.update(range(committed + lo, committed + hi + 1))
    except ValueError:
        return frozenset()
    return frozenset(out)
