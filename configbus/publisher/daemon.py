"""The publisher daemon: watch for speed, reconcile for correctness.

Tasks, all in one event loop and each under `configbus.supervise.supervise` (a task
that fails is logged and started again after a backoff; none dies silently):

- the file watcher (watchfiles, on the tree's directory) marks the streams a changed
  file feeds as dirty, through an index from file to streams;
- the store watcher (Redis keyspace notifications) marks a stream dirty when an
  operator writes its store, and every stored stream after Redis comes back;
- the reconcile loop marks every stream dirty every `reconcile_interval` seconds,
  catching whatever a notification missed (and rebuilding the index);
- the worker publishes dirty streams. A Kafka failure puts them back and retries
  with backoff: an outage delays publication, never loses it. A stream that cannot be
  published as it is (broken input, over a limit) is logged once and waits for its
  input to change; the others go on;
- the heartbeat writes the daemon's signed heartbeat to the state topic;
- the override keeper follows the streams' emergency overrides and, while this daemon
  is the writer, publishes each expiry (configbus/publisher/overrides.py).

With `settings.http`, ``/healthz``, ``/readyz`` and ``/metrics`` are served on the same
loop from the moment `start()` begins (configbus/publisher/monitor.py says what they
answer; `http.port` is the port bound).

One writer per cluster and topic prefix: the transactional id is derived from the
topic prefix, so any two publishers of the same topics fence each other, and a daemon
that sees another writer's heartbeats arrive stays on standby until they stop. A
daemon fenced by another goes on standby; it never publishes over it.

`stop()` (or SIGTERM/SIGINT through `run`, at any point, also while Kafka is
unreachable at start) stops the watchers, lets the worker finish what it holds within
`shutdown_grace`, resigns as writer, then closes the connections.

Keys: the signing key's kid is `--kid`, or else the trust file's entry whose public key
it is. A key the trust file lists as revoked, expired, not yet valid, or under its kid
with another public key, is refused at start. `reload_keys()` (SIGHUP through `run`)
reads the signing key and the trust file again: the way to switch to a new key without
a restart (docs/operators.md). Every stream whose latest version another key signed is
then published again, same content, new version, signed with the new key, so the old
key can be retired without leaving any stream signed only by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import watchfiles

from configbus.bus import CANDIDATE_CHANNEL, ROLLOUT_CHANNEL, WAIVER_CHANNEL, Bus, KafkaBus, Record
from configbus.compliance import gate as compliance_gate
from configbus.crypto import PUBLISHER, KeyProvider, LocalKeyProvider, SigningKey, TrustStore
from configbus.crypto.keys import check_kid, load_private_key
from configbus.errors import (
    ActiveWriterError,
    BusError,
    ConfigBusError,
    FencedError,
    KeyringError,
    TreeError,
    VerificationError,
)
from configbus.events import Cause, now_ns
from configbus.health import HealthServer
from configbus.limits import DEFAULT_LIMITS
from configbus.ops.waivers import WaiverBook
from configbus.publisher.authors import Authors
from configbus.publisher.core import Change, Outgoing, Publisher, PublishReport
from configbus.publisher.monitor import DaemonMonitor
from configbus.publisher.overrides import OverrideKeeper
from configbus.publisher.rollouts import RolloutDriver
from configbus.publisher.secrets import SecretKeeper
from configbus.publisher.settings import PublisherSettings
from configbus.publisher.state import WRITER_KEY, WriterBeat, open_signed, recover, seal_signed
from configbus.store import TenantStore
from configbus.supervise import Backoff, finish, supervise
from configbus.tree import EnvironmentTree, ResolvedConfig
from configbus.tree.tree import TENANTS_DIR

__all__ = ["Daemon", "StreamIndex", "publish_once", "run"]

log = logging.getLogger(__name__)

Stream = tuple[str, str]


class StreamIndex:
    """Which streams each file feeds: a change to ``dev/dev.yml`` touches every
    tenant's dev stream and nothing else."""

    def __init__(self, tree: EnvironmentTree) -> None:
        self.tree = tree
        self.streams: list[Stream] = []
        self.known: frozenset[Stream] = frozenset()  # the same, to look up
        self._by_file: dict[str, set[Stream]] = {}

    def rebuild(self) -> None:
        by_file: dict[str, set[Stream]] = {}
        streams = []
        for tenant, env in self.tree.streams():
            streams.append((tenant, env))
            try:
                layers = self.tree.layers(env, tenant)
            except TreeError:
                continue  # a broken stream: every change re-resolves it (see affected)
            for layer in layers:
                by_file.setdefault(layer.source, set()).add((tenant, env))
        self.streams, self._by_file = streams, by_file
        self.known = frozenset(streams)

    def affected(self, paths: Iterable[str]) -> tuple[set[Stream], bool]:
        """The streams the changed `paths` feed, and whether the index must be rebuilt
        (a file it does not know: a new layer, a tenant declaration, a new folder)."""
        found: set[Stream] = set()
        rebuild = False
        tenants_dir = os.path.join(str(self.tree.root), TENANTS_DIR) + os.sep
        for path in paths:
            known = self._by_file.get(path)
            if known is not None and not path.endswith(os.sep + "tenant.yml"):
                found |= known
                continue
            rebuild = True
            if path.startswith(tenants_dir):
                tenant = path[len(tenants_dir) :].split(os.sep, 1)[0]
                found |= {s for s in self.streams if s[0] == tenant}
            else:
                found |= set(self.streams)  # unknown shared file: look at everything
        return found, rebuild


@dataclass(slots=True)
class _Dirty:
    """Streams waiting to be published, each with the earliest change seen."""

    changes: dict[Stream, Change] = field(default_factory=dict)
    event: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, streams: Iterable[Stream], change: Change) -> None:
        for stream in streams:
            known = self.changes.get(stream)
            if known is None:
                self.changes[stream] = change
            elif known.cause != change.cause:
                sources = tuple(dict.fromkeys(known.cause.sources + change.cause.sources))
                cause = Cause(sources=sources, actor=known.cause.actor, reason=known.cause.reason)
                self.changes[stream] = Change(min(known.detected_at, change.detected_at), cause)
        if self.changes:
            self.event.set()

    def take(self) -> dict[Stream, Change]:
        taken, self.changes = self.changes, {}
        self.event.clear()
        return taken


class Daemon:
    """The publisher daemon. `async with Daemon(settings)` or start()/stop()."""

    def __init__(self, settings: PublisherSettings, *, bus: Bus | None = None) -> None:
        self.settings = settings
        self.bus: Bus = bus or KafkaBus(settings.kafka)
        self.key, trust_file = load_signing_key(settings)
        self.trust = _recovery_trust(self.key, trust_file)  # publisher keys only
        self.override_trust = _override_trust(self.key, trust_file)  # operators' too
        self.tree = EnvironmentTree(settings.root)
        self.index = StreamIndex(self.tree)
        self.authors = Authors(self.tree.root)  # who a file edit is credited to
        self.store = TenantStore(settings.redis_url) if settings.redis_url else None
        self.admin = self.bus.admin()
        self.producer = self.bus.producer(transactional_id=settings.topics.transactional_id)
        self.publisher = Publisher(
            self.tree,
            self.key,
            self.producer,
            self.admin,
            settings.topics,
            store=self.store,
            batch_size=settings.batch_size,
        )
        self.writer = f"{settings.actor}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self.overrides = OverrideKeeper(
            self.bus,
            settings.topics,
            self.key,
            self.override_trust,
            actor=settings.actor,
            is_writer=lambda: self.active.is_set(),
            on_record=self._tenant_record,
            on_ack=lambda record: self.rollouts.observe(record),
        )
        self.rollouts = RolloutDriver(
            settings.topics,
            self.tree,
            self.key,
            self.trust,
            self.override_trust,
            actor=settings.actor,
            is_writer=lambda: self.active.is_set(),
            caught_up=lambda: self.overrides.rounds > 0,
            stable=lambda stream: self.publisher.states.get(stream),
            send=self._send_rollout,
            promote=self._promote,
            look_again=lambda stream, change: self._dirty.add(
                [stream], change or self._change("rollout armed", ())
            ),
        )
        self.rollouts.fleet.accept = lambda stream: stream in self.index.known
        self.publisher.stage = self.rollouts.stage
        self.publisher.settled = self.rollouts.settled
        self.waivers = WaiverBook(settings.topics, self.override_trust)
        self.publisher.gate = self.rollouts.gate = self._gate
        self.secrets = SecretKeeper(
            self.bus,
            settings.topics,
            self.trust,
            self.tree,
            self.store,
            _secret_keys(settings.secret_keys),
            actor=settings.actor,
            is_writer=lambda: self.active.is_set(),
            interval=settings.secret_interval,
        )
        self.ready = asyncio.Event()  # set after the first publication round
        self.active = asyncio.Event()  # set while this daemon is the writer
        self.stopped = asyncio.Event()
        self.takeovers = 0  # times another writer fenced this one
        self._dirty = _Dirty()
        self._stop_watching = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._worker: asyncio.Task[None] | None = None
        self._warming: asyncio.Task[None] | None = None
        self._writing = asyncio.Lock()  # one transaction at a time: publications, beats
        self._broken = False  # a publication failed: reconnect before the next
        self._reported: dict[Stream, str] = {}  # config hash last reported to the store
        self._in_flight: dict[Stream, Change] = {}  # the worker's round, while it runs
        self._later: set[Stream] = set()  # put back for later (Redis unreachable)
        self._started_at = time.monotonic()
        self._stopping = False
        self.monitor = DaemonMonitor(self)  # what /healthz, /readyz and /metrics say
        self.publisher.observer = self.monitor
        self.http: HealthServer | None = None  # serving them, with settings.http

    def reload_keys(self) -> bool:
        """Read the signing key and the trust file again (SIGHUP): switch to the key
        the settings now point at, and believe what the trust file now says. Every
        stream is looked at again, and one signed last by another key is published
        again with this one. A key or trust file that does not load (or a key the
        trust file does not allow) changes nothing: one log line, and False."""
        try:
            key, trust_file = load_signing_key(self.settings)
        except ConfigBusError as exc:
            log.error("keys not reloaded, still signing with %s: %s", self.key.kid, exc)
            return False
        previous, self.key = self.key, key
        self.trust = _recovery_trust(key, trust_file)
        self.override_trust = _override_trust(key, trust_file)
        self.publisher.key = key
        self.overrides.key, self.overrides.trust = key, self.override_trust
        self.rollouts.key, self.rollouts.trust = key, self.trust
        self.rollouts.operators = self.override_trust
        self.waivers.trust = self.override_trust  # a waiver by a key now revoked ends
        self.secrets.trust = self.trust
        if key.kid != previous.kid:
            log.info("signing with key %s from now on (was %s)", key.kid, previous.kid)
        else:
            log.info("keys reloaded; signing with %s", key.kid)
        self._dirty.add(self.index.streams, self._change(f"signing key {key.kid}", ()))
        return True

    @property
    def stopping(self) -> bool:
        """Whether `stop()` has begun."""
        return self._stopping

    @property
    def uptime(self) -> float:
        """Seconds since this daemon was made."""
        return time.monotonic() - self._started_at

    def pending_streams(self) -> set[Stream]:
        """Streams changed and not published yet: waiting for the worker, in the round
        it runs, or put back for later (their store could not be read)."""
        return set(self._dirty.changes) | set(self._in_flight) | self._later

    @property
    def fenced(self) -> bool:
        """Whether another writer has taken over and this daemon is on standby."""
        return self._worker is not None and not self.active.is_set()

    async def start(self) -> Daemon:
        """Connect (retrying while Kafka is down), wait on standby while another writer
        is alive, fence older publishers, recover versions from Kafka, and start
        watching. Returns once the first reconcile is queued. Cancellable."""
        if self._worker is not None:
            return self
        if self.settings.http is not None and self.http is None:  # alive while connecting
            server = HealthServer(self.settings.http, self.monitor, name="publisher")
            self.http = await server.start()
        self.rollouts.driving = True  # before the first round: it may stage
        try:
            await self._connect()
        except BaseException:  # a start that fails for good (or is cancelled) serves nothing
            http, self.http = self.http, None
            if http is not None:
                await http.stop()
            raise
        self.index.rebuild()
        start = self._change("start", ())
        self.monitor.reconcile_started(start)
        for stream, change in (await self._changes_at_start(self.index.streams, start)).items():
            self._dirty.add([stream], change)
        self._worker = self._spawn("publish", self._work)
        # Once, in the background: the git authors of the tree's files (see Authors).
        self._warming = asyncio.create_task(self.authors.warm(), name="warm-authors")
        self._tasks = [
            self._spawn("watch-files", self._watch_files),
            self._spawn("reconcile", self._reconcile_loop),
            self._spawn("heartbeat", self._heartbeat_loop),
            self._spawn("overrides", self.overrides.run),
            self._spawn("rollouts", self.rollouts.run),
            self._spawn("secrets", self.secrets.run),
        ]
        if self.store is not None:
            self._tasks.append(self._spawn("watch-store", self._watch_store, Backoff(0.1, 1.0)))
        return self

    def _spawn(self, name: str, body: Any, backoff: Backoff | None = None) -> asyncio.Task[None]:
        failed = functools.partial(self.monitor.task_failed, name)
        supervised = supervise(f"publisher {name}", body, backoff, on_failure=failed)
        return asyncio.create_task(supervised, name=name)

    async def _connect(self, claim: Callable[[], Awaitable[None]] | None = None) -> None:
        """Connect, become the writer (`claim`, by default waiting on standby while
        another writer is alive) and recover, retrying while Kafka is unreachable."""
        backoff = Backoff(0.2, 5.0)
        while True:
            try:
                await self.admin.start()
                topics = self.settings.topics
                await self.admin.ensure_topics([topics.acks, topics.state], compact=True)
                await (claim or self._claim)()
                await self._recover()
                await self._recover_rollouts()
                break
            except BusError as exc:
                if not exc.retriable:
                    raise
                delay = backoff.delay()
                log.warning("waiting for kafka: %s (retry in %.1fs)", exc, delay)
                self.monitor.kafka_failed("connect", exc)
                await self.producer.stop()
                await self.admin.stop()
                await asyncio.sleep(delay)
        if self.store is not None:
            try:
                await self.store.start()
                await self.store.enable_notifications()
                await self._store_beat()
            except BusError as exc:  # the store watcher keeps trying; files publish meanwhile
                log.warning("redis unreachable at start: %s", exc)
                self.monitor.redis_failed("connect", exc)

    async def _changes_at_start(
        self, streams: Iterable[Stream], start: Change
    ) -> dict[Stream, Change]:
        """Why each stream is looked at on start: an operator's store write made while no
        daemon ran (newer than the stream's last version) keeps its actor and reason;
        anything else is `start`, the daemon's own reconcile."""
        changes = dict.fromkeys(streams, start)
        if self.store is None:
            return changes
        try:
            async with asyncio.timeout(2.0):
                stored = set(await self.store.streams()) & changes.keys()
                for tenant, env in sorted(stored):
                    meta = await self.store.meta(tenant, env)
                    state = self.publisher.states.get((tenant, env))
                    at = meta.get("at")
                    if not isinstance(at, int) or (state is not None and at <= state.issued_at):
                        continue
                    actor, reason = _meta(meta, f"{tenant}/{env}")
                    cause = Cause(
                        sources=(f"redis:{self.store.store_key(tenant, env)}",),
                        actor=actor or self.settings.actor,
                        reason=reason or "store changed",
                    )
                    changes[(tenant, env)] = Change(start.detected_at, cause)
        except (ConfigBusError, TimeoutError) as exc:
            log.debug("store writes made while stopped are credited to the daemon: %s", exc)
        return changes

    async def _recover(self) -> None:
        """The versions and the audit chain's head from Kafka. What this daemon itself
        committed is never forgotten: Kafka found with less (topics being restored, a
        cluster wiped under it) would otherwise have versions start again below what
        instances run, and a second chain start at link 1."""
        recovery = await recover(self.bus, self.settings.topics, self.trust)
        known = self.publisher.states
        for stream, state in known.items():
            found = recovery.states.get(stream)
            if found is None or found.version < state.version:
                recovery.states[stream] = state
        self.publisher.states = recovery.states
        chain, ours = recovery.chain, self.publisher.chain
        if chain is None or chain.seq < ours.seq:
            chain = ours
        self.publisher.chain = chain
        self.publisher.forget_topics()
        (log.warning if recovery.skipped else log.info)("%s", recovery.summary())

    def _tenant_record(self, record: Record) -> None:
        """A tenant-topic record other than an override: a rollout's, or a waiver,
        which has the stream looked at again (a change it held may pass now)."""
        self.rollouts.received(record)
        stream = self.waivers.received(record)
        if stream is not None and self.active.is_set():
            self._dirty.add([stream], self._change("compliance waiver", ()))

    def _gate(self, stream: Stream, config: ResolvedConfig) -> tuple[str, tuple[str, ...]]:
        """The compliance gate of a changed config: a refusal naming the blocking rules
        it breaks that no waiver in force lifts, else ""; and the rules waived."""
        tenant, env = stream
        if env not in self.settings.gate_envs:
            return "", ()
        try:
            regimes = self.tree.tenant(tenant).compliance
            failed = compliance_gate(config.data, tenant=tenant, env=env, regimes=regimes)
        except ConfigBusError as exc:  # a pack that does not load: nothing passes
            return f"compliance gate: the rule packs do not load: {exc}", ()
        waivers = self.waivers.active(stream, now_ns())
        waived = tuple(f.rule for f in failed if f.rule in waivers)
        blocking = [f for f in failed if f.rule not in waivers]
        if not blocking:
            return "", waived
        shown_rules = "; ".join(
            f"{f.rule} ({f.found or 'not set'}; expected {f.expected})" for f in blocking[:3]
        )
        more = f" and {len(blocking) - 3} more" if len(blocking) > 3 else ""
        return (
            f"compliance gate: {len(blocking)} blocking rule(s) fail: {shown_rules}{more} "
            f"(fix the config, or `configbus compliance waive {tenant} {env} RULE`)",
            waived,
        )

    async def _recover_rollouts(self) -> None:
        """Read the staged rollouts and operators' rollout commands back from the tenant
        topics before the first round: a change staged, held after an abort or armed
        by `rollout start` must not be published at once because this daemon is new.
        And the compliance waivers, which one-shot writers need too."""
        names = self.settings.topics
        tenant_topics = sorted(t for t in await self.admin.topics() if names.tenant_of(t))
        # A one-shot writer stages nothing, but gates what it publishes: waivers only.
        wanted = (CANDIDATE_CHANNEL, ROLLOUT_CHANNEL) if self.rollouts.driving else ()
        if tenant_topics:  # none on a new cluster
            async with contextlib.aclosing(self.bus.read_to_end(tenant_topics)) as records:
                async for record in records:
                    channel = names.channel_of(record.key)[1]
                    if channel in wanted:
                        self.rollouts.received(record)
                    elif channel.startswith(f"{WAIVER_CHANNEL}/"):
                        self.waivers.received(record)
        if self.rollouts.driving:
            self.rollouts.recovered()

    async def claim_once(self, *, take_over: bool = False) -> None:
        """For a one-shot writer (`publish_once`, `configbus rollback`), instead of
        `start()`: connect, become the writer and recover the versions; no task runs.
        Raises `ActiveWriterError` while another writer's heartbeats arrive, unless
        `take_over` (that one then stands by until this one resigns, in `stop()`)."""

        async def claim() -> None:
            if not take_over and (other := await self._live_writer()) is not None:
                raise ActiveWriterError(
                    f"a publisher daemon is active on these topics ({other}); it publishes "
                    "the tree itself. Pass --take-over to publish from here anyway"
                )
            await self._claim(take_over=True)

        await self._connect(claim)

    async def publish_round(
        self, publish: Callable[[Publisher], Awaitable[PublishReport]]
    ) -> PublishReport:
        """Run `publish` on the publisher as the writer (one transaction at a time), then
        tell operators' tools what became of the streams (see `_report`)."""
        async with self._writing:
            report = await publish(self.publisher)
        await self._report(report)
        return report

    # -- one writer -------------------------------------------------------------------
    async def _claim(self, *, take_over: bool = False) -> None:
        """Become the writer: first wait while another writer's heartbeats arrive (unless
        `take_over`), then start the producer, which fences any other with our id."""
        waited = False
        while not take_over and (other := await self._live_writer()) is not None:
            self.monitor.standing_by(other)
            if not waited:
                log.warning("another publisher is active (%s): standing by", other)
                waited = True
        async with self._writing:
            await self.producer.restart()
            await self._beat()
        self.active.set()
        self.monitor.standing_by_for = ""
        if waited:
            log.info("taking over as the writer")

    async def _live_writer(self) -> str | None:
        """The writer whose heartbeats are arriving, or None: its last beat is ours, or
        resigned, or older than the silence it announced (`grace`: three intervals plus
        its publish timeout, since a long publication round holds the beats back), or
        no new beat comes before that silence is up."""
        reader = self.bus.reader(self.settings.topics.state)
        try:
            if not await reader.start():
                return None
            record = await reader.latest(WRITER_KEY)
            last = self._beat_of(record.value if record is not None else None)
            if last is None or last.writer == self.writer or last.interval <= 0:
                return None
            grace = last.grace or 3 * last.interval
            silent = (time.time_ns() - last.at) / 1e9
            if silent > grace:
                return None
            deadline = time.monotonic() + grace - silent
            while time.monotonic() < deadline:
                for record in await reader.poll(200):
                    beat = self._beat_of(record.value) if record.key == WRITER_KEY else None
                    if beat is not None and beat.writer != self.writer:
                        return beat.writer if beat.interval > 0 else None
            return None
        finally:
            await reader.stop()

    def _beat_of(self, value: bytes | None) -> WriterBeat | None:
        if value is None:
            return None
        try:
            return open_signed(value, self.trust, WriterBeat)
        except VerificationError as exc:
            log.warning("ignoring a writer heartbeat that does not verify: %s", exc)
            return None

    async def _beat(self, *, interval: float | None = None) -> None:
        """Write one heartbeat (interval 0: resigning). Call holding `_writing`."""
        beat = WriterBeat(
            writer=self.writer,
            at=time.time_ns(),
            interval=self.settings.heartbeat_interval if interval is None else interval,
            grace=3 * self.settings.heartbeat_interval + self.settings.publish_timeout,
        )
        try:
            # Bounded: aiokafka retries a transaction against a dead broker forever, and
            # a beat holds `_writing`, which publication waits for.
            async with asyncio.timeout(self.settings.publish_timeout):
                async with self.producer.transaction():
                    sent = await self.producer.send(
                        self.settings.topics.state, seal_signed(beat, self.key), key=WRITER_KEY
                    )
                    await sent
        except TimeoutError:
            raise BusError(
                f"heartbeat: kafka did not confirm within {self.settings.publish_timeout:g}s"
            ) from None
        self.monitor.kafka_ok()
        if beat.interval > 0:
            await self._store_beat()

    async def _store_beat(self) -> None:
        """Tell operators' tools through Redis that this daemon publishes (best effort)."""
        if self.store is None or not self.active.is_set():
            return
        try:
            async with asyncio.timeout(1.0):
                ttl = 3 * self.settings.heartbeat_interval
                await self.store.publisher_heartbeat(self.writer, ttl)
        except (ConfigBusError, TimeoutError) as exc:
            self.monitor.redis_failed("heartbeat", exc)
        else:
            self.monitor.redis_ok()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            if not self.active.is_set():
                continue
            try:
                async with self._writing:
                    await self._beat()
            except FencedError as exc:
                self._fenced(exc)
            except BusError as exc:
                # The producer may be unusable now: the worker reconnects before it
                # publishes again (woken here, so it does not wait for a change).
                log.warning("heartbeat failed: %s", exc)
                self.monitor.kafka_failed("heartbeat", exc)
                self._broken = True
                self._dirty.event.set()

    def _fenced(self, exc: FencedError) -> None:
        if self.active.is_set():
            log.error("another publisher took over; standing by: %s", exc)
            self.takeovers += 1
        self.active.clear()
        self._broken = True
        self._dirty.event.set()  # the worker claims the role back once the other resigns

    # -- lifecycle ----------------------------------------------------------------------
    async def stop(self) -> None:
        """Stop watching, let the worker finish within the grace period, resign as the
        writer, disconnect. Safe to call twice, and after a cancelled start."""
        self._stopping = True
        self._stop_watching.set()
        await finish(self._warming, "publisher warm-authors")
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            await finish(task, f"publisher {task.get_name()}")
        worker, self._worker = self._worker, None
        if worker is not None:
            self._dirty.event.set()  # wake it so it can see the stop
            try:
                await asyncio.wait_for(worker, self.settings.shutdown_grace)
            except TimeoutError:
                log.warning("gave up waiting for in-flight publications")
            except asyncio.CancelledError:
                if not worker.cancelled():
                    raise
        if self.active.is_set():
            self.active.clear()
            with contextlib.suppress(ConfigBusError, TimeoutError):
                async with asyncio.timeout(2.0), self._writing:
                    await self._beat(interval=0)  # resign: a successor need not wait
            if self.store is not None:
                with contextlib.suppress(ConfigBusError, TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self.store.publisher_resign(self.writer)
        await self.producer.stop()
        await self.admin.stop()
        if self.store is not None:
            await self.store.stop()
        http, self.http = self.http, None
        if http is not None:
            await http.stop()
        self.stopped.set()

    async def __aenter__(self) -> Daemon:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- tasks ----------------------------------------------------------------------
    def _change(self, reason: str, sources: Iterable[str], actor: str | None = None) -> Change:
        cause = Cause(sources=tuple(sources), actor=actor or self.settings.actor, reason=reason)
        return Change(now_ns(), cause)

    async def _work(self) -> None:
        """Publish whatever is dirty; on a failure put it back, back off, reconnect.
        Nothing is published again until the versions are re-read from Kafka."""
        dirty, backoff = self._dirty, Backoff(0.1, 5.0)
        while True:
            await dirty.event.wait()
            if self._stop_watching.is_set() and not dirty.changes:
                return
            if not self.active.is_set() or self._broken:
                try:
                    await self._reconnect()
                except BusError as exc:
                    log.warning("kafka still unreachable: %s", exc)
                    self.monitor.kafka_failed("connect", exc)
                    await backoff.sleep()
                    continue
            taken = dirty.take()
            self._in_flight, started = taken, time.perf_counter()
            try:
                try:
                    async with asyncio.timeout(self.settings.publish_timeout), self._writing:
                        report = await self._publish(taken)
                except TimeoutError:
                    # aiokafka retries a transaction against a dead broker forever;
                    # give up on this attempt, reconnect, and try again.
                    raise BusError(
                        f"kafka did not confirm within {self.settings.publish_timeout:g}s"
                    ) from None
            except Exception as exc:  # the worker must outlive any one failure
                self._in_flight = {}
                self._requeue(taken)
                if isinstance(exc, FencedError):
                    self._fenced(exc)
                    continue
                delay = backoff.delay()
                if isinstance(exc, BusError):
                    self.monitor.kafka_failed("publish", exc)
                if isinstance(exc, ConfigBusError):
                    log.warning("publication failed, retrying in %.2fs: %s", delay, exc)
                else:
                    log.exception("publication failed unexpectedly, retrying in %.2fs", delay)
                self._broken = True
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            self._in_flight = {}
            self.monitor.round_done(taken, report, started)
            if report.pending:  # Redis unreachable for streams never read: later
                retry = {s: taken[s] for s in report.pending if s in taken}
                self._later |= retry.keys()
                asyncio.get_running_loop().call_later(1.0, self._requeue, retry)
            if report.published or report.failed or report.pending:
                log.info("publish: %s", report.summary())
            await self._report(report)
            self.ready.set()
            if self._stop_watching.is_set() and not dirty.changes:
                return

    def _sound(self) -> None:
        """Refuse to write while the last transaction's outcome is unknown: it may have
        landed, and the versions and the audit chain must be read back first. The
        worker is woken to reconnect; the caller tries again later."""
        if self._broken:
            self._dirty.event.set()
            raise BusError("a transaction failed: reconnecting to Kafka first")

    def _failed(self) -> None:
        self._broken = True
        self._dirty.event.set()  # the worker reconnects now, not at the next change

    async def _send_rollout(self, tenant: str, records: Sequence[Outgoing]) -> None:
        """A rollout's records, in one transaction, as the writer."""
        self._sound()
        try:
            async with asyncio.timeout(self.settings.publish_timeout), self._writing:
                await self.publisher.send_records(tenant, records)
        except TimeoutError:
            self._failed()
            raise BusError(
                f"kafka did not confirm within {self.settings.publish_timeout:g}s"
            ) from None
        except FencedError as exc:
            self._fenced(exc)
            raise
        except BusError as exc:
            self.monitor.kafka_failed("rollout", exc)
            self._failed()
            raise

    async def _promote(
        self, stream: Stream, config: ResolvedConfig, change: Change, extra: Sequence[Outgoing]
    ) -> bool:
        """A rollout's candidate, published as the stream's next snapshot version."""
        self._sound()
        try:
            async with asyncio.timeout(self.settings.publish_timeout):
                with self.monitor.promoting(stream):
                    report = await self.publish_round(
                        lambda publisher: publisher.publish_promoted(stream, config, change, extra)
                    )
        except TimeoutError:
            self._failed()
            raise BusError(
                f"kafka did not confirm within {self.settings.publish_timeout:g}s"
            ) from None
        for failed, reason in report.failed.items():
            log.error("%s/%s: the promoted candidate was refused: %s", *failed, reason)
        return bool(report.published)

    def _requeue(self, taken: dict[Stream, Change]) -> None:
        self._later -= taken.keys()
        for stream, change in taken.items():
            self._dirty.add([stream], change)

    async def _reconnect(self) -> None:
        """A fresh producer (a failed transaction can leave the old one unusable), the
        writer's role again (another may have taken over meanwhile), then the versions
        from Kafka: a commit reported as failed may have landed, and another publisher
        may have published; our next versions must follow theirs, never repeat them."""
        await self.admin.start()
        await self._claim()
        await self._recover()
        self._broken = False

    async def _publish(self, taken: dict[Stream, Change]) -> PublishReport:
        by_change: dict[Change, list[Stream]] = {}
        for stream, change in taken.items():
            by_change.setdefault(change, []).append(stream)
        report = PublishReport()
        for change, streams in by_change.items():
            report.merge(await self.publisher.publish(streams, change))
        return report

    async def _report(self, report: PublishReport) -> None:
        """Tell operators' tools (`tenant set`) what became of each stream: published
        (or found unchanged: what Kafka has is what is desired) with which version and
        hash, or refused and why. Each state is written once."""
        if self.store is None:
            return
        states = self.publisher.states
        done = [(tenant, env) for tenant, env, _ in report.published]
        done += report.unchanged_streams
        try:
            async with asyncio.timeout(2.0):
                for stream in done:
                    state = states.get(stream)
                    if state is None or self._reported.get(stream) == state.config_hash:
                        continue
                    await self.store.report(
                        *stream,
                        version=state.version,
                        config_hash=state.config_hash,
                        overrides=self._overrides_of(stream),
                    )
                    self._reported[stream] = state.config_hash
                for stream, reason in report.failed.items():
                    await self.store.report(*stream, refused=reason)
                    self._reported.pop(stream, None)
        except Exception as exc:  # best effort: operators' tools say "not confirmed"
            log.debug("could not report publication status to redis: %s", exc)
            self.monitor.redis_failed("report", exc)

    def _overrides_of(self, stream: Stream) -> list[dict[str, Any]]:
        """The stream's emergency overrides in effect, for operators' tools: what
        instances run on top of the published version."""
        state = self.overrides.states.get(stream)
        if state is None:
            return []
        return [
            {"path": e.path, "expires_at": e.expires_at, "actor": e.actor, "reason": e.reason}
            for e in state.active(now_ns())
        ]

    async def _watch_files(self) -> None:
        root = str(self.tree.root)
        async for changes in watchfiles.awatch(
            root,
            debounce=self.settings.debounce_ms,
            step=self.settings.step_ms,
            stop_event=self._stop_watching,
            watch_filter=_tree_files,
        ):
            detected = now_ns()
            paths = sorted({path for _, path in changes})
            streams, rebuild = self.index.affected(paths)
            if rebuild:
                self.index.rebuild()
            relative = [p[len(root) + 1 :] if p.startswith(root + os.sep) else p for p in paths]
            actor = await self.authors.credit(paths)
            change = self._change("file changed", relative, actor=actor)
            self._dirty.add(streams, Change(detected, change.cause))
            # Let the worker build and sign the events first: the log line, and
            # watchfiles arming its next watch (a thread hand-off), wait until the
            # worker first waits for Kafka.
            await asyncio.sleep(0)
            log.info("changed: %s -> %d stream(s)", ", ".join(relative), len(streams))

    async def _watch_store(self) -> None:
        """Follow the store's notifications. After (re)connecting, every stored stream is
        looked at again: writes made while the link was down sent no notification."""
        store = self.store
        if store is None:
            return
        await store.start()
        await store.enable_notifications()
        await self._store_beat()
        self._dirty.add(await store.streams(), self._change("store reconnected", ()))
        async for tenant, env in store.changes():
            detected = now_ns()
            actor, reason = _meta(await store.meta(tenant, env), f"{tenant}/{env}")
            change = self._change(
                reason or "store changed",
                [f"redis:{store.store_key(tenant, env)}"],
                actor=actor or None,
            )
            self._dirty.add([(tenant, env)], Change(detected, change.cause))

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reconcile_interval)
            self.index.rebuild()
            if self.store is not None:
                self.store.forget()  # read every store again: a change may have gone unreported
            change = self._change("reconcile", ())
            self.monitor.reconcile_started(change)
            self._dirty.add(self.index.streams, change)


def _secret_keys(path: Path | None) -> KeyProvider | None:
    """The key-encryption keys the daemon rotates secrets with: the key file, else the
    ``CONFIGBUS_KEK_<TENANT>`` variables, else none."""
    if path is not None:
        return LocalKeyProvider.from_file(path)
    provider = LocalKeyProvider.from_env()
    return provider if provider.tenants else None


def load_signing_key(settings: PublisherSettings) -> tuple[SigningKey, TrustStore | None]:
    """The daemon's signing key, and its trust file when it has one. The kid is the
    settings' kid, or else the one the trust file lists the key's public key under.
    Refused (`KeyringError`, naming the files) when the trust file lists the kid with
    another public key, as an operator key, or not in force now: readers would refuse
    everything it signs."""
    trust = TrustStore.load(settings.trust) if settings.trust is not None else None
    private = load_private_key(settings.signing_key)
    where = settings.signing_key
    kid = settings.kid
    if not kid:
        listed = trust.kids_of(SigningKey("unnamed", private).public) if trust else []
        if len(listed) != 1:
            found = "lists it under " + ", ".join(listed) if listed else "does not list it"
            hint = f"the trust file {settings.trust} {found}" if trust else "no trust file"
            raise KeyringError(f"{where}: a key id (kid) is required: give --kid ({hint})")
        kid = listed[0]
    try:
        key = SigningKey(check_kid(kid), private)
    except KeyringError as exc:
        raise KeyringError(f"{where}: {exc}") from None
    entry = trust.get(key.kid) if trust is not None else None
    if entry is None:
        if trust is not None:
            log.warning("%s does not list the signing key %s", settings.trust, key.kid)
        return key, trust
    if entry.key.pem() != key.public.pem():
        raise KeyringError(
            f"{where}: not the key {settings.trust} lists as {key.kid!r} (wrong --kid or key file?)"
        )
    if entry.role != PUBLISHER:
        raise KeyringError(f"{where}: {settings.trust} lists {key.kid!r} as an {entry.role} key")
    standing = entry.standing(now_ns())
    if standing is not None:
        raise KeyringError(
            f"{where}: {standing[1]} in {settings.trust}: readers refuse what it signs "
            "(sign with a key in force: configbus keys rotate)"
        )
    return key, trust


def _recovery_trust(key: SigningKey, trust_file: Path | TrustStore | None) -> TrustStore:
    """Whose records recovery and the writer heartbeats believe: our own key, and the
    publisher keys of the trust file (the previous ones, after a rotation, so versions
    go on rising instead of starting again at 1). Never an operator key: it signs
    overrides only, not a head, a heartbeat or a snapshot. Anything else is skipped."""
    entries = _override_trust(key, trust_file).entries()
    return TrustStore(entry for entry in entries if entry.role == PUBLISHER)


def _override_trust(key: SigningKey, trust_file: Path | TrustStore | None) -> TrustStore:
    """Whose override records the override keeper believes: our own key (it signs the
    expiries) and every key of the trust file, operators' included; `open_envelope`
    holds each to its role, scope, max_ttl and validity."""
    own = TrustStore.of(key.public)
    if trust_file is None:
        return own
    trust = trust_file if isinstance(trust_file, TrustStore) else TrustStore.load(trust_file)
    others = [entry for entry in trust.entries() if entry.key.kid != key.kid]
    return TrustStore([*own.entries(), *others])


def _meta(meta: dict[str, Any], stream: str) -> tuple[str, str]:
    """The actor and reason of a store write, as strings within the text limit; a value
    of any other shape is dropped with a warning (it would travel in signed events)."""
    found = []
    for name in ("actor", "reason"):
        value = meta.get(name, "")
        if not isinstance(value, str) or len(value) > DEFAULT_LIMITS.text_chars:
            log.warning(
                "%s: ignoring the store's %s: not a string of at most %d characters",
                stream,
                name,
                DEFAULT_LIMITS.text_chars,
            )
            value = ""
        found.append(value)
    return found[0], found[1]


def _tree_files(change: watchfiles.Change, path: str) -> bool:
    """Only the tree's own files, and new folders: editors' and tools' temporary files
    are noise. A file written into a folder created a moment before (a tenant's first
    ``secrets/``) may land before the folder's watch is armed and send no event of its
    own; the folder's event stands in for it."""
    name = os.path.basename(path)
    if name.startswith("."):
        return False
    if name.endswith((".yml", ".json")):
        return True
    return change == watchfiles.Change.added and os.path.isdir(path)


async def publish_once(
    settings: PublisherSettings,
    *,
    take_over: bool = False,
    deadline: float = 120.0,
    bus: Bus | None = None,
) -> PublishReport:
    """One full reconcile: recover from Kafka, publish every changed stream, stop.
    Raises `ActiveWriterError` while a daemon publishes these topics, unless
    `take_over` (the daemon then stands by until this run has resigned), and
    `TimeoutError` after `deadline` seconds."""
    daemon = Daemon(settings, bus=bus)
    try:
        async with asyncio.timeout(deadline):
            await daemon.claim_once(take_over=take_over)
            daemon.index.rebuild()
            once = daemon._change("publish --once", ())
            taken = await daemon._changes_at_start(daemon.index.streams, once)
            return await daemon.publish_round(lambda _: daemon._publish(taken))
    finally:
        await daemon.stop()


async def run(settings: PublisherSettings) -> int:
    """Run the daemon until SIGTERM or SIGINT, which are honoured at every point (also
    while Kafka is unreachable at start); the process's exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    daemon = Daemon(settings)
    loop.add_signal_handler(signal.SIGHUP, daemon.reload_keys)
    asked = asyncio.create_task(stop.wait())
    starting = asyncio.create_task(daemon.start())
    try:
        await asyncio.wait({starting, asked}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # a start that failed for good raises here
            log.info("publishing %d streams from %s", len(daemon.index.streams), settings.root)
            stopped = asyncio.create_task(daemon.stopped.wait())
            await asyncio.wait({asked, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
    finally:
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        asked.cancel()
        await daemon.stop()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
    log.info("publisher stopped")
    return 0
