"""The daemon's probes and metrics against the real broker and Redis, as an operator
runs them: `configbus daemon --http` in a process of its own, `configbus check --ready`
until it passes, a file edit, and /metrics scraped until it shows the publication;
then SIGTERM, and the port closes with the process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from helpers import CLI, REPO, Setup, edit, topic_options
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

T = TypeVar("T")
HELIX_PROD = "tenants/helix-audio/prod.yml"


@pytest.fixture
def setup(tmp_path: Path, kafka_bootstrap: str, redis_db_url: str) -> Setup:
    created = Setup.create(tmp_path, kafka_bootstrap)
    created.redis_url = redis_db_url
    return created


@pytest.fixture
def port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def daemon(setup: Setup, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """`configbus daemon --http 127.0.0.1:PORT` on `setup`'s tree, topics and Redis;
    killed at the end if the test did not stop it (its log is printed on failure)."""
    assert setup.redis_url is not None
    command = [
        *CLI,
        "daemon",
        "--root",
        str(setup.root),
        *topic_options(setup),
        "--redis",
        setup.redis_url,
        "--signing-key",
        str(setup.key_path),
        "--kid",
        setup.kid,
        "--heartbeat-interval",
        "1",
        "--http",
        f"127.0.0.1:{port}",
    ]
    log = setup.workdir / "daemon.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        print(log.read_text(encoding="utf-8", errors="replace")[-4000:])


def child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("CONFIGBUS_", "OTEL_"))}


def check(port: int, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "check", "--url", f"http://127.0.0.1:{port}", *options],
        capture_output=True,
        text=True,
        timeout=30,
        env=child_env(),
        cwd=REPO,
        check=False,
    )


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def poll(predicate: Callable[[], T], what: str, timeout: float = 60.0) -> T:
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.1)
    return result


def test_check_passes_once_ready_and_metrics_show_a_file_edit(
    setup: Setup, port: int, daemon: subprocess.Popen[bytes]
) -> None:
    def passing() -> subprocess.CompletedProcess[str] | None:
        done = check(port, "--ready")
        return done if done.returncode == 0 else None

    ready = poll(passing, "configbus check --ready to pass")
    assert ready.stdout.strip() == f"http://127.0.0.1:{port}/readyz: 200 ready"
    assert check(port).returncode == 0  # alive
    streams = len(setup.streams())
    before = scrape(port)
    prod = (("env", "prod"),)
    published = before[("configbus_events_published_total", prod)]
    assert sum(v for (n, _), v in before.items() if n == "configbus_events_published_total") == (
        streams
    )
    assert before[("configbus_dependency_up", (("dependency", "redis"),))] == 1
    assert before[("configbus_dependency_up", (("dependency", "kafka"),))] == 1
    assert before[("configbus_writer", ())] == 1

    edit(setup.path(HELIX_PROD), "max_size:", "max_size: 131 #")

    def moved() -> Samples | None:
        found = scrape(port)
        return found if found[("configbus_events_published_total", prod)] > published else None

    after = poll(moved, "the edit's publication in /metrics")
    assert after[("configbus_events_published_total", prod)] == published + 1
    count = ("configbus_detection_to_commit_seconds_count", prod)
    assert after[count] == before[count] + 1
    latency = after[("configbus_detection_to_commit_seconds_sum", prod)] - before.get(
        ("configbus_detection_to_commit_seconds_sum", prod), 0.0
    )
    assert 0 < latency < 10
    assert after[("configbus_pending_streams", ())] == 0

    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0
    gone = check(port, "--ready", "--timeout", "2")
    assert gone.returncode == 1 and "refused" in gone.stderr.lower()
