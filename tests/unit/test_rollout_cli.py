"""`configbus rollout start | promote | abort` refuse what cannot work in one line, before
anything is signed or sent: a bad plan, a key the trust file does not know or whose
scope does not cover the stream, a command that would outlive the key's max_ttl. The
commands against a daemon: tests/unit/test_rollout_flow.py (in memory) and
tests/integration/test_rollouts.py (Kafka)."""

from __future__ import annotations

from pathlib import Path

import pytest

from configbus.cli import main
from configbus.crypto import SigningKey, TrustStore, generate_keypair
from configbus.crypto.trust import OPERATOR, TrustedKey

CLOSED = "127.0.0.1:9"  # nothing listens: a command that got as far as sending would hang


@pytest.fixture(autouse=True)
def _no_configbus_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CONFIGBUS_BOOTSTRAP_SERVERS", "CONFIGBUS_TRUST", "CONFIGBUS_OPERATOR_KEY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def signer(tmp_path: Path) -> list[str]:
    """The options of an operator of acme/prod whose overrides and commands last at
    most 30 minutes."""
    key, _ = generate_keypair("oncall", tmp_path / "keys")
    entry = TrustedKey(
        SigningKey.load(key, "oncall").public, frozenset({"acme"}), frozenset({"prod"}),
        OPERATOR, 1800,
    )  # fmt: skip
    trust = tmp_path / "trust.yml"
    trust.write_text(TrustStore([entry]).dump())
    return ["--trust", str(trust), "--key", str(key), "--bootstrap-servers", CLOSED]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and out == ""
    return code, err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--steps", "0"], "step '0': say a count (1), a share (10%) or a label (color=green)"),
        (["--steps", "1,150%"], "step '150%': a share between 0% and 100%"),
        (["--bake", "soon"], "bake: 'soon' is not a duration"),
        (["--select", "zone"], "--select 'zone': say name=value"),
        (["--within", "1h"], "--within 1h is longer than key 'oncall''s max_ttl (30m)"),
        (["--within", "later"], "--within: 'later' is not a duration"),
    ],
    ids=["count-0", "share-150", "bake", "select", "within-over-max-ttl", "within-bad"],
)
def test_a_bad_rollout_start_is_refused_in_one_line(
    capsys: pytest.CaptureFixture[str], signer: list[str], extra: list[str], message: str
) -> None:
    code, err = run(
        capsys, "rollout", "start", "acme", "prod", "--reason", "CHG-1", "--within", "10m",
        *extra, *signer,
    )  # fmt: skip

    assert code == 2
    assert err.startswith("configbus: ") and message in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("action", ["start", "promote", "abort"])
def test_a_key_that_does_not_cover_the_stream_is_refused(
    capsys: pytest.CaptureFixture[str], signer: list[str], action: str
) -> None:
    code, err = run(capsys, "rollout", action, "other", "prod", "--reason", "CHG-1", *signer)

    assert code == 2
    assert "key 'oncall' may not override other/prod" in err


def test_a_command_without_a_reason_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], signer: list[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["rollout", "abort", "acme", "prod", *signer])

    assert exited.value.code == 2
    assert "--reason" in capsys.readouterr().err
