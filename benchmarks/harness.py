"""What every benchmark shares: the edited stream, percentiles, typed results that record
the commit, the machine and the library versions, and the JSON they are written as.

Every result file is one `Result`: which benchmark, a `RunInfo` (git commit, machine,
versions, load) and the benchmark's own data. Percentiles are nearest-rank: with 50
samples p99 is the largest and p95 the third largest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
SAMPLE = ROOT / "environments"

# The stream every end-to-end edit changes, and how.
TENANT, ENV = "aurora-records", "prod"
POOL = "database.postgresql.connection_pool"
KEY = f"{POOL}.max_size"
EDITED = Path("tenants") / TENANT / f"{ENV}.yml"
ORIGINAL_LINE = "max_size: 250"
BASE = 1000  # the edited value is BASE + the edit's id


class BenchError(Exception):
    """A benchmark could not run as set up (a server, a worker or a daemon failed)."""


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- statistics -------------------------------------------------------------------------
def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(frozen=True)
class Summary:
    """Milliseconds over some samples."""

    count: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    mean_ms: float | None = None

    @classmethod
    def of(cls, samples: list[float]) -> Summary:
        if not samples:
            return cls()
        return cls(
            count=len(samples),
            p50_ms=round(percentile(samples, 0.50), 3),
            p95_ms=round(percentile(samples, 0.95), 3),
            p99_ms=round(percentile(samples, 0.99), 3),
            max_ms=round(max(samples), 3),
            mean_ms=round(statistics.fmean(samples), 3),
        )


# -- what a run records about itself ------------------------------------------------------
@dataclass(frozen=True)
class Machine:
    cores: int
    memory_mib: int | None
    python: str
    platform: str
    libyaml: bool
    loadavg: tuple[float, float, float]

    @classmethod
    def here(cls) -> Machine:
        import yaml

        memory = None
        with contextlib.suppress(OSError), open("/proc/meminfo") as meminfo:
            memory = int(meminfo.readline().split()[1]) // 1024
        one, five, fifteen = (round(x, 2) for x in os.getloadavg())
        return cls(
            cores=os.cpu_count() or 1,
            memory_mib=memory,
            python=platform.python_version(),
            platform=platform.platform(),
            libyaml=bool(getattr(yaml, "__with_libyaml__", False)),
            loadavg=(one, five, fifteen),
        )


@dataclass(frozen=True)
class RunInfo:
    commit: str  # git HEAD, with "+dirty" when the working tree differs from it
    machine: Machine
    versions: dict[str, str]

    @classmethod
    def here(cls, **servers: str | None) -> RunInfo:
        """`servers`: versions of servers the run talked to (kafka=..., etcd=...)."""
        found = library_versions()
        found.update({name: v for name, v in servers.items() if v})
        return cls(commit=git_commit(), machine=Machine.here(), versions=found)


@dataclass(frozen=True)
class Result:
    benchmark: str
    run: RunInfo
    parameters: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False
        ).stdout.strip()

    head = git("rev-parse", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


LIBRARIES = (
    "configbus",
    "aiokafka",
    "msgspec",
    "cryptography",
    "redis",
    "watchfiles",
    "uvloop",
    "PyYAML",
    "opentelemetry-sdk",
)


def library_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name.lower()] = importlib.metadata.version(name)
    pom = (ROOT / "deploy/local/pom.xml").read_text()
    if match := re.search(r"<kafka.version>(.*?)</kafka.version>", pom):
        found["kafka"] = match.group(1)
    return found


def redis_server_version(url: str) -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info = subprocess.run(
            ["redis-cli", "-u", url, "info", "server"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
        if match := re.search(r"redis_version:(\S+)", info):
            return match.group(1)
    return None


# -- writing results ------------------------------------------------------------------------
def to_data(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: to_data(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): to_data(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_data(v) for v in value]
    return value


def dumps(value: Any) -> str:
    """Indented JSON with each list of numbers on one line (samples would otherwise take a
    line each)."""
    text = json.dumps(to_data(value), indent=1)
    return re.sub(
        r"\[\s+(-?[0-9][-0-9.e+,\s]*?)\s+\]",
        lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]",
        text,
    )


def write(result: Result, out: Path) -> Path:
    """`out/<benchmark>.json`: benchmark, run, parameters, then the data's own keys."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{result.benchmark}.json"
    flat = {"benchmark": result.benchmark, "run": result.run, "parameters": result.parameters}
    path.write_text(dumps({**flat, **result.data}) + "\n")
    say(f"wrote {path}")
    return path


# -- the edited config as plain data ---------------------------------------------------------
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


def edited_text(original: str, edit: int) -> str:
    return original.replace(ORIGINAL_LINE, f"max_size: {BASE + edit}")


def atomic_save(path: Path, text: str) -> int:
    """Write `text` to a temp file next to `path` and rename it over `path`, as editors
    do; returns the time just before the write (ns)."""
    import time

    temporary = path.with_name(f".{path.name}.edit")
    t0 = time.time_ns()
    temporary.write_text(text)
    os.replace(temporary, path)
    return t0
