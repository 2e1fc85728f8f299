"""The edges of the audit trail's writers (configbus/ops/trail.py) and of its
verification (configbus/ops/audit.py), on the in-memory bus: an operator writer fenced
by another one mid-write reads the head again and links after it; junk or stale chain
heads on the tenant topic are passed over; and `verify_trail` reports links broken,
dated ahead or out of their key's scope, chains that start late or left no record,
and floods of findings past its bound. The common paths: test_audit_chain.py."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from configbus.bus import ProducerAPI, ReaderAPI
from configbus.bus.base import Record
from configbus.chain import CHAIN_HEADER, ChainHead, open_link
from configbus.crypto import SigningKey
from configbus.errors import ConfigBusError, FencedError
from configbus.events import CLOCK_SKEW_NS, AuditNote, now_ns, seal_note
from configbus.ops import audit
from configbus.ops.audit import AuditReport, verify_trail
from configbus.ops.trail import (
    as_stream_writer,
    linked,
    read_stream_head,
    send_linked,
    stream_writer_id,
    write_record,
)

from .helpers import eventually
from .test_audit_chain import AURORA, busy_trail, chain_of, operator_of, override, tampered, verify
from .test_publisher import World

HELIX = ("helix-audio", "prod")
NOTE_KEY = b"aurora-records/prod/note"
TRAIL_LOGGER = "configbus.ops.trail"


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


async def published(world: World) -> None:
    """One publication round: every tenant topic exists."""
    async with world.daemon() as daemon:
        await eventually(daemon.ready.is_set, "the first publish round")


def note(subject: str, key: SigningKey) -> bytes:
    return seal_note(
        AuditNote(action="secret_read", tenant=AURORA[0], env=AURORA[1], subject=subject), key
    )


def operator_links(world: World) -> list[tuple[int, bytes]]:
    """(link number, record key) of aurora's operator chain on the audit topic, in order."""
    chain = stream_writer_id(world.topics, *AURORA)
    found = []
    for record in world.bus.records(world.topics.audit):
        link, _ = open_link(record.header(CHAIN_HEADER) or b"", world.trust)
        if link.chain == chain:
            found.append((link.seq, record.key or b""))
    return found


async def rewritten(world: World, change: Callable[[list[Record]], list[Record]]) -> AuditReport:
    """`verify_trail` over a copy of the audit topic as `change` rewrites it (the heads
    stay where the writers keep them)."""
    records = change(list(world.bus.records(world.topics.audit)))
    world.bus.create_topic("audit-copy", compact=False)
    async with world.bus.producer() as producer:
        for record in records:
            await producer.send_and_wait(
                "audit-copy", record.value or b"", key=record.key, headers=record.headers
            )
    return await verify(world, "audit-copy")


def linked_record(
    key: bytes, value: bytes, head: ChainHead, signer: SigningKey, **at: int
) -> Record:
    link, _ = head.link(key, value, signer, **at)
    return Record("audit", 0, 0, key, value, ((CHAIN_HEADER, link),), 0)


# -- writers: fenced, retrying ------------------------------------------------------------


async def test_a_writer_fenced_mid_write_reads_the_head_again_and_links_after(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Writer A has read the head (link 0) when operator B writes an override as the
    stream's writer, which fences A. A's send fails, A restarts its producer, reads the
    head again (B's link 1) and writes link 2: the chain stays a line."""
    caplog.set_level(logging.INFO, logger=TRAIL_LOGGER)
    operator = operator_of(world, tmp_path)
    await published(world)
    heads_read: list[int] = []

    async def work(producer: ProducerAPI, reader: ReaderAPI) -> int:
        head = await read_stream_head(reader, world.topics, *AURORA, world.trust)
        heads_read.append(head.seq)
        if len(heads_read) == 1:
            await override(world, operator, "features.b", "INC-B")  # B goes first
        records, after = linked(
            head,
            operator,
            world.topics,
            *AURORA,
            [(world.topics.audit, NOTE_KEY, note("a", operator))],
        )
        await send_linked(producer, records)
        return after.seq

    written = await as_stream_writer(world.bus, world.topics, *AURORA, work)

    assert heads_read == [0, 1]
    assert written == 2
    assert operator_links(world) == [(1, b"aurora-records/prod"), (2, NOTE_KEY)]
    report = await verify(world)
    assert report.ok, report.findings
    assert report.chains[stream_writer_id(world.topics, *AURORA)].head == 2
    assert "aurora-records/prod: another operator writer went first; reading again" in [
        r.getMessage() for r in caplog.records if r.name == TRAIL_LOGGER
    ]


async def test_a_writer_fenced_on_every_attempt_gives_up_with_fenced_error(
    world: World, tmp_path: Path
) -> None:
    operator = operator_of(world, tmp_path)
    await published(world)
    attempts = 0

    async def work(producer: ProducerAPI, reader: ReaderAPI) -> None:
        nonlocal attempts
        attempts += 1
        head = await read_stream_head(reader, world.topics, *AURORA, world.trust)
        await override(world, operator, f"features.f{attempts}", "INC")  # always first
        records, _ = linked(
            head,
            operator,
            world.topics,
            *AURORA,
            [(world.topics.audit, NOTE_KEY, note("a", operator))],
        )
        await send_linked(producer, records)

    with pytest.raises(FencedError):
        await as_stream_writer(world.bus, world.topics, *AURORA, work, attempts=2)

    assert attempts == 2
    assert [key for _, key in operator_links(world)] == [b"aurora-records/prod"] * 2  # B's only
    report = await verify(world)
    assert report.ok, report.findings


async def test_a_tenant_that_never_published_has_no_topic_to_write_to(
    world: World, tmp_path: Path
) -> None:
    operator = operator_of(world, tmp_path)
    with pytest.raises(ConfigBusError) as raised:
        await write_record(
            world.bus, world.topics, *AURORA, b"prod/x", b"v", trust=world.trust, signer=operator
        )
    assert str(raised.value) == (
        "t.aurora-records does not exist: nothing was ever published for tenant aurora-records"
    )
    assert type(raised.value) is ConfigBusError  # not retriable as a bus error would be
    assert await world.bus.admin().topics() == set()  # nothing written, nothing created


# -- writers: the head they believe ------------------------------------------------------


async def test_a_head_record_that_does_not_verify_is_skipped_with_a_warning(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    operator = operator_of(world, tmp_path)
    await published(world)
    await override(world, operator, "features.a", "INC-1")
    tenant_topic = world.topics.tenant_topic(AURORA[0])
    await world.put(tenant_topic, b"prod/chain", b"not a link at all")  # newest, junk
    junk = world.bus.records(tenant_topic)[-1].offset

    await override(world, operator, "features.b", "INC-2")

    assert [seq for seq, _ in operator_links(world)] == [1, 2]  # on from the genuine head
    warnings = [r.getMessage() for r in caplog.records if r.name == TRAIL_LOGGER]
    assert any(
        line.startswith(f"aurora-records/prod: the chain head at offset {junk} is skipped: ")
        for line in warnings
    ), warnings
    assert not any("another chain" in line for line in warnings)


async def test_an_older_head_copied_back_does_not_set_the_chain_back(
    world: World, tmp_path: Path
) -> None:
    operator = operator_of(world, tmp_path)
    await published(world)
    await override(world, operator, "features.a", "INC-1")
    tenant_topic = world.topics.tenant_topic(AURORA[0])
    first_head = next(r for r in world.bus.records(tenant_topic) if r.key == b"prod/chain")
    await override(world, operator, "features.b", "INC-2")
    await world.put(tenant_topic, b"prod/chain", first_head.value or b"")  # link 1, newest

    await override(world, operator, "features.c", "INC-3")

    assert [seq for seq, _ in operator_links(world)] == [1, 2, 3]


async def test_a_head_of_another_chain_is_skipped_with_a_warning(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The publisher's genuine head (link 9 of its own chain), copied where aurora's
    operator chain keeps its head: signed, but not this chain's."""
    operator = operator_of(world, tmp_path)
    await published(world)
    await override(world, operator, "features.a", "INC-1")
    publishers = [r for r in world.bus.records(world.topics.state) if r.key == b"$chain"]
    tenant_topic = world.topics.tenant_topic(AURORA[0])
    await world.put(tenant_topic, b"prod/chain", publishers[-1].value or b"")
    copied = world.bus.records(tenant_topic)[-1].offset

    await override(world, operator, "features.b", "INC-2")

    assert [seq for seq, _ in operator_links(world)] == [1, 2]
    assert (
        f"aurora-records/prod: the chain head at offset {copied} is skipped: a link of another "
        "chain, or by a key out of scope"
    ) in [r.getMessage() for r in caplog.records if r.name == TRAIL_LOGGER]


# -- verify: links ------------------------------------------------------------------------


async def test_a_link_that_does_not_follow_its_predecessor_is_broken(
    world: World, tmp_path: Path
) -> None:
    """A record replaced by another under a genuine link with the right number but the
    wrong previous hash (its writer's key, stolen)."""
    await busy_trail(world, tmp_path)
    publisher = world.topics.transactional_id

    def replace(records: list[Record]) -> list[Record]:
        index = [i for i, r in enumerate(records) if chain_of(r, world) == publisher][3]
        old = records[index]
        link, _ = open_link(old.header(CHAIN_HEADER) or b"", world.trust)
        value = world.forged(AURORA, 77, world.key)
        head = ChainHead(publisher, link.seq - 1, "00" * 32)
        forged = linked_record(old.key or b"", value, head, world.key)
        return [*records[:index], forged, *records[index + 1 :]]

    report = await tampered(world, replace)

    # The replacement does not follow link 3, and link 5 does not follow the replacement.
    assert [(f.kind, f.message) for f in report.findings] == [
        ("broken", f"link {n} of {publisher} does not follow the link {n - 1} found before it")
        for n in (4, 5)
    ]


async def test_a_chain_whose_first_links_are_gone_starts_late(world: World, tmp_path: Path) -> None:
    await busy_trail(world, tmp_path)
    operators = stream_writer_id(world.topics, *AURORA)

    def drop_first(records: list[Record]) -> list[Record]:
        first = next(i for i, r in enumerate(records) if chain_of(r, world) == operators)
        return records[:first] + records[first + 1 :]

    report = await tampered(world, drop_first)

    (finding,) = report.findings
    assert finding.kind == "dropped"
    assert finding.message == f"{operators} starts at link 2: link 1 missing"
    assert report.chains[operators].first == 2


async def test_a_chain_with_a_head_and_no_record_left_is_dropped_whole(
    world: World, tmp_path: Path
) -> None:
    await busy_trail(world, tmp_path)
    operators = stream_writer_id(world.topics, *AURORA)

    report = await rewritten(
        world, lambda records: [r for r in records if chain_of(r, world) != operators]
    )

    assert [(f.kind, f.offset, f.chain) for f in report.findings] == [("dropped", -1, operators)]
    assert str(report.findings[0]) == (
        f"dropped: end of chain: links 1-3 of {operators} missing: its head is link 3"
    )
    assert operators not in report.chains


async def test_a_link_dated_ahead_of_the_clock_is_forged(world: World, tmp_path: Path) -> None:
    await busy_trail(world, tmp_path)
    publisher = world.topics.transactional_id
    ahead = now_ns() + CLOCK_SKEW_NS + 3600 * 10**9

    def add(records: list[Record]) -> list[Record]:
        value = world.forged(AURORA, 99, world.key)
        head = ChainHead(publisher, 9, "ab" * 32)
        return [*records, linked_record(b"aurora-records/prod", value, head, world.key, at=ahead)]

    report = await rewritten(world, add)

    (finding,) = report.findings
    assert (finding.kind, finding.chain) == ("forged", "")
    assert "link 10 is dated ahead" in finding.message


async def test_links_out_of_their_keys_scope_are_forged(world: World, tmp_path: Path) -> None:
    """aurora's operator links the publisher's chain; links aurora's chain on a helix
    record; and links helix's chain, which its key does not cover."""
    operator = await busy_trail(world, tmp_path)
    publisher = world.topics.transactional_id
    helix_chain = stream_writer_id(world.topics, *HELIX)
    aurora_chain = stream_writer_id(world.topics, *AURORA)
    value = note("x", operator)

    def add(records: list[Record]) -> list[Record]:
        return [
            *records,
            linked_record(NOTE_KEY, value, ChainHead(publisher, 9, "ab" * 32), operator),
            linked_record(
                b"helix-audio/prod/note",
                value,
                ChainHead(aurora_chain, 3, "ab" * 32, "aurora-records/prod"),
                operator,
            ),
            linked_record(
                b"helix-audio/prod/note",
                value,
                ChainHead(helix_chain, 0, "", "helix-audio/prod"),
                operator,
            ),
        ]

    report = await rewritten(world, add)

    assert [f.kind for f in report.findings] == ["forged"] * 3
    messages = [f.message for f in report.findings]
    assert f"key 'oncall' (operator) may not write chain '{publisher}'" in messages[0]
    assert "a link of" in messages[1] and "on 'helix-audio/prod''s record" in messages[1]
    assert "key 'oncall' may not write the trail of 'helix-audio/prod'" in messages[2]
    assert helix_chain not in report.chains  # nothing followed from a forged link


# -- verify: the report -------------------------------------------------------------------


async def test_findings_past_the_bound_are_counted_not_kept(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await busy_trail(world, tmp_path)
    monkeypatch.setattr(audit, "MAX_FINDINGS", 2)
    async with world.bus.producer() as producer:
        for n in range(5):
            await producer.send_and_wait(world.topics.audit, b"junk", key=f"junk-{n}".encode())

    report = await verify(world)

    assert (len(report.findings), report.more_findings, report.ok) == (2, 3, False)
    assert report.counts() == {"unchained": 2}
    assert report.summary().endswith(": 2 unchained (and 3 more)")
    assert report.to_dict()["more_findings"] == 3


def test_a_report_with_more_findings_only_is_not_ok() -> None:
    report = AuditReport("audit", more_findings=1)
    assert not report.ok
    assert report.summary() == "FAILED: 0 records in 0 chains of audit:  (and 1 more)"


def test_the_summary_says_since_when() -> None:
    since = int(datetime.datetime(2026, 11, 29, 0, 53, 20, tzinfo=datetime.UTC).timestamp()) * 10**9
    report = AuditReport("audit", records=4, since=since + 500_000_000)  # shown to the second
    assert report.summary() == (
        "ok: 4 records in 0 chains of audit since 2026-11-29T00:53:20Z: every link holds"
    )
    assert report.to_dict()["since"] == since + 500_000_000
    beyond = AuditReport("audit", since=10**30)  # no calendar holds it: as it is
    assert f"since {10**30}:" in beyond.summary()


async def test_since_skips_the_links_written_before_it(world: World, tmp_path: Path) -> None:
    await busy_trail(world, tmp_path)
    records = world.bus.records(world.topics.audit)
    times = sorted(open_link(r.header(CHAIN_HEADER) or b"", world.trust)[0].at for r in records)
    since = times[-2]  # the last two records of the trail: the secret read's and INC-2's
    report = await verify_trail(world.bus, world.topics, world.trust, since=since)
    assert report.records == 2
    assert report.since == since
    assert sum(c.records for c in report.chains.values()) == 2


async def test_since_after_a_chains_last_link_finds_nothing_missing(
    world: World, tmp_path: Path
) -> None:
    await busy_trail(world, tmp_path)
    report = await verify_trail(world.bus, world.topics, world.trust, since=now_ns())
    assert report.records == 0
    assert report.ok, [str(f) for f in report.findings]
