"""Which keys changed between two configs, for change callbacks and event metadata."""

from __future__ import annotations

from collections.abc import Mapping

from configbus.tree.values import Value

__all__ = ["changed_paths"]


def changed_paths(old: Mapping[str, Value] | None, new: Mapping[str, Value]) -> list[str]:
    """Dotted paths of the leaves (scalars, lists, secret references) that were added,
    removed or changed from `old` to `new`, sorted. A list counts as one leaf."""
    found: set[str] = set()
    _diff(old if old is not None else {}, new, "", found)
    return sorted(found)


def _diff(old: Value, new: Value, prefix: str, found: set[str]) -> None:
    if old is new:
        return  # shared subtree: unchanged, and no need to look inside
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in old.keys() | new.keys():
            path = f"{prefix}.{key}" if prefix else key
            if key not in new:
                _leaves(old[key], path, found)
            elif key not in old:
                _leaves(new[key], path, found)
            else:
                _diff(old[key], new[key], path, found)
    elif isinstance(old, Mapping) or isinstance(new, Mapping):
        _leaves(old, prefix, found)
        _leaves(new, prefix, found)
    elif old != new or type(old) is not type(new):
        found.add(prefix)


def _leaves(value: Value, prefix: str, found: set[str]) -> None:
    if isinstance(value, Mapping):
        for key, child in value.items():
            _leaves(child, f"{prefix}.{key}" if prefix else key, found)
    elif prefix:
        found.add(prefix)
