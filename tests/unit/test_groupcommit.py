"""GroupCommit: concurrent callers share runs, at most max_in_flight at once, and a lone caller
does not wait."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.groupcommit import GroupCommit


class Recorder:
    """A run function that records each run's items and waits for ``gate`` before answering."""

    def __init__(self) -> None:
        self.runs: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.in_flight = 0
        self.most_in_flight = 0

    async def __call__(self, items: list[int]) -> list[int]:
        self.runs.append(list(items))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.gate.wait()
            if any(i < 0 for i in items):
                raise ValueError("negative")
            return [i * 10 for i in items]
        finally:
            self.in_flight -= 1


async def test_a_lone_caller_runs_at_once_with_its_own_items() -> None:
    # Given a group with nothing in flight
    rec = Recorder()
    group: GroupCommit[int, int] = GroupCommit(rec)
    # When one caller comes
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    out = await group([1, 2])
    # Then it has its results after one run, without a timer
    assert out == [10, 20]
    assert rec.runs == [[1, 2]]
    assert loop.time() - t0 < 0.05


async def test_callers_of_one_loop_turn_share_a_run() -> None:
    rec = Recorder()
    group: GroupCommit[int, int] = GroupCommit(rec)
    outs = await asyncio.gather(*(group([i]) for i in range(5)))
    assert outs == [[0], [10], [20], [30], [40]]
    assert rec.runs == [[0, 1, 2, 3, 4]]


async def test_what_arrives_while_the_slots_are_busy_goes_together_in_the_next_run() -> None:
    # Given a group of one slot whose run is held
    rec = Recorder()
    rec.gate.clear()
    group: GroupCommit[int, int] = GroupCommit(rec, max_in_flight=1)
    first = asyncio.create_task(group([1]))
    await asyncio.sleep(0.01)
    # When more callers come one by one while it is in flight
    later = []
    for i in range(2, 6):
        later.append(asyncio.create_task(group([i])))
        await asyncio.sleep(0.001)
    assert rec.runs == [[1]]
    rec.gate.set()
    # Then they went in one run after it, and each got its own results
    assert await first == [10]
    assert [await t for t in later] == [[20], [30], [40], [50]]
    assert rec.runs == [[1], [2, 3, 4, 5]]
    assert rec.most_in_flight == 1


async def test_never_more_runs_in_flight_than_allowed() -> None:
    rec = Recorder()
    rec.gate.clear()
    group: GroupCommit[int, int] = GroupCommit(rec, max_in_flight=2)
    tasks = []
    for i in range(10):
        tasks.append(asyncio.create_task(group([i])))
        await asyncio.sleep(0.001)
    assert rec.in_flight == 2
    rec.gate.set()
    results = [await t for t in tasks]
    assert results == [[i * 10] for i in range(10)]
    assert rec.most_in_flight == 2
    assert sorted(i for run in rec.runs for i in run) == list(range(10))


async def test_a_failed_run_fails_its_callers_only() -> None:
    rec = Recorder()
    rec.gate.clear()
    group: GroupCommit[int, int] = GroupCommit(rec, max_in_flight=1)
    ok = asyncio.create_task(group([1]))
    await asyncio.sleep(0.01)
    bad = asyncio.create_task(group([-1]))
    mate = asyncio.create_task(group([2]))
    await asyncio.sleep(0.01)
    rec.gate.set()
    assert await ok == [10]
    # -1 and 2 shared the second run: both see its failure
    with pytest.raises(ValueError, match="negative"):
        await bad
    with pytest.raises(ValueError, match="negative"):
        await mate
    # and the group goes on
    assert await group([3]) == [30]


async def test_max_items_splits_runs_between_callers() -> None:
    rec = Recorder()
    group: GroupCommit[int, int] = GroupCommit(rec, max_items=3)
    outs = await asyncio.gather(group([1, 2]), group([3, 4]), group([5]), group([6, 7, 8, 9]))
    assert list(outs) == [[10, 20], [30, 40], [50], [60, 70, 80, 90]]
    # a caller's items are never split; one alone may exceed the limit
    assert rec.runs == [[1, 2], [3, 4, 5], [6, 7, 8, 9]]


async def test_submit_calls_back_without_waiting() -> None:
    rec = Recorder()
    group: GroupCommit[int, int] = GroupCommit(rec)
    got: list[object] = []
    group.submit([1, 2], got.append)
    group.submit([-5], got.append)
    assert got == []
    while len(got) < 2:
        await asyncio.sleep(0.001)
    # both shared one run, which failed because of -5
    assert all(isinstance(g, ValueError) for g in got)
    group.submit([4], got.append)
    while len(got) < 3:
        await asyncio.sleep(0.001)
    assert got[2] == [40]


async def test_a_caller_that_gives_up_does_not_disturb_the_others() -> None:
    rec = Recorder()
    rec.gate.clear()
    group: GroupCommit[int, int] = GroupCommit(rec)
    quitter = asyncio.create_task(group([1]))
    stayer = asyncio.create_task(group([2]))
    await asyncio.sleep(0.01)
    quitter.cancel()
    rec.gate.set()
    assert await stayer == [20]
    assert quitter.cancelled()
