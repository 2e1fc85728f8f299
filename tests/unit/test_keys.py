"""Signing keys and trust files: `configbus keys generate`, loading keys, and the
errors a person gets for an unusable key or trust file (one line, naming the file)."""

from __future__ import annotations

import base64
import os
import re
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from configbus.cli import main
from configbus.crypto import SigningKey, TrustStore, generate_keypair
from configbus.errors import KeyringError

# An EC key on secp112r1, a curve `cryptography` cannot load (a throwaway test key).
UNSUPPORTED_CURVE = """\
-----BEGIN EC PRIVATE KEY-----
MD4CAQEEDn4vZ66fNVvb6tCV8Y5toAcGBSuBBAAGoSADHgAEh4cQBAm38GMg9RPs
4CFn5dfKWS5/1a8J65dCHQ==
-----END EC PRIVATE KEY-----
"""


def _one_line(text: str) -> str:
    assert text.endswith("\n")
    assert text.count("\n") == 1, text
    return text


def _generate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["keys", "generate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _ec_pem(private: bool) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    if private:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# -- configbus keys generate ----------------------------------------------------------


def test_generate_writes_a_private_key_0600_and_a_public_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "keys" / "new"

    code, stdout, stderr = _generate(capsys, "--kid", "publisher-2026-11", "--out", str(out))

    assert (code, stderr) == (0, "")
    private, public = out / "publisher-2026-11.key", out / "publisher-2026-11.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----\n")  # PKCS#8
    assert private.read_text().endswith("-----END PRIVATE KEY-----\n")
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----\n")  # SPKI
    assert str(private) in stdout
    assert str(public) in stdout
    loaded = serialization.load_pem_private_key(private.read_bytes(), password=None)
    assert isinstance(loaded, Ed25519PrivateKey)
    key = SigningKey.load(private, "publisher-2026-11")
    assert key.public.pem() == public.read_text()
    assert key.public.verify(key.sign(b"data"), b"data")


def test_generate_never_overwrites_a_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _generate(capsys, "--kid", "k1", "--out", str(tmp_path))[0] == 0
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}

    code, stdout, stderr = _generate(capsys, "--kid", "k1", "--out", str(tmp_path))

    assert code == 1
    assert stdout == ""
    assert "already exists" in _one_line(stderr)
    assert str(tmp_path / "k1.key") in stderr
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_generate_refuses_when_only_the_public_key_exists(tmp_path: Path) -> None:
    (tmp_path / "k1.pub").write_text("left over")

    with pytest.raises(KeyringError, match=r"k1\.pub: already exists"):
        generate_keypair("k1", tmp_path)
    assert not (tmp_path / "k1.key").exists()


@pytest.mark.parametrize("kid", ["Publisher", "-lead", "has space", "a/b", "x" * 65, ""])
def test_generate_with_a_malformed_kid_is_a_usage_error(
    kid: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, stdout, stderr = _generate(capsys, f"--kid={kid}", "--out", str(tmp_path / "keys"))

    assert code == 2
    assert stdout == ""
    assert _one_line(stderr).startswith("configbus: ")
    assert "key id" in stderr
    assert not (tmp_path / "keys").exists()


def test_generate_into_a_file_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    occupied = tmp_path / "a-file"
    occupied.write_text("")

    code, _, stderr = _generate(capsys, "--kid", "k1", "--out", str(occupied))

    assert code == 1
    assert str(occupied) in _one_line(stderr)


def test_generate_with_trust_creates_and_then_extends_the_trust_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trust_file, keys = tmp_path / "trust.yml", tmp_path / "keys"

    assert _generate(capsys, "--kid", "old", "--out", str(keys), "--trust", str(trust_file))[0] == 0
    assert TrustStore.load(trust_file).kids == ["old"]
    code, stdout, _ = _generate(
        capsys, "--kid", "new", "--out", str(keys), "--trust", str(trust_file)
    )

    assert code == 0
    assert f"trusted new in {trust_file}" in stdout
    trust = TrustStore.load(trust_file)
    assert trust.kids == ["new", "old"]
    for kid in ("old", "new"):
        entry = trust.get(kid)
        assert entry is not None
        assert entry.key.pem() == (keys / f"{kid}.pub").read_text()
        assert entry.covers("any-tenant", "any-env")


def test_generate_with_a_broken_trust_file_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trust_file = tmp_path / "trust.yml"
    trust_file.write_text("publishers: [\n")

    code, _, stderr = _generate(
        capsys, "--kid", "k1", "--out", str(tmp_path), "--trust", str(trust_file)
    )

    assert code == 1
    assert str(trust_file) in _one_line(stderr)
    assert trust_file.read_text() == "publishers: [\n"


# -- SigningKey.load ------------------------------------------------------------------


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    private, _ = generate_keypair("k1", tmp_path)
    return private


def _load_error(path: Path, kid: str | None = "k1") -> str:
    with pytest.raises(KeyringError) as caught:
        SigningKey.load(str(path), kid)
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message
    return message


def test_loading_a_missing_key_file(tmp_path: Path) -> None:
    assert "cannot read signing key" in _load_error(tmp_path / "nope.key")
    assert "cannot read signing key" in _load_error(tmp_path)  # a folder


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"hello, not a key\n", "not a PEM private key"),
        (b"", "not a PEM private key"),
        (UNSUPPORTED_CURVE.encode(), "not a PEM private key"),
        (_ec_pem(private=True), "not an Ed25519 private key"),
        (_ec_pem(private=False), "not a PEM private key"),  # a public key
    ],
    ids=["text", "empty", "unsupported-curve", "ec-key", "public-key"],
)
def test_loading_a_file_that_is_no_ed25519_private_key(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "k1.key"
    path.write_bytes(content)
    path.chmod(0o600)

    assert expected in _load_error(path)


def test_loading_an_encrypted_key(tmp_path: Path) -> None:
    path = tmp_path / "k1.key"
    path.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    path.chmod(0o600)

    assert "not a PEM private key" in _load_error(path)


@pytest.mark.parametrize(
    ("kid", "expected"),
    [(None, "is required"), ("", "is required"), ("Bad Kid", "malformed key id")],
)
def test_loading_without_a_good_kid(key_file: Path, kid: str | None, expected: str) -> None:
    assert expected in _load_error(key_file, kid)


def test_a_signing_key_never_shows_key_material(key_file: Path) -> None:
    key = SigningKey.load(key_file, "k1")
    raw = key.key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    pem_body = "".join(key_file.read_text().splitlines()[1:-1])

    for shown in (repr(key), str(key), f"{key!r}", repr(key.public)):
        assert raw.hex() not in shown
        assert base64.b64encode(raw).decode() not in shown
        assert pem_body not in shown
        assert "PRIVATE" not in shown
    assert repr(key) == "SigningKey(kid='k1')"
    assert repr(key.public) == "VerifyKey(kid='k1')"


# -- trust files ----------------------------------------------------------------------


def _pub(tmp_path: Path, kid: str) -> str:
    folder = tmp_path / "generated"
    if not (folder / f"{kid}.pub").exists():
        generate_keypair(kid, folder)
    return (folder / f"{kid}.pub").read_text()


def _entry(kid: str, pem: str, extra: str = "") -> str:
    lines = [f"  - kid: {kid}", "    public_key: |"]
    lines += [f"      {row}" for row in pem.strip().splitlines()]
    lines += [f"    {row}" for row in extra.splitlines()]
    return "\n".join(lines) + "\n"


def _trust_error(path: Path) -> str:
    with pytest.raises(KeyringError) as caught:
        TrustStore.load(str(path))
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message
    return message


def test_a_trust_file_with_scopes_and_a_relative_public_key_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "etc" / "configbus"
    (config / "keys").mkdir(parents=True)
    (config / "keys" / "ops.pub").write_text(_pub(tmp_path, "ops"))
    trust_file = config / "trust.yml"
    trust_file.write_text(
        "# configbus trust file\npublishers:\n"
        + _entry("main", _pub(tmp_path, "main"))
        + "  - kid: ops\n"
        "    public_key_file: keys/ops.pub\n"
        "    tenants: [acme]\n"
        "    environments: [staging, prod]\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative to the trust file, not the working directory

    trust = TrustStore.load(trust_file)

    assert trust.kids == ["main", "ops"]
    ops, main_key = trust.get("ops"), trust.get("main")
    assert ops is not None
    assert main_key is not None
    assert ops.key.pem() == _pub(tmp_path, "ops")
    assert ops.covers("acme", "prod")
    assert not ops.covers("acme", "dev")
    assert not ops.covers("globex", "prod")
    assert main_key.covers("globex", "dev")
    assert TrustStore.load(_written(tmp_path / "again.yml", trust.dump())).kids == trust.kids


def _written(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_a_trust_file_that_cannot_be_read(tmp_path: Path) -> None:
    assert "cannot read trust file" in _trust_error(tmp_path / "missing.yml")
    assert "not UTF-8" in _trust_error(_written(tmp_path / "t.yml", b"\xff\xfe\x00\x01"))


def test_a_trust_file_that_is_not_yaml_names_the_line(tmp_path: Path) -> None:
    path = _written(tmp_path / "t.yml", "publishers:\n  - kid: a\n    public_key: [\n")

    message = _trust_error(path)

    assert re.fullmatch(rf"{re.escape(str(path))}:\d+: trust file is not valid YAML", message)


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "publishers: {}\n"])
def test_a_trust_file_without_a_publishers_list(tmp_path: Path, text: str) -> None:
    assert "'publishers' or 'operators' list" in _trust_error(_written(tmp_path / "t.yml", text))


def test_a_misspelt_publishers_list_is_named(tmp_path: Path) -> None:
    message = _trust_error(_written(tmp_path / "t.yml", "publisher:\n  - kid: a\n"))

    assert "unknown key 'publisher' (known: operators, publishers)" in message


def test_a_trust_file_listing_a_kid_twice(tmp_path: Path) -> None:
    pem = _pub(tmp_path, "a")
    path = _written(tmp_path / "t.yml", "publishers:\n" + _entry("a", pem) + _entry("a", pem))

    assert "'a' is listed twice" in _trust_error(path)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("  - just-a-string\n", "publishers[0]: must be a mapping"),
        ("  - public_key: x\n", "publishers[0]: a key id (kid) is required"),
        ("  - kid: Not_OK\n", "publishers[0]: malformed key id 'Not_OK'"),
        ("  - kid: a\n", "publisher 'a': needs public_key"),
        ("  - kid: a\n    public_key: not a pem\n", "publisher 'a': not a PEM public key"),
        ("  - kid: a\n    public_key: grüße\n", "publisher 'a': not a PEM public key"),
        ("  - kid: a\n    public_key_file: nope.pub\n", "publisher 'a': cannot read"),
    ],
)
def test_a_malformed_trust_entry_is_named(tmp_path: Path, entry: str, expected: str) -> None:
    assert expected in _trust_error(_written(tmp_path / "t.yml", "publishers:\n" + entry))


def test_a_trust_entry_with_a_non_ed25519_key(tmp_path: Path) -> None:
    path = _written(tmp_path / "t.yml", "publishers:\n" + _entry("a", _ec_pem(False).decode()))

    assert "publisher 'a': not an Ed25519 public key" in _trust_error(path)


@pytest.mark.parametrize("scope", ["tenants: acme", "environments: [1, 2]", "tenants: {a: 1}"])
def test_a_trust_entry_with_a_malformed_scope(tmp_path: Path, scope: str) -> None:
    path = _written(tmp_path / "t.yml", "publishers:\n" + _entry("a", _pub(tmp_path, "a"), scope))

    assert "must be a list of names" in _trust_error(path)


def test_generated_private_keys_are_not_readable_by_others(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        private, public = generate_keypair("k1", tmp_path)
    finally:
        os.umask(old)

    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
