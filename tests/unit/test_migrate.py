"""`configbus migrate plan | apply`: versioned migrations of the tree's keys, on a copy
of the sample tree."""

from __future__ import annotations

import datetime
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from configbus.cli import main
from configbus.errors import SchemaError, TreeError, display_path
from configbus.tree.migrate import apply_migrations, load_migrations, plan_migrations
from configbus.tree.tree import EnvironmentTree
from configbus.tree.values import walk

from .helpers import line_of, where

SAMPLE = Path(__file__).resolve().parents[2] / "environments"
CANARY = "ml_services.model_management.canary"
ROLLOUT = "ml_services.model_management.rollout"
RENAME = f"operations:\n  - rename: {{from: {CANARY}, to: {ROLLOUT}}}\n"
# Every layer that sets the canary block, and so the files the rename changes.
CANARY_FILES = [
    "common/base.yml",
    "prod/prod.yml",
    "staging/staging.yml",
    "tenants/helix-audio/prod.yml",
    "tenants/helix-audio/staging.yml",
    "tenants/nimbus-fm/prod.yml",
]
NOW = datetime.datetime(2025, 3, 14, 9, 26, 53, tzinfo=datetime.UTC)

pytestmark = pytest.mark.skipif(not SAMPLE.is_dir(), reason="no environments/ folder")

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A copy of the sample tree, with an empty migrations/ folder."""
    copy = Path(shutil.copytree(SAMPLE, tmp_path / "environments"))
    (copy / "migrations").mkdir(exist_ok=True)
    return copy


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    monkeypatch.delenv("CONFIGBUS_ROOT", raising=False)

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        return code, out, err

    return run


def migration(root: Path, name: str, text: str) -> Path:
    path = root / "migrations" / name
    path.write_text(text)
    return path


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def value(root: Path, env: str, tenant: str | None, key: str) -> object:
    config = EnvironmentTree(root).resolve(env, tenant)
    _, found, complete = walk(config.data, tuple(key.split(".")))
    return found if complete else "<absent>"


def schema(root: Path) -> dict[str, object]:
    loaded: dict[str, object] = json.loads((root / "schema.json").read_text())
    return loaded


# -- plan -----------------------------------------------------------------------------------
def test_plan_lists_each_pending_operation_and_every_place_it_changes(root: Path, run: Run) -> None:
    path = migration(root, "0001_canary_is_rollout.yml", RENAME)
    status = plan_migrations(root)

    assert status.applied == () and len(status.pending) == 1
    edits = status.pending[0].operations[0].edits
    assert [e.file for e in edits] == [*CANARY_FILES, "schema.json"]
    base = root / "common/base.yml"
    assert edits[0].line == line_of(base, "    canary:")
    assert edits[-1].line == line_of(root / "schema.json", '"canary": {')
    code, out, _ = run("migrate", "plan", "--root", str(root))
    assert code == 0
    assert "0 applied, 1 pending" in out
    assert f"1. rename {CANARY} -> {ROLLOUT}  ({where(path, 2)})" in out
    assert f"{where(base, line_of(base, '    canary:'))}  {CANARY} -> {ROLLOUT}" in out
    assert run("migrate", "plan", "--check", "--root", str(root))[0] == 1
    written = {"migrations/0001_canary_is_rollout.yml": path.read_bytes()}
    assert snapshot(root) == {**snapshot(SAMPLE), **written}  # a plan writes nothing


# -- apply ----------------------------------------------------------------------------------
def test_a_rename_goes_through_every_layer_and_the_schema(root: Path) -> None:
    before = {f: (root / f).read_text().splitlines() for f in CANARY_FILES}
    values = {
        (env, tenant): value(root, env, tenant, CANARY)
        for env, tenant in [("prod", None), ("prod", "helix-audio"), ("staging", "aurora-records")]
    }
    migration(root, "0001_canary_is_rollout.yml", RENAME)
    result = apply_migrations(root, now=NOW)

    assert [plan.migration.id for plan, _ in result.applied] == ["0001_canary_is_rollout"]
    for name, lines in before.items():  # only the key's own line changed
        after = (root / name).read_text().splitlines()
        changed = [(a, b) for a, b in zip(lines, after, strict=True) if a != b]
        assert [(a.strip(), b.strip()) for a, b in changed] == [("canary:", "rollout:")], name
    for (env, tenant), old in values.items():
        assert value(root, env, tenant, ROLLOUT) == old
        assert value(root, env, tenant, CANARY) == "<absent>"
    ml_services = schema(root)["properties"]["ml_services"]  # type: ignore[index]
    management = ml_services["properties"]["model_management"]  # type: ignore[index]
    assert "rollout" in management["properties"] and "canary" not in management["properties"]
    assert "rollout" in management["required"] and "canary" not in management["required"]
    assert "rollout" in management["then"]["properties"]  # its condition follows the key
    assert EnvironmentTree(root).check().ok


def test_apply_records_each_migration_with_its_checksum_and_files(root: Path, run: Run) -> None:
    path = migration(root, "0001_canary_is_rollout.yml", RENAME)
    apply_migrations(root, now=NOW)

    record = yaml.safe_load((root / "migrations/applied.yml").read_text())
    assert record == {
        "applied": [
            {
                "id": "0001_canary_is_rollout",
                "checksum": "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest(),
                "applied_at": "2025-03-14T09:26:53Z",
                "files": sorted([*CANARY_FILES, "schema.json"]),
            }
        ]
    }
    code, out, _ = run("migrate", "plan", "--root", str(root))
    assert code == 0 and "1 applied, 0 pending" in out


def test_applying_twice_does_nothing(root: Path, run: Run) -> None:
    migration(root, "0001_canary_is_rollout.yml", RENAME)
    assert run("migrate", "apply", "--root", str(root))[0] == 0
    before = snapshot(root)

    code, out, _ = run("migrate", "apply", "--root", str(root))

    assert code == 0 and "nothing to apply" in out
    assert snapshot(root) == before
    assert apply_migrations(root).applied == ()


def test_a_migration_changed_after_it_was_applied_is_an_error(root: Path, run: Run) -> None:
    path = migration(root, "0001_canary_is_rollout.yml", RENAME)
    apply_migrations(root, now=NOW)
    path.write_text(RENAME + "  - delete: {key: test_automation.load}\n")
    migration(root, "0002_more.yml", "- delete: {key: test_automation.load}\n")
    before = snapshot(root)

    code, out, err = run("migrate", "apply", "--root", str(root))

    assert code == 1 and out == ""
    changed = f"{display_path(path)}: changed after it was applied on 2025-03-14T09:26:53Z"
    assert changed in err
    assert snapshot(root) == before  # 0002 was not applied either


def test_migration_file_errors_name_the_file_and_line(root: Path, run: Run) -> None:
    path = migration(
        root,
        "0001_bad.yml",
        "operations:\n"
        "  - rename: {from: a.b}\n"
        "  - copy: {from: a.b, to: a.c}\n"
        "  - retype: {key: a.b, to: integer}\n"
        "  - rename: {from: a.b, to: c.d}\n",
    )
    migration(root, "2_short.yml", "- delete: {key: x}\n")
    before = snapshot(root)

    code, out, err = run("migrate", "plan", "--root", str(root))

    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert f"{where(path, 2)}: operations.0.rename: missing field 'to'" in lines
    assert f"{where(path, 3)}: operations.1: unknown operation 'copy'" in lines[1]
    assert f"{where(path, 4)}: operations.2.retype.to: unknown type 'integer'" in lines[2]
    assert f"{where(path, 5)}: operations.3.rename: rename changes only the last part" in lines[3]
    assert any("2_short.yml: a migration's name is NNNN_description.yml" in line for line in lines)
    assert snapshot(root) == before
    with pytest.raises(TreeError):
        load_migrations(root)


def test_a_value_that_does_not_convert_names_its_file_and_line(root: Path, run: Run) -> None:
    migration(root, "0001_level_as_number.yml", "- retype: {key: logging.level, to: int}\n")
    before = snapshot(root)

    code, _, err = run("migrate", "apply", "--root", str(root))

    base, dev = root / "common/base.yml", root / "dev/dev.yml"
    assert code == 1
    expected = (
        f"{where(base, line_of(base, '  level: INFO'))}: logging.level: retype to int: "
        "'INFO' is not a whole number (migrations/0001_level_as_number.yml:1)"
    )
    assert expected in err.splitlines()
    assert f"{where(dev, line_of(dev, '  level: DEBUG'))}: logging.level:" in err
    assert snapshot(root) == before


def test_retype_converts_the_values_and_the_schema_type(root: Path) -> None:
    retype = "- retype: {key: monitoring.slo.latency_p99_ms, to: float}\n"
    migration(root, "0001_p99_float.yml", retype)
    apply_migrations(root)

    assert "    latency_p99_ms: 1500.0\n" in (root / "common/base.yml").read_text()
    assert value(root, "prod", "helix-audio", "monitoring.slo.latency_p99_ms") == 600.0
    monitoring = schema(root)["properties"]["monitoring"]  # type: ignore[index]
    slo = monitoring["properties"]["slo"]["properties"]  # type: ignore[index]
    assert slo["latency_p99_ms"]["type"] == "number"
    assert EnvironmentTree(root).check().ok


def test_move_across_sections_and_delete(root: Path) -> None:
    quotas = {t: value(root, "prod", t, "tenancy.quotas") for t in ("nimbus-fm", "helix-audio")}
    migration(
        root,
        "0001_limits.yml",
        "description: quotas are limits\n"
        "operations:\n"
        "  - move: {from: tenancy.quotas, to: limits.quotas}\n"
        "  - delete: {key: test_automation.load}\n",
    )
    result = apply_migrations(root)

    plan, record = result.applied[0]
    assert plan.migration.description == "quotas are limits"
    assert "staging/overrides/performance.yml" in record.files  # it set test_automation.load
    for tenant, old in quotas.items():
        assert value(root, "prod", tenant, "limits.quotas") == old
        assert value(root, "prod", tenant, "tenancy.quotas") == "<absent>"
    assert value(root, "staging", "aurora-records", "test_automation.load") == "<absent>"
    properties = schema(root)["properties"]  # type: ignore[index]
    assert "quotas" not in properties["tenancy"]["properties"]  # type: ignore[index]
    assert "quotas" not in properties["tenancy"]["required"]  # type: ignore[index]
    assert properties["limits"]["required"] == ["quotas"]  # type: ignore[index]
    assert "load" not in properties["test_automation"]["properties"]  # type: ignore[index]
    assert EnvironmentTree(root).check().ok


def test_a_tree_that_would_not_validate_is_rolled_back(root: Path, run: Run) -> None:
    # feature flags are snake_case (propertyNames): this rename breaks every stream
    migration(
        root,
        "0001_bad_name.yml",
        "- rename: {from: feature_flags.mood_radio, to: feature_flags.MoodRadio}\n",
    )
    before = snapshot(root)

    with pytest.raises(SchemaError):
        apply_migrations(root)
    code, out, err = run("migrate", "apply", "--root", str(root))

    assert code == 1 and out == ""
    assert "MoodRadio" in err and "migrations rolled back" in err.splitlines()[-1]
    assert snapshot(root) == before
    assert not (root / "migrations/applied.yml").exists()


def test_moving_onto_a_key_a_layer_already_sets_is_refused(root: Path) -> None:
    migration(root, "0001_clash.yml", "- rename: {from: logging.level, to: logging.format}\n")

    with pytest.raises(TreeError) as caught:
        plan_migrations(root)

    base = root / "common/base.yml"
    clash = f"{where(base, line_of(base, '  format: json'))}: logging.format: already set"
    assert str(caught.value).startswith(clash)


def test_a_layer_deleting_the_old_parent_deletes_the_new_place_too(root: Path) -> None:
    # dev.yml deletes messaging.kafka.sasl: the user must stay deleted there once moved
    move = "- move: {from: messaging.kafka.sasl.username, to: messaging.kafka.user}\n"
    migration(root, "0001_user.yml", move)

    edits = plan_migrations(root).pending[0].operations[0].edits

    dev = root / "dev/dev.yml"
    marks = [e for e in edits if e.action == "mark-delete"]
    assert [(e.file, e.key, e.line) for e in marks] == [
        ("dev/dev.yml", "messaging.kafka.user", line_of(dev, "sasl: !delete"))
    ]


def test_a_migration_numbered_before_an_applied_one_is_an_error(root: Path) -> None:
    migration(root, "0002_canary_is_rollout.yml", RENAME)
    apply_migrations(root)
    late = migration(root, "0001_late.yml", "- delete: {key: test_automation.load}\n")

    with pytest.raises(TreeError, match="numbered before 0002_canary_is_rollout") as caught:
        apply_migrations(root)
    assert str(late) in caught.value.problems[0].source


def test_the_tree_ignores_the_migrations_folder(root: Path, run: Run) -> None:
    migration(root, "0001_canary_is_rollout.yml", "- rename: {from: a.b, to: a.c}\n")  # a list
    (root / "migrations/migrations.yml").write_text("not: an environment\n")
    tree = EnvironmentTree(root)

    assert "migrations" not in tree.environments()
    assert tree.check().ok
    assert run("validate", "--root", str(root))[0] == 0


def test_json_output(root: Path, run: Run) -> None:
    migration(root, "0001_canary_is_rollout.yml", RENAME)
    plan = json.loads(run("migrate", "plan", "--json", "--root", str(root))[1])
    applied = json.loads(run("migrate", "apply", "--json", "--root", str(root))[1])

    assert plan["pending"][0]["id"] == "0001_canary_is_rollout"
    assert plan["pending"][0]["operations"][0]["edits"][0]["file"] == "common/base.yml"
    assert applied["applied"][0]["files"] == sorted([*CANARY_FILES, "schema.json"])
    assert applied["record_file"] == "migrations/applied.yml"
