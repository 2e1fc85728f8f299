"""`configbus dashboard`: the live dashboard in the browser (docs/dashboard.md).

Registered by `configbus.cli_bus`; it builds the settings and calls the library.
"""

from __future__ import annotations

import argparse
from typing import Any, TextIO

__all__ = ["register"]


def register(commands: Any, kafka: argparse.ArgumentParser) -> None:
    dashboard = commands.add_parser(
        "dashboard",
        parents=[kafka],
        help="a live dashboard in the browser: versions, rollouts, latency, refusals, "
        "overrides (read-only)",
    )
    dashboard.add_argument(
        "--listen",
        metavar="ADDRESS",
        help="HOST:PORT to serve on (default $CONFIGBUS_DASHBOARD_LISTEN, else "
        "127.0.0.1:8765); unauthenticated: anywhere but loopback, put it behind a proxy "
        "that authenticates",
    )
    dashboard.add_argument(
        "--trust",
        metavar="FILE",
        help="trust file (default $CONFIGBUS_TRUST): only what verifies with it is shown",
    )
    dashboard.add_argument(
        "--tenant",
        action="append",
        default=[],
        metavar="TENANT",
        help="only this tenant (repeatable; default every tenant whose topic exists)",
    )
    dashboard.add_argument("--log-level", default="INFO")
    dashboard.set_defaults(func=_dashboard)


def _dashboard(args: argparse.Namespace, out: TextIO) -> int:
    from configbus.cli_bus import run_async
    from configbus.dashboard import DashboardSettings, run
    from configbus.logs import configure

    settings = DashboardSettings.build(
        listen=args.listen,
        trust=args.trust,
        tenants=args.tenant,
        bootstrap_servers=args.bootstrap_servers,
        topic_prefix=args.topic_prefix,
        audit_topic=args.audit_topic,
        acks_topic=args.acks_topic,
    )
    configure(json_lines=True, level=args.log_level)
    return run_async(run(settings))
