"""`configbus audit verify` and `configbus audit export`: prove the audit trail was not
touched, and hand it to a SIEM (configbus/ops/audit.py).

    configbus audit verify --trust trust.yml [--since 24h | --since 2026-12-01T00:00Z]
    configbus audit export --trust trust.yml --format csv --output trail.csv

`verify` exits 0 when every link holds and 1 with one line per finding otherwise.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys
from typing import Any, TextIO

from configbus.bus import Bus, KafkaBus, TopicNames
from configbus.crypto import TrustStore
from configbus.errors import SettingsError, UnknownNameError
from configbus.events import now_ns
from configbus.options import parse_duration

__all__ = ["parse_since", "register"]

SHOWN_FINDINGS = 50  # on the terminal; --json has them all


def register(commands: Any, kafka: argparse.ArgumentParser) -> None:
    audit = commands.add_parser(
        "audit", help="the audit trail: verify its hash chains, export it for a SIEM"
    )
    actions = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False, parents=[kafka])
    common.add_argument("--trust", metavar="FILE", help="trust file (default $CONFIGBUS_TRUST)")
    common.add_argument(
        "--since",
        metavar="TIME",
        help="only records written since TIME: a duration ago (24h, 7d) or an ISO time",
    )
    verify = actions.add_parser(
        "verify",
        parents=[common],
        help="walk the chains: records forged, altered, dropped, reordered or replayed",
    )
    verify.add_argument("--json", action="store_true", help="the report as JSON")
    verify.set_defaults(func=_verify)
    export = actions.add_parser(
        "export", parents=[common], help="every record as a row: who, what, when, why"
    )
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="(jsonl)")
    export.add_argument("--output", metavar="FILE", help="write there (default: stdout)")
    export.set_defaults(func=_export)


def parse_since(text: str | None, now: int | None = None) -> int | None:
    """`--since`: a duration before `now` (ns), or an ISO 8601 time (UTC when it names
    no zone), as ns since the epoch. Raises `SettingsError`."""
    if text is None:
        return None
    try:
        return (now if now is not None else now_ns()) - parse_duration(text) * 1_000_000_000
    except (SettingsError, ValueError):
        pass
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise SettingsError(
            f"--since {text!r}: give a duration (24h, 7d) or an ISO time (2026-12-01T09:00Z)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return int(when.timestamp() * 1_000_000_000)


def _connect(args: argparse.Namespace) -> tuple[Bus, TopicNames, TrustStore]:
    from configbus.cli_bus import _kafka, _trust

    kafka, topics = _kafka(args)
    return KafkaBus(kafka), topics, _trust(args)


def _verify(args: argparse.Namespace, out: TextIO) -> int:
    from configbus.cli_bus import run_async
    from configbus.ops.audit import verify_trail

    since = parse_since(args.since)
    bus, topics, trust = _connect(args)
    report = run_async(verify_trail(bus, topics, trust, since=since))
    if args.json:
        json.dump(report.to_dict(), out, indent=2)
        out.write("\n")
    else:
        for finding in report.findings[:SHOWN_FINDINGS]:
            print(finding, file=out)
        hidden = len(report.findings) - SHOWN_FINDINGS + report.more_findings
        if hidden > 0:
            print(f"... and {hidden} more (--json lists them)", file=out)
        print(report.summary(), file=out if report.ok else sys.stderr)
    return 0 if report.ok else 1


def _export(args: argparse.Namespace, out: TextIO) -> int:
    from configbus.cli_bus import run_async

    since = parse_since(args.since)
    bus, topics, trust = _connect(args)
    if args.output:
        folder = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(folder):
            raise UnknownNameError(f"--output {args.output}: no folder {folder}")
        with open(args.output, "w", encoding="utf-8", newline="") as target:
            count = run_async(_write(bus, topics, trust, since, args.format, target))
        print(f"exported {count} audit records to {args.output}", file=sys.stderr)
    else:
        run_async(_write(bus, topics, trust, since, args.format, out))
    return 0


async def _write(
    bus: Bus, topics: TopicNames, trust: TrustStore, since: int | None, form: str, out: TextIO
) -> int:
    from configbus.ops.audit import EXPORT_FIELDS, trail_rows

    writer = csv.DictWriter(out, fieldnames=EXPORT_FIELDS) if form == "csv" else None
    if writer is not None:
        writer.writeheader()
    count = 0
    async for row in trail_rows(bus, topics, trust, since=since):
        if writer is not None:
            writer.writerow(row)
        else:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        count += 1
    return count
