"""`configbus override set|list|clear`: emergency overrides, signed with an operator key
and written straight to Kafka, so they work while the publisher daemon is down
(configbus/ops/overrides.py; the operator's page is docs/operators.md).

    configbus override set acme prod features.checkout=false --ttl 30m --reason INC-4711
    configbus override list acme
    configbus override clear acme prod features.checkout --reason "fixed in v2.3.1"
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TextIO, TypeVar

import msgspec
import yaml

from configbus.bus import OVERRIDE_CHANNEL, Bus, KafkaBus, KafkaSettings, TopicNames
from configbus.crypto import SigningKey, TrustStore
from configbus.errors import Problem, SettingsError, TreeError, UnknownNameError
from configbus.events import Ack, Cause, shown
from configbus.limits import DEFAULT_LIMITS
from configbus.ops.overrides import (
    OverrideEntry,
    OverrideState,
    all_overrides,
    compose,
    latest_snapshot,
    layers_of,
    read_overrides,
    write_overrides,
)
from configbus.ops.rollout import has_stopped
from configbus.options import format_duration, parse_duration, pick
from configbus.tree import EnvironmentTree, default_root
from configbus.tree.layer import Layer
from configbus.tree.resolved import ResolvedConfig, parse_key
from configbus.tree.values import SECRET_KEY

__all__ = ["operator_signer", "override_layers", "register"]

T = TypeVar("T")
_ack_decoder = msgspec.msgpack.Decoder(Ack)


def register(commands: Any, kafka: argparse.ArgumentParser) -> None:
    override = commands.add_parser(
        "override", help="emergency overrides: signed, expiring, work with the daemon down"
    )
    actions = override.add_subparsers(dest="override_command", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False, parents=[kafka])
    common.add_argument("--trust", metavar="FILE", help="trust file (default $CONFIGBUS_TRUST)")
    signer = argparse.ArgumentParser(add_help=False, parents=[common])
    signer.add_argument("tenant", metavar="TENANT")
    signer.add_argument("env", metavar="ENV")
    signer.add_argument(
        "--key",
        metavar="FILE",
        help="your operator key, KID.key (default $CONFIGBUS_OPERATOR_KEY)",
    )
    signer.add_argument("--kid", help="its key id (default: the file's name without .key)")
    signer.add_argument("--reason", required=True, help="why: an incident, a ticket")
    signer.add_argument("--actor", help="who (default: the key id)")
    signer.add_argument(
        "--wait",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="wait this long for the stream's instances to apply it (10; 0: do not wait)",
    )

    set_ = actions.add_parser(
        "set", parents=[signer], help="override keys of one stream until a TTL runs out"
    )
    set_.add_argument("assignments", nargs="+", metavar="KEY=VALUE", help="values as YAML")
    set_.add_argument("--ttl", required=True, help="how long: 90s, 30m, 2h (at most max_ttl)")
    set_.add_argument(
        "--root", metavar="DIR", help="the tree, for its schema (default $CONFIGBUS_ROOT)"
    )
    set_.add_argument(
        "--no-check", action="store_true", help="skip the schema check (no tree at hand)"
    )
    set_.set_defaults(func=_set)

    clear = actions.add_parser(
        "clear", parents=[signer], help="end overrides of a stream now: the KEYs, or --all"
    )
    clear.add_argument("keys", nargs="*", metavar="KEY")
    clear.add_argument(
        "--all", action="store_true", help="every override of the stream, whoever set it"
    )
    clear.set_defaults(func=_clear)

    list_ = actions.add_parser(
        "list", parents=[common], help="the overrides in effect, who set them, until when"
    )
    list_.add_argument("tenant", nargs="?", metavar="TENANT")
    list_.add_argument("env", nargs="?", metavar="ENV")
    list_.add_argument("--json", action="store_true", help="JSON instead of a table")
    list_.set_defaults(func=_list)


# -- set and clear ----------------------------------------------------------------------
def _set(args: argparse.Namespace, out: TextIO) -> int:
    ttl = _ttl(args.ttl)
    values = dict(_assignment(text) for text in args.assignments)
    tree = None if args.no_check else _tree(args.root)
    bus, topics, trust, key = operator_signer(args)
    actor = _actor(args, key)

    def change(kept: tuple[OverrideEntry, ...], now: int) -> tuple[OverrideEntry, ...]:
        entries = {entry.path: entry for entry in kept}
        for path, value in values.items():
            entries[path] = OverrideEntry(
                path=path,
                value=value,
                set_at=now,
                expires_at=now + ttl * 10**9,
                actor=actor,
                reason=args.reason,
            )
        return tuple(entries.values())

    async def apply() -> int:
        if tree is not None:
            await _check_schema(bus, topics, trust, tree, args.tenant, args.env, values)
        cause = Cause(sources=("override set",), actor=actor, reason=args.reason)
        written = await write_overrides(
            bus, topics, args.tenant, args.env, key=key, trust=trust, change=change, cause=cause
        )
        until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=ttl)
        for path, value in values.items():
            print(
                f"override {args.tenant}/{args.env} {path} = {json.dumps(value)} "
                f"until {until:%Y-%m-%d %H:%M:%S}Z ({format_duration(ttl)})",
                file=out,
            )
        return await _report(bus, topics, args, written.version, written.expired, out)

    return _run(apply())


def _clear(args: argparse.Namespace, out: TextIO) -> int:
    if bool(args.keys) == args.all:
        raise UnknownNameError("name the KEYs to clear, or --all for every override")
    paths = [_path(key) for key in args.keys]
    bus, topics, trust, key = operator_signer(args)
    actor = _actor(args, key)
    missing: list[str] = []

    def change(kept: tuple[OverrideEntry, ...], now: int) -> tuple[OverrideEntry, ...]:
        present = {entry.path for entry in kept}
        missing[:] = [path for path in paths if path not in present]
        return tuple(entry for entry in kept if paths and entry.path not in paths)

    async def apply() -> int:
        cause = Cause(sources=("override clear",), actor=actor, reason=args.reason)
        written = await write_overrides(
            bus, topics, args.tenant, args.env, key=key, trust=trust, change=change, cause=cause
        )
        for path in missing:
            print(f"configbus: {path}: no override in effect", file=sys.stderr)
        if not written.version:
            print(f"{args.tenant}/{args.env}: no override in effect to clear", file=out)
            return 1 if missing else 0
        cleared = [p for p in written.changed if p not in {e.path for e in written.expired}]
        print(
            f"cleared {args.tenant}/{args.env}: {', '.join(cleared) or '(expired only)'}", file=out
        )
        code = await _report(bus, topics, args, written.version, written.expired, out)
        return 1 if missing else code

    return _run(apply())


def _ttl(text: str) -> int:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise UnknownNameError(f"--ttl: {exc}") from None
    if seconds <= 0:
        raise UnknownNameError("--ttl: must be positive")
    return seconds


def _path(key: str) -> str:
    path = parse_key(key)
    if not path or any(part == "" for part in path):
        raise UnknownNameError(f"{key!r}: give a dotted key, e.g. features.checkout")
    return key


def _assignment(text: str) -> tuple[str, Any]:
    """KEY=VALUE, the value typed as YAML 1.2 types scalars: ``true``, ``false``,
    ``null``, numbers; anything else is text (``no``, ``on``, ``0755`` and ``1:30`` stay
    as typed, where YAML 1.1 would turn them into false, true, 493 and 90), unless
    quoted or a flow list or mapping (``[a, b]``, ``{k: v}``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise UnknownNameError(f"{text!r}: expected KEY=VALUE")
    try:
        value = _typed(raw)
    except (yaml.YAMLError, ValueError):
        raise UnknownNameError(f"{key}: the value is not valid YAML") from None  # not echoed
    if not _json_like(value):
        raise UnknownNameError(f"{key}: the value must be plain data (YAML scalars, lists, maps)")
    return _path(key), value


def _typed(raw: str) -> Any:
    text = raw.strip()
    if text[:1] in ("[", "{", "'", '"'):
        return yaml.safe_load(text)  # a flow collection or a quoted string
    try:
        value = json.loads(text)  # true, false, null and numbers, as YAML 1.2's core schema
    except ValueError:
        return raw  # text, as typed
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("not a finite number")
    return value if value is None or isinstance(value, bool | int | float) else raw


def _json_like(value: Any) -> bool:
    if isinstance(value, dict):
        return SECRET_KEY not in value and all(
            isinstance(k, str) and _json_like(v) for k, v in value.items()
        )
    if isinstance(value, list):
        return all(_json_like(v) for v in value)
    return value is None or isinstance(value, bool | int | float | str)


def _tree(root: str | None) -> EnvironmentTree:
    folder = default_root(root)
    if not folder.is_dir():
        raise SettingsError(
            f"{folder}: no tree to check the values against its schema "
            "(give --root or set CONFIGBUS_ROOT, or pass --no-check)"
        )
    return EnvironmentTree(folder)


async def _check_schema(
    bus: Bus,
    topics: TopicNames,
    trust: TrustStore,
    tree: EnvironmentTree,
    tenant: str,
    env: str,
    values: dict[str, Any],
) -> None:
    """Refuse (nothing written) values that would break the schema on top of the
    stream's current snapshot and the overrides in effect."""
    snapshot = await latest_snapshot(bus, topics, tenant, env, trust)
    if snapshot is None:
        raise UnknownNameError(
            f"{tenant}/{env} has no published snapshot to override "
            "(is the tenant, environment or --topic-prefix right?)"
        )
    current = await read_overrides(bus, topics, tenant, env, trust)
    data = msgspec.json.decode(snapshot.config_json)
    now = time.time_ns()
    if current is not None:
        data = compose(data, current.active_values(now))
    data = compose(data, [(parse_key(path), value) for path, value in values.items()])
    problems = tree.problems(ResolvedConfig(data, env=env, tenant=tenant))
    if problems:
        where = f"{tenant}/{env} with the override (nothing written)"
        raise TreeError([Problem(where, None, p.key, p.message) for p in problems])


async def _report(
    bus: Bus,
    topics: TopicNames,
    args: argparse.Namespace,
    version: int,
    expired: tuple[OverrideEntry, ...],
    out: TextIO,
) -> int:
    """Say what was published, then wait up to --wait for the stream's instances to
    acknowledge it: 0 when instances applied it and none refused it, 1 on a refusal or
    when none applied it. Instances that did not answer are named: gone (an instance
    that stopped still counts as known here), or slow."""
    stream = f"{args.tenant}/{args.env}"
    if expired:
        gone = ", ".join(entry.path for entry in expired)
        print(f"(dropped expired override(s) of {gone})", file=out)
    print(f"published {stream} override v{version}", file=out, flush=True)
    if args.wait <= 0:
        return 0
    deadline = time.monotonic() + args.wait
    while True:
        known, answers = await _acks(bus, topics, args.tenant, args.env, version)
        done = known and known <= answers.keys()
        if done or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.1)
    applied = sorted(i for i, ack in answers.items() if ack.status == "applied")
    refused = sorted((i, ack) for i, ack in answers.items() if ack.status != "applied")
    silent = sorted(known - answers.keys())
    print(f"applied by {len(applied)} of {len(known)} instance(s) of {stream}", file=out)
    for instance, ack in refused:
        print(f"  refused by {shown(instance)}: {shown(ack.reason, 200)}", file=sys.stderr)
    if silent:
        names = ", ".join(shown(i) for i in silent[:10])
        more = f" (+{len(silent) - 10} more)" if len(silent) > 10 else ""
        print(
            f"  no answer within {args.wait:g}s from: {names}{more} (stopped, or slow)",
            file=sys.stderr,
        )
    return 1 if refused or (known and not applied) else 0


async def _acks(
    bus: Bus, topics: TopicNames, tenant: str, env: str, version: int
) -> tuple[set[str], dict[str, Ack]]:
    """The instances of the stream (any that ever acknowledged it) and their answers to
    override `version`."""
    prefix = f"{tenant}/{env}/".encode()
    known: set[str] = set()
    answers: dict[str, Ack] = {}
    last: dict[str, Ack] = {}
    stopped: dict[str, Ack] = {}
    async for record in bus.read_to_end([topics.acks]):
        if not (record.key or b"").startswith(prefix) or record.value is None:
            continue
        try:
            ack = _ack_decoder.decode(record.value)
        except msgspec.DecodeError:
            continue
        known.add(ack.instance)
        if ack.status == "stopped":
            stopped[ack.instance] = ack
        elif ack.instance not in last or _heard(ack) >= _heard(last[ack.instance]):
            last[ack.instance] = ack
        if ack.channel == OVERRIDE_CHANNEL and ack.version == version:
            answers[ack.instance] = ack
    known -= {i for i, stop in stopped.items() if has_stopped(stop, last.get(i))}
    return known, answers


def _heard(ack: Ack) -> int:
    return ack.received_at or ack.applied_at


# -- list -------------------------------------------------------------------------------
def _list(args: argparse.Namespace, out: TextIO) -> int:
    bus, topics, trust = _connection(args)

    async def read() -> tuple[dict[tuple[str, str], OverrideState], int]:
        if args.tenant is not None:
            tenants = [_tenant(topics, args.tenant)]
        else:
            admin = bus.admin()
            await admin.start()
            try:
                names = await admin.topics()
            finally:
                await admin.stop()
            tenants = sorted(t for n in names if (t := topics.tenant_of(n)) is not None)
        return await all_overrides(bus, topics, tenants, trust)

    found, unverified = _run(read())
    now = time.time_ns()
    rows = []
    for (tenant, env), state in sorted(found.items()):
        if args.env is not None and env != args.env:
            continue
        for entry in state.active(now):
            rows.append((tenant, env, state.version, entry))
    if args.json:
        document = [
            {
                "tenant": tenant,
                "env": env,
                "override_version": version,
                "key": entry.path,
                "value": entry.value,
                "actor": entry.actor,
                "reason": entry.reason,
                "set_at": _iso(entry.set_at),
                "expires_at": _iso(entry.expires_at),
            }
            for tenant, env, version, entry in rows
        ]
        print(json.dumps(document, indent=2), file=out)
    elif not rows:
        print("no override in effect", file=out)
    for tenant, env, version, entry in [] if args.json else rows:
        left = format_duration((entry.expires_at - now) / 1e9)
        print(
            f"{tenant}/{env} {entry.path} = {shown(json.dumps(entry.value), 80, quote=False)}"
            f"  until {entry.until:%Y-%m-%d %H:%M:%S}Z ({left} left)"
            f"  by {shown(entry.actor or '?', 60, quote=False)}:"
            f" {shown(entry.reason or '-', 80, quote=False)}  [v{version}]",
            file=out,
        )
    if unverified:
        print(
            f"configbus: {unverified} override record(s) did not verify with the trust file "
            "and are not shown",
            file=sys.stderr,
        )
        return 1
    return 0


def _iso(ns: int) -> str:
    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC).isoformat()


# -- for render and explain ---------------------------------------------------------------
def override_layers(
    bootstrap_servers: str | None, trust_file: str | None, tenant: str | None, env: str
) -> list[Layer]:
    """The overrides in effect for a stream as layers for `render`/`explain`, read from
    Kafka when it is configured (none otherwise: the tree and the store alone)."""
    servers = pick(bootstrap_servers, "CONFIGBUS_BOOTSTRAP_SERVERS", "", str)
    if tenant is None or not servers:
        return []
    trust_path = pick(trust_file, "CONFIGBUS_TRUST", "", str)
    if not trust_path:
        raise SettingsError("reading the overrides from Kafka needs --trust or CONFIGBUS_TRUST")
    bus = KafkaBus(KafkaSettings.build(servers, client_id="configbus-cli"))
    state = _run(read_overrides(bus, TopicNames.build(), tenant, env, TrustStore.load(trust_path)))
    if state is None:
        return []
    return layers_of(state, time.time_ns(), f"kafka:{tenant}/{env}/override")


# -- plumbing -----------------------------------------------------------------------------
def _connection(args: argparse.Namespace) -> tuple[Bus, TopicNames, TrustStore]:
    from configbus.cli_bus import _kafka, _trust

    kafka, topics = _kafka(args)
    return KafkaBus(kafka), topics, _trust(args)


def _tenant(topics: TopicNames, tenant: str) -> str:
    from configbus.cli_bus import _tenant_topic

    _tenant_topic(topics, tenant)
    return tenant


def operator_signer(args: argparse.Namespace) -> tuple[Bus, TopicNames, TrustStore, SigningKey]:
    """Kafka, the trust file and the operator's key (`--key`, `--kid`) from `args`,
    checked: the key is in the trust file and covers the stream (`args.tenant`,
    `args.env`), and its `max_ttl` allows `args.ttl` when there is one."""
    bus, topics, trust = _connection(args)
    _tenant(topics, args.tenant)
    path = pick(args.key, "CONFIGBUS_OPERATOR_KEY", "", str)
    if not path:
        raise SettingsError("give --key (your operator key) or set CONFIGBUS_OPERATOR_KEY")
    kid = args.kid or pick(None, "CONFIGBUS_OPERATOR_KID", "", str) or Path(path).stem
    key = SigningKey.load(path, kid)
    entry = trust.get(key.kid)
    if entry is None or entry.key != key.public:
        raise SettingsError(
            f"key {key.kid!r} is not in the trust file (or its public key differs): "
            "subscribers would refuse what it signs"
        )
    if not entry.covers(args.tenant, args.env):
        raise SettingsError(
            f"key {key.kid!r} may not override {args.tenant}/{args.env} (its trust entry "
            f"covers tenants {sorted(entry.tenants)}, environments {sorted(entry.environments)})"
        )
    ttl = getattr(args, "ttl", None)
    if ttl is not None and entry.max_ttl is not None and _ttl(ttl) > entry.max_ttl:
        raise SettingsError(
            f"--ttl {ttl} is longer than key {key.kid!r}'s max_ttl "
            f"({format_duration(entry.max_ttl)})"
        )
    return bus, topics, trust, key


def _actor(args: argparse.Namespace, key: SigningKey) -> str:
    actor = args.actor or key.kid
    if len(actor) > DEFAULT_LIMITS.text_chars or len(args.reason) > DEFAULT_LIMITS.text_chars:
        raise UnknownNameError(
            f"--actor and --reason: at most {DEFAULT_LIMITS.text_chars} characters"
        )
    if not args.reason.strip():
        raise UnknownNameError("--reason: say why (an incident or ticket), for the audit trail")
    return actor


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    from configbus.cli_bus import run_async

    return run_async(coroutine)
