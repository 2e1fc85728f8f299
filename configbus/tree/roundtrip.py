"""Editing the tree's files in place, keeping every byte an edit does not have to change.

`YamlFile` edits one YAML file of the tree: set a key (creating the mappings above it),
delete one (optionally dropping the mappings it leaves empty), move or rename one.
ruamel.yaml composes the text into nodes that know exactly where each starts and ends;
an edit splices new text into those spans, so comments, blank lines, key order,
quoting, flow or block style and tags (``!secret``, ``!delete``) of everything else
stay as they were, and ``git diff`` shows only the lines that changed. New text
follows the file's own layout: the indentation of the mapping it goes into, how the
file indents block lists, a flow list where the old value was one, the quote style of
the value it replaces, a blank line before a new top-level section when the file
separates its sections so.

Dumping the whole document again with ruamel's round-trip dumper would be simpler,
but it drops the comment of the next section with a deleted key, hangs a new key
under that comment, and writes ``null`` as nothing: splicing avoids all three.

Values are written so that YAML 1.1 readers (PyYAML, which the tree reads with) and
YAML 1.2 readers read them alike: ``"yes"``, ``"1_000"``, ``"0o17"`` and ``"12:30"``
are quoted, a float always has a dot. Every edit is checked before it is kept: the new
text is parsed as the tree parses it (`parse_yaml`) and must hold exactly what was
intended, or `TreeError` names the file and key and the text stays as it was.

`JsonFile` edits ``schema.json`` as data and writes it back in the file's layout.
`write_all` writes a set of edited files and restores every one of them if any write
fails; `restore_all` puts them back as they were read (removing the ones it created).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError as RuamelError
from ruamel.yaml.nodes import MappingNode, ScalarNode, SequenceNode
from ruamel.yaml.resolver import VersionedResolver

from configbus.errors import Problem, TreeError
from configbus.tree.values import (
    LayerValue,
    Path,
    SecretRef,
    _Delete,
    format_path,
)
from configbus.tree.yamlfile import ParsedFile, parse_yaml

__all__ = ["JsonFile", "TextFile", "YamlFile", "restore_all", "sha256_text", "write_all"]

_STR: Final = "tag:yaml.org,2002:str"
_MERGE: Final = "tag:yaml.org,2002:merge"
_RESOLVER_12: Final = VersionedResolver(version=(1, 2))
_RESOLVER_11: Final = yaml.resolver.Resolver()
_FAST_LOADER: Final[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_PLAIN_KEY: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-/]*")
_INDICATORS: Final = frozenset("-?:,[]{}#&*!|>'\"%@`")
_FLOW_SPECIAL: Final = frozenset(",[]{}")
_FLOW_LIST_WIDTH: Final = 80  # a new list of scalars longer than this is written as a block


def sha256_text(text: str | None) -> str | None:
    """``sha256:<hex>`` of `text` as UTF-8 (None for a file that does not exist)."""
    if text is None:
        return None
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


class TextFile:
    """A text file of the tree, read once: what it held (`original`, None when it did
    not exist), what it holds now (`text`), and writing or restoring it."""

    def __init__(
        self, path: str | os.PathLike[str], original: str | None, text: str | None = None
    ) -> None:
        self.path = os.fspath(path)
        self.original = original
        self._text = text if text is not None else original if original is not None else ""

    @classmethod
    def rewrite(cls, path: str | os.PathLike[str], text: str) -> TextFile:
        """The file at `path` (or none yet), to be written as `text`."""
        return cls(path, cls._read(path), text)

    @classmethod
    def _read(cls, path: str | os.PathLike[str]) -> str | None:
        try:
            # newline="": keep \r\n as it is, so that untouched lines stay byte for byte
            with open(path, encoding="utf-8", newline="") as handle:
                return handle.read()
        except FileNotFoundError:
            return None
        except UnicodeDecodeError as exc:
            message = f"not UTF-8: {exc.reason}"
            raise TreeError([Problem(os.fspath(path), None, None, message)]) from None
        except OSError as exc:
            raise TreeError(
                [Problem(os.fspath(path), None, None, f"cannot read: {exc.strerror}")]
            ) from None

    @property
    def text(self) -> str:
        return self._text

    @property
    def changed(self) -> bool:
        """Whether the text differs from what was read (a new file always differs)."""
        return self.original is None or self._text != self.original

    @property
    def created(self) -> bool:
        return self.original is None

    def write(self) -> None:
        """Write the text (through a temporary file and a rename: readers never see
        half a file), keeping the file's permissions."""
        _atomic_write(self.path, self._text)

    def restore(self) -> None:
        """Put the file back as it was read; remove it if it did not exist."""
        if self.original is None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
        else:
            _atomic_write(self.path, self.original)


def _atomic_write(path: str, text: str) -> None:
    directory, name = os.path.split(path)
    temporary = os.path.join(directory, f".{name}.configbus-{os.getpid()}.tmp")
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = None
    try:
        with open(temporary, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(temporary, mode)
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise TreeError([Problem(path, None, None, f"cannot write: {exc.strerror}")]) from None


def write_all(files: Iterable[TextFile]) -> list[TextFile]:
    """Write every changed file; if one write fails, restore those written and raise.
    Returns the files written."""
    written: list[TextFile] = []
    try:
        for file in files:
            if file.changed:
                file.write()
                written.append(file)
    except TreeError:
        restore_all(written)
        raise
    return written


def restore_all(files: Iterable[TextFile]) -> None:
    """Put every file back as it was read, as far as possible; raises the first
    failure after trying them all."""
    failures: list[Problem] = []
    for file in files:
        try:
            file.restore()
        except TreeError as exc:
            failures += exc.problems
    if failures:
        raise TreeError(failures)


# -- rendering values ------------------------------------------------------------------
def _resolves_to_str(text: str) -> bool:
    """Whether a plain scalar `text` reads as a string in YAML 1.1 and 1.2 alike."""
    implicit = (True, False)
    old: object = _RESOLVER_11.resolve(yaml.ScalarNode, text, implicit)  # type: ignore[no-untyped-call]
    new: object = _RESOLVER_12.resolve(ScalarNode, text, implicit)
    return old == _STR and new == _STR


def _plain_ok(text: str, flow: bool) -> bool:
    if not text or text != text.strip() or text[0] in _INDICATORS:
        return False
    if any(c in text for c in "\n\r\t") or ": " in text or " #" in text or text.endswith(":"):
        return False
    if flow and not _FLOW_SPECIAL.isdisjoint(text):
        return False
    if yaml.reader.Reader.NON_PRINTABLE.search(text):
        return False
    return _resolves_to_str(text)


def _double(text: str) -> str:
    quoted = json.dumps(text, ensure_ascii=False)  # JSON strings are YAML double-quoted ones
    if yaml.reader.Reader.NON_PRINTABLE.search(quoted):
        quoted = json.dumps(text)
    return quoted


def _single_ok(text: str) -> bool:
    return not any(c in text for c in "\n\r\t") and not yaml.reader.Reader.NON_PRINTABLE.search(
        text
    )


def _float_text(value: float) -> str:
    text = repr(value)
    if "e" in text:  # PyYAML's floats need a dot and a signed exponent: 1.0e-05
        mantissa, exponent = text.split("e")
        if "." not in mantissa:
            mantissa += ".0"
        if exponent[0] not in "+-":
            exponent = "+" + exponent
        return f"{mantissa}e{exponent}"
    return text if "." in text else f"{text}.0"


def _scalar(value: object, *, flow: bool, style: str | None = None) -> str:
    """One scalar value as YAML text; `style` (``"`` or ``'``) is the quoting of the
    value it replaces, kept for a string."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _float_text(value)
    if isinstance(value, str):
        if style == "'" and _single_ok(value):
            return "'" + value.replace("'", "''") + "'"
        if style != '"' and _plain_ok(value, flow):
            return value
        return _double(value)
    raise TypeError(f"not a scalar: {type(value).__name__}")


def _key(key: str | int) -> str:
    text = str(key)
    if _PLAIN_KEY.fullmatch(text) and _resolves_to_str(text):
        return text
    return _double(text)


def _is_scalar(value: object) -> bool:
    return not isinstance(value, Mapping | tuple | list)


def _quoting(node: Any) -> str | None:
    """How the strings of `node` are quoted (``"`` or ``'``) when all of them are alike:
    a string scalar, or the items of a list. None: plain, mixed, or not strings."""
    items = node.value if isinstance(node, SequenceNode) else [node]
    styles = {n.style if isinstance(n, ScalarNode) and n.tag == _STR else None for n in items}
    return styles.pop() if len(styles) == 1 and None not in styles else None


def _inline(value: LayerValue, *, flow: bool, style: str | None = None) -> str:
    """`value` on one line: a scalar, a tag, or a flow collection (`style`: the
    quoting of its strings, those of a list's items included)."""
    if isinstance(value, SecretRef):
        return f"!secret {value.name}"
    if isinstance(value, _Delete):  # in a flow mapping, `!delete,` would read as one tag
        return '!delete ""' if flow else "!delete"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_inline(item, flow=True, style=style) for item in value) + "]"
    if isinstance(value, Mapping):
        items = (f"{_key(k)}: {_inline(v, flow=True)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    return _scalar(value, flow=flow, style=style)


class _Layout:
    """How a file indents: a nested mapping's keys (`step`) and a block list's dashes
    (`dash`, relative to the key holding the list: 0 or 2), read from the file."""

    def __init__(self, root: Any) -> None:
        self.step = 2
        self.dash = 2
        step = dash = None
        for key, value in _block_entries(root):
            if not isinstance(value, MappingNode | SequenceNode) or value.flow_style:
                continue
            if step is None and isinstance(value, MappingNode) and value.value:
                step = value.value[0][0].start_mark.column - key.start_mark.column
            if dash is None and isinstance(value, SequenceNode) and value.value:
                dash = value.start_mark.column - key.start_mark.column
            if step is not None and dash is not None:
                break
        if step is not None and step > 0:
            self.step = step
        if dash is not None and dash >= 0:
            self.dash = dash

    def block_list(self, value: tuple[Any, ...] | list[Any], was: Any) -> bool:
        """Whether a list replacing node `was` (None: a new key) is written as a block."""
        if isinstance(was, SequenceNode):
            return not was.flow_style
        if not all(_is_scalar(item) for item in value):
            return True
        return len(_inline(tuple(value), flow=False)) > _FLOW_LIST_WIDTH

    def entry(self, key: str | int, value: LayerValue) -> list[str]:
        """The lines of ``key: value`` in block style, the key at column 0."""
        head = _key(key)
        if isinstance(value, Mapping) and value:
            return [f"{head}:", *self.indented(self.mapping(value), self.step)]
        if isinstance(value, tuple | list) and value and self.block_list(value, None):
            return [f"{head}:", *self.indented(self.sequence(value), self.dash)]
        return [f"{head}: {_inline(value, flow=False)}"]

    def mapping(self, value: Mapping[str, Any]) -> list[str]:
        return [line for key, child in value.items() for line in self.entry(key, child)]

    def sequence(self, value: Sequence[Any], style: str | None = None) -> list[str]:
        return [f"- {_inline(item, flow=False, style=style)}" for item in value]

    def value_lines(self, value: LayerValue, style: str | None = None) -> list[str]:
        """A block mapping or list, at column 0 (`style`: the quoting of list items)."""
        if isinstance(value, Mapping):
            return self.mapping(value)
        return self.sequence(value, style)  # type: ignore[arg-type]

    @staticmethod
    def indented(lines: Iterable[str], by: int) -> list[str]:
        pad = " " * by
        return [pad + line if line.strip() else line for line in lines]


def _block_entries(node: Any) -> Iterator[tuple[Any, Any]]:
    """(key, value) nodes of the block mappings below `node`, outermost first."""
    queue = [node]
    while queue:
        current = queue.pop(0)
        if isinstance(current, MappingNode) and not current.flow_style:
            for key, value in current.value:
                yield key, value
                queue.append(value)


# -- the model an edit must produce ----------------------------------------------------
def _canon(value: Any) -> Any:
    """A value with every scalar tagged by its type (1, 1.0 and True differ)."""
    if isinstance(value, Mapping):
        return ("map", {str(k): _canon(v) for k, v in value.items()})
    if isinstance(value, tuple | list):
        return ("list", [_canon(v) for v in value])
    if isinstance(value, SecretRef):
        return ("secret", value.name)
    if isinstance(value, _Delete):
        return ("delete",)
    return (type(value).__name__, value)


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    return value


def _model_get(model: dict[str, Any], path: Path) -> Any:
    node: Any = model
    for part in path:
        node = node[str(part)]
    return node


def _model_set(model: dict[str, Any], path: Path, value: LayerValue) -> None:
    node = model
    for part in path[:-1]:
        child = node.get(str(part))
        if not isinstance(child, dict):
            child = node[str(part)] = {}
        node = child
    node[str(path[-1])] = _thaw(value)


# -- YAML files ---------------------------------------------------------------------------
class _Entry:
    """A key of a mapping node, found by path: the mapping, the key and value nodes."""

    __slots__ = ("index", "key", "parent", "value")

    def __init__(self, parent: Any, index: int) -> None:
        self.parent = parent
        self.index = index
        self.key, self.value = parent.value[index]


class YamlFile(TextFile):
    """One YAML file of the tree, edited in place (see the module docstring).

    Paths are tuples of keys as the file spells them (``("logging", "loggers",
    "uvicorn.access")``); lists are values, never walked into. Each edit is checked
    and kept at once; `write` puts the result on disk, `restore` the original back.
    """

    def __init__(
        self, path: str | os.PathLike[str], original: str | None, text: str | None = None
    ) -> None:
        super().__init__(path, original, text)
        self._nl = "\r\n" if "\r\n" in self._text else "\n"
        self._parsed = self._parse(self._text)  # raises when the file does not parse
        self._composed: tuple[str, Any] | None = None  # (text, its nodes), composed when needed
        self._style: _Layout | None = None

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> YamlFile:
        """The file at `path`; a file that does not exist yet reads as empty."""
        return cls(path, cls._read(path))

    @classmethod
    def create(cls, path: str | os.PathLike[str], text: str = "") -> YamlFile:
        """A file to create at `path`, starting as `text` (a comment, say)."""
        return cls(path, None, text)

    def __repr__(self) -> str:
        return f"YamlFile({self.path!r})"

    # -- reading ------------------------------------------------------------------------
    def parsed(self) -> ParsedFile:
        """The current text as the tree reads it: values and the line of every key."""
        return self._parsed

    def has(self, path: Path) -> bool:
        return path in self._parsed.lines

    def get(self, path: Path) -> Any:
        """The value at `path` exactly as spelled (may be `DELETE`); KeyError if unset."""
        node: Any = self._parsed.data
        for part in path:
            if not isinstance(node, Mapping) or part not in node:
                raise KeyError(format_path(path))
            node = node[part]
        return node

    def line(self, path: Path) -> int | None:
        """The line of the key at `path` (1-based), or None when the file lacks it."""
        return self._parsed.lines.get(path)

    def nearest(self, path: Path) -> tuple[Path, int | None]:
        """The longest prefix of `path` the file has, and its line (None for ())."""
        for cut in range(len(path), 0, -1):
            line = self._parsed.lines.get(path[:cut])
            if line is not None:
                return path[:cut], line
        return (), None

    # -- editing ------------------------------------------------------------------------
    def set(self, path: Path, value: LayerValue) -> None:
        """Set `path` to `value` (`DELETE` writes ``!delete``), creating the mappings
        above it; a non-mapping above it (a value, a ``!delete``) becomes a mapping."""
        if not path:
            raise ValueError("set() needs a key")
        expected = _thaw(self._parsed.data)
        _model_set(expected, path, value)
        self._commit(self._set_text(path, value), expected, path)

    def delete(self, path: Path, prune: Callable[[Path], bool] = lambda _: False) -> bool:
        """Remove the key at `path` (a value or a ``!delete`` marker) with its lines.
        A mapping it leaves empty is removed too when ``prune(its path)`` says so (and
        so on upwards); otherwise it stays, written ``{}``. Comments around the key
        stay. Returns whether the file had the key."""
        entries = self._walk(path)
        if len(entries) < len(path) or not path:
            return False
        cut = len(path)
        while cut > 1 and len(entries[cut - 1].parent.value) == 1 and prune(path[: cut - 1]):
            cut -= 1
        expected = _thaw(self._parsed.data)
        holder = _model_get(expected, path[: cut - 1])
        del holder[str(path[cut - 1])]
        self._commit(self._delete_text(entries[:cut]), expected, path)
        return True

    def move(self, source: Path, target: Path, prune: Callable[[Path], bool] | None = None) -> bool:
        """Move the key at `source` to `target` with its value, the comments inside it
        and its quoting (a rename in place when only the last key changes). Mappings
        left empty are removed up to the ones `source` and `target` share (or as
        `prune` says). Refuses when the file already sets `target`. Returns whether
        the file had `source`."""
        entries = self._walk(source)
        if len(entries) < len(source) or not source:
            return False
        if self.has(target):
            raise self._problem(target, f"cannot move {format_path(source)} here: already set")
        value = self.get(source)
        if source[:-1] == target[:-1]:
            expected = _thaw(self._parsed.data)
            holder = _model_get(expected, source[:-1])
            holder[str(target[-1])] = holder.pop(str(source[-1]))
            entry = entries[-1]
            span = (entry.key.start_mark.index, entry.key.end_mark.index)
            self._commit(self._splice(*span, _key(target[-1])), expected, target)
            return True
        if prune is None:
            prune = lambda path: target[: len(path)] != path  # noqa: E731 - shared parents stay
        cut = len(source)
        while cut > 1 and len(entries[cut - 1].parent.value) == 1 and prune(source[: cut - 1]):
            cut -= 1
        expected = _thaw(self._parsed.data)
        del _model_get(expected, source[: cut - 1])[str(source[cut - 1])]
        _model_set(expected, target, value)
        lines = self._entry_text(entries[-1], target[-1])
        removed = self._delete_text(entries[:cut])
        try:
            as_written = self._with_text(removed, lambda: self._insert_text(target, lines))
            self._commit(as_written, expected, target)
        except TreeError:  # the text as written does not fit there (a flow mapping): render it
            rendered = self._with_text(removed, lambda: self._set_text(target, value))
            self._commit(rendered, expected, target)
        return True

    # -- text of the edits ----------------------------------------------------------------
    def _set_text(self, path: Path, value: LayerValue) -> str:
        entries = self._walk(path)
        if len(entries) == len(path):
            return self._replace_text(entries, value)
        rest = path[len(entries) :]
        nested: LayerValue = value
        for part in reversed(rest[1:]):
            nested = {str(part): nested}
        if entries and not isinstance(entries[-1].value, MappingNode):
            # a value or a !delete above the key: it becomes the mapping holding it
            return self._replace_text(entries, {str(rest[0]): nested})
        mapping = entries[-1].value if entries else self._root
        if isinstance(mapping, MappingNode) and mapping.flow_style:
            return self._insert_flow(mapping, f"{_key(rest[0])}: {_inline(nested, flow=True)}")
        return self._insert_text(path[: len(entries) + 1], self._layout.entry(rest[0], nested))

    def _replace_text(self, entries: list[_Entry], value: LayerValue) -> str:
        entry = entries[-1]
        old, key = entry.value, entry.key
        self._refuse_shared(old, entries)
        end = self._end(old, key)
        if entry.parent.flow_style:
            if _empty(old):
                return self._splice(key.end_mark.index, end, ": " + _inline(value, flow=True))
            return self._splice(old.start_mark.index, end, _inline(value, flow=True))
        old_block = isinstance(old, MappingNode | SequenceNode) and not old.flow_style
        block = (isinstance(value, Mapping) and bool(value)) or (
            isinstance(value, tuple | list) and bool(value) and self._layout.block_list(value, old)
        )
        if not block:
            text = _inline(value, flow=False, style=_quoting(old))
            if old_block or _empty(old):  # a block, or nothing (`key:`)
                return self._splice(key.end_mark.index, end, ": " + text)
            return self._splice(old.start_mark.index, end, text)
        lines = self._layout.value_lines(value, _quoting(old))
        if old_block:
            column = old.start_mark.column
            start = self._line_start(old.start_mark.index)
            return self._splice(start, end, self._nl.join(self._layout.indented(lines, column)))
        by = self._layout.step if isinstance(value, Mapping) else self._layout.dash
        body = self._layout.indented(lines, key.start_mark.column + by)
        return self._splice(key.end_mark.index, end, ":" + self._nl + self._nl.join(body))

    def _insert_text(self, path: Path, lines: list[str]) -> str:
        """`lines` (an entry, its key at column 0) added as the key `path[-1]` of the
        mapping at `path[:-1]`, creating the mappings missing on the way."""
        entries = self._walk(path[:-1])
        for part in reversed(path[len(entries) : -1]):
            lines = [f"{_key(part)}:", *self._layout.indented(lines, self._layout.step)]
        if entries and not isinstance(entries[-1].value, MappingNode):
            raise self._problem(path, "a value above this key is not a mapping")
        mapping = entries[-1].value if entries else self._root
        nl = self._nl
        if mapping is None:  # an empty file, or comments only
            text = self._text
            if text and not text.endswith("\n"):
                text += nl
            return text + nl.join(lines) + nl
        if mapping.flow_style:
            if len(lines) > 1:
                raise self._problem(path, "cannot write a block value into a flow mapping")
            return self._insert_flow(mapping, lines[0])
        column = mapping.value[0][0].start_mark.column
        at = self._line_end(self._end(mapping))
        prefix = ""
        if at == len(self._text) and not self._text.endswith("\n"):
            prefix = nl
        if mapping is self._root and self._sections_spaced():
            prefix += nl
        body = nl.join(self._layout.indented(lines, column))
        return self._text[:at] + prefix + body + nl + self._text[at:]

    def _insert_flow(self, mapping: Any, item: str) -> str:
        if not mapping.value:
            return self._splice(mapping.start_mark.index, mapping.end_mark.index, "{" + item + "}")
        at = self._end(mapping.value[-1][1], mapping.value[-1][0])
        return self._splice(at, at, ", " + item)

    def _delete_text(self, entries: list[_Entry]) -> str:
        entry = entries[-1]
        self._refuse_shared(entry.value, entries)
        mapping = entry.parent
        if mapping.flow_style:
            if len(mapping.value) == 1:
                return self._splice(mapping.start_mark.index, mapping.end_mark.index, "{}")
            if entry.index > 0:
                key, value = mapping.value[entry.index - 1]
                previous = self._end(value, key)
                gap = " " if _empty(value) else ""  # `{a: }`: `{a:}` would not parse
                return self._splice(previous, self._end(entry.value, entry.key), gap)
            following = mapping.value[1][0].start_mark.index
            return self._splice(entry.key.start_mark.index, following, "")
        if len(mapping.value) == 1 and len(entries) > 1:  # the mapping is left empty
            holder = entries[-2]
            return self._splice(holder.key.end_mark.index, self._end(mapping), ": {}")
        start = self._line_start(entry.key.start_mark.index)
        if self._text[start : entry.key.start_mark.index].strip():
            raise self._problem(tuple(e.key.value for e in entries), "not at the start of its line")
        end = self._line_end(self._end(entry.value, entry.key))
        # a section between blank lines: take one of them along, not leave two
        if self._blank_before(start):
            if end == len(self._text):
                start = self._line_start(start - 1)
            elif not self._text[end : self._line_end(end + 1)].strip():
                end = self._line_end(end + 1)
        return self._splice(start, end, "")

    def _blank_before(self, start: int) -> bool:
        """Whether the line before the one starting at `start` is blank."""
        return start > 0 and not self._text[self._line_start(start - 1) : start].strip()

    def _entry_text(self, entry: _Entry, key: str | int) -> list[str]:
        """The lines of `entry` as written (comments inside it included), renamed to
        `key`, re-indented to column 0."""
        end = self._end(entry.value, entry.key)
        rest = self._text[end : self._line_end(end)].rstrip("\r\n")
        if rest.strip().startswith("#"):  # the comment at the end of its last line
            end += len(rest)
        column = entry.key.start_mark.column
        lines = (_key(key) + self._text[entry.key.end_mark.index : end]).split(self._nl)
        out = [lines[0]]
        for line in lines[1:]:
            stripped = line.lstrip(" ")
            out.append(line[min(column, len(line) - len(stripped)) :] if stripped else "")
        return out

    def _with_text(self, text: str, make: Callable[[], str]) -> str:
        """What `make` builds from `text` instead of the current text."""
        kept = self._text
        self._text = text
        try:
            return make()
        finally:
            self._text = kept

    # -- helpers ------------------------------------------------------------------------------
    def _walk(self, path: Path) -> list[_Entry]:
        """The entries along `path`, as far as the file's own mapping keys go."""
        node = self._root
        entries: list[_Entry] = []
        for part in path:
            if not isinstance(node, MappingNode):
                break
            found = None
            for index, (key, _) in enumerate(node.value):
                if isinstance(key, ScalarNode) and key.tag != _MERGE and key.value == str(part):
                    found = _Entry(node, index)
            if found is None:
                if any(key.tag == _MERGE for key, _ in node.value):
                    raise self._problem(
                        path, "comes through a YAML merge key (<<): edit the file by hand"
                    )
                break
            entries.append(found)
            node = found.value
        return entries

    def _refuse_shared(self, node: Any, entries: list[_Entry]) -> None:
        """Refuse to edit text that a YAML alias refers to: it stands elsewhere too. The
        problem names the whole key and the line it is on."""
        entry = entries[-1]
        shared = _shared_nodes(self._root)
        if any(id(n) in shared for n in _nodes(node)) or id(entry.parent) in shared:
            path = tuple(e.key.value for e in entries)
            message = "is (or holds) a YAML anchor used elsewhere: edit by hand"
            line = entry.key.start_mark.line + 1
            raise TreeError([Problem(self.path, line, format_path(path) or None, message)])

    def _end(self, node: Any, key: Any = None) -> int:
        """Where the text of `node` (the value of `key`) ends: its last character,
        comments after it excluded. A value written as nothing (`key:`) ends at the
        colon: its node's marks point at whatever follows."""
        if isinstance(node, MappingNode) and not node.flow_style and node.value:
            return self._end(node.value[-1][1], node.value[-1][0])
        if key is not None and _empty(node):
            return self._text.index(":", key.end_mark.index) + 1
        if isinstance(node, SequenceNode) and not node.flow_style and node.value:
            return self._end(node.value[-1])
        end: int = node.end_mark.index
        if isinstance(node, ScalarNode) and node.style in ("|", ">"):
            while end > node.start_mark.index and self._text[end - 1] in " \r\n":
                end -= 1
        return end

    def _line_start(self, index: int) -> int:
        return self._text.rfind("\n", 0, index) + 1

    def _line_end(self, index: int) -> int:
        """Just after the line break ending the line that holds `index - 1`."""
        found = self._text.find("\n", max(index - 1, 0))
        return len(self._text) if found < 0 else found + 1

    def _sections_spaced(self) -> bool:
        """Whether the file leaves a blank line before its last top-level key."""
        root = self._root
        if not isinstance(root, MappingNode) or len(root.value) < 2:
            return False
        lines = self._text[: self._line_start(root.value[-1][0].start_mark.index)].splitlines()
        while lines and lines[-1].lstrip().startswith("#"):
            lines.pop()
        return bool(lines) and not lines[-1].strip()

    def _splice(self, start: int, end: int, text: str) -> str:
        return self._text[:start] + text + self._text[end:]

    def _commit(self, text: str, expected: dict[str, Any], path: Path) -> None:
        """Keep `text` if it parses to `expected` with the same directives."""
        try:
            parsed = self._parse(text)
        except TreeError as exc:
            raise self._problem(path, f"cannot edit in place: {exc.problems[0].message}") from None
        before = self._parsed
        if (
            _canon(parsed.data) != _canon(expected)
            or parsed.extends != before.extends
            or parsed.shares != before.shares
        ):
            raise self._problem(path, "cannot edit in place without changing other keys")
        self._text, self._parsed = text, parsed

    @property
    def _root(self) -> Any:
        """The nodes of the current text (None for an empty document)."""
        if self._composed is None or self._composed[0] is not self._text:
            self._composed = (self._text, self._compose(self._text))
        return self._composed[1]

    @property
    def _layout(self) -> _Layout:
        if self._style is None:
            self._style = _Layout(self._root)
        return self._style

    def _parse(self, text: str) -> ParsedFile:
        return parse_yaml(self.path, text)

    def _compose(self, text: str) -> Any:
        try:
            return YAML(typ="safe", pure=True).compose(text)  # the nodes only: no comments
        except RuamelError as exc:
            what = str(exc).strip().splitlines()[0]
            raise TreeError([Problem(self.path, None, None, f"YAML error: {what}")]) from None

    def _problem(self, path: Path, message: str) -> TreeError:
        line = self.nearest(path)[1]
        return TreeError([Problem(self.path, line, format_path(path) or None, message)])


def _empty(node: Any) -> bool:
    """A value written as nothing: ``key:`` (null)."""
    return (
        isinstance(node, ScalarNode)
        and node.value == ""
        and node.style is None
        and node.start_mark.index == node.end_mark.index
    )


def _shared_nodes(root: Any) -> set[int]:
    """Ids of the nodes reached more than once: anchors that aliases refer to."""
    seen: set[int] = set()
    shared: set[int] = set()
    stack = [root] if root is not None else []
    while stack:
        node = stack.pop()
        if id(node) in seen:
            shared.add(id(node))
            continue
        seen.add(id(node))
        if isinstance(node, MappingNode):
            for key, value in node.value:
                stack += [key, value]
        elif isinstance(node, SequenceNode):
            stack += node.value
    return shared


def _nodes(node: Any) -> Iterator[Any]:
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        if isinstance(current, MappingNode):
            for key, value in current.value:
                stack += [key, value]
        elif isinstance(current, SequenceNode):
            stack += current.value


# -- JSON files -----------------------------------------------------------------------------
class JsonFile(TextFile):
    """A JSON file (``schema.json``) edited as data: change `data` in place, then
    `render` (or `write`) lays it out as the file was (its indentation; lines the
    edit did not change are kept as they were, even where the file's own layout
    differs from `json.dumps`)."""

    def __init__(self, path: str | os.PathLike[str], original: str | None) -> None:
        super().__init__(path, original)
        self._loaded: Any = {}
        if original is not None:
            try:
                self._loaded = json.loads(original)
            except json.JSONDecodeError as exc:
                raise TreeError(
                    [Problem(self.path, exc.lineno, None, f"invalid JSON: {exc.msg}")]
                ) from None
        self.data: Any = json.loads(original) if original is not None else {}
        self._indent = _json_indent(original or "")
        self._nodes: tuple[str, Any] | None = None  # (text, its nodes) for `line`
        self._ascii = False
        if original is not None and self._dump(self._loaded) != original:
            self._ascii = self._dump(self._loaded, ensure_ascii=True) == original

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> JsonFile:
        return cls(path, cls._read(path))

    @property
    def text(self) -> str:
        return self.render()

    def render(self) -> str:
        edited = self._dump(self.data, ensure_ascii=self._ascii)
        if self.original is None or self.data == self._loaded:
            return self.original if self.original is not None else edited
        plain = self._dump(self._loaded, ensure_ascii=self._ascii)
        if plain == self.original:
            return edited
        merged = _keep_lines(self.original, plain, edited)
        try:
            if json.loads(merged) == self.data:
                return merged
        except json.JSONDecodeError:
            pass
        return edited

    @property
    def changed(self) -> bool:
        return self.original is None or self.data != self._loaded

    def write(self) -> None:
        _atomic_write(self.path, self.render())

    def line(self, pointer: Sequence[str]) -> int | None:
        """The line of the key at `pointer` (keys from the top) in the file as it
        reads now (edits included), or None."""
        text = self.render()
        if self._nodes is None or self._nodes[0] is not text:
            try:
                self._nodes = (text, yaml.compose(text, Loader=_FAST_LOADER))  # JSON is YAML
            except yaml.YAMLError:
                self._nodes = (text, None)
        node = self._nodes[1]
        line = None
        for part in pointer:
            if not isinstance(node, yaml.MappingNode):
                return None
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == part:
                    node, line = value, key.start_mark.line + 1
                    break
            else:
                return None
        return line

    def _dump(self, data: Any, ensure_ascii: bool = False) -> str:
        return json.dumps(data, indent=self._indent, ensure_ascii=ensure_ascii) + "\n"


def _json_indent(text: str) -> int:
    for line in text.splitlines()[1:]:
        stripped = line.lstrip(" ")
        if stripped:
            return len(line) - len(stripped) or 2
    return 2


def _keep_lines(original: str, plain: str, edited: str) -> str:
    """`edited` with the lines it shares with `plain` taken from `original`: `plain`
    is how the tool would lay out the unedited content, `original` how the file did.
    Lines the edit did not touch keep the file's own layout."""
    ours = original.splitlines(keepends=True)
    base = plain.splitlines(keepends=True)
    new = edited.splitlines(keepends=True)
    mapped: dict[int, str] = {}
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, base, ours, False).get_opcodes():
        if tag == "equal" or (tag == "replace" and i2 - i1 == j2 - j1):
            for offset in range(i2 - i1):
                mapped[i1 + offset] = ours[j1 + offset]
    out: list[str] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, base, new, False).get_opcodes():
        if tag == "equal":
            out += [mapped.get(i, base[i]) for i in range(i1, i2)]
        else:
            out += new[j1:j2]
    return "".join(out)
