"""The publisher's settings: one frozen object, from arguments, then ``CONFIGBUS_*``
environment variables, then defaults."""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from configbus.bus import KafkaSettings, TopicNames
from configbus.errors import SettingsError
from configbus.health import http_address, parse_address
from configbus.options import pick

__all__ = ["PublisherSettings"]


def _positive(kind: Callable[[str], float]) -> Callable[[str], Any]:
    def convert(raw: str) -> Any:
        number = kind(raw)
        if number <= 0:
            raise ValueError("must be positive")
        return number

    return convert


@dataclass(frozen=True, slots=True)
class PublisherSettings:
    """Everything the publisher daemon needs. The repr shows no key material."""

    root: Path
    kafka: KafkaSettings
    signing_key: Path
    kid: str
    redis_url: str | None = field(default=None, repr=False)
    topics: TopicNames = field(default_factory=TopicNames)
    reconcile_interval: float = 30.0
    heartbeat_interval: float = 5.0  # the writer's heartbeat; a rival waits 2-3 of them
    debounce_ms: int = 10
    step_ms: int = 1  # watchfiles polls its Rust watcher every `step` ms: ~2 ms to detect
    batch_size: int = 100  # events per transaction (see Publisher)
    shutdown_grace: float = 10.0
    publish_timeout: float = 30.0  # a publication still waiting on Kafka then is retried
    trust: Path | None = None  # publisher keys whose events recovery believes besides ours
    actor: str = field(default_factory=lambda: f"configbus-publisher@{socket.gethostname()}")
    # Key-encryption keys, to carry out rotate_every policies (none: the daemon warns
    # when one is due instead); and how often the secrets are looked at.
    secret_keys: Path | None = None
    secret_interval: float = 60.0
    # Environments whose changes must pass every blocking compliance rule (or hold a
    # waiver for it) to be published; see configbus/compliance/.
    gate_envs: tuple[str, ...] = ("prod",)
    # Where /healthz, /readyz and /metrics are served (HOST:PORT, :PORT for every
    # interface; port 0: any free one); None: not served (docs/operations.md).
    http: str | None = None

    def __post_init__(self) -> None:
        """Refuse values no publisher can run with, wherever they came from (argument,
        variable or code), naming the setting: one line, before anything starts."""
        positive = {
            "batch_size": self.batch_size,
            "reconcile_interval": self.reconcile_interval,
            "heartbeat_interval": self.heartbeat_interval,
            "publish_timeout": self.publish_timeout,
            "secret_interval": self.secret_interval,
            "replication_factor": self.kafka.replication_factor,
            "min_insync_replicas": self.kafka.min_insync_replicas,
        }
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                flag = name.replace("_", "-")
                raise SettingsError(
                    f"{name} {value!r}: must be a positive number "
                    f"(--{flag} or CONFIGBUS_{name.upper()})"
                )
        for name, value in {
            "shutdown_grace": self.shutdown_grace,
            "debounce_ms": self.debounce_ms,
            "step_ms": self.step_ms,
        }.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise SettingsError(f"{name} {value!r}: must not be negative")
        if self.http is not None:
            parse_address(self.http, "--http (CONFIGBUS_HTTP)")

    @classmethod
    def build(
        cls,
        *,
        root: str | None = None,
        bootstrap_servers: str | None = None,
        signing_key: str | None = None,
        kid: str | None = None,
        redis_url: str | None = None,
        topic_prefix: str | None = None,
        audit_topic: str | None = None,
        acks_topic: str | None = None,
        reconcile_interval: float | None = None,
        replication_factor: int | None = None,
        min_insync_replicas: int | None = None,
        heartbeat_interval: float | None = None,
        batch_size: int | None = None,
        trust: str | None = None,
        secret_keys: str | None = None,
        secret_interval: float | None = None,
        gate_envs: str | None = None,
        http: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> PublisherSettings:
        """Settings from arguments, then ``CONFIGBUS_*`` variables, then defaults."""

        def get(value: Any, name: str, default: Any, convert: Callable[[str], Any] = str) -> Any:
            return pick(value, f"CONFIGBUS_{name}", default, convert, environ)

        kafka = KafkaSettings.build(
            bootstrap_servers,
            client_id="configbus-publisher",
            replication_factor=get(replication_factor, "REPLICATION_FACTOR", 1, _positive(int)),
            min_insync_replicas=get(min_insync_replicas, "MIN_INSYNC_REPLICAS", 1, _positive(int)),
            environ=environ,
        )
        key = get(signing_key, "SIGNING_KEY", None)
        if not key:
            raise SettingsError("no signing key: give --signing-key or set CONFIGBUS_SIGNING_KEY")
        return cls(
            root=Path(get(root, "ROOT", "environments")),
            kafka=kafka,
            signing_key=Path(key),
            kid=get(kid, "KID", ""),
            redis_url=get(redis_url, "REDIS_URL", None) or None,
            topics=TopicNames.build(topic_prefix, audit_topic, acks_topic, environ),
            reconcile_interval=get(
                reconcile_interval, "RECONCILE_INTERVAL", 30.0, _positive(float)
            ),
            heartbeat_interval=get(heartbeat_interval, "HEARTBEAT_INTERVAL", 5.0, _positive(float)),
            batch_size=get(batch_size, "BATCH_SIZE", 100, _positive(int)),
            trust=Path(found) if (found := get(trust, "TRUST", None)) else None,
            secret_keys=Path(keys) if (keys := get(secret_keys, "SECRET_KEYS", None)) else None,
            secret_interval=get(secret_interval, "SECRET_INTERVAL", 60.0, _positive(float)),
            gate_envs=_names(get(gate_envs, "GATE_ENVS", "prod")),
            http=http_address(get(http, "HTTP", "")),
        )


def _names(text: str) -> tuple[str, ...]:
    """A comma-separated list of environments ("" or "none": none)."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    return () if names == ("none",) else names
