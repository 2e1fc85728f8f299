"""Resolving one option: the argument, then the environment variable, then the default."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from configbus.errors import SettingsError

__all__ = ["pick"]

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
