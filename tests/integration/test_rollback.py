"""`configbus rollback` against the real broker, with a daemon running: the rollback
(a real `configbus` process) fences the daemon, which claims the role back afterwards;
the rolled-back content stays through the daemon's reconciles and a restart, and a
tree edit to the stream publishes over it and ends the hold."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest
from helpers import CLI, REPO, PublishSpy, Round, Setup, edit, started, wait_until

from configbus.events import EventKind
from configbus.publisher import Daemon
from configbus.publisher.state import StreamHead, open_signed

pytestmark = pytest.mark.integration

AURORA = ("aurora-records", "prod")
AURORA_PROD = "tenants/aurora-records/prod.yml"


@pytest.fixture
def setup(tmp_path: Path, kafka_bootstrap: str) -> Setup:
    return Setup.create(tmp_path, kafka_bootstrap)


async def run_cli(setup: Setup, *args: str) -> subprocess.CompletedProcess[str]:
    """`configbus ARGS` in a process of its own, on `setup`'s topics and key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIGBUS_")}
    env["CONFIGBUS_STATE_TOPIC"] = setup.topics.state  # no option names it
    where = ["--root", str(setup.root), "--bootstrap-servers", setup.kafka.bootstrap_servers]
    where += ["--signing-key", str(setup.key_path), "--kid", setup.kid]
    where += ["--topic-prefix", setup.topics.prefix, "--audit-topic", setup.topics.audit]
    where += ["--acks-topic", setup.topics.acks]
    return await asyncio.to_thread(
        subprocess.run,
        [*CLI, *args, *where],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
        cwd=REPO,
        check=False,
    )


async def head(setup: Setup) -> StreamHead:
    """aurora-records/prod's last head on the state topic."""
    records = (await setup.records([setup.topics.state]))[setup.topics.state]
    key = setup.topics.audit_key(*AURORA)
    last = [r for r in records if r.key == key][-1]
    return open_signed(last.value or b"", setup.trust, StreamHead)


async def next_round(spy: PublishSpy, reason: str, timeout: float = 30.0) -> Round:
    """The next round of the daemon caused by `reason` to finish."""
    seen = len(spy.rounds)

    def found() -> Round | None:
        return next((r for r in spy.rounds[seen:] if r.change.cause.reason == reason), None)

    return await wait_until(found, timeout, what=f"a {reason} round")


async def test_a_rollback_survives_reconciles_and_a_restart_until_a_tree_edit(
    setup: Setup,
) -> None:
    settings = setup.settings(reconcile_interval=1.0)
    daemon = Daemon(settings)
    spy = PublishSpy(daemon)
    async with daemon:
        await started(daemon)
        edit(setup.path(AURORA_PROD), "max_size: 250", "max_size: 275")
        await wait_until(lambda: daemon.publisher.states[AURORA].version == 2, what="aurora v2")
        held_at = setup.expected_hash(*AURORA)

        result = await run_cli(
            setup, "rollback", *AURORA, "--to-version", "1", "--reason", "pool", "--actor", "eve"
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[0] == (
            "rolled back aurora-records/prod to v1's content as v3"
        )
        await wait_until(lambda: daemon.takeovers == 1, what="the daemon to see it was fenced")
        await wait_until(
            lambda: daemon.active.is_set() and daemon.publisher.states[AURORA].version == 3,
            what="the daemon to claim the role back and recover v3",
        )
        assert daemon.publisher.states[AURORA].hold == held_at
        reconciled = await next_round(spy, "reconcile")
        assert reconciled.report is not None and AURORA in reconciled.report.held
        assert AURORA not in reconciled.published

    restarted = Daemon(settings)
    spy = PublishSpy(restarted)
    async with restarted:
        first = await next_round(spy, "start")
        assert first.report is not None and AURORA in first.report.held
        assert AURORA not in first.published
        assert restarted.publisher.states[AURORA].hold == held_at

        edit(setup.path(AURORA_PROD), "max_size: 275", "max_size: 290")
        await wait_until(lambda: restarted.publisher.states[AURORA].version == 4, what="v4")
        assert restarted.publisher.states[AURORA].hold == ""

    audit = [v for v in await setup.audit() if v.stream == AURORA]
    kinds = [(v.version, v.event.body.kind) for v in audit]
    assert kinds == [
        (1, EventKind.SNAPSHOT),
        (2, EventKind.SNAPSHOT),
        (3, EventKind.ROLLBACK),
        (4, EventKind.SNAPSHOT),
    ]
    rollback = audit[2].event.body
    assert rollback.config_hash == audit[0].event.body.config_hash
    assert (rollback.cause.actor, rollback.cause.reason) == ("eve", "pool")
    assert rollback.cause.sources == ("rollback to v1",)
    assert audit[3].event.body.config_hash == setup.expected_hash(*AURORA)
    last = await head(setup)
    assert (last.version, last.hold) == (4, "")
