"""The host agent as its own process, over a real Unix socket, against the real broker:
a hundred local subscribers behind one agent, the agent restarting under them, a
service starting while the agent is down (from its disk cache, or from Kafka until the
agent is back), and no subscriber ever going back a version.

Events are crafted (`sealed`) and produced straight to the tenant topic, so each test
controls exactly which versions exist; subscribers verify them as they would the
daemon's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from helpers import (
    Setup,
    config_of,
    ensure_topics,
    produce,
    read_acks,
    refused_port,
    sealed,
    subscriber_settings,
    wait_until,
    with_value,
)

from configbus.errors import NoConfigError
from configbus.subscriber import ConfigSubscriber

pytestmark = pytest.mark.integration

TENANT, ENV = "aurora-records", "prod"
FLAG = "feature_flags.agent_probe"


class AgentProcess:
    """`configbus agent` in a process of its own, started and stopped by the test."""

    def __init__(self, setup: Setup, socket: Path, cache: Path) -> None:
        self.setup, self.socket, self.cache = setup, socket, cache
        self.bootstrap = setup.kafka.bootstrap_servers
        self.process: subprocess.Popen[bytes] | None = None
        self.log = setup.workdir / "agent.log"

    async def start(self) -> AgentProcess:
        self._spawn()
        await wait_until(self._accepts, 30.0, what=f"the agent on {self.socket}")
        return self

    def _spawn(self) -> None:
        topics = self.setup.topics
        command = [
            sys.executable,
            "-m",
            "configbus",
            "agent",
            "--socket",
            str(self.socket),
            "--bootstrap-servers",
            self.bootstrap,
            "--trust",
            str(self.setup.trust_path),
            "--cache-dir",
            str(self.cache),
            "--topic-prefix",
            topics.prefix,
            "--acks-topic",
            topics.acks,
        ]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    async def _accepts(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"the agent exited: {self.log.read_text()[-2000:]}")
        try:
            _, writer = await asyncio.open_unix_connection(str(self.socket))
        except OSError:
            return False
        writer.close()
        return True

    def stop(self, sig: int = signal.SIGTERM) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
            raise AssertionError("the agent did not stop within 15 s of SIGTERM") from None


@pytest.fixture
def setup(tmp_path: Path, kafka_bootstrap: str) -> Setup:
    return Setup.create(tmp_path, kafka_bootstrap)


@pytest.fixture
def agent(setup: Setup, tmp_path: Path) -> Iterator[AgentProcess]:
    # A short path: a Unix socket's path holds about 100 bytes.
    folder = Path(f"/tmp/cbagent-{os.getpid()}-{tmp_path.name[-20:]}")
    folder.mkdir(parents=True, exist_ok=True)
    made = AgentProcess(setup, folder / "agent.sock", tmp_path / "agent-cache")
    yield made
    made.stop()
    with contextlib.suppress(OSError):
        (folder / "agent.sock").unlink()
        folder.rmdir()


@pytest.fixture
async def subscribers() -> AsyncIterator[list[ConfigSubscriber]]:
    made: list[ConfigSubscriber] = []
    yield made
    await asyncio.gather(*(sub.stop() for sub in made))


async def publish(setup: Setup, version: int) -> None:
    """Produce v`version` of the stream, with the probe flag set to the version."""
    config = with_value(config_of(setup, TENANT, ENV), FLAG, version)
    await produce(setup, TENANT, ENV, sealed(setup, TENANT, ENV, version, config))


def behind_agent(setup: Setup, agent: AgentProcess, **changes: object) -> ConfigSubscriber:
    settings = subscriber_settings(setup, TENANT, ENV, kafka=None, agent=agent.socket, **changes)
    return ConfigSubscriber(TENANT, ENV, settings=settings)


def never_back(sub: ConfigSubscriber, seen: list[int]) -> None:
    """Record every version `sub` applies, in order."""
    sub.on_change("", lambda old, new, paths: seen.append(int(new.get(FLAG))))


async def test_a_hundred_subscribers_behind_one_agent_verify_apply_and_acknowledge(
    setup: Setup, agent: AgentProcess, subscribers: list[ConfigSubscriber]
) -> None:
    await ensure_topics(setup, TENANT)
    await publish(setup, 1)
    await agent.start()
    subs = [behind_agent(setup, agent) for _ in range(100)]
    subscribers.extend(subs)
    await asyncio.gather(*(sub.start() for sub in subs))
    assert {(sub.version, sub.source, sub.via) for sub in subs} == {(1, "agent", "agent")}
    assert all(sub.settings.kafka is None for sub in subs)  # no Kafka client in the service

    await publish(setup, 2)
    await asyncio.gather(*(sub.wait_for_version(2, timeout=30) for sub in subs))
    assert {sub.config.get(FLAG) for sub in subs} == {2}

    instances = {sub.settings.instance_id for sub in subs}

    async def acknowledged_v2() -> bool:
        acks = await read_acks(setup)
        return {
            a.instance for _, a in acks if a.version == 2 and a.status == "applied"
        } == instances

    await wait_until(acknowledged_v2, 30.0, what="acks of v2 from all 100 through the agent")


async def test_the_agent_restarting_leaves_services_running_and_they_catch_up(
    setup: Setup, agent: AgentProcess, subscribers: list[ConfigSubscriber]
) -> None:
    await ensure_topics(setup, TENANT)
    await publish(setup, 1)
    await publish(setup, 2)
    await agent.start()
    subs = [behind_agent(setup, agent) for _ in range(5)]
    seen: list[list[int]] = [[] for _ in subs]
    for sub, versions in zip(subs, seen, strict=True):
        never_back(sub, versions)
    subscribers.extend(subs)
    await asyncio.gather(*(sub.start() for sub in subs))
    assert {sub.version for sub in subs} == {2}

    agent.stop(signal.SIGKILL)  # no goodbye: the connections just end
    await wait_until(lambda: all(sub.via is None for sub in subs), 10.0, what="noticing")
    assert {(sub.version, sub.config.get(FLAG)) for sub in subs} == {(2, 2)}  # kept

    await publish(setup, 3)  # while the agent is down
    await agent.start()
    await asyncio.gather(*(sub.wait_for_version(3, timeout=30) for sub in subs))
    assert {sub.via for sub in subs} == {"agent"}

    await produce(setup, TENANT, ENV, sealed(setup, TENANT, ENV, 1, config_of(setup, TENANT, ENV)))
    await publish(setup, 4)
    await asyncio.gather(*(sub.wait_for_version(4, timeout=30) for sub in subs))
    for versions in seen:
        assert versions == sorted(versions) and versions[-1] == 4, versions  # never back


async def test_a_service_starting_while_the_agent_is_down_uses_its_cache_then_the_agent(
    setup: Setup, agent: AgentProcess, subscribers: list[ConfigSubscriber], tmp_path: Path
) -> None:
    await ensure_topics(setup, TENANT)
    await publish(setup, 1)
    await agent.start()
    cache = tmp_path / "service-cache"
    first = behind_agent(setup, agent, cache_dir=cache)
    await first.start()
    await first.stop()
    agent.stop()

    sub = behind_agent(setup, agent, cache_dir=cache, offline_grace=0.5)
    subscribers.append(sub)
    await sub.start()
    assert (sub.version, sub.source, sub.via) == (1, "cache", None)

    await publish(setup, 2)
    await agent.start()
    await sub.wait_for_version(2, timeout=30)
    assert (sub.source, sub.via) == ("agent", "agent")


async def test_a_service_starting_while_the_agent_is_down_reads_kafka_until_it_is_back(
    setup: Setup, agent: AgentProcess, subscribers: list[ConfigSubscriber]
) -> None:
    await ensure_topics(setup, TENANT)
    await publish(setup, 1)
    settings = subscriber_settings(setup, TENANT, ENV, agent=agent.socket)  # and Kafka
    sub = ConfigSubscriber(TENANT, ENV, settings=settings)
    subscribers.append(sub)
    await sub.start()
    assert (sub.version, sub.source, sub.via) == (1, "kafka", "kafka")

    await agent.start()
    await wait_until(lambda: sub.via == "agent", 30.0, what="the switch to the agent")
    await publish(setup, 2)
    await sub.wait_for_version(2, timeout=30)
    assert (sub.source, sub.via) == ("agent", "agent")


async def test_without_agent_kafka_or_cache_start_says_the_agent_is_unreachable(
    setup: Setup, agent: AgentProcess
) -> None:
    sub = behind_agent(setup, agent, start_timeout=1.0)
    with pytest.raises(NoConfigError, match=r"agent at .* is unreachable"):
        await sub.start()


async def test_with_kafka_gone_the_agent_serves_its_verified_cache(
    setup: Setup, agent: AgentProcess, subscribers: list[ConfigSubscriber]
) -> None:
    await ensure_topics(setup, TENANT)
    await publish(setup, 1)
    await agent.start()
    first = behind_agent(setup, agent)
    subscribers.append(first)
    await first.start()  # the agent now holds v1, and has written it to its cache
    await wait_until(lambda: any(agent.cache.glob("*.event")), 10.0, what="the agent's cache")
    agent.stop()

    with refused_port() as port:  # nobody listens where the restarted agent looks
        agent.bootstrap = f"127.0.0.1:{port}"
        await agent.start()
        fresh = behind_agent(setup, agent)  # no cache of its own, no Kafka
        subscribers.append(fresh)
        await fresh.start()
        assert (fresh.version, fresh.source, fresh.config.get(FLAG)) == (1, "agent", 1)
