"""`extends:` chains: parents below children, cycles and missing parents reported."""

from __future__ import annotations

import pytest

from configbus.errors import TreeError
from configbus.tree.layer import LayerKind
from configbus.tree.tree import EnvironmentTree

from .helpers import TreeFactory, line_of


def test_a_child_extends_its_parent_and_wins(make_tree: TreeFactory) -> None:
    root = make_tree(
        {
            "common/base.yml": """
                app:
                  name: api
                  workers: 2
                  limits: {cpu: 1, memory: 512}
                only_in_base: true
                """,
            "dev/dev.yml": """
                extends: ../common/base.yml
                app:
                  workers: 8
                  limits: {memory: 1024}
                """,
        }
    )

    config = EnvironmentTree(root).resolve("dev")

    assert config.to_dict() == {
        "app": {"name": "api", "workers": 8, "limits": {"cpu": 1, "memory": 1024}},
        "only_in_base": True,
    }
    assert "extends" not in config
    assert "extends" not in config.to_dict()
    assert [(layer.kind, layer.source) for layer in config.layers] == [
        (LayerKind.BASE, str(root / "common/base.yml")),
        (LayerKind.ENVIRONMENT, str(root / "dev/dev.yml")),
    ]


def test_a_chain_of_five_files_stacks_oldest_ancestor_lowest(make_tree: TreeFactory) -> None:
    files = {
        "common/l4.yml": "who: l4\nl4: 4\n",
        "common/l3.yml": "extends: l4.yml\nwho: l3\nl3: 3\n",
        "common/l2.yml": "extends: ./l3.yml\nwho: l2\nl2: 2\n",
        "shared/l1.yml": "extends: ../common/l2.yml\nwho: l1\nl1: 1\n",
        "dev/dev.yml": "extends: ../shared/l1.yml\nwho: dev\n",
    }
    root = make_tree(files)

    config = EnvironmentTree(root).resolve("dev")

    assert config.to_dict() == {"who": "dev", "l1": 1, "l2": 2, "l3": 3, "l4": 4}
    assert [layer.source for layer in config.layers] == [
        str(root / name)
        for name in ("common/l4.yml", "common/l3.yml", "common/l2.yml", "shared/l1.yml")
    ] + [str(root / "dev/dev.yml")]
    assert [layer.kind for layer in config.layers] == [LayerKind.BASE] * 4 + [LayerKind.ENVIRONMENT]


def test_each_level_overrides_only_what_it_sets(make_tree: TreeFactory) -> None:
    root = make_tree(
        {
            "common/a.yml": "x: {a: 1, b: 1, c: 1, d: 1}\n",
            "common/b.yml": "extends: a.yml\nx: {b: 2, c: 2, d: 2}\n",
            "common/c.yml": "extends: b.yml\nx: {c: 3, d: 3}\n",
            "common/d.yml": "extends: c.yml\nx:\n  d: !delete\n",
            "dev/dev.yml": "extends: ../common/d.yml\n",
        }
    )

    assert EnvironmentTree(root).resolve("dev").get("x") == {"a": 1, "b": 2, "c": 3}


def test_an_override_may_extend_a_file_too(make_tree: TreeFactory) -> None:
    root = make_tree(
        {
            "dev/dev.yml": "x: env\ny: env\nz: env\n",
            "shared/ha.yml": "x: shared\ny: shared\n",
            "dev/overrides/ha.yml": "extends: ../../shared/ha.yml\ny: ha\n",
        }
    )

    config = EnvironmentTree(root).resolve("dev", overrides=["ha"])

    assert config.to_dict() == {"x": "shared", "y": "ha", "z": "env"}
    assert [layer.kind for layer in config.layers] == [
        LayerKind.ENVIRONMENT,
        LayerKind.BASE,
        LayerKind.OVERRIDE,
    ]


def only_problem(root: object, env: str = "dev") -> tuple[str, int | None, str | None, str]:
    with pytest.raises(TreeError) as caught:
        EnvironmentTree(root).resolve(env)  # type: ignore[arg-type]
    (problem,) = caught.value.problems
    return problem.source, problem.line, problem.key, problem.message


def test_a_two_file_cycle_is_reported_at_the_extends_line_that_closes_it(
    make_tree: TreeFactory,
) -> None:
    root = make_tree(
        {
            "dev/dev.yml": "a: 1\nextends: ../common/x.yml\n",
            "common/x.yml": "# x goes back to dev\nb: 2\nextends: ../dev/dev.yml\n",
        }
    )

    source, line, key, message = only_problem(root)

    assert source == str(root / "common/x.yml")
    assert line == line_of(root / "common/x.yml", "extends:")
    assert key == "extends"
    assert "cycle" in message
    assert "dev/dev.yml" in message
    assert "common/x.yml" in message


def test_a_cycle_above_the_environment_file_is_found_too(make_tree: TreeFactory) -> None:
    root = make_tree(
        {
            "dev/dev.yml": "extends: ../common/a.yml\n",
            "common/a.yml": "extends: b.yml\n",
            "common/b.yml": "x: 1\nextends: a.yml\n",
        }
    )

    source, line, key, message = only_problem(root)

    assert (source, line, key) == (str(root / "common/b.yml"), 2, "extends")
    assert "cycle" in message


def test_a_file_extending_itself_is_a_cycle(make_tree: TreeFactory) -> None:
    root = make_tree({"dev/dev.yml": "a: 1\n\nextends: dev.yml\n"})

    source, line, key, message = only_problem(root)

    assert (source, line, key) == (str(root / "dev/dev.yml"), 3, "extends")
    assert "cycle" in message


def test_a_missing_parent_is_reported_at_the_extends_line(make_tree: TreeFactory) -> None:
    root = make_tree(
        {
            "dev/dev.yml": "extends: ../common/base.yml\n",
            "common/base.yml": "a: 1\nextends: nowhere/parent.yml\n",
        }
    )

    source, line, key, message = only_problem(root)

    assert (source, line, key) == (str(root / "common/base.yml"), 2, "extends")
    assert "nowhere/parent.yml" in message
    assert "not found" in message


def test_a_directory_is_not_a_parent_file(make_tree: TreeFactory) -> None:
    root = make_tree({"dev/dev.yml": "extends: ../common\n", "common/base.yml": "a: 1\n"})

    source, line, _, _ = only_problem(root)

    assert (source, line) == (str(root / "dev/dev.yml"), 1)


def test_a_broken_parent_reports_the_parents_own_problem(make_tree: TreeFactory) -> None:
    root = make_tree(
        {"dev/dev.yml": "extends: ../common/base.yml\n", "common/base.yml": "a: 1\na: 2\n"}
    )

    source, line, key, message = only_problem(root)

    assert (source, line, key) == (str(root / "common/base.yml"), 2, "a")
    assert "duplicate" in message
