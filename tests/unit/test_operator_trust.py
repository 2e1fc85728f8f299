"""Operator keys sign emergency overrides and nothing else, also where the publisher
daemon reads. Its writer heartbeats, its stream heads and its recovery believe
publisher keys only (and a head only within its key's scope), and a snapshot key holds
snapshot-channel events only: an operator key in the trust file cannot keep a daemon
on standby, push a stream's version out of reach, or pass an override off as a
snapshot. The daemon's override keeper still reads operators' overrides. And
`configbus tail` shows an override record as one, verified, instead of rejecting it."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

import configbus.cli_bus
from configbus.bus import KafkaSettings, Record
from configbus.bus.memory import MemoryBus
from configbus.cli_bus import _tail_line, _tail_topic
from configbus.crypto import OPERATOR, PUBLISHER, SigningKey, TrustedKey, generate_keypair
from configbus.errors import VerificationError
from configbus.events import Cause, EventKind, build_body, now_ns, open_envelope, seal
from configbus.ops.overrides import OverrideEntry, encode_set, latest_snapshot
from configbus.publisher.daemon import _recovery_trust
from configbus.publisher.state import (
    MAX_VERSION,
    WRITER_KEY,
    StreamHead,
    WriterBeat,
    open_signed,
    recover,
    seal_signed,
)

from .helpers import eventually
from .test_publisher import AURORA, World

SECOND = 10**9


class Operators:
    """A daemon's world whose trust file also lists two operator keys: alice, for
    aurora-records/prod (the stream under test), and bob, for another tenant only."""

    def __init__(self, tmp_path: Path) -> None:
        self.world = World(tmp_path)
        self.alice = _key("alice", tmp_path)
        self.bob = _key("bob", tmp_path)
        self.trust = self.world.trust.with_key(
            TrustedKey(
                self.alice.public,
                frozenset({AURORA[0]}),
                frozenset({AURORA[1]}),
                role=OPERATOR,
                max_ttl=3600,
            )
        ).with_key(
            TrustedKey(
                self.bob.public, frozenset({"other"}), frozenset({"*"}), role=OPERATOR, max_ttl=3600
            )
        )
        self.trust_file = tmp_path / "trust.yml"
        self.trust_file.write_text(self.trust.dump(), encoding="utf-8")

    async def publish_v1(self) -> None:
        """Every stream of the sample tree at v1, by a daemon that then stops."""
        async with self.world.daemon(trust=self.trust_file) as daemon:
            await eventually(daemon.ready.is_set, "the first publish round")
        assert self.world.versions(AURORA) == [1]

    def override_body(self, version: int, *, env: str = AURORA[1]) -> bytes:
        """An override event for aurora-records, signed by alice (in her scope)."""
        now = now_ns()
        entry = OverrideEntry(
            path="features.new_checkout",
            value=False,
            set_at=now,
            expires_at=now + 600 * SECOND,
            actor="alice",
            reason="INC-1",
        )
        body = build_body(
            tenant=AURORA[0],
            env=env,
            version=version,
            config_json=encode_set([entry]),
            kind=EventKind.OVERRIDE,
            detected_at=now,
            issued_at=now,
            expires_at=entry.expires_at,
            cause=Cause(actor="alice", reason="INC-1"),
        )
        return seal(body, self.alice)


def _key(kid: str, tmp_path: Path) -> SigningKey:
    return SigningKey.load(generate_keypair(kid, tmp_path / "ops")[0], kid)


@pytest.fixture
def ops(tmp_path: Path) -> Operators:
    return Operators(tmp_path)


# -- the daemon believes operators for overrides only ------------------------------------


def test_the_daemon_reads_overrides_with_every_key_and_its_own_records_with_publishers(
    ops: Operators,
) -> None:
    daemon = ops.world.daemon(trust=ops.trust_file)

    assert daemon.trust.kids == ["unit"]
    assert daemon.override_trust.kids == ["alice", "bob", "unit"]
    assert daemon.overrides.trust is daemon.override_trust


async def test_an_operator_heartbeat_does_not_keep_a_fresh_daemon_on_standby(
    ops: Operators, caplog: pytest.LogCaptureFixture
) -> None:
    beat = WriterBeat(writer="bob-was-here", at=time.time_ns(), interval=1.0, grace=1e9)
    await ops.world.put(ops.world.topics.state, WRITER_KEY, seal_signed(beat, ops.bob))
    daemon = ops.world.daemon(trust=ops.trust_file)

    try:
        # Believed, the beat would hold start() on standby for 1e9 seconds.
        async with asyncio.timeout(5):
            await daemon.start()
        assert daemon.active.is_set()
    finally:
        await daemon.stop()
    assert "ignoring a writer heartbeat that does not verify" in caplog.text


def test_open_signed_refuses_an_operator_key_even_when_the_store_lists_it(
    ops: Operators,
) -> None:
    beat = WriterBeat(writer="bob-was-here", at=time.time_ns(), interval=1.0, grace=1e9)
    head = StreamHead(
        tenant=AURORA[0], env=AURORA[1], version=7, config_hash="x", issued_at=now_ns()
    )

    with pytest.raises(VerificationError, match="operator key") as beat_error:
        open_signed(seal_signed(beat, ops.bob), ops.trust, WriterBeat)
    with pytest.raises(VerificationError, match="operator key") as head_error:
        open_signed(seal_signed(head, ops.alice), ops.trust, StreamHead)  # in her scope

    assert beat_error.value.reason == head_error.value.reason == "untrusted_scope"


async def test_an_operator_head_does_not_push_a_stream_out_of_reach(ops: Operators) -> None:
    await ops.publish_v1()
    head = StreamHead(
        tenant=AURORA[0], env=AURORA[1], version=MAX_VERSION, config_hash="x", issued_at=now_ns()
    )
    await ops.world.put(
        ops.world.topics.state, b"aurora-records/prod", seal_signed(head, ops.alice)
    )

    async with ops.world.daemon(trust=ops.trust_file) as daemon:
        assert daemon.publisher.states[AURORA].version == 1  # recovered before start returns
        ops.world.edit("tenants/aurora-records/prod.yml", "max_size:", "max_size: 251 #")
        await eventually(lambda: daemon.publisher.states[AURORA].version == 2, "aurora v2")

    assert ops.world.versions(AURORA) == [1, 2]


async def test_a_head_outside_its_publisher_keys_scope_is_skipped(
    ops: Operators, tmp_path: Path
) -> None:
    await ops.publish_v1()
    helix_only = _key("helix-publisher", tmp_path)
    trust = ops.world.trust.with_key(
        TrustedKey(helix_only.public, frozenset({"helix-audio"}), frozenset({"*"}), role=PUBLISHER)
    )
    trust_file = tmp_path / "helix-trust.yml"
    trust_file.write_text(trust.dump(), encoding="utf-8")
    head = StreamHead(
        tenant=AURORA[0], env=AURORA[1], version=MAX_VERSION, config_hash="x", issued_at=now_ns()
    )
    await ops.world.put(
        ops.world.topics.state, b"aurora-records/prod", seal_signed(head, helix_only)
    )

    recovery = await recover(
        ops.world.bus, ops.world.topics, _recovery_trust(ops.world.key, trust_file)
    )

    assert recovery.states[AURORA].version == 1
    assert recovery.skipped == {"untrusted_scope": 1}


# -- a snapshot key holds snapshots only --------------------------------------------------


async def test_an_override_under_the_snapshot_key_is_not_recovered_as_a_version(
    ops: Operators,
) -> None:
    await ops.publish_v1()
    topic = ops.world.topics.tenant_topic(AURORA[0])
    await ops.world.put(topic, b"prod", ops.override_body(10**15))  # the snapshot's key

    async with ops.world.daemon(trust=ops.trust_file) as daemon:
        assert daemon.publisher.states[AURORA].version == 1
        ops.world.edit("tenants/aurora-records/prod.yml", "max_size:", "max_size: 251 #")
        await eventually(lambda: daemon.publisher.states[AURORA].version == 2, "aurora v2")

    events = [open_envelope(r.value or b"", ops.trust) for r in ops.world.bus.records(topic)]
    published = [(e.kid, e.body.kind, e.body.version) for e in events if e.body.env == AURORA[1]]
    assert published == [
        ("unit", EventKind.SNAPSHOT, 1),
        ("alice", EventKind.OVERRIDE, 10**15),
        ("unit", EventKind.SNAPSHOT, 2),
    ]


async def test_recovery_refuses_an_override_under_the_snapshot_key_whoever_is_trusted(
    ops: Operators,
) -> None:
    await ops.publish_v1()
    topic = ops.world.topics.tenant_topic(AURORA[0])
    await ops.world.put(topic, b"prod", ops.override_body(10**15))

    # Even with alice trusted (her override is genuine, only under the wrong key).
    recovery = await recover(ops.world.bus, ops.world.topics, ops.trust)

    assert recovery.states[AURORA].version == 1
    assert recovery.skipped == {"wrong_channel": 1}


async def test_the_latest_snapshot_is_never_an_override_under_the_snapshot_key(
    ops: Operators,
) -> None:
    await ops.publish_v1()
    topic = ops.world.topics.tenant_topic(AURORA[0])
    await ops.world.put(topic, b"prod", ops.override_body(10**15))

    snapshot = await latest_snapshot(ops.world.bus, ops.world.topics, *AURORA, ops.trust)

    assert snapshot is not None
    assert (snapshot.kid, snapshot.body.kind, snapshot.body.version) == (
        "unit",
        EventKind.SNAPSHOT,
        1,
    )


# -- configbus tail -------------------------------------------------------------------------


def _snapshot(ops: Operators, version: int, env: str = AURORA[1]) -> bytes:
    body = build_body(
        tenant=AURORA[0],
        env=env,
        version=version,
        config_json=json.dumps({"pool": version}).encode(),
        detected_at=now_ns(),
        cause=Cause(actor="publisher"),
    )
    return seal(body, ops.world.key)


def _record(offset: int, key: bytes, value: bytes) -> Record:
    return Record("t.aurora-records", 0, offset, key, value, (), 0)


def test_tail_shows_an_override_record_as_a_verified_override(ops: Operators) -> None:
    last: dict[tuple[str, str], int] = {}

    snapshot, ok_snapshot = _tail_line(
        _record(0, b"prod", _snapshot(ops, 1)), ops.trust, last, AURORA[0]
    )
    override, ok_override = _tail_line(
        _record(1, b"prod/override", ops.override_body(1)), ops.trust, last, AURORA[0]
    )

    assert ok_snapshot and ok_override, override
    assert " prod     v1 " in snapshot
    assert " prod     override v1 " in override  # v1 of its own channel: not stale
    assert "verified:alice" in override
    assert "overrides: features.new_checkout until " in override
    assert "REJECTED" not in override


def test_tail_rejects_a_record_under_another_channels_key(ops: Operators) -> None:
    snapshot_as_override, ok_snapshot = _tail_line(
        _record(0, b"prod/override", _snapshot(ops, 2)), ops.trust, {}, AURORA[0]
    )
    override_as_snapshot, ok_override = _tail_line(
        _record(1, b"prod", ops.override_body(3)), ops.trust, {}, AURORA[0]
    )

    assert not ok_snapshot and "REJECTED wrong_channel" in snapshot_as_override
    assert not ok_override and "REJECTED wrong_channel" in override_as_snapshot


async def test_tail_of_one_environment_shows_its_overrides_and_exits_0(
    ops: Operators, monkeypatch: pytest.MonkeyPatch
) -> None:
    bus = MemoryBus()
    topic = ops.world.topics.tenant_topic(AURORA[0])
    bus.create_topic(topic, compact=True)
    async with bus.producer() as producer:
        await producer.send_and_wait(topic, _snapshot(ops, 1), key=b"prod")
        await producer.send_and_wait(topic, _snapshot(ops, 1, env="dev"), key=b"dev")
        await producer.send_and_wait(topic, ops.override_body(1), key=b"prod/override")

    def read(kafka: KafkaSettings, topics: Sequence[str]) -> AsyncIterator[Record]:
        return bus.read_to_end(topics)

    monkeypatch.setattr(configbus.cli_bus, "Admin", lambda kafka: bus.admin())
    monkeypatch.setattr(configbus.cli_bus, "read_to_end", read)
    out = io.StringIO()

    code = await _tail_topic(
        KafkaSettings("unused:9092"), AURORA[0], topic, ops.trust, "prod", False, out
    )

    lines = out.getvalue().splitlines()
    assert code == 0, lines
    assert len(lines) == 2, lines  # dev's record is left out
    assert " v1 " in lines[0] and " override v1 " in lines[1]
