"""The dashboard's HTTP server: the page under its Content Security Policy, the state as
JSON, server-sent events (framing, a snapshot then deltas of what changed, debounced,
keep-alive comments), the limit on live pages and clean disconnects, and the answers
to what is not served (404, 405, 421, malformed requests)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from configbus.dashboard import DashboardServer
from configbus.dashboard.page import PAGE, PAGE_CSP
from configbus.dashboard.web import CLIENT_QUEUE, _Client, sse
from configbus.errors import SettingsError

from .dashboard_world import World
from .helpers import eventually


@pytest.fixture
async def world(tmp_path: Path) -> World:
    world = World(tmp_path)
    await world.publish(1, actor="publisher", reason="startup")
    await world.publish(1, env="staging")
    await world.ack("i-1", 1, startup=True)
    world.drain()
    return world


@pytest.fixture
async def server(world: World) -> AsyncIterator[DashboardServer]:
    server = DashboardServer(
        "127.0.0.1:0", world.model, status=world.feed.status, interval_s=0.05, keepalive_s=5.0
    )
    world.model.on_change = server.changed
    async with server:
        yield server


async def request(
    port: int, raw: bytes | str, *, host: str = "127.0.0.1"
) -> tuple[int, dict[str, str], bytes]:
    """Send `raw` (a request; a str is a path to GET) and read the whole answer."""
    if isinstance(raw, str):
        raw = f"GET {raw} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(10):
            data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


class Events:
    """A live page's connection: its response head, then its events one by one."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.head: dict[str, str] = {}
        self.status = 0

    @classmethod
    async def open(cls, port: int) -> Events:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /events HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n"
        )
        await writer.drain()
        events = cls(reader, writer)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        events.status = int(lines[0].split()[1])
        events.head = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        return events

    async def next(self, timeout: float = 5.0) -> tuple[str, str]:
        """The next block: (event name, data), ("", comment) for a comment, ("retry",
        value) for a retry field."""
        async with asyncio.timeout(timeout):
            block = (await self.reader.readuntil(b"\n\n")).decode()
        fields: dict[str, str] = {}
        for line in block.strip("\n").split("\n"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        if "" in fields:
            return "", fields[""]
        if "retry" in fields:
            return "retry", fields["retry"]
        return fields["event"], fields["data"]

    async def event(self, timeout: float = 5.0) -> tuple[str, dict[str, Any]]:
        """The next named event, comments and retry fields skipped."""
        while True:
            name, data = await self.next(timeout)
            if name not in ("", "retry"):
                return name, json.loads(data)

    def close(self) -> None:
        self.writer.close()


async def test_the_page_is_served_under_its_security_policy(server: DashboardServer) -> None:
    status, headers, body = await request(server.port, "/")

    assert status == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert body == PAGE
    assert headers["content-security-policy"] == PAGE_CSP
    assert "default-src 'none'" in PAGE_CSP and "connect-src 'self'" in PAGE_CSP
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["cache-control"] == "no-store"
    assert headers["x-frame-options"] == "DENY"

    status, headers, body = await request(server.port, b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 421  # listening on loopback: other hosts (DNS rebinding) are refused
    status, headers, body = await request(
        server.port, b"HEAD / HTTP/1.1\r\nHost: localhost:1\r\n\r\n"
    )
    assert (status, body, headers["content-length"]) == (200, b"", str(len(PAGE)))


async def test_the_state_is_served_as_json(server: DashboardServer, world: World) -> None:
    status, headers, body = await request(server.port, "/api/state")

    assert status == 200 and headers["content-type"] == "application/json"
    state = json.loads(body)
    assert [row["key"] for row in state["streams"]] == ["acme/prod", "acme/staging"]
    assert state["totals"]["streams"] == 2
    assert state["feed"]["records"] == world.feed.records
    status, _, body = await request(server.port, "/healthz")
    assert status == 200 and json.loads(body)["alive"] is True


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /nope HTTP/1.1\r\nHost: localhost\r\n\r\n", 404),
        (b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n", 405),
        (b"DELETE /events HTTP/1.1\r\nHost: localhost\r\n\r\n", 405),
        (b"GET /events HTTP/1.1\r\nHost: evil.example\r\n\r\n", 421),
        (b"GET /api/state HTTP/1.1\r\nHost: 10.0.0.1:8765\r\n\r\n", 421),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET http://x/ HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431),
    ],
)
async def test_what_is_not_served_gets_a_4xx(
    server: DashboardServer, raw: bytes, status: int
) -> None:
    answered, headers, _ = await request(server.port, raw)
    assert answered == status
    if status == 405:
        assert headers["allow"] == "GET, HEAD"


async def test_requests_for_loopback_names_and_none_are_served(server: DashboardServer) -> None:
    for host in ("localhost", "127.0.0.1:8765", "[::1]:8765", "LOCALHOST:1"):
        assert (await request(server.port, "/api/state", host=host))[0] == 200
    status, *_ = await request(server.port, b"GET /healthz HTTP/1.0\r\n\r\n")  # no Host
    assert status == 200


async def test_another_interface_serves_any_host(world: World) -> None:
    async with DashboardServer("0.0.0.0:0", world.model) as server:  # behind a proxy
        assert (await request(server.port, "/api/state", host="dash.example"))[0] == 200


async def test_a_live_page_gets_a_snapshot_then_what_changes(
    server: DashboardServer, world: World
) -> None:
    events = await Events.open(server.port)
    try:
        assert events.status == 200
        assert events.head["content-type"] == "text/event-stream"
        assert events.head["cache-control"] == "no-store"
        assert "content-length" not in events.head
        assert await events.next() == ("retry", "2000")
        name, snapshot = await events.event()
        assert name == "snapshot"
        assert [row["key"] for row in snapshot["streams"]] == ["acme/prod", "acme/staging"]
        assert snapshot["streams"][0]["version"] == 1
        assert server.clients == 1

        await world.publish(2, actor="bob", reason="INC-2")
        await world.ack("i-1", 2, latency_ms=8.0)
        world.drain()

        name, delta = await events.event()
        assert name == "delta"
        assert [row["key"] for row in delta["streams"]] == ["acme/prod"]  # only what changed
        row = delta["streams"][0]
        if row["latency"]["samples"] == 0:  # the ack came in the next interval
            name, delta = await events.event()
            row = delta["streams"][0]
        assert (row["version"], row["change"]["actor"], row["change"]["reason"]) == (
            2,
            "bob",
            "INC-2",
        )
        assert row["instances"]["at_target"] == 1
        assert row["latency"]["samples"] == 1
        assert delta["totals"]["streams"] == 2
    finally:
        events.close()
    await eventually(lambda: server.clients == 0, "the closed page to be let go")


async def test_changes_are_debounced(world: World) -> None:
    server = DashboardServer("127.0.0.1:0", world.model, interval_s=0.3)
    world.model.on_change = server.changed
    async with server:
        events = await Events.open(server.port)
        try:
            await events.event()  # the snapshot
            for version in range(2, 22):  # twenty changes within an interval
                await world.publish(version)
                world.drain()
            versions: list[int] = []
            while 21 not in versions:
                _, delta = await events.event()
                versions += [row["version"] for row in delta["streams"]]
            assert server.updates <= 3  # not twenty: one an interval (a slow machine: two)
        finally:
            events.close()


async def test_a_quiet_stream_gets_keep_alive_comments(world: World) -> None:
    async with DashboardServer("127.0.0.1:0", world.model, keepalive_s=0.1) as server:
        events = await Events.open(server.port)
        try:
            await events.event()
            assert await events.next(timeout=2) == ("", "keepalive")
        finally:
            events.close()


async def test_live_pages_are_limited(world: World) -> None:
    async with DashboardServer("127.0.0.1:0", world.model, max_clients=2) as server:
        pages = [await Events.open(server.port) for _ in range(2)]
        try:
            for page in pages:
                assert (await page.event())[0] == "snapshot"
            status, _, body = await request(server.port, "/events", host="localhost")
            assert status == 503 and b"2 live pages already" in body
            assert (await request(server.port, "/api/state"))[0] == 200  # the rest still is
        finally:
            pages[0].close()
        await eventually(lambda: server.clients == 1, "a page to go")
        third = await Events.open(server.port)
        try:
            assert third.status == 200
        finally:
            third.close()
            pages[1].close()
        await eventually(lambda: server.clients == 0, "every page to go")


async def test_an_idle_page_gives_its_slot_back_after_its_lifetime(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that connects and never reads only ever gets keep-alives: without a
    lifetime it would hold its slot for good, and a few such clients lock pages out."""
    monkeypatch.setattr("configbus.dashboard.web.LIFETIME_S", 0.3)
    async with DashboardServer(
        "127.0.0.1:0", world.model, max_clients=1, keepalive_s=0.05
    ) as server:
        idle = await Events.open(server.port)
        try:
            await idle.event()
            await eventually(lambda: server.clients == 0, "the idle page's slot back")
            again = await Events.open(server.port)
            try:
                assert again.status == 200
            finally:
                again.close()
        finally:
            idle.close()


async def test_a_page_that_falls_behind_is_dropped() -> None:
    client = _Client()
    for n in range(CLIENT_QUEUE):
        client.send(b"x")
        assert not client.behind, n
    client.send(b"one too many")
    assert client.behind  # its stream ends; the browser reconnects from a snapshot


async def test_time_alone_changes_rows(world: World) -> None:
    """An instance that goes silent leaves the live count with no record to say so: the
    rows are looked at again every refresh."""
    await world.heartbeat("i-2", 1, beat_ms=300)
    world.drain()
    server = DashboardServer("127.0.0.1:0", world.model, refresh_s=0.2, interval_s=0.01)
    async with server:
        events = await Events.open(server.port)
        try:
            _, snapshot = await events.event()
            assert snapshot["streams"][0]["instances"]["live"] == 2
            rows: list[Any] = []
            while not rows:  # the feed's status may come first, alone
                _, delta = await events.event(timeout=3)
                rows = delta["streams"]
            assert [row["instances"]["live"] for row in rows] == [1]
        finally:
            events.close()


def test_sse_framing_keeps_each_event_on_one_data_line() -> None:
    message = sse("delta", {"actor": "a\nb\r\nc\u2028d", "n": 1})

    assert message.startswith(b"event: delta\ndata: ")
    assert message.endswith(b"\n\n")
    assert message.count(b"\n") == 3 and b"\r" not in message
    data = message.split(b"data: ", 1)[1].rstrip(b"\n")
    assert json.loads(data) == {"actor": "a\nb\r\nc\u2028d", "n": 1}


async def test_a_busy_port_or_a_bad_address_is_a_settings_error(
    server: DashboardServer, world: World
) -> None:
    with pytest.raises(SettingsError, match="cannot listen"):
        await DashboardServer(f"127.0.0.1:{server.port}", world.model).start()
    with pytest.raises(SettingsError, match="--listen"):
        DashboardServer("nowhere", world.model)


async def test_stop_is_idempotent_and_ends_live_pages(world: World) -> None:
    server = DashboardServer("127.0.0.1:0", world.model)
    await server.start()
    assert await server.start() is server
    events = await Events.open(server.port)
    await events.event()
    await server.stop()
    await server.stop()
    async with asyncio.timeout(5):
        assert await events.reader.read() == b""  # the stream ended
    events.close()


async def test_rows_are_looked_at_again_however_busy_other_streams_are(world: World) -> None:
    """Heartbeats of one stream every moment must not keep another stream's instance
    that went silent on the page."""
    await world.heartbeat("quiet", 1, beat_ms=300)
    world.drain()
    server = DashboardServer("127.0.0.1:0", world.model, refresh_s=0.3, interval_s=0.02)
    world.model.on_change = server.changed
    async with server:
        events = await Events.open(server.port)
        try:
            _, snapshot = await events.event()
            assert snapshot["streams"][0]["instances"]["live"] == 2
            seen: list[int] = []
            version = 1
            async with asyncio.timeout(10):
                while not seen:  # acme/staging changes all the time
                    version += 1
                    await world.publish(version, env="staging")
                    world.drain()
                    _, delta = await events.event()
                    seen = [r["instances"]["live"] for r in delta["streams"] if r["env"] == "prod"]
            assert seen == [1]
        finally:
            events.close()
