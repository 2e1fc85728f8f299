"""The dashboard end to end, as an operator sees it: a publisher daemon and four
subscribers on the real broker, `configbus dashboard` in a process of its own, and
its page in a real headless Chromium (driven over the DevTools protocol,
tests/integration/browser.py). A file edit and an emergency override made during the
test appear on the open page without a reload: the new version with its actor and
reason, every instance at it, the latency cells and chart filled, the override with
its expiry. The screenshot is kept in tests/artifacts/ (git-ignored), and written to
docs/img/dashboard.png with CONFIGBUS_UPDATE_SCREENSHOTS=1.

And hostile values in a real browser: an actor named ``<script>...`` shows as text,
and nothing of it runs."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from browser import Cdp, Chromium, Tab, find_chromium, launch
from helpers import CLI, REPO, Setup, edit, started, subscriber_settings, topic_options, wait_until

from configbus.bus import KafkaBus
from configbus.crypto import OPERATOR, SigningKey, TrustedKey, TrustStore, generate_keypair
from configbus.dashboard import DashboardServer, Model
from configbus.events import Ack, Cause, build_body, now_ns, open_envelope, seal
from configbus.ops.history import stream_history
from configbus.ops.overrides import OverrideEntry, write_overrides
from configbus.publisher import Daemon
from configbus.subscriber import ConfigSubscriber

pytestmark = pytest.mark.integration

HELIX, AURORA, ENV = "helix-audio", "aurora-records", "prod"
HELIX_PROD = "tenants/helix-audio/prod.yml"
AURORA_TENANT = "tenants/aurora-records/tenant.yml"
AURORA_PROD = "tenants/aurora-records/prod.yml"
ARTIFACTS = REPO / "tests" / "artifacts"
README_SHOT = REPO / "docs" / "img" / "dashboard.png"
INSTANCES = (*((HELIX, f"helix-api-{n}") for n in (1, 2, 3)), (AURORA, "aurora-records-api-1"))

# The cells of a stream's row, as the page shows them.
ROW = """(() => {
  const tr = [...document.querySelectorAll("#streams tr")].find((r) => r.dataset.stream === %s);
  if (!tr) return null;
  const text = (name) => tr.querySelector(".c-" + name).textContent;
  const first = (name) => tr.querySelector(".c-" + name + " span").textContent;
  return {version: first("version"), actor: text("actor"), reason: first("reason"),
          instances: first("instances"), p50: first("p50"), p95: first("p95"),
          p99: first("p99"), overrides: text("overrides"), refusals: text("refusals"),
          rollout: text("rollout")};
})()"""


def row_of(stream: str) -> str:
    return ROW % json.dumps(stream)


@pytest.fixture(scope="session")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    """A headless Chromium for the session; installed with deploy/local/chromium.sh
    when none is on PATH, skipped (saying why) when it cannot be."""
    binary, why = find_chromium()
    if binary is None:
        pytest.skip(why)
    with launch(binary, tmp_path_factory.mktemp("chromium")) as browser:
        yield browser


@pytest.fixture
def port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def setup(tmp_path: Path, kafka_bootstrap: str) -> Setup:
    """The publisher's world, with an operator key (alice, helix-audio, an hour) in its
    trust file for the override."""
    world = Setup.create(tmp_path, kafka_bootstrap)
    private, _ = generate_keypair("alice", tmp_path / "operators")
    key = SigningKey.load(private, "alice")
    world.trust = world.trust.with_key(
        TrustedKey(key.public, frozenset({HELIX}), frozenset({ENV}), OPERATOR, 3600)
    )
    world.trust_path.write_text(world.trust.dump(), encoding="utf-8")
    return world


@contextmanager
def dashboard(setup: Setup, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """`configbus dashboard` on `setup`'s topics, in a process of its own; stopped
    after (its log printed)."""
    log = setup.workdir / "dashboard.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONFIGBUS_", "OTEL_"))}
    command = [
        *CLI,
        "dashboard",
        "--listen",
        f"127.0.0.1:{port}",
        *topic_options(setup),
        "--trust",
        str(setup.trust_path),
    ]
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        print(log.read_text(encoding="utf-8", errors="replace")[-4000:])


async def answering(process: subprocess.Popen[bytes], port: int) -> None:
    """Wait until the dashboard answers /healthz."""

    def healthy() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the dashboard exited with {process.returncode}")
        try:
            url = f"http://127.0.0.1:{port}/healthz"
            with urllib.request.urlopen(url, timeout=2) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, ConnectionError):
            return False

    await wait_until(lambda: asyncio.to_thread(healthy), 30, what="the dashboard to answer")


async def row(tab: Tab, stream: str, check: str, what: str, timeout: float = 60.0) -> Any:
    """The stream's cells once `check` (JavaScript over `r`, the cells) holds."""
    expression = f"(() => {{ const r = {row_of(stream)}; return r && ({check}) ? r : null; }})()"
    return await tab.wait_for(expression, timeout, what=what)


async def test_a_change_made_now_appears_on_the_open_page(
    setup: Setup, port: int, chromium: Chromium
) -> None:
    # aurora-records/prod stages its changes: one instance first, then an hour's bake.
    marker = "    layer: true  # tenants/aurora-records/prod.yml must exist and set values"
    edit(
        setup.path(AURORA_TENANT), marker, f"{marker}\n    rollout: {{steps: [1, 100%], bake: 1h}}"
    )
    async with Daemon(setup.settings(trust=setup.trust_path)) as daemon:
        await started(daemon)
        subscribers = [
            ConfigSubscriber(
                tenant,
                ENV,
                settings=subscriber_settings(
                    setup, tenant, ENV, heartbeat=1.0, instance_id=name, service=f"{tenant}-api"
                ),
            )
            for tenant, name in INSTANCES
        ]
        try:
            for subscriber in subscribers:
                await subscriber.start()
            with dashboard(setup, port) as process:
                await answering(process, port)
                await watch(setup, port, chromium)
        finally:
            for subscriber in subscribers:
                await subscriber.stop()


async def watch(setup: Setup, port: int, chromium: Chromium) -> None:
    """Open the dashboard, then change things and see them come."""
    async with Cdp.open(chromium.websocket) as cdp, cdp.tab(1600, 900) as tab:
        await tab.goto(f"http://127.0.0.1:{port}/")
        first = await row(
            tab,
            f"{HELIX}/{ENV}",
            "r.version === 'v1' && r.instances === '3/3'",
            "helix-audio/prod at v1 on its three instances",
        )
        assert first["rollout"] == "none" and first["refusals"] == "none"
        await tab.evaluate("window.__sameDocument = true")

        # -- a file edit: v2 --------------------------------------------------
        edit(setup.path(HELIX_PROD), "max_size: 60", "max_size: 61")
        shown = await row(
            tab,
            f"{HELIX}/{ENV}",
            "r.version === 'v2' && r.instances === '3/3' && r.p50.endsWith(' ms')",
            "v2 on the three instances, with its latency",
        )
        history = await stream_history(KafkaBus(setup.kafka), setup.topics, HELIX, ENV, setup.trust)
        latest = history.latest
        assert latest is not None and latest.version == 2
        assert (shown["actor"], shown["reason"]) == (latest.actor, latest.reason)
        assert shown["reason"] == "file changed"
        for cell in ("p50", "p95", "p99"):
            assert shown[cell].endswith(" ms") and float(shown[cell].split()[0]) >= 0
        assert shown["refusals"] == "none"
        for version, size in ((3, 62), (4, 63)):  # a few more, for the chart
            edit(setup.path(HELIX_PROD), f"max_size: {size - 1}", f"max_size: {size}")
            await row(
                tab,
                f"{HELIX}/{ENV}",
                f"r.version === 'v{version}' && r.instances === '3/3' && r.p50.endsWith(' ms')",
                f"v{version} on the three instances",
            )

        # -- an emergency override, straight to Kafka --------------------------
        alice = SigningKey.load(setup.workdir / "operators" / "alice.key", "alice")

        def lyrics_on(kept: tuple[OverrideEntry, ...], now: int) -> tuple[OverrideEntry, ...]:
            entry = OverrideEntry(
                path="feature_flags.lyrics_sync",
                value=True,
                set_at=now,
                expires_at=now + 1800 * 10**9,
                actor="alice",
                reason="INC-4711",
            )
            return (*kept, entry)

        await write_overrides(
            KafkaBus(setup.kafka),
            setup.topics,
            HELIX,
            ENV,
            key=alice,
            trust=setup.trust,
            change=lyrics_on,
            cause=Cause(actor="alice", reason="INC-4711"),
        )
        overridden = await row(
            tab,
            f"{HELIX}/{ENV}",
            "r.overrides.includes('feature_flags.lyrics_sync')",
            "the override on the page",
        )
        assert "by alice: INC-4711" in overridden["overrides"]
        assert "left)" in overridden["overrides"]  # its expiry, counting down
        assert "true" not in overridden["overrides"].lower()  # no value shown

        # -- a staged change: its rollout's step --------------------------------
        edit(setup.path(AURORA_PROD), "max_size: 250", "max_size: 260")
        staged = await row(
            tab,
            f"{AURORA}/{ENV}",
            "r.rollout.startsWith('step 1/2 (1)')",
            "aurora-records/prod's rollout at its first step",
        )
        assert "canary 1,100%" in staged["rollout"]
        assert (staged["version"], staged["instances"]) == ("v1", "1/1")  # stable: v1

        # -- the same document all along, the chart drawn, nothing thrown ------
        assert await tab.evaluate("window.__sameDocument === true")
        assert await tab.evaluate("window.__dashboard.state") == "live"
        await tab.evaluate(f"document.querySelector('tr[data-stream=\"{HELIX}/{ENV}\"]').click()")
        await tab.wait_for(
            "document.querySelectorAll('#chart circle').length >= 6",
            10,
            what="the latency chart's points of v2, v3 and v4",
        )
        title = await tab.evaluate("document.getElementById('chart-title').textContent")
        assert f"{HELIX}/{ENV}" in title
        problems = [line for line in tab.console() if "error" in line.lower()]
        assert not problems, problems

        shots = [ARTIFACTS / "dashboard.png", setup.workdir / "dashboard.png"]
        if os.environ.get("CONFIGBUS_UPDATE_SCREENSHOTS") == "1":
            shots.append(README_SHOT)
        png = await tab.screenshot(*shots)
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


async def test_hostile_values_show_as_text_and_never_run(
    chromium: Chromium, tmp_path: Path
) -> None:
    """Everything on the page comes from Kafka, where anyone who may write a topic
    writes what they like: HTML in an actor, a reason, an instance's name."""
    private, _ = generate_keypair("pub", tmp_path)
    key = SigningKey.load(private, "pub")
    trust = TrustStore.of(key.public)
    payloads = [
        "<script>window.__pwned = 'script'</script>",
        "<img src=x onerror=\"window.__pwned = 'img'\">",
        '"><svg onload="window.__pwned = \'svg\'">',
        "javascript:window.__pwned = 'url'",
    ]
    body = build_body(
        tenant="acme",
        env="prod",
        version=1,
        config_json=b"{}",
        detected_at=now_ns(),
        cause=Cause(actor=payloads[0], reason=payloads[1]),
        changed_paths=(payloads[2],),
    )
    model = Model()
    model.version(open_envelope(seal(body, key), trust))
    model.ack(
        Ack(
            tenant="acme",
            env="prod",
            version=1,
            instance=payloads[3],
            service=payloads[1],
            status="rejected",
            reason=payloads[2],
        ),
        now_ns(),
    )
    async with (
        DashboardServer("127.0.0.1:0", model) as server,
        Cdp.open(chromium.websocket) as cdp,
        cdp.tab() as tab,
    ):
        await tab.goto(server.url)
        shown = await row(tab, "acme/prod", "r.version === 'v1'", "the hostile row")
        await asyncio.sleep(0.5)  # an onerror or onload would have fired by now

        assert await tab.evaluate("window.__pwned === undefined")
        assert shown["actor"] == payloads[0]
        assert shown["reason"] == payloads[1]
        assert payloads[3] in shown["refusals"] and payloads[2] in shown["refusals"]
        count = "document.querySelectorAll('#streams script, #streams img, #streams svg').length"
        assert await tab.evaluate(count) == 0
        assert not [line for line in tab.console() if "error" in line.lower()]
