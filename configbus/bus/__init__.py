"""Kafka: topic names, and the typed adapter over aiokafka."""

from configbus.bus.kafka import (
    Admin,
    FencedError,
    KafkaSettings,
    PartitionReader,
    Producer,
    Record,
    follow,
    read_to_end,
)
from configbus.bus.topics import CONTENT_TYPE, TopicNames

__all__ = [
    "CONTENT_TYPE",
    "Admin",
    "FencedError",
    "KafkaSettings",
    "PartitionReader",
    "Producer",
    "Record",
    "TopicNames",
    "follow",
    "read_to_end",
]
