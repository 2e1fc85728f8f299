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
5a. A canary that rolls back by itself: an operator arms a staged rollout (`configbus
   rollout start --steps 1,100% --select service=recommendations`), then the pool is
   edited to 5000. The asyncio service is the canary: it applies the candidate, its
   health check (the database accepts 1000 connections) fails in its next heartbeat,
   and the daemon aborts the rollout. The canary goes back to the stable version by
   itself; the other two services never saw the candidate. `rollout status` names the
   gate that fired, and on which instance. The edit is then undone.
5b. The database password is a sealed secret (set in step 2 with `configbus secret
   set`): the asyncio service opens it on access with the tenant's key-encryption key.
   `configbus secret rotate --retire-after-ack` seals a new version, waits until every
   instance applied it, then retires the old one; the service reconnects with v2.
6. Kill the publisher daemon (SIGKILL) and set an emergency override of the same value
   with `configbus override set`, signed by an operator key: every instance applies it
   with the daemon down. At its expiry each instance returns to the published value by
   its own clock, the daemon still down.
6a. `configbus audit verify`: every step above left signed records in the audit trail,
   each linked to the one before it in its writer's chain; none is missing or moved.
7. Secured mode only (below): a service principal is refused another tenant's stream.

With ``--agent`` (``make demo-agent``) the three services follow the stream through
one host agent (`configbus agent`, step 2b) instead of holding Kafka connections each:
they get no Kafka address at all, and still verify every record themselves.

With ``CONFIGBUS_DEMO_SECURE=1`` (either mode) the bus is secured: the broker is
deploy/local/kafka-secure.sh (SASL_SSL with SCRAM-SHA-512, and mutual TLS, ACLs
enforced), `configbus acl apply` grants each principal its role, run as the broker's
admin, and every process connects as its own principal: the daemon as the publisher,
the services as their tenant's service principal (the FastAPI app with a client
certificate, the others with SCRAM), the operator commands as an operator of the
tenant, the agent as an agent. Step 7 shows a refusal: the tenant's service principal
subscribing to another tenant's stream.

Everything stops and the temp folder goes when the demo ends, however it ends
(CONFIGBUS_DEMO_KEEP=1 keeps the folder, with every log). Every wait has a deadline.
Run it with the project's virtual environment: `make demo`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
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
CANARY_POOL = 5000  # more connections than the database takes: the canary turns unhealthy
PASSWORD = "database.postgresql.password"
SECRET = f"tenants/{TENANT}/postgres_password"  # its !secret name in the tree

# Deadlines, in seconds.
SERVICE_START_S = 600  # kafka.sh may fetch the broker jars with Maven first
PUBLISH_S = 60  # daemon started -> first publication
READY_S = 60  # services started -> each applied the published version
PROPAGATE_S = 30  # edit -> every instance applied it
ACKS_S = 20  # applied -> `rollout status` sees every ack
STOP_S = 15  # SIGTERM -> exit, per process group
DENIED_S = 5  # the refused subscriber's start timeout: long enough to be told why

# The secured mode (CONFIGBUS_DEMO_SECURE=1): each role's Kafka principal, User:NAME, a
# SCRAM user made by kafka-secure.sh. The service principal also has a client
# certificate (CN=NAME: the same principal), for the FastAPI app and the refused read.
SECURE_VARIABLE = "CONFIGBUS_DEMO_SECURE"
USERS = {
    "publisher": "configbus-publisher",
    "service": f"svc-{TENANT}",
    "operator": "oncall",
    "agent": "configbus-agent",
}
OTHER_TENANT = "helix-audio"  # whose stream the service principal may not read
# A service of TENANT that subscribes to OTHER_TENANT: prints why it got no config.
REFUSED_SUBSCRIBER = """
import asyncio, sys
from configbus import ConfigBusError, ConfigSubscriber

async def main() -> int:
    try:
        async with ConfigSubscriber(sys.argv[1], sys.argv[2], start_timeout=float(sys.argv[3])):
            print("applied: not refused")
    except ConfigBusError as exc:
        print(f"{exc.__class__.__name__}: {exc}")
    return 0

sys.exit(asyncio.run(main()))
"""


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
    principal: str = "service"  # secured mode: its settings in Demo.principals
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


def read_exports(path: Path) -> dict[str, str]:
    """The `export NAME=VALUE` lines of a settings file kafka-secure.sh wrote (values
    quoted as the shell reads them)."""
    found = {}
    for line in path.read_text().splitlines():
        name, equals, value = line.removeprefix("export ").partition("=")
        if line.startswith("export ") and equals:
            found[name] = "".join(shlex.split(value))
    return found


def http_get(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body: dict[str, Any] = json.load(response)
            return body
    except (OSError, ValueError) as exc:  # URLError is an OSError
        raise DemoError(f"GET {url}: {exc}") from None


class Demo:
    def __init__(self, *, agent: bool = False, secure: bool = False) -> None:
        self.agent = agent
        self.secure = secure
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
        # Secured mode: the CONFIGBUS_KAFKA_* settings of each principal, by role (and
        # "service-tls", "admin"); set once the broker made them. Empty: a plain bus.
        self.principals: dict[str, dict[str, str]] = {}
        kafka_port, controller_port, redis_port, http_port, tls_port = free_ports(5)
        self.bootstrap = f"127.0.0.1:{kafka_port}"  # SASL_SSL when secured
        self.tls_bootstrap = f"127.0.0.1:{tls_port}"  # mutual TLS, secured mode only
        self.kafka_script = "kafka-secure.sh" if secure else "kafka.sh"
        self.redis_url = f"redis://127.0.0.1:{redis_port}/0"
        self.script_env = {
            "CONFIGBUS_RUN_DIR": str(self.run_dir),
            "CONFIGBUS_KAFKA_PORT": str(kafka_port),
            "CONFIGBUS_KAFKA_CONTROLLER_PORT": str(controller_port),
            "CONFIGBUS_REDIS_PORT": str(redis_port),
            "KAFKA_HEAP_OPTS": os.environ.get("KAFKA_HEAP_OPTS", "-Xms256m -Xmx512m"),
        }
        if secure:
            users = [USERS[role] for role in USERS if role != "agent" or agent]
            self.script_env.update(
                CONFIGBUS_KAFKA_SSL_PORT=str(tls_port),
                CONFIGBUS_KAFKA_SCRAM_USERS=" ".join(users),
                CONFIGBUS_KAFKA_CLIENT_CERTS=USERS["service"],
            )
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
                principal="service-tls",
            ),
        ]  # fmt: skip

    # -- the steps ------------------------------------------------------------------
    def run(self) -> None:
        secured = " on a secured bus" if self.secure else ""
        say(f"configbus demo: one change, from a file edit to three services{secured} ({self.tmp})")
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
        self.canary_rolls_back(new_value, applies[0]["version"])
        self.rotate_secret()
        self.emergency_override(url, new_value)
        self.audit_trail()
        if self.secure:
            self.refused_read()

    def start_kafka_and_redis(self) -> None:
        began = time.monotonic()
        if not any((DEPLOY / ".cache").glob("kafka-*/libs")):
            say("  (first run: fetching the Kafka jars with Maven, about a minute)")
        if shutil.which("redis-server") is None:
            say("  (first run: installing redis-server with apt-get)")
        for script in (self.kafka_script, "redis.sh"):
            self.started_services.append(script)  # stop it even after a failed start
            self.script(script, "start", SERVICE_START_S)
        redis = self.redis_url.removeprefix("redis://").removesuffix("/0")
        took = time.monotonic() - began
        kafka = self.bootstrap
        if self.secure:
            kafka = f"{self.bootstrap} (SASL_SSL/SCRAM), {self.tls_bootstrap} (mutual TLS),"
            self.load_principals()
        say(f"  kafka {kafka} and redis {redis} started by deploy/local in {took:.1f}s")

    def load_principals(self) -> None:
        """The settings files kafka-secure.sh wrote for each principal."""
        made = self.run_dir / "kafka-secure"
        for role, user in USERS.items():
            if role != "agent" or self.agent:
                self.principals[role] = read_exports(made / "users" / f"{user}.env")
        self.principals["admin"] = read_exports(made / "users" / "admin.env")
        certificate = made / "tls" / "clients" / f"{USERS['service']}.env"
        self.principals["service-tls"] = read_exports(certificate)

    def kafka_env(self, role: str) -> dict[str, str]:
        """The CONFIGBUS_KAFKA_* settings (and address) of `role`'s principal; none on a
        plain bus."""
        return self.principals.get(role, {})

    def apply_acls(self) -> None:
        """As the broker's admin, grant each principal its role over the tree's tenants;
        then say who connects as whom."""
        grants = [
            "--publisher", f"User:{USERS['publisher']}",
            "--service", f"{TENANT}=User:{USERS['service']}",
            "--operator", f"User:{USERS['operator']}={TENANT}",
        ]  # fmt: skip
        if self.agent:
            grants += ["--agent", f"User:{USERS['agent']}={TENANT}"]
        output = self.configbus("acl", "apply", "--root", str(self.root), *grants, role="admin")
        say("  the bus is secured: TLS on every connection, one principal per process, and")
        say("  nothing allowed that no ACL allows. As User:admin (a super user):")
        flags = [" ".join(grants[i : i + 2]) for i in range(0, len(grants), 2)]
        say(" \\\n        ".join(["  $ configbus acl apply --root environments", *flags]))
        say(f"    {output.splitlines()[-1]}")
        scram, tls = "SCRAM-SHA-512 over SASL_SSL", "a client certificate, mutual TLS"
        who = [("publisher daemon", f"User:{USERS['publisher']}", scram)]
        if self.agent:
            who.append(("configbus agent", f"User:{USERS['agent']}", scram))
            who.append(("the three services", "no Kafka principal", "they reach the agent only"))
        else:
            for service in self.services:
                how = tls if service.principal == "service-tls" else scram
                who.append((service.label, f"User:{USERS['service']}", how))
        who.append(("configbus CLI (operator)", f"User:{USERS['operator']}", scram))
        for process, principal, how in who:
            say(f"    {process:<24} {principal:<28} {how}")

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
        if self.secure:
            self.apply_acls()
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
            self.kafka_env("publisher"),
        )  # fmt: skip
        version: int = wait_until(
            f"the daemon to publish {TENANT}/{ENV}",
            PUBLISH_S,
            lambda: self.daemon_published(TENANT, ENV),
            self.daemon_log,
        )
        say(f"  configbus daemon publishing a copy of environments/: {TENANT}/{ENV} at v{version}")
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
            self.kafka_env("agent"),
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
        say(f"  services following {TENANT}/{ENV}:")
        for service in self.services:
            env = {
                "CONFIGBUS_TENANT": TENANT,
                "CONFIGBUS_ENV": ENV,
                "CONFIGBUS_INSTANCE_ID": service.instance,
                "CONFIGBUS_CACHE_DIR": str(self.tmp / "cache" / service.instance),
                "CONFIGBUS_HEARTBEAT": "2",
                **({} if self.agent else self.kafka_env(service.principal)),
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

    def canary_rolls_back(self, stable_value: int, stable: int) -> None:
        """Arm a canary on the asyncio service, push a pool its database cannot take,
        and watch the gate roll it back with no one involved."""
        risky = CANARY_POOL
        signer = ["--key", str(self.operator_key), "--bootstrap-servers", self.bootstrap]
        say(
            f"\n$ configbus rollout start {TENANT} {ENV} --steps 1,100% --bake 30s "
            f"--select service=recommendations --reason 'demo: a bigger pool'"
        )
        output = self.configbus(
            "rollout", "start", TENANT, ENV, "--steps", "1,100%", "--bake", "30s",
            "--select", "service=recommendations", "--reason", "demo: a bigger pool", *signer,
        )  # fmt: skip
        say(f"  {output.strip()}")
        wait_until(
            "the daemon to take the rollout command",
            PROPAGATE_S,
            lambda: "armed by" in self.daemon_log.read_text(),
            self.daemon_log,
        )
        marks = [len(service.applies) for service in self.services]
        self.edit(stable_value, risky)
        say(f"edit {EDITED_FILE}: {KEY}: {stable_value} -> {risky}  (the database takes 1000)")
        canary = self.services[0]

        def back_on_stable() -> dict[str, Any] | None:
            for service in self.services:
                service.poll()
            seen = canary.applies[marks[0] :]
            took = next((a for a in seen if a.get("candidate_version")), None)
            after = seen[seen.index(took) + 1 :] if took is not None else []
            return next((a for a in after if not a.get("candidate_version")), None)

        back = wait_until("the canary to be rolled back", PROPAGATE_S, back_on_stable, canary.err)
        took = next(a for a in canary.applies[marks[0] :] if a.get("candidate_version"))
        say(f"  {canary.instance:<18} applied the candidate: max_size {took['max_size']}")
        say(f"  {canary.instance:<18} back on v{back['version']}: max_size {back['max_size']}")
        for service, mark in zip(self.services[1:], marks[1:], strict=True):
            if service.applies[mark:]:
                raise DemoError(f"{service.instance} applied something during the canary")
            say(f"  {service.instance:<18} never saw the candidate: still v{stable}")
        status = self.configbus(
            "rollout", "status", TENANT, ENV, "--bootstrap-servers", self.bootstrap
        )
        staged = status[status.index(f"{TENANT}/{ENV}: rollout ") :]
        say(f"$ configbus rollout status {TENANT} {ENV}   (the staged part)")
        for line in staged.rstrip().splitlines():
            say(f"  {line}")
        if "ABORTED" not in staged or f"health check failed on {canary.instance}" not in staged:
            raise DemoError("expected the rollout aborted by the canary's health check")
        self.edit(risky, stable_value)
        say(f"edit {EDITED_FILE}: {KEY}: {risky} -> {stable_value}  (undone: nothing to publish)")

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

    def audit_trail(self) -> None:
        """Every step above is in the audit trail, each record signed and linked to the
        one before it in its writer's chain: `configbus audit verify` walks them (as the
        broker's admin on a secured bus: the trail is every tenant's)."""
        say("\n$ configbus audit verify        # every record signed, linked, none missing")
        output = self.configbus("audit", "verify", role="admin").strip()
        if not output.startswith("ok: "):
            raise DemoError(f"the audit trail does not verify: {output}")
        say(f"  {output}")

    def refused_read(self) -> None:
        """Secured mode: the tenant's service principal, with its client certificate,
        subscribes to another tenant's stream. No ACL allows it: the broker refuses."""
        user, env = USERS["service"], self.kafka_env("service-tls")
        say(f"\nUser:{user} (a service of {TENANT}, client certificate) subscribes to")
        say(f"{OTHER_TENANT}/{ENV}, another tenant's stream:")
        try:
            result = subprocess.run(
                [sys.executable, "-c", REFUSED_SUBSCRIBER, OTHER_TENANT, ENV, str(DENIED_S)],
                env={**self.env, **env},
                capture_output=True,
                text=True,
                timeout=DENIED_S + 30,
            )
        except subprocess.TimeoutExpired:
            raise DemoError(f"the subscriber to {OTHER_TENANT}/{ENV} did not give up") from None
        line = result.stdout.strip()
        say(f"  {line}")
        if "not authorized" not in line or "TopicAuthorizationFailed" not in line:
            sys.stderr.write(result.stderr[-4000:])
            raise DemoError(f"expected the broker to refuse User:{user} {OTHER_TENANT}'s topic")
        say(f"  (the ACLs of User:{user} name {TENANT}'s topic only: the broker refuses the rest)")

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

    def configbus(self, *args: str, role: str = "operator") -> str:
        """`configbus ARGS` as `role`'s principal (secured mode); its output."""
        env = {**self.env, **self.kafka_env(role)}
        try:
            result = subprocess.run(
                [CONFIGBUS, *args], env=env, capture_output=True, text=True, timeout=60
            )
        except subprocess.TimeoutExpired as exc:
            printed = (exc.stdout or b"") + (exc.stderr or b"")  # bytes, even with text=True
            sys.stderr.write(printed[-4000:].decode(errors="replace"))
            raise DemoError(f"configbus {' '.join(args[:2])} took over 60s") from None
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
    secure = os.environ.get(SECURE_VARIABLE, "0")
    if secure not in ("0", "1", ""):
        print(f"demo: {SECURE_VARIABLE}={secure}: say 0 or 1", file=sys.stderr)
        return 2
    began = time.monotonic()
    demo = Demo(agent="--agent" in sys.argv[1:], secure=secure == "1")
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
