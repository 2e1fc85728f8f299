"""What an operator at 3 a.m. sees when `configbus override` cannot do what was asked:
one line naming what is wrong, exit 2, nothing written, and never a traceback. Every
case here is refused before Kafka is contacted (the address given is a closed port)."""

from __future__ import annotations

from pathlib import Path

import pytest

from configbus.cli import main
from configbus.crypto import OPERATOR, SigningKey, TrustedKey, TrustStore, generate_keypair

CLOSED = "127.0.0.1:1"


@pytest.fixture(autouse=True)
def _no_configbus_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "CONFIGBUS_BOOTSTRAP_SERVERS",
        "CONFIGBUS_TRUST",
        "CONFIGBUS_OPERATOR_KEY",
        "CONFIGBUS_OPERATOR_KID",
        "CONFIGBUS_ROOT",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A trust file trusting alice (acme/prod, max_ttl 1h), alice's key, and mallory's
    key, which the trust file does not know."""
    alice, _ = generate_keypair("alice", tmp_path / "keys")
    mallory, _ = generate_keypair("mallory", tmp_path / "keys")
    entry = TrustedKey(
        SigningKey.load(alice, "alice").public,
        frozenset({"acme"}),
        frozenset({"prod"}),
        OPERATOR,
        3600,
    )
    trust = tmp_path / "trust.yml"
    trust.write_text(TrustStore([entry]).dump())
    return trust, alice, mallory


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, err


def set_(
    trust: Path, key: Path, *extra: str | Path, tenant: str = "acme", env: str = "prod"
) -> list[str | Path]:
    return [
        "override", "set", tenant, env, *extra, "--trust", trust, "--key", key,
        "--bootstrap-servers", CLOSED, "--no-check",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("a=1", "--ttl", "2h", "--reason", "x"), "--ttl 2h is longer than key 'alice''s max_ttl"),
        (("a=1", "--ttl", "soon", "--reason", "x"), "--ttl: 'soon' is not a duration"),
        (("a=1", "--ttl", "0s", "--reason", "x"), "--ttl: must be positive"),
        (("a", "--ttl", "5m", "--reason", "x"), "'a': expected KEY=VALUE"),
        (("a..b=1", "--ttl", "5m", "--reason", "x"), "'a..b': give a dotted key"),
        (("a={$secret: db}", "--ttl", "5m", "--reason", "x"), "a: the value must be plain data"),
        (("a=[1, 2", "--ttl", "5m", "--reason", "x"), "a: the value is not valid YAML"),
        (("a=1", "--ttl", "5m", "--reason", "  "), "--reason: say why"),
    ],
)
def test_a_bad_override_set_is_a_usage_error_naming_what_is_wrong(
    capsys: pytest.CaptureFixture[str],
    keys: tuple[Path, Path, Path],
    extra: tuple[str, ...],
    message: str,
) -> None:
    trust, alice, _ = keys

    code, err = run(capsys, *set_(trust, alice, *extra))

    assert code == 2
    assert len(err.splitlines()) == 1 and message in err


def test_a_key_the_trust_file_does_not_know_is_refused_before_anything_is_signed(
    capsys: pytest.CaptureFixture[str], keys: tuple[Path, Path, Path]
) -> None:
    trust, _, mallory = keys

    code, err = run(capsys, *set_(trust, mallory, "a=1", "--ttl", "5m", "--reason", "x"))

    assert code == 2
    assert "key 'mallory' is not in the trust file" in err


def test_a_stream_out_of_the_keys_scope_is_refused_naming_its_scope(
    capsys: pytest.CaptureFixture[str], keys: tuple[Path, Path, Path]
) -> None:
    trust, alice, _ = keys

    code, err = run(
        capsys, *set_(trust, alice, "a=1", "--ttl", "5m", "--reason", "x", tenant="globex")
    )

    assert code == 2
    assert "key 'alice' may not override globex/prod" in err
    assert "tenants ['acme'], environments ['prod']" in err


def test_no_operator_key_and_no_tree_are_each_named(
    capsys: pytest.CaptureFixture[str], keys: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    trust, alice, _ = keys
    no_key = ["override", "clear", "acme", "prod", "a", "--reason", "x", "--trust", trust]

    code, err = run(capsys, *no_key, "--bootstrap-servers", CLOSED)
    assert (code, err.strip()) == (
        2,
        "configbus: give --key (your operator key) or set CONFIGBUS_OPERATOR_KEY",
    )

    with_check = set_(trust, alice, "a=1", "--ttl", "5m", "--reason", "x")
    with_check.remove("--no-check")
    code, err = run(capsys, *with_check, "--root", tmp_path / "nowhere")
    assert code == 2 and "no tree to check the values against its schema" in err


def test_clear_names_the_keys_or_says_all(
    capsys: pytest.CaptureFixture[str], keys: tuple[Path, Path, Path]
) -> None:
    trust, alice, _ = keys
    options = ["--reason", "x", "--trust", trust, "--key", alice, "--bootstrap-servers", CLOSED]

    code, err = run(capsys, "override", "clear", "acme", "prod", *options)
    assert code == 2 and "name the KEYs to clear, or --all" in err
    code, err = run(capsys, "override", "clear", "acme", "prod", "a", "--all", *options)
    assert code == 2 and "name the KEYs to clear, or --all" in err


def test_render_with_kafka_but_no_trust_file_says_what_it_needs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = Path(__file__).resolve().parents[2] / "environments"

    code, err = run(
        capsys, "render", "--root", root, "aurora-records", "prod", "--bootstrap-servers", CLOSED
    )

    assert code == 2
    assert "reading the overrides from Kafka needs --trust or CONFIGBUS_TRUST" in err


def test_keys_generate_for_an_operator_asks_for_its_scope_and_max_ttl(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    base = ["keys", "generate", "--kid", "bob", "--out", tmp_path, "--trust", tmp_path / "t.yml"]

    code, err = run(capsys, *base, "--role", "operator", "--max-ttl", "1h")
    assert code == 2 and "needs --tenants and --environments" in err
    scoped = [*base, "--role", "operator", "--tenants", "acme", "--environments", "prod"]
    code, err = run(capsys, *scoped)
    assert code == 2 and "--role operator needs --max-ttl" in err
    code, err = run(capsys, *base, "--max-ttl", "1h")
    assert code == 2 and "--max-ttl: for operator keys only" in err
    assert not (tmp_path / "bob.key").exists()  # nothing was made

    code, _ = run(capsys, *scoped, "--max-ttl", "90m")
    assert code == 0
    entry = TrustStore.load(tmp_path / "t.yml").get("bob")
    assert entry is not None and (entry.role, entry.max_ttl) == (OPERATOR, 5400)


@pytest.mark.parametrize(
    ("typed", "value"),
    [
        ("no", "no"),  # YAML 1.1 would make these false, true, 493 and 90
        ("on", "on"),
        ("0755", "0755"),
        ("1:30", "1:30"),
        ("true", True),
        ("null", None),
        ("12", 12),
        ("0.5", 0.5),
        ('"12"', "12"),
        ("'yes'", "yes"),
        ("[a, 2]", ["a", 2]),
        ("", ""),
    ],
)
def test_override_values_are_typed_as_yaml_1_2_types_scalars(typed: str, value: object) -> None:
    from configbus.cli_override import _assignment

    assert _assignment(f"feature.mode={typed}") == ("feature.mode", value)


def test_a_value_that_is_not_a_finite_number_is_refused(
    capsys: pytest.CaptureFixture[str], keys: tuple[Path, Path, Path]
) -> None:
    trust, alice, _ = keys

    code, err = run(capsys, *set_(trust, alice, "a=Infinity", "--ttl", "5m", "--reason", "x"))

    assert code == 2 and "a: the value is not valid YAML" in err
