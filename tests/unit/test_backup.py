"""`configbus backup` and `configbus restore` on the in-memory bus: a backup holds the
latest record of every key of the tenant and state topics and the whole audit topic,
byte for byte (headers and timestamps too); a restore gives them back into an empty
bus, where the publisher, subscribers, history and the audit chain carry on. A damaged,
truncated or newer file, a bus that holds other records, and (with a trust file) a
forged record are refused before anything is written. The disaster-recovery drill
against real Kafka: tests/integration/test_backup.py."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path
from typing import Any

import msgspec
import pytest

from configbus.bus import TopicNames
from configbus.bus.base import Record
from configbus.bus.memory import MemoryBus
from configbus.cli import main
from configbus.crypto import SigningKey, generate_keypair
from configbus.crypto.trust import OPERATOR, TrustedKey
from configbus.errors import BusError, ConfigBusError, SettingsError, VerificationError
from configbus.events import Cause
from configbus.ops import stream_history
from configbus.ops.audit import verify_trail
from configbus.ops.backup import (
    BackupResult,
    Entry,
    backup,
    check_backup,
    restore,
    restore_transactional_id,
)
from configbus.ops.overrides import OverrideEntry, write_overrides
from configbus.publisher.daemon import publish_once
from configbus.publisher.state import WRITER_KEY, recover

from .helpers import OnMemoryBus
from .test_publisher import World

AURORA = ("aurora-records", "prod")
AURORA_PROD = "tenants/aurora-records/prod.yml"
MAX_SIZE = "database.postgresql.connection_pool.max_size"
_LENGTH = struct.Struct(">I")


class Site(World, OnMemoryBus):
    """The publisher's world with an operator of aurora-records/prod, and a backup file."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        self.tenant, self.env = AURORA
        self.operator = SigningKey.load(generate_keypair("oncall", tmp_path / "ops")[0], "oncall")
        entry = TrustedKey(
            self.operator.public, frozenset({AURORA[0]}), frozenset({AURORA[1]}), OPERATOR, 3600
        )
        self.trust = self.trust.with_key(entry)
        self.file = tmp_path / "configbus.backup"

    async def publish(self) -> None:
        await publish_once(self.settings(), bus=self.bus, deadline=5)

    async def override(self, path: str, value: Any) -> None:
        def add(kept: tuple[OverrideEntry, ...], now: int) -> tuple[OverrideEntry, ...]:
            entry = OverrideEntry(
                path=path, value=value, set_at=now, expires_at=now + 600 * 10**9,
                actor="oncall", reason="INC-7",
            )  # fmt: skip
            return (*kept, entry)

        await write_overrides(
            self.bus, self.topics, *AURORA, key=self.operator, trust=self.trust, change=add,
            cause=Cause(actor="oncall", reason="INC-7"),
        )  # fmt: skip

    async def history(self) -> None:
        """Every stream at v1, aurora-records/prod at v2, and an override on it."""
        await self.publish()
        self.edit(AURORA_PROD, "max_size: 250", "max_size: 275")
        await self.publish()
        await self.override(MAX_SIZE, 260)

    async def backup(self, **options: Any) -> BackupResult:
        return await backup(self.bus, self.topics, self.file, source="memory", **options)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def shape(record: Record) -> tuple[Any, ...]:
    """What a restore must give back of a record: all but its offset."""
    return record.key, record.value, record.headers, record.timestamp_ms


def expected(site: Site, topic: str) -> list[tuple[Any, ...]]:
    """What a backup holds of `topic`: the whole audit topic; of the others, the latest
    record of every key (but the writer's heartbeat), in offset order."""
    records = site.bus.records(topic)
    if topic == site.topics.audit:
        return [shape(r) for r in records]
    latest = {r.key: r for r in records if r.key != WRITER_KEY}
    return [shape(r) for r in sorted(latest.values(), key=lambda r: r.offset)]


# -- the file, written and read independently of configbus/ops/backup.py --------------------


def frames(path: Path) -> list[bytes]:
    """The frames of a backup, as docs/backup.md describes them (the end frame last)."""
    data = gzip.decompress(path.read_bytes())
    found, at = [], 0
    while at < len(data):
        (length,) = _LENGTH.unpack_from(data, at)
        found.append(data[at + 4 : at + 4 + length])
        at += 4 + length
    return found


def rewrite(path: Path, body: list[bytes]) -> None:
    """A backup of the frames `body` (header and records) with a correct end frame: what
    someone who can write the file can make, checksum included."""
    content = b"".join(_LENGTH.pack(len(frame)) + frame for frame in body)
    end = msgspec.msgpack.encode(
        {"type": "end", "records": len(body) - 1, "sha256": hashlib.sha256(content).hexdigest()}
    )
    path.write_bytes(gzip.compress(content + _LENGTH.pack(len(end)) + end))


# -- round trip ---------------------------------------------------------------------------


async def test_a_restore_gives_back_every_record_byte_for_byte(site: Site) -> None:
    await site.history()
    result = await site.backup(trust=site.trust)

    assert site.file.stat().st_mode & 0o777 == 0o600  # configs: for its owner only
    header = result.header
    assert (header.format, header.schema, header.source) == ("configbus-backup", 1, "memory")
    tenants = sorted(t for t in await site.bus.admin().topics() if site.topics.tenant_of(t))
    assert [t.name for t in header.topics] == [*tenants, site.topics.audit, site.topics.state]
    assert [t.role for t in header.topics] == [*["tenant"] * len(tenants), "audit", "state"]
    assert header.skipped == {"writer_beat": 1}
    assert result.verification.ok and result.verification.verified == header.records
    for entry in header.topics:
        assert entry.records == len(expected(site, entry.name)) > 0, entry.name
    audit_records = site.bus.records(site.topics.audit)
    assert header.topics[-2].records == len(audit_records)  # the whole trail

    target = MemoryBus()
    restored = await restore(target, site.file, trust=site.trust)

    assert restored.written == {t.name: t.records for t in header.topics}
    assert restored.transactions == 2 and not restored.foreign  # the state topic's last
    for entry in header.topics:
        assert [shape(r) for r in target.records(entry.name)] == expected(site, entry.name)
        configs = target.topic_configs(entry.name)
        assert configs["cleanup.policy"] == ("delete" if entry.role == "audit" else "compact")
        assert (
            configs["max.message.bytes"] == site.bus.topic_configs(entry.name)["max.message.bytes"]
        )
    assert target.topic_configs(site.topics.audit)["retention.ms"] == "-1"  # never expires
    assert target.records(site.topics.acks) == []  # made, empty: acks flow at once
    assert sorted(restored.created) == sorted([*(t.name for t in header.topics), "acks"])

    report = await verify_trail(target, site.topics, site.trust)
    assert report.ok, report.findings
    assert report.records == len(audit_records)


class Watched(MemoryBus):
    """A bus that notes, each time topics are created, how many records each holds."""

    def __init__(self) -> None:
        super().__init__()
        self.created: list[tuple[list[str], dict[str, int]]] = []

    def admin(self) -> Any:
        admin = super().admin()
        inner = admin.ensure_topics

        async def ensure(names: Any, *, compact: bool, configs: Any = None) -> list[str]:
            names = sorted(names)
            self.created.append((names, {t: len(self.records(t)) for t in self._topics}))
            return await inner(names, compact=compact, configs=configs)

        admin.ensure_topics = ensure  # type: ignore[method-assign]
        return admin


async def test_the_state_topic_is_made_once_every_other_record_is_in(site: Site) -> None:
    """A publisher left running can write nothing until the state topic exists (its
    heartbeat goes there): so it can only recover its versions from complete topics."""
    await site.history()
    result = await site.backup()
    target = Watched()
    await restore(target, site.file)

    *before, (last, held) = target.created
    assert last == [site.topics.state]
    assert site.topics.state not in {name for names, _ in before for name in names}
    assert held == {t.name: t.records for t in result.header.topics if t.role != "state"} | {
        site.topics.acks: 0
    }


async def test_after_a_restore_the_publisher_and_subscribers_carry_on(site: Site) -> None:
    await site.history()
    before = await recover(site.bus, site.topics, site.trust)
    await site.backup()
    lost = site.bus
    site.bus = MemoryBus()  # the cluster, lost and rebuilt empty
    await restore(site.bus, site.file)

    after = await recover(site.bus, site.topics, site.trust)
    assert {s: (v.version, v.config_hash) for s, v in after.states.items()} == {
        s: (v.version, v.config_hash) for s, v in before.states.items()
    }
    history = await stream_history(site.bus, site.topics, *AURORA, site.trust)
    assert [e.version for e in history.snapshots] == [1, 2]
    assert history.unverified == 0

    # A new subscriber runs what ran before: the snapshot and the override on top (whose
    # Kafka timestamp the restore kept: one stamped with the time of a restore made more
    # than a minute later would be refused as replayed).
    async with site.subscriber() as subscriber:
        assert (subscriber.version, subscriber.snapshot.override_version) == (2, 1)
        assert subscriber.config.get(MAX_SIZE) == 260

        site.edit(AURORA_PROD, "max_size: 275", "max_size: 300")
        await site.publish()  # versions go on from the restored ones, never back
        await subscriber.wait_for_version(3, timeout=5)
        assert subscriber.config.get(MAX_SIZE) == 260  # the override is still in force
    assert (await verify_trail(site.bus, site.topics, site.trust)).ok
    trail = [shape(r) for r in site.bus.records(site.topics.audit)]
    assert trail[:-1] == [shape(r) for r in lost.records(site.topics.audit)]  # then v3


# -- refusals: the file ---------------------------------------------------------------------


async def test_a_damaged_truncated_or_newer_backup_is_refused_before_anything_is_written(
    site: Site, tmp_path: Path
) -> None:
    await site.history()
    await site.backup()
    good = site.file.read_bytes()
    content = gzip.decompress(good)
    value = site.bus.records(site.topics.audit)[0].value or b""
    at = content.index(value[-40:]) + 10  # a byte inside a record's value
    damaged = tmp_path / "damaged"
    damaged.write_bytes(gzip.compress(content[:at] + bytes([content[at] ^ 1]) + content[at + 1 :]))
    truncated = tmp_path / "truncated"
    truncated.write_bytes(good[: len(good) // 2])
    cut = tmp_path / "cut"  # whole frames, whole gzip, but no end frame
    body = frames(site.file)[:-1]
    cut.write_bytes(gzip.compress(b"".join(_LENGTH.pack(len(f)) + f for f in body)))
    longer = tmp_path / "longer"
    longer.write_bytes(gzip.compress(content + b"\0\0\0\0"))
    newer = tmp_path / "newer"
    header = msgspec.msgpack.decode(body[0])
    rewrite(newer, [msgspec.msgpack.encode({**header, "schema": 2}), *body[1:]])
    other = tmp_path / "other"
    other.write_bytes(gzip.compress(b"\0\0\0\2\x80\x80"))
    crc = tmp_path / "crc"  # a bit flipped in gzip's own checksum
    crc.write_bytes(good[:-6] + bytes([good[-6] ^ 1]) + good[-5:])

    target = MemoryBus()
    for path, reason in [
        (damaged, "checksum_mismatch"),
        (truncated, "truncated"),
        (cut, "truncated"),
        (longer, "checksum_mismatch"),
        (newer, "unknown_schema"),
        (other, "not_a_backup"),
        (crc, "checksum_mismatch"),
        (tmp_path / "history", "not_a_backup"),  # not gzip
    ]:
        if not path.exists():
            path.write_text("version: 1\n")
        with pytest.raises(VerificationError) as refused:
            await restore(target, path)
        assert refused.value.reason == reason, (path.name, refused.value)
    with pytest.raises(SettingsError, match="No such file"):
        await restore(target, tmp_path / "nowhere")
    assert await target.admin().topics() == set()  # nothing written, nothing created


async def test_the_command_line_refuses_a_damaged_backup_in_one_line_without_connecting(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await site.history()
    await site.backup()
    body = frames(site.file)
    newer = tmp_path / "newer"
    header = msgspec.msgpack.decode(body[0])
    rewrite(newer, [msgspec.msgpack.encode({**header, "schema": 7}), *body[1:-1]])
    truncated = tmp_path / "truncated"
    truncated.write_bytes(site.file.read_bytes()[:-30])
    unreachable = ["--bootstrap-servers", "127.0.0.1:9"]  # never asked

    assert main(["restore", str(newer), *unreachable]) == 1
    err = capsys.readouterr().err
    assert err == (
        "configbus: unknown_schema: backup schema 7 is newer than this configbus reads (1): "
        "restore it with a newer configbus\n"
    )
    assert main(["restore", str(truncated), *unreachable]) == 1
    err = capsys.readouterr().err
    assert err.startswith("configbus: truncated: ") and err.count("\n") == 1


# -- refusals: the target -------------------------------------------------------------------


async def test_a_bus_holding_other_records_is_refused_unless_forced(site: Site) -> None:
    await site.history()
    await site.backup()
    target = MemoryBus()
    await publish_once(site.settings(), bus=target, deadline=5)  # a publisher got there first
    before = {t: target.records(t) for t in await target.admin().topics()}

    with pytest.raises(ConfigBusError, match="refused: topics hold records that are not") as no:
        await restore(target, site.file)
    assert "a publisher has written to this cluster" in str(no.value)
    assert {t: target.records(t) for t in await target.admin().topics()} == before

    dry = await restore(target, site.file, force=True, dry_run=True)
    assert dry.dry_run and sum(dry.written.values()) > 0
    assert {t: target.records(t) for t in await target.admin().topics()} == before

    forced = await restore(target, site.file, force=True)
    assert forced.foreign  # written after what the topics held; nothing deleted
    audit = target.records(site.topics.audit)
    assert [shape(r) for r in audit[: len(before[site.topics.audit])]] == [
        shape(r) for r in before[site.topics.audit]
    ]
    recovered = await recover(target, site.topics, site.trust)
    assert recovered.states[AURORA].version == 2  # the highest verified version wins

    again = await restore(target, site.file, force=True)  # adds only what is missing
    assert sum(again.written.values()) == 0


async def test_a_restore_that_stopped_half_way_goes_on_where_it_stopped(site: Site) -> None:
    await site.history()
    result = await site.backup()
    check = check_backup(site.file)
    records = [msgspec.msgpack.decode(f, type=Entry) for f in frames(site.file)[1:-1]]
    target = MemoryBus()
    # What a first restore wrote before it died: the first two records of each topic.
    for entry in result.header.topics:
        target.create_topic(entry.name, compact=entry.role != "audit")
    async with target.producer() as producer:
        for entry in result.header.topics:
            for record in [r for r in records if r.topic == entry.name][:2]:
                sent = await producer.send(
                    record.topic, record.value, key=record.key,
                    headers=tuple(record.headers), timestamp_ms=record.timestamp,
                )  # fmt: skip
                await sent

    resumed = await restore(target, site.file, checked=check)
    assert resumed.present == {t.name: min(2, t.records) for t in result.header.topics}
    for entry in result.header.topics:
        assert [shape(r) for r in target.records(entry.name)] == expected(site, entry.name)
    again = await restore(target, site.file)
    assert sum(again.written.values()) == 0  # nothing twice


async def test_a_restore_cut_short_by_kafka_says_how_to_go_on(site: Site) -> None:
    await site.history()
    await site.backup()
    target = MemoryBus()
    target.fail_next("commit")
    with pytest.raises(BusError, match="run the same restore again to go on from there"):
        await restore(target, site.file, batch_records=5)
    done = await restore(target, site.file, batch_records=5)
    assert done.transactions > 1
    for name in (site.topics.state, site.topics.audit):
        assert [shape(r) for r in target.records(name)] == expected(site, name)


async def test_a_restore_names_the_backups_topics_and_its_own_writer(site: Site) -> None:
    await site.history()
    await site.backup()
    other = TopicNames(prefix="u.", audit="audit", acks="acks", state="state")
    with pytest.raises(SettingsError, match=r"the backup holds prefix 't\.'"):
        await restore(MemoryBus(), site.file, topics=other)
    assert restore_transactional_id(site.topics) == "configbus-restore.t."


async def test_a_cluster_without_configbus_topics_is_no_backup(site: Site) -> None:
    with pytest.raises(ConfigBusError, match="nothing to back up"):
        await site.backup()
    assert not site.file.exists()


# -- refusals: what does not verify ---------------------------------------------------------


async def test_with_a_trust_file_a_forged_record_refuses_the_whole_restore(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await site.history()
    await site.backup()
    stranger = SigningKey.load(generate_keypair("eve", tmp_path / "eve")[0], "eve")
    body = frames(site.file)[:-1]
    forged = site.forged(AURORA, 99, stranger)
    for at, frame in enumerate(body[1:], 1):  # aurora's snapshot, replaced by a forgery
        record = msgspec.msgpack.decode(frame, type=Entry)
        if record.topic == site.topics.tenant_topic(AURORA[0]) and record.key == b"prod":
            body[at] = msgspec.msgpack.encode(msgspec.structs.replace(record, value=forged))
    rewrite(site.file, body)  # the checksum is right: only signatures tell

    target = MemoryBus()
    with pytest.raises(VerificationError, match="nothing was restored") as refused:
        await restore(target, site.file, trust=site.trust)
    assert refused.value.reason == "untrusted_backup"
    assert "unknown_key (1)" in str(refused.value)
    assert await target.admin().topics() == set()

    trust_path = tmp_path / "trust.yml"
    trust_path.write_text(site.trust.dump(), encoding="utf-8")
    code = main(
        ["restore", str(site.file), "--trust", str(trust_path), "--bootstrap-servers", "x:9"]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "does not verify: t.aurora-records@" in err
    assert err.splitlines()[-1].endswith("1 do not verify: unknown_key (1); nothing is restored")

    unchecked = await restore(target, site.file)  # without a trust file: as the file holds
    assert unchecked.written[site.topics.tenant_topic(AURORA[0])] > 0


async def test_a_backup_keeps_and_names_records_that_do_not_verify(
    site: Site, tmp_path: Path
) -> None:
    await site.history()
    stranger = SigningKey.load(generate_keypair("eve", tmp_path / "eve")[0], "eve")
    await site.put(site.topics.tenant_topic(AURORA[0]), b"prod", site.forged(AURORA, 99, stranger))

    result = await site.backup(trust=site.trust)
    assert dict(result.verification.failed) == {"unknown_key": 1}
    assert "key id 'eve' is not trusted" in result.verification.examples[0]
    target = MemoryBus()
    await restore(target, site.file)  # kept byte for byte: a backup is a copy, not a filter
    topic = site.topics.tenant_topic(AURORA[0])
    assert [shape(r) for r in target.records(topic)] == expected(site, topic)
