"""A sidecar of several worker processes (``server.workers``): the address of another worker,
and one merged stream of every worker's frames that rides out a worker's restart."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import TYPE_CHECKING

import grpc

from dedup_client._proto import dedup_pb2 as pb
from dedup_client._proto import dedup_pb2_grpc as pb_grpc
from dedup_client.messages import Message

if TYPE_CHECKING:  # the async stub type exists in the generated .pyi only
    Stub = pb_grpc.DedupServiceAsyncStub

#: How long a worker may stay unreachable while another worker's stream is open (see merged_frames).
WORKER_RETRY_SECONDS = 60.0


def same(stub: Stub) -> Stub:
    """The stub itself: a worker's batcher is given a function that returns its stub."""
    return stub


def with_port(target: str, port: int) -> str:
    """``target`` with its port replaced: another worker on the host the client dialled."""
    host, sep, _ = target.rpartition(":")
    return f"{host}:{port}" if sep and not host.endswith(":") else f"{target}:{port}"


async def merged_frames(
    stubs: Sequence[Stub],
    frames_of: Callable[[Stub, pb.SubscribeRequest], AsyncGenerator[list[Message], None]],
    request: pb.SubscribeRequest,
    routes: dict[str, int],
) -> AsyncGenerator[list[Message], None]:
    """One Subscribe per worker, their frames in arrival order. Each frame's delivery id prefix
    is routed to its worker (``routes``), so acks go back to the worker that delivered.
    ``frames_of`` opens one worker's stream.

    A worker that becomes unreachable (UNAVAILABLE: it died and its supervisor is starting it
    again, or it is not up yet after a restart of the sidecar) is subscribed to again, with a
    growing pause, while another worker's stream is alive, for up to WORKER_RETRY_SECONDS: the
    other workers' deliveries keep flowing. Ending every stream instead would hand their
    in-flight records back and count an attempt on each, once per reconnect. When no worker's
    stream is open (the sidecar stopped), or on any other error, the merged stream ends with
    that error."""
    frames: asyncio.Queue[list[Message] | BaseException | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    # Per worker, while its stream is open: when it opened, and whether a frame came on it.
    # An open stream proves its worker alive once a frame came or a second passed; a retry
    # of a worker that is going away opens for a moment only, and proves nothing.
    opened: list[float | None] = [None] * len(stubs)
    fed = [False] * len(stubs)

    def alive(w: int) -> bool:
        since = opened[w]
        return since is not None and (fed[w] or loop.time() - since >= 1.0)

    async def other_alive(w: int, down_since: float) -> bool:
        """Whether to open worker w's stream again: once another stream proves alive. False
        when none is open (the sidecar is stopping, or gone), or after WORKER_RETRY_SECONDS.
        A stream still unproven (just opened, as at a sidecar's start) is waited for."""
        while loop.time() - down_since <= WORKER_RETRY_SECONDS:
            others = [o for o in range(len(opened)) if o != w and opened[o] is not None]
            if any(alive(o) for o in others):
                return True
            if not others:
                return False
            await asyncio.sleep(0.05)
        return False

    async def pump(w: int, stub: pb_grpc.DedupServiceAsyncStub) -> None:
        pause, down_since = 0.1, 0.0
        while True:
            call = frames_of(stub, request)
            opened[w], fed[w] = loop.time(), False
            try:
                async for batch in call:
                    pause, down_since, fed[w] = 0.1, 0.0, True
                    if batch:
                        routes[batch[0].delivery_id.partition(".")[0]] = w
                    frames.put_nowait(batch)
                frames.put_nowait(None)
                return
            except grpc.aio.AioRpcError as exc:
                opened[w] = None
                down_since = down_since or loop.time()
                if exc.code() != grpc.StatusCode.UNAVAILABLE or not await other_alive(w, down_since):
                    frames.put_nowait(exc)
                    return
            finally:
                opened[w] = None
                await call.aclose()
            await asyncio.sleep(pause)
            pause = min(2 * pause, 2.0)

    pumps = [asyncio.create_task(pump(w, stub)) for w, stub in enumerate(stubs)]
    open_streams = len(pumps)
    try:
        while open_streams:
            item = await frames.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
