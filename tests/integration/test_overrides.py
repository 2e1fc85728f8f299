"""Emergency overrides against the real Kafka: `configbus override set` reaches running
subscribers with the publisher daemon killed, they drop it at its expiry with the daemon
still down, and the daemon publishes the expiry once it is back; subscribers refuse (and
acknowledge the refusal of) an override from a key out of scope or over its max_ttl."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from helpers import (
    CLI,
    REPO,
    Setup,
    call_main,
    subscriber_settings,
    topic_options,
    wait_until,
)

from configbus.bus import OVERRIDE_CHANNEL, KafkaBus, Producer, read_to_end
from configbus.crypto import OPERATOR, SigningKey, TrustedKey, generate_keypair
from configbus.events import Ack, Cause, EventKind, build_body, now_ns, open_envelope, seal
from configbus.ops.overrides import OverrideEntry, encode_set, parse_overrides, write_overrides
from configbus.subscriber import ConfigSubscriber

TENANT, ENV = "aurora-records", "prod"
FLAG = "feature_flags.mood_radio"  # false in the tree


@pytest.fixture
def setup(tmp_path: Path, kafka_bootstrap: str) -> Setup:
    """The publisher's world, with two operator keys in its trust file: alice may
    override aurora-records in prod for up to an hour; bob only helix-audio."""
    world = Setup.create(tmp_path, kafka_bootstrap)
    trust = world.trust
    for kid, tenants in (("alice", {TENANT}), ("bob", {"helix-audio"})):
        private, _ = generate_keypair(kid, tmp_path / "operators")
        key = SigningKey.load(private, kid)
        trust = trust.with_key(
            TrustedKey(key.public, frozenset(tenants), frozenset({ENV}), OPERATOR, 3600)
        )
    world.trust_path.write_text(trust.dump(), encoding="utf-8")
    world.trust = trust
    return world


def operator(setup: Setup, kid: str) -> Path:
    return setup.workdir / "operators" / f"{kid}.key"


def child_env(setup: Setup) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIGBUS_")}
    return env | {"CONFIGBUS_STATE_TOPIC": setup.topics.state}


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


async def configbus(capsys: pytest.CaptureFixture[str], *args: str | Path) -> Result:
    """The `configbus` command, in this process (its coverage counts)."""
    return Result(*await call_main(capsys, *args))


class DaemonProcess:
    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.process: subprocess.Popen[bytes] | None = None
        self.logs = 0

    def start(self) -> None:
        setup = self.setup
        command = [
            *CLI,
            "daemon",
            "--root",
            str(setup.root),
            *topic_options(setup),
            "--signing-key",
            str(setup.key_path),
            "--kid",
            setup.kid,
            "--trust",
            str(setup.trust_path),
        ]
        self.logs += 1
        with open(setup.workdir / f"daemon-{self.logs}.log", "wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=child_env(setup), cwd=REPO
            )

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()


@pytest.fixture
def daemon(setup: Setup) -> Iterator[DaemonProcess]:
    process = DaemonProcess(setup)
    yield process
    process.stop()


@pytest.fixture
async def fleet(setup: Setup, daemon: DaemonProcess) -> AsyncIterator[list[ConfigSubscriber]]:
    """Three running subscribers of aurora-records/prod, on v1 from a running daemon."""
    daemon.start()
    subscribers = [
        ConfigSubscriber(TENANT, ENV, settings=subscriber_settings(setup, TENANT, ENV))
        for _ in range(3)
    ]
    for subscriber in subscribers:
        await subscriber.start()
    yield subscribers
    for subscriber in subscribers:
        await subscriber.stop()


async def override_records(setup: Setup) -> list[Any]:
    topic = setup.topics.tenant_topic(TENANT)
    found = []
    async for record in read_to_end(setup.kafka, [topic]):
        if record.key == f"{ENV}/override".encode():
            found.append(open_envelope(record.value or b"", setup.trust))
    return found


async def acks(setup: Setup) -> list[Ack]:
    found = []
    async for record in read_to_end(setup.kafka, [setup.topics.acks]):
        if record.value is not None:
            found.append(msgspec.msgpack.decode(record.value, type=Ack))
    return found


async def test_an_override_reaches_every_instance_with_the_daemon_killed_and_expires_by_itself(
    setup: Setup,
    daemon: DaemonProcess,
    fleet: list[ConfigSubscriber],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert {s.config.get(FLAG) for s in fleet} == {False}
    daemon.kill()  # SIGKILL: no goodbye, no expiry publication from it

    result = await configbus(
        capsys,
        "override",
        "set",
        TENANT,
        ENV,
        f"{FLAG}=true",
        "--ttl",
        "6s",
        "--reason",
        "INC-4711 mood radio on for the launch",
        "--key",
        operator(setup, "alice"),
        "--trust",
        setup.trust_path,
        "--root",
        setup.root,
        *topic_options(setup),
        "--wait",
        "30",
    )

    assert result.returncode == 0, result.stderr
    assert f"override {TENANT}/{ENV} {FLAG} = true until" in result.stdout
    assert f"applied by 3 of 3 instance(s) of {TENANT}/{ENV}" in result.stdout
    assert {s.config.get(FLAG) for s in fleet} == {True}
    assert {(s.snapshot.override_version, s.overrides[0].actor) for s in fleet} == {(1, "alice")}

    # The daemon is still dead: each subscriber drops the override by its own clock.
    for subscriber in fleet:
        await subscriber.wait_for(lambda s: not s.overrides, timeout=30)
    assert {s.config.get(FLAG) for s in fleet} == {False}

    # Back, the daemon publishes the expiry: the audit trail says when it ended.
    daemon.start()

    async def expiry() -> list[Any]:
        return [e for e in await override_records(setup) if e.body.version == 2]

    [published] = await wait_until(expiry, 60, what="the daemon's expiry record")
    assert published.kid == setup.kid
    assert published.body.cause.reason == f"override expired: {FLAG}"
    assert parse_overrides(published).entries == ()
    records = (await setup.records([setup.topics.audit]))[setup.topics.audit]
    audited = [open_envelope(r.value or b"", setup.trust) for r in records]
    overrides = [(e.kid, e.body.version) for e in audited if e.body.kind is EventKind.OVERRIDE]
    assert overrides == [("alice", 1), (setup.kid, 2)]


async def test_override_clear_ends_it_at_once_and_list_shows_what_is_in_effect(
    setup: Setup,
    fleet: list[ConfigSubscriber],
    capsys: pytest.CaptureFixture[str],
) -> None:
    signer = ["--key", str(operator(setup, "alice")), "--trust", str(setup.trust_path)]
    result = await configbus(
        capsys,
        "override",
        "set",
        TENANT,
        ENV,
        f"{FLAG}=true",
        "application.workers=12",
        "--ttl",
        "30m",
        "--reason",
        "INC-1",
        "--root",
        setup.root,
        *signer,
        *topic_options(setup),
    )
    assert result.returncode == 0, result.stderr

    listed = await configbus(
        capsys, "override", "list", TENANT, "--trust", setup.trust_path, *topic_options(setup)
    )
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{TENANT}/{ENV} application.workers = 12  until ")
    assert "by alice: INC-1  [v1]" in lines[0]
    every = await configbus(
        capsys, "override", "list", "--json", "--trust", setup.trust_path, *topic_options(setup)
    )
    listed_json = json.loads(every.stdout)
    assert {(e["tenant"], e["key"], e["value"], e["actor"]) for e in listed_json} == {
        (TENANT, FLAG, True, "alice"),
        (TENANT, "application.workers", 12, "alice"),
    }

    cleared = await configbus(
        capsys,
        "override",
        "clear",
        TENANT,
        ENV,
        FLAG,
        "--reason",
        "launch done",
        *signer,
        *topic_options(setup),
    )
    assert cleared.returncode == 0, cleared.stderr
    assert f"cleared {TENANT}/{ENV}: {FLAG}" in cleared.stdout
    assert {(s.config.get(FLAG), s.config.get("application.workers")) for s in fleet} == {
        (False, 12)
    }
    records = await override_records(setup)
    assert [(e.body.version, e.body.cause.reason) for e in records] == [
        (1, "INC-1"),
        (2, "launch done"),
    ]


async def test_the_cli_refuses_a_value_the_schema_refuses_and_writes_nothing(
    setup: Setup,
    fleet: list[ConfigSubscriber],
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = await configbus(
        capsys,
        "override",
        "set",
        TENANT,
        ENV,
        f"{FLAG}=maybe",
        "--ttl",
        "5m",
        "--reason",
        "typo",
        "--key",
        operator(setup, "alice"),
        "--trust",
        setup.trust_path,
        "--root",
        setup.root,
        *topic_options(setup),
    )

    assert result.returncode == 1
    assert "mood_radio" in result.stderr and "boolean" in result.stderr
    assert await override_records(setup) == []


@pytest.mark.parametrize(
    ("kid", "ttl", "reason"),
    [("bob", 60, "untrusted_scope"), ("alice", 2 * 3600, "ttl_too_long")],
)
async def test_subscribers_refuse_an_override_the_key_may_not_sign_and_say_so(
    setup: Setup, fleet: list[ConfigSubscriber], kid: str, ttl: int, reason: str
) -> None:
    # Written past the CLI's own checks (which refuse it), as a hostile tool would.
    key = SigningKey.load(operator(setup, kid), kid)
    now = now_ns()
    entry = OverrideEntry(path=FLAG, value=True, set_at=now, expires_at=now + ttl * 10**9)
    body = build_body(
        tenant=TENANT,
        env=ENV,
        version=1,
        config_json=encode_set([entry]),
        kind=EventKind.OVERRIDE,
        detected_at=now,
        issued_at=now,
        cause=Cause(actor=kid, reason="test"),
        expires_at=entry.expires_at,
    )
    async with Producer(setup.kafka) as producer:
        await producer.send_and_wait(
            setup.topics.tenant_topic(TENANT), seal(body, key), key=f"{ENV}/override".encode()
        )

    async def refusals() -> list[Ack]:
        return [
            a
            for a in await acks(setup)
            if a.channel == OVERRIDE_CHANNEL and a.status == "rejected" and a.version == 1
        ]

    refused = await wait_until(lambda: _three(refusals), 30, what="a refusal from every instance")
    assert {a.reason.split(":")[0] for a in refused} == {reason}
    assert {s.config.get(FLAG) for s in fleet} == {False}


async def _three(refusals: Any) -> list[Ack] | None:
    found: list[Ack] = await refusals()
    return found if len({a.instance for a in found}) == 3 else None


async def test_tenant_set_warns_when_an_override_keeps_the_value_it_sets(
    setup: Setup, redis_db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from helpers import started

    from configbus.publisher import Daemon

    setup.redis_url = redis_db_url
    async with Daemon(setup.settings(trust=setup.trust_path)) as daemon:
        await started(daemon)
        alice = SigningKey.load(operator(setup, "alice"), "alice")

        def change(kept: tuple[OverrideEntry, ...], now: int) -> tuple[OverrideEntry, ...]:
            return (
                OverrideEntry(
                    path="application.workers",
                    value=12,
                    set_at=now,
                    expires_at=now + 600 * 10**9,
                    actor="alice",
                    reason="INC-7",
                ),
            )

        await write_overrides(
            KafkaBus(setup.kafka),
            setup.topics,
            TENANT,
            ENV,
            key=alice,
            trust=setup.trust,
            change=change,
            cause=Cause(actor="alice", reason="INC-7"),
        )
        await wait_until(lambda: daemon.overrides.in_effect(), 30, what="the daemon to learn it")

        code, out, err = await call_main(
            capsys,
            "tenant", "set", TENANT, ENV, "application.workers=16", "--root", setup.root,
            "--redis", redis_db_url, "--actor", "bob", "--reason", "more workers",
        )  # fmt: skip

    assert code == 0, err
    assert "published aurora-records/prod v2" in out
    assert "note: an emergency override of application.workers by alice is in effect" in err
