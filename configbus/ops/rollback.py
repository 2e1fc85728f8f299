"""Rollback: publish an earlier version's content again, as a new version, and keep it.

`rollback` reads version N of a stream from the audit topic (verified, like `history`),
checks its config against today's schema of the tree, and publishes it as the next
version, of kind ``rollback``, with the operator's actor and reason. Versions only go
up: the rollback is version latest + 1, never N again.

It publishes as a one-shot writer that takes the role over, as `publish --once
--take-over` does: a running daemon is fenced, stands by, and claims the role back
once the rollback has resigned. The event goes through the daemon's own path (tenant
topic, audit topic and head, in one transaction).

A rollback stays in force. Its head on the state topic records a *hold*: the hash of
what the tree and store resolved the stream to at the time. While they go on resolving
to it, the publisher (the daemon's reconciles, its restarts, `publish --once`) leaves
the stream as rolled back; once the stream's resolved config changes, it is published
as usual and the hold ends. `release` ends it at once, publishing the tree's state.

    report = await rollback(settings, "aurora-records", "prod", to_version=7,
                            reason="pool too small", actor="alice")
    print(report.summary())   # rolled back aurora-records/prod to v7's content as v12
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import msgspec

from configbus.bus import SNAPSHOT_CHANNEL, Bus
from configbus.errors import (
    BusError,
    ConfigBusError,
    Problem,
    SchemaError,
    UnknownNameError,
)
from configbus.ops.history import HistoryEntry, stream_history
from configbus.ops.rollouts import latest_candidate
from configbus.publisher import Daemon, PublisherSettings, PublishReport
from configbus.publisher.core import now_change
from configbus.tree import EnvironmentTree, ResolvedConfig
from configbus.tree.layer import Layer, LayerKind
from configbus.tree.values import freeze_json

__all__ = ["ReleaseReport", "RollbackReport", "release", "rollback"]

log = logging.getLogger(__name__)

Stream = tuple[str, str]
RELEASE_SOURCE = "rollback release"


@dataclass(frozen=True, slots=True)
class RollbackReport:
    """What `rollback` did. `version` is the version it published, 0 when it published
    nothing because version `to_version` holds the current config (`current`).
    `held`: whether the stream is held (False when the tree does not resolve it now:
    it then stays rolled back until it resolves). `problems`: how the content breaks
    today's schema, published anyway (`force`)."""

    tenant: str
    env: str
    to_version: int
    current: int
    version: int = 0
    held: bool = False
    problems: tuple[Problem, ...] = ()
    staged: str = ""  # the id of a staged rollout of another config that runs

    def summary(self) -> str:
        stream = f"{self.tenant}/{self.env}"
        if not self.version:
            text = (
                f"{stream}: v{self.to_version}'s content is the current config "
                f"(v{self.current}); nothing published"
            )
            if self.staged:
                text += (
                    f". A staged rollout of another config runs ({self.staged}): "
                    f"`configbus rollout abort {self.tenant} {self.env}` sends its canaries back"
                )
            return text
        return f"rolled back {stream} to v{self.to_version}'s content as v{self.version}"


@dataclass(frozen=True, slots=True)
class ReleaseReport:
    """What `release` did: `version` is the tree's state published, 0 when no rollback
    held the stream (nothing published)."""

    tenant: str
    env: str
    version: int = 0

    def summary(self) -> str:
        stream = f"{self.tenant}/{self.env}"
        if not self.version:
            return f"{stream}: no rollback holds it; nothing to release"
        return f"released {stream}: published the tree's state as v{self.version}"


async def rollback(
    settings: PublisherSettings,
    tenant: str,
    env: str,
    *,
    to_version: int,
    reason: str,
    actor: str,
    force: bool = False,
    deadline: float = 120.0,
    bus: Bus | None = None,
) -> RollbackReport:
    """Publish version `to_version` of `tenant`/`env` again, as its next version, and
    hold it there (see the module docstring). Raises `UnknownNameError` for a stream
    the tree does not have or a version the audit topic does not hold (naming the
    latest), `SchemaError` when the content breaks today's schema (unless `force`),
    `BusError` when Kafka (or the store, whose values the hold needs) fails, and
    `TimeoutError` after `deadline` seconds."""
    daemon = Daemon(settings, bus=bus)
    try:
        async with asyncio.timeout(deadline):
            stream = _stream(daemon.tree, tenant, env)
            history = await stream_history(
                daemon.bus, settings.topics, *stream, daemon.trust, channel=SNAPSHOT_CHANNEL
            )
            entry = history.get(to_version)  # of the snapshot channel: overrides count apart
            config = _config(entry, *stream)
            problems = tuple(daemon.tree.problems(config))
            if problems and not force:
                raise SchemaError(_refusal(entry, stream, problems))
            latest = history.latest
            if latest is not None and latest.config_hash == entry.config_hash:
                staged = await _running_rollout(daemon, stream)
                return RollbackReport(tenant, env, to_version, latest.version, staged=staged)

            await daemon.claim_once(take_over=True)
            state = daemon.publisher.states.get(stream)
            current = state.version if state is not None else 0
            if state is not None and state.config_hash == entry.config_hash:
                staged = await _running_rollout(daemon, stream)
                return RollbackReport(tenant, env, to_version, current, staged=staged)
            for problem in problems:
                log.warning("rolling back to a config that fails today's schema: %s", problem)
            change = now_change((f"rollback to v{to_version}",), actor, reason)
            report = await daemon.publish_round(
                lambda publisher: publisher.publish_rollback(stream, config, change)
            )
            version = _published(report, stream, "not rolled back")
            head = daemon.publisher.states[stream]
            return RollbackReport(
                tenant, env, to_version, current, version, bool(head.hold), problems
            )
    finally:
        await daemon.stop()


async def _running_rollout(daemon: Daemon, stream: Stream) -> str:
    """The id of the stream's staged rollout that runs, or "" (none, or unreadable)."""
    try:
        latest = await latest_candidate(daemon.bus, daemon.settings.topics, *stream, daemon.trust)
    except ConfigBusError:
        return ""
    tag = latest.body.rollout if latest is not None else None
    return tag.id if tag is not None and tag.state == "running" else ""


async def release(
    settings: PublisherSettings,
    tenant: str,
    env: str,
    *,
    reason: str,
    actor: str,
    deadline: float = 120.0,
    bus: Bus | None = None,
) -> ReleaseReport:
    """End the rollback holding `tenant`/`env`: publish the tree's state for the stream
    as a snapshot (even when that is what it was held at), whose head holds nothing.
    Publishes nothing when no rollback holds the stream. Raises as `rollback` does;
    a stream the tree does not resolve now cannot be released (`ConfigBusError`)."""
    daemon = Daemon(settings, bus=bus)
    try:
        async with asyncio.timeout(deadline):
            stream = _stream(daemon.tree, tenant, env)
            await daemon.claim_once(take_over=True)
            state = daemon.publisher.states.get(stream)
            if state is None or not state.hold:
                return ReleaseReport(tenant, env)
            change = now_change((RELEASE_SOURCE,), actor, reason)
            report = await daemon.publish_round(
                lambda publisher: publisher.publish([stream], change, release=True)
            )
            return ReleaseReport(tenant, env, _published(report, stream, "not released"))
    finally:
        await daemon.stop()


def _stream(tree: EnvironmentTree, tenant: str, env: str) -> Stream:
    """The stream as the tree names it; `UnknownNameError` when it has no such stream."""
    env = tree.environment(env)
    if env not in tree.tenant(tenant).environments:
        raise UnknownNameError(f"tenant {tenant!r} does not run in {env!r}")
    return tenant, env


def _config(entry: HistoryEntry, tenant: str, env: str) -> ResolvedConfig:
    """The version's config as a resolved config of one layer (named after the
    version), to check against today's schema and to publish again."""
    data = freeze_json(msgspec.json.decode(entry.event.config_json))
    if not isinstance(data, Mapping):
        raise ConfigBusError(f"v{entry.version} of {tenant}/{env} holds no config mapping")
    source = f"{tenant}/{env} v{entry.version}"
    layer = Layer(LayerKind.PUBLISHED, f"v{entry.version}", source, data)  # no lines
    config = ResolvedConfig(data, [layer], env=env, tenant=tenant)
    if config.hash != entry.config_hash:  # the bytes published again are the bytes signed
        raise ConfigBusError(
            f"v{entry.version} of {tenant}/{env} does not encode back to its config hash"
        )
    return config


def _refusal(entry: HistoryEntry, stream: Stream, problems: tuple[Problem, ...]) -> str:
    first = problems[0]
    more = len(problems) - 1
    return (
        f"cannot roll back {stream[0]}/{stream[1]} to v{entry.version}: it fails today's "
        f"schema: {_problem(first)}"
        + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")
        + "; --force rolls back anyway"
    )


def _problem(problem: Problem) -> str:
    return f"{problem.key}: {problem.message}" if problem.key else problem.message


def _published(report: PublishReport, stream: Stream, what: str) -> int:
    """The version `report` published for `stream`; raises why it published none."""
    for tenant, env, version in report.published:
        if (tenant, env) == stream:
            return version
    name = f"{stream[0]}/{stream[1]}"
    if stream in report.failed:
        raise ConfigBusError(f"{name} {what}: {report.failed[stream]}")
    raise BusError(f"{name} {what}: {report.pending.get(stream, 'kafka did not confirm it')}")
