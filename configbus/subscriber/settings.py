"""A subscriber's settings: arguments, then ``CONFIGBUS_*`` variables, then defaults."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict, Unpack

from configbus.bus import KafkaSettings, TopicNames
from configbus.crypto import KeyProvider, LocalKeyProvider, TrustStore
from configbus.errors import SettingsError
from configbus.limits import DEFAULT_LIMITS, Limits
from configbus.options import parse_labels, pick

__all__ = ["SubscriberOptions", "SubscriberSettings"]


def _default_service() -> str:
    name = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else ""
    return name or "service"


class SubscriberOptions(TypedDict, total=False):
    """The keyword options of a subscriber; each falls back to its ``CONFIGBUS_*``
    variable, then to a default."""

    bootstrap_servers: str  # CONFIGBUS_BOOTSTRAP_SERVERS (required without an agent)
    agent: str | os.PathLike[str]  # CONFIGBUS_AGENT: the host agent's socket, default none
    trust: TrustStore | str | os.PathLike[str]  # CONFIGBUS_TRUST: a trust file (required)
    # CONFIGBUS_TRUST_RELOAD: how often (s) the trust file is looked at for changes,
    # default 5; 0 never (a TrustStore built in memory is never reloaded)
    trust_reload: float
    instance_id: str  # CONFIGBUS_INSTANCE_ID, default host-pid
    service: str  # CONFIGBUS_SERVICE, default the program's name
    cache_dir: str | os.PathLike[str]  # CONFIGBUS_CACHE_DIR, default none
    topic_prefix: str  # CONFIGBUS_TOPIC_PREFIX, default configbus.tenant.
    acks_topic: str  # CONFIGBUS_ACKS_TOPIC, default configbus.acks
    start_timeout: float  # CONFIGBUS_START_TIMEOUT, default 30 s
    offline_grace: float  # CONFIGBUS_OFFLINE_GRACE, default 5 s
    send_acks: bool  # default True
    # CONFIGBUS_SECRET_KEYS: a key file of the tenant's key-encryption keys; without
    # one, CONFIGBUS_KEK_<TENANT> variables; without those, secrets cannot be read.
    secret_keys: KeyProvider | str | os.PathLike[str]
    # CONFIGBUS_LABELS ("zone=eu-west-1a,color=green"): what this instance is, for
    # staged rollouts; service and host are always there (given ones win)
    labels: Mapping[str, str]
    heartbeat: float  # CONFIGBUS_HEARTBEAT: seconds between heartbeats, default 10; 0 none


@dataclass(frozen=True, slots=True)
class SubscriberSettings:
    """Everything a subscriber needs."""

    tenant: str
    env: str
    kafka: KafkaSettings | None  # None: only through the agent
    trust: TrustStore
    instance_id: str
    service: str
    cache_dir: Path | None = None
    topics: TopicNames = field(default_factory=TopicNames)
    start_timeout: float = 30.0
    offline_grace: float = 5.0  # with a disk cache: how long start() waits for Kafka
    send_acks: bool = True
    limits: Limits = DEFAULT_LIMITS  # what a record may hold (configbus.limits)
    agent: Path | None = None  # the host agent's socket: records come through it
    secret_keys: KeyProvider | None = None  # opens the stream's sealed secrets
    trust_reload: float = 5.0  # seconds between looks at the trust file (0: never)
    labels: Mapping[str, str] = field(default_factory=dict)  # service, host and the given
    heartbeat: float = 10.0  # seconds between heartbeats (0: none; presence unknown)

    def __post_init__(self) -> None:
        if self.trust_reload < 0:
            raise SettingsError(
                f"trust_reload {self.trust_reload!r}: must not be negative (0: never reload)"
            )
        if self.heartbeat < 0:
            raise SettingsError(f"heartbeat {self.heartbeat!r}: must not be negative (0: none)")
        if self.kafka is None and self.agent is None:
            raise SettingsError(
                "no Kafka cluster and no agent: pass bootstrap_servers or agent, or set "
                "CONFIGBUS_BOOTSTRAP_SERVERS or CONFIGBUS_AGENT"
            )

    @classmethod
    def build(
        cls,
        tenant: str,
        env: str,
        environ: Mapping[str, str] | None = None,
        **options: Unpack[SubscriberOptions],
    ) -> SubscriberSettings:
        unknown = sorted(set(options) - SubscriberOptions.__optional_keys__)
        if unknown:
            raise TypeError(f"unknown subscriber option(s): {', '.join(unknown)}")
        bootstrap_servers = options.get("bootstrap_servers")
        agent = options.get("agent")
        trust = options.get("trust")
        instance_id = options.get("instance_id")
        service = options.get("service")
        cache_dir = options.get("cache_dir")
        topic_prefix = options.get("topic_prefix")
        acks_topic = options.get("acks_topic")
        start_timeout = options.get("start_timeout")
        offline_grace = options.get("offline_grace")
        send_acks = options.get("send_acks")
        secret_keys = options.get("secret_keys")
        trust_reload = options.get("trust_reload")
        heartbeat = options.get("heartbeat")

        def get(value: object, name: str, default: object, convert: object = str) -> object:
            return pick(value, f"CONFIGBUS_{name}", default, convert, environ)  # type: ignore[arg-type]

        servers = get(bootstrap_servers, "BOOTSTRAP_SERVERS", "")
        socket_path = get(agent, "AGENT", "")
        trusted = trust if isinstance(trust, TrustStore) else get(trust, "TRUST", None)
        if trusted is None:
            raise SettingsError("no trust file: pass trust or set CONFIGBUS_TRUST")
        if not isinstance(trusted, TrustStore):
            trusted = TrustStore.load(str(trusted))
        cache = get(cache_dir, "CACHE_DIR", None)
        keys = secret_keys if _is_provider(secret_keys) else get(secret_keys, "SECRET_KEYS", None)
        if keys is not None and not _is_provider(keys):
            keys = LocalKeyProvider.from_file(str(keys))
        elif keys is None:
            from_env = LocalKeyProvider.from_env(environ)
            keys = from_env if from_env.tenants else None
        service_name = str(get(service, "SERVICE", _default_service()))
        given = options.get("labels")
        if given is None:
            given = parse_labels([str(get(None, "LABELS", ""))], "CONFIGBUS_LABELS")
        else:
            given = parse_labels([f"{k}={v}" for k, v in given.items()], "labels")
        labels = {"service": service_name, "host": socket.gethostname(), **given}
        return cls(
            tenant=tenant,
            env=env,
            kafka=KafkaSettings.build(
                str(servers), client_id="configbus-subscriber", environ=environ
            )
            if servers
            else None,
            agent=Path(str(socket_path)) if socket_path else None,
            trust=trusted,
            instance_id=str(
                get(instance_id, "INSTANCE_ID", f"{socket.gethostname()}-{os.getpid()}")
            ),
            service=service_name,
            labels=labels,
            heartbeat=float(get(heartbeat, "HEARTBEAT", 10.0, float)),  # type: ignore[arg-type]
            cache_dir=Path(str(cache)) if cache else None,
            topics=TopicNames.build(topic_prefix, acks=acks_topic, environ=environ),
            start_timeout=float(get(start_timeout, "START_TIMEOUT", 30.0, float)),  # type: ignore[arg-type]
            offline_grace=float(get(offline_grace, "OFFLINE_GRACE", 5.0, float)),  # type: ignore[arg-type]
            send_acks=bool(send_acks) if send_acks is not None else True,
            secret_keys=keys,  # type: ignore[arg-type]
            trust_reload=float(get(trust_reload, "TRUST_RELOAD", 5.0, float)),  # type: ignore[arg-type]
        )


def _is_provider(value: object) -> bool:
    return hasattr(value, "unwrap") and hasattr(value, "wrap")
