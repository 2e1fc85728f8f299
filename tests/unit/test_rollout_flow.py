"""Staged rollouts end to end on the in-memory bus: a daemon that stages a tree change as
a candidate, subscribers with labels and heartbeats that apply it when selected, and the
gates that promote it step by step or abort it (a refusal, a crash after applying, a
failing health check, an operator). Against real Kafka, with each subscriber its own
process: tests/integration/test_rollouts.py."""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from configbus.bus import CANDIDATE_CHANNEL, SNAPSHOT_CHANNEL
from configbus.crypto import SigningKey, generate_keypair
from configbus.crypto.trust import OPERATOR, TrustedKey
from configbus.events import (
    Ack,
    Cause,
    EventKind,
    RolloutTag,
    VerifiedEvent,
    build_body,
    now_ns,
    open_envelope,
    rank,
    seal,
)
from configbus.ops.overrides import OverrideEntry, write_overrides
from configbus.ops.rollback import rollback
from configbus.ops.rollouts import Command, Plan, read_staged, send_command
from configbus.publisher import Daemon
from configbus.publisher.core import now_change
from configbus.publisher.daemon import publish_once
from configbus.subscriber import ConfigSubscriber

from .helpers import eventually
from .test_publisher import World

AURORA = ("aurora-records", "prod")
TENANT_FILE = "tenants/aurora-records/tenant.yml"
PROD_LAYER = "tenants/aurora-records/prod.yml"
POOL = "database.postgresql.connection_pool.max_size"


class Fleet:
    """A daemon and subscribers of aurora-records/prod on one MemoryBus."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.subs: dict[str, ConfigSubscriber] = {}
        self.daemon: Daemon | None = None
        self.messages: list[str] = []  # the rollout driver's log lines
        handler = logging.Handler()
        handler.emit = lambda record: self.messages.append(record.getMessage())  # type: ignore[method-assign]
        logger = logging.getLogger("configbus.publisher.rollouts")
        self._level = logger.level
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        self._handler = handler

    @property
    def daemon_log(self) -> str:
        return "\n".join(self.messages)

    async def start_daemon(self, trust: Path | None = None) -> Daemon:
        self.daemon = self.world.daemon(**({"trust": trust} if trust else {}))
        await self.daemon.start()
        await self.daemon.ready.wait()
        return self.daemon

    async def start(self, name: str, zone: str = "a", **options: Any) -> ConfigSubscriber:
        sub = ConfigSubscriber(
            *AURORA,
            bus=self.world.bus,
            trust=self.world.trust,
            instance_id=name,
            service="records-api",
            topic_prefix=self.world.topics.prefix,
            acks_topic=self.world.topics.acks,
            labels={"zone": zone, **options.pop("labels", {})},
            heartbeat=options.pop("heartbeat", 0.2),  # silent 0.6 s: gone, even on a busy CI
            start_timeout=5,
            bootstrap_servers="memory:9092",
            **options,
        )
        await sub.start()
        self.subs[name] = sub
        return sub

    def pools(self) -> dict[str, Any]:
        return {name: sub.config.get(POOL) for name, sub in self.subs.items()}

    def candidates(self) -> list[VerifiedEvent]:
        records = self.world.bus.records(self.world.topics.tenant_topic(AURORA[0]))
        key = self.world.topics.record_key(AURORA[1], CANDIDATE_CHANNEL)
        return [open_envelope(r.value or b"", self.world.trust) for r in records if r.key == key]

    def snapshot_versions(self) -> list[int]:
        records = self.world.bus.records(self.world.topics.tenant_topic(AURORA[0]))
        key = self.world.topics.record_key(AURORA[1], SNAPSHOT_CHANNEL)
        events = [open_envelope(r.value or b"", self.world.trust) for r in records if r.key == key]
        return [e.body.version for e in events]

    def state(self) -> str:
        found = self.candidates()
        return found[-1].body.rollout.state if found and found[-1].body.rollout else ""

    def acks(self, channel: str, status: str) -> list[Ack]:
        decoder = msgspec.msgpack.Decoder(Ack)
        found = [decoder.decode(r.value or b"") for r in self.world.bus.records("acks")]
        return [a for a in found if a.channel == channel and a.status == status]

    async def close(self) -> None:
        for sub in self.subs.values():
            await sub.stop()
        if self.daemon is not None:
            await self.daemon.stop()
        logger = logging.getLogger("configbus.publisher.rollouts")
        logger.removeHandler(self._handler)
        logger.setLevel(self._level)


def declare(world: World, rollout: str) -> None:
    """aurora-records/prod rolls out as `rollout` (a YAML flow mapping) says."""
    world.edit(
        TENANT_FILE,
        "    layer: true  # tenants/aurora-records/prod.yml must exist and set values",
        "    layer: true  # tenants/aurora-records/prod.yml must exist and set values\n"
        f"    rollout: {rollout}",
    )


def change_pool(world: World, old: int, new: int) -> None:
    world.edit(PROD_LAYER, f"max_size: {old}", f"max_size: {new}")


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


@pytest.fixture
async def fleet(world: World) -> AsyncIterator[Fleet]:
    fleet = Fleet(world)
    try:
        yield fleet
    finally:
        await fleet.close()


async def six(fleet: Fleet, **by_name: dict[str, Any]) -> None:
    for number in range(6):
        name = f"i{number}"
        await fleet.start(name, "a" if number < 3 else "b", **by_name.get(name, {}))


async def test_a_declared_canary_goes_step_by_step_and_is_promoted(
    world: World, fleet: Fleet
) -> None:
    declare(world, "{strategy: canary, steps: [1, 50%, 100%], bake: 0s}")
    await fleet.start_daemon()
    await six(fleet)
    assert set(fleet.pools().values()) == {250}
    seen: list[tuple[int, int]] = []  # (step, instances on the candidate) as they happen

    def watch() -> bool:
        found = fleet.candidates()
        if found and found[-1].body.rollout is not None:
            on = sum(1 for s in fleet.subs.values() if s.snapshot.candidate is not None)
            step = found[-1].body.rollout.step
            if not seen or seen[-1] != (step, on):
                seen.append((step, on))
        return fleet.state() == "promoted"

    change_pool(world, 250, 260)
    await eventually(watch, "the rollout to be promoted")
    await eventually(lambda: set(fleet.pools().values()) == {260}, "every instance at 260")

    assert fleet.snapshot_versions() == [1, 2]  # the candidate never was a snapshot
    states = [
        (e.body.rollout.step, e.body.rollout.state) for e in fleet.candidates() if e.body.rollout
    ]
    assert states == [(0, "running"), (1, "running"), (2, "running"), (2, "promoted")]
    assert max(on for _, on in seen) >= 1
    await eventually(
        lambda: all(s.version == 2 and s.snapshot.candidate is None for s in fleet.subs.values()),
        "every instance on the promoted snapshot v2, off the candidate",
    )


async def test_a_validator_refusing_the_candidate_aborts_and_the_canary_goes_back(
    world: World, fleet: Fleet
) -> None:
    declare(world, "{strategy: canary, steps: ['1', 100%], bake: 5s}")
    await fleet.start_daemon()

    def refuse_260(config: Any) -> bool:
        return config.get(POOL) != 260

    await six(fleet, **{f"i{n}": {} for n in range(6)})
    for sub in fleet.subs.values():
        sub.add_validator(refuse_260)
    change_pool(world, 250, 260)

    await eventually(lambda: fleet.state() == "aborted", "the rollout to be aborted", timeout=5)
    tag = fleet.candidates()[-1].body.rollout
    assert tag is not None
    assert len(tag.breaches) == 1 and tag.breaches[0].startswith("refused on i")
    assert "refuse_260 refused the config" in tag.breaches[0]
    assert set(fleet.pools().values()) == {250}
    assert fleet.snapshot_versions() == [1]


async def test_a_canary_that_stops_right_after_applying_aborts_the_rollout(
    world: World, fleet: Fleet
) -> None:
    declare(world, "{strategy: canary, steps: [1, 100%], bake: 5s}")
    await fleet.start_daemon()
    await six(fleet)
    stopping: list[ConfigSubscriber] = []

    def leave_on_260(old: Any, new: Any, paths: list[str]) -> None:
        if new.get(POOL) == 260:
            stopping.append(fleet.subs[next(n for n, s in fleet.subs.items() if s.config is new)])

    for sub in fleet.subs.values():
        sub.on_change(POOL, leave_on_260)
    change_pool(world, 250, 260)
    await eventually(lambda: stopping, "the canary to apply the candidate", timeout=5)
    canary = stopping[0]
    await canary.stop()  # as a service does when its main task dies and `async with` exits

    await eventually(lambda: fleet.state() == "aborted", "the rollout to be aborted", timeout=5)
    tag = fleet.candidates()[-1].body.rollout
    assert tag is not None
    name = canary.settings.instance_id
    assert tag.breaches == (f"crash-after-apply on {name}: stopped after applying the candidate",)
    others = [s for s in fleet.subs.values() if s is not canary]
    await eventually(lambda: all(s.config.get(POOL) == 250 for s in others), "the rest on 250")
    assert fleet.snapshot_versions() == [1]


async def test_a_failing_health_check_aborts_and_the_canary_returns_by_itself(
    world: World, fleet: Fleet
) -> None:
    declare(world, "{strategy: canary, steps: [1, 100%], bake: 5s}")
    await fleet.start_daemon()
    await six(fleet)
    for sub in fleet.subs.values():

        def small_pool(sub: ConfigSubscriber = sub) -> bool:
            if sub.config.get(POOL) > 255:
                raise RuntimeError(f"pool of {sub.config.get(POOL)} is too big for the database")
            return True

        sub.add_health_check(small_pool)
    change_pool(world, 250, 260)

    await eventually(lambda: fleet.state() == "aborted", "the rollout to be aborted", timeout=5)
    tag = fleet.candidates()[-1].body.rollout
    assert tag is not None and len(tag.breaches) == 1
    assert tag.breaches[0].startswith("health check failed on i")
    assert tag.breaches[0].endswith("small_pool: pool of 260 is too big for the database")
    await eventually(lambda: set(fleet.pools().values()) == {250}, "every instance on 250")
    assert all(s.snapshot.candidate is None for s in fleet.subs.values())
    await eventually(lambda: all(s.healthy for s in fleet.subs.values()), "all healthy again")

    view = await read_staged(world.bus, world.topics, *AURORA, world.trust)
    assert view is not None and view.tag.state == "aborted"
    table = view.table()
    assert "ABORTED" in table and f"gate fired: {tag.breaches[0]}" in table
    assert view.to_dict()["breaches"] == list(tag.breaches)


async def test_blue_green_goes_to_the_green_instances_first_then_to_everyone(
    world: World, fleet: Fleet
) -> None:
    declare(world, "{strategy: blue-green, bake: 0s}")
    await fleet.start_daemon()
    for number in range(4):
        color = "green" if number % 2 else "blue"
        await fleet.start(f"i{number}", labels={"color": color})
    on_green: list[set[str]] = []

    def green_first() -> bool:
        on = {n for n, s in fleet.subs.items() if s.snapshot.candidate is not None}
        if on and (not on_green or on_green[-1] != on):
            on_green.append(on)
        return fleet.state() == "promoted"

    change_pool(world, 250, 260)
    await eventually(green_first, "the rollout to be promoted")
    await eventually(lambda: set(fleet.pools().values()) == {260}, "every instance at 260")

    first = fleet.candidates()[0].body.rollout
    assert first is not None and first.match == {"color": "green"}
    assert on_green and on_green[0] <= {"i1", "i3"}  # the blue ones waited
    assert fleet.snapshot_versions() == [1, 2]


async def test_an_instance_starting_mid_canary_runs_stable_unless_selected(
    world: World, fleet: Fleet
) -> None:
    declare(world, "{strategy: canary, steps: [1, 100%], bake: 60s, select: {zone: a}}")
    await fleet.start_daemon()
    await six(fleet)
    change_pool(world, 250, 260)
    await eventually(lambda: list(fleet.pools().values()).count(260) == 1, "one canary")
    tag = fleet.candidates()[-1].body.rollout
    assert tag is not None
    canary = next(n for n, pool in fleet.pools().items() if pool == 260)
    assert canary in ("i0", "i1", "i2")  # zone a

    late_b = await fleet.start("late-b", "b")
    late_a = await fleet.start(
        next(f"late{n}" for n in itertools.count() if rank(tag.id, f"late{n}") >= tag.below), "a"
    )
    chosen = await fleet.start(
        next(f"new{n}" for n in itertools.count() if rank(tag.id, f"new{n}") < tag.below), "a"
    )

    assert late_b.config.get(POOL) == 250 and late_b.snapshot.candidate is None
    assert late_a.config.get(POOL) == 250 and late_a.snapshot.candidate is None
    assert chosen.config.get(POOL) == 260 and chosen.snapshot.candidate is not None
    assert chosen.version == 1  # the stable snapshot stays what it composes over


async def test_a_change_during_a_rollout_supersedes_it(world: World, fleet: Fleet) -> None:
    declare(world, "{strategy: canary, steps: [1, 100%], bake: 60s}")
    await fleet.start_daemon()
    await six(fleet)
    change_pool(world, 250, 260)
    await eventually(lambda: list(fleet.pools().values()).count(260) == 1, "one canary")
    first = fleet.candidates()[-1].body.rollout
    assert first is not None

    change_pool(world, 260, 270)
    await eventually(lambda: list(fleet.pools().values()).count(270) == 1, "the new canary")

    latest = fleet.candidates()[-1]
    assert latest.body.rollout is not None and latest.body.rollout.id != first.id
    assert latest.body.rollout.step == 0
    assert f"supersedes rollout {first.id}" in latest.body.rollout.note
    assert 260 not in fleet.pools().values()
    assert fleet.snapshot_versions() == [1]


def with_operator(world: World, tmp_path: Path) -> SigningKey:
    """Trust file tmp_path/trust.yml: the world's key, "oncall" (an operator of
    aurora-records/prod) and "outsider" (of helix-audio only); oncall's key."""
    private, _ = generate_keypair("oncall", tmp_path / "operators")
    operator = SigningKey.load(private, "oncall")
    outsider = SigningKey.load(generate_keypair("outsider", tmp_path / "operators")[0], "outsider")
    world.trust = world.trust.with_key(
        TrustedKey(operator.public, frozenset({AURORA[0]}), frozenset({AURORA[1]}), OPERATOR, 3600)
    ).with_key(
        TrustedKey(outsider.public, frozenset({"helix-audio"}), frozenset({"prod"}), OPERATOR, 3600)
    )
    world.trust.save(tmp_path / "trust.yml")
    return operator


async def test_operators_arm_promote_and_abort_with_signed_commands(
    world: World, fleet: Fleet, tmp_path: Path
) -> None:
    operator = with_operator(world, tmp_path)
    outsider = SigningKey.load(tmp_path / "operators" / "outsider.key", "outsider")
    await fleet.start_daemon(tmp_path / "trust.yml")
    await six(fleet)

    async def command(action: str, key: SigningKey = operator, **fields: Any) -> None:
        if action != "start":  # promote and abort name the rollout they mean, as the CLI does
            tag = fleet.candidates()[-1].body.rollout if fleet.candidates() else None
            fields.setdefault("rollout", tag.id if tag is not None else "")
        await send_command(
            world.bus, world.topics, *AURORA, Command(action=action, **fields),
            key=key, trust=world.trust, cause=Cause(actor=key.kid, reason=f"CHG-1 {action}"),
        )  # fmt: skip

    plan = Plan.build("canary", "1,50%,100%", "1h", {"zone": "a"})
    await command("start", key=outsider, plan=plan.to_dict())  # not aurora's operator
    change_pool(world, 250, 260)
    await eventually(lambda: fleet.snapshot_versions() == [1, 2], "published at once")
    await eventually(lambda: set(fleet.pools().values()) == {260}, "every instance at 260")

    await command("start", plan=plan.to_dict())
    await eventually(lambda: "armed" in fleet.daemon_log, "the daemon to arm the stream")
    change_pool(world, 260, 270)
    await eventually(lambda: list(fleet.pools().values()).count(270) == 1, "one canary")
    await command("promote", step_only=True)
    await eventually(lambda: list(fleet.pools().values()).count(270) == 2, "two: half of zone a")
    await command("promote")
    await eventually(lambda: fleet.state() == "promoted", "the rollout to be promoted")
    await eventually(lambda: set(fleet.pools().values()) == {270}, "every instance at 270")
    assert fleet.snapshot_versions() == [1, 2, 3]

    await command("start", plan=plan.to_dict())
    await eventually(lambda: fleet.daemon_log.count("armed") == 2, "armed again")
    change_pool(world, 270, 280)
    await eventually(lambda: list(fleet.pools().values()).count(280) == 1, "one canary")
    await command("abort")
    await eventually(lambda: fleet.state() == "aborted", "the rollout to be aborted")
    tag = fleet.candidates()[-1].body.rollout
    assert tag is not None and tag.breaches == ("aborted by oncall: CHG-1 abort",)
    await eventually(lambda: set(fleet.pools().values()) == {270}, "every instance back on 270")
    assert fleet.snapshot_versions() == [1, 2, 3]  # held: the tree says 280, nobody runs it
    await command("promote")  # nothing runs: ignored, said so
    await eventually(lambda: "no rollout runs" in fleet.daemon_log, "the refusal in the log")


async def test_a_restarted_daemon_resumes_the_rollout_it_finds(world: World, fleet: Fleet) -> None:
    declare(world, "{strategy: canary, steps: [1, 100%], bake: 1s}")
    daemon = await fleet.start_daemon()
    await six(fleet)
    change_pool(world, 250, 260)
    await eventually(lambda: list(fleet.pools().values()).count(260) == 1, "one canary")
    await daemon.stop()
    running = fleet.candidates()[-1].body.rollout
    assert running is not None and running.state == "running"

    await fleet.start_daemon()
    await eventually(lambda: fleet.state() == "promoted", "the rollout to be promoted")

    tags = [e.body.rollout for e in fleet.candidates() if e.body.rollout]
    assert {t.id for t in tags} == {running.id}
    assert [(t.step, t.state) for t in tags] == [(0, "running"), (1, "running"), (1, "promoted")]
    assert fleet.snapshot_versions() == [1, 2]


async def test_a_canary_lost_while_no_daemon_ran_is_judged_by_the_next_one(
    world: World, fleet: Fleet
) -> None:
    declare(world, "{strategy: canary, steps: [1, 100%], bake: 60s}")
    daemon = await fleet.start_daemon()
    await six(fleet)
    change_pool(world, 250, 260)
    await eventually(lambda: list(fleet.pools().values()).count(260) == 1, "one canary")
    await daemon.stop()
    canary = next(s for s in fleet.subs.values() if s.config.get(POOL) == 260)
    await canary.stop()  # it goes while nobody drives the rollout

    await fleet.start_daemon()
    await eventually(lambda: fleet.state() == "aborted", "the next daemon to abort")

    tag = fleet.candidates()[-1].body.rollout
    assert tag is not None
    assert tag.breaches == (
        f"crash-after-apply on {canary.settings.instance_id}: stopped after applying the candidate",
    )
    assert fleet.snapshot_versions() == [1]


async def test_a_candidate_record_the_daemon_cannot_drive_is_ignored_and_said_so(
    world: World, fleet: Fleet
) -> None:
    await fleet.start_daemon()
    bad = RolloutTag(id="x", state="running", strategy="canary", steps=(), step=0)
    body = build_body(
        tenant=AURORA[0], env=AURORA[1], version=1, config_json=b"{}",
        kind=EventKind.CANDIDATE, detected_at=now_ns(), cause=Cause(), rollout=bad,
    )  # fmt: skip
    topic = world.topics.tenant_topic(AURORA[0])
    await world.put(
        topic, world.topics.record_key(AURORA[1], CANDIDATE_CHANNEL), seal(body, world.key)
    )

    await eventually(
        lambda: "a candidate record is ignored: steps: give 1 to 20 steps" in fleet.daemon_log,
        "the daemon to refuse the record",
    )
    assert fleet.daemon is not None and AURORA not in fleet.daemon.rollouts.rollouts


async def test_undoing_the_change_aborts_its_rollout(world: World, fleet: Fleet) -> None:
    declare(world, "{strategy: canary, steps: [1, 100%], bake: 60s}")
    await fleet.start_daemon()
    await six(fleet)
    change_pool(world, 250, 260)
    await eventually(lambda: list(fleet.pools().values()).count(260) == 1, "one canary")

    change_pool(world, 260, 250)
    await eventually(lambda: fleet.state() == "aborted", "the rollout to be aborted")

    tag = fleet.candidates()[-1].body.rollout
    assert tag is not None
    assert tag.breaches == (
        "the change was undone: the stream resolves to its stable version again",
    )
    await eventually(lambda: set(fleet.pools().values()) == {250}, "the canary back")
    assert fleet.snapshot_versions() == [1]  # nothing to publish: 250 is what runs


async def test_an_aborted_change_stays_held_across_reconciles_until_the_tree_changes(
    world: World, fleet: Fleet, tmp_path: Path
) -> None:
    operator = with_operator(world, tmp_path)
    daemon = await fleet.start_daemon(tmp_path / "trust.yml")
    await six(fleet)

    def refuse_260(config: Any) -> bool:
        return config.get(POOL) != 260

    for sub in fleet.subs.values():
        sub.add_validator(refuse_260)
    plan = Plan.build("canary", "1,100%", "1h")
    await send_command(
        world.bus, world.topics, *AURORA, Command(action="start", plan=plan.to_dict()),
        key=operator, trust=world.trust, cause=Cause(actor="oncall", reason="CHG-2"),
    )  # fmt: skip
    await eventually(lambda: "armed" in fleet.daemon_log, "the daemon to arm the stream")
    change_pool(world, 250, 260)
    await eventually(lambda: fleet.state() == "aborted", "the rollout to be aborted")

    report = await daemon.publish_round(
        lambda publisher: publisher.publish([AURORA], now_change((), "unit", "reconcile"))
    )
    assert report.staged == [AURORA] and not report.published  # held, not published
    assert fleet.snapshot_versions() == [1]

    change_pool(world, 260, 270)  # a new change, and no rollout armed: published at once
    await eventually(lambda: fleet.snapshot_versions() == [1, 2], "the new change published")
    await eventually(lambda: set(fleet.pools().values()) == {270}, "every instance on 270")


async def test_a_one_shot_publish_refuses_a_stream_that_rolls_out_in_stages(world: World) -> None:
    declare(world, "{strategy: canary, steps: [1, 100%], bake: 60s}")
    first = await publish_once(world.settings(), bus=world.bus, deadline=5)
    assert first.published  # a first version: nothing runs that a canary could protect
    change_pool(world, 250, 260)

    report = await publish_once(world.settings(), bus=world.bus, deadline=5)

    assert not report.published and not report.staged
    assert report.failed[AURORA].startswith("it rolls out in stages")
    assert "only a running daemon drives" in report.failed[AURORA]


async def test_an_instance_without_heartbeats_never_takes_part(world: World, fleet: Fleet) -> None:
    declare(world, "{strategy: canary, steps: [100%], bake: 60s}")
    await fleet.start_daemon()
    unseen = await fleet.start("unseen", heartbeat=0)
    for number in range(3):
        await fleet.start(f"i{number}")
    change_pool(world, 250, 260)

    await eventually(
        lambda: all(fleet.pools()[f"i{n}"] == 260 for n in range(3)), "the seen ones on 260"
    )
    assert unseen.config.get(POOL) == 250 and unseen.snapshot.candidate is None


async def test_a_selected_newcomer_gets_the_candidate_though_overrides_are_at_a_higher_version(
    world: World, fleet: Fleet, tmp_path: Path
) -> None:
    operator = with_operator(world, tmp_path)
    declare(world, "{strategy: canary, steps: [1, 100%], bake: 60s}")
    await fleet.start_daemon(tmp_path / "trust.yml")
    for n in range(5):  # override channel at v5, above any candidate version to come

        def one_more(kept: Any, now: int, n: int = n) -> tuple[OverrideEntry, ...]:
            entry = OverrideEntry(
                path=f"feature_flags.probe_{n}", value=True, set_at=now,
                expires_at=now + 600 * 10**9, actor="oncall", reason="probe",
            )  # fmt: skip
            return (*kept, entry)

        await write_overrides(
            world.bus, world.topics, *AURORA, key=operator, trust=world.trust,
            change=one_more, cause=Cause(actor="oncall", reason="probe"),
        )  # fmt: skip
    await six(fleet)
    change_pool(world, 250, 260)
    await eventually(lambda: list(fleet.pools().values()).count(260) == 1, "one canary")
    tag = fleet.candidates()[-1].body.rollout
    assert tag is not None and fleet.candidates()[-1].body.version < 5

    chosen = await fleet.start(
        next(f"new{n}" for n in itertools.count() if rank(tag.id, f"new{n}") < tag.below)
    )

    assert chosen.config.get(POOL) == 260 and chosen.snapshot.candidate is not None
    assert chosen.snapshot.override_version == 5


async def test_a_promote_naming_another_rollout_is_not_acted_on(
    world: World, fleet: Fleet, tmp_path: Path
) -> None:
    operator = with_operator(world, tmp_path)
    declare(world, "{strategy: canary, steps: [1, 100%], bake: 60s}")
    await fleet.start_daemon(tmp_path / "trust.yml")
    await six(fleet)
    change_pool(world, 250, 260)
    await eventually(lambda: list(fleet.pools().values()).count(260) == 1, "one canary")

    await send_command(
        world.bus, world.topics, *AURORA, Command(action="promote", rollout="0ld0ne"),
        key=operator, trust=world.trust, cause=Cause(actor="oncall", reason="CHG-9 replayed"),
    )  # fmt: skip

    await eventually(lambda: "names rollout 0ld0ne" in fleet.daemon_log, "the refusal logged")
    assert fleet.state() == "running" and fleet.snapshot_versions() == [1]


async def test_a_rollback_to_what_runs_points_at_the_staged_rollout(
    world: World, fleet: Fleet
) -> None:
    declare(world, "{strategy: canary, steps: [1, 100%], bake: 60s}")
    await fleet.start_daemon()
    await six(fleet)
    change_pool(world, 250, 260)
    await eventually(lambda: list(fleet.pools().values()).count(260) == 1, "one canary")
    tag = fleet.candidates()[-1].body.rollout
    assert tag is not None

    report = await rollback(
        world.settings(), *AURORA, to_version=1, reason="bad pool", actor="oncall",
        bus=world.bus, deadline=5,
    )  # fmt: skip

    assert report.version == 0 and report.staged == tag.id
    assert report.summary().endswith(
        f"A staged rollout of another config runs ({tag.id}): "
        "`configbus rollout abort aurora-records prod` sends its canaries back"
    )


async def test_a_restart_during_an_armed_rollout_does_not_publish_the_candidate(
    world: World, fleet: Fleet, tmp_path: Path
) -> None:
    operator = with_operator(world, tmp_path)
    daemon = await fleet.start_daemon(tmp_path / "trust.yml")
    await six(fleet)
    plan = Plan.build("canary", "1,100%", "1h")
    await send_command(
        world.bus, world.topics, *AURORA, Command(action="start", plan=plan.to_dict()),
        key=operator, trust=world.trust, cause=Cause(actor="oncall", reason="CHG-3"),
    )  # fmt: skip
    await eventually(lambda: "armed" in fleet.daemon_log, "the daemon to arm the stream")
    change_pool(world, 250, 260)
    await eventually(lambda: list(fleet.pools().values()).count(260) == 1, "one canary")
    await daemon.stop()

    again = fleet.daemon = world.daemon(trust=tmp_path / "trust.yml")
    await again.start()
    await again.ready.wait()  # its first round is done: it found the rollout first

    assert again.rollouts.rollouts[AURORA].tag.state == "running"
    assert fleet.snapshot_versions() == [1]
    assert list(fleet.pools().values()).count(260) == 1
