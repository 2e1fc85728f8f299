"""`configure_from_env` (configbus/telemetry.py): the SDK providers and exporters the
standard ``OTEL_*`` variables ask for, and the refusals of a Prometheus exporter that
cannot run.

An OpenTelemetry provider can be set once per process, so the providers
`configure_from_env` makes are caught here instead of installed (the `installed`
fixture), and shut down after each test; the exporters' `export` is replaced by a
recorder, so that what a provider exports is seen without a network. The Prometheus
scrape server runs for real on a free port, and is closed after the test."""

from __future__ import annotations

import os
import re
import socket
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from opentelemetry import metrics, trace
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.metrics import CallbackOptions
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExportResult,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SpanExportResult
from prometheus_client.parser import text_string_to_metric_families

from configbus import telemetry
from configbus.errors import SettingsError


@dataclass
class Installed:
    """What `configure_from_env` installed, and what its exporters were given."""

    tracers: list[TracerProvider] = field(default_factory=list)
    meters: list[MeterProvider] = field(default_factory=list)
    spans: list[tuple[str, str]] = field(default_factory=list)  # (exporter, span name)
    metrics: list[tuple[str, str]] = field(default_factory=list)  # (exporter, metric name)
    resources: list[dict[str, Any]] = field(default_factory=list)  # of the metrics exported

    @property
    def tracer(self) -> TracerProvider:
        (provider,) = self.tracers
        return provider

    @property
    def meter(self) -> MeterProvider:
        (provider,) = self.meters
        return provider

    def span(self, name: str = "probe") -> list[str]:
        """End a span `name` on the installed tracer provider; the exporters it went to."""
        with self.tracer.get_tracer("test").start_as_current_span(name):
            pass
        assert self.tracer.force_flush(5_000)
        return sorted(exporter for exporter, span in self.spans if span == name)

    def count(self, name: str = "probe.count") -> list[str]:
        """Add 1 to counter `name` of the installed meter provider; the exporters it
        went to (a pull exporter, Prometheus, is scraped instead)."""
        self.meter.get_meter("test").create_counter(name).add(1)
        assert self.meter.force_flush(5_000)
        return sorted({exporter for exporter, metric in self.metrics if metric == name})


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> Iterator[Installed]:
    """A process with no telemetry set up: no OTEL_* variable, `configure_from_env`
    not called yet, its providers caught and shut down afterwards, and every exporter's
    `export` a recorder."""
    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(telemetry, "_configured", False)
    monkeypatch.setattr(telemetry, "_exporting", False)
    found = Installed()
    monkeypatch.setattr(trace, "set_tracer_provider", found.tracers.append)
    monkeypatch.setattr(metrics, "set_meter_provider", found.meters.append)

    def spans_to(cls: type) -> None:
        def export(self: Any, spans: Any) -> SpanExportResult:
            found.spans.extend((type(self).__name__, span.name) for span in spans)
            return SpanExportResult.SUCCESS

        monkeypatch.setattr(cls, "export", export)

    def metrics_to(cls: type) -> None:
        def export(self: Any, data: Any, *args: Any, **kwargs: Any) -> MetricExportResult:
            found.resources.extend(dict(r.resource.attributes) for r in data.resource_metrics)
            found.metrics.extend(
                (type(self).__name__, metric.name)
                for resource in data.resource_metrics
                for scope in resource.scope_metrics
                for metric in scope.metrics
            )
            return MetricExportResult.SUCCESS

        monkeypatch.setattr(cls, "export", export)

    spans_to(ConsoleSpanExporter)
    spans_to(OTLPSpanExporter)
    metrics_to(ConsoleMetricExporter)
    metrics_to(OTLPMetricExporter)
    yield found
    for tracer in found.tracers:
        tracer.shutdown()
    for meter in found.meters:
        meter.shutdown()


@dataclass
class Prometheus:
    """The scrape servers started and the readers made, by `_prometheus_reader`."""

    servers: list[Any] = field(default_factory=list)
    readers: list[Any] = field(default_factory=list)

    @property
    def port(self) -> int:
        (server,) = self.servers
        return int(server.server_port)

    def scrape(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as got:
            body = got.read().decode()
        return {
            sample.name: sample.value
            for family in text_string_to_metric_families(body)
            for sample in family.samples
        }


@pytest.fixture
def prometheus(monkeypatch: pytest.MonkeyPatch, installed: Installed) -> Iterator[Prometheus]:
    """prometheus_client's real scrape server and OpenTelemetry's real reader, each
    recorded so that the test closes them (configbus keeps no handle on the server: it
    lives as long as the process)."""
    import prometheus_client
    from opentelemetry.exporter import prometheus as otel_prometheus

    made = Prometheus()
    start = prometheus_client.start_http_server

    def recorded_start(port: int, addr: str = "0.0.0.0") -> Any:
        server, thread = start(port, addr=addr)
        made.servers.append(server)
        return server, thread

    class RecordedReader(otel_prometheus.PrometheusMetricReader):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            made.readers.append(self)
            self.closed = False

        def shutdown(self, *args: Any, **kwargs: Any) -> None:  # by the test, then its provider
            if not self.closed:
                self.closed = True
                super().shutdown(*args, **kwargs)

    monkeypatch.setattr(prometheus_client, "start_http_server", recorded_start)
    monkeypatch.setattr(otel_prometheus, "PrometheusMetricReader", RecordedReader)
    yield made
    for server in made.servers:
        server.shutdown()
        server.server_close()
    for reader in made.readers:  # out of prometheus_client's registry
        reader.shutdown()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- nothing asked -----------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "", "none", "  NONE "])
def test_no_exporter_asked_installs_nothing(
    installed: Installed, monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is not None:
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", value)
    assert telemetry.configure_from_env() is False
    assert (installed.tracers, installed.meters) == ([], [])


def test_unset_variables_are_read_again_at_the_next_call(
    installed: Installed, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert telemetry.configure_from_env() is False
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    assert telemetry.configure_from_env() is True
    assert len(installed.tracers) == 1


def test_traces_none_gives_real_trace_ids_and_exports_nothing(
    installed: Installed, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert telemetry.configure_from_env() is False
    assert installed.meters == []
    with installed.tracer.get_tracer("test").start_as_current_span("probe") as span:
        assert span.get_span_context().is_valid  # a real trace id, to propagate
    assert installed.span() == []


# -- traces ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "exporter"),
    [
        ("console", "ConsoleSpanExporter"),
        (" Console ", "ConsoleSpanExporter"),
        ("otlp", "OTLPSpanExporter"),
    ],
)
def test_traces_go_to_the_exporter_named(
    installed: Installed, monkeypatch: pytest.MonkeyPatch, value: str, exporter: str
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", value)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "configbus-daemon")
    assert telemetry.configure_from_env() is True
    assert installed.meters == []
    assert installed.span() == [exporter]
    # The resource comes from the OTEL_* variables too.
    assert installed.tracer.resource.attributes["service.name"] == "configbus-daemon"


def test_traces_go_to_each_exporter_of_a_list(
    installed: Installed, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console,otlp")
    assert telemetry.configure_from_env() is True
    assert installed.span() == ["ConsoleSpanExporter", "OTLPSpanExporter"]


def test_configuring_twice_installs_once_and_ignores_later_variables(
    installed: Installed, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    assert telemetry.configure_from_env() is True
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "console")
    assert telemetry.configure_from_env() is True  # what the first call found
    assert (len(installed.tracers), installed.meters) == (1, [])


def test_a_second_call_after_traces_none_says_nothing_is_exported(
    installed: Installed, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert telemetry.configure_from_env() is False
    assert telemetry.configure_from_env() is False
    assert len(installed.tracers) == 1


# -- metrics -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "exporters"),
    [
        ("console", ["ConsoleMetricExporter"]),
        ("otlp", ["OTLPMetricExporter"]),
        ("otlp, console", ["ConsoleMetricExporter", "OTLPMetricExporter"]),
        ("none,CONSOLE,", ["ConsoleMetricExporter"]),
    ],
)
def test_metrics_go_to_each_exporter_named(
    installed: Installed, monkeypatch: pytest.MonkeyPatch, value: str, exporters: list[str]
) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", value)
    assert telemetry.configure_from_env() is True
    assert installed.tracers == []  # traces unset: the API's no-op tracer stays
    assert installed.count() == exporters


def test_traces_and_metrics_share_one_resource(
    installed: Installed, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod")
    assert telemetry.configure_from_env() is True
    assert installed.span() == ["OTLPSpanExporter"]
    assert installed.count() == ["OTLPMetricExporter"]
    assert installed.tracer.resource.attributes["deployment.environment"] == "prod"
    assert installed.resources
    assert all(r == dict(installed.tracer.resource.attributes) for r in installed.resources)


# -- prometheus --------------------------------------------------------------------------


def test_prometheus_serves_the_metrics_on_the_host_and_port_named(
    installed: Installed, prometheus: Prometheus, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus,otlp")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_HOST", "127.0.0.1")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", str(port))

    assert telemetry.configure_from_env() is True

    assert prometheus.port == port
    assert len(prometheus.readers) == 1
    assert installed.count("probe.scraped") == ["OTLPMetricExporter"]
    assert prometheus.scrape()["probe_scraped_total"] == 1


def test_prometheus_listens_on_localhost_9464_by_default(
    installed: Installed, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[tuple[int, str]] = []
    import prometheus_client

    monkeypatch.setattr(
        prometheus_client,
        "start_http_server",
        lambda port, addr: started.append((port, addr)),
    )
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_HOST", "  ")  # blank: the default
    assert telemetry.configure_from_env() is True
    assert started == [(9464, "localhost")]


@pytest.mark.parametrize("port", ["70000", "-1", "94 64", "0x24e8"])
def test_a_prometheus_port_out_of_range_is_refused(
    installed: Installed, monkeypatch: pytest.MonkeyPatch, port: str
) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus")
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", port)
    refusal = f"OTEL_EXPORTER_PROMETHEUS_PORT={port!r}: not a port"
    with pytest.raises(SettingsError, match=f"^{re.escape(refusal)}$"):
        telemetry.configure_from_env()
    assert installed.meters == []
    assert telemetry._configured is False  # nothing half set up


def test_a_prometheus_port_in_use_is_one_clear_error(
    installed: Installed, prometheus: Prometheus, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", "prometheus")
        monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_HOST", "127.0.0.1")
        monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", str(port))
        with pytest.raises(SettingsError) as raised:
            telemetry.configure_from_env()
    assert str(raised.value) == (
        f"OTEL_EXPORTER_PROMETHEUS_HOST/PORT: cannot listen on 127.0.0.1:{port}: "
        "Address already in use"
    )
    assert raised.value.__cause__ is None  # one line, no chained traceback
    assert installed.meters == []


def test_prometheus_without_the_extra_says_what_to_install(
    installed: Installed, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.prometheus", None)
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "console,prometheus")
    with pytest.raises(SettingsError, match=r"pip install 'configbus\[prometheus\]'"):
        telemetry.configure_from_env()
    assert installed.meters == []


# -- trace context in record headers -----------------------------------------------------

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN_ID = 0x00F067AA0BA902B7
TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"  # sampled


def remote_context() -> Any:
    span = trace.NonRecordingSpan(
        trace.SpanContext(TRACE_ID, SPAN_ID, is_remote=True, trace_flags=trace.TraceFlags(1))
    )
    return trace.set_span_in_context(span)


def test_the_trace_context_crosses_record_headers() -> None:
    headers = telemetry.headers_with_context((("configbus-kind", b"event"),), remote_context())
    assert headers[0] == ("configbus-kind", b"event")
    assert dict(headers)["traceparent"] == TRACEPARENT
    assert telemetry.trace_id_of(headers) == f"{TRACE_ID:032x}"

    # Only traceparent/tracestate are read; anything else in the headers is not.
    carried = trace.get_current_span(telemetry.extract((*headers, ("other", b"\xff"))))
    assert carried.get_span_context().trace_id == TRACE_ID
    assert carried.get_span_context().span_id == SPAN_ID


def test_headers_without_a_trace_context_give_an_empty_one() -> None:
    assert telemetry.headers_with_context((), trace.set_span_in_context(trace.INVALID_SPAN)) == ()
    context = telemetry.extract([("configbus-kind", b"event"), ("traceparent", b"\xff\xfe")])
    assert not trace.get_current_span(context).get_span_context().is_valid


@pytest.mark.parametrize(
    "value",
    [
        b"00-4bf92f3577b34da6a3ce929d0e0e4736",  # too few parts
        b"00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",  # 30 digits
        b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01",  # the invalid trace id
        b"00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",  # not hex
    ],
)
def test_a_traceparent_that_is_not_well_formed_has_no_trace_id(value: bytes) -> None:
    assert telemetry.trace_id_of([("traceparent", value)]) == ""


def test_no_traceparent_no_trace_id() -> None:
    assert telemetry.trace_id_of([("tracestate", b"a=b")]) == ""
    assert telemetry.trace_id_of([]) == ""


def test_tracing_is_on_only_with_a_real_tracer_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    for provider, on in [
        (trace.ProxyTracerProvider(), False),
        (trace.NoOpTracerProvider(), False),
        (TracerProvider(), True),
    ]:
        monkeypatch.setattr(trace, "get_tracer_provider", lambda p=provider: p)
        assert telemetry.tracing() is on


class Subscriber:
    def __init__(self, tenant: str, env: str, version: int) -> None:
        self.tenant, self.env, self.version = tenant, env, version


def test_the_version_gauge_observes_tracked_subscribers_until_they_stop() -> None:
    def observed() -> dict[tuple[str, str], list[int]]:
        found: dict[tuple[str, str], list[int]] = {}
        for point in telemetry._observe_versions(CallbackOptions()):
            attributes = point.attributes or {}
            key = (str(attributes["configbus.tenant"]), str(attributes["configbus.env"]))
            found.setdefault(key, []).append(int(point.value))
        return found

    running = Subscriber("t-gauge", "dev", 7)
    telemetry.track_version(running)
    try:
        assert observed()[("t-gauge", "dev")] == [7]
        running.version = 8  # read at collection, not when tracked
        assert observed()[("t-gauge", "dev")] == [8]
    finally:
        telemetry.track_version(running, running=False)
    assert ("t-gauge", "dev") not in observed()
    telemetry.track_version(running, running=False)  # twice: no error
