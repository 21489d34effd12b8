"""What the log says while a dependency (Kafka, the store) fails: its changes of state, not each
failure.

A dependency that stops answering makes every client retry, and each retry used to be a log line
(librdkafka logged a refused connection once itself and once more through the error callback: some
2,500 lines in 45 s). An ``Outage`` logs the first failure with its reason; while failures go on, a
reminder at most once per ``remind_s`` with how many there were; and once the dependency answered
and has stayed quiet for ``quiet_s``, that it is back and how long it was out. Every failure is
counted in ``dedup_dependency_failures_total{dependency}``.

The quiet period keeps one broker of several that stays down (its connections keep failing while
the others answer) from reading as "back" and "down" by turns.

Thread-safe: librdkafka reports failures on its own threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from prometheus_client import Counter

log = logging.getLogger(__name__)

REMIND_S = 60.0
QUIET_S = 15.0


class Outage:
    """The state of one dependency as the log tells it: ``failed`` for each failure, ``answered``
    for each success."""

    def __init__(
        self,
        name: str,
        failures: Counter,
        remind_s: float = REMIND_S,
        quiet_s: float = QUIET_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._failures = failures.labels(name)
        self._remind_s = remind_s
        self._quiet_s = quiet_s
        self._clock = clock
        self._lock = threading.Lock()
        self.down_since: float | None = None
        self._last_failure = 0.0
        self._last_log = 0.0
        self._count = 0  # failures since the outage began
        self._since_log = 0  # failures since the last line
        self._answered_at: float | None = None  # first answer after the last failure

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def failed(self, reason: str) -> None:
        self._failures.inc()
        now = self._clock()
        with self._lock:
            self._last_failure = now
            self._answered_at = None
            self._count += 1
            self._since_log += 1
            if self.down_since is None:
                self.down_since = self._last_log = now
                self._count = self._since_log = 1
                line = (
                    f"{self.name}: failing: {reason} "
                    f"(logged again at most every {self._remind_s:.0f}s while it lasts)"
                )
            elif now - self._last_log >= self._remind_s:
                line = (
                    f"{self.name}: still failing after {now - self.down_since:.0f}s, {self._since_log} "
                    f"failures in the last {now - self._last_log:.0f}s; the last: {reason}"
                )
                self._last_log = now
                self._since_log = 0
            else:
                return
        log.warning("%s", line)

    def answered(self) -> None:
        """A request was answered. Once answers came and no failure followed for ``quiet_s``,
        the outage is over."""
        if self.down_since is None:
            return  # the common case, without the lock
        now = self._clock()
        with self._lock:
            if self.down_since is None:
                return
            if self._answered_at is None:
                self._answered_at = now
            if now - self._last_failure < self._quiet_s:
                return
            out_for, count = self._answered_at - self.down_since, self._count
            self.down_since = None
        log.info("%s: answering again after %.0fs (%d failures)", self.name, out_for, count)
