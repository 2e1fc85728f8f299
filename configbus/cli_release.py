"""`configbus promote` and `configbus migrate plan | apply`: release managers carry
values from one environment to the next and change the tree's keys, through edits of
the tree's files that go to review (``git diff``) like any other.

Registered by `configbus.cli`. Thin: it parses arguments, calls
`configbus.tree.promote` and `configbus.tree.migrate`, and prints what they return.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING, Any, TextIO

from configbus.errors import UnknownNameError, display_path
from configbus.tree import EnvironmentTree, default_root

if TYPE_CHECKING:  # imported where used: other commands never load the YAML editor
    from configbus.tree.migrate import Edit, MigrationPlan
    from configbus.tree.promote import Change, PromotionPlan, PromotionResult

__all__ = ["register"]

NO_TENANT = "-"


def register(commands: Any, root: argparse.ArgumentParser) -> None:
    promote = commands.add_parser(
        "promote",
        parents=[root],
        help="carry config values from one environment to another: a plan, or --apply",
    )
    promote.add_argument("--from", dest="source", required=True, metavar="ENV", help="staging")
    promote.add_argument("--to", dest="target", required=True, metavar="ENV", help="prod")
    promote.add_argument(
        "--tenant",
        metavar="TENANT",
        help=f"one tenant's stream, or {NO_TENANT} for the environments' own files "
        "(default: every tenant that runs in both)",
    )
    promote.add_argument(
        "--keys",
        nargs="+",
        action="extend",
        default=[],
        metavar="PREFIX",
        help="only keys under these dotted prefixes (features, ml_services.model_management)",
    )
    promote.add_argument(
        "--exclude",
        nargs="+",
        action="extend",
        default=[],
        metavar="PREFIX",
        help="leave keys under these prefixes out (application.environment, ...)",
    )
    mode = promote.add_mutually_exclusive_group()
    mode.add_argument("--apply", action="store_true", help="write the changes into the files")
    mode.add_argument(
        "--check", action="store_true", help="exit 1 when there is something to promote (CI)"
    )
    promote.add_argument("--json", action="store_true", help="machine-readable output")
    promote.set_defaults(func=_promote)

    migrate = commands.add_parser(
        "migrate", help="versioned migrations of the tree's keys (migrations/NNNN_name.yml)"
    ).add_subparsers(dest="migrate_command", required=True, metavar="ACTION")
    plan = migrate.add_parser(
        "plan", parents=[root], help="list pending migrations and every place each changes"
    )
    plan.add_argument("--check", action="store_true", help="exit 1 when migrations are pending")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.set_defaults(func=_migrate_plan)
    apply = migrate.add_parser(
        "apply", parents=[root], help="apply pending migrations in order, and record them"
    )
    apply.add_argument("--json", action="store_true", help="machine-readable output")
    apply.set_defaults(func=_migrate_apply)


def _tree(args: argparse.Namespace) -> EnvironmentTree:
    root = default_root(args.root)
    if not root.is_dir():
        raise UnknownNameError(f"{root}: no such directory (give --root or set CONFIGBUS_ROOT)")
    return EnvironmentTree(root)


# -- promote ----------------------------------------------------------------------------
def _promote(args: argparse.Namespace, out: TextIO) -> int:
    from configbus.tree.promote import apply_promotion, plan_promotion

    tree = _tree(args)
    tenants: list[str | None] | None = None
    if args.tenant is not None:
        tenants = [None if args.tenant == NO_TENANT else args.tenant]
    plan = plan_promotion(
        tree, args.source, args.target, tenants=tenants, keys=args.keys, exclude=args.exclude
    )
    if args.apply:
        result = apply_promotion(tree, plan)
        if args.json:
            _json(result.to_dict(), out)
        else:
            _print_result(result, out)
        return 0
    if args.json:
        _json(plan.to_dict(), out)
    else:
        _print_plan(plan, out)
    return 1 if args.check and plan.changes else 0


def _print_plan(plan: PromotionPlan, out: TextIO) -> None:
    print(_heading(plan), file=out)
    for stream in plan.streams:
        title = _title(stream.tenant, plan.target)
        target = _shown_path(plan.root, stream.file)
        if not stream.changes and not stream.skipped:
            print(f"\n{title}: nothing to promote", file=out)
            continue
        action = "creates" if stream.creates else "writes"
        print(f"\n{title}: {_count(stream.changes, 'change')}, {action} {target}", file=out)
        for change in stream.changes:
            print(f"  {change.action:<8} {_values(change)}", file=out)
            print(f"           {_where(plan.root, change)}", file=out)
        for skip in stream.skipped:
            print(f"  skipped  {skip.key}: {skip.reason}", file=out)
    changes, skipped = plan.changes, plan.skipped
    if changes:
        print(
            f"\n{_count(changes, 'change')} to promote, {len(skipped)} skipped: write them with "
            "--apply, then review `git diff` and commit",
            file=out,
        )
    else:
        print(f"\nnothing to promote ({len(skipped)} skipped)", file=out)


def _print_result(result: PromotionResult, out: TextIO) -> None:
    plan = result.plan
    print(_heading(plan), file=out)
    if not result.files:
        print("nothing to promote: no file written", file=out)
        return
    for written in result.files:
        verb = "created" if written.created else "wrote"
        path = _shown_path(plan.root, written.file)
        print(f"\n{verb} {path} ({_count(written.changes, 'change')})", file=out)
        for change in written.changes:
            line = f"{change.line:>5}" if change.line is not None else "    -"
            what = {"mark-delete": "!delete", "delete": "deleted"}.get(change.write, "")
            value = f"{_json_text(change.old, change.action == 'added')} -> " + (
                what or _json_text(change.new, change.action == "removed")
            )
            print(f"  {line}  {change.action:<8} {change.key}: {value}", file=out)
    for skip in plan.skipped:
        print(f"  skipped  {_title(skip.tenant, plan.target)} {skip.key}: {skip.reason}", file=out)
    print(
        "\nreview the change with `git diff`, commit it, and the publisher daemon publishes "
        "it (for a staged rollout, arm it first: `configbus rollout start TENANT ENV ...`)",
        file=out,
    )


def _heading(plan: PromotionPlan) -> str:
    scope = f"keys under {', '.join(plan.keys)}" if plan.keys else "every key"
    if plan.exclude:
        scope += f" except {', '.join(plan.exclude)}"
    return f"promote {plan.source} -> {plan.target}: {scope}"


def _values(change: Change) -> str:
    old = _json_text(change.old, change.action == "added")
    new = _json_text(change.new, change.action == "removed")
    return f"{change.key}: {old} -> {new}"


def _where(root: str, change: Change) -> str:
    path = _shown_path(root, change.file)
    at = f"{path}:{change.line}" if change.in_file and change.line is not None else path
    if change.write == "delete":
        return f"deletes it at {at}"
    if change.write == "mark-delete":
        return f"writes !delete at {at} (a lower layer sets it)"
    if change.in_file:
        return f"sets it at {at}"
    if change.line is not None:
        return f"adds it to {path} (under line {change.line})"
    return f"adds it to {path}"


# -- migrate -----------------------------------------------------------------------------
def _migrate_plan(args: argparse.Namespace, out: TextIO) -> int:
    from configbus.tree.migrate import plan_migrations

    status = plan_migrations(_tree(args).root)
    if args.json:
        _json(status.to_dict(), out)
    else:
        folder = _shown_path(status.root, "migrations")
        print(
            f"migrations in {folder}: {len(status.applied)} applied, {len(status.pending)} pending",
            file=out,
        )
        for plan in status.pending:
            _print_migration(status.root, plan, out)
    return 1 if args.check and status.pending else 0


def _migrate_apply(args: argparse.Namespace, out: TextIO) -> int:
    from configbus.tree.migrate import apply_migrations

    result = apply_migrations(_tree(args).root)
    if args.json:
        _json(result.to_dict(), out)
        return 0
    if not result.applied:
        print("nothing to apply: every migration is applied", file=out)
        return 0
    for plan, record in result.applied:
        _print_migration(result.root, plan, out)
        print(f"  applied: {_count(record.files, 'file')} changed", file=out)
    record_file = _shown_path(result.root, result.record_file)
    print(
        f"\nrecorded in {record_file}; review with `git diff`, commit, and the publisher "
        "daemon publishes the streams that changed",
        file=out,
    )
    return 0


def _print_migration(root: str, plan: MigrationPlan, out: TextIO) -> None:
    migration = plan.migration
    about = f": {migration.description}" if migration.description else ""
    print(f"\n{migration.id}{about}", file=out)
    for number, step in enumerate(plan.operations, 1):
        operation = step.operation
        place = f"{_shown_path(root, migration.file)}:{operation.line}"
        print(f"  {number}. {operation.describe()}  ({place})", file=out)
        if not step.edits:
            print("       no file sets it", file=out)
        for edit in step.edits:
            print(f"       {_edit(root, edit)}", file=out)


def _edit(root: str, edit: Edit) -> str:
    path = _shown_path(root, edit.file)
    where = f"{path}:{edit.line}" if edit.line is not None else path
    if edit.action in ("rename", "move"):
        return f"{where}  {edit.old} -> {edit.new}"
    if edit.action == "delete":
        return f"{where}  {edit.key} deleted"
    if edit.action == "mark-delete":
        return f"{where}  {edit.key}: !delete (a parent of the old key is deleted here)"
    return f"{where}  {edit.key}: {_json_text(edit.old)} -> {_json_text(edit.new)}"


# -- output ------------------------------------------------------------------------------
def _shown_path(root: str, relative: str) -> str:
    return display_path(os.path.join(root, relative))


def _title(tenant: str | None, env: str) -> str:
    return f"{tenant or '(no tenant)'}/{env}"


def _count(items: Any, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _json_text(value: Any, absent: bool = False) -> str:
    return "(absent)" if absent else json.dumps(value, ensure_ascii=False)


def _json(data: Any, out: TextIO) -> None:
    json.dump(data, out, indent=2, ensure_ascii=False)
    out.write("\n")
