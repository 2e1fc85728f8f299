"""etcd watch, what a team might use instead: etcd (Debian's etcd-server, started by
benchmarks/etcd.sh) through its JSON gateway. The writer POSTs /v3/kv/put with the same
JSON as redis_pubsub; each subscriber holds its own /v3/watch stream and decodes the
value from the event (base64, then JSON). t0: just before the put. etcd fsyncs its WAL
on every put. Skipped, with the reason, when etcd-server cannot be installed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fleet import Closer, Report
from harness import BASE, BenchError, config_value, edit_of

from systems import System


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Http:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1:port: POST JSON, read a sized or
    chunked answer, or `stream` the newline-delimited messages of /v3/watch."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    @staticmethod
    def request(path: str, body: bytes) -> bytes:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def _send(self, request: bytes) -> tuple[asyncio.StreamReader, int, dict[str, str]]:
        if self.reader is None or self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.write(request)
        status_line = await self.reader.readline()
        if not status_line:
            raise BenchError("etcd closed the connection")
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return self.reader, int(status_line.split()[1]), headers

    @staticmethod
    async def _chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
        while size := int((await reader.readline()).split(b";")[0], 16):
            yield (await reader.readexactly(size + 2))[:-2]
        await reader.readline()

    async def post(self, request: bytes) -> dict[str, Any]:
        reader, status, headers = await self._send(request)
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        else:
            body = b"".join([chunk async for chunk in self._chunks(reader)])
        if status != 200:
            raise BenchError(f"etcd answered {status}: {body[:200]!r}")
        answer: dict[str, Any] = json.loads(body)
        return answer

    async def stream(self, request: bytes) -> AsyncIterator[dict[str, Any]]:
        reader, status, headers = await self._send(request)
        if status != 200 or "chunked" not in headers.get("transfer-encoding", ""):
            raise BenchError(f"etcd watch answered {status} {headers}")
        buffer = b""
        async for chunk in self._chunks(reader):
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip():
                    yield json.loads(line)

    async def close(self) -> None:
        writer, self.reader, self.writer = self.writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def clients(spec: dict[str, Any], indices: list[int], report: Report) -> Closer:
    key = b64(spec["etcd_key"].encode())
    request = Http.request("/v3/watch", json.dumps({"create_request": {"key": key}}).encode())

    async def open_one() -> tuple[Http, AsyncIterator[dict[str, Any]]]:
        http = Http(spec["etcd_port"])
        messages = http.stream(request).__aiter__()
        first = await asyncio.wait_for(messages.__anext__(), 10)
        if not first.get("result", {}).get("created"):
            raise BenchError(f"etcd watch not created: {first}")
        return http, messages

    watches = await asyncio.gather(*(open_one() for _ in indices))

    async def read(index: int, messages: AsyncIterator[dict[str, Any]]) -> None:
        async for message in messages:
            for event in message.get("result", {}).get("events", ()):
                value = base64.b64decode(event["kv"]["value"])
                report(index, edit_of(value), time.time_ns(), None)

    tasks = [asyncio.create_task(read(i, m)) for i, (_, m) in zip(indices, watches, strict=True)]

    async def close() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for http, _ in watches:
            await http.close()

    return close


class EtcdWatch(System):
    name = "etcd_watch"
    label = "etcd watch"
    module = "etcd_watch"
    servers = ("etcd",)

    def skip_reason(self) -> str | None:
        return None if self.ctx.etcd_port else "etcd is not running (see benchmarks/etcd.sh)"

    def spec(self) -> dict[str, Any]:
        return {"etcd_port": self.ctx.etcd_port, "etcd_key": self.key}

    def put(self, edit: int) -> bytes:
        value = config_value(self.ctx.document, edit)
        body = json.dumps({"key": b64(self.key.encode()), "value": b64(value)}).encode()
        return Http.request("/v3/kv/put", body)

    async def setup(self) -> None:
        if self.ctx.etcd_port is None:
            raise BenchError("etcd is not running")
        self.key = f"/e2e/{uuid.uuid4().hex[:8]}/config"
        self.http = Http(self.ctx.etcd_port)
        await self.http.post(self.put(-BASE))

    async def write(self, edit: int) -> int:
        request = self.put(edit)
        t0 = time.time_ns()
        await self.http.post(request)
        return t0

    async def teardown(self) -> None:
        if getattr(self, "http", None) is not None:
            await self.http.close()
