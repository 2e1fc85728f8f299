"""Schema validation: every problem, at the file and line that set the offending value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from configbus.errors import Problem, SchemaError, TreeError
from configbus.tree.tree import EnvironmentTree

from .helpers import SMALL_SCHEMA, TreeFactory, line_of, touch_later, where

GOOD_ENV = """
app:
  name: api
  workers: 2
  level: info
db:
  host: db.internal
  port: 5432
  password: !secret db/password
"""


def tree_with(make_tree: TreeFactory, files: dict[str, Any]) -> tuple[Path, EnvironmentTree]:
    root = make_tree({"schema.json": SMALL_SCHEMA, "dev/dev.yml": GOOD_ENV, **files})
    return root, EnvironmentTree(root)


def problems_of(tree: EnvironmentTree, *args: Any, **kwargs: Any) -> list[Problem]:
    return tree.problems(tree.resolve(*args, **kwargs))


def test_a_valid_config_has_no_problems_and_validate_returns_it(make_tree: TreeFactory) -> None:
    _, tree = tree_with(make_tree, {})
    config = tree.resolve("dev")

    assert tree.problems(config) == []
    assert tree.validate(config) is config


def test_a_wrong_type_set_in_an_override_is_reported_at_the_override(
    make_tree: TreeFactory,
) -> None:
    root, tree = tree_with(
        make_tree, {"dev/overrides/big.yml": "# more workers\napp:\n  workers: many\n"}
    )

    (problem,) = problems_of(tree, "dev", overrides=["big"])

    override = root / "dev/overrides/big.yml"
    assert (problem.source, problem.line, problem.key) == (str(override), 3, "app.workers")
    assert str(problem) == f"{where(override, 3)}: app.workers: expected integer, got string"


def test_a_wrong_value_in_a_tenant_layer_is_reported_at_the_tenant_layer(
    make_tree: TreeFactory,
) -> None:
    root, tree = tree_with(
        make_tree,
        {
            "tenants/acme/tenant.yml": "tenant: acme\nenvironments:\n  dev: {}\n",
            "tenants/acme/dev.yml": "db:\n  port: 0.5\n",
        },
    )

    (problem,) = problems_of(tree, "dev", "acme")

    assert str(problem).startswith(f"{where(root / 'tenants/acme/dev.yml', 2)}: db.port: ")
    assert "integer" in problem.message


def test_a_value_inherited_from_a_base_file_is_reported_at_the_base(
    make_tree: TreeFactory,
) -> None:
    root, tree = tree_with(
        make_tree,
        {
            "common/base.yml": "app:\n  name: api\n  workers: 0\n",
            "dev/dev.yml": "extends: ../common/base.yml\napp:\n  level: info\n",
        },
    )

    (problem,) = problems_of(tree, "dev")

    assert (problem.source, problem.line, problem.key) == (
        str(root / "common/base.yml"),
        3,
        "app.workers",
    )


def test_every_problem_is_reported_not_only_the_first(make_tree: TreeFactory) -> None:
    root, tree = tree_with(
        make_tree,
        {
            "dev/overrides/bad.yml": """
                app:
                  workers: -1
                  level: verbose
                  colour: blue
                db:
                  port: "5432"
                """
        },
    )

    found = problems_of(tree, "dev", overrides=["bad"])

    override = root / "dev/overrides/bad.yml"
    assert [(p.source, p.line, p.key) for p in found] == [
        (str(override), line_of(override, "workers"), "app.workers"),
        (str(override), line_of(override, "level"), "app.level"),
        (str(override), line_of(override, "colour"), "app.colour"),
        (str(override), line_of(override, "port"), "db.port"),
    ]


def test_an_unknown_key_is_reported_at_its_own_line(make_tree: TreeFactory) -> None:
    _root, tree = tree_with(make_tree, {"dev/overrides/typo.yml": "app:\n  wokers: 4\n"})

    (problem,) = problems_of(tree, "dev", overrides=["typo"])

    assert (problem.line, problem.key) == (2, "app.wokers")
    assert "unknown key" in problem.message


def test_a_missing_required_key_names_the_key(make_tree: TreeFactory) -> None:
    root, tree = tree_with(make_tree, {"dev/dev.yml": "app:\n  workers: 2\n"})

    (problem,) = problems_of(tree, "dev")

    assert problem.key == "app"
    assert "missing required key" in problem.message
    assert "'name'" in problem.message
    assert (problem.source, problem.line) == (str(root / "dev/dev.yml"), 1)


def test_a_missing_required_top_level_key_points_at_the_environment_file(
    make_tree: TreeFactory,
) -> None:
    root, tree = tree_with(make_tree, {"dev/dev.yml": "db:\n  port: 1\n"})

    (problem,) = problems_of(tree, "dev")

    assert problem.source == str(root / "dev/dev.yml")
    assert "missing required key 'app'" in problem.message


def test_a_required_key_deleted_by_an_override_is_reported(make_tree: TreeFactory) -> None:
    _, tree = tree_with(make_tree, {"dev/overrides/rm.yml": "app:\n  name: !delete\n"})

    (problem,) = problems_of(tree, "dev", overrides=["rm"])

    assert "missing required key 'name'" in problem.message


def test_an_enum_message_lists_the_allowed_values(make_tree: TreeFactory) -> None:
    _root, tree = tree_with(make_tree, {"dev/overrides/lvl.yml": "app:\n  level: verbose\n"})

    (problem,) = problems_of(tree, "dev", overrides=["lvl"])

    assert (problem.line, problem.key) == (2, "app.level")
    assert "verbose" in problem.message
    assert all(value in problem.message for value in ("debug", "info", "warning"))


def test_a_wrong_list_item_is_reported_with_its_index(make_tree: TreeFactory) -> None:
    root, tree = tree_with(make_tree, {"dev/overrides/t.yml": "app:\n  tags: [a, 2, c]\n"})

    (problem,) = problems_of(tree, "dev", overrides=["t"])

    assert (problem.source, problem.line, problem.key) == (
        str(root / "dev/overrides/t.yml"),
        2,
        "app.tags.1",
    )


# -- secrets -------------------------------------------------------------------------------

SECRET = "hunter2-s3cr3t"


def assert_secret_absent(problems: list[Problem], exc: BaseException | None = None) -> None:
    for problem in problems:
        assert SECRET not in str(problem)
        assert SECRET not in repr(problem)
    if exc is not None:
        assert SECRET not in str(exc)


def test_a_plain_text_password_is_a_problem_that_never_shows_the_value(
    make_tree: TreeFactory,
) -> None:
    root, tree = tree_with(make_tree, {"dev/overrides/leak.yml": f"db:\n  password: {SECRET}\n"})
    config = tree.resolve("dev", overrides=["leak"])

    found = tree.problems(config)
    with pytest.raises(SchemaError) as caught:
        tree.validate(config)

    (problem,) = found  # not also "expected object, got string"
    assert (problem.source, problem.line, problem.key) == (
        str(root / "dev/overrides/leak.yml"),
        2,
        "db.password",
    )
    assert "plain" in problem.message
    assert "!secret" in problem.message
    assert_secret_absent(found, caught.value)


@pytest.mark.parametrize(
    "key", ["api_key", "apikey", "token", "client_secret", "private_key", "passwd", "Password"]
)
def test_every_secret_key_name_refuses_plain_text(make_tree: TreeFactory, key: str) -> None:
    root = make_tree({"dev/dev.yml": f"svc:\n  {key}: {SECRET}\n"})
    tree = EnvironmentTree(root)  # no schema.json: the plain-secret rule applies anyway

    found = tree.problems(tree.resolve("dev"))

    assert [p.key for p in found] == [f"svc.{key}"]
    assert_secret_absent(found)


def test_plain_text_secrets_in_a_list_under_a_secret_key_are_problems(
    make_tree: TreeFactory,
) -> None:
    root = make_tree(
        {
            "schema.json": {"type": "object"},
            "dev/dev.yml": f"svc:\n  api_keys:\n    - {SECRET}\n  tokens: [{SECRET}-2]\n",
        }
    )
    tree = EnvironmentTree(root)

    found = tree.problems(tree.resolve("dev"))

    assert sorted(p.key for p in found if p.key) == ["svc.api_keys.0", "svc.tokens.0"]
    assert_secret_absent(found)


def test_a_plain_secret_replaced_by_a_reference_higher_up_is_fine(
    make_tree: TreeFactory,
) -> None:
    _, tree = tree_with(
        make_tree,
        {
            "dev/dev.yml": GOOD_ENV.replace("!secret db/password", SECRET),
            "dev/overrides/fix.yml": "db:\n  password: !secret db/password\n",
        },
    )

    assert problems_of(tree, "dev", overrides=["fix"]) == []
    assert problems_of(tree, "dev") != []


def test_no_message_repeats_a_secret_when_a_rule_on_its_parent_fails(
    make_tree: TreeFactory,
) -> None:
    schema = {
        "type": "object",
        "properties": {
            "db": {"type": "object", "maxProperties": 1, "not": {"required": ["legacy"]}},
            "svc": {"enum": ["x"]},
        },
    }
    root = make_tree(
        {
            "schema.json": schema,
            "dev/dev.yml": f"db:\n  host: h\n  password: {SECRET}\n  legacy: 1\n"
            f"svc:\n  token: {SECRET}\n",
        }
    )
    tree = EnvironmentTree(root)
    config = tree.resolve("dev")

    found = tree.problems(config)
    with pytest.raises(SchemaError) as caught:
        tree.validate(config)

    keys = {p.key for p in found}
    assert {"db", "db.password", "svc", "svc.token"} <= keys
    assert_secret_absent(found, caught.value)


def test_a_wrong_type_under_a_secret_key_does_not_show_the_value(
    make_tree: TreeFactory,
) -> None:
    _, tree = tree_with(make_tree, {"dev/overrides/n.yml": "db:\n  password: 987654321\n"})

    (problem,) = problems_of(tree, "dev", overrides=["n"])

    assert problem.key == "db.password"
    assert "987654321" not in str(problem)


# -- the schema file -----------------------------------------------------------------------


def test_without_a_schema_only_plain_secrets_are_checked(make_tree: TreeFactory) -> None:
    root = make_tree({"dev/dev.yml": "anything: [goes]\nworkers: many\n"})
    tree = EnvironmentTree(root)

    assert tree.schema() is None
    assert tree.problems(tree.resolve("dev")) == []


def test_a_schema_that_is_not_json_is_a_problem_at_its_line(make_tree: TreeFactory) -> None:
    root = make_tree({"dev/dev.yml": "a: 1\n"})
    (root / "schema.json").write_text('{\n  "type": "object",\n  oops\n}\n')

    with pytest.raises(TreeError) as caught:
        EnvironmentTree(root).schema()

    (problem,) = caught.value.problems
    assert (problem.source, problem.line) == (str(root / "schema.json"), 3)


def test_a_schema_that_breaks_the_meta_schema_is_a_problem(make_tree: TreeFactory) -> None:
    root = make_tree({"dev/dev.yml": "a: 1\n", "schema.json": {"type": 5}})

    with pytest.raises(TreeError) as caught:
        EnvironmentTree(root).schema()

    assert "not a valid JSON Schema" in str(caught.value)


def test_an_edited_schema_is_read_again(make_tree: TreeFactory) -> None:
    root, tree = tree_with(make_tree, {})
    config = tree.resolve("dev")
    assert tree.problems(config) == []

    stricter = {**SMALL_SCHEMA, "required": ["app", "cache"]}
    make_tree({"schema.json": stricter})
    touch_later(root / "schema.json")

    assert [p.message for p in tree.problems(config)] == ["missing required key 'cache'"]


def test_check_reports_schema_problems_of_every_stream_once(make_tree: TreeFactory) -> None:
    root, tree = tree_with(
        make_tree,
        {
            "dev/dev.yml": GOOD_ENV.replace("workers: 2", "workers: two"),
            "dev/overrides/a.yml": "app:\n  level: debug\n",
            "tenants/acme/tenant.yml": "tenant: acme\nenvironments:\n  dev: {overrides: [a]}\n",
        },
    )

    report = tree.check()

    # The same bad line is in three streams (dev, dev+a, acme/dev): reported once.
    assert [str(p) for p in report.problems] == [
        f"{where(root / 'dev/dev.yml', 3)}: app.workers: expected integer, got string"
    ]
    assert not report.ok
