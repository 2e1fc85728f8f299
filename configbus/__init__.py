"""configbus: configuration distribution for multi-tenant services.

The public surface is what this module exports; everything else is internal and may
change without notice.
"""

import importlib
from typing import TYPE_CHECKING, Any

from configbus.errors import (
    ActiveWriterError,
    AuthorizationError,
    BusError,
    ConfigBusError,
    FencedError,
    KeyringError,
    LimitError,
    NoConfigError,
    Problem,
    RefusedError,
    SchemaError,
    SecretError,
    SettingsError,
    TreeError,
    UnknownNameError,
    VerificationError,
)

if TYPE_CHECKING:
    from configbus.compliance import ComplianceChecker
    from configbus.secrets_manager import SecretsManager
    from configbus.subscriber import ConfigSubscriber, Snapshot, SyncSubscriber
    from configbus.tree import (
        EnvironmentConfigManager,
        EnvironmentTree,
        EnvironmentType,
        ResolvedConfig,
        SecretRef,
        get_environment_config,
    )

# Imported on first use: `import configbus` (and so every `configbus` command) does not
# pay for the SDK's and the tree's dependencies until they are asked for.
_LAZY = {
    "ComplianceChecker": "configbus.compliance",
    "ConfigSubscriber": "configbus.subscriber",
    "Snapshot": "configbus.subscriber",
    "SyncSubscriber": "configbus.subscriber",
    "EnvironmentConfigManager": "configbus.tree",
    "EnvironmentTree": "configbus.tree",
    "EnvironmentType": "configbus.tree",
    "ResolvedConfig": "configbus.tree",
    "SecretRef": "configbus.tree",
    "SecretsManager": "configbus.secrets_manager",
    "get_environment_config": "configbus.tree",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'configbus' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "ActiveWriterError",
    "AuthorizationError",
    "BusError",
    "ComplianceChecker",
    "ConfigBusError",
    "ConfigSubscriber",
    "EnvironmentConfigManager",
    "EnvironmentTree",
    "EnvironmentType",
    "FencedError",
    "KeyringError",
    "LimitError",
    "NoConfigError",
    "Problem",
    "RefusedError",
    "ResolvedConfig",
    "SchemaError",
    "SecretError",
    "SecretRef",
    "SecretsManager",
    "SettingsError",
    "Snapshot",
    "SyncSubscriber",
    "TreeError",
    "UnknownNameError",
    "VerificationError",
    "__version__",
    "get_environment_config",
]
