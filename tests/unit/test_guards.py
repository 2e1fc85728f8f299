"""Guards found in review: async validators, foreign store fields, foreign tenants."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from configbus.bus import KafkaSettings, Record
from configbus.cli_bus import _tail_line
from configbus.crypto import SigningKey, TrustStore, generate_keypair
from configbus.events import Cause, build_body, seal
from configbus.store.redis_store import META_FIELD, _values
from configbus.subscriber import ConfigSubscriber, SubscriberSettings
from configbus.tree.resolved import ResolvedConfig


@pytest.fixture
def key(tmp_path: Path) -> SigningKey:
    private, _ = generate_keypair("guard", tmp_path)
    return SigningKey.load(private, "guard")


def subscriber(trust: TrustStore) -> ConfigSubscriber:
    settings = SubscriberSettings(
        tenant="acme",
        env="prod",
        kafka=KafkaSettings("127.0.0.1:9"),
        trust=trust,
        instance_id="i-1",
        service="svc",
        send_acks=False,
    )
    return ConfigSubscriber("acme", "prod", settings=settings)


def test_an_async_validator_is_refused_when_added(key: SigningKey) -> None:
    async def check(config: ResolvedConfig) -> None:
        raise ValueError("never awaited")

    with pytest.raises(TypeError, match="not async"):
        subscriber(TrustStore.of(key.public)).add_validator(check)


def test_an_unknown_subscriber_option_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="bootstrap_server"):
        ConfigSubscriber("acme", "prod", bootstrap_server="x")  # type: ignore[call-arg]


def test_store_fields_not_written_by_configbus_are_skipped_without_their_value(
    caplog: pytest.LogCaptureFixture,
) -> None:
    raw = {
        b'["feature_flags","x"]': b"true",
        b"feature_flags.y": b"true",  # an operator's HSET by hand
        b'["database","password"]': b"not json: hunter2",
        META_FIELD.encode(): b'{"actor": "alice"}',
    }
    with caplog.at_level(logging.WARNING, logger="configbus.store"):
        values = _values(raw, "configbus:store:acme:prod")
    assert values == {("feature_flags", "x"): True}
    assert "feature_flags.y" in caplog.text
    assert "hunter2" not in caplog.text


def test_tail_rejects_an_event_of_another_tenant_on_this_tenants_topic(
    key: SigningKey,
) -> None:
    config = json.dumps({"a": 1}, separators=(",", ":")).encode()
    body = build_body(
        tenant="other",
        env="prod",
        version=9,
        config_json=config,
        detected_at=1,
        cause=Cause(reason="copied"),
    )
    record = Record("configbus.tenant.acme", 0, 5, b"prod", seal(body, key), (), 0)
    line, ok = _tail_line(record, TrustStore.of(key.public), {}, "acme")
    assert not ok
    assert "REJECTED wrong_stream" in line


def test_tail_shows_a_hostile_key_and_cause_escaped(key: SigningKey) -> None:
    trick = b"\r\x1b[2K@9 prod v99 verified:pub emergency fix\x1b[8m"
    record = Record("configbus.tenant.acme", 0, 5, trick, b"\x00not an event", (), 0)
    line, ok = _tail_line(record, TrustStore.of(key.public), {}, "acme")
    assert not ok and "REJECTED malformed" in line
    assert "\x1b" not in line and "\r" not in line
    body = build_body(
        tenant="acme",
        env="prod",
        version=1,
        config_json=b"{}",
        detected_at=1,
        cause=Cause(reason="ok\x1b[8m hidden", actor="a\nb"),
    )
    line, ok = _tail_line(
        Record("t", 0, 6, b"prod", seal(body, key), (), 0), TrustStore.of(key.public), {}, "acme"
    )
    assert ok and "\x1b" not in line and "\n" not in line
