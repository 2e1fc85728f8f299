"""`SecretsManager` over a copy of the sample tree and over a running subscriber on the
in-memory bus: a secret read by the config key that references it or by its name, from
the stream its arguments or ``CONFIGBUS_*`` variables name, with key-encryption keys
from a provider, a key file or the environment; listed without values; rotated into the
tree. No Kafka, no Redis. A known plaintext is checked never to show where it was not
asked for."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from configbus import SecretsManager
from configbus.bus import MemoryBus, TopicNames
from configbus.crypto import LocalKeyProvider, SigningKey, TrustStore, generate_keypair
from configbus.errors import ConfigBusError, SecretError, SettingsError, UnknownNameError
from configbus.events import Cause, build_body, now_ns, seal
from configbus.ops.secrets import TreeBook, set_secret
from configbus.subscriber import ConfigSubscriber
from configbus.tree.sealed import secrets_file
from configbus.tree.tree import EnvironmentTree

from .helpers import OnMemoryBus

SAMPLE = Path(__file__).resolve().parents[2] / "environments"
TENANT, ENV = "aurora-records", "prod"
NAME = "tenants/aurora-records/postgres_password"  # referenced by aurora-records' prod layer
KEY = "database.postgresql.password"  # where it is referenced
JWT = "jwt/signing_key"  # referenced by common/base.yml, so by every tenant's prod
JWT_KEY = "security.jwt.signing_key"
OIDC = "tenants/aurora-records/oidc_client_secret"  # referenced, never set here
PLAIN = b"aurora-pg-Zq7vX2-plaintext"  # the value that must never show unasked
PLAIN_TEXT = PLAIN.decode()
GENERATED_32 = len(base64.urlsafe_b64encode(bytes(32)).rstrip(b"="))  # 32 random bytes, as text

Keks = dict[str, bytes]


@pytest.fixture(autouse=True)
def _no_configbus_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No tree, tenant, environment or keys from the environment the tests run in."""
    for name in list(os.environ):
        if name.startswith("CONFIGBUS_"):
            monkeypatch.delenv(name)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A copy of the sample tree, free to write secrets files into."""
    return Path(shutil.copytree(SAMPLE, tmp_path / "environments"))


@pytest.fixture
def keks(root: Path) -> Keks:
    """One random key-encryption key per tenant of the tree (id ``<tenant>-1``)."""
    return {tenant: os.urandom(32) for tenant in EnvironmentTree(root).tenants()}


def provider_of(keks: Keks) -> LocalKeyProvider:
    return LocalKeyProvider({t: (f"{t}-1", {f"{t}-1": key}) for t, key in keks.items()})


@pytest.fixture
def provider(keks: Keks) -> LocalKeyProvider:
    return provider_of(keks)


@pytest.fixture
def key_file(tmp_path: Path, provider: LocalKeyProvider) -> Path:
    path = tmp_path / "keks.yml"
    provider.save(path)
    return path


def put(
    root: Path, provider: LocalKeyProvider, name: str, value: bytes, tenant: str = TENANT
) -> int:
    """Seal `value` as the next version of secret `name` of tenant/prod in the tree, as
    `configbus secret set` does; returns the version."""
    book = TreeBook(root)
    return asyncio.run(set_secret(book, provider, tenant, ENV, name, value)).version


def manager(root: Path, provider: LocalKeyProvider | None = None) -> SecretsManager:
    return SecretsManager(ENV, TENANT, root=root, keys=provider)


# -- reading a secret -------------------------------------------------------------------
def test_a_secret_is_read_by_the_config_key_that_references_it_or_by_its_name(
    root: Path, provider: LocalKeyProvider
) -> None:
    put(root, provider, NAME, PLAIN)
    put(root, provider, JWT, b"jwt-signing-value")
    secrets = manager(root, provider)

    assert secrets.get_secret(KEY) == PLAIN_TEXT
    assert secrets.get_secret(NAME) == PLAIN_TEXT
    assert secrets.get_secret(JWT_KEY) == "jwt-signing-value"
    assert secrets.get_secret(JWT) == "jwt-signing-value"


def test_the_environment_may_be_named_by_its_alias(root: Path, provider: LocalKeyProvider) -> None:
    put(root, provider, NAME, PLAIN)

    secrets = SecretsManager("production", TENANT, root=root, keys=provider)

    assert (secrets.tenant, secrets.env) == (TENANT, "prod")
    assert secrets.get_secret(KEY) == PLAIN_TEXT


def test_the_tree_tenant_and_environment_default_to_their_variables(
    root: Path, provider: LocalKeyProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(root, provider, NAME, PLAIN)
    monkeypatch.setenv("CONFIGBUS_ROOT", str(root))
    monkeypatch.setenv("CONFIGBUS_TENANT", TENANT)
    monkeypatch.setenv("CONFIGBUS_ENV", "production")

    secrets = SecretsManager(keys=provider)

    assert (secrets.tenant, secrets.env) == (TENANT, "prod")
    assert secrets.tree is not None and secrets.tree.root == root
    assert secrets.get_secret(KEY) == PLAIN_TEXT


@pytest.mark.parametrize(
    ("environment", "tenant", "variables"),
    [
        (ENV, None, {}),
        (None, TENANT, {}),
        (None, None, {}),
        (None, None, {"CONFIGBUS_ENV": ENV}),
        (None, None, {"CONFIGBUS_TENANT": TENANT}),
        (ENV, "", {}),
    ],
)
def test_without_an_environment_or_a_tenant_it_is_a_settings_error(
    root: Path,
    provider: LocalKeyProvider,
    monkeypatch: pytest.MonkeyPatch,
    environment: str | None,
    tenant: str | None,
    variables: dict[str, str],
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)

    with pytest.raises(SettingsError, match="needs an environment and a tenant"):
        SecretsManager(environment, tenant, root=root, keys=provider)


def test_an_unknown_environment_is_named(root: Path, provider: LocalKeyProvider) -> None:
    with pytest.raises(UnknownNameError, match="unknown environment 'qa'"):
        SecretsManager("qa", TENANT, root=root, keys=provider)


def keys_as_path(monkeypatch: pytest.MonkeyPatch, key_file: Path, keks: Keks) -> object:
    return key_file


def keys_as_text(monkeypatch: pytest.MonkeyPatch, key_file: Path, keks: Keks) -> object:
    return str(key_file)


def keys_in_secret_keys_variable(
    monkeypatch: pytest.MonkeyPatch, key_file: Path, keks: Keks
) -> object:
    monkeypatch.setenv("CONFIGBUS_SECRET_KEYS", str(key_file))
    return None


def keys_in_kek_variable(monkeypatch: pytest.MonkeyPatch, key_file: Path, keks: Keks) -> object:
    encoded = base64.b64encode(keks[TENANT]).decode()
    monkeypatch.setenv("CONFIGBUS_KEK_AURORA_RECORDS", f"{TENANT}-1:{encoded}")
    monkeypatch.setenv("CONFIGBUS_TENANT", TENANT)  # not a KEK: ignored
    return None


@pytest.mark.parametrize(
    "keys",
    [keys_as_path, keys_as_text, keys_in_secret_keys_variable, keys_in_kek_variable],
)
def test_the_keys_come_from_a_key_file_or_the_environment(
    root: Path,
    provider: LocalKeyProvider,
    key_file: Path,
    keks: Keks,
    monkeypatch: pytest.MonkeyPatch,
    keys: Callable[[pytest.MonkeyPatch, Path, Keks], object],
) -> None:
    put(root, provider, NAME, PLAIN)
    given = keys(monkeypatch, key_file, keks)

    secrets = SecretsManager(ENV, TENANT, root=root, keys=given)  # type: ignore[arg-type]

    assert isinstance(secrets.keys, LocalKeyProvider) and secrets.keys is not provider
    assert TENANT in secrets.keys.tenants
    assert secrets.get_secret(KEY) == PLAIN_TEXT
    assert secrets.get_secret(NAME) == PLAIN_TEXT


@pytest.mark.parametrize("asked", [KEY, NAME])
def test_without_keys_the_error_names_the_secret_and_where_keys_come_from(
    root: Path, provider: LocalKeyProvider, asked: str
) -> None:
    put(root, provider, NAME, PLAIN)
    secrets = manager(root)

    with pytest.raises(SecretError) as refused:
        secrets.get_secret(asked)

    assert secrets.keys is None
    assert f"secret {NAME!r} cannot be read here" in str(refused.value)
    assert "CONFIGBUS_SECRET_KEYS" in str(refused.value)
    assert PLAIN_TEXT not in str(refused.value)


@pytest.mark.parametrize(
    "asked",
    [
        "no.such.key",
        "database.postgresql.host",  # a config key, but not a secret
        "tenants/helix-audio/postgres_password",  # another tenant's secret
        "jwt",  # a prefix of a secret's name
    ],
)
def test_a_key_or_name_without_a_secret_is_a_secret_error(
    root: Path, provider: LocalKeyProvider, asked: str
) -> None:
    put(root, provider, NAME, PLAIN)

    with pytest.raises(SecretError) as refused:
        manager(root, provider).get_secret(asked)

    assert str(refused.value) == (
        f"{TENANT}/{ENV}: no config key {asked!r} holds a secret, and no reference names it"
    )


def test_a_referenced_name_without_a_value_says_how_to_set_one(
    root: Path, provider: LocalKeyProvider
) -> None:
    with pytest.raises(SecretError, match=f"`configbus secret set {TENANT} {ENV} {OIDC}`"):
        manager(root, provider).get_secret(OIDC)


@pytest.mark.parametrize(("asked", "message"), [(KEY, "the secret is binary"), (NAME, "is binary")])
def test_a_binary_value_is_refused_as_text_without_showing_it(
    root: Path, provider: LocalKeyProvider, asked: str, message: str
) -> None:
    binary = b"\xff\xfe\x00\x80binary"
    put(root, provider, NAME, binary)

    with pytest.raises(SecretError, match=message) as refused:
        manager(root, provider).get_secret(asked)

    assert "binary" in str(refused.value) and "\\xff" not in str(refused.value)


@pytest.mark.parametrize("asked", [KEY, NAME])
def test_version_picks_an_older_live_version(
    root: Path, provider: LocalKeyProvider, asked: str
) -> None:
    put(root, provider, NAME, b"first-value")
    put(root, provider, NAME, PLAIN)
    secrets = manager(root, provider)

    assert secrets.get_secret(asked) == PLAIN_TEXT
    assert secrets.get_secret(asked, version=2) == PLAIN_TEXT
    assert secrets.get_secret(asked, version=1) == "first-value"
    with pytest.raises(SecretError, match=r"has no version 3 \(live: v2, v1\)"):
        secrets.get_secret(asked, version=3)


def test_a_key_for_another_tenant_opens_nothing(root: Path, provider: LocalKeyProvider) -> None:
    put(root, provider, NAME, PLAIN)
    helix_only = provider.only(["helix-audio"])

    with pytest.raises(SecretError, match=f"tenant {TENANT!r} has no key-encryption key"):
        manager(root, helix_only).get_secret(NAME)


# -- listing ----------------------------------------------------------------------------
def test_list_secrets_returns_the_streams_records_sorted_by_name_without_values(
    root: Path, provider: LocalKeyProvider
) -> None:
    put(root, provider, NAME, PLAIN)
    put(root, provider, JWT, b"jwt-signing-value")
    put(root, provider, JWT, b"jwt-signing-value-2")
    put(root, provider, "api/token", b"token-value")
    put(root, provider, "helix/only", b"helix-value", tenant="helix-audio")

    records = manager(root, provider).list_secrets()

    assert [r.name for r in records] == ["api/token", JWT, NAME]
    assert [r.live_versions for r in records] == [(1,), (2, 1), (1,)]
    shown = repr(records) + str(records)
    for value in (PLAIN_TEXT, "jwt-signing-value", "token-value"):
        assert value not in shown


def test_list_secrets_of_a_stream_without_secrets_is_empty(
    root: Path, provider: LocalKeyProvider
) -> None:
    put(root, provider, NAME, PLAIN, tenant="helix-audio")

    assert manager(root, provider).list_secrets() == []


# -- rotating ---------------------------------------------------------------------------
def test_rotate_secret_seals_a_new_generated_version_and_keeps_the_old_live(
    root: Path, provider: LocalKeyProvider
) -> None:
    put(root, provider, JWT, b"jwt-first-value")
    secrets = manager(root, provider)

    version = secrets.rotate_secret(JWT, reason="INC-7")

    assert version == 2
    (record,) = secrets.list_secrets()
    assert (record.name, record.live_versions) == (JWT, (2, 1))
    rotated = secrets.get_secret(JWT_KEY)
    assert rotated != "jwt-first-value" and len(rotated) == GENERATED_32
    assert secrets.get_secret(JWT_KEY, version=1) == "jwt-first-value"
    assert secrets.rotate_secret(JWT, generate=16) == 3
    assert len(secrets.get_secret(JWT)) == len(base64.urlsafe_b64encode(bytes(16)).rstrip(b"="))
    assert secrets.get_secret(JWT, version=2) == rotated


def test_rotate_secret_with_a_value_seals_that_value(
    root: Path, provider: LocalKeyProvider
) -> None:
    secrets = manager(root, provider)

    assert secrets.rotate_secret(NAME, value=PLAIN) == 1  # a first version: set
    assert secrets.rotate_secret(NAME, value=b"the-second") == 2

    assert secrets.get_secret(KEY) == "the-second"
    assert secrets.get_secret(KEY, version=1) == PLAIN_TEXT
    assert PLAIN not in secrets_file(root, TENANT, ENV).read_bytes()


def test_rotate_secret_without_keys_is_refused_and_writes_nothing(
    root: Path, provider: LocalKeyProvider
) -> None:
    put(root, provider, JWT, b"jwt-first-value")
    before = secrets_file(root, TENANT, ENV).read_bytes()

    with pytest.raises(SecretError, match=f"secret {JWT!r}: no key-encryption key to seal with"):
        manager(root).rotate_secret(JWT)

    assert secrets_file(root, TENANT, ENV).read_bytes() == before


async def test_rotate_secret_inside_a_running_event_loop_is_refused(
    root: Path, provider: LocalKeyProvider
) -> None:
    secrets = manager(root, provider)

    with pytest.raises(RuntimeError, match="call it outside a running event loop"):
        secrets.rotate_secret(JWT, value=PLAIN)

    assert not secrets_file(root, TENANT, ENV).exists()


def test_the_repr_names_the_stream_and_no_key(root: Path, keks: Keks) -> None:
    secrets = manager(root, provider_of(keks))

    assert repr(secrets) == f"SecretsManager({TENANT}/{ENV})"
    for key in keks.values():
        assert base64.b64encode(key).decode() not in repr(secrets)


# -- over a running subscriber ----------------------------------------------------------
class Stream(OnMemoryBus):
    """aurora-records/prod on a MemoryBus: snapshots of the tree copy's resolved config
    (which carries the sealed secrets), signed by a key the trust file knows."""

    tenant, env = TENANT, ENV
    topics = TopicNames(prefix="t.", audit="audit", acks="acks", state="state")

    def __init__(self, tmp_path: Path, root: Path) -> None:
        self.root = root
        self.key = SigningKey.load(generate_keypair("pub", tmp_path / "signing")[0], "pub")
        self.trust = TrustStore.of(self.key.public)
        self.bus = MemoryBus()
        self.bus.create_topic(self.topics.tenant_topic(TENANT), compact=True)
        self.bus.create_topic(self.topics.acks, compact=True)

    async def publish(self, version: int) -> None:
        """Snapshot `version`: the stream's config as the tree resolves it now."""
        config = EnvironmentTree(self.root).resolve(ENV, TENANT).canonical_json
        body = build_body(
            tenant=TENANT, env=ENV, version=version, config_json=config,
            detected_at=now_ns(), cause=Cause(actor="publisher"),
        )  # fmt: skip
        async with self.bus.producer() as producer:
            await producer.send_and_wait(
                self.topics.tenant_topic(TENANT),
                seal(body, self.key),
                key=self.topics.record_key(ENV),
            )


Running = Callable[..., Awaitable[ConfigSubscriber]]


@pytest.fixture
async def running(tmp_path: Path, root: Path, provider: LocalKeyProvider) -> AsyncIterator[Running]:
    """``await running(secret_keys=...)``: a started subscriber of aurora-records/prod
    whose snapshot carries `PLAIN` as the newest version of `NAME`; stopped after."""
    await asyncio.to_thread(put, root, provider, NAME, PLAIN)
    stream = Stream(tmp_path, root)
    await stream.publish(1)
    started: list[ConfigSubscriber] = []

    async def start(**options: object) -> ConfigSubscriber:
        subscriber: ConfigSubscriber = stream.subscriber(**options)
        await subscriber.start()
        started.append(subscriber)
        return subscriber

    yield start
    for subscriber in started:
        await subscriber.stop()


async def test_a_subscribers_secrets_open_with_its_own_keys(
    running: Running, provider: LocalKeyProvider
) -> None:
    subscriber = await running(secret_keys=provider)

    secrets = SecretsManager(subscriber=subscriber)

    assert (secrets.tenant, secrets.env, secrets.tree) == (TENANT, ENV, None)
    assert secrets.keys is provider
    assert secrets.config() is subscriber.config
    assert secrets.get_secret(KEY) == PLAIN_TEXT
    assert secrets.get_secret(NAME) == PLAIN_TEXT
    assert repr(secrets) == f"SecretsManager({TENANT}/{ENV})"


async def test_keys_given_to_the_manager_override_the_subscribers(
    running: Running, provider: LocalKeyProvider, key_file: Path, keks: Keks
) -> None:
    subscriber = await running(secret_keys=provider)
    stranger = provider_of(dict.fromkeys(keks, os.urandom(32)))  # same ids, other keys

    wrong = SecretsManager(subscriber=subscriber, keys=stranger)
    for asked in (KEY, NAME):
        with pytest.raises(SecretError, match="does not open") as refused:
            wrong.get_secret(asked)
        assert PLAIN_TEXT not in str(refused.value)
    assert subscriber.config.secret(KEY) == PLAIN_TEXT  # the subscriber's own still open

    right = SecretsManager(subscriber=subscriber, keys=key_file)  # the same keys, from a file
    assert right.keys is not provider
    assert right.get_secret(KEY) == PLAIN_TEXT
    assert right.get_secret(NAME) == PLAIN_TEXT


async def test_keys_given_to_the_manager_open_what_a_subscriber_without_keys_holds(
    running: Running, provider: LocalKeyProvider
) -> None:
    subscriber = await running()
    assert subscriber.settings.secret_keys is None

    with pytest.raises(SecretError, match="CONFIGBUS_SECRET_KEYS"):
        SecretsManager(subscriber=subscriber).get_secret(NAME)
    assert SecretsManager(subscriber=subscriber, keys=provider).get_secret(NAME) == PLAIN_TEXT


async def test_rotate_secret_of_a_service_without_a_tree_writes_no_stray_tree(
    running: Running,
    provider: LocalKeyProvider,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A service has its subscriber, not the tree: with no ``CONFIGBUS_ROOT`` and no
    ``./environments``, a rotation has no secrets file to write. It must say so, not
    make ``./environments/tenants/<tenant>/secrets/<env>.yml`` in the working directory
    and report a version 1 no publisher will ever read (the live one is newer)."""
    subscriber = await running(secret_keys=provider)
    service_dir = tmp_path / "service"
    service_dir.mkdir()
    monkeypatch.chdir(service_dir)
    secrets = SecretsManager(subscriber=subscriber)

    def rotate() -> int:
        return secrets.rotate_secret(NAME)

    with pytest.raises(ConfigBusError):
        await asyncio.to_thread(rotate)

    assert list(service_dir.iterdir()) == []
