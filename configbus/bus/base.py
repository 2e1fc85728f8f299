"""What configbus needs from a message bus, as protocols: Kafka implements them
(`configbus.bus.kafka.KafkaBus`), and so does an in-memory bus for fast unit tests
(`configbus.bus.memory.MemoryBus`). Publisher, subscriber and ops code take a `Bus` and
never construct Kafka clients themselves.

The semantics are Kafka's, and the in-memory bus keeps them: single-partition topics,
offsets from 0, read_committed readers that never see aborted or open transactions,
transactional producers fenced by a newer producer with the same id.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

__all__ = ["AdminAPI", "Bus", "Headers", "ProducerAPI", "ReaderAPI", "Record", "TopicsReaderAPI"]

Headers = tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int

    def header(self, name: str) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


class AdminAPI(Protocol):
    async def start(self) -> AdminAPI: ...
    async def stop(self) -> None: ...
    async def topics(self) -> set[str]: ...
    async def ensure_topics(
        self, names: Iterable[str], *, compact: bool, configs: Mapping[str, str] | None = None
    ) -> list[str]: ...
    async def delete_topics(self, names: Iterable[str]) -> None: ...
    async def max_message_bytes(self, topic: str) -> int | None: ...


class ProducerAPI(Protocol):
    transactional_id: str | None

    async def start(self) -> ProducerAPI: ...
    async def stop(self) -> None: ...
    async def restart(self) -> None: ...
    async def track_topics(self, topics: Iterable[str]) -> None: ...
    def transaction(self) -> AbstractAsyncContextManager[None]: ...
    async def send(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Headers = (),
        timestamp_ms: int | None = None,
    ) -> Awaitable[None]:
        """Queue a record. The returned awaitable ends when the broker acknowledged it,
        or raises `BusError` (`RefusedError` when no retry can succeed). `timestamp_ms`:
        the record's timestamp (default: now); a restore keeps the original ones."""

    async def send_and_wait(
        self, topic: str, value: bytes, *, key: bytes | None = None, headers: Headers = ()
    ) -> None: ...


class ReaderAPI(Protocol):
    async def start(self) -> bool: ...
    async def stop(self) -> None: ...
    async def latest(self, key: bytes, *, chunk: int = 16) -> Record | None: ...
    async def recent(
        self, key: bytes, *, limit: int = 64, chunk: int = 64, max_bytes: int = 32 * 1024 * 1024
    ) -> list[Record]: ...
    async def recent_keys(
        self,
        keys: Sequence[bytes],
        *,
        limit: int = 64,
        chunk: int = 64,
        max_bytes: int = 32 * 1024 * 1024,
    ) -> dict[bytes, list[Record]]: ...
    async def poll(self, timeout_ms: int = 1000) -> list[Record]: ...


class TopicsReaderAPI(Protocol):
    """One reader following many topics, each from the end it had when added."""

    dropped: set[str]  # topics dropped because they left the cluster

    @property
    def topics(self) -> set[str]: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def add(self, topics: Iterable[str]) -> set[str]: ...
    async def poll(self, timeout_ms: int = 1000) -> list[Record]: ...


class Bus(Protocol):
    """A connection factory: every call makes a new, unstarted client."""

    def admin(self) -> AdminAPI: ...
    def producer(self, *, transactional_id: str | None = None) -> ProducerAPI: ...
    def reader(self, topic: str) -> ReaderAPI: ...
    def topics_reader(self) -> TopicsReaderAPI: ...
    def read_to_end(
        self, topics: Sequence[str], *, max_seconds: float = 60.0
    ) -> AsyncGenerator[Record, None]: ...
    def follow(
        self, topics: Sequence[str], *, from_beginning: bool = True
    ) -> AsyncGenerator[Record, None]: ...
