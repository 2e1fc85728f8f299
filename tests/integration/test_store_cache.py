"""The tenant store's read cache against the real Redis: what it keeps, and that nothing
it keeps goes stale.

While its listener is subscribed to keyspace notifications that report every change of
a hash, `TenantStore.layers` keeps what it read, so a file edit costs no Redis read. A
notification (here: a write by a second client, as an operator's redis-cli), a read
overlapping one, a write through the store, the listener stopping or starting again,
and `forget` (the daemon's reconcile, for what no notification reports: FLUSHDB) make
the next read go to Redis again.

Reads are counted by wrapping the store's real client: every HGETALL its pipelines
send is recorded once Redis has answered it (`Reads`). Kafka is the in-memory bus
here; tests/integration/test_publisher.py runs the daemon on the real broker."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from uuid import uuid4

import pytest
import redis
import redis.asyncio as aioredis
from helpers import SAMPLE_TREE, edit, wait_until

from configbus.bus import KafkaSettings, TopicNames
from configbus.bus.memory import MemoryBus
from configbus.crypto import SigningKey, TrustStore, generate_keypair
from configbus.events import Cause, now_ns, open_envelope
from configbus.publisher import Change, Daemon, Publisher, PublisherSettings
from configbus.store import TenantStore
from configbus.tree import EnvironmentTree

pytestmark = pytest.mark.integration

Stream = tuple[str, str]

AURORA = ("aurora-records", "prod")
HELIX = ("helix-audio", "prod")
AURORA_FILE = "tenants/aurora-records/prod.yml"
MAX_SIZE = ("database", "postgresql", "connection_pool", "max_size")
MAX_SIZE_FIELD = json.dumps(list(MAX_SIZE))
NOTIFY = "notify-keyspace-events"


# -- counting what the store reads -----------------------------------------------------


class Reads:
    """The HGETALLs that `client`'s pipelines sent, by key, recorded when Redis answered.

    The real client does the work; only its `pipeline` is wrapped. `after_read`, when
    set, runs once between a reply's arrival and its hand-over to the caller: whatever
    it does overlaps that read."""

    def __init__(self, client: Any) -> None:
        self.keys: list[str] = []
        self.after_read: Callable[[], Awaitable[None]] | None = None
        real = client.pipeline

        def pipeline(*args: Any, **kwargs: Any) -> Any:
            pipe = real(*args, **kwargs)
            queued: list[str] = []
            hgetall, execute = pipe.hgetall, pipe.execute

            def counted_hgetall(key: str) -> Any:
                queued.append(key)
                return hgetall(key)

            async def counted_execute(*args: Any, **kwargs: Any) -> Any:
                replies = await execute(*args, **kwargs)
                self.keys.extend(queued)
                queued.clear()
                if (overlapping := self.after_read) is not None:
                    self.after_read = None
                    await overlapping()
                return replies

            pipe.hgetall, pipe.execute = counted_hgetall, counted_execute
            return pipe

        client.pipeline = pipeline

    @property
    def count(self) -> int:
        return len(self.keys)


@asynccontextmanager
async def listening(store: TenantStore, *, confirmed: bool = True) -> AsyncIterator[list[Stream]]:
    """The daemon's store watcher reduced to following: `store.changes()` runs in a task
    until the block ends. Yields the streams it reported, in order. With `confirmed`,
    first waits until the subscription is confirmed and the store keeps its reads."""
    await store.enable_notifications()
    seen: list[Stream] = []

    async def follow() -> None:
        async for stream in store.changes():
            seen.append(stream)

    task = asyncio.create_task(follow())
    try:
        if confirmed:
            await wait_until(lambda: store.caching, 10, what="the subscription to be confirmed")
        yield seen
    finally:
        task.cancel()
        await asyncio.wait({task})
        if not task.cancelled():
            task.result()  # the listener failed: show why


def max_size(layers: dict[Stream, Any], stream: Stream = AURORA) -> Any:
    layer = layers.get(stream)
    if layer is None:
        return None
    return layer.data["database"]["postgresql"]["connection_pool"]["max_size"]


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture
async def store(redis_db_url: str) -> AsyncIterator[TenantStore]:
    async with TenantStore(redis_db_url) as store:
        yield store


@pytest.fixture
async def operator(redis_db_url: str) -> AsyncIterator[Any]:
    """A second client of the test's db, as an operator's redis-cli: the store learns of
    its writes only through keyspace notifications."""
    client = aioredis.Redis.from_url(redis_db_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def server_notify(redis_url: str) -> Iterator[Callable[[str], None]]:
    """Sets the server's ``notify-keyspace-events`` (server-wide; restored afterwards)."""
    with redis.Redis.from_url(redis_url) as admin:
        before = admin.config_get(NOTIFY)[NOTIFY]
        try:
            yield lambda flags: admin.config_set(NOTIFY, flags)
        finally:
            admin.config_set(NOTIFY, before)


@pytest.fixture
def config_refused_url(redis_db_url: str) -> Iterator[str]:
    """The test's db as a Redis user that may not CONFIG SET, as on a managed Redis."""
    name = f"cbtest-{uuid4().hex[:8]}"
    parts = urlsplit(redis_db_url)
    with redis.Redis.from_url(redis_db_url) as admin:
        admin.execute_command(
            "ACL", "SETUSER", name, "reset", "on", "nopass", "~*", "&*", "+@all", "-config|set"
        )
        try:
            yield urlunsplit(parts._replace(netloc=f"{name}@{parts.hostname}:{parts.port}"))
        finally:
            admin.execute_command("ACL", "DELUSER", name)


# -- kept while notified ---------------------------------------------------------------


async def test_the_store_is_read_once_while_its_listener_is_subscribed(
    store: TenantStore,
) -> None:
    await store.set(*AURORA, {MAX_SIZE: 300})
    reads = Reads(store.redis)
    async with listening(store):
        first = await store.layers([AURORA])
        again = await store.layers([AURORA, HELIX])
        assert reads.keys == [store.store_key(*AURORA), store.store_key(*HELIX)]
        assert again[AURORA] is first[AURORA] and HELIX not in again  # helix: nothing set
        assert max_size(again) == 300
        await store.layers([AURORA, HELIX])
        assert reads.count == 2  # both kept, the empty one too


async def test_a_write_by_another_client_is_read_after_its_notification(
    store: TenantStore, operator: Any
) -> None:
    await store.set(*AURORA, {MAX_SIZE: 300})
    reads = Reads(store.redis)
    async with listening(store) as seen:
        assert max_size(await store.layers([AURORA])) == 300
        # Another client writes: only Redis's keyspace notification tells the store.
        await operator.hset(store.store_key(*AURORA), MAX_SIZE_FIELD, "7")
        await wait_until(lambda: AURORA in seen, 10, what="the notification")
        assert max_size(await store.layers([AURORA])) == 7
        assert reads.count == 2
        assert max_size(await store.layers([AURORA])) == 7
        assert reads.count == 2  # kept again


async def test_a_read_overlapping_a_notification_is_not_kept(
    store: TenantStore, operator: Any
) -> None:
    await store.set(*AURORA, {MAX_SIZE: 300})
    reads = Reads(store.redis)
    async with listening(store) as seen:

        async def write_meanwhile() -> None:
            # Redis has answered 300; before the answer reaches `layers`, another
            # client writes 8 and the listener handles its notification.
            await operator.hset(store.store_key(*AURORA), MAX_SIZE_FIELD, "8")
            await wait_until(lambda: AURORA in seen, 10, what="the notification")

        reads.after_read = write_meanwhile
        assert max_size(await store.layers([AURORA])) == 300  # true when it was read
        assert max_size(await store.layers([AURORA])) == 8  # the 300 was not kept
        assert max_size(await store.layers([AURORA])) == 8
        assert reads.count == 2  # the second answer was kept


async def test_without_complete_notifications_every_read_goes_to_redis(
    config_refused_url: str, operator: Any, server_notify: Callable[[str], None]
) -> None:
    """Notifications of hash commands only ("Kh": a DEL is not reported), on a server
    that refuses CONFIG SET: the listener runs, and nothing is kept."""
    server_notify("Kh")
    async with TenantStore(config_refused_url) as store:
        key = store.store_key(*AURORA)
        reads = Reads(store.redis)
        async with listening(store, confirmed=False) as seen:

            async def notified() -> bool:
                await operator.hset(key, MAX_SIZE_FIELD, "9")  # until one is reported
                return AURORA in seen

            await wait_until(notified, 10, what="the listener to report a write")
            flags = (await store.redis.config_get(NOTIFY))[NOTIFY]
            assert set(flags) == {"K", "h"}  # the store could not turn on more
            assert not store.caching
            for _ in range(3):
                assert max_size(await store.layers([AURORA])) == 9
            assert reads.count == 3
            await operator.delete(key)  # no notification for a DEL under "Kh"
            assert await store.layers([AURORA]) == {}
            assert reads.count == 4


async def test_without_a_listener_every_read_goes_to_redis(
    store: TenantStore, operator: Any
) -> None:
    await store.set(*AURORA, {MAX_SIZE: 300})
    reads = Reads(store.redis)
    assert max_size(await store.layers([AURORA])) == 300
    await operator.hset(store.store_key(*AURORA), MAX_SIZE_FIELD, "10")
    assert max_size(await store.layers([AURORA])) == 10
    assert reads.count == 2 and not store.caching


# -- read again when told --------------------------------------------------------------


async def test_forget_reads_again_what_flushdb_changed_without_a_notification(
    store: TenantStore, operator: Any
) -> None:
    """FLUSHDB reports no keyspace notification: what was kept stays until `forget`,
    which the daemon's reconcile calls every period."""
    await store.set(*AURORA, {MAX_SIZE: 300})
    reads = Reads(store.redis)
    async with listening(store) as seen:
        assert max_size(await store.layers([AURORA])) == 300
        await operator.flushdb()
        assert max_size(await store.layers([AURORA])) == 300  # kept: nothing told the store
        assert reads.count == 1 and seen == []
        store.forget()
        assert await store.layers([AURORA]) == {}
        assert reads.count == 2


async def test_a_write_through_the_store_is_read_at_once_without_its_notification(
    store: TenantStore, server_notify: Callable[[str], None]
) -> None:
    await store.set(*AURORA, {MAX_SIZE: 300})
    reads = Reads(store.redis)
    async with listening(store) as seen:
        assert max_size(await store.layers([AURORA])) == 300
        server_notify("")  # notifications lost: only the store's own write tells it
        await store.set(*AURORA, {MAX_SIZE: 301})
        assert max_size(await store.layers([AURORA])) == 301
        assert reads.count == 2 and store.caching and seen == []


async def test_a_stopped_listener_keeps_nothing_and_a_restarted_one_reads_again(
    store: TenantStore, operator: Any
) -> None:
    await store.set(*AURORA, {MAX_SIZE: 300})
    reads = Reads(store.redis)
    async with listening(store):
        assert max_size(await store.layers([AURORA])) == 300
    assert not store.caching
    # Nobody listens: this write's notification reaches no one.
    await operator.hset(store.store_key(*AURORA), MAX_SIZE_FIELD, "302")
    assert max_size(await store.layers([AURORA])) == 302
    assert reads.count == 2
    async with listening(store):
        assert max_size(await store.layers([AURORA])) == 302
        assert max_size(await store.layers([AURORA])) == 302
        assert reads.count == 3  # read once after the restart, then kept


# -- the publisher: a file edit reads no store; a store write is published ------------


async def test_a_file_edit_publishes_without_reading_the_store_and_a_store_write_is_read(
    tmp_path: Path, store: TenantStore, operator: Any
) -> None:
    root = tmp_path / "environments"
    shutil.copytree(SAMPLE_TREE, root)
    key_path, _ = generate_keypair("cache", tmp_path / "keys")
    key = SigningKey.load(key_path, "cache")
    bus = MemoryBus()
    topics = TopicNames(prefix="t.", audit="audit", acks="acks", state="state")
    await store.set(*AURORA, {MAX_SIZE: 400})
    reads = Reads(store.redis)
    producer = bus.producer(transactional_id="cache")
    await producer.start()
    publisher = Publisher(EnvironmentTree(root), key, producer, bus.admin(), topics, store=store)

    def change() -> Change:
        return Change(now_ns(), Cause(sources=(AURORA_FILE,), actor="test", reason="test"))

    def published() -> Any:
        records = bus.records(topics.tenant_topic(AURORA[0]))
        event = open_envelope(records[-1].value or b"", TrustStore.of(key.public))
        return json.loads(event.config_json)["database"]["postgresql"]["connection_pool"][
            "max_size"
        ]

    try:
        async with listening(store) as seen:
            assert (await publisher.publish([AURORA], change())).published
            assert reads.count == 1 and published() == 400
            edit(root / AURORA_FILE, "min_size: 40", "min_size: 41")
            assert (await publisher.publish([AURORA], change())).published
            assert reads.count == 1 and published() == 400  # the store was not read again
            await operator.hset(store.store_key(*AURORA), MAX_SIZE_FIELD, "401")
            await wait_until(lambda: AURORA in seen, 10, what="the notification")
            assert (await publisher.publish([AURORA], change())).published
            assert reads.count == 2 and published() == 401  # read again, and sent
    finally:
        await producer.stop()


async def test_the_reconcile_reads_a_store_change_no_notification_reported(
    tmp_path: Path, redis_db_url: str, operator: Any
) -> None:
    """The daemon's reconcile drops what the store kept, so a FLUSHDB (no notification)
    is published within one reconcile period, with no file edit."""
    root = tmp_path / "environments"
    shutil.copytree(SAMPLE_TREE, root)
    key_path, _ = generate_keypair("cache", tmp_path / "keys")
    topics = TopicNames(prefix="t.", audit="audit", acks="acks", state="state")
    settings = PublisherSettings(
        root=root,
        kafka=KafkaSettings("unused:9092"),
        signing_key=key_path,
        kid="cache",
        redis_url=redis_db_url,
        topics=topics,
        reconcile_interval=0.3,
        heartbeat_interval=5.0,
        step_ms=5,
        shutdown_grace=2.0,
        actor="integration-test",
    )
    bus = MemoryBus()
    daemon = Daemon(settings, bus=bus)
    store = daemon.store
    assert store is not None
    await operator.hset(store.store_key(*AURORA), MAX_SIZE_FIELD, "402")
    trust = TrustStore.of(SigningKey.load(key_path, "cache").public)

    def published() -> list[Any]:
        found = []
        for record in bus.records(topics.tenant_topic(AURORA[0])):
            event = open_envelope(record.value or b"", trust)
            if event.body.env == AURORA[1]:
                data = json.loads(event.config_json)
                found.append(data["database"]["postgresql"]["connection_pool"]["max_size"])
        return found

    async with daemon:
        await wait_until(daemon.ready.is_set, 30, what="the first publish round")
        assert published() == [402]
        # A round made while the listener is subscribed keeps aurora's store read.
        await wait_until(lambda: AURORA in store._cache, 10, what="aurora's store read kept")
        await operator.flushdb()
        await wait_until(lambda: published() == [402, 250], 10, what="the reconcile to publish")
