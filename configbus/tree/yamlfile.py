"""Reading one YAML file of the tree into immutable values plus the line of every key.

PyYAML (with libyaml when present) composes the file into nodes, which carry their
line; we build the values from the nodes ourselves, so that every key's line is known
and every problem in the file is reported, not only the first:

- ``!secret NAME`` becomes a `SecretRef`; ``!delete`` the `DELETE` marker.
- Keys must be non-empty strings, unique within their mapping (YAML itself lets the
  last one win, silently).
- Timestamps stay the strings they were written as; binary, sets, unknown tags and
  numbers JSON cannot hold (``.inf``, ``.nan``) are refused. Anchors, aliases and
  ``<<`` merge keys work as YAML defines them.
- A top-level ``extends: PATH`` names the parent file, relative to this file's folder.
- A top-level ``shared_secrets: [NAME, ...]`` (in an environment's files) names the
  secrets its tenants' layers may reference besides their own ``tenants/<tenant>/...``.
- The limits of `configbus.limits` hold while building: a value nested deeper than
  ``depth`` is a problem at its line, and a file whose aliases expand to more than
  ``nodes`` values is refused at once (a few hundred bytes of nested aliases would
  otherwise expand to billions of values).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import yaml

from configbus.errors import Problem, TreeError
from configbus.limits import DEFAULT_LIMITS, Limits
from configbus.tree.values import (
    DELETE,
    EMPTY,
    FrozenDict,
    LayerValue,
    Path,
    SecretRef,
    format_path,
    secret_name_problem,
)

__all__ = ["ParsedFile", "parse_yaml"]

_BaseLoader: Final[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_RESOLVED_MAX: Final = 16_384  # remembered tag resolutions; past it, forgotten at once
_RESOLVED_TEXT: Final = 64  # characters of the longest text whose tag is remembered
_RESOLVED: Final[dict[tuple[Any, Any, Any], str]] = {}  # (kind, text, implicit) -> tag


class _Loader(_BaseLoader):  # type: ignore[misc]
    """The safe loader, remembering how short texts resolve. Composing calls the
    (Python) resolver for every node, which matches scalars against the implicit-tag
    regexes: a fifth of composing a file. A tag depends only on the node's kind, text
    and implicit flags (the safe loader has no path resolvers), and config files
    repeat their words and numbers, so the answers are kept, bounded in number and
    in the length of the texts kept."""

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        key = (kind, value, implicit)
        tag = _RESOLVED.get(key)
        if tag is not None:
            return tag
        tag = super().resolve(kind, value, implicit)
        if not self.yaml_path_resolvers and (value is None or len(value) <= _RESOLVED_TEXT):
            if len(_RESOLVED) >= _RESOLVED_MAX:
                _RESOLVED.clear()
            _RESOLVED[key] = tag
        return tag


_STR: Final = "tag:yaml.org,2002:str"
_MAP: Final = "tag:yaml.org,2002:map"
_SEQ: Final = "tag:yaml.org,2002:seq"
_TIMESTAMP: Final = "tag:yaml.org,2002:timestamp"
_DIRECTIVES: Final = frozenset({"extends", "shared_secrets"})  # top-level keys that are not config
_MERGE: Final = "tag:yaml.org,2002:merge"
_VALUE: Final = "tag:yaml.org,2002:value"  # the `=` key, a plain string to us
_PLAIN_SCALARS: Final = frozenset(
    [_STR] + [f"tag:yaml.org,2002:{t}" for t in ("int", "float", "bool", "null")]
)


@dataclass(frozen=True, slots=True)
class ParsedFile:
    data: Mapping[str, LayerValue]
    lines: Mapping[Path, int]
    extends: str | None = None
    extends_line: int | None = None
    # `shared_secrets:` of an environment file: secret names its tenants' layers may use
    shares: frozenset[str] = frozenset()
    shares_line: int | None = None


def parse_yaml(source: str, text: str) -> ParsedFile:
    """Parse `text` read from `source`. Raises `TreeError` listing every problem found."""
    bad = yaml.reader.Reader.NON_PRINTABLE.search(text)
    if bad is not None:
        at = text.count("\n", 0, bad.start()) + 1
        message = f"character #x{ord(bad.group()):04x} is not allowed in YAML"
        raise TreeError([Problem(source, at, None, message)])
    loader = _Loader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else None
            what = exc.problem or exc.context or "invalid YAML"
            raise TreeError([Problem(source, line, None, f"YAML syntax error: {what}")]) from None
        except yaml.YAMLError as exc:
            what = str(exc).splitlines()[0]  # one line per problem
            raise TreeError([Problem(source, None, None, f"YAML error: {what}")]) from None
        if root is None:
            return ParsedFile(EMPTY, {})
        if not isinstance(root, yaml.MappingNode) or root.tag != _MAP:
            kind = "a list" if isinstance(root, yaml.SequenceNode) else "a single value"
            raise TreeError(
                [Problem(source, _line(root), None, f"top level must be a mapping, not {kind}")]
            )
        builder = _Builder(loader, source)
        value = builder.build(root, ())
        if builder.problems:
            raise TreeError(builder.problems)
    finally:
        loader.dispose()

    if not isinstance(value, Mapping):  # pragma: no cover - guarded by the root check above
        raise TreeError([Problem(source, 1, None, "top level must be a mapping")])
    if not _DIRECTIVES & value.keys():
        return ParsedFile(value, builder.lines)
    extends = value.get("extends")
    extends_line = builder.lines.get(("extends",))
    if "extends" in value and (not isinstance(extends, str) or not extends):
        raise TreeError([Problem(source, extends_line, "extends", "must be a file path")])
    shares, shares_line = _shares(source, value, builder.lines)
    rest = FrozenDict({k: v for k, v in value.items() if k not in _DIRECTIVES})
    lines = {p: n for p, n in builder.lines.items() if p[0] not in _DIRECTIVES}
    return ParsedFile(
        rest,
        lines,
        extends if isinstance(extends, str) else None,
        extends_line,
        shares,
        shares_line,
    )


def _shares(
    source: str, value: Mapping[str, LayerValue], lines: Mapping[Path, int]
) -> tuple[frozenset[str], int | None]:
    """A file's `shared_secrets:` directive: a list of secret names."""
    if "shared_secrets" not in value:
        return frozenset(), None
    line = lines.get(("shared_secrets",))
    names = value["shared_secrets"]
    if not isinstance(names, tuple) or not all(isinstance(n, str) for n in names):
        raise TreeError([Problem(source, line, "shared_secrets", "must be a list of secret names")])
    for index, name in enumerate(names):
        problem = secret_name_problem(name)
        if problem is not None:
            where = lines.get(("shared_secrets", index), line)
            raise TreeError([Problem(source, where, f"shared_secrets.{index}", problem)])
    return frozenset(str(n) for n in names), line


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _key_id(node: yaml.Node) -> object:
    """What makes two key nodes the same key."""
    return (node.tag, node.value) if isinstance(node, yaml.ScalarNode) else id(node)


class _Builder:
    """Turns composed nodes into values, noting lines and collecting problems."""

    def __init__(self, loader: Any, source: str, limits: Limits = DEFAULT_LIMITS) -> None:
        self.loader = loader
        self.source = source
        self.limits = limits
        self.lines: dict[Path, int] = {}
        self.problems: list[Problem] = []
        self._open: set[int] = set()  # nodes being built, to refuse recursive aliases
        self._built = 0  # values built, aliases and merges expanded
        self._merged: dict[int, list[tuple[yaml.Node, yaml.Node]]] = {}  # by mapping node

    def problem(self, node: yaml.Node, path: Path, message: str) -> None:
        self.problems.append(Problem(self.source, _line(node), format_path(path) or None, message))

    def build(self, node: yaml.Node, path: Path) -> LayerValue:
        if node.__class__ is yaml.ScalarNode and node.tag == _STR:
            # Most nodes: a plain string, which no alias can make recursive. What the
            # general path below does for it, without its checks and bookkeeping.
            self._count(1, node)
            return str(node.value)
        if id(node) in self._open:
            self.problem(node, path, "recursive alias")
            return None
        self._count(1, node)
        container = isinstance(node, yaml.MappingNode | yaml.SequenceNode)
        if container and len(path) >= self.limits.depth:
            message = f"nested deeper than {self.limits.depth} levels (limit depth)"
            self.problem(node, path, message)
            return None
        tag = node.tag
        if tag == "!secret":
            return self._secret(node, path)
        if tag == "!delete":
            if not path:
                self.problem(node, path, "!delete cannot stand at the top level")
            elif any(isinstance(part, int) for part in path):
                self.problem(node, path, "!delete cannot stand inside a list")
            elif not isinstance(node, yaml.ScalarNode) or node.value:
                self.problem(node, path, "!delete takes no value")
            return DELETE
        self._open.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode) and tag == _MAP:
                return self._mapping(node, path)
            if isinstance(node, yaml.SequenceNode) and tag == _SEQ:
                return self._sequence(node, path)
            if isinstance(node, yaml.ScalarNode):
                return self._scalar(node, path)
        finally:
            self._open.discard(id(node))
        self.problem(node, path, f"unsupported YAML tag {tag}")
        return None

    def _mapping(self, node: yaml.MappingNode, path: Path) -> LayerValue:
        out: dict[str, LayerValue] = {}
        lines = self.lines
        for key_node, value_node in self._entries(node, path):
            if key_node.__class__ is yaml.ScalarNode and key_node.tag == _STR and key_node.value:
                key = str(key_node.value)  # the usual key: what `_key` returns for it
            else:
                found = self._key(key_node, path)
                if found is None:
                    continue
                key = found
            child = (*path, key)
            if key in out:
                first = lines[child]
                self.problem(key_node, child, f"duplicate key (first set on line {first})")
                continue
            lines[child] = key_node.start_mark.line + 1
            out[key] = self.build(value_node, child)
        return FrozenDict(out)

    def _entries(self, node: yaml.MappingNode, path: Path) -> list[tuple[yaml.Node, yaml.Node]]:
        """The mapping's entries with ``<<`` merge keys expanded as YAML defines them:
        keys written in the mapping win over merged ones, and an earlier merged mapping
        over a later one. Nodes are left as they are (PyYAML's `flatten_mapping`
        rewrites them), so an anchor reads the same wherever it is used. Each mapping's
        entries are worked out once per file, and every merged entry counts against the
        value limit: a chain of mappings each merging the one before twice would
        otherwise double the work with every line."""
        known = self._merged.get(id(node))
        if known is not None:
            return known
        own = [(k, v) for k, v in node.value if k.tag != _MERGE]
        if len(own) == len(node.value):  # no merge keys: the entries as written
            self._merged[id(node)] = own
            return own
        taken = {_key_id(k) for k, _ in own}
        merged: list[tuple[yaml.Node, yaml.Node]] = []
        for key_node, value_node in node.value:
            if key_node.tag != _MERGE:
                continue
            sources = (
                value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            )
            for source in sources:
                if not isinstance(source, yaml.MappingNode) or id(source) in self._open:
                    self.problem(source, path, "<< takes a mapping or a list of mappings")
                    continue
                self._open.add(id(source))
                try:
                    entries = self._entries(source, path)
                finally:
                    self._open.discard(id(source))
                self._count(len(entries), source)
                for entry in entries:
                    if _key_id(entry[0]) not in taken:
                        taken.add(_key_id(entry[0]))
                        merged.append(entry)
        self._merged[id(node)] = entries = merged + own
        return entries

    def _count(self, values: int, node: yaml.Node) -> None:
        """Count `values` more against the value limit; past it, the file is refused."""
        self._built += values
        if self._built > self.limits.nodes:
            message = f"expands to more than {self.limits.nodes} values (limit nodes)"
            raise TreeError([Problem(self.source, _line(node), None, message)])

    def _key(self, node: yaml.Node, path: Path) -> str | None:
        if not isinstance(node, yaml.ScalarNode) or node.tag not in (_STR, _VALUE):
            shown = node.value if isinstance(node, yaml.ScalarNode) else "a collection"
            self.problem(node, path, f"key {shown!r} is not a string (quote it to use it as a key)")
            return None
        key = str(node.value)
        if not key:
            self.problem(node, path, "empty key")
            return None
        return key

    def _sequence(self, node: yaml.SequenceNode, path: Path) -> LayerValue:
        items: list[LayerValue] = []
        for index, item in enumerate(node.value):
            child = (*path, index)
            self.lines[child] = _line(item)
            items.append(self.build(item, child))
        return tuple(items)

    def _scalar(self, node: yaml.ScalarNode, path: Path) -> LayerValue:
        if node.tag == _TIMESTAMP:
            return str(node.value)  # keep dates as written; JSON has no date type
        if node.tag not in _PLAIN_SCALARS:
            self.problem(node, path, f"unsupported YAML tag {node.tag}")
            return None
        try:
            # The safe constructor of the tag, called directly: what `construct_object`
            # calls, without its per-node bookkeeping (a scalar cannot recurse).
            value: LayerValue = self.loader.yaml_constructors[node.tag](self.loader, node)
        except (ValueError, KeyError, yaml.YAMLError):  # e.g. `!!int abc`; never echo it
            self.problem(node, path, f"not a valid {node.tag.rsplit(':', 1)[-1]}")
            return None
        if isinstance(value, float) and not math.isfinite(value):
            self.problem(node, path, "infinity and NaN are not allowed (JSON has neither)")
            return None
        return value

    def _secret(self, node: yaml.Node, path: Path) -> LayerValue:
        name = node.value if isinstance(node, yaml.ScalarNode) else None
        if not isinstance(name, str):
            self.problem(node, path, "!secret needs a name")
            return None
        problem = secret_name_problem(name)
        if problem is not None:
            self.problem(node, path, f"!secret {problem}")
            return None
        return SecretRef(name)
