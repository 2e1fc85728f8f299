"""N subscribers of one system in worker processes, and what processes cost (/proc).

A `Fleet` spreads N subscribers over up to P worker processes (spawned, one event loop
each). A worker builds its share with its system's `clients(spec, indices, report)` and
reports every subscriber's callback time to the parent over a pipe, once all of its
subscribers have the edit, so reporting never delays a measured callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from harness import BenchError

CLK_TCK = os.sysconf("SC_CLK_TCK")

# What a worker reports per subscriber and edit: (subscriber index, callback time ns,
# system-specific extra data).
Entry = tuple[int, int, Any]
Report = Callable[[int, int, int, Any], None]
Closer = Callable[[], Awaitable[None]]


def run_loop(kind: str, coroutine: Coroutine[Any, Any, Any]) -> Any:
    if kind == "uvloop":
        import uvloop

        return uvloop.run(coroutine)
    return asyncio.run(coroutine)


class Reporter:
    def __init__(self, conn: Connection, local: int) -> None:
        self.conn, self.local = conn, local
        self.pending: dict[int, list[Entry]] = {}

    def __call__(self, index: int, edit: int, at_ns: int, extra: Any = None) -> None:
        entries = self.pending.setdefault(edit, [])
        entries.append((index, at_ns, extra))
        if len(entries) == self.local:
            del self.pending[edit]
            self.conn.send(("got", edit, entries))


def worker_main(module: str, spec: dict[str, Any], indices: list[int], conn: Connection) -> None:
    """A worker process: start this share of the subscribers of `systems.<module>`."""
    logging.basicConfig(
        level=logging.WARNING, format=f"{module} worker {os.getpid()}: %(levelname)s %(message)s"
    )
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    try:
        run_loop(spec["loop"], _worker(module, spec, indices, conn))
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
        raise SystemExit(1) from None


async def _worker(module: str, spec: dict[str, Any], indices: list[int], conn: Connection) -> None:
    if spec.get("tracing") == "sdk":
        from configbus.telemetry import configure_from_env

        os.environ["OTEL_TRACES_EXPORTER"] = "none"  # as `make demo`: real ids, no exporter
        configure_from_env()
    clients = importlib.import_module(f"systems.{module}").clients
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def command() -> None:
        try:
            while conn.poll():
                if conn.recv()[0] == "stop":
                    stop.set()
        except (EOFError, OSError):
            stop.set()

    loop.add_reader(conn.fileno(), command)
    started = time.perf_counter()
    close = await clients(spec, indices, Reporter(conn, len(indices)))
    conn.send(("ready", time.perf_counter() - started))
    await stop.wait()
    loop.remove_reader(conn.fileno())
    await close()
    conn.send(("bye", None))


class Fleet:
    """N subscribers of one system over up to `processes` worker processes."""

    def __init__(self, module: str, spec: dict[str, Any], n: int, processes: int) -> None:
        count = max(1, min(processes, n))
        context = multiprocessing.get_context("spawn")
        self.processes: list[Any] = []
        self.conns: list[Connection] = []
        for w in range(count):
            mine, theirs = context.Pipe()
            process = context.Process(
                target=worker_main,
                args=(module, spec, list(range(w, n, count)), theirs),
                name=f"bench-{module}-{w}",
                daemon=True,
            )
            process.start()
            theirs.close()
            self.processes.append(process)
            self.conns.append(mine)
        self.ready: dict[int, float] = {}
        self.got: dict[int, list[Entry]] = {}
        self.reports: Counter[int] = Counter()
        self.errors: list[str] = []
        self.gone: set[int] = set()
        self.bye: set[int] = set()
        self.changed = asyncio.Event()
        loop = asyncio.get_running_loop()
        for w, conn in enumerate(self.conns):
            loop.add_reader(conn.fileno(), self._readable, w, conn)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def _readable(self, w: int, conn: Connection) -> None:
        try:
            while conn.poll():
                kind, *rest = conn.recv()
                if kind == "got":
                    self.got.setdefault(rest[0], []).extend(rest[1])
                    self.reports[rest[0]] += 1
                elif kind == "ready":
                    self.ready[w] = rest[0]
                elif kind == "bye":
                    self.bye.add(w)
                elif kind == "error":
                    self.errors.append(rest[0])
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(conn.fileno())
            self.gone.add(w)
        self.changed.set()

    async def _until(self, done: Callable[[], bool], seconds: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not done():
            if self.errors:
                raise BenchError("a worker failed:\n" + self.errors[0])
            if self.gone - self.bye:
                raise BenchError(f"worker(s) {sorted(self.gone - self.bye)} exited")
            if (remaining := deadline - loop.time()) <= 0:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)
        return True

    async def start(self, seconds: float) -> float:
        """Wait until every worker started its subscribers; the slowest one's seconds."""
        if not await self._until(lambda: len(self.ready) == len(self.processes), seconds):
            raise BenchError(f"{len(self.ready)}/{len(self.processes)} workers ready in {seconds}s")
        return max(self.ready.values())

    async def wait(self, edit: int, seconds: float) -> tuple[list[Entry], bool]:
        """The entries of `edit`, and whether all N came within `seconds`."""
        complete = await self._until(lambda: self.reports[edit] == len(self.processes), seconds)
        return self.got.pop(edit, []), complete

    async def stop(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("stop",))
        with contextlib.suppress(BenchError):
            await self._until(lambda: len(self.bye | self.gone) == len(self.processes), 30)
        loop = asyncio.get_running_loop()
        for process, conn in zip(self.processes, self.conns, strict=True):
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(conn.fileno())
            await loop.run_in_executor(None, process.join, 10)
            if process.is_alive():
                process.kill()
                await loop.run_in_executor(None, process.join, 5)
            conn.close()


# -- /proc -----------------------------------------------------------------------------------
def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_cpu_s() -> float:
    """Busy CPU seconds of the whole machine, over all cores."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:9]]
    return (sum(values) - values[3] - values[4]) / CLK_TCK


def rss_mib(pid: int) -> float:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def pid_listening(port: int) -> int | None:
    """The process listening on TCP `port`, or None."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            for line in list(lines)[1:]:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{parts[9]}]")
    for pid in filter(str.isdigit, os.listdir("/proc")) if inodes else ():
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                        return int(pid)
    return None


@dataclass(frozen=True)
class CpuSample:
    """CPU seconds of named groups of processes and of the machine, at one moment."""

    at: float
    groups: dict[str, float]
    machine: float

    @classmethod
    def take(cls, groups: dict[str, list[int]]) -> CpuSample:
        used = {name: sum(cpu_s(p) for p in pids) for name, pids in groups.items()}
        return cls(time.monotonic(), used, machine_cpu_s())

    def seconds_until(self, later: CpuSample) -> dict[str, float]:
        """CPU seconds each group used between the two samples; "others" is what the
        machine used beyond all groups (other users' work: the noise)."""
        used = {k: later.groups[k] - v for k, v in self.groups.items()}
        used["others"] = max(0.0, later.machine - self.machine - sum(used.values()))
        return used


def spawn(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start `command` in its own session, stderr to `log`."""
    with log.open("wb") as err:
        return subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )


async def terminate(process: subprocess.Popen[bytes] | None, seconds: float = 20) -> None:
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.get_running_loop().run_in_executor(None, process.wait, seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def configbus_command() -> list[str]:
    exe = Path(sys.executable).parent / "configbus"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "configbus.cli"]


class Profiler:
    """py-spy sampling a process without pausing it (`e2e.py --profile`); stop() returns
    the top functions by own samples, from py-spy's collapsed stacks."""

    def __init__(self, pid: int, out: Path) -> None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.out = out
        command = [exe, "record", "--pid", str(pid), "--rate", "250", "--nonblocking"]
        self.process = subprocess.Popen(
            [*command, "--format", "raw", "--output", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def stop(self, top: int = 25) -> dict[str, Any]:
        self.process.send_signal(signal.SIGINT)
        try:
            _, err = self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        if not self.out.exists():
            return {"error": err.decode(errors="replace")[-500:]}
        own: Counter[str] = Counter()
        for line in self.out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if stack and count.isdigit() and "Thread._bootstrap" not in stack:
                own[stack.rsplit(";", 1)[-1]] += int(count)
        total = max(1, sum(own.values()))
        return {
            "file": str(self.out),
            "samples": total,
            "top_self": [[f, n, round(100 * n / total, 1)] for f, n in own.most_common(top)],
        }
