"""Secret values under AES-256-GCM envelope encryption: they open only for the tenant,
environment, name and version they were sealed for, with that tenant's key-encryption
key; a bit changed anywhere refuses; errors and reprs never hold a key or a value."""

from __future__ import annotations

import base64
import dataclasses
import os
from pathlib import Path

import pytest

from configbus.crypto.secrets import (
    LocalKeyProvider,
    SealedSecret,
    SecretError,
    open_secret,
    rewrap,
    seal_secret,
)
from configbus.errors import KeyringError

VALUE = b"correct horse battery staple"


def key(byte: int) -> bytes:
    return bytes([byte]) * 32


@pytest.fixture
def provider() -> LocalKeyProvider:
    return LocalKeyProvider(
        {
            "acme": ("acme-2", {"acme-1": key(1), "acme-2": key(2)}),
            "globex": ("globex-1", {"globex-1": key(3)}),
        }
    )


def test_a_sealed_secret_opens_for_its_own_stream_name_and_version(
    provider: LocalKeyProvider,
) -> None:
    sealed = seal_secret(provider, "acme", "prod", "db/password", 3, VALUE)
    text = sealed.encode()

    opened = open_secret(provider, "acme", "prod", "db/password", SealedSecret.decode(text))

    assert opened == VALUE
    assert text.startswith("cbsec1.3.acme-2.") and VALUE.decode() not in text
    assert "correct" not in repr(sealed) and "key" not in repr(provider).replace("Key", "")


@pytest.mark.parametrize(
    ("tenant", "env", "name", "version"),
    [
        ("acme", "staging", "db/password", 3),  # moved to another environment
        ("acme", "prod", "api/token", 3),  # moved to another name
        ("acme", "prod", "db/password", 4),  # relabelled as another version
    ],
)
def test_a_ciphertext_moved_elsewhere_does_not_open_and_the_error_names_no_value(
    provider: LocalKeyProvider, tenant: str, env: str, name: str, version: int
) -> None:
    sealed = seal_secret(provider, "acme", "prod", "db/password", 3, VALUE)
    moved = dataclasses.replace(sealed, version=version)

    with pytest.raises(SecretError) as refused:
        open_secret(provider, tenant, env, name, moved)

    assert f"secret {name!r} of {tenant}/{env}" in str(refused.value)
    assert VALUE.decode() not in str(refused.value)


def test_another_tenants_key_opens_nothing(provider: LocalKeyProvider) -> None:
    sealed = seal_secret(provider, "acme", "prod", "db/password", 1, VALUE)
    globex_only = LocalKeyProvider({"globex": ("globex-1", {"globex-1": key(3)})})

    with pytest.raises(SecretError, match="has no key-encryption key 'acme-2' here"):
        open_secret(globex_only, "acme", "prod", "db/password", sealed)
    with pytest.raises(SecretError, match="tenant 'globex' has no key-encryption key"):
        open_secret(provider, "globex", "prod", "db/password", sealed)  # globex's stream
    forged = seal_secret(provider, "globex", "prod", "db/password", 1, VALUE)
    as_acme = dataclasses.replace(forged, kek_id="acme-2")  # globex's data key, acme's KEK
    with pytest.raises(SecretError, match="the data key does not open with acme's key"):
        open_secret(provider, "acme", "prod", "db/password", as_acme)


@pytest.mark.parametrize("part", ["wrapped_key", "nonce", "ciphertext"])
def test_one_bit_changed_anywhere_refuses(provider: LocalKeyProvider, part: str) -> None:
    sealed = seal_secret(provider, "acme", "prod", "db/password", 1, VALUE)
    data = bytearray(getattr(sealed, part))
    data[len(data) // 2] ^= 1
    tampered = dataclasses.replace(sealed, **{part: bytes(data)})

    with pytest.raises(SecretError) as refused:
        open_secret(provider, "acme", "prod", "db/password", tampered)

    assert "does not open" in str(refused.value)


def test_a_new_kek_rewraps_the_data_key_and_old_ciphertext_still_opens(
    provider: LocalKeyProvider,
) -> None:
    old = seal_secret(provider, "acme", "prod", "db/password", 1, VALUE)
    rotated = LocalKeyProvider({"acme": ("acme-3", {"acme-2": key(2), "acme-3": key(9)})})

    moved = rewrap(rotated, "acme", "prod", old)

    assert (moved.kek_id, moved.ciphertext) == ("acme-3", old.ciphertext)
    only_new = LocalKeyProvider({"acme": ("acme-3", {"acme-3": key(9)})})
    assert open_secret(only_new, "acme", "prod", "db/password", moved) == VALUE
    assert open_secret(rotated, "acme", "prod", "db/password", old) == VALUE


@pytest.mark.parametrize(
    "text",
    ["", "plain", "cbsec1.1.acme-2.a.b", "cbsec1.x.acme-2.a.b.c", "cbsec1.1.ACME.a.b.c"],
)
def test_text_that_is_not_a_sealed_secret_is_named_as_such(text: str) -> None:
    with pytest.raises(SecretError, match=r"db/password: (not a|malformed) sealed secret"):
        SealedSecret.decode(text, what="db/password")


def test_the_key_file_must_be_private_and_well_formed(tmp_path: Path) -> None:
    path = tmp_path / "keks.yml"
    encoded = base64.b64encode(key(5)).decode()
    path.write_text(f"tenants:\n  acme:\n    current: acme-1\n    keys:\n      acme-1: {encoded}\n")
    os.chmod(path, 0o644)
    with pytest.raises(KeyringError, match="readable by others; chmod 600 it"):
        LocalKeyProvider.from_file(path)

    os.chmod(path, 0o600)
    provider = LocalKeyProvider.from_file(path)
    sealed = seal_secret(provider, "acme", "dev", "x", 1, b"v")
    assert open_secret(provider, "acme", "dev", "x", sealed) == b"v"

    path.write_text("tenants:\n  acme:\n    current: acme-1\n    keys:\n      acme-1: c2hvcnQ=\n")
    with pytest.raises(KeyringError, match="tenant 'acme', key 'acme-1': a key is 32 bytes"):
        LocalKeyProvider.from_file(path)
    path.write_text("tenants:\n  acme:\n    current: acme-9\n    keys:\n      acme-1: " + encoded)
    with pytest.raises(KeyringError, match="current KEK 'acme-9' is not listed"):
        LocalKeyProvider.from_file(path)


def test_keks_from_the_environment_serve_their_tenant_only() -> None:
    encoded = base64.b64encode(key(7)).decode()

    provider = LocalKeyProvider.from_env({"CONFIGBUS_KEK_ACME_RECORDS": f"ar-1:{encoded}"})

    assert provider.tenants == ["acme-records"]
    sealed = seal_secret(provider, "acme-records", "prod", "x", 1, b"v")
    assert sealed.kek_id == "ar-1"
    with pytest.raises(SecretError, match="no key-encryption key for tenant 'globex'"):
        seal_secret(provider, "globex", "prod", "x", 1, b"v")
    with pytest.raises(KeyringError, match="CONFIGBUS_KEK_ACME: expected <kek id>:<base64 key>"):
        LocalKeyProvider.from_env({"CONFIGBUS_KEK_ACME": encoded})
