"""The `configbus keys` commands: signing keys and the trust file's entries.

    keys generate   a new key pair, optionally trusted in a trust file
    keys rotate     a new publisher key, trusted beside the one it replaces
    keys retire     end a key's trust at a time of the operator's choosing (not_after)
    keys revoke     stop trusting a key now, with a reason (revoked: true)
    keys list       every key of a trust file, and whether it is in force now

Thin: the trust file's rules are `configbus.crypto.trust`'s. Commands that change a
trust file write it whole and at once (a temporary file renamed over it, mode 0644), so
a subscriber reloading it never reads half of it; public keys are then written inline.
A rotation is three steps with a roll-out between each (docs/operators.md):
`keys rotate`, switch the daemon to the new key (re-point the link its --signing-key
names and SIGHUP, for a daemon that takes its kid from the trust file; or a restart
with the new --signing-key and --kid), `keys retire`.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any, TextIO

from configbus.crypto import (
    OPERATOR,
    PUBLISHER,
    SigningKey,
    TrustedKey,
    TrustStore,
    check_kid,
    generate_keypair,
)
from configbus.crypto.trust import REASON_CHARS, format_time
from configbus.errors import KeyringError, UnknownNameError
from configbus.options import format_duration, parse_duration, pick

__all__ = ["register"]

SECOND = 10**9


def register(commands: Any) -> None:
    """Add `keys` and its actions to the `configbus` command's subparsers."""
    keys = commands.add_parser("keys", help="signing keys and the trust file").add_subparsers(
        dest="keys_command", required=True, metavar="ACTION"
    )
    generate = keys.add_parser(
        "generate", help="write a new Ed25519 key pair: DIR/KID.key (0600) and DIR/KID.pub"
    )
    generate.add_argument("--kid", required=True, help="key id: 1-64 of a-z 0-9 . _ -")
    generate.add_argument("--out", required=True, metavar="DIR", help="folder for the files")
    generate.add_argument(
        "--trust",
        metavar="FILE",
        help="also add the public key to this trust file (created when missing)",
    )
    generate.add_argument(
        "--role",
        choices=(PUBLISHER, OPERATOR),
        default=PUBLISHER,
        help="publisher (signs snapshots) or operator (signs emergency overrides only)",
    )
    generate.add_argument("--tenants", metavar="T1,T2", help="its scope in the trust file (*)")
    generate.add_argument("--environments", metavar="E1,E2", help="likewise (*)")
    generate.add_argument(
        "--max-ttl", metavar="DURATION", help="an operator key's longest override, e.g. 2h"
    )
    generate.set_defaults(func=_generate)

    trust = argparse.ArgumentParser(add_help=False)
    trust.add_argument("--trust", metavar="FILE", help="the trust file (default $CONFIGBUS_TRUST)")

    rotate = keys.add_parser(
        "rotate",
        parents=[trust],
        help="step 1 of a rotation: a new publisher key, trusted beside the one it replaces",
    )
    rotate.add_argument("--kid", required=True, help="the new key's id, e.g. publisher-2026-12")
    rotate.add_argument("--out", required=True, metavar="DIR", help="folder for the new key")
    rotate.add_argument(
        "--replaces",
        metavar="KID",
        help="the publisher key it replaces, whose scope it takes (default: the only "
        "publisher key in force)",
    )
    rotate.set_defaults(func=_rotate)

    retire = keys.add_parser(
        "retire",
        parents=[trust],
        help="trust a key only until a time: not_after = now + --after",
    )
    retire.add_argument("--kid", required=True, help="the key to retire")
    retire.add_argument(
        "--after",
        metavar="DURATION",
        default="0s",
        help="the grace before it stops being trusted, e.g. 1h (default: now)",
    )
    retire.set_defaults(func=_retire)

    revoke = keys.add_parser(
        "revoke", parents=[trust], help="stop trusting a key now (lost or stolen): revoked: true"
    )
    revoke.add_argument("--kid", required=True, help="the key to revoke")
    revoke.add_argument("--reason", required=True, help="why, for the trust file and the logs")
    revoke.set_defaults(func=_revoke)

    listing = keys.add_parser(
        "list", parents=[trust], help="the trust file's keys, and whether each is in force now"
    )
    listing.set_defaults(func=_list)


# -- generate ---------------------------------------------------------------------------
def _generate(args: argparse.Namespace, out: TextIO) -> int:
    _kid_argument(args.kid)
    max_ttl = _max_ttl(args)
    tenants, environments = _scope(args.tenants), _scope(args.environments)
    trust_path = Path(args.trust) if args.trust else None
    if args.role == OPERATOR and not (args.tenants and args.environments):
        raise UnknownNameError(
            "--role operator needs --tenants and --environments: the streams it may override"
        )
    if trust_path is None and (args.role != PUBLISHER or args.tenants or args.environments):
        raise UnknownNameError(
            "--role, --tenants and --environments go into a trust file: give --trust"
        )
    trust = TrustStore()
    if trust_path is not None and trust_path.exists():
        trust = TrustStore.load(trust_path)  # a broken trust file fails before any key is made
        if args.kid in trust:
            raise KeyringError(f"{trust_path}: already trusts a key with id {args.kid!r}")
    private, public = generate_keypair(args.kid, args.out)
    print(f"wrote {private} (private, mode 0600) and {public}", file=out)
    if trust_path is not None:
        signing = SigningKey.load(private, args.kid)
        entry = TrustedKey(signing.public, tenants, environments, args.role, max_ttl)
        trust.with_key(entry).save(trust_path)
        limit = f", max_ttl {format_duration(max_ttl)}" if max_ttl is not None else ""
        print(
            f"trusted {args.kid} in {trust_path} as {args.role} ({_shown_scope(entry)}{limit})",
            file=out,
        )
    return 0


def _max_ttl(args: argparse.Namespace) -> int | None:
    if args.role != OPERATOR:
        if args.max_ttl is not None:
            raise UnknownNameError("--max-ttl: for operator keys only (--role operator)")
        return None
    if args.max_ttl is None:
        raise UnknownNameError("--role operator needs --max-ttl: its longest override, e.g. 2h")
    try:
        seconds = parse_duration(args.max_ttl)
    except ValueError as exc:
        raise UnknownNameError(f"--max-ttl: {exc}") from None
    if seconds <= 0:
        raise UnknownNameError("--max-ttl: must be positive")
    return seconds


def _scope(text: str | None) -> frozenset[str]:
    names = frozenset(name.strip() for name in (text or "*").split(",") if name.strip())
    return names or frozenset({"*"})


# -- rotate, retire, revoke, list -------------------------------------------------------
def _rotate(args: argparse.Namespace, out: TextIO) -> int:
    """Generate the new key and trust it beside the old one, with the old one's scope.
    Nothing signs with it yet: the trust file goes out to every reader first."""
    _kid_argument(args.kid)
    path, trust = _trust_file(args)
    now = time.time_ns()
    old = _replaced(trust, path, args.replaces, now)
    if args.kid in trust:
        raise KeyringError(f"{path}: already trusts a key with id {args.kid!r}")
    private, public = generate_keypair(args.kid, args.out)
    signing = SigningKey.load(private, args.kid)
    entry = TrustedKey(signing.public, old.tenants, old.environments, PUBLISHER)
    trust.with_key(entry).save(path)
    print(f"wrote {private} (private, mode 0600) and {public}", file=out)
    print(
        f"trusted {args.kid} in {path} as publisher ({_shown_scope(entry)}), "
        f"beside {old.key.kid}, which it replaces",
        file=out,
    )
    print(
        "next:\n"
        f"  1. roll {path} out to every subscriber and agent (each reloads it within "
        "its trust_reload, 5 s by default)\n"
        f"  2. switch the daemon to {private}: re-point the link its --signing-key names "
        f"(ln -sfn {private} LINK) and send it SIGHUP, which works for a daemon run with "
        "--trust and without --kid (it takes the kid from the trust file); or restart it "
        f"with --signing-key {private} --kid {args.kid}. It publishes every stream again, "
        f"signed with {args.kid}\n"
        f"  3. retire the old key after a grace: configbus keys retire --kid {old.key.kid} "
        f"--trust {path} --after 1h",
        file=out,
    )
    return 0


def _replaced(trust: TrustStore, path: Path, kid: str | None, now: int) -> TrustedKey:
    """The publisher entry a rotation replaces: the one named, else the only one in
    force."""
    if kid is not None:
        entry = _entry(trust, path, kid)
        if entry.role != PUBLISHER:
            raise UnknownNameError(f"--replaces {kid}: an {entry.role} key, not a publisher key")
        return entry
    current = [e for e in trust.entries() if e.role == PUBLISHER and e.in_force(now)]
    if len(current) != 1:
        listed = ", ".join(e.key.kid for e in current) or "none"
        raise UnknownNameError(
            f"{path}: {len(current)} publisher keys in force ({listed}): name the one the new "
            "key replaces with --replaces"
        )
    return current[0]


def _retire(args: argparse.Namespace, out: TextIO) -> int:
    """`not_after` = now + --after (or earlier, when the entry says earlier already),
    refused when no other publisher key would be in force then."""
    path, trust = _trust_file(args)
    entry = _entry(trust, path, args.kid)
    try:
        grace = parse_duration(args.after)
    except ValueError as exc:
        raise UnknownNameError(f"--after: {exc}") from None
    now = time.time_ns()
    until = now + grace * SECOND
    if entry.revoked:
        raise KeyringError(f"{path}: {args.kid} is revoked already: nothing to retire")
    if entry.not_after is not None and entry.not_after <= until:
        print(f"{args.kid} is trusted until {format_time(entry.not_after)} already", file=out)
        return 0
    if entry.not_before is not None and entry.not_before >= until:
        raise KeyringError(
            f"{path}: {args.kid} is not valid before {format_time(entry.not_before)}: "
            "retire it later, or revoke it"
        )
    if entry.role == PUBLISHER:
        others = [
            e.key.kid
            for e in trust.entries()
            if e.role == PUBLISHER and e.key.kid != args.kid and e.in_force(until)
        ]
        if not others:
            raise KeyringError(
                f"{path}: retiring {args.kid} would leave no publisher key in force "
                "(rotate first: configbus keys rotate), or revoke it (configbus keys revoke)"
            )
    trust.replaced(_with(entry, not_after=until)).save(path)
    when = "now" if grace == 0 else f"in {format_duration(grace)}"
    print(
        f"retired {args.kid} in {path}: trusted until {format_time(until)} ({when}); "
        "readers refuse what it signs after that (key_expired)",
        file=out,
    )
    return 0


def _revoke(args: argparse.Namespace, out: TextIO) -> int:
    path, trust = _trust_file(args)
    entry = _entry(trust, path, args.kid)
    reason = " ".join(args.reason.split())  # one line
    if not reason or len(reason) > REASON_CHARS or not reason.isprintable():
        raise UnknownNameError(f"--reason: one line of text, at most {REASON_CHARS} characters")
    now = time.time_ns()
    revoked = _with(entry, revoked=True, revoked_at=now, revoked_reason=reason)
    trust = trust.replaced(revoked)
    trust.save(path)
    print(
        f"revoked {args.kid} in {path}: readers refuse what it signs (key_revoked) once "
        "they reload the file; instances running a config it signed keep it and report "
        "signer_trusted: false until the next valid event",
        file=out,
    )
    if entry.role == PUBLISHER and not any(
        e.role == PUBLISHER and e.in_force(now) for e in trust.entries()
    ):
        print(
            f"warning: {path} has no publisher key in force now: nothing the daemon "
            "publishes will be believed until a new key is trusted (configbus keys rotate)",
            file=out,
        )
    return 0


def _list(args: argparse.Namespace, out: TextIO) -> int:
    path, trust = _trust_file(args)
    now = time.time_ns()
    rows = []
    for entry in trust.entries():
        standing = entry.standing(now)
        state = standing[0] if standing else "in force"
        window = []
        if entry.not_before is not None:
            window.append(f"from {format_time(entry.not_before)}")
        if entry.not_after is not None:
            window.append(f"until {format_time(entry.not_after)}")
        if entry.revoked:
            window = [standing[1] if standing else "revoked"]
        rows.append((entry.key.kid, entry.role, _shown_scope(entry), state, " ".join(window)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)] if rows else []
    print(f"# {path}", file=out)
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[4]]).rstrip(), file=out)
    return 0


# -- helpers ------------------------------------------------------------------------------
def _kid_argument(kid: str) -> None:
    try:
        check_kid(kid)
    except KeyringError as exc:
        raise UnknownNameError(str(exc)) from None  # a bad argument: usage error


def _trust_file(args: argparse.Namespace) -> tuple[Path, TrustStore]:
    """The trust file of --trust, else of $CONFIGBUS_TRUST, loaded: it must exist."""
    found = pick(args.trust, "CONFIGBUS_TRUST", "", str)
    if not found:
        raise UnknownNameError("give --trust or set CONFIGBUS_TRUST")
    path = Path(found)
    return path, TrustStore.load(path)


def _entry(trust: TrustStore, path: Path, kid: str) -> TrustedKey:
    entry = trust.get(kid)
    if entry is None:
        raise UnknownNameError(f"{path} lists no key {kid!r} (it lists {', '.join(trust.kids)})")
    return entry


def _with(entry: TrustedKey, **changes: Any) -> TrustedKey:
    return dataclasses.replace(entry, **changes)


def _shown_scope(entry: TrustedKey) -> str:
    return (
        f"tenants {','.join(sorted(entry.tenants))}, "
        f"environments {','.join(sorted(entry.environments))}"
    )
