"""The values a config is made of, and their canonical encoding.

A config is a tree of immutable values: mappings (`FrozenDict`, a dict that refuses
changes, with string keys), tuples, strings, numbers, booleans, None, and
`SecretRef`. Immutable all the way down, so resolved configs can share subtrees with
each other and with the parsed files, and a reader can never change what another
reader sees.

Canonical JSON (sorted keys, no spaces, a secret as ``{"$secret": NAME}``) is what a
config hash is computed over: the same config gives the same bytes whatever the key
order in the files.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterator, Mapping
from typing import Any, Final, TypeAlias, final

import msgspec

from configbus.errors import LimitError
from configbus.limits import DEFAULT_LIMITS, Limits

__all__ = [
    "DELETE",
    "EMPTY",
    "SEALED_KEY",
    "SECRET_KEY",
    "SECRET_NAME",
    "FrozenDict",
    "LayerValue",
    "Path",
    "SecretRef",
    "Value",
    "attach_sealed",
    "canonical_json",
    "config_hash",
    "format_path",
    "freeze",
    "freeze_json",
    "looks_secret",
    "plain_secret_paths",
    "redacted",
    "sealed_version",
    "secret_name_problem",
    "secret_ref",
    "thaw",
    "view_json",
    "walk",
]

SECRET_KEY: Final = "$secret"
SEALED_KEY: Final = "$sealed"
SECRET_NAME: Final = re.compile(r"[a-z0-9][a-z0-9_./-]*")
# Key names that must hold a secret reference, never a plain value.
_SECRET_KEY_NAME: Final = re.compile(
    r"(password|passwd|secret|token|api_?key|private_?key|credential)s?$", re.IGNORECASE
)


@final
class SecretRef:
    """A reference to a secret by name (``!secret NAME`` in YAML). Never a plain value:
    `sealed` holds the secret's live versions as sealed text (newest first), attached
    when the stream is resolved with its sealed secrets; see `configbus.crypto.secrets`.
    Its repr shows the name and the versions, never the sealed text."""

    __slots__ = ("name", "sealed")
    name: str
    sealed: tuple[str, ...]

    def __init__(self, name: str, sealed: tuple[str, ...] = ()) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "sealed", tuple(sealed))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("SecretRef is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("SecretRef is immutable")

    def __reduce__(self) -> tuple[Any, ...]:  # copy and pickle without __setattr__
        return (SecretRef, (self.name, self.sealed))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretRef) and (other.name, other.sealed) == (
            self.name,
            self.sealed,
        )

    def __hash__(self) -> int:
        return hash((SecretRef, self.name, self.sealed))

    @property
    def versions(self) -> tuple[int, ...]:
        """The versions of `sealed`, newest first (0 for text that names none)."""
        return tuple(sealed_version(text) for text in self.sealed)

    def __repr__(self) -> str:
        if not self.sealed:
            return f"SecretRef({self.name!r})"
        return f"SecretRef({self.name!r}, versions={list(self.versions)})"

    def as_json(self) -> dict[str, Any]:
        """``{"$secret": NAME}``, with ``"$sealed": [...]`` when versions are attached."""
        if self.sealed:
            return {SECRET_KEY: self.name, SEALED_KEY: list(self.sealed)}
        return {SECRET_KEY: self.name}

    def shown(self) -> str:
        """``<secret:NAME>`` (``<secret:NAME v3>`` with versions attached): safe to print."""
        if not self.sealed:
            return f"<secret:{self.name}>"
        return f"<secret:{self.name} v{self.versions[0]}>"


def attach_sealed(data: Mapping[str, Value], sealed: Mapping[str, tuple[str, ...]]) -> Any:
    """`data` with every reference carrying the versions `sealed` has for its name, and
    none when it has none: sealed text comes from the secrets' records alone, never
    from a value written by hand (or an old config published again). The branches
    without a reference are shared, not copied."""

    def attach(value: Any) -> Any:
        if isinstance(value, SecretRef):
            texts = sealed.get(value.name, ())
            return value if texts == value.sealed else SecretRef(value.name, texts)
        if isinstance(value, dict):
            changed = {key: attach(child) for key, child in value.items()}
            if all(changed[key] is child for key, child in value.items()):
                return value
            return FrozenDict(changed)
        if isinstance(value, tuple):
            items = tuple(attach(item) for item in value)
            return value if all(a is b for a, b in zip(items, value, strict=True)) else items
        return value

    return attach(data)


_VERSION: Final = re.compile(r"[1-9][0-9]{0,18}")  # ASCII digits, below 2**63


def sealed_version(text: str) -> int:
    """The version a sealed text names (``cbsec1.<version>....``); 0 if it names none."""
    parts = text.split(".", 2)
    return int(parts[1]) if len(parts) == 3 and _VERSION.fullmatch(parts[1]) else 0


def secret_ref(item: Mapping[str, Any]) -> SecretRef | None:
    """`item` read as a secret reference: ``{"$secret": NAME}``, optionally with
    ``"$sealed": [TEXT, ...]``; None when it is any other mapping."""
    name = item.get(SECRET_KEY)
    if type(name) is not str:
        return None
    if len(item) == 1:
        return SecretRef(name)
    sealed = item.get(SEALED_KEY)
    if len(item) != 2 or not isinstance(sealed, list | tuple):
        return None
    return SecretRef(name, tuple(sealed)) if all(type(t) is str for t in sealed) else None


class FrozenDict(dict[str, Any]):
    """A dict that refuses changes. Being a real dict, it encodes at C speed with
    msgspec and json, and `isinstance(value, dict)` holds for code that expects one."""

    __slots__ = ()

    def _refuse(self, *args: object, **kwargs: object) -> Any:
        raise TypeError("config mappings are immutable; use to_dict() for a mutable copy")

    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __copy__(self) -> FrozenDict:
        return self

    def __deepcopy__(self, memo: object) -> FrozenDict:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenDict, (dict(self),))

    def __repr__(self) -> str:
        return f"FrozenDict({dict.__repr__(self)})"


@final
class _Delete:
    """The ``!delete`` marker: removes its key from the layers below."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "DELETE"

    def __reduce__(self) -> str:  # copies and unpickles as the one marker merges test for
        return "DELETE"


DELETE: Final = _Delete()

Value: TypeAlias = (
    "bool | int | float | str | SecretRef | tuple[Value, ...] | Mapping[str, Value] | None"
)
# What a layer holds: values, plus `DELETE` markers (never inside lists).
LayerValue: TypeAlias = (
    "bool | int | float | str | SecretRef | tuple[LayerValue, ...]"
    " | Mapping[str, LayerValue] | _Delete | None"
)
Path: TypeAlias = tuple[str | int, ...]

EMPTY: Final[Mapping[str, Value]] = FrozenDict()


def format_path(path: Path) -> str:
    """``("cache", "redis", "nodes", 0)`` as ``cache.redis.nodes.0``."""
    return ".".join(str(part) for part in path)


def walk(node: LayerValue, path: Path) -> tuple[Path, LayerValue, bool]:
    """Follow `path` into `node` as far as the data goes.

    Returns the path as the data spells it, the value reached, and whether all of
    `path` was followed. A key that itself holds dots (a logger name such as
    ``uvicorn.access``) matches consecutive parts of a dotted path joined again; when
    both ``uvicorn`` and ``uvicorn.access`` are keys, the reading that follows all of
    `path` wins.
    """
    if not path:
        return (), node, True
    part = path[0]
    if isinstance(node, dict):
        partial: tuple[Path, LayerValue, bool] | None = None
        key = str(part)
        for end in range(1, len(path) + 1):
            if end > 1:
                key = f"{key}.{path[end - 1]}"
            if key in node:
                spelt, value, complete = walk(node[key], path[end:])
                if complete:
                    return (key, *spelt), value, True
                partial = partial or ((key, *spelt), value, False)
        return partial or ((), node, False)
    if isinstance(node, tuple) and isinstance(part, int) and 0 <= part < len(node):
        spelt, value, complete = walk(node[part], path[1:])
        return (part, *spelt), value, complete
    return (), node, False


@functools.lru_cache(maxsize=4096)  # a regex search a key (~1 us); keys repeat
def secret_name_problem(name: str) -> str | None:
    """What is wrong with a secret's name, or None: lowercase letters, digits and
    ``_ . / -``, in segments split by ``/``, none of them empty, ``.`` or ``..``."""
    if not SECRET_NAME.fullmatch(name) or len(name) > 200:
        return f"name {name!r}: lowercase letters, digits and _ . / - (at most 200)"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return f"name {name!r}: no empty, '.' or '..' segments"
    return None


def looks_secret(key: str | int) -> bool:
    """Whether a key's name says it holds a secret (password, api_key, token, ...)."""
    return isinstance(key, str) and _SECRET_KEY_NAME.search(key) is not None


def freeze(value: Any) -> Value:
    """Plain JSON-like data (dicts, lists) as an immutable config value.
    ``{"$secret": NAME}`` becomes a `SecretRef`."""
    if isinstance(value, Mapping):
        if SECRET_KEY in value and (ref := secret_ref(value)) is not None:
            return ref
        return FrozenDict({str(k): freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    if value is None or isinstance(value, bool | int | float | str | SecretRef):
        return value
    raise TypeError(f"not a config value: {type(value).__name__}")


_CONTAINERS: Final = frozenset((dict, list))


def freeze_json(value: Any, limits: Limits = DEFAULT_LIMITS, *, what: str = "config") -> Value:
    """`freeze` for what a JSON decoder returns (dicts, lists, str, int, float, bool,
    None), several times faster. Refuses (`LimitError`, naming `what`) data nested
    deeper than ``limits.depth`` or holding more than ``limits.nodes`` values, checked
    first, so the freezing walk never recurses past the limit. `view_json` gives the
    same value without building it up front."""
    _check_limits(value, limits, what)
    return _frozen(value) if type(value) in _CONTAINERS else freeze(value)


def _frozen(item: Any) -> Value:
    if type(item) is list:
        return tuple(_frozen(i) if type(i) in _CONTAINERS else i for i in item)
    if SECRET_KEY in item and (ref := secret_ref(item)) is not None:
        return ref
    return FrozenDict({k: _frozen(i) if type(i) in _CONTAINERS else i for k, i in item.items()})


class _LazyDict(FrozenDict):
    """A `FrozenDict` over a decoded JSON object (see `view_json`) whose values become
    config values when first read, and stay so: an object a `_LazyDict`, a list a tuple,
    ``{"$secret": NAME}`` a `SecretRef`. A reader of one key pays for that branch only.
    Every way of reading goes through `__getitem__`, `values` or `items`, including
    ``dict(view)`` and ``{**view}`` (a dict subclass with its own `__iter__` is copied
    key by key), so nothing mutable is ever handed out. Comparing makes the whole view
    immutable first (it then is a plain `FrozenDict`), so a view compares exactly as the
    eager freeze would, read or not."""

    __slots__ = ()

    def __getitem__(self, key: str) -> Any:
        value = dict.__getitem__(self, key)
        kind = type(value)
        if kind is dict or kind is list:
            value = _adopt(value)
            dict.__setitem__(self, key, value)  # the same value, now immutable
        return value

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default  # noqa: SIM401 - this is get()

    def __iter__(self) -> Iterator[str]:
        return dict.__iter__(self)

    # Named through the class: another thread's comparison may turn `self` into a plain
    # FrozenDict (see `_freeze_all`) between looking a method up and calling it.
    def values(self) -> Any:
        return dict.values(_LazyDict._read_all(self))

    def items(self) -> Any:
        return dict.items(_LazyDict._read_all(self))

    def copy(self) -> dict[str, Any]:
        return dict(self.items())

    def __or__(self, other: Any) -> Any:
        return dict(self.items()) | other

    def __ror__(self, other: Any) -> Any:
        return other | dict(self.items())

    def __eq__(self, other: object) -> bool:
        _freeze_all(self)
        if isinstance(other, _LazyDict):
            _freeze_all(other)
        return dict.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenDict, (dict(self.items()),))

    def _read_all(self) -> _LazyDict:
        raw = [key for key, value in dict.items(self) if type(value) in _CONTAINERS]
        for key in raw:
            _LazyDict.__getitem__(self, key)
        return self


def _adopt(value: Any) -> Any:
    """A decoded object or list as a config value: objects lazily, lists at once (a
    tuple cannot wait), secret references as `SecretRef`."""
    if type(value) is list:
        return tuple(_adopt(item) if type(item) in _CONTAINERS else item for item in value)
    if SECRET_KEY in value and (ref := secret_ref(value)) is not None:
        return ref
    return _LazyDict(value)


def _freeze_all(view: _LazyDict) -> None:
    """Read every branch of `view`; it is then a plain `FrozenDict` (reads at C speed)."""
    if type(view) is not _LazyDict:
        return
    for value in view.values():
        if type(value) is _LazyDict:
            _freeze_all(value)
        elif type(value) is tuple:
            _freeze_items(value)
    view.__class__ = FrozenDict  # type: ignore[assignment]  # same layout, no longer lazy


def _freeze_items(items: tuple[Any, ...]) -> None:
    for item in items:
        if type(item) is _LazyDict:
            _freeze_all(item)
        elif type(item) is tuple:
            _freeze_items(item)


def view_json(value: Any, limits: Limits = DEFAULT_LIMITS, *, what: str = "config") -> Value:
    """What `freeze_json` gives, without building it up front: decoded JSON (which it
    takes over: pass what a decoder just returned) checked against ``limits.depth`` and
    ``limits.nodes`` in one walk over its objects and lists, then wrapped in a view whose
    values become immutable config values as they are read (`_LazyDict`). Raises
    `LimitError` naming `what`."""
    _check_limits(value, limits, what)
    return _adopt(value) if type(value) in _CONTAINERS else freeze(value)


def _check_limits(value: Any, limits: Limits, what: str) -> None:
    """Depth and node count of decoded JSON, a level at a time: per object or list, the
    type test of its values runs in C, and only containers are visited."""
    count, level, containers = 1, 1, [value] if type(value) in _CONTAINERS else []
    while containers:
        if level > limits.depth:
            raise LimitError(f"{what} is nested deeper than {limits.depth} levels (limit depth)")
        below: list[Any] = []
        for item in containers:
            count += len(item)
            values = item.values() if type(item) is dict else item
            if not _CONTAINERS.isdisjoint(map(type, values)):
                below += [child for child in values if type(child) in _CONTAINERS]
        containers, level = below, level + 1
    if count > limits.nodes:
        raise LimitError(f"{what} holds more than {limits.nodes} values (limit nodes)")


def thaw(value: Value) -> Any:
    """A config value as plain, mutable JSON-compatible data (secrets as ``{"$secret": NAME}``)."""
    if isinstance(value, dict):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    if isinstance(value, SecretRef):
        return value.as_json()
    return value


def redacted(value: Value) -> Any:
    """Like `thaw`, but every secret reference shows as ``<secret:NAME>``: safe to print."""
    if isinstance(value, dict):
        return {k: redacted(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [redacted(v) for v in value]
    if isinstance(value, SecretRef):
        return value.shown()
    return value


def plain_secret_paths(value: LayerValue, path: Path = ()) -> Iterator[Path]:
    """Paths of non-empty plain strings held under keys that name a secret, directly
    or as items of a list (``api_keys: [...]``), depth first in the data's order."""
    found: list[Path] = []
    _plain_secrets(value, path, found)
    return iter(found)


def _plain_secrets(value: LayerValue, path: Path, found: list[Path]) -> None:
    """`plain_secret_paths` into `found`. Every new layer is walked (a file edit on the
    publisher's hot path), so only containers are descended into: one call per
    mapping or list, not one generator per value."""
    if isinstance(value, dict | Mapping):  # dict first: an exact type check, no ABC
        for key, child in value.items():
            if isinstance(child, str):
                if child and looks_secret(key):
                    found.append((*path, key))
            elif isinstance(child, dict | tuple | Mapping):
                _plain_secrets(child, (*path, key), found)
    elif isinstance(value, tuple):
        holder = next((part for part in reversed(path) if isinstance(part, str)), "")
        secret = looks_secret(holder)
        for index, child in enumerate(value):
            if isinstance(child, str):
                if child and secret:
                    found.append((*path, index))
            elif isinstance(child, dict | tuple | Mapping):
                _plain_secrets(child, (*path, index), found)


def _encode_hook(obj: Any) -> Any:
    if isinstance(obj, SecretRef):
        return obj.as_json()
    raise TypeError(f"not a config value: {type(obj).__name__}")


_encoder: Final = msgspec.json.Encoder(enc_hook=_encode_hook, order="sorted")


def canonical_json(value: Value) -> bytes:
    """Sorted-key, compact JSON of a config value: the input of its hash."""
    return _encoder.encode(value)


def config_hash(value: Value) -> str:
    """Hex SHA-256 of the canonical JSON."""
    return hashlib.sha256(canonical_json(value)).hexdigest()
