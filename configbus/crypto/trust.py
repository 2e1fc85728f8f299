"""The trust file: which keys a subscriber (or `configbus tail`) believes, for what, and when.

A YAML file with two lists: `publishers`, the keys that sign the streams' snapshots
(the daemon's), and `operators`, the keys of people who may sign emergency overrides
and nothing else::

    # configbus trust file
    publishers:
      - kid: publisher-2026-11
        public_key: |
          -----BEGIN PUBLIC KEY-----
          MCowBQYDK2VwAyEA...
          -----END PUBLIC KEY-----
        tenants: ["*"]          # optional for a publisher, default every tenant
        environments: ["*"]     # optional for a publisher, default every environment
        not_after: 2027-01-01T00:00:00Z   # optional: trusted until then
      - kid: publisher-2026-05
        public_key_file: keys/publisher-2026-05.pub
        revoked: true           # refused from now on, whatever it signed and when
        revoked_at: 2026-11-03T02:14:00Z      # optional, for people
        revoked_reason: laptop stolen         # optional, for people
    operators:
      - kid: alice-2026
        public_key_file: keys/alice-2026.pub
        tenants: [aurora-records]   # required for an operator
        environments: [prod]        # required for an operator
        max_ttl: 2h             # required: the longest override this key may sign
        not_before: 2026-11-01T00:00:00Z  # optional: trusted from then

or, instead of `public_key`, ``public_key_file: keys/publisher-2026-11.pub`` (relative
to the trust file). An event is trusted when its kid is listed, the key is in force now
(not revoked, and the reader's clock is within `not_before` .. `not_after`), the key's
scope covers the event's tenant and environment, and its role may sign the event's kind
(an operator key signs overrides only, none longer than its `max_ttl`). A key is judged
by the reader's clock when the event is read, never by the time the event says it was
issued: an event signed by a retired or revoked key is refused by every reader from
then on, a new instance starting up included. Rotation: add the new kid, roll the trust
file out, switch the publisher to the new key, then retire the old kid (`not_after`, or
`revoked: true`); see docs/operators.md.

The file fails closed: an unknown top-level key or entry field (a typo such as
`tenant:` for `tenants:`) is an error, never ignored, and so is a time without a zone
or a `revoked_at` without `revoked: true`. An operator entry states its scope; a scope
that lists nothing is an error; `public_key` and `public_key_file` exclude each other.
A trust file (or a public key file it names) that its group or others may write is
refused: whoever can write it decides which keys are believed.

`TrustFile` keeps a loaded trust file current for long-running readers (subscribers,
the host agent): it reloads the file when its stat changes, and keeps the last good
store, with one log line, while the file on disk does not load.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final

import yaml

from configbus.crypto.keys import (
    VerifyKey,
    check_kid,
    check_not_writable_by_others,
    public_key_from_pem,
)
from configbus.errors import ConfigBusError, KeyringError
from configbus.options import format_duration, parse_duration

__all__ = [
    "KEY_EXPIRED",
    "KEY_NOT_YET_VALID",
    "KEY_REVOKED",
    "OPERATOR",
    "PUBLISHER",
    "REASON_CHARS",
    "TrustFile",
    "TrustStore",
    "TrustedKey",
    "format_time",
    "parse_time",
    "store_summary",
]

log = logging.getLogger(__name__)

PUBLISHER = "publisher"  # signs snapshots (and the expiry of overrides)
OPERATOR = "operator"  # signs emergency overrides only
_LISTS = {PUBLISHER: "publishers", OPERATOR: "operators"}
_FIELDS = (
    "kid",
    "public_key",
    "public_key_file",
    "tenants",
    "environments",
    "role",
    "max_ttl",
    "not_before",
    "not_after",
    "revoked",
    "revoked_at",
    "revoked_reason",
)
# Why a listed key is not in force (reason codes of `VerificationError`, wire format §7).
KEY_REVOKED: Final = "key_revoked"
KEY_EXPIRED: Final = "key_expired"
KEY_NOT_YET_VALID: Final = "key_not_yet_valid"
REASON_CHARS = 200  # of a revoked_reason: it travels in logs and acknowledgements
_EPOCH: Final = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_EXAMPLE = "e.g. 2026-12-01T00:00:00Z"
_LAST_NS: Final = (
    (datetime.datetime(9999, 12, 31, tzinfo=datetime.UTC) - _EPOCH)
    // (datetime.timedelta(microseconds=1))
    * 1000
)


class _StrictLoader(yaml.SafeLoader):
    """`yaml.safe_load`, refusing a key given twice in one mapping: the last would win
    silently, and a second ``revoked: false`` must not undo a revocation."""


def _unique_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> Any:
    seen: dict[object, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:
            continue  # an unhashable key: construct_mapping says so
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {first})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


@dataclass(frozen=True, slots=True)
class TrustedKey:
    """One entry of a trust file. Times are integer nanoseconds since the epoch."""

    key: VerifyKey
    tenants: frozenset[str]  # "*" for all
    environments: frozenset[str]
    role: str = PUBLISHER
    max_ttl: int | None = None  # seconds: the longest override an operator key may sign
    not_before: int | None = None  # trusted from then on (None: from always)
    not_after: int | None = None  # trusted until then, not at it (None: for ever)
    revoked: bool = False  # never trusted again, whatever not_before and not_after say
    revoked_at: int | None = None  # for people: when it was revoked
    revoked_reason: str = ""  # for people: why

    def covers(self, tenant: str, env: str) -> bool:
        return ("*" in self.tenants or tenant in self.tenants) and (
            "*" in self.environments or env in self.environments
        )

    def standing(self, now: int) -> tuple[str, str] | None:
        """None when the key is in force at `now` (ns since the epoch); otherwise a
        reason code (`key_revoked`, `key_expired`, `key_not_yet_valid`) and one line
        saying why."""
        kid = self.key.kid
        if self.revoked:
            since = f" since {format_time(self.revoked_at)}" if self.revoked_at else ""
            why = f": {self.revoked_reason}" if self.revoked_reason else ""
            return KEY_REVOKED, f"key {kid!r} is revoked{since}{why}"
        if self.not_after is not None and now >= self.not_after:
            return KEY_EXPIRED, f"key {kid!r} expired at {format_time(self.not_after)}"
        if self.not_before is not None and now < self.not_before:
            return (
                KEY_NOT_YET_VALID,
                f"key {kid!r} is not valid before {format_time(self.not_before)}",
            )
        return None

    def in_force(self, now: int) -> bool:
        return self.standing(now) is None


class TrustStore:
    """Trusted keys by kid. `source`: the trust file it was loaded from, if any (what
    `TrustFile` watches)."""

    def __init__(self, keys: Iterable[TrustedKey] = (), *, source: Path | None = None) -> None:
        self._keys: dict[str, TrustedKey] = {}
        self.source = source
        for trusted in keys:
            if trusted.key.kid in self._keys:
                raise KeyringError(f"key id {trusted.key.kid!r} is listed twice")
            self._keys[trusted.key.kid] = trusted

    def __repr__(self) -> str:
        return f"TrustStore(kids={sorted(self._keys)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrustStore) and self._keys == other._keys

    __hash__ = None  # type: ignore[assignment]

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    def get(self, kid: str) -> TrustedKey | None:
        return self._keys.get(kid)

    @property
    def kids(self) -> list[str]:
        return sorted(self._keys)

    def entries(self) -> list[TrustedKey]:
        return list(self._keys.values())

    def with_key(self, trusted: TrustedKey) -> TrustStore:
        """This store and one more key (`KeyringError` when its kid is listed)."""
        return TrustStore([*self._keys.values(), trusted])

    def replaced(self, trusted: TrustedKey) -> TrustStore:
        """This store with the entry of `trusted`'s kid replaced by it (in its place)."""
        kid = trusted.key.kid
        if kid not in self._keys:
            raise KeyringError(f"no key with id {kid!r} is listed")
        return TrustStore(trusted if k == kid else entry for k, entry in self._keys.items())

    def kids_of(self, key: VerifyKey) -> list[str]:
        """The kids under which the public key of `key` is listed (whatever its kid)."""
        pem = key.pem()
        return [kid for kid, entry in self._keys.items() if entry.key.pem() == pem]

    @classmethod
    def of(cls, *keys: VerifyKey) -> TrustStore:
        """A store trusting `keys` for every tenant and environment."""
        everything = frozenset({"*"})
        return cls(TrustedKey(key, everything, everything) for key in keys)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TrustStore:
        """Read a trust file. Raises `KeyringError` naming the file and entry; also when
        its group or others may write it."""
        where = Path(path)
        check_not_writable_by_others(where, "trust file")
        try:
            document = yaml.load(where.read_text(encoding="utf-8"), Loader=_StrictLoader)
        except OSError as exc:
            raise KeyringError(f"{where}: cannot read trust file: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise KeyringError(f"{where}: trust file is not UTF-8 text") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None)
            if problem and problem.startswith("duplicate key"):
                raise KeyringError(f"{where}{line}: trust file: {problem}") from None
            raise KeyringError(f"{where}{line}: trust file is not valid YAML") from None
        if isinstance(document, Mapping):
            unknown = [key for key in document if key not in _LISTS.values()]
            if unknown:
                known = ", ".join(sorted(_LISTS.values()))
                raise KeyringError(f"{where}: unknown key {unknown[0]!r} (known: {known})")
        if not isinstance(document, Mapping) or not any(
            isinstance(document.get(name), list) for name in _LISTS.values()
        ):
            raise KeyringError(f"{where}: a trust file needs a 'publishers' or 'operators' list")
        keys = []
        for role, name in _LISTS.items():
            entries = document.get(name, [])
            if not isinstance(entries, list):
                raise KeyringError(f"{where}: {name} must be a list of keys")
            for index, entry in enumerate(entries):
                keys.append(_entry(where, name, index, entry, role))
        kid_of: dict[str, str] = {}
        for trusted in keys:
            other = kid_of.setdefault(trusted.key.pem(), trusted.key.kid)
            if other != trusted.key.kid:  # revoking one kid would leave the key trusted
                raise KeyringError(
                    f"{where}: {other!r} and {trusted.key.kid!r} are the same public key: "
                    "list it once"
                )
        try:
            return cls(keys, source=where)
        except ConfigBusError as exc:
            raise KeyringError(f"{where}: {exc}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the store as a trust file at once (a temporary file renamed over it, so
        a reader never sees half of it), mode 0644. Raises `KeyringError`."""
        target = Path(path)
        temporary: str | None = None
        try:
            handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=".tmp")
            os.fchmod(handle, 0o644)
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                out.write(self.dump())
            os.replace(temporary, target)
        except OSError as exc:
            if temporary is not None:
                Path(temporary).unlink(missing_ok=True)
            raise KeyringError(f"{target}: cannot write: {exc.strerror}") from None

    def dump(self) -> str:
        """The store as trust-file YAML, public keys as literal blocks."""
        lines = ["# configbus trust file"]
        for role, name in _LISTS.items():
            entries = [t for t in self._keys.values() if t.role == role]
            if not entries and role != PUBLISHER:
                continue
            lines.append(f"{name}:" if entries else f"{name}: []")
            for trusted in entries:
                lines += [
                    f"  - kid: {trusted.key.kid}",
                    f"    tenants: {json.dumps(sorted(trusted.tenants))}",
                    f"    environments: {json.dumps(sorted(trusted.environments))}",
                ]
                if trusted.max_ttl is not None:
                    lines.append(f"    max_ttl: {format_duration(trusted.max_ttl)}")
                for name in ("not_before", "not_after"):
                    if (at := getattr(trusted, name)) is not None:
                        lines.append(f"    {name}: {format_time(at)}")
                if trusted.revoked:
                    lines.append("    revoked: true")
                    if trusted.revoked_at is not None:
                        lines.append(f"    revoked_at: {format_time(trusted.revoked_at)}")
                    if trusted.revoked_reason:
                        lines.append(f"    revoked_reason: {json.dumps(trusted.revoked_reason)}")
                lines += [
                    "    public_key: |",
                    *(f"      {row}" for row in trusted.key.pem().strip().splitlines()),
                ]
        return "\n".join(lines) + "\n"


def _entry(where: Path, name: str, index: int, entry: Any, role: str) -> TrustedKey:
    label = f"{where}: {name}[{index}]"
    if not isinstance(entry, Mapping):
        raise KeyringError(f"{label}: must be a mapping with kid and public_key")
    try:
        kid = check_kid(entry.get("kid"))
    except KeyringError as exc:
        _check_fields(label, entry)  # a misspelt `kid` is named as such
        raise KeyringError(f"{label}: {exc}") from None
    label = f"{where}: {role} {kid!r}"
    _check_fields(label, entry)
    if "public_key" in entry and "public_key_file" in entry:
        raise KeyringError(f"{label}: give public_key or public_key_file, not both")
    pem = entry.get("public_key")
    if pem is None and isinstance(entry.get("public_key_file"), str):
        key_path = where.parent / entry["public_key_file"]
        try:
            check_not_writable_by_others(key_path, "trusted public key")
        except KeyringError as exc:
            raise KeyringError(f"{label}: {exc}") from None
        try:
            pem = key_path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyringError(f"{label}: cannot read {key_path}: {exc}") from None
    if not isinstance(pem, str):
        raise KeyringError(f"{label}: needs public_key (PEM) or public_key_file")
    tenants = _scope(label, entry, "tenants", role)
    environments = _scope(label, entry, "environments", role)
    stated = entry.get("role", role)
    if stated != role:
        raise KeyringError(f"{label}: role {stated!r} does not belong in the {name} list")
    max_ttl = _max_ttl(label, entry.get("max_ttl"), role)
    not_before = _time(label, entry, "not_before")
    not_after = _time(label, entry, "not_after")
    if not_before is not None and not_after is not None and not_after <= not_before:
        raise KeyringError(f"{label}: not_after must be later than not_before")
    revoked, revoked_at, revoked_reason = _revocation(label, entry)
    key = public_key_from_pem(kid, pem, label)
    return TrustedKey(
        key,
        tenants,
        environments,
        role=role,
        max_ttl=max_ttl,
        not_before=not_before,
        not_after=not_after,
        revoked=revoked,
        revoked_at=revoked_at,
        revoked_reason=revoked_reason,
    )


def _check_fields(label: str, entry: Mapping[Any, Any]) -> None:
    """Refuse fields this version does not know, all of them named at once."""
    unknown = [field for field in entry if field not in _FIELDS]
    if unknown:
        names = ", ".join(repr(field) for field in unknown)
        plural = "s" if len(unknown) > 1 else ""
        raise KeyringError(f"{label}: unknown field{plural} {names} (known: {', '.join(_FIELDS)})")


def _scope(label: str, entry: Mapping[Any, Any], scope: str, role: str) -> frozenset[str]:
    """A list of tenant or environment names: required for operators, never empty."""
    if scope not in entry and role == OPERATOR:
        raise KeyringError(f"{label}: an operator key needs {scope} (a list of names, or ['*'])")
    value = entry.get(scope, ["*"])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise KeyringError(f"{label}: {scope} must be a list of names (or ['*'])")
    if not value:
        raise KeyringError(f"{label}: {scope} is empty: the key would be trusted for nothing")
    return frozenset(value)


def _max_ttl(label: str, value: Any, role: str) -> int | None:
    """An operator key's longest override, in seconds: required, and positive."""
    if value is None:
        if role == OPERATOR:
            raise KeyringError(f"{label}: an operator key needs max_ttl (e.g. 2h)")
        return None
    if role != OPERATOR:
        raise KeyringError(f"{label}: max_ttl applies to operator keys only")
    try:
        seconds = value if isinstance(value, int) and not isinstance(value, bool) else None
        seconds = parse_duration(str(value)) if seconds is None else seconds
    except ValueError as exc:
        raise KeyringError(f"{label}: max_ttl: {exc}") from None
    if seconds <= 0:
        raise KeyringError(f"{label}: max_ttl must be positive")
    return seconds


def _time(label: str, entry: Mapping[Any, Any], name: str) -> int | None:
    if name not in entry:
        return None
    try:
        return parse_time(entry[name])
    except ValueError as exc:
        raise KeyringError(f"{label}: {name}: {exc}") from None


def _revocation(label: str, entry: Mapping[Any, Any]) -> tuple[bool, int | None, str]:
    """`revoked` (a YAML boolean), and `revoked_at` and `revoked_reason`, which only
    a revoked key may carry (a revoked_at beside no `revoked: true` is a slip that
    would leave the key trusted)."""
    revoked = entry.get("revoked", False)
    if not isinstance(revoked, bool):
        raise KeyringError(f"{label}: revoked must be true or false, not {revoked!r}")
    for name in ("revoked_at", "revoked_reason"):
        if name in entry and not revoked:
            raise KeyringError(f"{label}: {name} without revoked: true (the key stays trusted)")
    revoked_at = _time(label, entry, "revoked_at")
    reason = entry.get("revoked_reason", "")
    if not isinstance(reason, str) or len(reason) > REASON_CHARS or not reason.isprintable():
        raise KeyringError(
            f"{label}: revoked_reason must be one line of text, at most {REASON_CHARS} characters"
        )
    return revoked, revoked_at, reason


def parse_time(value: object) -> int:
    """Nanoseconds since the epoch of an ISO 8601 time with its zone, as YAML reads it
    (a datetime) or as text. A date alone, or a time without a zone, is refused:
    whose midnight would it be? Raises `ValueError` saying what is wrong."""
    if isinstance(value, str):
        try:
            value = datetime.datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"{value!r} is not an ISO 8601 time ({_EXAMPLE})") from None
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"{value.isoformat()} has no time zone: add one ({_EXAMPLE})")
        ns = (value - _EPOCH) // datetime.timedelta(microseconds=1) * 1000
        if not 0 <= ns < _LAST_NS:
            raise ValueError(f"{value.isoformat()} is not between 1970 and 9999 (UTC)")
        return ns
    if isinstance(value, datetime.date):
        raise ValueError(f"{value.isoformat()} is a date: give a time with its zone ({_EXAMPLE})")
    raise ValueError(f"{value!r} is not an ISO 8601 time ({_EXAMPLE})")


def format_time(ns: int | None) -> str:
    """An instant (ns since the epoch) as ISO 8601 UTC, as `parse_time` reads it back."""
    if ns is None:
        return "-"
    moment = _EPOCH + datetime.timedelta(microseconds=ns // 1000)
    return moment.isoformat().replace("+00:00", "Z")


_Stat = tuple[int, int, int, int, int] | str


def _stat_of(path: Path) -> _Stat:
    """What changes when a file is replaced or rewritten: (device, inode, size, mtime,
    ctime), through symlinks (a Kubernetes ConfigMap swaps a symlink); or, when it
    cannot be read, why."""
    try:
        found = os.stat(path)
    except OSError as exc:
        return exc.strerror or exc.__class__.__name__
    return (found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns)


class TrustFile:
    """A trust file kept current. `check()` (cheap: one stat) says whether the file
    changed since it was last read; `reload()` reads it again: when it loads, `store`
    becomes the new store; when it does not (a typo, loose permissions, a file half
    copied, gone), the last good store stays and one line is logged per bad version of
    the file. Thread-safe; shared per path in a process (`shared`), so a hundred
    subscribers of one trust file read it once per change."""

    _shared: ClassVar[dict[Path, TrustFile]] = {}
    _shared_lock: ClassVar = threading.Lock()

    def __init__(self, store: TrustStore) -> None:
        if store.source is None:
            raise KeyringError("a trust store built in memory has no file to reload")
        self.path = store.source
        self.store = store
        self.error: str | None = None  # why the file on disk is not the store in use
        self.reloads = 0
        self._lock = threading.Lock()
        # The stat of the file as it was read. Taken now, after it was read: a change
        # made in between is seen at the next change (or never, if the file is left
        # as it is); `configbus keys` writes trust files whole, by renaming.
        self._seen = _stat_of(self.path)
        self._failed: _Stat | None = None

    @classmethod
    def shared(cls, store: TrustStore) -> TrustFile:
        """The process's watcher of `store`'s file, made on first use (from `store`)."""
        if store.source is None:
            raise KeyringError("a trust store built in memory has no file to reload")
        path = store.source.absolute()
        with cls._shared_lock:
            found = cls._shared.get(path)
            if found is None:
                found = cls._shared[path] = cls(store)
            return found

    def check(self) -> bool:
        """Whether the file on disk differs from what was last read (or last failed)."""
        now = _stat_of(self.path)
        return now != self._seen and now != self._failed

    def reload(self) -> bool:
        """Read the file again when it changed; True when `store` changed."""
        with self._lock:
            now = _stat_of(self.path)
            if now == self._seen or now == self._failed:
                return False
            try:
                store = TrustStore.load(self.path)
            except Exception as exc:  # a file nobody can load, whatever fails in it
                if not isinstance(exc, KeyringError):
                    exc = KeyringError(f"{self.path}: trust file: {exc.__class__.__name__}")
                self._failed, self.error = now, str(exc)
                log.error(
                    "%s; keeping the trust file as last loaded (%s)",
                    exc,
                    ", ".join(store_summary(self.store)) or "no keys",
                )
                return False
            self._seen, self._failed, self.error = now, None, None
            changed = store != self.store
            self.store = store
            if changed:
                self.reloads += 1
                log.info(
                    "%s: trust file reloaded: %s",
                    self.path,
                    ", ".join(store_summary(store)) or "no keys",
                )
            return changed


def store_summary(store: TrustStore, now: int | None = None) -> list[str]:
    """Each kid with what is wrong with it now, if anything: ``pub-a``,
    ``pub-b (key_revoked)``."""
    at = now if now is not None else time.time_ns()
    lines = []
    for entry in store.entries():
        standing = entry.standing(at)
        lines.append(entry.key.kid + (f" ({standing[0]})" if standing else ""))
    return lines
