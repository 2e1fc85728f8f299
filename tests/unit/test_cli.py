"""The `configbus` command, called through `configbus.cli.main(argv)`."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from configbus.cli import main
from configbus.errors import display_path
from configbus.tree.tree import EnvironmentTree

from .helpers import SMALL_SCHEMA, TreeFactory, line_of, where

GOOD = {
    "schema.json": SMALL_SCHEMA,
    "common/base.yml": """
        app:
          name: api
          workers: 2
        db:
          host: base-host
          password: !secret db/password
        """,
    "dev/dev.yml": "extends: ../common/base.yml\napp:\n  workers: 3\n",
    "dev/overrides/a.yml": "app:\n  workers: 5\n  level: info\n",
    "dev/overrides/b.yml": "app:\n  workers: 7\n",
    "prod/prod.yml": "extends: ../common/base.yml\ndb:\n  host: prod-host\n",
    "tenants/acme/tenant.yml": """
        tenant: acme
        name: Acme
        environments:
          dev:
            overrides: [a]
          prod: {}
        """,
    "tenants/acme/dev.yml": "app:\n  level: debug\n",
}

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    """Runs the command; returns (exit code, stdout, stderr). Never a traceback."""
    monkeypatch.delenv("CONFIGBUS_ROOT", raising=False)

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        assert "Traceback" not in out
        return code, out, err

    return run


@pytest.fixture
def root(make_tree: TreeFactory) -> Path:
    return make_tree(GOOD)


def error_lines(err: str) -> list[str]:
    """stderr minus the closing summary line of `validate`."""
    return [line for line in err.splitlines() if "problem(s) in" not in line]


# -- validate ------------------------------------------------------------------------------


def test_validate_a_good_tree(run: Run, root: Path) -> None:
    code, out, err = run("validate", "--root", str(root))

    files = len(list(root.rglob("*.yml")))
    # dev, dev+a, dev+b, prod, acme/dev, acme/prod
    assert (code, err) == (0, "")
    assert out.strip() == f"ok: {files} files, 6 streams valid"


def test_validate_quiet_prints_nothing_when_all_is_well(run: Run, root: Path) -> None:
    assert run("validate", "-q", "--root", str(root)) == (0, "", "")


def test_validate_takes_the_root_from_configbus_root(
    run: Run, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONFIGBUS_ROOT", str(root))

    code, out, _ = run("validate")

    assert code == 0
    assert out.startswith("ok:")


def test_validate_with_no_tree_is_a_usage_error(run: Run, tmp_path: Path) -> None:
    code, out, err = run("validate", "--root", str(tmp_path / "nowhere"))

    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1
    assert "nowhere" in err
    assert "no such directory" in err


def test_validate_defaults_to_environments_in_the_working_directory(
    run: Run, make_tree: TreeFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_tree({"dev/dev.yml": "a: 1\n"}, name="environments")
    monkeypatch.chdir(tmp_path)

    code, out, _ = run("validate")

    assert code == 0
    assert out.startswith("ok: 1 files")


BROKEN = [
    pytest.param(
        "dev/dev.yml", "app:\n  name: api\n  workers: [1\n", 4, "YAML syntax", id="syntax"
    ),
    pytest.param("dev/overrides/a.yml", "- a list\n", 1, "top level", id="not-a-mapping"),
    pytest.param("dev/dev.yml", "extends: dev.yml\n", 1, "cycle", id="self-cycle"),
    pytest.param("common/base.yml", "extends: ../dev/dev.yml\n", 1, "cycle", id="cycle"),
    pytest.param("prod/prod.yml", "db: {}\nextends: gone.yml\n", 2, "not found", id="no-parent"),
    pytest.param("dev/overrides/b.yml", "app:\n  workers: x\n", 2, "expected", id="schema"),
    pytest.param("tenants/acme/dev.yml", "app:\n  colour: 1\n", 2, "unknown key", id="unknown-key"),
    pytest.param("dev/dev.yml", "a: 1\na: 2\n", 2, "duplicate", id="duplicate"),
    pytest.param("dev/dev.yml", "a: !!int abc\n", 1, "int", id="bad-int"),
    pytest.param(
        "tenants/acme/tenant.yml",
        "tenant: acme\nenvironments:\n  dev:\n    overrides: [a, turbo]\n",
        4,
        "turbo",
        id="tenant-unknown-override",
    ),
]


@pytest.mark.parametrize(("file", "text", "line", "words"), BROKEN)
def test_validate_reports_each_problem_on_one_line_with_file_and_line(
    run: Run, make_tree: TreeFactory, file: str, text: str, line: int, words: str
) -> None:
    root = make_tree({**GOOD, file: text})

    code, out, err = run("validate", "--root", str(root))

    assert code == 1
    assert out == ""
    lines = error_lines(err)
    assert lines, err
    hits = [x for x in lines if x.startswith(f"{where(root / file, line)}: ")]
    assert hits, err
    assert any(words in hit for hit in hits), err
    # Every line names a file of the tree: no stray continuation lines.
    assert all(x.startswith(display_path(root)) for x in lines), err
    assert err.splitlines()[-1].startswith(f"{len(lines)} problem(s) in ")


def test_validate_reports_all_problems_of_the_tree(run: Run, make_tree: TreeFactory) -> None:
    root = make_tree(
        {
            **GOOD,
            "dev/overrides/a.yml": "app:\n  workers: x\n  level: loud\n",
            "prod/prod.yml": "a: [\n",
        }
    )

    code, _, err = run("validate", "--root", str(root))

    lines = error_lines(err)
    assert code == 1
    assert len(lines) == 3
    assert {x.split(": ")[0] for x in lines} == {
        where(root / "dev/overrides/a.yml", 2),
        where(root / "dev/overrides/a.yml", 3),
        where(root / "prod/prod.yml", 2),
    }


def unreadable_by_mode(path: Path) -> str:
    path.write_text("a: 1\n")
    path.chmod(0)
    return "cannot read"


def a_directory(path: Path) -> str:
    path.unlink()
    path.mkdir()
    (path / "inner.txt").write_text("x")
    return "cannot read"


def not_utf8(path: Path) -> str:
    path.write_bytes(b"app:\n  name: caf\xe9\n")
    return "UTF-8"


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(
            unreadable_by_mode,
            id="chmod-000",
            marks=pytest.mark.skipif(
                os.name != "posix" or os.geteuid() == 0, reason="root reads any file"
            ),
        ),
        pytest.param(a_directory, id="directory"),
        pytest.param(not_utf8, id="not-utf8"),
    ],
)
def test_validate_reports_an_unreadable_file_clearly(
    run: Run, root: Path, spoil: Callable[[Path], str]
) -> None:
    path = root / "dev/overrides/b.yml"
    words = spoil(path)
    try:
        code, _out, err = run("validate", "--root", str(root))
    finally:
        if path.is_file():
            path.chmod(0o644)

    lines = error_lines(err)
    assert code == 1
    assert lines == [x for x in lines if x.startswith(f"{display_path(path)}: ")]
    assert len(set(lines)) == len(lines) >= 1
    assert words in lines[0]


def test_validate_the_shipped_tree(run: Run) -> None:
    shipped = Path(__file__).resolve().parents[2] / "environments"

    code, out, err = run("validate", "--root", str(shipped))

    assert (code, err) == (0, "")
    assert out.startswith("ok:")


# -- render --------------------------------------------------------------------------------


def test_render_prints_the_resolved_config_as_yaml(run: Run, root: Path) -> None:
    code, out, err = run("render", "--root", str(root), "acme", "dev")

    assert (code, err) == (0, "")
    first, _, rest = out.partition("\n")
    assert first.startswith("# acme/dev [a]")
    assert "sha256:" in first
    assert yaml.safe_load(rest) == {
        "app": {"name": "api", "workers": 5, "level": "debug"},
        "db": {"host": "base-host", "password": "<secret:db/password>"},
    }
    assert "$secret" not in out


def test_render_as_json(run: Run, root: Path) -> None:
    code, out, _ = run("render", "--root", str(root), "--format", "json", "acme", "prod")

    assert code == 0
    assert json.loads(out) == {
        "app": {"name": "api", "workers": 2},
        "db": {"host": "prod-host", "password": "<secret:db/password>"},
    }
    assert "$secret" not in out


def test_render_the_hash_in_the_header_is_the_configs(run: Run, root: Path) -> None:
    _, out, _ = run("render", "--root", str(root), "-", "production")

    assert f"sha256:{EnvironmentTree(root).resolve('prod').hash}" in out.splitlines()[0]


def test_render_with_overrides_in_order(run: Run, root: Path) -> None:
    def workers(overrides: str) -> int:
        code, out, _ = run(
            "render", "--root", str(root), "--format", "json", "--overrides", overrides, "-", "dev"
        )
        assert code == 0
        return int(json.loads(out)["app"]["workers"])

    assert workers("a,b") == 7
    assert workers("b,a") == 5
    assert workers(" b , ") == 7
    assert workers("") == 3


def test_render_without_a_tenant(run: Run, root: Path) -> None:
    code, out, _ = run("render", "--root", str(root), "--format", "json", "-", "dev")

    assert code == 0
    assert json.loads(out)["app"] == {"name": "api", "workers": 3}


def test_render_of_an_invalid_stream_fails_with_its_problems(
    run: Run, make_tree: TreeFactory
) -> None:
    root = make_tree({**GOOD, "dev/overrides/b.yml": "app:\n  workers: x\n"})

    code, out, err = run("render", "--root", str(root), "--overrides", "b", "-", "dev")

    assert (code, out) == (1, "")
    assert err.splitlines() == [
        f"{where(root / 'dev/overrides/b.yml', 2)}: app.workers: expected integer, got string"
    ]


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (["render", "acme", "qa"], "qa"),
        (["render", "nobody", "dev"], "nobody"),
        (["render", "--overrides", "a,turbo", "-", "dev"], "turbo"),
        (["render", "acme", "staging"], "staging"),
        (["explain", "acme", "qa", "app.name"], "qa"),
        (["explain", "nobody", "dev", "app.name"], "nobody"),
    ],
)
def test_unknown_names_are_usage_errors(run: Run, root: Path, args: list[str], name: str) -> None:
    code, out, err = run(*args[:1], "--root", str(root), *args[1:])

    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1
    assert name in err


@pytest.mark.parametrize("command", [["render", "-", "dev"], ["explain", "-", "dev", "a"]])
def test_a_missing_root_is_a_usage_error(run: Run, tmp_path: Path, command: list[str]) -> None:
    code, out, err = run(command[0], "--root", str(tmp_path / "nowhere"), *command[1:])

    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1


# -- explain -------------------------------------------------------------------------------


def test_explain_lists_each_layer_lowest_first_and_the_winner(run: Run, root: Path) -> None:
    code, out, err = run("explain", "--root", str(root), "acme", "dev", "app.workers")

    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert "app.workers" in lines[0]
    assert "acme/dev" in lines[0]
    base, env, override = (
        where(root / "common/base.yml", line_of(root / "common/base.yml", "workers")),
        where(root / "dev/dev.yml", 3),
        where(root / "dev/overrides/a.yml", 2),
    )
    assert [line.split()[:2] for line in lines[1:-1]] == [
        ["1.", base],
        ["2.", env],
        ["3.", override],
    ]
    assert [line.split()[-1] for line in lines[1:-1]] == ["2", "3", "5"]
    assert lines[-1] == f"=> 5  from {override}"


def test_explain_a_secret_shows_its_name_only(run: Run, root: Path) -> None:
    code, out, _ = run("explain", "--root", str(root), "-", "dev", "db.password")

    assert code == 0
    assert '"<secret:db/password>"' in out
    assert "$secret" not in out


def test_explain_a_deleted_key(run: Run, make_tree: TreeFactory) -> None:
    root = make_tree({**GOOD, "tenants/acme/dev.yml": "db:\n  host: !delete\n"})

    code, out, err = run("explain", "--root", str(root), "acme", "dev", "db.host")

    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert len(lines) == 4
    assert where(root / "common/base.yml", line_of(root / "common/base.yml", "host:")) in lines[1]
    assert where(root / "tenants/acme/dev.yml", 2) in lines[2]
    assert lines[2].rstrip().endswith("!delete")
    assert "deleted" in lines[3]
    assert lines[3].startswith("=>")


def test_explain_a_key_no_layer_sets(run: Run, root: Path) -> None:
    code, out, err = run("explain", "--root", str(root), "-", "dev", "app.nothing")

    assert (code, out) == (1, "")
    assert len(err.splitlines()) == 1
    assert "app.nothing" in err


# -- usage ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [[], ["render"], ["render", "-"], ["explain", "-", "dev"], ["frobnicate"], ["validate", "-x"]],
)
def test_bad_arguments_exit_with_code_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)

    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err
    assert "Traceback" not in err


def test_render_format_must_be_json_or_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["render", "--format", "toml", "-", "dev"])

    assert caught.value.code == 2
    assert "toml" in capsys.readouterr().err
