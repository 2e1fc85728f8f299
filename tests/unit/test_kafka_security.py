"""How Kafka clients authenticate (configbus/bus/security.py, `KafkaSettings`): the
``CONFIGBUS_KAFKA_*`` variables, each combination no client can connect with refused
in one line naming the variable, password files, TLS files checked and loaded once
(and again when one changes), and no password in any repr or error. No broker here:
the secured one is tests/integration/test_security.py's."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    MessageSizeTooLargeError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from configbus.bus import KafkaSettings, security
from configbus.bus.kafka import _broker_error, _bus_error
from configbus.errors import AuthorizationError, BusError, RefusedError, SettingsError

PASSWORD = "s3cret-Pa55word-9f2c"  # must appear in no repr and no error
KEY_PASSWORD = "k3y-Pa55word-71ab"
SERVERS = "broker-1:9093"


@pytest.fixture(autouse=True)
def _no_configbus_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing from the environment the tests run in."""
    for name in [name for name in os.environ if name.startswith("CONFIGBUS_")]:
        monkeypatch.delenv(name)


# -- TLS files ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Pki:
    """A CA, a client certificate it signed with its key (plain and encrypted with
    `KEY_PASSWORD`), the two in one file, and another client's key."""

    ca: Path
    certificate: Path
    key: Path
    encrypted_key: Path
    combined: Path
    other_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey, password: str | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.encode())
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    where = tmp_path_factory.mktemp("pki")
    now = datetime.now(UTC)
    ca_key, client_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("test CA"))
        .issuer_name(_name("test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    client = (
        x509.CertificateBuilder()
        .subject_name(_name("svc-aurora"))
        .issuer_name(ca.subject)
        .public_key(client_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .sign(ca_key, hashes.SHA256())
    )
    pem = client.public_bytes(serialization.Encoding.PEM)
    files = {
        "ca": ca.public_bytes(serialization.Encoding.PEM),
        "certificate": pem,
        "key": _key_pem(client_key),
        "encrypted_key": _key_pem(client_key, KEY_PASSWORD),
        "combined": _key_pem(client_key) + pem,
        "other_key": _key_pem(ec.generate_private_key(ec.SECP256R1())),
    }
    for name, data in files.items():
        (where / f"{name}.pem").write_bytes(data)
    return Pki(**{name: where / f"{name}.pem" for name in files})


def build(**variables: str | Path) -> KafkaSettings:
    """`KafkaSettings.build` with only these ``CONFIGBUS_KAFKA_<NAME>`` variables."""
    environ = {f"CONFIGBUS_KAFKA_{name.upper()}": str(value) for name, value in variables.items()}
    return KafkaSettings.build(SERVERS, environ=environ)


def refusal(**variables: str | Path) -> str:
    """The one-line error `build` refuses these variables with."""
    with pytest.raises(SettingsError) as refused:
        build(**variables)
    message = str(refused.value)
    assert "\n" not in message
    assert PASSWORD not in message and KEY_PASSWORD not in message
    return message


def sasl(protocol: str = "SASL_SSL", **more: str | Path) -> dict[str, str | Path]:
    return {
        "security_protocol": protocol,
        "sasl_username": "svc-aurora",
        "sasl_password": PASSWORD,
        **more,
    }


# -- the variables -----------------------------------------------------------------------
def test_without_variables_the_client_speaks_plaintext() -> None:
    settings = KafkaSettings.build(SERVERS, environ={})
    assert (settings.security_protocol, settings.sasl_username) == ("PLAINTEXT", None)
    assert settings.client_options() == {
        "bootstrap_servers": SERVERS,
        "security_protocol": "PLAINTEXT",
    }


def test_variables_are_read_with_their_librdkafka_meaning(pki: Pki) -> None:
    settings = build(
        security_protocol=" sasl_ssl ",  # as librdkafka: case and spaces do not matter
        sasl_mechanism="scram-sha-256",
        sasl_username="svc-aurora",
        sasl_password=PASSWORD,
        ssl_ca_location=pki.ca,
    )
    assert settings.security_protocol == "SASL_SSL"
    assert settings.sasl_mechanism == "SCRAM-SHA-256"
    assert (settings.sasl_username, settings.sasl_password) == ("svc-aurora", PASSWORD)
    assert settings.ssl_ca_location == str(pki.ca)
    options = settings.client_options()
    assert options["sasl_mechanism"] == "SCRAM-SHA-256"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == (
        "svc-aurora",
        PASSWORD,
    )
    assert isinstance(options["ssl_context"], ssl.SSLContext)
    assert options["ssl_context"].verify_mode == ssl.CERT_REQUIRED


def test_empty_variables_count_as_unset() -> None:
    assert security.from_environ({"CONFIGBUS_KAFKA_SASL_USERNAME": ""}) == {}
    settings = build(security_protocol="", sasl_password_file="")
    assert settings.security_protocol == "PLAINTEXT"


def test_the_bootstrap_servers_come_from_the_argument_then_the_variable() -> None:
    environ = {"CONFIGBUS_BOOTSTRAP_SERVERS": "from-env:9092"}
    assert KafkaSettings.build(environ=environ).bootstrap_servers == "from-env:9092"
    assert KafkaSettings.build("arg:9092", environ=environ).bootstrap_servers == "arg:9092"
    with pytest.raises(SettingsError, match=r"^no Kafka cluster: give --bootstrap-servers"):
        KafkaSettings.build(environ={})


def test_the_process_environment_is_read_when_no_environ_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CONFIGBUS_BOOTSTRAP_SERVERS", SERVERS)
    monkeypatch.setenv("CONFIGBUS_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("CONFIGBUS_KAFKA_SASL_USERNAME", "svc-aurora")
    monkeypatch.setenv("CONFIGBUS_KAFKA_SASL_PASSWORD", PASSWORD)
    settings = KafkaSettings.build(client_id="probe")
    assert (settings.bootstrap_servers, settings.client_id) == (SERVERS, "probe")
    assert settings.security_protocol == "SASL_PLAINTEXT"
    assert "ssl_context" not in settings.client_options()  # SASL without TLS


# -- combinations refused, one line naming the variable -----------------------------------
@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        (
            {"security_protocol": "TLS"},
            "CONFIGBUS_KAFKA_SECURITY_PROTOCOL='TLS': say one of PLAINTEXT, SSL, "
            "SASL_PLAINTEXT, SASL_SSL",
        ),
        (
            sasl(sasl_mechanism="GSSAPI"),
            "CONFIGBUS_KAFKA_SASL_MECHANISM='GSSAPI': say one of SCRAM-SHA-512, "
            "SCRAM-SHA-256, PLAIN",
        ),
        (
            {"security_protocol": "SASL_SSL", "sasl_password": PASSWORD},
            "CONFIGBUS_KAFKA_SECURITY_PROTOCOL=SASL_SSL needs CONFIGBUS_KAFKA_SASL_USERNAME",
        ),
        (
            {"security_protocol": "SASL_SSL", "sasl_username": "svc-aurora"},
            "CONFIGBUS_KAFKA_SECURITY_PROTOCOL=SASL_SSL needs CONFIGBUS_KAFKA_SASL_PASSWORD "
            "or CONFIGBUS_KAFKA_SASL_PASSWORD_FILE",
        ),
        (
            {"sasl_username": "svc-aurora"},
            "CONFIGBUS_KAFKA_SASL_USERNAME is set, but CONFIGBUS_KAFKA_SECURITY_PROTOCOL="
            "PLAINTEXT uses no SASL (say SASL_SSL)",
        ),
        (
            {"security_protocol": "SSL", "sasl_password": PASSWORD},
            "CONFIGBUS_KAFKA_SASL_PASSWORD is set, but CONFIGBUS_KAFKA_SECURITY_PROTOCOL=SSL "
            "uses no SASL (say SASL_SSL)",
        ),
        (
            {"ssl_ca_location": "/etc/kafka/ca.pem"},
            "CONFIGBUS_KAFKA_SSL_CA_LOCATION is set, but CONFIGBUS_KAFKA_SECURITY_PROTOCOL="
            "PLAINTEXT uses no TLS (say SSL)",
        ),
        (
            sasl("SASL_PLAINTEXT", ssl_certificate_location="/etc/kafka/client.pem"),
            "CONFIGBUS_KAFKA_SSL_CERTIFICATE_LOCATION is set, but "
            "CONFIGBUS_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT uses no TLS (say SASL_SSL)",
        ),
        (
            {"ssl_key_password": KEY_PASSWORD},
            "CONFIGBUS_KAFKA_SSL_KEY_PASSWORD is set, but CONFIGBUS_KAFKA_SECURITY_PROTOCOL="
            "PLAINTEXT uses no TLS (say SSL)",
        ),
        (
            {"security_protocol": "SSL", "ssl_key_location": "/etc/kafka/client.key"},
            "CONFIGBUS_KAFKA_SSL_KEY_LOCATION is set without "
            "CONFIGBUS_KAFKA_SSL_CERTIFICATE_LOCATION: a key needs its certificate",
        ),
        (
            {"security_protocol": "SSL", "ssl_key_password": KEY_PASSWORD},
            "CONFIGBUS_KAFKA_SSL_KEY_PASSWORD is set without "
            "CONFIGBUS_KAFKA_SSL_CERTIFICATE_LOCATION: there is no key to open",
        ),
    ],
    ids=[
        "protocol",
        "mechanism",
        "no-username",
        "no-password",
        "username-without-sasl",
        "password-without-sasl",
        "ca-without-tls",
        "certificate-without-tls",
        "key-password-without-tls",
        "key-without-certificate",
        "key-password-without-certificate",
    ],
)
def test_a_combination_no_client_can_use_is_refused_naming_the_variable(
    variables: dict[str, str], expected: str
) -> None:
    assert refusal(**variables) == expected


def test_settings_made_directly_are_checked_too() -> None:
    with pytest.raises(SettingsError, match="needs CONFIGBUS_KAFKA_SASL_USERNAME"):
        KafkaSettings(SERVERS, security_protocol="SASL_SSL", sasl_password=PASSWORD)


# -- passwords ---------------------------------------------------------------------------
def test_passwords_are_read_from_files(tmp_path: Path, pki: Pki) -> None:
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\r\n")  # the line end is not the password
    key_password_file = tmp_path / "key-password"
    key_password_file.write_text(KEY_PASSWORD + "\n")
    settings = build(
        security_protocol="SASL_SSL",
        sasl_username="svc-aurora",
        sasl_password_file=password_file,
        ssl_ca_location=pki.ca,
        ssl_certificate_location=pki.certificate,
        ssl_key_location=pki.encrypted_key,
        ssl_key_password_file=key_password_file,
    )
    assert (settings.sasl_password, settings.ssl_key_password) == (PASSWORD, KEY_PASSWORD)


def test_a_password_and_its_file_together_are_refused(tmp_path: Path) -> None:
    (tmp_path / "password").write_text(PASSWORD)
    assert refusal(**sasl(sasl_password_file=tmp_path / "password")) == (
        "set CONFIGBUS_KAFKA_SASL_PASSWORD or CONFIGBUS_KAFKA_SASL_PASSWORD_FILE, not both"
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "No such file or directory"),
        (b"\n", "the file is empty"),
        (b"\xff\xfe", "not UTF-8 text"),
    ],
    ids=["missing", "empty", "binary"],
)
def test_an_unusable_password_file_is_named(
    tmp_path: Path, content: bytes | None, expected: str
) -> None:
    path = tmp_path / "password"
    if content is not None:
        path.write_bytes(content)
    message = refusal(
        security_protocol="SASL_SSL", sasl_username="svc-aurora", sasl_password_file=path
    )
    assert message == f"CONFIGBUS_KAFKA_SASL_PASSWORD_FILE={path}: {expected}"


def test_no_repr_shows_a_password(pki: Pki) -> None:
    settings = build(
        **sasl(
            ssl_certificate_location=pki.certificate,
            ssl_key_location=pki.encrypted_key,
            ssl_key_password=KEY_PASSWORD,
        )
    )
    shown = f"{settings!r} {settings}"
    assert PASSWORD not in shown and KEY_PASSWORD not in shown
    assert "svc-aurora" in shown  # the user name is no secret


# -- TLS files ---------------------------------------------------------------------------
def tls(pki: Pki, **more: str | Path) -> dict[str, str | Path]:
    return {
        "security_protocol": "SSL",
        "ssl_ca_location": pki.ca,
        "ssl_certificate_location": pki.certificate,
        "ssl_key_location": pki.key,
        **more,
    }


def test_mutual_tls_loads_the_certificate_and_key(pki: Pki) -> None:
    options = build(**tls(pki)).client_options()
    assert set(options) == {"bootstrap_servers", "security_protocol", "ssl_context"}
    assert options["security_protocol"] == "SSL"
    assert isinstance(options["ssl_context"], ssl.SSLContext)


def test_a_certificate_file_holding_its_key_needs_no_key_file(pki: Pki) -> None:
    settings = build(**tls(pki, ssl_certificate_location=pki.combined, ssl_key_location=""))
    assert settings.ssl_key_location is None
    assert isinstance(settings.client_options()["ssl_context"], ssl.SSLContext)


def test_an_encrypted_key_opens_with_its_password(pki: Pki) -> None:
    settings = build(**tls(pki, ssl_key_location=pki.encrypted_key, ssl_key_password=KEY_PASSWORD))
    assert isinstance(settings.client_options()["ssl_context"], ssl.SSLContext)


@pytest.mark.parametrize("password", [None, "wrong-password"], ids=["missing", "wrong"])
def test_an_encrypted_key_without_its_password_is_refused(pki: Pki, password: str | None) -> None:
    extra = {"ssl_key_password": password} if password else {}
    message = refusal(**tls(pki, ssl_key_location=pki.encrypted_key, **extra))
    assert message.startswith(
        f"CONFIGBUS_KAFKA_SSL_CERTIFICATE_LOCATION={pki.certificate}, "
        f"CONFIGBUS_KAFKA_SSL_KEY_LOCATION={pki.encrypted_key}: cannot load the certificate "
        "and key ("
    )
    assert "a wrong or missing CONFIGBUS_KAFKA_SSL_KEY_PASSWORD" in message
    assert "wrong-password" not in message


def test_a_key_of_another_certificate_is_refused(pki: Pki) -> None:
    message = refusal(**tls(pki, ssl_key_location=pki.other_key))
    assert "KEY_VALUES_MISMATCH" in message
    assert f"CONFIGBUS_KAFKA_SSL_KEY_LOCATION={pki.other_key}" in message


@pytest.mark.parametrize(
    ("variable", "expected"),
    [
        ("ssl_ca_location", "not a PEM CA certificate"),
        ("ssl_certificate_location", "not a PEM certificate"),
        ("ssl_key_location", "not a PEM private key"),
    ],
)
@pytest.mark.parametrize("content", [b"", b"not PEM at all\n", b"\x30\x82\x01\x0a\x02\x82"])
def test_a_tls_file_that_is_not_pem_is_named(
    tmp_path: Path, pki: Pki, variable: str, expected: str, content: bytes
) -> None:
    path = tmp_path / "file.pem"
    path.write_bytes(content)
    message = refusal(**tls(pki, **{variable: path}))
    assert message == f"CONFIGBUS_KAFKA_{variable.upper()}={path}: {expected}"


def test_a_certificate_is_no_key_and_a_key_no_certificate(pki: Pki) -> None:
    assert refusal(**tls(pki, ssl_ca_location=pki.key)) == (
        f"CONFIGBUS_KAFKA_SSL_CA_LOCATION={pki.key}: not a PEM CA certificate"
    )
    assert refusal(**tls(pki, ssl_key_location=pki.certificate)) == (
        f"CONFIGBUS_KAFKA_SSL_KEY_LOCATION={pki.certificate}: not a PEM private key"
    )
    assert refusal(**tls(pki, ssl_key_location="")) == (
        f"CONFIGBUS_KAFKA_SSL_CERTIFICATE_LOCATION={pki.certificate} holds no private key: "
        "set CONFIGBUS_KAFKA_SSL_KEY_LOCATION"
    )


@pytest.mark.parametrize(
    "variable", ["ssl_ca_location", "ssl_certificate_location", "ssl_key_location"]
)
@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_a_tls_file_that_cannot_be_read_is_named(
    tmp_path: Path, pki: Pki, variable: str, kind: str
) -> None:
    path = tmp_path / "absent.pem"
    if kind == "directory":
        path.mkdir()
    reason = "No such file or directory" if kind == "missing" else "Is a directory"
    assert refusal(**tls(pki, **{variable: path})) == (
        f"CONFIGBUS_KAFKA_{variable.upper()}={path}: {reason}"
    )


def test_the_tls_context_is_made_once_and_again_when_a_file_changes(
    tmp_path: Path, pki: Pki
) -> None:
    certificate = tmp_path / "client.pem"
    certificate.write_bytes(pki.certificate.read_bytes())
    settings = build(**tls(pki, ssl_certificate_location=certificate))
    first = settings.client_options()["ssl_context"]
    assert settings.client_options()["ssl_context"] is first  # cached: no file read again

    certificate.write_bytes(pki.certificate.read_bytes() + b"\n")  # renewed on disk
    assert settings.client_options()["ssl_context"] is not first

    certificate.unlink()
    with pytest.raises(
        SettingsError, match=r"^CONFIGBUS_KAFKA_SSL_CERTIFICATE_LOCATION=.*: No such"
    ):
        settings.client_options()


def test_without_a_ca_the_systems_are_trusted(pki: Pki) -> None:
    context = build(**sasl()).client_options()["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


# -- what a refusal by the broker becomes -------------------------------------------------
@pytest.mark.parametrize(
    ("error", "kind", "expected"),
    [
        (
            TopicAuthorizationFailedError("t1"),
            AuthorizationError,
            "reading t1: not authorized (TopicAuthorizationFailedError: t1)",
        ),
        (
            SaslAuthenticationFailed("bad credentials"),
            AuthorizationError,
            "reading t1: not authorized (SaslAuthenticationFailed: bad credentials)",
        ),
        (
            MessageSizeTooLargeError(),
            RefusedError,
            "reading t1: MessageSizeTooLargeError",
        ),
        (
            KafkaConnectionError("Unable to bootstrap"),
            BusError,
            "reading t1: KafkaConnectionError: Unable to bootstrap",
        ),
    ],
)
def test_kafka_errors_say_their_name_once(
    error: Exception, kind: type[BusError], expected: str
) -> None:
    converted = _bus_error(error, "reading t1")
    assert type(converted) is kind
    assert str(converted) == expected
    if kind is AuthorizationError:
        assert not converted.retriable


def test_pem_blocks_that_do_not_load_are_refused_naming_the_file(tmp_path: Path, pki: Pki) -> None:
    broken = tmp_path / "broken-ca.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    assert refusal(**tls(pki, ssl_ca_location=broken)).startswith(
        f"CONFIGBUS_KAFKA_SSL_CA_LOCATION={broken}: not a PEM CA certificate ("
    )
    mixed = tmp_path / "mixed.pem"  # a certificate with another client's key
    mixed.write_bytes(pki.other_key.read_bytes() + pki.certificate.read_bytes())
    message = refusal(**tls(pki, ssl_certificate_location=mixed, ssl_key_location=""))
    assert message.startswith(
        f"CONFIGBUS_KAFKA_SSL_CERTIFICATE_LOCATION={mixed}: cannot load the certificate and key"
    )
    assert "KEY_VALUES_MISMATCH" in message


def test_an_error_code_in_a_brokers_answer_becomes_an_error_of_its_kind() -> None:
    denied = _broker_error(29, "Authorization failed.", "creating topic t1")
    assert isinstance(denied, AuthorizationError) and not denied.retriable
    assert str(denied) == (
        "creating topic t1: not authorized (TopicAuthorizationFailedError: Authorization failed.)"
    )
    down = _broker_error(7, None, "creating topic t1")  # RequestTimedOut: try again
    assert type(down) is BusError and down.retriable
    assert str(down) == "creating topic t1: RequestTimedOutError"


@pytest.mark.parametrize(
    ("protocol", "ok"),
    [
        ("", True),
        ("PLAINTEXT", True),
        ("SASL_PLAINTEXT", True),
        ("SSL", False),
        ("sasl_ssl", False),
    ],
)
def test_uvloop_runs_kafka_clients_only_without_tls(protocol: str, ok: bool) -> None:
    """uvloop#471: a TLS close waits out uvloop's 30 s shutdown timeout."""
    from configbus.bus.security import uvloop_ok

    assert uvloop_ok({"CONFIGBUS_KAFKA_SECURITY_PROTOCOL": protocol}) is ok
