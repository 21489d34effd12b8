"""One contract, three stores: memory, SQLite and Redis must agree.

Redis runs in every shape the store supports, each a real server started by
deploy/local/services: one node, a Cluster of three masters with replicas, a Sentinel-watched
primary, and a TLS-only node reached as a least-privilege ACL user.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.store.base import IN_TIME, LATE, Claim, ClaimMode, ClaimStatus, DedupStore, PublishRecord
from sidecar.store.memory import MemoryStore
from sidecar.store.redis import RedisStore
from sidecar.store.sqlite import SQLiteStore

NEW, DONE, BUSY = ClaimStatus.NEW, ClaimStatus.DONE, ClaimStatus.BUSY
LEASE = 400  # ms; long enough for a round trip, short enough to wait out
DAY = 86_400_000


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        pytest.param("redis", marks=pytest.mark.integration),
        pytest.param("redis-cluster", marks=pytest.mark.integration),
        pytest.param("redis-cluster-per-key", marks=pytest.mark.integration),
        pytest.param("redis-sentinel", marks=pytest.mark.integration),
        pytest.param("redis-tls-acl", marks=pytest.mark.integration),
    ]
)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[DedupStore]:
    s: Any
    if request.param == "memory":
        s = MemoryStore()
    elif request.param == "sqlite":
        s = await SQLiteStore(tmp_path / "dedup.sqlite3").open()
    else:
        s = redis_store(request, request.param)
        await s.ping()
        assert s.shape == {
            "redis-cluster": "cluster",
            "redis-cluster-per-key": "cluster",
            "redis-sentinel": "sentinel",
        }.get(request.param, "standalone")
        assert s.per_master_calls is (request.param == "redis-cluster")
    yield s
    await s.close()


def redis_store(request: pytest.FixtureRequest, shape: str, **kwargs: Any) -> RedisStore:
    """A RedisStore on the real server of ``shape``, under a fresh key prefix."""
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    if shape == "redis-tls-acl":
        from tests.conftest import ACL_PASSWORD, ACL_PREFIX, ACL_USER

        server = request.getfixturevalue("redis_tls")
        assert server.tls is not None
        url = f"rediss://{ACL_USER}:{ACL_PASSWORD}@{server.address}/0"
        return RedisStore(url, prefix=ACL_PREFIX + prefix, tls_ca_file=str(server.tls.ca), **kwargs)
    if shape == "redis-cluster-per-key":  # store.redis_cluster_batching = "per-key"
        kwargs["cluster_batching"] = "per-key"
        shape = "redis-cluster"
    fixture = {"redis": "redis_server", "redis-cluster": "redis_cluster", "redis-sentinel": "redis_sentinel"}
    return RedisStore(request.getfixturevalue(fixture[shape]).url, prefix=prefix, **kwargs)


def keys(n: int) -> list[str]:
    tag = uuid.uuid4().hex[:6]
    return [f"k-{tag}-{i}" for i in range(n)]


async def test_conforms_to_protocol(store: DedupStore) -> None:
    assert isinstance(store, DedupStore)


async def test_claim_new_then_busy_for_others(store: DedupStore) -> None:
    ks = keys(3)
    assert [c.status for c in await store.claim(ks, "a", LEASE)] == [NEW] * 3
    assert [c.status for c in await store.claim(ks, "b", LEASE)] == [BUSY] * 3


async def test_reclaim_by_owner_extends(store: DedupStore) -> None:
    [k] = keys(1)
    await store.claim([k], "a", LEASE)
    await asyncio.sleep(LEASE / 2000)
    assert (await store.claim([k], "a", LEASE))[0].status is NEW
    await asyncio.sleep(LEASE * 0.7 / 1000)  # past the first lease, within the extension
    assert (await store.claim([k], "b", LEASE))[0].status is BUSY


async def test_expired_lease_is_taken_over_with_next_attempt(store: DedupStore) -> None:
    [k] = keys(1)
    first = (await store.claim([k], "a", 150))[0]
    assert (first.status, first.attempt) == (NEW, 1)
    await asyncio.sleep(0.3)
    second = (await store.claim([k], "b", LEASE))[0]
    assert (second.status, second.attempt) == (NEW, 2)


async def test_complete_marks_done_for_everyone(store: DedupStore) -> None:
    ks = keys(2)
    await store.claim(ks, "a", LEASE)
    assert await store.complete(ks, "a", DAY) == [False, False]
    assert [c.status for c in await store.claim(ks, "b", LEASE)] == [DONE, DONE]
    assert [c.status for c in await store.claim(ks, "a", LEASE)] == [DONE, DONE]


async def test_complete_is_idempotent(store: DedupStore) -> None:
    [k] = keys(1)
    await store.claim([k], "a", LEASE)
    assert await store.complete([k], "a", DAY) == [False]
    assert await store.complete([k], "a", DAY) == [False]
    assert await store.complete([k], "b", DAY) == [False]


async def test_late_complete_still_marks_done(store: DedupStore) -> None:
    # The effect happened, so the key is done even if the owner lost its lease (a zombie's ack).
    a, b = keys(2)
    await store.claim([a], "a", 100)
    await asyncio.sleep(0.25)
    await store.claim([a], "b", LEASE)  # b took over
    late, never = await store.complete([a, b], "a", DAY)
    # a: b's live claim still runs (b may deliver the key until it ends); b was never claimed
    assert 0 < late <= LEASE
    assert never == LATE
    assert [c.status for c in await store.claim([a, b], "b", LEASE)] == [DONE, DONE]


async def test_a_complete_after_the_own_lease_lapsed_is_late(store: DedupStore) -> None:
    lapsed, released = keys(2)
    await store.claim([lapsed, released], "a", 100)
    await store.release([released], "a")
    await asyncio.sleep(0.25)
    assert await store.complete([lapsed, released], "a", DAY) == [LATE, LATE]
    assert await store.complete([lapsed], "b", DAY) == [IN_TIME]  # done already


async def test_release_only_by_owner(store: DedupStore) -> None:
    [k] = keys(1)
    await store.claim([k], "a", LEASE)
    assert await store.release([k], "b") == [False]
    assert (await store.claim([k], "b", LEASE))[0].status is BUSY
    assert await store.release([k], "a") == [True]
    c = (await store.claim([k], "b", LEASE))[0]
    assert (c.status, c.attempt) == (NEW, 2)


async def test_release_of_an_undelivered_claim_gives_its_attempt_back(store: DedupStore) -> None:
    # Claimed ahead, never sent to an app, partition moved: the next owner starts the same attempt.
    fresh, redelivered = keys(2)
    await store.claim([fresh, redelivered], "a", LEASE)
    assert await store.release([redelivered], "a") == [True]  # delivered once, then released
    assert [c.attempt for c in await store.claim([redelivered], "b", LEASE)] == [2]
    assert await store.release([fresh, redelivered], "b", delivered=False) == [False, True]
    assert await store.release([fresh], "a", delivered=False) == [True]
    claims = await store.claim([fresh, redelivered], "c", LEASE)
    assert [(c.status, c.attempt) for c in claims] == [(NEW, 1), (NEW, 2)]
    assert await store.complete([fresh], "c", DAY) == [False]
    assert (await store.claim([fresh], "d", LEASE))[0] == Claim(DONE, 1)


async def test_an_undelivered_claim_gives_its_attempt_back_after_its_lease_ran_out(
    store: DedupStore,
) -> None:
    waited, taken = keys(2)
    await store.claim([waited, taken], "a", 100)
    await asyncio.sleep(0.25)  # both leases ran out while the records waited for an app
    await store.claim([taken], "b", LEASE)  # another owner took this one over meanwhile
    assert await store.release([waited, taken], "a") == [False, False]  # expired: nothing to drop
    assert await store.release([waited, taken], "a", delivered=False) == [True, False]
    claims = await store.claim([waited, taken], "c", 100)
    assert [(c.status, c.attempt) for c in claims] == [(NEW, 1), (BUSY, 2)]


async def test_renewing_an_undelivered_expired_claim_keeps_the_attempt(store: DedupStore) -> None:
    # A record waited in the sidecar's queue past its lease: renewing it is not a new attempt.
    # Once another owner has taken the key over, a renewal is an ordinary takeover.
    mine, taken = keys(2)
    await store.claim([mine, taken], "a", 100)
    await asyncio.sleep(0.25)
    assert (await store.claim([taken], "b", 100))[0] == Claim(NEW, 2)
    await asyncio.sleep(0.25)
    claims = await store.claim([mine, taken], "a", LEASE, mode=ClaimMode.RENEW)
    assert [(c.status, c.attempt) for c in claims] == [(NEW, 1), (NEW, 3)]
    assert (await store.claim([mine], "b", LEASE, mode=ClaimMode.RENEW))[
        0
    ].status is BUSY  # the lease is live again
    assert (await store.claim([mine], "a", LEASE))[0] == Claim(NEW, 1)  # own live lease: extended


async def test_redelivering_under_a_live_claim_counts_the_next_attempt(store: DedupStore) -> None:
    # The owner sends a record again under its own live claim (ack deadline, stream closed):
    # the attempt grows in the store, so a later takeover counts on from there. Redelivering
    # someone else's live claim is refused (BUSY); a done key stays done.
    mine, theirs, done = keys(3)
    await store.claim([mine, done], "a", 100)
    await store.claim([theirs], "b", LEASE)
    await store.complete([done], "a", DAY)
    claims = await store.claim([mine, theirs, done], "a", 100, mode=ClaimMode.REDELIVER)
    assert [(c.status, c.attempt) for c in claims] == [(NEW, 2), (BUSY, 1), (DONE, 1)]
    assert (await store.claim([mine], "a", 100, mode=ClaimMode.REDELIVER))[0] == Claim(NEW, 3, 2)
    assert (await store.claim([mine], "a", 100))[0] == Claim(NEW, 3, 2)  # a plain re-claim extends
    await asyncio.sleep(0.25)
    assert (await store.claim([mine], "c", LEASE))[0] == Claim(NEW, 4, 2)  # the takeover counts on


async def test_failures_count_failed_deliveries_and_not_hand_backs(store: DedupStore) -> None:
    # delivery.max_attempts bounds failures: a redelivery by the owner (ack deadline, stream
    # closed) and a release after a Nack count one; a takeover after a lease ran out (a sidecar
    # died) or a release when a partition moved counts an attempt but no failure.
    [k] = keys(1)
    assert (await store.claim([k], "a", LEASE))[0] == Claim(NEW, 1, 0)
    assert (await store.claim([k], "a", LEASE, mode=ClaimMode.REDELIVER))[0] == Claim(NEW, 2, 1)
    assert await store.release([k], "a", failed=True) == [True]  # nacked
    assert (await store.claim([k], "a", 100))[0] == Claim(NEW, 3, 2)
    assert await store.release([k], "a") == [True]  # its partition moved
    assert (await store.claim([k], "b", 100))[0] == Claim(NEW, 4, 2)
    await asyncio.sleep(0.25)  # b died: its lease ran out
    assert (await store.claim([k], "c", 100, mode=ClaimMode.REDELIVER))[0] == Claim(NEW, 5, 2)
    await asyncio.sleep(0.25)  # c's ack deadline and its lease passed: its own redelivery fails one
    assert (await store.claim([k], "c", LEASE, mode=ClaimMode.REDELIVER))[0] == Claim(NEW, 6, 3)
    assert await store.release([k], "c", delivered=False, failed=True) == [True]  # never sent: no failure
    assert (await store.claim([k], "d", LEASE))[0] == Claim(NEW, 6, 3)
    assert (await store.claim([k], "e", LEASE))[0] == Claim(BUSY, 6, 3)
    info = await store.inspect(k, "nothing")
    assert (info.attempt, info.failures) == (6, 3)
    assert await store.complete([k], "d", DAY) == [IN_TIME]
    assert (await store.claim([k], "e", LEASE))[0] == Claim(DONE, 6, 3)


async def test_a_second_release_gives_nothing_back(store: DedupStore) -> None:
    # A sidecar that stops after a revoke releases some records twice. The attempt an undelivered
    # claim gives back is given back once, or the next owner would repeat an attempt number.
    [k] = keys(1)
    await store.claim([k], "a", LEASE)
    assert (await store.claim([k], "a", LEASE, mode=ClaimMode.REDELIVER))[0] == Claim(NEW, 2, 1)
    assert await store.release([k], "a", delivered=False) == [True]
    assert await store.release([k], "a", delivered=False) == [False]
    assert await store.release([k], "a", failed=True) == [False]
    assert (await store.claim([k], "b", LEASE))[0] == Claim(NEW, 2, 1)


async def test_release_does_not_undo_done(store: DedupStore) -> None:
    [k] = keys(1)
    await store.claim([k], "a", LEASE)
    await store.complete([k], "a", DAY)
    assert await store.release([k], "a") == [False]
    assert (await store.claim([k], "b", LEASE))[0].status is DONE


async def test_done_expires_after_retention(store: DedupStore) -> None:
    [k] = keys(1)
    await store.claim([k], "a", LEASE)
    await store.complete([k], "a", 150)
    await asyncio.sleep(0.3)
    await store.purge()
    assert (await store.claim([k], "b", LEASE))[0].status is NEW


async def test_batches_of_mixed_states(store: DedupStore) -> None:
    done, busy, new = keys(3)
    await store.claim([done, busy], "x", LEASE)
    await store.complete([done], "x", DAY)
    got = await store.claim([done, busy, new, new], "a", LEASE)
    assert [c.status for c in got] == [DONE, BUSY, NEW, NEW]  # a key twice in a batch: own re-claim


async def test_empty_batches(store: DedupStore) -> None:
    assert await store.claim([], "a", LEASE) == []
    assert await store.complete([], "a", DAY) == []
    assert await store.release([], "a") == []


async def test_large_batch_is_one_call(store: DedupStore) -> None:
    ks = keys(1200)
    assert all(c.status is NEW for c in await store.claim(ks, "a", 10_000))
    assert await store.complete(ks, "a", DAY) == [False] * 1200


def begun(got: list[PublishRecord | Claim]) -> list[PublishRecord | str]:
    """publish_begin's answers, with claims as their status (a publish claim's attempt means nothing)."""
    return [g.status.name if isinstance(g, Claim) else g for g in got]


async def test_publish_begins_with_a_claim_and_the_first_finished_record_wins(store: DedupStore) -> None:
    [k] = keys(1)
    assert begun(await store.publish_begin([k], "a", LEASE)) == ["NEW"]
    assert begun(await store.publish_begin([k], "b", LEASE)) == ["BUSY"]
    first = PublishRecord("d1", "orders", 2, 40)
    assert await store.publish_finish([(k, first)], "a", DAY) == [first]
    # Published: every later begin gets the record and claims nothing.
    assert begun(await store.publish_begin([k], "b", LEASE)) == [first]
    # A publisher whose claim ran out and that produced anyway does not replace the record.
    assert await store.publish_finish([(k, PublishRecord("d2", "orders", 0, 41))], "b", DAY) == [first]
    assert begun(await store.publish_begin([k], "c", LEASE)) == [first]


async def test_a_publish_claim_is_its_owners_again_and_anyones_after_its_lease(store: DedupStore) -> None:
    [k] = keys(1)
    assert begun(await store.publish_begin([k], "a", LEASE)) == ["NEW"]
    assert begun(await store.publish_begin([k], "a", LEASE)) == ["NEW"]  # a retry of its own
    assert begun(await store.publish_begin([k], "b", LEASE)) == ["BUSY"]
    await asyncio.sleep(LEASE * 1.5 / 1000)
    assert begun(await store.publish_begin([k], "b", LEASE)) == ["NEW"]
    assert begun(await store.publish_begin([k], "a", LEASE)) == ["BUSY"]


async def test_a_failed_publish_gives_its_claim_up(store: DedupStore) -> None:
    [k] = keys(1)
    await store.publish_begin([k], "a", LEASE)
    assert await store.publish_finish([(k, None)], "a", DAY) == [None]
    # The claim is gone at once (not after its lease), and there is still no record.
    assert begun(await store.publish_begin([k], "b", LEASE)) == ["NEW"]


async def test_finishing_someone_elses_publish_leaves_their_claim(store: DedupStore) -> None:
    [k] = keys(1)
    await store.publish_begin([k], "a|b", LEASE)  # owners may contain the separator
    assert await store.publish_finish([(k, None)], "a", DAY) == [None]
    assert begun(await store.publish_begin([k], "c", LEASE)) == ["BUSY"]
    assert await store.publish_finish([(k, None)], "a|b", DAY) == [None]
    assert begun(await store.publish_begin([k], "c", LEASE)) == ["NEW"]


async def test_publish_batches_answer_per_entry_and_first_writer_wins_within_a_batch(
    store: DedupStore,
) -> None:
    a, b, c = keys(3)
    ra, rb, rb2 = (
        PublishRecord("da", "t", 0, 1),
        PublishRecord("db", "t", 1, 2),
        PublishRecord("x", "t", 2, 3),
    )
    assert begun(await store.publish_begin([], "o", LEASE)) == []
    assert await store.publish_finish([], "o", DAY) == []
    await store.publish_begin([a, b], "o", LEASE)
    assert await store.publish_finish([(a, ra), (b, rb), (b, rb2)], "o", DAY) == [ra, rb, rb]
    assert begun(await store.publish_begin([c, b, a], "p", LEASE)) == ["NEW", rb, ra]
    many = [(f"{a}-{i}", PublishRecord(f"d{i}", "t", 0, i)) for i in range(1200)]  # past any chunk size
    assert begun(await store.publish_begin([k for k, _ in many], "o", LEASE)) == ["NEW"] * 1200
    assert await store.publish_finish(many, "o", DAY) == [r for _, r in many]
    assert begun(await store.publish_begin([k for k, _ in many], "p", LEASE)) == [r for _, r in many]


async def test_publish_record_expires(store: DedupStore) -> None:
    [k] = keys(1)
    await store.publish_begin([k], "a", LEASE)
    await store.publish_finish([(k, PublishRecord("d", "t", 0, 1))], "a", 150)
    await asyncio.sleep(0.3)
    assert begun(await store.publish_begin([k], "b", LEASE)) == ["NEW"]


async def test_topic_with_pipe_in_digest_round_trips() -> None:
    rec = PublishRecord("ab|cd", "t.x-1", 3, 99)
    assert PublishRecord.decode(rec.encode()) == rec


async def test_sqlite_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "durable.sqlite3"
    s = await SQLiteStore(path).open()
    await s.claim(["k"], "a", LEASE)
    await s.complete(["k"], "a", DAY)
    await s.publish_begin(["p"], "a", LEASE)
    await s.publish_finish([("p", PublishRecord("d", "t", 0, 7))], "a", DAY)
    await s.close()
    s2 = await SQLiteStore(path).open()
    assert (await s2.claim(["k"], "b", LEASE))[0].status is DONE
    assert await s2.publish_begin(["p"], "b", LEASE) == [PublishRecord("d", "t", 0, 7)]
    await s2.close()


async def test_sqlite_adds_the_failures_column_to_an_older_database(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE dedup_keys (key TEXT PRIMARY KEY, done INTEGER NOT NULL, owner TEXT NOT NULL,"
        " deadline INTEGER NOT NULL, attempt INTEGER NOT NULL, expires INTEGER NOT NULL) WITHOUT ROWID;"
    )
    db.execute("INSERT INTO dedup_keys VALUES ('k', 0, 'a', 0, 2, ?)", (2**62,))
    db.commit()
    db.close()
    s = await SQLiteStore(path).open()
    assert (await s.claim(["k"], "b", LEASE))[0] == Claim(NEW, 3, 0)
    assert (await s.claim(["k"], "b", LEASE, mode=ClaimMode.REDELIVER))[0] == Claim(NEW, 4, 1)
    await s.close()
    again = await SQLiteStore(path).open()  # the column is there now: opening again adds nothing
    assert (await again.inspect("k", "p")).failures == 1
    await again.close()


@pytest.mark.integration
@pytest.mark.parametrize("shape", ["redis", "redis-cluster", "redis-cluster-per-key"])
async def test_redis_reloads_flushed_scripts_and_keeps_the_connection_usable(
    request: pytest.FixtureRequest, shape: str
) -> None:
    s = redis_store(request, shape)
    ks = keys(30)
    assert [c.status for c in await s.claim(ks[:2], "a", LEASE)] == [NEW, NEW]
    # A Redis restart, failover or SCRIPT FLUSH forgets the scripts: the next batch loads them
    # again (on every node that lost them), and the replies that said NOSCRIPT do not leave the
    # connection out of step with its replies.
    server = request.getfixturevalue("redis_server" if shape == "redis" else "redis_cluster")
    for node in server.nodes if shape != "redis" else [server]:
        node.cli("SCRIPT", "FLUSH")
    assert [c.status for c in await s.claim(ks, "a", LEASE)] == [NEW] * 30
    assert await s.complete(ks, "a", DAY) == [False] * 30
    assert [c.status for c in await s.claim(ks, "b", LEASE)] == [DONE] * 30
    await s.close()


@pytest.mark.integration
async def test_redis_unreachable_is_store_unavailable_naming_the_setting() -> None:
    from sidecar.errors import StoreUnavailable

    s = RedisStore("redis://127.0.0.1:1/0", timeout_s=1.0)
    with pytest.raises(StoreUnavailable, match=r"store\.redis_url"):
        await s.claim(["k"], "a", LEASE)
    await s.close()


async def test_concurrent_single_key_calls_each_get_their_own_answer(store: DedupStore) -> None:
    # The Redis store joins concurrent calls into one round trip; each caller still gets the
    # answer for its own keys, in order, and first-writer-wins holds within a joined batch.
    ks = keys(20)
    claims = await asyncio.gather(
        *(store.claim([k, "shared-" + ks[0]], f"o{i}", LEASE) for i, k in enumerate(ks))
    )
    assert [c[0].status for c in claims] == [NEW] * 20
    assert sorted(c[1].status.name for c in claims) == ["BUSY"] * 19 + ["NEW"]
    records = [PublishRecord(f"d{i}", "t", i, i) for i in range(20)]
    claimed = await asyncio.gather(*(store.publish_begin(["pk-" + ks[0]], f"o{i}", LEASE) for i in range(20)))
    assert sorted(str(x) for [x] in map(begun, claimed)) == ["BUSY"] * 19 + ["NEW"]
    stored = await asyncio.gather(
        *(store.publish_finish([("pk-" + ks[0], r)], f"o{i}", DAY) for i, r in enumerate(records))
    )
    assert len({s[0] for s in stored}) == 1
    assert stored[0][0] in records
    looked = await asyncio.gather(
        *(store.publish_begin([k], "late", LEASE) for k in ["pk-" + ks[0], "missing-" + ks[1]] * 5)
    )
    assert [begun(x) for x in looked] == [[stored[0][0]], ["NEW"]] * 5


async def test_inspect_reads_each_state_without_changing_it(store: DedupStore) -> None:
    k, p = keys(2)
    assert (await store.inspect(k, p)).state == "absent"
    await store.claim([k], "a", LEASE)
    got = await store.inspect(k, p)
    assert (got.state, got.owner, got.attempt) == ("claimed", "a", 1)
    assert got.lease_until_ms > 0
    assert got.expires_ms >= got.lease_until_ms
    assert (await store.inspect(k, p)).state == "claimed"  # reading changed nothing
    await store.release([k], "a")
    assert (await store.inspect(k, p)).state == "released"
    await store.complete([k], "b", DAY)
    done = await store.inspect(k, p)
    assert (done.state, done.owner, done.attempt) == ("done", "b", 1)
    assert done.published is None
    record = PublishRecord("d1", "orders", 2, 40)
    await store.publish_begin([p], "a", LEASE)
    assert (await store.inspect(k, p)).published is None  # a publish in progress is no result
    await store.publish_finish([(p, record)], "a", DAY)
    assert (await store.inspect(k, p)).published == record
