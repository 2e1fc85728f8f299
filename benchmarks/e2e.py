"""End to end: a value edited in a file until every instance has run its callback, for
configbus (direct Kafka and host agent), beside the floors (Kafka with and without
transactions, watchfiles) and what a team would use instead (Redis, etcd), in one run.

    python benchmarks/e2e.py [--n 1,10,100] [--edits 50] [--warmup 5] [--processes 4]
                             [--rounds 1] [--systems ...] [--tracing sdk|off]
                             [--warm-kafka 20] [--calm PCT] [--profile DIR] [--out DIR]
                             [--quick]

What is timed, per edit: from t0 (the writer's clock just before it writes) to the
moment the last of N subscribers has the new value (`time.time_ns()` in the subscriber;
every process runs on this machine, so clocks agree). The N subscribers are spread over
`--processes` worker processes, one event loop (uvloop) each (benchmarks/fleet.py).
Each edit waits until all N arrived (or `--deadline` passed: a timeout) and 100-150 ms,
then the next edit (with `--calm PCT`, not before processes outside the benchmark use
under PCT % of one core, on a shared machine; the waits dilute the CPU figures and are
recorded beside them); the first `--warmup` edits of every fleet are left out. Before
anything is measured, the broker runs `--warm-kafka` seconds of transactions (a fresh
JVM is slow until its JIT has compiled the hot paths). `--rounds R` repeats every
(N, system) fleet R times, interleaved, each round starting with another system.

Each system's module in benchmarks/systems/ says exactly what it measures: configbus
(configbus_direct), configbus_agent, kafka_floor, kafka_floor_no_txn, redis_pubsub,
etcd_watch, watch_floor. A system that cannot run here (no agent in this configbus, no
etcd-server) is recorded as skipped, with the reason. The emergency-override systems
(configbus_override, configbus_override_cli) run only when named; override.py runs them
into override.json.

Also per fleet: where configbus's time goes (stages that add up to the end-to-end time:
see configbus_direct), the time to start N subscribers, and CPU: of the subscriber
processes, the daemon, the agent, the servers, this process and everything else,
while idle (`--idle` seconds) and during the edits, as milliseconds per delivery (one
subscriber receiving one edit). `--profile DIR` samples the daemon and one subscriber
process with py-spy during the configbus edits at the largest N.

Writes e2e.json (see `FleetResult`; percentiles nearest-rank, samples kept for CDFs).
The overhead ratio is configbus p50 / (kafka_floor p50 + watch_floor p50) at each N.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import os
import random
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet import CpuSample, Fleet, Profiler, pid_listening, rss_mib, run_loop
from harness import (
    EDITED,
    ENV,
    KEY,
    RESULTS,
    TENANT,
    Result,
    RunInfo,
    Summary,
    config_document,
    config_value,
    redis_server_version,
    say,
    write,
)
from services import etcd, etcd_version, kafka_and_redis
from systems import Context, Delivery, System, registry
from systems.kafka_floor import warm_kafka
from systems.watch_floor import WatchFloor

SYSTEMS = (
    "configbus",
    "configbus_agent",
    "kafka_floor",
    "kafka_floor_no_txn",
    "watch_floor",
    "redis_pubsub",
    "etcd_watch",
)


@dataclass(frozen=True)
class FleetResult(Summary):
    """One system at one N, rounds pooled. The summary fields are over the time until
    the last of the N subscribers had the edit ("every instance has it")."""

    n: int = 0
    processes: int = 0
    timeouts: int = 0
    samples_ms: list[float] = field(default_factory=list)
    first: Summary = field(default_factory=Summary)  # until the first subscriber had it
    rounds: list[Summary] = field(default_factory=list)
    start_s: list[float] = field(default_factory=list)  # to start the N subscribers
    stages: dict[str, Summary] = field(default_factory=dict)  # configbus: where time goes
    cpu: list[dict[str, Any]] = field(default_factory=list)  # per round, see `cpu_of`
    rss_mib: list[float] = field(default_factory=list)  # subscriber processes, last round


@dataclass
class Round:
    last: list[float] = field(default_factory=list)
    first: list[float] = field(default_factory=list)
    stages: list[dict[str, float]] = field(default_factory=list)
    timeouts: int = 0
    start_s: float = 0.0
    cpu: dict[str, Any] = field(default_factory=dict)
    rss_mib: list[float] = field(default_factory=list)
    calm_wait_s: float = 0.0  # --calm: seconds waited for a calm machine
    calm_gave_up: int = 0  # --calm: edits made after waiting --calm-wait in vain


class Driver:
    def __init__(self, args: argparse.Namespace, ctx: Context) -> None:
        self.args, self.ctx = args, ctx
        self.next_edit = 0
        self.server_pids = {
            "kafka": pid_listening(int(ctx.servers.rsplit(":", 1)[1])),
            "redis": pid_listening(int(ctx.redis_url.rsplit(":", 1)[1].split("/")[0])),
            "etcd": pid_listening(ctx.etcd_port) if ctx.etcd_port else None,
        }
        self.profiles: dict[str, Any] = {}

    async def fleet(self, system: System, n: int, round_: int) -> Round:
        args, result = self.args, Round()
        say(f"  {system.name} N={n} (round {round_ + 1})")
        spec = {**system.spec(), "loop": args.loop, "tracing": args.tracing}
        fleet = Fleet(system.module, spec, n, args.processes)
        profilers: dict[str, Profiler] = {}
        try:
            result.start_s = round(await fleet.start(args.start_timeout), 3)
            groups = {
                "subscribers": fleet.pids,
                **system.processes(),
                "servers": [p for k in system.servers if (p := self.server_pids.get(k))],
                "bench": [os.getpid()],
            }
            idle_from = CpuSample.take(groups)
            await asyncio.sleep(args.idle)
            idle_to = CpuSample.take(groups)
            profilers = self.profilers(system, n, round_, fleet)
            deliveries: list[Delivery] = []
            for k in range(args.warmup + args.edits):
                edit, self.next_edit = self.next_edit, self.next_edit + 1
                t0 = await system.write(edit)
                entries, complete = await fleet.wait(edit, args.deadline)
                if k >= args.warmup and not complete:
                    result.timeouts += 1
                    say(f"    edit {edit}: {len(entries)}/{n} within {args.deadline}s")
                elif k >= args.warmup:
                    times = [(at - t0) / 1e6 for _, at, _ in entries]
                    result.last.append(max(times))
                    result.first.append(min(times))
                    deliveries.append(Delivery(edit, t0, entries))
                pause_from = CpuSample.take(groups) if args.calm else None
                await asyncio.sleep(0.1 + random.random() * 0.05)
                if pause_from is not None:
                    waited, calm = await self.calm(groups, pause_from)
                    result.calm_wait_s += waited
                    result.calm_gave_up += not calm
            edits_to = CpuSample.take(groups)
            for name, profiler in profilers.items():
                self.profiles[name] = profiler.stop()
            profilers = {}
            result.cpu = cpu_of(idle_from, idle_to, edits_to, (args.warmup + args.edits) * n)
            if args.calm:
                result.cpu["calm_wait_s"] = round(result.calm_wait_s, 1)
                result.cpu["calm_gave_up"] = result.calm_gave_up  # edits after a full wait
            result.rss_mib = [rss_mib(pid) for pid in fleet.pids]
        finally:
            for profiler in profilers.values():
                profiler.stop()
            await fleet.stop()
        result.stages = await system.stages(deliveries)
        s = Summary.of(result.last)
        say(f"    p50 {s.p50_ms} ms, p99 {s.p99_ms} ms; start {result.start_s} s")
        if result.calm_wait_s >= 1:
            say(
                f"    waited {result.calm_wait_s:.0f} s in all for a calm machine "
                f"({result.calm_gave_up} edit(s) after --calm-wait regardless)"
            )
        return result

    async def calm(self, groups: dict[str, list[int]], since: CpuSample) -> tuple[float, bool]:
        """`--calm PCT`: wait until the processes outside the benchmark ("others") have
        used under PCT % of one core since `since`, or in a later quarter of a second, for
        at most `--calm-wait` seconds: the seconds waited beyond `since`'s window, and
        whether it came calm."""
        began = time.monotonic()
        while True:
            now = CpuSample.take(groups)
            others = since.seconds_until(now)["others"] / max(now.at - since.at, 1e-3) * 100
            if others < self.args.calm or now.at - began >= self.args.calm_wait:
                return now.at - began, others < self.args.calm
            since = now
            await asyncio.sleep(0.25)

    def profilers(self, system: System, n: int, round_: int, fleet: Fleet) -> dict[str, Profiler]:
        folder = self.args.profile
        if folder is None or system.name != "configbus" or round_ or n != max(self.args.n):
            return {}
        folder.mkdir(parents=True, exist_ok=True)
        targets = {"daemon": system.processes()["daemon"][0], "subscriber_process": fleet.pids[0]}
        return {k: Profiler(pid, folder / f"e2e-{k}-n{n}.txt") for k, pid in targets.items()}


def cpu_of(idle_from: CpuSample, idle_to: CpuSample, edits_to: CpuSample, deliveries: int) -> Any:
    """Per group of processes: % of one core while idle and during the edits, and CPU ms
    per delivery during the edits, in all and above the group's idle rate."""
    idle, busy = idle_from.seconds_until(idle_to), idle_to.seconds_until(edits_to)
    idle_wall, wall = idle_to.at - idle_from.at, edits_to.at - idle_to.at
    return {
        "deliveries": deliveries,
        "edits_wall_s": round(wall, 2),
        "idle_pct": {k: round(v / idle_wall * 100, 1) for k, v in idle.items()},
        "edits_pct": {k: round(v / wall * 100, 1) for k, v in busy.items()},
        "ms_per_delivery": {k: round(v * 1e3 / deliveries, 3) for k, v in busy.items()},
        "ms_per_delivery_above_idle": {
            k: round(max(0.0, v - idle[k] / idle_wall * wall) * 1e3 / deliveries, 3)
            for k, v in busy.items()
        },
    }


def pooled(rounds: list[Round], n: int, processes: int) -> FleetResult:
    last = [x for r in rounds for x in r.last]
    stages = [s for r in rounds for s in r.stages]
    return FleetResult(
        **vars(Summary.of(last)),
        n=n,
        processes=max(1, min(processes, n)),
        timeouts=sum(r.timeouts for r in rounds),
        samples_ms=[round(x, 3) for x in last],
        first=Summary.of([x for r in rounds for x in r.first]),
        rounds=[Summary.of(r.last) for r in rounds],
        start_s=[r.start_s for r in rounds],
        stages={k: Summary.of([s[k] for s in stages]) for k in (stages[0] if stages else {})},
        cpu=[r.cpu for r in rounds],
        rss_mib=rounds[-1].rss_mib,
    )


async def run(args: argparse.Namespace, ctx: Context) -> dict[str, Any]:
    kinds = registry()
    out: dict[str, Any] = {}
    systems: list[System] = []
    for name in args.systems:
        if name in kinds:
            system = kinds[name](ctx)
            if why := system.skip_reason():
                say(f"{name} skipped: {why}")
                out[name] = {"skipped": why}
            else:
                systems.append(system)
    watch = WatchFloor(ctx.scratch) if "watch_floor" in args.systems else None
    raw: dict[str, dict[int, list[Round]]] = {s.name: {} for s in systems}
    watch_rounds: list[list[float]] = []
    ready: list[System] = []
    driver = Driver(args, ctx)
    try:
        if args.warm_kafka > 0 and any("kafka" in s.servers for s in systems):
            say(f"warming the Kafka broker up for {args.warm_kafka:g}s")
            out["warm_kafka_transactions"] = await warm_kafka(ctx.servers, args.warm_kafka)
        for system in systems:
            say(f"setting up {system.name}")
            ready.append(system)  # torn down even when its set-up fails half way
            await system.setup()
        for round_ in range(args.rounds):
            if watch is not None:
                say(f"  watch_floor (round {round_ + 1})")
                watch_rounds.append(await watch.measure(args.edits, args.warmup))
            order = systems[round_ % len(systems) :] + systems[: round_ % len(systems)]
            for n in args.n:
                for system in order:
                    raw[system.name].setdefault(n, []).append(await driver.fleet(system, n, round_))
    finally:
        for system in reversed(ready):
            await system.teardown()
    for name, by_n in raw.items():
        out[name] = {str(n): pooled(rounds, n, args.processes) for n, rounds in by_n.items()}
    if watch is not None:
        samples = [x for r in watch_rounds for x in r]
        out["watch_floor"] = {
            **vars(Summary.of(samples)),
            "samples_ms": [round(x, 3) for x in samples],
            "debounce_ms": watch.debounce_ms,
            "step_ms": watch.step_ms,
        }
    if driver.profiles:
        out["profile"] = driver.profiles
    return out


def overhead_ratio(systems: dict[str, Any], n: str, name: str = "configbus") -> float | None:
    def p50(entry: Any) -> float | None:
        return entry.p50_ms if isinstance(entry, Summary) else (entry or {}).get("p50_ms")

    mine = p50(systems.get(name, {}).get(n))
    kafka = p50(systems.get("kafka_floor_no_txn", {}).get(n))  # the aim's yardstick
    watch = p50(systems.get("watch_floor"))
    return round(mine / (kafka + watch), 3) if mine and kafka and watch else None


def reader_fetch_max_wait_ms() -> int:
    """`configbus.bus.kafka.PartitionReader`'s fetch_max_wait_ms, so that the floors'
    consumers fetch as configbus's do: its module constant, else read from the source."""
    from configbus.bus import kafka

    value = getattr(kafka, "FOLLOW_FETCH_MAX_WAIT_MS", None)
    if isinstance(value, int):
        return value
    found = re.search(r"fetch_max_wait_ms=(\d+)", inspect.getsource(kafka.PartitionReader.start))
    return int(found.group(1)) if found else 100


def record_bytes(document: dict[str, Any], scratch: Path) -> int:
    """The size of a configbus record for the edited stream: what the Kafka floors send."""
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


def options(description: str, systems: Sequence[str]) -> argparse.ArgumentParser:
    """The options of an end-to-end run, `systems` by default (override.py shares them)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--n", type=lambda s: [int(x) for x in s.split(",")], default=[1, 10, 100])
    parser.add_argument("--edits", type=int, default=50, help="measured edits per N and round")
    parser.add_argument("--warmup", type=int, default=5, help="edits left out per fleet")
    parser.add_argument("--processes", type=int, default=4, help="worker processes per fleet")
    parser.add_argument("--rounds", type=int, default=1, help="repeat everything, interleaved")
    parser.add_argument(
        "--systems", type=lambda s: s.split(","), default=list(systems), help=",".join(systems)
    )
    parser.add_argument("--tracing", choices=("sdk", "off"), default="sdk")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--deadline", type=float, default=10.0, help="seconds per edit")
    parser.add_argument("--idle", type=float, default=3.0, help="idle seconds measured")
    parser.add_argument("--start-timeout", type=float, default=180.0)
    parser.add_argument("--warm-kafka", type=float, default=20.0, help="seconds of transactions")
    parser.add_argument(
        "--calm",
        type=float,
        default=0.0,
        metavar="PCT",
        help="before each edit, wait until processes outside the benchmark use under PCT %% "
        "of one core (a shared machine; 0: never wait)",
    )
    parser.add_argument("--calm-wait", type=float, default=30.0, help="seconds, at most per edit")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy output folder")
    parser.add_argument("--quick", action="store_true", help="N=1,10; 20 edits; 1 s idle; 8 s warm")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser


def parse(
    argv: list[str] | None, parser: argparse.ArgumentParser | None = None
) -> argparse.Namespace:
    parser = parser or options(__doc__.splitlines()[0], SYSTEMS)
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.edits, args.idle, args.warm_kafka = [1, 10], 20, 1.0, 8.0
    if unknown := set(args.systems) - {*SYSTEMS, *registry()}:
        parser.error(f"unknown systems: {sorted(unknown)}")
    return args


def measure(args: argparse.Namespace) -> tuple[dict[str, Any], RunInfo, dict[str, Any]]:
    """Run `args.systems` against fresh servers: the results by system, the run's info
    and the parameters to record (override.py shares this)."""
    began = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="configbus-e2e-") as scratch_dir,
        kafka_and_redis() as (servers, redis_url),
        contextlib.ExitStack() as stack,
    ):
        scratch = Path(scratch_dir)
        etcd_port, why = None, None
        if "etcd_watch" in args.systems:
            etcd_port, why = stack.enter_context(etcd(scratch / "etcd-run"))
        document = config_document()
        ctx = Context(
            args=args,
            servers=servers,
            redis_url=redis_url,
            etcd_port=etcd_port,
            scratch=scratch,
            document=document,
            record_bytes=record_bytes(document, scratch),
            fetch_max_wait_ms=reader_fetch_max_wait_ms(),
        )
        info = RunInfo.here(
            redis_server=redis_server_version(redis_url),
            etcd=etcd_version(etcd_port) if etcd_port else None,
        )
        systems = run_loop(args.loop, run(args, ctx))
        if why:
            systems["etcd_watch"] = {"skipped": why}
    warm = systems.pop("warm_kafka_transactions", 0)
    parameters = {
        **{k: v for k, v in vars(args).items() if k not in ("out", "profile", "systems")},
        "systems": args.systems,
        "warm_kafka_transactions": warm,
        "pause_between_edits_ms": [100, 150],
        "config_json_bytes": len(config_value(ctx.document, 0)),
        "configbus_record_bytes": ctx.record_bytes,
        "fetch_max_wait_ms": ctx.fetch_max_wait_ms,
        "edited_file": str(EDITED),
        "edited_key": KEY,
        "took_s": round(time.monotonic() - began, 1),
    }
    return systems, info, parameters


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    systems, info, parameters = measure(args)
    profile = systems.pop("profile", None)
    ratio = {
        name: {n: r for n in map(str, args.n) if (r := overhead_ratio(systems, n, name))}
        for name in ("configbus", "configbus_agent")
    }
    data = {"systems": systems, "overhead_ratio_p50": ratio}
    if profile:
        data["profile"] = profile
    write(Result("e2e", info, parameters, data), args.out)
    for name, by_n in systems.items():
        if "skipped" in by_n:
            say(f"{name}: skipped ({by_n['skipped']})")
        elif isinstance(by_n, dict) and "p50_ms" in by_n:
            say(f"{name}: p50 {by_n['p50_ms']} ms, p99 {by_n['p99_ms']} ms")
        else:
            cells = [f"N={n} {e.p50_ms}/{e.p99_ms} ms" for n, e in by_n.items()]
            say(f"{name}: p50/p99 {', '.join(cells)}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
