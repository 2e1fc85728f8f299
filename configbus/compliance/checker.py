"""`ComplianceChecker`: the compliance checks as the product description promises them.

    from configbus import ComplianceChecker

    checker = ComplianceChecker()
    gdpr_result = checker.check_gdpr_compliance(config)
    security_audit = checker.security_audit(config)
    compliance_report = checker.generate_report(config)

    gdpr_result.passed, gdpr_result.findings, gdpr_result.failures
    compliance_report.to_html()           # or to_markdown(), to_json()

`config` is a `ResolvedConfig` (which carries its tenant and environment) or a plain
mapping; ``environment=`` and ``tenant=`` say what a plain mapping does not, else
``CONFIGBUS_ENV`` and ``CONFIGBUS_TENANT``. Without any environment every rule is
checked, whatever environments it is limited to. Every call returns a
`ComplianceReport`: the `security_audit` holds the baseline rules, each regime's check
that regime's rules, and `generate_report` the regimes that apply (see its docstring).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from configbus.compliance.engine import evaluate
from configbus.compliance.findings import ComplianceReport
from configbus.compliance.packs import BASELINE, Rule, RuleSet, default_packs
from configbus.tree.manager import default_root
from configbus.tree.tree import EnvironmentTree

__all__ = ["ComplianceChecker"]


class ComplianceChecker:
    """Checks configs against the compliance packs: the built-in ones, plus those in
    `packs` (a directory or pack file, or several; default ``CONFIGBUS_COMPLIANCE_PACKS``),
    or exactly the `RuleSet` given. `root` is the environment tree whose tenant.yml
    files say which regimes a tenant is held to (default ``CONFIGBUS_ROOT``, then
    ``./environments``, when there is one)."""

    def __init__(
        self,
        packs: RuleSet | str | os.PathLike[str] | Sequence[str] | None = None,
        *,
        root: str | os.PathLike[str] | None = None,
    ) -> None:
        self.packs = packs if isinstance(packs, RuleSet) else default_packs(packs)
        self._root = root

    def __repr__(self) -> str:
        regimes = ", ".join(self.packs.regimes())
        return f"ComplianceChecker({len(self.packs.rules)} rules: {regimes})"

    def rules(self, regime: str | None = None) -> list[Rule]:
        """The rules loaded, in pack order; only `regime`'s when given."""
        return [r for r in self.packs.rules if regime is None or r.regime == regime]

    def check(
        self,
        config: Mapping[str, Any],
        regime: str,
        *,
        environment: str | None = None,
        tenant: str | None = None,
    ) -> ComplianceReport:
        """The rules of `regime` alone (say ``"gdpr"``) on `config`."""
        report = self._evaluate(config, [regime], environment, tenant)
        return report.only(regime)

    def check_gdpr_compliance(
        self,
        config: Mapping[str, Any],
        *,
        environment: str | None = None,
        tenant: str | None = None,
    ) -> ComplianceReport:
        """The GDPR rules on `config`."""
        return self.check(config, "gdpr", environment=environment, tenant=tenant)

    def check_soc2_compliance(
        self,
        config: Mapping[str, Any],
        *,
        environment: str | None = None,
        tenant: str | None = None,
    ) -> ComplianceReport:
        """The SOC 2 rules on `config`."""
        return self.check(config, "soc2", environment=environment, tenant=tenant)

    def check_hipaa_compliance(
        self,
        config: Mapping[str, Any],
        *,
        environment: str | None = None,
        tenant: str | None = None,
    ) -> ComplianceReport:
        """The HIPAA rules on `config`."""
        return self.check(config, "hipaa", environment=environment, tenant=tenant)

    def security_audit(
        self,
        config: Mapping[str, Any],
        *,
        environment: str | None = None,
        tenant: str | None = None,
    ) -> ComplianceReport:
        """The security baseline every stream is held to (TLS, encryption, MFA, debug
        off, secure cookies, ...) on `config`."""
        return self.check(config, BASELINE, environment=environment, tenant=tenant)

    def generate_report(
        self,
        config: Mapping[str, Any],
        *,
        environment: str | None = None,
        tenant: str | None = None,
        regimes: Iterable[str] | None = None,
    ) -> ComplianceReport:
        """Every rule that applies to `config`: the baseline plus `regimes`, else the
        regimes its tenant declares in the tree's tenant.yml (``compliance:``), else
        every regime the packs have. Render it with `to_markdown`, `to_html` or
        `to_json`."""
        tenant_id = _given(tenant, config, "tenant", "CONFIGBUS_TENANT")
        if regimes is None and tenant_id is not None:
            regimes = self._declared(tenant_id)
        return self._evaluate(config, regimes, environment, tenant)

    def _evaluate(
        self,
        config: Mapping[str, Any],
        regimes: Iterable[str] | None,
        environment: str | None,
        tenant: str | None,
    ) -> ComplianceReport:
        return evaluate(
            config,
            tenant=_given(tenant, config, "tenant", "CONFIGBUS_TENANT"),
            env=_given(environment, config, "env", "CONFIGBUS_ENV"),
            regimes=regimes,
            packs=self.packs,
        )

    def _declared(self, tenant: str) -> tuple[str, ...] | None:
        """The regimes `tenant` declares in the tree, or None without a tree or tenant."""
        root = default_root(self._root)
        if not root.is_dir():
            return None
        tree = EnvironmentTree(root)
        if tenant not in tree.tenants():
            return None
        return tree.tenant(tenant).compliance


def _given(
    value: str | None, config: Mapping[str, Any], attribute: str, variable: str
) -> str | None:
    """The argument, else the config's own (a `ResolvedConfig`'s), else the variable."""
    if value is not None:
        return value
    own = getattr(config, attribute, None)
    if isinstance(own, str):
        return own
    return os.environ.get(variable) or None
