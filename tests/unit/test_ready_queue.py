"""The ready queue: a stream's take costs what its own records cost, whatever else is queued."""

from __future__ import annotations

from sidecar.engine.records import Pending, State
from sidecar.engine.streams import ReadyQueue, Stream


def rec(topic: str, offset: int, value: bytes = b"v") -> Pending:
    return Pending(
        tp=(topic, 0),
        offset=offset,
        generation=1,
        idem_key=f"{topic}-{offset}",
        store_key=f"{topic}-{offset}",
        key=None,
        value=value,
        headers=[],
        timestamp_ms=0,
        topic=topic,
    )


def stream(*topics: str, max_in_flight: int = 500, max_batch: int = 100, max_bytes: int = 0) -> Stream:
    return Stream(frozenset(topics), max_in_flight, max_bytes, max_batch)


def filled(counts: dict[str, int]) -> ReadyQueue:
    q = ReadyQueue()
    for topic, n in counts.items():
        for i in range(n):
            q.push(rec(topic, i))
    return q


def test_a_stream_of_one_topic_is_served_behind_another_topics_backlog() -> None:
    q = filled({"b": 30_000, "a": 5_000})
    s = stream("a")
    got = q.take(s)
    assert [p.offset for p in got] == list(range(100))
    assert {p.topic for p in got} == {"a"}
    assert len(q) == 34_900
    # Every one of a's records is reachable, and b's are left whole.
    taken = len(got)
    while batch := q.take(s):
        taken += len(batch)
    assert taken == 5_000
    assert len(q) == 30_000


def test_a_stream_of_every_topic_takes_them_in_turns() -> None:
    q = filled({"a": 1_000, "b": 1_000, "c": 10})
    s = stream(max_batch=90)
    first = q.take(s)
    by_topic = {t: sum(1 for p in first if p.topic == t) for t in "abc"}
    assert by_topic == {"a": 40, "b": 40, "c": 10}, by_topic
    # The next take starts at another topic, so no topic always goes first.
    starts = {q.take(s)[0].topic for _ in range(4)}
    assert len(starts) >= 2, starts


def test_settled_records_are_skipped_and_expired_copies_the_stream_holds_are_kept() -> None:
    q = ReadyQueue()
    recs = [rec("a", i) for i in range(6)]
    for p in recs:
        q.push(p)
    recs[0].state = State.SETTLED  # settled while queued
    recs[1].delivery_ids.append("x.1")
    s = stream("a")
    s.expired["x.1"] = (1, 0.0)  # the app still holds x.1's expired copy
    got = q.take(s)
    assert [p.offset for p in got] == [2, 3, 4, 5]
    assert len(q) == 1
    assert q.position(recs[1]) == 0
    other = stream("a")
    assert [p.offset for p in q.take(other)] == [1]  # another stream may have it


def test_byte_credit_stops_a_take_and_the_record_keeps_its_place() -> None:
    q = ReadyQueue()
    for i in range(3):
        q.push(rec("a", i, b"x" * 40))
    s = stream("a", max_bytes=100)
    assert [p.offset for p in q.take(s)] == [0, 1]  # a third would pass 100 bytes
    q2 = ReadyQueue()
    for i in range(3):
        q2.push(rec("a", i, b"x" * 40))
    s2 = stream("a", max_bytes=100)
    s2.in_flight_bytes = 30
    s2.in_flight[1] = rec("z", 0)
    assert [p.offset for p in q2.take(s2)] == [0]
    assert len(q2) == 2
    assert q2.position(q2.take(stream("a"))[0]) is None


def test_credit_and_batch_bound_the_take_and_front_pushes_go_first() -> None:
    q = filled({"a": 50})
    s = stream("a", max_in_flight=10, max_batch=4)
    got = q.take(s)
    assert len(got) == 4
    for p in reversed(got):
        q.push(p, front=True)
    assert [p.offset for p in q.take(s)] == [0, 1, 2, 3]
    assert q.take(stream("a", max_in_flight=0)) == []
    assert q.waiting("a") == 46
    assert q.waiting("nope") == 0
