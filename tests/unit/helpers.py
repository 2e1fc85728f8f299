"""Helpers shared by the unit tests (fixtures live in conftest.py)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from configbus.errors import display_path

# make_tree(files, name="tree") -> root; see conftest.py
TreeFactory = Callable[..., Path]


def line_of(path: Path, needle: str, occurrence: int = 1) -> int:
    """The 1-based number of the line of `path` holding `needle` (its n-th occurrence):
    expected line numbers are read from the file the test wrote, not hard-coded."""
    seen = 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if needle in line:
            seen += 1
            if seen == occurrence:
                return number
    raise AssertionError(f"{needle!r} (occurrence {occurrence}) not in {path}")


def where(path: Path, line: int) -> str:
    """``file:line`` as configbus prints it."""
    return f"{display_path(path)}:{line}"


def touch_later(path: Path) -> None:
    """Give `path` an mtime one second later than it has, so a stat-based cache sees
    the change even when the rewrite happened within the same clock tick."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


# A small schema for trees that need one: app.name required, typed values, an enum, a
# secret reference, and no unknown keys under `app`.
SMALL_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["app"],
    "properties": {
        "app": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string"},
                "workers": {"type": "integer", "minimum": 1},
                "level": {"enum": ["debug", "info", "warning"]},
                "tags": {"type": "array", "items": {"type": "string"}},
            },
        },
        "db": {
            "type": "object",
            "properties": {
                "host": {"type": "string"},
                "port": {"type": "integer"},
                "password": {"$ref": "#/$defs/secret"},
            },
        },
    },
    "$defs": {
        "secret": {
            "type": "object",
            "required": ["$secret"],
            "additionalProperties": False,
            "properties": {"$secret": {"type": "string"}},
        }
    },
}


T = TypeVar("T")


async def eventually(predicate: Callable[[], T], what: str, timeout: float = 10.0) -> T:
    """Poll `predicate` until it returns something true, or fail after `timeout`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (result := predicate()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.01)
    return result


class OnMemoryBus:
    """A stream on a MemoryBus, for subscriber tests: subclasses set `bus`, `trust`,
    `tenant`, `env` and `topics`."""

    bus: Any
    trust: Any
    tenant: str
    env: str
    topics: Any

    def subscriber(self, **options: Any) -> Any:
        """A subscriber of the stream on the bus (instance i-1), `options` on top."""
        from configbus.subscriber import ConfigSubscriber, SubscriberSettings

        defaults = {"topic_prefix": self.topics.prefix, "acks_topic": self.topics.acks}
        settings = SubscriberSettings.build(
            self.tenant,
            self.env,
            environ={},
            bootstrap_servers="unused:9092",
            trust=self.trust,
            **(defaults | {"instance_id": "i-1"} | options),
        )
        return ConfigSubscriber(self.tenant, self.env, settings=settings, bus=self.bus)

    def acks(self) -> list[Any]:
        """Every ack on the acks topic, in order."""
        import msgspec

        from configbus.events import Ack

        records = self.bus.records(self.topics.acks)
        return [msgspec.msgpack.decode(r.value or b"", type=Ack) for r in records]
