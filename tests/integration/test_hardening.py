"""The publisher under hostile input and faults, against the real Kafka and Redis: what
Kafka refuses fails one stream alone, recovery believes only verified records, versions
survive a lost tenant topic, and a bad store value or metadata blocks nobody."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import redis
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from helpers import (
    PublishSpy,
    Setup,
    assert_versions_consistent,
    edit,
    produce,
    started,
    subscriber_settings,
    wait_until,
)

from configbus.bus import Admin
from configbus.events import Cause, Envelope, build_body
from configbus.publisher import Daemon
from configbus.store import TenantStore
from configbus.subscriber import ConfigSubscriber

pytestmark = pytest.mark.integration

AURORA_PROD = "tenants/aurora-records/prod.yml"
HELIX_PROD = "tenants/helix-audio/prod.yml"
AURORA = ("aurora-records", "prod")
MAX_SIZE = "database.postgresql.connection_pool.max_size"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def setup(tmp_path: Path, kafka_bootstrap: str) -> Setup:
    return Setup.create(tmp_path, kafka_bootstrap)


def bloat(setup: Setup, origins: int) -> None:
    """Make aurora-records/prod large and incompressible: `origins` random CORS origins."""
    many = ", ".join(f'"https://{secrets.token_hex(16)}.example"' for _ in range(origins))
    edit(setup.path(AURORA_PROD), "allow_origins: [", f"allow_origins: [{many}, ")


async def create_topic(setup: Setup, topic: str, max_message_bytes: int) -> None:
    client = AIOKafkaAdminClient(bootstrap_servers=setup.kafka.bootstrap_servers)
    await client.start()
    try:
        configs = {"cleanup.policy": "compact", "max.message.bytes": str(max_message_bytes)}
        await client.create_topics([NewTopic(topic, 1, 1, topic_configs=configs)])
    finally:
        await client.close()
    async with Admin(setup.kafka) as admin:
        await admin.wait_for_leaders([topic])


@pytest.mark.parametrize(
    ("topic_limit", "origins", "refused_by"),
    [
        # ~45 KB event, topic takes 40 KB (the other streams' events, ~11 KB each and
        # uncompressed, fit in one batch): sent, and refused by Kafka in the transaction.
        (40_000, 2000, "kafka refused the event"),
        # ~160 KB event, topic takes 100 KB: refused before sending, from the topic's config.
        (100_000, 7000, "max.message.bytes (100000)"),
    ],
    ids=["refused-by-kafka", "refused-before-sending"],
)
async def test_an_event_its_topic_cannot_take_fails_its_stream_alone(
    setup: Setup,
    caplog: pytest.LogCaptureFixture,
    topic_limit: int,
    origins: int,
    refused_by: str,
) -> None:
    await create_topic(setup, setup.topics.tenant_topic("aurora-records"), topic_limit)
    daemon = Daemon(setup.settings())
    spy = PublishSpy(daemon)
    async with daemon:
        await started(daemon)
        assert daemon.publisher.states[("aurora-records", "prod")].version == 1
        bloat(setup, origins)
        edit(setup.path(HELIX_PROD), "max_size:", "max_size: 131 #")
        rounds = await wait_until(
            lambda: [
                r for r in spy.rounds if r.report and ("aurora-records", "prod") in r.report.failed
            ],
            what="the oversized stream to be refused",
        )
        reason = rounds[-1].report.failed[("aurora-records", "prod")]  # type: ignore[union-attr]
        assert refused_by in reason
        await wait_until(
            lambda: any(("helix-audio", "prod") in r.published for r in spy.rounds),
            what="the other tenant's edit",
        )
        assert daemon.publisher.states[("aurora-records", "prod")].version == 1
        assert daemon._worker is not None and not daemon._worker.done()
        after = await setup.records()

    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("aurora-records/prod not published, keeping v1" in line for line in logged)
    assert not any("published aurora-records/prod v2" in r.getMessage() for r in caplog.records)
    audit = [setup.verify(r) for r in after[setup.topics.audit]]
    versions = assert_versions_consistent(audit)
    assert versions[("aurora-records", "prod")] == [1]
    assert versions[("helix-audio", "prod")] == [1, 2]
    heads = {r.key: r for r in after[setup.topics.tenant_topic("aurora-records")]}
    assert setup.verify(heads[b"prod"]).version == 1


async def test_a_config_over_the_size_limit_is_refused_with_one_line(setup: Setup) -> None:
    tree = setup.tree()
    limit = max(len(tree.resolve(env, tenant).canonical_json) for tenant, env in setup.streams())
    bloat(setup, 100)  # aurora-records/prod: now the only stream over the limit
    daemon = Daemon(setup.settings())
    daemon.publisher.limits = type(daemon.publisher.limits)(config_bytes=limit)
    spy = PublishSpy(daemon)
    async with daemon:
        await wait_until(lambda: spy.rounds, what="the first round")
        report = spy.rounds[0].report
        assert report is not None
        reason = report.failed[("aurora-records", "prod")]
        assert f"over the limit config_bytes ({limit})" in reason and "\n" not in reason
        assert list(report.failed) == [("aurora-records", "prod")]
        assert len(report.published) == len(setup.streams()) - 1  # every other stream


async def test_store_values_and_metadata_of_any_shape_block_no_one(
    setup: Setup, redis_db_url: str
) -> None:
    """A store field holding ["$secret"], one nested too deep, a `$meta` reason that is
    a list and one that is a number: each fails (or is cleaned up for) its own stream,
    and every other stream goes on publishing."""
    setup.redis_url = redis_db_url
    store = TenantStore(redis_db_url)
    daemon = Daemon(setup.settings())
    spy = PublishSpy(daemon)
    deep = "[" * 200 + "]" * 200
    async with store, daemon:
        await started(daemon)
        raw = store.redis
        before = len(spy.rounds)  # the start round published every stream without these
        await raw.hset(store.store_key("aurora-records", "prod"), '["feature_flags","x"]', deep)
        await raw.hset(
            store.store_key("helix-audio", "staging"),
            mapping={'["feature_flags","beta"]': '["$secret"]', "$meta": '{"reason": ["x"]}'},
        )
        await raw.hset(
            store.store_key("nimbus-fm", "prod"),
            mapping={'["feature_flags","beta"]': "true", "$meta": '{"reason": 42, "actor": {}}'},
        )
        edit(setup.path(HELIX_PROD), "max_size:", "max_size: 133 #")

        def outcome() -> bool:
            rounds = spy.rounds[before:]
            failed = {s for r in rounds if r.report for s in r.report.failed}
            published = {s for r in rounds for s in r.published}
            return ("aurora-records", "prod") in failed and {
                ("helix-audio", "prod"),
                ("nimbus-fm", "prod"),
            } <= published

        await wait_until(outcome, what="the good streams published, the bad one refused")
        subscriber = ConfigSubscriber(
            "nimbus-fm", "prod", settings=subscriber_settings(setup, "nimbus-fm", "prod")
        )
        async with subscriber:
            assert subscriber.config.get("feature_flags.beta") is True
            assert subscriber.event is not None and subscriber.event.body.cause.reason
            assert subscriber.rejected == {}
        # Repaired, the refused stream publishes at the next change.
        await raw.hset(store.store_key("aurora-records", "prod"), '["feature_flags","x"]', "1")
        await wait_until(
            lambda: any(("aurora-records", "prod") in r.published for r in spy.rounds),
            what="the repaired stream",
        )
        assert daemon._worker is not None and not daemon._worker.done()


def forged(tenant: str, env: str, version: int) -> bytes:
    """An unsigned record in the shape of an event, claiming `version`."""
    body = build_body(
        tenant=tenant,
        env=env,
        version=version,
        config_json=b"{}",
        detected_at=0,
        cause=Cause(),
    )
    raw = msgspec.msgpack.encode(body)
    return msgspec.msgpack.encode(Envelope(1, "forger", b"\0" * 64, raw))


async def test_recovery_believes_only_verified_records_where_they_lie(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    async with Daemon(setup.settings()) as daemon:
        await started(daemon)
    # A forgery claiming 2**64-1 for another tenant, on aurora's topic; a genuine event
    # of helix-audio copied onto aurora's topic under aurora's key.
    await produce(setup, "aurora-records", "prod", forged("helix-audio", "prod", 2**64 - 1))
    topic = setup.topics.tenant_topic("helix-audio")
    helix = [r for r in (await setup.records([topic]))[topic] if r.key == b"prod"][-1]
    assert helix.value is not None
    await produce(setup, "aurora-records", "prod", helix.value)

    caplog.clear()
    daemon = Daemon(setup.settings())
    spy = PublishSpy(daemon)
    async with daemon:
        await started(daemon)
        states = daemon.publisher.states
        assert states[("helix-audio", "prod")].version == 1
        assert states[("aurora-records", "prod")].version == 1
        edit(setup.path(AURORA_PROD), "max_size: 250", "max_size: 251")
        await wait_until(
            lambda: any(("aurora-records", "prod") in r.published for r in spy.rounds),
            what="aurora-records/prod v2",
        )
    summary = [r.getMessage() for r in caplog.records if "recovered" in r.getMessage()]
    assert any("skipped 2 records" in line and "unknown_key (1)" in line for line in summary)
    assert any("wrong_stream (1)" in line for line in summary)


async def test_versions_survive_the_loss_of_a_tenant_topic(setup: Setup) -> None:
    async with Daemon(setup.settings()) as daemon:
        await started(daemon)
        edit(setup.path(AURORA_PROD), "max_size: 250", "max_size: 252")
        await wait_until(
            lambda: daemon.publisher.states[("aurora-records", "prod")].version == 2,
            what="v2",
        )
    settings = subscriber_settings(setup, "aurora-records", "prod")
    subscriber = ConfigSubscriber("aurora-records", "prod", settings=settings)
    async with subscriber:
        assert subscriber.version == 2
        topic = setup.topics.tenant_topic("aurora-records")
        async with Admin(setup.kafka) as admin:
            await admin.delete_topics([topic])
            await wait_until(lambda: _gone(admin, topic), what="the topic to go")
        edit(setup.path(AURORA_PROD), "max_size: 252", "max_size: 253")
        async with Daemon(setup.settings()) as daemon:
            await started(daemon)
            assert daemon.publisher.states[("aurora-records", "prod")].version == 3
            await subscriber.wait_for_version(3, timeout=60)
        assert subscriber.config.get(MAX_SIZE) == 253
    records = (await setup.records([topic]))[topic]
    assert [setup.verify(r).version for r in records if r.key == b"prod"] == [3]


async def test_a_subscriber_backs_off_while_its_topic_is_gone(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    """With its tenant topic deleted, a subscriber notices and backs off, instead of
    leaving aiokafka to ask for the topic, and log an error, thousands of times a
    second for as long as the topic is missing."""
    async with Daemon(setup.settings()) as daemon:
        await started(daemon)
    settings = subscriber_settings(setup, "aurora-records", "prod")
    async with ConfigSubscriber("aurora-records", "prod", settings=settings) as subscriber:
        topic = setup.topics.tenant_topic("aurora-records")
        async with Admin(setup.kafka) as admin:
            await admin.delete_topics([topic])
        gone = await wait_until(
            lambda: [r for r in caplog.records if "is gone from the cluster" in r.getMessage()],
            what="the subscriber to notice",
        )
        assert gone[0].name == "configbus.supervise" and gone[0].levelno == logging.WARNING
        noise = [r for r in caplog.records if r.name.startswith("aiokafka")]
        assert len(noise) < 5000, len(noise)
        assert subscriber._task is not None and not subscriber._task.done()
        assert subscriber.version == 1  # still running on what it had


async def _gone(admin: Admin, topic: str) -> bool:
    return topic not in await admin.topics()


def spawn(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)


async def test_sigterm_stops_a_daemon_still_waiting_for_kafka(setup: Setup, tmp_path: Path) -> None:
    from helpers import refused_port

    with refused_port() as port:
        command = [
            *(sys.executable, "-m", "configbus", "daemon", "--root", str(setup.root)),
            *("--bootstrap-servers", f"127.0.0.1:{port}", "--signing-key", str(setup.key_path)),
            *("--kid", setup.kid),
        ]
        log = tmp_path / "daemon.log"
        process = spawn(command, log)
        try:
            await wait_until(
                lambda: b"waiting for kafka" in log.read_bytes(), 60, what="the retry loop"
            )
            process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(process.wait, 20)
        finally:
            if process.poll() is None:
                process.kill()
    assert code == 0, log.read_text()
    assert b"Traceback" not in log.read_bytes()


async def test_a_redis_outage_delays_store_changes_only(setup: Setup, tmp_path: Path) -> None:
    """Redis stopped: a file edit still publishes (with the store values last read);
    Redis back: the first store write publishes."""
    from conftest import DEPLOY, _free_ports

    (port,) = _free_ports(1)
    env = {"CONFIGBUS_RUN_DIR": str(tmp_path / "own-redis"), "CONFIGBUS_REDIS_PORT": str(port)}

    def redis_sh(command: str) -> None:
        result = subprocess.run(
            ["bash", str(DEPLOY / "redis.sh"), command],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-2000:]

    url = f"redis://127.0.0.1:{port}/0"
    redis_sh("start")
    try:
        store = TenantStore(url)
        async with store:
            await store.set("aurora-records", "prod", {("feature_flags", "beta"): True})
        setup.redis_url = url
        daemon = Daemon(setup.settings())
        spy = PublishSpy(daemon)
        async with daemon:
            await started(daemon)
            redis_sh("stop")
            edit(setup.path(AURORA_PROD), "max_size: 250", "max_size: 254")
            await wait_until(
                lambda: any(("aurora-records", "prod") in r.published for r in spy.rounds),
                what="the file edit during the outage",
            )
            event = await _latest_event(setup, "aurora-records", "prod")
            config = json.loads(event)
            assert config["feature_flags"]["beta"] is True  # the store value was kept
            redis_sh("start")
            async with TenantStore(url) as store:
                await wait_until(_pinged(store), 30, what="redis back")
                before = len(spy.rounds)
                await store.set("aurora-records", "prod", {("feature_flags", "beta"): False})
            await wait_until(
                lambda: any(("aurora-records", "prod") in r.published for r in spy.rounds[before:]),
                what="the first store write after the restart",
            )
    finally:
        redis_sh("stop")


def _pinged(store: TenantStore):  # type: ignore[no-untyped-def]
    async def ping() -> bool:
        try:
            return bool(await store.redis.ping())
        except redis.RedisError:
            return False

    return ping


async def _latest_event(setup: Setup, tenant: str, env: str) -> bytes:
    topic = setup.topics.tenant_topic(tenant)
    records = [r for r in (await setup.records([topic]))[topic] if r.key == env.encode()]
    return setup.verify(records[-1]).event.config_json


async def test_a_store_call_cancelled_mid_command_ends_at_once(redis_db_url: str) -> None:
    """Stopping the daemon cancels its store watcher in the middle of Redis commands; a
    client that swallowed the cancellation would hang `stop()` (redis-py 8.0-8.2 do)."""
    async with TenantStore(redis_db_url) as store:

        async def busy() -> None:
            while True:
                await store.meta("aurora-records", "prod")

        for attempt in range(100):
            task = asyncio.create_task(busy())
            for _ in range(attempt % 5 + 1):
                await asyncio.sleep(0)  # let it get into a command
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=5)
            assert done, f"a cancelled store call still runs after 5 s (attempt {attempt})"
            assert task.cancelled()


@pytest.mark.parametrize("codec", ["zstd", "lz4", "snappy", "gzip"])
async def test_a_record_in_a_compressed_batch_stalls_no_reader(setup: Setup, codec: str) -> None:
    """Anyone who can write to a tenant topic may send a batch compressed with any codec
    Kafka knows; a reader that cannot decode it would be stuck before it forever."""
    async with Daemon(setup.settings()) as daemon:
        await started(daemon)
        settings = subscriber_settings(setup, "aurora-records", "prod")
        async with ConfigSubscriber("aurora-records", "prod", settings=settings) as subscriber:
            producer = AIOKafkaProducer(
                bootstrap_servers=setup.kafka.bootstrap_servers, compression_type=codec
            )
            await producer.start()
            try:
                topic = setup.topics.tenant_topic("aurora-records")
                await producer.send_and_wait(topic, b"\x00junk" * 100, key=b"not-an-env")
            finally:
                await producer.stop()
            edit(setup.path(AURORA_PROD), "max_size: 250", "max_size: 251")
            await subscriber.wait_for_version(2, timeout=30)
            assert subscriber.config.get(MAX_SIZE) == 251
        fresh = ConfigSubscriber("aurora-records", "prod", settings=settings)
        async with fresh:
            assert fresh.version == 2


async def test_a_store_key_of_the_wrong_type_fails_its_stream_alone(
    setup: Setup, redis_db_url: str
) -> None:
    """A store key that is not a hash, and a status entry nested past the interpreter's
    limit: the one stream fails, every other publishes, and reporting goes on."""
    setup.redis_url = redis_db_url
    with redis.Redis.from_url(redis_db_url) as raw:
        raw.set("configbus:store:helix-audio:prod", "oops")
        raw.hset("configbus:status", "aurora-records/prod", "[" * 100_000 + "]" * 100_000)
    daemon = Daemon(setup.settings())
    spy = PublishSpy(daemon)
    async with daemon, TenantStore(redis_db_url) as store:
        await started(daemon)
        states = daemon.publisher.states
        assert ("helix-audio", "prod") not in states
        assert states[("aurora-records", "prod")].version == 1
        assert states[("nimbus-fm", "prod")].version == 1
        reasons = [r.report.failed.get(("helix-audio", "prod"), "") for r in spy.rounds if r.report]
        assert reasons and "configbus:store:helix-audio:prod: not a store hash" in reasons[0]
        status = await wait_until(_status(store, "aurora-records", "prod"), what="the status")
        assert status["version"] == 1
        assert await store.meta("helix-audio", "prod") == {}


def _status(store: TenantStore, tenant: str, env: str):  # type: ignore[no-untyped-def]
    async def read() -> dict[str, object] | None:
        return await store.status(tenant, env)

    return read
