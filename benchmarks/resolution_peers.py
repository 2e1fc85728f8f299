"""Resolution alone: configbus's resolver against Dynaconf and OmegaConf on the same files.

    python benchmarks/resolution_peers.py [--tenant aurora-records] [--env prod]
                                          [--repeat 200] [--out DIR]

The stream's file layers come from `EnvironmentTree(...).layers(env, tenant)`: for
aurora-records/prod that is common/base.yml, prod/prod.yml, the three prod overrides
the tenant selects, and tenants/aurora-records/prod.yml. configbus resolves its own
files. Dynaconf and OmegaConf cannot read the tree's custom tags, so they get a
tag-free copy of the same files in a temp folder, edited as text (comments and layout
kept, so the bytes to parse are nearly the same):

- ``!secret NAME`` becomes the plain string ``"<secret:NAME>"`` (what configbus's
  `ResolvedConfig.redacted()` shows for the reference, so the results compare);
- a ``key: !delete`` line is dropped (the peers have no deletion: if a lower layer
  sets that key the peers keep it, and the comparison says so);
- the top-level ``extends:`` line is dropped (the peers get the file list instead).

What each figure measures (every case ends with the merged config as data):

- configbus cold: a new `EnvironmentTree` (no parsed files, no merge cache), resolve
  the stream and hash it (parses the tenant file and every layer with libyaml).
- configbus warm: the same tree again, nothing changed on disk: stat every file,
  serve the merged prefix from the cache, build the `ResolvedConfig` and hash it.
  This is what the publisher does when it re-resolves a stream.
- Dynaconf cold: a new ``Dynaconf(settings_files=[...], merge_enabled=True)`` forced
  to load, then ``as_dict()``. Dynaconf warm: ``settings.reload()`` (it has no parse
  cache: reload re-reads and re-parses every file) then ``as_dict()``.
- OmegaConf cold: ``OmegaConf.load`` each file, ``OmegaConf.merge`` them and
  ``OmegaConf.to_container(resolve=True)``. OmegaConf warm: the files already loaded
  as DictConfigs; only ``merge`` + ``to_container`` (the cheapest honest re-load).
- PyYAML + merge (reference, cold only): ``yaml.load`` with the libyaml CSafeLoader
  on each tag-free file and a ten-line recursive dict merge; the floor of "parse these
  files and merge them" in Python.

Cold cases are interleaved round by round, so drift on a noisy machine spreads over
all of them, with a full garbage collection before every timed call, so that no case
pays for the garbage of the one before (each still pays for the collections its own
allocations trigger). Warm cases run as one back-to-back series each, as a publisher
re-resolving streams does: interleaved with the peers' 50-80 ms calls, configbus's
warm figure doubles, because its data no longer sits in the CPU caches. configbus's
warm series is ten times longer (its calls take microseconds). Imports and the OS
page cache are warm in every case: "cold" means no library caches, not a fresh
interpreter. Each merged result is compared with configbus's ``redacted()`` config;
differences are listed. Writes results/resolution_peers.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import yaml
from dynaconf import Dynaconf
from harness import RunInfo, percentile, to_data
from omegaconf import OmegaConf
from resolve import count_leaves

from configbus.tree import EnvironmentTree

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "environments"
WARMUP = 5
MAX_DIFFERENCES = 12

SECRET = re.compile(r"""!secret\s+(?:"([^"]*)"|'([^']*)'|([^\s#,\]}]+))""")
DELETE_LINE = re.compile(r"^[ \t]*[^\s#][^\n]*:[ \t]*!delete[ \t]*(?:#[^\n]*)?\n?", re.MULTILINE)
EXTENDS_LINE = re.compile(r"^extends:[^\n]*\n?", re.MULTILINE)
CSafeLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# -- the input files ------------------------------------------------------------------


def stream_files(tree: EnvironmentTree, env: str, tenant: str) -> list[Path]:
    """The stream's file layers, lowest first, as configbus stacks them."""
    return [Path(layer.source) for layer in tree.layers(env, tenant)]


def tag_free(text: str) -> tuple[str, dict[str, int]]:
    """`text` without configbus's tags and `extends:`, and what was changed."""
    text, secrets = SECRET.subn(
        lambda m: f'"<secret:{m.group(1) or m.group(2) or m.group(3)}>"', text
    )
    text, deletes = DELETE_LINE.subn("", text)
    text, extends = EXTENDS_LINE.subn("", text)
    return text, {
        "secrets_replaced": secrets,
        "delete_lines_dropped": deletes,
        "extends_dropped": extends,
    }


def tag_free_copy(files: list[Path], target: Path) -> tuple[list[Path], dict[str, Any]]:
    """Tag-free copies of `files` in `target` (numbered: two layers may share a name)."""
    copies, changes = [], {"secrets_replaced": 0, "delete_lines_dropped": 0, "extends_dropped": 0}
    original_bytes = copy_bytes = 0
    for index, source in enumerate(files):
        text = source.read_text(encoding="utf-8")
        clean, changed = tag_free(text)
        name = "-".join(source.relative_to(SAMPLE).with_suffix("").parts)
        copy = target / f"{index:02d}-{name}.yml"
        copy.write_text(clean, encoding="utf-8")
        copies.append(copy)
        changes = {key: changes[key] + changed[key] for key in changes}
        original_bytes += len(text.encode())
        copy_bytes += len(clean.encode())
    return copies, {**changes, "original_bytes": original_bytes, "copy_bytes": copy_bytes}


# -- the cases ------------------------------------------------------------------------


def deep_merge(low: dict[str, Any], high: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge, everything else replaces: the reference merge."""
    merged = dict(low)
    for key, value in high.items():
        below = merged.get(key)
        if isinstance(below, dict) and isinstance(value, dict):
            merged[key] = deep_merge(below, value)
        else:
            merged[key] = value
    return merged


def pyyaml_merge(files: list[Path]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for path in files:
        with open(path, encoding="utf-8") as handle:
            merged = deep_merge(merged, yaml.load(handle, Loader=CSafeLoader) or {})
    return merged


def dynaconf_settings(files: list[Path]) -> Any:
    return Dynaconf(settings_files=[str(f) for f in files], merge_enabled=True)


def dynaconf_dict(settings: Any) -> dict[str, Any]:
    """Dynaconf's merged data; it upper-cases top-level keys, we lower them back."""
    return {key.lower(): value for key, value in settings.as_dict().items()}


def omegaconf_dict(loaded: list[Any]) -> dict[str, Any]:
    return cast(dict[str, Any], OmegaConf.to_container(OmegaConf.merge(*loaded), resolve=True))


def cold_cases(env: str, tenant: str, copies: list[Path]) -> dict[str, Callable[[], Any]]:
    return {
        "configbus": lambda: EnvironmentTree(SAMPLE).resolve(env, tenant).hash,
        "dynaconf": lambda: dynaconf_dict(dynaconf_settings(copies)),
        "omegaconf": lambda: omegaconf_dict([OmegaConf.load(f) for f in copies]),
        "pyyaml_merge": lambda: pyyaml_merge(copies),
    }


def warm_cases(env: str, tenant: str, copies: list[Path]) -> dict[str, Callable[[], Any]]:
    tree = EnvironmentTree(SAMPLE)
    tree.resolve(env, tenant).hash
    settings = dynaconf_settings(copies)
    dynaconf_dict(settings)
    loaded = [OmegaConf.load(f) for f in copies]

    def dynaconf_reload() -> dict[str, Any]:
        settings.reload()
        return dynaconf_dict(settings)

    return {
        "configbus": lambda: tree.resolve(env, tenant).hash,
        "dynaconf": dynaconf_reload,
        "omegaconf": lambda: omegaconf_dict(loaded),
    }


MEASURES = {
    "configbus": {
        "cold": "new EnvironmentTree, resolve + SHA-256 of the canonical JSON",
        "warm": "same tree, files unchanged: stat, cached merge, ResolvedConfig + hash",
    },
    "dynaconf": {
        "cold": "new Dynaconf(settings_files, merge_enabled=True), load, as_dict()",
        "warm": "settings.reload() (re-reads and re-parses every file) + as_dict()",
    },
    "omegaconf": {
        "cold": "OmegaConf.load each file, merge, to_container(resolve=True)",
        "warm": "merge of the already loaded DictConfigs + to_container(resolve=True)",
    },
    "pyyaml_merge": {
        "cold": "yaml.load (libyaml CSafeLoader) each file + a ten-line dict merge",
    },
}


def warm_up(cases: dict[str, Callable[[], Any]]) -> None:
    for case in cases.values():
        for _ in range(WARMUP):
            case()


def interleaved(cases: dict[str, Callable[[], Any]], repeat: int) -> dict[str, list[float]]:
    """Seconds per call of every case, `repeat` rounds of one call each, after a warm-up."""
    warm_up(cases)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeat):
        for name, case in cases.items():
            gc.collect()  # nobody pays for the garbage of the case before
            started = time.perf_counter()
            case()
            samples[name].append(time.perf_counter() - started)
    return samples


def series(cases: dict[str, Callable[[], Any]], repeats: dict[str, int]) -> dict[str, list[float]]:
    """Seconds per call of every case, each case in its own back-to-back series."""
    warm_up(cases)
    samples: dict[str, list[float]] = {}
    for name, case in cases.items():
        gc.collect()
        timings = []
        for _ in range(repeats[name]):
            started = time.perf_counter()
            case()
            timings.append(time.perf_counter() - started)
        samples[name] = timings
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "runs": len(samples),
        "p50_us": round(percentile(samples, 0.50) * 1e6, 1),
        "p99_us": round(percentile(samples, 0.99) * 1e6, 1),
        "mean_us": round(statistics.fmean(samples) * 1e6, 1),
        "min_us": round(min(samples) * 1e6, 1),
    }


# -- comparing the results ------------------------------------------------------------


def differences(expected: Any, got: Any, path: str = "") -> list[str]:
    """Every place where `got` differs from `expected`, one line each."""
    where = path or "(top)"
    if isinstance(expected, dict) and isinstance(got, dict):
        found = []
        for key in sorted(set(expected) | set(got), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in got:
                found.append(f"{sub}: missing")
            elif key not in expected:
                found.append(f"{sub}: unexpected key, {short(got[key])}")
            else:
                found += differences(expected[key], got[key], sub)
        return found
    if isinstance(expected, list) and isinstance(got, list) and len(expected) != len(got):
        return [
            f"{where}: expected {len(expected)} items, got {len(got)}: "
            f"{short(expected)} -> {short(got)}"
        ]
    if type(expected) is not type(got) or expected != got:
        return [f"{where}: expected {short(expected)}, got {short(got)}"]
    return []


def short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def comparison(expected: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    found = differences(expected, got)
    return {
        "matches": not found,
        "difference_count": len(found),
        "differences": found[:MAX_DIFFERENCES],
    }


def compare_all(env: str, tenant: str, copies: list[Path]) -> dict[str, dict[str, Any]]:
    expected = EnvironmentTree(SAMPLE).resolve(env, tenant).redacted()
    results = {
        "dynaconf": dynaconf_dict(dynaconf_settings(copies)),
        "omegaconf": omegaconf_dict([OmegaConf.load(f) for f in copies]),
        "pyyaml_merge": pyyaml_merge(copies),
    }
    return {name: comparison(expected, got) for name, got in results.items()}


SEMANTICS = {
    "configbus": "mappings merge deeply; scalars and lists replace; !delete removes a key",
    "dynaconf": (
        "merge_enabled: mappings merge deeply, lists concatenate with the lower "
        "layer's items first, no deletion"
    ),
    "omegaconf": "mappings merge deeply; lists replace (the default list merge mode)",
    "pyyaml_merge": "mappings merge deeply; everything else replaces",
}


# -- main -----------------------------------------------------------------------------


def versions() -> dict[str, str]:
    names = ["configbus", "dynaconf", "omegaconf", "PyYAML", "msgspec"]
    return {name.lower(): metadata.version(name) for name in names}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(tenant: str, env: str, repeat: int) -> dict[str, Any]:
    load_before = load_average()
    tree = EnvironmentTree(SAMPLE)
    files = stream_files(tree, env, tenant)
    config = tree.resolve(env, tenant)
    with tempfile.TemporaryDirectory(prefix="configbus-peers-") as scratch:
        copies, changes = tag_free_copy(files, Path(scratch))
        matched = compare_all(env, tenant, copies)
        cold = interleaved(cold_cases(env, tenant, copies), repeat)
        warm_repeats = {"configbus": 10 * repeat, "dynaconf": repeat, "omegaconf": repeat}
        warm = series(warm_cases(env, tenant, copies), warm_repeats)
    systems: dict[str, Any] = {}
    for name, measures in MEASURES.items():
        entry: dict[str, Any] = {"measures": measures, "merge_semantics": SEMANTICS[name]}
        entry["cold"] = summary(cold[name])
        if name in warm:
            entry["warm"] = summary(warm[name])
        entry["result"] = matched.get(name, {"matches": True, "note": "the reference"})
        systems[name] = entry
    return {
        "benchmark": "resolution_peers",
        # Other work on the machine inflates every figure: the load says how busy it was.
        "run": to_data(RunInfo.here()),
        "loadavg": {"before": load_before, "after": load_average()},
        "versions": versions(),
        "stream": {
            "tenant": tenant,
            "env": env,
            "layers": len(files),
            "files": [str(f.relative_to(SAMPLE)) for f in files],
            "leaf_keys": count_leaves(config.data),
            "canonical_json_bytes": len(config.canonical_json),
        },
        "peer_input": {
            "note": (
                "Dynaconf, OmegaConf and the PyYAML reference read a tag-free copy of the "
                "same files: '!secret NAME' replaced by the string '<secret:NAME>', "
                "'key: !delete' lines and the top-level 'extends:' line dropped; configbus "
                "reads the original files with their tags"
            ),
            **changes,
        },
        "repeat": repeat,
        "method": {
            "cold": "interleaved rounds, gc.collect() before every timed call",
            "warm": "one back-to-back series per case; configbus runs 10x the rounds",
        },
        "systems": systems,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenant", default="aurora-records")
    parser.add_argument("--env", default="prod")
    parser.add_argument("--repeat", type=int, default=200, help="rounds per case")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    result = run(args.tenant, args.env, args.repeat)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "resolution_peers.json").write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
