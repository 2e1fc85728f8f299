"""A subscriber's OpenTelemetry metrics: the version gauge, read from the running
subscribers when metrics are collected; and the optional Prometheus exporter
(OTEL_METRICS_EXPORTER=prometheus), scraped over HTTP in a process of its own (an
OpenTelemetry meter provider is set once per process)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from opentelemetry.metrics import CallbackOptions
from prometheus_client.parser import text_string_to_metric_families

from configbus import telemetry
from configbus.errors import SettingsError

from .test_subscriber_hardening import ENV, TENANT, Stream

REPO = Path(__file__).resolve().parents[2]


def versions() -> dict[tuple[str, str], list[int]]:
    found: dict[tuple[str, str], list[int]] = {}
    for observation in telemetry._observe_versions(CallbackOptions()):
        attributes = observation.attributes or {}
        stream = (str(attributes["configbus.tenant"]), str(attributes["configbus.env"]))
        found.setdefault(stream, []).append(int(observation.value))
    return found


async def test_the_version_gauge_reads_running_subscribers(tmp_path: Path) -> None:
    stream = Stream(tmp_path)
    await stream.put(stream.event(1, {"size": 1}))
    subscriber = stream.subscriber()
    assert (TENANT, ENV) not in versions()
    await subscriber.start()
    try:
        assert versions()[(TENANT, ENV)] == [1]
        await stream.put(stream.event(2, {"size": 2}))
        await subscriber.wait_for_version(2, timeout=5)
        assert versions()[(TENANT, ENV)] == [2]
    finally:
        await subscriber.stop()
    assert (TENANT, ENV) not in versions()


def test_a_prometheus_port_that_is_no_port_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_PORT", "http")
    with pytest.raises(SettingsError, match="OTEL_EXPORTER_PROMETHEUS_PORT='http'"):
        telemetry._prometheus_reader()


SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, urllib.request
    from pathlib import Path

    from configbus.telemetry import configure_from_env
    sys.path.insert(0, sys.argv[2])
    from tests.unit.test_subscriber_hardening import Stream

    async def main() -> None:
        assert configure_from_env()
        stream = Stream(Path(sys.argv[3]))
        await stream.put(stream.event(1, {"size": 1}))
        subscriber = stream.subscriber()
        await subscriber.start()
        await stream.put(stream.event(2, {"size": 2}))
        await subscriber.wait_for_version(2, timeout=5)
        await stream.put(stream.event(3, {"size": 3}, key=stream.stranger))  # refused
        await asyncio.sleep(0.2)
        url = f"http://127.0.0.1:{sys.argv[1]}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
        await subscriber.stop()
        sys.stdout.write(body.decode())

    asyncio.run(main())
    """
)


def test_the_prometheus_exporter_serves_the_subscribers_metrics(tmp_path: Path) -> None:
    pytest.importorskip("opentelemetry.exporter.prometheus")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "CONFIGBUS_"))}
    env |= {
        "OTEL_METRICS_EXPORTER": "prometheus",
        "OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1",
        "OTEL_EXPORTER_PROMETHEUS_PORT": str(port),
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(port), str(REPO), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    samples = {
        (sample.name, sample.labels.get("reason", "")): sample.value
        for family in text_string_to_metric_families(done.stdout)
        for sample in family.samples
        if sample.labels.get("configbus_tenant", TENANT) == TENANT
    }
    assert samples[("configbus_events_applied_total", "")] == 2
    assert samples[("configbus_config_version", "")] == 2
    assert samples[("configbus_events_rejected_total", "unknown_key")] == 1
    assert samples[("configbus_apply_latency_milliseconds_count", "")] == 1  # not the start's
