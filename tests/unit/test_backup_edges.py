"""The edges of backup and restore (configbus/ops/backup.py, configbus/cli_backup.py) on
the in-memory bus: files that are no backup, or whose frames, header or records do not
agree; each kind of record a trust file refuses, counted and named, while the backup
keeps it; and `configbus backup` / `configbus restore` (with --dry-run) through
`configbus.cli.main`. The common paths: test_backup.py."""

from __future__ import annotations

import asyncio
import gzip
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from configbus.bus.memory import MemoryBus
from configbus.chain import CHAIN_HEADER, ChainHead
from configbus.crypto import SigningKey, generate_keypair
from configbus.errors import ConfigBusError, VerificationError
from configbus.events import AuditNote
from configbus.ops import backup as backup_module
from configbus.ops.backup import Verification, check_backup, restore
from configbus.publisher.state import StreamHead, seal_signed

from .test_backup import AURORA, Site, expected, frames, rewrite, shape
from .test_secret_cli import Cli

HELIX = ("helix-audio", "prod")
KAFKA = (
    "--bootstrap-servers", "unused:9092", "--topic-prefix", "t.",
    "--audit-topic", "audit", "--acks-topic", "acks",
)  # fmt: skip


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


@pytest.fixture
async def backed_up(site: Site) -> list[bytes]:
    """A history on the bus, backed up to `site.file`; the file's frames (header first,
    end frame last)."""
    await site.history()
    await site.backup()
    return frames(site.file)


def header_of(body: list[bytes]) -> dict[str, Any]:
    return dict(msgspec.msgpack.decode(body[0]))


def refused(path: Path) -> VerificationError:
    with pytest.raises(VerificationError) as caught:
        check_backup(path)
    return caught.value


# -- files that are no backup, or do not agree with themselves ----------------------------


def test_an_empty_gzip_stream_is_no_backup(tmp_path: Path) -> None:
    path = tmp_path / "empty.cbk"
    path.write_bytes(gzip.compress(b""))
    error = refused(path)
    assert (error.reason, str(path) in str(error)) == ("not_a_backup", True)
    assert "is empty" in str(error)


def test_a_frame_longer_than_any_backup_holds_is_malformed(tmp_path: Path) -> None:
    path = tmp_path / "huge.cbk"
    path.write_bytes(gzip.compress(b"\xff\xff\xff\xff" + b"x" * 16))
    error = refused(path)
    assert error.reason == "malformed"
    assert f"a frame of {0xFFFFFFFF} bytes: not a backup" in str(error)


@pytest.mark.parametrize(
    ("first", "reason", "says"),
    [
        pytest.param(b"\xc1", "not_a_backup", "no configbus backup header", id="not-msgpack"),
        pytest.param(
            msgspec.msgpack.encode({"type": "header", "format": "tarball", "schema": 1}),
            "not_a_backup",
            "no configbus backup header",
            id="another-format",
        ),
        pytest.param(
            msgspec.msgpack.encode({"type": "header", "format": "configbus-backup", "schema": 1}),
            "malformed",
            "backup header: ",
            id="fields-missing",
        ),
    ],
)
def test_a_header_that_is_not_a_backups(
    tmp_path: Path, first: bytes, reason: str, says: str
) -> None:
    path = tmp_path / "odd.cbk"
    rewrite(path, [first])
    error = refused(path)
    assert error.reason == reason and says in str(error)


async def test_a_record_frame_that_does_not_decode_is_malformed(
    site: Site, backed_up: list[bytes]
) -> None:
    rewrite(site.file, [backed_up[0], b"\xc1", *backed_up[2:-1]])
    error = refused(site.file)
    assert error.reason == "malformed" and "record 1: " in str(error)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        pytest.param(
            lambda topics: [*topics, topics[0]],
            "the header's topics are not a backup's",
            id="a-topic-twice",
        ),
        pytest.param(
            lambda topics: [{**topics[0], "role": "cache"}, *topics[1:]],
            "the header's topics are not a backup's",
            id="an-unknown-role",
        ),
        pytest.param(
            lambda topics: topics[::-1], "out of the header's order", id="records-out-of-order"
        ),
        pytest.param(
            lambda topics: [{**topics[0], "records": topics[0]["records"] + 1}, *topics[1:]],
            "record(s), the header says",
            id="a-count-that-differs",
        ),
    ],
)
async def test_a_header_that_does_not_describe_its_records_is_malformed(
    site: Site, backed_up: list[bytes], change: Callable[[list[Any]], list[Any]], says: str
) -> None:
    header = header_of(backed_up)
    header["topics"] = change(header["topics"])
    rewrite(site.file, [msgspec.msgpack.encode(header), *backed_up[1:-1]])
    error = refused(site.file)
    assert error.reason == "malformed" and says in str(error)
    with pytest.raises(VerificationError):
        await restore(target := MemoryBus(), site.file)
    assert await target.admin().topics() == set()


async def test_a_header_naming_topics_no_cluster_can_have_is_malformed(
    site: Site, backed_up: list[bytes]
) -> None:
    header = header_of(backed_up)
    header["prefix"] = "no spaces allowed "
    rewrite(site.file, [msgspec.msgpack.encode(header), *backed_up[1:-1]])
    error = refused(site.file)
    assert error.reason == "malformed"
    assert str(error).startswith("malformed: the header's topic names: topic prefix")


# -- records a trust file refuses ---------------------------------------------------------


async def send(bus: MemoryBus, topic: str, key: bytes, value: bytes, **headers: bytes) -> None:
    async with bus.producer() as producer:
        await producer.send_and_wait(topic, value, key=key, headers=tuple(headers.items()))


async def spoil(site: Site, stranger: SigningKey) -> None:
    """One record of each kind a trust file refuses, as the latest of its key (or, on the
    audit topic, appended), and an unsigned audit note."""
    topics, state = site.topics, site.topics.state
    operator_head = seal_signed(
        StreamHead(tenant=AURORA[0], env=AURORA[1], version=9, config_hash="h", issued_at=1),
        site.operator,
    )
    await send(site.bus, state, b"aurora-records/prod", operator_head)
    aurora_head = seal_signed(
        StreamHead(tenant=AURORA[0], env=AURORA[1], version=9, config_hash="h", issued_at=1),
        site.key,
    )
    await send(site.bus, state, b"helix-audio/prod", aurora_head)  # under another stream
    zero = seal_signed(
        StreamHead(tenant="nimbus-fm", env="prod", version=0, config_hash="h", issued_at=1),
        site.key,
    )
    await send(site.bus, state, b"nimbus-fm/prod", zero)
    link, _ = ChainHead(topics.transactional_id, 99, "ab" * 32).link(b"$chain", b"x", site.operator)
    await send(site.bus, state, b"$chain", link)  # the publisher's chain, by an operator
    await send(site.bus, state, b"odd/key", b"not an envelope")

    aurora_chain = next(
        r for r in site.bus.records(topics.tenant_topic(AURORA[0])) if r.key == b"prod/chain"
    )
    await send(site.bus, topics.tenant_topic(HELIX[0]), b"prod/chain", aurora_chain.value or b"")
    future = site.forged(AURORA, 5, stranger)
    await send(site.bus, topics.tenant_topic(AURORA[0]), b"prod/future", future)

    chained = site.bus.records(topics.audit)[0]
    await send(
        site.bus,
        topics.audit,
        chained.key or b"",
        site.forged(AURORA, 98, site.key),
        **{CHAIN_HEADER: chained.header(CHAIN_HEADER) or b""},
    )
    note = AuditNote(action="secret_read", tenant=AURORA[0], env=AURORA[1], subject="db/password")
    await send(site.bus, topics.audit, b"aurora-records/prod/note", msgspec.msgpack.encode(note))
    await send(site.bus, topics.audit, b"aurora-records/prod/future", future)


async def test_a_backup_counts_and_names_each_kind_of_record_that_does_not_verify(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backup_module, "EXAMPLES", 3)
    await site.history()
    stranger = SigningKey.load(generate_keypair("eve", tmp_path / "eve")[0], "eve")
    await spoil(site, stranger)

    result = await site.backup(trust=site.trust)

    verification = result.verification
    assert dict(verification.failed) == {
        "untrusted_scope": 2,  # a head by an operator; the publisher's chain by an operator
        "wrong_stream": 2,  # a head under another stream; a chain head on another topic
        "malformed": 2,  # version 0; not an envelope
        "unknown_key": 2,  # eve's, on the tenant and the audit topic
        "hash_mismatch": 1,  # a link that pins another record
    }
    assert verification.unsigned == 1
    assert len(verification.examples) == 3  # named up to the bound; counted all
    summary = verification.summary()
    assert f"{verification.verified} signed record(s) verified" in summary
    assert ", 1 unsigned audit note(s) kept as they are; 9 do not verify: " in summary
    assert "hash_mismatch (1), malformed (2)" in summary

    target = MemoryBus()  # a backup is a copy, not a filter: all of it comes back
    await restore(target, site.file)
    for name in (site.topics.state, site.topics.audit, site.topics.tenant_topic(HELIX[0])):
        assert [shape(r) for r in target.records(name)] == expected(site, name)


def test_a_verification_without_a_trust_file_says_so() -> None:
    assert Verification().summary() == "not verified (no trust file)"
    assert Verification().ok


# -- restore ------------------------------------------------------------------------------


async def test_a_dry_run_into_an_empty_cluster_names_what_it_would_create(
    site: Site, backed_up: list[bytes]
) -> None:
    target = MemoryBus()
    result = await restore(target, site.file, dry_run=True)
    names = [entry["name"] for entry in header_of(backed_up)["topics"]]
    assert result.created == sorted(names)
    assert result.summary().startswith("would restore ")
    assert sum(result.written.values()) == len(backed_up) - 2
    assert await target.admin().topics() == set()


async def test_other_records_in_a_tenant_topic_are_named_in_the_refusal(
    site: Site, backed_up: list[bytes]
) -> None:
    target = MemoryBus()
    topic = site.topics.tenant_topic(AURORA[0])
    target.create_topic(topic, compact=True)
    await send(target, topic, b"prod/x", b"not from the backup")
    with pytest.raises(ConfigBusError) as no:
        await restore(target, site.file)
    assert f"{topic} (1 record(s))" in str(no.value)
    assert "stop every publisher" not in str(no.value)  # the state topic is not touched
    assert await target.admin().topics() == {topic}


# -- the command line ---------------------------------------------------------------------


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, site: Site) -> Cli:
    """`configbus` on `site`'s topics, its KafkaBus `site.bus`."""
    for name in list(os.environ):
        if name.startswith("CONFIGBUS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CONFIGBUS_STATE_TOPIC", site.topics.state)
    monkeypatch.setattr("configbus.cli_backup.KafkaBus", lambda settings: site.bus)
    return Cli(capsys)


def trust_file(site: Site, tmp_path: Path) -> Path:
    path = tmp_path / "trust.yml"
    site.trust.save(path)
    return path


def test_backup_on_the_command_line(site: Site, cli: Cli, tmp_path: Path) -> None:
    asyncio.run(site.history())
    trust = trust_file(site, tmp_path)
    code, out, err = cli("backup", *KAFKA, "--output", site.file, "--trust", trust)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert re.fullmatch(
        rf"backed up \d+ record\(s\): state \d+, 3 tenant topic\(s\) \d+, audit \d+ "
        rf"to {re.escape(str(site.file))} \({site.file.stat().st_size} bytes\)",
        lines[0],
    ), lines[0]
    assert "left out: writer_beat (1)" in lines
    assert lines[-1].startswith(f"verified with {trust}: ")
    assert check_backup(site.file, site.trust).verification.ok


def test_backup_of_records_that_do_not_verify_exits_1(site: Site, cli: Cli, tmp_path: Path) -> None:
    asyncio.run(site.history())
    stranger = SigningKey.load(generate_keypair("eve", tmp_path / "eve")[0], "eve")
    asyncio.run(send(site.bus, site.topics.audit, b"x/y/z", site.forged(AURORA, 5, stranger)))
    trust = trust_file(site, tmp_path)

    code, _, err = cli("backup", *KAFKA, "--output", site.file, "--trust", trust)

    assert code == 1
    first, last = err.splitlines()
    assert first.startswith("does not verify: audit@") and "eve" in first
    assert last.startswith(f"configbus: {trust}: ")
    assert last.endswith("1 do not verify: unknown_key (1); the backup keeps them as they are")
    assert site.file.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--output", "{tmp}/no-such-folder/f.cbk"],
            "--output {tmp}/no-such-folder/f.cbk: no such directory {tmp}/no-such-folder",
        ),
        (["--output", "{tmp}/f.cbk", "--timeout", "0"], "--timeout 0: must be positive"),
    ],
)
def test_backup_usage_errors(
    site: Site, cli: Cli, tmp_path: Path, argv: list[str], message: str
) -> None:
    code, out, err = cli("backup", *KAFKA, *(a.format(tmp=tmp_path) for a in argv))
    assert (code, out) == (2, "")
    assert err == f"configbus: {message.format(tmp=tmp_path)}\n"


def test_restore_dry_run_on_the_command_line_writes_nothing(
    site: Site, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asyncio.run(site.history())
    asyncio.run(site.backup())
    target = MemoryBus()
    monkeypatch.setattr("configbus.cli_backup.KafkaBus", lambda settings: target)
    monkeypatch.delenv("CONFIGBUS_STATE_TOPIC")  # no topic named: the backup's are taken

    code, out, err = cli("restore", site.file, "--bootstrap-servers", "unused:9092", "--dry-run")

    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith(f"checked {site.file}: backup of ")
    assert lines[0].endswith("; checksum ok")
    assert lines[1].startswith("not verified: no --trust")
    assert lines[2].startswith("would create ") and "t.aurora-records" in lines[2]
    assert lines[3].startswith("would restore ")
    assert len(lines) == 4  # no "next:" for a dry run
    assert asyncio.run(target.admin().topics()) == set()


def test_restore_on_the_command_line_then_again(
    site: Site, cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asyncio.run(site.history())
    asyncio.run(site.backup())
    trust = trust_file(site, tmp_path)
    target = MemoryBus()
    monkeypatch.setattr("configbus.cli_backup.KafkaBus", lambda settings: target)
    argv = ("restore", site.file, *KAFKA, "--trust", trust)  # the backup's own topic names

    code, out, _ = cli(*argv)

    assert code == 0
    lines = out.splitlines()
    assert lines[1].startswith(f"verified with {trust}: ")
    assert lines[2].startswith("created ")
    assert lines[3].startswith("restored ")
    assert lines[-1] == (
        "next: start the publishers; they recover the versions from what was restored"
    )
    code, out, _ = cli(*argv)
    assert code == 0
    assert out.splitlines()[-1] == (
        "nothing to restore: the cluster holds every record of the backup"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--replication-factor", "0"], "--replication-factor 0: must be positive"),
        (["--timeout", "-1"], "--timeout -1: must be positive"),
        (["--topic-prefix", "u."], "the backup holds prefix 't.'"),
    ],
)
def test_restore_usage_errors(
    site: Site, cli: Cli, monkeypatch: pytest.MonkeyPatch, argv: list[str], message: str
) -> None:
    asyncio.run(site.history())
    asyncio.run(site.backup())
    target = MemoryBus()
    monkeypatch.setattr("configbus.cli_backup.KafkaBus", lambda settings: target)
    code, _, err = cli("restore", site.file, "--bootstrap-servers", "unused:9092", *argv)
    assert code == 2
    assert err.startswith(f"configbus: {message}") and err.count("\n") == 1
    assert asyncio.run(target.admin().topics()) == set()
