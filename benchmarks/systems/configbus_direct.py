"""configbus with every subscriber reading Kafka itself (direct mode).

`configbus daemon` runs as its own process with its default settings (debounce/step,
reconcile; Redis store on, as in `make demo`) over a copy of environments/, with its own
topic prefix and acks topic. t0: just before tenants/aurora-records/prod.yml is written
to a temp file and renamed over the original (as editors save). Subscribers:
`ConfigSubscriber` for aurora-records/prod with default settings (acks on, no disk
cache), one `on_change("database.postgresql.connection_pool", ...)` callback each; the
time is taken in the callback.

Where the time goes, per edit, for the subscriber whose callback came last (the stages
add up to the end-to-end time): the event carries detected_at and issued_at, the
callback sees them in `sub.event.body`; the subscriber's ack (read here from the acks
topic) carries received_at and applied_at.

- detect:   t0 -> detected_at (the daemon's watcher reports the save)
- resolve:  detected_at -> issued_at (resolve, validate, hash, compress the body)
- kafka:    issued_at -> received_at (sign, transaction commit, fetch; in agent mode
            also the agent's hop and the socket)
- verify:   received_at -> applied_at (verify, decode, freeze, swap)
- callback: applied_at -> the callback's clock (changed paths, callback dispatch)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from itertools import pairwise
from typing import Any

import msgspec
from fleet import Closer, Report, configbus_command, spawn, terminate
from harness import (
    BASE,
    EDITED,
    ENV,
    KEY,
    ORIGINAL_LINE,
    POOL,
    SAMPLE,
    TENANT,
    BenchError,
    atomic_save,
    edited_text,
)

from systems import Context, Delivery, System

STAGES = ("detect", "resolve", "kafka", "verify", "callback")
AGENT_STAGES = ("detect", "resolve", "kafka", "agent", "verify", "callback")


async def clients(spec: dict[str, Any], indices: list[int], report: Report) -> Closer:
    from configbus import ConfigSubscriber, ResolvedConfig

    for name in ("CONFIGBUS_AGENT", "CONFIGBUS_BOOTSTRAP_SERVERS"):
        os.environ.pop(name, None)  # the spec alone says where subscribers read from
    subscribers = []
    for index in indices:
        # Through the agent only: no Kafka to fall back on, so no record bypasses it.
        where = {"agent": spec["agent"]} if spec.get("agent") else {}
        options: dict[str, Any] = where or {"bootstrap_servers": spec["servers"]}
        subscriber = ConfigSubscriber(
            TENANT,
            ENV,
            trust=spec["trust"],
            instance_id=f"e2e-{index}",
            service="e2e-bench",
            topic_prefix=spec["prefix"],
            acks_topic=spec["acks"],
            **options,
        )

        def changed(
            old: ResolvedConfig,
            new: ResolvedConfig,
            paths: list[str],
            index: int = index,
            subscriber: ConfigSubscriber = subscriber,
        ) -> None:
            now = time.time_ns()
            event = subscriber.event
            extra = None
            if event is not None:
                body = event.body
                extra = (body.version, body.detected_at, body.issued_at)
            report(index, int(new.get(KEY)) - BASE, now, extra)

        subscriber.on_change(POOL, changed)
        subscribers.append(subscriber)
    await asyncio.gather(*(s.start() for s in subscribers))
    want = "agent" if spec.get("agent") else "kafka"
    if wrong := [s for s in subscribers if s.source != want]:
        raise BenchError(f"{len(wrong)} subscriber(s) not on {want}: source {wrong[0].source!r}")

    async def close() -> None:
        await asyncio.gather(*(s.stop() for s in subscribers), return_exceptions=True)

    return close


class ConfigbusDirect(System):
    name = "configbus"
    label = "configbus, direct Kafka"
    module = "configbus_direct"
    servers = ("kafka", "redis")

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        tag = uuid.uuid4().hex[:8]
        self.scratch = self.ctx.scratch / self.name
        self.prefix, self.acks = f"e2e{tag}.", f"e2e{tag}-acks"
        self.daemon: Any = None
        self.acks_seen: dict[tuple[str, int], tuple[int, int]] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.seen: dict[int, int] = {}  # version -> when a plain consumer had it (agent mode)

    def spec(self) -> dict[str, Any]:
        return {
            "servers": self.ctx.servers,
            "trust": str(self.trust),
            "prefix": self.prefix,
            "acks": self.acks,
        }

    async def setup(self) -> None:
        from configbus.crypto import SigningKey, TrustStore, generate_keypair

        root = self.scratch / "environments"
        shutil.copytree(SAMPLE, root)
        kid = "e2e-" + uuid.uuid4().hex[:6]
        private, _ = generate_keypair(kid, self.scratch / "keys")
        self.trust = self.scratch / "trust.yml"
        self.trust.write_text(TrustStore.of(SigningKey.load(private, kid).public).dump())
        self.target = root / EDITED
        self.original = self.target.read_text()
        if self.original.count(ORIGINAL_LINE) != 1:
            raise BenchError(f"{EDITED}: expected one '{ORIGINAL_LINE}' line")
        command = [*configbus_command(), "daemon", "--root", str(root)]
        command += ["--bootstrap-servers", self.ctx.servers, "--redis", self.ctx.redis_url]
        command += ["--signing-key", str(private), "--kid", kid]
        command += ["--topic-prefix", self.prefix, "--acks-topic", self.acks]
        self.log = self.scratch / "daemon.log"
        self.daemon = spawn(command, clean_env(self.ctx.args.tracing), self.log)
        deadline = time.monotonic() + 120
        while not self.published():
            if self.daemon.poll() is not None:
                raise BenchError(f"the daemon exited: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise BenchError(f"the daemon published nothing in 120s; see {self.log}")
            await asyncio.sleep(0.1)
        self.tasks.append(asyncio.create_task(self.read_acks()))

    def published(self) -> bool:
        for raw in self.log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(raw)
                if entry.get("message", "").startswith("published ") and (
                    entry.get("tenant"),
                    entry.get("env"),
                ) == (TENANT, ENV):
                    return True
        return False

    async def read_acks(self) -> None:
        """Every ack on this run's acks topic: (instance, version) -> (received, applied)."""
        from configbus.events import Ack

        async for record, _ in consume(self.ctx.servers, self.acks, 100):
            with contextlib.suppress(msgspec.DecodeError, TypeError):
                ack = msgspec.msgpack.decode(record.value, type=Ack)
                if ack.status == "applied" and not ack.startup:
                    self.acks_seen[ack.instance, ack.version] = (ack.received_at, ack.applied_at)

    async def read_events(self) -> None:
        """When a plain read_committed consumer, as the agent's, has each version."""
        topic = self.prefix + TENANT
        async for record, at in consume(self.ctx.servers, topic, self.ctx.fetch_max_wait_ms):
            with contextlib.suppress(msgspec.DecodeError, TypeError, KeyError):
                envelope = msgspec.msgpack.decode(record.value)
                self.seen[msgspec.msgpack.decode(envelope["body"], type=_Version).version] = at

    async def write(self, edit: int) -> int:
        return atomic_save(self.target, edited_text(self.original, edit))

    def processes(self) -> dict[str, list[int]]:
        return {"daemon": [self.daemon.pid]} if self.daemon is not None else {}

    async def stages(self, deliveries: list[Delivery]) -> list[dict[str, float]]:
        def last(delivery: Delivery) -> tuple[str, int, int, tuple[int, int, int]] | None:
            index, at, extra = max(delivery.entries, key=lambda e: e[1])
            return (f"e2e-{index}", extra[0], at, extra) if extra else None

        wanted = [x for d in deliveries if (x := last(d))]
        deadline = time.monotonic() + 10  # acks travel after the callbacks, in the background
        while any((i, v) not in self.acks_seen for i, v, _, _ in wanted):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        out = []
        for delivery in deliveries:
            found = last(delivery)
            if found is None or (ack := self.acks_seen.get(found[:2])) is None:
                continue
            _, version, at, (_, detected, issued) = found
            received, applied = ack
            points = [delivery.t0, detected, issued, received, applied, at]
            names: tuple[str, ...] = STAGES
            if self.tasks[1:]:  # agent mode: split Kafka from the agent's hop
                points.insert(3, self.seen.get(version, 0))
                names = AGENT_STAGES
            if all(points):
                spans = zip(names, pairwise(points), strict=True)
                out.append({name: (b - a) / 1e6 for name, (a, b) in spans})
        return out

    async def teardown(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await terminate(self.daemon)


def clean_env(tracing: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONFIGBUS_", "OTEL_"))}
    if tracing == "sdk":
        env["OTEL_TRACES_EXPORTER"] = "none"  # as `make demo`: real ids, no exporter
    return env


class _Version(msgspec.Struct):
    version: int


async def consume(servers: str, topic: str, wait_ms: int) -> AsyncIterator[tuple[Any, int]]:
    """Every record of `topic` from its start, with the time (ns) its fetch returned."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=servers,
        group_id=None,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        fetch_max_wait_ms=wait_ms,
    )
    await consumer.start()
    try:
        while True:
            batches = await consumer.getmany(timeout_ms=1000)
            now = time.time_ns()
            for records in batches.values():
                for record in records:
                    yield record, now
    finally:
        await consumer.stop()
