"""The daemon's `SecretKeeper`, one `round(now=...)` at a time, on a copy of the sample
tree and a `MemoryBus`: rotation when a policy says so, a warning (once) when it is due
but the daemon has no keys, certificates near their expiry, and retirement of the old
version only once the stream's published snapshots carry the new one and every live
instance acknowledged applying one of them."""

from __future__ import annotations

import base64
import logging
import os
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest

from configbus.bus import MemoryBus, TopicNames
from configbus.crypto import LocalKeyProvider, SigningKey, TrustStore, generate_keypair
from configbus.crypto.secrets import SecretReader
from configbus.events import Ack, Cause, build_body, now_ns, seal
from configbus.ops.secrets import TreeBook, fleet_has, set_secret
from configbus.options import parse_duration
from configbus.publisher.secrets import SecretKeeper
from configbus.tree.sealed import SecretRecord, read_secrets_file, secrets_file
from configbus.tree.tree import EnvironmentTree

from .test_secret_cli import certificate

SAMPLE = Path(__file__).resolve().parents[2] / "environments"
TENANT, ENV = "nimbus-fm", "prod"
NAME = "tenants/nimbus-fm/oidc_client_secret"  # referenced by tenants/nimbus-fm/prod.yml
EVERY = parse_duration("30d")
T0 = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp()) * 1_000_000_000  # a whole second
SECOND = 1_000_000_000
DAY = 86400 * SECOND
TOPICS = TopicNames()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return Path(shutil.copytree(SAMPLE, tmp_path / "environments"))


@pytest.fixture
def tree(root: Path) -> EnvironmentTree:
    return EnvironmentTree(root)


@pytest.fixture
def provider(tree: EnvironmentTree) -> LocalKeyProvider:
    return LocalKeyProvider({t: (f"{t}-1", {f"{t}-1": os.urandom(32)}) for t in tree.tenants()})


@pytest.fixture
def publisher_key(tmp_path: Path) -> SigningKey:
    private, _ = generate_keypair("publisher-1", tmp_path / "signing")
    return SigningKey.load(private, "publisher-1")


@pytest.fixture
def bus() -> MemoryBus:
    return MemoryBus()


class SharedBook(TreeBook):
    """The tree's secrets files, standing in for the tenant store: a book every daemon
    sees alike, which the keeper may write (it never writes a tree's own book)."""

    @property
    def shared(self) -> bool:
        return True


def keeper(
    bus: MemoryBus,
    tree: EnvironmentTree,
    provider: LocalKeyProvider | None,
    trust: TrustStore | None = None,
    *,
    shared: bool = True,
) -> SecretKeeper:
    return SecretKeeper(
        bus,
        TOPICS,
        trust or TrustStore(),
        tree,
        None,
        provider,
        actor="keeper-test",
        is_writer=lambda: True,
        books=[SharedBook(tree.root) if shared else TreeBook(tree.root)],
    )


def record(root: Path, name: str = NAME) -> SecretRecord:
    return read_secrets_file(secrets_file(root, TENANT, ENV))[name]


async def rotating(
    root: Path, provider: LocalKeyProvider, *, at: int = T0, name: str = NAME
) -> SecretRecord:
    """A generated secret with a 30d policy, set at `at` (as `secret set --generate`)."""
    value = os.urandom(24).hex().encode()
    return await set_secret(
        TreeBook(root), provider, TENANT, ENV, name, value,
        rotate_every=EVERY, generate=32, now=at,
    )  # fmt: skip


# -- rotation ---------------------------------------------------------------------------
async def test_a_secret_due_by_its_policy_gets_a_new_generated_version(
    bus: MemoryBus, tree: EnvironmentTree, root: Path, provider: LocalKeyProvider
) -> None:
    first = await rotating(root, provider)
    due = first.rotated + first.rotate_every * SECOND

    report = await keeper(bus, tree, provider).round(now=due)

    assert report.rotated == [(TENANT, ENV, NAME, 2)]
    assert report.due_without_keys == [] and report.failed == {}
    after = record(root)
    assert after.live_versions == (2, 1)
    assert after.rotated == due and after.generate == first.generate
    reader = SecretReader(provider, TENANT, ENV)
    old, new = reader.open(NAME, after.versions, 1), reader.open(NAME, after.versions, 2)
    assert new != old
    generated = base64.urlsafe_b64encode(bytes(first.generate)).rstrip(b"=")
    assert len(new) == len(generated) != len(old)  # generated, as the policy says


async def test_a_secret_not_yet_due_is_left_as_it_is(
    bus: MemoryBus, tree: EnvironmentTree, root: Path, provider: LocalKeyProvider
) -> None:
    first = await rotating(root, provider)
    written = secrets_file(root, TENANT, ENV).read_bytes()
    almost = first.rotated + first.rotate_every * SECOND - SECOND

    report = await keeper(bus, tree, provider).round(now=almost)

    assert report.rotated == [] and report.retired == [] and report.due_without_keys == []
    assert secrets_file(root, TENANT, ENV).read_bytes() == written


async def test_due_without_keys_is_reported_every_round_and_logged_once(
    bus: MemoryBus,
    tree: EnvironmentTree,
    root: Path,
    provider: LocalKeyProvider,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = await rotating(root, provider)
    written = secrets_file(root, TENANT, ENV).read_bytes()
    due = first.rotated + first.rotate_every * SECOND
    keyless = keeper(bus, tree, None)

    with caplog.at_level(logging.WARNING, logger="configbus.publisher.secrets"):
        reports = [await keyless.round(now=due), await keyless.round(now=due + DAY)]

    assert [r.due_without_keys for r in reports] == [[f"{TENANT}/{ENV} {NAME}"]] * 2
    assert [r.rotated for r in reports] == [[], []]
    warnings = [r for r in caplog.records if "due for rotation" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert NAME in warnings[0].getMessage() and "key-encryption keys" in warnings[0].getMessage()
    assert secrets_file(root, TENANT, ENV).read_bytes() == written


# -- certificates -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("days_left", "said"),
    [(5, "expires in 5d"), (29, "expires in 29d"), (-1, "expired"), (31, None)],
)
async def test_a_certificate_within_30_days_of_its_expiry_is_reported(
    bus: MemoryBus,
    tree: EnvironmentTree,
    root: Path,
    provider: LocalKeyProvider,
    caplog: pytest.LogCaptureFixture,
    days_left: int,
    said: str | None,
) -> None:
    pem = certificate(datetime.now(UTC) + timedelta(days=90))
    sealed = await set_secret(TreeBook(root), provider, TENANT, ENV, "tls/cert", pem)
    assert sealed.not_after  # read from the certificate
    now = sealed.not_after - days_left * DAY

    with caplog.at_level(logging.WARNING, logger="configbus.publisher.secrets"):
        report = await keeper(bus, tree, provider).round(now=now)

    if said is None:
        assert report.expiring == []
        assert "tls/cert" not in caplog.text
    else:
        assert report.expiring == [f"{TENANT}/{ENV} tls/cert: {said}"]
        assert f"certificate tls/cert {said}" in caplog.text


# -- retirement -------------------------------------------------------------------------
async def two_versions(root: Path, provider: LocalKeyProvider) -> SecretRecord:
    """The secret rotated once: v2 newest, v1 still live."""
    await rotating(root, provider)
    return await rotating(root, provider, at=T0 + DAY)


async def test_with_no_snapshot_on_the_bus_nothing_is_retired(
    bus: MemoryBus, tree: EnvironmentTree, root: Path, provider: LocalKeyProvider
) -> None:
    """No tenant topic at all reads as a wrong topic prefix (or another cluster), not as
    a stream nobody runs: the gate holds."""
    await two_versions(root, provider)
    async with bus.admin() as admin:
        assert await admin.topics() == set()  # no tenant topic, so no snapshot at all

    report = await keeper(bus, tree, provider).round(now=T0 + DAY + SECOND)

    assert report.retired == [] and report.rotated == []
    assert report.waiting == [
        f"{TENANT}/{ENV} {NAME}: {TENANT}/{ENV} (the stream): no published snapshot carries v2 yet"
    ]
    assert record(root).live_versions == (2, 1)


async def test_a_secret_set_by_hand_is_never_retired_by_the_daemon(
    bus: MemoryBus, tree: EnvironmentTree, root: Path, provider: LocalKeyProvider
) -> None:
    book = TreeBook(root)
    for value in (b"first-by-hand", b"second-by-hand"):
        await set_secret(book, provider, TENANT, ENV, NAME, value)

    report = await keeper(bus, tree, provider).round()

    assert report.retired == [] and report.rotated == []
    assert record(root).live_versions == (2, 1)


class Fleet:
    """The nimbus-fm/prod stream on a MemoryBus: snapshots the daemon would publish
    (the tree's resolved config, which carries the live sealed versions), signed by
    `key`, and acks of instance i-1."""

    def __init__(self, bus: MemoryBus, tree: EnvironmentTree, key: SigningKey) -> None:
        self.bus, self.tree, self.key = bus, tree, key
        bus.create_topic(TOPICS.tenant_topic(TENANT), compact=True)
        bus.create_topic(TOPICS.acks, compact=True)

    async def publish(
        self, version: int, *, key: SigningKey | None = None, config_json: bytes | None = None
    ) -> None:
        """Snapshot `version` of the stream's config as the tree resolves it now."""
        config = config_json or self.tree.resolve(ENV, TENANT).canonical_json
        body = build_body(
            tenant=TENANT, env=ENV, version=version, config_json=config,
            detected_at=now_ns(), cause=Cause(actor="publisher"),
        )  # fmt: skip
        async with self.bus.producer() as producer:
            await producer.send_and_wait(
                TOPICS.tenant_topic(TENANT),
                seal(body, key or self.key),
                key=TOPICS.record_key(ENV),
            )

    async def applied(self, version: int, *, heard: int | None = None) -> None:
        """Instance i-1 says it applied snapshot `version` (heard now, or at `heard`)."""
        ack = Ack(
            tenant=TENANT, env=ENV, version=version, instance="i-1", service="radio",
            status="applied", received_at=heard or now_ns(),
        )  # fmt: skip
        async with self.bus.producer() as producer:
            await producer.send_and_wait(TOPICS.acks, msgspec.msgpack.encode(ack), key=ack.key)


async def test_the_old_version_is_retired_only_once_the_instance_applied_the_new_one(
    bus: MemoryBus,
    tree: EnvironmentTree,
    root: Path,
    provider: LocalKeyProvider,
    publisher_key: SigningKey,
) -> None:
    fleet = Fleet(bus, tree, publisher_key)
    await rotating(root, provider)
    await fleet.publish(6)  # carries v1 only
    await fleet.applied(6)
    await rotating(root, provider, at=T0 + DAY)
    await fleet.publish(7)  # carries v2 (and v1)
    watcher = keeper(bus, tree, provider, TrustStore.of(publisher_key.public))
    now = T0 + DAY + SECOND

    waiting = await watcher.round(now=now)

    assert waiting.retired == []
    assert len(waiting.waiting) == 1
    assert f"{TENANT}/{ENV} {NAME}:" in waiting.waiting[0]
    assert "i-1 (radio): runs v6, needs v7 or later" in waiting.waiting[0]
    assert record(root).live_versions == (2, 1)

    await fleet.applied(7)
    done = await watcher.round(now=now)

    assert done.retired == [(TENANT, ENV, NAME, (1,))] and done.waiting == []
    assert record(root).live_versions == (2,)


async def test_an_instance_silent_past_the_ttl_does_not_hold_the_retirement(
    bus: MemoryBus,
    tree: EnvironmentTree,
    root: Path,
    provider: LocalKeyProvider,
    publisher_key: SigningKey,
) -> None:
    fleet = Fleet(bus, tree, publisher_key)
    await rotating(root, provider)
    await fleet.publish(6)
    watcher = keeper(bus, tree, provider, TrustStore.of(publisher_key.public))
    await fleet.applied(6)
    watcher.instance_ttl = 0.0  # the ack's record is older than that by now: silent
    await rotating(root, provider, at=T0 + DAY)
    await fleet.publish(7)

    report = await watcher.round(now=T0 + DAY + SECOND)

    assert report.retired == [(TENANT, ENV, NAME, (1,))]
    assert record(root).live_versions == (2,)


async def test_a_snapshot_signed_by_an_untrusted_key_does_not_count(
    bus: MemoryBus,
    tree: EnvironmentTree,
    root: Path,
    provider: LocalKeyProvider,
    publisher_key: SigningKey,
    tmp_path: Path,
) -> None:
    fleet = Fleet(bus, tree, publisher_key)
    stranger_file, _ = generate_keypair("stranger", tmp_path / "stranger")
    await rotating(root, provider)
    await fleet.publish(6)
    await rotating(root, provider, at=T0 + DAY)
    await fleet.publish(7, key=SigningKey.load(stranger_file, "stranger"))  # forged
    await fleet.applied(7)

    report = await keeper(bus, tree, provider, TrustStore.of(publisher_key.public)).round(
        now=T0 + DAY + SECOND
    )

    assert report.retired == []
    assert report.waiting == [
        f"{TENANT}/{ENV} {NAME}: {TENANT}/{ENV} (the stream): no published snapshot carries v2 yet"
    ]
    assert record(root).live_versions == (2, 1)


async def test_a_stream_whose_latest_snapshot_does_not_reference_the_secret_lets_it_retire(
    bus: MemoryBus,
    tree: EnvironmentTree,
    root: Path,
    provider: LocalKeyProvider,
    publisher_key: SigningKey,
) -> None:
    fleet = Fleet(bus, tree, publisher_key)
    await two_versions(root, provider)
    await fleet.publish(7, config_json=b'{"app":{"name":"radio"}}')  # no reference
    await fleet.applied(6)  # an instance behind: it does not use the secret either

    report = await keeper(bus, tree, provider, TrustStore.of(publisher_key.public)).round(
        now=T0 + DAY + SECOND
    )

    assert report.retired == [(TENANT, ENV, NAME, (1,))]
    assert record(root).live_versions == (2,)


async def test_a_tenant_topic_without_a_snapshot_of_the_stream_holds_the_retirement(
    bus: MemoryBus,
    tree: EnvironmentTree,
    root: Path,
    provider: LocalKeyProvider,
    publisher_key: SigningKey,
) -> None:
    """A topic that holds only another environment's snapshots has no snapshot of this
    stream: like a missing topic, that holds the retirement (nothing says the stream's
    instances do not read the old version)."""
    bus.create_topic(TOPICS.tenant_topic(TENANT), compact=True)
    async with bus.producer() as producer:  # nimbus-fm/dev's snapshot: another stream
        body = build_body(
            tenant=TENANT, env="dev", version=3, config_json=b'{"app":{"name":"radio"}}',
            detected_at=now_ns(), cause=Cause(actor="publisher"),
        )  # fmt: skip
        await producer.send_and_wait(
            TOPICS.tenant_topic(TENANT), seal(body, publisher_key), key=TOPICS.record_key("dev")
        )
    await two_versions(root, provider)

    report = await keeper(bus, tree, provider, TrustStore.of(publisher_key.public)).round(
        now=T0 + DAY + SECOND
    )

    assert report.retired == []
    assert record(root).live_versions == (2, 1)


async def test_each_stream_is_held_to_its_own_newest_version(
    bus: MemoryBus,
    tree: EnvironmentTree,
    root: Path,
    provider: LocalKeyProvider,
    publisher_key: SigningKey,
) -> None:
    """An environment-wide secret's versions differ between tenants: asked with each
    stream's own version, an instance on a snapshot carrying an older one holds the
    retirement, whatever the version asked for the others."""
    fleet = Fleet(bus, tree, publisher_key)
    for at in (T0, T0 + DAY, T0 + 2 * DAY):
        await rotating(root, provider, at=at)
        await fleet.publish(6 + at // DAY - T0 // DAY)  # v6 carries 1; v7: 2,1; v8: 3,2
    await fleet.applied(7)
    trust = TrustStore.of(publisher_key.public)
    stream = (TENANT, ENV)

    held = await fleet_has(bus, TOPICS, trust, {stream: 3}, NAME, 1)
    loose = await fleet_has(bus, TOPICS, trust, [stream], NAME, 2)

    assert held.targets == {stream: 8}
    assert [h.instance for h in held.holdouts] == ["i-1"]
    assert loose.targets == {stream: 7} and loose.ready  # v7 already carries v2


async def test_a_policy_on_a_secret_kept_in_the_tree_is_warned_about_never_carried_out(
    bus: MemoryBus,
    tree: EnvironmentTree,
    root: Path,
    provider: LocalKeyProvider,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A rotation written into one daemon's checkout would be lost, or undone, when
    another daemon takes over: the keeper leaves a tree-held secret alone and says why,
    once."""
    first = await rotating(root, provider)
    written = secrets_file(root, TENANT, ENV).read_bytes()
    due = first.rotated + first.rotate_every * SECOND
    own_tree = keeper(bus, tree, provider, shared=False)

    with caplog.at_level(logging.WARNING, logger="configbus.publisher.secrets"):
        reports = [await own_tree.round(now=due), await own_tree.round(now=due + DAY)]

    assert [r.not_shared for r in reports] == [[f"{TENANT}/{ENV} {NAME}"]] * 2
    assert [r.rotated for r in reports] == [[], []]
    assert secrets_file(root, TENANT, ENV).read_bytes() == written
    said = [r.getMessage() for r in caplog.records if "kept in the tree" in r.getMessage()]
    assert len(said) == 1 and "--redis" in said[0]
