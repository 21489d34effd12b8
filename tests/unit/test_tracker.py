"""AckTracker: table tests for the rules, property tests for random ack orders."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.offsets import AckTracker, OfferResult, decode_settled


def offered(t: AckTracker, *offsets: int) -> None:
    for o in offsets:
        assert t.offer(o) is OfferResult.PENDING


def test_committable_is_first_unsettled() -> None:
    # Given offsets 10..14 offered
    t = AckTracker()
    offered(t, 10, 11, 12, 13, 14)
    # When 11 and 13 settle out of order
    t.settle(13)
    t.settle(11)
    # Then the commit point stays at the first unsettled record
    assert t.committable() == 10
    t.settle(10)
    assert t.committable() == 12
    t.settle(12)
    t.settle(14)
    assert t.committable() == 15


def test_nothing_offered_means_committed_offset() -> None:
    assert AckTracker().committable() == -1
    assert AckTracker(committed=42).committable() == 42


def test_gaps_in_offsets_are_tolerated() -> None:
    # Compaction and transaction markers leave holes.
    t = AckTracker()
    offered(t, 3, 7, 20)
    assert not t.settle(5)  # never offered
    t.settle(7)
    assert t.committable() == 3
    t.settle(3)
    assert t.committable() == 20
    t.settle(20)
    assert t.committable() == 21


def test_settle_twice_and_unknown_are_rejected() -> None:
    t = AckTracker()
    offered(t, 0, 1)
    assert t.settle(1)
    assert not t.settle(1)
    assert not t.settle(99)
    assert t.unsettled == 1


def test_reoffered_and_old_offsets_are_ignored() -> None:
    t = AckTracker(committed=10)
    assert t.offer(9) is OfferResult.IGNORED
    assert t.offer(10) is OfferResult.PENDING
    assert t.offer(10) is OfferResult.IGNORED


def test_pause_above_bound_and_resume_at_low_water() -> None:
    t = AckTracker(max_unsettled=3, resume_at=1)
    offered(t, 0, 1, 2)
    assert not t.should_pause
    offered(t, 3)
    assert t.should_pause
    t.settle(0)
    t.settle(1)
    assert t.should_pause  # 2 unsettled > resume_at
    t.settle(2)
    assert not t.should_pause


def test_metadata_restores_settled_offsets_after_restart() -> None:
    # Given a tracker whose records 5 and 7 settled but 4 and 6 did not
    before = AckTracker()
    offered(before, 4, 5, 6, 7)
    before.settle(5)
    before.settle(7)
    committed, meta = before.committable(), before.commit_metadata()
    assert committed == 4
    # When a new owner starts from that commit
    after = AckTracker(committed=committed, metadata=meta)
    # Then 5 and 7 are skipped without asking the store, 4 and 6 are pending
    results = [after.offer(o) for o in (4, 5, 6, 7)]
    assert results == [
        OfferResult.PENDING,
        OfferResult.ALREADY_SETTLED,
        OfferResult.PENDING,
        OfferResult.ALREADY_SETTLED,
    ]
    after.settle(4)
    after.settle(6)
    assert after.committable() == 8


def test_foreign_metadata_is_ignored() -> None:
    for meta in ("", "hello", "dd1:", "dd1:zz-1", "dd1:0", "dd1:-5", "dd1:1-2,x!", '{"json": 1}'):
        t = AckTracker(committed=100, metadata=meta)
        assert t.offer(101) is OfferResult.PENDING, meta


def test_metadata_stays_within_limit() -> None:
    t = AckTracker(max_unsettled=100_000)
    for o in range(20_000):
        t.offer(o)
    for o in range(1, 20_000, 2):  # every other one: worst case for ranges
        t.settle(o)
    meta = t.commit_metadata(limit=4000)
    assert len(meta.encode()) <= 4000
    decoded = decode_settled(t.committable(), meta)
    assert decoded
    assert all(o % 2 == 1 for o in decoded)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[int], list[int], int]:
    gaps = draw(st.lists(st.integers(1, 3), min_size=1, max_size=60))
    offsets, o = [], draw(st.integers(0, 1000))
    for g in gaps:
        o += g
        offsets.append(o)
    acks = draw(st.permutations(offsets))
    n = draw(st.integers(0, len(acks)))
    return offsets, list(acks[:n]), draw(st.integers(0, len(offsets)))


@settings(max_examples=1500, deadline=None)
@given(scenarios())
def test_property_commit_never_passes_an_unsettled_record(case: tuple[list[int], list[int], int]) -> None:
    offsets, acks, restart_after = case
    t = AckTracker(max_unsettled=10_000)
    for o in offsets:
        t.offer(o)
    settled: set[int] = set()
    for i, o in enumerate(acks):
        assert t.settle(o)
        settled.add(o)
        c = t.committable()
        # committed offset never passes an unsettled record
        assert all(x in settled for x in offsets if x < c)
        # and it is exactly the first unsettled one
        unsettled = [x for x in offsets if x not in settled]
        assert c == (unsettled[0] if unsettled else offsets[-1] + 1)
        if i == restart_after:
            # a restart from the commit + metadata loses no settled record and invents none
            fresh = AckTracker(committed=c, metadata=t.commit_metadata())
            skipped = {x for x in offsets if x >= c and fresh.offer(x) is OfferResult.ALREADY_SETTLED}
            assert skipped <= settled
            assert skipped == {x for x in settled if x >= c}


@settings(max_examples=1000, deadline=None)
@given(st.integers(0, 10**12), st.sets(st.integers(1, 5000), max_size=300))
def test_property_metadata_round_trips(base: int, rel: set[int]) -> None:
    from sidecar.offsets import encode_settled

    settled = {base + r for r in rel}
    meta = encode_settled(base, settled, limit=100_000)
    assert decode_settled(base, meta) == frozenset(settled)


@settings(max_examples=1000, deadline=None)
@given(st.text(max_size=80))
def test_property_any_metadata_decodes_safely(meta: str) -> None:
    out = decode_settled(50, meta)
    assert all(o > 50 for o in out)
