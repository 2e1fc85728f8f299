"""The audit trail's hash chain: every audit record carries a signed link to the one
before it, so a record added, dropped, altered or moved shows.

A *chain* is the sequence of audit records one transactional writer wrote; its name is
that writer's Kafka transactional id (the publisher's, ``configbus-publisher.<prefix>``,
or a stream's operator writer, ``configbus-override.<prefix><tenant>.<env>``). Kafka
fences every other producer with the same id, so a chain has one writer at a time and
its links form a line.

Each audit record carries, in its ``configbus-chain`` header, a `ChainLink` sealed like
an event (an envelope: key id, Ed25519 signature, body)::

    {chain, seq, prev, digest, at, stream}

`seq` counts the chain's records from 1; `prev` is the SHA-256 of the previous link's
sealed bytes ("" for the first); `digest` is the SHA-256 of the record's key and value,
so the link pins the record it rides on. The writer keeps its chain's *head* (the last
link) where it writes anyway, in the same transaction: the publisher on its state topic
(key ``$chain``), a stream's operator writer on the tenant topic (key ``<env>/chain``).
`configbus audit verify` walks the links (configbus/ops/audit.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import msgspec

from configbus.bus import Headers
from configbus.crypto import SigningKey, TrustedKey, TrustStore
from configbus.errors import VerificationError
from configbus.events import ENVELOPE_VERSION, Envelope, check_signature, now_ns

__all__ = [
    "CHAIN_HEADER",
    "PUBLISHER_CHAIN_KEY",
    "ChainHead",
    "ChainLink",
    "chain_records",
    "open_link",
    "record_digest",
]

CHAIN_HEADER: Final = "configbus-chain"
PUBLISHER_CHAIN_KEY: Final = b"$chain"  # the publisher's head, on the state topic


class ChainLink(msgspec.Struct, frozen=True, kw_only=True, tag="link"):
    chain: str  # the writer's transactional id
    seq: int  # 1, 2, ... within the chain
    prev: str  # hex SHA-256 of the previous link's sealed bytes; "" for seq 1
    digest: str  # hex SHA-256 of the record's key and value (`record_digest`)
    at: int  # ns since the epoch, the writer's clock
    stream: str = ""  # "<tenant>/<env>" for a stream's chain; "" for the publisher's


_encoder: Final = msgspec.msgpack.Encoder()
_envelope_decoder: Final = msgspec.msgpack.Decoder(Envelope)
_link_decoder: Final = msgspec.msgpack.Decoder(ChainLink)


def record_digest(key: bytes | None, value: bytes | None) -> str:
    """SHA-256 of a record's key and value, each length-prefixed (no two records with
    different keys or values share it)."""
    digest = hashlib.sha256()
    for part in (key, value):
        data = part or b""
        digest.update(len(data).to_bytes(8, "big") if part is not None else b"\xff" * 8)
        digest.update(data)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class ChainHead:
    """Where a chain stands: its last link's number and hash (0 and "" before the
    first). `link` makes the next link; a writer keeps the head it returns only once
    the transaction that carried the link commits."""

    chain: str
    seq: int = 0
    hash: str = ""
    stream: str = ""

    def link(
        self, key: bytes | None, value: bytes, signer: SigningKey, *, at: int | None = None
    ) -> tuple[bytes, ChainHead]:
        """The sealed link for the record (`key`, `value`), and the head after it."""
        link = ChainLink(
            chain=self.chain,
            seq=self.seq + 1,
            prev=self.hash,
            digest=record_digest(key, value),
            at=at if at is not None else now_ns(),
            stream=self.stream,
        )
        body = _encoder.encode(link)
        sealed = _encoder.encode(Envelope(ENVELOPE_VERSION, signer.kid, signer.sign(body), body))
        return sealed, ChainHead(self.chain, link.seq, link_hash(sealed), self.stream)

    @classmethod
    def of(cls, sealed: bytes, link: ChainLink) -> ChainHead:
        """The head a chain stands at after `link` (whose sealed bytes are `sealed`)."""
        return cls(link.chain, link.seq, link_hash(sealed), link.stream)


Outgoing = tuple[str, bytes, bytes, Headers]  # (topic, key, value, headers)


def chain_records(
    head: ChainHead,
    signer: SigningKey,
    records: Sequence[Outgoing],
    *,
    audit_topic: str,
    head_at: tuple[str, bytes],
) -> tuple[list[Outgoing], ChainHead]:
    """`records` with a link on each record for `audit_topic` (in their order), then,
    when there was one, the chain's new head as a record for `head_at` (topic, key);
    and that head, the writer's once the transaction carrying them commits."""
    out: list[Outgoing] = []
    last = b""
    for topic, key, value, headers in records:
        if topic == audit_topic:
            last, head = head.link(key, value, signer)
            headers = (*headers, (CHAIN_HEADER, last))
        out.append((topic, key, value, headers))
    if last:
        out.append((*head_at, last, ()))
    return out, head


def link_hash(sealed: bytes) -> str:
    return hashlib.sha256(sealed).hexdigest()


def open_link(sealed: bytes, trust: TrustStore) -> tuple[ChainLink, TrustedKey]:
    """Verify a sealed link and decode it. The key must have been in force when the
    link says it was written (a key retired since still vouches for what it signed
    before); a revoked key vouches for nothing. Raises `VerificationError`."""
    try:
        envelope = _envelope_decoder.decode(sealed)
        link = _link_decoder.decode(envelope.body)
    except (msgspec.DecodeError, TypeError, ValueError):
        raise VerificationError("malformed", "not a chain link") from None
    trusted = check_signature(envelope, trust, now=link.at)
    if link.seq < 1 or (link.seq == 1) != (link.prev == ""):
        raise VerificationError("malformed", f"link {link.seq} of {link.chain!r} is malformed")
    return link, trusted


def signer_of(sealed: bytes) -> str:
    """The key id a sealed link names (unverified: for messages only)."""
    try:
        return _envelope_decoder.decode(sealed).kid
    except (msgspec.DecodeError, TypeError, ValueError):
        return ""
