"""The dashboard's page holds no data and loads nothing: one inline style, one inline
script (the two hashes its Content Security Policy allows), no external reference;
its script puts every value in with textContent, never through an HTML parser. (In a
real Chromium, with `<script>` in an actor's name: tests/integration/test_dashboard.py.)
And the `configbus dashboard` command: its usage errors."""

from __future__ import annotations

import base64
import hashlib
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from configbus.cli import main
from configbus.dashboard import DashboardSettings
from configbus.dashboard.page import PAGE, PAGE_CSP, SCRIPT, STYLE
from configbus.errors import SettingsError


class Parsed(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: dict[str, list[str]] = {"script": [], "style": []}
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in = tag if tag in self.text else None

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in is not None:
            self.text[self._in].append(data)


def sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


def test_the_page_is_one_self_contained_document() -> None:
    parsed = Parsed()
    parsed.feed(PAGE.decode())

    tags = [tag for tag, _ in parsed.tags]
    assert tags.count("script") == 1 and tags.count("style") == 1
    assert "".join(parsed.text["script"]) == SCRIPT
    assert "".join(parsed.text["style"]) == STYLE
    for tag, attrs in parsed.tags:
        assert "src" not in attrs, tag  # nothing loaded from anywhere
        assert attrs.get("href") in (None, "data:,"), tag  # the icon: none
        assert not any(name.startswith("on") for name in attrs), tag  # no inline handlers
        assert "style" not in attrs, tag
    assert "http://" not in PAGE.decode().replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in PAGE.decode()
    assert f"'{sha256(SCRIPT)}'" in PAGE_CSP and f"'{sha256(STYLE)}'" in PAGE_CSP
    assert "unsafe-inline" not in PAGE_CSP and "unsafe-eval" not in PAGE_CSP


def test_the_script_never_parses_data_as_html() -> None:
    sinks = ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(")
    more = ("Function(", 'setTimeout("', "srcdoc", "DOMParser", "createContextualFragment")
    for sink in (*sinks, *more):
        assert sink not in SCRIPT, sink
    # Attributes are set only on SVG elements the script makes, from numbers and fixed names.
    assert re.findall(r"setAttribute\((.*)\);", SCRIPT) == ["name, String(value)"]
    assert "textContent" in SCRIPT


def test_the_command_refuses_what_it_cannot_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("CONFIGBUS_TRUST", "CONFIGBUS_DASHBOARD_LISTEN"):
        monkeypatch.delenv(name, raising=False)
    assert main(["dashboard", "--bootstrap-servers", "localhost:1"]) == 2
    assert "give --trust" in capsys.readouterr().err
    trust = tmp_path / "trust.yml"
    trust.write_text("publishers: []\n", encoding="utf-8")
    common = ["dashboard", "--trust", str(trust), "--bootstrap-servers", "x:1"]
    assert main([*common, "--listen", "nowhere"]) == 2
    assert "--listen 'nowhere'" in capsys.readouterr().err
    assert main([*common, "--tenant", "Not A Tenant"]) == 2
    assert "tenant id" in capsys.readouterr().err


def test_settings_come_from_arguments_then_the_environment(tmp_path: Path) -> None:
    trust = tmp_path / "trust.yml"
    trust.write_text("publishers: []\n", encoding="utf-8")
    environ = {
        "CONFIGBUS_TRUST": str(trust),
        "CONFIGBUS_BOOTSTRAP_SERVERS": "kafka:9092",
        "CONFIGBUS_DASHBOARD_LISTEN": "127.0.0.1:9000",
        "CONFIGBUS_ACKS_TOPIC": "my.acks",
    }
    settings = DashboardSettings.build(environ=environ, tenants=["acme"])
    assert settings.listen == "127.0.0.1:9000"
    assert settings.kafka.bootstrap_servers == "kafka:9092"
    assert settings.topics.acks == "my.acks"
    assert settings.tenants == frozenset({"acme"})
    assert DashboardSettings.build(environ=environ, listen=":8080").listen == ":8080"
    default = DashboardSettings.build(environ={**environ, "CONFIGBUS_DASHBOARD_LISTEN": ""})
    assert default.listen == "127.0.0.1:8765"  # loopback unless asked
    with pytest.raises(SettingsError, match="CONFIGBUS_TRUST"):
        DashboardSettings.build(environ={"CONFIGBUS_BOOTSTRAP_SERVERS": "kafka:9092"})
