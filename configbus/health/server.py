"""A small HTTP/1.1 server for ``/healthz``, ``/readyz`` and ``/metrics``, on the
process's own event loop: no thread, so what it reads of the daemon is never read
half-way through a change.

It listens on an address that may face anything, so it reads little and trusts
nothing: GET and HEAD only; the request line and headers within `MAX_HEAD` bytes and
`MAX_HEADERS` lines, all of it within `HEAD_TIMEOUT_S` (a slow sender is cut off, not
waited for); at most `MAX_CONNECTIONS` at once, where a new one evicts the oldest
still sending its request (so a probe gets through a crowd of slow senders); one
request per connection (``Connection: close``); a response not taken within
`WRITE_TIMEOUT_S` is dropped. Anything malformed gets a 4xx answer and the connection
closed; an error of its own gets a 500; nothing a client sends can end the server or
the process it runs in.

The paths: ``/healthz`` (alive) and ``/readyz`` (ready) answer 200 or 503 with a JSON
body naming each check; ``/metrics`` the target's Prometheus registry, in the format
the scraper asks for (Prometheus text, or OpenMetrics), written by prometheus_client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from configbus.errors import SettingsError

__all__ = [
    "Check",
    "HealthServer",
    "Target",
    "Verdict",
    "http_address",
    "local_url",
    "parse_address",
]

log = logging.getLogger(__name__)

MAX_HEAD: Final = 8192  # request line and headers, in bytes
MAX_HEADERS: Final = 64
HEAD_TIMEOUT_S: Final = 5.0  # to receive the request line and headers
WRITE_TIMEOUT_S: Final = 10.0  # to hand the response over
LINGER_S: Final = 1.0  # after the response: how long what the client still sends is read
LINGER_BYTES: Final = 1024 * 1024  # and how much of it
MAX_CONNECTIONS: Final = 64  # at the limit, the oldest still sending makes room
PATHS: Final = ("/healthz", "/readyz", "/metrics")
JSON: Final = "application/json"
TEXT: Final = "text/plain; charset=utf-8"
_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
_METHOD: Final = re.compile(rb"[A-Z]{1,16}")
_TOKEN: Final = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")  # a header name


@dataclass(frozen=True, slots=True)
class Check:
    """One check of a probe: whether it passes, and a line saying why."""

    ok: bool
    detail: str

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer of ``/healthz`` or ``/readyz``: 200 when `ok`, else 503, and `body`
    as JSON (by convention ``{"alive"|"ready": bool, ..., "checks": {name: check}}``)."""

    ok: bool
    body: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, what: str, checks: dict[str, Check], **extra: Any) -> Verdict:
        """Passing when every check passes: ``{what: ok, **extra, "checks": ...}``."""
        ok = all(check.ok for check in checks.values())
        body = {what: ok, **extra, "checks": {n: c.as_json() for n, c in checks.items()}}
        return cls(ok, body)


class Target(Protocol):
    """What a `HealthServer` serves: a process's liveness, readiness and metrics.
    Called on the event loop; each must be quick and must not block."""

    registry: CollectorRegistry

    def live(self) -> Verdict: ...
    def ready(self) -> Verdict: ...


def parse_address(text: str, what: str = "--http") -> tuple[str, int]:
    """``HOST:PORT``, ``[IPV6]:PORT`` or ``:PORT`` (every interface) as (host, port);
    host "" is every interface. Port 0: one the system picks. Raises `SettingsError`
    naming `what`."""
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        sep = ""  # an IPv6 address without brackets: its last group is no port
    if not sep or not port.isdigit() or int(port) > 65535 or any(c.isspace() for c in host):
        raise SettingsError(
            f"{what} {text!r}: say HOST:PORT, [IPV6]:PORT or :PORT (e.g. 127.0.0.1:9464)"
        )
    return host, int(port)


def http_address(text: str | None) -> str | None:
    """An --http setting as given: None (not served) for none, "" or "off"."""
    text = (text or "").strip()
    return None if text.lower() in ("", "off") else text


def local_url(address: str, path: str = "", what: str = "--http") -> str:
    """The URL a process on the same host reaches `address` at: every interface
    (``:PORT``, ``0.0.0.0``, ``::``) is reached through the loopback."""
    host, port = parse_address(address, what)
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}{path}"


class HealthServer:
    """Serves a `Target` on `address` (see `parse_address`). `start()` / `stop()`
    (idempotent), or `async with`; `port` is the port bound (for port 0)."""

    def __init__(self, address: str, target: Target, *, name: str = "configbus") -> None:
        self.address = address
        self.host, self._port = parse_address(address)
        self.target = target
        self.name = name
        self.requests = 0  # answered, whatever the status
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._reading: dict[asyncio.Task[Any], None] = {}  # still reading, oldest first
        self._evicted: set[asyncio.Task[Any]] = set()  # cancelled to make room

    @property
    def port(self) -> int:
        """The port listened on: the one asked for, or the system's pick for port 0."""
        if self._server is not None and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self._port

    @property
    def url(self) -> str:
        """The server's base URL as reached from this host."""
        host = self.host or "127.0.0.1"
        return local_url(f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}")

    async def start(self) -> HealthServer:
        """Listen; raises `SettingsError` when the address cannot be listened on."""
        if self._server is not None:
            return self
        try:
            self._server = await asyncio.start_server(
                self._serve, self.host or None, self._port, limit=MAX_HEAD, reuse_address=True
            )
        except OSError as exc:
            raise SettingsError(
                f"{self.name}: cannot listen on {self.address}: {exc.strerror or exc}"
            ) from None
        log.info("%s: health and metrics on %s", self.name, self.url)
        return self

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=1.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 1.0)

    async def __aenter__(self) -> HealthServer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- one connection -----------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None:
            writer.transport.abort()
            return
        if len(self._connections) >= MAX_CONNECTIONS:
            if not self._reading:  # every one is being answered: no room, no answer
                writer.transport.abort()
                return
            oldest = next(iter(self._reading))  # a slow sender makes room for a new one
            del self._reading[oldest]
            self._evicted.add(oldest)
            oldest.cancel()
        self._connections.add(task)
        self._reading[task] = None
        clean = False
        try:
            status, content_type, body, head_only = await self._answer(reader)
            self._reading.pop(task, None)
            await self._respond(writer, status, content_type, body, head_only)
            self._reading[task] = None  # evictable again while it lingers
            await linger(reader, writer)
            clean = True
        except (ConnectionError, TimeoutError, OSError):
            pass  # gone, or too slow: nothing more to say
        except asyncio.CancelledError:  # evicted, or the server stops
            writer.transport.abort()
            if task in self._evicted:  # our own doing: end quietly (asyncio would log
                return  # a traceback per evicted connection, which anyone can cause)
            raise
        except Exception:  # never let a request end the server, whatever it sent
            log.exception("%s: an HTTP request failed", self.name)
        finally:
            self._connections.discard(task)
            self._reading.pop(task, None)
            self._evicted.discard(task)
            if clean:
                writer.close()
            else:
                writer.transport.abort()  # drop what is unsent: nobody waits for it

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, str, bytes, bool]:
        """Read one request; (status, content type, body, whether HEAD)."""
        try:
            async with asyncio.timeout(HEAD_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return _plain(431, f"request line and headers over {MAX_HEAD} bytes")
        except asyncio.IncompleteReadError as exc:
            if exc.partial and len(exc.partial) >= MAX_HEAD:
                return _plain(431, f"request line and headers over {MAX_HEAD} bytes")
            raise ConnectionResetError("closed before the end of the request") from None
        except TimeoutError:
            return _plain(408, f"no complete request within {HEAD_TIMEOUT_S:g}s")
        lines = head[:-4].split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not _METHOD.fullmatch(parts[0]):
            return _plain(400, "malformed request line")
        method, target, version = parts
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            if version.startswith(b"HTTP/") and len(version) < 16:
                return _plain(505, "HTTP/1.1 only")
            return _plain(400, "malformed request line")
        headers: dict[bytes, bytes] = {}
        if len(lines) - 1 > MAX_HEADERS:
            return _plain(431, f"over {MAX_HEADERS} headers")
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN.fullmatch(name):
                return _plain(400, "malformed header")
            headers[name.lower()] = value.strip()
        path = target.split(b"?", 1)[0]
        if not path.startswith(b"/"):
            return _plain(400, "the request target must be a path")
        head_only = method == b"HEAD"
        if path.decode("ascii", "replace") not in PATHS:
            status, kind, body = _plain(404, "not found: try /healthz, /readyz or /metrics")[:3]
            return status, kind, body, head_only
        if method not in (b"GET", b"HEAD"):
            return _plain(405, "GET or HEAD only")
        self.requests += 1
        try:
            if path == b"/metrics":
                encoder, kind = _encoder(headers.get(b"accept", b"").decode("latin-1"))
                return 200, kind, encoder(self.target.registry), head_only
            verdict = self.target.live() if path == b"/healthz" else self.target.ready()
        except Exception:
            log.exception("%s: %s failed", self.name, path.decode())
            return 500, TEXT, b"internal error (see the process's log)\n", head_only
        body = json.dumps(verdict.body, sort_keys=False).encode() + b"\n"
        return (200 if verdict.ok else 503), JSON, body, head_only

    async def _respond(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        content_type: str,
        body: bytes,
        head_only: bool,
    ) -> None:
        lines = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            "Cache-Control: no-store",
            "Connection: close",
        ]
        if status == 405:
            lines.append("Allow: GET, HEAD")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if not head_only:
            writer.write(body)
        async with asyncio.timeout(WRITE_TIMEOUT_S):
            await writer.drain()


async def linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Say the response is complete (FIN), then take what the client still sends (the
    rest of an oversized request, a body) for a moment: closing a connection with
    unread data resets it, and a reset can destroy the response before the client
    reads it."""
    if writer.can_write_eof():
        writer.write_eof()
    left = LINGER_BYTES
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(LINGER_S):
            while left > 0 and (data := await reader.read(min(left, 65536))):
                left -= len(data)


def _encoder(accept: str) -> tuple[Callable[[CollectorRegistry], bytes], str]:
    """prometheus_client's writer for what the scraper accepts; the plain text format
    when the header is one it cannot read (a malformed version raises in it)."""
    try:
        return choose_encoder(accept)
    except Exception:
        return choose_encoder("")


def _plain(status: int, text: str) -> tuple[int, str, bytes, bool]:
    return status, TEXT, f"{text}\n".encode(), False
