"""The event envelope: what the publisher puts on the bus, and how it is verified.

A Kafka record's value is a msgpack map, the *envelope*::

    {"v": 1, "kid": "<key id>", "sig": <64 bytes>, "body": <bytes>}

`sig` is the Ed25519 signature of exactly the `body` bytes. A reader verifies those
bytes before it decodes anything inside them; there is no canonicalisation step.
`body` is itself a msgpack map (`EventBody`). Its `config` is the stream's resolved
config as canonical JSON (sorted keys, compact, UTF-8), zlib-compressed when
`config_encoding` is ``"json+zlib"``; `config_hash` is the hex SHA-256 of that JSON
(uncompressed), so any reader can check what it applied without re-encoding it.
docs/wire-format.md is the normative description.

Verification does the cheap checks first and inflates last: a record for another
stream is refused before its config is decompressed, and decompression stops at the
`configbus.limits` bound, so no signed record can make a reader inflate gigabytes.
"""

from __future__ import annotations

import enum
import hashlib
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

import msgspec

from configbus.bus.topics import (
    CANDIDATE_CHANNEL,
    OVERRIDE_CHANNEL,
    ROLLOUT_CHANNEL,
    SNAPSHOT_CHANNEL,
    WAIVER_CHANNEL,
)
from configbus.crypto import PUBLISHER, SigningKey, TrustStore
from configbus.crypto.trust import TrustedKey
from configbus.errors import VerificationError
from configbus.limits import DEFAULT_LIMITS, Limits

__all__ = [
    "ENVELOPE_VERSION",
    "MAX_VERSION",
    "SCHEMA_VERSION",
    "Ack",
    "Cause",
    "Envelope",
    "EventBody",
    "EventKind",
    "RolloutTag",
    "VerifiedEvent",
    "build_body",
    "check_signature",
    "claimed_version",
    "config_json_of",
    "now_ns",
    "open_envelope",
    "open_note",
    "peek_body",
    "rank",
    "seal",
    "seal_note",
    "shown",
]

ENVELOPE_VERSION: Final = 1
SCHEMA_VERSION: Final = 1
# Bytes of canonical JSON above which a config is compressed. Below it, inflating on
# every subscriber (and deflating on the publisher: 70-170 us at 11 KB) costs more than
# the bytes it saves on loopback-fast links; above it, size matters against
# `event_bytes` and the topic's `max.message.bytes`.
COMPRESS_ABOVE: Final = 32 * 1024
MAX_VERSION: Final = 2**64 - 1  # versions are uint64 on the wire (docs/wire-format.md §4)
# How far ahead of a reader's clock an override may say it was issued: clocks differ a
# little; more would let a signer stretch an override past its key's max_ttl.
CLOCK_SKEW_NS: Final = 60 * 10**9


class EventKind(enum.StrEnum):
    SNAPSHOT = "snapshot"  # the resolved config after a change in the tree or a store
    OVERRIDE = "override"  # the emergency overrides in effect (set, cleared or expired)
    ROLLBACK = "rollback"  # old content republished as a new version
    CANDIDATE = "candidate"  # a staged version, for the instances its rollout selects
    COMMAND = "command"  # an operator's rollout command (start, promote, abort)
    WAIVER = "waiver"  # an operator's waiver of one compliance rule for a stream, expiring

    @property
    def channel(self) -> str:
        """The stream channel (record key) events of this kind travel on."""
        return _CHANNELS.get(self, SNAPSHOT_CHANNEL)


_CHANNELS: Final = {
    EventKind.OVERRIDE: OVERRIDE_CHANNEL,
    EventKind.CANDIDATE: CANDIDATE_CHANNEL,
    EventKind.COMMAND: ROLLOUT_CHANNEL,
    EventKind.WAIVER: WAIVER_CHANNEL,
}
RANK_SPACE: Final = 2**63  # ranks are in [0, RANK_SPACE); `below=RANK_SPACE` selects all


def rank(rollout: str, instance: str) -> int:
    """Where an instance stands in a rollout's order: the first 63 bits of
    SHA-256(``<rollout id>/<instance id>``). Stable while pods come and go (never an
    address), and different per rollout, so no instance is always the first canary."""
    digest = hashlib.sha256(f"{rollout}/{instance}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class RolloutTag(msgspec.Struct, frozen=True, kw_only=True):
    """What a candidate record says of its rollout (docs/wire-format.md §5.2): which
    instances apply the candidate now, and enough of the plan for anyone to read the
    rollout back (`rollout status`, a daemon resuming after a restart)."""

    id: str
    state: str  # "running"; "promoted" or "aborted" end it, and select nobody
    strategy: str  # "canary" or "blue-green"
    steps: tuple[str, ...]  # as planned: "1", "10%", "100%"; blue-green: "color=green", "100%"
    step: int  # which of `steps` runs now (0-based)
    select: dict[str, str] = {}  # labels every instance of the rollout carries
    match: dict[str, str] = {}  # labels an instance carries to be selected now (`select`+)
    below: int = 0  # selected when rank(id, instance) < below (RANK_SPACE: every match)
    bake_s: float = 0.0
    step_timeout_s: float = 0.0  # a step not applied by every selected instance by then aborts
    step_started_at: int = 0
    stable_version: int = 0  # the snapshot version the candidate was staged against
    first_version: int = 0  # the candidate channel version the rollout started at
    command_at: int = 0  # issued_at of the last operator command acted on
    breaches: tuple[str, ...] = ()  # why it was aborted: which gate, on which instance
    note: str = ""  # the decision this record makes: the step begun, passed, why it ended

    def selects(self, instance: str, labels: Mapping[str, str]) -> bool:
        """Whether the instance applies the candidate now."""
        if self.state != "running":
            return False
        if any(labels.get(name) != value for name, value in self.match.items()):
            return False
        return rank(self.id, instance) < self.below


class Cause(msgspec.Struct, frozen=True, kw_only=True):
    """Why an event was published."""

    sources: tuple[str, ...] = ()  # files (relative to the tree) or store keys
    actor: str = ""  # who: a user, "publisher" for the daemon's own reconcile
    reason: str = ""


class EventBody(msgspec.Struct, frozen=True, kw_only=True):
    """The signed part of an event. Times are integer nanoseconds since the epoch."""

    schema: int
    tenant: str
    env: str
    version: int
    config_hash: str
    kind: EventKind
    issued_at: int
    detected_at: int
    cause: Cause
    changed_paths: tuple[str, ...]
    config_encoding: str
    config: bytes
    expires_at: int | None = None
    rollout: RolloutTag | None = None  # a candidate's: its rollout and who applies it


class Envelope(msgspec.Struct, frozen=True):
    v: int
    kid: str
    sig: bytes
    body: bytes


class _EnvelopeVersion(msgspec.Struct):  # only `v`: read when a whole envelope won't decode
    v: int


class _BodyVersion(msgspec.Struct):  # only `version`: what a record claims, unverified
    version: int


class _BodySchema(msgspec.Struct):  # only `schema`: read when a whole body won't decode
    schema: int


class Ack(msgspec.Struct, frozen=True, kw_only=True):
    """A subscriber's report on one event, on the acks topic (msgpack, key
    ``<tenant>/<env>/<instance>/<status>``, or ``<tenant>/<env>/<instance>/override/<status>``
    for the override channel). Not signed: it is telemetry, not configuration.
    Times are integer nanoseconds since the epoch; 0 when unknown. `version` is the
    version of the event's channel."""

    schema: int = 1
    tenant: str
    env: str
    version: int
    instance: str
    service: str
    status: str  # "applied" or "rejected"
    reason: str = ""
    config_hash: str = ""
    detected_at: int = 0
    issued_at: int = 0
    received_at: int = 0
    applied_at: int = 0
    trace_id: str = ""
    startup: bool = False  # applied while the instance started: not a propagation time
    channel: str = SNAPSHOT_CHANNEL  # "snapshot" or "override"
    # Whether every key that signed what the instance runs now (its snapshot, and the
    # override set composed on top) is still in force in its trust file; when not,
    # `signer_note` says which key and why ("key_revoked: key 'x' is revoked ...").
    # The instance keeps running on that config until a valid event replaces it.
    signer_trusted: bool = True
    signer_note: str = ""
    # Heartbeats (channel "presence", status "heartbeat"): what the instance is and
    # runs. Silent for three intervals, an instance has left the live set.
    labels: dict[str, str] = {}
    started_at: int = 0  # when its subscriber started: a new value is a restart
    heartbeat_ms: int = 0
    healthy: bool = True  # every health check the service registered passes
    health_note: str = ""  # the first that does not, and why
    candidate_version: int = 0  # the candidate channel's version it runs; 0: the snapshot

    @property
    def key(self) -> bytes:
        """Its record key: compaction keeps the last ack per instance, channel and status."""
        channel = "" if self.channel == SNAPSHOT_CHANNEL else f"{self.channel}/"
        return f"{self.tenant}/{self.env}/{self.instance}/{channel}{self.status}".encode()


class AuditNote(msgspec.Struct, frozen=True, kw_only=True):
    """An operator action that publishes no event (reading a secret's value), on the
    audit topic (msgpack, key ``<tenant>/<env>/note``). Names what was acted on, never a
    value. Times are integer nanoseconds since the epoch."""

    schema: int = 1
    action: str  # "secret_read"
    tenant: str
    env: str
    subject: str  # the secret's name
    version: int = 0
    actor: str = ""
    reason: str = ""
    at: int = 0

    @property
    def key(self) -> bytes:
        return f"{self.tenant}/{self.env}/note".encode()


def seal_note(note: AuditNote, key: SigningKey) -> bytes:
    """The audit record value of `note`: encoded, signed with `key`, enveloped."""
    body = _note_encoder.encode(note)
    return _envelope_encoder.encode(Envelope(ENVELOPE_VERSION, key.kid, key.sign(body), body))


def open_note(value: bytes, trust: TrustStore) -> tuple[AuditNote, TrustedKey]:
    """Verify and decode an audit note: signed by a key trusted for its stream when
    it was written. Raises `VerificationError`."""
    try:
        envelope = _envelope_decoder.decode(value)
        note = _note_decoder.decode(envelope.body)
    except (msgspec.DecodeError, TypeError, ValueError):
        raise VerificationError("malformed", "not an audit note") from None
    trusted = check_signature(envelope, trust, now=note.at)
    if not trusted.covers(note.tenant, note.env):
        raise VerificationError(
            "untrusted_scope",
            f"key {envelope.kid!r} may not write notes of {note.tenant}/{note.env}",
        )
    return note, trusted


_note_encoder: Final = msgspec.msgpack.Encoder()
_note_decoder: Final = msgspec.msgpack.Decoder(AuditNote)


@dataclass(frozen=True, slots=True)
class VerifiedEvent:
    """An event whose signature, scope, schema and hash have all been checked."""

    kid: str
    body: EventBody
    config_json: bytes  # canonical JSON of the config, hash-checked

    @property
    def stream(self) -> tuple[str, str]:
        return self.body.tenant, self.body.env


def now_ns() -> int:
    return time.time_ns()


# What msgspec raises on bytes that are not the expected shape; RecursionError for
# values nested past the interpreter's limit (a 5 KB record can be).
_UNDECODABLE: Final = (msgspec.DecodeError, TypeError, RecursionError)
_body_encoder: Final = msgspec.msgpack.Encoder()
_envelope_encoder: Final = msgspec.msgpack.Encoder()
_envelope_decoder: Final = msgspec.msgpack.Decoder(Envelope)
_body_decoder: Final = msgspec.msgpack.Decoder(EventBody)
_version_decoder: Final = msgspec.msgpack.Decoder(_EnvelopeVersion)
_schema_decoder: Final = msgspec.msgpack.Decoder(_BodySchema)
_claim_decoder: Final = msgspec.msgpack.Decoder(_BodyVersion)


def build_body(
    *,
    tenant: str,
    env: str,
    version: int,
    config_json: bytes,
    kind: EventKind = EventKind.SNAPSHOT,
    detected_at: int,
    cause: Cause,
    changed_paths: tuple[str, ...] = (),
    expires_at: int | None = None,
    issued_at: int | None = None,
    rollout: RolloutTag | None = None,
) -> EventBody:
    """An event body carrying `config_json` (canonical JSON), hashed and compressed."""
    compress = len(config_json) > COMPRESS_ABOVE
    return EventBody(
        schema=SCHEMA_VERSION,
        tenant=tenant,
        env=env,
        version=version,
        config_hash=hashlib.sha256(config_json).hexdigest(),
        kind=kind,
        issued_at=issued_at if issued_at is not None else now_ns(),
        detected_at=detected_at,
        cause=cause,
        changed_paths=changed_paths,
        config_encoding="json+zlib" if compress else "json",
        config=zlib.compress(config_json, 1) if compress else config_json,
        expires_at=expires_at,
        rollout=rollout,
    )


def _wire(body: EventBody) -> EventBody | dict[str, object]:
    """What goes on the wire for `body`: `rollout` is written on candidates only, so
    every other kind keeps the exact bytes of the body schema 1 (docs/wire-format.md §5)."""
    if body.rollout is not None:
        return body
    fields = msgspec.structs.asdict(body)  # in field order: the same map, one key fewer
    del fields["rollout"]
    return fields


def seal(body: EventBody, key: SigningKey) -> bytes:
    """The record value for `body`: encoded, signed with `key`, enveloped."""
    body_bytes = _body_encoder.encode(_wire(body))
    return _envelope_encoder.encode(
        Envelope(ENVELOPE_VERSION, key.kid, key.sign(body_bytes), body_bytes)
    )


def open_envelope(
    value: bytes,
    trust: TrustStore,
    *,
    stream: tuple[str, str] | None = None,
    channel: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
    now: int | None = None,
) -> VerifiedEvent:
    """Verify and decode a record value. Raises `VerificationError` with a reason:
    malformed, too_large, unknown_key, bad_signature, key_revoked, key_expired,
    key_not_yet_valid (the key is listed but not in force at `now`, the reader's clock
    by default: never the time the event claims), unknown_schema, untrusted_scope
    (the key's scope or role does not cover the event), ttl_too_long (an override
    longer than the operator key's max_ttl), issued_in_future, wrong_stream (when
    `stream`, the (tenant, env) the record was read for, is given and the body names
    another), wrong_channel (likewise for `channel`, the record key's), or
    hash_mismatch. Nothing inside `body` is decoded before
    its signature is checked, and its config is inflated (at most
    ``limits.config_bytes``) only after its key's scope and the stream are checked."""
    if not isinstance(value, bytes | bytearray | memoryview):  # a tombstone: no value
        raise VerificationError("malformed", "the record has no value")
    if len(value) > limits.event_bytes + 64 * 1024:  # the envelope's own bytes, generously
        raise VerificationError(
            "too_large", f"record of {len(value)} bytes, over the limit event_bytes"
        )
    try:
        envelope = _envelope_decoder.decode(value)
    except _UNDECODABLE as exc:
        # A later envelope version may change the other fields: say so, not "malformed".
        version = _peek(lambda: _version_decoder.decode(value).v)
        if version is not None and version != ENVELOPE_VERSION:
            raise VerificationError("unknown_schema", f"envelope version {version}") from None
        raise VerificationError("malformed", f"not an event envelope ({exc})") from None
    if envelope.v != ENVELOPE_VERSION:
        raise VerificationError("unknown_schema", f"envelope version {envelope.v}")
    trusted = check_signature(envelope, trust, now=now)
    try:
        body = _body_decoder.decode(envelope.body)
    except _UNDECODABLE as exc:
        schema = _peek(lambda: _schema_decoder.decode(envelope.body).schema)
        if schema is not None and schema != SCHEMA_VERSION:
            raise VerificationError("unknown_schema", f"body schema {schema}") from None
        raise VerificationError("malformed", f"signed body does not decode ({exc})") from None
    if body.schema != SCHEMA_VERSION:
        raise VerificationError("unknown_schema", f"body schema {body.schema}")
    if not trusted.covers(body.tenant, body.env):
        raise VerificationError(
            "untrusted_scope",
            f"key {envelope.kid!r} may not sign {_plain(body.tenant)}/{_plain(body.env)}",
        )
    _check_role(envelope.kid, trusted, body)
    if stream is not None and (body.tenant, body.env) != stream:
        raise VerificationError(
            "wrong_stream",
            f"event for {_plain(body.tenant)}/{_plain(body.env)} on {stream[0]}/{stream[1]}",
        )
    if channel is not None and body.kind.channel != channel:
        raise VerificationError(
            "wrong_channel", f"a {body.kind} event under the {shown(channel)} channel's key"
        )
    if not 0 < body.version <= MAX_VERSION:
        raise VerificationError("malformed", f"version {body.version} out of range")
    config_json = config_json_of(body, limit=limits.config_bytes)
    if hashlib.sha256(config_json).hexdigest() != body.config_hash:
        raise VerificationError("hash_mismatch", "config does not match config_hash")
    return VerifiedEvent(envelope.kid, body, config_json)


def _check_role(kid: str, trusted: TrustedKey, body: EventBody) -> None:
    """Whether the key's role may sign this event: snapshots, rollbacks and candidates
    only a publisher key; overrides an operator key too, within its max_ttl, or a
    publisher key (which publishes their expiry); rollout commands and compliance
    waivers either, within the same limits (both expire: an old one found later does
    nothing)."""
    if body.kind is EventKind.CANDIDATE and body.rollout is None:
        raise VerificationError("malformed", "a candidate without its rollout")
    if body.kind not in (EventKind.OVERRIDE, EventKind.COMMAND, EventKind.WAIVER):
        if trusted.role != PUBLISHER:
            raise VerificationError(
                "untrusted_scope", f"key {kid!r} is an {trusted.role} key: it signs overrides only"
            )
        return
    if body.expires_at is None:
        raise VerificationError("malformed", f"an {body.kind} without expires_at")
    if body.issued_at > now_ns() + CLOCK_SKEW_NS:
        raise VerificationError(
            "issued_in_future", f"override issued {(body.issued_at - now_ns()) / 1e9:.0f}s ahead"
        )
    if trusted.max_ttl is not None and body.expires_at - body.issued_at > trusted.max_ttl * 10**9:
        raise VerificationError(
            "ttl_too_long",
            f"{body.kind} of {(body.expires_at - body.issued_at) / 1e9:.0f}s, over key {kid!r}'s "
            f"max_ttl of {trusted.max_ttl}s",
        )


def peek_body(value: bytes) -> tuple[str, EventBody]:
    """The key id and body an event record claims, NOT verified: for listing records
    whose bytes something else vouches for (an audit chain link pins them). Raises
    `VerificationError` ("malformed") when it is no event."""
    try:
        envelope = _envelope_decoder.decode(value)
        return envelope.kid, _body_decoder.decode(envelope.body)
    except (msgspec.DecodeError, TypeError, ValueError):
        raise VerificationError("malformed", "not an event") from None


def claimed_version(value: bytes | None) -> int:
    """The version a record value claims, unverified: only ever the order in which
    candidates are tried (start-up tries the highest claim first). -1 when it claims
    nothing readable; such a record is still tried, and rejected."""
    try:
        return _claim_decoder.decode(_envelope_decoder.decode(value or b"").body).version
    except _UNDECODABLE:
        return -1


def check_signature(envelope: Envelope, trust: TrustStore, *, now: int | None = None) -> TrustedKey:
    """The trust entry of the envelope's key, once its signature over the body bytes
    verifies and the key is in force at `now` (default: this process's clock);
    raises `VerificationError` (unknown_key, bad_signature, key_revoked, key_expired,
    key_not_yet_valid) otherwise. The signature is checked first, so a refusal for
    the key's standing means the key did sign: someone holds a retired key."""
    trusted = trust.get(envelope.kid)
    if trusted is None:
        raise VerificationError("unknown_key", f"key id {shown(envelope.kid)} is not trusted")
    if not trusted.key.verify(envelope.sig, envelope.body):
        raise VerificationError("bad_signature", f"signature does not verify with {envelope.kid!r}")
    standing = trusted.standing(now if now is not None else now_ns())
    if standing is not None:
        raise VerificationError(*standing)
    return trusted


def shown(text: str, limit: int = 64, *, quote: bool = True) -> str:
    """Text from a record (any length, any characters) for a message: quoted (or, with
    `quote=False`, as it is when it is short and printable), else as a repr cut at
    `limit` characters, so no record can make a log line or an ack huge or smuggle
    control characters into a terminal."""
    if not quote and len(text) <= limit and text.isprintable():
        return text
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def _plain(text: str) -> str:
    return shown(text, quote=False)


def _peek(read: Callable[[], int]) -> int | None:
    """The version number `read` finds, or None when there is none to find."""
    try:
        return read()
    except _UNDECODABLE:
        return None


def config_json_of(body: EventBody, *, limit: int = DEFAULT_LIMITS.config_bytes) -> bytes:
    """The canonical JSON an event body carries, decompressed (not hash-checked).
    Raises `VerificationError` ("too_large") rather than produce more than `limit`
    bytes: inflating stops there, whatever the compressed data would expand to."""
    if body.config_encoding == "json":
        if len(body.config) > limit:
            raise VerificationError("too_large", f"config over {limit} bytes (limit config_bytes)")
        return body.config
    if body.config_encoding == "json+zlib":
        inflater = zlib.decompressobj()
        try:
            config = inflater.decompress(body.config, limit + 1)
        except zlib.error:
            raise VerificationError("malformed", "config is not valid zlib data") from None
        if len(config) > limit or inflater.unconsumed_tail:
            raise VerificationError(
                "too_large", f"config inflates to over {limit} bytes (limit config_bytes)"
            )
        if not inflater.eof:
            raise VerificationError("malformed", "config is truncated zlib data")
        return config
    raise VerificationError("unknown_schema", f"config encoding {shown(body.config_encoding)}")
