"""A small asyncio TCP proxy that injects network faults between a client and a server.

Modes, switchable at run time:

* ``pass``: forward bytes both ways;
* ``blackhole``: keep connections open but forward nothing (requests time out);
* ``reset``: close every connection at once and refuse new ones with an immediate close.

Used for F1 (timeouts and resets between the sidecar and the broker; the broker advertises the
proxy's address, so every connection a client makes goes through it) and for the links of a
partitionable KafkaCluster (services/kafka_cluster.py), where a ProxyThread runs them off the caller's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Coroutine
from typing import Any


class FaultProxy:
    def __init__(self, listen_port: int, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.listen_port = listen_port
        self.upstream_port = upstream_port
        self.host = host
        self.mode = "pass"
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host, self.listen_port, reuse_address=True
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self._close_all()
        if self._server is not None:
            await self._server.wait_closed()

    def set_mode(self, mode: str) -> None:
        assert mode in ("pass", "blackhole", "reset")
        self.mode = mode
        if mode == "reset":
            self._close_all()

    def _close_all(self) -> None:
        for w in list(self._writers):
            with contextlib.suppress(Exception):
                sock = w.get_extra_info("socket")
                if sock is not None:  # RST rather than FIN: an abrupt reset
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                w.close()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "reset":
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.upstream_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while True:
                    data = await src.read(65536)
                    if not data:
                        break
                    while self.mode == "blackhole":
                        await asyncio.sleep(0.05)
                    if self.mode == "reset":
                        break
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.discard(writer)
        self._writers.discard(up_writer)


class ProxyThread:
    """FaultProxies served by an event loop of their own, in a daemon thread: they keep forwarding
    whatever the caller does with its own loop (or whether it has one), for a whole test session."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxies", daemon=True)
        self._thread.start()
        self.proxies: list[FaultProxy] = []

    def _call(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def add(self, listen_port: int, upstream_port: int) -> FaultProxy:
        proxy = FaultProxy(listen_port, upstream_port)
        self._call(proxy.start())
        self.proxies.append(proxy)
        return proxy

    def set_mode(self, proxy: FaultProxy, mode: str) -> None:
        self._loop.call_soon_threadsafe(proxy.set_mode, mode)

    def stop(self) -> None:
        for proxy in self.proxies:
            self._call(proxy.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()
