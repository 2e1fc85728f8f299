"""Signing keys, the trust policy that decides which keys a subscriber believes."""

from configbus.crypto.keys import (
    SigningKey,
    VerifyKey,
    check_kid,
    generate_keypair,
    public_key_from_pem,
)
from configbus.crypto.trust import TrustedKey, TrustStore

__all__ = [
    "SigningKey",
    "TrustStore",
    "TrustedKey",
    "VerifyKey",
    "check_kid",
    "generate_keypair",
    "public_key_from_pem",
]
