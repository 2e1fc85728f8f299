"""The publisher daemon: watch for speed, reconcile for correctness.

Tasks, all in one event loop:

- the file watcher (watchfiles, on the tree's directory) marks the streams a changed
  file feeds as dirty, through an index from file to streams;
- the store watcher (Redis keyspace notifications) marks a stream dirty when an
  operator writes its store;
- the reconcile loop marks every stream dirty every `reconcile_interval` seconds,
  catching whatever a notification missed (and rebuilding the index);
- the worker publishes dirty streams. A Kafka failure puts them back and retries
  with bounded, jittered backoff: an outage delays publication, never loses it.

Exactly one daemon publishes: the producer is transactional with a fixed id, so a
second daemon fences the first, whose next commit fails; the fenced one stops.

`stop()` (or SIGTERM/SIGINT through `run`) stops the watchers, lets the worker finish
what it holds within `shutdown_grace`, then closes the connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
from collections.abc import Iterable
from dataclasses import dataclass, field

import watchfiles

from configbus.bus import Admin, FencedError, Producer
from configbus.crypto import SigningKey
from configbus.errors import BusError, TreeError
from configbus.events import Cause, now_ns
from configbus.publisher.core import Change, Publisher, PublishReport, recover_states
from configbus.publisher.settings import PublisherSettings
from configbus.store import TenantStore
from configbus.tree import EnvironmentTree
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

    def __init__(self, settings: PublisherSettings) -> None:
        self.settings = settings
        self.key = SigningKey.load(settings.signing_key, settings.kid)
        self.tree = EnvironmentTree(settings.root)
        self.index = StreamIndex(self.tree)
        self.store = TenantStore(settings.redis_url) if settings.redis_url else None
        self.admin = Admin(settings.kafka)
        self.producer = Producer(settings.kafka, transactional_id=settings.transactional_id)
        self.publisher = Publisher(
            self.tree,
            self.key,
            self.producer,
            self.admin,
            settings.topics,
            store=self.store,
            batch_size=settings.batch_size,
        )
        self.ready = asyncio.Event()
        self.stopped = asyncio.Event()
        self.fenced = False
        self._dirty: _Dirty | None = None
        self._stop_watching = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._worker: asyncio.Task[None] | None = None

    async def start(self) -> Daemon:
        """Connect (retrying while Kafka is down), fence older publishers, recover
        versions from Kafka, and start watching. Returns once the first reconcile is
        queued."""
        if self._worker is not None:
            return self
        self._dirty = _Dirty()
        await self._connect()
        self.index.rebuild()
        self._dirty.add(self.index.streams, self._change("start", ()))
        self._worker = asyncio.create_task(self._work(), name="configbus-publish")
        self._tasks = [
            asyncio.create_task(self._watch_files(), name="configbus-watch-files"),
            asyncio.create_task(self._reconcile_loop(), name="configbus-reconcile"),
        ]
        if self.store is not None:
            self._tasks.append(asyncio.create_task(self._watch_store(), name="configbus-store"))
        return self

    async def _connect(self) -> None:
        delay = 0.2
        while True:
            try:
                await self.admin.start()
                await self.producer.start()  # fences any older publisher with our id
                await self.admin.ensure_topics([self.settings.topics.acks], compact=True)
                self.publisher.states = await recover_states(
                    self.settings.kafka, self.settings.topics
                )
                if self.store is not None:
                    await self.store.start()
                    await self.store.enable_notifications()
                break
            except BusError as exc:
                if not exc.retriable:
                    raise
                log.warning("waiting for kafka/redis: %s (retry in %.1fs)", exc, delay)
                await self.producer.stop()
                await self.admin.stop()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        versions = sum(state.version for state in self.publisher.states.values())
        log.info(
            "recovered %d streams from kafka (%d versions)",
            len(self.publisher.states),
            versions,
        )

    async def stop(self) -> None:
        """Stop watching, let the worker finish within the grace period, disconnect.
        Safe to call twice."""
        self._stop_watching.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                if task.cancelled():
                    continue
                raise  # stop() itself was cancelled
            except Exception:
                log.exception("%s had failed", task.get_name())
        self._tasks = []
        worker, self._worker = self._worker, None
        if worker is not None:
            if self._dirty is not None:
                self._dirty.event.set()  # wake it so it can see the stop
            try:
                await asyncio.wait_for(worker, self.settings.shutdown_grace)
            except TimeoutError:
                log.warning("gave up waiting for in-flight publications")
        await self.producer.stop()
        await self.admin.stop()
        if self.store is not None:
            await self.store.stop()
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
        """Publish whatever is dirty; on a failure put it back, back off, and reconnect.
        Nothing is published again until the versions are re-read from Kafka."""
        dirty = self._dirty
        if dirty is None:  # pragma: no cover - start() sets it first
            return
        backoff, connected = 0.1, True
        while True:
            await dirty.event.wait()
            if self._stop_watching.is_set() and not dirty.changes:
                return
            if not connected:
                connected = await self._reconnect()
                if not connected:
                    await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
                    backoff = min(backoff * 2, 5.0)
                    continue
            taken = dirty.take()
            try:
                try:
                    async with asyncio.timeout(self.settings.publish_timeout):
                        report = await self._publish(taken)
                except TimeoutError:
                    # aiokafka retries a transaction against a dead broker forever;
                    # give up on this attempt, reconnect, and try again.
                    raise BusError(
                        f"kafka did not confirm within {self.settings.publish_timeout:g}s"
                    ) from None
            except FencedError as exc:
                log.error("another publisher took over; stopping: %s", exc)
                self.fenced = True
                self._stop_watching.set()
                self.stopped.set()
                return
            except Exception as exc:  # the worker must outlive any one failure
                for stream, change in taken.items():
                    dirty.add([stream], change)
                delay = backoff * random.uniform(0.5, 1.5)
                if isinstance(exc, BusError):
                    log.warning("publication failed, retrying in %.2fs: %s", delay, exc)
                else:
                    log.exception("publication failed unexpectedly, retrying in %.2fs", delay)
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, 5.0)
                connected = False
                continue
            backoff = 0.1
            if report.published or report.failed:
                log.info("publish: %s", report.summary())
            self.ready.set()
            if self._stop_watching.is_set() and not dirty.changes:
                return

    async def _reconnect(self) -> bool:
        """A fresh producer after a failure (a failed transaction can leave the old one
        unusable), then the versions again from Kafka: a commit reported as failed may
        have landed, and while we were cut off another publisher may have published;
        our next versions must follow theirs, never repeat them. True when both
        worked; until then nothing is published."""
        try:
            await self.producer.restart()
            self.publisher.states = await recover_states(self.settings.kafka, self.settings.topics)
        except BusError as exc:
            log.warning("kafka still unreachable: %s", exc)
            return False
        return True

    async def _publish(self, taken: dict[Stream, Change]) -> PublishReport:
        by_change: dict[Change, list[Stream]] = {}
        for stream, change in taken.items():
            by_change.setdefault(change, []).append(stream)
        report = PublishReport()
        for change, streams in by_change.items():
            report.merge(await self.publisher.publish(streams, change))
        return report

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
            log.info("changed: %s -> %d stream(s)", ", ".join(relative), len(streams))
            if self._dirty is not None:
                change = self._change("file changed", relative)
                self._dirty.add(streams, Change(detected, change.cause))

    async def _watch_store(self) -> None:
        store = self.store
        if store is None:
            return
        delay = 0.2
        while True:
            try:
                async for tenant, env in store.changes():
                    delay = 0.2
                    detected = now_ns()
                    meta = await store.meta(tenant, env)
                    change = self._change(
                        meta.get("reason") or "store changed",
                        [f"redis:{store.store_key(tenant, env)}"],
                        actor=meta.get("actor") or None,
                    )
                    if self._dirty is not None:
                        self._dirty.add([(tenant, env)], Change(detected, change.cause))
            except BusError as exc:
                log.warning("redis notifications lost (%s); reconnecting in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reconcile_interval)
            self.index.rebuild()
            if self.store is not None:
                with contextlib.suppress(BusError):
                    await self.store.streams()  # touch redis so a dead link shows in logs
            if self._dirty is not None:
                self._dirty.add(self.index.streams, self._change("reconcile", ()))


def _tree_files(change: watchfiles.Change, path: str) -> bool:
    """Only the tree's own files: editors' and tools' temporary files are noise."""
    name = os.path.basename(path)
    return name.endswith((".yml", ".json")) and not name.startswith(".")


async def publish_once(settings: PublisherSettings) -> PublishReport:
    """One full reconcile: recover from Kafka, publish every changed stream, stop."""
    daemon = Daemon(settings)
    await daemon._connect()
    try:
        daemon.index.rebuild()
        change = daemon._change("publish --once", ())
        return await daemon.publisher.publish(daemon.index.streams, change)
    finally:
        await daemon.producer.stop()
        await daemon.admin.stop()
        if daemon.store is not None:
            await daemon.store.stop()


async def run(settings: PublisherSettings) -> int:
    """Run the daemon until SIGTERM or SIGINT; the process's exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    daemon = Daemon(settings)
    async with daemon:
        log.info("publishing %d streams from %s", len(daemon.index.streams), settings.root)
        stopped = asyncio.create_task(daemon.stopped.wait())
        asked = asyncio.create_task(stop.wait())
        await asyncio.wait({stopped, asked}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        asked.cancel()
    log.info("publisher stopped")
    return 1 if daemon.fenced else 0
