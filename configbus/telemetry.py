"""OpenTelemetry: one trace per change, from detection to every instance that applied it.

The library only uses the OpenTelemetry API: spans and metrics go wherever the
application's providers send them, and nowhere when it has none. `configure_from_env`
sets up the SDK from the standard ``OTEL_*`` variables for processes that have no
telemetry set-up of their own (the daemon, the examples): ``OTEL_TRACES_EXPORTER``
and ``OTEL_METRICS_EXPORTER`` = ``otlp`` (OTLP over HTTP, endpoint from
``OTEL_EXPORTER_OTLP_ENDPOINT``) or ``console``; nothing is exported when unset.
``OTEL_METRICS_EXPORTER`` may also say ``prometheus`` (or ``otlp,prometheus``): the
metrics are then served for Prometheus to scrape on ``OTEL_EXPORTER_PROMETHEUS_HOST``
(localhost) and ``OTEL_EXPORTER_PROMETHEUS_PORT`` (9464), as the specification says,
with the ``prometheus`` extra installed (``pip install 'configbus[prometheus]'``).
``OTEL_TRACES_EXPORTER=none`` installs the SDK's tracer provider without an exporter:
spans get real trace ids, which still propagate and appear in acks, but go nowhere.

A subscriber's metrics: ``configbus.events.applied`` and ``configbus.events.rejected``
(by reason), ``configbus.apply.latency`` (ms, from the publisher's detection to the
apply), and ``configbus.config.version`` (the version each subscriber runs, read when
the metrics are collected: nothing on the apply path). Their attributes are the stream's
tenant and env: a process follows a few streams, so these stay few.

Trace context crosses Kafka in the W3C ``traceparent``/``tracestate`` record headers,
which are not signed: they are observability, never trusted input.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final, Protocol

from opentelemetry import context, metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Observation

from configbus.errors import SettingsError

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import MetricReader

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
    "track_version",
    "version_gauge",
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


class Versioned(Protocol):
    """A subscriber, as the version gauge sees it."""

    tenant: str
    env: str

    @property
    def version(self) -> int: ...


_versioned: Final[weakref.WeakSet[Versioned]] = weakref.WeakSet()


def track_version(subscriber: Versioned, *, running: bool = True) -> None:
    """Report `subscriber`'s version in ``configbus.config.version`` (while `running`;
    a subscriber that is collected as garbage drops out by itself)."""
    if running:
        _versioned.add(subscriber)
    else:
        _versioned.discard(subscriber)


def _observe_versions(options: CallbackOptions) -> Iterable[Observation]:
    for subscriber in list(_versioned):
        attributes = {"configbus.tenant": subscriber.tenant, "configbus.env": subscriber.env}
        yield Observation(subscriber.version, attributes)


version_gauge: Final = meter.create_observable_gauge(
    "configbus.config.version",
    callbacks=[_observe_versions],
    description="The config version a subscriber runs (0 before its first)",
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
        for name in _names(traces):  # "none" alone: real trace ids, no exporter
            span_exporter: SpanExporter
            if name == "console":
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

        readers = [_metric_reader(name) for name in _names(metric_exporter)]
        metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=readers))
    _configured, _exporting = True, exporting
    return exporting


def _names(text: str) -> list[str]:
    """The exporters of a comma-separated ``OTEL_*_EXPORTER`` value, "none" left out."""
    return [name for name in (part.strip() for part in text.split(",")) if name not in ("", "none")]


def _metric_reader(name: str) -> MetricReader:
    """The SDK metric reader of one ``OTEL_METRICS_EXPORTER`` name."""
    from opentelemetry.sdk.metrics.export import MetricExporter, PeriodicExportingMetricReader

    if name == "prometheus":
        return _prometheus_reader()
    exporter: MetricExporter
    if name == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        exporter = ConsoleMetricExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        exporter = OTLPMetricExporter()
    return PeriodicExportingMetricReader(exporter)


def _prometheus_reader() -> MetricReader:
    """OpenTelemetry's Prometheus reader, and prometheus_client's scrape server for it
    (a daemon thread: it only reads what the SDK holds, which is thread-safe) on
    ``OTEL_EXPORTER_PROMETHEUS_HOST``:``OTEL_EXPORTER_PROMETHEUS_PORT``."""
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
    except ImportError:
        raise SettingsError(
            "OTEL_METRICS_EXPORTER=prometheus needs the prometheus extra: "
            "pip install 'configbus[prometheus]'"
        ) from None
    from prometheus_client import start_http_server

    host = os.environ.get("OTEL_EXPORTER_PROMETHEUS_HOST", "").strip() or "localhost"
    raw = os.environ.get("OTEL_EXPORTER_PROMETHEUS_PORT", "").strip() or "9464"
    if not raw.isdigit() or int(raw) > 65535:
        raise SettingsError(f"OTEL_EXPORTER_PROMETHEUS_PORT={raw!r}: not a port")
    reader = PrometheusMetricReader()
    try:
        start_http_server(int(raw), addr=host)
    except OSError as exc:
        raise SettingsError(
            f"OTEL_EXPORTER_PROMETHEUS_HOST/PORT: cannot listen on {host}:{raw}: "
            f"{exc.strerror or exc}"
        ) from None
    return reader
