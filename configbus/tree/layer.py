"""A layer: one source of config values (a file, or a run-time store), with provenance.

Layers are stacked lowest first and merged into a resolved config. Each keeps the line
of every key it sets, so a resolved value can say where it came from without the merge
having to carry that bookkeeping on its hot path.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from configbus.errors import display_path
from configbus.tree.values import EMPTY, LayerValue, Path, plain_secret_paths, walk

__all__ = ["MISSING", "Layer", "LayerKind", "Origin"]


class LayerKind(enum.StrEnum):
    """Where a layer sits in the stack, lowest first."""

    BASE = "base"  # a parent file reached through `extends:`
    ENVIRONMENT = "environment"  # <env>/<env>.yml
    OVERRIDE = "override"  # <env>/overrides/<name>.yml
    TENANT = "tenant"  # tenants/<tenant>/<env>.yml
    SECRETS = "secrets"  # tenants/<tenant>/secrets/<env>.yml: sealed secrets, no values
    STORE = "store"  # the run-time tenant store (Redis)
    EMERGENCY = "emergency"  # operators' emergency overrides
    PUBLISHED = "published"  # a version published before, as history holds it (rollback)


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Final = _Missing()


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a value was set: a file and line, or a store and key."""

    layer: Layer
    path: Path
    line: int | None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{display_path(self.layer.source)}:{self.line}"
        return f"{self.layer.source}#{'.'.join(str(p) for p in self.path)}"


@dataclass(frozen=True, slots=True, eq=False)
class Layer:
    """One source of values. `data` may hold `DELETE` markers; `lines` maps each key
    path the layer sets to its 1-based line (empty for stores, which have no lines).

    Layers compare by identity: a changed file is a new layer, so caches keyed by
    layers never serve stale merges."""

    kind: LayerKind
    name: str
    source: str
    data: Mapping[str, LayerValue] = field(default_factory=lambda: EMPTY)
    lines: Mapping[Path, int] = field(default_factory=dict)
    # Secret names an environment's layer shares with its tenants' layers.
    shares: frozenset[str] = frozenset()
    shares_line: int | None = None
    # Sealed secrets this layer carries: name -> live versions, newest first.
    sealed: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Paths where this layer writes a plain string under a secret-named key.
    plain_secrets: tuple[Path, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "plain_secrets", tuple(plain_secret_paths(self.data)))

    def lookup(self, path: Path) -> LayerValue | _Missing:
        """The value this layer writes at exactly `path` (possibly `DELETE`), or MISSING."""
        _, value, complete = walk(self.data, path)
        return value if complete else MISSING

    def origin(self, path: Path) -> Origin:
        return Origin(self, path, self.lines.get(path))

    def describe(self) -> str:
        return f"{self.kind.value} {self.name}"
