"""A subscriber's connection to the host agent (configbus/agent/protocol.py).

Records arrive as the publisher signed them and are handled exactly as records read
from Kafka; acknowledgements go back in one frame per turn of the event loop, however
many were made in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

from configbus.agent.protocol import Acks, Delivery, Hello, Welcome, encode, read_frame
from configbus.bus import Record
from configbus.errors import BusError

__all__ = ["AgentLink"]

WELCOME_BYTES = 4096
CONNECT_TIMEOUT_S = 5.0
UNSENT_BYTES = 1024 * 1024  # acks waiting in the socket's buffer, at most


class AgentLink:
    """One open connection to the agent, following one stream."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        welcome: Welcome,
        key: bytes,
    ) -> None:
        self.path = os.fspath(path)
        self.welcome = welcome
        self._reader = reader
        self._writer = writer
        self._key = key
        self._acks: list[tuple[bytes, bytes]] = []
        self.dropped_acks = 0

    @classmethod
    async def open(cls, path: str | os.PathLike[str], hello: Hello) -> AgentLink:
        """Connect and say hello. Raises `OSError` when nobody listens at `path`, and
        `BusError` when what answers is no agent."""
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            reader, writer = await asyncio.open_unix_connection(os.fspath(path))
            try:
                writer.write(encode(hello))
                welcome = await read_frame(reader, WELCOME_BYTES)
                if not isinstance(welcome, Welcome):
                    raise BusError(f"{os.fspath(path)} did not answer as an agent")
            except BaseException:
                writer.close()
                raise
        return cls(path, reader, writer, welcome, hello.env.encode())

    async def records(self, limit: int) -> AsyncIterator[Record]:
        """The stream's records, as the agent passes them on; ends when the agent goes.
        `limit`: the largest frame accepted (a larger one ends the connection)."""
        while True:
            frame = await read_frame(self._reader, limit)
            if frame is None:
                return
            if isinstance(frame, Delivery):
                yield Record(
                    frame.topic,
                    0,
                    frame.offset,
                    frame.key or self._key,
                    frame.value,
                    frame.headers,
                    frame.timestamp_ms,
                )

    def ack(self, key: bytes, value: bytes) -> None:
        """Queue an acknowledgement; the queue leaves as one frame at the end of this
        turn of the event loop. Dropped (and counted) while more than
        `UNSENT_BYTES` wait for an agent that does not read them."""
        if self._writer.transport.get_write_buffer_size() > UNSENT_BYTES:
            self.dropped_acks += 1
            return
        if not self._acks:
            asyncio.get_running_loop().call_soon(self._flush)
        self._acks.append((key, value))

    def _flush(self) -> None:
        acks, self._acks = self._acks, []
        if acks and not self._writer.is_closing():
            self._writer.write(encode(Acks(tuple(acks))))

    async def close(self) -> None:
        """Close, sending what is queued if the agent takes it within a second: an agent
        that stopped reading cannot hold a service's `stop()`."""
        self._flush()
        self._writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(self._writer.wait_closed(), 1.0)
        self._writer.transport.abort()
