"""Helpers for the publisher integration tests: an isolated publisher set-up (its own
tree, keys, topics and transactional id), reading what Kafka holds, editing files, a
spy on the daemon's publish rounds, and polling with a deadline. At the end, helpers
for the subscriber tests: subscriber settings, crafted events, acks, the CLI, and a
TCP proxy to take the broker away."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import shutil
import socket
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, overload
from uuid import uuid4

import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from configbus.bus import (
    CONTENT_TYPE,
    Admin,
    KafkaSettings,
    Producer,
    Record,
    TopicNames,
    read_to_end,
)
from configbus.cli import main
from configbus.crypto import SigningKey, TrustStore, generate_keypair
from configbus.events import (
    Ack,
    Cause,
    Envelope,
    EventBody,
    VerifiedEvent,
    build_body,
    now_ns,
    open_envelope,
    seal,
)
from configbus.publisher import Change, Daemon, PublisherSettings, PublishReport
from configbus.subscriber import SubscriberSettings
from configbus.tree import EnvironmentTree
from configbus.tree.values import canonical_json, freeze

REPO = Path(__file__).resolve().parents[2]
SAMPLE_TREE = REPO / "environments"
CLI = (sys.executable, "-m", "configbus.cli")

Stream = tuple[str, str]
T = TypeVar("T")

_envelopes = msgspec.msgpack.Decoder(Envelope)


@overload
async def wait_until(
    predicate: Callable[[], Awaitable[T]],
    timeout: float = ...,
    *,
    interval: float = ...,
    what: str = ...,
) -> T: ...
@overload
async def wait_until(
    predicate: Callable[[], T], timeout: float = ..., *, interval: float = ..., what: str = ...
) -> T: ...
async def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 20.0,
    *,
    interval: float = 0.05,
    what: str = "",
) -> Any:
    """Poll `predicate` (sync or async) until it returns something truthy; return that.
    Fails the test when `timeout` seconds pass first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what or predicate}")
        await asyncio.sleep(interval)


def edit(path: Path, old: str, new: str, *, atomic: bool = False) -> None:
    """Replace the one occurrence of `old` in `path` by `new`, in place (as most editors
    write) or `atomic`ally (a temporary file renamed over it, as git and some editors
    do). The file's stat always changes, so the tree's cache and watchfiles notice."""
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times in {path}"
    write(path, text.replace(old, new), atomic=atomic)


def write(path: Path, text: str, *, atomic: bool = False) -> None:
    before = path.stat()
    if atomic:
        temporary = path.with_name(f".{path.name}.{uuid4().hex[:6]}.tmp")  # ignored: a dotfile
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    else:
        path.write_text(text, encoding="utf-8")
    after = path.stat()
    if (after.st_mtime_ns, after.st_size, after.st_ino) == (
        before.st_mtime_ns,
        before.st_size,
        before.st_ino,
    ):  # same size within one clock tick: move mtime on
        os.utime(path, ns=(after.st_atime_ns, after.st_mtime_ns + 1_000_000_000))


async def settle(kafka: KafkaSettings, topics: Sequence[str], timeout: float = 20.0) -> None:
    """Wait until no transaction is open or completing on `topics`: each partition's
    last stable offset (the end a read_committed reader sees) equals its high
    watermark. A commit returns before its markers reach the partitions, so without
    this a reader may not yet see a transaction the publisher counts as committed."""
    options: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers,
        "enable_auto_commit": False,
    }
    committed = AIOKafkaConsumer(isolation_level="read_committed", **options)
    everything = AIOKafkaConsumer(isolation_level="read_uncommitted", **options)
    try:
        await committed.start()
        await everything.start()
        existing = await committed.topics()
        partitions = [TopicPartition(t, 0) for t in topics if t in existing]  # one each
        if not partitions:
            return
        committed.assign(partitions)  # tracked topics: one metadata request for all
        everything.assign(partitions)

        async def stable() -> bool:
            lso = await committed.end_offsets(partitions)
            high = await everything.end_offsets(partitions)
            return bool(lso == high)

        await wait_until(stable, timeout, interval=0.02, what=f"{topics} to settle")
    finally:
        await committed.stop()
        await everything.stop()


@dataclass(frozen=True)
class Verified:
    """A record and its verified event."""

    record: Record
    event: VerifiedEvent

    @property
    def stream(self) -> Stream:
        return self.event.stream

    @property
    def version(self) -> int:
        return self.event.body.version


def kid_of(value: bytes | None) -> str | None:
    """The envelope's kid, unverified (None when it is not an envelope)."""
    try:
        return _envelopes.decode(value or b"").kid
    except (msgspec.DecodeError, TypeError):
        return None


@dataclass
class Setup:
    """One test's publisher world: a copy of the sample tree, a key pair and trust
    store, unique topic names (and so transactional id), and optionally a Redis db."""

    root: Path
    kafka: KafkaSettings
    topics: TopicNames
    kid: str
    key_path: Path
    trust: TrustStore
    trust_path: Path
    redis_url: str | None = None
    workdir: Path = field(default_factory=Path)

    @classmethod
    def create(cls, tmp_path: Path, bootstrap: str) -> Setup:
        uid = uuid4().hex[:10]
        root = tmp_path / "environments"
        shutil.copytree(SAMPLE_TREE, root)
        kid = f"test-{uid}"
        private, _ = generate_keypair(kid, tmp_path / "keys")
        trust = TrustStore.of(SigningKey.load(private, kid).public)
        trust_path = tmp_path / "trust.yml"
        trust_path.write_text(trust.dump(), encoding="utf-8")
        return cls(
            root=root,
            kafka=KafkaSettings(bootstrap, client_id=f"cbtest-{uid}"),
            topics=TopicNames(prefix=f"t{uid}.", audit=f"a{uid}", acks=f"k{uid}", state=f"s{uid}"),
            kid=kid,
            key_path=private,
            trust=trust,
            trust_path=trust_path,
            workdir=tmp_path,
        )

    def settings(self, **changes: Any) -> PublisherSettings:
        options: dict[str, Any] = {
            "root": self.root,
            "kafka": self.kafka,
            "signing_key": self.key_path,
            "kid": self.kid,
            "redis_url": self.redis_url,
            "topics": self.topics,
            "reconcile_interval": 60.0,
            "heartbeat_interval": 1.0,
            "debounce_ms": 10,
            "step_ms": 5,
            "shutdown_grace": 5.0,
            "actor": "integration-test",
        }
        return PublisherSettings(**{**options, **changes})

    def tree(self) -> EnvironmentTree:
        """A fresh tree over the copy: what a new reader resolves now."""
        return EnvironmentTree(self.root)

    def streams(self) -> list[Stream]:
        return sorted(self.tree().streams())

    def expected_hash(self, tenant: str, env: str) -> str:
        tree = self.tree()
        return tree.validate(tree.resolve(env, tenant)).hash

    def tenant_topics(self) -> list[str]:
        return sorted(self.topics.tenant_topic(t) for t in self.tree().tenants())

    def path(self, relative: str) -> Path:
        return self.root / relative

    async def records(
        self, topics: Sequence[str] | None = None, *, settled: bool = True
    ) -> dict[str, list[Record]]:
        """Every committed record of `topics` (default: the tenant topics and the audit
        topic), by topic, in offset order; by default once no transaction is open on
        them (`settle`)."""
        wanted = list(topics) if topics is not None else [*self.tenant_topics(), self.topics.audit]
        if settled:
            await settle(self.kafka, wanted)
        found: dict[str, list[Record]] = {topic: [] for topic in wanted}
        async for record in read_to_end(self.kafka, wanted):
            found[record.topic].append(record)
        for records in found.values():
            records.sort(key=lambda r: r.offset)
        return found

    def verify(self, record: Record) -> Verified:
        assert record.value is not None, f"tombstone at {record.topic}@{record.offset}"
        event = open_envelope(record.value, self.trust)
        assert event.kid == self.kid
        return Verified(record, event)

    async def audit(self) -> list[Verified]:
        """Our verified events on the audit topic, in order."""
        records = (await self.records([self.topics.audit]))[self.topics.audit]
        return [self.verify(r) for r in records if kid_of(r.value) == self.kid]


def new_records(
    before: dict[str, list[Record]], after: dict[str, list[Record]]
) -> dict[str, list[Record]]:
    """Per topic, the records in `after` past the last offset `before` had; only topics
    that gained records."""
    gained = {}
    for topic, records in after.items():
        last = max((r.offset for r in before.get(topic, ())), default=-1)
        fresh = [r for r in records if r.offset > last]
        if fresh:
            gained[topic] = fresh
    return gained


def assert_versions_consistent(events: Iterable[Verified]) -> dict[Stream, list[int]]:
    """No (tenant, env, version) twice, and versions strictly increasing per stream in
    log order. Returns the versions per stream."""
    versions: dict[Stream, list[int]] = {}
    for verified in events:
        versions.setdefault(verified.stream, []).append(verified.version)
    for stream, seen in versions.items():
        assert len(seen) == len(set(seen)), f"{stream}: duplicated versions {seen}"
        assert seen == sorted(seen), f"{stream}: versions not increasing {seen}"
    return versions


@dataclass(frozen=True)
class Round:
    """One call of the daemon's `Publisher.publish`: what it was asked, what it did."""

    streams: tuple[Stream, ...]
    change: Change
    report: PublishReport | None
    error: BaseException | None

    @property
    def published(self) -> list[Stream]:
        return [(t, e) for t, e, _ in self.report.published] if self.report else []


class PublishSpy:
    """Records every publish round of a daemon (install before starting it), so a test
    can wait until the daemon has looked at a change, whatever it decided."""

    def __init__(self, daemon: Daemon) -> None:
        self.rounds: list[Round] = []
        inner = daemon.publisher.publish

        async def publish(streams: Iterable[Stream], change: Change) -> PublishReport:
            asked = tuple(sorted(set(streams)))
            try:
                report = await inner(asked, change)
            except BaseException as exc:
                self.rounds.append(Round(asked, change, None, exc))
                raise
            self.rounds.append(Round(asked, change, report, None))
            return report

        daemon.publisher.publish = publish  # type: ignore[method-assign]

    def caused_by(self, source: str) -> list[Round]:
        """The finished rounds whose cause names `source` (a file relative to the tree,
        or ``redis:<store key>``)."""
        return [r for r in self.rounds if source in r.change.cause.sources]


async def started(daemon: Daemon, timeout: float = 30.0) -> Daemon:
    """Wait for the daemon's first publish round to finish."""
    await wait_until(daemon.ready.is_set, timeout, what="the daemon's first publish round")
    return daemon


# -- subscriber tests ------------------------------------------------------------------
# (used by test_subscriber.py; everything above is unchanged)


def subscriber_settings(setup: Setup, tenant: str, env: str, **changes: Any) -> SubscriberSettings:
    """Settings for a subscriber of `setup`'s topics (its acks topic too), trusting its
    key, with an instance id of its own; `changes` override any field."""
    options: dict[str, Any] = {
        "tenant": tenant,
        "env": env,
        "kafka": KafkaSettings(setup.kafka.bootstrap_servers, client_id="cbtest-subscriber"),
        "trust": setup.trust,
        "instance_id": f"{tenant}.{env}.{uuid4().hex[:8]}",
        "service": "integration-test",
        "topics": setup.topics,
        "start_timeout": 30.0,
        "offline_grace": 1.0,
    }
    return SubscriberSettings(**{**options, **changes})


def signing_key(setup: Setup) -> SigningKey:
    return SigningKey.load(setup.key_path, setup.kid)


def config_of(setup: Setup, tenant: str, env: str) -> dict[str, Any]:
    """The stream's resolved config from `setup`'s tree, as plain JSON-ready data."""
    return setup.tree().resolve(env, tenant).to_dict()


def with_value(config: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A deep copy of `config` with the dotted `key` set to `value`."""
    copy: dict[str, Any] = json.loads(json.dumps(config))
    node = copy
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return copy


def event_body(
    tenant: str, env: str, version: int, config: dict[str, Any], **options: Any
) -> EventBody:
    """An event body carrying `config` (canonical JSON, as the publisher encodes it)."""
    options.setdefault("detected_at", now_ns())
    options.setdefault("cause", Cause(actor="integration-test", reason="crafted"))
    return build_body(
        tenant=tenant,
        env=env,
        version=version,
        config_json=canonical_json(freeze(config)),
        **options,
    )


def sealed(setup: Setup, tenant: str, env: str, version: int, config: dict[str, Any]) -> bytes:
    """A record value as the publisher would produce it, signed with `setup`'s key."""
    return seal(event_body(tenant, env, version, config), signing_key(setup))


async def ensure_topics(setup: Setup, *tenants: str, acks: str | None = None) -> None:
    """Create the tenant topics of `tenants` and the acks topic (what a daemon would)."""
    async with Admin(setup.kafka) as admin:
        await admin.ensure_topics([setup.topics.tenant_topic(t) for t in tenants], compact=True)
        await admin.ensure_topics([acks or setup.topics.acks], compact=True)


async def produce(setup: Setup, tenant: str, env: str, *values: bytes) -> None:
    """Produce record values on the tenant's topic with key `env`, in order (not in a
    transaction, as a forger would), and wait until the broker has them all."""
    headers = (("content-type", CONTENT_TYPE),)
    topic = setup.topics.tenant_topic(tenant)
    async with Producer(setup.kafka) as producer:
        futures = [
            await producer.send(topic, value, key=env.encode(), headers=headers) for value in values
        ]
        await asyncio.gather(*futures)


_acks = msgspec.msgpack.Decoder(Ack)


async def read_acks(
    setup: Setup, topic: str | None = None, *, heartbeats: bool = False
) -> list[tuple[Record, Ack]]:
    """Every answer to an event on the acks topic, decoded; the instances' heartbeats
    too when `heartbeats` (wire format §2.4: readers of answers skip them)."""
    name = topic or setup.topics.acks
    records = (await setup.records([name], settled=False))[name]
    decoded = [(r, _acks.decode(r.value or b"")) for r in records]
    return [(r, a) for r, a in decoded if heartbeats or a.status != "heartbeat"]


async def call_main(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """`configbus.cli.main(args)` in a thread (it runs its own event loop); the exit
    code, stdout and stderr."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, [str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@contextmanager
def refused_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound (so nobody else takes it
    meanwhile) but not listening."""
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
    finally:
        sock.close()


class TcpProxy:
    """A TCP proxy in front of a broker, to take it "down" and bring it back. While
    closed it accepts connections and drops them at once (counted in `refused`), as a
    broker that is down does; once `open` it forwards them."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.open = False
        self.refused = 0
        self.forwarded = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            if not self.open:
                self.refused += 1
                return
            upstream_reader, upstream = await asyncio.open_connection(*self.target)
            self._writers.add(upstream)
            self.forwarded += 1
            await asyncio.gather(
                _pipe(reader, upstream), _pipe(upstream_reader, writer), return_exceptions=True
            )
        except OSError:
            pass
        finally:
            for end in (writer, upstream):
                if end is not None:
                    self._writers.discard(end)
                    end.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


def topic_options(setup: Setup) -> list[str]:
    """The CLI options naming `setup`'s cluster and topics."""
    return [
        "--bootstrap-servers",
        setup.kafka.bootstrap_servers,
        "--topic-prefix",
        setup.topics.prefix,
        "--audit-topic",
        setup.topics.audit,
        "--acks-topic",
        setup.topics.acks,
    ]
