"""Assemble the gRPC server: DedupService, health checking, reflection, and token auth."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sidecar._proto import dedup_pb2
from sidecar._proto import dedup_pb2_grpc as pb_grpc
from sidecar.api.servicer import DedupServicer

SERVICE_NAME = dedup_pb2.DESCRIPTOR.services_by_name["DedupService"].full_name
ADMIN_SERVICE_NAME = dedup_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
_OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Require ``authorization: Bearer <token>``; health and reflection stay open for probes."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        async def deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong 'authorization: Bearer <token>' metadata (server.auth_token)",
            )

        self._deny_unary: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream: grpc.RpcMethodHandler[Any, Any] = grpc.unary_stream_rpc_method_handler(deny)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = details.method or ""
        if method.startswith(_OPEN_METHODS):
            return await continuation(details)
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else value
                if hmac.compare_digest(got, self._expected):
                    return await continuation(details)
        return self._deny_stream if method.endswith("/Subscribe") else self._deny_unary


_SERIALIZED = frozenset({"PublishBatch"})  # unary methods whose servicer returns serialized bytes


def passthrough(frame: bytes) -> bytes:
    """The response serializer of methods whose servicer returns bytes it serialized itself."""
    return frame


def _handlers(servicer: DedupServicer) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """DedupService's method handlers, as the generated ``add_..._to_server`` makes them, except
    that Subscribe and PublishBatch return bytes they serialized themselves (sidecar.api.frames)."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in dedup_pb2.DESCRIPTOR.services_by_name["DedupService"].methods:
        request = getattr(dedup_pb2, method.input_type.name)
        response = getattr(dedup_pb2, method.output_type.name)
        behaviour = getattr(servicer, method.name)
        if method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                behaviour, request_deserializer=request.FromString, response_serializer=passthrough
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                behaviour,
                request_deserializer=request.FromString,
                response_serializer=passthrough if method.name in _SERIALIZED else response.SerializeToString,
            )
    return handlers


def build_server(
    servicer: DedupServicer,
    health_servicer: health.aio.HealthServicer,
    auth_token: str | None,
    max_message_bytes: int,
    admin: pb_grpc.AdminServiceServicer | None = None,
) -> grpc.aio.Server:
    interceptors = [TokenAuthInterceptor(auth_token)] if auth_token else []
    # Leave room above publish.max_message_bytes so oversize records get our RESOURCE_EXHAUSTED
    # message (which names the setting) rather than the transport's.
    limit = max(4 * 1024 * 1024, max_message_bytes * 2 + 65536)
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ],
    )
    handlers = _handlers(servicer)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [
        SERVICE_NAME,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    ]
    if admin is not None:  # behind the same token as DedupService
        pb_grpc.add_AdminServiceServicer_to_server(admin, server)
        names.append(ADMIN_SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    return server
