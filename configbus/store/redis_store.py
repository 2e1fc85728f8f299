"""The run-time tenant store in Redis, and the read cache of latest events.

Operators and APIs write typed values for one stream; the publisher lays them over
the tenant's file layer and publishes. Redis holds:

    <prefix>store:<tenant>:<env>    HASH   field: the key path as a JSON array
                                           value: the value as JSON
                                           field $secret:<name>: a sealed secret's
                                           record as JSON (see configbus.tree.sealed)
    <prefix>event:<tenant>:<env>    STRING the latest signed event (record value bytes)
    <prefix>status                  HASH   field: <tenant>/<env>; value: JSON of what
                                           became of the stream's last publication
                                           (version, config_hash, refused, times)
    <prefix>publisher               STRING the active daemon, expiring with its heartbeat

Paths are stored as JSON arrays, not dotted strings, so a key that itself holds dots
(a logger name such as ``uvicorn.access``) survives the round trip. Redis is never
the only copy of published state: events live in Kafka; this is desired state that
operators wrote, and a cache.

Changes are seen through keyspace notifications (``notify-keyspace-events`` must
include ``K`` and ``h``; `TenantStore.enable_notifications` turns them on when it may)
and, for anything a notification missed, by the publisher's periodic reconcile.

While `changes` is subscribed and the notifications cover every way a hash can change
(``K`` with ``A``, or with ``h``, ``g``, ``x`` and ``e``), `layers` keeps what it read
and answers from it until a notification for that stream arrives: a file edit then
costs no Redis round trip. A read that overlapped any notification, or the listener
(re)starting or stopping, is not kept; `forget` drops everything (the reconcile calls
it, so a change no notification reports, such as FLUSHDB, is read within one period).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any, Final

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from configbus.errors import BusError, LimitError, SettingsError, TreeError
from configbus.limits import DEFAULT_LIMITS
from configbus.redact import without_credentials
from configbus.tree.layer import Layer, LayerKind
from configbus.tree.sealed import SecretRecord, parse_record, record_document
from configbus.tree.values import FrozenDict, Path, Value, format_path, freeze, freeze_json, thaw

__all__ = ["DEFAULT_PREFIX", "TenantStore"]

log = logging.getLogger(__name__)

DEFAULT_PREFIX: Final = "configbus:"
META_FIELD: Final = "$meta"  # who wrote last and why; never a key path (those are JSON arrays)
SECRET_FIELD: Final = "$secret:"  # + a secret's name: its sealed record
# Keyspace notification classes that report every change of a hash: hash commands,
# generic ones (DEL, RENAME, ...), expiry and eviction ("A" stands for all of them).
_EVERY_CHANGE: Final = frozenset("hgxe")

Stream = tuple[str, str]


class TenantStore:
    """Typed values per (tenant, env) in Redis hashes. Use `async with` or start/stop."""

    def __init__(self, url: str, *, prefix: str = DEFAULT_PREFIX) -> None:
        self.url = url
        self.prefix = prefix
        self._redis: aioredis.Redis | None = None
        # The read cache of `layers` (see the module docstring): layers by stream (None:
        # nothing set), valid while a listener is subscribed and notifications are
        # complete. `_notices` counts notifications and listener starts and stops: a
        # read is kept only when it did not change while the read was in flight.
        self._cache: dict[Stream, Layer | None] = {}
        self._listeners = 0
        self._complete = False  # notifications report every change of a store hash
        self._notices = 0

    def __repr__(self) -> str:
        return f"TenantStore({_safe_url(self.url)!r}, prefix={self.prefix!r})"

    async def start(self) -> TenantStore:
        if self._redis is None:
            try:
                self._redis = aioredis.Redis.from_url(self.url)
            except ValueError as exc:
                raise SettingsError(
                    f"redis URL {_safe_url(self.url)}: {without_credentials(str(exc))}"
                ) from None
            try:
                await self.redis.ping()
            except RedisError as exc:
                await self.stop()
                raise BusError(f"redis at {_safe_url(self.url)}: {exc}") from exc
        return self

    async def stop(self) -> None:
        self.forget()
        client, self._redis = self._redis, None
        if client is not None:
            await client.aclose()

    async def __aenter__(self) -> TenantStore:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def redis(self) -> Any:
        """The started client. Typed `Any`: redis-py types the async client's commands
        as "awaitable or plain value" unions, which its versions spell differently."""
        if self._redis is None:
            raise SettingsError("TenantStore is not started")
        return self._redis

    # -- keys ----------------------------------------------------------------------
    def store_key(self, tenant: str, env: str) -> str:
        return f"{self.prefix}store:{tenant}:{env}"

    def event_key(self, tenant: str, env: str) -> str:
        return f"{self.prefix}event:{tenant}:{env}"

    def stream_of(self, key: str) -> tuple[str, str] | None:
        """The (tenant, env) whose store hash `key` is, or None."""
        head = f"{self.prefix}store:"
        if not key.startswith(head):
            return None
        tenant, _, env = key[len(head) :].partition(":")
        return (tenant, env) if tenant and env else None

    # -- values --------------------------------------------------------------------
    async def values(self, tenant: str, env: str) -> dict[Path, Value]:
        """Every value set for the stream, by key path."""
        return _values(await self._hash(tenant, env), self.store_key(tenant, env))

    async def meta(self, tenant: str, env: str) -> dict[str, Any]:
        """Who last wrote the stream's store, and why: actor, reason, at (ns)."""
        try:
            raw = await self.redis.hget(self.store_key(tenant, env), META_FIELD)
        except ResponseError:  # not a hash: no metadata to tell (its values fail the stream)
            return {}
        except RedisError as exc:
            raise BusError(f"redis: {exc}") from exc
        return _json_object(raw) or {}

    # -- the read cache of `layers` -------------------------------------------------
    @property
    def caching(self) -> bool:
        """Whether `layers` may answer from what it read before: a listener is
        subscribed and the notifications report every change of a store hash."""
        return self._listeners > 0 and self._complete

    def forget(self, stream: Stream | None = None) -> None:
        """Drop what `layers` kept for `stream` (every stream by default): it is read
        again next time. Reads in flight are not kept either."""
        self._notices += 1
        if stream is None:
            self._cache.clear()
        else:
            self._cache.pop(stream, None)

    async def layer(self, tenant: str, env: str) -> Layer | None:
        """The stream's store as a layer (kind STORE), or None when nothing is set."""
        raw = await self._hash(tenant, env)
        key = self.store_key(tenant, env)
        values, records = _values(raw, key), _records(raw, key)
        return self._layer(tenant, env, values, records) if values or records else None

    async def secrets(self, tenant: str, env: str) -> dict[str, SecretRecord]:
        """The stream's sealed secrets in the store, by name."""
        return _records(await self._hash(tenant, env), self.store_key(tenant, env))

    async def put_secrets(
        self,
        tenant: str,
        env: str,
        records: Sequence[SecretRecord],
        *,
        removed: Sequence[str] = (),
        actor: str = "",
        reason: str = "",
    ) -> None:
        """Write sealed secret records (and remove `removed` names) with who and why,
        in one transaction."""
        key = self.store_key(tenant, env)
        mapping: dict[str | bytes, str | bytes] = {
            SECRET_FIELD + record.name: json.dumps(record_document(record), separators=(",", ":"))
            for record in records
        }
        mapping[META_FIELD] = json.dumps({"actor": actor, "reason": reason, "at": time.time_ns()})
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                if removed:
                    pipe.hdel(key, *[SECRET_FIELD + name for name in removed])
                pipe.hset(key, mapping=mapping)
                await pipe.execute()
        except RedisError as exc:
            raise BusError(f"redis: {exc}") from exc
        finally:
            self.forget((tenant, env))

    async def _hash(self, tenant: str, env: str) -> Mapping[bytes | str, bytes | str]:
        key = self.store_key(tenant, env)
        try:
            raw: Mapping[bytes | str, bytes | str] = await self.redis.hgetall(key)
        except ResponseError as exc:  # the key holds something else than a hash
            raise LimitError(f"{key}: {_not_a_hash(exc)}") from None
        except RedisError as exc:
            raise BusError(f"redis: {exc}") from exc
        return raw

    async def layers(
        self,
        streams: Iterable[tuple[str, str]],
        *,
        batch: int = 1000,
        problems: dict[tuple[str, str], str] | None = None,
    ) -> dict[tuple[str, str], Layer]:
        """The store layers of several streams, by stream; streams with nothing set are
        left out. Pipelined: one round trip per `batch` streams, not one per stream
        (4,000 streams on loopback: about 65 ms instead of 300-500 ms).

        A stream holding a value that breaks the limits raises `LimitError`; with
        `problems` given, it is left out and its problem recorded there instead, so one
        bad stream does not stop the others.

        While `caching`, streams read before and not changed since are answered from
        memory (see the module docstring); the rest are read and kept."""
        wanted = list(streams)
        found: dict[tuple[str, str], Layer] = {}
        if self.caching:
            unread = []
            for stream in wanted:
                if stream not in self._cache:
                    unread.append(stream)
                elif (kept := self._cache[stream]) is not None:
                    found[stream] = kept
            wanted = unread
        for start in range(0, len(wanted), batch):
            chunk = wanted[start : start + batch]
            pipe = self.redis.pipeline(transaction=False)
            for tenant, env in chunk:
                pipe.hgetall(self.store_key(tenant, env))
            notices = self._notices
            try:
                replies = await pipe.execute(raise_on_error=False)
            except RedisError as exc:
                raise BusError(f"redis: {exc}") from exc
            keep = self.caching and self._notices == notices
            for (tenant, env), raw in zip(chunk, replies, strict=True):
                key = self.store_key(tenant, env)
                try:
                    if isinstance(raw, ResponseError):  # this key alone is not a hash
                        raise LimitError(f"{key}: {_not_a_hash(raw)}")
                    if isinstance(raw, Exception):
                        raise BusError(f"redis: {raw}")
                    values = _values(raw, key)
                    records = _records(raw, key)
                except LimitError as exc:
                    if problems is None:
                        raise
                    problems[(tenant, env)] = str(exc)
                    continue
                layer = self._layer(tenant, env, values, records) if values or records else None
                if layer is not None:
                    found[(tenant, env)] = layer
                if keep:
                    self._cache[(tenant, env)] = layer
        return found

    def _layer(
        self,
        tenant: str,
        env: str,
        values: Mapping[Path, Value],
        records: Mapping[str, SecretRecord] | None = None,
    ) -> Layer:
        return Layer(
            LayerKind.STORE,
            tenant,
            f"redis:{self.store_key(tenant, env)}",
            nest(values),
            sealed={name: record.versions for name, record in (records or {}).items()},
        )

    async def set(
        self,
        tenant: str,
        env: str,
        values: Mapping[Path, Value],
        *,
        actor: str = "",
        reason: str = "",
    ) -> None:
        """Set several values at once, with who and why (one HSET: all or nothing)."""
        mapping: dict[str | bytes, str | bytes] = {
            _field(path): _json(value) for path, value in values.items()
        }
        mapping[META_FIELD] = json.dumps({"actor": actor, "reason": reason, "at": time.time_ns()})
        try:
            await self.redis.hset(self.store_key(tenant, env), mapping=mapping)
        except RedisError as exc:
            raise BusError(f"redis: {exc}") from exc
        finally:
            self.forget((tenant, env))

    async def unset(
        self, tenant: str, env: str, paths: Sequence[Path], *, actor: str = "", reason: str = ""
    ) -> int:
        """Remove values; returns how many were there."""
        key = self.store_key(tenant, env)
        meta = json.dumps({"actor": actor, "reason": reason, "at": time.time_ns()})
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hdel(key, *[_field(p) for p in paths])
                pipe.hset(key, META_FIELD, meta)
                removed, _ = await pipe.execute()
        except RedisError as exc:
            raise BusError(f"redis: {exc}") from exc
        finally:
            self.forget((tenant, env))
        return int(removed)

    async def streams(self) -> list[tuple[str, str]]:
        """Every (tenant, env) that has a store hash."""
        found = []
        async for key in self.redis.scan_iter(match=f"{self.prefix}store:*", count=1000):
            stream = self.stream_of(key.decode() if isinstance(key, bytes) else key)
            if stream is not None:
                found.append(stream)
        return sorted(found)

    # -- the publisher's status ------------------------------------------------------
    async def publisher_heartbeat(self, writer: str, ttl: float) -> None:
        """Record that `writer` publishes, for `ttl` seconds."""
        value = json.dumps({"writer": writer, "at": time.time()})
        try:
            await self.redis.set(f"{self.prefix}publisher", value, px=int(ttl * 1000))
        except RedisError as exc:
            raise BusError(f"redis: {exc}") from exc

    async def publisher_resign(self, writer: str) -> None:
        """`writer` stops publishing: forget its heartbeat (if it is still the last)."""
        try:
            if await self.publisher() == writer:
                await self.redis.delete(f"{self.prefix}publisher")
        except RedisError as exc:
            raise BusError(f"redis: {exc}") from exc

    async def report(
        self,
        tenant: str,
        env: str,
        *,
        version: int | None = None,
        config_hash: str = "",
        refused: str | None = None,
        overrides: list[dict[str, Any]] | None = None,
    ) -> None:
        """Record what became of the stream's last publication attempt: published as
        `version` with `config_hash` (and the emergency `overrides` in effect on top of
        it), or `refused` for a reason (the last published version stays recorded).
        Only the active daemon writes this."""
        field = f"{tenant}/{env}"
        try:
            status = await self.status(tenant, env) or {}
            if refused is None:
                status |= {"version": version, "config_hash": config_hash, "refused": None}
                status["overrides"] = overrides or []
            else:
                status |= {"refused": refused}
            status["at"] = time.time()
            await self.redis.hset(f"{self.prefix}status", field, json.dumps(status))
        except RedisError as exc:
            raise BusError(f"redis: {exc}") from exc

    async def status(self, tenant: str, env: str) -> dict[str, Any] | None:
        """What the daemon last reported for the stream (see `report`), or None."""
        try:
            raw = await self.redis.hget(f"{self.prefix}status", f"{tenant}/{env}")
        except RedisError as exc:
            raise BusError(f"redis: {exc}") from exc
        return _json_object(raw)

    async def publisher(self) -> str | None:
        """The daemon that publishes now (its heartbeat has not expired), or None."""
        try:
            raw = await self.redis.get(f"{self.prefix}publisher")
        except RedisError as exc:
            raise BusError(f"redis: {exc}") from exc
        writer = (_json_object(raw) or {}).get("writer")
        return writer if isinstance(writer, str) else None

    # -- the event cache -----------------------------------------------------------
    async def put_events(self, events: Mapping[tuple[str, str], bytes]) -> None:
        """Cache the latest signed event of several streams (one round trip)."""
        if not events:
            return
        try:
            await self.redis.mset({self.event_key(t, e): value for (t, e), value in events.items()})
        except RedisError as exc:
            raise BusError(f"redis: {exc}") from exc

    async def latest_event(self, tenant: str, env: str) -> bytes | None:
        try:
            value = await self.redis.get(self.event_key(tenant, env))
        except RedisError as exc:
            raise BusError(f"redis: {exc}") from exc
        return value.encode() if isinstance(value, str) else value

    # -- notifications -------------------------------------------------------------
    async def enable_notifications(self) -> bool:
        """Turn on keyspace notifications for every change of a hash (see
        `_EVERY_CHANGE`) when the server allows it. Returns whether notifications of
        hash writes are on; `layers` caches only when every change is reported."""
        self._complete = False
        flags: set[str] = set()
        try:
            current = (await self.redis.config_get("notify-keyspace-events")).get(
                "notify-keyspace-events", ""
            )
            flags = set(current.decode() if isinstance(current, bytes) else current or "")
            if not _reports_every_change(flags):
                wanted = "".join(sorted(flags | {"K"} | _EVERY_CHANGE))
                await self.redis.config_set("notify-keyspace-events", wanted)
                flags = set(wanted)
        except ResponseError:
            # CONFIG is disabled (managed Redis): reconcile covers what is not reported.
            return {"K", "h"} <= flags or {"K", "A"} <= flags
        self._complete = True
        return True

    async def changes(self) -> AsyncIterator[tuple[str, str]]:
        """Yield (tenant, env) each time a store hash changes. Runs until cancelled.

        From Redis's confirmation of the subscription until this ends, `layers` may
        keep what it reads (see `caching`); a notification drops what it kept of the
        stream before the stream is yielded."""
        db = self.redis.connection_pool.connection_kwargs.get("db", 0)
        pattern = f"__keyspace@{db}__:{self.prefix}store:*"
        pubsub = self.redis.pubsub(ignore_subscribe_messages=False)
        head = len(f"__keyspace@{db}__:")
        subscribed = False
        try:
            await pubsub.psubscribe(pattern)
            async for message in pubsub.listen():
                kind = message.get("type")
                if kind in ("psubscribe", b"psubscribe") and not subscribed:
                    # Every write from here on is reported: reads may be kept.
                    subscribed = True
                    self._listeners += 1
                    self.forget()
                    continue
                if kind not in ("pmessage", b"pmessage"):
                    continue
                channel = message.get("channel")
                if isinstance(channel, bytes):
                    channel = channel.decode()
                stream = self.stream_of(str(channel)[head:])
                if stream is not None:
                    self.forget(stream)
                    yield stream
        except RedisError as exc:
            raise BusError(f"redis notifications: {exc}") from exc
        finally:
            if subscribed:
                self._listeners -= 1
            self.forget()
            await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # untyped before redis 8


def _reports_every_change(flags: set[str]) -> bool:
    """Whether ``notify-keyspace-events`` `flags` report every change of a key."""
    return "K" in flags and ("A" in flags or flags >= _EVERY_CHANGE)


def nest(values: Mapping[Path, Value]) -> FrozenDict:
    """``{("a", "b"): 1, ("a", "c"): 2}`` as ``{"a": {"b": 1, "c": 2}}``; a longer
    path wins over a shorter one that would hold it (sorted, so deterministic)."""
    root: dict[str, Any] = {}
    for path, value in sorted(values.items(), key=lambda item: (len(item[0]), item[0])):
        node = root
        for part in path[:-1]:
            child = node.get(str(part))
            if not isinstance(child, dict):
                child = node[str(part)] = {}
            node = child
        node[str(path[-1])] = value
    frozen = freeze(root)
    if not isinstance(frozen, FrozenDict):  # pragma: no cover - root is a dict
        raise TypeError("store values did not nest into a mapping")
    return frozen


def _field(path: Path) -> str:
    if not path or not all(isinstance(p, str) and p for p in path):
        raise SettingsError(f"{format_path(path)!r}: a store key needs non-empty names")
    return json.dumps(list(path), separators=(",", ":"))


def _values(raw: Mapping[bytes | str, bytes | str], key: str = "") -> dict[Path, Value]:
    """A store hash as read by HGETALL: every value by key path (the meta field aside).
    A field written by hand that is not ours (not a JSON array of names, or a value
    that is not JSON) is skipped with a warning naming it, never its value. A value of
    ours that breaks the limits (too large, nested too deep) raises `LimitError`."""
    values: dict[Path, Value] = {}
    for name, value in raw.items():
        if name in (META_FIELD, META_FIELD.encode()) or _is_secret_field(name):
            continue
        shown = (name.decode(errors="replace") if isinstance(name, bytes) else name)[:100]
        if len(value) > DEFAULT_LIMITS.config_bytes:
            raise LimitError(
                f"{key}: field {shown}: value over {DEFAULT_LIMITS.config_bytes} bytes"
            )
        try:
            path, decoded = _path(name), json.loads(value)
        except RecursionError:
            raise LimitError(f"{key}: field {shown}: value nested too deep") from None
        except (ValueError, TypeError):
            log.warning("%s: skipping field %r: not a configbus store field", key, shown)
            continue
        values[path] = freeze_json(decoded, what=f"{key}: field {shown}")
    return values


def _is_secret_field(name: bytes | str) -> bool:
    return (name.decode(errors="replace") if isinstance(name, bytes) else name).startswith(
        SECRET_FIELD
    )


def _records(raw: Mapping[bytes | str, bytes | str], key: str) -> dict[str, SecretRecord]:
    """The sealed secrets of a store hash, by name. One that is not a record of ours
    raises `LimitError` naming the key and field (never its content)."""
    records: dict[str, SecretRecord] = {}
    for field_name, value in raw.items():
        if not _is_secret_field(field_name):
            continue
        text = field_name.decode(errors="replace") if isinstance(field_name, bytes) else field_name
        name = text[len(SECRET_FIELD) :]
        where = f"redis:{key}"
        if len(value) > DEFAULT_LIMITS.config_bytes:
            limit = DEFAULT_LIMITS.config_bytes
            raise LimitError(f"{where}: field {text[:100]}: over {limit} bytes")
        document = _json_object(value)
        try:
            if document is None:
                raise LimitError(f"{where}: field {text[:100]}: not a JSON record")
            records[name] = parse_record(name, document, where)
        except TreeError as exc:
            raise LimitError(str(exc.problems[0])) from None
    return records


def _path(field: bytes | str) -> Path:
    parts = json.loads(field)
    if not isinstance(parts, list) or not parts or not all(isinstance(p, str) for p in parts):
        raise ValueError("a store field is a JSON array of key names")
    return tuple(parts)


def _json(value: Value) -> str:
    return json.dumps(thaw(value), separators=(",", ":"), sort_keys=True)


def _json_object(raw: bytes | str | None) -> dict[str, Any] | None:
    """`raw` as a JSON object, or None when it is missing or anything else (including
    JSON nested past the interpreter's limit, which anyone with Redis access can write)."""
    try:
        found = json.loads(raw) if raw else None
    except (ValueError, RecursionError):
        return None
    return found if isinstance(found, dict) else None


def _not_a_hash(exc: Exception) -> str:
    return f"not a store hash ({str(exc).split(' ', 1)[0]}); delete or fix the key"


def _safe_url(url: str) -> str:
    """The URL without its password (in the user part or the query)."""
    return without_credentials(url)
