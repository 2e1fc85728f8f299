"""The sample tree shipped in `environments/` at the top of the repository."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from configbus.tree.tree import EnvironmentTree
from configbus.tree.yamlfile import parse_yaml

SHIPPED = Path(__file__).resolve().parents[2] / "environments"

# Written out here rather than taken from configbus: key names that must hold a
# `!secret` reference.
SECRET_KEY = re.compile(
    r"(password|passwd|secret|token|api_?key|private_?key|credential)s?$", re.IGNORECASE
)

pytestmark = pytest.mark.skipif(not SHIPPED.is_dir(), reason="no environments/ folder")


@pytest.fixture(scope="module")
def tree() -> EnvironmentTree:
    return EnvironmentTree(SHIPPED)


def test_the_shipped_tree_checks_clean(tree: EnvironmentTree) -> None:
    report = tree.check()

    assert [str(p) for p in report.problems] == []
    assert report.files >= len(tree.environments()) + len(tree.tenants())
    assert report.streams >= len(list(tree.streams()))


def test_the_shipped_tree_has_a_schema_and_at_least_three_tenants(tree: EnvironmentTree) -> None:
    assert tree.schema() is not None
    assert len(tree.tenants()) >= 3
    assert {"dev", "staging", "prod"} <= set(tree.environments())


def test_every_tenant_stream_validates(tree: EnvironmentTree) -> None:
    streams = list(tree.streams())

    assert streams
    for tenant, env in streams:
        config = tree.validate(tree.resolve(env, tenant))
        assert config.tenant == tenant
        assert config.env == env


def plain_secrets(value: Any, path: tuple[str | int, ...] = ()) -> Iterator[str]:
    """Dotted paths of plain values (strings, numbers or lists; not `!secret`, `!delete`,
    empty, a boolean switch or a mapping of further keys) under a secret-named key."""
    if isinstance(value, dict):
        for key, child in value.items():
            if SECRET_KEY.search(key) and isinstance(child, str | int | float | tuple):
                if not isinstance(child, bool) and child not in ("", ()):
                    yield ".".join(map(str, (*path, key)))
            else:
                yield from plain_secrets(child, (*path, key))
    elif isinstance(value, tuple):
        for index, child in enumerate(value):
            yield from plain_secrets(child, (*path, index))


def test_plain_secrets_finds_what_it_should() -> None:
    data = parse_yaml("x.yml", "a:\n  token: abc\n  tokens: [x]\n  api_key: !secret k\n").data

    assert sorted(plain_secrets(data)) == ["a.token", "a.tokens"]


@pytest.mark.parametrize(
    "path", sorted(SHIPPED.rglob("*.yml")), ids=lambda p: str(p.relative_to(SHIPPED))
)
def test_no_shipped_file_holds_a_plain_secret(path: Path) -> None:
    data = parse_yaml(str(path), path.read_text(encoding="utf-8")).data

    assert list(plain_secrets(data)) == []
