"""Sealed secrets beside their references: references that carry their live versions as
sealed text, the secrets files that hold them in the tree, resolution that attaches
them, a service that opens them on access, and the operator's set, retire, re-key and
re-wrap. Pure logic: no Kafka, no Redis. A known plaintext is checked never to show."""

from __future__ import annotations

import base64
import copy
import json
import os
import pickle
import re
import shutil
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from configbus.crypto.secrets import (
    KeyProvider,
    LocalKeyProvider,
    SealedSecret,
    SecretReader,
    data_key_of,
    seal_secret,
)
from configbus.errors import SecretError, TreeError
from configbus.events import Ack
from configbus.ops.rollout import has_stopped
from configbus.ops.secrets import (
    TreeBook,
    certificate_expiry,
    generate_value,
    rekey,
    retire,
    rewrap_all,
    set_secret,
)
from configbus.tree.layer import LayerKind
from configbus.tree.resolved import ResolvedConfig
from configbus.tree.sealed import (
    SecretRecord,
    parse_record,
    parse_records,
    read_secrets_file,
    record_document,
    write_secrets_file,
)
from configbus.tree.tree import EnvironmentTree
from configbus.tree.values import (
    FrozenDict,
    SecretRef,
    attach_sealed,
    canonical_json,
    config_hash,
    freeze,
    freeze_json,
    redacted,
    secret_ref,
    thaw,
    view_json,
)

from .helpers import line_of, where

SHIPPED = Path(__file__).resolve().parents[2] / "environments"

TENANT, ENV = "aurora-records", "prod"
OTHER = "helix-audio"
NAME = "tenants/aurora-records/postgres_password"  # referenced by aurora's prod layer
KEY = "database.postgresql.password"  # where it is referenced
OIDC = "tenants/aurora-records/oidc_client_secret"  # referenced too, never set here
OIDC_KEY = "security.oidc.client_secret"
PLAIN = b"aurora-pg-Zq7vX2-plaintext"  # the value that must never show
PLAIN_TEXT = PLAIN.decode()


def keys() -> LocalKeyProvider:
    """Two tenants' fresh KEKs: aurora-records and helix-audio."""
    return LocalKeyProvider(
        {
            TENANT: ("aurora-1", {"aurora-1": os.urandom(32)}),
            OTHER: ("helix-1", {"helix-1": os.urandom(32)}),
        }
    )


@pytest.fixture
def provider() -> LocalKeyProvider:
    return keys()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A copy of the shipped tree, free to write secrets files into."""
    copied = tmp_path / "environments"
    shutil.copytree(SHIPPED, copied)
    return copied


@pytest.fixture
def book(root: Path) -> TreeBook:
    return TreeBook(root)


class CountingProvider:
    """A `KeyProvider` over another that counts its calls: each may be a KMS call."""

    def __init__(self, inner: KeyProvider) -> None:
        self.inner = inner
        self.wraps = self.unwraps = 0

    def wrap(self, tenant: str, data_key: bytes, context: bytes) -> tuple[str, bytes]:
        self.wraps += 1
        return self.inner.wrap(tenant, data_key, context)

    def unwrap(self, tenant: str, kek_id: str, wrapped: bytes, context: bytes) -> bytes:
        self.unwraps += 1
        return self.inner.unwrap(tenant, kek_id, wrapped, context)


def seal(
    provider: KeyProvider,
    version: int,
    value: bytes = PLAIN,
    *,
    name: str = NAME,
    tenant: str = TENANT,
    env: str = ENV,
) -> str:
    """`value` sealed as `version` of secret `name`, as the text a record holds."""
    return seal_secret(provider, tenant, env, name, version, value).encode()


def flipped(text: str, part: str) -> str:
    """`text` with one byte of its `part` (wrapped_key, nonce or ciphertext) flipped."""
    sealed = SealedSecret.decode(text)
    parts = {
        "wrapped_key": sealed.wrapped_key,
        "nonce": sealed.nonce,
        "ciphertext": sealed.ciphertext,
    }
    data = bytearray(parts[part])
    data[len(data) // 2] ^= 0x01
    parts[part] = bytes(data)
    return SealedSecret(sealed.version, sealed.kek_id, **parts).encode()


def readable(config: ResolvedConfig, provider: KeyProvider) -> ResolvedConfig:
    """`config` as a service holds it: with a reader of its stream's secrets."""
    assert config.tenant is not None and config.env is not None
    reader = SecretReader(provider, config.tenant, config.env)
    return ResolvedConfig(
        config.data,
        config.layers,
        env=config.env,
        tenant=config.tenant,
        overrides=config.overrides,
        secrets=reader,
    )


def sealed_config(provider: KeyProvider, texts: list[str], *, name: str = NAME) -> ResolvedConfig:
    """A small config of `TENANT`/`ENV` whose ``db.password`` references `name`."""
    data = freeze({"db": {"password": {"$secret": name, "$sealed": texts}, "user": "app"}})
    assert isinstance(data, FrozenDict)
    return ResolvedConfig(data, env=ENV, tenant=TENANT, secrets=SecretReader(provider, TENANT, ENV))


def at(year: int, month: int, day: int, hour: int = 0) -> int:
    """A moment in ns, to the second (what a secrets file keeps)."""
    return int(datetime(year, month, day, hour, tzinfo=UTC).timestamp()) * 1_000_000_000


# -- references that carry sealed text (values.py) --------------------------------------------
def test_a_reference_equals_and_hashes_by_its_name_and_its_sealed_text(
    provider: LocalKeyProvider,
) -> None:
    v1, v2 = seal(provider, 1), seal(provider, 2)
    bare, one, same, two = (
        SecretRef(NAME),
        SecretRef(NAME, (v1,)),
        SecretRef(NAME, (v1,)),
        SecretRef(NAME, (v2, v1)),
    )

    assert one == same and hash(one) == hash(same)
    assert len({hash(bare), hash(one), hash(two)}) == 3
    assert bare != one and one != two and SecretRef(OIDC, (v1,)) != one
    assert len({bare, one, same, two}) == 3
    hashes_ = {config_hash(FrozenDict(password=ref)) for ref in (bare, one, two)}
    assert len(hashes_) == 3  # the config hash covers the sealed text: a rotation publishes


def test_a_reference_shows_its_name_and_versions_never_its_sealed_text(
    provider: LocalKeyProvider,
) -> None:
    v3, v2 = seal(provider, 3), seal(provider, 2)
    ref = SecretRef(NAME, (v3, v2))

    assert ref.versions == (3, 2)
    assert repr(ref) == f"SecretRef({NAME!r}, versions=[3, 2])"
    assert ref.shown() == f"<secret:{NAME} v3>"
    assert repr(SecretRef(NAME)) == f"SecretRef({NAME!r})"
    assert SecretRef(NAME).shown() == f"<secret:{NAME}>"
    for text in (v3, v2):
        assert text not in repr(ref) and text not in ref.shown()
        assert text.split(".")[-1] not in repr(ref)  # not even the ciphertext part
    assert ref.as_json() == {"$secret": NAME, "$sealed": [v3, v2]}
    assert SecretRef(NAME).as_json() == {"$secret": NAME}


def test_a_reference_with_sealed_text_copies_and_pickles_whole(
    provider: LocalKeyProvider,
) -> None:
    ref = SecretRef(NAME, (seal(provider, 2), seal(provider, 1)))

    assert pickle.loads(pickle.dumps(ref)) == ref
    assert copy.deepcopy(ref) == ref and copy.copy(ref) == ref
    with pytest.raises(AttributeError, match="immutable"):
        ref.sealed = ()


def test_secret_ref_reads_the_one_and_the_two_key_forms(provider: LocalKeyProvider) -> None:
    v2, v1 = seal(provider, 2), seal(provider, 1)

    assert secret_ref({"$secret": NAME}) == SecretRef(NAME)
    two = secret_ref({"$secret": NAME, "$sealed": [v2, v1]})
    assert two == SecretRef(NAME, (v2, v1))
    assert two is not None and two.sealed == (v2, v1)
    assert secret_ref({"$secret": NAME, "$sealed": (v2,)}) == SecretRef(NAME, (v2,))


@pytest.mark.parametrize(
    "item",
    [
        {"$secret": NAME, "other": 1},  # an extra key that is not $sealed
        {"$secret": NAME, "$sealed": ["cbsec1.1.k.a.b.c"], "other": 1},  # three keys
        {"$secret": NAME, "$sealed": "cbsec1.1.k.a.b.c"},  # $sealed not a list
        {"$secret": NAME, "$sealed": None},
        {"$secret": NAME, "$sealed": {"v": "cbsec1.1.k.a.b.c"}},
        {"$secret": NAME, "$sealed": ["cbsec1.1.k.a.b.c", 7]},  # an item not text
        {"$secret": 7},  # a name that is not text
        {"$sealed": ["cbsec1.1.k.a.b.c"]},  # no name at all
    ],
)
def test_secret_ref_refuses_every_other_shape(item: dict[str, Any]) -> None:
    assert secret_ref(item) is None
    assert not isinstance(freeze(item), SecretRef)  # stays a mapping


@pytest.mark.parametrize(
    "reader",
    [freeze, freeze_json, view_json],
    ids=["freeze", "freeze_json", "view_json"],
)
def test_every_way_in_turns_the_two_key_form_into_a_sealed_reference(
    provider: LocalKeyProvider, reader: Callable[[Any], Any]
) -> None:
    v2, v1 = seal(provider, 2), seal(provider, 1)
    text = json.dumps(
        {
            "db": {"password": {"$secret": NAME, "$sealed": [v2, v1]}},
            "clients": [
                {"token": {"$secret": OIDC}},
                {"token": {"$secret": OIDC, "$sealed": [v1]}},
            ],
        }
    )

    value = reader(json.loads(text))  # a fresh decode: view_json takes its input over

    assert value["db"]["password"] == SecretRef(NAME, (v2, v1))
    assert isinstance(value["db"]["password"], SecretRef)
    assert value["clients"][0]["token"] == SecretRef(OIDC)
    assert value["clients"][1]["token"] == SecretRef(OIDC, (v1,))


def test_thaw_and_canonical_json_give_back_the_two_key_form(provider: LocalKeyProvider) -> None:
    v2, v1 = seal(provider, 2), seal(provider, 1)
    document = {
        "db": {"password": {"$secret": NAME, "$sealed": [v2, v1]}, "port": 5432},
        "oidc": [{"$secret": OIDC}],
    }
    value = freeze(document)

    assert thaw(value) == document
    encoded = canonical_json(value)
    assert msgspec.json.decode(encoded) == document
    again = freeze_json(msgspec.json.decode(encoded))
    assert again == value
    assert canonical_json(again) == encoded and config_hash(again) == config_hash(value)


def test_redacted_shows_the_newest_version_and_no_sealed_text(provider: LocalKeyProvider) -> None:
    v3, v2 = seal(provider, 3), seal(provider, 2)
    value = freeze(
        {"db": {"password": {"$secret": NAME, "$sealed": [v3, v2]}}, "keys": [{"$secret": OIDC}]}
    )

    shown = redacted(value)

    assert shown == {"db": {"password": f"<secret:{NAME} v3>"}, "keys": [f"<secret:{OIDC}>"]}
    printed = json.dumps(shown)
    assert v3 not in printed and v2 not in printed and "cbsec1" not in printed


def test_attach_sealed_gives_only_the_named_references_their_versions(
    provider: LocalKeyProvider,
) -> None:
    texts = (seal(provider, 2), seal(provider, 1))
    data = freeze(
        {
            "db": {"password": {"$secret": NAME}, "user": "app"},
            "oidc": {"client_secret": {"$secret": OIDC}},
            "plain": {"port": 5432, "hosts": ["a", "b"]},
            "replicas": [{"password": {"$secret": NAME}}, "no-secret-here", {"port": 1}],
        }
    )
    assert isinstance(data, FrozenDict)

    attached = attach_sealed(data, {NAME: texts})

    assert attached["db"]["password"] == SecretRef(NAME, texts)
    assert attached["replicas"][0]["password"] == SecretRef(NAME, texts)  # inside a list too
    assert attached["oidc"]["client_secret"] == SecretRef(OIDC)  # not named: left bare
    assert attached["db"]["user"] == "app"
    # Untouched branches are shared, not copied; touched ones stay immutable.
    assert attached["oidc"] is data["oidc"] and attached["plain"] is data["plain"]
    assert attached["replicas"][1] is data["replicas"][1]
    assert attached["replicas"][2] is data["replicas"][2]
    assert isinstance(attached["db"], FrozenDict) and isinstance(attached["replicas"], tuple)
    assert data["db"]["password"] == SecretRef(NAME)  # the input is not changed


def test_attach_sealed_returns_the_same_data_when_nothing_changes(
    provider: LocalKeyProvider,
) -> None:
    texts = (seal(provider, 1),)
    data = freeze({"db": {"password": {"$secret": NAME}}, "list": [{"$secret": NAME}]})
    assert isinstance(data, FrozenDict)

    assert attach_sealed(data, {"another/secret": texts}) is data
    attached = attach_sealed(data, {NAME: texts})
    assert attached is not data
    assert attach_sealed(attached, {NAME: texts}) is attached  # already carries them
    newer = (seal(provider, 2), *texts)
    assert attach_sealed(attached, {NAME: newer})["db"]["password"].sealed == newer


# -- secrets files (sealed.py) ------------------------------------------------------------------
def secrets_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "tenants" / TENANT / "secrets" / f"{ENV}.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body, encoding="utf-8")
    return path


V1 = "cbsec1.1.aurora-1.d3JhcHBlZA.bm9uY2Vub25jZTE.Y2lwaGVy"  # the shape of a sealed text
V2 = V1.replace("cbsec1.1.", "cbsec1.2.")


@pytest.mark.parametrize(
    ("record", "field", "message"),
    [
        (f"  versions: [{V2}]\n  rotate: 30d\n", "db/password.rotate", "unknown field"),
        ("  versions: []\n", "db/password.versions", "a non-empty list of sealed values"),
        ("  created: 2026-06-01T08:00:00Z\n", "db/password.versions", "a non-empty list"),
        (f"  versions: {V2}\n", "db/password.versions", "a non-empty list"),
        (
            f"  versions: [{V2}, cbsec1.1.aurora-1.not+base64.x.y]\n",
            "db/password.versions.1",
            "not a sealed value (cbsec1.VERSION.KEK...)",
        ),
        ("  versions: [cbsec1.0.aurora-1.a.b.c]\n", "db/password.versions.0", "not a sealed"),
        ("  versions: [42]\n", "db/password.versions.0", "not a sealed value"),
        (f"  versions: [{V1}, {V2}]\n", "db/password.versions", "newest first, each once"),
        (f"  versions: [{V2}, {V2}]\n", "db/password.versions", "newest first, each once"),
        (f"  versions: [{V2}]\n  created: yesterday\n", "db/password", "'yesterday' is not a time"),
        (f"  versions: [{V2}]\n  not_after: 12\n", "db/password", "12 is not a time"),
        (f"  versions: [{V2}]\n  rotate_every: soon\n", "db/password", "'soon' is not a duration"),
        (f"  versions: [{V2}]\n  generate: 8\n", "db/password", "generate: 8 is not a number"),
        (f"  versions: [{V2}]\n  generate: 5000\n", "db/password", "generate: 5000 is not"),
        (f"  versions: [{V2}]\n  generate: true\n", "db/password", "generate: True is not"),
        ("  - just a list\n", "db/password", "a secret is a mapping with 'versions'"),
    ],
)
def test_a_bad_record_is_named_by_file_line_and_field(
    tmp_path: Path, record: str, field: str, message: str
) -> None:
    path = secrets_file(
        tmp_path, f"# sealed secrets\nother/key:\n  versions: [{V1}]\ndb/password:\n{record}"
    )

    with pytest.raises(TreeError) as refused:
        read_secrets_file(path)

    [problem] = refused.value.problems
    assert (problem.source, problem.line, problem.key) == (
        str(path),
        line_of(path, "db/password:"),
        field,
    )
    assert message in problem.message
    assert str(refused.value).startswith(f"{where(path, line_of(path, 'db/password:'))}: {field}: ")


@pytest.mark.parametrize("name", ["db/../password", "../escape", "Db/Password", "-lead", "a b"])
def test_a_bad_secret_name_is_refused_naming_it(tmp_path: Path, name: str) -> None:
    path = secrets_file(tmp_path, f'"{name}":\n  versions: [{V1}]\n')

    with pytest.raises(TreeError, match=r"name '.*': (lowercase letters|no empty)") as refused:
        read_secrets_file(path)

    [problem] = refused.value.problems
    assert (problem.source, problem.line, problem.key) == (str(path), 1, name)


def test_a_secrets_file_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    path = secrets_file(tmp_path, f"- {V1}\n")

    with pytest.raises(TreeError) as refused:
        read_secrets_file(path)
    with pytest.raises(TreeError, match="a secrets file maps secret names to records") as stored:
        parse_records([V1], "store:aurora-records:prod")

    assert str(refused.value).startswith(f"{where(path, 1)}: ")
    assert str(stored.value).startswith("store:aurora-records:prod:1: ")


def test_no_secrets_file_and_an_empty_one_hold_no_records(tmp_path: Path) -> None:
    assert read_secrets_file(tmp_path / "missing.yml") == {}
    assert read_secrets_file(secrets_file(tmp_path, "# nothing yet\n")) == {}
    assert parse_records(None, "x") == {}


def test_a_record_survives_its_document_and_a_file(
    tmp_path: Path, provider: LocalKeyProvider
) -> None:
    record = SecretRecord(
        NAME,
        (seal(provider, 3), seal(provider, 2)),
        created=at(2026, 6, 1, 8),
        rotated=at(2026, 12, 7, 6),
        rotate_every=30 * 86400 + 3600,
        generate=32,
        not_after=at(2027, 3, 1),
    )
    bare = SecretRecord("api/token", (seal(provider, 1, name="api/token"),))

    document = record_document(record)

    assert document["rotate_every"] == "30d1h" and document["created"] == "2026-06-01T08:00:00Z"
    assert parse_record(NAME, document, "x") == record
    assert record_document(bare) == {"versions": list(bare.versions)}
    assert parse_record("api/token", record_document(bare), "x") == bare
    path = tmp_path / "secrets" / "prod.yml"
    write_secrets_file(path, f"{TENANT}/{ENV}", {NAME: record, "api/token": bare})
    assert read_secrets_file(path) == {NAME: record, "api/token": bare}
    text = path.read_text(encoding="utf-8")
    assert text.startswith(f"# Sealed secrets of {TENANT}/{ENV}:")
    assert text.index("api/token:") < text.index(f"{NAME}:")  # sorted by name


def test_a_secrets_file_is_replaced_whole_and_leaves_no_temporary_file(
    tmp_path: Path, provider: LocalKeyProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "secrets" / "prod.yml"
    first = {NAME: SecretRecord(NAME, (seal(provider, 1),))}
    second = {NAME: SecretRecord(NAME, (seal(provider, 2), *first[NAME].versions))}

    write_secrets_file(path, "s", first)
    inode = path.stat().st_ino
    write_secrets_file(path, "s", second)

    assert read_secrets_file(path) == second
    assert path.stat().st_ino != inode  # a new file renamed over the old, not rewritten in place
    assert sorted(os.listdir(path.parent)) == ["prod.yml"]

    def refuse(source: str, target: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        write_secrets_file(path, "s", first)
    monkeypatch.undo()
    assert read_secrets_file(path) == second  # the reader still sees the whole old file
    assert sorted(os.listdir(path.parent)) == ["prod.yml"]


def test_a_records_repr_never_shows_its_sealed_text(provider: LocalKeyProvider) -> None:
    record = SecretRecord(NAME, (seal(provider, 2), seal(provider, 1)))

    assert record.version == 2 and record.live_versions == (2, 1)
    assert NAME in repr(record)
    assert "cbsec1" not in repr(record) and "cbsec1" not in str(record)
    assert record.retired().versions == record.versions[:1]


# -- the tree attaches a tenant's sealed secrets (tree.py) ---------------------------------------
async def test_a_tenants_secrets_file_is_the_top_layer_of_its_stream(
    root: Path, book: TreeBook, provider: LocalKeyProvider
) -> None:
    record = await set_secret(book, provider, TENANT, ENV, NAME, PLAIN)
    tree = EnvironmentTree(root)

    layers = tree.layers(ENV, TENANT)

    secrets = [layer for layer in layers if layer.kind is LayerKind.SECRETS]
    assert secrets == [layers[-1]]
    assert (
        Path(secrets[0].source)
        == book.path(TENANT, ENV)
        == root / f"tenants/{TENANT}/secrets/prod.yml"
    )
    assert secrets[0].sealed == {NAME: record.versions}
    assert not secrets[0].data  # no values: only what travels beside references
    for env in ("staging", "dev"):
        assert LayerKind.SECRETS not in {layer.kind for layer in tree.layers(env, TENANT)}
    assert LayerKind.SECRETS not in {layer.kind for layer in tree.layers(ENV, OTHER)}


async def test_resolve_carries_the_sealed_text_at_the_reference_and_the_schema_accepts_it(
    root: Path, book: TreeBook, provider: LocalKeyProvider
) -> None:
    record = await set_secret(book, provider, TENANT, ENV, NAME, PLAIN)
    tree = EnvironmentTree(root)

    config = tree.resolve(ENV, TENANT)

    assert config.get(KEY) == SecretRef(NAME, record.versions)
    assert config.get(OIDC_KEY) == SecretRef(OIDC)  # referenced, but no value set
    assert tree.problems(config) == []
    assert tree.validate(config) is not None
    assert [str(problem) for problem in tree.check().problems] == []
    assert readable(config, provider).secret(KEY) == PLAIN_TEXT


async def test_a_rotation_changes_the_config_hash(
    root: Path, book: TreeBook, provider: LocalKeyProvider
) -> None:
    tree = EnvironmentTree(root)
    unset = tree.resolve(ENV, TENANT).hash
    await set_secret(book, provider, TENANT, ENV, NAME, b"first value")
    first = tree.resolve(ENV, TENANT)

    await set_secret(book, provider, TENANT, ENV, NAME, PLAIN)
    second = tree.resolve(ENV, TENANT)

    assert len({unset, first.hash, second.hash}) == 3
    assert first.get(KEY).versions == (1,) and second.get(KEY).versions == (2, 1)
    assert EnvironmentTree(root).resolve(ENV, TENANT).hash == second.hash  # not a cache artefact
    assert readable(second, provider).secret(KEY) == PLAIN_TEXT


async def test_a_broken_secrets_file_fails_resolve_naming_the_file_and_line(
    root: Path, book: TreeBook, provider: LocalKeyProvider
) -> None:
    await set_secret(book, provider, TENANT, ENV, OIDC, b"oidc value")
    record = await set_secret(book, provider, TENANT, ENV, NAME, PLAIN)
    tree = EnvironmentTree(root)
    assert tree.resolve(ENV, TENANT).get(KEY).versions == (1,)
    path = book.path(TENANT, ENV)
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace(record.versions[0], "cbsec1.1.aurora-1.broken"), encoding="utf-8")

    with pytest.raises(TreeError) as refused:
        tree.resolve(ENV, TENANT)

    assert str(refused.value) == (
        f"{where(path, line_of(path, NAME + ':'))}: {NAME}.versions.0: "
        "not a sealed value (cbsec1.VERSION.KEK...)"
    )
    assert any(problem.source == str(path) for problem in tree.check().problems)


async def test_a_tenants_secrets_leave_every_other_stream_as_it_was(
    root: Path, book: TreeBook, provider: LocalKeyProvider
) -> None:
    before = EnvironmentTree(root)
    others = [stream for stream in before.streams() if stream != (TENANT, ENV)]
    hashes_before = {(t, e): before.resolve(e, t).hash for t, e in others}
    own_before = before.resolve(ENV, TENANT).hash
    assert len(others) >= 5

    await set_secret(book, provider, TENANT, ENV, NAME, PLAIN)
    after = EnvironmentTree(root)

    assert {(t, e): after.resolve(e, t).hash for t, e in others} == hashes_before
    assert after.resolve(ENV, TENANT).hash != own_before
    staging = after.resolve("staging", TENANT).get(KEY)
    assert staging == SecretRef(NAME)  # the same name, another stream: no sealed text


# -- a service opens its secrets on access (resolved.py) ----------------------------------------
async def test_a_config_opens_the_newest_version_or_an_older_live_one(
    root: Path, book: TreeBook, provider: LocalKeyProvider
) -> None:
    await set_secret(book, provider, TENANT, ENV, NAME, b"the old value")
    await set_secret(book, provider, TENANT, ENV, NAME, PLAIN)
    config = readable(EnvironmentTree(root).resolve(ENV, TENANT), provider)

    assert config.secret(KEY) == PLAIN_TEXT
    assert config.secret_bytes(KEY) == PLAIN
    assert config.secret_version(KEY) == 2
    assert config.secret(KEY, version=1) == "the old value"
    after_retiring = sealed_config(provider, [seal(provider, 5), seal(provider, 3)])
    assert after_retiring.secret_version("db.password") == 5  # the newest, not a count
    assert config.secret(("database", "postgresql", "password"), version=2) == PLAIN_TEXT
    with pytest.raises(SecretError, match=r"has no version 7 \(live: v2, v1\)") as refused:
        config.secret(KEY, version=7)
    assert NAME in str(refused.value)


def test_a_binary_secret_is_read_as_bytes_only(provider: LocalKeyProvider) -> None:
    binary = bytes(range(256))
    config = sealed_config(provider, [seal(provider, 1, binary)])

    assert config.secret_bytes("db.password") == binary
    with pytest.raises(SecretError, match=r"db\.password: the secret is binary; use secret_bytes"):
        config.secret("db.password")


async def test_without_keys_a_config_says_which_secret_and_where_keys_come_from(
    root: Path, book: TreeBook, provider: LocalKeyProvider
) -> None:
    await set_secret(book, provider, TENANT, ENV, NAME, PLAIN)
    config = EnvironmentTree(root).resolve(ENV, TENANT)
    assert config.secrets is None

    with pytest.raises(SecretError) as refused:
        config.secret(KEY)

    message = str(refused.value)
    assert message.startswith(f"{KEY}: secret {NAME!r} cannot be read here")
    assert "CONFIGBUS_SECRET_KEYS" in message and PLAIN_TEXT not in message
    assert config.secret_version(KEY) == 1  # the version is known without a key


def test_a_value_that_is_not_a_reference_is_no_secret(provider: LocalKeyProvider) -> None:
    config = sealed_config(provider, [seal(provider, 1)])

    with pytest.raises(SecretError, match=r"^db\.user: not a secret reference \(!secret NAME\)$"):
        config.secret("db.user")
    with pytest.raises(SecretError, match=r"^db: not a secret reference"):
        config.secret_bytes("db")
    with pytest.raises(SecretError, match=r"^db\.nothing: not a secret reference"):
        config.secret("db.nothing")
    with pytest.raises(SecretError, match=r"^db\.user: not a secret reference"):
        config.secret_version("db.user")


def test_errors_name_a_key_given_as_a_path_as_the_dotted_key(provider: LocalKeyProvider) -> None:
    """A key given as a path reads in messages as the dotted key, as everywhere else."""
    config = sealed_config(provider, [seal(provider, 1)])

    with pytest.raises(SecretError, match=r"^db\.user: not a secret reference"):
        config.secret_bytes(("db", "user"))
    with pytest.raises(SecretError, match=r"^db\.user: not a secret reference"):
        config.secret_version(("db", "user"))


async def test_a_reference_without_a_value_says_how_to_set_one(
    root: Path, book: TreeBook, provider: LocalKeyProvider
) -> None:
    await set_secret(book, provider, TENANT, ENV, NAME, PLAIN)
    config = readable(EnvironmentTree(root).resolve(ENV, TENANT), provider)

    with pytest.raises(SecretError) as refused:
        config.secret(OIDC_KEY)

    assert f"`configbus secret set {TENANT} {ENV} {OIDC}`" in str(refused.value)
    assert config.secret_version(OIDC_KEY) == 0


@pytest.mark.parametrize(
    ("tenant", "env", "name"),
    [
        (TENANT, ENV, OIDC),  # moved to another name
        (TENANT, "staging", NAME),  # to another environment
        (OTHER, ENV, NAME),  # to another tenant's stream
    ],
    ids=["name", "env", "tenant"],
)
def test_a_sealed_text_moved_elsewhere_does_not_open(
    provider: LocalKeyProvider, tenant: str, env: str, name: str
) -> None:
    text = seal(provider, 1)  # sealed for TENANT/ENV/NAME
    data = freeze({"db": {"password": {"$secret": name, "$sealed": [text]}}})
    assert isinstance(data, FrozenDict)
    config = ResolvedConfig(
        data, env=env, tenant=tenant, secrets=SecretReader(provider, tenant, env)
    )

    with pytest.raises(SecretError) as refused:
        config.secret("db.password")

    message = str(refused.value)
    assert message.startswith(f"secret {name!r} of {tenant}/{env}")
    assert PLAIN_TEXT not in message and text not in message


@pytest.mark.parametrize("part", ["wrapped_key", "nonce", "ciphertext"])
def test_a_sealed_text_with_one_byte_flipped_does_not_open(
    provider: LocalKeyProvider, part: str
) -> None:
    config = sealed_config(provider, [flipped(seal(provider, 1), part)])

    with pytest.raises(SecretError) as refused:
        config.secret("db.password")

    message = str(refused.value)
    assert message.startswith(f"secret {NAME!r} of {TENANT}/{ENV} (v1): ")
    assert PLAIN_TEXT not in message


def test_another_tenants_keys_cannot_open_a_tenants_secret(provider: LocalKeyProvider) -> None:
    text = seal(provider, 1)
    other_only = LocalKeyProvider({OTHER: ("helix-1", {"helix-1": os.urandom(32)})})
    config = sealed_config(other_only, [text])

    with pytest.raises(
        SecretError, match=f"tenant '{TENANT}' has no key-encryption key"
    ) as refused:
        config.secret("db.password")

    assert PLAIN_TEXT not in str(refused.value)
    assert sealed_config(provider, [text]).secret("db.password") == PLAIN_TEXT


def test_a_reader_keeps_the_data_key_it_unwrapped_but_never_the_value(
    provider: LocalKeyProvider,
) -> None:
    counting = CountingProvider(provider)
    text = seal(provider, 1)
    reader = SecretReader(counting, TENANT, ENV)

    opened = [reader.open(NAME, [text]) for _ in range(3)]

    assert opened == [PLAIN] * 3
    assert counting.unwraps == 1  # one unwrap (a KMS call) for all three reads
    # The data key is kept, the value is not: the same wrapped key with a tampered
    # ciphertext is decrypted again, and refused, rather than answered from memory.
    with pytest.raises(SecretError, match="does not open"):
        reader.open(NAME, [flipped(text, "ciphertext")])
    assert counting.unwraps == 1
    assert PLAIN_TEXT not in repr(reader) and PLAIN_TEXT not in repr(vars(reader))


async def test_a_reader_unwraps_a_streams_data_key_once_for_all_its_secrets(
    book: TreeBook, provider: LocalKeyProvider
) -> None:
    """A stream's secrets share one data key (see `set_secret`), and a reader keeps
    "one data key per stream and KEK": opening every secret of the stream costs one
    unwrap, not one per secret and version."""
    await set_secret(book, provider, TENANT, ENV, NAME, PLAIN)
    await set_secret(book, provider, TENANT, ENV, OIDC, b"oidc value")
    await set_secret(book, provider, TENANT, ENV, NAME, b"newer value")
    records = await book.read(TENANT, ENV)
    counting = CountingProvider(provider)
    reader = SecretReader(counting, TENANT, ENV)

    reader.open(NAME, records[NAME].versions)
    reader.open(NAME, records[NAME].versions, version=1)
    reader.open(OIDC, records[OIDC].versions)

    assert counting.unwraps == 1


# -- the operator's tools over a tree book (ops/secrets.py) ---------------------------------------
def opens(provider: KeyProvider, record: SecretRecord) -> dict[int, bytes]:
    """Every live version of `record`, opened."""
    reader = SecretReader(provider, TENANT, ENV)
    return {v: reader.open(record.name, record.versions, v) for v in record.live_versions}


async def test_set_secret_counts_versions_up_and_keeps_the_older_ones_live(
    book: TreeBook, provider: LocalKeyProvider
) -> None:
    values = [b"value one", b"value two", PLAIN]
    times = [at(2026, 6, 1), at(2026, 9, 1), at(2026, 12, 1)]

    records = [
        await set_secret(book, provider, TENANT, ENV, NAME, value, now=now)
        for value, now in zip(values, times, strict=True)
    ]

    assert [record.version for record in records] == [1, 2, 3]
    assert records[-1].live_versions == (3, 2, 1)
    assert records[-1].versions[1:] == records[-2].versions  # older text kept as it was
    assert (records[-1].created, records[-1].rotated) == (times[0], times[-1])
    assert (await book.read(TENANT, ENV)) == {NAME: records[-1]}
    assert opens(provider, records[-1]) == {1: values[0], 2: values[1], 3: PLAIN}


async def test_a_second_secret_of_the_stream_is_sealed_with_the_same_data_key(
    book: TreeBook, provider: LocalKeyProvider
) -> None:
    first = await set_secret(book, provider, TENANT, ENV, NAME, PLAIN)
    second = await set_secret(book, provider, TENANT, ENV, OIDC, b"oidc value")
    elsewhere = await set_secret(book, provider, TENANT, "staging", NAME, PLAIN)

    def key_of(record: SecretRecord, env: str = ENV) -> bytes:
        return data_key_of(provider, TENANT, env, SealedSecret.decode(record.versions[0]))

    assert key_of(first) == key_of(second)
    assert key_of(elsewhere, "staging") != key_of(first)  # each stream has its own


async def test_retire_keeps_only_the_newest_and_returns_what_it_dropped(
    book: TreeBook, provider: LocalKeyProvider
) -> None:
    for value in (b"value one", b"value two", PLAIN):
        newest = await set_secret(book, provider, TENANT, ENV, NAME, value)
    # A time to the second, as the file keeps it, so the record compares equal.
    other = await set_secret(book, provider, TENANT, ENV, OIDC, b"oidc", now=at(2026, 12, 1))

    dropped = await retire(book, TENANT, ENV, NAME)

    assert dropped == (2, 1)
    records = await book.read(TENANT, ENV)
    assert records[NAME].versions == newest.versions[:1]
    assert records[OIDC] == other  # another secret is left alone
    assert opens(provider, records[NAME]) == {3: PLAIN}
    assert await retire(book, TENANT, ENV, NAME) == ()
    with pytest.raises(SecretError, match=f"{TENANT}/{ENV} has no secret 'no/such'"):
        await retire(book, TENANT, ENV, "no/such")


async def test_rekey_seals_every_version_again_under_a_new_data_key(
    book: TreeBook, provider: LocalKeyProvider
) -> None:
    for value in (b"value one", PLAIN):
        await set_secret(book, provider, TENANT, ENV, NAME, value)
    await set_secret(book, provider, TENANT, ENV, OIDC, b"oidc value")
    before = await book.read(TENANT, ENV)

    count = await rekey(book, provider, TENANT, ENV)

    after = await book.read(TENANT, ENV)
    assert count == 3
    old_key = data_key_of(provider, TENANT, ENV, SealedSecret.decode(before[NAME].versions[0]))
    new_keys = {
        data_key_of(provider, TENANT, ENV, SealedSecret.decode(text))
        for record in after.values()
        for text in record.versions
    }
    assert len(new_keys) == 1 and old_key not in new_keys
    for name in (NAME, OIDC):
        assert after[name].live_versions == before[name].live_versions
        assert set(after[name].versions).isdisjoint(before[name].versions)
        assert opens(provider, after[name]) == opens(provider, before[name])
    assert opens(provider, after[NAME]) == {1: b"value one", 2: PLAIN}


async def test_rewrap_all_moves_every_sealed_text_to_the_current_kek(book: TreeBook) -> None:
    old, new = os.urandom(32), os.urandom(32)
    before_rotation = LocalKeyProvider({TENANT: ("aurora-1", {"aurora-1": old})})
    rotated = LocalKeyProvider({TENANT: ("aurora-2", {"aurora-1": old, "aurora-2": new})})
    only_new = LocalKeyProvider({TENANT: ("aurora-2", {"aurora-2": new})})
    for value in (b"value one", PLAIN):
        await set_secret(book, before_rotation, TENANT, ENV, NAME, value)
    await set_secret(book, before_rotation, TENANT, ENV, OIDC, b"oidc value")
    before = await book.read(TENANT, ENV)

    count = await rewrap_all(book, rotated, TENANT, ENV)

    after = await book.read(TENANT, ENV)
    assert count == 3
    for name in (NAME, OIDC):
        old_texts = [SealedSecret.decode(text) for text in before[name].versions]
        new_texts = [SealedSecret.decode(text) for text in after[name].versions]
        assert {sealed.kek_id for sealed in new_texts} == {"aurora-2"}
        assert [s.ciphertext for s in new_texts] == [s.ciphertext for s in old_texts]
        assert after[name].live_versions == before[name].live_versions
        assert opens(only_new, after[name]) == opens(before_rotation, before[name])
    with pytest.raises(SecretError, match="no key-encryption key 'aurora-1'"):
        opens(only_new, before[NAME])


async def test_rotate_every_needs_a_generated_value(
    book: TreeBook, provider: LocalKeyProvider
) -> None:
    with pytest.raises(SecretError, match=r"rotate_every needs a generated value \(--generate"):
        await set_secret(book, provider, TENANT, ENV, NAME, PLAIN, rotate_every=86400)
    assert not book.path(TENANT, ENV).exists()  # nothing was written

    value = generate_value(32)
    record = await set_secret(
        book, provider, TENANT, ENV, NAME, value, rotate_every=86400, generate=32
    )
    again = await set_secret(
        book, provider, TENANT, ENV, NAME, generate_value(32), now=at(2026, 12, 1)
    )

    assert (record.rotate_every, record.generate) == (86400, 32)
    assert (again.rotate_every, again.generate) == (86400, 32)  # kept when not given
    assert (await book.read(TENANT, ENV))[NAME] == again


async def test_an_empty_value_is_refused(book: TreeBook, provider: LocalKeyProvider) -> None:
    with pytest.raises(SecretError, match=f"secret {NAME!r} of {TENANT}/{ENV}: the value is empty"):
        await set_secret(book, provider, TENANT, ENV, NAME, b"")
    assert not book.path(TENANT, ENV).exists()


@pytest.mark.parametrize("size", [16, 32, 4096])
def test_a_generated_value_is_url_safe_text_of_that_many_random_bytes(size: int) -> None:
    value = generate_value(size)

    assert re.fullmatch(rb"[A-Za-z0-9_-]+", value)
    assert len(base64.urlsafe_b64decode(value + b"=" * (-len(value) % 4))) == size
    assert generate_value(size) != value


@pytest.mark.parametrize("size", [0, 8, 15, 4097, 5000])
def test_a_generated_value_of_too_few_or_too_many_bytes_is_refused(size: int) -> None:
    with pytest.raises(SecretError, match=f"--generate {size}: give 16 to 4096 bytes"):
        generate_value(size)


def certificate(not_after: datetime) -> tuple[bytes, bytes]:
    """A self-signed certificate valid until `not_after`, and its private key (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "db.aurora.example")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_after - timedelta(days=90))
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), private


async def test_a_certificates_expiry_is_read_from_it(
    book: TreeBook, provider: LocalKeyProvider
) -> None:
    not_after = datetime(2027, 3, 1, 12, 30, tzinfo=UTC)
    pem, private = certificate(not_after)
    expected = int(not_after.timestamp()) * 1_000_000_000

    assert certificate_expiry(pem) == expected
    assert certificate_expiry(private + pem) == expected  # a bundle: key first
    assert certificate_expiry(PLAIN) == 0
    assert certificate_expiry(private) == 0

    record = await set_secret(book, provider, TENANT, ENV, "tls/cert", private + pem)
    assert record.not_after == expected
    assert (await book.read(TENANT, ENV))["tls/cert"].not_after == expected
    plain = await set_secret(book, provider, TENANT, ENV, "tls/cert", PLAIN)
    assert plain.not_after == 0  # the newest value is no certificate


@pytest.mark.parametrize(
    "value",
    [
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        b"-----BEGIN CERTIFICATE-----\nnot base64 at all!\n",
    ],
)
def test_a_garbled_certificate_is_refused_without_its_text(value: bytes) -> None:
    with pytest.raises(SecretError, match="holds a PEM certificate that does not parse") as refused:
        certificate_expiry(value)

    assert b"AAAA" not in str(refused.value).encode() and "base64" not in str(refused.value)


# -- a clean stop leaves the fleet (rollout.py) ---------------------------------------------
def ack(status: str, *, received_at: int = 0, applied_at: int = 0) -> Ack:
    return Ack(
        tenant=TENANT,
        env=ENV,
        version=3,
        instance="api-1",
        service="api",
        status=status,
        received_at=received_at,
        applied_at=applied_at,
    )


def stop_at(moment: int) -> Ack:
    return ack("stopped", received_at=moment, applied_at=moment)


def test_an_instance_without_a_stop_has_not_stopped() -> None:
    assert not has_stopped(None)
    assert not has_stopped(None, ack("applied", received_at=5, applied_at=6), None)


def test_a_stop_after_every_answer_means_the_instance_left() -> None:
    applied = ack("applied", received_at=100, applied_at=110)
    rejected = ack("rejected", received_at=90, applied_at=0)

    assert has_stopped(stop_at(200), applied, rejected)
    assert has_stopped(stop_at(200), applied, None)
    assert has_stopped(stop_at(200))  # stopped before it answered anything
    assert has_stopped(stop_at(100), applied)  # received at the very moment it stopped


def test_an_answer_after_the_stop_means_the_instance_is_back() -> None:
    stop = stop_at(200)

    assert not has_stopped(stop, ack("applied", received_at=300, applied_at=310))
    assert not has_stopped(stop, ack("applied", received_at=100), ack("rejected", received_at=201))
    # Without a receive time, the apply time says when it answered.
    assert not has_stopped(stop, ack("applied", applied_at=250))
    assert has_stopped(stop, ack("applied", applied_at=150))


# -- the plaintext never shows -------------------------------------------------------------------
async def test_the_plaintext_shows_nowhere_but_where_it_is_asked_for(
    root: Path, book: TreeBook, provider: LocalKeyProvider
) -> None:
    record = await set_secret(book, provider, TENANT, ENV, NAME, PLAIN)
    tree = EnvironmentTree(root)
    config = readable(tree.resolve(ENV, TENANT), provider)
    ref = config.get(KEY)
    errors: list[str] = []
    attempts: list[Callable[[], object]] = [
        lambda: config.secret(KEY, version=9),
        lambda: sealed_config(provider, [seal(provider, 1)], name=OIDC).secret("db.password"),
        lambda: sealed_config(provider, [flipped(record.versions[0], "ciphertext")]).secret(
            "db.password"
        ),
        lambda: ResolvedConfig(config.data, env=ENV, tenant=TENANT).secret(KEY),
        lambda: sealed_config(keys(), list(record.versions)).secret("db.password"),
    ]
    for attempt in attempts:
        with pytest.raises(SecretError) as refused:
            attempt()
        errors.append(str(refused.value))

    shown = [
        repr(record),
        str(record),
        repr(ref),
        ref.shown(),
        repr(config),
        repr(config.secrets),
        json.dumps(config.redacted()),
        config.canonical_json.decode(),
        json.dumps(config.to_dict()),
        book.path(TENANT, ENV).read_text(encoding="utf-8"),
        *errors,
    ]
    for text in shown:
        assert PLAIN_TEXT not in text
        assert base64.b64encode(PLAIN).decode() not in text
        assert base64.urlsafe_b64encode(PLAIN).decode().rstrip("=") not in text
    assert config.secret(KEY) == PLAIN_TEXT  # and it is there when asked for
