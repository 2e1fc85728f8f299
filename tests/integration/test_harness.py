"""The integration harness works: real Kafka and Redis, with the features configbus relies on."""

import asyncio
from collections.abc import Callable, Mapping
from uuid import uuid4

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import ProducerFenced

pytestmark = pytest.mark.integration

TIMEOUT_S = 30  # bound for every step that waits on a server


async def create_topic(bootstrap: str, name: str, configs: Mapping[str, str]) -> dict[str, str]:
    """Create a single-partition topic; return its configuration as the broker reports it."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await admin.start()
        created = await admin.create_topics([NewTopic(name, 1, 1, topic_configs=dict(configs))])
        assert [t[1] for t in created.topic_errors] == [0], created  # (topic, error_code, ...)
        [described] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)])
        [resource] = described.to_object()["resources"]
        return {e["config_names"]: e["config_value"] for e in resource["config_entries"]}
    finally:
        await admin.close()


async def consume(
    bootstrap: str, topic: str, count: int, isolation_level: str = "read_uncommitted"
) -> list[ConsumerRecord[bytes, bytes]]:
    """Read `topic` from the beginning until `count` records arrived or TIMEOUT_S passed."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level=isolation_level,
    )
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        await consumer.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT_S
        while len(records) < count and (left := deadline - loop.time()) > 0:
            batches = await consumer.getmany(timeout_ms=int(min(left, 1.0) * 1000))
            for batch in batches.values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


async def test_compacted_topic_roundtrip_with_key_and_headers(
    kafka_bootstrap: str, topic_name: Callable[[], str]
) -> None:
    topic = topic_name()
    configs = await create_topic(
        kafka_bootstrap, topic, {"cleanup.policy": "compact", "min.insync.replicas": "1"}
    )
    assert configs["cleanup.policy"] == "compact"
    assert configs["min.insync.replicas"] == "1"

    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=True
    )
    try:
        await producer.start()
        sent = await producer.send_and_wait(
            topic, b"value-1", key=b"key-1", headers=[("sig", b"\x00\x01"), ("empty", b"")]
        )
    finally:
        await producer.stop()
    assert sent.offset == 0

    [record] = await consume(kafka_bootstrap, topic, count=1)
    assert (record.key, record.value) == (b"key-1", b"value-1")
    # Headers go in as a list of (str, bytes) and come back as a tuple of tuples.
    assert list(record.headers) == [("sig", b"\x00\x01"), ("empty", b"")]


async def test_transaction_commit_is_visible_to_read_committed(
    kafka_bootstrap: str, topic_name: Callable[[], str]
) -> None:
    topic = topic_name()
    await create_topic(kafka_bootstrap, topic, {})

    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, transactional_id=f"cbtest-{uuid4().hex}"
    )
    try:
        await producer.start()
        async with asyncio.timeout(TIMEOUT_S):
            async with producer.transaction():
                await producer.send_and_wait(topic, b"committed", key=b"k")
            await producer.begin_transaction()
            await producer.send_and_wait(topic, b"aborted", key=b"k")
            await producer.abort_transaction()
            async with producer.transaction():
                await producer.send_and_wait(topic, b"committed-2", key=b"k")
    finally:
        await producer.stop()

    # The aborted record and the transaction markers occupy offsets but are never delivered.
    records = await consume(kafka_bootstrap, topic, count=2, isolation_level="read_committed")
    assert [r.value for r in records] == [b"committed", b"committed-2"]


async def test_second_transactional_producer_fences_the_first(
    kafka_bootstrap: str, topic_name: Callable[[], str]
) -> None:
    topic = topic_name()
    await create_topic(kafka_bootstrap, topic, {})
    transactional_id = f"cbtest-{uuid4().hex}"
    first = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=transactional_id)
    second = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=transactional_id)
    try:
        async with asyncio.timeout(TIMEOUT_S):
            await first.start()
            await first.begin_transaction()
            await first.send_and_wait(topic, b"from-first")
            await second.start()  # same transactional_id: bumps the epoch, fencing `first`
            with pytest.raises(ProducerFenced):
                await first.commit_transaction()
            async with second.transaction():
                await second.send_and_wait(topic, b"from-second")
    finally:
        await first.stop()
        await second.stop()

    # `first`'s open transaction was aborted when `second` took over.
    records = await consume(kafka_bootstrap, topic, count=1, isolation_level="read_committed")
    assert [r.value for r in records] == [b"from-second"]


async def test_redis_roundtrip_and_keyspace_events(redis_url: str) -> None:
    key = f"cbtest:{uuid4().hex}"
    client = aioredis.from_url(redis_url)
    pubsub = client.pubsub()
    try:
        async with asyncio.timeout(TIMEOUT_S):
            await pubsub.subscribe(f"__keyspace@0__:{key}")
            await client.set(key, b"value", ex=60)
            assert await client.get(key) == b"value"

            # notify-keyspace-events is on: the SET shows up as a keyspace event.
            while (
                msg := await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            ) is None:
                pass
            assert msg["data"] == b"set"
    finally:
        await client.delete(key)
        await pubsub.aclose()
        await client.aclose()
