"""`configbus compliance check | report | rules`, called through `configbus.cli.main(argv)`
on a copy of the sample tree."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import pytest

from configbus.cli import main
from configbus.compliance.packs import PACKS_VARIABLE
from configbus.errors import display_path

from .helpers import line_of, where

SAMPLE = Path(__file__).resolve().parents[2] / "environments"

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    """Runs the command; returns (exit code, stdout, stderr). Never a traceback."""
    for name in ("CONFIGBUS_ROOT", "CONFIGBUS_REDIS_URL", PACKS_VARIABLE):
        monkeypatch.delenv(name, raising=False)

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        assert "Traceback" not in err + out
        return code, out, err

    return run


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return Path(shutil.copytree(SAMPLE, tmp_path / "environments"))


def break_prod(root: Path) -> Path:
    """Aurora's prod layer set to TLS 1.0 and no MFA: two blocking rules broken."""
    layer = root / "tenants/aurora-records/prod.yml"
    text = layer.read_text(encoding="utf-8")
    text = text.replace(
        "security:\n  oidc:\n",
        'security:\n  tls:\n    min_version: "1.0"\n  mfa:\n    required: false\n  oidc:\n',
    )
    layer.write_text(text, encoding="utf-8")
    return layer


# -- check ------------------------------------------------------------------------------------


def test_a_compliant_stream_passes(run: Run, root: Path) -> None:
    code, out, err = run("compliance", "check", "aurora-records", "prod", "--root", str(root))

    assert (code, err) == (0, "")
    assert out.splitlines()[0].startswith("aurora-records/prod  [baseline, gdpr, soc2]  sha256:")
    assert "45 rules, 44 passed, 0 failed, 1 not applicable" in out
    assert "FAIL" not in out


def test_verbose_lists_every_rule(run: Run, root: Path) -> None:
    code, out, _ = run("compliance", "check", "helix-audio", "prod", "--root", str(root), "-v")

    assert code == 0
    assert "  pass  hipaa-session-timeout" in out
    assert out.count("\n  pass  ") == 46


def test_a_broken_prod_stream_fails_the_right_rules(run: Run, root: Path) -> None:
    break_prod(root)

    code, out, _ = run("compliance", "check", "aurora-records", "prod", "--root", str(root))

    assert code == 1
    failed = [line.split()[1] for line in out.splitlines() if line.startswith("  FAIL")]
    assert failed == ["baseline-tls-min-version", "baseline-mfa-required"]
    assert 'security.tls.min_version = "1.0"; expected **.tls.min_version version >= 1.2' in out
    assert "2 failed (2 blocking)" in out


def test_all_streams_with_a_threshold(run: Run, root: Path) -> None:
    code, out, _ = run("compliance", "check", "--all", "--root", str(root))

    # nimbus-fm/dev runs with debug on: a low, non-blocking rule
    assert code == 1
    assert "  FAIL  baseline-no-debug" in out
    assert out.splitlines()[-1] == (
        "8 stream(s): 7 passed, 1 failed; 1 failed rule(s), 0 of them blocking"
    )
    for level in ("blocking", "high", "medium"):
        assert run("compliance", "check", "--all", "--root", str(root), "--fail-on", level)[0] == 0
    assert run("compliance", "check", "--all", "--root", str(root), "--fail-on", "low")[0] == 1


def test_a_blocking_failure_fails_every_threshold(run: Run, root: Path) -> None:
    break_prod(root)
    base = ("compliance", "check", "aurora-records", "prod", "--root", str(root), "--fail-on")

    assert run(*base, "blocking")[0] == 1
    assert run(*base, "critical")[0] == 1


def test_regime_checks_that_regimes_rules(run: Run, root: Path) -> None:
    code, out, _ = run(
        "compliance", "check", "nimbus-fm", "prod", "--regime", "hipaa", "--root", str(root)
    )

    assert code == 1  # nimbus declares gdpr only: it is not ready for HIPAA
    assert out.splitlines()[0].startswith("nimbus-fm/prod  [hipaa]")
    rules = {line.split()[1] for line in out.splitlines() if line.startswith("  FAIL")}
    assert rules == {"hipaa-declared", "hipaa-session-timeout", "hipaa-phi-redaction"}


def test_json_output(run: Run, root: Path) -> None:
    break_prod(root)

    code, out, _ = run(
        "compliance", "check", "aurora-records", "prod", "--json", "--root", str(root)
    )

    document = json.loads(out)
    assert code == 1
    assert document["schema"] == "configbus.compliance.report/1"
    (stream,) = document["streams"]
    failed = [f["rule"] for f in stream["findings"] if f["status"] == "fail"]
    assert sorted(failed) == ["baseline-mfa-required", "baseline-tls-min-version"]
    assert stream["summary"]["blocking_failed"] == 2


def test_no_tenant_checks_the_environment_against_the_baseline(run: Run, root: Path) -> None:
    code, out, _ = run("compliance", "check", "-", "dev", "--root", str(root))

    assert code == 1
    assert out.startswith("-/dev  [baseline]")
    assert "baseline-no-debug" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nobody", "prod"], "unknown tenant 'nobody'"),
        (["aurora-records", "qa"], "unknown environment 'qa'"),
        (["nimbus-fm", "staging"], "tenant 'nimbus-fm' does not run in 'staging'"),
        (["aurora-records", "prod", "--regime", "pci"], "unknown compliance regime 'pci'"),
        ([], "give TENANT ENV (- for no tenant), or --all"),
        (["aurora-records"], "give TENANT ENV (- for no tenant), or --all"),
        (["aurora-records", "prod", "--all"], "give TENANT ENV or --all, not both"),
    ],
)
def test_usage_errors_exit_2(run: Run, root: Path, argv: list[str], message: str) -> None:
    code, out, err = run("compliance", "check", *argv, "--root", str(root))

    assert (code, out) == (2, "")
    assert err.startswith("configbus: ") and message in err
    assert len(err.splitlines()) == 1


def test_a_bad_pack_is_a_usage_error_naming_file_and_line(
    run: Run, root: Path, tmp_path: Path
) -> None:
    pack = tmp_path / "packs" / "acme.yml"
    pack.parent.mkdir()
    pack.write_text(
        "regime: acme\nrules:\n  - id: acme-one\n    title: One\n    severity: low\n"
        "    blocking: false\n    rationale: R.\n    check:\n      path: a.b\n      equls: 1\n",
        encoding="utf-8",
    )

    code, out, err = run(
        "compliance", "check", "--all", "--root", str(root), "--packs", str(pack.parent)
    )

    assert (code, out) == (2, "")
    assert f"{where(pack, line_of(pack, 'equls'))}: rules.0.check.equls: unknown operator" in err
    assert err.splitlines()[-1] == "configbus: 2 problem(s) in the compliance packs"


def test_more_packs_add_rules(run: Run, root: Path, tmp_path: Path) -> None:
    pack = tmp_path / "acme.yml"
    pack.write_text(
        "regime: baseline\nrules:\n  - id: acme-replicas\n    title: Twenty replicas\n"
        "    severity: medium\n    blocking: false\n    environments: [prod]\n"
        "    rationale: Availability.\n    check:\n      path: deployment.replicas\n"
        "      min: 20\n",
        encoding="utf-8",
    )

    code, out, _ = run(
        "compliance", "check", "nimbus-fm", "prod", "--root", str(root), "--packs", str(pack)
    )

    assert code == 1
    assert (
        "  FAIL  acme-replicas" in out
        and "deployment.replicas = 3; expected deployment.replicas >= 20" in out
    )


def test_a_tenant_file_that_does_not_load_fails_all(run: Run, root: Path) -> None:
    tenant = root / "tenants/nimbus-fm/tenant.yml"
    tenant.write_text(
        tenant.read_text(encoding="utf-8").replace("compliance: [gdpr]", "compliance: [gdrp]"),
        encoding="utf-8",
    )

    code, out, err = run("compliance", "check", "--all", "--root", str(root))

    assert code == 1
    assert f"{display_path(tenant)}:{line_of(tenant, 'gdrp')}: compliance.0: unknown regime" in err
    assert "nimbus-fm/" not in out
    assert out.splitlines()[-1].endswith("; 1 could not be resolved")


# -- report -----------------------------------------------------------------------------------


class _Rows(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.findings = 0
        self.failed = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = (dict(attrs).get("class") or "").split()
        if tag == "tr" and "finding" in classes:
            self.findings += 1
            self.failed += "fail" in classes


def test_report_html_to_a_file(run: Run, root: Path, tmp_path: Path) -> None:
    break_prod(root)
    output = tmp_path / "report.html"

    code, out, err = run(
        "compliance", "report", "--format", "html", "--output", str(output), "--root", str(root)
    )

    assert (code, out) == (0, "")
    assert err == f"wrote {display_path(output)}: 8 stream(s), 3 failed finding(s)\n"
    rows = _Rows()
    rows.feed(output.read_text(encoding="utf-8"))
    assert rows.failed == 3
    assert rows.findings > 200  # every finding of every stream


def test_report_markdown_of_one_stream(run: Run, root: Path) -> None:
    code, out, _ = run(
        "compliance", "report", "nimbus-fm", "dev", "--format", "md", "--root", str(root)
    )

    assert code == 0
    assert out.startswith("# Compliance report\n")
    assert "## nimbus-fm/dev" in out and "## aurora-records" not in out
    assert "| FAIL | baseline-no-debug | low | no | application.debug = true |" in out


def test_report_json_of_every_stream(run: Run, root: Path) -> None:
    code, out, _ = run("compliance", "report", "--format", "json", "--root", str(root))

    document = json.loads(out)
    assert code == 0
    assert [(s["tenant"], s["env"]) for s in document["streams"]] == [
        ("aurora-records", "dev"),
        ("aurora-records", "prod"),
        ("aurora-records", "staging"),
        ("helix-audio", "dev"),
        ("helix-audio", "prod"),
        ("helix-audio", "staging"),
        ("nimbus-fm", "dev"),
        ("nimbus-fm", "prod"),
    ]


# -- rules ------------------------------------------------------------------------------------


def test_rules_lists_a_regime(run: Run) -> None:
    code, out, _ = run("compliance", "rules", "--regime", "gdpr")

    lines = out.splitlines()
    assert code == 0
    assert lines[0].split() == ["RULE", "REGIME", "SEVERITY", "BLOCKING", "ENVIRONMENTS", "TITLE"]
    assert all(line.split()[1] == "gdpr" for line in lines[1:])
    row = next(line for line in lines if line.startswith("gdpr-log-anonymisation "))
    assert row.split()[1:5] == ["gdpr", "high", "yes", "all"]


def test_rules_as_json(run: Run) -> None:
    code, out, _ = run("compliance", "rules", "--json")

    rules = {rule["id"]: rule for rule in json.loads(out)}
    assert code == 0
    assert rules["baseline-tls-min-version"]["environments"] == ["prod"]
    assert rules["baseline-tls-min-version"]["check"] == "**.tls.min_version version >= 1.2"
    assert rules["baseline-no-debug"]["blocking"] is False
    assert {r["regime"] for r in rules.values()} == {"baseline", "gdpr", "hipaa", "soc2"}


def test_rules_of_an_unknown_regime(run: Run) -> None:
    code, _, err = run("compliance", "rules", "--regime", "pci")

    assert code == 2
    assert "unknown compliance regime 'pci'" in err


def test_the_compliance_command_leaves_room_for_more_subcommands() -> None:
    import argparse

    from configbus import cli_compliance

    commands = argparse.ArgumentParser().add_subparsers()
    actions = cli_compliance.register(commands, argparse.ArgumentParser(add_help=False))
    waive = actions.add_parser("waive")

    assert set(actions.choices) == {"check", "report", "rules", "waive"}
    assert actions.choices["waive"] is waive
