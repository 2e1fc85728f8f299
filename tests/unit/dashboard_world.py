"""A world for the dashboard's unit tests: topics on a MemoryBus, a publisher key and an
operator key in a trust file, and writers of what the publisher, operators and
instances put on Kafka (events on the tenant and audit topics, acks, heartbeats), so
a test can feed a `Model` through the real `Feed`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from configbus.bus import CANDIDATE_CHANNEL, OVERRIDE_CHANNEL, PRESENCE_CHANNEL, TopicNames
from configbus.bus.memory import MemoryBus
from configbus.crypto import OPERATOR, SigningKey, TrustedKey, TrustStore, generate_keypair
from configbus.dashboard import Caps, Feed, Model
from configbus.events import Ack, Cause, EventKind, RolloutTag, build_body, now_ns, seal
from configbus.ops.overrides import OverrideEntry, encode_set

TENANT, ENV = "acme", "prod"
TOPICS = TopicNames(prefix="t.", audit="audit", acks="acks", state="state")
SECOND = 10**9
MS = 10**6
SECRET = "hunter2-never-shown"  # in every config published: must never reach the state


class World:
    """The topics of tenants `acme` (and `other`) on a MemoryBus, a model and its feed."""

    def __init__(self, tmp_path: Path, caps: Caps | None = None, **feed: Any) -> None:
        def key(kid: str) -> SigningKey:
            return SigningKey.load(generate_keypair(kid, tmp_path / "keys")[0], kid)

        self.publisher, self.alice, self.mallory = key("pub"), key("alice"), key("mallory")
        everything = frozenset({"*"})
        self.trust = TrustStore(
            [
                TrustedKey(self.publisher.public, everything, everything),
                TrustedKey(
                    self.alice.public, frozenset({TENANT}), everything, OPERATOR, max_ttl=3600
                ),
            ]
        )
        self.bus = MemoryBus()
        for tenant in (TENANT, "other"):
            self.bus.create_topic(TOPICS.tenant_topic(tenant), compact=True)
        self.bus.create_topic(TOPICS.audit)
        self.bus.create_topic(TOPICS.acks, compact=True)
        self.model = Model(caps)
        self.feed = Feed(self.bus, TOPICS, self.trust, self.model, **feed)
        self._fed: dict[str, int] = {}

    # -- what the publisher and operators write ----------------------------------------
    async def publish(
        self,
        version: int,
        *,
        tenant: str = TENANT,
        env: str = ENV,
        actor: str = "alice@example.com",
        reason: str = "raise the pool",
        paths: tuple[str, ...] = ("database.pool.max",),
        detected_at: int | None = None,
        key: SigningKey | None = None,
        kind: EventKind = EventKind.SNAPSHOT,
        audit: bool = True,
    ) -> None:
        """Version `version` of the stream's snapshot, on its tenant topic and (unless
        not `audit`) the audit topic, as the daemon writes it."""
        config = {"database": {"pool": {"max": version}, "password": SECRET}}
        body = build_body(
            tenant=tenant,
            env=env,
            version=version,
            config_json=json.dumps(config, sort_keys=True, separators=(",", ":")).encode(),
            kind=kind,
            detected_at=detected_at or now_ns(),
            cause=Cause(actor=actor, reason=reason, sources=("tenants/acme/prod.yml",)),
            changed_paths=paths,
        )
        value = seal(body, key or self.publisher)
        await self._send(TOPICS.tenant_topic(tenant), env.encode(), value)
        if audit:
            await self._send(TOPICS.audit, TOPICS.audit_key(tenant, env), value)

    async def override(
        self,
        version: int,
        entries: dict[str, Any],
        *,
        ttl_s: float = 600,
        actor: str = "alice",
        reason: str = "INC-4711",
        key: SigningKey | None = None,
    ) -> int:
        """An override set of `entries` (path: value) for acme/prod, as `override set`
        writes it; returns when the entries expire (ns)."""
        now = now_ns()
        expires = now + int(ttl_s * SECOND)
        items = [
            OverrideEntry(
                path=path, value=value, set_at=now, expires_at=expires, actor=actor, reason=reason
            )
            for path, value in entries.items()
        ]
        body = build_body(
            tenant=TENANT,
            env=ENV,
            version=version,
            config_json=encode_set(items),
            kind=EventKind.OVERRIDE,
            detected_at=now,
            issued_at=now,
            cause=Cause(actor=actor, reason=reason),
            changed_paths=tuple(entries),
            expires_at=expires,
        )
        value = seal(body, key or self.alice)
        await self._send(TOPICS.tenant_topic(TENANT), f"{ENV}/{OVERRIDE_CHANNEL}".encode(), value)
        await self._send(TOPICS.audit, TOPICS.audit_key(TENANT, ENV), value)
        return expires

    async def candidate(self, version: int, tag: RolloutTag, *, issued_at: int = 0) -> None:
        """A staged rollout's candidate record of acme/prod."""
        body = build_body(
            tenant=TENANT,
            env=ENV,
            version=version,
            config_json=b'{"candidate":true}',
            kind=EventKind.CANDIDATE,
            detected_at=now_ns(),
            issued_at=issued_at or now_ns(),
            cause=Cause(actor="publisher", reason="staged"),
            rollout=tag,
        )
        value = seal(body, self.publisher)
        await self._send(TOPICS.tenant_topic(TENANT), f"{ENV}/{CANDIDATE_CHANNEL}".encode(), value)

    # -- what instances write -----------------------------------------------------------
    async def ack(
        self,
        instance: str,
        version: int,
        *,
        status: str = "applied",
        latency_ms: float | None = None,
        tenant: str = TENANT,
        env: str = ENV,
        reason: str = "",
        channel: str = "snapshot",
        startup: bool = False,
    ) -> None:
        now = now_ns()
        detected = now - int((latency_ms or 0) * MS) if latency_ms is not None else 0
        ack = Ack(
            tenant=tenant,
            env=env,
            version=version,
            instance=instance,
            service="svc",
            status=status,
            reason=reason,
            detected_at=detected,
            applied_at=now if status != "rejected" else 0,
            received_at=now,
            startup=startup,
            channel=channel,
        )
        await self.raw_ack(ack)

    async def heartbeat(
        self, instance: str, version: int, *, beat_ms: int = 1000, healthy: bool = True
    ) -> None:
        now = now_ns()
        ack = Ack(
            tenant=TENANT,
            env=ENV,
            version=version,
            instance=instance,
            service="svc",
            status="heartbeat",
            channel=PRESENCE_CHANNEL,
            received_at=now,
            applied_at=now,
            heartbeat_ms=beat_ms,
            healthy=healthy,
            health_note="" if healthy else "db check failed",
        )
        await self.raw_ack(ack)

    async def raw_ack(self, ack: Ack, key: bytes | None = None) -> None:
        import msgspec

        await self._send(TOPICS.acks, key or ack.key, msgspec.msgpack.encode(ack))

    async def raw(self, topic: str, key: bytes | None, value: bytes) -> None:
        await self._send(topic, key, value)

    async def _send(self, topic: str, key: bytes | None, value: bytes) -> None:
        async with self.bus.producer() as producer:
            await producer.send_and_wait(topic, value, key=key)

    # -- the feed ------------------------------------------------------------------------
    def drain(self) -> None:
        """Every record written since the last call into the model, through the feed
        (as its consumers would hand them over: topic by topic)."""
        topics = [TOPICS.tenant_topic(TENANT), TOPICS.tenant_topic("other"), TOPICS.audit]
        for topic in [*topics, TOPICS.acks]:
            records = self.bus.records(topic)
            for record in records[self._fed.get(topic, 0) :]:
                self.feed.take(record)
            self._fed[topic] = len(records)

    def replay(self) -> None:
        """Every record again from the start, through a new feed (a dashboard whose
        consumers lost their place): the model takes what it already has."""
        self.feed = Feed(self.bus, TOPICS, self.trust, self.model)
        self._fed.clear()
        self.drain()

    def row(self, tenant: str = TENANT, env: str = ENV, now: int | None = None) -> dict[str, Any]:
        rows = self.model.rows(now or now_ns())
        return rows[f"{tenant}/{env}"]
