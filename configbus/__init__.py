"""configbus: configuration distribution for multi-tenant services.

The public surface is what this module exports; everything else is internal and may
change without notice.
"""

from configbus.errors import (
    ActiveWriterError,
    BusError,
    ConfigBusError,
    FencedError,
    KeyringError,
    LimitError,
    NoConfigError,
    Problem,
    RefusedError,
    SchemaError,
    SettingsError,
    TreeError,
    UnknownNameError,
    VerificationError,
)
from configbus.subscriber import ConfigSubscriber, Snapshot, SyncSubscriber
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
    "ActiveWriterError",
    "BusError",
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
    "SecretRef",
    "SettingsError",
    "Snapshot",
    "SyncSubscriber",
    "TreeError",
    "UnknownNameError",
    "VerificationError",
    "__version__",
    "get_environment_config",
]
