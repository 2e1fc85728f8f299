"""The publisher's own records on the state topic, and recovery from Kafka.

Two kinds of record, both signed with the publisher's key (the same envelope as
events, so one verification path):

- key ``<tenant>/<env>``: the stream's *head*, its last version and config hash,
  written in the same transaction as the event. A tenant topic can be deleted and
  recreated; the state topic keeps the high-water mark, so versions never restart.
  After a rollback the head also holds the stream (`hold`, see
  `configbus.ops.rollback`): the hash of what the tree and store resolved to then,
  which the publisher does not publish over the rollback.
- key ``$writer``: the active publisher's heartbeat, written every few seconds. A
  daemon that sees another writer's heartbeats arrive stays on standby.

Recovery and the heartbeats trust only what verifies against publisher-role keys
(an operator key signs overrides, never a head, a heartbeat or a snapshot), a head
only within its key's scope, and take a record's stream from where it lies (the
topic's tenant, the record's key: a snapshot key holds snapshot-channel events only),
never from its body alone. Everything else is skipped and counted by reason.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, TypeVar

import msgspec

from configbus.bus import SNAPSHOT_CHANNEL, Bus, TopicNames
from configbus.chain import PUBLISHER_CHAIN_KEY, ChainHead, open_link
from configbus.crypto import PUBLISHER, SigningKey, TrustStore
from configbus.crypto.trust import KEY_EXPIRED, KEY_NOT_YET_VALID, KEY_REVOKED
from configbus.errors import VerificationError
from configbus.events import (
    ENVELOPE_VERSION,
    MAX_VERSION,
    Envelope,
    check_signature,
    claimed_version,
    open_envelope,
    shown,
)
from configbus.tree.values import Value, freeze

__all__ = [
    "MAX_VERSION",
    "WRITER_KEY",
    "Recovery",
    "StreamHead",
    "StreamState",
    "WriterBeat",
    "open_signed",
    "recover",
    "seal_signed",
]

log = logging.getLogger(__name__)

Stream = tuple[str, str]
WRITER_KEY: Final = b"$writer"


class StreamHead(msgspec.Struct, frozen=True, kw_only=True, tag="head"):
    tenant: str
    env: str
    version: int
    config_hash: str
    issued_at: int
    # After a rollback: the hash of what the tree and store resolved to at the time;
    # "" for none. Readers that predate it ignore it (msgspec skips unknown fields).
    hold: str = ""


class WriterBeat(msgspec.Struct, frozen=True, kw_only=True, tag="writer"):
    writer: str  # who: unique per daemon process
    at: int  # ns since the epoch, the writer's clock
    interval: float  # seconds between beats
    grace: float = 0.0  # seconds of silence after which the writer counts as gone


_T = TypeVar("_T", StreamHead, WriterBeat)
_encoder: Final = msgspec.msgpack.Encoder()
_envelope_decoder: Final = msgspec.msgpack.Decoder(Envelope)


def seal_signed(record: StreamHead | WriterBeat, key: SigningKey) -> bytes:
    body = _encoder.encode(record)
    return _encoder.encode(Envelope(ENVELOPE_VERSION, key.kid, key.sign(body), body))


def open_signed(value: bytes, trust: TrustStore, kind: type[_T]) -> _T:
    """Verify a state record and decode it as `kind`; raises `VerificationError`.
    Only a publisher-role key signs state records, and a head only for a stream its
    key's scope covers (untrusted_scope otherwise)."""
    try:
        envelope = _envelope_decoder.decode(value)
    except (msgspec.DecodeError, TypeError):
        raise VerificationError("malformed", "not an envelope") from None
    trusted = check_signature(envelope, trust)
    if trusted.role != PUBLISHER:
        raise VerificationError(
            "untrusted_scope",
            f"key {envelope.kid!r} is an {trusted.role} key: it signs overrides only",
        )
    try:
        record = msgspec.msgpack.decode(envelope.body, type=kind)
    except (msgspec.DecodeError, TypeError):
        raise VerificationError("malformed", f"not a {kind.__name__}") from None
    if isinstance(record, StreamHead) and not trusted.covers(record.tenant, record.env):
        stream = shown(f"{record.tenant}/{record.env}", quote=False)
        raise VerificationError(
            "untrusted_scope", f"key {envelope.kid!r} may not sign the head of {stream}"
        )
    return record


@dataclass(slots=True)
class StreamState:
    """What Kafka holds for a stream: its last version and config hash, and the config
    itself (as resolved data once known, else the event's JSON, decoded on demand).
    `hold`: set by a rollback in force (see `StreamHead.hold`), else ""."""

    version: int
    config_hash: str
    data: Mapping[str, Value] | None = None
    config_json: bytes | None = None
    hold: str = ""
    issued_at: int = 0  # ns since the epoch: when the version was published (0: unknown)
    kid: str = ""  # the key that signed the version ("": unknown, e.g. known from a head)

    def config(self) -> Mapping[str, Value] | None:
        if self.data is None and self.config_json is not None:
            decoded = freeze(msgspec.json.decode(self.config_json))
            self.data = decoded if isinstance(decoded, Mapping) else None
            self.config_json = None
        return self.data


@dataclass(slots=True)
class Recovery:
    states: dict[Stream, StreamState] = field(default_factory=dict)
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> records
    from_state_only: int = 0  # streams whose newest version survives only as a head
    chain: ChainHead | None = None  # the head of the publisher's audit chain

    def summary(self) -> str:
        versions = sum(state.version for state in self.states.values())
        text = f"recovered {len(self.states)} streams from kafka ({versions} versions)"
        if self.from_state_only:
            text += f", {self.from_state_only} from the state topic alone"
        if self.skipped:
            reasons = ", ".join(f"{reason} ({n})" for reason, n in sorted(self.skipped.items()))
            text += f"; skipped {sum(self.skipped.values())} records: {reasons}"
        return text


async def recover(bus: Bus, topics: TopicNames, trust: TrustStore) -> Recovery:
    """The last version and hash of every stream: the highest verified version among
    the stream's events (tenant topics) and heads (state topic), and the hold of a
    rollback in force (from the head of that same version)."""
    admin = bus.admin()
    await admin.start()
    try:
        existing = await admin.topics()
    finally:
        await admin.stop()
    tenant_topics = sorted(t for t in existing if topics.tenant_of(t) is not None)
    wanted = [*tenant_topics, topics.state] if topics.state in existing else tenant_topics
    recovery = Recovery()
    heads: dict[Stream, StreamHead] = {}
    floors: dict[Stream, int] = {}  # versions signed by a listed key no longer in force
    async for record in bus.read_to_end(wanted):
        if record.value is None or record.key is None:
            continue
        try:
            if record.topic == topics.state:
                if record.key == PUBLISHER_CHAIN_KEY:  # the highest: never an old one copied back
                    chain = _chain_head(record.value, trust, topics)
                    if recovery.chain is None or chain.seq > recovery.chain.seq:
                        recovery.chain = chain
                elif record.key != WRITER_KEY:
                    head = _head(record.key, record.value, trust)
                    known = heads.get((head.tenant, head.env))
                    if known is None or head.version > known.version:
                        heads[(head.tenant, head.env)] = head
                continue
            _event(recovery, record.topic, record.key, record.value, topics, trust)
        except VerificationError as exc:
            recovery.skipped[exc.reason] += 1
            if exc.reason in _NOT_IN_FORCE and record.topic != topics.state:
                _floor(floors, record.topic, record.key, record.value, topics)
            log.warning(
                "recovery: skipping the record at %s@%d: %s", record.topic, record.offset, exc
            )
    for stream, head in heads.items():
        state = recovery.states.get(stream)
        if state is None or head.version > state.version:
            recovery.states[stream] = StreamState(
                head.version, head.config_hash, hold=head.hold, issued_at=head.issued_at
            )
            recovery.from_state_only += 1
        elif head.version == state.version and head.config_hash == state.config_hash:
            state.hold = head.hold  # this event's own head: a newer event ends the hold
    for stream, version in floors.items():
        state = recovery.states.get(stream)
        if state is None or version > state.version:
            # Instances may run that version (a revoked key signed it: they keep it and
            # refuse anything not newer). Believe its number, never its content: the
            # empty hash makes the next round publish the stream above it.
            recovery.states[stream] = StreamState(version, "")
    return recovery


# A listed key that did sign, but is revoked, expired or not yet valid (the signature is
# checked before the key's standing): its versions are not believed, but not undercut.
_NOT_IN_FORCE: Final = frozenset({KEY_REVOKED, KEY_EXPIRED, KEY_NOT_YET_VALID})


def _floor(
    floors: dict[Stream, int], topic: str, key: bytes, value: bytes, topics: TopicNames
) -> None:
    tenant = topics.tenant_of(topic) or ""
    env, channel = topics.channel_of(key)
    version = claimed_version(value)
    if channel == SNAPSHOT_CHANNEL and 0 < version <= MAX_VERSION:
        floors[(tenant, env)] = max(version, floors.get((tenant, env), 0))


def _chain_head(value: bytes, trust: TrustStore, topics: TopicNames) -> ChainHead:
    """The publisher's audit chain head from its state record: a link a publisher key
    signed for the chain of these topics' transactional id."""
    link, trusted = open_link(value, trust)
    if trusted.role != PUBLISHER or link.chain != topics.transactional_id:
        raise VerificationError(
            "untrusted_scope", f"a chain head of {shown(link.chain)} signed by {trusted.role}"
        )
    return ChainHead.of(value, link)


def _head(key: bytes, value: bytes, trust: TrustStore) -> StreamHead:
    head = open_signed(value, trust, StreamHead)
    if key != TopicNames.audit_key(head.tenant, head.env):
        raise VerificationError(
            "wrong_stream", f"a head for {head.tenant}/{head.env} under {key!r}"
        )
    if not 0 < head.version <= MAX_VERSION:
        raise VerificationError("malformed", f"version {head.version} out of range")
    return head


def _event(
    recovery: Recovery, topic: str, key: bytes, value: bytes, topics: TopicNames, trust: TrustStore
) -> None:
    tenant = topics.tenant_of(topic) or ""
    env, channel = topics.channel_of(key)
    if channel != SNAPSHOT_CHANNEL:
        return  # overrides (and other channels) keep versions of their own
    # channel=: an override-kind event under the snapshot key is refused, never adopted
    event = open_envelope(value, trust, stream=(tenant, env), channel=SNAPSHOT_CHANNEL)
    body = event.body
    known = recovery.states.get((body.tenant, body.env))
    if known is None or body.version > known.version:
        recovery.states[(body.tenant, body.env)] = StreamState(
            body.version,
            body.config_hash,
            config_json=event.config_json,
            issued_at=body.issued_at,
            kid=event.kid,
        )
