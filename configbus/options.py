"""Resolving one option: the argument, then the environment variable, then the default."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from configbus.errors import SettingsError

__all__ = ["format_duration", "parse_duration", "pick"]

T = TypeVar("T")


def pick(
    value: Any,
    variable: str,
    default: T,
    convert: Callable[[str], T],
    environ: Mapping[str, str] | None = None,
) -> T:
    """The argument when given, else the environment variable, else the default."""
    if value is not None:
        return value  # type: ignore[no-any-return]
    raw = (os.environ if environ is None else environ).get(variable)
    if raw is None or raw == "":
        return default
    try:
        return convert(raw)
    except ValueError as exc:
        raise SettingsError(f"{variable}={raw!r}: {exc}") from None


_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_UNITS = (86400, 3600, 60, 1)


def parse_duration(text: str) -> int:
    """Seconds in a duration such as ``30m``, ``2h``, ``1h30m``, ``90s`` or ``1d``; a
    bare number is seconds. Raises `ValueError` naming what was given."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    match = _DURATION.fullmatch(text)
    if not text or match is None:
        raise ValueError(f"{text!r} is not a duration (say 90s, 30m, 2h, 1h30m or 1d)")
    return sum(int(part) * unit for part, unit in zip(match.groups(), _UNITS, strict=True) if part)


def format_duration(seconds: float) -> str:
    """``1h30m``, ``45s``: a duration as `parse_duration` reads it, to the second."""
    left, parts = max(0, round(seconds)), list[str]()
    for unit, name in zip(_UNITS, "dhms", strict=True):
        if left >= unit or (unit == 1 and not parts):
            parts.append(f"{left // unit}{name}")
            left %= unit
    return "".join(parts)


_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}")
_VALUE = re.compile(r"[A-Za-z0-9._-]{0,63}")


def parse_labels(items: Iterable[str], what: str = "--select") -> dict[str, str]:
    """``name=value`` items as a dict; a malformed one is an error naming it."""
    labels: dict[str, str] = {}
    for item in items:
        for part in (p.strip() for p in item.split(",")):
            if not part:
                continue
            name, eq, value = part.partition("=")
            if not eq or not _LABEL.fullmatch(name) or not _VALUE.fullmatch(value):
                raise SettingsError(
                    f"{what} {part!r}: say name=value (a label name of letters, digits, "
                    "._/-, and a value of letters, digits, ._-)"
                )
            labels[name] = value
    return labels
