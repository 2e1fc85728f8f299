"""Promotion: carrying config values from one environment to the next (staging to prod).

`plan_promotion` compares the resolved configs of the two environments, stream by
stream (a tenant's, or the environments' own files with no tenant), under the key
prefixes asked for, and says for each key what changes (added, changed, removed),
from what to what, and where the apply writes it. `apply_promotion` writes it, with
`YamlFile` (comments, order, quoting and tags of everything else kept), checks the
result, and puts every file back if the check fails.

Where a change is written (the target's top file layer, so that it wins):

- for a tenant's stream, the tenant's own layer ``tenants/<tenant>/<target>.yml``
  (created if the tenant has none): the environment file and the overrides are
  shared with other tenants, and promoting one tenant must not change the others;
- with no tenant, the environment's own file ``<target>/<target>.yml``, never a
  file it `extends:` (``common/base.yml`` is every environment's).

A key the source lacks is removed from that file when nothing below it sets the key;
when a lower layer does (the environment file, an override, a parent file), the
change writes ``!delete`` there instead: the key is then gone for this stream only.

Secrets never move: a secret reference (``!secret``) names a different secret in
each environment by design, and a plain string under a secret's key name is a
mistake, not a value to spread. Such keys are listed as skipped, never shown.
Keys that are the environment's own (``application.environment``, host names,
buckets) differ by nature: narrow a plan with ``keys`` (prefixes) or ``exclude``.

Every value in a plan or result is redacted as `configbus render` shows it: safe to
print, log and keep as an audit record.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from configbus.errors import Problem, SchemaError, SettingsError, TreeError, UnknownNameError
from configbus.tree.layer import Layer, LayerKind
from configbus.tree.merge import merge
from configbus.tree.resolved import ResolvedConfig
from configbus.tree.roundtrip import YamlFile, restore_all, sha256_text, write_all
from configbus.tree.tree import TENANTS_DIR, EnvironmentTree
from configbus.tree.values import (
    DELETE,
    EMPTY,
    LayerValue,
    Path,
    SecretRef,
    Value,
    canonical_json,
    format_path,
    looks_secret,
    redacted,
    walk,
)

__all__ = [
    "AppliedChange",
    "Change",
    "PromotionPlan",
    "PromotionResult",
    "Skipped",
    "StreamPlan",
    "WrittenFile",
    "apply_promotion",
    "plan_promotion",
]

ADDED: Final = "added"
CHANGED: Final = "changed"
REMOVED: Final = "removed"
SET: Final = "set"  # write the source's value
UNSET: Final = "delete"  # remove the key from the file
MARK: Final = "mark-delete"  # write `!delete`: a lower layer sets the key
_FILE_LAYERS: Final = frozenset(
    {LayerKind.BASE, LayerKind.ENVIRONMENT, LayerKind.OVERRIDE, LayerKind.TENANT}
)
_HIDDEN: Final = "<redacted>"
_SECRET_REF: Final = (
    "a secret reference (!secret): each environment names its own secret; never promoted"
)
_PLAIN_SECRET: Final = "a plain value under a secret's key name: never promoted or shown"


@dataclass(frozen=True, slots=True)
class Change:
    """One key to promote in one stream. `old` is the target's value (None when
    added), `new` the source's (None when removed), both redacted. `file` (relative
    to the tree's root) is what the apply writes, `line` the key's line there now, or
    for a key the file lacks, the line of its nearest parent there (None: none)."""

    tenant: str | None
    key: str
    path: Path
    action: str  # added | changed | removed
    old: Any
    new: Any
    file: str
    line: int | None
    in_file: bool  # whether `file` sets the key now (else the apply adds it)
    write: str  # set | delete | mark-delete

    def to_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "key": self.key,
            "action": self.action,
            "old": self.old,
            "new": self.new,
            "file": self.file,
            "line": self.line,
            "in_file": self.in_file,
            "write": self.write,
        }


@dataclass(frozen=True, slots=True)
class Skipped:
    """A key that differs but is not promoted, and why (no value shown)."""

    tenant: str | None
    key: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "key": self.key, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class StreamPlan:
    """What promoting one stream changes; `file` is the one the apply writes."""

    tenant: str | None
    file: str
    creates: bool  # whether `file` does not exist yet
    changes: tuple[Change, ...]
    skipped: tuple[Skipped, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "file": self.file,
            "creates": self.creates,
            "changes": [c.to_dict() for c in self.changes],
            "skipped": [s.to_dict() for s in self.skipped],
        }


@dataclass(frozen=True, slots=True)
class PromotionPlan:
    """Promoting `source` to `target` under the `keys` prefixes (all keys when empty),
    `exclude` left out, for each stream."""

    root: str
    source: str
    target: str
    keys: tuple[str, ...]
    exclude: tuple[str, ...]
    streams: tuple[StreamPlan, ...]

    @property
    def changes(self) -> tuple[Change, ...]:
        return tuple(change for stream in self.streams for change in stream.changes)

    @property
    def skipped(self) -> tuple[Skipped, ...]:
        return tuple(skip for stream in self.streams for skip in stream.skipped)

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "source": self.source,
            "target": self.target,
            "keys": list(self.keys),
            "exclude": list(self.exclude),
            "streams": [s.to_dict() for s in self.streams],
        }


@dataclass(frozen=True, slots=True)
class AppliedChange:
    """One change as written: the file (relative to the root), the key's line there
    after the apply (for a removed key: where it was), the key, what happened, and
    the values before and after, redacted."""

    file: str
    line: int | None
    key: str
    action: str
    write: str
    old: Any
    new: Any
    tenant: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "line": self.line,
            "key": self.key,
            "action": self.action,
            "write": self.write,
            "old": self.old,
            "new": self.new,
            "tenant": self.tenant,
        }


@dataclass(frozen=True, slots=True)
class WrittenFile:
    """A file the apply wrote, with hashes of its bytes before (None: created) and after."""

    file: str
    created: bool
    sha256_before: str | None
    sha256_after: str
    changes: tuple[AppliedChange, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "created": self.created,
            "sha256_before": self.sha256_before,
            "sha256_after": self.sha256_after,
            "changes": [c.to_dict() for c in self.changes],
        }


@dataclass(frozen=True, slots=True)
class PromotionResult:
    """What `apply_promotion` wrote, file by file, and when (UTC)."""

    plan: PromotionPlan
    files: tuple[WrittenFile, ...]
    applied_at: str

    @property
    def changes(self) -> tuple[AppliedChange, ...]:
        return tuple(change for file in self.files for change in file.changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.plan.to_dict(),
            "applied_at": self.applied_at,
            "files": [f.to_dict() for f in self.files],
        }


# -- planning ---------------------------------------------------------------------------
def plan_promotion(
    tree: EnvironmentTree,
    source: str,
    target: str,
    *,
    tenants: Sequence[str | None] | None = None,
    keys: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> PromotionPlan:
    """What promoting `source` to `target` changes.

    `tenants`: the streams, each a tenant id or None for the environments' own files;
    None (the default) takes every tenant that runs in both environments. `keys` are
    dotted key prefixes to promote (all keys when empty); `exclude` prefixes to leave
    out. Raises `UnknownNameError` for an unknown environment or tenant, or a tenant
    that does not run in both; `SettingsError` for a malformed prefix."""
    source, target = tree.environment(source), tree.environment(target)
    if source == target:
        raise SettingsError(f"--from and --to are both {source!r}: nothing to promote")
    prefixes, left_out = _prefixes(keys, "--keys"), _prefixes(exclude, "--exclude")
    if tenants is None:
        tenants = [
            tenant
            for tenant in tree.tenants()
            if {source, target} <= tree.tenant(tenant).environments.keys()
        ]
        if not tenants:
            raise UnknownNameError(
                f"no tenant runs in both {source} and {target}; "
                "give --tenant - to promote the environments' own files"
            )
    streams = tuple(
        _plan_stream(tree, source, target, tenant, prefixes, left_out) for tenant in tenants
    )
    return PromotionPlan(str(tree.root), source, target, prefixes, left_out, streams)


def _prefixes(values: Sequence[str], option: str) -> tuple[str, ...]:
    found: list[str] = []
    for value in values:
        for prefix in value.split(","):
            prefix = prefix.strip()
            if not prefix:
                continue
            if any(not part for part in prefix.split(".")):
                raise SettingsError(f"{option} {prefix!r}: a dotted key such as features.x")
            if prefix not in found:
                found.append(prefix)
    return tuple(found)


@dataclass(frozen=True, slots=True)
class _Target:
    """The file a stream's changes go to, its layer (None: not there yet), and the
    merge of the layers below it."""

    path: str
    layer: Layer | None
    below: Mapping[str, Value]


def _target(tree: EnvironmentTree, config: ResolvedConfig, tenant: str | None) -> _Target:
    layers = [layer for layer in config.layers if layer.kind in _FILE_LAYERS]
    kind = LayerKind.ENVIRONMENT if tenant is None else LayerKind.TENANT
    top = next((layer for layer in reversed(layers) if layer.kind is kind), None)
    if top is not None:
        path = top.source
    else:  # a tenant without its own layer for the environment: the apply creates it
        path = os.path.join(str(tree.root), TENANTS_DIR, str(tenant), f"{config.env}.yml")
    below: Mapping[str, Value] = EMPTY
    for layer in layers:
        if layer is not top:
            below = merge(below, layer.data)
    return _Target(path, top, below)


def _plan_stream(
    tree: EnvironmentTree,
    source: str,
    target: str,
    tenant: str | None,
    keys: tuple[str, ...],
    exclude: tuple[str, ...],
) -> StreamPlan:
    before = tree.resolve(source, tenant)
    after = tree.resolve(target, tenant)
    where = _target(tree, after, tenant)
    relative = _relative(tree, where.path)
    lines = where.layer.lines if where.layer is not None else {}
    changes: list[Change] = []
    skipped: list[Skipped] = []
    for path, action, old, new in _diff(before.data, after.data, keys, exclude):
        key = format_path(path)
        reason = _not_promoted(path, old, new)
        if reason is not None:
            skipped.append(Skipped(tenant, key, reason))
            continue
        if action == REMOVED:
            write = MARK if _exact(where.below, path) is not _ABSENT else UNSET
        else:
            write = SET
        line = lines.get(path)
        in_file = line is not None
        cut = len(path) - 1
        while line is None and cut > 0:
            line, cut = lines.get(path[:cut]), cut - 1
        changes.append(
            Change(
                tenant,
                key,
                path,
                action,
                _shown(path, old),
                _shown(path, new),
                relative,
                line,
                in_file,
                write,
            )
        )
    return StreamPlan(tenant, relative, where.layer is None, tuple(changes), tuple(skipped))


class _Absent:
    __slots__ = ()

    def __repr__(self) -> str:
        return "ABSENT"


_ABSENT: Final = _Absent()
_Diff = tuple[Path, str, Any, Any]  # path, action, old (target), new (source)


def _diff(
    source: Mapping[str, Value],
    target: Mapping[str, Value],
    keys: tuple[str, ...],
    exclude: tuple[str, ...],
) -> list[_Diff]:
    found: list[_Diff] = []
    if not keys:
        _compare((), source, target, exclude, found)
    for prefix in keys:
        parts = tuple(prefix.split("."))
        spelt_s, value_s, in_source = walk(source, parts)
        spelt_t, value_t, in_target = walk(target, parts)
        if in_source or in_target:
            path = spelt_s if in_source else spelt_t
            _compare(
                path,
                value_s if in_source else _ABSENT,
                value_t if in_target else _ABSENT,
                exclude,
                found,
            )
    unique: dict[Path, _Diff] = {}
    for entry in found:  # prefixes may overlap
        unique.setdefault(entry[0], entry)
    return list(unique.values())


def _compare(path: Path, new: Any, old: Any, exclude: tuple[str, ...], found: list[_Diff]) -> None:
    key = format_path(path)
    if any(key == e or key.startswith(e + ".") for e in exclude):
        return
    inside = any(e.startswith(key + ".") for e in exclude) if key else bool(exclude)
    if new is _ABSENT and old is _ABSENT:
        return
    if new is _ABSENT:
        if isinstance(old, Mapping) and old and (inside or _holds_secret(old)):
            for child, value in old.items():
                _compare((*path, child), _ABSENT, value, exclude, found)
        else:
            found.append((path, REMOVED, old, None))
    elif old is _ABSENT:
        if isinstance(new, Mapping) and new:
            for child, value in new.items():
                _compare((*path, child), value, _ABSENT, exclude, found)
        else:
            found.append((path, ADDED, None, new))
    elif isinstance(new, Mapping) and isinstance(old, Mapping):
        for child, value in old.items():
            _compare((*path, child), new.get(child, _ABSENT), value, exclude, found)
        for child, value in new.items():
            if child not in old:
                _compare((*path, child), value, _ABSENT, exclude, found)
    elif not _same(new, old):
        found.append((path, CHANGED, old, new))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, SecretRef) and isinstance(b, SecretRef):
        return a.name == b.name  # sealed versions differ between environments
    return canonical_json(a) == canonical_json(b)


def _holds_secret(value: Any) -> bool:
    if isinstance(value, SecretRef):
        return True
    if isinstance(value, Mapping):
        return any(_holds_secret(v) for v in value.values())
    if isinstance(value, tuple):
        return any(_holds_secret(v) for v in value)
    return False


def _plain_secret(path: Path, value: Any) -> bool:
    """A plain string where a secret's key name asks for a reference (the items of a
    list go by the list's key name)."""
    if isinstance(value, Mapping):
        return any(_plain_secret((*path, k), v) for k, v in value.items())
    if isinstance(value, tuple):
        return any(_plain_secret(path, v) for v in value)
    return isinstance(value, str) and bool(value) and bool(path) and looks_secret(path[-1])


def _not_promoted(path: Path, old: Any, new: Any) -> str | None:
    if _holds_secret(old) or _holds_secret(new):
        return _SECRET_REF
    if _plain_secret(path, old) or _plain_secret(path, new):
        return _PLAIN_SECRET
    return None


def _shown(path: Path, value: Any) -> Any:
    """`value` as safe to print: secret references by name, plain strings under a
    secret's key name hidden."""
    if isinstance(value, Mapping):
        return {k: _shown((*path, k), v) for k, v in value.items()}
    if isinstance(value, str) and value and path and looks_secret(path[-1]):
        return _HIDDEN
    if isinstance(value, tuple):
        return [_shown(path, v) for v in value]
    return redacted(value)


def _exact(data: Mapping[str, Any], path: Path) -> Any:
    """The value at `path` spelled exactly (no dotted-key matching), or `_ABSENT`."""
    node: Any = data
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _relative(tree: EnvironmentTree, path: str) -> str:
    return os.path.relpath(path, tree.root).replace(os.sep, "/")


# -- applying ----------------------------------------------------------------------------
def apply_promotion(
    tree: EnvironmentTree, plan: PromotionPlan, *, now: datetime.datetime | None = None
) -> PromotionResult:
    """Write `plan` into the target's files, then check: the target's resolved values
    under the plan's keys must equal the source's (secrets aside), and the tree must
    have no problem it did not have before. On any failure every file is put back as
    it was and `TreeError` (`SchemaError` for schema problems) says why.

    Refuses a plan the tree no longer matches (a file changed since): plan again."""
    tenants = [stream.tenant for stream in plan.streams]
    again = plan_promotion(
        tree, plan.source, plan.target, tenants=tenants, keys=plan.keys, exclude=plan.exclude
    )
    if again != plan:
        raise TreeError("the tree changed since this promotion was planned: plan it again")
    stamp = _stamp(now)
    if not plan.changes:
        return PromotionResult(plan, (), stamp)
    root = str(tree.root)
    problems_before = _problem_keys(EnvironmentTree(root))
    documents: dict[str, YamlFile] = {}
    changes: dict[str, list[Change]] = {}
    for stream in plan.streams:
        if not stream.changes:
            continue
        source = tree.resolve(plan.source, stream.tenant)
        where = _target(tree, tree.resolve(plan.target, stream.tenant), stream.tenant)
        document = documents.get(stream.file)
        if document is None:
            document = documents[stream.file] = _open(where.path, stream, plan.target)
        for change in stream.changes:
            _write(document, change, source, where.below)
            changes.setdefault(stream.file, []).append(change)
    written = write_all(documents.values())
    try:
        _verify(root, plan, problems_before)
    except TreeError as exc:
        restore_all(written)
        note = Problem("", None, None, "promotion rolled back: every file is as it was")
        kind = SchemaError if isinstance(exc, SchemaError) else TreeError
        raise kind([*exc.problems, note]) from None
    files = []
    for name, document in documents.items():
        applied = tuple(
            AppliedChange(
                name,
                change.line if change.write == UNSET else document.line(change.path),
                change.key,
                change.action,
                change.write,
                change.old,
                change.new,
                change.tenant,
            )
            for change in changes[name]
        )
        files.append(
            WrittenFile(
                name,
                document.created,
                sha256_text(document.original),
                sha256_text(document.text) or "",
                applied,
            )
        )
    return PromotionResult(plan, tuple(files), stamp)


def _open(path: str, stream: StreamPlan, env: str) -> YamlFile:
    if not stream.creates:
        return YamlFile.read(path)
    return YamlFile.create(
        path, f"# {stream.tenant}, {env} layer: created by `configbus promote`.\n"
    )


def _write(
    document: YamlFile, change: Change, source: ResolvedConfig, below: Mapping[str, Value]
) -> None:
    if change.write == SET:
        value: LayerValue = _exact(source.data, change.path)
        document.set(change.path, value)
    elif change.write == MARK:
        document.set(change.path, DELETE)
    else:

        def prune(path: Path) -> bool:  # an empty mapping in the file changes nothing then
            return isinstance(_exact(below, path), Mapping)

        document.delete(change.path, prune)


def _verify(root: str, plan: PromotionPlan, problems_before: set[tuple[str, str, str]]) -> None:
    fresh = EnvironmentTree(root)
    tenants = [stream.tenant for stream in plan.streams]
    after = plan_promotion(
        fresh, plan.source, plan.target, tenants=tenants, keys=plan.keys, exclude=plan.exclude
    )
    if after.changes:
        raise TreeError(
            [
                Problem(
                    os.path.join(root, change.file),
                    change.line,
                    change.key,
                    f"still differs after the apply ({_title(change.tenant, plan.target)}: "
                    f"{change.old!r}, {plan.source}: {change.new!r}); a parent of it is "
                    "replaced or deleted in a layer: promote it by hand",
                )
                for change in after.changes
            ]
        )
    report = fresh.check()
    new = [p for p in report.problems if (p.source, p.key or "", p.message) not in problems_before]
    if new:
        raise SchemaError(new)


def _problem_keys(tree: EnvironmentTree) -> set[tuple[str, str, str]]:
    return {(p.source, p.key or "", p.message) for p in tree.check().problems}


def _title(tenant: str | None, env: str) -> str:
    return f"{tenant or '(no tenant)'}/{env}"


def _stamp(now: datetime.datetime | None) -> str:
    moment = now or datetime.datetime.now(datetime.UTC)
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
