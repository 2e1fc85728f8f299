"""configbus through a host agent: one `configbus agent` process reads Kafka and pushes the
signed records over a Unix socket to every subscriber (agent mode).

The daemon, the edit and the subscribers are those of `configbus_direct`, except that
each subscriber is `ConfigSubscriber(..., agent=SOCKET)` and all N of them (spread over
the worker processes) connect to one agent, started here with

    configbus agent --socket PATH --bootstrap-servers HOST:PORT --trust FILE
                    --cache-dir DIR --topic-prefix P --acks-topic T

and ready once its socket accepts a connection. Its CPU counts apart ("agent"). The
breakdown splits the Kafka stage in two: "kafka" ends when a plain read_committed
consumer in the driver (fetching as the agent does) has the record, "agent" runs from
there until the subscriber received it (the agent's verify and push, the socket).
Skipped, with the reason, when `configbus agent --help` fails (a configbus without it).
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from typing import Any

from fleet import configbus_command, spawn, terminate
from harness import BenchError

from systems.configbus_direct import ConfigbusDirect, clean_env, clients

__all__ = ["ConfigbusAgent", "clients"]


class ConfigbusAgent(ConfigbusDirect):
    name = "configbus_agent"
    label = "configbus, host agent"
    module = "configbus_agent"

    def skip_reason(self) -> str | None:
        try:
            probe = subprocess.run(
                [*configbus_command(), "agent", "--help"],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return f"`configbus agent --help` could not run: {exc}"
        if probe.returncode != 0:
            last = (probe.stderr.strip().splitlines() or ["?"])[-1]
            return f"`configbus agent --help` failed (exit {probe.returncode}): {last}"
        return None

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "agent": str(self.socket)}

    async def setup(self) -> None:
        await super().setup()
        self.tasks.append(asyncio.create_task(self.read_events()))
        self.socket = self.scratch / "agent.sock"
        command = [*configbus_command(), "agent", "--socket", str(self.socket)]
        command += ["--bootstrap-servers", self.ctx.servers, "--trust", str(self.trust)]
        command += ["--cache-dir", str(self.scratch / "agent-cache")]
        command += ["--topic-prefix", self.prefix, "--acks-topic", self.acks]
        log = self.scratch / "agent.log"
        self.agent = spawn(command, clean_env(self.ctx.args.tracing), log)
        deadline = time.monotonic() + 60
        while not accepts(str(self.socket)):
            if self.agent.poll() is not None:
                raise BenchError(f"the agent exited: {log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise BenchError(f"the agent's socket did not accept in 60s; see {log}")
            await asyncio.sleep(0.1)

    def processes(self) -> dict[str, list[int]]:
        return {**super().processes(), "agent": [self.agent.pid]}

    async def teardown(self) -> None:
        await terminate(getattr(self, "agent", None))
        await super().teardown()


def accepts(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
        return True
