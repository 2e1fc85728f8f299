"""A broker outage delays publication and reload, and loses nothing.

This test runs its own broker (deploy/local/kafka.sh on free ports) so that it can
stop it and start it again on the same data, which the session broker must not do.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Setup, edit, started, wait_until

from configbus.publisher import Daemon
from configbus.subscriber import ConfigSubscriber

pytestmark = pytest.mark.integration

KAFKA_SH = Path(__file__).resolve().parents[2] / "deploy" / "local" / "kafka.sh"
MAX_SIZE = "database.postgresql.connection_pool.max_size"


class Broker:
    """A broker of this test's own, which it may stop and start again."""

    def __init__(self, run_dir: Path, port: int, controller_port: int) -> None:
        self.address = f"127.0.0.1:{port}"
        self.env = {
            **os.environ,
            "CONFIGBUS_RUN_DIR": str(run_dir),
            "CONFIGBUS_KAFKA_PORT": str(port),
            "CONFIGBUS_KAFKA_CONTROLLER_PORT": str(controller_port),
        }
        self.env.pop("CONFIGBUS_BOOTSTRAP_SERVERS", None)

    def run(self, command: str) -> None:
        result = subprocess.run(
            ["bash", str(KAFKA_SH), command],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, f"kafka.sh {command}: {result.stderr[-2000:]}"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    from conftest import _free_ports

    port, controller = _free_ports(2)
    own = Broker(tmp_path / "broker", port, controller)
    own.run("start")
    try:
        yield own
    finally:
        own.run("stop")


async def test_a_broker_outage_delays_publication_and_reload_and_loses_nothing(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    setup = Setup.create(tmp_path, broker.address)
    daemon = Daemon(setup.settings(publish_timeout=5.0))
    caplog.set_level(logging.WARNING, logger="configbus.publisher.daemon")

    def failures() -> list[str]:
        """The daemon's own words that it could not publish (or heartbeat) to Kafka."""
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "configbus.publisher.daemon"
            and r.getMessage().startswith(
                ("publication failed", "kafka still unreachable", "heartbeat failed")
            )
        ]

    async with daemon:
        await started(daemon)
        async with ConfigSubscriber(
            "aurora-records",
            "prod",
            bootstrap_servers=broker.address,
            trust=setup.trust,
            topic_prefix=setup.topics.prefix,
            acks_topic=setup.topics.acks,
        ) as subscriber:
            first = subscriber.version
            assert first >= 1

            await asyncio.to_thread(broker.run, "stop")
            edit(setup.path("tenants/aurora-records/prod.yml"), "max_size: 250", "max_size: 275")
            # The daemon sees the edit, fails to publish it, and keeps running.
            await wait_until(failures, 60, what="a publication failing while down")
            assert daemon._worker is not None
            assert not daemon._worker.done()
            assert not daemon.stopped.is_set()
            assert subscriber.version == first

            await asyncio.to_thread(broker.run, "start")
            # Both reconnect by themselves; the change arrives, verified.
            await subscriber.wait_for_version(first + 1, timeout=90)
            assert subscriber.config.get(MAX_SIZE) == 275
            assert subscriber.config.hash == setup.expected_hash("aurora-records", "prod")

    events = [e for e in await Setup.audit(setup) if e.event.body.tenant == "aurora-records"]
    versions = [e.event.body.version for e in events if e.event.body.env == "prod"]
    # The start's version, then the edit's: none lost, none twice, none out of order.
    assert versions == [first, first + 1], versions
