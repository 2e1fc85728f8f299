"""History and diff of a stream from the audit topic, on the in-memory bus: verified
versions only (a forgery is counted, not listed), each once, oldest first, with the
signed cause; diff at the level of values, secrets redacted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from configbus.bus import TopicNames
from configbus.bus.memory import MemoryBus
from configbus.crypto import SigningKey, TrustStore, generate_keypair
from configbus.errors import UnknownNameError
from configbus.events import Cause, build_body, now_ns, seal
from configbus.ops import diff, stream_history

TOPICS = TopicNames(prefix="t.", audit="audit", acks="acks", state="state")
TENANT, ENV = "acme", "prod"


class Audit:
    def __init__(self, tmp_path: Path) -> None:
        self.key = SigningKey.load(generate_keypair("pub", tmp_path / "k")[0], "pub")
        self.stranger = SigningKey.load(generate_keypair("eve", tmp_path / "e")[0], "eve")
        self.trust = TrustStore.of(self.key.public)
        self.bus = MemoryBus()
        self.bus.create_topic(TOPICS.audit, compact=False)

    async def publish(
        self, version: int, config: dict[str, Any], *, env: str = ENV,
        key: SigningKey | None = None, actor: str = "alice", reason: str = "",
    ) -> None:  # fmt: skip
        body = build_body(
            tenant=TENANT, env=env, version=version,
            config_json=json.dumps(config, sort_keys=True, separators=(",", ":")).encode(),
            detected_at=now_ns(), cause=Cause(actor=actor, reason=reason, sources=("a.yml",)),
            changed_paths=("pool.max",),
        )  # fmt: skip
        async with self.bus.producer() as producer:
            await producer.send_and_wait(
                TOPICS.audit, seal(body, key or self.key), key=TOPICS.audit_key(TENANT, env)
            )


@pytest.fixture
def audit(tmp_path: Path) -> Audit:
    return Audit(tmp_path)


V1 = {"pool": {"max": 10, "min": 1}, "db": {"password": {"$secret": "db/pw"}}, "old": True}
V2 = {"pool": {"max": 20, "min": 1}, "db": {"password": {"$secret": "db/pw2"}}, "new": [1, 2]}


async def test_history_lists_each_verified_version_once_with_its_signed_cause(
    audit: Audit,
) -> None:
    await audit.publish(1, V1, reason="start")
    await audit.publish(2, V2, actor="bob", reason="bigger pool")
    await audit.publish(2, V2, actor="bob", reason="bigger pool")  # re-read after a retry
    await audit.publish(3, V2, key=audit.stranger, actor="mallory")  # a forgery
    await audit.publish(9, V2, env="staging")  # another stream
    history = await stream_history(audit.bus, TOPICS, TENANT, ENV, audit.trust)
    assert [(e.version, e.actor, e.reason) for e in history.versions] == [
        (1, "alice", "start"),
        (2, "bob", "bigger pool"),
    ]
    assert history.unverified == 1
    assert history.latest is not None and history.latest.version == 2
    assert history.versions[1].as_dict()["sources"] == ["a.yml"]
    with pytest.raises(UnknownNameError, match=r"no version 5 in the audit topic \(latest: 1, 2\)"):
        history.get(5)


async def test_diff_shows_values_added_removed_and_changed_with_secrets_redacted(
    audit: Audit,
) -> None:
    await audit.publish(1, V1)
    await audit.publish(2, V2)
    history = await stream_history(audit.bus, TOPICS, TENANT, ENV, audit.trust)
    changes = {c.path: c.as_dict() for c in diff(history.get(1), history.get(2))}
    assert changes == {
        "db.password": {"path": "db.password", "old": "<secret:db/pw>", "new": "<secret:db/pw2>"},
        "new": {"path": "new", "new": [1, 2]},
        "old": {"path": "old", "old": True},
        "pool.max": {"path": "pool.max", "old": 10, "new": 20},
    }
    assert diff(history.get(2), history.get(2)) == []
