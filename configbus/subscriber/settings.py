"""A subscriber's settings: arguments, then ``CONFIGBUS_*`` variables, then defaults."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from configbus.bus import KafkaSettings, TopicNames
from configbus.crypto import TrustStore
from configbus.errors import SettingsError
from configbus.options import pick

__all__ = ["SubscriberSettings"]


def _default_service() -> str:
    name = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else ""
    return name or "service"


@dataclass(frozen=True, slots=True)
class SubscriberSettings:
    """Everything a subscriber needs."""

    tenant: str
    env: str
    kafka: KafkaSettings
    trust: TrustStore
    instance_id: str
    service: str
    cache_dir: Path | None = None
    topics: TopicNames = field(default_factory=TopicNames)
    start_timeout: float = 30.0
    offline_grace: float = 5.0  # with a disk cache: how long start() waits for Kafka
    send_acks: bool = True

    @classmethod
    def build(
        cls,
        tenant: str,
        env: str,
        *,
        bootstrap_servers: str | None = None,
        trust: TrustStore | str | os.PathLike[str] | None = None,
        instance_id: str | None = None,
        service: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        topic_prefix: str | None = None,
        start_timeout: float | None = None,
        offline_grace: float | None = None,
        send_acks: bool | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> SubscriberSettings:
        def get(value: object, name: str, default: object, convert: object = str) -> object:
            return pick(value, f"CONFIGBUS_{name}", default, convert, environ)  # type: ignore[arg-type]

        servers = get(bootstrap_servers, "BOOTSTRAP_SERVERS", "")
        if not servers:
            raise SettingsError(
                "no Kafka cluster: pass bootstrap_servers or set CONFIGBUS_BOOTSTRAP_SERVERS"
            )
        trusted = trust if isinstance(trust, TrustStore) else get(trust, "TRUST", None)
        if trusted is None:
            raise SettingsError("no trust file: pass trust or set CONFIGBUS_TRUST")
        if not isinstance(trusted, TrustStore):
            trusted = TrustStore.load(str(trusted))
        cache = get(cache_dir, "CACHE_DIR", None)
        prefix = get(topic_prefix, "TOPIC_PREFIX", TopicNames().prefix)
        return cls(
            tenant=tenant,
            env=env,
            kafka=KafkaSettings(str(servers), client_id="configbus-subscriber"),
            trust=trusted,
            instance_id=str(
                get(instance_id, "INSTANCE_ID", f"{socket.gethostname()}-{os.getpid()}")
            ),
            service=str(get(service, "SERVICE", _default_service())),
            cache_dir=Path(str(cache)) if cache else None,
            topics=TopicNames(prefix=str(prefix)),
            start_timeout=float(get(start_timeout, "START_TIMEOUT", 30.0, float)),  # type: ignore[arg-type]
            offline_grace=float(get(offline_grace, "OFFLINE_GRACE", 5.0, float)),  # type: ignore[arg-type]
            send_acks=bool(send_acks) if send_acks is not None else True,
        )
