"""`configbus promote`: planning and applying staging -> prod on a copy of the sample
tree, and the in-place YAML editor it writes with (configbus.tree.roundtrip)."""

from __future__ import annotations

import difflib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from configbus.cli import main
from configbus.errors import TreeError, display_path
from configbus.tree.promote import apply_promotion, plan_promotion
from configbus.tree.roundtrip import YamlFile
from configbus.tree.tree import EnvironmentTree
from configbus.tree.values import DELETE, walk

from .helpers import line_of, where

SAMPLE = Path(__file__).resolve().parents[2] / "environments"
HELIX_PROD = "tenants/helix-audio/prod.yml"
AURORA_PROD = "tenants/aurora-records/prod.yml"

pytestmark = pytest.mark.skipif(not SAMPLE.is_dir(), reason="no environments/ folder")

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A copy of the sample tree: the tests edit it."""
    return Path(shutil.copytree(SAMPLE, tmp_path / "environments"))


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    monkeypatch.delenv("CONFIGBUS_ROOT", raising=False)

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        return code, out, err

    return run


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def resolved(root: Path, env: str, tenant: str | None, key: str) -> object:
    config = EnvironmentTree(root).resolve(env, tenant)
    _, value, found = walk(config.data, tuple(key.split(".")))
    return value if found else "<absent>"


# -- the plan -------------------------------------------------------------------------------
def test_the_plan_says_per_key_what_changes_and_the_line_the_apply_writes(root: Path) -> None:
    plan = plan_promotion(
        EnvironmentTree(root), "staging", "prod", tenants=["helix-audio"], keys=["ml_services"]
    )
    changes = {c.key: c for c in plan.changes}
    helix = root / HELIX_PROD

    percentage = changes["ml_services.model_management.canary.percentage"]
    assert (percentage.action, percentage.old, percentage.new) == ("changed", 10, 50)
    assert (percentage.file, percentage.write, percentage.in_file) == (HELIX_PROD, "set", True)
    assert percentage.line == line_of(helix, "percentage: 10")
    registry = changes["ml_services.model_management.registry_url"]
    assert registry.new == "https://mlflow.staging.tonewave.internal"
    assert not registry.in_file  # prod.yml sets it: the tenant's layer gets it added
    assert registry.line == line_of(helix, "  model_management:")  # its parent there
    assert all(c.tenant == "helix-audio" and c.key.startswith("ml_services.") for c in plan.changes)
    assert [s.tenant for s in plan.streams] == ["helix-audio"]


def test_the_cli_prints_the_plan_and_check_fails_when_there_is_something_to_promote(
    root: Path, run: Run
) -> None:
    argv = ["promote", "--from", "staging", "--to", "prod", "--tenant", "helix-audio"]
    argv += ["--keys", "ml_services.model_management.canary", "--root", str(root)]
    code, out, err = run(*argv)

    helix = root / HELIX_PROD
    assert code == 0 and err == ""
    assert "changed  ml_services.model_management.canary.percentage: 10 -> 50" in out
    assert f"sets it at {where(helix, line_of(helix, 'percentage: 10'))}" in out
    assert "write them with --apply" in out
    assert run(*argv, "--check")[0] == 1
    assert snapshot(root) == snapshot(SAMPLE)  # a plan writes nothing


def test_every_tenant_that_runs_in_both_environments_by_default(root: Path) -> None:
    plan = plan_promotion(EnvironmentTree(root), "staging", "prod", keys=["feature_flags"])

    assert [s.tenant for s in plan.streams] == ["aurora-records", "helix-audio"]  # not nimbus-fm
    assert {s.file for s in plan.streams} == {AURORA_PROD, HELIX_PROD}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--from", "staging", "--to", "produktion"], "unknown environment 'produktion'"),
        (["--from", "staging", "--to", "prod", "--tenant", "acme"], "unknown tenant 'acme'"),
        (
            ["--from", "staging", "--to", "prod", "--tenant", "nimbus-fm"],
            "tenant 'nimbus-fm' does not run in environment 'staging'",
        ),
        (["--from", "prod", "--to", "production"], "both 'prod'"),
        (["--from", "staging", "--to", "prod", "--keys", "features..x"], "--keys 'features..x'"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    root: Path, run: Run, argv: list[str], message: str
) -> None:
    code, out, err = run("promote", *argv, "--root", str(root))

    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1


def test_exclude_leaves_keys_out(root: Path) -> None:
    tree = EnvironmentTree(root)
    keys = ["ml_services.model_management"]
    excluded = "ml_services.model_management.registry_url"
    plan = plan_promotion(tree, "staging", "prod", tenants=["helix-audio"], keys=keys)
    narrower = plan_promotion(
        tree, "staging", "prod", tenants=["helix-audio"], keys=keys, exclude=[excluded]
    )

    assert excluded in {c.key for c in plan.changes}
    assert {c.key for c in narrower.changes} == {c.key for c in plan.changes} - {excluded}


# -- applying -------------------------------------------------------------------------------
def test_apply_changes_only_the_lines_it_must_and_keeps_comments_and_tags(
    root: Path, run: Run
) -> None:
    helix = root / HELIX_PROD
    before = helix.read_text().splitlines()
    argv = ["promote", "--from", "staging", "--to", "prod", "--tenant", "helix-audio"]
    argv += ["--keys", "ml_services.model_management", "feature_flags", "--root", str(root)]
    argv += ["--apply"]
    code, out, err = run(*argv)

    assert code == 0, err
    after = helix.read_text().splitlines()
    result = plan_promotion(  # nothing left to promote under those keys
        EnvironmentTree(root),
        "staging",
        "prod",
        tenants=["helix-audio"],
        keys=["ml_services.model_management", "feature_flags"],
    )
    assert result.changes == ()
    # Every line that differs is a changed or added key; all others are kept in order.
    edits = [
        op
        for op in difflib.SequenceMatcher(None, before, after, False).get_opcodes()
        if op[0] != "equal"
    ]
    removed = [before[i] for op in edits for i in range(op[1], op[2])]
    added = [after[j] for op in edits for j in range(op[3], op[4])]
    assert sorted(line.strip() for line in removed) == sorted(
        [
            "a_b_testing: false",
            "percentage: 10",
            "evaluation_window_minutes: 1440",
            "max_error_rate_percent: 0.1",
            "realtime_recommendations: false",
            "lyrics_sync: false",
        ]
    )
    assert sorted(line.strip() for line in added) == sorted(
        [
            "a_b_testing: true",
            "percentage: 50",
            "evaluation_window_minutes: 30",
            "max_error_rate_percent: 0.5",
            "registry_url: https://mlflow.staging.tonewave.internal",
            "realtime_recommendations: true",
            "lyrics_sync: true",
            "ai_playlist_titles: true",
            "mood_radio: true",
            "listening_events_v2: true",
        ]
    )
    comments = [line for line in before if line.lstrip().startswith("#")]
    assert comments and comments == [line for line in after if line.lstrip().startswith("#")]
    for tagged in ("password: !secret tenants/helix-audio/postgres_password", "lyrics: !delete"):
        assert tagged in helix.read_text()
    # What was written, file by file, with the line of each key.
    assert f"wrote {display_path(helix)} (10 changes)" in out
    assert f"{line_of(helix, 'percentage: 50'):>5}  changed  " in out
    assert "git diff" in out


def test_apply_makes_the_target_resolve_to_the_source_values(root: Path) -> None:
    keys = ["ml_services.model_management", "feature_flags", "partner_apis.royalty_reporting"]
    tree = EnvironmentTree(root)
    plan = plan_promotion(tree, "staging", "prod", tenants=["aurora-records"], keys=keys)
    result = apply_promotion(tree, plan)

    assert result.files and {f.file for f in result.files} == {AURORA_PROD}
    for change in result.changes:
        if change.write == "set":
            assert resolved(root, "prod", "aurora-records", change.key) == resolved(
                root, "staging", "aurora-records", change.key
            )
    written = result.files[0]
    assert written.sha256_before != written.sha256_after and not written.created
    assert all(c.line is not None for c in written.changes)
    assert EnvironmentTree(root).check().ok
    assert (root / "prod/prod.yml").read_bytes() == (SAMPLE / "prod/prod.yml").read_bytes()


def test_without_a_tenant_the_environment_file_is_written_never_the_shared_base(
    root: Path, run: Run
) -> None:
    argv = ["promote", "--from", "staging", "--to", "prod", "--tenant", "-"]
    code, _, err = run(*argv, "--keys", "feature_flags", "--apply", "--root", str(root))

    assert code == 0, err
    assert (root / "common/base.yml").read_bytes() == (SAMPLE / "common/base.yml").read_bytes()
    assert (root / "prod/prod.yml").read_bytes() != (SAMPLE / "prod/prod.yml").read_bytes()
    assert resolved(root, "prod", None, "feature_flags") == resolved(
        root, "staging", None, "feature_flags"
    )
    assert run(*argv, "--keys", "feature_flags", "--check", "--root", str(root))[0] == 0


def test_secrets_are_skipped_never_printed_and_never_written(root: Path, run: Run) -> None:
    staging = root / "tenants/aurora-records/staging.yml"
    with staging.open("a") as handle:  # a plain-text secret in staging, by mistake
        handle.write("\npartner_apis:\n  lyrics:\n    token: hunter2-plain\n")
    argv = ["promote", "--from", "staging", "--to", "prod", "--tenant", "aurora-records"]
    argv += ["--keys", "partner_apis", "--root", str(root)]

    code, out, _ = run(*argv)
    json_code, json_out, _ = run(*argv, "--json")
    apply_code, apply_out, apply_err = run(*argv, "--apply")

    assert code == json_code == apply_code == 0, apply_err
    for text in (out, json_out, apply_out):
        assert "hunter2" not in text
    skipped = {s["key"]: s["reason"] for s in json.loads(json_out)["streams"][0]["skipped"]}
    assert "secret reference" in skipped["partner_apis.lyrics.api_key"]
    assert "plain value under a secret's key name" in skipped["partner_apis.lyrics.token"]
    prod = (root / AURORA_PROD).read_text()
    assert "hunter2" not in prod and "sandbox_api_key" not in prod
    assert "mode: sandbox" in prod  # the other keys under partner_apis were promoted


def test_a_schema_failure_rolls_every_file_back(root: Path, run: Run) -> None:
    # Staging has no DR region (null); prod keeps DR enabled, which requires one.
    before = snapshot(root)
    argv = ["promote", "--from", "staging", "--to", "prod", "--tenant", "-"]
    argv += ["--keys", "feature_flags", "disaster_recovery.secondary_region"]
    code, out, err = run(*argv, "--apply", "--root", str(root))

    assert code == 1 and out == ""
    assert "disaster_recovery.secondary_region" in err
    assert "promotion rolled back" in err.splitlines()[-1]
    assert snapshot(root) == before


def test_a_removed_key_is_deleted_from_the_file_or_marked_delete_when_inherited(
    root: Path,
) -> None:
    aurora = root / AURORA_PROD
    aurora.write_text(
        aurora.read_text().replace(
            "  bulk_catalog_ingest_v2: true\n",
            "  bulk_catalog_ingest_v2: true\n  label_beta: true\n",
        )
    )
    staging = root / "tenants/aurora-records/staging.yml"
    with staging.open("a") as handle:  # staging drops a flag that prod inherits from base
        handle.write("\nfeature_flags:\n  lyrics_sync: !delete\n")
    tree = EnvironmentTree(root)
    keys = ["feature_flags.label_beta", "feature_flags.lyrics_sync"]
    plan = plan_promotion(tree, "staging", "prod", tenants=["aurora-records"], keys=keys)
    writes = {c.key: (c.action, c.write) for c in plan.changes}

    assert writes == {
        "feature_flags.label_beta": ("removed", "delete"),  # only this file sets it
        "feature_flags.lyrics_sync": ("removed", "mark-delete"),  # base sets it too
    }
    apply_promotion(tree, plan)
    text = aurora.read_text()
    assert "label_beta" not in text
    assert text.endswith("  bulk_catalog_ingest_v2: true\n  lyrics_sync: !delete\n")
    assert resolved(root, "prod", "aurora-records", "feature_flags.lyrics_sync") == "<absent>"
    assert resolved(root, "prod", "nimbus-fm", "feature_flags.lyrics_sync") is True  # not shared


def test_a_tenant_without_its_own_layer_gets_one_created(root: Path) -> None:
    echo = root / "tenants/echo-labs"
    echo.mkdir()
    (echo / "tenant.yml").write_text(
        "tenant: echo-labs\nname: Echo Labs\nenvironments:\n  staging: {}\n  prod: {}\n"
    )
    (echo / "staging.yml").write_text("feature_flags:\n  mood_radio: true\n")
    tree = EnvironmentTree(root)
    plan = plan_promotion(
        tree, "staging", "prod", tenants=["echo-labs"], keys=["feature_flags.mood_radio"]
    )

    assert plan.streams[0].creates and plan.streams[0].file == "tenants/echo-labs/prod.yml"
    result = apply_promotion(tree, plan)
    assert result.files[0].created and result.files[0].sha256_before is None
    assert (echo / "prod.yml").read_text() == (
        "# echo-labs, prod layer: created by `configbus promote`.\n"
        "feature_flags:\n  mood_radio: true\n"
    )


def test_a_plan_the_tree_no_longer_matches_is_refused(root: Path) -> None:
    tree = EnvironmentTree(root)
    plan = plan_promotion(tree, "staging", "prod", tenants=["helix-audio"], keys=["ml_services"])
    helix = root / HELIX_PROD
    helix.write_text(helix.read_text().replace("percentage: 10", "percentage: 11"))
    before = snapshot(root)

    with pytest.raises(TreeError, match="changed since this promotion was planned"):
        apply_promotion(tree, plan)
    assert snapshot(root) == before


def test_json_output_of_the_plan_and_the_apply(root: Path, run: Run) -> None:
    argv = ["promote", "--from", "staging", "--to", "prod", "--tenant", "helix-audio", "--json"]
    argv += ["--keys", "feature_flags.lyrics_sync", "--root", str(root)]
    plan = json.loads(run(*argv)[1])
    applied = json.loads(run(*argv, "--apply")[1])

    change = plan["streams"][0]["changes"][0]
    assert (change["key"], change["old"], change["new"], change["write"]) == (
        "feature_flags.lyrics_sync",
        False,
        True,
        "set",
    )
    written = applied["files"][0]
    assert written["file"] == HELIX_PROD and written["sha256_after"].startswith("sha256:")
    assert written["changes"][0]["line"] == line_of(root / HELIX_PROD, "lyrics_sync: true")
    assert applied["applied_at"].endswith("Z")


# -- the editor -----------------------------------------------------------------------------
EDITED = """\
# head comment
a:
  x: 1  # why x
  y: "two"
  tags: ["p", "q"]
  secret: !secret db/password
  gone: !delete

# section b
b:
  z: {name: n, version: "1.0"}
"""


def edited(tmp_path: Path, edit: Callable[[YamlFile], object]) -> str:
    path = tmp_path / "f.yml"
    path.write_text(EDITED)
    document = YamlFile.read(path)
    edit(document)
    document.write()
    return path.read_text()


def test_the_editor_keeps_quoting_comments_and_tags_of_what_it_does_not_touch(
    tmp_path: Path,
) -> None:
    def edit(doc: YamlFile) -> None:
        doc.set(("a", "x"), 2)
        doc.set(("a", "y"), "three")
        doc.set(("a", "tags"), ("r",))
        doc.set(("b", "z", "version"), "1.1")

    assert edited(tmp_path, edit) == EDITED.replace("x: 1  # why", "x: 2  # why").replace(
        '"two"', '"three"'
    ).replace('["p", "q"]', '["r"]').replace('"1.0"', '"1.1"')


def test_the_editor_deletes_a_key_and_keeps_the_next_sections_comment(tmp_path: Path) -> None:
    text = edited(tmp_path, lambda doc: doc.delete(("a", "gone")))

    assert text == EDITED.replace("  gone: !delete\n", "")


def test_the_editor_adds_keys_in_the_files_layout(tmp_path: Path) -> None:
    def edit(doc: YamlFile) -> None:
        doc.set(("a", "new"), "yes")  # YAML 1.1 reads plain yes as true: quoted
        doc.set(("c", "d"), 0.00001)
        doc.set(("b", "z", "gone"), DELETE)

    text = edited(tmp_path, edit)

    assert (
        text
        == EDITED.replace("  gone: !delete\n", '  gone: !delete\n  new: "yes"\n').replace(
            '"1.0"}', '"1.0", gone: !delete ""}'
        )
        + "\nc:\n  d: 1.0e-05\n"
    )


def test_the_editor_removes_a_section_with_one_of_the_blank_lines_around_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "f.yml"
    path.write_text("a: 1\n\nb:\n  c: 2\n\nd:\n  e:\n")
    document = YamlFile.read(path)
    document.delete(("b",))
    document.set(("d", "e"), 5)  # `e:` holds null, written as nothing

    assert document.text == "a: 1\n\nd:\n  e: 5\n"


def test_the_editor_refuses_an_edit_that_would_change_another_key(tmp_path: Path) -> None:
    path = tmp_path / "f.yml"
    path.write_text("base: &shared {a: 1}\nother: *shared\n")
    document = YamlFile.read(path)

    with pytest.raises(TreeError, match="anchor"):
        document.set(("base", "a"), 2)
    assert document.text == path.read_text()
