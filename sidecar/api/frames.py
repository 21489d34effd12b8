"""Subscribe frames written straight in protobuf wire format.

A frame carries hundreds of deliveries of ~1 KB each. Building a ``Delivery`` message per record
and having the runtime serialize the frame cost about twice as much CPU as writing the bytes
here (both measured in one process: ~6.5 µs against ~3.5 µs per delivery), and the frame is the
hottest object the sidecar makes. The encoding is plain protobuf: the bytes parse as
``dedup.v1.SubscribeResponse`` in any language, and tests/unit/test_frames.py checks them
against the generated classes field by field.

Field numbers come from protos/dedup/v1/dedup.proto (``SubscribeResponse.deliveries = 1``;
``Delivery``: delivery_id 1, idempotency_key 2, topic 3, partition 4, offset 5, key 6, value 7,
headers 8, timestamp_ms 9, attempt 10, deadline_ms 11; ``Header``: key 1, value 2).
"""

from __future__ import annotations

from collections.abc import Sequence

from sidecar.engine.records import Pending

_SMALL = [bytes((i,)) for i in range(128)]


def _varint(n: int) -> bytes:
    """Unsigned base-128 varint (proto3 writes negative int32/int64 as 10-byte two's complement)."""
    if n < 0:
        n += 1 << 64
    if n < 128:
        return _SMALL[n]
    if n < 16384:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _len_field(tag: bytes, data: bytes) -> bytes:
    return tag + _varint(len(data)) + data


def _delivery(p: Pending, deadline_field: bytes) -> bytes:
    """One Delivery; proto3 leaves zero/empty scalars out, as the generated code does."""
    parts = [_len_field(b"\x0a", p.delivery_ids[-1].encode())]
    if p.idem_key:
        parts.append(_len_field(b"\x12", p.idem_key.encode()))
    topic, partition = p.tp
    if topic:
        parts.append(_len_field(b"\x1a", topic.encode()))
    if partition:
        parts += (b"\x20", _varint(partition))
    if p.offset:
        parts += (b"\x28", _varint(p.offset))
    if p.key is not None:  # optional: present even when empty
        parts.append(_len_field(b"\x32", p.key))
    if p.value:
        parts += (b"\x3a", _varint(len(p.value)), p.value)
    for k, v in p.headers:
        header = b""
        if k:
            header = _len_field(b"\x0a", k.encode())
        if v:
            header += _len_field(b"\x12", v)
        parts.append(_len_field(b"\x42", header))
    if p.timestamp_ms:
        parts += (b"\x48", _varint(p.timestamp_ms))
    if p.attempt:
        parts += (b"\x50", _varint(p.attempt))
    parts.append(deadline_field)
    return b"".join(parts)


def encode_frame(batch: Sequence[Pending], deadline_ms: int) -> bytes:
    """A serialized ``SubscribeResponse`` with one Delivery per record, all with one deadline."""
    deadline_field = b"\x58" + _varint(deadline_ms) if deadline_ms else b""
    parts: list[bytes] = []
    for p in batch:
        d = _delivery(p, deadline_field)
        parts += (b"\x0a", _varint(len(d)), d)
    return b"".join(parts)
