"""Publication: resolve streams, and publish the ones whose config changed.

`Publisher` holds what Kafka last has for every stream (version and hash, recovered
from the tenant topics at start) and turns a set of streams into signed events:

1. resolve each stream (files plus its Redis store layer) and validate it; a stream
   that fails is logged with every problem and keeps its last published version;
2. skip streams whose config hash equals the last published one;
3. give the rest version + 1, build, sign and send their events to the tenant topic
   and to the audit topic in one Kafka transaction per batch;
4. after the commit, remember the new versions and cache the events in Redis.

A failed batch changes nothing here, so the same streams can simply be tried again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import msgspec
from opentelemetry import trace
from opentelemetry.trace import StatusCode

from configbus.bus import CONTENT_TYPE, Admin, Producer, TopicNames, read_to_end
from configbus.bus.kafka import KafkaSettings
from configbus.crypto import SigningKey
from configbus.errors import BusError, TreeError, VerificationError
from configbus.events import (
    Cause,
    Envelope,
    EventBody,
    EventKind,
    build_body,
    config_json_of,
    now_ns,
    seal,
)
from configbus.store import TenantStore
from configbus.telemetry import headers_with_context, tracer
from configbus.tree import EnvironmentTree, ResolvedConfig
from configbus.tree.diff import changed_paths
from configbus.tree.layer import Layer
from configbus.tree.values import Value, freeze

__all__ = ["Change", "PublishReport", "Publisher", "StreamState", "recover_states"]

log = logging.getLogger(__name__)

Stream = tuple[str, str]  # (tenant, env)


@dataclass(slots=True)
class StreamState:
    """What Kafka holds for a stream: its last version and config hash, and the config
    itself (as resolved data once known, else the event's JSON, decoded on demand)."""

    version: int
    config_hash: str
    data: Mapping[str, Value] | None = None
    config_json: bytes | None = None

    def config(self) -> Mapping[str, Value] | None:
        if self.data is None and self.config_json is not None:
            decoded = freeze(msgspec.json.decode(self.config_json))
            self.data = decoded if isinstance(decoded, Mapping) else None
            self.config_json = None
        return self.data


@dataclass(frozen=True, slots=True)
class Change:
    """Why streams are being looked at: when the change was first seen, and its cause."""

    detected_at: int
    cause: Cause


@dataclass(frozen=True, slots=True)
class _Prepared:
    stream: Stream
    version: int
    detected_at: int
    config: ResolvedConfig
    value: bytes  # the signed record value


@dataclass(slots=True)
class PublishReport:
    checked: int = 0
    published: list[tuple[str, str, int]] = field(default_factory=list)
    unchanged: int = 0
    failed: dict[Stream, str] = field(default_factory=dict)

    def merge(self, other: PublishReport) -> None:
        self.checked += other.checked
        self.published += other.published
        self.unchanged += other.unchanged
        self.failed.update(other.failed)

    def summary(self) -> str:
        return (
            f"{self.checked} streams checked, {len(self.published)} published, "
            f"{self.unchanged} unchanged, {len(self.failed)} failed"
        )


async def recover_states(settings: KafkaSettings, topics: TopicNames) -> dict[Stream, StreamState]:
    """The last committed version and hash of every stream, read from the tenant topics
    (the compacted heads). Records are our own; their bodies are decoded unverified,
    since only the version and hash matter here."""
    admin = Admin(settings)
    async with admin:
        names = sorted(t for t in await admin.topics() if topics.tenant_of(t) is not None)
    states: dict[Stream, StreamState] = {}
    envelope_decoder = msgspec.msgpack.Decoder(Envelope)
    body_decoder = msgspec.msgpack.Decoder(EventBody)
    async for record in read_to_end(settings, names):
        if record.value is None:
            continue
        try:
            body = body_decoder.decode(envelope_decoder.decode(record.value).body)
        except msgspec.DecodeError:
            log.warning("skipping an undecodable record at %s@%d", record.topic, record.offset)
            continue
        stream = (body.tenant, body.env)
        known = states.get(stream)
        if known is None or body.version > known.version:
            try:
                config_json: bytes | None = config_json_of(body)
            except VerificationError:
                config_json = None  # changed_paths of the next event will list everything
            states[stream] = StreamState(body.version, body.config_hash, config_json=config_json)
    return states


class Publisher:
    """Turns streams into published events. Owns no connections: the caller starts
    and stops the producer, admin client and store it passes in."""

    def __init__(
        self,
        tree: EnvironmentTree,
        key: SigningKey,
        producer: Producer,
        admin: Admin,
        topics: TopicNames,
        *,
        store: TenantStore | None = None,
        batch_size: int = 1000,
    ) -> None:
        self.tree = tree
        self.key = key
        self.producer = producer
        self.admin = admin
        self.topics = topics
        self.store = store
        self.batch_size = batch_size
        self.states: dict[Stream, StreamState] = {}
        self._known_topics: set[str] = set()

    async def publish(self, streams: Iterable[Stream], change: Change) -> PublishReport:
        """Publish every stream in `streams` whose config changed. Raises `BusError`
        when Kafka fails; nothing is recorded as published then."""
        report = PublishReport()
        pending: list[_Prepared] = []
        store_layers = await self._store_layers(streams := sorted(set(streams)))
        for stream in streams:
            report.checked += 1
            prepared = self._prepare(stream, change, store_layers.get(stream), report)
            if prepared is not None:
                pending.append(prepared)
        if pending:
            await self._ensure_topics({item.stream[0] for item in pending})  # one round trip
        for start in range(0, len(pending), self.batch_size):
            batch = pending[start : start + self.batch_size]
            await self._send(batch)
            report.published += [(*item.stream, item.version) for item in batch]
        return report

    def _prepare(
        self, stream: Stream, change: Change, store_layer: Layer | None, report: PublishReport
    ) -> _Prepared | None:
        tenant, env = stream
        started = time.perf_counter()
        try:
            config = self.tree.resolve(env, tenant, runtime=[store_layer] if store_layer else ())
            problems = self.tree.problems(config)
        except TreeError as exc:
            problems = list(exc.problems)
        if problems:
            for problem in problems:
                log.error(
                    "%s/%s not published: %s",
                    tenant,
                    env,
                    problem,
                    extra={"tenant": tenant, "env": env},
                )
            report.failed[stream] = str(problems[0])
            return None
        state = self.states.get(stream)
        if state is not None and state.config_hash == config.hash:
            if state.data is None:
                state.data, state.config_json = config.data, None  # share, drop the copy
            report.unchanged += 1
            return None
        previous = state.config() if state is not None else None
        version = (state.version if state is not None else 0) + 1
        paths = changed_paths(previous, config.data)
        body = build_body(
            tenant=tenant,
            env=env,
            version=version,
            config_json=config.canonical_json,
            kind=EventKind.SNAPSHOT,
            detected_at=change.detected_at,
            cause=change.cause,
            changed_paths=tuple(paths),
        )
        log.debug(
            "%s/%s v%d prepared in %.2f ms",
            tenant,
            env,
            version,
            (time.perf_counter() - started) * 1000,
        )
        return _Prepared(stream, version, change.detected_at, config, seal(body, self.key))

    def _span(self, item: _Prepared) -> trace.Span:
        """The event's span: from the change's detection to Kafka's acknowledgement."""
        tenant, env = item.stream
        topic = self.topics.tenant_topic(tenant)
        return tracer.start_span(
            f"publish {topic}",
            kind=trace.SpanKind.PRODUCER,
            start_time=item.detected_at,
            attributes={
                "messaging.system": "kafka",
                "messaging.operation.type": "send",
                "messaging.operation.name": "publish",
                "messaging.destination.name": topic,
                "messaging.kafka.message.key": env,
                "messaging.destination.partition.id": "0",
                "configbus.tenant": tenant,
                "configbus.env": env,
                "configbus.version": item.version,
                "configbus.config_hash": item.config.hash,
            },
        )

    async def _store_layers(self, streams: Sequence[Stream]) -> dict[Stream, Layer]:
        if self.store is None:
            return {}
        return await self.store.layers(streams)  # pipelined: a fan-out is not N round trips

    async def _send(self, batch: Sequence[_Prepared]) -> None:
        tenants = {item.stream[0] for item in batch}
        await self._ensure_topics(tenants)
        started = time.perf_counter()
        spans = [self._span(item) for item in batch]
        try:
            async with self.producer.transaction():
                for item, span in zip(batch, spans, strict=True):
                    tenant, env = item.stream
                    headers = headers_with_context(
                        (("content-type", CONTENT_TYPE),), trace.set_span_in_context(span)
                    )
                    await self.producer.send(
                        self.topics.tenant_topic(tenant),
                        item.value,
                        key=self.topics.record_key(env),
                        headers=headers,
                    )
                    await self.producer.send(
                        self.topics.audit,
                        item.value,
                        key=self.topics.audit_key(tenant, env),
                        headers=headers,
                    )
        except BaseException as exc:
            for span in spans:
                span.record_exception(exc)
                span.set_status(StatusCode.ERROR, exc.__class__.__name__)
                span.end()
            raise
        for span in spans:
            span.end()
        committed = time.perf_counter()
        cache: dict[Stream, bytes] = {}
        for item in batch:
            (tenant, env), version, config = item.stream, item.version, item.config
            self.states[item.stream] = StreamState(version, config.hash, data=config.data)
            cache[item.stream] = item.value
            log.info(
                "published %s/%s v%d",
                tenant,
                env,
                version,
                extra={
                    "tenant": tenant,
                    "env": env,
                    "version": version,
                    "config_hash": config.hash[:12],
                    "duration_ms": round((committed - started) * 1000, 2),
                },
            )
        if self.store is not None:
            try:
                await self.store.put_events(cache)
            except BusError as exc:
                log.warning("could not cache %d event(s) in redis: %s", len(cache), exc)

    async def _ensure_topics(self, tenants: Iterable[str]) -> None:
        wanted = {self.topics.tenant_topic(t) for t in tenants} | {self.topics.audit}
        missing = wanted - self._known_topics
        if missing:
            compacted = missing - {self.topics.audit}
            await self.admin.ensure_topics(compacted, compact=True)
            if self.topics.audit in missing:
                await self.admin.ensure_topics([self.topics.audit], compact=False)
            await self.producer.track_topics(missing)
            self._known_topics |= missing


def now_change(sources: Sequence[str], actor: str, reason: str) -> Change:
    return Change(now_ns(), Cause(sources=tuple(sources), actor=actor, reason=reason))
