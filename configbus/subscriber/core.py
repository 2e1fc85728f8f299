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

A stream has two channels (docs/wire-format.md §2.1): the snapshot the daemon publishes
and the emergency overrides operators sign. The config a service reads is the snapshot
with the overrides in effect set on top; each override is dropped at its expiry by this
process's clock, whatever else runs. An override signed by a key whose scope does not
cover the stream, or longer than the key's max_ttl, is refused and acknowledged so.

At start the subscriber applies its disk cache (re-verified) if it has one, then
reads the recent records of its stream from Kafka and applies the highest version
among them that verifies (docs/wire-format.md §2.1): a replayed old event or a forged
one at the end of the topic neither rolls it back nor stops it from starting. Without
Kafka it runs on the cache and keeps retrying; with neither, `start()` fails after
`start_timeout`, saying what it found. Callbacks
run on the event loop that started the subscriber; sync callbacks run inline.
The SDK never installs signal handlers and never configures logging.

The trust file is looked at every `trust_reload` seconds and reloaded when it changed
(a file that no longer loads leaves the last good one in force, with one log line).
Keys are judged by this process's clock: an event signed by a key revoked or past its
`not_after` is refused (`key_revoked`, `key_expired`). A config that runs already is
kept when its signer stops being trusted; `sub.signer_trusted` turns false, the
reason is in `sub.signer_note`, every acknowledgement says so (and the last applied
one is sent again saying so), until a valid event replaces the config.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias, Unpack

import msgspec
from opentelemetry import trace
from opentelemetry.trace import StatusCode

from configbus.agent.protocol import Hello
from configbus.bus import (
    CANDIDATE_CHANNEL,
    OVERRIDE_CHANNEL,
    PRESENCE_CHANNEL,
    SNAPSHOT_CHANNEL,
    Bus,
    KafkaBus,
    Record,
    TopicNames,
)
from configbus.bus.base import ReaderAPI
from configbus.crypto import PUBLISHER, SecretReader, TrustStore
from configbus.crypto.trust import TrustFile
from configbus.errors import (
    AuthorizationError,
    BusError,
    ConfigBusError,
    LimitError,
    NoConfigError,
    VerificationError,
)
from configbus.events import Ack, VerifiedEvent, claimed_version, now_ns, open_envelope
from configbus.ops.overrides import (
    OverrideEntry,
    OverrideState,
    check_logged,
    compose,
    parse_overrides,
)
from configbus.subscriber.acks import AckSender
from configbus.subscriber.link import AgentLink
from configbus.subscriber.settings import SubscriberOptions, SubscriberSettings
from configbus.supervise import Backoff, finish, supervise
from configbus.telemetry import (
    applied_counter,
    extract,
    latency_histogram,
    rejected_counter,
    trace_id_of,
    tracer,
    tracing,
    track_version,
)
from configbus.tree.diff import changed_paths
from configbus.tree.resolved import ResolvedConfig
from configbus.tree.values import FrozenDict, view_json

__all__ = [
    "Callback",
    "ConfigSubscriber",
    "HealthCheck",
    "NoConfigError",
    "Snapshot",
    "Validator",
]

log = logging.getLogger(__name__)

Callback: TypeAlias = Callable[[ResolvedConfig, ResolvedConfig, list[str]], Awaitable[None] | None]
Validator: TypeAlias = Callable[[ResolvedConfig], object]
HealthCheck: TypeAlias = Callable[[], object]


class _AlreadyApplied(Exception):
    """The event is the one already applied."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a subscriber runs, as one immutable value: the config, its version, the
    verified event it came from and the trace id of its apply, and the emergency
    overrides set on top of it. Read `sub.snapshot` once to get a config and a version
    that belong together."""

    config: ResolvedConfig  # the snapshot's config with the overrides in effect on top
    version: int  # of the snapshot channel
    event: VerifiedEvent | None
    trace_id: str = ""  # of the apply: the publisher's trace, continued here
    override: OverrideState | None = None  # the override record last applied
    overrides: tuple[OverrideEntry, ...] = ()  # its entries in effect in `config`
    # "" while every key that signed what runs (the snapshot's event, the override set
    # in effect) would still be believed; else which key and why, e.g. "key_revoked:
    # key 'pub-a' is revoked since 2026-11-03T02:14:00Z: laptop stolen".
    signer_note: str = ""
    # The candidate a rollout selected this instance for, when its config runs instead
    # of the snapshot's (`version` and `event` stay the stable snapshot's); else None.
    candidate: VerifiedEvent | None = None

    @property
    def candidate_version(self) -> int:
        """The version of the candidate channel this instance runs; 0: the snapshot."""
        return self.candidate.body.version if self.candidate is not None else 0

    @property
    def signer_trusted(self) -> bool:
        """Whether the trust file in force now still believes every key that signed
        what runs; False after such a key was revoked, expired or removed (the config
        keeps running until a valid event replaces it)."""
        return not self.signer_note

    @property
    def override_version(self) -> int:
        """The version of the override channel composed in; 0 when none."""
        return self.override.version if self.override is not None else 0

    @property
    def latest_event(self) -> VerifiedEvent | None:
        """The newer of the snapshot's event and the override record composed in: what
        the last apply came from (for its latency and trace; an expiry comes from
        neither, it is this process's clock)."""
        override = self.override.event if self.override is not None else None
        if override is None or (
            self.event is not None and self.event.body.issued_at >= override.body.issued_at
        ):
            return self.event
        return override

    @property
    def config_hash(self) -> str:
        """The hash of the published config that runs (the candidate's, or the
        snapshot's), before overrides; "" before the first."""
        event = self.candidate or self.event
        return event.body.config_hash if event is not None else ""


_EMPTY = ResolvedConfig(FrozenDict())
_ack_encoder = msgspec.msgpack.Encoder()
BOOTSTRAP_RECORDS = 256  # records of the stream read back at start, at most
_REASON_LIMIT = 500  # characters of a rejection's reason in an ack
_HEALTH_TIMEOUT_S = 5.0  # what an async health check gets before it counts as failed
_UNSENT_ACKS = 1000  # acks held while the agent is away, at most (the oldest go first)
_AGENT_RETRY_S = 1.0  # while reading Kafka for an absent agent: how often to look for it
_NO_SPAN = contextlib.nullcontext()
# Reasons given before (or instead of) a signature check: the record's claims are nobody's.
# A key that is listed but not in force signs nothing anyone believes, either.
_UNSIGNED = frozenset(
    {
        "malformed",
        "too_large",
        "unknown_key",
        "bad_signature",
        "unknown_schema",
        "key_revoked",
        "key_expired",
        "key_not_yet_valid",
    }
)


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
        kafka = self.settings.kafka
        self._bus: Bus | None = bus or (KafkaBus(kafka) if kafka is not None else None)
        self._bus_is_own = bus is None  # then subscribers of one cluster share an ack producer
        keys = self.settings.secret_keys
        self._secrets = SecretReader(keys, self.tenant, self.env) if keys is not None else None
        self._current = Snapshot(_EMPTY, 0, None)
        self._base = _EMPTY  # the snapshot channel's config, before overrides
        self._pending: OverrideState | None = None  # an override set before any snapshot
        self._expiry: asyncio.TimerHandle | None = None
        self._expiring: asyncio.Task[None] | None = None
        self._applying = asyncio.Lock()  # an apply and its callbacks, or an expiry: one at a time
        self._keys = {
            TopicNames.record_key(self.env, channel): channel
            for channel in (SNAPSHOT_CHANNEL, OVERRIDE_CHANNEL, CANDIDATE_CHANNEL)
        }
        self._candidate: VerifiedEvent | None = None  # the candidate channel's latest
        self._candidate_base: ResolvedConfig | None = None  # its config, while it runs here
        self._health_checks: list[HealthCheck] = []
        self.healthy, self.health_note = True, ""
        self._started_at = 0
        self._beat_task: asyncio.Task[None] | None = None
        self._beat_now = asyncio.Event()
        self._callbacks: list[tuple[str, Callback]] = []
        self._validators: list[Validator] = []
        self.applied = 0
        self.ignored = 0
        self.rejected: dict[str, int] = {}
        self.last_rejection: str | None = None
        self._start_rejections: Counter[str] = Counter()  # reason -> records, before the first
        self._last_bus_error: str | None = None
        self.source: str | None = None  # "agent", "kafka" or "cache": where the config came from
        self._task: asyncio.Task[None] | None = None
        self.via: str | None = None  # "agent" or "kafka": what it follows the stream through now
        self._sender: AckSender | None = None  # acks to Kafka, when reading it directly
        self._link: AgentLink | None = None  # the agent, while connected to it
        self._unsent: deque[tuple[bytes, bytes]] = deque(maxlen=_UNSENT_ACKS)
        self._cache_task: asyncio.Task[None] | None = None
        self._cache_values: dict[str, bytes] = {}  # channel -> the next value to write
        self._changed: asyncio.Event | None = None  # replaced (after being set) per apply
        self._bootstrapped: asyncio.Event | None = None
        self._denied = asyncio.Event()  # Kafka refused this principal (no retry helps)
        self._trust: TrustStore = self.settings.trust  # the trust file as last loaded
        self._trust_file: TrustFile | None = None  # while reloading it
        self._trust_task: asyncio.Task[None] | None = None
        self._applied_ack: Ack | None = None  # the last applied snapshot ack: restated
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
    def trust(self) -> TrustStore:
        """The trust store in force: the trust file as last loaded."""
        return self._trust

    @property
    def signer_trusted(self) -> bool:
        """Whether every key that signed what runs is still believed (see `Snapshot`)."""
        return self._current.signer_trusted

    @property
    def signer_note(self) -> str:
        """Why not, when `signer_trusted` is False; "" otherwise."""
        return self._current.signer_note

    @property
    def overrides(self) -> tuple[OverrideEntry, ...]:
        """The emergency overrides in effect in `config` (path, value, who, why, until)."""
        return self._current.overrides

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

    def add_health_check(self, check: HealthCheck) -> None:
        """Run `check()` before every heartbeat (every `heartbeat` seconds); returning
        False or raising marks this instance unhealthy, and its heartbeat says so with
        the check's name and message. During a staged rollout, an instance that turns
        unhealthy after applying the candidate aborts the rollout: every instance goes
        back to the stable version. Sync or async (an async check gets 5 s)."""
        self._health_checks.append(check)

    @property
    def labels(self) -> dict[str, str]:
        """What this instance says it is, in its heartbeats (service, host and the
        labels given): rollouts select instances by them."""
        return dict(self.settings.labels)

    async def wait_for_version(self, version: int, timeout: float | None = None) -> int:  # noqa: ASYNC109 - the documented API
        """Wait until the config is at `version` or later; returns the version.
        Raises TimeoutError after `timeout` seconds, ConfigBusError once stopped."""
        await self.wait_for(lambda snapshot: snapshot.version >= version, timeout)
        return self.version

    async def wait_for(
        self,
        predicate: Callable[[Snapshot], bool],
        timeout: float | None = None,  # noqa: ASYNC109 - the documented API
    ) -> Snapshot:
        """Wait until `predicate(sub.snapshot)` holds (checked after every apply and
        every expiry); returns that snapshot. Raises TimeoutError after `timeout`
        seconds, ConfigBusError once stopped."""
        if self._changed is None:
            raise ConfigBusError("the subscriber is not started")
        async with asyncio.timeout(timeout):
            while not predicate(self._current):
                if self._state == "stopped":
                    raise ConfigBusError("the subscriber stopped")
                await self._changed.wait()
        return self._current

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> ConfigSubscriber:
        """Apply the disk cache, connect, and return once the latest config is applied
        (or, when neither the agent nor Kafka can be reached, once the cache is; see
        the module doc)."""
        if self._state == "started":
            return self
        if self._state == "stopped":
            raise ConfigBusError("a stopped subscriber cannot start again; create a new one")
        self._changed = asyncio.Event()
        self._bootstrapped = asyncio.Event()
        self._started_at = time.time_ns()
        track_version(self)  # configbus.config.version, read when metrics are collected
        if self.settings.trust.source is not None and self.settings.trust_reload > 0:
            self._trust_file = TrustFile.shared(self.settings.trust)
            await self._reload_trust()  # what the file says now, not when settings were made
            self._trust_task = asyncio.create_task(
                supervise(f"subscriber {self.tenant}/{self.env} trust", self._watch_trust),
                name="configbus-trust",
            )
        cached = await self._load_cache()
        self._task = asyncio.create_task(self._follow(), name="configbus-subscriber")
        wait = self.settings.start_timeout
        if cached:
            wait = min(wait, self.settings.offline_grace)
        try:
            await asyncio.wait_for(self._configured_or_denied(), wait)
        except asyncio.CancelledError:
            await self.stop()  # the caller gave up on start(): leave nothing running
            raise
        except TimeoutError:
            pass
        if not self._bootstrapped.is_set():
            if not cached:
                await self.stop()
                within = "refused" if self._denied.is_set() else f"within {wait:g}s"
                raise NoConfigError(
                    f"no config for {self.tenant}/{self.env} {within} and no disk "
                    f"cache: {self._why_nothing()}"
                )
            log.warning(
                "%s/%s: %s unreachable; running on the disk cache (v%d), still retrying",
                self.tenant,
                self.env,
                "the agent" if self.settings.agent is not None else "Kafka",
                self.version,
            )
        self._state = "started"
        if self.settings.send_acks and self.settings.heartbeat > 0:
            self._beat_task = asyncio.create_task(
                supervise(f"subscriber {self.tenant}/{self.env} heartbeat", self._heartbeats),
                name="configbus-heartbeat",
            )
        return self

    async def _configured_or_denied(self) -> None:
        """Until a verified config is applied, or Kafka refuses this principal (its
        credentials or ACLs: retrying will not help, so start() says so at once)."""
        assert self._bootstrapped is not None
        waits = [asyncio.ensure_future(e.wait()) for e in (self._bootstrapped, self._denied)]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()

    def _why_nothing(self) -> str:
        """Why no config came, for the error `start()` raises."""
        if self._start_rejections:
            count = sum(self._start_rejections.values())
            reasons = ", ".join(
                f"{reason} ({n})" for reason, n in sorted(self._start_rejections.items())
            )
            return f"{count} record(s) of the stream rejected: {reasons}"
        if self._last_bus_error is not None:
            return self._last_bus_error
        if self.settings.agent is not None:
            return f"the agent at {self.settings.agent} has no record of the stream yet"
        return "the stream has no record in Kafka yet"

    async def stop(self) -> None:
        """Stop following; flush pending acknowledgements briefly. Safe twice; always
        completes (a task that failed is logged, not raised here)."""
        if self._state == "stopped":
            return
        self._state = "stopped"
        track_version(self, running=False)
        if self._expiry is not None:
            self._expiry.cancel()
        await finish(self._expiring, f"{self.tenant}/{self.env} expiry")
        await finish(self._trust_task, f"{self.tenant}/{self.env} trust")
        await finish(self._beat_task, f"{self.tenant}/{self.env} heartbeat")
        if self._changed is not None:
            self._changed.set()  # wakes every wait_for_version, to raise: no version will come
        task, self._task = self._task, None
        await finish(task, f"{self.tenant}/{self.env} follow")
        if self.version:  # gone on purpose: nobody waits for this instance's answers
            now = time.time_ns()
            current = self._current
            self._ack(current.event, "stopped", "", now, now, current.trace_id)
        link, self._link = self._link, None
        if link is not None:
            await link.close()
        sender, self._sender = self._sender, None
        if sender is not None:
            await sender.release()
        if self._cache_task is not None:  # let the last write land, briefly
            await asyncio.wait({self._cache_task}, timeout=2.0)
            await finish(self._cache_task, f"{self.tenant}/{self.env} cache")

    async def __aenter__(self) -> ConfigSubscriber:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- following the stream ---------------------------------------------------------
    async def _follow(self) -> None:
        """Follow the stream through the agent when there is one, else from Kafka,
        under the supervisor: a failure or anything unexpected is logged and the loop
        starts again after a backoff."""
        # A local socket is cheap to try: an agent that restarted is found within 2 s.
        backoff = Backoff(0.1, 10.0 if self.settings.agent is None else 2.0)
        follow = self._follow_kafka if self.settings.agent is None else self._follow_agent
        await supervise(f"subscriber {self.tenant}/{self.env}", lambda: follow(backoff), backoff)

    async def _follow_agent(self, backoff: Backoff) -> None:
        """Records from the agent, for as long as it is there. While it is not, records
        from Kafka directly when the subscriber knows the cluster, until the agent is
        back; without Kafka, the config it has (from the cache) until then."""
        path = self.settings.agent
        assert path is not None
        while True:
            try:
                link = await AgentLink.open(path, self._hello())
            except OSError as exc:
                self._last_bus_error = f"the agent at {path} is unreachable ({exc.strerror or exc})"
                if self._bus is None:
                    raise BusError(self._last_bus_error) from None
                log.warning(
                    "%s/%s: %s; reading Kafka directly until it is back",
                    self.tenant,
                    self.env,
                    self._last_bus_error,
                )
                await self._follow_kafka_while_agent_away(path, backoff)
                continue
            self._link, self.via = link, "agent"
            self._last_bus_error = None
            sender, self._sender = self._sender, None
            if sender is not None:  # read Kafka while the agent was away: no longer
                await sender.release()
            log.info("%s/%s: following through the agent at %s", self.tenant, self.env, path)
            while self._unsent:
                link.ack(*self._unsent.popleft())
            backoff.reset()
            try:
                if not link.welcome.has_record and link.welcome.kafka != "connected":
                    self._last_bus_error = (
                        f"the agent at {path} has no record yet; its Kafka: {link.welcome.kafka}"
                    )
                async for record in link.records(self._frame_limit()):
                    starting = self._bootstrapped is not None and not self._bootstrapped.is_set()
                    await self._handle(record, source="agent", startup=starting)
                    self._mark_bootstrapped("agent")
            finally:
                self._link = self.via = None
                await link.close()
            raise BusError(f"the agent at {path} went away")

    async def _follow_kafka_while_agent_away(self, path: Path, backoff: Backoff) -> None:
        """Follow Kafka directly until the agent accepts connections again."""
        kafka = asyncio.create_task(
            supervise(
                f"subscriber {self.tenant}/{self.env} (Kafka)",
                lambda: self._follow_kafka(backoff),
                backoff,
            )
        )
        try:
            while True:
                await asyncio.sleep(_AGENT_RETRY_S)
                with contextlib.suppress(OSError):
                    _, writer = await asyncio.open_unix_connection(os.fspath(path))
                    writer.close()
                    log.info("%s/%s: the agent at %s is back", self.tenant, self.env, path)
                    return
        finally:
            await finish(kafka, f"{self.tenant}/{self.env} Kafka follow")

    def _hello(self) -> Hello:
        return Hello(
            tenant=self.tenant,
            env=self.env,
            instance=self.settings.instance_id,
            service=self.settings.service,
            version=self.version,
        )

    def _frame_limit(self) -> int:
        return self.settings.limits.event_bytes + 256 * 1024  # the envelope and headers

    async def _follow_kafka(self, backoff: Backoff) -> None:
        assert self._bus is not None
        if self.settings.send_acks and self._sender is None:
            self._sender = AckSender.acquire(
                self._bus,
                self.settings.topics.acks,
                identity=self.settings.kafka if self._bus_is_own else None,
            )
            while self._unsent:
                self._sender.put(*self._unsent.popleft())
        topic = self.settings.topics.tenant_topic(self.tenant)
        reader = self._bus.reader(topic)
        try:
            try:
                if not await reader.start():
                    raise BusError(f"topic {topic} does not exist yet")
                await self._bootstrap(reader)
            except BusError as exc:
                self._last_bus_error = f"Kafka: {exc}"
                if isinstance(exc, AuthorizationError):
                    self._denied.set()
                raise
            self._last_bus_error, self.via = None, "kafka"
            self._mark_bootstrapped("kafka")
            backoff.reset()
            while True:
                for record in await reader.poll(1000):
                    if record.key in self._keys:
                        await self._handle(record)
                        self._mark_bootstrapped("kafka")
        finally:
            if self.via == "kafka":
                self.via = None
            with contextlib.suppress(Exception):
                await reader.stop()

    async def _bootstrap(self, reader: ReaderAPI) -> None:
        """Per channel, the snapshot first (overrides go on top of it), apply the highest
        version among the stream's recent records that verifies: candidates are tried
        from the highest version they claim down, and the first that verifies (or is no
        newer than what runs) ends the search. One read back for both channels."""
        found = await reader.recent_keys(tuple(self._keys), limit=BOOTSTRAP_RECORDS)
        first = self._bootstrapped is not None and not self._bootstrapped.is_set()
        for key, records in found.items():
            claims = sorted(((claimed_version(r.value), r) for r in records), key=lambda c: -c[0])
            channel = self._keys[key]
            for claimed, record in claims:
                running = self._running_version(channel)
                if running > 0 and claimed <= running:
                    break  # nothing newer than what runs (the cache, or a previous connection)
                if await self._handle(record, startup=first):
                    break

    def _running_version(self, channel: str) -> int:
        """The version this instance holds of `channel`: of a candidate, the latest it
        verified, selected or not (its selection is in that record, not in what runs)."""
        if channel == SNAPSHOT_CHANNEL:
            return self.version
        if channel == CANDIDATE_CHANNEL:
            return self._candidate.body.version if self._candidate is not None else 0
        return self._current.override_version

    def _mark_bootstrapped(self, source: str) -> None:
        """Let start() return, once there is a verified config: a rejected record (a
        forgery, or one the validators refuse) is no config to start on."""
        if self.version == 0:
            return
        if self._bootstrapped is not None and not self._bootstrapped.is_set():
            if self.source == "cache" or self.source is None:
                self.source = source
            self._bootstrapped.set()

    async def _handle(
        self, record: Record, *, source: str = "kafka", startup: bool = False
    ) -> bool:
        """Verify and apply one record of either channel; True when applied. One at a
        time with expiries, callbacks included: a slow callback never sees a later
        config land before it."""
        async with self._applying:
            return await self._handle_now(record, source, startup)

    async def _handle_now(self, record: Record, source: str, startup: bool) -> bool:
        """The lean path: one span when a tracer provider is installed (none
        otherwise), no diff unless a callback needs one, the config read lazily, the
        ack and the cache written off the path."""
        received_at = time.time_ns()
        from_cache = source == "cache"
        channel = self._keys.get(record.key or b"", SNAPSHOT_CHANNEL)
        span = self._span(record, from_cache) if tracing() else None
        with trace.use_span(span, end_on_exit=True) if span is not None else _NO_SPAN:
            trace_id = (
                format(span.get_span_context().trace_id, "032x")
                if span is not None
                else trace_id_of(record.headers)
            )
            event: VerifiedEvent | None = None
            try:
                event = open_envelope(
                    record.value or b"",
                    self._trust,
                    stream=(self.tenant, self.env),
                    channel=channel,
                    limits=self.settings.limits,
                )
                self._check_version(event, channel)
                previous = self.version
                selected = True  # a candidate: whether it runs here now
                if channel == OVERRIDE_CHANNEL:
                    check_logged(event, record.timestamp_ms)
                    swapped = self._apply_override(event, record, trace_id)
                    if swapped is None:
                        return False  # kept until there is a snapshot to put it on
                    old, new = swapped
                elif channel == CANDIDATE_CHANNEL:
                    staged = self._apply_candidate(event, trace_id)
                    if staged is None:  # not for this instance, and nothing changes here
                        if not from_cache:
                            self._write_cache(record, channel)
                        return False
                    old, new, selected = staged
                else:
                    old, new = self._apply(event, trace_id)
                applied_at = time.time_ns()
            except _AlreadyApplied:
                self.ignored += 1  # the same event again (the cache, then Kafka): no news
                return False
            except VerificationError as exc:
                self._rejected(exc, event, received_at, trace_id, span, channel, record)
                return False
            except Exception as exc:  # whatever a record holds, it ends rejected
                log.exception("%s/%s: unexpected error on a record", self.tenant, self.env)
                error = VerificationError("internal_error", f"{exc.__class__.__name__}")
                self._rejected(error, event, received_at, trace_id, span, channel, record)
                return False
            self.applied += 1
            if channel == SNAPSHOT_CHANNEL:
                self.source = source
            if span is not None:
                span.set_attribute("configbus.version", event.body.version)
                span.add_event("applied", {"configbus.kid": event.kid})
            if not from_cache:
                if selected:
                    self._ack(
                        event, "applied", "", received_at, applied_at, trace_id, startup, channel
                    )
                self._write_cache(record, channel)
                self._beat_now.set()  # the fleet hears what runs here now, not in 10 s
            # The publisher diffed this version against the one before it; when that is
            # the version we ran, its list saves walking both configs. An empty list
            # (from a producer that did not fill it in) is not trusted to mean "nothing".
            consecutive = channel == SNAPSHOT_CHANNEL and previous == event.body.version - 1
            consecutive = consecutive and not self._current.overrides
            consecutive = consecutive and self._current.candidate is None
            known = event.body.changed_paths if consecutive and event.body.changed_paths else None
            await self._run_callbacks(old, new, known, span)
            latency_ms = (applied_at - event.body.detected_at) / 1e6
            attributes = {"configbus.tenant": self.tenant, "configbus.env": self.env}
            applied_counter.add(1, attributes)
            if not from_cache and not startup:
                latency_histogram.record(latency_ms, attributes)
            if not from_cache and log.isEnabledFor(logging.INFO):
                log.info(
                    "%s/%s: %s %s v%d (%.1f ms after detection)",
                    self.tenant,
                    self.env,
                    "applied" if selected else "left; back to the stable version from",
                    channel,
                    event.body.version,
                    latency_ms,
                    extra={"tenant": self.tenant, "env": self.env, "version": event.body.version},
                )
            return True

    def _span(self, record: Record, from_cache: bool) -> trace.Span:
        name = "apply cached config" if from_cache else f"receive {record.topic}"
        return tracer.start_span(
            name,
            context=extract(record.headers),
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
        )

    def _check_version(self, event: VerifiedEvent, channel: str) -> None:
        """A verified event (for this stream: `open_envelope` checked) must be newer
        than what runs here on its channel."""
        body = event.body
        if channel == SNAPSHOT_CHANNEL:
            current, running = self._current.event, self.version
        elif channel == CANDIDATE_CHANNEL:
            current = self._candidate
            running = current.body.version if current is not None else 0
        else:
            override = self._current.override or self._pending
            current = override.event if override is not None else None
            running = override.version if override is not None else 0
        if current is not None and (body.version, body.config_hash) == (
            current.body.version,
            current.body.config_hash,
        ):
            raise _AlreadyApplied
        if body.version <= running:
            raise VerificationError(
                "stale_version", f"{channel} v{body.version} is not newer than v{running}"
            )

    def _apply(self, event: VerifiedEvent, trace_id: str) -> tuple[ResolvedConfig, ResolvedConfig]:
        """Swap in a snapshot, with the overrides in effect on top (on top of the
        candidate instead while one runs here: the snapshot becomes what this instance
        goes back to)."""
        override = self._current.override or self._pending
        base = self._config_of(event)
        top = self._candidate_base or base
        if top is not base:  # on a candidate: the snapshot is what it goes back to, so
            self._validate(self._composed(base, override)[0])  # it must pass here too
        try:
            new, entries = self._composed(top, override)
            self._validate(new)
        except VerificationError as exc:
            if override is None or not override.active(now_ns()):
                raise
            # Refused with the overrides on top: when the snapshot alone passes, it is
            # the overrides that are refused (and said so), not the published config.
            self._validate(top)
            self._rejected(exc, override.event, time.time_ns(), "", None, OVERRIDE_CHANNEL)
            new, entries, override = top, (), None
        self._base, self._pending = base, None
        candidate = self._current.candidate if self._candidate_base is not None else None
        old = self._swap(
            Snapshot(new, event.body.version, event, trace_id, override, entries, "", candidate)
        )
        return old, new

    def _config_of(self, event: VerifiedEvent) -> ResolvedConfig:
        """The verified event's config, as a lazy read-only view within the limits."""
        try:
            data = view_json(msgspec.json.decode(event.config_json), self.settings.limits)
        except RecursionError:
            raise VerificationError("too_large", "config nested too deep to decode") from None
        except LimitError as exc:
            raise VerificationError("too_large", str(exc)) from None
        except (msgspec.DecodeError, TypeError) as exc:
            raise VerificationError("malformed", f"config is not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise VerificationError("malformed", "config is not a JSON object")
        return ResolvedConfig(data, env=self.env, tenant=self.tenant, secrets=self._secrets)

    def _apply_candidate(
        self, event: VerifiedEvent, trace_id: str
    ) -> tuple[ResolvedConfig, ResolvedConfig, bool] | None:
        """A candidate record: run its config when its rollout selects this instance
        (by labels and rank), go back to the snapshot when it no longer does (the
        rollout was promoted or aborted). (old, new, selected), or None when nothing
        changes here. Refused like any config when a validator says no."""
        tag = event.body.rollout
        assert tag is not None  # open_envelope refuses a candidate without one
        current = self._current
        # An instance the gates cannot see (no heartbeats, no acks) never takes part.
        seen = self.settings.send_acks and self.settings.heartbeat > 0
        selected = seen and tag.selects(self.settings.instance_id, self.settings.labels)
        if not selected or self.version == 0:
            self._candidate = event
            if self._candidate_base is None:
                return None
            self._candidate_base = None
            new, entries = self._composed(self._base, current.override)
            old = self._swap(
                Snapshot(new, current.version, current.event, current.trace_id,
                         current.override, entries)
            )  # fmt: skip
            return old, new, False
        staged = self._config_of(event)
        new, entries = self._composed(staged, current.override)
        self._validate(new)
        self._candidate, self._candidate_base = event, staged
        old = self._swap(
            Snapshot(new, current.version, current.event, trace_id or current.trace_id,
                     current.override, entries, "", event)
        )  # fmt: skip
        return old, new, True

    def _apply_override(
        self, event: VerifiedEvent, record: Record, trace_id: str
    ) -> tuple[ResolvedConfig, ResolvedConfig] | None:
        """Swap in a new override set on top of the snapshot; None when there is no
        snapshot yet (the set waits for it)."""
        state = parse_overrides(event, self.settings.limits)
        # The publisher publishes expiries: it may end overrides, never set one.
        known = self._current.override or self._pending
        trusted = self._trust.get(event.kid)
        publisher = trusted is not None and trusted.role == PUBLISHER
        if publisher and known is not None and not set(state.entries) <= set(known.entries):
            raise VerificationError(
                "untrusted_scope", f"key {event.kid!r} may end overrides, not set them"
            )
        if self.version == 0:
            self._pending = state
            return None
        new, entries = self._composed(self._candidate_base or self._base, state)
        self._validate(new)
        current = self._current
        old = self._swap(
            Snapshot(new, current.version, current.event, trace_id or current.trace_id,
                     state, entries, "", current.candidate)
        )  # fmt: skip
        return old, new

    def _composed(
        self, base: ResolvedConfig, override: OverrideState | None
    ) -> tuple[ResolvedConfig, tuple[OverrideEntry, ...]]:
        """`base` with the overrides in effect now on top, and those entries; the next
        expiry is scheduled by `_swap`."""
        if override is None:
            return base, ()
        now = now_ns()
        entries = override.active(now)
        if not entries:
            return base, ()
        data = compose(base.data, override.active_values(now))
        config = ResolvedConfig(data, env=self.env, tenant=self.tenant, secrets=self._secrets)
        return config, entries

    def _validate(self, config: ResolvedConfig) -> None:
        for validator in self._validators:
            try:
                verdict = validator(config)
            except Exception as exc:
                raise VerificationError("refused", f"{_name(validator)}: {_gist(exc)}") from None
            if inspect.isawaitable(verdict):  # an async callable that slipped past the check
                if inspect.iscoroutine(verdict):
                    verdict.close()
                raise VerificationError("refused", f"{_name(validator)} is async; not run")
            if verdict is False:
                raise VerificationError("refused", f"{_name(validator)} refused the config")

    def _swap(self, snapshot: Snapshot) -> ResolvedConfig:
        """Make `snapshot` current (the atomic swap), wake waiters, schedule the next
        expiry of its overrides; returns the config it replaced."""
        old = self._current.config
        note = self._signer_note(snapshot)
        if note != snapshot.signer_note:
            snapshot = dataclasses.replace(snapshot, signer_note=note)
        self._current = snapshot
        if self._changed is not None:
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()  # wakes every wait_for
        self._schedule_expiry()
        return old

    def _schedule_expiry(self) -> None:
        """Drop each override at its expiry, by this process's clock. Due is the first
        expiry among the entries composed into the current config, not among those the
        clock still finds in effect: one that ran out since it was composed is due now,
        where it would otherwise stay in effect with nothing left to drop it."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        entries = self._current.overrides
        if not entries or self._state == "stopped":
            return
        loop = asyncio.get_running_loop()
        due = min(entry.expires_at for entry in entries)
        delay = max(0.0, (due - now_ns()) / 1e9)
        self._expiry = loop.call_later(delay, self._start_expiry)

    def _start_expiry(self) -> None:
        self._expiry = None
        if self._state != "stopped" and (self._expiring is None or self._expiring.done()):
            self._expiring = asyncio.get_running_loop().create_task(self._expire())

    async def _expire(self) -> None:
        """Recompose without the overrides that expired. No validator can keep an
        expired override in effect."""
        async with self._applying:
            await self._expire_now()
        # Set the timer again: this may have woken early (a timer is not exact), and a
        # timer that fired while this awaited callbacks found it busy and was let go.
        self._schedule_expiry()

    async def _expire_now(self) -> None:
        current = self._current
        new, entries = self._composed(self._candidate_base or self._base, current.override)
        if entries == current.overrides:
            return  # woken early: nothing expired yet
        gone = [entry.path for entry in current.overrides if entry not in entries]
        old = self._swap(
            Snapshot(new, current.version, current.event, current.trace_id,
                     current.override, entries, "", current.candidate)
        )  # fmt: skip
        log.info(
            "%s/%s: override of %s expired; back to v%d",
            self.tenant,
            self.env,
            ", ".join(gone),
            current.version,
            extra={"tenant": self.tenant, "env": self.env, "version": current.version},
        )
        await self._run_callbacks(old, new, None, None)

    async def _run_callbacks(
        self,
        old: ResolvedConfig,
        new: ResolvedConfig,
        known: Sequence[str] | None,
        span: trace.Span | None,
    ) -> None:
        if not self._callbacks:
            return
        changed = list(known) if known is not None else changed_paths(old.data, new.data)
        for prefix, callback in self._callbacks:
            paths = [p for p in changed if not prefix or p == prefix or p.startswith(prefix + ".")]
            if not paths:
                continue
            try:
                result = callback(old, new, paths)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                if span is not None:
                    span.record_exception(exc, {"configbus.callback": _name(callback)})
                log.exception(
                    "%s/%s: change callback %s failed", self.tenant, self.env, _name(callback)
                )

    def _rejected(
        self,
        exc: VerificationError,
        event: VerifiedEvent | None,
        received_at: int,
        trace_id: str,
        span: trace.Span | None,
        channel: str = SNAPSHOT_CHANNEL,
        record: Record | None = None,
    ) -> None:
        self.rejected[exc.reason] = self.rejected.get(exc.reason, 0) + 1
        self.last_rejection = str(exc)
        if self.version == 0:
            self._start_rejections[exc.reason] += 1
        if span is not None:
            span.set_status(StatusCode.ERROR, exc.reason)
        rejected_counter.add(
            1, {"configbus.tenant": self.tenant, "configbus.env": self.env, "reason": exc.reason}
        )
        log.warning(
            "%s/%s: rejected %s, keeping v%d: %s",
            self.tenant,
            self.env,
            "an event" if channel == SNAPSHOT_CHANNEL else f"a record of the {channel} channel",
            self.version,
            exc,
            extra={"tenant": self.tenant, "env": self.env, "reason": exc.reason},
        )
        # Past its signature, a record's version is what a trusted key signed: say which
        # version is refused (an operator waits for the answer to it).
        signed = exc.reason not in _UNSIGNED and event is None and record is not None
        version = claimed_version(record.value) if signed and record is not None else 0
        self._ack(
            event, "rejected", str(exc), received_at, 0, trace_id, channel=channel, version=version
        )

    # -- the trust file -----------------------------------------------------------------
    async def _watch_trust(self) -> None:
        """Every `trust_reload` seconds: reload the trust file when it changed (one
        stat when it did not; the file is read off the event loop), and judge again
        the keys that signed what runs, by the clock too (a not_after passes without
        the file changing)."""
        while True:
            await asyncio.sleep(self.settings.trust_reload)
            await self._reload_trust()

    async def _reload_trust(self) -> None:
        trust_file = self._trust_file
        if trust_file is None:
            return
        if trust_file.check():
            await asyncio.to_thread(trust_file.reload)
        self._trust = trust_file.store
        self._judge_signers()

    def _judge_signers(self) -> None:
        """Say so, once, when the keys that signed what runs stop being believed (or
        are believed again): in the snapshot, the log, and the last applied ack, sent
        again with the news. The config itself stays."""
        current = self._current
        if current.version == 0 or self._signer_note(current) == current.signer_note:
            return
        self._swap(dataclasses.replace(current))  # `_swap` sets the note, wakes waiters
        note = self._current.signer_note
        if note:
            log.warning(
                "%s/%s: v%d keeps running, but its signer is no longer trusted: %s",
                self.tenant,
                self.env,
                current.version,
                note,
                extra={"tenant": self.tenant, "env": self.env, "version": current.version},
            )
        else:
            log.info(
                "%s/%s: the signer of v%d is trusted again", self.tenant, self.env, current.version
            )
        if self._applied_ack is not None and self.settings.send_acks:
            self._applied_ack = msgspec.structs.replace(
                self._applied_ack, signer_trusted=not note, signer_note=_bounded(note)
            )
            self._send_ack(self._applied_ack)

    def _signer_note(self, snapshot: Snapshot) -> str:
        """ "" when the trust store in force would still believe every event `snapshot`
        runs on (the snapshot's, and the override set's when entries of it are in
        effect); else which key, and why not."""
        notes = []
        override = snapshot.override.event if snapshot.override is not None else None
        override = override if snapshot.overrides else None
        now = now_ns()
        for event in (snapshot.event, override, snapshot.candidate):
            if event is None:
                continue
            trusted = self._trust.get(event.kid)
            if trusted is None:
                notes.append(f"unknown_key: key {event.kid!r} is no longer in the trust file")
            elif (standing := trusted.standing(now)) is not None:
                notes.append(f"{standing[0]}: {standing[1]}")
            elif not trusted.covers(self.tenant, self.env) or (
                event is not override and trusted.role != PUBLISHER
            ):
                notes.append(f"untrusted_scope: key {event.kid!r} no longer covers this stream")
        return "; ".join(notes)

    # -- presence ---------------------------------------------------------------------
    async def _heartbeats(self) -> None:
        """Every `heartbeat` seconds, and at once after an apply: run the health checks
        and say what this instance is, runs, and how it is (docs/rollouts.md)."""
        while True:
            self._beat_now.clear()
            await self._check_health()
            self._send_ack(self._heartbeat())
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that comes as its timeout fires, and stop() would wait for nothing.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.heartbeat):
                    await self._beat_now.wait()

    async def _check_health(self) -> None:
        healthy, note = True, ""
        for check in self._health_checks:
            try:
                verdict = check()
                if inspect.isawaitable(verdict):
                    async with asyncio.timeout(_HEALTH_TIMEOUT_S):
                        verdict = await verdict
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failing check is an answer, not a crash
                healthy, note = False, f"{_name(check)}: {_gist(exc) or exc.__class__.__name__}"
                break
            if verdict is False:
                healthy, note = False, f"{_name(check)} says unhealthy"
                break
        if (healthy, note) != (self.healthy, self.health_note):
            (log.info if healthy else log.warning)(
                "%s/%s: %s", self.tenant, self.env, "healthy again" if healthy else note
            )
        self.healthy, self.health_note = healthy, _bounded(note)

    def _heartbeat(self) -> Ack:
        now = time.time_ns()
        current = self._current
        return Ack(
            tenant=self.tenant,
            env=self.env,
            version=current.version,
            instance=self.settings.instance_id,
            service=self.settings.service,
            status="heartbeat",
            config_hash=current.config_hash,
            received_at=now,
            applied_at=now,
            channel=PRESENCE_CHANNEL,
            signer_trusted=current.signer_trusted,
            signer_note=_bounded(current.signer_note),
            labels=dict(self.settings.labels),
            started_at=self._started_at,
            heartbeat_ms=int(self.settings.heartbeat * 1000),
            healthy=self.healthy,
            health_note=self.health_note,
            candidate_version=current.candidate_version,
        )

    # -- acknowledgements -----------------------------------------------------------
    def _ack(
        self,
        event: VerifiedEvent | None,
        status: str,
        reason: str,
        received_at: int,
        applied_at: int,
        trace_id: str,
        startup: bool = False,
        channel: str = SNAPSHOT_CHANNEL,
        version: int = 0,
    ) -> None:
        """Hand an ack to the agent or to the process's ack sender; never waits."""
        if not self.settings.send_acks:
            return
        body = event.body if event is not None else None
        reason = _bounded(reason)  # a record's text can be any length
        ack = Ack(
            tenant=self.tenant,
            env=self.env,
            version=body.version if body is not None else max(version, 0),
            instance=self.settings.instance_id,
            service=self.settings.service,
            status=status,
            reason=reason,
            config_hash=body.config_hash if body is not None else "",
            detected_at=body.detected_at if body is not None else 0,
            issued_at=body.issued_at if body is not None else 0,
            received_at=received_at,
            applied_at=applied_at,
            trace_id=trace_id,
            startup=startup,
            channel=channel,
            signer_trusted=self._current.signer_trusted,
            signer_note=_bounded(self._current.signer_note),
        )
        if status == "applied" and channel == SNAPSHOT_CHANNEL:
            self._applied_ack = ack
        self._send_ack(ack)

    def _send_ack(self, ack: Ack) -> None:
        # Keyed per instance, channel and status, so compaction keeps the last applied
        # and the last rejected ack of every instance on each channel.
        key = ack.key
        value = _ack_encoder.encode(ack)
        if self._link is not None:
            self._link.ack(key, value)
        elif self._sender is not None:
            self._sender.put(key, value)
        else:
            self._unsent.append((key, value))  # until the agent or Kafka is there

    # -- the disk cache ---------------------------------------------------------------
    def _cache_file(self, channel: str = SNAPSHOT_CHANNEL) -> Path | None:
        folder = self.settings.cache_dir
        suffix = "event" if channel == SNAPSHOT_CHANNEL else channel
        return folder / f"{self.tenant}.{self.env}.{suffix}" if folder is not None else None

    async def _load_cache(self) -> bool:
        """Apply the cached snapshot, then the cached overrides on top (those expired
        meanwhile stay dropped); True when the snapshot applied."""
        applied = False
        for key, channel in self._keys.items():
            path = self._cache_file(channel)
            if path is None or not path.exists():
                continue
            try:
                value = await asyncio.to_thread(path.read_bytes)
            except OSError as exc:
                log.warning("%s: cannot read the config cache: %s", path, exc.strerror)
                continue
            record = Record(str(path), 0, 0, key, value, (), 0)
            if await self._handle(record, source="cache"):
                log.info("%s/%s: %s applied from %s", self.tenant, self.env, channel, path)
                applied = applied or channel == SNAPSHOT_CHANNEL
            else:
                log.warning("%s: the cached %s did not apply; ignoring it", path, channel)
        return applied

    def _write_cache(self, record: Record, channel: str = SNAPSHOT_CHANNEL) -> None:
        """Write the record to the disk cache in the background: the latest one of each
        channel wins when several come faster than the disk."""
        if self.settings.cache_dir is None or record.value is None:
            return
        self._cache_values[channel] = record.value
        if self._cache_task is None or self._cache_task.done():
            self._cache_task = asyncio.create_task(self._cache_writer())

    async def _cache_writer(self) -> None:
        while self._cache_values:
            channel, value = self._cache_values.popitem()
            path = self._cache_file(channel)
            assert path is not None

            def write(value: bytes = value, path: Path = path) -> None:
                path.parent.mkdir(parents=True, exist_ok=True)
                temporary = path.with_name(path.name + ".tmp")
                temporary.write_bytes(value)
                os.replace(temporary, path)  # atomic: a crash leaves the old file or the new

            try:
                await asyncio.to_thread(write)
            except OSError as exc:
                log.warning("%s: cannot write the config cache: %s", path, exc.strerror)


def _bounded(text: str) -> str:
    """Text for an ack, at most `_REASON_LIMIT` characters."""
    return text if len(text) <= _REASON_LIMIT else text[: _REASON_LIMIT - 3] + "..."


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
