"""The `configbus` command. Thin: it parses arguments and calls the library.

Exit codes: 0 success, 1 a failed check (the tree has problems), 2 a usage error (bad
arguments, an unknown environment, tenant or override named on the command line).
Errors are one line each on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import yaml

from configbus import __version__, cli_bus, cli_compliance, cli_keys, cli_release, cli_waiver
from configbus.errors import (
    ConfigBusError,
    SettingsError,
    TreeError,
    UnknownNameError,
)
from configbus.tree import EnvironmentTree, default_root
from configbus.tree.layer import Layer, LayerKind
from configbus.tree.resolved import ResolvedConfig, Step
from configbus.tree.values import DELETE, redacted

__all__ = ["main"]

NO_TENANT = "-"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args, sys.stdout)
    except (UnknownNameError, SettingsError) as exc:  # usage: what was asked cannot be
        _errors(exc)
        return 2
    except ConfigBusError as exc:
        _errors(exc)
        return 1
    except BrokenPipeError:  # `configbus render ... | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:  # Ctrl-C, e.g. on `tail -f`: a clean stop, no traceback
        print(file=sys.stderr)
        return 130
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="configbus",
        description="Resolve, check and distribute layered configuration.",
    )
    parser.add_argument("--version", action="version", version=f"configbus {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    root = argparse.ArgumentParser(add_help=False)
    root.add_argument(
        "--root",
        metavar="DIR",
        help="the environment tree (default: $CONFIGBUS_ROOT, then ./environments)",
    )
    stream = argparse.ArgumentParser(add_help=False)
    stream.add_argument("tenant", metavar="TENANT", help=f"tenant id, or {NO_TENANT} for none")
    stream.add_argument("env", metavar="ENV", help="environment (dev, staging, prod, ...)")
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument(
        "--redis",
        metavar="URL",
        help="include the tenant store's layer (default $CONFIGBUS_REDIS_URL), as the daemon does",
    )
    store.add_argument(
        "--no-store", action="store_true", help="the files alone, without the tenant store"
    )
    store.add_argument(
        "--bootstrap-servers",
        metavar="HOSTS",
        help="read the emergency overrides in effect from Kafka, as the top layer (default "
        "$CONFIGBUS_BOOTSTRAP_SERVERS)",
    )
    store.add_argument(
        "--trust", metavar="FILE", help="to verify those overrides (default $CONFIGBUS_TRUST)"
    )

    validate = commands.add_parser(
        "validate",
        parents=[root],
        help="check the whole tree: every environment, override and tenant stream",
    )
    validate.add_argument("-q", "--quiet", action="store_true", help="print only problems")
    validate.set_defaults(func=_validate)

    render = commands.add_parser(
        "render",
        parents=[root, stream, store],
        help="print a stream's resolved config, secrets redacted",
    )
    render.add_argument(
        "--overrides",
        metavar="A,B",
        help="overrides to apply, in order, instead of the tenant's declared ones",
    )
    render.add_argument("--format", choices=("json", "yaml"), default="yaml")
    render.set_defaults(func=_render)

    explain = commands.add_parser(
        "explain", parents=[root, stream, store], help="show which layers set a key, lowest first"
    )
    explain.add_argument("key", metavar="KEY", help="dotted key, e.g. database.postgresql.port")
    explain.set_defaults(func=_explain)

    cli_keys.register(commands)  # generate, rotate, retire, revoke, list
    cli_bus.register(commands, root)  # daemon, publish, tail, tenant
    cli_release.register(commands, root)  # promote, migrate plan|apply
    compliance = cli_compliance.register(commands, root)  # check, report, rules
    cli_waiver.register(compliance, cli_bus.kafka_options())  # waive, waivers
    return parser


def _tree(args: argparse.Namespace) -> EnvironmentTree:
    root = default_root(args.root)
    if not root.is_dir():
        raise UnknownNameError(f"{root}: no such directory (give --root or set CONFIGBUS_ROOT)")
    return EnvironmentTree(root)


def _stream(args: argparse.Namespace, tree: EnvironmentTree) -> tuple[str | None, str]:
    tenant = None if args.tenant == NO_TENANT else args.tenant
    env = tree.environment(args.env)
    if tenant is not None:
        tree.tenant(tenant)  # unknown tenant: a usage error
    return tenant, env


def _validate(args: argparse.Namespace, out: TextIO) -> int:
    tree = _tree(args)
    report = tree.check()
    for problem in report.problems:
        print(problem, file=sys.stderr)
    if not report.ok:
        print(
            f"{len(report.problems)} problem(s) in {tree.root} "
            f"({report.files} files, {report.streams} streams)",
            file=sys.stderr,
        )
        return 1
    if not args.quiet:
        print(f"ok: {report.files} files, {report.streams} streams valid", file=out)
    return 0


def _render(args: argparse.Namespace, out: TextIO) -> int:
    tree = _tree(args)
    tenant, env = _stream(args, tree)
    overrides = None
    if args.overrides is not None:
        overrides = [name.strip() for name in args.overrides.split(",") if name.strip()]
    runtime = _runtime(args, tenant, env)
    config = tree.validate(tree.resolve(env, tenant, overrides, runtime=runtime))
    data = config.redacted()
    if args.format == "json":
        json.dump(data, out, indent=2, ensure_ascii=False)
        out.write("\n")
    else:
        out.write(f"# {_title(config)}  sha256:{config.hash}\n")
        for layer in config.layers:
            if layer.kind is LayerKind.EMERGENCY:
                out.write(f"# {layer.describe()}\n")
        yaml.safe_dump(data, out, sort_keys=False, allow_unicode=True, width=100)
    return 0


def _explain(args: argparse.Namespace, out: TextIO) -> int:
    tree = _tree(args)
    tenant, env = _stream(args, tree)
    config = tree.resolve(env, tenant, runtime=_runtime(args, tenant, env))
    steps = config.explain(args.key)
    if not steps:
        raise TreeError(f"{args.key}: not set by any layer of {_title(config)}")
    print(f"{args.key} in {_title(config)}, lowest layer first:", file=out)
    rows = [(str(s.origin), s.origin.layer.describe(), _shown(s)) for s in steps]
    width = [max(len(row[i]) for row in rows) for i in range(2)]
    for number, (where, layer, value) in enumerate(rows, 1):
        print(f"  {number}. {where:<{width[0]}}  {layer:<{width[1]}}  {value}", file=out)
    origin = config.origin(args.key)
    if origin is None:
        print("=> not in the resolved config (deleted)", file=out)
    else:
        print(f"=> {_value(config.get(args.key))}  from {origin}", file=out)
    return 0


def _runtime(args: argparse.Namespace, tenant: str | None, env: str) -> list[Layer]:
    """The layers above the files: the tenant store's (unless --no-store), then the
    emergency overrides in effect (when Kafka is given), as the daemon and the
    subscribers stack them."""
    from configbus import cli_override

    runtime = [] if args.no_store else cli_bus.store_layers(args.redis, tenant, env)
    return runtime + cli_override.override_layers(args.bootstrap_servers, args.trust, tenant, env)


def _shown(step: Step) -> str:
    if step.note:
        return f"({step.note})"
    return "!delete" if step.value is DELETE else _value(step.value)


def _value(value: Any) -> str:
    return json.dumps(redacted(value), ensure_ascii=False)


def _title(config: ResolvedConfig) -> str:
    title = f"{config.tenant or '(no tenant)'}/{config.env}"
    if config.overrides:
        title += f" [{', '.join(config.overrides)}]"
    return title


def _errors(exc: ConfigBusError) -> None:
    problems = exc.problems if isinstance(exc, TreeError) else ()
    if not problems:
        print(f"configbus: {exc}", file=sys.stderr)
    for problem in problems:
        print(problem if problem.source else f"configbus: {problem.message}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
