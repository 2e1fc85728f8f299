"""Provenance: which file and line set a resolved value, and every layer's say."""

from __future__ import annotations

from pathlib import Path

import pytest

from configbus.tree.layer import Layer, LayerKind
from configbus.tree.resolved import ResolvedConfig
from configbus.tree.tree import EnvironmentTree
from configbus.tree.values import DELETE

from .helpers import TreeFactory, line_of, where

FILES = {
    "common/base.yml": """
        db:
          host: base-host
          port: 5432
          pool:
            min: 1
            max: 5
        cache:
          redis:
            port: 6379
            tls: true
        from_base_only:
          deep:
            value: 1
        tags: [a, b]
        """,
    "dev/dev.yml": """
        extends: ../common/base.yml
        db:
          host: dev-host
          pool:
            max: 10
        hosts:
          - one
          - two
          - three
        """,
    "dev/overrides/ha.yml": """
        db:
          pool:
            max: 50
        cache: !delete
        """,
    "tenants/acme/tenant.yml": """
        tenant: acme
        name: Acme
        environments:
          dev:
            overrides: [ha]
        """,
    "tenants/acme/dev.yml": """
        db:
          port: 6432
        cache:
          redis:
            port: 7000
        """,
}


@pytest.fixture
def root(make_tree: TreeFactory) -> Path:
    return make_tree(FILES)


@pytest.fixture
def config(root: Path) -> ResolvedConfig:
    return EnvironmentTree(root).resolve("dev", "acme")


@pytest.mark.parametrize(
    ("key", "file", "needle", "kind"),
    [
        ("db.host", "dev/dev.yml", "host: dev-host", LayerKind.ENVIRONMENT),
        ("db.pool.max", "dev/overrides/ha.yml", "max: 50", LayerKind.OVERRIDE),
        ("db.port", "tenants/acme/dev.yml", "port: 6432", LayerKind.TENANT),
        ("cache.redis.port", "tenants/acme/dev.yml", "port: 7000", LayerKind.TENANT),
        ("db.pool.min", "common/base.yml", "min: 1", LayerKind.BASE),
        ("from_base_only.deep.value", "common/base.yml", "value: 1", LayerKind.BASE),
    ],
)
def test_origin_is_the_file_and_line_of_the_layer_that_won(
    root: Path, config: ResolvedConfig, key: str, file: str, needle: str, kind: LayerKind
) -> None:
    origin = config.origin(key)

    assert origin is not None
    assert origin.layer.source == str(root / file)
    assert origin.line == line_of(root / file, needle)
    assert origin.layer.kind is kind
    assert str(origin) == where(root / file, origin.line)


def test_origin_of_a_mapping_is_the_highest_layer_that_wrote_into_it(
    root: Path, config: ResolvedConfig
) -> None:
    origin = config.origin("db")

    assert origin is not None
    assert origin.layer.source == str(root / "tenants/acme/dev.yml")
    assert origin.line == line_of(root / "tenants/acme/dev.yml", "db:")


def test_origin_of_an_item_of_a_flow_list_is_the_lists_line(
    root: Path, config: ResolvedConfig
) -> None:
    origin = config.origin("tags.1")

    assert origin is not None
    assert origin.layer.source == str(root / "common/base.yml")
    assert origin.line == line_of(root / "common/base.yml", "tags: [a, b]")


def test_origin_of_an_item_of_a_block_list_is_in_the_list_that_won(
    root: Path, config: ResolvedConfig
) -> None:
    origin = config.origin("hosts.2")

    assert origin is not None
    assert origin.layer.source == str(root / "dev/dev.yml")
    # The item's own line, inside the list written below `hosts:`.
    assert origin.line == line_of(root / "dev/dev.yml", "- three")
    assert origin.line > line_of(root / "dev/dev.yml", "hosts:")


def test_a_list_replaced_higher_up_takes_its_origin_from_the_replacement(
    make_tree: TreeFactory,
) -> None:
    root = make_tree(
        {
            "dev/dev.yml": "hosts: [a, b, c]\n",
            "dev/overrides/o.yml": "# replaces the list\nhosts: [z]\n",
        }
    )

    config = EnvironmentTree(root).resolve("dev", overrides=["o"])

    assert config.get("hosts") == ("z",)
    assert str(config.origin("hosts.0")) == where(root / "dev/overrides/o.yml", 2)
    assert config.origin("hosts.1") is None


@pytest.mark.parametrize("key", ["nope", "db.nope", "db.host.deeper", "tags.7", "cache.redis.tls"])
def test_no_origin_for_a_key_not_in_the_config(config: ResolvedConfig, key: str) -> None:
    # cache.redis.tls was set by base but the override deleted `cache` and the tenant
    # rebuilt it without `tls`.
    assert key not in config
    assert config.origin(key) is None


def test_explain_lists_every_layer_that_set_the_key_lowest_first(
    root: Path, config: ResolvedConfig
) -> None:
    steps = config.explain("db.pool.max")

    assert [(s.origin.layer.kind, s.origin.line, s.value) for s in steps] == [
        (LayerKind.BASE, line_of(root / "common/base.yml", "max: 5"), 5),
        (LayerKind.ENVIRONMENT, line_of(root / "dev/dev.yml", "max: 10"), 10),
        (LayerKind.OVERRIDE, line_of(root / "dev/overrides/ha.yml", "max: 50"), 50),
    ]
    assert all(s.note == "" for s in steps)


def test_explain_shows_a_deletion_of_a_parent_and_the_value_set_after_it(
    root: Path, config: ResolvedConfig
) -> None:
    steps = config.explain("cache.redis.port")

    assert [s.origin.layer.kind for s in steps] == [
        LayerKind.BASE,
        LayerKind.OVERRIDE,
        LayerKind.TENANT,
    ]
    base, deleted, tenant = steps
    assert (base.value, base.note) == (6379, "")
    assert deleted.value is DELETE
    assert "cache" in deleted.note
    assert "deleted" in deleted.note
    assert deleted.origin.line == line_of(root / "dev/overrides/ha.yml", "cache: !delete")
    assert (tenant.value, tenant.note) == (7000, "")
    assert config.get("cache.redis.port") == 7000


def test_explain_shows_a_deletion_of_the_key_itself_and_a_replaced_parent(
    make_tree: TreeFactory,
) -> None:
    root = make_tree(
        {
            "dev/dev.yml": "db:\n  pool:\n    max: 5\n",
            "dev/overrides/a.yml": "db:\n  pool:\n    max: !delete\n",
            "dev/overrides/b.yml": "db:\n  pool: 7\n",
        }
    )
    tree = EnvironmentTree(root)

    deleted = tree.resolve("dev", overrides=["a"])
    replaced = tree.resolve("dev", overrides=["b"])

    d_steps = deleted.explain("db.pool.max")
    assert [(s.value, s.note) for s in d_steps] == [(5, ""), (DELETE, "")]
    assert str(d_steps[1].origin) == where(root / "dev/overrides/a.yml", 3)
    assert "db.pool.max" not in deleted

    r_steps = replaced.explain("db.pool.max")
    assert r_steps[0].value == 5
    assert r_steps[1].value == 7
    assert "db.pool" in r_steps[1].note
    assert "replaced" in r_steps[1].note
    assert str(r_steps[1].origin) == where(root / "dev/overrides/b.yml", 2)


def test_explain_of_a_key_nobody_set_is_empty(config: ResolvedConfig) -> None:
    assert config.explain("db.nothing.here") == []


def test_a_runtime_layer_without_lines_names_its_store_and_key(make_tree: TreeFactory) -> None:
    root = make_tree({"dev/dev.yml": "feature:\n  beta: false\n"})
    store = Layer(LayerKind.STORE, "redis", "redis://store/tenant", {"feature": {"beta": True}})

    config = EnvironmentTree(root).resolve("dev", runtime=[store])

    origin = config.origin("feature.beta")
    assert config.get("feature.beta") is True
    assert origin is not None
    assert origin.layer is store
    assert origin.line is None
    assert str(origin) == "redis://store/tenant#feature.beta"
