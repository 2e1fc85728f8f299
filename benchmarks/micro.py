"""Micro-benchmarks of the hot paths, with pytest-benchmark (the `bench` extra).

    pytest benchmarks/micro.py --benchmark-only [--benchmark-max-time 0.2]   # or make bench-micro

- apply: one verified event through the subscriber's own handling path (verify the
  Ed25519 signature, decode, check the hash, freeze, swap, one no-op callback), no
  Kafka, tracing off, for the sample's aurora-records/prod config (~11 KB of canonical
  JSON) and a ~64 KB one (benchmarks/subscribe.py's generator);
- verify: `open_envelope` alone (signature, decode, inflate, hash) at ~11 KB;
- build_body and seal: what the publisher does per event after resolving (hash and
  compress the config; encode and sign the body) at ~11 KB;
- resolve: one stream (aurora-records/prod) from a warm tree, with its hash; and with
  every secret it references sealed (attached at resolution);
- open secret: `config.secret(key)` with the data key unwrapped before (warm), and a
  reader's first read (cold: unwrap the data key with the KEK, then decrypt).

`make bench-micro` runs them in a quick mode (well under a minute), saves each run under
results/quick/micro/ and fails when a median is more than MICRO_FAIL (default 50 %)
slower than the previous saved run there: how CI can see a regression on one runner.
`make bench` runs them longer and writes results/micro.json for report.py.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from harness import ENV, KEY, SAMPLE, TENANT, config_document, config_value
from subscribe import config_of_size

from configbus.bus import KafkaSettings, Record
from configbus.chain import ChainHead, open_link, record_digest
from configbus.compliance import gate
from configbus.crypto import SigningKey, TrustStore, generate_keypair
from configbus.events import Cause, EventBody, build_body, open_envelope, seal
from configbus.subscriber import ConfigSubscriber, SubscriberSettings
from configbus.tree import EnvironmentTree

DOCUMENT = config_document()
CONFIGS: dict[str, Callable[[int], bytes]] = {
    "11KB": lambda version: config_value(DOCUMENT, version),
    "64KB": lambda version: config_of_size(64_000, version),
}
# The one key each version changes, as the publisher lists it in every event: a
# subscriber that ran the version before takes its changed paths from there.
CHANGED = {"11KB": (KEY,), "64KB": ("section_0000.key_00",)}


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> SigningKey:
    folder: Path = tmp_path_factory.mktemp("keys")
    private, _ = generate_keypair("micro", folder)
    return SigningKey.load(private, "micro")


def body_of(config_json: bytes, version: int) -> EventBody:
    return build_body(
        tenant=TENANT,
        env=ENV,
        version=version,
        config_json=config_json,
        detected_at=time.time_ns(),
        cause=Cause(reason="bench"),
        changed_paths=CHANGED["11KB" if len(config_json) < 32_000 else "64KB"],
    )


def finish(coroutine: Coroutine[Any, Any, bool]) -> bool:
    """Run a coroutine that never waits (the apply path, without acks or a disk cache)."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return bool(done.value)
    coroutine.close()
    raise RuntimeError("the apply path waited on something")


def rounds(request: pytest.FixtureRequest) -> int:
    """Rounds for a pedantic benchmark: as many as --benchmark-max-time allows at ~0.5 ms."""
    seconds = float(request.config.getoption("benchmark_max_time"))
    return max(100, min(2000, int(seconds * 2000)))


@pytest.mark.parametrize("size", list(CONFIGS))
def test_apply(benchmark: Any, request: pytest.FixtureRequest, key: SigningKey, size: str) -> None:
    settings = SubscriberSettings(
        tenant=TENANT,
        env=ENV,
        kafka=KafkaSettings("127.0.0.1:9"),
        trust=TrustStore.of(key.public),
        instance_id="micro",
        service="micro",
        send_acks=False,
    )
    subscriber = ConfigSubscriber(TENANT, ENV, settings=settings)
    subscriber.on_change("", lambda old, new, paths: None)
    config = CONFIGS[size]
    versions = itertools.count(1)

    def next_record() -> tuple[tuple[Record], dict[str, Any]]:  # not timed
        version = next(versions)
        value = seal(body_of(config(version), version), key)
        return (Record("t", 0, version, ENV.encode(), value, (), 0),), {}

    def apply(record: Record) -> None:
        if not finish(subscriber._handle(record)):
            raise RuntimeError(f"not applied: {subscriber.last_rejection}")

    benchmark.extra_info["config_bytes"] = len(config(1))
    benchmark.pedantic(apply, setup=next_record, rounds=rounds(request), warmup_rounds=10)


def test_verify_11kb(benchmark: Any, key: SigningKey) -> None:
    value, trust = seal(body_of(CONFIGS["11KB"](1), 1), key), TrustStore.of(key.public)
    benchmark(open_envelope, value, trust, stream=(TENANT, ENV))


def test_build_body_11kb(benchmark: Any) -> None:
    config = CONFIGS["11KB"](1)
    benchmark(body_of, config, 1)


def test_seal_11kb(benchmark: Any, key: SigningKey) -> None:
    body = body_of(CONFIGS["11KB"](1), 1)
    benchmark(seal, body, key)


def test_link_audit_record_11kb(benchmark: Any, key: SigningKey) -> None:
    """What the audit chain adds to each published event: its signed link."""
    value = seal(body_of(CONFIGS["11KB"](1), 1), key)
    head = ChainHead("configbus-publisher.bench.")
    benchmark(head.link, b"aurora-records/prod", value, key)


def test_check_audit_link_11kb(benchmark: Any, key: SigningKey) -> None:
    """What `configbus audit verify` does per record: the link's signature and digest."""
    value = seal(body_of(CONFIGS["11KB"](1), 1), key)
    sealed, _ = ChainHead("configbus-publisher.bench.").link(b"a/prod", value, key)
    trust = TrustStore.of(key.public)

    def check() -> bool:
        link, _ = open_link(sealed, trust)
        return link.digest == record_digest(b"a/prod", value)

    assert benchmark(check)


def test_compliance_gate_prod(benchmark: Any) -> None:
    """The prod gate on one resolved config: every blocking rule of its tenant's regimes."""
    tree = EnvironmentTree(SAMPLE)
    config = tree.resolve("prod", "aurora-records")
    regimes = tree.tenant("aurora-records").compliance
    failed = benchmark(gate, config.data, tenant="aurora-records", env="prod", regimes=regimes)
    assert failed == []


def test_resolve_one_stream(benchmark: Any) -> None:
    tree = EnvironmentTree(SAMPLE)
    tree.resolve(ENV, TENANT).hash  # warm the caches

    def resolve() -> str:
        return tree.resolve(ENV, TENANT).hash

    benchmark(resolve)


# -- sealed secrets ----------------------------------------------------------------------
SECRET = "tenants/aurora-records/postgres_password"  # what database.postgresql.password names


@pytest.fixture(scope="module")
def sealed_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[EnvironmentTree, Any]:
    """A copy of the sample tree whose aurora-records/prod stream has every secret it
    references sealed (in its secrets file), and the key provider that sealed them."""
    import asyncio
    import os
    import shutil

    from configbus.crypto import LocalKeyProvider
    from configbus.ops.secrets import TreeBook, set_secret
    from configbus.tree.values import SecretRef

    root = tmp_path_factory.mktemp("sealed") / "environments"
    shutil.copytree(SAMPLE, root)
    provider = LocalKeyProvider({TENANT: ("k1", {"k1": os.urandom(32)})})
    names: set[str] = set()

    def visit(value: Any) -> None:
        if isinstance(value, SecretRef):
            names.add(value.name)
        elif isinstance(value, dict | tuple):
            for child in value.values() if isinstance(value, dict) else value:
                visit(child)

    visit(EnvironmentTree(root).resolve(ENV, TENANT).data)

    async def seal_all() -> None:
        for name in sorted(names):
            await set_secret(
                TreeBook(root), provider, TENANT, ENV, name, os.urandom(24).hex().encode()
            )

    asyncio.run(seal_all())
    return EnvironmentTree(root), provider


def test_resolve_one_stream_with_sealed_secrets(
    benchmark: Any, sealed_tree: tuple[EnvironmentTree, Any]
) -> None:
    """As test_resolve_one_stream, with each of the stream's references carrying its
    sealed value (attached at resolution, hashed with the config)."""
    tree, _ = sealed_tree
    tree.resolve(ENV, TENANT).hash

    def resolve() -> str:
        return tree.resolve(ENV, TENANT).hash

    benchmark(resolve)


def test_open_secret_warm(benchmark: Any, sealed_tree: tuple[EnvironmentTree, Any]) -> None:
    """`config.secret(key)` in a service whose reader has unwrapped the stream's data
    key before: AES-256-GCM decryption of one value."""
    from configbus.crypto import SecretReader
    from configbus.tree.resolved import ResolvedConfig

    tree, provider = sealed_tree
    data = tree.resolve(ENV, TENANT).data
    config = ResolvedConfig(
        data, tenant=TENANT, env=ENV, secrets=SecretReader(provider, TENANT, ENV)
    )
    config.secret("database.postgresql.password")
    benchmark(config.secret, "database.postgresql.password")


def test_open_secret_cold(benchmark: Any, sealed_tree: tuple[EnvironmentTree, Any]) -> None:
    """The first `config.secret(key)` of a reader: unwrap the data key with the KEK
    (a local key here; a KMS call with a KMS provider), then decrypt."""
    from configbus.crypto import SecretReader
    from configbus.tree.resolved import ResolvedConfig

    tree, provider = sealed_tree
    data = tree.resolve(ENV, TENANT).data

    def first_read() -> str:
        reader = SecretReader(provider, TENANT, ENV)
        config = ResolvedConfig(data, tenant=TENANT, env=ENV, secrets=reader)
        return config.secret("database.postgresql.password")

    benchmark(first_read)
