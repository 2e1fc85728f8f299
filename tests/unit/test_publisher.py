"""The publisher daemon on the in-memory bus: what it reports published is what the bus
holds, a refused stream fails alone, recovery believes only verified records, versions
survive a lost tenant topic, and one writer publishes at a time. The same promises are
checked against real Kafka in tests/integration/test_hardening.py and test_publisher.py;
here they run in milliseconds, with faults injected where Kafka cannot be made to fail."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from configbus.bus import CHAIN_CHANNEL, WAIVER_CHANNEL, KafkaSettings, TopicNames
from configbus.bus.memory import MemoryBus
from configbus.crypto import SigningKey, TrustStore, generate_keypair
from configbus.crypto.secrets import LocalKeyProvider
from configbus.errors import ActiveWriterError, BusError
from configbus.events import Cause, VerifiedEvent, build_body, now_ns, open_envelope, seal
from configbus.limits import Limits
from configbus.ops.secrets import TreeBook, set_secret
from configbus.publisher import Daemon, PublisherSettings
from configbus.publisher.daemon import publish_once
from configbus.publisher.state import StreamHead, open_signed

from .helpers import eventually

SAMPLE_TREE = Path(__file__).resolve().parents[2] / "environments"
AURORA = ("aurora-records", "prod")
HELIX = ("helix-audio", "prod")


class World:
    """A copy of the sample tree, a key, topics, and one MemoryBus standing in for Kafka."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "environments"
        shutil.copytree(SAMPLE_TREE, self.root)
        self.kid = "unit"
        self.key_path, _ = generate_keypair(self.kid, tmp_path / "keys")
        self.key = SigningKey.load(self.key_path, self.kid)
        self.trust = TrustStore.of(self.key.public)
        self.topics = TopicNames(prefix="t.", audit="audit", acks="acks", state="state")
        self.bus = MemoryBus()

    def settings(self, **changes: Any) -> PublisherSettings:
        options: dict[str, Any] = {
            "root": self.root,
            "kafka": KafkaSettings("unused:9092"),
            "signing_key": self.key_path,
            "kid": self.kid,
            "topics": self.topics,
            "reconcile_interval": 60.0,
            "heartbeat_interval": 0.2,
            "step_ms": 5,
            "shutdown_grace": 2.0,
            "actor": "unit-test",
        }
        return PublisherSettings(**{**options, **changes})

    def daemon(self, **changes: Any) -> Daemon:
        return Daemon(self.settings(**changes), bus=self.bus)

    def events(self, tenant: str) -> list[VerifiedEvent]:
        """The verified events on `tenant`'s topic, in offset order."""
        topic = self.topics.tenant_topic(tenant)
        return [
            open_envelope(r.value or b"", self.trust)
            for r in self.bus.records(topic)
            if not _bookkeeping(r.key)
        ]

    def versions(self, stream: tuple[str, str]) -> list[int]:
        tenant, env = stream
        return [e.body.version for e in self.events(tenant) if e.body.env == env]

    def edit(self, relative: str, old: str, new: str) -> None:
        path = self.root / relative
        text = path.read_text(encoding="utf-8")
        assert text.count(old) == 1, f"{old!r} not once in {relative}"
        path.write_text(text.replace(old, new), encoding="utf-8")

    def forged(self, stream: tuple[str, str], version: int, key: SigningKey) -> bytes:
        tenant, env = stream
        body = build_body(
            tenant=tenant,
            env=env,
            version=version,
            config_json=b'{"forged":true}',
            detected_at=now_ns(),
            cause=Cause(sources=(), actor="mallory", reason="forged"),
        )
        return seal(body, key)

    async def put(self, topic: str, key: bytes, value: bytes) -> None:
        self.bus.create_topic(topic, compact=True)
        async with self.bus.producer() as producer:
            await producer.send_and_wait(topic, value, key=key)


def _bookkeeping(key: bytes | None) -> bool:
    """A tenant-topic record that is no config event: the audit chain's head, a
    compliance waiver."""
    channel = TopicNames.channel_of(key)[1]
    return channel == CHAIN_CHANNEL or channel.startswith(f"{WAIVER_CHANNEL}/")


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def failures(daemon: Daemon) -> list[BaseException]:
    """The exceptions the daemon's publish rounds raise from now on."""
    seen: list[BaseException] = []
    inner = daemon.publisher.publish

    async def publish(*args: Any) -> Any:
        try:
            return await inner(*args)
        except BaseException as exc:
            seen.append(exc)
            raise

    daemon.publisher.publish = publish  # type: ignore[method-assign]
    return seen


# -- publication --------------------------------------------------------------------


async def test_every_stream_published_is_on_the_bus_with_its_head(world: World) -> None:
    async with world.daemon() as daemon:
        await eventually(daemon.ready.is_set, "the first publish round")
        streams = daemon.index.streams
        assert streams and all(daemon.publisher.states[s].version == 1 for s in streams)
    heads = {
        r.key: open_signed(r.value or b"", world.trust, StreamHead)
        for r in world.bus.records(world.topics.state)
        if r.key not in (b"$writer", b"$chain")
    }
    audit = [open_envelope(r.value or b"", world.trust) for r in world.bus.records("audit")]
    assert sorted(e.stream for e in audit) == sorted(streams)
    for tenant, env in streams:
        assert world.versions((tenant, env)) == [1]
        assert heads[f"{tenant}/{env}".encode()].version == 1


async def test_an_event_its_topic_cannot_take_fails_its_stream_alone(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """The bus refuses aurora's record (its topic takes 100 bytes): aurora keeps v0 and
    one error line says why, while every other stream is published."""
    world.bus.create_topic(world.topics.tenant_topic("aurora-records"), max_message_bytes=100)
    async with world.daemon() as daemon:
        await eventually(daemon.ready.is_set, "the first publish round")
        assert AURORA not in daemon.publisher.states
        assert daemon.publisher.states[HELIX].version == 1
        world.edit("tenants/helix-audio/prod.yml", "max_size:", "max_size: 131 #")
        await eventually(lambda: daemon.publisher.states[HELIX].version == 2, "helix v2")
    assert world.versions(HELIX) == [1, 2]
    assert world.events("aurora-records") == []
    refusals = [r.getMessage() for r in caplog.records if "aurora-records/prod" in r.getMessage()]
    assert any("not published, keeping v0" in line and "refused" in line for line in refusals)
    assert len([line for line in refusals if "not published" in line]) == 1  # once per reason


async def test_an_event_over_our_limit_is_refused_before_sending(
    world: World, metrics_reader: InMemoryMetricReader
) -> None:
    daemon = world.daemon()
    daemon.publisher.limits = Limits(event_bytes=200)
    async with daemon:
        await eventually(daemon.ready.is_set, "the first publish round")
        assert daemon.publisher.states == {}
    assert world.bus.records(world.topics.audit) == []
    failed = counted(metrics_reader, "configbus.publish.failed")
    assert failed[("aurora-records", "prod", "too_large")] >= 1
    assert {reason for _, _, reason in failed} == {"too_large"}


@pytest.fixture(scope="module")
def metrics_reader() -> InMemoryMetricReader:
    """An in-memory reader on the process's meter provider (set here if none is)."""
    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    return reader


def counted(reader: InMemoryMetricReader, name: str) -> dict[tuple[str, str, str], int]:
    """The sums of counter `name` by (tenant, env, reason)."""
    found: dict[tuple[str, str, str], int] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name != name:
                    continue
                for point in metric.data.data_points:  # type: ignore[union-attr]
                    attributes = point.attributes or {}
                    key = tuple(
                        str(attributes.get(a, ""))
                        for a in ("configbus.tenant", "configbus.env", "reason")
                    )
                    found[key] = found.get(key, 0) + int(point.value)  # type: ignore[union-attr]
    return found  # type: ignore[return-value]


async def test_a_bus_outage_leaves_streams_pending_and_they_publish_after_it(
    world: World,
) -> None:
    async with world.daemon() as daemon:
        await eventually(daemon.ready.is_set, "the first publish round")
        failed = failures(daemon)
        world.bus.down = True
        world.edit("tenants/helix-audio/prod.yml", "max_size:", "max_size: 131 #")
        await eventually(lambda: failed, "a round to fail on the bus")
        assert daemon.publisher.states[HELIX].version == 1
        world.bus.fail_next("commit")  # and the first try after it fails at the commit
        world.bus.down = False
        await eventually(lambda: daemon.publisher.states[HELIX].version == 2, "helix v2")
    assert world.versions(HELIX) == [1, 2]


async def test_a_list_nested_300_deep_in_one_tenant_file_fails_that_stream_alone(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    async with world.daemon() as daemon:
        await eventually(daemon.ready.is_set, "the first publish round")
        deep = "[" * 300 + "]" * 300
        world.edit(
            "tenants/aurora-records/prod.yml", "max_size: 250", f"max_size: 250\n      deep: {deep}"
        )
        world.edit("tenants/helix-audio/prod.yml", "max_size:", "max_size: 131 #")
        await eventually(lambda: daemon.publisher.states[HELIX].version == 2, "helix v2")
        await eventually(
            lambda: any("limit depth" in r.getMessage() for r in caplog.records),
            "aurora's refusal",
        )
        assert daemon.publisher.states[AURORA].version == 1
        assert daemon._worker is not None and not daemon._worker.done()
    assert world.versions(AURORA) == [1]


@pytest.mark.parametrize("how", ["deleted", "truncated"])
async def test_a_declared_tenant_layer_briefly_absent_is_never_published(
    world: World, how: str
) -> None:
    """Delete-then-restore and truncate-then-rewrite of aurora's prod layer: while it is
    absent the stream fails (its last version stays); restored, nothing new is due."""
    layer = world.root / "tenants/aurora-records/prod.yml"
    text = layer.read_text(encoding="utf-8")
    async with world.daemon() as daemon:
        await eventually(daemon.ready.is_set, "the first publish round")
        rounds = failures(daemon)
        reports: list[Any] = []
        inner = daemon.publisher.publish

        async def publish(*args: Any) -> Any:
            reports.append(await inner(*args))
            return reports[-1]

        daemon.publisher.publish = publish  # type: ignore[method-assign]
        if how == "deleted":
            layer.unlink()
        else:
            layer.write_text("", encoding="utf-8")
        failed = await eventually(
            lambda: [r.failed[AURORA] for r in reports if AURORA in r.failed], "aurora to fail"
        )
        assert ("missing" if how == "deleted" else "empty") in failed[0]
        assert "layer: true" in failed[0]
        layer.write_text(text, encoding="utf-8")
        await eventually(
            lambda: (
                any(AURORA in r.failed for r in reports)
                and reports[-1].checked
                and AURORA not in reports[-1].failed
            ),
            "a round after the restore",
        )
        assert rounds == []
    assert world.versions(AURORA) == [1]


async def test_a_file_in_a_folder_new_to_the_tree_is_published(
    world: World, tmp_path: Path
) -> None:
    """A tenant's first ``secrets/`` folder arrives whole (moved in, as a checkout or a
    first ``secret set`` does): its file sends no event of its own, the folder's must do."""
    staging = tmp_path / "staging"
    provider, _ = LocalKeyProvider({}).with_new_key(AURORA[0])
    await set_secret(
        TreeBook(staging), provider, *AURORA, "tenants/aurora-records/postgres_password", b"pw"
    )
    async with world.daemon() as daemon:
        await eventually(daemon.ready.is_set, "the first publish round")
        os.rename(
            staging / "tenants/aurora-records/secrets",
            world.root / "tenants/aurora-records/secrets",
        )
        await eventually(lambda: world.versions(AURORA) == [1, 2], "aurora's next version")
    config = json.loads(world.events(AURORA[0])[-1].config_json)
    sealed = config["database"]["postgresql"]["password"]
    assert sealed["$secret"] == "tenants/aurora-records/postgres_password" and sealed["$sealed"]


# -- recovery -----------------------------------------------------------------------


async def test_recovery_believes_only_verified_records_of_their_own_stream(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An unknown key claiming v2^64-1, and our own event for helix placed on aurora's
    topic: both skipped and reported; aurora is published as v1."""
    caplog.set_level(logging.WARNING)
    mallory_path, _ = generate_keypair("mallory", tmp_path / "mallory")
    mallory = SigningKey.load(mallory_path, "mallory")
    topic = world.topics.tenant_topic("aurora-records")
    await world.put(topic, b"prod", world.forged(AURORA, 2**64 - 1, mallory))
    await world.put(topic, b"prod", world.forged(HELIX, 7, world.key))
    async with world.daemon() as daemon:
        await eventually(daemon.ready.is_set, "the first publish round")
        assert daemon.publisher.states[AURORA].version == 1
    summary = [r.getMessage() for r in caplog.records if "recovered" in r.getMessage()]
    assert any(
        "skipped 2 records" in line and "unknown_key (1)" in line and "wrong_stream (1)" in line
        for line in summary
    )


async def test_versions_survive_the_loss_of_a_tenant_topic(world: World) -> None:
    async with world.daemon() as daemon:
        await eventually(daemon.ready.is_set, "the first publish round")
        world.edit("tenants/aurora-records/prod.yml", "max_size:", "max_size: 251 #")
        await eventually(lambda: daemon.publisher.states[AURORA].version == 2, "aurora v2")
    admin = world.bus.admin()
    await admin.delete_topics([world.topics.tenant_topic("aurora-records")])
    world.edit("tenants/aurora-records/prod.yml", "max_size: 251 #", "max_size: 252 #")
    async with world.daemon() as daemon:
        await eventually(lambda: daemon.publisher.states[AURORA].version == 3, "aurora v3")
    assert world.versions(AURORA) == [3]


# -- one writer ---------------------------------------------------------------------


async def test_a_second_daemon_stands_by_until_the_first_resigns(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    first = await world.daemon().start()
    try:
        await eventually(first.ready.is_set, "the first daemon's round")
        second = world.daemon()
        starting = asyncio.create_task(second.start())
        await eventually(
            lambda: any("standing by" in r.getMessage() for r in caplog.records),
            "the second daemon to see the first's heartbeats",
        )
        beats = len(world.bus.records(world.topics.state))
        await eventually(
            lambda: len(world.bus.records(world.topics.state)) > beats + 1,
            "two more of the first's heartbeats",
        )
        assert not starting.done() and not second.active.is_set()
    finally:
        await first.stop()
    await asyncio.wait_for(starting, 5)
    try:
        assert second.active.is_set()
        await eventually(second.ready.is_set, "the second daemon's round")
    finally:
        await second.stop()


async def test_publish_once_refuses_while_a_daemon_is_active(world: World) -> None:
    async with world.daemon() as daemon:
        await eventually(daemon.ready.is_set, "the daemon's round")
        with pytest.raises(ActiveWriterError, match="--take-over"):
            await publish_once(world.settings(), bus=world.bus, deadline=5)
        report = await publish_once(world.settings(), bus=world.bus, take_over=True, deadline=5)
        # It recovered every version from the bus: nothing to publish again.
        assert report.checked == report.unchanged == len(daemon.index.streams)
        await eventually(lambda: daemon.takeovers == 1, "the daemon to see it was fenced")
        # Once the one-off run has resigned, the daemon claims the role back.
        world.edit("tenants/helix-audio/prod.yml", "max_size:", "max_size: 131 #")
        await eventually(lambda: daemon.publisher.states[HELIX].version == 2, "helix v2")
        assert daemon.active.is_set() and not daemon.fenced
    assert world.versions(HELIX) == [1, 2]


async def test_publish_once_refuses_while_a_long_round_holds_the_beats_back(
    world: World,
) -> None:
    """A fan-out (or a slow Kafka) that takes longer than three heartbeats holds the
    writer's beats back; its announced grace keeps a rival from taking that for death."""
    async with world.daemon(publish_timeout=5.0) as daemon:
        await eventually(daemon.ready.is_set, "the daemon's round")
        inner, started = daemon.publisher._send, asyncio.Event()

        async def slow(batch: Any) -> None:
            started.set()
            await asyncio.sleep(1.5)  # 7 heartbeat intervals
            await inner(batch)

        daemon.publisher._send = slow  # type: ignore[method-assign]
        world.edit("tenants/helix-audio/prod.yml", "max_size:", "max_size: 131 #")
        await asyncio.wait_for(started.wait(), 5)
        with pytest.raises(ActiveWriterError):
            await publish_once(world.settings(), bus=world.bus, deadline=10)
        assert daemon.takeovers == 0


async def test_after_a_key_rotation_versions_go_on_rising(world: World, tmp_path: Path) -> None:
    """The README's rotation: a new key, the old one still in the trust file. Recovery
    believes the trust file's keys too, so the new key's first version follows the old
    key's last, and the old daemon's heartbeats are understood."""
    async with world.daemon() as daemon:
        await eventually(daemon.ready.is_set, "the first round")
        world.edit("tenants/helix-audio/prod.yml", "max_size:", "max_size: 131 #")
        await eventually(lambda: daemon.publisher.states[HELIX].version == 2, "helix v2")
    new_key, _ = generate_keypair("rotated", tmp_path / "new")
    trust = tmp_path / "trust.yml"
    trust.write_text(world.trust.dump(), encoding="utf-8")
    rotated = world.settings(signing_key=new_key, kid="rotated", trust=trust)
    world.edit("tenants/helix-audio/prod.yml", "max_size: 131 #", "max_size: 132 #")
    async with Daemon(rotated, bus=world.bus) as daemon:
        await eventually(lambda: daemon.publisher.states[HELIX].version == 3, "helix v3")
    rotated_key = SigningKey.load(new_key, "rotated")
    world.trust = TrustStore([*world.trust.entries(), *TrustStore.of(rotated_key.public).entries()])
    kids = [e.kid for e in world.events("helix-audio") if e.body.env == "prod"]
    assert world.versions(HELIX) == [1, 2, 3] and kids == ["unit", "unit", "rotated"]


async def test_after_the_key_in_use_is_revoked_a_restart_publishes_above_its_versions(
    world: World, tmp_path: Path
) -> None:
    """A stolen key is revoked and the daemon restarts on a new one: instances run what
    the revoked key signed last and refuse anything not newer, so recovery takes that
    version's number (never its content) and every stream is published above it."""
    async with world.daemon() as daemon:
        await eventually(daemon.ready.is_set, "the first round")
        world.edit("tenants/helix-audio/prod.yml", "max_size:", "max_size: 131 #")
        await eventually(lambda: daemon.publisher.states[HELIX].version == 2, "helix v2")
    new_key, _ = generate_keypair("rotated", tmp_path / "new")
    rotated_key = SigningKey.load(new_key, "rotated")
    (old,) = world.trust.entries()
    trust = TrustStore(
        [dataclasses.replace(old, revoked=True), *TrustStore.of(rotated_key.public).entries()]
    )
    path = tmp_path / "trust.yml"
    path.write_text(trust.dump(), encoding="utf-8")
    async with Daemon(
        world.settings(signing_key=new_key, kid="rotated", trust=path), bus=world.bus
    ) as daemon:
        await eventually(
            lambda: (
                HELIX in daemon.publisher.states and daemon.publisher.states[HELIX].version == 3
            ),
            "helix v3",
        )
        await eventually(lambda: daemon.publisher.states[AURORA].version == 2, "aurora v2")
    world.trust = TrustStore([*world.trust.entries(), *TrustStore.of(rotated_key.public).entries()])
    kids = [e.kid for e in world.events("helix-audio") if e.body.env == "prod"]
    assert world.versions(HELIX) == [1, 2, 3] and kids == ["unit", "unit", "rotated"]
    assert world.versions(AURORA) == [1, 2]  # same content as v1, above it, newly signed


async def test_publish_once_has_a_deadline(world: World) -> None:
    world.bus.down = True
    with pytest.raises(TimeoutError):
        await publish_once(world.settings(), bus=world.bus, deadline=0.3)


async def test_a_fatal_bus_error_at_start_is_raised_not_retried(world: World) -> None:
    fatal = BusError("not authorised")
    fatal.retriable = False
    world.bus.fail_next("admin", fatal)
    with pytest.raises(BusError, match="not authorised"):
        await world.daemon().start()
