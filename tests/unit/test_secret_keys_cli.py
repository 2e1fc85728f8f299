"""`configbus secret keys add|use|export`, `secret rekey|rewrap -` and the usage errors of
`secret get` that come before Kafka, called through `configbus.cli.main(argv)` on a copy
of the sample tree (the patterns of test_secret_cli.py). Key files are checked for what
they hold and for their mode; no command may print a key or a value it was not asked
for."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import yaml

from configbus.bus import MemoryBus, TopicNames
from configbus.crypto import SigningKey, TrustStore, generate_keypair
from configbus.crypto.secrets import LocalKeyProvider, SealedSecret, data_key_of
from configbus.crypto.trust import OPERATOR, TrustedKey
from configbus.errors import SecretError
from configbus.events import AuditNote, open_note
from configbus.ops.secrets import TreeBook, set_secret
from configbus.tree.tree import EnvironmentTree

from .test_secret_cli import Cli, opened, record, secrets_files

SAMPLE = Path(__file__).resolve().parents[2] / "environments"
NAME = "db/password"
VALUE = b"hunter2-correct-horse"
T = 1_800_000_000  # 2027-01-15 08:00:00 UTC: the keys made "earlier" than the commands
OLD = "20270115-080000"
STAMP = r"\d{8}-\d{6}"


@pytest.fixture(autouse=True)
def _no_configbus_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No tree, keys, store or Kafka from the environment the tests run in."""
    for name in list(os.environ):
        if name.startswith("CONFIGBUS_"):
            monkeypatch.delenv(name)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return Path(shutil.copytree(SAMPLE, tmp_path / "environments"))


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys)


@pytest.fixture
def tenants(root: Path) -> list[str]:
    return EnvironmentTree(root).tenants()


@pytest.fixture
def earlier(tmp_path: Path, tenants: list[str]) -> Path:
    """A key file holding one key per tenant of the tree, made at `T` (so a key made now
    gets another id), each current."""
    provider = LocalKeyProvider({})
    for tenant in tenants:
        provider, _ = provider.with_new_key(tenant, now=T)
    path = tmp_path / "keks.yml"
    provider.save(path)
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def current_only(path: Path) -> LocalKeyProvider:
    """The current key of each tenant in key file `path`, and no other."""
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    return LocalKeyProvider(
        {
            tenant: (
                entry["current"],
                {entry["current"]: base64.b64decode(entry["keys"][entry["current"]])},
            )
            for tenant, entry in document["tenants"].items()
        }
    )


def seal_everywhere(root: Path, keys: Path, env: str = "prod") -> list[str]:
    """`VALUE` as `NAME` of every tenant that runs in `env`; returns those tenants."""
    provider, book = LocalKeyProvider.from_file(keys), TreeBook(root)
    running = sorted(t for t, e in EnvironmentTree(root).streams() if e == env)
    for tenant in running:
        asyncio.run(set_secret(book, provider, tenant, env, NAME, VALUE))
    return running


# -- keys add ---------------------------------------------------------------------------
def test_keys_add_creates_a_private_key_file_with_a_current_key_per_tenant(
    cli: Cli, tmp_path: Path
) -> None:
    path = tmp_path / "new" / "keks.yml"

    code, out, err = cli("secret", "keys", "add", "aurora-records", "helix-audio", "--keys", path)

    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert len(lines) == 3
    ids = []
    for line, tenant in zip(lines[:2], ["aurora-records", "helix-audio"], strict=True):
        found = re.fullmatch(
            rf"{tenant}: new key-encryption key ({tenant}-{STAMP}) \(current\)", line
        )
        assert found, line
        ids.append(found[1])
    assert lines[2] == f"wrote {path} (mode 0600)"
    assert mode(path) == 0o600
    provider = LocalKeyProvider.from_file(path)
    assert provider.tenants == ["aurora-records", "helix-audio"]
    assert [provider.kek_ids(t) for t in provider.tenants] == [[ids[0]], [ids[1]]]
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    for entry in document["tenants"].values():
        assert all(key not in out for key in entry["keys"].values())  # ids only, never a key


def test_keys_add_to_a_file_keeps_the_old_keys_current_and_their_secrets_open(
    cli: Cli, root: Path, earlier: Path
) -> None:
    running = seal_everywhere(root, earlier)

    code, out, _ = cli("secret", "keys", "add", "aurora-records", "--keys", earlier)

    assert code == 0
    added = re.fullmatch(
        rf"aurora-records: new key-encryption key (aurora-records-{STAMP}) \(not current yet\)",
        out.splitlines()[0],
    )
    assert added, out
    provider = LocalKeyProvider.from_file(earlier)
    assert provider.kek_ids("aurora-records") == [f"aurora-records-{OLD}", added[1]]
    assert mode(earlier) == 0o600
    for tenant in running:
        assert opened(provider, root, tenant, "prod") == VALUE


def test_keys_add_current_makes_the_new_key_current_beside_the_old(cli: Cli, earlier: Path) -> None:
    code, out, _ = cli("secret", "keys", "add", "helix-audio", "--current", "--keys", earlier)

    assert code == 0
    added = re.fullmatch(
        rf"helix-audio: new key-encryption key (helix-audio-{STAMP}) \(current\)",
        out.splitlines()[0],
    )
    assert added, out
    provider = LocalKeyProvider.from_file(earlier)
    assert provider.kek_ids("helix-audio") == [added[1], f"helix-audio-{OLD}"]
    assert provider.kek_ids("aurora-records") == [f"aurora-records-{OLD}"]


def test_keys_add_of_a_bad_tenant_id_is_one_line_exit_2_and_writes_nothing(
    cli: Cli, tmp_path: Path
) -> None:
    """Nothing is written, so nothing may be reported as made: a line saying the first
    tenant got a new key (whose id an operator may copy) would be false."""
    path = tmp_path / "keks.yml"

    code, out, err = cli("secret", "keys", "add", "aurora-records", "Bad_Tenant", "--keys", path)

    assert code == 2
    assert err.splitlines() == ["configbus: 'Bad_Tenant' is not a tenant id"]
    assert not path.exists()
    assert out == ""


def test_keys_add_to_a_key_file_others_can_read_is_refused_and_left_alone(
    cli: Cli, earlier: Path
) -> None:
    earlier.chmod(0o644)
    before = earlier.read_bytes()

    code, out, err = cli("secret", "keys", "add", "aurora-records", "--keys", earlier)

    assert (code, out) == (1, "")
    assert err.splitlines() == [f"configbus: {earlier}: readable by others; chmod 600 it (or 640)"]
    assert earlier.read_bytes() == before and mode(earlier) == 0o644


# -- keys use ---------------------------------------------------------------------------
def test_keys_use_makes_a_held_key_current(cli: Cli, earlier: Path) -> None:
    provider, newer = LocalKeyProvider.from_file(earlier).with_new_key("nimbus-fm", now=T + 60)
    provider.save(earlier)
    assert provider.kek_ids("nimbus-fm")[0] == f"nimbus-fm-{OLD}"

    code, out, err = cli("secret", "keys", "use", "nimbus-fm", newer, "--keys", earlier)

    assert (code, err) == (0, "")
    assert out == f"nimbus-fm: {newer} is the current key-encryption key\n"
    used = LocalKeyProvider.from_file(earlier)
    assert used.kek_ids("nimbus-fm") == [newer, f"nimbus-fm-{OLD}"]
    assert used.kek_ids("aurora-records") == [f"aurora-records-{OLD}"]
    assert mode(earlier) == 0o600


@pytest.mark.parametrize(("tenant", "kek_id"), [("nimbus-fm", "nope"), ("initech", "initech-1")])
def test_keys_use_of_a_key_not_held_is_one_line_exit_1_and_changes_nothing(
    cli: Cli, earlier: Path, tenant: str, kek_id: str
) -> None:
    before = earlier.read_bytes()

    code, out, err = cli("secret", "keys", "use", tenant, kek_id, "--keys", earlier)

    assert (code, out) == (1, "")
    assert err.splitlines() == [
        f"configbus: tenant {tenant!r} has no key-encryption key {kek_id!r}"
    ]
    assert earlier.read_bytes() == before


# -- keys export ------------------------------------------------------------------------
def test_keys_export_writes_one_tenants_keys_only(
    cli: Cli, root: Path, earlier: Path, tmp_path: Path
) -> None:
    seal_everywhere(root, earlier)
    two, _ = LocalKeyProvider.from_file(earlier).with_new_key("aurora-records", now=T + 60)
    two.save(earlier)
    out_file = tmp_path / "service" / "aurora-keks.yml"

    code, out, err = cli(
        "secret", "keys", "export", "aurora-records", "--keys", earlier, "--out", out_file
    )

    assert (code, err) == (0, "")
    assert out == f"wrote {out_file} (mode 0600): the key-encryption keys of aurora-records\n"
    assert mode(out_file) == 0o600
    exported = LocalKeyProvider.from_file(out_file)
    assert exported.tenants == ["aurora-records"]
    assert exported.kek_ids("aurora-records") == two.kek_ids("aurora-records")
    assert opened(exported, root, "aurora-records", "prod") == VALUE
    with pytest.raises(SecretError, match="tenant 'helix-audio' has no key-encryption key"):
        opened(exported, root, "helix-audio", "prod")


def test_keys_export_of_a_tenant_without_keys_is_one_line_exit_1(
    cli: Cli, earlier: Path, tmp_path: Path
) -> None:
    out_file = tmp_path / "initech-keks.yml"

    code, out, err = cli(
        "secret", "keys", "export", "initech", "--keys", earlier, "--out", out_file
    )

    assert (code, out) == (1, "")
    assert err.splitlines() == ["configbus: no key-encryption key for tenant 'initech'"]
    assert not out_file.exists()


# -- rekey and rewrap for every tenant ----------------------------------------------------
def test_rekey_for_tenant_dash_seals_every_tenants_values_under_new_data_keys(
    cli: Cli, root: Path, earlier: Path
) -> None:
    running = seal_everywhere(root, earlier)
    provider = LocalKeyProvider.from_file(earlier)
    before = {t: record(root, t, "prod").versions[0] for t in running}

    code, out, _ = cli("secret", "rekey", "-", "prod", "--root", root, "--keys", earlier)

    assert code == 0
    assert out.splitlines() == [
        f"{t}/prod: 1 value(s) sealed again under a new data key" for t in running
    ]
    for tenant in running:
        new = record(root, tenant, "prod").versions[0]
        old_key = data_key_of(provider, tenant, "prod", SealedSecret.decode(before[tenant]))
        assert data_key_of(provider, tenant, "prod", SealedSecret.decode(new)) != old_key
        assert opened(provider, root, tenant, "prod") == VALUE
    assert VALUE.decode() not in cli.said


def test_rewrap_for_tenant_dash_moves_every_tenant_to_the_key_made_current(
    cli: Cli, root: Path, earlier: Path, tenants: list[str]
) -> None:
    running = seal_everywhere(root, earlier)
    code, _, _ = cli("secret", "keys", "add", *tenants, "--current", "--keys", earlier)
    assert code == 0
    rotated = LocalKeyProvider.from_file(earlier)
    new_only = current_only(earlier)

    code, out, _ = cli("secret", "rewrap", "-", "prod", "--root", root, "--keys", earlier)

    assert code == 0
    assert out.splitlines() == [f"{t}/prod: 1 value(s) re-wrapped" for t in running]
    for tenant in running:
        sealed = SealedSecret.decode(record(root, tenant, "prod").versions[0])
        assert sealed.kek_id == rotated.kek_ids(tenant)[0] != f"{tenant}-{OLD}"
        assert opened(new_only, root, tenant, "prod") == VALUE
    assert VALUE.decode() not in cli.said


@pytest.mark.parametrize("action", ["rekey", "rewrap"])
def test_rekey_and_rewrap_for_an_environment_no_tenant_runs_in_is_a_usage_error(
    cli: Cli, root: Path, earlier: Path, action: str
) -> None:
    (root / "qa").mkdir()
    (root / "qa" / "qa.yml").write_text((root / "dev" / "dev.yml").read_text())

    code, out, err = cli("secret", action, "-", "qa", "--root", root, "--keys", earlier)

    assert (code, out) == (2, "")
    assert err.splitlines() == ["configbus: no tenant runs in environment 'qa'"]
    assert secrets_files(root) == []


# -- secret get, before Kafka -----------------------------------------------------------
@pytest.fixture
def sealed(root: Path, earlier: Path) -> None:
    """aurora-records/prod holds `NAME` v1 = `VALUE`."""
    provider = LocalKeyProvider.from_file(earlier)
    asyncio.run(set_secret(TreeBook(root), provider, "aurora-records", "prod", NAME, VALUE))


GET = ("secret", "get", "aurora-records", "prod", NAME, "--reason", "INC-7")


def test_get_of_a_secret_that_is_not_set_is_a_usage_error(
    cli: Cli, root: Path, earlier: Path
) -> None:
    code, out, err = cli(*GET, "--root", root, "--keys", earlier)

    assert (code, out) == (2, "")
    assert err.splitlines() == [f"configbus: aurora-records/prod has no secret {NAME!r}"]


@pytest.mark.usefixtures("sealed")
def test_get_of_a_version_that_is_not_live_fails_naming_the_live_ones(
    cli: Cli, root: Path, earlier: Path
) -> None:
    code, out, err = cli(*GET, "--version", "5", "--root", root, "--keys", earlier)

    assert (code, out) == (1, "")
    assert err.splitlines() == [
        f"configbus: secret {NAME!r} of aurora-records/prod has no version 5 (live: v1)"
    ]


@pytest.mark.usefixtures("sealed")
def test_get_without_keys_is_a_usage_error(cli: Cli, root: Path) -> None:
    code, out, err = cli(*GET, "--root", root)

    assert (code, out) == (2, "")
    assert err.splitlines()[0].startswith("configbus: no key-encryption keys: give --keys FILE")


@pytest.mark.usefixtures("sealed")
def test_get_with_another_tenants_keys_fails_without_the_value(
    cli: Cli, root: Path, earlier: Path, tmp_path: Path
) -> None:
    helix = tmp_path / "helix.yml"
    LocalKeyProvider.from_file(earlier).only(["helix-audio"]).save(helix)

    code, out, err = cli(*GET, "--root", root, "--keys", helix)

    assert (code, out) == (1, "")
    assert len(err.splitlines()) == 1
    assert err.startswith(f"configbus: secret {NAME!r} of aurora-records/prod (v1): ")
    assert VALUE.decode() not in cli.said


@pytest.mark.usefixtures("sealed")
def test_get_without_kafka_for_the_audit_note_prints_no_value(
    cli: Cli, root: Path, earlier: Path
) -> None:
    """The value opens, but the audit note cannot be written: it must not be shown."""
    code, out, err = cli(*GET, "--root", root, "--keys", earlier)

    assert (code, out) == (2, "")
    assert err.splitlines() == [
        "configbus: no Kafka cluster: give --bootstrap-servers or set CONFIGBUS_BOOTSTRAP_SERVERS"
    ]
    assert VALUE.decode() not in cli.said


@pytest.mark.usefixtures("sealed")
def test_get_with_a_blank_reason_is_a_usage_error(cli: Cli, root: Path, earlier: Path) -> None:
    code, out, err = cli(
        "secret", "get", "aurora-records", "prod", NAME, "--reason", "   ",
        "--root", root, "--keys", earlier,
    )  # fmt: skip

    assert (code, out) == (2, "")
    assert err.splitlines() == [
        "configbus: --reason: say why you read it (it goes to the audit trail)"
    ]


# -- secret get, its audit note on an in-memory bus -------------------------------------
AUDIT = "audit"


@pytest.fixture
def bus(monkeypatch: pytest.MonkeyPatch) -> MemoryBus:
    """The bus `secret get` writes its audit note to, in place of Kafka."""
    memory = MemoryBus()
    memory.create_topic(AUDIT)
    memory.create_topic(TopicNames.build().tenant_topic("aurora-records"), compact=True)
    monkeypatch.setattr("configbus.cli_override.KafkaBus", lambda settings: memory)
    return memory


@pytest.fixture
def trust(tmp_path: Path) -> TrustStore:
    """tmp_path/trust.yml: "oncall", an operator of aurora-records/prod (its key in
    tmp_path/oncall.key), whose key signs the audit note."""
    oncall, _ = generate_keypair("oncall", tmp_path)
    entry = TrustedKey(
        SigningKey.load(oncall, "oncall").public,
        frozenset({"aurora-records"}),
        frozenset({"prod"}),
        OPERATOR,
        3600,
    )
    store = TrustStore.of().with_key(entry)
    store.save(tmp_path / "trust.yml")
    return store


def notes(bus: MemoryBus, trust: TrustStore) -> list[AuditNote]:
    return [open_note(r.value or b"", trust)[0] for r in bus.records(AUDIT)]


@pytest.fixture
def kafka(tmp_path: Path, trust: TrustStore) -> tuple[str | Path, ...]:
    return (
        "--bootstrap-servers", "unused:9092", "--audit-topic", AUDIT,
        "--trust", tmp_path / "trust.yml", "--key", tmp_path / "oncall.key",
    )  # fmt: skip


@pytest.mark.usefixtures("sealed")
def test_get_prints_the_value_once_its_audit_note_is_written(
    cli: Cli, root: Path, earlier: Path, bus: MemoryBus, kafka: tuple[str, ...], trust: TrustStore
) -> None:
    code, out, err = cli(*GET, "--actor", "alice", *kafka, "--root", root, "--keys", earlier)

    assert (code, out, err) == (0, VALUE.decode(), "")
    (note,) = notes(bus, trust)
    assert (note.action, note.tenant, note.env, note.subject) == (
        "secret_read", "aurora-records", "prod", NAME,
    )  # fmt: skip
    assert (note.version, note.actor, note.reason) == (1, "alice", "INC-7")
    assert VALUE not in bus.records(AUDIT)[0].value


@pytest.mark.usefixtures("sealed")
def test_get_of_an_older_version_prints_it_and_audits_that_version(
    cli: Cli, root: Path, earlier: Path, bus: MemoryBus, kafka: tuple[str, ...], trust: TrustStore
) -> None:
    provider = LocalKeyProvider.from_file(earlier)
    asyncio.run(set_secret(TreeBook(root), provider, "aurora-records", "prod", NAME, b"newer"))

    code, out, _ = cli(*GET, "--version", "1", *kafka, "--root", root, "--keys", earlier)

    assert (code, out) == (0, VALUE.decode())
    assert [note.version for note in notes(bus, trust)] == [1]


@pytest.mark.usefixtures("sealed")
def test_get_whose_audit_note_cannot_be_written_prints_no_value(
    cli: Cli, root: Path, earlier: Path, bus: MemoryBus, kafka: tuple[str, ...]
) -> None:
    bus.down = True

    code, out, err = cli(*GET, *kafka, "--root", root, "--keys", earlier)

    assert (code, out) == (1, "")
    assert err.splitlines() == ["configbus: bus unreachable"]
    assert VALUE.decode() not in cli.said


@pytest.mark.usefixtures("sealed", "bus", "trust")
def test_get_without_an_operator_key_prints_no_value(
    cli: Cli, root: Path, earlier: Path, tmp_path: Path
) -> None:
    """The audit note is signed: without a key to sign it there is no read."""
    kafka = ("--bootstrap-servers", "unused:9092", "--trust", tmp_path / "trust.yml")
    code, out, err = cli(*GET, *kafka, "--root", root, "--keys", earlier)

    assert (code, out) == (2, "")
    assert err.splitlines() == [
        "configbus: give --key (your operator key) or set CONFIGBUS_OPERATOR_KEY"
    ]
    assert VALUE.decode() not in cli.said
