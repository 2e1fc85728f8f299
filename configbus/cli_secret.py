"""``configbus secret``: set, list, get, rotate, retire, re-key and re-wrap sealed secrets.

Values are read from stdin or ``--from-file``, never from the command line (which
other users see in ``ps`` and shells keep in their history), and never printed except
by ``secret get``, which writes an audit note first. Secrets are written to the tree
(``tenants/<tenant>/secrets/<env>.yml``, safe to commit) unless ``--redis URL`` says the
tenant store. TENANT ``-`` stands for every tenant of the tree that runs in ENV: an
environment-wide secret is sealed once per tenant, each with its own keys.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from configbus.errors import ConfigBusError, SettingsError, UnknownNameError
from configbus.limits import DEFAULT_LIMITS
from configbus.options import format_duration, parse_duration, pick
from configbus.tree import EnvironmentTree, default_root
from configbus.tree.sealed import SecretRecord
from configbus.tree.tree import TENANT_ID
from configbus.tree.values import SecretRef, secret_name_problem

if TYPE_CHECKING:  # imported when used: `configbus --help` does not load them
    from types import ModuleType

    from configbus.bus import Bus, TopicNames
    from configbus.crypto import KeyProvider, TrustStore
    from configbus.ops.secrets import SecretBook
    from configbus.store import TenantStore

    Connection = tuple[Bus, TopicNames, TrustStore]

__all__ = ["register"]

T = TypeVar("T")
ALL_TENANTS = "-"
MAX_VALUE_BYTES = 64 * 1024  # a certificate chain fits; a config file does not belong here
EXPIRY_WARNING_S = 30 * 86400  # `list` flags certificates expiring within this


def register(commands: Any, kafka: argparse.ArgumentParser) -> None:
    secret = commands.add_parser(
        "secret", help="sealed secrets: set, list, get, rotate (retired once the fleet has it)"
    )
    actions = secret.add_subparsers(dest="secret_command", required=True, metavar="ACTION")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument(
        "--root", metavar="DIR", help="the tree (default $CONFIGBUS_ROOT, then ./environments)"
    )
    where.add_argument(
        "--redis",
        metavar="URL",
        help="keep the secret in this Redis tenant store instead of the tree",
    )
    keys = argparse.ArgumentParser(add_help=False)
    keys.add_argument(
        "--keys",
        metavar="FILE",
        help="key-encryption keys (default $CONFIGBUS_SECRET_KEYS, then $CONFIGBUS_KEK_<TENANT>)",
    )
    who = argparse.ArgumentParser(add_help=False)
    who.add_argument("--actor", help="who (default: your login name)")
    who.add_argument("--reason", default="", help="why: a ticket, an incident")
    stream = argparse.ArgumentParser(add_help=False)
    stream.add_argument("tenant", metavar="TENANT", help="a tenant, or - for every tenant of ENV")
    stream.add_argument("env", metavar="ENV")
    named = argparse.ArgumentParser(add_help=False, parents=[stream])
    named.add_argument("name", metavar="NAME", help="the secret's name, as in !secret NAME")
    value = argparse.ArgumentParser(add_help=False)
    value.add_argument(
        "--from-file", metavar="FILE", help="read the value from FILE (default: stdin)"
    )
    value.add_argument(
        "--generate", type=int, metavar="BYTES", help="a random value of BYTES random bytes"
    )
    gate = argparse.ArgumentParser(add_help=False, parents=[kafka])
    gate.add_argument("--trust", metavar="FILE", help="trust file (default $CONFIGBUS_TRUST)")
    gate.add_argument(
        "--max-wait", default="10m", metavar="DURATION", help="how long to wait (10m)"
    )
    gate.add_argument(
        "--retire-command",
        metavar="CMD",
        help="run CMD (a shell command) once the old versions are retired; it gets "
        "CONFIGBUS_SECRET, CONFIGBUS_TENANTS, CONFIGBUS_ENV, CONFIGBUS_RETIRED_VERSIONS "
        "and CONFIGBUS_VERSION, never a value",
    )
    gate.add_argument(
        "--instance-ttl",
        default="24h",
        metavar="DURATION",
        help="an instance silent this long is gone, not waited for (24h)",
    )

    set_ = actions.add_parser(
        "set",
        parents=[named, where, keys, who, value],
        help="seal a value as the secret's next version (read from stdin or --from-file)",
    )
    set_.add_argument(
        "--rotate-every",
        metavar="DURATION",
        help="the daemon rotates it this often (needs --generate and --redis)",
    )
    set_.set_defaults(func=_set)

    rotate = actions.add_parser(
        "rotate",
        parents=[named, where, keys, who, value, gate],
        help="a new version; the old one stays valid until retired",
    )
    rotate.add_argument(
        "--retire-after-ack",
        action="store_true",
        help="retire the old versions once every live instance applied the new one",
    )
    rotate.set_defaults(func=_rotate)

    retire = actions.add_parser(
        "retire",
        parents=[named, where, who, gate],
        help="drop the old versions once every live instance runs the newest",
    )
    retire.add_argument(
        "--force", action="store_true", help="do not wait for the fleet (an instance may break)"
    )
    retire.set_defaults(func=_retire)

    list_ = actions.add_parser(
        "list", help="names, versions, rotation and certificate expiry; never values"
    )
    list_.add_argument("tenant", nargs="?", metavar="TENANT")
    list_.add_argument("env", nargs="?", metavar="ENV")
    list_.add_argument(
        "--root", metavar="DIR", help="the tree (default $CONFIGBUS_ROOT, then ./environments)"
    )
    list_.add_argument(
        "--redis", metavar="URL", help="also the tenant store (default $CONFIGBUS_REDIS_URL)"
    )
    list_.add_argument("--json", action="store_true", help="JSON instead of a table")
    list_.set_defaults(func=_list)

    get = actions.add_parser(
        "get",
        parents=[named, where, keys, who, kafka],
        help="print a secret's value (a signed audit note is written first)",
    )
    get.add_argument("--trust", metavar="FILE", help="trust file (default $CONFIGBUS_TRUST)")
    get.add_argument(
        "--key",
        metavar="FILE",
        help="your operator key, KID.key, which signs the audit note "
        "(default $CONFIGBUS_OPERATOR_KEY)",
    )
    get.add_argument("--kid", help="its key id (default: the file's name without .key)")
    get.add_argument("--version", type=int, metavar="N", help="an older live version")
    get.set_defaults(func=_get)

    keys_ = actions.add_parser(
        "keys", help="key-encryption keys: add one per tenant, export a service's"
    ).add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    add = keys_.add_parser(
        "add", help="a fresh KEK per tenant in a key file (created with mode 0600)"
    )
    add.add_argument("tenants", nargs="+", metavar="TENANT")
    add.add_argument("--keys", required=True, metavar="FILE", help="the key file")
    add.add_argument(
        "--current",
        action="store_true",
        help="make the new KEK current (then `secret rewrap` moves every data key to it)",
    )
    add.set_defaults(func=_keys_add)
    use = keys_.add_parser(
        "use", help="make a tenant's KEK current (then `secret rewrap` moves data keys to it)"
    )
    use.add_argument("tenant", metavar="TENANT")
    use.add_argument("kek_id", metavar="KEK")
    use.add_argument("--keys", required=True, metavar="FILE", help="the key file")
    use.set_defaults(func=_keys_use)
    export = keys_.add_parser(
        "export", help="a key file with one tenant's KEKs only, for its services"
    )
    export.add_argument("tenant", metavar="TENANT")
    export.add_argument("--keys", required=True, metavar="FILE", help="the operators' key file")
    export.add_argument("--out", required=True, metavar="FILE")
    export.set_defaults(func=_keys_export)

    for action, helptext, function in (
        ("rekey", "seal every secret of the stream again under a new data key", _rekey),
        ("rewrap", "wrap the stream's data key with the tenant's current KEK", _rewrap),
    ):
        parser = actions.add_parser(action, parents=[stream, where, keys, who], help=helptext)
        parser.set_defaults(func=function)


# -- set and rotate -----------------------------------------------------------------------
def _set(args: argparse.Namespace, out: TextIO) -> int:
    rotate_every = _duration(args.rotate_every, "--rotate-every") if args.rotate_every else None
    if rotate_every and not args.redis:
        raise UnknownNameError(
            "--rotate-every needs --redis: the daemon rotates secrets kept in the tenant "
            "store, which every daemon sees alike (not in its own checkout of the tree)"
        )
    streams = _streams(args)
    name = _name(args.name)
    values = _values(args, None, streams)

    async def apply() -> int:
        async with _book(args) as book:
            provider = _provider(args)
            for tenant, env in streams:
                record = await _secrets().set_secret(
                    book,
                    provider,
                    tenant,
                    env,
                    name,
                    values[(tenant, env)],
                    actor=_actor(args),
                    reason=args.reason or f"secret {name} set",
                    rotate_every=rotate_every,
                    generate=args.generate,
                )
                _said_sealed(out, tenant, env, record, book.where)
        return 0

    return _run(apply())


def _rotate(args: argparse.Namespace, out: TextIO) -> int:
    streams = _streams(args)
    name = _name(args.name)
    max_wait = _duration(args.max_wait, "--max-wait")
    ttl = _duration(args.instance_ttl, "--instance-ttl")
    if args.retire_command and not args.retire_after_ack:
        raise UnknownNameError("--retire-command runs after a retirement: add --retire-after-ack")
    connection = _connection(args) if args.retire_after_ack else None

    async def apply() -> int:
        secrets = _secrets()
        async with _book(args) as book:
            provider = _provider(args)
            known = {s: (await book.read(*s)).get(name) for s in streams}
            missing = [f"{t}/{e}" for (t, e), record in known.items() if record is None]
            if missing:
                raise UnknownNameError(
                    f"no secret {name!r} in {', '.join(missing)} ({book.where}): "
                    "`configbus secret set` makes one"
                )
            generate = args.generate or next(
                (r.generate for r in known.values() if r is not None and r.generate), None
            )
            values = _values(args, generate, streams)
            versions, old = {}, {}
            for tenant, env in streams:
                record = await secrets.set_secret(
                    book,
                    provider,
                    tenant,
                    env,
                    name,
                    values[(tenant, env)],
                    actor=_actor(args),
                    reason=args.reason or f"secret {name} rotated",
                )
                versions[(tenant, env)] = record.version
                old[(tenant, env)] = record.live_versions[1:]
                _said_sealed(out, tenant, env, record, book.where)
            if connection is None:
                return 0
            return await _retire_when_ready(
                args, out, book, connection, versions, old, name, max_wait, ttl
            )

    return _run(apply())


def _retire(args: argparse.Namespace, out: TextIO) -> int:
    streams = _streams(args)
    name = _name(args.name)
    max_wait = _duration(args.max_wait, "--max-wait")
    ttl = _duration(args.instance_ttl, "--instance-ttl")
    connection = None if args.force else _connection(args)

    async def apply() -> int:
        async with _book(args) as book:
            versions, old = {}, {}
            for stream in streams:
                record = (await book.read(*stream)).get(name)
                if record is None:
                    raise UnknownNameError(f"no secret {name!r} in {stream[0]}/{stream[1]}")
                versions[stream], old[stream] = record.version, record.live_versions[1:]
            if connection is None:
                return await _retire_now(args, out, book, versions, old, name)
            return await _retire_when_ready(
                args, out, book, connection, versions, old, name, max_wait, ttl
            )

    return _run(apply())


async def _retire_when_ready(
    args: argparse.Namespace,
    out: TextIO,
    book: SecretBook,
    connection: Connection,
    versions: dict[tuple[str, str], int],
    old: dict[tuple[str, str], tuple[int, ...]],
    name: str,
    max_wait: int,
    ttl: int,
) -> int:
    """Wait until every live instance of the streams that use the secret applied a
    config carrying the new version, then retire the old ones and run the command;
    after `max_wait`, retire nothing and name the instances that did not answer."""
    bus, topics, trust = connection
    version = min(versions.values())
    print(
        f"waiting up to {format_duration(max_wait)} for every live instance to apply "
        f"{name} v{version} ...",
        file=out,
        flush=True,
    )
    check = await _secrets().wait_for_fleet(
        bus, topics, trust, versions, name, version, max_wait=max_wait, instance_ttl=ttl
    )
    if not check.ready:
        print(
            f"not retired: after {format_duration(max_wait)}, {len(check.holdouts)} "
            f"instance(s) or stream(s) do not run {name} v{version}:",
            file=sys.stderr,
        )
        for holdout in check.holdouts[:50]:
            print(f"  {holdout}", file=sys.stderr)
        if len(check.holdouts) > 50:
            print(f"  (+{len(check.holdouts) - 50} more)", file=sys.stderr)
        print("the old versions stay valid; retry with `configbus secret retire`", file=sys.stderr)
        return 1
    print(
        f"{check.instances} live instance(s) of {len(check.targets)} stream(s) run "
        f"{name} v{version}",
        file=out,
    )
    return await _retire_now(args, out, book, versions, old, name)


async def _retire_now(
    args: argparse.Namespace,
    out: TextIO,
    book: SecretBook,
    versions: dict[tuple[str, str], int],
    old: dict[tuple[str, str], tuple[int, ...]],
    name: str,
) -> int:
    """Retire each stream's versions older than the one the fleet was checked for, then
    run the retire command once per stream that had older versions (also when the
    daemon retired them meanwhile: the command is what revokes them)."""
    for (tenant, env), version in sorted(versions.items()):
        dropped = await _secrets().retire(
            book,
            tenant,
            env,
            name,
            through=version,
            actor=_actor(args),
            reason=args.reason or f"secret {name}: old versions retired",
        )
        shown = ", ".join(f"v{v}" for v in dropped) or "nothing (no older version live)"
        print(f"{tenant}/{env} {name}: retired {shown}", file=out)
    command = getattr(args, "retire_command", None)
    failed = 0
    for (tenant, env), retired in sorted(old.items()):
        if not command or not retired:
            continue
        variables = {k: v for k, v in os.environ.items() if not k.startswith("CONFIGBUS_")}
        variables.update(  # names and numbers only: never a value, never a key
            CONFIGBUS_SECRET=name,
            CONFIGBUS_TENANT=tenant,
            CONFIGBUS_ENV=env,
            CONFIGBUS_RETIRED_VERSIONS=",".join(str(v) for v in sorted(retired)),
            CONFIGBUS_VERSION=str(versions[(tenant, env)]),
        )
        process = await asyncio.create_subprocess_shell(command, env=variables)
        code = await process.wait()
        if code != 0:
            failed += 1
            print(f"{tenant}/{env}: the retire command failed (exit {code})", file=sys.stderr)
        else:
            print(f"{tenant}/{env}: retire command done", file=out)
    return 1 if failed else 0


def _said_sealed(out: TextIO, tenant: str, env: str, record: SecretRecord, where: str) -> None:
    older = record.live_versions[1:]
    shown = ", ".join(f"v{v}" for v in older)
    still = (
        f"; {shown} {'stays' if len(older) == 1 else 'stay'} valid until retired" if older else ""
    )
    expiry = f"; certificate expires {_iso(record.not_after)}" if record.not_after else ""
    print(
        f"{tenant}/{env} {record.name}: sealed v{record.version} in {where}{still}{expiry}",
        file=out,
    )


# -- list and get ------------------------------------------------------------------------
def _list(args: argparse.Namespace, out: TextIO) -> int:
    tree = _tree(args.root)
    url = pick(args.redis, "CONFIGBUS_REDIS_URL", "", str)
    if args.env is not None:
        args.env = tree.environment(args.env)
    if args.tenant not in (None, ALL_TENANTS):
        tree.tenant(args.tenant)  # an unknown tenant is a usage error, not "no secrets"
    wanted = [
        (t, e)
        for t, e in tree.streams()
        if (args.tenant in (None, ALL_TENANTS, t)) and args.env in (None, e)
    ]

    async def read() -> list[tuple[str, str, str, SecretRecord]]:
        from configbus.ops.secrets import StoreBook, TreeBook

        rows = []
        tree_book = TreeBook(tree.root)
        for tenant, env in wanted:
            for record in (await tree_book.read(tenant, env)).values():
                rows.append((tenant, env, "tree", record))
        if url:
            from configbus.store import TenantStore

            async with TenantStore(url) as store:
                book = StoreBook(store)
                for tenant, env in wanted:
                    for record in (await book.read(tenant, env)).values():
                        rows.append((tenant, env, "redis", record))
        return sorted(rows, key=lambda row: (row[0], row[1], row[3].name, row[2]))

    rows = _run(read())
    now = time.time_ns()
    have = {(t, e, record.name) for t, e, _, record in rows}
    unset = {
        f"{t}/{e}": names
        for t, e in wanted
        if (names := sorted(n for n in _referenced(tree, t, e) if (t, e, n) not in have))
    }
    if args.json:
        listed = [
            {
                "tenant": tenant,
                "env": env,
                "store": store,
                "name": record.name,
                "version": record.version,
                "live_versions": list(record.live_versions),
                "created": _iso(record.created) if record.created else None,
                "rotated": _iso(record.rotated) if record.rotated else None,
                "rotate_every": format_duration(record.rotate_every)
                if record.rotate_every
                else None,
                "not_after": _iso(record.not_after) if record.not_after else None,
                "kek_ids": sorted({text.split(".")[2] for text in record.versions}),
                "expires_soon": bool(record.not_after)
                and record.not_after - now < EXPIRY_WARNING_S * 1e9,
            }
            for tenant, env, store, record in rows
        ]
        json.dump({"secrets": listed, "without_value": unset}, out, indent=2)
        out.write("\n")
        return 0
    if not rows:
        print("no sealed secrets", file=out)
        _said_unset(out, unset)
        return 0
    print(
        f"{'STREAM':<26} {'NAME':<44} {'VER':>4} {'LIVE':<8} {'STORE':<6} "
        f"{'CREATED':<21} {'ROTATED':<21} {'EVERY':<6} EXPIRES",
        file=out,
    )
    warnings = 0
    for tenant, env, store, record in rows:
        live = ",".join(str(v) for v in record.live_versions)
        expires = ""
        if record.not_after:
            left = (record.not_after - now) / 1e9
            expires = _iso(record.not_after)
            if left < 0:
                expires += "  EXPIRED"
                warnings += 1
            elif left < EXPIRY_WARNING_S:
                expires += f"  WARNING: in {format_duration(left)}"
                warnings += 1
        every = format_duration(record.rotate_every) if record.rotate_every else "-"
        rotated = _iso(record.rotated) if record.rotated else "-"
        created = _iso(record.created) if record.created else "-"
        print(
            f"{tenant + '/' + env:<26} {record.name:<44} {record.version:>4} {live:<8} "
            f"{store:<6} {created:<21} {rotated:<21} {every:<6} {expires}".rstrip(),
            file=out,
        )
    _said_unset(out, unset)
    if warnings:
        print(f"{warnings} certificate(s) expired or expiring within 30d", file=sys.stderr)
    return 0


def _referenced(tree: EnvironmentTree, tenant: str, env: str) -> set[str]:
    """The secret names the stream's config (files alone) references; none when it
    does not resolve (`validate` says why)."""
    try:
        config = tree.resolve(env, tenant)
    except ConfigBusError:
        return set()
    names: set[str] = set()

    def visit(value: object) -> None:
        if isinstance(value, SecretRef):
            names.add(value.name)
        elif isinstance(value, dict):
            for child in value.values():
                visit(child)
        elif isinstance(value, tuple):
            for child in value:
                visit(child)

    visit(config.data)
    return names


def _said_unset(out: TextIO, unset: dict[str, list[str]]) -> None:
    if not unset:
        return
    print("\nreferenced without a value (reading one raises SecretError):", file=out)
    for stream, names in unset.items():
        print(f"  {stream}: {', '.join(names)}", file=out)


def _get(args: argparse.Namespace, out: TextIO) -> int:
    if args.tenant == ALL_TENANTS:
        raise UnknownNameError("secret get reads one stream's secret: name the tenant")
    ((tenant, env),) = _streams(args)
    name = _name(args.name)
    if not args.reason.strip():
        raise UnknownNameError("--reason: say why you read it (it goes to the audit trail)")

    async def read() -> bytes:
        from configbus.cli_override import operator_signer
        from configbus.crypto.secrets import SecretReader

        async with _book(args) as book:
            record = (await book.read(tenant, env)).get(name)
        if record is None:
            raise UnknownNameError(f"{tenant}/{env} has no secret {name!r}")
        reader = SecretReader(_provider(args), tenant, env)
        value = reader.open(name, record.versions, args.version)
        bus, topics, trust, key = operator_signer(args)
        await _secrets().audit_read(
            bus,
            topics,
            tenant,
            env,
            name,
            args.version or record.version,
            actor=_actor(args),
            reason=args.reason,
            key=key,
            trust=trust,
        )
        return value

    value = _run(read())
    stream = getattr(out, "buffer", None)
    if stream is not None:
        stream.write(value)
        stream.flush()
    else:
        out.write(value.decode("utf-8", errors="replace"))
    return 0


# -- key-encryption keys -----------------------------------------------------------------
def _keys_add(args: argparse.Namespace, out: TextIO) -> int:
    from configbus.crypto import LocalKeyProvider

    path = Path(args.keys)
    bad = [t for t in args.tenants if not TENANT_ID.fullmatch(t)]
    if bad:
        raise UnknownNameError(f"{bad[0]!r} is not a tenant id")
    if len(set(args.tenants)) != len(args.tenants):
        raise UnknownNameError("name each tenant once")
    provider = LocalKeyProvider.from_file(path) if path.exists() else LocalKeyProvider({})
    said = []
    for tenant in args.tenants:
        provider, kek_id = provider.with_new_key(tenant, current=args.current)
        state = "current" if provider.kek_ids(tenant)[0] == kek_id else "not current yet"
        said.append(f"{tenant}: new key-encryption key {kek_id} ({state})")
    provider.save(path)  # said only once written
    print("\n".join([*said, f"wrote {path} (mode 0600)"]), file=out)
    return 0


def _keys_use(args: argparse.Namespace, out: TextIO) -> int:
    from configbus.crypto import LocalKeyProvider

    LocalKeyProvider.from_file(args.keys).using(args.tenant, args.kek_id).save(args.keys)
    print(f"{args.tenant}: {args.kek_id} is the current key-encryption key", file=out)
    return 0


def _keys_export(args: argparse.Namespace, out: TextIO) -> int:
    from configbus.crypto import LocalKeyProvider

    LocalKeyProvider.from_file(args.keys).only([args.tenant]).save(args.out)
    print(f"wrote {args.out} (mode 0600): the key-encryption keys of {args.tenant}", file=out)
    return 0


# -- rekey and rewrap ---------------------------------------------------------------------
def _rekey(args: argparse.Namespace, out: TextIO) -> int:
    return _reseal(args, out, "rekey")


def _rewrap(args: argparse.Namespace, out: TextIO) -> int:
    return _reseal(args, out, "rewrap")


def _reseal(args: argparse.Namespace, out: TextIO, action: str) -> int:
    streams = _streams(args)

    async def apply() -> int:
        secrets = _secrets()
        function = secrets.rekey if action == "rekey" else secrets.rewrap_all
        async with _book(args) as book:
            provider = _provider(args)
            for tenant, env in streams:
                count = await function(
                    book,
                    provider,
                    tenant,
                    env,
                    actor=_actor(args),
                    reason=args.reason or f"secrets {action}",
                )
                done = "sealed again under a new data key" if action == "rekey" else "re-wrapped"
                print(f"{tenant}/{env}: {count} value(s) {done}", file=out)
        return 0

    return _run(apply())


# -- plumbing ----------------------------------------------------------------------------
def _secrets() -> ModuleType:
    from configbus.ops import secrets

    return secrets


def _tree(root: str | None) -> EnvironmentTree:
    path = default_root(root)
    if not path.is_dir():
        raise UnknownNameError(f"{path}: no such directory (give --root or set CONFIGBUS_ROOT)")
    return EnvironmentTree(path)


def _streams(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The streams TENANT ENV names: one, or with TENANT ``-`` every tenant in ENV."""
    tree = _tree(args.root)
    env = tree.environment(args.env)
    if args.tenant == ALL_TENANTS:
        streams = [(t, e) for t, e in tree.streams() if e == env]
        if not streams:
            raise UnknownNameError(f"no tenant runs in environment {env!r}")
        return streams
    spec = tree.tenant(args.tenant)
    if env not in spec.environments:
        raise UnknownNameError(f"tenant {args.tenant!r} does not run in environment {env!r}")
    return [(args.tenant, env)]


def _name(name: str) -> str:
    problem = secret_name_problem(name)
    if problem is not None:
        raise UnknownNameError(f"secret {problem}")
    return name


def _values(
    args: argparse.Namespace, generate: int | None, streams: list[tuple[str, str]]
) -> dict[tuple[str, str], bytes]:
    """The value of each stream: generated values differ per stream (one tenant's
    service never holds another's), a given value is the same for all."""
    if args.generate or (generate and not args.from_file):
        return {stream: _value(args, generate) for stream in streams}
    value = _value(args, generate)
    return dict.fromkeys(streams, value)


def _value(args: argparse.Namespace, generate: int | None) -> bytes:
    """The value: generated, from --from-file, or from stdin (a prompt on a terminal).
    A single trailing newline of stdin is dropped (``echo`` adds one)."""
    chosen = [bool(args.generate), bool(args.from_file)]
    if sum(chosen) > 1:
        raise UnknownNameError("give one of --generate and --from-file")
    if args.generate or (generate and not args.from_file):
        return _secrets().generate_value(args.generate or generate)  # type: ignore[no-any-return]
    if args.from_file:
        try:
            with open(args.from_file, "rb") as handle:
                value = handle.read(MAX_VALUE_BYTES + 1)
        except OSError as exc:
            raise UnknownNameError(f"{args.from_file}: {exc.strerror}") from None
    elif sys.stdin.isatty():
        value = getpass.getpass("value (not echoed): ").encode()
    else:
        value = sys.stdin.buffer.read(MAX_VALUE_BYTES + 1)
        value = value.removesuffix(b"\n").removesuffix(b"\r")
    if len(value) > MAX_VALUE_BYTES:
        raise UnknownNameError(f"the value is over {MAX_VALUE_BYTES} bytes")
    if not value:
        raise UnknownNameError("the value is empty (give it on stdin, or --from-file)")
    return value


def _provider(args: argparse.Namespace) -> KeyProvider:
    from configbus.crypto import LocalKeyProvider

    path = pick(args.keys, "CONFIGBUS_SECRET_KEYS", "", str)
    if path:
        return LocalKeyProvider.from_file(path)
    provider = LocalKeyProvider.from_env()
    if not provider.tenants:
        raise SettingsError(
            "no key-encryption keys: give --keys FILE, or set CONFIGBUS_SECRET_KEYS or "
            "CONFIGBUS_KEK_<TENANT>"
        )
    return provider


class _Book:
    """The book `--redis` names (the tenant store), else the tree's; an async context
    that connects and closes the store."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.root = default_root(args.root)
        self.url = args.redis
        self.store: TenantStore | None = None

    async def __aenter__(self) -> SecretBook:
        from configbus.ops.secrets import StoreBook, TreeBook

        if not self.url:
            return TreeBook(self.root)
        from configbus.store import TenantStore

        self.store = await TenantStore(self.url).start()
        return StoreBook(self.store)

    async def __aexit__(self, *exc_info: object) -> None:
        if self.store is not None:
            await self.store.stop()


def _book(args: argparse.Namespace) -> _Book:
    return _Book(args)


def _connection(args: argparse.Namespace) -> Connection:
    from configbus.bus import KafkaBus
    from configbus.cli_bus import _kafka, _trust

    kafka, topics = _kafka(args)
    return KafkaBus(kafka), topics, _trust(args)


def _actor(args: argparse.Namespace) -> str:
    actor = args.actor or _login()
    for text, flag in ((actor, "--actor"), (args.reason, "--reason")):
        if len(text) > DEFAULT_LIMITS.text_chars:
            raise UnknownNameError(f"{flag}: at most {DEFAULT_LIMITS.text_chars} characters")
    return str(actor)


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "operator"


def _duration(text: str, flag: str) -> int:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise UnknownNameError(f"{flag}: {exc}") from None
    return seconds


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    from configbus.cli_bus import run_async

    return run_async(coroutine)
