"""Staged rollouts against real Kafka: a `configbus daemon` process and six service
processes of aurora-records/prod in two zones (tests/integration/rollout_service.py),
each with labels and heartbeats every 0.3 s. A change to the tree goes out as a
candidate, step by step; the gates roll it back by themselves when a validator refuses
it, when a process dies on applying it, and when a health check fails; a healthy one is
promoted until every instance runs it; an instance starting mid-canary gets the stable
version unless it is selected; and a daemon killed mid-rollout resumes it."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import CLI, REPO, Setup, topic_options, wait_until

from configbus.bus import CANDIDATE_CHANNEL, SNAPSHOT_CHANNEL, read_to_end
from configbus.crypto import SigningKey, generate_keypair
from configbus.crypto.trust import OPERATOR, TrustedKey
from configbus.events import RolloutTag, VerifiedEvent, rank

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TENANT, ENV = "aurora-records", "prod"
TENANT_FILE = "tenants/aurora-records/tenant.yml"
PROD_LAYER = "tenants/aurora-records/prod.yml"
SERVICE = Path(__file__).with_name("rollout_service.py")
NAMES = [f"svc-{zone}{n}" for zone in "ab" for n in range(3)]  # three per zone


class World:
    """The test's Kafka topics, tree, keys, daemon process and service processes."""

    def __init__(self, tmp_path: Path, bootstrap: str) -> None:
        self.setup = Setup.create(tmp_path, bootstrap)
        private, _ = generate_keypair("oncall", tmp_path / "operators")
        self.operator_key = private
        operator = SigningKey.load(private, "oncall")
        trust = self.setup.trust.with_key(
            TrustedKey(operator.public, frozenset({TENANT}), frozenset({ENV}), OPERATOR, 3600)
        )
        self.setup.trust_path.write_text(trust.dump(), encoding="utf-8")
        self.setup.trust = trust
        self.state_dir = tmp_path / "state"
        self.state_dir.mkdir()
        self.daemon: subprocess.Popen[bytes] | None = None
        self.daemons = 0
        self.services: dict[str, subprocess.Popen[bytes]] = {}

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIGBUS_")}
        return env | {"CONFIGBUS_STATE_TOPIC": self.setup.topics.state}

    # -- the tree --------------------------------------------------------------------
    def declare(self, rollout: str) -> None:
        """aurora-records/prod rolls every change out as `rollout` (YAML flow) says."""
        marker = "    layer: true  # tenants/aurora-records/prod.yml must exist and set values"
        self.edit(TENANT_FILE, marker, f"{marker}\n    rollout: {rollout}")

    def change_pool(self, old: int, new: int) -> None:
        self.edit(PROD_LAYER, f"max_size: {old}", f"max_size: {new}")

    def edit(self, relative: str, old: str, new: str) -> None:
        path = self.setup.root / relative
        text = path.read_text(encoding="utf-8")
        assert text.count(old) == 1, f"{old!r} not once in {relative}"
        temporary = path.with_name(path.name + ".new")
        temporary.write_text(text.replace(old, new), encoding="utf-8")
        os.replace(temporary, path)

    # -- processes ---------------------------------------------------------------------
    def start_daemon(self) -> None:
        self.daemons += 1
        with open(self.setup.workdir / f"daemon-{self.daemons}.log", "wb") as log:
            self.daemon = subprocess.Popen(
                [
                    *CLI,
                    "daemon",
                    "--root",
                    str(self.setup.root),
                    *topic_options(self.setup),
                    "--signing-key",
                    str(self.setup.key_path),
                    "--trust",
                    str(self.setup.trust_path),
                    "--reconcile-interval",
                    "600",
                    "--heartbeat-interval",
                    "1",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(),
                cwd=REPO,
            )

    def daemon_log(self) -> str:
        return "".join(
            (self.setup.workdir / f"daemon-{n}.log").read_text(errors="replace")
            for n in range(1, self.daemons + 1)
        )

    def start_service(self, name: str, zone: str, *options: str) -> None:
        with open(self.setup.workdir / f"{name}.log", "wb") as log:
            self.services[name] = subprocess.Popen(
                [
                    sys.executable,
                    str(SERVICE),
                    "--bootstrap",
                    self.setup.kafka.bootstrap_servers,
                    "--trust",
                    str(self.setup.trust_path),
                    "--prefix",
                    self.setup.topics.prefix,
                    "--acks",
                    self.setup.topics.acks,
                    "--instance",
                    name,
                    "--zone",
                    zone,
                    "--state-dir",
                    str(self.state_dir),
                    *options,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(),
                cwd=REPO,
            )

    async def start_six(self, *options: str) -> None:
        for name in NAMES:
            self.start_service(name, "eu-west-1" + name[4], *options)
        await wait_until(
            lambda: all(self.runs(n) is not None for n in NAMES), 60, what="six services up"
        )

    def stop_all(self) -> None:
        for process in [*self.services.values(), self.daemon]:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(timeout=10)

    # -- what runs where ----------------------------------------------------------------
    def runs(self, name: str) -> dict[str, Any] | None:
        try:
            return dict(json.loads((self.state_dir / f"{name}.json").read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def pools(self, names: list[str] | None = None) -> dict[str, Any]:
        return {n: (self.runs(n) or {}).get("pool") for n in names or NAMES}

    async def events(self, channel: str) -> list[VerifiedEvent]:
        """The stream's verified events on `channel`, in the topic's order."""
        key = self.setup.topics.record_key(ENV, channel)
        topic = self.setup.topics.tenant_topic(TENANT)
        found = [r async for r in read_to_end(self.setup.kafka, [topic]) if r.key == key]
        return [self.setup.verify(r).event for r in sorted(found, key=lambda r: r.offset)]

    async def tags(self) -> list[RolloutTag]:
        return [e.body.rollout for e in await self.events(CANDIDATE_CHANNEL) if e.body.rollout]

    async def state(self) -> str:
        tags = await self.tags()
        return tags[-1].state if tags else ""

    async def snapshot_versions(self) -> list[int]:
        return [e.body.version for e in await self.events(SNAPSHOT_CHANNEL)]

    async def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run,
            [*CLI, *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=self.env(),
            cwd=REPO,
            check=False,
        )

    def signer(self) -> list[str]:
        return [
            *topic_options(self.setup),
            "--trust",
            str(self.setup.trust_path),
            "--key",
            str(self.operator_key),
        ]


@pytest.fixture
def world(tmp_path: Path, kafka_bootstrap: str) -> Iterator[World]:
    made = World(tmp_path, kafka_bootstrap)
    try:
        yield made
    finally:
        made.stop_all()


async def begin(world: World, rollout: str | None, *service_options: str) -> None:
    """The daemon publishes v1 (max_size 250) and six services run it."""
    if rollout is not None:
        world.declare(rollout)
    world.start_daemon()
    await world.start_six(*service_options)
    assert set(world.pools().values()) == {250}
    assert await world.snapshot_versions() == [1]


async def aborted(world: World, timeout: float = 60) -> RolloutTag:
    await wait_until(lambda: world.state(), timeout, what="a rollout decision")  # started
    await wait_until(
        _is(world, "aborted"),
        timeout,
        what=f"the rollout to abort; daemon log:\n{world.daemon_log()}",
    )
    return (await world.tags())[-1]


def _is(world: World, state: str) -> Any:
    async def check() -> bool:
        return await world.state() == state

    return check


# -- the gates -------------------------------------------------------------------------


async def test_a_validator_refusing_the_candidate_rolls_the_canary_back_within_the_bake(
    world: World,
) -> None:
    await begin(world, "{strategy: canary, steps: [1, 50%, 100%], bake: 20s}", "--refuse", "260")

    world.change_pool(250, 260)
    tag = await aborted(world)

    first = (await world.tags())[0]
    assert (first.state, first.step) == ("running", 0)  # one canary first
    assert tag.step == 0 and len(tag.breaches) == 1
    canary = tag.breaches[0].split(" ")[2].rstrip(":")
    assert canary in NAMES
    assert tag.breaches[0].startswith(f"refused on {canary}: refused: ")
    assert "refused the config" in tag.breaches[0]
    aborted_at = (await world.events(CANDIDATE_CHANNEL))[-1].body.issued_at
    assert (aborted_at - first.step_started_at) / 1e9 < 20  # within the first bake
    assert set(world.pools().values()) == {250}  # no instance ever ran it
    assert await world.snapshot_versions() == [1]  # the stable head never moved


async def test_a_process_that_dies_applying_the_candidate_rolls_it_back(world: World) -> None:
    await begin(world, "{strategy: canary, steps: [1, 100%], bake: 20s}", "--crash-on", "260")

    world.change_pool(250, 260)
    tag = await aborted(world)

    dead = [n for n, p in world.services.items() if p.poll() is not None]
    assert len(dead) == 1 and world.services[dead[0]].returncode == 3  # the canary alone
    assert len(tag.breaches) == 1
    assert tag.breaches[0].startswith(f"crash-after-apply on {dead[0]}: ")
    alive = [n for n in NAMES if n not in dead]
    assert set(world.pools(alive).values()) == {250}
    assert await world.snapshot_versions() == [1]


async def test_a_failing_health_check_rolls_it_back_and_the_canary_returns_to_stable(
    world: World,
) -> None:
    await begin(world, "{strategy: canary, steps: [2, 100%], bake: 20s}", "--sick-on", "260")

    world.change_pool(250, 260)
    tag = await aborted(world)

    sick = sorted(b.split(" ")[4].rstrip(":") for b in tag.breaches)
    assert tag.breaches and all(b.startswith("health check failed on ") for b in tag.breaches)
    assert all("healthy says unhealthy" in b for b in tag.breaches)
    assert set(sick) <= set(NAMES) and 1 <= len(sick) <= 2
    # The canaries applied it (that is how they fell sick), and went back by themselves.
    await wait_until(lambda: set(world.pools().values()) == {250}, 30, what="all back on 250")
    assert all((world.runs(n) or {}).get("candidate") == 0 for n in NAMES)
    assert await world.snapshot_versions() == [1]


async def test_a_healthy_candidate_is_promoted_step_by_step_until_every_instance_has_it(
    world: World,
) -> None:
    await begin(world, "{strategy: canary, steps: [1, 50%, 100%], bake: 1s}")
    widest: dict[int, int] = {}  # step -> the most instances seen on the candidate in it

    async def watch() -> bool:
        # The instances are counted between two reads of the rollout's step, and only
        # when both say the same: an instance that applied the next step between them
        # would otherwise be counted in the step before.
        tags = await world.tags()
        on = sum(1 for n in NAMES if (world.runs(n) or {}).get("candidate"))
        after = await world.tags()
        if tags and after and tags[-1] == after[-1] and tags[-1].state == "running":
            widest[tags[-1].step] = max(widest.get(tags[-1].step, 0), on)
        return bool(after) and after[-1].state == "promoted"

    world.change_pool(250, 260)
    await wait_until(watch, 90, what=f"the promotion; daemon log:\n{world.daemon_log()}")
    await wait_until(lambda: set(world.pools().values()) == {260}, 30, what="all on 260")

    tags = await world.tags()
    assert [(t.step, t.state) for t in tags] == [
        (0, "running"),
        (1, "running"),
        (2, "running"),
        (2, "promoted"),
    ]
    assert len({t.id for t in tags}) == 1
    assert widest.get(0, 0) <= 1 and widest.get(1, 0) <= 3  # never wider than the step
    assert max(widest.values()) >= 3  # and it did widen
    assert await world.snapshot_versions() == [1, 2]  # promoted once, as the next version
    assert all((world.runs(n) or {}) == {"pool": 260, "version": 2, "candidate": 0} for n in NAMES)
    status = await world.cli("rollout", "status", TENANT, ENV, *world.signer()[:-2])
    assert status.returncode == 0, status.stderr
    assert f"rollout {tags[0].id}" in status.stdout and "PROMOTED" in status.stdout


async def test_an_instance_starting_mid_canary_gets_the_stable_version_unless_selected(
    world: World,
) -> None:
    await begin(world, None)
    armed = await world.cli(
        "rollout", "start", TENANT, ENV, "--steps", "1,100%", "--bake", "120s",
        "--select", "zone=eu-west-1a", "--reason", "CHG-42", *world.signer(),
    )  # fmt: skip
    assert armed.returncode == 0, armed.stderr
    assert "armed aurora-records/prod" in armed.stdout
    await wait_until(
        lambda: "armed by" in world.daemon_log(), 30, what="the daemon to take the command"
    )

    world.change_pool(250, 260)
    await wait_until(
        lambda: sum(1 for n in NAMES if world.pools([n])[n] == 260) == 1, 60, what="one canary"
    )
    tag = (await world.tags())[-1]
    canary = next(n for n in NAMES if world.pools([n])[n] == 260)
    assert canary.startswith("svc-a")  # selected among zone=eu-west-1a only
    # Two newcomers: one in the other zone, one in the canary's zone ranked after it.
    late_a = next(
        f"late-a{n}" for n in itertools.count() if rank(tag.id, f"late-a{n}") >= tag.below
    )
    world.start_service("late-b", "eu-west-1b")
    world.start_service(late_a, "eu-west-1a")
    await wait_until(
        lambda: world.runs("late-b") is not None and world.runs(late_a) is not None,
        60,
        what="the newcomers up",
    )
    assert world.pools(["late-b", late_a]) == {"late-b": 250, late_a: 250}

    stopped = await world.cli(
        "rollout", "abort", TENANT, ENV, "--reason", "wrong day", *world.signer()
    )
    assert stopped.returncode == 0, stopped.stderr
    tag = await aborted(world)
    assert tag.breaches == ("aborted by oncall: wrong day",)
    await wait_until(lambda: world.pools([canary])[canary] == 250, 30, what="the canary back")
    assert await world.snapshot_versions() == [1]


async def test_a_daemon_killed_mid_rollout_resumes_it_where_it_was(world: World) -> None:
    await begin(world, "{strategy: canary, steps: [1, 100%], bake: 4s}")

    world.change_pool(250, 260)
    await wait_until(
        lambda: sum(1 for n in NAMES if world.pools([n])[n] == 260) == 1, 60, what="the canary"
    )
    assert world.daemon is not None
    world.daemon.send_signal(signal.SIGKILL)
    world.daemon.wait(timeout=10)
    killed_at = time.time_ns()
    before = await world.tags()
    assert before[-1].state == "running" and before[-1].step == 0

    world.start_daemon()
    await wait_until(_is(world, "promoted"), 120, what=f"the promotion; log:\n{world.daemon_log()}")
    await wait_until(lambda: set(world.pools().values()) == {260}, 30, what="all on 260")

    tags = await world.tags()
    assert {t.id for t in tags} == {before[0].id}  # the same rollout, resumed
    assert tags[1].step_started_at == before[-1].step_started_at or tags[1].step == 1
    assert [t.step for t in tags if t.state == "running"] == [0, 1]
    assert (await world.events(CANDIDATE_CHANNEL))[-1].body.issued_at > killed_at
    assert await world.snapshot_versions() == [1, 2]  # promoted once
