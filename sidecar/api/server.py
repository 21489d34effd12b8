"""Assemble the gRPC server: DedupService and AdminService behind the Guard (sidecar.api.security),
health checking, and reflection."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sidecar._proto import dedup_pb2
from sidecar.api.admin import AdminServicer
from sidecar.api.errors import status_for
from sidecar.api.security import ANYONE, Guard, Principal
from sidecar.api.servicer import DedupServicer
from sidecar.errors import InvalidArgument, SidecarError

log = logging.getLogger(__name__)

SERVICE_NAME = dedup_pb2.DESCRIPTOR.services_by_name["DedupService"].full_name
ADMIN_SERVICE_NAME = dedup_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

#: authorize(method name, caller, parsed request): raises PermissionDenied for a call the caller may
#: not make. Called only for callers with restricted rights.
Authorize = Callable[[str, Principal, Any], Awaitable[None] | None]


async def _admit(
    guard: Guard,
    authorize: Authorize | None,
    name: str,
    parse: Callable[[bytes], Any],
    raw: bytes,
    context: Any,
) -> Any:
    """The parsed request, once its caller is known and may make it; otherwise the call is aborted
    with UNAUTHENTICATED, PERMISSION_DENIED or INVALID_ARGUMENT (bytes that are not the request)."""
    try:
        principal = guard.principal(context) if guard.required else ANYONE
        try:
            request = parse(raw)
        except DecodeError as exc:
            raise InvalidArgument(f"the request is not a valid {name} message: {exc}") from None
        if authorize is not None and not principal.unrestricted:
            pending = authorize(name, principal, request)
            if pending is not None:
                await pending
    except SidecarError as exc:
        log.debug("%s refused: %s", name, exc)
        await context.abort(*status_for(exc))
    return request


def _guarded(
    method: Any, behaviour: Any, guard: Guard, authorize: Authorize | None, serializer: Any
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler that takes the request as bytes, so malformed protobuf gets INVALID_ARGUMENT
    from us rather than the transport's INTERNAL, and checks the caller before the servicer runs."""
    parse = getattr(dedup_pb2, method.input_type.name).FromString
    name = method.name
    if method.client_streaming:
        # The servicer parses and authorizes each request of the stream itself, with the
        # caller known here once, when the stream opens.
        async def bidi(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[Any]:
            try:
                principal = guard.principal(context) if guard.required else ANYONE
            except SidecarError as exc:
                log.debug("%s refused: %s", name, exc)
                await context.abort(*status_for(exc))
            async for item in behaviour(requests, context, principal):
                yield item

        return grpc.stream_stream_rpc_method_handler(bidi, response_serializer=serializer)
    if method.server_streaming:

        async def stream(raw: bytes, context: Any) -> AsyncIterator[Any]:
            request = await _admit(guard, authorize, name, parse, raw, context)
            async for item in behaviour(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(stream, response_serializer=serializer)

    async def unary(raw: bytes, context: Any) -> Any:
        return await behaviour(await _admit(guard, authorize, name, parse, raw, context), context)

    return grpc.unary_unary_rpc_method_handler(unary, response_serializer=serializer)


_SERIALIZED = frozenset({"PublishBatch"})  # unary methods whose servicer returns serialized bytes


def passthrough(frame: bytes) -> bytes:
    """The response serializer of methods whose servicer returns bytes it serialized itself."""
    return frame


def _handlers(
    service: str, servicer: Any, guard: Guard, authorize: Authorize | None
) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """A service's method handlers, as the generated ``add_..._to_server`` makes them, except that
    requests arrive as bytes (see _guarded) and that Subscribe and PublishBatch return bytes they
    serialized themselves (sidecar.api.frames)."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in dedup_pb2.DESCRIPTOR.services_by_name[service].methods:
        response = getattr(dedup_pb2, method.output_type.name)
        own = method.server_streaming or method.name in _SERIALIZED
        serializer = passthrough if own else response.SerializeToString
        handlers[method.name] = _guarded(method, getattr(servicer, method.name), guard, authorize, serializer)
    return handlers


def _add(
    server: grpc.aio.Server, full_name: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
) -> None:
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(full_name, handlers),))
    server.add_registered_method_handlers(full_name, handlers)


def build_server(
    servicer: DedupServicer,
    health_servicer: health.aio.HealthServicer,
    guard: Guard,
    max_message_bytes: int,
    admin: AdminServicer | None = None,
) -> grpc.aio.Server:
    """The API server: DedupService and AdminService behind ``guard``; health checking and
    reflection open to anyone who can reach the port (probes carry no credential)."""
    # Leave room above publish.max_message_bytes so oversize records get our RESOURCE_EXHAUSTED
    # message (which names the setting) rather than the transport's.
    limit = max(4 * 1024 * 1024, max_message_bytes * 2 + 65536)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ],
    )
    _add(server, SERVICE_NAME, _handlers("DedupService", servicer, guard, servicer.authorize))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME]
    if admin is not None:
        _add(server, ADMIN_SERVICE_NAME, _handlers("AdminService", admin, guard, admin.authorize))
        names.append(ADMIN_SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    return server


def build_health_server(health_servicer: health.aio.HealthServicer) -> grpc.aio.Server:
    """A server of grpc.health.v1 alone, for server.health_listen: nothing else is reachable on it."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 65536)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server
