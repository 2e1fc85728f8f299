"""`SecretsManager`: the secrets of one stream, opened on access.

    from configbus import SecretsManager

    secrets = SecretsManager(environment="production", tenant="aurora-records")
    secrets.get_secret("database.postgresql.password")   # a config key holding !secret ...
    secrets.get_secret("jwt/signing_key")                # or a secret's name
    secrets.rotate_secret("jwt/signing_key")             # a new generated version

    live = SecretsManager(subscriber=sub)                # what a running service applied

Without a subscriber it reads the environment tree (``CONFIGBUS_ROOT``, then
``./environments``) and its sealed secrets files; the tenant defaults to
``CONFIGBUS_TENANT``. The key-encryption keys come from `keys` (a `KeyProvider` or a key
file), then ``CONFIGBUS_SECRET_KEYS``, then ``CONFIGBUS_KEK_<TENANT>``. Values are
decrypted on every call and never kept. A rotation here writes the tree's secrets file;
retiring the old version once the fleet has the new one is ``configbus secret rotate
--retire-after-ack`` (it reads Kafka).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING

from configbus.crypto import KeyProvider, LocalKeyProvider, SecretReader
from configbus.errors import SecretError, SettingsError
from configbus.tree.manager import default_root
from configbus.tree.resolved import ResolvedConfig
from configbus.tree.sealed import SecretRecord, read_secrets_file, secrets_file
from configbus.tree.tree import EnvironmentTree
from configbus.tree.values import SecretRef

if TYPE_CHECKING:
    from configbus.subscriber import ConfigSubscriber

__all__ = ["SecretsManager"]


class SecretsManager:
    """Reads (and rotates) the sealed secrets of one (tenant, environment) stream."""

    def __init__(
        self,
        environment: str | None = None,
        tenant: str | None = None,
        *,
        root: str | os.PathLike[str] | None = None,
        keys: KeyProvider | str | os.PathLike[str] | None = None,
        subscriber: ConfigSubscriber | None = None,
    ) -> None:
        self.subscriber = subscriber
        if subscriber is not None:
            self.tenant, self.env = subscriber.tenant, subscriber.env
            given = root or os.environ.get("CONFIGBUS_ROOT")
            self.tree: EnvironmentTree | None = EnvironmentTree(given) if given else None
            self.keys = _provider(keys) if keys is not None else subscriber.settings.secret_keys
            return
        self.tree = EnvironmentTree(default_root(root))
        wanted = environment or os.environ.get("CONFIGBUS_ENV")
        self.tenant = tenant or os.environ.get("CONFIGBUS_TENANT") or ""
        if not wanted or not self.tenant:
            raise SettingsError(
                "SecretsManager needs an environment and a tenant (or CONFIGBUS_ENV and "
                "CONFIGBUS_TENANT), or a running subscriber"
            )
        self.env = self.tree.environment(wanted)
        self.keys = _provider(keys)

    def __repr__(self) -> str:
        return f"SecretsManager({self.tenant}/{self.env})"

    def config(self) -> ResolvedConfig:
        """The stream's config whose secrets `get_secret` opens."""
        if self.subscriber is not None:  # what the service applied, not the tree
            config = self.subscriber.config
            if self.keys is None or self.keys is self.subscriber.settings.secret_keys:
                return config
            given = SecretReader(self.keys, self.tenant, self.env)  # the keys given here
            return ResolvedConfig(config.data, env=self.env, tenant=self.tenant, secrets=given)
        assert self.tree is not None
        resolved = self.tree.resolve(self.env, self.tenant)
        reader = SecretReader(self.keys, self.tenant, self.env) if self.keys else None
        return ResolvedConfig(
            resolved.data, resolved.layers, env=self.env, tenant=self.tenant, secrets=reader
        )

    def get_secret(self, key: str, *, version: int | None = None) -> str:
        """The plain text of a secret: `key` is a config key that holds ``!secret NAME``
        (``database.postgresql.password``) or a secret's name (``jwt/signing_key``).
        `SecretError` names the secret, never a value."""
        config = self.config()
        if isinstance(config.get(key), SecretRef):
            return config.secret(key, version=version)
        ref = _find(config.data, key)
        if ref is None:
            raise SecretError(
                f"{self.tenant}/{self.env}: no config key {key!r} holds a secret, and no "
                "reference names it"
            )
        if config.secrets is None:
            raise SecretError(
                f"secret {key!r} cannot be read here: no key-encryption key was given "
                "(keys=..., CONFIGBUS_SECRET_KEYS or CONFIGBUS_KEK_<TENANT>)"
            )
        value = config.secrets.open(ref.name, ref.sealed, version)
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise SecretError(f"secret {key!r} is binary") from None

    def list_secrets(self) -> list[SecretRecord]:
        """The stream's sealed secrets in the tree: names, versions, times; no values."""
        records = read_secrets_file(secrets_file(self._root(), self.tenant, self.env))
        return [records[name] for name in sorted(records)]

    def _root(self) -> Path:
        """The tree the records are kept in; a service without one cannot list or
        rotate (it would write a tree nobody publishes)."""
        if self.tree is None or not self.tree.root.is_dir():
            raise SettingsError(
                "SecretsManager needs the environment tree to list or rotate secrets: "
                "pass root= or set CONFIGBUS_ROOT"
            )
        return self.tree.root

    def rotate_secret(
        self, name: str, *, value: bytes | None = None, generate: int = 32, reason: str = ""
    ) -> int:
        """Seal a new version of secret `name` in the tree (a generated value of
        `generate` random bytes unless `value` is given); the previous version stays
        valid until it is retired. Returns the new version."""
        from configbus.ops.secrets import TreeBook, generate_value, set_secret

        if self.keys is None:
            raise SecretError(f"secret {name!r}: no key-encryption key to seal with")
        root = self._root()
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("rotate_secret blocks: call it outside a running event loop")
        record = asyncio.run(
            set_secret(
                TreeBook(root),
                self.keys,
                self.tenant,
                self.env,
                name,
                value if value is not None else generate_value(generate),
                actor=os.environ.get("USER", "secrets-manager"),
                reason=reason or "rotate_secret",
            )
        )
        return record.version


def _provider(keys: KeyProvider | str | os.PathLike[str] | None) -> KeyProvider | None:
    if keys is not None and hasattr(keys, "unwrap"):
        return keys  # type: ignore[return-value]
    path = keys or os.environ.get("CONFIGBUS_SECRET_KEYS")
    if path:
        return LocalKeyProvider.from_file(path)
    provider = LocalKeyProvider.from_env()
    return provider if provider.tenants else None


def _find(value: object, name: str) -> SecretRef | None:
    """The first reference to secret `name` in a config value."""
    if isinstance(value, SecretRef):
        return value if value.name == name else None
    children: tuple[object, ...] = ()
    if isinstance(value, dict):
        children = tuple(value.values())
    elif isinstance(value, tuple):
        children = value
    for child in children:
        found = _find(child, name)
        if found is not None:
            return found
    return None
