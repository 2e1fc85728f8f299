"""The application-facing API for loading configs straight from an environment tree.

    from configbus import get_environment_config, EnvironmentConfigManager

    config = get_environment_config()                  # CONFIGBUS_ENV, CONFIGBUS_TENANT
    prod = get_environment_config("production")        # aliases: dev/development, prod/production
    manager = EnvironmentConfigManager(root="environments")
    config = manager.load_with_overrides("prod", overrides=["high_availability", "scaling"])
    config.get("database.postgresql")

Every config returned here has been validated against the tree's schema.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Sequence
from pathlib import Path
from threading import Lock

from configbus.errors import SettingsError
from configbus.tree.resolved import ResolvedConfig
from configbus.tree.tree import ENV_ALIASES, EnvironmentTree

__all__ = [
    "EnvironmentConfigManager",
    "EnvironmentType",
    "default_root",
    "get_environment_config",
]


class EnvironmentType(enum.StrEnum):
    """The standard environments. `EnvironmentType("production")` is `PROD`."""

    DEV = "dev"
    STAGING = "staging"
    PROD = "prod"

    @classmethod
    def _missing_(cls, value: object) -> EnvironmentType | None:
        if isinstance(value, str):
            wanted = value.strip().lower()
            wanted = ENV_ALIASES.get(wanted, wanted)
            for member in cls:
                if member.value == wanted:
                    return member
        return None


def default_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The tree's root: the argument, then ``CONFIGBUS_ROOT``, then ``./environments``."""
    return Path(root or os.environ.get("CONFIGBUS_ROOT") or "environments")


class EnvironmentConfigManager:
    """Loads validated configs from one environment tree, with its parse cache."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.tree = EnvironmentTree(default_root(root))

    def __repr__(self) -> str:
        return f"EnvironmentConfigManager(root={str(self.tree.root)!r})"

    def environments(self) -> list[str]:
        return self.tree.environments()

    def tenants(self) -> list[str]:
        return self.tree.tenants()

    def load(self, environment: str, tenant: str | None = None) -> ResolvedConfig:
        """The environment's config; with a tenant, with the tenant's declared overrides
        and its own layer. Raises `TreeError` (or a subclass) on any problem."""
        return self.tree.validate(self.tree.resolve(environment, tenant))

    def load_with_overrides(
        self, environment: str, overrides: Sequence[str], tenant: str | None = None
    ) -> ResolvedConfig:
        """Like `load`, with `overrides` (in order) instead of the tenant's declared ones."""
        if isinstance(overrides, str):
            raise TypeError("overrides must be a list of names, not a string")
        return self.tree.validate(self.tree.resolve(environment, tenant, list(overrides)))


_managers: dict[Path, EnvironmentConfigManager] = {}
_managers_lock = Lock()


def get_environment_config(
    environment: str | None = None,
    *,
    tenant: str | None = None,
    root: str | os.PathLike[str] | None = None,
) -> ResolvedConfig:
    """The validated config of `environment` (default ``CONFIGBUS_ENV``), for `tenant`
    (default ``CONFIGBUS_TENANT``, or none) from the tree at `root` (default
    ``CONFIGBUS_ROOT``, then ``./environments``). Managers are kept per root, so
    repeated calls re-read only files that changed."""
    environment = environment or os.environ.get("CONFIGBUS_ENV")
    if not environment:
        raise SettingsError("no environment given and CONFIGBUS_ENV is not set")
    tenant = tenant or os.environ.get("CONFIGBUS_TENANT") or None
    key = default_root(root).absolute()
    with _managers_lock:
        manager = _managers.get(key)
        if manager is None:
            manager = _managers[key] = EnvironmentConfigManager(key)
    return manager.load(environment, tenant)
