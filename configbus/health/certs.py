"""When the TLS certificates a process uses for Kafka expire, for a metric an alert can
watch (``configbus_tls_certificate_expiry_timestamp_seconds``).

The files are the ones the Kafka settings name (configbus/bus/security.py): the
client's certificate (mutual TLS) and the CA bundle the brokers are checked against.
Each is read again only when it changes on disk (a renewed certificate shows at the
next scrape), and one that does not read is left out, with one log line per change.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from cryptography import x509

if TYPE_CHECKING:
    from configbus.bus import KafkaSettings

__all__ = ["CertificateExpiry"]

log = logging.getLogger(__name__)

MAX_PEM_BYTES = 4 * 1024 * 1024  # a CA bundle larger than this is not read


class CertificateExpiry:
    """``notAfter`` (seconds since the epoch) of the Kafka client certificate
    (``kafka_client``: the first certificate of its file, the leaf) and of the CA
    bundle (``kafka_ca``: the soonest to expire), for those the settings name."""

    def __init__(self, kafka: KafkaSettings | None) -> None:
        files: dict[str, str] = {}
        if kafka is not None and kafka.security_protocol.endswith("SSL"):
            if kafka.ssl_certificate_location:
                files["kafka_client"] = kafka.ssl_certificate_location
            if kafka.ssl_ca_location:
                files["kafka_ca"] = kafka.ssl_ca_location
        self.files = files
        self._seen: dict[str, tuple[tuple[int, int], float | None]] = {}

    def expiries(self) -> dict[str, float]:
        """Each certificate's name and notAfter; those that do not read are left out."""
        found = {}
        for name, path in self.files.items():
            expiry = self._expiry(name, path)
            if expiry is not None:
                found[name] = expiry
        return found

    def _expiry(self, name: str, path: str) -> float | None:
        try:
            stat = os.stat(path)
        except OSError as exc:
            return self._remember(name, (0, 0), None, f"{path}: {exc.strerror or exc}")
        stamp = (stat.st_mtime_ns, stat.st_size)
        known = self._seen.get(name)
        if known is not None and known[0] == stamp:
            return known[1]
        if stat.st_size > MAX_PEM_BYTES:
            return self._remember(name, stamp, None, f"{path}: over {MAX_PEM_BYTES} bytes")
        try:
            with open(path, "rb") as file:
                certificates = x509.load_pem_x509_certificates(file.read())
        except (OSError, ValueError) as exc:
            return self._remember(name, stamp, None, f"{path}: not a PEM certificate ({exc})")
        dates = [c.not_valid_after_utc.timestamp() for c in certificates]
        expiry = dates[0] if name == "kafka_client" else min(dates)
        return self._remember(name, stamp, expiry, "")

    def _remember(
        self, name: str, stamp: tuple[int, int], expiry: float | None, problem: str
    ) -> float | None:
        if problem and self._seen.get(name, ((-1, -1), None))[0] != stamp:
            log.warning("no expiry metric for the %s certificate: %s", name, problem)
        self._seen[name] = (stamp, expiry)
        return expiry
