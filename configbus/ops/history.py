"""History and diff of a stream, read from the audit topic.

Tenant topics are compacted, so they keep a stream's latest event only; the audit topic
keeps every one, keyed ``<tenant>/<env>``. Each audit record is the signed event itself
and is verified like any other (docs/wire-format.md §7): history shows only what a
trusted key published, and says how many records it could not verify. The cause each
event carries (actor, reason, sources) is signed with it, so it survives restarts of
the daemon and `publish --once`.

    history = await stream_history(bus, topics, "aurora-records", "prod", trust)
    for entry in history.versions: print(entry.version, entry.actor, entry.reason)
    changes = diff(history.get(4), history.get(7))    # [(path, old, new), ...]
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

import msgspec

from configbus.bus import SNAPSHOT_CHANNEL, Bus, TopicNames
from configbus.crypto import TrustStore
from configbus.errors import UnknownNameError, VerificationError
from configbus.events import VerifiedEvent, open_envelope
from configbus.tree.diff import changed_paths
from configbus.tree.resolved import parse_key
from configbus.tree.values import freeze_json, redacted, walk

__all__ = ["Change", "HistoryEntry", "StreamHistory", "diff", "stream_history"]


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One published version of a stream."""

    version: int
    kind: str  # snapshot, override, rollback
    issued_at: int  # ns since the epoch
    detected_at: int
    actor: str
    reason: str
    sources: tuple[str, ...]
    changed_paths: tuple[str, ...]
    config_hash: str
    kid: str
    event: VerifiedEvent = field(repr=False, compare=False)

    @property
    def channel(self) -> str:
        """snapshot (versions of the tree and stores, rollbacks) or override (the
        emergency overrides in effect, numbered on their own)."""
        return self.event.body.kind.channel

    @property
    def expires_at(self) -> int | None:
        return self.event.body.expires_at

    @property
    def issued(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.issued_at / 1e9, datetime.UTC)

    def config(self) -> Any:
        """The version's config as plain data, secrets as ``<secret:NAME>``."""
        return redacted(freeze_json(msgspec.json.decode(self.event.config_json)))

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "channel": self.channel,
            "kind": self.kind,
            "issued_at": self.issued.isoformat(),
            "actor": self.actor,
            "reason": self.reason,
            "sources": list(self.sources),
            "changed_paths": list(self.changed_paths),
            "config_hash": self.config_hash,
            "kid": self.kid,
        }


@dataclass(slots=True)
class StreamHistory:
    tenant: str
    env: str
    versions: list[HistoryEntry] = field(default_factory=list)  # oldest first, both channels
    unverified: int = 0  # audit records of the stream that did not verify

    @property
    def snapshots(self) -> list[HistoryEntry]:
        """The snapshot channel's versions (what `diff` compares), oldest first."""
        return [entry for entry in self.versions if entry.channel == SNAPSHOT_CHANNEL]

    def get(self, version: int) -> HistoryEntry:
        """Snapshot version `version`."""
        for entry in self.snapshots:
            if entry.version == version:
                return entry
        known = ", ".join(str(e.version) for e in self.snapshots[-10:]) or "none"
        raise UnknownNameError(
            f"{self.tenant}/{self.env} has no version {version} in the audit topic "
            f"(latest: {known})"
        )

    @property
    def latest(self) -> HistoryEntry | None:
        """The latest snapshot version."""
        snapshots = self.snapshots
        return snapshots[-1] if snapshots else None


async def stream_history(
    bus: Bus,
    topics: TopicNames,
    tenant: str,
    env: str,
    trust: TrustStore,
    *,
    channel: str | None = None,
) -> StreamHistory:
    """Every version of `tenant`/`env` the audit topic holds that verifies with `trust`,
    of both channels (each numbered on its own), oldest first. A version seen twice (an
    event re-read after a retry) is listed once.
    `channel`: only the events of that channel (`SNAPSHOT_CHANNEL`: what the tree and
    stores published, and rollbacks), whose versions are counted apart from others'."""
    topics.tenant_topic(tenant)  # a legal tenant id, or SettingsError
    key = topics.audit_key(tenant, env)
    history = StreamHistory(tenant, env)
    seen: dict[tuple[str, int], HistoryEntry] = {}
    async for record in bus.read_to_end([topics.audit]):
        if record.key != key:
            continue
        try:
            event = open_envelope(record.value or b"", trust, stream=(tenant, env))
        except VerificationError:
            history.unverified += 1
            continue
        body = event.body
        if (body.kind.channel, body.version) in seen or (
            channel is not None and body.kind.channel != channel
        ):
            continue
        seen[(body.kind.channel, body.version)] = HistoryEntry(
            version=body.version,
            kind=str(body.kind),
            issued_at=body.issued_at,
            detected_at=body.detected_at,
            actor=body.cause.actor,
            reason=body.cause.reason,
            sources=body.cause.sources,
            changed_paths=body.changed_paths,
            config_hash=body.config_hash,
            kid=event.kid,
            event=event,
        )
    # In the order they were issued; each channel's versions rise with it.
    history.versions = sorted(seen.values(), key=lambda e: (e.issued_at, e.channel, e.version))
    return history


@dataclass(frozen=True, slots=True)
class Change:
    """One leaf that differs between two versions: added (only `new`), removed (only
    `old`) or changed. Lists count as one leaf; secrets show as ``<secret:NAME>``."""

    path: str
    old: Any = None
    new: Any = None
    added: bool = False
    removed: bool = False

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path}
        if not self.added:
            out["old"] = self.old
        if not self.removed:
            out["new"] = self.new
        return out


def diff(old: HistoryEntry, new: HistoryEntry) -> list[Change]:
    """The value-level changes from `old` to `new`, secrets redacted, sorted by path."""
    before, after = old.config(), new.config()
    changes = []
    for path in changed_paths(before, after):
        _, was, had = walk(before, parse_key(path))
        _, now, has = walk(after, parse_key(path))
        changes.append(
            Change(path, was if had else None, now if has else None, added=not had, removed=not has)
        )
    return changes
