"""Stand-ins for the sidecar's publish path that skip parts of it, to measure what bounds it.

    python bench/ceiling.py MODE LISTEN BOOTSTRAP

Serves ``DedupService/PublishBatch`` (and gRPC health, for start-up checks) on LISTEN, on the
sidecar's own runtime (``sidecar.process.cli``: grpc.aio on uvloop, the same interpreter tuning), and
answers in the sidecar's wire format (``sidecar.api.frames``). MODE says how much of the work
it does:

* ``grpc``: nothing but the transport; every entry is answered as written at offset 0. This is
  what the gRPC hop costs the client and a Python server, with no Kafka and no store.
* ``produce``: the transport and the sidecar's own producer (``sidecar.kafka.producer``), with
  the idempotency-key header set as the sidecar sets it; no store, no digest, no claims.

* ``echo``: a bare gRPC echo on the same runtime: ``DedupService/Publish`` answers each
  request with its own bytes, and ``DedupService/StreamingPublish`` writes back each message
  it reads. These are the floors of a Python gRPC call and of a stream message that
  bench/scenarios/percall.py measures beside the sidecar's per-call paths (BOOTSTRAP is ignored).

None is a product: each gives up the idempotency the sidecar exists for. The benchmark runs
them with the same client and the same records as the real PublishBatch row, so the three rates
show how much of the gap to the raw producer each layer takes.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from sidecar._proto import dedup_pb2 as pb
from sidecar.api.frames import encode_publish_results
from sidecar.api.server import SERVICE_NAME, passthrough
from sidecar.config import DeliverySettings
from sidecar.errors import SidecarError
from sidecar.kafka.producer import AsyncProducer, Outgoing
from sidecar.process.cli import run_loop, tune_interpreter

HEADER = DeliverySettings().idempotency_header  # the sidecar's default


def _outgoing(e: pb.PublishRequest) -> Outgoing:
    key = e.key if e.HasField("key") else None
    return Outgoing(e.topic, e.value, key, [(HEADER, e.idempotency_key)])


async def echo(request: bytes, context: Any) -> bytes:
    return request


async def echo_stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for message in requests:
        yield message


async def serve(mode: str, listen: str, bootstrap: str) -> None:
    loop = asyncio.get_running_loop()
    producer = AsyncProducer({"bootstrap.servers": bootstrap}, loop) if mode == "produce" else None

    async def publish_batch(request: pb.PublishBatchRequest, context: Any) -> bytes:
        entries = request.entries
        if producer is None:
            return encode_publish_results([(e.idempotency_key, e.topic, 0, 0, False) for e in entries])
        sent = await producer.send([_outgoing(e) for e in entries])
        await sent.done
        out: list[tuple[str, str, int, int, bool] | tuple[int, str]] = []
        for e, r in zip(entries, sent.results, strict=True):
            if isinstance(r, SidecarError) or r is None:
                out.append((grpc.StatusCode.UNAVAILABLE.value[0], str(r)))
            else:
                out.append((e.idempotency_key, r.topic, r.partition, r.offset, False))
        return encode_publish_results(out)

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    if mode == "echo":
        handlers = {
            "Publish": grpc.unary_unary_rpc_method_handler(echo),
            "StreamingPublish": grpc.stream_stream_rpc_method_handler(echo_stream),
        }
    else:
        handlers = {
            "PublishBatch": grpc.unary_unary_rpc_method_handler(
                publish_batch,
                request_deserializer=pb.PublishBatchRequest.FromString,
                response_serializer=passthrough,
            )
        }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    await checker.set("", health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(listen)
    await server.start()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)
    if producer is not None:
        await producer.close()


def main() -> int:
    mode, listen, bootstrap = sys.argv[1:4]
    if mode not in ("grpc", "produce", "echo"):
        print(f"ceiling.py: MODE must be grpc, produce or echo, not {mode!r}", file=sys.stderr)
        return 2
    tune_interpreter()
    run_loop(serve(mode, listen, bootstrap))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
