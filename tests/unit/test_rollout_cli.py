"""`configbus rollout start | promote | abort` refuse what cannot work in one line, before
anything is signed or sent: a bad plan, a key the trust file does not know or whose
scope does not cover the stream, a command that would outlive the key's max_ttl. The
commands against a daemon: tests/unit/test_rollout_flow.py (in memory) and
tests/integration/test_rollouts.py (Kafka)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest

from configbus.bus import CANDIDATE_CHANNEL, ROLLOUT_CHANNEL, MemoryBus, TopicNames
from configbus.cli import main
from configbus.crypto import SigningKey, TrustStore, generate_keypair
from configbus.crypto.trust import OPERATOR, TrustedKey
from configbus.events import (
    Cause,
    Envelope,
    EventBody,
    EventKind,
    RolloutTag,
    build_body,
    now_ns,
    seal,
)
from configbus.ops.rollouts import Command, Plan

CLOSED = "127.0.0.1:9"  # nothing listens: a command that got as far as sending would hang


@pytest.fixture(autouse=True)
def _no_configbus_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CONFIGBUS_BOOTSTRAP_SERVERS", "CONFIGBUS_TRUST", "CONFIGBUS_OPERATOR_KEY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def signer(tmp_path: Path) -> list[str]:
    """The options of an operator of acme/prod whose overrides and commands last at
    most 30 minutes."""
    key, _ = generate_keypair("oncall", tmp_path / "keys")
    entry = TrustedKey(
        SigningKey.load(key, "oncall").public, frozenset({"acme"}), frozenset({"prod"}),
        OPERATOR, 1800,
    )  # fmt: skip
    trust = tmp_path / "trust.yml"
    trust.write_text(TrustStore([entry]).dump())
    return ["--trust", str(trust), "--key", str(key), "--bootstrap-servers", CLOSED]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and out == ""
    return code, err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--steps", "0"], "step '0': say a count (1), a share (10%) or a label (color=green)"),
        (["--steps", "1,150%"], "step '150%': a share between 0% and 100%"),
        (["--bake", "soon"], "bake: 'soon' is not a duration"),
        (["--select", "zone"], "--select 'zone': say name=value"),
        (["--within", "1h"], "--within 1h is longer than key 'oncall''s max_ttl (30m)"),
        (["--within", "later"], "--within: 'later' is not a duration"),
    ],
    ids=["count-0", "share-150", "bake", "select", "within-over-max-ttl", "within-bad"],
)
def test_a_bad_rollout_start_is_refused_in_one_line(
    capsys: pytest.CaptureFixture[str], signer: list[str], extra: list[str], message: str
) -> None:
    code, err = run(
        capsys, "rollout", "start", "acme", "prod", "--reason", "CHG-1", "--within", "10m",
        *extra, *signer,
    )  # fmt: skip

    assert code == 2
    assert err.startswith("configbus: ") and message in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("action", ["start", "promote", "abort"])
def test_a_key_that_does_not_cover_the_stream_is_refused(
    capsys: pytest.CaptureFixture[str], signer: list[str], action: str
) -> None:
    code, err = run(capsys, "rollout", action, "other", "prod", "--reason", "CHG-1", *signer)

    assert code == 2
    assert "key 'oncall' may not override other/prod" in err


def test_a_command_without_a_reason_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], signer: list[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["rollout", "abort", "acme", "prod", *signer])

    assert exited.value.code == 2
    assert "--reason" in capsys.readouterr().err


# -- against an in-memory bus: what the commands write -------------------------------------


@pytest.fixture
def bus_world(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[MemoryBus, list[str], SigningKey]:
    """The CLI on a MemoryBus: an operator of acme/prod, and the publisher key whose
    candidates the CLI reads (both in the trust file); the publisher's key."""
    bus = MemoryBus()
    bus.create_topic(TopicNames().audit, compact=False)  # as any published cluster has
    monkeypatch.setattr("configbus.cli_override.KafkaBus", lambda settings: bus)
    operator, _ = generate_keypair("oncall", tmp_path / "keys")
    publisher_path, _ = generate_keypair("pub", tmp_path / "keys")
    publisher = SigningKey.load(publisher_path, "pub")
    trust = TrustStore(
        [
            TrustedKey(publisher.public, frozenset({"*"}), frozenset({"*"})),
            TrustedKey(
                SigningKey.load(operator, "oncall").public,
                frozenset({"acme"}),
                frozenset({"prod"}),
                OPERATOR,
                3600,
            ),
        ]
    )
    (tmp_path / "trust.yml").write_text(trust.dump())
    options = ["--trust", str(tmp_path / "trust.yml"), "--key", str(operator)]
    return bus, [*options, "--bootstrap-servers", CLOSED], publisher


def commands(bus: MemoryBus) -> list[tuple[str, Command]]:
    topics = TopicNames()
    records = bus.records(topics.tenant_topic("acme"))
    found = []
    for record in records:
        if record.key == topics.record_key("prod", ROLLOUT_CHANNEL):
            body = msgspec.msgpack.decode(
                msgspec.msgpack.decode(record.value or b"", type=Envelope).body, type=EventBody
            )
            found.append((body.cause.actor, msgspec.json.decode(body.config, type=Command)))
    return found


def running(bus: MemoryBus, key: SigningKey, state: str = "running") -> str:
    """A candidate record of acme/prod whose rollout is in `state`; its id."""
    topics = TopicNames()
    tag = RolloutTag(id="r-42", state=state, strategy="canary", steps=("1", "100%"), step=0)
    body = build_body(
        tenant="acme", env="prod", version=1, config_json=b"{}", kind=EventKind.CANDIDATE,
        detected_at=now_ns(), cause=Cause(), rollout=tag,
    )  # fmt: skip
    bus.create_topic(topics.tenant_topic("acme"), compact=True)

    async def put() -> None:
        async with bus.producer() as producer:
            await producer.send_and_wait(
                topics.tenant_topic("acme"),
                seal(body, key),
                key=topics.record_key("prod", CANDIDATE_CHANNEL),
            )

    asyncio.run(put())
    return tag.id


def test_start_writes_a_signed_command_that_arms_the_stream(
    capsys: pytest.CaptureFixture[str], bus_world: tuple[MemoryBus, list[str], SigningKey]
) -> None:
    bus, signer, _ = bus_world
    bus.create_topic(TopicNames().tenant_topic("acme"), compact=True)

    code = main(["rollout", "start", "acme", "prod", "--steps", "1,100%", "--bake", "30s",
                 "--reason", "CHG-7", "--within", "10m", *signer])  # fmt: skip

    assert code == 0
    assert "armed acme/prod: its next change rolls out canary 1,100%, bake 30s" in (
        capsys.readouterr().out
    )
    [(actor, command)] = commands(bus)
    assert actor == "oncall" and command.action == "start"
    assert command.the_plan() == Plan.build("canary", "1,100%", "30s")


def test_promote_and_abort_name_the_running_rollout_and_start_is_refused_meanwhile(
    capsys: pytest.CaptureFixture[str], bus_world: tuple[MemoryBus, list[str], SigningKey]
) -> None:
    bus, signer, publisher = bus_world
    rollout = running(bus, publisher)

    assert main(["rollout", "promote", "acme", "prod", "--step", "--reason", "ok", *signer]) == 0
    assert main(["rollout", "abort", "acme", "prod", "--reason", "no", *signer]) == 0
    out = capsys.readouterr().out
    assert f"promote acme/prod's rollout {rollout} to its next step" in out
    assert f"abort acme/prod's rollout {rollout}: its instances go back" in out
    assert [(c.action, c.rollout, c.step_only) for _, c in commands(bus)] == [
        ("promote", rollout, True),
        ("abort", rollout, False),
    ]
    code = main(
        ["rollout", "start", "acme", "prod", "--reason", "again", "--within", "5m", *signer]
    )
    assert code == 2
    assert f"rollout {rollout} of acme/prod runs: promote or abort it first" in (
        capsys.readouterr().err
    )


def test_promote_or_abort_with_no_rollout_running_is_refused_naming_the_last(
    capsys: pytest.CaptureFixture[str], bus_world: tuple[MemoryBus, list[str], SigningKey]
) -> None:
    bus, signer, publisher = bus_world
    rollout = running(bus, publisher, state="aborted")

    code = main(["rollout", "abort", "acme", "prod", "--reason", "no", *signer])

    assert code == 2
    assert f"no rollout of acme/prod runs (the last, {rollout}, was aborted)" in (
        capsys.readouterr().err
    )
    assert commands(bus) == []
