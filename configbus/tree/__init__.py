"""The environment tree: loading, inheritance, layering, validation and provenance."""

from configbus.tree.layer import Layer, LayerKind, Origin
from configbus.tree.manager import (
    EnvironmentConfigManager,
    EnvironmentType,
    default_root,
    get_environment_config,
)
from configbus.tree.merge import merge
from configbus.tree.resolved import ResolvedConfig, Step
from configbus.tree.tree import CheckReport, EnvironmentTree, TenantSpec
from configbus.tree.values import DELETE, SecretRef, canonical_json, config_hash

__all__ = [
    "DELETE",
    "CheckReport",
    "EnvironmentConfigManager",
    "EnvironmentTree",
    "EnvironmentType",
    "Layer",
    "LayerKind",
    "Origin",
    "ResolvedConfig",
    "SecretRef",
    "Step",
    "TenantSpec",
    "canonical_json",
    "config_hash",
    "default_root",
    "get_environment_config",
    "merge",
]
