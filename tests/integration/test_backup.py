"""The disaster-recovery drill against real Kafka: a cluster lost and rebuilt at the same
address, then restored from a backup, while a subscriber keeps running.

The drill runs a broker of its own (deploy/local/kafka.sh on free ports, with a data dir
of its own) so that it can wipe it: `kafka.sh stop --wipe` deletes the whole data dir,
and the next `start` formats a new cluster (a new cluster id) at the same address. The
publisher daemon publishes two versions, `configbus backup` takes a backup, the cluster
is lost, `configbus restore --trust` loads the backup, and then: every record is back
byte for byte, the audit trail verifies, history lists the old versions, a new daemon
publishes the next version above them, and the subscriber, which ran on its last good
config all along, applies it, never a lower one. On the in-memory bus, the format and
the refusals: tests/unit/test_backup.py.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Setup, call_main, edit, started, subscriber_settings, topic_options, wait_until

from configbus.bus import Admin, KafkaBus, read_to_end
from configbus.ops import stream_history
from configbus.ops.audit import verify_trail
from configbus.ops.backup import Entry, read_backup
from configbus.publisher import Daemon
from configbus.subscriber import ConfigSubscriber
from configbus.tree import ResolvedConfig

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

KAFKA_SH = Path(__file__).resolve().parents[2] / "deploy" / "local" / "kafka.sh"
AURORA = ("aurora-records", "prod")
AURORA_PROD = "tenants/aurora-records/prod.yml"
MAX_SIZE = "database.postgresql.connection_pool.max_size"


class Broker:
    """A single-node cluster of the drill's own, which it may wipe."""

    def __init__(self, run_dir: Path, port: int, controller_port: int) -> None:
        self.address = f"127.0.0.1:{port}"
        self.data_dir = run_dir / "kafka" / "data"  # kafka.sh's $CONFIGBUS_RUN_DIR/kafka/data
        self.env = {
            **os.environ,
            "CONFIGBUS_RUN_DIR": str(run_dir),
            "CONFIGBUS_KAFKA_PORT": str(port),
            "CONFIGBUS_KAFKA_CONTROLLER_PORT": str(controller_port),
        }
        self.env.pop("CONFIGBUS_BOOTSTRAP_SERVERS", None)  # never reuse another cluster

    def run(self, *command: str) -> None:
        result = subprocess.run(
            ["bash", str(KAFKA_SH), *command],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, f"kafka.sh {' '.join(command)}: {result.stderr[-2000:]}"

    def cluster_id(self) -> str:
        for line in (self.data_dir / "meta.properties").read_text().splitlines():
            if line.startswith("cluster.id="):
                return line.partition("=")[2]
        raise AssertionError("no cluster.id in meta.properties")


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


async def test_disaster_recovery_drill(
    broker: Broker,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    began = time.monotonic()
    phases: dict[str, float] = {}

    def phase(name: str) -> None:
        phases[name] = round(time.monotonic() - began, 1)

    setup = Setup.create(tmp_path, broker.address)
    monkeypatch.setenv("CONFIGBUS_STATE_TOPIC", setup.topics.state)  # for the CLI
    kafka = topic_options(setup)
    trust = ["--trust", str(setup.trust_path)]
    backup_file = tmp_path / "configbus.backup"
    applied: list[int] = []  # every snapshot version the subscriber applied, in order

    subscriber = ConfigSubscriber(*AURORA, settings=subscriber_settings(setup, *AURORA))

    def on_change(old: ResolvedConfig, new: ResolvedConfig, paths: list[str]) -> None:
        applied.append(subscriber.version)

    subscriber.on_change("", on_change)
    try:
        # 1. A daemon publishes; a subscriber starts; a change goes out as the next version.
        async with Daemon(setup.settings()) as daemon:
            await started(daemon)
            await subscriber.start()
            assert subscriber.version == 1
            edit(setup.path(AURORA_PROD), "max_size: 250", "max_size: 275")
            await subscriber.wait_for_version(2, timeout=30)
            assert subscriber.config.get(MAX_SIZE) == 275
            phase("published v1, v2")

            # 2. The backup, taken while the daemon runs, verified as it is taken.
            code, out, err = await call_main(
                capsys, "backup", "--output", backup_file, *kafka, *trust
            )
            assert code == 0, err
            assert f"to {backup_file}" in out and "signed record(s) verified" in out, out
            assert "left out: writer_beat (1)" in out  # who was alive: not restored
            entries = [e for e in read_backup(backup_file) if isinstance(e, Entry)]
            phase("backup")
        # The publishers are stopped before a restore (docs/backup.md); here, before the
        # cluster is lost.

        # 3. The cluster is lost: the broker stops and its whole data dir goes; a new
        # cluster (a new id) starts at the same address.
        old_cluster = broker.cluster_id()
        await asyncio.to_thread(broker.run, "stop", "--wipe")
        assert not broker.data_dir.exists()
        assert subscriber.version == 2 and subscriber.config.get(MAX_SIZE) == 275
        await asyncio.to_thread(broker.run, "start")
        assert broker.cluster_id() != old_cluster
        async with Admin(setup.kafka) as admin:
            assert not {setup.topics.state, setup.topics.audit} & await admin.topics()
        # The subscriber runs on its last good config all the while.
        assert subscriber.version == 2 and subscriber.config.get(MAX_SIZE) == 275
        phase("wiped and rebuilt")

        # 4. The restore, every signature verified before anything is written.
        code, out, err = await call_main(capsys, "restore", backup_file, *kafka, *trust)
        assert code == 0, err
        assert "verified with" in out and f"restored {len(entries)} record(s)" in out, out
        phase("restored")

        # Every record is back byte for byte: key, value, headers, timestamp; in order.
        wanted = sorted({e.topic for e in entries})
        restored = [r async for r in read_to_end(setup.kafka, wanted)]
        for topic in wanted:
            got = sorted((r for r in restored if r.topic == topic), key=lambda r: r.offset)
            assert [(r.key, r.value, r.headers, r.timestamp_ms) for r in got] == [
                (e.key, e.value, tuple(e.headers), e.timestamp) for e in entries if e.topic == topic
            ], topic
        # The audit trail verifies: every chain link holds, every chain head agrees.
        bus = KafkaBus(setup.kafka)
        report = await verify_trail(bus, setup.topics, setup.trust)
        assert report.ok, report.findings
        code, out, err = await call_main(capsys, "audit", "verify", *kafka, *trust)
        assert code == 0 and out.startswith("ok: "), (out, err)
        history = await stream_history(bus, setup.topics, *AURORA, setup.trust)
        assert [e.version for e in history.snapshots] == [1, 2]
        code, out, err = await call_main(capsys, "history", *AURORA, *kafka, *trust)
        assert code == 0, err
        assert "v1 " in out and "v2 " in out, out

        # 5. A new daemon recovers the versions from what was restored, and the next
        # change goes out above them; the subscriber, back on the rebuilt cluster,
        # applies it.
        async with Daemon(setup.settings()) as daemon:
            await started(daemon)
            assert daemon.publisher.states[AURORA].version == 2
            edit(setup.path(AURORA_PROD), "max_size: 275", "max_size: 300")
            await subscriber.wait_for_version(3, timeout=60)
            assert subscriber.config.get(MAX_SIZE) == 300
            await wait_until(
                lambda: daemon.publisher.states[AURORA].version == 3, 10, what="v3 recorded"
            )
        phase("v3 after the restore")
    finally:
        await subscriber.stop()
    assert applied == sorted(applied) and applied[-3:] == [1, 2, 3], applied

    bus = KafkaBus(setup.kafka)
    history = await stream_history(bus, setup.topics, *AURORA, setup.trust)
    assert [e.version for e in history.snapshots] == [1, 2, 3]
    assert (await verify_trail(bus, setup.topics, setup.trust)).ok

    # 6. The backup is now older than the cluster: restoring it again is refused.
    code, out, err = await call_main(capsys, "restore", backup_file, *kafka)
    assert code == 1
    assert "refused: topics hold records that are not this backup's" in err, err
    phase("done")
    print(f"drill phases (s since start): {phases}")
