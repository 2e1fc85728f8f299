"""The edges of editing the tree in place (configbus/tree/roundtrip.py) and of the
migrations built on it (configbus/tree/migrate.py): edits refused with a problem naming
the file, line and key (anchors, merge keys, a key already set, a value that does not
convert to the type asked), every value rendered so that YAML 1.1 and 1.2 read it
alike, flow mappings, files that do not read, and a failed write that puts back every
file already written. The common paths: test_promote.py and test_migrate.py."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from configbus.errors import Problem, TreeError
from configbus.tree import roundtrip
from configbus.tree.migrate import (
    apply_migrations,
    load_migrations,
    plan_migrations,
    read_record,
)
from configbus.tree.roundtrip import (
    JsonFile,
    TextFile,
    YamlFile,
    restore_all,
    sha256_text,
    write_all,
)
from configbus.tree.values import DELETE, SecretRef

from .helpers import TreeFactory, line_of


def yaml_file(tmp_path: Path, text: str, name: str = "f.yml") -> YamlFile:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8", newline="")
    return YamlFile.read(path)


def refusal(edit: Callable[[], object]) -> Problem:
    """The one problem of the `TreeError` that `edit` raises."""
    with pytest.raises(TreeError) as caught:
        edit()
    (problem,) = caught.value.problems
    return problem


@pytest.fixture
def failing_replace(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """``os.replace`` onto a path in the returned set fails (a full disk, say); every
    other rename happens."""
    failing: set[str] = set()
    real = os.replace

    def replace(source: Any, target: Any) -> None:
        if os.fspath(target) in failing:
            raise OSError(28, "No space left on device")
        real(source, target)

    monkeypatch.setattr(roundtrip.os, "replace", replace)
    return failing


# -- refusals naming file, line and key -------------------------------------------------


def test_an_edit_through_a_merge_key_is_refused_naming_file_line_and_key(
    tmp_path: Path,
) -> None:
    doc = yaml_file(tmp_path, "base: &base\n  a: 1\nchild:\n  <<: *base\n  c: 2\n")

    problem = refusal(lambda: doc.set(("child", "a"), 5))

    assert problem.source == doc.path
    assert problem.key == "child.a"
    assert problem.line == 2  # where the merged value is written
    assert "merge key (<<): edit the file by hand" in problem.message
    assert doc.text == doc.original
    doc.set(("child", "c"), 5)  # the mapping's own keys stay editable
    assert doc.text == "base: &base\n  a: 1\nchild:\n  <<: *base\n  c: 5\n"


@pytest.mark.parametrize(
    ("edit", "key", "line"),
    [
        pytest.param(lambda doc: doc.set(("x",), 2), "x", 1, id="set-the-anchor"),
        pytest.param(lambda doc: doc.delete(("y",)), "y", 2, id="delete-the-alias"),
    ],
)
def test_an_edit_of_an_anchor_used_elsewhere_is_refused(
    tmp_path: Path, edit: Callable[[YamlFile], object], key: str, line: int
) -> None:
    doc = yaml_file(tmp_path, "x: &v 1\ny: *v\n")

    problem = refusal(lambda: edit(doc))

    assert (problem.source, problem.line, problem.key) == (doc.path, line, key)
    assert problem.message == "is (or holds) a YAML anchor used elsewhere: edit by hand"
    assert doc.text == doc.original


def test_the_anchor_refusal_of_a_nested_key_names_that_key(tmp_path: Path) -> None:
    doc = yaml_file(tmp_path, "a: 0\nbase: &b\n  a: 1\nchild: *b\n")

    problem = refusal(lambda: doc.delete(("base", "a")))

    assert (problem.key, problem.line) == ("base.a", 3)


def test_moving_onto_a_key_already_set_is_refused(tmp_path: Path) -> None:
    doc = yaml_file(tmp_path, "a:\n  b: 1\nc: 2\n")

    problem = refusal(lambda: doc.move(("a", "b"), ("c",)))

    assert (problem.line, problem.key) == (3, "c")
    assert problem.message == "cannot move a.b here: already set"
    assert doc.text == doc.original


def test_an_edit_that_would_change_more_than_its_key_is_refused(tmp_path: Path) -> None:
    """Every edit is parsed back before it is kept: setting ``extends`` would change
    the file's parent, which is no config key."""
    doc = yaml_file(tmp_path, "a: 1\n")
    problem = refusal(lambda: doc.set(("extends",), "../base.yml"))
    assert (problem.key, problem.line) == ("extends", None)
    assert problem.message == "cannot edit in place without changing other keys"
    assert doc.text == doc.original


def test_a_key_that_is_not_at_the_start_of_its_line_is_not_cut_out(tmp_path: Path) -> None:
    doc = yaml_file(tmp_path, "? a\n: 1\nb: 2\n")
    problem = refusal(lambda: doc.delete(("a",)))
    assert (problem.key, problem.line) == ("a", 1)
    assert problem.message == "not at the start of its line"
    assert doc.text == doc.original


def test_a_file_that_is_no_yaml_is_refused_at_its_line(tmp_path: Path) -> None:
    problem = refusal(lambda: yaml_file(tmp_path, "a: [1, 2\nb: 3\n"))
    assert problem.source == str(tmp_path / "f.yml")
    assert problem.message.startswith("YAML syntax error")
    assert problem.line == 2


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "f.yml"
    path.write_bytes(b"a: caf\xe9\n")
    problem = refusal(lambda: YamlFile.read(path))
    assert (problem.source, problem.line) == (str(path), None)
    assert problem.message.startswith("not UTF-8")


def test_a_path_that_cannot_be_read_is_refused(tmp_path: Path) -> None:
    problem = refusal(lambda: YamlFile.read(tmp_path))  # a folder
    assert problem.message == "cannot read: Is a directory"


# -- reading ------------------------------------------------------------------------------


def test_reading_keys_that_are_not_there(tmp_path: Path) -> None:
    doc = yaml_file(tmp_path, "k: v\nm:\n  n: 1\n")
    assert repr(doc) == f"YamlFile({doc.path!r})"
    with pytest.raises(KeyError, match=r"k\.x"):
        doc.get(("k", "x"))  # through a value
    with pytest.raises(KeyError, match="z"):
        doc.get(("z",))
    assert doc.nearest(("z", "y")) == ((), None)
    assert doc.nearest(("m", "n", "o")) == (("m", "n"), 3)
    assert (doc.line(("m",)), doc.line(("q",)), doc.has(("m", "n"))) == (2, None, True)


def test_a_file_that_does_not_exist_reads_as_empty(tmp_path: Path) -> None:
    doc = YamlFile.read(tmp_path / "new.yml")
    assert (doc.original, doc.text, doc.created, doc.changed) == (None, "", True, True)
    assert doc.parsed().data == {}


def test_set_needs_a_key_and_delete_or_move_of_nothing_is_false(tmp_path: Path) -> None:
    doc = yaml_file(tmp_path, "a:\n  b: 1\n")
    with pytest.raises(ValueError, match="needs a key"):
        doc.set((), 1)
    assert doc.delete(()) is False
    assert doc.delete(("a", "x")) is False
    assert doc.delete(("x", "b")) is False
    assert doc.move(("x",), ("y",)) is False
    assert doc.move((), ("y",)) is False
    assert doc.text == doc.original and not doc.changed


# -- values as YAML 1.1 and 1.2 read them alike ------------------------------------------

SCALARS: list[tuple[Any, str]] = [
    (None, "null"),
    (True, "true"),
    (False, "false"),
    (-7, "-7"),
    (1.5, "1.5"),
    (3.0, "3.0"),
    (1e20, "1.0e+20"),
    (-1e-7, "-1.0e-07"),
    ("", '""'),
    ("plain words", "plain words"),
    ("yes", '"yes"'),
    ("off", '"off"'),
    ("1_000", '"1_000"'),
    ("0o17", '"0o17"'),
    ("12:30", '"12:30"'),
    ("~", '"~"'),
    ("- x", '"- x"'),
    ("a: b", '"a: b"'),
    ("a #b", '"a #b"'),
    ("ends:", '"ends:"'),
    (" padded", '" padded"'),
    ("tab\there", '"tab\\there"'),
    ("two\nlines", '"two\\nlines"'),
    ("café", "café"),
    ("bell\x07", '"bell\\u0007"'),
    ("[x]", '"[x]"'),
]


@pytest.mark.parametrize(("value", "text"), SCALARS, ids=[repr(v) for v, _ in SCALARS])
def test_a_scalar_is_written_so_both_yaml_versions_read_it_back(
    tmp_path: Path, value: Any, text: str
) -> None:
    doc = yaml_file(tmp_path, "a: 1\n")
    doc.set(("b",), value)
    assert doc.text == f"a: 1\nb: {text}\n"
    assert yaml.safe_load(doc.text)["b"] == value  # YAML 1.1 (PyYAML)
    from ruamel.yaml import YAML

    assert YAML(typ="safe", pure=True).load(doc.text)["b"] == value  # YAML 1.2


def test_keys_are_quoted_when_they_would_not_read_as_the_same_text(tmp_path: Path) -> None:
    doc = yaml_file(tmp_path, "a: 1\n")
    doc.set(("with space",), 1)
    doc.set(("yes",), 2)
    doc.set(("1",), 3)
    doc.set(("a2", "k:v"), 4)
    assert doc.text == 'a: 1\n"with space": 1\n"yes": 2\n"1": 3\na2:\n  "k:v": 4\n'
    assert yaml.safe_load(doc.text) == {"a": 1, "with space": 1, "yes": 2, "1": 3, "a2": {"k:v": 4}}


def test_the_quoting_of_the_value_replaced_is_kept(tmp_path: Path) -> None:
    doc = yaml_file(tmp_path, "a: 'x'\nb: \"y\"\nc: ['p', 'q']\nd: 'z'\n")
    doc.set(("a",), "it's")
    doc.set(("b",), "plain")
    doc.set(("c",), ("r", "s'"))
    doc.set(("d",), "tab\there")  # no single-quoted form: double quotes
    assert doc.text == "a: 'it''s'\nb: \"plain\"\nc: ['r', 's''']\nd: \"tab\\there\"\n"


def test_tags_and_empty_collections(tmp_path: Path) -> None:
    doc = yaml_file(tmp_path, "a: 1\n")
    doc.set(("s",), SecretRef("db/password"))
    doc.set(("d",), DELETE)
    doc.set(("m",), {})
    doc.set(("l",), ())
    doc.set(("n",), {"inner": {}})
    assert doc.text == "a: 1\ns: !secret db/password\nd: !delete\nm: {}\nl: []\nn:\n  inner: {}\n"


# -- lists and block values ---------------------------------------------------------------

LONG = ("a" * 30,) * 4  # longer than a flow list may be


@pytest.mark.parametrize(
    ("text", "dash"),
    [("a:\n    - 1\n", "    - "), ("a:\n- 1\n", "- "), ("a: 1\n", "  - ")],
    ids=["indented-4", "indentless", "default"],
)
def test_a_long_new_list_is_a_block_indented_as_the_file_indents(
    tmp_path: Path, text: str, dash: str
) -> None:
    doc = yaml_file(tmp_path, text)
    doc.set(("b",), LONG)
    assert doc.text == text + "b:\n" + "".join(f"{dash}{item}\n" for item in LONG)


def test_a_list_keeps_the_style_of_the_list_it_replaces(tmp_path: Path) -> None:
    doc = yaml_file(tmp_path, "flow: [1, 2]\nblock:\n  - 1\n")
    doc.set(("flow",), (3, {"k": 1}))
    doc.set(("block",), (3,))
    assert doc.text == "flow: [3, {k: 1}]\nblock:\n  - 3\n"


def test_a_block_value_replaced_by_a_scalar_and_back(tmp_path: Path) -> None:
    doc = yaml_file(tmp_path, "a:\n  - 1\nb:\n  c: 1\nd: 1\n")
    doc.set(("a",), 3)
    doc.set(("b",), {"x": 1})
    doc.set(("d",), {"e": 1, "f": [{"g": 1}]})
    assert doc.text == "a: 3\nb:\n  x: 1\nd:\n  e: 1\n  f:\n    - {g: 1}\n"


def test_a_block_scalar_is_replaced_whole(tmp_path: Path) -> None:
    doc = yaml_file(tmp_path, "a: |\n  text\n  more\nb: 1\n")
    doc.set(("a",), "short")
    assert doc.text == "a: short\nb: 1\n"


def test_a_value_above_the_key_becomes_its_mapping(tmp_path: Path) -> None:
    doc = yaml_file(tmp_path, "a: 1\nd: !delete\n")
    doc.set(("a", "b", "c"), 1)
    doc.set(("d", "e"), 2)
    assert doc.text == "a:\n  b:\n    c: 1\nd:\n  e: 2\n"


def test_an_empty_or_comment_only_file_gets_its_first_keys(tmp_path: Path) -> None:
    empty = YamlFile.create(tmp_path / "new.yml")
    empty.set(("a", "b"), 1)
    assert empty.text == "a:\n  b: 1\n" and empty.created
    commented = yaml_file(tmp_path, "# only a comment", "c.yml")
    commented.set(("a",), 1)
    assert commented.text == "# only a comment\na: 1\n"


def test_crlf_line_ends_stay(tmp_path: Path) -> None:
    doc = yaml_file(tmp_path, "a: 1\r\nb:\r\n  c: 2\r\n")
    doc.set(("b", "d"), 3)
    doc.delete(("a",))
    assert doc.text == "b:\r\n  c: 2\r\n  d: 3\r\n"


# -- flow mappings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "after"),
    [
        ("a: {b: 1, c: 2}\n", "b", "a: {c: 2}\n"),
        ("a: {b: 1, c: 2}\n", "c", "a: {b: 1}\n"),
        ("a: {b: , c: 1}\n", "c", "a: {b: }\n"),
        ("a: {b: 1}\n", "b", "a: {}\n"),
    ],
    ids=["first", "last", "after-an-empty-value", "only"],
)
def test_deleting_from_a_flow_mapping(tmp_path: Path, text: str, key: str, after: str) -> None:
    doc = yaml_file(tmp_path, text)
    assert doc.delete(("a", key)) is True
    assert doc.text == after


def test_setting_in_a_flow_mapping_stays_on_its_line(tmp_path: Path) -> None:
    doc = yaml_file(tmp_path, "a: {b: 1}\ne: {}\nf: {g: }\n")
    doc.set(("a", "b"), {"c": [1, "x y"]})
    doc.set(("a", "d"), ["a,b", "c"])
    doc.set(("a", "gone"), DELETE)
    doc.set(("e", "k"), 1)
    doc.set(("f", "g"), 3)
    assert doc.text == (
        'a: {b: {c: [1, x y]}, d: ["a,b", c], gone: !delete ""}\ne: {k: 1}\nf: {g: 3 }\n'
    )
    assert yaml_file(tmp_path, doc.text, "again.yml").parsed().data == doc.parsed().data


def test_a_scalar_moves_into_a_flow_mapping(tmp_path: Path) -> None:
    doc = yaml_file(tmp_path, "a: 1  # one\nb: {c: 1}\n")
    assert doc.move(("a",), ("b", "e")) is True
    assert doc.text == "b: {c: 1, e: 1}\n"


def test_a_block_mapping_moves_into_a_flow_mapping(tmp_path: Path) -> None:
    doc = yaml_file(tmp_path, "a:\n  x: 1\n  y: 2\nb: {c: 1}\n")
    assert doc.move(("a",), ("b", "e")) is True
    assert doc.text == "b: {c: 1, e: {x: 1, y: 2}}\n"


def test_delete_keeps_or_prunes_the_mapping_it_empties(tmp_path: Path) -> None:
    kept = yaml_file(tmp_path, "a:\n  b: 1\nc: 2\n")
    kept.delete(("a", "b"))
    assert kept.text == "a: {}\nc: 2\n"
    pruned = yaml_file(tmp_path, "a:\n  b: 1\nc: 2\n", "p.yml")
    pruned.delete(("a", "b"), lambda path: True)
    assert pruned.text == "c: 2\n"


def test_move_takes_the_comments_inside_the_key_along(tmp_path: Path) -> None:
    doc = yaml_file(tmp_path, "a: 1  # why\nb: 2\n")
    doc.move(("a",), ("c", "a"))
    assert doc.text == "b: 2\nc:\n  a: 1  # why\n"


# -- writing, and putting back ------------------------------------------------------------


def test_write_keeps_the_files_mode_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    doc = yaml_file(tmp_path, "a: 1\n")
    os.chmod(doc.path, 0o640)
    doc.set(("a",), 2)
    doc.write()
    assert Path(doc.path).read_text() == "a: 2\n"
    assert stat.S_IMODE(os.stat(doc.path).st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.yml"]


def test_a_failed_write_is_one_problem_and_leaves_the_file_as_it_was(
    tmp_path: Path, failing_replace: set[str]
) -> None:
    doc = yaml_file(tmp_path, "a: 1\n")
    doc.set(("a",), 2)
    failing_replace.add(doc.path)

    problem = refusal(doc.write)

    assert (problem.source, problem.message) == (doc.path, "cannot write: No space left on device")
    assert Path(doc.path).read_text() == "a: 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.yml"]  # the temporary removed


def test_write_all_restores_the_files_written_when_a_later_one_fails(
    tmp_path: Path, failing_replace: set[str]
) -> None:
    first = yaml_file(tmp_path, "a: 1\n", "first.yml")
    first.set(("a",), 2)
    created = YamlFile.create(tmp_path / "created.yml", "b: 1\n")
    untouched = yaml_file(tmp_path, "u: 1\n", "untouched.yml")
    last = yaml_file(tmp_path, "c: 1\n", "last.yml")
    last.set(("c",), 2)
    failing_replace.add(last.path)

    with pytest.raises(TreeError, match="cannot write"):
        write_all([first, created, untouched, last])

    assert (tmp_path / "first.yml").read_text() == "a: 1\n"
    assert not (tmp_path / "created.yml").exists()
    assert (tmp_path / "last.yml").read_text() == "c: 1\n"


def test_write_all_writes_only_what_changed(tmp_path: Path) -> None:
    changed = yaml_file(tmp_path, "a: 1\n", "changed.yml")
    changed.set(("a",), 2)
    same = yaml_file(tmp_path, "b: 1\n", "same.yml")
    assert write_all([changed, same]) == [changed]


def test_restore_all_tries_every_file_then_raises(
    tmp_path: Path, failing_replace: set[str]
) -> None:
    stuck = TextFile(tmp_path / "stuck.yml", "old\n", "new\n")
    stuck.write()
    other = TextFile(tmp_path / "other.yml", "was\n", "now\n")
    other.write()
    failing_replace.add(stuck.path)

    with pytest.raises(TreeError) as caught:
        restore_all([stuck, other])

    assert [p.source for p in caught.value.problems] == [stuck.path]
    assert (tmp_path / "other.yml").read_text() == "was\n"  # tried after the failure
    assert (tmp_path / "stuck.yml").read_text() == "new\n"


def test_a_file_created_then_restored_is_removed_even_when_already_gone(tmp_path: Path) -> None:
    created = TextFile.rewrite(tmp_path / "new.txt", "x\n")
    assert created.created and created.changed
    created.restore()  # never written: nothing to remove, no error
    created.write()
    created.restore()
    assert not (tmp_path / "new.txt").exists()


def test_sha256_text() -> None:
    assert sha256_text(None) is None
    assert sha256_text("") == (
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )


# -- JSON files ---------------------------------------------------------------------------


def json_file(tmp_path: Path, text: str | None) -> JsonFile:
    path = tmp_path / "schema.json"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    return JsonFile.read(path)


def test_json_that_does_not_parse_is_refused_at_its_line(tmp_path: Path) -> None:
    problem = refusal(lambda: json_file(tmp_path, '{\n  "a": 1,\n'))
    assert problem.line == 3 and problem.message.startswith("invalid JSON: ")


def test_json_keeps_its_indentation_and_escapes(tmp_path: Path) -> None:
    doc = json_file(tmp_path, '{\n    "a": "\\u00e9"\n}\n')
    doc.data["c"] = "é"
    assert doc.render() == '{\n    "a": "\\u00e9",\n    "c": "\\u00e9"\n}\n'


def test_json_lines_the_edit_did_not_touch_keep_their_layout(tmp_path: Path) -> None:
    doc = json_file(tmp_path, '{\n  "a":1,\n  "b": 2\n}\n')
    doc.data["b"] = 3
    assert doc.render() == '{\n  "a":1,\n  "b": 3\n}\n'
    assert doc.changed


def test_json_unchanged_renders_as_it_was(tmp_path: Path) -> None:
    text = '{"a": 1,   "b": [1,2]}\n'
    doc = json_file(tmp_path, text)
    assert (doc.render(), doc.text, doc.changed) == (text, text, False)


def test_json_file_that_does_not_exist_is_created(tmp_path: Path) -> None:
    doc = json_file(tmp_path, None)
    assert (doc.data, doc.changed, doc.render()) == ({}, True, "{}\n")
    doc.data["x"] = 1
    doc.write()
    assert (tmp_path / "schema.json").read_text() == '{\n  "x": 1\n}\n'


def test_json_line_of_a_key(tmp_path: Path) -> None:
    doc = json_file(tmp_path, '{\n  "a": {\n    "b": 1\n  },\n  "c": [1]\n}\n')
    assert doc.line(["a", "b"]) == 3
    assert doc.line(["a", "z"]) is None
    assert doc.line(["a", "b", "c"]) is None  # through a value
    assert doc.line(["c", "0"]) is None  # lists are not walked
    doc.data["z"] = {"y": 1}
    assert doc.line(["z", "y"]) == 9  # in the text as it reads now (c's list unfolded)


# -- migrations: retype -------------------------------------------------------------------


def migration(root: Path, text: str, name: str = "0001_change.yml") -> Path:
    folder = root / "migrations"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def retyped(make_tree: TreeFactory, value: str, to: str, key: str = "v") -> Any:
    root = make_tree({"dev/dev.yml": f"a:\n  {key}: {value}\n"})
    migration(root, f"operations:\n  - retype: {{key: a.{key}, to: {to}}}\n")
    apply_migrations(root)
    return yaml.safe_load((root / "dev/dev.yml").read_text())["a"][key]


@pytest.mark.parametrize(
    ("value", "to", "expected"),
    [
        ('"42"', "int", 42),
        ("3.0", "int", 3),
        ("-5", "int", -5),
        ('" 1.5 "', "float", 1.5),
        ("1", "float", 1.0),
        ('"1e3"', "float", 1000.0),
        ('"Yes"', "bool", True),
        ("0", "bool", False),
        ("true", "bool", True),
        ("1.5", "str", "1.5"),
        ("false", "str", "false"),
        ("7", "str", "7"),
        ("x", "list", ["x"]),
        ("[1, 2]", "list", [1, 2]),
        ("null", "int", None),
    ],
)
def test_retype_converts_each_type(
    make_tree: TreeFactory, value: str, to: str, expected: Any
) -> None:
    found = retyped(make_tree, value, to)
    assert found == expected and type(found) is type(expected)


@pytest.mark.parametrize(
    ("value", "to", "why"),
    [
        ('"abc"', "int", "'abc' is not a whole number"),
        ("1.5", "int", "1.5 is not a whole number"),
        ("true", "int", "True is not a number"),
        ("{b: 1}", "int", "a mapping is not one value"),
        ('"x"', "float", "'x' is not a number"),
        ('".inf"', "float", "'.inf' is not a number"),
        ("true", "float", "True is not a number"),
        ('"maybe"', "bool", "'maybe' is not true or false"),
        ("2", "bool", "2 is not true or false"),
        ("[1]", "str", "a list is not one value"),
        ("{b: 1}", "list", "a mapping is not a list"),
        ("!secret db/password", "str", "a secret reference cannot change type"),
    ],
)
def test_a_value_that_does_not_convert_is_refused_naming_layer_and_migration(
    make_tree: TreeFactory, value: str, to: str, why: str
) -> None:
    root = make_tree({"dev/dev.yml": f"# the value\na:\n  v: {value}\n"})
    path = migration(root, f"description: d\noperations:\n  - retype: {{key: a.v, to: {to}}}\n")
    before = (root / "dev/dev.yml").read_text()

    for attempt in (plan_migrations, apply_migrations):
        problem = refusal(lambda attempt=attempt: attempt(root))  # type: ignore[misc]
        assert problem.source == str(root / "dev/dev.yml")
        assert (problem.line, problem.key) == (3, "a.v")
        assert problem.message == f"retype to {to}: {why} (migrations/{path.name}:3)"

    assert (root / "dev/dev.yml").read_text() == before
    assert read_record(root) == ()


def test_a_value_under_a_secrets_name_is_not_shown_when_it_does_not_convert(
    make_tree: TreeFactory,
) -> None:
    root = make_tree({"dev/dev.yml": "db:\n  password: hunter2\n"})
    migration(root, "operations:\n  - retype: {key: db.password, to: int}\n")
    problem = refusal(lambda: plan_migrations(root))
    assert "hunter2" not in str(problem)
    assert "the value (under a secret's key name) is not a whole number" in problem.message


def test_retype_leaves_a_delete_marker_and_an_equal_value_alone(make_tree: TreeFactory) -> None:
    root = make_tree({"dev/dev.yml": "a:\n  v: 1\n", "dev/overrides/o.yml": "a:\n  v: !delete\n"})
    migration(root, "operations:\n  - retype: {key: a.v, to: int}\n")
    (plan,) = plan_migrations(root).pending
    assert [op.edits for op in plan.operations] == [()]


# -- migrations: the schema ---------------------------------------------------------------


def schema_tree(
    make_tree: TreeFactory, properties: dict[str, Any], layer: str = "x: 1\n", **more: Any
) -> Path:
    schema = {"type": "object", "properties": properties, **more}
    return make_tree({"dev/dev.yml": layer, "schema.json": schema})


@pytest.mark.parametrize(
    ("operation", "why"),
    [
        ("retype: {key: db.port, to: int}", "db.port is defined through $ref"),
        ("delete: {key: db.port}", "db is defined through $ref"),
    ],
)
def test_a_schema_property_behind_ref_is_left_to_a_person(
    make_tree: TreeFactory, operation: str, why: str
) -> None:
    root = schema_tree(
        make_tree,
        {"db": {"$ref": "#/$defs/db"}},
        **{"$defs": {"db": {"type": "object", "properties": {"port": {"type": "string"}}}}},
    )
    root_schema = root / "schema.json"
    if operation.startswith("retype"):  # the property itself is a $ref
        root_schema.write_text(
            '{"type": "object", "properties": {"db": {"type": "object", "properties": '
            '{"port": {"$ref": "#/$defs/port"}}}}, "$defs": {"port": {"type": "string"}}}\n'
        )
    migration(root, f"operations:\n  - {operation}\n")

    problem = refusal(lambda: plan_migrations(root))

    assert problem.source == str(root_schema)
    assert problem.message.startswith(why)
    assert problem.message.endswith(": edit the schema by hand")


def test_a_property_a_condition_names_cannot_be_moved_out_or_deleted(
    make_tree: TreeFactory,
) -> None:
    root = schema_tree(
        make_tree,
        {"a": {"type": "object", "properties": {"k": {"type": "string"}}}},
        **{"if": {"required": ["a"]}, "then": {"required": ["x"]}},
    )
    migration(root, "operations:\n  - delete: {key: a}\n")
    assert "a condition of its object" in refusal(lambda: plan_migrations(root)).message


def test_a_schema_rename_follows_required_and_dependent_required(
    make_tree: TreeFactory,
) -> None:
    root = schema_tree(
        make_tree,
        {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "a: 1\nb: 2\n",
        required=["a"],
        dependentRequired={"b": ["a"]},
    )
    migration(root, "operations:\n  - rename: {from: a, to: c}\n")
    apply_migrations(root)
    schema = yaml.safe_load((root / "schema.json").read_text())
    assert list(schema["properties"]) == ["c", "b"]
    assert schema["required"] == ["c"]
    assert schema["dependentRequired"] == {"b": ["c"]}
    assert (root / "dev/dev.yml").read_text() == "c: 1\nb: 2\n"


def test_a_schema_move_takes_the_required_entry_and_makes_the_new_parent(
    make_tree: TreeFactory,
) -> None:
    root = schema_tree(
        make_tree, {"a": {"type": ["integer", "null"]}, "x": {}}, "a: 1\nx: 2\n", required=["a"]
    )
    migration(
        root,
        "operations:\n  - move: {from: a, to: limits.a}\n  - retype: {key: limits.a, to: float}\n",
    )
    apply_migrations(root)
    schema = yaml.safe_load((root / "schema.json").read_text())
    assert "required" not in schema or "a" not in schema["required"]
    limits = schema["properties"]["limits"]
    assert limits["required"] == ["a"]
    assert limits["properties"]["a"] == {"type": ["number", "null"]}
    assert yaml.safe_load((root / "dev/dev.yml").read_text()) == {"x": 2, "limits": {"a": 1.0}}


def test_a_schema_move_onto_an_existing_property_is_refused(make_tree: TreeFactory) -> None:
    root = schema_tree(
        make_tree,
        {"a": {"type": "integer"}, "b": {"type": "object", "properties": {"a": {}}}},
    )
    migration(root, "operations:\n  - move: {from: a, to: b.a}\n")
    problem = refusal(lambda: plan_migrations(root))
    assert problem.message.startswith("'a' is already a property there")


# -- migrations: the files and the record -------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty: list operations"),
        ("description: d\n", "missing key operations: [...]"),
        ("operations: []\n", "must list operations: rename, move, delete, retype"),
        ("description: [x]\noperations:\n  - delete: {key: a}\n", "must be text"),
        ("extra: 1\noperations:\n  - delete: {key: a}\n", "unknown key (allowed: description"),
        ("- nothing\n", "must be one operation"),
        ("- copy: {from: a, to: b}\n", "unknown operation 'copy'"),
        ("- delete: a\n", "must be a mapping: {key: ...}"),
        ("- delete: {key: a, why: b}\n", "unknown field 'why' (delete takes key)"),
        ("- delete: {key: [a]}\n", "must be a dotted key"),
        ("- rename: {from: a}\n", "missing field 'to'"),
        ("- delete: {key: a..b}\n", "'a..b': empty key part"),
        ("- delete: {key: extends}\n", "extends is a directive of the files"),
        ("- retype: {key: a, to: date}\n", "unknown type 'date'"),
        ("- move: {from: a, to: a}\n", "from and to are the same key"),
        ("- move: {from: a, to: a.b}\n", "cannot move a key inside itself"),
        ("- rename: {from: a.b, to: c.b}\n", "rename changes only the last part"),
        ("- delete: {key: a\n", "YAML syntax error"),
    ],
)
def test_a_malformed_migration_is_refused_naming_its_file(
    make_tree: TreeFactory, text: str, message: str
) -> None:
    root = make_tree({"dev/dev.yml": "a: 1\n"})
    path = migration(root, text)
    problem = refusal(lambda: load_migrations(root))
    assert problem.source == str(path)
    assert message in problem.message


def test_migration_names_and_numbers(make_tree: TreeFactory) -> None:
    root = make_tree({"dev/dev.yml": "a: 1\n"})
    assert load_migrations(root) == ()  # no migrations/ folder
    ok = "operations:\n  - delete: {key: a}\n"
    migration(root, ok, "0001_one.yml")
    migration(root, ok, "0001_again.yml")
    migration(root, ok, "1_short.yml")
    migration(root, "# not a migration", ".hidden.yml")
    (root / "migrations" / "README.md").write_text("notes")

    with pytest.raises(TreeError) as caught:
        load_migrations(root)

    messages = sorted((Path(p.source).name, p.message[:28]) for p in caught.value.problems)
    assert messages == [
        ("0001_one.yml", "number 1 is taken by 0001_ag"),
        ("1_short.yml", "a migration's name is NNNN_d"),
    ]


def test_a_migration_that_is_not_utf8_is_refused(make_tree: TreeFactory) -> None:
    root = make_tree({"dev/dev.yml": "a: 1\n"})
    path = migration(root, "")
    path.write_bytes(b"operations:\n  - delete: {key: caf\xe9}\n")
    assert refusal(lambda: load_migrations(root)).message.startswith("cannot read: ")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("applied: {a: 1}\n", "must be a list of migrations"),
        ("applied:\n  - id: x\n", "must have id, checksum, applied_at (text) and files"),
        ("applied:\n  - {id: x, checksum: c, applied_at: t, files: [1]}\n", "must have id"),
        ("applied: [\n", "not valid YAML"),
    ],
)
def test_a_malformed_record_is_refused(make_tree: TreeFactory, text: str, message: str) -> None:
    root = make_tree({"dev/dev.yml": "a: 1\n", "migrations/applied.yml": text})
    problem = refusal(lambda: read_record(root))
    assert problem.source == str(root / "migrations/applied.yml")
    assert message in problem.message


def test_an_empty_record_is_no_migration(make_tree: TreeFactory) -> None:
    root = make_tree({"dev/dev.yml": "a: 1\n", "migrations/applied.yml": "# nothing yet\n"})
    assert read_record(root) == ()


def test_a_migration_recorded_but_gone_is_an_error(make_tree: TreeFactory) -> None:
    root = make_tree({"dev/dev.yml": "a: 1\n"})
    path = migration(root, "operations:\n  - delete: {key: a}\n")
    apply_migrations(root)
    path.unlink()
    problem = refusal(lambda: plan_migrations(root))
    assert problem.message == (
        "0001_change is recorded as applied but migrations/0001_change.yml is gone"
    )


def test_a_failed_write_puts_every_file_back_and_records_nothing(
    make_tree: TreeFactory, failing_replace: set[str]
) -> None:
    """The migration changes three layers; the write of the second one fails: the
    first is put back, and applied.yml is not written."""
    root = make_tree(
        {
            "common/base.yml": "a:\n  old: 1\n",
            "dev/dev.yml": "a:\n  old: 2  # dev's\n",
            "prod/prod.yml": "a:\n  old: 3\n",
        }
    )
    migration(root, "operations:\n  - rename: {from: a.old, to: a.new}\n")
    before = {p: p.read_bytes() for p in root.rglob("*.yml")}
    failing_replace.add(str(root / "dev" / "dev.yml"))

    problem = refusal(lambda: apply_migrations(root))

    assert problem.source == str(root / "dev" / "dev.yml")
    assert problem.message == "cannot write: No space left on device"
    assert {p: p.read_bytes() for p in root.rglob("*.yml")} == before
    assert not (root / "migrations" / "applied.yml").exists()
    failing_replace.clear()
    result = apply_migrations(root)  # and nothing is half done: it applies as a whole
    assert len(result.applied) == 1
    assert "new: 2  # dev's" in (root / "dev" / "dev.yml").read_text()
    assert line_of(root / "dev" / "dev.yml", "new:") == 2
