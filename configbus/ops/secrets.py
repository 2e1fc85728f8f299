"""Operators' secrets: set, rotate, retire, re-key and re-wrap sealed secrets, and the
gate that retires an old version only once every live instance runs the new one.

A secret's records live in a `SecretBook`: the tree (`TreeBook`, files safe to commit)
or the Redis tenant store (`StoreBook`). Writing a book is all an operator does; the
daemon sees the change (a file or a store notification) and publishes every stream
whose config references the secret, with the new version's ciphertext beside the
reference. Nothing here holds a plaintext longer than the call that seals or opens it,
and no error names a value.

Rotation keeps the previous version live. `fleet_has` then answers "has every live
instance of every stream that uses the secret applied a config carrying the new
version?" from Kafka alone: the streams' verified snapshots say from which version on
the new one travels; the acks topic says what each instance applied, and which
instances stopped on purpose (an ack of status ``stopped``) or fell silent for longer
than the instance TTL. Only then is the old version retired.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import os
import secrets as _random
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from redis.exceptions import RedisError

from configbus.bus import SNAPSHOT_CHANNEL, Bus, TopicNames
from configbus.crypto import KeyProvider, SigningKey, TrustStore
from configbus.crypto.secrets import (
    SealedSecret,
    data_key_of,
    open_secret,
    rewrap,
    seal_secret,
)
from configbus.errors import BusError, SecretError, VerificationError
from configbus.events import Ack, AuditNote, open_envelope, seal_note, shown
from configbus.ops.trail import write_chained
from configbus.store import TenantStore
from configbus.tree.sealed import (
    SecretRecord,
    read_secrets_file,
    secrets_file,
    write_secrets_file,
)
from configbus.tree.values import SECRET_KEY, SecretRef, freeze_json, sealed_version

__all__ = [
    "FleetCheck",
    "Holdout",
    "SecretBook",
    "StoreBook",
    "TreeBook",
    "audit_read",
    "certificate_expiry",
    "fleet_has",
    "generate_value",
    "rekey",
    "retire",
    "rewrap_all",
    "set_secret",
    "wait_for_fleet",
]

Stream = tuple[str, str]
_ack_decoder = msgspec.msgpack.Decoder(Ack)
_READ_BACK = 256  # snapshot records of a stream looked at for the first carrying a version


class SecretBook(Protocol):
    """Where a stream's sealed secrets are kept."""

    @property
    def where(self) -> str: ...

    @property
    def shared(self) -> bool:
        """Whether every daemon sees the same records (the store), not a checkout of
        its own (the tree): only then may a daemon write them on its own."""
        ...

    def locked(self, tenant: str, env: str) -> AbstractAsyncContextManager[None]:
        """Held around a read-change-write of the stream's records: two writers (an
        operator and the daemon's policy) never number two values alike."""
        ...

    async def read(self, tenant: str, env: str) -> dict[str, SecretRecord]: ...

    async def write(
        self,
        tenant: str,
        env: str,
        records: Sequence[SecretRecord],
        *,
        removed: Sequence[str] = (),
        actor: str = "",
        reason: str = "",
    ) -> None: ...


class TreeBook:
    """Sealed secrets in the tree: ``tenants/<tenant>/secrets/<env>.yml``. The actor
    and reason go in the commit that carries the file (the daemon credits its author)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    @property
    def where(self) -> str:
        return f"the tree at {self.root}"

    @property
    def shared(self) -> bool:
        return False

    def path(self, tenant: str, env: str) -> Path:
        return secrets_file(self.root, tenant, env)

    @contextlib.asynccontextmanager
    async def locked(self, tenant: str, env: str) -> AsyncIterator[None]:
        """An exclusive lock on the stream's secrets folder (flock, so it ends with the
        process that held it)."""
        folder = self.path(tenant, env).parent
        folder.mkdir(parents=True, exist_ok=True)
        handle = os.open(folder, os.O_RDONLY)
        try:
            await asyncio.to_thread(fcntl.flock, handle, fcntl.LOCK_EX)
            yield
        finally:
            os.close(handle)  # closing drops the lock

    async def read(self, tenant: str, env: str) -> dict[str, SecretRecord]:
        return read_secrets_file(self.path(tenant, env))

    async def write(
        self,
        tenant: str,
        env: str,
        records: Sequence[SecretRecord],
        *,
        removed: Sequence[str] = (),
        actor: str = "",
        reason: str = "",
    ) -> None:
        path = self.path(tenant, env)
        known = read_secrets_file(path)
        for name in removed:
            known.pop(name, None)
        known.update({record.name: record for record in records})
        write_secrets_file(path, f"{tenant}/{env}", known)


class StoreBook:
    """Sealed secrets in the Redis tenant store (a started `TenantStore`); the write
    carries its actor and reason, which the daemon's next publication cites."""

    def __init__(self, store: TenantStore) -> None:
        self.store = store

    @property
    def where(self) -> str:
        return repr(self.store)

    @property
    def shared(self) -> bool:
        return True

    @contextlib.asynccontextmanager
    async def locked(self, tenant: str, env: str) -> AsyncIterator[None]:
        """A Redis lock per stream, given up after 30 s if its holder died."""
        name = f"{self.store.prefix}secrets-lock:{tenant}:{env}"
        lock = self.store.redis.lock(name, timeout=30, blocking_timeout=30)
        try:
            acquired = await lock.acquire()
        except RedisError as exc:
            raise BusError(f"redis: {exc}") from exc
        if not acquired:
            raise SecretError(f"{tenant}/{env}: another secret write holds the lock; retry")
        try:
            yield
        finally:
            with contextlib.suppress(RedisError):
                await lock.release()

    async def read(self, tenant: str, env: str) -> dict[str, SecretRecord]:
        return await self.store.secrets(tenant, env)

    async def write(
        self,
        tenant: str,
        env: str,
        records: Sequence[SecretRecord],
        *,
        removed: Sequence[str] = (),
        actor: str = "",
        reason: str = "",
    ) -> None:
        await self.store.put_secrets(
            tenant, env, records, removed=removed, actor=actor, reason=reason
        )


# -- values ------------------------------------------------------------------------------
def generate_value(size: int) -> bytes:
    """A random secret of `size` random bytes, as URL-safe base64 text (no padding),
    usable as a password or token as it is."""
    if not 16 <= size <= 4096:
        raise SecretError(f"--generate {size}: give 16 to 4096 bytes")
    return base64.urlsafe_b64encode(_random.token_bytes(size)).rstrip(b"=")


def certificate_expiry(value: bytes) -> int:
    """A PEM certificate's (or a bundle's first certificate's) notAfter in ns; 0 when
    `value` holds no certificate. `SecretError` when it claims one that does not parse."""
    marker = b"-----BEGIN CERTIFICATE-----"
    start = value.find(marker)
    if start < 0:
        return 0
    try:
        certificate = x509.load_pem_x509_certificate(value[start:])
    except ValueError:
        raise SecretError("the value holds a PEM certificate that does not parse") from None
    return int(certificate.not_valid_after_utc.timestamp()) * 1_000_000_000


def _stream_data_key(
    provider: KeyProvider, tenant: str, env: str, records: Mapping[str, SecretRecord]
) -> tuple[bytes, tuple[str, bytes]] | tuple[None, None]:
    """The stream's data key, unwrapped from its newest sealed value, and that value's
    wrapping of it; None when the stream has none yet (the first secret makes one)."""
    for record in records.values():
        sealed = SealedSecret.decode(record.versions[0])
        key = data_key_of(provider, tenant, env, sealed)
        return key, (sealed.kek_id, sealed.wrapped_key)
    return None, None


async def set_secret(
    book: SecretBook,
    provider: KeyProvider,
    tenant: str,
    env: str,
    name: str,
    value: bytes,
    *,
    actor: str = "",
    reason: str = "",
    rotate_every: int | None = None,
    generate: int | None = None,
    now: int | None = None,
) -> SecretRecord:
    """Seal `value` as the secret's next version (1 for a new secret) with the stream's
    data key, keep the versions before it live, and write the book. Returns the record."""
    if not value:
        raise SecretError(f"secret {name!r} of {tenant}/{env}: the value is empty")
    now = now if now is not None else time.time_ns()
    async with book.locked(tenant, env):
        return await _set(book, provider, tenant, env, name, value, actor, reason,
                          rotate_every, generate, now)  # fmt: skip


async def _set(
    book: SecretBook,
    provider: KeyProvider,
    tenant: str,
    env: str,
    name: str,
    value: bytes,
    actor: str,
    reason: str,
    rotate_every: int | None,
    generate: int | None,
    now: int,
) -> SecretRecord:
    records = await book.read(tenant, env)
    known = records.get(name)
    version = known.version + 1 if known is not None else 1
    data_key, wrapping = _stream_data_key(provider, tenant, env, records)
    text = seal_secret(
        provider, tenant, env, name, version, value, data_key=data_key, wrapping=wrapping
    ).encode()
    expiry = certificate_expiry(value)
    if known is None:
        record = SecretRecord(name, (text,), created=now, rotated=now)
    else:
        record = known.with_version(text, now)
    record = replace(
        record,
        not_after=expiry,
        rotate_every=record.rotate_every if rotate_every is None else rotate_every,
        generate=record.generate if generate is None else generate,
    )
    if record.rotate_every and not record.generate:
        raise SecretError(
            f"secret {name!r}: rotate_every needs a generated value (--generate BYTES)"
        )
    await book.write(tenant, env, [record], actor=actor, reason=reason)
    return record


async def retire(
    book: SecretBook,
    tenant: str,
    env: str,
    name: str,
    *,
    through: int | None = None,
    actor: str = "",
    reason: str = "",
) -> tuple[int, ...]:
    """Drop the versions of the secret older than `through` (the version the fleet was
    checked for; default the newest); returns the versions dropped. A version written
    since the check, and the one checked, stay."""
    async with book.locked(tenant, env):
        record = (await book.read(tenant, env)).get(name)
        if record is None:
            raise SecretError(f"{tenant}/{env} has no secret {name!r}")
        keep = record.version if through is None else through
        kept = tuple(t for t in record.versions if sealed_version(t) >= keep)
        dropped = tuple(v for v in record.live_versions if v < keep)
        if dropped and kept:
            await book.write(
                tenant, env, [replace(record, versions=kept)], actor=actor, reason=reason
            )
        return dropped if kept else ()


async def rekey(
    book: SecretBook,
    provider: KeyProvider,
    tenant: str,
    env: str,
    *,
    actor: str = "",
    reason: str = "",
) -> int:
    """A new data key for the stream: every live version of every secret is opened and
    sealed again under it, with its version unchanged. An instance that still runs the
    old ciphertext opens it as before (its data key is wrapped in it). Returns the
    number of values sealed again."""
    async with book.locked(tenant, env):
        records = await book.read(tenant, env)
        data_key = AESGCM.generate_key(bit_length=256)
        wrapping: tuple[str, bytes] | None = None  # wrapped once, by the first seal
        changed, count = [], 0
        for name, record in records.items():
            texts = []
            for text in record.versions:
                sealed = SealedSecret.decode(text, what=f"secret {name!r}")
                value = open_secret(provider, tenant, env, name, sealed)
                again = seal_secret(
                    provider,
                    tenant,
                    env,
                    name,
                    sealed.version,
                    value,
                    data_key=data_key,
                    wrapping=wrapping,
                )
                wrapping = (again.kek_id, again.wrapped_key)
                texts.append(again.encode())
                count += 1
            changed.append(replace(record, versions=tuple(texts)))
        if changed:
            await book.write(tenant, env, changed, actor=actor, reason=reason)
        return count


async def rewrap_all(
    book: SecretBook,
    provider: KeyProvider,
    tenant: str,
    env: str,
    *,
    actor: str = "",
    reason: str = "",
) -> int:
    """The stream's data key wrapped again by the tenant's current key-encryption key
    (KEK rotation), in every sealed value; the ciphertexts stay as they are. Services
    must hold the new KEK before (and may drop the old one once every instance runs
    the re-wrapped values). Returns the number of values re-wrapped."""
    async with book.locked(tenant, env):
        records = await book.read(tenant, env)
        changed, count = [], 0
        done: dict[tuple[str, bytes], SealedSecret] = {}  # a shared wrapping stays shared
        for name, record in records.items():
            texts = []
            for text in record.versions:
                sealed = SealedSecret.decode(text, what=f"secret {name!r}")
                known = (sealed.kek_id, sealed.wrapped_key)
                if known not in done:
                    done[known] = rewrap(provider, tenant, env, sealed)
                new = done[known]
                texts.append(
                    replace(sealed, kek_id=new.kek_id, wrapped_key=new.wrapped_key).encode()
                )
                count += 1
            changed.append(replace(record, versions=tuple(texts)))
        if changed:
            await book.write(tenant, env, changed, actor=actor, reason=reason)
        return count


# -- the fleet gate ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Holdout:
    """An instance (or a stream) that does not run the new version yet, and why."""

    tenant: str
    env: str
    instance: str  # "" when the stream itself is not there yet
    service: str
    why: str

    def __str__(self) -> str:
        who = f"{self.instance} ({self.service})" if self.instance else "(the stream)"
        return f"{self.tenant}/{self.env} {who}: {self.why}"


@dataclass(slots=True)
class FleetCheck:
    """Where the fleet stands for one version of one secret."""

    name: str
    version: int
    targets: dict[Stream, int] = field(default_factory=dict)  # stream -> first version carrying it
    holdouts: list[Holdout] = field(default_factory=list)
    instances: int = 0  # live instances checked

    @property
    def ready(self) -> bool:
        return not self.holdouts


async def fleet_has(
    bus: Bus,
    topics: TopicNames,
    trust: TrustStore,
    streams: Iterable[Stream] | Mapping[Stream, int],
    name: str,
    version: int,
    *,
    instance_ttl: float = 86400.0,
) -> FleetCheck:
    """Whether every live instance of every stream in `streams` that uses secret `name`
    has applied a config carrying `version` of it (or a later one); `streams` may map
    each stream to a version of its own (an environment-wide secret's versions differ
    between tenants). A stream whose latest snapshot does not reference the secret
    does not use it; one whose snapshots do not carry the version yet (the daemon has
    not published it) holds the rotation."""
    check = FleetCheck(name, version)
    needed = dict(streams) if isinstance(streams, Mapping) else dict.fromkeys(streams, version)
    for (tenant, env), wanted in sorted(needed.items()):
        target = await _first_carrying(bus, topics, trust, tenant, env, name, wanted)
        if target is None:
            continue  # the stream does not reference the secret
        if target == 0:
            check.holdouts.append(
                Holdout(tenant, env, "", "", f"no published snapshot carries v{wanted} yet")
            )
            continue
        check.targets[(tenant, env)] = target
    if not check.targets:
        return check
    if not await _exists(bus, topics.acks):  # a misspelt topic must not read as no fleet
        check.holdouts.append(
            Holdout("", "", "", "", f"the acks topic {topics.acks!r} does not exist")
        )
        return check
    horizon = time.time_ns() - int(instance_ttl * 1e9)
    fleet = await _fleet(bus, topics, check.targets)
    for (tenant, env), instances in sorted(fleet.items()):
        target = check.targets[(tenant, env)]
        for instance, acks in sorted(instances.items()):
            applied, rejected, stopped = (acks.get(s) for s in ("applied", "rejected", "stopped"))
            if stopped is not None and all(
                answer is None or answer.offset < stopped.offset for answer in (applied, rejected)
            ):
                continue  # its last word was that it stopped
            heard = max((a.heard for a in (applied, rejected) if a is not None), default=0)
            if heard < horizon:
                continue  # silent past the TTL: gone
            check.instances += 1
            if applied is not None and applied.version >= target:
                continue
            service = next(a.ack.service for a in (applied, rejected) if a is not None)
            runs = f"runs v{applied.version}" if applied is not None else "runs nothing yet"
            why = f"{runs}, needs v{target} or later"
            if rejected is not None and rejected.version >= target:
                why += f"; refused v{rejected.version}: {rejected.ack.reason}"
            check.holdouts.append(
                Holdout(tenant, env, shown(instance, quote=False), shown(service, quote=False),
                        shown(why, 300, quote=False))
            )  # fmt: skip
    return check


@dataclass(frozen=True, slots=True)
class _Said:
    """An instance's last ack of one status, and where it stands on the acks topic."""

    ack: Ack
    offset: int
    timestamp_ms: int

    @property
    def version(self) -> int:
        return self.ack.version

    @property
    def heard(self) -> int:
        """When it was said, in ns: the record's timestamp, not what the ack claims
        (an unsigned ack could claim any time)."""
        return self.timestamp_ms * 1_000_000


async def _exists(bus: Bus, topic: str) -> bool:
    reader = bus.reader(topic)
    try:
        return await reader.start()
    finally:
        await reader.stop()


async def _fleet(
    bus: Bus, topics: TopicNames, streams: Mapping[Stream, int]
) -> dict[Stream, dict[str, dict[str, _Said]]]:
    """The last snapshot-channel ack of each status, per instance, of `streams`: the
    last on the topic (one partition, so in the order written), whatever time it claims."""
    prefixes = {f"{t}/{e}/".encode(): (t, e) for t, e in streams}
    found: dict[Stream, dict[str, dict[str, _Said]]] = {s: {} for s in streams}
    async for record in bus.read_to_end([topics.acks]):
        key = record.key or b""
        stream = next((s for p, s in prefixes.items() if key.startswith(p)), None)
        if stream is None or record.value is None:
            continue
        try:
            ack = _ack_decoder.decode(record.value)
        except msgspec.DecodeError:
            continue
        if ack.channel != SNAPSHOT_CHANNEL or (ack.tenant, ack.env) != stream:
            continue
        said = _Said(ack, record.offset, record.timestamp_ms)
        found[stream].setdefault(ack.instance, {})[ack.status] = said  # later wins
    return found


async def _first_carrying(
    bus: Bus,
    topics: TopicNames,
    trust: TrustStore,
    tenant: str,
    env: str,
    name: str,
    version: int,
) -> int | None:
    """The first of the stream's latest run of verified snapshots in which every one
    either carries `version` (or later) of secret `name` or does not use it at all: an
    instance on a snapshot before it may still read an older version. 0 when the
    latest does not carry it yet, or nothing was published for the stream (a wrong
    topic prefix must hold a retirement, not allow it); None when no snapshot read
    back references the secret."""
    reader = bus.reader(topics.tenant_topic(tenant))
    try:
        records = (
            await reader.recent(topics.record_key(env), limit=_READ_BACK)
            if (await reader.start())
            else []
        )
    finally:
        await reader.stop()
    events = []
    for record in records:
        with contextlib.suppress(VerificationError):
            events.append(
                open_envelope(
                    record.value or b"", trust, stream=(tenant, env), channel=SNAPSHOT_CHANNEL
                )
            )
    if not events:
        return 0
    events.sort(key=lambda event: event.body.version, reverse=True)
    first, used = 0, False
    for event in events:
        carried = _carried(event.config_json, name)
        if carried is not None and carried < version:
            break  # this one (and those before it) read an older version
        used = used or carried is not None
        first = event.body.version
    else:
        if not used:
            return None  # no snapshot read back uses the secret
    return first


def _carried(config_json: bytes, name: str) -> int | None:
    """The newest version of secret `name` a config carries (0: referenced without a
    value); None when the config does not reference it."""
    if f'"{SECRET_KEY}":'.encode() not in config_json:
        return None
    found: list[int] = []

    def visit(value: Any) -> None:
        if isinstance(value, SecretRef):
            if value.name == name:
                found.append(value.versions[0] if value.sealed else 0)
        elif isinstance(value, dict):
            for child in value.values():
                visit(child)
        elif isinstance(value, tuple):
            for child in value:
                visit(child)

    visit(freeze_json(msgspec.json.decode(config_json)))
    return min(found) if found else None


async def audit_read(
    bus: Bus,
    topics: TopicNames,
    tenant: str,
    env: str,
    name: str,
    version: int,
    *,
    actor: str,
    reason: str,
    key: SigningKey,
    trust: TrustStore,
) -> None:
    """Write an audit note, signed with the operator's `key` and linked into the
    stream's operator chain, that `actor` read version `version` of secret `name`, and
    wait for Kafka to take it: a read that cannot be audited does not happen."""
    note = AuditNote(
        action="secret_read",
        tenant=tenant,
        env=env,
        subject=name,
        version=version,
        actor=actor,
        reason=reason,
        at=time.time_ns(),
    )
    value = seal_note(note, key)
    await write_chained(
        bus,
        topics,
        tenant,
        env,
        trust=trust,
        signer=key,
        build=lambda: [(topics.audit, note.key, value)],
    )


async def wait_for_fleet(
    bus: Bus,
    topics: TopicNames,
    trust: TrustStore,
    streams: Iterable[Stream] | Mapping[Stream, int],
    name: str,
    version: int,
    *,
    max_wait: float,
    poll: float = 0.5,
    instance_ttl: float = 86400.0,
) -> FleetCheck:
    """`fleet_has`, asked again every `poll` seconds until it is ready or `max_wait`
    seconds have passed; the last answer."""
    wanted = dict(streams) if isinstance(streams, Mapping) else dict.fromkeys(streams, version)
    deadline = time.monotonic() + max_wait
    while True:
        check = await fleet_has(
            bus, topics, trust, wanted, name, version, instance_ttl=instance_ttl
        )
        if check.ready or time.monotonic() >= deadline:
            return check
        await asyncio.sleep(min(poll, max(0.0, deadline - time.monotonic())))
