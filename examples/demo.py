"""`make demo`: one config change, from a file edit to three running services.

1. Start a private Kafka broker and Redis (deploy/local) on free loopback ports, with
   their run dir in a temp folder: nothing collides with other instances.
2. Generate a signing key and a trust file, copy environments/ to the temp folder and
   start the publisher daemon (`configbus daemon`) over the copy.
3. Start three services that follow aurora-records/prod: examples/async_service.py
   (ConfigSubscriber), examples/sync_worker.py (SyncSubscriber) and
   examples/fastapi_app.py (FastAPI under uvicorn), and wait until each applied the
   published version.
4. Edit connection_pool.max_size in the copy's tenants/aurora-records/prod.yml and
   print, per instance, the version it applied, the latency from the publisher
   detecting the edit to the instance applying it, and the trace id (one trace: the
   publisher starts it, every instance continues it). GET the value from the FastAPI
   app before and after.
5. Print `configbus rollout status aurora-records prod`, read from the acks.
5b. The database password is a sealed secret (set in step 2 with `configbus secret
   set`): the asyncio service opens it on access with the tenant's key-encryption key.
   `configbus secret rotate --retire-after-ack` seals a new version, waits until every
   instance applied it, then retires the old one; the service reconnects with v2.
6. Kill the publisher daemon (SIGKILL) and set an emergency override of the same value
   with `configbus override set`, signed by an operator key: every instance applies it
   with the daemon down. At its expiry each instance returns to the published value by
   its own clock, the daemon still down.

With ``--agent`` (``make demo-agent``) the three services follow the stream through
one host agent (`configbus agent`, step 2b) instead of holding Kafka connections each:
they get no Kafka address at all, and still verify every record themselves.

Everything stops and the temp folder goes when the demo ends, however it ends
(CONFIGBUS_DEMO_KEEP=1 keeps the folder, with every log). Every wait has a deadline.
Run it with the project's virtual environment: `make demo`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "local"
BIN = Path(sys.executable).parent  # the virtual environment's bin: configbus, uvicorn
CONFIGBUS = str(BIN / "configbus")

TENANT, ENV = "aurora-records", "prod"
KEY = "database.postgresql.connection_pool.max_size"
EDITED_FILE = f"tenants/{TENANT}/{ENV}.yml"
KID = "demo-publisher"
OPERATOR = "demo-operator"
OVERRIDE_TTL_S = 8
PASSWORD = "database.postgresql.password"
SECRET = f"tenants/{TENANT}/postgres_password"  # its !secret name in the tree

# Deadlines, in seconds.
SERVICE_START_S = 600  # kafka.sh may fetch the broker jars with Maven first
PUBLISH_S = 60  # daemon started -> first publication
READY_S = 60  # services started -> each applied the published version
PROPAGATE_S = 30  # edit -> every instance applied it
ACKS_S = 20  # applied -> `rollout status` sees every ack
STOP_S = 15  # SIGTERM -> exit, per process group


class DemoError(Exception):
    """A step failed: the message says which; `log` is the file to show the end of."""

    def __init__(self, message: str, log: Path | None = None) -> None:
        super().__init__(message)
        self.log = log


@dataclass
class Service:
    """One example service: how to run it, and what it printed."""

    label: str
    kind: str
    instance: str
    command: list[str]
    port: int | None = None
    process: subprocess.Popen[bytes] | None = None
    out: Path = Path()
    err: Path = Path()
    applies: list[dict[str, Any]] = field(default_factory=list)
    _read: int = 0

    def poll(self) -> None:
        """Read the apply lines (JSON on stdout) printed since the last poll."""
        with self.out.open("rb") as file:
            file.seek(self._read)
            data = file.read()
        complete = data[: data.rfind(b"\n") + 1]
        self._read += len(complete)
        for raw in complete.splitlines():
            with contextlib.suppress(ValueError):
                line = json.loads(raw)
                if isinstance(line, dict) and line.get("event") == "config_applied":
                    self.applies.append(line)
        if self.process is not None and self.process.poll() is not None:
            raise DemoError(f"{self.label} exited with status {self.process.returncode}", self.err)

    def applied(self, version: int) -> dict[str, Any] | None:
        """Its first apply of `version` or later."""
        return next((a for a in self.applies if a["version"] >= version), None)

    def override_applied(self, version: int, *, in_effect: bool) -> dict[str, Any] | None:
        """Its first apply with override `version` (or later) composed in, with the
        override in effect or, `in_effect=False`, expired again."""
        return next(
            (
                a
                for a in self.applies
                if a.get("override_version", 0) >= version and bool(a.get("overrides")) is in_effect
            ),
            None,
        )


def say(text: str = "") -> None:
    print(text, flush=True)


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that were free a moment ago."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_until(what: str, deadline_s: float, check: Any, log: Path | None = None) -> Any:
    """Call `check()` every 50 ms until it returns something truthy; DemoError after
    `deadline_s` seconds."""
    deadline = time.monotonic() + deadline_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {deadline_s:g}s waiting for {what}", log)
        time.sleep(0.05)


def http_get(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body: dict[str, Any] = json.load(response)
            return body
    except (OSError, ValueError) as exc:  # URLError is an OSError
        raise DemoError(f"GET {url}: {exc}") from None


class Demo:
    def __init__(self, *, agent: bool = False) -> None:
        self.agent = agent
        self.tmp = Path(tempfile.mkdtemp(prefix="configbus-demo-"))
        self.keep = bool(os.environ.get("CONFIGBUS_DEMO_KEEP"))
        self.logs = self.tmp / "logs"
        self.logs.mkdir()
        self.run_dir = self.tmp / "services"
        self.root = self.tmp / "environments"
        self.started_services: list[str] = []  # deploy/local scripts to stop
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.daemon_log = self.logs / "daemon.log"
        self.service_env: dict[str, str] = {}  # what services get beyond the common env
        kafka_port, controller_port, redis_port, http_port = free_ports(4)
        self.bootstrap = f"127.0.0.1:{kafka_port}"
        self.redis_url = f"redis://127.0.0.1:{redis_port}/0"
        self.script_env = {
            "CONFIGBUS_RUN_DIR": str(self.run_dir),
            "CONFIGBUS_KAFKA_PORT": str(kafka_port),
            "CONFIGBUS_KAFKA_CONTROLLER_PORT": str(controller_port),
            "CONFIGBUS_REDIS_PORT": str(redis_port),
            "KAFKA_HEAP_OPTS": os.environ.get("KAFKA_HEAP_OPTS", "-Xms256m -Xmx512m"),
        }
        # Children see none of the caller's CONFIGBUS_* settings (a developer's cluster,
        # tree or trust file), only ours. A tracer provider without an exporter unless
        # the caller chose an exporter: real trace ids, nothing sent anywhere.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIGBUS_")}
        self.env.setdefault("OTEL_TRACES_EXPORTER", "none")
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env["CONFIGBUS_BOOTSTRAP_SERVERS"] = self.bootstrap
        examples = ROOT / "examples"
        self.services = [
            Service(
                "async_service.py",
                "asyncio, ConfigSubscriber",
                "recommendations-1",
                [sys.executable, str(examples / "async_service.py")],
            ),
            Service(
                "sync_worker.py",
                "threads, SyncSubscriber",
                "audio-worker-1",
                [sys.executable, str(examples / "sync_worker.py")],
            ),
            Service(
                "fastapi_app.py",
                f"FastAPI, http://127.0.0.1:{http_port}",
                "tonewave-api-1",
                [
                    sys.executable, "-m", "uvicorn", "--app-dir", str(examples),
                    "fastapi_app:app", "--host", "127.0.0.1", "--port", str(http_port),
                ],
                port=http_port,
            ),
        ]  # fmt: skip

    # -- the steps ------------------------------------------------------------------
    def run(self) -> None:
        say(f"configbus demo: one change, from a file edit to three services ({self.tmp})")
        self.start_kafka_and_redis()
        version = self.start_publisher()
        if self.agent:
            self.start_agent()
        self.start_services(version)
        api = self.services[2]
        url = f"http://127.0.0.1:{api.port}/config/{KEY}"
        say(f"\nGET {url}")
        before = http_get(url)
        say(f"  {json.dumps(before)}")

        new_value = before["value"] + 50
        self.edit(before["value"], new_value)
        say(f"\nedit {EDITED_FILE}: {KEY}: {before['value']} -> {new_value}")
        applies = self.wait_for_change(version)

        after = wait_until(
            "the FastAPI app to serve the new value",
            PROPAGATE_S,
            lambda: (body := http_get(url))["version"] > version and body,
            api.err,
        )
        say(f"\nGET {url}")
        say(f"  {json.dumps(after)}")
        if after["value"] != new_value:
            raise DemoError(f"the app serves {after['value']!r}, expected {new_value}")

        self.rollout_status(applies[0]["version"])
        self.rotate_secret()
        self.emergency_override(url, new_value)

    def start_kafka_and_redis(self) -> None:
        began = time.monotonic()
        if not any((DEPLOY / ".cache").glob("kafka-*/libs")):
            say("  (first run: fetching the Kafka jars with Maven, about a minute)")
        if shutil.which("redis-server") is None:
            say("  (first run: installing redis-server with apt-get)")
        for script in ("kafka.sh", "redis.sh"):
            self.started_services.append(script)  # stop it even after a failed start
            self.script(script, "start", SERVICE_START_S)
        redis = self.redis_url.removeprefix("redis://").removesuffix("/0")
        took = time.monotonic() - began
        say(f"  kafka {self.bootstrap} and redis {redis} started by deploy/local in {took:.1f}s")

    def start_publisher(self) -> int:
        """Keys, trust file, a copy of the tree, the daemon; the version it published."""
        keys, trust = self.tmp / "keys", self.tmp / "trust.yml"
        self.configbus("keys", "generate", "--kid", KID, "--out", str(keys), "--trust", str(trust))
        self.configbus(
            "keys", "generate", "--kid", OPERATOR, "--out", str(keys), "--trust", str(trust),
            "--role", "operator", "--tenants", TENANT, "--environments", ENV, "--max-ttl", "1h",
        )  # fmt: skip
        self.operator_key = keys / f"{OPERATOR}.key"
        shutil.copytree(ROOT / "environments", self.root)
        self.env["CONFIGBUS_TRUST"] = str(trust)
        # The tenant's key-encryption key (operators hold it; its services get a copy of
        # their tenant's keys only), and the database password sealed into the tree.
        self.keks = self.tmp / "keys" / "keks.yml"
        service_keks = self.tmp / "keys" / f"{TENANT}-keks.yml"
        self.configbus("secret", "keys", "add", TENANT, "--keys", str(self.keks))
        self.configbus(
            "secret", "keys", "export", TENANT, "--keys", str(self.keks), "--out", str(service_keks)
        )
        self.configbus(
            "secret", "set", TENANT, ENV, SECRET, "--generate", "24", "--keys", str(self.keks),
            "--root", str(self.root), "--reason", "demo: the database password",
        )  # fmt: skip
        self.service_env["CONFIGBUS_SECRET_KEYS"] = str(service_keks)
        self.spawn(
            "publisher daemon",
            [
                CONFIGBUS, "daemon", "--root", str(self.root),
                "--bootstrap-servers", self.bootstrap, "--redis", self.redis_url,
                "--signing-key", str(keys / f"{KID}.key"), "--kid", KID,
            ],
            self.logs / "daemon.out",
            self.daemon_log,
        )  # fmt: skip
        version: int = wait_until(
            f"the daemon to publish {TENANT}/{ENV}",
            PUBLISH_S,
            lambda: self.daemon_published(TENANT, ENV),
            self.daemon_log,
        )
        say(f"  configbus daemon publishing a copy of environments/: {TENANT}/{ENV} at v{version}")
        say(f"  services following {TENANT}/{ENV}:")
        return version

    def start_agent(self) -> None:
        """`configbus agent` on a socket in the temp folder; services then follow
        through it and know nothing of Kafka."""
        socket_path = self.tmp / "agent.sock"
        self.spawn(
            "agent",
            [
                CONFIGBUS, "agent", "--socket", str(socket_path),
                "--bootstrap-servers", self.bootstrap, "--cache-dir", str(self.tmp / "agent-cache"),
            ],
            self.logs / "agent.out",
            self.logs / "agent.log",
        )  # fmt: skip
        wait_until("the agent to listen", PUBLISH_S, socket_path.exists, self.logs / "agent.log")
        say(f"  configbus agent on {socket_path}: the services below follow through it")
        self.service_env.update(CONFIGBUS_AGENT=str(socket_path), CONFIGBUS_BOOTSTRAP_SERVERS="")

    def daemon_published(self, tenant: str, env: str) -> int:
        """The last version the daemon's JSON log says it published for the stream."""
        self.check_alive("publisher daemon", self.daemon_log)
        version = 0
        for raw in self.daemon_log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(raw)
                if entry.get("message", "").startswith("published ") and (
                    entry.get("tenant"),
                    entry.get("env"),
                ) == (tenant, env):
                    version = int(entry["version"])
        return version

    def start_services(self, version: int) -> None:
        for service in self.services:
            env = {
                "CONFIGBUS_TENANT": TENANT,
                "CONFIGBUS_ENV": ENV,
                "CONFIGBUS_INSTANCE_ID": service.instance,
                "CONFIGBUS_CACHE_DIR": str(self.tmp / "cache" / service.instance),
                **self.service_env,
            }
            name = service.label.removesuffix(".py")
            service.out, service.err = self.logs / f"{name}.out", self.logs / f"{name}.log"
            service.process = self.spawn(
                service.label, service.command, service.out, service.err, env
            )
        self.wait_for_apply(version, f"three services to apply v{version}", READY_S)
        api = self.services[2]
        wait_until(
            "the FastAPI app to answer",
            READY_S,
            lambda: self.answers(f"http://127.0.0.1:{api.port}/health"),
            api.err,
        )
        for service in self.services:
            applied = service.applied(version)
            assert applied is not None
            say(
                f"    {service.label:<17} {service.instance:<18} {service.kind:<32}"
                f" applied v{applied['version']}"
            )
        password = self.services[0].applied(version) or {}
        if password.get("password") != {"version": 1, "opened": True}:
            raise DemoError(f"the asyncio service did not open {PASSWORD} v1: {password}")
        say(
            f"  {self.services[0].instance} opened {PASSWORD} (secret {SECRET} v1): sealed in "
            f"the tree, decrypted on access"
        )

    def wait_for_apply(self, version: int, what: str, deadline_s: float) -> None:
        """Until every service reported applying `version` (or later). On a timeout,
        show the log of one that did not (the daemon's when none did)."""

        def all_applied() -> bool:
            for service in self.services:
                service.poll()
            return all(s.applied(version) for s in self.services)

        try:
            wait_until(what, deadline_s, all_applied)
        except DemoError as exc:
            if exc.log is not None:  # a service exited: that error says which
                raise
            late = [s for s in self.services if not s.applied(version)]
            log = late[0].err if len(late) < len(self.services) else self.daemon_log
            names = ", ".join(s.label for s in late)
            raise DemoError(f"{exc}; not applied by: {names}", log) from None

    def answers(self, url: str) -> bool:
        self.services[2].poll()  # fails fast when the app exited
        try:
            http_get(url)
        except DemoError:
            return False
        return True

    def edit(self, old: int, new: int) -> None:
        """The change an operator makes: one value in the tenant's layer. Written to a
        temporary file and renamed, as editors do, so the daemon never reads half a file."""
        path = self.root / EDITED_FILE
        text, count = re.subn(
            rf"^(\s+max_size:\s*){old}\b", rf"\g<1>{new}", path.read_text(), flags=re.M
        )
        if count != 1:
            raise DemoError(f"{path}: expected one 'max_size: {old}' line, found {count}")
        temporary = path.with_name(f".{path.name}.edit")
        temporary.write_text(text)
        os.replace(temporary, path)

    def wait_for_change(self, version: int) -> list[dict[str, Any]]:
        """Wait until every instance applied a version after `version`; print one line
        per instance. All must carry the same version and trace id."""
        what = f"three services to apply the change (v{version + 1})"
        self.wait_for_apply(version + 1, what, PROPAGATE_S)
        applies = [s.applied(version + 1) or {} for s in self.services]
        header = f"{'instance':<18} {'tenant':<15} {'env':<5} {'version':<7} {'latency':>8}"
        say(f"\n  {header}  trace id")
        for apply in applies:
            say(
                f"  {apply['instance']:<18} {apply['tenant']:<15} {apply['env']:<5}"
                f" v{apply['version']:<6} {apply['latency_ms']:>5.1f} ms  {apply['trace_id']}"
            )
        if len({a["version"] for a in applies}) != 1:
            raise DemoError("the instances applied different versions")
        trace_ids = {a["trace_id"] for a in applies}
        if len(trace_ids) != 1 or not all(trace_ids) or "0" * 32 in trace_ids:
            raise DemoError("expected one trace id, started by the publisher, in every instance")
        say("  (latency: from the publisher detecting the edit to the instance applying it;")
        say("   one trace: the publisher started it, each instance continued it)")
        return applies

    def rollout_status(self, version: int) -> None:
        """Wait until the acks of all three instances are in, then show the table."""
        args = ["rollout", "status", TENANT, ENV, "--bootstrap-servers", self.bootstrap]

        def acks_in() -> bool:
            report = json.loads(self.configbus(*args, "--json", "--version", str(version)))
            return bool(report["at_target"] >= len(self.services))

        wait_until("the acks of every instance", ACKS_S, acks_in)
        say(f"\n$ configbus rollout status {TENANT} {ENV}")
        say(self.configbus(*args).rstrip())

    def rotate_secret(self) -> None:
        """Rotate the database password: v2 is sealed while v1 stays valid, v1 is retired
        once every instance applied a config carrying v2, and the pool reconnects."""
        say(
            f"\n$ configbus secret rotate {TENANT} {ENV} {SECRET} --generate 24 "
            "--retire-after-ack --max-wait 30s"
        )
        output = self.configbus(
            "secret", "rotate", TENANT, ENV, SECRET, "--generate", "24", "--keys",
            str(self.keks), "--root", str(self.root), "--retire-after-ack", "--max-wait", "30s",
            "--bootstrap-servers", self.bootstrap, "--reason", "demo: scheduled rotation",
        )  # fmt: skip
        for line in output.splitlines():
            say(f"  {line.replace(str(self.root), 'environments')}")
        service = self.services[0]

        def reconnected() -> bool:
            service.poll()
            return any(a.get("password") == {"version": 2, "opened": True} for a in service.applies)

        wait_until(f"{service.instance} to reconnect with v2", PROPAGATE_S, reconnected)
        say(f"  {service.instance} reconnected its pool with {PASSWORD} v2; v1 is retired")
        say("  (the values are in no log, topic, ack or cache file: only ciphertext travels)")

    def emergency_override(self, url: str, published: int) -> None:
        """With the daemon killed, an operator overrides the value for OVERRIDE_TTL_S
        seconds; every instance applies it, then drops it at its expiry."""
        daemon = next(process for name, process in self.processes if name == "publisher daemon")
        os.killpg(daemon.pid, signal.SIGKILL)
        daemon.wait(STOP_S)
        say("\n$ kill -9 <publisher daemon>        # the control plane is down")
        value = published + 100
        command = [
            "override", "set", TENANT, ENV, f"{KEY}={value}", "--ttl", f"{OVERRIDE_TTL_S}s",
            "--reason", "demo: absorb a load spike", "--key", str(self.operator_key),
            "--root", str(self.root), "--wait", str(PROPAGATE_S),
        ]  # fmt: skip
        say(
            f"$ configbus override set {TENANT} {ENV} {KEY}={value} --ttl {OVERRIDE_TTL_S}s "
            f"--reason 'demo: absorb a load spike' --key keys/{OPERATOR}.key"
        )
        for line in self.configbus(*command).splitlines():
            say(f"  {line}")

        def all_have(in_effect: bool) -> bool:
            for service in self.services:
                service.poll()
            return all(s.override_applied(1, in_effect=in_effect) for s in self.services)

        wait_until("every instance to apply the override", PROPAGATE_S, lambda: all_have(True))
        for service in self.services:
            apply = service.override_applied(1, in_effect=True) or {}
            say(
                f"  {apply['instance']:<18} v{apply['version']} + override"
                f" v{apply['override_version']}  {apply['latency_ms']:>5.1f} ms"
                f"  {', '.join(apply['overrides'])}"
            )
        body = http_get(url)
        if body["value"] != value:
            raise DemoError(f"the app serves {body['value']!r} under the override, not {value}")
        say(f"GET {url}\n  {json.dumps(body)}")
        say("  (signed by the operator's key and written to Kafka by the CLI: no daemon needed)")
        wait_until(
            "every instance to drop the expired override",
            OVERRIDE_TTL_S + PROPAGATE_S,
            lambda: all_have(False),
        )
        body = http_get(url)
        if body["value"] != published:
            raise DemoError(f"the app serves {body['value']!r} after the expiry, not {published}")
        say(f"\nafter {OVERRIDE_TTL_S}s the override expired; each instance dropped it by its own")
        say("clock, with the daemon still down:")
        say(f"GET {url}\n  {json.dumps(body)}")

    # -- processes ------------------------------------------------------------------
    def script(self, name: str, command: str, timeout: float) -> None:
        """deploy/local/NAME COMMAND in its own process group: Ctrl-C reaches only us, and
        an interrupted or timed-out run is killed whole (a broker half started too)."""
        env = {k: v for k, v in self.env.items() if k != "CONFIGBUS_BOOTSTRAP_SERVERS"}
        process = subprocess.Popen(
            ["bash", str(DEPLOY / name), command],
            env={**env, **self.script_env},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            _, stderr = process.communicate(timeout=timeout)
        except BaseException as exc:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            if isinstance(exc, subprocess.TimeoutExpired):
                raise DemoError(f"deploy/local/{name} {command} took over {timeout:g}s") from None
            raise
        if process.returncode != 0:
            sys.stderr.write(stderr[-4000:])
            raise DemoError(f"deploy/local/{name} {command} failed (output above)")

    def configbus(self, *args: str) -> str:
        try:
            result = subprocess.run(
                [CONFIGBUS, *args], env=self.env, capture_output=True, text=True, timeout=60
            )
        except subprocess.TimeoutExpired:
            raise DemoError(f"configbus {args[0]} took over 60s") from None
        if result.returncode != 0:
            sys.stderr.write(result.stderr[-4000:])
            raise DemoError(f"configbus {' '.join(args[:2])} failed (exit {result.returncode})")
        return result.stdout

    def spawn(
        self,
        name: str,
        command: list[str],
        out: Path,
        err: Path,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        with out.open("wb") as stdout, err.open("wb") as stderr:
            process = subprocess.Popen(
                command,
                cwd=self.tmp,
                env={**self.env, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,  # its own process group: we stop it, not Ctrl-C
            )
        self.processes.append((name, process))
        return process

    def check_alive(self, name: str, log: Path) -> None:
        for known, process in self.processes:
            if known == name and process.poll() is not None:
                raise DemoError(f"the {name} exited with status {process.returncode}", log)

    def cleanup(self) -> list[str]:
        """Stop everything we started, newest first; remove the temp folder. Returns
        what went wrong (nothing is raised: every step runs)."""
        problems: list[str] = []
        for _, process in self.processes:  # services and daemon: SIGTERM all, then wait
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_S
        for name, process in reversed(self.processes):
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                problems.append(f"{name} ignored SIGTERM for {STOP_S}s; killed")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # anything left in its group
            process.wait()
        for script in reversed(self.started_services):
            try:
                self.script(script, "stop", 60)
            except DemoError as exc:
                problems.append(str(exc))
        if self.keep:
            say(f"kept {self.tmp}, with every log (CONFIGBUS_DEMO_KEEP)")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return problems


def _stop_on_signal(signum: int, frame: FrameType | None) -> NoReturn:
    raise SystemExit(128 + signum)


def main() -> int:
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _stop_on_signal)
    began = time.monotonic()
    demo = Demo(agent="--agent" in sys.argv[1:])
    status = 0
    try:
        demo.run()
    except DemoError as exc:
        if exc.log is not None and exc.log.exists():
            lines = exc.log.read_text(errors="replace").splitlines()[-25:]
            sys.stderr.write(f"--- the end of {exc.log.name} ---\n" + "\n".join(lines) + "\n")
        print(f"demo failed: {exc}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print("demo interrupted", file=sys.stderr)
        status = 130
    except SystemExit as exc:
        print("demo stopped by a signal", file=sys.stderr)
        status = int(exc.code or 1)
    except Exception as exc:  # a bug in the demo itself: say so, then still clean up
        traceback.print_exc()
        print(f"demo failed: {exc!r}", file=sys.stderr)
        status = 1
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)  # let the clean-up finish (it is bounded)
        problems = demo.cleanup()
        for problem in problems:
            print(f"clean-up: {problem}", file=sys.stderr)
        if status == 0 and not problems:
            removed = "" if demo.keep else ", and removed the temp folder"
            say(
                f"\ndone in {time.monotonic() - began:.0f}s; stopped the services, the daemon,"
                f" Kafka and Redis{removed}"
            )
    return status or (1 if problems else 0)


if __name__ == "__main__":
    sys.exit(main())
