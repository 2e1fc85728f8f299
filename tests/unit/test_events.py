"""Event envelopes: sealing, and `open_envelope` refusing each kind of bad value with
its own reason. Also `changed_paths`, the event's summary of what changed."""

from __future__ import annotations

import hashlib
import time
import zlib
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from configbus.crypto import SigningKey, TrustedKey, TrustStore
from configbus.errors import VerificationError
from configbus.events import (
    COMPRESS_ABOVE,
    Cause,
    Envelope,
    EventBody,
    EventKind,
    build_body,
    open_envelope,
    seal,
)
from configbus.tree.diff import changed_paths
from configbus.tree.values import SecretRef, Value, canonical_json, freeze

KEY = SigningKey("publisher-1", Ed25519PrivateKey.generate())
STRANGER = SigningKey("stranger", Ed25519PrivateKey.generate())
TRUST = TrustStore.of(KEY.public)
CONFIG = canonical_json(freeze({"app": {"name": "shop", "workers": 8}}))


def _body(config_json: bytes = CONFIG, **fields: Any) -> EventBody:
    options: dict[str, Any] = {
        "tenant": "acme",
        "env": "prod",
        "version": 3,
        "detected_at": 1_767_225_600_000_000_000,
        "cause": Cause(actor="alice"),
    }
    return build_body(config_json=config_json, **(options | fields))


def _sign(body: bytes, key: SigningKey = KEY, v: int = 1) -> bytes:
    """An envelope around `body` bytes, however wrong they are, validly signed."""
    return msgspec.msgpack.encode(Envelope(v, key.kid, key.sign(body), body))


def _signed(body: EventBody, **changes: Any) -> bytes:
    """`body` with `changes` (which `build_body` would never make), signed."""
    return _sign(msgspec.msgpack.encode(msgspec.structs.replace(body, **changes)))


def _reject(value: Any, trust: TrustStore = TRUST) -> VerificationError:
    with pytest.raises(VerificationError) as caught:
        open_envelope(value, trust)
    assert str(caught.value).startswith(f"{caught.value.reason}: ")
    return caught.value


# -- a good event -------------------------------------------------------------------


def test_a_sealed_event_opens_with_every_field_intact() -> None:
    body = _body(
        version=41,
        kind=EventKind.ROLLBACK,
        issued_at=1_767_225_600_500_000_000,
        cause=Cause(sources=("prod/prod.yml", "store:acme/prod"), actor="bob", reason="undo"),
        changed_paths=("app.workers",),
        expires_at=1_767_229_200_000_000_000,
    )

    event = open_envelope(seal(body, KEY), TRUST)

    assert event.body == body
    assert event.kid == "publisher-1"
    assert event.stream == ("acme", "prod")
    assert event.config_json == CONFIG
    assert event.body.config_hash == hashlib.sha256(CONFIG).hexdigest()
    assert event.body.schema == 1


def test_build_body_stamps_issued_at_with_the_current_time() -> None:
    before = time.time_ns()
    body = _body()
    after = time.time_ns()

    assert before <= body.issued_at <= after
    assert body.kind is EventKind.SNAPSHOT
    assert body.expires_at is None
    assert body.changed_paths == ()


def _json_of_length(size: int) -> bytes:
    padding = size - len(b'{"pad":""}')
    return b'{"pad":"' + b"x" * padding + b'"}'


@pytest.mark.parametrize(
    ("size", "encoding"),
    [
        (2, "json"),
        (COMPRESS_ABOVE, "json"),
        (COMPRESS_ABOVE + 1, "json+zlib"),
        (200_000, "json+zlib"),
    ],
)
def test_small_configs_travel_as_is_and_large_ones_compressed(size: int, encoding: str) -> None:
    config_json = _json_of_length(size) if size > 2 else b"{}"
    assert len(config_json) == size

    body = _body(config_json)
    event = open_envelope(seal(body, KEY), TRUST)

    assert body.config_encoding == encoding
    assert body.config_hash == hashlib.sha256(config_json).hexdigest()  # of the plain JSON
    if encoding == "json":
        assert body.config == config_json
    else:
        assert zlib.decompress(body.config) == config_json
        assert len(body.config) < size
    assert event.config_json == config_json


# -- every reason to refuse ---------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [b"", b"not msgpack at all", b"\xc1", msgspec.msgpack.encode(42), msgspec.msgpack.encode([1])],
    ids=["empty", "text", "invalid-opcode", "int", "array"],
)
def test_bytes_that_are_no_envelope_are_malformed(value: bytes) -> None:
    assert _reject(value).reason == "malformed"


def test_an_envelope_with_trailing_or_missing_bytes_is_malformed() -> None:
    value = seal(_body(), KEY)

    assert _reject(value + b"\x00").reason == "malformed"
    assert _reject(value[:-1]).reason == "malformed"


def test_signed_garbage_is_malformed_but_only_after_its_signature_is_checked() -> None:
    garbage = b"\x93\x01\x02"  # a msgpack array, not a body

    assert _reject(_sign(garbage)).reason == "malformed"
    assert _reject(_sign(b"\xc1\xc1")).reason == "malformed"
    # Not decoded at all when the signature is wrong or the key unknown:
    assert _reject(_sign(garbage, STRANGER)).reason == "unknown_key"
    forged = msgspec.msgpack.encode(Envelope(1, KEY.kid, STRANGER.sign(garbage), garbage))
    assert _reject(forged).reason == "bad_signature"


def test_a_body_field_of_the_wrong_type_is_malformed() -> None:
    fields = msgspec.to_builtins(_body(), builtin_types=(bytes,))

    for name, wrong in [("version", "3"), ("kind", "delta"), ("config", "{}"), ("cause", [])]:
        assert _reject(_sign(msgspec.msgpack.encode(fields | {name: wrong}))).reason == "malformed"


def test_an_unknown_envelope_version_is_unknown_schema() -> None:
    body = msgspec.msgpack.encode(_body())

    error = _reject(_sign(body, v=2))
    assert error.reason == "unknown_schema"
    assert "envelope version 2" in str(error)
    # ... also when version 2 envelopes look nothing like version 1:
    assert _reject(msgspec.msgpack.encode({"v": 2, "payload": b"?"})).reason == "unknown_schema"


def test_an_unknown_body_schema_is_unknown_schema() -> None:
    error = _reject(_signed(_body(), schema=2))
    assert error.reason == "unknown_schema"
    assert "body schema 2" in str(error)
    # ... also when schema 2 bodies look nothing like schema 1:
    other = msgspec.msgpack.encode({"schema": 2, "changes": [{"op": "set"}]})
    assert _reject(_sign(other)).reason == "unknown_schema"


def test_an_unknown_config_encoding_is_unknown_schema() -> None:
    assert _reject(_signed(_body(), config_encoding="json+br")).reason == "unknown_schema"


def test_an_unknown_kid_is_unknown_key() -> None:
    error = _reject(seal(_body(), STRANGER))

    assert error.reason == "unknown_key"
    assert "'stranger'" in str(error)


def test_a_broken_signature_is_bad_signature() -> None:
    value = seal(_body(), KEY)
    envelope = msgspec.msgpack.decode(value, type=Envelope)
    flipped_sig = bytes([envelope.sig[0] ^ 1]) + envelope.sig[1:]
    flipped_body = envelope.body[:-1] + bytes([envelope.body[-1] ^ 1])

    for sig, body in [
        (flipped_sig, envelope.body),
        (envelope.sig, flipped_body),
        (b"", envelope.body),
    ]:
        tampered = msgspec.msgpack.encode(Envelope(1, KEY.kid, sig, body))
        assert _reject(tampered).reason == "bad_signature"
    # Another trusted key's kid on this key's signature:
    other = SigningKey("publisher-2", Ed25519PrivateKey.generate())
    relabelled = msgspec.msgpack.encode(Envelope(1, other.kid, envelope.sig, envelope.body))
    assert _reject(relabelled, TrustStore.of(KEY.public, other.public)).reason == "bad_signature"


def test_a_key_signing_outside_its_scope_is_untrusted_scope() -> None:
    acme_prod = TrustStore([TrustedKey(KEY.public, frozenset({"acme"}), frozenset({"prod"}))])

    assert open_envelope(seal(_body(), KEY), acme_prod).stream == ("acme", "prod")
    error = _reject(seal(_body(tenant="globex"), KEY), acme_prod)
    assert error.reason == "untrusted_scope"
    assert "globex/prod" in str(error)
    assert _reject(seal(_body(env="staging"), KEY), acme_prod).reason == "untrusted_scope"


def test_a_config_that_does_not_match_its_hash_is_hash_mismatch() -> None:
    body = _body()

    assert _reject(_signed(body, config=b'{"app":{}}')).reason == "hash_mismatch"
    assert _reject(_signed(body, config_hash=body.config_hash.upper())).reason == "hash_mismatch"


def test_a_config_that_is_not_zlib_data_is_malformed() -> None:
    compressed = zlib.compress(CONFIG)
    body = _body()

    for bad in [b"not zlib", compressed[:-4], compressed[:2]]:
        error = _reject(_signed(body, config_encoding="json+zlib", config=bad))
        assert error.reason == "malformed"
    assert "zlib" in str(error)
    good = _signed(body, config_encoding="json+zlib", config=compressed)
    assert open_envelope(good, TRUST).config_json == CONFIG


# -- changed_paths --------------------------------------------------------------------


def test_changed_paths_lists_added_removed_and_changed_leaves_sorted() -> None:
    old = freeze({"app": {"name": "shop", "workers": 4}, "db": {"host": "a", "port": 1}})
    new = freeze({"app": {"name": "shop", "workers": 8, "debug": True}, "db": {"host": "a"}})

    assert changed_paths(old, new) == ["app.debug", "app.workers", "db.port"]


def test_changed_paths_of_a_first_config_lists_every_leaf() -> None:
    new = freeze({"b": 1, "a": {"y": [1, 2], "x": {"$secret": "s"}}, "empty": {}})

    assert changed_paths(None, new) == ["a.x", "a.y", "b"]


def test_a_list_is_one_leaf() -> None:
    old = freeze({"hosts": ["a", "b", "c"], "same": [1, {"k": 2}]})
    new = freeze({"hosts": ["a", "x", "c", "d"], "same": [1, {"k": 2}]})

    assert changed_paths(old, new) == ["hosts"]


def test_a_switch_between_mapping_and_scalar_lists_both_sides() -> None:
    old = freeze({"cache": {"host": "r", "port": 6379}, "log": "info"})
    new = freeze({"cache": False, "log": {"level": "info"}})

    assert changed_paths(old, new) == ["cache", "cache.host", "cache.port", "log", "log.level"]


def test_a_change_between_equal_values_of_other_types_counts() -> None:
    old = freeze({"a": 1, "b": 1, "c": 0, "l": [1, 2], "m": {"x": 0}})
    new = freeze({"a": 1.0, "b": True, "c": 0, "l": [1, 2.0], "m": {"x": False}})

    assert old == new  # for Python; not for JSON, nor for the config hash
    assert changed_paths(old, new) == ["a", "b", "l", "m.x"]


def test_secret_references_compare_by_name() -> None:
    old = freeze({"db": {"password": SecretRef("db/old"), "token": SecretRef("t")}})
    new = freeze({"db": {"password": SecretRef("db/new"), "token": SecretRef("t")}})

    assert changed_paths(old, new) == ["db.password"]


class _Untouchable(dict[str, Value]):
    """A subtree that fails the test if anything looks inside it or compares it."""

    def _refuse(self, *args: object) -> Any:
        raise AssertionError("looked inside a shared subtree")

    __getitem__ = __iter__ = __len__ = __eq__ = __ne__ = keys = items = values = _refuse
    __hash__ = None  # type: ignore[assignment]


def test_identical_subtrees_are_skipped_without_looking_inside() -> None:
    shared = _Untouchable({"k": 1})
    old = {"shared": shared, "app": freeze({"workers": 4})}
    new = {"shared": shared, "app": freeze({"workers": 8})}

    assert changed_paths(old, new) == ["app.workers"]


def test_equal_subtrees_that_are_not_shared_give_no_paths() -> None:
    old = freeze({"a": {"b": [1, {"c": "x"}], "d": {"e": None}}})
    new = freeze({"a": {"b": [1, {"c": "x"}], "d": {"e": None}}})

    assert changed_paths(old, new) == []
    assert changed_paths(None, freeze({})) == []
