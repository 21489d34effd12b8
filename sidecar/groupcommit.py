"""Group commit: concurrent calls that each carry a few items, run together.

Unary calls from an app that acks or publishes one message at a time arrive separately but
concurrently. Each could pay its own store round trip and producer pass; a database faced with
concurrent transactions shares one log flush among them instead. ``GroupCommit`` does the same:
at most ``max_in_flight`` runs are in flight, and whatever arrives while every slot is busy waits
for the next free slot and goes with everything else that waited. A caller that is alone waits
for nothing but the current event-loop turn (so calls made in one turn still share a run).

No I/O of its own; the run function does the work.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

I = TypeVar("I")  # noqa: E741 - an item
R = TypeVar("R")  # its result

#: How a caller hears of its run: the results of its items, or the exception that failed the run.
Done = Callable[[list[R] | BaseException], None]


class GroupCommit(Generic[I, R]):
    """Parameters:
    run: does the work for a list of items; returns one result per item, in order. An
        exception fails every caller of that run.
    max_in_flight: runs at once (1 or 2 keeps a store or producer busy without queueing
        behind itself).
    max_items: most items per run; a caller's items are never split, so a run exceeds it only
        when one caller alone brings more.
    on_run: called with the item count as each run starts (metrics).
    """

    def __init__(
        self,
        run: Callable[[list[I]], Awaitable[Sequence[R]]],
        max_in_flight: int = 2,
        max_items: int = 1 << 30,
        on_run: Callable[[int], None] | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._run = run
        self._max_in_flight = max_in_flight
        self._max_items = max_items
        self._on_run = on_run
        self._waiting: list[tuple[list[I], Done[R]]] = []
        self._running = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        #: Runs started so far (the items they carried go to ``on_run``).
        self.runs = 0

    @property
    def in_flight(self) -> int:
        return self._running

    @property
    def idle(self) -> bool:
        """No run in flight and no caller waiting."""
        return not self._running and not self._waiting

    async def __call__(self, items: list[I]) -> list[R]:
        """The results of ``items``, once the run that carries them is done."""
        fut: asyncio.Future[list[R]] = asyncio.get_running_loop().create_future()

        def done(outcome: list[R] | BaseException) -> None:
            if fut.done():  # the caller gave up
                return
            if isinstance(outcome, asyncio.CancelledError):
                fut.cancel()
            elif isinstance(outcome, BaseException):
                fut.set_exception(outcome)
            else:
                fut.set_result(outcome)

        self.submit(items, done)
        return await fut

    def submit(self, items: list[I], done: Done[R]) -> None:
        """Queue ``items`` without waiting: ``done`` is called on the event loop with their
        results (or the run's exception). For callers that must not block on each item, such as
        a stream reader that keeps reading while its earlier requests are worked on."""
        self._waiting.append((items, done))
        if not self._scheduled and self._running < self._max_in_flight:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._start)

    def _start(self) -> None:
        self._scheduled = False
        while self._waiting and self._running < self._max_in_flight:
            group = self._take()
            self._running += 1
            self.runs += 1
            task = asyncio.get_running_loop().create_task(self._run_group(group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self) -> list[tuple[list[I], Done[R]]]:
        """The callers of the next run: in arrival order, up to max_items (at least one caller)."""
        waiting = self._waiting
        n = count = 0
        while n < len(waiting):
            size = len(waiting[n][0])
            if n and count + size > self._max_items:
                break
            count += size
            n += 1
        group = waiting[:n]
        del waiting[:n]
        return group

    async def _run_group(self, group: list[tuple[list[I], Done[R]]]) -> None:
        try:
            items = group[0][0] if len(group) == 1 else [x for items, _ in group for x in items]
            if self._on_run is not None:
                self._on_run(len(items))
            try:
                results = await self._run(items)
            except BaseException as exc:
                for _, done in group:
                    _tell(done, exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
            if len(group) == 1:
                _tell(group[0][1], list(results))
                return
            i = 0
            for its, done in group:
                _tell(done, list(results[i : i + len(its)]))
                i += len(its)
        finally:
            self._running -= 1
            if self._waiting and not self._scheduled:
                # The next run starts at once with everything that waited for this one.
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._start)


def _tell(done: Done[R], outcome: list[R] | BaseException) -> None:
    """Call one caller's ``done``; a failing one must not keep the others from their results."""
    try:
        done(outcome)
    except Exception:
        log.exception("a group commit's caller failed to take its results")
