"""configbus's events against the spec, docs/wire-format.md.

Events sealed by configbus are read by `tests/wire_decoder.py`, an independent
decoder written from the spec with stock msgpack and Ed25519 (no configbus import),
and by OpenSSL's command line. Both decoders must accept and reject the same values
for the same reasons. The worked example of the spec is rebuilt here, so the
document fails the tests the moment it no longer matches the code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from configbus.bus.topics import CONTENT_TYPE, TopicNames
from configbus.crypto import SigningKey, TrustedKey, TrustStore
from configbus.crypto.secrets import LocalKeyProvider, seal_secret
from configbus.errors import SettingsError, VerificationError
from configbus.events import Cause, EventKind, RolloutTag, build_body, open_envelope, rank, seal
from configbus.tree.values import Value, canonical_json, config_hash, freeze, thaw

try:  # tests/ is on sys.path (pytest's default "prepend" import mode)
    import wire_decoder
except ImportError:  # pragma: no cover - tests/ imported as a package
    from tests import wire_decoder

DOC = Path(__file__).resolve().parents[2] / "docs" / "wire-format.md"


def _key(kid: str) -> SigningKey:
    return SigningKey(kid, Ed25519PrivateKey.generate())


SIGNER, OTHER, STRANGER = _key("publisher-1"), _key("publisher-2"), _key("stranger")
TRUST = TrustStore.of(SIGNER.public, OTHER.public)  # STRANGER is not trusted
PUBLIC_KEYS = {key.kid: key.public.pem() for key in (SIGNER, OTHER)}

SMALL = freeze(
    {
        "app": {"name": "shop", "workers": 8, "ratio": 0.25, "tags": ["a", "b"], "on": True},
        "db": {"password": {"$secret": "db/password"}, "replica": None},
        "text": 'grüße\u2028✓ "quoted" \\ \n\t',
        "numbers": {"big": 2**63, "negative": -3, "tiny": 1e-7, "huge": 1.5e300},
    }
)
LARGE = freeze(
    {"services": {f"svc-{i:04d}": {"port": 8000 + i, "weight": i / 7} for i in range(1200)}}
)


def _sealed(
    config: Value = SMALL, key: SigningKey = SIGNER, tenant: str = "acme", **fields: Any
) -> bytes:
    options: dict[str, Any] = {
        "env": "prod",
        "version": 7,
        "detected_at": 1_767_225_600_000_000_000,
        "cause": Cause(sources=("prod/prod.yml",), actor="alice", reason="test"),
        "changed_paths": ("app.workers",),
    }
    options.update(fields)
    return seal(build_body(tenant=tenant, config_json=canonical_json(config), **options), key)


def _configbus_reason(value: Any, trust: TrustStore = TRUST) -> str | None:
    try:
        open_envelope(value, trust)
    except VerificationError as exc:
        return exc.reason
    return None


def _decoder_reason(value: Any, **options: Any) -> str | None:
    try:
        wire_decoder.decode_and_verify(value, PUBLIC_KEYS, **options)
    except wire_decoder.WireError as exc:
        return exc.reason
    return None


# -- good events --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "encoding"), [(SMALL, "json"), (LARGE, "json+zlib")], ids=["small", "large"]
)
def test_the_decoder_reads_what_configbus_seals(config: Value, encoding: str) -> None:
    value = _sealed(config)

    decoded = wire_decoder.decode_and_verify(value, PUBLIC_KEYS)
    verified = open_envelope(value, TRUST)

    assert decoded["body"]["config_encoding"] == verified.body.config_encoding == encoding
    assert decoded["config_json"] == verified.config_json == canonical_json(config)
    assert decoded["body"]["config_hash"] == verified.body.config_hash == config_hash(config)
    assert decoded["config"] == thaw(config)
    assert decoded["kid"] == verified.kid == SIGNER.kid
    if encoding == "json+zlib":
        assert zlib.decompress(decoded["body"]["config"]) == canonical_json(config)


NOW = 1_767_225_600_000_000_000


@pytest.mark.parametrize(
    ("validity", "reason"),
    [
        ((None, None, True), "key_revoked"),
        ((None, NOW, False), "key_expired"),
        ((NOW + 1, None, False), "key_not_yet_valid"),
        ((NOW - 1, NOW + 1, False), None),
    ],
    ids=["revoked", "expired", "not-yet-valid", "in-force"],
)
def test_both_decoders_judge_a_key_by_the_readers_clock_alike(
    validity: tuple[int | None, int | None, bool], reason: str | None
) -> None:
    """§7 step 3: the key that signed must be in force at the reader's clock, whatever
    the event says about when it was issued."""
    not_before, not_after, revoked = validity
    entry = dataclasses.replace(
        TRUST.get(SIGNER.kid), not_before=not_before, not_after=not_after, revoked=revoked
    )
    trust = TRUST.replaced(entry)
    value = _sealed(issued_at=NOW - 10**12)  # issued long before any bound: never used

    try:
        open_envelope(value, trust, now=NOW)
        found = None
    except VerificationError as exc:
        found = exc.reason

    assert found == reason
    assert _decoder_reason(value, validity={SIGNER.kid: validity}, now=NOW) == reason


def _lists(value: Any) -> Any:
    """`value` with its tuples as lists, as msgpack decodes arrays."""
    if isinstance(value, dict):
        return {key: _lists(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return [_lists(item) for item in value]
    return value


def test_both_decoders_see_every_field_alike() -> None:
    value = _sealed(
        kind=EventKind.OVERRIDE,
        version=2**64 - 1,
        issued_at=1_767_225_600_123_456_789,
        expires_at=1_767_229_200_000_000_000,
        cause=Cause(sources=("prod/prod.yml", "store:acme/prod"), actor="bob", reason="incident"),
        changed_paths=("app.workers", "db.password"),
    )

    decoded = wire_decoder.decode_and_verify(value, PUBLIC_KEYS)["body"]
    verified = open_envelope(value, TRUST).body

    expected = _lists(msgspec.to_builtins(verified, builtin_types=(bytes,)))
    assert expected.pop("rollout") is None  # written on candidates only (§5)
    assert decoded == expected
    assert "rollout" not in decoded
    assert decoded["kind"] == "override"
    assert decoded["version"] == 2**64 - 1
    assert decoded["expires_at"] == 1_767_229_200_000_000_000
    assert decoded["cause"] == {
        "sources": ["prod/prod.yml", "store:acme/prod"],
        "actor": "bob",
        "reason": "incident",
    }


def test_the_envelope_is_a_map_with_str_keys_and_bin_payloads() -> None:
    value = _sealed()
    raw = msgpack.unpackb(value, raw=True)  # raw: str and bin stay distinguishable

    assert value[0] == 0x84  # fixmap of 4
    assert list(raw) == [b"v", b"kid", b"sig", b"body"]
    assert value.startswith(bytes.fromhex("84 a1 76 01 a3 6b 69 64"))  # {"v": 1, "kid": ...
    envelope = msgpack.unpackb(value, raw=False)
    assert isinstance(envelope["sig"], bytes)
    assert len(envelope["sig"]) == 64
    assert isinstance(envelope["body"], bytes)
    body = msgpack.unpackb(envelope["body"], raw=False)
    assert list(body) == [*wire_decoder.BODY_FIELDS, "expires_at"]  # the spec's order
    assert body["expires_at"] is None  # written even when nil


def test_topics_headers_and_keys_are_what_the_spec_says() -> None:
    names = TopicNames()

    assert CONTENT_TYPE == wire_decoder.CONTENT_TYPE
    assert names.tenant_topic("acme") == "configbus.tenant.acme"
    assert (names.audit, names.acks) == ("configbus.audit", "configbus.acks")
    assert names.record_key("prod") == b"prod"
    assert names.audit_key("acme", "prod") == b"acme/prod"
    assert wire_decoder.record_stream(names.tenant_topic("acme"), b"prod") == ("acme", "prod")
    assert wire_decoder.record_stream(names.audit, b"acme/prod") == ("acme", "prod")
    with pytest.raises(SettingsError, match="must differ"):
        TopicNames(audit="configbus.shared", acks="configbus.shared")
    with pytest.raises(SettingsError, match="collide"):
        TopicNames(prefix="configbus.", audit="configbus.audit")


def test_public_keys_are_an_spki_prefix_and_the_raw_key() -> None:
    der = SIGNER.key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    raw = SIGNER.key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )

    assert der == bytes.fromhex("302a300506032b6570032100") + raw
    assert SIGNER.public.pem().startswith("-----BEGIN PUBLIC KEY-----\n")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (8.0, "8.0"),
        (0.25, "0.25"),
        (1e-5, "0.00001"),
        (1234567890123456.0, "1234567890123456.0"),
        (1e16, "1e16"),
        (1.5e16, "1.5e16"),
        (1e-6, "1e-6"),
        (2.5e-8, "2.5e-8"),
        (5e-324, "5e-324"),
        (-0.0, "-0.0"),
        (float("nan"), "null"),
        (float("-inf"), "null"),
        (2**70, str(2**70)),
        ("é/\u2028\x7f", '"é/\u2028\x7f"'),
        ('"\\\b\f\n\r\t\x01\x1f', r'"\"\\\b\f\n\r\t\u0001\u001f"'),
        ({"z": 1, "é": 2, "a": 3, "\uff61": 4, "\U0001f600": 5}, None),
    ],
)
def test_canonical_json_is_written_as_the_spec_says(value: Any, text: str | None) -> None:
    if text is None:  # code point order, not UTF-16 order (U+FF61 < U+1F600)
        text = '{"a":3,"z":1,"é":2,"\uff61":4,"\U0001f600":5}'
    assert canonical_json(freeze(value)) == text.encode()


# -- rejections ---------------------------------------------------------------------


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def _envelope(**changes: Any) -> bytes:
    envelope = msgpack.unpackb(_sealed(), raw=False)
    envelope.update(changes)
    return msgpack.packb({k: v for k, v in envelope.items() if v is not ...})


def _body(**changes: Any) -> dict[str, Any]:
    body = msgpack.unpackb(msgpack.unpackb(_sealed(), raw=False)["body"], raw=False)
    body.update(changes)
    return {k: v for k, v in body.items() if v is not ...}


def _signed(body: Any, key: SigningKey = SIGNER, kid: str | None = None) -> bytes:
    data = body if isinstance(body, bytes) else msgpack.packb(body)
    envelope = {"v": 1, "kid": kid or key.kid, "sig": key.sign(data), "body": data}
    return msgpack.packb(envelope)


def _in_sig(value: bytes) -> bytes:
    return _flip(value, value.index(msgpack.unpackb(value)["sig"]) + 10)


def _in_body(at: Callable[[int], int]) -> Callable[[bytes], bytes]:
    def flip(value: bytes) -> bytes:
        body = msgpack.unpackb(value)["body"]
        return _flip(value, value.index(body) + at(len(body)))

    return flip


def _resigned(key: SigningKey, kid: str | None = None) -> Callable[[bytes], bytes]:
    return lambda value: _signed(msgpack.unpackb(value)["body"], key, kid)


def _kid(kid: str) -> Callable[[bytes], bytes]:
    return lambda value: msgpack.packb({**msgpack.unpackb(value), "kid": kid})


TAMPERING: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "flipped first body byte": (_in_body(lambda n: 0), "bad_signature"),
    "flipped body byte": (_in_body(lambda n: n // 2), "bad_signature"),
    "flipped last body byte": (_in_body(lambda n: n - 1), "bad_signature"),
    "flipped sig byte": (_in_sig, "bad_signature"),
    "re-signed by an untrusted key, same kid": (_resigned(STRANGER, SIGNER.kid), "bad_signature"),
    "re-signed by an untrusted key, its kid": (_resigned(STRANGER), "unknown_key"),
    "kid of another trusted key": (_kid(OTHER.kid), "bad_signature"),
    "kid nobody trusts": (_kid("publisher-9"), "unknown_key"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
@pytest.mark.parametrize("config", [SMALL, LARGE], ids=["json", "json+zlib"])
def test_tampered_events_are_rejected_by_both_decoders(case: str, config: Value) -> None:
    tamper, reason = TAMPERING[case]
    value = tamper(_sealed(config))

    assert _configbus_reason(value) == reason
    assert _decoder_reason(value) == reason


def _bad_zlib() -> bytes:
    config = zlib.compress(canonical_json(SMALL))[:-6]
    return _signed(_body(config_encoding="json+zlib", config=config))


CRAFTED: dict[str, tuple[Callable[[], Any], str | None]] = {
    "truncated": (lambda: _sealed()[:-1], "malformed"),
    "trailing byte": (lambda: _sealed() + b"\x00", "malformed"),
    "empty": (lambda: b"", "malformed"),
    "tombstone": (lambda: None, "malformed"),
    "array instead of map": (
        lambda: msgpack.packb(list(msgpack.unpackb(_sealed()).values())),
        "malformed",
    ),
    "bin keys": (
        lambda: msgpack.packb({k.encode(): v for k, v in msgpack.unpackb(_sealed()).items()}),
        "malformed",
    ),
    "no sig": (lambda: _envelope(sig=...), "malformed"),
    "sig as str": (lambda: _envelope(sig="x" * 64), "malformed"),
    "body as str": (lambda: _envelope(body="{}"), "malformed"),
    "v is true": (lambda: _envelope(v=True), "malformed"),
    "short sig": (lambda: _envelope(sig=bytes(63)), "bad_signature"),
    "envelope v2": (lambda: _envelope(v=2), "unknown_schema"),
    "envelope v2, other fields": (
        lambda: msgpack.packb({"v": 2, "payload": b"?"}),
        "unknown_schema",
    ),
    "unknown envelope key": (lambda: _envelope(extra=[1, 2]), None),
    "signed garbage": (lambda: _signed(b"\xc1 garbage"), "malformed"),
    "signed non-map": (lambda: _signed([1, 2, 3]), "malformed"),
    "schema 2": (lambda: _signed(_body(schema=2)), "unknown_schema"),
    "schema 2, other fields": (lambda: _signed({"schema": 2, "data": b"?"}), "unknown_schema"),
    "schema as str": (lambda: _signed(_body(schema="1")), "malformed"),
    "no version": (lambda: _signed(_body(version=...)), "malformed"),
    "float version": (lambda: _signed(_body(version=7.0)), "malformed"),
    "bool version": (lambda: _signed(_body(version=True)), "malformed"),
    "config as str": (lambda: _signed(_body(config="{}")), "malformed"),
    "unknown kind": (lambda: _signed(_body(kind="delta")), "malformed"),
    "int in changed_paths": (lambda: _signed(_body(changed_paths=[1])), "malformed"),
    "cause not a map": (lambda: _signed(_body(cause=["alice"])), "malformed"),
    "str expires_at": (lambda: _signed(_body(expires_at="never")), "malformed"),
    "unknown body key": (lambda: _signed(_body(priority=3)), None),
    "no expires_at, empty cause": (lambda: _signed(_body(expires_at=..., cause={})), None),
    "unknown encoding": (lambda: _signed(_body(config_encoding="json+br")), "unknown_schema"),
    "bad zlib": (_bad_zlib, "malformed"),
    "hash mismatch": (lambda: _signed(_body(config=b'{"app":{}}')), "hash_mismatch"),
    "uppercase hash": (
        lambda: _signed(_body(config_hash=config_hash(SMALL).upper())),
        "hash_mismatch",
    ),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_values_get_the_same_verdict_from_both_decoders(case: str) -> None:
    make, reason = CRAFTED[case]
    value = make()

    assert _configbus_reason(value) == reason
    assert _decoder_reason(value) == reason


def test_a_key_outside_its_scope_is_rejected_by_both_decoders() -> None:
    scoped = TrustStore([TrustedKey(SIGNER.public, frozenset({"acme"}), frozenset({"prod"}))])
    scopes = {SIGNER.kid: (["acme"], ["prod"])}

    for tenant, env, reason in [
        ("acme", "prod", None),
        ("globex", "prod", "untrusted_scope"),
        ("acme", "staging", "untrusted_scope"),
    ]:
        value = _sealed(tenant=tenant, env=env)
        assert _configbus_reason(value, scoped) == reason
        assert _decoder_reason(value, scopes=scopes) == reason


def test_the_decoder_applies_the_subscriber_checks() -> None:
    value = _sealed(version=7)

    assert _decoder_reason(value, stream=("acme", "prod"), last_version=6) is None
    assert _decoder_reason(value, stream=("acme", "staging")) == "wrong_stream"
    assert _decoder_reason(value, stream=("globex", "prod")) == "wrong_stream"
    assert _decoder_reason(value, last_version=7) == "stale_version"
    assert _decoder_reason(value, last_version=8) == "stale_version"


# -- OpenSSL ------------------------------------------------------------------------


def _run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(arg) for arg in args], cwd=cwd, capture_output=True, text=True, check=False
    )


@pytest.fixture(scope="module")
def openssl(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The openssl command, if it can verify Ed25519 over raw input (OpenSSL >= 3.0);
    otherwise the test is skipped, saying why."""
    command = shutil.which("openssl")
    if command is None:
        pytest.skip("no openssl command on PATH")
    folder = tmp_path_factory.mktemp("openssl-probe")
    key = _key("probe")
    (folder / "pub.pem").write_text(key.public.pem())
    (folder / "data.bin").write_bytes(b"probe")
    (folder / "sig.bin").write_bytes(key.sign(b"probe"))
    probe = _verify(command, folder, "data.bin")
    if probe.returncode != 0 or "Signature Verified Successfully" not in probe.stdout:
        version = _run(command, "version").stdout.strip()
        pytest.skip(
            f"{version} cannot verify Ed25519 with pkeyutl -rawin (needs OpenSSL 3.0+): "
            f"{(probe.stdout + probe.stderr).strip()[:200]}"
        )
    return command


def _verify(openssl: str, folder: Path, data: str) -> subprocess.CompletedProcess[str]:
    return _run(
        openssl, "pkeyutl", "-verify", "-pubin", "-inkey", "pub.pem", "-rawin",
        "-in", data, "-sigfile", "sig.bin", cwd=folder,
    )  # fmt: skip


def test_openssl_verifies_a_real_event(openssl: str, tmp_path: Path) -> None:
    envelope = msgpack.unpackb(_sealed(LARGE), raw=False)
    (tmp_path / "pub.pem").write_text(SIGNER.public.pem())
    (tmp_path / "sig.bin").write_bytes(envelope["sig"])
    (tmp_path / "body.bin").write_bytes(envelope["body"])
    (tmp_path / "tampered.bin").write_bytes(_flip(envelope["body"], 100))

    good = _verify(openssl, tmp_path, "body.bin")
    bad = _verify(openssl, tmp_path, "tampered.bin")

    assert (good.returncode, good.stdout.strip()) == (0, "Signature Verified Successfully")
    assert (bad.returncode, bad.stdout.strip()) == (1, "Signature Verification Failure")


# -- the worked example of the spec -------------------------------------------------

EXAMPLE_KEY = SigningKey("example-2026", Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
EXAMPLE_CONFIG = freeze(
    {
        "app": {"name": "shop", "workers": 8, "ratio": 0.25},
        "db": {"password": {"$secret": "db/password"}},
    }
)
EXAMPLE_DETECTED = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z


def _example() -> bytes:
    body = build_body(
        tenant="acme",
        env="prod",
        version=42,
        config_json=canonical_json(EXAMPLE_CONFIG),
        kind=EventKind.SNAPSHOT,
        detected_at=EXAMPLE_DETECTED,
        issued_at=EXAMPLE_DETECTED + 12_345_678,
        cause=Cause(sources=("prod/prod.yml",), actor="alice", reason="more workers"),
        changed_paths=("app.workers",),
    )
    return seal(body, EXAMPLE_KEY)


def _doc_blocks() -> dict[str, str]:
    """The code blocks of the spec marked ``<!-- example:NAME -->``, by NAME."""
    text = DOC.read_text(encoding="utf-8")
    return dict(re.findall(r"<!-- example:(\w+) -->\n```\w*\n(.*?)```", text, re.DOTALL))


def _hex_lines(data: bytes) -> str:
    text = data.hex()
    return "".join(f"{text[i : i + 64]}\n" for i in range(0, len(text), 64))


def test_the_worked_example_is_what_configbus_produces() -> None:
    blocks, value = _doc_blocks(), _example()

    assert set(blocks) == {"pub", "config", "hex", "envelope", "body", "script", "output"}
    assert blocks["hex"] == _hex_lines(value), "docs/wire-format.md §10.2 should read:\n" + (
        _hex_lines(value)
    )
    assert blocks["pub"] == EXAMPLE_KEY.public.pem()
    assert blocks["config"] == canonical_json(EXAMPLE_CONFIG).decode() + "\n"
    assert f"{len(value)} bytes, hex:" in DOC.read_text(encoding="utf-8")


@pytest.mark.parametrize("block", ["envelope", "body"])
def test_the_annotations_of_the_worked_example_point_at_the_right_bytes(block: str) -> None:
    value = _example()
    data = value if block == "envelope" else msgpack.unpackb(value)["body"]
    rows = re.findall(r"^ *(\d+)  ((?:[0-9a-f]{2} )*[0-9a-f]{2})\b", _doc_blocks()[block], re.M)

    assert len(rows) == _doc_blocks()[block].count("\n")  # every line is checked
    for offset, shown in rows:
        expected = bytes.fromhex(shown)
        assert data[int(offset) : int(offset) + len(expected)] == expected, (offset, shown)
    assert rows[0] == ("0", f"{data[0]:02x}")


def test_the_worked_example_reads_as_the_spec_describes_it() -> None:
    decoded = wire_decoder.decode_and_verify(_example(), {"example-2026": _doc_blocks()["pub"]})
    body = decoded["body"]

    assert decoded["config"] == thaw(EXAMPLE_CONFIG)
    assert {k: v for k, v in body.items() if k not in ("config", "config_hash")} == {
        "schema": 1,
        "tenant": "acme",
        "env": "prod",
        "version": 42,
        "kind": "snapshot",
        "issued_at": 1_767_225_600_012_345_678,
        "detected_at": 1_767_225_600_000_000_000,
        "cause": {"sources": ["prod/prod.yml"], "actor": "alice", "reason": "more workers"},
        "changed_paths": ["app.workers"],
        "config_encoding": "json",
        "expires_at": None,
    }
    assert body["config_hash"] == hashlib.sha256(body["config"]).hexdigest()
    assert body["config_hash"] in _doc_blocks()["output"]


def test_the_worked_example_shell_walk_through_runs(openssl: str, tmp_path: Path) -> None:
    missing = [tool for tool in ("bash", "xxd", "sha256sum") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the walk-through needs {', '.join(missing)}")
    blocks = _doc_blocks()
    (tmp_path / "event.hex").write_text(blocks["hex"])
    (tmp_path / "pub.pem").write_text(blocks["pub"])
    (tmp_path / "walk-through.sh").write_text(blocks["script"])

    result = _run("bash", "-e", "walk-through.sh", cwd=tmp_path)

    assert result.stderr == ""
    assert result.stdout == blocks["output"]
    assert (tmp_path / "event.bin").read_bytes() == _example()


# -- sealed secrets (§6, §6.1) --------------------------------------------------------------


def test_a_sealed_secret_in_an_event_opens_with_the_spec_alone() -> None:
    """configbus seals a secret into a config; the independent decoder verifies the
    event without any key-encryption key, then opens the value from §6.1 alone, and a
    value relabelled to another stream, name or version does not open."""
    kek = os.urandom(32)
    provider = LocalKeyProvider({"acme": ("acme-k1", {"acme-k1": kek})})
    texts = [
        seal_secret(provider, "acme", "prod", "db/password", v, f"pw-{v}".encode()).encode()
        for v in (2, 1)
    ]
    config = freeze({"db": {"password": {"$secret": "db/password", "$sealed": texts}}})
    read = wire_decoder.decode_and_verify(_sealed(config), PUBLIC_KEYS)
    reference = read["config"]["db"]["password"]
    assert reference == {"$secret": "db/password", "$sealed": texts}
    assert read["config_json"] == canonical_json(config)
    keks = {"acme-k1": kek}
    opened = [wire_decoder.open_sealed(t, keks, "acme", "prod", "db/password") for t in texts]
    assert opened == [(2, b"pw-2"), (1, b"pw-1")]
    for tenant, env, name in (("other", "prod", "db/password"), ("acme", "dev", "db/password"),
                              ("acme", "prod", "db/other")):  # fmt: skip
        with pytest.raises(wire_decoder.WireError, match="does not open"):
            wire_decoder.open_sealed(texts[0], keks, tenant, env, name)
    relabelled = texts[0].replace("cbsec1.2.", "cbsec1.3.", 1)
    with pytest.raises(wire_decoder.WireError, match="does not open"):
        wire_decoder.open_sealed(relabelled, keks, "acme", "prod", "db/password")


# -- candidates (§5.2) ---------------------------------------------------------------------


def _candidate(**tag: Any) -> bytes:
    fields: dict[str, Any] = {
        "id": "r1",
        "state": "running",
        "strategy": "canary",
        "steps": ("1", "100%"),
        "step": 0,
        "match": {"zone": "a"},
        "below": 2**62,
    }
    rollout = RolloutTag(**{**fields, **tag})
    body = build_body(
        tenant="acme",
        env="prod",
        version=3,
        config_json=b'{"app":{"workers":4}}',
        kind=EventKind.CANDIDATE,
        detected_at=1,
        cause=Cause(),
        rollout=rollout,
    )
    return seal(body, SIGNER)


def test_a_candidate_carries_its_rollout_map_and_both_decoders_select_alike() -> None:
    value = _candidate()
    decoded = wire_decoder.decode_and_verify(value, PUBLIC_KEYS)["body"]
    verified = open_envelope(value, TRUST).body

    assert decoded["kind"] == "candidate"
    assert decoded["rollout"]["below"] == 2**62 and decoded["rollout"]["match"] == {"zone": "a"}
    assert verified.rollout is not None
    instances = [f"web-{n}" for n in range(200)]
    for labels in ({"zone": "a"}, {"zone": "b"}, {}):
        ours = [i for i in instances if verified.rollout.selects(i, labels)]
        theirs = [i for i in instances if wire_decoder.selects(decoded["rollout"], i, labels)]
        assert ours == theirs
    chosen = [i for i in instances if verified.rollout.selects(i, {"zone": "a"})]
    assert 60 < len(chosen) < 140  # a bound of 2^62 selects about half of the ranks
    assert all(rank("r1", i) == wire_decoder.rank("r1", i) for i in instances)


def test_a_candidate_without_its_rollout_is_malformed_for_both_decoders() -> None:
    body = build_body(
        tenant="acme",
        env="prod",
        version=3,
        config_json=b"{}",
        kind=EventKind.CANDIDATE,
        detected_at=1,
        cause=Cause(),
    )
    value = seal(body, SIGNER)

    with pytest.raises(VerificationError) as ours:
        open_envelope(value, TRUST)
    with pytest.raises(wire_decoder.WireError) as theirs:
        wire_decoder.decode_and_verify(value, PUBLIC_KEYS)
    assert ours.value.reason == theirs.value.reason == "malformed"


def test_an_ended_rollout_selects_nobody_for_both_decoders() -> None:
    value = _candidate(state="aborted", below=2**63)
    decoded = wire_decoder.decode_and_verify(value, PUBLIC_KEYS)["body"]
    verified = open_envelope(value, TRUST).body

    assert verified.rollout is not None and not verified.rollout.selects("web-1", {"zone": "a"})
    assert not wire_decoder.selects(decoded["rollout"], "web-1", {"zone": "a"})
