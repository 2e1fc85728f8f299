"""Fixtures for integration tests: a real Kafka broker and a real Redis server.

By default every pytest session starts its own broker and Redis on free ports,
with their run dirs under pytest's tmp dir, through deploy/local/kafka.sh and
redis.sh, and stops them when the session ends. Set CONFIGBUS_BOOTSTRAP_SERVERS
and/or CONFIGBUS_REDIS_URL to use servers that already run instead; those are
then neither started nor stopped.

`secure_kafka` is a second, secured broker (deploy/local/kafka-secure.sh: SASL_SSL
with SCRAM users, mutual TLS, ACLs enforced), always started by the session that asks
for it, with the settings of each of its principals.
"""

import itertools
import os
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit
from uuid import uuid4

import pytest
import redis
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from configbus.bus import KafkaSettings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "local"
# Upper bound for `start`, which may fetch the Kafka jars first (the scripts have own deadlines).
START_TIMEOUT_S = 300


def _free_ports(count: int) -> list[int]:
    """`count` distinct ports on 127.0.0.1 that were free a moment ago."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))  # port 0: the kernel picks a free one
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _run(script: str, command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DEPLOY / script), command],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        check=False,
    )


@contextmanager
def _started(script: str, env: dict[str, str], what: str) -> Iterator[None]:
    """Run `script start` with `env`, and `script stop` on exit, even after a failed start."""
    try:
        result = _run(script, "start", env)
        if result.returncode != 0:
            # The scripts print the tail of the server log, then a one-line error.
            output = result.stderr.strip()
            reason = output.splitlines()[-1] if output else f"exit status {result.returncode}"
            pytest.exit(
                f"{what} did not start: {reason}\n--- {script} start, stderr ---\n{output}",
                returncode=3,
            )
        yield
    finally:
        _run(script, "stop", env)


@pytest.fixture(scope="session")
def _services_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run dir for this session's broker and Redis (the scripts use ./kafka and ./redis in it)."""
    return tmp_path_factory.mktemp("services")


@pytest.fixture(scope="session")
def kafka_bootstrap(_services_run_dir: Path) -> Iterator[str]:
    """Bootstrap servers ("host:port") of a running Kafka cluster."""
    if servers := os.environ.get("CONFIGBUS_BOOTSTRAP_SERVERS"):
        ready = [sys.executable, str(DEPLOY / "kafka_ready.py"), servers, "--timeout", "10"]
        if subprocess.run(ready, capture_output=True, check=False).returncode != 0:
            pytest.exit(
                f"kafka broker did not answer: CONFIGBUS_BOOTSTRAP_SERVERS={servers}", returncode=3
            )
        yield servers
        return
    port, controller_port = _free_ports(2)
    env = {
        "CONFIGBUS_RUN_DIR": str(_services_run_dir),
        "CONFIGBUS_KAFKA_PORT": str(port),
        "CONFIGBUS_KAFKA_CONTROLLER_PORT": str(controller_port),
    }
    with _started("kafka.sh", env, "kafka broker"):
        yield f"127.0.0.1:{port}"


# The principals of the secured broker besides the admin: SCRAM users, and the CNs of
# client certificates (mutual TLS). A certificate's principal is its CN, so User:NAME.
SECURE_SCRAM_USERS = ("configbus-publisher", "svc-aurora", "svc-helix", "oncall")
SECURE_CLIENT_CERTS = ("svc-aurora-tls",)


@dataclass(frozen=True)
class SecureKafka:
    """The session's secured broker: its listeners, and the ``CONFIGBUS_*`` settings of
    each principal, as deploy/local/kafka-secure.sh wrote them (users/NAME.env for a
    SCRAM user, tls/clients/NAME.env for a client certificate)."""

    run_dir: Path  # $CONFIGBUS_RUN_DIR/kafka-secure
    sasl_bootstrap: str  # SASL_SSL, SCRAM-SHA-512
    tls_bootstrap: str  # SSL, a client certificate required

    def environ(self, principal: str = "admin") -> dict[str, str]:
        """The variables of `principal`: a SCRAM user's, or a client certificate's when
        no user has that name."""
        path = self.run_dir / "users" / f"{principal}.env"
        if not path.exists():
            path = self.run_dir / "tls" / "clients" / f"{principal}.env"
        found = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["export"]:
                name, _, value = words[1].partition("=")
                found[name] = value
        return found

    def kafka(self, principal: str = "admin", **variables: str) -> KafkaSettings:
        """`principal`'s settings, built as every component builds them; `variables`
        replace some (e.g. ``CONFIGBUS_KAFKA_SASL_PASSWORD``)."""
        return KafkaSettings.build(
            client_id=f"cbtest-{principal}", environ={**self.environ(principal), **variables}
        )


@pytest.fixture(scope="session")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureKafka]:
    """A secured broker of this session's own, on free ports, stopped at its end."""
    run_dir = tmp_path_factory.mktemp("secure-services")
    port, ssl_port, controller_port = _free_ports(3)
    env = {
        "CONFIGBUS_RUN_DIR": str(run_dir),
        "CONFIGBUS_KAFKA_PORT": str(port),
        "CONFIGBUS_KAFKA_SSL_PORT": str(ssl_port),
        "CONFIGBUS_KAFKA_CONTROLLER_PORT": str(controller_port),
        "CONFIGBUS_KAFKA_SCRAM_USERS": " ".join(SECURE_SCRAM_USERS),
        "CONFIGBUS_KAFKA_CLIENT_CERTS": " ".join(SECURE_CLIENT_CERTS),
        "CONFIGBUS_KAFKA_START_TIMEOUT": "120",  # TLS, SCRAM: a slower first start
    }
    with _started("kafka-secure.sh", env, "secured kafka broker"):
        yield SecureKafka(
            run_dir=run_dir / "kafka-secure",
            sasl_bootstrap=f"127.0.0.1:{port}",
            tls_bootstrap=f"127.0.0.1:{ssl_port}",
        )


@pytest.fixture(scope="session")
def redis_url(_services_run_dir: Path) -> Iterator[str]:
    """URL ("redis://host:port/db") of a running Redis server."""
    if url := os.environ.get("CONFIGBUS_REDIS_URL"):
        try:
            with redis.Redis.from_url(url, socket_timeout=5) as client:
                client.ping()
        except redis.RedisError as exc:
            pytest.exit(f"redis did not answer: CONFIGBUS_REDIS_URL={url}: {exc}", returncode=3)
        yield url
        return
    (port,) = _free_ports(1)
    env = {"CONFIGBUS_RUN_DIR": str(_services_run_dir), "CONFIGBUS_REDIS_PORT": str(port)}
    with _started("redis.sh", env, "redis server"):
        yield f"redis://127.0.0.1:{port}/0"


_redis_dbs = itertools.cycle(range(1, 16))


@pytest.fixture
def redis_db_url(redis_url: str) -> Iterator[str]:
    """The session's Redis with a db of this test's own (1-15), emptied before and after:
    the daemon and the CLI use the default key prefix."""
    url = urlunsplit(urlsplit(redis_url)._replace(path=f"/{next(_redis_dbs)}"))
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    yield url
    with redis.Redis.from_url(url) as client:
        client.flushdb()


@pytest.fixture
def topic_name(request: pytest.FixtureRequest) -> Callable[[], str]:
    """Factory of topic names unique to this test, e.g. cbtest.test_roundtrip.1f2e3d4c."""
    # Legal topic characters are [a-zA-Z0-9._-]; parametrized ids bring others ("[", " ").
    test = re.sub(r"[^a-zA-Z0-9_-]+", "-", request.node.name)[:40]
    return lambda: f"cbtest.{test}.{uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def _span_exporter() -> InMemorySpanExporter:
    """An in-memory exporter on the process's SDK tracer provider, installed on first
    use. OpenTelemetry accepts one global provider per process, so this is the only
    place that sets it; configbus's tracers are API proxies and follow it even though
    they were created at import."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider())
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider), f"another tracer provider: {provider!r}"
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
def spans(_span_exporter: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    """The finished spans of this test (`spans.get_finished_spans()`); spans of other
    tests still running in this process (none: tests run one at a time) would show too."""
    _span_exporter.clear()
    yield _span_exporter
    _span_exporter.clear()
