"""The publisher against the real broker and Redis: file and store changes become
signed, versioned events; nothing is published twice or out of order across restarts,
crashes and a second publisher; the CLI's tail and publish --once.

Every test has its own copy of the tree, key pair, topic names, transactional id and
(where Redis is used) Redis db. Tests synchronise by polling with a deadline
(`wait_until`) on what the daemon did (`PublishSpy`) or what Kafka holds."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from helpers import (
    CLI,
    REPO,
    PublishSpy,
    Round,
    Setup,
    Verified,
    assert_versions_consistent,
    call_main,
    edit,
    kid_of,
    new_records,
    started,
    wait_until,
)

from configbus.bus import CONTENT_TYPE, Admin, Producer, Record, follow
from configbus.crypto import SigningKey, generate_keypair
from configbus.errors import ActiveWriterError, VerificationError
from configbus.events import Envelope, open_envelope
from configbus.publisher import Daemon, publish_once
from configbus.store import TenantStore

pytestmark = pytest.mark.integration

AURORA_PROD = "tenants/aurora-records/prod.yml"
HELIX_PROD = "tenants/helix-audio/prod.yml"
HELIX_STAGING = "tenants/helix-audio/staging.yml"
DEV = "dev/dev.yml"
MAX_SIZE = "database.postgresql.connection_pool.max_size"
DEFAULT_AUDIT = "configbus.audit"  # the CLI cannot name another audit topic


@pytest.fixture
def setup(tmp_path: Path, kafka_bootstrap: str) -> Setup:
    return Setup.create(tmp_path, kafka_bootstrap)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Subprocesses a test starts; any still running at the end are killed."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def child_env() -> dict[str, str]:
    """Our environment without CONFIGBUS_* variables: arguments say everything."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CONFIGBUS_")}


async def run_cli(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the `configbus` command in a subprocess."""
    return await asyncio.to_thread(
        subprocess.run,
        [*CLI, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
        cwd=REPO,
        check=False,
    )


def published_rounds(spy: PublishSpy, source: str) -> list[Round]:
    return [r for r in spy.caused_by(source) if r.published]


def only(records: list[Record]) -> Record:
    assert len(records) == 1, f"expected one record, got {[(r.key, r.offset) for r in records]}"
    return records[0]


def latest_versions(events: list[Verified]) -> dict[tuple[str, str], int]:
    latest: dict[tuple[str, str], int] = {}
    for verified in events:
        latest[verified.stream] = max(latest.get(verified.stream, 0), verified.version)
    return latest


# -- 1 ---------------------------------------------------------------------------------
async def test_tenant_file_edit_publishes_one_signed_event(setup: Setup) -> None:
    daemon = Daemon(setup.settings())
    spy = PublishSpy(daemon)
    async with daemon:
        await started(daemon)
        before = await setup.records()
        baseline = [setup.verify(r) for r in before[setup.topics.audit]]
        assert sorted(v.stream for v in baseline) == setup.streams()  # v1 of every stream
        previous = latest_versions(baseline)[("aurora-records", "prod")]

        edit(setup.path(AURORA_PROD), "max_size: 250", "max_size: 275")
        expected = setup.expected_hash("aurora-records", "prod")
        await wait_until(lambda: published_rounds(spy, AURORA_PROD), what="the edit's publication")
        after = await setup.records()

    topic = setup.topics.tenant_topic("aurora-records")
    gained = new_records(before, after)
    assert sorted(gained) == sorted([topic, setup.topics.audit]), "records for other streams"
    record, audit = only(gained[topic]), only(gained[setup.topics.audit])
    assert record.key == b"prod"
    assert audit.key == b"aurora-records/prod"
    assert audit.value == record.value
    assert record.header("content-type") == CONTENT_TYPE
    event = setup.verify(record).event
    body = event.body
    assert (body.tenant, body.env, body.version) == ("aurora-records", "prod", previous + 1)
    assert body.config_hash == expected
    assert AURORA_PROD in body.cause.sources
    assert MAX_SIZE in body.changed_paths
    assert body.changed_paths == (MAX_SIZE,)
    config = json.loads(event.config_json)
    assert config["database"]["postgresql"]["connection_pool"]["max_size"] == 275


# -- 2 ---------------------------------------------------------------------------------
async def test_comment_only_edit_publishes_nothing(setup: Setup) -> None:
    daemon = Daemon(setup.settings())
    spy = PublishSpy(daemon)
    path = setup.path(AURORA_PROD)
    async with daemon:
        await started(daemon)
        before = await setup.records()

        # Comments, blank lines and indentation of a flow list: the config is the same.
        edit(path, "max_size: 250\n", "max_size: 250   # reviewed by capacity planning\n")
        edit(path, "# Aurora Records, prod layer", "#   Aurora Records (prod)\n\n# prod layer")
        rounds = await wait_until(
            lambda: spy.caused_by(AURORA_PROD), what="the daemon to look at the comment edit"
        )
        # The daemon resolved the stream after the edit and found nothing to publish.
        assert ("aurora-records", "prod") in rounds[0].streams
        assert all(r.report is not None and not r.published for r in rounds)
        assert all(r.report is not None and not r.report.failed for r in rounds)
        assert new_records(before, await setup.records()) == {}

        # A real edit afterwards is published, and is the only new record.
        edit(path, "max_size: 250   #", "max_size: 260   #")
        await wait_until(lambda: published_rounds(spy, AURORA_PROD), what="the real edit")
        after = await setup.records()

    gained = new_records(before, after)
    topic = setup.topics.tenant_topic("aurora-records")
    assert sorted(gained) == sorted([topic, setup.topics.audit])
    body = setup.verify(only(gained[topic])).event.body
    assert only(gained[setup.topics.audit]).value == only(gained[topic]).value
    assert body.version == 2
    assert body.changed_paths == (MAX_SIZE,)
    assert body.config_hash == setup.expected_hash("aurora-records", "prod")


# -- 3 ---------------------------------------------------------------------------------
async def test_shared_environment_edit_fans_out_to_every_dev_stream(setup: Setup) -> None:
    solo = setup.path("tenants/solo-prod")  # a tenant without dev: must see nothing
    solo.mkdir()
    (solo / "tenant.yml").write_text(
        "tenant: solo-prod\nname: Solo Prod\nenvironments:\n  prod: {overrides: []}\n"
    )
    dev_streams = [s for s in setup.streams() if s[1] == "dev"]
    assert len(dev_streams) == 3
    daemon = Daemon(setup.settings())
    spy = PublishSpy(daemon)
    async with daemon:
        await started(daemon)
        before = await setup.records()
        edit(setup.path(DEV), "feature_flags:\n", "feature_flags:\n  integration_probe: true\n")
        rounds = await wait_until(lambda: published_rounds(spy, DEV), what="the fan-out")
        after = await setup.records()

    assert sorted(s for r in rounds for s in r.published) == dev_streams
    gained = new_records(before, after)
    dev_topics = {setup.topics.tenant_topic(t): t for t, _ in dev_streams}
    assert sorted(gained) == sorted([*dev_topics, setup.topics.audit])
    for topic, tenant in dev_topics.items():
        record = only(gained[topic])
        assert record.key == b"dev"
        body = setup.verify(record).event.body
        assert (body.tenant, body.env, body.version) == (tenant, "dev", 2)
        assert body.config_hash == setup.expected_hash(tenant, "dev")
        assert DEV in body.cause.sources
        assert "feature_flags.integration_probe" in body.changed_paths
    audit = gained[setup.topics.audit]
    assert sorted(r.key or b"" for r in audit) == sorted(
        f"{t}/dev".encode() for t in dev_topics.values()
    )


# -- 4 ---------------------------------------------------------------------------------
async def test_restart_recovers_versions_and_publishes_only_changes(setup: Setup) -> None:
    settings = setup.settings()
    first = Daemon(settings)
    first_spy = PublishSpy(first)
    async with first:
        await started(first)
        edit(setup.path(AURORA_PROD), "max_size: 250", "max_size: 275")
        await wait_until(lambda: published_rounds(first_spy, AURORA_PROD), what="v2")
    assert first.stopped.is_set()
    before = await setup.records()
    latest = latest_versions([setup.verify(r) for r in before[setup.topics.audit]])
    assert latest[("aurora-records", "prod")] == 2

    # Changed while no daemon ran: the next one publishes exactly that.
    edit(setup.path(HELIX_PROD), "max_size: 60", "max_size: 64", atomic=True)
    second = Daemon(settings)
    spy = PublishSpy(second)
    async with second:
        await started(second)
        opening = spy.rounds[0]
        assert opening.report is not None
        assert opening.published == [("helix-audio", "prod")]
        assert opening.report.unchanged == len(setup.streams()) - 1
        middle = await setup.records()
        gained = new_records(before, middle)
        helix = setup.topics.tenant_topic("helix-audio")
        assert sorted(gained) == sorted([helix, setup.topics.audit])
        body = setup.verify(only(gained[helix])).event.body
        assert body.version == latest[("helix-audio", "prod")] + 1
        assert body.changed_paths == (MAX_SIZE,)

        edit(setup.path(AURORA_PROD), "max_size: 275", "max_size: 300")
        await wait_until(lambda: published_rounds(spy, AURORA_PROD), what="v3")
        after = await setup.records()

    gained = new_records(middle, after)
    aurora = setup.topics.tenant_topic("aurora-records")
    assert sorted(gained) == sorted([aurora, setup.topics.audit])
    body = setup.verify(only(gained[aurora])).event.body
    assert (body.env, body.version) == ("prod", latest[("aurora-records", "prod")] + 1)
    # changed_paths is computed against the config recovered from Kafka.
    assert body.changed_paths == (MAX_SIZE,)
    assert body.config_hash == setup.expected_hash("aurora-records", "prod")
    assert_versions_consistent(setup.verify(r) for r in after[setup.topics.audit])


# -- 5 ---------------------------------------------------------------------------------
GENERATED = 300


async def test_sigkill_mid_fan_out_loses_and_duplicates_nothing(
    setup: Setup, processes: list[subprocess.Popen[bytes]]
) -> None:
    tenants_dir = setup.path("tenants")
    for number in range(GENERATED):
        folder = tenants_dir / f"gen-{number:03d}"
        folder.mkdir()
        (folder / "tenant.yml").write_text(
            f"tenant: gen-{number:03d}\nenvironments:\n  dev: {{overrides: []}}\n"
        )
    streams = setup.streams()
    dev_streams = [s for s in streams if s[1] == "dev"]
    assert len(dev_streams) == GENERATED + 3
    async with Admin(setup.kafka) as admin:  # so it can be followed from the start
        await admin.ensure_topics([DEFAULT_AUDIT], compact=False)

    ours: list[Verified] = []

    async def collect() -> None:
        async for record in follow(setup.kafka, [DEFAULT_AUDIT]):
            if kid_of(record.value) == setup.kid:
                ours.append(setup.verify(record))

    def versions_seen(version: int) -> set[tuple[str, str]]:
        return {v.stream for v in ours if v.version == version}

    command = [
        *CLI,
        "daemon",
        "--root",
        str(setup.root),
        "--bootstrap-servers",
        setup.kafka.bootstrap_servers,
        "--signing-key",
        str(setup.key_path),
        "--kid",
        setup.kid,
        "--topic-prefix",
        setup.topics.prefix,
        "--batch-size",
        "10",
        "--reconcile-interval",
        "600",
    ]

    def spawn(log: str) -> subprocess.Popen[bytes]:
        with open(setup.workdir / log, "wb") as handle:
            process = subprocess.Popen(
                command, stdout=handle, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO
            )
        processes.append(process)
        return process

    collector = asyncio.create_task(collect())
    try:
        daemon = spawn("daemon-1.log")
        await wait_until(lambda: versions_seen(1) == set(streams), 60, what="v1 of every stream")
        edit(setup.path(DEV), "feature_flags:\n", "feature_flags:\n  crash_probe: true\n")
        await wait_until(lambda: versions_seen(2), 30, interval=0.005, what="the first v2")
        daemon.kill()  # SIGKILL, likely inside an open transaction
        await wait_until(lambda: daemon.poll() is not None, 10, what="the daemon to die")
        assert daemon.returncode == -signal.SIGKILL

        # What is committed now (a transaction the kill left open hides nothing committed).
        committed = {v.stream for v in await setup_audit(setup, settled=False) if v.version == 2}
        assert 0 < len(committed) < len(dev_streams), "the kill did not land mid-fan-out"

        restarted = spawn("daemon-2.log")
        expected = {(t, e): setup.expected_hash(t, e) for t, e in dev_streams}

        def converged() -> bool:
            latest = {v.stream: v.event.body.config_hash for v in ours}
            return all(latest.get(s) == h for s, h in expected.items())

        await wait_until(converged, 60, what="every dev stream to carry the edit")
        restarted.send_signal(signal.SIGTERM)
        await wait_until(lambda: restarted.poll() is not None, 20, what="a clean SIGTERM stop")
        assert restarted.returncode == 0
    finally:
        collector.cancel()
        await asyncio.gather(collector, return_exceptions=True)

    audit = await setup_audit(setup)
    versions = assert_versions_consistent(audit)
    for stream in streams:
        assert versions[stream] == ([1, 2] if stream in expected else [1]), stream
    tenant_records = await setup.records(setup.tenant_topics())
    for (tenant, env), config_hash in expected.items():
        heads = [r for r in tenant_records[setup.topics.tenant_topic(tenant)] if r.key == b"dev"]
        body = setup.verify(heads[-1]).event.body
        assert (body.env, body.version, body.config_hash) == (env, 2, config_hash)


async def setup_audit(setup: Setup, *, settled: bool = True) -> list[Verified]:
    """Our events on the CLI's (shared) audit topic, committed ones only."""
    records = (await setup.records([DEFAULT_AUDIT], settled=settled))[DEFAULT_AUDIT]
    return [setup.verify(r) for r in records if kid_of(r.value) == setup.kid]


# -- 6 ---------------------------------------------------------------------------------
async def test_one_writer_a_second_daemon_stands_by_until_the_first_resigns(
    setup: Setup,
) -> None:
    settings = setup.settings()
    first, second = Daemon(settings), Daemon(settings)
    first_spy, second_spy = PublishSpy(first), PublishSpy(second)
    async with first:
        await started(first)
        starting = asyncio.create_task(second.start())
        # The second sees the first's heartbeats arrive and stands by: it does not fence.
        edit(setup.path(AURORA_PROD), "max_size: 250", "max_size: 275")
        await wait_until(lambda: published_rounds(first_spy, AURORA_PROD), what="v2 by the first")
        await asyncio.sleep(0)  # let `starting` run on
        assert not starting.done() and not second.active.is_set()
        assert first.active.is_set() and first.takeovers == 0
    # The first resigned on stop: the second takes over without waiting out a timeout.
    await asyncio.wait_for(starting, 15)
    try:
        await started(second)
        assert second.active.is_set() and second_spy.rounds[0].published == []
        edit(setup.path(AURORA_PROD), "max_size: 275", "max_size: 280")
        await wait_until(lambda: published_rounds(second_spy, AURORA_PROD), what="v3")
        after = await setup.records()
    finally:
        await second.stop()

    audit = [setup.verify(r) for r in after[setup.topics.audit]]
    versions = assert_versions_consistent(audit)
    assert versions[("aurora-records", "prod")] == [1, 2, 3]
    assert all(v == [1] for s, v in versions.items() if s != ("aurora-records", "prod"))
    assert audit[-1].event.body.config_hash == setup.expected_hash("aurora-records", "prod")


async def test_a_fenced_daemon_stands_by_and_takes_over_again(setup: Setup) -> None:
    """`publish --once --take-over` fences the running daemon: it stands by, never
    publishes over the other writer, and takes over again once that one resigned."""
    daemon = Daemon(setup.settings())
    spy = PublishSpy(daemon)
    async with daemon:
        await started(daemon)
        with pytest.raises(ActiveWriterError, match="daemon is active"):
            await publish_once(setup.settings())
        report = await publish_once(setup.settings(), take_over=True)
        assert report.failed == {} and report.unchanged == len(setup.streams())
        await wait_until(lambda: daemon.takeovers == 1, what="the daemon to notice the fence")
        await wait_until(lambda: daemon.active.is_set(), what="the daemon to take over again")
        edit(setup.path(AURORA_PROD), "max_size: 250", "max_size: 270")
        await wait_until(lambda: published_rounds(spy, AURORA_PROD), what="v2 by the daemon")
        assert not daemon.stopped.is_set()
        after = await setup.records()

    audit = [setup.verify(r) for r in after[setup.topics.audit]]
    assert assert_versions_consistent(audit)[("aurora-records", "prod")] == [1, 2]


# -- 7 ---------------------------------------------------------------------------------
async def test_tenant_store_set_and_unset_publish(
    setup: Setup, redis_db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    setup.redis_url = redis_db_url
    daemon = Daemon(setup.settings())
    spy = PublishSpy(daemon)
    store = TenantStore(redis_db_url)
    source = f"redis:{store.store_key('aurora-records', 'prod')}"
    topic = setup.topics.tenant_topic("aurora-records")
    stream = ("--root", setup.root, "--redis", redis_db_url)

    async def prod_events() -> list[Verified]:
        return [setup.verify(r) for r in (await setup.records([topic]))[topic] if r.key == b"prod"]

    async with daemon, store:
        await started(daemon)
        file_hash = setup.expected_hash("aurora-records", "prod")
        reason = "black friday: more connections"
        code, out, err = await call_main(
            capsys,
            *("tenant", "set", "aurora-records", "prod", f"{MAX_SIZE}=300"),
            *("--actor", "alice", "--reason", reason, *stream),
        )
        assert (code, err) == (0, ""), err
        assert MAX_SIZE in out
        # `tenant set` waited for the daemon: the event is in Kafka when it returns.
        assert out.splitlines()[-1] == "published aurora-records/prod v2"
        events = await prod_events()
        assert [v.version for v in events] == [1, 2]
        body = events[-1].event.body
        assert (body.cause.actor, body.cause.reason) == ("alice", reason)
        assert source in body.cause.sources
        assert body.changed_paths == (MAX_SIZE,)
        config = json.loads(events[-1].event.config_json)
        assert config["database"]["postgresql"]["connection_pool"]["max_size"] == 300
        assert await store.latest_event("aurora-records", "prod") == events[-1].record.value

        # render and explain show what prod runs: the store's layer over the files'.
        code, out, _ = await call_main(
            capsys, "render", "aurora-records", "prod", "--format", "json", *stream
        )
        assert code == 0
        assert json.loads(out)["database"]["postgresql"]["connection_pool"]["max_size"] == 300
        code, out, _ = await call_main(
            capsys, "explain", "aurora-records", "prod", MAX_SIZE, *stream
        )
        assert code == 0 and out.splitlines()[-1].startswith(f"=> 300  from {source}"), out
        code, out, _ = await call_main(
            capsys, "render", "aurora-records", "prod", "--format", "json", "--no-store", *stream
        )
        assert json.loads(out)["database"]["postgresql"]["connection_pool"]["max_size"] == 250

        # A value the schema refuses: one line naming key and store; nothing written.
        code, shown, _ = await call_main(
            capsys, "tenant", "show", "aurora-records", "prod", *stream
        )
        assert code == 0 and f"{MAX_SIZE} = 300" in shown
        code, out, err = await call_main(
            capsys,
            *("tenant", "set", "aurora-records", "prod", f"{MAX_SIZE}=lots"),
            *("--actor", "mallory", *stream),
        )
        assert code == 1
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert MAX_SIZE in lines[0] and store.store_key("aurora-records", "prod") in lines[0]
        assert out == ""
        assert (await call_main(capsys, "tenant", "show", "aurora-records", "prod", *stream))[
            1
        ] == shown

        # Unset: the config falls back to the file's value; the next version is 3, so
        # the refused set published nothing in between.
        code, out, err = await call_main(
            capsys,
            *("tenant", "unset", "aurora-records", "prod", MAX_SIZE),
            *("--actor", "bob", "--reason", "sale over", *stream),
        )
        assert (code, err) == (0, ""), err
        assert out.splitlines()[-1] == "published aurora-records/prod v3"
        assert sum(len(r.published) for r in spy.caused_by(source)) == 2
        events = await prod_events()

    assert [v.version for v in events] == [1, 2, 3]
    # The daemon has stopped (and resigned): a set is stored, and says it is not published.
    code, out, err = await call_main(
        capsys, *("tenant", "set", "aurora-records", "prod", f"{MAX_SIZE}=310"), *stream
    )
    assert code == 1 and "no publisher daemon is running" in err
    assert f"set aurora-records/prod {MAX_SIZE} = 310" in out
    body = events[-1].event.body
    assert (body.cause.actor, body.cause.reason) == ("bob", "sale over")
    assert body.config_hash == file_hash
    assert body.changed_paths == (MAX_SIZE,)
    config = json.loads(events[-1].event.config_json)
    assert config["database"]["postgresql"]["connection_pool"]["max_size"] == 250


# -- 8 ---------------------------------------------------------------------------------
async def test_broken_edit_publishes_nothing_and_the_fix_publishes(setup: Setup) -> None:
    daemon = Daemon(setup.settings())
    spy = PublishSpy(daemon)
    path = setup.path(AURORA_PROD)
    async with daemon:
        await started(daemon)
        before = await setup.records()
        edit(path, "max_size: 250", "max_size: [250")
        rounds = await wait_until(
            lambda: [r for r in spy.caused_by(AURORA_PROD) if r.report and r.report.failed],
            what="the daemon to try the broken file",
        )
        report = rounds[0].report
        assert report is not None
        assert "YAML syntax error" in report.failed[("aurora-records", "prod")]
        assert not any(r.published for r in spy.caused_by(AURORA_PROD))
        assert new_records(before, await setup.records()) == {}
        # Still up: not stopped, every task running.
        assert not daemon.stopped.is_set() and daemon.active.is_set()
        assert daemon._worker is not None and not daemon._worker.done()
        assert daemon._tasks and not any(task.done() for task in daemon._tasks)

        edit(path, "max_size: [250", "max_size: 280")
        await wait_until(lambda: published_rounds(spy, AURORA_PROD), what="the fix")
        after = await setup.records()

    gained = new_records(before, after)
    topic = setup.topics.tenant_topic("aurora-records")
    assert sorted(gained) == sorted([topic, setup.topics.audit])
    event = setup.verify(only(gained[topic])).event
    assert event.body.version == 2
    assert event.body.config_hash == setup.expected_hash("aurora-records", "prod")
    config = json.loads(event.config_json)
    assert config["database"]["postgresql"]["connection_pool"]["max_size"] == 280


# -- 9 ---------------------------------------------------------------------------------
WIRE_DECODER = REPO / "tests" / "wire_decoder.py"


def load_wire_decoder() -> Any:
    """tests/wire_decoder.py (tests/ is not on sys.path when only these tests run)."""
    spec = importlib.util.spec_from_file_location("wire_decoder", WIRE_DECODER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_broker_events_read_with_the_reference_decoder(setup: Setup) -> None:
    wire = load_wire_decoder()
    daemon = Daemon(setup.settings())
    spy = PublishSpy(daemon)
    async with daemon:
        await started(daemon)
        edit(setup.path(AURORA_PROD), "max_size: 250", "max_size: 275")
        await wait_until(lambda: published_rounds(spy, AURORA_PROD), what="the edit's event")
        records = await setup.records()

    public_keys = {setup.kid: setup.key_path.with_suffix(".pub").read_bytes()}
    last: dict[tuple[str, str, str], int] = {}
    latest: dict[tuple[str, str], str] = {}
    checked = 0
    for topic, found in records.items():
        for record in found:
            assert record.header("content-type") == wire.CONTENT_TYPE
            assert record.value is not None and record.key is not None
            stream = wire.record_stream(
                topic, record.key, prefix=setup.topics.prefix, audit=setup.topics.audit
            )
            decoded = wire.decode_and_verify(
                record.value,
                public_keys,
                stream=stream,
                last_version=last.get((topic, *stream)),
            )
            last[(topic, *stream)] = decoded["body"]["version"]
            latest[stream] = decoded["body"]["config_hash"]
            ours = setup.verify(record).event  # configbus's own reader agrees on everything
            body = decoded["body"]
            assert decoded["kid"] == ours.kid == setup.kid
            assert decoded["config_json"] == ours.config_json
            assert decoded["config"] == json.loads(ours.config_json)
            assert body["config_hash"] == ours.body.config_hash
            assert (body["tenant"], body["env"], body["version"]) == (
                ours.body.tenant,
                ours.body.env,
                ours.body.version,
            )
            assert body["cause"]["sources"] == list(ours.body.cause.sources)
            assert body["changed_paths"] == list(ours.body.changed_paths)
            checked += 1
    edited = [v for v in (setup.verify(r) for r in records[setup.topics.audit]) if v.version == 2]
    assert [v.stream for v in edited] == [("aurora-records", "prod")]
    assert checked == 2 * (len(setup.streams()) + 1)  # tenant topics and audit
    assert latest == {s: setup.expected_hash(*s) for s in setup.streams()}
    # A record altered on the wire is rejected by the reference decoder too.
    value = bytearray(edited[0].record.value or b"")
    value[-1] ^= 0x01
    with pytest.raises(wire.WireError) as caught:
        wire.decode_and_verify(bytes(value), public_keys)
    assert caught.value.reason == "bad_signature"


# -- 10 --------------------------------------------------------------------------------
async def test_tail_marks_forged_and_tampered_records(setup: Setup, tmp_path: Path) -> None:
    report = await publish_once(setup.settings())
    assert report.failed == {} and report.published
    topic = setup.topics.tenant_topic("aurora-records")
    genuine = (await setup.records([topic]))[topic]
    prod = next(r for r in genuine if r.key == b"prod")
    assert prod.value is not None

    envelope = msgspec.msgpack.decode(prod.value, type=Envelope)
    rogue_kid = f"rogue-{setup.kid}"
    private, _ = generate_keypair(rogue_kid, tmp_path / "rogue")
    rogue = SigningKey.load(private, rogue_kid)
    resigned = msgspec.msgpack.encode(
        Envelope(envelope.v, rogue.kid, rogue.sign(envelope.body), envelope.body)
    )
    flipped = bytearray(prod.value)
    flipped[-1] ^= 0x01  # the last byte of the signed body
    for value, reason in ((resigned, "unknown_key"), (bytes(flipped), "bad_signature")):
        with pytest.raises(VerificationError) as caught:
            open_envelope(value, setup.trust)
        assert caught.value.reason == reason
    headers = (("content-type", CONTENT_TYPE),)
    async with Producer(setup.kafka) as producer:
        await producer.send_and_wait(topic, resigned, key=b"prod", headers=headers)
        await producer.send_and_wait(topic, bytes(flipped), key=b"prod", headers=headers)
    edit(setup.path(AURORA_PROD), "max_size: 250", "max_size: 290")
    report = await publish_once(setup.settings())
    assert [(t, e, v) for t, e, v in report.published] == [("aurora-records", "prod", 2)]

    result = await run_cli(
        *("tail", "aurora-records", "--bootstrap-servers", setup.kafka.bootstrap_servers),
        *("--trust", setup.trust_path, "--topic-prefix", setup.topics.prefix),
    )
    lines = result.stdout.splitlines()
    assert len(lines) == len(genuine) + 3, result.stdout
    verified = [line for line in lines if f"verified:{setup.kid}" in line]
    rejected = [line for line in lines if " REJECTED " in line]
    assert len(verified) == len(genuine) + 1
    assert [re.search(r"REJECTED (\w+)", line)[1] for line in rejected] == [  # type: ignore[index]
        "unknown_key",
        "bad_signature",
    ]
    assert rogue_kid in rejected[0]
    assert re.search(r"\bprod\s+v2\b", lines[-1]), lines[-1]
    assert result.returncode == 1, result.stderr


# -- 11 --------------------------------------------------------------------------------
async def test_publish_once(setup: Setup) -> None:
    args = (
        *("publish", "--once", "--root", setup.root),
        *("--bootstrap-servers", setup.kafka.bootstrap_servers),
        *("--signing-key", setup.key_path, "--kid", setup.kid),
        *("--topic-prefix", setup.topics.prefix),
    )
    streams = setup.streams()
    result = await run_cli(*args)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert (
        lines[-1]
        == f"{len(streams)} streams checked, {len(streams)} published, 0 unchanged, 0 failed"
    )
    assert sorted(lines[:-1]) == sorted(f"published {t}/{e} v1" for t, e in streams)

    # One broken tenant file, one good edit: the good one is published, the broken
    # stream is named, and the exit status says something failed.
    edit(setup.path(HELIX_STAGING), "  lyrics: !delete\n", "  lyrics: !delete\n bad: [\n")
    edit(setup.path(AURORA_PROD), "max_size: 250", "max_size: 275")
    result = await run_cli(*args)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "published aurora-records/prod v2",
        f"{len(streams)} streams checked, 1 published, {len(streams) - 2} unchanged, 1 failed",
    ]
    assert re.search(r"^failed helix-audio/staging: .+", result.stderr, re.M), result.stderr
    assert "aurora-records" not in result.stderr
