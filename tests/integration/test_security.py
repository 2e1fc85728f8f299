"""Kafka security against the real secured broker (deploy/local/kafka-secure.sh: SCRAM
users over SASL_SSL, client certificates over mutual TLS, nothing allowed that no ACL
allows). `configbus acl apply` grants each principal its role and nothing more: the
publisher publishes; a service (a SCRAM user, and one with a client certificate) reads
and acknowledges its own tenant's config, but reads no other tenant's topic and writes
none; a wrong password is an authentication error at once. `apply` is idempotent, and a
tenant gone from the tree leaves ACLs that only `apply --prune` removes.

The broker starts once per session (`secure_kafka`); the module's ACLs and publication
are made once (`world`), on topics of its own. The pruning test has its own tree and
topics. Tests poll with a deadline (`wait_until`), never sleep.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Awaitable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from uuid import uuid4

import msgspec
import pytest
from conftest import SecureKafka
from helpers import CLI, SAMPLE_TREE, wait_until

from configbus.bus import Admin, Producer, Record, TopicNames, read_to_end
from configbus.bus.acls import Acl, Operation, PatternType, ResourceType, describe_acls
from configbus.cli import main
from configbus.crypto import SigningKey, TrustStore, generate_keypair
from configbus.errors import AuthorizationError, BusError
from configbus.events import Ack
from configbus.ops.acls import Deployment, desired_acls, is_managed
from configbus.publisher import PublisherSettings, PublishReport, publish_once
from configbus.subscriber import ConfigSubscriber, NoConfigError, SubscriberSettings
from configbus.tree import EnvironmentTree

pytestmark = pytest.mark.integration

AURORA, HELIX = "aurora-records", "helix-audio"
PUBLISHER, SVC_AURORA, SVC_AURORA_TLS, SVC_HELIX, ONCALL = (
    "configbus-publisher",
    "svc-aurora",
    "svc-aurora-tls",  # a client certificate (CN=svc-aurora-tls), not a SCRAM user
    "svc-helix",
    "oncall",
)
DEPLOYMENT = (
    *("--publisher", f"User:{PUBLISHER}"),
    *("--service", f"{AURORA}=User:{SVC_AURORA}"),
    *("--service", f"{AURORA}=User:{SVC_AURORA_TLS}"),
    *("--service", f"{HELIX}=User:{SVC_HELIX}"),
    *("--operator", f"User:{ONCALL}={AURORA}"),
)
SERVICES = pytest.mark.parametrize("service", [SVC_AURORA, SVC_AURORA_TLS], ids=["scram", "mtls"])
WRONG_PASSWORD = "not-the-password-3f9a"
# A subscriber Kafka refuses fails at once; were it to try until its start timeout,
# the tests' own deadline (asyncio.timeout(30)) would fail them first.
DENIED_START_TIMEOUT = 300.0


class Run(NamedTuple):
    """What a CLI run did."""

    code: int
    out: str
    err: str


def configbus(environ: dict[str, str], *args: str | Path) -> Run:
    """``configbus ARGS`` in this process (from a thread, in async tests: it runs its own
    event loop) with the ``CONFIGBUS_*`` variables `environ` and no others. The log
    levels it sets, as the command line does, are put back."""
    out, err = io.StringIO(), io.StringIO()
    aiokafka = logging.getLogger("aiokafka")
    level = aiokafka.level
    with pytest.MonkeyPatch.context() as env, redirect_stdout(out), redirect_stderr(err):
        for name in [name for name in os.environ if name.startswith("CONFIGBUS_")]:
            env.delenv(name)
        for name, value in environ.items():
            env.setenv(name, value)
        try:
            code = main([str(arg) for arg in args])
        finally:
            aiokafka.setLevel(level)
    return Run(code, out.getvalue(), err.getvalue())


def acl(
    secure: SecureKafka,
    root: Path,
    topics: TopicNames,
    *args: str,
    environ: dict[str, str] | None = None,
) -> Run:
    """``configbus acl ARGS`` for the tree `root` and `topics`, with the module's
    deployment, as the admin unless `environ` says otherwise."""
    where = (
        *("--root", root),
        *("--topic-prefix", topics.prefix),
        *("--audit-topic", topics.audit),
        *("--acks-topic", topics.acks),
    )
    return configbus(environ or secure.environ(), "acl", *args, *where, *DEPLOYMENT)


def unique_topics() -> TopicNames:
    uid = uuid4().hex[:8]
    return TopicNames(prefix=f"sec{uid}.tenant.", audit=f"sec{uid}.audit", acks=f"sec{uid}.acks")


def copy_tree(where: Path) -> Path:
    root = where / "environments"
    shutil.copytree(SAMPLE_TREE, root)
    return root


@dataclass(frozen=True)
class World:
    """The module's tree copy and topics, with the deployment's ACLs applied (`applied`:
    the first `acl apply`) and every stream published as the publisher (`report`)."""

    secure: SecureKafka
    root: Path
    topics: TopicNames
    trust_path: Path
    applied: Run
    report: PublishReport

    def acl(self, *args: str, environ: dict[str, str] | None = None) -> Run:
        return acl(self.secure, self.root, self.topics, *args, environ=environ)

    def desired(self) -> set[Acl]:
        """The ACLs `DEPLOYMENT` calls for on this world's tree and topics."""
        flags: dict[str, list[str]] = {"publishers": [], "services": [], "operators": []}
        for flag, value in zip(DEPLOYMENT[::2], DEPLOYMENT[1::2], strict=True):
            flags[f"{flag[2:]}s"].append(value)
        deployment = Deployment.from_flags(**flags)
        tenants = EnvironmentTree(self.root).tenants()
        return desired_acls(deployment, tenants, self.topics)[0]

    def subscriber(
        self, principal: str, tenant: str, variables: dict[str, str] | None = None, **options: Any
    ) -> ConfigSubscriber:
        """A subscriber of `tenant`'s prod stream connecting as `principal`, its settings
        built from that principal's variables (`variables` replacing some), as a
        service's would be."""
        settings = SubscriberSettings.build(
            tenant,
            "prod",
            environ={**self.secure.environ(principal), **(variables or {})},
            trust=self.trust_path,
            instance_id=f"{principal}.{uuid4().hex[:8]}",
            service="integration-test",
            topic_prefix=self.topics.prefix,
            acks_topic=self.topics.acks,
            **options,
        )
        return ConfigSubscriber(tenant, "prod", settings=settings)

    async def records(self, topics: list[str]) -> dict[str, list[Record]]:
        """Every committed record of `topics`, read as the admin."""
        found: dict[str, list[Record]] = {topic: [] for topic in topics}
        async for record in read_to_end(self.secure.kafka(), topics):
            found[record.topic].append(record)
        return found


@pytest.fixture(scope="module")
def world(secure_kafka: SecureKafka, tmp_path_factory: pytest.TempPathFactory) -> World:
    where = tmp_path_factory.mktemp("security")
    root, topics = copy_tree(where), unique_topics()
    kid = f"sec-{uuid4().hex[:8]}"
    private, _ = generate_keypair(kid, where / "keys")
    trust_path = where / "trust.yml"
    trust_path.write_text(TrustStore.of(SigningKey.load(private, kid).public).dump())
    applied = acl(secure_kafka, root, topics, "apply")
    assert applied.code == 0, applied.err
    settings = PublisherSettings.build(
        root=str(root),
        signing_key=str(private),
        kid=kid,
        topic_prefix=topics.prefix,
        audit_topic=topics.audit,
        acks_topic=topics.acks,
        environ=secure_kafka.environ(PUBLISHER),
    )
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:  # no loop left set
        report = runner.run(publish_once(settings, deadline=120))
    return World(secure_kafka, root, topics, trust_path, applied, report)


# -- acl apply ---------------------------------------------------------------------------
async def test_apply_grants_each_principal_its_role(world: World) -> None:
    wanted = world.desired()
    assert world.applied.code == 0
    assert (
        world.applied.out.splitlines()[-1]
        == f"acl apply: {len(wanted)} created, 0 removed, 0 in place"
    )
    async with Admin(world.secure.kafka()) as admin:
        on_cluster = {acl for acl in await describe_acls(admin) if is_managed(acl, world.topics)}
    assert on_cluster == wanted
    # Spot checks of the roles: a service reads only its tenant's topic, by its literal
    # name; the publisher owns every topic under the prefix.
    granted = {(a.principal, a.operation, a.resource_name, a.pattern) for a in on_cluster}
    aurora, helix = world.topics.tenant_topic(AURORA), world.topics.tenant_topic(HELIX)
    assert (f"User:{SVC_AURORA}", Operation.READ, aurora, PatternType.LITERAL) in granted
    assert (f"User:{SVC_AURORA_TLS}", Operation.READ, aurora, PatternType.LITERAL) in granted
    assert not {g for g in granted if g[0] == f"User:{SVC_AURORA}" and g[2] == helix}
    assert not {
        g
        for g in granted
        if g[0] == f"User:{SVC_AURORA}" and g[1] == Operation.WRITE and g[2] != world.topics.acks
    }
    assert (
        f"User:{PUBLISHER}",
        Operation.WRITE,
        world.topics.prefix,
        PatternType.PREFIXED,
    ) in granted


async def test_apply_again_creates_nothing_and_plan_check_passes(world: World) -> None:
    wanted = len(world.desired())
    again = await asyncio.to_thread(world.acl, "apply")
    assert again.code == 0, again.err
    assert again.out.splitlines() == [f"acl apply: 0 created, 0 removed, {wanted} in place"]
    check = await asyncio.to_thread(world.acl, "plan", "--check")
    assert check.code == 0, check.out
    assert check.out.splitlines() == [
        f"0 to create, 0 to remove (apply --prune), {wanted} in place"
    ]


# -- the publisher -----------------------------------------------------------------------
async def test_publisher_principal_publishes_every_stream(world: World) -> None:
    streams = sorted(EnvironmentTree(world.root).streams())
    assert not world.report.failed and not world.report.pending
    assert sorted((t, e) for t, e, _ in world.report.published) == streams
    tenant_topics = sorted({world.topics.tenant_topic(t) for t, _ in streams})
    wanted = [*tenant_topics, world.topics.audit, world.topics.state]

    async def everything_visible() -> dict[str, list[Record]] | None:
        found = await world.records(wanted)  # committed: once the markers are written
        audited = {r.key for r in found[world.topics.audit]}
        return found if len(audited) == len(streams) else None

    found = await wait_until(everything_visible, 30, what="the publication, read as the admin")
    assert {r.key for r in found[world.topics.audit]} == {
        TopicNames.audit_key(t, e) for t, e in streams
    }
    for tenant in {t for t, _ in streams}:
        keys = {r.key for r in found[world.topics.tenant_topic(tenant)]}
        assert keys == {e.encode() for t, e in streams if t == tenant}, tenant
    assert found[world.topics.state], "nothing on the state topic"


async def test_a_principal_without_the_publishers_acls_cannot_publish(
    world: World, tmp_path: Path
) -> None:
    private, _ = generate_keypair("intruder", tmp_path / "keys")
    settings = PublisherSettings.build(
        root=str(world.root),
        signing_key=str(private),
        kid="intruder",
        topic_prefix=world.topics.prefix,
        audit_topic=world.topics.audit,
        acks_topic=world.topics.acks,
        environ=world.secure.environ(SVC_AURORA),
    )
    async with asyncio.timeout(60):  # refused at once, not retried until the deadline
        with pytest.raises(AuthorizationError) as refused:
            await publish_once(settings, deadline=120)
    assert "not authorized (TopicAuthorizationFailedError" in str(refused.value)


# -- a service ---------------------------------------------------------------------------
@SERVICES
async def test_service_applies_its_tenants_config_and_acknowledges(
    world: World, service: str
) -> None:
    tree = EnvironmentTree(world.root)
    async with world.subscriber(service, AURORA) as sub:
        assert sub.version == 1
        assert sub.config.hash == tree.validate(tree.resolve("prod", AURORA)).hash
        instance = sub.settings.instance_id

        async def applied_ack() -> list[Ack]:
            records = (await world.records([world.topics.acks]))[world.topics.acks]
            acks = [msgspec.msgpack.decode(r.value or b"", type=Ack) for r in records]
            return [a for a in acks if a.instance == instance and a.status == "applied"]

        (ack,) = await wait_until(applied_ack, 30, what=f"{service}'s ack, read as the admin")
    assert (ack.tenant, ack.env, ack.version) == (AURORA, "prod", 1)
    assert ack.config_hash == sub.config.hash


@SERVICES
async def test_service_cannot_read_another_tenants_topic(world: World, service: str) -> None:
    helix = world.topics.tenant_topic(HELIX)
    subscriber = world.subscriber(service, HELIX, start_timeout=DENIED_START_TIMEOUT)
    async with asyncio.timeout(30):
        with pytest.raises(NoConfigError) as refused:
            await subscriber.start()
    message = str(refused.value)
    assert "\n" not in message
    assert f"no config for {HELIX}/prod refused" in message
    assert f"connecting to {helix}: not authorized (TopicAuthorizationFailedError" in message

    with pytest.raises(AuthorizationError, match="not authorized") as denied:
        async for _ in read_to_end(world.secure.kafka(service), [helix]):
            pass
    assert helix in str(denied.value) and not denied.value.retriable


@SERVICES
async def test_service_cannot_write_any_tenant_topic(world: World, service: str) -> None:
    topics = [world.topics.tenant_topic(AURORA), world.topics.tenant_topic(HELIX)]
    async with Producer(world.secure.kafka(service)) as producer:
        for topic in [*topics, world.topics.audit]:
            with pytest.raises(AuthorizationError, match=f"sending to {topic}: not authorized"):
                await producer.send_and_wait(topic, b"forged", key=b"prod")
    found = await world.records(topics)
    assert not [r for t in topics for r in found[t] if r.value == b"forged"]


# -- an operator -------------------------------------------------------------------------
async def test_operator_reads_only_its_tenants_topic(world: World) -> None:
    oncall = world.secure.kafka(ONCALL)
    aurora = [r async for r in read_to_end(oncall, [world.topics.tenant_topic(AURORA)])]
    assert {r.key for r in aurora} >= {b"prod"}
    with pytest.raises(AuthorizationError, match="not authorized"):
        async for _ in read_to_end(oncall, [world.topics.tenant_topic(HELIX)]):
            pass


# -- authentication ----------------------------------------------------------------------
async def test_wrong_password_is_an_authentication_error(world: World) -> None:
    wrong = {
        "CONFIGBUS_KAFKA_SASL_PASSWORD": WRONG_PASSWORD,
        "CONFIGBUS_KAFKA_SASL_PASSWORD_FILE": "",  # unset: the password above instead
    }
    kafka = world.secure.kafka(SVC_AURORA, **wrong)
    refused = "refused the login of 'svc-aurora' (SCRAM-SHA-512): authentication failed"
    match = re.escape(refused)
    async with asyncio.timeout(60):  # an error, not a hang
        with pytest.raises(AuthorizationError, match=match) as admin:
            await Admin(kafka).start()
        with pytest.raises(AuthorizationError, match=match):
            await Producer(kafka).start()
        with pytest.raises(AuthorizationError, match=match):
            async for _ in read_to_end(kafka, [world.topics.tenant_topic(AURORA)]):
                pass
        subscriber = world.subscriber(SVC_AURORA, AURORA, wrong, start_timeout=DENIED_START_TIMEOUT)
        with pytest.raises(NoConfigError) as no_config:
            await subscriber.start()
    assert refused in str(no_config.value) and "\n" not in str(no_config.value)
    assert not admin.value.retriable
    assert WRONG_PASSWORD not in str(admin.value)

    # The command line, in a process of its own (no test's log handlers): one line.
    environ = {**world.secure.environ(SVC_AURORA), **wrong}
    where = ("--root", world.root, "--topic-prefix", world.topics.prefix)
    cli = await asyncio.to_thread(
        subprocess.run,
        [*CLI, "acl", "plan", *map(str, where), *DEPLOYMENT],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("CONFIGBUS_")}, **environ},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert cli.returncode == 1
    assert cli.stdout == ""
    (line,) = cli.stderr.splitlines()
    assert line.startswith("configbus: connecting the admin client: ")
    assert refused in line and WRONG_PASSWORD not in line


async def test_a_refused_tls_handshake_names_the_setting(world: World) -> None:
    no_certificate = world.secure.kafka(
        SVC_AURORA_TLS,
        CONFIGBUS_KAFKA_SSL_CERTIFICATE_LOCATION="",
        CONFIGBUS_KAFKA_SSL_KEY_LOCATION="",
    )
    system_cas = world.secure.kafka(SVC_AURORA, CONFIGBUS_KAFKA_SSL_CA_LOCATION="")
    async with asyncio.timeout(60):  # an error, not a hang
        with pytest.raises(AuthorizationError) as refused:
            await Admin(no_certificate).start()
        with pytest.raises(BusError) as untrusted:
            await Admin(system_cas).start()
    assert "closed the TLS connection at once: it takes no certificate of this client's" in str(
        refused.value
    )
    assert "CONFIGBUS_KAFKA_SSL_CERTIFICATE_LOCATION" in str(refused.value)
    assert "the broker's TLS certificate does not verify" in str(untrusted.value)
    assert "is CONFIGBUS_KAFKA_SSL_CA_LOCATION the CA that signed it?" in str(untrusted.value)
    assert not refused.value.retriable and not untrusted.value.retriable


# -- a tenant removed --------------------------------------------------------------------
async def test_removed_tenants_acls_go_only_with_prune(
    secure_kafka: SecureKafka, tmp_path: Path
) -> None:
    root, topics = copy_tree(tmp_path), unique_topics()

    def configbus_acl(*args: str) -> Awaitable[Run]:
        return asyncio.to_thread(acl, secure_kafka, root, topics, *args)

    assert (await configbus_acl("apply")).code == 0
    helix = topics.tenant_topic(HELIX)
    async with Admin(secure_kafka.kafka()) as admin:
        await admin.ensure_topics([helix], compact=True)
    svc_helix = secure_kafka.kafka(SVC_HELIX)
    assert [r async for r in read_to_end(svc_helix, [helix])] == []  # allowed: no error

    shutil.rmtree(root / "tenants" / HELIX)
    assert HELIX not in EnvironmentTree(root).tenants()
    gone = {
        Acl(ResourceType.TOPIC, helix, PatternType.LITERAL, f"User:{SVC_HELIX}", operation)
        for operation in (Operation.READ, Operation.DESCRIBE)
    }
    plan = await configbus_acl("plan", "--check")
    assert plan.code == 1
    assert sorted(line for line in plan.out.splitlines() if line.startswith("- ")) == sorted(
        f"- {acl}" for acl in gone
    )
    assert f"note: User:{SVC_HELIX}: tenant {HELIX} is not in the tree: no ACLs for it" in plan.out

    kept = await configbus_acl("apply")
    assert kept.code == 0
    assert "acl apply: 0 created, 0 removed" in kept.out
    assert "2 to remove left in place (apply --prune removes them)" in kept.out
    assert [r async for r in read_to_end(svc_helix, [helix])] == []  # still allowed

    pruned = await configbus_acl("apply", "--prune")
    assert pruned.code == 0
    assert sorted(
        line for line in pruned.out.splitlines() if line.startswith("removed ")
    ) == sorted(f"removed {acl}" for acl in gone)
    assert "acl apply: 0 created, 2 removed" in pruned.out

    async def refused() -> bool:
        try:
            async for _ in read_to_end(svc_helix, [helix]):
                pass
        except AuthorizationError:
            return True
        return False

    await wait_until(refused, 20, what=f"{SVC_HELIX} to lose {helix}")
    check = await configbus_acl("plan", "--check")
    assert check.code == 0, check.out


# -- scoped secret references --------------------------------------------------------------
async def test_a_layer_pointing_at_another_tenants_secret_is_not_published(
    world: World, tmp_path: Path
) -> None:
    """helix-audio's prod layer names aurora-records' database password: the publisher
    refuses that stream, naming the file and line, and publishes nothing for it; every
    other stream stays as it was."""
    root = copy_tree(tmp_path)
    layer = root / "tenants/helix-audio/prod.yml"
    text = layer.read_text(encoding="utf-8")
    ours = "!secret tenants/helix-audio/postgres_password"
    assert text.count(ours) == 1
    layer.write_text(text.replace(ours, "!secret tenants/aurora-records/postgres_password"))
    (entry,) = TrustStore.load(world.trust_path).entries()  # the world's publisher key
    settings = PublisherSettings.build(
        root=str(root),
        signing_key=str(world.trust_path.parent / "keys" / f"{entry.key.kid}.key"),
        kid=entry.key.kid,
        topic_prefix=world.topics.prefix,
        audit_topic=world.topics.audit,
        acks_topic=world.topics.acks,
        environ=world.secure.environ(PUBLISHER),
    )
    helix = world.topics.tenant_topic(HELIX)
    before = await world.records([helix])

    report = await publish_once(settings, deadline=120)

    assert list(report.failed) == [(HELIX, "prod")]
    reason = report.failed[(HELIX, "prod")]
    assert "tenants/helix-audio/prod.yml:26" in reason and "aurora-records" in reason
    assert not report.published
    after = await world.records([helix])
    assert len(after[helix]) == len(before[helix])
