"""Key rotation on the in-memory bus: the daemon takes its kid from the trust file and
refuses a key readers would refuse, switches keys on `reload_keys` (SIGHUP) or a restart
and publishes every stream again under the new key (a held rollback as a rollback), so
that the old key can be retired; and the `configbus keys rotate|retire|revoke|list`
commands that edit the trust file. Against real Kafka: tests/integration/test_keys.py."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import pytest

from configbus.cli import main
from configbus.crypto import SigningKey, TrustStore, generate_keypair
from configbus.crypto.trust import TrustedKey, parse_time
from configbus.errors import KeyringError
from configbus.events import EventKind, VerifiedEvent, open_envelope
from configbus.publisher import Daemon
from configbus.publisher.daemon import publish_once

from .helpers import eventually
from .test_rollback import AURORA, AURORA_PROD, HELIX, World, three_versions

SECOND = 10**9


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def new_key(tmp_path: Path, kid: str) -> tuple[Path, SigningKey]:
    private, _ = generate_keypair(kid, tmp_path / kid)
    return private, SigningKey.load(private, kid)


def trusting(world: World, *keys: SigningKey, **fields: object) -> None:
    """The world's trust file (and `world.trust`): its own key, with `fields`, and `keys`."""
    everything = frozenset({"*"})
    own = dataclasses.replace(TrustedKey(world.key.public, everything, everything), **fields)
    world.trust = TrustStore([own, *(TrustedKey(k.public, everything, everything) for k in keys)])
    world.trust.save(world.trust_path)


def latest(world: World, stream: tuple[str, str]) -> VerifiedEvent:
    """The stream's last event on its tenant topic, checked against every key listed
    (whatever their standing: this is the test reading, not a subscriber)."""
    tenant, env = stream
    records = world.bus.records(world.topics.tenant_topic(tenant))
    trust = TrustStore(dataclasses.replace(e, not_after=None) for e in world.trust.entries())
    events = [open_envelope(r.value or b"", trust) for r in records]
    return [e for e in events if e.body.env == env][-1]


# -- the daemon's key --------------------------------------------------------------------


def test_the_daemon_takes_its_kid_from_the_trust_files_entry_for_its_key(world: World) -> None:
    daemon = Daemon(world.settings(kid="", trust=world.trust_path), bus=world.bus)

    assert daemon.key.kid == "unit"
    with pytest.raises(KeyringError) as refused:
        Daemon(world.settings(kid=""), bus=world.bus)
    assert str(refused.value) == (
        f"{world.key_path}: a key id (kid) is required: give --kid (no trust file)"
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"revoked": True}, "key 'unit' is revoked in {trust}: readers refuse what it signs"),
        (
            {"not_after": 1_700_000_000 * SECOND},
            "key 'unit' expired at 2023-11-14T22:13:20Z in {trust}: readers refuse",
        ),
        (
            {"not_before": 4_000_000_000 * SECOND},
            "key 'unit' is not valid before 2096-10-02T07:06:40Z in {trust}",
        ),
        ({"role": "operator", "max_ttl": 60}, "{trust} lists 'unit' as an operator key"),
    ],
    ids=["revoked", "expired", "not-yet-valid", "operator"],
)
def test_the_daemon_refuses_a_key_its_trust_file_does_not_allow(
    world: World, fields: dict[str, object], message: str
) -> None:
    trusting(world, **fields)

    with pytest.raises(KeyringError) as refused:
        Daemon(world.settings(trust=world.trust_path), bus=world.bus)

    assert str(refused.value).startswith(f"{world.key_path}: ")
    assert message.format(trust=world.trust_path) in str(refused.value)


def test_the_daemon_refuses_another_key_under_its_kid(world: World, tmp_path: Path) -> None:
    other, _ = new_key(tmp_path, "other")

    with pytest.raises(KeyringError) as refused:
        Daemon(world.settings(signing_key=other, trust=world.trust_path), bus=world.bus)

    assert str(refused.value) == (
        f"{other}: not the key {world.trust_path} lists as 'unit' (wrong --kid or key file?)"
    )


async def test_reloading_keys_switches_the_signer_and_every_stream_is_published_again(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGHUP after the key file (a link) points at the new key: the kid comes from the
    trust file, every stream is published again under it, same content, next version;
    a key the trust file does not list is refused and the daemon goes on as it was."""
    rotated_path, rotated = new_key(tmp_path, "rotated")
    trusting(world, rotated)
    link = tmp_path / "current.key"
    link.symlink_to(world.key_path)
    settings = world.settings(signing_key=link, kid="", trust=world.trust_path)
    async with Daemon(settings, bus=world.bus) as daemon:
        await eventually(daemon.ready.is_set, "the first round")
        streams = daemon.index.streams
        before = {s: latest(world, s) for s in streams}
        assert {e.kid for e in before.values()} == {"unit"}

        link.unlink()
        link.symlink_to(rotated_path)
        assert daemon.reload_keys()

        def resigned() -> bool:
            return all(latest(world, s).kid == "rotated" for s in streams)

        await eventually(resigned, "every stream signed by the new key")
        for stream in streams:
            event = latest(world, stream)
            assert event.body.version == before[stream].body.version + 1
            assert event.body.config_hash == before[stream].body.config_hash
            assert event.body.cause.reason == "re-signed with key rotated"
        world.edit(AURORA_PROD, "max_size: 250", "max_size: 260")
        await eventually(lambda: latest(world, AURORA).body.version == 3, "the edit, as v3")
        assert latest(world, AURORA).kid == "rotated"

        stranger_path, _ = new_key(tmp_path, "stranger")
        link.unlink()
        link.symlink_to(stranger_path)
        caplog.clear()
        assert not daemon.reload_keys()
        assert daemon.key.kid == daemon.publisher.key.kid == "rotated"
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == [
            f"keys not reloaded, still signing with rotated: {link}: a key id (kid) is "
            f"required: give --kid (the trust file {world.trust_path} does not list it)"
        ]


async def test_a_restart_with_the_new_key_publishes_every_stream_again_a_held_one_as_held(
    world: World, tmp_path: Path
) -> None:
    await three_versions(world)
    await world.rollback(1)  # aurora v4: v1's content, held
    held = latest(world, AURORA)
    helix = latest(world, HELIX)
    rotated_path, rotated = new_key(tmp_path, "rotated")
    trusting(world, rotated)
    settings = world.settings(signing_key=rotated_path, kid="rotated", trust=world.trust_path)

    await publish_once(settings, bus=world.bus, deadline=5)

    again = latest(world, AURORA)
    assert (again.kid, again.body.version, again.body.kind) == ("rotated", 5, EventKind.ROLLBACK)
    assert again.config_json == held.config_json
    assert world.head(AURORA).hold == world.tree_hash(AURORA)  # still held
    assert (latest(world, HELIX).kid, latest(world, HELIX).body.version) == (
        "rotated",
        helix.body.version + 1,
    )
    report = await publish_once(settings, bus=world.bus, deadline=5)
    assert not report.published  # signed by this key already: nothing more


async def test_after_the_old_key_is_retired_recovery_skips_it_and_versions_rise(
    world: World, tmp_path: Path
) -> None:
    await world.publish()
    rotated_path, rotated = new_key(tmp_path, "rotated")
    trusting(world, rotated)
    settings = world.settings(signing_key=rotated_path, kid="rotated", trust=world.trust_path)
    await publish_once(settings, bus=world.bus, deadline=5)  # every stream v2, rotated
    trusting(world, rotated, not_after=time.time_ns() - SECOND)  # the old key retired
    world.edit(AURORA_PROD, "max_size: 250", "max_size: 260")

    report = await publish_once(settings, bus=world.bus, deadline=5)

    assert report.published == [(*AURORA, 3)]


# -- configbus keys ---------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def trust_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    path = tmp_path / "trust.yml"
    args = ("--out", tmp_path / "keys", "--trust", path, "--tenants", "acme,globex")
    assert run(capsys, "keys", "generate", "--kid", "pub-1", *args)[0] == 0
    return path


def test_rotate_trusts_a_new_key_with_the_old_ones_scope_and_says_what_comes_next(
    tmp_path: Path, trust_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"

    code, out, err = run(
        capsys, "keys", "rotate", "--kid", "pub-2", "--out", keys, "--trust", trust_file
    )

    assert (code, err) == (0, "")
    trust = TrustStore.load(trust_file)
    assert trust.kids == ["pub-1", "pub-2"]
    new = trust.get("pub-2")
    assert new is not None and new.tenants == frozenset({"acme", "globex"})
    assert new.key == SigningKey.load(keys / "pub-2.key", "pub-2").public
    assert out.splitlines()[:2] == [
        f"wrote {keys / 'pub-2.key'} (private, mode 0600) and {keys / 'pub-2.pub'}",
        f"trusted pub-2 in {trust_file} as publisher (tenants acme,globex, environments *), "
        "beside pub-1, which it replaces",
    ]
    assert f"configbus keys retire --kid pub-1 --trust {trust_file} --after 1h" in out
    # What SIGHUP needs: a link to re-point, and a kid taken from the trust file.
    assert f"re-point the link its --signing-key names (ln -sfn {keys / 'pub-2.key'} LINK) " in out
    assert "run with --trust and without --kid" in out
    assert f"or restart it with --signing-key {keys / 'pub-2.key'} --kid pub-2." in out


def test_rotate_names_the_key_it_replaces_when_several_are_in_force(
    tmp_path: Path, trust_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    run(capsys, "keys", "rotate", "--kid", "pub-2", "--out", keys, "--trust", trust_file)

    code, out, err = run(
        capsys, "keys", "rotate", "--kid", "pub-3", "--out", keys, "--trust", trust_file
    )

    assert (code, out) == (2, "")
    assert err == (
        f"configbus: {trust_file}: 2 publisher keys in force (pub-1, pub-2): name the one the "
        "new key replaces with --replaces\n"
    )
    assert not (keys / "pub-3.key").exists()
    args = ("--out", keys, "--trust", trust_file, "--replaces", "pub-2")
    assert run(capsys, "keys", "rotate", "--kid", "pub-3", *args)[0] == 0


def test_retire_sets_not_after_and_never_retires_the_last_publisher_key(
    tmp_path: Path, trust_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "keys", "retire", "--kid", "pub-1", "--trust", trust_file)
    assert (code, out) == (1, "")
    assert err == (
        f"configbus: {trust_file}: retiring pub-1 would leave no publisher key in force "
        "(rotate first: configbus keys rotate), or revoke it (configbus keys revoke)\n"
    )
    run(
        capsys,
        "keys",
        "rotate",
        "--kid",
        "pub-2",
        "--out",
        tmp_path / "keys",
        "--trust",
        trust_file,
    )

    before = time.time_ns()
    code, out, err = run(
        capsys, "keys", "retire", "--kid", "pub-1", "--trust", trust_file, "--after", "1h"
    )

    assert (code, err) == (0, "")
    old = TrustStore.load(trust_file).get("pub-1")
    assert old is not None and old.not_after is not None
    assert before + 3600 * SECOND <= old.not_after <= time.time_ns() + 3600 * SECOND
    assert out.startswith(f"retired pub-1 in {trust_file}: trusted until ")
    assert "(in 1h); readers refuse what it signs after that (key_expired)" in out
    code, out, _ = run(
        capsys, "keys", "retire", "--kid", "pub-1", "--trust", trust_file, "--after", "2h"
    )
    assert code == 0 and "already" in out  # never later than it says
    assert TrustStore.load(trust_file).get("pub-1") == old


def test_revoke_and_list(
    tmp_path: Path, trust_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(
        capsys,
        "keys",
        "rotate",
        "--kid",
        "pub-2",
        "--out",
        tmp_path / "keys",
        "--trust",
        trust_file,
    )
    args = ("--trust", trust_file)

    code, out, err = run(
        capsys, "keys", "revoke", "--kid", "pub-1", *args, "--reason", "laptop\nstolen"
    )

    assert (code, err) == (0, "")
    assert out.startswith(f"revoked pub-1 in {trust_file}: readers refuse what it signs")
    old = TrustStore.load(trust_file).get("pub-1")
    assert old is not None and (old.revoked, old.revoked_reason) == (True, "laptop stolen")
    assert old.revoked_at is not None and abs(old.revoked_at - time.time_ns()) < 60 * SECOND
    code, out, _ = run(capsys, "keys", "list", *args)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"# {trust_file}"
    assert lines[1].split()[:5] == ["pub-1", "publisher", "tenants", "acme,globex,", "environments"]
    assert "key_revoked" in lines[1] and lines[1].endswith(": laptop stolen")
    assert "in force" in lines[2]

    code, out, _ = run(capsys, "keys", "revoke", "--kid", "pub-2", *args, "--reason", "both gone")
    assert code == 0 and "warning: " in out and "no publisher key in force" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("retire", "--kid", "nope"), "lists no key 'nope' (it lists pub-1)"),
        (("revoke", "--kid", "pub-1", "--reason", " "), "--reason: one line of text"),
        (("retire", "--kid", "pub-1", "--after", "soon"), "--after: 'soon' is not a duration"),
        (("rotate", "--kid", "Bad Kid", "--out", "x"), "malformed key id 'Bad Kid'"),
        (("rotate", "--kid", "k2", "--out", "x", "--replaces", "nope"), "lists no key 'nope'"),
    ],
)
def test_a_bad_argument_is_a_usage_error(
    trust_file: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str
) -> None:
    code, out, err = run(capsys, "keys", *args, "--trust", trust_file)

    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and message in err


def test_the_trust_file_comes_from_configbus_trust(
    trust_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CONFIGBUS_TRUST", raising=False)
    assert run(capsys, "keys", "list")[2] == "configbus: give --trust or set CONFIGBUS_TRUST\n"
    monkeypatch.setenv("CONFIGBUS_TRUST", str(trust_file))
    assert run(capsys, "keys", "list")[0] == 0


def test_a_loose_trust_file_is_one_line_with_the_fix(
    trust_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trust_file.chmod(0o664)

    code, out, err = run(capsys, "keys", "list", "--trust", trust_file)

    assert (code, out) == (1, "")
    assert err == (
        f"configbus: {trust_file}: permissions 0664 let group or others change this trust "
        f"file; fix: chmod go-w {trust_file}\n"
    )


def test_times_in_a_written_trust_file_read_back(
    trust_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = trust_file.read_text(encoding="utf-8")
    trust_file.write_text(text + "    not_after: 2030-01-01T00:00:00Z\n", encoding="utf-8")

    assert (
        run(capsys, "keys", "list", "--trust", trust_file)[1]
        .splitlines()[1]
        .endswith("until 2030-01-01T00:00:00Z")
    )
    entry = TrustStore.load(trust_file).get("pub-1")
    assert entry is not None and entry.not_after == parse_time("2030-01-01T00:00:00Z")
