"""The health server over real TCP on port 0: what it answers on each path, and that
nothing a client sends (garbage, huge or endless headers, a crowd of slow senders)
crashes it or keeps a probe out. Also `configbus check`, its client."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from configbus.cli import main
from configbus.cli_check import target_url
from configbus.errors import SettingsError
from configbus.health import Check, HealthServer, Verdict, local_url, parse_address
from configbus.health import server as http

from .helpers import eventually


class Fake:
    """A target whose answers a test sets."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.hits = Counter("fake_hits", "hits", registry=self.registry)
        self.alive = True
        self.is_ready = False
        self.broken = False

    def live(self) -> Verdict:
        return Verdict.of("alive", {"loop": Check(self.alive, "answering")})

    def ready(self) -> Verdict:
        if self.broken:
            raise RuntimeError("a bug in a check")
        return Verdict.of("ready", {"writer": Check(self.is_ready, "standby")}, writer=False)


@pytest.fixture
async def served() -> AsyncIterator[tuple[HealthServer, Fake]]:
    target = Fake()
    async with HealthServer("127.0.0.1:0", target, name="test") as server:
        yield server, target


async def request(port: int, raw: bytes, *, timeout: float = 5.0) -> bytes:
    """Send `raw` bytes, read until the server closes; the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


async def get(port: int, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    """GET `path`: the status, the headers (lower-case names) and the body."""
    lines = [f"GET {path} HTTP/1.1", "Host: test", *(f"{k}: {v}" for k, v in headers.items())]
    answer = await request(port, ("\r\n".join(lines) + "\r\n\r\n").encode())
    return parse(answer)


def parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    found = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        found[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), found, body


# -- addresses --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        (":9464", ("", 9464)),
        ("[::1]:0", ("::1", 0)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_an_address_is_host_and_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["9464", "host:", "host:65536", "::1:9464", "a b:1", "h:-1"])
def test_a_malformed_address_is_refused_naming_the_setting(text: str) -> None:
    with pytest.raises(SettingsError, match="--http"):
        parse_address(text)


def test_every_interface_is_reached_through_the_loopback() -> None:
    assert local_url(":9464", "/readyz") == "http://127.0.0.1:9464/readyz"
    assert local_url("0.0.0.0:1") == "http://127.0.0.1:1"
    assert local_url("[::]:2") == "http://[::1]:2"
    assert local_url("10.1.2.3:3") == "http://10.1.2.3:3"


# -- the paths --------------------------------------------------------------------------


async def test_port_0_binds_a_port_the_server_tells(served: tuple[HealthServer, Fake]) -> None:
    server, _ = served
    assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}"


async def test_healthz_and_readyz_answer_json_with_each_check(
    served: tuple[HealthServer, Fake],
) -> None:
    server, target = served
    status, headers, body = await get(server.port, "/healthz")
    assert status == 200 and headers["content-type"] == "application/json"
    assert headers["connection"] == "close" and int(headers["content-length"]) == len(body)
    assert json.loads(body) == {
        "alive": True,
        "checks": {"loop": {"ok": True, "detail": "answering"}},
    }
    status, _, body = await get(server.port, "/readyz?verbose=1")  # a query is ignored
    assert status == 503
    assert json.loads(body)["writer"] is False
    target.is_ready = True
    assert (await get(server.port, "/readyz"))[0] == 200


async def test_metrics_are_the_targets_registry_in_the_format_asked(
    served: tuple[HealthServer, Fake],
) -> None:
    server, target = served
    target.hits.inc(3)
    status, headers, body = await get(server.port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["fake_hits"].samples[0].value == 3
    status, headers, body = await get(
        server.port, "/metrics", Accept="application/openmetrics-text; version=1.0.0"
    )
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


async def test_head_answers_the_headers_alone(served: tuple[HealthServer, Fake]) -> None:
    server, _ = served
    answer = await request(server.port, b"HEAD /healthz HTTP/1.1\r\n\r\n")
    status, headers, body = parse(answer)
    assert status == 200 and int(headers["content-length"]) > 0 and body == b""


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /nowhere HTTP/1.1\r\n\r\n", 404),
        (b"GET / HTTP/1.1\r\n\r\n", 404),
        (b"POST /readyz HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
        (b"DELETE /metrics HTTP/1.0\r\n\r\n", 405),
        (b"GET /healthz HTTP/2.0\r\n\r\n", 505),
        (b"GET /healthz SPDY/3\r\n\r\n", 400),
        (b"GET /healthz\r\n\r\n", 400),  # HTTP/0.9
        (b"get /healthz HTTP/1.1\r\n\r\n", 400),
        (b"GET  /healthz HTTP/1.1\r\n\r\n", 400),
        (b"GET http://evil/healthz HTTP/1.1\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\n: empty name\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # a TLS hello
        (b"\xff\xfe\x00garbage\x00\r\n\r\n", 400),
        (b"\r\n\r\n", 400),
    ],
)
async def test_anything_malformed_or_unexpected_gets_a_clean_4xx(
    served: tuple[HealthServer, Fake], raw: bytes, status: int
) -> None:
    server, _ = served
    answered, headers, _ = parse(await request(server.port, raw))
    assert answered == status
    if status == 405:
        assert headers["allow"] == "GET, HEAD"
    assert (await get(server.port, "/healthz"))[0] == 200  # and it goes on serving


async def test_huge_or_too_many_headers_are_refused(served: tuple[HealthServer, Fake]) -> None:
    server, _ = served
    huge = b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * (http.MAX_HEAD * 4) + b"\r\n\r\n"
    assert parse(await request(server.port, huge))[0] == 431
    many = b"GET /healthz HTTP/1.1\r\n" + b"X-A: b\r\n" * (http.MAX_HEADERS + 1) + b"\r\n"
    assert parse(await request(server.port, many))[0] == 431
    endless = b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * (http.MAX_HEAD * 2)  # no end
    assert parse(await request(server.port, endless))[0] == 431
    assert (await get(server.port, "/healthz"))[0] == 200


async def test_a_hostile_accept_header_still_gets_metrics(
    served: tuple[HealthServer, Fake],
) -> None:
    server, _ = served
    for accept in ("application/openmetrics-text; version=x.y", "text/plain; version=\x7f;;;"):
        status, _, body = await get(server.port, "/metrics", Accept=accept)
        assert status == 200 and b"fake_hits_total" in body


async def test_a_slow_sender_is_cut_off_at_the_deadline(
    served: tuple[HealthServer, Fake], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slowloris: a header line a second, never the end. The server answers 408 once
    the head's deadline is up, not when the client stops."""
    monkeypatch.setattr(http, "HEAD_TIMEOUT_S", 0.3)
    server, _ = served
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        loop = asyncio.get_running_loop()
        started = loop.time()
        trickle = asyncio.create_task(_trickle(writer))
        answer = await asyncio.wait_for(reader.read(), 5)
        trickle.cancel()
        assert parse(answer)[0] == 408
        assert loop.time() - started < 2
    finally:
        writer.close()


async def _trickle(writer: asyncio.StreamWriter) -> None:
    with_errors: Any = (ConnectionError, OSError)
    try:
        while True:
            writer.write(b"X-Slow: 1\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
    except with_errors:
        return


async def test_a_crowd_of_slow_senders_does_not_keep_a_probe_out(
    served: tuple[HealthServer, Fake], monkeypatch: pytest.MonkeyPatch
) -> None:
    """More silent connections than the server takes at once: each new one evicts the
    oldest still sending, so a probe arriving after them all is answered at once."""
    monkeypatch.setattr(http, "MAX_CONNECTIONS", 4)
    server, _ = served
    idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(10)]
    try:
        await asyncio.sleep(0.05)
        status, _, _ = await asyncio.wait_for(get(server.port, "/healthz"), 2)
        assert status == 200
        assert len(server._connections) <= 4
    finally:
        for _, writer in idle:
            writer.close()


async def test_evicted_connections_end_without_a_logged_traceback(
    served: tuple[HealthServer, Fake],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Anyone can open idle connections: evicting them must not log an error each."""
    monkeypatch.setattr(http, "MAX_CONNECTIONS", 2)
    server, _ = served
    idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(12)]
    try:
        assert (await asyncio.wait_for(get(server.port, "/healthz"), 2))[0] == 200
        await eventually(lambda: len(server._connections) <= 2, "the crowd evicted")
        assert (await asyncio.wait_for(get(server.port, "/healthz"), 2))[0] == 200
    finally:
        for _, writer in idle:
            writer.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


async def test_a_failing_check_is_a_500_and_the_server_goes_on(
    served: tuple[HealthServer, Fake], caplog: pytest.LogCaptureFixture
) -> None:
    server, target = served
    target.broken = True
    status, _, body = await get(server.port, "/readyz")
    assert status == 500 and b"RuntimeError" not in body  # no internals to the client
    assert any("a bug in a check" in r.getMessage() or r.exc_info for r in caplog.records)
    target.broken = False
    assert (await get(server.port, "/readyz"))[0] == 503


async def test_clients_that_vanish_mid_request_leave_it_serving(
    served: tuple[HealthServer, Fake],
) -> None:
    server, _ = served
    for partial in (b"", b"GET /hea", b"GET /healthz HTTP/1.1\r\nHost"):
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(partial)
        writer.transport.abort()
    await asyncio.sleep(0.05)
    assert (await get(server.port, "/healthz"))[0] == 200
    assert not server._connections or all(not t.done() for t in server._connections)


async def test_a_port_in_use_is_one_clear_settings_error(
    served: tuple[HealthServer, Fake],
) -> None:
    server, _ = served
    with pytest.raises(SettingsError, match=f"cannot listen on 127.0.0.1:{server.port}"):
        await HealthServer(f"127.0.0.1:{server.port}", Fake(), name="second").start()


async def test_stop_is_idempotent_and_closes_the_port() -> None:
    server = await HealthServer("127.0.0.1:0", Fake()).start()
    port = server.port
    await server.stop()
    await server.stop()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


# -- configbus check ----------------------------------------------------------------------


async def test_check_exits_0_when_it_passes_and_1_when_not(
    served: tuple[HealthServer, Fake], capsys: pytest.CaptureFixture[str]
) -> None:
    server, target = served
    code = await asyncio.to_thread(main, ["check", "--url", server.url])
    out, err = capsys.readouterr()
    assert code == 0 and out.strip() == f"{server.url}/healthz: 200 alive" and not err
    code = await asyncio.to_thread(main, ["check", "--url", server.url, "--ready"])
    out, err = capsys.readouterr()
    assert code == 1 and not out
    assert err.strip() == f"{server.url}/readyz: 503 not ready: writer: standby"
    target.is_ready = True
    assert await asyncio.to_thread(main, ["check", "--url", server.url, "--ready"]) == 0


async def test_check_reads_the_address_from_configbus_http(
    served: tuple[HealthServer, Fake],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server, _ = served
    monkeypatch.setenv("CONFIGBUS_HTTP", f":{server.port}")
    assert await asyncio.to_thread(main, ["check"]) == 0
    assert capsys.readouterr().out.startswith(f"http://127.0.0.1:{server.port}/healthz: 200")


def test_check_without_a_url_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CONFIGBUS_HTTP", raising=False)
    assert main(["check"]) == 2
    assert "give --url or set CONFIGBUS_HTTP" in capsys.readouterr().err
    assert main(["check", "--url", "ftp://x:1"]) == 2


def test_check_of_nothing_listening_fails_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import socket

    with socket.socket() as sock:  # bound, not listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        assert main(["check", "--url", f"http://127.0.0.1:{port}", "--timeout", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"http://127.0.0.1:{port}/healthz: ") and len(err.splitlines()) == 1


def test_the_url_asked_keeps_a_path_given() -> None:
    assert target_url("http://h:1", ready=True) == "http://h:1/readyz"
    assert target_url("http://h:1/", ready=False) == "http://h:1/healthz"
    assert target_url("http://h:1/custom", ready=True) == "http://h:1/custom"
