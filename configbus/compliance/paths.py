"""Dotted paths with wildcards, the way a compliance rule names the settings it checks.

    security.tls.min_version        one setting
    cache.*.tls                     `*` is any one key (or list item): cache.redis.tls, ...
    **.sslmode                      `**` is any number of keys, none included: every
                                    `sslmode` anywhere in the config
    cache.redis.nodes.0             a list item by index

A key that itself holds dots (a logger name such as ``uvicorn.access``) is found as
`configbus.tree.values.walk` finds it: consecutive parts joined again. A secret
reference (`SecretRef`, or ``{"$secret": NAME}`` in plain data) is a value, never a
mapping to descend into.

A `Document` is one config being checked: a pattern that starts with ``**`` (the
usual "everywhere") is answered from an index of every key in the config, built once
per document, instead of a walk over the whole config per rule.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from configbus.tree.values import SECRET_KEY

__all__ = ["Document", "Pattern", "pattern_problem"]

ONE: Final = "*"
ANY: Final = "**"
_INDEX: Final = re.compile(r"0|[1-9][0-9]*")
_PART: Final = re.compile(r"[^*\s]+")
_SCALARS: Final = frozenset({str, int, float, bool, type(None)})

_Key = str | int
_Found = dict[str, Any]  # dotted path -> value, in the order found


def pattern_problem(text: object) -> str | None:
    """What is wrong with a path pattern as written in a pack, or None."""
    if not isinstance(text, str) or not text:
        return "must be a dotted path such as security.tls.min_version"
    parts = text.split(".")
    for part in parts:
        if part in (ONE, ANY):
            continue
        if not part:
            return f"{text!r}: empty part (two dots, or a dot at an end)"
        if not _PART.fullmatch(part):
            return f"{text!r}: {part!r}: a wildcard stands alone, as * or **; no spaces"
    if parts[-1] == ANY:
        return f"{text!r}: ** must be followed by a key (say **.sslmode)"
    return None


@dataclass(frozen=True, slots=True)
class Pattern:
    """A parsed path pattern: `Document.find` gives what it matches."""

    text: str
    parts: tuple[str, ...]
    wild: bool  # holds * or **
    # `**.a.b...`: the keys the first parts after ** may be (a, a.b, ...: a key may hold
    # dots); a `Document` finds them in its index. Empty for other patterns.
    anchors: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Pattern:
        """`text` as a pattern; `pattern_problem(text)` must be None."""
        parts = tuple(text.split("."))
        anchors = []
        if len(parts) > 1 and parts[0] == ANY:
            for end in range(1, len(parts)):
                if parts[end] in (ONE, ANY):
                    break
                anchors.append(".".join(parts[1 : end + 1]))
        return cls(text, parts, ONE in parts or ANY in parts, tuple(anchors))

    def __str__(self) -> str:
        return self.text

    def find(self, data: Any) -> list[tuple[str, Any]]:
        """Every setting the pattern matches in `data` (see `Document.find`)."""
        return Document(data).find(self)


class Document:
    """The data of one config being checked; answers patterns, remembering answers.

    `anchors` are the keys that patterns starting with ``**`` look for (see
    `Pattern.anchors`): the index then holds those keys alone. None indexes every key."""

    __slots__ = ("_anchors", "_found", "_keys", "data")

    def __init__(self, data: Any, anchors: frozenset[str] | None = None) -> None:
        self.data = data
        self._anchors = anchors
        self._keys: dict[str, list[tuple[tuple[_Key, ...], Any]]] | None = None
        self._found: dict[tuple[str, ...], list[tuple[str, Any]]] = {}

    def find(self, pattern: Pattern) -> list[tuple[str, Any]]:
        """Every setting `pattern` matches: its path as the data spells it, and its
        value. Empty when nothing matches."""
        parts = pattern.parts
        known = self._found.get(parts)
        if known is not None:
            return known
        found: _Found = {}
        if not pattern.wild:
            direct = _direct(self.data, parts)  # the usual case: every key as written
            if direct is not _NOTHING:
                found[pattern.text] = direct
            else:
                _match(self.data, parts, 0, (), found)
        elif pattern.anchors and (
            self._anchors is None or self._anchors.issuperset(pattern.anchors)
        ):
            keys = self._index()
            for anchor in pattern.anchors:
                after = 1 + anchor.count(".") + 1  # the parts the anchor stands for, and **
                for path, value in keys.get(anchor, ()):
                    _match(value, parts, after, path, found)
        else:
            _match(self.data, parts, 0, (), found)
        result = self._found[parts] = list(found.items())
        return result

    def _index(self) -> dict[str, list[tuple[tuple[_Key, ...], Any]]]:
        """Where each anchor key sits in the data: key -> (path, value), in order.
        One walk over the data's mappings and lists; plain values are not visited."""
        if self._keys is None:
            anchors = self._anchors
            keys: dict[str, list[tuple[tuple[_Key, ...], Any]]] = {}
            stack: list[tuple[tuple[_Key, ...], Any]] = [((), self.data)]
            while stack:
                path, node = stack.pop()
                below: list[tuple[tuple[_Key, ...], Any]] = []
                if _mapping(node):
                    hits = node.keys() if anchors is None else anchors.intersection(node)
                    for key in hits:
                        keys.setdefault(key, []).append(((*path, key), node[key]))
                    below = [((*path, k), c) for k, c in node.items() if type(c) not in _SCALARS]
                elif isinstance(node, tuple | list):
                    below = [((*path, i), c) for i, c in enumerate(node) if type(c) not in _SCALARS]
                below.reverse()  # depth first, in the data's order
                stack += below
            self._keys = keys
        return self._keys


_NOTHING: Final = object()


def _direct(node: Any, parts: tuple[str, ...]) -> Any:
    """The value at `parts` when each is a key of a dict on the way, else `_NOTHING`
    (then `_match` looks further: list indexes, keys holding dots)."""
    for part in parts:
        if type(node) is not dict and not isinstance(node, dict):
            return _NOTHING
        if SECRET_KEY in node or part not in node:
            return _NOTHING
        node = node[part]
    return node


def _mapping(node: object) -> bool:
    """A mapping to descend into: not a secret reference. (`dict` first: the config's
    own mappings are dicts, and an `isinstance` against an ABC costs ten times more.)"""
    if isinstance(node, dict):
        return SECRET_KEY not in node
    return isinstance(node, Mapping) and SECRET_KEY not in node


def _match(node: Any, parts: tuple[str, ...], at: int, path: tuple[_Key, ...], out: _Found) -> None:
    """Add to `out` what `parts[at:]` matches below `node` (found at `path`)."""
    if at == len(parts):
        out.setdefault(".".join(map(str, path)), node)
        return
    part = parts[at]
    if part in (ANY, ONE):
        children: Iterable[tuple[_Key, Any]]
        if _mapping(node):
            children = node.items()
        elif isinstance(node, tuple | list):
            children = enumerate(node)
        else:
            return  # a plain value: nothing below it
        if part == ANY:
            _match(node, parts, at + 1, path, out)  # no key at all
            for key, child in children:
                if type(child) not in _SCALARS:  # nothing below a plain value
                    _match(child, parts, at, (*path, key), out)  # one more key, still **
        else:
            for key, child in children:
                _match(child, parts, at + 1, (*path, key), out)
        return
    if _mapping(node):
        key = part
        for end in range(at, len(parts)):
            if end > at:
                if parts[end] in (ONE, ANY):
                    break
                key = f"{key}.{parts[end]}"  # a key holding dots: uvicorn.access
            if key in node:
                _match(node[key], parts, end + 1, (*path, key), out)
    elif isinstance(node, tuple | list) and _INDEX.fullmatch(part):
        index = int(part)
        if index < len(node):
            _match(node[index], parts, at + 1, (*path, index), out)
