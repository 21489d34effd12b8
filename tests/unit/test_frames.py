"""Hand-written Subscribe frames and PublishBatch responses parse, field by field, like the generated
classes build them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar._proto import dedup_pb2 as pb
from sidecar.api import frames
from sidecar.api.frames import encode_frame, encode_publish_results
from sidecar.engine.records import Origin, Pending

Encoder = Callable[[Sequence[Pending], int], bytes]
# Every frame test runs on both builds of the encoder: the C one (sidecar/api/_cframes.c) and the
# Python one; the C one is what encode_frame uses when it is built.
ENCODERS = [pytest.param(frames.encode_frame_py, id="python"), pytest.param(encode_frame, id=frames.ENCODER)]

text = st.text(max_size=40)
int64 = st.integers(min_value=0, max_value=2**63 - 1)
headers = st.lists(st.tuples(text, st.one_of(st.none(), st.binary(max_size=30))), max_size=4)


partitions = st.integers(min_value=-1, max_value=2**31 - 1)


@st.composite
def pendings(draw: st.DrawFn) -> Pending:
    tp = (draw(text), draw(partitions))
    # A record read from a retry topic shows its source coordinates.
    origin = draw(st.one_of(st.none(), st.builds(Origin, text, partitions, int64)))
    p = Pending(
        tp,
        draw(int64),
        1,
        draw(st.one_of(st.none(), text)),
        "",
        draw(st.one_of(st.none(), st.binary(max_size=40))),
        draw(st.binary(max_size=20_000)),
        draw(headers),
        draw(int64),
        origin.topic if origin else tp[0],
        origin=origin,
    )
    p.attempt = draw(st.integers(min_value=0, max_value=2**31 - 1))
    p.delivery_ids.append(f"{draw(st.integers(0, 2**32 - 1)):08x}.{draw(int64)}")
    return p


def expected(p: Pending, deadline_ms: int) -> pb.Delivery:
    d = pb.Delivery(
        delivery_id=p.delivery_ids[-1],
        idempotency_key=p.idem_key or "",
        topic=p.coordinates()[0],
        partition=p.coordinates()[1],
        offset=p.coordinates()[2],
        value=p.value,
        headers=[pb.Header(key=k, value=v or b"") for k, v in p.headers],
        timestamp_ms=p.timestamp_ms,
        attempt=p.attempt,
        deadline_ms=deadline_ms,
    )
    if p.key is not None:
        d.key = p.key
    return d


@pytest.mark.parametrize("encode", ENCODERS)
@settings(max_examples=400)
@given(batch=st.lists(pendings(), min_size=1, max_size=5), deadline_ms=int64)
def test_frames_parse_as_the_generated_messages(
    encode: Encoder, batch: list[Pending], deadline_ms: int
) -> None:
    frame = pb.SubscribeResponse.FromString(encode(batch, deadline_ms))
    assert list(frame.deliveries) == [expected(p, deadline_ms) for p in batch]
    # Presence of the optional key survives too (an empty key is not a missing key).
    assert [d.HasField("key") for d in frame.deliveries] == [p.key is not None for p in batch]


@pytest.mark.parametrize("encode", ENCODERS)
def test_frames_are_byte_for_byte_what_the_runtime_writes_for_a_typical_record(encode: Encoder) -> None:
    p = Pending(
        ("orders", 3), 12345, 1, "k-1", "", b"key", b"x" * 1024, [("idempotency-key", b"k-1")], 17, "orders"
    )
    p.attempt = 2
    p.delivery_ids.append("0a1b2c3d.99")
    want = pb.SubscribeResponse(deliveries=[expected(p, 1_795_741_851_013)]).SerializeToString()
    assert encode([p], 1_795_741_851_013) == want


@settings(max_examples=300)
@given(st.lists(pendings(), max_size=8), st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_both_encoders_write_the_same_bytes(batch: list[Pending], deadline_ms: int) -> None:
    assert encode_frame(batch, deadline_ms) == frames.encode_frame_py(batch, deadline_ms)


def test_sidecar_no_extensions_selects_the_python_encoder() -> None:
    code = "from sidecar.api import frames; print(frames.ENCODER)"
    env = {**os.environ, "SIDECAR_NO_EXTENSIONS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "python"


def test_a_record_the_c_encoder_does_not_expect_is_encoded_in_python() -> None:
    """Headers as lists rather than tuples, and an offset past int64, are not what the engine makes;
    the frame still comes out as the runtime would write it."""
    p = Pending(("t", 0), 2**64 - 1, 1, "k", "", None, b"v", [["h", b"x"]], 0, "t")  # type: ignore[list-item]
    p.delivery_ids.append("0a1b2c3d.1")
    d = pb.SubscribeResponse.FromString(encode_frame([p], 0)).deliveries[0]
    assert (d.offset, d.headers[0].key, d.headers[0].value) == (-1, "h", b"x")
    assert encode_frame([p], 0) == frames.encode_frame_py([p], 0)


publish_results = st.lists(
    st.one_of(
        st.tuples(text, text, st.integers(min_value=-(2**31), max_value=2**31 - 1), int64, st.booleans()),
        st.tuples(st.integers(min_value=0, max_value=16), text),
    ),
    max_size=20,
)


@given(publish_results)
@settings(max_examples=300, deadline=None)
def test_publish_results_parse_like_the_generated_response(
    results: list[tuple[str, str, int, int, bool] | tuple[int, str]],
) -> None:
    expected = pb.PublishBatchResponse()
    for r in results:
        if len(r) == 2:
            expected.results.add(code=r[0], message=r[1])
        else:
            key, topic, partition, offset, duplicate = r
            expected.results.add(
                code=0,
                response=pb.PublishResponse(
                    idempotency_key=key, topic=topic, partition=partition, offset=offset, duplicate=duplicate
                ),
            )
    raw = encode_publish_results(results)
    assert pb.PublishBatchResponse.FromString(raw) == expected
    assert raw == expected.SerializeToString(deterministic=True)


one_result = st.one_of(
    st.tuples(text, text, st.integers(min_value=-(2**31), max_value=2**31 - 1), int64, st.booleans()),
    st.tuples(st.integers(min_value=0, max_value=16), text),
)


@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), one_result), max_size=10))
@settings(max_examples=300, deadline=None)
def test_stream_publish_results_concatenate_into_one_response(
    answers: list[tuple[int, tuple[str, str, int, int, bool] | tuple[int, str]]],
) -> None:
    want = pb.StreamingPublishResponse()
    for rid, r in answers:
        if len(r) == 2:
            want.results.add(request_id=rid, code=r[0], message=r[1])
        else:
            key, topic, partition, offset, duplicate = r
            want.results.add(
                request_id=rid,
                response=pb.PublishResponse(
                    idempotency_key=key, topic=topic, partition=partition, offset=offset, duplicate=duplicate
                ),
            )
    raw = b"".join(frames.encode_stream_publish_result(rid, r) for rid, r in answers)
    assert pb.StreamingPublishResponse.FromString(raw) == want
    assert raw == want.SerializeToString(deterministic=True)


settle_results = st.tuples(
    st.integers(0, 2**64 - 1),
    st.integers(0, 16),
    st.text(max_size=40),
    st.lists(st.integers(0, 4), max_size=20),
)


@given(st.lists(settle_results, max_size=10), st.lists(pendings(), max_size=3), st.integers(0, 2**40))
@settings(max_examples=200, deadline=None)
def test_settle_results_appended_to_a_frame_parse_as_one_streaming_response(
    answers: list[tuple[int, int, str, list[int]]], batch: list[Pending], deadline_ms: int
) -> None:
    frame = encode_frame(batch, deadline_ms)
    raw = frame + b"".join(frames.encode_settle_result(*a) for a in answers)
    parsed = pb.StreamingSubscribeResponse.FromString(raw)
    assert list(parsed.deliveries) == list(pb.SubscribeResponse.FromString(frame).deliveries)
    assert [(r.request_id, r.code, r.message, list(r.results)) for r in parsed.results] == [
        (rid, code, message, results) for rid, code, message, results in answers
    ]
