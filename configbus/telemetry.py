"""OpenTelemetry: one trace per change, from detection to every instance that applied it.

The library only uses the OpenTelemetry API: spans and metrics go wherever the
application's providers send them, and nowhere when it has none. `configure_from_env`
sets up the SDK from the standard ``OTEL_*`` variables for processes that have no
telemetry set-up of their own (the daemon, the examples): ``OTEL_TRACES_EXPORTER``
and ``OTEL_METRICS_EXPORTER`` = ``otlp`` (OTLP over HTTP, endpoint from
``OTEL_EXPORTER_OTLP_ENDPOINT``) or ``console``; nothing is exported when unset.
``OTEL_TRACES_EXPORTER=none`` installs the SDK's tracer provider without an exporter:
spans get real trace ids, which still propagate and appear in acks, but go nowhere.

Trace context crosses Kafka in the W3C ``traceparent``/``tracestate`` record headers,
which are not signed: they are observability, never trusted input.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Final

from opentelemetry import context, metrics, propagate, trace
from opentelemetry.context import Context

__all__ = [
    "applied_counter",
    "configure_from_env",
    "extract",
    "failed_counter",
    "headers_with_context",
    "latency_histogram",
    "meter",
    "published_counter",
    "rejected_counter",
    "trace_id_of",
    "tracer",
    "tracing",
]

tracer: Final = trace.get_tracer("configbus")
meter: Final = metrics.get_meter("configbus")

latency_histogram: Final = meter.create_histogram(
    "configbus.apply.latency",
    unit="ms",
    description="From the change being detected by the publisher to an instance applying it",
)
applied_counter: Final = meter.create_counter(
    "configbus.events.applied", description="Events verified and applied"
)
rejected_counter: Final = meter.create_counter(
    "configbus.events.rejected", description="Events refused, by reason"
)
published_counter: Final = meter.create_counter(
    "configbus.publish.published", description="Events Kafka confirmed, by stream"
)
failed_counter: Final = meter.create_counter(
    "configbus.publish.failed",
    description="Streams that could not be published as they are, by stream and reason",
)

Headers = tuple[tuple[str, bytes], ...]


def headers_with_context(base: Headers = (), ctx: Context | None = None) -> Headers:
    """`base` plus the W3C trace context of `ctx` (default: the current one)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=ctx)
    return base + tuple((key, value.encode()) for key, value in carrier.items())


def extract(headers: Iterable[tuple[str, bytes]]) -> Context:
    """The trace context carried in record headers (an empty one when absent)."""
    carrier = {
        key: value.decode("ascii", "replace")
        for key, value in headers
        if key in ("traceparent", "tracestate")
    }
    return propagate.extract(carrier, context=context.Context())


def tracing() -> bool:
    """Whether spans go anywhere: an SDK tracer provider (or any real one) is installed.
    Without one, starting a span still costs microseconds for nothing, so hot paths
    ask first."""
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def trace_id_of(headers: Iterable[tuple[str, bytes]]) -> str:
    """The trace id (32 hex digits) of a W3C ``traceparent`` header, "" when there is
    none or it is not well formed: the trace an event belongs to, without a span."""
    for key, value in headers:
        if key == "traceparent":
            parts = value.split(b"-")
            if len(parts) == 4 and len(parts[1]) == 32 and parts[1] != b"0" * 32:
                try:
                    int(parts[1], 16)
                except ValueError:
                    return ""
                return parts[1].decode()
            return ""
    return ""


_configured = False
_exporting = False


def configure_from_env() -> bool:
    """Install SDK providers per ``OTEL_TRACES_EXPORTER``/``OTEL_METRICS_EXPORTER``
    (``none`` for traces: a provider without an exporter). Returns whether anything
    is exported. Idempotent."""
    global _configured, _exporting
    if _configured:
        return _exporting
    traces = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    metric_exporter = os.environ.get("OTEL_METRICS_EXPORTER", "").strip().lower()
    exporting = traces not in ("", "none") or metric_exporter not in ("", "none")
    if not exporting and traces != "none":
        return False
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create()
    if traces:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

        provider = TracerProvider(resource=resource)
        if traces != "none":  # "none": real trace ids, no exporter
            span_exporter: SpanExporter
            if traces == "console":
                from opentelemetry.sdk.trace.export import ConsoleSpanExporter

                span_exporter = ConsoleSpanExporter()
            else:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter,
                )

                span_exporter = OTLPSpanExporter()
            provider.add_span_processor(BatchSpanProcessor(span_exporter))
        trace.set_tracer_provider(provider)
    if metric_exporter not in ("", "none"):
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import MetricExporter, PeriodicExportingMetricReader

        exporter: MetricExporter
        if metric_exporter == "console":
            from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

            exporter = ConsoleMetricExporter()
        else:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )

            exporter = OTLPMetricExporter()
        reader = PeriodicExportingMetricReader(exporter)
        metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[reader]))
    _configured, _exporting = True, exporting
    return exporting
