"""The subscriber under hostile records, on the in-memory bus: every record ends applied
or rejected with a reason (logged, counted, acknowledged), the follow loop outlives
anything but cancellation, start-up takes the highest version that verifies, and no
record can make it inflate or recurse without bound."""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from configbus.bus import TopicNames
from configbus.bus.memory import MemoryBus, _batch_size
from configbus.crypto import SigningKey, TrustStore, generate_keypair
from configbus.crypto.trust import TrustedKey
from configbus.errors import AuthorizationError, NoConfigError, VerificationError
from configbus.events import Ack, Cause, EventBody, build_body, now_ns, open_envelope, seal
from configbus.limits import LimitError, Limits
from configbus.subscriber import ConfigSubscriber
from configbus.tree.resolved import ResolvedConfig

from .helpers import OnMemoryBus, eventually

TENANT, ENV = "acme", "prod"
TOPICS = TopicNames(prefix="t.", audit="audit", acks="acks", state="state")
TOPIC = TOPICS.tenant_topic(TENANT)


class Stream(OnMemoryBus):
    """One tenant topic on a MemoryBus, a publisher key, and a second key the trust file
    does not know."""

    tenant, env, topics = TENANT, ENV, TOPICS

    def __init__(self, tmp_path: Path) -> None:
        self.key = SigningKey.load(generate_keypair("pub", tmp_path / "keys")[0], "pub")
        self.stranger = SigningKey.load(generate_keypair("mallory", tmp_path / "m")[0], "mallory")
        self.trust = TrustStore.of(self.key.public)
        self.bus = MemoryBus()
        self.bus.create_topic(TOPIC, compact=True)
        self.bus.create_topic(TOPICS.acks, compact=True)

    def event(
        self, version: int, config: object, *, key: SigningKey | None = None, env: str = ENV
    ) -> bytes:
        """A signed event carrying `config` (bytes: JSON text as it is)."""
        text = config if isinstance(config, bytes) else json.dumps(config, sort_keys=True)
        body = build_body(
            tenant=TENANT,
            env=env,
            version=version,
            config_json=text if isinstance(text, bytes) else text.encode(),
            detected_at=now_ns(),
            cause=Cause(actor="test"),
        )
        return seal(body, key or self.key)

    async def put(self, value: bytes, *, key: bytes = ENV.encode()) -> None:
        async with self.bus.producer() as producer:
            await producer.send_and_wait(TOPIC, value, key=key)


@pytest.fixture
def stream(tmp_path: Path) -> Stream:
    return Stream(tmp_path)


@pytest.fixture
async def running(stream: Stream) -> AsyncIterator[ConfigSubscriber]:
    await stream.put(stream.event(1, {"size": 1}))
    subscriber = stream.subscriber()
    await subscriber.start()
    yield subscriber
    await subscriber.stop()


def nested(depth: int) -> bytes:
    """JSON text of an object nested `depth` levels deep."""
    return b'{"a":' * depth + b"1" + b"}" * depth


# -- verification order and bounds ----------------------------------------------------


def test_a_record_for_another_stream_is_refused_before_its_config_is_inflated(
    stream: Stream, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = stream.event(1, {"big": "x" * 5000}, env="staging")

    def inflate(*args: object) -> object:
        raise AssertionError("inflated a record for another stream")

    monkeypatch.setattr(zlib, "decompressobj", inflate)
    with pytest.raises(VerificationError) as refused:
        open_envelope(other, stream.trust, stream=(TENANT, ENV))
    assert refused.value.reason == "wrong_stream"


def test_inflating_stops_at_the_limit_whatever_the_record_claims(stream: Stream) -> None:
    bomb = zlib.compress(b"0" * (8 * 1024 * 1024), 9)  # 8 MiB of zeros in ~8 KiB
    assert len(bomb) < 64 * 1024
    body = build_body(
        tenant=TENANT, env=ENV, version=1, config_json=b"{}", detected_at=0, cause=Cause()
    )
    value = seal(
        msgspec.structs.replace(body, config=bomb, config_encoding="json+zlib"), stream.key
    )
    with pytest.raises(VerificationError) as refused:
        open_envelope(value, stream.trust, stream=(TENANT, ENV))
    assert refused.value.reason == "too_large"
    assert "config_bytes" in str(refused.value)
    small = Limits(config_bytes=1000)
    config = json.dumps({"k": "v" * 2000}).encode()
    big = seal(
        build_body(
            tenant=TENANT, env=ENV, version=1, config_json=config, detected_at=0, cause=Cause()
        ),
        stream.key,
    )
    with pytest.raises(VerificationError, match="limit config_bytes"):
        open_envelope(big, stream.trust, limits=small)


def test_truncated_compressed_config_is_malformed(stream: Stream) -> None:
    body = build_body(
        tenant=TENANT,
        env=ENV,
        version=1,
        config_json=json.dumps({"k": "v" * 40_000}).encode(),
        detected_at=0,
        cause=Cause(),
    )
    cut: EventBody = msgspec.structs.replace(body, config=body.config[:-8])
    with pytest.raises(VerificationError) as refused:
        open_envelope(seal(cut, stream.key), stream.trust)
    assert refused.value.reason == "malformed"


@pytest.mark.parametrize("version", [0, -1])
def test_a_version_out_of_range_is_malformed(stream: Stream, version: int) -> None:
    body = build_body(
        tenant=TENANT, env=ENV, version=1, config_json=b"{}", detected_at=0, cause=Cause()
    )
    value = seal(msgspec.structs.replace(body, version=version), stream.key)
    with pytest.raises(VerificationError) as refused:
        open_envelope(value, stream.trust)
    assert refused.value.reason == "malformed"


# -- every record ends applied or rejected --------------------------------------------


@pytest.mark.parametrize("depth", [40, 500, 5000])
async def test_a_deeply_nested_signed_config_is_rejected_and_the_next_applies(
    stream: Stream, running: ConfigSubscriber, depth: int
) -> None:
    await stream.put(stream.event(2, nested(depth)))
    await eventually(lambda: running.rejected.get("too_large"), "the deep config's rejection")
    assert running.version == 1 and running.config.get("size") == 1
    await stream.put(stream.event(3, {"size": 3}))
    assert await running.wait_for_version(3, timeout=5) == 3
    assert running.config.get("size") == 3
    rejected = await eventually(
        lambda: [a for a in stream.acks() if a.status == "rejected"], "the rejection's ack"
    )
    assert rejected[0].version == 2
    assert rejected[0].reason.startswith("too_large") and "nested" in rejected[0].reason


async def test_an_unexpected_error_on_a_record_rejects_it_and_the_loop_goes_on(
    stream: Stream, running: ConfigSubscriber, monkeypatch: pytest.MonkeyPatch
) -> None:
    import configbus.subscriber.core as core

    real = core.view_json

    def broken(value: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(value, dict) and value.get("boom"):
            raise ValueError("a bug")
        return real(value, *args, **kwargs)

    monkeypatch.setattr(core, "view_json", broken)
    await stream.put(stream.event(2, {"boom": True}))
    await eventually(lambda: running.rejected.get("internal_error"), "the rejection")
    await stream.put(stream.event(3, {"size": 3}))
    assert await running.wait_for_version(3, timeout=5) == 3
    assert running._task is not None and not running._task.done()


async def test_the_follow_loop_restarts_after_anything_and_stop_completes(
    stream: Stream, running: ConfigSubscriber, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    real = running._handle

    async def failing(*args: Any, **kwargs: Any) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("not a VerificationError, not a BusError")
        return await real(*args, **kwargs)

    monkeypatch.setattr(running, "_handle", failing)
    await stream.put(stream.event(2, {"size": 2}))
    # The loop died on the first try, restarted, and re-read the stream from its start.
    assert await running.wait_for_version(2, timeout=5) == 2
    assert calls >= 2
    await running.stop()
    await running.stop()


# -- start-up --------------------------------------------------------------------------


async def test_start_takes_the_highest_version_that_verifies(stream: Stream) -> None:
    first = stream.event(1, {"size": 1})
    for version in (1, 2, 3):
        await stream.put(stream.event(version, {"size": version}) if version > 1 else first)
    await stream.put(first)  # an old event replayed at the end of the topic
    await stream.put(stream.event(2**62, {"size": 666}, key=stream.stranger))
    await stream.put(b"\x00garbage")
    await stream.put(stream.event(9, {"size": 9}, env="staging"), key=b"other")
    async with stream.subscriber() as subscriber:
        assert subscriber.version == 3
        assert subscriber.config.get("size") == 3
        assert subscriber.rejected == {"unknown_key": 1}  # tried first: it claims the most


async def test_start_without_a_good_record_says_what_it_rejected(stream: Stream) -> None:
    await stream.put(stream.event(5, {"size": 5}, key=stream.stranger))
    await stream.put(stream.event(6, {"size": 6}, key=stream.stranger))
    await stream.put(b"\x00garbage")
    subscriber = stream.subscriber(start_timeout=0.5)
    with pytest.raises(NoConfigError) as failed:
        await subscriber.start()
    message = str(failed.value)
    assert "3 record(s) of the stream rejected" in message
    assert "unknown_key (2)" in message and "malformed (1)" in message
    assert "Kafka" not in message


async def test_start_on_a_missing_topic_blames_kafka_with_the_reason(tmp_path: Path) -> None:
    stream = Stream(tmp_path)
    admin = await stream.bus.admin().start()
    await admin.delete_topics([TOPIC])
    subscriber = stream.subscriber(start_timeout=0.3)
    with pytest.raises(NoConfigError, match=r"Kafka: topic t\.acme does not exist yet"):
        await subscriber.start()


async def test_a_key_scoped_to_another_tenant_cannot_feed_this_one(tmp_path: Path) -> None:
    stream = Stream(tmp_path)
    everything = frozenset({"*"})
    stream.trust = TrustStore(
        [
            TrustedKey(stream.key.public, everything, everything),
            TrustedKey(stream.stranger.public, frozenset({"other"}), everything),
        ]
    )
    await stream.put(stream.event(1, {"size": 1}))
    await stream.put(stream.event(7, {"size": 7}, key=stream.stranger))
    async with stream.subscriber() as subscriber:
        assert subscriber.version == 1
        assert subscriber.rejected == {"untrusted_scope": 1}


def test_the_bounded_freeze_equals_the_plain_one_within_the_limits() -> None:
    from configbus.tree.values import freeze, freeze_json

    sample = json.loads((Path(__file__).parents[2] / "environments/schema.json").read_text())
    assert freeze_json(sample) == freeze(sample)
    assert freeze_json({"db": {"$secret": "db/pw"}}) == freeze({"db": {"$secret": "db/pw"}})
    at_limit = json.loads(nested(32))  # 32 objects, one in the other: 32 levels
    assert freeze_json(at_limit) == freeze(at_limit)
    with pytest.raises(LimitError, match="deeper than 32 levels"):
        freeze_json(json.loads(nested(33)))
    with pytest.raises(LimitError, match="field x holds more than 10 values"):
        freeze_json({"k": list(range(10))}, Limits(nodes=10), what="field x")


def unsigned_nested(depth: int) -> bytes:
    """An envelope-shaped record (no valid signature) with one extra key holding
    arrays nested `depth` deep: msgspec gives up with RecursionError."""
    nested_array = b"\x91" * depth + b"\xc0"  # fixarray of 1, `depth` times, then nil
    head = msgspec.msgpack.encode({"v": 1, "kid": "pub", "sig": b"\0" * 64, "body": b"x"})
    return bytes([head[0] + 1]) + head[1:] + msgspec.msgpack.encode("pad") + nested_array


async def test_a_record_nested_past_the_interpreters_limit_is_malformed(
    stream: Stream,
) -> None:
    value = unsigned_nested(5000)
    with pytest.raises(VerificationError) as refused:
        open_envelope(value, stream.trust, stream=(TENANT, ENV))
    assert refused.value.reason == "malformed"
    for version in (1, 2):
        await stream.put(stream.event(version, {"size": version}))
    await stream.put(value)
    await stream.put(stream.event(3, {"size": 3}))
    async with stream.subscriber(start_timeout=5) as subscriber:
        assert subscriber.version == 3


async def test_a_refused_ack_does_not_silence_the_later_ones(tmp_path: Path) -> None:
    """The acks topic takes an applied ack but not a rejection with a long reason: the
    rejection's ack is refused, and the producer, made again, delivers the next ones
    (a refused record leaves a producer unable to send more until then)."""
    stream = Stream(tmp_path)
    reason = "no " * 66  # the validator's words: ~200 characters in the ack
    applied = Ack(
        tenant=TENANT,
        env=ENV,
        version=9,
        instance="i-1",
        service="s",
        status="applied",
        config_hash="0" * 64,
        trace_id="0" * 32,
        detected_at=1,
        issued_at=1,
        received_at=1,
        applied_at=1,
    )
    refused = msgspec.structs.replace(applied, status="rejected", reason="refused: no: " + reason)
    sizes = [_batch_size(b"k" * 40, msgspec.msgpack.encode(a), ()) for a in (applied, refused)]
    assert sizes[0] < sizes[1]
    stream.bus.create_topic("acks-small", compact=True, max_message_bytes=sum(sizes) // 2)
    await stream.put(stream.event(1, {"size": 1}))
    subscriber = stream.subscriber(acks_topic="acks-small")

    def refuse_two(config: ResolvedConfig) -> None:
        if config.get("size") == 2:
            raise ValueError(reason)

    def acks() -> list[Ack]:
        records = stream.bus.records("acks-small")
        return [msgspec.msgpack.decode(r.value or b"", type=Ack) for r in records]

    async with subscriber:
        subscriber.add_validator(refuse_two)
        await stream.put(stream.event(2, {"size": 2}))
        await eventually(lambda: subscriber.rejected.get("refused"), "v2's refusal")
        await stream.put(stream.event(3, {"size": 3}))
        await subscriber.wait_for_version(3, timeout=5)
        got = await eventually(lambda: [a for a in acks() if a.version == 3], "v3's ack")
        assert got[0].status == "applied"
    assert not [a for a in acks() if a.status == "rejected"]  # that one was refused


def _refused_reads(stream: Stream, monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on Kafka refuses this principal the tenant topic, as its ACLs would."""
    real = stream.bus.reader

    def reader(topic: str, **options: Any) -> Any:
        opened = real(topic, **options)

        async def start() -> bool:
            raise AuthorizationError(f"connecting to {topic}: not authorized")

        opened.start = start
        return opened

    monkeypatch.setattr(stream.bus, "reader", reader)


async def test_start_refused_by_kafka_fails_at_once_naming_the_refusal(
    stream: Stream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No retry brings credentials or an ACL: start() says so now, not at its timeout."""
    await stream.put(stream.event(1, {"size": 1}))
    _refused_reads(stream, monkeypatch)
    subscriber = stream.subscriber(start_timeout=300)
    async with asyncio.timeout(30):
        with pytest.raises(NoConfigError) as failed:
            await subscriber.start()
    assert str(failed.value) == (
        f"no config for {TENANT}/{ENV} refused and no disk cache: "
        f"Kafka: connecting to {TOPIC}: not authorized"
    )


async def test_start_refused_by_kafka_runs_on_the_disk_cache(
    stream: Stream, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    await stream.put(stream.event(1, {"size": 1}))
    first = stream.subscriber(cache_dir=tmp_path / "cache")
    await first.start()
    await first.stop()
    _refused_reads(stream, monkeypatch)
    subscriber = stream.subscriber(cache_dir=tmp_path / "cache", start_timeout=300)
    async with asyncio.timeout(30):
        await subscriber.start()
    try:
        assert subscriber.version == 1 and subscriber.config["size"] == 1
    finally:
        await subscriber.stop()
