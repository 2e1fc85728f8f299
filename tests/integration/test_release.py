"""Promotion and a migration against the real broker: `configbus promote --apply` and
`configbus migrate apply` edit the tree's YAML (every comment kept, only the lines they
must changed), the running daemon publishes what they wrote, and a subscriber applies
it; the edit's file is named in the version's history."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import Setup, call_main, started, subscriber_settings, wait_until

from configbus.publisher import Daemon
from configbus.subscriber import ConfigSubscriber

pytestmark = pytest.mark.integration

AURORA = ("aurora-records", "prod")
AURORA_PROD = "tenants/aurora-records/prod.yml"
BURST = "application.api.rate_limits.burst"


@pytest.fixture
def setup(tmp_path: Path, kafka_bootstrap: str) -> Setup:
    return Setup.create(tmp_path, kafka_bootstrap)


def comments(root: Path) -> dict[str, list[str]]:
    """Every comment line of every YAML file of the tree, by file."""
    return {
        str(path.relative_to(root)): [
            line.strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip().startswith("#")
        ]
        for path in sorted(root.rglob("*.yml"))
    }  # fmt: skip


def changed_lines(before: str, after: str) -> list[tuple[str, str]]:
    old, new = before.splitlines(), after.splitlines()
    assert len(old) == len(new), "lines were added or removed"
    return [(a, b) for a, b in zip(old, new, strict=True) if a != b]


async def test_promote_and_migrate_edit_the_tree_and_the_daemon_publishes_them(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    root = setup.root
    layer = setup.path(AURORA_PROD)
    before, notes = layer.read_text(encoding="utf-8"), comments(root)
    async with (
        Daemon(setup.settings()) as daemon,
        ConfigSubscriber(*AURORA, settings=subscriber_settings(setup, *AURORA)) as sub,
    ):
        await started(daemon)
        await wait_until(lambda: sub.version == 1, what="the subscriber at v1")
        assert sub.config.get(BURST) == 500

        code, out, err = await call_main(
            capsys, "promote", "--from", "staging", "--to", "prod", "--tenant", AURORA[0],
            "--keys", BURST, "--apply", "--root", root,
        )  # fmt: skip
        assert code == 0, err
        assert f"{BURST}: 500 -> 20000" in out
        ((old, new),) = changed_lines(before, layer.read_text(encoding="utf-8"))
        assert (old.split("#")[0].strip(), new.split("#")[0].strip()) == (
            "burst: 500", "burst: 20000",
        )  # fmt: skip
        await wait_until(lambda: sub.config.get(BURST) == 20000, what="the promoted value")
        assert sub.version == 2

        migrations = root / "migrations"
        migrations.mkdir()
        (migrations / "0001_burst_size.yml").write_text(
            "# CHG-9: the burst is a size of a bucket, and says so now.\n"
            "description: burst becomes burst_size\n"
            "operations:\n"
            f"  - rename: {{from: {BURST}, to: {BURST}_size}}\n",
            encoding="utf-8",
        )
        code, out, err = await call_main(capsys, "migrate", "apply", "--root", root)
        assert code == 0, err
        await wait_until(
            lambda: sub.config.get(f"{BURST}_size") == 20000, what="the renamed key published"
        )
        assert sub.config.get(BURST) is None and sub.version == 3

    after = comments(root)
    assert {f: c for f, c in after.items() if not f.startswith("migrations")} == notes
    code, out, _ = await call_main(
        capsys, "history", *AURORA, "--trust", setup.trust_path,
        "--bootstrap-servers", setup.kafka.bootstrap_servers,
        "--topic-prefix", setup.topics.prefix, "--audit-topic", setup.topics.audit,
    )  # fmt: skip
    assert code == 0 and f"from {AURORA_PROD}" in out
