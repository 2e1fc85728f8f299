"""The dashboard over HTTP: the page, its live updates (server-sent events) and the
state as JSON, on the process's own event loop, with the reading discipline of the
health server (configbus/health/server.py): request line and headers within
`MAX_HEAD` bytes and `HEAD_TIMEOUT_S`, GET and HEAD only, one request per connection,
at most `MAX_CONNECTIONS` (a new one evicts the oldest still sending its request),
anything malformed a 4xx, nothing a client sends can end the server.

Paths:

- ``/``: the page (page.py), one self-contained document under a Content Security
  Policy that allows its own inline script and style and nothing else;
- ``/events``: ``text/event-stream``. First a ``snapshot`` event (the whole state),
  then ``delta`` events (the rows that changed, the totals and the feed's status),
  at most one per `interval_s` and only when something changed; a comment every
  `keepalive_s` so proxies and browsers keep the stream open. At most `max_clients`
  at once (a 503 past that); a client that does not keep up (`CLIENT_QUEUE` messages
  behind) is dropped, and its browser reconnects and starts from a snapshot;
- ``/api/state``: the snapshot, once, as JSON (for scripts);
- ``/healthz``: 200 and the feed's status.

It is read-only and unauthenticated. Listening on a loopback address, it answers only
requests whose Host header names a loopback host (a page elsewhere cannot read it
through DNS rebinding); anywhere else, put it behind the proxy that authenticates.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
from collections.abc import Callable
from typing import Any, Final

from configbus.dashboard.model import Model
from configbus.dashboard.page import PAGE, PAGE_CSP
from configbus.errors import SettingsError
from configbus.events import now_ns
from configbus.health.server import (
    HEAD_TIMEOUT_S,
    MAX_HEAD,
    MAX_HEADERS,
    WRITE_TIMEOUT_S,
    linger,
    local_url,
    parse_address,
)

__all__ = ["DashboardServer", "sse"]

log = logging.getLogger(__name__)

MAX_CONNECTIONS: Final = 64
MAX_CLIENTS: Final = 16  # live pages at once
CLIENT_QUEUE: Final = 64  # messages a live page may be behind before it is dropped
INTERVAL_S: Final = 0.25  # at most four updates a second
KEEPALIVE_S: Final = 15.0
# A live page is closed after this long (its browser reconnects at once, and starts from
# a fresh snapshot): an idle client cannot hold a slot for ever.
LIFETIME_S: Final = 600.0
SNAPSHOT_REUSE_S: Final = 1.0  # one snapshot serves every request within this long
REFRESH_S: Final = 5.0  # every row looked at again: liveness and expiry move with time
RETRY_MS: Final = 2000  # how soon a browser reconnects
LINGER_S: Final = 1.0
JSON: Final = "application/json"
TEXT: Final = "text/plain; charset=utf-8"
HTML: Final = "text/html; charset=utf-8"
PATHS: Final = ("/", "/events", "/api/state", "/healthz")
_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    421: "Misdirected Request",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
_METHOD: Final = re.compile(rb"[A-Z]{1,16}")
_TOKEN: Final = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
_SECURITY: Final = (
    "X-Content-Type-Options: nosniff",
    "Referrer-Policy: no-referrer",
    "X-Frame-Options: DENY",
)


def sse(event: str, data: Any) -> bytes:
    """One server-sent event: its name and `data` as one line of JSON (escaped to
    ASCII: no line break of any kind can end the line early)."""
    return f"event: {event}\ndata: {_json(data)}\n\n".encode()


def _json(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


class _Request:
    __slots__ = ("head_only", "host", "method", "path")

    def __init__(self, method: bytes, path: str, host: str) -> None:
        self.method, self.path, self.host = method, path, host
        self.head_only = method == b"HEAD"


class _Answer(Exception):
    """A request answered before its path is served (malformed, too large, slow)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status, self.text = status, text


class _Client:
    """One live page: the events waiting for it."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(CLIENT_QUEUE)
        self.behind = False

    def send(self, message: bytes | None) -> None:
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            self.behind = True


class DashboardServer:
    """Serves `model` on `address` (``HOST:PORT``, see `parse_address`); `status()`
    is the feed's (shown in the page's header). Call `changed()` when the model
    changed (its `on_change`). `start()`/`stop()` (idempotent) or `async with`."""

    def __init__(
        self,
        address: str,
        model: Model,
        *,
        status: Callable[[], dict[str, Any]] = dict,
        name: str = "configbus dashboard",
        max_clients: int = MAX_CLIENTS,
        interval_s: float = INTERVAL_S,
        keepalive_s: float = KEEPALIVE_S,
        refresh_s: float = REFRESH_S,
    ) -> None:
        self.address = address
        self.host, self._port = parse_address(address, "--listen")
        self.model = model
        self.status = status
        self.name = name
        self.max_clients = max_clients
        self.interval_s = interval_s
        self.keepalive_s = keepalive_s
        self.refresh_s = refresh_s
        self.requests = 0  # answered, whatever the status
        self.updates = 0  # delta events sent (to every live page)
        self._loopback = _is_loopback(self.host)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._reading: dict[asyncio.Task[Any], None] = {}  # still reading, oldest first
        self._evicted: set[asyncio.Task[Any]] = set()  # cancelled to make room
        self._clients: set[_Client] = set()
        self._wake = asyncio.Event()
        self._sent: dict[str, str] = {}  # each row as last sent, by key
        self._totals = ""  # the totals as last sent
        self._status = ""  # the feed's status as last sent (sent again every refresh)
        self._broadcaster: asyncio.Task[None] | None = None
        self._revision = 0  # model changes seen
        self._snapshot: tuple[int, float, dict[str, Any]] | None = None  # the last made

    @property
    def port(self) -> int:
        if self._server is not None and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self._port

    @property
    def url(self) -> str:
        host = self.host or "127.0.0.1"
        shown = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        return local_url(shown, "/", "--listen")

    @property
    def clients(self) -> int:
        """Live pages connected now."""
        return len(self._clients)

    def changed(self) -> None:
        """The model changed: live pages get the change within `interval_s`."""
        self._revision += 1
        self._wake.set()

    async def start(self) -> DashboardServer:
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
        self._sent = {key: _json(row) for key, row in self.model.rows(now_ns()).items()}
        self._totals, self._status = _json(self.model.totals()), _json(self.status())
        self.model.take_changed()
        self._broadcaster = asyncio.create_task(self._broadcast())
        log.info("%s on %s", self.name, self.url)
        return self

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        broadcaster, self._broadcaster = self._broadcaster, None
        if broadcaster is not None:
            broadcaster.cancel()
        for client in self._clients:
            client.send(None)  # live pages end their streams themselves
        if self._connections:  # and answers end their lingering, within LINGER_S
            await asyncio.wait(list(self._connections), timeout=LINGER_S)
        tasks = [t for t in (broadcaster, *self._connections) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 1.0)

    async def __aenter__(self) -> DashboardServer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- the state --------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """The whole state: what a new page starts from, and ``/api/state``. Made at
        most once per `SNAPSHOT_REUSE_S` (and on a change): a crowd of requests costs
        one snapshot, however large the fleet."""
        now = asyncio.get_running_loop().time()
        cached = self._snapshot
        if cached is None or cached[0] != self._revision or now - cached[1] > SNAPSHOT_REUSE_S:
            cached = self._snapshot = (
                self._revision,
                now,
                {**self.model.state(now_ns()), "feed": self.status()},
            )
        return cached[2]

    async def _broadcast(self) -> None:
        """Send what changed to every live page: at most one event per `interval_s`,
        and every `refresh_s` the rows that time alone changed."""
        loop = asyncio.get_running_loop()
        refreshed = loop.time()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, refreshed + self.refresh_s - loop.time())):
                    await self._wake.wait()
            await asyncio.sleep(self.interval_s)  # what changes meanwhile rides along
            self._wake.clear()
            everything = loop.time() - refreshed >= self.refresh_s
            if everything:
                refreshed = loop.time()
            try:
                self._publish(everything=everything)
            except Exception:  # never let one bad state end the updates
                log.exception("%s: an update failed", self.name)

    def _publish(self, *, everything: bool) -> None:
        changed = self.model.take_changed()
        rows = self.model.rows(now_ns(), None if everything else changed)
        fresh = []
        for key, row in rows.items():
            encoded = _json(row)
            if self._sent.get(key) != encoded:
                self._sent[key] = encoded
                fresh.append(row)
        totals, status = self.model.totals(), self.status()
        moved = _json(totals) != self._totals or (everything and _json(status) != self._status)
        if not fresh and not moved:
            return
        self._totals, self._status = _json(totals), _json(status)
        message = sse(
            "delta",
            {"generated_at": now_ns() // 10**6, "streams": fresh, "totals": totals, "feed": status},
        )
        self.updates += 1
        for client in self._clients:
            client.send(message)

    # -- one connection ---------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None:
            writer.transport.abort()
            return
        if len(self._connections) >= MAX_CONNECTIONS:
            if not self._reading:  # every one is being answered: no room
                writer.transport.abort()
                return
            oldest = next(iter(self._reading))  # a slow sender makes room
            del self._reading[oldest]
            self._evicted.add(oldest)
            oldest.cancel()
        self._connections.add(task)
        self._reading[task] = None
        clean = False
        try:
            head_only = False
            try:
                request = await self._read(reader)
                head_only = request.head_only
                self._refuse(request)
            except _Answer as answer:
                reply = (answer.status, TEXT, f"{answer.text}\n".encode())
            else:
                if request.path == "/events" and not head_only:
                    self._reading.pop(task, None)
                    await self._events(reader, writer)
                    clean = True
                    return
                reply = self._answer(request)
            self._reading.pop(task, None)
            await self._respond(writer, *reply, head_only=head_only)
            self._reading[task] = None  # evictable again while it lingers
            await linger(reader, writer)
            clean = True
        except (ConnectionError, TimeoutError, OSError):
            pass  # gone, or too slow
        except asyncio.CancelledError:  # evicted, or the server stops
            writer.transport.abort()
            if task in self._evicted:  # our own doing: end quietly (asyncio would log
                return  # a traceback per evicted connection, which anyone can cause)
            raise
        except Exception:  # never let a request end the server
            log.exception("%s: an HTTP request failed", self.name)
        finally:
            self._connections.discard(task)
            self._reading.pop(task, None)
            self._evicted.discard(task)
            if clean:
                writer.close()
            else:
                writer.transport.abort()

    async def _read(self, reader: asyncio.StreamReader) -> _Request:
        """The request line and headers; raises `_Answer` with the 4xx to give."""
        try:
            async with asyncio.timeout(HEAD_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise _Answer(431, f"request line and headers over {MAX_HEAD} bytes") from None
        except asyncio.IncompleteReadError as exc:
            if exc.partial and len(exc.partial) >= MAX_HEAD:
                raise _Answer(431, f"request line and headers over {MAX_HEAD} bytes") from None
            raise ConnectionResetError("closed before the end of the request") from None
        except TimeoutError:
            raise _Answer(408, f"no complete request within {HEAD_TIMEOUT_S:g}s") from None
        lines = head[:-4].split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not _METHOD.fullmatch(parts[0]):
            raise _Answer(400, "malformed request line")
        method, target, version = parts
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            if version.startswith(b"HTTP/") and len(version) < 16:
                raise _Answer(505, "HTTP/1.1 only")
            raise _Answer(400, "malformed request line")
        if len(lines) - 1 > MAX_HEADERS:
            raise _Answer(431, f"over {MAX_HEADERS} headers")
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN.fullmatch(name):
                raise _Answer(400, "malformed header")
            headers[name.lower()] = value.strip()
        path = target.split(b"?", 1)[0]
        if not path.startswith(b"/"):
            raise _Answer(400, "the request target must be a path")
        return _Request(
            method, path.decode("ascii", "replace"), headers.get(b"host", b"").decode("latin-1")
        )

    def _refuse(self, request: _Request) -> None:
        """Raise `_Answer` for a request that is not served: another host (listening
        on loopback), an unknown path, a method other than GET and HEAD."""
        if self._loopback and not _loopback_host(request.host):
            raise _Answer(421, "this dashboard answers requests for a loopback host only")
        if request.path not in PATHS:
            raise _Answer(404, "not found: try / or /api/state")
        if request.method not in (b"GET", b"HEAD"):
            raise _Answer(405, "GET or HEAD only")

    def _answer(self, request: _Request) -> tuple[int, str, bytes]:
        """(status, content type, body) of a request served that is not a live page."""
        self.requests += 1
        if request.path == "/":
            return 200, HTML, PAGE
        if request.path == "/events":  # HEAD
            return 200, "text/event-stream", b""
        if request.path == "/healthz":
            return 200, JSON, (_json({"alive": True, "feed": self.status()}) + "\n").encode()
        try:
            return 200, JSON, (_json(self.snapshot()) + "\n").encode()
        except Exception:
            log.exception("%s: the state failed", self.name)
            return 500, TEXT, b"internal error (see the process's log)\n"

    async def _events(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A live page: the snapshot, then every delta, until it goes away."""
        if len(self._clients) >= self.max_clients:
            body = f"{self.max_clients} live pages already: try again later\n".encode()
            await self._respond(writer, 503, TEXT, body, head_only=False)
            await linger(reader, writer)
            return
        self.requests += 1
        client = _Client()
        self._clients.add(client)
        gone = asyncio.create_task(_until_closed(reader, client))
        ends = asyncio.get_running_loop().time() + LIFETIME_S
        try:
            head = _head(
                200,
                "text/event-stream",
                None,
                extra=("X-Accel-Buffering: no",),  # nginx: pass each event on at once
            )
            writer.write(
                head + f"retry: {RETRY_MS}\n\n".encode() + sse("snapshot", self.snapshot())
            )
            await _drain(writer)
            while True:
                try:
                    async with asyncio.timeout(self.keepalive_s):
                        message = await client.queue.get()
                except TimeoutError:
                    message = b": keepalive\n\n"
                if message is None or client.behind:
                    return  # gone, or too far behind: its browser reconnects
                if asyncio.get_running_loop().time() > ends:
                    return  # its browser reconnects, and the slot turns over
                writer.write(message)
                await _drain(writer)
        finally:
            self._clients.discard(client)
            gone.cancel()

    async def _respond(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        content_type: str,
        body: bytes,
        *,
        head_only: bool,
    ) -> None:
        writer.write(_head(status, content_type, len(body)))
        if not head_only:
            writer.write(body)
        await _drain(writer)


def _head(status: int, content_type: str, length: int | None, extra: tuple[str, ...] = ()) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        "Cache-Control: no-store",
        "Connection: close",
        *_SECURITY,
        *extra,
    ]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if content_type == HTML:
        lines.append(f"Content-Security-Policy: {PAGE_CSP}")
    if status == 405:
        lines.append("Allow: GET, HEAD")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _drain(writer: asyncio.StreamWriter) -> None:
    async with asyncio.timeout(WRITE_TIMEOUT_S):
        await writer.drain()


async def _until_closed(reader: asyncio.StreamReader, client: _Client) -> None:
    """Read what a live page's browser sends (nothing, normally) until it closes the
    connection, then end the client's stream; more than a little ends it too."""
    left = 64 * 1024
    with contextlib.suppress(ConnectionError, OSError):
        while left > 0 and (data := await reader.read(4096)):
            left -= len(data)
    client.send(None)
    client.behind = client.behind or left <= 0


def _is_loopback(host: str) -> bool:
    """Whether a listening address is a loopback one ("" is every interface: no)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _loopback_host(header: str) -> bool:
    """Whether a Host header names a loopback host (or is absent: HTTP/1.0, no browser)."""
    if not header:
        return True
    if header.startswith("["):
        name = header[1 : header.find("]")] if "]" in header else ""
    else:
        name = header.rpartition(":")[0] if header.count(":") == 1 else header
    return name.lower() == "localhost" or _is_loopback(name)
