"""AdminService: what ``dedup-sidecar status`` and ``dedup-sidecar key`` ask a running sidecar."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import grpc

from sidecar._proto import dedup_pb2 as pb
from sidecar._proto import dedup_pb2_grpc as pb_grpc
from sidecar.api.errors import status_for
from sidecar.api.security import Principal
from sidecar.engine.engine import Engine
from sidecar.engine.identity import store_key
from sidecar.errors import SidecarError
from sidecar.store.base import DedupStore

_STATES = {
    "absent": pb.KEY_STATE_ABSENT,
    "claimed": pb.KEY_STATE_CLAIMED,
    "released": pb.KEY_STATE_RELEASED,
    "done": pb.KEY_STATE_DONE,
}


class StatusSource(Protocol):
    """What the admin service reads from the running sidecar (sidecar.process.app.Sidecar)."""

    owner: str

    @property
    def ready(self) -> bool: ...

    def lag(self) -> dict[tuple[str, int], int]: ...


class AdminServicer(pb_grpc.AdminServiceServicer):
    def __init__(
        self,
        source: StatusSource,
        engine: Engine,
        store: DedupStore,
        group: str,
        store_name: Callable[[], str],
    ) -> None:
        self._source = source
        self._engine = engine
        self._store = store
        self._group = group
        self._store_name = store_name

    def authorize(self, method: str, caller: Principal, request: Any) -> None:
        caller.check_admin()

    async def Status(
        self, request: pb.StatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.StatusResponse:
        engine, lag = self._engine, self._source.lag()
        parts = [
            pb.PartitionStatus(
                topic=tp[0],
                partition=tp[1],
                committed=part.tracker.committed,
                committable=part.tracker.committable(),
                unsettled=part.tracker.unsettled,
                in_flight=states.get("in_flight", 0),
                lag=lag.get(tp, -1),
                paused=part.paused,
                ordering=engine.core.ordering_of(tp[0]).label,
            )
            for tp, part, states in engine.partitions()
            if not part.share
        ]
        streams = [
            pb.StreamStatus(
                id=s.id, topics=sorted(s.topics), in_flight=len(s.in_flight), ordering=s.ordering.label
            )
            for s in engine.streams()
        ]
        share = engine.share_state()
        share_status = None
        if share is not None:
            share_status = pb.ShareStatus(
                joined=share["joined"],
                held=share["held"],
                held_by_state=share["held_by_state"],
                acquired=share["acquired"],
                accepted=share["accepted"],
                released=share["released"],
                rejected=share["rejected"],
                refused=share["refused"],
                lock_ms=int(share["lock_seconds"] * 1000),
                delivery_count_limit=share["delivery_count_limit"],
                delivery_counts=share["delivery_counts"],
            )
        return pb.StatusResponse(
            share=share_status,
            owner=self._source.owner,
            group_id=self._group,
            store=self._store_name(),
            ready=self._source.ready,
            missing_topics=sorted(engine.missing_topics),
            partitions=parts,
            streams=streams,
        )

    async def GetKey(
        self, request: pb.GetKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetKeyResponse:
        if not request.topic or not request.idempotency_key:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give both a topic and an idempotency key")
        try:
            info = await self._store.inspect(
                store_key(self._group, request.topic, request.idempotency_key), request.idempotency_key
            )
        except SidecarError as exc:
            await context.abort(*status_for(exc))
        out = pb.GetKeyResponse(
            state=_STATES[info.state],
            owner=info.owner,
            lease_until_ms=info.lease_until_ms,
            expires_ms=info.expires_ms,
            attempt=info.attempt,
            failures=info.failures,
        )
        if info.published is not None:
            r = info.published
            out.published.CopyFrom(
                pb.PublishResponse(
                    idempotency_key=request.idempotency_key,
                    topic=r.topic,
                    partition=r.partition,
                    offset=r.offset,
                )
            )
        return out
