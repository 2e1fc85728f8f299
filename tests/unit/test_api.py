"""The application-facing API: get_environment_config, the manager, EnvironmentType and
ResolvedConfig as a read-only mapping."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest

from configbus import (
    EnvironmentConfigManager,
    EnvironmentType,
    ResolvedConfig,
    SchemaError,
    SecretRef,
    SettingsError,
    TreeError,
    UnknownNameError,
    get_environment_config,
)
from configbus.tree.values import freeze

from .helpers import SMALL_SCHEMA, TreeFactory, touch_later

FILES = {
    "schema.json": SMALL_SCHEMA,
    "dev/dev.yml": """
        app:
          name: api
          workers: 1
          tags: [dev]
        db:
          host: localhost
          password: !secret db/password
        """,
    "dev/overrides/fast.yml": "app:\n  workers: 8\n  level: debug\n",
    "dev/overrides/slow.yml": "app:\n  workers: 2\n",
    "dev/overrides/broken.yml": "app:\n  workers: lots\n",
    "prod/prod.yml": "app:\n  name: api\n  workers: 16\n",
    "tenants/acme/tenant.yml": """
        tenant: acme
        environments:
          dev: {overrides: [fast]}
          prod: {}
        """,
    "tenants/acme/dev.yml": "app:\n  tags: [acme, dev]\n",
}


@pytest.fixture
def root(make_tree: TreeFactory) -> Path:
    return make_tree(FILES)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("CONFIGBUS_ENV", "CONFIGBUS_ROOT", "CONFIGBUS_TENANT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# -- get_environment_config ----------------------------------------------------------------


def test_the_environment_comes_from_configbus_env(root: Path, env: pytest.MonkeyPatch) -> None:
    env.setenv("CONFIGBUS_ROOT", str(root))
    env.setenv("CONFIGBUS_ENV", "production")

    config = get_environment_config()

    assert config.env == "prod"
    assert config.tenant is None
    assert config.get("app.workers") == 16


def test_the_tenant_comes_from_configbus_tenant(root: Path, env: pytest.MonkeyPatch) -> None:
    env.setenv("CONFIGBUS_ROOT", str(root))
    env.setenv("CONFIGBUS_ENV", "development")
    env.setenv("CONFIGBUS_TENANT", "acme")

    config = get_environment_config()

    assert (config.env, config.tenant, config.overrides) == ("dev", "acme", ("fast",))
    assert config.get("app.tags") == ("acme", "dev")
    assert config.get("app.workers") == 8


def test_arguments_win_over_the_environment_variables(
    root: Path, make_tree: TreeFactory, env: pytest.MonkeyPatch
) -> None:
    other = make_tree({"dev/dev.yml": "app: {name: other}\n"}, name="other")
    env.setenv("CONFIGBUS_ROOT", str(other))
    env.setenv("CONFIGBUS_ENV", "dev")
    env.setenv("CONFIGBUS_TENANT", "nobody")

    config = get_environment_config("prod", tenant="acme", root=root)

    assert (config.env, config.tenant) == ("prod", "acme")
    assert config.get("app.workers") == 16


def test_the_default_root_is_environments_in_the_working_directory(
    make_tree: TreeFactory, tmp_path: Path, env: pytest.MonkeyPatch
) -> None:
    make_tree({"dev/dev.yml": "app: {name: here}\n"}, name="environments")
    env.chdir(tmp_path)

    assert get_environment_config("dev").get("app.name") == "here"


def test_no_environment_at_all_is_a_settings_error(root: Path, env: pytest.MonkeyPatch) -> None:
    env.setenv("CONFIGBUS_ROOT", str(root))

    with pytest.raises(SettingsError, match="CONFIGBUS_ENV"):
        get_environment_config()


def test_an_unknown_environment_or_tenant(root: Path, env: pytest.MonkeyPatch) -> None:
    env.setenv("CONFIGBUS_ROOT", str(root))

    with pytest.raises(UnknownNameError, match="qa"):
        get_environment_config("qa")
    with pytest.raises(UnknownNameError, match="nobody"):
        get_environment_config("dev", tenant="nobody")


def test_repeated_calls_see_edits(root: Path, env: pytest.MonkeyPatch) -> None:
    env.setenv("CONFIGBUS_ROOT", str(root))
    assert get_environment_config("prod").get("app.workers") == 16

    (root / "prod/prod.yml").write_text("app:\n  name: api\n  workers: 32\n")
    touch_later(root / "prod/prod.yml")

    assert get_environment_config("prod").get("app.workers") == 32


# -- EnvironmentConfigManager --------------------------------------------------------------


def test_manager_load(root: Path) -> None:
    manager = EnvironmentConfigManager(root=root)

    assert manager.environments() == ["dev", "prod"]
    assert manager.tenants() == ["acme"]
    assert manager.load("dev").get("app.workers") == 1
    assert manager.load("dev", "acme").get("app.workers") == 8
    assert manager.load("production").env == "prod"


def test_manager_root_defaults_to_configbus_root(root: Path, env: pytest.MonkeyPatch) -> None:
    env.setenv("CONFIGBUS_ROOT", str(root))

    assert EnvironmentConfigManager().load("prod").get("app.workers") == 16


def test_load_with_overrides_applies_them_in_order(root: Path) -> None:
    manager = EnvironmentConfigManager(root=root)

    assert manager.load_with_overrides("dev", ["fast", "slow"]).get("app.workers") == 2
    assert manager.load_with_overrides("dev", ["slow", "fast"]).get("app.workers") == 8
    assert manager.load_with_overrides("dev", []).get("app.workers") == 1


def test_load_with_overrides_for_a_tenant_replaces_its_declared_ones(root: Path) -> None:
    config = EnvironmentConfigManager(root=root).load_with_overrides(
        "dev", overrides=["slow"], tenant="acme"
    )

    assert config.overrides == ("slow",)
    assert config.get("app.workers") == 2
    assert config.get("app.tags") == ("acme", "dev")
    assert "app.level" not in config


def test_overrides_must_be_a_list_not_a_string(root: Path) -> None:
    with pytest.raises(TypeError):
        EnvironmentConfigManager(root=root).load_with_overrides("dev", "fast")


def test_unknown_override(root: Path) -> None:
    with pytest.raises(UnknownNameError, match="nope"):
        EnvironmentConfigManager(root=root).load_with_overrides("dev", ["nope"])


def test_loading_an_invalid_config_raises_schema_error_with_every_problem(root: Path) -> None:
    with pytest.raises(SchemaError) as caught:
        EnvironmentConfigManager(root=root).load_with_overrides("dev", ["broken"])

    assert isinstance(caught.value, TreeError)
    assert [p.key for p in caught.value.problems] == ["app.workers"]
    assert caught.value.problems[0].source == str(root / "dev/overrides/broken.yml")


# -- EnvironmentType -----------------------------------------------------------------------


def test_environment_type_accepts_names_and_aliases() -> None:
    assert EnvironmentType("production") is EnvironmentType.PROD
    assert EnvironmentType("development") is EnvironmentType.DEV
    assert EnvironmentType("prod") is EnvironmentType.PROD
    assert EnvironmentType("Staging") is EnvironmentType.STAGING
    assert EnvironmentType.PROD == "prod"


@pytest.mark.parametrize("value", ["qa", "", "produktion", 3, None])
def test_environment_type_refuses_unknown_values(value: object) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - Enum raises a plain ValueError
        EnvironmentType(value)


# -- ResolvedConfig ------------------------------------------------------------------------


@pytest.fixture
def config(root: Path) -> ResolvedConfig:
    return EnvironmentConfigManager(root=root).load("dev", "acme")


def test_dotted_access(config: ResolvedConfig) -> None:
    assert config.get("app.workers") == 8
    assert config.get("app.tags.0") == "acme"
    assert config["app"]["name"] == "api"
    assert config["app.name"] == "api"
    assert config.get("db.password") == SecretRef("db/password")


def test_missing_keys(config: ResolvedConfig) -> None:
    assert config.get("app.missing") is None
    assert config.get("app.missing", 42) == 42
    assert config.get("app.name.deeper", "d") == "d"
    assert config.get("app.tags.9", "d") == "d"
    with pytest.raises(KeyError):
        config["nope"]
    with pytest.raises(KeyError):
        config["app.nope"]


def test_membership(config: ResolvedConfig) -> None:
    assert "app" in config
    assert "app.workers" in config
    assert "app.tags.1" in config
    assert "app.nope" not in config
    assert "app.tags.2" not in config
    assert 5 not in config


def test_a_falsy_value_is_present(make_tree: TreeFactory) -> None:
    root = make_tree({"dev/dev.yml": "a: {zero: 0, disabled: false, none: null, empty: ''}\n"})
    config = EnvironmentConfigManager(root=root).load("dev")

    for key in ("zero", "disabled", "none", "empty"):
        assert f"a.{key}" in config
        assert config.get(f"a.{key}", "default") != "default"
    assert config["a.none"] is None


def test_a_key_with_leading_zeros_is_found(make_tree: TreeFactory) -> None:
    root = make_tree({"dev/dev.yml": 'months:\n  "01": jan\n  "1": one\n'})
    config = EnvironmentConfigManager(root=root).load("dev")

    assert config.get("months.01") == "jan"
    assert config.get("months.1") == "one"


def test_the_mapping_is_of_top_level_sections(config: ResolvedConfig) -> None:
    assert sorted(config) == ["app", "db"]
    assert len(config) == 2
    assert dict(config.items())["db"]["host"] == "localhost"


def test_a_config_is_immutable(config: ResolvedConfig) -> None:
    with pytest.raises(AttributeError):
        config.env = "prod"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        config.anything = 1  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        del config.env
    with pytest.raises(TypeError):
        config["app"] = {}  # type: ignore[index]
    with pytest.raises(TypeError):
        config["app"]["workers"] = 100  # type: ignore[index]
    with pytest.raises(TypeError):
        config.data["db"] = {}  # type: ignore[index]
    with pytest.raises(AttributeError):
        config.get("app.tags").append("x")
    assert config.env == "dev"
    assert config.get("app.workers") == 8


def test_a_secret_reference_is_immutable() -> None:
    ref = SecretRef("db/password")

    with pytest.raises(AttributeError):
        ref.name = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del ref.name
    assert ref.name == "db/password"


def test_to_dict_is_a_mutable_independent_copy(config: ResolvedConfig) -> None:
    data = config.to_dict()
    data["app"]["workers"] = 1000
    data["app"]["tags"].append("x")
    data["new"] = 1

    assert config.get("app.workers") == 8
    assert config.get("app.tags") == ("acme", "dev")
    assert "new" not in config
    assert config.to_dict()["app"]["workers"] == 8
    assert type(config.to_dict()["app"]) is dict
    assert data["db"]["password"] == {"$secret": "db/password"}


def test_redacted_shows_secret_names_only(config: ResolvedConfig) -> None:
    shown = config.redacted()

    assert shown["db"]["password"] == "<secret:db/password>"
    assert shown["app"]["tags"] == ["acme", "dev"]


def test_equal_configs_compare_and_hash_equal(root: Path) -> None:
    manager = EnvironmentConfigManager(root=root)
    a = manager.load("dev", "acme")
    b = manager.load_with_overrides("dev", ["fast"], tenant="acme")
    c = manager.load("dev")

    assert a == b
    assert hash(a) == hash(b)
    assert a != c
    assert "acme/dev" in repr(a)


def test_secret_references_survive_pickle_and_copy() -> None:
    frozen = freeze({"db": {"password": SecretRef("db/password"), "port": 1}})

    for copied in (pickle.loads(pickle.dumps(frozen)), copy.deepcopy(frozen)):
        assert copied == frozen
        assert copied["db"]["password"] == SecretRef("db/password")
    assert copy.copy(SecretRef("x")) == SecretRef("x")
    assert pickle.loads(pickle.dumps(SecretRef("x"))) == SecretRef("x")
