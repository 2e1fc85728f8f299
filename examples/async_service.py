"""An asyncio service that follows its config with `configbus.ConfigSubscriber`.

The service keeps a database connection pool sized by
``database.postgresql.connection_pool.max_size`` and resizes it when that value
changes, without a restart. It also reports every config it applies as one JSON line
on stdout (version, emergency overrides in effect, detection-to-applied latency, trace
id), for the demo to read:

    {"event": "config_applied", "service": "recommendations", "instance": "recommendations-1",
     "tenant": "aurora-records", "env": "prod", "version": 2, "override_version": 0,
     "overrides": [], "latency_ms": 7.9,
     "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "changed": ["database.postgresql..."],
     "startup": false, "password": {"version": 1, "opened": true}}

Its health check says whether the pool fits the database (at most
``DB_MAX_CONNECTIONS``, 1000): the SDK runs it before every heartbeat, so a staged
rollout whose candidate oversizes the pool on this instance is rolled back by the
publisher, for every instance, with no one involved.

The pool's password is a sealed secret (``!secret`` in the tree): the service opens it
on access with its tenant's key-encryption key (CONFIGBUS_SECRET_KEYS) whenever the
pool (re)connects, and reports only which version it opened, never the value.

Settings come from the environment:

    CONFIGBUS_TENANT, CONFIGBUS_ENV   the stream to follow (required)
    CONFIGBUS_BOOTSTRAP_SERVERS       Kafka, e.g. 127.0.0.1:19092 (read by the SDK)
    CONFIGBUS_TRUST                   trust file: the publisher keys to believe (SDK)
    CONFIGBUS_INSTANCE_ID             this instance in acks (SDK; default host-pid)
    CONFIGBUS_SERVICE                 the service name in acks (default recommendations)
    CONFIGBUS_CACHE_DIR               optional: keep the last good config on disk (SDK)
    CONFIGBUS_LABELS                  optional: zone=eu-west-1a,...: what rollouts select by
    CONFIGBUS_HEARTBEAT               seconds between heartbeats (SDK; default 10)
    CONFIGBUS_SECRET_KEYS             optional: the tenant's key-encryption keys (SDK)
    OTEL_TRACES_EXPORTER              otlp, console or none (configbus.telemetry)
    LOG_LEVEL                         default INFO; logs go to stderr

    python examples/async_service.py      # stop with Ctrl-C or SIGTERM
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time

from configbus import ConfigSubscriber, ResolvedConfig, SecretError
from configbus.telemetry import configure_from_env

SERVICE = os.environ.get("CONFIGBUS_SERVICE", "recommendations")
POOL = "database.postgresql.connection_pool"
PASSWORD = "database.postgresql.password"
DB_MAX_CONNECTIONS = 1000  # what the database accepts from this service

log = logging.getLogger(SERVICE)


class ConnectionPool:
    """Stands in for a real pool (asyncpg, SQLAlchemy) that can be resized live."""

    def __init__(self) -> None:
        self.max_size = 0
        self.password_version = 0  # the secret version the pool connects with
        self.opened = False

    async def resize(self, max_size: int) -> None:
        log.info("connection pool: max_size %d -> %d", self.max_size, max_size)
        self.max_size = max_size  # a real pool would open or retire connections here

    def connect_with(self, config: ResolvedConfig) -> None:
        """Open the password as a new connection would: decrypted now, used, dropped."""
        try:
            password = config.secret(PASSWORD)
        except SecretError as exc:  # names the secret, never a value; the rest still applies
            log.warning("connection pool: %s", exc)
            self.opened = False
            return
        self.password_version = config.secret_version(PASSWORD)
        self.opened = bool(password)  # a real pool would pass it to the driver here

    def fits(self) -> bool:
        """The health check: does the pool fit what the database accepts?"""
        if self.max_size > DB_MAX_CONNECTIONS:
            raise RuntimeError(
                f"pool of {self.max_size} is over the database's {DB_MAX_CONNECTIONS} connections"
            )
        return True


async def main() -> int:
    tenant, env = os.environ.get("CONFIGBUS_TENANT"), os.environ.get("CONFIGBUS_ENV")
    if not tenant or not env:
        log.error("set CONFIGBUS_TENANT and CONFIGBUS_ENV")
        return 2
    subscriber = ConfigSubscriber(tenant, env, service=SERVICE)
    pool = ConnectionPool()
    started = False

    async def resize_pool(old: ResolvedConfig, new: ResolvedConfig, paths: list[str]) -> None:
        await pool.resize(new.get(f"{POOL}.max_size"))

    def reconnect(old: ResolvedConfig, new: ResolvedConfig, paths: list[str]) -> None:
        pool.connect_with(new)

    def report(old: ResolvedConfig, new: ResolvedConfig, paths: list[str]) -> None:
        snapshot = subscriber.snapshot  # config, versions, events and overrides, as one
        event = snapshot.latest_event  # the verified event this apply came from
        assert event is not None
        line = {
            "event": "config_applied",
            "service": SERVICE,
            "instance": subscriber.settings.instance_id,
            "tenant": tenant,
            "env": env,
            "version": snapshot.version,
            "candidate_version": snapshot.candidate_version,  # a rollout's canary: > 0
            "max_size": new.get(f"{POOL}.max_size"),
            "override_version": snapshot.override_version,
            "overrides": [entry.path for entry in snapshot.overrides],
            "latency_ms": round((time.time_ns() - event.body.detected_at) / 1e6, 1),
            "trace_id": subscriber.trace_id,
            "changed": paths[:10],
            "startup": not started,  # the first apply happens inside start()
            "password": {"version": pool.password_version, "opened": pool.opened},
        }
        print(json.dumps(line), flush=True)

    # Callbacks run in registration order after each apply, with the changed keys.
    subscriber.on_change(POOL, resize_pool)
    subscriber.on_change(PASSWORD, reconnect)  # a rotation reaches the pool too
    subscriber.on_change("", report)
    subscriber.add_health_check(pool.fits)  # reported in every heartbeat

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    async with subscriber:  # returns once the latest config is applied
        started = True
        log.info("serving %s/%s v%d", tenant, env, subscriber.version)
        await stop.wait()  # a real service would serve requests here
    log.info("stopped")
    return 0


if __name__ == "__main__":
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    configure_from_env()  # tracing per OTEL_TRACES_EXPORTER
    sys.exit(asyncio.run(main()))
