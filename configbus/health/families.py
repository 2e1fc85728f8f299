"""Metric families read at scrape time, shared by the daemon's and the agent's
monitors (configbus/publisher/monitor.py, configbus/agent/monitor.py)."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from configbus import __version__
from configbus.health.certs import CertificateExpiry

__all__ = ["build_info", "certificate_expiry", "counter", "gauge"]


def gauge(name: str, documentation: str, value: float, **labels: str) -> GaugeMetricFamily:
    """A gauge of one sample."""
    family = GaugeMetricFamily(name, documentation, labels=list(labels))
    family.add_metric(list(labels.values()), float(value))
    return family


def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    """A counter of one sample (`name` without ``_total``: it is added)."""
    family = CounterMetricFamily(name, documentation)
    family.add_metric([], value)
    return family


def build_info() -> GaugeMetricFamily:
    return gauge("configbus_build_info", "The configbus version", 1, version=__version__)


def certificate_expiry(certificates: CertificateExpiry) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        "configbus_tls_certificate_expiry_timestamp_seconds",
        "notAfter of the Kafka TLS certificates: the client's (mutual TLS), and the "
        "soonest of the CA bundle",
        labels=["certificate"],
    )
    for name, when in certificates.expiries().items():
        family.add_metric([name], when)
    return family
