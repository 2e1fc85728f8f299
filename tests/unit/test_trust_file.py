"""The trust file fails closed: a typo, a validity time without a zone, a revocation
detail without `revoked: true`, an operator entry without a stated scope or a scope that
lists nothing is an error (one line naming the file, the entry and the field), never a
key trusted for more."""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path

import pytest

from configbus.crypto import OPERATOR, TrustStore, generate_keypair
from configbus.crypto.trust import format_time, parse_time
from configbus.errors import KeyringError

KNOWN = (
    "(known: kid, public_key, public_key_file, tenants, environments, role, max_ttl, "
    "not_before, not_after, revoked, revoked_at, revoked_reason)"
)
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


# -- validity: not_before, not_after, revoked ---------------------------------------------


def test_a_validity_window_and_a_revocation_load_as_instants(tmp_path: Path) -> None:
    path = _publisher(
        tmp_path,
        "    not_before: 2026-11-01T00:00:00Z\n"
        "    not_after: '2026-12-01T01:00:00+01:00'\n"  # quoted: read as text, same instant
        "    revoked: true\n"
        "    revoked_at: 2026-11-03T02:14:00.5Z\n"
        "    revoked_reason: laptop stolen\n",
    )

    entry = TrustStore.load(path).get("main")

    assert entry is not None
    assert entry.not_before == parse_time("2026-11-01T00:00:00Z")
    assert entry.not_after == parse_time("2026-12-01T00:00:00Z")
    assert format_time(entry.not_before) == "2026-11-01T00:00:00Z"
    assert format_time(entry.revoked_at) == "2026-11-03T02:14:00.500000Z"
    assert (entry.revoked, entry.revoked_reason) == (True, "laptop stolen")


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("not_after: 2026-12-01", "not_after: 2026-12-01 is a date: give a time with its zone"),
        (
            "not_before: 2026-12-01T00:00:00",
            "not_before: 2026-12-01T00:00:00 has no time zone: add one",
        ),
        ("not_after: soon", "not_after: 'soon' is not an ISO 8601 time"),
        ("not_after: 1767225600", "not_after: 1767225600 is not an ISO 8601 time"),
        ("revoked: yes please", "revoked must be true or false, not 'yes please'"),
        ("revoked: 1", "revoked must be true or false, not 1"),
        ("revoked_at: 2026-11-03T02:14:00Z", "revoked_at without revoked: true"),
        ("revoked_reason: stolen", "revoked_reason without revoked: true"),
        ("revoked: false\n    revoked_reason: stolen", "revoked_reason without revoked: true"),
        (
            "not_before: 2026-12-01T00:00:00Z\n    not_after: 2026-12-01T00:00:00Z",
            "not_after must be later than not_before",
        ),
        (
            "revoked: true\n    revoked_reason: [a, b]",
            "revoked_reason must be one line of text, at most 200 characters",
        ),
    ],
)
def test_a_malformed_validity_field_is_named(tmp_path: Path, field: str, message: str) -> None:
    path = _operator(tmp_path, SCOPE + f"    {field}\n    max_ttl: 1h\n")

    error = _error(path)

    assert error.startswith(f"{path}: operator 'alice': ")
    assert message in error


def test_revoked_false_is_an_ordinary_key(tmp_path: Path) -> None:
    entry = TrustStore.load(_publisher(tmp_path, "    revoked: false\n")).get("main")

    assert entry is not None and not entry.revoked and entry.in_force(0)


def test_standing_judges_the_window_and_the_revocation_by_the_clock_given(
    tmp_path: Path,
) -> None:
    path = _publisher(
        tmp_path, "    not_before: 2026-11-01T00:00:00Z\n    not_after: 2026-12-01T00:00:00Z\n"
    )
    entry = TrustStore.load(path).get("main")
    assert entry is not None
    start, end = parse_time("2026-11-01T00:00:00Z"), parse_time("2026-12-01T00:00:00Z")

    assert entry.standing(start - 1) == (
        "key_not_yet_valid",
        "key 'main' is not valid before 2026-11-01T00:00:00Z",
    )
    assert entry.standing(start) is None
    assert entry.standing(end - 1) is None
    assert entry.standing(end) == ("key_expired", "key 'main' expired at 2026-12-01T00:00:00Z")
    revoked = dataclasses.replace(entry, revoked=True, revoked_reason="leaked")
    assert revoked.standing(start) == ("key_revoked", "key 'main' is revoked: leaked")


def test_the_validity_fields_round_trip(tmp_path: Path) -> None:
    path = _trust(
        tmp_path,
        "publishers:\n  - kid: main\n    public_key_file: main.pub\n"
        "    not_after: 2026-12-01T00:00:00Z\n"
        "operators:\n  - kid: alice\n    public_key_file: alice.pub\n"
        + SCOPE
        + "    max_ttl: 2h\n    not_before: 2026-01-01T00:00:00Z\n"
        "    revoked: true\n    revoked_at: 2026-02-01T00:00:00Z\n"
        '    revoked_reason: "left: see ticket #12"\n',
    )
    trust = TrustStore.load(path)
    again = tmp_path / "again.yml"
    trust.save(again)

    assert TrustStore.load(again).entries() == trust.entries()
    assert stat.S_IMODE(again.stat().st_mode) == 0o644


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


@pytest.mark.parametrize(
    "text",
    [
        "publishers:\n  - kid: pub-a\n    public_key_file: a.pub\n    revoked: true\n"
        "    revoked: false\n",
        "publishers:\n  - kid: pub-a\n    public_key_file: a.pub\n    revoked: true\n"
        "publishers:\n  - kid: pub-a\n    public_key_file: a.pub\n",
    ],
    ids=["field", "list"],
)
def test_a_key_given_twice_is_refused_not_the_last_one_believed(tmp_path: Path, text: str) -> None:
    """The last of two `revoked:` (or of two `publishers:` lists) would win silently."""
    generate_keypair("a", tmp_path)  # a.pub
    path = tmp_path / "trust.yml"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(KeyringError, match=r"trust\.yml:\d+: trust file: duplicate key"):
        TrustStore.load(path)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("kid: 123", "malformed key id 123"),
        ("kid: pub-a\n    not_after: 0001-01-01T00:00:00+01:00", "between 1970 and 9999"),
    ],
)
def test_a_hostile_entry_is_refused_not_a_crash(tmp_path: Path, entry: str, message: str) -> None:
    generate_keypair("a", tmp_path)  # a.pub
    path = tmp_path / "trust.yml"
    path.write_text(f"publishers:\n  - {entry}\n    public_key_file: a.pub\n", encoding="utf-8")

    with pytest.raises(KeyringError, match=message):
        TrustStore.load(path)


def test_one_public_key_under_two_kids_is_refused(tmp_path: Path) -> None:
    """Revoking one of the kids would leave the same key trusted under the other."""
    generate_keypair("a", tmp_path)  # a.pub
    path = tmp_path / "trust.yml"
    path.write_text(
        "publishers:\n  - kid: pub-a\n    public_key_file: a.pub\n"
        "  - kid: pub-a-old\n    public_key_file: a.pub\n",
        encoding="utf-8",
    )

    with pytest.raises(KeyringError, match="'pub-a' and 'pub-a-old' are the same public key"):
        TrustStore.load(path)
