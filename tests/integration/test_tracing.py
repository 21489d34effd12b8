"""One trace id followed from a Publish call, through Kafka, to the consuming app's delivery and
its Ack, on a real broker (spans read from an in-memory exporter)."""

from __future__ import annotations

import asyncio

import grpc
import services
from dedup_client import DedupClient
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sidecar._proto import dedup_pb2 as pb
from sidecar._proto import dedup_pb2_grpc as pb_grpc
from tests.integration.helpers import Inbox, running_sidecar, settings_dict, unique

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def exporter() -> InMemorySpanExporter:
    """The process's span exporter (a tracer provider can be installed once per process)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    found = getattr(provider, "_test_exporter", None)
    if found is None:
        found = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(found))
        provider._test_exporter = found  # type: ignore[attr-defined]
    return found


async def test_a_trace_goes_from_publish_to_the_apps_ack(kafka: services.KafkaBroker) -> None:
    spans = exporter()
    spans.clear()
    topic = unique("traced")
    kafka.create_topic(topic, 1)
    async with running_sidecar(**settings_dict(kafka, [topic], unique("g"))) as sc:
        target = f"127.0.0.1:{sc.port}"
        async with grpc.aio.insecure_channel(target) as ch:
            stub = pb_grpc.DedupServiceStub(ch)
            req = pb.PublishRequest(topic=topic, value=b"order", idempotency_key="t-1")
            await stub.Publish(req, metadata=(("traceparent", CALLER),))
            # A retry with another span id is the same record (trace headers are not payload).
            again = f"00-{TRACE_ID}-1111111111111111-01"
            assert (await stub.Publish(req, metadata=(("traceparent", again),))).duplicate
        async with DedupClient(target) as c, Inbox(c) as inbox:
            [m] = await inbox.wait(1)
            headers = dict(m.headers)
            # The app gets the trace context to continue: same trace, the sidecar's publish span.
            traceparent = headers["traceparent"].decode()
            assert traceparent.split("-")[1] == TRACE_ID
            await c.ack_many([m.delivery_id])
            await asyncio.sleep(0.5)  # the commit
    by_name: dict[str, list[object]] = {}
    for s in spans.get_finished_spans():
        by_name.setdefault(s.name, []).append(s)
    for name in ("dedup.publish", "dedup.claim", "dedup.deliver", "dedup.ack"):
        assert name in by_name, f"no {name} span: {sorted(by_name)}"
        assert all(f"{s.context.trace_id:032x}" == TRACE_ID for s in by_name[name]), name  # type: ignore[attr-defined]
    [publish, _] = by_name["dedup.publish"]
    [deliver] = by_name["dedup.deliver"]
    [ack] = by_name["dedup.ack"]
    assert f"{publish.context.span_id:016x}" == traceparent.split("-")[2]  # type: ignore[attr-defined]
    assert deliver.parent.span_id == publish.context.span_id  # type: ignore[attr-defined]
    assert ack.parent.span_id == deliver.context.span_id  # type: ignore[attr-defined]
    commits = by_name.get("dedup.commit", [])
    assert any(link.context.trace_id == int(TRACE_ID, 16) for c in commits for link in c.links)  # type: ignore[attr-defined]
