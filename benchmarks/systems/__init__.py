"""The systems `e2e.py` measures, one module each, behind one interface.

A system has a writer in the driver's process (`System`: set up, write one edit and
return t0, tear down) and subscribers in worker processes (its module's
`clients(spec, indices, report)`, run by `fleet.worker_main`). `watch_floor` has no
subscribers: it times watchfiles alone (see its module).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from fleet import Entry


@dataclass
class Context:
    """What every system may use: the run's options, servers and payloads."""

    args: argparse.Namespace
    servers: str  # Kafka bootstrap servers
    redis_url: str
    etcd_port: int | None
    scratch: Path
    document: dict[str, Any]  # the edited stream's resolved config as JSON data
    record_bytes: int  # the size of a configbus record for it
    fetch_max_wait_ms: int  # configbus's PartitionReader long-poll


@dataclass(frozen=True)
class Delivery:
    """One measured edit: t0 (ns, the writer's clock) and every subscriber's entry."""

    edit: int
    t0: int
    entries: list[Entry]


class System:
    name: ClassVar[str]  # the key in e2e.json
    label: ClassVar[str]  # how tables name it
    module: ClassVar[str]  # systems.<module>.clients runs the subscribers
    servers: ClassVar[tuple[str, ...]] = ()  # which of kafka, redis, etcd it uses

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def skip_reason(self) -> str | None:
        """Why this system cannot run here, or None."""
        return None

    def spec(self) -> dict[str, Any]:
        """What its workers need (picklable)."""
        return {}

    async def setup(self) -> None:
        pass

    async def write(self, edit: int) -> int:
        """Make edit number `edit`; the time (ns) just before it was made."""
        raise NotImplementedError

    def processes(self) -> dict[str, list[int]]:
        """Its own processes besides the subscribers (a daemon, an agent), by role."""
        return {}

    async def stages(self, deliveries: list[Delivery]) -> list[dict[str, float]]:
        """Where the time of each delivery went (ms per stage, for the last subscriber),
        when the system can tell; [] otherwise."""
        return []

    async def teardown(self) -> None:
        pass


def registry() -> dict[str, type[System]]:
    from systems.configbus_agent import ConfigbusAgent
    from systems.configbus_direct import ConfigbusDirect
    from systems.configbus_override import ConfigbusOverride, ConfigbusOverrideCli
    from systems.etcd_watch import EtcdWatch
    from systems.kafka_floor import KafkaFloor, KafkaFloorNoTransactions
    from systems.redis_pubsub import RedisPubSub

    kinds: list[type[System]] = [
        ConfigbusDirect,
        ConfigbusAgent,
        ConfigbusOverride,
        ConfigbusOverrideCli,
        KafkaFloor,
        KafkaFloorNoTransactions,
        RedisPubSub,
        EtcdWatch,
    ]
    return {kind.name: kind for kind in kinds}
