"""`configbus audit verify|export` and `configbus compliance waive|waivers` through
`configbus.cli.main(argv)`, on a trail written by a daemon and an operator on the
in-memory bus (the trail of test_audit_chain.py): exit codes, the lines printed, the
JSON and CSV written, and the usage errors that must be one line and exit 2 before
anything is written. Against real Kafka: tests/integration/test_audit.py and
test_compliance_gate.py."""

from __future__ import annotations

import asyncio
import csv
import datetime
import io
import json
import os
import re
from pathlib import Path

import pytest

from configbus import cli_audit
from configbus.bus import MemoryBus, TopicNames
from configbus.cli_audit import parse_since
from configbus.errors import SettingsError
from configbus.events import now_ns
from configbus.ops import audit
from configbus.ops.audit import EXPORT_FIELDS
from configbus.ops.trail import stream_writer_id
from configbus.ops.waivers import Waiver, read_waivers

from .test_audit_chain import AURORA, busy_trail
from .test_publisher import World
from .test_secret_cli import Cli

RULE = "baseline-backups-encrypted"  # a blocking rule of the baseline pack
KAFKA = (
    "--bootstrap-servers", "unused:9092", "--topic-prefix", "t.",
    "--audit-topic", "audit", "--acks-topic", "acks",
)  # fmt: skip
SINCE_LINE = re.compile(r" since \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


@pytest.fixture(autouse=True)
def _no_configbus_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Kafka, trust file or operator key from the environment the tests run in."""
    for name in list(os.environ):
        if name.startswith("CONFIGBUS_"):
            monkeypatch.delenv(name)


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    """The sample tree and a MemoryBus, on the topics the command line names (`KAFKA`):
    every command's KafkaBus is that bus."""
    world = World(tmp_path)
    world.topics = TopicNames.build("t.", "audit", "acks", environ={})
    for module in ("configbus.cli_audit", "configbus.cli_override", "configbus.bus"):
        monkeypatch.setattr(f"{module}.KafkaBus", lambda settings: world.bus)
    return world


@pytest.fixture
def trail(world: World, tmp_path: Path) -> Path:
    """Two publication rounds, two overrides and a secret read on the bus, by the daemon
    and operator `oncall` (aurora-records/prod, max_ttl 1h); the trust file's path."""
    asyncio.run(busy_trail(world, tmp_path))
    path = tmp_path / "trust.yml"
    world.trust.save(path)
    return path


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys)


def by_hand(bus: MemoryBus, count: int) -> list[int]:
    """`count` records produced into the audit topic without a link; their offsets."""

    async def produce() -> None:
        async with bus.producer() as producer:
            for n in range(count):
                await producer.send_and_wait("audit", b"junk", key=f"by-hand-{n}".encode())

    asyncio.run(produce())
    return [r.offset for r in bus.records("audit") if (r.key or b"").startswith(b"by-hand-")]


# -- parse_since -------------------------------------------------------------------------

NOW = 1_800_000_000 * 10**9


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("24h", 86400), ("1h30m", 5400), ("7d", 604800), ("0", 0)]
)
def test_since_a_duration_is_that_long_before_now(text: str, seconds: int) -> None:
    assert parse_since(text, now=NOW) == NOW - seconds * 10**9


def test_since_nothing_is_no_bound() -> None:
    assert parse_since(None) is None


def test_since_a_duration_counts_back_from_the_clock() -> None:
    before = now_ns()
    since = parse_since("1h")
    assert since is not None
    assert before - 3600 * 10**9 <= since <= now_ns() - 3600 * 10**9


@pytest.mark.parametrize(
    "text",
    ["2026-12-01T09:00:00Z", "2026-12-01T09:00Z", "2026-12-01T10:00:00+01:00"],
)
def test_since_an_iso_time_with_a_zone(text: str) -> None:
    expected = datetime.datetime(2026, 12, 1, 9, tzinfo=datetime.UTC).timestamp()
    assert parse_since(text, now=NOW) == int(expected * 10**9)


def test_since_an_iso_time_without_a_zone_is_utc() -> None:
    expected = datetime.datetime(2026, 12, 1, 9, tzinfo=datetime.UTC).timestamp()
    assert parse_since("2026-12-01T09:00", now=NOW) == int(expected * 10**9)


@pytest.mark.parametrize("text", ["yesterday", "24 hours", "2026-13-01", ""])
def test_since_garbage_is_a_settings_error(text: str) -> None:
    with pytest.raises(SettingsError, match=r"give a duration \(24h, 7d\) or an ISO time"):
        parse_since(text, now=NOW)


def test_since_garbage_on_the_command_line_is_one_line_and_exit_2(
    cli: Cli, world: World, trail: Path
) -> None:
    code, out, err = cli("audit", "verify", *KAFKA, "--trust", trail, "--since", "yesterday")
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and "--since 'yesterday'" in err


# -- audit verify ------------------------------------------------------------------------


def test_verify_a_sound_trail_exits_0_with_one_summary_line(
    cli: Cli, world: World, trail: Path
) -> None:
    records = len(world.bus.records("audit"))
    code, out, err = cli("audit", "verify", *KAFKA, "--trust", trail)
    assert (code, err) == (0, "")
    assert out == f"ok: {records} records in 2 chains of audit: every link holds\n"


def test_verify_json_lists_every_chain_and_its_head(cli: Cli, world: World, trail: Path) -> None:
    code, out, err = cli("audit", "verify", *KAFKA, "--trust", trail, "--json")
    assert (code, err) == (0, "")
    report = json.loads(out)
    assert set(report) == {
        "ok", "topic", "records", "since", "findings", "more_findings", "heads",
    }  # fmt: skip
    assert report["ok"] is True
    assert (report["topic"], report["since"], report["findings"]) == ("audit", None, [])
    assert report["records"] == len(world.bus.records("audit"))
    operators = stream_writer_id(world.topics, *AURORA)
    assert set(report["heads"]) == {world.topics.transactional_id, operators}
    head = report["heads"][operators]
    assert (head["stream"], head["first"], head["last"], head["records"], head["head"]) == (
        "aurora-records/prod", 1, 3, 3, 3,
    )  # fmt: skip
    assert head["last_at"] > 0


def test_verify_since_a_while_ago_checks_the_records_since_then(
    cli: Cli, world: World, trail: Path
) -> None:
    code, out, err = cli("audit", "verify", *KAFKA, "--trust", trail, "--since", "1h")
    assert (code, err) == (0, "")
    assert SINCE_LINE.search(out), out
    assert out.startswith(f"ok: {len(world.bus.records('audit'))} records in 2 chains")

    code, out, _ = cli("audit", "verify", *KAFKA, "--trust", trail, "--since", "1h", "--json")
    since = json.loads(out)["since"]
    assert now_ns() - 3601 * 10**9 < since < now_ns() - 3599 * 10**9


def test_verify_a_tampered_trail_exits_1_with_a_line_per_finding(
    cli: Cli, world: World, trail: Path
) -> None:
    records = len(world.bus.records("audit"))
    first, second = by_hand(world.bus, 2)
    code, out, err = cli("audit", "verify", *KAFKA, "--trust", trail)
    assert code == 1
    assert out.splitlines() == [
        f"unchained: offset {first}: a record under by-hand-0 carries no link",
        f"unchained: offset {second}: a record under by-hand-1 carries no link",
    ]
    assert err == f"FAILED: {records + 2} records in 2 chains of audit: 2 unchained\n"


def test_verify_json_of_a_tampered_trail_says_not_ok(cli: Cli, world: World, trail: Path) -> None:
    (offset,) = by_hand(world.bus, 1)
    code, out, err = cli("audit", "verify", *KAFKA, "--trust", trail, "--json")
    assert (code, err) == (1, "")
    report = json.loads(out)
    assert report["ok"] is False
    (finding,) = report["findings"]
    assert (finding["kind"], finding["chain"]) == ("unchained", "")
    assert finding["offset"] == offset


def test_verify_shows_the_first_findings_and_counts_the_rest(
    cli: Cli, world: World, trail: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the terminal: SHOWN_FINDINGS lines, then how many more, those past the
    report's own bound (MAX_FINDINGS) included; --json has every one it kept."""
    monkeypatch.setattr(cli_audit, "SHOWN_FINDINGS", 2)
    monkeypatch.setattr(audit, "MAX_FINDINGS", 3)
    by_hand(world.bus, 5)

    code, out, err = cli("audit", "verify", *KAFKA, "--trust", trail)

    assert code == 1
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["unchained", "unchained"]
    assert lines[2:] == ["... and 3 more (--json lists them)"]
    assert err.rstrip().endswith(": 3 unchained (and 2 more)")

    code, out, _ = cli("audit", "verify", *KAFKA, "--trust", trail, "--json")
    report = json.loads(out)
    assert (code, len(report["findings"]), report["more_findings"]) == (1, 3, 2)


def test_verify_needs_a_trust_file(cli: Cli, world: World, trail: Path) -> None:
    code, out, err = cli("audit", "verify", *KAFKA)
    assert (code, out, err) == (2, "", "configbus: give --trust or set CONFIGBUS_TRUST\n")


def test_verify_reads_the_trust_file_from_the_environment(
    cli: Cli, world: World, trail: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONFIGBUS_TRUST", str(trail))
    code, out, _ = cli("audit", "verify", *KAFKA)
    assert code == 0 and out.startswith("ok: ")


# -- audit export ------------------------------------------------------------------------


def test_export_jsonl_has_a_row_per_record(cli: Cli, world: World, trail: Path) -> None:
    code, out, err = cli("audit", "export", *KAFKA, "--trust", trail)
    assert (code, err) == (0, "")
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == len(world.bus.records("audit"))
    assert all(tuple(row) == EXPORT_FIELDS for row in rows)
    assert [row["offset"] for row in rows] == [r.offset for r in world.bus.records("audit")]
    assert all(row["verified"] is True and row["problem"] == "" for row in rows)
    overrides = [row for row in rows if row["kind"] == "override"]
    assert [(r["actor"], r["reason"], r["signer"]) for r in overrides] == [
        ("oncall", "INC-1", "oncall"),
        ("oncall", "INC-2", "oncall"),
    ]
    (note,) = [row for row in rows if row["kind"] == "note:secret_read"]
    assert (note["subject"], note["version"], note["tenant"]) == ("db/password", 2, AURORA[0])


def test_export_csv_starts_with_the_header(cli: Cli, world: World, trail: Path) -> None:
    by_hand(world.bus, 1)
    code, out, err = cli("audit", "export", *KAFKA, "--trust", trail, "--format", "csv")
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == ",".join(EXPORT_FIELDS)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == len(world.bus.records("audit"))
    *linked, junk = rows
    assert {row["verified"] for row in linked} == {"True"}
    assert (junk["verified"], junk["key"]) == ("False", "by-hand-0")
    assert junk["problem"].startswith("unchained: ")


def test_export_to_a_file(cli: Cli, world: World, trail: Path, tmp_path: Path) -> None:
    target = tmp_path / "trail.csv"
    code, out, err = cli(
        "audit", "export", *KAFKA, "--trust", trail, "--format", "csv", "--output", target
    )
    records = len(world.bus.records("audit"))
    assert (code, out) == (0, "")
    assert err == f"exported {records} audit records to {target}\n"
    with target.open(encoding="utf-8", newline="") as written:
        rows = list(csv.DictReader(written))
    assert len(rows) == records and tuple(rows[0]) == EXPORT_FIELDS


def test_export_to_a_folder_that_does_not_exist_is_one_line(
    cli: Cli, world: World, trail: Path, tmp_path: Path
) -> None:
    target = tmp_path / "no-such-folder" / "trail.csv"
    code, out, err = cli("audit", "export", *KAFKA, "--trust", trail, "--output", target)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and str(target.parent) in err


def test_export_since_a_while_ago_lists_the_records_since_then(
    cli: Cli, world: World, trail: Path
) -> None:
    code, out, _ = cli("audit", "export", *KAFKA, "--trust", trail, "--since", "1h")
    assert code == 0 and len(out.splitlines()) == len(world.bus.records("audit"))


def test_export_since_now_lists_only_records_without_a_link(
    cli: Cli, world: World, trail: Path
) -> None:
    """Every linked record was written before `--since 0s` (now); one without a link
    has no signed time, so it is always listed."""
    by_hand(world.bus, 1)
    code, out, _ = cli("audit", "export", *KAFKA, "--trust", trail, "--since", "0s")
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and row["key"] == "by-hand-0"


# -- compliance waive --------------------------------------------------------------------


def waive(cli: Cli, trail: Path, *extra: str) -> tuple[int, str, str]:
    key = trail.parent / "operators" / "oncall.key"
    return cli("compliance", "waive", *AURORA, *KAFKA, "--trust", trail, "--key", key, *extra)


def waivers(world: World) -> list[Waiver]:
    return asyncio.run(read_waivers(world.bus, world.topics, *AURORA, world.trust))


def test_waive_for_a_while_writes_a_signed_waiver(cli: Cli, world: World, trail: Path) -> None:
    before = now_ns()
    code, out, err = waive(cli, trail, RULE, "--for", "30m", "--reason", "CHG-77 vendor move")
    assert code == 0, err
    assert re.fullmatch(
        rf"waived for aurora-records/prod: {RULE}: in force until "
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ, by oncall: CHG-77 vendor move\n",
        out,
    ), out
    assert err.startswith("the daemon publishes the stream's held change now")
    (waiver,) = waivers(world)
    assert (waiver.rule, waiver.actor, waiver.reason) == (RULE, "oncall", "CHG-77 vendor move")
    assert waiver.set_at >= before
    assert waiver.expires_at - waiver.set_at == 1800 * 10**9


def test_waive_end_ends_the_rules_waiver(cli: Cli, world: World, trail: Path) -> None:
    assert waive(cli, trail, RULE, "--for", "1h", "--reason", "CHG-77")[0] == 0
    code, out, err = waive(cli, trail, RULE, "--end", "--reason", "done", "--actor", "alice")
    assert (code, out, err) == (0, f"waiver of {RULE} for aurora-records/prod ended\n", "")
    (waiver,) = waivers(world)  # the newest record per rule counts
    assert (waiver.actor, waiver.reason) == ("alice", "done")
    assert not waiver.in_force(now_ns())


@pytest.mark.parametrize(
    "flags",
    [pytest.param(("--for", "1h", "--end"), id="both"), pytest.param((), id="neither")],
)
def test_waive_needs_one_of_for_and_end(
    cli: Cli, world: World, trail: Path, flags: tuple[str, ...]
) -> None:
    written = len(world.bus.records("audit"))
    code, out, err = waive(cli, trail, RULE, *flags, "--reason", "r")
    assert (code, out, err) == (2, "", "configbus: give --for DURATION, or --end\n")
    assert len(world.bus.records("audit")) == written


def test_waive_for_longer_than_the_keys_max_ttl_is_refused(
    cli: Cli, world: World, trail: Path
) -> None:
    written = len(world.bus.records("audit"))
    code, out, err = waive(cli, trail, RULE, "--for", "2h", "--reason", "r")
    assert (code, out) == (2, "")
    assert err == "configbus: --for 2h: key 'oncall' may sign 1h at most (its max_ttl)\n"
    assert len(world.bus.records("audit")) == written
    assert waivers(world) == []
    assert waive(cli, trail, RULE, "--for", "1h", "--reason", "r")[0] == 0  # the most it may


def test_waive_an_unknown_rule_is_a_usage_error(cli: Cli, world: World, trail: Path) -> None:
    code, out, err = waive(cli, trail, "baseline-no-such-rule", "--for", "1h", "--reason", "r")
    assert (code, out) == (2, "")
    assert err.count("\n") == 1
    assert "baseline-no-such-rule" in err
    assert err.endswith("(configbus compliance rules lists them)\n")
    assert waivers(world) == []


def test_waive_with_a_key_outside_the_trust_file_is_refused(
    cli: Cli, world: World, trail: Path, tmp_path: Path
) -> None:
    from configbus.crypto import generate_keypair

    stranger, _ = generate_keypair("stranger", tmp_path / "elsewhere")
    code, _, err = cli(
        "compliance", "waive", *AURORA, RULE, *KAFKA, "--trust", trail, "--key", stranger,
        "--for", "1h", "--reason", "r",
    )  # fmt: skip
    assert code == 2 and "is not in the trust file" in err
    assert waivers(world) == []


def test_waive_for_something_that_is_no_duration_is_a_usage_error(
    cli: Cli, world: World, trail: Path
) -> None:
    code, out, err = waive(cli, trail, RULE, "--for", "a while", "--reason", "r")
    assert (code, out) == (2, "")
    assert "'a while' is not a duration" in err


# -- compliance waivers ------------------------------------------------------------------


def test_waivers_of_a_stream_without_any(cli: Cli, world: World, trail: Path) -> None:
    code, out, err = cli("compliance", "waivers", *AURORA, *KAFKA, "--trust", trail)
    assert (code, out, err) == (0, "aurora-records/prod: no waivers\n", "")


def test_waivers_lists_each_rules_newest(cli: Cli, world: World, trail: Path) -> None:
    assert waive(cli, trail, RULE, "--for", "1h", "--reason", "CHG-77")[0] == 0
    other = "baseline-tls-min-version"
    assert waive(cli, trail, other, "--for", "1h", "--reason", "CHG-78")[0] == 0
    assert waive(cli, trail, other, "--end", "--reason", "fixed")[0] == 0

    code, out, err = cli("compliance", "waivers", *AURORA, *KAFKA, "--trust", trail)

    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert len(lines) == 2
    assert re.fullmatch(rf"{RULE}: in force until .*Z, by oncall: CHG-77", lines[0])
    assert re.fullmatch(rf"{other}: ended .*Z, by oncall: fixed", lines[1])


def test_waivers_of_a_tenant_that_never_published(cli: Cli, world: World, trail: Path) -> None:
    code, out, _ = cli("compliance", "waivers", "quiet-tenant", "prod", *KAFKA, "--trust", trail)
    assert (code, out) == (0, "quiet-tenant/prod: no waivers\n")


def test_waivers_of_a_tenant_id_no_topic_can_have(cli: Cli, world: World, trail: Path) -> None:
    code, out, err = cli("compliance", "waivers", "Not_A_Tenant", "prod", *KAFKA, "--trust", trail)
    assert (code, out) == (2, "")
    assert "'Not_A_Tenant' cannot name a topic" in err and err.count("\n") == 1
