"""configbus emergency overrides: an override set until every instance has run its
callback, with the `configbus override set` command's start-up (configbus_override_cli)
and without it (configbus_override, the library call behind the command).

Set-up is configbus_direct's: `configbus daemon` over a copy of environments/ publishes
aurora-records/prod v1. Then an operator key (role operator, aurora-records/prod only,
max_ttl 1 h) joins the trust file the subscribers load, and the daemon is stopped: the
override path never goes through it, so it does not run while the edits are timed.
Subscribers: configbus_direct's `clients`, unchanged (one `on_change` callback on
database.postgresql.connection_pool each, the time taken in the callback).

Edit number e overrides that one key, database.postgresql.connection_pool.max_size, with
BASE + e and a fresh 10-minute TTL, replacing the previous edit's entry: an override set
of one entry, signed with the operator key and written to the tenant topic (record key
`prod/override`) and the audit topic in one Kafka transaction by
`configbus.ops.overrides.write_overrides`.

- configbus_override: t0 just before `write_overrides(...)` is called in the driver's
  process (one `KafkaBus` for all edits; each call still starts its own transactional
  producer, which fences any other writer of the stream's overrides, as the command does).
- configbus_override_cli: t0 just before spawning `configbus override set TENANT ENV
  KEY=VALUE --ttl 10m --reason ... --key OPERATOR.key --trust ... --no-check --wait 0`:
  interpreter start-up and imports included. The command caches its bytecode, as an
  installed one has it (`command_env`: a PYTHONPYCACHEPREFIX of its own, filled by the
  warm-up edits; this machine may set PYTHONDONTWRITEBYTECODE). The driver waits for the
  command to exit before it waits for the subscribers.

Where the time goes, per edit, for the subscriber whose callback came last (the stages
add up to the end-to-end time), from its ack of the override (override channel:
issued_at, received_at, applied_at):

- write:    t0 -> issued_at (CLI: process start, imports, key and trust file; both: the
            transactional producer's start and fence, reading the set in effect)
- kafka:    issued_at -> received_at (sign, topic check, transaction commit, fetch)
- verify:   received_at -> applied_at (verify, parse, compose onto the snapshot, swap)
- callback: applied_at -> the callback's clock

and `returned`: t0 -> `write_overrides` returned (after its producer stopped), or the
command exited. Not a stage: it overlaps kafka, verify and callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from itertools import pairwise
from pathlib import Path

import msgspec
from fleet import configbus_command, terminate
from harness import BASE, ENV, KEY, TENANT, BenchError

from systems import Context, Delivery
from systems.configbus_direct import ConfigbusDirect, clean_env, consume

TTL_S = 600  # each override's: 10 minutes
TTL = f"{TTL_S // 60}m"  # the same, for the command
MAX_TTL_S = 3600  # the operator key's trust entry
REASON = "e2e benchmark"
STAGES = ("write", "kafka", "verify", "callback")
RETURNED = "returned"  # t0 -> write_overrides returned, or the command exited
_PUBLISHED = re.compile(rb"published \S+ override v(\d+)")


class ConfigbusOverride(ConfigbusDirect):
    name = "configbus_override"
    label = "configbus override, library call"
    module = "configbus_direct"  # the subscribers are configbus_direct's, unchanged
    servers = ("kafka",)  # Redis serves the daemon, which is stopped after set-up

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.versions: dict[int, int] = {}  # edit -> the override version it published
        self.returned: dict[int, float] = {}  # override version -> t0 to the writer's return, ms
        self.override_acks: dict[tuple[str, int], tuple[int, int, int]] = {}

    async def setup(self) -> None:
        from configbus.bus import KafkaBus, KafkaSettings, TopicNames
        from configbus.crypto import OPERATOR, SigningKey, TrustedKey, TrustStore, generate_keypair

        await super().setup()  # the daemon has published v1 of the stream
        kid = "operator-" + uuid.uuid4().hex[:6]
        self.key_path, _ = generate_keypair(kid, self.scratch / "operators")
        self.key = SigningKey.load(self.key_path, kid)
        scope = (frozenset({TENANT}), frozenset({ENV}))
        self.trust_store = TrustStore.load(self.trust).with_key(
            TrustedKey(self.key.public, *scope, role=OPERATOR, max_ttl=MAX_TTL_S)
        )
        self.trust.write_text(self.trust_store.dump())
        await terminate(self.daemon)
        self.bus = KafkaBus(KafkaSettings(self.ctx.servers, client_id="e2e-override"))
        self.topics = TopicNames(prefix=self.prefix, acks=self.acks)

    def processes(self) -> dict[str, list[int]]:
        return {}  # the daemon no longer runs

    async def write(self, edit: int) -> int:
        t0, self.versions[edit] = await self.override(edit)
        return t0

    async def override(self, edit: int) -> tuple[int, int]:
        """Set the override of edit `edit`: (t0 in ns, the version published)."""
        from configbus.events import Cause
        from configbus.ops.overrides import OverrideEntry, write_overrides

        actor = self.key.kid

        def change(kept: tuple[OverrideEntry, ...], now: int) -> tuple[OverrideEntry, ...]:
            entry = OverrideEntry(
                path=KEY,
                value=BASE + edit,
                set_at=now,
                expires_at=now + TTL_S * 10**9,
                actor=actor,
                reason=REASON,
            )
            return (entry,)

        cause = Cause(sources=("override set",), actor=actor, reason=REASON)
        t0 = time.time_ns()
        written = await write_overrides(
            self.bus,
            self.topics,
            TENANT,
            ENV,
            key=self.key,
            trust=self.trust_store,
            change=change,
            cause=cause,
        )
        self.returned[written.version] = (time.time_ns() - t0) / 1e6
        return t0, written.version

    async def read_acks(self) -> None:
        """The override channel's acks: (instance, version) -> (issued, received, applied)."""
        from configbus.bus import OVERRIDE_CHANNEL
        from configbus.events import Ack

        async for record, _ in consume(self.ctx.servers, self.acks, 100):
            with contextlib.suppress(msgspec.DecodeError, TypeError):
                ack = msgspec.msgpack.decode(record.value, type=Ack)
                if ack.channel == OVERRIDE_CHANNEL and ack.status == "applied" and not ack.startup:
                    times = (ack.issued_at, ack.received_at, ack.applied_at)
                    self.override_acks[ack.instance, ack.version] = times

    async def stages(self, deliveries: list[Delivery]) -> list[dict[str, float]]:
        def last(delivery: Delivery) -> tuple[str, int, int]:
            index, at, _ = max(delivery.entries, key=lambda e: e[1])
            return f"e2e-{index}", self.versions.get(delivery.edit, 0), at

        wanted = [last(d)[:2] for d in deliveries]
        deadline = time.monotonic() + 10  # acks travel after the callbacks, in the background
        while any(w not in self.override_acks for w in wanted):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        out = []
        for delivery in deliveries:
            instance, version, at = last(delivery)
            if (times := self.override_acks.get((instance, version))) is None:
                continue
            points = [delivery.t0, *times, at]
            if all(points):
                spans = zip(STAGES, pairwise(points), strict=True)
                out.append({name: (b - a) / 1e6 for name, (a, b) in spans} | self.extra(version))
        return out

    def extra(self, version: int) -> dict[str, float]:
        """When the writer of override `version` returned (ms after t0): not a stage."""
        return {RETURNED: self.returned[version]} if version in self.returned else {}


class ConfigbusOverrideCli(ConfigbusOverride):
    name = "configbus_override_cli"
    label = "configbus override, `configbus override set`"

    async def override(self, edit: int) -> tuple[int, int]:
        command = [*configbus_command(), "override", "set", TENANT, ENV, f"{KEY}={BASE + edit}"]
        command += ["--ttl", TTL, "--reason", REASON, "--key", str(self.key_path)]
        command += ["--trust", str(self.trust), "--bootstrap-servers", self.ctx.servers]
        command += ["--topic-prefix", self.prefix, "--acks-topic", self.acks]
        command += ["--no-check", "--wait", "0"]
        env = command_env(self.ctx.args.tracing, self.scratch / "pycache")
        t0 = time.time_ns()
        process = await asyncio.create_subprocess_exec(
            *command,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        exited = time.time_ns()
        found = _PUBLISHED.search(out)
        if process.returncode or found is None:
            text = (out + err).decode(errors="replace")[-2000:]
            raise BenchError(f"configbus override set exited {process.returncode}: {text}")
        version = int(found.group(1))
        self.returned[version] = (exited - t0) / 1e6
        return t0, version


def command_env(tracing: str, cache: Path) -> dict[str, str]:
    """The environment of a `configbus` command: configbus_direct's, with bytecode cached
    in `cache` (written there, not beside the sources) whatever this machine says."""
    env = clean_env(tracing)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env | {"PYTHONPYCACHEPREFIX": str(cache)}
