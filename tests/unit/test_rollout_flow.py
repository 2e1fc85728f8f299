"""Staged rollouts end to end on the in-memory bus: a daemon that stages a tree change as
a candidate, subscribers with labels and heartbeats that apply it when selected, and the
gates that promote it step by step or abort it (a refusal, a crash after applying, a
failing health check, an operator). Against real Kafka, with each subscriber its own
process: tests/integration/test_rollouts.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from configbus.bus import CANDIDATE_CHANNEL, SNAPSHOT_CHANNEL
from configbus.events import Ack, VerifiedEvent, open_envelope
from configbus.publisher import Daemon
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

    async def start_daemon(self) -> Daemon:
        self.daemon = self.world.daemon()
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
            heartbeat=0.05,
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
        return [
            e.body.version
            for e in self.world.events(AURORA[0])
            if e.body.env == AURORA[1] and e.body.kind.channel == SNAPSHOT_CHANNEL
        ]

    def state(self) -> str:
        found = self.candidates()
        return found[-1].body.rollout.state if found and found[-1].body.rollout else ""

    def acks(self, channel: str, status: str) -> list[Ack]:
        import msgspec

        decoder = msgspec.msgpack.Decoder(Ack)
        found = [decoder.decode(r.value or b"") for r in self.world.bus.records("acks")]
        return [a for a in found if a.channel == channel and a.status == status]

    async def close(self) -> None:
        for sub in self.subs.values():
            await sub.stop()
        if self.daemon is not None:
            await self.daemon.stop()


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
    assert all(sub.version == 2 and sub.snapshot.candidate is None for sub in fleet.subs.values())


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
