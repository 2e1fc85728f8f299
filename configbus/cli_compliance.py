"""`configbus compliance check | report | rules`: the compliance packs on the tree's streams.

Streams are resolved from the tree alone (with the tenant store when one is configured,
as `render` does; never Kafka). Each stream is held to the baseline and to the regimes
its tenant.yml declares (``compliance: [gdpr, soc2]``); ``--regime`` checks the rules of
the regimes named instead.

Exit codes of `check`: 0 when no rule failed (or none at the ``--fail-on`` level), 1 when
one did or a stream could not be resolved, 2 for a usage error: an unknown tenant,
environment or regime, or a pack with problems. `report` exits 0 once written.

`register` returns the `compliance` subcommands, so that another module can add its
own (``compliance waive``) beside check, report and rules.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, Final, TextIO

from configbus import cli_bus
from configbus.compliance import ComplianceReport, RuleSet, default_packs, evaluate
from configbus.compliance.findings import SEVERITIES, Finding
from configbus.compliance.packs import PACKS_VARIABLE
from configbus.compliance.report import FORMATS, render, render_json
from configbus.errors import SettingsError, TreeError, display_path
from configbus.tree import EnvironmentTree, default_root

__all__ = ["register"]

NO_TENANT: Final = "-"
_FAIL_ON: Final = ("any", "blocking", *SEVERITIES)

SubParsers = argparse._SubParsersAction  # the `compliance` subcommands


def register(commands: Any, root: argparse.ArgumentParser) -> SubParsers[argparse.ArgumentParser]:
    """Add `configbus compliance` with check, report and rules; return its subcommands
    for another module to add to."""
    compliance = commands.add_parser(
        "compliance", help="check streams against the compliance packs (GDPR, SOC 2, HIPAA)"
    )
    actions: SubParsers[argparse.ArgumentParser] = compliance.add_subparsers(
        dest="compliance_command", required=True, metavar="ACTION"
    )
    packs = argparse.ArgumentParser(add_help=False)
    packs.add_argument(
        "--packs",
        metavar="DIR",
        action="append",
        help=f"more rule packs, a directory of *.yml or a file (repeatable; default "
        f"${PACKS_VARIABLE}, several joined with {os.pathsep!r})",
    )
    regime = argparse.ArgumentParser(add_help=False)
    regime.add_argument(
        "--regime",
        action="append",
        metavar="R",
        help="check this regime's rules instead of the baseline and the tenant's declared "
        "regimes (repeatable: gdpr, soc2, hipaa, baseline, ...)",
    )
    streams = argparse.ArgumentParser(add_help=False, parents=[root, packs, regime])
    streams.add_argument(
        "tenant", metavar="TENANT", nargs="?", help=f"tenant id, or {NO_TENANT} for none"
    )
    streams.add_argument("env", metavar="ENV", nargs="?", help="environment (dev, staging, prod)")
    streams.add_argument("--all", action="store_true", help="every stream the tree declares")
    streams.add_argument(
        "--redis",
        metavar="URL",
        help="include the tenant store's layer (default $CONFIGBUS_REDIS_URL), as render does",
    )
    streams.add_argument(
        "--no-store", action="store_true", help="the files alone, without the tenant store"
    )

    check = actions.add_parser(
        "check",
        parents=[streams],
        help="check streams; exit 1 when a rule fails",
        description="Check TENANT ENV (or --all streams) against the baseline and the "
        "regimes the tenant declares. Exit 0: no rule failed; 1: a rule failed (see "
        "--fail-on) or a stream did not resolve; 2: a usage error.",
    )
    check.add_argument("--json", action="store_true", help="the JSON report instead of text")
    check.add_argument(
        "--fail-on",
        choices=_FAIL_ON,
        default="any",
        help="exit 1 only for failures of blocking rules, or of this severity or worse (any)",
    )
    check.add_argument(
        "-v", "--verbose", action="store_true", help="list passed and not applicable rules too"
    )
    check.set_defaults(func=_check)

    report = actions.add_parser(
        "report",
        parents=[streams],
        help="write an auditor's report (Markdown, HTML or JSON)",
        description="A report of TENANT ENV, or of every stream (--all, the default).",
    )
    report.add_argument("--format", choices=FORMATS, default="md", help="(md)")
    report.add_argument("--output", "-o", metavar="FILE", help="write here (default: stdout)")
    report.set_defaults(func=_report)

    rules = actions.add_parser(
        "rules", parents=[packs], help="list the rules: id, regime, severity, blocking, where"
    )
    rules.add_argument("--regime", metavar="R", help="only this regime's rules")
    rules.add_argument("--json", action="store_true", help="machine-readable output")
    rules.set_defaults(func=_rules)
    return actions


# -- commands ---------------------------------------------------------------------------------
def _check(args: argparse.Namespace, out: TextIO) -> int:
    packs = _packs(args)
    if packs is None:
        return 2
    reports, broken = _evaluate(args, packs)
    if args.json:
        out.write(render_json(reports))
    else:
        for report in reports:
            _print_report(report, out, verbose=args.verbose)
        if len(reports) + broken > 1:
            _print_total(reports, broken, out)
    failing = [f for r in reports for f in r.failures if _fails(f, args.fail_on)]
    return 1 if failing or broken else 0


def _report(args: argparse.Namespace, out: TextIO) -> int:
    packs = _packs(args)
    if packs is None:
        return 2
    if args.tenant is None:
        args.all = True  # no stream named: all of them
    reports, broken = _evaluate(args, packs)
    text = render(reports, args.format)
    if args.output is None:
        out.write(text)
        return 1 if broken else 0
    with open(args.output, "w", encoding="utf-8") as handle:
        handle.write(text)
    failed = sum(len(r.failures) for r in reports)
    print(
        f"wrote {display_path(args.output)}: {len(reports)} stream(s), {failed} failed finding(s)",
        file=sys.stderr,
    )
    return 1 if broken else 0


def _rules(args: argparse.Namespace, out: TextIO) -> int:
    packs = _packs(args)
    if packs is None:
        return 2
    if args.regime is not None:
        packs.regimes_for([args.regime])  # an unknown regime: a usage error
    chosen = [r for r in packs.rules if args.regime is None or r.regime == args.regime]
    if args.json:
        import json

        json.dump([r.to_dict() for r in chosen], out, indent=2, ensure_ascii=False)
        out.write("\n")
        return 0
    rows = [
        (r.id, r.regime, r.severity, "yes" if r.blocking else "no", r.where, r.title)
        for r in chosen
    ]
    header = ("RULE", "REGIME", "SEVERITY", "BLOCKING", "ENVIRONMENTS", "TITLE")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(5)]
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[5]]), file=out)
    return 0


# -- helpers ----------------------------------------------------------------------------------
def _packs(args: argparse.Namespace) -> RuleSet | None:
    """The packs to check with; None (problems printed) when one is broken."""
    try:
        return default_packs(args.packs)
    except TreeError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"configbus: {len(exc.problems)} problem(s) in the compliance packs", file=sys.stderr)
        return None


def _tree(args: argparse.Namespace) -> EnvironmentTree:
    root = default_root(args.root)
    if not root.is_dir():
        raise SettingsError(f"{root}: no such directory (give --root or set CONFIGBUS_ROOT)")
    return EnvironmentTree(root)


def _streams(args: argparse.Namespace, tree: EnvironmentTree) -> list[tuple[str | None, str]]:
    """The streams asked for: TENANT ENV, or every declared one with --all."""
    if args.all:
        if args.tenant is not None:
            raise SettingsError("give TENANT ENV or --all, not both")
        return list(tree.streams())
    if args.tenant is None or args.env is None:
        raise SettingsError("give TENANT ENV (- for no tenant), or --all")
    tenant = None if args.tenant == NO_TENANT else args.tenant
    env = tree.environment(args.env)  # unknown: a usage error
    if tenant is not None and env not in tree.tenant(tenant).environments:
        raise SettingsError(
            f"tenant {tenant!r} does not run in {env!r} "
            f"(it declares: {', '.join(tree.tenant(tenant).environments)})"
        )
    return [(tenant, env)]


def _evaluate(args: argparse.Namespace, packs: RuleSet) -> tuple[list[ComplianceReport], int]:
    """A report per stream asked for, and how many streams could not be resolved (their
    problems printed on stderr)."""
    tree = _tree(args)
    if args.regime:
        packs.regimes_for(args.regime)  # an unknown regime: a usage error, before any work
    broken = 0
    if args.all:  # a tenant.yml that does not load declares no stream: say so
        for name in tree.tenants():
            try:
                tree.tenant(name)
            except TreeError as exc:
                broken += 1
                _print_problems(exc, f"{name}: tenant.yml")
    reports = []
    for tenant, env in _streams(args, tree):
        try:
            runtime = [] if args.no_store else cli_bus.store_layers(args.redis, tenant, env)
            config = tree.resolve(env, tenant, runtime=runtime)
            declared = tree.tenant(tenant).compliance if tenant is not None else ()
        except TreeError as exc:
            if not args.all:
                raise
            broken += 1
            _print_problems(exc, f"{tenant or NO_TENANT}/{env}")
            continue
        if args.regime:
            report = evaluate(config, regimes=args.regime, packs=packs).only(*args.regime)
        else:
            report = evaluate(config, regimes=declared, packs=packs)
        reports.append(report)
    return reports, broken


def _fails(finding: Finding, level: str) -> bool:
    """Whether a failed finding makes `check` exit 1 under ``--fail-on level``."""
    if level == "any":
        return True
    if level == "blocking":
        return finding.blocking
    return SEVERITIES.index(finding.severity) <= SEVERITIES.index(level)


def _print_report(report: ComplianceReport, out: TextIO, *, verbose: bool) -> None:
    title = f"{report.stream}  [{', '.join(report.regimes) or 'no regime'}]"
    if report.config_hash:
        title += f"  sha256:{report.config_hash[:12]}"
    print(title, file=out)
    shown = report.failures + (
        [f for f in report.findings if f.status != "fail"] if verbose else []
    )
    widths = [max((len(f.rule) for f in shown), default=0), len("critical")]
    for f in shown:
        status = {"pass": "pass", "fail": "FAIL", "n/a": "n/a "}[f.status]
        gate = "blocking" if f.blocking else "        "
        what = f"{f.found}; expected {f.expected}" if f.status == "fail" else f.title
        print(
            f"  {status}  {f.rule:<{widths[0]}}  {f.severity:<{widths[1]}}  {gate}  {what}",
            file=out,
        )
    print(f"  {report.summary()}", file=out)


def _print_total(reports: Sequence[ComplianceReport], broken: int, out: TextIO) -> None:
    failed = sum(not r.passed for r in reports)
    findings = sum(len(r.failures) for r in reports)
    blocking = sum(len(r.blocking_failures) for r in reports)
    text = (
        f"{len(reports)} stream(s): {len(reports) - failed} passed, {failed} failed; "
        f"{findings} failed rule(s), {blocking} of them blocking"
    )
    if broken:
        text += f"; {broken} could not be resolved"
    print(text, file=out)


def _print_problems(exc: TreeError, what: str) -> None:
    for problem in exc.problems:
        line = str(problem) if problem.source else f"configbus: {what}: {problem.message}"
        print(line, file=sys.stderr)
