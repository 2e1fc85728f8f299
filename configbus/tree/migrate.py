"""Versioned migrations of the environment tree: keys renamed, moved, deleted or
retyped in every layer file and in the schema, once each, in order, on record.

Layout::

    <root>/migrations/NNNN_description.yml   one migration (NNNN: 4 or more digits)
    <root>/migrations/applied.yml            the record of those applied (written here)

A migration file lists operations, applied in order::

    description: quotas move under limits                 # optional
    operations:
      - rename: {from: monitoring.slo.latency_p99_ms, to: monitoring.slo.p99_ms}
      - move: {from: tenancy.quotas, to: limits.quotas}     # across sections
      - delete: {key: test_automation.load}
      - retype: {key: monitoring.slo.p99_ms, to: float}     # int float str bool list

(the list of operations alone, at the top level, works too). `rename` changes only a
key's last part; `move` takes it anywhere. Each operation is applied to every YAML
layer of the tree (``common/``, every environment file, every override, every tenant
layer; not ``tenant.yml`` nor sealed secrets) and to ``schema.json``: the property
is renamed, moved or deleted with its ``required`` entry, or its ``type`` changed.
A layer that deletes a parent of the moved key (``!delete``) gets ``!delete`` at the
new place too, so that the key stays deleted there.

`plan_migrations` reads the migrations and the record and says, for each pending
migration and operation, the file and line of every place it changes.
`apply_migrations` applies every pending one, in order, with `YamlFile` (comments and
layout kept), checks that the tree has no problem it did not have before, and puts
every file back if anything fails; then it records each migration: its id, the
checksum of its file, when, and the files it changed. A migration recorded as
applied runs never again, and its file must not change afterwards (a new migration
undoes or amends it).
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path as FilePath
from typing import Any, Final

import yaml

from configbus.errors import Problem, SchemaError, TreeError
from configbus.tree.roundtrip import JsonFile, TextFile, YamlFile, restore_all, write_all
from configbus.tree.sealed import SECRETS_DIR
from configbus.tree.tree import (
    MIGRATIONS_DIR,
    SCHEMA_FILE,
    TENANT_FILE,
    TENANTS_DIR,
    EnvironmentTree,
)
from configbus.tree.values import DELETE, LayerValue, Path, SecretRef, format_path, looks_secret
from configbus.tree.values import redacted as _redacted
from configbus.tree.values import walk as _walk

__all__ = [
    "MIGRATIONS_DIR",
    "RECORD_FILE",
    "AppliedMigration",
    "Edit",
    "Migration",
    "MigrationPlan",
    "MigrationResult",
    "MigrationStatus",
    "Operation",
    "OperationPlan",
    "apply_migrations",
    "load_migrations",
    "plan_migrations",
    "read_record",
]

RECORD_FILE: Final = "applied.yml"
_NAME: Final = re.compile(r"([0-9]{4,})_([a-z0-9][a-z0-9_-]*)\.yml")
_FIELDS: Final = {
    "rename": ("from", "to"),
    "move": ("from", "to"),
    "delete": ("key",),
    "retype": ("key", "to"),
}
TYPES: Final = {
    "int": "integer",
    "float": "number",
    "str": "string",
    "bool": "boolean",
    "list": "array",
}
_DIRECTIVES: Final = frozenset({"extends", "shared_secrets"})
_INT: Final = re.compile(r"[-+]?[0-9]+")
_FLOAT: Final = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_TRUE: Final = frozenset({"true", "yes", "on", "1"})
_FALSE: Final = frozenset({"false", "no", "off", "0"})
_RECORD_HEADER: Final = (
    "# Migrations applied to this tree, oldest first, written by `configbus migrate apply`.\n"
    "# Do not edit: a migration listed here never runs again, and its file must not change.\n"
)


@dataclass(frozen=True, slots=True)
class Operation:
    """One operation of a migration: `op` (rename, move, delete, retype) on `key`;
    `to` is the new key (rename, move) or type (retype). `line` is in the file."""

    op: str
    key: str
    to: str | None
    line: int

    def describe(self) -> str:
        if self.op == "delete":
            return f"delete {self.key}"
        if self.op == "retype":
            return f"retype {self.key} to {self.to}"
        return f"{self.op} {self.key} -> {self.to}"

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "key": self.key, "to": self.to, "line": self.line}


@dataclass(frozen=True, slots=True)
class Migration:
    """A migration file: `id` is its name without ``.yml``, `file` its path relative
    to the tree's root, `checksum` the ``sha256:`` of its bytes."""

    id: str
    number: int
    file: str
    checksum: str
    description: str
    operations: tuple[Operation, ...]


@dataclass(frozen=True, slots=True)
class Edit:
    """One place an operation changes: the file (relative to the root) and the line
    of the key there before the change, the key as that file spells it, what
    happens, and the values before and after (keys, for a rename; redacted)."""

    file: str
    line: int | None
    key: str
    action: str  # rename | move | delete | retype | mark-delete
    old: Any
    new: Any

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "line": self.line,
            "key": self.key,
            "action": self.action,
            "old": self.old,
            "new": self.new,
        }


@dataclass(frozen=True, slots=True)
class OperationPlan:
    operation: Operation
    edits: tuple[Edit, ...]

    def to_dict(self) -> dict[str, Any]:
        return {**self.operation.to_dict(), "edits": [e.to_dict() for e in self.edits]}


@dataclass(frozen=True, slots=True)
class MigrationPlan:
    """What a pending migration changes, operation by operation."""

    migration: Migration
    operations: tuple[OperationPlan, ...]

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(sorted({e.file for op in self.operations for e in op.edits}))

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.migration.id,
            "file": self.migration.file,
            "checksum": self.migration.checksum,
            "description": self.migration.description,
            "operations": [op.to_dict() for op in self.operations],
            "files": list(self.files),
        }


@dataclass(frozen=True, slots=True)
class AppliedMigration:
    """A migration as `applied.yml` records it."""

    id: str
    checksum: str
    applied_at: str
    files: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "checksum": self.checksum,
            "applied_at": self.applied_at,
            "files": list(self.files),
        }


@dataclass(frozen=True, slots=True)
class MigrationStatus:
    """The migrations applied (as recorded) and those pending, with what each changes."""

    root: str
    applied: tuple[AppliedMigration, ...]
    pending: tuple[MigrationPlan, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "applied": [a.to_dict() for a in self.applied],
            "pending": [p.to_dict() for p in self.pending],
        }


@dataclass(frozen=True, slots=True)
class MigrationResult:
    """What `apply_migrations` did: each migration applied with what it changed and
    its new record; `record_file` is ``migrations/applied.yml``."""

    root: str
    applied: tuple[tuple[MigrationPlan, AppliedMigration], ...]
    record_file: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "record_file": self.record_file,
            "applied": [{**plan.to_dict(), **record.to_dict()} for plan, record in self.applied],
        }


# -- reading ------------------------------------------------------------------------------
def load_migrations(root: str | os.PathLike[str]) -> tuple[Migration, ...]:
    """The tree's migration files, in order. Raises `TreeError` naming file, line and
    field of every problem: a bad name, a number used twice, an unknown operation, a
    missing or unknown field."""
    base = FilePath(root).absolute()
    folder = base / MIGRATIONS_DIR
    if not folder.is_dir():
        return ()
    problems: list[Problem] = []
    found: list[Migration] = []
    numbers: dict[int, str] = {}
    for path in sorted(folder.iterdir()):
        name = path.name
        if name.startswith(".") or name == RECORD_FILE or not name.endswith((".yml", ".yaml")):
            continue
        match = _NAME.fullmatch(name)
        if match is None:
            message = "a migration's name is NNNN_description.yml (4+ digits, lowercase words)"
            problems.append(Problem(str(path), None, None, message))
            continue
        number = int(match.group(1))
        if number in numbers:
            message = f"number {number} is taken by {numbers[number]}: give each migration its own"
            problems.append(Problem(str(path), None, None, message))
            continue
        numbers[number] = name
        try:
            found.append(_migration(base, path, number))
        except TreeError as exc:
            problems += exc.problems
    if problems:
        raise TreeError(problems)
    return tuple(sorted(found, key=lambda m: m.number))


def _migration(base: FilePath, path: FilePath, number: int) -> Migration:
    source = str(path)
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TreeError([Problem(source, None, None, f"cannot read: {exc}")]) from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        message = f"YAML syntax error: {exc.problem or exc.context}"
        raise TreeError([Problem(source, line, None, message)]) from None
    description = ""
    problems: list[Problem] = []
    operations: list[Operation] = []
    where = ""
    if isinstance(root, yaml.MappingNode):
        items = {_text(k): (k, v) for k, v in root.value}
        for key, (node, _) in items.items():
            if key not in ("description", "operations"):
                problems.append(
                    Problem(
                        source, _line(node), key, "unknown key (allowed: description, operations)"
                    )
                )
        if "description" in items:
            value = items["description"][1]
            if not isinstance(value, yaml.ScalarNode):
                problems.append(Problem(source, _line(value), "description", "must be text"))
            else:
                description = str(value.value)
        if "operations" not in items:
            problems.append(Problem(source, _line(root), None, "missing key operations: [...]"))
            root = None
        else:
            root = items["operations"][1]
            where = "operations."
    if root is not None:
        if not isinstance(root, yaml.SequenceNode) or not root.value:
            line = _line(root) if root is not None else 1
            message = "must list operations: rename, move, delete, retype"
            problems.append(Problem(source, line, where.rstrip(".") or None, message))
        else:
            for index, node in enumerate(root.value):
                operation = _operation(source, node, f"{where}{index}", problems)
                if operation is not None:
                    operations.append(operation)
    elif not problems:
        problems.append(Problem(source, None, None, "empty: list operations"))
    if problems:
        raise TreeError(problems)
    checksum = "sha256:" + hashlib.sha256(raw).hexdigest()
    relative = path.relative_to(base).as_posix()
    return Migration(path.stem, number, relative, checksum, description, tuple(operations))


def _operation(
    source: str, node: yaml.Node, where: str, problems: list[Problem]
) -> Operation | None:
    line = _line(node)
    if not isinstance(node, yaml.MappingNode) or len(node.value) != 1:
        message = "must be one operation: rename, move, delete or retype, with its fields"
        problems.append(Problem(source, line, where, message))
        return None
    key_node, body = node.value[0]
    op = _text(key_node)
    if op not in _FIELDS:
        message = f"unknown operation {op!r} (known: {', '.join(_FIELDS)})"
        problems.append(Problem(source, line, where, message))
        return None
    where = f"{where}.{op}"
    fields = _FIELDS[op]
    if not isinstance(body, yaml.MappingNode):
        message = f"must be a mapping: {{{', '.join(f'{f}: ...' for f in fields)}}}"
        problems.append(Problem(source, _line(body), where, message))
        return None
    values: dict[str, str] = {}
    bad = False
    for field_key, value in body.value:
        name = _text(field_key)
        if name not in fields:
            message = f"unknown field {name!r} ({op} takes {', '.join(fields)})"
            problems.append(Problem(source, _line(field_key), where, message))
            bad = True
        elif not isinstance(value, yaml.ScalarNode) or not str(value.value).strip():
            problems.append(
                Problem(source, _line(value), f"{where}.{name}", "must be a dotted key")
            )
            bad = True
        else:
            values[name] = str(value.value).strip()
    for name in fields:
        if name not in values and not bad:
            problems.append(Problem(source, _line(body), where, f"missing field {name!r}"))
            bad = True
    if bad:
        return None
    key = values.get("from", values.get("key", ""))
    to = values.get("to")
    checks = [("from" if op in ("rename", "move") else "key", key)]
    if op in ("rename", "move") and to is not None:
        checks.append(("to", to))
    for name, value in checks:
        parts = value.split(".")
        if any(not part for part in parts):
            problems.append(Problem(source, line, f"{where}.{name}", f"{value!r}: empty key part"))
            return None
        if parts[0] in _DIRECTIVES:
            message = f"{value!r}: {parts[0]} is a directive of the files, not a config key"
            problems.append(Problem(source, line, f"{where}.{name}", message))
            return None
    if op == "retype" and to not in TYPES:
        message = f"unknown type {to!r} (known: {', '.join(TYPES)})"
        problems.append(Problem(source, line, f"{where}.to", message))
        return None
    if op in ("rename", "move") and to is not None:
        old, new = key.split("."), to.split(".")
        if old == new:
            problems.append(Problem(source, line, where, "from and to are the same key"))
            return None
        if new[: len(old)] == old:
            problems.append(Problem(source, line, where, "cannot move a key inside itself"))
            return None
        if op == "rename" and old[:-1] != new[:-1]:
            message = "rename changes only the last part of a key; move takes it elsewhere"
            problems.append(Problem(source, line, where, message))
            return None
    return Operation(op, key, to, line)


def _text(node: yaml.Node) -> str:
    return str(node.value) if isinstance(node, yaml.ScalarNode) else "?"


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def read_record(root: str | os.PathLike[str]) -> tuple[AppliedMigration, ...]:
    """The migrations ``migrations/applied.yml`` records, oldest first (none without it)."""
    path = FilePath(root).absolute() / MIGRATIONS_DIR / RECORD_FILE
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ()
    except (OSError, UnicodeDecodeError) as exc:
        raise TreeError([Problem(source, None, None, f"cannot read: {exc}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        message = f"not valid YAML: {str(exc).splitlines()[0]}"
        raise TreeError([Problem(source, None, None, message)]) from None
    entries = data.get("applied") if isinstance(data, dict) else None
    if data is None:
        return ()
    if not isinstance(entries, list):
        raise TreeError([Problem(source, None, "applied", "must be a list of migrations")])
    records: list[AppliedMigration] = []
    for index, entry in enumerate(entries):
        fields = ("id", "checksum", "applied_at")
        ok = isinstance(entry, dict) and all(isinstance(entry.get(f), str) for f in fields)
        files = entry.get("files", []) if isinstance(entry, dict) else None
        if not ok or not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            message = "must have id, checksum, applied_at (text) and files (a list)"
            raise TreeError([Problem(source, None, f"applied.{index}", message)])
        records.append(
            AppliedMigration(entry["id"], entry["checksum"], entry["applied_at"], tuple(files))
        )
    return tuple(records)


# -- planning -----------------------------------------------------------------------------
def plan_migrations(root: str | os.PathLike[str]) -> MigrationStatus:
    """The applied migrations and what each pending one would change. Raises
    `TreeError` for a migration file that is malformed, changed since it was applied
    (checksum), recorded but gone, or numbered before one already applied; and for an
    operation that cannot apply (a value that does not convert, a key already set
    where another would move)."""
    base = FilePath(root).absolute()
    applied, pending = _pending(base)
    workspace = _Workspace(base)
    plans = tuple(workspace.run(migration) for migration in pending)
    return MigrationStatus(str(base), applied, plans)


def _pending(base: FilePath) -> tuple[tuple[AppliedMigration, ...], list[Migration]]:
    migrations = load_migrations(base)
    applied = read_record(base)
    by_id = {m.id: m for m in migrations}
    record = str(base / MIGRATIONS_DIR / RECORD_FILE)
    problems: list[Problem] = []
    for entry in applied:
        migration = by_id.get(entry.id)
        if migration is None:
            message = (
                f"{entry.id} is recorded as applied but {MIGRATIONS_DIR}/{entry.id}.yml is gone"
            )
            problems.append(Problem(record, None, None, message))
        elif migration.checksum != entry.checksum:
            problems.append(
                Problem(
                    str(base / migration.file),
                    None,
                    None,
                    f"changed after it was applied on {entry.applied_at} (checksum "
                    f"{entry.checksum[:19]}..., now {migration.checksum[:19]}...): an applied "
                    "migration must not change; put it back and write a new migration",
                )
            )
    done = {entry.id for entry in applied}
    last = max(
        (by_id[e.id] for e in applied if e.id in by_id), key=lambda m: m.number, default=None
    )
    pending = [m for m in migrations if m.id not in done]
    for migration in pending:
        if last is not None and migration.number < last.number:
            message = f"numbered before {last.id}, which is already applied: number it after"
            problems.append(Problem(str(base / migration.file), None, None, message))
    if problems:
        raise TreeError(problems)
    return applied, pending


# -- applying -----------------------------------------------------------------------------
def apply_migrations(
    root: str | os.PathLike[str], *, now: datetime.datetime | None = None
) -> MigrationResult:
    """Apply every pending migration in order (all of them, or none): edit the files,
    check the tree, record. On any failure every file is put back as it was and
    `TreeError` (`SchemaError` for schema problems the migrations would bring) says
    why. Applying again does nothing."""
    base = FilePath(root).absolute()
    record_path = base / MIGRATIONS_DIR / RECORD_FILE
    record_name = record_path.relative_to(base).as_posix()
    applied, pending = _pending(base)
    if not pending:
        return MigrationResult(str(base), (), record_name)
    before = {(p.source, p.key or "", p.message) for p in EnvironmentTree(base).check().problems}
    workspace = _Workspace(base)
    plans = [workspace.run(migration) for migration in pending]
    stamp = _stamp(now)
    records = [
        AppliedMigration(plan.migration.id, plan.migration.checksum, stamp, changed)
        for plan, changed in zip(plans, workspace.changed_by_migration, strict=True)
    ]
    record = TextFile.rewrite(record_path, _record_text([*applied, *records]))
    written = write_all([*workspace.files(), record])
    try:
        report = EnvironmentTree(base).check()
        new = [p for p in report.problems if (p.source, p.key or "", p.message) not in before]
        if new:
            raise SchemaError(new)
    except TreeError as exc:
        restore_all(written)
        note = Problem("", None, None, "migrations rolled back: every file is as it was")
        kind = SchemaError if isinstance(exc, SchemaError) else TreeError
        raise kind([*exc.problems, note]) from None
    return MigrationResult(str(base), tuple(zip(plans, records, strict=True)), record_name)


def _record_text(records: Sequence[AppliedMigration]) -> str:
    data = {"applied": [r.to_dict() for r in records]}
    return _RECORD_HEADER + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def _stamp(now: datetime.datetime | None) -> str:
    moment = now or datetime.datetime.now(datetime.UTC)
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the work -----------------------------------------------------------------------------
class _Workspace:
    """Every layer file and the schema of a tree, read once, edited in memory."""

    def __init__(self, base: FilePath) -> None:
        self.base = base
        self.layers: dict[str, YamlFile] = {
            path.relative_to(base).as_posix(): YamlFile.read(path) for path in _layer_files(base)
        }
        schema = base / SCHEMA_FILE
        self.schema = JsonFile.read(schema) if schema.is_file() else None
        self.changed_by_migration: list[tuple[str, ...]] = []

    def files(self) -> list[TextFile]:
        found: list[TextFile] = list(self.layers.values())
        if self.schema is not None:
            found.append(self.schema)
        return found

    def run(self, migration: Migration) -> MigrationPlan:
        before = {name: doc.text for name, doc in self.layers.items()}
        schema_before = self.schema.text if self.schema is not None else None
        plans = []
        for operation in migration.operations:
            edits = self._layers(migration, operation)
            if self.schema is not None:
                edits += self._schema(migration, operation, self.schema)
            plans.append(OperationPlan(operation, tuple(edits)))
        changed = [name for name, doc in self.layers.items() if doc.text != before[name]]
        if self.schema is not None and self.schema.text != schema_before:
            changed.append(SCHEMA_FILE)
        self.changed_by_migration.append(tuple(sorted(changed)))
        return MigrationPlan(migration, tuple(plans))

    # -- layer files --------------------------------------------------------------------------
    def _layers(self, migration: Migration, operation: Operation) -> list[Edit]:
        edits: list[Edit] = []
        problems: list[Problem] = []
        edit = _OPERATIONS[operation.op]
        for name, doc in self.layers.items():
            try:
                edits += edit(name, doc, operation)
            except _Unconvertible as exc:
                where = f"{migration.file}:{operation.line}"
                message = f"retype to {operation.to}: {exc} ({where})"
                problems.append(Problem(doc.path, exc.line, exc.key, message))
            except TreeError as exc:
                where = f"{migration.id}, {operation.describe()}"
                problems += [
                    Problem(p.source, p.line, p.key, f"{p.message} ({where})") for p in exc.problems
                ]
        if problems:
            raise TreeError(problems)
        return edits

    # -- the schema ---------------------------------------------------------------------------
    def _schema(self, migration: Migration, operation: Operation, schema: JsonFile) -> list[Edit]:
        parts = tuple(operation.key.split("."))
        try:
            found = _property(schema.data, parts)
            if found is None:
                return []
            pointer, holder, key = found
            line = schema.line(pointer)
            if operation.op == "retype":
                node = holder["properties"][key]
                return _retype_property(node, str(operation.to), line, parts)
            if operation.op == "delete":
                _refuse_conditions(holder, key, line, "delete")
                del holder["properties"][key]
                _drop_required(holder, key)
                return [Edit(SCHEMA_FILE, line, operation.key, "delete", key, None)]
            target = tuple(str(operation.to).split("."))
            if target[:-1] == parts[:-1]:
                parent = holder
            else:
                _refuse_conditions(holder, key, line, operation.op)
                parent = _object_at(schema.data, target[:-1], schema)
            _move_property(holder, key, parent, target[-1], line)
            edit = Edit(SCHEMA_FILE, line, operation.key, operation.op, operation.key, operation.to)
            return [edit]
        except _SchemaProblem as exc:
            where = f"{migration.file}:{operation.line}, {operation.describe()}"
            message = f"{exc} ({where}): edit the schema by hand"
            raise TreeError([Problem(schema.path, exc.line, operation.key, message)]) from None


def _move(name: str, doc: YamlFile, operation: Operation) -> list[Edit]:
    """Rename or move the key in one layer file. Where the file deletes a parent of
    the key (``!delete``), the new place is deleted too, so that the key stays
    deleted for the streams of this layer."""
    data = doc.parsed().data
    spelt, value, complete = _walk(data, tuple(operation.key.split(".")))
    target = _spell(data, tuple(str(operation.to).split(".")))
    if complete:
        if doc.has(target):
            message = f"already set: cannot {operation.op} {format_path(spelt)} here"
            raise TreeError([Problem(doc.path, doc.line(target), format_path(target), message)])
        line = doc.line(spelt)
        doc.move(spelt, target)
        key, new = format_path(spelt), format_path(target)
        return [Edit(name, line, key, operation.op, key, new)]
    if value is not DELETE or not spelt or target[: len(spelt)] == spelt:
        return []  # not here; or the new place is under the same deleted parent
    _, hidden, whole = _walk(data, target)
    if whole or hidden is DELETE:
        return []  # set there, or deleted through a parent, already
    doc.set(target, DELETE)
    return [Edit(name, doc.line(spelt), format_path(target), "mark-delete", None, "!delete")]


def _delete(name: str, doc: YamlFile, operation: Operation) -> list[Edit]:
    """Delete the key (a value or a ``!delete``) in one layer file, and the mappings
    it leaves empty."""
    spelt, value, complete = _walk(doc.parsed().data, tuple(operation.key.split(".")))
    if not complete:
        return []
    edit = Edit(name, doc.line(spelt), format_path(spelt), "delete", _shown(spelt, value), None)
    doc.delete(spelt, lambda _: True)
    return [edit]


def _retype(name: str, doc: YamlFile, operation: Operation) -> list[Edit]:
    """Convert the key's value in one layer file (a ``!delete`` stays as it is)."""
    spelt, value, complete = _walk(doc.parsed().data, tuple(operation.key.split(".")))
    if not complete or value is DELETE:
        return []
    try:
        new = _convert(value, str(operation.to), hidden=looks_secret(spelt[-1]))
    except _Unconvertible as exc:
        exc.line, exc.key = doc.line(spelt), format_path(spelt)
        raise
    if not _differs(value, new):
        return []
    edit = Edit(
        name,
        doc.line(spelt),
        format_path(spelt),
        "retype",
        _shown(spelt, value),
        _shown(spelt, new),
    )
    doc.set(spelt, new)
    return [edit]


_OPERATIONS: Final = {"rename": _move, "move": _move, "delete": _delete, "retype": _retype}


def _layer_files(base: FilePath) -> Iterator[FilePath]:
    """Every YAML layer of the tree: not migrations, tenant declarations, sealed secrets."""
    for path in sorted(base.rglob("*.yml")):
        parts = path.relative_to(base).parts
        if any(part.startswith(".") for part in parts) or parts[0] == MIGRATIONS_DIR:
            continue
        if parts[0] == TENANTS_DIR and len(parts) >= 3 and parts[2] in (TENANT_FILE, SECRETS_DIR):
            continue
        yield path


def _spell(data: Mapping[str, Any], parts: tuple[str, ...]) -> Path:
    """`parts` as the file spells them as far as it has them (a key such as
    ``uvicorn.access`` holds a dot), the rest as given."""
    spelt, _, complete = _walk(data, parts)
    if complete:
        return spelt
    used = sum(len(str(key).split(".")) for key in spelt)
    return (*spelt, *parts[used:])


def _differs(old: Any, new: Any) -> bool:
    return type(old) is not type(new) or old != new


def _shown(path: Path, value: Any) -> Any:
    if value is DELETE:
        return "!delete"
    if isinstance(value, Mapping):
        return {k: _shown((*path, k), v) for k, v in value.items()}
    if isinstance(value, str) and value and path and looks_secret(path[-1]):
        return "<redacted>"
    if isinstance(value, tuple):
        return [_shown(path, v) for v in value]
    return _redacted(value)


class _Unconvertible(Exception):
    """A value that does not convert; `line` and `key` say where, once known."""

    line: int | None = None
    key: str | None = None


def _convert(value: LayerValue, to: str, *, hidden: bool = False) -> LayerValue:
    """`value` as type `to`; null stays null. Raises `_Unconvertible` saying why,
    without showing the value when `hidden`."""
    if value is None:
        return None
    if isinstance(value, SecretRef):
        raise _Unconvertible("a secret reference cannot change type")
    if to == "list":
        if isinstance(value, Mapping):
            raise _Unconvertible("a mapping is not a list")
        return value if isinstance(value, tuple) else (value,)
    if isinstance(value, Mapping | tuple):
        raise _Unconvertible(
            f"a {'mapping' if isinstance(value, Mapping) else 'list'} is not one value"
        )
    if to == "str":
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float):
            return repr(value)
        return str(value)
    shown = "the value (under a secret's key name)" if hidden else repr(value)
    if to == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _Unconvertible(f"{shown} is not true or false")
    if isinstance(value, bool):
        raise _Unconvertible(f"{shown} is not a number")
    if to == "int":
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            if value.is_integer():
                return int(value)
            raise _Unconvertible(f"{shown} is not a whole number")
        if isinstance(value, str) and _INT.fullmatch(value.strip()):
            return int(value.strip())
        raise _Unconvertible(f"{shown} is not a whole number")
    if isinstance(value, int | float):  # to float
        return float(value)
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        number = float(value.strip())
        if math.isfinite(number):
            return number
    raise _Unconvertible(f"{shown} is not a number")


class _SchemaProblem(Exception):
    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.line = line


def _property(
    schema: dict[str, Any], parts: tuple[str, ...]
) -> tuple[list[str], dict[str, Any], str] | None:
    """The schema object holding the property at `parts`: its JSON pointer (keys from
    the top), that object, and the property's name. None when the schema does not
    name the property; `_SchemaProblem` when the way there goes through ``$ref``."""
    node: Any = schema
    pointer: list[str] = []
    index = 0
    while index < len(parts):
        properties = node.get("properties") if isinstance(node, dict) else None
        if not isinstance(properties, dict):
            if isinstance(node, dict) and "$ref" in node:
                raise _SchemaProblem(f"{'.'.join(parts[:index])} is defined through $ref", None)
            return None
        for end in range(len(parts), index, -1):  # a property may hold a dot in its name
            name = ".".join(parts[index:end])
            if name in properties:
                break
        else:
            return None
        if end == len(parts):
            return [*pointer, "properties", name], node, name
        node = properties[name]
        pointer += ["properties", name]
        index = end
    return None


def _object_at(schema: dict[str, Any], parts: tuple[str, ...], file: JsonFile) -> dict[str, Any]:
    """The schema object for the mapping at `parts`, created (an object with
    properties) where missing."""
    node = schema
    pointer: list[str] = []
    for part in parts:
        if "$ref" in node and "properties" not in node:
            raise _SchemaProblem(f"{'.'.join(parts)} is defined through $ref", file.line(pointer))
        properties = node.setdefault("properties", {})
        child = properties.get(part)
        if not isinstance(child, dict):
            child = properties[part] = {"type": "object", "properties": {}}
        node = child
        pointer += ["properties", part]
    return node


def _drop_required(holder: dict[str, Any], key: str) -> None:
    required = holder.get("required")
    if isinstance(required, list) and key in required:
        required.remove(key)


def _retype_property(
    node: dict[str, Any], to: str, line: int | None, parts: tuple[str, ...]
) -> list[Edit]:
    if "$ref" in node:
        raise _SchemaProblem(f"{'.'.join(parts)} is defined through $ref", line)
    new_type = TYPES[to]
    old = node.get("type")
    if isinstance(old, list):
        new: Any = [new_type, *(["null"] if "null" in old else [])]
        new = new[0] if len(new) == 1 else new
    else:
        new = new_type
    if old == new:
        return []
    node["type"] = new
    return [Edit(SCHEMA_FILE, line, ".".join(parts), "retype", old, new)]


_CONDITIONS: Final = ("if", "then", "else", "not")
_COMBINED: Final = ("allOf", "anyOf", "oneOf")


def _subschemas(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The subschemas that apply to the same object as `node` (if, then, else, not,
    allOf, anyOf, oneOf, dependentSchemas), nested ones included."""
    children: list[Any] = [node.get(keyword) for keyword in _CONDITIONS]
    for keyword in _COMBINED:
        items = node.get(keyword)
        children += items if isinstance(items, list) else []
    dependent = node.get("dependentSchemas")
    children += list(dependent.values()) if isinstance(dependent, dict) else []
    for child in children:
        if isinstance(child, dict):
            yield child
            yield from _subschemas(child)


def _names(node: dict[str, Any], key: str) -> bool:
    """Whether `node` itself names property `key` (properties, required, dependent*)."""
    properties, required = node.get("properties"), node.get("required")
    dependent = node.get("dependentRequired")
    return (
        (isinstance(properties, dict) and key in properties)
        or (isinstance(required, list) and key in required)
        or (isinstance(node.get("dependentSchemas"), dict) and key in node["dependentSchemas"])
        or (
            isinstance(dependent, dict)
            and (key in dependent or any(key in names for names in dependent.values()))
        )
    )


def _rename_in(node: dict[str, Any], old: str, new: str) -> None:
    """Property `old` of `node` named `new`: in place, in the same order."""
    for keyword in ("properties", "dependentSchemas", "dependentRequired"):
        table = node.get(keyword)
        if isinstance(table, dict) and old in table:
            node[keyword] = {(new if k == old else k): v for k, v in table.items()}
    dependent = node.get("dependentRequired")
    if isinstance(dependent, dict):
        for names in dependent.values():
            if isinstance(names, list):
                names[:] = [new if n == old else n for n in names]
    required = node.get("required")
    if isinstance(required, list):
        required[:] = [new if r == old else r for r in required]


def _refuse_conditions(holder: dict[str, Any], key: str, line: int | None, verb: str) -> None:
    """A property named by its object's conditions (if/then, allOf, dependentRequired,
    ...) cannot be moved out or deleted without rewriting them: refuse."""
    dependent = holder.get("dependentRequired")
    named = isinstance(dependent, dict) and (
        key in dependent or any(key in names for names in dependent.values())
    )
    if named or any(_names(node, key) for node in _subschemas(holder)):
        raise _SchemaProblem(
            f"cannot {verb} {key!r}: a condition of its object (if/then/else, allOf, anyOf, "
            "oneOf, not, dependentRequired, dependentSchemas) names it",
            line,
        )


def _move_property(
    holder: dict[str, Any], key: str, parent: dict[str, Any], new_key: str, line: int | None
) -> None:
    """Property `key` of `holder` as `new_key` of `parent`, with its required entry; a
    rename (the same object) also renames it in the object's conditions."""
    properties = parent.setdefault("properties", {})
    if new_key in properties:
        raise _SchemaProblem(f"{new_key!r} is already a property there", line)
    if parent is holder:
        for node in (holder, *_subschemas(holder)):
            _rename_in(node, key, new_key)
        return
    required = key in holder.get("required", [])
    properties[new_key] = holder["properties"].pop(key)
    if required:
        _drop_required(holder, key)
        parent.setdefault("required", []).append(new_key)
