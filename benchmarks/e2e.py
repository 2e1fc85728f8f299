"""End to end: a value edited in a file until every instance has run its callback,
beside the physical floor and beside what a team would use instead, in one run.

    python benchmarks/e2e.py [--n 1,10,100] [--edits 50] [--warmup 5] [--processes 4]
                             [--rounds 1] [--systems ...] [--tracing sdk|off]
                             [--warm-kafka 20] [--profile DIR] [--out DIR] [--quick]

What is timed, per edit, from t0 (the writer's clock just before it writes) to the
moment the last of N subscribers has the new value (`time.time_ns()` in the
subscriber; every process runs on this machine, so clocks agree). N subscribers are
spread over `--processes` worker processes (N/4 each by default), each process one
event loop (uvloop) holding its share; a worker reports its subscribers' times to
this process over a pipe once all of them have the edit, so reporting never delays
a measured callback. Each edit waits until all N arrived (or `--deadline` passed:
counted as a timeout) and a pause of 100-150 ms, then the next edit. The first
`--warmup` edits of every fleet are left out. Before anything is measured, the broker
runs `--warm-kafka` seconds of transactions (a fresh JVM is slow until its JIT has
compiled the hot paths). `--rounds R` repeats every (N, system) fleet R times,
interleaved, each round starting with another system; samples are pooled.

systems
  configbus      `configbus daemon` runs as its own process with its default settings
                 (debounce/step, batch size, reconcile interval; Redis store on, as in
                 `make demo`) over a copy of environments/. t0: just before writing
                 tenants/aurora-records/prod.yml to a temp file and renaming it over the
                 original (as editors save). Subscribers: `configbus.ConfigSubscriber`
                 for aurora-records/prod with default settings (acks on, no disk
                 cache), one `on_change("database.postgresql.connection_pool", ...)`
                 callback each; the time is taken in the callback.
  kafka_floor    no configbus code: aiokafka with configbus's settings. A transactional
                 producer (acks=all, idempotence, linger 0), one send per transaction,
                 of a record as large as a configbus event (random bytes); N
                 read_committed consumers assigned to the partition, with the
                 fetch_max_wait_ms of `configbus.bus.kafka.PartitionReader`.
                 t0: before the send.
  watch_floor    watchfiles.awatch on a copy of the tree with the daemon's debounce and
                 step (PublisherSettings defaults), the same temp-file-and-rename save;
                 time from t0 to awatch yielding. One watcher: it does not depend on N.
  redis_pubsub   the writer SETs the config (the aurora-records/prod resolved config,
                 ~11 KB JSON, with the edited value) and PUBLISHes a notification; each
                 subscriber has its own connections, receives it, GETs the value and
                 decodes the JSON. t0: before the SET.
  etcd_watch     etcd (Debian's etcd-server, benchmarks/etcd.sh) through its JSON gateway:
                 the writer POSTs /v3/kv/put with the same JSON; each subscriber holds
                 its own /v3/watch stream and decodes the value from the event (base64,
                 then JSON). t0: before the put. Skipped, with a note, only when
                 etcd-server cannot be installed.

Also measured per fleet: time to start the N subscribers, CPU (% of one core) of the
subscriber processes, the server(s), the publisher daemon, this process and everything
else on the machine while idle (`--idle` seconds before the edits) and during the
edits, and resident memory of the subscriber processes. `--profile DIR` samples the
daemon and one subscriber process with py-spy (the `bench` extra) during the configbus
edits at the largest N and summarises where the time goes.

Writes results/e2e.json (the samples are what plots need for CDFs):

    {"benchmark": "e2e", "machine": {...cores, memory...}, "versions": {...},
     "parameters": {...}, "notes": [...],
     "systems": {
       "configbus": {"1": ENTRY, "10": ENTRY, "100": ENTRY},
       "kafka_floor": {"1": ENTRY, ...}, "redis_pubsub": {...}, "etcd_watch": {...},
       "watch_floor": {count, p50_ms, ..., samples_ms, debounce_ms, step_ms}},
     "overhead_ratio_p50": {"1": x, "10": y, "100": z},
     "aims": {...}, "profile": {...}}

    ENTRY = {"n", "processes", "edits", "timeouts",
             "count", "p50_ms", "p95_ms", "p99_ms", "max_ms", "min_ms", "mean_ms",
                 (last of the N callbacks minus t0: "every instance has it")
             "samples_ms": [per edit, in order, rounds concatenated],
             "first": {summary of the first callback of each edit},
             "per_subscriber": {summary over every (edit, subscriber), "samples_ms"},
             "rounds": [summary per round], "median_of_rounds": {p50_ms, p95_ms, ...},
             "start_s": [seconds to start the N subscribers, per round],
             "resources": {"idle": {...cpu %...}, "edits": {...}, "edits_wall_s",
                           "subscriber_cpu_ms_per_delivery", "rss_mib": [...],
                           "sockets": n}  (a list of them under "rounds" when rounds > 1),
             "breakdown_p50_ms": {...}  (configbus only: write -> detected by the
                 daemon -> signed -> first / last callback, from the event's times)}

    An "etcd_watch" that could not run is {"skipped": "why"}. The overhead ratio is
    configbus p50 / (kafka_floor p50 + watch_floor p50) at the same N, over the
    pooled samples. Percentiles are nearest-rank (`resolve.percentile`): with 50
    samples p99 is the largest and p95 the third largest; with 150, p99 is the
    second largest.

Starts Kafka and Redis through deploy/local (benchmarks/services.py) unless
CONFIGBUS_BOOTSTRAP_SERVERS and CONFIGBUS_REDIS_URL name running ones, and etcd through
benchmarks/etcd.sh; stops what it started. Nothing asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import importlib.metadata
import inspect
import json
import logging
import multiprocessing
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from resolve import machine, percentile
from services import kafka_and_redis

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
SAMPLE = ROOT / "environments"
TENANT, ENV = "aurora-records", "prod"
POOL = "database.postgresql.connection_pool"
KEY = f"{POOL}.max_size"
EDITED = Path("tenants") / TENANT / f"{ENV}.yml"
ORIGINAL_LINE = "max_size: 250"
BASE = 1000  # the edited value is BASE + the edit's id
SYSTEMS = ("configbus", "kafka_floor", "watch_floor", "redis_pubsub", "etcd_watch")
FLEET_SYSTEMS = ("configbus", "kafka_floor", "redis_pubsub", "etcd_watch")
CLK_TCK = os.sysconf("SC_CLK_TCK")

log = logging.getLogger("e2e")


class BenchError(Exception):
    pass


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- statistics -------------------------------------------------------------------------
def summary(samples: list[float]) -> dict[str, Any]:
    if not samples:
        return {"count": 0}
    return {
        "count": len(samples),
        "p50_ms": round(percentile(samples, 0.50), 3),
        "p95_ms": round(percentile(samples, 0.95), 3),
        "p99_ms": round(percentile(samples, 0.99), 3),
        "max_ms": round(max(samples), 3),
        "min_ms": round(min(samples), 3),
        "mean_ms": round(statistics.fmean(samples), 3),
    }


def median_of(rounds: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("p50_ms", "p95_ms", "p99_ms", "max_ms")
    present = [r for r in rounds if r.get("count")]
    if not present:
        return {}
    return {k: round(statistics.median(r[k] for r in present), 3) for k in keys}


# -- payloads -----------------------------------------------------------------------------
def config_document() -> dict[str, Any]:
    """The resolved aurora-records/prod config as plain JSON data (about 11 KB)."""
    from configbus.tree import EnvironmentTree

    data: dict[str, Any] = json.loads(EnvironmentTree(SAMPLE).resolve(ENV, TENANT).canonical_json)
    return data


def config_value(document: dict[str, Any], edit: int) -> bytes:
    document["database"]["postgresql"]["connection_pool"]["max_size"] = BASE + edit
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def edit_of(value: bytes) -> int:
    data = json.loads(value)
    return int(data["database"]["postgresql"]["connection_pool"]["max_size"]) - BASE


# -- a minimal HTTP/1.1 client for etcd's JSON gateway (no dependency) ------------------
class Http:
    """One keep-alive connection to 127.0.0.1:port; POST with JSON bodies; chunked or
    sized responses; `stream` yields the newline-delimited JSON messages of a
    streaming response (what the gateway sends for /v3/watch)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.reader is None or self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self.reader, self.writer

    @staticmethod
    def request(path: str, body: bytes) -> bytes:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def _head(self, reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
        status_line = await reader.readline()
        if not status_line:
            raise BenchError("etcd closed the connection")
        status = int(status_line.split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers

    @staticmethod
    async def _chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                return
            yield (await reader.readexactly(size + 2))[:-2]

    async def post(self, request: bytes) -> dict[str, Any]:
        """Send a prepared `request` (see `request`) and return the decoded answer."""
        reader, writer = await self._connect()
        writer.write(request)
        status, headers = await self._head(reader)
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif "chunked" in headers.get("transfer-encoding", ""):
            body = b"".join([chunk async for chunk in self._chunks(reader)])
        else:
            body = await reader.read()
            headers["connection"] = "close"
        if headers.get("connection", "").lower() == "close":
            await self.close()
        if status != 200:
            raise BenchError(f"etcd answered {status}: {body[:200]!r}")
        answer: dict[str, Any] = json.loads(body)
        return answer

    async def stream(self, request: bytes) -> AsyncIterator[dict[str, Any]]:
        reader, writer = await self._connect()
        writer.write(request)
        status, headers = await self._head(reader)
        if status != 200 or "chunked" not in headers.get("transfer-encoding", ""):
            raise BenchError(f"etcd watch answered {status} {headers}")
        buffer = b""
        async for chunk in self._chunks(reader):
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip():
                    yield json.loads(line)

    async def close(self) -> None:
        writer, self.reader, self.writer = self.writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- worker processes: the subscribers --------------------------------------------------
Report = Callable[[int, int, int, Any], None]
Closer = Callable[[], Awaitable[None]]


class Reporter:
    """Collects (subscriber, time, extra) per edit; sends them to the parent once every
    subscriber of this process has the edit, so the pipe is never written before a
    measured callback of this process has run."""

    def __init__(self, conn: Connection, local: int) -> None:
        self.conn = conn
        self.local = local
        self.pending: dict[int, list[tuple[int, int, Any]]] = {}

    def __call__(self, index: int, edit: int, at_ns: int, extra: Any = None) -> None:
        entries = self.pending.setdefault(edit, [])
        entries.append((index, at_ns, extra))
        if len(entries) == self.local:
            del self.pending[edit]
            self.conn.send(("got", edit, entries))


async def configbus_clients(spec: dict[str, Any], indices: list[int], report: Report) -> Closer:
    from configbus import ConfigSubscriber, ResolvedConfig
    from configbus.crypto import TrustStore

    trust = TrustStore.load(spec["trust"])
    subscribers = []
    for index in indices:
        subscriber = ConfigSubscriber(
            TENANT,
            ENV,
            bootstrap_servers=spec["servers"],
            trust=trust,
            instance_id=f"e2e-{index}",
            service="e2e-bench",
            topic_prefix=spec["prefix"],
        )

        def changed(
            old: ResolvedConfig,
            new: ResolvedConfig,
            paths: list[str],
            index: int = index,
            subscriber: ConfigSubscriber = subscriber,
        ) -> None:
            now = time.time_ns()
            event = subscriber.event
            extra = (event.body.detected_at, event.body.issued_at) if event else None
            report(index, int(new.get(KEY)) - BASE, now, extra)

        subscriber.on_change(POOL, changed)
        subscribers.append(subscriber)
    await asyncio.gather(*(s.start() for s in subscribers))

    async def close() -> None:
        await asyncio.gather(*(s.stop() for s in subscribers), return_exceptions=True)

    return close


async def kafka_clients(spec: dict[str, Any], indices: list[int], report: Report) -> Closer:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    tp = TopicPartition(spec["topic"], 0)

    async def open_one() -> Any:
        # The options of configbus.bus.kafka._consumer + PartitionReader.
        consumer = AIOKafkaConsumer(
            bootstrap_servers=spec["servers"],
            client_id="e2e-floor-reader",
            request_timeout_ms=15_000,
            enable_auto_commit=False,
            isolation_level="read_committed",
            group_id=None,
            fetch_max_wait_ms=spec["fetch_max_wait_ms"],
            auto_offset_reset="latest",
        )
        await consumer.start()
        consumer.assign([tp])
        await consumer.seek_to_end(tp)
        await consumer.position(tp)
        return consumer

    consumers = await asyncio.gather(*(open_one() for _ in indices))

    async def read(index: int, consumer: Any) -> None:
        while True:
            batch = await consumer.getmany(tp, timeout_ms=1000)
            now = time.time_ns()
            for message in batch.get(tp, ()):
                report(index, int.from_bytes(message.value[:8], "big"), now, None)

    tasks = [asyncio.create_task(read(i, c)) for i, c in zip(indices, consumers, strict=True)]

    async def close() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(c.stop() for c in consumers), return_exceptions=True)

    return close


async def redis_clients(spec: dict[str, Any], indices: list[int], report: Report) -> Closer:
    import redis.asyncio as aioredis

    async def open_one() -> tuple[Any, Any]:
        client = aioredis.Redis.from_url(spec["redis_url"])
        pubsub = client.pubsub()
        await pubsub.subscribe(spec["channel"])
        async with asyncio.timeout(10):
            while (message := await pubsub.get_message(timeout=1.0)) is None or message[
                "type"
            ] != "subscribe":
                pass
        await client.ping()  # opens the connection the GETs use
        return client, pubsub

    pairs = await asyncio.gather(*(open_one() for _ in indices))

    async def read(index: int, client: Any, pubsub: Any) -> None:
        async for message in pubsub.listen():
            if message["type"] != "message":
                continue
            value = await client.get(spec["key"])
            edit = edit_of(value)
            report(index, edit, time.time_ns(), None)

    tasks = [
        asyncio.create_task(read(i, client, pubsub))
        for i, (client, pubsub) in zip(indices, pairs, strict=True)
    ]

    async def close() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client, pubsub in pairs:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
                await client.aclose()

    return close


async def etcd_clients(spec: dict[str, Any], indices: list[int], report: Report) -> Closer:
    key = b64(spec["etcd_key"].encode())
    request = Http.request("/v3/watch", json.dumps({"create_request": {"key": key}}).encode())

    async def open_one() -> tuple[Http, AsyncIterator[dict[str, Any]]]:
        http = Http(spec["etcd_port"])
        messages = http.stream(request).__aiter__()
        first = await asyncio.wait_for(messages.__anext__(), 10)
        if not first.get("result", {}).get("created"):
            raise BenchError(f"etcd watch not created: {first}")
        return http, messages

    watches = await asyncio.gather(*(open_one() for _ in indices))

    async def read(index: int, messages: AsyncIterator[dict[str, Any]]) -> None:
        async for message in messages:
            for event in message.get("result", {}).get("events", ()):
                value = base64.b64decode(event["kv"]["value"])
                report(index, edit_of(value), time.time_ns(), None)

    tasks = [
        asyncio.create_task(read(i, messages))
        for i, (_, messages) in zip(indices, watches, strict=True)
    ]

    async def close() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for http, _ in watches:
            await http.close()

    return close


CLIENTS: dict[str, Callable[[dict[str, Any], list[int], Report], Awaitable[Closer]]] = {
    "configbus": configbus_clients,
    "kafka_floor": kafka_clients,
    "redis_pubsub": redis_clients,
    "etcd_watch": etcd_clients,
}


def run_loop(kind: str, coroutine: Coroutine[Any, Any, None]) -> None:
    if kind == "uvloop":
        import uvloop

        uvloop.run(coroutine)
    else:
        asyncio.run(coroutine)


def worker_main(system: str, spec: dict[str, Any], indices: list[int], conn: Connection) -> None:
    """Entry point of a worker process: start this share of the subscribers, report."""
    logging.basicConfig(
        level=logging.WARNING,
        format=f"e2e {system} worker {os.getpid()}: %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    try:
        run_loop(spec["loop"], worker(system, spec, indices, conn))
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
        raise SystemExit(1) from None


async def worker(system: str, spec: dict[str, Any], indices: list[int], conn: Connection) -> None:
    if system == "configbus" and spec["tracing"] == "sdk":
        from configbus.telemetry import configure_from_env

        os.environ["OTEL_TRACES_EXPORTER"] = "none"  # as `make demo`: real ids, no exporter
        configure_from_env()
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
    close = await CLIENTS[system](spec, indices, Reporter(conn, len(indices)))
    conn.send(("ready", {"start_s": time.perf_counter() - started}))
    await stop.wait()
    loop.remove_reader(conn.fileno())
    await close()
    conn.send(("bye", {}))


class Fleet:
    """N subscribers of one system over up to `processes` worker processes."""

    def __init__(self, system: str, spec: dict[str, Any], n: int, processes: int) -> None:
        self.n = n
        count = max(1, min(processes, n))
        context = multiprocessing.get_context("spawn")
        self.processes: list[Any] = []
        self.conns: list[Connection] = []
        for w in range(count):
            mine, theirs = context.Pipe()
            process = context.Process(
                target=worker_main,
                args=(system, spec, list(range(w, n, count)), theirs),
                name=f"e2e-{system}-{w}",
                daemon=True,
            )
            process.start()
            theirs.close()
            self.processes.append(process)
            self.conns.append(mine)
        self.ready: dict[int, dict[str, Any]] = {}
        self.got: dict[int, list[tuple[int, int, Any]]] = {}
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
                message = conn.recv()
                kind = message[0]
                if kind == "got":
                    self.got.setdefault(message[1], []).extend(message[2])
                    self.reports[message[1]] += 1
                elif kind == "ready":
                    self.ready[w] = message[1]
                elif kind == "bye":
                    self.bye.add(w)
                elif kind == "error":
                    self.errors.append(message[1])
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
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)
        return True

    async def start(self, seconds: float) -> float:
        """Wait until every worker started its subscribers; the slowest one's time."""
        if not await self._until(lambda: len(self.ready) == len(self.processes), seconds):
            raise BenchError(f"{len(self.ready)}/{len(self.processes)} workers ready in {seconds}s")
        return max(r["start_s"] for r in self.ready.values())

    async def wait(self, edit: int, seconds: float) -> tuple[list[tuple[int, int, Any]], bool]:
        """The (subscriber, time, extra) entries of `edit`, and whether all N came."""
        complete = await self._until(lambda: self.reports[edit] == len(self.processes), seconds)
        return self.got.pop(edit, []), complete

    def memory_mib(self) -> list[float]:
        return [round(rss_kib(pid) / 1024, 1) for pid in self.pids]

    def sockets(self) -> int:
        return sum(count_sockets(pid) for pid in self.pids)

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


# -- /proc: CPU, memory, sockets, who listens where ---------------------------------------
def proc_cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def system_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, over all cores."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:9]]
    total = sum(values)
    return (total - values[3] - values[4]) / CLK_TCK, total / CLK_TCK


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def count_sockets(pid: int) -> int:
    count = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


def pid_listening(port: int) -> int | None:
    """The process listening on TCP `port` (loopback or any), or None."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            for line in list(lines)[1:]:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{parts[9]}]")
    if not inodes:
        return None
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                        return int(pid)
    return None


class CpuSnapshot:
    """CPU seconds of named groups of processes and of the machine, at one moment."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.at = time.monotonic()
        self.groups = {name: sum(proc_cpu_s(p) for p in pids) for name, pids in groups.items()}
        self.busy, self.total = system_cpu_s()

    def until(self, later: CpuSnapshot) -> dict[str, float]:
        """% of one core used by each group between the two snapshots; "machine" is
        everything, "others" what none of the groups used (other users' work)."""
        wall = later.at - self.at
        cores = os.cpu_count() or 1
        used = {k: (later.groups[k] - v) / wall * 100 for k, v in self.groups.items()}
        machine_pct = (later.busy - self.busy) / max(1e-9, later.total - self.total) * 100 * cores
        used["machine"] = machine_pct
        used["others"] = max(0.0, machine_pct - sum(v for k, v in used.items() if k != "machine"))
        return {k: round(v, 1) for k, v in used.items()}


# -- profiling ------------------------------------------------------------------------------
class Profiler:
    """py-spy sampling a process (non-blocking: it never pauses the target)."""

    def __init__(self, pid: int, out: Path) -> None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.out = out
        command = [exe, "record", "--pid", str(pid), "--rate", "250", "--nonblocking"]
        command += ["--format", "raw", "--output", str(out)]
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def stop(self) -> dict[str, Any]:
        self.process.send_signal(signal.SIGINT)
        try:
            _, err = self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        if not self.out.exists():
            return {"error": err.decode(errors="replace")[-500:]}
        return summarize_profile(self.out)


def summarize_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive time per function from py-spy's collapsed stacks, for the
    main thread (the event loop); other threads (watchfiles' watcher, the SDK's span
    processor) are counted apart, since py-spy sees their native waits as busy."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = other = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        if "Thread._bootstrap" in stack:
            other += samples
            continue
        total += samples
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        frames = [re.sub(r"\(/.*?/(site-packages|lib/python3\.\d+)/", "(", f) for f in frames]
        frames = [f.replace(str(ROOT) + "/", "") for f in frames]
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    return {
        "samples": total,
        "other_thread_samples": other,
        "rate_hz": 250,
        "file": str(path),
        "top_self": [[f, n, round(100 * n / max(1, total), 1)] for f, n in own.most_common(top)],
        "top_inclusive": [
            [f, n, round(100 * n / max(1, total), 1)] for f, n in inclusive.most_common(top)
        ],
    }


# -- the systems' writers (this process) ----------------------------------------------------
class System:
    name = ""
    servers: tuple[str, ...] = ()  # keys of Bench.server_pids used by this system

    def spec(self) -> dict[str, Any]:
        return {}

    async def setup(self) -> None:
        pass

    async def write(self, edit: int) -> int:
        raise NotImplementedError

    async def teardown(self) -> None:
        pass

    def publisher_pids(self) -> list[int]:
        return []

    def extra(self, t0: int, entries: list[tuple[int, int, Any]]) -> dict[str, float] | None:
        return None


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


def atomic_save(path: Path, text: str) -> int:
    """Write `text` to a temp file next to `path` and rename it over `path`, as editors
    do; the time just before the write."""
    temporary = path.with_name(f".{path.name}.edit")
    t0 = time.time_ns()
    temporary.write_text(text)
    os.replace(temporary, path)
    return t0


class Configbus(System):
    name = "configbus"
    servers = ("kafka", "redis")

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.scratch = bench.scratch / "configbus"
        self.prefix = f"e2e{uuid.uuid4().hex[:8]}."
        self.daemon: subprocess.Popen[bytes] | None = None
        self.log = self.scratch / "daemon.log"

    def spec(self) -> dict[str, Any]:
        return {"servers": self.bench.servers, "trust": str(self.trust), "prefix": self.prefix}

    async def setup(self) -> None:
        from configbus.crypto import SigningKey, TrustStore, generate_keypair

        root = self.scratch / "environments"
        shutil.copytree(SAMPLE, root)
        kid = "e2e-" + uuid.uuid4().hex[:6]
        private, _ = generate_keypair(kid, self.scratch / "keys")
        self.trust = self.scratch / "trust.yml"
        self.trust.write_text(TrustStore.of(SigningKey.load(private, kid).public).dump())
        self.target = root / EDITED
        self.original = self.target.read_text()
        if self.original.count(ORIGINAL_LINE) != 1:
            raise BenchError(f"{EDITED}: expected one '{ORIGINAL_LINE}' line")
        exe = Path(sys.executable).parent / "configbus"
        command = [str(exe)] if exe.exists() else [sys.executable, "-m", "configbus.cli"]
        command += ["daemon", "--root", str(root), "--bootstrap-servers", self.bench.servers]
        command += ["--redis", self.bench.redis_url, "--signing-key", str(private), "--kid", kid]
        command += ["--topic-prefix", self.prefix]  # the transactional id derives from it
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CONFIGBUS_", "OTEL_"))}
        if self.bench.args.tracing == "sdk":
            env["OTEL_TRACES_EXPORTER"] = "none"  # as `make demo`: real ids, no exporter
        self.daemon = spawn(command, env, self.log)
        deadline = time.monotonic() + 120
        while not self.published():
            if self.daemon.poll() is not None:
                raise BenchError(f"the daemon exited: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise BenchError(f"the daemon published nothing in 120s; see {self.log}")
            await asyncio.sleep(0.1)

    def published(self) -> bool:
        for raw in self.log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(raw)
                if entry.get("message", "").startswith("published ") and (
                    entry.get("tenant"),
                    entry.get("env"),
                ) == (TENANT, ENV):
                    return True
        return False

    async def write(self, edit: int) -> int:
        return atomic_save(
            self.target, self.original.replace(ORIGINAL_LINE, f"max_size: {BASE + edit}")
        )

    def publisher_pids(self) -> list[int]:
        return [self.daemon.pid] if self.daemon is not None else []

    def extra(self, t0: int, entries: list[tuple[int, int, Any]]) -> dict[str, float] | None:
        times = [e for e in entries if e[2] is not None]
        if not times:
            return None
        detected, issued = times[0][2]
        first, last = min(e[1] for e in times), max(e[1] for e in times)
        return {
            "write_to_detected": (detected - t0) / 1e6,
            "detected_to_signed": (issued - detected) / 1e6,
            "signed_to_first_callback": (first - issued) / 1e6,
            "signed_to_last_callback": (last - issued) / 1e6,
        }

    async def teardown(self) -> None:
        daemon, self.daemon = self.daemon, None
        if daemon is None:
            return
        with contextlib.suppress(ProcessLookupError):
            daemon.send_signal(signal.SIGTERM)
        try:
            await asyncio.get_running_loop().run_in_executor(None, daemon.wait, 20)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


class KafkaFloor(System):
    name = "kafka_floor"
    servers = ("kafka",)

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.topic = f"e2e-floor-{uuid.uuid4().hex[:8]}"
        self.producer: Any = None

    def spec(self) -> dict[str, Any]:
        return {
            "servers": self.bench.servers,
            "topic": self.topic,
            "fetch_max_wait_ms": reader_fetch_max_wait_ms(),
        }

    async def setup(self) -> None:
        from aiokafka import AIOKafkaProducer
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        admin = AIOKafkaAdminClient(bootstrap_servers=self.bench.servers, client_id="e2e-admin")
        await admin.start()
        try:
            configs = {"cleanup.policy": "compact", "min.insync.replicas": "1"}
            await admin.create_topics([NewTopic(self.topic, 1, 1, topic_configs=configs)])
        finally:
            await admin.close()
        # The options of configbus.bus.kafka.Producer with a transactional id.
        self.producer = AIOKafkaProducer(
            bootstrap_servers=self.bench.servers,
            client_id="e2e-floor-producer",
            request_timeout_ms=15_000,
            acks="all",
            enable_idempotence=True,
            transactional_id=f"e2e-floor-{uuid.uuid4().hex[:8]}",
            max_request_size=8 * 1024 * 1024,
            linger_ms=0,
            max_batch_size=256 * 1024,
        )
        await self.producer.start()
        self.filler = random.randbytes(self.bench.record_bytes - 8)
        for attempt in range(100):  # the new partition needs a leader first
            try:
                await self.write(-1)
                break
            except Exception:
                if attempt == 99:
                    raise
                await asyncio.sleep(0.2)

    async def write(self, edit: int) -> int:
        value = (edit % 2**63).to_bytes(8, "big") + self.filler
        t0 = time.time_ns()
        async with self.producer.transaction():
            await self.producer.send(self.topic, value=value, key=b"prod")
        return t0

    async def teardown(self) -> None:
        if self.producer is not None:
            await self.producer.stop()


class WatchFloor:
    """watchfiles alone, with the daemon's settings, on a copy of the tree."""

    def __init__(self, bench: Bench) -> None:
        from configbus.publisher import PublisherSettings

        fields = PublisherSettings.__dataclass_fields__
        self.debounce_ms: int = fields["debounce_ms"].default  # type: ignore[assignment]
        self.step_ms: int = fields["step_ms"].default  # type: ignore[assignment]
        self.root = bench.scratch / "watch" / "environments"
        shutil.copytree(SAMPLE, self.root)
        self.target = self.root / EDITED
        self.original = self.target.read_text()

    async def measure(self, edits: int, warmup: int) -> list[float]:
        import watchfiles

        def tree_files(change: Any, path: str) -> bool:  # the daemon's filter
            name = os.path.basename(path)
            return name.endswith((".yml", ".json")) and not name.startswith(".")

        stop = asyncio.Event()
        seen: asyncio.Queue[int] = asyncio.Queue()

        async def watch() -> None:
            async for _ in watchfiles.awatch(
                self.root,
                debounce=self.debounce_ms,
                step=self.step_ms,
                stop_event=stop,
                watch_filter=tree_files,
            ):
                seen.put_nowait(time.time_ns())

        task = asyncio.create_task(watch())
        await asyncio.sleep(1.0)  # let the watcher set up its inotify watches
        samples = []
        try:
            for edit in range(warmup + edits):
                t0 = atomic_save(
                    self.target, self.original.replace(ORIGINAL_LINE, f"max_size: {BASE + edit}")
                )
                detected = await asyncio.wait_for(seen.get(), 10)
                if edit >= warmup:
                    samples.append((detected - t0) / 1e6)
                await asyncio.sleep(0.1 + random.random() * 0.05)
                while not seen.empty():
                    seen.get_nowait()
        finally:
            stop.set()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(task, 5)
        return samples


class RedisPubSub(System):
    name = "redis_pubsub"
    servers = ("redis",)

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        tag = uuid.uuid4().hex[:8]
        self.key, self.channel = f"e2e:{tag}:config", f"e2e:{tag}:changed"
        self.client: Any = None

    def spec(self) -> dict[str, Any]:
        return {"redis_url": self.bench.redis_url, "key": self.key, "channel": self.channel}

    async def setup(self) -> None:
        import redis.asyncio as aioredis

        self.client = aioredis.Redis.from_url(self.bench.redis_url)
        await self.client.set(self.key, config_value(self.bench.document, -BASE))

    async def write(self, edit: int) -> int:
        value = config_value(self.bench.document, edit)
        t0 = time.time_ns()
        await self.client.set(self.key, value)
        await self.client.publish(self.channel, str(edit))
        return t0

    async def teardown(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.delete(self.key)
            await self.client.aclose()


class EtcdWatch(System):
    name = "etcd_watch"
    servers = ("etcd",)

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.key = f"/e2e/{uuid.uuid4().hex[:8]}/config"
        self.http: Http | None = None

    def spec(self) -> dict[str, Any]:
        return {"etcd_port": self.bench.etcd_port, "etcd_key": self.key}

    def put(self, edit: int) -> bytes:
        value = config_value(self.bench.document, edit)
        body = json.dumps({"key": b64(self.key.encode()), "value": b64(value)}).encode()
        return Http.request("/v3/kv/put", body)

    async def setup(self) -> None:
        assert self.bench.etcd_port is not None
        self.http = Http(self.bench.etcd_port)
        await self.http.post(self.put(-BASE))

    async def write(self, edit: int) -> int:
        assert self.http is not None
        request = self.put(edit)
        t0 = time.time_ns()
        await self.http.post(request)
        return t0

    async def teardown(self) -> None:
        if self.http is not None:
            await self.http.close()


# -- etcd through benchmarks/etcd.sh -----------------------------------------------------
@contextlib.contextmanager
def etcd_server(run_dir: Path) -> Any:
    """Yields (port, None) or (None, why it is skipped)."""
    env = {**os.environ, "CONFIGBUS_RUN_DIR": str(run_dir)}
    script = ["bash", str(HERE / "etcd.sh")]
    result = subprocess.run(
        [*script, "start"], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    if result.returncode == 4:
        yield (
            None,
            "etcd-server is not installed and apt-get could not install it: "
            + (result.stderr.strip().splitlines() or ["?"])[-1],
        )
        return
    if result.returncode != 0:
        raise SystemExit(f"benchmarks/etcd.sh start failed:\n{result.stderr}")
    port = int(result.stdout.strip().splitlines()[-1].rsplit(":", 1)[1])
    try:
        yield port, None
    finally:
        subprocess.run([*script, "stop"], env=env, capture_output=True, timeout=60, check=False)


# -- the run ------------------------------------------------------------------------------
class Bench:
    def __init__(
        self,
        args: argparse.Namespace,
        servers: str,
        redis_url: str,
        etcd_port: int | None,
        scratch: Path,
    ) -> None:
        self.args, self.servers, self.redis_url = args, servers, redis_url
        self.etcd_port, self.scratch = etcd_port, scratch
        self.document = config_document()
        self.record_bytes = configbus_record_bytes(self.document, scratch)
        self.server_pids: dict[str, int | None] = {
            "kafka": pid_listening(int(servers.rsplit(":", 1)[1])),
            "redis": pid_listening(int(redis_url.rsplit(":", 1)[1].split("/")[0])),
            "etcd": pid_listening(etcd_port) if etcd_port else None,
        }
        self.next_edit = 0
        self.warm_transactions = 0
        self.profiles: dict[str, Any] = {}

    async def fleet(self, system: System, n: int, round_: int) -> dict[str, Any]:
        args = self.args
        spec = {**system.spec(), "loop": args.loop, "tracing": args.tracing}
        say(f"  {system.name} N={n} (round {round_ + 1}): starting subscribers")
        began = time.perf_counter()
        fleet = Fleet(system.name, spec, n, args.processes)
        result: dict[str, Any] = {"last": [], "first": [], "each": [], "extra": []}
        profilers: dict[str, Profiler] = {}
        try:
            start_s = await fleet.start(args.start_timeout)
            result["start_s"] = round(start_s, 2)
            result["ready_s"] = round(time.perf_counter() - began, 2)
            groups = {
                "subscribers": fleet.pids,
                "servers": [p for k in system.servers if (p := self.server_pids.get(k))],
                "publisher": system.publisher_pids(),
                "bench": [os.getpid()],
            }
            idle_from = CpuSnapshot(groups)
            await asyncio.sleep(args.idle)
            idle_to = CpuSnapshot(groups)
            profilers.update(self.profilers(system, n, round_, fleet))
            timeouts = 0
            for k in range(args.warmup + args.edits):
                edit = self.next_edit
                self.next_edit += 1
                t0 = await system.write(edit)
                entries, complete = await fleet.wait(edit, args.deadline)
                if k >= args.warmup:
                    if not complete:
                        timeouts += 1
                        say(f"    edit {edit}: {len(entries)}/{n} within {args.deadline}s")
                    else:
                        times = [(at - t0) / 1e6 for _, at, _ in entries]
                        result["last"].append(max(times))
                        result["first"].append(min(times))
                        result["each"].extend(times)
                        extra = system.extra(t0, entries)
                        if extra:
                            result["extra"].append(extra)
                await asyncio.sleep(0.1 + random.random() * 0.05)
            edits_to = CpuSnapshot(groups)
            for name, profiler in profilers.items():
                self.profiles[name] = profiler.stop()
            profilers.clear()
            result["timeouts"] = timeouts
            idle, busy = idle_from.until(idle_to), idle_to.until(edits_to)
            wall = edits_to.at - idle_to.at
            deliveries = (args.warmup + args.edits) * n
            result["resources"] = {
                "idle": idle,
                "edits": busy,
                "edits_wall_s": round(wall, 2),
                # CPU the subscribers spent per subscriber and edit, above their idle use
                "subscriber_cpu_ms_per_delivery": round(
                    (busy["subscribers"] - idle["subscribers"]) / 100 * wall / deliveries * 1e3,
                    3,
                ),
                "rss_mib": fleet.memory_mib(),
                "sockets": fleet.sockets(),
            }
        finally:
            for profiler in profilers.values():
                profiler.stop()
            await fleet.stop()
        last = result["last"]
        if last:
            say(
                f"    p50 {percentile(last, 0.5):.2f} ms, p99 {percentile(last, 0.99):.2f} ms,"
                f" max {max(last):.2f} ms; start {result.get('start_s')} s;"
                f" cpu idle {result['resources']['idle']}"
            )
        return result

    def profilers(self, system: System, n: int, round_: int, fleet: Fleet) -> dict[str, Profiler]:
        folder = self.args.profile
        if folder is None or system.name != "configbus" or round_ != 0:
            return {}
        if n != max(self.args.n):
            return {}
        folder.mkdir(parents=True, exist_ok=True)
        targets = {"daemon": system.publisher_pids()[0], "subscriber_process": fleet.pids[0]}
        return {
            name: Profiler(pid, folder / f"e2e-{name}-n{n}.txt") for name, pid in targets.items()
        }


def reader_fetch_max_wait_ms() -> int:
    """`configbus.bus.kafka.PartitionReader`'s fetch_max_wait_ms, so that the floor's
    consumers fetch as configbus's do: its module constant, else read from the source."""
    from configbus.bus import kafka

    value = getattr(kafka, "FOLLOW_FETCH_MAX_WAIT_MS", None)
    if isinstance(value, int):
        return value
    found = re.search(r"fetch_max_wait_ms=(\d+)", inspect.getsource(kafka.PartitionReader.start))
    return int(found.group(1)) if found else 100


def configbus_record_bytes(document: dict[str, Any], scratch: Path) -> int:
    """The size of a configbus record value for the edited stream (signed envelope,
    config zlib-compressed): what the Kafka floor sends."""
    from configbus.crypto import SigningKey, generate_keypair
    from configbus.events import Cause, build_body, seal

    private, _ = generate_keypair("size", scratch / "size-key")
    body = build_body(
        tenant=TENANT,
        env=ENV,
        version=2,
        config_json=config_value(document, 0),
        detected_at=time.time_ns(),
        cause=Cause(sources=(str(EDITED),), actor="configbus-publisher@host", reason="file"),
        changed_paths=(KEY,),
    )
    return len(seal(body, SigningKey.load(private, "size")))


def pooled(rounds: list[dict[str, Any]], n: int, processes: int) -> dict[str, Any]:
    last = [x for r in rounds for x in r["last"]]
    entry: dict[str, Any] = {
        "n": n,
        "processes": max(1, min(processes, n)),
        "edits": len(last),
        "timeouts": sum(r["timeouts"] for r in rounds),
        **summary(last),
        "samples_ms": [round(x, 3) for x in last],
        "first": summary([x for r in rounds for x in r["first"]]),
        "per_subscriber": {
            **summary(each := [x for r in rounds for x in r["each"]]),
            "samples_ms": [round(x, 3) for x in each],
        },
        "rounds": [summary(r["last"]) for r in rounds],
        "median_of_rounds": median_of([summary(r["last"]) for r in rounds]),
        "start_s": [r["start_s"] for r in rounds],
        "resources": rounds[0]["resources"]
        if len(rounds) == 1
        else {"rounds": [r["resources"] for r in rounds]},
    }
    extras = [e for r in rounds for e in r["extra"]]
    if extras:
        entry["breakdown_p50_ms"] = {
            k: round(percentile([e[k] for e in extras], 0.5), 3) for k in extras[0]
        }
        entry["breakdown_p99_ms"] = {
            k: round(percentile([e[k] for e in extras], 0.99), 3) for k in extras[0]
        }
    return entry


async def warm_kafka(servers: str, seconds: float) -> int:
    """Transactions as fast as they go for `seconds`, to a scratch topic with a
    read_committed consumer following: a freshly started broker runs its hot paths
    (transactions, markers, fetches) interpreted until the JIT compiles them, and
    whichever system ran first would pay for it. Returns the transactions made."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    topic = f"e2e-warm-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=servers, client_id="e2e-admin")
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(
        bootstrap_servers=servers,
        acks="all",
        enable_idempotence=True,
        transactional_id=f"e2e-warm-{uuid.uuid4().hex[:8]}",
    )
    consumer = AIOKafkaConsumer(
        bootstrap_servers=servers,
        isolation_level="read_committed",
        group_id=None,
        enable_auto_commit=False,
        fetch_max_wait_ms=100,
    )
    await producer.start()
    await consumer.start()
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    value = random.randbytes(5000)

    async def drain() -> None:
        while True:
            await consumer.getmany(tp, timeout_ms=1000)

    reader = asyncio.create_task(drain())
    count = 0
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                async with producer.transaction():
                    await producer.send(topic, value=value, key=b"warm")
                count += 1
            except Exception:  # the new partition has no leader yet
                await asyncio.sleep(0.1)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await consumer.stop()
        await producer.stop()
    return count


async def run(args: argparse.Namespace, bench: Bench, skipped: dict[str, str]) -> dict[str, Any]:
    makers: dict[str, Callable[[Bench], System]] = {
        "configbus": Configbus,
        "kafka_floor": KafkaFloor,
        "redis_pubsub": RedisPubSub,
        "etcd_watch": EtcdWatch,
    }
    systems = [makers[s](bench) for s in args.systems if s in makers and s not in skipped]
    watch = WatchFloor(bench) if "watch_floor" in args.systems else None
    raw: dict[str, dict[int, list[dict[str, Any]]]] = {s.name: {} for s in systems}
    watch_rounds: list[list[float]] = []
    ready: list[System] = []
    try:
        if args.warm_kafka > 0 and {"configbus", "kafka_floor"} & {s.name for s in systems}:
            say(f"warming the Kafka broker up for {args.warm_kafka:g}s")
            bench.warm_transactions = await warm_kafka(bench.servers, args.warm_kafka)
        for system in systems:
            say(f"setting up {system.name}")
            await system.setup()
            ready.append(system)
        for round_ in range(args.rounds):
            if watch is not None:
                say(f"  watch_floor (round {round_ + 1})")
                watch_rounds.append(await watch.measure(args.edits, args.warmup))
                s = summary(watch_rounds[-1])
                say(f"    p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms")
            order = systems[round_ % len(systems) :] + systems[: round_ % len(systems)]
            for n in args.n:
                for system in order:
                    result = await bench.fleet(system, n, round_)
                    raw[system.name].setdefault(n, []).append(result)
    finally:
        for system in reversed(ready):
            await system.teardown()
    out: dict[str, Any] = {}
    for name, by_n in raw.items():
        out[name] = {str(n): pooled(rounds, n, args.processes) for n, rounds in by_n.items()}
    if watch is not None:
        samples = [x for r in watch_rounds for x in r]
        out["watch_floor"] = {
            **summary(samples),
            "samples_ms": [round(x, 3) for x in samples],
            "rounds": [summary(r) for r in watch_rounds],
            "debounce_ms": watch.debounce_ms,
            "step_ms": watch.step_ms,
        }
    for name, why in skipped.items():
        out[name] = {"skipped": why}
    return out


def versions(bench: Bench) -> dict[str, Any]:
    import aiokafka
    import redis
    import uvloop
    import watchfiles

    found: dict[str, Any] = {
        "python": sys.version.split()[0],
        "kafka": re.search(
            r"<kafka.version>(.*?)</kafka.version>", (ROOT / "deploy/local/pom.xml").read_text()
        ).group(1),  # type: ignore[union-attr]
        "aiokafka": aiokafka.__version__,
        "redis_py": redis.__version__,
        "watchfiles": watchfiles.__version__,
        "uvloop": uvloop.__version__,
        "configbus": importlib.metadata.version("configbus"),
    }
    with contextlib.suppress(Exception):
        info = subprocess.run(
            ["redis-cli", "-u", bench.redis_url, "info", "server"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
        found["redis_server"] = re.search(r"redis_version:(\S+)", info).group(1)  # type: ignore[union-attr]
    if bench.etcd_port:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{bench.etcd_port}/version", timeout=5) as r:
            found["etcd"] = json.load(r).get("etcdserver")
    return found


def aims(systems: dict[str, Any], ratio: dict[str, float]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    largest = systems.get("configbus", {}).get("100")
    if largest and largest.get("count"):
        result["configbus_n100_p99_under_50ms"] = {
            "p99_ms": largest["p99_ms"],
            "median_of_rounds_p99_ms": largest["median_of_rounds"].get("p99_ms"),
            "holds": largest["p99_ms"] < 50,
        }
    result["overhead_ratio_p50_at_most_1_3"] = {
        n: {"ratio": r, "holds": r <= 1.3} for n, r in ratio.items()
    }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=lambda s: [int(x) for x in s.split(",")], default=[1, 10, 100])
    parser.add_argument("--edits", type=int, default=50, help="measured edits per N and round")
    parser.add_argument("--warmup", type=int, default=5, help="edits left out per fleet")
    parser.add_argument("--processes", type=int, default=4, help="worker processes per fleet")
    parser.add_argument("--rounds", type=int, default=1, help="repeat everything, interleaved")
    parser.add_argument(
        "--systems", type=lambda s: s.split(","), default=list(SYSTEMS), help=",".join(SYSTEMS)
    )
    parser.add_argument("--tracing", choices=("sdk", "off"), default="sdk")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--deadline", type=float, default=10.0, help="seconds per edit")
    parser.add_argument("--idle", type=float, default=3.0, help="idle seconds measured")
    parser.add_argument("--start-timeout", type=float, default=180.0)
    parser.add_argument(
        "--warm-kafka", type=float, default=20.0, help="seconds of transactions before measuring"
    )
    parser.add_argument("--profile", type=Path, default=None, help="py-spy output folder")
    parser.add_argument(
        "--quick", action="store_true", help="N=1,10; 20 edits; 1 s idle; 8 s warm-up"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if args.quick:
        args.n, args.edits, args.idle, args.warm_kafka = [1, 10], 20, 1.0, 8.0
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems: {sorted(unknown)}")

    began = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="configbus-e2e-") as scratch_dir,
        kafka_and_redis() as (servers, redis_url),
    ):
        scratch = Path(scratch_dir)
        skipped: dict[str, str] = {}
        with contextlib.ExitStack() as stack:
            etcd_port = None
            if "etcd_watch" in args.systems:
                etcd_port, why = stack.enter_context(etcd_server(scratch / "etcd-run"))
                if why:
                    skipped["etcd_watch"] = why
                    say(f"etcd_watch skipped: {why}")
            bench = Bench(args, servers, redis_url, etcd_port, scratch)
            load_before = os.getloadavg()
            systems = run_loop_result(args.loop, run(args, bench, skipped))
            found = versions(bench)
    ratio: dict[str, float] = {}
    for n in map(str, args.n):
        cb = systems.get("configbus", {}).get(n, {})
        kf = systems.get("kafka_floor", {}).get(n, {})
        wf = systems.get("watch_floor", {})
        if cb.get("count") and kf.get("count") and wf.get("count"):
            ratio[n] = round(cb["p50_ms"] / (kf["p50_ms"] + wf["p50_ms"]), 3)
    result: dict[str, Any] = {
        "benchmark": "e2e",
        "machine": {**machine(), "loadavg_before": [round(x, 2) for x in load_before]},
        "versions": found,
        "parameters": {
            "n": args.n,
            "edits": args.edits,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "processes": args.processes,
            "loop": args.loop,
            "tracing": args.tracing,
            "deadline_s": args.deadline,
            "idle_s": args.idle,
            "warm_kafka_s": args.warm_kafka,
            "warm_kafka_transactions": bench.warm_transactions,
            "pause_between_edits_ms": [100, 150],
            "quick": args.quick,
            "config_json_bytes": len(config_value(bench.document, 0)),
            "configbus_record_bytes": bench.record_bytes,
            "fetch_max_wait_ms": reader_fetch_max_wait_ms(),
            "edited_file": str(EDITED),
            "edited_key": KEY,
            "took_s": round(time.monotonic() - began, 1),
        },
        "notes": NOTES,
        "systems": systems,
        "overhead_ratio_p50": ratio,
        "aims": aims(systems, ratio),
    }
    if bench.profiles:
        result["profile"] = bench.profiles
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "e2e.json").write_text(dumps(result) + "\n")
    print(json.dumps(brief(result), indent=2))
    return 0


def dumps(result: dict[str, Any]) -> str:
    """Indented JSON with each list of numbers on one line (the samples would otherwise
    take a line each: some 20,000 lines)."""
    text = json.dumps(result, indent=1)
    return re.sub(
        r"\[\s+(-?[0-9][-0-9.e+,\s]*?)\s+\]",
        lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]",
        text,
    )


def brief(result: dict[str, Any]) -> dict[str, Any]:
    """The figures without the samples, for the terminal."""
    table: dict[str, Any] = {}
    for name, by_n in result["systems"].items():
        if "skipped" in by_n or "count" in by_n:
            table[name] = {k: v for k, v in by_n.items() if k not in ("samples_ms", "rounds")}
            continue
        table[name] = {
            n: {k: e.get(k) for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms", "timeouts")}
            for n, e in by_n.items()
        }
    return {"systems": table, "overhead_ratio_p50": result["overhead_ratio_p50"]}


def run_loop_result(kind: str, coroutine: Coroutine[Any, Any, Any]) -> Any:
    if kind == "uvloop":
        import uvloop

        return uvloop.run(coroutine)
    return asyncio.run(coroutine)


NOTES = [
    "Clocks: every process runs on this machine; times are time.time_ns() in the writer"
    " and in each subscriber's callback.",
    "configbus: the daemon is a separate process with default settings; each subscriber"
    " verifies (Ed25519, hash), decodes, diffs and swaps the config, runs the callback,"
    " then acknowledges on the acks topic through its own producer.",
    "kafka_floor: one record per transaction; configbus sends two per transaction (the"
    " tenant topic and the audit topic).",
    "etcd writes its WAL with fsync on every put (the data dir is on the machine's disk);"
    " Kafka and Redis here do not fsync per write.",
    "Subscribers of one system share worker processes (one event loop each) on a 2-core"
    " machine: N=100 puts 25 subscribers on one loop, where a real fleet has one per"
    " process; that packing costs every system alike, but costs most where a subscriber"
    " does the most work per event.",
    "Idle cost: every configbus subscriber, like every kafka_floor consumer (same"
    " settings), long-polls its partition with PartitionReader's fetch_max_wait_ms (see"
    " parameters), so N idle subscribers send N x 1000/fetch_max_wait_ms fetch requests a"
    " second: resources.idle shows what that costs the subscribers and the broker.",
    "The machine is shared with other users' work (test suites): see resources.*.others"
    " (CPU % of one core used by processes outside the benchmark) for how noisy a fleet was.",
]


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
