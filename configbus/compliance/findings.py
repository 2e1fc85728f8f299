"""What a compliance check found: observations, findings and a stream's report.

    Observation   one setting a rule looked at: its path, its value (redacted), ok or not
    Finding       one rule on one stream: pass, fail or n/a, with its observations
    ComplianceReport
                  every finding of one stream (tenant, environment) and the regimes
                  that were checked

Values are shown as an auditor may read them and never as secrets: a secret reference
shows as ``<secret:NAME>``, and a plain string held under a key that names a secret
(``password``, ``api_key``, ...) as ``<redacted>``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from configbus.tree.values import SecretRef, looks_secret, secret_ref

__all__ = [
    "SEVERITIES",
    "ComplianceReport",
    "Finding",
    "Observation",
    "Severity",
    "Status",
    "shown",
]

Severity = Literal["critical", "high", "medium", "low"]
Status = Literal["pass", "fail", "n/a"]
SEVERITIES: Final[tuple[Severity, ...]] = ("critical", "high", "medium", "low")  # worst first
REDACTED: Final = "<redacted>"
_SHOWN_MAX: Final = 200  # characters of a value in one line of text
_PLAIN: Final = frozenset({bool, int, float, type(None)})


def shown(value: Any, key: str | int = "") -> Any:
    """`value` as safe to print: JSON-compatible, secrets redacted. `key` is the key
    the value is held under (a plain string under a secret-looking key is redacted)."""
    kind = type(value)
    if kind is str:
        return REDACTED if value and looks_secret(key) else value
    if kind in _PLAIN:
        return value
    if isinstance(value, SecretRef):
        return value.shown()
    if isinstance(value, Mapping):
        ref = secret_ref(value)
        if ref is not None:
            return ref.shown()
        return {str(k): shown(v, k) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [shown(v, key) for v in value]  # items of `api_keys: [...]` are secrets too
    if isinstance(value, str) and value and looks_secret(key):
        return REDACTED
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return f"<{type(value).__name__}>"


def one_line(value: Any) -> str:
    """A shown value as compact JSON on one line, cut at a couple of hundred characters."""
    text = json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    return text if len(text) <= _SHOWN_MAX else text[: _SHOWN_MAX - 3] + "..."


@dataclass(frozen=True, slots=True)
class Observation:
    """One setting a rule looked at. `value` is already redacted (see `shown`); `path`
    is the pattern itself when nothing matched it (`present` is then False)."""

    path: str
    value: Any
    present: bool
    ok: bool
    expected: str

    def __str__(self) -> str:
        """``security.tls.min_version = "1.0"``, or ``security.tls.min_version: not set``."""
        return f"{self.path} = {one_line(self.value)}" if self.present else f"{self.path}: not set"

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "present": self.present,
            "value": self.value,
            "ok": self.ok,
            "expected": self.expected,
        }


@dataclass(frozen=True, slots=True)
class Finding:
    """One rule's verdict on one stream."""

    rule: str
    regime: str
    title: str
    severity: Severity
    blocking: bool
    status: Status
    expected: str
    rationale: str
    observations: tuple[Observation, ...] = ()

    @property
    def passed(self) -> bool:
        """Not failed: passed, or not applicable (a `when:` condition does not hold)."""
        return self.status != "fail"

    @property
    def paths(self) -> tuple[str, ...]:
        """The settings looked at, as the config spells them."""
        return tuple(o.path for o in self.observations)

    @property
    def found(self) -> str:
        """What was found, on one line: the failing settings first when it failed."""
        wrong = [o for o in self.observations if not o.ok]
        return "; ".join(str(o) for o in (wrong or self.observations))

    def __repr__(self) -> str:
        gate = ", blocking" if self.blocking else ""
        return (
            f"<Finding {self.status.upper()} {self.rule} ({self.severity}{gate}): "
            f"{self.found or '-'}; expected {self.expected}>"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "regime": self.regime,
            "title": self.title,
            "severity": self.severity,
            "blocking": self.blocking,
            "status": self.status,
            "expected": self.expected,
            "rationale": self.rationale,
            "observations": [o.to_dict() for o in self.observations],
        }


@dataclass(frozen=True, slots=True)
class ComplianceReport:
    """Every finding of one stream: the rules of `regimes` that apply to `env`."""

    tenant: str | None
    env: str | None
    regimes: tuple[str, ...]
    findings: tuple[Finding, ...]
    config_hash: str | None = None

    @property
    def stream(self) -> str:
        return f"{self.tenant or '-'}/{self.env or '-'}"

    @property
    def passed(self) -> bool:
        """No rule failed."""
        return all(f.passed for f in self.findings)

    @property
    def failures(self) -> list[Finding]:
        """The failed findings, worst first."""
        failed = [f for f in self.findings if f.status == "fail"]
        return sorted(failed, key=lambda f: (not f.blocking, SEVERITIES.index(f.severity)))

    @property
    def blocking_failures(self) -> list[Finding]:
        """The failed findings of blocking rules: what stops a publication."""
        return [f for f in self.failures if f.blocking]

    def counts(self) -> dict[str, int]:
        """Rules checked, passed, failed (and of those, blocking), not applicable."""
        statuses = [f.status for f in self.findings]
        return {
            "rules": len(statuses),
            "passed": statuses.count("pass"),
            "failed": statuses.count("fail"),
            "blocking_failed": len(self.blocking_failures),
            "not_applicable": statuses.count("n/a"),
        }

    def finding(self, rule: str) -> Finding:
        """The finding of rule `rule`. Raises `KeyError` when it was not checked."""
        for found in self.findings:
            if found.rule == rule:
                return found
        raise KeyError(rule)

    def only(self, *regimes: str) -> ComplianceReport:
        """This report restricted to the findings of `regimes`."""
        kept = tuple(f for f in self.findings if f.regime in regimes)
        chosen = tuple(r for r in self.regimes if r in regimes)
        return ComplianceReport(self.tenant, self.env, chosen, kept, self.config_hash)

    def summary(self) -> str:
        """The counts in words: ``40 rules, 38 passed, 2 failed (1 blocking)``."""
        c = self.counts()
        text = f"{c['rules']} rules, {c['passed']} passed, {c['failed']} failed"
        if c["failed"]:
            text += f" ({c['blocking_failed']} blocking)"
        if c["not_applicable"]:
            text += f", {c['not_applicable']} not applicable"
        return text

    def __repr__(self) -> str:
        c = self.counts()
        verdict = "PASSED" if self.passed else "FAILED"
        regimes = ", ".join(self.regimes) or "no regime"
        failed = f" ({c['failed']} failed, {c['blocking_failed']} blocking)" if c["failed"] else ""
        return f"<ComplianceReport {self.stream} [{regimes}]: {verdict} {c['rules']} rules{failed}>"

    def to_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "env": self.env,
            "config_hash": self.config_hash,
            "regimes": list(self.regimes),
            "passed": self.passed,
            "summary": self.counts(),
            "findings": [f.to_dict() for f in self.findings],
        }

    # -- rendered ------------------------------------------------------------------------
    def to_markdown(self) -> str:
        from configbus.compliance.report import render_markdown

        return render_markdown([self])

    def to_html(self) -> str:
        from configbus.compliance.report import render_html

        return render_html([self])

    def to_json(self) -> str:
        from configbus.compliance.report import render_json

        return render_json([self])
