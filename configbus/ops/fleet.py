"""The fleet as the acks topic tells it: which instances of a stream are live, what
each one runs, whether it is healthy, and what it said of each candidate.

Instances send a heartbeat (an `Ack` of status ``heartbeat`` on the ``presence``
channel, key ``<tenant>/<env>/<instance>/presence/heartbeat``) every few seconds and
after every apply: their labels, when their subscriber started, the versions they run
and the verdict of the health checks the service registered. An instance is *live*
while it was heard within three of its heartbeat intervals (`DEFAULT_TTL_S` for one that
sends none) and has not said it stopped since. A heartbeat with a new `started_at` is
a restart. `Fleet` is fed records in the order of the topic (one partition) with the
time each was written; it holds no connection, so the daemon follows the topic and
the CLI reads it once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final

import msgspec

from configbus.bus import CANDIDATE_CHANNEL, PRESENCE_CHANNEL
from configbus.errors import SettingsError
from configbus.events import Ack
from configbus.options import parse_labels

__all__ = ["DEFAULT_TTL_S", "Fleet", "Member"]

DEFAULT_TTL_S: Final = 30.0  # an instance that sends no heartbeat: live this long after an ack
TTL_BEATS: Final = 3  # heartbeats an instance may miss before it leaves the live set
APPLIES_KEPT: Final = 16  # candidate applies remembered per instance
MAX_LABELS: Final = 32  # labels a heartbeat may carry; one with more is ignored
MAX_HEARTBEAT_MS: Final = 300_000  # a longer interval counts as this: gone within 15 min
MAX_MEMBERS: Final = 20_000  # instances per stream; more are not tracked (said once)

_decoder = msgspec.msgpack.Decoder(Ack)
Stream = tuple[str, str]


@dataclass(slots=True)
class Member:
    """One instance of a stream, as last heard of. Times in ns since the epoch."""

    instance: str
    service: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    started_at: int = 0
    restarted_at: int = 0  # when it last started again, by its own clock (0: never seen)
    last_heard: int = 0
    heartbeat_ms: int = 0
    healthy: bool = True
    health_note: str = ""
    version: int = 0  # the snapshot version it runs
    candidate_version: int = 0  # the candidate channel version it runs; 0: none
    config_hash: str = ""  # of the config it runs
    stopped_at: int = 0
    candidate_applied: Ack | None = None  # its last applied ack of the candidate channel
    # Its last few applied acks of the candidate channel, oldest first: when it FIRST
    # applied a candidate tells a crash loop (restarted after that) from a pod that
    # restarted for its own reasons and then applied it at start-up.
    candidate_applies: list[Ack] = field(default_factory=list)
    candidate_refused: Ack | None = None  # its last rejected one

    @property
    def ttl_ns(self) -> int:
        if self.heartbeat_ms > 0:
            return TTL_BEATS * self.heartbeat_ms * 10**6
        return int(DEFAULT_TTL_S * 1e9)

    def live(self, now: int) -> bool:
        """Heard within its TTL, and not stopped since."""
        if self.stopped_at and self.stopped_at >= self.last_heard:
            return False
        return now - self.last_heard <= self.ttl_ns

    def first_applied(self, config_hash: str, since_version: int) -> int:
        """When it first applied the candidate of `config_hash` (at or after candidate
        channel version `since_version`), among the applies remembered; 0: never."""
        return min(
            (
                a.applied_at
                for a in self.candidate_applies
                if a.config_hash == config_hash and a.version >= since_version
            ),
            default=0,
        )

    def gone_why(self, now: int) -> str:
        """Why it is not live ("" when it is): stopped, or silent for how long."""
        if self.stopped_at and self.stopped_at >= self.last_heard:
            return "stopped"
        if now - self.last_heard > self.ttl_ns:
            return f"silent for {(now - self.last_heard) / 1e9:.1f}s"
        return ""


class Fleet:
    """Every instance of every stream heard of, fed record by record. `accept`, when
    given, says which streams to track (the daemon's: those of its tree): anyone may
    write the acks topic, and records for streams nobody follows cost nothing."""

    def __init__(self, accept: Callable[[Stream], bool] | None = None) -> None:
        self.streams: dict[Stream, dict[str, Member]] = {}
        self.records = 0  # records observed, readable or not
        self.ignored = 0  # records not taken: another stream, bad labels, over a limit
        self.accept = accept

    def members(self, tenant: str, env: str) -> dict[str, Member]:
        return self.streams.get((tenant, env), {})

    def live(self, tenant: str, env: str, now: int) -> Iterator[Member]:
        return (m for m in self.members(tenant, env).values() if m.live(now))

    def prune(self, before: int) -> int:
        """Forget instances not heard of since `before` (ns): pods come and go under
        new names, and a daemon that follows the topic for months must not keep them
        all. Returns how many were forgotten."""
        forgotten = 0
        for stream, members in list(self.streams.items()):
            for name in [n for n, m in members.items() if max(m.last_heard, m.stopped_at) < before]:
                del members[name]
                forgotten += 1
            if not members:
                del self.streams[stream]
        return forgotten

    def observe(self, key: bytes | None, value: bytes | None, at: int) -> None:
        """One record of the acks topic, written at `at` (ns). Anything that is not an
        ack under its own key is ignored: a record cannot speak for another instance."""
        self.records += 1
        if value is None:
            return
        try:
            ack = _decoder.decode(value)
        except (msgspec.DecodeError, TypeError, RecursionError):
            return
        if key != ack.key:
            return
        stream = (ack.tenant, ack.env)
        if self.accept is not None and not self.accept(stream):
            self.ignored += 1
            return
        if ack.labels and not _good_labels(ack.labels):
            self.ignored += 1
            return
        members = self.streams.setdefault(stream, {})
        member = members.get(ack.instance)
        if member is None:
            if len(members) >= MAX_MEMBERS:
                self.ignored += 1
                return
            member = members[ack.instance] = Member(ack.instance)
        member.service = ack.service or member.service
        if ack.status == "stopped":
            member.stopped_at = max(member.stopped_at, at)
            return
        member.last_heard = max(member.last_heard, at)
        if ack.channel == PRESENCE_CHANNEL and ack.status == "heartbeat":
            self._beat(member, ack, at)
        elif ack.channel == CANDIDATE_CHANNEL and ack.status == "applied":
            member.candidate_applied = ack
            member.candidate_applies = [*member.candidate_applies[-(APPLIES_KEPT - 1) :], ack]
        elif ack.channel == CANDIDATE_CHANNEL and ack.status == "rejected":
            member.candidate_refused = ack

    @staticmethod
    def _beat(member: Member, ack: Ack, at: int) -> None:
        if member.started_at and ack.started_at > member.started_at:
            member.restarted_at = ack.started_at  # by its clock, as its acks' applied_at
        member.started_at = max(member.started_at, ack.started_at)
        member.labels = dict(ack.labels)
        member.heartbeat_ms = min(max(ack.heartbeat_ms, 0), MAX_HEARTBEAT_MS)
        member.healthy, member.health_note = ack.healthy, ack.health_note
        member.version, member.candidate_version = ack.version, ack.candidate_version
        member.config_hash = ack.config_hash


def _good_labels(labels: Mapping[str, str]) -> bool:
    """Whether a heartbeat's labels are what a subscriber sends: at most MAX_LABELS,
    each a label name and value as `parse_labels` reads them."""
    if len(labels) > MAX_LABELS:
        return False
    try:
        parsed = parse_labels((f"{k}={v}" for k, v in labels.items()), "label")
    except SettingsError:
        return False
    return parsed == labels
