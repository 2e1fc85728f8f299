"""A resolved config: the effective, immutable config of one stream, with provenance.

It is a read-only mapping of its top-level sections, with dotted access on top::

    config.get("database.postgresql.connection_pool.max_size")   # 100
    config.get("cache.redis.cluster.nodes")                        # ('redis-0:6379', ...)
    config.get("feature_flags.missing", default=False)            # False
    config.hash                                                   # sha256 of canonical JSON
    config.origin("database.postgresql.port")                     # prod/prod.yml:31
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

from configbus.errors import SecretError
from configbus.tree.layer import MISSING, Layer, Origin, _Missing
from configbus.tree.values import (
    DELETE,
    LayerValue,
    Path,
    SecretRef,
    Value,
    canonical_json,
    format_path,
    redacted,
    thaw,
    walk,
)

__all__ = ["ResolvedConfig", "SecretOpener", "Step", "parse_key"]


class SecretOpener(Protocol):
    """What opens a stream's sealed secrets (`configbus.crypto.SecretReader`)."""

    def open(self, name: str, sealed: Sequence[str], version: int | None = None) -> bytes: ...


_INDEX = re.compile(r"0|[1-9][0-9]*")


def parse_key(key: str | Path) -> Path:
    """``"cache.redis.nodes.0"`` as ``("cache", "redis", "nodes", 0)``."""
    if isinstance(key, tuple):
        return key
    if not key:
        return ()
    # Only a plain decimal is a list index: "01" stays a key (as int it would find "1").
    return tuple(int(part) if _INDEX.fullmatch(part) else part for part in key.split("."))


@dataclass(frozen=True, slots=True)
class Step:
    """One layer's say about a key, for `ResolvedConfig.explain`."""

    origin: Origin
    value: LayerValue  # DELETE when the layer deleted the key (or a parent of it)
    note: str = ""  # set when the layer acted on a parent key, not on the key itself


class ResolvedConfig(Mapping[str, Value]):
    """The effective config of one (tenant, environment) stream. Immutable."""

    def __init__(
        self,
        data: Mapping[str, Value],
        layers: Sequence[Layer] = (),
        *,
        env: str | None = None,
        tenant: str | None = None,
        overrides: Sequence[str] = (),
        secrets: SecretOpener | None = None,
    ) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "secrets", secrets)
        setattr_(self, "_data", data)
        setattr_(self, "layers", tuple(layers))
        setattr_(self, "env", env)
        setattr_(self, "tenant", tenant)
        setattr_(self, "overrides", tuple(overrides))

    _data: Mapping[str, Value]
    layers: tuple[Layer, ...]
    env: str | None
    tenant: str | None
    overrides: tuple[str, ...]
    secrets: SecretOpener | None  # opens sealed secrets; None: none can be read here

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("ResolvedConfig is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("ResolvedConfig is immutable")

    # -- mapping of top-level sections ------------------------------------------------
    def __getitem__(self, key: str) -> Value:
        value = self._lookup(parse_key(key))
        if value is MISSING:
            raise KeyError(key)
        return value  # type: ignore[return-value]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._lookup(parse_key(key)) is not MISSING

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ResolvedConfig):
            return self.canonical_json == other.canonical_json
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.hash)

    def __repr__(self) -> str:
        stream = f"{self.tenant or '-'}/{self.env or '-'}"
        return f"<ResolvedConfig {stream} {self.hash[:12]}>"

    def get(self, key: str | Path, default: Any = None) -> Any:
        """The value at a dotted key (list items by index), or `default` when missing."""
        value = self._lookup(parse_key(key))
        return default if value is MISSING else value

    def _lookup(self, path: Path) -> Value | _Missing:
        _, value, complete = walk(self._data, path)
        return value if complete else MISSING  # type: ignore[return-value]

    # -- encodings ----------------------------------------------------------------------
    @property
    def data(self) -> Mapping[str, Value]:
        """The whole config as an immutable mapping."""
        return self._data

    @cached_property
    def canonical_json(self) -> bytes:
        """Sorted-key compact JSON, secrets as ``{"$secret": NAME}``."""
        return canonical_json(self._data)

    @cached_property
    def hash(self) -> str:
        """Hex SHA-256 of the canonical JSON: equal configs, equal hashes."""
        return hashlib.sha256(self.canonical_json).hexdigest()  # `config_hash`, encoding once

    def to_dict(self) -> dict[str, Any]:
        """A mutable, JSON-compatible copy (secrets as ``{"$secret": NAME}``)."""
        result: dict[str, Any] = thaw(self._data)
        return result

    def redacted(self) -> dict[str, Any]:
        """A mutable copy safe to print: secrets show as ``<secret:NAME>``."""
        result: dict[str, Any] = redacted(self._data)
        return result

    # -- secrets ----------------------------------------------------------------------------
    def secret(self, key: str | Path, *, version: int | None = None) -> str:
        """The plain text of the secret referenced at `key` (``!secret NAME`` in the
        tree), decrypted now, on access; see `secret_bytes`."""
        value = self.secret_bytes(key, version=version)
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise SecretError(
                f"{format_path(parse_key(key))}: the secret is binary; use secret_bytes()"
            ) from None

    def secret_bytes(self, key: str | Path, *, version: int | None = None) -> bytes:
        """The bytes of the secret referenced at `key`: its newest version, or
        `version` while a rotation keeps an older one valid. Raises `SecretError`
        naming the key and the secret, never a value: no reference there, no value set,
        no key-encryption key given, or a ciphertext that does not open (tampered with,
        or moved from another stream)."""
        path = parse_key(key)
        value = self._lookup(path)
        if not isinstance(value, SecretRef):
            raise SecretError(f"{format_path(path)}: not a secret reference (!secret NAME)")
        if self.secrets is None:
            raise SecretError(
                f"{format_path(path)}: secret {value.name!r} cannot be read here: no "
                "key-encryption key was given (secret_keys=..., CONFIGBUS_SECRET_KEYS "
                "or CONFIGBUS_KEK_<TENANT>)"
            )
        return self.secrets.open(value.name, value.sealed, version)

    def secret_version(self, key: str | Path) -> int:
        """The newest version of the secret referenced at `key` (0 when none is set)."""
        path = parse_key(key)
        value = self._lookup(path)
        if not isinstance(value, SecretRef):
            raise SecretError(f"{format_path(path)}: not a secret reference (!secret NAME)")
        return value.versions[0] if value.sealed else 0

    # -- provenance ---------------------------------------------------------------------
    def origin(self, key: str | Path) -> Origin | None:
        """Where the value at `key` was set: the highest layer that wrote exactly that
        key (for a list item, the list). None when the key is not in the config."""
        path, _, complete = walk(self._data, parse_key(key))
        if not path or not complete:
            return None
        for cut in range(len(path), 0, -1):
            if cut < len(path) and not isinstance(path[cut], int):
                break  # only list items inherit their origin from the list
            for layer in reversed(self.layers):
                if layer.lookup(path[:cut]) is not MISSING:
                    return layer.origin(path[:cut])
        return None

    def explain(self, key: str | Path) -> list[Step]:
        """Every layer's say about `key`, lowest first: values it set, deletions, and
        parents it replaced or deleted (which wipe what lower layers had below)."""
        wanted = parse_key(key)
        steps: list[Step] = []
        for layer in self.layers:
            path, value, complete = walk(layer.data, wanted)
            if complete:
                steps.append(Step(layer.origin(path), value))
            elif path and not isinstance(value, Mapping):
                verb = "deleted" if value is DELETE else "replaced"
                steps.append(Step(layer.origin(path), value, f"{format_path(path)} {verb}"))
        return steps
