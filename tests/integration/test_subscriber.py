"""The subscriber SDK against the real broker: hot reload with change callbacks, one
trace from publish to every apply, forged and broken events rejected and acknowledged,
validators, restarts, the disk cache while Kafka is away, the thread-based
`SyncSubscriber`, whole-config reads under reloads, no secrets in logs, spans or acks,
and `configbus rollout status`.

Every test has its own copy of the tree, key pair and topic names. Events come from an
in-process `Daemon`, or are crafted (`build_body` + `seal`) and produced with
`configbus.bus.Producer` where a test needs exact control or a forgery. Tests
synchronise by awaiting (`wait_for_version`) or polling with a deadline (`wait_until`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import threading
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any
from uuid import uuid4

import jsonschema_rs
import msgspec
import pytest
from helpers import (
    Setup,
    TcpProxy,
    call_main,
    config_of,
    edit,
    ensure_topics,
    event_body,
    produce,
    read_acks,
    refused_port,
    sealed,
    signing_key,
    started,
    subscriber_settings,
    wait_until,
    with_value,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from configbus.bus import Admin, KafkaSettings, TopicNames
from configbus.crypto import SigningKey, generate_keypair
from configbus.errors import ConfigBusError
from configbus.events import Envelope, seal
from configbus.ops.rollout import rollout_status
from configbus.publisher import Daemon
from configbus.subscriber import ConfigSubscriber, NoConfigError, Snapshot, SyncSubscriber
from configbus.telemetry import tracer
from configbus.tree.resolved import ResolvedConfig
from configbus.tree.values import SecretRef

pytestmark = pytest.mark.integration

AURORA = ("aurora-records", "prod")
AURORA_PROD = "tenants/aurora-records/prod.yml"
MAX_SIZE = "database.postgresql.connection_pool.max_size"
DEFAULT_ACKS = "configbus.acks"  # the CLI cannot name another acks topic


@pytest.fixture
def setup(tmp_path: Path, kafka_bootstrap: str) -> Setup:
    return Setup.create(tmp_path, kafka_bootstrap)


@pytest.fixture
async def subscribers() -> AsyncIterator[list[ConfigSubscriber]]:
    """Subscribers a test starts; all are stopped at the end."""
    made: list[ConfigSubscriber] = []
    yield made
    for sub in made:
        await sub.stop()


async def subscribe(
    setup: Setup, subscribers: list[ConfigSubscriber], tenant: str, env: str, **changes: Any
) -> ConfigSubscriber:
    """A started subscriber of `setup`'s topics (see `subscriber_settings`)."""
    sub = ConfigSubscriber(tenant, env, settings=subscriber_settings(setup, tenant, env, **changes))
    subscribers.append(sub)
    return await sub.start()


async def crafted_stream(setup: Setup, versions: int = 1) -> dict[str, Any]:
    """aurora-records/prod's topics, and v1..`versions` of its config (max_size = 100 +
    version from v2 on) published as crafted events. Returns the tree's config."""
    tenant, env = AURORA
    await ensure_topics(setup, tenant)
    base = config_of(setup, tenant, env)
    values = [sealed(setup, tenant, env, 1, base)]
    values += [
        sealed(setup, tenant, env, v, with_value(base, MAX_SIZE, 100 + v))
        for v in range(2, versions + 1)
    ]
    await produce(setup, tenant, env, *values)
    return base


def rejected_count(sub: ConfigSubscriber) -> int:
    return sum(sub.rejected.values())


# -- 1 ---------------------------------------------------------------------------------
async def test_file_edit_fires_callbacks_with_the_changed_paths(
    setup: Setup, subscribers: list[ConfigSubscriber]
) -> None:
    topic = setup.topics.tenant_topic("aurora-records")
    async with Daemon(setup.settings()) as daemon:
        await started(daemon)
        sub = await subscribe(setup, subscribers, *AURORA)
        assert (sub.version, sub.source) == (1, "kafka")
        assert sub.config.hash == setup.expected_hash(*AURORA)

        database: list[tuple[ResolvedConfig, ResolvedConfig, list[str]]] = []
        flags: list[list[str]] = []
        anything: list[list[str]] = []

        async def on_anything(old: ResolvedConfig, new: ResolvedConfig, paths: list[str]) -> None:
            anything.append(paths)

        sub.on_change("database", lambda old, new, paths: database.append((old, new, paths)))
        sub.on_change("feature_flags", lambda old, new, paths: flags.append(paths))
        sub.on_change("", on_anything)  # registered last: once it ran, all the others had

        edit(setup.path(AURORA_PROD), "max_size: 250", "max_size: 275")
        assert await sub.wait_for_version(2, timeout=30) == 2
        await wait_until(lambda: anything, what="the change callbacks")
        heads = [r for r in (await setup.records([topic]))[topic] if r.key == b"prod"]

    event = setup.verify(heads[-1]).event
    assert event.body.version == 2
    assert sub.config.hash == event.body.config_hash == setup.expected_hash(*AURORA)
    assert sub.event is not None and sub.event.body.config_hash == event.body.config_hash
    assert sub.config.get(MAX_SIZE) == 275
    assert (sub.config.tenant, sub.config.env) == AURORA
    assert [paths for _, _, paths in database] == [[MAX_SIZE]]
    old, new, _ = database[0]
    assert (old.get(MAX_SIZE), new.get(MAX_SIZE)) == (250, 275)
    assert new is sub.config
    assert flags == []
    assert anything == [[MAX_SIZE]]
    assert (sub.applied, sub.rejected) == (2, {})


# -- 2 ---------------------------------------------------------------------------------
def _attr(span: ReadableSpan, name: str) -> Any:
    return (span.attributes or {}).get(name)


async def test_one_trace_spans_the_publish_and_every_apply(
    setup: Setup, subscribers: list[ConfigSubscriber], spans: InMemorySpanExporter
) -> None:
    # configbus.telemetry.tracer was made at import, before any provider: it must follow
    # the one installed later.
    with tracer.start_as_current_span("probe") as probe:
        assert probe.is_recording(), "configbus's tracer ignores the installed provider"
    topic = setup.topics.tenant_topic("aurora-records")

    def reload_pool(old: ResolvedConfig, new: ResolvedConfig, paths: list[str]) -> None:
        with tracer.start_as_current_span("reload pool"):  # a service's own span
            pass

    async with Daemon(setup.settings()) as daemon:
        await started(daemon)
        subs = [await subscribe(setup, subscribers, *AURORA) for _ in range(2)]
        for sub in subs:
            sub.on_change("database", reload_pool)
        edit(setup.path(AURORA_PROD), "max_size: 250", "max_size: 275")
        for sub in subs:
            await sub.wait_for_version(2, timeout=30)

        def finished() -> tuple[list[ReadableSpan], list[ReadableSpan]] | None:
            done = spans.get_finished_spans()
            producers = [
                s
                for s in done
                if s.kind is SpanKind.PRODUCER
                and _attr(s, "messaging.destination.name") == topic
                and (_attr(s, "configbus.env"), _attr(s, "configbus.version")) == ("prod", 2)
            ]
            consumers = [
                s
                for s in done
                if s.kind is SpanKind.CONSUMER
                and s.name == f"receive {topic}"
                and _attr(s, "configbus.version") == 2
            ]
            return (producers, consumers) if producers and len(consumers) == 2 else None

        producers, consumers = await wait_until(finished, what="the publish and receive spans")

    done = spans.get_finished_spans()
    (producer,) = producers
    assert producer.context is not None
    trace_id = producer.context.trace_id
    instances = {sub.settings.instance_id for sub in subs}
    assert {_attr(c, "configbus.instance") for c in consumers} == instances
    for consumer in consumers:
        assert consumer.context is not None and consumer.parent is not None
        assert consumer.context.trace_id == trace_id
        assert consumer.parent.span_id == producer.context.span_id
        assert consumer.parent.trace_id == trace_id
        children = [
            s for s in done if s.parent is not None and s.parent.span_id == consumer.context.span_id
        ]
        # One span per apply, with events; the callbacks run inside it, so a service's
        # own spans join the trace.
        assert [c.name for c in children] == ["reload pool"]
        assert all(c.context is not None and c.context.trace_id == trace_id for c in children)
        assert [e.name for e in consumer.events] == ["applied"]
    hex_id = format(trace_id, "032x")
    assert [sub.trace_id for sub in subs] == [hex_id, hex_id]

    # The acks carry the same trace id.
    async def applied_v2() -> dict[str, str]:
        acks = [a for _, a in await read_acks(setup) if a.version == 2 and a.status == "applied"]
        found = {a.instance: a.trace_id for a in acks}
        return found if found.keys() == instances else {}

    found = await wait_until(applied_v2, what="both subscribers' acks of v2")
    assert set(found.values()) == {hex_id}


# -- 3 ---------------------------------------------------------------------------------
async def test_forged_and_broken_events_are_rejected_and_acknowledged(
    setup: Setup, subscribers: list[ConfigSubscriber], tmp_path: Path
) -> None:
    tenant, env = AURORA
    base = await crafted_stream(setup)
    sub = await subscribe(setup, subscribers, tenant, env)
    assert sub.version == 1
    good = sub.config

    key = signing_key(setup)
    rogue_kid = f"rogue-{setup.kid}"
    rogue = SigningKey.load(generate_keypair(rogue_kid, tmp_path / "rogue")[0], rogue_kid)
    changed = with_value(base, MAX_SIZE, 999)
    body = event_body(tenant, env, 2, changed)
    genuine = seal(body, key)
    envelope = msgspec.msgpack.decode(genuine, type=Envelope)
    flipped = bytearray(envelope.body)
    flipped[len(flipped) // 2] ^= 0x01

    def enveloped(kid: str, sig: bytes, body_bytes: bytes) -> bytes:
        return msgspec.msgpack.encode(Envelope(1, kid, sig, body_bytes))

    other_hash = hashlib.sha256(b'{"database":{}}').hexdigest()
    forgeries = [
        ("unknown_key", seal(body, rogue)),  # re-signed with a key nobody trusts
        ("unknown_key", enveloped("nobody-we-know", envelope.sig, envelope.body)),
        ("bad_signature", enveloped(setup.kid, envelope.sig, bytes(flipped))),
        ("wrong_stream", seal(event_body("helix-audio", env, 2, changed), key)),
        ("wrong_stream", seal(event_body(tenant, "staging", 2, changed), key)),
        ("malformed", b"\xc1 not msgpack at all"),
        ("malformed", enveloped(setup.kid, key.sign(b"\xc1"), b"\xc1")),  # signed garbage
        ("hash_mismatch", seal(msgspec.structs.replace(body, config_hash=other_hash), key)),
    ]
    await produce(setup, tenant, env, *(value for _, value in forgeries))
    await wait_until(lambda: rejected_count(sub) == len(forgeries), what="every rejection")
    assert sub.rejected == Counter(reason for reason, _ in forgeries)
    assert sub.version == 1 and sub.config is good  # the last good config, untouched
    assert sub.applied == 1

    await produce(setup, tenant, env, genuine)
    await sub.wait_for_version(2, timeout=30)
    assert sub.config.get(MAX_SIZE) == 999
    # v1 replayed: stale. v2 again: the same event, silently ignored.
    await produce(setup, tenant, env, sealed(setup, tenant, env, 1, base), genuine)
    await wait_until(lambda: sub.rejected.get("stale_version") == 1, what="the replay's rejection")
    await produce(setup, tenant, env, sealed(setup, tenant, env, 3, base))
    await sub.wait_for_version(3, timeout=30)
    assert sub.ignored == 1
    assert sub.config.hash == good.hash

    expected = [reason for reason, _ in forgeries] + ["stale_version"]
    instance = sub.settings.instance_id

    async def ours() -> list[Any] | None:
        acks = [a for _, a in await read_acks(setup) if a.instance == instance]
        return acks if len(acks) == len(expected) + 3 else None

    acks = await wait_until(ours, what="every ack")
    rejected = [a for a in acks if a.status == "rejected"]
    assert [a.reason.split(":")[0] for a in rejected] == expected
    assert all((a.tenant, a.env, a.service) == (tenant, env, "integration-test") for a in acks)
    applied = [a for a in acks if a.status == "applied"]
    assert [(a.version, a.startup) for a in applied] == [(1, True), (2, False), (3, False)]
    assert [a.config_hash for a in applied] == [good.hash, body.config_hash, good.hash]


async def test_a_rejected_latest_record_starts_on_the_newest_good_one(
    setup: Setup, subscribers: list[ConfigSubscriber], tmp_path: Path
) -> None:
    """A forged record after the last good one: a new subscriber starts on the good one,
    with or without a cache, and reports the forgery; with only forgeries it has no
    config, and says why."""
    tenant, env = AURORA
    await crafted_stream(setup)
    cache = tmp_path / "cache"
    first = await subscribe(setup, subscribers, tenant, env, cache_dir=cache)
    good = first.config
    await first.stop()
    rogue_kid = f"rogue-{setup.kid}"
    rogue = SigningKey.load(generate_keypair(rogue_kid, tmp_path / "rogue")[0], rogue_kid)
    await produce(setup, tenant, env, seal(event_body(tenant, env, 2, {"database": {}}), rogue))

    fresh = await subscribe(setup, subscribers, tenant, env, start_timeout=10.0)
    assert fresh.version == 1 and fresh.config.hash == good.hash
    assert fresh.rejected == {"unknown_key": 1}
    cached = await subscribe(setup, subscribers, tenant, env, cache_dir=cache)
    assert cached.version == 1 and cached.config.hash == good.hash
    assert cached.rejected == {"unknown_key": 1}

    other = ("nimbus-fm", "prod")
    await ensure_topics(setup, other[0])
    await produce(setup, *other, seal(event_body(*other, 1, {"database": {}}), rogue))
    with pytest.raises(NoConfigError, match=r"1 record\(s\) of the stream rejected: unknown_key"):
        await subscribe(setup, subscribers, *other, start_timeout=3.0)


# -- 4 ---------------------------------------------------------------------------------
async def test_a_validator_refuses_a_config_and_the_next_good_one_applies(
    setup: Setup, subscribers: list[ConfigSubscriber]
) -> None:
    tenant, env = AURORA
    base = await crafted_stream(setup)
    sub = await subscribe(setup, subscribers, tenant, env)
    good = sub.config

    def pool_within_limits(config: ResolvedConfig) -> None:
        if config.get(MAX_SIZE) > 500:
            raise ValueError(f"max_size {config.get(MAX_SIZE)} is above 500")

    def no_mood_radio(config: ResolvedConfig) -> bool:
        return not config.get("feature_flags.mood_radio")

    sub.add_validator(pool_within_limits)
    sub.add_validator(no_mood_radio)
    changes: list[list[str]] = []
    sub.on_change("", lambda old, new, paths: changes.append(paths))

    await produce(
        setup,
        tenant,
        env,
        sealed(setup, tenant, env, 2, with_value(base, MAX_SIZE, 900)),
        sealed(setup, tenant, env, 3, with_value(base, "feature_flags.mood_radio", True)),
    )
    await wait_until(lambda: sub.rejected.get("refused") == 2, what="both refusals")
    assert sub.version == 1 and sub.config is good
    assert changes == []
    assert sub.last_rejection is not None and "no_mood_radio" in sub.last_rejection

    await produce(
        setup, tenant, env, sealed(setup, tenant, env, 4, with_value(base, MAX_SIZE, 300))
    )
    assert await sub.wait_for_version(4, timeout=30) == 4
    assert sub.config.get(MAX_SIZE) == 300
    await wait_until(lambda: changes, what="the callback of v4")
    assert changes == [[MAX_SIZE]]  # against v1: the refused versions never applied

    instance = sub.settings.instance_id

    async def ours() -> list[Any] | None:
        acks = [a for _, a in await read_acks(setup) if a.instance == instance]
        return acks if len(acks) == 4 else None

    acks = await wait_until(ours, what="the acks")
    assert [(a.version, a.status) for a in acks] == [
        (1, "applied"),
        (2, "rejected"),
        (3, "rejected"),
        (4, "applied"),
    ]
    assert acks[1].reason.startswith("refused: ")
    assert acks[1].reason.endswith("pool_within_limits: max_size 900 is above 500")
    assert acks[2].reason.startswith("refused: ")
    assert acks[2].reason.endswith("no_mood_radio refused the config")
    assert all(a.config_hash for a in acks)


# -- 5 ---------------------------------------------------------------------------------
async def test_a_raising_callback_blocks_no_other_and_keeps_the_swap(
    setup: Setup, subscribers: list[ConfigSubscriber], caplog: pytest.LogCaptureFixture
) -> None:
    tenant, env = AURORA
    base = await crafted_stream(setup)
    sub = await subscribe(setup, subscribers, tenant, env)
    calls: list[tuple[str, int]] = []

    def broken(old: ResolvedConfig, new: ResolvedConfig, paths: list[str]) -> None:
        calls.append(("broken", new.get(MAX_SIZE)))
        raise RuntimeError("a bug in the service's callback")

    async def resize_pool(old: ResolvedConfig, new: ResolvedConfig, paths: list[str]) -> None:
        await asyncio.sleep(0)
        calls.append(("resize_pool", new.get(MAX_SIZE)))

    def audit(old: ResolvedConfig, new: ResolvedConfig, paths: list[str]) -> None:
        calls.append(("audit", new.get(MAX_SIZE)))

    sub.on_change("database", broken)
    sub.on_change("database", resize_pool)
    sub.on_change("", audit)
    caplog.set_level(logging.ERROR, logger="configbus")

    for version, size in ((2, 300), (3, 310)):
        await produce(
            setup,
            tenant,
            env,
            sealed(setup, tenant, env, version, with_value(base, MAX_SIZE, size)),
        )
        await sub.wait_for_version(version, timeout=30)
        await wait_until(
            lambda n=3 * (version - 1): len(calls) == n, what=f"the callbacks of v{version}"
        )
        assert sub.version == version and sub.config.get(MAX_SIZE) == size  # swap kept

    assert calls == [
        ("broken", 300),
        ("resize_pool", 300),
        ("audit", 300),
        ("broken", 310),
        ("resize_pool", 310),
        ("audit", 310),
    ]
    failures = [r for r in caplog.records if "change callback" in r.getMessage()]
    assert len(failures) == 2
    assert all(r.exc_info and isinstance(r.exc_info[1], RuntimeError) for r in failures)
    assert all(broken.__qualname__ in r.getMessage() for r in failures)
    assert (sub.applied, sub.rejected) == (3, {})


# -- 6 ---------------------------------------------------------------------------------
HISTORY = 200


async def test_restart_bootstraps_the_latest_of_a_long_history(
    setup: Setup, subscribers: list[ConfigSubscriber], tmp_path: Path
) -> None:
    tenant, env = AURORA
    await ensure_topics(setup, tenant)
    base = config_of(setup, tenant, env)
    staging = config_of(setup, tenant, "staging")
    values = []
    for version in range(1, HISTORY + 1):
        values.append(sealed(setup, tenant, env, version, with_value(base, MAX_SIZE, version)))
    await produce(setup, tenant, env, *values)
    # Another stream's records after them, so the head of ours is not the last record.
    await produce(
        setup, tenant, "staging", *(sealed(setup, tenant, "staging", v, staging) for v in (1, 2))
    )
    cache = tmp_path / "cache"
    first = await subscribe(setup, subscribers, tenant, env, cache_dir=cache)
    assert first.version == HISTORY and first.config.get(MAX_SIZE) == HISTORY
    # Only the head was handled: nothing applied, ignored or rejected on the way.
    assert (first.applied, first.ignored, first.rejected) == (1, 0, {})
    instance = first.settings.instance_id
    await first.stop()

    await produce(setup, tenant, env, sealed(setup, tenant, env, HISTORY + 1, base))
    restarted = await subscribe(
        setup, subscribers, tenant, env, cache_dir=cache, instance_id=instance
    )
    assert restarted.version == HISTORY + 1 and restarted.source == "kafka"
    assert restarted.config.hash == setup.expected_hash(tenant, env)
    # The cache (v200), then Kafka's head (v201).
    assert (restarted.applied, restarted.ignored, restarted.rejected) == (2, 0, {})


async def test_broker_down_at_start_runs_on_the_cache_and_catches_up(
    setup: Setup, subscribers: list[ConfigSubscriber], tmp_path: Path
) -> None:
    tenant, env = AURORA
    base = await crafted_stream(setup, versions=2)
    cache = tmp_path / "cache"
    earlier = await subscribe(setup, subscribers, tenant, env, cache_dir=cache)
    assert earlier.version == 2
    cached_hash = earlier.config.hash
    await earlier.stop()
    await produce(setup, tenant, env, sealed(setup, tenant, env, 3, with_value(base, MAX_SIZE, 3)))

    # Nobody listens where it looks for Kafka: it starts on its cache.
    with refused_port() as port:
        dead = KafkaSettings(f"127.0.0.1:{port}", request_timeout_ms=2000)
        offline = await subscribe(setup, subscribers, tenant, env, kafka=dead, cache_dir=cache)
        assert (offline.source, offline.version) == ("cache", 2)
        assert offline.config.hash == cached_hash
        await offline.stop()

    # Kafka "down" behind a proxy, then back: it catches up with what was published.
    async with TcpProxy(setup.kafka.bootstrap_servers) as proxy:
        kafka = KafkaSettings(proxy.address, request_timeout_ms=5000)
        copy = tmp_path / "cache-copy"
        shutil.copytree(cache, copy)
        sub = await subscribe(setup, subscribers, tenant, env, kafka=kafka, cache_dir=copy)
        assert (sub.source, sub.version) == ("cache", 2)
        await wait_until(lambda: proxy.refused >= 2, what="the subscriber to retry")
        assert sub.version == 2
        await produce(setup, tenant, env, sealed(setup, tenant, env, 4, base))
        proxy.open = True
        assert await sub.wait_for_version(4, timeout=60) == 4
        assert sub.source == "kafka"
        assert sub.config.hash == setup.expected_hash(tenant, env)
        assert proxy.forwarded >= 1
        await sub.stop()


async def test_no_cache_and_no_broker_is_no_config(
    setup: Setup, subscribers: list[ConfigSubscriber]
) -> None:
    tenant, env = AURORA
    with refused_port() as port:
        dead = KafkaSettings(f"127.0.0.1:{port}", request_timeout_ms=2000)
        with pytest.raises(NoConfigError, match="no disk cache"):
            await subscribe(setup, subscribers, tenant, env, kafka=dead, start_timeout=1.0)
    assert subscribers[0].version == 0


# -- 7 ---------------------------------------------------------------------------------
def test_sync_subscriber_from_plain_threads(setup: Setup) -> None:
    tenant, env = AURORA
    assert threading.current_thread() is threading.main_thread()
    base = asyncio.run(crafted_stream(setup))
    sub = SyncSubscriber(tenant, env, settings=subscriber_settings(setup, tenant, env))
    try:
        assert sub.start() is sub
        assert sub.version == 1
        callback_threads: list[str] = []
        validator_threads: list[str] = []
        called = threading.Event()

        def on_change(old: ResolvedConfig, new: ResolvedConfig, paths: list[str]) -> None:
            callback_threads.append(threading.current_thread().name)
            called.set()

        def validate(config: ResolvedConfig) -> bool:
            validator_threads.append(threading.current_thread().name)
            return True

        sub.on_change("database", on_change)
        sub.add_validator(validate)
        results: list[object] = []

        def wait(version: int, timeout: float | None) -> None:
            try:
                results.append(sub.wait_for_version(version, timeout))
            except Exception as exc:
                results.append(exc)

        waiter = threading.Thread(target=wait, args=(2, 30.0), name="waiter", daemon=True)
        waiter.start()
        asyncio.run(
            produce(
                setup, tenant, env, sealed(setup, tenant, env, 2, with_value(base, MAX_SIZE, 2))
            )
        )
        waiter.join(40)
        assert not waiter.is_alive() and results == [2]
        assert called.wait(30)
        assert sub.version == 2 and sub.config.get(MAX_SIZE) == 2
        name = f"configbus-{tenant}-{env}"
        assert sub.thread_name == name
        assert callback_threads == [name] and validator_threads == [name]

        # A thread waiting for a version that never comes is released by stop().
        results.clear()
        stuck = threading.Thread(target=wait, args=(99, None), name="stuck-waiter", daemon=True)
        stuck.start()
    finally:
        sub.stop()
    sub.stop()  # twice is fine
    stuck.join(10)
    assert not stuck.is_alive(), "stop() left a wait_for_version caller blocked"
    assert len(results) == 1 and isinstance(results[0], ConfigBusError)
    assert not any(t.name == name for t in threading.enumerate())
    with pytest.raises(ConfigBusError):
        sub.wait_for_version(1, 1.0)


# -- 8 ---------------------------------------------------------------------------------
RELOADS = 100


async def test_readers_never_see_a_mixed_config(
    setup: Setup, subscribers: list[ConfigSubscriber]
) -> None:
    tenant, env = AURORA
    await ensure_topics(setup, tenant)
    base = config_of(setup, tenant, env)

    def paired(version: int) -> dict[str, Any]:
        return with_value(with_value(base, "feature_flags.a", version), "feature_flags.b", version)

    await produce(setup, tenant, env, sealed(setup, tenant, env, 1, paired(1)))
    sub = await subscribe(setup, subscribers, tenant, env)
    threaded = SyncSubscriber(tenant, env, settings=subscriber_settings(setup, tenant, env))
    await asyncio.to_thread(threaded.start)
    stop = threading.Event()
    mixed: list[tuple[object, object, int]] = []
    seen_by_task: set[int] = set()
    seen_by_thread: set[int] = set()
    reads = Counter[str]()

    def check(snapshot: Snapshot, seen: set[int]) -> None:
        """One read: the config's two flags and the version must all agree."""
        flags = snapshot.config["feature_flags"]
        a, b = flags["a"], flags["b"]
        if not a == b == snapshot.version:
            mixed.append((a, b, snapshot.version))
        seen.add(a)

    async def read_in_task() -> None:
        while not stop.is_set():
            check(sub.snapshot, seen_by_task)
            reads["task"] += 1
            await asyncio.sleep(0)

    def read_in_thread() -> None:
        while not stop.is_set():
            check(threaded.snapshot, seen_by_thread)
            reads["thread"] += 1

    reader_thread = threading.Thread(target=read_in_thread, name="reader")
    reader_thread.start()
    reader_task = asyncio.create_task(read_in_task())
    try:
        last = RELOADS + 1
        await produce(
            setup,
            tenant,
            env,
            *(sealed(setup, tenant, env, v, paired(v)) for v in range(2, last + 1)),
        )
        await sub.wait_for_version(last, timeout=60)
        await asyncio.to_thread(threaded.wait_for_version, last, 60)
    finally:
        stop.set()
        await reader_task
        await asyncio.to_thread(reader_thread.join, 10)
        await asyncio.to_thread(threaded.stop)

    assert mixed == []
    assert sub.applied == threaded.subscriber.applied == RELOADS + 1  # every version applied
    assert sub.rejected == threaded.subscriber.rejected == {}
    assert len(seen_by_task) > 1 and len(seen_by_thread) > 1, (seen_by_task, seen_by_thread)
    assert {sub.config["feature_flags"]["a"], threaded.config["feature_flags"]["a"]} == {last}


# -- 9 ---------------------------------------------------------------------------------
def _secret_names(value: Any) -> set[str]:
    if isinstance(value, SecretRef):
        return {value.name}
    if isinstance(value, Mapping):
        return {name for child in value.values() for name in _secret_names(child)}
    if isinstance(value, tuple):
        return {name for child in value for name in _secret_names(child)}
    return set()


def _span_text(span: ReadableSpan) -> str:
    parts: list[object] = [span.name, dict(span.attributes or {}), span.status.description]
    for event in span.events:
        parts += [event.name, dict(event.attributes or {})]
    return repr(parts)


# A cross-field rule as services write them, with the JSON Schema library configbus
# itself uses: its errors end with the whole offending instance.
CAPACITY_RULE = {
    "if": {
        "properties": {
            "database": {
                "properties": {
                    "postgresql": {
                        "properties": {
                            "connection_pool": {"properties": {"max_size": {"minimum": 261}}}
                        }
                    }
                }
            }
        }
    },
    "then": {"required": ["capacity_review"]},
}


async def test_no_secret_or_config_value_in_logs_spans_or_acks(
    setup: Setup,
    subscribers: list[ConfigSubscriber],
    spans: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="configbus")
    rule = jsonschema_rs.validator_for(CAPACITY_RULE)

    def capacity_reviewed(config: ResolvedConfig) -> None:
        rule.validate(config.to_dict())

    def mentions_the_config(config: ResolvedConfig) -> None:
        if config.get(MAX_SIZE) == 259:
            raise ValueError(f"259 is unlucky in {config}")

    async with Daemon(setup.settings()) as daemon:
        await started(daemon)
        sub = await subscribe(setup, subscribers, *AURORA)
        sub.add_validator(capacity_reviewed)
        sub.add_validator(mentions_the_config)
        names = _secret_names(sub.config.data)
        assert len(names) > 5  # the config does hold secret references
        path = setup.path(AURORA_PROD)
        edit(path, "max_size: 250", "max_size: 275")  # v2: refused (no capacity review)
        await wait_until(lambda: sub.rejected.get("refused") == 1, what="the first refusal")
        edit(path, "max_size: 275", "max_size: 259")  # v3: refused (unlucky)
        await wait_until(lambda: sub.rejected.get("refused") == 2, what="the second refusal")
        edit(path, "max_size: 259", "max_size: 255")  # v4: fine
        await sub.wait_for_version(4, timeout=30)
        instance = sub.settings.instance_id

        async def ours() -> list[Any] | None:
            acks = [(r, a) for r, a in await read_acks(setup) if a.instance == instance]
            return acks if len(acks) == 4 else None

        acks = await wait_until(ours, what="the acks")
    await sub.stop()

    config = sub.config
    canaries = {
        config.get("database.postgresql.database"),
        config.get("storage.encryption.kms_key"),
        config.get("security.oidc.client_id"),
    }
    assert all(isinstance(c, str) and len(c) > 8 for c in canaries), canaries
    forbidden = names | canaries | {"-----BEGIN", "PRIVATE KEY"}

    reasons = [a.reason for _, a in acks if a.status == "rejected"]
    assert len(reasons) == 2
    assert reasons[0].startswith("refused: ")
    assert '"capacity_review" is a required property' in reasons[0]
    assert (
        reasons[1].startswith("refused: ") and "<ResolvedConfig aurora-records/prod" in reasons[1]
    )
    texts = {
        "ack": [raw.value.decode("utf-8", "replace") for raw, _ in acks if raw.value],
        "log": [caplog.text]
        + [repr({k: v for k, v in vars(r).items() if k != "exc_info"}) for r in caplog.records],
        "span": [_span_text(s) for s in spans.get_finished_spans()],
        "last_rejection": [sub.last_rejection or ""],
    }
    assert texts["span"] and texts["log"]
    leaks = [
        (where, secret)
        for where, found in texts.items()
        for text in found
        for secret in forbidden
        if secret in text
    ]
    assert leaks == [], leaks


# -- 10 --------------------------------------------------------------------------------
async def test_rollout_status_shows_who_applied_who_refused_and_how_fast(
    setup: Setup, subscribers: list[ConfigSubscriber], capsys: pytest.CaptureFixture[str]
) -> None:
    # A tenant of this test's own: the CLI reads the shared default acks topic.
    tenant = f"rollout-{uuid4().hex[:8]}"
    folder = setup.path(f"tenants/{tenant}")
    folder.mkdir()
    (folder / "tenant.yml").write_text(
        f"tenant: {tenant}\nname: Rollout Test\nenvironments:\n  prod: {{overrides: []}}\n"
    )
    (folder / "prod.yml").write_text("feature_flags:\n  mood_radio: false\n")
    async with Admin(setup.kafka) as admin:
        await admin.ensure_topics([DEFAULT_ACKS], compact=True)

    def no_mood_radio(config: ResolvedConfig) -> None:
        if config.get("feature_flags.mood_radio"):
            raise ValueError("mood radio is not licensed here")

    async with Daemon(setup.settings()) as daemon:
        await started(daemon)
        subs = []
        for number in range(4):
            sub = ConfigSubscriber(
                tenant,
                "prod",
                bootstrap_servers=setup.kafka.bootstrap_servers,
                trust=setup.trust_path,
                instance_id=f"{tenant}-{number}",
                service="rollout-test",
                topic_prefix=setup.topics.prefix,
            )
            subscribers.append(sub)
            subs.append(await sub.start())
        refuser = subs[3]
        refuser.add_validator(no_mood_radio)
        assert all(s.version == 1 for s in subs)
        edit(folder / "prod.yml", "mood_radio: false", "mood_radio: true")
        for sub in subs[:3]:
            await sub.wait_for_version(2, timeout=30)
        await wait_until(lambda: refuser.rejected.get("refused") == 1, what="the refusal")

    topics = TopicNames(prefix=setup.topics.prefix)  # as the CLI (and the subscribers) name them
    assert topics.acks == DEFAULT_ACKS

    async def reported() -> Any:
        report = await rollout_status(setup.kafka, topics, tenant, "prod", trust=setup.trust)
        done = len(report.instances) == 4 and len(report.at_target) == 3 and report.rejections
        return report if done else None

    await wait_until(reported, what="every ack")
    args = (
        "rollout",
        "status",
        tenant,
        "prod",
        "--bootstrap-servers",
        setup.kafka.bootstrap_servers,
    )
    args += ("--topic-prefix", setup.topics.prefix, "--trust", str(setup.trust_path))
    # A forged record claiming a huge version does not move the target.
    rogue_kid = f"rogue-{setup.kid}"
    rogue = SigningKey.load(generate_keypair(rogue_kid, folder / "rogue")[0], rogue_kid)
    await produce(setup, tenant, "prod", seal(event_body(tenant, "prod", 2**63, {}), rogue))
    code, out, err = await call_main(capsys, *args)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"{tenant}/prod: target v2, 3/4 instances at or past it"
    (refused_line,) = [line for line in lines if "REJECTED" in line]
    assert refuser.settings.instance_id in refused_line
    assert "REJECTED v2: refused: " in refused_line and "not licensed" in refused_line
    assert lines[-1].startswith("detection -> applied for v2: p50 ")

    code, out, err = await call_main(capsys, *args, "--json")
    assert (code, err) == (0, "")
    report = json.loads(out)
    assert (report["target_version"], report["at_target"], report["total"]) == (2, 3, 4)
    assert report["stragglers"] == [refuser.settings.instance_id]
    (rejection,) = report["rejections"]
    assert rejection["instance"] == refuser.settings.instance_id
    assert rejection["version"] == 2
    assert rejection["reason"].startswith("refused: ") and "not licensed" in rejection["reason"]
    assert all(report["latency"][p] is not None for p in ("p50_ms", "p95_ms", "p99_ms"))
    versions = {i["instance"]: i["version"] for i in report["instances"]}
    assert versions == {s.settings.instance_id: (1 if s is refuser else 2) for s in subs}
    assert all(i["service"] == "rollout-test" for i in report["instances"])

    # As a gate: a refusal fails it at once; without the refuser's stream it passes.
    code, out, err = await call_main(capsys, *args, "--wait", "30")
    assert code == 1 and err.strip() == f"rollout of {tenant}/prod v2: refused"
    code, out, err = await call_main(capsys, *args, "--wait", "5", "--version", "1")
    assert (code, err) == (0, "")
    # Stragglers past the deadline fail it; silent past the TTL, they are gone instead.
    code, out, err = await call_main(capsys, *args, "--wait", "0.5", "--version", "3")
    assert code == 1 and "not at the target within 0.5s" in err
    code, out, err = await call_main(
        capsys, *args, "--version", "3", "--wait", "0.5", "--instance-ttl", "0.001", "--json"
    )
    assert code == 0 and json.loads(out)["gone"] == sorted(s.settings.instance_id for s in subs)

    # Nothing verified to wait for (a mistyped environment) is no pass.
    code, out, err = await call_main(
        capsys, "rollout", "status", tenant, "stagin", *args[4:], "--wait", "1"
    )
    assert code == 1 and "no verified event" in err

    # An unknown tenant is a usage error, for rollout status and tail alike.
    unknown = ("no-such-tenant", "prod", *args[4:])
    code, out, err = await call_main(capsys, "rollout", "status", *unknown)
    assert code == 2 and "no-such-tenant" in err and "never published" in err
    tail = ("tail", "no-such-tenant", *args[4:])
    code, out, err = await call_main(capsys, *tail)
    assert code == 2 and "never published" in err
