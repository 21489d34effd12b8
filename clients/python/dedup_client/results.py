"""What the client answers with: ack results and errors, publish results and errors, the
request a publish sends, and the key rule of consume-transform-produce."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import grpc

from dedup_client._proto import dedup_pb2 as pb


class AckResult(IntEnum):
    OK = 1
    STALE = 2
    UNKNOWN = 3
    ALREADY_ACKED = 4


class AckError(Exception):
    """The Ack call failed as a whole (for example the store was unavailable): nothing was acked."""


@dataclass(frozen=True, slots=True)
class PublishResult:
    idempotency_key: str
    topic: str
    partition: int
    offset: int
    duplicate: bool


class PublishError(Exception):
    """One entry of a PublishBatch failed: the status code and the sidecar's message for it."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def derive_key(input_key: str, index: int) -> str:
    """Idempotency key for the ``index``-th output produced while handling input ``input_key``.

    In consume-transform-produce, a redelivered input republishes its outputs with the same keys,
    and the sidecar's idempotent Publish turns those into duplicates that produce nothing.
    """
    return f"{input_key}/{index}"


def publish_request(
    topic: str,
    value: bytes,
    key: bytes | None = None,
    headers: Sequence[tuple[str, bytes]] = (),
    idempotency_key: str = "",
    partition: int | None = None,
) -> pb.PublishRequest:
    req = pb.PublishRequest(
        topic=topic,
        value=value,
        headers=[pb.Header(key=k, value=v) for k, v in headers],
        idempotency_key=idempotency_key,
    )
    if key is not None:
        req.key = key
    if partition is not None:
        req.partition = partition
    return req


STATUS_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}


def no_answer(timeout: float | None) -> PublishError:
    return PublishError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"no answer within {timeout}s; the record may or may not be published: retry with "
        "the same idempotency key",
    )


def publish_result(resp: pb.PublishResponse) -> PublishResult:
    return PublishResult(resp.idempotency_key, resp.topic, resp.partition, resp.offset, resp.duplicate)
