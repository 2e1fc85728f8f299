"""Staged rollouts: the plan, who each step selects, and the gates that promote or abort.

A rollout stages a stream's change as a *candidate* (its own channel: the snapshot head
stays the stable version) and widens it step by step over the live instances:

- canary: ``--steps 1,10%,50%,100%`` (a count or a share of the live instances that
  carry the ``--select`` labels), each step baked for ``--bake`` before the next;
- blue-green: the instances labelled ``color=green`` first, then everyone at once.

Selection is stable: an instance is in a step when it carries the step's labels and its
`rank` (a hash of the rollout id and its instance id, never an address) is below the
step's bound, so pods that come and go do not reshuffle who is a canary. After the last
step the candidate is *promoted*: published as the stream's next snapshot version.

A step passes its gate once its bake time is over and every selected live instance
applied the candidate and stayed healthy. Any of these aborts the rollout at once
(`judge`): a refusal (a validator said no, or verification failed); an instance that
applied it and then stopped heartbeating, stopped, or restarted, or that was live when
the candidate went out and fell silent without an answer (crash-after-apply: a process
that dies applying a config often dies before its acknowledgement leaves it);
a health check the service registered turning bad; or a step not applied by every
selected instance within its step timeout. Aborted, the candidate selects nobody and
its instances return to the stable version by themselves.

Everything here is pure: the daemon (configbus/publisher/rollouts.py) drives it, and
`rollout status` reads it back.
"""

from __future__ import annotations

import contextlib
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Final

import msgspec

from configbus.bus import CANDIDATE_CHANNEL, ROLLOUT_CHANNEL, SNAPSHOT_CHANNEL, Bus, TopicNames
from configbus.crypto import SigningKey, TrustStore
from configbus.errors import SettingsError, VerificationError
from configbus.events import (
    RANK_SPACE,
    Cause,
    EventKind,
    RolloutTag,
    VerifiedEvent,
    build_body,
    now_ns,
    open_envelope,
    rank,
    seal,
)
from configbus.ops.fleet import Fleet, Member
from configbus.ops.trail import write_record
from configbus.options import format_duration, parse_duration, parse_labels

__all__ = [
    "BLUE_GREEN",
    "CANARY",
    "Command",
    "Plan",
    "StagedView",
    "Verdict",
    "follows",
    "judge",
    "latest_candidate",
    "read_staged",
    "send_command",
    "step_bound",
]

CANARY: Final = "canary"
BLUE_GREEN: Final = "blue-green"
DEFAULT_STEPS: Final = {CANARY: ("1", "10%", "50%", "100%"), BLUE_GREEN: ("color=green", "100%")}
DEFAULT_BAKE_S: Final = 60.0
MAX_STEPS: Final = 20
_COMMAND_ACTIONS: Final = ("start", "promote", "abort")


@dataclass(frozen=True, slots=True)
class Plan:
    """How a change is rolled out. `steps`: counts ("1"), shares ("10%") or labels
    ("color=green", every live instance carrying them)."""

    strategy: str = CANARY
    steps: tuple[str, ...] = DEFAULT_STEPS[CANARY]
    bake_s: float = DEFAULT_BAKE_S
    select: Mapping[str, str] = field(default_factory=dict)
    step_timeout_s: float = 0.0  # 0: five bakes, at least five minutes

    def __post_init__(self) -> None:
        if self.strategy not in DEFAULT_STEPS:
            raise SettingsError(f"strategy {self.strategy!r}: say canary or blue-green")
        if not self.steps or len(self.steps) > MAX_STEPS:
            raise SettingsError(f"steps: give 1 to {MAX_STEPS} steps")
        for step in self.steps:
            _check_step(step)
        if not 0 <= self.bake_s <= 7 * 86400:
            raise SettingsError(f"bake {self.bake_s:g}s: between 0s and 7d")
        if not math.isfinite(self.bake_s) or not math.isfinite(self.step_timeout_s):
            raise SettingsError("bake and step timeout: give a duration such as 90s")
        if self.step_timeout_s < 0:
            raise SettingsError("step timeout: must not be negative")

    @property
    def timeout_s(self) -> float:
        return self.step_timeout_s or max(5 * self.bake_s, 300.0)

    @classmethod
    def build(
        cls,
        strategy: str | None = None,
        steps: str | Sequence[object] | None = None,
        bake: str | float | None = None,
        select: Mapping[str, str] | Iterable[str] | None = None,
        step_timeout: str | float | None = None,
    ) -> Plan:
        """From a command line or a tree's `rollout:` block; errors name the field."""
        strategy = strategy or CANARY
        if strategy not in DEFAULT_STEPS:
            raise SettingsError(f"strategy {strategy!r}: say canary or blue-green")
        if steps is None or steps == "":
            parsed = DEFAULT_STEPS[strategy]
        elif isinstance(steps, str):
            parsed = tuple(s.strip() for s in steps.split(",") if s.strip())
        else:
            parsed = tuple(str(s).strip() for s in steps)
        if isinstance(select, Mapping):
            for name, value in select.items():
                if not isinstance(value, str | int) or "," in str(value):
                    raise SettingsError(f"select {name}: give one value (a string), not {value!r}")
            labels = parse_labels(f"{k}={v}" for k, v in select.items())
        else:
            labels = parse_labels(select or ())
        return cls(
            strategy=strategy,
            steps=parsed,
            bake_s=_seconds(bake, "bake", DEFAULT_BAKE_S),
            select=labels,
            step_timeout_s=_seconds(step_timeout, "step timeout", 0.0),
        )

    def describe(self) -> str:
        where = "".join(f" {k}={v}" for k, v in sorted(self.select.items()))
        return f"{self.strategy} {','.join(self.steps)}, bake {format_duration(self.bake_s)}" + (
            f", among{where}" if where else ""
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "steps": list(self.steps),
            "bake_s": self.bake_s,
            "select": dict(self.select),
            "step_timeout_s": self.step_timeout_s,
        }

    @classmethod
    def of_tag(cls, tag: RolloutTag) -> Plan:
        return cls(tag.strategy, tag.steps, tag.bake_s, dict(tag.select), tag.step_timeout_s)


def _seconds(value: str | float | None, what: str, default: float) -> float:
    if value is None or value == "":
        return default
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    try:
        return float(parse_duration(str(value)))
    except ValueError as exc:
        raise SettingsError(f"{what}: {exc}") from None


def _check_step(step: str) -> None:
    if "=" in step:
        parse_labels([step], "step")
        return
    text = step[:-1] if step.endswith("%") else step
    try:
        number = float(text) if step.endswith("%") else int(text)
    except ValueError:
        number = -1
    if step.endswith("%") and not 0 < number <= 100:
        raise SettingsError(f"step {step!r}: a share between 0% and 100%")
    if not step.endswith("%") and number < 1:
        raise SettingsError(
            f"step {step!r}: say a count (1), a share (10%) or a label (color=green)"
        )


def step_bound(
    rollout: str, plan: Plan, step: int, live: Iterable[Member]
) -> tuple[dict[str, str], int]:
    """The labels and rank bound that select step `step` among the `live` instances:
    the first N of them in rank order (N the step's count, or its share rounded up),
    all of them at 100% or for a label step. A bound of 0 selects nobody yet."""
    spec = plan.steps[step]
    match = dict(plan.select)
    if "=" in spec:
        match.update(parse_labels([spec], "step"))
        return match, RANK_SPACE
    if spec.endswith("%") and Fraction(spec[:-1]) >= 100:
        return match, RANK_SPACE
    ranks = sorted(
        rank(rollout, m.instance)
        for m in live
        if all(m.labels.get(k) == v for k, v in match.items())
    )
    share = Fraction(spec[:-1]) if spec.endswith("%") else None  # exact: 64.4% of 250 is 161
    wanted = math.ceil(share * len(ranks) / 100) if share is not None else int(spec)
    wanted = min(wanted, len(ranks))
    return match, (ranks[wanted - 1] + 1 if wanted else 0)


def follows(member: Member, stable_hash: str, candidate_hash: str) -> bool:
    """Whether `member` proves it follows the stream (see `judge`): it sends heartbeats
    (an instance without them never runs a candidate), and runs the stable config or
    the candidate, or answered the candidate by its hash."""
    if member.heartbeat_ms <= 0:
        return False
    if not stable_hash or member.config_hash in (stable_hash, candidate_hash):
        return True
    answers = (member.candidate_applied, member.candidate_refused)
    return any(a is not None and a.config_hash == candidate_hash for a in answers)


def new_id() -> str:
    return uuid.uuid4().hex[:12]


@dataclass(slots=True)
class Verdict:
    """What a step's gate says now: ``wait``, ``next`` (promote this step) or
    ``abort``; `breaches` name the gate and the instance, `note` why it waits."""

    action: str
    breaches: list[str] = field(default_factory=list)
    note: str = ""
    selected: list[str] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)


def judge(
    tag: RolloutTag,
    candidate_hash: str,
    first_version: int,
    members: Iterable[Member],
    now: int,
    *,
    stable_hash: str = "",
) -> Verdict:
    """The gate of the step `tag` runs, over every instance the fleet knows of the
    stream. `first_version`: the candidate channel's version that started this
    rollout (answers to older candidates are another rollout's).

    Only instances that prove they follow the stream count: they send heartbeats,
    and run its stable config (`stable_hash`, when given) or the candidate, or
    answered the candidate by its hash. Acks are not signed and every service may
    write the acks topic, but no other tenant can read these hashes: a heartbeat
    forged for a phantom instance is not waited for, selected or blamed."""
    breaches: list[str] = []
    selected: list[str] = []
    applied: list[str] = []
    pending: list[str] = []
    for member in sorted(members, key=lambda m: m.instance):
        if not tag.selects(member.instance, member.labels):
            continue
        if not follows(member, stable_hash, candidate_hash):
            continue
        refused = member.candidate_refused
        if (
            refused is not None
            and refused.version >= first_version
            and refused.config_hash == candidate_hash
            and not refused.reason.startswith("stale_version")
        ):
            breaches.append(f"refused on {member.instance}: {refused.reason}")
            continue
        done = member.candidate_applied
        took = done is not None and done.version >= first_version
        took = took and done is not None and done.config_hash == candidate_hash
        gone = member.gone_why(now)
        if took and done is not None:
            if gone:
                breaches.append(
                    f"crash-after-apply on {member.instance}: {gone} after applying the candidate"
                )
            elif member.restarted_at > (
                member.first_applied(candidate_hash, first_version) or done.applied_at
            ):  # started again after it first applied it: a crash loop applies it anew
                breaches.append(
                    f"crash-after-apply on {member.instance}: restarted after applying it"
                )
            elif not member.healthy:
                breaches.append(
                    f"health check failed on {member.instance}: {member.health_note or 'unhealthy'}"
                )
            else:
                selected.append(member.instance)
                applied.append(member.instance)
            continue
        if gone == "stopped" or (gone and member.last_heard + member.ttl_ns < tag.step_started_at):
            continue  # left on purpose, or before the step began: not part of it any more
        if gone:
            # Live when the candidate went out, silent since, without a word: a process
            # that dies applying a config often dies before its answer leaves it.
            breaches.append(
                f"crash-after-apply on {member.instance}: {gone} since the candidate "
                "reached it, without an answer"
            )
            continue
        selected.append(member.instance)
        pending.append(member.instance)
    if breaches:
        return Verdict("abort", breaches, selected=selected, applied=applied)
    elapsed = (now - tag.step_started_at) / 1e9
    plan = Plan.of_tag(tag)
    if pending or not selected:
        if elapsed > plan.timeout_s:
            who = ", ".join(pending[:5]) if pending else "no live instance is selected"
            within = format_duration(plan.timeout_s)
            return Verdict(
                "abort",
                [f"step {tag.step + 1} not applied within {within}: {who}"],
                selected=selected,
                applied=applied,
            )
        note = (
            f"waiting for {len(pending)} of {len(selected)} selected instance(s) to apply it"
            if selected
            else "waiting for a live instance to select"
        )
        return Verdict("wait", note=note, selected=selected, applied=applied)
    if elapsed < plan.bake_s:
        left = plan.bake_s - elapsed
        return Verdict("wait", note=f"baking, {left:.0f}s left", selected=selected, applied=applied)
    return Verdict("next", selected=selected, applied=applied)


class Command(msgspec.Struct, frozen=True, kw_only=True):
    """An operator's rollout command: the JSON config of an event of kind ``command``
    on the stream's ``rollout`` channel, signed by an operator key."""

    action: str  # "start", "promote" or "abort"
    plan: dict[str, Any] = {}  # start: Plan.to_dict()
    step_only: bool = False  # promote: the next step only, not the whole rollout
    rollout: str = ""  # promote, abort: the id of the rollout meant (no other is touched)

    def __post_init__(self) -> None:
        if self.action not in _COMMAND_ACTIONS:
            raise SettingsError(f"rollout command {self.action!r}: say start, promote or abort")

    def the_plan(self) -> Plan:
        p = self.plan
        return Plan.build(
            p.get("strategy"),
            p.get("steps"),
            p.get("bake_s"),
            p.get("select"),
            p.get("step_timeout_s"),
        )


# -- commands and status over Kafka -------------------------------------------------------
COMMAND_TTL_S: Final = 3600  # a `start` arms the stream's next change for this long


async def send_command(
    bus: Bus,
    topics: TopicNames,
    tenant: str,
    env: str,
    command: Command,
    *,
    key: SigningKey,
    trust: TrustStore,
    cause: Cause,
    ttl_s: float = COMMAND_TTL_S,
) -> int:
    """Sign `command` with an operator key and write it to the stream's rollout channel
    and to the audit topic; the daemon acts on it once. Returns its issue time (ns),
    which is also its version. Raises `BusError`."""
    now = now_ns()
    body = build_body(
        tenant=tenant,
        env=env,
        version=now,
        config_json=msgspec.json.encode(command),
        kind=EventKind.COMMAND,
        detected_at=now,
        cause=cause,
        expires_at=now + int(ttl_s * 1e9),
        issued_at=now,
    )
    value = seal(body, key)
    await write_record(
        bus,
        topics,
        tenant,
        env,
        topics.record_key(env, ROLLOUT_CHANNEL),
        value,
        trust=trust,
        signer=key,
    )
    return now


@dataclass(slots=True)
class StagedView:
    """A stream's latest staged rollout, read back from Kafka: its candidate record and
    the fleet's instances of the stream, judged as the daemon judges them."""

    tenant: str
    env: str
    tag: RolloutTag
    candidate_version: int
    candidate_hash: str
    reason: str  # the candidate record's: the last decision
    members: list[Member]
    verdict: Verdict
    now: int

    def to_dict(self) -> dict[str, Any]:
        tag = self.tag
        return {
            "rollout": tag.id,
            "state": tag.state,
            "strategy": tag.strategy,
            "steps": list(tag.steps),
            "step": tag.step + 1,
            "select": dict(tag.select),
            "bake_s": tag.bake_s,
            "bake_left_s": self.bake_left_s,
            "stable_version": tag.stable_version,
            "candidate_version": self.candidate_version,
            "candidate_hash": self.candidate_hash,
            "last_decision": self.reason,
            "breaches": list(tag.breaches),
            "gate": {"action": self.verdict.action, "note": self.verdict.note},
            "instances": [
                {
                    "instance": m.instance,
                    "labels": dict(m.labels),
                    "live": m.live(self.now),
                    "selected": tag.selects(m.instance, m.labels),
                    "runs": "candidate" if m.candidate_version else f"v{m.version}",
                    "healthy": m.healthy,
                    "health_note": m.health_note,
                }
                for m in self.members
            ],
        }

    @property
    def bake_left_s(self) -> float | None:
        if self.tag.state != "running":
            return None
        return max(0.0, self.tag.bake_s - (self.now - self.tag.step_started_at) / 1e9)

    def table(self) -> str:
        tag = self.tag
        plan = Plan.of_tag(tag)
        head = f"{self.tenant}/{self.env}: rollout {tag.id} ({plan.describe()})"
        if tag.state == "running":
            head += (
                f": step {tag.step + 1}/{len(tag.steps)} ({tag.steps[tag.step]}), "
                f"{self.verdict.note or 'passed, promoting'}"
            )
        else:
            head += f": {tag.state.upper()} - {self.reason}"
        lines = [head]
        running = [m for m in self.members if m.live(self.now)]
        on_candidate = sum(1 for m in running if m.candidate_version)
        lines.append(
            f"  live instances: {len(running)}; on the candidate: {on_candidate}; "
            f"on stable v{tag.stable_version} or later: {len(running) - on_candidate}"
        )
        width = max([len(m.instance) for m in self.members] + [8])
        lines.append(f"  {'instance':<{width}}  {'runs':<10} {'health':<8} labels")
        for m in sorted(self.members, key=lambda m: m.instance):
            gone = m.gone_why(self.now)
            runs = "candidate" if m.candidate_version else f"v{m.version}"
            health = "gone" if gone else ("ok" if m.healthy else "FAILING")
            labels = ",".join(f"{k}={v}" for k, v in sorted(m.labels.items()) if k != "host")
            note = f"  {m.health_note}" if not m.healthy else ""
            mark = "*" if tag.selects(m.instance, m.labels) else " "
            lines.append(f" {mark}{m.instance:<{width}}  {runs:<10} {health:<8} {labels}{note}")
        for breach in tag.breaches:
            lines.append(f"  gate fired: {breach}")
        return "\n".join(lines)


async def newest(
    bus: Bus, topics: TopicNames, tenant: str, env: str, trust: TrustStore, channel: str
) -> VerifiedEvent | None:
    """The newest of the stream's recent records on `channel` that verifies with
    `trust`; None when none does (or the tenant has no topic)."""
    reader = bus.reader(topics.tenant_topic(tenant))
    try:
        if not await reader.start():
            return None
        records = await reader.recent(topics.record_key(env, channel), limit=64)
    finally:
        await reader.stop()
    best = None
    for record in records:
        try:
            event = open_envelope(record.value or b"", trust, stream=(tenant, env), channel=channel)
        except VerificationError:
            continue
        if best is None or event.body.version > best.body.version:
            best = event
    return best


async def latest_candidate(
    bus: Bus, topics: TopicNames, tenant: str, env: str, trust: TrustStore
) -> VerifiedEvent | None:
    """The stream's newest candidate record that verifies with `trust`; None when it
    never had one (or its tenant has no topic)."""
    return await newest(bus, topics, tenant, env, trust, CANDIDATE_CHANNEL)


async def read_staged(
    bus: Bus, topics: TopicNames, tenant: str, env: str, trust: TrustStore
) -> StagedView | None:
    """The stream's latest staged rollout (the newest candidate record that verifies
    with `trust`), or None when it never had one."""
    best = await latest_candidate(bus, topics, tenant, env, trust)
    if best is None or best.body.rollout is None:
        return None
    fleet = Fleet()
    async with contextlib.aclosing(bus.read_to_end([topics.acks])) as records:
        async for record in records:
            fleet.observe(record.key, record.value, record.timestamp_ms * 10**6)
    now = now_ns()
    tag = best.body.rollout
    members = list(fleet.members(tenant, env).values())
    snapshot = await newest(bus, topics, tenant, env, trust, SNAPSHOT_CHANNEL)
    stable = snapshot.body.config_hash if snapshot is not None else ""
    verdict = judge(tag, best.body.config_hash, tag.first_version, members, now, stable_hash=stable)
    return StagedView(
        tenant,
        env,
        tag,
        best.body.version,
        best.body.config_hash,
        tag.note or best.body.cause.reason,
        sorted(members, key=lambda m: m.instance),
        verdict,
        now,
    )
