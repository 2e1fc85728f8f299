"""Compliance waivers: an operator's signed, expiring permission to publish one stream
although one blocking compliance rule fails.

A waiver is a record of its own on the stream's tenant topic (key
``<env>/waiver/<rule>/<set_at>``: one per waiver given, the newest per rule counts), an
event of kind
``waiver`` signed by an operator key within its ``max_ttl``. Its config is the JSON of
a `Waiver`; its ``expires_at`` ends it. Ending one early writes it again expiring now.
It is written as the stream's operator writer, so it also goes to the audit topic,
linked into the stream's audit chain; the publisher notes every publication a waiver
let through (``waiver_used``), in its own chain.

    await write_waiver(bus, topics, "aurora-records", "prod", "baseline-tls-min-version",
                       for_s=86400, key=operator_key, trust=trust, actor="alice",
                       reason="CHG-77 legacy partner endpoint until Friday")
"""

from __future__ import annotations

import datetime
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

import msgspec

from configbus.bus import Bus, Record, TopicNames
from configbus.bus.topics import WAIVER_CHANNEL
from configbus.crypto import SigningKey, TrustStore
from configbus.errors import SettingsError, VerificationError
from configbus.events import (
    Cause,
    EventKind,
    VerifiedEvent,
    build_body,
    now_ns,
    open_envelope,
    seal,
    shown,
)
from configbus.ops.trail import write_record

__all__ = [
    "Waiver",
    "WaiverBook",
    "describe",
    "parse_waiver",
    "read_waivers",
    "waiver_key",
    "write_waiver",
]

log = logging.getLogger(__name__)

Stream = tuple[str, str]
RULE_ID: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
_PREFIX: Final = f"{WAIVER_CHANNEL}/"


class Waiver(msgspec.Struct, frozen=True, kw_only=True):
    rule: str
    actor: str = ""
    reason: str = ""
    set_at: int = 0  # ns since the epoch
    expires_at: int = 0

    def in_force(self, now: int) -> bool:
        return self.set_at <= now < self.expires_at


def waiver_key(topics: TopicNames, env: str, rule: str, set_at: int) -> bytes:
    """The record key of a stream's waiver of `rule` given at `set_at`: one key per
    waiver given, so compaction never lets an old record take a newer one's place (a
    waiver ended, then its first record copied back, stays ended)."""
    if not RULE_ID.fullmatch(rule):
        raise SettingsError(f"rule id {rule!r}: use a-z 0-9 . _ -, starting with a letter or digit")
    return topics.record_key(env, f"{_PREFIX}{rule}/{set_at}")


async def write_waiver(
    bus: Bus,
    topics: TopicNames,
    tenant: str,
    env: str,
    rule: str,
    *,
    for_s: float,
    key: SigningKey,
    trust: TrustStore,
    actor: str,
    reason: str,
) -> Waiver:
    """Waive `rule` for `tenant`/`env` for `for_s` seconds from now (0: end the waiver
    now), signed with the operator's `key`, on the tenant topic and the audit trail in
    one transaction. Raises `ConfigBusError`."""
    now = now_ns()
    record_key = waiver_key(topics, env, rule, now)
    waiver = Waiver(
        rule=rule, actor=actor, reason=reason, set_at=now, expires_at=now + int(for_s * 1e9)
    )
    body = build_body(
        tenant=tenant,
        env=env,
        version=now,
        config_json=msgspec.json.encode(waiver),
        kind=EventKind.WAIVER,
        detected_at=now,
        issued_at=now,
        cause=Cause(actor=actor, reason=reason),
        expires_at=waiver.expires_at,
    )
    value = seal(body, key)
    open_envelope(value, trust, stream=(tenant, env), channel=WAIVER_CHANNEL)  # as readers will
    await write_record(bus, topics, tenant, env, record_key, value, trust=trust, signer=key)
    return waiver


def parse_waiver(
    record: Record, topics: TopicNames, trust: TrustStore
) -> tuple[Stream, Waiver, str] | None:
    """The stream, waiver and signing key id of a tenant-topic record, None when it is
    no waiver record. Raises `VerificationError` for one that does not verify, or whose body
    names another rule than its key."""
    tenant = topics.tenant_of(record.topic)
    env, channel = topics.channel_of(record.key)
    if tenant is None or not channel.startswith(_PREFIX):
        return None
    stream = (tenant, env)
    event: VerifiedEvent = open_envelope(
        record.value or b"", trust, stream=stream, channel=WAIVER_CHANNEL
    )
    try:
        waiver = msgspec.json.decode(event.config_json, type=Waiver)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise VerificationError("malformed", f"not a waiver: {exc}") from None
    if f"{waiver.rule}/{waiver.set_at}" != channel.removeprefix(_PREFIX):
        raise VerificationError("malformed", f"a waiver of {shown(waiver.rule)} under {channel!r}")
    if waiver.expires_at != event.body.expires_at or waiver.set_at != event.body.issued_at:
        raise VerificationError("malformed", "a waiver whose times are not its event's")
    return stream, waiver, event.kid


@dataclass(slots=True)
class WaiverBook:
    """The waivers of every stream, as the tenant topics say: the latest verified
    record per (stream, rule)."""

    topics: TopicNames
    trust: TrustStore  # operator keys too; the daemon replaces it when it reloads keys
    waivers: dict[Stream, dict[str, Waiver]] = field(default_factory=dict)
    signers: dict[tuple[Stream, str], str] = field(default_factory=dict)  # -> key id

    def received(self, record: Record) -> Stream | None:
        """Learn from a tenant-topic record; the stream whose waivers changed, if any."""
        try:
            found = parse_waiver(record, self.topics, self.trust)
        except VerificationError as exc:
            key = shown((record.key or b"").decode(errors="replace"), quote=False)
            log.warning("a waiver record under %s in %s is ignored: %s", key, record.topic, exc)
            return None
        if found is None:
            return None
        stream, waiver, kid = found
        held = self.waivers.setdefault(stream, {})
        known = held.get(waiver.rule)
        if known is not None and known.set_at >= waiver.set_at:
            return None  # an older record read again
        held[waiver.rule] = waiver
        self.signers[(stream, waiver.rule)] = kid
        return stream

    def active(self, stream: Stream, now: int) -> dict[str, Waiver]:
        """The waivers of `stream` in force at `now`, by rule, whose keys the trust
        file (as it is now) still trusts: revoking a key ends what it waived."""
        found = {}
        for rule, waiver in self.waivers.get(stream, {}).items():
            entry = self.trust.get(self.signers.get((stream, rule), ""))
            if waiver.in_force(now) and entry is not None and not entry.revoked:
                found[rule] = waiver
        return found


async def read_waivers(
    bus: Bus, topics: TopicNames, tenant: str, env: str, trust: TrustStore
) -> list[Waiver]:
    """Every waiver of `tenant`/`env` on its topic (the latest per rule), in force or
    not, by rule."""
    book = WaiverBook(topics, trust)
    topic = topics.tenant_topic(tenant)
    admin = bus.admin()
    await admin.start()
    try:
        exists = topic in await admin.topics()
    finally:
        await admin.stop()
    if exists:
        async for record in bus.read_to_end([topic]):
            if topics.channel_of(record.key)[0] == env:
                book.received(record)
    return sorted(book.waivers.get((tenant, env), {}).values(), key=lambda w: w.rule)


def describe(waivers: Iterable[Waiver], now: int) -> list[str]:
    """One line per waiver: its rule, who, until when, why; ended ones said so."""
    lines = []
    for waiver in waivers:
        until = datetime.datetime.fromtimestamp(waiver.expires_at / 1e9, datetime.UTC)
        state = "in force until" if waiver.in_force(now) else "ended"
        lines.append(
            f"{waiver.rule}: {state} {until:%Y-%m-%d %H:%M:%S}Z, by "
            f"{shown(waiver.actor, quote=False)}: {shown(waiver.reason, 200, quote=False)}"
        )
    return lines
