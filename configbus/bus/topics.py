"""Topic names and record keys: how streams map onto Kafka.

- One topic per tenant: ``<prefix><tenant>``, default ``configbus.tenant.<tenant>``.
  One partition (a total order per tenant), ``cleanup.policy=compact``. A stream has
  channels, each under its own record key so compaction keeps the latest of each:
  the *snapshot* (the resolved config, published by the daemon) under the environment
  name, and the *override* (the emergency overrides in effect, signed by an operator)
  under ``<env>/override``, the *candidate* (a staged version during a canary, applied
  only by the instances its rollout selects) under ``<env>/candidate``, and operators'
  *rollout* commands (start, promote, abort; read by the daemon only) under
  ``<env>/rollout``. A new subscriber bootstraps by reading the latest record of each
  key.
- The audit topic (default ``configbus.audit``), not compacted: one record per
  published version, key ``<tenant>/<env>``, the same envelope bytes.
- The acknowledgement topic (default ``configbus.acks``): subscribers' reports.
- The state topic (default ``<prefix>_state``, e.g. ``configbus.tenant._state``: one
  per prefix, as the writer is; ``_`` is never part of a tenant id), compacted: the
  publisher's own. Key
  ``<tenant>/<env>``: the stream's signed head (last version and config hash), written
  in the same transaction as the event, so versions survive the loss of a tenant topic;
  key ``$writer``: the active publisher's signed heartbeat (one writer at a time).

Tenant ids are ``[a-z0-9-]``, at most 64 characters, so every tenant maps to a legal
topic name (Kafka allows ``[a-zA-Z0-9._-]``, at most 249) and no two tenants map to
the same one; ids that do not fit are refused, never rewritten.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from configbus.errors import SettingsError
from configbus.options import pick
from configbus.tree.tree import TENANT_ID

__all__ = [
    "CANDIDATE_CHANNEL",
    "CHAIN_CHANNEL",
    "CONTENT_TYPE",
    "OVERRIDE_CHANNEL",
    "PRESENCE_CHANNEL",
    "ROLLOUT_CHANNEL",
    "SNAPSHOT_CHANNEL",
    "WAIVER_CHANNEL",
    "TopicNames",
]

CONTENT_TYPE: Final = b"application/vnd.configbus.event+msgpack; v=1"
SNAPSHOT_CHANNEL: Final = "snapshot"
OVERRIDE_CHANNEL: Final = "override"
CANDIDATE_CHANNEL: Final = "candidate"
ROLLOUT_CHANNEL: Final = "rollout"
WAIVER_CHANNEL: Final = "waiver"  # compliance waivers in effect (operator-signed)
# The head of the stream's operator audit chain (a sealed link, configbus/chain.py).
CHAIN_CHANNEL: Final = "chain"
# Not a record key of the tenant topic: the channel of instances' heartbeats on the
# acks topic (``<tenant>/<env>/<instance>/presence/heartbeat``).
PRESENCE_CHANNEL: Final = "presence"
_LEGAL: Final = re.compile(r"[a-zA-Z0-9._-]+")
_MAX_TOPIC: Final = 249


@dataclass(frozen=True, slots=True)
class TopicNames:
    """How tenants and shared topics are named. All must be legal topic names."""

    prefix: str = "configbus.tenant."
    audit: str = "configbus.audit"
    acks: str = "configbus.acks"
    state: str = ""  # default: the prefix's own, <prefix>_state

    def __post_init__(self) -> None:
        if not self.state:
            object.__setattr__(self, "state", f"{self.prefix}_state")
        if self.prefix and not _LEGAL.fullmatch(self.prefix):
            raise SettingsError(f"topic prefix {self.prefix!r}: only a-z A-Z 0-9 . _ - allowed")
        if len(self.prefix) + 64 > _MAX_TOPIC:
            raise SettingsError(f"topic prefix {self.prefix!r} is too long")
        for name in (self.audit, self.acks, self.state):
            if not _LEGAL.fullmatch(name) or len(name) > _MAX_TOPIC or name in (".", ".."):
                raise SettingsError(f"{name!r} is not a legal Kafka topic name")
            if self.tenant_of(name) is not None:
                raise SettingsError(f"{name!r} would collide with a tenant topic")
        if len({self.audit, self.acks, self.state}) < 3:
            raise SettingsError(
                f"the audit, acks and state topics must differ ({self.audit!r}, "
                f"{self.acks!r}, {self.state!r})"
            )

    @classmethod
    def build(
        cls,
        prefix: str | None = None,
        audit: str | None = None,
        acks: str | None = None,
        environ: Mapping[str, str] | None = None,
        state: str | None = None,
    ) -> TopicNames:
        """From arguments, then CONFIGBUS_TOPIC_PREFIX, CONFIGBUS_AUDIT_TOPIC,
        CONFIGBUS_ACKS_TOPIC and CONFIGBUS_STATE_TOPIC, then the defaults."""
        default = cls()
        return cls(
            prefix=pick(prefix, "CONFIGBUS_TOPIC_PREFIX", default.prefix, str, environ),
            audit=pick(audit, "CONFIGBUS_AUDIT_TOPIC", default.audit, str, environ),
            acks=pick(acks, "CONFIGBUS_ACKS_TOPIC", default.acks, str, environ),
            state=pick(state, "CONFIGBUS_STATE_TOPIC", "", str, environ),
        )

    def tenant_topic(self, tenant: str) -> str:
        if not TENANT_ID.fullmatch(tenant):
            raise SettingsError(
                f"tenant id {tenant!r} cannot name a topic: use 1-64 of a-z 0-9 -, "
                "starting and ending with a letter or digit"
            )
        return f"{self.prefix}{tenant}"

    def tenant_of(self, topic: str) -> str | None:
        """The tenant whose topic `topic` is, or None."""
        if not topic.startswith(self.prefix):
            return None
        tenant = topic[len(self.prefix) :]
        return tenant if TENANT_ID.fullmatch(tenant) else None

    @staticmethod
    def audit_key(tenant: str, env: str) -> bytes:
        return f"{tenant}/{env}".encode()

    @property
    def transactional_id(self) -> str:
        """The publisher's transactional id: one per cluster and topic prefix, so any
        two publishers of the same topics fence each other and one writer remains."""
        return f"configbus-publisher.{self.prefix}"

    @staticmethod
    def record_key(env: str, channel: str = SNAPSHOT_CHANNEL) -> bytes:
        """The record key of a stream's channel on its tenant topic."""
        return env.encode() if channel == SNAPSHOT_CHANNEL else f"{env}/{channel}".encode()

    @staticmethod
    def channel_of(key: bytes | None) -> tuple[str, str]:
        """(environment, channel) of a tenant-topic record key; an environment name
        never holds ``/``."""
        env, _, channel = (key or b"").decode(errors="replace").partition("/")
        return env, channel or SNAPSHOT_CHANNEL
