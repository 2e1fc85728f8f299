"""Servers for benchmarks: Kafka and Redis named in CONFIGBUS_BOOTSTRAP_SERVERS and
CONFIGBUS_REDIS_URL, or fresh ones started through deploy/local on free ports; etcd
through benchmarks/etcd.sh. Whatever is started here is stopped afterwards."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEPLOY = HERE.parent / "deploy" / "local"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _script(name: str, command: str, env: dict[str, str]) -> None:
    result = subprocess.run(
        ["bash", str(DEPLOY / name), command],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if result.returncode != 0:
        raise SystemExit(f"deploy/local/{name} {command} failed:\n{result.stderr}")


@contextmanager
def kafka_and_redis() -> Iterator[tuple[str, str]]:
    """(bootstrap servers, redis url), started here unless the environment names them."""
    servers = os.environ.get("CONFIGBUS_BOOTSTRAP_SERVERS")
    redis_url = os.environ.get("CONFIGBUS_REDIS_URL")
    with tempfile.TemporaryDirectory(prefix="configbus-bench-services-") as run_dir:
        started: list[tuple[str, dict[str, str]]] = []
        try:
            if not servers:
                env = {
                    "CONFIGBUS_RUN_DIR": run_dir,
                    "CONFIGBUS_KAFKA_PORT": str(free_port()),
                    "CONFIGBUS_KAFKA_CONTROLLER_PORT": str(free_port()),
                }
                _script("kafka.sh", "start", env)
                started.append(("kafka.sh", env))
                servers = f"127.0.0.1:{env['CONFIGBUS_KAFKA_PORT']}"
            if not redis_url:
                env = {"CONFIGBUS_RUN_DIR": run_dir, "CONFIGBUS_REDIS_PORT": str(free_port())}
                _script("redis.sh", "start", env)
                started.append(("redis.sh", env))
                redis_url = f"redis://127.0.0.1:{env['CONFIGBUS_REDIS_PORT']}/0"
            yield servers, redis_url
        finally:
            for name, env in reversed(started):
                _script(name, "stop", env)


@contextmanager
def etcd(run_dir: Path) -> Iterator[tuple[int | None, str | None]]:
    """(port, None), or (None, why) when etcd-server cannot be installed here."""
    env = {**os.environ, "CONFIGBUS_RUN_DIR": str(run_dir)}
    script = ["bash", str(HERE / "etcd.sh")]
    result = subprocess.run(
        [*script, "start"], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    if result.returncode == 4:
        last = (result.stderr.strip().splitlines() or ["?"])[-1]
        yield None, f"etcd-server is not installed and apt-get could not install it: {last}"
        return
    if result.returncode != 0:
        raise SystemExit(f"benchmarks/etcd.sh start failed:\n{result.stderr}")
    try:
        yield int(result.stdout.strip().splitlines()[-1].rsplit(":", 1)[1]), None
    finally:
        subprocess.run([*script, "stop"], env=env, capture_output=True, timeout=60, check=False)


def etcd_version(port: int) -> str | None:
    import json
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/version", timeout=5) as answer:
            return str(json.load(answer).get("etcdserver"))
    except (OSError, ValueError):
        return None
