"""`configbus audit verify` and `audit export` against the real broker: a trail written
by a daemon (across a restart) and an operator verifies; a record produced into the
audit topic by hand, and a copy of the topic with a record dropped or two swapped (what
someone with the broker's disks could make of it), are each reported and exit 1."""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import Setup, call_main, edit, started, topic_options, wait_until

from configbus.bus import Admin, Producer, Record, read_to_end
from configbus.crypto import OPERATOR, SigningKey, TrustedKey, generate_keypair
from configbus.publisher import Daemon

pytestmark = pytest.mark.integration

AURORA = ("aurora-records", "prod")
AURORA_PROD = "tenants/aurora-records/prod.yml"


@pytest.fixture
def setup(tmp_path: Path, kafka_bootstrap: str) -> Setup:
    """The publisher's world and "oncall", an operator of aurora-records/prod."""
    world = Setup.create(tmp_path, kafka_bootstrap)
    private, _ = generate_keypair("oncall", tmp_path / "operators")
    entry = TrustedKey(
        SigningKey.load(private, "oncall").public,
        frozenset({AURORA[0]}),
        frozenset({AURORA[1]}),
        OPERATOR,
        3600,
    )
    world.trust = world.trust.with_key(entry)
    world.trust_path.write_text(world.trust.dump(), encoding="utf-8")
    return world


async def write_a_trail(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    """Two daemons one after the other (a restart), each publishing, and an operator's
    override and its clearing in between."""
    async with Daemon(setup.settings()) as daemon:
        await started(daemon)
        edit(setup.path(AURORA_PROD), "max_size: 250", "max_size: 275")
        await wait_until(lambda: daemon.publisher.states[AURORA].version == 2, what="v2")
    operator = ["--trust", setup.trust_path, "--key", setup.workdir / "operators" / "oncall.key"]
    for action in (
        (
            "override",
            "set",
            *AURORA,
            "feature_flags.mood_radio=true",
            "--ttl",
            "30m",
            "--root",
            str(setup.root),
        ),
        ("override", "clear", *AURORA, "feature_flags.mood_radio"),
    ):
        code, _, err = await call_main(
            capsys, *action, "--reason", "INC-9", "--wait", "0", *operator, *topic_options(setup)
        )
        assert code == 0, err
    async with Daemon(setup.settings()) as daemon:
        await started(daemon)
        edit(setup.path(AURORA_PROD), "max_size: 275", "max_size: 300")
        await wait_until(lambda: daemon.publisher.states[AURORA].version == 3, what="v3")


async def verify(
    setup: Setup, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[int, str, str]:
    options = [*topic_options(setup), "--trust", str(setup.trust_path)]
    return await call_main(capsys, "audit", "verify", *options, *extra)


async def rewritten(setup: Setup, change: Callable[[list[Record]], list[Record]]) -> str:
    """A copy of the audit topic as `change` rewrites it, record by record with their
    keys and headers: its name."""
    records = [r async for r in read_to_end(setup.kafka, [setup.topics.audit])]
    copy = f"{setup.topics.audit}-rewritten-{uuid.uuid4().hex[:8]}"
    async with Admin(setup.kafka) as admin:
        await admin.ensure_topics([copy], compact=False)
    async with Producer(setup.kafka) as producer:
        for record in change(records):
            await producer.send_and_wait(
                copy, record.value or b"", key=record.key, headers=record.headers
            )
    return copy


async def test_a_trail_written_by_daemons_and_an_operator_verifies(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    await write_a_trail(setup, capsys)
    code, out, err = await verify(setup, capsys)
    assert (code, err) == (0, ""), out
    assert out.startswith("ok: ") and "in 2 chains" in out

    code, out, _ = await verify(setup, capsys, "--json")
    report = json.loads(out)
    records = [r async for r in read_to_end(setup.kafka, [setup.topics.audit])]
    assert (code, report["ok"], report["records"]) == (0, True, len(records))
    chains = report["heads"]
    operators = next(c for c in chains.values() if c["stream"] == "aurora-records/prod")
    assert (operators["first"], operators["last"], operators["head"]) == (1, 2, 2)

    code, out, _ = await call_main(
        capsys, "audit", "export", "--format", "csv", "--trust", str(setup.trust_path),
        *topic_options(setup),
    )  # fmt: skip
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(rows) == len(records)
    assert all(row["verified"] == "True" for row in rows)
    overrides = [row for row in rows if row["kind"] == "override"]
    assert [(r["actor"], r["reason"], r["signer"]) for r in overrides] == [
        ("oncall", "INC-9", "oncall"),
    ] * 2


async def test_a_record_produced_into_the_audit_topic_by_hand_is_reported(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    await write_a_trail(setup, capsys)
    async with Producer(setup.kafka) as producer:
        await producer.send_and_wait(setup.topics.audit, b"{}", key=b"aurora-records/prod")

    code, out, err = await verify(setup, capsys)
    assert code == 1
    assert [line.split(":")[0] for line in out.splitlines()] == ["unchained"]
    assert err.startswith("FAILED: ") and "1 unchained" in err


async def test_a_dropped_record_and_a_reordered_one_are_reported(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    await write_a_trail(setup, capsys)
    dropped = await rewritten(setup, lambda records: records[:2] + records[3:])
    swapped = await rewritten(setup, lambda r: [*r[:1], r[2], r[1], *r[3:]])

    code, out, _ = await verify(setup, capsys, "--audit-topic", dropped)
    assert code == 1
    assert out.splitlines() == [
        f"dropped: offset 2: link 3 of {setup.topics.transactional_id} missing before this record"
    ]

    code, out, _ = await verify(setup, capsys, "--audit-topic", swapped)
    assert code == 1
    assert out.splitlines() == [f"reordered: offset 2: link 2 of {setup.topics.transactional_id} "
                                "comes after link 3"]  # fmt: skip
