"""`configbus rollback` and `configbus rollback release`: publish an earlier version's
content again as a new version and keep it in force, or end that (configbus/ops/
rollback.py). Both publish as a one-shot writer that takes the role over from a running
daemon, which stands by until they are done."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from typing import Any, TextIO

from configbus.errors import SettingsError
from configbus.logs import configure

__all__ = ["register"]

USAGE = """\
configbus rollback TENANT ENV --to-version N --reason TEXT [--actor NAME] [--force] [options]
       configbus rollback release TENANT ENV [--reason TEXT] [--actor NAME] [options]"""


def register(commands: Any, publisher: argparse.ArgumentParser) -> None:
    """`publisher`: the options `publish --once` takes (tree, Kafka, key, store)."""
    parser = commands.add_parser(
        "rollback",
        parents=[publisher],
        usage=USAGE,
        help="publish an earlier version's content again, as a new version, and keep it",
        description="Publish version N of a stream again as its next version (kind "
        "rollback), checked against today's schema. The daemon does not publish the tree "
        "over it until the stream changes in the tree or store, or until `configbus "
        "rollback release TENANT ENV` publishes the tree's state.",
    )
    parser.add_argument("words", nargs="+", metavar="[release] TENANT ENV")
    parser.add_argument("--to-version", type=int, metavar="N", help="the version to go back to")
    parser.add_argument("--reason", help="why (for the audit trail; required for a rollback)")
    parser.add_argument("--actor", metavar="NAME", help="who (default: $USER, else the login)")
    parser.add_argument(
        "--force", action="store_true", help="roll back even when it fails today's schema"
    )
    parser.add_argument(
        "--deadline", type=float, default=120.0, metavar="SECONDS", help="give up after (120)"
    )
    parser.set_defaults(func=_rollback)


def _rollback(args: argparse.Namespace, out: TextIO) -> int:
    from configbus.cli_bus import _settings, run_async
    from configbus.ops.rollback import release, rollback

    releasing = args.words[0] == "release" and len(args.words) == 3
    if len(args.words) != (3 if releasing else 2):
        raise SettingsError(f"give TENANT ENV, or release TENANT ENV (usage: {_first(USAGE)})")
    tenant, env = args.words[-2:]
    if releasing and (args.to_version is not None or args.force):
        raise SettingsError("rollback release takes no --to-version or --force")
    if not releasing and args.to_version is None:
        raise SettingsError("give --to-version N: the version whose content to publish again")
    if not releasing and not (args.reason or "").strip():
        raise SettingsError("give --reason: why roll back (it goes to the audit trail)")
    if args.deadline <= 0:
        raise SettingsError(f"--deadline {args.deadline:g}: must be positive")
    settings = _settings(args)
    configure(json_lines=False, level="WARNING" if args.log_level == "INFO" else args.log_level)
    actor = args.actor or _login()
    try:
        if releasing:
            released = run_async(
                release(
                    settings,
                    tenant,
                    env,
                    reason=args.reason or "rollback released",
                    actor=actor,
                    deadline=args.deadline,
                )
            )
            print(released.summary(), file=out)
            return 0
        report = run_async(
            rollback(
                settings,
                tenant,
                env,
                to_version=args.to_version,
                reason=args.reason,
                actor=actor,
                force=args.force,
                deadline=args.deadline,
            )
        )
    except TimeoutError:
        command = "rollback release" if releasing else "rollback"
        print(f"configbus: {command}: not done within {args.deadline:g}s", file=sys.stderr)
        return 1
    for problem in report.problems:
        print(f"configbus: published despite today's schema (--force): {problem}", file=sys.stderr)
    print(report.summary(), file=out)
    if report.version and report.held:
        print(
            f"held: the tree is not published over it until {tenant}/{env} changes in the "
            f"tree or store, or `configbus rollback release {tenant} {env}`",
            file=out,
        )
    elif report.version:
        print(
            f"not held: {tenant}/{env} does not resolve from the tree now; it is published "
            "again once it does",
            file=out,
        )
    return 0


def _login() -> str:
    """$USER, else the login name; "unknown" when neither can be found."""
    try:
        return os.environ.get("USER") or getpass.getuser()
    except (OSError, KeyError):  # no name for this uid
        return "unknown"


def _first(usage: str) -> str:
    return usage.splitlines()[0].strip()
