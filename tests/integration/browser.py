"""A real headless Chromium for the dashboard tests, driven over the Chrome DevTools
Protocol with nothing but the `websockets` package.

`find_chromium` looks for the browser on PATH and, when it is missing, runs
deploy/local/chromium.sh once (Debian's ``chromium`` with apt-get, as kafka.sh and
redis.sh install what they need). `launch` starts it with a profile of its own and
``--remote-debugging-port=0``, and reads the port it picked from the
``DevToolsActivePort`` file in that profile. `Cdp` is the browser's websocket
(flattened sessions: one connection, a session id per tab); `Tab` opens a page,
evaluates JavaScript in it, polls the DOM with a deadline and takes screenshots.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "local"
NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
INSTALL_TIMEOUT_S = 600  # apt-get update and install, on a slow mirror
START_TIMEOUT_S = 30.0


def which_chromium() -> str | None:
    """The browser on PATH (or $CONFIGBUS_CHROMIUM), or None."""
    given = os.environ.get("CONFIGBUS_CHROMIUM")
    if given:
        return shutil.which(given)
    return next((found for name in NAMES if (found := shutil.which(name))), None)


def find_chromium() -> tuple[str | None, str]:
    """(the browser, "") or (None, why not): installs it with deploy/local/chromium.sh
    when it is missing, once per process."""
    found = which_chromium()
    if found:
        return found, ""
    started = time.monotonic()
    result = subprocess.run(
        [str(DEPLOY / "chromium.sh"), "install"],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT_S,
        check=False,
    )
    took = time.monotonic() - started
    found = which_chromium()
    if found:
        print(f"chromium installed in {took:.0f}s: {found}")
        return found, ""
    tail = "\n".join(result.stderr.strip().splitlines()[-5:])
    return (
        None,
        f"chromium is not on PATH and deploy/local/chromium.sh could not install it: {tail}",
    )


@dataclass
class Chromium:
    """A running headless browser and its DevTools websocket address."""

    process: subprocess.Popen[bytes]
    websocket: str
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@contextlib.contextmanager
def launch(binary: str, workdir: Path) -> Iterator[Chromium]:
    """Headless Chromium with a profile in `workdir`, stopped on exit."""
    profile = workdir / "profile"
    profile.mkdir(parents=True, exist_ok=True)
    command = [
        binary,
        "--headless",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--mute-audio",
        # Nothing but the page under test: no updates, sync or other calls home (on a
        # closed network they fail, many at a time, at every start).
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--window-size=1600,900",
        f"--user-data-dir={profile}",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        "about:blank",
    ]
    if os.geteuid() == 0:
        command.insert(1, "--no-sandbox")  # Chromium refuses to run as root with one
    log = workdir / "chromium.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    browser = Chromium(process, "", log)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if process.poll() is not None or time.monotonic() > deadline:
                text = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"chromium did not start (exit {process.poll()}):\n{text}")
            time.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        browser.websocket = f"ws://127.0.0.1:{port}{path}"
        yield browser
    finally:
        browser.stop()


class CdpError(Exception):
    pass


class Cdp:
    """The browser's DevTools connection: commands by id, answers and events read by
    one task."""

    def __init__(self, socket: ClientConnection) -> None:
        self.socket = socket
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, url: str) -> AsyncIterator[Cdp]:
        async with connect(url, max_size=None, ping_interval=None) as socket:
            cdp = cls(socket)
            try:
                yield cdp
            finally:
                cdp._reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await cdp._reader

    async def send(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> dict[str, Any]:
        number = next(self._ids)
        message: dict[str, Any] = {"id": number, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        answer = self._waiting[number] = asyncio.get_running_loop().create_future()
        await self.socket.send(json.dumps(message))
        async with asyncio.timeout(30):
            return await answer

    async def _read(self) -> None:
        try:
            async for raw in self.socket:
                message = json.loads(raw)
                waiting = self._waiting.pop(message.get("id", -1), None)
                if waiting is None:
                    self.events.append(message)
                    del self.events[:-500]
                elif "error" in message:
                    waiting.set_exception(CdpError(f"{message['error']}"))
                else:
                    waiting.set_result(message.get("result", {}))
        finally:
            for waiting in self._waiting.values():
                if not waiting.done():
                    waiting.set_exception(CdpError("the browser closed the connection"))

    @contextlib.asynccontextmanager
    async def tab(self, width: int = 1600, height: int = 900) -> AsyncIterator[Tab]:
        """A new tab (its own browser context: no shared cache or storage), closed after."""
        context = (await self.send("Target.createBrowserContext"))["browserContextId"]
        target = (
            await self.send(
                "Target.createTarget", {"url": "about:blank", "browserContextId": context}
            )
        )["targetId"]
        try:
            session = (
                await self.send("Target.attachToTarget", {"targetId": target, "flatten": True})
            )["sessionId"]
            tab = Tab(self, session)
            await tab.call("Page.enable")
            await tab.call("Runtime.enable")
            await tab.call("Log.enable")  # what the browser says: CSP violations, ...
            await tab.call(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            )
            yield tab
        finally:
            with contextlib.suppress(CdpError, TimeoutError):
                await self.send("Target.closeTarget", {"targetId": target})
                await self.send("Target.disposeBrowserContext", {"browserContextId": context})


class Tab:
    def __init__(self, cdp: Cdp, session: str) -> None:
        self.cdp = cdp
        self.session = session

    async def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.cdp.send(method, params, self.session)

    async def goto(self, url: str, timeout: float = 20.0) -> None:
        """Open `url` and wait until its document has loaded."""
        answer = await self.call("Page.navigate", {"url": url})
        if answer.get("errorText"):
            raise CdpError(f"{url}: {answer['errorText']}")
        await self.wait_for("document.readyState === 'complete'", timeout, what=f"{url} to load")

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serialisable)."""
        answer = await self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in answer:
            details = answer["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CdpError(f"{expression[:80]!r} raised: {text}")
        return answer["result"].get("value")

    async def wait_for(
        self, expression: str, timeout: float = 30.0, *, what: str = "", interval: float = 0.1
    ) -> Any:
        """Evaluate `expression` until it is truthy; its value. Fails after `timeout`
        seconds with the last value seen."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if loop.time() > deadline:
                raise AssertionError(
                    f"timed out after {timeout:g}s waiting for {what or expression}; "
                    f"last value: {value!r}"
                )
            await asyncio.sleep(interval)

    async def screenshot(self, *paths: Path) -> bytes:
        """A PNG of the whole page (as tall as its content), written to each of `paths`."""
        height = await self.evaluate("Math.ceil(document.documentElement.scrollHeight)")
        width = await self.evaluate("Math.ceil(document.documentElement.scrollWidth)")
        await self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": int(width), "height": int(height), "deviceScaleFactor": 1, "mobile": False},
        )
        shot = await self.call("Page.captureScreenshot", {"format": "png"})
        data = base64.b64decode(shot["data"])
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return data

    def console(self) -> list[str]:
        """What the page logged, and the exceptions it threw, so far."""
        lines = []
        for event in self.cdp.events:
            if event.get("sessionId") != self.session:
                continue
            params = event.get("params", {})
            if event.get("method") == "Runtime.consoleAPICalled":
                args = " ".join(
                    str(a.get("value", a.get("description", ""))) for a in params["args"]
                )
                lines.append(f"console.{params.get('type')}: {args}")
            elif event.get("method") == "Log.entryAdded":
                entry = params.get("entry", {})
                lines.append(f"log.{entry.get('level')}: {entry.get('text')}")
            elif event.get("method") == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                text = details.get("exception", {}).get("description") or details.get("text")
                lines.append(f"exception: {text}")
        return lines
