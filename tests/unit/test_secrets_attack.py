"""Sealed secrets under attack and under a demanding operator: each test here failed on
the first version of the feature. A rollback that brings a retired version back, a
retirement that drops a version the fleet was never checked for, acknowledgements that
outrank later ones by the time they claim, an acks topic that is not there, an instance
still on a config that references the secret, one stream's bad record that stops the
daemon's look at every stream after it, a sealed text whose version is not ASCII, a long
tenant id that can never get a second KEK, and a retire command that is handed the KEKs.
No Kafka, no Redis: the in-memory bus and copies of the sample tree."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import msgspec
import pytest

import configbus.publisher.secrets as keeper_module
from configbus.bus import MemoryBus, TopicNames
from configbus.cli import main
from configbus.crypto import LocalKeyProvider, SigningKey, TrustStore, generate_keypair
from configbus.crypto.secrets import SecretReader, seal_secret
from configbus.errors import SecretError
from configbus.events import Ack
from configbus.ops.secrets import FleetCheck, TreeBook, fleet_has, retire, set_secret
from configbus.tree.resolved import ResolvedConfig
from configbus.tree.sealed import read_secrets_file, secrets_file
from configbus.tree.tree import EnvironmentTree
from configbus.tree.values import FrozenDict, SecretRef, freeze, freeze_json, redacted

from .test_rollback import AURORA
from .test_rollback import World as RollbackWorld
from .test_secret_keeper import (
    DAY,
    ENV,
    EVERY,
    NAME,
    SECOND,
    T0,
    TENANT,
    TOPICS,
    Fleet,
    keeper,
    record,
    rotating,
)

SAMPLE = Path(__file__).resolve().parents[2] / "environments"
AURORA_PASSWORD = "tenants/aurora-records/postgres_password"  # aurora-records' prod uses it


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


async def rotated_fleet(
    bus: MemoryBus, tree: EnvironmentTree, root: Path, provider: LocalKeyProvider, key: SigningKey
) -> Fleet:
    """nimbus-fm/prod: snapshot 6 carries v1 of the secret and instance i-1 applied it;
    then the secret is rotated and snapshot 7 carries v2 (and v1)."""
    fleet = Fleet(bus, tree, key)
    await rotating(root, provider)
    await fleet.publish(6)
    await fleet.applied(6)
    await rotating(root, provider, at=T0 + DAY)
    await fleet.publish(7)
    return fleet


async def write_ack(bus: MemoryBus, ack: Ack) -> None:
    async with bus.producer() as producer:
        await producer.send_and_wait(TOPICS.acks, msgspec.msgpack.encode(ack), key=ack.key)


# -- the fleet gate -------------------------------------------------------------------------
async def test_a_rollback_does_not_bring_back_a_retired_secret_version(tmp_path: Path) -> None:
    """`rollback` republishes an old config verbatim, with the sealed versions it carried
    then: v1, retired (and revoked by the retire command) since, would be what every
    service reads again, and the rollback holds the stream there."""
    world = RollbackWorld(tmp_path)
    keys = LocalKeyProvider({AURORA[0]: ("aurora-1", {"aurora-1": os.urandom(32)})})
    book = TreeBook(world.root)
    await set_secret(book, keys, *AURORA, AURORA_PASSWORD, b"old-password-revoked")
    await world.publish()
    await set_secret(book, keys, *AURORA, AURORA_PASSWORD, b"new-password")
    await world.publish()
    assert await retire(book, *AURORA, AURORA_PASSWORD) == (1,)
    await world.publish()
    first = world.versions(AURORA)[0]

    await world.rollback(first)

    config = freeze_json(msgspec.json.decode(world.snapshots(AURORA)[-1].config_json))
    reference = config["database"]["postgresql"]["password"]
    assert isinstance(reference, SecretRef)
    assert 1 not in reference.versions, "the rollback published the retired v1 again"


async def test_a_retirement_drops_only_the_versions_the_fleet_was_checked_for(
    bus: MemoryBus,
    tree: EnvironmentTree,
    root: Path,
    provider: LocalKeyProvider,
    publisher_key: SigningKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The keeper checks the fleet for v2, then `retire` reads the record again and keeps
    only its newest: an operator's v3, written while the keeper read Kafka, makes it drop
    v2 too, which no instance was checked to have left."""
    fleet = await rotated_fleet(bus, tree, root, provider, publisher_key)  # v2, v1
    await fleet.applied(7)  # i-1 runs v2: the gate passes
    real_fleet_has = fleet_has

    async def operator_rotates_meanwhile(*args: object, **options: object) -> FleetCheck:
        check = await real_fleet_has(*args, **options)
        await set_secret(TreeBook(root), provider, TENANT, ENV, NAME, b"set-by-hand-as-v3")
        return check

    monkeypatch.setattr(keeper_module, "fleet_has", operator_rotates_meanwhile)

    trust = TrustStore.of(publisher_key.public)
    report = await keeper(bus, tree, provider, trust).round(now=T0 + DAY + SECOND)

    assert report.retired == [(TENANT, ENV, NAME, (1,))]
    assert record(root).live_versions == (3, 2)


@pytest.mark.parametrize("status", ["stopped", "applied"])
async def test_an_ack_claiming_a_future_time_does_not_outrank_the_acks_written_after_it(
    bus: MemoryBus,
    tree: EnvironmentTree,
    root: Path,
    provider: LocalKeyProvider,
    publisher_key: SigningKey,
    status: str,
) -> None:
    """Acks are unsigned and any service may write the shared acks topic. One dated far
    ahead (forged, or from a skewed clock) must not hide what the instance says after it:
    i-1 answers again that it runs v6, which carries v1 only."""
    fleet = await rotated_fleet(bus, tree, root, provider, publisher_key)
    future = 2**62
    await write_ack(
        bus,
        Ack(
            tenant=TENANT, env=ENV, version=7, instance="i-1", service="radio",
            status=status, applied_at=future, received_at=future,
        ),
    )  # fmt: skip
    await fleet.applied(6)  # the real instance, after it

    report = await keeper(bus, tree, provider, TrustStore.of(publisher_key.public)).round(
        now=T0 + DAY + SECOND
    )

    assert report.retired == []
    assert record(root).live_versions == (2, 1)


async def test_an_acks_topic_that_is_not_there_retires_nothing(
    bus: MemoryBus,
    tree: EnvironmentTree,
    root: Path,
    provider: LocalKeyProvider,
    publisher_key: SigningKey,
) -> None:
    """A typo in the acks topic's name (or another cluster) reads as a fleet of no
    instances: the gate must fail closed, not retire while i-1 runs v1."""
    await rotated_fleet(bus, tree, root, provider, publisher_key)
    trust = TrustStore.of(publisher_key.public)

    check = await fleet_has(bus, TopicNames(acks="acks-misspelt"), trust, [(TENANT, ENV)], NAME, 2)

    assert not check.ready


async def test_an_instance_on_a_config_that_references_the_secret_holds_the_retirement(
    bus: MemoryBus,
    tree: EnvironmentTree,
    root: Path,
    provider: LocalKeyProvider,
    publisher_key: SigningKey,
) -> None:
    """Snapshot 8 drops the reference; i-1 still runs snapshot 6, which reads v1. Retiring
    v1 (and revoking it) now breaks i-1: it must first apply a config that no longer uses
    the secret."""
    fleet = await rotated_fleet(bus, tree, root, provider, publisher_key)
    await fleet.publish(8, config_json=b'{"app":{"name":"radio"}}')

    report = await keeper(bus, tree, provider, TrustStore.of(publisher_key.public)).round(
        now=T0 + DAY + SECOND
    )

    assert report.retired == []
    assert record(root).live_versions == (2, 1)


# -- the daemon's keeper --------------------------------------------------------------------
async def test_one_streams_bad_record_does_not_stop_the_keeper_for_the_streams_after_it(
    bus: MemoryBus, tree: EnvironmentTree, root: Path, provider: LocalKeyProvider
) -> None:
    """aurora-records' record says it was created at a time past the year 9999 in UTC: it
    parses, but cannot be written back. The keeper must report that stream and still
    rotate nimbus-fm's due secret (looked at after it)."""
    await rotating(root, provider)  # nimbus-fm/prod, due at T0 + 30d
    await set_secret(
        TreeBook(root), provider, "aurora-records", "prod", AURORA_PASSWORD, b"x" * 20,
        rotate_every=EVERY, generate=32, now=T0,
    )  # fmt: skip
    path = secrets_file(root, "aurora-records", "prod")
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("created: ", "created: 9999-12-31T23:59:59-23:59 #"), "utf-8")

    report = await keeper(bus, tree, provider).round(now=T0 + EVERY * SECOND + DAY)

    assert ("aurora-records", "prod") in report.failed
    assert (TENANT, ENV, NAME, 2) in report.rotated
    assert record(root).live_versions == (2, 1)


# -- hostile sealed text, long tenant ids ---------------------------------------------------
@pytest.mark.parametrize("version", ["\u00b2", "9" * 5000], ids=["superscript-two", "huge"])
def test_a_sealed_text_whose_version_is_no_plain_number_is_a_secret_error(version: str) -> None:
    """`str.isdigit` accepts '²', which `int` refuses, and `int` refuses 5000 digits: a
    reference carrying such text (a store value written by hand) must fail as the
    secret's `SecretError`, and its repr and redacted form must not raise."""
    keys = LocalKeyProvider({"acme": ("acme-1", {"acme-1": os.urandom(32)})})
    good = seal_secret(keys, "acme", "prod", "db/password", 1, b"plain").encode()
    prefix, _, *rest = good.split(".")
    bad = ".".join((prefix, version, *rest))
    data = freeze({"db": {"password": {"$secret": "db/password", "$sealed": [bad]}}})
    assert isinstance(data, FrozenDict)
    config = ResolvedConfig(
        data, env="prod", tenant="acme", secrets=SecretReader(keys, "acme", "prod")
    )

    with pytest.raises(SecretError, match="db/password"):
        config.secret("db.password")
    assert "db/password" in repr(data["db"]["password"])
    assert "db/password" in str(redacted(data))


def test_a_tenant_with_a_long_id_can_get_a_second_key_encryption_key() -> None:
    """KEK ids are the tenant id and a time stamp cut to 64 characters: for a tenant id
    of 64 characters the stamp is cut away whole, and KEK rotation can never start."""
    tenant = "t" * 64
    provider, first = LocalKeyProvider({}).with_new_key(tenant, now=1_800_000_000)

    provider, second = provider.with_new_key(tenant, now=1_800_000_000 + 86400)

    assert first != second
    assert set(provider.kek_ids(tenant)) == {first, second}


# -- the retire command ------------------------------------------------------------------------
def test_the_retire_command_is_not_handed_the_key_encryption_keys(
    root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The command revokes an old credential; it gets the secret's name and versions,
    and must not get the KEKs that open every secret of the tenant (a script that logs
    its environment, `set -x`, an error reporter, would write them out)."""
    for name in list(os.environ):
        if name.startswith("CONFIGBUS_"):
            monkeypatch.delenv(name)
    kek = base64.b64encode(os.urandom(32)).decode()
    monkeypatch.setenv("CONFIGBUS_KEK_AURORA_RECORDS", f"aurora-1:{kek}")
    value = tmp_path / "value"
    seen = tmp_path / "environment-seen"
    for text in (b"first-value-123", b"second-value-456"):
        value.write_bytes(text)
        argv = ["secret", "set", "aurora-records", "prod", "db/password"]
        assert main([*argv, "--from-file", str(value), "--root", str(root)]) == 0

    code = main(
        [
            "secret", "retire", "aurora-records", "prod", "db/password", "--force",
            "--root", str(root), "--retire-command", f"env > {seen}",
        ]
    )  # fmt: skip

    capsys.readouterr()
    assert code == 0
    assert read_secrets_file(secrets_file(root, "aurora-records", "prod"))[
        "db/password"
    ].live_versions == (2,)
    environment = seen.read_text(encoding="utf-8")
    assert "CONFIGBUS_RETIRED_VERSIONS=1" in environment
    assert kek not in environment
