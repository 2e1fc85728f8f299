"""The client side of the probes: `configbus check` asks a daemon's or an agent's
``/healthz`` (or ``/readyz``) and says, in one line, whether it passes and why not.

Plain blocking HTTP (the standard library's): a command runs one request and exits.
"""

from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from configbus.errors import SettingsError

__all__ = ["Answer", "probe"]

MAX_BODY = 64 * 1024


@dataclass(frozen=True, slots=True)
class Answer:
    """What a probe said: whether it passes, and a line saying so."""

    ok: bool
    line: str


def probe(url: str, timeout: float = 5.0) -> Answer:
    """GET `url` (``http://HOST:PORT/healthz`` or ``/readyz``): passing on a 200.
    Raises `SettingsError` for a URL that is not ``http://HOST:PORT/PATH``."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "http" or not parts.hostname or port is None:
        raise SettingsError(f"--url {url!r}: say http://HOST:PORT (e.g. http://127.0.0.1:9464)")
    path = parts.path or "/"
    connection = http.client.HTTPConnection(parts.hostname, port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"Accept": "application/json"})
        response = connection.getresponse()
        body = response.read(MAX_BODY)
    except (OSError, http.client.HTTPException) as exc:
        reason = "no answer" if isinstance(exc, socket.timeout) else str(exc) or type(exc).__name__
        return Answer(False, f"{url}: {reason}")
    finally:
        connection.close()
    return Answer(response.status == 200, f"{url}: {_summary(response.status, body)}")


def _summary(status: int, body: bytes) -> str:
    """``200 ready`` or ``503 not ready: writer: standing by ...; kafka: ...``: the
    failing checks of a JSON body, else its first line."""
    try:
        document: Any = json.loads(body)
    except ValueError:
        first = body.decode("utf-8", "replace").strip().splitlines()[:1]
        return f"{status} {first[0][:200] if first else ''}".rstrip()
    if not isinstance(document, dict):
        return str(status)
    verdict = next((w for w in ("ready", "alive") if w in document), "")
    passed = document.get(verdict) is True
    checks = document.get("checks")
    failing = []
    if isinstance(checks, dict):
        for name, check in checks.items():
            if isinstance(check, dict) and check.get("ok") is not True:
                failing.append(f"{name}: {str(check.get('detail', ''))[:200]}")
    shown = verdict if passed else f"not {verdict}" if verdict else ""
    text = f"{status} {shown}".rstrip()
    return f"{text}: {'; '.join(failing)}" if failing else text
