"""The tree on disk: discovery, names, tenants, layering order, check() and the file cache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import configbus.tree.tree as tree_module
from configbus.errors import TreeError, UnknownNameError
from configbus.tree.layer import Layer, LayerKind
from configbus.tree.tree import EnvironmentTree

from .helpers import TreeFactory, line_of, touch_later, where

TREE = {
    "dev/dev.yml": "who: dev\nlevel: {env: dev}\n",
    "dev/overrides/local.yml": "who: local\nlocal: true\n",
    "dev/overrides/docker.yml": "who: docker\ndocker: true\n",
    "prod/prod.yml": "who: prod\n",
    "prod/overrides/ha.yml": "replicas: 3\n",
    "staging/staging.yml": "extends: ../prod/prod.yml\nwho: staging\n",
    "tenants/acme/tenant.yml": """
        tenant: acme
        name: Acme Records
        environments:
          dev:
            overrides: [local, docker]
          prod:
            overrides: [ha]
        """,
    "tenants/acme/dev.yml": "who: acme\n",
    "tenants/zeta/tenant.yml": "tenant: zeta\nenvironments:\n  prod: {}\n",
    # Not environments or tenants:
    "notes/readme.yml": "just: notes\n",
    ".hidden/.hidden.yml": "a: 1\n",
    "_drafts/_drafts.yml": "a: 1\n",
    "tenants/no-declaration/prod.yml": "a: 1\n",
}


@pytest.fixture
def root(make_tree: TreeFactory) -> Path:
    return make_tree(TREE)


@pytest.fixture
def tree(root: Path) -> EnvironmentTree:
    return EnvironmentTree(root)


# -- discovery and names -------------------------------------------------------------------


def test_environments_are_folders_holding_their_own_file(tree: EnvironmentTree) -> None:
    assert tree.environments() == ["dev", "prod", "staging"]


def test_tenants_are_folders_holding_a_tenant_file(tree: EnvironmentTree) -> None:
    assert tree.tenants() == ["acme", "zeta"]


def test_overrides_are_the_yml_files_of_the_overrides_folder(tree: EnvironmentTree) -> None:
    assert tree.overrides("dev") == ["docker", "local"]
    assert tree.overrides("staging") == []


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("production", "prod"),
        ("development", "dev"),
        ("prod", "prod"),
        ("PROD", "prod"),
        (" Production ", "prod"),
        ("staging", "staging"),
    ],
)
def test_environment_names_accept_the_usual_aliases(
    tree: EnvironmentTree, name: str, canonical: str
) -> None:
    assert tree.environment(name) == canonical
    assert tree.resolve(name).env == canonical


def test_an_alias_of_an_environment_the_tree_lacks_is_unknown(make_tree: TreeFactory) -> None:
    tree = EnvironmentTree(make_tree({"dev/dev.yml": "a: 1\n"}))

    with pytest.raises(UnknownNameError, match="production"):
        tree.environment("production")


def test_an_unknown_environment_lists_those_that_exist(tree: EnvironmentTree) -> None:
    with pytest.raises(UnknownNameError) as caught:
        tree.resolve("qa")

    message = str(caught.value)
    assert "'qa'" in message
    assert all(name in message for name in ("dev", "prod", "staging"))


def test_an_unknown_tenant_lists_those_that_exist(tree: EnvironmentTree) -> None:
    for call in (lambda: tree.tenant("nobody"), lambda: tree.resolve("dev", "nobody")):
        with pytest.raises(UnknownNameError) as caught:
            call()
        message = str(caught.value)
        assert "'nobody'" in message
        assert "acme" in message
        assert "zeta" in message


@pytest.mark.parametrize("name", ["no-declaration", "../dev", "acme/../zeta"])
def test_a_folder_that_is_not_a_tenant_is_unknown(tree: EnvironmentTree, name: str) -> None:
    with pytest.raises(UnknownNameError):
        tree.tenant(name)


def test_an_unknown_override_lists_the_available_ones(tree: EnvironmentTree) -> None:
    with pytest.raises(UnknownNameError) as caught:
        tree.resolve("dev", overrides=["local", "turbo"])

    message = str(caught.value)
    assert "'turbo'" in message
    assert "docker" in message
    assert "local" in message


def test_a_tenant_that_does_not_run_in_an_environment(tree: EnvironmentTree) -> None:
    with pytest.raises(UnknownNameError) as caught:
        tree.resolve("dev", "zeta")

    assert "zeta" in str(caught.value)
    assert "prod" in str(caught.value)


def test_a_root_that_is_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(TreeError, match="not a directory"):
        EnvironmentTree(tmp_path / "missing")


# -- tenants and layering ------------------------------------------------------------------


def test_a_tenant_declaration(root: Path, tree: EnvironmentTree) -> None:
    spec = tree.tenant("acme")

    assert spec.id == "acme"
    assert spec.name == "Acme Records"
    assert dict(spec.environments) == {"dev": ("local", "docker"), "prod": ("ha",)}
    assert spec.source == str(root / "tenants/acme/tenant.yml")
    assert tree.tenant("zeta").name == "zeta"  # the id, when no name is given


def test_streams_are_every_declared_tenant_environment_pair(tree: EnvironmentTree) -> None:
    assert sorted(tree.streams()) == [("acme", "dev"), ("acme", "prod"), ("zeta", "prod")]


def test_a_stream_stacks_env_then_declared_overrides_in_order_then_tenant(
    root: Path, tree: EnvironmentTree
) -> None:
    config = tree.resolve("dev", "acme")

    assert [(layer.kind, layer.name) for layer in config.layers] == [
        (LayerKind.ENVIRONMENT, "dev"),
        (LayerKind.OVERRIDE, "local"),
        (LayerKind.OVERRIDE, "docker"),
        (LayerKind.TENANT, "acme"),
    ]
    assert config.get("who") == "acme"
    assert config.get("local") is True
    assert config.get("docker") is True
    assert (config.tenant, config.env, config.overrides) == ("acme", "dev", ("local", "docker"))


def test_the_order_of_overrides_decides_who_wins(tree: EnvironmentTree) -> None:
    assert tree.resolve("dev", overrides=["local", "docker"]).get("who") == "docker"
    assert tree.resolve("dev", overrides=["docker", "local"]).get("who") == "local"


def test_explicit_overrides_replace_the_tenants_declared_ones(tree: EnvironmentTree) -> None:
    config = tree.resolve("dev", "acme", overrides=["docker"])

    assert config.overrides == ("docker",)
    assert "local" not in config
    assert config.get("who") == "acme"  # the tenant layer still sits on top


def test_a_tenant_without_its_own_layer_gets_env_and_overrides(tree: EnvironmentTree) -> None:
    config = tree.resolve("prod", "zeta")

    assert [layer.kind for layer in config.layers] == [LayerKind.ENVIRONMENT]
    assert config.to_dict() == {"who": "prod"}


def test_without_a_tenant_no_override_is_applied(tree: EnvironmentTree) -> None:
    config = tree.resolve("dev")

    assert config.to_dict() == {"who": "dev", "level": {"env": "dev"}}
    assert config.overrides == ()


def test_runtime_layers_go_on_top_in_order(tree: EnvironmentTree) -> None:
    store = Layer(LayerKind.STORE, "store", "redis://s", {"who": "store", "s": 1})
    emergency = Layer(LayerKind.EMERGENCY, "em", "redis://e", {"who": "emergency"})

    config = tree.resolve("dev", "acme", runtime=[store, emergency])

    assert config.get("who") == "emergency"
    assert config.get("s") == 1
    assert config.layers[-2:] == (store, emergency)


# -- tenant.yml problems -------------------------------------------------------------------


def test_every_problem_of_a_tenant_file_is_reported_at_its_line(make_tree: TreeFactory) -> None:
    root = make_tree(
        {
            "dev/dev.yml": "a: 1\n",
            "dev/overrides/local.yml": "b: 1\n",
            "tenants/acme/tenant.yml": """
                tenant: acme-corp
                name: Acme
                owner: someone
                environments:
                  dev:
                    overrides: [local, turbo]
                  qa:
                    overrides: []
                """,
        }
    )
    tenant_file = root / "tenants/acme/tenant.yml"

    with pytest.raises(TreeError) as caught:
        EnvironmentTree(root).tenant("acme")

    found = {p.key: p for p in caught.value.problems}
    assert all(p.source == str(tenant_file) for p in found.values())
    assert set(found) == {
        "tenant",
        "owner",
        "environments.dev.overrides.1",
        "environments.qa",
    }
    assert found["tenant"].line == line_of(tenant_file, "tenant: acme-corp")
    assert "'acme'" in found["tenant"].message
    assert found["owner"].line == line_of(tenant_file, "owner:")
    assert "unknown key" in found["owner"].message
    assert found["environments.dev.overrides.1"].line == line_of(tenant_file, "turbo")
    assert "'turbo'" in found["environments.dev.overrides.1"].message
    assert "local" in found["environments.dev.overrides.1"].message
    assert found["environments.qa"].line == line_of(tenant_file, "qa:")
    assert "unknown environment" in found["environments.qa"].message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("tenant: acme\n", "environments"),
        ("tenant: acme\nenvironments: []\n", "environments"),
        ("tenant: acme\nenvironments:\n  dev: [local]\n", "environments.dev"),
        ("tenant: acme\nenvironments:\n  dev: {overrides: local}\n", "environments.dev.overrides"),
        ("tenant: acme\nname: [x]\nenvironments:\n  dev: {}\n", "name"),
        ("name: Acme\nenvironments:\n  dev: {}\n", "tenant"),
    ],
)
def test_a_malformed_tenant_file_is_reported(make_tree: TreeFactory, text: str, key: str) -> None:
    root = make_tree({"dev/dev.yml": "a: 1\n", "tenants/acme/tenant.yml": text})

    with pytest.raises(TreeError) as caught:
        EnvironmentTree(root).resolve("dev", "acme")

    assert [p.key for p in caught.value.problems] == [key]


def test_a_tenant_folder_name_must_be_a_valid_id(make_tree: TreeFactory) -> None:
    root = make_tree(
        {"dev/dev.yml": "a: 1\n", "tenants/Bad_Id/tenant.yml": "tenant: Bad_Id\nenvironments:\n"}
    )

    with pytest.raises(TreeError, match="lowercase"):
        EnvironmentTree(root).tenant("Bad_Id")


# -- check() -------------------------------------------------------------------------------


def test_check_of_a_good_tree(root: Path, tree: EnvironmentTree) -> None:
    os.remove(root / "tenants/no-declaration/prod.yml")

    report = tree.check()

    assert report.ok, [str(p) for p in report.problems]
    yml_files = list(root.rglob("*.yml"))
    assert report.files == len(yml_files)
    # dev, dev+local, dev+docker, prod, prod+ha, staging, acme/dev, acme/prod, zeta/prod
    assert report.streams == 9


def test_check_reports_a_tenant_layer_for_an_undeclared_environment(
    make_tree: TreeFactory,
) -> None:
    root = make_tree(
        {
            "dev/dev.yml": "a: 1\n",
            "prod/prod.yml": "a: 1\n",
            "tenants/acme/tenant.yml": "tenant: acme\nenvironments:\n  dev: {}\n",
            "tenants/acme/prod.yml": "a: 2\n",
        }
    )

    report = EnvironmentTree(root).check()

    (problem,) = report.problems
    assert problem.source == str(root / "tenants/acme/prod.yml")
    assert "prod" in problem.message
    assert "never used" in problem.message


def test_check_reports_every_broken_file_and_stream(make_tree: TreeFactory) -> None:
    root = make_tree(
        {
            "dev/dev.yml": "a: 1\n",
            "dev/overrides/bad.yml": "a: [1\n",
            "prod/prod.yml": "extends: ../missing.yml\n",
            "common/orphan.yml": "- not a mapping\n",
            "tenants/acme/tenant.yml": "tenant: acme\nenvironments:\n  dev: {overrides: [nope]}\n",
        }
    )

    report = EnvironmentTree(root).check()

    assert {p.source for p in report.problems} == {
        str(root / "dev/overrides/bad.yml"),
        str(root / "prod/prod.yml"),
        str(root / "common/orphan.yml"),
        str(root / "tenants/acme/tenant.yml"),
    }
    assert len(report.problems) == 4  # each once, though several streams hit them
    assert not report.ok


# -- caches --------------------------------------------------------------------------------


@pytest.fixture
def parse_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = tree_module.parse_yaml

    def spy(source: str, text: str) -> Any:
        calls.append(source)
        return real(source, text)

    monkeypatch.setattr(tree_module, "parse_yaml", spy)
    return calls


def test_an_unchanged_file_is_parsed_once(
    root: Path, tree: EnvironmentTree, parse_calls: list[str]
) -> None:
    first = tree.resolve("dev", "acme")
    parsed_once = sorted(parse_calls)
    second = tree.resolve("dev", "acme")
    tree.resolve("dev", overrides=["local"])

    assert parsed_once == sorted(
        str(root / f)
        for f in (
            "tenants/acme/tenant.yml",
            "dev/dev.yml",
            "dev/overrides/local.yml",
            "dev/overrides/docker.yml",
            "tenants/acme/dev.yml",
        )
    )
    assert sorted(parse_calls) == parsed_once
    assert all(a is b for a, b in zip(first.layers, second.layers, strict=True))


def test_an_edited_file_is_read_again_and_only_it(
    root: Path, tree: EnvironmentTree, parse_calls: list[str]
) -> None:
    before = tree.resolve("dev", "acme")
    parse_calls.clear()

    edited = root / "dev/overrides/local.yml"
    edited.write_text("who: local\nlocal: false\n")  # same size as before
    touch_later(edited)
    after = tree.resolve("dev", "acme")

    assert parse_calls == [str(edited)]
    assert after.get("local") is False
    assert before.get("local") is True  # a config already handed out never changes
    assert after.layers[1] is not before.layers[1]
    assert after.layers[0] is before.layers[0]
    assert after.hash != before.hash


def test_an_edit_that_breaks_a_file_is_seen_and_a_fix_is_seen_too(
    root: Path, tree: EnvironmentTree
) -> None:
    env_file = root / "dev/dev.yml"
    tree.resolve("dev")

    env_file.write_text("who: [dev\n")
    touch_later(env_file)
    with pytest.raises(TreeError) as caught:
        tree.resolve("dev")
    assert caught.value.problems[0].source == str(env_file)

    env_file.write_text("who: fixed\n")
    touch_later(env_file)
    assert tree.resolve("dev").get("who") == "fixed"


def test_a_new_override_file_is_found(root: Path, tree: EnvironmentTree) -> None:
    assert tree.overrides("prod") == ["ha"]

    (root / "prod/overrides/dr.yml").write_text("dr: true\n")
    touch_later(root / "prod/overrides")

    assert tree.overrides("prod") == ["dr", "ha"]
    assert tree.resolve("prod", overrides=["dr"]).get("dr") is True


def test_an_edited_tenant_declaration_is_read_again(root: Path, tree: EnvironmentTree) -> None:
    assert tree.resolve("dev", "acme").overrides == ("local", "docker")

    tenant_file = root / "tenants/acme/tenant.yml"
    tenant_file.write_text("tenant: acme\nenvironments:\n  dev:\n    overrides: [docker]\n")
    touch_later(tenant_file)

    assert tree.resolve("dev", "acme").overrides == ("docker",)


def test_problems_print_as_file_line_key_message(make_tree: TreeFactory) -> None:
    root = make_tree({"dev/dev.yml": "a:\n  b: 1\n  b: 2\n"})

    with pytest.raises(TreeError) as caught:
        EnvironmentTree(root).resolve("dev")

    assert str(caught.value) == (
        f"{where(root / 'dev/dev.yml', 3)}: a.b: duplicate key (first set on line 2)"
    )
