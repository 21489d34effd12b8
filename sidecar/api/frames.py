"""Subscribe frames written straight in protobuf wire format.

A frame carries hundreds of deliveries of ~1 KB each. Building a ``Delivery`` message per record
and having the runtime serialize the frame cost about twice as much CPU as writing the bytes
here (both measured in one process: ~6.5 µs against ~3.5 µs per delivery), and the frame is the
hottest object the sidecar makes. The encoding is plain protobuf: the bytes parse as
``dedup.v1.SubscribeResponse`` in any language, and tests/unit/test_frames.py checks them
against the generated classes field by field.

The frame encoder has two builds of one encoding: ``sidecar/api/_cframes.c``, compiled at install
when a C compiler is there (it cut the sidecar's CPU per consumed record by 20-34 %;
docs/ARCHITECTURE.md, "The hot path in Python"), and ``encode_frame_py`` below, which every
install has. ``SIDECAR_NO_EXTENSIONS=1`` makes the sidecar use the Python one, and
``ENCODER`` says which one it uses. The two write the same bytes (tests/unit/test_frames.py).

Field numbers come from protos/dedup/v1/dedup.proto (``SubscribeResponse.deliveries = 1``;
``Delivery``: delivery_id 1, idempotency_key 2, topic 3, partition 4, offset 5, key 6, value 7,
headers 8, timestamp_ms 9, attempt 10, deadline_ms 11; ``Header``: key 1, value 2).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from sidecar.engine.records import Pending

_SMALL = [bytes((i,)) for i in range(128)]


def _varint(n: int) -> bytes:
    """Unsigned base-128 varint (proto3 writes negative int32/int64 as 10-byte two's complement)."""
    if n < 0x80:
        if n >= 0:
            return _SMALL[n]
        n += 1 << 64
    if n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    if n < 0x200000:
        return bytes((n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14))
    if n < 0x10000000:
        return bytes((n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14 & 0x7F | 0x80, n >> 21))
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _len_field(tag: bytes, data: bytes) -> bytes:
    n = len(data)
    return tag + (_SMALL[n] if n < 0x80 else _varint(n)) + data


_tp_fields: dict[tuple[str, int], bytes] = {}


def _tp_field(topic: str, partition: int) -> bytes:
    """The topic and partition fields, which every delivery of a partition shares."""
    field = _tp_fields.get((topic, partition))
    if field is None:
        if len(_tp_fields) > 100_000:
            _tp_fields.clear()
        field = _len_field(b"\x1a", topic.encode()) if topic else b""
        if partition:
            field += b"\x20" + _varint(partition)
        _tp_fields[topic, partition] = field
    return field


def _string_fields(tag: bytes, limit: int = 10_000) -> Callable[[str], bytes]:
    """A memo of one string field's encoding, for values most records share; forgets all past
    ``limit`` values. An empty string is left out, as proto3 does."""
    fields: dict[str, bytes] = {}

    def field(text: str) -> bytes:
        encoded = fields.get(text)
        if encoded is None:
            if len(fields) > limit:
                fields.clear()
            encoded = fields[text] = _len_field(tag, text.encode()) if text else b""
        return encoded

    return field


#: A header's key field (``Header.key = 1``): usually just the idempotency header.
_header_key = _string_fields(b"\x0a")
#: A publish result's topic field (``PublishResponse.topic = 2``).
_publish_topic = _string_fields(b"\x12")


def encode_frame_py(batch: Sequence[Pending], deadline_ms: int) -> bytes:
    """A serialized ``SubscribeResponse`` with one Delivery per record, all with one deadline.

    proto3 leaves zero and empty scalars out, as the generated code does; ``key`` is optional,
    so an empty key is written and a missing one is not.
    """
    deadline_field = b"\x58" + _varint(deadline_ms) if deadline_ms else b""
    varint, len_field, tp_field, header_key = _varint, _len_field, _tp_field, _header_key
    last_ts, ts_field = -1, b""  # records of one producer batch often share a timestamp
    out: list[bytes] = []
    for p in batch:
        parts = [len_field(b"\x0a", p.delivery_ids[-1].encode())]
        if p.idem_key:
            parts.append(len_field(b"\x12", p.idem_key.encode()))
        origin = p.origin
        if origin is None:
            parts.append(tp_field(*p.tp))
            if p.offset:
                parts += (b"\x28", varint(p.offset))
        else:  # a record read from a retry topic shows where it was first consumed
            parts.append(tp_field(origin.topic, origin.partition))
            if origin.offset:
                parts += (b"\x28", varint(origin.offset))
        if p.key is not None:
            parts.append(len_field(b"\x32", p.key))
        value = p.value
        if value:
            parts += (b"\x3a", varint(len(value)), value)
        for k, v in p.headers:
            hk = header_key(k)
            if v:
                vl = varint(len(v))
                parts += (b"\x42", varint(len(hk) + 1 + len(vl) + len(v)), hk, b"\x12", vl, v)
            else:
                parts += (b"\x42", varint(len(hk)), hk)
        ts = p.timestamp_ms
        if ts:
            if ts != last_ts:
                last_ts, ts_field = ts, b"\x48" + varint(ts)
            parts.append(ts_field)
        if p.attempt:
            parts += (b"\x50", varint(p.attempt))
        parts.append(deadline_field)
        size = sum(map(len, parts))
        out += (b"\x0a", varint(size))
        out += parts
    return b"".join(out)


def _c_encoder() -> Callable[[Sequence[Pending], int], bytes] | None:
    if os.environ.get("SIDECAR_NO_EXTENSIONS", "") not in ("", "0"):
        return None
    try:
        from sidecar.api import _cframes
    except ImportError:  # not built: no C compiler at install
        return None
    return _cframes.encode_frame


_encode_frame_c = _c_encoder()
#: Which frame encoder this process uses: "c" or "python" (logged at start).
ENCODER = "c" if _encode_frame_c is not None else "python"


def encode_frame(batch: Sequence[Pending], deadline_ms: int) -> bytes:
    """A serialized ``SubscribeResponse`` (see ``encode_frame_py``), in C when it is built.

    A record the C encoder does not expect (a field of another type than the engine makes, an
    integer past 64 bits) raises TypeError or OverflowError there: that frame is encoded in
    Python instead, which writes what the runtime would.
    """
    if _encode_frame_c is not None:
        try:
            return _encode_frame_c(batch, deadline_ms)
        except (TypeError, OverflowError):
            pass
    return encode_frame_py(batch, deadline_ms)


PublishResult = tuple[str, str, int, int, bool] | tuple[int, str]


def _publish_response(key: str, topic: str, partition: int, offset: int, duplicate: bool) -> bytes:
    """A ``PublishResponse``'s fields: idempotency_key 1, topic 2, partition 3, offset 4,
    duplicate 5."""
    varint = _varint
    parts = [_len_field(b"\x0a", key.encode()) if key else b"", _publish_topic(topic)]
    if partition:
        parts += (b"\x18", varint(partition))
    if offset:
        parts += (b"\x20", varint(offset))
    if duplicate:
        parts.append(b"\x28\x01")
    return b"".join(parts)


def encode_publish_results(results: Sequence[PublishResult]) -> bytes:
    """A serialized ``PublishBatchResponse``: per entry, either a PublishOutput-shaped tuple
    (idempotency_key, topic, partition, offset, duplicate) or a failure (status code, message).

    Field numbers: ``PublishBatchResponse.results = 1``; ``PublishBatchResult``: code 1,
    message 2, response 3; ``PublishResponse``: see ``_publish_response``. Written by hand for
    the reason frames are (see the module docstring): building two messages per entry cost about
    as much as the rest of the response path.
    """
    varint, len_field = _varint, _len_field
    out: list[bytes] = []
    for r in results:
        if len(r) == 2:
            code, message = r
            body = b"\x08" + varint(code) if code else b""
            if message:
                body += len_field(b"\x12", message.encode())
        else:
            body = len_field(b"\x1a", _publish_response(*r))
        out.append(len_field(b"\x0a", body))
    return b"".join(out)


def _answer(request_id: int, code: int, message: str) -> bytes:
    """The fields every stream answer opens with: request_id 1, code 2, message 3."""
    body = b"\x08" + _varint(request_id) if request_id else b""
    if code:
        body += b"\x10" + _varint(code)
    if message:
        body += _len_field(b"\x1a", message.encode())
    return body


def encode_stream_publish_result(request_id: int, result: PublishResult) -> bytes:
    """A serialized ``StreamingPublishResponse`` with one result: ``results = 1``;
    ``StreamingPublishResult``: request_id 1, code 2, message 3, response 4. Responses
    concatenated are one response with all their results (protobuf merges repeated fields)."""
    if len(result) == 2:
        body = _answer(request_id, *result)
    else:
        body = _answer(request_id, 0, "") + _len_field(b"\x22", _publish_response(*result))
    return _len_field(b"\x0a", body)


def encode_settle_result(request_id: int, code: int, message: str, results: Sequence[int]) -> bytes:
    """A serialized ``StreamingSubscribeResponse`` with one ``SettleResult`` (``results = 2``;
    request_id 1, code 2, message 3, results 4, packed). It may be appended to a frame (field 1)
    or to other results: the concatenation parses as one response carrying all of them."""
    body = _answer(request_id, code, message)
    if results:
        body += _len_field(b"\x22", b"".join(_SMALL[r] if 0 <= r < 0x80 else _varint(r) for r in results))
    return _len_field(b"\x12", body)
