"""The trust file: which publisher keys a subscriber (or `configbus tail`) believes.

A YAML file::

    # configbus trust file
    publishers:
      - kid: publisher-2026-11
        public_key: |
          -----BEGIN PUBLIC KEY-----
          MCowBQYDK2VwAyEA...
          -----END PUBLIC KEY-----
        tenants: ["*"]          # optional, default every tenant
        environments: ["*"]     # optional, default every environment

or, instead of `public_key`, ``public_key_file: keys/publisher-2026-11.pub`` (relative
to the trust file). An event is trusted when its kid is listed and the key's scope
covers the event's tenant and environment. Rotation: add the new kid, roll the trust
file out, switch the publisher to the new key, then remove the old kid.
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

__all__ = ["TrustStore", "TrustedKey"]


@dataclass(frozen=True, slots=True)
class TrustedKey:
    key: VerifyKey
    tenants: frozenset[str]  # "*" for all
    environments: frozenset[str]

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
        if not isinstance(document, Mapping) or not isinstance(document.get("publishers"), list):
            raise KeyringError(f"{where}: a trust file needs a 'publishers' list")
        keys = []
        for index, entry in enumerate(document["publishers"]):
            keys.append(_entry(where, index, entry))
        try:
            return cls(keys)
        except ConfigBusError as exc:
            raise KeyringError(f"{where}: {exc}") from None

    def dump(self) -> str:
        """The store as trust-file YAML, public keys as literal blocks."""
        lines = ["# configbus trust file", "publishers:"]
        for trusted in self._keys.values():
            lines += [
                f"  - kid: {trusted.key.kid}",
                f"    tenants: {json.dumps(sorted(trusted.tenants))}",
                f"    environments: {json.dumps(sorted(trusted.environments))}",
                "    public_key: |",
                *(f"      {row}" for row in trusted.key.pem().strip().splitlines()),
            ]
        return "\n".join(lines) + "\n"


def _entry(where: Path, index: int, entry: Any) -> TrustedKey:
    label = f"{where}: publishers[{index}]"
    if not isinstance(entry, Mapping):
        raise KeyringError(f"{label}: must be a mapping with kid and public_key")
    try:
        kid = check_kid(entry.get("kid"))
    except KeyringError as exc:
        raise KeyringError(f"{label}: {exc}") from None
    label = f"{where}: publisher {kid!r}"
    pem = entry.get("public_key")
    if pem is None and isinstance(entry.get("public_key_file"), str):
        key_path = where.parent / entry["public_key_file"]
        try:
            pem = key_path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyringError(f"{label}: cannot read {key_path}: {exc}") from None
    if not isinstance(pem, str):
        raise KeyringError(f"{label}: needs public_key (PEM) or public_key_file")
    scopes = []
    for name in ("tenants", "environments"):
        value = entry.get(name, ["*"])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise KeyringError(f"{label}: {name} must be a list of names (or ['*'])")
        scopes.append(frozenset(value))
    return TrustedKey(public_key_from_pem(kid, pem, label), scopes[0], scopes[1])
