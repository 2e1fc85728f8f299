"""Publication: resolve streams, and publish the ones whose config changed.

`Publisher` holds what Kafka last has for every stream (version and hash, recovered
at start, see `configbus.publisher.state`) and turns a set of streams into signed events:

1. read the streams' store layers (the last ones read when Redis is unreachable; a
   stream whose store was never read stays pending);
2. resolve and validate each stream on its own: any failure, a broken file or a value
   over a limit, fails that stream alone, which keeps its last published version;
3. skip streams whose config hash equals the last published one, and streams held by a
   rollback whose config hash equals the hold (the hash of what they resolved to when
   the rollback was published: the tree and store have not changed them since); unless
   another key signed that version (the daemon switched keys): then the same content
   is published again as a new version signed with this key, so that the old key can
   be retired without leaving a stream that only it signed;
4. give the rest version + 1, build and sign their events, and refuse any event larger
   than our limit or its topic's ``max.message.bytes`` before sending;
5. send each event to its tenant topic, the audit topic and (as a head) the state
   topic in one Kafka transaction per batch, and wait for Kafka to acknowledge every
   record before committing. A record Kafka refuses for good fails its stream and the
   rest of the batch is sent again without it; any other failure raises `BusError`
   and leaves every stream of the batch pending.
6. after the commit, remember the new versions and cache the events in Redis.

`publish_rollback` publishes an earlier version's content (kind rollback) the same way,
and records the hold in the stream's head, so it survives restarts.

A stream is published only when Kafka acknowledged its records and the transaction
committed. A failed batch changes nothing here, so the same streams can be tried again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from opentelemetry import trace
from opentelemetry.trace import StatusCode

from configbus.bus import CONTENT_TYPE, AdminAPI, Headers, ProducerAPI, TopicNames
from configbus.chain import PUBLISHER_CHAIN_KEY, ChainHead, chain_records
from configbus.crypto import SigningKey
from configbus.errors import BusError, LimitError, RefusedError, TreeError
from configbus.events import AuditNote, Cause, EventKind, build_body, now_ns, seal, seal_note
from configbus.limits import DEFAULT_LIMITS, Limits
from configbus.publisher.state import MAX_VERSION, StreamHead, StreamState, seal_signed
from configbus.store import TenantStore
from configbus.telemetry import failed_counter, headers_with_context, published_counter, tracer
from configbus.tree import EnvironmentTree, ResolvedConfig
from configbus.tree.diff import changed_paths
from configbus.tree.layer import Layer
from configbus.tree.sealed import read_secrets_file, secrets_file
from configbus.tree.values import attach_sealed

__all__ = ["Change", "PublishObserver", "PublishReport", "Publisher", "StreamState"]

log = logging.getLogger(__name__)

Stream = tuple[str, str]  # (tenant, env)
Outgoing = tuple[str, bytes, bytes]  # (topic, key, value)
# The compliance gate: (stream, config) -> (a refusal or "", the waived rules it breaks)
Gate = Callable[[tuple[str, str], ResolvedConfig], tuple[str, tuple[str, ...]]]
# Takes a changed stream's config instead of publishing it (a staged rollout): True
# when it did, False to publish it, or why it can be neither (the stream is refused).
# Called while a round publishes: it must only take note, never send.
Stage = Callable[[Stream, ResolvedConfig, "Change"], bool | str]
# What a record costs in a batch beyond its value: batch header, record framing, key,
# headers (content-type, traceparent). Generous, so "fits" means fits.
RECORD_OVERHEAD = 512
STORE_TIMEOUT_S = 2.0  # a Redis that does not answer delays store changes, not file edits
# The audit topic's own settings on top of cleanup.policy=delete: its records never
# expire (an audit trail must not). `configbus restore` creates it the same way.
AUDIT_TOPIC_CONFIGS = {"retention.ms": "-1"}


@dataclass(frozen=True, slots=True)
class Change:
    """Why streams are being looked at: when the change was first seen, and its cause."""

    detected_at: int
    cause: Cause


class PublishObserver(Protocol):
    """Told what publication does, as it happens: the daemon's metrics
    (configbus/publisher/monitor.py). Each call must be quick and must not raise."""

    def committed(self, events: Sequence[tuple[Stream, int]]) -> None:
        """Kafka committed these events, just now: each one's stream and detected_at."""

    def refused(self, stream: Stream, code: str) -> None:
        """`stream` cannot be published as it is, for the reason `code`."""

    def store_failed(self, operation: str, exc: BaseException) -> None:
        """Redis failed at `operation` (read: the store layers; cache: the events)."""


@dataclass(frozen=True, slots=True)
class _Prepared:
    stream: Stream
    version: int
    detected_at: int
    config: ResolvedConfig
    value: bytes  # the signed record value
    head: bytes  # the signed state-topic head
    hold: str = ""  # the head's hold (a rollback's)
    kid: str = ""  # the key that signed them
    extra: tuple[Outgoing, ...] = ()  # more records for the same transaction


@dataclass(slots=True)
class PublishReport:
    """What one round did. `failed`: streams that cannot be published as they are
    (broken input, over a limit, refused by Kafka), by reason; they keep their last
    version until their input changes. `pending`: streams that could not be tried
    (Kafka or Redis unreachable); the caller tries them again. `held`: streams not
    published because a rollback holds them (counted as unchanged too)."""

    checked: int = 0
    published: list[tuple[str, str, int]] = field(default_factory=list)
    unchanged: int = 0
    unchanged_streams: list[Stream] = field(default_factory=list)
    failed: dict[Stream, str] = field(default_factory=dict)
    pending: dict[Stream, str] = field(default_factory=dict)
    held: list[Stream] = field(default_factory=list)
    staged: list[Stream] = field(default_factory=list)  # taken by a staged rollout

    def merge(self, other: PublishReport) -> None:
        self.checked += other.checked
        self.published += other.published
        self.unchanged += other.unchanged
        self.unchanged_streams += other.unchanged_streams
        self.held += other.held
        self.staged += other.staged
        self.failed.update(other.failed)
        self.pending.update(other.pending)

    def summary(self) -> str:
        text = (
            f"{self.checked} streams checked, {len(self.published)} published, "
            f"{self.unchanged} unchanged, {len(self.failed)} failed"
        )
        text += f", {len(self.held)} held by a rollback" if self.held else ""
        text += f", {len(self.staged)} staged by a rollout" if self.staged else ""
        return text + (f", {len(self.pending)} pending" if self.pending else "")


class Publisher:
    """Turns streams into published events. Owns no connections: the caller starts
    and stops the producer, admin client and store it passes in.

    A transaction carries `batch_size` events (three records each: tenant topic, audit,
    state), so it touches at most a few hundred partitions: one over a thousand tenant
    partitions outlasts the producer's request timeout while a full audit batch waits
    for the rest to drain, and its commit alone takes 80-170 ms."""

    def __init__(
        self,
        tree: EnvironmentTree,
        key: SigningKey,
        producer: ProducerAPI,
        admin: AdminAPI,
        topics: TopicNames,
        *,
        store: TenantStore | None = None,
        batch_size: int = 100,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.tree = tree
        self.key = key
        self.producer = producer
        self.admin = admin
        self.topics = topics
        self.store = store
        self.batch_size = batch_size
        self.limits = limits
        self.states: dict[Stream, StreamState] = {}
        self._known_topics: set[str] = set()
        self._topic_limits: dict[str, int | None] = {}
        self._store_seen: dict[Stream, Layer | None] = {}  # the last store layers read
        self._store_down = False
        self._refusals: dict[Stream, str] = {}  # logged once per reason
        self.stage: Stage | None = None
        self.settled: Callable[[Stream], None] | None = None  # resolves to what Kafka has
        # The head of our audit chain (configbus/chain.py): recovery sets it from the
        # state topic; it moves only when a transaction that carried links commits.
        self.chain = ChainHead(topics.transactional_id)
        # The compliance gate: what stops a changed config from being published (a
        # refusal, "" for none), and the rules a waiver let through.
        self.gate: Gate | None = None
        self.observer: PublishObserver | None = None  # metrics

    async def publish(
        self, streams: Iterable[Stream], change: Change, *, release: bool = False
    ) -> PublishReport:
        """Publish every stream in `streams` whose config changed. Raises `BusError`
        when Kafka fails; nothing is recorded as published then. `release`: a stream
        held by a rollback is published as the tree and store resolve it even when
        that is what it is held at, which ends the hold."""
        report = PublishReport()
        streams = sorted(set(streams))
        report.checked = len(streams)
        store_layers = await self._store_layers(streams, report)
        pending: list[_Prepared] = []
        for stream in streams:
            if stream in report.failed or stream in report.pending:
                continue
            try:
                prepared = self._prepare(
                    stream, change, store_layers.get(stream), report, release=release
                )
            except Exception as exc:  # one stream's failure is that stream's alone
                code = "too_large" if isinstance(exc, LimitError) else "internal_error"
                self._refuse(report, stream, f"{exc.__class__.__name__}: {exc}", exc, code=code)
                continue
            if prepared is not None:
                pending.append(prepared)
        if pending:
            await self._ensure_topics({item.stream[0] for item in pending})  # one round trip
        pending = [item for item in pending if await self._fits(item, report)]
        for start in range(0, len(pending), self.batch_size):
            await self._send_batch(pending[start : start + self.batch_size], report)
        for stream in report.failed:
            report.pending.pop(stream, None)
        return report

    def _refuse(
        self,
        report: PublishReport,
        stream: Stream,
        reason: str,
        exc: BaseException | None = None,
        *,
        code: str = "invalid",
    ) -> None:
        """`stream` cannot be published as it is: one log line per new reason, and the
        metric configbus.publish.failed by stream and `code` (invalid, too_large,
        kafka_refused, internal_error)."""
        tenant, env = stream
        report.failed[stream] = reason
        failed_counter.add(1, {"configbus.tenant": tenant, "configbus.env": env, "reason": code})
        if self.observer is not None:
            self.observer.refused(stream, code)
        if self._refusals.get(stream) == reason:
            return
        self._refusals[stream] = reason
        unexpected = exc is not None and not isinstance(exc, LimitError | TreeError)
        log.error(
            "%s/%s not published, keeping v%d: %s",
            tenant,
            env,
            self.states[stream].version if stream in self.states else 0,
            reason,
            exc_info=exc if unexpected else None,
            extra={"tenant": tenant, "env": env, "reason": reason},
        )

    def _prepare(
        self,
        stream: Stream,
        change: Change,
        store_layer: Layer | None,
        report: PublishReport,
        *,
        release: bool = False,
    ) -> _Prepared | None:
        tenant, env = stream
        started = time.perf_counter()
        try:
            config = self.tree.resolve(env, tenant, runtime=[store_layer] if store_layer else ())
            problems = self.tree.problems(config)
        except TreeError as exc:
            problems = list(exc.problems)
        if problems:
            for problem in problems[1:]:
                log.error("%s/%s: %s", tenant, env, problem, extra={"tenant": tenant, "env": env})
            self._refuse(report, stream, str(problems[0]))
            return None
        self._check_size(config)
        self._refusals.pop(stream, None)
        state = self.states.get(stream)
        resign = state is not None and bool(state.kid) and state.kid != self.key.kid
        if state is not None and state.hold:
            if state.hold == config.hash and not release:
                held = state.config()
                if resign and held is not None:  # the rolled-back content, under this key
                    again = ResolvedConfig(held, env=env, tenant=tenant)
                    return self._sealed(
                        stream, again, _resigned(change, self.key.kid),
                        kind=EventKind.ROLLBACK, hold=state.hold,
                    )  # fmt: skip
                report.held.append(stream)  # unchanged since the rollback: stays rolled back
                report.unchanged += 1
                report.unchanged_streams.append(stream)
                return None
            # The stream changed in the tree or the store since the rollback (or the hold
            # is released): published, even when that is the rolled-back content itself,
            # so that the new head, which holds nothing, ends the hold on Kafka too.
        elif state is not None and state.config_hash == config.hash and resign:
            change = _resigned(change, self.key.kid)  # same content, this key's signature
        elif state is not None and state.config_hash == config.hash:
            if self.settled is not None:
                self.settled(stream)
            if state.data is None:
                state.data, state.config_json = config.data, None  # share, drop the copy
            report.unchanged += 1
            report.unchanged_streams.append(stream)
            return None
        changed = state is None or state.config_hash != config.hash
        waived: tuple[str, ...] = ()
        if changed and self.gate is not None:
            refusal, waived = self.gate(stream, config)
            if refusal:
                self._refuse(report, stream, refusal, code="compliance")
                return None
        verdict = self.stage(stream, config, change) if changed and self.stage else False
        if isinstance(verdict, str):
            self._refuse(report, stream, verdict, code="needs_daemon")
            return None
        if verdict:
            report.staged.append(stream)
            return None
        prepared = self._sealed(stream, config, change)
        if waived:
            prepared = self._with_waiver_note(prepared, change, waived)
        log.debug(
            "%s/%s v%d prepared in %.2f ms",
            tenant,
            env,
            prepared.version,
            (time.perf_counter() - started) * 1000,
        )
        return prepared

    def _with_waiver_note(
        self, prepared: _Prepared, change: Change, waived: tuple[str, ...]
    ) -> _Prepared:
        """`prepared` with an audit note, in the same transaction, naming the blocking
        rules its config breaks that a waiver let through."""
        tenant, env = prepared.stream
        note = AuditNote(
            action="waiver_used",
            tenant=tenant,
            env=env,
            subject=",".join(waived),
            version=prepared.version,
            actor=change.cause.actor,
            reason=f"v{prepared.version} published under waiver: {', '.join(waived)}",
            at=now_ns(),
        )
        extra = (*prepared.extra, (self.topics.audit, note.key, seal_note(note, self.key)))
        return dataclasses.replace(prepared, extra=extra)

    def _check_size(self, config: ResolvedConfig) -> None:
        if len(config.canonical_json) > self.limits.config_bytes:
            raise LimitError(
                f"config is {len(config.canonical_json)} bytes of JSON, over the limit "
                f"config_bytes ({self.limits.config_bytes})"
            )

    def _sealed(
        self,
        stream: Stream,
        config: ResolvedConfig,
        change: Change,
        *,
        kind: EventKind = EventKind.SNAPSHOT,
        hold: str = "",
    ) -> _Prepared:
        """`config` as the stream's next version: the signed event and head."""
        tenant, env = stream
        state = self.states.get(stream)
        previous = state.config() if state is not None else None
        version = (state.version if state is not None else 0) + 1
        if version > MAX_VERSION:
            raise LimitError(f"version {version} would overflow")
        body = build_body(
            tenant=tenant,
            env=env,
            version=version,
            config_json=config.canonical_json,
            kind=kind,
            detected_at=change.detected_at,
            cause=change.cause,
            changed_paths=tuple(changed_paths(previous, config.data)),
        )
        head = StreamHead(
            tenant=tenant,
            env=env,
            version=version,
            config_hash=config.hash,
            issued_at=body.issued_at,
            hold=hold,
        )
        return _Prepared(
            stream,
            version,
            change.detected_at,
            config,
            seal(body, self.key),
            seal_signed(head, self.key),
            hold,
            self.key.kid,
        )

    async def publish_rollback(
        self, stream: Stream, config: ResolvedConfig, change: Change
    ) -> PublishReport:
        """Publish `config` (an earlier version's content) as the stream's next version,
        of kind rollback, and hold the stream there: the head records the hash of what
        the tree and store resolve the stream to now, and `publish` leaves the stream
        alone while they go on resolving to it. A stream that does not resolve now is
        not held: it is published again once it resolves. Raises `BusError` when Kafka
        fails; a stream whose store was never read (Redis unreachable) is left pending,
        unpublished: its hold could not be known."""
        report = PublishReport(checked=1)
        store_layers = await self._store_layers([stream], report)
        if report.pending or report.failed:
            return report
        tenant, env = stream
        layer = store_layers.get(stream)
        try:
            resolved = self.tree.resolve(env, tenant, runtime=[layer] if layer else ())
            hold = "" if self.tree.problems(resolved) else resolved.hash
        except (TreeError, LimitError):  # refused until it changes: nothing to hold
            hold = ""
        config = self._with_secrets_now(stream, config, layer)
        self._check_size(config)
        prepared = self._sealed(stream, config, change, kind=EventKind.ROLLBACK, hold=hold)
        await self._ensure_topics([tenant])
        if await self._fits(prepared, report):
            await self._send_batch([prepared], report)
        for failed in report.failed:
            report.pending.pop(failed, None)
        return report

    async def publish_promoted(
        self, stream: Stream, config: ResolvedConfig, change: Change, extra: Sequence[Outgoing]
    ) -> PublishReport:
        """Publish a rollout's candidate as the stream's next snapshot version, with
        `extra` records (the candidate's closing record) in the same transaction.
        Raises `BusError` when Kafka fails."""
        report = PublishReport(checked=1)
        self._check_size(config)
        waived: tuple[str, ...] = ()
        if self.gate is not None:  # a waiver may have ended while the rollout ran
            refusal, waived = self.gate(stream, config)
            if refusal:
                self._refuse(report, stream, refusal, code="compliance")
                return report
        prepared = self._sealed(stream, config, change)
        prepared = dataclasses.replace(prepared, extra=tuple(extra))
        if waived:
            prepared = self._with_waiver_note(prepared, change, waived)
        await self._ensure_topics([stream[0]])
        if await self._fits(prepared, report):
            await self._send_batch([prepared], report)
        for failed in report.failed:
            report.pending.pop(failed, None)
        return report

    async def send_records(self, tenant: str, records: Sequence[Outgoing]) -> None:
        """Send `records` (a rollout's candidate, on the tenant and audit topics) in
        one transaction, and wait until Kafka acknowledged them all. Raises `BusError`."""
        await self._ensure_topics([tenant])
        headers = (("content-type", CONTENT_TYPE),)
        chained, chain = self._chained([(*record, headers) for record in records])
        async with self.producer.transaction():
            sent = [
                await self.producer.send(topic, value, key=key, headers=record_headers)
                for topic, key, value, record_headers in chained
            ]
            await asyncio.gather(*sent)
        self.chain = chain

    def _chained(
        self, records: Sequence[tuple[str, bytes, bytes, Headers]]
    ) -> tuple[list[tuple[str, bytes, bytes, Headers]], ChainHead]:
        """`records` with a link on each audit record, then our chain's new head for
        the state topic; and that head, ours once the transaction commits."""
        return chain_records(
            self.chain,
            self.key,
            records,
            audit_topic=self.topics.audit,
            head_at=(self.topics.state, PUBLISHER_CHAIN_KEY),
        )

    def _with_secrets_now(
        self, stream: Stream, config: ResolvedConfig, store_layer: Layer | None
    ) -> ResolvedConfig:
        """`config` (an earlier version's) with the secrets' versions of today: a
        rollback never brings back a version retired (and maybe revoked) since, nor a
        data key wrapped by a key-encryption key dropped since. Raises `TreeError`
        when the stream's secrets file does not read."""
        tenant, env = stream
        sealed = {
            name: record.versions
            for name, record in read_secrets_file(secrets_file(self.tree.root, tenant, env)).items()
        }
        if store_layer is not None:
            sealed.update(store_layer.sealed)
        data = attach_sealed(config.data, sealed)
        if data is config.data:
            return config
        return ResolvedConfig(data, config.layers, env=env, tenant=tenant)

    async def _fits(self, item: _Prepared, report: PublishReport) -> bool:
        """Whether the event can ever be sent: refused here when it is over our limit or
        over what its topics accept, rather than sent and lost."""
        size = len(item.value)
        if size > self.limits.event_bytes:
            reason = (
                f"event is {size} bytes, over the limit event_bytes ({self.limits.event_bytes})"
            )
            self._refuse(report, item.stream, reason, code="too_large")
            return False
        for topic in (self.topics.tenant_topic(item.stream[0]), self.topics.audit):
            accepted = await self._topic_limit(topic, size)
            if accepted is not None and size + RECORD_OVERHEAD > accepted:
                reason = f"event is {size} bytes, over {topic}'s max.message.bytes ({accepted})"
                self._refuse(report, item.stream, reason, code="too_large")
                return False
        return True

    async def _topic_limit(self, topic: str, size: int) -> int | None:
        """The topic's max.message.bytes, asked once, and only for events that are not
        small: no topic accepts less than 64 KiB in practice."""
        if size + RECORD_OVERHEAD <= 64 * 1024:
            return None
        if topic not in self._topic_limits:
            try:
                self._topic_limits[topic] = await self.admin.max_message_bytes(topic)
            except BusError as exc:  # Kafka itself will refuse what does not fit
                log.warning("could not read %s's max.message.bytes: %s", topic, exc)
                return None
        return self._topic_limits[topic]

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

    async def _store_layers(
        self, streams: Sequence[Stream], report: PublishReport
    ) -> dict[Stream, Layer]:
        """The streams' store layers. While Redis is unreachable, the last ones read:
        file edits go on publishing; a stream whose store was never read stays pending
        (publishing it without its store values would drop an operator's change)."""
        if self.store is None:
            return {}
        problems: dict[Stream, str] = {}
        try:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                layers = await self.store.layers(streams, problems=problems)
        except (BusError, TimeoutError) as exc:
            reason = str(exc) or f"no answer within {STORE_TIMEOUT_S:g}s"
            if self.observer is not None:
                self.observer.store_failed("read", exc)
            if not self._store_down:
                log.warning("redis unreachable (%s): using the store values last read", reason)
            self._store_down = True
            for stream in streams:
                if stream not in self._store_seen:
                    report.pending[stream] = f"store unreachable: {reason}"
            return {s: layer for s, layer in self._store_seen.items() if layer is not None}
        if self._store_down:
            log.info("redis reachable again")
        self._store_down = False
        for stream in streams:
            self._store_seen[stream] = layers.get(stream)
        for stream, problem in problems.items():
            self._refuse(report, stream, problem)
        return layers

    async def _send_batch(self, batch: list[_Prepared], report: PublishReport) -> None:
        """Send `batch`. When Kafka refuses records for good, the others go again
        without them, and each refused one alone: Kafka refuses a whole record batch,
        so only a record refused on its own is refused for what it is."""
        try:
            await self._send(batch)
        except _Refused as refused:
            await self.producer.restart()  # a failed transaction may leave it unusable
            if len(batch) == 1:
                self._refuse(report, batch[0].stream, refused.reason, code="kafka_refused")
                return
            rest = [item for item in batch if item not in refused.items]
            if rest:
                await self._send_batch(rest, report)
            for item in refused.items:
                await self._send_batch([item], report)
            return
        except BaseException:
            for item in batch:
                report.pending[item.stream] = "kafka did not confirm the batch"
            raise
        report.published += [(*item.stream, item.version) for item in batch]
        for item in batch:
            tenant, env = item.stream
            published_counter.add(1, {"configbus.tenant": tenant, "configbus.env": env})

    async def _send(self, batch: Sequence[_Prepared]) -> None:
        started = time.perf_counter()
        spans = [self._span(item) for item in batch]
        try:
            records: list[tuple[str, bytes, bytes, Headers]] = []
            owners: list[_Prepared | None] = []
            for item, span in zip(batch, spans, strict=True):
                tenant, env = item.stream
                headers = headers_with_context(
                    (("content-type", CONTENT_TYPE),), trace.set_span_in_context(span)
                )
                stream_key = self.topics.audit_key(tenant, env)
                for topic, key, value in (
                    (self.topics.tenant_topic(tenant), self.topics.record_key(env), item.value),
                    (self.topics.audit, stream_key, item.value),
                    (self.topics.state, stream_key, item.head),
                    *item.extra,
                ):
                    records.append((topic, key, value, headers))
                    owners.append(item)
            chained, chain = self._chained(records)
            owners += [None] * (len(chained) - len(owners))  # the chain's head: no event's
            async with self.producer.transaction():
                sent: list[tuple[_Prepared | None, Awaitable[None]]] = []
                for owner, (topic, key, value, headers) in zip(owners, chained, strict=True):
                    try:
                        ack = await self.producer.send(topic, value, key=key, headers=headers)
                    except RefusedError as exc:
                        raise _Refused(
                            [owner] if owner is not None else list(batch),
                            f"kafka refused the event: {exc}",
                        ) from exc
                    sent.append((owner, ack))
                # Commit only what Kafka acknowledged, every record of it.
                results = await asyncio.gather(*(ack for _, ack in sent), return_exceptions=True)
                refused = {
                    id(item): (item, result)
                    for (item, _), result in zip(sent, results, strict=True)
                    if isinstance(result, RefusedError)
                }
                if refused:
                    items = [item for item, _ in refused.values() if item is not None]
                    if len(items) < len(refused):  # the chain's head: the whole batch's
                        items = list(batch)
                    first = next(iter(refused.values()))[1]
                    raise _Refused(items, f"kafka refused the event: {first}") from first
                for result in results:
                    if isinstance(result, BaseException):
                        raise result
        except BaseException as exc:
            for span in spans:
                span.record_exception(exc)
                span.set_status(StatusCode.ERROR, exc.__class__.__name__)
                span.end()
            raise
        self.chain = chain
        for span in spans:
            span.end()
        committed = time.perf_counter()
        if self.observer is not None:
            self.observer.committed([(item.stream, item.detected_at) for item in batch])
        cache: dict[Stream, bytes] = {}
        for item in batch:
            (tenant, env), version, config = item.stream, item.version, item.config
            self.states[item.stream] = StreamState(
                version,
                config.hash,
                data=config.data,
                hold=item.hold,
                issued_at=now_ns(),
                kid=item.kid,
            )
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
                async with asyncio.timeout(STORE_TIMEOUT_S):
                    await self.store.put_events(cache)
            except (BusError, TimeoutError) as exc:
                log.warning("could not cache %d event(s) in redis: %s", len(cache), exc)
                if self.observer is not None:
                    self.observer.store_failed("cache", exc)

    async def _ensure_topics(self, tenants: Iterable[str]) -> None:
        shared = {self.topics.audit, self.topics.state}
        wanted = {self.topics.tenant_topic(t) for t in tenants} | shared
        missing = wanted - self._known_topics
        if missing:
            await self.admin.ensure_topics(missing - {self.topics.audit}, compact=True)
            if self.topics.audit in missing:
                await self.admin.ensure_topics(
                    [self.topics.audit], compact=False, configs=AUDIT_TOPIC_CONFIGS
                )
            await self.producer.track_topics(missing)
            self._known_topics |= missing

    def forget_topics(self) -> None:
        """After a reconnect: topics may have been deleted meanwhile; check again."""
        self._known_topics.clear()
        self._topic_limits.clear()


class _Refused(Exception):
    """Kafka refused the records of `items` for good."""

    def __init__(self, items: list[_Prepared], reason: str) -> None:
        super().__init__(reason)
        self.items, self.reason = items, reason


def _resigned(change: Change, kid: str) -> Change:
    """The change of a version published again only to carry `kid`'s signature."""
    cause = Cause(actor=change.cause.actor, reason=f"re-signed with key {kid}")
    return Change(change.detected_at, cause)


def now_change(sources: Sequence[str], actor: str, reason: str) -> Change:
    return Change(now_ns(), Cause(sources=tuple(sources), actor=actor, reason=reason))
