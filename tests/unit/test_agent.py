"""The lean apply path and the host agent, on the in-memory bus and real Unix sockets:
lazy views that stay immutable and compare as the eager freeze does, the trace id of a
record without a span, one batched ack producer per process, the agent protocol's
bounds, and an in-process agent passing records to subscribers that verify them."""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from configbus.agent import Agent, AgentSettings
from configbus.agent.protocol import Acks, Delivery, Hello, encode, read_frame
from configbus.agent.server import _claim_socket
from configbus.bus import KafkaSettings
from configbus.errors import BusError, ConfigBusError, SettingsError
from configbus.events import Ack, Cause, build_body, claimed_version, now_ns, seal
from configbus.limits import LimitError, Limits
from configbus.subscriber import ConfigSubscriber, SubscriberSettings
from configbus.subscriber.acks import AckSender
from configbus.telemetry import trace_id_of
from configbus.tree.values import FrozenDict, SecretRef, canonical_json, freeze_json, view_json

from .helpers import eventually
from .test_subscriber_hardening import ENV, TENANT, TOPICS, Stream

DOCUMENT = (
    b'{"db":{"hosts":["a","b"],"pool":{"max":10,"min":1},"password":{"$secret":"db/pw"}},'
    b'"servers":[{"name":"x","ports":[1,2]},[3,[4]]],"flag":true,"n":null}'
)


@pytest.fixture
def stream(tmp_path: Path) -> Stream:
    return Stream(tmp_path)


def view() -> Any:
    return view_json(msgspec.json.decode(DOCUMENT))


def mutable_inside(value: Any) -> list[str]:
    """Paths of plain (mutable) dicts or lists reachable through the public API."""
    found = []
    if type(value) in (dict, list):
        found.append(type(value).__name__)
    if isinstance(value, dict):
        for key, child in value.items():
            found += [f"{key}.{path}" for path in mutable_inside(child)]
    elif isinstance(value, tuple):
        for index, child in enumerate(value):
            found += [f"{index}.{path}" for path in mutable_inside(child)]
    return found


# -- lazy views -------------------------------------------------------------------------


def test_a_view_equals_the_eager_freeze_and_encodes_to_the_same_bytes() -> None:
    eager = freeze_json(msgspec.json.decode(DOCUMENT))
    lazy = view()
    assert canonical_json(lazy) == canonical_json(eager)
    assert lazy == eager  # before anything was read
    assert lazy["db"]["password"] == SecretRef("db/pw")
    assert lazy["servers"][0]["ports"] == (1, 2)
    assert lazy == eager and view() == lazy  # read or not, equal
    partly = view()
    assert partly["servers"][1] == (3, (4,))  # a list read, its siblings not
    assert partly["servers"] == eager["servers"] and partly == eager
    assert type(partly) is FrozenDict  # compared: now wholly immutable, reads at C speed
    assert view()["db"] != {"hosts": ["a", "b"]} and view() != eager["db"]
    assert pickle.loads(pickle.dumps(lazy)) == eager


def test_nothing_mutable_is_handed_out_by_any_way_of_reading() -> None:
    for copy in (view(), dict(view()), {**view()}, view().copy(), view() | {}, {} | view()):
        assert mutable_inside(copy) in ([], ["dict"]), copy  # a copy may be a plain dict
        assert mutable_inside(dict(copy)) in ([], ["dict"])
    lazy = view()
    assert mutable_inside(list(lazy.values())) in ([], ["list"])
    with pytest.raises(TypeError, match="immutable"):
        lazy["db"]["pool"]["max"] = 11
    with pytest.raises(TypeError, match="immutable"):
        lazy.get("db")["extra"] = 1
    assert isinstance(lazy["db"], FrozenDict) and isinstance(lazy["db"], dict)


def test_a_view_enforces_the_depth_and_node_limits() -> None:
    deep = b'{"a":' * 40 + b"1" + b"}" * 40
    with pytest.raises(LimitError, match="deeper than 32"):
        view_json(msgspec.json.decode(deep))
    wide = msgspec.json.encode({"k": list(range(500))})
    with pytest.raises(LimitError, match="more than 100 values"):
        view_json(msgspec.json.decode(wide), Limits(nodes=100), what="config")
    assert view_json(msgspec.json.decode(wide))["k"][-1] == 499


def test_the_trace_id_of_a_record_comes_from_its_traceparent_header() -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    assert trace_id_of([("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01".encode())]) == trace_id
    assert trace_id_of([("other", b"x")]) == ""
    assert trace_id_of([("traceparent", b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01")]) == ""
    assert trace_id_of([("traceparent", b"00-" + b"z" * 32 + b"-00f067aa0ba902b7-01")]) == ""
    assert trace_id_of([("traceparent", b"garbage")]) == ""


# -- one ack producer per process -------------------------------------------------------


async def test_subscribers_of_one_process_share_one_ack_sender_that_flushes_on_release(
    stream: Stream,
) -> None:
    first = AckSender.acquire(stream.bus, TOPICS.acks)
    second = AckSender.acquire(stream.bus, TOPICS.acks)
    assert first is second
    for index in range(25):
        first.put(b"k%d" % index, b"v%d" % index)
    await first.release()
    assert first._users == 1  # still in use by the second
    await second.release()  # the last user: flushed, then stopped
    assert [r.value for r in stream.bus.records(TOPICS.acks)] == [b"v%d" % i for i in range(25)]
    assert first.sent == 25
    assert AckSender.acquire(stream.bus, TOPICS.acks) is not first  # a new one after the stop
    await AckSender.acquire(stream.bus, TOPICS.acks).release()


# -- the protocol -------------------------------------------------------------------------


async def frames_of(data: bytes, limit: int = 1024) -> list[Any]:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    found = []
    while (frame := await read_frame(reader, limit)) is not None:
        found.append(frame)
    return found


async def test_frames_round_trip_and_a_bad_frame_ends_the_connection_with_a_reason() -> None:
    hello = Hello(tenant="t", env="e", instance="i", service="s")
    acks = Acks(((b"k", b"v"),))
    assert await frames_of(encode(hello) + encode(acks)) == [hello, acks]
    with pytest.raises(BusError, match="over the limit of 16"):
        await frames_of(encode(hello), limit=16)
    with pytest.raises(BusError, match="ended inside a frame"):
        await frames_of(encode(hello)[:-3])
    with pytest.raises(BusError, match="not a frame"):
        await frames_of(struct.pack(">I", 3) + b"\xc1\xc1\xc1")


# -- the agent, in process --------------------------------------------------------------


def short_socket(tmp_path: Path) -> Path:
    folder = Path(f"/tmp/cbu-{os.getpid()}-{tmp_path.name[-16:]}")
    folder.mkdir(exist_ok=True)
    return folder / "a.sock"


def agent_settings(stream: Stream, tmp_path: Path, **changes: Any) -> AgentSettings:
    options: dict[str, Any] = {
        "socket": short_socket(tmp_path),
        "kafka": KafkaSettings("unused:9092"),
        "trust": stream.trust,
        "topics": TOPICS,
    }
    return AgentSettings(**(options | changes))


async def say_hello(
    agent: Agent, tenant: str = TENANT, env: str = ENV, instance: str = "probe"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Any]:
    """A raw connection to `agent` that said hello, and the agent's answer."""
    reader, writer = await asyncio.open_unix_connection(str(agent.settings.socket))
    writer.write(encode(Hello(tenant=tenant, env=env, instance=instance, service="s")))
    return reader, writer, await read_frame(reader, 4096)


@pytest.fixture
async def agent(stream: Stream, tmp_path: Path) -> AsyncIterator[Agent]:
    settings = agent_settings(stream, tmp_path, cache_dir=tmp_path / "agent-cache")
    async with Agent(settings, bus=stream.bus) as running:
        yield running


def behind(stream: Stream, agent: Agent, **options: Any) -> ConfigSubscriber:
    settings = SubscriberSettings.build(
        TENANT,
        ENV,
        environ={},
        agent=str(agent.settings.socket),
        trust=stream.trust,
        **{"topic_prefix": TOPICS.prefix, "acks_topic": TOPICS.acks, "instance_id": "i-1"}
        | options,
    )
    assert settings.kafka is None
    return ConfigSubscriber(TENANT, ENV, settings=settings)


async def test_records_pass_through_the_agent_and_each_subscriber_verifies_them(
    stream: Stream, agent: Agent
) -> None:
    await stream.put(stream.event(1, {"size": 1}))
    subs = [behind(stream, agent, instance_id=f"i-{n}") for n in range(3)]
    for sub in subs:
        await sub.start()
    try:
        assert {(s.version, s.source, s.via) for s in subs} == {(1, "agent", "agent")}
        await stream.put(stream.event(2, {"size": 2}, key=stream.stranger))  # a forgery
        await stream.put(stream.event(3, {"size": 3}))
        for sub in subs:
            await sub.wait_for_version(3, timeout=10)
            assert sub.rejected == {"unknown_key": 1}  # the agent passed it on; each refused it

        def acked() -> set[tuple[str, int, str]]:
            return {(a.instance, a.version, a.status) for a in stream.acks()}

        want = {
            (f"i-{n}", v, s)
            for n in range(3)
            for v, s in ((1, "applied"), (0, "rejected"), (3, "applied"))
        }
        await eventually(lambda: acked() >= want, "acks of every instance through the agent")
        applied = {(a.version, a.startup) for a in stream.acks() if a.status == "applied"}
        assert applied == {(1, True), (3, False)}  # v1 at start: no propagation time
        cached = agent.settings.cache_dir / f"{TENANT}.{ENV}.event"  # type: ignore[operator]
        await eventually(cached.exists, "the agent's cache")
    finally:
        for sub in subs:
            await sub.stop()
    assert agent.clients == 0


async def test_the_agent_serves_its_verified_cache_when_kafka_has_nothing(
    stream: Stream, tmp_path: Path
) -> None:
    cache = tmp_path / "agent-cache"
    cache.mkdir()
    (cache / f"{TENANT}.{ENV}.event").write_bytes(stream.event(7, {"size": 7}))
    (cache / f"{TENANT}.staging.event").write_bytes(b"not an event")  # ignored, with a warning
    settings = agent_settings(stream, tmp_path, cache_dir=cache)
    async with Agent(settings, bus=stream.bus) as agent:
        sub = behind(stream, agent)
        await sub.start()
        assert (sub.version, sub.config["size"]) == (7, 7)
        await sub.stop()


async def test_a_subscriber_without_agent_kafka_or_cache_says_why_it_has_no_config(
    stream: Stream, tmp_path: Path
) -> None:
    settings = SubscriberSettings.build(
        TENANT, ENV, environ={}, agent=str(short_socket(tmp_path)), trust=stream.trust,
        start_timeout=0.5,
    )  # fmt: skip
    with pytest.raises(ConfigBusError, match="is unreachable"):
        await ConfigSubscriber(TENANT, ENV, settings=settings).start()
    with pytest.raises(SettingsError, match="no Kafka cluster and no agent"):
        SubscriberSettings.build(TENANT, ENV, environ={}, trust=stream.trust)


def test_the_agent_takes_over_a_leftover_socket_but_not_a_live_one_or_a_file(
    tmp_path: Path,
) -> None:
    path = short_socket(tmp_path)
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(path))
    leftover.close()  # the file stays, nobody listens
    _claim_socket(path)
    assert not path.exists()
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen()
    try:
        with pytest.raises(ConfigBusError, match="another agent is serving"):
            _claim_socket(path)
    finally:
        live.close()
        path.unlink()
    path.write_text("x")
    with pytest.raises(SettingsError, match="not a socket"):
        _claim_socket(path)
    path.unlink()


async def test_a_stream_nobody_follows_and_nothing_holds_is_forgotten(
    stream: Stream, agent: Agent
) -> None:
    _, writer, welcome = await say_hello(agent, env="ghost")
    assert welcome.has_record is False
    assert (TENANT, "ghost") in agent._streams
    writer.write(encode(Acks(((b"k", b"x" * 100_000),))))  # an oversize ack: dropped
    writer.close()
    await eventually(lambda: (TENANT, "ghost") not in agent._streams, "the stream forgotten")
    assert stream.bus.records(TOPICS.acks) == []


async def test_a_stream_whose_topic_comes_later_is_followed_and_caught_up_then(
    stream: Stream, tmp_path: Path
) -> None:
    late = "latecomer"
    settings = agent_settings(stream, tmp_path)
    async with Agent(settings, bus=stream.bus) as agent:
        reader, writer, welcome = await say_hello(agent, tenant=late)
        assert welcome.has_record is False
        stream.bus.create_topic(TOPICS.tenant_topic(late), compact=True)
        body = build_body(
            tenant=late, env=ENV, version=4, config_json=b'{"a":1}', detected_at=now_ns(),
            cause=Cause(actor="test"),
        )  # fmt: skip
        async with stream.bus.producer() as producer:
            await producer.send_and_wait(
                TOPICS.tenant_topic(late), seal(body, stream.key), key=ENV.encode()
            )
        frame = await asyncio.wait_for(read_frame(reader, 1 << 20), 10)  # within a retry
        assert isinstance(frame, Delivery) and claimed_version(frame.value) == 4
        writer.close()


async def test_a_connection_speaks_only_for_its_own_stream_and_instance(
    stream: Stream, agent: Agent
) -> None:
    _, writer, welcome = await say_hello(agent, env="no/such")
    assert welcome is None  # refused: not an environment name
    writer.close()

    def ack(tenant: str, instance: str) -> tuple[bytes, bytes]:
        value = msgspec.msgpack.encode(
            Ack(tenant=tenant, env=ENV, version=1, instance=instance, service="s", status="applied")
        )
        return f"{tenant}/{ENV}/{instance}/applied".encode(), value

    _, writer, _ = await say_hello(agent, instance="mine")
    forged = [ack("bank", "mine"), ack(TENANT, "theirs"), (b"k", b"not an ack")]
    writer.write(encode(Acks((*forged, ack(TENANT, "mine")))))
    await eventually(lambda: stream.acks(), "the one genuine ack")
    assert [(a.tenant, a.instance) for a in stream.acks()] == [(TENANT, "mine")]
    writer.close()


async def test_without_a_tracer_provider_no_span_is_made_and_acks_carry_the_record_trace(
    stream: Stream, monkeypatch: pytest.MonkeyPatch
) -> None:
    import configbus.subscriber.core as core

    assert not core.tracing()  # the unit tests install no provider

    def no_spans(*args: object, **kwargs: object) -> None:
        raise AssertionError("a span was started without a tracer provider")

    monkeypatch.setattr(core.tracer, "start_span", no_spans)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = (("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01".encode()),)
    async with stream.bus.producer() as producer:
        await producer.send_and_wait(
            TOPICS.tenant_topic(TENANT), stream.event(1, {"a": 1}), key=ENV.encode(),
            headers=headers,
        )  # fmt: skip
    sub = stream.subscriber()
    await sub.start()
    try:
        assert (sub.version, sub.trace_id) == (1, trace_id)
        await eventually(lambda: stream.acks(), "the ack")
        assert [a.trace_id for a in stream.acks()] == [trace_id]
    finally:
        await sub.stop()


async def test_a_failed_catch_up_is_tried_again(stream: Stream, agent: Agent) -> None:
    await stream.put(stream.event(3, {"size": 3}))
    stream.bus.fail_next("connect")  # the catch-up's own reader, once
    sub = behind(stream, agent)
    await sub.start()
    try:
        assert sub.version == 3
    finally:
        await sub.stop()


async def test_a_service_that_stops_reading_is_disconnected(
    stream: Stream, agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    import secrets

    import configbus.agent.server as server

    monkeypatch.setattr(server, "CLIENT_BUFFER_BYTES", 1)
    await stream.put(stream.event(1, {"size": 1}))
    _, writer, _ = await say_hello(agent, instance="slow")
    await eventually(lambda: agent.clients == 1, "the connection")
    await eventually(lambda: agent._streams[(TENANT, ENV)].caught_up, "the live reading")
    for version in range(2, 12):  # ~150 KB each, more than the socket holds, never read
        await stream.put(stream.event(version, {"blob": secrets.token_hex(150_000)}))
    await eventually(lambda: agent.clients == 0, "the slow service dropped")
    writer.close()
    await writer.wait_closed()


async def test_what_is_no_hello_ends_the_connection(agent: Agent) -> None:
    reader, writer = await asyncio.open_unix_connection(str(agent.settings.socket))
    writer.write(encode(Acks(())))  # speaks before saying hello
    assert await read_frame(reader, 4096) is None
    writer.close()


def test_agent_settings_refuse_a_socket_path_too_long(stream: Stream) -> None:
    with pytest.raises(SettingsError, match="too long for a Unix socket"):
        AgentSettings(
            socket=Path("/tmp/" + "x" * 120), kafka=KafkaSettings("x:1"), trust=stream.trust
        )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bootstrap-servers", "x:1"], "give --socket or set CONFIGBUS_AGENT"),
        (["--bootstrap-servers", "x:1", "--socket", "/tmp/a.sock"], "give --trust"),
        (["--socket", "/tmp/a.sock"], "give --bootstrap-servers"),
    ],
)
def test_configbus_agent_says_what_it_lacks(
    args: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from configbus.cli import main

    for name in ("CONFIGBUS_AGENT", "CONFIGBUS_TRUST", "CONFIGBUS_BOOTSTRAP_SERVERS"):
        monkeypatch.delenv(name, raising=False)
    assert main(["agent", *args]) == 2
    assert message in capsys.readouterr().err


async def test_an_oversized_record_that_does_not_verify_goes_no_further_than_the_agent(
    stream: Stream, tmp_path: Path
) -> None:
    settings = agent_settings(stream, tmp_path, limits=Limits(event_bytes=64 * 1024))
    async with Agent(settings, bus=stream.bus) as agent:
        await stream.put(stream.event(1, {"size": 1}))
        sub = behind(stream, agent)
        await sub.start()
        try:
            link = sub._link
            await stream.put(b"\x00" * 100_000)  # over what the agent's services take
            await stream.put(stream.event(2, {"size": 2}))
            await sub.wait_for_version(2, timeout=10)
            assert sub._link is link  # the same connection: nothing ended it
            assert sub.rejected == {}  # the oversized record never reached the service
        finally:
            await sub.stop()
