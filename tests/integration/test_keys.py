"""Publisher keys against the real broker: a rotation run as an operator runs it
(`configbus keys rotate`, SIGHUP to a `configbus daemon` process whose key file is a
link, `configbus keys retire`) with three services following along, none of them ever
without a config its trust file believes; a key revoked while services run on what it
signed; the host agent catching up with its trust file; and key and trust files others
may change, refused before anything is published.

Every test has its own copy of the tree, key pair, trust file and topic names. Tests
synchronise by polling with a deadline (`wait_until`, `wait_for`); the services'
state is sampled in the background where a test claims something holds throughout.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    CLI,
    REPO,
    Setup,
    config_of,
    edit,
    ensure_topics,
    event_body,
    kid_of,
    produce,
    read_acks,
    sealed,
    started,
    subscriber_settings,
    topic_options,
    wait_until,
    with_value,
)

from configbus.agent import Agent, AgentSettings
from configbus.bus import Admin, KafkaSettings
from configbus.crypto import SigningKey, TrustStore
from configbus.events import Ack, seal
from configbus.publisher import Daemon
from configbus.subscriber import ConfigSubscriber

pytestmark = pytest.mark.integration

AURORA = ("aurora-records", "prod")
HELIX = ("helix-audio", "prod")
NIMBUS = ("nimbus-fm", "prod")
AURORA_PROD = "tenants/aurora-records/prod.yml"
PROD = "prod/prod.yml"  # feeds every prod stream
MAX_SIZE = "database.postgresql.connection_pool.max_size"
PROBE = "feature_flags.rotation_probe"
RELOAD = 0.2  # the services' trust_reload, seconds


@pytest.fixture
def setup(tmp_path: Path, kafka_bootstrap: str) -> Setup:
    return Setup.create(tmp_path, kafka_bootstrap)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Subprocesses a test starts; any still running at the end are killed."""
    made: list[subprocess.Popen[bytes]] = []
    yield made
    for process in made:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
def socket_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder with a short path for the agent's socket (a Unix socket's path holds
    about 100 bytes), removed at the end."""
    folder = Path(f"/tmp/cbkeys-{os.getpid()}-{tmp_path.name[-12:]}")
    folder.mkdir(exist_ok=True)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def subscribers() -> AsyncIterator[list[ConfigSubscriber]]:
    """Subscribers a test starts; all are stopped at the end."""
    made: list[ConfigSubscriber] = []
    yield made
    for sub in made:
        await sub.stop()


def child_env(setup: Setup) -> dict[str, str]:
    """Our environment without CONFIGBUS_* variables but the state topic, which has no
    option: arguments say everything else."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONFIGBUS_")}
    return env | {"CONFIGBUS_STATE_TOPIC": setup.topics.state}


async def run_cli(setup: Setup, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run the `configbus` command in a subprocess, as an operator would."""
    return await asyncio.to_thread(
        subprocess.run,
        [*CLI, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(setup),
        cwd=REPO,
        check=False,
    )


def daemon_command(setup: Setup, signing_key: Path) -> list[str]:
    """`configbus daemon` on `setup`'s tree and topics, without --kid: its kid comes
    from the trust file's entry for the key, so that a new key needs no new arguments."""
    return [
        *CLI,
        "daemon",
        "--root",
        str(setup.root),
        *topic_options(setup),
        "--signing-key",
        str(signing_key),
        "--trust",
        str(setup.trust_path),
        "--reconcile-interval",
        "600",
        "--heartbeat-interval",
        "1",
    ]


def spawn_daemon(
    setup: Setup, signing_key: Path, processes: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    """A `configbus daemon` process (see `daemon_command`), its output in daemon.log."""
    with open(setup.workdir / "daemon.log", "wb") as log:
        process = subprocess.Popen(
            daemon_command(setup, signing_key),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env(setup),
            cwd=REPO,
        )
    processes.append(process)
    return process


def roll_out(trust_file: Path, copy: Path) -> None:
    """Copy a trust file to another host's copy, as a roll-out would: whole, at once."""
    temporary = copy.with_name(f".{copy.name}.new")
    shutil.copy(trust_file, temporary)
    os.replace(temporary, copy)


def point(link: Path, target: Path) -> None:
    """Re-point the symlink `link` at `target` at once (`ln -sfn`, by renaming)."""
    temporary = link.with_name(f".{link.name}.new")
    temporary.symlink_to(target)
    os.replace(temporary, link)


async def subscribe(
    setup: Setup, subscribers: list[ConfigSubscriber], tenant: str, env: str, **changes: Any
) -> ConfigSubscriber:
    """A started subscriber of `setup`'s topics that reloads the trust file every
    `RELOAD` seconds."""
    options: dict[str, Any] = {
        "trust": TrustStore.load(setup.trust_path),
        "trust_reload": RELOAD,
        "start_timeout": 30.0,
    }
    settings = subscriber_settings(setup, tenant, env, **(options | changes))
    sub = ConfigSubscriber(tenant, env, settings=settings)
    subscribers.append(sub)
    return await sub.start()


def kid(sub: ConfigSubscriber) -> str | None:
    return sub.event.kid if sub.event is not None else None


async def latest_signers(setup: Setup, expected: str) -> bool:
    """Whether the latest snapshot record of every stream on the tenant topics is
    signed by the key `expected`."""
    streams = set(setup.streams())
    latest: dict[tuple[str, str], str | None] = {}
    for topic, records in (await setup.records(setup.tenant_topics())).items():
        tenant = setup.topics.tenant_of(topic) or ""
        for record in records:
            if (tenant, (record.key or b"").decode()) in streams:
                latest[(tenant, (record.key or b"").decode())] = kid_of(record.value)
    return latest.keys() == streams and set(latest.values()) == {expected}


async def acks_of(setup: Setup, *subs: ConfigSubscriber) -> list[Ack]:
    """The acknowledgements of `subs` on the acks topic, in order."""
    instances = {sub.settings.instance_id for sub in subs}
    return [ack for _, ack in await read_acks(setup) if ack.instance in instances]


@dataclass
class Sampler:
    """Looks at every subscriber every few milliseconds until stopped, and writes down
    each moment one has no config, runs one its trust file no longer believes, or has
    refused a record."""

    subs: list[ConfigSubscriber]
    samples: int = 0
    problems: list[str] = field(default_factory=list)
    kids: dict[str, set[str | None]] = field(default_factory=dict)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        while not self._stop.is_set():
            for sub in self.subs:
                snapshot, instance = sub.snapshot, sub.settings.instance_id
                self.kids.setdefault(instance, set()).add(
                    snapshot.event.kid if snapshot.event is not None else None
                )
                if snapshot.version == 0 or not snapshot.signer_trusted or sub.rejected:
                    self.problems.append(
                        f"{instance}: v{snapshot.version} signer_trusted="
                        f"{snapshot.signer_trusted} ({snapshot.signer_note}) "
                        f"rejected={sub.rejected}"
                    )
            self.samples += 1
            await asyncio.sleep(0.005)

    def stop(self) -> None:
        self._stop.set()


# -- 1 ---------------------------------------------------------------------------------
async def test_a_rotation_leaves_no_instance_without_a_config_it_trusts(
    setup: Setup, processes: list[subprocess.Popen[bytes]], subscribers: list[ConfigSubscriber]
) -> None:
    """The operator's sequence, each step with the real command: `keys rotate`, then
    (once every service trusts the new key) the daemon's key link re-pointed and SIGHUP,
    which publishes every stream again under the new key, then `keys retire` of the old
    key, then an edit. Three services on two streams apply each step and, sampled all
    along, always run a config whose signer their trust file believes, refusing
    nothing."""
    old, new = setup.kid, f"{setup.kid}-next"
    new_key = setup.workdir / "keys-next" / f"{new}.key"
    link = setup.workdir / "publisher.key"
    link.symlink_to(setup.key_path)
    daemon = spawn_daemon(setup, link, processes)

    subs = [await subscribe(setup, subscribers, *stream) for stream in (AURORA, AURORA, HELIX)]
    assert [(sub.version, kid(sub), sub.signer_trusted) for sub in subs] == [(1, old, True)] * 3
    sampler = Sampler(subs)
    sampling = asyncio.create_task(sampler.run())
    try:
        # 1. A new key, trusted beside the old one; the trust file reaches every service.
        rotated = await run_cli(
            setup, "keys", "rotate", "--kid", new, "--out", new_key.parent, "--trust",
            setup.trust_path,
        )  # fmt: skip
        assert rotated.returncode == 0, rotated.stderr
        assert f"beside {old}, which it replaces" in rotated.stdout
        assert f"(ln -sfn {new_key} LINK) and send it SIGHUP" in rotated.stdout  # as done here
        await wait_until(
            lambda: all(new in sub.trust for sub in subs), 10, what="every service trusting it"
        )
        assert sampler.samples > 0 and {kid(sub) for sub in subs} == {old}

        # 2. The daemon switches keys and publishes every stream again, same content.
        before = [(sub.version, sub.config.hash) for sub in subs]
        point(link, new_key)
        daemon.send_signal(signal.SIGHUP)
        await wait_until(
            lambda: all(kid(sub) == new for sub in subs), 30, what="every service on the new key"
        )
        assert [(sub.version - 1, sub.config.hash) for sub in subs] == before
        assert {sub.event.body.cause.reason for sub in subs if sub.event} == {
            f"re-signed with key {new}"
        }
        await wait_until(
            lambda: latest_signers(setup, new), 30, interval=0.2, what="every stream re-signed"
        )

        # 3. The old key retired: nothing any service runs was signed by it.
        retired = await run_cli(setup, "keys", "retire", "--kid", old, "--trust", setup.trust_path)
        assert retired.returncode == 0, retired.stderr

        def retired_everywhere() -> bool:
            entries = [sub.trust.get(old) for sub in subs]
            return all(e is not None and e.not_after is not None for e in entries)

        # Each service judges the signer of what it runs as it takes in the trust file.
        await wait_until(retired_everywhere, 10, what="every service seeing the old key retired")
        # A service starting now, on a stream nobody followed, starts on the new key.
        late = await subscribe(setup, subscribers, *NIMBUS)
        assert (late.version, kid(late), late.signer_trusted) == (2, new, True)

        # 4. An edit, signed with the new key, reaches every service.
        edit(setup.path(PROD), "feature_flags:\n", "feature_flags:\n  rotation_probe: true\n")
        await wait_until(
            lambda: all(sub.config.get(PROBE) is True for sub in [*subs, late]),
            30,
            what="the edit",
        )
    finally:
        sampler.stop()
        await sampling
    daemon.send_signal(signal.SIGTERM)
    await wait_until(lambda: daemon.poll() is not None, 20, what="a clean SIGTERM stop")
    assert daemon.returncode == 0, (setup.workdir / "daemon.log").read_text()[-2000:]

    assert sampler.problems == []
    assert sampler.samples > 100
    assert all(kids == {old, new} for kids in sampler.kids.values()), sampler.kids
    assert [(sub.version, kid(sub), sub.signer_trusted) for sub in [*subs, late]] == [
        (3, new, True)
    ] * 4
    assert late.rejected == {}
    assert all(sub.rejected == {} and sub.applied == 3 for sub in subs)

    async def nine_applied() -> list[Ack] | None:
        acks = await acks_of(setup, *subs)
        return acks if sum(a.status == "applied" for a in acks) >= 9 else None

    acks = await wait_until(nine_applied, 20, what="every service's acks")
    assert all(ack.status == "applied" and ack.signer_trusted for ack in acks)
    for sub in subs:
        applied = [a for a in acks if a.instance == sub.settings.instance_id]
        assert [a.version for a in applied] == [1, 2, 3]


# -- 2 ---------------------------------------------------------------------------------
async def test_a_key_revoked_under_a_running_service_keeps_its_config_until_a_valid_one(
    setup: Setup, subscribers: list[ConfigSubscriber]
) -> None:
    """The daemon signs with key A; the service runs on what A signed. A is revoked
    (`keys revoke`, B trusted already): the service keeps its config and says its signer
    is not trusted, in its status and in an ack sent again; the next event A signs is
    refused as key_revoked; once the daemon switches to B, the service runs the newest
    content, signed by B, and trusts its signer again."""
    old, new = setup.kid, f"{setup.kid}-next"
    new_key = setup.workdir / "keys-next" / f"{new}.key"
    rotated = await run_cli(
        setup, "keys", "rotate", "--kid", new, "--out", new_key.parent, "--trust", setup.trust_path
    )
    assert rotated.returncode == 0, rotated.stderr
    link = setup.workdir / "publisher.key"
    link.symlink_to(setup.key_path)
    settings = setup.settings(signing_key=link, kid="", trust=setup.trust_path)
    async with Daemon(settings) as daemon:
        await started(daemon)
        assert daemon.key.kid == old  # the kid of the trust file's entry for the key
        sub = await subscribe(setup, subscribers, *AURORA)
        first, config = sub.version, sub.config
        assert (kid(sub), sub.signer_trusted) == (old, True)

        revoked = await run_cli(
            setup, "keys", "revoke", "--kid", old, "--reason", "laptop stolen", "--trust",
            setup.trust_path,
        )  # fmt: skip
        assert revoked.returncode == 0, revoked.stderr
        snapshot = await sub.wait_for(lambda s: not s.signer_trusted, timeout=10)
        assert snapshot.version == first and snapshot.config is config  # kept, untouched
        note = sub.signer_note
        assert note.startswith(f"key_revoked: key '{old}' is revoked since ")
        assert note.endswith(": laptop stolen")

        async def acks_where(wanted: Callable[[Ack], bool]) -> list[Ack]:
            return [a for a in await acks_of(setup, sub) if wanted(a)]

        acks = await wait_until(
            lambda: acks_where(lambda a: a.status == "applied" and not a.signer_trusted),
            20,
            what="the restated ack",
        )
        assert [(a.version, a.config_hash, a.signer_note) for a in acks] == [
            (first, config.hash, note)
        ]

        # The daemon still signs with the revoked key: its next event is refused.
        edit(setup.path(AURORA_PROD), "max_size: 250", "max_size: 275")
        await wait_until(lambda: sub.rejected.get("key_revoked") == 1, 30, what="the refusal")
        assert sub.version == first and sub.config is config and not sub.signer_trusted

        refusals = await wait_until(
            lambda: acks_where(lambda a: a.status == "rejected"), 20, what="the refusal's ack"
        )
        refusal = refusals[-1]
        assert refusal.reason.startswith(f"key_revoked: key '{old}' is revoked since ")
        assert (refusal.signer_trusted, refusal.signer_note) == (False, note)

        # The daemon switches to the new key: the edit comes again, signed by it.
        point(link, new_key)
        assert daemon.reload_keys()
        snapshot = await sub.wait_for(lambda s: s.signer_trusted, timeout=30)
        assert (snapshot.version, kid(sub), sub.signer_note) == (first + 2, new, "")
        assert sub.config.get(MAX_SIZE) == 275
        assert sub.config.hash == setup.expected_hash(*AURORA)

        applied = await wait_until(
            lambda: acks_where(lambda a: a.status == "applied" and a.version == first + 2),
            20,
            what="the ack of the new key's version",
        )
        assert (applied[0].signer_trusted, applied[0].signer_note) == (True, "")
    assert sub.rejected == {"key_revoked": 1}


# -- 3 ---------------------------------------------------------------------------------
async def test_the_agent_catches_up_with_its_trust_file(
    setup: Setup, subscribers: list[ConfigSubscriber], socket_dir: Path
) -> None:
    """Services behind the host agent, whose trust file reaches the host after theirs
    did (or is reloaded later): a version the new key signed arrives before the agent
    trusts that key, and goes through to the services all the same. Once the agent's
    trust file has the new key, and later retires the old one, a service starting
    behind the agent gets that version, not the older one only the old key signed."""
    tenant, env = AURORA
    old, new = setup.kid, f"{setup.kid}-next"
    new_key = setup.workdir / "keys-next" / f"{new}.key"
    agent_trust = setup.workdir / "agent-trust.yml"  # the agent host's copy
    roll_out(setup.trust_path, agent_trust)
    base = config_of(setup, tenant, env)
    await ensure_topics(setup, tenant)
    await produce(setup, tenant, env, sealed(setup, tenant, env, 1, base))

    agent_settings = AgentSettings(
        socket=socket_dir / "agent.sock",
        kafka=KafkaSettings(setup.kafka.bootstrap_servers, client_id="cbtest-agent"),
        trust=TrustStore.load(agent_trust),
        topics=setup.topics,
        trust_reload=RELOAD,
    )
    behind = {"agent": agent_settings.socket, "kafka": None}
    async with Agent(agent_settings) as agent:
        sub = await subscribe(setup, subscribers, tenant, env, **behind)
        assert (sub.version, sub.source) == (1, "agent")

        rotated = await run_cli(
            setup, "keys", "rotate", "--kid", new, "--out", new_key.parent, "--trust",
            setup.trust_path,
        )  # fmt: skip
        assert rotated.returncode == 0, rotated.stderr
        await wait_until(lambda: new in sub.trust, 10, what="the service trusting the key")
        signed = SigningKey.load(new_key, new)
        changed = with_value(base, MAX_SIZE, 2)
        await produce(setup, tenant, env, seal(event_body(tenant, env, 2, changed), signed))
        await sub.wait_for_version(2, timeout=20)  # verified by the service itself
        assert new not in agent.trust

        # The trust file reaches the agent; later the old key is retired there too.
        roll_out(setup.trust_path, agent_trust)
        await wait_until(lambda: new in agent.trust, 10, what="the agent trusting the key")
        retired = await run_cli(setup, "keys", "retire", "--kid", old, "--trust", setup.trust_path)
        assert retired.returncode == 0, retired.stderr
        roll_out(setup.trust_path, agent_trust)

        def agent_retired() -> bool:
            entry = agent.trust.get(old)
            return entry is not None and entry.not_after is not None

        await wait_until(agent_retired, 10, what="the agent seeing the old key retired")

        late = await subscribe(setup, subscribers, tenant, env, **behind, start_timeout=10.0)
        assert (late.version, kid(late), late.signer_trusted) == (2, new, True)
        assert late.config.get(MAX_SIZE) == 2
        assert (sub.version, sub.signer_trusted, sub.rejected) == (2, True, {})


# -- 4 ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("command", "loose", "mode", "message"),
    [
        (
            "daemon",
            "key",
            0o644,
            "{path}: permissions 0644 are too open for a private key (group or others have "
            "access); fix: chmod 600 {path}",
        ),
        (
            "publish",
            "key",
            0o640,
            "{path}: permissions 0640 are too open for a private key (group or others have "
            "access); fix: chmod 600 {path}",
        ),
        (
            "daemon",
            "trust",
            0o666,
            "{path}: permissions 0666 let group or others change this trust file; "
            "fix: chmod go-w {path}",
        ),
        (
            "agent",
            "trust",
            0o666,
            "{path}: permissions 0666 let group or others change this trust file; "
            "fix: chmod go-w {path}",
        ),
    ],
    ids=["daemon-key-0644", "publish-key-0640", "daemon-trust-0666", "agent-trust-0666"],
)
async def test_a_key_or_trust_file_others_may_change_is_refused_before_anything_is_published(
    setup: Setup, tmp_path: Path, command: str, loose: str, mode: int, message: str
) -> None:
    """One line on stderr naming the file and the fix, exit status 1, and nothing on
    Kafka: not a topic was created."""
    path = setup.key_path if loose == "key" else setup.trust_path
    path.chmod(mode)
    if command == "agent":
        args: list[str | Path] = ["agent", "--socket", tmp_path / "a.sock", "--trust", path]
        args += topic_options(setup)
    else:
        args = daemon_command(setup, setup.key_path)[len(CLI) :]
        if command == "publish":
            args[0:1] = ["publish", "--once"]

    began = time.monotonic()
    result = await run_cli(setup, *args)

    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"configbus: {message.format(path=path)}\n"
    assert time.monotonic() - began < 10  # refused at once, not after waiting for Kafka
    async with Admin(setup.kafka) as admin:
        topics = await admin.topics()
    ours = {setup.topics.acks, setup.topics.audit, setup.topics.state}
    assert [t for t in topics if t in ours or t.startswith(setup.topics.prefix)] == []
