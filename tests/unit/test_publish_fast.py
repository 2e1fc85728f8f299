"""The single-change path's tree cache: a file edit parses that file again and no
other. The tenant store's read cache runs against the real Redis in
tests/integration/test_store_cache.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import configbus.tree.tree as tree_module
from configbus.tree import EnvironmentTree
from configbus.tree.yamlfile import ParsedFile

SAMPLE_TREE = Path(__file__).resolve().parents[2] / "environments"
AURORA_FILE = "tenants/aurora-records/prod.yml"
POOL = "database.postgresql.connection_pool.max_size"


def test_a_changed_file_is_parsed_again_and_no_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "environments"
    shutil.copytree(SAMPLE_TREE, root)
    parsed: list[str] = []
    parse = tree_module.parse_yaml

    def counting(source: str, text: str) -> ParsedFile:
        parsed.append(Path(source).relative_to(root).as_posix())
        return parse(source, text)

    monkeypatch.setattr(tree_module, "parse_yaml", counting)
    tree = EnvironmentTree(root)
    first = tree.resolve("prod", "aurora-records")
    assert AURORA_FILE in parsed
    parsed.clear()
    assert tree.resolve("prod", "aurora-records").hash == first.hash
    assert parsed == []  # nothing changed: nothing parsed
    path = root / AURORA_FILE
    path.write_text(path.read_text().replace("max_size: 250", "max_size: 251"))
    changed = tree.resolve("prod", "aurora-records")
    assert parsed == [AURORA_FILE]
    assert changed.get(POOL) == 251 and changed.hash != first.hash
