"""How Kafka clients authenticate: the ``CONFIGBUS_KAFKA_*`` variables, their checks,
and the TLS context.

The variables carry librdkafka's setting names and meanings, so a Kafka user reads
them at sight:

    CONFIGBUS_KAFKA_SECURITY_PROTOCOL         PLAINTEXT (default), SSL, SASL_PLAINTEXT, SASL_SSL
    CONFIGBUS_KAFKA_SASL_MECHANISM            SCRAM-SHA-512 (default), SCRAM-SHA-256, PLAIN
    CONFIGBUS_KAFKA_SASL_USERNAME
    CONFIGBUS_KAFKA_SASL_PASSWORD             or CONFIGBUS_KAFKA_SASL_PASSWORD_FILE
    CONFIGBUS_KAFKA_SSL_CA_LOCATION           PEM: the CA of the brokers (default: the system's)
    CONFIGBUS_KAFKA_SSL_CERTIFICATE_LOCATION  PEM: the client's certificate (mutual TLS)
    CONFIGBUS_KAFKA_SSL_KEY_LOCATION          PEM: its private key
    CONFIGBUS_KAFKA_SSL_KEY_PASSWORD          or CONFIGBUS_KAFKA_SSL_KEY_PASSWORD_FILE

One difference: librdkafka's default mechanism is GSSAPI (Kerberos), which configbus
does not speak; ours is SCRAM-SHA-512. Settings that cannot work together are refused
in one line naming the variable: SASL without a username or password, a username or a
TLS file with a protocol that does not use it, a key without a certificate. Passwords
appear in no repr, log line or error message.

The TLS context is made once per set of files (and again when one of them changes on
disk, so a renewed certificate is used by the next connection).
"""

from __future__ import annotations

import functools
import os
import re
import ssl
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from aiokafka.helpers import create_ssl_context

from configbus.errors import SettingsError

if TYPE_CHECKING:
    from configbus.bus.kafka import KafkaSettings

__all__ = [
    "SASL_MECHANISMS",
    "SECURITY_PROTOCOLS",
    "check",
    "client_options",
    "from_environ",
    "uvloop_ok",
]

SECURITY_PROTOCOLS: Final = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS: Final = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")

# KafkaSettings field -> its variable
VARIABLES: Final = {
    "security_protocol": "CONFIGBUS_KAFKA_SECURITY_PROTOCOL",
    "sasl_mechanism": "CONFIGBUS_KAFKA_SASL_MECHANISM",
    "sasl_username": "CONFIGBUS_KAFKA_SASL_USERNAME",
    "sasl_password": "CONFIGBUS_KAFKA_SASL_PASSWORD",
    "ssl_ca_location": "CONFIGBUS_KAFKA_SSL_CA_LOCATION",
    "ssl_certificate_location": "CONFIGBUS_KAFKA_SSL_CERTIFICATE_LOCATION",
    "ssl_key_location": "CONFIGBUS_KAFKA_SSL_KEY_LOCATION",
    "ssl_key_password": "CONFIGBUS_KAFKA_SSL_KEY_PASSWORD",
}
_PROTOCOL: Final = VARIABLES["security_protocol"]
_FILES: Final = ("ssl_ca_location", "ssl_certificate_location", "ssl_key_location")


def from_environ(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The security fields of a `KafkaSettings` from the variables (unset ones are left
    out, so the defaults apply); passwords given as files are read."""
    env = os.environ if environ is None else environ
    found: dict[str, Any] = {}
    for name, variable in VARIABLES.items():
        if value := env.get(variable, ""):
            found[name] = value
    for name in ("sasl_password", "ssl_key_password"):
        variable = f"{VARIABLES[name]}_FILE"
        if path := env.get(variable, ""):
            if name in found:
                raise SettingsError(f"set {VARIABLES[name]} or {variable}, not both")
            found[name] = _read_secret(variable, path)
    for name in ("security_protocol", "sasl_mechanism"):
        if name in found:
            found[name] = found[name].strip().upper()
    return found


def uvloop_ok(environ: Mapping[str, str] | None = None) -> bool:
    """Whether Kafka clients may run on uvloop: not over TLS. uvloop closing a TLS
    connection while a response is still arriving waits out its 30 s shutdown timeout
    (MagicStack/uvloop#471); asyncio's own loop closes it at once."""
    env = os.environ if environ is None else environ
    return not env.get(VARIABLES["security_protocol"], "").strip().upper().endswith("SSL")


def _read_secret(variable: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as exc:
        raise SettingsError(f"{variable}={path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise SettingsError(f"{variable}={path}: not UTF-8 text") from None
    secret = text.rstrip("\r\n")
    if not secret:
        raise SettingsError(f"{variable}={path}: the file is empty")
    return secret


def check(settings: KafkaSettings) -> None:
    """Refuse settings no client can connect with, in one line naming the variable."""
    protocol, mechanism = settings.security_protocol, settings.sasl_mechanism
    if protocol not in SECURITY_PROTOCOLS:
        raise SettingsError(f"{_PROTOCOL}={protocol!r}: say one of {', '.join(SECURITY_PROTOCOLS)}")
    sasl, tls = protocol.startswith("SASL_"), protocol.endswith("SSL")
    if sasl:
        if mechanism not in SASL_MECHANISMS:
            raise SettingsError(
                f"{VARIABLES['sasl_mechanism']}={mechanism!r}: say one of "
                f"{', '.join(SASL_MECHANISMS)}"
            )
        if not settings.sasl_username:
            raise SettingsError(f"{_PROTOCOL}={protocol} needs {VARIABLES['sasl_username']}")
        if not settings.sasl_password:
            raise SettingsError(
                f"{_PROTOCOL}={protocol} needs {VARIABLES['sasl_password']} "
                f"or {VARIABLES['sasl_password']}_FILE"
            )
    else:
        for name in ("sasl_username", "sasl_password"):
            if getattr(settings, name):
                raise SettingsError(
                    f"{VARIABLES[name]} is set, but {_PROTOCOL}={protocol} uses no SASL "
                    "(say SASL_SSL)"
                )
    if not tls:
        for name in (*_FILES, "ssl_key_password"):
            if getattr(settings, name):
                raise SettingsError(
                    f"{VARIABLES[name]} is set, but {_PROTOCOL}={protocol} uses no TLS "
                    f"(say {'SASL_SSL' if sasl else 'SSL'})"
                )
    if settings.ssl_key_location and not settings.ssl_certificate_location:
        raise SettingsError(
            f"{VARIABLES['ssl_key_location']} is set without "
            f"{VARIABLES['ssl_certificate_location']}: a key needs its certificate"
        )
    if settings.ssl_key_password and not settings.ssl_certificate_location:
        raise SettingsError(
            f"{VARIABLES['ssl_key_password']} is set without "
            f"{VARIABLES['ssl_certificate_location']}: there is no key to open"
        )


def client_options(settings: KafkaSettings) -> dict[str, Any]:
    """The keyword arguments of an aiokafka client for `settings`."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "security_protocol": settings.security_protocol,
    }
    if settings.security_protocol.endswith("SSL"):
        options["ssl_context"] = _tls_context(settings)
    if settings.security_protocol.startswith("SASL_"):
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.sasl_username
        options["sasl_plain_password"] = settings.sasl_password
    return options


def _tls_context(settings: KafkaSettings) -> ssl.SSLContext:
    files = tuple(getattr(settings, name) for name in _FILES)
    stamps: list[tuple[int, int] | None] = []
    for name, path in zip(_FILES, files, strict=True):
        if path is None:
            stamps.append(None)
            continue
        try:
            stat = os.stat(path)
        except OSError as exc:
            raise SettingsError(f"{VARIABLES[name]}={path}: {exc.strerror or exc}") from None
        stamps.append((stat.st_mtime_ns, stat.st_size))
    ca, certificate, key = files
    return _loaded(ca, certificate, key, settings.ssl_key_password, tuple(stamps))


@functools.lru_cache(maxsize=32)
def _loaded(
    ca: str | None,
    certificate: str | None,
    key: str | None,
    password: str | None,
    stamps: tuple[object, ...],  # part of the cache key only: a changed file loads again
) -> ssl.SSLContext:
    _check_pem(ca, certificate, key)
    try:
        context: ssl.SSLContext = create_ssl_context(cafile=ca)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise SettingsError(
            f"{VARIABLES['ssl_ca_location']}={ca}: not a PEM CA certificate ({_reason(exc)})"
        ) from None
    if certificate is None:
        return context
    try:
        # The password as a callable: asked for only when the key is encrypted, and
        # an empty answer is refused by OpenSSL rather than prompted for on a terminal.
        context.load_cert_chain(certificate, key, password=lambda: password or "")
    except (OSError, ValueError) as exc:
        where = f"{VARIABLES['ssl_certificate_location']}={certificate}"
        if key is not None:
            where += f", {VARIABLES['ssl_key_location']}={key}"
        raise SettingsError(
            f"{where}: cannot load the certificate and key ({_reason(exc)}; a wrong or "
            f"missing {VARIABLES['ssl_key_password']}, or a key of another certificate?)"
        ) from None
    return context


_PEM_BLOCK: Final = re.compile(rb"^-----BEGIN ([A-Z0-9 ]+)-----\r?$", re.MULTILINE)


def _check_pem(ca: str | None, certificate: str | None, key: str | None) -> None:
    """Each TLS file is PEM and holds what its variable says (OpenSSL's own error for a
    file that is not names no file): one line naming the variable, never the content."""
    if ca is not None and not _has(_blocks("ssl_ca_location", ca), "CERTIFICATE"):
        raise SettingsError(f"{VARIABLES['ssl_ca_location']}={ca}: not a PEM CA certificate")
    if certificate is not None:
        blocks = _blocks("ssl_certificate_location", certificate)
        if not _has(blocks, "CERTIFICATE"):
            raise SettingsError(
                f"{VARIABLES['ssl_certificate_location']}={certificate}: not a PEM certificate"
            )
        if key is None and not _has(blocks, "PRIVATE KEY"):
            raise SettingsError(
                f"{VARIABLES['ssl_certificate_location']}={certificate} holds no private key: "
                f"set {VARIABLES['ssl_key_location']}"
            )
    if key is not None and not _has(_blocks("ssl_key_location", key), "PRIVATE KEY"):
        raise SettingsError(f"{VARIABLES['ssl_key_location']}={key}: not a PEM private key")


def _blocks(name: str, path: str) -> set[str]:
    """The labels of the PEM blocks in the file (CERTIFICATE, EC PRIVATE KEY, ...)."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise SettingsError(f"{VARIABLES[name]}={path}: {exc.strerror or exc}") from None
    return {label.decode() for label in _PEM_BLOCK.findall(data)}


def _has(labels: set[str], kind: str) -> bool:
    """Whether a block is of `kind`: "CERTIFICATE" is also "TRUSTED CERTIFICATE", and
    "PRIVATE KEY" also "EC PRIVATE KEY", "ENCRYPTED PRIVATE KEY", ..."""
    return any(label.endswith(kind) for label in labels)


def _reason(exc: Exception) -> str:
    """OpenSSL's reason (e.g. "PEM lib", "KEY_VALUES_MISMATCH"), never file content."""
    reason = getattr(exc, "reason", None)
    return str(reason) if reason else exc.__class__.__name__
