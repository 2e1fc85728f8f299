"""Publisher benchmarks against a real broker.

    python benchmarks/publish.py [--edits 50] [--tenants 1000,10000] [--out DIR]

1. Latency, one stream: a file under the watched tree is rewritten; we time file
   write -> detection (watchfiles), detection -> Kafka commit acknowledged, and the
   sum, p50/p99 over `--edits` edits, with the daemon running in this process.
2. Fan-out: a tree with N tenants, each running dev. One edit of dev/dev.yml, then
   every tenant's dev stream is published: time until the last transaction commits,
   events per second, and where the time goes (resolve + validate + sign, versus
   Kafka). Topic creation and the first publication are timed apart.
3. Memory: resident set of a daemon process holding N tenants x 3 environments after
   its first reconcile, and after a restart (recovery from Kafka).

One broker keeps about three files open per partition, and this machine's hard limit
is 20,000 open files, so a single local broker holds about 5,000 tenant topics: the
default sizes stay below that (10,000 tenants needs the three-broker set-up).

Starts Kafka and Redis through deploy/local unless CONFIGBUS_BOOTSTRAP_SERVERS and
CONFIGBUS_REDIS_URL name running ones. Writes results/publish.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from harness import RunInfo, percentile, to_data
from services import kafka_and_redis

from configbus.bus import Admin, KafkaSettings, Producer, TopicNames
from configbus.crypto import SigningKey, generate_keypair
from configbus.events import Cause
from configbus.publisher import Change, Daemon, Publisher, PublisherSettings
from configbus.tree import EnvironmentTree

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "environments"


def ms(samples: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(samples, 0.5), 2),
        "p99_ms": round(percentile(samples, 0.99), 2),
        "max_ms": round(max(samples), 2),
        "mean_ms": round(statistics.fmean(samples), 2),
    }


def unique_topics() -> TopicNames:
    tag = uuid.uuid4().hex[:8]
    return TopicNames(prefix=f"bench{tag}.", audit=f"bench{tag}-audit", acks=f"bench{tag}-acks")


def new_key(folder: Path) -> tuple[Path, str]:
    kid = "bench-" + uuid.uuid4().hex[:6]
    private, _ = generate_keypair(kid, folder)
    return private, kid


async def latency(servers: str, edits: int, scratch: Path) -> dict[str, Any]:
    root = scratch / "latency" / "environments"
    shutil.copytree(SAMPLE, root)
    private, kid = new_key(scratch / "keys-latency")
    settings = PublisherSettings.build(
        root=str(root),
        bootstrap_servers=servers,
        signing_key=str(private),
        kid=kid,
        topic_prefix=unique_topics().prefix,  # the transactional id derives from it
        environ={},
    )
    target = root / "tenants" / "aurora-records" / "prod.yml"
    original = target.read_text()
    detect, publish, total = [], [], []
    async with Daemon(settings) as daemon:
        await asyncio.wait_for(daemon.ready.wait(), 60)
        committed: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        inner = daemon.publisher.publish

        async def timed(streams: Any, change: Change) -> Any:
            report = await inner(streams, change)
            if report.published:
                await committed.put((change.detected_at, time.time_ns()))
            return report

        daemon.publisher.publish = timed  # type: ignore[method-assign]
        # A fresh broker's JVM is several times slower for its first seconds of
        # transactions: warm it (and our caches) up before measuring.
        warm_until, edit = time.monotonic() + 15, 0
        while time.monotonic() < warm_until or edit < 5:
            target.write_text(original.replace("max_size: 250", f"max_size: {300 + edit}"))
            await asyncio.wait_for(committed.get(), 30)
            edit += 1
        for _ in range(edits):
            edit += 1
            written = time.time_ns()
            target.write_text(original.replace("max_size: 250", f"max_size: {300 + edit}"))
            detected_at, acked_at = await asyncio.wait_for(committed.get(), 30)
            detect.append((detected_at - written) / 1e6)
            publish.append((acked_at - detected_at) / 1e6)
            total.append((acked_at - written) / 1e6)
    return {
        "edits": edits,
        "write_to_detect": ms(detect),
        "detect_to_commit_ack": ms(publish),
        "write_to_commit_ack": ms(total),
        "debounce_ms": settings.debounce_ms,
        "step_ms": settings.step_ms,
    }


def fleet_tree(root: Path, tenants: int) -> None:
    shutil.copytree(SAMPLE, root, ignore=shutil.ignore_patterns("tenants"))
    for n in range(tenants):
        tenant = f"tenant-{n:05d}"
        folder = root / "tenants" / tenant
        folder.mkdir(parents=True)
        folder.joinpath("tenant.yml").write_text(
            f"tenant: {tenant}\nenvironments:\n  dev:\n    overrides: [local]\n"
            "  staging:\n    overrides: []\n  prod:\n    overrides: [scaling]\n"
        )
        folder.joinpath("dev.yml").write_text(
            f"database:\n  postgresql:\n    database: {tenant.replace('-', '_')}\n"
            f"    connection_pool:\n      max_size: {20 + n % 50}\n"
        )


async def fanout(servers: str, tenants: int, scratch: Path) -> dict[str, Any]:
    root = scratch / f"fanout-{tenants}" / "environments"
    fleet_tree(root, tenants)
    private, kid = new_key(scratch / f"keys-{tenants}")
    tree = EnvironmentTree(root)
    kafka = KafkaSettings(servers, client_id="configbus-bench")
    topics = unique_topics()
    dev_streams = [(t, "dev") for t in tree.tenants()]
    result: dict[str, Any] = {"tenants": tenants, "events": len(dev_streams)}
    async with Admin(kafka) as admin, Producer(kafka, transactional_id=kid) as producer:
        started = time.perf_counter()
        await admin.ensure_topics([topics.tenant_topic(t) for t, _ in dev_streams], compact=True)
        await admin.ensure_topics([topics.audit], compact=False)
        result["create_topics_s"] = round(time.perf_counter() - started, 2)
        publisher = Publisher(tree, SigningKey.load(private, kid), producer, admin, topics)

        started = time.perf_counter()
        first = await publisher.publish(dev_streams, Change(time.time_ns(), Cause(reason="v1")))
        result["first_publication_s"] = round(time.perf_counter() - started, 2)
        # Freshly created partitions take a while to settle (leader elections, then
        # NotLeaderForPartition retries); a second round shows when they have.
        started = time.perf_counter()
        dev_file = root / "dev" / "dev.yml"
        text = dev_file.read_text()
        dev_file.write_text(text.replace("\nfeature_flags:\n", "\nfeature_flags:\n  warm: true\n"))
        await publisher.publish(dev_streams, Change(time.time_ns(), Cause(reason="warm-up")))
        result["second_publication_s"] = round(time.perf_counter() - started, 2)

        flag = "\nfeature_flags:\n  fanout: true\n"
        dev_file.write_text(text.replace("\nfeature_flags:\n", flag))
        prepare_s = 0.0
        inner = publisher._prepare

        def timed_prepare(*args: Any) -> Any:
            nonlocal prepare_s
            began = time.perf_counter()
            try:
                return inner(*args)
            finally:
                prepare_s += time.perf_counter() - began

        publisher._prepare = timed_prepare  # type: ignore[method-assign]
        started = time.perf_counter()
        report = await publisher.publish(dev_streams, Change(time.time_ns(), Cause(reason="edit")))
        elapsed = time.perf_counter() - started
        # One broker keeps ~3 files open per partition: free them for the next run.
        await admin.delete_topics([*publisher._known_topics])
    if len(report.published) != len(dev_streams) or len(first.published) != len(dev_streams):
        raise RuntimeError(f"expected {len(dev_streams)} events, got {report.summary()}")
    result.update(
        {
            "edit_to_all_acked_s": round(elapsed, 3),
            "events_per_s": round(len(dev_streams) / elapsed),
            "resolve_validate_sign_s": round(prepare_s, 3),
            "kafka_s": round(elapsed - prepare_s, 3),
        }
    )
    return result


MEMORY_PROBE = """
import asyncio, os, sys
from configbus.publisher import Daemon, PublisherSettings
async def main():
    settings = PublisherSettings.build(root=sys.argv[1], bootstrap_servers=sys.argv[2],
        signing_key=sys.argv[3], kid=sys.argv[4], topic_prefix=sys.argv[5], environ={})
    async with Daemon(settings) as daemon:
        await asyncio.wait_for(daemon.ready.wait(), 600)
        streams = len(daemon.publisher.states)
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    print(streams, fields["VmRSS"].split()[0], fields["VmHWM"].split()[0])
asyncio.run(main())
"""


def memory(servers: str, tenants: int, scratch: Path) -> dict[str, Any]:
    root = scratch / f"memory-{tenants}" / "environments"
    fleet_tree(root, tenants)
    private, kid = new_key(scratch / f"keys-memory-{tenants}")
    prefix = unique_topics().prefix
    args = [sys.executable, "-c", MEMORY_PROBE, str(root), servers, str(private), kid, prefix]
    runs = []
    for _ in range(2):  # the first run publishes everything; the second only recovers
        started = time.perf_counter()
        output = subprocess.run(args, capture_output=True, text=True, check=True, timeout=900)
        streams, rss_kb, peak_kb = output.stdout.split()
        runs.append(
            {
                "streams": int(streams),
                "rss_mib": round(int(rss_kb) / 1024, 1),
                "peak_mib": round(int(peak_kb) / 1024, 1),
                "start_to_ready_s": round(time.perf_counter() - started, 1),
            }
        )
    asyncio.run(_delete_prefixed(servers, prefix))
    return {"tenants": tenants, "first_start": runs[0], "restart": runs[1]}


async def _delete_prefixed(servers: str, prefix: str) -> None:
    async with Admin(KafkaSettings(servers)) as admin:
        await admin.delete_topics(t for t in await admin.topics() if t.startswith(prefix))


async def main_async(args: argparse.Namespace, servers: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="configbus-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        result: dict[str, Any] = {"benchmark": "publish", "run": to_data(RunInfo.here())}
        result["latency_one_stream"] = await latency(servers, args.edits, scratch)
        print(json.dumps(result["latency_one_stream"]), flush=True)
        result["fanout"] = []
        for tenants in args.tenants:
            result["fanout"].append(await fanout(servers, tenants, scratch))
            print(json.dumps(result["fanout"][-1]), flush=True)
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=50)
    parser.add_argument(
        "--tenants", type=lambda s: [int(n) for n in s.split(",")], default=[100, 1000, 4000]
    )
    parser.add_argument("--memory-tenants", type=int, default=4000, help="0 to skip")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    with kafka_and_redis() as (servers, _):
        result = asyncio.run(main_async(args, servers))
        if args.memory_tenants:
            with tempfile.TemporaryDirectory(prefix="configbus-bench-") as scratch:
                result["daemon_memory"] = memory(servers, args.memory_tenants, Path(scratch))
            print(json.dumps(result["daemon_memory"]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "publish.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
