"""Compliance reports for auditors: Markdown, self-contained HTML, and JSON.

Each renders a set of stream reports (`ComplianceReport`): a summary of every stream,
then each stream's findings, failures first, then the rules checked with their
rationale. Config values are hostile input: every value, path and text is escaped for
the format it is written into, and secrets were redacted before they got here.

The JSON keeps a stable shape, versioned by its ``schema`` field::

    {"schema": "configbus.compliance.report/1", "generated_at": "...Z",
     "summary": {...}, "streams": [ComplianceReport.to_dict(), ...],
     "rules": {"<rule id>": {"title", "regime", "severity", "blocking", "rationale"}}}
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

from configbus.compliance.findings import ComplianceReport, Finding

__all__ = ["FORMATS", "SCHEMA", "render", "render_html", "render_json", "render_markdown"]

SCHEMA: Final = "configbus.compliance.report/1"
FORMATS: Final = ("md", "html", "json")
_MD_SPECIAL: Final = re.compile(r"([\\`*_\[\]|~])")  # markup inside a table cell or list item


def render(
    reports: Sequence[ComplianceReport], fmt: str, *, generated_at: str | None = None
) -> str:
    """`reports` in format `fmt` (md, html or json)."""
    if fmt == "md":
        return render_markdown(reports, generated_at=generated_at)
    if fmt == "html":
        return render_html(reports, generated_at=generated_at)
    if fmt == "json":
        return render_json(reports, generated_at=generated_at)
    raise ValueError(f"unknown report format {fmt!r} (one of {', '.join(FORMATS)})")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ordered(reports: Sequence[ComplianceReport]) -> list[ComplianceReport]:
    return sorted(reports, key=lambda r: (r.tenant or "", r.env or ""))


def _findings(report: ComplianceReport) -> list[Finding]:
    """Failures first (blocking, then by severity), then the rest in pack order."""
    rest = [f for f in report.findings if f.status != "fail"]
    return report.failures + rest


def _summary(reports: Sequence[ComplianceReport]) -> dict[str, int]:
    counts = [r.counts() for r in reports]
    return {
        "streams": len(reports),
        "streams_passed": sum(r.passed for r in reports),
        "streams_failed": sum(not r.passed for r in reports),
        "rules_checked": sum(c["rules"] for c in counts),
        "failed": sum(c["failed"] for c in counts),
        "blocking_failed": sum(c["blocking_failed"] for c in counts),
    }


def _rules(reports: Sequence[ComplianceReport]) -> dict[str, Finding]:
    """One finding per rule checked anywhere (for its title and rationale), by id."""
    seen: dict[str, Finding] = {}
    for report in reports:
        for finding in report.findings:
            seen.setdefault(finding.rule, finding)
    return dict(sorted(seen.items(), key=lambda item: (item[1].regime, item[0])))


# -- JSON -------------------------------------------------------------------------------------
def render_json(reports: Sequence[ComplianceReport], *, generated_at: str | None = None) -> str:
    """The reports as JSON (see the module docstring), ending with a newline."""
    ordered = _ordered(reports)
    document: dict[str, Any] = {
        "schema": SCHEMA,
        "generated_at": generated_at or _now(),
        "summary": _summary(ordered),
        "streams": [r.to_dict() for r in ordered],
        "rules": {
            rule: {
                "title": f.title,
                "regime": f.regime,
                "severity": f.severity,
                "blocking": f.blocking,
                "rationale": f.rationale,
            }
            for rule, f in _rules(ordered).items()
        },
    }
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


# -- Markdown ---------------------------------------------------------------------------------
def _md(text: object) -> str:
    """Text safe in a Markdown table cell: no HTML, no markup, no line breaks, no pipes."""
    escaped = html.escape(str(text), quote=False)
    escaped = _MD_SPECIAL.sub(r"\\\1", escaped)
    return " ".join(escaped.split())


def _status(finding: Finding) -> str:
    return {"pass": "PASS", "fail": "FAIL", "n/a": "N/A"}[finding.status]


def render_markdown(reports: Sequence[ComplianceReport], *, generated_at: str | None = None) -> str:
    """The reports as a Markdown document."""
    ordered = _ordered(reports)
    total = _summary(ordered)
    lines = [
        "# Compliance report",
        "",
        f"Generated {_md(generated_at or _now())}: {total['streams']} stream(s), "
        f"{total['streams_passed']} passed, {total['streams_failed']} failed; "
        f"{total['failed']} failed finding(s), {total['blocking_failed']} of them blocking.",
        "",
        "| Stream | Regimes | Rules | Passed | Failed | Blocking failed | Not applicable |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for report in ordered:
        c = report.counts()
        lines.append(
            f"| {_md(report.stream)} | {_md(', '.join(report.regimes))} | {c['rules']} | "
            f"{c['passed']} | {c['failed']} | {c['blocking_failed']} | {c['not_applicable']} |"
        )
    for report in ordered:
        lines += ["", f"## {_md(report.stream)}", ""]
        if report.config_hash:
            lines += [f"Config sha256 {report.config_hash}.", ""]
        lines += [
            f"{_md(report.summary())}.",
            "",
            "| Status | Rule | Severity | Blocking | Found | Expected |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for f in _findings(report):
            lines.append(
                f"| {_status(f)} | {_md(f.rule)} | {f.severity} | "
                f"{'yes' if f.blocking else 'no'} | {_md(f.found)} | {_md(f.expected)} |"
            )
    lines += ["", "## Rules checked", ""]
    for rule, f in _rules(ordered).items():
        gate = ", blocking" if f.blocking else ""
        lines.append(
            f"- **{_md(rule)}** ({_md(f.regime)}, {f.severity}{gate}): {_md(f.title)}. "
            f"{_md(f.rationale)}"
        )
    return "\n".join(lines) + "\n"


# -- HTML -------------------------------------------------------------------------------------
def _h(text: object) -> str:
    return html.escape(str(text), quote=True)


_CSS: Final = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2330;
       margin: 2em auto; max-width: 1200px; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { margin-top: 2em; }
.meta { color: #5a6275; }
table { border-collapse: collapse; width: 100%; margin: .8em 0; }
th, td { border: 1px solid #d5d9e2; padding: .35em .55em; text-align: left;
         vertical-align: top; }
th { background: #eef1f6; }
td.num { text-align: right; }
code { font: 12px/1.3 ui-monospace, "SFMono-Regular", Menlo, monospace;
       overflow-wrap: anywhere; }
.status { font-weight: 700; white-space: nowrap; }
tr.pass .status, .badge.pass { color: #11703a; }
tr.fail .status, .badge.fail { color: #b3261e; }
tr.na .status { color: #6b7280; }
tr.fail { background: #fdecea; }
tr.fail.blocking { background: #f9d3cf; }
.badge { font-weight: 700; }
.title { font-weight: 600; }
.rationale { color: #4a5163; font-size: .92em; margin-top: .2em; }
.severity-critical { color: #8c1d18; font-weight: 700; }
.severity-high { color: #b3261e; }
.severity-medium { color: #a05a00; }
.severity-low { color: #4a5163; }
@media print { tr.fail, tr.fail.blocking { background: none; } }
"""


def _html_finding(f: Finding) -> str:
    status = {"pass": "pass", "fail": "fail", "n/a": "na"}[f.status]
    classes = f"finding {status}" + (" blocking" if f.blocking else "")
    return (
        f'<tr class="{classes}" data-rule="{_h(f.rule)}">'
        f'<td class="status">{_status(f)}</td>'
        f'<td><code>{_h(f.rule)}</code><div class="title">{_h(f.title)}</div>'
        f'<div class="rationale">{_h(f.rationale)}</div></td>'
        f"<td>{_h(f.regime)}</td>"
        f'<td class="severity-{_h(f.severity)}">{_h(f.severity)}</td>'
        f"<td>{'yes' if f.blocking else 'no'}</td>"
        f"<td><code>{_h(f.found)}</code></td>"
        f"<td><code>{_h(f.expected)}</code></td></tr>"
    )


def render_html(reports: Sequence[ComplianceReport], *, generated_at: str | None = None) -> str:
    """The reports as one self-contained HTML page (inline style, no scripts, no
    external assets)."""
    ordered = _ordered(reports)
    total = _summary(ordered)
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>Compliance report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Compliance report</h1>",
        f'<p class="meta">Generated {_h(generated_at or _now())}: {total["streams"]} '
        f'stream(s), <span class="badge pass">{total["streams_passed"]} passed</span>, '
        f'<span class="badge fail">{total["streams_failed"]} failed</span>; '
        f"{total['failed']} failed finding(s), {total['blocking_failed']} of them blocking.</p>",
        '<table class="summary"><thead><tr><th>Stream</th><th>Regimes</th><th>Rules</th>'
        "<th>Passed</th><th>Failed</th><th>Blocking failed</th><th>Not applicable</th>"
        "</tr></thead><tbody>",
    ]
    for report in ordered:
        c = report.counts()
        state = "pass" if report.passed else "fail"
        out.append(
            f'<tr class="stream {state}"><td><a href="#{_h(_anchor(report))}">'
            f"{_h(report.stream)}</a></td><td>{_h(', '.join(report.regimes))}</td>"
            f'<td class="num">{c["rules"]}</td><td class="num">{c["passed"]}</td>'
            f'<td class="num">{c["failed"]}</td><td class="num">{c["blocking_failed"]}</td>'
            f'<td class="num">{c["not_applicable"]}</td></tr>'
        )
    out.append("</tbody></table>")
    for report in ordered:
        state = "pass" if report.passed else "fail"
        out.append(
            f'<section class="stream {state}" id="{_h(_anchor(report))}">'
            f"<h2>{_h(report.stream)} "
            f'<span class="badge {state}">{"passed" if report.passed else "failed"}</span></h2>'
        )
        meta = _h(report.summary())
        if report.config_hash:
            meta += f"; config sha256 <code>{_h(report.config_hash)}</code>"
        out.append(f'<p class="meta">{meta}</p>')
        out.append(
            '<table class="findings"><thead><tr><th>Status</th><th>Rule</th><th>Regime</th>'
            "<th>Severity</th><th>Blocking</th><th>Found</th><th>Expected</th></tr></thead><tbody>"
        )
        out += [_html_finding(f) for f in _findings(report)]
        out.append("</tbody></table></section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _anchor(report: ComplianceReport) -> str:
    return "stream-" + re.sub(r"[^a-z0-9-]+", "-", report.stream.lower())
