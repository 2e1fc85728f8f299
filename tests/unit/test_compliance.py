"""Compliance as data: paths, the check vocabulary, packs and their problems, the
engine and the gate, the seed's Python API, the sample tree, and the reports.

The command line is tested in test_compliance_cli.py."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

import configbus
from configbus.compliance import (
    ComplianceChecker,
    ComplianceReport,
    Finding,
    RuleSet,
    default_packs,
    evaluate,
    gate,
    known_regimes,
    load_packs,
)
from configbus.compliance.checks import version_key
from configbus.compliance.packs import BUILTIN_PACKS, PACKS_VARIABLE
from configbus.compliance.paths import Document, Pattern, pattern_problem
from configbus.compliance.report import SCHEMA, render_html, render_json, render_markdown
from configbus.errors import TreeError, UnknownNameError
from configbus.tree import EnvironmentTree, ResolvedConfig
from configbus.tree.values import freeze

from .helpers import TreeFactory, line_of, touch_later, where

SHIPPED = Path(__file__).resolve().parents[2] / "environments"


@pytest.fixture(autouse=True)
def _no_user_packs(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (PACKS_VARIABLE, "CONFIGBUS_ENV", "CONFIGBUS_TENANT", "CONFIGBUS_ROOT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def sample() -> EnvironmentTree:
    return EnvironmentTree(SHIPPED)


def write_pack(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def pack_of(tmp_path: Path, rules: str, regime: str = "acme") -> RuleSet:
    """The rules given (YAML list items) as a pack of their own, without the built-ins."""
    text = f"regime: {regime}\nrules:\n{rules}"
    return load_packs(write_pack(tmp_path / "packs", "p.yml", text), builtin=False)


def rule_yaml(check: str, **fields: Any) -> str:
    """A rule `r` with `check` (YAML, indented under check:)."""
    head = {"id": "r", "title": "T", "severity": "high", "blocking": True, "rationale": "R"}
    head |= fields
    lines = [
        f"  - {k}: {json.dumps(v)}" if i == 0 else f"    {k}: {json.dumps(v)}"
        for i, (k, v) in enumerate(head.items())
    ]
    body = "\n".join(f"      {line}" for line in check.strip().splitlines())
    return "\n".join(lines) + f"\n    check:\n{body}\n"


def run_check(tmp_path: Path, check: str, data: Any, env: str | None = None) -> Finding:
    packs = pack_of(tmp_path, rule_yaml(check))
    report = evaluate(freeze(data), env=env, regimes=["acme"], packs=packs)
    return report.finding("r")


# -- paths ------------------------------------------------------------------------------------

DATA: dict[str, Any] = {
    "security": {"tls": {"min_version": "1.2"}, "allowed_hosts": ["a", "b"]},
    "cache": {"redis": {"tls": True, "nodes": ["n0", "n1"]}, "memcached": {"tls": False}},
    "database": {"postgresql": {"sslmode": "verify-full"}, "replicas": [{"sslmode": "require"}]},
    "logging": {"loggers": {"uvicorn.access": "INFO"}},
    "edge": {"tls": {"min_version": "1.0"}},
    "creds": {"$secret": "db/password"},
}


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("security.tls.min_version", [("security.tls.min_version", "1.2")]),
        ("cache.redis.nodes.1", [("cache.redis.nodes.1", "n1")]),
        ("logging.loggers.uvicorn.access", [("logging.loggers.uvicorn.access", "INFO")]),
        ("cache.*.tls", [("cache.redis.tls", True), ("cache.memcached.tls", False)]),
        (
            "security.allowed_hosts.*",
            [("security.allowed_hosts.0", "a"), ("security.allowed_hosts.1", "b")],
        ),
        (
            "**.tls.min_version",
            [("security.tls.min_version", "1.2"), ("edge.tls.min_version", "1.0")],
        ),
        (
            "**.sslmode",
            [
                ("database.postgresql.sslmode", "verify-full"),
                ("database.replicas.0.sslmode", "require"),
            ],
        ),
        (
            "database.**.sslmode",
            [
                ("database.postgresql.sslmode", "verify-full"),
                ("database.replicas.0.sslmode", "require"),
            ],
        ),
        ("**.uvicorn.access", [("logging.loggers.uvicorn.access", "INFO")]),
        ("security.tls.max_version", []),
        ("cache.redis.nodes.7", []),
        ("**.$secret", []),  # a secret reference is a value, never a mapping to look into
    ],
)
def test_patterns_find_what_they_say(pattern: str, expected: list[tuple[str, Any]]) -> None:
    data = freeze(DATA)
    parsed = Pattern.parse(pattern)

    assert sorted(parsed.find(data)) == sorted(expected)
    # the index of a document built for the pattern's anchors finds the same
    anchors = frozenset(parsed.anchors)
    assert sorted(Document(data, anchors).find(parsed)) == sorted(expected)
    assert sorted(Document(DATA).find(parsed)) == sorted(expected)  # plain data alike


def test_a_double_star_also_matches_no_key_at_all() -> None:
    assert Pattern.parse("**.tls").find({"tls": 1}) == [("tls", 1)]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("a..b", "empty part"),
        ("a.b.", "empty part"),
        ("a.t*s", "a wildcard stands alone"),
        ("a.**", "** must be followed by a key"),
        ("", "must be a dotted path"),
        (3, "must be a dotted path"),
    ],
)
def test_malformed_patterns_are_named(text: object, problem: str) -> None:
    found = pattern_problem(text)
    assert found is not None and problem in found
    assert pattern_problem("**.tls.min_version") is None


# -- the vocabulary ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("check", "value", "status"),
    [
        ("equals: true", True, "pass"),
        ("equals: true", 1, "fail"),  # a number is not a boolean
        ("equals: 1", True, "fail"),
        ("equals: 1", 1.0, "pass"),
        ("equals: verify-full", "verify-full", "pass"),
        ("equals: verify-full", "require", "fail"),
        ("equals: '1'", 1, "fail"),
        ("one_of: [SSL, SASL_SSL]", "SASL_SSL", "pass"),
        ("one_of: [SSL, SASL_SSL]", "PLAINTEXT", "fail"),
        ("one_of: [totp, webauthn]", ["webauthn", "totp"], "pass"),  # each item
        ("one_of: [totp, webauthn]", ["webauthn", "sms"], "fail"),
        ("none_of: ['*']", ["a.example", "*.b.example"], "pass"),
        ("none_of: ['*']", ["a.example", "*"], "fail"),
        ("none_of: [sms]", "sms", "fail"),
        ("min: 1\nmax: 730", 730, "pass"),
        ("min: 1\nmax: 730", 731, "fail"),
        ("min: 1\nmax: 730", 0, "fail"),
        ("min: 0.5", 0.5, "pass"),
        ("max: 10", "5", "fail"),  # not a number
        ("max: 10", True, "fail"),  # a boolean is not a number
        ("version: '>= 1.2'", "1.2", "pass"),
        ("version: '>= 1.2'", "1.10", "pass"),  # 1.10 is above 1.2, not below
        ("version: '>= 1.2'", "1.1", "fail"),
        ("version: '>= 1.2'", "1.0", "fail"),
        ("version: '>= 1.2'", "TLSv1.3", "pass"),
        ("version: '>= 1.2'", 1.3, "pass"),  # a version written unquoted
        ("version: '>= 1.2'", "latest", "fail"),
        ("version: '> 1.2'", "1.2.0", "fail"),
        ("version: '< 2'", "1.99", "pass"),
        ("version: '== 1.3'", "1.3.0", "pass"),
        ("version: '<= 1.2'", "1.10", "fail"),
        ("contains: [email, ip_address]", ["password", "email", "ip_address"], "pass"),
        ("contains: [email, ip_address]", ["password", "email"], "fail"),
        ("contains: email", "email", "fail"),  # not a list
        ("present: true", "x", "pass"),
        ("present: true", None, "fail"),
        ("present: false", None, "pass"),
        ("present: false", "x", "fail"),
    ],
)
def test_every_operator(tmp_path: Path, check: str, value: Any, status: str) -> None:
    data = {"a": {"b": value}}
    finding = run_check(tmp_path, f"path: a.b\n{check}", data)

    assert finding.status == status, finding
    assert finding.observations[0].present
    assert finding.observations[0].ok is (status == "pass")


def test_versions_compare_part_by_part() -> None:
    assert version_key("1.10") == (1, 10)
    assert version_key("1.10") > version_key("1.2")  # type: ignore[operator]
    assert version_key("TLSv1.2") == (1, 2)
    assert version_key(True) is None
    assert version_key("1.2-beta") is None


def test_a_missing_setting_fails_unless_the_check_says_missing_pass(tmp_path: Path) -> None:
    failed = run_check(tmp_path, "path: a.b\nequals: true", {"a": {}})
    assert failed.status == "fail"
    assert failed.observations[0].present is False
    assert "a.b: not set" in failed.found

    absent = run_check(tmp_path / "2", "path: a.b\nequals: true\nmissing: pass", {"a": {}})
    assert absent.status == "pass"

    forbidden = run_check(tmp_path / "3", "path: a.b\npresent: false", {"a": {}})
    assert forbidden.status == "pass"


def test_a_wildcard_matching_nothing_fails(tmp_path: Path) -> None:
    finding = run_check(tmp_path, "path: '**.tls.min_version'\nversion: '>= 1.2'", {"a": 1})
    assert finding.status == "fail"
    assert finding.paths == ("**.tls.min_version",)


def test_every_match_of_a_wildcard_must_hold(tmp_path: Path) -> None:
    finding = run_check(tmp_path, "path: '**.tls.min_version'\nversion: '>= 1.2'", DATA)

    assert finding.status == "fail"
    assert finding.paths == ("security.tls.min_version", "edge.tls.min_version")
    assert [o.ok for o in finding.observations] == [True, False]
    assert finding.found == 'edge.tls.min_version = "1.0"'  # the failing one


def test_several_paths_and_several_operators_all_hold(tmp_path: Path) -> None:
    check = "paths: [a.x, a.y]\nmin: 1\nmax: 5"
    assert run_check(tmp_path, check, {"a": {"x": 1, "y": 5}}).status == "pass"
    assert run_check(tmp_path / "2", check, {"a": {"x": 1, "y": 6}}).status == "fail"


@pytest.mark.parametrize(
    ("data", "status"),
    [
        ({"c": {"hipaa": True}, "l": {"body": False}}, "pass"),
        ({"c": {"hipaa": True}, "l": {"body": True}}, "fail"),
        ({"c": {"hipaa": True}, "l": {}}, "fail"),
        ({"c": {"hipaa": False}, "l": {"body": True}}, "n/a"),
        ({"c": {}, "l": {"body": True}}, "n/a"),  # no condition at all: does not apply
    ],
)
def test_a_forbidden_combination(tmp_path: Path, data: dict[str, Any], status: str) -> None:
    check = "when: {path: c.hipaa, equals: true}\nrequire: {path: l.body, equals: false}"
    finding = run_check(tmp_path, check, data)

    assert finding.status == status
    assert finding.passed is (status != "fail")
    assert finding.expected == "when c.hipaa == true: l.body == false"


# -- packs and their problems -----------------------------------------------------------------


def test_the_builtin_packs_load_and_cover_what_was_promised() -> None:
    packs = load_packs()
    ids = {rule.id for rule in packs.rules}

    assert packs.regimes() == ("baseline", "gdpr", "hipaa", "soc2")
    assert {p.name for p in BUILTIN_PACKS.glob("*.yml")} == {
        "baseline.yml",
        "gdpr.yml",
        "hipaa.yml",
        "soc2.yml",
    }
    assert {
        "baseline-tls-min-version",
        "baseline-encryption-at-rest",
        "baseline-audit-logging",
        "baseline-prod-debug-off",
        "baseline-no-debug",
        "baseline-mfa-required",
        "baseline-backups-encrypted",
        "baseline-secure-cookies",
        "baseline-db-sslmode",
        "gdpr-log-anonymisation",
        "gdpr-retention-limit",
        "hipaa-phi-encryption",
        "hipaa-access-logging",
        "hipaa-session-timeout",
        "soc2-change-management",
        "soc2-monitoring",
        "soc2-alerting",
    } <= ids
    for rule in packs.rules:
        assert rule.id.startswith(f"{rule.regime}-"), rule.id
        assert rule.rationale and rule.title
    tls = packs.rule("baseline-tls-min-version")
    assert (tls.severity, tls.blocking, tls.environments) == ("critical", True, {"prod"})
    assert packs.rule("baseline-no-debug").environments is None  # every environment


def test_the_builtin_packs_are_parsed_once() -> None:
    assert default_packs() is default_packs()
    assert known_regimes() == ("baseline", "gdpr", "hipaa", "soc2")


GOOD_RULE = """\
regime: acme
rules:
  - id: acme-one
    title: One
    severity: low
    blocking: false
    environments: [production]
    rationale: Because.
    check:
      path: a.b
      equals: 1
"""


def problems_of(path: Path) -> list[str]:
    with pytest.raises(TreeError) as caught:
        load_packs(path, builtin=False)
    return [str(p) for p in caught.value.problems]


@pytest.mark.parametrize(
    ("old", "new", "needle", "message"),
    [
        (
            "    title: One\n",
            "    title: One\n    colour: red\n",
            "colour:",
            "rules.0.colour: unknown field (allowed: blocking, check, environments, id, rationale,",
        ),
        (
            "      equals: 1\n",
            "      equls: 1\n",
            "equls:",
            "rules.0.check.equls: unknown operator (operators: equals, one_of, none_of, min, max,",
        ),
        (
            "      equals: 1\n",
            "      version: '1.2'\n",
            "version:",
            'rules.0.check.version: must compare with a version, such as ">= 1.2"',
        ),
        ("      equals: 1\n", "      min: ten\n", "min:", "rules.0.check.min: must be a number"),
        (
            "      equals: 1\n",
            "      one_of: []\n",
            "one_of:",
            "rules.0.check.one_of: must be a non-empty list of plain values",
        ),
        (
            "      equals: 1\n",
            "      equals: !secret x\n",
            "equals:",
            "rules.0.check.equals: must be a plain value",
        ),
        (
            "      equals: 1\n",
            "      missing: maybe\n      equals: 1\n",
            "missing:",
            "rules.0.check.missing: must be fail or pass",
        ),
        (
            "      equals: 1\n",
            "      when: {path: x, equals: 1}\n",
            "path: a.b",
            "rules.0.check.path: a check with when: holds only when: and require:",
        ),
        ("      path: a.b\n", "      path: a..b\n", "path:", "rules.0.check.path: 'a..b': empty"),
        (
            "    severity: low\n",
            "    severity: urgent\n",
            "severity:",
            "rules.0.severity: must be one of critical, high, medium, low",
        ),
        (
            "    blocking: false\n",
            "    blocking: maybe\n",
            "blocking:",
            "rules.0.blocking: must be true or false",
        ),
        (
            "    environments: [production]\n",
            "    environments: prod\n",
            "environments:",
            "rules.0.environments: must be a list of environments",
        ),
        ("  - id: acme-one\n", "  - id: Acme One\n", "id:", "rules.0.id: must be lowercase"),
        (
            "    rationale: Because.\n",
            "",
            "- id:",
            "rules.0: missing rationale: (a rule needs id, title, severity, blocking, rationale,",
        ),
        (
            "regime: acme\n",
            "regime: acme\nowner: me\n",
            "owner:",
            "owner: unknown field (allowed: regime, rules, title)",
        ),
        ("regime: acme\n", "", "- id:", "rules.0: missing regime: (give it here, or once"),
    ],
)
def test_a_pack_problem_names_file_line_and_field(
    tmp_path: Path, old: str, new: str, needle: str, message: str
) -> None:
    assert old in GOOD_RULE
    path = write_pack(tmp_path, "acme.yml", GOOD_RULE.replace(old, new, 1))

    found = problems_of(path)

    line = line_of(path, needle)
    assert any(p.startswith(f"{where(path, line)}: ") and message in p for p in found), found
    assert all("\n" not in p for p in found)


def test_a_pack_that_is_not_yaml_names_its_file_and_line(tmp_path: Path) -> None:
    path = write_pack(tmp_path, "acme.yml", GOOD_RULE.replace("equals: 1", "equals: [1"))

    found = problems_of(path)

    assert len(found) == 1
    assert found[0].startswith(f"{where(path, len(GOOD_RULE.splitlines()) + 1)}: YAML syntax")


def test_every_problem_of_a_pack_is_reported_at_once(tmp_path: Path) -> None:
    text = GOOD_RULE.replace("severity: low", "severity: urgent").replace("equals: 1", "equls: 1")
    found = problems_of(write_pack(tmp_path, "acme.yml", text))

    assert len(found) == 3  # the severity, the unknown operator, and no operator left
    assert any("severity" in p for p in found) and any("equls" in p for p in found)


def test_a_duplicate_rule_id_names_both_places(tmp_path: Path) -> None:
    first = write_pack(tmp_path / "packs", "a.yml", GOOD_RULE)
    second = write_pack(tmp_path / "packs", "b.yml", GOOD_RULE)

    found = problems_of(tmp_path / "packs")

    assert found == [
        f"{where(second, 3)}: id: duplicate rule id 'acme-one' (first in {where(first, 3)})"
    ]


def test_a_user_pack_cannot_reuse_a_builtin_rule_id(tmp_path: Path) -> None:
    path = write_pack(tmp_path, "x.yml", GOOD_RULE.replace("acme-one", "baseline-no-debug"))
    with pytest.raises(TreeError, match="duplicate rule id 'baseline-no-debug'"):
        load_packs(path)


def test_a_missing_pack_directory_is_a_problem(tmp_path: Path) -> None:
    with pytest.raises(TreeError, match="no such pack file or directory"):
        load_packs(tmp_path / "nowhere")


def test_user_packs_come_from_the_environment_and_reload_when_edited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "packs"
    path = write_pack(directory, "acme.yml", GOOD_RULE)
    monkeypatch.setenv(PACKS_VARIABLE, str(directory))

    packs = default_packs()
    assert "acme" in packs.regimes() and "gdpr" in packs.regimes()
    assert packs.rule("acme-one").environments == {"prod"}  # the alias, canonical
    assert default_packs() is packs  # kept while unchanged
    assert "acme" in known_regimes()

    path.write_text(GOOD_RULE.replace("acme-one", "acme-two"), encoding="utf-8")
    touch_later(path)
    again = default_packs()
    assert again is not packs
    assert [r.id for r in again.rules if r.regime == "acme"] == ["acme-two"]


# -- tenant.yml: compliance -------------------------------------------------------------------


def test_the_sample_tenants_declare_their_regimes(sample: EnvironmentTree) -> None:
    assert sample.tenant("aurora-records").compliance == ("gdpr", "soc2")
    assert sample.tenant("helix-audio").compliance == ("hipaa", "soc2")
    assert sample.tenant("nimbus-fm").compliance == ("gdpr",)


TENANT = "tenant: acme\nenvironments:\n  prod: {}\n"


@pytest.mark.parametrize(
    ("declared", "needle", "message"),
    [
        (
            "compliance: [gdpr, pci]\n",
            "compliance:",
            "compliance.1: unknown regime 'pci' (known: baseline, gdpr, hipaa, soc2)",
        ),
        (
            "compliance: [gdpr, gdpr]\n",
            "compliance:",
            "compliance.1: regime 'gdpr' is listed twice",
        ),
        (
            "compliance: gdpr\n",
            "compliance:",
            "compliance: must be a list of compliance regimes, such as [gdpr, soc2]",
        ),
    ],
)
def test_a_bad_compliance_list_in_tenant_yml_is_a_tree_problem(
    make_tree: TreeFactory, declared: str, needle: str, message: str
) -> None:
    root = make_tree({"prod/prod.yml": "a: 1\n", "tenants/acme/tenant.yml": TENANT + declared})
    tree = EnvironmentTree(root)
    source = root / "tenants/acme/tenant.yml"

    with pytest.raises(TreeError) as caught:
        tree.tenant("acme")

    assert [str(p) for p in caught.value.problems] == [
        f"{where(source, line_of(source, needle))}: {message}"
    ]
    assert not tree.check().ok


def test_a_regime_from_a_user_pack_may_be_declared(
    make_tree: TreeFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_pack(tmp_path / "packs", "acme.yml", GOOD_RULE)
    monkeypatch.setenv(PACKS_VARIABLE, str(tmp_path / "packs"))
    root = make_tree(
        {"prod/prod.yml": "a: 1\n", "tenants/acme/tenant.yml": TENANT + "compliance: [acme]\n"}
    )

    assert EnvironmentTree(root).tenant("acme").compliance == ("acme",)


# -- the engine and the gate ------------------------------------------------------------------


def prod_config(sample: EnvironmentTree, tenant: str = "aurora-records") -> ResolvedConfig:
    return sample.validate(sample.resolve("prod", tenant))


def test_evaluate_checks_the_baseline_and_the_regimes_given(sample: EnvironmentTree) -> None:
    config = prod_config(sample)

    report = evaluate(config, regimes=["gdpr"])

    assert report.regimes == ("baseline", "gdpr")
    assert {f.regime for f in report.findings} == {"baseline", "gdpr"}
    assert (report.tenant, report.env, report.config_hash) == (
        "aurora-records",
        "prod",
        config.hash,
    )
    everything = evaluate(config)
    assert everything.regimes == ("baseline", "gdpr", "hipaa", "soc2")


def test_rules_limited_to_other_environments_are_left_out(sample: EnvironmentTree) -> None:
    dev = evaluate(sample.resolve("dev"), regimes=[])
    ids = {f.rule for f in dev.findings}

    assert "baseline-no-debug" in ids
    assert "baseline-prod-debug-off" not in ids and "baseline-mfa-required" not in ids
    every = evaluate(sample.resolve("dev").data, regimes=[])  # no environment: every rule
    assert "baseline-prod-debug-off" in {f.rule for f in every.findings}


def test_an_unknown_regime_is_an_unknown_name(sample: EnvironmentTree) -> None:
    with pytest.raises(UnknownNameError, match="unknown compliance regime 'pci'"):
        evaluate(prod_config(sample), regimes=["pci"])


@pytest.mark.parametrize(("tenant", "env"), sorted(EnvironmentTree(SHIPPED).streams()))
def test_every_sample_stream_passes_every_blocking_rule_of_its_regimes(
    sample: EnvironmentTree, tenant: str, env: str
) -> None:
    config = sample.validate(sample.resolve(env, tenant))
    regimes = sample.tenant(tenant).compliance

    assert gate(config, tenant=tenant, env=env, regimes=regimes) == []
    report = evaluate(config, regimes=regimes)
    assert report.blocking_failures == []
    if env == "prod":
        assert report.passed, report.failures  # prod passes every rule, blocking or not


def test_dev_fails_the_debug_rule_and_nothing_that_blocks(sample: EnvironmentTree) -> None:
    report = evaluate(sample.resolve("dev", "nimbus-fm"), regimes=["gdpr"])

    assert [f.rule for f in report.failures] == ["baseline-no-debug"]
    assert report.finding("baseline-no-debug").found == "application.debug = true"
    assert not report.passed and report.blocking_failures == []


def mutated(config: ResolvedConfig) -> dict[str, Any]:
    data = copy.deepcopy(config.to_dict())
    data["security"]["tls"]["min_version"] = "1.0"
    data["security"]["mfa"]["required"] = False
    return data


def test_a_mutated_prod_config_fails_the_right_rules(sample: EnvironmentTree) -> None:
    data = mutated(prod_config(sample))
    regimes = sample.tenant("aurora-records").compliance

    refused = gate(data, tenant="aurora-records", env="prod", regimes=regimes)

    assert sorted(f.rule for f in refused) == ["baseline-mfa-required", "baseline-tls-min-version"]
    assert all(f.blocking and f.status == "fail" for f in refused)
    tls = next(f for f in refused if f.rule == "baseline-tls-min-version")
    assert tls.found == 'security.tls.min_version = "1.0"'
    assert "NIST SP 800-52" in tls.rationale
    # a waiver lifts a rule from the gate, and only that rule
    waived = gate(
        data, tenant="aurora-records", env="prod", regimes=regimes,
        waived={"baseline-mfa-required"},
    )  # fmt: skip
    assert [f.rule for f in waived] == ["baseline-tls-min-version"]
    # the same change in dev: neither rule applies there
    assert gate(data, tenant="aurora-records", env="dev", regimes=regimes) == []


def test_the_gate_runs_only_blocking_rules(sample: EnvironmentTree) -> None:
    data = copy.deepcopy(prod_config(sample).to_dict())
    data["application"]["debug"] = True  # breaks a blocking and a non-blocking rule
    data["monitoring"]["error_tracking"]["enabled"] = False  # non-blocking only

    refused = gate(data, tenant="t", env="prod", regimes=["soc2"])

    assert [f.rule for f in refused] == ["baseline-prod-debug-off"]


SECRET_TEXT = "cbsec1.3.c2VhbGVkLXRleHQtbmV2ZXItcHJpbnRlZA"
PLAIN_PASSWORD = "hunter2-plain-password"


def hostile(sample: EnvironmentTree) -> dict[str, Any]:
    """The aurora prod config with a sealed secret attached, a plain password under a
    secret-looking key, and a value that is markup."""
    data = copy.deepcopy(prod_config(sample).to_dict())
    data["security"]["jwt"]["signing_key"] = {
        "$secret": "jwt/signing_key", "$sealed": [SECRET_TEXT]
    }  # fmt: skip
    data["security"]["oidc"]["client_secret"] = PLAIN_PASSWORD
    data["application"]["debug"] = "<script>alert('x')</script> | x"
    return data


def test_secrets_are_never_shown(sample: EnvironmentTree, tmp_path: Path) -> None:
    data = hostile(sample)
    rules = pack_of(tmp_path, rule_yaml("path: security.oidc.client_secret\npresent: true"))
    packs = RuleSet(default_packs().rules + rules.rules, {})

    report = evaluate(data, env="prod", regimes=["acme"], packs=packs)

    assert report.finding("baseline-jwt-signing-key").found == (
        'security.jwt.signing_key = "<secret:jwt/signing_key v3>"'
    )
    assert report.finding("r").found == 'security.oidc.client_secret = "<redacted>"'
    for text in (
        repr(report),
        render_json([report]),
        render_markdown([report]),
        render_html([report]),
        repr(report.findings),
    ):
        assert SECRET_TEXT not in text and PLAIN_PASSWORD not in text


# -- the seed's Python API --------------------------------------------------------------------


def test_the_seed_api_works_as_written(
    sample: EnvironmentTree, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONFIGBUS_ROOT", str(SHIPPED))  # whose tenant.yml says the regimes
    config = prod_config(sample, "helix-audio")

    checker = configbus.ComplianceChecker()
    gdpr_result = checker.check_gdpr_compliance(config)
    security_audit = checker.security_audit(config)
    compliance_report = checker.generate_report(config)

    assert isinstance(gdpr_result, ComplianceReport)
    assert gdpr_result.regimes == ("gdpr",)
    assert {f.regime for f in gdpr_result.findings} == {"gdpr"}
    assert not gdpr_result.passed  # helix keeps data six years: not a GDPR tenant
    assert "gdpr-retention-limit" in {f.rule for f in gdpr_result.failures}
    assert security_audit.passed and {f.regime for f in security_audit.findings} == {"baseline"}
    assert compliance_report.passed
    assert all(isinstance(f, Finding) for f in compliance_report.findings)
    assert repr(gdpr_result).startswith("<ComplianceReport helix-audio/prod [gdpr]: FAILED ")
    assert repr(security_audit).startswith("<ComplianceReport helix-audio/prod [baseline]: PASSED")
    assert repr(gdpr_result.failures[0]).startswith("<Finding FAIL gdpr-")
    assert checker.check_soc2_compliance(config).passed
    assert checker.check_hipaa_compliance(config).passed


def test_generate_report_takes_the_regimes_the_tenant_declares(sample: EnvironmentTree) -> None:
    config = prod_config(sample, "helix-audio")

    declared = ComplianceChecker(root=SHIPPED).generate_report(config)
    nowhere = ComplianceChecker(root=SHIPPED / "missing").generate_report(config)
    chosen = ComplianceChecker(root=SHIPPED).generate_report(config, regimes=["gdpr"])

    assert declared.regimes == ("baseline", "hipaa", "soc2")
    assert nowhere.regimes == ("baseline", "gdpr", "hipaa", "soc2")  # no tree: every regime
    assert chosen.regimes == ("baseline", "gdpr")


def test_the_seed_api_takes_a_plain_mapping(
    sample: EnvironmentTree, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = mutated(prod_config(sample))
    checker = ComplianceChecker()

    audit = checker.security_audit(data, environment="production", tenant="aurora-records")

    assert (audit.tenant, audit.env) == ("aurora-records", "prod")
    assert sorted(f.rule for f in audit.failures) == [
        "baseline-mfa-required",
        "baseline-tls-min-version",
    ]
    monkeypatch.setenv("CONFIGBUS_ENV", "dev")
    assert checker.security_audit(data).passed  # in dev neither rule applies
    assert checker.rules("hipaa") and all(r.regime == "hipaa" for r in checker.rules("hipaa"))


def test_the_seed_api_takes_more_packs(tmp_path: Path) -> None:
    write_pack(tmp_path / "packs", "acme.yml", GOOD_RULE)
    checker = ComplianceChecker(tmp_path / "packs")

    report = checker.check({"a": {"b": 2}}, "acme", environment="prod")

    assert [(f.rule, f.status) for f in report.findings] == [("acme-one", "fail")]
    assert "acme" in repr(checker)


# -- reports ----------------------------------------------------------------------------------


class _Table(HTMLParser):
    """The finding rows of an HTML report: each row's classes and cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[list[str], list[str]]] = []
        self.scripts = 0
        self.external: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "script":
            self.scripts += 1
        if tag in ("link", "img") or (tag == "a" and not (found.get("href") or "").startswith("#")):
            self.external.append(tag)
        if tag == "tr" and "finding" in (found.get("class") or "").split():
            self.rows.append(((found.get("class") or "").split(), []))
        elif tag == "td" and self.rows and self._cell is None:
            self._cell = []

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self.rows:
            self.rows[-1][1].append("".join(self._cell))
            self._cell = None


def reports_of(sample: EnvironmentTree) -> list[ComplianceReport]:
    good = evaluate(prod_config(sample), regimes=["gdpr", "soc2"])
    bad = evaluate(hostile(sample), tenant="nimbus-fm", env="prod", regimes=["gdpr"])
    return [good, bad]


def test_the_html_report_has_a_row_per_finding_and_escapes_values(
    sample: EnvironmentTree,
) -> None:
    reports = reports_of(sample)

    page = render_html(reports, generated_at="2025-01-01T00:00:00Z")
    parser = _Table()
    parser.feed(page)

    assert len(parser.rows) == sum(len(r.findings) for r in reports)
    assert parser.scripts == 0 and parser.external == []  # self-contained, no script
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; | x" in page
    statuses = {c for classes, _ in parser.rows for c in classes} & {"pass", "fail", "na"}
    assert statuses == {"pass", "fail", "na"}
    debug = next(
        cells
        for classes, cells in parser.rows
        if "fail" in classes and cells[1].startswith("baseline-prod-debug-off")
    )
    assert debug[0] == "FAIL"
    assert debug[5] == "application.debug = \"<script>alert('x')</script> | x\""  # as text
    failing = [classes for classes, _ in parser.rows if "fail" in classes]
    assert ["finding", "fail", "blocking"] in failing
    assert 'data-rule="baseline-prod-debug-off"' in page


def test_the_markdown_report_escapes_values(sample: EnvironmentTree) -> None:
    text = render_markdown(reports_of(sample), generated_at="2025-01-01T00:00:00Z")

    assert "<script>" not in text
    assert "&lt;script&gt;" in text
    assert "## nimbus-fm/prod" in text and "## aurora-records/prod" in text
    row = next(line for line in text.splitlines() if "FAIL | baseline-prod-debug-off" in line)
    assert row.startswith("| FAIL | baseline-prod-debug-off | critical | yes |")
    assert "&lt;/script&gt; \\| x" in row
    assert len(re.findall(r"(?<!\\)\|", row)) == 7  # a value cannot add a column
    assert "## Rules checked" in text


def test_the_json_report_has_a_stable_shape(sample: EnvironmentTree) -> None:
    reports = reports_of(sample)

    document = json.loads(render_json(reports, generated_at="2025-01-01T00:00:00Z"))

    assert document["schema"] == SCHEMA == "configbus.compliance.report/1"
    assert document["generated_at"] == "2025-01-01T00:00:00Z"
    assert document["summary"]["streams"] == 2
    assert document["summary"]["blocking_failed"] == len(reports[1].blocking_failures) > 0
    stream = document["streams"][1]
    assert (stream["tenant"], stream["env"], stream["passed"]) == ("nimbus-fm", "prod", False)
    finding = next(f for f in stream["findings"] if f["rule"] == "baseline-prod-debug-off")
    assert set(finding) == {
        "rule",
        "regime",
        "title",
        "severity",
        "blocking",
        "status",
        "expected",
        "rationale",
        "observations",
    }
    assert finding["observations"] == [
        {
            "path": "application.debug",
            "present": True,
            "value": "<script>alert('x')</script> | x",
            "ok": False,
            "expected": "== false",
        }
    ]
    assert document["rules"]["baseline-prod-debug-off"]["blocking"] is True


# -- the HTML report in a browser -------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and every pixel's RGB bytes, row by row, of an 8-bit truecolour
    (RGB or RGBA), non-interlaced PNG: what a headless Chromium writes."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, idat, header = 8, b"", b""
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        chunk, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        if chunk == b"IHDR":
            header = body
        elif chunk == b"IDAT":
            idat += body
        at += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour in (2, 6) and interlace == 0
    size = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(idat), width * size
    pixels, previous = [], bytes(stride)
    for y in range(height):
        start = y * (stride + 1)
        method, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        for x in range(stride):  # undo the row's filter (PNG spec, section 9)
            a = line[x - size] if x >= size else 0
            b, c = previous[x], previous[x - size] if x >= size else 0
            if method == 1:
                line[x] = (line[x] + a) & 255
            elif method == 2:
                line[x] = (line[x] + b) & 255
            elif method == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif method == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                near = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[x] = (line[x] + near) & 255
        previous = bytes(line)
        pixels += [previous[i : i + 3] for i in range(0, stride, size)]
    return width, height, pixels


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)")
def test_the_html_report_renders_in_a_headless_browser(
    sample: EnvironmentTree, tmp_path: Path
) -> None:
    page = tmp_path / "report.html"
    page.write_text(render_html(reports_of(sample)), encoding="utf-8")
    shot = tmp_path / "report.png"

    subprocess.run(
        [
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
            f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
            "--window-size=1280,900", "--hide-scrollbars", page.as_uri(),
        ],
        check=True, capture_output=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)},
    )  # fmt: skip

    width, height, pixels = png_pixels(shot.read_bytes())
    assert (width, height) == (1280, 900)
    colours = set(pixels)
    assert len(colours) > 50  # text, tables and colours, not a blank page
    white = sum(p == b"\xff\xff\xff" for p in pixels)
    assert white < 0.97 * len(pixels)
    # a failed row's background (#fdecea or #f9d3cf) is on the page
    assert colours & {b"\xfd\xec\xea", b"\xf9\xd3\xcf"}
