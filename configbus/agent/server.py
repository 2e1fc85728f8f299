"""`configbus agent`: one process per host between Kafka and the services on it.

    configbus agent --socket /run/configbus/agent.sock --bootstrap-servers kafka:9092 \\
        --trust /etc/configbus/trust.yml --cache-dir /var/cache/configbus

Services on the host connect to its Unix socket (`ConfigSubscriber(..., agent=PATH)` or
``CONFIGBUS_AGENT``) instead of each holding Kafka connections. The agent reads each
tenant topic its services follow once, whatever the number of services, and pushes the
records' signed bytes to every service following the stream; each service verifies
every record itself (configbus/agent/protocol.py), so the agent is trusted for nothing
but availability. Acknowledgements come back over the same connections and leave the
host through one producer, in batches.

The agent verifies records too, to know each stream's latest good version: that is
what a service gets first when it connects, from memory, or from the agent's disk cache
when Kafka is unreachable. After a reconnection to Kafka every stream catches up from
the highest verified version among its recent records, as a service's own start-up
does (docs/wire-format.md §2.1), so an agent never hands out an older version than it
has handed out before. It reloads its trust file when the file changes, as subscribers
do (`trust_reload`), so a key added, retired or revoked there counts here too without a
restart; a file that no longer loads leaves the last good one in force. When the keys
it believes change, every stream catches up again, so a record refused under the old
file (signed by a key it did not list yet) is handed out once the file lists it.

With `settings.http` (``--http``), ``/healthz``, ``/readyz`` and ``/metrics`` are served
on the agent's loop (configbus/agent/monitor.py says what they answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import stat
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import msgspec

from configbus.agent.monitor import AgentMonitor
from configbus.agent.protocol import (
    PROTOCOL_VERSION,
    Acks,
    Delivery,
    Hello,
    Welcome,
    encode,
    read_frame,
)
from configbus.bus import (
    CANDIDATE_CHANNEL,
    OVERRIDE_CHANNEL,
    SNAPSHOT_CHANNEL,
    Bus,
    KafkaBus,
    KafkaSettings,
    Record,
    TopicNames,
)
from configbus.bus.base import TopicsReaderAPI
from configbus.crypto import TrustStore
from configbus.crypto.trust import TrustFile
from configbus.errors import BusError, ConfigBusError, SettingsError, VerificationError
from configbus.events import Ack, VerifiedEvent, claimed_version, open_envelope, shown
from configbus.health import HealthServer, parse_address
from configbus.limits import DEFAULT_LIMITS, Limits
from configbus.subscriber.acks import AckSender
from configbus.supervise import Backoff, finish, supervise

__all__ = ["Agent", "AgentSettings", "run"]

log = logging.getLogger(__name__)

BOOTSTRAP_RECORDS = 256  # records of a stream read back when catching up, at most
HELLO_BYTES = 4096  # a Hello frame, at most
ACK_FRAME_BYTES = 1024 * 1024  # an Acks frame, at most
ACK_BYTES = 16 * 1024  # one ack, at most (they are a few hundred bytes)
CLIENT_BUFFER_BYTES = 16 * 1024 * 1024  # unsent bytes to one service before dropping it
POLL_MS = 200  # a new tenant topic waits at most this long to be followed
TOPIC_RETRY_S = 2.0  # a tenant topic that does not exist yet is looked for this often
MAX_CATCH_UPS = 8  # catch-ups (each a consumer of its own, for a moment) at once
CATCH_UP_RETRY_S = 1.0  # a catch-up that failed is tried again after this
CATCH_UP_GRACE_S = 2.0  # on stop: how long running catch-ups may take to end
MAX_CLIENTS = 10_000  # service connections at once
CHANNELS: Final = (SNAPSHOT_CHANNEL, OVERRIDE_CHANNEL, CANDIDATE_CHANNEL)
_CACHE_SUFFIX: Final = {
    SNAPSHOT_CHANNEL: "event",
    OVERRIDE_CHANNEL: "override",
    CANDIDATE_CHANNEL: "candidate",
}
ENV_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # an environment name, as in the tree


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """Everything an agent needs."""

    socket: Path
    kafka: KafkaSettings
    trust: TrustStore
    cache_dir: Path | None = None
    topics: TopicNames = field(default_factory=TopicNames)
    limits: Limits = DEFAULT_LIMITS
    trust_reload: float = 5.0  # seconds between looks at the trust file (0: never)
    http: str | None = None  # where /healthz, /readyz and /metrics are served (HOST:PORT)

    def __post_init__(self) -> None:
        if self.trust_reload < 0:
            raise SettingsError(f"trust_reload {self.trust_reload!r}: must not be negative")
        if self.http is not None:
            parse_address(self.http, "--http (CONFIGBUS_HTTP)")
        if len(os.fsencode(self.socket)) > 100:  # sun_path holds 108 bytes on Linux
            raise SettingsError(f"socket path {self.socket} is too long for a Unix socket")


@dataclass(eq=False)
class _Client:
    """One service connection following one stream."""

    writer: asyncio.StreamWriter
    instance: str
    service: str
    refused_acks: int = 0

    def send(self, frame: bytes) -> bool:
        """Queue a frame; False (and the connection closed) when the service has let
        more than `CLIENT_BUFFER_BYTES` pile up: it reconnects and catches up."""
        if self.writer.is_closing():
            return False
        if self.writer.transport.get_write_buffer_size() > CLIENT_BUFFER_BYTES:
            log.warning(
                "%s (%s) is not reading; closing its connection", self.instance, self.service
            )
            self.writer.close()
            return False
        self.writer.write(frame)
        return True


@dataclass(eq=False)
class _Stream:
    tenant: str
    env: str
    records: dict[str, Record] = field(default_factory=dict)  # channel -> latest verified
    versions: dict[str, int] = field(default_factory=dict)  # channel -> its version
    clients: set[_Client] = field(default_factory=set)
    caught_up: bool = False  # since its topic was last added to the reader
    epoch: int = 0  # times its topic was added to the reader
    retry_at: float = 0.0  # after a failed catch-up: when to try again

    @property
    def record(self) -> Record | None:
        """The latest verified snapshot record."""
        return self.records.get(SNAPSHOT_CHANNEL)

    @property
    def version(self) -> int:
        return self.versions.get(SNAPSHOT_CHANNEL, 0)

    def key(self, channel: str) -> bytes:
        return TopicNames.record_key(self.env, channel)

    def deliver(self, record: Record) -> None:
        frame = _delivery(record)
        for client in list(self.clients):
            if not client.send(frame):
                self.clients.discard(client)


class Agent:
    """The host agent. `async with Agent(settings):` or `start()` / `stop()`."""

    def __init__(self, settings: AgentSettings, *, bus: Bus | None = None) -> None:
        self.settings = settings
        self._bus: Bus = bus or KafkaBus(settings.kafka)
        self._kafka_identity = settings.kafka if bus is None else None  # shared ack producer
        self._streams: dict[tuple[str, str], _Stream] = {}
        self._reader: TopicsReaderAPI | None = None  # while connected
        self._reader_task: asyncio.Task[None] | None = None
        self._catching_up: dict[_Stream, asyncio.Task[None]] = {}
        self._server: asyncio.AbstractServer | None = None
        self._acks: AckSender | None = None
        self._dirty: set[_Stream] = set()
        self._cache_task: asyncio.Task[None] | None = None
        self._cache_wanted = asyncio.Event()
        self.kafka_state = "connecting"
        self.delivered = 0
        self._trust = settings.trust  # the trust file as last loaded
        self._trust_file: TrustFile | None = None
        self._trust_task: asyncio.Task[None] | None = None
        self.refused: Counter[str] = Counter()  # records that did not verify, by reason
        self.monitor = AgentMonitor(self)  # what /healthz, /readyz and /metrics say
        self.http: HealthServer | None = None  # serving them, with settings.http

    # -- lifecycle ------------------------------------------------------------------
    @property
    def trust(self) -> TrustStore:
        """The trust store in force: the trust file as last loaded."""
        return self._trust

    async def start(self) -> Agent:
        if self.settings.trust.source is not None and self.settings.trust_reload > 0:
            self._trust_file = TrustFile.shared(self.settings.trust)
            await self._reload_trust()
            self._trust_task = asyncio.create_task(
                supervise("agent trust", self._watch_trust), name="configbus-agent-trust"
            )
        self._load_cache()
        self._acks = AckSender.acquire(
            self._bus, self.settings.topics.acks, identity=self._kafka_identity
        )
        path = self.settings.socket
        _claim_socket(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, path=str(path))
        self._cache_task = asyncio.create_task(self._write_caches(), name="configbus-agent-cache")
        self._reader_task = asyncio.create_task(self._read(), name="configbus-agent-reader")
        log.info("agent listening on %s (%d stream(s) from its cache)", path, len(self._streams))
        if self.settings.http is not None and self.http is None:
            try:
                self.http = await HealthServer(
                    self.settings.http, self.monitor, name="agent"
                ).start()
            except SettingsError:  # the port is taken: stop what runs, say so
                await self.stop()
                raise
        return self

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for stream in self._streams.values():
            for client in stream.clients:
                client.writer.close()
            stream.clients.clear()
        reader, trust = self._reader_task, self._trust_task
        self._reader_task = self._trust_task = None
        for task in (reader, trust):
            await finish(task, "agent reader")
        # Catch-ups end on their own within moments; one cancelled while its consumer
        # connects can leave a connection of aiokafka's open. A bounded drain, then cancel.
        catching_up = list(self._catching_up.values())
        self._catching_up.clear()
        if catching_up:
            await asyncio.wait(catching_up, timeout=CATCH_UP_GRACE_S)
        for task in catching_up:
            await finish(task, "agent catch-up")
        if self._dirty:
            await asyncio.to_thread(self._flush_caches, list(self._dirty))
        await finish(self._cache_task, "agent cache")
        if self._acks is not None:
            await self._acks.release()
            self._acks = None
        with contextlib.suppress(FileNotFoundError):
            self.settings.socket.unlink()
        http, self.http = self.http, None
        if http is not None:
            await http.stop()

    async def __aenter__(self) -> Agent:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def clients(self) -> int:
        return sum(len(stream.clients) for stream in self._streams.values())

    @property
    def serving(self) -> bool:
        """Whether the socket is served (between `start()` and `stop()`)."""
        return self._server is not None

    @property
    def stream_count(self) -> int:
        """Streams followed for services, or kept from the disk cache."""
        return len(self._streams)

    def tasks(self) -> list[asyncio.Task[None]]:
        """The agent's long-running tasks (for /healthz)."""
        found = (self._reader_task, self._cache_task, self._trust_task)
        return [task for task in found if task is not None]

    def ack_counts(self) -> tuple[int, int]:
        """Acks sent on to Kafka and dropped, so far."""
        acks = self._acks
        return (acks.sent, acks.dropped) if acks is not None else (0, 0)

    async def _watch_trust(self) -> None:
        while True:
            await asyncio.sleep(self.settings.trust_reload)
            await self._reload_trust()

    async def _reload_trust(self) -> None:
        """Reload the trust file when it changed (one stat when it did not), and take
        up its store whoever reloaded it: the file's watcher is shared in a process.
        When the keys believed change, every stream is caught up again: a record
        refused under the old trust file (signed by a key it did not list yet, as
        when the new trust file reached the host after the first event of a new key)
        is handed out now, to services that start later too."""
        trust_file = self._trust_file
        if trust_file is None:
            return
        if trust_file.check():
            await asyncio.to_thread(trust_file.reload)
        store = trust_file.store
        if store is self._trust:
            return
        changed, self._trust = store != self._trust, store
        if changed:
            for stream in self._streams.values():
                stream.epoch += 1  # a catch-up running now may have judged by the old file
                stream.caught_up = False

    # -- services ---------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream: _Stream | None = None
        client: _Client | None = None
        try:
            if self.clients >= MAX_CLIENTS:
                raise BusError(f"{MAX_CLIENTS} services connected already")
            hello = await asyncio.wait_for(read_frame(reader, HELLO_BYTES), 10.0)
            if hello is None:
                return  # a probe (a service checking the agent is back): nothing to say
            if not isinstance(hello, Hello) or hello.protocol != PROTOCOL_VERSION:
                raise BusError(
                    f"expected a hello of protocol {PROTOCOL_VERSION}, got {hello!r:.80}"
                )
            self.settings.topics.tenant_topic(hello.tenant)  # a legal tenant, or SettingsError
            if not ENV_NAME.fullmatch(hello.env):
                raise BusError(f"environment {shown(hello.env)} is not an environment name")
            stream = self._stream(hello.tenant, hello.env)
            client = _Client(writer, shown(hello.instance), shown(hello.service))
            writer.write(
                encode(Welcome(has_record=stream.record is not None, kafka=self.kafka_state))
            )
            if stream.record is not None and stream.version > hello.version:
                client.send(_delivery(stream.record))
            for channel in (OVERRIDE_CHANNEL, CANDIDATE_CHANNEL):  # the service knows if it has it
                if (latest := stream.records.get(channel)) is not None:
                    client.send(_delivery(latest))
            stream.clients.add(client)
            self._follow(stream)
            log.debug(
                "%s (%s) follows %s/%s", client.instance, client.service, stream.tenant, stream.env
            )
            while True:
                frame = await read_frame(reader, ACK_FRAME_BYTES)
                if frame is None:
                    break
                if isinstance(frame, Acks) and self._acks is not None:
                    for key, value in frame.items:
                        if _own_ack(hello, key, value):
                            self._acks.put(key, value)
                        else:
                            client.refused_acks += 1
                            if client.refused_acks in (1, 1000):
                                log.warning(
                                    "%s (%s): dropping acks that are not its own for %s/%s",
                                    client.instance, client.service, stream.tenant, stream.env,
                                )  # fmt: skip
        except (BusError, SettingsError, ConnectionError, TimeoutError) as exc:
            log.warning("a service connection ended: %s", exc)
        finally:
            if stream is not None and client is not None:
                stream.clients.discard(client)
                if not stream.clients and not stream.records:  # nothing to keep
                    self._streams.pop((stream.tenant, stream.env), None)
            writer.close()

    def _stream(self, tenant: str, env: str) -> _Stream:
        stream = self._streams.get((tenant, env))
        if stream is None:
            stream = self._streams[(tenant, env)] = _Stream(tenant, env)
        return stream

    # -- Kafka ------------------------------------------------------------------------
    def _follow(self, stream: _Stream) -> None:
        """Catch the stream up at once when its topic is followed already; else the
        reader loop follows the topic first, then catches the stream up."""
        topic = self.settings.topics.tenant_topic(stream.tenant)
        if self._reader is not None and topic in self._reader.topics:
            self._catch_up(stream)

    async def _read(self) -> None:
        backoff = Backoff(0.1, 10.0)
        await supervise("agent reader", lambda: self._read_once(backoff), backoff)

    async def _read_once(self, backoff: Backoff) -> None:
        """One consumer for every tenant topic the host's streams live in."""
        reader = self._bus.topics_reader()
        try:
            try:
                await reader.start()
            except BusError as exc:
                self.kafka_state = str(exc)
                self.monitor.kafka_errors.labels(operation="connect").inc()
                raise
            self._reader, self.kafka_state = reader, "connected"
            backoff.reset()
            retry_at: dict[str, float] = {}  # topic not there yet -> when to look again
            while True:
                await self._add_topics(reader, retry_at)
                self._catch_up_all(reader)
                for record in await reader.poll(POLL_MS):
                    tenant = self.settings.topics.tenant_of(record.topic) or ""
                    env, channel = TopicNames.channel_of(record.key)
                    stream = self._streams.get((tenant, env))
                    if stream is not None and channel in CHANNELS:
                        self._received(stream, record, channel)
        except BusError as exc:
            if self._reader is reader:  # connected, then lost: not ready until back
                self.kafka_state = str(exc)
                self.monitor.kafka_errors.labels(operation="read").inc()
            raise
        finally:
            self._reader = None
            with contextlib.suppress(Exception):
                await reader.stop()

    async def _add_topics(self, reader: TopicsReaderAPI, retry_at: dict[str, float]) -> None:
        """Follow the topics of streams not followed yet (one metadata request for all
        of them; a topic that does not exist yet is asked for again every
        `TOPIC_RETRY_S`), each from its end; their streams are then caught up, in that
        order, so no record falls between the two."""
        now = asyncio.get_running_loop().time()
        wanted = {self.settings.topics.tenant_topic(s.tenant) for s in self._streams.values()}
        for topic in set(retry_at) - wanted:
            del retry_at[topic]  # nobody follows it any more
        due = {t for t in wanted - reader.topics if retry_at.get(t, 0.0) <= now}
        if not due:
            return
        added = await reader.add(due)
        for topic in due - added:
            retry_at[topic] = now + TOPIC_RETRY_S
        for topic in added:
            retry_at.pop(topic, None)
            tenant = self.settings.topics.tenant_of(topic)
            for stream in self._streams.values():
                if stream.tenant == tenant:
                    stream.epoch += 1  # what a running catch-up finds may predate the add
                    stream.caught_up = False

    def _catch_up_all(self, reader: TopicsReaderAPI) -> None:
        """Catch up every followed stream that is not, a few at a time; one that failed
        is tried again after `CATCH_UP_RETRY_S`."""
        now = asyncio.get_running_loop().time()
        for stream in list(self._streams.values()):
            topic = self.settings.topics.tenant_topic(stream.tenant)
            if not stream.caught_up and stream.retry_at <= now and topic in reader.topics:
                self._catch_up(stream)

    def _catch_up(self, stream: _Stream) -> None:
        if stream.caught_up or stream in self._catching_up:
            return
        if len(self._catching_up) >= MAX_CATCH_UPS:
            return  # the reader loop starts it when one ends
        task = asyncio.create_task(self._catch_up_once(stream))
        self._catching_up[stream] = task
        task.add_done_callback(lambda _: self._catching_up.pop(stream, None))

    async def _catch_up_once(self, stream: _Stream) -> None:
        """Hand out the highest version among the stream's recent records that verifies,
        when it is newer than what was handed out; a reader of its own, so the topic's
        reader goes on following meanwhile. Caught up only if the topic was not added
        again meanwhile (its reader restarted: records may have come in between)."""
        epoch = stream.epoch
        topic = self.settings.topics.tenant_topic(stream.tenant)
        reader = self._bus.reader(topic)
        try:
            if not await reader.start():
                raise BusError(f"topic {topic} does not exist")
            keys = tuple(stream.key(channel) for channel in CHANNELS)
            found = await reader.recent_keys(keys, limit=BOOTSTRAP_RECORDS)  # one read back
            for channel, key in zip(CHANNELS, keys, strict=True):  # the snapshot first
                for record in sorted(found[key], key=lambda r: -claimed_version(r.value)):
                    if claimed_version(record.value) <= stream.versions.get(channel, 0):
                        break
                    event = self._verify(stream, record, channel)
                    if event is not None and self._adopt(stream, record, channel, event):
                        stream.deliver(record)
                        break
            stream.caught_up = stream.epoch == epoch
        except BusError as exc:
            stream.retry_at = asyncio.get_running_loop().time() + CATCH_UP_RETRY_S
            log.warning("%s/%s: could not catch up: %s", stream.tenant, stream.env, exc)
            self.monitor.kafka_errors.labels(operation="catch_up").inc()
        finally:
            with contextlib.suppress(Exception):
                await reader.stop()

    def _received(self, stream: _Stream, record: Record, channel: str) -> None:
        """A record as it arrives. One that does not verify is passed on all the same:
        each service refuses it and says so in its acknowledgement, as it would reading
        Kafka itself. One that verifies is passed on when it is newer than what was
        handed out; an older one is a replay, or the overlap of a catch-up with the
        topic's reader, and goes no further. Nor does one larger than a service takes
        in a frame: it would only end every connection of the stream."""
        event = self._verify(stream, record, channel)
        if event is None and len(record.value or b"") > self.settings.limits.event_bytes:
            return  # refused as too_large by `_verify`, and logged
        if event is None or self._adopt(stream, record, channel, event):
            stream.deliver(record)
            self.delivered += 1

    def _verify(self, stream: _Stream, record: Record, channel: str) -> VerifiedEvent | None:
        try:
            return open_envelope(
                record.value or b"",
                self._trust,
                stream=(stream.tenant, stream.env),
                channel=channel,
                limits=self.settings.limits,
            )
        except VerificationError as exc:
            log.warning("%s/%s: a record does not verify: %s", stream.tenant, stream.env, exc)
            self.refused[exc.reason] += 1
            return None

    def _adopt(self, stream: _Stream, record: Record, channel: str, event: VerifiedEvent) -> bool:
        """Make a verified record its channel's latest (and cache it) when it is newer."""
        version = event.body.version
        if version <= stream.versions.get(channel, 0):
            return False
        stream.records[channel], stream.versions[channel] = record, version
        if self.settings.cache_dir is not None:
            self._dirty.add(stream)
            self._cache_wanted.set()
        return True

    # -- the disk cache ---------------------------------------------------------------
    def _cache_file(self, tenant: str, env: str, channel: str) -> Path | None:
        folder = self.settings.cache_dir
        suffix = _CACHE_SUFFIX[channel]
        return folder / f"{tenant}.{env}.{suffix}" if folder is not None else None

    def _load_cache(self) -> None:
        folder = self.settings.cache_dir
        if folder is None or not folder.is_dir():
            return
        for channel, suffix in _CACHE_SUFFIX.items():
            for path in sorted(folder.glob(f"*.{suffix}")):
                tenant, _, env = path.name.removesuffix(f".{suffix}").partition(".")
                try:
                    value = path.read_bytes()
                    event = open_envelope(
                        value,
                        self._trust,
                        stream=(tenant, env),
                        channel=channel,
                        limits=self.settings.limits,
                    )
                except (OSError, VerificationError) as exc:
                    log.warning("%s: ignoring the cached record: %s", path, exc)
                    continue
                stream = self._stream(tenant, env)
                key = TopicNames.record_key(env, channel)
                stream.records[channel] = Record(str(path), 0, 0, key, value, (), 0)
                stream.versions[channel] = event.body.version

    async def _write_caches(self) -> None:
        while True:
            await self._cache_wanted.wait()
            self._cache_wanted.clear()
            dirty, self._dirty = list(self._dirty), set()
            await asyncio.to_thread(self._flush_caches, dirty)

    def _flush_caches(self, streams: Iterable[_Stream]) -> None:
        for stream in streams:
            for channel, record in list(stream.records.items()):
                path = self._cache_file(stream.tenant, stream.env, channel)
                if path is None or record.value is None:
                    continue
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    temporary = path.with_name(path.name + ".tmp")
                    temporary.write_bytes(record.value)
                    os.replace(temporary, path)
                except OSError as exc:
                    log.warning("%s: cannot write the cache: %s", path, exc.strerror)


_ack_decoder: Final = msgspec.msgpack.Decoder(Ack)


def _own_ack(hello: Hello, key: bytes, value: bytes) -> bool:
    """Whether an ack from a connection is one it may send: an `Ack` of a bounded size,
    for the stream and instance it said hello as, under the key a subscriber gives it.
    A local process cannot speak for another stream or instance through the agent."""
    if len(key) + len(value) > ACK_BYTES:
        return False
    try:
        ack = _ack_decoder.decode(value)
    except (msgspec.DecodeError, TypeError, RecursionError):
        return False
    return (ack.tenant, ack.env, ack.instance) == (hello.tenant, hello.env, hello.instance) and (
        key == ack.key
    )


def _delivery(record: Record) -> bytes:
    return encode(
        Delivery(
            topic=record.topic,
            offset=record.offset,
            value=record.value or b"",
            headers=record.headers,
            timestamp_ms=record.timestamp_ms,
            key=record.key or b"",
        )
    )


def _claim_socket(path: Path) -> None:
    """Remove a socket file left by an agent that is gone; refuse to take over one that
    another agent is still serving, or a path that is not a socket."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SettingsError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody answers: a leftover
        return
    finally:
        probe.close()
    raise ConfigBusError(f"another agent is serving {path}")


async def run(settings: AgentSettings) -> int:
    """Serve until SIGTERM or SIGINT; the exit status of `configbus agent`."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with Agent(settings):
            await stop.wait()
            log.info("agent stopping")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return 0
