"""configbus: configuration distribution for multi-tenant services.

The public surface is what this module exports; everything else is internal and may
change without notice.
"""

from configbus.errors import (
    ConfigBusError,
    Problem,
    SchemaError,
    SettingsError,
    TreeError,
    UnknownNameError,
)
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
    "ConfigBusError",
    "EnvironmentConfigManager",
    "EnvironmentTree",
    "EnvironmentType",
    "Problem",
    "ResolvedConfig",
    "SchemaError",
    "SecretRef",
    "SettingsError",
    "TreeError",
    "UnknownNameError",
    "__version__",
    "get_environment_config",
]
