"""A thread-based worker that follows its config with `configbus.SyncSubscriber`.

No asyncio in sight: the subscriber runs its own thread, `start()` blocks until the
first config is applied, and the worker threads read `subscriber.config` whenever they
pick up a job, so each job sees one whole config, old or new, never a mix. Change
callbacks run on the subscriber's thread; this one logs what changed and reports the
apply as one JSON line on stdout (see examples/async_service.py for the fields).

Settings come from the environment:

    CONFIGBUS_TENANT, CONFIGBUS_ENV   the stream to follow (required)
    CONFIGBUS_BOOTSTRAP_SERVERS       Kafka (read by the SDK)
    CONFIGBUS_TRUST                   trust file (SDK)
    CONFIGBUS_INSTANCE_ID             this instance in acks (SDK; default host-pid)
    CONFIGBUS_SERVICE                 the service name in acks (default audio-worker)
    CONFIGBUS_CACHE_DIR               optional: keep the last good config on disk (SDK)
    WORKER_THREADS                    default 2
    OTEL_TRACES_EXPORTER              otlp, console or none (configbus.telemetry)
    LOG_LEVEL                         default INFO; logs go to stderr

    python examples/sync_worker.py        # stop with Ctrl-C or SIGTERM
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time

from configbus import ResolvedConfig, SyncSubscriber
from configbus.telemetry import configure_from_env

SERVICE = os.environ.get("CONFIGBUS_SERVICE", "audio-worker")

log = logging.getLogger(SERVICE)


def work(subscriber: SyncSubscriber, stop: threading.Event) -> None:
    """Process jobs until asked to stop; every job reads the config it needs afresh."""
    while not stop.is_set():
        config = subscriber.config  # one consistent snapshot for this job
        concurrency = config.get("audio_processing.workers.concurrency_per_worker", 1)
        formats = config.get("audio_processing.supported_formats", ())
        log.debug("job: concurrency %d, formats %s", concurrency, ", ".join(formats))
        stop.wait(1.0)  # stands in for taking a job from a queue and processing it


def main() -> int:
    tenant, env = os.environ.get("CONFIGBUS_TENANT"), os.environ.get("CONFIGBUS_ENV")
    if not tenant or not env:
        log.error("set CONFIGBUS_TENANT and CONFIGBUS_ENV")
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    subscriber = SyncSubscriber(tenant, env, service=SERVICE)
    started = threading.Event()

    def on_change(old: ResolvedConfig, new: ResolvedConfig, paths: list[str]) -> None:
        snapshot = subscriber.snapshot  # config, versions, events and overrides, as one
        event = snapshot.latest_event  # the verified event this apply came from
        assert event is not None
        if started.is_set():
            log.info("v%d changed %s", snapshot.version, ", ".join(paths))
        line = {
            "event": "config_applied",
            "service": SERVICE,
            "instance": subscriber.subscriber.settings.instance_id,
            "tenant": tenant,
            "env": env,
            "version": snapshot.version,
            "override_version": snapshot.override_version,
            "overrides": [entry.path for entry in snapshot.overrides],
            "latency_ms": round((time.time_ns() - event.body.detected_at) / 1e6, 1),
            "trace_id": subscriber.trace_id,
            "changed": paths[:10],
            "startup": not started.is_set(),
        }
        print(json.dumps(line), flush=True)

    subscriber.on_change("", on_change)
    with subscriber:  # blocks until the latest config is applied
        started.set()
        threads = [
            threading.Thread(target=work, args=(subscriber, stop), name=f"worker-{n}")
            for n in range(int(os.environ.get("WORKER_THREADS", "2")))
        ]
        for thread in threads:
            thread.start()
        log.info("%d worker threads on %s/%s v%d", len(threads), tenant, env, subscriber.version)
        stop.wait()  # the main thread only waits for SIGTERM or SIGINT
        for thread in threads:
            thread.join()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s",
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    configure_from_env()  # tracing per OTEL_TRACES_EXPORTER
    sys.exit(main())
