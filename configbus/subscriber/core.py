"""The subscriber: verified hot reload of one stream inside a service.

    async with ConfigSubscriber("aurora-records", "prod", trust="trust.yml") as sub:
        sub.on_change("database", reconnect_pool)        # old, new, changed paths
        sub.add_validator(lambda config: ...)             # raise to refuse a config
        pool_size = sub.config.get("database.postgresql.connection_pool.max_size")

Life of an event: received -> verified (signature by a trusted key whose scope
covers this stream, tenant and environment match, version above the current one,
known schema, config hash) -> validators -> an atomic swap (readers see the old config
or the new one, never a mix) -> callbacks in registration order -> acknowledged ->
written to the disk cache. Anything that fails keeps the last good config, is logged
with its reason, counted and acknowledged as rejected: every record ends applied or
rejected, whatever it holds. The follow loop survives anything but cancellation, and
`stop()` always completes.

At start the subscriber applies its disk cache (re-verified) if it has one, then
reads the recent records of its stream from Kafka and applies the highest version
among them that verifies (docs/wire-format.md §2.1): a replayed old event or a forged
one at the end of the topic neither rolls it back nor stops it from starting. Without
Kafka it runs on the cache and keeps retrying; with neither, `start()` fails after
`start_timeout`, saying what it found. Callbacks
run on the event loop that started the subscriber; sync callbacks run inline.
The SDK never installs signal handlers and never configures logging.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias, Unpack

import msgspec
from opentelemetry import trace
from opentelemetry.trace import StatusCode

from configbus.bus import Bus, KafkaBus, Record
from configbus.bus.base import ReaderAPI
from configbus.errors import (
    BusError,
    ConfigBusError,
    LimitError,
    NoConfigError,
    VerificationError,
)
from configbus.events import Ack, Envelope, VerifiedEvent, open_envelope
from configbus.subscriber.settings import SubscriberOptions, SubscriberSettings
from configbus.supervise import Backoff, finish, supervise
from configbus.telemetry import (
    applied_counter,
    extract,
    latency_histogram,
    rejected_counter,
    tracer,
)
from configbus.tree.diff import changed_paths
from configbus.tree.resolved import ResolvedConfig
from configbus.tree.values import FrozenDict, freeze_json

__all__ = ["Callback", "ConfigSubscriber", "NoConfigError", "Snapshot", "Validator"]

log = logging.getLogger(__name__)

Callback: TypeAlias = Callable[[ResolvedConfig, ResolvedConfig, list[str]], Awaitable[None] | None]
Validator: TypeAlias = Callable[[ResolvedConfig], object]


class _AlreadyApplied(Exception):
    """The event is the one already applied."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a subscriber runs, as one immutable value: the config, its version, the
    verified event it came from and the trace id of its apply. Read `sub.snapshot`
    once to get a config and a version that belong together."""

    config: ResolvedConfig
    version: int
    event: VerifiedEvent | None
    trace_id: str = ""  # of the apply: the publisher's trace, continued here


class _BodyVersion(msgspec.Struct):  # the claimed version, to order candidates (unverified)
    version: int


_EMPTY = ResolvedConfig(FrozenDict())
_ack_encoder = msgspec.msgpack.Encoder()
_envelope_decoder = msgspec.msgpack.Decoder(Envelope)
_version_decoder = msgspec.msgpack.Decoder(_BodyVersion)
BOOTSTRAP_RECORDS = 256  # records of the stream read back at start, at most
_REASON_LIMIT = 500  # characters of a rejection's reason in an ack


def _claimed_version(record: Record) -> int:
    """The version a record claims, unverified: only the order in which start-up tries
    candidates. -1 when it claims nothing readable (it is still tried, and rejected)."""
    try:
        return _version_decoder.decode(_envelope_decoder.decode(record.value or b"").body).version
    except (msgspec.DecodeError, TypeError, RecursionError):
        return -1


class ConfigSubscriber:
    """One stream's live config. `async with`, or `start()` / `stop()` (idempotent)."""

    def __init__(
        self,
        tenant: str,
        env: str,
        *,
        settings: SubscriberSettings | None = None,
        bus: Bus | None = None,
        **options: Unpack[SubscriberOptions],
    ) -> None:
        """`options` (see `SubscriberOptions`: bootstrap_servers, trust, instance_id,
        service, cache_dir, topic_prefix, start_timeout, ...) fall back to their
        ``CONFIGBUS_*`` variables; or pass ready `settings`. `bus` replaces Kafka (tests
        pass a `configbus.bus.MemoryBus`)."""
        self.settings = settings or SubscriberSettings.build(tenant, env, **options)
        self.tenant, self.env = self.settings.tenant, self.settings.env
        self._bus: Bus = bus or KafkaBus(self.settings.kafka)
        self._current = Snapshot(_EMPTY, 0, None)
        self._callbacks: list[tuple[str, Callback]] = []
        self._validators: list[Validator] = []
        self.applied = 0
        self.ignored = 0
        self.rejected: dict[str, int] = {}
        self.last_rejection: str | None = None
        self._start_rejections: Counter[str] = Counter()  # reason -> records, before the first
        self._last_bus_error: str | None = None
        self.source: str | None = None  # "kafka" or "cache": where the config came from
        self._task: asyncio.Task[None] | None = None
        self._acks: asyncio.Queue[Ack] | None = None
        self._ack_task: asyncio.Task[None] | None = None
        self._changed: asyncio.Event | None = None  # replaced (after being set) per apply
        self._bootstrapped: asyncio.Event | None = None
        self._state = "new"

    def __repr__(self) -> str:
        return (
            f"<ConfigSubscriber {self.tenant}/{self.env} v{self.version} "
            f"instance={self.settings.instance_id} {self._state}>"
        )

    # -- what services read ---------------------------------------------------------
    @property
    def snapshot(self) -> Snapshot:
        """The config, version, event and trace id that run now, as one value: two
        reads of `config` and `version` may straddle an apply; one of this cannot."""
        return self._current

    @property
    def config(self) -> ResolvedConfig:
        """The current config: immutable, swapped whole on every apply."""
        return self._current.config

    @property
    def version(self) -> int:
        """The version of the current config; 0 before the first."""
        return self._current.version

    @property
    def event(self) -> VerifiedEvent | None:
        """The verified event the current config came from (version, detected_at,
        issued_at, cause, changed paths in `event.body`); None before the first."""
        return self._current.event

    @property
    def trace_id(self) -> str:
        """The trace id (32 hex digits) of the apply of the current config: for an
        event from Kafka, the trace the publisher started on detecting the change.
        "" when there is none (no tracer provider anywhere)."""
        return self._current.trace_id

    def on_change(self, prefix: str, callback: Callback) -> None:
        """Call `callback(old, new, paths)` after every apply that changes a key under
        `prefix` ("" for any); `paths` are the changed dotted keys under it. Sync or
        async; called in registration order; an exception is logged and ignored."""
        self._callbacks.append((prefix, callback))

    def add_validator(self, validator: Validator) -> None:
        """Run `validator(config)` before every apply; raising (or returning False)
        refuses the config, which is then acknowledged as rejected. Validators are
        plain functions: they run between verification and the swap, which must not
        wait on anything."""
        if inspect.iscoroutinefunction(validator):
            raise TypeError(f"{_name(validator)}: a validator must be a plain function, not async")
        self._validators.append(validator)

    async def wait_for_version(self, version: int, timeout: float | None = None) -> int:  # noqa: ASYNC109 - the documented API
        """Wait until the config is at `version` or later; returns the version.
        Raises TimeoutError after `timeout` seconds, ConfigBusError once stopped."""
        if self._changed is None:
            raise ConfigBusError("the subscriber is not started")
        async with asyncio.timeout(timeout):
            while self.version < version:
                if self._state == "stopped":
                    raise ConfigBusError("the subscriber stopped")
                await self._changed.wait()
        return self.version

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> ConfigSubscriber:
        """Apply the disk cache, connect, and return once the latest config is applied
        (or, when Kafka cannot be reached, once the cache is; see the module doc)."""
        if self._state == "started":
            return self
        if self._state == "stopped":
            raise ConfigBusError("a stopped subscriber cannot start again; create a new one")
        self._changed = asyncio.Event()
        self._bootstrapped = asyncio.Event()
        cached = await self._load_cache()
        if self.settings.send_acks:
            self._acks = asyncio.Queue(maxsize=1000)
            self._ack_task = asyncio.create_task(self._send_acks(), name="configbus-acks")
        self._task = asyncio.create_task(self._follow(), name="configbus-subscriber")
        wait = self.settings.start_timeout
        if cached:
            wait = min(wait, self.settings.offline_grace)
        try:
            await asyncio.wait_for(self._bootstrapped.wait(), wait)
        except asyncio.CancelledError:
            await self.stop()  # the caller gave up on start(): leave nothing running
            raise
        except TimeoutError:
            if not cached:
                await self.stop()
                raise NoConfigError(
                    f"no config for {self.tenant}/{self.env} within {wait:g}s and no disk "
                    f"cache: {self._why_nothing()}"
                ) from None
            log.warning(
                "%s/%s: Kafka unreachable; running on the disk cache (v%d), still retrying",
                self.tenant,
                self.env,
                self.version,
            )
        self._state = "started"
        return self

    def _why_nothing(self) -> str:
        """Why no config came from Kafka, for the error `start()` raises."""
        if self._start_rejections:
            count = sum(self._start_rejections.values())
            reasons = ", ".join(
                f"{reason} ({n})" for reason, n in sorted(self._start_rejections.items())
            )
            return f"{count} record(s) of the stream rejected: {reasons}"
        if self._last_bus_error is not None:
            return f"Kafka: {self._last_bus_error}"
        return "the stream has no record in Kafka yet"

    async def stop(self) -> None:
        """Stop following; flush pending acknowledgements briefly. Safe twice; always
        completes (a task that failed is logged, not raised here)."""
        if self._state == "stopped":
            return
        self._state = "stopped"
        if self._changed is not None:
            self._changed.set()  # wakes every wait_for_version, to raise: no version will come
        task, self._task = self._task, None
        await finish(task, f"{self.tenant}/{self.env} follow")
        ack_task, self._ack_task = self._ack_task, None
        if ack_task is not None:
            if self._acks is not None and not ack_task.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._acks.join(), 2.0)
            await finish(ack_task, f"{self.tenant}/{self.env} acks")

    async def __aenter__(self) -> ConfigSubscriber:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- following the stream ---------------------------------------------------------
    async def _follow(self) -> None:
        """Bootstrap, then follow, under the supervisor: a Kafka failure or anything
        unexpected is logged and the loop starts again after a backoff."""
        backoff = Backoff(0.1, 10.0)
        await supervise(
            f"subscriber {self.tenant}/{self.env}", lambda: self._follow_once(backoff), backoff
        )

    async def _follow_once(self, backoff: Backoff) -> None:
        topic = self.settings.topics.tenant_topic(self.tenant)
        key = self.env.encode()
        reader = self._bus.reader(topic)
        try:
            try:
                if not await reader.start():
                    raise BusError(f"topic {topic} does not exist yet")
                await self._bootstrap(reader, key)
            except BusError as exc:
                self._last_bus_error = str(exc)
                raise
            self._last_bus_error = None
            self._mark_bootstrapped()
            backoff.reset()
            while True:
                for record in await reader.poll(1000):
                    if record.key == key:
                        await self._handle(record)
                        self._mark_bootstrapped()
        finally:
            with contextlib.suppress(Exception):
                await reader.stop()

    async def _bootstrap(self, reader: ReaderAPI, key: bytes) -> None:
        """Apply the highest version among the stream's recent records that verifies:
        candidates are tried from the highest version they claim down, and the first
        that verifies (or is no newer than what runs) ends the search."""
        records = await reader.recent(key, limit=BOOTSTRAP_RECORDS)
        first = self._bootstrapped is not None and not self._bootstrapped.is_set()
        claims = sorted(((_claimed_version(r), r) for r in records), key=lambda c: -c[0])
        for claimed, record in claims:
            if self.version > 0 and claimed <= self.version:
                return  # nothing newer than what runs (the cache, or a previous connection)
            if await self._handle(record, startup=first):
                return

    def _mark_bootstrapped(self) -> None:
        """Let start() return, once there is a verified config: a rejected record (a
        forgery, or one the validators refuse) is no config to start on."""
        if self.version == 0:
            return
        if self._bootstrapped is not None and not self._bootstrapped.is_set():
            self.source = "kafka"
            self._bootstrapped.set()

    async def _handle(
        self, record: Record, *, from_cache: bool = False, startup: bool = False
    ) -> bool:
        """Verify and apply one record; True when applied."""
        received_at = time.time_ns()
        parent = extract(record.headers)
        name = "apply cached config" if from_cache else f"receive {record.topic}"
        with tracer.start_as_current_span(
            name,
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": "kafka",
                "messaging.operation.type": "receive",
                "messaging.destination.name": record.topic,
                "messaging.kafka.offset": record.offset,
                "configbus.tenant": self.tenant,
                "configbus.env": self.env,
                "configbus.instance": self.settings.instance_id,
            },
        ) as span:
            event: VerifiedEvent | None = None
            try:
                with tracer.start_as_current_span("verify"):
                    event = open_envelope(
                        record.value or b"",
                        self.settings.trust,
                        stream=(self.tenant, self.env),
                        limits=self.settings.limits,
                    )
                    self._check_version(event)
                span.set_attribute("configbus.version", event.body.version)
                previous = self.version
                with tracer.start_as_current_span("apply"):
                    old, new = self._apply(event)
                applied_at = time.time_ns()
            except _AlreadyApplied:
                self.ignored += 1  # the same event again (the cache, then Kafka): no news
                return False
            except VerificationError as exc:
                span.set_status(StatusCode.ERROR, exc.reason)
                self._rejected(exc, event, received_at, span)
                return False
            except Exception as exc:  # whatever a record holds, it ends rejected
                log.exception("%s/%s: unexpected error on a record", self.tenant, self.env)
                error = VerificationError("internal_error", f"{exc.__class__.__name__}")
                span.set_status(StatusCode.ERROR, error.reason)
                self._rejected(error, event, received_at, span)
                return False
            self.applied += 1
            self.source = "cache" if from_cache else "kafka"
            # The publisher diffed this version against the one before it; when that is
            # the version we ran, its list saves walking both configs. An empty list
            # (from a producer that did not fill it in) is not trusted to mean "nothing".
            consecutive = previous == event.body.version - 1
            known = event.body.changed_paths if consecutive and event.body.changed_paths else None
            await self._run_callbacks(old, new, known)
            latency_ms = (applied_at - event.body.detected_at) / 1e6
            attributes = {"configbus.tenant": self.tenant, "configbus.env": self.env}
            applied_counter.add(1, attributes)
            if not from_cache and not startup:
                latency_histogram.record(latency_ms, attributes)
            if not from_cache:
                log.info(
                    "%s/%s: applied v%d (%.1f ms after detection)",
                    self.tenant,
                    self.env,
                    event.body.version,
                    latency_ms,
                    extra={"tenant": self.tenant, "env": self.env, "version": event.body.version},
                )
                self._ack(event, "applied", "", received_at, applied_at, span, startup)
                await self._write_cache(record)
            return True

    def _check_version(self, event: VerifiedEvent) -> None:
        """A verified event (for this stream: `open_envelope` checked) must be newer
        than what runs here."""
        body = event.body
        current = self._current.event
        if current is not None and (body.version, body.config_hash) == (
            current.body.version,
            current.body.config_hash,
        ):
            raise _AlreadyApplied
        if body.version <= self.version:
            raise VerificationError(
                "stale_version", f"v{body.version} is not newer than v{self.version}"
            )

    def _apply(self, event: VerifiedEvent) -> tuple[ResolvedConfig, ResolvedConfig]:
        try:
            data = freeze_json(msgspec.json.decode(event.config_json), self.settings.limits)
        except RecursionError:
            raise VerificationError("too_large", "config nested too deep to decode") from None
        except LimitError as exc:
            raise VerificationError("too_large", str(exc)) from None
        except (msgspec.DecodeError, TypeError) as exc:
            raise VerificationError("malformed", f"config is not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise VerificationError("malformed", "config is not a JSON object")
        new = ResolvedConfig(data, env=self.env, tenant=self.tenant)
        for validator in self._validators:
            try:
                verdict = validator(new)
            except Exception as exc:
                raise VerificationError("refused", f"{_name(validator)}: {_gist(exc)}") from None
            if inspect.isawaitable(verdict):  # an async callable that slipped past the check
                if inspect.iscoroutine(verdict):
                    verdict.close()
                raise VerificationError("refused", f"{_name(validator)} is async; not run")
            if verdict is False:
                raise VerificationError("refused", f"{_name(validator)} refused the config")
        old = self._current.config
        trace_id = trace.get_current_span().get_span_context().trace_id
        traced = format(trace_id, "032x") if trace_id else ""
        self._current = Snapshot(new, event.body.version, event, traced)  # the atomic swap
        if self._changed is not None:
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()  # wakes every wait_for_version
        return old, new

    async def _run_callbacks(
        self, old: ResolvedConfig, new: ResolvedConfig, known: Sequence[str] | None
    ) -> None:
        if not self._callbacks:
            return
        changed = list(known) if known is not None else changed_paths(old.data, new.data)
        for prefix, callback in self._callbacks:
            paths = [p for p in changed if not prefix or p == prefix or p.startswith(prefix + ".")]
            if not paths:
                continue
            with tracer.start_as_current_span(f"callback {_name(callback)}") as span:
                try:
                    result = callback(old, new, paths)
                    if inspect.isawaitable(result):
                        await result
                except Exception as exc:
                    span.record_exception(exc)
                    span.set_status(StatusCode.ERROR, exc.__class__.__name__)
                    log.exception(
                        "%s/%s: change callback %s failed", self.tenant, self.env, _name(callback)
                    )

    def _rejected(
        self,
        exc: VerificationError,
        event: VerifiedEvent | None,
        received_at: int,
        span: trace.Span,
    ) -> None:
        self.rejected[exc.reason] = self.rejected.get(exc.reason, 0) + 1
        self.last_rejection = str(exc)
        if self.version == 0:
            self._start_rejections[exc.reason] += 1
        rejected_counter.add(
            1, {"configbus.tenant": self.tenant, "configbus.env": self.env, "reason": exc.reason}
        )
        log.warning(
            "%s/%s: rejected an event, keeping v%d: %s",
            self.tenant,
            self.env,
            self.version,
            exc,
            extra={"tenant": self.tenant, "env": self.env, "reason": exc.reason},
        )
        self._ack(event, "rejected", str(exc), received_at, 0, span)

    # -- acknowledgements -----------------------------------------------------------
    def _ack(
        self,
        event: VerifiedEvent | None,
        status: str,
        reason: str,
        received_at: int,
        applied_at: int,
        span: trace.Span,
        startup: bool = False,
    ) -> None:
        if self._acks is None:
            return
        body = event.body if event is not None else None
        if len(reason) > _REASON_LIMIT:  # a record's text can be any length
            reason = reason[: _REASON_LIMIT - 3] + "..."
        ack = Ack(
            tenant=self.tenant,
            env=self.env,
            version=body.version if body is not None else 0,
            instance=self.settings.instance_id,
            service=self.settings.service,
            status=status,
            reason=reason,
            config_hash=body.config_hash if body is not None else "",
            detected_at=body.detected_at if body is not None else 0,
            issued_at=body.issued_at if body is not None else 0,
            received_at=received_at,
            applied_at=applied_at,
            trace_id=format(span.get_span_context().trace_id, "032x"),
            startup=startup,
        )
        try:
            self._acks.put_nowait(ack)
        except asyncio.QueueFull:
            log.warning("%s/%s: acknowledgement queue full; dropping one", self.tenant, self.env)

    async def _send_acks(self) -> None:
        """Send acknowledgements in the background, so a slow or absent acks topic never
        delays applying config."""
        queue = self._acks
        if queue is None:
            return
        producer = self._bus.producer()
        base = f"{self.tenant}/{self.env}/{self.settings.instance_id}"
        try:
            while True:
                ack = await queue.get()
                try:
                    await producer.start()
                    # Keyed per instance and status, so compaction keeps both the last
                    # applied and the last rejected ack of every instance.
                    key = f"{base}/{ack.status}".encode()
                    value = _ack_encoder.encode(ack)
                    # Awaited to delivery: a refused ack leaves the producer unable to
                    # send the next ones (out of sequence) until it is made again.
                    await (await producer.send(self.settings.topics.acks, value, key=key))
                except Exception as exc:  # an ack is telemetry: never worth the task
                    log.warning("%s/%s: could not send an ack: %s", self.tenant, self.env, exc)
                    with contextlib.suppress(Exception):
                        await producer.stop()
                finally:
                    queue.task_done()
        finally:
            with contextlib.suppress(Exception):
                await producer.stop()

    # -- the disk cache ---------------------------------------------------------------
    def _cache_file(self) -> Path | None:
        folder = self.settings.cache_dir
        return folder / f"{self.tenant}.{self.env}.event" if folder is not None else None

    async def _load_cache(self) -> bool:
        path = self._cache_file()
        if path is None or not path.exists():
            return False
        try:
            value = await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            log.warning("%s: cannot read the config cache: %s", path, exc.strerror)
            return False
        record = Record(str(path), 0, 0, self.env.encode(), value, (), 0)
        if await self._handle(record, from_cache=True):
            log.info("%s/%s: v%d applied from %s", self.tenant, self.env, self.version, path)
            return True
        log.warning("%s: the cached config did not verify; ignoring it", path)
        return False

    async def _write_cache(self, record: Record) -> None:
        path = self._cache_file()
        if path is None or record.value is None:
            return
        value = record.value

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(".tmp")
            temporary.write_bytes(value)
            os.replace(temporary, path)  # atomic: a crash leaves the old file or the new

        try:
            await asyncio.to_thread(write)
        except OSError as exc:
            log.warning("%s: cannot write the config cache: %s", path, exc.strerror)


def _name(function: object) -> str:
    return str(getattr(function, "__qualname__", None) or function.__class__.__name__)


_GIST_LIMIT = 200


def _gist(exc: BaseException) -> str:
    """A validator's error for logs and acks: the first line of its message, bounded.
    Validation errors often go on to print the offending instance (jsonschema's end
    with the whole config), which must not reach logs or the acks topic."""
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else exc.__class__.__name__
    return text if len(text) <= _GIST_LIMIT else text[: _GIST_LIMIT - 3] + "..."
