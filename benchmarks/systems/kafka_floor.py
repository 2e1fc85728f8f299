"""The Kafka floor: no configbus code, aiokafka with configbus's settings.

A producer (acks=all, idempotence, linger 0) sends one record as large as a configbus
event (random bytes, the edit's id in its first 8) to a fresh one-partition topic;
N read_committed consumers are assigned to the partition, with the fetch_max_wait_ms of
`configbus.bus.kafka.PartitionReader`. t0: just before the send.

- kafka_floor: one send per transaction (as the publisher, which also writes the audit
  and state topics in the same transaction);
- kafka_floor_no_txn: the same producer without a transactional id, so each send is
  acknowledged once every in-sync replica has it: what a publisher without fencing
  would pay.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from typing import Any

from fleet import Closer, Report

from systems import System


async def clients(spec: dict[str, Any], indices: list[int], report: Report) -> Closer:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    tp = TopicPartition(spec["topic"], 0)

    async def open_one() -> Any:
        # The options of configbus.bus.kafka's consumer and PartitionReader.
        consumer = AIOKafkaConsumer(
            bootstrap_servers=spec["servers"],
            client_id="e2e-floor-reader",
            request_timeout_ms=15_000,
            enable_auto_commit=False,
            isolation_level="read_committed",
            group_id=None,
            fetch_max_wait_ms=spec["fetch_max_wait_ms"],
            auto_offset_reset="latest",
        )
        await consumer.start()
        consumer.assign([tp])
        await consumer.seek_to_end(tp)
        await consumer.position(tp)
        return consumer

    consumers = await asyncio.gather(*(open_one() for _ in indices))

    async def read(index: int, consumer: Any) -> None:
        while True:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            now = time.time_ns()
            for message in batch.get(tp, ()):
                report(index, int.from_bytes(message.value[:8], "big"), now, None)

    tasks = [asyncio.create_task(read(i, c)) for i, c in zip(indices, consumers, strict=True)]

    async def close() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(c.stop() for c in consumers), return_exceptions=True)

    return close


class KafkaFloor(System):
    name = "kafka_floor"
    label = "Kafka floor, transactions"
    module = "kafka_floor"
    servers = ("kafka",)
    transactional = True

    def spec(self) -> dict[str, Any]:
        return {
            "servers": self.ctx.servers,
            "topic": self.topic,
            "fetch_max_wait_ms": self.ctx.fetch_max_wait_ms,
        }

    async def setup(self) -> None:
        from aiokafka import AIOKafkaProducer

        self.topic = f"e2e-{self.name}-{uuid.uuid4().hex[:8]}"
        await create_topic(self.ctx.servers, self.topic)
        tag = uuid.uuid4().hex[:8]
        # The options of configbus.bus.kafka.Producer.
        self.producer = AIOKafkaProducer(
            bootstrap_servers=self.ctx.servers,
            client_id="e2e-floor-producer",
            request_timeout_ms=15_000,
            acks="all",
            enable_idempotence=True,
            transactional_id=f"e2e-floor-{tag}" if self.transactional else None,
            max_request_size=8 * 1024 * 1024,
            linger_ms=0,
            max_batch_size=256 * 1024,
        )
        await self.producer.start()
        self.filler = random.randbytes(self.ctx.record_bytes - 8)
        for attempt in range(100):  # the new partition needs a leader first
            try:
                await self.write(2**62)
                break
            except Exception:
                if attempt == 99:
                    raise
                await asyncio.sleep(0.2)

    async def write(self, edit: int) -> int:
        value = edit.to_bytes(8, "big") + self.filler
        t0 = time.time_ns()
        if self.transactional:
            async with self.producer.transaction():
                await self.producer.send(self.topic, value=value, key=b"prod")
        else:
            await self.producer.send_and_wait(self.topic, value=value, key=b"prod")
        return t0

    async def teardown(self) -> None:
        if getattr(self, "producer", None) is not None:
            await self.producer.stop()


class KafkaFloorNoTransactions(KafkaFloor):
    name = "kafka_floor_no_txn"
    label = "Kafka floor, no transactions"
    transactional = False


async def create_topic(servers: str, topic: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=servers, client_id="e2e-admin")
    await admin.start()
    try:
        configs = {"cleanup.policy": "compact", "min.insync.replicas": "1"}
        await admin.create_topics([NewTopic(topic, 1, 1, topic_configs=configs)])
    finally:
        await admin.close()


async def warm_kafka(servers: str, seconds: float) -> int:
    """Transactions as fast as they go for `seconds`, with a read_committed consumer
    following: a fresh broker runs its hot paths interpreted until the JIT compiles them,
    and whichever system ran first would pay for it. Returns the transactions made."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    topic = f"e2e-warm-{uuid.uuid4().hex[:8]}"
    await create_topic(servers, topic)
    producer = AIOKafkaProducer(
        bootstrap_servers=servers, transactional_id=f"e2e-warm-{uuid.uuid4().hex[:8]}"
    )
    consumer = AIOKafkaConsumer(
        bootstrap_servers=servers, isolation_level="read_committed", fetch_max_wait_ms=100
    )
    await producer.start()
    await consumer.start()
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])

    async def drain() -> None:
        while True:
            await consumer.getmany(tp, timeout_ms=1000)

    reader = asyncio.create_task(drain())
    count, value = 0, random.randbytes(5000)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            try:
                async with producer.transaction():
                    await producer.send(topic, value=value, key=b"warm")
                count += 1
            except Exception:  # the new partition has no leader yet
                await asyncio.sleep(0.1)
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await consumer.stop()
        await producer.stop()
    return count
