"""Reading the audit trail back: `verify_trail` walks its hash chains and says what does
not hold, `trail_rows` lists it for a SIEM.

Every audit record carries a signed link (configbus/chain.py) naming its chain, its
number in it and the hash of the link before. Walking the audit topic in order, a chain
must go 1, 2, 3... each link signed by a key trusted for what the record is about and
pinning the record's exact key and value. What breaks that is a finding:

- ``unchained``: a record with no link (written by hand, or by something that is not
  configbus);
- ``forged``: a link no trusted key signed (an unknown key, a bad signature, a revoked
  key, a key out of its scope, a key not in force when the link says it was written);
- ``altered``: a link whose record is not the one it was made for;
- ``dropped``: links missing from a chain (found by the numbers around them, or by the
  chain's head, which the writer keeps on the state or tenant topic);
- ``reordered``: a link that comes after a later one of its chain;
- ``duplicate``: a link seen twice (a record replayed);
- ``broken``: a link whose previous hash is not its predecessor's (a record replaced).

The chain's head is kept beside the trail, in the same transactions, so dropping the
newest records shows too. Someone who can rewrite both the audit topic and every head
record could cut a chain's end unseen; `AuditReport.heads` lists each chain's head so it
can be kept elsewhere and compared (``configbus audit verify --json``).
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final

from configbus.bus import CHAIN_CHANNEL, Bus, Record, TopicNames
from configbus.chain import (
    CHAIN_HEADER,
    PUBLISHER_CHAIN_KEY,
    ChainHead,
    ChainLink,
    open_link,
    record_digest,
    signer_of,
)
from configbus.crypto import PUBLISHER, TrustedKey, TrustStore
from configbus.errors import VerificationError
from configbus.events import CLOCK_SKEW_NS, now_ns, open_note, peek_body, shown
from configbus.ops.trail import stream_writer_id

__all__ = ["AuditReport", "ChainSummary", "Finding", "trail_rows", "verify_trail"]

NOTE_SUFFIX: Final = "/note"
STREAM_CHAIN_PREFIX: Final = "configbus-override."
PUBLISHER_CHAIN_PREFIX: Final = "configbus-publisher."
MAX_FINDINGS: Final = 10_000  # beyond it, counted only: a flood must not exhaust memory


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str  # unchained, forged, altered, dropped, reordered, duplicate, broken
    offset: int  # the audit record's offset (-1: not a record, e.g. a head)
    chain: str  # "" when the record names none that verifies
    message: str

    def __str__(self) -> str:
        where = f"offset {self.offset}" if self.offset >= 0 else "end of chain"
        return f"{self.kind}: {where}: {self.message}"


@dataclass(slots=True)
class ChainSummary:
    chain: str
    stream: str
    first: int  # the first link number seen
    last: int  # the highest link number seen
    records: int = 0
    first_at: int = 0
    last_at: int = 0
    head: int | None = None  # the head its writer keeps, when found


@dataclass(slots=True)
class AuditReport:
    topic: str
    records: int = 0
    chains: dict[str, ChainSummary] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    more_findings: int = 0  # past MAX_FINDINGS
    since: int | None = None

    @property
    def ok(self) -> bool:
        return not self.findings and not self.more_findings

    def add(self, kind: str, offset: int, chain: str, message: str) -> None:
        if len(self.findings) < MAX_FINDINGS:
            self.findings.append(Finding(kind, offset, chain, message))
        else:
            self.more_findings += 1

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for finding in self.findings:
            counts[finding.kind] = counts.get(finding.kind, 0) + 1
        return counts

    def summary(self) -> str:
        what = f"{self.records} records in {len(self.chains)} chains of {self.topic}"
        if self.since is not None:
            what += f" since {_time(self.since)}"
        if self.ok:
            return f"ok: {what}: every link holds"
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(self.counts().items()))
        more = f" (and {self.more_findings} more)" if self.more_findings else ""
        return f"FAILED: {what}: {counts}{more}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "topic": self.topic,
            "records": self.records,
            "since": self.since,
            "findings": [
                {"kind": f.kind, "offset": f.offset, "chain": f.chain, "message": f.message}
                for f in self.findings
            ],
            "more_findings": self.more_findings,
            "heads": {
                name: {
                    "stream": c.stream,
                    "first": c.first,
                    "last": c.last,
                    "records": c.records,
                    "head": c.head,
                    "last_at": c.last_at,
                }
                for name, c in sorted(self.chains.items())
            },
        }


@dataclass(slots=True)
class _Walk:
    summary: ChainSummary
    hash: str  # the last link's
    # links skipped so far, as [first, last, offset of the record that skipped them]:
    # ranges, not one entry per link, so a jump of a billion costs nothing
    missing: list[list[int]] = field(default_factory=list)

    def fill(self, seq: int) -> bool:
        """Take `seq` out of the missing ranges; whether it was missing."""
        for index, (first, last, offset) in enumerate(self.missing):
            if first <= seq <= last:
                parts = [[first, seq - 1, offset], [seq + 1, last, offset]]
                self.missing[index : index + 1] = [p for p in parts if p[0] <= p[1]]
                return True
        return False


@dataclass(frozen=True, slots=True)
class _Names:
    """What a deployment's chains are called: checked, not believed from the link."""

    topics: TopicNames

    def publisher(self) -> str:
        return self.topics.transactional_id

    def stream(self, stream: str) -> str:
        tenant, _, env = stream.partition("/")
        return stream_writer_id(self.topics, tenant, env)


async def verify_trail(
    bus: Bus, topics: TopicNames, trust: TrustStore, *, since: int | None = None
) -> AuditReport:
    """Walk the audit topic's chains and check every link, then each chain's end
    against the head its writer keeps. `since` (ns): check the records written from
    then on (by their signed links' times; a record without a verifying link is always
    checked), and the links between them (a chain may start anywhere then)."""
    report = AuditReport(topics.audit, since=since)
    names = _Names(topics)
    walks: dict[str, _Walk] = {}
    before: dict[str, int] = {}  # with `since`: each chain's last link before it
    now = now_ns()
    async for record in bus.read_to_end([topics.audit]):
        probe = AuditReport(topics.audit)
        checked = _checked_link(record, trust, probe, names, now)
        if since is not None and checked is not None and checked[0].at < since:
            link = checked[0]
            before[link.chain] = max(before.get(link.chain, 0), link.seq)
            continue
        report.records += 1
        for finding in probe.findings:
            report.add(finding.kind, finding.offset, finding.chain, finding.message)
        if checked is not None:
            _follow(walks, *checked, record.offset, report, since is None)
    for each in walks.values():
        chain = each.summary.chain
        for first, last, offset in sorted(each.missing):
            missing = f"{_links(first, last)} of {chain}"
            report.add("dropped", offset, chain, f"{missing} missing before this record")
    async for chain, seq in _heads(bus, topics, trust, report, names):
        walk = walks.get(chain)
        # A chain with no link since `since` ends where it was then.
        last = walk.summary.last if walk is not None else before.get(chain, 0)
        if walk is not None:
            walk.summary.head = seq
        if seq > last:
            report.add(
                "dropped",
                -1,
                chain,
                f"{_links(last + 1, seq)} of {chain} missing: its head is link {seq}",
            )
    report.chains = {name: each.summary for name, each in walks.items()}
    return report


def _checked_link(
    record: Record, trust: TrustStore, report: AuditReport, names: _Names, now: int
) -> tuple[ChainLink, bytes] | None:
    """The record's link, when it verifies and is followed in its chain; every problem
    as a finding in `report`."""
    sealed = record.header(CHAIN_HEADER)
    key = shown((record.key or b"").decode(errors="replace"), 80, quote=False)
    if sealed is None:
        report.add("unchained", record.offset, "", f"a record under {key} carries no link")
        return None
    try:
        link, trusted = open_link(sealed, trust)
        if link.at > now + CLOCK_SKEW_NS:
            raise VerificationError("issued_in_future", f"link {link.seq} is dated ahead")
    except VerificationError as exc:
        report.add("forged", record.offset, "", f"the record under {key}: {exc}")
        return None
    if record_digest(record.key, record.value) != link.digest:
        report.add(
            "altered",
            record.offset,
            link.chain,
            f"link {link.seq} of {link.chain} was made for another record than the one under {key}",
        )
        return link, sealed  # the link is genuine: the record is the finding, not a gap
    try:
        _check_scope(link, trusted, record.key or b"", names)
    except VerificationError as exc:
        report.add("forged", record.offset, "", f"the record under {key}: {exc}")
        return None
    return link, sealed


def _check_scope(link: ChainLink, trusted: TrustedKey, key: bytes, names: _Names) -> None:
    """A publisher key for the publisher's chain; for a stream's chain a key trusted
    for that stream, linking that stream's own chain, on the stream's own records. The
    record's stream must be one the key covers. Raises `VerificationError`."""
    stream = key.decode(errors="replace").removesuffix(NOTE_SUFFIX)
    tenant, _, env = stream.partition("/")
    kid = trusted.key.kid
    if link.stream:
        if link.stream != stream or link.chain != names.stream(stream):
            theirs, ours = shown(link.chain), shown(stream)
            raise VerificationError("wrong_stream", f"a link of {theirs} on {ours}'s record")
    elif trusted.role != PUBLISHER or link.chain != names.publisher():
        raise VerificationError(
            "untrusted_scope",
            f"key {kid!r} ({trusted.role}) may not write chain {shown(link.chain)}",
        )
    if not trusted.covers(tenant, env):
        raise VerificationError(
            "untrusted_scope", f"key {kid!r} may not write the trail of {shown(stream)}"
        )


def _follow(
    walks: dict[str, _Walk],
    link: ChainLink,
    sealed: bytes,
    offset: int,
    report: AuditReport,
    from_start: bool,
) -> None:
    chain, seq = link.chain, link.seq
    walk = walks.get(chain)
    if walk is None:
        walks[chain] = _Walk(
            ChainSummary(chain, link.stream, seq, seq, 1, link.at, link.at),
            ChainHead.of(sealed, link).hash,
        )
        if from_start and seq > 1:
            missing = _links(1, seq - 1)
            report.add("dropped", offset, chain, f"{chain} starts at link {seq}: {missing} missing")
        return
    summary = walk.summary
    summary.records += 1
    if walk.fill(seq):
        after = summary.last
        report.add("reordered", offset, chain, f"link {seq} of {chain} comes after link {after}")
    elif seq <= summary.last:
        report.add("duplicate", offset, chain, f"link {seq} of {chain} appears again")
    else:
        if seq > summary.last + 1:
            walk.missing.append([summary.last + 1, seq - 1, offset])
        elif link.prev != walk.hash:
            report.add(
                "broken",
                offset,
                chain,
                f"link {seq} of {chain} does not follow the link {summary.last} found before it",
            )
        summary.last, summary.last_at = seq, link.at
        walk.hash = ChainHead.of(sealed, link).hash


async def _heads(
    bus: Bus, topics: TopicNames, trust: TrustStore, report: AuditReport, names: _Names
) -> AsyncIterator[tuple[str, int]]:
    """(chain, head link number) of every chain head kept beside the trail: the
    publisher's on the state topic, each stream's on its tenant topic; the highest that
    verifies per chain. A head that does not verify, names another chain than the place
    it sits in, or goes back below one before it, is a finding."""
    admin = bus.admin()
    await admin.start()
    try:
        existing = await admin.topics()
    finally:
        await admin.stop()
    wanted = [t for t in existing if topics.tenant_of(t) is not None or t == topics.state]
    highest: dict[str, int] = {}
    async for record in bus.read_to_end(sorted(wanted)):
        if record.topic == topics.state:
            if record.key != PUBLISHER_CHAIN_KEY:
                continue
            expected, role = names.publisher(), PUBLISHER
        else:
            env, channel = topics.channel_of(record.key)
            if channel != CHAIN_CHANNEL:
                continue
            expected, role = names.stream(f"{topics.tenant_of(record.topic)}/{env}"), ""
        where = shown(f"{record.topic}@{record.offset}", quote=False)
        try:
            link, trusted = open_link(record.value or b"", trust)
            if link.chain != expected or (role and trusted.role != role):
                raise VerificationError("wrong_stream", f"a head of {shown(link.chain)}")
        except VerificationError as exc:
            report.add("forged", -1, expected, f"the chain head at {where}: {exc}")
            continue
        known = highest.get(expected, 0)
        if link.seq < known:
            report.add(
                "reordered",
                -1,
                expected,
                f"the head of {expected} at {where} went back from link {known} to {link.seq}",
            )
        highest[expected] = max(known, link.seq)
    for chain, seq in sorted(highest.items()):
        yield chain, seq


def _links(start: int, end: int) -> str:
    return f"link {start}" if start == end else f"links {start}-{end}"


def _time(ns: int) -> str:
    try:
        when = datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC)
    except (OverflowError, OSError, ValueError):  # a time no calendar holds: as it is
        return str(ns)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


EXPORT_FIELDS: Final = (
    "offset",
    "time",
    "key",
    "chain",
    "seq",
    "signer",
    "verified",
    "problem",
    "kind",
    "tenant",
    "env",
    "version",
    "actor",
    "reason",
    "sources",
    "subject",
    "config_hash",
    "expires_at",
)


async def trail_rows(
    bus: Bus, topics: TopicNames, trust: TrustStore, *, since: int | None = None
) -> AsyncIterator[dict[str, Any]]:
    """Every audit record as a flat row (`EXPORT_FIELDS`), oldest first: who did what
    to which stream, when and why, and whether its link verifies. Never a config or
    a secret: an event's row names its version and config hash. `since`: the rows of
    records written from then on, by their signed links' times (a record without a
    verifying link is always listed)."""
    names = _Names(topics)
    async for record in bus.read_to_end([topics.audit]):
        row = _row(record, trust, names)
        if since is not None and row["verified"] and row["at"] < since:
            continue
        del row["at"]
        yield row


def _row(record: Record, trust: TrustStore, names: _Names) -> dict[str, Any]:
    key = (record.key or b"").decode(errors="replace")
    row: dict[str, Any] = dict.fromkeys(EXPORT_FIELDS, "")
    row.update(offset=record.offset, key=shown(key, 200, quote=False), verified=False)
    row["time"] = _time(record.timestamp_ms * 1_000_000)
    probe = AuditReport("")
    checked = _checked_link(record, trust, probe, names, now_ns())
    row["at"] = record.timestamp_ms * 1_000_000
    if checked is not None:
        link, _ = checked
        row.update(chain=link.chain, seq=link.seq, time=_time(link.at), at=link.at)
    row["verified"] = checked is not None and not probe.findings
    row["problem"] = "; ".join(f"{f.kind}: {f.message}" for f in probe.findings)
    sealed = record.header(CHAIN_HEADER)
    if sealed is not None:
        row["signer"] = shown(signer_of(sealed), quote=False)
    value = record.value or b""
    try:
        if key.endswith(NOTE_SUFFIX):
            note, _ = open_note(value, trust)
            row.update(
                kind=f"note:{note.action}",
                tenant=note.tenant,
                env=note.env,
                version=note.version,
                actor=note.actor,
                reason=note.reason,
                subject=note.subject,
            )
        else:
            _, body = peek_body(value)
            row.update(
                kind=str(body.kind),
                tenant=body.tenant,
                env=body.env,
                version=body.version,
                actor=body.cause.actor,
                reason=body.cause.reason,
                sources=" ".join(body.cause.sources),
                config_hash=body.config_hash,
                expires_at=_time(body.expires_at) if body.expires_at else "",
            )
    except VerificationError as exc:
        row["problem"] = row["problem"] or str(exc)
    for name in ("tenant", "env", "actor", "reason", "sources", "subject"):
        row[name] = shown(str(row[name]), 500, quote=False) if row[name] else ""
    return row
