"""A live dashboard in the browser (`configbus dashboard`, docs/dashboard.md): every
stream's version, last change, actor and reason, instances at the target, propagation
latency, refusals, overrides in effect and staged rollouts, read from Kafka and
verified with the trust file. Read-only: it writes nothing anywhere.

Four parts, each below the next: the model (model.py: pure, bounded), the feed
(feed.py: Kafka into the model), the page (page.py: one self-contained HTML document)
and the web server (web.py: the page, server-sent events, the state as JSON).

    settings = DashboardSettings.build(trust="trust.yml", listen="127.0.0.1:8765")
    async with Dashboard(settings) as dashboard:
        print(dashboard.url)
        await stop.wait()
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from configbus.bus import Bus, KafkaBus, KafkaSettings, TopicNames
from configbus.crypto import TrustStore
from configbus.dashboard.feed import Feed
from configbus.dashboard.model import Caps, Model
from configbus.dashboard.web import DashboardServer
from configbus.errors import SettingsError
from configbus.options import pick

__all__ = ["Caps", "Dashboard", "DashboardServer", "DashboardSettings", "Feed", "Model", "run"]

log = logging.getLogger(__name__)

DEFAULT_LISTEN: Final = "127.0.0.1:8765"


@dataclass(frozen=True, slots=True)
class DashboardSettings:
    """What `configbus dashboard` follows and where it listens."""

    kafka: KafkaSettings
    trust: TrustStore
    topics: TopicNames = field(default_factory=TopicNames)
    listen: str = DEFAULT_LISTEN
    tenants: frozenset[str] = frozenset()  # empty: every tenant
    caps: Caps = field(default_factory=Caps)
    rescan_s: float = 30.0  # how often new tenant topics are looked for

    @classmethod
    def build(
        cls,
        *,
        listen: str | None = None,
        trust: str | None = None,
        tenants: Iterable[str] = (),
        bootstrap_servers: str | None = None,
        topic_prefix: str | None = None,
        audit_topic: str | None = None,
        acks_topic: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> DashboardSettings:
        """From arguments, then ``CONFIGBUS_DASHBOARD_LISTEN``, ``CONFIGBUS_TRUST`` and
        the Kafka variables, then the defaults. Raises `SettingsError`."""
        from configbus.health import parse_address

        address = pick(listen, "CONFIGBUS_DASHBOARD_LISTEN", DEFAULT_LISTEN, str, environ)
        parse_address(address, "--listen")
        trust_file = pick(trust, "CONFIGBUS_TRUST", "", str, environ)
        if not trust_file:
            raise SettingsError("give --trust or set CONFIGBUS_TRUST: every event is verified")
        topics = TopicNames.build(topic_prefix, audit_topic, acks_topic, environ)
        wanted = frozenset(tenants)
        for tenant in wanted:
            topics.tenant_topic(tenant)  # a legal tenant id, or SettingsError
        kafka = KafkaSettings.build(
            bootstrap_servers, client_id="configbus-dashboard", environ=environ
        )
        return cls(
            kafka=kafka,
            trust=TrustStore.load(trust_file),
            topics=topics,
            listen=address,
            tenants=wanted,
        )


class Dashboard:
    """The model, its feed and the web server, started and stopped together.
    `bus`: another `Bus` than the settings' Kafka (a `MemoryBus` in tests)."""

    def __init__(self, settings: DashboardSettings, *, bus: Bus | None = None) -> None:
        self.settings = settings
        self.model = Model(settings.caps)
        self.feed = Feed(
            bus if bus is not None else KafkaBus(settings.kafka),
            settings.topics,
            settings.trust,
            self.model,
            tenants=settings.tenants,
            rescan_s=settings.rescan_s,
        )
        self.server = DashboardServer(settings.listen, self.model, status=self.feed.status)
        self.model.on_change = self.server.changed

    @property
    def url(self) -> str:
        return self.server.url

    async def start(self) -> Dashboard:
        await self.server.start()  # a busy port fails before anything is read
        await self.feed.start()
        return self

    async def stop(self) -> None:
        await self.feed.stop()
        await self.server.stop()

    async def __aenter__(self) -> Dashboard:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


async def run(settings: DashboardSettings) -> int:
    """Serve the dashboard until SIGTERM or SIGINT; the exit status of
    `configbus dashboard`."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with Dashboard(settings) as dashboard:
            tenants = ", ".join(sorted(settings.tenants)) or "every tenant"
            log.info("dashboard of %s on %s", tenants, dashboard.url)
            await stop.wait()
            log.info("dashboard stopping")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return 0
