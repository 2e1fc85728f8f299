"""The compliance gate on the in-memory bus: a prod change that breaks a blocking rule
is not published (the stream keeps its version, the daemon says why, other streams go
on), a signed waiver in force lets it through and is audited, and a waiver signed by a
key without the stream, expired or of another rule lets nothing through. Against real
Kafka: tests/integration/test_compliance_gate.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from configbus.crypto import SigningKey, generate_keypair
from configbus.crypto.trust import OPERATOR, TrustedKey
from configbus.events import now_ns, open_note
from configbus.ops.audit import verify_trail
from configbus.ops.waivers import WaiverBook, read_waivers, write_waiver
from configbus.publisher import Daemon
from configbus.publisher.core import now_change
from configbus.publisher.settings import PublisherSettings

from .helpers import eventually
from .test_publisher import World

AURORA = ("aurora-records", "prod")
HELIX = ("helix-audio", "prod")
AURORA_PROD = "tenants/aurora-records/prod.yml"
RULE = "baseline-backups-encrypted"


@pytest.fixture
def world(tmp_path: Path) -> World:
    world = World(tmp_path)
    world.trust.save(tmp_path / "trust.yml")
    return world


def operator(world: World, tmp_path: Path, kid: str, tenant: str = AURORA[0]) -> SigningKey:
    key = SigningKey.load(generate_keypair(kid, tmp_path / "operators")[0], kid)
    entry = TrustedKey(key.public, frozenset({tenant}), frozenset({"prod"}), OPERATOR, 7200)
    world.trust = world.trust.with_key(entry)
    world.trust.save(tmp_path / "trust.yml")
    return key


def weaken_backups(world: World) -> None:
    """aurora-records/prod writes its backups unencrypted, which the baseline forbids
    (and the schema allows)."""
    path = world.root / AURORA_PROD
    unencrypted = "disaster_recovery:\n  backups:\n    encrypted: false\n"
    path.write_text(path.read_text(encoding="utf-8") + unencrypted, encoding="utf-8")


def gate_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "compliance gate" in r.getMessage()]


async def waive(world: World, key: SigningKey, rule: str = RULE, for_s: float = 3600) -> None:
    await write_waiver(
        world.bus, world.topics, *AURORA, rule, for_s=for_s, key=key, trust=world.trust,
        actor=key.kid, reason="CHG-77 a legacy partner until Friday",
    )  # fmt: skip


async def test_a_prod_change_breaking_a_blocking_rule_is_held_and_said_why(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with world.daemon(trust=tmp_path / "trust.yml") as daemon:
        await eventually(daemon.ready.is_set, "the first publish round")
        weaken_backups(world)
        world.edit("tenants/helix-audio/prod.yml", "max_size:", "max_size: 131 #")
        await eventually(lambda: world.versions(HELIX) == [1, 2], "helix published meanwhile")
        await eventually(lambda: gate_lines(caplog), "the refusal logged")
        assert world.versions(AURORA) == [1]  # keeps its last good version
    (line,) = set(gate_lines(caplog))
    assert line.startswith("aurora-records/prod not published, keeping v1: compliance gate: ")
    assert f"{RULE} (disaster_recovery.backups.encrypted = false; expected " in line
    assert "configbus compliance waive aurora-records prod RULE" in line


async def test_a_signed_waiver_lets_it_through_and_is_audited(world: World, tmp_path: Path) -> None:
    oncall = operator(world, tmp_path, "oncall")
    async with world.daemon(trust=tmp_path / "trust.yml") as daemon:
        await eventually(daemon.ready.is_set, "the first publish round")
        weaken_backups(world)
        await eventually(lambda: AURORA in daemon.publisher._refusals, "the gate to hold it")
        await waive(world, oncall)
        await eventually(lambda: world.versions(AURORA) == [1, 2], "published under the waiver")
    audit = world.bus.records(world.topics.audit)
    notes = [open_note(r.value or b"", world.trust)[0] for r in audit if r.key.endswith(b"/note")]
    (used,) = [n for n in notes if n.action == "waiver_used"]
    assert (used.tenant, used.env, used.subject, used.version) == (*AURORA, RULE, 2)
    waivers = [r for r in audit if b'"rule":"baseline-backups-encrypted"' in (r.value or b"")]
    assert len(waivers) == 1  # the waiver itself, in the operator's chain
    report = await verify_trail(world.bus, world.topics, world.trust)
    assert report.ok, report.findings
    (listed,) = await read_waivers(world.bus, world.topics, *AURORA, world.trust)
    assert (listed.rule, listed.actor) == (RULE, "oncall")


@pytest.mark.parametrize("which", ["another tenant's operator", "expired", "another rule"])
async def test_a_waiver_that_does_not_hold_lets_nothing_through(
    world: World, tmp_path: Path, which: str
) -> None:
    oncall = operator(world, tmp_path, "oncall")
    outsider = operator(world, tmp_path, "outsider", tenant="helix-audio")
    async with world.daemon(trust=tmp_path / "trust.yml") as daemon:
        await eventually(daemon.ready.is_set, "the first publish round")
        weaken_backups(world)
        await eventually(lambda: AURORA in daemon.publisher._refusals, "the gate to hold it")
        if which == "another tenant's operator":
            with pytest.raises(Exception, match="untrusted_scope"):
                await waive(world, outsider)  # refused before it is written
            book = WaiverBook(world.topics, world.trust)
            assert book.active(AURORA, 0) == {}
        elif which == "expired":
            await waive(world, oncall, for_s=0.001)
        else:
            await waive(world, oncall, rule="baseline-mfa-required")
        await daemon.publish_round(lambda p: p.publish([AURORA], now_change((), "unit", "again")))
        assert world.versions(AURORA) == [1]
        assert "compliance gate" in daemon.publisher._refusals[AURORA]


async def test_with_no_gated_environment_nothing_is_gated(world: World, tmp_path: Path) -> None:
    weaken_backups(world)  # aurora prod breaks the rule from the start
    settings: PublisherSettings = world.settings(gate_envs=())
    async with Daemon(settings, bus=world.bus) as daemon:
        await eventually(daemon.ready.is_set, "the first publish round")
        assert world.versions(AURORA) == [1]  # no gate anywhere: published


async def test_a_restarted_daemon_knows_the_waivers_before_its_first_round(
    world: World, tmp_path: Path
) -> None:
    oncall = operator(world, tmp_path, "oncall")
    async with world.daemon(trust=tmp_path / "trust.yml") as daemon:
        await eventually(daemon.ready.is_set, "the first publish round")
    await waive(world, oncall)
    weaken_backups(world)  # changed while no daemon ran
    async with world.daemon(trust=tmp_path / "trust.yml") as again:
        await eventually(again.ready.is_set, "the first round of the new daemon")
        assert world.versions(AURORA) == [1, 2]


async def test_an_ended_waiver_stays_ended_when_its_first_record_is_copied_back(
    world: World, tmp_path: Path
) -> None:
    """Someone who can write the tenant topic copies the waiver's record back after it
    was ended: a record of its own, older than the end, which it does not replace."""
    oncall = operator(world, tmp_path, "oncall")
    async with world.daemon(trust=tmp_path / "trust.yml") as daemon:
        await eventually(daemon.ready.is_set, "the first publish round")
    await waive(world, oncall)
    topic = world.topics.tenant_topic(AURORA[0])
    (given,) = [r for r in world.bus.records(topic) if b"/waiver/" in (r.key or b"")]
    await waive(world, oncall, for_s=0)  # ended
    await world.put(topic, given.key or b"", given.value or b"")
    world.bus.compact(topic)  # what the broker does: the latest record per key stays
    weaken_backups(world)
    async with world.daemon(trust=tmp_path / "trust.yml") as again:
        await eventually(again.ready.is_set, "the first round of the new daemon")
        assert world.versions(AURORA) == [1]
        assert "compliance gate" in again.publisher._refusals[AURORA]


async def test_revoking_the_operator_key_ends_its_waivers(world: World, tmp_path: Path) -> None:
    oncall = operator(world, tmp_path, "oncall")
    async with world.daemon(trust=tmp_path / "trust.yml") as daemon:
        await eventually(daemon.ready.is_set, "the first publish round")
        await waive(world, oncall)
        await eventually(lambda: daemon.waivers.active(AURORA, now_ns()), "the waiver read")
        entry = world.trust.get("oncall")
        assert entry is not None
        revoked = TrustedKey(entry.key, entry.tenants, entry.environments, OPERATOR, 7200,
                             revoked=True)  # fmt: skip
        world.trust.replaced(revoked).save(tmp_path / "trust.yml")
        assert daemon.reload_keys()
        assert daemon.waivers.active(AURORA, now_ns()) == {}
        weaken_backups(world)
        await daemon.publish_round(lambda p: p.publish([AURORA], now_change((), "unit", "again")))
        assert world.versions(AURORA) == [1]


async def test_publish_once_honours_the_waivers(world: World, tmp_path: Path) -> None:
    oncall = operator(world, tmp_path, "oncall")
    async with world.daemon(trust=tmp_path / "trust.yml") as daemon:
        await eventually(daemon.ready.is_set, "the first publish round")
    await waive(world, oncall)
    weaken_backups(world)
    once = Daemon(world.settings(trust=tmp_path / "trust.yml"), bus=world.bus)
    await once.claim_once()
    try:
        report = await once.publish_round(
            lambda p: p.publish([AURORA], now_change((), "unit", "once"))
        )
    finally:
        await once.stop()
    assert report.published == [(*AURORA, 2)]
