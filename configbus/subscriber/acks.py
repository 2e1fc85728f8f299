"""Acknowledgements leave a process through one producer, in batches, off the apply path.

Every subscriber of a process (and the host agent, for the services behind it) hands
its acks to an `AckSender` for its cluster and acks topic: `put` only queues. One task
per sender takes whatever is queued, sends it as one batch, and waits until Kafka has
acknowledged the batch before the next one, so a hundred subscribers cost one producer
and one round trip per batch, not a hundred. An ack is telemetry: a sender that cannot
reach Kafka logs, drops the batch and makes its producer again; applying config never
waits on it.

Senders are shared per event loop and destination: `AckSender.acquire` returns the one
in use (counting its users) and `release` stops it after its last user, flushing what
is queued for a bounded time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Hashable
from typing import ClassVar

from configbus.bus import Bus
from configbus.supervise import finish

__all__ = ["AckSender"]

log = logging.getLogger(__name__)

QUEUE_LIMIT = 10_000  # acks waiting to be sent, at most; more are dropped (and counted)
BATCH_LIMIT = 1_000  # acks in one batch, at most
FLUSH_TIMEOUT_S = 2.0  # what `release` waits for queued acks, at most


class AckSender:
    """One producer sending the acks of every user it has, in batches."""

    _shared: ClassVar[dict[tuple[int, Hashable, str], AckSender]] = {}

    def __init__(self, bus: Bus, topic: str) -> None:
        self.bus = bus
        self.topic = topic
        self.sent = 0
        self.dropped = 0
        self._queue: deque[tuple[bytes, bytes]] = deque()
        self._ready = asyncio.Event()  # something was queued
        self._pending = 0  # queued or being sent
        self._drained = asyncio.Event()  # nothing pending
        self._drained.set()
        self._task: asyncio.Task[None] | None = None
        self._users = 0
        self._key: tuple[int, Hashable, str] | None = None

    @classmethod
    def acquire(cls, bus: Bus, topic: str, *, identity: Hashable | None = None) -> AckSender:
        """The sender of this event loop for `topic` on the cluster `identity` names
        (by default the `bus` object itself), started on first use."""
        key = (id(asyncio.get_running_loop()), identity if identity is not None else id(bus), topic)
        sender = cls._shared.get(key)
        if sender is None or sender._task is None or sender._task.done():
            sender = cls._shared[key] = cls(bus, topic)
            sender._key = key
            sender._task = asyncio.create_task(sender._run(), name="configbus-acks")
        sender._users += 1
        return sender

    async def release(self) -> None:
        """One user fewer; after the last, flush (bounded) and stop."""
        self._users -= 1
        if self._users > 0:
            return
        if self._key is not None and self._shared.get(self._key) is self:
            del self._shared[self._key]
        if self._task is not None and not self._task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), FLUSH_TIMEOUT_S)
        await finish(self._task, f"acks to {self.topic}")
        self._task = None

    def put(self, key: bytes, value: bytes) -> None:
        """Queue one encoded ack; never waits."""
        if len(self._queue) >= QUEUE_LIMIT:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("acks to %s: queue full, %d dropped so far", self.topic, self.dropped)
            return
        self._queue.append((key, value))
        self._pending += 1
        self._drained.clear()
        self._ready.set()

    async def _run(self) -> None:
        producer = self.bus.producer()
        try:
            while True:
                await self._ready.wait()
                self._ready.clear()
                while self._queue:
                    batch = [
                        self._queue.popleft() for _ in range(min(BATCH_LIMIT, len(self._queue)))
                    ]
                    try:
                        await producer.start()
                        await producer.track_topics([self.topic])  # metadata of this one only
                        sends = [
                            await producer.send(self.topic, value, key=key) for key, value in batch
                        ]
                        # Awaited to delivery: a refused ack leaves the producer unable
                        # to send the next ones (out of sequence) until it is made again.
                        for delivered in sends:
                            await delivered
                        self.sent += len(batch)
                    except Exception as exc:  # telemetry: never worth the task
                        log.warning(
                            "could not send %d ack(s) to %s: %s", len(batch), self.topic, exc
                        )
                        with contextlib.suppress(Exception):
                            await producer.stop()
                    finally:
                        self._pending -= len(batch)
                        if not self._pending:
                            self._drained.set()
        finally:
            with contextlib.suppress(Exception):
                await producer.stop()
