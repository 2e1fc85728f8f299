"""`configbus rollback` on the in-memory bus: an earlier version's content published as
a new version of kind rollback, checked against today's schema, taken over from a
running daemon, and kept in force (held) through reconciles, restarts and `publish
--once` until the stream changes in the tree or `rollback release` publishes the tree's
state. Against real Kafka: tests/integration/test_rollback.py."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import configbus.cli_ops
import configbus.cli_rollback
import configbus.publisher.daemon
from configbus.bus import TopicNames
from configbus.cli import main
from configbus.errors import SchemaError, UnknownNameError
from configbus.events import (
    Cause,
    EventKind,
    VerifiedEvent,
    build_body,
    now_ns,
    open_envelope,
    seal,
)
from configbus.ops import stream_history
from configbus.ops.rollback import release, rollback
from configbus.publisher import Change, Daemon, PublishReport
from configbus.publisher.daemon import publish_once
from configbus.publisher.state import WRITER_KEY, StreamHead, open_signed
from configbus.tree import EnvironmentTree

from .helpers import eventually
from .test_publisher import World as PublisherWorld

SAMPLE_TREE = Path(__file__).resolve().parents[2] / "environments"
AURORA = ("aurora-records", "prod")
HELIX = ("helix-audio", "prod")
AURORA_PROD = "tenants/aurora-records/prod.yml"
HELIX_PROD = "tenants/helix-audio/prod.yml"
MAX_SIZE = "database.postgresql.connection_pool.max_size"


class World(PublisherWorld):
    """The publisher's world, with a trust file and the default state topic (the CLI
    names no other)."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        self.trust_path = tmp_path / "trust.yml"
        self.trust_path.write_text(self.trust.dump(), encoding="utf-8")
        self.topics = TopicNames(prefix="t.", audit="audit", acks="acks")  # state: t._state

    def snapshots(self, stream: tuple[str, str]) -> list[VerifiedEvent]:
        """The stream's verified events on its tenant topic, in offset order."""
        tenant, env = stream
        records = self.bus.records(self.topics.tenant_topic(tenant))
        events = [open_envelope(r.value or b"", self.trust) for r in records]
        return [e for e in events if e.body.env == env]

    def head(self, stream: tuple[str, str]) -> StreamHead:
        """The stream's last head on the state topic."""
        key = self.topics.audit_key(*stream)
        records = [r for r in self.bus.records(self.topics.state) if r.key == key]
        return open_signed(records[-1].value or b"", self.trust, StreamHead)

    def tree_hash(self, stream: tuple[str, str]) -> str:
        """What the tree resolves the stream to now."""
        tenant, env = stream
        return EnvironmentTree(self.root).resolve(env, tenant).hash

    def edit(self, relative: str, old: str, new: str) -> None:
        path = self.root / relative
        text = path.read_text(encoding="utf-8")
        assert text.count(old) == 1, f"{old!r} not once in {relative}"
        path.write_text(text.replace(old, new), encoding="utf-8")

    def cap_max_size(self, maximum: int) -> None:
        """Today's schema: connection_pool.max_size at most `maximum`."""
        path = self.root / "schema.json"
        schema = json.loads(path.read_text(encoding="utf-8"))
        postgresql = schema["properties"]["database"]["properties"]["postgresql"]
        postgresql["properties"]["connection_pool"]["properties"]["max_size"]["maximum"] = maximum
        path.write_text(json.dumps(schema), encoding="utf-8")

    async def publish(self) -> PublishReport:
        return await publish_once(self.settings(), bus=self.bus, deadline=5)

    async def rollback(self, to_version: int, **options: Any) -> Any:
        options = {"reason": "pool too big", "actor": "alice", **options}
        return await rollback(
            self.settings(), *AURORA, to_version=to_version, bus=self.bus, deadline=5, **options
        )

    async def release(self, stream: tuple[str, str] = AURORA) -> Any:
        return await release(
            self.settings(), *stream, reason="done", actor="bob", bus=self.bus, deadline=5
        )


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


async def three_versions(world: World) -> None:
    """aurora-records/prod v1 (max_size 250), v2 (275), v3 (300); the tree at 300."""
    await world.publish()
    world.edit(AURORA_PROD, "max_size: 250", "max_size: 275")
    await world.publish()
    world.edit(AURORA_PROD, "max_size: 275", "max_size: 300")
    await world.publish()
    assert world.versions(AURORA) == [1, 2, 3]


class Rounds:
    """Every publish round of a daemon from now on: its cause's reason and report."""

    def __init__(self, daemon: Daemon) -> None:
        self.done: list[tuple[str, PublishReport]] = []
        inner = daemon.publisher.publish

        async def publish(streams: Any, change: Change, **options: Any) -> PublishReport:
            report = await inner(streams, change, **options)
            self.done.append((change.cause.reason, report))
            return report

        daemon.publisher.publish = publish  # type: ignore[method-assign]

    async def next(self, reason: str) -> PublishReport:
        """The report of the next round of `reason` to finish."""
        seen = len(self.done)
        await eventually(lambda: any(r == reason for r, _ in self.done[seen:]), f"a {reason} round")
        return next(report for r, report in self.done[seen:] if r == reason)


# -- rollback -----------------------------------------------------------------------


async def test_a_rollback_publishes_the_old_content_as_a_new_version_of_kind_rollback(
    world: World,
) -> None:
    await three_versions(world)
    v1 = world.snapshots(AURORA)[0]
    report = await world.rollback(1)
    assert report.summary() == "rolled back aurora-records/prod to v1's content as v4"
    assert (report.version, report.current, report.held) == (4, 3, True)

    event = world.snapshots(AURORA)[-1]
    body = event.body
    assert (body.version, body.kind, body.config_hash) == (
        4,
        EventKind.ROLLBACK,
        v1.body.config_hash,
    )
    assert event.config_json == v1.config_json
    assert (body.cause.actor, body.cause.reason, body.cause.sources) == (
        "alice",
        "pool too big",
        ("rollback to v1",),
    )
    assert body.changed_paths == (MAX_SIZE,)
    # The head holds the stream at what the tree resolves it to now (v3's content).
    head = world.head(AURORA)
    assert (head.version, head.config_hash) == (4, v1.body.config_hash)
    assert head.hold == world.tree_hash(AURORA) == world.snapshots(AURORA)[2].body.config_hash
    assert world.head(HELIX).hold == ""

    history = await stream_history(world.bus, world.topics, *AURORA, world.trust)
    assert [(e.version, e.kind) for e in history.versions] == [
        (1, "snapshot"),
        (2, "snapshot"),
        (3, "snapshot"),
        (4, "rollback"),
    ]
    assert (history.versions[-1].actor, history.versions[-1].reason) == ("alice", "pool too big")


async def test_a_running_daemon_is_fenced_and_does_not_publish_over_the_rollback(
    world: World,
) -> None:
    """The daemon stands by while the rollback writes, claims the role back after it,
    recovers the hold, and its reconciles (every 0.3 s) leave the stream rolled back."""
    await three_versions(world)
    async with world.daemon(reconcile_interval=0.3) as daemon:
        await eventually(daemon.ready.is_set, "the daemon's first round")
        rounds = Rounds(daemon)
        report = await world.rollback(1)
        assert report.version == 4
        await eventually(lambda: daemon.takeovers == 1, "the daemon to see it was fenced")
        await eventually(
            lambda: daemon.active.is_set() and daemon.publisher.states[AURORA].version == 4,
            "the daemon to claim the role back and recover v4",
        )
        assert daemon.publisher.states[AURORA].hold == world.tree_hash(AURORA)
        for _ in range(2):
            reconciled = await rounds.next("reconcile")
            assert AURORA in reconciled.held and AURORA in reconciled.unchanged_streams
            assert reconciled.published == []
    assert world.versions(AURORA) == [1, 2, 3, 4]
    beats = [r for r in world.bus.records(world.topics.state) if r.key == WRITER_KEY]
    assert len(beats) > 2  # the daemon wrote again after the rollback resigned


async def test_the_hold_survives_a_daemon_restart_and_publish_once(world: World) -> None:
    await three_versions(world)
    await world.rollback(1)
    async with world.daemon() as daemon:  # recovers v4 and its hold from the bus
        rounds = Rounds(daemon)
        started = await rounds.next("start")
        assert AURORA in started.held and started.published == []
        assert daemon.publisher.states[AURORA].hold == world.tree_hash(AURORA)
    report = await world.publish()
    assert report.held == [AURORA] and report.published == []
    assert "1 held by a rollback" in report.summary()
    assert world.versions(AURORA) == [1, 2, 3, 4]


async def test_a_tree_change_to_the_stream_ends_the_hold(world: World) -> None:
    await three_versions(world)
    await world.rollback(1)
    async with world.daemon() as daemon:
        await eventually(daemon.ready.is_set, "the daemon's first round")
        world.edit(AURORA_PROD, "max_size: 300", "max_size: 320")
        await eventually(lambda: daemon.publisher.states[AURORA].version == 5, "aurora v5")
        assert daemon.publisher.states[AURORA].hold == ""
    event = world.snapshots(AURORA)[-1]
    assert (event.body.kind, event.body.config_hash) == (
        EventKind.SNAPSHOT,
        world.tree_hash(AURORA),
    )
    assert world.head(AURORA).hold == ""
    assert (await world.publish()).held == []  # and it stays ended


async def test_a_tree_change_back_to_the_rolled_back_content_ends_the_hold_too(
    world: World,
) -> None:
    """The tree now says what v1 said: published all the same (a new head, no hold), so
    that a later return to the held content is published and not taken for the hold."""
    await three_versions(world)
    await world.rollback(1)
    world.edit(AURORA_PROD, "max_size: 300", "max_size: 250")
    report = await world.publish()
    assert report.published == [(*AURORA, 5)] and world.head(AURORA).hold == ""
    world.edit(AURORA_PROD, "max_size: 250", "max_size: 300")
    assert (await world.publish()).published == [(*AURORA, 6)]


async def test_a_tree_change_to_another_stream_keeps_the_hold(world: World) -> None:
    await three_versions(world)
    await world.rollback(1)
    async with world.daemon(reconcile_interval=0.3) as daemon:
        rounds = Rounds(daemon)
        await eventually(daemon.ready.is_set, "the daemon's first round")
        world.edit(HELIX_PROD, "max_size: 60", "max_size: 61")
        await eventually(lambda: daemon.publisher.states[HELIX].version == 2, "helix v2")
        reconciled = await rounds.next("reconcile")  # every stream looked at again
        assert AURORA in reconciled.held
    assert world.versions(AURORA) == [1, 2, 3, 4]
    assert world.head(AURORA).hold == world.tree_hash(AURORA)


async def test_a_rollback_that_fails_todays_schema_is_refused_unless_forced(
    world: World,
) -> None:
    await three_versions(world)
    world.edit(AURORA_PROD, "max_size: 300", "max_size: 240")
    await world.publish()  # v4: 240
    world.cap_max_size(260)  # v2 (275) and v3 (300) no longer pass
    with pytest.raises(SchemaError) as refused:
        await world.rollback(2)
    assert str(refused.value) == (
        "cannot roll back aurora-records/prod to v2: it fails today's schema: "
        f"{MAX_SIZE}: 275 is greater than the maximum of 260; --force rolls back anyway"
    )
    assert world.versions(AURORA) == [1, 2, 3, 4]

    report = await world.rollback(2, force=True)
    assert report.version == 5 and [p.key for p in report.problems] == [MAX_SIZE]
    assert (
        world.snapshots(AURORA)[-1].body.config_hash == world.snapshots(AURORA)[1].body.config_hash
    )
    assert (await world.rollback(1)).version == 6  # v1 (250) passes


async def test_a_rollback_to_the_current_content_publishes_nothing(world: World) -> None:
    await three_versions(world)
    report = await world.rollback(3)
    assert report.version == 0
    assert report.summary() == (
        "aurora-records/prod: v3's content is the current config (v3); nothing published"
    )
    await world.rollback(1)
    assert (await world.rollback(1)).version == 0  # v4 is v1's content
    assert world.versions(AURORA) == [1, 2, 3, 4]


async def test_a_missing_version_names_the_latest(world: World) -> None:
    await three_versions(world)
    with pytest.raises(
        UnknownNameError, match=r"no version 9 in the audit topic \(latest: 1, 2, 3\)"
    ):
        await world.rollback(9)
    with pytest.raises(UnknownNameError, match="unknown tenant 'nobody'"):
        await rollback(
            world.settings(), "nobody", "prod", to_version=1, reason="r", actor="a", bus=world.bus
        )
    assert world.versions(AURORA) == [1, 2, 3]


async def test_an_override_of_the_same_version_number_does_not_stand_in_for_it(
    world: World,
) -> None:
    """Overrides travel on the audit topic too, numbered on their own channel: here
    override v1 and v2 come before snapshot v2."""
    await world.publish()
    for version in (1, 2):
        body = build_body(
            tenant=AURORA[0],
            env=AURORA[1],
            version=version,
            config_json=b'{"entries":[]}',
            kind=EventKind.OVERRIDE,
            detected_at=now_ns(),
            cause=Cause(actor="ops", reason="override"),
            expires_at=now_ns() + 60 * 10**9,
        )
        async with world.bus.producer() as producer:
            await producer.send_and_wait(
                world.topics.audit, seal(body, world.key), key=world.topics.audit_key(*AURORA)
            )
    world.edit(AURORA_PROD, "max_size: 250", "max_size: 275")
    await world.publish()
    world.edit(AURORA_PROD, "max_size: 275", "max_size: 300")
    await world.publish()
    report = await world.rollback(2)
    assert report.version == 4
    assert (
        world.snapshots(AURORA)[-1].body.config_hash == world.snapshots(AURORA)[1].body.config_hash
    )


# -- release ------------------------------------------------------------------------


async def test_release_publishes_the_trees_state_and_ends_the_hold(world: World) -> None:
    await three_versions(world)
    await world.rollback(1)
    released = await world.release()
    assert released.summary() == "released aurora-records/prod: published the tree's state as v5"
    event = world.snapshots(AURORA)[-1]
    assert (event.body.version, event.body.kind) == (5, EventKind.SNAPSHOT)
    assert event.body.config_hash == world.tree_hash(AURORA)
    assert (event.body.cause.actor, event.body.cause.reason) == ("bob", "done")
    assert event.body.cause.sources == ("rollback release",)
    assert world.head(AURORA).hold == ""
    again = await world.release()
    assert again.version == 0 and again.summary() == (
        "aurora-records/prod: no rollback holds it; nothing to release"
    )
    assert world.versions(AURORA) == [1, 2, 3, 4, 5]


# -- the command line ---------------------------------------------------------------

Cli = Callable[..., Awaitable[tuple[int, str, str]]]


@pytest.fixture
def cli(world: World, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    """`configbus ...` (in a thread: it runs its own event loop) on the world's bus:
    (exit code, stdout, stderr). Never a traceback."""
    for name in [n for n in os.environ if n.startswith("CONFIGBUS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("USER", "carol")
    monkeypatch.setattr(configbus.publisher.daemon, "KafkaBus", lambda kafka: world.bus)
    monkeypatch.setattr(configbus.cli_ops, "KafkaBus", lambda kafka: world.bus)
    monkeypatch.setattr(configbus.cli_rollback, "configure", lambda **options: None)
    where = ["--bootstrap-servers", "unused:9092", "--topic-prefix", "t.", "--audit-topic"]
    where += ["audit", "--acks-topic", "acks"]

    async def run(*argv: str, publisher: bool = True) -> tuple[int, str, str]:
        args = [*argv, *where]
        if publisher:
            args += ["--root", str(world.root), "--signing-key", str(world.key_path)]
            args += ["--kid", world.kid]
        capsys.readouterr()
        code = await asyncio.to_thread(main, args)
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        return code, out, err

    return run


async def test_the_rollback_command_publishes_and_says_so(world: World, cli: Cli) -> None:
    await three_versions(world)
    code, out, err = await cli("rollback", *AURORA, "--to-version", "1", "--reason", "too big")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "rolled back aurora-records/prod to v1's content as v4",
        "held: the tree is not published over it until aurora-records/prod changes in the "
        "tree or store, or `configbus rollback release aurora-records prod`",
    ]
    code, out, err = await cli("rollback", *AURORA, "--to-version", "1", "--reason", "again")
    assert (code, err) == (0, "")
    assert (
        out == "aurora-records/prod: v1's content is the current config (v4); nothing published\n"
    )

    code, out, err = await cli(
        "history", *AURORA, "--trust", str(world.trust_path), "--limit", "1", publisher=False
    )
    assert code == 0
    assert "rollback  by carol: too big" in out and "from rollback to v1" in out

    code, out, err = await cli("rollback", "release", *AURORA, "--actor", "dave")
    assert (code, out, err) == (
        0,
        "released aurora-records/prod: published the tree's state as v5\n",
        "",
    )
    code, out, _ = await cli("rollback", "release", *AURORA)
    assert (code, out) == (0, "aurora-records/prod: no rollback holds it; nothing to release\n")
    history = await stream_history(world.bus, world.topics, *AURORA, world.trust)
    assert [(e.kind, e.actor, e.reason) for e in history.versions[3:]] == [
        ("rollback", "carol", "too big"),
        ("snapshot", "dave", "rollback released"),
    ]


async def test_the_rollback_command_refuses_a_config_todays_schema_refuses(
    world: World, cli: Cli
) -> None:
    await three_versions(world)
    world.cap_max_size(260)
    code, out, err = await cli("rollback", *AURORA, "--to-version", "2", "--reason", "r")
    assert (code, out) == (1, "")
    assert err.startswith(
        "configbus: cannot roll back aurora-records/prod to v2: it fails today's schema: "
        f"{MAX_SIZE}: "
    )
    assert err.endswith("; --force rolls back anyway\n") and err.count("\n") == 1
    assert world.versions(AURORA) == [1, 2, 3]

    code, out, err = await cli("rollback", *AURORA, "--to-version", "2", "--reason", "r", "--force")
    assert code == 0 and out.startswith("rolled back aurora-records/prod to v2's content as v4\n")
    assert err.startswith("configbus: published despite today's schema (--force): ")
    assert f"aurora-records/prod v2: {MAX_SIZE}: " in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ("rollback", *AURORA, "--to-version", "9", "--reason", "r"),
            "configbus: aurora-records/prod has no version 9 in the audit topic (latest: 1, 2, 3)",
        ),
        (
            ("rollback", *AURORA, "--reason", "r"),
            "configbus: give --to-version N: the version whose content to publish again",
        ),
        (
            ("rollback", *AURORA, "--to-version", "1"),
            "configbus: give --reason: why roll back (it goes to the audit trail)",
        ),
        (
            ("rollback", "release", *AURORA, "--to-version", "1"),
            "configbus: rollback release takes no --to-version or --force",
        ),
        (
            ("rollback", "aurora-records", "--to-version", "1", "--reason", "r"),
            "configbus: give TENANT ENV, or release TENANT ENV (usage: configbus rollback "
            "TENANT ENV --to-version N --reason TEXT [--actor NAME] [--force] [options])",
        ),
        (
            ("rollback", "aurora-records", "nowhere", "--to-version", "1", "--reason", "r"),
            "configbus: unknown environment 'nowhere' (the tree has: dev, prod, staging)",
        ),
    ],
    ids=["missing-version", "no-version", "no-reason", "release-version", "one-word", "no-env"],
)
async def test_usage_errors_exit_2_in_one_line(
    world: World, cli: Cli, argv: tuple[str, ...], message: str
) -> None:
    await three_versions(world)
    code, out, err = await cli(*argv)
    assert (code, out, err.splitlines()) == (2, "", [message])
    assert world.versions(AURORA) == [1, 2, 3]
