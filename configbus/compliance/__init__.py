"""Compliance as data: rule packs per regime, checked on each stream's resolved config.

    packs/*.yml     the built-in packs: baseline (every stream), gdpr, soc2, hipaa
    packs.py        loading packs (with file:line problems), `RuleSet`, the pack cache
    checks.py       the `check:` vocabulary: equals, one_of, min/max, version, ...
    paths.py        dotted paths with `*` and `**` wildcards
    findings.py     `Observation`, `Finding`, `ComplianceReport`
    engine.py       `evaluate` (a stream's report) and `gate` (what the publisher asks)
    report.py       Markdown, HTML and JSON reports for auditors
    checker.py      `ComplianceChecker`, the seed's Python API

A tenant declares its regimes in tenant.yml (``compliance: [gdpr, soc2]``); the
baseline applies to every stream. See docs/compliance.md.
"""

from configbus.compliance.checker import ComplianceChecker
from configbus.compliance.engine import evaluate, gate
from configbus.compliance.findings import ComplianceReport, Finding, Observation
from configbus.compliance.packs import (
    BASELINE,
    Rule,
    RuleSet,
    default_packs,
    known_regimes,
    load_packs,
)

__all__ = [
    "BASELINE",
    "ComplianceChecker",
    "ComplianceReport",
    "Finding",
    "Observation",
    "Rule",
    "RuleSet",
    "default_packs",
    "evaluate",
    "gate",
    "known_regimes",
    "load_packs",
]
