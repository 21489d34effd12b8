"""What the two consumer loops share: one thread owns a librdkafka client, and the event loop
reaches it only through commands the thread runs between its calls.

librdkafka's consumers are not to be called from two threads at once, and their callbacks
(rebalances, commit reports, acknowledgement answers) run inside the owner's calls. So the group
consumer (consumer.py) and the share consumer (share_consumer.py) each run one of these: a
command queue, a wake-up event, a stop flag, and the error callback that counts failures into an
:class:`Outage` (or logs them) and keeps the first fatal error for the process to act on.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from confluent_kafka import KafkaError, KafkaException

from sidecar.observability.outage import Outage

log = logging.getLogger(__name__)
C = TypeVar("C")


class PollThread(Generic[C]):
    """Parameters:
    what: the client's name in log lines ("consumer", "share consumer").
    outage: counts the failures the error callback reports and logs their changes of state
        (without it, each is logged).
    """

    def __init__(self, what: str, outage: Outage | None) -> None:
        self._what = what
        self._outage = outage
        self._commands: queue.SimpleQueue[Callable[[C], None]] = queue.SimpleQueue()
        self._wake = threading.Event()  # a command was queued, or the loop has news for the thread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fatal: BaseException | None = None

    def _start_thread(self, name: str) -> None:
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        raise NotImplementedError

    async def stop(self, timeout: float = 30.0) -> None:
        """Ask the thread to finish (it leaves the group and closes the client) and wait for it."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)

    def _command(self, cmd: Callable[[C], None]) -> None:
        self._commands.put(cmd)
        self._wake.set()

    def _drain_commands(self, client: C) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            cmd(client)

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            log.error("fatal %s error: %s", self._what, err)
            self.fatal = KafkaException(err)
        elif self._outage is not None:
            self._outage.failed(f"{self._what}: {err.str()}")
        else:
            log.warning("%s: %s", self._what, err)
