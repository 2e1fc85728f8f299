"""Ed25519 signing keys: generating, storing and loading them.

A key pair lives in two files named after its key id (kid):

    KID.key   the private key, PKCS#8 PEM, mode 0600
    KID.pub   the public key, SubjectPublicKeyInfo PEM, mode 0644

A private key that its group or others may read (or write) is refused, as ssh refuses
one, naming the file and the fix (`chmod 600 FILE`).

A kid is 1-64 characters of lowercase letters, digits and ``. _ -``, starting with
a letter or digit; it travels in every event so subscribers know which public key
to check the signature with. Rotation means a new kid, trusted before it signs.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import nacl.exceptions
import nacl.signing
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from configbus.errors import KeyringError

__all__ = [
    "KID",
    "SigningKey",
    "VerifyKey",
    "check_kid",
    "check_not_writable_by_others",
    "generate_keypair",
    "public_key_from_pem",
]

KID: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def check_kid(kid: str | None) -> str:
    """`kid` if well formed; raises `KeyringError` otherwise."""
    if not kid:
        raise KeyringError("a key id (kid) is required")
    if not isinstance(kid, str) or not KID.fullmatch(kid):
        raise KeyringError(
            f"malformed key id {kid!r}: use 1-64 of a-z 0-9 . _ -, starting with a letter or digit"
        )
    return kid


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """A trusted public key. Signatures are checked with libsodium (PyNaCl), about
    twice as fast here as OpenSSL's Ed25519, since every subscriber verifies every
    event; the key itself stays a `cryptography` key for its PEM forms."""

    kid: str
    key: Ed25519PublicKey = field(repr=False)
    _sodium: nacl.signing.VerifyKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        raw = self.key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        object.__setattr__(self, "_sodium", nacl.signing.VerifyKey(raw))

    def verify(self, signature: bytes, data: bytes) -> bool:
        if len(signature) != 64:
            return False
        try:
            self._sodium.verify(data, signature)
        except nacl.exceptions.BadSignatureError:
            return False
        return True

    def pem(self) -> str:
        return self.key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private key with its kid. Its repr never shows key material."""

    kid: str
    key: Ed25519PrivateKey = field(repr=False)

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data)

    @property
    def public(self) -> VerifyKey:
        return VerifyKey(self.kid, self.key.public_key())

    @classmethod
    def load(cls, path: str | os.PathLike[str], kid: str | None) -> SigningKey:
        """The PKCS#8 PEM private key at `path`, under key id `kid` (required). Refused
        when the file's group or others have any access to it."""
        try:
            kid = check_kid(kid)
        except KeyringError as exc:
            raise KeyringError(f"{path}: {exc}") from None
        return cls(kid, load_private_key(path))


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The Ed25519 private key at `path` (PKCS#8 PEM, not encrypted), once its mode
    shows that only its owner may read it. Raises `KeyringError` naming the file."""
    try:
        with open(path, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            _check_private_mode(path, mode)
            data = handle.read()
    except OSError as exc:
        raise KeyringError(f"{path}: cannot read signing key: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyringError(f"{path}: not a PEM private key ({exc.__class__.__name__})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyringError(f"{path}: not an Ed25519 private key")
    return key


def _check_private_mode(path: str | os.PathLike[str], mode: int) -> None:
    """Refuse a private key its group or others may read or write, as ssh does (a key
    others can read is no longer private; one they can write is no longer yours)."""
    if os.name == "posix" and stat.S_ISREG(mode) and mode & 0o077:
        raise KeyringError(
            f"{path}: permissions {stat.S_IMODE(mode):04o} are too open for a private key "
            f"(group or others have access); fix: chmod 600 {path}"
        )


def check_not_writable_by_others(path: str | os.PathLike[str], what: str) -> None:
    """Refuse a file (a trust file, a trusted public key) that its group or others may
    write: whoever can write it decides which keys are believed. `what` names it."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # reading it says why, in the caller's words
    if os.name == "posix" and mode & 0o022:
        raise KeyringError(
            f"{path}: permissions {stat.S_IMODE(mode):04o} let group or others change this "
            f"{what}; fix: chmod go-w {path}"
        )


def public_key_from_pem(kid: str, pem: str | bytes, where: str) -> VerifyKey:
    """A `VerifyKey` from SubjectPublicKeyInfo PEM text; `where` names it in errors."""
    try:
        data = pem.encode("ascii") if isinstance(pem, str) else pem
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyringError(f"{where}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyringError(f"{where}: not an Ed25519 public key")
    return VerifyKey(kid, key)


def generate_keypair(kid: str, directory: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write a new key pair as ``DIR/KID.key`` (0600) and ``DIR/KID.pub`` (0644). Refuses to
    overwrite an existing key. Returns both paths."""
    kid = check_kid(kid)
    folder = Path(directory)
    private_path, public_path = folder / f"{kid}.key", folder / f"{kid}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise KeyringError(f"{path}: already exists; choose a new kid to rotate")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = private_path
        descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(private_pem)
        path = public_path
        descriptor = os.open(public_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.fchmod(descriptor, 0o644)  # whatever the umask: a trust file may point at it
        with os.fdopen(descriptor, "w", encoding="ascii") as text:
            text.write(VerifyKey(kid, key.public_key()).pem())
    except OSError as exc:
        raise KeyringError(f"{path}: cannot write: {exc.strerror}") from None
    return private_path, public_path
