"""Which keys changed between two configs, for change callbacks and event metadata."""

from __future__ import annotations

from configbus.tree.values import Value, canonical_json

__all__ = ["changed_paths"]


def changed_paths(old: Value | None, new: Value) -> list[str]:
    """Dotted paths of the leaves (scalars, lists, secret references) that were added,
    removed or changed from `old` to `new`, sorted. A list counts as one leaf.

    Unchanged subtrees are skipped after a comparison in C, so the cost follows the
    size of the change, not of the config: configs are dicts, and ``==`` on them runs
    in C. Python calls ``1 == 1.0 == True``, so equal subtrees are confirmed by their
    canonical JSON (also encoded in C), which tells those apart."""
    found: set[str] = set()
    _diff(old if old is not None else {}, new, "", found)
    return sorted(found)


def _diff(old: Value, new: Value, prefix: str, found: set[str]) -> None:
    if old is new:
        return
    if isinstance(old, dict) and isinstance(new, dict):
        if old == new and canonical_json(old) == canonical_json(new):
            return
        for key in old.keys() | new.keys():
            path = f"{prefix}.{key}" if prefix else key
            if key not in new:
                _leaves(old[key], path, found)
            elif key not in old:
                _leaves(new[key], path, found)
            else:
                _diff(old[key], new[key], path, found)
    elif isinstance(old, dict) or isinstance(new, dict):
        _leaves(old, prefix, found)
        _leaves(new, prefix, found)
    elif type(old) is not type(new) or old != new:
        found.add(prefix)
    elif isinstance(old, tuple) and canonical_json(old) != canonical_json(new):
        found.add(prefix)  # equal lists whose items differ in type: (1,) and (True,)


def _leaves(value: Value, prefix: str, found: set[str]) -> None:
    if isinstance(value, dict):
        for key, child in value.items():
            _leaves(child, f"{prefix}.{key}" if prefix else key, found)
    elif prefix:
        found.add(prefix)
