"""The same scenarios on Kafka and on the in-memory bus: where MemoryBus stands in for
Kafka in unit tests, this is the proof that it behaves the same.

It also pins down what Kafka (with aiokafka) does when one record of a transaction is
refused: its future fails, the records sent after it to the same topic fail out of
sequence, and the commit succeeds with the rest. A committed transaction is therefore
no proof that every record in it was written; only the futures tell.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiokafka.errors import KafkaError

from configbus.bus import Bus, KafkaBus, KafkaSettings, ProducerAPI
from configbus.bus.kafka import _bus_error
from configbus.bus.memory import MemoryBus
from configbus.errors import BusError, FencedError, RefusedError

pytestmark = pytest.mark.integration

MakeProducer = Callable[..., Awaitable[ProducerAPI]]
# No key, these headers: 4845 bytes of value make a batch of exactly 5000 bytes.
HEADERS = (("content-type", b"abc"), ("traceparent", b"x" * 55))


@pytest.fixture(params=["kafka", "memory"])
def bus(request: pytest.FixtureRequest) -> Bus:
    if request.param == "memory":
        return MemoryBus()
    return KafkaBus(KafkaSettings(request.getfixturevalue("kafka_bootstrap")))


@pytest.fixture
async def topic(bus: Bus, topic_name: Callable[[], str]) -> Callable[..., Awaitable[str]]:
    async def make(*, compact: bool = False, max_message_bytes: int | None = None) -> str:
        name = topic_name()
        configs = {} if max_message_bytes is None else {"max.message.bytes": str(max_message_bytes)}
        admin = await bus.admin().start()
        try:
            assert await admin.ensure_topics([name], compact=compact, configs=configs) == [name]
        finally:
            await admin.stop()
        return name

    return make


@pytest.fixture
async def producer(bus: Bus) -> AsyncIterator[MakeProducer]:
    made: list[ProducerAPI] = []

    async def make(transactional_id: str | None = None) -> ProducerAPI:
        made.append(bus.producer(transactional_id=transactional_id))
        return await made[-1].start()

    yield make
    for each in made:
        await each.stop()


async def outcome(future: Any) -> BusError | None:
    """None when the record was written, else why not, as a configbus error."""
    try:
        await future
    except BusError as exc:
        return exc
    except KafkaError as exc:  # KafkaBus hands out aiokafka's own futures
        return _bus_error(exc, "delivering")
    return None


async def visible(bus: Bus, *topics: str) -> list[tuple[int, bytes | None]]:
    return [(r.offset, r.value) async for r in bus.read_to_end(list(topics))]


async def test_read_committed_sees_committed_records_only(
    bus: Bus, topic: Callable[..., Awaitable[str]], producer: MakeProducer
) -> None:
    name = await topic()
    txn = await producer(f"{name}.tx")
    async with txn.transaction():
        await (await txn.send(name, b"a", key=b"k"))
        await (await txn.send(name, b"b", key=b"k"))
        assert await visible(bus, name) == []  # on the broker, not committed yet

    async def aborted() -> None:
        async with txn.transaction():
            await (await txn.send(name, b"aborted", key=b"k"))
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        await aborted()
    async with txn.transaction():
        await txn.send(name, b"c", key=b"k")
    # Each commit or abort leaves a marker that takes an offset: 2 and 4 here.
    assert await visible(bus, name) == [(0, b"a"), (1, b"b"), (5, b"c")]
    reader = bus.reader(name)
    assert await reader.start()
    try:
        found = await reader.latest(b"k")
        assert found is not None and found.value == b"c"
    finally:
        await reader.stop()


async def test_a_newer_producer_with_the_same_id_fences_the_older(
    bus: Bus, topic: Callable[..., Awaitable[str]], producer: MakeProducer
) -> None:
    name = await topic()
    older = await producer(f"{name}.tx")

    async def fenced_mid_transaction() -> None:
        async with older.transaction():
            await (await older.send(name, b"open when fenced"))
            await producer(f"{name}.tx")

    with pytest.raises(FencedError):
        await fenced_mid_transaction()

    async def after_fencing() -> None:
        async with older.transaction():
            await (await older.send(name, b"fenced"))

    # aiokafka leaves a fenced producer in FATAL_ERROR, and its next transaction trips
    # an assertion in aiokafka; the adapter reports that as what it is, a fence.
    with pytest.raises(FencedError):
        await after_fencing()
    newer = await producer(f"{name}.tx")
    async with newer.transaction():
        await newer.send(name, b"newer")
    assert [value for _, value in await visible(bus, name)] == [b"newer"]


async def test_read_to_end_stops_at_the_end_it_found(
    bus: Bus, topic: Callable[..., Awaitable[str]], producer: MakeProducer
) -> None:
    first, second = await topic(), await topic()
    plain = await producer()
    for value in (b"1", b"2"):
        await plain.send_and_wait(first, value)
    await plain.send_and_wait(second, b"3")
    seen = []
    async for record in bus.read_to_end([first, f"{first}.missing", second]):
        seen.append(record.value)
        await plain.send_and_wait(record.topic, b"too late")
    assert sorted(seen) == [b"1", b"2", b"3"]  # Kafka may interleave the topics


async def test_latest_is_the_last_record_of_a_key(
    bus: Bus, topic: Callable[..., Awaitable[str]], producer: MakeProducer
) -> None:
    name = await topic(compact=True)
    assert not await bus.reader(f"{name}.missing").start()
    plain = await producer()
    for key, value in [(b"k", b"1"), (b"j", b"2"), (b"k", b"3"), (b"j", b"4")]:
        await plain.send_and_wait(name, value, key=key)
    reader = bus.reader(name)
    assert await reader.start()
    try:
        found = await reader.latest(b"k")
        assert found is not None and (found.offset, found.value) == (2, b"3")
        assert await reader.latest(b"none") is None
        await plain.send_and_wait(name, b"5", key=b"k")
        assert [r.value for r in await reader.poll(timeout_ms=5000)] == [b"5"]
    finally:
        await reader.stop()


async def test_a_record_too_large_for_its_topic_is_refused(
    bus: Bus, topic: Callable[..., Awaitable[str]], producer: MakeProducer
) -> None:
    name = await topic(max_message_bytes=5000)
    await (await producer()).send_and_wait(name, b"x" * 4845, headers=HEADERS)
    with pytest.raises(RefusedError):
        await (await producer()).send_and_wait(name, b"x" * 4846, headers=HEADERS)
    # After a refusal that follows its own earlier records, the producer's sequence
    # numbers have a gap: Kafka refuses every later record to that topic until restart.
    plain = await producer()
    await plain.send_and_wait(name, b"small")
    with pytest.raises(RefusedError):
        await plain.send_and_wait(name, b"x" * 6000)
    with pytest.raises(BusError, match="OutOfOrderSequenceNumber") as caught:
        await plain.send_and_wait(name, b"small again")
    assert not caught.value.retriable
    await plain.restart()
    await plain.send_and_wait(name, b"after restart")
    assert [value for _, value in await visible(bus, name)] == [
        b"x" * 4845,
        b"small",
        b"after restart",
    ]


async def test_an_oversize_record_in_a_transaction_fails_alone_and_the_rest_commits(
    bus: Bus, topic: Callable[..., Awaitable[str]], producer: MakeProducer
) -> None:
    # Larger than the producer's 256 KiB batches, so the big record travels alone.
    limited, other = await topic(max_message_bytes=300_000), await topic()
    txn = await producer(f"{limited}.tx")
    async with txn.transaction():  # commits: no exception here
        small = await txn.send(limited, b"small", key=b"a")
        big = await txn.send(limited, b"x" * 400_000, key=b"b")
        after = await txn.send(limited, b"after", key=b"c")
        elsewhere = await txn.send(other, b"elsewhere", key=b"d")
    assert await outcome(small) is None
    assert isinstance(await outcome(big), RefusedError)
    refused = await outcome(after)
    assert type(refused) is BusError and "OutOfOrderSequenceNumber" in str(refused)
    assert not refused.retriable
    assert await outcome(elsewhere) is None
    assert [v for _, v in await visible(bus, limited)] == [b"small"]
    assert [v for _, v in await visible(bus, other)] == [b"elsewhere"]

    async with txn.transaction():  # the next one too: that topic stays refused
        again = await txn.send(limited, b"again", key=b"a")
        fine = await txn.send(other, b"fine", key=b"d")
    assert isinstance(await outcome(again), BusError)
    assert await outcome(fine) is None
    await txn.restart()
    async with txn.transaction():
        restarted = await txn.send(limited, b"restarted", key=b"a")
    assert await outcome(restarted) is None
    assert [v for _, v in await visible(bus, limited)] == [b"small", b"restarted"]


async def test_a_compacted_topic_refuses_a_record_without_a_key(
    bus: Bus, topic: Callable[..., Awaitable[str]], producer: MakeProducer
) -> None:
    name = await topic(compact=True)
    with pytest.raises(BusError) as caught:
        await (await producer()).send_and_wait(name, b"no key")
    assert not caught.value.retriable


async def test_sending_to_a_missing_topic_fails_retriably(
    bus: Bus, topic: Callable[..., Awaitable[str]]
) -> None:
    if isinstance(bus, KafkaBus):  # the producer waits this long for the topic to appear
        bus = KafkaBus(dataclasses.replace(bus.settings, request_timeout_ms=2000))
    plain = await bus.producer().start()
    try:
        with pytest.raises(BusError) as caught:
            await plain.send_and_wait(f"{await topic()}.missing", b"v")
    finally:
        await plain.stop()
    assert caught.value.retriable


async def test_recent_reads_back_no_further_than_its_byte_budget(
    bus: Bus, topic: Callable[..., Awaitable[str]], producer: MakeProducer
) -> None:
    name = await topic()
    plain = await producer()
    for number in range(10):
        await plain.send_and_wait(name, bytes([number]) * 1000, key=b"k")
    reader = bus.reader(name)
    assert await reader.start()
    try:
        # Chunks of 1, 4, 16 records: past 1,500 bytes after the second chunk, it stops.
        bounded = await reader.recent(b"k", limit=100, chunk=1, max_bytes=1500)
        assert [(r.value or b"")[:1] for r in bounded] == [bytes([n]) for n in range(5, 10)]
        everything = await reader.recent(b"k", limit=100, chunk=1)
        assert len(everything) == 10
    finally:
        await reader.stop()


async def test_recent_keys_reads_several_keys_back_in_one_pass_led_by_the_first(
    bus: Bus, topic: Callable[..., Awaitable[str]], producer: MakeProducer
) -> None:
    name = await topic()
    plain = await producer()
    await plain.send_and_wait(name, b"old-b", key=b"b")  # before the first key's last 2
    for number in range(4):
        await plain.send_and_wait(name, b"a%d" % number, key=b"a")
    await plain.send_and_wait(name, b"new-b", key=b"b")
    reader = bus.reader(name)
    assert await reader.start()
    try:
        found = await reader.recent_keys((b"a", b"b", b"c"), limit=2, chunk=1)
        # Back far enough for two of "a"; "b" gets what lay on the way; "c" nothing.
        assert [r.value for r in found[b"a"]] == [b"a2", b"a3"]
        assert [r.value for r in found[b"b"]] == [b"new-b"]
        assert found[b"c"] == []
        everything = await reader.recent_keys((b"b", b"a"), limit=10, chunk=2)
        assert [r.value for r in everything[b"b"]] == [b"old-b", b"new-b"]
        assert len(everything[b"a"]) == 4
    finally:
        await reader.stop()


async def test_one_topics_reader_follows_many_topics_each_from_where_it_was_added(
    bus: Bus, topic: Callable[..., Awaitable[str]], producer: MakeProducer
) -> None:
    first, second = await topic(), await topic()
    plain = await producer()
    await plain.send_and_wait(first, b"before", key=b"k")  # before it was added: not read
    reader = bus.topics_reader()
    await reader.start()
    try:
        assert await reader.add([first, first + "-missing"]) == {first}  # one request
        assert await reader.add([first]) == set()  # already followed
        await plain.send_and_wait(first, b"one", key=b"k")
        assert await reader.add([second]) == {second}  # keeps the position in the first
        await plain.send_and_wait(second, b"two", key=b"k")
        seen: list[tuple[str, bytes | None]] = []
        deadline = asyncio.get_running_loop().time() + 20
        while len(seen) < 2 and asyncio.get_running_loop().time() < deadline:
            seen += [(r.topic, r.value) for r in await reader.poll(500)]
        assert sorted(seen) == sorted([(first, b"one"), (second, b"two")])
        assert reader.topics == {first, second}

        admin = await bus.admin().start()
        try:
            await admin.delete_topics([second])
        finally:
            await admin.stop()
        while second not in reader.dropped and asyncio.get_running_loop().time() < deadline:
            await reader.poll(200)
        assert reader.dropped == {second} and reader.topics == {first}
        await plain.send_and_wait(first, b"after", key=b"k")  # the first goes on
        after: list[bytes | None] = []
        while not after and asyncio.get_running_loop().time() < deadline:
            after += [r.value for r in await reader.poll(500)]
        assert after == [b"after"]
    finally:
        await reader.stop()
