"""Emergency overrides on the in-memory bus: written by an operator key straight to the
stream's override channel, composed on top of the snapshot by every subscriber, refused
(and acknowledged so) when the key's scope or max_ttl does not cover them, and dropped
at their expiry by the subscriber's own clock."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from configbus.bus import OVERRIDE_CHANNEL, TopicNames
from configbus.bus.memory import MemoryBus
from configbus.crypto import OPERATOR, SigningKey, TrustedKey, TrustStore, generate_keypair
from configbus.errors import ConfigBusError, KeyringError, VerificationError
from configbus.events import (
    Cause,
    EventKind,
    build_body,
    now_ns,
    open_envelope,
    seal,
)
from configbus.ops.overrides import (
    OverrideEntry,
    compose,
    encode_set,
    parse_overrides,
    read_overrides,
    write_overrides,
)
from configbus.subscriber import ConfigSubscriber, SubscriberSettings
from configbus.tree.values import FrozenDict, SecretRef

from .helpers import OnMemoryBus, eventually

TENANT, ENV = "acme", "prod"
TOPICS = TopicNames(prefix="t.", audit="audit", acks="acks", state="state")
TOPIC = TOPICS.tenant_topic(TENANT)
SECOND = 10**9


def override_value(
    key: SigningKey,
    entries: list[OverrideEntry] | bytes,
    *,
    issued_at: int,
    expires_at: int | None = None,
    version: int = 1,
) -> bytes:
    """A signed override record of `entries` (or of raw JSON bytes) for acme/prod."""
    content = entries if isinstance(entries, bytes) else encode_set(entries)
    if expires_at is None:
        assert not isinstance(entries, bytes)
        expires_at = max(e.expires_at for e in entries)
    body = build_body(
        tenant=TENANT,
        env=ENV,
        version=version,
        config_json=content,
        kind=EventKind.OVERRIDE,
        detected_at=issued_at,
        issued_at=issued_at,
        cause=Cause(actor=key.kid),
        expires_at=expires_at,
    )
    return seal(body, key)


class Fleet(OnMemoryBus):
    """A tenant topic on a MemoryBus with a snapshot, the publisher's key, and operator
    keys: one for this tenant (max_ttl 1h), one for another tenant only."""

    tenant, env, topics = TENANT, ENV, TOPICS

    def __init__(self, tmp_path: Path) -> None:
        def key(kid: str) -> SigningKey:
            return SigningKey.load(generate_keypair(kid, tmp_path / "keys")[0], kid)

        self.publisher, self.alice, self.bob = key("pub"), key("alice"), key("bob")
        everything = frozenset({"*"})
        self.trust = TrustStore(
            [
                TrustedKey(self.publisher.public, everything, everything),
                TrustedKey(
                    self.alice.public,
                    frozenset({TENANT}),
                    frozenset({ENV}),
                    role=OPERATOR,
                    max_ttl=3600,
                ),
                TrustedKey(
                    self.bob.public, frozenset({"other"}), everything, role=OPERATOR, max_ttl=3600
                ),
            ]
        )
        self.tmp = tmp_path
        self.bus = MemoryBus()
        for topic, compact in ((TOPIC, True), (TOPICS.acks, True), (TOPICS.audit, False)):
            self.bus.create_topic(topic, compact=compact)

    async def publish(self, version: int, config: dict[str, Any]) -> None:
        body = build_body(
            tenant=TENANT,
            env=ENV,
            version=version,
            config_json=json.dumps(config, sort_keys=True, separators=(",", ":")).encode(),
            detected_at=now_ns(),
            cause=Cause(actor="publisher"),
        )
        async with self.bus.producer() as producer:
            await producer.send_and_wait(TOPIC, seal(body, self.publisher), key=ENV.encode())

    async def override(
        self,
        values: dict[str, Any],
        *,
        ttl: float = 600,
        key: SigningKey | None = None,
        clear: tuple[str, ...] = (),
    ) -> int:
        """Set `values` (and clear `clear`) as `key` (alice); the version written."""

        def change(kept: tuple[OverrideEntry, ...], now: int) -> tuple[OverrideEntry, ...]:
            entries = {e.path: e for e in kept if e.path not in clear}
            for path, value in values.items():
                entries[path] = OverrideEntry(
                    path=path,
                    value=value,
                    set_at=now,
                    expires_at=now + int(ttl * SECOND),
                    actor=(key or self.alice).kid,
                    reason="INC-1",
                )
            return tuple(entries.values())

        written = await write_overrides(
            self.bus,
            TOPICS,
            TENANT,
            ENV,
            key=key or self.alice,
            trust=self.trust,
            change=change,
            cause=Cause(actor="alice", reason="INC-1"),
        )
        return written.version

    async def raw_override(
        self,
        key: SigningKey,
        values: dict[str, Any],
        *,
        ttl: float = 600,
        version: int = 1,
        issued_at: int | None = None,
    ) -> None:
        """An override record as a hostile or misconfigured tool writes it, past every
        check `write_overrides` makes."""
        now = issued_at or now_ns()
        entries = [
            OverrideEntry(path=path, value=value, set_at=now, expires_at=now + int(ttl * SECOND))
            for path, value in values.items()
        ]
        value = override_value(key, entries, issued_at=now, version=version)
        async with self.bus.producer() as producer:
            await producer.send_and_wait(TOPIC, value, key=b"prod/override")


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet(tmp_path)


@pytest.fixture
async def running(fleet: Fleet) -> AsyncIterator[ConfigSubscriber]:
    await fleet.publish(1, {"features": {"checkout": True, "search": True}, "pool": 10})
    subscriber = fleet.subscriber()
    await subscriber.start()
    yield subscriber
    await subscriber.stop()


def has_override(version: int) -> Any:
    return lambda snapshot: snapshot.override_version >= version


async def test_an_override_goes_on_top_of_the_snapshot_and_is_acknowledged(
    fleet: Fleet, running: ConfigSubscriber
) -> None:
    seen: list[list[str]] = []
    running.on_change("features", lambda old, new, paths: seen.append(paths))

    version = await fleet.override({"features.checkout": False})
    snapshot = await running.wait_for(has_override(version), timeout=5)

    assert snapshot.config.get("features.checkout") is False
    assert snapshot.config.get("features.search") is True  # the rest of the snapshot stays
    assert (snapshot.version, snapshot.override_version) == (1, 1)
    assert [(e.path, e.actor, e.reason) for e in running.overrides] == [
        ("features.checkout", "alice", "INC-1")
    ]
    assert seen == [["features.checkout"]]
    ack = await eventually(
        lambda: next((a for a in fleet.acks() if a.channel == OVERRIDE_CHANNEL), None),
        "the override's ack",
    )
    assert (ack.status, ack.version, ack.instance) == ("applied", 1, "i-1")


async def test_a_new_snapshot_keeps_the_override_on_top(
    fleet: Fleet, running: ConfigSubscriber
) -> None:
    await running.wait_for(has_override(await fleet.override({"pool": 99})), timeout=5)

    await fleet.publish(2, {"features": {"checkout": False}, "pool": 20})
    snapshot = await running.wait_for(lambda s: s.version == 2, timeout=5)

    assert (snapshot.config.get("pool"), snapshot.config.get("features.checkout")) == (99, False)


async def test_clearing_an_override_returns_to_the_snapshot(
    fleet: Fleet, running: ConfigSubscriber
) -> None:
    await running.wait_for(has_override(await fleet.override({"pool": 99, "x.y": 1})), 5)

    version = await fleet.override({}, clear=("pool",))
    snapshot = await running.wait_for(has_override(version), timeout=5)

    assert (snapshot.config.get("pool"), snapshot.config.get("x.y")) == (10, 1)
    assert [e.path for e in snapshot.overrides] == ["x.y"]


async def test_an_override_expires_by_the_subscribers_own_clock(
    fleet: Fleet, running: ConfigSubscriber
) -> None:
    changes: list[list[str]] = []
    running.on_change("", lambda old, new, paths: changes.append(paths))
    await fleet.override({"pool": 99}, ttl=0.5)
    await running.wait_for(lambda s: s.config.get("pool") == 99, timeout=5)

    # Nothing else runs or publishes: the subscriber drops it when it expires.
    snapshot = await running.wait_for(lambda s: not s.overrides, timeout=5)

    assert snapshot.config.get("pool") == 10
    assert changes == [["pool"], ["pool"]]
    assert snapshot.override_version == 1  # the record stays; its entry is out of effect


async def test_an_operator_key_out_of_scope_is_refused_and_the_refusal_acknowledged(
    fleet: Fleet, running: ConfigSubscriber
) -> None:
    await fleet.raw_override(fleet.bob, {"pool": 1})  # bob may override tenant "other" only

    ack = await eventually(
        lambda: next((a for a in fleet.acks() if a.status == "rejected"), None), "a refusal"
    )

    assert (ack.channel, ack.instance) == (OVERRIDE_CHANNEL, "i-1")
    assert ack.reason.startswith("untrusted_scope")
    assert running.config.get("pool") == 10 and not running.overrides


async def test_an_override_longer_than_the_keys_max_ttl_is_refused(
    fleet: Fleet, running: ConfigSubscriber
) -> None:
    await fleet.raw_override(fleet.alice, {"pool": 1}, ttl=2 * 3600)  # alice's max_ttl is 1h

    ack = await eventually(
        lambda: next((a for a in fleet.acks() if a.status == "rejected"), None), "a refusal"
    )

    assert ack.reason.startswith("ttl_too_long")
    assert running.rejected == {"ttl_too_long": 1}
    assert running.config.get("pool") == 10


def test_an_operator_key_cannot_sign_a_snapshot(fleet: Fleet) -> None:
    body = build_body(
        tenant=TENANT, env=ENV, version=9, config_json=b"{}", detected_at=0, cause=Cause()
    )

    with pytest.raises(VerificationError) as refused:
        open_envelope(seal(body, fleet.alice), fleet.trust, stream=(TENANT, ENV))

    assert refused.value.reason == "untrusted_scope"
    assert "signs overrides only" in str(refused.value)


def test_an_override_issued_in_the_future_is_refused(fleet: Fleet) -> None:
    later = now_ns() + 3600 * SECOND  # would stretch the override past max_ttl from now
    entry = OverrideEntry(path="pool", value=1, set_at=later, expires_at=later + SECOND)

    with pytest.raises(VerificationError) as refused:
        open_envelope(override_value(fleet.alice, [entry], issued_at=later), fleet.trust)

    assert refused.value.reason == "issued_in_future"


def test_a_record_under_the_wrong_channel_key_is_refused(fleet: Fleet) -> None:
    body = build_body(
        tenant=TENANT, env=ENV, version=1, config_json=b"{}", detected_at=0, cause=Cause()
    )

    with pytest.raises(VerificationError) as refused:
        open_envelope(seal(body, fleet.publisher), fleet.trust, channel=OVERRIDE_CHANNEL)

    assert refused.value.reason == "wrong_channel"


@pytest.mark.parametrize(
    ("entries", "reason", "text"),
    [
        ([{"path": "a", "value": {"$secret": "db"}}], "malformed", "cannot set a secret"),
        ([{"path": "a", "value": 1}, {"path": "a", "value": 2}], "malformed", "listed twice"),
        ([{"path": "", "value": 1}], "malformed", "not a key"),
        ([{"path": "a..b", "value": 1}], "malformed", "not a key"),
        ([{"path": f"k{n}", "value": n} for n in range(300)], "too_large", "300 overrides"),
    ],
)
def test_an_override_set_that_breaks_the_rules_is_refused(
    fleet: Fleet, entries: list[dict[str, Any]], reason: str, text: str
) -> None:
    now = now_ns()
    document = {"entries": [e | {"set_at": now, "expires_at": now + SECOND} for e in entries]}
    value = override_value(
        fleet.alice, json.dumps(document).encode(), issued_at=now, expires_at=now + SECOND
    )
    event = open_envelope(value, fleet.trust)

    with pytest.raises(VerificationError) as refused:
        parse_overrides(event)

    assert refused.value.reason == reason
    assert text in str(refused.value)


def test_compose_copies_only_the_paths_it_sets() -> None:
    shared = FrozenDict({"deep": FrozenDict({"x": 1})})
    data = FrozenDict({"a": FrozenDict({"b": 1, "c": 2}), "other": shared, "list": (1, 2, 3)})

    result = compose(data, [(("a", "b"), 9), (("new", "key"), "v"), (("list", 1), 7)])

    assert result == {
        "a": {"b": 9, "c": 2},
        "other": {"deep": {"x": 1}},
        "list": (1, 7, 3),
        "new": {"key": "v"},
    }
    assert result["other"] is shared
    assert data["a"]["b"] == 1  # the snapshot itself is untouched


async def test_two_operators_at_once_keep_both_overrides(fleet: Fleet) -> None:
    await fleet.publish(1, {"pool": 10})

    await asyncio.gather(fleet.override({"a": 1}), fleet.override({"b": 2}))

    state = await read_overrides(fleet.bus, TOPICS, TENANT, ENV, fleet.trust)
    assert state is not None
    assert state.version == 2
    assert sorted(e.path for e in state.entries) == ["a", "b"]
    audit = list(fleet.bus.records(TOPICS.audit))
    assert len(audit) == 2  # both writes are on the audit trail


async def test_writing_the_same_set_again_publishes_nothing(fleet: Fleet) -> None:
    await fleet.publish(1, {"pool": 10})
    await fleet.override({"a": 1})

    assert await fleet.override({}) == 0


async def test_a_restarted_subscriber_without_kafka_keeps_the_override_from_its_cache(
    fleet: Fleet, tmp_path: Path
) -> None:
    await fleet.publish(1, {"pool": 10})
    await fleet.override({"pool": 99})
    first = fleet.subscriber(cache_dir=tmp_path / "cache")
    async with first:
        await first.wait_for(lambda s: s.config.get("pool") == 99, timeout=5)
    await eventually(lambda: (tmp_path / "cache" / f"{TENANT}.{ENV}.override").exists(), "cache")

    fleet.bus.down = True
    again = fleet.subscriber(cache_dir=tmp_path / "cache", offline_grace=0.2)
    async with again:
        assert (again.source, again.config.get("pool"), again.snapshot.override_version) == (
            "cache",
            99,
            1,
        )


async def test_an_override_before_any_snapshot_applies_with_the_first_snapshot(
    fleet: Fleet,
) -> None:
    fleet.bus.create_topic(TOPIC, compact=True)
    await fleet.override({"pool": 99})
    subscriber = fleet.subscriber(start_timeout=5)
    starting = asyncio.create_task(subscriber.start())
    await fleet.publish(1, {"pool": 10})
    await starting
    try:
        assert (subscriber.config.get("pool"), subscriber.snapshot.override_version) == (99, 1)
    finally:
        await subscriber.stop()


# -- the trust file -------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_the_trust_file_lists_operators_with_their_scope_and_max_ttl(tmp_path: Path) -> None:
    _, public = generate_keypair("alice", tmp_path)
    path = _write(
        tmp_path / "trust.yml",
        "operators:\n  - kid: alice\n    public_key_file: alice.pub\n"
        "    tenants: [acme]\n    environments: [prod]\n    max_ttl: 1h30m\n",
    )

    trust = TrustStore.load(path)
    entry = trust.get("alice")

    assert entry is not None
    assert (entry.role, entry.max_ttl, entry.covers("acme", "prod")) == (OPERATOR, 5400, True)
    assert entry.covers("acme", "dev") is False
    again = TrustStore.load(_write(tmp_path / "again.yml", trust.dump()))
    assert again.get("alice") == entry
    del public


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("", "an operator key needs max_ttl"),
        ("    max_ttl: soon\n", "max_ttl: 'soon' is not a duration"),
        ("    max_ttl: 0s\n", "max_ttl must be positive"),
        (
            "    max_ttl: 1h\n    role: publisher\n",
            "role 'publisher' does not belong in the operators list",
        ),
    ],
)
def test_a_bad_operator_entry_names_the_file_and_key(
    tmp_path: Path, entry: str, message: str
) -> None:
    generate_keypair("alice", tmp_path)
    path = _write(
        tmp_path / "trust.yml",
        "operators:\n  - kid: alice\n    public_key_file: alice.pub\n"
        "    tenants: [acme]\n    environments: [prod]\n" + entry,
    )

    with pytest.raises(KeyringError) as error:
        TrustStore.load(path)

    assert str(error.value).startswith(f"{path}: operator 'alice': ")
    assert message in str(error.value)


# -- the daemon publishes each expiry ---------------------------------------------------


async def _daemon_world(tmp_path: Path) -> tuple[Any, SigningKey, TrustStore, Path]:
    from .test_publisher import World

    world = World(tmp_path)
    alice = SigningKey.load(generate_keypair("alice", tmp_path / "ops")[0], "alice")
    trust = world.trust.with_key(
        TrustedKey(
            alice.public,
            frozenset({"aurora-records"}),
            frozenset({"prod"}),
            role=OPERATOR,
            max_ttl=3600,
        )
    )
    trust_file = tmp_path / "trust.yml"
    trust_file.write_text(trust.dump())
    return world, alice, trust, trust_file


async def _short_override(world: Any, alice: SigningKey, trust: TrustStore, ttl: float) -> int:
    def change(kept: tuple[OverrideEntry, ...], now: int) -> tuple[OverrideEntry, ...]:
        entry = OverrideEntry(
            path="features.new_checkout",
            value=False,
            set_at=now,
            expires_at=now + int(ttl * SECOND),
            actor="alice",
            reason="INC-2",
        )
        return (*kept, entry)

    written = await write_overrides(
        world.bus,
        world.topics,
        "aurora-records",
        "prod",
        key=alice,
        trust=trust,
        change=change,
        cause=Cause(actor="alice", reason="INC-2"),
    )
    return written.version


def _override_events(world: Any, trust: TrustStore) -> list[Any]:
    topic = world.topics.tenant_topic("aurora-records")
    return [
        open_envelope(r.value or b"", trust)
        for r in world.bus.records(topic)
        if r.key == b"prod/override"
    ]


async def test_the_daemon_publishes_an_override_expiry_to_the_topic_and_the_audit_trail(
    tmp_path: Path,
) -> None:
    world, alice, trust, trust_file = await _daemon_world(tmp_path)
    async with world.daemon(trust=trust_file) as daemon:
        await eventually(lambda: ("aurora-records", "prod") in daemon.publisher.states, "v1")
        await _short_override(world, alice, trust, ttl=0.3)

        await eventually(lambda: daemon.overrides.expiries_published == 1, "the expiry")

    first, expiry = _override_events(world, trust)
    assert (first.kid, first.body.version, first.body.cause.actor) == ("alice", 1, "alice")
    assert (expiry.kid, expiry.body.version) == ("unit", 2)
    assert expiry.body.cause.reason == "override expired: features.new_checkout"
    assert expiry.body.changed_paths == ("features.new_checkout",)
    assert parse_overrides(expiry).entries == ()
    audited = [
        open_envelope(r.value or b"", trust).body
        for r in world.bus.records(world.topics.audit)
        if r.key == b"aurora-records/prod"
    ]
    assert [(b.kind, b.version) for b in audited if b.kind is EventKind.OVERRIDE] == [
        (EventKind.OVERRIDE, 1),
        (EventKind.OVERRIDE, 2),
    ]


async def test_a_daemon_started_after_an_override_expired_publishes_the_expiry(
    tmp_path: Path,
) -> None:
    world, alice, trust, trust_file = await _daemon_world(tmp_path)
    async with world.daemon(trust=trust_file) as daemon:
        await eventually(lambda: ("aurora-records", "prod") in daemon.publisher.states, "v1")
    expires = now_ns() + SECOND // 20
    await _short_override(world, alice, trust, ttl=0.05)  # set and expired while it is down
    await eventually(lambda: now_ns() > expires, "the override to run out")

    async with world.daemon(trust=trust_file) as daemon:
        await eventually(lambda: daemon.overrides.expiries_published == 1, "the expiry")

    assert [e.body.version for e in _override_events(world, trust)] == [1, 2]


async def test_a_standby_daemon_does_not_publish_expiries(tmp_path: Path) -> None:
    world, alice, trust, trust_file = await _daemon_world(tmp_path)
    async with world.daemon(trust=trust_file) as daemon:
        await eventually(lambda: ("aurora-records", "prod") in daemon.publisher.states, "v1")
        daemon.active.clear()  # as when another writer took over
        await _short_override(world, alice, trust, ttl=0.05)
        await eventually(lambda: daemon.overrides.states, "the override learned")
        expired = now_ns() + SECOND // 20
        await eventually(lambda: now_ns() > expired, "the override to run out")
        polls = daemon.overrides.rounds
        # Several polls past the expiry, each of which would have published it.
        await eventually(lambda: daemon.overrides.rounds >= polls + 3, "three more polls")

        assert daemon.overrides.expiries_published == 0
        daemon.active.set()
        await eventually(lambda: daemon.overrides.expiries_published == 1, "the expiry")


async def test_history_lists_overrides_beside_snapshots_without_mixing_their_numbers(
    fleet: Fleet,
) -> None:
    from configbus.ops import stream_history

    for version, pool in ((1, 10), (2, 20)):
        body = build_body(
            tenant=TENANT,
            env=ENV,
            version=version,
            config_json=json.dumps({"pool": pool}).encode(),
            detected_at=now_ns(),
            cause=Cause(actor="publisher"),
        )
        async with fleet.bus.producer() as producer:
            value = seal(body, fleet.publisher)
            await producer.send_and_wait(TOPIC, value, key=ENV.encode())
            await producer.send_and_wait(TOPICS.audit, value, key=b"acme/prod")
        if version == 1:
            await fleet.override({"pool": 99})  # override v1, between snapshots v1 and v2

    history = await stream_history(fleet.bus, TOPICS, TENANT, ENV, fleet.trust)

    assert [(e.channel, e.version, e.kind) for e in history.versions] == [
        ("snapshot", 1, "snapshot"),
        (OVERRIDE_CHANNEL, 1, "override"),
        ("snapshot", 2, "snapshot"),
    ]
    assert history.get(1).config() == {"pool": 10}  # snapshot v1, not override v1
    assert history.latest is not None and history.latest.version == 2
    assert history.versions[1].as_dict()["channel"] == OVERRIDE_CHANNEL


# -- what the review of overrides found ----------------------------------------------


async def test_a_writer_refuses_what_subscribers_would_refuse_and_writes_nothing(
    fleet: Fleet,
) -> None:
    await fleet.publish(1, {"pool": 10})

    with pytest.raises(ConfigBusError, match=r"subscribers would refuse.*untrusted_scope"):
        await fleet.override({"pool": 1}, key=fleet.bob)
    with pytest.raises(ConfigBusError, match="may not sign an override set that runs until"):
        await fleet.override({"pool": 1}, ttl=2 * 3600)

    assert [r for r in fleet.bus.records(TOPIC) if r.key == b"prod/override"] == []


async def test_a_short_ttl_key_cannot_carry_a_longer_override_and_says_whose(
    fleet: Fleet,
) -> None:
    await fleet.publish(1, {"pool": 10})
    carol = SigningKey.load(generate_keypair("carol", fleet.tmp / "c")[0], "carol")
    fleet.trust = fleet.trust.with_key(
        TrustedKey(carol.public, frozenset({TENANT}), frozenset({ENV}), OPERATOR, 4 * 3600)
    )
    await fleet.override({"pool": 99}, ttl=3 * 3600, key=carol)

    with pytest.raises(ConfigBusError) as refused:
        await fleet.override({"other": 1}, ttl=600)  # alice: max_ttl 1h

    assert "key 'alice' may not sign" in str(refused.value)
    assert "(the override of pool by carol): clear that override first" in str(refused.value)
    # Clearing it is within alice's reach: the set then ends sooner.
    assert await fleet.override({}, clear=("pool",)) == 2


async def test_junk_on_the_override_key_wedges_no_writer_and_moves_no_version(
    fleet: Fleet, running: ConfigSubscriber
) -> None:
    await running.wait_for(has_override(await fleet.override({"pool": 99})), timeout=5)
    junk = msgspec.msgpack.encode(
        {"v": 1, "kid": "pub", "sig": b"x" * 64, "body": msgspec.msgpack.encode({"version": 10**6})}
    )
    async with fleet.bus.producer() as producer:
        await producer.send_and_wait(TOPIC, junk, key=b"prod/override")

    version = await fleet.override({}, clear=("pool",))

    assert version == 2  # built on the last record that verifies, not on the junk's claim
    snapshot = await running.wait_for(has_override(2), timeout=5)
    assert snapshot.config.get("pool") == 10 and running.rejected == {"bad_signature": 1}


async def test_a_publisher_signed_override_may_end_overrides_but_not_set_one(
    fleet: Fleet, running: ConfigSubscriber
) -> None:
    await running.wait_for(has_override(await fleet.override({"pool": 99})), timeout=5)

    await fleet.raw_override(fleet.publisher, {"pool": 99, "x": 1}, version=2)

    ack = await eventually(
        lambda: next((a for a in fleet.acks() if a.status == "rejected"), None), "a refusal"
    )
    assert ack.reason == "untrusted_scope: key 'pub' may end overrides, not set them"
    assert running.config.get("x") is None and running.snapshot.override_version == 1


async def test_an_expiry_waits_for_a_slow_callback_of_the_apply_before_it(
    fleet: Fleet, running: ConfigSubscriber
) -> None:
    seen: list[int] = []
    release = asyncio.Event()

    async def slow(old: Any, new: Any, paths: list[str]) -> None:
        if new.get("pool") == 99:
            await release.wait()  # still busy with the override when it expires
        seen.append(new.get("pool"))

    running.on_change("pool", slow)
    await fleet.override({"pool": 99}, ttl=0.2)
    await eventually(lambda: running.config.get("pool") == 99, "the override")
    await eventually(lambda: not running.snapshot.override.active(now_ns()), "its expiry time")
    release.set()

    await eventually(lambda: len(seen) == 2, "both callbacks")
    assert seen == [99, 10]  # in the order the configs were applied
    assert running.config.get("pool") == 10


async def test_an_expiry_that_falls_between_two_readings_of_the_clock_is_not_lost(
    fleet: Fleet, running: ConfigSubscriber, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fleet.override({"pool": 99})
    (entry,) = (await running.wait_for(lambda s: bool(s.overrides), timeout=5)).overrides
    # The timer fires a hair early (uvloop counts whole milliseconds), and each reading
    # of the clock is 1 ns after the one before: the expiry finds the entry in effect
    # (1 ns to go), the rescheduling right after finds it expired.
    ticks = itertools.count(entry.expires_at - 1)
    monkeypatch.setattr("configbus.subscriber.core.now_ns", lambda: next(ticks))
    assert running._expiry is not None
    running._expiry.cancel()
    running._start_expiry()  # the timer fires

    snapshot = await running.wait_for(lambda s: not s.overrides, timeout=5)
    assert snapshot.config.get("pool") == 10


async def test_an_expiry_due_while_the_callbacks_of_the_one_before_run_is_not_lost(
    fleet: Fleet, running: ConfigSubscriber
) -> None:
    release = asyncio.Event()

    async def slow(old: Any, new: Any, paths: list[str]) -> None:
        if paths == ["pool"]:
            await release.wait()  # still in the first expiry when the second is due

    await fleet.override({"pool": 99}, ttl=0.3)
    await fleet.override({"features.search": False}, ttl=0.4)
    await running.wait_for(lambda s: len(s.overrides) == 2, timeout=5)
    running.on_change("", slow)
    await eventually(lambda: running.config.get("pool") == 10, "the first expiry")
    await eventually(lambda: running._expiry is None, "the second expiry's timer to fire")
    release.set()

    snapshot = await running.wait_for(lambda s: not s.overrides, timeout=5)
    assert snapshot.config.get("features.search") is True


@pytest.mark.parametrize(
    ("path", "value", "text"),
    [
        ("database.password", "hunter2", "cannot set a secret"),
        ("database", {"api_key": "k"}, "cannot set a secret"),
        ("password.$secret", "kafka/sasl", "a part starts with $"),
        (".".join(["a"] * 40), 1, "too deep"),
    ],
)
def test_an_override_cannot_set_a_secret_nor_go_too_deep(
    fleet: Fleet, path: str, value: Any, text: str
) -> None:
    now = now_ns()
    entry = OverrideEntry(path=path, value=value, set_at=now, expires_at=now + SECOND)
    record = override_value(fleet.alice, [entry], issued_at=now)

    with pytest.raises(VerificationError, match=re.escape(text)):
        parse_overrides(open_envelope(record, fleet.trust))


@pytest.mark.parametrize(
    ("path", "text"),
    [
        (("list", 5), "the list has no item 5"),
        (("scalar", "below"), "goes through a value that is not a mapping"),
        (("secret",), "would replace a secret"),
        (("secret", "x"), "reach into a secret"),
    ],
)
def test_compose_never_changes_the_shape_of_the_config(path: tuple[Any, ...], text: str) -> None:
    data = FrozenDict({"list": (1, 2, 3), "scalar": 5, "secret": SecretRef("db/password")})

    with pytest.raises(VerificationError, match=re.escape(text)):
        compose(data, [(path, 1)])


def test_an_entry_set_after_its_event_or_all_entries_over_the_node_limit_are_refused(
    fleet: Fleet,
) -> None:
    now = now_ns()

    def event(entries: list[OverrideEntry]) -> Any:
        value = override_value(fleet.alice, entries, issued_at=now, expires_at=now + SECOND)
        return open_envelope(value, fleet.trust)

    late = OverrideEntry(path="a", value=1, set_at=now + 10**30, expires_at=now + SECOND)
    with pytest.raises(VerificationError, match="set_at out of range"):
        parse_overrides(event([late]))
    big = [
        OverrideEntry(path=f"k{n}", value=list(range(3000)), set_at=now, expires_at=now + SECOND)
        for n in range(80)
    ]
    with pytest.raises(VerificationError, match="the override set holds more than"):
        parse_overrides(event(big))


async def test_an_override_that_reaches_the_log_long_after_it_was_signed_is_refused(
    fleet: Fleet, running: ConfigSubscriber
) -> None:
    signed_earlier = now_ns() - 300 * SECOND  # kept five minutes, then written: a replay

    await fleet.raw_override(fleet.alice, {"pool": 1}, issued_at=signed_earlier)

    ack = await eventually(
        lambda: next((a for a in fleet.acks() if a.status == "rejected"), None), "a refusal"
    )
    assert ack.reason.startswith("replayed: override issued 300s before Kafka took it")
    assert running.config.get("pool") == 10


async def test_a_snapshot_refused_only_with_the_overrides_on_top_applies_without_them(
    fleet: Fleet, running: ConfigSubscriber
) -> None:
    def no_big_pool_in_wide_mode(config: Any) -> bool:
        return not (config.get("pool") == 99 and config.get("wide") is True)

    running.add_validator(no_big_pool_in_wide_mode)
    await running.wait_for(has_override(await fleet.override({"pool": 99})), timeout=5)

    await fleet.publish(2, {"features": {"checkout": True}, "pool": 10, "wide": True})
    snapshot = await running.wait_for(lambda s: s.version == 2, timeout=5)

    assert (snapshot.config.get("pool"), snapshot.overrides, snapshot.override) == (10, (), None)
    ack = await eventually(
        lambda: next((a for a in fleet.acks() if a.status == "rejected"), None), "a refusal"
    )
    assert (ack.channel, ack.version) == (OVERRIDE_CHANNEL, 1)
    assert ack.reason.startswith("refused: ") and "no_big_pool_in_wide_mode" in ack.reason


async def test_an_override_the_validators_refuse_never_stops_an_instance_starting(
    fleet: Fleet,
) -> None:
    await fleet.publish(1, {"pool": 10})
    await fleet.override({"pool": 99})
    subscriber = fleet.subscriber(start_timeout=5)
    subscriber.add_validator(lambda config: config.get("pool") != 99)

    async with subscriber:
        assert (subscriber.version, subscriber.config.get("pool")) == (1, 10)
        assert subscriber.rejected == {"refused": 1}


# -- through the host agent ---------------------------------------------------------


async def test_the_agent_passes_overrides_on_and_serves_them_from_its_cache_without_kafka(
    fleet: Fleet, tmp_path: Path
) -> None:
    from configbus.agent import Agent, AgentSettings
    from configbus.bus import KafkaSettings

    await fleet.publish(1, {"pool": 10})
    settings = AgentSettings(
        socket=tmp_path / "agent.sock",
        kafka=KafkaSettings("unused:9092"),
        trust=fleet.trust,
        topics=TOPICS,
        cache_dir=tmp_path / "agent-cache",
    )

    def behind(agent: Agent, instance: str) -> ConfigSubscriber:
        options: dict[str, Any] = {"topic_prefix": TOPICS.prefix, "acks_topic": TOPICS.acks}
        built = SubscriberSettings.build(
            TENANT,
            ENV,
            environ={},
            agent=str(agent.settings.socket),
            trust=fleet.trust,
            instance_id=instance,
            start_timeout=5,
            **options,
        )
        return ConfigSubscriber(TENANT, ENV, settings=built)

    async with Agent(settings, bus=fleet.bus) as agent, behind(agent, "i-1") as first:
        await fleet.override({"pool": 99})
        await first.wait_for(lambda s: s.config.get("pool") == 99, timeout=5)
        await fleet.raw_override(fleet.bob, {"pool": 1}, version=5)  # out of bob's scope
        await eventually(lambda: first.rejected, "the forged override refused")
        assert first.config.get("pool") == 99
    assert (tmp_path / "agent-cache" / f"{TENANT}.{ENV}.override").exists()

    fleet.bus.down = True  # a restarted agent, and no Kafka
    async with Agent(settings, bus=fleet.bus) as agent, behind(agent, "i-2") as fresh:
        assert (fresh.version, fresh.snapshot.override_version, fresh.config.get("pool")) == (
            1,
            1,
            99,
        )


async def test_overriding_a_tenant_that_never_published_says_so_and_writes_nothing(
    fleet: Fleet,
) -> None:
    fleet.bus = MemoryBus()  # no tenant topic at all
    fleet.bus.create_topic(TOPICS.audit, compact=False)

    with pytest.raises(ConfigBusError, match=r"t\.acme does not exist: nothing was ever"):
        await fleet.override({"pool": 1})

    assert fleet.bus.records(TOPICS.audit) == []
