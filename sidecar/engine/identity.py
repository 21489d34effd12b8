"""Message identity: the idempotency key of a record, and its namespaced store key. Pure code."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from typing import Literal

KeyFallback = Literal["offset", "hash", "dead-letter"]
MAX_KEY_BYTES = 255


def header_value(headers: Sequence[tuple[str, bytes | None]] | None, name: str) -> bytes | None:
    """The last value of header ``name`` (Kafka allows repeats; the last one wins)."""
    found = None
    for k, v in headers or ():
        if k == name:
            found = v
    return found


def idempotency_key(
    headers: Sequence[tuple[str, bytes | None]] | None,
    header_name: str,
    fallback: KeyFallback,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
) -> str | None:
    """Return the record's idempotency key, or None when it has none and the fallback is dead-letter.

    * From the header: its UTF-8 text; bytes that are not UTF-8 become ``b64:<base64>``.
    * ``offset``: ``@topic/partition/offset`` (dedups redelivery, not producer duplicates).
    * ``hash``: ``h:<blake2b of key and value>`` (dedups identical payloads).
    """
    raw = header_value(headers, header_name)
    if raw:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "b64:" + base64.b64encode(raw).decode("ascii")
    if fallback == "offset":
        return f"@{topic}/{partition}/{offset}"
    if fallback == "hash":
        h = hashlib.blake2b(digest_size=16)
        h.update(len(key).to_bytes(4, "big") if key is not None else b"\xff\xff\xff\xff")
        h.update(key or b"")
        h.update(value or b"")
        return "h:" + h.hexdigest()
    return None


def store_key(group: str, topic: str, idem_key: str) -> str:
    """Namespace a key by consumer group and topic, so two groups process a record independently.

    The group is length-prefixed because group ids may contain any character.
    """
    return f"{len(group)}:{group}:{topic}:{idem_key}"
