"""The public surface: exactly what `configbus` exports, all of it importable."""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
import re

import pytest

import configbus

PUBLIC = [
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


def _drawn_tree() -> dict[str, str]:
    """Each exception in the diagram of configbus.errors' docstring, with its drawn parent."""
    import configbus.errors

    parents: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in (configbus.errors.__doc__ or "").splitlines():
        match = re.match(r"^(\s*(?:[│ ]\s*)*(?:[├└]── )?)([A-Z]\w+Error)\b", line)
        if not match:
            continue
        depth, name = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parents[name] = stack[-1][1] if stack else "Exception"
        stack.append((depth, name))
    return parents


def _defined_errors() -> dict[str, type[BaseException]]:
    """Every ConfigBusError subclass defined anywhere in the configbus package."""
    found: dict[str, type[BaseException]] = {}
    package = importlib.import_module("configbus")
    for info in pkgutil.walk_packages(package.__path__, "configbus."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (
                isinstance(value, type)
                and issubclass(value, configbus.ConfigBusError)
                and value.__module__ == info.name
                and not name.startswith("_")
            ):
                found[name] = value
    return found


def test_the_errors_form_one_tree_and_the_docstring_draws_all_of_it() -> None:
    drawn, defined = _drawn_tree(), _defined_errors()

    assert drawn["ConfigBusError"] == "Exception"
    assert sorted(drawn) == sorted(defined), "an error outside the drawn tree"
    for name, parent in drawn.items():
        cls = defined[name]
        expected = Exception if parent == "Exception" else defined[parent]
        assert cls.__mro__[1] is expected, f"{name} is drawn under {parent}"
        assert getattr(configbus, name) is cls, f"{name} is not exported"


def test_the_version_is_the_installed_distributions() -> None:
    assert configbus.__version__ == importlib.metadata.version("configbus")


def test_the_command_line_loads_neither_the_sdk_nor_redis_until_a_command_needs_them() -> None:
    import subprocess
    import sys

    probe = (
        "import sys, configbus.cli; "
        "print(sorted(m for m in ('redis', 'configbus.subscriber', 'configbus.publisher') "
        "if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()

    assert loaded == "[]"
    assert configbus.ConfigSubscriber.__name__ == "ConfigSubscriber"  # still there, on use
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        configbus.Nope  # noqa: B018
