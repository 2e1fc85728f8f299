"""`configbus rollout start | promote | abort`: operators steer staged rollouts.

Each command is signed with the operator's key (as overrides are) and written to the
stream's rollout channel and the audit topic; the publisher daemon acts on it. `status`
(configbus/cli_bus.py) shows the staged rollout beside the fleet's versions.
"""

from __future__ import annotations

import argparse
from typing import TextIO

import msgspec

from configbus.cli_override import _actor, _run, operator_signer
from configbus.errors import SettingsError
from configbus.events import Cause
from configbus.ops.rollouts import COMMAND_TTL_S, Command, Plan, latest_candidate, send_command
from configbus.options import format_duration, parse_duration

__all__ = ["register"]


def register(
    rollout: argparse._SubParsersAction[argparse.ArgumentParser], kafka: argparse.ArgumentParser
) -> None:
    signer = argparse.ArgumentParser(add_help=False, parents=[kafka])
    signer.add_argument("tenant", metavar="TENANT")
    signer.add_argument("env", metavar="ENV")
    signer.add_argument("--trust", metavar="FILE", help="trust file (default $CONFIGBUS_TRUST)")
    signer.add_argument(
        "--key", metavar="FILE", help="your operator key, KID.key (default $CONFIGBUS_OPERATOR_KEY)"
    )
    signer.add_argument("--kid", help="its key id (default: the file's name without .key)")
    signer.add_argument("--reason", required=True, help="why: a change request, a ticket")
    signer.add_argument("--actor", help="who (default: the key id)")

    start = rollout.add_parser(
        "start",
        parents=[signer],
        help="roll the stream's next change out in steps, gated on the fleet's health",
    )
    start.add_argument(
        "--strategy", choices=("canary", "blue-green"), default="canary", help="(canary)"
    )
    start.add_argument(
        "--steps",
        metavar="LIST",
        help="counts, shares and labels: 1,10%%,50%%,100%% (canary's default); "
        "blue-green: color=green,100%%",
    )
    start.add_argument(
        "--bake", default="60s", help="how long each step runs before the next (60s)"
    )
    start.add_argument(
        "--select",
        action="append",
        default=[],
        metavar="LABEL=VALUE",
        help="only instances carrying these labels take part before promotion (repeatable)",
    )
    start.add_argument(
        "--step-timeout",
        metavar="DURATION",
        help="abort when a step's instances have not applied it by then (5 bakes, at least 5m)",
    )
    start.add_argument(
        "--within",
        default=format_duration(COMMAND_TTL_S),
        metavar="DURATION",
        help="the change must come within this long, or the rollout is not started (1h)",
    )
    start.set_defaults(func=_start)

    promote = rollout.add_parser(
        "promote", parents=[signer], help="promote the running rollout now, skipping its gates"
    )
    promote.add_argument(
        "--step", action="store_true", help="only go on to the next step, not to everyone"
    )
    promote.set_defaults(func=_promote)

    abort = rollout.add_parser(
        "abort", parents=[signer], help="abort the running rollout: every instance goes back"
    )
    abort.set_defaults(func=_abort)


def _start(args: argparse.Namespace, out: TextIO) -> int:
    plan = Plan.build(args.strategy, args.steps, args.bake, args.select, args.step_timeout)
    try:
        within = parse_duration(args.within)
    except ValueError as exc:
        raise SettingsError(f"--within: {exc}") from None
    if within <= 0:
        raise SettingsError("--within: must be positive (how long the change may take to come)")
    command = Command(action="start", plan=plan.to_dict())
    _send(args, command, within, strict=True)
    print(
        f"armed {args.tenant}/{args.env}: its next change rolls out {plan.describe()} "
        f"(if it comes within {format_duration(within)}); "
        f"follow it with `configbus rollout status {args.tenant} {args.env}`",
        file=out,
    )
    return 0


def _promote(args: argparse.Namespace, out: TextIO) -> int:
    rollout = _send(args, Command(action="promote", step_only=args.step))
    what = "to its next step" if args.step else "to every instance"
    print(
        f"asked the publisher to promote {args.tenant}/{args.env}'s rollout {rollout} {what}",
        file=out,
    )
    return 0


def _abort(args: argparse.Namespace, out: TextIO) -> int:
    rollout = _send(args, Command(action="abort"))
    print(
        f"asked the publisher to abort {args.tenant}/{args.env}'s rollout {rollout}: its "
        "instances go back to the stable version",
        file=out,
    )
    return 0


def _send(
    args: argparse.Namespace, command: Command, ttl_s: float = 600.0, *, strict: bool = False
) -> str:
    """Sign and send `command`, to be acted on within `ttl_s` seconds: at most the
    operator key's max_ttl (the daemon refuses longer), an error when `strict`. A
    promote or abort names the rollout running now, so that the daemon never applies
    it to another; a start is refused while one runs. Returns the rollout's id."""
    bus, topics, trust, key = operator_signer(args)
    entry = trust.get(key.kid)
    longest = entry.max_ttl if entry is not None and entry.max_ttl is not None else None
    if longest is not None and ttl_s > longest:
        if strict:
            raise SettingsError(
                f"--within {format_duration(ttl_s)} is longer than key {key.kid!r}'s max_ttl "
                f"({format_duration(longest)}): the daemon would refuse the command"
            )
        ttl_s = longest
    cause = Cause(
        sources=(f"rollout {command.action}",), actor=_actor(args, key), reason=args.reason
    )

    async def send() -> str:
        latest = await latest_candidate(bus, topics, args.tenant, args.env, trust)
        tag = latest.body.rollout if latest is not None else None
        name = f"{args.tenant}/{args.env}"
        if command.action == "start":
            if tag is not None and tag.state == "running":
                raise SettingsError(f"rollout {tag.id} of {name} runs: promote or abort it first")
            meant = command
        elif tag is None or tag.state != "running":
            last = f" (the last, {tag.id}, was {tag.state})" if tag is not None else ""
            raise SettingsError(f"no rollout of {name} runs{last}")
        else:
            meant = msgspec.structs.replace(command, rollout=tag.id)
        await send_command(
            bus,
            topics,
            args.tenant,
            args.env,
            meant,
            key=key,
            trust=trust,
            cause=cause,
            ttl_s=ttl_s,
        )
        return meant.rollout

    return _run(send())
