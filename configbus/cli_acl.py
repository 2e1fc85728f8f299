"""``configbus acl plan|apply``: the Kafka ACLs of the tree's tenants and the deployment's
principals, as code (configbus/ops/acls.py says what each role is granted).

    configbus acl plan --file acls.yml                 # what apply would change
    configbus acl apply --file acls.yml [--prune]      # make it so (--prune: remove too)
    configbus acl plan --publisher User:configbus-publisher \\
        --service aurora-records=User:svc-aurora --operator User:oncall

The principals come from ``--file`` (default ``$CONFIGBUS_ACLS``) and the flags
together; the tenants from the tree (``--root``). The command connects as whoever the
``CONFIGBUS_KAFKA_*`` variables say, who needs the cluster's Describe and Alter
permissions (a super user, in practice).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, TextIO

from configbus.errors import BusError, SettingsError, UnknownNameError
from configbus.options import pick

if TYPE_CHECKING:  # imported when used: `configbus --help` does not load them
    from configbus.bus import Admin, TopicNames
    from configbus.bus.acls import Acl
    from configbus.ops.acls import AclPlan, Deployment

__all__ = ["register"]

SETTLE_S = 10.0  # how long `apply` waits for the broker to show what it changed


def register(commands: Any, root: argparse.ArgumentParser, kafka: argparse.ArgumentParser) -> None:
    acl = commands.add_parser("acl", help="Kafka ACLs for the tree's tenants, as code")
    actions = acl.add_subparsers(dest="acl_command", required=True, metavar="ACTION")
    who = argparse.ArgumentParser(add_help=False, parents=[root, kafka])
    who.add_argument(
        "--file", metavar="FILE", help="the deployment's principals (default $CONFIGBUS_ACLS)"
    )
    who.add_argument(
        "--publisher", action="append", default=[], metavar="PRINCIPAL", help="User:NAME"
    )
    who.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="TENANT=PRINCIPAL",
        help="a service of TENANT (repeat for more)",
    )
    who.add_argument(
        "--operator",
        action="append",
        default=[],
        metavar="PRINCIPAL[=TENANT,...]",
        help="an operator of those tenants (default: every tenant)",
    )
    who.add_argument(
        "--agent",
        action="append",
        default=[],
        metavar="PRINCIPAL[=TENANT,...]",
        help="a host agent reading those tenants (default: every tenant)",
    )
    show = actions.add_parser(
        "plan", parents=[who], help="print the ACLs apply would create and remove"
    )
    show.add_argument(
        "--check", action="store_true", help="exit 1 when the cluster differs from the plan"
    )
    show.set_defaults(func=_plan)
    apply = actions.add_parser("apply", parents=[who], help="create the ACLs the plan lists")
    apply.add_argument(
        "--prune", action="store_true", help="also remove the ACLs the plan lists for removal"
    )
    apply.set_defaults(func=_apply)


def _deployment(args: argparse.Namespace) -> Deployment:
    from configbus.ops.acls import Deployment

    path = pick(args.file, "CONFIGBUS_ACLS", "", str)
    deployment = Deployment.load(path) if path else Deployment()
    deployment = deployment.merged(
        Deployment.from_flags(
            publishers=args.publisher,
            services=args.service,
            operators=args.operator,
            agents=args.agent,
        )
    )
    if deployment.empty:
        raise SettingsError(
            "no principals: give --file acls.yml (or set CONFIGBUS_ACLS), or --publisher, "
            "--service, --operator, --agent"
        )
    return deployment


def _tenants(args: argparse.Namespace) -> list[str]:
    from configbus.tree import EnvironmentTree, default_root

    root = default_root(args.root)
    if not root.is_dir():
        raise UnknownNameError(f"{root}: no such directory (give --root or set CONFIGBUS_ROOT)")
    return EnvironmentTree(root).tenants()


async def _current_plan(
    admin: Admin, deployment: Deployment, tenants: list[str], topics: TopicNames
) -> AclPlan:
    from configbus.bus.acls import describe_acls
    from configbus.ops.acls import plan

    return plan(deployment, tenants, topics, await describe_acls(admin))


def _connect(args: argparse.Namespace) -> tuple[Admin, TopicNames, Deployment, list[str]]:
    from configbus.bus import Admin
    from configbus.cli_bus import _kafka

    deployment, tenants = _deployment(args), _tenants(args)
    kafka, topics = _kafka(args)
    # aiokafka logs each refused connection; the command says why it failed in one line.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    return Admin(kafka), topics, deployment, tenants


def _plan(args: argparse.Namespace, out: TextIO) -> int:
    from configbus.cli_bus import run_async

    admin, topics, deployment, tenants = _connect(args)

    async def run() -> AclPlan:
        async with admin:
            return await _current_plan(admin, deployment, tenants, topics)

    found = run_async(run())
    for line in found.lines():
        print(line, file=out)
    return 1 if args.check and found.changes else 0


def _apply(args: argparse.Namespace, out: TextIO) -> int:
    from configbus.bus.acls import create_acls, delete_acls
    from configbus.cli_bus import run_async

    admin, topics, deployment, tenants = _connect(args)

    async def run() -> tuple[AclPlan, list[Acl]]:
        async with admin:
            todo = await _current_plan(admin, deployment, tenants, topics)
            await create_acls(admin, todo.create)
            removed = await delete_acls(admin, todo.remove) if args.prune else []
            await _settled(admin, deployment, tenants, topics, args.prune)
            return todo, removed

    todo, removed = run_async(run())
    for note in todo.notes:
        print(f"note: {note}", file=out)
    for acl in todo.create:
        print(f"created {acl}", file=out)
    for acl in removed:
        print(f"removed {acl}", file=out)
    left = (
        ""
        if args.prune or not todo.remove
        else (f"; {len(todo.remove)} to remove left in place (apply --prune removes them)")
    )
    print(
        f"acl apply: {len(todo.create)} created, {len(removed)} removed, "
        f"{len(todo.keep)} in place{left}",
        file=out,
    )
    return 0


async def _settled(
    admin: Admin, deployment: Deployment, tenants: list[str], topics: TopicNames, prune: bool
) -> None:
    """Wait until the broker shows the ACLs applied (they travel through the metadata
    log), so that what runs next, a plan or a client, finds them."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        left = await _current_plan(admin, deployment, tenants, topics)
        if not left.create and not (prune and left.remove):
            return
        if time.monotonic() > deadline:
            done, acl = ("created", left.create[0]) if left.create else ("removed", left.remove[0])
            raise BusError(
                f"after {SETTLE_S:g}s the broker still does not show the ACLs {done}, e.g. {acl}"
            )
        await asyncio.sleep(0.1)
