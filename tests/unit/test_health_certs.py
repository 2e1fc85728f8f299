"""The expiry of the Kafka TLS certificates (configbus/health/certs.py), for the
``configbus_tls_certificate_expiry_timestamp_seconds`` metric: self-signed certificates
made in tmp_path, a CA bundle of two, and files that do not read (garbage, missing, too
large), which are left out with one log line per change on disk."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from configbus.bus import KafkaSettings
from configbus.health import certs
from configbus.health.certs import CertificateExpiry
from configbus.health.families import certificate_expiry

from .helpers import touch_later

LOGGER = "configbus.health.certs"
SOON = datetime.datetime(2031, 3, 4, 5, 6, 7, tzinfo=datetime.UTC)
LATER = datetime.datetime(2033, 8, 9, 10, 11, 12, tzinfo=datetime.UTC)
LATEST = datetime.datetime(2035, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


def pem(name: str, not_after: datetime.datetime) -> bytes:
    """A self-signed certificate for `name`, valid until `not_after`, as PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


def ssl(client: Path | None = None, ca: Path | None = None, protocol: str = "SSL") -> KafkaSettings:
    sasl = {"sasl_username": "u", "sasl_password": "p"} if protocol.startswith("SASL_") else {}
    return KafkaSettings(
        bootstrap_servers="unused:9093",
        security_protocol=protocol,
        ssl_certificate_location=str(client) if client else None,
        ssl_ca_location=str(ca) if ca else None,
        **sasl,  # type: ignore[arg-type]
    )


def warnings_of(logged: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in logged.records if r.name == LOGGER]


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """The log records of configbus.health.certs, from WARNING up."""
    caplog.set_level(logging.WARNING, logger=LOGGER)
    return caplog


# -- which files -------------------------------------------------------------------------


def test_no_kafka_settings_or_no_tls_means_no_certificates(tmp_path: Path) -> None:
    assert CertificateExpiry(None).files == {}
    assert CertificateExpiry(None).expiries() == {}
    plaintext = KafkaSettings(bootstrap_servers="unused:9092")
    assert CertificateExpiry(plaintext).expiries() == {}
    sasl = KafkaSettings(
        bootstrap_servers="unused:9092",
        security_protocol="SASL_PLAINTEXT",
        sasl_username="u",
        sasl_password="p",
    )
    assert CertificateExpiry(sasl).files == {}


def test_tls_without_files_of_its_own_watches_nothing() -> None:
    """SSL with the system's CAs and no client certificate: nothing to read."""
    assert CertificateExpiry(ssl()).files == {}


def test_sasl_ssl_watches_the_files_the_settings_name(tmp_path: Path) -> None:
    client, ca = tmp_path / "client.pem", tmp_path / "ca.pem"
    client.write_bytes(pem("client", LATER))
    ca.write_bytes(pem("ca", LATEST))
    watched = CertificateExpiry(ssl(client, ca, protocol="SASL_SSL"))
    assert watched.files == {"kafka_client": str(client), "kafka_ca": str(ca)}
    assert watched.expiries() == {"kafka_client": LATER.timestamp(), "kafka_ca": LATEST.timestamp()}


# -- what is read ------------------------------------------------------------------------


def test_the_client_certificate_is_the_first_of_its_file_and_the_ca_the_soonest(
    tmp_path: Path,
) -> None:
    client, ca = tmp_path / "client.pem", tmp_path / "ca.pem"
    # The leaf first, then an intermediate that expires sooner: the leaf's date counts.
    client.write_bytes(pem("leaf", LATER) + pem("intermediate", SOON))
    # A bundle of two CAs, the sooner one second: the sooner counts, wherever it is.
    ca.write_bytes(pem("root-a", LATEST) + pem("root-b", SOON))

    found = CertificateExpiry(ssl(client, ca)).expiries()

    assert found == {"kafka_client": LATER.timestamp(), "kafka_ca": SOON.timestamp()}


def test_the_metric_family_has_one_sample_per_certificate(tmp_path: Path) -> None:
    client, ca = tmp_path / "client.pem", tmp_path / "ca.pem"
    client.write_bytes(pem("client", LATER))
    ca.write_bytes(pem("ca", LATEST))
    family = certificate_expiry(CertificateExpiry(ssl(client, ca)))
    assert family.name == "configbus_tls_certificate_expiry_timestamp_seconds"
    samples = {s.labels["certificate"]: s.value for s in family.samples}
    assert samples == {"kafka_client": LATER.timestamp(), "kafka_ca": LATEST.timestamp()}


def test_a_file_is_read_again_only_when_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pem("ca", SOON))
    watched = CertificateExpiry(ssl(ca=ca))
    assert watched.expiries() == {"kafka_ca": SOON.timestamp()}

    reads: list[bytes] = []
    load = x509.load_pem_x509_certificates

    def counting(data: bytes) -> list[x509.Certificate]:
        reads.append(data)
        return load(data)

    monkeypatch.setattr(certs.x509, "load_pem_x509_certificates", counting)
    assert watched.expiries() == {"kafka_ca": SOON.timestamp()}
    assert reads == []  # unchanged on disk: the date remembered

    ca.write_bytes(pem("renewed", LATEST))  # the renewed certificate
    touch_later(ca)
    assert watched.expiries() == {"kafka_ca": LATEST.timestamp()}
    assert len(reads) == 1


# -- files that do not read --------------------------------------------------------------


def test_a_missing_file_is_left_out_with_one_warning(
    tmp_path: Path, logged: pytest.LogCaptureFixture
) -> None:
    client, missing = tmp_path / "client.pem", tmp_path / "nowhere" / "ca.pem"
    client.write_bytes(pem("client", LATER))
    watched = CertificateExpiry(ssl(client, missing))

    assert watched.expiries() == {"kafka_client": LATER.timestamp()}
    assert watched.expiries() == {"kafka_client": LATER.timestamp()}

    assert warnings_of(logged) == [
        f"no expiry metric for the kafka_ca certificate: {missing}: No such file or directory"
    ]


def test_a_file_that_appears_later_is_read(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    watched = CertificateExpiry(ssl(ca=ca))
    assert watched.expiries() == {}
    ca.write_bytes(pem("ca", SOON))
    assert watched.expiries() == {"kafka_ca": SOON.timestamp()}


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"this is not a certificate\n", id="garbage"),
        pytest.param(b"", id="empty"),
        pytest.param(
            b"-----BEGIN CERTIFICATE-----\nbm90IGRlcg==\n-----END CERTIFICATE-----\n",
            id="pem-armour-around-junk",
        ),
    ],
)
def test_a_file_that_is_no_certificate_is_left_out_with_one_warning_per_change(
    tmp_path: Path, logged: pytest.LogCaptureFixture, content: bytes
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(content)
    watched = CertificateExpiry(ssl(ca=ca))

    assert watched.expiries() == {}
    assert watched.expiries() == {}  # the same file: no second log line
    (line,) = warnings_of(logged)
    assert line.startswith(f"no expiry metric for the kafka_ca certificate: {ca}: ")
    assert "not a PEM certificate" in line

    touch_later(ca)  # changed on disk, still no certificate: logged again
    assert watched.expiries() == {}
    assert len(warnings_of(logged)) == 2

    ca.write_bytes(pem("ca", SOON))  # fixed
    touch_later(ca)
    assert watched.expiries() == {"kafka_ca": SOON.timestamp()}
    assert len(warnings_of(logged)) == 2


def test_a_good_file_that_turns_bad_drops_out(
    tmp_path: Path, logged: pytest.LogCaptureFixture
) -> None:
    client = tmp_path / "client.pem"
    client.write_bytes(pem("client", LATER))
    watched = CertificateExpiry(ssl(client))
    assert watched.expiries() == {"kafka_client": LATER.timestamp()}

    client.write_bytes(b"garbage")
    touch_later(client)
    assert watched.expiries() == {}  # no stale date
    assert len(warnings_of(logged)) == 1


def test_a_directory_is_left_out(tmp_path: Path, logged: pytest.LogCaptureFixture) -> None:
    watched = CertificateExpiry(ssl(ca=tmp_path))
    assert watched.expiries() == {}
    (line,) = warnings_of(logged)
    assert "not a PEM certificate" in line


def test_a_file_over_the_size_limit_is_not_read(
    tmp_path: Path, logged: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pem("ca", SOON))
    size = ca.stat().st_size
    monkeypatch.setattr(certs, "MAX_PEM_BYTES", size - 1)
    watched = CertificateExpiry(ssl(ca=ca))

    assert watched.expiries() == {}
    assert warnings_of(logged) == [
        f"no expiry metric for the kafka_ca certificate: {ca}: over {size - 1} bytes"
    ]

    monkeypatch.setattr(certs, "MAX_PEM_BYTES", size)  # exactly at the limit: read
    touch_later(ca)
    assert watched.expiries() == {"kafka_ca": SOON.timestamp()}
