"""Running the rules on a config: `evaluate` for a whole report, `gate` for the publisher.

    report = evaluate(config, tenant="aurora-records", env="prod", regimes=["gdpr"])
    report.passed, report.failures, report.blocking_failures

    refused = gate(config.data, tenant=tenant, env=env, regimes=spec.compliance)
    if refused: ...   # the failed findings of blocking rules: do not publish

The baseline regime is always checked. A rule limited to other environments is left
out; with no environment at all, every rule is checked. The packs are parsed once
(`default_packs`), and the rules that apply to each (environment, regimes) are chosen
once; what remains per call is reading the settings the rules name.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

from configbus.compliance.findings import ComplianceReport, Finding
from configbus.compliance.packs import RuleSet, default_packs
from configbus.compliance.paths import Document
from configbus.tree.resolved import ResolvedConfig

__all__ = ["evaluate", "gate", "stream_of"]

_ENV_ALIASES = {"development": "dev", "production": "prod"}


def stream_of(
    config: Mapping[str, Any], tenant: str | None, env: str | None
) -> tuple[Mapping[str, Any], str | None, str | None]:
    """The data to check, the tenant and the environment: what is given, else what a
    `ResolvedConfig` carries. Environment aliases (production, development) resolved."""
    if isinstance(config, ResolvedConfig):
        tenant = tenant if tenant is not None else config.tenant
        env = env if env is not None else config.env
        config = config.data
    if env is not None:
        env = env.strip().lower()
        env = _ENV_ALIASES.get(env, env)
    return config, tenant, env


def evaluate(
    config: Mapping[str, Any],
    *,
    tenant: str | None = None,
    env: str | None = None,
    regimes: Iterable[str] | None = None,
    packs: RuleSet | None = None,
) -> ComplianceReport:
    """Every rule of `regimes` (None: of every regime the packs have) and of the
    baseline that applies to `env`, checked on `config` (a `ResolvedConfig`, or the
    data of one: plain JSON-like data works too, secrets as ``{"$secret": NAME}``).
    Raises `UnknownNameError` for a regime no pack has."""
    rules = packs if packs is not None else default_packs()
    config_hash = config.hash if isinstance(config, ResolvedConfig) else None
    data, tenant, env = stream_of(config, tenant, env)
    chosen = rules.regimes_for(regimes)
    doc = Document(data, rules.anchors)
    findings = tuple(rule.run(doc) for rule in rules.select(env, chosen))
    return ComplianceReport(tenant, env, chosen, findings, config_hash)


def gate(
    config: Mapping[str, Any],
    *,
    tenant: str | None,
    env: str,
    regimes: Iterable[str],
    packs: RuleSet | None = None,
    waived: Collection[str] = (),
) -> list[Finding]:
    """The failed findings of the blocking rules that apply to the stream: empty when
    it may be published. `regimes` are the tenant's (`TenantSpec.compliance`); the
    baseline is added. `waived` holds rule ids a valid waiver lifts for this stream
    (the caller checks the waiver's signature and expiry). Only blocking rules run."""
    rules = packs if packs is not None else default_packs()
    data, tenant, env_name = stream_of(config, tenant, env)
    chosen = rules.regimes_for(regimes)
    doc = Document(data, rules.anchors)
    failed = []
    for rule in rules.select(env_name, chosen, blocking=True):
        if rule.id in waived:
            continue
        finding = rule.run(doc)
        if finding.status == "fail":
            failed.append(finding)
    return failed
