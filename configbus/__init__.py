"""configbus: configuration distribution for multi-tenant services.

The public surface is what this module exports; everything else is internal and may
change without notice.
"""

from configbus.errors import (
    BusError,
    ConfigBusError,
    KeyringError,
    Problem,
    SchemaError,
    SettingsError,
    TreeError,
    UnknownNameError,
    VerificationError,
)
from configbus.subscriber import ConfigSubscriber, NoConfigError, SyncSubscriber
from configbus.tree import (
    EnvironmentConfigManager,
    EnvironmentTree,
    EnvironmentType,
    ResolvedConfig,
    SecretRef,
    get_environment_config,
)

__version__ = "0.1.0"

__all__ = [
    "BusError",
    "ConfigBusError",
    "ConfigSubscriber",
    "EnvironmentConfigManager",
    "EnvironmentTree",
    "EnvironmentType",
    "KeyringError",
    "NoConfigError",
    "Problem",
    "ResolvedConfig",
    "SchemaError",
    "SecretRef",
    "SettingsError",
    "SyncSubscriber",
    "TreeError",
    "UnknownNameError",
    "VerificationError",
    "__version__",
    "get_environment_config",
]
