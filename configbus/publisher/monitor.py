"""What the publisher daemon tells its probes and Prometheus (docs/operations.md).

`DaemonMonitor` is told what happens as it happens (events committed or refused,
Kafka and Redis failures, publication rounds, task restarts) and reads the rest from
the daemon when asked, so a scrape or a probe always sees the state of the moment.

- Alive (``/healthz``): the event loop answers (the request is served on it) and none
  of the daemon's tasks has ended; a task that fails is restarted by its supervisor
  and counted in ``configbus_task_restarts_total``, it does not make the daemon dead.
  Only a restart can help a dead daemon: a liveness probe goes here.
- Ready (``/readyz``): Kafka reachable (the last Kafka operation succeeded, within
  the silence the writer announces to its rivals: three heartbeats plus the publish
  timeout), Redis reachable when one is configured (the writer's last beat there
  succeeded), the tree loaded (the first publication round is done), and this daemon
  holds the writer role. A standby answers 503 with ``"writer": false``.

Metrics live in a registry of the daemon's own: daemons in one process (tests) do not
mix. Their labels are bounded: ``env`` (a tree has a handful of environments),
``reason`` (a fixed set of codes), ``operation`` and ``task`` (fixed names). Never the
tenant: tenants can be thousands, and each label value is a series in every scrape
for ever; per-tenant detail is in the logs, the traces and the OpenTelemetry
counters (configbus/telemetry.py).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from configbus.errors import BusError, ConfigBusError
from configbus.events import now_ns
from configbus.health import Check, Verdict
from configbus.health.certs import CertificateExpiry
from configbus.health.families import build_info, certificate_expiry, counter, gauge

if TYPE_CHECKING:
    from configbus.publisher.core import Change, PublishReport
    from configbus.publisher.daemon import Daemon

__all__ = ["DaemonMonitor"]

Stream = tuple[str, str]

# Seconds: detection to commit, rounds, reconciles. Milliseconds when all is well; the
# publish timeout (30 s) and beyond while Kafka is away.
BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
KAFKA_OPERATIONS: Final = ("connect", "publish", "heartbeat", "rollout", "follow")
REDIS_OPERATIONS: Final = ("connect", "read", "cache", "report", "heartbeat", "watch")
REFUSALS: Final = (  # the codes of `Publisher._refuse`
    "invalid",
    "too_large",
    "kafka_refused",
    "internal_error",
    "compliance",
    "needs_daemon",
)
# The supervised tasks whose failures are Kafka's or Redis's (the others count as the
# task's own; all count in configbus_task_restarts_total).
_KAFKA_TASKS: Final = {"overrides": "follow", "rollouts": "rollout", "secrets": "follow"}
_REDIS_TASKS: Final = {"watch-store": "watch"}


class _Link:
    """What is known of a connection: when an operation on it last succeeded, and the
    last failure since (cleared by the next success)."""

    __slots__ = ("error", "ok_at")

    def __init__(self) -> None:
        self.ok_at: float | None = None  # time.monotonic()
        self.error = ""

    def ok(self) -> None:
        self.ok_at, self.error = time.monotonic(), ""

    def failed(self, operation: str, exc: BaseException) -> None:
        self.error = f"{operation}: {_gist(exc)}"


class DaemonMonitor:
    """The daemon's probes and metrics; `registry` is what ``/metrics`` serves."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.registry = CollectorRegistry()
        registry = self.registry
        self.published = Counter(
            "configbus_events_published",
            "Config events Kafka committed (snapshots, rollbacks, promoted rollouts)",
            ["env"],
            registry=registry,
        )
        self.failed = Counter(
            "configbus_events_failed",
            "Refusals of streams that cannot be published as they are, by reason; a "
            "stream that stays broken counts again at each round that looks at it",
            ["env", "reason"],
            registry=registry,
        )
        self.latency = Histogram(
            "configbus_detection_to_commit_seconds",
            "From a change being detected (file, store, reconcile) to its event's commit; "
            "a staged rollout's promotion, which waits for its bake, is not counted",
            ["env"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.fanout = Histogram(
            "configbus_fanout_duration_seconds",
            "Publication rounds that committed at least one event: from taking the "
            "changed streams to the last commit",
            buckets=BUCKETS,
            registry=registry,
        )
        self.reconcile = Histogram(
            "configbus_reconcile_duration_seconds",
            "Full reconciles (at start, then every reconcile interval): from marking every "
            "stream to the end of the round that looked at them",
            buckets=BUCKETS,
            registry=registry,
        )
        self.kafka_errors = Counter(
            "configbus_kafka_errors",
            "Kafka operations that failed, by operation",
            ["operation"],
            registry=registry,
        )
        self.redis_errors = Counter(
            "configbus_redis_errors",
            "Redis operations that failed, by operation",
            ["operation"],
            registry=registry,
        )
        self.restarts = Counter(
            "configbus_task_restarts",
            "Failures of the daemon's background tasks, each restarted after a backoff",
            ["task"],
            registry=registry,
        )
        for operation in KAFKA_OPERATIONS:
            self.kafka_errors.labels(operation=operation)
        for operation in REDIS_OPERATIONS if daemon.store is not None else ():
            self.redis_errors.labels(operation=operation)
        registry.register(_Gauges(self))
        self.kafka = _Link()
        self.redis = _Link()
        self.restart_count = 0
        self.standing_by_for = ""  # the other writer this daemon waits for, when it does
        self.last_commit = 0.0  # time.time() of the last commit
        self.certificates = CertificateExpiry(daemon.settings.kafka)
        self._refused: dict[Stream, str] = {}  # streams whose last look refused them
        self._promoting: set[Stream] = set()
        self._reconcile: tuple[Change, float] | None = None  # its change, when it began
        self._envs: set[str] = set()  # envs whose series exist

    # -- what the publisher tells (configbus.publisher.core.PublishObserver) ---------
    def committed(self, events: Sequence[tuple[Stream, int]]) -> None:
        now = now_ns()
        self.last_commit = time.time()
        self.kafka.ok()
        for stream, detected_at in events:
            env = stream[1]
            self._series(env)
            self.published.labels(env=env).inc()
            self._refused.pop(stream, None)
            if stream not in self._promoting:
                self.latency.labels(env=env).observe(max(0, now - detected_at) / 1e9)

    def refused(self, stream: Stream, code: str) -> None:
        self._series(stream[1])
        self.failed.labels(env=stream[1], reason=code).inc()
        self._refused[stream] = code

    def store_failed(self, operation: str, exc: BaseException) -> None:
        self.redis_failed(operation, exc)

    # -- what the daemon tells --------------------------------------------------------
    def kafka_ok(self) -> None:
        self.kafka.ok()

    def kafka_failed(self, operation: str, exc: BaseException) -> None:
        self.kafka_errors.labels(operation=operation).inc()
        self.kafka.failed(operation, exc)

    def redis_ok(self) -> None:
        self.redis.ok()

    def redis_failed(self, operation: str, exc: BaseException) -> None:
        self.redis_errors.labels(operation=operation).inc()
        self.redis.failed(operation, exc)

    def standing_by(self, other: str) -> None:
        """Another writer is alive (its heartbeats were read from Kafka just now)."""
        self.standing_by_for = other
        self.kafka.ok()

    def task_failed(self, task: str, exc: Exception) -> None:
        """A supervised task failed (it restarts after a backoff)."""
        self.restarts.labels(task=task).inc()
        self.restart_count += 1
        if task in _REDIS_TASKS:
            self.redis_failed(_REDIS_TASKS[task], exc)
        elif task in _KAFKA_TASKS and isinstance(exc, BusError):
            self.kafka_failed(_KAFKA_TASKS[task], exc)

    def reconcile_started(self, change: Change) -> None:
        """Every stream was marked with `change` (at start, or by the reconcile loop)."""
        self._reconcile = (change, time.perf_counter())

    @contextlib.contextmanager
    def promoting(self, stream: Stream) -> Iterator[None]:
        """While a rollout's candidate is published: its latency is the bake's."""
        self._promoting.add(stream)
        try:
            yield
        finally:
            self._promoting.discard(stream)

    def round_done(
        self, taken: dict[Stream, Change], report: PublishReport, started: float
    ) -> None:
        """A publication round of the worker ended (`started`: its perf_counter)."""
        now = time.perf_counter()
        if report.published:
            self.fanout.observe(now - started)
        for stream in (*report.unchanged_streams, *report.held):
            self._refused.pop(stream, None)
        if self._reconcile is not None and self._reconcile[0] in taken.values():
            self.reconcile.observe(now - self._reconcile[1])
            self._reconcile = None

    def _series(self, env: str) -> None:
        """The env's counters at 0 from its first event: a rate needs a first sample."""
        if env in self._envs or len(self._envs) >= 64:
            return
        self._envs.add(env)
        self.published.labels(env=env)
        for reason in REFUSALS:
            self.failed.labels(env=env, reason=reason)

    # -- the probes ---------------------------------------------------------------------
    def live(self) -> Verdict:
        daemon = self.daemon
        tasks = [*daemon._tasks, *([daemon._worker] if daemon._worker is not None else [])]
        ended = sorted(task.get_name() for task in tasks if task.done())
        restarts = self.restart_count
        if daemon.stopping:
            tasks_check = Check(True, "stopping")
        elif not tasks:
            tasks_check = Check(True, "starting: connecting to kafka")
        elif ended:
            tasks_check = Check(False, f"ended: {', '.join(ended)}")
        else:
            tasks_check = Check(True, f"{len(tasks)} running, {restarts} restart(s) so far")
        checks = {"loop": Check(True, "answering"), "tasks": tasks_check}
        return Verdict.of("alive", checks, uptime_s=round(daemon.uptime, 1))

    def ready(self) -> Verdict:
        checks = self.checks()
        return Verdict.of("ready", checks, writer=self.daemon.active.is_set())

    def checks(self) -> dict[str, Check]:
        daemon = self.daemon
        checks = {"writer": self._writer(), "kafka": self._kafka()}
        if daemon.store is not None:
            checks["redis"] = self._redis()
        if daemon.ready.is_set():
            checks["tree"] = Check(True, f"loaded: {len(daemon.index.streams)} streams")
        else:
            checks["tree"] = Check(False, "the first publication round is not done yet")
        if daemon.stopping:
            checks["stopping"] = Check(False, "the daemon is stopping")
        return checks

    def _writer(self) -> Check:
        daemon = self.daemon
        if daemon.active.is_set():
            return Check(True, f"this daemon is the writer ({daemon.writer})")
        if daemon.fenced:
            return Check(False, "standby: another publisher took over; waiting until it stops")
        if self.standing_by_for:
            return Check(
                False, f"standby: another publisher is the writer ({self.standing_by_for})"
            )
        return Check(False, "not the writer yet: connecting to kafka")

    def _kafka(self) -> Check:
        link, settings = self.kafka, self.daemon.settings
        if link.error:
            return Check(False, link.error)
        if link.ok_at is None:
            return Check(False, "no kafka operation has succeeded yet")
        silent = time.monotonic() - link.ok_at
        grace = 3 * settings.heartbeat_interval + settings.publish_timeout
        if silent > grace and self.daemon.active.is_set():
            return Check(False, f"no kafka operation succeeded for {silent:.0f}s")
        return Check(True, f"last operation succeeded {silent:.1f}s ago")

    def _redis(self) -> Check:
        link = self.redis
        if link.error:
            return Check(False, link.error)
        if link.ok_at is None:
            return Check(False, "not reached yet (the writer beats there)")
        silent = time.monotonic() - link.ok_at
        settings = self.daemon.settings
        grace = 3 * settings.heartbeat_interval + settings.publish_timeout
        if silent > grace and self.daemon.active.is_set():
            return Check(False, f"no redis operation succeeded for {silent:.0f}s")
        return Check(True, f"last operation succeeded {silent:.1f}s ago")


class _Gauges:
    """What is read from the daemon at each scrape."""

    def __init__(self, monitor: DaemonMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterable[Metric]:
        monitor = self.monitor
        daemon = monitor.daemon
        checks = monitor.checks()
        yield build_info()
        yield gauge(
            "configbus_writer", "1 while this daemon holds the writer role", daemon.active.is_set()
        )
        yield gauge(
            "configbus_ready",
            "1 while /readyz answers 200",
            all(check.ok for check in checks.values()),
        )
        up = GaugeMetricFamily(
            "configbus_dependency_up",
            "1 while the dependency is reachable, as /readyz judges it",
            labels=["dependency"],
        )
        for name in ("kafka", "redis"):
            if name in checks:
                up.add_metric([name], float(checks[name].ok))
        yield up
        yield gauge(
            "configbus_pending_streams",
            "Streams changed and not published yet: waiting for the worker, in its "
            "round, or for Redis",
            len(daemon.pending_streams()),
        )
        known = daemon.index.known
        streams = GaugeMetricFamily(
            "configbus_streams", "Streams in the tree, by environment", labels=["env"]
        )
        for env, count in sorted(Tally(env for _, env in daemon.index.streams).items()):
            streams.add_metric([env], count)
        yield streams
        refused = GaugeMetricFamily(
            "configbus_streams_refused",
            "Streams whose last look refused them (they keep their last version), by reason",
            labels=["env", "reason"],
        )
        tally = Tally((s[1], code) for s, code in monitor._refused.items() if s in known)
        for (env, code), count in sorted(tally.items()):
            refused.add_metric([env, code], count)
        yield refused
        now = now_ns()
        overrides = GaugeMetricFamily(
            "configbus_overrides_active",
            "Emergency override entries in effect, by environment",
            labels=["env"],
        )
        entries: Tally[str] = Tally()
        for (_, env), state in daemon.overrides.states.items():
            entries[env] += len(state.active(now))
        for env, count in sorted(entries.items()):
            overrides.add_metric([env], count)
        yield overrides
        rollouts = GaugeMetricFamily(
            "configbus_rollouts_active", "Staged rollouts running, by environment", labels=["env"]
        )
        running = Tally(
            env for (_, env), r in daemon.rollouts.rollouts.items() if r.tag.state == "running"
        )
        for env, count in sorted(running.items()):
            rollouts.add_metric([env], count)
        yield rollouts
        yield counter(
            "configbus_writer_takeovers",
            "Times another publisher fenced this daemon",
            daemon.takeovers,
        )
        if monitor.last_commit:
            yield gauge(
                "configbus_last_commit_timestamp_seconds",
                "When Kafka last committed an event of this daemon",
                monitor.last_commit,
            )
        yield certificate_expiry(monitor.certificates)


def _gist(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, ConfigBusError) else f"{type(exc).__name__}: {exc}"
    return (text or type(exc).__name__)[:300]
