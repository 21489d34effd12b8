"""Processes: free ports, a service in a session of its own, the watchdog that ends the
services of a starter that died, and waiting for a port or a condition."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port free on 127.0.0.1 now, never the same one twice in this process, and below the
    kernel's ephemeral range when that has room: a client that keeps reconnecting to a port of
    that range while nothing listens (a sidecar worker restarting) may be given the same port as
    its own source port, connect to itself, and so hold the port the restarted server needs."""
    low, _ = _ephemeral_range()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10_000, low) if low > 12_000 else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port on 127.0.0.1")


def port_block(n: int) -> int:
    """A free port P with P + 1 .. P + n - 1 free too (none of them handed out before): where a
    sidecar of n workers (server.workers) listens."""
    for _ in range(100):
        port = free_port()
        with contextlib.ExitStack() as held:
            try:
                for i in range(1, n):
                    if port + i in _handed_out:
                        raise OSError(f"port {port + i} was handed out")
                    s = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    s.bind(("127.0.0.1", port + i))
            except OSError:
                continue
        _handed_out.update(range(port, port + n))
        return port
    raise RuntimeError(f"no {n} consecutive free ports on 127.0.0.1")


def wait_port(port: int, deadline: float, proc: subprocess.Popen[bytes], what: str) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} during start-up")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} did not open 127.0.0.1:{port} in time")


# --------------------------------------------------------------------------------------------
# processes


def _start_time(pid: int) -> str | None:
    """When a process started (/proc/PID/stat), or None when it has ended: a pid with another
    start time is another process that reuses the number."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[19]
    except OSError:
        return None


def run_watchdog() -> int:
    """The watchdog process (``python deploy/local/services _watchdog``): read "PID STARTTIME"
    lines until end of file (the process that started the services is gone, however it ended),
    then SIGKILL the process group of every service that still runs as the same process."""
    for line in sys.stdin.read().splitlines():
        pid, start = line.split()
        if _start_time(int(pid)) == start:
            with contextlib.suppress(OSError):
                os.killpg(int(pid), signal.SIGKILL)
    return 0


class _Watchdog:
    """Ends the services this process started when it dies without stopping them.

    A test process that aborts (SIGABRT, SIGKILL, an interpreter crash) runs no ``finally`` and
    no fixture teardown, and its brokers and redis-servers, each in a session of its own, kept
    running beside the next runs. One watchdog process per starter holds the read end of a pipe;
    the end of file it sees when the starter is gone, for whatever reason, is its signal.
    """

    proc: subprocess.Popen[bytes] | None = None
    owner = 0  # the pid that started it: a forked child must not write into its parent's pipe

    @classmethod
    def watch(cls, pid: int) -> None:
        start = _start_time(pid)
        if start is None:
            return  # already gone
        if cls.proc is None or cls.proc.poll() is not None or cls.owner != os.getpid():
            cls.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve().parent), "_watchdog"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C of the starter's group must not end it first
            )
            cls.owner = os.getpid()
        assert cls.proc.stdin is not None
        cls.proc.stdin.write(f"{pid} {start}\n".encode())
        cls.proc.stdin.flush()


def spawn(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start a service in a session (and process group) of its own, watched by ``_Watchdog``."""
    proc: subprocess.Popen[bytes] = subprocess.Popen(args, start_new_session=True, **kwargs)
    _Watchdog.watch(proc.pid)
    return proc


@dataclass
class Service:
    proc: subprocess.Popen[bytes]
    workdir: Path
    log_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the process (used by fault tests)."""
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self, timeout: float = 20.0) -> None:
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


#: The broker JVM tuning Kafka's operations documentation gives (LinkedIn's, "Java Version").
#: Its 16 MB G1 regions matter to a benchmark: with the 1 MB regions of a small heap, every
def wait_until(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            if check():
                return
        time.sleep(0.2)
    raise TimeoutError(f"{what} not within {timeout:.0f}s")
