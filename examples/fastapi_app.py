"""A FastAPI app whose config reloads live: a `configbus.ConfigSubscriber` in its lifespan.

The subscriber starts before the app takes requests (the lifespan waits until the
latest config is applied) and stops after the last one. Handlers read
`subscriber.config`, which is swapped whole on every apply.

    GET /health               {"status": "ok", "tenant", "env", "version", "source", "trace_id"}
    GET /config/{dotted.key}  {"key", "value", "version"}; 404 for a key not in the config

Every apply is also reported as one JSON line on stdout (fields as in
examples/async_service.py). Settings come from the environment:

    CONFIGBUS_TENANT, CONFIGBUS_ENV   the stream to follow (required)
    CONFIGBUS_BOOTSTRAP_SERVERS       Kafka (read by the SDK)
    CONFIGBUS_TRUST                   trust file (SDK)
    CONFIGBUS_INSTANCE_ID             this instance in acks (SDK; default host-pid)
    CONFIGBUS_SERVICE                 the service name in acks (default tonewave-api)
    CONFIGBUS_CACHE_DIR               optional: keep the last good config on disk (SDK)
    OTEL_TRACES_EXPORTER              otlp, console or none (configbus.telemetry)
    LOG_LEVEL                         default INFO; logs go to stderr

    uvicorn --app-dir examples fastapi_app:app --host 127.0.0.1 --port 8000
    curl http://127.0.0.1:8000/config/database.postgresql.connection_pool.max_size
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request

from configbus import ConfigSubscriber, ResolvedConfig, SecretRef
from configbus.telemetry import configure_from_env

SERVICE = os.environ.get("CONFIGBUS_SERVICE", "tonewave-api")

logging.basicConfig(
    level=os.environ.get("LOG_LEVEL", "INFO").upper(),
    stream=sys.stderr,
    format="%(asctime)s %(levelname)s %(name)s: %(message)s",
)
logging.getLogger("aiokafka").setLevel(logging.WARNING)
configure_from_env()  # tracing per OTEL_TRACES_EXPORTER
log = logging.getLogger(SERVICE)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    tenant, env = os.environ.get("CONFIGBUS_TENANT"), os.environ.get("CONFIGBUS_ENV")
    if not tenant or not env:
        raise RuntimeError("set CONFIGBUS_TENANT and CONFIGBUS_ENV")
    subscriber = ConfigSubscriber(tenant, env, service=SERVICE)
    started = False

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
            "override_version": snapshot.override_version,
            "overrides": [entry.path for entry in snapshot.overrides],
            "latency_ms": round((time.time_ns() - event.body.detected_at) / 1e6, 1),
            "trace_id": subscriber.trace_id,
            "changed": paths[:10],
            "startup": not started,
        }
        print(json.dumps(line), flush=True)

    subscriber.on_change("", report)
    async with subscriber:  # the app takes requests once the latest config is applied
        started = True
        app.state.subscriber = subscriber
        log.info("serving %s/%s v%d", tenant, env, subscriber.version)
        yield


app = FastAPI(title=SERVICE, lifespan=lifespan)


def _subscriber(request: Request) -> ConfigSubscriber:
    subscriber: ConfigSubscriber = request.app.state.subscriber
    return subscriber


def _public(value: Any) -> Any:
    """A config value as JSON. Secrets are references by name in the config (never
    values); show them as such."""
    if isinstance(value, SecretRef):
        return f"<secret:{value.name}>"
    if isinstance(value, dict):
        return {key: _public(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [_public(item) for item in value]
    return value


@app.get("/health")
async def health(request: Request) -> dict[str, Any]:
    subscriber = _subscriber(request)
    return {
        "status": "ok",
        "tenant": subscriber.tenant,
        "env": subscriber.env,
        "version": subscriber.version,
        "source": subscriber.source,
        "trace_id": subscriber.trace_id,
    }


@app.get("/config/{key:path}")
async def config_value(key: str, request: Request) -> dict[str, Any]:
    subscriber = _subscriber(request)
    config, version = subscriber.config, subscriber.version  # no await between: one apply
    missing = object()
    value = config.get(key, missing)
    if value is missing:
        raise HTTPException(404, f"{key} is not in the config (v{version})")
    return {"key": key, "value": _public(value), "version": version}
