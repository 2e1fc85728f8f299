"""`configbus secret`, called through `configbus.cli.main(argv)` on a copy of the sample
tree: set (from a file, generated, from stdin, for every tenant of an environment),
list, rotate, retire --force, rekey and rewrap, and each usage error as one line and
exit 2. Nothing here needs Kafka or Redis. No command but `secret get` (whose success
needs Kafka, so is not run here) may print a value: every test checks it did not."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from configbus.cli import main
from configbus.crypto.secrets import LocalKeyProvider, SealedSecret, SecretReader, data_key_of
from configbus.errors import SecretError
from configbus.ops.secrets import TreeBook, generate_value, set_secret
from configbus.tree.sealed import SecretRecord, read_secrets_file, secrets_file
from configbus.tree.tree import EnvironmentTree

SAMPLE = Path(__file__).resolve().parents[2] / "environments"
VALUE = b"hunter2-correct-horse"
NAME = "db/password"


@pytest.fixture(autouse=True)
def _no_configbus_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No tree, keys, store or Kafka from the environment the tests run in."""
    for name in list(os.environ):
        if name.startswith("CONFIGBUS_"):
            monkeypatch.delenv(name)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A copy of the sample tree, which the commands may write."""
    return Path(shutil.copytree(SAMPLE, tmp_path / "environments"))


def write_keys(path: Path, keks: dict[str, tuple[str, dict[str, bytes]]]) -> Path:
    """A key file (mode 0600) holding `keks`: tenant -> (current id, {id: key})."""
    tenants = {
        tenant: {
            "current": current,
            "keys": {kid: base64.b64encode(key).decode() for kid, key in keys.items()},
        }
        for tenant, (current, keys) in keks.items()
    }
    path.write_text(yaml.safe_dump({"tenants": tenants}), encoding="utf-8")
    path.chmod(0o600)
    return path


@pytest.fixture
def keks(root: Path) -> dict[str, tuple[str, dict[str, bytes]]]:
    """One random key-encryption key for every tenant of the tree."""
    return {
        tenant: (f"{tenant}-1", {f"{tenant}-1": os.urandom(32)})
        for tenant in EnvironmentTree(root).tenants()
    }


@pytest.fixture
def keys(tmp_path: Path, keks: dict[str, tuple[str, dict[str, bytes]]]) -> Path:
    return write_keys(tmp_path / "keks.yml", keks)


@pytest.fixture
def provider(keys: Path) -> LocalKeyProvider:
    return LocalKeyProvider.from_file(keys)


class Cli:
    """Runs `configbus` in this process; keeps everything it printed in `said`."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys
        self.said = ""

    def __call__(self, *argv: str | Path) -> tuple[int, str, str]:
        code = main([str(arg) for arg in argv])
        out, err = self.capsys.readouterr()
        assert "Traceback" not in out + err
        self.said += out + err
        return code, out, err


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(capsys)


def record(root: Path, tenant: str, env: str, name: str = NAME) -> SecretRecord:
    return read_secrets_file(secrets_file(root, tenant, env))[name]


def opened(
    provider: LocalKeyProvider,
    root: Path,
    tenant: str,
    env: str,
    name: str = NAME,
    version: int | None = None,
) -> bytes:
    """The plaintext of the secret's newest version, or of `version`, as a service opens it."""
    reader = SecretReader(provider, tenant, env)
    return reader.open(name, record(root, tenant, env, name).versions, version)


def value_file(tmp_path: Path, value: bytes, name: str = "value") -> Path:
    path = tmp_path / name
    path.write_bytes(value)
    return path


def certificate(expires: datetime) -> bytes:
    """A self-signed PEM certificate valid until `expires`."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "radio.example")])
    built = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(expires - timedelta(days=365))
        .not_valid_after(expires)
        .sign(key, hashes.SHA256())
    )
    return built.public_bytes(serialization.Encoding.PEM)


def iso_expiry(pem: bytes) -> str:
    expiry = x509.load_pem_x509_certificate(pem).not_valid_after_utc
    return expiry.strftime("%Y-%m-%dT%H:%M:%SZ")


def secrets_files(root: Path) -> list[Path]:
    return sorted(root.glob("tenants/*/secrets/*.yml"))


def row(out: str, stream: str, name: str) -> list[str]:
    """The table row of `stream` and `name`, split into its columns."""
    for line in out.splitlines():
        if line.split()[:2] == [stream, name]:
            return line.split()
    raise AssertionError(f"no row for {stream} {name} in:\n{out}")


# -- set --------------------------------------------------------------------------------
def test_set_from_a_file_seals_its_bytes_as_version_1_in_the_tree(
    cli: Cli, root: Path, keys: Path, provider: LocalKeyProvider, tmp_path: Path
) -> None:
    code, out, _ = cli(
        "secret", "set", "aurora-records", "prod", NAME,
        "--from-file", value_file(tmp_path, VALUE), "--root", root, "--keys", keys,
    )  # fmt: skip

    assert code == 0
    assert out == f"aurora-records/prod {NAME}: sealed v1 in the tree at {root}\n"
    assert record(root, "aurora-records", "prod").live_versions == (1,)
    assert opened(provider, root, "aurora-records", "prod") == VALUE
    assert VALUE not in secrets_file(root, "aurora-records", "prod").read_bytes()
    assert VALUE.decode() not in cli.said


def test_set_generate_seals_random_values_and_a_second_set_keeps_the_first_live(
    cli: Cli, root: Path, keys: Path, provider: LocalKeyProvider
) -> None:
    argv = ("secret", "set", "helix-audio", "prod", NAME, "--generate", "32")
    first = cli(*argv, "--root", root, "--keys", keys)
    second = cli(*argv, "--root", root, "--keys", keys)

    assert first[0] == second[0] == 0
    assert "v1 stays valid until retired" in second[1]
    sealed = record(root, "helix-audio", "prod")
    assert sealed.live_versions == (2, 1) and sealed.generate == 32
    one = opened(provider, root, "helix-audio", "prod", version=1)
    two = opened(provider, root, "helix-audio", "prod", version=2)
    assert one != two
    as_text = len(base64.urlsafe_b64encode(bytes(32)).rstrip(b"="))  # 32 random bytes
    assert len(one) == len(two) == as_text
    assert one.decode() not in cli.said and two.decode() not in cli.said


@pytest.mark.parametrize("env", ["prod", "staging"])
def test_set_for_tenant_dash_seals_one_record_per_tenant_running_in_the_env(
    cli: Cli, root: Path, keys: Path, provider: LocalKeyProvider, tmp_path: Path, env: str
) -> None:
    tree = EnvironmentTree(root)
    running = sorted(t for t, e in tree.streams() if e == env)
    elsewhere = sorted(set(tree.tenants()) - set(running))
    assert len(running) >= 2  # the sample tree: a "-" that seals one would prove nothing

    code, out, _ = cli(
        "secret", "set", "-", env, NAME,
        "--from-file", value_file(tmp_path, VALUE), "--root", root, "--keys", keys,
    )  # fmt: skip

    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == [f"{t}/{env}" for t in running]
    assert secrets_files(root) == [secrets_file(root, t, env) for t in running]
    for tenant in running:
        assert opened(provider, root, tenant, env) == VALUE
    texts = {record(root, t, env).versions[0] for t in running}
    assert len(texts) == len(running)  # each tenant's own ciphertext, under its own KEK
    stranger = running[1]
    with pytest.raises(SecretError):  # one tenant's text does not open as another's
        SecretReader(provider, stranger, env).open(NAME, record(root, running[0], env).versions)
    assert all(not secrets_file(root, t, env).exists() for t in elsewhere)
    assert VALUE.decode() not in cli.said


@pytest.mark.parametrize(
    ("piped", "value"),
    [
        (b"from-stdin\n", b"from-stdin"),  # echo adds a newline: dropped
        (b"from-stdin\r\n", b"from-stdin"),
        (b"from-stdin", b"from-stdin"),
        (b"from-stdin\n\n", b"from-stdin\n"),  # only one newline is dropped
    ],
)
def test_set_reads_the_value_piped_on_stdin_without_its_trailing_newline(
    root: Path, keys: Path, provider: LocalKeyProvider, piped: bytes, value: bytes
) -> None:
    done = subprocess.run(
        [
            sys.executable, "-m", "configbus", "secret", "set", "nimbus-fm", "prod", NAME,
            "--root", str(root), "--keys", str(keys),
        ],
        input=piped,
        capture_output=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("CONFIGBUS_")},
        timeout=60,
        check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr.decode()
    assert opened(provider, root, "nimbus-fm", "prod") == value
    assert b"from-stdin" not in done.stdout + done.stderr


def test_set_with_only_a_newline_on_stdin_is_an_empty_value(root: Path, keys: Path) -> None:
    done = subprocess.run(
        [
            sys.executable, "-m", "configbus", "secret", "set", "nimbus-fm", "prod", NAME,
            "--root", str(root), "--keys", str(keys),
        ],
        input=b"\n",
        capture_output=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("CONFIGBUS_")},
        timeout=60,
        check=False,
    )  # fmt: skip

    assert done.returncode == 2
    assert done.stderr.decode().splitlines() == [
        "configbus: the value is empty (give it on stdin, or --from-file)"
    ]
    assert secrets_files(root) == []


def test_set_takes_a_tenants_key_from_its_environment_variable(
    cli: Cli, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = os.urandom(32)
    monkeypatch.setenv(
        "CONFIGBUS_KEK_AURORA_RECORDS", f"aurora-env:{base64.b64encode(key).decode()}"
    )

    code, _, _ = cli(
        "secret", "set", "aurora-records", "prod", NAME, "--generate", "16", "--root", root
    )

    assert code == 0
    text = record(root, "aurora-records", "prod").versions[0]
    assert SealedSecret.decode(text).kek_id == "aurora-env"
    own = LocalKeyProvider({"aurora-records": ("aurora-env", {"aurora-env": key})})
    assert opened(own, root, "aurora-records", "prod").decode() not in cli.said


def test_set_rotate_every_in_the_tree_is_refused_and_writes_nothing(
    cli: Cli, root: Path, keys: Path, tmp_path: Path
) -> None:
    """A policy the daemon carries out needs the secret in the tenant store, which every
    daemon sees alike; in the tree, a rotation would go into one daemon's checkout."""
    code, out, err = cli(
        "secret", "set", "aurora-records", "prod", NAME, "--rotate-every", "30d",
        "--generate", "32", "--root", root, "--keys", keys,
    )  # fmt: skip

    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1
    assert err.startswith("configbus: --rotate-every needs --redis")
    assert secrets_files(root) == []


async def test_rotate_every_without_generate_fails_and_writes_nothing(
    root: Path, provider: LocalKeyProvider
) -> None:
    book = TreeBook(root)
    with pytest.raises(SecretError, match="rotate_every needs a generated value"):
        await set_secret(book, provider, "aurora-records", "prod", NAME, VALUE, rotate_every=60)
    assert secrets_files(root) == []


# -- usage errors -----------------------------------------------------------------------
KEYS = "{keys}"
VALUE_FILE = "{value}"
EMPTY_FILE = "{empty}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ("set", "aurora-records", "prod", NAME, "--from-file", EMPTY_FILE, "--keys", KEYS),
            "the value is empty (give it on stdin, or --from-file)",
        ),
        (
            ("set", "aurora-records", "prod", NAME, "--generate", "32",
             "--from-file", VALUE_FILE, "--keys", KEYS),
            "give one of --generate and --from-file",
        ),
        (
            ("set", "aurora-records", "prod", "../x", "--generate", "32", "--keys", KEYS),
            "secret name '../x': lowercase letters, digits and _ . / - (at most 200)",
        ),
        (
            ("set", "aurora-records", "prod", "A", "--generate", "32", "--keys", KEYS),
            "secret name 'A': lowercase letters, digits and _ . / - (at most 200)",
        ),
        (
            ("set", "nope", "prod", NAME, "--generate", "32", "--keys", KEYS),
            "unknown tenant 'nope' (the tree has: {tenants})",
        ),
        (
            ("set", "nimbus-fm", "staging", NAME, "--generate", "32", "--keys", KEYS),
            "tenant 'nimbus-fm' does not run in environment 'staging'",
        ),
        (
            ("set", "aurora-records", "prod", NAME, "--generate", "32"),  # no --keys, no env
            "no key-encryption keys: give --keys FILE, or set CONFIGBUS_SECRET_KEYS or "
            "CONFIGBUS_KEK_<TENANT>",
        ),
        (
            ("rotate", "aurora-records", "prod", NAME, "--generate", "32", "--keys", KEYS,
             "--retire-command", "true"),
            "--retire-command runs after a retirement: add --retire-after-ack",
        ),
        (
            ("rotate", "aurora-records", "prod", NAME, "--generate", "32", "--keys", KEYS),
            f"no secret {NAME!r} in aurora-records/prod (the tree at {{root}}): "
            "`configbus secret set` makes one",
        ),
        (
            ("get", "-", "prod", NAME, "--reason", "INC-1", "--keys", KEYS),
            "secret get reads one stream's secret: name the tenant",
        ),
        (
            ("get", "aurora-records", "prod", NAME, "--keys", KEYS),
            "--reason: say why you read it (it goes to the audit trail)",
        ),
    ],
)  # fmt: skip
def test_a_usage_error_is_one_line_exit_2_and_writes_nothing(
    cli: Cli,
    root: Path,
    keys: Path,
    tmp_path: Path,
    argv: tuple[str, ...],
    message: str,
) -> None:
    places = {
        "keys": keys,
        "value": value_file(tmp_path, VALUE),
        "empty": value_file(tmp_path, b"", "empty"),
        "root": root,
        "tenants": ", ".join(EnvironmentTree(root).tenants()),
    }

    code, out, err = cli("secret", *(arg.format(**places) for arg in argv), "--root", root)

    assert code == 2
    assert out == ""
    assert err.splitlines() == [f"configbus: {message.format(**places)}"]
    assert secrets_files(root) == []
    assert VALUE.decode() not in cli.said


def test_list_of_an_unknown_tenant_is_a_usage_error(cli: Cli, root: Path) -> None:
    """As for every other command (cli.py: an unknown tenant named on the command line
    is exit 2): a typo must not read as "this tenant has no secrets"."""
    code, out, err = cli("secret", "list", "aurora-record", "prod", "--root", root)

    assert code == 2
    assert out == ""
    assert err.splitlines()[0].startswith("configbus: unknown tenant 'aurora-record'")


# -- list -------------------------------------------------------------------------------
@pytest.fixture
def listed(cli: Cli, root: Path, keys: Path, tmp_path: Path) -> None:
    """aurora-records/prod holds db/password v2 (v1 live too), set by hand, and
    api/token v1, generated and rotated every 30d."""
    path = value_file(tmp_path, VALUE)
    for _ in range(2):
        cli("secret", "set", "aurora-records", "prod", NAME, "--from-file", path,
            "--root", root, "--keys", keys)  # fmt: skip
    token = generate_value(24)  # as the daemon's policy would keep it, set by the library
    asyncio.run(
        set_secret(TreeBook(root), LocalKeyProvider.from_file(keys), "aurora-records", "prod",
                   "api/token", token, rotate_every=30 * 86400, generate=24)
    )  # fmt: skip


@pytest.mark.usefixtures("listed")
def test_list_shows_names_versions_and_rotation_never_a_value(
    cli: Cli, root: Path, provider: LocalKeyProvider
) -> None:
    code, out, err = cli("secret", "list", "aurora-records", "prod", "--root", root)

    assert code == 0 and err == ""
    assert out.split()[:9] == ["STREAM", "NAME", "VER", "LIVE", "STORE", "CREATED", "ROTATED",
                               "EVERY", "EXPIRES"]  # fmt: skip
    password = row(out, "aurora-records/prod", NAME)
    assert password[2:5] == ["2", "2,1", "tree"]
    assert password[5] <= password[6]  # created, then rotated (ISO times sort as text)
    assert password[7] == "-"
    token = row(out, "aurora-records/prod", "api/token")
    assert token[2:5] == ["1", "1", "tree"]
    assert token[7] == "30d"
    table, _, unset = out.partition("\n\nreferenced without a value")
    assert len(table.splitlines()) == 3
    assert unset.splitlines()[1].startswith("  aurora-records/prod: ")
    assert NAME not in unset and "api/token" not in unset  # those have values
    token_value = opened(provider, root, "aurora-records", "prod", "api/token")
    for sealed in (*record(root, "aurora-records", "prod").versions, token_value.decode()):
        assert sealed not in out
    assert VALUE.decode() not in cli.said and token_value.decode() not in cli.said


@pytest.mark.usefixtures("listed")
def test_list_json_has_names_versions_and_rotation_never_a_value(
    cli: Cli, root: Path, provider: LocalKeyProvider
) -> None:
    code, out, _ = cli("secret", "list", "-", "prod", "--json", "--root", root)

    assert code == 0
    listed = json.loads(out)
    found = {(item["tenant"], item["name"]): item for item in listed["secrets"]}
    unset = listed["without_value"]["aurora-records/prod"]
    assert "redis/password" in unset and NAME not in unset
    assert set(found) == {("aurora-records", NAME), ("aurora-records", "api/token")}
    password, token = found["aurora-records", NAME], found["aurora-records", "api/token"]
    assert (password["version"], password["live_versions"]) == (2, [2, 1])
    assert (token["version"], token["live_versions"]) == (1, [1])
    assert (password["rotate_every"], token["rotate_every"]) == (None, "30d")
    assert password["store"] == "tree" and password["env"] == "prod"
    assert password["not_after"] is None and password["expires_soon"] is False
    assert password["kek_ids"] == token["kek_ids"] == ["aurora-records-1"]
    token_value = opened(provider, root, "aurora-records", "prod", "api/token")
    assert VALUE.decode() not in cli.said and token_value.decode() not in cli.said
    assert "cbsec1." not in out


def test_list_without_secrets_says_so_and_names_the_references_without_a_value(
    cli: Cli, root: Path
) -> None:
    code, out, err = cli("secret", "list", "aurora-records", "prod", "--root", root)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[:3] == [
        "no sealed secrets",
        "",
        "referenced without a value (reading one raises SecretError):",
    ]
    stream, names = lines[3].split(": ", 1)
    assert stream == "  aurora-records/prod"
    assert {"redis/password", "tenants/aurora-records/postgres_password"} <= set(names.split(", "))


def test_a_certificate_shows_its_expiry_and_a_warning_when_it_is_near(
    cli: Cli, root: Path, keys: Path, tmp_path: Path
) -> None:
    soon = certificate(datetime.now(UTC) + timedelta(days=5))
    later = certificate(datetime.now(UTC) + timedelta(days=90))
    said = []
    for name, pem in (("tls/soon", soon), ("tls/later", later)):
        code, out, _ = cli(
            "secret", "set", "nimbus-fm", "prod", name,
            "--from-file", value_file(tmp_path, pem, name.replace("/", "-")),
            "--root", root, "--keys", keys,
        )  # fmt: skip
        assert code == 0
        said.append(out)
    assert f"; certificate expires {iso_expiry(soon)}" in said[0]

    code, table, warned = cli("secret", "list", "nimbus-fm", "prod", "--root", root)
    assert code == 0
    soon_row = " ".join(row(table, "nimbus-fm/prod", "tls/soon"))
    later_row = " ".join(row(table, "nimbus-fm/prod", "tls/later"))
    assert f"{iso_expiry(soon)} WARNING: in " in soon_row
    assert later_row.endswith(iso_expiry(later)) and "WARNING" not in later_row
    assert warned.splitlines() == ["1 certificate(s) expired or expiring within 30d"]

    code, out, _ = cli("secret", "list", "nimbus-fm", "prod", "--json", "--root", root)
    assert code == 0
    found = {item["name"]: item for item in json.loads(out)["secrets"]}
    assert found["tls/soon"]["not_after"] == iso_expiry(soon)
    assert found["tls/soon"]["expires_soon"] is True
    assert found["tls/later"]["not_after"] == iso_expiry(later)
    assert found["tls/later"]["expires_soon"] is False
    for pem in (soon, later):
        body = pem.decode().splitlines()[1]  # a line of the certificate's base64
        assert body not in cli.said


# -- rotate and retire ------------------------------------------------------------------
def test_rotate_generates_a_new_version_like_the_first_and_keeps_the_old_live(
    cli: Cli, root: Path, keys: Path, provider: LocalKeyProvider
) -> None:
    cli("secret", "set", "aurora-records", "prod", NAME, "--generate", "24",
        "--root", root, "--keys", keys)  # fmt: skip

    code, out, _ = cli("secret", "rotate", "aurora-records", "prod", NAME,
                       "--root", root, "--keys", keys)  # fmt: skip

    assert code == 0
    assert out == (
        f"aurora-records/prod {NAME}: sealed v2 in the tree at {root}; "
        "v1 stays valid until retired\n"
    )
    assert record(root, "aurora-records", "prod").live_versions == (2, 1)
    one = opened(provider, root, "aurora-records", "prod", version=1)
    two = opened(provider, root, "aurora-records", "prod", version=2)
    assert one != two and len(one) == len(two)  # generated again, of the same size
    assert one.decode() not in cli.said and two.decode() not in cli.said


def test_retire_force_drops_the_old_versions_without_kafka(
    cli: Cli, root: Path, keys: Path, provider: LocalKeyProvider, tmp_path: Path
) -> None:
    newest = b"the-newest-value"
    for value in (VALUE, newest):
        cli("secret", "set", "-", "prod", NAME, "--from-file", value_file(tmp_path, value),
            "--root", root, "--keys", keys)  # fmt: skip
    running = sorted(t for t, e in EnvironmentTree(root).streams() if e == "prod")

    code, out, _ = cli("secret", "retire", "-", "prod", NAME, "--force", "--root", root)

    assert code == 0
    assert out.splitlines() == [f"{t}/prod {NAME}: retired v1" for t in running]
    for tenant in running:
        assert record(root, tenant, "prod").live_versions == (2,)
        assert opened(provider, root, tenant, "prod") == newest

    code, out, _ = cli("secret", "retire", "aurora-records", "prod", NAME, "--force",
                       "--root", root)  # fmt: skip
    assert code == 0
    assert out == f"aurora-records/prod {NAME}: retired nothing (no older version live)\n"
    assert VALUE.decode() not in cli.said and newest.decode() not in cli.said


def test_retire_of_a_secret_that_does_not_exist_is_a_usage_error(cli: Cli, root: Path) -> None:
    code, out, err = cli("secret", "retire", "aurora-records", "prod", NAME, "--force",
                         "--root", root)  # fmt: skip

    assert (code, out) == (2, "")
    assert err.splitlines() == [f"configbus: no secret {NAME!r} in aurora-records/prod"]


# -- rekey and rewrap -------------------------------------------------------------------
def fill(cli: Cli, root: Path, keys: Path, tmp_path: Path) -> dict[str, tuple[int, ...]]:
    """aurora-records/prod: db/password v2 and v1 from a file, api/token v1 generated.
    Returns each secret's live versions."""
    path = value_file(tmp_path, VALUE)
    for _ in range(2):
        cli("secret", "set", "aurora-records", "prod", NAME, "--from-file", path,
            "--root", root, "--keys", keys)  # fmt: skip
    cli("secret", "set", "aurora-records", "prod", "api/token", "--generate", "16",
        "--root", root, "--keys", keys)  # fmt: skip
    records = read_secrets_file(secrets_file(root, "aurora-records", "prod"))
    return {name: r.live_versions for name, r in records.items()}


def all_values(
    provider: LocalKeyProvider, root: Path, live: dict[str, tuple[int, ...]]
) -> dict[tuple[str, int], bytes]:
    return {
        (name, v): opened(provider, root, "aurora-records", "prod", name, v)
        for name, versions in live.items()
        for v in versions
    }


def test_rekey_seals_every_live_value_again_under_a_new_data_key(
    cli: Cli, root: Path, keys: Path, provider: LocalKeyProvider, tmp_path: Path
) -> None:
    live = fill(cli, root, keys, tmp_path)
    before = all_values(provider, root, live)
    old = record(root, "aurora-records", "prod").versions
    old_key = data_key_of(provider, "aurora-records", "prod", SealedSecret.decode(old[0]))

    code, out, _ = cli("secret", "rekey", "aurora-records", "prod", "--root", root,
                       "--keys", keys)  # fmt: skip

    count = sum(len(versions) for versions in live.values())
    assert code == 0
    assert out == f"aurora-records/prod: {count} value(s) sealed again under a new data key\n"
    records = read_secrets_file(secrets_file(root, "aurora-records", "prod"))
    assert {name: r.live_versions for name, r in records.items()} == live
    assert set(records[NAME].versions).isdisjoint(old)
    new = records[NAME].versions[0]
    assert data_key_of(provider, "aurora-records", "prod", SealedSecret.decode(new)) != old_key
    assert all_values(provider, root, live) == before
    assert all(value.decode() not in cli.said for value in before.values())


def test_rewrap_moves_every_value_to_the_current_kek_and_they_still_open(
    cli: Cli,
    root: Path,
    keys: Path,
    keks: dict[str, tuple[str, dict[str, bytes]]],
    provider: LocalKeyProvider,
    tmp_path: Path,
) -> None:
    live = fill(cli, root, keys, tmp_path)
    before = all_values(provider, root, live)
    old_id, old_keys = keks["aurora-records"]
    new_key = os.urandom(32)
    rotated = write_keys(
        tmp_path / "rotated.yml",
        keks | {"aurora-records": ("aurora-records-2", {**old_keys, "aurora-records-2": new_key})},
    )
    new_only = LocalKeyProvider(
        {"aurora-records": ("aurora-records-2", {"aurora-records-2": new_key})}
    )
    with pytest.raises(SecretError):  # before: wrapped by the old KEK only
        opened(new_only, root, "aurora-records", "prod")

    code, out, _ = cli("secret", "rewrap", "aurora-records", "prod", "--root", root,
                       "--keys", rotated)  # fmt: skip

    count = sum(len(versions) for versions in live.values())
    assert code == 0
    assert out == f"aurora-records/prod: {count} value(s) re-wrapped\n"
    records = read_secrets_file(secrets_file(root, "aurora-records", "prod"))
    kek_ids = {SealedSecret.decode(t).kek_id for r in records.values() for t in r.versions}
    assert kek_ids == {"aurora-records-2"} and old_id not in kek_ids
    assert all_values(new_only, root, live) == before
    assert all(value.decode() not in cli.said for value in before.values())
