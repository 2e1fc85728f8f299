"""The dashboard's feed: what Kafka holds, verified, into the `Model`.

It follows, read-only, with consumers of its own (no group, no commits):

- the audit topic from its beginning: every version of every stream, with its cause;
  it never expires, so it is the history the latency chart and the actor/reason
  columns need;
- the acks topic from its beginning: each instance's last applied and refused acks
  (compacted) and its heartbeats;
- the tenant topics (compacted: the latest record of each channel), each read to its
  end when first seen and followed from there; new tenants are looked for every
  `rescan_s`. What a new topic receives between that read and the follow is on the
  audit topic as well.

Every event is verified as a subscriber verifies it (`open_envelope` with the trust
file, for the stream and channel its record key names; an override set is parsed and
its Kafka timestamp checked too); one that does not verify is counted, with why, and
never shown. Acks are telemetry, not signed: they are decoded, and taken only under
their own record key. A topic that fails is read again from its beginning after a
backoff; what was taken already is skipped (and the model would take it again
without a change).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Final

import msgspec

from configbus.bus import (
    CANDIDATE_CHANNEL,
    OVERRIDE_CHANNEL,
    SNAPSHOT_CHANNEL,
    Bus,
    Record,
    TopicNames,
)
from configbus.bus.base import TopicsReaderAPI
from configbus.crypto import TrustStore
from configbus.dashboard.model import Model, clean
from configbus.errors import VerificationError
from configbus.events import Ack, open_envelope
from configbus.limits import DEFAULT_LIMITS, Limits
from configbus.ops.overrides import check_logged, parse_overrides
from configbus.tree.tree import TENANT_ID

__all__ = ["Feed"]

log = logging.getLogger(__name__)

SHOWN_CHANNELS: Final = frozenset({SNAPSHOT_CHANNEL, OVERRIDE_CHANNEL, CANDIDATE_CHANNEL})
BACKOFF_S: Final = (1.0, 30.0)  # after a failure: first, then doubling up to
YIELD_EVERY: Final = 256  # records taken between two turns of the event loop
TENANT_TOPICS: Final = "tenant topics"  # the name their failures go by in `errors`

_ack_decoder: Final = msgspec.msgpack.Decoder(Ack)


class Feed:
    """Follows `topics` on `bus` into `model`. `tenants`: only these (default: every
    tenant whose topic exists, looked for every `rescan_s`). `start()`/`stop()`
    (idempotent) or `async with`."""

    def __init__(
        self,
        bus: Bus,
        topics: TopicNames,
        trust: TrustStore,
        model: Model,
        *,
        tenants: Collection[str] = (),
        rescan_s: float = 30.0,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.bus = bus
        self.topics = topics
        self.trust = trust
        self.model = model
        self.tenants = frozenset(tenants)
        self.rescan_s = rescan_s
        self.limits = limits
        self.records = 0  # records taken, of every topic
        self.last_record_at = 0  # time.time_ns() of the last one
        self.errors: dict[str, str] = {}  # per source, its last failure while it lasts
        self._followed: set[str] = set()  # tenant topics read
        self._offsets: dict[str, int] = {}  # per topic, the last offset taken
        self._tasks: list[asyncio.Task[None]] = []

    def status(self) -> dict[str, Any]:
        """How the feed is doing, for the page's header and ``/healthz``."""
        return {
            "records": self.records,
            "last_record_at": self.last_record_at // 10**6,
            "tenant_topics": len(self._followed),
            "errors": {name: clean(error) for name, error in sorted(self.errors.items())},
        }

    async def start(self) -> Feed:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._supervised(self.topics.audit, self._follow)),
                asyncio.create_task(self._supervised(self.topics.acks, self._follow)),
                asyncio.create_task(self._supervised(TENANT_TOPICS, self._follow_tenants)),
            ]
        return self

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> Feed:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- one record -----------------------------------------------------------------
    def take(self, record: Record) -> None:
        """One record of a followed topic into the model; one taken before (a topic
        read again after a failure) is skipped, so nothing is counted twice."""
        if record.offset <= self._offsets.get(record.topic, -1):
            return
        self._offsets[record.topic] = record.offset
        self.records += 1
        self.last_record_at = time.time_ns()
        if record.topic == self.topics.acks:
            self._ack(record)
        elif record.topic == self.topics.audit:
            self._audit(record)
        elif (tenant := self.topics.tenant_of(record.topic)) is not None and self._wanted(tenant):
            env, channel = TopicNames.channel_of(record.key)
            if channel in SHOWN_CHANNELS:
                self._event(record, tenant, env, channel)

    def _wanted(self, tenant: str) -> bool:
        return not self.tenants or tenant in self.tenants

    def _ack(self, record: Record) -> None:
        if record.value is None:
            return  # a tombstone
        try:
            ack = _ack_decoder.decode(record.value)
        except (msgspec.DecodeError, TypeError, RecursionError):
            self.model.dropped_acks += 1
            return
        if record.key != ack.key:  # a record cannot speak for another instance
            self.model.dropped_acks += 1
            return
        if self._wanted(ack.tenant):
            self.model.ack(ack, record.timestamp_ms * 10**6)

    def _audit(self, record: Record) -> None:
        """An audit record: key ``<tenant>/<env>`` for events (notes and the rest have
        other keys, and are not shown)."""
        tenant, slash, env = (record.key or b"").decode(errors="replace").partition("/")
        if not slash or "/" in env or not TENANT_ID.fullmatch(tenant) or not self._wanted(tenant):
            return
        self._event(record, tenant, env, None)

    def _event(self, record: Record, tenant: str, env: str, channel: str | None) -> None:
        """Verify an event for (tenant, env) and, when the record key names it, its
        channel (the audit topic's records hold every channel under one key)."""
        try:
            event = open_envelope(
                record.value or b"",
                self.trust,
                stream=(tenant, env),
                channel=channel,
                limits=self.limits,
            )
            kind = event.body.kind.channel
            if kind == OVERRIDE_CHANNEL:
                state = parse_overrides(event, self.limits)
                check_logged(event, record.timestamp_ms)
                self.model.overrides(state)
            elif kind == CANDIDATE_CHANNEL:
                self.model.candidate(event)
            elif kind == SNAPSHOT_CHANNEL:
                self.model.version(event)
        except VerificationError as exc:
            # On a tenant topic, it is what the stream's subscribers refuse now: shown
            # on the stream's row. On the audit topic, it is history (an event signed
            # by a key since retired, say): counted in the totals only.
            audit = record.topic == self.topics.audit
            where = "audit" if audit else "tenant topic"
            stream = None if audit else (tenant, env)
            self.model.not_verified(stream, f"{where} @{record.offset}: {exc}")

    # -- following ------------------------------------------------------------------
    async def _supervised(self, name: str, follow: Callable[[str], Awaitable[None]]) -> None:
        """Run `follow(name)` for ever: after a failure, again after a backoff. Its
        failure is in `errors` under `name` until it reads again."""
        loop = asyncio.get_running_loop()
        backoff = BACKOFF_S[0]
        while True:
            began = loop.time()
            try:
                await follow(name)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Kafka away, a topic deleted: read it again later
                if loop.time() - began > BACKOFF_S[1]:
                    backoff = BACKOFF_S[0]  # it had been reading well: a new failure
                self.errors[name] = f"{exc.__class__.__name__}: {exc}"
                log.warning("dashboard: reading %s failed (again in %gs): %s", name, backoff, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_S[1])

    async def _existing(self) -> set[str]:
        admin = self.bus.admin()
        await admin.start()
        try:
            return await admin.topics()
        finally:
            await admin.stop()

    async def _follow(self, topic: str) -> None:
        """`topic` from its beginning, once it exists."""
        while topic not in await self._existing():
            self.errors[topic] = "the topic does not exist (yet)"
            await asyncio.sleep(self.rescan_s)
        taken = 0
        async with contextlib.aclosing(self.bus.follow([topic])) as records:
            self.errors.pop(topic, None)
            async for record in records:
                self.take(record)
                taken += 1
                if taken % YIELD_EVERY == 0:
                    await asyncio.sleep(0)

    async def _follow_tenants(self, name: str) -> None:
        """The tenant topics: each read to its end when first seen, then followed."""
        self._followed.clear()
        reader = self.bus.topics_reader()
        await reader.start()
        try:
            loop = asyncio.get_running_loop()
            rescan_at = 0.0
            while True:
                if loop.time() >= rescan_at:
                    await self._add_tenants(reader)
                    self.errors.pop(name, None)
                    rescan_at = loop.time() + self.rescan_s
                for record in await reader.poll(timeout_ms=1000):
                    self.take(record)
                for topic in reader.dropped & self._followed:  # deleted: read again if
                    self._followed.discard(topic)  # it comes back, from its new start
                    self._offsets.pop(topic, None)
        finally:
            await reader.stop()

    async def _add_tenants(self, reader: TopicsReaderAPI) -> None:
        new = sorted(
            topic
            for topic in await self._existing()
            if (tenant := self.topics.tenant_of(topic)) is not None
            and self._wanted(tenant)
            and topic not in self._followed
        )
        if not new:
            return
        taken = 0
        async with contextlib.aclosing(self.bus.read_to_end(new)) as records:
            async for record in records:
                self.take(record)
                taken += 1
                if taken % YIELD_EVERY == 0:
                    await asyncio.sleep(0)
        await reader.add(new)
        self._followed |= set(new)
