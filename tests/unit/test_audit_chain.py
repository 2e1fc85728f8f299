"""The audit trail's hash chains on the in-memory bus: the daemon and operators link
every audit record, `verify_trail` walks the links, and a copy of the trail with a
record forged, dropped, moved, replayed or altered is reported for exactly that.
Against real Kafka: tests/integration/test_audit.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from configbus.bus import TopicNames
from configbus.bus.base import Record

if TYPE_CHECKING:
    from tests.wire_decoder import chain_findings
else:
    from wire_decoder import chain_findings
from configbus.chain import CHAIN_HEADER, ChainHead, open_link, record_digest
from configbus.crypto import SigningKey, generate_keypair
from configbus.crypto.trust import OPERATOR, TrustedKey
from configbus.events import AuditNote, Cause, open_note, seal_note
from configbus.ops.audit import EXPORT_FIELDS, AuditReport, trail_rows, verify_trail
from configbus.ops.overrides import OverrideEntry, write_overrides
from configbus.ops.secrets import audit_read
from configbus.ops.trail import stream_writer_id

from .helpers import eventually
from .test_publisher import World

AURORA = ("aurora-records", "prod")
KIDS = ("unit", "oncall")  # the publisher's key and the operator's
HELIX_LAYER = "tenants/helix-audio/prod.yml"


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def operator_of(world: World, tmp_path: Path, kid: str = "oncall") -> SigningKey:
    """An operator key of aurora-records/prod, trusted by `world.trust`."""
    key = SigningKey.load(generate_keypair(kid, tmp_path / "operators")[0], kid)
    entry = TrustedKey(key.public, frozenset({AURORA[0]}), frozenset({AURORA[1]}), OPERATOR, 3600)
    world.trust = world.trust.with_key(entry)
    return key


async def override(world: World, key: SigningKey, path: str, reason: str) -> None:
    def add(kept: tuple[OverrideEntry, ...], now: int) -> tuple[OverrideEntry, ...]:
        entry = OverrideEntry(
            path=path, value=True, set_at=now, expires_at=now + 600 * 10**9,
            actor=key.kid, reason=reason,
        )  # fmt: skip
        return (*kept, entry)

    await write_overrides(
        world.bus, world.topics, *AURORA, key=key, trust=world.trust, change=add,
        cause=Cause(actor=key.kid, reason=reason),
    )  # fmt: skip


async def busy_trail(world: World, tmp_path: Path) -> SigningKey:
    """Two publication rounds by the daemon, two overrides and a secret read by an
    operator: records of the publisher's chain and of aurora's operator chain."""
    operator = operator_of(world, tmp_path)
    async with world.daemon() as daemon:
        await eventually(daemon.ready.is_set, "the first publish round")
        world.edit(HELIX_LAYER, "max_size:", "max_size: 131 #")
        await eventually(lambda: world.versions(("helix-audio", "prod")) == [1, 2], "helix v2")
    await override(world, operator, "features.a", "INC-1")
    await audit_read(
        world.bus, world.topics, *AURORA, "db/password", 2, actor="oncall", reason="INC-1",
        key=operator, trust=world.trust,
    )  # fmt: skip
    await override(world, operator, "features.b", "INC-2")
    return operator


async def verify(world: World, audit: str | None = None) -> AuditReport:
    topics = world.topics if audit is None else TopicNames(
        prefix=world.topics.prefix, audit=audit, acks="acks", state="state"
    )  # fmt: skip
    return await verify_trail(world.bus, topics, world.trust)


async def tampered(world: World, change: Callable[[list[Record]], list[Record]]) -> AuditReport:
    """`verify_trail` over a copy of the audit topic as `change` rewrites it: what
    someone with the broker's disks could make of it."""
    records = change(list(world.bus.records(world.topics.audit)))
    world.bus.create_topic("audit-copy", compact=False)
    async with world.bus.producer() as producer:
        for record in records:
            await producer.send_and_wait(
                "audit-copy", record.value or b"", key=record.key, headers=record.headers
            )
    report = await verify(world, "audit-copy")
    # docs/wire-format.md §2.6 read by an independent decoder: the same findings, but
    # for those that need the trust file's scopes or the chains' heads.
    public = {kid: entry.key.pem() for kid in KIDS if (entry := world.trust.get(kid))}
    independent = chain_findings([(r.key, r.value, dict(r.headers)) for r in records], public)
    mine = [(f.kind, f.offset) for f in report.findings if f.offset >= 0]
    assert sorted(independent) == sorted(mine)
    return report


def chain_of(record: Record, world: World) -> str:
    link, _ = open_link(record.header(CHAIN_HEADER) or b"", world.trust)
    return link.chain


# -- a trail as written --------------------------------------------------------------


async def test_every_audit_record_is_linked_and_the_trail_verifies(
    world: World, tmp_path: Path
) -> None:
    await busy_trail(world, tmp_path)
    report = await verify(world)
    assert report.ok, report.findings
    records = world.bus.records(world.topics.audit)
    assert report.records == len(records) > 10
    publisher = world.topics.transactional_id
    operators = stream_writer_id(world.topics, *AURORA)
    assert set(report.chains) == {publisher, operators}
    assert report.chains[operators].records == 3  # two overrides and a secret read
    assert report.chains[operators].head == 3  # the head on aurora's topic agrees
    assert report.chains[publisher].head == report.chains[publisher].last
    assert report.chains[publisher].records == len(records) - 3
    for record in records:
        link, trusted = open_link(record.header(CHAIN_HEADER) or b"", world.trust)
        assert link.digest == record_digest(record.key, record.value)
        assert trusted.role == ("operator" if link.chain == operators else "publisher")
    assert "ok:" in report.summary() and "2 chains" in report.summary()


async def test_a_restarted_daemon_goes_on_with_its_chain(world: World) -> None:
    async with world.daemon() as daemon:
        await eventually(daemon.ready.is_set, "the first publish round")
        first = daemon.publisher.chain
    assert first.seq == len(world.bus.records(world.topics.audit))
    world.edit(HELIX_LAYER, "max_size:", "max_size: 131 #")
    async with world.daemon() as again:
        await eventually(again.ready.is_set, "the restarted daemon's first round")
        assert again.publisher.chain.seq == first.seq + 1  # one more link, after the last
    report = await verify(world)
    assert report.ok, report.findings


async def test_operators_writing_at_once_keep_one_line(world: World, tmp_path: Path) -> None:
    """Two operator writers of one stream at the same moment: the transactional id
    fences one, which reads the head again; the chain has no fork."""
    operator = operator_of(world, tmp_path)
    async with world.daemon() as daemon:
        await eventually(daemon.ready.is_set, "the first publish round")
    await asyncio.gather(*(override(world, operator, f"features.f{n}", "INC") for n in range(4)))
    report = await verify(world)
    assert report.ok, report.findings
    assert report.chains[stream_writer_id(world.topics, *AURORA)].last == 4


async def test_a_secret_read_note_is_signed_and_names_no_value(
    world: World, tmp_path: Path
) -> None:
    operator = await busy_trail(world, tmp_path)
    notes = [r for r in world.bus.records(world.topics.audit) if (r.key or b"").endswith(b"/note")]
    assert len(notes) == 1
    note, trusted = open_note(notes[0].value or b"", world.trust)
    assert (note.action, note.subject, note.version, trusted.key.kid) == (
        "secret_read", "db/password", 2, operator.kid,
    )  # fmt: skip
    outsider = SigningKey.load(generate_keypair("mallory", tmp_path / "x")[0], "mallory")
    forged = seal_note(AuditNote(action="secret_read", tenant="t", env="e", subject="s"), outsider)
    with pytest.raises(Exception, match="unknown_key"):
        open_note(forged, world.trust)


# -- a trail tampered with ------------------------------------------------------------


async def test_a_record_produced_by_hand_is_unchained(world: World, tmp_path: Path) -> None:
    await busy_trail(world, tmp_path)

    def by_hand(records: list[Record]) -> list[Record]:
        forged = Record(
            "audit", 0, 0, b"aurora-records/prod", world.forged(AURORA, 99, world.key), (), 0
        )
        return [*records[:5], forged, *records[5:]]

    report = await tampered(world, by_hand)
    assert [(f.kind, f.offset) for f in report.findings] == [("unchained", 5)]
    assert not report.ok and "1 unchained" in report.summary()


async def test_a_link_signed_by_a_stranger_is_forged(world: World, tmp_path: Path) -> None:
    await busy_trail(world, tmp_path)
    mallory = SigningKey.load(generate_keypair("mallory", tmp_path / "x")[0], "mallory")

    def forge(records: list[Record]) -> list[Record]:
        value = world.forged(AURORA, 99, mallory)
        link, _ = ChainHead(world.topics.transactional_id, 5).link(
            b"aurora-records/prod", value, mallory
        )
        forged = Record("audit", 0, 0, b"aurora-records/prod", value, ((CHAIN_HEADER, link),), 0)
        return [*records, forged]

    report = await tampered(world, forge)
    assert [f.kind for f in report.findings] == ["forged"]
    assert "mallory" in report.findings[0].message


async def test_a_dropped_record_is_found_by_the_numbers_around_it(
    world: World, tmp_path: Path
) -> None:
    await busy_trail(world, tmp_path)
    report = await tampered(world, lambda records: records[:3] + records[4:])
    assert [(f.kind, f.offset) for f in report.findings] == [("dropped", 3)]
    assert str(report.findings[0]) == (
        "dropped: offset 3: link 4 of configbus-publisher.t. missing before this record"
    )


async def test_the_newest_records_dropped_are_found_by_the_chain_head(
    world: World, tmp_path: Path
) -> None:
    await busy_trail(world, tmp_path)
    publisher = world.topics.transactional_id

    def cut_the_publishers_end(records: list[Record]) -> list[Record]:
        last = max(i for i, r in enumerate(records) if chain_of(r, world) == publisher)
        return records[:last] + records[last + 1 :]

    report = await tampered(world, cut_the_publishers_end)
    assert [f.kind for f in report.findings] == ["dropped"]
    assert "its head is link" in report.findings[0].message


async def test_two_records_swapped_are_reordered(world: World, tmp_path: Path) -> None:
    await busy_trail(world, tmp_path)
    report = await tampered(world, lambda r: [*r[:2], r[3], r[2], *r[4:]])
    assert [(f.kind, f.offset) for f in report.findings] == [("reordered", 3)]


async def test_a_record_replayed_is_a_duplicate(world: World, tmp_path: Path) -> None:
    await busy_trail(world, tmp_path)
    report = await tampered(world, lambda r: [*r, r[1]])
    assert [f.kind for f in report.findings] == ["duplicate"]


async def test_a_record_altered_under_its_link_is_altered(world: World, tmp_path: Path) -> None:
    await busy_trail(world, tmp_path)

    def alter(records: list[Record]) -> list[Record]:
        old = records[2]
        value = world.forged(AURORA, 7, world.key)  # even signed by the publisher's key
        return [*records[:2], Record("audit", 0, 0, old.key, value, old.headers, 0), *records[3:]]

    report = await tampered(world, alter)
    assert [(f.kind, f.offset) for f in report.findings] == [("altered", 2)]


async def test_a_link_moved_onto_another_stream_is_refused(world: World, tmp_path: Path) -> None:
    operator = operator_of(world, tmp_path)
    async with world.daemon() as daemon:
        await eventually(daemon.ready.is_set, "the first publish round")
    await override(world, operator, "features.a", "INC-1")

    def move(records: list[Record]) -> list[Record]:
        old = records[-1]  # the override, in aurora's operator chain
        return [
            *records[:-1],
            Record("audit", 0, 0, b"helix-audio/prod", old.value, old.headers, 0),
        ]

    report = await tampered(world, move)
    assert [f.kind for f in report.findings] == ["altered"]  # the link pins the record's key


async def test_since_checks_the_records_from_then_on(world: World, tmp_path: Path) -> None:
    """By the signed links' times, not Kafka's timestamps (anyone producing a record
    sets those): a forgery back-dated past --since is still checked."""
    await busy_trail(world, tmp_path)
    records = world.bus.records(world.topics.audit)
    times = [open_link(r.header(CHAIN_HEADER) or b"", world.trust)[0].at for r in records]
    since = times[5]
    report = await verify_trail(world.bus, world.topics, world.trust, since=since)
    assert report.ok, report.findings
    assert report.records == sum(1 for at in times if at >= since)

    async with world.bus.producer() as producer:
        value = world.forged(AURORA, 99, world.key)
        await producer.send_and_wait(world.topics.audit, value, key=b"aurora-records/prod")
    report = await verify_trail(world.bus, world.topics, world.trust, since=since)
    assert [f.kind for f in report.findings] == ["unchained"]


# -- export ---------------------------------------------------------------------------


async def test_the_export_names_who_did_what_and_never_a_value(
    world: World, tmp_path: Path
) -> None:
    await busy_trail(world, tmp_path)
    rows = [row async for row in trail_rows(world.bus, world.topics, world.trust)]
    assert len(rows) == len(world.bus.records(world.topics.audit))
    assert all(set(row) == set(EXPORT_FIELDS) and row["verified"] for row in rows)
    kinds = [row["kind"] for row in rows]
    assert kinds.count("override") == 2 and kinds.count("note:secret_read") == 1
    read = next(row for row in rows if row["kind"] == "note:secret_read")
    assert (read["actor"], read["reason"], read["subject"]) == ("oncall", "INC-1", "db/password")
    snapshots = [row for row in rows if row["kind"] == "snapshot"]
    assert all(row["config_hash"] and row["version"] >= 1 for row in snapshots)
    assert "config" not in EXPORT_FIELDS


async def test_kafka_found_with_less_never_takes_back_what_the_daemon_committed(
    world: World,
) -> None:
    """A cluster wiped (or being restored) under a running daemon: its next recovery
    finds no versions and no chain head, and must not start either again from 1."""
    async with world.daemon() as daemon:
        await eventually(daemon.ready.is_set, "the first publish round")
        versions = {s: state.version for s, state in daemon.publisher.states.items()}
        chain = daemon.publisher.chain
        admin = world.bus.admin()
        await admin.delete_topics(await admin.topics())
        await daemon._recover()
        assert {s: st.version for s, st in daemon.publisher.states.items()} == versions
        assert daemon.publisher.chain == chain and chain.seq == len(versions)


async def test_a_key_cannot_link_into_a_chain_that_is_not_its_streams(
    world: World, tmp_path: Path
) -> None:
    """helix's operator writes a helix record whose link names aurora's chain: forged,
    and not followed (aurora's next genuine link is not blamed)."""
    await busy_trail(world, tmp_path)
    helix = SigningKey.load(generate_keypair("helix-op", tmp_path / "h")[0], "helix-op")
    world.trust = world.trust.with_key(
        TrustedKey(helix.public, frozenset({"helix-audio"}), frozenset({"prod"}), OPERATOR, 60)
    )
    aurora_chain = stream_writer_id(world.topics, *AURORA)

    def cross(records: list[Record]) -> list[Record]:
        value = world.forged(("helix-audio", "prod"), 5, helix)
        head = ChainHead(aurora_chain, 3, stream="helix-audio/prod")
        link, _ = head.link(b"helix-audio/prod", value, helix)
        forged = Record("audit", 0, 0, b"helix-audio/prod", value, ((CHAIN_HEADER, link),), 0)
        return [*records, forged]

    report = await tampered(world, cross)
    assert [f.kind for f in report.findings] == ["forged"]
    assert aurora_chain in report.findings[0].message


async def test_a_jump_of_a_billion_links_costs_nothing(world: World, tmp_path: Path) -> None:
    await busy_trail(world, tmp_path)

    def jump(records: list[Record]) -> list[Record]:
        value = world.forged(AURORA, 99, world.key)
        head = ChainHead(world.topics.transactional_id, 10**9, "ab" * 32)
        link, _ = head.link(b"aurora-records/prod", value, world.key)
        forged = Record("audit", 0, 0, b"aurora-records/prod", value, ((CHAIN_HEADER, link),), 0)
        return [*records, forged]

    report = await tampered(world, jump)
    assert [f.kind for f in report.findings] == ["dropped"]


async def test_heads_out_of_place_or_going_back_are_findings(world: World, tmp_path: Path) -> None:
    operator = await busy_trail(world, tmp_path)
    tenant_topic = world.topics.tenant_topic(AURORA[0])
    heads = [r for r in world.bus.records(tenant_topic) if r.key == b"prod/chain"]
    state = [r for r in world.bus.records(world.topics.state) if r.key == b"$chain"]
    async with world.bus.producer() as producer:
        # the publisher's genuine head, put where aurora's operator chain keeps its head
        await producer.send_and_wait(tenant_topic, state[-1].value or b"", key=b"prod/chain")
        # an older genuine head of aurora's chain, replayed after the newest
        await producer.send_and_wait(tenant_topic, heads[0].value or b"", key=b"prod/chain")
    report = await verify_trail(world.bus, world.topics, world.trust)
    assert sorted(f.kind for f in report.findings) == ["forged", "reordered"]
    assert report.chains[stream_writer_id(world.topics, *AURORA)].head == 3  # the highest
    assert operator.kid == "oncall"


async def test_the_export_marks_a_tampered_record_and_survives_any_timestamp(
    world: World, tmp_path: Path
) -> None:
    await busy_trail(world, tmp_path)
    old = world.bus.records(world.topics.audit)[2]
    async with world.bus.producer() as producer:
        value = world.forged(AURORA, 7, world.key)
        await producer.send(world.topics.audit, value, key=old.key, headers=old.headers)
        await (
            await producer.send(
                world.topics.audit, b"junk", key=b"x/y", timestamp_ms=300_000_000_000_000
            )
        )
    rows = [row async for row in trail_rows(world.bus, world.topics, world.trust)]
    altered, junk = rows[-2], rows[-1]
    assert (altered["verified"], altered["problem"].split(":")[0]) == (False, "altered")
    assert (junk["verified"], junk["time"]) == (False, "300000000000000000000")


async def test_junk_over_a_streams_chain_head_does_not_fork_the_chain(
    world: World, tmp_path: Path
) -> None:
    """Someone who can write the tenant topic writes junk under `prod/chain` and
    compaction keeps it: the next operator writer finds the chain's newest link in the
    trail, and goes on from it rather than from link 1."""
    operator = await busy_trail(world, tmp_path)  # aurora's chain: links 1-3
    topic = world.topics.tenant_topic(AURORA[0])
    await world.put(topic, b"prod/chain", b"junk")
    world.bus.compact(topic)
    assert [r.value for r in world.bus.records(topic) if r.key == b"prod/chain"] == [b"junk"]
    await override(world, operator, "features.c", "INC-3")
    await audit_read(
        world.bus, world.topics, *AURORA, "db/password", 2, actor="oncall", reason="INC-3",
        key=operator, trust=world.trust,
    )  # fmt: skip
    report = await verify_trail(world.bus, world.topics, world.trust)
    assert report.chains[stream_writer_id(world.topics, *AURORA)].last == 5
    # The junk itself is reported; the chain has no gap, no fork, no duplicate.
    assert [(f.kind, f.offset) for f in report.findings] == [("forged", -1)]
