"""`configbus compliance waive` and `configbus compliance waivers`: let one stream be
published although one blocking rule fails, for a while, under an operator's signature
(configbus/ops/waivers.py).

    configbus compliance waive aurora-records prod baseline-backups-encrypted \\
        --for 24h --reason "CHG-77: backup vendor migration" --key oncall.key --trust trust.yml
    configbus compliance waive aurora-records prod baseline-backups-encrypted --end --reason done
    configbus compliance waivers aurora-records prod --trust trust.yml
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from configbus.errors import SettingsError, UnknownNameError
from configbus.events import now_ns
from configbus.options import format_duration, parse_duration

__all__ = ["register"]


def register(actions: Any, kafka: argparse.ArgumentParser) -> None:
    """Add `waive` and `waivers` to the `compliance` command's `actions`."""
    stream = argparse.ArgumentParser(add_help=False, parents=[kafka])
    stream.add_argument("tenant", metavar="TENANT")
    stream.add_argument("env", metavar="ENV")
    stream.add_argument("--trust", metavar="FILE", help="trust file (default $CONFIGBUS_TRUST)")
    waive = actions.add_parser(
        "waive",
        parents=[stream],
        help="let a stream be published although a blocking rule fails: signed, expiring",
    )
    waive.add_argument("rule", metavar="RULE", help="the rule's id (configbus compliance rules)")
    waive.add_argument("--for", dest="duration", metavar="DURATION", help="how long: 4h, 2d")
    waive.add_argument("--end", action="store_true", help="end the rule's waiver now")
    waive.add_argument("--reason", required=True, help="why: a change request, a ticket")
    waive.add_argument("--actor", help="who (default: the key id)")
    waive.add_argument(
        "--key", metavar="FILE", help="your operator key, KID.key (default $CONFIGBUS_OPERATOR_KEY)"
    )
    waive.add_argument("--kid", help="its key id (default: the file's name without .key)")
    waive.set_defaults(func=_waive)
    waivers = actions.add_parser("waivers", parents=[stream], help="a stream's waivers")
    waivers.set_defaults(func=_waivers)


def _waive(args: argparse.Namespace, out: TextIO) -> int:
    from configbus.cli_override import _run, operator_signer
    from configbus.compliance import default_packs
    from configbus.ops.waivers import describe, write_waiver

    if args.end == bool(args.duration):
        raise UnknownNameError("give --for DURATION, or --end")
    try:
        default_packs().rule(args.rule)
    except UnknownNameError as exc:
        raise UnknownNameError(f"{exc} (configbus compliance rules lists them)") from None
    try:
        for_s = 0 if args.end else parse_duration(args.duration)
    except ValueError as exc:
        raise UnknownNameError(f"--for {args.duration!r}: {exc}") from None
    bus, topics, trust, key = operator_signer(args)
    entry = trust.get(key.kid)
    if entry is not None and entry.max_ttl is not None and for_s > entry.max_ttl:
        raise SettingsError(
            f"--for {args.duration}: key {key.kid!r} may sign {format_duration(entry.max_ttl)} "
            "at most (its max_ttl)"
        )
    waiver = _run(
        write_waiver(
            bus, topics, args.tenant, args.env, args.rule, for_s=for_s, key=key, trust=trust,
            actor=args.actor or key.kid, reason=args.reason,
        )
    )  # fmt: skip
    name = f"{args.tenant}/{args.env}"
    if args.end:
        print(f"waiver of {args.rule} for {name} ended", file=out)
    else:
        print(f"waived for {name}: {describe([waiver], now_ns())[0]}", file=out)
        print("the daemon publishes the stream's held change now, if it breaks no other rule",
              file=sys.stderr)  # fmt: skip
    return 0


def _waivers(args: argparse.Namespace, out: TextIO) -> int:
    from configbus.bus import KafkaBus
    from configbus.cli_bus import _kafka, _tenant_topic, _trust, run_async
    from configbus.ops.waivers import describe, read_waivers

    kafka, topics = _kafka(args)
    _tenant_topic(topics, args.tenant)
    found = run_async(read_waivers(KafkaBus(kafka), topics, args.tenant, args.env, _trust(args)))
    if not found:
        print(f"{args.tenant}/{args.env}: no waivers", file=out)
    for line in describe(found, now_ns()):
        print(line, file=out)
    return 0
