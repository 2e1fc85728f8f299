"""`configbus history` and `configbus diff` against the real broker: every version with
its actor, reason, sources and changed paths, complete across a daemon restart, and the
values that changed between two versions."""

from __future__ import annotations

import json
import os
import pwd
from pathlib import Path

import pytest
from helpers import Setup, call_main, edit, started, wait_until

from configbus.publisher import Daemon

pytestmark = pytest.mark.integration

AURORA = ("aurora-records", "prod")
AURORA_PROD = "tenants/aurora-records/prod.yml"
MAX_SIZE = "database.postgresql.connection_pool.max_size"


@pytest.fixture
def setup(tmp_path: Path, kafka_bootstrap: str) -> Setup:
    return Setup.create(tmp_path, kafka_bootstrap)


async def edit_and_publish(daemon: Daemon, setup: Setup, old: str, new: str, version: int) -> None:
    edit(setup.path(AURORA_PROD), old, new)
    await wait_until(lambda: daemon.publisher.states[AURORA].version == version, what=f"v{version}")


async def test_history_and_diff_span_a_daemon_restart(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    async with Daemon(setup.settings()) as daemon:
        await started(daemon)
        await edit_and_publish(daemon, setup, "max_size: 250", "max_size: 275", 2)
    async with Daemon(setup.settings(actor="second-daemon")) as daemon:  # a restart
        await started(daemon)
        await edit_and_publish(daemon, setup, "max_size: 275", "max_size: 300", 3)

    where = ["--bootstrap-servers", setup.kafka.bootstrap_servers, "--trust", setup.trust_path]
    where += ["--topic-prefix", setup.topics.prefix, "--audit-topic", setup.topics.audit]
    code, out, err = await call_main(capsys, "history", *AURORA, *where)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "aurora-records/prod: 3 version(s)"
    heads = [line for line in lines if line.startswith("  v")]
    assert [head.split()[0] for head in heads] == ["v1", "v2", "v3"]
    assert "by integration-test: start" in heads[0]  # the daemon's first publication
    me = pwd.getpwuid(os.getuid()).pw_name  # a file edit is credited to the file's owner
    assert all(f"by {me}: file changed" in head for head in heads[1:]), heads
    assert f"         from {AURORA_PROD}" in lines
    assert f"         changed {MAX_SIZE}" in lines

    code, out, _ = await call_main(capsys, "history", *AURORA, *where, "--json", "--limit", "1")
    (last,) = json.loads(out)
    assert (code, last["version"], last["actor"], last["changed_paths"]) == (0, 3, me, [MAX_SIZE])

    code, out, _ = await call_main(capsys, "diff", *AURORA, "1", *where)
    assert code == 0
    assert out.splitlines() == [
        "aurora-records/prod v1 -> v3: 1 change(s)",
        f"  {MAX_SIZE}: 250 -> 300",
    ]
    code, out, _ = await call_main(capsys, "diff", *AURORA, "2", "3", *where, "--json")
    assert json.loads(out)["changes"] == [{"path": MAX_SIZE, "old": 275, "new": 300}]

    code, _, err = await call_main(capsys, "diff", *AURORA, "7", *where)
    assert code == 2 and "has no version 7" in err


@pytest.mark.parametrize("how", ["daemon", "publish --once"])
async def test_a_store_write_made_while_no_daemon_ran_keeps_its_actor_and_reason(
    setup: Setup, redis_db_url: str, how: str
) -> None:
    from configbus.publisher import publish_once
    from configbus.store import TenantStore

    setup.redis_url = redis_db_url
    async with Daemon(setup.settings()) as daemon:
        await started(daemon)
    async with TenantStore(redis_db_url) as store:  # the daemon is down meanwhile
        await store.set(*AURORA, {tuple(MAX_SIZE.split(".")): 260}, actor="carol", reason="INC-9")

    if how == "daemon":
        async with Daemon(setup.settings(actor="second-daemon")) as daemon:
            await wait_until(lambda: daemon.publisher.states[AURORA].version == 2, what="v2")
    else:
        report = await publish_once(setup.settings(actor="second-daemon"))
        assert ("aurora-records", "prod", 2) in report.published

    versions = {v.version: v.event.body.cause for v in await setup.audit() if v.stream == AURORA}
    assert (versions[2].actor, versions[2].reason) == ("carol", "INC-9")
    assert versions[2].sources == (f"redis:configbus:store:{AURORA[0]}:{AURORA[1]}",)
    others = {c.actor for (v, c) in versions.items() if v != 2}
    assert others == {"integration-test"}  # unchanged streams keep the daemon's own credit
