"""An independent reader of configbus events, written from docs/wire-format.md alone.

It uses the stock `msgpack` package and `cryptography`'s Ed25519 primitives and
imports nothing from configbus, so the tests can check that what configbus puts on
the wire is what the spec says: unit tests against `configbus.events.seal`,
integration tests against records read from a real broker. Section numbers (§) refer
to the spec.
"""

from __future__ import annotations

import base64
import hashlib
import json
import zlib
from collections.abc import Collection, Mapping
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import load_pem_public_key

CONTENT_TYPE = b"application/vnd.configbus.event+msgpack; v=1"  # §2.5
KINDS = frozenset({"snapshot", "override", "rollback", "candidate", "command", "waiver"})  # §5
BODY_FIELDS: dict[str, type] = {  # §5: the required body fields and their msgpack types
    "schema": int,
    "tenant": str,
    "env": str,
    "version": int,
    "config_hash": str,
    "kind": str,
    "issued_at": int,
    "detected_at": int,
    "cause": dict,
    "changed_paths": list,
    "config_encoding": str,
    "config": bytes,
}
Scope = tuple[Collection[str], Collection[str]]  # (tenants, environments); "*" is all
# §8 validity of a key: (not_before, not_after, revoked); times in ns, None when absent
Validity = tuple[int | None, int | None, bool]


class WireError(ValueError):
    """An event was rejected; `reason` is the spec's reason code (§7)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def decode_and_verify(
    value: bytes,
    public_keys: Mapping[str, bytes | str],  # kid -> SubjectPublicKeyInfo PEM
    *,
    scopes: Mapping[str, Scope] | None = None,  # kid -> scope; absent: every stream
    stream: tuple[str, str] | None = None,  # (tenant, env) the record was read from
    last_version: int | None = None,  # version last applied to that stream
    max_config_bytes: int = 4 * 1024 * 1024,  # the reader's inflate limit
    validity: Mapping[str, Validity] | None = None,  # kid -> validity; absent: always
    now: int | None = None,  # the reader's clock, ns (needed with `validity`)
) -> dict[str, Any]:
    """The steps of §7 in order. Returns kid, body (a dict, `config` as sent), the
    uncompressed config_json bytes and the parsed config."""
    envelope = _unpack(value, "envelope")  # 1
    if _is_int(envelope.get("v")) and envelope["v"] != 1:
        raise WireError("unknown_schema", f"envelope version {envelope['v']}")
    _need(envelope, {"v": int, "kid": str, "sig": bytes, "body": bytes}, "envelope")
    kid, sig, body_bytes = envelope["kid"], envelope["sig"], envelope["body"]
    if kid not in public_keys:  # 2
        raise WireError("unknown_key", f"kid {kid!r} is not trusted")
    pem = public_keys[kid]
    key = load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    if not isinstance(key, Ed25519PublicKey):
        raise TypeError(f"the key of {kid!r} is not an Ed25519 public key")
    try:  # 3
        key.verify(sig, body_bytes)
    except InvalidSignature:
        raise WireError("bad_signature", f"sig does not verify with {kid!r}") from None
    not_before, not_after, revoked = (validity or {}).get(kid, (None, None, False))
    if revoked:
        raise WireError("key_revoked", f"{kid!r} is revoked")
    if not_after is not None and now is not None and now >= not_after:
        raise WireError("key_expired", f"{kid!r} expired")
    if not_before is not None and now is not None and now < not_before:
        raise WireError("key_not_yet_valid", f"{kid!r} is not valid yet")
    body = _unpack(body_bytes, "body")  # 4
    if _is_int(body.get("schema")) and body["schema"] != 1:  # 5
        raise WireError("unknown_schema", f"body schema {body['schema']}")
    _need(body, BODY_FIELDS, "body")
    cause, expires_at = body["cause"], body.get("expires_at")
    _need(cause, {}, "cause")  # its members are optional (§5)
    sources = cause.get("sources", [])
    texts = [*body["changed_paths"], cause.get("actor", ""), cause.get("reason", "")]
    if not isinstance(sources, list) or not all(isinstance(t, str) for t in texts + sources):
        raise WireError("malformed", "changed_paths or cause holds a non-string")
    if body["kind"] not in KINDS or not (expires_at is None or _is_int(expires_at)):
        raise WireError("malformed", f"kind {body['kind']!r} or expires_at is not valid")
    if body["kind"] == "candidate" and not isinstance(body.get("rollout"), dict):
        raise WireError("malformed", "a candidate without its rollout map (§5.2)")
    tenant, env = body["tenant"], body["env"]
    tenants, envs = (scopes or {}).get(kid, (("*",), ("*",)))  # 6
    if not ({"*", tenant} & set(tenants) and {"*", env} & set(envs)):
        raise WireError("untrusted_scope", f"{kid!r} may not sign {tenant}/{env}")
    if stream is not None and stream != (tenant, env):  # 7
        raise WireError("wrong_stream", f"{tenant}/{env} read from {stream[0]}/{stream[1]}")
    if not 1 <= body["version"] < 2**64:
        raise WireError("malformed", f"version {body['version']} out of range")
    if body["config_encoding"] == "json":  # 8
        config_json = body["config"]
    elif body["config_encoding"] == "json+zlib":
        inflater = zlib.decompressobj()
        try:
            config_json = inflater.decompress(body["config"], max_config_bytes + 1)
        except zlib.error as exc:
            raise WireError("malformed", f"bad zlib data: {exc}") from None
        if len(config_json) > max_config_bytes or inflater.unconsumed_tail:
            raise WireError("too_large", f"config inflates past {max_config_bytes} bytes")
        if not inflater.eof:
            raise WireError("malformed", "truncated zlib data")
    else:
        raise WireError("unknown_schema", f"config_encoding {body['config_encoding']!r}")
    if len(config_json) > max_config_bytes:
        raise WireError("too_large", f"config over {max_config_bytes} bytes")
    if hashlib.sha256(config_json).hexdigest() != body["config_hash"]:  # 9
        raise WireError("hash_mismatch", "config does not hash to config_hash")
    if last_version is not None and body["version"] <= last_version:  # 10
        raise WireError("stale_version", f"version {body['version']} <= {last_version}")
    try:  # 11
        config = json.loads(config_json.decode("utf-8"))
    except ValueError as exc:
        raise WireError("malformed", f"config is not JSON: {exc}") from None
    return {"kid": kid, "body": body, "config_json": config_json, "config": config}


def chain_findings(
    records: list[tuple[bytes | None, bytes | None, Mapping[str, bytes]]],
    public_keys: Mapping[str, bytes | str],
) -> list[tuple[str, int]]:
    """§2.6 over audit records in offset order, as (key, value, headers): the
    findings (kind, index) of links that do not verify (forged), whose digest is not
    their record's (altered; still followed), missing (unchained), and of the chains'
    numbering (dropped, reordered, duplicate, broken). Heads and scopes are left out."""
    findings: list[tuple[str, int]] = []
    chains: dict[str, tuple[int, str]] = {}  # chain -> (last seq, last link hash)
    gaps: dict[str, list[tuple[int, int, int]]] = {}  # chain -> [(first, last, index)]
    for index, (key, value, headers) in enumerate(records):
        sealed = headers.get("configbus-chain")
        if sealed is None:
            findings.append(("unchained", index))
            continue
        envelope = _unpack(sealed, "link envelope")
        kid = envelope.get("kid")
        pem = public_keys.get(kid) if isinstance(kid, str) else None
        if pem is None:
            findings.append(("forged", index))
            continue
        verifier = load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
        assert isinstance(verifier, Ed25519PublicKey)
        try:
            verifier.verify(envelope["sig"], envelope["body"])
        except InvalidSignature:
            findings.append(("forged", index))
            continue
        link = _need(
            _unpack(envelope["body"], "link"),
            {"type": str, "chain": str, "seq": int, "prev": str, "digest": str, "at": int},
            "link",
        )
        digest = hashlib.sha256()
        for part in (key or b"", value or b""):
            digest.update(len(part).to_bytes(8, "big") + part)
        if digest.hexdigest() != link["digest"]:
            findings.append(("altered", index))
        chain, seq = link["chain"], link["seq"]
        this = hashlib.sha256(sealed).hexdigest()
        open_gaps = gaps.setdefault(chain, [])
        if chain not in chains:
            if seq > 1:
                findings.append(("dropped", index))
            chains[chain] = (seq, this)
            continue
        last, last_hash = chains[chain]
        hole = next((g for g in open_gaps if g[0] <= seq <= g[1]), None)
        if hole is not None:
            open_gaps.remove(hole)
            open_gaps += [g for g in ((hole[0], seq - 1, hole[2]), (seq + 1, hole[1], hole[2]))
                          if g[0] <= g[1]]  # fmt: skip
            findings.append(("reordered", index))
        elif seq <= last:
            findings.append(("duplicate", index))
        else:
            if seq > last + 1:
                open_gaps.append((last + 1, seq - 1, index))
            elif link["prev"] != last_hash:
                findings.append(("broken", index))
            chains[chain] = (seq, this)
    for open_gaps in gaps.values():
        findings += [("dropped", index) for _, _, index in sorted(open_gaps)]
    return findings


def rank(rollout_id: str, instance: str) -> int:
    """§5.2: an instance's rank in a rollout."""
    digest = hashlib.sha256(f"{rollout_id}/{instance}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def selects(rollout: Mapping[str, Any], instance: str, labels: Mapping[str, str]) -> bool:
    """§5.2: whether a candidate's rollout map selects an instance with `labels`."""
    if rollout.get("state") != "running":
        return False
    if any(labels.get(name) != value for name, value in rollout.get("match", {}).items()):
        return False
    return rank(rollout["id"], instance) < rollout["below"]


def open_sealed(
    text: str, keks: Mapping[str, bytes], tenant: str, env: str, name: str
) -> tuple[int, bytes]:
    """§6.1: the version and plaintext of a sealed secret of secret `name` of stream
    (tenant, env), with the tenant's KEKs (kek id -> 32 key bytes, as the key file
    provider wraps: 12-byte nonce, then AES-256-GCM). Raises `WireError`
    ("secret", ...) when it is not one or does not open."""
    parts = text.split(".")
    if len(parts) != 6 or parts[0] != "cbsec1" or not parts[1].isdigit():
        raise WireError("secret", "not a cbsec1 sealed secret")
    _, version, kek_id, *encoded = parts
    wrapped, nonce, ciphertext = (
        base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)) for p in encoded
    )
    if kek_id not in keks:
        raise WireError("secret", f"no KEK {kek_id!r}")
    context = b"\x00".join([b"configbus-data-key", tenant.encode(), env.encode()])
    aad = b"\x00".join(
        [b"configbus-secret", tenant.encode(), env.encode(), name.encode(), version.encode()]
    )
    try:
        data_key = AESGCM(keks[kek_id]).decrypt(wrapped[:12], wrapped[12:], context)
        return int(version), AESGCM(data_key).decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        raise WireError("secret", "does not open") from None


def record_stream(
    topic: str, key: bytes, *, prefix: str = "configbus.tenant.", audit: str = "configbus.audit"
) -> tuple[str, str]:
    """The (tenant, env) a record belongs to, by its topic and key (§2.1, §2.3)."""
    if topic == audit:
        tenant, _, env = key.decode("utf-8").partition("/")
        return tenant, env
    if not topic.startswith(prefix):
        raise ValueError(f"{topic!r} is not a configbus topic")
    return topic[len(prefix) :], key.decode("utf-8")


def _unpack(data: bytes, what: str) -> dict[str, Any]:
    """Exactly one msgpack object, a map with str keys (§3)."""
    try:
        obj = msgpack.unpackb(data, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise WireError("malformed", f"{what} is not msgpack: {exc}") from None
    return _need(obj, {}, what)


def _need(obj: Any, fields: Mapping[str, type], what: str) -> dict[str, Any]:
    """`obj` if it is a map with str keys holding `fields` with those types."""
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise WireError("malformed", f"{what} is not a map with str keys")
    for name, kind in fields.items():
        if name not in obj or not (_is_int(obj[name]) if kind is int else type(obj[name]) is kind):
            raise WireError("malformed", f"{what}: {name} missing or not {kind.__name__}")
    return obj


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
