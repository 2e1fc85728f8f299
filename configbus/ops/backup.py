"""Backup and restore: everything configbus keeps in Kafka, in one file, and back.

A backup (`backup`) holds, read once with read_committed from one set of end offsets:

- every tenant topic (``<prefix><tenant>``): the latest record of every key, i.e. of
  every channel of every stream (snapshot, override, candidate, rollout, chain head,
  and any channel added later): what compaction keeps, and all a reader needs;
- the state topic: the latest record of every key but the writer's heartbeat
  (``$writer``, which only says who was alive): the streams' heads, which keep versions
  rising, and the publisher's audit chain head;
- the audit topic, whole, in offset order.

Every record is kept byte for byte: key, value, headers and timestamp. Nothing is
re-encoded, dropped or reordered within a topic: audit records carry signed chain links
in a header, and a subscriber refuses an override whose Kafka timestamp is far from
when it says it was issued. Tombstones (records without a value) are left out:
configbus never writes one, and a key whose latest record is one has nothing to restore.

The file, schema 1, is a gzip stream (RFC 1952). Uncompressed, it is a sequence of
frames, each a 4-byte big-endian length and then that many bytes of one msgpack map::

    header  {type: "header", format: "configbus-backup", schema: 1, created_at, configbus,
             source, prefix, state, audit, acks, records, skipped,
             topics: [{name, role, configs, records}, ...]}
    record  {type: "record", topic, offset, timestamp, key, value, headers}   (x records)
    end     {type: "end", records, sha256}

`sha256` is the hex SHA-256 of every uncompressed byte before the end frame (the frames
with their lengths). The records come topic by topic in the order of the header's
`topics` (the tenant topics by name, the audit topic, the state topic), each topic's in
offset order. A file that does not end with an end frame whose count and checksum
match, that has bytes after it, or whose schema is newer than this code's, is refused.
The checksum detects a truncated or damaged file, not a forged one: the signatures
inside do that (`restore` with a trust file). docs/backup.md describes the format for
other readers.

A restore (`restore`) reads the file twice. First whole: its checksum, and with a trust
file every signed record in it, before anything is written; a record that does not
verify refuses the whole restore. Then it creates the topics (tenant and state topics
compacted; the audit topic ``cleanup.policy=delete`` with ``retention.ms=-1``, as the
publisher creates it) and writes the records in their order, with their keys, values,
headers and timestamps, in transactions of its own transactional id
(``configbus-restore.<prefix>``), each acknowledged before it commits.

The state topic is created last, once every other record is committed. A publisher
daemon can write nothing while it is missing (its heartbeat goes there, and only a
daemon that starts creates it); one left running through the loss of the cluster gets
going again only then, and so recovers its versions from complete tenant topics.
Publishers should still be stopped during a restore (docs/backup.md): one that
recovers between the state topic's creation and its records' commit starts a new audit
chain, which ``configbus audit verify`` reports.

It writes only into topics that are empty, or that hold the first records of the
backup and nothing else: a restore that stopped half way is run again and goes on where
it stopped (starting the producer first aborts a transaction it left open). Topics that
hold anything else are named and the restore is refused, unless `force`: then it
writes, after what they hold, only the backup's records they do not hold yet, and
deletes nothing.

    result = await backup(bus, topics, "configbus-2026-01-01.cbk", trust=trust)
    result = await restore(bus, "configbus-2026-01-01.cbk", trust=trust)
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import logging
import os
import struct
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final, Protocol

import msgspec

from configbus.bus import (
    CANDIDATE_CHANNEL,
    CHAIN_CHANNEL,
    OVERRIDE_CHANNEL,
    ROLLOUT_CHANNEL,
    SNAPSHOT_CHANNEL,
    AdminAPI,
    Bus,
    ProducerAPI,
    Record,
    TopicNames,
)
from configbus.chain import CHAIN_HEADER, PUBLISHER_CHAIN_KEY, open_link, record_digest
from configbus.crypto import PUBLISHER, TrustStore
from configbus.errors import BusError, ConfigBusError, SettingsError, VerificationError
from configbus.events import Envelope, check_signature, open_envelope, shown
from configbus.publisher.core import AUDIT_TOPIC_CONFIGS
from configbus.publisher.state import MAX_VERSION, WRITER_KEY, StreamHead

__all__ = [
    "FORMAT",
    "SCHEMA",
    "BackupCheck",
    "BackupResult",
    "Entry",
    "Header",
    "RestoreResult",
    "TopicEntry",
    "Verification",
    "backup",
    "check_backup",
    "read_backup",
    "restore",
    "restore_transactional_id",
]

log = logging.getLogger(__name__)

FORMAT: Final = "configbus-backup"
SCHEMA: Final = 1
STATE, TENANT, AUDIT = "state", "tenant", "audit"  # a topic's role in a backup
BATCH_RECORDS: Final = 1000  # records per restore transaction, at most
BATCH_BYTES: Final = 16 * 1024 * 1024  # bytes of values per restore transaction, at most
MAX_FRAME: Final = 256 * 1024 * 1024  # a frame's length, at most: more is a damaged file
EXAMPLES: Final = 10  # records that do not verify, named one by one, at most
_LENGTH: Final = struct.Struct(">I")
_CHUNK: Final = 1024 * 1024
_STREAM_CHANNELS: Final = (SNAPSHOT_CHANNEL, OVERRIDE_CHANNEL, CANDIDATE_CHANNEL, ROLLOUT_CHANNEL)


class TopicEntry(msgspec.Struct, frozen=True, kw_only=True):
    """A topic in a backup: its role (``state``, ``tenant`` or ``audit``), the configs
    a restore creates it with, and how many of its records the file holds."""

    name: str
    role: str
    configs: dict[str, str]
    records: int


class Header(msgspec.Struct, frozen=True, kw_only=True, tag="header"):
    """The first frame of a backup."""

    format: str
    schema: int
    created_at: int  # ns since the epoch, when the backup began
    configbus: str  # the version that wrote it
    source: str  # the cluster's bootstrap servers, for people
    prefix: str
    state: str
    audit: str
    acks: str  # not backed up; a restore creates it empty
    topics: list[TopicEntry]  # in the order their records follow
    records: int
    skipped: dict[str, int]  # what was left out, by kind: writer_beat, tombstone

    @property
    def topic_names(self) -> TopicNames:
        return TopicNames(prefix=self.prefix, audit=self.audit, acks=self.acks, state=self.state)


class Entry(msgspec.Struct, frozen=True, kw_only=True, tag="record"):
    """One record, exactly as Kafka held it."""

    topic: str
    offset: int  # in the source topic; a restored record gets a new one
    timestamp: int  # ms since the epoch, the record's Kafka timestamp
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]

    def digest(self) -> bytes:
        """What a restore compares a target topic's records with."""
        return _digest(self.key, self.value, self.headers, self.timestamp)


class Trailer(msgspec.Struct, frozen=True, kw_only=True, tag="end"):
    records: int
    sha256: str


class _Probe(msgspec.Struct):
    """The fields of a header every schema keeps."""

    format: str = ""
    schema: int = 0


class _Claims(msgspec.Struct):
    """What a signed body says of when and for whom it was signed (read unverified,
    believed only once its signature verifies)."""

    issued_at: int = 0
    at: int = 0
    tenant: str = ""
    env: str = ""


_encoder: Final = msgspec.msgpack.Encoder()
_probe_decoder: Final = msgspec.msgpack.Decoder(_Probe)
_header_decoder: Final = msgspec.msgpack.Decoder(Header)
_frame_decoder: Final = msgspec.msgpack.Decoder(Entry | Trailer)
_envelope_decoder: Final = msgspec.msgpack.Decoder(Envelope)
_claims_decoder: Final = msgspec.msgpack.Decoder(_Claims)
_head_decoder: Final = msgspec.msgpack.Decoder(StreamHead)


def _digest(
    key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]], timestamp: int
) -> bytes:
    return hashlib.sha256(_encoder.encode((key, value, list(headers), timestamp))).digest()


def restore_transactional_id(topics: TopicNames) -> str:
    """The transactional id restores of these topics write with: a second restore fences
    the first, and aborts the transaction it left open."""
    return f"configbus-restore.{topics.prefix}"


# -- verification -----------------------------------------------------------------------
@dataclass(slots=True)
class Verification:
    """What checking a backup's records with a trust file found. A record verifies when
    its signature does, by a key the trust file lists, in force when the record says it
    was signed (a key retired since still vouches for what it signed before it; a revoked
    key vouches for nothing), with the checks a reader makes of that kind of record.
    `unsigned`: audit notes written before notes were signed; they are restored as
    they are."""

    trusted: bool = False  # whether a trust file was given at all
    verified: int = 0
    unsigned: int = 0
    failed: Counter[str] = field(default_factory=Counter)  # reason -> records
    examples: list[str] = field(default_factory=list)  # the first few, one line each

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        if not self.trusted:
            return "not verified (no trust file)"
        text = f"{self.verified} signed record(s) verified"
        if self.unsigned:
            text += f", {self.unsigned} unsigned audit note(s) kept as they are"
        if self.failed:
            reasons = ", ".join(f"{reason} ({n})" for reason, n in sorted(self.failed.items()))
            text += f"; {sum(self.failed.values())} do not verify: {reasons}"
        return text

    def check(self, entry: Entry, role: str, topics: TopicNames, trust: TrustStore) -> None:
        try:
            if _verify(entry, role, topics, trust):
                self.verified += 1
            else:
                self.unsigned += 1
        except VerificationError as exc:
            self.failed[exc.reason] += 1
            if len(self.examples) < EXAMPLES:
                key = shown((entry.key or b"").decode(errors="replace"), 80)
                self.examples.append(f"{entry.topic}@{entry.offset} key {key}: {exc}")


def _verify(entry: Entry, role: str, topics: TopicNames, trust: TrustStore) -> bool:
    """Verify one record; True when signed, False for an unsigned audit note. Raises
    `VerificationError`."""
    key, value = entry.key or b"", entry.value
    if role == STATE:
        if key == PUBLISHER_CHAIN_KEY:  # as recovery checks it (configbus/publisher/state.py)
            link, trusted = open_link(value, trust)
            if trusted.role != PUBLISHER or link.chain != topics.transactional_id:
                raise VerificationError(
                    "untrusted_scope", f"a chain head of {shown(link.chain)} by {trusted.role}"
                )
        elif key == WRITER_KEY:
            _signed(value, trust)
        else:
            _head(key, value, trust)
        return True
    if role == TENANT:
        tenant = topics.tenant_of(entry.topic) or ""
        env, channel = topics.channel_of(key)
        if channel == CHAIN_CHANNEL:
            link, trusted = open_link(value, trust)
            if link.stream != f"{tenant}/{env}" or not trusted.covers(tenant, env):
                raise VerificationError(
                    "wrong_stream", f"a chain head of {shown(link.stream)} under {tenant}/{env}"
                )
        elif channel in _STREAM_CHANNELS:
            open_envelope(value, trust, stream=(tenant, env), channel=channel, now=_time(value))
        else:  # a channel this version does not know: its signature, at least
            _signed(value, trust, stream=(tenant, env))
        return True
    # The audit topic: events under <tenant>/<env>, notes under <tenant>/<env>/note.
    sealed = dict(entry.headers).get(CHAIN_HEADER)
    if sealed is not None:
        chained, _ = open_link(sealed, trust)
        if chained.digest != record_digest(entry.key, value):
            raise VerificationError("hash_mismatch", "the chain link pins another record")
    tenant, _, rest = key.decode(errors="replace").partition("/")
    env, _, kind = rest.partition("/")
    if kind == "note":
        try:
            _envelope_decoder.decode(value)
        except (msgspec.DecodeError, TypeError, ValueError):
            return sealed is not None  # an unsigned note: vouched for by its link, if any
        _signed(value, trust, stream=(tenant, env))
    elif kind:
        _signed(value, trust, stream=(tenant, env))
    else:
        open_envelope(value, trust, stream=(tenant, env), now=_time(value))
    return True


def _time(value: bytes) -> int | None:
    """When a signed body says it was signed (its `issued_at`, else `at`), or None."""
    try:
        claims = _claims_decoder.decode(_envelope_decoder.decode(value).body)
    except (msgspec.DecodeError, TypeError, ValueError):
        return None
    return claims.issued_at or claims.at or None


def _signed(value: bytes, trust: TrustStore, *, stream: tuple[str, str] | None = None) -> None:
    """An envelope of a kind not checked further: a trusted key's signature, and the
    stream it names (if it names one) within that key's scope and the record's."""
    try:
        envelope = _envelope_decoder.decode(value)
    except (msgspec.DecodeError, TypeError, ValueError):
        raise VerificationError("malformed", "not a signed envelope") from None
    trusted = check_signature(envelope, trust, now=_time(value))
    try:
        claims = _claims_decoder.decode(envelope.body)
    except (msgspec.DecodeError, TypeError, ValueError):
        return
    if claims.tenant or claims.env:
        if not trusted.covers(claims.tenant, claims.env):
            raise VerificationError(
                "untrusted_scope",
                f"key {envelope.kid!r} may not sign for {claims.tenant}/{claims.env}",
            )
        if stream is not None and (claims.tenant, claims.env) != stream:
            raise VerificationError("wrong_stream", f"signed for {claims.tenant}/{claims.env}")


def _head(key: bytes, value: bytes, trust: TrustStore) -> None:
    """A stream head, as recovery checks it (configbus/publisher/state.py)."""
    try:
        envelope = _envelope_decoder.decode(value)
    except (msgspec.DecodeError, TypeError, ValueError):
        raise VerificationError("malformed", "not a signed envelope") from None
    trusted = check_signature(envelope, trust, now=_time(value))
    if trusted.role != PUBLISHER:
        raise VerificationError("untrusted_scope", f"a head signed by an {trusted.role} key")
    try:
        head = _head_decoder.decode(envelope.body)
    except (msgspec.DecodeError, TypeError, ValueError):
        raise VerificationError("malformed", "not a stream head") from None
    if not trusted.covers(head.tenant, head.env):
        raise VerificationError("untrusted_scope", f"key {envelope.kid!r} may not sign this head")
    if key != TopicNames.audit_key(head.tenant, head.env):
        raise VerificationError("wrong_stream", f"a head of {head.tenant}/{head.env}")
    if not 0 < head.version <= MAX_VERSION:
        raise VerificationError("malformed", f"version {head.version} out of range")


# -- the file ---------------------------------------------------------------------------
class _FrameWriter:
    """Frames into a gzip stream, hashing everything until the end frame."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._out = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0)
        self._hash = hashlib.sha256()

    def frame(self, data: bytes) -> None:
        self.raw(_LENGTH.pack(len(data)) + data)

    def raw(self, data: bytes) -> None:
        self._out.write(data)
        self._hash.update(data)

    def finish(self, records: int) -> None:
        end = _encoder.encode(Trailer(records=records, sha256=self._hash.hexdigest()))
        self._out.write(_LENGTH.pack(len(end)) + end)
        self._out.close()


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def _frames(stream: _Readable, hasher: hashlib._Hash) -> Iterator[bytes]:
    """The frames of an uncompressed stream, each hashed before it is yielded (the end
    frame too: the caller checks it against the hash before it)."""
    while True:
        prefix = stream.read(_LENGTH.size)
        if not prefix:
            return
        if len(prefix) < _LENGTH.size:
            raise VerificationError("truncated", "the backup ends inside a frame")
        (length,) = _LENGTH.unpack(prefix)
        if length > MAX_FRAME:
            raise VerificationError("malformed", f"a frame of {length} bytes: not a backup")
        data = stream.read(length)
        if len(data) < length:
            raise VerificationError("truncated", "the backup ends inside a frame")
        yield data
        hasher.update(prefix)
        hasher.update(data)


def read_backup(path: str | os.PathLike[str]) -> Iterator[Header | Entry]:
    """The header, then every record of the backup at `path`, in order; after the last
    record, the end frame is checked. Raises `VerificationError` (not_a_backup,
    unknown_schema, truncated, malformed, checksum_mismatch) as soon as it is known:
    a caller that acts on records must read them all first (`check_backup`)."""
    hasher = hashlib.sha256()
    try:
        with gzip.open(path, "rb") as stream:
            frames = _frames(stream, hasher)
            first = next(frames, None)
            if first is None:
                raise VerificationError("not_a_backup", f"{path} is empty")
            yield _header(first)
            count = 0
            for data in frames:
                try:
                    frame = _frame_decoder.decode(data)
                except (msgspec.DecodeError, TypeError, ValueError) as exc:
                    raise VerificationError("malformed", f"record {count + 1}: {exc}") from None
                if isinstance(frame, Trailer):
                    _trailer(frame, count, hasher, stream)
                    return
                count += 1
                yield frame
            raise VerificationError("truncated", f"no end frame after {count} record(s)")
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        # gzip's own checks: a file cut short, not gzip at all, a damaged stream (CRC)
        if isinstance(exc, EOFError):
            reason = "truncated"
        elif str(exc).startswith("Not a gzipped file"):
            reason = "not_a_backup"
        else:
            reason = "checksum_mismatch"
        raise VerificationError(reason, f"{path}: {exc}") from None
    except OSError as exc:  # no such file, not readable
        raise SettingsError(f"{path}: {exc.strerror or exc}") from None


def _header(data: bytes) -> Header:
    try:
        probe = _probe_decoder.decode(data)
    except (msgspec.DecodeError, TypeError, ValueError):
        raise VerificationError("not_a_backup", "no configbus backup header") from None
    if probe.format != FORMAT:
        raise VerificationError("not_a_backup", "no configbus backup header")
    if probe.schema > SCHEMA:
        raise VerificationError(
            "unknown_schema",
            f"backup schema {probe.schema} is newer than this configbus reads ({SCHEMA}): "
            "restore it with a newer configbus",
        )
    try:
        return _header_decoder.decode(data)
    except (msgspec.DecodeError, TypeError, ValueError) as exc:
        raise VerificationError("malformed", f"backup header: {exc}") from None


def _trailer(trailer: Trailer, count: int, hasher: hashlib._Hash, stream: _Readable) -> None:
    if trailer.records != count or trailer.sha256 != hasher.hexdigest():
        raise VerificationError(
            "checksum_mismatch",
            f"the backup was altered or damaged: its end says {trailer.records} record(s) "
            f"and sha256 {trailer.sha256[:16]}..., its content {count} and "
            f"{hasher.hexdigest()[:16]}...",
        )
    if stream.read(1):
        raise VerificationError("checksum_mismatch", "bytes follow the backup's end frame")


# -- backup -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BackupResult:
    """A backup written: where, what it holds (`header`), its size, and what checking
    its records with a trust file found (`verification.trusted` False: not checked)."""

    path: Path
    header: Header
    size: int
    verification: Verification

    def summary(self) -> str:
        counts = _counts(self.header, {t.name: t.records for t in self.header.topics})
        return f"backed up {counts} to {self.path} ({self.size} bytes)"


async def backup(
    bus: Bus,
    topics: TopicNames,
    output: str | os.PathLike[str],
    *,
    trust: TrustStore | None = None,
    source: str = "",
    max_seconds: float = 600.0,
) -> BackupResult:
    """Write a backup of `topics` on `bus` to `output` (see the module doc), replacing
    it only once complete (a failed backup leaves the previous file as it was); readable
    by its owner only. With `trust`, every record is verified too: the file keeps the
    ones that do not verify as well (a backup is a copy, not a filter), and
    `verification` names them. Raises `BusError` when Kafka fails, `ConfigBusError`
    when the cluster holds no topic of `topics`."""
    created_at = time.time_ns()
    admin = bus.admin()
    await admin.start()
    try:
        existing = await admin.topics()
        tenant_topics = sorted(t for t in existing if topics.tenant_of(t) is not None)
        roles = dict.fromkeys(tenant_topics, TENANT)
        for name, role in ((topics.state, STATE), (topics.audit, AUDIT)):
            if name in existing:
                roles[name] = role
        if not roles:
            raise ConfigBusError(
                f"nothing to back up: the cluster has no topic of prefix {topics.prefix!r}, "
                f"no {topics.state} and no {topics.audit} (are the cluster and "
                "--topic-prefix right?)"
            )
        limits = {name: await admin.max_message_bytes(name) for name in roles}
    finally:
        await admin.stop()
    order = [*tenant_topics, topics.audit, topics.state]  # the state topic restored last
    order = [name for name in order if name in roles]
    latest: dict[str, dict[bytes | None, Record]] = {name: {} for name in roles}
    audit = 0
    skipped: Counter[str] = Counter()
    verification = Verification(trusted=trust is not None)
    target = Path(output)
    with tempfile.TemporaryFile(dir=target.parent or None) as spool:
        # One read of every topic, from one set of end offsets: as near a consistent
        # cut across topics as Kafka offers (each transaction is in all or none of them).
        reading = bus.read_to_end(order, max_seconds=max_seconds)
        async with contextlib.aclosing(reading) as records:
            async for record in records:
                if roles[record.topic] != AUDIT:
                    latest[record.topic][record.key] = record
                elif record.value is None:
                    skipped["tombstone"] += 1
                else:
                    entry = _entry(record, record.value)
                    if trust is not None:
                        verification.check(entry, AUDIT, topics, trust)
                    data = _encoder.encode(entry)
                    spool.write(_LENGTH.pack(len(data)) + data)
                    audit += 1
        kept: dict[str, list[Entry]] = {}
        for name, by_key in latest.items():
            if roles[name] == AUDIT:
                continue
            entries = []
            for record in sorted(by_key.values(), key=lambda r: r.offset):
                if roles[name] == STATE and record.key == WRITER_KEY:
                    skipped["writer_beat"] += 1
                elif record.value is None:
                    skipped["tombstone"] += 1
                else:
                    entry = _entry(record, record.value)
                    if trust is not None:
                        verification.check(entry, roles[name], topics, trust)
                    entries.append(entry)
            kept[name] = entries
        counts = {name: len(kept[name]) if name in kept else audit for name in order}
        header = Header(
            format=FORMAT,
            schema=SCHEMA,
            created_at=created_at,
            configbus=_version(),
            source=source,
            prefix=topics.prefix,
            state=topics.state,
            audit=topics.audit,
            acks=topics.acks,
            topics=[
                TopicEntry(
                    name=name,
                    role=roles[name],
                    configs=_configs(roles[name], limits[name]),
                    records=counts[name],
                )
                for name in order
            ],
            records=sum(counts.values()),
            skipped=dict(skipped),
        )
        spool.seek(0)
        size = await asyncio.to_thread(_write, target, header, kept, spool)
    result = BackupResult(target, header, size, verification)
    log.info("%s", result.summary())
    return result


def _entry(record: Record, value: bytes) -> Entry:
    return Entry(
        topic=record.topic,
        offset=record.offset,
        timestamp=record.timestamp_ms,
        key=record.key,
        value=value,
        headers=list(record.headers),
    )


def _configs(role: str, max_message_bytes: int | None) -> dict[str, str]:
    """The topic configs a restore creates the topic with."""
    configs = {"cleanup.policy": "delete" if role == AUDIT else "compact"}
    if role == AUDIT:
        configs.update(AUDIT_TOPIC_CONFIGS)
    if max_message_bytes is not None:
        configs["max.message.bytes"] = str(max_message_bytes)
    return configs


def _version() -> str:
    from configbus import __version__

    return __version__


def _write(target: Path, header: Header, kept: Mapping[str, list[Entry]], spool: IO[bytes]) -> int:
    """The file: written beside `target` and renamed over it once complete and synced;
    returns its size."""
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as raw:
            writer = _FrameWriter(raw)
            writer.frame(_encoder.encode(header))
            for entry in header.topics:
                if entry.role == AUDIT:
                    while chunk := spool.read(_CHUNK):  # already framed
                        writer.raw(chunk)
                else:
                    for record in kept[entry.name]:
                        writer.frame(_encoder.encode(record))
            writer.finish(header.records)
            raw.flush()
            os.fsync(raw.fileno())
            size = raw.tell()
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError):  # the rename itself, durable
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    return size


# -- checking a backup --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class BackupCheck:
    """A backup read whole and found complete: its header, each topic's record digests
    in order (what a restore compares a target topic with), and what checking its
    records with a trust file found."""

    header: Header
    digests: dict[str, list[bytes]]
    verification: Verification

    def summary(self) -> str:
        taken = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.header.created_at / 1e9))
        counts = _counts(self.header, {t.name: len(d) for t, d in self._pairs()})
        source = f" from {self.header.source}" if self.header.source else ""
        return f"backup of {taken}{source}: {counts}; checksum ok"

    def _pairs(self) -> list[tuple[TopicEntry, list[bytes]]]:
        return [(t, self.digests[t.name]) for t in self.header.topics]


def check_backup(path: str | os.PathLike[str], trust: TrustStore | None = None) -> BackupCheck:
    """Read the backup at `path` whole: complete, unaltered (its checksum), of a schema
    this code reads, its records those its header announces; and with `trust`, each
    record verified (`verification` says which do not). Raises `VerificationError` for
    a file that is none of these."""
    frames = read_backup(path)
    header = next(frames)
    if not isinstance(header, Header):  # pragma: no cover - read_backup yields it first
        raise VerificationError("malformed", "no header")
    roles = {entry.name: entry.role for entry in header.topics}
    if len(roles) != len(header.topics) or not set(roles.values()) <= {STATE, TENANT, AUDIT}:
        raise VerificationError("malformed", "the header's topics are not a backup's")
    topics = _names(header)
    digests: dict[str, list[bytes]] = {name: [] for name in roles}
    verification = Verification(trusted=trust is not None)
    order = [entry.name for entry in header.topics]
    at = 0  # the topic records come from now: they follow the header's order
    for entry in frames:
        if not isinstance(entry, Entry):  # pragma: no cover - only the first is a header
            raise VerificationError("malformed", "a second header")
        while at < len(order) and order[at] != entry.topic:
            at += 1
        if at == len(order):
            raise VerificationError(
                "malformed", f"a record of {shown(entry.topic)} out of the header's order"
            )
        if trust is not None:
            verification.check(entry, roles[entry.topic], topics, trust)
        digests[entry.topic].append(entry.digest())
    for topic_entry in header.topics:
        if len(digests[topic_entry.name]) != topic_entry.records:
            raise VerificationError(
                "malformed",
                f"{topic_entry.name}: {len(digests[topic_entry.name])} record(s), the header "
                f"says {topic_entry.records}",
            )
    return BackupCheck(header, digests, verification)


def _names(header: Header) -> TopicNames:
    try:
        return header.topic_names
    except SettingsError as exc:
        raise VerificationError("malformed", f"the header's topic names: {exc}") from None


def _counts(header: Header, records: Mapping[str, int]) -> str:
    """``12 records: state 3, 2 tenant topics 4, audit 5``."""
    by_role: Counter[str] = Counter()
    tenant_topics = 0
    for entry in header.topics:
        by_role[entry.role] += records.get(entry.name, 0)
        tenant_topics += entry.role == TENANT
    parts = [f"state {by_role[STATE]}", f"{tenant_topics} tenant topic(s) {by_role[TENANT]}"]
    parts.append(f"audit {by_role[AUDIT]}")
    return f"{sum(records.values())} record(s): {', '.join(parts)}"


# -- restore ----------------------------------------------------------------------------
@dataclass(slots=True)
class _Target:
    """What a target topic holds, compared with the backup's records for it."""

    held: int = 0
    prefix: int = 0  # its first records that are the backup's first, in order
    foreign: bool = False  # it holds a record past that prefix
    present: set[bytes] = field(default_factory=set)  # digests of all it holds


@dataclass(slots=True)
class RestoreResult:
    """What a restore did (or, `dry_run`, would do): per topic, the records written and
    those it held already; the topics created; the transactions committed."""

    check: BackupCheck
    dry_run: bool = False
    created: list[str] = field(default_factory=list)
    written: dict[str, int] = field(default_factory=dict)
    present: dict[str, int] = field(default_factory=dict)  # backup records held already
    foreign: dict[str, int] = field(default_factory=dict)  # records held not in the backup
    transactions: int = 0

    @property
    def header(self) -> Header:
        return self.check.header

    def summary(self) -> str:
        verb = "would restore" if self.dry_run else "restored"
        text = f"{verb} {_counts(self.header, self.written)}"
        if self.transactions:
            text += f" in {self.transactions} transaction(s)"
        held = sum(self.present.values())
        if held:
            text += f"; {held} record(s) were there already"
        if self.foreign:
            text += (
                f"; written after {sum(self.foreign.values())} record(s) not in the backup "
                f"in {len(self.foreign)} topic(s) (--force)"
            )
        return text


async def restore(
    bus: Bus,
    path: str | os.PathLike[str],
    *,
    trust: TrustStore | None = None,
    force: bool = False,
    dry_run: bool = False,
    topics: TopicNames | None = None,
    max_seconds: float = 600.0,
    batch_records: int = BATCH_RECORDS,
    checked: BackupCheck | None = None,
) -> RestoreResult:
    """Restore the backup at `path` onto `bus` (see the module doc). Nothing is written
    when the file is incomplete or altered (`VerificationError`), when `trust` is given
    and any signed record does not verify with it (`VerificationError`, reason
    ``untrusted_backup``), when `topics` is given and names other topics than the
    backup's (`SettingsError`), or when a target topic holds records that are not the
    backup's first ones, unless `force` (`ConfigBusError` naming them). `dry_run`:
    check all that, write nothing. `checked`: what `check_backup(path, trust)` returned,
    when the caller has read the file already."""
    check = checked if checked is not None else await asyncio.to_thread(check_backup, path, trust)
    header = check.header
    if trust is not None and not check.verification.ok:
        first = check.verification.examples[0] if check.verification.examples else ""
        raise VerificationError(
            "untrusted_backup",
            f"{check.verification.summary()}; nothing was restored (first: {first})",
        )
    names = _names(header)
    if topics is not None and (topics.prefix, topics.state, topics.audit) != (
        names.prefix,
        names.state,
        names.audit,
    ):
        raise SettingsError(
            f"the backup holds prefix {names.prefix!r}, state topic {names.state!r} and audit "
            f"topic {names.audit!r}, not {topics.prefix!r}, {topics.state!r} and "
            f"{topics.audit!r}: a restore writes the topics it backed up, under their names"
        )
    result = RestoreResult(check, dry_run=dry_run)
    producer = None if dry_run else bus.producer(transactional_id=restore_transactional_id(names))
    admin = bus.admin()
    try:
        if producer is not None:
            await producer.start()  # fences an earlier restore, aborting what it left open
        await admin.start()
        existing = await admin.topics()
        targets = await _targets(bus, check, existing, force, max_seconds)
        _refuse_foreign(header, targets, force)
        skip: dict[str, int | set[bytes]] = {}
        for entry in header.topics:
            target = targets.get(entry.name, _Target())
            if target.foreign:
                result.foreign[entry.name] = target.held - len(
                    target.present & set(check.digests[entry.name])
                )
                skip[entry.name] = target.present
            else:
                skip[entry.name] = target.prefix
            wanted = check.digests[entry.name]
            present = (
                sum(1 for d in wanted if d in target.present) if target.foreign else target.prefix
            )
            result.present[entry.name] = present
            result.written[entry.name] = len(wanted) - present
        if dry_run or producer is None:
            result.created = sorted({t.name for t in header.topics} - existing)
            return result
        others = [entry for entry in header.topics if entry.name != header.state]
        result.created = await _create(admin, header, others, existing, acks=True)
        await producer.track_topics([entry.name for entry in others])

        async def create_state() -> None:
            last = [entry for entry in header.topics if entry.name == header.state]
            result.created = sorted(
                [*result.created, *await _create(admin, header, last, existing)]
            )
            await producer.track_topics([entry.name for entry in last])

        result.transactions = await _write_records(
            producer, path, check, skip, batch_records, result, create_state
        )
    finally:
        await admin.stop()
        if producer is not None:
            await producer.stop()
    log.info("%s", result.summary())
    return result


async def _targets(
    bus: Bus, check: BackupCheck, existing: set[str], force: bool, max_seconds: float
) -> dict[str, _Target]:
    """What each target topic that exists holds, compared with the backup."""
    wanted = [entry.name for entry in check.header.topics if entry.name in existing]
    targets = {name: _Target() for name in wanted}
    if not wanted:
        return targets
    async with contextlib.aclosing(bus.read_to_end(wanted, max_seconds=max_seconds)) as records:
        async for record in records:
            target = targets[record.topic]
            digest = _digest(record.key, record.value, record.headers, record.timestamp_ms)
            ours = check.digests[record.topic]
            if not target.foreign and target.prefix == target.held:
                if target.held < len(ours) and ours[target.held] == digest:
                    target.prefix += 1
                else:
                    target.foreign = True
            else:
                target.foreign = True
            target.held += 1
            if force:
                target.present.add(digest)
    return targets


def _refuse_foreign(header: Header, targets: Mapping[str, _Target], force: bool) -> None:
    foreign = {name: t for name, t in targets.items() if t.foreign}
    if not foreign or force:
        return
    named = ", ".join(f"{name} ({t.held - t.prefix} record(s))" for name, t in foreign.items())
    hint = ""
    if header.state in foreign:
        hint = " (a publisher has written to this cluster: stop every publisher first)"
    raise ConfigBusError(
        f"refused: topics hold records that are not this backup's: {named}{hint}. Is this "
        "the cluster to restore? Restore into an empty cluster, or give --force to add the "
        "backup's records after what they hold (nothing is deleted)"
    )


async def _create(
    admin: AdminAPI,
    header: Header,
    entries: Sequence[TopicEntry],
    existing: set[str],
    *,
    acks: bool = False,
) -> list[str]:
    """Create the topics of `entries` that do not exist, with their configs; and with
    `acks` the acks topic (empty: subscribers' acks flow before a publisher starts)."""
    groups: dict[tuple[bool, tuple[tuple[str, str], ...]], list[str]] = {}
    for entry in entries:
        if entry.name not in existing:
            configs = tuple(sorted(_restored_configs(entry).items()))
            groups.setdefault((entry.role != AUDIT, configs), []).append(entry.name)
    created: list[str] = []
    for (compact, configs), names in groups.items():
        created += await admin.ensure_topics(names, compact=compact, configs=dict(configs))
    if acks and header.acks not in existing:
        created += await admin.ensure_topics([header.acks], compact=True)
    return sorted(created)


def _restored_configs(entry: TopicEntry) -> dict[str, str]:
    """What a topic is created with: its role's cleanup policy (and for the audit
    topic, records that never expire), and the size limit it had."""
    configs = _configs(entry.role, None)
    size = entry.configs.get("max.message.bytes", "")
    if size.isdigit():
        configs["max.message.bytes"] = size
    return configs


async def _write_records(
    producer: ProducerAPI,
    path: str | os.PathLike[str],
    check: BackupCheck,
    skip: Mapping[str, int | set[bytes]],
    batch_records: int,
    result: RestoreResult,
    create_state: Callable[[], Awaitable[None]],
) -> int:
    """Send the records to restore, in the file's order, in transactions; returns how
    many committed. Each record is compared with what the first read found, so only
    what was checked (and verified) is written, even if the file changes meanwhile.
    The state topic's records come last: `create_state` makes it once every record
    before them is committed."""
    transactions, done, total = 0, 0, sum(result.written.values())
    batch: list[Entry] = []
    size = 0
    index: Counter[str] = Counter()
    state_made = False
    frames = read_backup(path)
    next(frames)  # the header, read already
    try:
        for entry in frames:
            if not isinstance(entry, Entry):  # pragma: no cover - only the first is a header
                continue
            if entry.topic == check.header.state and not state_made:
                if batch:
                    await _send(producer, batch)
                    transactions, done = transactions + 1, done + len(batch)
                    batch, size = [], 0
                await create_state()
                state_made = True
            at = index[entry.topic]
            index[entry.topic] += 1
            digest = entry.digest()
            if at >= len(check.digests[entry.topic]) or check.digests[entry.topic][at] != digest:
                raise VerificationError(
                    "checksum_mismatch", f"{path} changed while it was being restored"
                )
            rule = skip[entry.topic]
            if digest in rule if isinstance(rule, set) else at < rule:
                continue
            batch.append(entry)
            size += len(entry.value)
            if len(batch) >= batch_records or size >= BATCH_BYTES:
                await _send(producer, batch)
                transactions, done = transactions + 1, done + len(batch)
                batch, size = [], 0
                log.info("restored %d of %d record(s)", done, total)
        if batch:
            await _send(producer, batch)
            transactions += 1
        if not state_made:  # the backup holds no record of the state topic
            await create_state()
    except BusError as exc:
        raise type(exc)(
            f"{exc} (after {done} of {total} record(s) restored: run the same restore again "
            "to go on from there)"
        ) from exc
    return transactions


async def _send(producer: ProducerAPI, batch: Sequence[Entry]) -> None:
    """One transaction: every record of `batch`, each acknowledged before the commit."""
    async with producer.transaction():
        acks = [
            await producer.send(
                entry.topic,
                entry.value,
                key=entry.key,
                headers=tuple(entry.headers),
                timestamp_ms=entry.timestamp,
            )
            for entry in batch
        ]
        await asyncio.gather(*acks)
