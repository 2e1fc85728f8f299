"""The dashboard's picture of the streams: each one's version, who changed it and why,
how far it has reached and how fast, what was refused, the overrides in effect and its
staged rollout; in memory, bounded, and pure (no I/O, no clock of its own).

The feed (feed.py) tells it what Kafka holds, verified: `version` (a snapshot-channel
event: a snapshot or a rollback), `overrides` (a stream's override set), `candidate` (a
staged rollout's record), `ack` (an instance's ack or heartbeat, as the acks topic
holds it) and `not_verified` (a record no trusted key vouches for). `state(now)` is the
picture as JSON-ready data: what ``/api/state`` serves and the page draws.

Everything here came from Kafka, where whoever may write a topic may write anything:

- only a verified event makes a stream; acks are not signed, so an ack of a stream not
  seen yet waits in a bounded buffer (`Caps.pending`) until its stream's first event;
- every text is cut (`TEXT`, `NAME` characters) and non-printable characters are
  replaced, every collection has a cap (`Caps`), and an ack with an instance name
  longer than `MAX_NAME` is ignored rather than cut (two cut names would merge);
- no config is kept or shown: versions, hashes, actor, reason, changed paths, override
  paths and expiry, never a value.

Told the same event or ack again, the model stays as it was (`not_verified` counts:
the feed tells each record once).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from configbus.bus import OVERRIDE_CHANNEL, PRESENCE_CHANNEL, SNAPSHOT_CHANNEL
from configbus.events import Ack, RolloutTag, VerifiedEvent
from configbus.ops.fleet import MAX_HEARTBEAT_MS, TTL_BEATS
from configbus.ops.overrides import OverrideState

__all__ = ["Caps", "Model", "percentiles"]

Stream = tuple[str, str]

TEXT: Final = 200  # characters kept of an actor, a reason, a note, a path
NAME: Final = 100  # ... of an instance or service name as shown
MAX_NAME: Final = 256  # an ack naming a longer instance is ignored
PATHS: Final = 10  # changed paths kept per version (the rest counted)
LISTED: Final = 10  # refusals, overrides, stragglers listed per stream (the rest counted)
ROLLOUT_SHOWN_S: Final = 3600.0  # an ended rollout stays on the page this long
_NS: Final = 10**9


@dataclass(frozen=True, slots=True)
class Caps:
    """How much the model holds at most. Past a cap, what is new is not taken (and
    counted in the state's ``totals``): a stream, an instance, an ack waiting."""

    streams: int = 2000
    instances: int = 1000  # per stream
    history: int = 20  # versions per stream: the latency chart
    pending: int = 10_000  # acks of streams not seen yet
    # An instance that sends no heartbeats counts as live this long after its last
    # ack (acks are all there is to know it by); one that sends them, three beats.
    instance_ttl_s: float = 86400.0

    def __post_init__(self) -> None:
        for name in ("streams", "instances", "history", "pending"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: at least 1")


def percentiles(samples: Iterable[float]) -> dict[str, float | None]:
    """p50/p95/p99 of `samples` (ms), as `RolloutReport.latency_percentiles` picks
    them: the sample at rank q*n of the sorted list; None without samples."""
    ordered = sorted(samples)

    def pick(q: float) -> float | None:
        if not ordered:
            return None
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {"p50_ms": pick(0.50), "p95_ms": pick(0.95), "p99_ms": pick(0.99)}


def clean(text: object, limit: int = TEXT) -> str:
    """`text` as it may be shown: at most `limit` characters (an ellipsis says it was
    cut), every character that is not printable replaced by U+FFFD."""
    value = str(text)
    cut = value[:limit]
    shown = "".join(c if c.isprintable() else "\ufffd" for c in cut)
    return shown + ("\u2026" if len(value) > limit else "")


@dataclass(slots=True)
class _Version:
    """One snapshot-channel version of a stream, as its verified event says."""

    version: int
    kind: str
    config_hash: str
    issued_at: int
    detected_at: int
    actor: str
    reason: str
    paths: tuple[str, ...]
    more_paths: int

    @classmethod
    def of(cls, event: VerifiedEvent) -> _Version:
        body = event.body
        return cls(
            version=body.version,
            kind=str(body.kind),
            config_hash=body.config_hash[:64],
            issued_at=body.issued_at,
            detected_at=body.detected_at,
            actor=clean(body.cause.actor),
            reason=clean(body.cause.reason),
            paths=tuple(clean(p) for p in body.changed_paths[:PATHS]),
            more_paths=max(0, len(body.changed_paths) - PATHS),
        )


@dataclass(slots=True)
class _Instance:
    """One instance of a stream, as its acks and heartbeats tell (times in ns)."""

    service: str = ""
    version: int = 0  # the snapshot version it runs (its last applied ack, or heartbeat)
    applied_at: int = 0
    rejected: int = 0  # the last snapshot version it refused, and why
    rejected_reason: str = ""
    override_rejected: int = 0  # the last override set it refused, and why
    override_reason: str = ""
    last_heard: int = 0  # the acks topic's time of its last record
    stopped_at: int = 0
    heartbeat_ms: int = 0
    healthy: bool = True
    health_note: str = ""

    def live(self, now: int, ttl_ns: int) -> bool:
        if self.stopped_at and self.stopped_at >= self.last_heard:
            return False
        if self.heartbeat_ms > 0:
            return now - self.last_heard <= TTL_BEATS * self.heartbeat_ms * 10**6
        return now - self.last_heard <= ttl_ns


@dataclass(slots=True)
class _Rollout:
    """A stream's latest staged rollout: its candidate record."""

    tag: RolloutTag
    candidate_version: int
    issued_at: int
    reason: str


@dataclass(slots=True)
class _Stream:
    key: Stream  # as the events name it
    tenant: str  # as shown
    env: str
    versions: dict[int, _Version] = field(default_factory=dict)  # the last few
    latest: int = 0
    # Detection to applied (ms) per version and instance: the last `history` versions.
    samples: dict[int, dict[str, float]] = field(default_factory=dict)
    instances: dict[str, _Instance] = field(default_factory=dict)
    overrides: OverrideState | None = None
    rollout: _Rollout | None = None
    unverified: int = 0  # records of this stream that did not verify
    unverified_reason: str = ""


class Model:
    """The streams and their instances; `on_change` (when given) is called after every
    call that changed something, `revision` counts those calls."""

    def __init__(self, caps: Caps | None = None, on_change: Callable[[], None] | None = None):
        self.caps = caps or Caps()
        self.on_change = on_change
        self.revision = 0
        self._streams: dict[Stream, _Stream] = {}
        self._dirty: set[Stream] = set()  # streams changed since `take_changed`
        self._pending: dict[Stream, list[tuple[Ack, int]]] = {}
        self._pending_count = 0
        # What was not taken, for the state's totals.
        self.dropped_streams = 0  # verified events of streams past the cap
        self.dropped_instances = 0  # acks of instances past a stream's cap
        self.dropped_acks = 0  # acks not taken: unreadable, oversized names, buffer full
        self.unverified = 0  # records that did not verify, of any stream
        self.unverified_reason = ""

    # -- what the feed tells --------------------------------------------------------
    def version(self, event: VerifiedEvent) -> None:
        """A verified event of a stream's snapshot channel (a snapshot or rollback)."""
        stream = self._stream(event.body.tenant, event.body.env)
        if stream is None:
            return
        number = event.body.version
        if number in stream.versions or self._too_old(stream.versions, number):
            return
        stream.versions[number] = _Version.of(event)
        stream.latest = max(stream.latest, number)
        _keep_newest(stream.versions, self.caps.history)
        _keep_newest(stream.samples, self.caps.history)
        self._take_waiting(stream)
        self._changed(stream)

    def overrides(self, state: OverrideState) -> None:
        """A verified, parsed override set of a stream: the newest version wins."""
        stream = self._stream(state.event.body.tenant, state.event.body.env)
        if stream is None:
            return
        if stream.overrides is not None and stream.overrides.version >= state.version:
            return
        stream.overrides = state
        self._changed(stream)

    def candidate(self, event: VerifiedEvent) -> None:
        """A verified candidate record (its rollout's tag): the newest version wins."""
        body = event.body
        if body.rollout is None:
            return
        stream = self._stream(body.tenant, body.env)
        if stream is None:
            return
        known = stream.rollout
        if known is not None and known.candidate_version >= body.version:
            return
        reason = body.rollout.note or body.cause.reason
        stream.rollout = _Rollout(body.rollout, body.version, body.issued_at, clean(reason))
        self._changed(stream)

    def not_verified(self, stream: Stream | None, reason: str) -> None:
        """A record that did not verify; `stream` when its key names a stream shown."""
        self.unverified += 1
        self.unverified_reason = clean(reason)
        known = self._streams.get(stream) if stream is not None else None
        if known is not None:
            known.unverified += 1
            known.unverified_reason = self.unverified_reason
        self._changed(known)

    def ack(self, ack: Ack, at: int) -> None:
        """A record of the acks topic, decoded, written at `at` (ns)."""
        if len(ack.instance) > MAX_NAME or not ack.instance:
            self.dropped_acks += 1
            return
        key = (ack.tenant, ack.env)
        stream = self._streams.get(key)
        if stream is None:
            self._hold(key, ack, at)
            return
        if self._apply(stream, ack, at):
            self._changed(stream)

    # -- the picture ----------------------------------------------------------------
    def state(self, now: int) -> dict[str, Any]:
        """Every stream as a row (sorted by tenant and environment) and the totals;
        JSON-ready. Times are ms since the epoch."""
        return {
            "generated_at": now // 10**6,
            "streams": list(self.rows(now).values()),
            "totals": self.totals(),
        }

    def rows(self, now: int, streams: Iterable[Stream] | None = None) -> dict[str, dict[str, Any]]:
        """The rows of `streams` (default: all) that exist, by key ("tenant/env"),
        sorted."""
        wanted = sorted(self._streams if streams is None else streams)
        found = (self._streams.get(key) for key in wanted)
        return {(row := self._row(s, now))["key"]: row for s in found if s is not None}

    def take_changed(self) -> set[Stream]:
        """The streams changed since the last call."""
        changed, self._dirty = self._dirty, set()
        return changed

    def totals(self) -> dict[str, Any]:
        return {
            "streams": len(self._streams),
            "dropped_streams": self.dropped_streams,
            "dropped_instances": self.dropped_instances,
            "dropped_acks": self.dropped_acks,
            "pending_acks": self._pending_count,
            "unverified": self.unverified,
            "unverified_reason": self.unverified_reason,
        }

    def streams(self) -> list[Stream]:
        return sorted(self._streams)

    # -- inside ---------------------------------------------------------------------
    def _changed(self, stream: _Stream | None = None) -> None:
        self.revision += 1
        if stream is not None:
            self._dirty.add(stream.key)
        if self.on_change is not None:
            self.on_change()

    def _too_old(self, versions: dict[int, Any], number: int) -> bool:
        return len(versions) >= self.caps.history and number < min(versions)

    def _stream(self, tenant: str, env: str) -> _Stream | None:
        """The stream, made on its first verified event (and given the acks that
        waited for it); None past the cap."""
        key = (tenant, env)
        found = self._streams.get(key)
        if found is not None:
            return found
        if len(self._streams) >= self.caps.streams:
            self.dropped_streams += 1
            return None
        found = self._streams[key] = _Stream(key, clean(tenant, NAME), clean(env, NAME))
        return found

    def _take_waiting(self, stream: _Stream) -> None:
        """The acks that came before the stream's first version, now that its versions
        bound what they may claim."""
        waiting = self._pending.pop(stream.key, [])
        self._pending_count -= len(waiting)
        for ack, at in waiting:
            self._apply(stream, ack, at)

    def _hold(self, key: Stream, ack: Ack, at: int) -> None:
        """Keep an ack of a stream not seen yet, cut to what the model reads: acks are
        unsigned, and anyone who can write the acks topic can send large ones."""
        if self._pending_count >= self.caps.pending:
            self.dropped_acks += 1
            return
        kept = msgspec.structs.replace(
            ack, reason=clean(ack.reason), health_note=clean(ack.health_note),
            service=clean(ack.service, NAME), labels={}, signer_note="", trace_id="",
            config_hash="",
        )  # fmt: skip
        self._pending.setdefault(key, []).append((kept, at))
        self._pending_count += 1

    def _apply(self, stream: _Stream, ack: Ack, at: int) -> bool:
        """Take one ack into `stream`; whether anything changed. Acks are not signed:
        one claiming a version the stream has not published (yet) is not believed."""
        snapshot = ack.channel in (SNAPSHOT_CHANNEL, PRESENCE_CHANNEL)  # its numbers
        if snapshot and ack.version > stream.latest:
            self.dropped_acks += 1
            return False
        instance = stream.instances.get(ack.instance)
        if instance is None:
            if len(stream.instances) >= self.caps.instances:
                self.dropped_instances += 1
                return False
            instance = stream.instances[ack.instance] = _Instance()
        before = dataclasses.replace(instance)
        instance.service = clean(ack.service, NAME) or instance.service
        if ack.status == "stopped":
            instance.stopped_at = max(instance.stopped_at, at)
        else:
            instance.last_heard = max(instance.last_heard, at)
        if ack.channel == PRESENCE_CHANNEL and ack.status == "heartbeat":
            instance.heartbeat_ms = min(max(ack.heartbeat_ms, 0), MAX_HEARTBEAT_MS)
            instance.healthy, instance.health_note = ack.healthy, clean(ack.health_note)
            instance.version = max(instance.version, ack.version)
        elif ack.channel == SNAPSHOT_CHANNEL and ack.status == "applied":
            if ack.version >= instance.version:
                instance.version, instance.applied_at = ack.version, ack.applied_at
            self._sample(stream, ack)
        elif ack.channel == SNAPSHOT_CHANNEL and ack.status == "rejected":
            if ack.version >= instance.rejected:
                instance.rejected, instance.rejected_reason = ack.version, clean(ack.reason)
        elif (
            ack.channel == OVERRIDE_CHANNEL
            and ack.status == "rejected"
            and ack.version >= instance.override_rejected
        ):
            instance.override_rejected = ack.version
            instance.override_reason = clean(ack.reason)
        sampled = ack.channel == SNAPSHOT_CHANNEL and ack.status == "applied"
        return sampled or instance != before

    def _sample(self, stream: _Stream, ack: Ack) -> None:
        """Detection to applied of an instance that got `ack.version` as a change (not
        at its start), in ms; the last `history` versions are kept."""
        if ack.startup or not 0 < ack.detected_at <= ack.applied_at:
            return
        if ack.version not in stream.versions:  # only versions the trail verified
            return
        samples = stream.samples
        if ack.version not in samples and self._too_old(samples, ack.version):
            return
        found = samples.setdefault(ack.version, {})
        if ack.instance in found or len(found) < self.caps.instances:
            found[ack.instance] = (ack.applied_at - ack.detected_at) / 1e6
        _keep_newest(samples, self.caps.history)

    def _row(self, stream: _Stream, now: int) -> dict[str, Any]:
        ttl = int(self.caps.instance_ttl_s * _NS)
        live = {n: i for n, i in stream.instances.items() if i.live(now, ttl)}
        target = stream.latest
        behind = sorted(n for n, i in live.items() if i.version < target)
        latest = stream.versions.get(target)
        return {
            "key": f"{stream.tenant}/{stream.env}",
            "tenant": stream.tenant,
            "env": stream.env,
            "version": target,
            "change": _version_dict(latest) if latest is not None else None,
            "instances": {
                "live": len(live),
                "at_target": len(live) - len(behind),
                "behind": [clean(n, NAME) for n in behind[:LISTED]],
                "behind_more": max(0, len(behind) - LISTED),
                "unhealthy": sorted(
                    f"{clean(n, NAME)}: {i.health_note or 'unhealthy'}"
                    for n, i in live.items()
                    if not i.healthy
                )[:LISTED],
            },
            "latency": {
                **percentiles(stream.samples.get(target, {}).values()),
                "samples": len(stream.samples.get(target, {})),
            },
            "refusals": self._refusals(stream, live),
            "overrides": _overrides(stream.overrides, now),
            "rollout": _rollout(stream.rollout, now),
            "history": [
                {
                    "version": v.version,
                    "issued_at": v.issued_at // 10**6,
                    "actor": v.actor,
                    **percentiles(stream.samples.get(v.version, {}).values()),
                    "samples": len(stream.samples.get(v.version, {})),
                }
                for v in sorted(stream.versions.values(), key=lambda v: v.version)
            ],
        }

    @staticmethod
    def _refusals(stream: _Stream, live: dict[str, _Instance]) -> dict[str, Any]:
        """What live instances refused and still do not run (the snapshot version
        they refused is newer than theirs; the override set in effect), and how many
        records of the stream did not verify here."""
        found: list[dict[str, Any]] = []
        override = stream.overrides.version if stream.overrides is not None else 0
        for name, instance in sorted(live.items()):
            if instance.rejected > instance.version:
                found.append(
                    {
                        "instance": clean(name, NAME),
                        "channel": SNAPSHOT_CHANNEL,
                        "version": instance.rejected,
                        "reason": instance.rejected_reason,
                    }
                )
            if override and instance.override_rejected >= override:
                found.append(
                    {
                        "instance": clean(name, NAME),
                        "channel": OVERRIDE_CHANNEL,
                        "version": instance.override_rejected,
                        "reason": instance.override_reason,
                    }
                )
        return {
            "instances": found[:LISTED],
            "more": max(0, len(found) - LISTED),
            "unverified": stream.unverified,
            "unverified_reason": stream.unverified_reason,
        }


def _keep_newest(versions: dict[int, Any], count: int) -> None:
    for old in sorted(versions)[: max(0, len(versions) - count)]:
        del versions[old]


def _version_dict(version: _Version) -> dict[str, Any]:
    return {
        "version": version.version,
        "kind": version.kind,
        "config_hash": version.config_hash[:12],
        "issued_at": version.issued_at // 10**6,
        "detected_at": version.detected_at // 10**6,
        "actor": version.actor,
        "reason": version.reason,
        "changed_paths": list(version.paths),
        "more_paths": version.more_paths,
    }


def _overrides(state: OverrideState | None, now: int) -> dict[str, Any]:
    active: Sequence[Any] = state.active(now) if state is not None else ()
    return {
        "version": state.version if state is not None else 0,
        "entries": [
            {
                "path": clean(e.path),
                "actor": clean(e.actor),
                "reason": clean(e.reason),
                "expires_at": e.expires_at // 10**6,
            }
            for e in sorted(active, key=lambda e: e.expires_at)[:LISTED]
        ],
        "more": max(0, len(active) - LISTED),
    }


def _rollout(rollout: _Rollout | None, now: int) -> dict[str, Any] | None:
    """The stream's staged rollout while it runs, and for `ROLLOUT_SHOWN_S` after."""
    if rollout is None:
        return None
    tag = rollout.tag
    if tag.state != "running" and now - rollout.issued_at > ROLLOUT_SHOWN_S * _NS:
        return None
    steps = [clean(s, 40) for s in tag.steps[:40]]
    step = min(max(tag.step, 0), max(len(steps) - 1, 0))
    bake_left = None
    if tag.state == "running" and tag.step_started_at:
        bake_left = max(0.0, tag.bake_s - (now - tag.step_started_at) / _NS)
    return {
        "id": clean(tag.id, 40),
        "state": clean(tag.state, 20),
        "strategy": clean(tag.strategy, 20),
        "step": step + 1,
        "steps": steps,
        "step_spec": steps[step] if steps else "",
        "bake_left_s": round(bake_left, 1) if bake_left is not None else None,
        "stable_version": tag.stable_version,
        "candidate_version": rollout.candidate_version,
        "note": rollout.reason,
        "breaches": [clean(b) for b in tag.breaches[:LISTED]],
        "issued_at": rollout.issued_at // 10**6,
    }
