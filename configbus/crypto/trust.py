"""The trust file: which keys a subscriber (or `configbus tail`) believes, for what.

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
    operators:
      - kid: alice-2026
        public_key_file: keys/alice-2026.pub
        tenants: [aurora-records]   # required for an operator
        environments: [prod]        # required for an operator
        max_ttl: 2h             # required: the longest override this key may sign

or, instead of `public_key`, ``public_key_file: keys/publisher-2026-11.pub`` (relative
to the trust file). An event is trusted when its kid is listed, the key's scope
covers the event's tenant and environment, and its role may sign the event's kind (an
operator key signs overrides only, none longer than its `max_ttl`). Rotation: add the
new kid, roll the trust file out, switch the publisher to the new key, then remove the
old kid.

The file fails closed: an unknown top-level key or entry field (a typo such as
`tenant:` for `tenants:`) is an error, never ignored, and so is a field this version
does not implement yet (`not_before`, `not_after`, `revoked`): a key someone meant to
revoke must not stay trusted. An operator entry states its scope; a scope that lists
nothing is an error; `public_key` and `public_key_file` exclude each other.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from configbus.crypto.keys import VerifyKey, check_kid, public_key_from_pem
from configbus.errors import ConfigBusError, KeyringError
from configbus.options import format_duration, parse_duration

__all__ = ["OPERATOR", "PUBLISHER", "TrustStore", "TrustedKey"]

PUBLISHER = "publisher"  # signs snapshots (and the expiry of overrides)
OPERATOR = "operator"  # signs emergency overrides only
_LISTS = {PUBLISHER: "publishers", OPERATOR: "operators"}
_FIELDS = ("kid", "public_key", "public_key_file", "tenants", "environments", "role", "max_ttl")
# Planned in DESIGN but not implemented: refused, so that no one relies on them.
_UNSUPPORTED = {
    "not_before": "add the entry when the key should become trusted",
    "not_after": "delete the entry when the key should stop being trusted",
    "revoked": "delete the entry to stop trusting the key",
}


@dataclass(frozen=True, slots=True)
class TrustedKey:
    key: VerifyKey
    tenants: frozenset[str]  # "*" for all
    environments: frozenset[str]
    role: str = PUBLISHER
    max_ttl: int | None = None  # seconds: the longest override an operator key may sign

    def covers(self, tenant: str, env: str) -> bool:
        return ("*" in self.tenants or tenant in self.tenants) and (
            "*" in self.environments or env in self.environments
        )


class TrustStore:
    """Trusted publisher keys by kid."""

    def __init__(self, keys: Iterable[TrustedKey] = ()) -> None:
        self._keys: dict[str, TrustedKey] = {}
        for trusted in keys:
            if trusted.key.kid in self._keys:
                raise KeyringError(f"key id {trusted.key.kid!r} is listed twice")
            self._keys[trusted.key.kid] = trusted

    def __repr__(self) -> str:
        return f"TrustStore(kids={sorted(self._keys)})"

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

    @classmethod
    def of(cls, *keys: VerifyKey) -> TrustStore:
        """A store trusting `keys` for every tenant and environment."""
        everything = frozenset({"*"})
        return cls(TrustedKey(key, everything, everything) for key in keys)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TrustStore:
        """Read a trust file. Raises `KeyringError` naming the file and entry."""
        where = Path(path)
        try:
            document = yaml.safe_load(where.read_text(encoding="utf-8"))
        except OSError as exc:
            raise KeyringError(f"{where}: cannot read trust file: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise KeyringError(f"{where}: trust file is not UTF-8 text") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
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
        try:
            return cls(keys)
        except ConfigBusError as exc:
            raise KeyringError(f"{where}: {exc}") from None

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
    key = public_key_from_pem(kid, pem, label)
    return TrustedKey(key, tenants, environments, role=role, max_ttl=max_ttl)


def _check_fields(label: str, entry: Mapping[Any, Any]) -> None:
    """Refuse fields this version does not implement, then fields it does not know."""
    for field in entry:
        if field in _UNSUPPORTED:
            raise KeyringError(
                f"{label}: {field!r} is not supported by this version of configbus"
                f" (refused, not ignored): {_UNSUPPORTED[field]}"
            )
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
