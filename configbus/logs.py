"""Logging set-up for the command line. The library itself only logs through
`logging.getLogger(__name__)` and adds no handlers; the CLI calls `configure`. Both
formatters mask credentials that ride in URLs (`configbus.redact`)."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Final

from configbus.redact import without_credentials

__all__ = ["JsonFormatter", "TextFormatter", "configure"]

# Attributes every LogRecord has; anything else was passed in `extra=` and is logged.
_STANDARD: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and the `extra` fields
    (tenant, env, version, duration_ms, ...)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": without_credentials(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = without_credentials(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["error"] = without_credentials(self.formatException(record.exc_info))
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``LEVEL logger: message``, credentials masked."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return without_credentials(super().format(record))


def configure(*, json_lines: bool, level: str = "INFO") -> None:
    """Send configbus's logs to stderr: JSON lines for daemons, plain text otherwise."""
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
