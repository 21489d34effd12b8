"""A small asyncio TCP proxy that injects network faults between a client and a server.

Modes, switchable at run time:

* ``pass``: forward bytes both ways;
* ``blackhole``: keep connections open but forward nothing (requests time out);
* ``reset``: close every connection at once and refuse new ones with an immediate close.

Used for F1 (timeouts and resets between the sidecar and the broker). The broker advertises the
proxy's address, so every connection a client makes goes through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket


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
