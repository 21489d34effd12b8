from __future__ import annotations

from sidecar.engine.identity import idempotency_key, store_key


def test_header_wins_and_last_value_counts() -> None:
    headers = [("idempotency-key", b"first"), ("other", b"x"), ("idempotency-key", b"second")]
    assert idempotency_key(headers, "idempotency-key", "offset", "t", 0, 1, None, b"") == "second"


def test_non_utf8_header_is_base64() -> None:
    key = idempotency_key(
        [("idempotency-key", b"\xff\xfe")], "idempotency-key", "offset", "t", 0, 1, None, b""
    )
    assert key == "b64://4="


def test_fallbacks() -> None:
    assert idempotency_key([], "h", "offset", "t", 3, 9, None, b"v") == "@t/3/9"
    a = idempotency_key([], "h", "hash", "t", 0, 1, b"k", b"v")
    b = idempotency_key([], "h", "hash", "t", 5, 7, b"k", b"v")
    c = idempotency_key([], "h", "hash", "t", 0, 1, None, b"kv")
    assert a == b  # same payload, same key, wherever it sits
    assert a != c  # key/value boundary is part of the hash
    assert idempotency_key(None, "h", "dead-letter", "t", 0, 1, None, b"v") is None
    assert idempotency_key([("h", b"")], "h", "offset", "t", 0, 1, None, b"") == "@t/0/1"


def test_store_keys_are_namespaced_by_group_and_topic() -> None:
    assert store_key("g", "t", "k") != store_key("g2", "t", "k")
    assert store_key("g", "t", "k") != store_key("g", "t2", "k")
    assert store_key("a:b", "c", "d") != store_key("a", "b:c", "d")
