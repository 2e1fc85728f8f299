"""A Kafka client cancelled while it connects leaves nothing open: the host agent
cancels a stream's catch-up reader when it stops, and a trust file that changes starts
catch-ups at any moment. Against a local socket that accepts connections and never
answers, so the cancellation lands while the client waits for its first metadata."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from configbus.bus import KafkaSettings
from configbus.bus import kafka as kafka_bus


async def test_a_reader_cancelled_while_it_connects_closes_its_consumer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    accepted = asyncio.Event()
    connections: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        accepted.set()
        await reader.read()  # never answers; returns when the client hangs up

    consumers: list[Any] = []
    follower = kafka_bus._follower

    def recorded(settings: KafkaSettings) -> Any:
        consumers.append(follower(settings))
        return consumers[-1]

    monkeypatch.setattr(kafka_bus, "_follower", recorded)
    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader = kafka_bus.PartitionReader(KafkaSettings(f"127.0.0.1:{port}"), "topic")
        starting = asyncio.create_task(reader.start())
        await asyncio.wait_for(accepted.wait(), 10)

        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting

        assert [consumer._closed for consumer in consumers] == [True]
    finally:
        for writer in connections:
            writer.close()
        server.close()
        await server.wait_closed()
