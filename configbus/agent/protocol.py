"""What the host agent and the services behind it say to each other over its Unix socket.

Each frame is a 4-byte big-endian length followed by that many bytes of msgpack: one
of the tagged messages below. A service opens one connection per stream it follows and
says `Hello`; the agent answers with the stream's latest verified record, when it has
one, and then with every record of the stream as Kafka delivers it, as `Delivery`:
the record's bytes exactly as the publisher signed them, so the service verifies each
one itself and the agent can neither forge nor reorder a config. The service sends its
acknowledgements back as `Acks`, which the agent forwards to Kafka in batches.

A frame over the limit the reader sets (the largest event a service accepts, plus room
for the envelope) ends the connection: neither side buffers more than that.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Final, TypeAlias

import msgspec

from configbus.errors import BusError

__all__ = [
    "PROTOCOL_VERSION",
    "Acks",
    "Delivery",
    "Frame",
    "Hello",
    "Welcome",
    "read_frame",
    "write_frame",
]

PROTOCOL_VERSION: Final = 1
_LENGTH: Final = struct.Struct(">I")


class Hello(msgspec.Struct, tag="hello", frozen=True, kw_only=True):
    """Service -> agent, first: the stream to follow and who is asking."""

    protocol: int = PROTOCOL_VERSION
    tenant: str
    env: str
    instance: str
    service: str
    version: int = 0  # the version the service runs (0: none yet)


class Welcome(msgspec.Struct, tag="welcome", frozen=True, kw_only=True):
    """Agent -> service, in answer to `Hello`: whether it holds a record of the stream
    yet, and what it knows of Kafka (for the service's own error messages)."""

    protocol: int = PROTOCOL_VERSION
    has_record: bool
    kafka: str  # "connected", or why not


class Delivery(msgspec.Struct, tag="record", frozen=True, kw_only=True):
    """Agent -> service: one record of the stream, as read from Kafka (or its cache)."""

    topic: str
    offset: int
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int = 0
    key: bytes = b""  # the record key (its channel); empty: the snapshot's


class Acks(msgspec.Struct, tag="acks", frozen=True):
    """Service -> agent: acknowledgements, each (record key, encoded `Ack`)."""

    items: tuple[tuple[bytes, bytes], ...]


Frame: TypeAlias = Hello | Welcome | Delivery | Acks

_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(Frame)


def encode(frame: Frame) -> bytes:
    body = _encoder.encode(frame)
    return _LENGTH.pack(len(body)) + body


def write_frame(writer: asyncio.StreamWriter, frame: Frame) -> None:
    """Queue one frame on `writer` (the caller drains when it wants back-pressure)."""
    writer.write(encode(frame))


async def read_frame(reader: asyncio.StreamReader, limit: int) -> Frame | None:
    """The next frame, or None at a clean end of the connection. Raises `BusError` for a
    frame over `limit` bytes, a cut one, or bytes that are no frame."""
    try:
        head = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise BusError("the connection ended inside a frame") from None
    (length,) = _LENGTH.unpack(head)
    if length > limit:
        raise BusError(f"a frame of {length} bytes, over the limit of {limit}")
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise BusError("the connection ended inside a frame") from None
    try:
        return _decoder.decode(body)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise BusError(f"not a frame of the agent protocol ({exc})") from None
