"""The daemon's side of sealed secrets: rotation by policy, retirement once the fleet has
the new version, and warnings before a certificate expires.

Every `interval` seconds, while this daemon is the writer, each stream's secrets (in the
tree and in the tenant store) are looked at. Only secrets kept in the tenant store,
which every daemon sees alike, are written: a rotation written into this daemon's own
checkout of the tree would be lost, or undone, when another daemon takes over.

- a secret with ``rotate_every`` whose last rotation is that old gets a new generated
  version, sealed with the key-encryption keys the daemon was given, exactly as
  ``configbus secret rotate`` would (without keys, the daemon warns that it is due);
- a secret with ``rotate_every`` and more than one live version has its old versions
  retired once every live instance of the stream runs a config carrying the newest
  (`configbus.ops.secrets.fleet_has`); until then it waits, and says who holds it up;
- a certificate is reported by the gauge ``configbus.secret.expires_in`` (seconds) and
  warned about in the log within `expiry_warning` of its expiry.

The writes go through the books, so the file watcher or the store's notifications
publish them like any operator's change. One stream's failure is logged and counted; it
never stops the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from configbus.bus import Bus, TopicNames
from configbus.crypto import KeyProvider, TrustStore
from configbus.errors import ConfigBusError
from configbus.ops.secrets import (
    SecretBook,
    StoreBook,
    TreeBook,
    fleet_has,
    generate_value,
    retire,
    set_secret,
)
from configbus.options import format_duration
from configbus.store import TenantStore
from configbus.telemetry import meter
from configbus.tree import EnvironmentTree
from configbus.tree.sealed import SecretRecord

__all__ = ["SecretKeeper", "SecretRound"]

log = logging.getLogger(__name__)

Stream = tuple[str, str]
EXPIRY_WARNING_S: Final = 30 * 86400
expiry_gauge: Final = meter.create_gauge(
    "configbus.secret.expires_in",
    unit="s",
    description="seconds until a certificate held as a secret expires (negative: expired)",
)


@dataclass(slots=True)
class SecretRound:
    """What one look at the secrets did."""

    rotated: list[tuple[str, str, str, int]] = field(default_factory=list)  # t, e, name, v
    retired: list[tuple[str, str, str, tuple[int, ...]]] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # retirements held up, and by whom
    due_without_keys: list[str] = field(default_factory=list)
    not_shared: list[str] = field(default_factory=list)  # policies on tree-held secrets
    expiring: list[str] = field(default_factory=list)
    failed: dict[Stream, str] = field(default_factory=dict)


class SecretKeeper:
    """Rotates, retires and watches the secrets of every stream; `run()` until cancelled."""

    def __init__(
        self,
        bus: Bus,
        topics: TopicNames,
        trust: TrustStore,
        tree: EnvironmentTree,
        store: TenantStore | None,
        provider: KeyProvider | None,
        *,
        actor: str,
        is_writer: Callable[[], bool],
        interval: float = 60.0,
        instance_ttl: float = 86400.0,
        books: Sequence[SecretBook] | None = None,
    ) -> None:
        self.bus, self.topics, self.trust = bus, topics, trust
        self.tree, self.store, self.provider = tree, store, provider
        self.books: list[SecretBook] = list(books) if books is not None else [TreeBook(tree.root)]
        if books is None and store is not None:
            self.books.append(StoreBook(store))
        self.actor = actor
        self.is_writer = is_writer
        self.interval = interval
        self.instance_ttl = instance_ttl
        self.rounds = 0
        self._warned: dict[tuple[Stream, str], str] = {}  # said once per reason

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if self.is_writer():
                await self.round()

    async def round(self, now: int | None = None) -> SecretRound:
        """Look at every stream's secrets once."""
        report = SecretRound()
        for stream in list(self.tree.streams()):
            for book in self.books:
                try:
                    records = await book.read(*stream)
                    for record in records.values():
                        await self._look(book, stream, record, now or time.time_ns(), report)
                except (ConfigBusError, OSError) as exc:
                    report.failed[stream] = str(exc)
                    self._say(stream, "failed", f"its secrets: {exc}", logging.ERROR)
                except Exception as exc:  # one stream's surprise is that stream's alone
                    report.failed[stream] = f"{exc.__class__.__name__}: {exc}"
                    log.exception(
                        "%s/%s: looking at its secrets failed", *stream,
                        extra={"tenant": stream[0], "env": stream[1]},
                    )  # fmt: skip
        self.rounds += 1
        return report

    async def _look(
        self, book: SecretBook, stream: Stream, record: SecretRecord, now: int, report: SecretRound
    ) -> None:
        tenant, env = stream
        name = record.name
        if record.not_after:
            left = (record.not_after - now) / 1e9
            expiry_gauge.set(left, {"configbus.tenant": tenant, "configbus.env": env, "name": name})
            if left < EXPIRY_WARNING_S:
                when = "expired" if left < 0 else f"expires in {int(left // 86400)}d"
                report.expiring.append(f"{tenant}/{env} {name}: {when}")
                self._say(stream, f"expiry {name}", f"certificate {name} {when}", logging.WARNING)
        if not record.rotate_every:
            return
        if not book.shared:
            report.not_shared.append(f"{tenant}/{env} {name}")
            self._say(
                stream,
                f"not shared {name}",
                f"secret {name} has rotate_every but is kept in the tree: the daemon rotates "
                "and retires only secrets kept in the tenant store (a write into its own "
                "checkout would be lost, or undone, when another daemon takes over); move "
                "it there (`configbus secret set --redis`) or rotate it with "
                "`configbus secret rotate`",
                logging.WARNING,
            )
            return
        if len(record.versions) > 1:
            await self._retire_when_ready(book, stream, record, report)
            return
        if now < record.rotated + record.rotate_every * 1_000_000_000:
            return
        if self.provider is None or not record.generate:
            why = (
                "the daemon has no key-encryption keys (--secret-keys)"
                if self.provider is None
                else "its record says no `generate` size, so only a person can rotate it"
            )
            report.due_without_keys.append(f"{tenant}/{env} {name}")
            self._say(
                stream,
                f"due {name}",
                f"secret {name} is due for rotation (rotate_every "
                f"{format_duration(record.rotate_every)}) but {why}",
                logging.WARNING,
            )
            return
        rotated = await set_secret(
            book,
            self.provider,
            tenant,
            env,
            name,
            generate_value(record.generate),
            actor=self.actor,
            reason=f"rotate_every {format_duration(record.rotate_every)}",
            now=now,
        )
        report.rotated.append((tenant, env, name, rotated.version))
        log.info(
            "%s/%s: secret %s rotated to v%d by its policy; v%d stays valid until every "
            "live instance runs the new one",
            tenant,
            env,
            name,
            rotated.version,
            record.version,
            extra={"tenant": tenant, "env": env},
        )

    async def _retire_when_ready(
        self, book: SecretBook, stream: Stream, record: SecretRecord, report: SecretRound
    ) -> None:
        tenant, env = stream
        check = await fleet_has(
            self.bus,
            self.topics,
            self.trust,
            [stream],
            record.name,
            record.version,
            instance_ttl=self.instance_ttl,
        )
        if not check.ready:
            who = "; ".join(str(h) for h in check.holdouts[:5])
            report.waiting.append(f"{tenant}/{env} {record.name}: {who}")
            self._say(
                stream,
                f"waiting {record.name}",
                f"secret {record.name} v{record.version}: old versions kept until "
                f"every live instance runs it ({who})",
                logging.INFO,
            )
            return
        dropped = await retire(
            book,
            tenant,
            env,
            record.name,
            through=record.version,
            actor=self.actor,
            reason=f"every live instance runs v{record.version}",
        )
        report.retired.append((tenant, env, record.name, dropped))
        log.info(
            "%s/%s: secret %s: retired %s, %d live instance(s) run v%d",
            tenant,
            env,
            record.name,
            ", ".join(f"v{v}" for v in dropped),
            check.instances,
            record.version,
            extra={"tenant": tenant, "env": env},
        )

    def _say(self, stream: Stream, topic: str, message: str, level: int) -> None:
        """Log `message` once for as long as it stays the same (per stream and topic)."""
        if self._warned.get((stream, topic)) == message:
            return
        self._warned[(stream, topic)] = message
        log.log(level, "%s/%s: %s", *stream, message, extra={"tenant": stream[0], "env": stream[1]})
