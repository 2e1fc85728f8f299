"""Emergency overrides end to end: an override set until every instance has run its
callback, with the `configbus override set` command's start-up and without it.

    python benchmarks/override.py [--n 1,10,100] [--edits 30] [--warmup 3] [--rounds 1]
                                  [--startup-runs 10] [--calm PCT] [e2e.py's other options]
                                  [--out DIR]

e2e.py's driver, fleets and options over two systems (benchmarks/systems/
configbus_override.py says what each times): configbus_override, t0 just before the
library call `write_overrides` in the driver's process, and configbus_override_cli, t0
just before spawning `configbus override set ... --no-check --wait 0`. Also the
command's start-up alone, each run `--startup-runs` times one after another:
`python -c pass` (the interpreter) and `configbus override set --help` (the interpreter,
every import and the argument parser, no Kafka), with its bytecode cached as the timed
commands have it and with every module compiled each time; and `-X importtime` of the
latter, by top-level package.

Writes override.json: the fleets as e2e.json has them (samples kept), p50/p90/p99 of
each system at each N beside those of configbus's file edits (direct Kafka) read from the
e2e.json in the same folder, when there is one (another run: its commit is recorded), and
the start-up times. Percentiles nearest-rank.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from e2e import measure, options, parse
from fleet import configbus_command, machine_cpu_s
from harness import Result, Summary, percentile, say, write
from systems.configbus_override import command_env

SYSTEMS = ("configbus_override", "configbus_override_cli")
FILE_EDIT = "configbus"  # e2e.json's configbus, direct Kafka: a file edit


def latency(by_n: dict[str, Any]) -> dict[str, dict[str, float | int]]:
    """N -> count, p50, p90 and p99 (ms) of the time until the last subscriber had it."""
    out = {}
    for n, entry in by_n.items():
        samples = entry["samples_ms"] if isinstance(entry, dict) else entry.samples_ms
        if samples:
            out[n] = {
                "count": len(samples),
                **{f"p{q}_ms": round(percentile(samples, q / 100), 3) for q in (50, 90, 99)},
            }
    return out


def file_edits(path: Path) -> dict[str, Any] | None:
    """configbus's file-edit figures from an e2e.json, with where they come from."""
    try:
        e2e = json.loads(path.read_text(encoding="utf-8"))
        by_n = e2e["systems"][FILE_EDIT]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(by_n, dict) or "skipped" in by_n:
        return None
    parameters = e2e.get("parameters", {})
    return {
        "source": path.name,
        "commit": e2e.get("run", {}).get("commit"),
        "edits": parameters.get("edits"),
        "rounds": parameters.get("rounds"),
        "latency": latency(by_n),
    }


def startup(runs: int, calm: float, calm_wait: float) -> dict[str, Any]:
    """The command's start-up without Kafka, wall ms over `runs` runs each: the
    interpreter alone, the command up to its help text with its bytecode cached (as the
    timed commands run) and with every module compiled from source each time; and where
    the import time goes (`-X importtime`), by top-level package. With `calm` > 0, each
    run waits (up to `calm_wait` s) until the machine is busy under `calm` % of a core."""
    help_ = [*configbus_command(), "override", "set", "--help"]
    with tempfile.TemporaryDirectory(prefix="configbus-override-startup-") as scratch:
        cached = command_env("sdk", Path(scratch) / "pycache")
        uncached = command_env("sdk", Path(scratch) / "empty") | {"PYTHONDONTWRITEBYTECODE": "1"}
        settle = functools.partial(calm_machine, calm, calm_wait)
        out: dict[str, Any] = {
            "python_pass": wall([sys.executable, "-c", "pass"], cached, runs, settle),
            "override_set_help": wall(help_, cached, runs, settle),
            "override_set_help_compiling": wall(help_, uncached, runs, settle),
        }
        importtime = [sys.executable, "-X", "importtime", "-m", "configbus.cli", *help_[-3:]]
        out["imports_ms"] = imports(importtime, cached, runs, settle)
    return out


def calm_machine(pct: float, seconds: float) -> None:
    """Wait (at most `seconds`) until the machine was busy under `pct` % of one core for
    a quarter of a second; at once when `pct` is 0."""
    deadline = time.monotonic() + seconds
    while pct > 0 and time.monotonic() < deadline:
        began, busy = time.monotonic(), machine_cpu_s()
        time.sleep(0.25)
        if (machine_cpu_s() - busy) / (time.monotonic() - began) * 100 < pct:
            return


def wall(command: list[str], env: dict[str, str], runs: int, settle: Callable[[], None]) -> Summary:
    times = []
    for _ in range(runs + 1):  # the first fills the caches (page, bytecode): left out
        settle()
        began = time.perf_counter()
        subprocess.run(command, env=env, stdout=subprocess.DEVNULL, check=True)
        times.append((time.perf_counter() - began) * 1e3)
    return Summary.of(times[1:])


def imports(
    command: list[str], env: dict[str, str], runs: int, settle: Callable[[], None]
) -> dict[str, float]:
    """Median ms of import time (each module's own) by top-level package, the standard
    library as one, largest first, those under 1 ms as "others", and their total."""
    by_run: list[Counter[str]] = []
    for _ in range(runs):
        found: Counter[str] = Counter()
        settle()
        err = subprocess.run(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True
        ).stderr.decode()
        for line in err.splitlines():
            fields = line.removeprefix("import time:").split("|")
            if len(fields) == 3 and fields[0].strip().isdigit():
                top = fields[2].strip().split(".")[0]
                found["stdlib" if top in sys.stdlib_module_names else top] += int(fields[0])
        by_run.append(found)
    names = {name for found in by_run for name in found}
    median = {n: statistics.median(found[n] for found in by_run) / 1e3 for n in names}
    ordered = sorted(median.items(), key=lambda item: -item[1])
    out = {"total": round(sum(median.values()), 1)}
    out |= {name: round(ms, 1) for name, ms in ordered if ms >= 1}
    return out | {"others": round(sum(ms for _, ms in ordered if ms < 1), 1)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = options(__doc__.splitlines()[0], SYSTEMS)
    parser.set_defaults(edits=30, warmup=3)
    parser.add_argument("--startup-runs", type=int, default=10, help="runs of each start-up")
    return parse(argv, parser)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    say(f"command start-up, {args.startup_runs} runs each")
    started = startup(args.startup_runs, args.calm, args.calm_wait)
    systems, info, parameters = measure(args)
    table = {name: latency(by_n) for name, by_n in systems.items() if "skipped" not in by_n}
    compared = file_edits(args.out / "e2e.json")
    data = {
        "systems": systems,
        "latency": table,
        "file_edit": compared,
        "cli_startup_ms": started,
    }
    parameters["startup_runs"] = args.startup_runs
    write(Result("override", info, parameters, data), args.out)
    rows = {**table, **({"file edit (e2e.json)": compared["latency"]} if compared else {})}
    for name, by_n in rows.items():
        cells = [f"N={n} {e['p50_ms']}/{e['p90_ms']} ms" for n, e in by_n.items()]
        say(f"{name}: p50/p90 {', '.join(cells)}")
    for name, summary in started.items():
        if isinstance(summary, Summary):
            say(f"{name}: p50 {summary.p50_ms} ms")
    say(f"imports (ms): {started['imports_ms']}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
