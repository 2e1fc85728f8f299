"""The in-memory bus keeps Kafka's semantics: offsets, transactions, fencing, sizes,
readers, and the faults tests inject. tests/integration/test_bus_contract.py checks the
shared ones against a real broker."""

from __future__ import annotations

import asyncio
import time

import pytest

from configbus.bus.memory import DEFAULT_MAX_MESSAGE_BYTES, MemoryBus, MemoryProducer
from configbus.errors import BusError, FencedError, RefusedError


@pytest.fixture
def bus() -> MemoryBus:
    bus = MemoryBus()
    bus.create_topic("t")
    return bus


async def started(bus: MemoryBus, transactional_id: str | None = None) -> MemoryProducer:
    return await bus.producer(transactional_id=transactional_id).start()


async def values(bus: MemoryBus, *topics: str) -> list[bytes | None]:
    return [record.value async for record in bus.read_to_end(list(topics))]


# -- topics -------------------------------------------------------------------------


async def test_records_get_offsets_from_0_in_one_partition_with_a_timestamp(
    bus: MemoryBus,
) -> None:
    before = int(time.time() * 1000)
    async with bus.producer() as producer:
        for value in (b"a", b"b", b"c"):
            await producer.send_and_wait("t", value, key=b"k", headers=(("h", b"1"),))
    records = bus.records("t")
    assert [(r.partition, r.offset, r.value) for r in records] == [
        (0, 0, b"a"),
        (0, 1, b"b"),
        (0, 2, b"c"),
    ]
    assert before <= records[0].timestamp_ms <= int(time.time() * 1000)
    assert records[0].header("h") == b"1"


async def test_topics_record_their_cleanup_policy_and_size_limit() -> None:
    bus = MemoryBus(max_message_bytes=5000)
    async with bus.admin() as admin:
        assert await admin.ensure_topics(["b", "a"], compact=True) == ["a", "b"]
        assert await admin.ensure_topics(["a", "c"], compact=False) == ["c"]
        await admin.ensure_topics(["d"], compact=False, configs={"max.message.bytes": "100"})
        assert await admin.topics() == {"a", "b", "c", "d"}
        assert await admin.max_message_bytes("a") == 5000
        assert await admin.max_message_bytes("d") == 100
        assert await admin.max_message_bytes("missing") is None
    assert bus.topic_configs("a")["cleanup.policy"] == "compact"
    assert bus.topic_configs("c")["cleanup.policy"] == "delete"
    bus.create_topic("e", max_message_bytes=64)
    assert bus.topic_configs("e")["max.message.bytes"] == "64"
    default = MemoryBus()
    default.create_topic("f")
    assert default.topic_configs("f")["max.message.bytes"] == str(DEFAULT_MAX_MESSAGE_BYTES)
    assert DEFAULT_MAX_MESSAGE_BYTES == 1_048_588  # Kafka's default


async def test_compaction_keeps_the_last_record_per_key_at_its_offset(bus: MemoryBus) -> None:
    async with bus.producer() as producer:
        for key, value in [(b"x", b"1"), (b"y", b"2"), (b"x", b"3"), (b"z", b"4"), (b"y", b"5")]:
            await producer.send_and_wait("t", value, key=key)
    bus.compact("t")
    assert [(r.offset, r.key, r.value) for r in bus.records("t")] == [
        (2, b"x", b"3"),
        (3, b"z", b"4"),
        (4, b"y", b"5"),
    ]


async def test_sending_to_a_missing_topic_fails_retriably(bus: MemoryBus) -> None:
    async with bus.producer() as producer:
        with pytest.raises(BusError, match="does not exist") as caught:
            await producer.send("missing", b"v")
    assert caught.value.retriable


async def test_a_deleted_and_recreated_topic_starts_again_at_offset_0(bus: MemoryBus) -> None:
    async with bus.producer() as producer:
        await producer.send_and_wait("t", b"old")
        await producer.send_and_wait("t", b"old")
        reader = bus.reader("t")
        assert await reader.start()
        assert await reader.poll(timeout_ms=0) == []  # positioned at the end: offset 2
        async with bus.admin() as admin:
            await admin.delete_topics(["t", "never-was"])
            assert await admin.topics() == set()
            await admin.ensure_topics(["t"], compact=False)
        await producer.send_and_wait("t", b"new")
    assert [(r.offset, r.value) for r in await reader.poll(timeout_ms=0)] == [(0, b"new")]


# -- sizes --------------------------------------------------------------------------


async def test_a_record_too_large_for_its_topic_is_refused_for_good() -> None:
    bus = MemoryBus()
    bus.create_topic("t", max_message_bytes=5000)
    # Kafka counts the batch: 61 bytes of header, then the record. With no key and these
    # headers, 4845 bytes was the largest value a real broker took at 5000.
    headers = (("content-type", b"abc"), ("traceparent", b"x" * 55))
    async with bus.producer() as producer:
        await producer.send_and_wait("t", b"x" * 4845, headers=headers)
    async with bus.producer() as producer:
        with pytest.raises(RefusedError, match="larger than 5000 bytes") as caught:
            await producer.send_and_wait("t", b"x" * 4846, headers=headers)
    assert not caught.value.retriable
    assert len(bus.records("t")) == 1


async def test_after_a_refusal_the_producer_refuses_that_topic_until_restarted() -> None:
    bus = MemoryBus()
    bus.create_topic("t", max_message_bytes=1000)
    bus.create_topic("u")
    async with bus.producer() as producer:
        await producer.send_and_wait("t", b"small")
        with pytest.raises(RefusedError):
            await producer.send_and_wait("t", b"x" * 2000)
        with pytest.raises(BusError, match="OutOfOrderSequenceNumber") as caught:
            await producer.send_and_wait("t", b"small")
        assert not caught.value.retriable
        await producer.send_and_wait("u", b"other topics still work")
        await producer.restart()
        await producer.send_and_wait("t", b"after restart")
    assert [r.value for r in bus.records("t")] == [b"small", b"after restart"]


async def test_a_fresh_idempotent_producer_goes_on_after_a_refused_first_record() -> None:
    bus = MemoryBus()
    bus.create_topic("t", max_message_bytes=1000)
    async with bus.producer() as producer:
        with pytest.raises(RefusedError):
            await producer.send_and_wait("t", b"x" * 2000)
        await producer.send_and_wait("t", b"small")
    assert [r.value for r in bus.records("t")] == [b"small"]


async def test_a_compacted_topic_refuses_records_without_a_key() -> None:
    bus = MemoryBus()
    bus.create_topic("c", compact=True)
    async with bus.producer() as producer:
        with pytest.raises(BusError, match="needs keys") as caught:
            await producer.send_and_wait("c", b"v")
    assert not caught.value.retriable


# -- transactions -------------------------------------------------------------------


async def test_a_transaction_is_invisible_until_it_commits(bus: MemoryBus) -> None:
    producer = await started(bus, "tx")
    plain = await started(bus)
    reader = bus.reader("t")
    assert await reader.start()
    async with producer.transaction():
        await (await producer.send("t", b"in-txn", key=b"k"))
        await plain.send_and_wait("t", b"after the open transaction")
        assert bus.records("t") == []  # the stable end stops at the open transaction
        assert await values(bus, "t") == []
        assert await reader.poll(timeout_ms=10) == []
        assert await reader.latest(b"k") is None
    assert await values(bus, "t") == [b"in-txn", b"after the open transaction"]
    assert [r.value for r in await reader.poll(timeout_ms=0)] == [
        b"in-txn",
        b"after the open transaction",
    ]
    async with producer.transaction():
        await producer.send("t", b"next")
    # offset 2 is the commit marker of the first transaction, as in Kafka
    assert [r.offset for r in bus.records("t")] == [0, 1, 3]


async def test_an_exception_in_a_transaction_aborts_it(bus: MemoryBus) -> None:
    producer = await started(bus, "tx")

    async def fail() -> None:
        async with producer.transaction():
            await producer.send("t", b"aborted")
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        await fail()
    async with producer.transaction():
        await producer.send("t", b"committed")
    assert [(r.offset, r.value) for r in bus.records("t")] == [(2, b"committed")]


async def test_an_oversize_record_fails_alone_and_the_transaction_commits() -> None:
    bus = MemoryBus()
    bus.create_topic("t", max_message_bytes=1000)
    bus.create_topic("u")
    producer = await started(bus, "tx")
    async with producer.transaction():
        small = await producer.send("t", b"small", key=b"a")
        big = await producer.send("t", b"x" * 2000, key=b"b")
        later = await producer.send("t", b"later", key=b"c")
        other = await producer.send("u", b"other", key=b"d")
    await small
    with pytest.raises(RefusedError):
        await big
    with pytest.raises(BusError, match="OutOfOrderSequenceNumber"):
        await later
    await other
    assert await values(bus, "t", "u") == [b"small", b"other"]


async def test_a_newer_producer_with_the_same_id_fences_the_older(bus: MemoryBus) -> None:
    older = await started(bus, "tx")
    newer = bus.producer(transactional_id="tx")

    async def fenced() -> None:
        async with older.transaction():
            await older.send("t", b"open when fenced")
            await newer.start()  # aborts the older's open transaction
            await older.send("t", b"fenced")

    with pytest.raises(FencedError):
        await fenced()
    with pytest.raises(FencedError):
        async with older.transaction():
            pass
    async with newer.transaction():
        await newer.send("t", b"newer")
    assert await values(bus, "t") == [b"newer"]
    await older.restart()  # a new epoch: now the other one is fenced
    with pytest.raises(FencedError):
        async with newer.transaction():
            await newer.send("t", b"x")


async def test_commit_fails_when_fenced_mid_transaction(bus: MemoryBus) -> None:
    older = await started(bus, "tx")

    async def fenced_at_commit() -> None:
        async with older.transaction():
            await older.send("t", b"lost")
            await started(bus, "tx")

    with pytest.raises(FencedError):
        await fenced_at_commit()
    assert await values(bus, "t") == []


async def test_transactions_and_producers_refuse_misuse(bus: MemoryBus) -> None:
    plain = await started(bus)
    with pytest.raises(BusError, match="not transactional") as caught:
        async with plain.transaction():
            pass
    assert not caught.value.retriable
    with pytest.raises(BusError, match="not in a transaction"):
        await (await started(bus, "tx")).send("t", b"v")
    with pytest.raises(BusError, match="not connected"):
        await bus.producer().send("t", b"v")
    await plain.stop()
    await plain.stop()


# -- readers ------------------------------------------------------------------------


async def test_a_reader_of_a_missing_topic_does_not_start(bus: MemoryBus) -> None:
    assert not await bus.reader("missing").start()


async def test_latest_finds_the_last_record_of_a_key_then_follows(bus: MemoryBus) -> None:
    producer = await started(bus)
    for key, value in [(b"k", b"1"), (b"j", b"2"), (b"k", b"3"), (b"j", b"4")]:
        await producer.send_and_wait("t", value, key=key)
    reader = bus.reader("t")
    assert await reader.start()
    found = await reader.latest(b"k")
    assert found is not None and (found.offset, found.value) == (2, b"3")
    assert await reader.latest(b"none") is None
    await producer.send_and_wait("t", b"5", key=b"k")
    assert [r.value for r in await reader.poll(timeout_ms=0)] == [b"5"]


async def test_poll_waits_for_new_records_without_spinning(bus: MemoryBus) -> None:
    producer = await started(bus)
    reader = bus.reader("t")
    assert await reader.start()
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert await reader.poll(timeout_ms=50) == []
    assert loop.time() - began >= 0.045

    async def send_soon() -> None:
        await asyncio.sleep(0.02)
        await producer.send_and_wait("t", b"arrived")

    began = loop.time()
    task = asyncio.create_task(send_soon())
    assert [r.value for r in await reader.poll(timeout_ms=5000)] == [b"arrived"]
    assert loop.time() - began < 1
    await task


async def test_read_to_end_stops_at_the_end_it_found_and_skips_missing_topics(
    bus: MemoryBus,
) -> None:
    bus.create_topic("u")
    producer = await started(bus)
    await producer.send_and_wait("t", b"t1")
    await producer.send_and_wait("u", b"u1")
    seen = []
    async for record in bus.read_to_end(["t", "missing", "u"]):
        seen.append(record.value)
        await producer.send_and_wait(record.topic, b"too late")
    assert seen == [b"t1", b"u1"]


async def test_follow_yields_history_then_new_records_until_cancelled(bus: MemoryBus) -> None:
    producer = await started(bus)
    await producer.send_and_wait("t", b"old")
    seen: dict[bool, list[bytes | None]] = {True: [], False: []}

    async def follow(from_beginning: bool) -> None:
        async for record in bus.follow(["t", "missing"], from_beginning=from_beginning):
            seen[from_beginning].append(record.value)

    tasks = [asyncio.create_task(follow(flag)) for flag in (True, False)]
    await asyncio.sleep(0)
    await producer.send_and_wait("t", b"new")
    for _ in range(5):
        await asyncio.sleep(0)
    assert seen == {True: [b"old", b"new"], False: [b"new"]}
    for task in tasks:
        task.cancel()
    for task in tasks:
        with pytest.raises(asyncio.CancelledError):
            await task


# -- faults -------------------------------------------------------------------------


async def test_a_bus_that_is_down_fails_every_call_until_it_is_up(bus: MemoryBus) -> None:
    producer = await started(bus)
    reader = bus.reader("t")
    assert await reader.start()
    bus.down = True
    calls = [
        bus.admin().start(),
        bus.producer().start(),
        bus.reader("t").start(),
        producer.send("t", b"v"),
        reader.poll(timeout_ms=0),
        anext(bus.read_to_end(["t"])),
    ]
    for call in calls:
        with pytest.raises(BusError, match="bus unreachable"):
            await call
    bus.down = False
    await producer.send_and_wait("t", b"v")
    assert len(await reader.poll(timeout_ms=0)) == 1


async def test_going_down_wakes_a_waiting_poll(bus: MemoryBus) -> None:
    reader = bus.reader("t")
    assert await reader.start()
    task = asyncio.create_task(reader.poll(timeout_ms=5000))
    await asyncio.sleep(0)
    bus.down = True
    with pytest.raises(BusError, match="bus unreachable"):
        await asyncio.wait_for(task, 1)


async def test_fail_next_fails_one_call_of_one_operation(bus: MemoryBus) -> None:
    producer = await started(bus, "tx")
    bus.fail_next("send", RefusedError("no"))
    async with producer.transaction():
        with pytest.raises(RefusedError, match="no"):
            await producer.send("t", b"refused")
        await producer.send("t", b"sent")  # the next send works
    bus.fail_next("commit")

    async def commit() -> None:
        async with producer.transaction():
            await producer.send("t", b"aborted")

    with pytest.raises(BusError, match="injected failure: commit"):
        await commit()
    assert await values(bus, "t") == [b"sent"]
    with pytest.raises(ValueError, match="unknown operation"):
        bus.fail_next("sned")


async def test_recent_reads_back_no_further_than_its_byte_budget(bus: MemoryBus) -> None:
    bus.create_topic("t", compact=False)
    async with bus.producer() as producer:
        for number in range(10):
            await producer.send_and_wait("t", bytes([number]) * 1000, key=b"k")
    reader = bus.reader("t")
    assert await reader.start()
    everything = await reader.recent(b"k", limit=100, chunk=1)
    assert [r.value[:1] for r in everything if r.value] == [bytes([n]) for n in range(10)]
    # Chunks of 1, 4, 16 records: past 1,500 bytes after the second chunk, it stops.
    bounded = await reader.recent(b"k", limit=100, chunk=1, max_bytes=1500)
    assert [r.value[:1] for r in bounded if r.value] == [bytes([n]) for n in range(5, 10)]
