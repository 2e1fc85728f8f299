"""The daemon's /healthz, /readyz and /metrics over real HTTP (port 0), on the in-memory
bus: metrics in the Prometheus format that move with each publication and refusal,
readiness that follows the writer role and the bus, and `configbus check` against it.
The agent's, the same way. The HTTP server alone: test_health_http.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from configbus.agent import Agent
from configbus.cli import main
from configbus.errors import SettingsError
from configbus.limits import Limits
from configbus.publisher import Daemon

from .helpers import eventually
from .test_agent import agent_settings, behind
from .test_publisher import HELIX, World
from .test_subscriber_hardening import Stream


class _Unreachable(str):
    """Any failure the memory bus reports ("<operation>: bus unreachable")."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and other.endswith("bus unreachable")

    __hash__ = str.__hash__


ANY_UNREACHABLE = _Unreachable()
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def served(world: World, **changes: Any) -> Daemon:
    return world.daemon(http="127.0.0.1:0", **changes)


async def get(daemon: Daemon | Agent, path: str) -> tuple[int, bytes]:
    """GET `path` of the daemon's (or agent's) server: the status and the body."""
    assert daemon.http is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.http.port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


async def probe(daemon: Daemon | Agent, path: str) -> tuple[int, dict[str, Any]]:
    status, body = await get(daemon, path)
    return status, json.loads(body)


async def scrape(daemon: Daemon | Agent) -> Samples:
    """Every sample of /metrics, parsed by prometheus_client: (name, labels) -> value."""
    status, body = await get(daemon, "/metrics")
    assert status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, found), v in samples.items() if n == name and wanted <= set(found))


# -- the daemon ---------------------------------------------------------------------------


async def test_a_ready_writer_answers_200_with_every_check(world: World) -> None:
    async with served(world) as daemon:
        await eventually(daemon.ready.is_set, "the first round")
        status, body = await probe(daemon, "/readyz")
        assert status == 200, body
        assert body["ready"] is True and body["writer"] is True
        assert set(body["checks"]) == {"writer", "kafka", "tree"}  # no Redis configured
        assert all(check["ok"] for check in body["checks"].values())
        status, body = await probe(daemon, "/healthz")
        assert status == 200 and body["alive"] is True
        assert "7 running" in body["checks"]["tasks"]["detail"]
        port = daemon.http.port  # type: ignore[union-attr]
    assert daemon.http is None
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_metrics_move_with_each_publication(world: World) -> None:
    async with served(world) as daemon:
        await eventually(daemon.ready.is_set, "the first round")
        first = await scrape(daemon)
        streams = len(daemon.index.streams)
        assert total(first, "configbus_events_published_total") == streams
        assert total(first, "configbus_streams") == streams
        assert value(first, "configbus_events_published_total", env="prod") >= 1
        assert value(first, "configbus_writer") == 1 and value(first, "configbus_ready") == 1
        assert value(first, "configbus_dependency_up", dependency="kafka") == 1
        assert value(first, "configbus_pending_streams") == 0
        assert value(first, "configbus_reconcile_duration_seconds_count") == 1  # the start
        assert value(first, "configbus_fanout_duration_seconds_count") >= 1
        assert value(first, "configbus_build_info", version="0.1.0") == 1
        assert value(first, "configbus_events_failed_total", env="prod", reason="invalid") == 0
        before = value(first, "configbus_detection_to_commit_seconds_count", env="prod")

        world.edit("tenants/helix-audio/prod.yml", "max_size:", "max_size: 131 #")
        await eventually(lambda: daemon.publisher.states[HELIX].version == 2, "helix v2")
        after = await scrape(daemon)
        assert value(after, "configbus_events_published_total", env="prod") == (
            value(first, "configbus_events_published_total", env="prod") + 1
        )
        assert value(after, "configbus_detection_to_commit_seconds_count", env="prod") == (
            before + 1
        )
        assert value(after, "configbus_detection_to_commit_seconds_sum", env="prod") > 0
        assert value(after, "configbus_last_commit_timestamp_seconds") > 0
        no_tenant = [labels for (_, labels) in after if any(k == "tenant" for k, _ in labels)]
        assert no_tenant == []


async def test_a_refused_stream_shows_by_reason(world: World) -> None:
    daemon = served(world)
    daemon.publisher.limits = Limits(event_bytes=200)
    async with daemon:
        await eventually(daemon.ready.is_set, "the first round")
        samples = await scrape(daemon)
    streams = len(daemon.index.streams)
    assert total(samples, "configbus_events_failed_total", reason="too_large") == streams
    assert total(samples, "configbus_streams_refused", reason="too_large") == streams
    assert total(samples, "configbus_events_published_total") == 0


async def test_readiness_follows_the_bus(world: World) -> None:
    """The bus goes down: the next heartbeat fails and /readyz says so (503, the kafka
    check failing) while /healthz stays 200; back up, ready again."""
    async with served(world) as daemon:
        await eventually(daemon.ready.is_set, "the first round")
        world.bus.down = True
        try:
            _, body = await _eventually_status(daemon, "/readyz", 503)
            assert body["checks"]["kafka"] == {"ok": False, "detail": ANY_UNREACHABLE}
            assert (await probe(daemon, "/healthz"))[0] == 200
            await eventually(daemon.monitor.kafka_errors.labels("heartbeat")._value.get, "a beat")
            samples = await scrape(daemon)
            assert value(samples, "configbus_dependency_up", dependency="kafka") == 0
            assert value(samples, "configbus_kafka_errors_total", operation="heartbeat") >= 1
        finally:
            world.bus.down = False
        await _eventually_status(daemon, "/readyz", 200)


async def test_a_standby_is_alive_and_not_ready_and_says_why(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    async with world.daemon() as first:
        await eventually(first.ready.is_set, "the writer's first round")
        second = served(world)
        starting = asyncio.create_task(second.start())
        try:
            await eventually(lambda: second.http is not None, "the standby's server")
            _, body = await _eventually_status(second, "/readyz", 503, "standby")
            assert body["writer"] is False and body["ready"] is False
            assert first.writer in body["checks"]["writer"]["detail"]
            assert body["checks"]["kafka"]["ok"] is True  # it reads the writer's beats
            assert (await probe(second, "/healthz"))[0] == 200
            url = second.http.url  # type: ignore[union-attr]
            code = await asyncio.to_thread(main, ["check", "--url", url, "--ready"])
            assert code == 1
            assert "not ready: writer: standby" in capsys.readouterr().err
            assert value(await scrape(second), "configbus_writer") == 0
        finally:
            await first.stop()
            await asyncio.wait_for(starting, 5)
    try:
        await eventually(second.ready.is_set, "the second daemon's round")
        await _eventually_status(second, "/readyz", 200)
        code = await asyncio.to_thread(main, ["check", "--url", second.http.url, "--ready"])  # type: ignore[union-attr]
        assert code == 0
    finally:
        await second.stop()


async def test_alive_while_kafka_is_unreachable_at_start(world: World) -> None:
    world.bus.down = True
    daemon = served(world)
    starting = asyncio.create_task(daemon.start())
    try:
        await eventually(lambda: daemon.http is not None, "the server, before kafka")
        status, body = await _eventually_status(daemon, "/readyz", 503, "connect")
        assert body["checks"]["writer"]["detail"] == "not the writer yet: connecting to kafka"
        status, body = await probe(daemon, "/healthz")
        assert status == 200 and "connecting" in body["checks"]["tasks"]["detail"]
    finally:
        world.bus.down = False
        await asyncio.wait_for(starting, 10)
        await daemon.stop()


async def test_a_task_that_ended_fails_liveness(world: World) -> None:
    async with served(world) as daemon:
        await eventually(daemon.ready.is_set, "the first round")
        victim = next(task for task in daemon._tasks if task.get_name() == "reconcile")
        victim.cancel()
        await asyncio.wait({victim})
        status, body = await probe(daemon, "/healthz")
        assert status == 503
        assert body["checks"]["tasks"]["detail"] == f"ended: {victim.get_name()}"


async def _eventually_status(
    target: Daemon | Agent, path: str, status: int, contains: str = ""
) -> tuple[int, dict[str, Any]]:
    answers: list[tuple[int, dict[str, Any]]] = []

    async def ask() -> None:
        answers.append(await probe(target, path))

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        await ask()
        found, body = answers[-1]
        if found == status and contains in json.dumps(body):
            return found, body
        if loop.time() > deadline:
            raise AssertionError(f"{path}: never {status} with {contains!r}; last {answers[-1]}")
        await asyncio.sleep(0.05)


# -- the agent ------------------------------------------------------------------------------


async def test_the_agent_serves_its_probes_and_metrics(tmp_path: Path) -> None:
    stream = Stream(tmp_path)
    await stream.put(stream.event(1, {"size": 1}))
    settings = agent_settings(stream, tmp_path, http="127.0.0.1:0")
    async with Agent(settings, bus=stream.bus) as agent:
        _, body = await _eventually_status(agent, "/readyz", 200)
        assert body["checks"]["kafka"] == {"ok": True, "detail": "connected"}
        assert (await probe(agent, "/healthz"))[0] == 200
        sub = behind(stream, agent)
        await sub.start()
        try:
            await stream.put(stream.event(2, {"size": 2}, key=stream.stranger))  # a forgery
            await eventually(lambda: agent.refused, "the agent to refuse the forgery")
            samples = await scrape(agent)
            assert value(samples, "configbus_agent_services") == 1
            assert value(samples, "configbus_agent_streams") == 1
            assert value(samples, "configbus_agent_records_refused_total", reason="unknown_key")
            assert value(samples, "configbus_agent_records_delivered_total") >= 1
            assert value(samples, "configbus_ready") == 1
        finally:
            await sub.stop()
        stream.bus.down = True
        try:
            _, body = await _eventually_status(agent, "/readyz", 503)
            assert body["checks"]["kafka"]["ok"] is False
            assert (await probe(agent, "/healthz"))[0] == 200
            samples = await scrape(agent)
            assert total(samples, "configbus_kafka_errors_total") >= 1
        finally:
            stream.bus.down = False
        await _eventually_status(agent, "/readyz", 200)


# -- settings -------------------------------------------------------------------------------


def test_the_address_comes_from_the_argument_then_configbus_http(world: World) -> None:
    from configbus.publisher import PublisherSettings

    def built(http: str | None, variable: str | None) -> str | None:
        environ = {
            "CONFIGBUS_SIGNING_KEY": str(world.key_path),
            "CONFIGBUS_BOOTSTRAP_SERVERS": "k:9",
        }
        if variable is not None:
            environ["CONFIGBUS_HTTP"] = variable
        return PublisherSettings.build(http=http, environ=environ).http

    assert built(None, None) is None  # not served unless asked
    assert built(None, ":9464") == ":9464"
    assert built("127.0.0.1:0", ":9464") == "127.0.0.1:0"
    assert built(None, "off") is None
    with pytest.raises(SettingsError, match="CONFIGBUS_HTTP"):
        built(None, "9464")


def test_a_bad_address_stops_the_daemon_and_the_agent_in_one_line(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--signing-key", str(world.key_path), "--kid", world.kid, "--root", str(world.root)]
    base += ["--bootstrap-servers", "unused:9092"]
    assert main(["daemon", *base, "--http", "nowhere"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("configbus: --http (CONFIGBUS_HTTP) 'nowhere'") and err.count("\n") == 1
    trust = tmp_path / "trust.yml"
    trust.write_text(world.trust.dump(), encoding="utf-8")
    socket_path = tmp_path / "a.sock"
    agent = ["agent", "--socket", str(socket_path), "--trust", str(trust), "--http", "h:99999"]
    agent += ["--bootstrap-servers", "unused:9092"]
    assert main(agent) == 2
    assert "'h:99999'" in capsys.readouterr().err
