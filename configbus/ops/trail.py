"""Writing to a stream's operator audit chain: what operators (and the publisher, for
an expiry) write about one stream, linked into one chain (configbus/chain.py).

Every writer of a stream's operator records (overrides, rollout commands, compliance
waivers, notes such as a secret's value being read) uses the stream's transactional id
(`stream_writer_id`). Starting its producer fences every other writer of the stream;
then it reads the chain's head (the tenant topic's ``<env>/chain`` record), and writes
its records, their links and the new head in one transaction. A writer fenced before it
commits reads the head again and retries, so the chain stays a line.

    await write_chained(bus, topics, tenant, env, trust=trust, signer=key,
                        build=lambda: [(topics.audit, note_key, note_value)])
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, TypeVar

from configbus.bus import (
    CHAIN_CHANNEL,
    CONTENT_TYPE,
    Bus,
    Headers,
    ProducerAPI,
    ReaderAPI,
    Record,
    TopicNames,
)
from configbus.chain import CHAIN_HEADER, ChainHead, chain_records, open_link, record_digest
from configbus.crypto import SigningKey, TrustStore
from configbus.errors import ConfigBusError, FencedError, VerificationError

__all__ = [
    "as_stream_writer",
    "head_from",
    "head_key",
    "linked",
    "read_stream_head",
    "send_linked",
    "stream_chain",
    "stream_writer_id",
    "trail_head",
    "write_chained",
    "write_record",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
HEAD_READ_BACK: Final = 64  # newer head records that do not verify are skipped
TRAIL_READ_BACK: Final = 1024  # the stream's audit records looked at for its chain
Outgoing = tuple[str, bytes, bytes]  # (topic, key, value)


def stream_writer_id(topics: TopicNames, tenant: str, env: str) -> str:
    """The transactional id of every writer of the stream's operator records, and the
    name of their audit chain."""
    return f"configbus-override.{topics.prefix}{tenant}.{env}"


def stream_chain(topics: TopicNames, tenant: str, env: str) -> ChainHead:
    """The stream's operator chain before its first link."""
    return ChainHead(stream_writer_id(topics, tenant, env), stream=f"{tenant}/{env}")


async def read_stream_head(
    reader: ReaderAPI,
    topics: TopicNames,
    tenant: str,
    env: str,
    trust: TrustStore,
    *,
    bus: Bus | None = None,
) -> ChainHead:
    """The head of the stream's operator chain, from `reader` (started on its tenant
    topic); with `bus`, from the audit trail when no head record there verifies (see
    `trail_head`). A writer that reads other keys too reads them in the same backward
    read (`head_key`, `head_from`): a second read back costs a fetch wait."""
    records = await reader.recent(head_key(topics, env), limit=HEAD_READ_BACK)
    head = head_from(records, topics, tenant, env, trust)
    if head.seq == 0 and records and bus is not None:
        head = await trail_head(bus, topics, tenant, env, trust)
    return head


async def trail_head(
    bus: Bus, topics: TopicNames, tenant: str, env: str, trust: TrustStore
) -> ChainHead:
    """The stream chain's newest link among the stream's recent audit records: where
    the chain stands when its head records on the tenant topic are junk (someone who
    can write the topic wrote over the genuine one, and compaction kept theirs). Never
    a link that does not verify, is of another chain, or is not its record's."""
    empty = stream_chain(topics, tenant, env)
    reader = bus.reader(topics.audit)
    try:
        if not await reader.start():
            return empty
        key = topics.audit_key(tenant, env)
        found = await reader.recent_keys((key, key + b"/note"), limit=TRAIL_READ_BACK)
    finally:
        await reader.stop()
    best = empty
    for record in (record for records in found.values() for record in records):
        sealed = record.header(CHAIN_HEADER)
        try:
            link, trusted = open_link(sealed or b"", trust)
        except VerificationError:
            continue
        ours = link.chain == empty.chain and link.stream == empty.stream
        genuine = ours and trusted.covers(tenant, env)
        pinned = link.digest == record_digest(record.key, record.value)
        if genuine and pinned and link.seq > best.seq:
            best = ChainHead.of(sealed or b"", link)
    log.warning("%s/%s: no chain head on the tenant topic verifies; the trail says link %d",
                tenant, env, best.seq)  # fmt: skip
    return best


def head_key(topics: TopicNames, env: str) -> bytes:
    return topics.record_key(env, CHAIN_CHANNEL)


def head_from(
    records: Sequence[Record], topics: TopicNames, tenant: str, env: str, trust: TrustStore
) -> ChainHead:
    """The head among `records` (``<env>/chain`` records) that is a link of the stream's
    chain, signed by a key trusted for the stream, with the highest number: anyone who
    can write the topic can write junk there, or copy an older head back; neither is
    believed over the genuine newest."""
    empty = stream_chain(topics, tenant, env)
    best = empty
    for record in records:
        where = f"{tenant}/{env}: the chain head at offset {record.offset}"
        try:
            link, trusted = open_link(record.value or b"", trust)
        except VerificationError as exc:
            log.warning("%s is skipped: %s", where, exc)
            continue
        ours = link.chain == empty.chain and link.stream == empty.stream
        if not (ours and trusted.covers(tenant, env)):
            log.warning("%s is skipped: a link of another chain, or by a key out of scope", where)
        elif link.seq > best.seq:
            best = ChainHead.of(record.value or b"", link)
    return best


def linked(
    head: ChainHead,
    signer: SigningKey,
    topics: TopicNames,
    tenant: str,
    env: str,
    records: Sequence[Outgoing],
    headers: Headers = (("content-type", CONTENT_TYPE),),
) -> tuple[list[tuple[str, bytes, bytes, Headers]], ChainHead]:
    """`records` with their links and the stream's new chain head record."""
    return chain_records(
        head,
        signer,
        [(*record, headers) for record in records],
        audit_topic=topics.audit,
        head_at=(topics.tenant_topic(tenant), topics.record_key(env, CHAIN_CHANNEL)),
    )


async def send_linked(
    producer: ProducerAPI,
    records: Sequence[tuple[str, bytes, bytes, Headers]],
) -> None:
    """Send `records` in one transaction and wait until Kafka has every one."""
    async with producer.transaction():
        acks = [
            await producer.send(topic, value, key=key, headers=headers)
            for topic, key, value, headers in records
        ]
        for ack in acks:
            await ack


async def write_chained(
    bus: Bus,
    topics: TopicNames,
    tenant: str,
    env: str,
    *,
    trust: TrustStore,
    signer: SigningKey,
    build: Callable[[], Sequence[Outgoing]],
    attempts: int = 3,
) -> None:
    """Write the records `build` returns (made again on each attempt) as the stream's
    operator writer: fenced, linked into the chain, in one transaction. Raises
    `ConfigBusError` (`FencedError` when other writers kept going first)."""

    async def once(producer: ProducerAPI, reader: ReaderAPI) -> None:
        head = await read_stream_head(reader, topics, tenant, env, trust, bus=bus)
        records, _ = linked(head, signer, topics, tenant, env, build())
        await send_linked(producer, records)

    await as_stream_writer(bus, topics, tenant, env, once, attempts=attempts)


async def write_record(
    bus: Bus,
    topics: TopicNames,
    tenant: str,
    env: str,
    record_key: bytes,
    value: bytes,
    *,
    trust: TrustStore,
    signer: SigningKey,
) -> None:
    """An operator's signed record of the stream: under `record_key` on its tenant topic
    and on the audit topic, linked, in one transaction (`write_chained`)."""
    await write_chained(
        bus,
        topics,
        tenant,
        env,
        trust=trust,
        signer=signer,
        build=lambda: [
            (topics.tenant_topic(tenant), record_key, value),
            (topics.audit, topics.audit_key(tenant, env), value),
        ],
    )


async def as_stream_writer(
    bus: Bus,
    topics: TopicNames,
    tenant: str,
    env: str,
    work: Callable[[ProducerAPI, ReaderAPI], Awaitable[_T]],
    *,
    attempts: int = 3,
) -> _T:
    """Run `work(producer, reader)` as the stream's operator writer: the producer has
    fenced every other writer of the stream before `work` reads anything; a `work`
    fenced by a newer writer runs again, up to `attempts` times."""
    producer = bus.producer(transactional_id=stream_writer_id(topics, tenant, env))
    try:
        await producer.start()
        for attempt in range(attempts):
            topic = topics.tenant_topic(tenant)
            reader = bus.reader(topic)
            try:
                if not await reader.start():
                    raise ConfigBusError(
                        f"{topic} does not exist: nothing was ever published for tenant {tenant}"
                    )
                return await work(producer, reader)
            except FencedError:
                if attempt == attempts - 1:
                    raise
                log.info("%s/%s: another operator writer went first; reading again", tenant, env)
                await producer.restart()
            finally:
                await reader.stop()
        raise AssertionError("unreachable")
    finally:
        await producer.stop()
