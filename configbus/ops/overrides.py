"""Emergency overrides: a stream's override channel, read, composed and written.

The override channel of a stream (record key ``<env>/override`` on its tenant topic,
docs/wire-format.md §2.1) holds one record: the set of overrides in effect, as an event
of kind ``override`` whose config is the canonical JSON of an `OverrideSet`::

    {"entries": [{"actor": "alice", "expires_at": 1765080000000000000,
                  "path": "features.checkout_v2", "reason": "INC-4711",
                  "set_at": 1765078200000000000, "value": false}]}

It is signed by an operator key (or, for an expiry, the publisher's key) and written by
whoever sets it, straight to Kafka: it works while the publisher daemon is down.
Subscribers compose ``snapshot <- overrides`` themselves and drop an entry at its
`expires_at` by their own clock, whether or not anything publishes the expiry.

Writers of one stream's overrides serialise through a Kafka transactional id of their
own (`override_transactional_id`): each reads the current set after fencing every other
writer of it, so two operators at once never lose one another's entry.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
from opentelemetry import trace

from configbus.bus import (
    CONTENT_TYPE,
    OVERRIDE_CHANNEL,
    SNAPSHOT_CHANNEL,
    Bus,
    ProducerAPI,
    ReaderAPI,
    TopicNames,
)
from configbus.chain import ChainHead
from configbus.crypto import SigningKey, TrustStore
from configbus.errors import ConfigBusError, LimitError, VerificationError
from configbus.events import (
    CLOCK_SKEW_NS,
    MAX_VERSION,
    Cause,
    EventKind,
    VerifiedEvent,
    build_body,
    claimed_version,
    now_ns,
    open_envelope,
    seal,
    shown,
)
from configbus.limits import DEFAULT_LIMITS, Limits
from configbus.ops.trail import (
    as_stream_writer,
    head_from,
    head_key,
    linked,
    read_stream_head,
    send_linked,
    stream_writer_id,
    trail_head,
)
from configbus.telemetry import headers_with_context, tracer
from configbus.tree.layer import Layer, LayerKind
from configbus.tree.resolved import parse_key
from configbus.tree.values import (
    SECRET_KEY,
    FrozenDict,
    Path,
    SecretRef,
    Value,
    format_path,
    freeze_json,
    plain_secret_paths,
)

__all__ = [
    "MAX_ENTRIES",
    "OverrideEntry",
    "OverrideSet",
    "OverrideState",
    "OverrideWrite",
    "all_overrides",
    "check_logged",
    "compose",
    "encode_set",
    "latest_snapshot",
    "layers_of",
    "override_transactional_id",
    "parse_overrides",
    "paths_of",
    "read_overrides",
    "write_overrides",
]

log = logging.getLogger(__name__)

MAX_ENTRIES: Final = 256  # overrides in effect per stream, at most
_READ_BACK: Final = 64  # records of the override channel read to find its latest


class OverrideEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One overridden key: its value, who set it, why, and until when (ns since the epoch)."""

    path: str  # dotted key
    value: Any  # JSON: a scalar, or a list or mapping of them
    set_at: int
    expires_at: int
    actor: str = ""
    reason: str = ""

    def expired(self, now: int) -> bool:
        return self.expires_at <= now

    @property
    def until(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.expires_at / 1e9, datetime.UTC)


class OverrideSet(msgspec.Struct, frozen=True, kw_only=True):
    entries: tuple[OverrideEntry, ...] = ()


_encoder: Final = msgspec.json.Encoder(order="sorted")
_decoder: Final = msgspec.json.Decoder(OverrideSet)


def encode_set(entries: Iterable[OverrideEntry]) -> bytes:
    """The canonical JSON of an override set (sorted keys, compact): what is hashed."""
    return _encoder.encode(OverrideSet(entries=tuple(sorted(entries, key=lambda e: e.path))))


@dataclass(frozen=True, slots=True)
class OverrideState:
    """A verified override record of a stream and its entries."""

    event: VerifiedEvent
    entries: tuple[OverrideEntry, ...]
    values: tuple[tuple[Path, Value], ...] = field(repr=False)  # parsed paths, frozen values

    @property
    def version(self) -> int:
        return self.event.body.version

    def active(self, now: int) -> tuple[OverrideEntry, ...]:
        return tuple(entry for entry in self.entries if not entry.expired(now))

    def active_values(self, now: int) -> tuple[tuple[Path, Value], ...]:
        return tuple(
            item
            for entry, item in zip(self.entries, self.values, strict=True)
            if not entry.expired(now)
        )

    def next_expiry(self, now: int) -> int | None:
        """When the next entry still in effect expires, or None."""
        return min((e.expires_at for e in self.entries if not e.expired(now)), default=None)


def parse_overrides(event: VerifiedEvent, limits: Limits = DEFAULT_LIMITS) -> OverrideState:
    """The entries of a verified override event, checked: each a legal key (no deeper
    than ``limits.depth``, no part starting with ``$``) and a plain value (no secret: no
    secret reference, no plain text under a secret-named key), set no later than the
    event and expiring after it was set but not after the event's own `expires_at`
    (which the signer's max_ttl bounds); at most `MAX_ENTRIES`, and all their values
    together within `limits`. Raises `VerificationError`."""
    body = event.body
    try:
        document = _decoder.decode(event.config_json)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise VerificationError("malformed", f"not an override set ({exc})") from None
    if len(document.entries) > MAX_ENTRIES:
        raise VerificationError(
            "too_large", f"{len(document.entries)} overrides, over {MAX_ENTRIES}"
        )
    values: list[tuple[Path, Value]] = []
    seen: set[Path] = set()
    for entry in document.entries:
        where = f"override {shown(entry.path)}"
        path = parse_key(entry.path)
        if not path or any(part == "" for part in path) or path in seen:
            raise VerificationError("malformed", f"{where}: not a key, or listed twice")
        if len(path) > limits.depth or any(str(part).startswith("$") for part in path):
            raise VerificationError("malformed", f"{where}: too deep, or a part starts with $")
        seen.add(path)
        if body.expires_at is None or entry.expires_at > body.expires_at:
            raise VerificationError("malformed", f"{where}: expires after the override event")
        if not 0 < entry.set_at < entry.expires_at or entry.set_at > body.issued_at:
            raise VerificationError("malformed", f"{where}: set_at out of range")
        if max(len(entry.actor), len(entry.reason)) > limits.text_chars:
            raise VerificationError("too_large", f"{where}: actor or reason too long")
        try:
            value = freeze_json(entry.value, limits, what=where)
        except LimitError as exc:
            raise VerificationError("too_large", str(exc)) from None
        if _holds_secret(entry.value) or any(plain_secret_paths(_nested(path, value))):
            raise VerificationError("malformed", f"{where}: an override cannot set a secret")
        values.append((path, value))
    try:  # every entry within the limits, and all of them together too
        freeze_json([entry.value for entry in document.entries], limits, what="the override set")
    except LimitError as exc:
        raise VerificationError("too_large", str(exc)) from None
    return OverrideState(event, document.entries, tuple(values))


def _nested(path: Path, value: Value) -> Value:
    """`value` at `path` in an otherwise empty mapping."""
    for part in reversed(path):
        value = FrozenDict({str(part): value})
    return value


def check_logged(event: VerifiedEvent, logged_ms: int) -> None:
    """An override must reach its topic about when it says it was issued: its Kafka
    timestamp (`logged_ms`, set by the producer that wrote it) within a minute of its
    `issued_at`. An old record written again by an ordinary producer is refused as
    replayed; a writer that sets record timestamps itself is stopped only by who may
    write the topic. 0 (a record from a disk cache, checked when it first arrived) is
    not checked."""
    if logged_ms <= 0:
        return
    drift_ms = event.body.issued_at // 10**6 - logged_ms
    if drift_ms > CLOCK_SKEW_NS // 10**6:
        raise VerificationError(
            "issued_in_future", f"override issued {drift_ms / 1000:.0f}s after Kafka took it"
        )
    if -drift_ms > CLOCK_SKEW_NS // 10**6:
        raise VerificationError(
            "replayed", f"override issued {-drift_ms / 1000:.0f}s before Kafka took it"
        )


def _holds_secret(value: Any) -> bool:
    if isinstance(value, dict):
        return SECRET_KEY in value or any(_holds_secret(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_secret(v) for v in value)
    return False


def compose(data: Mapping[str, Value], values: Iterable[tuple[Path, Value]]) -> Mapping[str, Value]:
    """`data` with each (path, value) set on top: the override layer, highest. Only the
    mappings along each path are copied; the rest is shared with `data`. An override
    sets a value or adds a key; it never changes the config's shape on the way: a path
    through a list item that is not there, through a value that is not a mapping or
    list, or onto a secret raises `VerificationError` ("malformed")."""
    result = data
    for path, value in values:
        result = _set(result, path, value, path)
    return result


def _set(node: Any, path: Path, value: Value, whole: Path) -> Any:
    head, rest = path[0], path[1:]
    if isinstance(node, SecretRef):
        raise _unfit(whole, "it would replace or reach into a secret")
    if isinstance(node, tuple):
        if not isinstance(head, int) or head >= len(node):
            raise _unfit(whole, f"the list has no item {head}")
        items = list(node)
        items[head] = _set(items[head], rest, value, whole) if rest else value
        return tuple(items)
    if node is not None and not isinstance(node, Mapping):
        raise _unfit(whole, "it goes through a value that is not a mapping")
    key = str(head)
    mapping: Mapping[str, Any] = node if node is not None else FrozenDict()
    child = mapping.get(key)
    if not rest and isinstance(child, SecretRef):
        raise _unfit(whole, "it would replace a secret")
    return FrozenDict({**mapping, key: _set(child, rest, value, whole) if rest else value})


def _unfit(path: Path, why: str) -> VerificationError:
    return VerificationError("malformed", f"override of {format_path(path)} does not fit: {why}")


def layers_of(state: OverrideState, now: int, source: str) -> list[Layer]:
    """The entries in effect as layers (one each, highest last) for `render` and
    `explain`: each names who set it, why and until when."""
    layers = []
    for entry, (path, value) in zip(state.entries, state.values, strict=True):
        if entry.expired(now):
            continue
        data: Any = value
        for part in reversed(path):
            data = FrozenDict({str(part): data})
        name = (
            f"override by {shown(entry.actor or '?', 60, quote=False)} until "
            f"{entry.until:%Y-%m-%d %H:%M:%S}Z: {shown(entry.reason or '-', 80, quote=False)}"
        )
        layers.append(Layer(LayerKind.EMERGENCY, name, f"{source} v{state.version}", data))
    return layers


def override_transactional_id(topics: TopicNames, tenant: str, env: str) -> str:
    """The transactional id every writer of this stream's overrides uses: a writer
    fences the others before it reads, so their writes are serialised. It is the
    stream's operator writer's (configbus/ops/trail.py), whose audit chain they extend."""
    return stream_writer_id(topics, tenant, env)


@dataclass(frozen=True, slots=True)
class _Current:
    state: OverrideState | None  # the latest record that verifies
    skipped: tuple[str, ...] = ()  # newer records that do not, and why
    topic_exists: bool = True
    chain: ChainHead | None = None  # the stream's operator audit chain's head
    chain_lost: bool = False  # head records there, none of which verifies


async def read_overrides(
    bus: Bus,
    topics: TopicNames,
    tenant: str,
    env: str,
    trust: TrustStore,
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> OverrideState | None:
    """The stream's latest override record that verifies, or None when it has none."""
    return (await _read(bus, topics, tenant, env, trust, limits)).state


async def _read(
    bus: Bus, topics: TopicNames, tenant: str, env: str, trust: TrustStore, limits: Limits
) -> _Current:
    """The latest override record that verifies with `trust`: what subscribers with the
    same trust file run. Newer records that do not verify (junk anyone could write,
    forgeries, records those subscribers refused) are skipped and said why; their
    claimed versions count for nothing, so no record can push a writer's next version
    out of reach."""
    reader = bus.reader(topics.tenant_topic(tenant))
    try:
        if not await reader.start():
            return _Current(None, topic_exists=False)
        return await _read_from(reader, topics, tenant, env, trust, limits)
    finally:
        await reader.stop()


async def _read_from(
    reader: ReaderAPI, topics: TopicNames, tenant: str, env: str, trust: TrustStore, limits: Limits
) -> _Current:
    key, head = topics.record_key(env, OVERRIDE_CHANNEL), head_key(topics, env)
    found = await reader.recent_keys((key, head), limit=_READ_BACK)  # one read back
    records, chain = found[key], head_from(found[head], topics, tenant, env, trust)
    lost = chain.seq == 0 and bool(found[head])
    skipped: list[str] = []
    claims = sorted(((claimed_version(r.value), r) for r in records), key=lambda c: -c[0])
    for claimed, record in claims:
        try:
            event = open_envelope(
                record.value or b"",
                trust,
                stream=(tenant, env),
                channel=OVERRIDE_CHANNEL,
                limits=limits,
            )
            state = parse_overrides(event, limits)
            check_logged(event, record.timestamp_ms)
        except VerificationError as exc:
            skipped.append(f"a record claiming v{claimed} at offset {record.offset}: {exc}")
            continue
        return _Current(state, tuple(skipped), chain=chain, chain_lost=lost)
    return _Current(None, tuple(skipped), chain=chain, chain_lost=lost)


@dataclass(frozen=True, slots=True)
class OverrideWrite:
    """What a write did: the version it published (0: nothing to publish), the entries
    now in effect, and those it found expired and dropped."""

    version: int
    entries: tuple[OverrideEntry, ...]
    expired: tuple[OverrideEntry, ...] = ()
    changed: tuple[str, ...] = ()


Change = Callable[[tuple[OverrideEntry, ...], int], tuple[OverrideEntry, ...]]


async def write_overrides(
    bus: Bus,
    topics: TopicNames,
    tenant: str,
    env: str,
    *,
    key: SigningKey,
    trust: TrustStore,
    change: Change,
    cause: Cause,
    limits: Limits = DEFAULT_LIMITS,
    attempts: int = 3,
) -> OverrideWrite:
    """Publish the stream's override set as `change(entries in effect, now)` returns
    it, as the next version of its override channel, on the tenant topic and the audit
    topic in one transaction. Entries found expired are dropped (and named in the
    result). Publishes nothing when the set stays as it is. Raises `ConfigBusError`."""
    topics.tenant_topic(tenant)  # a legal tenant id, or SettingsError

    async def once(producer: ProducerAPI, reader: ReaderAPI) -> OverrideWrite:
        return await _write_once(
            bus, reader, producer, topics, tenant, env, key, trust, change, cause, limits
        )

    return await as_stream_writer(bus, topics, tenant, env, once, attempts=attempts)


async def _write_once(
    bus: Bus,
    reader: ReaderAPI,
    producer: ProducerAPI,
    topics: TopicNames,
    tenant: str,
    env: str,
    key: SigningKey,
    trust: TrustStore,
    change: Change,
    cause: Cause,
    limits: Limits,
) -> OverrideWrite:
    current = await _read_from(reader, topics, tenant, env, trust, limits)
    for why in current.skipped:
        log.warning("%s/%s: skipped %s", tenant, env, why)
    now = now_ns()
    before = current.state.entries if current.state is not None else ()
    kept = tuple(entry for entry in before if not entry.expired(now))
    expired = tuple(entry for entry in before if entry.expired(now))
    entries = tuple(sorted(change(kept, now), key=lambda e: e.path))
    if len(entries) > MAX_ENTRIES:
        raise LimitError(f"{len(entries)} overrides in effect, over the limit of {MAX_ENTRIES}")
    if entries == tuple(sorted(before, key=lambda e: e.path)):
        return OverrideWrite(0, entries)
    old = {entry.path: entry for entry in before}
    new = {entry.path: entry for entry in entries}
    changed = tuple(sorted(p for p in old.keys() | new.keys() if old.get(p) != new.get(p)))
    version = (current.state.version if current.state is not None else 0) + 1
    if version > MAX_VERSION:
        raise LimitError(f"{tenant}/{env}: the override channel is at its last version")
    body = build_body(
        tenant=tenant,
        env=env,
        version=version,
        config_json=encode_set(entries),
        kind=EventKind.OVERRIDE,
        detected_at=now,
        issued_at=now,
        cause=cause,
        changed_paths=changed,
        expires_at=max((entry.expires_at for entry in entries), default=now),
    )
    value = seal(body, key)
    if len(value) > limits.event_bytes:
        raise LimitError(f"the override set is {len(value)} bytes, over event_bytes")
    _check_own(value, trust, tenant, env, limits, entries, key)
    topic = topics.tenant_topic(tenant)
    head = current.chain or await read_stream_head(reader, topics, tenant, env, trust, bus=bus)
    if current.chain_lost:
        head = await trail_head(bus, topics, tenant, env, trust)
    with tracer.start_as_current_span(
        f"override {topic}",
        kind=trace.SpanKind.PRODUCER,
        attributes={
            "messaging.system": "kafka",
            "messaging.destination.name": topic,
            "configbus.tenant": tenant,
            "configbus.env": env,
            "configbus.override_version": version,
        },
    ):
        records, _ = linked(
            head,
            key,
            topics,
            tenant,
            env,
            [
                (topic, topics.record_key(env, OVERRIDE_CHANNEL), value),
                (topics.audit, topics.audit_key(tenant, env), value),
            ],
            headers_with_context((("content-type", CONTENT_TYPE),)),
        )
        await send_linked(producer, records)
    return OverrideWrite(version, entries, expired, changed)


def _check_own(
    value: bytes,
    trust: TrustStore,
    tenant: str,
    env: str,
    limits: Limits,
    entries: tuple[OverrideEntry, ...],
    key: SigningKey,
) -> None:
    """Refuse to publish what subscribers with this trust file would refuse: a writer
    whose key's max_ttl is shorter than an entry it carries over, or whose key the
    trust file does not cover. Nothing is written then."""
    try:
        parse_overrides(
            open_envelope(value, trust, stream=(tenant, env), channel=OVERRIDE_CHANNEL), limits
        )
    except VerificationError as exc:
        if exc.reason == "ttl_too_long":
            last = max(entries, key=lambda e: e.expires_at)
            raise ConfigBusError(
                f"{tenant}/{env}: key {key.kid!r} may not sign an override set that runs "
                f"until {last.until:%Y-%m-%d %H:%M:%S}Z (the override of {last.path} by "
                f"{shown(last.actor or '?', quote=False)}): clear that override first, or "
                "use a key with a longer max_ttl; nothing written"
            ) from None
        raise ConfigBusError(
            f"{tenant}/{env}: subscribers would refuse this override set ({exc}); nothing written"
        ) from None


def paths_of(entries: Iterable[OverrideEntry]) -> str:
    return ", ".join(format_path(parse_key(e.path)) for e in entries)


async def latest_snapshot(
    bus: Bus, topics: TopicNames, tenant: str, env: str, trust: TrustStore
) -> VerifiedEvent | None:
    """The stream's snapshot of the highest version that verifies (what the overrides
    go on top of), or None."""
    reader = bus.reader(topics.tenant_topic(tenant))
    try:
        if not await reader.start():
            return None
        records = await reader.recent(topics.record_key(env), limit=_READ_BACK)
    finally:
        await reader.stop()
    best: VerifiedEvent | None = None
    for record in records:
        try:
            # the snapshot key holds snapshot-channel events only (not an override's)
            event = open_envelope(
                record.value or b"",
                trust,
                stream=(tenant, env),
                channel=SNAPSHOT_CHANNEL,
            )
        except VerificationError:
            continue
        if best is None or event.body.version > best.body.version:
            best = event
    return best


async def all_overrides(
    bus: Bus, topics: TopicNames, tenants: Iterable[str], trust: TrustStore
) -> tuple[dict[tuple[str, str], OverrideState], int]:
    """The latest verified override record of every stream of `tenants` that has one,
    and how many override records did not verify."""
    found: dict[tuple[str, str], OverrideState] = {}
    unverified = 0
    wanted = [topics.tenant_topic(tenant) for tenant in tenants]
    async for record in bus.read_to_end(wanted):
        env, channel = topics.channel_of(record.key)
        tenant = topics.tenant_of(record.topic)
        if channel != OVERRIDE_CHANNEL or tenant is None:
            continue
        try:
            event = open_envelope(
                record.value or b"", trust, stream=(tenant, env), channel=OVERRIDE_CHANNEL
            )
            state = parse_overrides(event)
        except VerificationError:
            unverified += 1
            continue
        known = found.get((tenant, env))
        if known is None or state.version > known.version:
            found[(tenant, env)] = state
    return found, unverified
