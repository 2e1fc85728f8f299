"""An in-memory `Bus` for fast unit tests, the way httpx's MockTransport stands in for
the network: publisher, subscriber, store and ops logic run against it in microseconds.

It keeps the Kafka semantics the code relies on (tests/integration/test_bus_contract.py
runs the same scenarios on both): single-partition topics with offsets from 0; auto
topic creation off; transactions whose records stay invisible to readers until commit,
with a commit or abort marker taking one offset in every topic the transaction touched;
readers that stop at the first open transaction (Kafka's last stable offset); fencing by
a newer producer with the same transactional id; ``max.message.bytes`` per topic.

A record too large for its topic fails its own future with `RefusedError`, not the send
and not the commit: the rest of the transaction still commits. Kafka goes on to refuse
every later record of that producer to that topic (OutOfOrderSequenceNumber, here a
non-retriable `BusError`) until the producer restarts; so does this bus. Kafka checks
sizes per batch, so records batched with an oversize one fail with it; this bus has no
batches and checks each record alone.

Fault injection: ``bus.down = True`` makes every call raise ``BusError("bus
unreachable")`` until cleared; ``bus.fail_next("send", exc)`` makes the next call of
one operation (see `OPERATIONS`) raise `exc`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Final

from configbus.bus.base import Bus, Headers, Record
from configbus.errors import BusError, FencedError, RefusedError

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "OPERATIONS",
    "MemoryAdmin",
    "MemoryBus",
    "MemoryProducer",
    "MemoryReader",
]

DEFAULT_MAX_MESSAGE_BYTES: Final = 1_048_588  # Kafka's default max.message.bytes
OPERATIONS: Final = frozenset({"connect", "admin", "send", "commit", "read"})
_BATCH_OVERHEAD: Final = 61  # bytes of a record batch header (magic v2)


def _fatal(message: str) -> BusError:
    error = BusError(message)
    error.retriable = False
    return error


def _varint_size(number: int) -> int:
    zigzag, size = (number << 1) ^ (number >> 63), 1
    while zigzag >= 0x80:
        zigzag, size = zigzag >> 7, size + 1
    return size


def _batch_size(key: bytes | None, value: bytes, headers: Headers) -> int:
    """Bytes of an uncompressed batch holding this one record, as the broker counts them
    against ``max.message.bytes``."""
    parts = [-1 if key is None else len(key), len(value), len(headers)]
    body = 3 + sum(map(_varint_size, parts)) + len(key or b"") + len(value)
    for name, data in headers:
        raw = name.encode()
        body += _varint_size(len(raw)) + len(raw) + _varint_size(len(data)) + len(data)
    return _BATCH_OVERHEAD + _varint_size(body) + body


@dataclass(eq=False)
class _Entry:
    record: Record
    state: str  # "open", "committed" or "aborted"


@dataclass(eq=False)
class _Topic:
    name: str
    configs: dict[str, str]
    log: list[_Entry] = field(default_factory=list)
    next_offset: int = 0  # commit and abort markers take an offset, but no entry

    def stable_end(self) -> int:
        """The first offset a read_committed reader may not read yet."""
        opened = (e.record.offset for e in self.log if e.state == "open")
        return next(opened, self.next_offset)

    def visible(self, start: int, end: int) -> list[Record]:
        return [
            e.record for e in self.log if e.state == "committed" and start <= e.record.offset < end
        ]


@dataclass(eq=False)
class _Cursor:
    """Where a reader is in a topic. A topic deleted and made again is read from its
    beginning (Kafka resets to the end when it notices, which is usually at once)."""

    name: str
    topic: _Topic | None = None
    position: int = 0

    def fetch(self, topics: Mapping[str, _Topic]) -> list[Record]:
        found = topics.get(self.name)
        if found is None:
            return []
        if found is not self.topic:
            self.topic, self.position = found, 0
        end = found.stable_end()
        records = found.visible(self.position, end)
        self.position = max(self.position, end)
        return records


class MemoryBus:
    """The `Bus` in memory. Every client it makes shares its topics."""

    def __init__(self, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = max_message_bytes
        self._topics: dict[str, _Topic] = {}
        self._producers: dict[str, MemoryProducer] = {}  # transactional id -> the unfenced one
        self._failures: dict[str, deque[BaseException]] = {name: deque() for name in OPERATIONS}
        self._down = False
        self._changed = asyncio.Event()  # binds to a loop on first wait, not here

    # -- for tests --------------------------------------------------------------------

    @property
    def down(self) -> bool:
        return self._down

    @down.setter
    def down(self, value: bool) -> None:
        self._down = value
        self._notify()

    def fail_next(self, operation: str, exc: BaseException | None = None) -> None:
        """Make the next call of `operation` raise `exc` (default: a retriable BusError).
        Called twice, the next two calls fail."""
        if operation not in OPERATIONS:
            raise ValueError(f"unknown operation {operation!r}: one of {sorted(OPERATIONS)}")
        self._failures[operation].append(exc or BusError(f"injected failure: {operation}"))
        self._notify()

    def create_topic(
        self, name: str, *, compact: bool = False, max_message_bytes: int | None = None
    ) -> None:
        """Create a topic at once (no admin client needed); an existing one is kept."""
        if name not in self._topics:
            limit = max_message_bytes or self.max_message_bytes
            configs = {"cleanup.policy": "compact" if compact else "delete"}
            self._topics[name] = _Topic(name, {**configs, "max.message.bytes": str(limit)})

    def topic_configs(self, topic: str) -> dict[str, str]:
        return dict(self._topic(topic).configs)

    def records(self, topic: str) -> list[Record]:
        """The records a read_committed reader of `topic` sees now."""
        found = self._topic(topic)
        return found.visible(0, found.stable_end())

    def compact(self, topic: str) -> None:
        """What Kafka's log cleaner does, eventually: keep the last committed record per
        key below the stable end (and open transactions); offsets do not change."""
        found = self._topic(topic)
        end = found.stable_end()
        last = {r.key: r.offset for r in found.visible(0, end)}
        found.log = [
            e
            for e in found.log
            if e.record.offset >= end
            or (e.state == "committed" and last[e.record.key] == e.record.offset)
        ]

    # -- the Bus ----------------------------------------------------------------------

    def admin(self) -> MemoryAdmin:
        return MemoryAdmin(self)

    def producer(self, *, transactional_id: str | None = None) -> MemoryProducer:
        return MemoryProducer(self, transactional_id)

    def reader(self, topic: str) -> MemoryReader:
        return MemoryReader(self, topic)

    def topics_reader(self) -> MemoryTopicsReader:
        return MemoryTopicsReader(self)

    async def read_to_end(
        self, topics: Sequence[str], *, max_seconds: float = 60.0
    ) -> AsyncGenerator[Record, None]:
        self._check("connect")
        ends = [(t, t.stable_end()) for name in topics if (t := self._topics.get(name))]
        for found, end in ends:
            self._check("read")
            for record in found.visible(0, end):
                yield record

    async def follow(
        self, topics: Sequence[str], *, from_beginning: bool = True
    ) -> AsyncGenerator[Record, None]:
        self._check("connect")
        cursors = [self._cursor(name, from_beginning) for name in topics if name in self._topics]
        while True:
            changed = self._changed
            self._check("read")
            for cursor in cursors:
                for record in cursor.fetch(self._topics):
                    yield record
            await changed.wait()

    # -- inside -----------------------------------------------------------------------

    def _check(self, operation: str | None) -> None:
        if self._down:
            raise BusError("bus unreachable")
        if operation is not None and self._failures[operation]:
            raise self._failures[operation].popleft()

    def _topic(self, name: str) -> _Topic:
        if (found := self._topics.get(name)) is None:
            raise BusError(f"{name}: UnknownTopicOrPartition: the topic does not exist")
        return found

    def _cursor(self, name: str, from_beginning: bool) -> _Cursor:
        found = self._topic(name)
        return _Cursor(name, found, 0 if from_beginning else found.stable_end())

    async def _poll(self, fetch: Callable[[], list[Record]], timeout_ms: int) -> list[Record]:
        """`fetch()` until it returns records or `timeout_ms` pass, looking again on
        every change to the bus."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_ms / 1000
        while True:
            changed = self._changed
            records = fetch()
            left = deadline - loop.time()
            if records or left <= 0:
                return records
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancellation
                # that arrives as the event is set.
                async with asyncio.timeout(left):
                    await changed.wait()
            except TimeoutError:
                return []

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


class MemoryAdmin:
    def __init__(self, bus: MemoryBus) -> None:
        self.bus = bus

    async def start(self) -> MemoryAdmin:
        self.bus._check("connect")
        return self

    async def stop(self) -> None:
        pass

    async def __aenter__(self) -> MemoryAdmin:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def topics(self) -> set[str]:
        self.bus._check("admin")
        return set(self.bus._topics)

    async def ensure_topics(
        self, names: Iterable[str], *, compact: bool, configs: Mapping[str, str] | None = None
    ) -> list[str]:
        self.bus._check("admin")
        created = sorted(set(names) - set(self.bus._topics))
        for name in created:
            self.bus.create_topic(name, compact=compact)
            self.bus._topics[name].configs.update(configs or {})
        return created

    async def delete_topics(self, names: Iterable[str]) -> None:
        self.bus._check("admin")
        for name in names:
            self.bus._topics.pop(name, None)

    async def max_message_bytes(self, topic: str) -> int | None:
        self.bus._check("admin")
        found = self.bus._topics.get(topic)
        return None if found is None else int(found.configs["max.message.bytes"])


class MemoryProducer:
    """Idempotent, acks=all; transactional when given a transactional id. Starting fences
    the older producer with the same id and aborts its open transaction."""

    def __init__(self, bus: MemoryBus, transactional_id: str | None) -> None:
        self.bus = bus
        self.transactional_id = transactional_id
        self._started = False
        self._open: list[_Entry] | None = None  # the records of the open transaction
        self._touched: list[_Topic] = []  # the topics it sent to
        self._written: set[_Topic] = set()  # topics this incarnation wrote to
        self._refusing: set[_Topic] = set()  # out of sequence after a refused record

    async def start(self) -> MemoryProducer:
        if not self._started:
            self.bus._check("connect")
            if self.transactional_id is not None:
                older = self.bus._producers.get(self.transactional_id)
                if older is not None:
                    older._end("aborted")
                self.bus._producers[self.transactional_id] = self
            self._started, self._written, self._refusing = True, set(), set()
        return self

    async def stop(self) -> None:
        self._started = False

    async def __aenter__(self) -> MemoryProducer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def restart(self) -> None:
        """A new epoch: fences whoever took over the id, and ends a refusal streak."""
        await self.stop()
        await self.start()

    async def track_topics(self, topics: Iterable[str]) -> None:
        self._live("admin")

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        self._live(None)
        if self.transactional_id is None:
            raise _fatal("beginning a transaction: the producer is not transactional")
        self._open, self._touched = [], []
        try:
            yield
            self._live("commit")
        except BaseException:
            self._end("aborted")
            raise
        self._end("committed")

    async def send(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: Headers = (),
        timestamp_ms: int | None = None,
    ) -> asyncio.Future[None]:
        """Append a record; the returned future is already resolved (acks are instant).
        `timestamp_ms`: the record's timestamp (default: now)."""
        self._live("send")
        if self.transactional_id is not None and self._open is None:
            raise _fatal(f"sending to {topic}: not in a transaction")
        found = self.bus._topic(topic)
        if self._open is not None and found not in self._touched:
            self._touched.append(found)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if error := self._refusal(found, key, value, headers):
            future.set_exception(error)
            return future
        offset = found.next_offset
        now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        entry = _Entry(
            Record(topic, 0, offset, key, value, tuple(headers), now),
            "committed" if self._open is None else "open",
        )
        found.log.append(entry)
        found.next_offset += 1
        self._written.add(found)
        if self._open is None:
            self.bus._notify()
        else:
            self._open.append(entry)
        future.set_result(None)
        return future

    def _refusal(
        self, found: _Topic, key: bytes | None, value: bytes, headers: Headers
    ) -> BusError | None:
        """Why the broker refuses this record, if it does. Once it has refused one after
        this producer's earlier records, it refuses every later one: the sequence numbers
        have a gap (transactional producers always open the gap)."""
        limit = int(found.configs["max.message.bytes"])
        if found in self._refusing:
            error = _fatal(f"sending to {found.name}: OutOfOrderSequenceNumber")
        elif _batch_size(key, value, headers) > limit:
            error = RefusedError(f"sending to {found.name}: larger than {limit} bytes")
        elif key is None and found.configs["cleanup.policy"] == "compact":
            error = _fatal(f"sending to {found.name}: a compacted topic needs keys")
        else:
            return None
        if self.transactional_id is not None or found in self._written:
            self._refusing.add(found)
        return error

    async def send_and_wait(
        self, topic: str, value: bytes, *, key: bytes | None = None, headers: Headers = ()
    ) -> None:
        await (await self.send(topic, value, key=key, headers=headers))

    def _live(self, operation: str | None) -> None:
        if not self._started:
            raise BusError("the producer is not connected")
        self.bus._check(operation)
        tid = self.transactional_id
        if tid is not None and self.bus._producers.get(tid) is not self:
            raise FencedError(f"{operation or 'transaction'}: fenced by a newer publisher")

    def _end(self, state: str) -> None:
        """Commit or abort the open transaction: resolve its records, then write a
        marker in every topic it sent to (Kafka's control records take an offset)."""
        opened, self._open = self._open, None
        for entry in opened or ():
            entry.state = state
        for found in self._touched:
            found.next_offset += 1  # the marker
        if self._touched:
            self.bus._notify()
        self._touched = []


class MemoryReader:
    """Reads one topic like `PartitionReader`: the latest record for a key, then every
    committed record after it, as it arrives."""

    def __init__(self, bus: MemoryBus, topic: str) -> None:
        self.bus = bus
        self.topic = topic
        self._cursor: _Cursor | None = None

    async def start(self) -> bool:
        """Returns False (and stays stopped) while the topic does not exist."""
        self.bus._check("connect")
        if self._cursor is None and self.topic in self.bus._topics:
            self._cursor = self.bus._cursor(self.topic, from_beginning=False)
        return self._cursor is not None

    async def stop(self) -> None:
        self._cursor = None

    async def latest(self, key: bytes, *, chunk: int = 16) -> Record | None:
        """The last committed record with `key`, or None; then positioned at the end."""
        cursor = self._live()
        cursor.position = 0
        matching = [r for r in cursor.fetch(self.bus._topics) if r.key == key]
        return matching[-1] if matching else None

    async def recent(
        self, key: bytes, *, limit: int = 64, chunk: int = 64, max_bytes: int = 32 * 1024 * 1024
    ) -> list[Record]:
        """As `PartitionReader.recent`: up to `limit` of the last committed records with
        `key`, oldest first, read back in growing chunks until `max_bytes` are held;
        then positioned at the end."""
        found = await self.recent_keys((key,), limit=limit, chunk=chunk, max_bytes=max_bytes)
        return found[key]

    async def recent_keys(
        self,
        keys: Sequence[bytes],
        *,
        limit: int = 64,
        chunk: int = 64,
        max_bytes: int = 32 * 1024 * 1024,
    ) -> dict[bytes, list[Record]]:
        """As `PartitionReader.recent_keys`."""
        cursor = self._live()
        cursor.position = 0
        records = cursor.fetch(self.bus._topics)
        found: dict[bytes, list[Record]] = {key: [] for key in keys}
        held, upper = 0, len(records)
        while upper > 0 and len(found[keys[0]]) < limit and held < max_bytes:
            lower = max(0, upper - chunk)
            for key in keys:
                window = [r for r in records[lower:upper] if r.key == key]
                found[key] = window + found[key]
                held += sum(len(r.value or b"") for r in window)
            upper, chunk = lower, chunk * 4
        return {key: rows[-limit:] for key, rows in found.items()}

    async def poll(self, timeout_ms: int = 1000) -> list[Record]:
        return await self.bus._poll(lambda: self._live().fetch(self.bus._topics), timeout_ms)

    def _live(self) -> _Cursor:
        if self._cursor is None:
            raise BusError(f"the reader of {self.topic} is not started")
        self.bus._check("read")
        return self._cursor


class MemoryTopicsReader:
    """Follows many topics like `TopicsReader`: each from the end it had when added."""

    def __init__(self, bus: MemoryBus) -> None:
        self.bus = bus
        self.dropped: set[str] = set()
        self._cursors: dict[str, _Cursor] = {}
        self._started = False

    @property
    def topics(self) -> set[str]:
        return set(self._cursors)

    async def start(self) -> None:
        self.bus._check("connect")
        self._started = True

    async def stop(self) -> None:
        self._started = False
        self._cursors.clear()

    async def add(self, topics: Iterable[str]) -> set[str]:
        self.bus._check("connect")
        found = {t for t in topics if t in self.bus._topics and t not in self._cursors}
        for topic in found:
            self._cursors[topic] = self.bus._cursor(topic, from_beginning=False)
        self.dropped -= found
        return found

    async def poll(self, timeout_ms: int = 1000) -> list[Record]:
        if not self._started:
            raise BusError("the topics reader is not started")
        return await self.bus._poll(self._fetch, timeout_ms)

    def _fetch(self) -> list[Record]:
        self.bus._check("read")
        gone = {t for t in self._cursors if t not in self.bus._topics}
        for topic in gone:
            del self._cursors[topic]
        self.dropped |= gone
        return [r for cursor in self._cursors.values() for r in cursor.fetch(self.bus._topics)]


def _conforms(bus: MemoryBus) -> Bus:  # pragma: no cover - for mypy: MemoryBus is a Bus
    return bus
