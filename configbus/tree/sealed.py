"""Sealed secrets at rest: which versions of which secret a stream carries.

A stream's secrets live beside its config, as ciphertext only (see
`configbus.crypto.secrets`), in the tree or in the Redis tenant store:

    <root>/tenants/<tenant>/secrets/<env>.yml     files safe to commit
    <prefix>store:<tenant>:<env>  field $secret:<name>   the same record as JSON

A record, in either place::

    database/password:
      versions:                 # sealed text, newest first; every one stays valid
        - cbsec1.3.acme-2026-12.<wrapped data key>.<nonce>.<ciphertext>
        - cbsec1.2.acme-2026-12....
      created: 2026-06-01T08:00:00Z
      rotated: 2026-12-07T06:00:00Z
      rotate_every: 30d         # optional: the daemon rotates it (needs `generate`)
      generate: 32              # optional: random bytes of a generated value
      not_after: 2027-03-01T00:00:00Z   # a certificate's expiry, read from it

The newest version is what a service reads; older ones are the versions a rotation has
not retired yet. Resolving a stream attaches each record's versions to the references
(``!secret NAME``) of that name; the store's record of a name wins over the file's.
"""

from __future__ import annotations

import itertools
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import yaml

from configbus.errors import Problem, SecretError, TreeError
from configbus.options import format_duration, parse_duration
from configbus.tree.values import sealed_version, secret_name_problem

__all__ = [
    "SECRETS_DIR",
    "SecretRecord",
    "parse_record",
    "parse_records",
    "read_secrets_file",
    "record_document",
    "secrets_file",
    "write_secrets_file",
]

SECRETS_DIR: Final = "secrets"
SEALED_TEXT: Final = re.compile(
    r"cbsec1\.[1-9][0-9]{0,18}\.[a-z0-9][a-z0-9_-]{0,63}(\.[A-Za-z0-9_-]+){3}"
)
_LATEST: Final = int(datetime(9999, 1, 1, tzinfo=UTC).timestamp())  # times written back
MAX_VERSIONS: Final = 16  # live versions of one secret (a rotation keeps the old one)
_FIELDS: Final = frozenset(
    {"versions", "created", "rotated", "rotate_every", "generate", "not_after"}
)
_HEADER: Final = (
    "# Sealed secrets of {stream}: AES-256-GCM ciphertext only, safe to commit.\n"
    "# Written by `configbus secret`; read with `configbus secret list`.\n"
)


@dataclass(frozen=True, slots=True)
class SecretRecord:
    """One secret of one stream: its live versions as sealed text, newest first, and
    what the operator tools show and act on. Its repr never shows the sealed text."""

    name: str
    versions: tuple[str, ...] = field(repr=False)
    created: int = 0  # ns since the epoch
    rotated: int = 0
    rotate_every: int = 0  # seconds; 0: rotated by hand only
    generate: int = 0  # bytes of a generated value; 0: set by hand
    not_after: int = 0  # a certificate's expiry, ns; 0: not a certificate

    @property
    def version(self) -> int:
        """The newest version, the one services read."""
        return sealed_version(self.versions[0])

    @property
    def live_versions(self) -> tuple[int, ...]:
        return tuple(sealed_version(text) for text in self.versions)

    def with_version(self, text: str, now: int) -> SecretRecord:
        """This record with `text` as its newest version; the others stay valid (never
        dropped here: only a retirement, gated on the fleet, drops a version)."""
        if len(self.versions) >= MAX_VERSIONS:
            raise SecretError(
                f"secret {self.name!r} has {len(self.versions)} live versions: retire old "
                "ones (`configbus secret retire`) before adding another"
            )
        return replace(self, versions=(text, *self.versions), rotated=now)

    def retired(self, keep: int = 1) -> SecretRecord:
        """This record with only its `keep` newest versions."""
        return replace(self, versions=self.versions[:keep])


def secrets_file(root: str | os.PathLike[str], tenant: str, env: str) -> Path:
    return Path(root) / "tenants" / tenant / SECRETS_DIR / f"{env}.yml"


def parse_record(name: str, document: Any, where: str, line: int | None = None) -> SecretRecord:
    """One record from its mapping; `TreeError` naming `where`, the line and the field."""

    def fail(key: str, message: str) -> TreeError:
        return TreeError([Problem(where, line, f"{name}.{key}" if key else name, message)])

    problem = secret_name_problem(name) if isinstance(name, str) else "a name is text"
    if problem is not None:
        raise fail("", problem)
    if not isinstance(document, Mapping):
        raise fail("", "a secret is a mapping with 'versions'")
    unknown = sorted(set(map(str, document)) - _FIELDS)
    if unknown:
        raise fail(unknown[0], f"unknown field (known: {', '.join(sorted(_FIELDS))})")
    versions = document.get("versions")
    if not isinstance(versions, list | tuple) or not versions:
        raise fail("versions", "a non-empty list of sealed values (cbsec1....)")
    if len(versions) > MAX_VERSIONS:
        raise fail("versions", f"more than {MAX_VERSIONS} live versions; retire old ones")
    numbers = []
    for index, text in enumerate(versions):
        if not isinstance(text, str) or not SEALED_TEXT.fullmatch(text):
            raise fail(f"versions.{index}", "not a sealed value (cbsec1.VERSION.KEK...)")
        numbers.append(sealed_version(text))
    if any(a <= b for a, b in itertools.pairwise(numbers)):
        raise fail("versions", "versions must be listed newest first, each once")
    try:
        return SecretRecord(
            name=name,
            versions=tuple(versions),
            created=_time(document.get("created")),
            rotated=_time(document.get("rotated")),
            rotate_every=_duration(document.get("rotate_every")),
            generate=_count(document.get("generate")),
            not_after=_time(document.get("not_after")),
        )
    except ValueError as exc:
        raise fail("", str(exc)) from None


def parse_records(
    document: Any, where: str, lines: Mapping[tuple[str | int, ...], int] | None = None
) -> dict[str, SecretRecord]:
    """Every record of a secrets file's (or store's) mapping, by name."""
    if document is None:
        return {}
    if not isinstance(document, Mapping):
        raise TreeError([Problem(where, 1, None, "a secrets file maps secret names to records")])
    lines = lines or {}
    return {
        str(name): parse_record(name, value, where, lines.get((name,)))
        for name, value in document.items()
    }


def record_document(record: SecretRecord) -> dict[str, Any]:
    """A record as the mapping a file or the store holds."""
    document: dict[str, Any] = {"versions": list(record.versions)}
    for key in ("created", "rotated", "not_after"):
        value = getattr(record, key)
        if value:
            document[key] = _iso(value)
    if record.rotate_every:
        document["rotate_every"] = format_duration(record.rotate_every)
    if record.generate:
        document["generate"] = record.generate
    return document


def read_secrets_file(path: str | os.PathLike[str]) -> dict[str, SecretRecord]:
    """The records of a secrets file; none when it does not exist."""
    from configbus.tree.yamlfile import parse_yaml

    where = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise TreeError([Problem(where, None, None, f"cannot read: {exc}")]) from None
    parsed = parse_yaml(where, text)
    return parse_records(parsed.data, where, parsed.lines)


def write_secrets_file(
    path: str | os.PathLike[str], stream: str, records: Mapping[str, SecretRecord]
) -> None:
    """Write `records` to `path` at once (a temporary file renamed over it), sorted by
    name, so a reader (the daemon's watcher) never sees half a file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    body = {name: record_document(records[name]) for name in sorted(records)}
    text = _HEADER.format(stream=stream) + yaml.safe_dump(body, sort_keys=False, width=4096)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(handle, 0o644 & ~umask)  # ciphertext only: readable as the tree is
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _time(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{value!r} is not a time (2026-12-07T06:00:00Z)") from None
    else:
        raise ValueError(f"{value!r} is not a time (2026-12-07T06:00:00Z)")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    seconds = int(moment.timestamp())
    if not 0 <= seconds < _LATEST:
        raise ValueError(f"{value!r} is not a time between 1970 and 9999")
    return seconds * 1_000_000_000


def _duration(value: Any) -> int:
    if value is None:
        return 0
    return parse_duration(str(value))


def _count(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 16 <= value <= 4096:
        raise ValueError(f"generate: {value!r} is not a number of bytes from 16 to 4096")
    return value
