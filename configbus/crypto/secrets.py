"""Secret values: AES-256-GCM envelope encryption.

A secret's value is encrypted with a *data key*, one per (tenant, environment); the
data key is wrapped by the tenant's *key-encryption key* (KEK), which comes from a
`KeyProvider`: a key file or environment variables here, a KMS, Vault transit or an
HSM behind the same two calls. The additional authenticated data binds tenant,
environment, name and secret version, so a ciphertext moved to another stream, name or
version does not open; neither does one changed by a single bit.

A sealed secret is one line of text, safe to commit and to carry in a config::

    cbsec1.<version>.<kek id>.<wrapped data key>.<nonce>.<ciphertext>

(base64url without padding for the binary parts). Errors name the secret, never its
value, and no repr shows a key or a plaintext.

    provider = LocalKeyProvider.from_file("keks.yml")
    sealed = seal_secret(provider, "acme", "prod", "database/password", 1, b"s3cret")
    text = sealed.encode()                      # what the tree or the store holds
    value = open_secret(provider, "acme", "prod", "database/password", SealedSecret.decode(text))

A KMS behind `KeyProvider` (a worked example: AWS KMS with boto3, one KMS key per
tenant; the context goes in as the encryption context, which KMS binds like AEAD data)::

    class KmsKeyProvider:
        def __init__(self, kms, key_ids: dict[str, str]) -> None:
            self.kms, self.key_ids = kms, key_ids          # tenant -> KMS key ARN

        def wrap(self, tenant, data_key, context):
            answer = self.kms.encrypt(
                KeyId=self.key_ids[tenant], Plaintext=data_key,
                EncryptionContext={"configbus": context.hex()},
            )
            return "kms", answer["CiphertextBlob"]           # KMS names its key itself

        def unwrap(self, tenant, kek_id, wrapped, context):
            answer = self.kms.decrypt(
                KeyId=self.key_ids[tenant], CiphertextBlob=wrapped,
                EncryptionContext={"configbus": context.hex()},
            )
            return answer["Plaintext"]

Vault transit is the same shape (`encrypt`/`decrypt` on ``transit/keys/<tenant>`` with
``context`` = the bytes above, base64); an HSM unwraps with its key handle.
"""

from __future__ import annotations

import base64
import os
import re
import secrets as _random
import stat
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

import yaml
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from configbus.errors import KeyringError, SecretError

__all__ = [
    "KeyProvider",
    "LocalKeyProvider",
    "SealedSecret",
    "SecretError",
    "SecretReader",
    "data_key_of",
    "open_secret",
    "rewrap",
    "seal_secret",
]

PREFIX: Final = "cbsec1"
KEY_BYTES: Final = 32  # AES-256
NONCE_BYTES: Final = 12
_KEK_ID: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_B64: Final = re.compile(r"[A-Za-z0-9_-]+")
_VERSION: Final = re.compile(r"[1-9][0-9]{0,18}")  # ASCII digits, below 2**63
_DATA_KEYS_KEPT: Final = 256  # unwrapped data keys a reader keeps (one per stream and KEK)


class KeyProvider(Protocol):
    """A tenant's key-encryption keys. `wrap` encrypts a data key with the tenant's
    current KEK and says which one; `unwrap` decrypts one wrapped by any KEK it still
    holds. `context` is additional authenticated data the wrapping must bind (a KMS's
    encryption context, Vault transit's `context`, an AEAD's associated data)."""

    def wrap(self, tenant: str, data_key: bytes, context: bytes) -> tuple[str, bytes]: ...

    def unwrap(self, tenant: str, kek_id: str, wrapped: bytes, context: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class _Kek:
    kek_id: str
    key: bytes = field(repr=False)


class LocalKeyProvider:
    """KEKs held by this process: from a key file (mode 0600 or stricter)::

        tenants:
          acme:
            current: acme-2026-12
            keys:
              acme-2026-12: <32 bytes, base64>
              acme-2026-06: <32 bytes, base64>      # kept to open older data keys

    or from ``CONFIGBUS_KEK_<TENANT>`` variables (tenant upper-cased, ``-`` as ``_``),
    each ``<kek id>:<32 bytes, base64>``. A service gets only its own tenant's KEKs, so
    it cannot open another tenant's secrets."""

    def __init__(self, keks: Mapping[str, tuple[str, Mapping[str, bytes]]]) -> None:
        self._current: dict[str, _Kek] = {}
        self._all: dict[tuple[str, str], _Kek] = {}
        for tenant, (current, keys) in keks.items():
            for kek_id, key in keys.items():
                _check_kek(tenant, kek_id, key)
                self._all[(tenant, kek_id)] = _Kek(kek_id, bytes(key))
            if (tenant, current) not in self._all:
                raise KeyringError(f"tenant {tenant!r}: current KEK {current!r} is not listed")
            self._current[tenant] = self._all[(tenant, current)]

    def __repr__(self) -> str:
        return f"LocalKeyProvider(tenants={sorted(self._current)})"

    @property
    def tenants(self) -> list[str]:
        return sorted(self._current)

    def wrap(self, tenant: str, data_key: bytes, context: bytes) -> tuple[str, bytes]:
        kek = self._current.get(tenant)
        if kek is None:
            raise SecretError(f"no key-encryption key for tenant {tenant!r}")
        nonce = _random.token_bytes(NONCE_BYTES)
        return kek.kek_id, nonce + AESGCM(kek.key).encrypt(nonce, data_key, context)

    def unwrap(self, tenant: str, kek_id: str, wrapped: bytes, context: bytes) -> bytes:
        kek = self._all.get((tenant, kek_id))
        if kek is None:
            raise SecretError(f"tenant {tenant!r} has no key-encryption key {kek_id!r} here")
        try:
            return AESGCM(kek.key).decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], context)
        except (InvalidTag, ValueError):
            raise SecretError(
                f"the data key does not open with {tenant}'s key {kek_id!r}"
            ) from None

    def with_new_key(
        self, tenant: str, *, current: bool = False, now: float | None = None
    ) -> tuple[LocalKeyProvider, str]:
        """A provider with a fresh random KEK for `tenant`, and its id. It becomes the
        tenant's current KEK when the tenant had none, or with `current`; the others
        stay, so what they wrapped still opens."""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
        kek_id = f"{tenant[: 63 - len(stamp)]}-{stamp}"  # the stamp keeps ids apart
        keks = self._keks()
        known = keks.get(tenant, ("", {}))[1]
        if kek_id in known:
            raise KeyringError(f"tenant {tenant!r} already has a key {kek_id!r}; wait a second")
        keys = {**known, kek_id: AESGCM.generate_key(bit_length=256)}
        chosen = kek_id if current or tenant not in keks else keks[tenant][0]
        keks[tenant] = (chosen, keys)
        return LocalKeyProvider(keks), kek_id

    def using(self, tenant: str, kek_id: str) -> LocalKeyProvider:
        """A provider whose current KEK for `tenant` is `kek_id` (one it holds)."""
        keks = self._keks()
        if kek_id not in keks.get(tenant, ("", {}))[1]:
            raise KeyringError(f"tenant {tenant!r} has no key-encryption key {kek_id!r}")
        keks[tenant] = (kek_id, keks[tenant][1])
        return LocalKeyProvider(keks)

    def kek_ids(self, tenant: str) -> list[str]:
        """The ids of the tenant's KEKs, current first."""
        current = self._current[tenant].kek_id if tenant in self._current else ""
        others = sorted(k for (t, k) in self._all if t == tenant and k != current)
        return [current, *others] if current else others

    def only(self, tenants: Sequence[str]) -> LocalKeyProvider:
        """The KEKs of `tenants` alone: what a service of those tenants gets."""
        keks = self._keks()
        missing = [t for t in tenants if t not in keks]
        if missing:
            raise KeyringError(f"no key-encryption key for tenant {missing[0]!r}")
        return LocalKeyProvider({t: keks[t] for t in tenants})

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key file (mode 0600) at once: a temporary file renamed over it."""
        target = Path(path)
        document = {
            "tenants": {
                tenant: {
                    "current": current,
                    "keys": {k: base64.b64encode(v).decode() for k, v in sorted(keys.items())},
                }
                for tenant, (current, keys) in sorted(self._keks().items())
            }
        }
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".", suffix=".tmp")
        try:
            os.fchmod(handle, 0o600)
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                yaml.safe_dump(document, out, sort_keys=False)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def _keks(self) -> dict[str, tuple[str, dict[str, bytes]]]:
        keks: dict[str, tuple[str, dict[str, bytes]]] = {}
        for (tenant, kek_id), kek in self._all.items():
            keks.setdefault(tenant, (self._current[tenant].kek_id, {}))[1][kek_id] = kek.key
        return keks

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> LocalKeyProvider:
        """Read a key file; refused when others may read it. Raises `KeyringError`
        naming the file and tenant (never a key)."""
        where = Path(path)
        try:
            mode = where.stat().st_mode
            if mode & stat.S_IRWXO:
                raise KeyringError(f"{where}: readable by others; chmod 600 it (or 640)")
            if mode & stat.S_IWGRP:
                raise KeyringError(f"{where}: writable by its group; chmod 600 it (or 640)")
            document = yaml.safe_load(where.read_text(encoding="utf-8"))
        except OSError as exc:
            raise KeyringError(f"{where}: cannot read the key file: {exc.strerror}") from None
        except (yaml.YAMLError, UnicodeDecodeError):
            raise KeyringError(f"{where}: not a YAML key file") from None
        tenants = document.get("tenants") if isinstance(document, dict) else None
        if not isinstance(tenants, dict) or set(document) != {"tenants"}:
            raise KeyringError(f"{where}: a key file is a mapping with only 'tenants'")
        keks: dict[str, tuple[str, dict[str, bytes]]] = {}
        for tenant, entry in tenants.items():
            label = f"{where}: tenant {tenant!r}"
            if not isinstance(entry, dict) or set(entry) != {"current", "keys"}:
                raise KeyringError(f"{label}: needs exactly 'current' and 'keys'")
            keys = entry["keys"]
            if not isinstance(keys, dict) or not keys:
                raise KeyringError(f"{label}: 'keys' must map key ids to base64 keys")
            keks[str(tenant)] = (
                str(entry["current"]),
                {str(k): _decode_key(f"{label}, key {k!r}", v) for k, v in keys.items()},
            )
        try:
            return cls(keks)
        except KeyringError as exc:
            raise KeyringError(f"{where}: {exc}") from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LocalKeyProvider:
        """The KEKs in ``CONFIGBUS_KEK_<TENANT>`` variables, one current key each."""
        found: dict[str, tuple[str, dict[str, bytes]]] = {}
        for name, value in (os.environ if environ is None else environ).items():
            if not name.startswith("CONFIGBUS_KEK_") or not value:
                continue
            tenant = name.removeprefix("CONFIGBUS_KEK_").lower().replace("_", "-")
            kek_id, sep, text = value.partition(":")
            if not sep:
                raise KeyringError(f"{name}: expected <kek id>:<base64 key>")
            found[tenant] = (kek_id, {kek_id: _decode_key(name, text)})
        return cls(found)


def _decode_key(label: str, text: object) -> bytes:
    if not isinstance(text, str):
        raise KeyringError(f"{label}: not a base64 string")
    try:
        key = base64.b64decode(text, validate=True)
    except ValueError:
        raise KeyringError(f"{label}: not valid base64") from None
    if len(key) != KEY_BYTES:
        raise KeyringError(f"{label}: a key is {KEY_BYTES} bytes, this is {len(key)}")
    return key


def _check_kek(tenant: str, kek_id: str, key: bytes) -> None:
    if not _KEK_ID.fullmatch(kek_id):
        raise KeyringError(f"tenant {tenant!r}: malformed key id {kek_id!r}")
    if len(key) != KEY_BYTES:
        raise KeyringError(f"tenant {tenant!r}, key {kek_id!r}: not {KEY_BYTES} bytes")


@dataclass(frozen=True, slots=True)
class SealedSecret:
    """One secret value, encrypted. Its repr shows the version and KEK id only."""

    version: int
    kek_id: str
    wrapped_key: bytes = field(repr=False)
    nonce: bytes = field(repr=False)
    ciphertext: bytes = field(repr=False)

    def encode(self) -> str:
        parts = (self.wrapped_key, self.nonce, self.ciphertext)
        return ".".join((PREFIX, str(self.version), self.kek_id, *map(_b64, parts)))

    @classmethod
    def decode(cls, text: str, *, what: str = "the secret") -> SealedSecret:
        """Parse `encode`'s text; `SecretError` naming `what` when it is not one."""
        parts = text.split(".") if isinstance(text, str) else []
        if len(parts) != 6 or parts[0] != PREFIX:
            raise SecretError(f"{what}: not a sealed secret ({PREFIX}.VERSION.KEK...)")
        _, version, kek_id, *encoded = parts
        if not _VERSION.fullmatch(version) or not _KEK_ID.fullmatch(kek_id):
            raise SecretError(f"{what}: malformed sealed secret")
        try:
            wrapped, nonce, ciphertext = (_unb64(part) for part in encoded)
        except ValueError:
            raise SecretError(f"{what}: malformed sealed secret") from None
        if len(nonce) != NONCE_BYTES:
            raise SecretError(f"{what}: malformed sealed secret")
        return cls(int(version), kek_id, wrapped, nonce, ciphertext)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not _B64.fullmatch(text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _data_key_context(tenant: str, env: str) -> bytes:
    return b"\x00".join((b"configbus-data-key", tenant.encode(), env.encode()))


def _value_context(tenant: str, env: str, name: str, version: int) -> bytes:
    fields = (b"configbus-secret", tenant.encode(), env.encode(), name.encode())
    return b"\x00".join((*fields, str(version).encode()))


def seal_secret(
    provider: KeyProvider,
    tenant: str,
    env: str,
    name: str,
    version: int,
    value: bytes,
    *,
    data_key: bytes | None = None,
    wrapping: tuple[str, bytes] | None = None,
) -> SealedSecret:
    """`value` encrypted for (tenant, env, name, version). `data_key`: the stream's
    data key when the caller holds it (a new one is made otherwise)."""
    key = data_key if data_key is not None else AESGCM.generate_key(bit_length=256)
    if wrapping is not None and data_key is not None:
        kek_id, wrapped = wrapping  # the stream's data key, as already wrapped
    else:
        kek_id, wrapped = provider.wrap(tenant, key, _data_key_context(tenant, env))
    nonce = _random.token_bytes(NONCE_BYTES)
    ciphertext = AESGCM(key).encrypt(nonce, value, _value_context(tenant, env, name, version))
    return SealedSecret(version, kek_id, wrapped, nonce, ciphertext)


def open_secret(
    provider: KeyProvider,
    tenant: str,
    env: str,
    name: str,
    sealed: SealedSecret,
    *,
    data_keys: dict[tuple[str, bytes], bytes] | None = None,
) -> bytes:
    """The plaintext of `sealed`, which must have been sealed for exactly this tenant,
    environment and name (its version is bound too). `SecretError` names the secret
    when it does not open: another stream's or name's, tampered with, or a KEK this
    provider does not hold."""
    what = f"secret {name!r} of {tenant}/{env} (v{sealed.version})"
    known = (sealed.kek_id, sealed.wrapped_key)
    key = data_keys.get(known) if data_keys is not None else None
    if key is None:
        try:
            key = provider.unwrap(
                tenant, sealed.kek_id, sealed.wrapped_key, _data_key_context(tenant, env)
            )
        except SecretError as exc:
            raise SecretError(f"{what}: {exc}") from None
        except Exception as exc:  # a KMS's own error: named by its class, no payload
            raise SecretError(
                f"{what}: the key provider failed to unwrap its data key ({exc.__class__.__name__})"
            ) from exc
        if data_keys is not None:
            if len(data_keys) >= _DATA_KEYS_KEPT:
                data_keys.pop(next(iter(data_keys)))
            data_keys[known] = key
    context = _value_context(tenant, env, name, sealed.version)
    try:
        return AESGCM(key).decrypt(sealed.nonce, sealed.ciphertext, context)
    except (InvalidTag, ValueError):
        raise SecretError(f"{what}: does not open (moved, or tampered with)") from None


class SecretReader:
    """Opens one stream's sealed secrets on access, with a `KeyProvider` that holds the
    tenant's key-encryption keys. Keeps the data keys it unwrapped (an unwrap may be a
    KMS call), never a plaintext. Shared by the configs a subscriber applies."""

    def __init__(self, provider: KeyProvider, tenant: str, env: str) -> None:
        self.provider, self.tenant, self.env = provider, tenant, env
        self._data_keys: dict[tuple[str, bytes], bytes] = {}

    def __repr__(self) -> str:
        return f"SecretReader({self.tenant}/{self.env})"

    def open(self, name: str, sealed: Sequence[str], version: int | None = None) -> bytes:
        """The plaintext of secret `name`: its newest version in `sealed`, or `version`.
        `SecretError` names the secret (never a value) when it has no such version or
        does not open."""
        where = f"secret {name!r} of {self.tenant}/{self.env}"
        if not sealed:
            raise SecretError(
                f"{where} has no value: set one with "
                f"`configbus secret set {self.tenant} {self.env} {name}`"
            )
        texts = [SealedSecret.decode(text, what=where) for text in sealed]
        chosen = (
            texts[0]
            if version is None
            else next((item for item in texts if item.version == version), None)
        )
        if chosen is None:
            live = ", ".join(f"v{item.version}" for item in texts)
            raise SecretError(f"{where} has no version {version} (live: {live})")
        return open_secret(
            self.provider, self.tenant, self.env, name, chosen, data_keys=self._data_keys
        )


def data_key_of(provider: KeyProvider, tenant: str, env: str, sealed: SealedSecret) -> bytes:
    """The data key `sealed` was sealed with (to seal more values of the stream with it)."""
    context = _data_key_context(tenant, env)
    try:
        return provider.unwrap(tenant, sealed.kek_id, sealed.wrapped_key, context)
    except SecretError as exc:
        raise SecretError(f"{tenant}/{env}: the stream's data key: {exc}") from None


def rewrap(provider: KeyProvider, tenant: str, env: str, sealed: SealedSecret) -> SealedSecret:
    """`sealed` with its data key wrapped again by the tenant's current KEK (KEK
    rotation): the value and its ciphertext stay as they are."""
    context = _data_key_context(tenant, env)
    key = provider.unwrap(tenant, sealed.kek_id, sealed.wrapped_key, context)
    kek_id, wrapped = provider.wrap(tenant, key, context)
    return SealedSecret(sealed.version, kek_id, wrapped, sealed.nonce, sealed.ciphertext)
