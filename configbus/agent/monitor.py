"""What the host agent tells its probes and Prometheus (docs/operations.md).

- Alive (``/healthz``): the event loop answers and none of the agent's tasks (the
  Kafka reader, the cache writer, the trust file's watcher) has ended.
- Ready (``/readyz``): the socket is served and the Kafka reader is connected. An
  agent that is not ready still serves its services what it has (from memory or its
  disk cache); the probe says whether new versions can reach them.

Metrics, in a registry of the agent's own, read from the agent at each scrape (labels:
``reason`` and ``operation``, fixed sets; no tenant, see configbus/publisher/monitor.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from configbus.health import Check, Verdict
from configbus.health.certs import CertificateExpiry
from configbus.health.families import build_info, certificate_expiry, counter, gauge

if TYPE_CHECKING:
    from configbus.agent.server import Agent

__all__ = ["AgentMonitor"]


class AgentMonitor:
    """The agent's probes and metrics; `registry` is what ``/metrics`` serves."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.started_at = time.monotonic()
        self.registry = CollectorRegistry()
        self.kafka_errors = Counter(
            "configbus_kafka_errors",
            "Kafka operations that failed, by operation",
            ["operation"],
            registry=self.registry,
        )
        for operation in ("connect", "read", "catch_up"):
            self.kafka_errors.labels(operation=operation)
        self.certificates = CertificateExpiry(agent.settings.kafka)
        self.registry.register(_Gauges(self))

    def live(self) -> Verdict:
        agent = self.agent
        tasks = [t for t in agent.tasks() if t is not None]
        ended = sorted(task.get_name() for task in tasks if task.done())
        if not agent.serving:
            tasks_check = Check(True, "not serving (starting or stopping)")
        elif ended:
            tasks_check = Check(False, f"ended: {', '.join(ended)}")
        else:
            tasks_check = Check(True, f"{len(tasks)} running")
        checks = {"loop": Check(True, "answering"), "tasks": tasks_check}
        return Verdict.of("alive", checks, uptime_s=round(time.monotonic() - self.started_at, 1))

    def ready(self) -> Verdict:
        return Verdict.of("ready", self.checks())

    def checks(self) -> dict[str, Check]:
        agent = self.agent
        socket = agent.settings.socket
        state = agent.kafka_state
        return {
            "socket": Check(
                agent.serving, f"{'serving' if agent.serving else 'not serving'} {socket}"
            ),
            "kafka": Check(state == "connected", state),
        }


class _Gauges:
    def __init__(self, monitor: AgentMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterable[Metric]:
        monitor = self.monitor
        agent = monitor.agent
        checks = monitor.checks()
        yield build_info()
        yield gauge(
            "configbus_ready",
            "1 while /readyz answers 200",
            all(check.ok for check in checks.values()),
        )
        up = GaugeMetricFamily(
            "configbus_dependency_up", "1 while the dependency is reachable", labels=["dependency"]
        )
        up.add_metric(["kafka"], float(checks["kafka"].ok))
        yield up
        yield gauge("configbus_agent_services", "Service connections served now", agent.clients)
        yield gauge(
            "configbus_agent_streams",
            "Streams the agent follows or keeps from its cache",
            agent.stream_count,
        )
        yield counter(
            "configbus_agent_records_delivered",
            "Records passed on to services as they arrived from Kafka",
            agent.delivered,
        )
        refused = CounterMetricFamily(
            "configbus_agent_records_refused",
            "Records that did not verify here, by reason (each service refuses them too)",
            labels=["reason"],
        )
        for reason, count in sorted(agent.refused.items()):
            refused.add_metric([reason], count)
        yield refused
        sent, dropped = agent.ack_counts()
        yield counter("configbus_agent_acks_sent", "Acks of services sent on to Kafka", sent)
        yield counter(
            "configbus_agent_acks_dropped",
            "Acks of services dropped (queue full, or Kafka failed)",
            dropped,
        )
        yield certificate_expiry(monitor.certificates)
