"""Sealed secrets against the real Kafka and Redis: a service reads a secret that an
operator set, the plaintext shows up nowhere else (topics, logs, spans, acks, cache
files, command output), a ciphertext moved to another tenant or tampered with is
refused with the rest of the config applied, rotation retires the old version only
once every live instance runs the new one, and re-keying and re-wrapping under load
never make a reader fail."""

from __future__ import annotations

import asyncio
import base64
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
import yaml
from helpers import Setup, call_main, started, subscriber_settings, topic_options, wait_until

from configbus.bus import Producer, read_to_end
from configbus.crypto import OPERATOR, LocalKeyProvider, SigningKey, TrustedKey, generate_keypair
from configbus.crypto.secrets import SecretReader
from configbus.errors import SecretError
from configbus.events import Ack, open_note
from configbus.ops.secrets import StoreBook, TreeBook, fleet_has, set_secret
from configbus.publisher import Daemon
from configbus.store import TenantStore
from configbus.subscriber import ConfigSubscriber
from configbus.tree.resolved import ResolvedConfig
from configbus.tree.sealed import secrets_file

pytestmark = pytest.mark.integration

TENANT, OTHER, ENV = "aurora-records", "helix-audio", "prod"
KEY = "database.postgresql.password"
NAME = "tenants/aurora-records/postgres_password"
OTHER_NAME = "tenants/helix-audio/postgres_password"
JWT = "jwt/signing_key"  # referenced by every tenant's prod stream


def kek() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def key_file(path: Path, tenants: dict[str, dict[str, str]], current: dict[str, str]) -> Path:
    document = {
        "tenants": {t: {"current": current[t], "keys": keys} for t, keys in tenants.items()}
    }
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    path.chmod(0o600)
    return path


@pytest.fixture
def setup(tmp_path: Path, kafka_bootstrap: str, redis_db_url: str) -> Setup:
    world = Setup.create(tmp_path, kafka_bootstrap)
    world.redis_url = redis_db_url
    return world


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, dict[str, str]]:
    """Each tenant's KEKs: the operator's file holds them all, a service only its own."""
    return {TENANT: {"ar-1": kek()}, OTHER: {"ha-1": kek()}, "nimbus-fm": {"nf-1": kek()}}


def operator_of(setup: Setup, tmp_path: Path) -> Path:
    """An operator key of the test's stream ("oncall"), added to the trust file: it
    signs the audit note of a secret's read. Its key file."""
    private, _ = generate_keypair("oncall", tmp_path / "operators")
    public = SigningKey.load(private, "oncall").public
    entry = TrustedKey(public, frozenset({TENANT}), frozenset({ENV}), OPERATOR, 3600)
    setup.trust = setup.trust.with_key(entry)
    setup.trust_path.write_text(setup.trust.dump(), encoding="utf-8")
    return private


def operator_keys(tmp_path: Path, keys: dict[str, dict[str, str]]) -> Path:
    current = {tenant: next(iter(found)) for tenant, found in keys.items()}
    return key_file(tmp_path / "operator-keks.yml", keys, current)


def service_keys(tmp_path: Path, keys: dict[str, dict[str, str]], tenant: str) -> LocalKeyProvider:
    path = key_file(
        tmp_path / f"{tenant}-keks.yml", {tenant: keys[tenant]}, {tenant: next(iter(keys[tenant]))}
    )
    return LocalKeyProvider.from_file(path)


def value_file(tmp_path: Path, value: str) -> Path:
    path = tmp_path / f"value-{uuid.uuid4().hex[:6]}"
    path.write_text(value, encoding="utf-8")
    return path


@pytest.fixture
async def daemon(
    setup: Setup, tmp_path: Path, keys: dict[str, dict[str, str]]
) -> AsyncIterator[Daemon]:
    running = Daemon(setup.settings(secret_keys=operator_keys(tmp_path, keys), secret_interval=0.5))
    await started(await running.start())
    yield running
    await running.stop()


async def subscribers(
    setup: Setup, tmp_path: Path, provider: LocalKeyProvider, count: int, tenant: str = TENANT
) -> list[ConfigSubscriber]:
    started_ = []
    for index in range(count):
        settings = subscriber_settings(
            setup,
            tenant,
            ENV,
            secret_keys=provider,
            cache_dir=tmp_path / f"cache-{tenant}-{index}",
        )
        started_.append(await ConfigSubscriber(tenant, ENV, settings=settings).start())
    return started_


async def wait_for_secret_version(
    fleet: list[ConfigSubscriber], key: str, version: int, timeout: float = 30.0
) -> None:
    await wait_until(
        lambda: all(s.config.secret_version(key) >= version for s in fleet),
        timeout,
        what=f"every subscriber to carry v{version} of {key}",
    )


async def test_a_service_reads_a_secret_and_its_plaintext_is_nowhere_else(
    setup: Setup,
    tmp_path: Path,
    keys: dict[str, dict[str, str]],
    daemon: Daemon,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    spans: object,
) -> None:
    """The plaintext scan: set, read by three subscribers, rotate with the fleet
    gate and a retire command, every read-only command; then no topic, log line,
    span, ack, cache file or command output holds either plaintext."""
    caplog.set_level("DEBUG")
    first, second = f"pw-{uuid.uuid4().hex}", f"pw-{uuid.uuid4().hex}"
    keyfile = operator_keys(tmp_path, keys)
    outputs: list[str] = []

    async def run(*args: str | Path) -> int:
        code, out, err = await call_main(capsys, *args)
        outputs.extend([out, err])
        return code

    assert await run(
        "secret", "set", TENANT, ENV, NAME, "--root", setup.root,
        "--from-file", value_file(tmp_path, first), "--keys", keyfile, "--reason", "INC-1",
    ) == 0  # fmt: skip
    fleet = await subscribers(setup, tmp_path, service_keys(tmp_path, keys, TENANT), 3)
    try:
        await wait_for_secret_version(fleet, KEY, 1)
        assert {s.config.secret(KEY) for s in fleet} == {first}

        marker = tmp_path / "retired.txt"
        assert await run(
            "secret", "rotate", TENANT, ENV, NAME, "--root", setup.root, "--keys", keyfile,
            "--from-file", value_file(tmp_path, second), "--retire-after-ack",
            "--max-wait", "60s", "--retire-command",
            f"echo $CONFIGBUS_SECRET $CONFIGBUS_RETIRED_VERSIONS $CONFIGBUS_VERSION > {marker}",
            "--trust", setup.trust_path, *topic_options(setup),
        ) == 0  # fmt: skip
        assert marker.read_text().split() == [NAME, "1", "2"]
        assert [s.config.secret(KEY) for s in fleet] == [second] * 3
        records = await TreeBook(setup.root).read(TENANT, ENV)
        assert records[NAME].live_versions == (2,)  # v1 retired
        await wait_until(
            lambda: all(s.config.get(KEY).versions == (2,) for s in fleet), 30,
            what="the retirement to reach the subscribers",
        )  # fmt: skip

        render_options = [
            "--redis", setup.redis_url or "", "--trust", setup.trust_path,
            "--bootstrap-servers", setup.kafka.bootstrap_servers,
        ]  # fmt: skip
        for args in (
            ("secret", "list", "--root", setup.root),
            ("secret", "list", TENANT, ENV, "--root", setup.root, "--json"),
            ("render", TENANT, ENV, "--root", setup.root, *render_options),
            ("render", TENANT, ENV, "--root", setup.root, "--format", "json", *render_options),
            ("explain", TENANT, ENV, KEY, "--root", setup.root, *render_options),
            ("history", TENANT, ENV, "--trust", setup.trust_path, *topic_options(setup)),
            ("rollout", "status", TENANT, ENV, "--trust", setup.trust_path, *topic_options(setup)),
        ):
            assert await run(*args) == 0, outputs[-1]
        oncall = operator_of(setup, tmp_path)
        code, shown, err = await call_main(
            capsys, "secret", "get", TENANT, ENV, NAME, "--root", setup.root, "--keys", keyfile,
            "--reason", "INC-2 check the password", "--trust", setup.trust_path,
            "--key", oncall, *topic_options(setup),
        )  # fmt: skip
        assert (code, shown) == (0, second)  # its purpose: printed on request, and audited
        outputs.append(err)
        cache = [p.read_bytes() for s in fleet for p in s.settings.cache_dir.iterdir()]  # type: ignore[union-attr]
        assert cache, "the subscribers wrote no cache"
    finally:
        for subscriber in fleet:
            await subscriber.stop()

    topics = [*setup.tenant_topics(), setup.topics.audit, setup.topics.acks, setup.topics.state]
    on_the_bus = [r.value or b"" async for r in read_to_end(setup.kafka, topics)]
    notes = [open_note(v, setup.trust)[0] for v in on_the_bus if b"secret_read" in v]
    assert [(n.action, n.subject, n.version) for n in notes] == [("secret_read", NAME, 2)]
    exported = spans.get_finished_spans()  # type: ignore[attr-defined]
    assert exported, "no spans were exported"
    span_text = "\n".join(
        f"{s.name} {dict(s.attributes or {})} {[(e.name, e.attributes) for e in s.events]}"
        for s in exported
    )
    files = [p.read_bytes() for p in setup.root.rglob("*") if p.is_file()]
    for plaintext in (first, second):
        raw = plaintext.encode()
        assert not any(raw in value for value in on_the_bus), "plaintext on the bus"
        assert raw not in caplog.text.encode(), "plaintext in the logs"
        assert raw not in span_text.encode(), "plaintext in a span"
        assert not any(raw in blob for blob in cache), "plaintext in a cache file"
        assert not any(raw in blob for blob in files), "plaintext in the tree"
        assert not any(plaintext in text for text in outputs), "plaintext in command output"
    assert any(b'"$sealed"' in value for value in on_the_bus), "no ciphertext travelled"


async def test_a_ciphertext_moved_to_another_tenant_or_tampered_with_is_refused_alone(
    setup: Setup, tmp_path: Path, keys: dict[str, dict[str, str]], daemon: Daemon
) -> None:
    """Secrets in the Redis store: tenant B's service cannot open A's ciphertext copied
    into B's stream, nor a ciphertext with one byte flipped; it names the secret, not a
    value, and the rest of each config applies."""
    provider = LocalKeyProvider.from_file(operator_keys(tmp_path, keys))
    plaintext = f"pw-{uuid.uuid4().hex}"
    async with TenantStore(setup.redis_url or "") as store:
        book = StoreBook(store)
        record = await set_secret(book, provider, TENANT, ENV, NAME, plaintext.encode(), actor="op")
        ours = await subscribers(setup, tmp_path, service_keys(tmp_path, keys, TENANT), 1)
        theirs = await subscribers(setup, tmp_path, service_keys(tmp_path, keys, OTHER), 1, OTHER)
        try:
            await wait_for_secret_version(ours, KEY, 1)
            assert ours[0].config.secret(KEY) == plaintext
            # Tenant B's key cannot open A's secret, whatever stream it claims.
            with pytest.raises(SecretError):
                SecretReader(service_keys(tmp_path, keys, OTHER), TENANT, ENV).open(
                    NAME, record.versions
                )
            # A's ciphertext copied under B's name, into B's store: published, refused on read.
            moved = type(record)(OTHER_NAME, record.versions, record.created, record.rotated)
            await book.write(OTHER, ENV, [moved], actor="mallory", reason="copy")
            before = theirs[0].version
            await wait_until(lambda: theirs[0].version > before, 30, what="B's next version")
            with pytest.raises(SecretError) as refused:
                theirs[0].config.secret(KEY)
            assert OTHER_NAME in str(refused.value) and plaintext not in str(refused.value)
            assert theirs[0].config.get("database.postgresql.cluster.port") == 5432  # applied
            # One byte of A's own ciphertext flipped in the store.
            text = record.versions[0]
            flipped = text[:-3] + ("A" if text[-3] != "A" else "B") + text[-2:]
            await book.write(TENANT, ENV, [type(record)(NAME, (flipped,), record.created)])
            version = ours[0].version
            await wait_until(lambda: ours[0].version > version, 30, what="A's next version")
            with pytest.raises(SecretError, match="tampered"):
                ours[0].config.secret(KEY)
            assert ours[0].config.get("database.postgresql.cluster.port") == 5432
        finally:
            for subscriber in ours + theirs:
                await subscriber.stop()


async def test_rotation_keeps_the_old_version_while_an_instance_has_not_applied_the_new(
    setup: Setup,
    tmp_path: Path,
    keys: dict[str, dict[str, str]],
    daemon: Daemon,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Two instances apply the rotation; a third refuses it (its validator says no) and
    a fourth crashed after its last ack: after --max-wait nothing is retired, the
    command does not run, and both are named."""
    keyfile = operator_keys(tmp_path, keys)
    await call_main(
        capsys, "secret", "set", TENANT, ENV, NAME, "--root", setup.root, "--keys", keyfile,
        "--generate", "32",
    )  # fmt: skip
    provider = service_keys(tmp_path, keys, TENANT)
    fleet = await subscribers(setup, tmp_path, provider, 2)
    stubborn = ConfigSubscriber(
        TENANT, ENV, settings=subscriber_settings(setup, TENANT, ENV, secret_keys=provider)
    )

    def refuse_v2(config: ResolvedConfig) -> bool:
        return config.secret_version(KEY) <= 1

    stubborn.add_validator(refuse_v2)
    await stubborn.start()
    crashed = f"{TENANT}.{ENV}.crashed"
    await _ack(setup, crashed, fleet[0].version)  # heard a moment ago, never again
    try:
        await wait_for_secret_version([*fleet, stubborn], KEY, 1)
        marker = tmp_path / "ran"
        code, out, err = await call_main(
            capsys, "secret", "rotate", TENANT, ENV, NAME, "--root", setup.root, "--keys",
            keyfile, "--retire-after-ack", "--max-wait", "4s",
            "--retire-command", f"touch {marker}",
            "--trust", setup.trust_path, *topic_options(setup),
        )  # fmt: skip
        assert code == 1, out + err
        assert "not retired" in err
        assert stubborn.settings.instance_id in err and "refused" in err
        assert crashed in err
        assert not marker.exists()
        assert (await TreeBook(setup.root).read(TENANT, ENV))[NAME].live_versions == (2, 1)
        await wait_for_secret_version(fleet, KEY, 2)
        assert stubborn.config.secret(KEY) == stubborn.config.secret(KEY, version=1)
        check = await fleet_has(_bus(setup), setup.topics, setup.trust, [(TENANT, ENV)], NAME, 2)
        assert {h.instance for h in check.holdouts} == {stubborn.settings.instance_id, crashed}
    finally:
        for subscriber in [*fleet, stubborn]:
            await subscriber.stop()
    # Stopped on purpose: they leave the fleet; the crashed one still holds it up.
    check = await fleet_has(_bus(setup), setup.topics, setup.trust, [(TENANT, ENV)], NAME, 2)
    assert [h.instance for h in check.holdouts] == [crashed]


def _bus(setup: Setup):  # type: ignore[no-untyped-def]
    from configbus.bus import KafkaBus

    return KafkaBus(setup.kafka)


async def _ack(setup: Setup, instance: str, version: int) -> None:
    """An applied ack of `instance`, as a subscriber would have sent it just now."""
    import time

    now = time.time_ns()
    ack = Ack(
        tenant=TENANT, env=ENV, version=version, instance=instance, service="crashed-svc",
        status="applied", received_at=now, applied_at=now,
    )  # fmt: skip
    async with Producer(setup.kafka) as producer:
        await producer.send_and_wait(setup.topics.acks, msgspec.msgpack.encode(ack), key=ack.key)


async def test_rekey_rewrap_and_rotation_under_load_never_fail_a_reader(
    setup: Setup,
    tmp_path: Path,
    keys: dict[str, dict[str, str]],
    daemon: Daemon,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Services that hold the tenant's old and new KEK read the secret in a loop while
    the operator re-keys the data key, moves to the new KEK (re-wrap) and rotates an
    environment-wide secret: every read answers, with a value that was set."""
    keys[TENANT]["ar-2"] = kek()  # the new KEK, given to services first
    old = key_file(tmp_path / "old.yml", keys, {TENANT: "ar-1", OTHER: "ha-1", "nimbus-fm": "nf-1"})
    new = key_file(tmp_path / "new.yml", keys, {TENANT: "ar-2", OTHER: "ha-1", "nimbus-fm": "nf-1"})
    values = [f"pw-{uuid.uuid4().hex}" for _ in range(3)]
    await call_main(
        capsys, "secret", "set", TENANT, ENV, NAME, "--root", setup.root, "--keys", old,
        "--from-file", value_file(tmp_path, values[0]),
    )  # fmt: skip
    await call_main(
        capsys, "secret", "set", "-", ENV, JWT, "--root", setup.root, "--keys", old,
        "--generate", "32",
    )  # fmt: skip
    provider = LocalKeyProvider.from_file(key_file(
        tmp_path / "svc.yml", {TENANT: keys[TENANT]}, {TENANT: "ar-2"}
    ))  # fmt: skip
    fleet = await subscribers(setup, tmp_path, provider, 3)
    await wait_for_secret_version(fleet, KEY, 1)
    # The two secrets were set one after the other: the second may reach the fleet in
    # a version of its own, after the first.
    await wait_for_secret_version(fleet, "security.jwt.signing_key", 1)
    failures: list[str] = []
    reads = 0
    seen: set[str] = set()
    stop = asyncio.Event()

    async def read_forever(subscriber: ConfigSubscriber) -> None:
        nonlocal reads
        while not stop.is_set():
            try:
                seen.add(subscriber.config.secret(KEY))
                subscriber.config.secret("security.jwt.signing_key")
                reads += 1
            except SecretError as exc:
                failures.append(str(exc))
            await asyncio.sleep(0)

    readers = [asyncio.create_task(read_forever(s)) for s in fleet]
    try:
        for args in (
            ("secret", "rekey", TENANT, ENV, "--keys", old),
            ("secret", "rewrap", "-", ENV, "--keys", new),
            ("secret", "rotate", TENANT, ENV, NAME, "--keys", new,
             "--from-file", value_file(tmp_path, values[1])),
            ("secret", "rotate", "-", ENV, JWT, "--keys", new, "--generate", "32"),
        ):  # fmt: skip
            before = [s.version for s in fleet]
            code, out, err = await call_main(capsys, *args, "--root", setup.root)
            assert code == 0, out + err
            await wait_until(
                lambda before=before: all(
                    s.version > v for s, v in zip(fleet, before, strict=True)
                ),
                30, what=f"the subscribers to apply `{' '.join(args[:2])}`",
            )  # fmt: skip
    finally:
        stop.set()
        await asyncio.gather(*readers)
        for subscriber in fleet:
            await subscriber.stop()
    assert failures == []
    assert reads > 100
    assert seen <= set(values[:2]) and values[1] in seen
    texts = (await TreeBook(setup.root).read(TENANT, ENV))[NAME].versions
    assert all(".ar-2." in text for text in texts)  # every data key now wrapped by the new KEK


async def test_the_daemon_rotates_by_policy_and_retires_once_the_fleet_has_it(
    setup: Setup,
    tmp_path: Path,
    keys: dict[str, dict[str, str]],
    daemon: Daemon,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A secret with rotate_every, kept in the tenant store: the daemon seals a new
    generated version when due, keeps the old one until both running instances apply
    it, then retires it."""
    keyfile = operator_keys(tmp_path, keys)
    code, _, err = await call_main(
        capsys, "secret", "set", TENANT, ENV, NAME, "--root", setup.root, "--keys", keyfile,
        "--generate", "24", "--rotate-every", "3s", "--redis", setup.redis_url or "",
    )  # fmt: skip
    assert code == 0, err
    fleet = await subscribers(setup, tmp_path, service_keys(tmp_path, keys, TENANT), 2)
    try:
        await wait_for_secret_version(fleet, KEY, 1)
        first = fleet[0].config.secret(KEY)
        await wait_for_secret_version(fleet, KEY, 2, timeout=60)
        assert fleet[0].config.secret(KEY) != first
        async with TenantStore(setup.redis_url or "") as store:
            book = StoreBook(store)

            async def retired() -> bool:
                return (await book.read(TENANT, ENV))[NAME].live_versions[-1] >= 2

            deadline = asyncio.get_running_loop().time() + 60
            while not await retired():
                assert asyncio.get_running_loop().time() < deadline, "v1 never retired"
                await asyncio.sleep(0.2)
        assert daemon.secrets.rounds > 0
        assert not secrets_file(setup.root, TENANT, ENV).exists()  # the tree was not written
    finally:
        for subscriber in fleet:
            await subscriber.stop()


@pytest.fixture(autouse=True)
def _no_inherited_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CONFIGBUS_KEK_") or name == "CONFIGBUS_SECRET_KEYS":
            monkeypatch.delenv(name)
