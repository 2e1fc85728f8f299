"""Rollout status: has every instance got the change, and how long did it take?

Read from Kafka alone: the stream's latest version from its tenant topic (the highest
version among its recent records that verifies with the trust file: a forged record
cannot set the target), and every instance's acknowledgements from the acks topic
(compacted, keyed ``<tenant>/<env>/<instance>/<status>``, so the last applied and the
last rejected ack of each instance survive).

An instance behind the target whose last acknowledgement is older than `instance_ttl`
is counted as gone, not as a straggler: acknowledgements are all there is to know an
instance by until instances send heartbeats. An instance that stopped cleanly says so
(an ack of status ``stopped``) and leaves the fleet at once.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import msgspec

from configbus.bus import SNAPSHOT_CHANNEL, KafkaSettings, PartitionReader, TopicNames, read_to_end
from configbus.crypto import TrustStore
from configbus.errors import UnknownNameError, VerificationError
from configbus.events import Ack, open_envelope

__all__ = ["InstanceStatus", "RolloutReport", "has_stopped", "rollout_status"]

_ack_decoder = msgspec.msgpack.Decoder(Ack)


@dataclass(frozen=True, slots=True)
class InstanceStatus:
    instance: str
    service: str
    version: int  # the version it runs (last applied)
    latency_ms: float | None  # detection -> applied for that version; None at start-up
    applied_at: int
    rejected_version: int = 0  # the last version it refused, if newer than what it runs
    rejected_reason: str = ""


@dataclass(slots=True)
class RolloutReport:
    tenant: str
    env: str
    target_version: int
    instances: list[InstanceStatus] = field(default_factory=list)
    gone: list[InstanceStatus] = field(default_factory=list)  # silent past the TTL, behind

    @property
    def at_target(self) -> list[InstanceStatus]:
        return [i for i in self.instances if i.version >= self.target_version]

    @property
    def stragglers(self) -> list[InstanceStatus]:
        return [i for i in self.instances if i.version < self.target_version]

    @property
    def rejections(self) -> list[InstanceStatus]:
        """Instances that refused the target (or a later version) and run an older one."""
        target = self.target_version
        return [i for i in self.instances if i.version < target <= i.rejected_version]

    def latency_percentiles(self) -> dict[str, float | None]:
        """p50/p95/p99 of detection-to-applied for the instances that applied exactly
        the target version (later versions measure another change)."""
        samples = sorted(
            i.latency_ms
            for i in self.instances
            if i.version == self.target_version and i.latency_ms is not None
        )

        def pick(q: float) -> float | None:
            if not samples:
                return None
            return round(samples[min(len(samples) - 1, int(q * len(samples)))], 2)

        return {"p50_ms": pick(0.50), "p95_ms": pick(0.95), "p99_ms": pick(0.99)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "env": self.env,
            "target_version": self.target_version,
            "instances": [asdict(i) for i in self.instances],
            "at_target": len(self.at_target),
            "total": len(self.instances),
            "latency": self.latency_percentiles(),
            "stragglers": [i.instance for i in self.stragglers],
            "gone": [i.instance for i in self.gone],
            "rejections": [
                {"instance": i.instance, "version": i.rejected_version, "reason": i.rejected_reason}
                for i in self.rejections
            ],
        }

    def table(self) -> str:
        """The report as text for a terminal."""
        lines = [
            f"{self.tenant}/{self.env}: target v{self.target_version}, "
            f"{len(self.at_target)}/{len(self.instances)} instances at or past it"
        ]
        width = max([len(i.instance) for i in self.instances] + [8])
        lines.append(f"  {'instance':<{width}}  {'service':<16} version  latency    note")
        now = time.time_ns()
        for i in sorted(self.instances, key=lambda i: (i.version, i.instance)):
            latency = f"{i.latency_ms:8.1f}ms" if i.latency_ms is not None else "         -"
            note = ""
            if i.rejected_version > i.version:
                note = f"REJECTED v{i.rejected_version}: {i.rejected_reason}"
            elif i.version < self.target_version and i.applied_at:
                note = f"straggler (applied v{i.version} {(now - i.applied_at) / 1e9:.0f}s ago)"
            elif i.version < self.target_version:
                note = "straggler (never applied a version)"
            elif i.latency_ms is None:
                note = "(got it at start-up)"
            row = f"  {i.instance:<{width}}  {i.service[:16]:<16} v{i.version:<6} {latency}  {note}"
            lines.append(row.rstrip())
        if self.gone:
            lines.append(
                f"  ({len(self.gone)} instance(s) silent past the TTL not counted: "
                f"{', '.join(i.instance for i in self.gone[:5])}"
                f"{' ...' if len(self.gone) > 5 else ''})"
            )
        p = self.latency_percentiles()
        if p["p50_ms"] is not None:
            lines.append(
                f"detection -> applied for v{self.target_version}: "
                f"p50 {p['p50_ms']} ms, p95 {p['p95_ms']} ms, p99 {p['p99_ms']} ms"
            )
        return "\n".join(lines)


def has_stopped(stop: Ack | None, *answers: Ack | None) -> bool:
    """Whether an instance's `stopped` ack is newer than every answer it gave: it left
    the fleet on purpose (a restart under the same id answers again, and counts)."""
    if stop is None:
        return False
    return all(a is None or (a.received_at or a.applied_at) <= stop.applied_at for a in answers)


async def latest_version(
    kafka: KafkaSettings, topics: TopicNames, tenant: str, env: str, trust: TrustStore
) -> int:
    """The highest version among the stream's recent records that verifies with
    `trust`; 0 when none does. Raises `UnknownNameError` when the tenant has no topic."""
    reader = PartitionReader(kafka, topics.tenant_topic(tenant))
    try:
        if not await reader.start():
            raise UnknownNameError(
                f"tenant {tenant!r} has no topic {topics.tenant_topic(tenant)!r}: "
                "it never published (is the tenant id or --topic-prefix right?)"
            )
        records = await reader.recent(topics.record_key(env), limit=256)
    finally:
        await reader.stop()
    best = 0
    for record in records:
        try:
            event = open_envelope(
                record.value or b"", trust, stream=(tenant, env), channel=SNAPSHOT_CHANNEL
            )
        except VerificationError:
            continue
        best = max(best, event.body.version)
    return best


async def rollout_status(
    kafka: KafkaSettings,
    topics: TopicNames,
    tenant: str,
    env: str,
    version: int | None = None,
    *,
    trust: TrustStore,
    instance_ttl: float = 86400.0,
) -> RolloutReport:
    """Every instance of the stream, the version it runs, and the rollout of `version`
    (default: the latest verified one). Instances behind it and silent for longer than
    `instance_ttl` seconds are reported as gone."""
    latest = await latest_version(kafka, topics, tenant, env, trust)
    target = version if version is not None else latest
    prefix = f"{tenant}/{env}/".encode()
    applied: dict[str, Ack] = {}
    rejected: dict[str, Ack] = {}
    stopped: dict[str, Ack] = {}
    async for record in read_to_end(kafka, [topics.acks]):
        if not record.key or not record.key.startswith(prefix) or record.value is None:
            continue
        try:
            ack = _ack_decoder.decode(record.value)
        except msgspec.DecodeError:
            continue
        if ack.channel != SNAPSHOT_CHANNEL:
            continue  # an override's ack: its versions are the override channel's
        seen = {"applied": applied, "stopped": stopped}.get(ack.status, rejected)
        known = seen.get(ack.instance)
        if known is None or ack.version >= known.version:
            seen[ack.instance] = ack
    report = RolloutReport(tenant, env, target)
    horizon = time.time_ns() - int(instance_ttl * 1e9)
    for instance in sorted(applied.keys() | rejected.keys()):
        good, bad = applied.get(instance), rejected.get(instance)
        if has_stopped(stopped.get(instance), good, bad):
            continue  # stopped on purpose after its last answer: not part of the fleet
        latency = None
        if good is not None and good.detected_at and good.applied_at and not good.startup:
            latency = (good.applied_at - good.detected_at) / 1e6
        last_heard = max(
            (a.received_at or a.applied_at for a in (good, bad) if a is not None), default=0
        )
        status = InstanceStatus(
            instance=instance,
            service=next((a.service for a in (good, bad) if a is not None), ""),
            version=good.version if good else 0,
            latency_ms=latency,
            applied_at=good.applied_at if good else 0,
            rejected_version=bad.version if bad else 0,
            rejected_reason=bad.reason if bad else "",
        )
        behind = status.version < target
        (report.gone if behind and last_heard < horizon else report.instances).append(status)
    return report
