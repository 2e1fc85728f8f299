"""How fast the resolver is: one stream from a warm cache, and a whole fleet of tenants.

    python benchmarks/resolve.py [--tenants 10000] [--repeat 2000] [--out DIR]

1. One stream (aurora-records/prod of the sample tree, five layers deep): resolve and
   hash from a warm cache, p50/p99 over `--repeat` runs; schema validation apart.
2. A synthetic tree: the sample environments plus `--tenants` generated tenants, each
   running dev, staging and prod with its own small layer per environment. Resolve and
   hash every stream cold (every file parsed for the first time) and warm (files
   cached, nothing changed), and once more after one shared file changed (what the
   publisher does when `prod/prod.yml` is saved).

Writes `results/resolve.json`. Figures are wall-clock on this machine; nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import RunInfo, percentile, to_data

from configbus.tree import EnvironmentTree

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "environments"
ENVS = ("dev", "staging", "prod")
OVERRIDES = {"dev": ["local"], "staging": ["integration"], "prod": ["high_availability", "scaling"]}


def micro(samples: list[float]) -> dict[str, float]:
    return {
        "p50_us": round(percentile(samples, 0.50) * 1e6, 1),
        "p99_us": round(percentile(samples, 0.99) * 1e6, 1),
        "mean_us": round(statistics.fmean(samples) * 1e6, 1),
    }


def one_stream(repeat: int) -> dict[str, Any]:
    tree = EnvironmentTree(SAMPLE)
    tree.resolve("prod", "aurora-records").hash  # warm the caches
    resolve, validate = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        config = tree.resolve("prod", "aurora-records")
        config.hash  # the hash is part of what a publisher needs
        middle = time.perf_counter()
        tree.problems(config)
        validate.append(time.perf_counter() - middle)
        resolve.append(middle - start)
    return {
        "stream": "aurora-records/prod",
        "layers": len(config.layers),
        "leaf_keys": count_leaves(config.data),
        "canonical_json_bytes": len(config.canonical_json),
        "resolve_and_hash": micro(resolve),
        "schema_validation": micro(validate),
    }


def count_leaves(value: Any) -> int:
    if isinstance(value, dict) or hasattr(value, "items"):
        return sum(count_leaves(v) for v in value.values())
    return 1


def synthetic_tree(target: Path, tenants: int) -> None:
    shutil.copytree(SAMPLE, target, ignore=shutil.ignore_patterns("tenants"))
    base = target / "tenants"
    for n in range(tenants):
        tenant = f"tenant-{n:05d}"
        folder = base / tenant
        folder.mkdir(parents=True)
        envs = "\n".join(f"  {env}:\n    overrides: [{', '.join(OVERRIDES[env])}]" for env in ENVS)
        (folder / "tenant.yml").write_text(
            f"tenant: {tenant}\nname: Tenant {n}\nenvironments:\n{envs}\n"
        )
        for env in ENVS:
            (folder / f"{env}.yml").write_text(
                f"# {tenant} in {env}\n"
                "database:\n  postgresql:\n"
                f"    database: {tenant.replace('-', '_')}_{env}\n"
                f"    connection_pool:\n      max_size: {20 + n % 80}\n"
                f"feature_flags:\n  tenant_{n % 7}_beta: {str(n % 2 == 0).lower()}\n"
            )


def fleet(tenants: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="configbus-bench-") as scratch:
        root = Path(scratch) / "environments"
        start = time.perf_counter()
        synthetic_tree(root, tenants)
        generate = time.perf_counter() - start

        tree = EnvironmentTree(root)
        streams = [(env, t) for t in tree.tenants() for env in ENVS]

        def resolve_all() -> float:
            start = time.perf_counter()
            hashes = {tree.resolve(env, tenant).hash for env, tenant in streams}
            elapsed = time.perf_counter() - start
            if len(hashes) < tenants:  # every tenant's layer makes its streams distinct
                raise RuntimeError("synthetic streams resolved to too few distinct configs")
            return elapsed

        cold = resolve_all()
        warm = resolve_all()
        prod_file = root / "prod" / "prod.yml"
        prod_file.write_text(prod_file.read_text() + "\n# touched\n")
        stat = prod_file.stat()
        os.utime(prod_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
        after_edit = resolve_all()
    count = len(streams)
    return {
        "tenants": tenants,
        "streams": count,
        "generate_tree_s": round(generate, 2),
        "cold_s": round(cold, 2),
        "warm_s": round(warm, 2),
        "after_shared_edit_s": round(after_edit, 2),
        "warm_us_per_stream": round(warm / count * 1e6, 1),
        "warm_streams_per_s": round(count / warm),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=2_000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    result = {
        "benchmark": "resolve",
        "run": to_data(RunInfo.here()),
        "one_stream_warm": one_stream(args.repeat),
        "fleet": fleet(args.tenants),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "resolve.json").write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
