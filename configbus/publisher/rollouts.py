"""The daemon's side of staged rollouts: it stages changes as candidates and drives
each rollout through its steps, gates and promotion (see `configbus.ops.rollouts`).

- A changed stream whose tenant.yml declares a `rollout:` for its environment, or that
  an operator armed with `configbus rollout start`, is not published: `stage` takes
  its config, and the next tick publishes it as the stream's candidate (step 1). A
  new change during a rollout supersedes it: the rollout starts over with it.
- Every tick (while this daemon is the writer) each running rollout's gate is judged
  over the fleet (the acks topic, followed from its start): wait, go to the next step,
  promote after the last, or abort. Each decision is a new candidate record, signed
  and sent to the tenant topic and the audit topic in one transaction; promotion sends
  the candidate as the next snapshot version with the closing record, in one too.
- Aborted, the candidate selects nobody: its instances go back to the stable version by
  themselves. The stream is held at its stable version until its desired config
  changes again or an operator starts a rollout of it again.
- The rollout's state lives in Kafka: the latest candidate record carries the plan,
  the step and when it started. A daemon that starts reads it back (through the
  override keeper's reader of the tenant topics) and resumes: the bake goes on from
  when the step started, and what happened while no daemon ran is judged at once.
- Operators' commands (start, promote, abort) are events of kind ``command`` on the
  stream's ``rollout`` channel, signed by an operator key; each is acted on once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

import msgspec

from configbus.bus import CANDIDATE_CHANNEL, ROLLOUT_CHANNEL, Record, TopicNames
from configbus.crypto import SigningKey, TrustStore
from configbus.errors import ConfigBusError, VerificationError
from configbus.events import (
    Cause,
    EventKind,
    RolloutTag,
    VerifiedEvent,
    build_body,
    now_ns,
    open_envelope,
    seal,
)
from configbus.ops.fleet import Fleet, Member
from configbus.ops.rollouts import Command, Plan, Verdict, follows, judge, new_id, step_bound
from configbus.publisher.core import Change, Gate, Outgoing
from configbus.publisher.state import StreamState
from configbus.tree import EnvironmentTree, ResolvedConfig
from configbus.tree.diff import changed_paths

__all__ = ["RolloutDriver"]

log = logging.getLogger(__name__)

Stream = tuple[str, str]
TICK_S: Final = 0.25
PRUNE_EVERY_NS: Final = 60 * 10**9
FORGET_AFTER_NS: Final = 3600 * 10**9  # instances gone this long are forgotten


@dataclass(slots=True)
class _Rollout:
    """A stream's latest candidate record, and what it carries."""

    tag: RolloutTag
    version: int  # of the candidate channel
    config: ResolvedConfig
    change: Change  # the change it stages: when it was detected, who made it and why
    first_version: int  # the candidate channel version this rollout started at
    note: str = ""  # the gate's last word, for the log (said once)


@dataclass(slots=True)
class _Arm:
    """A `rollout start` an operator sent: the stream's next change goes through it."""

    plan: Plan
    at: int  # the command's issued_at
    expires_at: int
    actor: str
    reason: str


@dataclass(slots=True)
class _Staged:
    config: ResolvedConfig
    change: Change
    plan: Plan
    command_at: int = 0


Send = Callable[[str, Sequence[Outgoing]], Awaitable[None]]
Promote = Callable[[Stream, ResolvedConfig, Change, Sequence[Outgoing]], Awaitable[bool]]


@dataclass(slots=True)
class RolloutDriver:
    """Stages changes and drives rollouts; `run()` until cancelled."""

    topics: TopicNames
    tree: EnvironmentTree
    key: SigningKey
    trust: TrustStore  # publisher keys: candidates
    operators: TrustStore  # operator keys too: commands
    actor: str
    is_writer: Callable[[], bool]
    caught_up: Callable[[], bool]  # the tenant topics and the acks topic were read once
    stable: Callable[[Stream], StreamState | None]
    send: Send
    promote: Promote
    look_again: Callable[[Stream, Change | None], None]  # have the daemon resolve it again
    fleet: Fleet = field(default_factory=Fleet)  # the daemon gives it its tree's streams
    gate: Gate | None = None  # the compliance gate, asked again before a promotion
    rollouts: dict[Stream, _Rollout] = field(default_factory=dict)
    decisions: int = 0  # candidate records published by this driver
    _armed: dict[Stream, _Arm] = field(default_factory=dict)
    _staged: dict[Stream, _Staged] = field(default_factory=dict)
    _commands: list[tuple[Stream, VerifiedEvent, Command]] = field(default_factory=list)
    _pruned: int = 0
    _undone: set[Stream] = field(default_factory=set)  # running, but the change is undone
    _versions: dict[Stream, int] = field(default_factory=dict)  # candidate channel, seen
    driving: bool = False  # a daemon runs `run()`; one-shot writers cannot stage

    # -- what the publisher hands over -------------------------------------------------
    def plan_for(self, stream: Stream) -> Plan | None:
        """How changes of the stream roll out: armed by an operator, else declared in
        tenant.yml, else None (published at once)."""
        arm = self._armed.get(stream)
        if arm is not None and arm.expires_at > now_ns():
            return arm.plan
        tenant, env = stream
        try:
            plan = self.tree.tenant(tenant).rollouts.get(env)
        except ConfigBusError:
            return None
        return plan if isinstance(plan, Plan) else None

    def settled(self, stream: Stream) -> None:
        """The stream resolves to its published version again: a rollout of another
        config running for it is no longer wanted (the change was undone)."""
        rollout = self.rollouts.get(stream)
        if rollout is not None and rollout.tag.state == "running":
            self._undone.add(stream)
        self._staged.pop(stream, None)

    def stage(self, stream: Stream, config: ResolvedConfig, change: Change) -> bool | str:
        """Take the changed config of `stream` as a candidate instead of publishing it;
        False when the stream has no rollout (it is published at once); why not, when
        it has one and no daemon drives rollouts here (a one-shot writer)."""
        stable = self.stable(stream)
        if stable is None:
            return False  # its first version: nothing runs yet that a canary could protect
        self._undone.discard(stream)
        rollout = self.rollouts.get(stream)
        running = rollout is not None and rollout.tag.state == "running"
        arm = self._armed.get(stream)
        fresh = arm is not None and arm.expires_at > now_ns()
        fresh = fresh and arm is not None and (rollout is None or arm.at > rollout.tag.command_at)
        # Running: nothing new. Aborted (and nothing published since): held until the
        # tree changes again or an operator starts it again, whether a tree plan or an
        # armed command staged it. Promoted: the snapshot is on its way.
        same = rollout is not None and rollout.config.hash == config.hash and not fresh
        if (
            same
            and rollout is not None
            and (running or rollout.tag.stable_version == stable.version)
        ):
            return True
        plan = self.plan_for(stream)
        if plan is None and not running:
            return False
        if not self.driving:
            return (
                "it rolls out in stages (a rollout: in tenant.yml, or `configbus rollout "
                "start`), which only a running daemon drives: start `configbus daemon`"
            )
        staged = self._staged.get(stream)
        if staged is not None and staged.config.hash == config.hash:
            return True
        if plan is None and rollout is not None:
            plan = Plan.of_tag(rollout.tag)
        assert plan is not None
        self._staged[stream] = _Staged(config, change, plan, arm.at if fresh and arm else 0)
        return True

    # -- what the tenant topics say ------------------------------------------------------
    def received(self, record: Record) -> None:
        """A record of a tenant topic: a candidate (learns the rollouts, at start from
        the topics' history) or an operator's command."""
        env, channel = self.topics.channel_of(record.key)
        tenant = self.topics.tenant_of(record.topic)
        if tenant is None or channel not in (CANDIDATE_CHANNEL, ROLLOUT_CHANNEL):
            return
        stream = (tenant, env)
        trust = self.trust if channel == CANDIDATE_CHANNEL else self.operators
        try:
            event = open_envelope(record.value or b"", trust, stream=stream, channel=channel)
            if channel == ROLLOUT_CHANNEL:
                command = msgspec.json.decode(event.config_json, type=Command)
        except (VerificationError, msgspec.ValidationError, msgspec.DecodeError) as exc:
            log.warning("%s/%s: a %s record is ignored: %s", tenant, env, channel, exc)
            return
        except ConfigBusError as exc:
            log.warning("%s/%s: a rollout command is ignored: %s", tenant, env, exc)
            return
        if channel == CANDIDATE_CHANNEL:
            versions = self._versions
            versions[stream] = max(versions.get(stream, 0), event.body.version)
            try:
                self._learn(stream, event)
            except (msgspec.DecodeError, ConfigBusError, RecursionError) as exc:
                log.warning("%s/%s: a candidate record is ignored: %s", tenant, env, exc)
        else:
            self._commands.append((stream, event, command))

    def _learn(self, stream: Stream, event: VerifiedEvent) -> None:
        known = self.rollouts.get(stream)
        if known is not None and event.body.version <= known.version:
            return  # our own record coming back, or an older one
        tag = event.body.rollout
        assert tag is not None
        Plan.of_tag(tag)  # a plan this daemon cannot drive is refused here, not in a tick
        if not 0 <= tag.step < len(tag.steps):
            raise ConfigBusError(f"rollout {tag.id}: step {tag.step} of {len(tag.steps)}")
        config = ResolvedConfig(
            msgspec.json.decode(event.config_json), env=stream[1], tenant=stream[0]
        )
        cause = event.body.cause
        first = known.first_version if known is not None and known.tag.id == tag.id else 0
        self.rollouts[stream] = _Rollout(
            tag,
            event.body.version,
            config,
            Change(event.body.detected_at, cause),
            first or tag.first_version or event.body.version,
        )

    # -- the loop ----------------------------------------------------------------------
    async def run(self) -> None:
        """Tick while this daemon is the writer and the tenant topics and the acks
        topic were read to their end (the override keeper's reader follows them all,
        and hands the acks to `observe`)."""
        while True:
            await asyncio.sleep(TICK_S)
            if self.is_writer() and self.caught_up():
                await self.tick()

    def observe(self, record: Record) -> None:
        """A record of the acks topic: an instance's answer or heartbeat."""
        self.fleet.observe(record.key, record.value, record.timestamp_ms * 10**6)

    async def tick(self) -> None:
        """One round: commands, new candidates, then every running rollout's gate.
        A failure to send leaves the state as it was: the next tick tries again."""
        now = now_ns()
        if now - self._pruned > PRUNE_EVERY_NS:
            self._pruned = now
            self.fleet.prune(now - FORGET_AFTER_NS)
        commands, self._commands = self._commands, []
        for stream, event, command in commands:
            await self._command(stream, event, command)
        for stream, staged in list(self._staged.items()):
            if self._known(stream, staged):
                del self._staged[stream]  # staged before the topics were read: resumed
                continue
            await self._start(stream, staged)
        for stream in list(self._undone):
            self._undone.discard(stream)
            rollout = self.rollouts.get(stream)
            if rollout is not None and rollout.tag.state == "running":
                why = "the change was undone: the stream resolves to its stable version again"
                await self._abort(stream, rollout, [why], rollout.tag.command_at)
        for stream, rollout in list(self.rollouts.items()):
            if rollout.tag.state == "running":
                await self._drive(stream, rollout)

    def _known(self, stream: Stream, staged: _Staged) -> bool:
        """Whether the stream's latest rollout already stands for `staged`: it stages
        the same config, running, or aborted and not started again since."""
        current = self.rollouts.get(stream)
        if current is None or current.config.hash != staged.config.hash:
            return False
        return current.tag.state in ("running", "promoted") or (
            current.tag.state == "aborted" and staged.command_at <= current.tag.command_at
        )

    def recovered(self) -> None:
        """The tenant topics were read to their end (`received`, before the daemon's
        first round): arm the streams whose `rollout start` is still to be used, so
        that the first round already stages their changes."""
        kept = []
        for stream, event, command in self._commands:
            if command.action == "start":
                self._arm(stream, event, command, look_again=False)
            else:
                kept.append((stream, event, command))
        self._commands = kept

    def _fresh(self, stream: Stream, event: VerifiedEvent) -> bool:
        """Whether a command is still to be acted on: newer than the last acted on,
        and not expired."""
        body = event.body
        rollout = self.rollouts.get(stream)
        done = rollout.tag.command_at if rollout is not None else 0
        arm = self._armed.get(stream)
        if body.issued_at <= done or (arm is not None and body.issued_at <= arm.at):
            return False  # acted on already (read again after a restart)
        return body.expires_at is None or body.expires_at > now_ns()

    def _arm(
        self, stream: Stream, event: VerifiedEvent, command: Command, *, look_again: bool = True
    ) -> None:
        if not self._fresh(stream, event):
            return
        body, (tenant, env) = event.body, stream
        who = f"{body.cause.actor or event.kid}: {body.cause.reason}"
        rollout = self.rollouts.get(stream)
        if rollout is not None and rollout.tag.state == "running":
            log.warning("%s/%s: rollout %s runs already; `start` by %s ignored",
                        tenant, env, rollout.tag.id, who)  # fmt: skip
            return
        plan = command.the_plan()
        expires = body.expires_at or 0
        self._armed[stream] = _Arm(plan, body.issued_at, expires, body.cause.actor, who)
        log.info("%s/%s: armed by %s; its next change rolls out %s",
                 tenant, env, who, plan.describe())  # fmt: skip
        if look_again:
            self.look_again(stream, None)

    async def _command(self, stream: Stream, event: VerifiedEvent, command: Command) -> None:
        if command.action == "start":
            self._arm(stream, event, command)
            return
        if not self._fresh(stream, event):
            return
        body = event.body
        rollout = self.rollouts.get(stream)
        who = f"{body.cause.actor or event.kid}: {body.cause.reason}"
        tenant, env = stream
        if rollout is None or rollout.tag.state != "running":
            log.warning(
                "%s/%s: no rollout runs; `%s` by %s ignored", tenant, env, command.action, who
            )
            return
        if command.rollout != rollout.tag.id:  # an old command, read again after a restart
            log.warning("%s/%s: `%s` by %s names rollout %s, not the running %s; ignored",
                        tenant, env, command.action, who, command.rollout or "none",
                        rollout.tag.id)  # fmt: skip
            return
        if command.action == "abort":
            await self._abort(stream, rollout, [f"aborted by {who}"], body.issued_at)
        elif command.step_only and rollout.tag.step + 1 < len(rollout.tag.steps):
            await self._next_step(stream, rollout, f"promoted by {who}", body.issued_at)
        else:
            await self._promote(stream, rollout, f"promoted by {who}", body.issued_at)

    async def _start(self, stream: Stream, staged: _Staged) -> None:
        tenant, env = stream
        current = self.rollouts.get(stream)
        stable = self.stable(stream)
        rollout_id = new_id()
        plan = staged.plan
        # Instances still on the candidate it supersedes are real ones, and count.
        live = self._live(stream, staged.config.hash, current.config.hash if current else "")
        match, below = step_bound(rollout_id, plan, 0, live)
        command_at = max(staged.command_at, current.tag.command_at if current else 0)
        tag = RolloutTag(
            id=rollout_id,
            state="running",
            strategy=plan.strategy,
            steps=plan.steps,
            step=0,
            select=dict(plan.select),
            match=match,
            below=below,
            bake_s=plan.bake_s,
            step_timeout_s=plan.step_timeout_s,
            step_started_at=now_ns(),
            stable_version=stable.version if stable is not None else 0,
            command_at=command_at,
        )
        superseded = current is not None and current.tag.state == "running"
        reason = f"step 1/{len(plan.steps)} ({plan.steps[0]}) of {plan.describe()}"
        if superseded and current is not None:
            reason += f"; supersedes rollout {current.tag.id}"
        rollout = _Rollout(tag, 0, staged.config, staged.change, 0)
        if await self._publish(stream, rollout, tag, reason, first=True):
            self._staged.pop(stream, None)
            log.info("%s/%s: rollout %s started: %s", tenant, env, rollout_id, reason)

    async def _drive(self, stream: Stream, rollout: _Rollout) -> None:
        tenant, env = stream
        tag = rollout.tag
        stable = self.stable(stream)
        if stable is not None and stable.version > tag.stable_version:
            why = f"the stable version moved to v{stable.version} (a rollback or another writer)"
            await self._abort(stream, rollout, [why], tag.command_at)
            return
        now = now_ns()
        if tag.below == 0:  # nobody to select when the step began: look again
            match, below = step_bound(
                tag.id, Plan.of_tag(tag), tag.step, self._live(stream, rollout.config.hash)
            )
            if below:
                fresh = msgspec.structs.replace(tag, match=match, below=below, step_started_at=now)
                await self._publish(stream, rollout, fresh, f"step {tag.step + 1}: instances came")
                return
        members = self.fleet.members(tenant, env).values()
        stable_hash = stable.config_hash if stable is not None else ""
        verdict = judge(tag, rollout.config.hash, rollout.first_version, members, now,
                        stable_hash=stable_hash)  # fmt: skip
        if verdict.action == "abort":
            await self._abort(stream, rollout, verdict.breaches, tag.command_at)
        elif verdict.action == "next" and tag.step + 1 < len(tag.steps):
            await self._next_step(stream, rollout, _passed(tag, verdict), tag.command_at)
        elif verdict.action == "next":
            await self._promote(stream, rollout, _passed(tag, verdict), tag.command_at)
        elif verdict.note.split(",")[0] != rollout.note:  # "baking, 41s left": said once
            rollout.note = verdict.note.split(",")[0]
            log.info("%s/%s: rollout %s step %d/%d: %s", tenant, env, tag.id, tag.step + 1,
                     len(tag.steps), verdict.note)  # fmt: skip

    async def _next_step(
        self, stream: Stream, rollout: _Rollout, why: str, command_at: int
    ) -> None:
        tenant, env = stream
        tag, step = rollout.tag, rollout.tag.step + 1
        now = now_ns()
        live = self._live(stream, rollout.config.hash)
        match, below = step_bound(tag.id, Plan.of_tag(tag), step, live)
        below = max(below, tag.below) if match == tag.match else below  # never narrower
        fresh = msgspec.structs.replace(
            tag, step=step, match=match, below=below, step_started_at=now, command_at=command_at
        )
        reason = f"step {step + 1}/{len(tag.steps)} ({tag.steps[step]}): {why}"
        if await self._publish(stream, rollout, fresh, reason):
            log.info("%s/%s: rollout %s %s", tenant, env, tag.id, reason)

    async def _abort(
        self, stream: Stream, rollout: _Rollout, breaches: list[str], command_at: int
    ) -> None:
        tenant, env = stream
        fresh = msgspec.structs.replace(
            rollout.tag, state="aborted", below=0, breaches=tuple(b[:300] for b in breaches[:20]),
            command_at=command_at,
        )  # fmt: skip
        reason = f"aborted: {'; '.join(breaches[:3])}"
        if await self._publish(stream, rollout, fresh, reason):
            log.warning("%s/%s: rollout %s %s; every instance goes back to v%d", tenant, env,
                        rollout.tag.id, reason, rollout.tag.stable_version)  # fmt: skip

    async def _promote(self, stream: Stream, rollout: _Rollout, why: str, command_at: int) -> None:
        tenant, env = stream
        refusal = self.gate(stream, rollout.config)[0] if self.gate is not None else ""
        if refusal:  # a waiver that let the candidate be staged has ended since
            await self._abort(stream, rollout, [f"at promotion, {refusal}"], command_at)
            return
        fresh = msgspec.structs.replace(
            rollout.tag, state="promoted", below=0, command_at=command_at
        )
        closing = self._record(stream, rollout, fresh, f"promoted: {why}")
        cause = rollout.change.cause
        change = Change(
            rollout.change.detected_at,
            Cause(sources=cause.sources, actor=cause.actor,
                  reason=f"{cause.reason} (rollout {rollout.tag.id} promoted)".strip()),
        )  # fmt: skip
        try:
            promoted = await self.promote(stream, rollout.config, change, closing[1])
        except ConfigBusError as exc:
            log.warning("%s/%s: could not promote rollout %s, trying again: %s",
                        tenant, env, rollout.tag.id, exc)  # fmt: skip
            return
        if promoted:
            self._closed(stream, rollout, fresh, closing[0])
            log.info("%s/%s: rollout %s promoted (%s)", tenant, env, rollout.tag.id, why)

    # -- records -------------------------------------------------------------------------
    def _next_version(self, stream: Stream, rollout: _Rollout) -> int:
        known = self.rollouts.get(stream)
        seen = self._versions.get(stream, 0)  # every verified record, even one refused
        return max(known.version if known is not None else 0, rollout.version, seen) + 1

    def _live(self, stream: Stream, candidate_hash: str, also: str = "") -> list[Member]:
        """The stream's live instances that prove they follow it (`follows`), or run
        the config of hash `also` (a candidate being superseded)."""
        stable = self.stable(stream)
        stable_hash = stable.config_hash if stable is not None else ""
        return [
            m
            for m in self.fleet.live(*stream, now_ns())
            if follows(m, stable_hash, candidate_hash) or (also and m.config_hash == also)
        ]

    def _record(
        self, stream: Stream, rollout: _Rollout, tag: RolloutTag, reason: str
    ) -> tuple[int, list[Outgoing]]:
        """The next candidate record of the stream, for its tenant topic and the audit
        topic; and its version."""
        tenant, env = stream
        version = self._next_version(stream, rollout)
        stable = self.stable(stream)
        cause = rollout.change.cause  # the change's own: who made it and why, unchanged
        tag = msgspec.structs.replace(tag, note=reason[:500])
        body = build_body(
            tenant=tenant,
            env=env,
            version=version,
            config_json=rollout.config.canonical_json,
            kind=EventKind.CANDIDATE,
            detected_at=rollout.change.detected_at,
            cause=Cause(
                sources=cause.sources, actor=cause.actor or self.actor, reason=cause.reason
            ),
            changed_paths=tuple(
                changed_paths(stable.config() if stable else None, rollout.config.data)
            ),
            rollout=tag,
        )
        value = seal(body, self.key)
        return version, [
            (
                self.topics.tenant_topic(tenant),
                self.topics.record_key(env, CANDIDATE_CHANNEL),
                value,
            ),
            (self.topics.audit, self.topics.audit_key(tenant, env), value),
        ]

    async def _publish(
        self,
        stream: Stream,
        rollout: _Rollout,
        tag: RolloutTag,
        reason: str,
        *,
        first: bool = False,
    ) -> bool:
        if first:
            tag = msgspec.structs.replace(tag, first_version=self._next_version(stream, rollout))
        version, records = self._record(stream, rollout, tag, reason)
        try:
            await self.send(stream[0], records)
        except ConfigBusError as exc:
            log.warning("%s/%s: rollout record not sent, trying again: %s", *stream, exc)
            return False
        self._closed(stream, rollout, tag, version, first=first)
        return True

    def _closed(
        self,
        stream: Stream,
        rollout: _Rollout,
        tag: RolloutTag,
        version: int,
        *,
        first: bool = False,
    ) -> None:
        """Remember what was sent: the stream's latest candidate record."""
        self.decisions += 1
        self.rollouts[stream] = _Rollout(
            tag, version, rollout.config, rollout.change,
            version if first else rollout.first_version,
        )  # fmt: skip
        if tag.state != "running":
            self._armed.pop(stream, None)


def _passed(tag: RolloutTag, verdict: Verdict) -> str:
    return (
        f"step {tag.step + 1} passed: {len(verdict.applied)} instance(s) applied it and stayed "
        f"healthy for {tag.bake_s:g}s"
    )
