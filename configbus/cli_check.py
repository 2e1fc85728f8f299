"""`configbus check`: is the daemon (or agent) alive, or ready? For scripts and probes.

    configbus check                       # GET /healthz at $CONFIGBUS_HTTP
    configbus check --ready               # GET /readyz
    configbus check --url http://10.0.0.5:9464 --ready

One line on stdout when it passes (exit 0), on stderr when it does not (exit 1): the
URL, the status, and the failing checks. No URL and no ``CONFIGBUS_HTTP``: exit 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

from configbus.errors import SettingsError
from configbus.health import http_address, local_url
from configbus.health.check import probe
from configbus.options import pick

__all__ = ["register"]


def register(commands: Any) -> None:
    check = commands.add_parser(
        "check",
        help="ask a daemon's or agent's /healthz (or /readyz): exit 0 when it passes, else 1",
    )
    check.add_argument(
        "--url",
        metavar="URL",
        help="http://HOST:PORT of the daemon or agent (default: from $CONFIGBUS_HTTP, "
        "its --http address, on this host)",
    )
    check.add_argument(
        "--ready", action="store_true", help="ask /readyz (ready to serve) instead of /healthz"
    )
    check.add_argument(
        "--timeout", type=float, default=5.0, metavar="SECONDS", help="give up after (5)"
    )
    check.set_defaults(func=_check)


def _check(args: argparse.Namespace, out: TextIO) -> int:
    if args.timeout <= 0:
        raise SettingsError(f"--timeout {args.timeout:g}: must be positive")
    answer = probe(target_url(args.url, args.ready), args.timeout)
    print(answer.line, file=out if answer.ok else sys.stderr)
    return 0 if answer.ok else 1


def target_url(url: str | None, ready: bool) -> str:
    """The URL to ask: `url` (its path, when it has one, else /healthz or /readyz),
    else the one $CONFIGBUS_HTTP is reached at from this host."""
    path = "/readyz" if ready else "/healthz"
    if url:
        parts = urlsplit(url)
        if parts.path in ("", "/"):
            return urlunsplit(parts._replace(path=path))
        return url
    address = http_address(pick(None, "CONFIGBUS_HTTP", "", str))
    if address is None:
        raise SettingsError("give --url or set CONFIGBUS_HTTP (the daemon's --http address)")
    return local_url(address, path, "CONFIGBUS_HTTP")
