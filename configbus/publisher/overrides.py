"""The daemon's side of emergency overrides: it knows which are in effect, and publishes
each expiry.

Subscribers drop an expired override by their own clock whatever runs; the daemon, while
it is the writer, also publishes the expiry (a new version of the override channel
without the expired entries, signed with the publisher key) so the audit trail says when
it ended, and instances that start later read a set without it. Overrides are learned
from the tenant topics themselves, so it makes no difference whether the daemon was
running when they were set: at start it reads every tenant topic to its end, then
follows them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Final

from configbus.bus import OVERRIDE_CHANNEL, Bus, Record, TopicNames
from configbus.bus.base import TopicsReaderAPI
from configbus.crypto import SigningKey, TrustStore
from configbus.errors import ConfigBusError, VerificationError
from configbus.events import Cause, now_ns, open_envelope
from configbus.ops.overrides import (
    OverrideState,
    check_logged,
    parse_overrides,
    write_overrides,
)

__all__ = ["OverrideKeeper"]

log = logging.getLogger(__name__)

Stream = tuple[str, str]
TOPICS_EVERY_S: Final = 5.0  # how often new tenant topics are looked for
POLL_MS: Final = 500
RETRY_S: Final = 5.0


class OverrideKeeper:
    """Follows the override channel of every tenant topic; `run()` until cancelled."""

    def __init__(
        self,
        bus: Bus,
        topics: TopicNames,
        key: SigningKey,
        trust: TrustStore,
        *,
        actor: str,
        is_writer: Callable[[], bool],
        on_record: Callable[[Record], None] | None = None,
        on_ack: Callable[[Record], None] | None = None,
    ) -> None:
        self.bus, self.topics, self.key, self.trust = bus, topics, key, trust
        self.actor = actor
        self.is_writer = is_writer
        self.on_record = on_record  # records of the other channels (the rollout driver's)
        self.on_ack = on_ack  # when given, the acks topic is followed too, for it
        self.states: dict[Stream, OverrideState] = {}
        self.expiries_published = 0
        self.rounds = 0  # polls done: each looks for expiries due
        self._untrusted: set[Stream] = set()  # logged once each
        self._retry_at: dict[Stream, float] = {}  # after a failed expiry: when to try again

    def in_effect(self) -> dict[Stream, OverrideState]:
        """The streams with overrides in effect now."""
        now = now_ns()
        return {stream: state for stream, state in self.states.items() if state.active(now)}

    async def run(self) -> None:
        reader = self.bus.topics_reader()
        await reader.start()
        try:
            loop = asyncio.get_running_loop()
            look_at = 0.0
            while True:
                if loop.time() >= look_at:
                    await self._add_topics(reader)
                    look_at = loop.time() + TOPICS_EVERY_S
                for record in await reader.poll(self._poll_ms()):
                    self._received(record)
                await self._publish_expiries()
                self.rounds += 1
        finally:
            with contextlib.suppress(Exception):
                await reader.stop()

    def _poll_ms(self) -> int:
        due = min((s.next_expiry(now_ns()) or 2**63 for s in self.states.values()), default=None)
        if due is None:
            return POLL_MS
        return max(0, min(POLL_MS, (due - now_ns()) // 10**6 + 1))

    async def _add_topics(self, reader: TopicsReaderAPI) -> None:
        """Follow tenant topics not followed yet, then read them to their end: what was
        set before they were followed is learned, and nothing falls in between."""
        admin = self.bus.admin()
        await admin.start()
        try:
            existing = await admin.topics()
        finally:
            await admin.stop()
        wanted = {t for t in existing if self.topics.tenant_of(t) is not None}
        if self.on_ack is not None and self.topics.acks in existing:
            wanted.add(self.topics.acks)  # one reader for both: one consumer fewer
        new = wanted - reader.topics
        if not new:
            return
        added = await reader.add(new)
        async for record in self.bus.read_to_end(sorted(added)):
            self._received(record)

    def _received(self, record: Record) -> None:
        if record.topic == self.topics.acks:
            if self.on_ack is not None:
                self.on_ack(record)
            return
        env, channel = self.topics.channel_of(record.key)
        tenant = self.topics.tenant_of(record.topic)
        if channel != OVERRIDE_CHANNEL and self.on_record is not None:
            self.on_record(record)
        if channel != OVERRIDE_CHANNEL or tenant is None:
            return
        stream = (tenant, env)
        try:
            event = open_envelope(
                record.value or b"", self.trust, stream=stream, channel=OVERRIDE_CHANNEL
            )
            state = parse_overrides(event)
            check_logged(event, record.timestamp_ms)
        except VerificationError as exc:
            if stream not in self._untrusted:
                self._untrusted.add(stream)
                log.warning(
                    "%s/%s: an override record does not verify with the daemon's trust file "
                    "(its expiry will not be published from here): %s",
                    tenant,
                    env,
                    exc,
                )
            return
        known = self.states.get(stream)
        if known is not None and state.version <= known.version:
            return
        self._untrusted.discard(stream)
        self.states[stream] = state
        now = now_ns()
        for entry in state.active(now):
            log.info(
                "%s/%s: override of %s in effect until %s, by %s: %s",
                tenant,
                env,
                entry.path,
                f"{entry.until:%Y-%m-%dT%H:%M:%S}Z",
                entry.actor,
                entry.reason,
                extra={"tenant": tenant, "env": env, "override_version": state.version},
            )

    async def _publish_expiries(self) -> None:
        """Publish the expiry of every stream whose overrides ran out, while the writer."""
        now = now_ns()
        moment = asyncio.get_running_loop().time()
        due = [
            stream
            for stream, state in self.states.items()
            if any(entry.expired(now) for entry in state.entries)
            and self._retry_at.get(stream, 0.0) <= moment
        ]
        if not due or not self.is_writer():
            return
        for stream in due:
            tenant, env = stream
            state = self.states[stream]
            gone = ", ".join(entry.path for entry in state.entries if entry.expired(now))
            try:
                written = await write_overrides(
                    self.bus,
                    self.topics,
                    tenant,
                    env,
                    key=self.key,
                    trust=self.trust,
                    change=lambda kept, _now: kept,
                    cause=Cause(
                        sources=("override expiry",),
                        actor=self.actor,
                        reason=f"override expired: {gone}",
                    ),
                )
            except Exception as exc:  # one stream's failure is that stream's alone
                log.warning(
                    "%s/%s: could not publish the override expiry: %s",
                    tenant,
                    env,
                    exc,
                    exc_info=not isinstance(exc, ConfigBusError),
                )
                self._retry_at[stream] = moment + RETRY_S
                continue
            self._retry_at.pop(stream, None)
            if written.version:
                self.expiries_published += 1
                log.info(
                    "%s/%s: override of %s expired; published override v%d",
                    tenant,
                    env,
                    gone,
                    written.version,
                    extra={"tenant": tenant, "env": env, "override_version": written.version},
                )
            # The new record comes back through the reader; until then, nothing is due.
            self.states[stream] = OverrideState(
                state.event,
                state.active(now),
                state.active_values(now),
            )
