"""Subscriber benchmarks: what applying one event costs, and what a subscriber weighs.

    python benchmarks/subscribe.py [--repeat 300] [--out DIR]

1. Apply cost: verify (Ed25519 over the body), decode, check the config hash, build
   the immutable config, swap, and run one no-op callback, for configs of about
   1 KB, 64 KB and 1 MB of canonical JSON; p50/p99 in microseconds. Measured on the
   subscriber's own handling path, without Kafka, with tracing off (no SDK provider)
   and on (an SDK provider with the batch processor a service would use, exporting to
   memory).
2. Memory: resident set of a process holding a started subscriber (against a real
   broker), above a bare interpreter that has imported aiokafka.

Writes results/subscribe.json; nothing asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import RunInfo, percentile, to_data
from services import kafka_and_redis

from configbus.bus import KafkaSettings, Record, TopicNames
from configbus.crypto import SigningKey, TrustStore, generate_keypair
from configbus.events import Cause, build_body, seal
from configbus.subscriber import ConfigSubscriber, SubscriberSettings
from configbus.tree.values import canonical_json, freeze

SIZES = {"1KB": 1_000, "64KB": 64_000, "1MB": 1_000_000}


def config_of_size(size: int, version: int) -> bytes:
    """Canonical JSON of a plausible nested config of about `size` bytes, in which one
    value changes from version to version (an edit changes a key, not every key)."""
    per_section = 40
    sections = max(1, size // (per_section * 26))
    data = {
        f"section_{s:04d}": {
            f"key_{k:02d}": (version if s == k == 0 else f"value-{s}-{k}")
            for k in range(per_section)
        }
        for s in range(sections)
    }
    return canonical_json(freeze(data))


def records(key: SigningKey, size: int, count: int) -> list[Record]:
    out = []
    for version in range(1, count + 1):
        body = build_body(
            tenant="bench",
            env="prod",
            version=version,
            config_json=config_of_size(size, version),
            detected_at=time.time_ns(),
            cause=Cause(reason="bench"),
            changed_paths=("section_0000.key_00",),  # as the publisher lists it
        )
        out.append(Record("bench", 0, version, b"prod", seal(body, key), (), 0))
    return out


async def apply_cost(key: SigningKey, trust: TrustStore, repeat: int) -> dict[str, Any]:
    settings = SubscriberSettings(
        tenant="bench",
        env="prod",
        kafka=KafkaSettings("127.0.0.1:9"),
        trust=trust,
        instance_id="bench",
        service="bench",
        send_acks=False,
    )
    result: dict[str, Any] = {}
    for label, size in SIZES.items():
        count = repeat if size < 500_000 else max(30, repeat // 10)
        batch = records(key, size, count + 10)
        subscriber = ConfigSubscriber("bench", "prod", settings=settings)
        subscriber.on_change("", lambda old, new, paths: None)
        samples = []
        for index, record in enumerate(batch):
            started = time.perf_counter()
            applied = await subscriber._handle(record)
            elapsed = time.perf_counter() - started
            if not applied:
                raise RuntimeError(f"event {index} was not applied: {subscriber.last_rejection}")
            if index >= 10:  # warm-up
                samples.append(elapsed)
        result[label] = {
            "config_bytes": len(config_of_size(size, 1)),
            "events": len(samples),
            "p50_us": round(percentile(samples, 0.5) * 1e6, 1),
            "p99_us": round(percentile(samples, 0.99) * 1e6, 1),
        }
    return result


MEMORY_PROBE = """
import asyncio, sys
import aiokafka  # the baseline imports it too
def rss():
    with open("/proc/self/status") as status:
        return int(dict(l.split(":", 1) for l in status)["VmRSS"].split()[0])
if sys.argv[1] == "bare":
    print(rss())
    raise SystemExit
from configbus.subscriber import ConfigSubscriber
async def main():
    async with ConfigSubscriber(sys.argv[2], sys.argv[3], bootstrap_servers=sys.argv[4],
            trust=sys.argv[5], topic_prefix=sys.argv[6], acks_topic=sys.argv[7]) as sub:
        print(rss(), sub.version)
asyncio.run(main())
"""


async def publish_one(servers: str, key: SigningKey, topics: TopicNames) -> None:
    from configbus.bus import Admin, Producer

    kafka = KafkaSettings(servers)
    topic = topics.tenant_topic("bench")
    async with Admin(kafka) as admin:
        await admin.ensure_topics([topic], compact=True)
        await admin.ensure_topics([topics.acks], compact=True)
    value = records(key, 64_000, 1)[0].value
    async with Producer(kafka) as producer:
        await producer.send_and_wait(topic, value or b"", key=b"prod")


def memory(servers: str, key: SigningKey, scratch: Path) -> dict[str, Any]:
    tag = f"sbench{int(time.time())}"
    topics = TopicNames(prefix=f"{tag}.", audit=f"{tag}-audit", acks=f"{tag}-acks")
    asyncio.run(publish_one(servers, key, topics))
    trust_file = scratch / "trust.yml"
    trust_file.write_text(TrustStore.of(key.public).dump())
    bare = int(subprocess.check_output([sys.executable, "-c", MEMORY_PROBE, "bare"]))
    args = [
        sys.executable,
        "-c",
        MEMORY_PROBE,
        "sub",
        "bench",
        "prod",
        servers,
        str(trust_file),
        topics.prefix,
        topics.acks,
    ]
    rss, version = subprocess.check_output(args, timeout=120).split()
    return {
        "bare_with_aiokafka_mib": round(bare / 1024, 1),
        "subscriber_mib": round(int(rss) / 1024, 1),
        "above_bare_mib": round((int(rss) - bare) / 1024, 1),
        "config_bytes": len(config_of_size(64_000, 1)),
        "version": int(version),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="configbus-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        private, _ = generate_keypair("bench", scratch / "keys")
        key = SigningKey.load(private, "bench")
        trust = TrustStore.of(key.public)
        result: dict[str, Any] = {"benchmark": "subscribe", "run": to_data(RunInfo.here())}
        result["apply_tracing_off"] = asyncio.run(apply_cost(key, trust, args.repeat))
        print(json.dumps(result["apply_tracing_off"]), flush=True)

        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(InMemorySpanExporter()))
        trace.set_tracer_provider(provider)
        result["apply_tracing_on"] = asyncio.run(apply_cost(key, trust, args.repeat))
        print(json.dumps(result["apply_tracing_on"]), flush=True)
        if not args.no_memory:
            with kafka_and_redis() as (servers, _):
                result["memory"] = memory(servers, key, scratch)
            print(json.dumps(result["memory"]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "subscribe.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
