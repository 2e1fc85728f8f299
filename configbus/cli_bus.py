"""The `configbus` commands that talk to Kafka and Redis: daemon, publish, tail, tenant.

Registered by `configbus.cli`; each handler parses nothing itself, builds settings
and calls the library.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import sys
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

import yaml

from configbus.bus import (
    CANDIDATE_CHANNEL,
    CHAIN_CHANNEL,
    OVERRIDE_CHANNEL,
    ROLLOUT_CHANNEL,
    Admin,
    KafkaBus,
    KafkaSettings,
    TopicNames,
    follow,
    read_to_end,
)
from configbus.bus.kafka import Record
from configbus.crypto import TrustStore
from configbus.errors import SettingsError, TreeError, UnknownNameError, VerificationError
from configbus.events import VerifiedEvent, open_envelope, shown
from configbus.logs import configure
from configbus.ops.overrides import parse_overrides
from configbus.options import pick
from configbus.telemetry import configure_from_env
from configbus.tree import EnvironmentTree, default_root
from configbus.tree.layer import Layer, LayerKind
from configbus.tree.resolved import parse_key
from configbus.tree.values import Path, Value, format_path, freeze, redacted, walk

if TYPE_CHECKING:  # imported where used: a command loads only what it needs
    from configbus.ops import RolloutReport
    from configbus.publisher import PublisherSettings
    from configbus.store import TenantStore

__all__ = ["register", "store_layers"]

T = TypeVar("T")

HTTP_HELP = (
    "serve /healthz, /readyz and /metrics on HOST:PORT (:PORT: every interface; default "
    "$CONFIGBUS_HTTP, else not served; docs/operations.md)"
)


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop when it is installed, unless Kafka is reached over TLS
    (`security.uvloop_ok`)."""
    from configbus.bus.security import uvloop_ok

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.run(coroutine)
    if not uvloop_ok():
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def kafka_options() -> argparse.ArgumentParser:
    """The options naming the Kafka cluster and topics, as a parent parser."""
    kafka = argparse.ArgumentParser(add_help=False)
    kafka.add_argument(
        "--bootstrap-servers", metavar="HOSTS", help="Kafka (default $CONFIGBUS_BOOTSTRAP_SERVERS)"
    )
    kafka.add_argument(
        "--topic-prefix", metavar="P", help="tenant topic prefix (default configbus.tenant.)"
    )
    kafka.add_argument("--audit-topic", metavar="T", help="default configbus.audit")
    kafka.add_argument("--acks-topic", metavar="T", help="default configbus.acks")
    return kafka


def register(commands: Any, root: argparse.ArgumentParser) -> None:
    kafka = kafka_options()
    redis_url = argparse.ArgumentParser(add_help=False)
    redis_url.add_argument("--redis", metavar="URL", help="Redis (default $CONFIGBUS_REDIS_URL)")

    publisher = argparse.ArgumentParser(add_help=False, parents=[root, kafka, redis_url])
    publisher.add_argument("--signing-key", metavar="FILE", help="default $CONFIGBUS_SIGNING_KEY")
    publisher.add_argument(
        "--kid",
        help="the signing key's id (default $CONFIGBUS_KID, else the --trust file's entry "
        "for the key)",
    )
    publisher.add_argument("--reconcile-interval", type=float, metavar="SECONDS")
    publisher.add_argument("--replication-factor", type=int, metavar="N")
    publisher.add_argument("--min-insync-replicas", type=int, metavar="N")
    publisher.add_argument("--batch-size", type=int, metavar="N", help="events per transaction")
    publisher.add_argument(
        "--heartbeat-interval", type=float, metavar="SECONDS", help="writer heartbeat (5)"
    )
    publisher.add_argument(
        "--trust",
        metavar="FILE",
        help="trust file (default $CONFIGBUS_TRUST): after a key rotation, the versions the "
        "previous keys published are recovered too",
    )
    publisher.add_argument(
        "--secret-keys",
        metavar="FILE",
        help="key-encryption keys, to rotate secrets by their rotate_every policy "
        "(default $CONFIGBUS_SECRET_KEYS; without: a due rotation is only warned about)",
    )
    publisher.add_argument(
        "--secret-interval", type=float, metavar="SECONDS", help="look at the secrets every (60)"
    )
    publisher.add_argument(
        "--gate-envs",
        metavar="ENVS",
        help="environments whose changes must pass every blocking compliance rule or hold "
        "a waiver (prod; none: no gate; default $CONFIGBUS_GATE_ENVS)",
    )
    publisher.add_argument("--log-level", default="INFO")

    daemon = commands.add_parser(
        "daemon", parents=[publisher], help="watch the tree and stores; publish every change"
    )
    daemon.add_argument("--http", metavar="ADDRESS", help=HTTP_HELP)
    daemon.set_defaults(func=_daemon)
    once = commands.add_parser(
        "publish", parents=[publisher], help="publish every changed stream once, then exit"
    )
    once.add_argument("--once", action="store_true", required=True)
    once.add_argument(
        "--take-over",
        action="store_true",
        help="publish even while a daemon is active (it stands by until this run ends)",
    )
    once.add_argument(
        "--deadline", type=float, default=120.0, metavar="SECONDS", help="give up after (120)"
    )
    once.set_defaults(func=_publish_once)

    agent = commands.add_parser(
        "agent",
        parents=[kafka],
        help="the host agent: one Kafka reader for every service on this host",
    )
    agent.add_argument("--socket", metavar="PATH", help="default $CONFIGBUS_AGENT")
    agent.add_argument("--trust", metavar="FILE", help="default $CONFIGBUS_TRUST")
    agent.add_argument("--cache-dir", metavar="DIR", help="default $CONFIGBUS_CACHE_DIR")
    agent.add_argument("--http", metavar="ADDRESS", help=HTTP_HELP)
    agent.add_argument("--log-level", default="INFO")
    agent.set_defaults(func=_agent)

    from configbus import (
        cli_acl,
        cli_audit,
        cli_backup,
        cli_dashboard,
        cli_ops,
        cli_override,
        cli_rollback,
        cli_secret,
    )

    cli_acl.register(commands, root, kafka)
    cli_ops.register(commands, kafka)
    cli_audit.register(commands, kafka)
    cli_override.register(commands, kafka)
    cli_secret.register(commands, kafka)
    cli_rollback.register(commands, publisher)
    cli_backup.register(commands, kafka)  # backup, restore
    cli_dashboard.register(commands, kafka)  # dashboard: the live page in the browser
    from configbus.cli_check import register as register_check  # check: the probes

    register_check(commands)

    tail = commands.add_parser(
        "tail", parents=[kafka], help="read a tenant's topic from the start and verify each event"
    )
    tail.add_argument("tenant", metavar="TENANT")
    tail.add_argument("--trust", required=True, metavar="FILE", help="trust file")
    tail.add_argument("--env", metavar="ENV", help="only this environment")
    tail.add_argument("--follow", "-f", action="store_true", help="keep reading new events")
    tail.set_defaults(func=_tail)

    rollout = commands.add_parser(
        "rollout", help="staged rollouts (canary, blue-green) and the rollout status of a stream"
    ).add_subparsers(dest="rollout_command", required=True, metavar="ACTION")
    status = rollout.add_parser(
        "status", parents=[kafka], help="which instance runs which version, and how fast"
    )
    status.add_argument("tenant", metavar="TENANT")
    status.add_argument("env", metavar="ENV")
    status.add_argument("--version", type=int, metavar="N", help="default: the latest published")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--trust",
        metavar="FILE",
        help="trust file (default $CONFIGBUS_TRUST): the target "
        "version is the newest that verifies",
    )
    status.add_argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        help="wait until every live instance is at the target, and a staged rollout that "
        "runs has ended; exit 1 on a refusal, on stragglers when the time is up, or when "
        "the staged rollout aborted",
    )
    status.add_argument(
        "--instance-ttl",
        type=float,
        default=86400.0,
        metavar="SECONDS",
        help="instances behind and silent longer than this are gone, not stragglers (86400)",
    )
    status.set_defaults(func=_rollout_status)
    from configbus import cli_rollout

    cli_rollout.register(rollout, kafka)

    tenant = commands.add_parser("tenant", help="the run-time tenant store in Redis")
    actions = tenant.add_subparsers(dest="tenant_command", required=True, metavar="ACTION")
    stream = argparse.ArgumentParser(add_help=False, parents=[root, redis_url])
    stream.add_argument("tenant", metavar="TENANT")
    stream.add_argument("env", metavar="ENV")
    who = argparse.ArgumentParser(add_help=False)
    who.add_argument("--actor", default="", help="who makes the change (for the audit trail)")
    who.add_argument("--reason", default="", help="why")
    who.add_argument(
        "--wait",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="wait this long for the daemon to publish the change (10; 0: do not wait)",
    )
    set_ = actions.add_parser(
        "set", parents=[stream, who], help="set typed values, validated first"
    )
    set_.add_argument("assignments", nargs="+", metavar="KEY=VALUE")
    set_.set_defaults(func=_tenant_set)
    unset = actions.add_parser("unset", parents=[stream, who], help="remove values")
    unset.add_argument("keys", nargs="+", metavar="KEY")
    unset.set_defaults(func=_tenant_unset)
    show = actions.add_parser("show", parents=[stream], help="the values set for a stream")
    show.set_defaults(func=_tenant_show)


# -- publisher ------------------------------------------------------------------------
def _settings(args: argparse.Namespace) -> PublisherSettings:
    from configbus.publisher import PublisherSettings

    return PublisherSettings.build(
        root=args.root,
        bootstrap_servers=args.bootstrap_servers,
        signing_key=args.signing_key,
        kid=args.kid,
        redis_url=args.redis,
        topic_prefix=args.topic_prefix,
        audit_topic=args.audit_topic,
        acks_topic=args.acks_topic,
        reconcile_interval=args.reconcile_interval,
        replication_factor=args.replication_factor,
        min_insync_replicas=args.min_insync_replicas,
        batch_size=args.batch_size,
        heartbeat_interval=args.heartbeat_interval,
        trust=args.trust,
        secret_keys=args.secret_keys,
        secret_interval=args.secret_interval,
        gate_envs=args.gate_envs,
        http=getattr(args, "http", None),  # the daemon's alone
    )


def _daemon(args: argparse.Namespace, out: TextIO) -> int:
    settings = _settings(args)
    configure(json_lines=True, level=args.log_level)
    configure_from_env()
    from configbus.publisher import run

    return run_async(run(settings))


def _agent(args: argparse.Namespace, out: TextIO) -> int:
    from pathlib import Path

    from configbus.agent import AgentSettings
    from configbus.agent.server import run as run_agent
    from configbus.health import http_address

    kafka, topics = _kafka(args)
    socket_path = pick(args.socket, "CONFIGBUS_AGENT", "", str)
    if not socket_path:
        raise SettingsError("give --socket or set CONFIGBUS_AGENT")
    trust = _trust(args)
    cache = pick(args.cache_dir, "CONFIGBUS_CACHE_DIR", "", str)
    settings = AgentSettings(
        socket=Path(socket_path),
        kafka=dataclasses.replace(kafka, client_id="configbus-agent"),
        trust=trust,
        cache_dir=Path(cache) if cache else None,
        topics=topics,
        trust_reload=pick(None, "CONFIGBUS_TRUST_RELOAD", 5.0, float),
        http=http_address(pick(args.http, "CONFIGBUS_HTTP", "", str)),
    )
    configure(json_lines=True, level=args.log_level)
    configure_from_env()
    return run_async(run_agent(settings))


def _publish_once(args: argparse.Namespace, out: TextIO) -> int:
    from configbus.publisher import publish_once

    settings = _settings(args)
    configure(json_lines=False, level="WARNING" if args.log_level == "INFO" else args.log_level)
    if args.deadline <= 0:
        raise SettingsError(f"--deadline {args.deadline:g}: must be positive")
    try:
        report = run_async(publish_once(settings, take_over=args.take_over, deadline=args.deadline))
    except TimeoutError:
        print(f"configbus: publish --once: not done within {args.deadline:g}s", file=sys.stderr)
        return 1
    for tenant, env, version in report.published:
        print(f"published {tenant}/{env} v{version}", file=out)
    for (tenant, env), reason in sorted(report.failed.items()):
        print(f"failed {tenant}/{env}: {reason}", file=sys.stderr)
    print(report.summary(), file=out)
    return 1 if report.failed else 0


# -- tail -----------------------------------------------------------------------------
def _kafka(args: argparse.Namespace) -> tuple[KafkaSettings, TopicNames]:
    kafka = KafkaSettings.build(args.bootstrap_servers, client_id="configbus-cli")
    topics = TopicNames.build(args.topic_prefix, args.audit_topic, args.acks_topic)
    return kafka, topics


def _tail(args: argparse.Namespace, out: TextIO) -> int:
    kafka, topics = _kafka(args)
    trust = TrustStore.load(args.trust)
    topic = _tenant_topic(topics, args.tenant)
    return run_async(_tail_topic(kafka, args.tenant, topic, trust, args.env, args.follow, out))


async def _tail_topic(
    kafka: KafkaSettings,
    tenant: str,
    topic: str,
    trust: TrustStore,
    env: str | None,
    keep_following: bool,
    out: TextIO,
) -> int:
    async with Admin(kafka) as admin:
        if topic not in await admin.topics():
            raise UnknownNameError(
                f"tenant {tenant!r} has no topic {topic!r}: it never published "
                "(is the tenant id or --topic-prefix right?)"
            )
    records = follow(kafka, [topic]) if keep_following else read_to_end(kafka, [topic])
    last: dict[tuple[str, str], int] = {}
    rejected = 0
    async for record in records:
        record_env, channel = TopicNames.channel_of(record.key)
        if (env is not None and record_env != env) or channel == CHAIN_CHANNEL:
            continue  # the stream's every channel but the audit chain's bookkeeping
        line, ok = _tail_line(record, trust, last, tenant)
        rejected += not ok
        print(line, file=out, flush=True)
    return 1 if rejected else 0


def _trust(args: argparse.Namespace) -> TrustStore:
    """The trust file of `--trust`, else of $CONFIGBUS_TRUST: required."""
    trust_file = pick(args.trust, "CONFIGBUS_TRUST", "", str)
    if not trust_file:
        raise SettingsError("give --trust or set CONFIGBUS_TRUST")
    return TrustStore.load(trust_file)


def _tenant_topic(topics: TopicNames, tenant: str) -> str:
    try:
        return topics.tenant_topic(tenant)
    except SettingsError as exc:
        raise UnknownNameError(str(exc)) from None  # a bad argument: usage error, exit 2


def _tail_line(
    record: Record, trust: TrustStore, last: dict[tuple[str, str], int], tenant: str
) -> tuple[str, bool]:
    """One record as a line, and whether it verifies. `last`: the latest version seen of
    each (environment, channel), which the record's key names; each channel of a
    stream is numbered on its own."""
    raw_key = (record.key or b"").decode(errors="replace")
    key = shown(raw_key, 32, quote=False)  # anyone may write a key: no terminal tricks
    where = f"@{record.offset}"
    env, channel = TopicNames.channel_of(record.key)
    try:
        # The stream is checked before the config is inflated (wire format §7).
        event = open_envelope(record.value or b"", trust, stream=(tenant, env), channel=channel)
        body = event.body
        seen = last.get((env, channel), 0)
        if body.version <= seen:
            raise VerificationError("stale_version", f"v{body.version} after v{seen}")
        details = _overrides_line(event) if channel == OVERRIDE_CHANNEL else _changed_line(event)
        if body.rollout is not None:  # a candidate: its rollout's decision
            tag = body.rollout
            details = (
                f"rollout {shown(tag.id, quote=False)} {shown(tag.state, quote=False)} "
                f"step {tag.step + 1}/{len(tag.steps)}: {shown(tag.note, 200, quote=False)}"
            )
    except VerificationError as exc:
        return f"{where:<7} {key:<8} REJECTED {shown(str(exc), 300, quote=False)}", False
    last[(env, channel)] = body.version
    version = {
        OVERRIDE_CHANNEL: f"override v{body.version}",
        CANDIDATE_CHANNEL: f"candidate v{body.version}",
        ROLLOUT_CHANNEL: "command",
    }.get(channel, f"v{body.version:<5}")
    when = datetime.datetime.fromtimestamp(body.issued_at / 1e9, datetime.UTC)
    cause = shown(body.cause.reason, 200, quote=False) if body.cause.reason else body.kind
    if body.cause.actor:
        cause += f" by {shown(body.cause.actor, quote=False)}"
    if body.cause.sources:
        cause += f" ({', '.join(shown(s, 200, quote=False) for s in body.cause.sources[:5])})"
    return (
        f"{where:<7} {body.env:<8} {version} {body.config_hash[:12]}  "
        f"{when:%Y-%m-%dT%H:%M:%S}Z  verified:{event.kid}  {cause}  {details}",
        True,
    )


def _changed_line(event: VerifiedEvent) -> str:
    paths = event.body.changed_paths
    changed = ", ".join(shown(p, 200, quote=False) for p in paths[:5])
    if len(paths) > 5:
        changed += f" (+{len(paths) - 5} more)"
    return f"changed: {changed or '-'}"


def _overrides_line(event: VerifiedEvent) -> str:
    """The keys an override record sets, each until when (not their values: a line
    per record, as for snapshots). Raises `VerificationError` for a malformed set."""
    entries = parse_overrides(event).active(event.body.issued_at)
    shown_entries = ", ".join(
        f"{shown(e.path, 200, quote=False)} until {e.until:%Y-%m-%dT%H:%M:%S}Z" for e in entries[:5]
    )
    if len(entries) > 5:
        shown_entries += f" (+{len(entries) - 5} more)"
    return f"overrides: {shown_entries or 'none'}"


# -- rollout ------------------------------------------------------------------------
def _rollout_status(args: argparse.Namespace, out: TextIO) -> int:
    from configbus.ops import rollout_status

    kafka, topics = _kafka(args)
    _tenant_topic(topics, args.tenant)
    trust = _trust(args)
    if args.wait is not None and args.wait < 0:
        raise SettingsError(f"--wait {args.wait:g}: must not be negative")

    from configbus.ops.rollouts import StagedView, read_staged

    bus = KafkaBus(kafka)

    watched = ""  # a staged rollout that ran while we waited

    async def status() -> tuple[RolloutReport, StagedView | None, int]:
        nonlocal watched
        deadline = time.monotonic() + (args.wait or 0.0)
        while True:
            report = await rollout_status(
                kafka,
                topics,
                args.tenant,
                args.env,
                args.version,
                trust=trust,
                instance_ttl=args.instance_ttl,
            )
            staged = await read_staged(bus, topics, args.tenant, args.env, trust)
            if args.wait is None:
                return report, staged, 0
            if staged is not None and staged.tag.state == "running":
                watched = staged.tag.id  # a staged rollout runs: wait for its end
            if staged is not None and staged.tag.id == watched and staged.tag.state == "aborted":
                return report, staged, 1
            staging = staged is not None and staged.tag.state == "running"
            if report.target_version == 0:  # nothing verified to wait for: no pass
                return report, staged, 1
            if report.rejections and not staging:
                return report, staged, 1
            if not report.stragglers and not staging:
                return report, staged, 0
            if time.monotonic() >= deadline:
                return report, staged, 1
            await asyncio.sleep(0.5)

    report, staged, code = run_async(status())
    if args.json:
        json.dump(
            {**report.to_dict(), "staged": staged.to_dict() if staged else None}, out, indent=2
        )
        out.write("\n")
    else:
        print(report.table(), file=out)
        if staged is not None:
            print(staged.table(), file=out)
    if code:
        why = "refused" if report.rejections else f"not at the target within {args.wait:g}s"
        if staged is not None and staged.tag.state == "aborted" and staged.tag.id == watched:
            why = (
                f"the staged rollout {staged.tag.id} was aborted: {'; '.join(staged.tag.breaches)}"
            )
        if report.target_version == 0:
            why = "no verified event of the stream (is the environment right?)"
        print(
            f"rollout of {args.tenant}/{args.env} v{report.target_version}: {why}",
            file=sys.stderr,
        )
    return code


# -- tenant store ---------------------------------------------------------------------
def store_layers(redis: str | None, tenant: str | None, env: str) -> list[Layer]:
    """The stream's Redis store layer for `render` and `explain`, when a store is
    configured (`redis`, else CONFIGBUS_REDIS_URL): they show what the daemon publishes.
    Raises `BusError` when the store is configured but cannot be read."""
    url = pick(redis, "CONFIGBUS_REDIS_URL", "", str)
    if tenant is None or not url:
        return []

    async def read() -> Layer | None:
        from configbus.store import TenantStore

        async with TenantStore(url) as store:
            return await store.layer(tenant, env)

    layer = run_async(read())
    return [layer] if layer is not None else []


def _store(args: argparse.Namespace) -> TenantStore:
    from configbus.store import TenantStore

    url = pick(args.redis, "CONFIGBUS_REDIS_URL", "", str)
    if not url:
        raise SettingsError("give --redis or set CONFIGBUS_REDIS_URL")
    return TenantStore(url)


def _stream(args: argparse.Namespace) -> tuple[EnvironmentTree, str, str]:
    tree = EnvironmentTree(default_root(args.root))
    env = tree.environment(args.env)
    if env not in tree.tenant(args.tenant).environments:
        raise UnknownNameError(f"tenant {args.tenant!r} does not run in {env!r}")
    return tree, args.tenant, env


def _spelt(tree: EnvironmentTree, tenant: str, env: str, key: str) -> Path:
    """The key path as the config spells it (a key may itself hold dots)."""
    wanted = parse_key(key)
    if not wanted or any(isinstance(p, int) for p in wanted):
        raise UnknownNameError(f"{key!r}: give a dotted key of names, e.g. database.pool.max")
    path, _, complete = walk(tree.resolve(env, tenant).data, wanted)
    return path if complete else tuple(str(p) for p in wanted)


def _tenant_set(args: argparse.Namespace, out: TextIO) -> int:
    tree, tenant, env = _stream(args)
    values: dict[Path, Value] = {}
    for assignment in args.assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key:
            raise UnknownNameError(f"{assignment!r}: expected KEY=VALUE")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            raise UnknownNameError(f"{key}: the value is not valid YAML") from None  # not echoed
        if isinstance(value, dict):
            raise UnknownNameError(f"{key}: set leaves one by one, not a mapping")
        values[_spelt(tree, tenant, env, key)] = freeze(value)
    store = _store(args)

    async def apply() -> int:
        async with store:
            merged = {**await store.values(tenant, env), **values}
            expected = _checked(tree, store, tenant, env, merged)
            await store.set(tenant, env, values, actor=args.actor, reason=args.reason)
            for path, value in values.items():
                shown = json.dumps(redacted(value))
                print(f"set {tenant}/{env} {format_path(path)} = {shown}", file=out, flush=True)
            return await _confirm(store, tenant, env, expected, args.wait, out, list(values))

    return run_async(apply())


def _tenant_unset(args: argparse.Namespace, out: TextIO) -> int:
    tree, tenant, env = _stream(args)
    paths = [_spelt(tree, tenant, env, key) for key in args.keys]
    store = _store(args)

    async def apply() -> int:
        async with store:
            current = await store.values(tenant, env)
            left = {path: value for path, value in current.items() if path not in paths}
            expected = _checked(tree, store, tenant, env, left)
            removed = await store.unset(tenant, env, paths, actor=args.actor, reason=args.reason)
            print(f"removed {removed} of {len(paths)} value(s) from {tenant}/{env}", file=out)
            return await _confirm(store, tenant, env, expected, args.wait, out)

    return run_async(apply())


def _checked(
    tree: EnvironmentTree, store: TenantStore, tenant: str, env: str, values: dict[Path, Value]
) -> str:
    """The config hash the stream will have with `values` in its store; raises
    `TreeError` (nothing is written) when that config would be refused."""
    from configbus.store import nest

    layer = Layer(LayerKind.STORE, tenant, f"redis:{store.store_key(tenant, env)}", nest(values))
    config = tree.resolve(env, tenant, runtime=[layer] if values else ())
    problems = tree.problems(config)
    if problems:
        raise TreeError(problems)
    return config.hash


async def _confirm(
    store: TenantStore,
    tenant: str,
    env: str,
    expected: str,
    wait: float,
    out: TextIO,
    paths: list[Path] | None = None,
) -> int:
    """Wait up to `wait` seconds for the daemon to publish the stream with the `expected`
    config hash. 0 when published; 1 when refused, not confirmed in time, or when no
    daemon publishes (the change then waits in the store for one)."""
    if wait <= 0:
        return 0
    stream = f"{tenant}/{env}"
    if await store.publisher() is None:
        print(
            f"not published: no publisher daemon is running; {stream} will be published "
            "when one starts",
            file=sys.stderr,
        )
        return 1
    started = time.time()
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        status = await store.status(tenant, env) or {}
        if status.get("config_hash") == expected:
            print(f"published {stream} v{status.get('version')}", file=out)
            _masked(status.get("overrides"), paths or [])
            return 0
        refused, at = status.get("refused"), status.get("at")
        if refused and isinstance(at, int | float) and at >= started:
            print(f"refused by the publisher: {stream}: {refused}", file=sys.stderr)
            return 1
        await asyncio.sleep(0.05)
    print(f"not confirmed within {wait:g}s: {stream} is not published yet", file=sys.stderr)
    return 1


def _masked(overrides: Any, paths: list[Path]) -> None:
    """Warn when an emergency override in effect covers a key just set: instances keep
    the override's value until it expires or is cleared."""
    set_keys = [format_path(path) for path in paths]
    for entry in overrides if isinstance(overrides, list) else []:
        key = str(entry.get("path", "")) if isinstance(entry, dict) else ""
        covered = [k for k in set_keys if k == key or k.startswith(key + ".")]
        if not key or not covered:
            continue
        until = entry.get("expires_at")
        when = (
            datetime.datetime.fromtimestamp(until / 1e9, datetime.UTC).strftime("%H:%M:%SZ")
            if isinstance(until, int)
            else "?"
        )
        print(
            f"note: an emergency override of {shown(key, quote=False)} by "
            f"{shown(str(entry.get('actor') or '?'), quote=False)} is in effect until {when}: "
            f"instances keep its value until it expires or is cleared",
            file=sys.stderr,
        )


def _tenant_show(args: argparse.Namespace, out: TextIO) -> int:
    _, tenant, env = _stream(args)
    store = _store(args)

    async def read() -> tuple[dict[Path, Value], dict[str, Any]]:
        async with store:
            return await store.values(tenant, env), await store.meta(tenant, env)

    values, meta = run_async(read())
    if not values:
        print(f"{tenant}/{env}: nothing set in the store", file=out)
    for path, value in sorted(values.items()):
        print(f"{format_path(path)} = {json.dumps(redacted(value))}", file=out)
    if meta.get("actor") or meta.get("reason"):
        print(f"# last change by {meta.get('actor') or '?'}: {meta.get('reason') or '-'}", file=out)
    return 0
