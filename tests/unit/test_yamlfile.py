"""Reading one YAML file: values, tags, lines of keys, and every problem at its line."""

from __future__ import annotations

import textwrap

import pytest

from configbus.errors import Problem, TreeError
from configbus.tree.tree import EnvironmentTree
from configbus.tree.values import DELETE, SecretRef
from configbus.tree.yamlfile import ParsedFile, parse_yaml

from .helpers import TreeFactory

SOURCE = "some/dir/file.yml"


def parse(text: str) -> ParsedFile:
    return parse_yaml(SOURCE, textwrap.dedent(text).lstrip("\n"))


def problems(text: str) -> list[Problem]:
    with pytest.raises(TreeError) as caught:
        parse(text)
    assert all(p.source == SOURCE for p in caught.value.problems)
    return list(caught.value.problems)


def only_problem(text: str) -> Problem:
    found = problems(text)
    assert len(found) == 1, [str(p) for p in found]
    return found[0]


# -- values --------------------------------------------------------------------------------


def test_values_and_the_line_of_every_key() -> None:
    parsed = parse(
        """
        app:
          name: api
          ports: [80, 443]
          hosts:
            - a
            - b
        """
    )

    assert parsed.data == {"app": {"name": "api", "ports": (80, 443), "hosts": ("a", "b")}}
    assert parsed.lines[("app",)] == 1
    assert parsed.lines[("app", "name")] == 2
    assert parsed.lines[("app", "ports")] == 3
    assert parsed.lines[("app", "hosts")] == 4
    assert parsed.extends is None


def test_tags_make_secret_references_and_delete_markers() -> None:
    parsed = parse(
        """
        db:
          password: !secret postgres/app_password
          legacy: !delete
        gone: !delete
        """
    )

    assert parsed.data["db"]["password"] == SecretRef("postgres/app_password")
    assert parsed.data["db"]["legacy"] is DELETE
    assert parsed.data["gone"] is DELETE


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing but a comment\n", "   \n# x\n"])
def test_an_empty_file_is_an_empty_layer(text: str) -> None:
    parsed = parse_yaml(SOURCE, text)

    assert dict(parsed.data) == {}
    assert dict(parsed.lines) == {}


def test_timestamps_stay_the_strings_they_were_written_as() -> None:
    parsed = parse("day: 2024-01-02\nat: 2024-01-02T10:00:00Z\n")

    assert parsed.data == {"day": "2024-01-02", "at": "2024-01-02T10:00:00Z"}


def test_extends_is_taken_out_of_the_data_with_its_line() -> None:
    parsed = parse("# a comment\nextends: ../common/base.yml\na: 1\n")

    assert parsed.extends == "../common/base.yml"
    assert parsed.extends_line == 2
    assert "extends" not in parsed.data
    assert ("extends",) not in parsed.lines


@pytest.mark.parametrize("value", ["5", '""', "[a.yml]", "!delete"])
def test_extends_must_be_a_file_path(value: str) -> None:
    problem = only_problem(f"a: 1\nextends: {value}\n")

    assert (problem.line, problem.key) == (2, "extends")


def test_anchors_and_aliases_work() -> None:
    parsed = parse(
        """
        defaults: &defaults
          retries: 3
        a: *defaults
        """
    )

    assert parsed.data["a"] == {"retries": 3}


def test_a_merge_key_brings_in_an_anchor_and_keys_written_beside_it_win() -> None:
    # YAML merge keys: the keys written in the mapping override the merged ones.
    parsed = parse(
        """
        base: &base
          host: db
          port: 5432
        replica:
          <<: *base
          port: 5433
        """
    )

    assert parsed.data["replica"] == {"host": "db", "port": 5433}
    assert parsed.data["base"] == {"host": "db", "port": 5432}


def test_a_merge_key_over_a_list_lets_the_first_mapping_win() -> None:
    parsed = parse(
        """
        one: &one {level: info, first_only: 1}
        two: &two {level: debug, second_only: 2}
        both:
          <<: [*one, *two]
        """
    )

    assert parsed.data["both"] == {"level": "info", "first_only": 1, "second_only": 2}


def test_a_duplicate_key_beside_a_merge_key_is_still_a_duplicate() -> None:
    problem = only_problem(
        """
        base: &base {host: db}
        replica:
          <<: *base
          port: 1
          port: 2
        """
    )

    assert (problem.line, problem.key) == (5, "replica.port")


# -- problems, each at its line ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("a: 1\nb: [1, 2\nc: 3\n", 3),  # unclosed flow list, noticed on the next line
        ("a: 1\n\tb: 2\n", 2),  # a tab as indentation
        ("a: 1\nb: c: d\n", 2),
        ("a: 1\nb: *nowhere\n", 2),  # undefined alias
        ("a: 1\n---\nb: 2\n", 2),  # a second document
    ],
)
def test_a_syntax_error_is_one_problem_at_its_line(text: str, line: int) -> None:
    problem = only_problem(text)

    assert problem.line == line
    assert problem.message.startswith("YAML syntax error")
    assert "\n" not in str(problem)


@pytest.mark.parametrize(
    ("text", "kind"),
    [("- a\n- b\n", "a list"), ("just some words\n", "a single value"), ("42\n", "a single value")],
)
def test_the_top_level_must_be_a_mapping(text: str, kind: str) -> None:
    problem = only_problem(text)

    assert problem.line == 1
    assert "top level must be a mapping" in problem.message
    assert kind in problem.message


def test_a_duplicate_key_is_reported_at_the_second_and_names_the_first() -> None:
    problem = only_problem(
        """
        db:
          host: a
          port: 1
          host: b
        """
    )

    assert problem.line == 4
    assert problem.key == "db.host"
    assert "duplicate key" in problem.message
    assert "line 2" in problem.message


def test_every_problem_of_a_file_is_reported_together() -> None:
    found = problems(
        """
        a:
          b: 1
          b: 2
        c: !env HOME
        c: 3
        d: !secret Not A Name
        """
    )

    assert sorted((p.line, p.key) for p in found) == [
        (3, "a.b"),
        (4, "c"),
        (5, "c"),
        (6, "d"),
    ]


@pytest.mark.parametrize(
    ("text", "line", "shown"),
    [
        ("on: push\n", 1, "on"),  # YAML 1.1 reads `on` as true
        ("a: 1\n1: one\n", 2, "1"),
        ("a:\n  b: 1\n  null: 2\n", 3, "null"),
        ("a:\n  [x, y]: 2\n", 2, "collection"),
    ],
)
def test_a_key_that_is_not_a_string_is_refused(text: str, line: int, shown: str) -> None:
    problem = only_problem(text)

    assert problem.line == line
    assert "not a string" in problem.message
    assert shown in problem.message


def test_an_empty_key_is_refused() -> None:
    assert only_problem('a: 1\n"": 2\n').line == 2


@pytest.mark.parametrize(
    "text",
    ["a: 1\nb: !env HOME\n", "a: 1\nb: !!binary aGVsbG8=\n", "a: 1\nb: !!set {x}\n"],
)
def test_an_unknown_tag_is_refused(text: str) -> None:
    problem = only_problem(text)

    assert (problem.line, problem.key) == (2, "b")
    assert "unsupported YAML tag" in problem.message


@pytest.mark.parametrize(
    "value", ["!secret Upper/Case", "!secret", "!secret [x]", "!secret _leading", "!secret 'a b'"]
)
def test_a_secret_needs_a_proper_name(value: str) -> None:
    problem = only_problem(f"a: 1\nb:\n  c: {value}\n")

    assert (problem.line, problem.key) == (3, "b.c")
    assert "!secret" in problem.message


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        ("a:\n  - 1\n  - !delete\n", 3, "a.1"),
        ("a: [1, !delete ]\n", 1, "a.1"),
        ("a:\n  - x: 1\n    y: !delete\n", 3, "a.0.y"),
    ],
)
def test_delete_cannot_stand_inside_a_list(text: str, line: int, key: str) -> None:
    problem = only_problem(text)

    assert (problem.line, problem.key) == (line, key)
    assert "inside a list" in problem.message


def test_delete_takes_no_value() -> None:
    problem = only_problem("a: 1\nb: !delete yes\n")

    assert (problem.line, problem.key) == (2, "b")


@pytest.mark.parametrize(
    ("value", "kind"), [("!!int abc", "int"), ("!!float abc", "float"), ("!!bool maybe", "bool")]
)
def test_a_standard_tag_with_a_bad_value_is_a_problem_not_a_crash(value: str, kind: str) -> None:
    problem = only_problem(f"a: 1\nsecret_token: {value}\n")

    assert (problem.line, problem.key) == (2, "secret_token")
    assert kind in problem.message
    assert "abc" not in problem.message
    assert "maybe" not in problem.message


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "!!float nan"])
def test_a_number_json_cannot_hold_is_refused(value: str) -> None:
    # Canonical JSON has no infinity or NaN: they would hash and publish as null.
    problem = only_problem(f"a: 1\ntimeout: {value}\n")

    assert (problem.line, problem.key) == (2, "timeout")


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x1b"])
def test_a_control_character_is_one_problem_on_one_line(char: str) -> None:
    problem = only_problem(f"a: 1\nb: x{char}y\n")

    assert problem.line == 2
    assert "\n" not in str(problem)


def test_a_recursive_alias_is_refused() -> None:
    found = problems("x: &a\n  b: 1\n  c: *a\n")

    assert [p.key for p in found] == ["x.c"]
    assert "recursive" in found[0].message


# -- keys with dots ------------------------------------------------------------------------


def test_a_key_holding_dots_is_reachable_by_a_dotted_path(make_tree: TreeFactory) -> None:
    root = make_tree(
        {
            "dev/dev.yml": """
                logging:
                  loggers:
                    uvicorn.access:
                      level: WARNING
                """
        }
    )

    config = EnvironmentTree(root).resolve("dev")

    assert config.get("logging.loggers.uvicorn.access") == {"level": "WARNING"}
    assert config.get("logging.loggers.uvicorn.access.level") == "WARNING"
    assert config["logging.loggers.uvicorn.access.level"] == "WARNING"
    assert "logging.loggers.uvicorn.access" in config
    assert "logging.loggers.uvicorn" not in config
    assert config.origin("logging.loggers.uvicorn.access.level").line == 4  # type: ignore[union-attr]


def test_a_dotted_key_beside_its_own_prefix_is_still_reachable(make_tree: TreeFactory) -> None:
    # Logger hierarchies name both `uvicorn` and `uvicorn.access`.
    root = make_tree(
        {
            "dev/dev.yml": """
                loggers:
                  uvicorn: INFO
                  uvicorn.access: WARNING
                  sqlalchemy:
                    level: ERROR
                  sqlalchemy.engine:
                    level: DEBUG
                """
        }
    )

    config = EnvironmentTree(root).resolve("dev")

    assert config.get("loggers.uvicorn") == "INFO"
    assert config.get("loggers.uvicorn.access") == "WARNING"
    assert config.get("loggers.sqlalchemy.level") == "ERROR"
    assert config.get("loggers.sqlalchemy.engine.level") == "DEBUG"
    assert config.origin("loggers.uvicorn.access").line == 3  # type: ignore[union-attr]
    assert config.get("loggers.sqlalchemy.engine.missing", "d") == "d"


# -- limits ----------------------------------------------------------------------------------


def test_a_value_nested_past_the_depth_limit_is_a_problem_at_its_line() -> None:
    deep = "[" * 300 + "]" * 300
    problem = only_problem(f"name: ok\nitems: {deep}\n")
    assert problem.line == 2
    assert problem.message == "nested deeper than 32 levels (limit depth)"
    assert problem.key is not None and problem.key.startswith("items.0.0")


def test_nesting_up_to_the_depth_limit_is_fine() -> None:
    # The top mapping is level 1; `items` and 30 lists inside it make 32 levels.
    parsed = parse("items: " + "[" * 31 + "1" + "]" * 31 + "\n")
    value: object = parsed.data["items"]
    for _ in range(30):
        assert isinstance(value, tuple)
        value = value[0]
    assert value == (1,)


def test_aliases_that_expand_past_the_value_limit_are_refused_at_once() -> None:
    lines = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for index in range(1, 8):  # 9^8 values, ~43 million, from a few hundred bytes
        name, previous = chr(ord("a") + index), chr(ord("a") + index - 1)
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    text = "\n".join(lines) + "\n"
    assert len(text) < 500
    problem = only_problem(text)
    assert problem.message == "expands to more than 200000 values (limit nodes)"


def test_a_chain_of_merge_keys_is_worked_out_once_per_mapping() -> None:
    """Each mapping merges the one before twice: expanded naively, 40 lines are 2^40
    merges (the daemon froze). Worked out once per mapping, it is 41 small mappings."""
    lines = ["m0: &m0 {k0: 1}"]
    for i in range(1, 41):
        lines.append(f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}], k{i}: {i}}}")
    parsed = parse("\n".join(lines) + "\n")
    last = parsed.data["m40"]
    assert isinstance(last, dict) and len(last) == 41
    assert last["k0"] == 1 and last["k40"] == 40


def test_merged_entries_count_against_the_value_limit() -> None:
    many = ", ".join(f"k{i}: {i}" for i in range(3000))
    lines = [f"base: &base {{{many}}}"]
    lines += [f"copy{i}: {{<<: *base, own: {i}}}" for i in range(70)]  # 210,000 merged
    problem = only_problem("\n".join(lines) + "\n")
    assert problem.message == "expands to more than 200000 values (limit nodes)"
