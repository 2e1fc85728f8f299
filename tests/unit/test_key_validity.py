"""Keys in force, judged by the reader's clock: each way a listed key can stop being
believed has its own reason code; subscribers and the agent reload their trust file
while they run (keeping the last good one when it breaks); a service whose config was
signed by a key since revoked keeps it, says so, and applies the next valid event; key
files and trust files others may change are refused, naming the fix."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from configbus.agent import Agent
from configbus.crypto import SigningKey, TrustStore, generate_keypair
from configbus.crypto.trust import TrustedKey, TrustFile, format_time, parse_time
from configbus.errors import KeyringError, NoConfigError, VerificationError
from configbus.events import Cause, Envelope, build_body, now_ns, open_envelope, seal
from configbus.publisher.state import WriterBeat, open_signed, seal_signed
from configbus.subscriber import ConfigSubscriber

from .helpers import eventually
from .test_agent import agent_settings, behind, say_hello
from .test_subscriber_hardening import ENV, TENANT, Stream

SECOND = 10**9


def entry(key: SigningKey, **fields: object) -> TrustedKey:
    everything = frozenset({"*"})
    return dataclasses.replace(TrustedKey(key.public, everything, everything), **fields)


def save(path: Path, *entries: TrustedKey) -> Path:
    TrustStore(entries).save(path)
    return path


def event(stream: Stream, version: int, key: SigningKey, *, issued_at: int | None = None) -> bytes:
    body = build_body(
        tenant=TENANT,
        env=ENV,
        version=version,
        config_json=f'{{"size":{version}}}'.encode(),
        detected_at=now_ns(),
        cause=Cause(actor="test"),
        issued_at=issued_at,
    )
    return seal(body, key)


@pytest.fixture
def stream(tmp_path: Path) -> Stream:
    return Stream(tmp_path)


@pytest.fixture
def newer(tmp_path: Path) -> SigningKey:
    """The publisher key that replaces `stream.key`."""
    return SigningKey.load(generate_keypair("pub-2", tmp_path / "keys2")[0], "pub-2")


# -- reason codes, by the reader's clock -------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "reason", "message"),
    [
        (
            {"revoked": True, "revoked_at": 1_700_000_000 * SECOND, "revoked_reason": "stolen"},
            "key_revoked",
            "key_revoked: key 'pub' is revoked since 2023-11-14T22:13:20Z: stolen",
        ),
        ({"revoked": True}, "key_revoked", "key_revoked: key 'pub' is revoked"),
        (
            {"not_after": 1_700_000_000 * SECOND},
            "key_expired",
            "key_expired: key 'pub' expired at 2023-11-14T22:13:20Z",
        ),
        (
            {"not_before": 4_000_000_000 * SECOND},
            "key_not_yet_valid",
            "key_not_yet_valid: key 'pub' is not valid before 2096-10-02T07:06:40Z",
        ),
    ],
    ids=["revoked-with-reason", "revoked", "expired", "not-yet-valid"],
)
def test_each_way_a_key_is_not_in_force_has_its_own_reason(
    stream: Stream, fields: dict[str, object], reason: str, message: str
) -> None:
    trust = TrustStore([entry(stream.key, **fields)])

    with pytest.raises(VerificationError) as refused:
        open_envelope(event(stream, 1, stream.key), trust)

    assert refused.value.reason == reason
    assert str(refused.value) == message


def test_a_key_is_judged_by_the_readers_clock_not_by_when_the_event_says_it_was_issued(
    stream: Stream,
) -> None:
    """An event issued while its key was in force is still refused once the key has
    expired or been revoked: a new instance starting up must not believe it."""
    until = now_ns() + 3600 * SECOND
    trust = TrustStore([entry(stream.key, not_after=until)])
    value = event(stream, 1, stream.key, issued_at=until - 3600 * SECOND)

    assert open_envelope(value, trust, now=until - 1).body.version == 1
    with pytest.raises(VerificationError, match=r"^key_expired"):
        open_envelope(value, trust, now=until)
    revoked = TrustStore([entry(stream.key, revoked=True, revoked_at=until)])
    with pytest.raises(VerificationError, match=r"^key_revoked"):  # whatever revoked_at says
        open_envelope(value, revoked, now=until - 7200 * SECOND)


def test_a_forgery_naming_a_revoked_kid_is_a_bad_signature(stream: Stream) -> None:
    """The signature is checked first: key_revoked means the revoked key did sign."""
    trust = TrustStore([entry(stream.key, revoked=True)])
    real = msgspec.msgpack.decode(event(stream, 1, stream.key), type=Envelope)
    forged = msgspec.msgpack.encode(
        Envelope(real.v, "pub", stream.stranger.sign(real.body), real.body)
    )

    with pytest.raises(VerificationError, match=r"^bad_signature"):
        open_envelope(forged, trust)


def test_the_publishers_own_records_are_judged_too(stream: Stream) -> None:
    beat = seal_signed(WriterBeat(writer="w", at=1, interval=1.0), stream.key)

    assert open_signed(beat, TrustStore([entry(stream.key)]), WriterBeat).writer == "w"
    with pytest.raises(VerificationError, match=r"^key_revoked"):
        open_signed(beat, TrustStore([entry(stream.key, revoked=True)]), WriterBeat)


# -- file permissions ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o620, 0o602, 0o660])
def test_a_private_key_others_may_read_or_write_is_refused_with_the_fix(
    tmp_path: Path, mode: int
) -> None:
    private, _ = generate_keypair("k1", tmp_path)
    private.chmod(mode)

    with pytest.raises(KeyringError) as refused:
        SigningKey.load(private, "k1")

    assert str(refused.value) == (
        f"{private}: permissions {mode:04o} are too open for a private key "
        f"(group or others have access); fix: chmod 600 {private}"
    )


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_a_private_key_only_its_owner_may_read_loads(tmp_path: Path, mode: int) -> None:
    private, _ = generate_keypair("k1", tmp_path)
    private.chmod(mode)

    assert SigningKey.load(private, "k1").kid == "k1"


@pytest.mark.parametrize("umask", [0o077, 0o002, 0o000])
def test_generated_keys_have_their_modes_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        private, public = generate_keypair("k1", tmp_path)
    finally:
        os.umask(old)

    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666, 0o622])
def test_a_trust_file_others_may_write_is_refused_with_the_fix(
    stream: Stream, tmp_path: Path, mode: int
) -> None:
    path = save(tmp_path / "trust.yml", entry(stream.key))
    path.chmod(mode)

    with pytest.raises(KeyringError) as refused:
        TrustStore.load(path)

    assert str(refused.value) == (
        f"{path}: permissions {mode:04o} let group or others change this trust file; "
        f"fix: chmod go-w {path}"
    )


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o600, 0o444])
def test_a_trust_file_only_its_owner_may_write_loads(
    stream: Stream, tmp_path: Path, mode: int
) -> None:
    path = save(tmp_path / "trust.yml", entry(stream.key))
    path.chmod(mode)

    assert TrustStore.load(path).kids == ["pub"]


def test_a_public_key_file_others_may_write_is_refused_naming_the_entry(tmp_path: Path) -> None:
    _, public = generate_keypair("k1", tmp_path)
    public.chmod(0o666)
    path = tmp_path / "trust.yml"
    path.write_text("publishers:\n  - kid: k1\n    public_key_file: k1.pub\n", encoding="utf-8")

    with pytest.raises(KeyringError) as refused:
        TrustStore.load(path)

    assert str(refused.value) == (
        f"{path}: publisher 'k1': {public}: permissions 0666 let group or others change this "
        f"trusted public key; fix: chmod go-w {public}"
    )


# -- reloading a trust file ----------------------------------------------------------------


def test_a_trust_file_reloads_when_it_changes_and_keeps_the_last_good_one_when_it_breaks(
    stream: Stream, newer: SigningKey, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = save(tmp_path / "trust.yml", entry(stream.key))
    watched = TrustFile(TrustStore.load(path))

    assert not watched.check() and not watched.reload()  # unchanged: nothing read
    save(path, entry(stream.key), entry(newer))
    assert watched.check() and watched.reload()
    assert watched.store.kids == ["pub", "pub-2"]

    caplog.set_level(logging.INFO, logger="configbus.crypto.trust")
    caplog.clear()
    path.write_text("publishers:\n  - kid: pub\n    tenant: [acme]\n", encoding="utf-8")
    assert not watched.reload() and not watched.reload() and not watched.check()
    assert watched.store.kids == ["pub", "pub-2"]  # the last good one
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # one line per bad version of the file, not one per look
    assert errors[0].getMessage() == (
        f"{path}: publisher 'pub': unknown field 'tenant' (known: kid, public_key, "
        "public_key_file, tenants, environments, role, max_ttl, not_before, not_after, "
        "revoked, revoked_at, revoked_reason); keeping the trust file as last loaded "
        "(pub, pub-2)"
    )
    assert watched.error is not None

    save(path, entry(stream.key), entry(newer))
    path.chmod(0o666)  # loose: refused like a broken file
    assert not watched.reload() and "chmod go-w" in (watched.error or "")
    path.chmod(0o644)
    save(path, entry(stream.key, revoked=True), entry(newer))
    assert watched.reload() and watched.error is None
    assert watched.store.get("pub") == entry(stream.key, revoked=True)
    path.unlink()  # gone: the last good one stays
    assert not watched.reload() and watched.store.kids == ["pub", "pub-2"]


def test_a_trust_file_is_read_once_per_change_in_a_process(stream: Stream, tmp_path: Path) -> None:
    path = save(tmp_path / "trust.yml", entry(stream.key))

    assert TrustFile.shared(TrustStore.load(path)) is TrustFile.shared(TrustStore.load(path))
    with pytest.raises(KeyringError, match="no file to reload"):
        TrustFile.shared(TrustStore([entry(stream.key)]))


# -- a running subscriber ---------------------------------------------------------------------


async def test_a_revoked_signer_keeps_its_config_says_so_and_the_next_valid_event_applies(
    stream: Stream, newer: SigningKey, tmp_path: Path
) -> None:
    path = save(tmp_path / "trust.yml", entry(stream.key))
    stream.trust = TrustStore.load(path)
    await stream.put(event(stream, 1, stream.key))
    async with stream.subscriber(trust_reload=0.05) as sub:
        assert (sub.version, sub.signer_trusted, sub.signer_note) == (1, True, "")
        config = sub.config

        save(path, entry(stream.key, revoked=True, revoked_reason="laptop stolen"), entry(newer))
        snapshot = await sub.wait_for(lambda s: not s.signer_trusted, timeout=5)

        assert snapshot.config is config and snapshot.version == 1  # kept, untouched
        assert sub.signer_note == "key_revoked: key 'pub' is revoked: laptop stolen"
        restated = await eventually(
            lambda: [a for a in stream.acks() if not a.signer_trusted], "the restated ack"
        )
        assert [(a.status, a.version, a.signer_note) for a in restated] == [
            ("applied", 1, "key_revoked: key 'pub' is revoked: laptop stolen")
        ]

        await stream.put(event(stream, 2, stream.key))  # signed by the revoked key
        await eventually(lambda: sub.rejected.get("key_revoked"), "the refusal")
        assert sub.version == 1 and sub.config is config
        refusal = (
            await eventually(
                lambda: [a for a in stream.acks() if a.status == "rejected"], "the refusal's ack"
            )
        )[-1]
        assert refusal.reason.startswith("key_revoked: key 'pub' is revoked")
        assert refusal.version == 0  # a revoked key's claims are nobody's
        assert (refusal.signer_trusted, refusal.signer_note) == (False, sub.signer_note)

        await stream.put(event(stream, 3, newer))
        await sub.wait_for_version(3, timeout=5)
        assert (sub.signer_trusted, sub.signer_note, sub.event and sub.event.kid) == (
            True,
            "",
            "pub-2",
        )
        applied = await eventually(
            lambda: [a for a in stream.acks() if a.status == "applied" and a.version == 3],
            "v3's ack",
        )
        assert (applied[0].signer_trusted, applied[0].signer_note) == (True, "")


async def test_a_key_that_expires_while_running_is_reported_without_a_file_change(
    stream: Stream, tmp_path: Path
) -> None:
    until = now_ns() + 400_000_000  # 0.4 s from now
    path = save(tmp_path / "trust.yml", entry(stream.key, not_after=until))
    stream.trust = TrustStore.load(path)
    await stream.put(event(stream, 1, stream.key))
    async with stream.subscriber(trust_reload=0.05) as sub:
        assert sub.signer_trusted
        await sub.wait_for(lambda s: not s.signer_trusted, timeout=5)

        assert sub.signer_note == f"key_expired: key 'pub' expired at {format_time(until)}"
        assert sub.version == 1


async def test_a_new_instance_refuses_what_a_revoked_key_signed(
    stream: Stream, newer: SigningKey, tmp_path: Path
) -> None:
    path = save(tmp_path / "trust.yml", entry(stream.key, revoked=True), entry(newer))
    stream.trust = TrustStore.load(path)
    await stream.put(event(stream, 1, stream.key))

    with pytest.raises(NoConfigError, match=r"1 record\(s\) of the stream rejected: key_revoked"):
        await stream.subscriber(start_timeout=0.5).start()
    await stream.put(event(stream, 2, newer))
    async with stream.subscriber(start_timeout=5) as sub:
        assert (sub.version, sub.signer_trusted) == (2, True)


async def test_a_trust_file_that_breaks_while_running_leaves_the_last_good_one_in_force(
    stream: Stream, newer: SigningKey, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = save(tmp_path / "trust.yml", entry(stream.key))
    stream.trust = TrustStore.load(path)
    await stream.put(event(stream, 1, stream.key))
    async with stream.subscriber(trust_reload=0.05) as sub:
        path.write_text("publishers: [\n", encoding="utf-8")
        await eventually(
            lambda: any("not valid YAML" in r.getMessage() for r in caplog.records), "the log"
        )
        await stream.put(event(stream, 2, stream.key))
        await sub.wait_for_version(2, timeout=5)  # the last good trust file still holds

        save(path, entry(stream.key, revoked=True), entry(newer))
        await sub.wait_for(lambda s: not s.signer_trusted, timeout=5)
        await stream.put(event(stream, 3, newer))
        await sub.wait_for_version(3, timeout=5)
        assert sub.trust.kids == ["pub", "pub-2"]


async def test_a_trust_store_built_in_memory_is_never_reloaded(stream: Stream) -> None:
    await stream.put(event(stream, 1, stream.key))
    async with stream.subscriber(trust_reload=0.05) as sub:
        assert sub._trust_file is None and sub.trust is stream.trust


# -- the agent ---------------------------------------------------------------------------------


async def test_the_agent_reloads_its_trust_file_and_hands_out_the_new_keys_records(
    stream: Stream, newer: SigningKey, tmp_path: Path
) -> None:
    path = save(tmp_path / "trust.yml", entry(stream.key))
    stream.trust = TrustStore.load(path)
    await stream.put(event(stream, 1, stream.key))
    settings = agent_settings(stream, tmp_path, trust_reload=0.05)
    async with Agent(settings, bus=stream.bus) as agent:
        first = behind(stream, agent, instance_id="i-1", trust_reload=0.05)
        async with first:
            assert first.version == 1
            save(path, entry(stream.key, not_after=now_ns() - 1), entry(newer))
            await eventually(lambda: agent.trust.kids == ["pub", "pub-2"], "the agent's reload")
            # and the service's own reload: a record it refuses is not read again
            await eventually(lambda: first.trust.kids == ["pub", "pub-2"], "the service's reload")
            await stream.put(event(stream, 2, newer))
            await first.wait_for_version(2, timeout=5)
            await stream.put(event(stream, 3, stream.key))  # the expired key
            await eventually(lambda: first.rejected.get("key_expired"), "the refusal")
        stream_state = agent._streams[(TENANT, ENV)]
        assert stream_state.version == 2  # adopted the new key's record, not the expired one's
        async with behind(stream, agent, instance_id="i-2") as second:
            assert (second.version, second.event and second.event.kid) == (2, "pub-2")


async def test_the_agent_hands_out_a_record_it_refused_once_its_trust_file_lists_the_key(
    stream: Stream, newer: SigningKey, tmp_path: Path
) -> None:
    """The new key's first event reaches the agent before the agent's trust file lists
    the key: passed on (the service, whose file does, applies it), not handed out. Once
    the agent's file lists the key, it catches up and hands that event to a service
    starting later, instead of the older one."""
    agent_trust = save(tmp_path / "agent.yml", entry(stream.key))
    stream.trust = TrustStore.load(save(tmp_path / "service.yml", entry(stream.key), entry(newer)))
    await stream.put(event(stream, 1, stream.key))
    settings = agent_settings(
        stream, tmp_path, trust=TrustStore.load(agent_trust), trust_reload=0.05
    )
    async with Agent(settings, bus=stream.bus) as agent, behind(stream, agent) as first:
        await stream.put(event(stream, 2, newer))
        await first.wait_for_version(2, timeout=5)
        assert agent._streams[(TENANT, ENV)].version == 1  # refused: pub-2 is not listed

        save(agent_trust, entry(stream.key), entry(newer))
        await eventually(lambda: agent._streams[(TENANT, ENV)].version == 2, "the catch-up")
        async with behind(stream, agent, instance_id="i-2") as second:
            assert (second.version, second.event and second.event.kid) == (2, "pub-2")
        assert first.rejected == {}


async def test_the_agent_lets_a_catch_up_that_is_connecting_end_before_it_stops(
    stream: Stream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trust file that changes starts catch-ups at any moment, the agent's stop
    included; cancelled while its consumer connects, aiokafka can leave a connection
    open. The agent lets a running catch-up end (within a bound) before it cancels."""
    await stream.put(event(stream, 1, stream.key))
    connecting, connected = asyncio.Event(), asyncio.Event()
    outcomes: list[str] = []
    reader_of = stream.bus.reader

    class SlowReader:
        def __init__(self, topic: str) -> None:
            self.inner = reader_of(topic)

        async def start(self) -> bool:
            connecting.set()
            try:
                await connected.wait()
            except asyncio.CancelledError:
                outcomes.append("cancelled")
                raise
            outcomes.append("connected")
            return bool(await self.inner.start())

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    monkeypatch.setattr(stream.bus, "reader", SlowReader)
    agent = await Agent(agent_settings(stream, tmp_path), bus=stream.bus).start()
    try:
        _, writer, _ = await say_hello(agent)  # its stream is caught up: a reader starts
        await asyncio.wait_for(connecting.wait(), 5)
        reader = agent._reader_task
        stopping = asyncio.create_task(agent.stop())
        await eventually(lambda: reader is not None and reader.done(), "the reader's stop")
        for _ in range(5):
            await asyncio.sleep(0)  # stop() goes on to the catch-up
        connected.set()
        await asyncio.wait_for(stopping, 5)
        writer.close()
    finally:
        await agent.stop()

    assert outcomes == ["connected"]


async def test_the_agent_takes_up_a_trust_file_another_reader_in_its_process_reloaded(
    stream: Stream, newer: SigningKey, tmp_path: Path
) -> None:
    """The watcher of a trust file is shared in a process: when a subscriber in the
    agent's process reloads the file first, the agent still takes the new store up."""
    path = save(tmp_path / "trust.yml", entry(stream.key))
    stream.trust = TrustStore.load(path)
    settings = agent_settings(stream, tmp_path, trust_reload=0.05)
    async with Agent(settings, bus=stream.bus) as agent:
        save(path, entry(stream.key), entry(newer))
        assert TrustFile.shared(stream.trust).reload()  # another reader, before the agent looks

        await eventually(lambda: agent.trust.kids == ["pub", "pub-2"], "the agent's trust")


# -- helpers -----------------------------------------------------------------------------------


def test_times_are_written_as_they_are_read() -> None:
    now = time.time_ns() // 1000 * 1000
    assert parse_time(format_time(now)) == now
    assert format_time(None) == "-"


def test_a_config_subscriber_exposes_what_the_snapshot_says(stream: Stream) -> None:
    sub = ConfigSubscriber(TENANT, ENV, settings=stream.subscriber().settings, bus=stream.bus)
    assert sub.signer_trusted and sub.signer_note == "" and sub.snapshot.signer_trusted
