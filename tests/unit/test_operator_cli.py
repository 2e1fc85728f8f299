"""What an operator sees at the command line: settings refused with a usage error
wherever they come from, Ctrl-C without a traceback, no traceback from a real process,
and no password from a URL in any log line or message."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

import configbus.cli_bus
from configbus.cli import main
from configbus.errors import SettingsError
from configbus.logs import JsonFormatter, TextFormatter
from configbus.publisher import PublisherSettings
from configbus.redact import without_credentials
from configbus.store import TenantStore

REPO = Path(__file__).resolve().parents[2]
PUBLISH = ("publish", "--once", "--bootstrap-servers", "127.0.0.1:1", "--signing-key", "k.key")


@pytest.fixture(autouse=True)
def _no_configbus_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CONFIGBUS_BOOTSTRAP_SERVERS", "CONFIGBUS_SIGNING_KEY", "CONFIGBUS_BATCH_SIZE"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            (*PUBLISH, "--batch-size", "0"),
            "configbus: batch_size 0: must be a positive number "
            "(--batch-size or CONFIGBUS_BATCH_SIZE)",
        ),
        (
            (*PUBLISH, "--reconcile-interval", "-1"),
            "configbus: reconcile_interval -1.0: must be a positive number "
            "(--reconcile-interval or CONFIGBUS_RECONCILE_INTERVAL)",
        ),
        (
            ("publish", "--once", "--signing-key", "k.key"),
            "configbus: no Kafka cluster: give --bootstrap-servers or set "
            "CONFIGBUS_BOOTSTRAP_SERVERS",
        ),
    ],
    ids=["batch-size-0", "negative-interval", "no-bootstrap-servers"],
)
def test_a_bad_setting_is_a_usage_error_in_one_line(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str
) -> None:
    assert main(list(argv)) == 2
    out, err = capsys.readouterr()
    assert (out, err.splitlines()) == ("", [message])


def test_settings_made_in_code_are_checked_too(tmp_path: Path) -> None:
    settings = PublisherSettings.build(bootstrap_servers="x:1", signing_key="k", environ={})
    with pytest.raises(SettingsError, match="batch_size 0"):
        PublisherSettings(**{**_fields(settings), "batch_size": 0})
    with pytest.raises(SettingsError, match="CONFIGBUS_BATCH_SIZE='0': must be positive"):
        PublisherSettings.build(
            bootstrap_servers="x:1", signing_key="k", environ={"CONFIGBUS_BATCH_SIZE": "0"}
        )


def _fields(settings: PublisherSettings) -> dict[str, object]:
    return {name: getattr(settings, name) for name in settings.__dataclass_fields__}


def test_ctrl_c_ends_a_command_quietly_with_130(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(configbus.cli_bus, "_tail", interrupted)
    assert main(["tail", "acme", "--trust", "t.yml", "--bootstrap-servers", "x:1", "-f"]) == 130
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == ""


def test_a_real_process_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "configbus", "render", "no-such-tenant", "prod"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("configbus: ") and "no-such-tenant" in line


# -- credentials ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("redis://:hunter2@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("redis://app:hunter2@db:6379", "redis://app:***@db:6379"),
        ("redis://127.0.0.1/0?password=hunter2&db=1", "redis://127.0.0.1/0?password=***&db=1"),
        (
            "'postgres://svc:s3cr3t@db.internal/app' does not match '^https://'",
            "'postgres://svc:***@db.internal/app' does not match '^https://'",
        ),
        ("https://h/x?api_key=abc123&page=2", "https://h/x?api_key=***&page=2"),
        ("redis://alice@host:6379", "redis://alice@host:6379"),
        ("no url here, key=value", "no url here, key=value"),
    ],
)
def test_credentials_in_urls_are_masked(text: str, shown: str) -> None:
    assert without_credentials(text) == shown


def test_log_lines_never_carry_a_url_password() -> None:
    url = "redis://:hunter2@127.0.0.1:6379/0?password=hunter3"
    record = logging.LogRecord(
        "configbus.x", logging.WARNING, "f", 1, "redis %s down", (url,), None
    )
    record.url = url
    for formatter in (JsonFormatter(), TextFormatter()):
        line = formatter.format(record)
        assert "hunter2" not in line and "hunter3" not in line
        assert "redis://:***@127.0.0.1:6379/0" in line


def test_a_stores_repr_and_errors_name_no_password() -> None:
    store = TenantStore("redis://:hunter2@127.0.0.1:6379/0?password=hunter3")
    assert "hunter" not in repr(store)


@pytest.mark.parametrize(
    "url", ["redis://:hunter2@127.0.0.1:notaport/0", "redis://:hunter2@[::1/0"]
)
def test_a_malformed_redis_url_is_one_line_without_the_password(
    capsys: pytest.CaptureFixture[str], url: str
) -> None:
    code = main(
        ["render", "aurora-records", "prod", "--root", str(REPO / "environments"), "--redis", url]
    )
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    (line,) = err.splitlines()
    assert line.startswith("configbus: redis URL ") and "hunter2" not in line
