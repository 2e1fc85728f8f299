"""Health, readiness and metrics over HTTP, for the daemon and the agent
(docs/operations.md): the server (`server.py`), the certificate expiry it reports
(`certs.py`) and the client of `configbus check` (`check.py`)."""

from configbus.health.server import (
    Check,
    HealthServer,
    Target,
    Verdict,
    http_address,
    local_url,
    parse_address,
)

__all__ = [
    "Check",
    "HealthServer",
    "Target",
    "Verdict",
    "http_address",
    "local_url",
    "parse_address",
]
