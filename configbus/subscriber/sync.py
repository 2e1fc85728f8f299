"""`SyncSubscriber`: the subscriber for services that do not run asyncio (Flask,
Django, worker threads).

It owns a daemon thread named ``configbus-<tenant>-<env>`` running its own event loop
(uvloop when installed) with a `ConfigSubscriber` inside. Change callbacks and
validators run on that thread, so they must not block for long; reading `config`
and `version` is safe from any thread (a read sees one whole config).

    sub = SyncSubscriber("aurora-records", "prod", trust="trust.yml").start()
    sub.on_change("feature_flags", lambda old, new, paths: print(paths))
    sub.config.get("feature_flags.mood_radio")
    sub.stop()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar, Unpack

from configbus.errors import ConfigBusError
from configbus.events import VerifiedEvent
from configbus.ops.overrides import OverrideEntry
from configbus.subscriber.core import Callback, ConfigSubscriber, HealthCheck, Snapshot, Validator
from configbus.subscriber.settings import SubscriberOptions, SubscriberSettings
from configbus.tree.resolved import ResolvedConfig

__all__ = ["SyncSubscriber"]

T = TypeVar("T")


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed, unless Kafka is reached over TLS (`security.uvloop_ok`)."""
    from configbus.bus.security import uvloop_ok

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.new_event_loop()
    if not uvloop_ok():
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class SyncSubscriber:
    """The `ConfigSubscriber` API for threads. `with`, or `start()` / `stop()`."""

    def __init__(
        self,
        tenant: str,
        env: str,
        *,
        settings: SubscriberSettings | None = None,
        **options: Unpack[SubscriberOptions],
    ) -> None:
        self._subscriber = ConfigSubscriber(tenant, env, settings=settings, **options)
        self.thread_name = f"configbus-{tenant}-{env}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return repr(self._subscriber).replace("ConfigSubscriber", "SyncSubscriber", 1)

    @property
    def snapshot(self) -> Snapshot:
        """As `ConfigSubscriber.snapshot`: config, version, event and trace id as one."""
        return self._subscriber.snapshot

    @property
    def config(self) -> ResolvedConfig:
        return self._subscriber.config

    @property
    def version(self) -> int:
        return self._subscriber.version

    @property
    def event(self) -> VerifiedEvent | None:
        """As `ConfigSubscriber.event`: the verified event of the current config."""
        return self._subscriber.event

    @property
    def overrides(self) -> tuple[OverrideEntry, ...]:
        """As `ConfigSubscriber.overrides`: the emergency overrides in effect."""
        return self._subscriber.overrides

    @property
    def trace_id(self) -> str:
        """As `ConfigSubscriber.trace_id`: the trace id of the current config's apply."""
        return self._subscriber.trace_id

    @property
    def subscriber(self) -> ConfigSubscriber:
        """The asyncio subscriber inside (its counters: applied, ignored, rejected)."""
        return self._subscriber

    def on_change(self, prefix: str, callback: Callback) -> None:
        """As `ConfigSubscriber.on_change`; the callback runs on this subscriber's thread."""
        self._subscriber.on_change(prefix, callback)

    def add_validator(self, validator: Validator) -> None:
        self._subscriber.add_validator(validator)

    def add_health_check(self, check: HealthCheck) -> None:
        """As `ConfigSubscriber.add_health_check`; the check runs on this subscriber's
        thread, before every heartbeat: keep it quick, or make it read a value your
        own threads keep up to date."""
        self._subscriber.add_health_check(check)

    def start(self) -> SyncSubscriber:
        """Start the thread and block until the first config is applied (or raise the
        error `ConfigSubscriber.start` raised)."""
        with self._lock:
            if self._thread is not None:
                return self
            loop = _new_loop()
            ready = threading.Event()
            self._thread = threading.Thread(
                target=self._run, args=(loop, ready), name=self.thread_name, daemon=True
            )
            self._thread.start()
            ready.wait()
            self._loop = loop
        try:
            self._call(self._subscriber.start())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the subscriber and its thread. Safe to call twice, from any thread but
        the subscriber's own."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        if threading.current_thread() is thread:
            raise ConfigBusError("stop() cannot run on the subscriber's own thread")
        try:
            asyncio.run_coroutine_threadsafe(self._subscriber.stop(), loop).result(30)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(30)

    def wait_for_version(self, version: int, timeout: float | None = None) -> int:
        """Block until the config is at `version` or later; TimeoutError after
        `timeout` seconds."""
        return self._call(self._subscriber.wait_for_version(version, timeout))

    def __enter__(self) -> SyncSubscriber:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        loop = self._loop
        if loop is None:
            coroutine.close()
            raise ConfigBusError("the subscriber is not started")
        if self._thread is threading.current_thread():
            coroutine.close()
            raise ConfigBusError("blocking calls cannot run on the subscriber's own thread")
        future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise ConfigBusError("the subscriber stopped") from None

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
