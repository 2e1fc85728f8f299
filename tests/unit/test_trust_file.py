"""The trust file fails closed: a typo, a field this version does not implement, an
operator entry without a stated scope or a scope that lists nothing is an error (one
line naming the file, the entry and the field), never a key trusted for more."""

from __future__ import annotations

from pathlib import Path

import pytest

from configbus.crypto import OPERATOR, TrustStore, generate_keypair
from configbus.errors import KeyringError

KNOWN = "(known: kid, public_key, public_key_file, tenants, environments, role, max_ttl)"
SCOPE = "    tenants: [acme]\n    environments: [prod]\n"


def _trust(tmp_path: Path, text: str) -> Path:
    for kid in ("alice", "main"):
        if not (tmp_path / f"{kid}.pub").exists():
            generate_keypair(kid, tmp_path)
    path = tmp_path / "trust.yml"
    path.write_text(text, encoding="utf-8")
    return path


def _operator(tmp_path: Path, fields: str) -> Path:
    return _trust(tmp_path, "operators:\n  - kid: alice\n    public_key_file: alice.pub\n" + fields)


def _publisher(tmp_path: Path, fields: str) -> Path:
    return _trust(tmp_path, "publishers:\n  - kid: main\n    public_key_file: main.pub\n" + fields)


def _error(path: Path) -> str:
    with pytest.raises(KeyringError) as caught:
        TrustStore.load(path)
    message = str(caught.value)
    assert "\n" not in message
    return message


# -- unknown keys and fields ----------------------------------------------------------


def test_an_unknown_top_level_key_is_named(tmp_path: Path) -> None:
    path = _publisher(tmp_path, "operator:\n  - kid: alice\n")

    assert _error(path) == f"{path}: unknown key 'operator' (known: operators, publishers)"


@pytest.mark.parametrize(
    ("typo", "field"),
    [
        ("    tenant: [acme]\n    environments: [prod]\n", "tenant"),
        ("    tenants: [acme]\n    enviroments: [prod]\n", "enviroments"),
    ],
)
def test_a_misspelt_operator_field_is_an_error_not_every_tenant(
    tmp_path: Path, typo: str, field: str
) -> None:
    path = _operator(tmp_path, typo + "    max_ttl: 1h\n")

    assert _error(path) == f"{path}: operator 'alice': unknown field {field!r} {KNOWN}"


def test_a_misspelt_publisher_field_is_an_error(tmp_path: Path) -> None:
    path = _publisher(tmp_path, "    tenant: [acme]\n")

    assert _error(path) == f"{path}: publisher 'main': unknown field 'tenant' {KNOWN}"


def test_every_unknown_field_is_named_at_once(tmp_path: Path) -> None:
    path = _publisher(tmp_path, "    tenant: [acme]\n    envs: [prod]\n")

    assert _error(path) == f"{path}: publisher 'main': unknown fields 'tenant', 'envs' {KNOWN}"


def test_an_entry_without_a_kid_names_its_misspelt_field_by_position(tmp_path: Path) -> None:
    path = _trust(tmp_path, "publishers:\n  - kdi: main\n    public_key_file: main.pub\n")

    assert _error(path) == f"{path}: publishers[0]: unknown field 'kdi' {KNOWN}"


# -- fields planned but not implemented: refused, not ignored -------------------------


@pytest.mark.parametrize(
    ("field", "hint"),
    [
        ("revoked: true", "delete the entry to stop trusting the key"),
        ("revoked: false", "delete the entry to stop trusting the key"),
        ("not_after: 2020-01-01", "delete the entry when the key should stop being trusted"),
        ("not_before: 2030-01-01", "add the entry when the key should become trusted"),
    ],
)
def test_a_validity_field_is_refused_as_not_supported(
    tmp_path: Path, field: str, hint: str
) -> None:
    name = field.split(":")[0]
    path = _operator(tmp_path, SCOPE + f"    {field}\n    max_ttl: 1h\n")

    assert _error(path) == (
        f"{path}: operator 'alice': {name!r} is not supported by this version of configbus"
        f" (refused, not ignored): {hint}"
    )


def test_a_revoked_publisher_key_is_refused_too(tmp_path: Path) -> None:
    message = _error(_publisher(tmp_path, "    revoked: true\n"))

    assert "publisher 'main': 'revoked' is not supported by this version" in message


# -- scopes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "scope"),
    [
        ("    environments: [prod]\n", "tenants"),
        ("    tenants: [acme]\n", "environments"),
        ("", "tenants"),
    ],
)
def test_an_operator_entry_must_state_its_scope(tmp_path: Path, fields: str, scope: str) -> None:
    path = _operator(tmp_path, fields + "    max_ttl: 1h\n")

    assert _error(path) == (
        f"{path}: operator 'alice': an operator key needs {scope} (a list of names, or ['*'])"
    )


def test_a_publisher_entry_still_defaults_to_every_tenant_and_environment(
    tmp_path: Path,
) -> None:
    entry = TrustStore.load(_publisher(tmp_path, "")).get("main")

    assert entry is not None
    assert (entry.tenants, entry.environments) == (frozenset({"*"}), frozenset({"*"}))


@pytest.mark.parametrize(
    ("role", "fields", "scope"),
    [
        ("operator", "    tenants: []\n    environments: [prod]\n    max_ttl: 1h\n", "tenants"),
        (
            "operator",
            "    tenants: [acme]\n    environments: []\n    max_ttl: 1h\n",
            "environments",
        ),
        ("publisher", "    tenants: []\n", "tenants"),
        ("publisher", "    environments: []\n", "environments"),
    ],
)
def test_an_empty_scope_is_an_error(tmp_path: Path, role: str, fields: str, scope: str) -> None:
    if role == "operator":
        path, entry = _operator(tmp_path, fields), "operator 'alice'"
    else:
        path, entry = _publisher(tmp_path, fields), "publisher 'main'"

    assert (
        _error(path) == f"{path}: {entry}: {scope} is empty: the key would be trusted for nothing"
    )


# -- the public key -----------------------------------------------------------------------


def test_public_key_and_public_key_file_exclude_each_other(tmp_path: Path) -> None:
    path = _publisher(tmp_path, "    public_key: |\n      not read\n")

    assert _error(path) == (
        f"{path}: publisher 'main': give public_key or public_key_file, not both"
    )


# -- what still loads ---------------------------------------------------------------------


def test_a_complete_trust_file_loads_and_round_trips(tmp_path: Path) -> None:
    path = _trust(
        tmp_path,
        "publishers:\n  - kid: main\n    public_key_file: main.pub\n    role: publisher\n"
        "operators:\n  - kid: alice\n    public_key_file: alice.pub\n    role: operator\n"
        + SCOPE
        + "    max_ttl: 2h\n",
    )

    trust = TrustStore.load(path)
    alice = trust.get("alice")

    assert alice is not None
    assert (alice.role, alice.max_ttl) == (OPERATOR, 7200)
    assert alice.covers("acme", "prod") and not alice.covers("bank-of-x", "prod")
    again = tmp_path / "again.yml"
    again.write_text(trust.dump(), encoding="utf-8")
    reloaded = TrustStore.load(again)
    assert reloaded.entries() == trust.entries()
