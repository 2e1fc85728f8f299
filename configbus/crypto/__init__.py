"""Signing keys, the trust policy that decides which keys a subscriber believes, and the
keys that open sealed secrets."""

from configbus.crypto.keys import (
    SigningKey,
    VerifyKey,
    check_kid,
    generate_keypair,
    public_key_from_pem,
)
from configbus.crypto.secrets import KeyProvider, LocalKeyProvider, SecretReader
from configbus.crypto.trust import OPERATOR, PUBLISHER, TrustedKey, TrustStore

__all__ = [
    "OPERATOR",
    "PUBLISHER",
    "KeyProvider",
    "LocalKeyProvider",
    "SecretReader",
    "SigningKey",
    "TrustStore",
    "TrustedKey",
    "VerifyKey",
    "check_kid",
    "generate_keypair",
    "public_key_from_pem",
]
