"""Key-encryption keys held by `LocalKeyProvider`: a new key per tenant (current when it
is the first, or when asked), another one made current, a service's tenants picked out,
a key file written at once with mode 0600 and read back, every way a key file or a
``CONFIGBUS_KEK_*`` variable can be wrong, and the errors around opening: a key
provider's own failure, a stream's data key, the reader's bounded data key cache, and
sealed text that is not one. Shapes already pinned by test_secrets_crypto.py (a world
readable file, a short key, a current key not listed, a variable without ':') are not
repeated here."""

from __future__ import annotations

import base64
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from configbus.crypto.secrets import (
    LocalKeyProvider,
    SealedSecret,
    SecretReader,
    data_key_of,
    open_secret,
    seal_secret,
)
from configbus.errors import KeyringError, SecretError

T = 1_800_000_000  # 2027-01-15 08:00:00 UTC
STAMP = "20270115-080000"
VALUE = b"correct horse battery staple"


def key(byte: int) -> bytes:
    return bytes([byte]) * 32


def encoded(byte: int) -> str:
    return base64.b64encode(key(byte)).decode()


@pytest.fixture
def provider() -> LocalKeyProvider:
    """acme with two KEKs (acme-2 current), globex with one."""
    return LocalKeyProvider(
        {
            "acme": ("acme-2", {"acme-1": key(1), "acme-2": key(2)}),
            "globex": ("globex-1", {"globex-1": key(3)}),
        }
    )


@pytest.fixture
def far_from_utc() -> Iterator[None]:
    """A local time zone 5:30 ahead of UTC, so a stamp in local time would differ."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "IST-5:30"
    time.tzset()
    yield
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


# -- new keys ---------------------------------------------------------------------------
@pytest.mark.usefixtures("far_from_utc")
def test_a_tenants_first_key_is_current_and_its_id_carries_the_utc_time() -> None:
    assert time.strftime("%H%M", time.localtime(T)) == "1330"  # the zone is in effect

    provider, kek_id = LocalKeyProvider({}).with_new_key("acme", now=T)

    assert kek_id == f"acme-{STAMP}"
    assert provider.tenants == ["acme"]
    assert provider.kek_ids("acme") == [kek_id]
    assert seal_secret(provider, "acme", "prod", "x", 1, VALUE).kek_id == kek_id


def test_a_later_key_is_not_current_unless_asked_and_every_key_stays(
    provider: LocalKeyProvider,
) -> None:
    old = seal_secret(provider, "acme", "prod", "db/password", 1, VALUE)

    added, later = provider.with_new_key("acme", now=T)
    chosen, newest = added.with_new_key("acme", current=True, now=T + 60)

    assert later == f"acme-{STAMP}" and newest == "acme-20270115-080100"
    assert added.kek_ids("acme") == ["acme-2", "acme-1", later]
    assert seal_secret(added, "acme", "prod", "x", 1, VALUE).kek_id == "acme-2"
    assert chosen.kek_ids("acme") == [newest, "acme-1", "acme-2", later]
    assert seal_secret(chosen, "acme", "prod", "x", 1, VALUE).kek_id == newest
    assert open_secret(chosen, "acme", "prod", "db/password", old) == VALUE
    assert provider.kek_ids("acme") == ["acme-2", "acme-1"]  # the original is unchanged
    assert chosen.kek_ids("globex") == ["globex-1"]


def test_a_new_tenants_first_key_is_current_beside_other_tenants(
    provider: LocalKeyProvider,
) -> None:
    added, kek_id = provider.with_new_key("initech", now=T)

    assert added.tenants == ["acme", "globex", "initech"]
    assert added.kek_ids("initech") == [kek_id]
    assert added.kek_ids("acme") == ["acme-2", "acme-1"]


def test_a_second_key_within_the_same_second_is_refused(provider: LocalKeyProvider) -> None:
    added, kek_id = provider.with_new_key("acme", now=T)

    with pytest.raises(KeyringError, match=f"tenant 'acme' already has a key {kek_id!r}; wait"):
        added.with_new_key("acme", now=T + 0.5)


# -- the current key, a service's tenants -------------------------------------------------
def test_using_makes_a_held_key_current(provider: LocalKeyProvider) -> None:
    older = provider.using("acme", "acme-1")

    assert older.kek_ids("acme") == ["acme-1", "acme-2"]
    assert seal_secret(older, "acme", "prod", "x", 1, VALUE).kek_id == "acme-1"
    assert provider.kek_ids("acme") == ["acme-2", "acme-1"]


@pytest.mark.parametrize(("tenant", "kek_id"), [("acme", "acme-9"), ("initech", "acme-1")])
def test_using_a_key_not_held_is_refused(
    provider: LocalKeyProvider, tenant: str, kek_id: str
) -> None:
    with pytest.raises(KeyringError) as refused:
        provider.using(tenant, kek_id)

    assert str(refused.value) == f"tenant {tenant!r} has no key-encryption key {kek_id!r}"


def test_kek_ids_lists_the_current_key_first_then_the_others_sorted() -> None:
    keys = {"acme-c": key(1), "acme-a": key(2), "acme-b": key(3)}
    provider = LocalKeyProvider({"acme": ("acme-b", keys)})

    assert provider.kek_ids("acme") == ["acme-b", "acme-a", "acme-c"]
    assert provider.kek_ids("initech") == []


def test_only_keeps_the_named_tenants_keys_and_opens_nothing_else(
    provider: LocalKeyProvider,
) -> None:
    globex_secret = seal_secret(provider, "globex", "prod", "x", 1, VALUE)

    acme = provider.only(["acme"])

    assert acme.tenants == ["acme"]
    assert acme.kek_ids("acme") == ["acme-2", "acme-1"]
    with pytest.raises(SecretError, match="tenant 'globex' has no key-encryption key"):
        open_secret(acme, "globex", "prod", "x", globex_secret)
    assert provider.only([]).tenants == []


def test_only_a_tenant_without_keys_is_refused(provider: LocalKeyProvider) -> None:
    with pytest.raises(KeyringError, match="no key-encryption key for tenant 'initech'"):
        provider.only(["acme", "initech"])


# -- the key file -----------------------------------------------------------------------
def test_save_writes_a_private_file_that_reads_back_whole(
    provider: LocalKeyProvider, tmp_path: Path
) -> None:
    path = tmp_path / "new" / "dir" / "keks.yml"
    sealed = seal_secret(provider, "acme", "prod", "db/password", 1, VALUE)

    provider.save(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert list(path.parent.iterdir()) == [path]  # no temporary file left
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert document["tenants"]["acme"] == {
        "current": "acme-2",
        "keys": {"acme-1": encoded(1), "acme-2": encoded(2)},
    }
    again = LocalKeyProvider.from_file(path)
    assert again.tenants == provider.tenants
    assert again.kek_ids("acme") == provider.kek_ids("acme")
    assert open_secret(again, "acme", "prod", "db/password", sealed) == VALUE


def test_save_over_a_group_readable_file_replaces_it_with_a_private_one(
    provider: LocalKeyProvider, tmp_path: Path
) -> None:
    path = tmp_path / "keks.yml"
    path.write_text("old", encoding="utf-8")
    path.chmod(0o640)

    provider.only(["globex"]).save(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert LocalKeyProvider.from_file(path).tenants == ["globex"]
    assert list(tmp_path.iterdir()) == [path]


def test_a_save_that_fails_leaves_the_old_file_and_no_temporary_one(
    provider: LocalKeyProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keks.yml"
    provider.only(["acme"]).save(path)
    before = path.read_bytes()

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(yaml, "safe_dump", full_disk)
    with pytest.raises(OSError, match="No space left"):
        provider.save(path)

    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


def key_file(tmp_path: Path, text: str | bytes, mode: int = 0o600) -> Path:
    path = tmp_path / "keks.yml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


GOOD = f"tenants:\n  acme:\n    current: acme-1\n    keys:\n      acme-1: {encoded(5)}\n"


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        (0o604, "readable by others; chmod 600 it (or 640)"),
        (0o602, "readable by others; chmod 600 it (or 640)"),  # any access by others
        (0o620, "writable by its group; chmod 600 it (or 640)"),
        (0o660, "writable by its group; chmod 600 it (or 640)"),
    ],
)
def test_a_key_file_others_or_its_group_could_change_is_refused(
    tmp_path: Path, mode: int, message: str
) -> None:
    path = key_file(tmp_path, GOOD, mode)

    with pytest.raises(KeyringError) as refused:
        LocalKeyProvider.from_file(path)

    assert str(refused.value) == f"{path}: {message}"


@pytest.mark.parametrize("mode", [0o640, 0o600, 0o400])
def test_a_key_file_its_group_may_only_read_is_accepted(tmp_path: Path, mode: int) -> None:
    provider = LocalKeyProvider.from_file(key_file(tmp_path, GOOD, mode))

    assert provider.kek_ids("acme") == ["acme-1"]


def test_a_missing_key_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.yml"

    with pytest.raises(KeyringError) as refused:
        LocalKeyProvider.from_file(path)

    assert str(refused.value) == f"{path}: cannot read the key file: No such file or directory"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tenants: [acme\n", "not a YAML key file"),
        (b"tenants:\n  \xff\xfe: x\n", "not a YAML key file"),  # not UTF-8
        ("", "a key file is a mapping with only 'tenants'"),
        ("- acme\n", "a key file is a mapping with only 'tenants'"),
        ("tenants: [acme]\n", "a key file is a mapping with only 'tenants'"),
        (GOOD + "extra: 1\n", "a key file is a mapping with only 'tenants'"),
        ("tenants:\n  acme: acme-1\n", "tenant 'acme': needs exactly 'current' and 'keys'"),
        (
            "tenants:\n  acme:\n    current: acme-1\n",
            "tenant 'acme': needs exactly 'current' and 'keys'",
        ),
        (
            GOOD.replace("    keys:", "    note: x\n    keys:"),
            "tenant 'acme': needs exactly 'current' and 'keys'",
        ),
        (
            "tenants:\n  acme:\n    current: acme-1\n    keys: {}\n",
            "tenant 'acme': 'keys' must map key ids to base64 keys",
        ),
        (
            f"tenants:\n  acme:\n    current: acme-1\n    keys: [{encoded(5)}]\n",
            "tenant 'acme': 'keys' must map key ids to base64 keys",
        ),
        (
            GOOD.replace(encoded(5), "not*base64*at*all"),
            "tenant 'acme', key 'acme-1': not valid base64",
        ),
        (GOOD.replace(encoded(5), "12345"), "tenant 'acme', key 'acme-1': not a base64 string"),
        (GOOD.replace("acme-1", "Acme_1"), "tenant 'acme': malformed key id 'Acme_1'"),
    ],
)
def test_a_key_file_of_the_wrong_shape_is_refused_naming_the_file_and_tenant(
    tmp_path: Path, text: str | bytes, message: str
) -> None:
    path = key_file(tmp_path, text)

    with pytest.raises(KeyringError) as refused:
        LocalKeyProvider.from_file(path)

    assert str(refused.value) == f"{path}: {message}"
    assert encoded(5) not in str(refused.value)


# -- keys from variables ----------------------------------------------------------------
def test_keks_from_variables_ignore_every_other_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in list(os.environ):
        if name.startswith("CONFIGBUS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CONFIGBUS_KEK_ACME", f"acme-7:{encoded(7)}")
    monkeypatch.setenv("CONFIGBUS_KEK_GLOBEX", "")  # set but empty: no key
    monkeypatch.setenv("CONFIGBUS_SECRET_KEYS", "/nowhere/keks.yml")
    monkeypatch.setenv("KEK_INITECH", f"initech-1:{encoded(8)}")

    provider = LocalKeyProvider.from_env()

    assert provider.tenants == ["acme"]
    assert provider.kek_ids("acme") == ["acme-7"]
    assert LocalKeyProvider.from_env({"PATH": "/bin", "HOME": "/root"}).tenants == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("acme-1:not*base64", "CONFIGBUS_KEK_ACME: not valid base64"),
        ("acme-1:" + base64.b64encode(b"short").decode(), "CONFIGBUS_KEK_ACME: a key is 32"),
        (f"ACME:{encoded(1)}", "tenant 'acme': malformed key id 'ACME'"),
    ],
)
def test_a_malformed_kek_variable_is_refused_without_its_key(value: str, message: str) -> None:
    with pytest.raises(KeyringError, match=message) as refused:
        LocalKeyProvider.from_env({"CONFIGBUS_KEK_ACME": value})

    assert value.partition(":")[2] not in str(refused.value)


# -- opening ----------------------------------------------------------------------------
class DownKms:
    """A key provider that wraps with `inner` and whose unwrap fails as a KMS would."""

    def __init__(self, inner: LocalKeyProvider) -> None:
        self.inner = inner

    def wrap(self, tenant: str, data_key: bytes, context: bytes) -> tuple[str, bytes]:
        return self.inner.wrap(tenant, data_key, context)

    def unwrap(self, tenant: str, kek_id: str, wrapped: bytes, context: bytes) -> bytes:
        raise RuntimeError("kms down")


def test_a_providers_own_failure_is_a_secret_error_naming_the_secret(
    provider: LocalKeyProvider,
) -> None:
    kms = DownKms(provider)
    sealed = seal_secret(kms, "acme", "prod", "db/password", 3, VALUE)

    with pytest.raises(SecretError) as refused:
        open_secret(kms, "acme", "prod", "db/password", sealed)

    assert str(refused.value) == (
        "secret 'db/password' of acme/prod (v3): the key provider failed to unwrap its "
        "data key (RuntimeError)"
    )
    assert isinstance(refused.value.__cause__, RuntimeError)
    reader = SecretReader(kms, "acme", "prod")
    with pytest.raises(SecretError, match=r"\(RuntimeError\)"):
        reader.open("db/password", [sealed.encode()])


def test_a_streams_data_key_that_does_not_unwrap_names_the_stream(
    provider: LocalKeyProvider,
) -> None:
    sealed = seal_secret(provider, "acme", "prod", "db/password", 1, VALUE)

    with pytest.raises(SecretError) as refused:
        data_key_of(provider.only(["globex"]), "acme", "prod", sealed)

    assert str(refused.value).startswith("acme/prod: the stream's data key: tenant 'acme'")


def test_the_data_keys_a_reader_keeps_are_bounded(provider: LocalKeyProvider) -> None:
    data_keys = {(f"old-{n}", b"w"): key(9) for n in range(256)}
    sealed = seal_secret(provider, "acme", "prod", "db/password", 1, VALUE)

    opened = open_secret(provider, "acme", "prod", "db/password", sealed, data_keys=data_keys)

    assert opened == VALUE
    assert len(data_keys) == 256
    assert ("old-0", b"w") not in data_keys  # the oldest went
    assert (sealed.kek_id, sealed.wrapped_key) in data_keys


# -- sealed text ------------------------------------------------------------------------
def parts_of(provider: LocalKeyProvider) -> list[str]:
    return seal_secret(provider, "acme", "prod", "x", 1, VALUE).encode().split(".")


@pytest.mark.parametrize(
    ("index", "replacement"),
    [
        (3, "a+b/"),  # not base64url
        (4, "A"),  # no whole byte
        (4, "AAAAAAAAAAAAAA"),  # a nonce of 10 bytes
        (5, "a=="),  # padding is not part of the text
        (1, "0"),  # versions start at 1
    ],
)
def test_sealed_text_with_a_malformed_part_is_refused(
    provider: LocalKeyProvider, index: int, replacement: str
) -> None:
    parts = parts_of(provider)
    parts[index] = replacement

    with pytest.raises(SecretError) as refused:
        SealedSecret.decode(".".join(parts), what="db/password")

    assert str(refused.value) == "db/password: malformed sealed secret"


@pytest.mark.parametrize("text", [None, b"cbsec1.1.acme-2.a.b.c", 7])
def test_a_sealed_secret_that_is_not_text_is_refused(text: object) -> None:
    with pytest.raises(SecretError) as refused:
        SealedSecret.decode(text)  # type: ignore[arg-type]

    assert str(refused.value) == "the secret: not a sealed secret (cbsec1.VERSION.KEK...)"
