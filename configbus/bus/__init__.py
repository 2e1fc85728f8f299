"""The message bus: topic names, what configbus needs from a bus (`Bus`), its Kafka
implementation, and an in-memory one for tests (`MemoryBus`)."""

from configbus.bus.base import AdminAPI, Bus, Headers, ProducerAPI, ReaderAPI, Record
from configbus.bus.kafka import (
    Admin,
    FencedError,
    KafkaBus,
    KafkaSettings,
    PartitionReader,
    Producer,
    follow,
    read_to_end,
)
from configbus.bus.memory import MemoryBus
from configbus.bus.topics import (
    CANDIDATE_CHANNEL,
    CHAIN_CHANNEL,
    CONTENT_TYPE,
    OVERRIDE_CHANNEL,
    PRESENCE_CHANNEL,
    ROLLOUT_CHANNEL,
    SNAPSHOT_CHANNEL,
    WAIVER_CHANNEL,
    TopicNames,
)

__all__ = [
    "CANDIDATE_CHANNEL",
    "CHAIN_CHANNEL",
    "CONTENT_TYPE",
    "OVERRIDE_CHANNEL",
    "PRESENCE_CHANNEL",
    "ROLLOUT_CHANNEL",
    "SNAPSHOT_CHANNEL",
    "WAIVER_CHANNEL",
    "Admin",
    "AdminAPI",
    "Bus",
    "FencedError",
    "Headers",
    "KafkaBus",
    "KafkaSettings",
    "MemoryBus",
    "PartitionReader",
    "Producer",
    "ProducerAPI",
    "ReaderAPI",
    "Record",
    "TopicNames",
    "follow",
    "read_to_end",
]
