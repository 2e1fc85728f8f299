"""Scoped secret references: a tenant's own layers (its file, its store values) may name
only its own secrets (``tenants/<tenant>/...``) or those its environment shares with
``shared_secrets:``; names with ``..``, ``.`` or empty segments are refused wherever
they appear. `configbus validate` reports each with its file, line and key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from configbus.cli import main
from configbus.errors import TreeError
from configbus.tree.layer import Layer, LayerKind
from configbus.tree.tree import EnvironmentTree
from configbus.tree.values import SecretRef, freeze

SAMPLE = Path(__file__).resolve().parents[2] / "environments"
TENANT_FILE = "tenants/aurora-records/prod.yml"
OWN = "password: !secret tenants/aurora-records/postgres_password"
KEY = "database.postgresql.password"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return Path(shutil.copytree(SAMPLE, tmp_path / "environments"))


def edit(root: Path, relative: str, old: str, new: str) -> int:
    """Replace `old` by `new` in a file of the tree; the 1-based line it is on."""
    path = root / relative
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {relative}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return text[: text.index(old)].count("\n") + 1


def validate(root: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = main(["validate", "--root", str(root)])
    return code, capsys.readouterr().err.splitlines()


def test_the_sample_tree_keeps_every_reference_in_scope(root: Path) -> None:
    report = EnvironmentTree(root).check()
    assert report.ok, [str(p) for p in report.problems]


def test_a_tenant_layer_naming_the_environments_secret_is_refused_with_its_line(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The attack of the issue: the environment's database password, beside an address
    the tenant layer chooses."""
    line = edit(root, TENANT_FILE, OWN, "password: !secret postgres/app_password")

    code, err = validate(root, capsys)

    assert code == 1
    where = f"{root / TENANT_FILE}:{line}: {KEY}: secret 'postgres/app_password'"
    assert any(where in entry for entry in err), err
    assert any("prod does not share it" in entry for entry in err)


def test_a_name_the_environment_shares_may_be_used_by_its_tenants(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    edit(root, TENANT_FILE, OWN, "password: !secret postgres/app_password")
    prod = root / "prod/prod.yml"
    prod.write_text(
        "shared_secrets: [postgres/app_password]\n" + prod.read_text(encoding="utf-8"),
        encoding="utf-8",
    )

    code, err = validate(root, capsys)

    assert (code, err) == (0, [])
    config = EnvironmentTree(root).resolve("prod", "aurora-records")
    assert config.get(KEY) == SecretRef("postgres/app_password")
    assert "shared_secrets" not in config  # a directive, not a config key


def test_the_environments_own_files_may_name_any_secret(root: Path) -> None:
    """Only tenant layers are scoped: `jwt/signing_key` comes from common/base.yml."""
    config = EnvironmentTree(root).resolve("prod", "aurora-records")
    assert config.get("security.jwt.signing_key") == SecretRef("jwt/signing_key")
    assert EnvironmentTree(root).problems(config) == []


def test_only_an_environments_files_may_share(root: Path) -> None:
    line = edit(root, TENANT_FILE, "application:", "shared_secrets: [postgres/app_password]\n"
                "application:")  # fmt: skip

    with pytest.raises(TreeError) as refused:
        EnvironmentTree(root).resolve("prod", "aurora-records")

    (problem,) = refused.value.problems
    assert (problem.source, problem.line, problem.key) == (
        str(root / TENANT_FILE),
        line,
        "shared_secrets",
    )
    assert "only an environment's files may share" in problem.message


@pytest.mark.parametrize(
    "name", ["tenants/aurora-records/../helix-audio/postgres_password", "a//b", "./a", "a/"]
)
def test_names_with_dot_dot_dot_or_empty_segments_are_refused_at_their_line(
    root: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    line = edit(root, TENANT_FILE, OWN, f"password: !secret {name}")

    code, err = validate(root, capsys)

    assert code == 1
    where = f"{root / TENANT_FILE}:{line}: {KEY}: !secret name {name!r}"
    assert any(entry.startswith(where) for entry in err), err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("shared_secrets: jwt/signing_key\n", "must be a list of secret names"),
        ("shared_secrets: [a/../x]\n", "no empty, '.' or '..' segments"),
    ],
)
def test_a_malformed_share_is_refused(
    root: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    prod = root / "prod/prod.yml"
    prod.write_text(text + prod.read_text(encoding="utf-8"), encoding="utf-8")

    code, err = validate(root, capsys)

    assert code == 1
    assert any(str(prod) + ":1:" in entry and message in entry for entry in err), err


def test_a_store_value_naming_another_tenants_secret_is_refused(root: Path) -> None:
    """A run-time store value (`tenant set` of a reference) is the tenant's own layer
    too: it cannot name helix-audio's password."""
    tree = EnvironmentTree(root)
    store = Layer(
        LayerKind.STORE,
        "aurora-records",
        "redis:configbus:store:aurora-records:prod",
        freeze({"database": {"postgresql": {"password": {
            "$secret": "tenants/helix-audio/postgres_password"}}}}),
    )  # fmt: skip

    problems = tree.problems(tree.resolve("prod", "aurora-records", runtime=[store]))

    assert [(p.source, p.key) for p in problems] == [(store.source, KEY)]
    assert "tenants/helix-audio/postgres_password" in problems[0].message


@pytest.mark.parametrize(
    "name",
    [
        "tenants/aurora-records/../helix-audio/postgres_password",
        "tenants/aurora-records/../../postgres/app_password",
        "tenants/aurora-records/./x",
        "tenants/aurora-records//x",
    ],
)
def test_a_store_value_cannot_climb_out_of_its_namespace(root: Path, name: str) -> None:
    """A store's `$secret` is text no YAML tag checked: its name is held to the same
    rules, so a prefix check cannot be walked past with `..`."""
    tree = EnvironmentTree(root)
    store = Layer(
        LayerKind.STORE,
        "aurora-records",
        "redis:configbus:store:aurora-records:prod",
        freeze({"database": {"postgresql": {"password": {"$secret": name}}}}),
    )

    problems = tree.problems(tree.resolve("prod", "aurora-records", runtime=[store]))

    assert [(p.source, p.key) for p in problems] == [(store.source, KEY)]
    assert "segments" in problems[0].message
