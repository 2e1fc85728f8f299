"""The public surface: exactly what `configbus` exports, all of it importable."""

from __future__ import annotations

import importlib
import importlib.metadata

import configbus

PUBLIC = [
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


def test_all_is_exactly_the_public_names() -> None:
    assert sorted(configbus.__all__) == sorted(PUBLIC)
    assert len(set(configbus.__all__)) == len(configbus.__all__)


def test_every_public_name_is_importable() -> None:
    module = importlib.import_module("configbus")
    for name in PUBLIC:
        assert getattr(module, name) is not None, name

    namespace: dict[str, object] = {}
    exec("from configbus import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(PUBLIC)


def test_the_errors_form_one_tree() -> None:
    from configbus import (
        ConfigBusError,
        SchemaError,
        SettingsError,
        TreeError,
        UnknownNameError,
    )

    assert issubclass(SettingsError, ConfigBusError)
    assert issubclass(TreeError, ConfigBusError)
    assert issubclass(UnknownNameError, TreeError)
    assert issubclass(SchemaError, TreeError)
    assert issubclass(ConfigBusError, Exception)


def test_the_version_is_the_installed_distributions() -> None:
    assert configbus.__version__ == importlib.metadata.version("configbus")
