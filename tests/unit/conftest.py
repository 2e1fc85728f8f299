"""Shared fixtures of the unit tests: small environment trees written into tmp_path."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from .helpers import TreeFactory


def _text(content: str | Mapping[str, Any]) -> str:
    """YAML text as written in a test (dedented, without the first newline), or a
    mapping dumped as JSON (for schema.json)."""
    if not isinstance(content, str):
        return json.dumps(content, indent=2)
    text = textwrap.dedent(content)
    return text[1:] if text.startswith("\n") else text


@pytest.fixture
def make_tree(tmp_path: Path) -> TreeFactory:
    """``make_tree({"dev/dev.yml": "...", ...}, name="tree")`` writes the files below
    ``tmp_path/name`` and returns that root. Values are YAML text (dedented; a leading
    newline is dropped so that line 1 is the first line written) or, for JSON files,
    a mapping. Calling it again with the same name adds or replaces files."""

    def make(files: Mapping[str, str | Mapping[str, Any]], name: str = "tree") -> Path:
        root = tmp_path / name
        root.mkdir(exist_ok=True)
        for relative, content in files.items():
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(_text(content), encoding="utf-8")
        return root

    return make
