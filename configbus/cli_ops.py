"""`configbus history` and `configbus diff`: what was published for a stream, by whom
and why, and what changed between two versions. Read from the audit topic and verified
with the trust file (configbus/ops/history.py)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from configbus.bus import CANDIDATE_CHANNEL, OVERRIDE_CHANNEL, SNAPSHOT_CHANNEL, KafkaBus
from configbus.errors import SettingsError, UnknownNameError
from configbus.events import shown
from configbus.ops import StreamHistory, diff, stream_history

__all__ = ["register"]

VALUE_CHARS = 120  # of a value in the diff table; --json has them whole


def register(commands: Any, kafka: argparse.ArgumentParser) -> None:
    stream = argparse.ArgumentParser(add_help=False, parents=[kafka])
    stream.add_argument("tenant", metavar="TENANT")
    stream.add_argument("env", metavar="ENV")
    stream.add_argument("--trust", metavar="FILE", help="trust file (default $CONFIGBUS_TRUST)")
    stream.add_argument("--json", action="store_true", help="JSON instead of a table")

    history = commands.add_parser(
        "history", parents=[stream], help="every published version of a stream: who, why, what"
    )
    history.add_argument("--limit", type=int, metavar="N", help="the last N versions only")
    history.set_defaults(func=_history)

    changes = commands.add_parser(
        "diff", parents=[stream], help="value-level changes between two versions of a stream"
    )
    changes.add_argument("old", type=int, metavar="V1")
    changes.add_argument("new", type=int, nargs="?", metavar="V2", help="default: the latest")
    changes.set_defaults(func=_diff)


def _read(args: argparse.Namespace) -> StreamHistory:
    from configbus.cli_bus import _kafka, _tenant_topic, _trust, run_async

    kafka, topics = _kafka(args)
    _tenant_topic(topics, args.tenant)
    trust = _trust(args)
    history = run_async(stream_history(KafkaBus(kafka), topics, args.tenant, args.env, trust))
    if not history.versions:
        raise UnknownNameError(
            f"{args.tenant}/{args.env} has no verified version in the audit topic "
            f"{topics.audit} (is the tenant, environment or --audit-topic right?)"
        )
    return history


def _unverified(history: StreamHistory) -> int:
    """Exit status: 1, and a line saying so, when records of the stream did not verify."""
    if not history.unverified:
        return 0
    print(
        f"configbus: {history.unverified} audit record(s) of {history.tenant}/{history.env} "
        "did not verify with the trust file and are not shown",
        file=sys.stderr,
    )
    return 1


def _history(args: argparse.Namespace, out: TextIO) -> int:
    if args.limit is not None and args.limit < 1:
        raise SettingsError(f"--limit {args.limit}: must be at least 1")
    history = _read(args)
    entries = history.versions[-args.limit :] if args.limit else history.versions
    if args.json:
        print(json.dumps([e.as_dict() for e in entries], indent=2), file=out)
        return _unverified(history)
    overrides = sum(1 for e in history.versions if e.channel == OVERRIDE_CHANNEL)
    staged = len(history.versions) - len(history.snapshots) - overrides
    count = f"{len(history.snapshots)} version(s)" + (
        f" and {overrides} override change(s)" if overrides else ""
    )
    count += f" and {staged} rollout record(s)" if staged else ""
    print(f"{history.tenant}/{history.env}: {count}", file=out)
    for entry in entries:
        who = shown(entry.actor or "?", 60, quote=False)
        why = shown(entry.reason or "-", 80, quote=False)
        number = {SNAPSHOT_CHANNEL: "v", OVERRIDE_CHANNEL: "o", CANDIDATE_CHANNEL: "c"}.get(
            entry.channel, ""
        )
        number = f"{number}{entry.version}" if number else "command"
        print(
            f"  {number:<6} {entry.issued:%Y-%m-%dT%H:%M:%S}Z  {entry.kind:<9} by {who}: {why}",
            file=out,
        )
        if entry.sources:
            print(f"         from {_listed(entry.sources)}", file=out)
        if entry.changed_paths:
            print(f"         changed {_listed(entry.changed_paths)}", file=out)
    return _unverified(history)


def _diff(args: argparse.Namespace, out: TextIO) -> int:
    history = _read(args)
    latest = history.latest
    assert latest is not None
    old = history.get(args.old)
    new = history.get(args.new) if args.new is not None else latest
    changes = diff(old, new)
    if args.json:
        document = {
            "tenant": history.tenant,
            "env": history.env,
            "from": old.version,
            "to": new.version,
            "changes": [c.as_dict() for c in changes],
        }
        print(json.dumps(document, indent=2), file=out)
        return _unverified(history)
    count = f"{len(changes)} change(s)" if changes else "no change"
    print(f"{history.tenant}/{history.env} v{old.version} -> v{new.version}: {count}", file=out)
    for change in changes:
        was = "(absent)" if change.added else _value(change.old)
        now = "(removed)" if change.removed else _value(change.new)
        print(f"  {shown(change.path, 200, quote=False)}: {was} -> {now}", file=out)
    return _unverified(history)


def _listed(items: tuple[str, ...], most: int = 5) -> str:
    text = ", ".join(shown(item, 200, quote=False) for item in items[:most])
    return text + (f" (+{len(items) - most} more)" if len(items) > most else "")


def _value(value: Any) -> str:
    return shown(json.dumps(value, ensure_ascii=False, sort_keys=True), VALUE_CHARS, quote=False)
