"""W3C trace context through the sidecar, and OpenTelemetry spans for its own steps.

Propagation needs no SDK and is always on:

* ``Publish``/``PublishBatch`` copy the caller's gRPC ``traceparent``/``tracestate`` metadata into
  the record's headers (unless the request sets those headers itself). They are not part of the
  payload: a retried Publish with a new span id is still the same record.
* A consumed record's headers reach the app unchanged in ``Delivery.headers``, so the app
  continues the trace.

Spans (``tracing.exporter`` other than "none", or any OpenTelemetry SDK tracer provider installed
in the process): ``dedup.publish`` (child of the caller's context; the record carries its
context), and for each consumed record that carries a trace context ``dedup.claim`` (the store
round trip), ``dedup.deliver`` (from the hand-out to the app until the record settles) with
``dedup.ack`` inside it, and ``dedup.commit`` per commit, linked to the traced records it
covers. Sampling follows the parent's decision; a publish without one is sampled at
``tracing.sample_ratio``. Without a provider every call here is a cheap no-op, and records without
a trace context cost one header scan at hand-out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Link, Span, SpanContext
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

TRACE_HEADERS = ("traceparent", "tracestate")
_PROPAGATOR = TraceContextTextMapPropagator()
tracer = trace.get_tracer("dedup-sidecar")


class _HeaderGetter(Getter[Sequence[tuple[str, Any]]]):
    def get(self, carrier: Sequence[tuple[str, Any]], key: str) -> list[str] | None:
        for k, v in carrier:
            if k == key and v is not None:
                return [v.decode("latin-1") if isinstance(v, bytes) else str(v)]
        return None

    def keys(self, carrier: Sequence[tuple[str, Any]]) -> list[str]:
        return [k for k, _ in carrier]


_GETTER = _HeaderGetter()


_active = False
_checked_at = -1e9


def active() -> bool:
    """True when spans are recorded (an SDK tracer provider is installed).

    Asked several times per call on the per-call paths, and OpenTelemetry's answer reads the
    environment each time while no provider is installed: so "no" is remembered for a second
    (``refresh`` forgets it; ``setup`` calls it), and "yes" for good, since a provider is
    installed once per process.
    """
    global _active, _checked_at
    if _active:
        return True
    now = time.monotonic()
    if now - _checked_at < 1.0:
        return False
    _checked_at = now
    provider = trace.get_tracer_provider()
    _active = not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)
    return _active


def refresh() -> None:
    """Ask OpenTelemetry again at the next ``active()`` (a provider may have been installed)."""
    global _checked_at
    _checked_at = -1e9


def context_of(headers: Sequence[tuple[str, Any]]) -> otel_context.Context | None:
    """The trace context in record headers or gRPC metadata, if they carry one."""
    if not any(k == "traceparent" for k, _ in headers):
        return None
    ctx = _PROPAGATOR.extract(headers, getter=_GETTER)
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def trace_headers(metadata: Iterable[tuple[str, Any]] | None) -> tuple[tuple[str, bytes], ...]:
    """The W3C trace headers of a call's metadata, as record headers."""
    out = []
    for k, v in metadata or ():
        if k in TRACE_HEADERS:
            out.append((k, v.encode() if isinstance(v, str) else bytes(v)))
    return tuple(out)


def inject(span: Span) -> list[tuple[str, bytes]]:
    """Record headers that make ``span`` the parent of whatever consumes the record."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return [(k, v.encode()) for k, v in carrier.items()]


def start(name: str, parent: otel_context.Context | None, **attributes: Any) -> Span:
    return tracer.start_span(name, context=parent, attributes=attributes)


def commit_span(links: Sequence[SpanContext], offsets: int) -> None:
    """A finished ``dedup.commit`` span, linked to the traced records the commit covers."""
    span = tracer.start_span(
        "dedup.commit", links=[Link(c) for c in links[:32]], attributes={"dedup.offsets": offsets}
    )
    span.end()


def setup(exporter: str, endpoint: str, sample_ratio: float) -> None:
    """Install a tracer provider that exports spans (``tracing.exporter``)."""
    refresh()  # one installed by the embedding process counts from now, whatever happens here
    if exporter == "none":
        return
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    chosen: SpanExporter
    if exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
                OTLPSpanExporter,
            )
        except ImportError as exc:
            from sidecar.errors import ConfigError

            raise ConfigError(
                "tracing.exporter = 'otlp' needs the OTLP exporter: pip install 'kafka-dedup-sidecar[otlp]'"
            ) from exc
        chosen = OTLPSpanExporter(endpoint=endpoint)
    else:
        chosen = ConsoleSpanExporter()
    provider = TracerProvider(
        resource=Resource.create({"service.name": "dedup-sidecar"}),
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
    )
    provider.add_span_processor(BatchSpanProcessor(chosen))
    trace.set_tracer_provider(provider)
    refresh()
    log.info("tracing: %s exporter, sample ratio %s", exporter, sample_ratio)
